//! Operations along the last dimension as single-pass, multi-threaded CPU kernels with
//! backward: softmax, layer normalisation and exact (erf) GELU.
//!
//! # Why
//! candle composes each of these from primitive ops: softmax is 5 passes over the data (max,
//! subtract, exp, sum, divide), layer normalisation 8, the bias add one broadcast pass, and every
//! pass is single-threaded, allocates its output and, for `exp`/`erf`, calls the scalar libm
//! function per element. In a ViT-Ti block at batch 16 on this project's 2-core machine these
//! took 9.6 ms (softmax), 6.3 ms (GELU) and 3 ms (LayerNorm) next to 2-16 ms per matrix product
//! (`cargo run --release -p vit-survey-zoo --example block_profile`). Here each forward is one
//! pass per row, rows are split over rayon's threads, and the row kernels are compiled twice,
//! for baseline x86-64 and for AVX2+FMA (selected at run time, `elem::dispatch!`), with vectorisable
//! `exp` and `erfc`:
//! - `exp`: Cody-Waite range reduction `x = n ln 2 + r`, the Cephes degree-6 polynomial on
//!   `|r| <= ln 2 / 2` and `2^n` built in the exponent bits (about 1 ulp; inputs clamped to
//!   `[-87.3, 88.3]`, so results below `f32::MIN_POSITIVE` flush to it).
//! - GELU forward: `Phi(x) = 1/2 + x P(x^2) / Q(x^2)` on `|x| <= 5.3` (clamped beyond, where
//!   `Phi` is within 6e-8 of 0 or 1), `P` and `Q` of degree 5, fitted for this project (near
//!   minimax, Lawson-weighted linearised least squares in f64). No `exp`, one division: 16
//!   operations per vector against about 40 for the `erfc` route below. Absolute error of `Phi`
//!   below 2.5e-7 (f32 rounding; the fit itself is within 5e-9), the accuracy class of
//!   PyTorch's vectorised `erf` (absolute, not relative, in the negative tail; tested).
//! - `erfc` (GELU backward): the Chebyshev fit of Numerical Recipes (`erfcc`, fractional error
//!   below 1.2e-7 for every argument), so that `Phi(x) = erfc(-x / sqrt 2) / 2` keeps its
//!   relative accuracy also in the negative tail (within 2e-6 relative for `|x| <= 4`, 2e-5
//!   beyond, where the f32 rounding of `z^2` in `exp(-z^2 + ...)` dominates; tested).
//!
//! # Backward
//! Each backward is again one fused pass (softmax: `dx = y (g - sum(g y))`; GELU:
//! `dx = g (Phi(x) + x phi(x))`; layer normalisation: `dx = rstd (g gamma - mean(g gamma) -
//! xhat mean(g gamma xhat))`, with `dgamma`, `dbeta` the row sums of `g xhat` and `g`).
//!
//! # Devices and dtypes
//! The fused kernels run for `f32` on CPU; other dtypes and devices use the composed candle
//! forms in [`crate::layers::functional`], which have the same gradients.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::ops::elem::{contiguous, dispatch};
use rayon::prelude::*;

/// Rows per parallel task: at least this many elements per task.
const MIN_TASK: usize = 1 << 14;

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

/// Rows per parallel chunk for rows of length `d`.
fn rows_per_task(d: usize) -> usize {
    MIN_TASK.div_ceil(d).max(1)
}

fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 1
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 * 2^23`: adding it rounds an f32 of magnitude below `2^22` to an integer held in the
/// low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `a b + c`, one fused instruction when `F` (the AVX2+FMA build of a kernel), two otherwise
/// (`mul_add` without hardware FMA would call the slow software `fmaf`).
#[inline(always)]
fn fma<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Polynomial for `e^r - 1 - r` over `r^2` on the reduced range of [`exp_f32`] (Horner order).
const EXP_LEAD: f32 = 1.987_569_1e-4;
const EXP_COEFFS: [f32; 5] = [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// `e^x` (about 1 ulp), branch-free so that loops over it vectorise.
#[inline(always)]
fn exp_f32<const F: bool>(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let t = fma::<F>(x, LOG2E, ROUND_MAGIC);
    let n = t - ROUND_MAGIC;
    let r = fma::<F>(-n, LN2_LO, fma::<F>(-n, LN2_HI, x));
    let mut p = EXP_LEAD;
    for c in EXP_COEFFS {
        p = fma::<F>(p, r, c);
    }
    let y = fma::<F>(p, r * r, r) + 1.0;
    // 2^n from the integer in t's low bits
    let ni = t.to_bits().wrapping_sub(ROUND_MAGIC.to_bits()) as i32;
    y * f32::from_bits(((ni + 127) as u32) << 23)
}

/// Leading coefficient and the rest (Horner order) of the polynomial in `t` of [`erfc_pos`].
const ERFC_LEAD: f32 = 0.170_872_77;
const ERFC_COEFFS: [f32; 9] = [
    -0.822_152_23,
    1.488_515_9,
    -1.135_204,
    0.278_868_07,
    -0.186_288_06,
    0.096_784_18,
    0.374_091_96,
    1.000_023_7,
    -1.265_512_2,
];

/// `erfc(z)` for `z >= 0` (Numerical Recipes' `erfcc`, fractional error below 1.2e-7).
#[inline(always)]
fn erfc_pos<const F: bool>(z: f32) -> f32 {
    let t = 1.0 / fma::<F>(0.5, z, 1.0);
    let mut p = ERFC_LEAD;
    for c in ERFC_COEFFS {
        p = fma::<F>(p, t, c);
    }
    t * exp_f32::<F>(fma::<F>(-z, z, p))
}

/// The standard normal CDF `Phi(x) = erfc(-x / sqrt 2) / 2`.
#[inline(always)]
fn normal_cdf<const F: bool>(x: f32) -> f32 {
    let half_tail = 0.5 * erfc_pos::<F>(x.abs() * std::f32::consts::FRAC_1_SQRT_2);
    if x < 0.0 {
        half_tail
    } else {
        1.0 - half_tail
    }
}

/// Clamp of [`normal_cdf_rational`]: `1 - Phi(5.3)` is 5.8e-8, below half an f32 ulp of 1.
const PHI_CLAMP: f32 = 5.3;
/// Numerator of [`normal_cdf_rational`] in `s = x^2`, Horner order (the constant term is
/// `1 / sqrt(2 pi)`, the slope of `Phi` at 0).
const PHI_P: [f32; 6] = [
    2.405_003_3e-8,
    6.379_056_2e-6,
    1.603_361_5e-4,
    4.628_002_6e-3,
    3.293_595_8e-2,
    3.989_422_6e-1,
];
/// Denominator of [`normal_cdf_rational`] in `s = x^2` without its constant term 1, Horner order.
const PHI_Q: [f32; 5] = [1.237_160_2e-6, 7.135_277e-5, 1.836_580_6e-3, 2.813_892_1e-2, 2.492_244_4e-1];

/// `Phi(x) = 1/2 + x P(x^2) / Q(x^2)`, `x` clamped to `[-5.3, 5.3]`: absolute error below
/// 2.5e-7, branch-free (the GELU forward; see the module docs).
#[inline(always)]
fn normal_cdf_rational<const F: bool>(x: f32) -> f32 {
    let u = x.clamp(-PHI_CLAMP, PHI_CLAMP);
    let s = u * u;
    let mut p = PHI_P[0];
    for c in &PHI_P[1..] {
        p = fma::<F>(p, s, *c);
    }
    let mut q = PHI_Q[0];
    for c in &PHI_Q[1..] {
        q = fma::<F>(q, s, *c);
    }
    q = fma::<F>(q, s, 1.0);
    fma::<F>(u, p / q, 0.5)
}

/// GELU forward of one value, `x Phi(x)` with [`normal_cdf_rational`] (also used by the fused
/// depthwise convolution + GELU of `depthwise_tokens`).
#[inline(always)]
pub(crate) fn gelu_f32<const F: bool>(x: f32) -> f32 {
    x * normal_cdf_rational::<F>(x)
}

/// Elements per block of the block-wise (stage-interleaved) kernels below: four AVX2 vectors.
const BLOCK: usize = 32;

/// [`exp_f32`] of every element of a block, one stage at a time over the whole block.
///
/// Why blocks: one element's `exp`/`erfc` is a chain of ~25 dependent floating-point
/// operations. A loop that runs each vector's chain to the end keeps only about one chain in
/// the CPU's floating-point scheduler, so it waits on latencies; running each stage over four
/// vectors before the next stage gives four independent operations at every step (the GELU
/// forward took 1.52-1.61 -> 1.28-1.36 ns per element on one thread, `cargo run --release -p
/// nn-core --example rowwise_speed`; blocks of 16 gained nothing, of 64 no more than 32).
#[inline(always)]
fn exp_block<const F: bool>(x: &mut [f32; BLOCK]) {
    let mut t = [0f32; BLOCK];
    let mut r = [0f32; BLOCK];
    for i in 0..BLOCK {
        x[i] = x[i].clamp(-87.3, 88.3);
        t[i] = fma::<F>(x[i], LOG2E, ROUND_MAGIC);
        let n = t[i] - ROUND_MAGIC;
        r[i] = fma::<F>(-n, LN2_LO, fma::<F>(-n, LN2_HI, x[i]));
    }
    let mut p = [EXP_LEAD; BLOCK];
    for c in EXP_COEFFS {
        for i in 0..BLOCK {
            p[i] = fma::<F>(p[i], r[i], c);
        }
    }
    for i in 0..BLOCK {
        let y = fma::<F>(p[i], r[i] * r[i], r[i]) + 1.0;
        let ni = t[i].to_bits().wrapping_sub(ROUND_MAGIC.to_bits()) as i32;
        x[i] = y * f32::from_bits(((ni + 127) as u32) << 23);
    }
}

