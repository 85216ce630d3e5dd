//! SCOP: scientific control for reliable neural network pruning (Tang et al., NeurIPS 2020).
//!
//! Knockoff inputs `X~` mimic the real inputs but carry no information about the label
//! beyond what the real inputs carry. Every body convolution gets a **selection layer**
//! ([`ScopFactory`]): on a batch `[X; X~]` the real half's output becomes
//! `beta * f(X) + (1 - beta) * f(X~)` (paper eq. 6), one `beta in [0, 1]` per channel, while the
//! knockoff half flows on unchanged. With the network frozen, only the `beta`s are trained on
//! the task loss of the real half ([`train_selection`]): a channel whose real feature helps
//! more than its knockoff counterpart grows `beta`. The importance of channel `k` is
//! `I_k = |gamma_k| * (beta_k - (1 - beta_k))` with `gamma` the weight of the BatchNorm after
//! the convolution ([`scop_scores`]); the least important channels are pruned and the smaller
//! network is fine-tuned.
//!
//! **Knockoff generator.** The paper trains a deep generator for knockoffs; the official code
//! samples a pretrained unconditional GAN generator, independently of the real batch. Here
//! [`GaussianKnockoffs`] fits a Gaussian model of the (normalised) training images: the mean,
//! the top-`k` principal directions with their variances, and an isotropic residual. In the
//! principal coordinates the model's components are independent, so an independent draw is
//! an exact model-X knockoff of those coordinates (the swap condition holds in the model), and
//! it is conditionally independent of the label given `X` because it never sees the label or
//! the batch. It is a much weaker image model than a GAN (blurry samples); this is the
//! simplification, documented in the results.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::ModuleT;
use nn_core::init::Init;
use nn_core::layers::{BoxedLayer, Conv2d, Conv2dConfig};
use nn_core::train::{BatchSource, Optimizer, OptimizerConfig};
use nn_core::{LayerFactory, LayerRole, Model, ParamKind, VarPath, VarStore};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Draws knockoff inputs.
pub trait KnockoffGenerator: Send + Sync {
    /// `n` knockoff images `[n, C, H, W]`, a function of `seed` only.
    fn sample(&self, n: usize, seed: u64, device: &Device) -> Result<Tensor>;
}

/// A Gaussian image model: mean, top-`k` principal directions, isotropic residual.
#[derive(Debug, Clone)]
pub struct GaussianKnockoffs {
    pub shape: (usize, usize, usize),
    pub mean: Vec<f32>,
    /// `k x D`, orthonormal rows.
    pub basis: Vec<f32>,
    /// Standard deviation along each principal direction.
    pub scales: Vec<f32>,
    /// Standard deviation of the residual per pixel.
    pub residual_std: f32,
}

fn normals(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    use rand::Rng;
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2): (f64, f64) = (rng.gen::<f64>().max(1e-300), rng.gen());
        let r = (-2.0 * u1.ln()).sqrt();
        out.push((r * (2.0 * std::f64::consts::PI * u2).cos()) as f32);
        out.push((r * (2.0 * std::f64::consts::PI * u2).sin()) as f32);
    }
    out.truncate(n);
    out
}

/// Orthonormalises the columns of `a` (`rows x cols`, row-major) in place (modified
/// Gram-Schmidt).
fn orthonormalize(a: &mut [f64], rows: usize, cols: usize) {
    for j in 0..cols {
        for p in 0..j {
            let dot: f64 = (0..rows).map(|i| a[i * cols + j] * a[i * cols + p]).sum();
            for i in 0..rows {
                a[i * cols + j] -= dot * a[i * cols + p];
            }
        }
        let norm = (0..rows).map(|i| a[i * cols + j].powi(2)).sum::<f64>().sqrt().max(1e-30);
        for i in 0..rows {
            a[i * cols + j] /= norm;
        }
    }
}

/// Eigen-decomposition of a symmetric `n x n` matrix by cyclic Jacobi rotations: returns
/// eigenvalues and eigenvectors (columns of `v`), sorted by decreasing eigenvalue.
pub fn symmetric_eigen(m: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = m.to_vec();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j * n + j].total_cmp(&a[i * n + i]));
    let vals = order.iter().map(|&i| a[i * n + i]).collect();
    let mut vecs = vec![0.0; n * n];
    for (new, &old) in order.iter().enumerate() {
        for k in 0..n {
            vecs[k * n + new] = v[k * n + old];
        }
    }
    (vals, vecs)
}

