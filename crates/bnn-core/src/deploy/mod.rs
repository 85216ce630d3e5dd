//! Binary inference engine: bit-packed XNOR-popcount kernels and the export of trained bnn-core
//! models into a small, fast inference form.
//!
//! - [`pack`]: signs packed into `u64` words along the reduction dimension.
//! - [`gemm`]: binary GEMM `C = K - 2 popcount(A xor B)` with runtime dispatch (AVX2, `popcnt`,
//!   portable) and rayon over row tiles.
//! - [`conv`]: binary conv2d on channels-last maps (bit-level im2col, exact zero-padding
//!   correction, per-channel output transform) and the float convolution of the stem.
//! - [`model`]: the packed binary ResNet and its forward pass.
//! - [`export`]: from a trained binary ResNet's variables (BinaryFactory on nn-core's
//!   CIFAR ResNets) to a [`model::PackedResNet`], scales and BatchNorm folded.
//! - [`format`]: the model file (safetensors with format, kind, version and SHA-256 checksum).
//! - [`layer`]: packed binary convolutions as candle layers ([`PackedConvLayer`]: dense, grouped,
//!   rectangular) and [`PackedFactory`], the layer factory that puts them into a backbone.
//! - [`bimlp`]: the packed BiMLP (bnn-core's BiMLP built with [`PackedFactory`]) and its file.
//! - [`DeployedModel`]: any model file, loaded by its `kind`.

pub mod bimlp;
pub mod conv;
pub mod export;
pub mod format;
pub mod gemm;
pub mod layer;
pub mod model;
pub mod pack;
#[cfg(test)]
pub(crate) mod testing;

pub use bimlp::PackedBiMlp;
pub use conv::{ConvGeom, FloatConv, Nhwc, PackedConv};
pub use gemm::{bgemm, Kernel};
pub use layer::{KernelCell, PackedConvLayer, PackedFactory};
pub use model::PackedResNet;
pub use pack::PackedMatrix;

use std::collections::BTreeMap;
use std::path::Path;

/// A packed model file of any kind.
#[derive(Debug)]
pub enum DeployedModel {
    ResNet(PackedResNet, format::Arch),
    BiMlp(Box<PackedBiMlp>, bimlp::BiMlpArch),
}

impl DeployedModel {
    /// Reads a model file written by `format::save` or [`PackedBiMlp::save`], by its `kind`.
    pub fn load(path: &Path, kernel: Kernel) -> Result<Self, format::FormatError> {
        let bytes = std::fs::read(path).map_err(|e| format::FormatError(format!("reading {}: {e}", path.display())))?;
        Self::from_bytes(&bytes, kernel).map_err(|e| format::FormatError(format!("{}: {}", path.display(), e.0)))
    }

    pub fn from_bytes(bytes: &[u8], kernel: Kernel) -> Result<Self, format::FormatError> {
        let kind = format::kind_of(bytes)?;
        match kind.as_str() {
            format::KIND => format::from_bytes(bytes).map(|(m, a)| DeployedModel::ResNet(m, a)),
            bimlp::KIND => PackedBiMlp::from_bytes(bytes, kernel).map(|(m, a)| DeployedModel::BiMlp(Box::new(m), a)),
            other => Err(format::FormatError(format!(
                "unknown model kind `{other}` (this build reads `{}` and `{}`)",
                format::KIND,
                bimlp::KIND
            ))),
        }
    }

    /// Logits `[n, num_classes]` for `n` NCHW images (normalised as in training).
    pub fn forward(&self, x: &[f32], n: usize, kernel: Kernel) -> Result<Vec<f32>, String> {
        match self {
            DeployedModel::ResNet(m, _) => m.forward(x, n, kernel),
            DeployedModel::BiMlp(m, _) => {
                m.set_kernel(kernel);
                m.forward(x, n)
            }
        }
    }

    pub fn name(&self) -> &str {
        match self {
            DeployedModel::ResNet(m, _) => &m.model,
            DeployedModel::BiMlp(m, _) => &m.config.name,
        }
    }

    /// `(in_channels, image_size, num_classes)`.
    pub fn io(&self) -> (usize, usize, usize) {
        match self {
            DeployedModel::ResNet(m, _) => (m.in_channels, m.image_size, m.num_classes),
            DeployedModel::BiMlp(m, _) => (m.model_config.in_channels, m.model_config.image_size, m.model_config.num_classes),
        }
    }

    /// Provenance stored in the file.
    pub fn source(&self) -> &BTreeMap<String, String> {
        match self {
            DeployedModel::ResNet(_, a) => &a.source,
            DeployedModel::BiMlp(_, a) => &a.source,
        }
    }

    /// Bytes of parameters the engine holds.
    pub fn param_bytes(&self) -> usize {
        match self {
            DeployedModel::ResNet(m, _) => m.param_bytes(),
            DeployedModel::BiMlp(m, _) => m.param_bytes(),
        }
    }
}
