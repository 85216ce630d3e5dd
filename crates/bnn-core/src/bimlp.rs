//! BiMLP (Xu et al., NeurIPS 2022): a binary vision MLP on the Wave-MLP layout (Tang et al.,
//! CVPR 2022), following the authors' released MindSpore evaluation code
//! (`mindspore-ai/models`, `research/cv/BiMLP/src/bimlp.py`; no training code was released).
//!
//! * Stem (conv, BN, RPReLU), downsampling convolutions and classifier are full precision.
//! * [`BinaryFc`]: every binary FC (a 1x1, or depthwise 1x7 / 7x1, binary convolution on NCHW
//!   maps) has a learnable bias before it and BN, a residual and RPReLU after it:
//!   `y = RPReLU(BN(BinConv(x + b)) + S(x))`.
//! * Universal shortcut `S` (BiMLP, Sec. 3.3): identity when the channel count is kept; when a
//!   layer expands `c -> r c` the input channels are tiled `r` times; when it reduces
//!   `r c -> c` groups of `r` consecutive channels are averaged. In a [`BinaryMlp`] the first
//!   FC's shortcut passes through its own BN and RPReLU (as the released `Mlp`). Without
//!   universal shortcuts (the ablation) channel-changing layers have no residual.
//! * Token mixer: Wave-MLP's phase-aware token mixing with binary projections. A channel FC
//!   branch and two phase branches (H: 1x7, W: 7x1), each `BinaryFc` amplitude `z` and phase
//!   `t` (1x1), `[z cos t ; z sin t]` concatenated along channels, then a binary grouped
//!   (`groups = c`) `2c -> c` token FC. The branches are merged with Wave-MLP's input-dependent
//!   weights, a softmax over the three branches per channel of a binary `BinaryMlp`
//!   `c -> c/4 -> 3c` applied to the global average of `h + w + c + x`, plus the input:
//!   `h a_0 + w a_1 + c a_2 + x`, then a binary projection.
//! * Multi-branch block (BiMLP, Sec. 3.2): `x + Mixer(BN(x))`, then with `m = BN(x)`:
//!   `x + w_0 B_h(m) + w_1 B_w(m) + (1 - w_0 - w_1) MLP(m)` where `B_h`, `B_w` are binary
//!   depthwise 1x7 / 7x1 FCs with identity shortcuts, `MLP` the binary channel MLP
//!   `c -> 4c -> c` and `w_0, w_1` two learnable scalars initialised to 0. The ablation
//!   ([`BiMlpConfig::multi_branch`] false) keeps only `x + MLP(m)`.
//! * Downsampling (BiMLP, Sec. 3.3): a full-precision 1x1 convolution, BN, RPReLU, then the
//!   mean of max pools with kernels 2, 3, 5, 7 at stride 2 with "same" padding (output
//!   `ceil(H / 2)`, the extra padding row/column at the bottom/right).
//!
//! Deviations from the released code: BN everywhere (its BiMLP-M uses GroupNorm(1) for the
//! block, stem and downsampling norms); activations binarised by the chosen quantizer's sign
//! (the released quantizer rounds `clip(x, -1, 1)` to `{-1, 0, 1}`); depthwise weights binarised
//! with a per-output-channel scale (the released XNOR scale, the mean of `|W|` over input
//! channels, leaves a one-input-per-group kernel at full precision).

use crate::binary::{LearnableBias, RPRelu};
use candle_core::{Result, Tensor, Var};
use candle_nn::ModuleT;
use nn_core::factory::{LayerFactory, LayerRole};
use nn_core::init::Init;
use nn_core::layers::{BatchNorm, BoxedLayer, Conv2d, Conv2dConfig, GlobalAvgPool, Linear};
use nn_core::models::ModelConfig;
use nn_core::var_store::{ParamKind, VarPath};
use nn_core::Model;

/// Structure of a BiMLP.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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

