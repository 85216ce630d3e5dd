//! The adder layer's kernel: forward and backward in one file (AdderNet, Chen et al., CVPR 2020).
//!
//! # Forward (Eq. (2) of the paper)
//! `Y(m, n, t) = - sum_{i, j, k} | X(m + i, n + j, k) - F(i, j, k, t) |`: the negative l1 distance
//! between every receptive field of the input and every filter, in place of the
//! cross-correlation `sum X * F` of a convolution (Eq. (1)). Stride, zero padding, dilation
//! and channel groups are as for a convolution: padded positions take the value 0, so they
//! contribute `|0 - F|` (as an `unfold`-based reference would).
//!
//! # Backward (Eq. (5) and Eq. (7)-(8))
//! The true derivatives are sign functions; the paper replaces them by
//! * `dY/dF = X - F` (Eq. (5), the *full-precision gradient*, derivative of the l2 distance),
//! * `dY/dX = HT(F - X)` (Eq. (7)-(8)), `HT` the HardTanh clip to `[-1, 1]`, so the gradient
//!   propagated to earlier layers stays bounded.
//!
//! These are what [`adder2d`] back-propagates: they are *not* the gradients of the forward
//! function, so finite differences do not apply; the tests compare them with the formulas.
//! The adaptive learning rate of Eq. (12) acts on `dL/dF` afterwards, see [`crate::adaptive`].
//!
//! # Algorithm (CPU, f32)
//! Per image and group, the receptive fields are unrolled into a column matrix
//! `col[K, L]` (`K = Cin/groups * kh * kw`, `L = OH * OW`, rounded up to a multiple of 16 with
//! zero columns), one image at a time in a per-thread buffer — never a `(Cout x K x N*L)`
//! tensor. Then:
//! * forward: tiles of 4 output channels x 16 pixels keep their 64 partial sums in registers
//!   while `k` runs over `K`: per element one subtract, one absolute value (a sign-bit mask) and
//!   one add — 3 simple operations where a convolution does 1 fused multiply-add;
//! * input gradient: `gcol[k, p] = sum_t dY[t, p] * HT(F[t, k] - col[k, p])` in tiles of
//!   3 rows x 16 pixels (subtract, two compares-select for the clip, one FMA), then *col2im*
//!   scatter-adds `gcol` back onto the input plane;
//! * weight gradient: Eq. (5) is linear, so
//!   `dF[t, k] = sum_p dY[t, p] (col[k, p] - F[t, k]) = (dY col^T)[t, k] - F[t, k] sum_p dY[t, p]`
//!   is one matrix product per image (the `gemm` crate) plus a row sum.
//!
//! Both gradients come from one fused pass (the columns are built once). Rayon splits the batch
//! into one contiguous chunk per worker; each worker owns its buffers and a partial `dF`,
//! reduced at the end. The two tiles are written twice: with explicit AVX2/FMA intrinsics
//! (picked at run time when the CPU has them) and as portable fixed-size array loops (other CPUs;
//! `ADDER_PORTABLE=1` forces them; the test suite checks that both agree).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use nn_core::ops::Conv2dOpts;
use rayon::prelude::*;

/// Pixels per tile (two 8-lane vectors).
const NR: usize = 16;
/// Output channels per forward tile.
const MR: usize = 4;
/// Column rows per input-gradient tile.
const KR: usize = 3;

/// Geometry of one adder call (same conventions as a 2-D convolution).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdderGeom {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub opts: Conv2dOpts,
    pub oh: usize,
    pub ow: usize,
}

