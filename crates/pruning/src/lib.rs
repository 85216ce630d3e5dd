//! # pruning
//!
//! Structural channel pruning for nn-core backbones that physically removes what it prunes:
//! the result is a new, smaller nn-core model (new weight tensors, not masks) with exact
//! parameter and MAC counts.
//!
//! - [`graph`]: coupled channel groups by union-find over channels. Channels tied together
//!   by residual adds (and offset by option-A zero padding), with every producer (conv
//!   filters, BN) and consumer (next conv, linear) are removed together.
//! - [`arch`]: the prunable backbones ([`Arch`]: CIFAR ResNets with option A or B, VGG-small,
//!   ResNet-18/34, bottleneck ResNet-50/101/152 and `resnet18-cifar`; see [`PRUNABLE_MODELS`]),
//!   their channel graphs and how to rebuild them smaller through any
//!   [`LayerFactory`](nn_core::LayerFactory).
//! - [`prune`]: masks and physical pruning ([`prune_model`]); the pruned model computes what
//!   the masked model computes; save/load with the architecture beside the weights.
//! - [`criteria`]: the L1-norm and random baselines and rate-based selection.
//!
//! - [`manidp`]: ManiDP gates through a layer factory, its losses, threshold schedule and
//!   per-instance MAC accounting.
//!
//! - [`scop`]: SCOP selection layers through a layer factory, the knockoff generator, the
//!   selection phase with the network frozen and the importance scores.
//!
//! SCOP (knockoff features as a scientific control, NeurIPS 2020) and ManiDP
//! (manifold-regularized dynamic pruning, CVPR 2021) build on this core (issue 6).
//!
//! ```no_run
//! use pruning::{arch::Arch, criteria, prune};
//! use nn_core::{models::ModelConfig, StandardFactory, VarStore};
//! # fn main() -> anyhow::Result<()> {
//! let cfg = ModelConfig::new(3, 10, 32);
//! let arch = Arch::from_name("resnet56")?;
//! let vs = VarStore::new(0, &nn_core::candle_core::Device::Cpu);
//! let _dense = arch.build(&cfg, &vs.root(), &StandardFactory)?;
//! // ... train or load weights into `vs` ...
//! let graph = arch.graph(&cfg);
//! let scores = criteria::l1_scores(&graph, &vs)?;
//! let sel = criteria::select_lowest(&graph, &scores, 0.5, |g| criteria::is_block_inner(&graph, g));
//! let pruned = prune::prune_model(&arch, &cfg, &vs, &sel, &StandardFactory)?;
//! pruned.save("runs/resnet56-pruned")?;
//! # Ok(()) }
//! ```
//!
//! ## Why each dependency is here
//! - `nn-core`: the backbones (rebuilt smaller through their configurations), VarStore,
//!   counting (`summary::profile`).
//! - `candle-core`, `candle-nn`: tensors (`index_select` does the physical pruning).
//! - `anyhow`: errors with context (which parameter, which group).
//! - `rand`, `rand_chacha`: the seeded random-pruning baseline.
//! - `serde`, `serde_json`: the architecture file saved beside a pruned model's weights.

pub mod arch;
pub mod criteria;
pub mod graph;
pub mod manidp;
pub mod prune;
pub mod scop;

pub use arch::{Arch, PRUNABLE_MODELS};
pub use graph::{ChannelGraph, ChannelGroup, GraphBuilder};
pub use prune::{apply_mask, count, kept_channels, prune_model, prune_tensors, Pruned, Selection};
