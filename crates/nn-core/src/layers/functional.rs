//! Differentiable functional forms of operations whose candle versions record no backward
//! (`candle_nn::ops::softmax_last_dim`, `layer_norm`, `rms_norm` are forward-only). Softmax
//! over the last dimension and layer normalisation run the fused multi-threaded CPU kernels of
//! [`crate::ops::rowwise`] for f32 on CPU; the `*_composed` forms, written with candle's
//! primitive ops, serve every other case (and are the reference the fused kernels are tested
//! against).

use candle_core::{DType, Result, Tensor, D};

/// Softmax along `dim`, with gradients.
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    if dim + 1 == x.rank() {
        crate::ops::rowwise::softmax_last_dim(x)
    } else {
        softmax_composed(x, dim)
    }
}

/// Softmax along `dim` from candle's primitive ops (the max is subtracted for stability and
/// detached, which leaves the result and its gradient unchanged).
pub fn softmax_composed(x: &Tensor, dim: usize) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(dim)?;
    e.broadcast_div(&s)
}

/// Softmax along the last dimension, with gradients.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    crate::ops::rowwise::softmax_last_dim(x)
}

/// Log-softmax along `dim`, with gradients.
pub fn log_softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?.detach();
    let d = x.broadcast_sub(&max)?;
    let lse = d.exp()?.sum_keepdim(dim)?.log()?;
    d.broadcast_sub(&lse)
}

/// Layer normalisation over the last dimension: (x - mean) / sqrt(var + eps) * gamma + beta,
/// with the biased variance (as PyTorch), gradients to x, gamma and beta.
pub fn layer_norm(x: &Tensor, gamma: Option<&Tensor>, beta: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    crate::ops::rowwise::layer_norm(x, gamma, beta, eps)
}

/// [`layer_norm`] from candle's primitive ops.
pub fn layer_norm_composed(x: &Tensor, gamma: Option<&Tensor>, beta: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let x32 = if matches!(x.dtype(), DType::F16 | DType::BF16) {
        x.to_dtype(DType::F32)?
    } else {
        x.clone()
    };
    let mean = x32.mean_keepdim(D::Minus1)?;
    let xc = x32.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    y = y.to_dtype(x.dtype())?;
    if let Some(g) = gamma {
        y = y.broadcast_mul(g)?;
    }
    if let Some(b) = beta {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// RMS normalisation over the last dimension: x / sqrt(mean(x^2) + eps) * gamma, with gradients.
pub fn rms_norm(x: &Tensor, gamma: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    match gamma {
        Some(g) => y.broadcast_mul(g),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::check_gradient;
    use candle_core::Device;

    #[test]
    fn softmax_sums_to_one_and_gradient_matches_finite_differences() -> Result<()> {
        let x = Tensor::new(&[[1.0f64, 2.0, -0.5, 3.0], [0.1, 0.2, 0.3, -4.0]], &Device::Cpu)?;
        let s = softmax_last_dim(&x)?.sum(1)?.to_vec1::<f64>()?;
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-12));
        let w = Tensor::new(&[[0.3f64, -1.0, 2.0, 0.5], [1.0, 0.0, -2.0, 0.7]], &Device::Cpu)?;
        check_gradient(&x, |x| softmax_last_dim(x)?.mul(&w)?.sum_all(), 1e-6, 1e-6)?;
        check_gradient(&x, |x| log_softmax(x, 0)?.mul(&w)?.sum_all(), 1e-6, 1e-6)?;
        Ok(())
    }

    #[test]
    fn layer_norm_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1.0f64, 2.0, -0.5, 3.0, 0.0], [0.1, 0.2, 0.3, -4.0, 2.0]], &dev)?;
        let g = Tensor::new(&[1.0f64, 0.5, 2.0, -1.0, 0.3], &dev)?;
        let b = Tensor::new(&[0.0f64, 0.1, 0.2, 0.3, 0.4], &dev)?;
        let w = Tensor::new(&[[0.3f64, -1.0, 2.0, 0.5, 1.5], [1.0, 0.0, -2.0, 0.7, -0.2]], &dev)?;
        check_gradient(&x, |x| layer_norm(x, Some(&g), Some(&b), 1e-5)?.mul(&w)?.sum_all(), 1e-6, 1e-5)?;
        check_gradient(&g, |g| layer_norm(&x, Some(g), Some(&b), 1e-5)?.mul(&w)?.sum_all(), 1e-6, 1e-5)?;
        check_gradient(&x, |x| rms_norm(x, Some(&g), 1e-5)?.mul(&w)?.sum_all(), 1e-6, 1e-5)?;
        // normalised rows have zero mean and unit variance
        let y = layer_norm(&x, None, None, 0.0)?;
        let m = y.mean(1)?.to_vec1::<f64>()?;
        assert!(m.iter().all(|v| v.abs() < 1e-12));
        Ok(())
    }
}