/// [`normal_cdf`] of every element of a block, stage by stage (see [`exp_block`]).
#[inline(always)]
fn normal_cdf_block<const F: bool>(x: &[f32; BLOCK]) -> [f32; BLOCK] {
    let mut z = [0f32; BLOCK];
    let mut t = [0f32; BLOCK];
    for i in 0..BLOCK {
        z[i] = x[i].abs() * std::f32::consts::FRAC_1_SQRT_2;
        t[i] = 1.0 / fma::<F>(0.5, z[i], 1.0);
    }
    let mut p = [ERFC_LEAD; BLOCK];
    for c in ERFC_COEFFS {
        for i in 0..BLOCK {
            p[i] = fma::<F>(p[i], t[i], c);
        }
    }
    for i in 0..BLOCK {
        p[i] = fma::<F>(-z[i], z[i], p[i]);
    }
    exp_block::<F>(&mut p);
    let mut out = [0f32; BLOCK];
    for i in 0..BLOCK {
        let half_tail = 0.5 * (t[i] * p[i]);
        out[i] = if x[i] < 0.0 { half_tail } else { 1.0 - half_tail };
    }
    out
}

/// Sum with eight independent accumulators (vectorises; the order differs from a serial sum).
#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let tail: f32 = it.remainder().iter().sum();
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Maximum with eight independent accumulators (NaN-free input assumed by the callers' result:
/// a NaN anywhere in the row makes the softmax row NaN through the exponentials anyway).
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let m = it.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    acc.iter().fold(m, |m, &v| if v > m { v } else { m })
}

/// An output buffer of `n` values that every kernel here overwrites completely before reading
/// it. Not zero-filled: on this project's machine zero-filling a fresh 10 MB buffer cost as
/// much as the GELU kernel that then overwrites it (these kernels are memory-bound).
#[allow(clippy::uninit_vec)]
fn output(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns and no drop; each caller writes every element
    // (each row kernel assigns its whole output row before reading any of it).
    unsafe { v.set_len(n) };
    v
}

