//! Winograd minimal-filtering convolution F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for
//! Convolutional Neural Networks", CVPR 2016) for 3x3, stride-1, undilated, ungrouped
//! convolutions: the CIFAR ResNets' main layers, and (through
//! [`ConvGeom::transposed_as_conv`]) their input gradients.
//!
//! Each 2x2 output tile is `Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A` (Lavin & Gray, eq. 8) for
//! the 4x4 input tile `d` and the 3x3 filter `g`. Summed over input channels, the
//! element-wise product becomes 16 independent gemms `M_e = U_e V_e` (`e` the position in
//! the 4x4 transformed tile, eq. 12), each `[cout, cin] x [cin, tiles]`: 16 multiplications
//! per tile and channel pair instead of the 36 of direct or im2col convolution (2.25x fewer
//! flops), for the price of the input and output transforms, which are additions only.
//!
//! The transforms' constants (all exact in binary floating point):
//! `B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]`,
//! `G = [[1,0,0],[1/2,1/2,1/2],[1/2,-1/2,1/2],[0,0,1]]`, `A^T = [[1,1,1,0],[0,1,-1,-1]]`.

use super::conv::ConvGeom;
use super::elem::{gemm, outer_par, simd, Elem, Mat};
use gemm::Parallelism;
use rayon::prelude::*;

/// Smallest channel count for which the weight-gradient transforms pay off.
const MIN_CHANNELS: usize = 8;

/// Smallest input and output channel count for which the forward path pays off. Measured
/// at batch 128 on 2 threads (`examples/conv_parts.rs`): 16 channels at 32x32 or 28x28 ran
/// as fast with im2col (about 5 and 3.7 ms either way; with 16 channels the transforms,
/// not the gemms, dominate), 32 channels at 16x16 took 3.3 ms instead of 3.9-4.9, 64 at
/// 8x8 2.6 instead of 4.0.
const MIN_CHANNELS_FORWARD: usize = 32;

/// Channels handled together by the transforms: one AVX2 vector of f32. The transformed
/// tensors keep channels innermost (`[16][tiles][channels]`), so every transform step is a
/// vector operation over 8 channels whatever the plane size (an 8x8 plane has only 4 tiles
/// across, too few to vectorise along).
const LANES: usize = 8;

/// Budget, in elements, of the 16 transformed input matrices of one block of images
/// (`16 * tiles * cin`, 512 KiB of f32). Measured on ResNet-20 shapes (batch 128, 2
/// threads, `examples/conv_parts.rs`): 64 Ki elements and 128 Ki were within noise of
/// each other, 32 Ki slower on 64ch@8x8 (fewer images per gemm).
const BLOCK_ELEMS: usize = 128 * 1024;

/// Distance between the 16 matrices of a transformed block holding `len` elements each:
/// rounded to 4 KiB plus one cache line, so that the 16 streams written together by a
/// transform do not map to the same L1 cache set (with 256 tiles of 16 channels they would
/// be exactly 16 KiB apart).
fn e_stride(len: usize) -> usize {
    len.next_multiple_of(1024) + 16
}

/// Whether the F(2x2, 3x3) path computes this convolution's forward pass (also used for
/// the input gradient of a stride-1 layer, itself such a convolution).
pub(crate) fn pays_forward(g: &ConvGeom) -> bool {
    applies(g) && g.cin >= MIN_CHANNELS_FORWARD && g.cout >= MIN_CHANNELS_FORWARD
}

/// Whether the F(2x2, 3x3) path can compute this convolution (and pays off for its weight
/// gradient).
pub(crate) fn applies(g: &ConvGeom) -> bool {
    g.kh == 3
        && g.kw == 3
        && (g.sh, g.sw, g.dh, g.dw, g.groups) == (1, 1, 1, 1, 1)
        && g.cin >= MIN_CHANNELS
        && g.cout >= MIN_CHANNELS
        && g.oh >= 2
        && g.ow >= 2
}

/// Tile grid of one output plane: `(tiles down, tiles across)`.
fn tiles(g: &ConvGeom) -> (usize, usize) {
    (g.oh.div_ceil(2), g.ow.div_ceil(2))
}

