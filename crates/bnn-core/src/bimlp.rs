//! BiMLP (Xu et al., NeurIPS 2022): a binary vision MLP on the Wave-MLP layout (Tang et al.,
//! CVPR 2022).
//!
//! * Stem, downsampling convolutions and classifier are full precision.
//! * [`BinaryFc`]: every binary FC (a 1x1, or depthwise 1x7 / 7x1, binary convolution on NCHW
//!   maps) has a learnable bias before it and BN, a residual and RPReLU after it:
//!   `y = RPReLU(BN(BinConv(x + b)) + S(x))`.
//! * Universal shortcut `S` (BiMLP, Sec. 3.3): identity when the channel count is kept; when a
//!   layer expands `c -> r c` the input channels are tiled `r` times; when it reduces
//!   `r c -> c` groups of `r` consecutive channels are averaged. Without it (the ablation) such
//!   layers have no residual.
//! * Multi-branch binary block (BiMLP, Sec. 3.2): the token mixer of Wave-MLP's phase-aware
//!   token mixing with binary projections, as three branches: a channel FC branch, and two
//!   phase-aware token-mixing branches, each `BinaryFc` amplitude `z` and phase `t` (1x1),
//!   `[z cos t, z sin t]` interleaved per channel, then a binary depthwise 1x7 (resp. 7x1)
//!   `2c -> c` FC; the branches are merged with learnable per-channel weights (initialised 1/3)
//!   and projected by a last binary FC. The plain ablation ([`BiMlpConfig::multi_branch`]
//!   false) chains the same pieces in one path (channel FC, H mixing, W mixing, projection).
//! * Block: `x + Mixer(BN(x))`, then `x + MLP(BN(x))` with a binary channel MLP `c -> 4c -> c`.
//! * Downsampling (BiMLP, Sec. 3.3): a full-precision 1x1 convolution, then the mean of max
//!   pools with kernels 2, 3, 5, 7 at stride 2 (padding `k / 2` for odd `k`, and `H mod 2`
//!   for `k = 2`, so all four outputs have size `ceil(H / 2)`), then BN.
//!
//! The official code was not available to us; the layout above follows the paper's text as
//! summarised in issue 3, and the phase branches follow Wave-MLP's PATM (amplitude and phase
//! by 1x1 FCs, cos/sin modulation, grouped 1x7 / 7x1 token FCs).

use crate::binary::{BinaryConv2d, LearnableBias, RPRelu};
use crate::factory::BinaryFactory;
use candle_core::{Result, Tensor, Var};
use candle_nn::ModuleT;
use nn_core::init::Init;
use nn_core::layers::{BatchNorm, Conv2d, Conv2dConfig, GlobalAvgPool, Linear};
use nn_core::models::ModelConfig;
use nn_core::var_store::{ParamKind, VarPath};
use nn_core::Model;
use std::sync::Arc;

/// Structure of a BiMLP.
#[derive(Debug, Clone, PartialEq)]
pub struct BiMlpConfig {
    pub name: String,
    /// Blocks per stage.
    pub layers: [usize; 4],
    /// Channels per stage.
    pub dims: [usize; 4],
    /// Expansion of the channel MLP.
    pub mlp_ratio: usize,
    /// Stem: `(kernel, stride, padding)` of the full-precision patch embedding.
    pub stem: (usize, usize, usize),
    /// Multi-branch token mixer (false: the plain single-path ablation).
    pub multi_branch: bool,
    /// Universal shortcuts on channel-changing binary FCs (false: none there).
    pub universal_shortcut: bool,
}

impl BiMlpConfig {
    /// BiMLP-S at 224x224: [2, 2, 4, 2] blocks, 64-128-320-512 channels, 7x7/4 stem.
    pub fn s() -> Self {
        Self {
            name: "bimlp-s".into(),
            layers: [2, 2, 4, 2],
            dims: [64, 128, 320, 512],
            mlp_ratio: 4,
            stem: (7, 4, 2),
            multi_branch: true,
            universal_shortcut: true,
        }
    }
    /// BiMLP-M at 224x224: [2, 3, 10, 3] blocks.
    pub fn m() -> Self {
        Self {
            name: "bimlp-m".into(),
            layers: [2, 3, 10, 3],
            ..Self::s()
        }
    }
    /// A small BiMLP for 28x28 and 32x32 inputs: [1, 1, 2, 1] blocks, 32-64-128-256 channels,
    /// 3x3/2 stem (feature maps 16-8-4-2 at 32x32, 14-7-4-2 at 28x28).
    pub fn small() -> Self {
        Self {
            name: "bimlp-small".into(),
            layers: [1, 1, 2, 1],
            dims: [32, 64, 128, 256],
            mlp_ratio: 4,
            stem: (3, 2, 1),
            multi_branch: true,
            universal_shortcut: true,
        }
    }
    /// The paper's ablation baseline: same layout, no multi-branch mixer, no universal shortcut.
    pub fn plain(mut self) -> Self {
        self.name = format!("{}-plain", self.name);
        self.multi_branch = false;
        self.universal_shortcut = false;
        self
    }
    /// By name: `bimlp-s`, `bimlp-m`, `bimlp-small`, each optionally with `-plain`.
    pub fn by_name(name: &str) -> Result<Self> {
        let (base, plain) = match name.strip_suffix("-plain") {
            Some(b) => (b, true),
            None => (name, false),
        };
        let c = match base {
            "bimlp-s" => Self::s(),
            "bimlp-m" => Self::m(),
            "bimlp-small" => Self::small(),
            other => candle_core::bail!("unknown BiMLP `{other}`; valid: bimlp-s, bimlp-m, bimlp-small (each also with -plain)"),
        };
        Ok(if plain { c.plain() } else { c })
    }
}