impl AdderGeom {
    /// Validates input dims `[N, Cin, H, W]` and filter dims `[Cout, Cin/groups, kh, kw]`.
    pub fn new(xd: &[usize], wd: &[usize], o: Conv2dOpts) -> Result<Self> {
        if xd.len() != 4 || wd.len() != 4 {
            candle_core::bail!("adder2d: expected a 4-d input [N, C, H, W] and filters [Cout, Cin/groups, kh, kw], got {xd:?} and {wd:?}");
        }
        let g = o.groups;
        if g == 0 || xd[1] % g != 0 || wd[0] % g != 0 || wd[1] * g != xd[1] {
            candle_core::bail!("adder2d: groups {g} do not fit input {xd:?} and filters {wd:?} (need Cin = groups * filter channels, Cout divisible by groups)");
        }
        let (sh, sw) = o.stride;
        let (dh, dw) = o.dilation;
        if sh == 0 || sw == 0 || dh == 0 || dw == 0 || wd[2] == 0 || wd[3] == 0 {
            candle_core::bail!("adder2d: stride, dilation and kernel size must be positive ({o:?}, filters {wd:?})");
        }
        let ekh = dh * (wd[2] - 1) + 1;
        let ekw = dw * (wd[3] - 1) + 1;
        if xd[2] + 2 * o.padding.0 < ekh || xd[3] + 2 * o.padding.1 < ekw {
            candle_core::bail!("adder2d: kernel {:?} larger than the padded input {xd:?}", (wd[2], wd[3]));
        }
        Ok(Self {
            n: xd[0],
            cin: xd[1],
            h: xd[2],
            w: xd[3],
            cout: wd[0],
            kh: wd[2],
            kw: wd[3],
            opts: o,
            oh: (xd[2] + 2 * o.padding.0 - ekh) / sh + 1,
            ow: (xd[3] + 2 * o.padding.1 - ekw) / sw + 1,
        })
    }
    fn cin_g(&self) -> usize {
        self.cin / self.opts.groups
    }
    fn cout_g(&self) -> usize {
        self.cout / self.opts.groups
    }
    /// Filter size per output channel, `Cin/groups * kh * kw`.
    pub fn k(&self) -> usize {
        self.cin_g() * self.kh * self.kw
    }
    /// Output pixels per image.
    pub fn l(&self) -> usize {
        self.oh * self.ow
    }
    /// `L` rounded up to whole tiles.
    fn lp(&self) -> usize {
        self.l().div_ceil(NR) * NR
    }
    /// `K` rounded up to whole input-gradient tiles.
    fn kp(&self) -> usize {
        self.k().div_ceil(KR) * KR
    }
    /// Floats of per-worker scratch memory used by the backward pass (the forward uses less):
    /// the column matrix, its gradient and a padded copy of `dY` for one image and group.
    pub fn scratch_floats(&self) -> usize {
        2 * self.kp() * self.lp() + self.cout_g() * self.lp()
    }
}

/// Runs `f` compiled with AVX2+FMA when the CPU has them (the crate targets baseline x86-64).
/// Callers mark the closure `#[inline(always)]`: only code inlined into the wrapper gets the
/// features (see `nn_core`'s `ops::elem::simd`).
#[inline(always)]
fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Column matrix of one image's group: `col[k, p]` (row stride `lp`) is the input value under
/// tap `k = (c, i, j)` of the receptive field of output pixel `p`, 0 on padding; rows `>= K`
/// and columns `>= L` are zero.
fn im2col(g: &AdderGeom, x: &[f32], col: &mut [f32], lp: usize, rows: usize) {
    let (oh, ow) = (g.oh, g.ow);
    let (sh, sw) = g.opts.stride;
    let (ph, pw) = g.opts.padding;
    let (dh, dw) = g.opts.dilation;
    let mut r = 0;
    for c in 0..g.cin_g() {
        let plane = &x[c * g.h * g.w..][..g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = &mut col[r * lp..][..lp];
                let offx = kj * dw;
                // output columns whose input column offx + ox*sw - pw lies in [0, w)
                let lo = if pw > offx { (pw - offx).div_ceil(sw) } else { 0 }.min(ow);
                let hi = if g.w + pw > offx { (g.w + pw - offx).div_ceil(sw) } else { 0 }.clamp(lo, ow);
                for oy in 0..oh {
                    let dst = &mut row[oy * ow..][..ow];
                    let iy = (oy * sh + ki * dh) as isize - ph as isize;
                    if iy < 0 || iy >= g.h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..][..g.w];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if sw == 1 {
                        let s0 = lo + offx - pw;
                        dst[lo..hi].copy_from_slice(&src[s0..s0 + hi - lo]);
                    } else {
                        for (ox, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                            *d = src[ox * sw + offx - pw];
                        }
                    }
                }
                row[oh * ow..].fill(0.0);
                r += 1;
            }
        }
    }
    col[r * lp..rows * lp].fill(0.0);
}

