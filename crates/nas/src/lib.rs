//! # nas
//!
//! DC-NAS (Wang, Xu, Tao 2020, "DC-NAS: Divide-and-Conquer Neural Architecture Search",
//! arXiv:2005.14456) on nn-core: instead of ranking every sampled sub-network by one cheap,
//! noisy criterion, represent each sub-network by how its layers change, cluster similar ones
//! with k-means, compare candidates only inside a cluster, and train the best of each cluster
//! stand-alone to pick the final architecture.
//!
//! - [`space`]: layer-wise search spaces (a small one for 28x28/32x32 inputs and the
//!   MobileNetV2 space for ImageNet); architectures are JSON values.
//! - [`net`]: one network code for the weight-sharing supernet and stand-alone sub-networks.
//! - [`supernet`]: uniform single-path supernet training (nn-core's trainer), sub-network
//!   extraction.
//! - [`eval`]: the cheap criterion (supernet accuracy with recalibrated BatchNorm) and the
//!   layer-wise representation.
//! - [`cluster`]: standardisation, similarity, k-means++ / k-means with empty-cluster handling.
//! - [`rank`]: Kendall's tau, globally and within clusters.
//! - [`standalone`]: short stand-alone training (the careful evaluation), cached by architecture.
//! - [`search`]: DC-NAS, random and global top-K on one budget; resumable JSON state.
//! - [`parallel`]: candidates evaluated on several threads with a thread-count-independent result.
//! - [`presets`]: named setups (`cifar10-small`, `cifar10-fast`, `mnist-small`, `imagenet-mbv2`).
//!
//! ## Why each dependency is here
//! - `nn-core`: layers, BatchNorm and convolution kernels, the trainer, optimizers, data
//!   loading and class-balanced subsets, counting, seeded RNG, results pages.
//! - `candle-core`: tensors and `Var`s (weight sharing is sharing a `Var`).
//! - `rayon`: one-thread pools per worker for deterministic parallel candidate evaluation.
//! - `rand`: sampling architectures and k-means++ seeding from nn-core's seeded generators.
//! - `serde`, `serde_json`: architectures and the search state as JSON.
//! - `anyhow`: errors that say which file or step failed.
//! - `image` (tests only): writing the generated ImageNet-style PNG folders.

pub mod cluster;
pub mod data;
pub mod eval;
pub mod net;
pub mod parallel;
pub mod presets;
pub mod rank;
pub mod search;
pub mod space;
pub mod standalone;
pub mod supernet;

pub use space::{Arch, LayerChoice, Op, SearchSpace};