type Lanes<T> = [T; LANES];

#[inline(always)]
fn add<T: Elem>(a: &Lanes<T>, b: &Lanes<T>) -> Lanes<T> {
    std::array::from_fn(|i| a[i] + b[i])
}

#[inline(always)]
fn sub<T: Elem>(a: &Lanes<T>, b: &Lanes<T>) -> Lanes<T> {
    std::array::from_fn(|i| a[i] - b[i])
}

/// `U_e = (G g G^T)_e` for every filter (eq. 8), laid out `[16][cin][cout]` (each `U_e^T`
/// row-major, the right operand of `M_e^T = V_e^T U_e^T`).
fn transform_filters<T: Elem>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    let (cout, cin) = (g.cout, g.cin);
    let half = T::from_f64(0.5);
    let mut u = vec![T::ZERO; 16 * cout * cin];
    for co in 0..cout {
        for ci in 0..cin {
            let f = &w[(co * cin + ci) * 9..][..9];
            // t = G g (4x3), rows of g are f[0..3], f[3..6], f[6..9]
            let mut t = [[T::ZERO; 3]; 4];
            for c in 0..3 {
                let (a, b, d) = (f[c], f[3 + c], f[6 + c]);
                t[0][c] = a;
                t[1][c] = (a + b + d) * half;
                t[2][c] = (a - b + d) * half;
                t[3][c] = d;
            }
            // U = t G^T (4x4)
            for (r, row) in t.iter().enumerate() {
                let [a, b, d] = *row;
                let vals = [a, (a + b + d) * half, (a - b + d) * half, d];
                for (c, v) in vals.into_iter().enumerate() {
                    u[((r * 4 + c) * cin + ci) * cout + co] = v;
                }
            }
        }
    }
    u
}

/// Input transform `V = B^T d B` (eq. 8) of every 4x4 tile of 8 input planes
/// `x[c * hw ..]` (`c < lanes`; missing lanes read as zero), written to
/// `v[e * e_stride + (p0 + ty * tw + tx) * ld ..][..8]`. `scratch` holds the interleaved,
/// zero-padded planes and the row pass (`(hp * wp + hp * tw * 4) * 8` elements).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn transform_input<T: Elem>(g: &ConvGeom, x: &[T], lanes: usize, scratch: &mut [T], v: &mut [T], e_stride: usize, ld: usize, p0: usize) {
    let (th, tw) = tiles(g);
    let (hp, wp) = (2 * th + 2, 2 * tw + 2);
    let (xp, rows) = scratch.split_at_mut(hp * wp * LANES);
    // interleaved, zero-padded planes: xp[(r * wp + c) * 8 + l] = x_l(r - ph, c - pw)
    let hw = g.h * g.w;
    let row_len = wp * LANES;
    // zero rows above and below the image, and the padding columns left and right
    xp[..g.ph * row_len].fill(T::ZERO);
    xp[(g.ph + g.h) * row_len..].fill(T::ZERO);
    for y in 0..g.h {
        let row = &mut xp[(y + g.ph) * row_len..][..row_len];
        row[..g.pw * LANES].fill(T::ZERO);
        row[(g.pw + g.w) * LANES..].fill(T::ZERO);
        let dst = &mut row[g.pw * LANES..][..g.w * LANES];
        if lanes == LANES {
            // all 8 planes: a fixed-width transpose the compiler unrolls
            for (c, px) in dst.chunks_exact_mut(LANES).enumerate() {
                for (l, o) in px.iter_mut().enumerate() {
                    *o = x[l * hw + y * g.w + c];
                }
            }
        } else {
            for (c, px) in dst.chunks_exact_mut(LANES).enumerate() {
                for (l, o) in px.iter_mut().enumerate() {
                    *o = if l < lanes { x[l * hw + y * g.w + c] } else { T::ZERO };
                }
            }
        }
    }
    let at = |buf: &[T], i: usize| -> Lanes<T> { buf[i * LANES..][..LANES].try_into().expect("8 lanes") };
    // row pass: rows[(r * tw + tx) * 4 + k] = (d B)[r][k] of tile column tx
    for r in 0..hp {
        for tx in 0..tw {
            let c = r * wp + 2 * tx;
            let (d0, d1, d2, d3) = (at(xp, c), at(xp, c + 1), at(xp, c + 2), at(xp, c + 3));
            let out = [sub(&d0, &d2), add(&d1, &d2), sub(&d2, &d1), sub(&d1, &d3)];
            for (k, o) in out.iter().enumerate() {
                rows[((r * tw + tx) * 4 + k) * LANES..][..LANES].copy_from_slice(o);
            }
        }
    }
    // column pass: V = B^T (d B) for every tile
    for ty in 0..th {
        for tx in 0..tw {
            let p = p0 + ty * tw + tx;
            for k in 0..4 {
                let row = |i: usize| at(rows, ((2 * ty + i) * tw + tx) * 4 + k);
                let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
                let out = [sub(&r0, &r2), add(&r1, &r2), sub(&r2, &r1), sub(&r1, &r3)];
                for (j, o) in out.iter().enumerate() {
                    v[(j * 4 + k) * e_stride + p * ld..][..LANES].copy_from_slice(o);
                }
            }
        }
    }
}