/// Maps `f` over `(input rows, output rows)` chunks in parallel.
fn par_rows(x: &[f32], d: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut y = output(x.len());
    let chunk = rows_per_task(d) * d;
    y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(o, i)| f(i, o));
    y
}

/// Like [`par_rows`] with a second input of the same shape.
fn par_rows2(a: &[f32], b: &[f32], d: usize, f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut y = output(a.len());
    let chunk = rows_per_task(d) * d;
    y.par_chunks_mut(chunk)
        .zip(a.par_chunks(chunk).zip(b.par_chunks(chunk)))
        .for_each(|(o, (a, b))| f(a, b, o));
    y
}

fn check_same(l1: &Layout, l2: &Layout, what: &str) -> Result<()> {
    if l1.shape() != l2.shape() {
        candle_core::bail!("{what}: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// softmax

/// In place, `y = softmax(y)` of one row: max, shifted exponentials, normalisation.
#[inline(always)]
fn softmax_row_inplace<const F: bool>(y: &mut [f32]) {
    let m = max_lanes(y);
    for o in y.iter_mut() {
        *o = exp_f32::<F>(*o - m);
    }
    let inv = 1.0 / sum_lanes(y);
    y.iter_mut().for_each(|o| *o *= inv);
}

dispatch! {
    /// Softmax of each row of `d` values.
    fn softmax_rows(xs: &[f32], ys: &mut [f32], d: usize) {
        for (x, y) in xs.chunks_exact(d).zip(ys.chunks_exact_mut(d)) {
            y.copy_from_slice(x);
            softmax_row_inplace::<FMA>(y);
        }
    }
}

dispatch! {
    /// `dx = y (g - sum(g y))` per row.
    fn softmax_grad_rows(ys: &[f32], gs: &[f32], out: &mut [f32], d: usize) {
        for ((y, g), o) in ys.chunks_exact(d).zip(gs.chunks_exact(d)).zip(out.chunks_exact_mut(d)) {
            for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                *o = y * g;
            }
            let dot = sum_lanes(o);
            for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                *o = y * (g - dot);
            }
        }
    }
}

dispatch! {
    /// In place, per row of `d` values: `y = softmax(scale * y + bias)`, `bias` holding rows of
    /// the same shape (or none): the score rows of [`crate::ops::attention`].
    pub(crate) fn scaled_softmax_rows_inplace(ys: &mut [f32], d: usize, scale: f32, bias: Option<&[f32]>) {
        for (r, y) in ys.chunks_exact_mut(d).enumerate() {
            match bias {
                Some(b) => {
                    for (o, &v) in y.iter_mut().zip(&b[r * d..(r + 1) * d]) {
                        *o = fma::<FMA>(*o, scale, v);
                    }
                }
                None => y.iter_mut().for_each(|o| *o *= scale),
            }
            softmax_row_inplace::<FMA>(y);
        }
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s, l, "softmax")?;
        let d = last_dim(l);
        let y = par_rows(x, d, |xs, ys| softmax_rows(xs, ys, d));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?))
    }
}

/// `dx = y (g - sum(g y))` per last-dimension row of `y` (the softmax output) and `g`.
pub(crate) struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        check_same(l1, l2, "softmax backward")?;
        let (y, g) = (
            contiguous::<f32>(s1, l1, "softmax backward")?,
            contiguous::<f32>(s2, l2, "softmax backward")?,
        );
        let d = last_dim(l1);
        let dx = par_rows2(y, g, d, |ys, gs, out| softmax_grad_rows(ys, gs, out, d));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Softmax over the last dimension, with gradients (fused kernels for CPU f32).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fast_path(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        crate::layers::functional::softmax_composed(x, x.rank() - 1)
    }
}

// ---------------------------------------------------------------------------------------------
// GELU

dispatch! {
    /// `y = x Phi(x)`, with the rational `Phi` ([`normal_cdf_rational`]).
    fn gelu_rows(xs: &[f32], ys: &mut [f32]) {
        for (y, &x) in ys.iter_mut().zip(xs) {
            *y = gelu_f32::<FMA>(x);
        }
    }
}

