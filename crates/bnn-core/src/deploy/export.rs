//! Export of a trained binary CIFAR ResNet (nn-core's `resnet20`/`32`/`56`, optionally `-b`,
//! built with [`BinaryFactory`](crate::BinaryFactory)) to a [`PackedResNet`].
//!
//! # Folding
//! In evaluation a binary convolution followed by BatchNorm computes, per output channel `o`,
//! `bn(alpha_o * dot + b_o) = (alpha_o * dot + b_o - mu_o) * gamma_o / sqrt(var_o + eps) + beta_o`
//! with `dot` the integer `conv(sign(x), sign(W))`, `alpha_o = mean |W_o|` (1 without weight
//! scaling) and `b_o` the convolution bias (0 if none). With `s_o = gamma_o / sqrt(var_o + eps)`
//! this is one multiply-add, `dot * (alpha_o s_o) + (beta_o + (b_o - mu_o) s_o)`, which the
//! engine applies straight to the integer result. Full-precision convolutions (the stem,
//! option-B shortcuts) get `s_o` multiplied into their weights instead.
//!
//! Only the signs of binary weights are kept. Training-only parts (FDA's noise modules, LNS
//! mapping networks) are ignored: exporting a model fine-tuned with LNS is not supported, as
//! its forward pass binarises `f(W)` rather than `W`.

use crate::deploy::conv::{ConvGeom, FloatConv, PackedConv};
use crate::deploy::model::{Activation, PackedBlock, PackedResNet, ShortcutOp};
use crate::factory::{BinaryConfig, BodyActivation};
use candle_core::{DType, Tensor};
use nn_core::models::ModelConfig;
use std::collections::HashMap;

/// nn-core's BatchNorm epsilon (`BatchNorm::new`).
pub const BN_EPS: f64 = 1e-5;

/// Parses `resnetD` / `resnetD-b` into `(blocks per stage, option B)`.
pub fn parse_cifar_resnet(name: &str) -> Result<(usize, bool), String> {
    let err = || format!("cannot export model `{name}`: the engine supports the CIFAR ResNets resnet20/32/56 (optionally -b)");
    let rest = name.strip_prefix("resnet").ok_or_else(err)?;
    let (d, b) = match rest.strip_suffix("-b") {
        Some(d) => (d, true),
        None => (rest, false),
    };
    let depth: usize = d.parse().map_err(|_| err())?;
    if depth < 8 || (depth - 2) % 6 != 0 {
        return Err(err());
    }
    Ok(((depth - 2) / 6, b))
}

struct Vars<'a>(&'a HashMap<String, Tensor>);

impl Vars<'_> {
    /// The tensor `name` as f32 values with the expected shape.
    fn get(&self, name: &str, dims: &[usize]) -> Result<Vec<f32>, String> {
        let t = self
            .0
            .get(name)
            .ok_or_else(|| format!("the trained model has no tensor `{name}`"))?;
        if t.dims() != dims {
            return Err(format!("tensor `{name}` has shape {:?}, expected {dims:?}", t.dims()));
        }
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| format!("reading tensor `{name}`: {e}"))
    }

    /// Eval-mode BatchNorm as `(scale, shift)`, computed in f32 like nn-core's BatchNorm.
    fn bn(&self, p: &str, c: usize) -> Result<(Vec<f32>, Vec<f32>), String> {
        let g = self.get(&format!("{p}.weight"), &[c])?;
        let b = self.get(&format!("{p}.bias"), &[c])?;
        let m = self.get(&format!("{p}.running_mean"), &[c])?;
        let v = self.get(&format!("{p}.running_var"), &[c])?;
        let scale: Vec<f32> = (0..c).map(|i| g[i] * (1.0 / (v[i] + BN_EPS as f32).sqrt())).collect();
        let shift: Vec<f32> = (0..c).map(|i| b[i] - m[i] * scale[i]).collect();
        Ok((scale, shift))
    }

    fn binary_conv(&self, p: &str, bn: &str, geom: ConvGeom, cfg: &BinaryConfig) -> Result<PackedConv, String> {
        let w = self.get(&format!("{p}.weight"), &[geom.cout, geom.cin, geom.kh, geom.kw])?;
        let (s, t) = self.bn(bn, geom.cout)?;
        let per = geom.cin * geom.kh * geom.kw;
        let bias = self
            .0
            .get(&format!("{p}.bias"))
            .map(|_| self.get(&format!("{p}.bias"), &[geom.cout]))
            .transpose()?;
        let mut scale = Vec::with_capacity(geom.cout);
        let mut shift = Vec::with_capacity(geom.cout);
        for o in 0..geom.cout {
            let alpha = if cfg.scale_weights {
                w[o * per..(o + 1) * per].iter().map(|v| v.abs()).sum::<f32>() / per as f32
            } else {
                1.0
            };
            scale.push(alpha * s[o]);
            shift.push(t[o] + bias.as_ref().map_or(0.0, |b| b[o] * s[o]));
        }
        PackedConv::from_oihw(geom, &w, scale, shift)
    }

    fn float_conv(&self, p: &str, bn: &str, geom: ConvGeom) -> Result<FloatConv, String> {
        let w = self.get(&format!("{p}.weight"), &[geom.cout, geom.cin, geom.kh, geom.kw])?;
        let (s, t) = self.bn(bn, geom.cout)?;
        let bias = self
            .0
            .get(&format!("{p}.bias"))
            .map(|_| self.get(&format!("{p}.bias"), &[geom.cout]))
            .transpose()?;
        let shift = (0..geom.cout).map(|o| t[o] + bias.as_ref().map_or(0.0, |b| b[o] * s[o])).collect();
        FloatConv::from_oihw(geom, &w, &s, shift)
    }

    fn body_act(&self, p: &str, c: usize, cfg: &BinaryConfig) -> Result<Activation, String> {
        Ok(match cfg.body_activation {
            BodyActivation::Prelu => Activation::Prelu(self.get(&format!("{p}.weight"), &[c])?),
            BodyActivation::Hardtanh => Activation::Hardtanh,
            BodyActivation::Identity => Activation::Identity,
            BodyActivation::AsRequested => Activation::Relu,
        })
    }
}

