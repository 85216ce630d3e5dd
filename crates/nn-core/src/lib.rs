pub mod data;

pub fn hello() {}