/// Scatter-adds `gcol` (layout of [`im2col`]) onto the input planes `gx` (overwritten).
fn col2im(g: &AdderGeom, gcol: &[f32], lp: usize, gx: &mut [f32]) {
    gx.fill(0.0);
    let (oh, ow) = (g.oh, g.ow);
    let (sh, sw) = g.opts.stride;
    let (ph, pw) = g.opts.padding;
    let (dh, dw) = g.opts.dilation;
    let mut r = 0;
    for c in 0..g.cin_g() {
        let plane = &mut gx[c * g.h * g.w..][..g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = &gcol[r * lp..][..lp];
                let offx = kj * dw;
                let lo = if pw > offx { (pw - offx).div_ceil(sw) } else { 0 }.min(ow);
                let hi = if g.w + pw > offx { (g.w + pw - offx).div_ceil(sw) } else { 0 }.clamp(lo, ow);
                for oy in 0..oh {
                    let iy = (oy * sh + ki * dh) as isize - ph as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * g.w..][..g.w];
                    let src = &row[oy * ow..][..ow];
                    if sw == 1 {
                        let d0 = lo + offx - pw;
                        for (d, s) in dst[d0..d0 + hi - lo].iter_mut().zip(&src[lo..hi]) {
                            *d += *s;
                        }
                    } else {
                        for ox in lo..hi {
                            dst[ox * sw + offx - pw] += src[ox];
                        }
                    }
                }
                r += 1;
            }
        }
    }
}

/// Packs the group's filters `w[cout_g, K]` into tiles `[ceil(cout_g / MR)][K][MR]`
/// (zero rows past `cout_g`).
fn pack_fwd(w: &[f32], cout_g: usize, k: usize) -> Vec<f32> {
    let tiles = cout_g.div_ceil(MR);
    let mut p = vec![0.0f32; tiles * k * MR];
    for t in 0..cout_g {
        for kk in 0..k {
            p[((t / MR) * k + kk) * MR + t % MR] = w[t * k + kk];
        }
    }
    p
}

/// Packs `w[cout_g, K]` into tiles `[Kp / KR][cout_g][KR]` (zero past `K`).
fn pack_bwd(w: &[f32], cout_g: usize, k: usize, kp: usize) -> Vec<f32> {
    let mut p = vec![0.0f32; kp * cout_g];
    for t in 0..cout_g {
        for kk in 0..k {
            p[((kk / KR) * cout_g + t) * KR + kk % KR] = w[t * k + kk];
        }
    }
    p
}

/// Forward tile: `acc[m][j] = sum_k |col[k, p0 + j] - w[m, k]|` for one tile of `MR` filters.
///
/// # Safety
/// `col` holds `k` rows of stride `ld` with `p0 + NR <= ld`; `wp` holds `k * MR` floats.
#[inline(always)]
unsafe fn fwd_tile(k: usize, wp: *const f32, col: *const f32, ld: usize, p0: usize) -> [[f32; NR]; MR] {
    let mut acc = [[0.0f32; NR]; MR];
    for kk in 0..k {
        let x = *(col.add(kk * ld + p0) as *const [f32; NR]);
        let w = *(wp.add(kk * MR) as *const [f32; MR]);
        for m in 0..MR {
            for j in 0..NR {
                acc[m][j] += (x[j] - w[m]).abs();
            }
        }
    }
    acc
}

