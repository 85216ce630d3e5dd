//! Per-channel parametric ops on `[N, C, ...]` tensors (channel dimension 1, any trailing
//! spatial dimensions): PReLU with one slope per channel and a learnable per-channel bias.
//!
//! Binary networks put these after almost every convolution (Bi-Real Net's PReLU,
//! ReActNet's RPReLU = shift, PReLU, shift). Composed from candle ops, PReLU takes a ReLU, a
//! subtraction, a broadcast product and a sum forward, and its backward adds several more
//! passes plus a `sum_keepdim` over the batch and spatial dimensions for the slope, which
//! candle reduces with a strided scalar loop: 7.6% of a 1-thread binary ResNet-20 training
//! step went into that reduction alone. Here each op is one pass forward, and the backward
//! is one pass for the input gradient plus one pass that reduces the parameter gradient per
//! channel (channels split over threads).
//!
//! The fast path covers contiguous CPU `f32` tensors; other devices and dtypes use the
//! composed candle forms ([`prelu_composed`], [`bias_add_composed`]).

use crate::ops::elem::par_fill_f32;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel task (whole planes are grouped up to about this size).
const TASK: usize = 1 << 14;

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: contiguous f32 tensor expected"),
    }
}

/// `(channels, plane)`: the channel count and the number of elements per (sample, channel)
/// plane of a `[N, C, ...]` shape (a rank-1 shape is one sample of `C` channels).
fn channel_geometry(shape: &Shape) -> Result<(usize, usize)> {
    let d = shape.dims();
    match d.len() {
        0 => candle_core::bail!("per-channel op: a scalar has no channel dimension"),
        1 => Ok((d[0], 1)),
        _ => Ok((d[1], d[2..].iter().product())),
    }
}

fn check_params(x: &Shape, p: &Shape, what: &str) -> Result<(usize, usize)> {
    let (c, plane) = channel_geometry(x)?;
    if p.elem_count() != c {
        candle_core::bail!(
            "{what}: {} parameters for {c} channels (input shape {:?})",
            p.elem_count(),
            x.dims()
        );
    }
    Ok((c, plane))
}

/// Writes `f(channel, x_plane, out_plane)` for every plane of a `[N, C, plane]` buffer, in
/// parallel tasks of whole planes.
///
/// # Safety
/// `f` must write every element of the output plane it is given.
unsafe fn map_planes(len: usize, c: usize, plane: usize, f: impl Fn(usize, usize, &mut [std::mem::MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    let plane = plane.max(1);
    let planes_per_task = (TASK / plane).max(1);
    // SAFETY: every chunk is a whole number of planes (the last one possibly fewer), and `f`
    // writes each of them (the caller's contract).
    unsafe {
        par_fill_f32(len, planes_per_task * plane, |t, out| {
            for (k, o) in out.chunks_mut(plane).enumerate() {
                let p = t * planes_per_task + k;
                f(p % c, p * plane, o);
            }
        })
    }
}

/// `sum` over samples and positions of `f(x, g)` for each channel: `[C]`.
fn channel_reduce(x: &[f32], g: &[f32], c: usize, plane: usize, f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let n = if c * plane == 0 { 0 } else { x.len() / (c * plane) };
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut acc = 0f64;
            for s in 0..n {
                let off = (s * c + ch) * plane;
                // f32 partial sums per plane (vectorisable), accumulated in f64 over the batch
                let part: f32 = x[off..off + plane].iter().zip(&g[off..off + plane]).map(|(&x, &g)| f(x, g)).sum();
                acc += part as f64;
            }
            acc as f32
        })
        .collect()
}

/// `y = x >= 0 ? x : a[c] x`.
struct Prelu;

impl CustomOp2 for Prelu {
    fn name(&self) -> &'static str {
        "channel-prelu"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "prelu")?;
        let a = slice(s2, l2, "prelu slopes")?;
        let (c, plane) = check_params(l1.shape(), l2.shape(), "prelu")?;
        // SAFETY: every output plane is written element by element against its input plane.
        let y = unsafe {
            map_planes(x.len(), c, plane, |ch, off, o| {
                let s = a[ch];
                for (o, &v) in o.iter_mut().zip(&x[off..]) {
                    o.write(if v >= 0.0 { v } else { s * v });
                }
            })
        };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, a: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(a, &g, &PreluInputGrad)?;
        let da = x.apply_op2_no_bwd(&g, &ChannelReduce::PreluSlope)?.reshape(a.shape())?;
        Ok((Some(dx), Some(da)))
    }
}

