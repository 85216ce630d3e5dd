//! im2col/col2im + gemm convolution kernels (forward, input gradient, weight gradient)
//! and the candle custom ops wrapping them.

use super::depthwise;
use super::elem::{contiguous, gemm, outer_par, simd, Elem, Mat};
use super::winograd;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Full geometry of one 2-D convolution call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvGeom {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub dh: usize,
    pub dw: usize,
    pub groups: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeom {
    /// Builds and validates the geometry from input dims `[n, cin, h, w]` and weight dims
    /// `[cout, cin/groups, kh, kw]`.
    pub fn new(xd: &[usize], wd: &[usize], o: &super::Conv2dOpts) -> Result<Self> {
        if xd.len() != 4 || wd.len() != 4 {
            candle_core::bail!("conv2d: expected 4-d input and weight, got {xd:?} and {wd:?}");
        }
        let (n, cin, h, w) = (xd[0], xd[1], xd[2], xd[3]);
        let (cout, cin_g, kh, kw) = (wd[0], wd[1], wd[2], wd[3]);
        let g = o.groups;
        if g == 0 || cin % g != 0 || cout % g != 0 || cin_g * g != cin {
            candle_core::bail!("conv2d: bad groups {g} for input {xd:?} and weight {wd:?}");
        }
        let (sh, sw) = o.stride;
        let (ph, pw) = o.padding;
        let (dh, dw) = o.dilation;
        if sh == 0 || sw == 0 || dh == 0 || dw == 0 || kh == 0 || kw == 0 {
            candle_core::bail!("conv2d: stride, dilation and kernel must be positive");
        }
        let ekh = dh * (kh - 1) + 1;
        let ekw = dw * (kw - 1) + 1;
        if h + 2 * ph < ekh || w + 2 * pw < ekw {
            candle_core::bail!("conv2d: kernel larger than padded input ({xd:?}, {wd:?})");
        }
        let oh = (h + 2 * ph - ekh) / sh + 1;
        let ow = (w + 2 * pw - ekw) / sw + 1;
        Ok(Self {
            n,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            sh,
            sw,
            ph,
            pw,
            dh,
            dw,
            groups: g,
            oh,
            ow,
        })
    }
    pub fn cin_g(&self) -> usize {
        self.cin / self.groups
    }
    pub fn cout_g(&self) -> usize {
        self.cout / self.groups
    }
    /// Inner dimension of the gemm: `cin/groups * kh * kw`.
    pub fn k(&self) -> usize {
        self.cin_g() * self.kh * self.kw
    }
    pub fn hw(&self) -> usize {
        self.h * self.w
    }
    pub fn ohw(&self) -> usize {
        self.oh * self.ow
    }
    /// 1x1, stride 1, no padding: the input plane is already the column matrix.
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.ph == 0 && self.pw == 0
    }
    /// One input channel per group (depthwise, possibly with a channel multiplier).
    pub fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.cin_g() == 1
    }
    /// For stride-1 (non-depthwise, non-pointwise) convolutions whose padding is at most
    /// the dilated kernel extent minus one, the geometry of the equivalent forward
    /// convolution computing the input gradient from grad_out.
    pub fn transposed_as_conv(&self) -> Option<Self> {
        let (ekh, ekw) = (self.dh * (self.kh - 1), self.dw * (self.kw - 1));
        if self.sh != 1 || self.sw != 1 || self.is_depthwise() || self.is_pointwise() || self.ph > ekh || self.pw > ekw {
            return None;
        }
        let t = Self {
            n: self.n,
            cin: self.cout,
            h: self.oh,
            w: self.ow,
            cout: self.cin,
            ph: ekh - self.ph,
            pw: ekw - self.pw,
            oh: self.h,
            ow: self.w,
            ..*self
        };
        debug_assert_eq!(t.oh, t.h + 2 * t.ph - ekh);
        Some(t)
    }
    pub fn out_dims(&self) -> (usize, usize, usize, usize) {
        (self.n, self.cout, self.oh, self.ow)
    }
}

