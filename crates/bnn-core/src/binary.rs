//! Binary layers: [`BinaryConv2d`] and [`BinaryLinear`] (binarised weights scaled per output
//! channel, binarised inputs), FDA's training-only [`NoiseAdaptation`] module, the shared
//! [`BinaryControl`] through which a training callback moves FDA's `n` and the noise weight,
//! and the small learnable activations binary networks use ([`PRelu`], [`LearnableBias`],
//! [`RPRelu`]).
//!
//! A binary layer computes (XNOR-Net, Rastegari et al. 2016, Eq. (2)-(4); FDA, Sec. 3):
//! `y = (alpha * Q(W)) (*) Q(x) (+ b)`, with `alpha_o = mean |W_o|` per output channel,
//! detached (its gradient is not propagated, as in FDA's code), and `Q` the layer's
//! [`Quantizer`]. With FDA's noise adaptation on, during training only,
//! `Q(W) + a(t) e(W)` and `Q(x) + a(t) e(x)` replace `Q(W)` and `Q(x)` (FDA, Sec. 3.2), where
//! `a(t)` decays from `noise_max` to 0 by a cosine over training.

use crate::fastmath;
use crate::quantizer::Quantizer;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, Var};
use candle_nn::ModuleT;
use nn_core::init::Init;
use nn_core::layers::{Conv2dConfig, Linear};
use nn_core::summary::{self, LayerStat};
use nn_core::var_store::{ParamKind, VarPath};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// How FDA's parameters move with training progress `p` in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FdaSchedule {
    /// Fundamental frequency `w` of the square wave (0.1 in the reimplementation).
    pub omega: f64,
    /// Number of extra sine terms at the start of training (9).
    pub n_start: usize,
    /// ... reached at the end (18).
    pub n_end: usize,
    /// Weight of the noise adaptation module at the start (0.1); it decays to 0 by a cosine.
    pub noise_max: f64,
}

impl Default for FdaSchedule {
    fn default() -> Self {
        Self {
            omega: 0.1,
            n_start: 9,
            n_end: 18,
            noise_max: 0.1,
        }
    }
}

impl FdaSchedule {
    /// `n(p) = n_start + floor(p (n_end - n_start))` (the reimplementation uses `p = epoch / epochs`).
    pub fn n_at(&self, p: f64) -> usize {
        let span = self.n_end.saturating_sub(self.n_start) as f64;
        self.n_start + (p.clamp(0.0, 1.0) * span).floor() as usize
    }
    /// `a(p) = noise_max (1 + cos(pi p)) / 2` (the reimplementation uses `p = (epoch + 1) / epochs`).
    pub fn noise_at(&self, p: f64) -> f64 {
        self.noise_max * 0.5 * (1.0 + (std::f64::consts::PI * p.clamp(0.0, 1.0)).cos())
    }
}

/// State shared by every binary layer of a model and the callback that drives it: the
/// quantizer (with FDA's current `n`) and the noise weight.
#[derive(Debug)]
pub struct BinaryControl {
    base: Quantizer,
    schedule: FdaSchedule,
    n: AtomicUsize,
    noise: AtomicU64,
}

impl BinaryControl {
    /// A control for `quantizer`; for FDA, `omega` and the starting `n` come from `schedule`.
    pub fn new(quantizer: Quantizer, schedule: FdaSchedule) -> Arc<Self> {
        Arc::new(Self {
            base: quantizer,
            schedule,
            n: AtomicUsize::new(schedule.n_start),
            noise: AtomicU64::new(schedule.noise_at(0.0).to_bits()),
        })
    }

    /// The quantizer to use now.
    pub fn quantizer(&self) -> Quantizer {
        match self.base {
            Quantizer::Fda { .. } => Quantizer::Fda {
                omega: self.schedule.omega,
                n: self.n.load(Ordering::Relaxed),
            },
            q => q,
        }
    }

    pub fn schedule(&self) -> FdaSchedule {
        self.schedule
    }

    /// The current weight of the noise adaptation module.
    pub fn noise_weight(&self) -> f64 {
        f64::from_bits(self.noise.load(Ordering::Relaxed))
    }

    /// Sets FDA's `n` and the noise weight explicitly.
    pub fn set(&self, n: usize, noise_weight: f64) {
        self.n.store(n, Ordering::Relaxed);
        self.noise.store(noise_weight.to_bits(), Ordering::Relaxed);
    }