/// The universal shortcut from `cin` to `cout` channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UniversalShortcut {
    Identity,
    /// Tile the channels `r` times.
    Tile(usize),
    /// Average groups of `r` consecutive channels.
    Average(usize),
    None,
}

impl UniversalShortcut {
    pub fn new(cin: usize, cout: usize, enabled: bool) -> Self {
        if cin == cout {
            UniversalShortcut::Identity
        } else if !enabled {
            UniversalShortcut::None
        } else if cout % cin == 0 {
            UniversalShortcut::Tile(cout / cin)
        } else if cin % cout == 0 {
            UniversalShortcut::Average(cin / cout)
        } else {
            UniversalShortcut::None
        }
    }

    /// Applies it to an NCHW tensor (`None` for no shortcut).
    pub fn apply(&self, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(match *self {
            UniversalShortcut::Identity => Some(x.clone()),
            UniversalShortcut::Tile(r) => Some(x.repeat((1, r, 1, 1))?),
            UniversalShortcut::Average(r) => {
                let (n, c, h, w) = x.dims4()?;
                Some(x.reshape((n, c / r, r, h, w))?.mean(2)?)
            }
            UniversalShortcut::None => None,
        })
    }
}

/// `RPReLU(BN(BinConv(x + b)) + S(x))`.
pub struct BinaryFc {
    bias: LearnableBias,
    conv: Arc<BinaryConv2d>,
    bn: BatchNorm,
    shortcut: UniversalShortcut,
    act: RPRelu,
}

impl BinaryFc {
    pub fn new(vp: &VarPath, cfg: Conv2dConfig, universal_shortcut: bool, f: &BinaryFactory) -> Result<Self> {
        Ok(Self {
            bias: LearnableBias::new(&vp.pp("move"), cfg.in_channels)?,
            conv: f.binary_conv2d(&vp.pp("fc"), cfg)?,
            bn: BatchNorm::new(&vp.pp("bn"), cfg.out_channels)?,
            shortcut: UniversalShortcut::new(cfg.in_channels, cfg.out_channels, universal_shortcut),
            act: RPRelu::new(&vp.pp("act"), cfg.out_channels)?,
        })
    }
    /// A 1x1 binary FC.
    pub fn pointwise(vp: &VarPath, cin: usize, cout: usize, us: bool, f: &BinaryFactory) -> Result<Self> {
        Self::new(vp, Conv2dConfig::new(cin, cout, 1), us, f)
    }
}

impl ModuleT for BinaryFc {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv.forward_t(&self.bias.forward_t(x, train)?, train)?;
        let y = self.bn.forward_t(&y, train)?;
        let y = match self.shortcut.apply(x)? {
            Some(s) => (y + s)?,
            None => y,
        };
        self.act.forward_t(&y, train)
    }
}

/// `[z cos t, z sin t]` interleaved per channel: `[N, C, H, W]` -> `[N, 2C, H, W]`.
fn phase_modulate(z: &Tensor, t: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = z.dims4()?;
    let a = z.mul(&t.cos()?)?;
    let b = z.mul(&t.sin()?)?;
    Tensor::stack(&[a, b], 2)?.reshape((n, 2 * c, h, w))
}

/// A phase-aware token-mixing branch along H (`1 x 7`) or W (`7 x 1`).
struct PhaseBranch {
    amp: BinaryFc,
    phase: BinaryFc,
    token: BinaryFc,
}

