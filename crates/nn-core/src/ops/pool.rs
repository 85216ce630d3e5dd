//! Max / average / adaptive-average / global-average pooling kernels with backward.
//!
//! Every pooling variant is described by two lists of per-axis windows (`[start, end)`
//! clamped to the input, plus the unclamped size for `count_include_pad`), so one
//! forward and one backward kernel per reduction cover fixed-size windows with any
//! kernel/stride/padding and PyTorch's adaptive start/end rule alike.

use super::elem::{contiguous, simd, Elem};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// One window along one axis.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Win {
    /// First input index (clamped to the input).
    pub s: usize,
    /// One past the last input index (clamped to the input).
    pub e: usize,
    /// Window size including padding (PyTorch's `count_include_pad` divisor factor).
    pub full: usize,
}

/// Windows of a fixed-size pooling along an axis of length `len`.
pub(crate) fn fixed_windows(len: usize, k: usize, s: usize, p: usize, what: &str) -> Result<Vec<Win>> {
    if k == 0 || s == 0 {
        candle_core::bail!("{what}: kernel and stride must be positive");
    }
    if 2 * p > k {
        candle_core::bail!("{what}: padding {p} must be at most half the kernel size {k}");
    }
    if len + 2 * p < k {
        candle_core::bail!("{what}: kernel {k} larger than padded input {len}+2*{p}");
    }
    let out = (len + 2 * p - k) / s + 1;
    Ok((0..out)
        .map(|i| {
            let st = (i * s) as isize - p as isize;
            let en = (st + k as isize).min((len + p) as isize);
            let full = (en - st) as usize;
            Win {
                s: st.max(0) as usize,
                e: (en.min(len as isize)).max(0) as usize,
                full,
            }
        })
        .collect())
}

/// PyTorch's adaptive pooling windows: `start = floor(i*len/out)`, `end = ceil((i+1)*len/out)`.
pub(crate) fn adaptive_windows(len: usize, out: usize) -> Vec<Win> {
    (0..out)
        .map(|i| {
            let s = i * len / out;
            let e = ((i + 1) * len).div_ceil(out);
            Win { s, e, full: e - s }
        })
        .collect()
}

/// Reduction applied inside each window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PoolKind {
    Max,
    Avg { include_pad: bool },
}

/// Full description of a pooling call on an `[n, c, h, w]` input.
#[derive(Clone, Debug)]
pub(crate) struct PoolGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub rows: Vec<Win>,
    pub cols: Vec<Win>,
    pub kind: PoolKind,
}

impl PoolGeom {
    fn oh(&self) -> usize {
        self.rows.len()
    }
    fn ow(&self) -> usize {
        self.cols.len()
    }
    fn divisor(&self, r: &Win, c: &Win) -> f64 {
        match self.kind {
            PoolKind::Avg { include_pad: true } => (r.full * c.full) as f64,
            _ => ((r.e - r.s) * (c.e - c.s)).max(1) as f64,
        }
    }
    fn check_in(&self, l: &Layout, what: &str) -> Result<()> {
        if l.dims() != [self.n, self.c, self.h, self.w] {
            candle_core::bail!("{what}: unexpected input shape {:?}", l.dims());
        }
        Ok(())
    }
    fn check_out(&self, l: &Layout, what: &str) -> Result<()> {
        if l.dims() != [self.n, self.c, self.oh(), self.ow()] {
            candle_core::bail!("{what}: unexpected grad shape {:?}", l.dims());
        }
        Ok(())
    }
}

