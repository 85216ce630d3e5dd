//! The adaptation methods. Both take a trained [`SourceModel`] and [`TargetImages`] only —
//! there is no parameter through which source data could enter — and return an adapted copy
//! (the source model itself is not modified). Both freeze the classifier (SHOT's hypothesis
//! transfer; SFDA-DE keeps the anchors fixed) and update the backbone and bottleneck.

use crate::cdd::{cdd, KernelConfig};
use crate::data::{extract, TargetImages};
use crate::estimate::{ClassGaussian, EstimatorConfig};
use crate::kmeans::{spherical_kmeans, KMeansConfig};
use crate::source::{epoch_order, shot_lr_factor};
use crate::SourceModel;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use nn_core::layers::functional::{log_softmax, softmax};
use nn_core::train::{Optimizer, OptimizerConfig};
use rand::seq::SliceRandom;
use rand::Rng;
use std::time::Instant;

/// Statistics of one adaptation round (an epoch of SHOT-IM, a loop of SFDA-DE).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundStats {
    pub round: usize,
    pub steps: usize,
    pub mean_loss: f64,
    /// SFDA-DE: target samples selected by the clustering (0 for SHOT-IM).
    pub selected: usize,
    /// SFDA-DE: classes kept after filtering.
    pub kept_classes: usize,
    /// SFDA-DE: spherical k-means rounds.
    pub kmeans_iters: usize,
    /// SFDA-DE: fraction of selected pseudo-labels that agree with the source model's argmax.
    pub agree_with_classifier: f64,
}

/// What an adaptation did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdaptReport {
    pub method: String,
    pub steps: usize,
    pub images_seen: usize,
    pub wall_s: f64,
    pub images_per_s: f64,
    pub rounds: Vec<RoundStats>,
}

/// Called after every round with its statistics and the current model (e.g. to evaluate it on
/// a labelled test split the adaptation itself never sees).
pub type Observer<'a> = &'a mut dyn FnMut(&RoundStats, &SourceModel) -> Result<()>;

