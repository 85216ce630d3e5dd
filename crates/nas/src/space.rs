//! Search spaces and architectures.
//!
//! A [`SearchSpace`] is a layer-wise ("macro") space: a fixed stem, a list of searchable layer
//! slots (each with a base width and a stride), a fixed head, and per slot a choice of one
//! operation ([`Op`]) and one width multiplier. An [`Arch`] is one choice per slot; it is a plain
//! value that serialises to JSON and builds to a model ([`crate::net::Network::standalone`]).

use anyhow::{bail, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// One candidate operation of a layer slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// `k x k` convolution + BN + ReLU.
    Conv { k: usize },
    /// MobileNetV2 inverted residual: 1x1 expansion by `expand` (absent for 1), depthwise
    /// `k x k`, linear 1x1 projection; identity shortcut when stride 1 and widths match (or
    /// always, see [`SearchSpace::residual_all`]).
    InvRes { expand: usize, k: usize },
    /// The layer is left out (identity); only allowed where the slot keeps resolution and width.
    Skip,
}

impl Op {
    /// A short name, also the parameter-path component of the op (`conv3`, `ir_e6_k5`, `skip`).
    pub fn name(&self) -> String {
        match *self {
            Op::Conv { k } => format!("conv{k}"),
            Op::InvRes { expand, k } => format!("ir_e{expand}_k{k}"),
            Op::Skip => "skip".into(),
        }
    }

    /// Parses [`Op::name`].
    pub fn parse(s: &str) -> Result<Op> {
        if s == "skip" {
            return Ok(Op::Skip);
        }
        if let Some(k) = s.strip_prefix("conv") {
            return Ok(Op::Conv {
                k: k.parse().with_context(|| format!("op `{s}`"))?,
            });
        }
        if let Some(rest) = s.strip_prefix("ir_e") {
            if let Some((e, k)) = rest.split_once("_k") {
                return Ok(Op::InvRes {
                    expand: e.parse().with_context(|| format!("op `{s}`"))?,
                    k: k.parse().with_context(|| format!("op `{s}`"))?,
                });
            }
        }
        bail!("unknown op `{s}` (expected convK, ir_eE_kK or skip)")
    }
}

/// A searchable layer position.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    /// Output channels at width multiplier 1.
    pub channels: usize,
    /// Stride of the layer (1 or 2).
    pub stride: usize,
    /// Whether [`Op::Skip`] is allowed (stride 1 and same base width as the previous slot).
    pub skippable: bool,
}

/// A layer-wise search space over a small backbone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchSpace {
    /// Preset name (`cifar-small`, `mnist-small`, `imagenet-mbv2`).
    pub name: String,
    pub in_channels: usize,
    pub image_size: usize,
    pub num_classes: usize,
    /// Stem: 3x3 conv to this many channels.
    pub stem_channels: usize,
    pub stem_stride: usize,
    /// Optional fixed first block after the stem (MobileNetV2's `ir_e1_k3` to 16 channels).
    pub first_block: Option<(Op, usize)>,
    pub slots: Vec<Slot>,
    /// Operations every slot chooses from.
    pub ops: Vec<Op>,
    /// Width multipliers every slot chooses from (output channels `round(channels * w)`).
    pub widths: Vec<f64>,
    /// 1x1 conv + BN + ReLU to this many channels before pooling (MobileNetV2's 1280).
    pub head_channels: Option<usize>,
    /// Every searchable layer adds a parameter-free shortcut (strided identity, channels
    /// zero-padded or truncated, as ResNet's option A), so the stem's features reach the head
    /// whatever the sampled ops: this keeps a small, briefly trained supernet learnable. Off
    /// for the MobileNetV2 space (shortcut only on stride-1 IR blocks of equal width).
    #[serde(default)]
    pub residual_all: bool,
}

/// Stage layout `(channels, layers, first stride)` to slots; the first layer of a stage is
/// not skippable.
fn stages_to_slots(stem: usize, stages: &[(usize, usize, usize)]) -> Vec<Slot> {
    let mut slots = Vec::new();
    let mut prev = stem;
    for &(c, n, s) in stages {
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            slots.push(Slot {
                channels: c,
                stride,
                skippable: stride == 1 && c == prev,
            });
            prev = c;
        }
    }
    slots
}

