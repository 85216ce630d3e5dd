//! The training loop: [`TrainConfig`] + [`Trainer`] (a burn/fastai-style learner).
//!
//! One training step, at global iteration `s` of `T = epochs * batches_per_epoch`:
//! 1. `lr = schedule.lr_at(base_lr, s, T, batches_per_epoch)` is set on the optimizer;
//! 2. logits = `model.forward_t(x, train = true)`, loss = [`cross_entropy`] with label smoothing,
//!    plus every [`Callback::extra_loss`];
//! 3. a NaN/Inf loss stops the run with [`TrainError::NonFiniteLoss`] *before* any update, so
//!    neither the weights nor the checkpoint on disk are touched;
//! 4. backward, [`Callback::after_backward`] (gradient surgery), optional global L2 gradient
//!    clipping ([`clip_grad_norm`], PyTorch `clip_grad_norm_` semantics), optimizer step;
//! 5. [`Callback::on_step_end`], and a checkpoint every `checkpoint_every` steps.
//!
//! At each epoch end: evaluation (every `eval_every` epochs and after the last one; eval mode,
//! plain cross-entropy, top-1/top-5), one line in `metrics.jsonl`, `curves.svg`, callbacks'
//! [`Callback::on_epoch_end`], and a checkpoint. At the end: `summary.json` ([`TrainSummary`]).
//!
//! Resume (`config.resume = true`) loads `out_dir/checkpoint.safetensors` and continues at the
//! saved epoch and batch; with data order a function of `(seed, epoch)` the result is identical
//! to an uninterrupted run. Starting a run in a directory that already holds a checkpoint is
//! refused unless `resume` (same config required) or `overwrite` is set.

use super::checkpoint::{Checkpoint, TrainerState};
use super::loss::cross_entropy;
use super::metrics::topk_correct_many;
use super::optim::{Optimizer, OptimizerConfig};
use super::schedule::Schedule;
use super::source::BatchSource;
use super::util;
use crate::model::Model;
use crate::var_store::{NamedVar, VarStore};
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// File name of the latest checkpoint inside `out_dir`.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// File name of the per-epoch metrics (JSON lines) inside `out_dir`.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// File name of the training curves inside `out_dir`.
pub const CURVES_FILE: &str = "curves.svg";
/// File name of the final summary inside `out_dir`.
pub const SUMMARY_FILE: &str = "summary.json";
/// File name of the run configuration inside `out_dir`.
pub const CONFIG_FILE: &str = "config.json";

fn default_eval_every() -> usize {
    1
}

fn default_thresholds() -> Vec<f64> {
    vec![50.0, 80.0, 90.0, 95.0, 99.0]
}

/// Everything that defines a training run (serialisable; stored in checkpoints and `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Model name (as given to `create_model`; informational).
    pub model: String,
    /// Dataset name (informational).
    pub dataset: String,
    /// Number of epochs.
    pub epochs: usize,
    /// Batch size of the training source (informational; the source defines the batches).
    pub batch_size: usize,
    /// Optimizer and base learning rate.
    pub optimizer: OptimizerConfig,
    /// Learning-rate schedule, evaluated per iteration.
    #[serde(default)]
    pub schedule: Schedule,
    /// Label smoothing of the training cross-entropy, in [0, 1).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Clip the global L2 norm of all gradients to this value.
    #[serde(default)]
    pub grad_clip_norm: Option<f64>,
    /// The run's seed (informational here: the model and data are seeded by the caller).
    pub seed: u64,
    /// Evaluate every this many epochs (and always after the last); 0: only after the last.
    #[serde(default = "default_eval_every")]
    pub eval_every: usize,
    /// Also checkpoint every this many optimizer steps (0: only at epoch ends).
    #[serde(default)]
    pub checkpoint_every: usize,
    /// Output directory (`runs/<name>/`).
    pub out_dir: PathBuf,
    /// The command line that started the run (recorded in the summary).
    #[serde(default)]
    pub command: String,
    /// No progress bar (one line per epoch is still printed to stderr).
    #[serde(default)]
    pub quiet: bool,
    /// Continue from `out_dir/checkpoint.safetensors` if it exists.
    #[serde(default)]
    pub resume: bool,
    /// Start over even if `out_dir` holds a checkpoint (it is replaced).
    #[serde(default)]
    pub overwrite: bool,
    /// Stop (after writing a checkpoint) once this many global steps are done; for tests and
    /// time-sliced jobs. The returned summary has `completed == false`.
    #[serde(default)]
    pub stop_after_steps: Option<usize>,
    /// Test top-1 thresholds (percent) for [`TrainSummary::time_to_accuracy`].
    #[serde(default = "default_thresholds")]
    pub accuracy_thresholds: Vec<f64>,
}