/// Output transform `Y = A^T M A` (eq. 8) of every tile of 8 output planes, reading
/// `m[e * e_stride + (p0 + ty * tw + tx) * ld ..][..8]` and writing the planes
/// `y[l * ohw ..]` for `l < lanes`.
#[inline(always)]
fn transform_output<T: Elem>(g: &ConvGeom, m: &[T], e_stride: usize, ld: usize, p0: usize, lanes: usize, y: &mut [T]) {
    let (th, tw) = tiles(g);
    let (oh, ow, ohw) = (g.oh, g.ow, g.ohw());
    for ty in 0..th {
        for tx in 0..tw {
            let p = p0 + ty * tw + tx;
            let me = |e: usize| -> Lanes<T> { m[e * e_stride + p * ld..][..LANES].try_into().expect("8 lanes") };
            // s = M A (4x2 per lane), then Y = A^T s (2x2 per lane)
            let mut s0 = [[T::ZERO; LANES]; 4];
            let mut s1 = [[T::ZERO; LANES]; 4];
            for xi in 0..4 {
                let (a, b, c, d) = (me(xi * 4), me(xi * 4 + 1), me(xi * 4 + 2), me(xi * 4 + 3));
                s0[xi] = add(&add(&a, &b), &c);
                s1[xi] = sub(&sub(&b, &c), &d);
            }
            let out = [
                (0, 0, add(&add(&s0[0], &s0[1]), &s0[2])),
                (0, 1, add(&add(&s1[0], &s1[1]), &s1[2])),
                (1, 0, sub(&sub(&s0[1], &s0[2]), &s0[3])),
                (1, 1, sub(&sub(&s1[1], &s1[2]), &s1[3])),
            ];
            for (i, j, vals) in out {
                let (oy, ox) = (2 * ty + i, 2 * tx + j);
                if oy < oh && ox < ow {
                    let at = oy * ow + ox;
                    if lanes == LANES {
                        for (l, &v) in vals.iter().enumerate() {
                            y[l * ohw + at] = v;
                        }
                    } else {
                        for (l, &v) in vals.iter().enumerate().take(lanes) {
                            y[l * ohw + at] = v;
                        }
                    }
                }
            }
        }
    }
}

