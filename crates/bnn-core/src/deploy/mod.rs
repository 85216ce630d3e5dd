//! Binary inference engine: bit-packed XNOR-popcount kernels and the export of trained bnn-core
//! models into a small, fast inference form.
//!
//! - [`pack`]: signs packed into `u64` words along the reduction dimension.
//! - [`gemm`]: binary GEMM `C = K - 2 popcount(A xor B)` with runtime dispatch (AVX2, `popcnt`,
//!   portable) and rayon over row tiles.
//! - [`conv`]: binary conv2d on channels-last maps (bit-level im2col, exact zero-padding
//!   correction, per-channel output transform) and the float convolution of the stem.
//! - [`model`]: the packed binary ResNet and its forward pass.
//! - [`export`]: from a trained binary ResNet's variables (BinaryFactory on nn-core's
//!   CIFAR ResNets) to a [`model::PackedResNet`], scales and BatchNorm folded.
//! - [`format`]: the model file (safetensors with format, version and SHA-256 checksum).

pub mod conv;
pub mod export;
pub mod format;
pub mod gemm;
pub mod model;
pub mod pack;
#[cfg(test)]
pub(crate) mod testing;

pub use conv::{ConvGeom, FloatConv, Nhwc, PackedConv};
pub use gemm::{bgemm, Kernel};
pub use model::PackedResNet;
pub use pack::PackedMatrix;
