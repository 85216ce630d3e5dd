//! The packed binary ResNet: nn-core's CIFAR ResNet layout (stem, basic blocks, global average
//! pooling, classifier) with every binary convolution replaced by a [`PackedConv`] and every
//! BatchNorm applied in the convolution's output transform. Activations between layers stay in float
//! (channels last); each binary convolution binarises and packs its own input, since the
//! residual path carries real values.

use crate::deploy::conv::{FloatConv, Nhwc, PackedConv};
use crate::deploy::gemm::Kernel;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// An element-wise activation.
#[derive(Debug, Clone, PartialEq)]
pub enum Activation {
    Identity,
    Relu,
    Hardtanh,
    /// One slope per channel: `max(x, 0) + a_c min(x, 0)`.
    Prelu(Vec<f32>),
}

/// The activation kind without parameters (stored in the file's architecture description).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationKind {
    Identity,
    Relu,
    Hardtanh,
    Prelu,
}

impl Activation {
    pub fn kind(&self) -> ActivationKind {
        match self {
            Activation::Identity => ActivationKind::Identity,
            Activation::Relu => ActivationKind::Relu,
            Activation::Hardtanh => ActivationKind::Hardtanh,
            Activation::Prelu(_) => ActivationKind::Prelu,
        }
    }

    /// Applies in place to a channels-last slice with `c` channels, on the calling thread.
    pub fn apply_seq(&self, x: &mut [f32], c: usize) {
        match self {
            Activation::Identity => {}
            Activation::Relu => x.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Hardtanh => x.iter_mut().for_each(|v| *v = v.clamp(-1.0, 1.0)),
            Activation::Prelu(a) => {
                for px in x.chunks_mut(c) {
                    for (v, &s) in px.iter_mut().zip(a) {
                        // bnn-core's PRelu, operation for operation: relu(v) + (v - relu(v)) s
                        let p = v.max(0.0);
                        *v = p + (*v - p) * s;
                    }
                }
            }
        }
    }

    /// Applies in place to a channels-last buffer with `c` channels.
    pub fn apply(&self, x: &mut [f32], c: usize) {
        match self {
            Activation::Identity => {}
            Activation::Relu => x.par_iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Hardtanh => x.par_iter_mut().for_each(|v| *v = v.clamp(-1.0, 1.0)),
            Activation::Prelu(a) => x.par_chunks_mut(c * 256).for_each(|chunk| {
                for px in chunk.chunks_mut(c) {
                    for (v, &s) in px.iter_mut().zip(a) {
                        // bnn-core's PRelu, operation for operation: relu(v) + (v - relu(v)) s
                        let p = v.max(0.0);
                        *v = p + (*v - p) * s;
                    }
                }
            }),
        }
    }
}

/// How a block's input reaches its output.
#[derive(Debug, Clone, PartialEq)]
pub enum ShortcutOp {
    Identity,
    /// Option A: every `stride`-th row and column, zero channels padded before and after.
    Pad {
        stride: usize,
        before: usize,
        after: usize,
    },
    /// Option B: a full-precision 1x1 convolution and its BatchNorm.
    Float(FloatConv),
    /// Option B with a binarised projection.
    Binary(PackedConv),
}

/// A basic block: `act2(bn2(conv2(act1(bn1(conv1(x))))) + shortcut(x))` with both convolutions
/// binary and the BatchNorms applied in their output transforms.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedBlock {
    pub conv1: PackedConv,
    pub act1: Activation,
    pub conv2: PackedConv,
    pub act2: Activation,
    pub shortcut: ShortcutOp,
}

/// A binary CIFAR ResNet ready for inference.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedResNet {
    /// nn-core model name (`resnet20`, ...).
    pub model: String,
    pub in_channels: usize,
    pub image_size: usize,
    pub num_classes: usize,
    /// Full-precision stem convolution (with its BatchNorm) and its activation.
    pub stem: FloatConv,
    pub stem_act: Activation,
    pub blocks: Vec<PackedBlock>,
    /// Full-precision classifier `[num_classes, features]` and bias.
    pub fc_weight: Vec<f32>,
    pub fc_bias: Vec<f32>,
}

impl PackedResNet {
    /// The feature map before the global average pooling (the last block's output) for `n`
    /// images given as NCHW floats. Bit-identical to the candle forward pass of the same model
    /// on the same batch (see [`crate::deploy::export`]).
    pub fn feature_map(&self, x: &[f32], n: usize, kernel: Kernel) -> Result<Nhwc, String> {
        let (c, s) = (self.in_channels, self.image_size);
        if x.len() != n * c * s * s {
            return Err(format!(
                "{}: expected {n} images of {c} x {s} x {s} ({} values), got {} values",
                self.model,
                n * c * s * s,
                x.len()
            ));
        }
        let mut h = self.stem.forward_nchw(x, n, s, s)?;
        self.stem_act.apply(&mut h.data, h.c);
        for b in &self.blocks {
            h = b.forward(&h, kernel)?;
        }
        Ok(h)
    }