/// Fields that do not change what a run computes, ignored when deciding whether a checkpoint
/// belongs to the same run.
const NON_IDENTITY_FIELDS: &[&str] = &[
    "out_dir",
    "command",
    "quiet",
    "resume",
    "overwrite",
    "stop_after_steps",
    "eval_every",
    "checkpoint_every",
    "accuracy_thresholds",
];

impl TrainConfig {
    /// A config with SGD(lr 0.1, momentum 0.9, wd 5e-4), constant schedule, batch 128,
    /// evaluation every epoch, no extra checkpoints.
    pub fn new(model: &str, dataset: &str, epochs: usize, out_dir: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            dataset: dataset.into(),
            epochs,
            batch_size: 128,
            optimizer: OptimizerConfig::sgd(0.1, 5e-4),
            schedule: Schedule::Constant,
            label_smoothing: 0.0,
            grad_clip_norm: None,
            seed: 0,
            eval_every: 1,
            checkpoint_every: 0,
            out_dir: out_dir.into(),
            command: String::new(),
            quiet: false,
            resume: false,
            overwrite: false,
            stop_after_steps: None,
            accuracy_thresholds: default_thresholds(),
        }
    }

    /// The config saved in `out_dir/config.json` by an earlier run, with `resume` set, so a
    /// caller can continue a run knowing only its directory.
    pub fn for_resume(out_dir: impl AsRef<Path>) -> Result<Self> {
        let p = out_dir.as_ref().join(CONFIG_FILE);
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let mut c: TrainConfig = serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        c.out_dir = out_dir.as_ref().to_path_buf();
        c.resume = true;
        c.overwrite = false;
        c.stop_after_steps = None;
        Ok(c)
    }

    /// The fields that define what the run computes (everything but output/bookkeeping options).
    pub fn identity(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        if let Some(m) = v.as_object_mut() {
            for k in NON_IDENTITY_FIELDS {
                m.remove(*k);
            }
        }
        v
    }

    /// Names of identity fields that differ between this config and a stored one (JSON).
    pub fn differences(&self, stored: &serde_json::Value) -> Vec<String> {
        let mine = self.identity();
        let empty = serde_json::Map::new();
        let a = mine.as_object().unwrap_or(&empty);
        let b = stored.as_object().unwrap_or(&empty);
        let mut keys: Vec<&String> = a
            .keys()
            .chain(b.keys().filter(|k| !NON_IDENTITY_FIELDS.contains(&k.as_str())))
            .collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| {
                format!(
                    "{k}: checkpoint {} vs now {}",
                    b.get(k).map(|v| v.to_string()).unwrap_or_else(|| "absent".into()),
                    a.get(k).map(|v| v.to_string()).unwrap_or_else(|| "absent".into())
                )
            })
            .collect()
    }
}

/// Metrics of one completed epoch (one line of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Learning rate of the epoch's last update.
    pub lr: f64,
    /// Mean training loss over the epoch (smoothed cross-entropy plus extra terms).
    pub train_loss: f64,
    /// Training top-1 accuracy (percent, train-mode logits).
    pub train_top1: f64,
    /// Test loss (plain cross-entropy), when evaluated this epoch.
    pub test_loss: Option<f64>,
    /// Test top-1 accuracy (percent), when evaluated this epoch.
    pub test_top1: Option<f64>,
    /// Test top-5 accuracy (percent), when evaluated this epoch.
    pub test_top5: Option<f64>,
    /// Training throughput of the epoch (images per second of training steps).
    pub images_per_s: f64,
    /// Wall seconds since the start of the run (all sessions) at the end of this epoch.
    pub wall_s: f64,
}

/// When test top-1 first reached `top1` percent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeToAccuracy {
    /// The threshold (percent).
    pub top1: f64,
    /// Run wall seconds at the evaluation that first reached it (`None`: never reached).
    pub wall_s: Option<f64>,
    /// 1-based epoch of that evaluation.
    pub epoch: Option<usize>,
}