    /// Sets both from training progress: `n` from `p_n`, the noise weight from `p_noise`.
    pub fn set_progress(&self, p_n: f64, p_noise: f64) {
        self.set(self.schedule.n_at(p_n), self.schedule.noise_at(p_noise));
    }

    /// The reimplementation's per-epoch rule: `n` from `epoch / epochs`, the noise weight from
    /// `(epoch + 1) / epochs` (0-based `epoch`), so the last epoch trains without noise.
    pub fn set_epoch(&self, epoch: usize, epochs: usize) {
        let e = epochs.max(1) as f64;
        self.set_progress(epoch as f64 / e, (epoch + 1) as f64 / e);
    }
}

/// FDA's noise adaptation module `e(t) = FC2(ReLU(FC1(t))) + 0.1 sin(t)` over the last
/// dimension `d` (bias-free FCs, hidden width `d / ratio`, or `d / 4` when that is 0, at least
/// 1), compensating the approximation error of the sine series (FDA, Sec. 3.2). Used in
/// training only.
pub struct NoiseAdaptation {
    fc1: Linear,
    fc2: Linear,
    pub hidden: usize,
}

impl NoiseAdaptation {
    pub fn new(vp: &VarPath, d: usize, ratio: usize) -> Result<Self> {
        let mut hidden = d / ratio.max(1);
        if hidden == 0 {
            hidden = (d / 4).max(1);
        }
        Ok(Self {
            fc1: Linear::new(&vp.pp("fc1"), d, hidden, false)?,
            fc2: Linear::new(&vp.pp("fc2"), hidden, d, false)?,
            hidden,
        })
    }

    /// `e(t)` for `t: [..., d]`.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        self.fc_path(t)? + scaled_sin(t, 0.1)?
    }

    /// The learned part `FC2(ReLU(FC1(t)))` for `t: [..., d]`.
    pub fn fc_path(&self, t: &Tensor) -> Result<Tensor> {
        let h = nn_core::ops::activation::relu(&self.fc1.forward_t(t, true)?)?;
        self.fc2.forward_t(&h, true)
    }

    /// The learned part applied per position over the channels of an NCHW (or `[N, C]`)
    /// tensor: on NCHW the FCs are 1x1 convolutions (no transposes to channels-last).
    pub fn fc_path_channels(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() != 4 {
            return self.fc_path(x);
        }
        let (d, h) = (self.fc1.in_features(), self.hidden);
        let conv = nn_core::layers::conv::conv2d;
        let w1 = self.fc1.weight.as_tensor().reshape((h, d, 1, 1))?;
        let w2 = self.fc2.weight.as_tensor().reshape((d, h, 1, 1))?;
        let z = nn_core::ops::activation::relu(&conv(x, &w1, &Conv2dConfig::new(d, h, 1))?)?;
        conv(&z, &w2, &Conv2dConfig::new(h, d, 1))
    }
}

/// `scale * sin(t)`: a CPU custom op for `f32`/`f64` (vectorised polynomial `sin`, backward
/// `grad * scale * cos(t)` in one pass), tensor ops elsewhere.
pub fn scaled_sin(t: &Tensor, scale: f64) -> Result<Tensor> {
    if t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) {
        t.contiguous()?.apply_op1(ScaledSin(scale))
    } else {
        t.sin()? * scale
    }
}

struct ScaledSin(f64);

