//! Pooling layers (max, average, adaptive average, global average) and flatten.

use crate::summary::{self, LayerStat};
use candle_core::{Result, Tensor};
use candle_nn::ModuleT;

/// Max pooling with any kernel, stride and padding (padding never wins the max).
#[derive(Debug, Clone, Copy)]
pub struct MaxPool2d {
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

impl MaxPool2d {
    pub fn new(kernel: usize, stride: usize, padding: usize) -> Self {
        Self {
            kernel: (kernel, kernel),
            stride: (stride, stride),
            padding: (padding, padding),
        }
    }
}

impl ModuleT for MaxPool2d {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        crate::ops::max_pool2d(x, self.kernel, self.stride, self.padding)
    }
}

/// Average pooling with any kernel, stride and padding.
#[derive(Debug, Clone, Copy)]
pub struct AvgPool2d {
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    /// Whether padded zeros count in the divisor (PyTorch's default is true).
    pub count_include_pad: bool,
}

impl AvgPool2d {
    pub fn new(kernel: usize, stride: usize, padding: usize) -> Self {
        Self {
            kernel: (kernel, kernel),
            stride: (stride, stride),
            padding: (padding, padding),
            count_include_pad: true,
        }
    }
}

impl ModuleT for AvgPool2d {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        crate::ops::avg_pool2d(x, self.kernel, self.stride, self.padding, self.count_include_pad)
    }
}

/// Adaptive average pooling to a fixed output size (PyTorch's window rule).
#[derive(Debug, Clone, Copy)]
pub struct AdaptiveAvgPool2d {
    pub output: (usize, usize),
}

impl ModuleT for AdaptiveAvgPool2d {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        crate::ops::adaptive_avg_pool2d(x, self.output)
    }
}

/// Global average pooling `[N, C, H, W] -> [N, C]`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlobalAvgPool;

impl ModuleT for GlobalAvgPool {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        if x.rank() != 4 {
            candle_core::bail!("global average pooling expects NCHW, got shape {:?}", x.dims());
        }
        let (n, c, h, w) = x.dims4()?;
        let y = x.reshape((n, c, h * w))?.mean(2)?;
        if summary::is_recording() {
            summary::record(|| LayerStat {
                name: "global_pool".into(),
                kind: "GlobalAvgPool".into(),
                out_shape: y.dims().to_vec(),
                ..Default::default()
            });
        }
        Ok(y)
    }
}

/// Flattens all dimensions after the batch dimension.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flatten;

impl ModuleT for Flatten {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        x.flatten_from(1)
    }
}
