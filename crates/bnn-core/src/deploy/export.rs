//! Export of a trained binary CIFAR ResNet (nn-core's `resnet20`/`32`/`56`, optionally `-b`,
//! built with [`BinaryFactory`](crate::BinaryFactory)) to a [`PackedResNet`].
//!
//! # Exactness
//! In evaluation a binary convolution followed by BatchNorm computes, per output channel `o`,
//! `bn(alpha_o * dot + b_o)` with `dot` the integer `conv(sign(x), sign(W))`,
//! `alpha_o = mean |W_o|` (1 without weight scaling) and `b_o` the convolution bias (if any).
//! bnn-core's [`BinaryConv2d`](crate::BinaryConv2d) computes `conv(Q(x), Q(W)) * alpha` in
//! evaluation (an exact integer, then one rounding), and nn-core's BatchNorm computes
//! `x * scale + shift` with `scale = gamma * recip(sqrt(var + eps))` and
//! `shift = beta + -(mean * scale)`. The export computes `alpha` with the same function
//! ([`crate::binary::weight_scale`]) and `scale`/`shift` with the same candle operations on the
//! same tensors, and the engine applies them in the same order without folding, so every
//! value up to the global average pooling is bit-identical to the candle forward pass.
//! Full-precision convolutions (the stem, option-B shortcuts) keep their weights unfolded and
//! run through nn-core's own convolution kernel.
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

    /// The tensor `name` as an f32 tensor of shape `dims`.
    fn tensor(&self, name: &str, dims: &[usize]) -> Result<Tensor, String> {
        let t = self
            .0
            .get(name)
            .ok_or_else(|| format!("the trained model has no tensor `{name}`"))?;
        if t.dims() != dims {
            return Err(format!("tensor `{name}` has shape {:?}, expected {dims:?}", t.dims()));
        }
        t.to_dtype(DType::F32).map_err(|e| format!("reading tensor `{name}`: {e}"))
    }

    /// Eval-mode BatchNorm as `(scale, shift)`, computed with exactly the candle operations of
    /// nn-core's `BatchNorm::forward_t` in evaluation (bit-identical values).
    fn bn(&self, p: &str, c: usize) -> Result<(Vec<f32>, Vec<f32>), String> {
        let g = self.tensor(&format!("{p}.weight"), &[c])?;
        let b = self.tensor(&format!("{p}.bias"), &[c])?;
        let m = self.tensor(&format!("{p}.running_mean"), &[c])?;
        let v = self.tensor(&format!("{p}.running_var"), &[c])?;
        let run = || -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
            let inv_std = (v + BN_EPS)?.sqrt()?.recip()?;
            let scale = g.mul(&inv_std)?;
            let shift = m.mul(&scale)?.neg()?;
            let shift = (b + shift)?;
            Ok((scale.to_vec1()?, shift.to_vec1()?))
        };
        run().map_err(|e| format!("BatchNorm `{p}`: {e}"))
    }

    fn binary_conv(&self, p: &str, bn: &str, geom: ConvGeom, cfg: &BinaryConfig) -> Result<PackedConv, String> {
        let dims = [geom.cout, geom.cin, geom.kh, geom.kw];
        let w = self.get(&format!("{p}.weight"), &dims)?;
        let (s, t) = self.bn(bn, geom.cout)?;
        let bias = self
            .0
            .get(&format!("{p}.bias"))
            .map(|_| self.get(&format!("{p}.bias"), &[geom.cout]))
            .transpose()?;
        let alpha = if cfg.scale_weights {
            let wt = self.tensor(&format!("{p}.weight"), &dims)?;
            crate::binary::weight_scale(&wt)
                .and_then(|a| a.to_vec1::<f32>())
                .map_err(|e| format!("weight scale of `{p}`: {e}"))?
        } else {
            vec![1.0; geom.cout]
        };
        PackedConv::from_oihw(geom, &w, s, t)?.with_alpha(alpha, bias)
    }

    fn float_conv(&self, p: &str, bn: &str, geom: ConvGeom) -> Result<FloatConv, String> {
        let w = self.get(&format!("{p}.weight"), &[geom.cout, geom.cin, geom.kh, geom.kw])?;
        let (s, t) = self.bn(bn, geom.cout)?;
        let bias = self
            .0
            .get(&format!("{p}.bias"))
            .map(|_| self.get(&format!("{p}.bias"), &[geom.cout]))
            .transpose()?;
        FloatConv::from_oihw(geom, &w, &s, t)?.with_conv_bias(bias)
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