/// `scale * sin(x)` (`grad = None`) or `grad * scale * cos(x)` over contiguous storages.
fn scaled_sin_cpu(x: (&CpuStorage, &Layout), grad: Option<(&CpuStorage, &Layout)>, scale: f64) -> Result<CpuStorage> {
    fn run<T: Copy + Send + Sync + Default>(x: &[T], g: Option<&[T]>, f: impl Fn(&[T], Option<&[T]>, &mut [T]) + Sync) -> Vec<T> {
        const CHUNK: usize = 1 << 14;
        let mut y = vec![T::default(); x.len()];
        y.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
            let r = i * CHUNK..i * CHUNK + o.len();
            f(&x[r.clone()], g.map(|g| &g[r]), o)
        });
        y
    }
    fn slice<'a, T>(v: &'a [T], l: &Layout) -> Result<&'a [T]> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("scaled sin: contiguous tensors expected".into()))?;
        Ok(&v[a..b])
    }
    let (xs, xl) = x;
    Ok(match (xs, grad) {
        (CpuStorage::F32(x), None) => CpuStorage::F32(run(slice(x, xl)?, None, |x, g, o| fastmath::scaled_sin_f32(x, g, o, scale))),
        (CpuStorage::F32(x), Some((CpuStorage::F32(g), gl))) => CpuStorage::F32(run(slice(x, xl)?, Some(slice(g, gl)?), |x, g, o| {
            fastmath::scaled_sin_f32(x, g, o, scale)
        })),
        (CpuStorage::F64(x), None) => CpuStorage::F64(run(slice(x, xl)?, None, |x, g, o| fastmath::scaled_sin_f64(x, g, o, scale))),
        (CpuStorage::F64(x), Some((CpuStorage::F64(g), gl))) => CpuStorage::F64(run(slice(x, xl)?, Some(slice(g, gl)?), |x, g, o| {
            fastmath::scaled_sin_f64(x, g, o, scale)
        })),
        _ => candle_core::bail!("scaled sin: matching f32 or f64 tensors expected"),
    })
}

impl CustomOp1 for ScaledSin {
    fn name(&self) -> &'static str {
        "bnn-scaled-sin"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((scaled_sin_cpu((s, l), None, self.0)?, l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if arg.device().is_cpu() && arg.dtype() == grad.dtype() {
            Ok(Some(
                arg.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &ScaledSinGrad(self.0))?,
            ))
        } else {
            Ok(Some((grad.mul(&arg.detach().cos()?)? * self.0)?))
        }
    }
}

/// `grad * scale * cos(x)`, the backward of [`ScaledSin`].
struct ScaledSinGrad(f64);

impl CustomOp2 for ScaledSinGrad {
    fn name(&self) -> &'static str {
        "bnn-scaled-sin-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("scaled sin backward: shapes {:?} and {:?} differ", l1.shape(), l2.shape());
        }
        Ok((scaled_sin_cpu((s1, l1), Some((s2, l2)), self.0)?, l1.shape().clone()))
    }
}

/// A binarised activation with FDA's noise adaptation (Sec. 3.2) in one pass:
/// `Q(x) + a (e_fc + 0.1 sin x)`, where `e_fc = FC2(ReLU(FC1(x)))` is the module's FC path.
/// Backward: `dx = g (Q'(x) + 0.1 a cos x)` and `de_fc = a g`. CPU custom op for `f32`/`f64`,
/// tensor ops elsewhere.
pub fn noisy_binary_activation(x: &Tensor, e_fc: &Tensor, q: Quantizer, a: f64) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.dtype() == e_fc.dtype() {
        x.contiguous()?.apply_op2(&e_fc.contiguous()?, ActNoise { q, a })
    } else {
        q.apply(x)? + ((e_fc + scaled_sin(x, 0.1)?)? * a)?
    }
}

struct ActNoise {
    q: Quantizer,
    a: f64,
}