/// Range `[lo, hi)` of output positions `o < out` whose input index `o*s + off - p` lies
/// in `[0, len)`.
#[inline(always)]
pub(crate) fn valid_range(off: usize, p: usize, s: usize, len: usize, out: usize) -> (usize, usize) {
    let lo = if p > off { (p - off).div_ceil(s) } else { 0 };
    let hi = if len + p > off { (len + p - off).div_ceil(s) } else { 0 };
    let hi = hi.min(out);
    (lo.min(hi), hi)
}

/// Row stride of the column buffer: rounded up and offset by one cache line so that
/// the rows read together by the gemm micro-kernel do not alias to the same L1 cache set
/// (a 1024-float row would otherwise be exactly 4 KiB apart).
#[inline]
fn col_ld(ohw: usize) -> usize {
    ohw.next_multiple_of(16) + 16
}

/// Copies `n` elements `src[i * s]` to `dst[i]`. For `s` of 1 or 2 it works in chunks of 8
/// and may write up to 7 elements past `dst[n - 1]` and read up to `7 * s` past the last
/// source element: callers provide that slack.
#[inline(always)]
unsafe fn copy_row<T: Copy>(src: *const T, dst: *mut T, n: usize, s: usize) {
    let mut i = 0;
    if s == 1 {
        while i < n {
            std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), 8);
            i += 8;
        }
    } else if s == 2 {
        while i < n {
            for l in 0..8 {
                *dst.add(i + l) = *src.add(2 * (i + l));
            }
            i += 8;
        }
    } else {
        for i in 0..n {
            *dst.add(i) = *src.add(i * s);
        }
    }
}

/// Whether AVX2 and FMA are available (cached by std).
#[inline(always)]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Stride-2 row gathers of one column-matrix row: for each of `oh` output rows `y`,
/// `dst[y*ow + i] = src[y*step + 2*i]`, 8 outputs per step from two 8-wide loads
/// (same spill and slack rules as [`copy_row`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gather2_rows_f32(src: *const f32, dst: *mut f32, oh: usize, ow: usize, step: usize) {
    use std::arch::x86_64::*;
    for y in 0..oh {
        let s = src.add(y * step);
        let d = dst.add(y * ow);
        let mut i = 0;
        while i < ow {
            let a = _mm256_loadu_ps(s.add(2 * i));
            let b = _mm256_loadu_ps(s.add(2 * i + 8));
            // [a0 a2 b0 b2 | a4 a6 b4 b6] -> [a0 a2 a4 a6 b0 b2 b4 b6]
            let e = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
            let e = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(e)));
            _mm256_storeu_ps(d.add(i), e);
            i += 8;
        }
    }
}

/// Padded plane dimensions `(H + 2ph, W + 2pw)`.
#[inline]
fn padded_hw(g: &ConvGeom) -> (usize, usize) {
    (g.h + 2 * g.ph, g.w + 2 * g.pw)
}

/// Length of the zero-padded copy of one image/group's input planes, with slack for the
/// chunked row reads of [`copy_row`].
#[inline]
fn padded_len(g: &ConvGeom) -> usize {
    let (hp, wp) = padded_hw(g);
    g.cin_g() * hp * wp + 8 * g.sw + 8
}

/// Zeroes a span that is usually one or two elements (a row's padding columns) with plain
/// stores: as a loop, LLVM turns it into a `memset` call, and for 1-element spans the call
/// overhead showed up in profiles (memset 4.5 -> 3.3% of a 16ch@32x32 conv step).
#[inline(always)]
fn zero_short<T: Elem>(s: &mut [T]) {
    match s {
        [] => {}
        [a] => *a = T::ZERO,
        [a, b] => {
            *a = T::ZERO;
            *b = T::ZERO;
        }
        [a, b, c] => {
            *a = T::ZERO;
            *b = T::ZERO;
            *c = T::ZERO;
        }
        _ => s.fill(T::ZERO),
    }
}

