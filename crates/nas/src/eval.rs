//! Cheap evaluation of a sub-network with supernet weights, and its DC-NAS representation.
//!
//! DC-NAS (Wang, Xu, Tao 2020, its feature-representation step) represents a sub-network by how each of its layers
//! changes: either the change of the layer's parameters or of its output features on the same
//! input. Here, with a weight-sharing supernet, the change is from the supernet's initial
//! weights to its trained weights, measured on a fixed probe batch:
//! `f_{l,b} = rms(F_l(x_b; W) - F_l(x_b; W_0))` for slot `l` and probe image `b`
//! ([`FeatureKind::OutputChange`]), or `||W_l - W_{0,l}|| / ||W_{0,l}||` over the chosen op's
//! weights ([`FeatureKind::ParamChange`]). The sub-network's vector concatenates its layers.

use crate::data::NasData;
use crate::space::{Arch, Op};
use crate::supernet::Supernet;
use anyhow::Result;
use candle_core::{DType, Tensor};
use nn_core::train::{cross_entropy, topk_correct};
use nn_core::ParamKind;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Which layer-wise change represents a sub-network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureKind {
    /// Per slot and probe image, the RMS change of the slot's output features.
    OutputChange,
    /// Per slot, the relative change of the chosen op's weights.
    ParamChange,
}

impl FeatureKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "output-change" | "output" => Ok(Self::OutputChange),
            "param-change" | "param" => Ok(Self::ParamChange),
            o => anyhow::bail!("unknown feature kind `{o}` (output-change, param-change)"),
        }
    }
}

/// The result of the cheap evaluation of one sub-network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheapEval {
    /// Validation top-1 (percent) with supernet weights and recalibrated BatchNorm. Scores are
    /// `f32` so that they survive the JSON state exactly (a resumed search decides the same).
    pub val_top1: f32,
    pub val_loss: f32,
    /// The DC-NAS representation (see the module docs).
    pub features: Vec<f32>,
    /// Wall seconds of this evaluation.
    pub seconds: f64,
}

/// Top-1 (percent) and mean cross-entropy of `forward` over `images`/`labels` in batches.
pub fn accuracy(
    forward: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    images: &Tensor,
    labels: &Tensor,
    batch: usize,
) -> Result<(f64, f64)> {
    let n = labels.dims()[0];
    let (mut correct, mut loss) = (0usize, 0f64);
    let mut i = 0;
    while i < n {
        let b = batch.min(n - i);
        let x = images.narrow(0, i, b)?;
        let y = labels.narrow(0, i, b)?;
        let logits = forward(&x)?.detach();
        correct += topk_correct(&logits, &y, 1)?;
        loss += cross_entropy(&logits, &y, 0.0)?.to_dtype(DType::F64)?.to_scalar::<f64>()? * b as f64;
        i += b;
    }
    Ok((100.0 * correct as f64 / n.max(1) as f64, loss / n.max(1) as f64))
}

fn output_change(sn: &Supernet, arch: &Arch, probe: &Tensor) -> Result<Vec<f32>> {
    let (net, _vs) = sn.extract(arch, false, 0.1)?;
    let (net0, _vs0) = sn.extract(arch, true, 0.1)?;
    // Training-mode BatchNorm (batch statistics of the probe batch) for both, so neither
    // depends on running statistics.
    let (_, outs) = net.forward_path(probe, arch, true, true)?;
    let (_, outs0) = net0.forward_path(probe, arch, true, true)?;
    let mut f = Vec::new();
    for (o, o0) in outs.iter().zip(&outs0) {
        let d = (o - o0)?.sqr()?.flatten_from(1)?.mean(1)?.sqrt()?;
        f.extend(d.to_vec1::<f32>()?);
    }
    Ok(f)
}

fn param_change(sn: &Supernet, arch: &Arch) -> Result<Vec<f32>> {
    let (_, vs) = sn.extract(arch, false, 0.1)?;
    let (_, vs0) = sn.extract(arch, true, 0.1)?;
    let mut f = Vec::with_capacity(arch.layers.len());
    for (i, l) in arch.layers.iter().enumerate() {
        if l.op == Op::Skip {
            f.push(0.0);
            continue;
        }
        let prefix = format!("layers.{i}.{}.", l.op.name());
        let (mut num, mut den) = (0f64, 0f64);
        for v in vs
            .all()
            .iter()
            .filter(|v| v.name.starts_with(&prefix) && v.kind == ParamKind::Weight)
        {
            let w0 = vs0.get(&v.name).expect("same structure").var;
            let w0 = w0.as_tensor();
            num += (v.var.as_tensor() - w0)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            den += w0.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        f.push((num / den.max(1e-12)).sqrt() as f32);
    }
    Ok(f)
}

/// The representation of `arch` (see the module docs).
pub fn features(sn: &Supernet, arch: &Arch, data: &NasData, kind: FeatureKind) -> Result<Vec<f32>> {
    match kind {
        FeatureKind::OutputChange => output_change(sn, arch, &data.probe),
        FeatureKind::ParamChange => param_change(sn, arch),
    }
}

/// The cheap criterion and the features of `arch`: extract it from the supernet, recalibrate
/// BatchNorm on the calibration batch (one training-mode pass with momentum 1), evaluate on
/// the validation subset.
pub fn cheap_eval(sn: &Supernet, arch: &Arch, data: &NasData, kind: FeatureKind) -> Result<CheapEval> {
    let t = Instant::now();
    let features = features(sn, arch, data, kind)?;
    let (net, _vs) = sn.extract(arch, false, 1.0)?;
    net.forward_arch(&data.calib, arch, true)?;
    let (val_top1, val_loss) = accuracy(|x| net.forward_arch(x, arch, false), &data.val.images, &data.val.labels, 250)?;
    Ok(CheapEval {
        val_top1: val_top1 as f32,
        val_loss: val_loss as f32,
        features,
        seconds: t.elapsed().as_secs_f64(),
    })
}
