//! # adder-nets
//!
//! AdderNet (Chen et al., "AdderNet: Do We Really Need Multiplications in Deep Learning?",
//! CVPR 2020) and PKKD (Xu et al., "Kernel Based Progressive Distillation for Adder Neural
//! Networks", NeurIPS 2020) on nn-core.
//!
//! - [`op`]: the adder kernel `Y = -sum |X_patch - F|` (Eq. (2)) with the paper's backward
//!   (`dY/dF = X - F`, Eq. (5); `dY/dX = HardTanh(F - X)`, Eq. (7)-(8)) as a candle custom op:
//!   im2col-style blocking in per-thread buffers, vectorised `|a - b|` accumulation, rayon over
//!   the batch; any stride, padding, dilation and groups; other devices/dtypes go through a CPU
//!   f32 copy.
//! - [`layer`]: [`AdderConv2d`] and [`AdderLinear`], reporting additions to nn-core's summary.
//! - [`adaptive`]: the adaptive learning rate `alpha_l = eta sqrt(k) / ||dL/dF_l||_2`
//!   (Eq. (12)-(13)) as a training callback.
//! - [`factory`]: [`AdderFactory`], so every nn-core backbone comes out as an AdderNet
//!   (`lenet5-bn`, `resnet20-b`, `resnet18`, ...), stem and classifier in full precision.
//! - [`counts`]: multiplications, additions and the 45 nm energy estimate (0.9 pJ per fp32
//!   addition, 3.7 pJ per multiplication).
//! - [`pkkd`]: kernel-based progressive distillation: a CNN teacher trained together with the
//!   ANN, Gaussian (RBF) kernel on the CNN's responses, Laplacian kernel on the ANN's, learnable
//!   1x1 convolutions, an L2 loss at intermediate layers and temperature KD on the logits.
//!
//! ```no_run
//! use adder_nets::{AdderFactory, AdaptiveLr};
//! use nn_core::models::{create_model, ModelConfig};
//! use nn_core::VarStore;
//! let vs = VarStore::new(0, &nn_core::candle_core::Device::Cpu);
//! let factory = AdderFactory::default();
//! let model = create_model("resnet20-b", &ModelConfig::new(3, 10, 32), &vs.root(), &factory).unwrap();
//! // add to an nn-core Trainer: .with_callback(AdaptiveLr::new(factory.registry(), 0.2))
//! let _cb = AdaptiveLr::new(factory.registry(), 0.2);
//! # let _ = model;
//! ```
//!
//! ## Why each dependency is here
//! - `nn-core`: convolution options, layers (BatchNorm, Conv2d for the full-precision parts),
//!   the layer factory and backbones, the training engine (callbacks) and the summary counting.
//! - `candle-core`, `candle-nn`: tensors, autograd, the custom-op traits, `ModuleT`.
//! - `rayon`: the batch-parallel loops of the adder kernel.
//! - `gemm`: the filter gradient of Eq. (5) is a matrix product per image (the same crate candle
//!   and nn-core use).
//! - `serde`, `serde_json`: serialisable configurations and counts for `summary.json`.
//! - `anyhow`: the error type of nn-core's `Callback` trait.

pub mod adaptive;
pub mod counts;
pub mod factory;
pub mod layer;
pub mod op;
pub mod pkkd;

pub use adaptive::{adaptive_alpha, scale_gradient, AdaptiveLr};
pub use counts::{count, AdderCounts, ADD_PJ, MUL_PJ};
pub use factory::{AdderConfig, AdderFactory};
pub use layer::{AdderConv2d, AdderLinear, AdderRegistry};
pub use op::{adder2d, AdderGeom};