fn pool_fwd<T: Elem>(g: &PoolGeom, x: &[T]) -> Vec<T> {
    let (hw, ohw) = (g.h * g.w, g.oh() * g.ow());
    let mut out = vec![T::ZERO; g.n * g.c * ohw];
    out.par_chunks_mut(ohw).enumerate().for_each(|(p, o)| {
        let xp = &x[p * hw..(p + 1) * hw];
        simd(
            #[inline(always)]
            || {
                for (oy, r) in g.rows.iter().enumerate() {
                    for (ox, c) in g.cols.iter().enumerate() {
                        let v = match g.kind {
                            PoolKind::Max => {
                                let mut m = T::NEG_INF;
                                for y in r.s..r.e {
                                    for &v in &xp[y * g.w + c.s..y * g.w + c.e] {
                                        if v > m {
                                            m = v;
                                        }
                                    }
                                }
                                m
                            }
                            PoolKind::Avg { .. } => {
                                let mut s = T::ZERO;
                                for y in r.s..r.e {
                                    for &v in &xp[y * g.w + c.s..y * g.w + c.e] {
                                        s += v;
                                    }
                                }
                                s * T::from_f64(1.0 / g.divisor(r, c))
                            }
                        };
                        o[oy * g.ow() + ox] = v;
                    }
                }
            },
        )
    });
    out
}

/// Max-pool backward: the gradient goes to the first maximal element of each window.
fn max_pool_bwd<T: Elem>(g: &PoolGeom, x: &[T], gout: &[T]) -> Vec<T> {
    let (hw, ohw) = (g.h * g.w, g.oh() * g.ow());
    let mut gx = vec![T::ZERO; g.n * g.c * hw];
    gx.par_chunks_mut(hw).enumerate().for_each(|(p, gxp)| {
        let xp = &x[p * hw..(p + 1) * hw];
        let gp = &gout[p * ohw..(p + 1) * ohw];
        for (oy, r) in g.rows.iter().enumerate() {
            for (ox, c) in g.cols.iter().enumerate() {
                let mut m = T::NEG_INF;
                let mut at = usize::MAX;
                for y in r.s..r.e {
                    for xx in c.s..c.e {
                        let v = xp[y * g.w + xx];
                        if v > m || at == usize::MAX {
                            m = v;
                            at = y * g.w + xx;
                        }
                    }
                }
                if at != usize::MAX {
                    gxp[at] += gp[oy * g.ow() + ox];
                }
            }
        }
    });
    gx
}

/// Average-pool backward: each output gradient is spread evenly over its window.
fn avg_pool_bwd<T: Elem>(g: &PoolGeom, gout: &[T]) -> Vec<T> {
    let (hw, ohw) = (g.h * g.w, g.oh() * g.ow());
    let mut gx = vec![T::ZERO; g.n * g.c * hw];
    gx.par_chunks_mut(hw).enumerate().for_each(|(p, gxp)| {
        let gp = &gout[p * ohw..(p + 1) * ohw];
        simd(
            #[inline(always)]
            || {
                for (oy, r) in g.rows.iter().enumerate() {
                    for (ox, c) in g.cols.iter().enumerate() {
                        let v = gp[oy * g.ow() + ox] * T::from_f64(1.0 / g.divisor(r, c));
                        for y in r.s..r.e {
                            for d in &mut gxp[y * g.w + c.s..y * g.w + c.e] {
                                *d += v;
                            }
                        }
                    }
                }
            },
        )
    });
    gx
}

macro_rules! dispatch1 {
    ($name:expr, $s:expr, $l:expr, |$x:ident| $body:expr) => {{
        match $s {
            CpuStorage::F32(_) => {
                let $x = contiguous::<f32>($s, $l, $name)?;
                f32::into_storage($body)
            }
            CpuStorage::F64(_) => {
                let $x = contiguous::<f64>($s, $l, $name)?;
                f64::into_storage($body)
            }
            _ => candle_core::bail!("{}: only f32/f64 supported", $name),
        }
    }};
}

/// Pooling forward custom op.
pub(crate) struct PoolOp(pub Arc<PoolGeom>);

impl CustomOp1 for PoolOp {
    fn name(&self) -> &'static str {
        "nn-core-pool2d"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &*self.0;
        g.check_in(l, self.name())?;
        let st = dispatch1!(self.name(), s, l, |x| pool_fwd(g, x));
        Ok((st, Shape::from((g.n, g.c, g.oh(), g.ow()))))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(match self.0.kind {
            PoolKind::Max => arg.apply_op2_no_bwd(&grad, &MaxPoolBwdOp(self.0.clone()))?,
            PoolKind::Avg { .. } => grad.apply_op1_no_bwd(&AvgPoolBwdOp(self.0.clone()))?,
        }))
    }
}