dispatch! {
    /// `dx = g (Phi(x) + x phi(x))`.
    fn gelu_grad_rows(xs: &[f32], gs: &[f32], out: &mut [f32]) {
        // 1 / sqrt(2 pi)
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        let mut xb = xs.chunks_exact(BLOCK);
        let mut gb = gs.chunks_exact(BLOCK);
        let mut ob = out.chunks_exact_mut(BLOCK);
        for ((x, g), o) in (&mut xb).zip(&mut gb).zip(&mut ob) {
            let x: &[f32; BLOCK] = x.try_into().expect("a block");
            let cdf = normal_cdf_block::<FMA>(x);
            let mut pdf = [0f32; BLOCK];
            for i in 0..BLOCK {
                pdf[i] = -0.5 * x[i] * x[i];
            }
            exp_block::<FMA>(&mut pdf);
            for i in 0..BLOCK {
                o[i] = g[i] * fma::<FMA>(x[i], INV_SQRT_2PI * pdf[i], cdf[i]);
            }
        }
        for ((o, &x), &g) in ob.into_remainder().iter_mut().zip(xb.remainder()).zip(gb.remainder()) {
            let pdf = INV_SQRT_2PI * exp_f32::<FMA>(-0.5 * x * x);
            *o = g * fma::<FMA>(x, pdf, normal_cdf::<FMA>(x));
        }
    }
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s, l, "gelu")?;
        let y = par_rows(x, 1, gelu_rows);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gelu_erf_backward(x, g)?))
    }
}

struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        check_same(l1, l2, "gelu backward")?;
        let (x, g) = (
            contiguous::<f32>(s1, l1, "gelu backward")?,
            contiguous::<f32>(s2, l2, "gelu backward")?,
        );
        let dx = par_rows2(x, g, 1, gelu_grad_rows);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `g (Phi(x) + x phi(x))`: the input gradient of GELU at `x` for the output gradient `g`
/// (CPU f32, same shapes).
pub(crate) fn gelu_erf_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &GeluGrad)
}

/// GELU with the exact normal CDF, `x Phi(x)` (PyTorch's `nn.GELU()`), with gradients (fused
/// kernels for CPU f32, candle's `gelu_erf` elsewhere).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if fast_path(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu_erf()
    }
}

// ---------------------------------------------------------------------------------------------
// layer normalisation

/// `(mean, 1 / sqrt(var + eps))` of a row, two passes (the centred second pass keeps the
/// variance accurate for rows with a large mean).
#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = sum_lanes(x) / d;
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v - mean) * (v - mean);
        }
    }
    let tail: f32 = it.remainder().iter().map(|&v| (v - mean) * (v - mean)).sum();
    let var = (acc.iter().sum::<f32>() + tail) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

