//! # Training engine
//!
//! Everything needed to train a [`crate::Model`] on CPU with reproducible, resumable runs:
//!
//! - [`optim`]: [`optim::Sgd`] (momentum, Nesterov, weight decay) and [`optim::AdamW`] with
//!   PyTorch update semantics, checkpointable state keyed by parameter name, and an option to
//!   exclude biases and normalisation parameters from weight decay.
//! - [`schedule`]: learning-rate schedules as a serialisable value ([`schedule::Schedule`]),
//!   evaluated per iteration.
//! - [`loss`]: cross-entropy with label smoothing and Hinton knowledge-distillation loss, both
//!   differentiable.
//! - [`metrics`]: top-k accuracy counts and a running average meter.
//! - [`checkpoint`]: one atomically written safetensors file holding model variables (BatchNorm
//!   running statistics included), optimizer state and JSON trainer state, with a checksum.
//! - [`trainer`]: the [`trainer::Trainer`] loop (burn/fastai-style learner) with callbacks,
//!   progress bars, `metrics.jsonl`, `curves.svg`, `summary.json` and exact resume.
//!
//! The trainer consumes data through the small [`trainer::BatchSource`] trait, so any loader can
//! be adapted to it; data order must be a function of `(seed, epoch)` for resume to be exact.

#![warn(missing_docs)]

pub mod checkpoint;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod source;
pub mod trainer;
mod util;

pub use checkpoint::{Checkpoint, TrainerState};
pub use loss::{cross_entropy, kd_loss};
pub use metrics::{topk_correct, topk_correct_many, AverageMeter};
pub use optim::{AdamW, Optimizer, OptimizerConfig, Sgd};
pub use schedule::Schedule;
pub use source::{BatchSource, InMemorySource};
pub use trainer::{
    clip_grad_norm, evaluate, Callback, EpochMetrics, EvalMetrics, FitContext, StepContext, TrainConfig, TrainError, TrainSummary, Trainer,
};
