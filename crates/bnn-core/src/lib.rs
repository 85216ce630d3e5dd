//! # bnn-core
//!
//! Binary neural networks on top of nn-core: binary layers you can drop into any nn-core
//! backbone through a [`LayerFactory`](nn_core::LayerFactory), the quantizers that train them,
//! and three methods:
//!
//! - [`quantizer`]: sign with the clipped STE, Bi-Real Net's ApproxSign, and FDA's Fourier
//!   gradient, as named, swappable [`Quantizer`]s (CPU custom ops, device-generic fallback).
//! - [`binary`]: [`BinaryConv2d`], [`BinaryLinear`] (weights scaled per output channel by
//!   mean |W|), FDA's training-only [`NoiseAdaptation`] and the shared [`BinaryControl`].
//! - [`factory`]: [`BinaryFactory`], so `nn_core::models::create_model("resnet20", .., &factory)`
//!   gives a binary ResNet-20 (stem and head stay full precision).
//! - [`schedule`]: the training callback that moves FDA's `n` and the noise weight.
//! - [`lns`]: LNS's mapping network, the noise-corrected loss and its callback.
//! - [`bimlp`]: BiMLP, the binary vision MLP on the Wave-MLP layout.
//! - [`counts`]: float/binary parameters, FLOPs, BOPs, OPs = FLOPs + BOPs/64, packed size.
//! - [`deploy`]: the binary inference engine: bit packing, binary GEMM
//!   `K - 2 popcount(a xor b)` (AVX2 / `popcnt` / portable), exact binary conv2d with the
//!   zero-padding correction, export of trained binary ResNets with scales and BatchNorm folded,
//!   packed binary layers for any factory-built backbone ([`deploy::PackedFactory`]: the packed
//!   BiMLP, dense and depthwise binary FCs), and a checksummed model file.
//!
//! ## Why each dependency is here
//! - `nn-core`: layers, kernels (convolution, pooling, ReLU), the layer factory, backbones, the
//!   training engine (callbacks) and counting this crate builds on.
//! - `candle-core`, `candle-nn`: tensors, autograd, custom ops, the `ModuleT` trait.
//! - `rayon`: parallel loops of the quantizers' CPU kernels.
//! - `serde`, `serde_json`: serialisable configurations and callback state in checkpoints.
//! - `anyhow`: the error type of nn-core's `Callback` trait.
//! - `safetensors`, `sha2`: the deploy model file (tensors, metadata) and its checksum.

pub mod bimlp;
pub mod binary;
pub mod counts;
pub mod deploy;
pub mod factory;
mod fastmath;
pub mod lns;
pub mod quantizer;
pub mod schedule;

pub use bimlp::{BiMlp, BiMlpConfig};
pub use binary::{weight_scale, BinaryControl, BinaryConv2d, BinaryLinear, BinaryOptions, FdaSchedule, NoiseAdaptation, PRelu, RPRelu};
pub use counts::{count, BinaryCounts};
pub use factory::{BinaryConfig, BinaryFactory, BodyActivation};
pub use lns::{unbiased_logistic_loss, LnsCallback, LnsRegistry, MappingNetwork};
pub use quantizer::Quantizer;
pub use schedule::FdaCallback;
