//! Normalisation layers: BatchNorm (1d and 2d, train/eval, running statistics) and LayerNorm
//! with gradients.

use super::functional;
use crate::init::Init;
use crate::summary::{self, LayerStat};
use crate::var_store::{ParamKind, VarPath};
use candle_core::{Result, Tensor, Var};
use candle_nn::ModuleT;

/// Batch normalisation over channel dimension 1 of `[N, C]`, `[N, C, L]` or `[N, C, H, W]`.
///
/// Training uses the batch statistics (biased variance) and updates the running mean and the
/// running unbiased variance with `momentum` (PyTorch convention: new = (1-m) old + m batch).
/// Evaluation uses the running statistics.
#[derive(Clone)]
pub struct BatchNorm {
    pub weight: Option<Var>,
    pub bias: Option<Var>,
    pub running_mean: Var,
    pub running_var: Var,
    pub eps: f64,
    pub momentum: f64,
    num_features: usize,
    name: String,
}

impl BatchNorm {
    /// Affine BatchNorm with gamma = 1, beta = 0, eps 1e-5, momentum 0.1.
    pub fn new(vp: &VarPath, num_features: usize) -> Result<Self> {
        Self::with_options(vp, num_features, 1e-5, 0.1, true)
    }

    pub fn with_options(vp: &VarPath, num_features: usize, eps: f64, momentum: f64, affine: bool) -> Result<Self> {
        let (weight, bias) = if affine {
            (
                Some(vp.param("weight", &[num_features], Init::ONES, ParamKind::NormWeight)?),
                Some(vp.param("bias", &[num_features], Init::ZEROS, ParamKind::NormBias)?),
            )
        } else {
            (None, None)
        };
        let running_mean = vp.buffer("running_mean", &[num_features], Init::ZEROS)?;
        let running_var = vp.buffer("running_var", &[num_features], Init::ONES)?;
        Ok(Self {
            weight,
            bias,
            running_mean,
            running_var,
            eps,
            momentum,
            num_features,
            name: vp.prefix().to_string(),
        })
    }

    pub fn num_features(&self) -> usize {
        self.num_features
    }

    fn stat_shape(&self, x: &Tensor) -> Vec<usize> {
        let mut s = vec![1; x.rank()];
        s[1] = self.num_features;
        s
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if x.rank() < 2 || x.dims()[1] != self.num_features {
            candle_core::bail!(
                "BatchNorm `{}` expects {} channels in dim 1, got shape {:?}",
                self.name,
                self.num_features,
                x.dims()
            );
        }
        let shape = self.stat_shape(x);
        let (n, c) = (x.dims()[0], self.num_features);
        let rest: usize = x.dims()[2..].iter().product::<usize>().max(1);
        let count = n * rest;
        let fused = train && x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && self.weight.is_some();
        let y = if fused {
            if count < 2 {
                candle_core::bail!(
                    "BatchNorm `{}` in training mode needs more than one value per channel, got shape {:?}",
                    self.name,
                    x.dims()
                );
            }
            let (w, b) = (self.weight.as_ref().expect("affine"), self.bias.as_ref().expect("affine"));
            let (y, st) = crate::ops::batch_norm::batch_norm_train(x, w.as_tensor(), b.as_tensor(), self.eps)?;
            let m = self.momentum;
            let dev = x.device();
            let bm = Tensor::from_vec(st.mean, c, dev)?;
            let bv = Tensor::from_vec(st.var, c, dev)?.affine(count as f64 / (count - 1) as f64, 0.0)?;
            self.running_mean
                .set(&((self.running_mean.as_tensor() * (1.0 - m))? + (bm * m)?)?)?;
            self.running_var.set(&((self.running_var.as_tensor() * (1.0 - m))? + (bv * m)?)?)?;
            y
        } else if train {
            if count < 2 {
                candle_core::bail!(
                    "BatchNorm `{}` in training mode needs more than one value per channel, got shape {:?}",
                    self.name,
                    x.dims()
                );
            }
            let x3 = x.reshape((n, c, rest))?;
            let mean = x3.sum_keepdim(2)?.sum_keepdim(0)?.affine(1.0 / count as f64, 0.0)?; // [1, C, 1]
            let xc = x3.broadcast_sub(&mean)?;
            let var = xc.sqr()?.sum_keepdim(2)?.sum_keepdim(0)?.affine(1.0 / count as f64, 0.0)?;
            let inv_std = (var.clone() + self.eps)?.sqrt()?.recip()?;
            let m = self.momentum;
            let new_mean = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean.flatten_all()?.detach() * m)?)?;
            let unbiased = var.flatten_all()?.detach().affine(count as f64 / (count - 1) as f64, 0.0)?;
            let new_var = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
            self.running_mean.set(&new_mean)?;
            self.running_var.set(&new_var)?;
            xc.broadcast_mul(&inv_std)?.reshape(x.dims())?
        } else {
            // y = x * scale + shift with scale = gamma / sqrt(var + eps), shift = beta - mean * scale
            let inv_std = (self.running_var.as_tensor() + self.eps)?.sqrt()?.recip()?;
            let scale = match &self.weight {
                Some(w) => w.as_tensor().mul(&inv_std)?,
                None => inv_std,
            };
            let shift = self.running_mean.as_tensor().mul(&scale)?.neg()?;
            let shift = match &self.bias {
                Some(b) => (b.as_tensor() + shift)?,
                None => shift,
            };
            crate::ops::batch_norm::channel_affine(x, &scale, &shift)?
        };
        let y = match (&self.weight, &self.bias) {
            _ if fused || !train => y,
            (Some(w), Some(b)) => y
                .broadcast_mul(&w.as_tensor().reshape(shape.as_slice())?)?
                .broadcast_add(&b.as_tensor().reshape(shape.as_slice())?)?,
            _ => y,
        };
        if summary::is_recording() {
            summary::record(|| LayerStat {
                name: self.name.clone(),
                kind: "BatchNorm".into(),
                out_shape: y.dims().to_vec(),
                params: 2 * self.num_features * self.weight.is_some() as usize,
                ..Default::default()
            });
        }
        Ok(y)
    }
}

