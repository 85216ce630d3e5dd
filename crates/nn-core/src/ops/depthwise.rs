//! Direct kernels for depthwise convolutions (one input channel per group, optional
//! channel multiplier): here im2col + gemm would degenerate into many `1 x k` products,
//! so each output plane is computed with vectorisable row loops instead.

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
    let (hw, ohw, taps, mult) = (g.hw(), g.ohw(), g.kh * g.kw, g.cout / g.cin);
    let mut out = vec![T::ZERO; g.n * g.cout * ohw];
    out.par_chunks_mut(ohw).enumerate().for_each(|(p, o)| {
        let (ni, co) = (p / g.cout, p % g.cout);
        let xc = &x[(ni * g.cin + co / mult) * hw..][..hw];
        let wk = &w[co * taps..][..taps];
        simd(|| {
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
        });
    });
    out
}

/// Depthwise input gradient, parallel over input planes.
pub(crate) fn bwd_input<T: Elem>(g: &ConvGeom, gout: &[T], w: &[T]) -> Vec<T> {
    let (hw, ohw, taps, mult) = (g.hw(), g.ohw(), g.kh * g.kw, g.cout / g.cin);
    let mut gx = vec![T::ZERO; g.n * g.cin * hw];
    gx.par_chunks_mut(hw).enumerate().for_each(|(p, gxc)| {
        let (ni, ci) = (p / g.cin, p % g.cin);
        for m in 0..mult {
            let co = ci * mult + m;
            let gp = &gout[(ni * g.cout + co) * ohw..][..ohw];
            let wk = &w[co * taps..][..taps];
            simd(|| {
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
            });
        }
    });
    gx
}

/// Depthwise weight gradient, parallel over output channels (each sums over the batch).
pub(crate) fn bwd_weight<T: Elem>(g: &ConvGeom, x: &[T], gout: &[T]) -> Vec<T> {
    let (hw, ohw, taps, mult) = (g.hw(), g.ohw(), g.kh * g.kw, g.cout / g.cin);
    let mut gw = vec![T::ZERO; g.cout * taps];
    gw.par_chunks_mut(taps).enumerate().for_each(|(co, gwk)| {
        let ci = co / mult;
        for ni in 0..g.n {
            let xc = &x[(ni * g.cin + ci) * hw..][..hw];
            let gp = &gout[(ni * g.cout + co) * ohw..][..ohw];
            simd(|| {
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
            });
        }
    });
    gw
}