/// Forward convolution through F(2x2, 3x3) (see the module docs); [`applies`] must hold.
/// Blocks of whole images are transformed, multiplied and transformed back per rayon task.
pub(crate) fn conv_fwd<T: Elem>(g: &ConvGeom, x: &[T], w: &[T]) -> Vec<T> {
    debug_assert!(applies(g));
    let (cin, cout, hw, ohw) = (g.cin, g.cout, g.hw(), g.ohw());
    let (cin_ld, cout_ld) = (cin.next_multiple_of(LANES), cout.next_multiple_of(LANES));
    let (th, tw) = tiles(g);
    let tiles_img = th * tw;
    let u = transform_filters(g, w);
    let bimg = (BLOCK_ELEMS / (16 * cin_ld * tiles_img)).clamp(1, g.n.max(1));
    let plane_scratch = ((2 * th + 2) * (2 * tw + 2) + (2 * th + 2) * tw * 4) * LANES;
    let per_block = |b0: usize, out: &mut [T], par: Parallelism| {
        let nb = out.len() / (cout * ohw);
        let p = nb * tiles_img;
        let (ve_len, me_len) = (e_stride(p * cin_ld), e_stride(p * cout_ld));
        let (v_len, m_len) = (16 * ve_len, 16 * me_len);
        T::with_scratch(v_len + m_len, |buf| {
            let (v, m) = buf.split_at_mut(v_len);
            T::with_scratch2(plane_scratch, |scratch| {
                simd(
                    #[inline(always)]
                    || {
                        for b in 0..nb {
                            for c0 in (0..cin).step_by(LANES) {
                                let planes = &x[((b0 + b) * cin + c0) * hw..];
                                let lanes = LANES.min(cin - c0);
                                transform_input(g, planes, lanes, scratch, &mut v[c0..], ve_len, cin_ld, b * tiles_img);
                            }
                        }
                    },
                )
            });
            for e in 0..16 {
                let ue = &u[e * cin * cout..][..cin * cout];
                let ve = &v[e * ve_len..][..p * cin_ld];
                let me = &mut m[e * me_len..][..p * cout_ld];
                // SAFETY: V_e^T is p x cin (row stride cin_ld), U_e^T cin x cout, M_e^T p x cout
                // (row stride cout_ld), all inside their buffers.
                unsafe {
                    gemm(
                        p,
                        cout,
                        cin,
                        me.as_mut_ptr(),
                        cout_ld,
                        false,
                        Mat::rm(ve, cin_ld),
                        Mat::rm(ue, cout),
                        par,
                    )
                };
            }
            simd(
                #[inline(always)]
                || {
                    for b in 0..nb {
                        for c0 in (0..cout).step_by(LANES) {
                            let y = &mut out[(b * cout + c0) * ohw..];
                            transform_output(g, &m[c0..], me_len, cout_ld, b * tiles_img, LANES.min(cout - c0), y);
                        }
                    }
                },
            );
        });
    };
    let len = g.n * cout * ohw;
    let mut out: Vec<T> = Vec::with_capacity(len);
    // SAFETY: the output transform writes every position `oy < oh, ox < ow` of every
    // plane `co < cout` of every image before anything reads it; T is a plain float.
    #[allow(clippy::uninit_vec)]
    unsafe {
        out.set_len(len)
    };
    if len == 0 {
        return out;
    }
    if g.n <= bimg {
        per_block(0, &mut out, outer_par());
    } else {
        out.par_chunks_mut(bimg * cout * ohw)
            .enumerate()
            .for_each(|(i, o)| per_block(i * bimg, o, Parallelism::None));
    }
    out
}

