//! Direct kernels for depthwise convolutions (one input channel per group, optional
//! channel multiplier): here im2col + gemm would degenerate into many `1 x k` products,
//! so each output plane is computed with vectorisable row loops instead.
//!
//! Stride-1 layers (the usual depthwise 3x3, 5x5, 7x7) take a faster path: the plane is
//! copied once into a zero-padded scratch buffer, and each output row is built 8 columns at
//! a time in registers from all kernel taps (no bounds logic, one store per output), instead
//! of one pass over the row per tap. The input gradient is the same correlation of the
//! padded output gradient with the flipped kernel; the weight gradient keeps one 8-lane
//! accumulator per tap over all rows of all images.

use super::conv::{valid_range, ConvGeom};
use super::elem::{simd, Elem};
use rayon::prelude::*;

/// Dot product with 8 independent accumulators (vectorises without fast-math).
#[inline(always)]
pub(crate) fn dot<T: Elem>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::ZERO; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = T::ZERO;
    for (x, y) in ra.iter().zip(rb) {
        s += *x * *y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + s
}

/// Lanes of the register-blocked stride-1 kernels.
const LANES: usize = 8;

/// Copies plane `src[h, w]` into the interior of a zero-padded plane `dst` (row stride
/// `wp`, image at row `pt`, column `pl`) whose border is already zero: callers zero the
/// scratch once per task and rewrite only the interior for each plane, since the library
/// `memset`/`memcpy` calls for the short border spans and rows cost more than the
/// arithmetic on these small planes (11% and 9% of a depthwise step in a profile).
#[inline(always)]
fn copy_interior<T: Elem>(src: &[T], h: usize, w: usize, pt: usize, pl: usize, wp: usize, dst: &mut [T]) {
    let full = w / LANES * LANES;
    for y in 0..h {
        let s = &src[y * w..][..w];
        let d = &mut dst[(pt + y) * wp + pl..][..w];
        for (dc, sc) in d[..full].chunks_exact_mut(LANES).zip(s.chunks_exact(LANES)) {
            dc.copy_from_slice(sc);
        }
        // Element loop on purpose: a short `copy_from_slice` becomes a memcpy call.
        #[allow(clippy::manual_memcpy)]
        for i in full..w {
            d[i] = s[i];
        }
    }
}

/// Zero-padded plane scratch of `len` elements, all zero on entry to `f` (the border of
/// every plane copied in with [`copy_interior`] then stays zero).
#[inline(always)]
fn with_zeroed_scratch<T: Elem, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    T::with_scratch2(len, |buf| {
        buf.fill(T::ZERO);
        f(buf)
    })
}

/// A vector of `len` elements that the caller writes completely before reading.
#[inline(always)]
fn uninit_vec<T: Elem>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: T is a plain float type (any bit pattern is valid) and callers overwrite
    // every element before it is read (see each call site).
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(len)
    };
    v
}

/// Planes per rayon task: enough tasks to balance the threads, few enough that zeroing
/// the scratch and the task overhead are paid rarely.
#[inline]
fn planes_per_task(planes: usize) -> usize {
    let tasks = rayon::current_num_threads().max(1) * 8;
    planes.div_ceil(tasks).max(1)
}