dispatch! {
    /// `(x - mean) rstd gamma + beta` per row of `gamma.len()` values.
    fn layer_norm_rows(xs: &[f32], ys: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let d = gamma.len();
        for (x, y) in xs.chunks_exact(d).zip(ys.chunks_exact_mut(d)) {
            let (mean, rstd) = moments(x, eps);
            for (((o, &v), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
                *o = (v - mean) * rstd * g + b;
            }
        }
    }
}

dispatch! {
    /// `dx = rstd (h - mean(h) - xhat mean(h xhat))` with `h = g gamma`, per row.
    fn layer_norm_grad_rows(xs: &[f32], gs: &[f32], gamma: &[f32], out: &mut [f32], eps: f32) {
        let d = gamma.len();
        for ((x, g), o) in xs.chunks_exact(d).zip(gs.chunks_exact(d)).zip(out.chunks_exact_mut(d)) {
            let (mean, rstd) = moments(x, eps);
            // o holds h = g gamma first, then dx
            for ((h, &gv), &gm) in o.iter_mut().zip(g).zip(gamma) {
                *h = gv * gm;
            }
            let m1 = sum_lanes(o) / d as f32;
            let mut acc = [0f32; 8];
            let (mut hc, mut xc) = (o.chunks_exact(8), x.chunks_exact(8));
            for (h8, x8) in (&mut hc).zip(&mut xc) {
                for ((a, &h), &v) in acc.iter_mut().zip(h8).zip(x8) {
                    *a += h * (v - mean);
                }
            }
            let tail: f32 = hc.remainder().iter().zip(xc.remainder()).map(|(&h, &v)| h * (v - mean)).sum();
            let m2 = (acc.iter().sum::<f32>() + tail) * rstd / d as f32;
            for (o, &v) in o.iter_mut().zip(x) {
                *o = rstd * (*o - m1 - (v - mean) * rstd * m2);
            }
        }
    }
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s1, l1, "layer norm")?;
        let (gamma, beta) = (
            contiguous::<f32>(s2, l2, "layer norm gamma")?,
            contiguous::<f32>(s3, l3, "layer norm beta")?,
        );
        let d = last_dim(l1);
        if gamma.len() != d || beta.len() != d {
            candle_core::bail!(
                "layer norm over {d} features: gamma has {}, beta {} values",
                gamma.len(),
                beta.len()
            );
        }
        let eps = self.eps;
        let y = par_rows(x, d, |xs, ys| layer_norm_rows(xs, ys, gamma, beta, eps));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let d = gamma.elem_count();
        let dx = x.apply_op3_no_bwd(gamma, &g, &LayerNormGrad { eps: self.eps })?;
        // xhat = layer norm without affine, for dgamma
        let ones = Tensor::ones(d, DType::F32, x.device())?;
        let zeros = Tensor::zeros(d, DType::F32, x.device())?;
        let xhat = x.apply_op3_no_bwd(&ones, &zeros, self)?;
        let rows = x.elem_count() / d;
        let g2 = g.reshape((rows, d))?;
        let dgamma = (g2.mul(&xhat.reshape((rows, d))?))?.sum(0)?;
        let dbeta = g2.sum(0)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_same(l1, l3, "layer norm backward")?;
        let x = contiguous::<f32>(s1, l1, "layer norm backward")?;
        let gamma = contiguous::<f32>(s2, l2, "layer norm backward gamma")?;
        let g = contiguous::<f32>(s3, l3, "layer norm backward")?;
        let d = last_dim(l1);
        let eps = self.eps;
        let dx = par_rows2(x, g, d, |xs, gs, out| layer_norm_grad_rows(xs, gs, gamma, out, eps));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Layer normalisation over the last dimension, `(x - mean) / sqrt(var + eps) * gamma + beta`
/// with the biased variance (as PyTorch), gradients to `x`, `gamma` and `beta` (fused kernels
/// for CPU f32).
pub fn layer_norm(x: &Tensor, gamma: Option<&Tensor>, beta: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(0);
    let ok = |t: Option<&Tensor>| t.is_none_or(|t| fast_path(t) && t.elem_count() == d && t.device().same_device(x.device()));
    if !(fast_path(x) && d > 0 && ok(gamma) && ok(beta)) {
        return crate::layers::functional::layer_norm_composed(x, gamma, beta, eps);
    }
    let gamma = match gamma {
        Some(g) => g.contiguous()?.flatten_all()?,
        None => Tensor::ones(d, DType::F32, x.device())?,
    };
    let beta = match beta {
        Some(b) => b.contiguous()?.flatten_all()?,
        None => Tensor::zeros(d, DType::F32, x.device())?,
    };
    x.contiguous()?.apply_op3(&gamma, &beta, LayerNorm { eps: eps as f32 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::functional::{layer_norm_composed, softmax_composed};
    use candle_core::{Device, Var};

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        crate::testing::max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn exp_and_gelu_are_accurate() {
        let mut worst_exp = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            for got in [exp_f32::<false>(x), exp_f32::<true>(x)] {
                worst_exp = worst_exp.max(((got as f64 - want) / want).abs());
            }
            x += 0.0137;
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        // GELU against the f64 formula, relative error also in the negative tail
        let (mut worst, mut worst_tail) = (0f64, 0f64);
        let mut x = -9.0f32;
        while x < 9.0 {
            let xd = x as f64;
            let phi = 0.5 * libm_erfc(-xd / std::f64::consts::SQRT_2);
            let want = xd * phi;
            for got in [x * normal_cdf::<false>(x), x * normal_cdf::<true>(x)] {
                if want.abs() > 1e-30 {
                    let rel = ((got as f64 - want) / want).abs();
                    if x.abs() <= 4.0 {
                        worst = worst.max(rel);
                    } else {
                        // the f32 rounding of z^2 in exp(-z^2 + ...) grows with z
                        worst_tail = worst_tail.max(rel);
                    }
                }
            }
            x += 0.00731;
        }
        assert!(worst < 2e-6, "gelu relative error {worst} for |x| <= 4");
        assert!(worst_tail < 2e-5, "gelu relative error {worst_tail} for |x| > 4");
    }

    /// The GELU forward's rational `Phi`: absolute error below 2.5e-7 everywhere (with and
    /// without FMA), GELU within 5e-7 relative for `x >= 0`, where `Phi >= 1/2`, and the
    /// vectorised kernel computing exactly `x Phi(x)`.
    #[test]
    fn rational_normal_cdf_is_accurate() {
        let (mut worst_phi, mut worst_pos) = (0f64, 0f64);
        let mut xs = Vec::new();
        let mut x = -12.0f32;
        while x < 12.0 {
            xs.push(x);
            x += 0.000_93;
        }
        let mut ys = vec![0f32; xs.len()];
        gelu_rows(&xs, &mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let xd = x as f64;
            let phi = 0.5 * libm_erfc(-xd / std::f64::consts::SQRT_2);
            let (with_fma, without) = (normal_cdf_rational::<true>(x), normal_cdf_rational::<false>(x));
            for got in [with_fma, without] {
                worst_phi = worst_phi.max((got as f64 - phi).abs());
                if x > 0.0 {
                    worst_pos = worst_pos.max(((x as f64 * got as f64 - xd * phi) / (xd * phi)).abs());
                }
            }
            assert!(y == x * with_fma || y == x * without, "the kernel's GELU at {x}: {y}");
        }
        assert!(worst_phi < 2.5e-7, "Phi absolute error {worst_phi}");
        assert!(worst_pos < 5e-7, "gelu relative error {worst_pos} for x >= 0");
    }

    /// The block-wise kernels do the same operations per element as the scalar ones, in the
    /// same order: their results are identical, bit for bit, with and without FMA.
    #[test]
    fn block_kernels_equal_the_scalar_ones_bit_for_bit() {
        let mut x = -12.0f32;
        while x < 12.0 {
            let block: [f32; BLOCK] = std::array::from_fn(|i| x + i as f32 * 0.0123);
            for fma in [false, true] {
                let (cdf, mut e) = if fma {
                    (normal_cdf_block::<true>(&block), block)
                } else {
                    (normal_cdf_block::<false>(&block), block)
                };
                if fma {
                    exp_block::<true>(&mut e)
                } else {
                    exp_block::<false>(&mut e)
                }
                for i in 0..BLOCK {
                    let (c, ex) = if fma {
                        (normal_cdf::<true>(block[i]), exp_f32::<true>(block[i]))
                    } else {
                        (normal_cdf::<false>(block[i]), exp_f32::<false>(block[i]))
                    };
                    assert_eq!(cdf[i].to_bits(), c.to_bits(), "cdf at {} (fma {fma})", block[i]);
                    assert_eq!(e[i].to_bits(), ex.to_bits(), "exp at {} (fma {fma})", block[i]);
                }
            }
            x += 0.37;
        }
    }

    /// erfc in f64 by its continued fraction / series (reference for the test only).
    fn libm_erfc(x: f64) -> f64 {
        if x < 0.0 {
            return 2.0 - libm_erfc(-x);
        }
        if x < 2.0 {
            // erf series
            let mut sum = x;
            let mut term = x;
            let mut n = 0.0;
            loop {
                n += 1.0;
                term *= -x * x / n;
                let add = term / (2.0 * n + 1.0);
                sum += add;
                if add.abs() < 1e-17 {
                    break;
                }
            }
            1.0 - 2.0 / std::f64::consts::PI.sqrt() * sum
        } else {
            // continued fraction (Lentz), converges fast for x >= 2
            let mut f = 0.0;
            for k in (1..200).rev() {
                f = (k as f64 / 2.0) / (x + f);
            }
            (-x * x).exp() / std::f64::consts::PI.sqrt() / (x + f)
        }
    }

    #[test]
    fn fused_ops_match_composed_forms_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 5, 77), &dev)? + 3.0)?)?;
        let w = Tensor::randn(0f32, 1.0, (3, 5, 77), &dev)?;
        let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.3, 77, &dev)?)?;
        let beta = Var::from_tensor(&Tensor::randn(0f32, 0.3, 77, &dev)?)?;
        type Case<'a> = (&'a str, Box<dyn Fn(bool) -> Result<Tensor> + 'a>);
        let cases: Vec<Case> = vec![
            (
                "softmax",
                Box::new(|fast| {
                    if fast {
                        softmax_last_dim(x.as_tensor())
                    } else {
                        softmax_composed(x.as_tensor(), 2)
                    }
                }),
            ),
            (
                "gelu",
                Box::new(|fast| if fast { gelu_erf(x.as_tensor()) } else { x.as_tensor().gelu_erf() }),
            ),
            (
                "layer norm",
                Box::new(|fast| {
                    if fast {
                        layer_norm(x.as_tensor(), Some(gamma.as_tensor()), Some(beta.as_tensor()), 1e-5)
                    } else {
                        layer_norm_composed(x.as_tensor(), Some(gamma.as_tensor()), Some(beta.as_tensor()), 1e-5)
                    }
                }),
            ),
        ];
        for (name, f) in cases {
            let (yf, yc) = (f(true)?, f(false)?);
            let scale = yc.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(max_abs(&yf, &yc) <= 2e-6 * scale.max(1.0), "{name} forward: {}", max_abs(&yf, &yc));
            let gf = yf.mul(&w)?.sum_all()?.backward()?;
            let gc = yc.mul(&w)?.sum_all()?.backward()?;
            for (v, vn) in [(&x, "x"), (&gamma, "gamma"), (&beta, "beta")] {
                match (gf.get(v.as_tensor()), gc.get(v.as_tensor())) {
                    (Some(a), Some(b)) => {
                        let s = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                        assert!(max_abs(a, b) <= 1e-4 * s.max(1.0), "{name} d{vn}: {} (scale {s})", max_abs(a, b));
                    }
                    (None, None) => {}
                    (a, b) => panic!("{name} d{vn}: gradient present {} vs {}", a.is_some(), b.is_some()),
                }
            }
        }
        // rows of length 1 and 3, layer norm without affine, non-contiguous input
        let t = Tensor::randn(0f32, 1.0, (4, 3), &dev)?.t()?;
        assert!(max_abs(&softmax_last_dim(&t)?, &softmax_composed(&t, 1)?) < 1e-6);
        assert!(max_abs(&layer_norm(&t, None, None, 1e-6)?, &layer_norm_composed(&t, None, None, 1e-6)?) < 1e-5);
        let one = Tensor::randn(0f32, 1.0, (5, 1), &dev)?;
        assert!(max_abs(&softmax_last_dim(&one)?, &Tensor::ones((5, 1), DType::F32, &dev)?) < 1e-7);
        // large logits stay finite (the max is subtracted)
        let big = Tensor::new(&[[1000f32, 999.0, -1000.0]], &dev)?;
        let p = softmax_last_dim(&big)?.to_vec2::<f32>()?;
        assert!((p[0][0] - 0.731_058_6).abs() < 1e-6 && p[0][2] < 1e-30, "{p:?}");
        // f64 takes the composed path
        let x64 = Tensor::randn(0f64, 1.0, (2, 9), &dev)?;
        assert_eq!(softmax_last_dim(&x64)?.dtype(), DType::F64);
        Ok(())
    }
}