/// Writes the zero-padded copy `xp[cin_g, H + 2ph, W + 2pw]` of the planes `x`.
#[inline(always)]
fn pad_planes<T: Elem>(g: &ConvGeom, x: &[T], xp: &mut [T]) {
    let (hp, wp) = padded_hw(g);
    let (w, hw) = (g.w, g.hw());
    for c in 0..g.cin_g() {
        let p = &mut xp[c * hp * wp..(c + 1) * hp * wp];
        for v in &mut p[..g.ph * wp] {
            *v = T::ZERO;
        }
        for y in 0..g.h {
            let r = &mut p[(g.ph + y) * wp..(g.ph + y + 1) * wp];
            zero_short(&mut r[..g.pw]);
            let src = &x[c * hw + y * w..][..w];
            let dst = &mut r[g.pw..g.pw + w];
            let full = w / 8 * 8;
            for (d, s) in dst[..full].chunks_exact_mut(8).zip(src.chunks_exact(8)) {
                d.copy_from_slice(s);
            }
            // Element loop on purpose: a short `copy_from_slice` becomes a memcpy call.
            #[allow(clippy::manual_memcpy)]
            for i in full..w {
                dst[i] = src[i];
            }
            zero_short(&mut r[g.pw + w..]);
        }
        for v in &mut p[(g.ph + g.h) * wp..] {
            *v = T::ZERO;
        }
    }
}

/// im2col from a zero-padded copy (see [`pad_planes`]): no bounds logic, every column row
/// is a sequence of (strided) row copies. Writes up to 7 elements past each row's end
/// (`ld` must exceed the block's column count by at least 8; rows are written in order,
/// so that spill is overwritten by later images of the same block).
#[inline(always)]
fn im2col_padded<T: Elem>(g: &ConvGeom, xp: &[T], col: &mut [T], ld: usize) {
    let (hp, wp) = padded_hw(g);
    let (oh, ow) = (g.oh, g.ow);
    let k = g.k();
    assert!(col.len() >= (k - 1) * ld + oh * ow + 8 && ld >= oh * ow + 8 && xp.len() >= padded_len(g));
    let plane = hp * wp;
    for c in 0..g.cin_g() {
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let r = (c * g.kh + ki) * g.kw + kj;
                // SAFETY: reads stay inside xp (slack included), writes inside col (the
                // assertion above and ld >= cols + 16).
                unsafe {
                    let row = col.as_mut_ptr().add(r * ld);
                    let base = xp.as_ptr().add(c * plane + ki * g.dh * wp + kj * g.dw);
                    #[cfg(target_arch = "x86_64")]
                    if g.sw == 2 && T::IS_F32 && has_avx2() {
                        gather2_rows_f32(base as *const f32, row as *mut f32, oh, ow, g.sh * wp);
                        continue;
                    }
                    for y in 0..oh {
                        copy_row(base.add(y * g.sh * wp), row.add(y * ow), ow, g.sw);
                    }
                }
            }
        }
    }
}

/// Column matrix `[cin_g*kh*kw, oh*ow]` of one image/group into `col` (row stride `ld`,
/// at least 16 more than the block's column count): the planes are first copied into a
/// zero-padded scratch buffer, then every column row is a sequence of (strided) row copies
/// without bounds logic.
#[inline]
fn fill_cols<T: Elem>(g: &ConvGeom, x: &[T], col: &mut [T], ld: usize) {
    T::with_scratch2(padded_len(g), |xp| {
        simd(
            #[inline(always)]
            || {
                pad_planes(g, x, xp);
                im2col_padded(g, xp, col, ld);
            },
        )
    })
}