/// Input-gradient tile: `acc[m][j] = sum_t gy[t, p0 + j] * HT(w[t, k0 + m] - col[k0 + m, p0 + j])`.
///
/// # Safety
/// `col` holds rows `k0..k0 + KR` of stride `ld`, `gy` holds `cout_g` rows of stride `ld`,
/// `wt` holds `cout_g * KR` floats, and `p0 + NR <= ld`.
#[inline(always)]
unsafe fn bwd_x_tile(cout_g: usize, wt: *const f32, gy: *const f32, col: *const f32, ld: usize, p0: usize) -> [[f32; NR]; KR] {
    let mut x = [[0.0f32; NR]; KR];
    for (m, xm) in x.iter_mut().enumerate() {
        *xm = *(col.add(m * ld + p0) as *const [f32; NR]);
    }
    let mut acc = [[0.0f32; NR]; KR];
    for t in 0..cout_g {
        let gv = *(gy.add(t * ld + p0) as *const [f32; NR]);
        let w = *(wt.add(t * KR) as *const [f32; KR]);
        for m in 0..KR {
            for j in 0..NR {
                let d = w[m] - x[m][j];
                // HardTanh written as compare-selects so it compiles to plain min/max
                let d = if d < -1.0 { -1.0 } else { d };
                let d = if d > 1.0 { 1.0 } else { d };
                acc[m][j] += gv[j] * d;
            }
        }
    }
    acc
}

