//! # nn-core
//!
//! The shared foundation of the compact-vision workspace: candle-based layers that train
//! correctly (gradients everywhere, seeded initialisation), fast CPU convolution and pooling
//! kernels, backbones written once behind a pluggable [`factory::LayerFactory`], datasets and
//! loaders, a training engine with checkpoints, and per-layer counting.
//!
//! ## Why each dependency is here
//! - `candle-core`, `candle-nn`: tensors, autograd, the `Module`/`ModuleT` traits.
//! - `gemm`: the matrix-multiply kernels candle itself uses, called directly by the im2col
//!   and Winograd convolutions and the linear layer, so no tensor is allocated per image.
//!   Built with its `x86-v4` feature (workspace `Cargo.toml`): AVX-512 micro-kernels, picked
//!   at run time on CPUs with avx512f, for candle's matmuls as well as ours.
//! - `rayon`: data parallelism of the CPU kernels and the loader.
//! - `rand`, `rand_chacha`, `rand_distr`: seeded, portable random streams (candle's CPU RNG
//!   cannot be seeded).
//! - `safetensors`: checkpoints and weights; `serde`, `serde_json`: metrics and summaries.
//! - `flate2`: gzip IDX files; `sha2`: dataset checksums; `image`: JPEG/PNG decoding.
//! - `indicatif`: progress bars; `plotters`: SVG training curves.
//! - `anyhow`, `thiserror`: errors that name the file or step that failed.
//! - `half`: f16/bf16 element types shared with candle.
//! - `libc`: `mallopt`, to keep freed activation buffers for reuse ([`alloc`]).
//! - `proptest` (tests only): property tests of the binary dataset readers (`tests/data_props.rs`).

pub mod alloc;
pub mod bench;
pub mod data;
pub mod experiment;
pub mod factory;
pub mod init;
pub mod layers;
pub mod model;
pub mod models;
pub mod ops;
pub mod report;
pub mod rng;
pub mod runtime;
pub mod summary;
pub mod testing;
pub mod train;
pub mod var_store;

pub use candle_core;
pub use candle_nn;
pub use factory::{LayerFactory, LayerRole, StandardFactory};
pub use model::Model;
pub use var_store::{ParamKind, VarPath, VarStore};