/// `(x, grad_out) -> grad_x` for max pooling.
pub(crate) struct MaxPoolBwdOp(pub Arc<PoolGeom>);

impl CustomOp2 for MaxPoolBwdOp {
    fn name(&self) -> &'static str {
        "nn-core-max-pool2d-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &*self.0;
        g.check_in(l1, self.name())?;
        g.check_out(l2, self.name())?;
        let st = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => f32::into_storage(max_pool_bwd(
                g,
                contiguous::<f32>(s1, l1, self.name())?,
                contiguous::<f32>(s2, l2, self.name())?,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => f64::into_storage(max_pool_bwd(
                g,
                contiguous::<f64>(s1, l1, self.name())?,
                contiguous::<f64>(s2, l2, self.name())?,
            )),
            _ => candle_core::bail!("{}: only f32/f64 supported", self.name()),
        };
        Ok((st, Shape::from((g.n, g.c, g.h, g.w))))
    }
}

/// `grad_out -> grad_x` for average / adaptive-average pooling.
pub(crate) struct AvgPoolBwdOp(pub Arc<PoolGeom>);

impl CustomOp1 for AvgPoolBwdOp {
    fn name(&self) -> &'static str {
        "nn-core-avg-pool2d-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &*self.0;
        g.check_out(l, self.name())?;
        let st = dispatch1!(self.name(), s, l, |x| avg_pool_bwd(g, x));
        Ok((st, Shape::from((g.n, g.c, g.h, g.w))))
    }
}

/// Global average pooling `[n, c, h, w] -> [n, c]`.
pub(crate) struct GlobalAvgOp;

impl CustomOp1 for GlobalAvgOp {
    fn name(&self) -> &'static str {
        "nn-core-global-avg-pool"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims();
        if d.len() != 4 {
            candle_core::bail!("{}: expected a 4-d input, got {d:?}", self.name());
        }
        let (n, c, hw) = (d[0], d[1], d[2] * d[3]);
        fn run<T: Elem>(x: &[T], nc: usize, hw: usize) -> Vec<T> {
            let inv = T::from_f64(1.0 / hw.max(1) as f64);
            let mut out = vec![T::ZERO; nc];
            out.par_iter_mut().enumerate().for_each(|(p, o)| {
                let xp = &x[p * hw..(p + 1) * hw];
                let mut acc = [T::ZERO; 8];
                let ch = xp.chunks_exact(8);
                let mut s = T::ZERO;
                for v in ch.remainder() {
                    s += *v;
                }
                for c in ch {
                    for l in 0..8 {
                        acc[l] += c[l];
                    }
                }
                for a in acc {
                    s += a;
                }
                *o = s * inv;
            });
            out
        }
        let st = dispatch1!(self.name(), s, l, |x| run(x, n * c, hw));
        Ok((st, Shape::from((n, c))))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&GlobalAvgBwdOp(h, w))?))
    }
}

/// `[n, c] -> [n, c, h, w]` gradient of [`GlobalAvgOp`].
pub(crate) struct GlobalAvgBwdOp(pub usize, pub usize);

impl CustomOp1 for GlobalAvgBwdOp {
    fn name(&self) -> &'static str {
        "nn-core-global-avg-pool-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims();
        if d.len() != 2 {
            candle_core::bail!("{}: expected a 2-d grad, got {d:?}", self.name());
        }
        let (n, c, hw) = (d[0], d[1], self.0 * self.1);
        fn run<T: Elem>(gr: &[T], hw: usize) -> Vec<T> {
            let inv = T::from_f64(1.0 / hw.max(1) as f64);
            let mut gx = vec![T::ZERO; gr.len() * hw];
            if hw > 0 {
                gx.par_chunks_mut(hw).zip(gr.par_iter()).for_each(|(p, v)| p.fill(*v * inv));
            }
            gx
        }
        let st = dispatch1!(self.name(), s, l, |x| run(x, hw));
        Ok((st, Shape::from((n, c, self.0, self.1))))
    }
}