/// `RPReLU(BN(BinConv(x + b)) + S(x))`, the shortcut optionally through its own BN and RPReLU.
pub struct BinaryFc {
    bias: LearnableBias,
    /// The binary convolution, a `LayerRole::Body` convolution of the factory (a trainable
    /// [`BinaryConv2d`](crate::BinaryConv2d) from [`BinaryFactory`](crate::BinaryFactory), or a
    /// packed one from [`PackedFactory`](crate::deploy::PackedFactory) for inference).
    conv: BoxedLayer,
    bn: BatchNorm,
    shortcut: UniversalShortcut,
    shortcut_norm: Option<(BatchNorm, RPRelu)>,
    act: RPRelu,
    out_channels: usize,
}

impl BinaryFc {
    pub fn new(vp: &VarPath, cfg: Conv2dConfig, universal_shortcut: bool, f: &dyn LayerFactory) -> Result<Self> {
        Ok(Self {
            bias: LearnableBias::new(&vp.pp("move"), cfg.in_channels)?,
            conv: f.conv2d(&vp.pp("fc"), cfg, LayerRole::Body)?,
            bn: BatchNorm::new(&vp.pp("bn"), cfg.out_channels)?,
            shortcut: UniversalShortcut::new(cfg.in_channels, cfg.out_channels, universal_shortcut),
            shortcut_norm: None,
            act: RPRelu::new(&vp.pp("act"), cfg.out_channels)?,
            out_channels: cfg.out_channels,
        })
    }
    /// A 1x1 binary FC.
    pub fn pointwise(vp: &VarPath, cin: usize, cout: usize, us: bool, f: &dyn LayerFactory) -> Result<Self> {
        Self::new(vp, Conv2dConfig::new(cin, cout, 1), us, f)
    }
    /// A binary depthwise FC along W (`1 x 7`, `along_w`) or H (`7 x 1`) over `cin` inputs
    /// in `c` groups (`cin / c` inputs per group), `cin -> c`.
    pub fn token(vp: &VarPath, cin: usize, c: usize, along_w: bool, us: bool, f: &dyn LayerFactory) -> Result<Self> {
        let mut cfg = Conv2dConfig::new(cin, c, 1).groups(c);
        (cfg.kernel, cfg.padding) = if along_w { ((1, 7), (0, 3)) } else { ((7, 1), (3, 0)) };
        Self::new(vp, cfg, us, f)
    }
    /// Passes the universal shortcut through its own BN and RPReLU (the first FC of the
    /// released `Mlp`); no-op without a shortcut.
    pub fn with_shortcut_norm(mut self, vp: &VarPath) -> Result<Self> {
        let c = self.out_channels;
        if !matches!(self.shortcut, UniversalShortcut::None) {
            self.shortcut_norm = Some((BatchNorm::new(&vp.pp("short_bn"), c)?, RPRelu::new(&vp.pp("short_act"), c)?));
        }
        Ok(self)
    }
}

impl ModuleT for BinaryFc {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv.forward_t(&self.bias.forward_t(x, train)?, train)?;
        let y = self.bn.forward_t(&y, train)?;
        let y = match self.shortcut.apply(x)? {
            Some(s) => {
                let s = match &self.shortcut_norm {
                    Some((bn, act)) => act.forward_t(&bn.forward_t(&s, train)?, train)?,
                    None => s,
                };
                (y + s)?
            }
            None => y,
        };
        self.act.forward_t(&y, train)
    }
}

/// The released `Mlp`: a binary FC `cin -> hidden` whose universal shortcut passes through
/// its own BN and RPReLU, then a binary FC `hidden -> cout` with a plain universal shortcut.
pub struct BinaryMlp {
    fc1: BinaryFc,
    fc2: BinaryFc,
}

impl BinaryMlp {
    pub fn new(vp: &VarPath, cin: usize, hidden: usize, cout: usize, us: bool, f: &dyn LayerFactory) -> Result<Self> {
        Ok(Self {
            fc1: BinaryFc::pointwise(&vp.pp("fc1"), cin, hidden, us, f)?.with_shortcut_norm(&vp.pp("fc1"))?,
            fc2: BinaryFc::pointwise(&vp.pp("fc2"), hidden, cout, us, f)?,
        })
    }
}