/// AVX2 versions of the two tiles (explicit intrinsics: the portable loops above are the
/// reference and the fallback, these keep all accumulators in registers).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{KR, MR, NR};
    use std::arch::x86_64::*;

    /// [`super::fwd_tile`] with 4 x 16 accumulators in 8 registers.
    ///
    /// # Safety
    /// As [`super::fwd_tile`], and the CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fwd_tile(k: usize, wp: *const f32, col: *const f32, ld: usize, p0: usize) -> [[f32; NR]; MR] {
        const _: () = assert!(MR == 4 && NR == 16);
        let sign = _mm256_set1_ps(-0.0);
        let z = _mm256_setzero_ps();
        let (mut a00, mut a01, mut a10, mut a11, mut a20, mut a21, mut a30, mut a31) = (z, z, z, z, z, z, z, z);
        let mut c = col.add(p0);
        let mut w = wp;
        for _ in 0..k {
            let x0 = _mm256_loadu_ps(c);
            let x1 = _mm256_loadu_ps(c.add(8));
            let w0 = _mm256_broadcast_ss(&*w);
            let w1 = _mm256_broadcast_ss(&*w.add(1));
            let w2 = _mm256_broadcast_ss(&*w.add(2));
            let w3 = _mm256_broadcast_ss(&*w.add(3));
            a00 = _mm256_add_ps(a00, _mm256_andnot_ps(sign, _mm256_sub_ps(x0, w0)));
            a01 = _mm256_add_ps(a01, _mm256_andnot_ps(sign, _mm256_sub_ps(x1, w0)));
            a10 = _mm256_add_ps(a10, _mm256_andnot_ps(sign, _mm256_sub_ps(x0, w1)));
            a11 = _mm256_add_ps(a11, _mm256_andnot_ps(sign, _mm256_sub_ps(x1, w1)));
            a20 = _mm256_add_ps(a20, _mm256_andnot_ps(sign, _mm256_sub_ps(x0, w2)));
            a21 = _mm256_add_ps(a21, _mm256_andnot_ps(sign, _mm256_sub_ps(x1, w2)));
            a30 = _mm256_add_ps(a30, _mm256_andnot_ps(sign, _mm256_sub_ps(x0, w3)));
            a31 = _mm256_add_ps(a31, _mm256_andnot_ps(sign, _mm256_sub_ps(x1, w3)));
            c = c.add(ld);
            w = w.add(MR);
        }
        let mut out = [[0.0f32; NR]; MR];
        for (row, (lo, hi)) in out.iter_mut().zip([(a00, a01), (a10, a11), (a20, a21), (a30, a31)]) {
            _mm256_storeu_ps(row.as_mut_ptr(), lo);
            _mm256_storeu_ps(row.as_mut_ptr().add(8), hi);
        }
        out
    }

    /// [`super::bwd_x_tile`] with the 3 x 16 input tile and accumulators in 12 registers.
    ///
    /// # Safety
    /// As [`super::bwd_x_tile`], and the CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn bwd_x_tile(cout_g: usize, wt: *const f32, gy: *const f32, col: *const f32, ld: usize, p0: usize) -> [[f32; NR]; KR] {
        const _: () = assert!(KR == 3 && NR == 16);
        let one = _mm256_set1_ps(1.0);
        let mone = _mm256_set1_ps(-1.0);
        let x00 = _mm256_loadu_ps(col.add(p0));
        let x01 = _mm256_loadu_ps(col.add(p0 + 8));
        let x10 = _mm256_loadu_ps(col.add(ld + p0));
        let x11 = _mm256_loadu_ps(col.add(ld + p0 + 8));
        let x20 = _mm256_loadu_ps(col.add(2 * ld + p0));
        let x21 = _mm256_loadu_ps(col.add(2 * ld + p0 + 8));
        let z = _mm256_setzero_ps();
        let (mut a00, mut a01, mut a10, mut a11, mut a20, mut a21) = (z, z, z, z, z, z);
        let mut g = gy.add(p0);
        let mut w = wt;
        // HT(w - x) = min(max(w - x, -1), 1)
        let ht = |w: __m256, x: __m256| _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(w, x), mone), one);
        for _ in 0..cout_g {
            let g0 = _mm256_loadu_ps(g);
            let g1 = _mm256_loadu_ps(g.add(8));
            let w0 = _mm256_broadcast_ss(&*w);
            let w1 = _mm256_broadcast_ss(&*w.add(1));
            let w2 = _mm256_broadcast_ss(&*w.add(2));
            a00 = _mm256_fmadd_ps(g0, ht(w0, x00), a00);
            a01 = _mm256_fmadd_ps(g1, ht(w0, x01), a01);
            a10 = _mm256_fmadd_ps(g0, ht(w1, x10), a10);
            a11 = _mm256_fmadd_ps(g1, ht(w1, x11), a11);
            a20 = _mm256_fmadd_ps(g0, ht(w2, x20), a20);
            a21 = _mm256_fmadd_ps(g1, ht(w2, x21), a21);
            g = g.add(ld);
            w = w.add(KR);
        }
        let mut out = [[0.0f32; NR]; KR];
        for (row, (lo, hi)) in out.iter_mut().zip([(a00, a01), (a10, a11), (a20, a21)]) {
            _mm256_storeu_ps(row.as_mut_ptr(), lo);
            _mm256_storeu_ps(row.as_mut_ptr().add(8), hi);
        }
        out
    }
}

/// Whether the AVX2 tiles can run.
#[inline]
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Dispatches the forward tile.
///
/// # Safety
/// As [`fwd_tile`].
#[inline(always)]
unsafe fn fwd_tile_best(avx: bool, k: usize, wp: *const f32, col: *const f32, ld: usize, p0: usize) -> [[f32; NR]; MR] {
    #[cfg(target_arch = "x86_64")]
    if avx {
        return avx2::fwd_tile(k, wp, col, ld, p0);
    }
    let _ = avx;
    fwd_tile(k, wp, col, ld, p0)
}

