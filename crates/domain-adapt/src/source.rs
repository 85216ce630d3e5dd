//! Source training (SHOT's protocol): cross-entropy with label smoothing on the labelled source
//! domain. This is the only place that sees source data; adaptation never does.

use crate::data::LabeledImages;
use crate::SourceModel;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use nn_core::train::{cross_entropy, OptimizerConfig};
use rand::Rng;
use std::time::Instant;

/// Options of [`train_source`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SourceTrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// SGD (momentum 0.9) learning rate; SHOT's `lr * (1 + 10 p)^-0.75` decay over training.
    pub lr: f64,
    pub weight_decay: f64,
    /// SHOT: 0.1.
    pub label_smoothing: f64,
    pub seed: u64,
    /// Print one line per epoch.
    pub verbose: bool,
    /// Stop after this many steps (smoke runs of the large presets).
    #[serde(default)]
    pub max_steps: Option<usize>,
}

impl Default for SourceTrainConfig {
    fn default() -> Self {
        Self {
            epochs: 5,
            batch_size: 64,
            lr: 0.01,
            weight_decay: 5e-4,
            label_smoothing: 0.1,
            seed: 0,
            verbose: false,
            max_steps: None,
        }
    }
}

/// What [`train_source`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceTrainReport {
    pub steps: usize,
    pub final_loss: f64,
    pub wall_s: f64,
    pub images_per_s: f64,
}

/// SHOT's learning-rate decay, `(1 + 10 p)^-0.75` at progress `p` in [0, 1].
pub fn shot_lr_factor(step: usize, total: usize) -> f64 {
    let p = step as f64 / total.max(1) as f64;
    (1.0 + 10.0 * p).powf(-0.75)
}

/// A seeded permutation of `0..n` for `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = nn_core::rng::derived(seed, epoch);
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.gen_range(0..=i);
        idx.swap(i, j);
    }
    idx
}

/// Trains every parameter of `model` on the labelled source images.
pub fn train_source(model: &SourceModel, data: &LabeledImages, cfg: &SourceTrainConfig) -> Result<SourceTrainReport> {
    if data.num_classes != model.spec().num_classes {
        bail!(
            "source data {} has {} classes, the model {}",
            data.name,
            data.num_classes,
            model.spec().num_classes
        );
    }
    if cfg.epochs == 0 || cfg.batch_size < 2 || data.len() < cfg.batch_size {
        bail!(
            "source training needs epochs >= 1 and 2 <= batch size <= images, got {} epochs, batch {}, {} images",
            cfg.epochs,
            cfg.batch_size,
            data.len()
        );
    }
    let mut opt = OptimizerConfig::sgd(cfg.lr, cfg.weight_decay).build(model.var_store().trainable())?;
    let per_epoch = data.len() / cfg.batch_size;
    let total = cfg.max_steps.unwrap_or(usize::MAX).min(per_epoch * cfg.epochs);
    let t0 = Instant::now();
    let (mut step, mut last) = (0, f64::NAN);
    for epoch in 0..cfg.epochs {
        if step >= total {
            break;
        }
        let order = epoch_order(data.len(), cfg.seed, epoch as u64);
        let (mut sum, mut done) = (0.0, 0);
        for b in 0..per_epoch {
            if step >= total {
                break;
            }
            let idx = &order[b * cfg.batch_size..(b + 1) * cfg.batch_size];
            let it = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), &Device::Cpu)?;
            let x = data.images.index_select(&it, 0)?;
            let y = Tensor::from_vec(idx.iter().map(|&i| data.labels[i]).collect::<Vec<_>>(), idx.len(), &Device::Cpu)?;
            opt.set_lr(cfg.lr * shot_lr_factor(step, total));
            let loss = cross_entropy(&model.forward_t(&x, true)?, &y, cfg.label_smoothing)?;
            let l = loss.to_scalar::<f32>()? as f64;
            if !l.is_finite() {
                bail!("source training: non-finite loss {l} at epoch {epoch} step {b}");
            }
            opt.step(&loss.backward()?)?;
            sum += l;
            step += 1;
            done += 1;
        }
        last = sum / done.max(1) as f64;
        if cfg.verbose {
            eprintln!(
                "  source epoch {}/{}: loss {last:.4} ({:.0} s)",
                epoch + 1,
                cfg.epochs,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    Ok(SourceTrainReport {
        steps: step,
        final_loss: last,
        wall_s: wall,
        images_per_s: (step * cfg.batch_size) as f64 / wall.max(1e-9),
    })
}

use nn_core::Model;