/// col2im into a zeroed, padded plane buffer `xp` (see [`pad_planes`]; no bounds logic),
/// with a vectorisable interleaved path for 3-tap, stride-2 rows.
#[inline(always)]
fn col2im_padded<T: Elem>(g: &ConvGeom, col: &[T], ld: usize, xp: &mut [T]) {
    let (hp, wp) = padded_hw(g);
    let (oh, ow, plane) = (g.oh, g.ow, hp * wp);
    let row = |r: usize, y: usize| &col[r * ld + y * ow..][..ow];
    for c in 0..g.cin_g() {
        for ki in 0..g.kh {
            if g.sw == 2 && g.kw == 3 && g.dw == 1 && ow > 0 {
                let r0 = (c * g.kh + ki) * g.kw;
                for y in 0..oh {
                    let (a0, a1, a2) = (row(r0, y), row(r0 + 1, y), row(r0 + 2, y));
                    let d = &mut xp[c * plane + (y * g.sh + ki * g.dh) * wp..][..2 * ow + 1];
                    d[0] += a0[0];
                    d[1] += a1[0];
                    for i in 1..ow {
                        d[2 * i] += a0[i] + a2[i - 1];
                        d[2 * i + 1] += a1[i];
                    }
                    d[2 * ow] += a2[ow - 1];
                }
                continue;
            }
            for kj in 0..g.kw {
                let r = (c * g.kh + ki) * g.kw + kj;
                let base = c * plane + ki * g.dh * wp + kj * g.dw;
                for y in 0..oh {
                    let s = row(r, y);
                    let d = &mut xp[base + y * g.sh * wp..];
                    if g.sw == 1 {
                        for (d, s) in d[..ow].iter_mut().zip(s) {
                            *d += *s;
                        }
                    } else {
                        for (i, s) in s.iter().enumerate() {
                            d[i * g.sw] += *s;
                        }
                    }
                }
            }
        }
    }
}

/// Copies the interior of padded planes `xp` into `x[cin_g, H, W]`.
#[inline(always)]
fn unpad_planes<T: Elem>(g: &ConvGeom, xp: &[T], x: &mut [T]) {
    let (hp, wp) = padded_hw(g);
    for c in 0..g.cin_g() {
        for y in 0..g.h {
            x[(c * g.h + y) * g.w..][..g.w].copy_from_slice(&xp[c * hp * wp + (y + g.ph) * wp + g.pw..][..g.w]);
        }
    }
}

static WINOGRAD: AtomicBool = AtomicBool::new(true);

/// Chooses whether 3x3 stride-1 convolutions (and their input gradients) use Winograd
/// F(2x2, 3x3) (the default; faster, results equal to im2col up to float rounding) or
/// im2col + gemm for every shape. Process-wide; returns the previous setting.
pub fn set_winograd(enabled: bool) -> bool {
    WINOGRAD.swap(enabled, Ordering::Relaxed)
}

/// Whether [`set_winograd`] currently enables the Winograd path.
pub fn winograd_enabled() -> bool {
    WINOGRAD.load(Ordering::Relaxed)
}

/// Number of images whose columns are concatenated into one gemm, so that the gemm's
/// column count `imgs * OH * OW` stays large for small feature maps.
#[inline]
fn images_per_block(g: &ConvGeom) -> usize {
    let target = 128;
    (target / g.ohw().max(1)).clamp(1, 16).min(g.n.max(1))
}