/// `dx = g (x > 0 ? 1 : a[c])` (at `x = 0` the slope side, as candle's composed form gives).
struct PreluInputGrad;

impl CustomOp3 for PreluInputGrad {
    fn name(&self) -> &'static str {
        "channel-prelu-input-grad"
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
        let x = slice(s1, l1, "prelu backward")?;
        let a = slice(s2, l2, "prelu backward slopes")?;
        let g = slice(s3, l3, "prelu backward gradient")?;
        let (c, plane) = check_params(l1.shape(), l2.shape(), "prelu backward")?;
        if g.len() != x.len() {
            candle_core::bail!("prelu backward: {} gradients for {} inputs", g.len(), x.len());
        }
        // SAFETY: every output plane is written element by element.
        let dx = unsafe {
            map_planes(x.len(), c, plane, |ch, off, o| {
                let s = a[ch];
                for ((o, &v), &g) in o.iter_mut().zip(&x[off..]).zip(&g[off..]) {
                    o.write(if v > 0.0 { g } else { s * g });
                }
            })
        };
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Per-channel reductions of a backward pass: `[C]` from `(x, g)`.
enum ChannelReduce {
    /// `sum g min(x, 0)`: the PReLU slope gradient.
    PreluSlope,
    /// `sum g`: a per-channel bias gradient (the first operand only gives the shape).
    Bias,
}

impl CustomOp2 for ChannelReduce {
    fn name(&self) -> &'static str {
        "channel-reduce"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "channel reduction")?;
        let g = slice(s2, l2, "channel reduction gradient")?;
        if g.len() != x.len() {
            candle_core::bail!("channel reduction: {} gradients for {} inputs", g.len(), x.len());
        }
        let (c, plane) = channel_geometry(l1.shape())?;
        let out = match self {
            ChannelReduce::PreluSlope => channel_reduce(x, g, c, plane, |x, g| g * x.min(0.0)),
            ChannelReduce::Bias => channel_reduce(x, g, c, plane, |_, g| g),
        };
        Ok((CpuStorage::F32(out), Shape::from(c)))
    }
}

/// `y = x + b[c]`.
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "channel-bias-add"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "bias add")?;
        let b = slice(s2, l2, "bias add biases")?;
        let (c, plane) = check_params(l1.shape(), l2.shape(), "bias add")?;
        // SAFETY: every output plane is written element by element against its input plane.
        let y = unsafe {
            map_planes(x.len(), c, plane, |ch, off, o| {
                let s = b[ch];
                for (o, &v) in o.iter_mut().zip(&x[off..]) {
                    o.write(v + s);
                }
            })
        };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let db = x.apply_op2_no_bwd(&g, &ChannelReduce::Bias)?.reshape(b.shape())?;
        Ok((Some(g), Some(db)))
    }
}

fn fast(x: &Tensor, p: &Tensor) -> bool {
    x.device().is_cpu() && p.device().is_cpu() && x.dtype() == DType::F32 && p.dtype() == DType::F32 && x.rank() >= 1
}

/// `[1, C, 1, ...]` (or `[C]` for a rank-1 input): the broadcast shape of per-channel
/// parameters.
fn param_shape(x: &Tensor, c: usize) -> Vec<usize> {
    let mut s = vec![1; x.rank()];
    s[if x.rank() >= 2 { 1 } else { 0 }] = c;
    s
}

/// PReLU with one slope per channel: `max(x, 0) + a[c] min(x, 0)` for `x` of shape
/// `[N, C, ...]` (or `[C]`) and `a` of `C` elements. Differentiable in both.
pub fn prelu(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    if fast(x, a) {
        x.contiguous()?.apply_op2(&a.contiguous()?, Prelu)
    } else {
        prelu_composed(x, a)
    }
}

/// [`prelu`] from candle ops (any device and dtype; the reference of the tests).
pub fn prelu_composed(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    // nn-core's ReLU: gradient 0 at x = 0, so the slope side takes x = 0
    let pos = crate::ops::activation::relu(x)?;
    let neg = (x - &pos)?;
    pos + neg.broadcast_mul(&a.reshape(param_shape(x, a.elem_count()))?)?
}

