//! TEMPORARY shim until the fast kernels land: delegates to candle.
use candle_core::{Result, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct Conv2dOpts {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

pub fn conv2d(x: &Tensor, w: &Tensor, o: Conv2dOpts) -> Result<Tensor> {
    x.conv2d(w, o.padding.0, o.stride.0, o.dilation.0, o.groups)
}
pub fn max_pool2d(x: &Tensor, k: (usize, usize), s: (usize, usize), p: (usize, usize)) -> Result<Tensor> {
    let x = if p.0 > 0 {
        x.pad_with_zeros(2, p.0, p.0)?.pad_with_zeros(3, p.1, p.1)?
    } else {
        x.clone()
    };
    x.max_pool2d_with_stride(k, s)
}
pub fn avg_pool2d(x: &Tensor, k: (usize, usize), s: (usize, usize), p: (usize, usize), _c: bool) -> Result<Tensor> {
    let x = if p.0 > 0 {
        x.pad_with_zeros(2, p.0, p.0)?.pad_with_zeros(3, p.1, p.1)?
    } else {
        x.clone()
    };
    x.avg_pool2d_with_stride(k, s)
}
pub fn adaptive_avg_pool2d(x: &Tensor, o: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    x.avg_pool2d((h / o.0, w / o.1))
}
pub mod batch_norm;