/// Layer normalisation over the last dimension, with gradients to input and affine parameters.
#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Option<Var>,
    pub bias: Option<Var>,
    pub eps: f64,
    dim: usize,
    name: String,
}

impl LayerNorm {
    /// Affine LayerNorm over a last dimension of size `dim` (eps 1e-5 by default, ViTs use 1e-6).
    pub fn new(vp: &VarPath, dim: usize, eps: f64) -> Result<Self> {
        let weight = Some(vp.param("weight", &[dim], Init::ONES, ParamKind::NormWeight)?);
        let bias = Some(vp.param("bias", &[dim], Init::ZEROS, ParamKind::NormBias)?);
        Ok(Self {
            weight,
            bias,
            eps,
            dim,
            name: vp.prefix().to_string(),
        })
    }
}

impl ModuleT for LayerNorm {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        if x.dims().last() != Some(&self.dim) {
            candle_core::bail!(
                "LayerNorm `{}` expects last dimension {}, got shape {:?}",
                self.name,
                self.dim,
                x.dims()
            );
        }
        let y = functional::layer_norm(
            x,
            self.weight.as_ref().map(|v| v.as_tensor()),
            self.bias.as_ref().map(|v| v.as_tensor()),
            self.eps,
        )?;
        if summary::is_recording() {
            summary::record(|| LayerStat {
                name: self.name.clone(),
                kind: "LayerNorm".into(),
                out_shape: y.dims().to_vec(),
                params: 2 * self.dim * self.weight.is_some() as usize,
                ..Default::default()
            });
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::var_store::VarStore;
    use candle_core::Device;

    #[test]
    fn batchnorm_train_normalises_and_updates_running_stats() -> Result<()> {
        let vs = VarStore::new(0, &Device::Cpu);
        let bn = BatchNorm::new(&vs.root().pp("bn"), 2)?;
        let x = Tensor::new(&[[[[1.0f32, 3.0]], [[10.0, 10.0]]], [[[5.0, 7.0]], [[20.0, 20.0]]]], &Device::Cpu)?; // [2,2,1,2]
        let y = bn.forward_t(&x, true)?;
        let ch0: Vec<f32> = y.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        let mean0: f32 = ch0.iter().sum::<f32>() / 4.0;
        assert!(mean0.abs() < 1e-5);
        // channel 0: values 1,3,5,7 mean 4, unbiased var 20/3; running = 0.9*init + 0.1*batch
        let rm: Vec<f32> = bn.running_mean.as_tensor().to_vec1()?;
        let rv: Vec<f32> = bn.running_var.as_tensor().to_vec1()?;
        assert!((rm[0] - 0.4).abs() < 1e-5 && (rm[1] - 1.5).abs() < 1e-5, "{rm:?}");
        assert!((rv[0] - (0.9 + 0.1 * 20.0 / 3.0)).abs() < 1e-4, "{rv:?}");
        // eval uses the running statistics
        let ye = bn.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
        let expect = (1.0 - 0.4) / (rv[0] + 1e-5).sqrt();
        assert!((ye[0] - expect).abs() < 1e-4);
        assert!(bn
            .forward_t(&Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu)?, true)
            .is_err());
        Ok(())
    }

    #[test]
    fn batchnorm_gradient_matches_finite_differences() -> Result<()> {
        let vs = VarStore::new(0, &Device::Cpu);
        let bn = BatchNorm::new(&vs.root(), 3)?;
        let x = Tensor::new(
            &[[0.5f32, -1.0, 2.0], [1.5, 0.3, -0.7], [0.2, 0.9, 1.1], [-0.4, 2.2, 0.0]],
            &Device::Cpu,
        )?;
        let w = Tensor::new(
            &[[0.3f32, -1.0, 2.0], [1.0, 0.0, -2.0], [0.5, 0.25, 1.0], [-1.0, 2.0, 0.1]],
            &Device::Cpu,
        )?;
        crate::testing::check_gradient(&x, |x| bn.forward_t(x, true)?.mul(&w)?.sum_all(), 1e-2, 2e-2)?;
        Ok(())
    }
}