/// `f(x_chunk, y_chunk, out_chunk)` over matching chunks of two contiguous storages of one
/// float type, rayon-parallel.
fn par_map2(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    what: &str,
    f32_fn: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
    f64_fn: impl Fn(&[f64], &[f64], &mut [f64]) + Sync,
) -> Result<CpuStorage> {
    fn run<T: Copy + Send + Sync + Default>(x: &[T], y: &[T], f: impl Fn(&[T], &[T], &mut [T]) + Sync) -> Vec<T> {
        const CHUNK: usize = 1 << 14;
        let mut out = vec![T::default(); x.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
            .for_each(|(o, (x, y))| f(x, y, o));
        out
    }
    if l1.shape() != l2.shape() {
        candle_core::bail!("{what}: shapes {:?} and {:?} differ", l1.shape(), l2.shape());
    }
    let msg = || candle_core::Error::Msg(format!("{what}: contiguous tensors expected"));
    let (a1, b1) = l1.contiguous_offsets().ok_or_else(msg)?;
    let (a2, b2) = l2.contiguous_offsets().ok_or_else(msg)?;
    Ok(match (s1, s2) {
        (CpuStorage::F32(x), CpuStorage::F32(y)) => CpuStorage::F32(run(&x[a1..b1], &y[a2..b2], f32_fn)),
        (CpuStorage::F64(x), CpuStorage::F64(y)) => CpuStorage::F64(run(&x[a1..b1], &y[a2..b2], f64_fn)),
        _ => candle_core::bail!("{what}: matching f32 or f64 tensors expected"),
    })
}

impl CustomOp2 for ActNoise {
    fn name(&self) -> &'static str {
        "bnn-noisy-binary-activation"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = self.a;
        let out = par_map2(
            (s1, l1),
            (s2, l2),
            "noisy binary activation",
            |x, e, o| fastmath::act_noise_fwd_f32(x, e, o, a),
            |x, e, o| fastmath::act_noise_fwd_f64(x, e, o, a),
        )?;
        Ok((out, l1.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _e: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let de = (grad * self.a)?;
        let dx = if x.device().is_cpu() && x.dtype() == grad.dtype() {
            x.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &ActNoiseGrad { q: self.q, a: self.a })?
        } else {
            let x = x.detach();
            grad.mul(&(self.q.grad_tensor(&x)? + (x.cos()? * (0.1 * self.a))?)?)?
        };
        Ok((Some(dx), Some(de)))
    }
}

/// `g (Q'(x) + 0.1 a cos x)`, the input gradient of [`ActNoise`].
struct ActNoiseGrad {
    q: Quantizer,
    a: f64,
}

impl CustomOp2 for ActNoiseGrad {
    fn name(&self) -> &'static str {
        "bnn-noisy-binary-activation-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (q, a) = (self.q, self.a);
        let out = par_map2(
            (s1, l1),
            (s2, l2),
            "noisy binary activation backward",
            |x, g, o| fastmath::act_noise_grad_f32(x, g, o, q, a),
            |x, g, o| fastmath::act_noise_grad_f64(x, g, o, q, a),
        )?;
        Ok((out, l1.shape().clone()))
    }
}

/// Options of a binary layer.
#[derive(Clone)]
pub struct BinaryOptions {
    pub control: Arc<BinaryControl>,
    /// Scale binary weights by the per-output-channel mean |W| (detached).
    pub scale_weights: bool,
    /// Build FDA's noise adaptation modules (used in training while the noise weight is > 0).
    pub noise: bool,
    /// Hidden width ratio of the noise modules (64).
    pub noise_ratio: usize,
    /// Binarise the layer's input (false: weights-only binarisation, W1A32).
    pub binarize_input: bool,
}

impl BinaryOptions {
    pub fn new(control: Arc<BinaryControl>) -> Self {
        Self {
            control,
            scale_weights: true,
            noise: false,
            noise_ratio: 64,
            binarize_input: true,
        }
    }
}

/// A map from full-precision weights to the weights that get binarised (LNS's `f_theta`).
pub trait WeightMapper: Send + Sync {
    fn map(&self, w: &Tensor, train: bool) -> Result<Tensor>;
}

/// Binarised weights `alpha * (Q(W) + a e(W))` with `alpha` per output channel (dim 0).
fn binary_weight(w: &Tensor, src: &Tensor, q: Quantizer, noise: Option<(&NoiseAdaptation, f64)>, scale: bool) -> Result<Tensor> {
    let mut bw = q.apply(src)?;
    if let Some((m, a)) = noise {
        let o = src.dims()[0];
        let e = m.forward(&src.reshape((o, ()))?)?.reshape(src.dims())?;
        bw = (bw + (e * a)?)?;
    }
    if scale {
        let o = w.dims()[0];
        let mut sdims = vec![1usize; w.rank()];
        sdims[0] = o;
        bw = bw.broadcast_mul(&weight_scale(w)?.reshape(sdims)?)?;
    }
    Ok(bw)
}

/// The per-output-channel weight scale `alpha_o = mean |W_o|` (detached), shape `[O]`. The
/// inference engine's export calls this same function, so its scales are bit-identical to the
/// ones the candle forward pass uses.
pub fn weight_scale(w: &Tensor) -> Result<Tensor> {
    let o = w.dims()[0];
    w.detach().abs()?.reshape((o, ()))?.mean_keepdim(1)?.reshape(o)
}