impl PhaseBranch {
    fn new(vp: &VarPath, c: usize, along_w: bool, us: bool, f: &BinaryFactory) -> Result<Self> {
        let mut cfg = Conv2dConfig::new(2 * c, c, 1).groups(c);
        if along_w {
            cfg.kernel = (1, 7);
            cfg.padding = (0, 3);
        } else {
            cfg.kernel = (7, 1);
            cfg.padding = (3, 0);
        }
        Ok(Self {
            amp: BinaryFc::pointwise(&vp.pp("amp"), c, c, us, f)?,
            phase: BinaryFc::pointwise(&vp.pp("phase"), c, c, us, f)?,
            token: BinaryFc::new(&vp.pp("token"), cfg, us, f)?,
        })
    }
    fn forward(&self, z_in: &Tensor, t_in: &Tensor, train: bool) -> Result<Tensor> {
        let z = self.amp.forward_t(z_in, train)?;
        let t = self.phase.forward_t(t_in, train)?;
        self.token.forward_t(&phase_modulate(&z, &t)?, train)
    }
}

/// The token mixer: multi-branch (channel, H, W branches merged with learnable weights) or the
/// plain single path, followed by a binary projection.
pub struct TokenMixer {
    channel: BinaryFc,
    h: PhaseBranch,
    w: PhaseBranch,
    merge: Option<Var>,
    proj: BinaryFc,
    c: usize,
    name: String,
}

impl TokenMixer {
    pub fn new(vp: &VarPath, c: usize, cfg: &BiMlpConfig, f: &BinaryFactory) -> Result<Self> {
        let us = cfg.universal_shortcut;
        Ok(Self {
            channel: BinaryFc::pointwise(&vp.pp("channel"), c, c, us, f)?,
            h: PhaseBranch::new(&vp.pp("h"), c, true, us, f)?,
            w: PhaseBranch::new(&vp.pp("w"), c, false, us, f)?,
            merge: if cfg.multi_branch {
                Some(vp.param("merge", &[3, c], Init::Const(1.0 / 3.0), ParamKind::NormWeight)?)
            } else {
                None
            },
            proj: BinaryFc::pointwise(&vp.pp("proj"), c, c, us, f)?,
            c,
            name: vp.full_name("merge"),
        })
    }
}

impl ModuleT for TokenMixer {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = match &self.merge {
            Some(m) => {
                let c = self.channel.forward_t(x, train)?;
                let h = self.h.forward(x, x, train)?;
                let w = self.w.forward(x, x, train)?;
                if nn_core::summary::is_recording() {
                    nn_core::summary::record(|| nn_core::summary::LayerStat {
                        name: self.name.clone(),
                        kind: "BranchMerge".into(),
                        out_shape: c.dims().to_vec(),
                        params: m.elem_count(),
                        ..Default::default()
                    });
                }
                let m = m.as_tensor();
                let wt = |i: usize| -> Result<Tensor> { m.get(i)?.reshape((1, self.c, 1, 1)) };
                ((c.broadcast_mul(&wt(0)?)? + h.broadcast_mul(&wt(1)?)?)? + w.broadcast_mul(&wt(2)?)?)?
            }
            None => {
                let c = self.channel.forward_t(x, train)?;
                let h = self.h.forward(&c, x, train)?;
                self.w.forward(&h, x, train)?
            }
        };
        self.proj.forward_t(&y, train)
    }
}

/// One BiMLP block.
pub struct BiMlpBlock {
    norm1: BatchNorm,
    mixer: TokenMixer,
    norm2: BatchNorm,
    fc1: BinaryFc,
    fc2: BinaryFc,
}

impl BiMlpBlock {
    pub fn new(vp: &VarPath, c: usize, cfg: &BiMlpConfig, f: &BinaryFactory) -> Result<Self> {
        let hidden = c * cfg.mlp_ratio;
        Ok(Self {
            norm1: BatchNorm::new(&vp.pp("norm1"), c)?,
            mixer: TokenMixer::new(&vp.pp("mixer"), c, cfg, f)?,
            norm2: BatchNorm::new(&vp.pp("norm2"), c)?,
            fc1: BinaryFc::pointwise(&vp.pp("mlp.fc1"), c, hidden, cfg.universal_shortcut, f)?,
            fc2: BinaryFc::pointwise(&vp.pp("mlp.fc2"), hidden, c, cfg.universal_shortcut, f)?,
        })
    }
}

impl ModuleT for BiMlpBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = (x + self.mixer.forward_t(&self.norm1.forward_t(x, train)?, train)?)?;
        let y = self.fc1.forward_t(&self.norm2.forward_t(&x, train)?, train)?;
        x + self.fc2.forward_t(&y, train)?
    }
}

/// Full-precision 1x1 conv, mean of max pools (k = 2, 3, 5, 7, stride 2), BN.
pub struct Downsample {
    conv: Conv2d,
    bn: BatchNorm,
}

impl Downsample {
    pub fn new(vp: &VarPath, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(&vp.pp("conv"), Conv2dConfig::new(cin, cout, 1).bias(true))?,
            bn: BatchNorm::new(&vp.pp("bn"), cout)?,
        })
    }
}