/// `x + b[c]` for `x` of shape `[N, C, ...]` (or `[C]`) and `b` of `C` elements.
/// Differentiable in both.
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fast(x, b) {
        x.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
    } else {
        bias_add_composed(x, b)
    }
}

/// [`bias_add`] from candle ops (any device and dtype; the reference of the tests).
pub fn bias_add_composed(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.broadcast_add(&b.reshape(param_shape(x, b.elem_count()))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        if a.elem_count() == 0 {
            return 0.0;
        }
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Value and both gradients against the composed candle form, on shapes with planes of
    /// one element (`[N, C]`), odd planes, more planes than one task holds, and rank 1.
    #[test]
    fn prelu_and_bias_add_match_the_composed_forms_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for shape in [vec![5, 3], vec![4, 7, 3, 5], vec![3, 16, 40, 40], vec![6], vec![2, 3, 0, 4]] {
            let c = if shape.len() >= 2 { shape[1] } else { shape[0] };
            let mut xv = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?;
            if xv.elem_count() > 0 {
                // exact zeros: both forms take the slope side there
                let flat = xv.flatten_all()?.to_vec1::<f32>()?;
                let flat: Vec<f32> = flat.iter().enumerate().map(|(i, &v)| if i % 11 == 0 { 0.0 } else { v }).collect();
                xv = Tensor::from_vec(flat, shape.as_slice(), &dev)?;
            }
            let x = Var::from_tensor(&xv)?;
            let p = Var::from_tensor(&Tensor::randn(0f32, 1.0, c, &dev)?)?;
            let w = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?;
            for (fast, composed) in [
                (
                    prelu as fn(&Tensor, &Tensor) -> Result<Tensor>,
                    prelu_composed as fn(&Tensor, &Tensor) -> Result<Tensor>,
                ),
                (bias_add, bias_add_composed),
            ] {
                let y = fast(x.as_tensor(), p.as_tensor())?;
                let yr = composed(x.as_tensor(), p.as_tensor())?;
                assert_eq!(y.dims(), yr.dims());
                assert_eq!(max_diff(&y, &yr), 0.0, "{shape:?} value");
                if y.elem_count() == 0 {
                    continue;
                }
                let g = y.mul(&w)?.sum_all()?.backward()?;
                let gr = yr.mul(&w)?.sum_all()?.backward()?;
                let dx = g.get(x.as_tensor()).unwrap();
                // the composed form rounds `(g - g a) + g a` where the kernel writes `g`
                assert!(max_diff(dx, gr.get(x.as_tensor()).unwrap()) <= 1e-6, "{shape:?} input gradient");
                let dp = g.get(p.as_tensor()).unwrap();
                let dpr = gr.get(p.as_tensor()).unwrap();
                assert_eq!(dp.dims(), &[c]);
                let scale = if c == 0 {
                    1.0
                } else {
                    dpr.abs()?.max(0)?.to_scalar::<f32>()?.max(1.0)
                };
                assert!(max_diff(dp, dpr) <= 1e-4 * scale, "{shape:?} parameter gradient");
            }
        }
        Ok(())
    }

    #[test]
    fn wrong_parameter_counts_are_named() {
        let x = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let p = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let e = prelu(&x, &p).unwrap_err().to_string();
        assert!(e.contains("4 parameters for 3 channels"), "{e}");
        let e = bias_add(&x, &p).unwrap_err().to_string();
        assert!(e.contains("4 parameters for 3 channels"), "{e}");
    }

    /// Non-contiguous inputs go through the same kernels after a copy.
    #[test]
    fn strided_inputs() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (3, 4, 5), &Device::Cpu)?.transpose(0, 1)?; // [4, 3, 5]
        let a = Tensor::randn(0f32, 1.0, 3, &Device::Cpu)?;
        assert_eq!(max_diff(&prelu(&x, &a)?, &prelu_composed(&x, &a)?), 0.0);
        assert_eq!(max_diff(&bias_add(&x, &a)?, &bias_add_composed(&x, &a)?), 0.0);
        Ok(())
    }
}
