//! The prunable nn-core backbones: their channel graphs and how to rebuild them smaller.
//!
//! [`Arch`] is a serialisable description of a backbone's widths (the nn-core configuration
//! plus per-block inner widths). [`Arch::graph`] lists its channel spaces, parameter axes and
//! residual links exactly as the backbone wires them; [`Arch::resized`] turns the channel
//! counts that survive pruning back into an `Arch`, which [`Arch::build`] constructs through
//! any nn-core layer factory, so the pruned network is an ordinary, smaller nn-core model.

use crate::graph::{ChannelGraph, GraphBuilder};
use anyhow::{bail, Context, Result};
use nn_core::models::blocks::Shortcut;
use nn_core::models::resnet::{ResNet, ResNetConfig};
use nn_core::models::resnet_cifar::{CifarResNet, CifarResNetConfig};
use nn_core::models::vgg::VggSmall;
use nn_core::models::ModelConfig;
use nn_core::{LayerFactory, Model, VarPath};
use serde::{Deserialize, Serialize};

/// Names [`Arch::from_name`] accepts.
pub const PRUNABLE_MODELS: &[&str] = &[
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet20-b",
    "resnet32-b",
    "resnet56-b",
    "vgg-small",
    "resnet18",
    "resnet34",
    "resnet18-cifar",
];

/// A prunable backbone and its (possibly pruned) widths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Arch {
    /// CIFAR ResNet (He et al. 2016): stem + stage widths, inner width of every block.
    CifarResnet {
        depth: usize,
        /// Option B (1x1 projection) shortcuts; option A (zero padding) otherwise.
        projection: bool,
        widths: [usize; 3],
        mids: Vec<usize>,
    },
    /// ImageNet-style ResNet with basic blocks (option B).
    Resnet {
        name: String,
        blocks: [usize; 4],
        widths: [usize; 4],
        small_input_stem: bool,
        mids: Vec<usize>,
    },
    /// VGG-small: output channels of its six convs.
    VggSmall { widths: [usize; 6] },
}

