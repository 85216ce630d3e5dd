//! Checkpoints: one safetensors file with everything needed to continue a run exactly.
//!
//! Layout of `checkpoint.safetensors`:
//! - tensors `model/<variable name>`: every variable of the [`VarStore`], trainable parameters,
//!   frozen parameters and buffers (BatchNorm running statistics) alike;
//! - tensors `optim/<param name>.<slot>`: the optimizer state ([`Optimizer::state_tensors`]);
//! - metadata (`__metadata__`, a string map): `format` ([`FORMAT`]), `config` (the run's
//!   [`crate::train::TrainConfig`] as JSON), `state` ([`TrainerState`] as JSON) and `sha256`,
//!   a digest of all tensors (names, dtypes, shapes, bytes) checked on load.
//!
//! Files are written atomically (temporary file, fsync, rename), so a crash while saving
//! leaves the previous checkpoint intact. Loading a truncated or corrupted file fails with an
//! error that names the file.

use super::metrics::AverageMeter;
use super::optim::Optimizer;
use super::trainer::{EpochMetrics, TimeToAccuracy};
use super::util;
use crate::var_store::VarStore;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Value of the `format` metadata entry of checkpoints written by this version.
pub const FORMAT: &str = "compact-vision-checkpoint/1";

/// Where a run stands: everything besides tensors that is needed to continue it exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// The epoch in progress (0-based); equals the number of completed epochs at an epoch end.
    pub epoch: usize,
    /// Batches of `epoch` already trained on: the data position to resume from (the batch
    /// order itself is a function of `(seed, epoch)`, so no RNG state is needed).
    pub step_in_epoch: usize,
    /// Optimizer updates made so far over the whole run.
    pub global_step: usize,
    /// Training examples seen over the whole run.
    pub examples_seen: u64,
    /// Best test top-1 (percent) of any evaluation so far.
    pub best_test_top1: Option<f64>,
    /// One entry per completed epoch.
    pub history: Vec<EpochMetrics>,
    /// Running training loss of the epoch in progress (weighted by batch size).
    pub epoch_loss: AverageMeter,
    /// Top-1 correct training predictions in the epoch in progress.
    pub epoch_correct: u64,
    /// Wall seconds spent in training steps during the epoch in progress.
    pub epoch_train_s: f64,
    /// Wall seconds of the whole run so far (all sessions, evaluation included).
    pub wall_s: f64,
    /// Wall seconds spent in training steps (all sessions).
    pub train_s: f64,
    /// Wall seconds spent in evaluation (all sessions), and the number of images evaluated.
    pub eval_s: f64,
    /// Images evaluated (all sessions).
    pub eval_images: u64,
    /// When test top-1 first reached each threshold.
    pub time_to_accuracy: Vec<TimeToAccuracy>,
    /// When the run started (RFC 3339, UTC).
    pub started: String,
    /// State of callbacks, by callback name.
    #[serde(default)]
    pub callbacks: BTreeMap<String, serde_json::Value>,
}

/// The content of a checkpoint file, in memory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Every variable of the model's store, by name.
    pub model: HashMap<String, Tensor>,
    /// The optimizer state, keyed as by [`Optimizer::state_tensors`].
    pub optimizer: HashMap<String, Tensor>,
    /// The trainer state.
    pub state: TrainerState,
    /// The run configuration as JSON (compared on resume).
    pub config: serde_json::Value,
}

impl Checkpoint {
    /// Captures the current values of `vs`, the state of `optimizer` and `state`.
    pub fn capture(vs: &VarStore, optimizer: &dyn Optimizer, state: &TrainerState, config: serde_json::Value) -> Result<Self> {
        Ok(Self {
            model: vs.tensors(),
            optimizer: optimizer.state_tensors()?,
            state: state.clone(),
            config,
        })
    }