/// Dispatches the input-gradient tile.
///
/// # Safety
/// As [`bwd_x_tile`].
#[inline(always)]
unsafe fn bwd_x_tile_best(
    avx: bool,
    cout_g: usize,
    wt: *const f32,
    gy: *const f32,
    col: *const f32,
    ld: usize,
    p0: usize,
) -> [[f32; NR]; KR] {
    #[cfg(target_arch = "x86_64")]
    if avx {
        return avx2::bwd_x_tile(cout_g, wt, gy, col, ld, p0);
    }
    let _ = avx;
    bwd_x_tile(cout_g, wt, gy, col, ld, p0)
}

static FORCE_PORTABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Forces the portable tiles instead of the AVX2 ones (tests compare the two on AVX2 machines).
#[doc(hidden)]
pub fn force_portable(on: bool) {
    FORCE_PORTABLE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the portable tiles are forced (`force_portable`, or `ADDER_PORTABLE=1`).
fn portable() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    FORCE_PORTABLE.load(std::sync::atomic::Ordering::Relaxed)
        || *ENV.get_or_init(|| std::env::var("ADDER_PORTABLE").is_ok_and(|v| v == "1"))
}

/// Forward pass for a chunk of images `out[nb, Cout, OH, OW]` starting at image `b0`.
fn fwd_chunk(g: &AdderGeom, x: &[f32], packed: &[Vec<f32>], b0: usize, out: &mut [f32]) {
    let (k, l, lp, cin_g, cout_g) = (g.k(), g.l(), g.lp(), g.cin_g(), g.cout_g());
    let hw = g.h * g.w;
    let mut col = vec![0.0f32; k * lp];
    let nb = out.len() / (g.cout * l);
    let avx = has_avx2() && !portable();
    for b in 0..nb {
        for (grp, wp) in packed.iter().enumerate() {
            let xg = &x[((b0 + b) * g.cin + grp * cin_g) * hw..][..cin_g * hw];
            im2col(g, xg, &mut col, lp, k);
            let og = &mut out[(b * g.cout + grp * cout_g) * l..][..cout_g * l];
            simd(
                #[inline(always)]
                || {
                    for p0 in (0..lp).step_by(NR) {
                        let nr = NR.min(l - p0);
                        for tile in 0..cout_g.div_ceil(MR) {
                            // SAFETY: col is k x lp, wp holds every tile's k x MR floats.
                            let acc = unsafe { fwd_tile_best(avx, k, wp.as_ptr().add(tile * k * MR), col.as_ptr(), lp, p0) };
                            for (m, a) in acc.iter().enumerate().take(cout_g - tile * MR) {
                                let o = &mut og[(tile * MR + m) * l + p0..][..nr];
                                for (o, a) in o.iter_mut().zip(a) {
                                    *o = -*a;
                                }
                            }
                        }
                    }
                },
            );
        }
    }
}