impl ModuleT for BinaryMlp {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.fc2.forward_t(&self.fc1.forward_t(x, train)?, train)
    }
}

/// `[z cos t ; z sin t]` concatenated along channels: `[N, C, H, W]` -> `[N, 2C, H, W]`.
fn phase_modulate(z: &Tensor, t: &Tensor) -> Result<Tensor> {
    Tensor::cat(&[z.mul(&t.cos()?)?, z.mul(&t.sin()?)?], 1)
}

/// A phase-aware token-mixing branch along W (`1 x 7`) or H (`7 x 1`).
struct PhaseBranch {
    amp: BinaryFc,
    phase: BinaryFc,
    token: BinaryFc,
}

impl PhaseBranch {
    fn new(vp: &VarPath, c: usize, along_w: bool, us: bool, f: &dyn LayerFactory) -> Result<Self> {
        Ok(Self {
            amp: BinaryFc::pointwise(&vp.pp("amp"), c, c, us, f)?,
            phase: BinaryFc::pointwise(&vp.pp("phase"), c, c, us, f)?,
            token: BinaryFc::token(&vp.pp("token"), 2 * c, c, along_w, us, f)?,
        })
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let z = self.amp.forward_t(x, train)?;
        let t = self.phase.forward_t(x, train)?;
        self.token.forward_t(&phase_modulate(&z, &t)?, train)
    }
}

/// The token mixer: channel, H and W branches merged with input-dependent weights (a softmax
/// over the branches, per channel), plus the input, then a binary projection.
pub struct TokenMixer {
    channel: BinaryFc,
    h: PhaseBranch,
    w: PhaseBranch,
    reweight: BinaryMlp,
    proj: BinaryFc,
    c: usize,
}

impl TokenMixer {
    pub fn new(vp: &VarPath, c: usize, cfg: &BiMlpConfig, f: &dyn LayerFactory) -> Result<Self> {
        let us = cfg.universal_shortcut;
        if c % 4 != 0 {
            candle_core::bail!("BiMLP token mixer: {c} channels, need a multiple of 4 (reweighting MLP c -> c/4 -> 3c)");
        }
        Ok(Self {
            channel: BinaryFc::pointwise(&vp.pp("channel"), c, c, us, f)?,
            h: PhaseBranch::new(&vp.pp("h"), c, true, us, f)?,
            w: PhaseBranch::new(&vp.pp("w"), c, false, us, f)?,
            reweight: BinaryMlp::new(&vp.pp("reweight"), c, c / 4, 3 * c, us, f)?,
            proj: BinaryFc::pointwise(&vp.pp("proj"), c, c, us, f)?,
            c,
        })
    }
}

impl ModuleT for TokenMixer {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = self.channel.forward_t(x, train)?;
        let h = self.h.forward(x, train)?;
        let w = self.w.forward(x, train)?;
        let n = x.dim(0)?;
        let pooled = (((&h + &w)? + &c)? + x)?.mean_keepdim(3)?.mean_keepdim(2)?;
        // [N, 3C, 1, 1] -> [N, C, 3]: channel i's weight of branch k at 3 i + k
        let a = nn_core::layers::functional::softmax_last_dim(&self.reweight.forward_t(&pooled, train)?.reshape((n, self.c, 3))?)?;
        let wt = |k: usize| a.narrow(2, k, 1)?.reshape((n, self.c, 1, 1));
        let y = (((h.broadcast_mul(&wt(0)?)? + w.broadcast_mul(&wt(1)?)?)? + c.broadcast_mul(&wt(2)?)?)? + x)?;
        self.proj.forward_t(&y, train)
    }
}