fn optimizer(model: &SourceModel, lr: f64, weight_decay: f64) -> Result<Box<dyn Optimizer>> {
    Ok(OptimizerConfig::sgd(lr, weight_decay).build(model.feature_params())?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

// ---------------------------------------------------------------------------------------------
// SHOT-IM

/// Options of [`adapt_shot_im`] (SHOT's digit settings as defaults).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShotImConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Weight of the diversity term (SHOT: 1).
    pub diversity_weight: f64,
    pub seed: u64,
    /// Stop after this many steps (smoke runs of the large presets).
    #[serde(default)]
    pub max_steps: Option<usize>,
}

impl Default for ShotImConfig {
    fn default() -> Self {
        Self {
            epochs: 5,
            batch_size: 64,
            lr: 0.01,
            weight_decay: 5e-4,
            diversity_weight: 1.0,
            seed: 0,
            max_steps: None,
        }
    }
}

/// SHOT's information-maximisation loss on logits `[B, K]` (SHOT Eqs. 2-3):
/// `L_ent = -mean_i sum_k p_ik log p_ik` (confident predictions) and
/// `L_div = sum_k pbar_k log pbar_k`, `pbar = mean_i p_i` (diverse predictions);
/// returns `L_ent + diversity_weight * L_div`.
pub fn information_maximization(logits: &Tensor, diversity_weight: f64) -> Result<Tensor> {
    let p = softmax(logits, 1)?;
    let logp = log_softmax(logits, 1)?;
    let ent = p.mul(&logp)?.sum(1)?.mean_all()?.neg()?;
    let pbar = p.mean(0)?;
    let div = pbar.mul(&(pbar.clone() + 1e-5)?.log()?)?.sum_all()?;
    Ok((ent + (div * diversity_weight)?)?)
}

/// SHOT-IM: minimises [`information_maximization`] on target batches.
pub fn adapt_shot_im(
    source: &SourceModel,
    target: &TargetImages,
    cfg: &ShotImConfig,
    mut observer: Option<Observer<'_>>,
) -> Result<(SourceModel, AdaptReport)> {
    if cfg.epochs == 0 || cfg.batch_size < 2 || target.len() < cfg.batch_size {
        bail!(
            "SHOT-IM needs epochs >= 1 and 2 <= batch size <= {} target images, got {cfg:?}",
            target.len()
        );
    }
    let model = source.duplicate()?;
    let mut opt = optimizer(&model, cfg.lr, cfg.weight_decay)?;
    let per_epoch = target.len() / cfg.batch_size;
    let total = cfg.max_steps.unwrap_or(usize::MAX).min(per_epoch * cfg.epochs);
    let t0 = Instant::now();
    let mut step = 0;
    let mut rounds = Vec::new();
    for epoch in 0..cfg.epochs {
        if step >= total {
            break;
        }
        let order = epoch_order(target.len(), cfg.seed ^ 0x5107, epoch as u64);
        let (mut sum, mut done) = (0.0, 0);
        for b in 0..per_epoch {
            if step >= total {
                break;
            }
            let x = target.gather(&order[b * cfg.batch_size..(b + 1) * cfg.batch_size])?;
            opt.set_lr(cfg.lr * shot_lr_factor(step, total));
            let logits = model.head(&model.features(&x, true)?)?;
            let loss = information_maximization(&logits, cfg.diversity_weight)?;
            let l = scalar(&loss)?;
            if !l.is_finite() {
                bail!("SHOT-IM: non-finite loss {l} at epoch {epoch} step {b}");
            }
            opt.step(&loss.backward()?)?;
            sum += l;
            step += 1;
            done += 1;
        }
        let st = RoundStats {
            round: epoch,
            steps: done,
            mean_loss: sum / done.max(1) as f64,
            selected: 0,
            kept_classes: 0,
            kmeans_iters: 0,
            agree_with_classifier: f64::NAN,
        };
        if let Some(o) = observer.as_mut() {
            o(&st, &model)?;
        }
        rounds.push(st);
    }
    let wall = t0.elapsed().as_secs_f64();
    let seen = step * cfg.batch_size;
    Ok((
        model,
        AdaptReport {
            method: "shot-im".into(),
            steps: step,
            images_seen: seen,
            wall_s: wall,
            images_per_s: seen as f64 / wall.max(1e-9),
            rounds,
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// SFDA-DE

/// Options of [`adapt_sfda_de`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SfdaDeConfig {
    /// Outer loops: each re-clusters the target, re-estimates the distributions, then trains.
    pub loops: usize,
    /// Optimisation steps per loop.
    pub steps_per_loop: usize,
    /// Classes drawn per step (class-aware sampling as in CAN); 0 = every kept class.
    pub classes_per_step: usize,
    /// Target images (and surrogate features) per class and step.
    pub samples_per_class: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Weight of the CDD loss.
    pub cdd_weight: f64,
    pub kmeans: KMeansConfig,
    pub estimator: EstimatorConfig,
    pub kernel: KernelConfig,
    pub seed: u64,
    /// Batch size of the feature extraction passes.
    pub eval_batch: usize,
}

impl Default for SfdaDeConfig {
    fn default() -> Self {
        Self {
            loops: 10,
            steps_per_loop: 30,
            classes_per_step: 0,
            samples_per_class: 10,
            lr: 0.01,
            weight_decay: 5e-4,
            cdd_weight: 1.0,
            kmeans: KMeansConfig::default(),
            estimator: EstimatorConfig::default(),
            kernel: KernelConfig::default(),
            seed: 0,
            eval_batch: 500,
        }
    }
}

/// SFDA-DE (Ding et al., CVPR 2022), one loop:
/// 1. target features `f_i` of every target image (evaluation mode);
/// 2. pseudo-labels by spherical k-means initialised at the anchors `w_k` (Sec. 3.2,
///    [`crate::kmeans`]), keeping confident samples of well-populated classes;
/// 3. per kept class, the source distribution `N(|mu_k^t| w_k/|w_k|, gamma Sigma_k^t)`
///    (Sec. 3.3, [`crate::estimate`]);
/// 4. `steps_per_loop` steps of: draw classes, `samples_per_class` selected target images and as
///    many surrogate source features per class (Sec. 3.4), minimise
///    `cdd_weight * CDD(surrogate, target features)` (Eq. 9, [`crate::cdd`]) over the backbone
///    and bottleneck; the surrogates are constants, gradients reach the target features only.
///
/// Source data cannot be passed: the signature has a source *model* and *target images*.
/// ```compile_fail
/// # use domain_adapt::*;
/// # fn f(model: &SourceModel, source: &LabeledImages) {
/// // A labelled (source) dataset is not `TargetImages`:
/// let _ = adapt_sfda_de(model, source, &SfdaDeConfig::default(), None);
/// # }
/// ```
pub fn adapt_sfda_de(
    source: &SourceModel,
    target: &TargetImages,
    cfg: &SfdaDeConfig,
    mut observer: Option<Observer<'_>>,
) -> Result<(SourceModel, AdaptReport)> {
    if cfg.loops == 0 || cfg.steps_per_loop == 0 || cfg.samples_per_class < 2 {
        bail!(
            "SFDA-DE needs loops >= 1, steps_per_loop >= 1 and samples_per_class >= 2, got {} / {} / {}",
            cfg.loops,
            cfg.steps_per_loop,
            cfg.samples_per_class
        );
    }
    let model = source.duplicate()?;
    let dim = model.spec().bottleneck_dim;
    let k = model.spec().num_classes;
    let anchors = model.anchors()?.flatten_all()?.to_vec1::<f32>()?;
    let mut opt = optimizer(&model, cfg.lr, cfg.weight_decay)?;
    let mut rng = nn_core::rng::derived(cfg.seed, 0x5FDA);
    let total = cfg.loops * cfg.steps_per_loop;
    let t0 = Instant::now();
    let (mut step, mut seen) = (0usize, 0usize);
    let mut rounds = Vec::new();
    for round in 0..cfg.loops {
        let (feats, logits) = extract(&model, target, cfg.eval_batch)?;
        let clustering = spherical_kmeans(&feats, dim, &anchors, &cfg.kmeans)?;
        let argmax: Vec<usize> = logits
            .chunks_exact(k)
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a })
                    .0
            })
            .collect();
        let mut members = Vec::new();
        let mut gaussians = Vec::new();
        for c in 0..k {
            let m = clustering.members(c);
            if !clustering.kept_classes[c] || m.len() < 2 {
                continue; // a covariance needs two samples
            }
            let mut rows = Vec::with_capacity(m.len() * dim);
            for &i in &m {
                rows.extend_from_slice(&feats[i * dim..(i + 1) * dim]);
            }
            gaussians.push(ClassGaussian::estimate(
                c,
                &rows,
                dim,
                &anchors[c * dim..(c + 1) * dim],
                &cfg.estimator,
            )?);
            members.push(m);
        }
        let selected = clustering.num_selected();
        let agree = (0..feats.len() / dim)
            .filter(|&i| clustering.selected[i] && clustering.labels[i] == argmax[i])
            .count() as f64
            / selected.max(1) as f64;
        if gaussians.is_empty() {
            bail!(
                "SFDA-DE loop {round}: no class has >= {} target samples within cosine distance {} of its centre; \
                 raise kmeans.distance_threshold or lower kmeans.min_class_size",
                cfg.kmeans.min_class_size.max(2),
                cfg.kmeans.distance_threshold
            );
        }
        let mut sum = 0.0;
        for _ in 0..cfg.steps_per_loop {
            let mut chosen: Vec<usize> = (0..gaussians.len()).collect();
            chosen.shuffle(&mut rng);
            if cfg.classes_per_step >= 2 {
                chosen.truncate(cfg.classes_per_step);
            }
            let (mut idx, mut tl, mut sl, mut surrogate) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for &g in &chosen {
                let m = &members[g];
                let n = cfg.samples_per_class;
                if m.len() >= n {
                    idx.extend(m.choose_multiple(&mut rng, n).copied());
                } else {
                    idx.extend((0..n).map(|_| m[rng.gen_range(0..m.len())]));
                }
                tl.extend(std::iter::repeat(gaussians[g].class).take(n));
                sl.extend(std::iter::repeat(gaussians[g].class).take(n));
                surrogate.extend(gaussians[g].sample(n, &mut rng));
            }
            let s = Tensor::from_vec(surrogate, (sl.len(), dim), &Device::Cpu)?;
            let x = target.gather(&idx)?;
            opt.set_lr(cfg.lr * shot_lr_factor(step, total));
            let f = model.features(&x, true)?;
            let out = cdd(&s, &sl, &f, &tl, &cfg.kernel)?;
            let loss = (out.loss * cfg.cdd_weight)?;
            let l = scalar(&loss)?;
            if !l.is_finite() {
                bail!("SFDA-DE: non-finite loss {l} at loop {round}, global step {step}");
            }
            opt.step(&loss.backward()?)?;
            sum += l;
            step += 1;
            seen += idx.len();
        }
        let st = RoundStats {
            round,
            steps: cfg.steps_per_loop,
            mean_loss: sum / cfg.steps_per_loop as f64,
            selected,
            kept_classes: gaussians.len(),
            kmeans_iters: clustering.iterations,
            agree_with_classifier: agree,
        };
        if let Some(o) = observer.as_mut() {
            o(&st, &model)?;
        }
        rounds.push(st);
    }
    let wall = t0.elapsed().as_secs_f64();
    Ok((
        model,
        AdaptReport {
            method: "sfda-de".into(),
            steps: step,
            images_seen: seen,
            wall_s: wall,
            images_per_s: seen as f64 / wall.max(1e-9),
            rounds,
        },
    ))
}