/// One worker's share of the backward pass: images `[b0, b0 + nb)` write their input gradient
/// into `gx` (`nb` images) and add their filter gradient `(dY col^T)` and the row sums of `dY`
/// into the returned partials.
fn bwd_chunk(g: &AdderGeom, x: &[f32], gy: &[f32], packed: &[Vec<f32>], b0: usize, gx: &mut [f32]) -> (Vec<f32>, Vec<f32>) {
    let (k, kp, l, lp, cin_g, cout_g) = (g.k(), g.kp(), g.l(), g.lp(), g.cin_g(), g.cout_g());
    let hw = g.h * g.w;
    let groups = g.opts.groups;
    let mut col = vec![0.0f32; kp * lp];
    let mut gcol = vec![0.0f32; kp * lp];
    let mut gyp = vec![0.0f32; cout_g * lp];
    let mut dot = vec![0.0f32; g.cout * k];
    let mut rowsum = vec![0.0f32; g.cout];
    let nb = gx.len() / (g.cin * hw);
    let avx = has_avx2() && !portable();
    for b in 0..nb {
        for (grp, wt) in packed.iter().enumerate() {
            let xg = &x[((b0 + b) * g.cin + grp * cin_g) * hw..][..cin_g * hw];
            im2col(g, xg, &mut col, lp, kp);
            let gyg = &gy[((b0 + b) * g.cout + grp * cout_g) * l..][..cout_g * l];
            for t in 0..cout_g {
                gyp[t * lp..t * lp + l].copy_from_slice(&gyg[t * l..][..l]);
                let s: f32 = gyg[t * l..][..l].iter().sum();
                rowsum[grp * cout_g + t] += s;
            }
            simd(
                #[inline(always)]
                || {
                    for k0 in (0..kp).step_by(KR) {
                        for p0 in (0..lp).step_by(NR) {
                            // SAFETY: col and gcol are kp x lp, gyp is cout_g x lp, wt is kp x cout_g.
                            let acc = unsafe {
                                bwd_x_tile_best(
                                    avx,
                                    cout_g,
                                    wt.as_ptr().add(k0 * cout_g),
                                    gyp.as_ptr(),
                                    col.as_ptr().add(k0 * lp),
                                    lp,
                                    p0,
                                )
                            };
                            for (m, a) in acc.iter().enumerate() {
                                gcol[(k0 + m) * lp + p0..][..NR].copy_from_slice(a);
                            }
                        }
                    }
                },
            );
            col2im(g, &gcol, lp, &mut gx[(b * g.cin + grp * cin_g) * hw..][..cin_g * hw]);
            // dot[t, k] += sum_p gy[t, p] col[k, p]; padded columns are zero in both.
            let d = &mut dot[grp * cout_g * k..][..cout_g * k];
            // SAFETY: d is cout_g x k (row stride k), gyp is cout_g x lp, col is k x lp.
            unsafe {
                gemm::gemm(
                    cout_g,
                    k,
                    lp,
                    d.as_mut_ptr(),
                    1,
                    k as isize,
                    true,
                    gyp.as_ptr(),
                    1,
                    lp as isize,
                    col.as_ptr(),
                    lp as isize,
                    1,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            };
        }
    }
    let _ = groups;
    (dot, rowsum)
}

/// Contiguous f32 slice of a CPU storage.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{what}: input must be contiguous"),
        _ => candle_core::bail!("{what}: the CPU kernel takes f32 tensors, got {:?}", s.dtype()),
    }
}