impl SearchSpace {
    /// The small space for 28x28 / 32x32 inputs: stem 3x3 to 16 channels, 8 layers in three
    /// stages (16, 32, 64 channels; strides 1, 2, 2), ops {conv 3/5/7, IR e1/e3/e6 x k3/k5,
    /// skip}, widths {0.5, 0.75, 1.0}, every layer with a shortcut.
    pub fn small(name: &str, in_channels: usize, image_size: usize, num_classes: usize) -> Self {
        Self::small_with(name, in_channels, image_size, num_classes, 1, [16, 32, 64])
    }

    /// [`SearchSpace::small`] with a chosen stem stride (2 quarters the cost) and stage widths.
    pub fn small_with(
        name: &str,
        in_channels: usize,
        image_size: usize,
        num_classes: usize,
        stem_stride: usize,
        widths: [usize; 3],
    ) -> Self {
        let ops = vec![
            Op::Conv { k: 3 },
            Op::Conv { k: 5 },
            Op::Conv { k: 7 },
            Op::InvRes { expand: 1, k: 3 },
            Op::InvRes { expand: 3, k: 3 },
            Op::InvRes { expand: 3, k: 5 },
            Op::InvRes { expand: 6, k: 3 },
            Op::InvRes { expand: 6, k: 5 },
            Op::Skip,
        ];
        Self {
            name: name.into(),
            in_channels,
            image_size,
            num_classes,
            stem_channels: widths[0],
            stem_stride,
            first_block: None,
            slots: stages_to_slots(widths[0], &[(widths[0], 2, 1), (widths[1], 3, 2), (widths[2], 3, 2)]),
            ops,
            widths: vec![0.5, 0.75, 1.0],
            head_channels: None,
            residual_all: true,
        }
    }

    /// The MobileNetV2-style ImageNet space of ProxylessNAS/DC-NAS (224x224, 1000 classes):
    /// stem 3x3/2 to 32, a fixed `ir_e1_k3` block to 16, then 20 searchable slots in stages
    /// (24x4/2, 40x4/2, 80x4/2, 96x4/1, 192x4/2) and 320x1/1, ops IR {e3, e6} x {k3, k5, k7}
    /// plus skip, width 1, head 1x1 conv to 1280.
    pub fn imagenet_mbv2(num_classes: usize) -> Self {
        let mut ops = Vec::new();
        for expand in [3, 6] {
            for k in [3, 5, 7] {
                ops.push(Op::InvRes { expand, k });
            }
        }
        ops.push(Op::Skip);
        Self {
            name: "imagenet-mbv2".into(),
            in_channels: 3,
            image_size: 224,
            num_classes,
            stem_channels: 32,
            stem_stride: 2,
            first_block: Some((Op::InvRes { expand: 1, k: 3 }, 16)),
            slots: stages_to_slots(16, &[(24, 4, 2), (40, 4, 2), (80, 4, 2), (96, 4, 1), (192, 4, 2), (320, 1, 1)]),
            ops,
            widths: vec![1.0],
            head_channels: Some(1280),
            residual_all: false,
        }
    }

    /// Output channels of a slot at width multiplier `w` (at least 1, rounded).
    pub fn channels(&self, slot: usize, w: f64) -> usize {
        ((self.slots[slot].channels as f64 * w).round() as usize).max(1)
    }

    /// The widest width multiplier (the supernet's).
    pub fn max_width(&self) -> f64 {
        self.widths.iter().cloned().fold(0.0, f64::max)
    }

    /// Ops allowed at `slot`.
    pub fn allowed_ops(&self, slot: usize) -> Vec<usize> {
        (0..self.ops.len())
            .filter(|&i| self.ops[i] != Op::Skip || self.slots[slot].skippable)
            .collect()
    }

