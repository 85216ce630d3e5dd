//! Counting for binary networks, from nn-core's per-layer summary: float vs binary parameters,
//! FLOPs (float multiply-accumulates, the papers' "FLOPs"), BOPs (binary XNOR-popcount
//! operations), OPs = FLOPs + BOPs / 64 (the convention of Bi-Real Net, Sec. 4.4, followed by
//! FDA, ReActNet and BiMLP), and the model size with binary weights packed at 1 bit.

use candle_core::{DType, Device, Result, Tensor};
use nn_core::summary::{self, ModelSummary};
use nn_core::Model;
use serde::{Deserialize, Serialize};

/// Inference-time counts of a (binary) model, per image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BinaryCounts {
    /// Full-precision parameters (including per-channel weight scales, BN, PReLU).
    pub float_params: usize,
    /// 1-bit parameters.
    pub binary_params: usize,
    /// Float multiply-accumulates.
    pub flops: u64,
    /// Binary operations.
    pub bops: u64,
    /// FLOPs + BOPs / 64.
    pub ops: f64,
    /// Bytes with float parameters at 32 bits and binary ones at 1 bit.
    pub size_bytes: f64,
}

impl BinaryCounts {
    pub fn from_summary(s: &ModelSummary) -> Self {
        Self {
            float_params: s.total_params(),
            binary_params: s.total_binary_params(),
            flops: s.total_macs(),
            bops: s.total_binary_ops(),
            ops: s.total_macs() as f64 + s.total_binary_ops() as f64 / 64.0,
            size_bytes: s.size_bytes(),
        }
    }
}

/// Profiles `model` on one zero image of `[c, h, w]` in eval mode (training-only modules such as
/// FDA's noise adaptation are not part of the inference model and are not counted).
pub fn count(model: &dyn Model, chw: (usize, usize, usize), device: &Device) -> Result<(BinaryCounts, ModelSummary)> {
    let x = Tensor::zeros((1, chw.0, chw.1, chw.2), DType::F32, device)?;
    let (_, s) = summary::profile(|| model.forward_t(&x, false))?;
    Ok((BinaryCounts::from_summary(&s), s))
}