/// Accumulates `R x C` blocks of 8 outputs (rows `y..y + R`, columns `x0 + 8c`) of the
/// correlation in [`correlate_s1`]: `R * C` independent add chains hide the add latency
/// that a single accumulator per 8 outputs would expose (9 dependent adds for a 3x3 kernel).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn correlate_block<T: Elem, const R: usize, const C: usize>(
    xp: &[T],
    wp: usize,
    k: &[T],
    (kh, kw): (usize, usize),
    (dh, dw): (usize, usize),
    (y, x0): (usize, usize),
    out: &mut [T],
    ow: usize,
    acc_into: bool,
) {
    let mut acc = [[[T::ZERO; LANES]; C]; R];
    for i in 0..kh {
        for j in 0..kw {
            let kv = k[i * kw + j];
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let row = &xp[(y + r + i * dh) * wp + x0 + j * dw..];
                for (c, a) in acc_r.iter_mut().enumerate() {
                    let src = &row[c * LANES..][..LANES];
                    for l in 0..LANES {
                        a[l] += kv * src[l];
                    }
                }
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (c, a) in acc_r.iter().enumerate() {
            let dst = &mut out[(y + r) * ow + x0 + c * LANES..][..LANES];
            if acc_into {
                for l in 0..LANES {
                    dst[l] += a[l];
                }
            } else {
                dst.copy_from_slice(a);
            }
        }
    }
}

/// `out[y, x] (+)= sum_{i, j} k[i * kw + j] * xp[y + i dh, x + j dw]` for an `oh x ow`
/// output from a padded plane with row stride `wp`: blocks of 2 rows x 16 columns in
/// registers where they fit, then single 8-column chunks, then scalar columns.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn correlate_s1<T: Elem>(
    xp: &[T],
    wp: usize,
    k: &[T],
    ks: (usize, usize),
    ds: (usize, usize),
    (oh, ow): (usize, usize),
    out: &mut [T],
    acc_into: bool,
) {
    let (kh, kw) = ks;
    let (dh, dw) = ds;
    let mut y = 0;
    while y < oh {
        let two = y + 1 < oh;
        let mut x0 = 0;
        while x0 + 2 * LANES <= ow {
            if two {
                correlate_block::<T, 2, 2>(xp, wp, k, ks, ds, (y, x0), out, ow, acc_into);
            } else {
                correlate_block::<T, 1, 2>(xp, wp, k, ks, ds, (y, x0), out, ow, acc_into);
            }
            x0 += 2 * LANES;
        }
        while x0 + LANES <= ow {
            if two {
                correlate_block::<T, 2, 1>(xp, wp, k, ks, ds, (y, x0), out, ow, acc_into);
            } else {
                correlate_block::<T, 1, 1>(xp, wp, k, ks, ds, (y, x0), out, ow, acc_into);
            }
            x0 += LANES;
        }
        for yy in y..(y + if two { 2 } else { 1 }) {
            for x in x0..ow {
                let mut acc = T::ZERO;
                for i in 0..kh {
                    for j in 0..kw {
                        acc += k[i * kw + j] * xp[(yy + i * dh) * wp + x + j * dw];
                    }
                }
                if acc_into {
                    out[yy * ow + x] += acc;
                } else {
                    out[yy * ow + x] = acc;
                }
            }
        }
        y += if two { 2 } else { 1 };
    }
}

/// Stride-1 depthwise forward through [`correlate_s1`] on zero-padded planes.
fn fwd_s1<T: Elem>(g: &ConvGeom, x: &[T], w: &[T]) -> Vec<T> {
    let (hw, ohw, taps, mult) = (g.hw(), g.ohw(), g.kh * g.kw, g.cout / g.cin);
    let (hp, wp) = (g.h + 2 * g.ph, g.w + 2 * g.pw);
    // every output plane is written by `correlate_s1` with `acc_into` false
    let mut out = uninit_vec(g.n * g.cout * ohw);
    let ppt = planes_per_task(g.n * g.cout);
    out.par_chunks_mut(ohw * ppt).enumerate().for_each(|(t, os)| {
        with_zeroed_scratch(hp * wp, |xp| {
            simd(
                #[inline(always)]
                || {
                    for (i, o) in os.chunks_mut(ohw).enumerate() {
                        let p = t * ppt + i;
                        let (ni, co) = (p / g.cout, p % g.cout);
                        let xc = &x[(ni * g.cin + co / mult) * hw..][..hw];
                        let wk = &w[co * taps..][..taps];
                        copy_interior(xc, g.h, g.w, g.ph, g.pw, wp, xp);
                        if (g.kh, g.kw) == (3, 3) {
                            correlate_s1(xp, wp, wk, (3, 3), (g.dh, g.dw), (g.oh, g.ow), o, false);
                        } else {
                            correlate_s1(xp, wp, wk, (g.kh, g.kw), (g.dh, g.dw), (g.oh, g.ow), o, false);
                        }
                    }
                },
            )
        });
    });
    out
}