/// One BiMLP block: token mixing, then the multi-branch channel part.
pub struct BiMlpBlock {
    norm1: BatchNorm,
    mixer: TokenMixer,
    norm2: BatchNorm,
    mlp: BinaryMlp,
    /// The depthwise 1x7 / 7x1 branches and their merge weights `[w_0, w_1]` (multi-branch).
    branches: Option<(BinaryFc, BinaryFc, Var)>,
    name: String,
}

impl BiMlpBlock {
    pub fn new(vp: &VarPath, c: usize, cfg: &BiMlpConfig, f: &dyn LayerFactory) -> Result<Self> {
        let us = cfg.universal_shortcut;
        let branches = if cfg.multi_branch {
            Some((
                BinaryFc::token(&vp.pp("sfc_h"), c, c, true, us, f)?,
                BinaryFc::token(&vp.pp("sfc_w"), c, c, false, us, f)?,
                vp.param("branch_weight", &[2], Init::ZEROS, ParamKind::NormWeight)?,
            ))
        } else {
            None
        };
        Ok(Self {
            norm1: BatchNorm::new(&vp.pp("norm1"), c)?,
            mixer: TokenMixer::new(&vp.pp("mixer"), c, cfg, f)?,
            norm2: BatchNorm::new(&vp.pp("norm2"), c)?,
            mlp: BinaryMlp::new(&vp.pp("mlp"), c, c * cfg.mlp_ratio, c, us, f)?,
            branches,
            name: vp.full_name("branch_weight"),
        })
    }
}

impl ModuleT for BiMlpBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = (x + self.mixer.forward_t(&self.norm1.forward_t(x, train)?, train)?)?;
        let m = self.norm2.forward_t(&x, train)?;
        let a = self.mlp.forward_t(&m, train)?;
        let Some((bh, bw, wt)) = &self.branches else {
            return x + a;
        };
        let b = bh.forward_t(&m, train)?;
        let c = bw.forward_t(&m, train)?;
        if nn_core::summary::is_recording() {
            nn_core::summary::record(|| nn_core::summary::LayerStat {
                name: self.name.clone(),
                kind: "BranchMerge".into(),
                out_shape: a.dims().to_vec(),
                params: wt.elem_count(),
                ..Default::default()
            });
        }
        let (w0, w1) = (wt.as_tensor().narrow(0, 0, 1)?, wt.as_tensor().narrow(0, 1, 1)?);
        // w_0 B_h + w_1 B_w + (1 - w_0 - w_1) MLP
        let rest = (w0.affine(-1.0, 1.0)? - &w1)?;
        let merged = ((b.broadcast_mul(&w0)? + c.broadcast_mul(&w1)?)? + a.broadcast_mul(&rest)?)?;
        x + merged
    }
}

/// Full-precision 1x1 conv, BN, RPReLU, then the mean of "same"-padded max pools (k = 2, 3,
/// 5, 7, stride 2).
pub struct Downsample {
    conv: Conv2d,
    bn: BatchNorm,
    act: RPRelu,
}

impl Downsample {
    pub fn new(vp: &VarPath, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(&vp.pp("conv"), Conv2dConfig::new(cin, cout, 1).bias(true))?,
            bn: BatchNorm::new(&vp.pp("bn"), cout)?,
            act: RPRelu::new(&vp.pp("act"), cout)?,
        })
    }
}

/// `(before, after)` padding of a "same" stride-2 window of size `k` over `len` positions
/// (output `ceil(len / 2)`, the odd remainder after).
fn same_padding(len: usize, k: usize) -> (usize, usize) {
    let total = ((len.div_ceil(2) - 1) * 2 + k).saturating_sub(len);
    (total / 2, total - total / 2)
}