/// The outcome of a run (`summary.json`); shared by every crate that reports results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Model name.
    pub model: String,
    /// Dataset name.
    pub dataset: String,
    /// Epochs requested.
    pub epochs: usize,
    /// Epochs completed.
    pub epochs_completed: usize,
    /// Whether all epochs ran (false after `stop_after_steps`).
    pub completed: bool,
    /// The run's seed.
    pub seed: u64,
    /// Batch size.
    pub batch_size: usize,
    /// Optimizer name (`sgd`, `adamw`).
    pub optimizer: String,
    /// Full optimizer configuration.
    pub optimizer_config: OptimizerConfig,
    /// Base learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Label smoothing of the training loss.
    pub label_smoothing: f64,
    /// Last evaluated test top-1 (percent).
    pub test_top1: Option<f64>,
    /// Last evaluated test top-5 (percent).
    pub test_top5: Option<f64>,
    /// Last evaluated test loss.
    pub test_loss: Option<f64>,
    /// Best test top-1 of any evaluation (percent).
    pub best_test_top1: Option<f64>,
    /// Last epoch's training loss.
    pub train_loss: Option<f64>,
    /// Last epoch's training top-1 (percent).
    pub train_top1: Option<f64>,
    /// Parameters of the model (buffers excluded).
    pub params: usize,
    /// Multiply-accumulates per image (from [`crate::summary::profile`]).
    pub macs: u64,
    /// Training images per second over the run (training steps only).
    pub train_images_per_s: f64,
    /// Evaluation images per second over the run.
    pub eval_images_per_s: f64,
    /// Wall seconds of the run (all sessions).
    pub wall_s: f64,
    /// When test top-1 first reached each threshold.
    pub time_to_accuracy: Vec<TimeToAccuracy>,
    /// The command line.
    pub command: String,
    /// RFC 3339 UTC timestamps of the run's start and of this summary.
    pub started: String,
    /// Time of this summary.
    pub finished: String,
}

/// Errors of the training loop that callers may want to match on (via `downcast_ref`).
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The loss became NaN or infinite; no update was made and no checkpoint written.
    #[error("non-finite loss {loss} at epoch {epoch} step {step} (global step {global_step}); last finite loss: {last_finite:?}")]
    NonFiniteLoss {
        /// 1-based epoch.
        epoch: usize,
        /// 1-based step within the epoch.
        step: usize,
        /// 0-based global step.
        global_step: usize,
        /// The non-finite loss value.
        loss: f64,
        /// The last finite loss before it.
        last_finite: Option<f64>,
    },
    /// The gradient norm became NaN or infinite (only checked with clipping on).
    #[error("non-finite gradient norm at epoch {epoch} step {step}; no update made")]
    NonFiniteGradient {
        /// 1-based epoch.
        epoch: usize,
        /// 1-based step within the epoch.
        step: usize,
    },
}

/// What callbacks see of the run.
pub struct FitContext<'a> {
    /// The model being trained.
    pub model: &'a dyn Model,
    /// Its variables.
    pub vs: &'a VarStore,
    /// The run configuration.
    pub config: &'a TrainConfig,
    /// Batches per epoch.
    pub steps_per_epoch: usize,
    /// Total optimizer steps of the run.
    pub total_steps: usize,
    /// The trainer state (epoch, step, history so far).
    pub state: &'a TrainerState,
}

/// What callbacks see of one training step.
pub struct StepContext<'a> {
    /// 0-based epoch.
    pub epoch: usize,
    /// 0-based batch index within the epoch.
    pub step_in_epoch: usize,
    /// 0-based global step (the update being made).
    pub global_step: usize,
    /// Batches per epoch.
    pub steps_per_epoch: usize,
    /// Total optimizer steps of the run.
    pub total_steps: usize,
    /// Learning rate of this update.
    pub lr: f64,
    /// The batch's images `[B, C, H, W]`.
    pub images: &'a Tensor,
    /// The batch's labels `[B]`.
    pub labels: &'a Tensor,
    /// Train-mode logits of the batch (part of the autograd graph).
    pub logits: &'a Tensor,
    /// The model being trained.
    pub model: &'a dyn Model,
    /// Its variables.
    pub vs: &'a VarStore,
}

/// Hooks into the training loop; every method has a no-op default.
///
/// Method crates use it for distillation (`extra_loss` with a teacher's logits), pruning
/// (`after_backward` masks, `on_epoch_end` gate schedules), regularisers, logging. A callback
/// with state that matters for exact resume returns it from [`Callback::state`]; it is stored in
/// the checkpoint under [`Callback::name`] and given back by [`Callback::load_state`].
pub trait Callback {
    /// A unique name (key of the callback's state in checkpoints).
    fn name(&self) -> String;
    /// Once per `fit`, after a resume has restored state, before the first step.
    fn on_fit_begin(&mut self, _ctx: &FitContext) -> Result<()> {
        Ok(())
    }
    /// Before the first step of an epoch (also when resuming in the middle of it).
    fn on_epoch_begin(&mut self, _epoch: usize, _ctx: &FitContext) -> Result<()> {
        Ok(())
    }
    /// An extra scalar loss term added to the cross-entropy (must be part of the graph to get
    /// gradients; `None` for nothing this step).
    fn extra_loss(&mut self, _step: &StepContext) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// After backward, before clipping and the optimizer step; may rewrite gradients.
    fn after_backward(&mut self, _step: &StepContext, _grads: &mut GradStore) -> Result<()> {
        Ok(())
    }
    /// After the optimizer step; `loss` is the step's total loss.
    fn on_step_end(&mut self, _step: &StepContext, _loss: f64) -> Result<()> {
        Ok(())
    }
    /// After an epoch's evaluation and metrics, before its checkpoint.
    fn on_epoch_end(&mut self, _metrics: &EpochMetrics, _ctx: &FitContext) -> Result<()> {
        Ok(())
    }
    /// State to store in checkpoints.
    fn state(&self) -> Result<Option<serde_json::Value>> {
        Ok(None)
    }
    /// Restores state from a checkpoint.
    fn load_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}

