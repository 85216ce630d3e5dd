//! ReLU as a single-pass CPU op with a single-pass backward.
//!
//! candle's ReLU backward builds `zeros_like`, a comparison, a dtype conversion and a product
//! (four passes and three temporaries per activation); here the backward is one pass,
//! `dx = dy * [y > 0]`, reading the saved output. Both passes are split over threads.

use crate::ops::elem::par_fill_f32;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

const CHUNK: usize = 1 << 15;

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Some(&v[a..b]),
        _ => None,
    }
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "fast-relu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l).ok_or_else(|| candle_core::Error::Msg("fast relu: contiguous f32 input expected".into()))?;
        // SAFETY: each chunk zips its whole length against the input and writes it.
        let y = unsafe {
            par_fill_f32(x.len(), CHUNK, |i, o| {
                for (o, &v) in o.iter_mut().zip(&x[i * CHUNK..]) {
                    o.write(v.max(0.0));
                }
            })
        };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &ReluGrad)?))
    }
}

struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "fast-relu-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let msg = || candle_core::Error::Msg("fast relu backward: contiguous f32 tensors expected".into());
        let y = slice(s1, l1).ok_or_else(msg)?;
        let g = slice(s2, l2).ok_or_else(msg)?;
        if g.len() != y.len() {
            candle_core::bail!("fast relu backward: {} gradients for {} outputs", g.len(), y.len());
        }
        // SAFETY: each chunk zips its whole length against the outputs and writes it.
        let dx = unsafe {
            par_fill_f32(y.len(), CHUNK, |i, o| {
                for ((o, &y), &g) in o.iter_mut().zip(&y[i * CHUNK..]).zip(&g[i * CHUNK..]) {
                    o.write(if y > 0.0 { g } else { 0.0 });
                }
            })
        };
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// max(x, 0), with the fast single-pass kernels for contiguous CPU f32 tensors and candle's
/// `relu` elsewhere.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(Relu)
    } else {
        x.relu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_relu_and_gradient() -> Result<()> {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 70001), &Device::Cpu)?)?;
        let w = Tensor::randn(0f32, 1.0, (3, 70001), &Device::Cpu)?;
        let y = relu(x.as_tensor())?;
        let g = y.mul(&w)?.sum_all()?.backward()?;
        let yr = x.as_tensor().relu()?;
        let gr = yr.mul(&w)?.sum_all()?.backward()?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, yr.flatten_all()?.to_vec1::<f32>()?);
        let d = (g.get(x.as_tensor()).unwrap() - gr.get(x.as_tensor()).unwrap())?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        // non-contiguous input
        let t = x.as_tensor().t()?;
        assert_eq!(
            relu(&t)?.flatten_all()?.to_vec1::<f32>()?,
            t.relu()?.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }
}