/// Stride-1 depthwise input gradient: the correlation of the output gradient, padded by
/// `(k - 1) d - p` on each side, with the flipped kernel (summed over the channel
/// multiplier). Needs `p <= (k - 1) d` in both directions.
fn bwd_input_s1<T: Elem>(g: &ConvGeom, gout: &[T], w: &[T]) -> Vec<T> {
    let (hw, ohw, taps, mult) = (g.hw(), g.ohw(), g.kh * g.kw, g.cout / g.cin);
    let (pt, pl) = ((g.kh - 1) * g.dh - g.ph, (g.kw - 1) * g.dw - g.pw);
    let (hp, wp) = (g.oh + 2 * pt, g.ow + 2 * pl);
    if mult == 0 {
        // no output channels (cout = 0): the gradient is zero, and no pass below writes it
        return vec![T::ZERO; g.n * g.cin * hw];
    }
    // every input-gradient plane is written by `correlate_s1` for m = 0 (acc_into false)
    let mut gx = uninit_vec(g.n * g.cin * hw);
    let ppt = planes_per_task(g.n * g.cin);
    gx.par_chunks_mut(hw * ppt).enumerate().for_each(|(t, gxs)| {
        let mut flipped = vec![T::ZERO; taps];
        with_zeroed_scratch(hp * wp, |gpp| {
            simd(
                #[inline(always)]
                || {
                    for (i, gxc) in gxs.chunks_mut(hw).enumerate() {
                        let p = t * ppt + i;
                        let (ni, ci) = (p / g.cin, p % g.cin);
                        for m in 0..mult {
                            let co = ci * mult + m;
                            let gp = &gout[(ni * g.cout + co) * ohw..][..ohw];
                            for (t, v) in w[co * taps..][..taps].iter().enumerate() {
                                flipped[taps - 1 - t] = *v;
                            }
                            copy_interior(gp, g.oh, g.ow, pt, pl, wp, gpp);
                            if (g.kh, g.kw) == (3, 3) {
                                correlate_s1(gpp, wp, &flipped, (3, 3), (g.dh, g.dw), (g.h, g.w), gxc, m > 0);
                            } else {
                                correlate_s1(gpp, wp, &flipped, (g.kh, g.kw), (g.dh, g.dw), (g.h, g.w), gxc, m > 0);
                            }
                        }
                    }
                },
            )
        });
    });
    gx
}

/// Adds one padded input plane's contribution to the per-tap accumulators of the weight
/// gradient: `acc[i * kw + j][l] += gout[y, x0 + l] * xp[y + i dh, x0 + l + j dw]` over
/// 8-column chunks, scalar columns into `tail`. With the kernel size known at the call
/// site (3x3) the tap loops unroll and the accumulators stay in registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn weight_grad_plane<T: Elem>(
    xp: &[T],
    wp: usize,
    gp: &[T],
    (oh, ow): (usize, usize),
    (kh, kw): (usize, usize),
    (dh, dw): (usize, usize),
    acc: &mut [[T; LANES]],
    tail: &mut [T],
) {
    for y in 0..oh {
        let grow = &gp[y * ow..][..ow];
        let mut x0 = 0;
        while x0 + LANES <= ow {
            let gv: &[T] = &grow[x0..x0 + LANES];
            for i in 0..kh {
                let row = &xp[(y + i * dh) * wp + x0..];
                for j in 0..kw {
                    let src = &row[j * dw..][..LANES];
                    let a = &mut acc[i * kw + j];
                    for l in 0..LANES {
                        a[l] += gv[l] * src[l];
                    }
                }
            }
            x0 += LANES;
        }
        for xo in x0..ow {
            for i in 0..kh {
                for j in 0..kw {
                    tail[i * kw + j] += grow[xo] * xp[(y + i * dh) * wp + xo + j * dw];
                }
            }
        }
    }
}

/// [`weight_grad_plane`] with the kernel size fixed at compile time and the per-tap
/// accumulators copied into a local array for the plane (so that they live in registers
/// instead of being loaded and stored around every multiply-add).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn weight_grad_plane_fixed<T: Elem, const KH: usize, const KW: usize, const TAPS: usize>(
    xp: &[T],
    wp: usize,
    gp: &[T],
    dims: (usize, usize),
    ds: (usize, usize),
    acc: &mut [[T; LANES]; TAPS],
    tail: &mut [T],
) {
    let mut a = *acc;
    weight_grad_plane(xp, wp, gp, dims, (KH, KW), ds, &mut a, tail);
    *acc = a;
}