/// A mutable reference is a callback too, so the caller keeps the callback and can read it
/// after `fit`.
impl<C: Callback + ?Sized> Callback for &mut C {
    fn name(&self) -> String {
        (**self).name()
    }
    fn on_fit_begin(&mut self, ctx: &FitContext) -> Result<()> {
        (**self).on_fit_begin(ctx)
    }
    fn on_epoch_begin(&mut self, epoch: usize, ctx: &FitContext) -> Result<()> {
        (**self).on_epoch_begin(epoch, ctx)
    }
    fn extra_loss(&mut self, step: &StepContext) -> Result<Option<Tensor>> {
        (**self).extra_loss(step)
    }
    fn after_backward(&mut self, step: &StepContext, grads: &mut GradStore) -> Result<()> {
        (**self).after_backward(step, grads)
    }
    fn on_step_end(&mut self, step: &StepContext, loss: f64) -> Result<()> {
        (**self).on_step_end(step, loss)
    }
    fn on_epoch_end(&mut self, metrics: &EpochMetrics, ctx: &FitContext) -> Result<()> {
        (**self).on_epoch_end(metrics, ctx)
    }
    fn state(&self) -> Result<Option<serde_json::Value>> {
        (**self).state()
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        (**self).load_state(state)
    }
}

/// Result of [`evaluate`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Mean cross-entropy (no smoothing).
    pub loss: f64,
    /// Top-1 accuracy, percent.
    pub top1: f64,
    /// Top-5 accuracy, percent.
    pub top5: f64,
    /// Number of examples evaluated.
    pub examples: usize,
    /// Wall seconds of the evaluation.
    pub seconds: f64,
}