/// Mean of the max pools with kernels 2, 3, 5, 7 at stride 2, padded so all give `ceil(H/2)`.
pub fn multi_max_pool(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mut acc: Option<Tensor> = None;
    for k in [2usize, 3, 5, 7] {
        let pad = |s: usize| if k == 2 { s % 2 } else { k / 2 };
        let p = nn_core::ops::max_pool2d(x, (k, k), (2, 2), (pad(h), pad(w)))?;
        acc = Some(match acc {
            Some(a) => (a + p)?,
            None => p,
        });
    }
    acc.expect("four pools") / 4.0
}

impl ModuleT for Downsample {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv.forward_t(x, train)?;
        self.bn.forward_t(&multi_max_pool(&y)?, train)
    }
}

/// A BiMLP classifier.
pub struct BiMlp {
    name: String,
    stem: Conv2d,
    stem_bn: BatchNorm,
    stages: Vec<(Option<Downsample>, Vec<BiMlpBlock>)>,
    norm: BatchNorm,
    head: Linear,
    num_features: usize,
    num_classes: usize,
}

impl BiMlp {
    pub fn new(vp: &VarPath, mc: &ModelConfig, cfg: &BiMlpConfig, f: &BinaryFactory) -> Result<Self> {
        let (k, s, p) = cfg.stem;
        let stem = Conv2d::new(
            &vp.pp("stem.conv"),
            Conv2dConfig::new(mc.in_channels, cfg.dims[0], k).stride(s).padding(p).bias(true),
        )?;
        let stem_bn = BatchNorm::new(&vp.pp("stem.bn"), cfg.dims[0])?;
        let mut stages = Vec::new();
        for (i, (&n, &c)) in cfg.layers.iter().zip(cfg.dims.iter()).enumerate() {
            let down = if i > 0 {
                Some(Downsample::new(&vp.pp(format!("down{i}")), cfg.dims[i - 1], c)?)
            } else {
                None
            };
            let blocks = (0..n)
                .map(|b| BiMlpBlock::new(&vp.pp(format!("stage{}.{b}", i + 1)), c, cfg, f))
                .collect::<Result<Vec<_>>>()?;
            stages.push((down, blocks));
        }
        let d = cfg.dims[3];
        Ok(Self {
            name: cfg.name.clone(),
            stem,
            stem_bn,
            stages,
            norm: BatchNorm::new(&vp.pp("norm"), d)?,
            head: Linear::new(&vp.pp("head"), d, mc.num_classes, true)?,
            num_features: d,
            num_classes: mc.num_classes,
        })
    }
}

impl Model for BiMlp {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_stages(x, train)?.pop().expect("pooled features"))
    }
    fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut x = self.stem_bn.forward_t(&self.stem.forward_t(x, train)?, train)?;
        let mut outs = Vec::new();
        for (down, blocks) in &self.stages {
            if let Some(d) = down {
                x = d.forward_t(&x, train)?;
            }
            for b in blocks {
                x = b.forward_t(&x, train)?;
            }
            outs.push(x.clone());
        }
        let x = self.norm.forward_t(&x, train)?;
        outs.push(GlobalAvgPool.forward_t(&x, train)?);
        Ok(outs)
    }
    fn forward_head(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        self.head.forward_t(features, train)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn num_features(&self) -> usize {
        self.num_features
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn universal_shortcut_tiles_and_averages() -> Result<()> {
        let x = Tensor::arange(0f32, 8.0, &Device::Cpu)?.reshape((1, 4, 1, 2))?;
        let t = UniversalShortcut::new(4, 8, true).apply(&x)?.unwrap();
        assert_eq!(t.dims(), &[1, 8, 1, 2]);
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?[8..], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        let a = UniversalShortcut::new(4, 2, true).apply(&x)?.unwrap();
        assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, vec![1.0, 2.0, 5.0, 6.0]);
        assert!(UniversalShortcut::new(4, 2, false).apply(&x)?.is_none());
        Ok(())
    }

    #[test]
    fn multi_max_pool_sizes_align_for_even_and_odd_maps() -> Result<()> {
        for s in [7usize, 8, 14, 2] {
            let x = Tensor::randn(0f32, 1.0, (1, 2, s, s), &Device::Cpu)?;
            let y = multi_max_pool(&x)?;
            assert_eq!(y.dims(), &[1, 2, s.div_ceil(2), s.div_ceil(2)]);
        }
        // constant input: every pool gives the constant
        let x = Tensor::ones((1, 1, 6, 6), DType::F32, &Device::Cpu)?;
        assert!((multi_max_pool(&x)?.mean_all()?.to_scalar::<f32>()? - 1.0).abs() < 1e-6);
        Ok(())
    }
}
