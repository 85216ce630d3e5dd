pub fn hello() {}
pub mod bench;
pub mod ops;