impl GaussianKnockoffs {
    /// Fits the model to `images` `[N, C, H, W]` (already normalised) with `k` principal
    /// directions, by randomized subspace iteration.
    pub fn fit(images: &Tensor, k: usize, seed: u64) -> Result<Self> {
        let (n, c, h, w) = images.dims4().context("knockoff model: images must be [N, C, H, W]")?;
        let d = c * h * w;
        if n < 2 || k == 0 || k >= d.min(n) {
            bail!("knockoff model: need 0 < k < min(N, D); got N = {n}, D = {d}, k = {k}");
        }
        let x = images.to_dtype(DType::F32)?.reshape((n, d))?;
        let mean = x.mean(0)?;
        let xc = x.broadcast_sub(&mean)?;
        let l = (k + 8).min(d).min(n);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dev = images.device();
        let mut q: Vec<f64> = normals(d * l, &mut rng).into_iter().map(f64::from).collect();
        for _ in 0..4 {
            orthonormalize(&mut q, d, l);
            let qt = Tensor::from_vec(q.iter().map(|&v| v as f32).collect::<Vec<_>>(), (d, l), dev)?;
            let y = xc.t()?.matmul(&xc.matmul(&qt)?)?; // D x l
            q = y.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        }
        orthonormalize(&mut q, d, l);
        let qt = Tensor::from_vec(q.iter().map(|&v| v as f32).collect::<Vec<_>>(), (d, l), dev)?;
        let b = xc.matmul(&qt)?; // N x l
        let cov: Vec<f64> = (b.t()?.matmul(&b)? / (n - 1) as f64)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let (vals, vecs) = symmetric_eigen(&cov, l);
        let vecs_t = Tensor::from_vec(vecs.iter().map(|&v| v as f32).collect::<Vec<_>>(), (l, l), dev)?;
        let basis = qt.matmul(&vecs_t)?.narrow(1, 0, k)?.t()?.contiguous()?; // k x D
        let total: f64 = xc.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? / (n - 1) as f64;
        let explained: f64 = vals[..k].iter().map(|v| v.max(0.0)).sum();
        let residual = ((total - explained).max(0.0) / (d - k) as f64).sqrt();
        Ok(Self {
            shape: (c, h, w),
            mean: mean.to_vec1()?,
            basis: basis.flatten_all()?.to_vec1()?,
            scales: vals[..k].iter().map(|v| v.max(0.0).sqrt() as f32).collect(),
            residual_std: residual as f32,
        })
    }
}

impl KnockoffGenerator for GaussianKnockoffs {
    fn sample(&self, n: usize, seed: u64, device: &Device) -> Result<Tensor> {
        let (c, h, w) = self.shape;
        let d = c * h * w;
        let k = self.scales.len();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let z: Vec<f32> = normals(n * k, &mut rng)
            .chunks(k)
            .flat_map(|row| row.iter().zip(&self.scales).map(|(z, s)| z * s).collect::<Vec<_>>())
            .collect();
        let z = Tensor::from_vec(z, (n, k), device)?;
        let basis = Tensor::from_vec(self.basis.clone(), (k, d), device)?;
        let eps = Tensor::from_vec(normals(n * d, &mut rng), (n, d), device)?;
        let mean = Tensor::from_vec(self.mean.clone(), (1, d), device)?;
        let x = z.matmul(&basis)?.broadcast_add(&mean)?.add(&(eps * self.residual_std as f64)?)?;
        Ok(x.reshape((n, c, h, w))?)
    }
}

/// A body convolution with SCOP's selection layer (paper eq. 6).
pub struct SelectedConv {
    conv: Conv2d,
    beta: Var,
    mixing: Arc<AtomicBool>,
}

impl ModuleT for SelectedConv {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.conv.forward_t(x, train)?;
        if !(train && self.mixing.load(Ordering::Relaxed)) {
            return Ok(y);
        }
        let b = y.dim(0)?;
        if b % 2 != 0 {
            candle_core::bail!("SCOP selection expects a batch [real; knockoff] of even size, got {b}");
        }
        let n = b / 2;
        let (real, knock) = (y.narrow(0, 0, n)?, y.narrow(0, n, n)?);
        let beta = self.beta.as_tensor().reshape((1, (), 1, 1))?;
        let one_minus = beta.affine(-1.0, 1.0)?;
        let mixed = (real.broadcast_mul(&beta)? + knock.broadcast_mul(&one_minus)?)?;
        Tensor::cat(&[&mixed, &knock], 0)
    }
}