/// Evaluates `model` in eval mode on every batch of `source` (epoch 0 order).
pub fn evaluate(model: &dyn Model, source: &dyn BatchSource) -> Result<EvalMetrics> {
    let t = Instant::now();
    let (mut loss, mut c1, mut c5, mut n) = (0.0f64, 0usize, 0usize, 0usize);
    for (i, b) in source.batches(0, 0).enumerate() {
        let (x, y) = b.with_context(|| format!("loading evaluation batch {i}"))?;
        let logits = model.forward_t(&x, false)?.detach();
        let bs = y.dims().first().copied().unwrap_or(0);
        loss += cross_entropy(&logits, &y, 0.0)?.to_dtype(DType::F64)?.to_scalar::<f64>()? * bs as f64;
        let c = topk_correct_many(&logits, &y, &[1, 5])?;
        c1 += c[0];
        c5 += c[1];
        n += bs;
    }
    let d = n.max(1) as f64;
    Ok(EvalMetrics {
        loss: loss / d,
        top1: 100.0 * c1 as f64 / d,
        top5: 100.0 * c5 as f64 / d,
        examples: n,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// Scales all gradients of `params` in `grads` so that their global L2 norm is at most
/// `max_norm` (PyTorch `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when below 1).
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[NamedVar], max_norm: f64) -> Result<f64> {
    let mut sq = 0.0f64;
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if norm.is_finite() && coef < 1.0 {
        for p in params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                let scaled = g.detach().affine(coef, 0.0)?;
                grads.insert(p.var.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// Trains a model: see the [module docs](self).
pub struct Trainer<'a> {
    config: TrainConfig,
    model: &'a dyn Model,
    vs: VarStore,
    optimizer: Box<dyn Optimizer>,
    callbacks: Vec<Box<dyn Callback + 'a>>,
    state: TrainerState,
}

impl<'a> Trainer<'a> {
    /// A trainer for `model`, whose variables live in `vs`, with the optimizer of
    /// `config.optimizer` over `vs.trainable()` (freeze parameters before this call).
    pub fn new(config: TrainConfig, model: &'a dyn Model, vs: &VarStore) -> Result<Self> {
        let optimizer = config.optimizer.build(vs.trainable())?;
        Ok(Self {
            config,
            model,
            vs: vs.clone(),
            optimizer,
            callbacks: Vec::new(),
            state: TrainerState::default(),
        })
    }

    /// Replaces the optimizer (e.g. one over a subset of parameters). `config.optimizer` still
    /// provides the base learning rate for the schedule.
    pub fn with_optimizer(mut self, optimizer: Box<dyn Optimizer>) -> Self {
        self.optimizer = optimizer;
        self
    }

    /// Adds a callback (called in the order added).
    pub fn with_callback(mut self, callback: impl Callback + 'a) -> Self {
        self.callbacks.push(Box::new(callback));
        self
    }

    /// Adds a boxed callback.
    pub fn add_callback(&mut self, callback: Box<dyn Callback + 'a>) {
        self.callbacks.push(callback);
    }

    /// The run configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The trainer state (after `fit`: where it stopped).
    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_ref()
    }

    /// Path of the checkpoint in the output directory.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.config.out_dir.join(CHECKPOINT_FILE)
    }

    /// Prepares `out_dir`: resumes from its checkpoint, or refuses to clobber another run.
    fn prepare(&mut self) -> Result<()> {
        let dir = &self.config.out_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("creating output directory {}", dir.display()))?;
        let ck_path = dir.join(CHECKPOINT_FILE);
        self.state = TrainerState {
            started: util::now_rfc3339(),
            time_to_accuracy: self
                .config
                .accuracy_thresholds
                .iter()
                .map(|&t| TimeToAccuracy {
                    top1: t,
                    wall_s: None,
                    epoch: None,
                })
                .collect(),
            ..Default::default()
        };
        if ck_path.exists() {
            if self.config.resume {
                let ck = Checkpoint::load(&ck_path)?;
                let diff = self.config.differences(&ck.config);
                if !diff.is_empty() {
                    bail!(
                        "cannot resume from {}: it belongs to a different run configuration ({}); use another out_dir or overwrite",
                        ck_path.display(),
                        diff.join("; ")
                    );
                }
                ck.restore(&self.vs, self.optimizer.as_mut())
                    .with_context(|| format!("resuming from {}", ck_path.display()))?;
                for cb in self.callbacks.iter_mut() {
                    if let Some(s) = ck.state.callbacks.get(&cb.name()) {
                        cb.load_state(s).with_context(|| format!("restoring callback `{}`", cb.name()))?;
                    }
                }
                self.state = ck.state;
            } else if self.config.overwrite {
                for f in [CHECKPOINT_FILE, METRICS_FILE, CURVES_FILE, SUMMARY_FILE] {
                    let p = dir.join(f);
                    if p.exists() {
                        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                    }
                }
            } else {
                let what = match Checkpoint::load(&ck_path) {
                    Ok(ck) => {
                        let diff = self.config.differences(&ck.config);
                        if diff.is_empty() {
                            "a checkpoint of this same configuration".to_string()
                        } else {
                            format!("a checkpoint of a different run ({})", diff.join("; "))
                        }
                    }
                    Err(e) => format!("an unreadable checkpoint ({e:#})"),
                };
                bail!(
                    "{} already holds {what}; set resume to continue it or overwrite to replace it",
                    dir.display()
                );
            }
        }
        let cfg_json = serde_json::to_vec_pretty(&self.config)?;
        util::write_atomic(&dir.join(CONFIG_FILE), &cfg_json)
    }

    fn save_checkpoint(&mut self, wall_s: f64) -> Result<()> {
        self.state.wall_s = wall_s;
        for cb in &self.callbacks {
            if let Some(s) = cb.state()? {
                self.state.callbacks.insert(cb.name(), s);
            }
        }
        let ck = Checkpoint::capture(&self.vs, self.optimizer.as_ref(), &self.state, serde_json::to_value(&self.config)?)?;
        ck.save(&self.checkpoint_path())
    }

    fn write_epoch_outputs(&self) -> Result<()> {
        let mut lines = String::new();
        for m in &self.state.history {
            lines.push_str(&serde_json::to_string(m)?);
            lines.push('\n');
        }
        util::write_atomic(&self.config.out_dir.join(METRICS_FILE), lines.as_bytes())?;
        let svg = curves_svg(&self.state.history)?;
        util::write_atomic(&self.config.out_dir.join(CURVES_FILE), svg.as_bytes())
    }

    fn summary(&self, params: usize, macs: u64, completed: bool) -> TrainSummary {
        let c = &self.config;
        let last = self.state.history.last();
        let last_eval = self.state.history.iter().rev().find(|m| m.test_top1.is_some());
        TrainSummary {
            model: c.model.clone(),
            dataset: c.dataset.clone(),
            epochs: c.epochs,
            epochs_completed: self.state.history.len(),
            completed,
            seed: c.seed,
            batch_size: c.batch_size,
            optimizer: c.optimizer.name().into(),
            optimizer_config: c.optimizer.clone(),
            lr: c.optimizer.lr(),
            schedule: c.schedule.clone(),
            label_smoothing: c.label_smoothing,
            test_top1: last_eval.and_then(|m| m.test_top1),
            test_top5: last_eval.and_then(|m| m.test_top5),
            test_loss: last_eval.and_then(|m| m.test_loss),
            best_test_top1: self.state.best_test_top1,
            train_loss: last.map(|m| m.train_loss),
            train_top1: last.map(|m| m.train_top1),
            params,
            macs,
            train_images_per_s: rate(self.state.examples_seen as f64, self.state.train_s),
            eval_images_per_s: rate(self.state.eval_images as f64, self.state.eval_s),
            wall_s: self.state.wall_s,
            time_to_accuracy: self.state.time_to_accuracy.clone(),
            command: c.command.clone(),
            started: self.state.started.clone(),
            finished: util::now_rfc3339(),
        }
    }

    /// Trains on `train` for the configured epochs (continuing from the checkpoint with
    /// `resume`), evaluating on `test` if given. Writes the outputs listed in the module docs
    /// and returns the summary (also written to `summary.json`).
    pub fn fit(&mut self, train: &dyn BatchSource, test: Option<&dyn BatchSource>) -> Result<TrainSummary> {
        let cfg = self.config.clone();
        let spe = train.num_batches();
        if spe == 0 {
            bail!("the training source has no batches");
        }
        if cfg.epochs == 0 {
            bail!("epochs must be > 0");
        }
        let total = spe * cfg.epochs;
        self.prepare()?;
        let session = Instant::now();
        let wall0 = self.state.wall_s;
        let wall = move || wall0 + session.elapsed().as_secs_f64();

        // per-image counts from a forward pass on one image (eval mode: no state changes)
        let params = self.vs.num_params();
        let macs = match train.batches(0, 0).next() {
            Some(b) => {
                let (x, _) = b.context("loading the first training batch")?;
                let x1 = x.narrow(0, 0, 1)?;
                let (_, s) = crate::summary::profile(|| self.model.forward_t(&x1, false))?;
                s.total_macs()
            }
            None => 0,
        };

        let model = self.model;
        let vs = self.vs.clone();
        {
            let ctx = FitContext {
                model,
                vs: &vs,
                config: &cfg,
                steps_per_epoch: spe,
                total_steps: total,
                state: &self.state,
            };
            for cb in self.callbacks.iter_mut() {
                cb.on_fit_begin(&ctx)?;
            }
        }
        let show_bar = !cfg.quiet && std::io::stderr().is_terminal();
        let base_lr = cfg.optimizer.lr();
        let mut last_finite: Option<f64> = None;
        let mut lr = self.optimizer.lr();

        while self.state.epoch < cfg.epochs {
            let epoch = self.state.epoch;
            let start = self.state.step_in_epoch;
            {
                let ctx = FitContext {
                    model,
                    vs: &vs,
                    config: &cfg,
                    steps_per_epoch: spe,
                    total_steps: total,
                    state: &self.state,
                };
                for cb in self.callbacks.iter_mut() {
                    cb.on_epoch_begin(epoch, &ctx)?;
                }
            }
            let bar = if show_bar {
                let b = ProgressBar::with_draw_target(Some(spe as u64), ProgressDrawTarget::stderr());
                b.set_style(
                    ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                b.set_prefix(format!("epoch {}/{}", epoch + 1, cfg.epochs));
                b.set_position(start as u64);
                b
            } else {
                ProgressBar::hidden()
            };

            for (i, item) in train.batches(epoch, start).enumerate() {
                let step_in_epoch = start + i;
                let (x, y) = item.with_context(|| format!("loading training batch {} of epoch {}", step_in_epoch + 1, epoch + 1))?;
                let t0 = Instant::now();
                let gs = self.state.global_step;
                lr = cfg.schedule.lr_at(base_lr, gs, total, spe);
                self.optimizer.set_lr(lr);
                let logits = model.forward_t(&x, true)?;
                let mut loss = cross_entropy(&logits, &y, cfg.label_smoothing)?;
                let ctx = StepContext {
                    epoch,
                    step_in_epoch,
                    global_step: gs,
                    steps_per_epoch: spe,
                    total_steps: total,
                    lr,
                    images: &x,
                    labels: &y,
                    logits: &logits,
                    model,
                    vs: &vs,
                };
                for cb in self.callbacks.iter_mut() {
                    if let Some(extra) = cb.extra_loss(&ctx)? {
                        if extra.elem_count() != 1 {
                            bail!(
                                "callback `{}` returned an extra loss of shape {:?}, expected a scalar",
                                cb.name(),
                                extra.dims()
                            );
                        }
                        loss = (loss + extra.reshape(())?.to_dtype(logits.dtype())?)?;
                    }
                }
                let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !lv.is_finite() {
                    bar.abandon();
                    return Err(TrainError::NonFiniteLoss {
                        epoch: epoch + 1,
                        step: step_in_epoch + 1,
                        global_step: gs,
                        loss: lv,
                        last_finite,
                    }
                    .into());
                }
                last_finite = Some(lv);
                let mut grads = loss.backward()?;
                for cb in self.callbacks.iter_mut() {
                    cb.after_backward(&ctx, &mut grads)?;
                }
                if let Some(max) = cfg.grad_clip_norm {
                    let n = clip_grad_norm(&mut grads, self.optimizer.params(), max)?;
                    if !n.is_finite() {
                        bar.abandon();
                        return Err(TrainError::NonFiniteGradient {
                            epoch: epoch + 1,
                            step: step_in_epoch + 1,
                        }
                        .into());
                    }
                }
                self.optimizer.step(&grads)?;
                drop(grads);
                let bs = y.dims().first().copied().unwrap_or(0);
                let correct = topk_correct_many(&logits.detach(), &y, &[1])?[0];
                let dt = t0.elapsed().as_secs_f64();
                {
                    let s = &mut self.state;
                    s.global_step += 1;
                    s.step_in_epoch = step_in_epoch + 1;
                    s.examples_seen += bs as u64;
                    s.epoch_loss.update(lv, bs as f64);
                    s.epoch_correct += correct as u64;
                    s.epoch_train_s += dt;
                    s.train_s += dt;
                }
                for cb in self.callbacks.iter_mut() {
                    cb.on_step_end(&ctx, lv)?;
                }
                if show_bar {
                    let s = &self.state;
                    bar.set_position(s.step_in_epoch as u64);
                    bar.set_message(format!(
                        "loss {:.4} acc {:.2}% {:.0} img/s lr {:.3e}",
                        s.epoch_loss.avg(),
                        100.0 * s.epoch_correct as f64 / s.epoch_loss.count.max(1.0),
                        rate(s.epoch_loss.count, s.epoch_train_s),
                        lr
                    ));
                }
                let end_of_epoch = self.state.step_in_epoch == spe;
                let stop = cfg.stop_after_steps.is_some_and(|n| self.state.global_step >= n);
                if !end_of_epoch && (stop || (cfg.checkpoint_every > 0 && self.state.global_step % cfg.checkpoint_every == 0)) {
                    self.save_checkpoint(wall())?;
                }
                if stop && !end_of_epoch {
                    bar.abandon();
                    eprintln!(
                        "stopping after {} steps (epoch {}, step {}/{spe})",
                        self.state.global_step,
                        epoch + 1,
                        self.state.step_in_epoch
                    );
                    return Ok(self.summary(params, macs, false));
                }
            }
            bar.finish_and_clear();
            if self.state.step_in_epoch != spe {
                bail!(
                    "the training source yielded {} batches in epoch {}, but reports {spe}",
                    self.state.step_in_epoch,
                    epoch + 1
                );
            }

            // evaluation
            let last_epoch = epoch + 1 == cfg.epochs;
            let do_eval = last_epoch || (cfg.eval_every > 0 && (epoch + 1) % cfg.eval_every == 0);
            let ev = match (test, do_eval) {
                (Some(t), true) => {
                    let e = evaluate(model, t).with_context(|| format!("evaluating after epoch {}", epoch + 1))?;
                    self.state.eval_s += e.seconds;
                    self.state.eval_images += e.examples as u64;
                    Some(e)
                }
                _ => None,
            };
            let now = wall();
            let s = &mut self.state;
            let m = EpochMetrics {
                epoch: epoch + 1,
                lr,
                train_loss: s.epoch_loss.avg(),
                train_top1: 100.0 * s.epoch_correct as f64 / s.epoch_loss.count.max(1.0),
                test_loss: ev.map(|e| e.loss),
                test_top1: ev.map(|e| e.top1),
                test_top5: ev.map(|e| e.top5),
                images_per_s: rate(s.epoch_loss.count, s.epoch_train_s),
                wall_s: now,
            };
            if let Some(e) = ev {
                s.best_test_top1 = Some(s.best_test_top1.map_or(e.top1, |b| b.max(e.top1)));
                for t in s.time_to_accuracy.iter_mut() {
                    if t.wall_s.is_none() && e.top1 >= t.top1 {
                        t.wall_s = Some(now);
                        t.epoch = Some(epoch + 1);
                    }
                }
            }
            s.history.push(m.clone());
            s.epoch += 1;
            s.step_in_epoch = 0;
            s.epoch_loss.reset();
            s.epoch_correct = 0;
            s.epoch_train_s = 0.0;
            eprintln!(
                "epoch {}/{} lr {:.4e} train loss {:.4} top1 {:.2}%{} {:.0} img/s wall {:.1}s",
                m.epoch,
                cfg.epochs,
                m.lr,
                m.train_loss,
                m.train_top1,
                match (m.test_loss, m.test_top1, m.test_top5) {
                    (Some(l), Some(a), Some(b)) => format!(" | test loss {l:.4} top1 {a:.2}% top5 {b:.2}%"),
                    _ => String::new(),
                },
                m.images_per_s,
                m.wall_s
            );
            {
                let ctx = FitContext {
                    model,
                    vs: &vs,
                    config: &cfg,
                    steps_per_epoch: spe,
                    total_steps: total,
                    state: &self.state,
                };
                for cb in self.callbacks.iter_mut() {
                    cb.on_epoch_end(&m, &ctx)?;
                }
            }
            self.write_epoch_outputs()?;
            self.save_checkpoint(wall())?;
            if cfg.stop_after_steps.is_some_and(|n| self.state.global_step >= n) && self.state.epoch < cfg.epochs {
                eprintln!("stopping after {} steps (end of epoch {})", self.state.global_step, epoch + 1);
                return Ok(self.summary(params, macs, false));
            }
        }
        self.state.wall_s = wall();
        let summary = self.summary(params, macs, true);
        util::write_atomic(&cfg.out_dir.join(SUMMARY_FILE), &serde_json::to_vec_pretty(&summary)?)?;
        Ok(summary)
    }
}

fn rate(n: f64, s: f64) -> f64 {
    if s > 0.0 {
        n / s
    } else {
        0.0
    }
}

/// Renders loss (train/test) and top-1 accuracy (train/test) against epochs as an SVG string.
pub fn curves_svg(history: &[EpochMetrics]) -> Result<String> {
    use plotters::prelude::*;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (960, 380)).into_drawing_area();
        let err = |e: &dyn std::fmt::Debug| anyhow::anyhow!("drawing curves: {e:?}");
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (left, right) = root.split_horizontally(480);
        let n = history.len().max(1) as f64;
        let xr = 0.5..n + 0.5;
        let series = |f: &dyn Fn(&EpochMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
            history
                .iter()
                .filter_map(|m| f(m).filter(|v| v.is_finite()).map(|v| (m.epoch as f64, v)))
                .collect()
        };
        let train_loss = series(&|m| Some(m.train_loss));
        let test_loss = series(&|m| m.test_loss);
        let ymax = train_loss.iter().chain(&test_loss).map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.05;
        let mut c = ChartBuilder::on(&left)
            .caption("loss", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(52)
            .build_cartesian_2d(xr.clone(), 0.0..ymax)
            .map_err(|e| err(&e))?;
        c.configure_mesh().x_desc("epoch").draw().map_err(|e| err(&e))?;
        for (pts, color, name) in [(train_loss, BLUE, "train"), (test_loss, RED, "test")] {
            if !pts.is_empty() {
                c.draw_series(LineSeries::new(pts, color.stroke_width(2)))
                    .map_err(|e| err(&e))?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            }
        }
        c.configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(|e| err(&e))?;

        let mut c = ChartBuilder::on(&right)
            .caption("top-1 accuracy (%)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(52)
            .build_cartesian_2d(xr, 0.0..100.0)
            .map_err(|e| err(&e))?;
        c.configure_mesh().x_desc("epoch").draw().map_err(|e| err(&e))?;
        for (pts, color, name) in [
            (series(&|m| Some(m.train_top1)), BLUE, "train"),
            (series(&|m| m.test_top1), RED, "test"),
        ] {
            if !pts.is_empty() {
                c.draw_series(LineSeries::new(pts, color.stroke_width(2)))
                    .map_err(|e| err(&e))?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            }
        }
        c.configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(out)
}

/// Returns `path` if it holds a checkpoint (helper for callers deciding whether to resume).
pub fn existing_checkpoint(out_dir: &Path) -> Option<PathBuf> {
    let p = out_dir.join(CHECKPOINT_FILE);
    p.exists().then_some(p)
}