/// Mean of the max pools with kernels 2, 3, 5, 7 at stride 2 with "same" padding (all give
/// `ceil(H/2)`; padded positions never win the max).
pub fn multi_max_pool(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let mut acc: Option<Tensor> = None;
    for k in [2usize, 3, 5, 7] {
        let ((top, bottom), (left, right)) = (same_padding(h, k), same_padding(w, k));
        // the pool pads symmetrically by (top, left); the extra bottom row / right column
        // are filled with the lowest f32 so that they never win the max
        let mut xp = x.clone();
        if bottom > top {
            let fill = Tensor::full(f32::MIN, (n, c, bottom - top, w), x.device())?.to_dtype(x.dtype())?;
            xp = Tensor::cat(&[&xp, &fill], 2)?;
        }
        if right > left {
            let fill = Tensor::full(f32::MIN, (n, c, xp.dim(2)?, right - left), x.device())?.to_dtype(x.dtype())?;
            xp = Tensor::cat(&[&xp, &fill], 3)?;
        }
        let p = nn_core::ops::max_pool2d(&xp, (k, k), (2, 2), (top, left))?;
        acc = Some(match acc {
            Some(a) => (a + p)?,
            None => p,
        });
    }
    acc.expect("four pools") / 4.0
}

impl ModuleT for Downsample {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self
            .act
            .forward_t(&self.bn.forward_t(&self.conv.forward_t(x, train)?, train)?, train)?;
        multi_max_pool(&y)
    }
}

/// A BiMLP classifier.
pub struct BiMlp {
    name: String,
    stem: Conv2d,
    stem_bn: BatchNorm,
    stem_act: RPRelu,
    stages: Vec<(Option<Downsample>, Vec<BiMlpBlock>)>,
    norm: BatchNorm,
    head: Linear,
    num_features: usize,
    num_classes: usize,
}

impl BiMlp {
    pub fn new(vp: &VarPath, mc: &ModelConfig, cfg: &BiMlpConfig, f: &dyn LayerFactory) -> Result<Self> {
        let (k, s, p) = cfg.stem;
        let stem = Conv2d::new(
            &vp.pp("stem.conv"),
            Conv2dConfig::new(mc.in_channels, cfg.dims[0], k).stride(s).padding(p).bias(true),
        )?;
        let stem_bn = BatchNorm::new(&vp.pp("stem.bn"), cfg.dims[0])?;
        let stem_act = RPRelu::new(&vp.pp("stem.act"), cfg.dims[0])?;
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
            stem_act,
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
        let x = self.stem_bn.forward_t(&self.stem.forward_t(x, train)?, train)?;
        let mut x = self.stem_act.forward_t(&x, train)?;
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
        // constant negative input: every pool gives the constant (padding never wins the max)
        for s in [6usize, 7] {
            let x = (Tensor::ones((1, 1, s, s), DType::F32, &Device::Cpu)? * -5.0)?;
            let y = multi_max_pool(&x)?.flatten_all()?.to_vec1::<f32>()?;
            assert!(y.iter().all(|v| (v + 5.0).abs() < 1e-6), "{s}: {y:?}");
        }
        // "same" padding: the odd remainder goes after (bottom / right)
        assert_eq!(same_padding(8, 2), (0, 0));
        assert_eq!(same_padding(8, 3), (0, 1));
        assert_eq!(same_padding(8, 7), (2, 3));
        assert_eq!(same_padding(7, 2), (0, 1));
        assert_eq!(same_padding(7, 5), (2, 2));
        // window i of k = 3 on an even map covers 2i..2i+2: a ramp along W gives 2i+2 (the
        // last window's third position is padding)
        let x = Tensor::arange(0f32, 8.0, &Device::Cpu)?
            .reshape((1, 1, 1, 8))?
            .repeat((1, 1, 8, 1))?;
        let p3 = nn_core::ops::max_pool2d(
            &Tensor::cat(&[&x, &Tensor::full(f32::MIN, (1, 1, 8, 1), &Device::Cpu)?], 3)?,
            (1, 3),
            (1, 2),
            (0, 0),
        )?;
        assert_eq!(p3.flatten_all()?.to_vec1::<f32>()?[..4], [2.0, 4.0, 6.0, 7.0]);
        Ok(())
    }
}