/// Builds backbones whose `Body` convolutions carry selection layers (`<conv>.selection`,
/// initialised to 0.5). With mixing off (the default) the model computes exactly the plain
/// backbone, so trained weights load into it unchanged.
#[derive(Default)]
pub struct ScopFactory {
    /// (conv name, beta) of every selection layer.
    pub selections: Arc<Mutex<Vec<(String, Var)>>>,
    pub mixing: Arc<AtomicBool>,
}

impl LayerFactory for ScopFactory {
    fn conv2d(&self, vp: &VarPath, cfg: Conv2dConfig, role: LayerRole) -> candle_core::Result<BoxedLayer> {
        let conv = Conv2d::new(vp, cfg)?;
        if role != LayerRole::Body {
            return Ok(Box::new(conv));
        }
        let beta = vp.param("selection", &[cfg.out_channels], Init::Const(0.5), ParamKind::Bias)?;
        self.selections
            .lock()
            .expect("selections")
            .push((vp.prefix().to_string(), beta.clone()));
        Ok(Box::new(SelectedConv {
            conv,
            beta,
            mixing: self.mixing.clone(),
        }))
    }
    fn name(&self) -> &str {
        "scop"
    }
}

/// Settings of the selection phase (the official code: Adam, lr 0.004, betas (0.5, 0.9)).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScopConfig {
    pub epochs: usize,
    pub lr: f64,
    pub seed: u64,
    /// Stop after this many batches in all (smoke tests of large protocols).
    pub max_steps: Option<usize>,
}

impl Default for ScopConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            lr: 0.004,
            seed: 0,
            max_steps: None,
        }
    }
}

/// Trains the selection scales with the network frozen; BN statistics and every other
/// variable are restored afterwards, so only the `beta`s change. Returns the mean task loss of
/// the last epoch.
pub fn train_selection(
    model: &dyn Model,
    vs: &VarStore,
    factory: &ScopFactory,
    data: &dyn BatchSource,
    generator: &dyn KnockoffGenerator,
    cfg: &ScopConfig,
) -> Result<f64> {
    let betas: Vec<(String, Var)> = factory.selections.lock().expect("selections").clone();
    if betas.is_empty() {
        bail!("the model has no SCOP selection layers (build it with ScopFactory)");
    }
    let beta_names: std::collections::HashSet<String> = betas.iter().map(|(n, _)| format!("{n}.selection")).collect();
    let snapshot = vs.tensors();
    let trainable_before: Vec<(String, bool)> = vs.all().into_iter().map(|v| (v.name, v.trainable)).collect();
    vs.set_trainable("", false);
    for n in &beta_names {
        vs.set_trainable(n, true);
    }
    let params: Vec<_> = vs.trainable();
    let mut adam = OptimizerConfig::adamw(cfg.lr, 0.0);
    if let OptimizerConfig::AdamW { beta1, beta2, .. } = &mut adam {
        (*beta1, *beta2) = (0.5, 0.9);
    }
    let mut opt: Box<dyn Optimizer> = adam.build(params)?;
    factory.mixing.store(true, Ordering::Relaxed);
    let result = (|| -> Result<f64> {
        let mut last = 0.0;
        let mut steps = 0usize;
        for epoch in 0..cfg.epochs {
            let (mut sum, mut count) = (0.0, 0usize);
            for (i, batch) in data.batches(epoch, 0).enumerate() {
                if cfg.max_steps.is_some_and(|m| steps >= m) {
                    break;
                }
                steps += 1;
                let (x, y) = batch?;
                let b = x.dim(0)?;
                let seed = nn_core::rng::mix_seed(&[cfg.seed, epoch as u64, i as u64]);
                let kf = generator.sample(b, seed, x.device())?.to_dtype(x.dtype())?;
                let logits = model.forward_t(&Tensor::cat(&[&x, &kf], 0)?, true)?;
                let loss = nn_core::train::cross_entropy(&logits.narrow(0, 0, b)?, &y, 0.0)?;
                let v = loss.to_scalar::<f32>()? as f64;
                if !v.is_finite() {
                    bail!("SCOP selection: non-finite loss {v} at epoch {epoch}, batch {i}");
                }
                sum += v * b as f64;
                count += b;
                opt.step(&loss.backward()?)?;
                for (_, beta) in &betas {
                    beta.set(&beta.as_tensor().clamp(0f64, 1f64)?)?;
                }
            }
            last = sum / count.max(1) as f64;
        }
        Ok(last)
    })();
    factory.mixing.store(false, Ordering::Relaxed);
    // the network is frozen: restore everything but the selection scales (BN statistics saw
    // knockoff batches)
    let mut restore = snapshot;
    restore.retain(|k, _| !beta_names.contains(k));
    vs.load_tensors(&restore, false)?;
    for (name, t) in trainable_before {
        vs.set_trainable(&name, t);
    }
    result
}