/// Images per worker chunk.
fn chunk_images(n: usize) -> usize {
    n.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// Forward adder kernel on CPU f32 slices: `x[N, Cin, H, W]`, `w[Cout, Cin/groups, kh, kw]`.
pub fn adder_fwd_cpu(g: &AdderGeom, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (k, cout_g) = (g.k(), g.cout_g());
    let packed: Vec<Vec<f32>> = (0..g.opts.groups)
        .map(|grp| pack_fwd(&w[grp * cout_g * k..][..cout_g * k], cout_g, k))
        .collect();
    let per = g.cout * g.l();
    let mut out = vec![0.0f32; g.n * per];
    if per == 0 {
        return out;
    }
    let c = chunk_images(g.n);
    out.par_chunks_mut(c * per)
        .enumerate()
        .for_each(|(i, o)| fwd_chunk(g, x, &packed, i * c, o));
    out
}

/// Backward adder kernel on CPU f32 slices: returns `(dX, dF)` by Eq. (7)-(8) and Eq. (5).
pub fn adder_bwd_cpu(g: &AdderGeom, x: &[f32], w: &[f32], gy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (k, kp, cout_g) = (g.k(), g.kp(), g.cout_g());
    let packed: Vec<Vec<f32>> = (0..g.opts.groups)
        .map(|grp| pack_bwd(&w[grp * cout_g * k..][..cout_g * k], cout_g, k, kp))
        .collect();
    let per = g.cin * g.h * g.w;
    let mut gx = vec![0.0f32; g.n * per];
    let c = chunk_images(g.n);
    let parts: Vec<(Vec<f32>, Vec<f32>)> = gx
        .par_chunks_mut(c * per.max(1))
        .enumerate()
        .map(|(i, o)| bwd_chunk(g, x, gy, &packed, i * c, o))
        .collect();
    let mut dot = vec![0.0f32; g.cout * k];
    let mut rowsum = vec![0.0f32; g.cout];
    for (d, r) in parts {
        dot.iter_mut().zip(d).for_each(|(a, b)| *a += b);
        rowsum.iter_mut().zip(r).for_each(|(a, b)| *a += b);
    }
    // Eq. (5): dF[t, k] = sum_p dY[t, p] (X[k, p] - F[t, k])
    for t in 0..g.cout {
        for kk in 0..k {
            dot[t * k + kk] -= w[t * k + kk] * rowsum[t];
        }
    }
    (gx, dot)
}

/// The forward custom op `(x, w) -> y`.
struct AdderOp(Conv2dOpts);

impl CustomOp2 for AdderOp {
    fn name(&self) -> &'static str {
        "adder2d"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = AdderGeom::new(l1.dims(), l2.dims(), self.0)?;
        let x = slice(s1, l1, "adder2d")?;
        let w = slice(s2, l2, "adder2d")?;
        let y = adder_fwd_cpu(&g, x, w);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.cout, g.oh, g.ow))))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = AdderGeom::new(x.dims(), w.dims(), self.0)?;
        let grad = grad.contiguous()?;
        let both = grad.apply_op3_no_bwd(x, w, &AdderBwdOp(g))?;
        let nx = x.elem_count();
        let gx = both.narrow(0, 0, nx)?.reshape(x.dims())?;
        let gw = both.narrow(0, nx, w.elem_count())?.reshape(w.dims())?;
        Ok((x.track_op().then_some(gx), w.track_op().then_some(gw)))
    }
}

/// The fused backward custom op `(dY, x, w) -> [dX (flattened), dF (flattened)]`.
struct AdderBwdOp(AdderGeom);

impl CustomOp3 for AdderBwdOp {
    fn name(&self) -> &'static str {
        "adder2d-bwd"
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
        let g = &self.0;
        if l1.dims() != [g.n, g.cout, g.oh, g.ow] {
            candle_core::bail!("adder2d-bwd: unexpected gradient shape {:?}", l1.dims());
        }
        let gy = slice(s1, l1, "adder2d-bwd")?;
        let x = slice(s2, l2, "adder2d-bwd")?;
        let w = slice(s3, l3, "adder2d-bwd")?;
        let (mut gx, gw) = adder_bwd_cpu(g, x, w, gy);
        gx.extend_from_slice(&gw);
        let n = gx.len();
        Ok((CpuStorage::F32(gx), Shape::from(n)))
    }
}

/// The adder "convolution" `Y = -sum |X_patch - F|` of an NCHW input `x` with filters
/// `w[Cout, Cin/groups, kh, kw]`, output `[N, Cout, OH, OW]` as for a convolution with the same
/// options; backward by the paper's rules (module docs).
///
/// On CPU with f32 this is the custom op of this module (non-contiguous inputs are copied
/// first). Any other device or dtype goes through a CPU f32 copy and back (both moves carry
/// gradients in candle), so the layer works everywhere, at the cost of the transfers.
pub fn adder2d(x: &Tensor, w: &Tensor, opts: Conv2dOpts) -> Result<Tensor> {
    AdderGeom::new(x.dims(), w.dims(), opts)?;
    if x.device().is_cpu() && w.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        return x.contiguous()?.apply_op2(&w.contiguous()?, AdderOp(opts));
    }
    if !x.device().same_device(w.device()) {
        candle_core::bail!("adder2d: input and filters are on different devices");
    }
    let (dev, dt) = (x.device().clone(), x.dtype());
    let xc = x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let wc = w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let y = xc.contiguous()?.apply_op2(&wc.contiguous()?, AdderOp(opts))?;
    y.to_dtype(dt)?.to_device(&dev)
}
