//! # fed-pu
//!
//! Federated learning simulated in one process, on nn-core models, and FedPU (Lin et al.,
//! "Federated Learning with Positive and Unlabeled Data", ICML 2022) on top of it.
//!
//! ## The system
//! - [`data`]: [`FedDataset`], the training split held once (normalised `f32`), shared by all
//!   clients.
//! - [`partition`]: clients as index lists. [`partition::iid`], [`partition::dirichlet`]
//!   (non-IID by label), and [`partition::fedpu_clients`], FedPU's setting where client `k`
//!   labels a fraction of the samples of its positive classes and holds everything else
//!   unlabeled ([`partition::OFFICIAL_CLASSES_PER_CLIENT`] = `[4,4,3,3,2,2,1,1,1,1]`).
//! - [`message`]: the one message type ([`ModelMessage`]) server and clients exchange, with
//!   the weights as safetensors bytes, so the client function could run behind a transport.
//! - [`strategy`]: FedAvg (weighted by example counts) and FedProx.
//! - [`loss`]: the FedPU risk (uPU-style per-class negative risk, optional nnPU correction)
//!   and the positives-only and fully supervised baselines; its docs say where the official
//!   code differs from the risk written in the paper.
//! - [`engine`]: [`Simulation`]: per round, seeded client sampling, rayon-parallel local
//!   training ([`engine::client_update`]) with a deterministic aggregation order, evaluation,
//!   and a checkpoint of the global model and round counter that resumes exactly.
//!
//! ## Using it
//! ```no_run
//! use fed_pu::{engine::{FedConfig, ModelBuilder, Simulation}, loss::{FedPuConfig, Objective}, partition, FedDataset};
//! use nn_core::models::{create_model, ModelConfig};
//! use std::sync::Arc;
//! # fn main() -> anyhow::Result<()> {
//! # let train: FedDataset = unimplemented!();
//! let parts = partition::iid(train.len(), 10, 0)?;
//! let positive = partition::cyclic_positive_classes(10, 10, &partition::OFFICIAL_CLASSES_PER_CLIENT)?;
//! let clients = partition::fedpu_clients(&train.labels, 10, parts, &positive, 0.33, 0)?;
//! let builder: ModelBuilder = Arc::new(|vp| create_model("lenet5", &ModelConfig::new(1, 10, 28), vp, &nn_core::StandardFactory));
//! let cfg = FedConfig { rounds: 10, objective: Objective::FedPu(FedPuConfig::default()), workers: 2, ..FedConfig::default() };
//! let mut sim = Simulation::new(cfg, Arc::new(train), None, clients, builder)?.with_checkpoint("runs/x/checkpoint.safetensors");
//! sim.resume()?;
//! sim.run(|m| println!("round {} loss {:.3}", m.round, m.train_loss))?;
//! # Ok(()) }
//! ```
//!
//! ## Why each dependency is here
//! - `nn-core`: models (`create_model`, `VarStore`), SGD, cross-entropy, top-1, seeded RNG
//!   streams and the differentiable `log_softmax` the losses are written with.
//! - `candle-core`: tensors, autograd, and its safetensors reader that decodes weight messages.
//! - `rayon`: the pool that trains sampled clients in parallel (and the one-thread pool per
//!   client that keeps each client's kernels independent of the worker count).
//! - `rand`, `rand_distr`: seeded shuffles and sampling; `Gamma` draws for Dirichlet shares.
//! - `serde`, `serde_json`: configurations, metrics and the checkpoint's metadata, the JSON
//!   header of the safetensors encoding.
//! - `anyhow`: errors that say which client, file or step failed.

pub mod data;
pub mod engine;
pub mod loss;
pub mod message;
pub mod partition;
pub mod strategy;

pub use data::FedDataset;
pub use engine::{FedConfig, RoundMetrics, SimState, Simulation};
pub use loss::{FedPuConfig, NnPu, Objective};
pub use message::{ModelMessage, Weights};
pub use partition::ClientData;
pub use strategy::Strategy;