/// Stride-1 depthwise weight gradient: `dW[t] = sum over images and output positions of
/// gout * (padded x shifted by tap t)`, one 8-lane accumulator per channel and tap.
/// Each rayon task takes a contiguous chunk of the batch and keeps partial sums for all
/// channels, so both tensors stream through memory in order (a task per channel instead
/// read 1 KiB planes 64 KiB apart, and a profile showed it waiting on those loads); the
/// partial sums are added at the end.
fn bwd_weight_s1<T: Elem>(g: &ConvGeom, x: &[T], gout: &[T]) -> Vec<T> {
    let (hw, ohw, taps, mult) = (g.hw(), g.ohw(), g.kh * g.kw, g.cout / g.cin);
    let (hp, wp) = (g.h + 2 * g.ph, g.w + 2 * g.pw);
    let tasks = (rayon::current_num_threads() * 4).clamp(1, g.n.max(1));
    let chunk = g.n.div_ceil(tasks);
    let dims = ((g.oh, g.ow), (g.dh, g.dw));
    let partial = |t: usize| {
        let mut acc = vec![[T::ZERO; LANES]; g.cout * taps];
        let mut tail = vec![T::ZERO; g.cout * taps];
        with_zeroed_scratch(hp * wp, |xp| {
            simd(
                #[inline(always)]
                || {
                    for ni in (t * chunk).min(g.n)..((t + 1) * chunk).min(g.n) {
                        for ci in 0..g.cin {
                            copy_interior(&x[(ni * g.cin + ci) * hw..][..hw], g.h, g.w, g.ph, g.pw, wp, xp);
                            for co in ci * mult..(ci + 1) * mult {
                                let gp = &gout[(ni * g.cout + co) * ohw..][..ohw];
                                let a = &mut acc[co * taps..][..taps];
                                let tl = &mut tail[co * taps..][..taps];
                                if let Ok(a9) = <&mut [[T; LANES]; 9]>::try_from(&mut *a) {
                                    if (g.kh, g.kw) == (3, 3) {
                                        weight_grad_plane_fixed::<T, 3, 3, 9>(xp, wp, gp, dims.0, dims.1, a9, tl);
                                        continue;
                                    }
                                }
                                weight_grad_plane(xp, wp, gp, dims.0, (g.kh, g.kw), dims.1, a, tl);
                            }
                        }
                    }
                },
            )
        });
        (acc, tail)
    };
    let parts: Vec<_> = (0..tasks).into_par_iter().map(partial).collect();
    (0..g.cout * taps)
        .map(|i| {
            let mut a = [T::ZERO; LANES];
            let mut tl = T::ZERO;
            for (pa, pt) in &parts {
                for l in 0..LANES {
                    a[l] += pa[i][l];
                }
                tl += pt[i];
            }
            ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])) + tl
        })
        .collect()
}

/// Iterates over the valid (kernel tap, output row) pairs of one plane, calling
/// `f(tap, out_row, in_row, lo, hi, start)`, where output columns `lo..hi` read input
/// columns `start + i*sw` for `i in 0..hi-lo`.
#[inline(always)]
fn for_taps(g: &ConvGeom, mut f: impl FnMut(usize, usize, usize, usize, usize, usize)) {
    for ki in 0..g.kh {
        for kj in 0..g.kw {
            let offw = kj * g.dw;
            let (lo, hi) = valid_range(offw, g.pw, g.sw, g.w, g.ow);
            if hi <= lo {
                continue;
            }
            let start = lo * g.sw + offw - g.pw;
            for y in 0..g.oh {
                let ih = (y * g.sh + ki * g.dh) as isize - g.ph as isize;
                if ih < 0 || ih >= g.h as isize {
                    continue;
                }
                f(ki * g.kw + kj, y, ih as usize, lo, hi, start);
            }
        }
    }
}