impl Arch {
    /// The dense architecture of an nn-core model name.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "resnet20" | "resnet32" | "resnet56" | "resnet20-b" | "resnet32-b" | "resnet56-b" => {
                let depth: usize = name[6..8].parse()?;
                let n = (depth - 2) / 6;
                Arch::CifarResnet {
                    depth,
                    projection: name.ends_with("-b"),
                    widths: [16, 32, 64],
                    mids: [16, 32, 64].iter().flat_map(|&w| std::iter::repeat(w).take(n)).collect(),
                }
            }
            "resnet18" | "resnet34" | "resnet18-cifar" => {
                let rc = if name == "resnet34" {
                    ResNetConfig::resnet34()
                } else {
                    ResNetConfig::resnet18()
                };
                Arch::Resnet {
                    name: rc.name.clone(),
                    blocks: rc.blocks,
                    widths: rc.widths,
                    small_input_stem: name == "resnet18-cifar",
                    mids: rc
                        .blocks
                        .iter()
                        .zip(rc.widths)
                        .flat_map(|(&n, w)| std::iter::repeat(w).take(n))
                        .collect(),
                }
            }
            "vgg-small" => Arch::VggSmall {
                widths: [128, 128, 256, 256, 512, 512],
            },
            other => bail!(
                "model `{other}` cannot be pruned structurally; prunable models: {}",
                PRUNABLE_MODELS.join(", ")
            ),
        })
    }

    /// The nn-core model name of the dense architecture.
    pub fn base_name(&self) -> String {
        match self {
            Arch::CifarResnet { depth, projection, .. } => format!("resnet{depth}{}", if *projection { "-b" } else { "" }),
            Arch::Resnet {
                name, small_input_stem, ..
            } => {
                if *small_input_stem {
                    format!("{name}-cifar")
                } else {
                    name.clone()
                }
            }
            Arch::VggSmall { .. } => "vgg-small".into(),
        }
    }

    /// Builds the model through `factory` with parameters under `vp`.
    pub fn build(&self, cfg: &ModelConfig, vp: &VarPath, factory: &dyn LayerFactory) -> Result<Box<dyn Model>> {
        Ok(match self {
            Arch::CifarResnet {
                depth,
                projection,
                widths,
                mids,
            } => {
                let rc = CifarResNetConfig {
                    depth: *depth,
                    shortcut: if *projection { Shortcut::B } else { Shortcut::A },
                    widths: *widths,
                    block_mid_widths: Some(mids.clone()),
                };
                Box::new(CifarResNet::new(vp, cfg, &rc, factory)?)
            }
            Arch::Resnet {
                name,
                blocks,
                widths,
                small_input_stem,
                mids,
            } => {
                let rc = ResNetConfig {
                    name: name.clone(),
                    blocks: *blocks,
                    widths: *widths,
                    small_input_stem: *small_input_stem,
                    block_mid_widths: Some(mids.clone()),
                };
                Box::new(ResNet::new(vp, cfg, &rc, factory)?)
            }
            Arch::VggSmall { widths } => Box::new(VggSmall::with_widths(vp, cfg, *widths, factory)?),
        })
    }

    /// Spaces, parameter axes and links of this architecture for inputs of `cfg`, with the
    /// groups a rebuild cannot express marked as blocked.
    pub fn graph(&self, cfg: &ModelConfig) -> ChannelGraph {
        let mut b = GraphBuilder::new();
        let input = b.fixed_space("input", cfg.in_channels);
        let logits = b.fixed_space("logits", cfg.num_classes);
        let mut option_a_streams = Vec::new();
        match self {
            Arch::CifarResnet {
                projection,
                widths,
                mids,
                depth,
            } => {
                let n = (depth - 2) / 6;
                let stem = b.space("conv1", widths[0]);
                b.conv("conv1", input, stem, false);
                b.batch_norm("bn1", stem);
                let mut x = stem;
                option_a_streams.push(stem);
                let mut k = 0;
                for (s, &cout) in widths.iter().enumerate() {
                    for blk in 0..n {
                        let stride = if s > 0 && blk == 0 { 2 } else { 1 };
                        let p = format!("layer{}.{blk}", s + 1);
                        let out = basic_block(&mut b, &p, x, mids[k], cout, stride, *projection);
                        option_a_streams.push(out);
                        x = out;
                        k += 1;
                    }
                }
                b.linear("fc", x, 1, logits, true);
                if *projection {
                    option_a_streams.clear();
                }
            }
            Arch::Resnet { blocks, widths, mids, .. } => {
                let stem = b.space("conv1", widths[0]);
                b.conv("conv1", input, stem, false);
                b.batch_norm("bn1", stem);
                let mut x = stem;
                let mut k = 0;
                for (s, (&nb, &cout)) in blocks.iter().zip(widths.iter()).enumerate() {
                    for blk in 0..nb {
                        let stride = if s > 0 && blk == 0 { 2 } else { 1 };
                        let p = format!("layer{}.{blk}", s + 1);
                        x = basic_block(&mut b, &p, x, mids[k], cout, stride, true);
                        k += 1;
                    }
                }
                b.linear("fc", x, 1, logits, true);
            }
            Arch::VggSmall { widths } => {
                let mut x = input;
                for (i, &w) in widths.iter().enumerate() {
                    let p = format!("features.{i}");
                    let s = b.space(format!("{p}.conv"), w);
                    b.conv(&format!("{p}.conv"), x, s, false);
                    b.batch_norm(&format!("{p}.bn"), s);
                    x = s;
                }
                let side = cfg.image_size / 8;
                b.linear("classifier", x, side * side, logits, true);
            }
        }
        let mut g = b.build();
        let blocked: Vec<usize> = g
            .groups
            .iter()
            .filter(|grp| grp.spaces.iter().any(|s| option_a_streams.contains(s)))
            .map(|grp| grp.id)
            .collect();
        for id in blocked {
            g.block(
                id,
                "residual stream coupled across stages by option-A zero padding: a smaller model cannot place the kept channels",
            );
        }
        g
    }

    /// The architecture whose spaces have `sizes` channels (per space of `graph`, which must
    /// be this architecture's graph).
    pub fn resized(&self, graph: &ChannelGraph, sizes: &[usize]) -> Result<Arch> {
        let size = |name: &str| -> Result<usize> {
            let id = graph.space_id(name).with_context(|| format!("no channel space `{name}`"))?;
            Ok(sizes[id])
        };
        let block_names = |blocks: &[usize]| -> Vec<String> {
            blocks
                .iter()
                .enumerate()
                .flat_map(|(s, &n)| (0..n).map(move |b| format!("layer{}.{b}", s + 1)))
                .collect()
        };
        let new = match self {
            Arch::CifarResnet {
                depth, projection, widths, ..
            } => {
                let n = (depth - 2) / 6;
                let names = block_names(&[n, n, n]);
                let mut w = *widths;
                for (s, ws) in w.iter_mut().enumerate() {
                    *ws = size(&format!("layer{}.0.conv2", s + 1))?;
                }
                Arch::CifarResnet {
                    depth: *depth,
                    projection: *projection,
                    widths: w,
                    mids: names.iter().map(|p| size(&format!("{p}.conv1"))).collect::<Result<_>>()?,
                }
            }
            Arch::Resnet {
                name,
                blocks,
                small_input_stem,
                widths,
                ..
            } => {
                let names = block_names(blocks);
                let mut w = *widths;
                for (s, ws) in w.iter_mut().enumerate() {
                    *ws = size(&format!("layer{}.0.conv2", s + 1))?;
                }
                Arch::Resnet {
                    name: name.clone(),
                    blocks: *blocks,
                    widths: w,
                    small_input_stem: *small_input_stem,
                    mids: names.iter().map(|p| size(&format!("{p}.conv1"))).collect::<Result<_>>()?,
                }
            }
            Arch::VggSmall { .. } => {
                let mut w = [0; 6];
                for (i, wi) in w.iter_mut().enumerate() {
                    *wi = size(&format!("features.{i}.conv"))?;
                }
                Arch::VggSmall { widths: w }
            }
        };
        Ok(new)
    }
}

/// Conv-BN-act, conv-BN, shortcut and add of nn-core's `BasicBlock`; returns the output space.
fn basic_block(b: &mut GraphBuilder, p: &str, x: usize, mid: usize, cout: usize, stride: usize, projection: bool) -> usize {
    let cin = b.size(x);
    let m = b.space(format!("{p}.conv1"), mid);
    b.conv(&format!("{p}.conv1"), x, m, false);
    b.batch_norm(&format!("{p}.bn1"), m);
    let out = b.space(format!("{p}.conv2"), cout);
    b.conv(&format!("{p}.conv2"), m, out, false);
    b.batch_norm(&format!("{p}.bn2"), out);
    if stride == 1 && cin == cout {
        b.same(x, out);
    } else if projection {
        let sc = b.space(format!("{p}.shortcut.conv"), cout);
        b.conv(&format!("{p}.shortcut.conv"), x, sc, false);
        b.batch_norm(&format!("{p}.shortcut.bn"), sc);
        b.same(sc, out);
    } else {
        // option A: subsample, then (cout - cin) zero channels split before/after
        b.offset(x, out, (cout - cin) / 2);
    }
    out
}