    /// Logits `[n, num_classes]` for `n` images given as NCHW floats (normalised as in training).
    pub fn forward(&self, x: &[f32], n: usize, kernel: Kernel) -> Result<Vec<f32>, String> {
        let h = self.feature_map(x, n, kernel)?;
        // global average pooling, then the classifier
        let (hw, f) = (h.h * h.w, h.c);
        if self.fc_weight.len() != self.num_classes * f {
            return Err(format!(
                "{}: classifier expects {} features, got {f}",
                self.model,
                self.fc_weight.len() / self.num_classes
            ));
        }
        let mut logits = vec![0f32; n * self.num_classes];
        logits.par_chunks_mut(self.num_classes).enumerate().for_each(|(b, out)| {
            let mut pooled = vec![0f32; f];
            for p in h.data[b * hw * f..(b + 1) * hw * f].chunks(f) {
                for (a, v) in pooled.iter_mut().zip(p) {
                    *a += v;
                }
            }
            for a in pooled.iter_mut() {
                *a /= hw as f32;
            }
            for (k, o) in out.iter_mut().enumerate() {
                let w = &self.fc_weight[k * f..(k + 1) * f];
                *o = self.fc_bias[k] + w.iter().zip(&pooled).map(|(a, b)| a * b).sum::<f32>();
            }
        });
        Ok(logits)
    }

    /// Bytes of parameters the engine holds (packed binary weights, float stem, classifier,
    /// output transforms, activation slopes, tap sums).
    pub fn param_bytes(&self) -> usize {
        let pc = |c: &PackedConv| {
            c.weights.data.len() * 8
                + (c.alpha.len() + c.conv_bias.as_ref().map_or(0, |b| b.len()) + c.scale.len() + c.bias.len()) * 4
                + c.tap_sums.len() * 4
        };
        let fc = |f: &FloatConv| (f.weight.len() + f.conv_bias.as_ref().map_or(0, |b| b.len()) + f.scale.len() + f.bias.len()) * 4;
        let act = |a: &Activation| if let Activation::Prelu(v) = a { v.len() * 4 } else { 0 };
        let mut b = fc(&self.stem) + (self.fc_weight.len() + self.fc_bias.len()) * 4 + act(&self.stem_act);
        for blk in &self.blocks {
            b += pc(&blk.conv1) + pc(&blk.conv2) + act(&blk.act1) + act(&blk.act2);
            b += match &blk.shortcut {
                ShortcutOp::Float(f) => fc(f),
                ShortcutOp::Binary(c) => pc(c),
                _ => 0,
            };
        }
        b
    }
}

impl PackedBlock {
    /// The block, with `act1` fused into `conv1`'s output tiles and the shortcut sum and `act2`
    /// into `conv2`'s.
    pub fn forward(&self, x: &Nhwc, kernel: Kernel) -> Result<Nhwc, String> {
        let c1 = self.conv1.geom.cout;
        let y = self.conv1.forward_with(x, kernel, |_, tile| self.act1.apply_seq(tile, c1))?;
        let (oh, ow) = self.conv2.geom.output_hw(y.h, y.w)?;
        let c = self.conv2.geom.cout;
        let projected = match &self.shortcut {
            ShortcutOp::Float(f) => Some(f.forward(x)?),
            ShortcutOp::Binary(b) => Some(b.forward(x, kernel)?),
            _ => None,
        };
        let (sh, sw, sc) = match &self.shortcut {
            ShortcutOp::Identity => (x.h, x.w, x.c),
            ShortcutOp::Pad { stride, before, after } => (x.h.div_ceil(*stride), x.w.div_ceil(*stride), x.c + before + after),
            _ => {
                let p = projected.as_ref().expect("projection");
                (p.h, p.w, p.c)
            }
        };
        if (sh, sw, sc) != (oh, ow, c) {
            return Err(format!(
                "shortcut gives {:?} but the block output is {:?}",
                (sh, sw, sc),
                (oh, ow, c)
            ));
        }
        let add = |p0: usize, tile: &mut [f32]| {
            match &self.shortcut {
                ShortcutOp::Identity => {
                    for (a, b) in tile.iter_mut().zip(&x.data[p0 * c..]) {
                        *a += b;
                    }
                }
                ShortcutOp::Pad { stride, before, .. } => {
                    let cin = x.c;
                    for (r, out) in tile.chunks_exact_mut(c).enumerate() {
                        let p = p0 + r;
                        let (b, oy, ox) = (p / (oh * ow), (p / ow) % oh, p % ow);
                        let q = (b * x.h + oy * stride) * x.w + ox * stride;
                        for (o, v) in out[*before..*before + cin].iter_mut().zip(&x.data[q * cin..(q + 1) * cin]) {
                            *o += v;
                        }
                    }
                }
                ShortcutOp::Float(_) | ShortcutOp::Binary(_) => {
                    let s = projected.as_ref().expect("projection");
                    for (a, b) in tile.iter_mut().zip(&s.data[p0 * c..]) {
                        *a += b;
                    }
                }
            }
            self.act2.apply_seq(tile, c);
        };
        self.conv2.forward_with(&y, kernel, add)
    }
}
