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
    "resnet50",
    "resnet101",
    "resnet152",
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
    /// ImageNet-style ResNet (option B) with basic or bottleneck blocks; `mids` holds one
    /// inner width per basic block, two per bottleneck block.
    Resnet {
        name: String,
        #[serde(default)]
        bottleneck: bool,
        blocks: [usize; 4],
        stem_width: usize,
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
            "resnet18" | "resnet34" | "resnet50" | "resnet101" | "resnet152" | "resnet18-cifar" => {
                let rc = match name {
                    "resnet34" => ResNetConfig::resnet34(),
                    "resnet50" => ResNetConfig::resnet50(),
                    "resnet101" => ResNetConfig::resnet101(),
                    "resnet152" => ResNetConfig::resnet152(),
                    _ => ResNetConfig::resnet18(),
                };
                Arch::Resnet {
                    name: rc.name.clone(),
                    bottleneck: rc.bottleneck,
                    blocks: rc.blocks,
                    stem_width: rc.stem_width,
                    widths: rc.widths,
                    small_input_stem: name == "resnet18-cifar",
                    mids: rc.default_mid_widths(),
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
                bottleneck,
                blocks,
                stem_width,
                widths,
                small_input_stem,
                mids,
            } => {
                let rc = ResNetConfig {
                    name: name.clone(),
                    bottleneck: *bottleneck,
                    blocks: *blocks,
                    stem_width: *stem_width,
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
            Arch::Resnet {
                bottleneck,
                blocks,
                stem_width,
                widths,
                mids,
                ..
            } => {
                let stem = b.space("conv1", *stem_width);
                b.conv("conv1", input, stem, false);
                b.batch_norm("bn1", stem);
                let mut x = stem;
                let per = if *bottleneck { 2 } else { 1 };
                let mut mid = mids.chunks(per);
                for (s, (&nb, &cout)) in blocks.iter().zip(widths.iter()).enumerate() {
                    for blk in 0..nb {
                        let stride = if s > 0 && blk == 0 { 2 } else { 1 };
                        let p = format!("layer{}.{blk}", s + 1);
                        let m = mid.next().expect("one inner width per block (two per bottleneck)");
                        x = if *bottleneck {
                            bottleneck_block(&mut b, &p, x, m[0], m[1], cout, stride)
                        } else {
                            basic_block(&mut b, &p, x, m[0], cout, stride, true)
                        };
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
                bottleneck,
                blocks,
                small_input_stem,
                widths,
                ..
            } => {
                let names = block_names(blocks);
                let (out_conv, inner): (&str, &[&str]) = if *bottleneck {
                    ("conv3", &["conv1", "conv2"])
                } else {
                    ("conv2", &["conv1"])
                };
                let mut w = *widths;
                for (s, ws) in w.iter_mut().enumerate() {
                    *ws = size(&format!("layer{}.0.{out_conv}", s + 1))?;
                }
                let mut mids = Vec::with_capacity(names.len() * inner.len());
                for p in &names {
                    for conv in inner {
                        mids.push(size(&format!("{p}.{conv}"))?);
                    }
                }
                Arch::Resnet {
                    name: name.clone(),
                    bottleneck: *bottleneck,
                    blocks: *blocks,
                    stem_width: size("conv1")?,
                    widths: w,
                    small_input_stem: *small_input_stem,
                    mids,
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

/// nn-core's `Bottleneck`: 1x1 conv-BN-act, 3x3 conv-BN-act, 1x1 conv-BN, projection shortcut
/// when the shape changes, add; returns the output space.
fn bottleneck_block(b: &mut GraphBuilder, p: &str, x: usize, mid1: usize, mid2: usize, cout: usize, stride: usize) -> usize {
    let cin = b.size(x);
    let m1 = b.space(format!("{p}.conv1"), mid1);
    b.conv(&format!("{p}.conv1"), x, m1, false);
    b.batch_norm(&format!("{p}.bn1"), m1);
    let m2 = b.space(format!("{p}.conv2"), mid2);
    b.conv(&format!("{p}.conv2"), m1, m2, false);
    b.batch_norm(&format!("{p}.bn2"), m2);
    let out = b.space(format!("{p}.conv3"), cout);
    b.conv(&format!("{p}.conv3"), m2, out, false);
    b.batch_norm(&format!("{p}.bn3"), out);
    if stride == 1 && cin == cout {
        b.same(x, out);
    } else {
        let sc = b.space(format!("{p}.shortcut.conv"), cout);
        b.conv(&format!("{p}.shortcut.conv"), x, sc, false);
        b.batch_norm(&format!("{p}.shortcut.bn"), sc);
        b.same(sc, out);
    }
    out
}