/// A binary convolution: `conv(Q(x) [+ a e_a(x)], alpha * (Q(W) [+ a e_w(W)])) + b`.
pub struct BinaryConv2d {
    pub weight: Var,
    pub bias: Option<Var>,
    pub config: Conv2dConfig,
    opts: BinaryOptions,
    weight_noise: Option<NoiseAdaptation>,
    act_noise: Option<NoiseAdaptation>,
    mapper: Mutex<Option<Arc<dyn WeightMapper>>>,
    name: String,
}

impl BinaryConv2d {
    /// He initialisation (fan-out), like nn-core's `Conv2d`, so a binary and a float model with
    /// the same seed start from the same latent weights.
    pub fn new(vp: &VarPath, config: Conv2dConfig, opts: BinaryOptions) -> Result<Self> {
        config.validate()?;
        let weight = vp.param("weight", &config.weight_dims(), Init::KAIMING_RELU_FAN_OUT, ParamKind::Weight)?;
        let bias = if config.bias {
            Some(vp.param("bias", &[config.out_channels], Init::ZEROS, ParamKind::Bias)?)
        } else {
            None
        };
        let (weight_noise, act_noise) = if opts.noise {
            let [_, i, kh, kw] = config.weight_dims();
            (
                Some(NoiseAdaptation::new(&vp.pp("weight_noise"), i * kh * kw, opts.noise_ratio)?),
                if opts.binarize_input {
                    Some(NoiseAdaptation::new(&vp.pp("act_noise"), config.in_channels, opts.noise_ratio)?)
                } else {
                    None
                },
            )
        } else {
            (None, None)
        };
        Ok(Self {
            weight,
            bias,
            config,
            opts,
            weight_noise,
            act_noise,
            mapper: Mutex::new(None),
            name: vp.prefix().to_string(),
        })
    }

    /// Binarises `mapper(W)` instead of `W` from now on (LNS).
    pub fn set_mapper(&self, mapper: Option<Arc<dyn WeightMapper>>) {
        *self.mapper.lock().unwrap_or_else(|e| e.into_inner()) = mapper;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether FDA's noise modules exist on this layer.
    pub fn has_noise_modules(&self) -> bool {
        self.weight_noise.is_some()
    }

    /// The binarised, scaled weight used by the forward pass (`train` selects the noise path).
    pub fn effective_weight(&self, train: bool) -> Result<Tensor> {
        let q = self.opts.control.quantizer();
        let a = self.opts.control.noise_weight();
        let w = self.weight.as_tensor();
        let mapper = self.mapper.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let src = match mapper {
            Some(m) => m.map(w, train)?,
            None => w.clone(),
        };
        let noise = match (&self.weight_noise, train && a > 0.0) {
            (Some(m), true) => Some((m, a)),
            _ => None,
        };
        binary_weight(w, &src, q, noise, self.opts.scale_weights)
    }
}

impl ModuleT for BinaryConv2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let q = self.opts.control.quantizer();
        let a = self.opts.control.noise_weight();
        // Evaluation (no noise) computes `conv(Q(x), Q(W)) * alpha` rather than
        // `conv(Q(x), alpha Q(W))`: the same value mathematically, but the convolution of
        // +-1/0 values is an exact integer in f32 (for K < 2^24), so the result is rounded once
        // per output, independent of the convolution's summation order, exactly as the packed
        // inference engine computes it (`dot * alpha`). Training keeps the scaled weights.
        let eval_scale = !train && self.opts.scale_weights;
        let (bw, alpha) = if eval_scale {
            let mapper = self.mapper.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let w = self.weight.as_tensor();
            let src = match mapper {
                Some(m) => m.map(w, false)?,
                None => w.clone(),
            };
            (q.apply(&src)?, Some(weight_scale(w)?))
        } else {
            (self.effective_weight(train)?, None)
        };
        let bx = if self.opts.binarize_input {
            match (&self.act_noise, train && a > 0.0) {
                (Some(m), true) => noisy_binary_activation(x, &m.fc_path_channels(x)?, q, a)?,
                _ => q.apply(x)?,
            }
        } else {
            x.clone()
        };
        let y = nn_core::layers::conv::conv2d(&bx, &bw, &self.config)?;
        let y = match alpha {
            Some(s) => y.broadcast_mul(&s.reshape((1, self.config.out_channels, 1, 1))?)?,
            None => y,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.as_tensor().reshape((1, self.config.out_channels, 1, 1))?)?,
            None => y,
        };
        if summary::is_recording() {
            let (oh, ow) = (y.dims()[2], y.dims()[3]);
            let ops = self.config.macs(oh, ow);
            summary::record(|| LayerStat {
                name: self.name.clone(),
                kind: "BinaryConv2d".into(),
                out_shape: y.dims().to_vec(),
                // the per-channel scales are stored as floats at inference
                params: self.bias.as_ref().map_or(0, |b| b.elem_count())
                    + if self.opts.scale_weights { self.config.out_channels } else { 0 },
                binary_params: self.weight.elem_count(),
                macs: if self.opts.binarize_input { 0 } else { ops },
                binary_ops: if self.opts.binarize_input { ops } else { 0 },
                ..Default::default()
            });
        }
        Ok(y)
    }
}