/// Transform `dM = A dY A^T` of the output gradient (the adjoint of the output transform
/// `Y = A^T M A`) for every tile of 8 planes `gy[l * ohw ..]` (`l < lanes`; positions past
/// the output, in the last tile row or column of an odd size, count as zero), written to
/// `dm[e * e_stride + (p0 + ty * tw + tx) * ld ..][..8]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn transform_output_grad<T: Elem>(g: &ConvGeom, gy: &[T], lanes: usize, dm: &mut [T], e_stride: usize, ld: usize, p0: usize) {
    let (th, tw) = tiles(g);
    let (oh, ow, ohw) = (g.oh, g.ow, g.ohw());
    for ty in 0..th {
        for tx in 0..tw {
            let load = |i: usize, j: usize| -> Lanes<T> {
                let (oy, ox) = (2 * ty + i, 2 * tx + j);
                let mut v = [T::ZERO; LANES];
                if oy < oh && ox < ow {
                    let at = oy * ow + ox;
                    if lanes == LANES {
                        for (l, o) in v.iter_mut().enumerate() {
                            *o = gy[l * ohw + at];
                        }
                    } else {
                        for (l, o) in v.iter_mut().enumerate().take(lanes) {
                            *o = gy[l * ohw + at];
                        }
                    }
                }
                v
            };
            let (a, b, c, d) = (load(0, 0), load(0, 1), load(1, 0), load(1, 1));
            let zero = [T::ZERO; LANES];
            // A dY (4x2), then (A dY) A^T (4x4): a row [x, y] becomes [x, x + y, x - y, -y]
            let rows = [
                (a, b),
                (add(&a, &c), add(&b, &d)),
                (sub(&a, &c), sub(&b, &d)),
                (sub(&zero, &c), sub(&zero, &d)),
            ];
            let p = p0 + ty * tw + tx;
            for (r, (x, y)) in rows.iter().enumerate() {
                let vals = [*x, add(x, y), sub(x, y), sub(&zero, y)];
                for (c, val) in vals.iter().enumerate() {
                    dm[(r * 4 + c) * e_stride + p * ld..][..LANES].copy_from_slice(val);
                }
            }
        }
    }
}

/// `dg = G^T dU G` (the adjoint of `U = G g G^T`): from `du[16][cout][cin]` to the weight
/// gradient `[cout, cin, 3, 3]`.
#[allow(clippy::needless_range_loop)]
fn filter_grads<T: Elem>(g: &ConvGeom, du: &[T]) -> Vec<T> {
    let (cout, cin) = (g.cout, g.cin);
    let half = T::from_f64(0.5);
    let mut dw = vec![T::ZERO; cout * cin * 9];
    for co in 0..cout {
        for ci in 0..cin {
            let u = |r: usize, c: usize| du[((r * 4 + c) * cout + co) * cin + ci];
            // t = G^T dU (3x4)
            let mut t = [[T::ZERO; 4]; 3];
            for c in 0..4 {
                let (u0, u1, u2, u3) = (u(0, c), u(1, c), u(2, c), u(3, c));
                t[0][c] = u0 + (u1 + u2) * half;
                t[1][c] = (u1 - u2) * half;
                t[2][c] = (u1 + u2) * half + u3;
            }
            // dg = t G (3x3)
            let f = &mut dw[(co * cin + ci) * 9..][..9];
            for (r, [a, b, c, d]) in t.into_iter().enumerate() {
                f[r * 3] = a + (b + c) * half;
                f[r * 3 + 1] = (b - c) * half;
                f[r * 3 + 2] = (b + c) * half + d;
            }
        }
    }
    dw
}