    /// Writes the checkpoint to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = HashMap::with_capacity(self.model.len() + self.optimizer.len());
        for (k, t) in &self.model {
            tensors.insert(format!("model/{k}"), t.clone());
        }
        for (k, t) in &self.optimizer {
            tensors.insert(format!("optim/{k}"), t.clone());
        }
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("config".to_string(), serde_json::to_string(&self.config)?);
        meta.insert("state".to_string(), serde_json::to_string(&self.state)?);
        let bytes = util::safetensors_bytes(&tensors, &meta).with_context(|| format!("serialising checkpoint {}", path.display()))?;
        util::write_atomic(path, &bytes)
    }

    /// Reads a checkpoint written by [`Checkpoint::save`]. A missing, truncated or corrupted
    /// file, or one that is not a checkpoint of this format, gives an error naming the file.
    pub fn load(path: &Path) -> Result<Self> {
        let (tensors, meta) = util::read_safetensors(path)?;
        match meta.get("format") {
            Some(f) if f == FORMAT => {}
            Some(f) => bail!("{} has checkpoint format `{f}`, this version reads `{FORMAT}`", path.display()),
            None => bail!(
                "{} is a safetensors file but not a training checkpoint (no `format` metadata)",
                path.display()
            ),
        }
        let field = |k: &str| {
            meta.get(k)
                .with_context(|| format!("{}: checkpoint metadata lacks `{k}`", path.display()))
        };
        let state: TrainerState =
            serde_json::from_str(field("state")?).with_context(|| format!("{}: unreadable trainer state", path.display()))?;
        let config: serde_json::Value =
            serde_json::from_str(field("config")?).with_context(|| format!("{}: unreadable run config", path.display()))?;
        let mut model = HashMap::new();
        let mut optimizer = HashMap::new();
        for (k, t) in tensors {
            if let Some(n) = k.strip_prefix("model/") {
                model.insert(n.to_string(), t);
            } else if let Some(n) = k.strip_prefix("optim/") {
                optimizer.insert(n.to_string(), t);
            } else {
                bail!("{}: unexpected tensor `{k}` in a checkpoint", path.display());
            }
        }
        Ok(Self {
            model,
            optimizer,
            state,
            config,
        })
    }

    /// Loads the model variables into `vs` (strict: same names and shapes) and the optimizer
    /// state into `optimizer`.
    pub fn restore(&self, vs: &VarStore, optimizer: &mut dyn Optimizer) -> Result<()> {
        vs.load_tensors(&self.model, true).context("restoring model variables")?;
        optimizer.load_state_tensors(&self.optimizer).context("restoring optimizer state")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::Init;
    use crate::train::optim::OptimizerConfig;
    use crate::var_store::ParamKind;
    use candle_core::Device;

    #[test]
    fn save_load_restore_and_errors_name_the_file() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("nncore-ckpt-{}", std::process::id()));
        let path = dir.join("checkpoint.safetensors");
        let vs = VarStore::new(3, &Device::Cpu);
        let w = vs
            .root()
            .param("w", &[3], Init::Normal { mean: 0.0, std: 1.0 }, ParamKind::Weight)?;
        let rm = vs.root().buffer("running_mean", &[3], Init::ONES)?;
        let mut opt = OptimizerConfig::sgd(0.1, 0.0).build(vs.trainable())?;
        let g = w.as_tensor().sqr()?.sum_all()?.backward()?;
        opt.step(&g)?;
        rm.set(&Tensor::new(&[0.5f32, 0.25, 0.125], &Device::Cpu)?)?;
        let state = TrainerState {
            epoch: 1,
            step_in_epoch: 2,
            global_step: 7,
            ..Default::default()
        };
        let ck = Checkpoint::capture(&vs, opt.as_ref(), &state, serde_json::json!({"model": "x"}))?;
        ck.save(&path)?;
        let saved_w = w.as_tensor().to_vec1::<f32>()?;

        let vs2 = VarStore::new(9, &Device::Cpu);
        let w2 = vs2.root().param("w", &[3], Init::ZEROS, ParamKind::Weight)?;
        let rm2 = vs2.root().buffer("running_mean", &[3], Init::ZEROS)?;
        let mut opt2 = OptimizerConfig::sgd(0.1, 0.0).build(vs2.trainable())?;
        let back = Checkpoint::load(&path)?;
        assert_eq!(back.state, state);
        assert_eq!(back.config["model"], "x");
        back.restore(&vs2, opt2.as_mut())?;
        assert_eq!(w2.as_tensor().to_vec1::<f32>()?, saved_w);
        assert_eq!(rm2.as_tensor().to_vec1::<f32>()?, vec![0.5, 0.25, 0.125]);
        assert_eq!(
            opt2.state_tensors()?["w.momentum_buffer"].to_vec1::<f32>()?,
            opt.state_tensors()?["w.momentum_buffer"].to_vec1::<f32>()?
        );

        // truncation and plain garbage are reported with the file name
        let bytes = std::fs::read(&path)?;
        std::fs::write(&path, &bytes[..bytes.len() / 2])?;
        let e = format!("{:#}", Checkpoint::load(&path).unwrap_err());
        assert!(e.contains("checkpoint.safetensors"), "{e}");
        std::fs::write(&path, b"not a checkpoint")?;
        let e = format!("{:#}", Checkpoint::load(&path).unwrap_err());
        assert!(e.contains("checkpoint.safetensors"), "{e}");
        let e = format!("{:#}", Checkpoint::load(&dir.join("missing.safetensors")).unwrap_err());
        assert!(e.contains("missing.safetensors"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