/// A binary fully connected layer over the last dimension: `Q(x) (alpha * Q(W))^T + b`.
pub struct BinaryLinear {
    pub weight: Var,
    pub bias: Option<Var>,
    opts: BinaryOptions,
    weight_noise: Option<NoiseAdaptation>,
    act_noise: Option<NoiseAdaptation>,
    name: String,
}

impl BinaryLinear {
    pub fn new(vp: &VarPath, in_features: usize, out_features: usize, bias: bool, opts: BinaryOptions) -> Result<Self> {
        let weight = vp.param("weight", &[out_features, in_features], Init::TORCH_DEFAULT, ParamKind::Weight)?;
        let bias = if bias {
            Some(vp.param("bias", &[out_features], Init::ZEROS, ParamKind::Bias)?)
        } else {
            None
        };
        let (weight_noise, act_noise) = if opts.noise {
            (
                Some(NoiseAdaptation::new(&vp.pp("weight_noise"), in_features, opts.noise_ratio)?),
                Some(NoiseAdaptation::new(&vp.pp("act_noise"), in_features, opts.noise_ratio)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            weight,
            bias,
            opts,
            weight_noise,
            act_noise,
            name: vp.prefix().to_string(),
        })
    }
}

impl ModuleT for BinaryLinear {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let q = self.opts.control.quantizer();
        let a = self.opts.control.noise_weight();
        let w = self.weight.as_tensor();
        let noise = match (&self.weight_noise, train && a > 0.0) {
            (Some(m), true) => Some((m, a)),
            _ => None,
        };
        let bw = binary_weight(w, w, q, noise, self.opts.scale_weights)?;
        let bx = if self.opts.binarize_input {
            match (&self.act_noise, train && a > 0.0) {
                (Some(m), true) => noisy_binary_activation(x, &m.fc_path(x)?, q, a)?,
                _ => q.apply(x)?,
            }
        } else {
            x.clone()
        };
        let (o, i) = (w.dims()[0], w.dims()[1]);
        let dims = bx.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = bx.reshape((rows, i))?.matmul(&bw.t()?)?;
        let mut out = dims.clone();
        *out.last_mut().expect("rank >= 1") = o;
        let y = y.reshape(out)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b.as_tensor())?,
            None => y,
        };
        if summary::is_recording() {
            let tokens: usize = dims[1..dims.len() - 1].iter().product::<usize>().max(1);
            let ops = (tokens * i * o) as u64;
            summary::record(|| LayerStat {
                name: self.name.clone(),
                kind: "BinaryLinear".into(),
                out_shape: y.dims().to_vec(),
                params: self.bias.as_ref().map_or(0, |b| b.elem_count()) + if self.opts.scale_weights { o } else { 0 },
                binary_params: o * i,
                macs: if self.opts.binarize_input { 0 } else { ops },
                binary_ops: if self.opts.binarize_input { ops } else { 0 },
                ..Default::default()
            });
        }
        Ok(y)
    }
}

/// PReLU with one learnable slope per channel (dim 1), initialised to 0.25:
/// `max(x, 0) + a min(x, 0)`.
pub struct PRelu {
    pub weight: Var,
    name: String,
}

