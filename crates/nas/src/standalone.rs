//! The careful evaluation: a short stand-alone training of one architecture from scratch with
//! nn-core's trainer, cached by architecture in a pool directory.
//!
//! A stand-alone result is a pure function of the architecture and the training config (fixed
//! seed), so it is stored once in `<pool>/<arch id>/result.json` and reused by every study
//! and search that trains the same architecture with the same config.

use crate::data::NasData;
use crate::eval::accuracy;
use crate::net::Network;
use crate::space::{Arch, SearchSpace};
use anyhow::{Context, Result};
use nn_core::train::{InMemorySource, OptimizerConfig, Schedule, TrainConfig, Trainer};
use nn_core::VarStore;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How stand-alone candidates are trained (SGD with Nesterov momentum, cosine schedule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StandaloneConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Initialisation and data-order seed (the same for every architecture).
    pub seed: u64,
}

impl Default for StandaloneConfig {
    fn default() -> Self {
        Self {
            epochs: 2,
            batch_size: 64,
            lr: 0.05,
            weight_decay: 5e-4,
            seed: 0,
        }
    }
}

/// The outcome of one stand-alone training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StandaloneResult {
    pub key: String,
    /// [`NasData::id`] of the data it was trained and evaluated on.
    #[serde(default)]
    pub data_id: String,
    pub arch: Arch,
    pub config: StandaloneConfig,
    /// Top-1 (percent) on the validation subset (used to choose among candidates; `f32` so
    /// that it survives the JSON state exactly).
    pub val_top1: f32,
    /// Top-1 (percent) on the test subset (reported).
    pub test_top1: f32,
    pub params: usize,
    pub macs: u64,
    /// Wall seconds of the training and evaluation.
    pub seconds: f64,
    pub run_dir: PathBuf,
}

const RESULT_FILE: &str = "result.json";

/// The pool directory of `arch`.
pub fn run_dir(pool: &Path, arch: &Arch) -> PathBuf {
    pool.join(arch.short_id())
}

/// The cached result of `arch` with `cfg` on `data` in `pool`: `Ok(None)` if there is none, an
/// error if the pool holds a result of this architecture for other data or another training
/// config (its run directory would be reused, so the pool must not be shared across budgets).
pub fn cached(pool: &Path, arch: &Arch, cfg: &StandaloneConfig, data: &NasData) -> Result<Option<StandaloneResult>> {
    let path = run_dir(pool, arch).join(RESULT_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let r: StandaloneResult = serde_json::from_str(&text).with_context(|| format!("{} is not a stand-alone result", path.display()))?;
    if r.key != arch.key() || &r.config != cfg || r.data_id != data.id {
        anyhow::bail!(
            "{} holds a stand-alone result of {} on [{}] with {:?}, but this search trains {} on [{}] with {:?}; \
             use another --pool for this budget",
            path.display(),
            r.key,
            r.data_id,
            r.config,
            arch.key(),
            data.id,
            cfg
        );
    }
    Ok(Some(r))
}

/// Trains `arch` stand-alone (or returns the cached result from `pool`).
pub fn train_standalone(space: &SearchSpace, arch: &Arch, data: &NasData, cfg: &StandaloneConfig, pool: &Path) -> Result<StandaloneResult> {
    if let Some(r) = cached(pool, arch, cfg, data)? {
        return Ok(r);
    }
    let dir = run_dir(pool, arch);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let device = data.train.images.device().clone();
    let vs = VarStore::new(cfg.seed, &device);
    let net = Network::standalone(&vs.root(), space, arch)?;
    let mut tc = TrainConfig::new(nn_core::Model::name(&net), &data.dataset, cfg.epochs, &dir);
    tc.batch_size = cfg.batch_size;
    tc.optimizer = OptimizerConfig::sgd_nesterov(cfg.lr, cfg.weight_decay);
    tc.schedule = Schedule::Cosine { min_lr: 0.0 };
    tc.seed = cfg.seed;
    tc.eval_every = 0;
    tc.quiet = true;
    tc.resume = true;
    tc.command = format!("stand-alone training of {}", arch.key());
    let train = InMemorySource::new(data.train.images.clone(), data.train.labels.clone(), cfg.batch_size, true, cfg.seed)?.drop_last(true);
    let val = InMemorySource::new(data.val.images.clone(), data.val.labels.clone(), 250, false, 0)?;
    let summary = Trainer::new(tc, &net, &vs)?.fit(&train, Some(&val))?;
    let (test_top1, _) = accuracy(
        |x| nn_core::Model::forward_t(&net, x, false),
        &data.test.images,
        &data.test.labels,
        250,
    )?;
    let r = StandaloneResult {
        key: arch.key(),
        data_id: data.id.clone(),
        arch: arch.clone(),
        config: cfg.clone(),
        val_top1: summary.test_top1.unwrap_or(0.0) as f32,
        test_top1: test_top1 as f32,
        params: summary.params,
        macs: summary.macs,
        seconds: summary.wall_s,
        run_dir: dir.clone(),
    };
    crate::search::write_json_atomic(&dir.join(RESULT_FILE), &r)?;
    Ok(r)
}