/// Per group, per unit: the sum over the unit's selected convolutions of
/// `|gamma| * (beta - (1 - beta))` (paper eq. 8); convolutions without a selection layer
/// (the stem) contribute nothing.
pub fn scop_scores(graph: &crate::graph::ChannelGraph, vs: &VarStore) -> Result<Vec<Vec<f32>>> {
    importance_scores(graph, vs, true)
}

/// The same scores with every selection scale taken as 1, i.e. `|gamma|` alone (BN-scale
/// pruning): comparing the two selections shows what the knockoff competition changed.
pub fn gamma_scores(graph: &crate::graph::ChannelGraph, vs: &VarStore) -> Result<Vec<Vec<f32>>> {
    importance_scores(graph, vs, false)
}

/// How the trained selection scales `beta` are spread over all selection layers.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SelectionStats {
    pub channels: usize,
    /// Channels with beta >= 0.999 (the real feature won completely).
    pub at_one: usize,
    /// Channels with beta <= 0.001 (the knockoff won completely).
    pub at_zero: usize,
    pub mean: f64,
}

/// [`SelectionStats`] of the selection layers in `vs`.
pub fn selection_stats(vs: &VarStore) -> Result<SelectionStats> {
    let mut st = SelectionStats {
        channels: 0,
        at_one: 0,
        at_zero: 0,
        mean: 0.0,
    };
    for v in vs.all().into_iter().filter(|v| v.name.ends_with(".selection")) {
        for b in v.var.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
            st.channels += 1;
            st.at_one += usize::from(b >= 0.999);
            st.at_zero += usize::from(b <= 0.001);
            st.mean += b as f64;
        }
    }
    st.mean /= st.channels.max(1) as f64;
    Ok(st)
}

fn importance_scores(graph: &crate::graph::ChannelGraph, vs: &VarStore, with_beta: bool) -> Result<Vec<Vec<f32>>> {
    let vec = |name: &str| -> Result<Option<Vec<f32>>> {
        match vs.get(name) {
            Some(v) => Ok(Some(v.var.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)),
            None => Ok(None),
        }
    };
    // per space: importance of each channel
    let mut per_space: Vec<Option<Vec<f32>>> = vec![None; graph.spaces.len()];
    for m in graph.members.iter().filter(|m| m.role == crate::graph::Role::Producer && m.masks) {
        let Some(conv) = m.param.strip_suffix(".weight") else { continue };
        let Some(beta) = vec(&format!("{conv}.selection"))? else { continue };
        // the BN weight of the same space
        let gamma_name = graph
            .members
            .iter()
            .find(|o| o.space == m.space && o.param != m.param && o.param.ends_with(".weight") && o.masks)
            .map(|o| o.param.clone())
            .with_context(|| format!("no BatchNorm after `{conv}`"))?;
        let gamma = vec(&gamma_name)?.with_context(|| format!("no parameter `{gamma_name}`"))?;
        per_space[m.space] = Some(
            gamma
                .iter()
                .zip(&beta)
                .map(|(g, &b)| g.abs() * (2.0 * if with_beta { b } else { 1.0 } - 1.0))
                .collect(),
        );
    }
    Ok(graph
        .groups
        .iter()
        .map(|g| {
            g.units
                .iter()
                .map(|u| {
                    g.spaces
                        .iter()
                        .zip(u)
                        .map(|(&s, &ch)| per_space[s].as_ref().map_or(0.0, |v| v[ch]))
                        .sum()
                })
                .collect()
        })
        .collect())
}