    /// Number of architectures in the space.
    pub fn size(&self) -> f64 {
        (0..self.slots.len())
            .map(|s| {
                let ops = self.allowed_ops(s);
                let skips = ops.iter().filter(|&&o| self.ops[o] == Op::Skip).count();
                ((ops.len() - skips) * self.widths.len() + skips) as f64
            })
            .product()
    }

    /// A uniformly random architecture (uniform op per slot, then uniform width; a skipped
    /// layer has no width and records 1.0): the single-path sampling of the supernet.
    pub fn sample(&self, rng: &mut impl Rng) -> Arch {
        let layers = (0..self.slots.len())
            .map(|s| {
                let ops = self.allowed_ops(s);
                let op = self.ops[ops[rng.gen_range(0..ops.len())]];
                let width = if op == Op::Skip {
                    1.0
                } else {
                    self.widths[rng.gen_range(0..self.widths.len())]
                };
                LayerChoice { op, width }
            })
            .collect();
        Arch { layers }
    }

    /// Checks that `arch` belongs to this space.
    pub fn validate(&self, arch: &Arch) -> Result<()> {
        if arch.layers.len() != self.slots.len() {
            bail!(
                "{}: architecture has {} layers, the space has {}",
                self.name,
                arch.layers.len(),
                self.slots.len()
            );
        }
        for (i, l) in arch.layers.iter().enumerate() {
            if !self.ops.contains(&l.op) {
                bail!("{}: layer {i}: op {} is not in the space", self.name, l.op.name());
            }
            if l.op == Op::Skip && !self.slots[i].skippable {
                bail!("{}: layer {i} cannot be skipped (it changes resolution or width)", self.name);
            }
            if l.op != Op::Skip && !self.widths.iter().any(|w| (w - l.width).abs() < 1e-9) {
                bail!("{}: layer {i}: width {} is not one of {:?}", self.name, l.width, self.widths);
            }
        }
        Ok(())
    }

    /// The integer encoding of `arch`: per layer `op index * widths + width index`.
    pub fn encode(&self, arch: &Arch) -> Result<Vec<usize>> {
        self.validate(arch)?;
        Ok(arch
            .layers
            .iter()
            .map(|l| {
                let o = self.ops.iter().position(|&op| op == l.op).expect("validated");
                let w = self.widths.iter().position(|w| (w - l.width).abs() < 1e-9).unwrap_or(0);
                o * self.widths.len() + w
            })
            .collect())
    }

    /// Inverse of [`SearchSpace::encode`].
    pub fn decode(&self, code: &[usize]) -> Result<Arch> {
        let nw = self.widths.len();
        let layers = code
            .iter()
            .map(|&c| {
                let op = *self.ops.get(c / nw).with_context(|| format!("code {c} out of range"))?;
                let width = if op == Op::Skip { 1.0 } else { self.widths[c % nw] };
                Ok(LayerChoice { op, width })
            })
            .collect::<Result<Vec<_>>>()?;
        let arch = Arch { layers };
        self.validate(&arch)?;
        Ok(arch)
    }
}

/// The choice of one layer slot.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerChoice {
    #[serde(with = "op_name")]
    pub op: Op,
    /// Width multiplier (1.0 for skip).
    pub width: f64,
}

mod op_name {
    use super::Op;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(op: &Op, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&op.name())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Op, D::Error> {
        let s = String::deserialize(d)?;
        Op::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One architecture of a [`SearchSpace`]: a choice per slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arch {
    pub layers: Vec<LayerChoice>,
}

impl Arch {
    /// A compact, unique text key (`conv3@1|ir_e6_k5@0.5|skip|...`), used to deduplicate and
    /// to name stand-alone runs.
    pub fn key(&self) -> String {
        self.layers
            .iter()
            .map(|l| {
                if l.op == Op::Skip {
                    "skip".into()
                } else {
                    format!("{}@{}", l.op.name(), l.width)
                }
            })
            .collect::<Vec<_>>()
            .join("|")
    }

    /// A short stable hash of [`Arch::key`] (16 hex digits) for directory names.
    pub fn short_id(&self) -> String {
        let parts: Vec<u64> = self.key().bytes().map(|b| b as u64).collect();
        format!("{:016x}", nn_core::rng::mix_seed(&parts))
    }
}
