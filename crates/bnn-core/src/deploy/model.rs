//! The packed binary ResNet: nn-core's CIFAR ResNet layout (stem, basic blocks, global average
//! pooling, classifier) with every binary convolution replaced by a [`PackedConv`] and every
//! BatchNorm folded into the convolution before it. Activations between layers stay in float
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

    /// Applies in place to a channels-last buffer with `c` channels.
    pub fn apply(&self, x: &mut [f32], c: usize) {
        match self {
            Activation::Identity => {}
            Activation::Relu => x.par_iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Hardtanh => x.par_iter_mut().for_each(|v| *v = v.clamp(-1.0, 1.0)),
            Activation::Prelu(a) => x.par_chunks_mut(c * 256).for_each(|chunk| {
                for px in chunk.chunks_mut(c) {
                    for (v, &s) in px.iter_mut().zip(a) {
                        if *v < 0.0 {
                            *v *= s;
                        }
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
    /// Option B: a full-precision 1x1 convolution with its BatchNorm folded in.
    Float(FloatConv),
    /// Option B with a binarised projection.
    Binary(PackedConv),
}

/// A basic block: `act2(bn2(conv2(act1(bn1(conv1(x))))) + shortcut(x))` with both convolutions
/// binary and the BatchNorms folded into their output transforms.
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
    /// Full-precision stem convolution (BatchNorm folded) and its activation.
    pub stem: FloatConv,
    pub stem_act: Activation,
    pub blocks: Vec<PackedBlock>,
    /// Full-precision classifier `[num_classes, features]` and bias.
    pub fc_weight: Vec<f32>,
    pub fc_bias: Vec<f32>,
}

impl PackedResNet {
    /// Logits `[n, num_classes]` for `n` images given as NCHW floats (normalised as in training).
    pub fn forward(&self, x: &[f32], n: usize, kernel: Kernel) -> Result<Vec<f32>, String> {
        let (c, s) = (self.in_channels, self.image_size);
        if x.len() != n * c * s * s {
            return Err(format!(
                "{}: expected {n} images of {c} x {s} x {s} ({} values), got {} values",
                self.model,
                n * c * s * s,
                x.len()
            ));
        }
        let mut h = self.stem.forward(&Nhwc::from_nchw(x, n, c, s, s))?;
        self.stem_act.apply(&mut h.data, h.c);
        for b in &self.blocks {
            h = b.forward(&h, kernel)?;
        }
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
        let pc = |c: &PackedConv| c.weights.data.len() * 8 + (c.scale.len() + c.bias.len()) * 4 + c.tap_sums.len() * 4;
        let act = |a: &Activation| if let Activation::Prelu(v) = a { v.len() * 4 } else { 0 };
        let mut b = (self.stem.weight.len() + self.stem.bias.len() + self.fc_weight.len() + self.fc_bias.len()) * 4 + act(&self.stem_act);
        for blk in &self.blocks {
            b += pc(&blk.conv1) + pc(&blk.conv2) + act(&blk.act1) + act(&blk.act2);
            b += match &blk.shortcut {
                ShortcutOp::Float(f) => (f.weight.len() + f.bias.len()) * 4,
                ShortcutOp::Binary(c) => pc(c),
                _ => 0,
            };
        }
        b
    }
}

impl PackedBlock {
    pub fn forward(&self, x: &Nhwc, kernel: Kernel) -> Result<Nhwc, String> {
        let mut y = self.conv1.forward(x, kernel)?;
        self.act1.apply(&mut y.data, y.c);
        let mut y = self.conv2.forward(&y, kernel)?;
        match &self.shortcut {
            ShortcutOp::Identity => {
                if (x.h, x.w, x.c) != (y.h, y.w, y.c) {
                    return Err(format!(
                        "identity shortcut: input {:?} vs output {:?}",
                        (x.h, x.w, x.c),
                        (y.h, y.w, y.c)
                    ));
                }
                y.data.par_iter_mut().zip(&x.data).for_each(|(a, b)| *a += b);
            }
            ShortcutOp::Pad { stride, before, after } => {
                let (sh, sw) = (x.h.div_ceil(*stride), x.w.div_ceil(*stride));
                if (sh, sw, x.c + before + after) != (y.h, y.w, y.c) {
                    return Err(format!(
                        "option-A shortcut: {:?} does not match the block output {:?}",
                        (sh, sw, x.c + before + after),
                        (y.h, y.w, y.c)
                    ));
                }
                let (c, yc) = (x.c, y.c);
                y.data.par_chunks_mut(yc).enumerate().for_each(|(p, out)| {
                    let (b, oy, ox) = (p / (sh * sw), (p / sw) % sh, p % sw);
                    let q = (b * x.h + oy * stride) * x.w + ox * stride;
                    for (o, v) in out[*before..*before + c].iter_mut().zip(&x.data[q * c..(q + 1) * c]) {
                        *o += v;
                    }
                });
            }
            ShortcutOp::Float(f) => {
                let s = f.forward(x)?;
                y.data.par_iter_mut().zip(&s.data).for_each(|(a, b)| *a += b);
            }
            ShortcutOp::Binary(c) => {
                let s = c.forward(x, kernel)?;
                y.data.par_iter_mut().zip(&s.data).for_each(|(a, b)| *a += b);
            }
        }
        self.act2.apply(&mut y.data, y.c);
        Ok(y)
    }
}