/// Depthwise forward, parallel over output planes.
pub(crate) fn fwd<T: Elem>(g: &ConvGeom, x: &[T], w: &[T]) -> Vec<T> {
    if g.sh == 1 && g.sw == 1 {
        return fwd_s1(g, x, w);
    }
    let (hw, ohw, taps, mult) = (g.hw(), g.ohw(), g.kh * g.kw, g.cout / g.cin);
    let mut out = vec![T::ZERO; g.n * g.cout * ohw];
    out.par_chunks_mut(ohw).enumerate().for_each(|(p, o)| {
        let (ni, co) = (p / g.cout, p % g.cout);
        let xc = &x[(ni * g.cin + co / mult) * hw..][..hw];
        let wk = &w[co * taps..][..taps];
        simd(
            #[inline(always)]
            || {
                for_taps(g, |t, y, ih, lo, hi, start| {
                    let wv = wk[t];
                    let src = &xc[ih * g.w..(ih + 1) * g.w];
                    let dst = &mut o[y * g.ow + lo..y * g.ow + hi];
                    if g.sw == 1 {
                        for (d, s) in dst.iter_mut().zip(&src[start..start + hi - lo]) {
                            *d += wv * *s;
                        }
                    } else {
                        for (i, d) in dst.iter_mut().enumerate() {
                            *d += wv * src[start + i * g.sw];
                        }
                    }
                })
            },
        );
    });
    out
}

/// Depthwise input gradient, parallel over input planes.
pub(crate) fn bwd_input<T: Elem>(g: &ConvGeom, gout: &[T], w: &[T]) -> Vec<T> {
    if g.hw() == 0 {
        // an empty input (possible with padding alone covering the kernel) has no gradient
        // to write; chunking the empty buffer by zero-sized planes would panic
        return Vec::new();
    }
    if g.sh == 1 && g.sw == 1 && g.ph <= (g.kh - 1) * g.dh && g.pw <= (g.kw - 1) * g.dw {
        return bwd_input_s1(g, gout, w);
    }
    let (hw, ohw, taps, mult) = (g.hw(), g.ohw(), g.kh * g.kw, g.cout / g.cin);
    let mut gx = vec![T::ZERO; g.n * g.cin * hw];
    gx.par_chunks_mut(hw).enumerate().for_each(|(p, gxc)| {
        let (ni, ci) = (p / g.cin, p % g.cin);
        for m in 0..mult {
            let co = ci * mult + m;
            let gp = &gout[(ni * g.cout + co) * ohw..][..ohw];
            let wk = &w[co * taps..][..taps];
            simd(
                #[inline(always)]
                || {
                    for_taps(g, |t, y, ih, lo, hi, start| {
                        let wv = wk[t];
                        let src = &gp[y * g.ow + lo..y * g.ow + hi];
                        let dst = &mut gxc[ih * g.w..(ih + 1) * g.w];
                        if g.sw == 1 {
                            for (d, s) in dst[start..start + hi - lo].iter_mut().zip(src) {
                                *d += wv * *s;
                            }
                        } else {
                            for (i, s) in src.iter().enumerate() {
                                dst[start + i * g.sw] += wv * *s;
                            }
                        }
                    })
                },
            );
        }
    });
    gx
}

/// Depthwise weight gradient, parallel over output channels (each sums over the batch).
pub(crate) fn bwd_weight<T: Elem>(g: &ConvGeom, x: &[T], gout: &[T]) -> Vec<T> {
    if g.sh == 1 && g.sw == 1 {
        return bwd_weight_s1(g, x, gout);
    }
    let (hw, ohw, taps, mult) = (g.hw(), g.ohw(), g.kh * g.kw, g.cout / g.cin);
    let mut gw = vec![T::ZERO; g.cout * taps];
    gw.par_chunks_mut(taps).enumerate().for_each(|(co, gwk)| {
        let ci = co / mult;
        for ni in 0..g.n {
            let xc = &x[(ni * g.cin + ci) * hw..][..hw];
            let gp = &gout[(ni * g.cout + co) * ohw..][..ohw];
            simd(
                #[inline(always)]
                || {
                    for_taps(g, |t, y, ih, lo, hi, start| {
                        let src = &xc[ih * g.w..(ih + 1) * g.w];
                        let gr = &gp[y * g.ow + lo..y * g.ow + hi];
                        if g.sw == 1 {
                            gwk[t] += dot(gr, &src[start..start + hi - lo]);
                        } else {
                            let mut s = T::ZERO;
                            for (i, v) in gr.iter().enumerate() {
                                s += *v * src[start + i * g.sw];
                            }
                            gwk[t] += s;
                        }
                    })
                },
            );
        }
    });
    gw
}