/// Builds the packed model from the trained variables `vars` (a checkpoint's `model` map or
/// `VarStore::tensors()`) of the binary model `model` with configuration `mc`, trained with a
/// [`BinaryFactory`](crate::BinaryFactory) configured by `cfg`.
pub fn export_resnet(vars: &HashMap<String, Tensor>, model: &str, mc: &ModelConfig, cfg: &BinaryConfig) -> Result<PackedResNet, String> {
    let (n, option_b) = parse_cifar_resnet(model)?;
    if !cfg.binarize_activations {
        return Err("cannot export a W1A32 model (binarize_activations = false): the engine needs binary activations".into());
    }
    let v = Vars(vars);
    let widths = [16usize, 32, 64];
    let g = |cin, cout, k, stride, pad| ConvGeom {
        cin,
        cout,
        kh: k,
        kw: k,
        stride,
        pad,
    };
    let stem = v.float_conv("conv1", "bn1", g(mc.in_channels, widths[0], 3, 1, 1))?;
    let mut blocks = Vec::new();
    let mut cin = widths[0];
    for (s, &cout) in widths.iter().enumerate() {
        for b in 0..n {
            let p = format!("layer{}.{b}", s + 1);
            let stride = if s > 0 && b == 0 { 2 } else { 1 };
            let conv1 = v.binary_conv(&format!("{p}.conv1"), &format!("{p}.bn1"), g(cin, cout, 3, stride, 1), cfg)?;
            let act1 = v.body_act(&format!("{p}.act1"), cout, cfg)?;
            let conv2 = v.binary_conv(&format!("{p}.conv2"), &format!("{p}.bn2"), g(cout, cout, 3, 1, 1), cfg)?;
            let act2 = v.body_act(&format!("{p}.act2"), cout, cfg)?;
            let shortcut = if stride == 1 && cin == cout {
                ShortcutOp::Identity
            } else if option_b {
                let geom = g(cin, cout, 1, stride, 0);
                let (c, bn) = (format!("{p}.shortcut.conv"), format!("{p}.shortcut.bn"));
                if cfg.binarize_shortcut {
                    ShortcutOp::Binary(v.binary_conv(&c, &bn, geom, cfg)?)
                } else {
                    ShortcutOp::Float(v.float_conv(&c, &bn, geom)?)
                }
            } else {
                let extra = cout - cin;
                ShortcutOp::Pad {
                    stride,
                    before: extra / 2,
                    after: extra - extra / 2,
                }
            };
            blocks.push(PackedBlock {
                conv1,
                act1,
                conv2,
                act2,
                shortcut,
            });
            cin = cout;
        }
    }
    Ok(PackedResNet {
        model: model.to_string(),
        in_channels: mc.in_channels,
        image_size: mc.image_size,
        num_classes: mc.num_classes,
        stem,
        // BinaryFactory puts the identity after the stem
        stem_act: Activation::Identity,
        blocks,
        fc_weight: v.get("fc.weight", &[mc.num_classes, cin])?,
        fc_bias: v.get("fc.bias", &[mc.num_classes])?,
    })
}