/// Forward convolution: `out = W x im2col(x)` per group over blocks of images (see
/// [`images_per_block`]), rayon over the blocks; writes every output element.
pub(crate) fn conv_fwd<T: Elem>(g: &ConvGeom, x: &[T], w: &[T]) -> Vec<T> {
    if g.is_depthwise() {
        return depthwise::fwd(g, x, w);
    }
    if winograd_enabled() && winograd::pays_forward(g) {
        return winograd::conv_fwd(g, x, w);
    }
    let (cin_g, cout_g, k, hw, ohw) = (g.cin_g(), g.cout_g(), g.k(), g.hw(), g.ohw());
    let len = g.n * g.cout * ohw;
    let mut out: Vec<T> = Vec::with_capacity(len);
    // SAFETY: every element is written below before being read (gemm with read_dst false
    // over all rows and columns of every image/group block), and T is a plain float.
    #[allow(clippy::uninit_vec)]
    unsafe {
        out.set_len(len)
    };
    let bimg = if g.is_pointwise() { 1 } else { images_per_block(g) };
    let per_block = |b0: usize, o: &mut [T], par: Parallelism| {
        let nb = o.len() / (g.cout * ohw);
        for grp in 0..g.groups {
            let wg = &w[grp * cout_g * k..][..cout_g * k];
            if g.is_pointwise() {
                for b in 0..nb {
                    let xg = &x[((b0 + b) * g.cin + grp * cin_g) * hw..][..cin_g * hw];
                    let og = &mut o[(b * g.cout + grp * cout_g) * ohw..][..cout_g * ohw];
                    unsafe { gemm(cout_g, ohw, k, og.as_mut_ptr(), ohw, false, Mat::rm(wg, k), Mat::rm(xg, hw), par) };
                }
                continue;
            }
            let cols = nb * ohw;
            let ld = col_ld(cols);
            let tmp_len = if nb > 1 { cout_g * cols } else { 0 };
            T::with_scratch(k * ld + tmp_len, |buf| {
                let (col, tmp) = buf.split_at_mut(k * ld);
                for b in 0..nb {
                    let xg = &x[((b0 + b) * g.cin + grp * cin_g) * hw..][..cin_g * hw];
                    fill_cols(g, xg, &mut col[b * ohw..], ld);
                }
                if nb == 1 {
                    let og = &mut o[grp * cout_g * ohw..][..cout_g * ohw];
                    unsafe { gemm(cout_g, ohw, k, og.as_mut_ptr(), ohw, false, Mat::rm(wg, k), Mat::rm(col, ld), par) };
                } else {
                    unsafe {
                        gemm(
                            cout_g,
                            cols,
                            k,
                            tmp.as_mut_ptr(),
                            cols,
                            false,
                            Mat::rm(wg, k),
                            Mat::rm(col, ld),
                            par,
                        )
                    };
                    for co in 0..cout_g {
                        for b in 0..nb {
                            o[(b * g.cout + grp * cout_g + co) * ohw..][..ohw].copy_from_slice(&tmp[co * cols + b * ohw..][..ohw]);
                        }
                    }
                }
            });
        }
    };
    if g.n <= bimg {
        per_block(0, &mut out, outer_par());
    } else {
        out.par_chunks_mut(bimg * g.cout * ohw)
            .enumerate()
            .for_each(|(i, o)| per_block(i * bimg, o, Parallelism::None));
    }
    out
}

/// Input gradient: `col = W^T x grad_out[n]`, then col2im, rayon over the batch.
pub(crate) fn conv_bwd_input<T: Elem>(g: &ConvGeom, gout: &[T], w: &[T]) -> Vec<T> {
    if g.is_depthwise() {
        return depthwise::bwd_input(g, gout, w);
    }
    if let Some(tg) = g.transposed_as_conv() {
        // Stride 1: the input gradient is itself a convolution of grad_out with the
        // spatially flipped, in/out-transposed weight; this reuses the fast forward path
        // (im2col copy + gemm with inner dimension Cout*kh*kw) instead of a gemm with
        // inner dimension Cout followed by a scatter-add col2im.
        let wt = flip_transpose(g, w);
        return conv_fwd(&tg, gout, &wt);
    }
    let (cin_g, cout_g, k, hw, ohw) = (g.cin_g(), g.cout_g(), g.k(), g.hw(), g.ohw());
    let len = g.n * g.cin * hw;
    let mut gx: Vec<T> = Vec::with_capacity(len);
    // SAFETY: every element is written below before being read: the pointwise gemm
    // (read_dst false) and `unpad_planes` each cover all planes of every image/group.
    #[allow(clippy::uninit_vec)]
    unsafe {
        gx.set_len(len)
    };
    let per_img = |ni: usize, gxi: &mut [T], par: Parallelism| {
        for grp in 0..g.groups {
            let gog = &gout[(ni * g.cout + grp * cout_g) * ohw..][..cout_g * ohw];
            let wg = &w[grp * cout_g * k..][..cout_g * k];
            let gxg = &mut gxi[grp * cin_g * hw..][..cin_g * hw];
            if g.is_pointwise() {
                unsafe { gemm(k, hw, cout_g, gxg.as_mut_ptr(), hw, false, Mat::tr(wg, k), Mat::rm(gog, ohw), par) };
            } else {
                let ld = col_ld(ohw);
                T::with_scratch(k * ld, |col| {
                    unsafe { gemm(k, ohw, cout_g, col.as_mut_ptr(), ld, false, Mat::tr(wg, k), Mat::rm(gog, ohw), par) };
                    T::with_scratch2(padded_len(g), |xp| {
                        simd(
                            #[inline(always)]
                            || {
                                for v in xp.iter_mut() {
                                    *v = T::ZERO;
                                }
                                col2im_padded(g, col, ld, xp);
                                unpad_planes(g, xp, gxg);
                            },
                        )
                    });
                });
            }
        }
    };
    if g.n == 1 {
        per_img(0, &mut gx, outer_par());
    } else {
        gx.par_chunks_mut(g.cin * hw)
            .enumerate()
            .for_each(|(ni, o)| per_img(ni, o, Parallelism::None));
    }
    gx
}