impl PRelu {
    pub fn new(vp: &VarPath, channels: usize) -> Result<Self> {
        Ok(Self {
            weight: vp.param("weight", &[channels], Init::Const(0.25), ParamKind::NormWeight)?,
            name: vp.prefix().to_string(),
        })
    }
}

impl ModuleT for PRelu {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let y = nn_core::ops::channel::prelu(x, self.weight.as_tensor())?;
        if summary::is_recording() {
            summary::record(|| LayerStat {
                name: self.name.clone(),
                kind: "PReLU".into(),
                out_shape: y.dims().to_vec(),
                params: self.weight.elem_count(),
                ..Default::default()
            });
        }
        Ok(y)
    }
}

/// A learnable per-channel shift (ReAct-Net's "move"), zero-initialised.
pub struct LearnableBias {
    pub bias: Var,
    name: String,
}

impl LearnableBias {
    pub fn new(vp: &VarPath, channels: usize) -> Result<Self> {
        Ok(Self {
            bias: vp.param("bias", &[channels], Init::ZEROS, ParamKind::Bias)?,
            name: vp.prefix().to_string(),
        })
    }
}

impl ModuleT for LearnableBias {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let y = nn_core::ops::channel::bias_add(x, self.bias.as_tensor())?;
        if summary::is_recording() {
            summary::record(|| LayerStat {
                name: self.name.clone(),
                kind: "LearnableBias".into(),
                out_shape: y.dims().to_vec(),
                params: self.bias.elem_count(),
                ..Default::default()
            });
        }
        Ok(y)
    }
}

/// RPReLU (ReActNet, Liu et al. 2020, Eq. (3)): shift, per-channel PReLU, shift.
pub struct RPRelu {
    shift_in: LearnableBias,
    prelu: PRelu,
    shift_out: LearnableBias,
}

impl RPRelu {
    pub fn new(vp: &VarPath, channels: usize) -> Result<Self> {
        Ok(Self {
            shift_in: LearnableBias::new(&vp.pp("shift_in"), channels)?,
            prelu: PRelu::new(&vp.pp("prelu"), channels)?,
            shift_out: LearnableBias::new(&vp.pp("shift_out"), channels)?,
        })
    }
}

impl ModuleT for RPRelu {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.shift_in.forward_t(x, train)?;
        let y = self.prelu.forward_t(&y, train)?;
        self.shift_out.forward_t(&y, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use nn_core::VarStore;

    #[test]
    fn scaled_sin_op_matches_tensor_ops_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let xs: Vec<f64> = (-400..400).map(|i| i as f64 * 0.173 + 0.01).collect();
        let x = Var::from_tensor(&Tensor::new(xs.as_slice(), &dev)?.reshape((20, 40))?)?;
        // a non-contiguous input and a non-uniform upstream gradient
        let xt = x.as_tensor().t()?;
        let w = Tensor::arange(0f64, 800.0, &dev)?.reshape((40, 20))?.affine(0.01, -3.0)?;
        let y = scaled_sin(&xt, 0.1)?;
        let g = y.mul(&w)?.sum_all()?.backward()?;
        let got = g.get(x.as_tensor()).unwrap().t()?;
        let want_y = (xt.sin()? * 0.1)?;
        let want_g = (xt.cos()? * 0.1)?.mul(&w)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f64> { (a - b)?.abs()?.max_all()?.to_scalar::<f64>() };
        assert!(max_diff(&y, &want_y)? < 1e-13);
        assert!(max_diff(&got, &want_g)? < 1e-13);
        // central differences of the op itself
        let h = 1e-6;
        let yp = scaled_sin(&(&xt + h)?, 0.1)?;
        let ym = scaled_sin(&(&xt - h)?, 0.1)?;
        let fd = ((yp - ym)? / (2.0 * h))?.mul(&w)?;
        assert!(max_diff(&fd, &got)? < 1e-7);
        // f32 goes through the same kernel
        let x32 = xt.to_dtype(DType::F32)?;
        let y32 = scaled_sin(&x32, 0.1)?.to_dtype(DType::F64)?;
        assert!(max_diff(&y32, &(x32.to_dtype(DType::F64)?.sin()? * 0.1)?)? < 1e-8);
        Ok(())
    }