/// Weight gradient through F(2x2, 3x3): `dU_e = sum over tiles of dM_e V_e^T` (the adjoint
/// of eq. 12), then `dg = G^T dU G`. One partial `dU` per worker thread (contiguous batch
/// chunks), reduced at the end; [`applies`] must hold.
pub(crate) fn conv_bwd_weight<T: Elem>(g: &ConvGeom, x: &[T], gout: &[T]) -> Vec<T> {
    debug_assert!(applies(g));
    let (cin, cout, hw, ohw) = (g.cin, g.cout, g.hw(), g.ohw());
    let (cin_ld, cout_ld) = (cin.next_multiple_of(LANES), cout.next_multiple_of(LANES));
    let (th, tw) = tiles(g);
    let tiles_img = th * tw;
    let bimg = (BLOCK_ELEMS / (16 * cin_ld.max(cout_ld) * tiles_img)).clamp(1, g.n.max(1));
    let plane_scratch = ((2 * th + 2) * (2 * tw + 2) + (2 * th + 2) * tw * 4) * LANES;
    let nth = rayon::current_num_threads().min(g.n).max(1);
    let chunk = g.n.div_ceil(nth);
    let par = if nth == 1 { outer_par() } else { Parallelism::None };
    let partial = |t: usize| {
        let mut du = vec![T::ZERO; 16 * cout * cin];
        let (lo, hi) = ((t * chunk).min(g.n), ((t + 1) * chunk).min(g.n));
        let mut first = true;
        let mut b0 = lo;
        while b0 < hi {
            let nb = bimg.min(hi - b0);
            let p = nb * tiles_img;
            let (ve_len, me_len) = (e_stride(p * cin_ld), e_stride(p * cout_ld));
            T::with_scratch(16 * (ve_len + me_len), |buf| {
                let (v, dm) = buf.split_at_mut(16 * ve_len);
                T::with_scratch2(plane_scratch, |scratch| {
                    simd(
                        #[inline(always)]
                        || {
                            for b in 0..nb {
                                for c0 in (0..cin).step_by(LANES) {
                                    let planes = &x[((b0 + b) * cin + c0) * hw..];
                                    transform_input(g, planes, LANES.min(cin - c0), scratch, &mut v[c0..], ve_len, cin_ld, b * tiles_img);
                                }
                                for c0 in (0..cout).step_by(LANES) {
                                    let planes = &gout[((b0 + b) * cout + c0) * ohw..];
                                    transform_output_grad(g, planes, LANES.min(cout - c0), &mut dm[c0..], me_len, cout_ld, b * tiles_img);
                                }
                            }
                        },
                    )
                });
                for e in 0..16 {
                    let ve = &v[e * ve_len..][..p * cin_ld];
                    let dme = &dm[e * me_len..][..p * cout_ld];
                    let due = &mut du[e * cout * cin..][..cout * cin];
                    // SAFETY: dM_e is read as cout x p (column stride cout_ld), V_e^T as p x cin
                    // (row stride cin_ld), dU_e is cout x cin; all inside their buffers.
                    unsafe {
                        gemm(
                            cout,
                            cin,
                            p,
                            due.as_mut_ptr(),
                            cin,
                            !first,
                            Mat::tr(dme, cout_ld),
                            Mat::rm(ve, cin_ld),
                            par,
                        )
                    };
                }
            });
            first = false;
            b0 += nb;
        }
        du
    };
    let mut parts: Vec<Vec<T>> = (0..nth).into_par_iter().map(partial).collect();
    let mut du = parts.swap_remove(0);
    for part in parts {
        for (o, v) in du.iter_mut().zip(part) {
            *o += v;
        }
    }
    filter_grads(g, &du)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Conv2dOpts;

    /// Direct 6-loop convolution in f64 (the reference).
    fn direct(g: &ConvGeom, x: &[f64], w: &[f64]) -> Vec<f64> {
        let mut y = vec![0.0; g.n * g.cout * g.ohw()];
        for n in 0..g.n {
            for co in 0..g.cout {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let mut s = 0.0;
                        for ci in 0..g.cin {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let (iy, ix) = ((oy + i) as isize - g.ph as isize, (ox + j) as isize - g.pw as isize);
                                    if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                        s += x[((n * g.cin + ci) * g.h + iy as usize) * g.w + ix as usize]
                                            * w[((co * g.cin + ci) * 3 + i) * 3 + j];
                                    }
                                }
                            }
                        }
                        y[((n * g.cout + co) * g.oh + oy) * g.ow + ox] = s;
                    }
                }
            }
        }
        y
    }

    /// `(n, cin, cout, h, w, pad)`: odd outputs, padding 0/1/2, channel counts that are not
    /// multiples of 8, one block and many blocks.
    const CASES: [(usize, usize, usize, usize, usize, usize); 5] = [
        (2, 8, 9, 8, 8, 1),
        (3, 9, 8, 7, 5, 1),
        (1, 8, 8, 5, 6, 0),
        (2, 10, 12, 4, 9, 2),
        (40, 8, 8, 6, 6, 1),
    ];

    /// Geometry of a case and a seeded stream of values in [-0.5, 0.5).
    fn case(c: (usize, usize, usize, usize, usize, usize), seed: u64) -> (ConvGeom, impl FnMut() -> f64) {
        let (n, cin, cout, h, w, p) = c;
        let o = Conv2dOpts {
            padding: (p, p),
            ..Default::default()
        };
        let g = ConvGeom::new(&[n, cin, h, w], &[cout, cin, 3, 3], &o).unwrap();
        let mut s = seed;
        let rnd = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        (g, rnd)
    }

    fn max_err(a: &[f64], b: impl IntoIterator<Item = f64>) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    #[test]
    fn equals_direct_convolution_on_odd_and_even_shapes() {
        for c in CASES {
            let (g, mut rnd) = case(c, 7);
            assert!(applies(&g));
            let x: Vec<f64> = (0..g.n * g.cin * g.hw()).map(|_| rnd()).collect();
            let wt: Vec<f64> = (0..g.cout * g.cin * 9).map(|_| rnd()).collect();
            let want = direct(&g, &x, &wt);
            let err = max_err(&want, conv_fwd(&g, &x, &wt));
            assert!(err < 1e-12, "{c:?}: max error {err}");
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let w32: Vec<f32> = wt.iter().map(|&v| v as f32).collect();
            let err = max_err(&want, conv_fwd(&g, &x32, &w32).into_iter().map(f64::from));
            assert!(err < 1e-5, "f32 {c:?}: max error {err}");
        }
    }

    /// Direct weight gradient `dW[co, ci, i, j] = sum gy[n, co, y, x] x[n, ci, y + i - ph, x + j - pw]`.
    fn direct_weight_grad(g: &ConvGeom, x: &[f64], gy: &[f64]) -> Vec<f64> {
        let mut dw = vec![0.0; g.cout * g.cin * 9];
        for n in 0..g.n {
            for co in 0..g.cout {
                for ci in 0..g.cin {
                    for i in 0..3 {
                        for j in 0..3 {
                            let mut s = 0.0;
                            for oy in 0..g.oh {
                                for ox in 0..g.ow {
                                    let (iy, ix) = ((oy + i) as isize - g.ph as isize, (ox + j) as isize - g.pw as isize);
                                    if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                        s += gy[((n * g.cout + co) * g.oh + oy) * g.ow + ox]
                                            * x[((n * g.cin + ci) * g.h + iy as usize) * g.w + ix as usize];
                                    }
                                }
                            }
                            dw[((co * g.cin + ci) * 3 + i) * 3 + j] += s;
                        }
                    }
                }
            }
        }
        dw
    }

    #[test]
    fn weight_gradient_equals_direct_sum_on_odd_and_even_shapes() {
        for c in CASES {
            let (g, mut rnd) = case(c, 11);
            let x: Vec<f64> = (0..g.n * g.cin * g.hw()).map(|_| rnd()).collect();
            let gy: Vec<f64> = (0..g.n * g.cout * g.ohw()).map(|_| rnd()).collect();
            let err = max_err(&direct_weight_grad(&g, &x, &gy), conv_bwd_weight(&g, &x, &gy));
            assert!(err < 1e-11, "{c:?}: max error {err}");
        }
    }

    #[test]
    fn only_3x3_stride_1_ungrouped_convolutions_with_enough_channels_apply() {
        let geom = |wd: [usize; 4], o: Conv2dOpts| ConvGeom::new(&[2, 16, 8, 8], &wd, &o).unwrap();
        let pad1 = Conv2dOpts {
            padding: (1, 1),
            ..Default::default()
        };
        assert!(applies(&geom([16, 16, 3, 3], pad1)));
        assert!(!applies(&geom([16, 16, 3, 3], Conv2dOpts { stride: (2, 2), ..pad1 })));
        assert!(!applies(&geom([16, 16, 3, 3], Conv2dOpts { dilation: (2, 2), ..pad1 })));
        assert!(!applies(&geom([16, 8, 3, 3], Conv2dOpts { groups: 2, ..pad1 })));
        assert!(!applies(&geom([16, 16, 1, 1], Conv2dOpts::default())));
        assert!(!applies(&geom([4, 16, 3, 3], pad1)));
        // the forward pass only from 32 channels in and out
        assert!(!pays_forward(&geom([16, 16, 3, 3], pad1)));
        let wide = ConvGeom::new(&[2, 32, 8, 8], &[32, 32, 3, 3], &pad1).unwrap();
        assert!(pays_forward(&wide));
    }
}