/// `W'[g*cin_g + ci, co, i, j] = W[g*cout_g + co, ci, kh-1-i, kw-1-j]` (per group).
fn flip_transpose<T: Elem>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    let (cin_g, cout_g, kh, kw) = (g.cin_g(), g.cout_g(), g.kh, g.kw);
    let mut out = vec![T::ZERO; w.len()];
    for grp in 0..g.groups {
        for co in 0..cout_g {
            for ci in 0..cin_g {
                for i in 0..kh {
                    for j in 0..kw {
                        let src = (((grp * cout_g + co) * cin_g + ci) * kh + i) * kw + j;
                        let dst = (((grp * cin_g + ci) * cout_g + co) * kh + (kh - 1 - i)) * kw + (kw - 1 - j);
                        out[dst] = w[src];
                    }
                }
            }
        }
    }
    out
}

/// Weight gradient: `grad_W = sum_n grad_out[n] x im2col(x[n])^T`, one partial sum per
/// worker thread (contiguous batch chunks), reduced at the end.
pub(crate) fn conv_bwd_weight<T: Elem>(g: &ConvGeom, x: &[T], gout: &[T]) -> Vec<T> {
    if g.is_depthwise() {
        return depthwise::bwd_weight(g, x, gout);
    }
    if winograd_enabled() && winograd::applies(g) {
        return winograd::conv_bwd_weight(g, x, gout);
    }
    let (cin_g, cout_g, k, hw, ohw) = (g.cin_g(), g.cout_g(), g.k(), g.hw(), g.ohw());
    let nth = rayon::current_num_threads().min(g.n).max(1);
    let chunk = g.n.div_ceil(nth);
    let par = if nth == 1 { outer_par() } else { Parallelism::None };
    let bimg = if g.is_pointwise() { 1 } else { images_per_block(g) };
    let partial = |t: usize| {
        let mut acc = vec![T::ZERO; g.cout * k];
        let mut first = true;
        let (lo, hi) = (t * chunk, ((t + 1) * chunk).min(g.n));
        let mut b0 = lo;
        while b0 < hi {
            let nb = bimg.min(hi - b0);
            for grp in 0..g.groups {
                let accg = &mut acc[grp * cout_g * k..][..cout_g * k];
                if g.is_pointwise() {
                    let xg = &x[(b0 * g.cin + grp * cin_g) * hw..][..cin_g * hw];
                    let gog = &gout[(b0 * g.cout + grp * cout_g) * ohw..][..cout_g * ohw];
                    unsafe {
                        gemm(
                            cout_g,
                            k,
                            ohw,
                            accg.as_mut_ptr(),
                            k,
                            !first,
                            Mat::rm(gog, ohw),
                            Mat::tr(xg, hw),
                            par,
                        )
                    };
                    continue;
                }
                let cols = nb * ohw;
                let ld = col_ld(cols);
                let tmp_len = if nb > 1 { cout_g * cols } else { 0 };
                T::with_scratch(k * ld + tmp_len, |buf| {
                    let (col, tmp) = buf.split_at_mut(k * ld);
                    for b in 0..nb {
                        let xg = &x[((b0 + b) * g.cin + grp * cin_g) * hw..][..cin_g * hw];
                        fill_cols(g, xg, &mut col[b * ohw..], ld);
                    }
                    let gmat = if nb == 1 {
                        Mat::rm(&gout[(b0 * g.cout + grp * cout_g) * ohw..][..cout_g * ohw], ohw)
                    } else {
                        for co in 0..cout_g {
                            for b in 0..nb {
                                tmp[co * cols + b * ohw..][..ohw]
                                    .copy_from_slice(&gout[((b0 + b) * g.cout + grp * cout_g + co) * ohw..][..ohw]);
                            }
                        }
                        Mat::rm(&*tmp, cols)
                    };
                    unsafe { gemm(cout_g, k, cols, accg.as_mut_ptr(), k, !first, gmat, Mat::tr(col, ld), par) };
                });
            }
            first = false;
            b0 += nb;
        }
        acc
    };
    let mut parts: Vec<Vec<T>> = (0..nth).into_par_iter().map(partial).collect();
    let mut out = parts.swap_remove(0);
    for p in parts {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

fn dims4(l: &Layout) -> Vec<usize> {
    l.dims().to_vec()
}

/// Dispatches a binary kernel on the storage dtype (f32 or f64).
macro_rules! dispatch2 {
    ($name:expr, $s1:expr, $l1:expr, $s2:expr, $l2:expr, $f:ident, $g:expr, $shape:expr) => {{
        match ($s1, $s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let a = contiguous::<f32>($s1, $l1, $name)?;
                let b = contiguous::<f32>($s2, $l2, $name)?;
                Ok((f32::into_storage($f($g, a, b)), $shape))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let a = contiguous::<f64>($s1, $l1, $name)?;
                let b = contiguous::<f64>($s2, $l2, $name)?;
                Ok((f64::into_storage($f($g, a, b)), $shape))
            }
            _ => candle_core::bail!("{}: only f32/f64 inputs of the same dtype", $name),
        }
    }};
}

/// Forward convolution custom op: `(x, w) -> y`.
pub(crate) struct Conv2dOp(pub super::Conv2dOpts);

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "nn-core-conv2d"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = ConvGeom::new(&dims4(l1), &dims4(l2), &self.0)?;
        let shape = Shape::from(g.out_dims());
        dispatch2!(self.name(), s1, l1, s2, l2, conv_fwd, &g, shape)
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = ConvGeom::new(x.dims(), w.dims(), &self.0)?;
        let grad = grad.contiguous()?;
        let gx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(w, &ConvInputGradOp(g))?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &ConvWeightGradOp(g))?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// Input-gradient custom op: `(grad_out, w) -> grad_x`.
pub(crate) struct ConvInputGradOp(pub ConvGeom);

impl CustomOp2 for ConvInputGradOp {
    fn name(&self) -> &'static str {
        "nn-core-conv2d-grad-input"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        if l1.dims() != [g.n, g.cout, g.oh, g.ow] {
            candle_core::bail!("{}: unexpected grad shape {:?}", self.name(), l1.dims());
        }
        let shape = Shape::from((g.n, g.cin, g.h, g.w));
        dispatch2!(self.name(), s1, l1, s2, l2, conv_bwd_input, g, shape)
    }
}

/// Weight-gradient custom op: `(x, grad_out) -> grad_w`.
pub(crate) struct ConvWeightGradOp(pub ConvGeom);

impl CustomOp2 for ConvWeightGradOp {
    fn name(&self) -> &'static str {
        "nn-core-conv2d-grad-weight"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        if l2.dims() != [g.n, g.cout, g.oh, g.ow] {
            candle_core::bail!("{}: unexpected grad shape {:?}", self.name(), l2.dims());
        }
        let shape = Shape::from((g.cout, g.cin_g(), g.kh, g.kw));
        dispatch2!(self.name(), s1, l1, s2, l2, conv_bwd_weight, g, shape)
    }
}