    #[test]
    fn fused_noisy_activation_matches_the_composed_form() -> Result<()> {
        let dev = Device::Cpu;
        // max |a - b| relative to max |b|
        let rel_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            Ok(d / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30))
        };
        let vs = VarStore::new(5, &dev);
        let m = NoiseAdaptation::new(&vs.root().pp("n"), 16, 64)?;
        let w = Tensor::randn(0f32, 1.0, (2, 16, 3, 5), &dev)?;
        for q in [
            Quantizer::FDA,
            Quantizer::Fda { omega: 0.1, n: 18 },
            Quantizer::STE,
            Quantizer::ApproxSign,
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.5, (2, 16, 3, 5), &dev)?)?;
            let e = m.fc_path_channels(x.as_tensor())?;
            // the 1x1-convolution FC path equals the channels-last linear layers
            let e_lin = m.fc_path(&x.as_tensor().permute((0, 2, 3, 1))?)?.permute((0, 3, 1, 2))?;
            assert!(rel_diff(&e, &e_lin)? < 1e-5);
            let fused = noisy_binary_activation(x.as_tensor(), &e, q, 0.07)?;
            let composed = (q.apply_generic(x.as_tensor())? + ((&e_lin + (x.as_tensor().sin()? * 0.1)?)? * 0.07)?)?;
            assert!(rel_diff(&fused, &composed)? < 1e-6, "{q:?} forward");
            let gf = fused.mul(&w)?.sum_all()?.backward()?;
            let gc = composed.mul(&w)?.sum_all()?.backward()?;
            let vars: Vec<Var> = vs.trainable().into_iter().map(|v| v.var).chain([x.clone()]).collect();
            assert_eq!(vars.len(), 3);
            for v in &vars {
                let (a, b) = (gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
                assert!(rel_diff(a, b)? < 1e-5, "{q:?} gradient of a {:?} tensor", v.dims());
                assert!(a.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
            }
        }
        Ok(())
    }

    #[test]
    fn schedule_follows_the_reimplementation() {
        let s = FdaSchedule::default();
        assert_eq!(s.n_at(0.0), 9);
        assert_eq!(s.n_at(0.5), 13);
        assert_eq!(s.n_at(1.0), 18);
        assert!((s.noise_at(0.0) - 0.1).abs() < 1e-12);
        assert!((s.noise_at(0.5) - 0.05).abs() < 1e-12);
        assert!(s.noise_at(1.0).abs() < 1e-12);
        let c = BinaryControl::new(Quantizer::FDA, s);
        c.set_epoch(399, 400);
        assert_eq!(c.quantizer(), Quantizer::Fda { omega: 0.1, n: 17 });
        assert!(c.noise_weight().abs() < 1e-12);
    }

    #[test]
    fn conv_forward_is_scaled_sign_conv_and_noise_is_training_only() -> Result<()> {
        let dev = Device::Cpu;
        let vs = VarStore::new(3, &dev);
        let control = BinaryControl::new(Quantizer::FDA, FdaSchedule::default());
        let mut o = BinaryOptions::new(control.clone());
        o.noise = true;
        let layer = BinaryConv2d::new(&vs.root().pp("c"), Conv2dConfig::new(4, 6, 3), o)?;
        assert!(layer.has_noise_modules());
        let x = Tensor::randn(0f32, 1.0, (2, 4, 5, 5), &dev)?;
        // eval: exactly conv(sign(x), mean|W_o| sign(W))
        let w = layer.weight.as_tensor();
        let sw = ((w.ge(0f32)?.to_dtype(DType::F32)? * 2.0)? - 1.0)?;
        let scale = w.abs()?.mean_keepdim(3)?.mean_keepdim(2)?.mean_keepdim(1)?;
        let sx = ((x.ge(0f32)?.to_dtype(DType::F32)? * 2.0)? - 1.0)?;
        let want = nn_core::layers::conv::conv2d(&sx, &sw.broadcast_mul(&scale)?, &layer.config)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        let eval = layer.forward_t(&x, false)?;
        assert!(diff(&eval, &want)? < 1e-5);
        // training with noise weight > 0: differs; with weight 0: identical to eval
        let train = layer.forward_t(&x, true)?;
        assert!(diff(&train, &want)? > 1e-3, "noise module must act in training");
        control.set(9, 0.0);
        assert!(diff(&layer.forward_t(&x, true)?, &want)? < 1e-5);
        Ok(())
    }
}
