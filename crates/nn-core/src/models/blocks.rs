//! Residual building blocks shared by the CIFAR and ImageNet ResNets: the two-conv basic
//! block and the 1x1-3x3-1x1 bottleneck (He et al. 2016, figure 5).

use crate::factory::{LayerFactory, LayerRole};
use crate::layers::{Activation, BoxedLayer, Conv2dConfig};
use crate::var_store::VarPath;
use candle_core::{Result, Tensor};
use candle_nn::ModuleT;

/// How a residual block matches its input to its output when shape changes
/// (He et al. 2016, section 3.3 / 4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortcut {
    /// Option A: strided identity with zero-padded extra channels (no parameters).
    A,
    /// Option B: 1x1 strided convolution + BatchNorm.
    B,
}

enum ShortcutPath {
    Identity,
    /// Keep every `stride`-th row/column, then pad `pad_before`/`pad_after` zero channels.
    Pad {
        stride: usize,
        pad_before: usize,
        pad_after: usize,
    },
    Project {
        conv: BoxedLayer,
        bn: BoxedLayer,
    },
}

/// The two-conv basic block: conv3x3(s) - norm - act - conv3x3 - norm, plus shortcut, act.
pub struct BasicBlock {
    conv1: BoxedLayer,
    bn1: BoxedLayer,
    act1: BoxedLayer,
    conv2: BoxedLayer,
    bn2: BoxedLayer,
    act2: BoxedLayer,
    shortcut: ShortcutPath,
}

impl BasicBlock {
    /// A block from `cin` to `cout` channels with `mid` channels after the first conv
    /// (`mid == cout` normally; smaller after channel pruning).
    pub fn new(vp: &VarPath, cin: usize, mid: usize, cout: usize, stride: usize, shortcut: Shortcut, f: &dyn LayerFactory) -> Result<Self> {
        let conv1 = f.conv2d(&vp.pp("conv1"), Conv2dConfig::new(cin, mid, 3).stride(stride), LayerRole::Body)?;
        let bn1 = f.norm(&vp.pp("bn1"), mid, LayerRole::Body)?;
        let act1 = f.activation(&vp.pp("act1"), Activation::Relu, mid, LayerRole::Body)?;
        let conv2 = f.conv2d(&vp.pp("conv2"), Conv2dConfig::new(mid, cout, 3), LayerRole::Body)?;
        let bn2 = f.norm(&vp.pp("bn2"), cout, LayerRole::Body)?;
        let act2 = f.activation(&vp.pp("act2"), Activation::Relu, cout, LayerRole::Body)?;
        let shortcut = ShortcutPath::new(vp, cin, cout, stride, shortcut, f)?;
        Ok(Self {
            conv1,
            bn1,
            act1,
            conv2,
            bn2,
            act2,
            shortcut,
        })
    }
}

impl ShortcutPath {
    /// Identity when shapes match, otherwise option A or B.
    fn new(vp: &VarPath, cin: usize, cout: usize, stride: usize, kind: Shortcut, f: &dyn LayerFactory) -> Result<Self> {
        if stride == 1 && cin == cout {
            return Ok(ShortcutPath::Identity);
        }
        Ok(match kind {
            Shortcut::A => {
                if cout < cin {
                    candle_core::bail!("option-A shortcut cannot reduce channels ({cin} -> {cout})");
                }
                let extra = cout - cin;
                ShortcutPath::Pad {
                    stride,
                    pad_before: extra / 2,
                    pad_after: extra - extra / 2,
                }
            }
            Shortcut::B => ShortcutPath::Project {
                conv: f.conv2d(
                    &vp.pp("shortcut.conv"),
                    Conv2dConfig::new(cin, cout, 1).stride(stride).padding(0),
                    LayerRole::Shortcut,
                )?,
                bn: f.norm(&vp.pp("shortcut.bn"), cout, LayerRole::Shortcut)?,
            },
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            ShortcutPath::Identity => Ok(x.clone()),
            ShortcutPath::Pad {
                stride,
                pad_before,
                pad_after,
            } => subsample(x, *stride)?.pad_with_zeros(1, *pad_before, *pad_after),
            ShortcutPath::Project { conv, bn } => bn.forward_t(&conv.forward_t(x, train)?, train),
        }
    }
}

/// The bottleneck block of ResNet-50/101/152: conv1x1 - norm - act - conv3x3(s) - norm - act -
/// conv1x1 - norm, plus shortcut (option B when the shape changes), act. The stride sits on the
/// 3x3 conv, as in torchvision ("ResNet v1.5").
pub struct Bottleneck {
    conv1: BoxedLayer,
    bn1: BoxedLayer,
    act1: BoxedLayer,
    conv2: BoxedLayer,
    bn2: BoxedLayer,
    act2: BoxedLayer,
    conv3: BoxedLayer,
    bn3: BoxedLayer,
    act3: BoxedLayer,
    shortcut: ShortcutPath,
}

impl Bottleneck {
    /// A block from `cin` to `cout` channels whose first two convs output `mid1` and `mid2`
    /// channels (both `cout / 4` in the dense network; smaller after channel pruning).
    pub fn new(vp: &VarPath, cin: usize, mid1: usize, mid2: usize, cout: usize, stride: usize, f: &dyn LayerFactory) -> Result<Self> {
        let body = LayerRole::Body;
        let conv1 = f.conv2d(&vp.pp("conv1"), Conv2dConfig::new(cin, mid1, 1).padding(0), body)?;
        let bn1 = f.norm(&vp.pp("bn1"), mid1, body)?;
        let act1 = f.activation(&vp.pp("act1"), Activation::Relu, mid1, body)?;
        let conv2 = f.conv2d(&vp.pp("conv2"), Conv2dConfig::new(mid1, mid2, 3).stride(stride), body)?;
        let bn2 = f.norm(&vp.pp("bn2"), mid2, body)?;
        let act2 = f.activation(&vp.pp("act2"), Activation::Relu, mid2, body)?;
        let conv3 = f.conv2d(&vp.pp("conv3"), Conv2dConfig::new(mid2, cout, 1).padding(0), body)?;
        let bn3 = f.norm(&vp.pp("bn3"), cout, body)?;
        let act3 = f.activation(&vp.pp("act3"), Activation::Relu, cout, body)?;
        let shortcut = ShortcutPath::new(vp, cin, cout, stride, Shortcut::B, f)?;
        Ok(Self {
            conv1,
            bn1,
            act1,
            conv2,
            bn2,
            act2,
            conv3,
            bn3,
            act3,
            shortcut,
        })
    }
}

impl ModuleT for Bottleneck {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self
            .act1
            .forward_t(&self.bn1.forward_t(&self.conv1.forward_t(x, train)?, train)?, train)?;
        let y = self
            .act2
            .forward_t(&self.bn2.forward_t(&self.conv2.forward_t(&y, train)?, train)?, train)?;
        let y = self.bn3.forward_t(&self.conv3.forward_t(&y, train)?, train)?;
        self.act3.forward_t(&(y + self.shortcut.forward_t(x, train)?)?, train)
    }
}

/// A residual block of either kind (what ResNet stages hold).
pub enum ResidualBlock {
    Basic(BasicBlock),
    Bottleneck(Bottleneck),
}

impl ModuleT for ResidualBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            ResidualBlock::Basic(b) => b.forward_t(x, train),
            ResidualBlock::Bottleneck(b) => b.forward_t(x, train),
        }
    }
}

/// `x[:, :, ::stride, ::stride]` (with gradients, via index_select).
pub fn subsample(x: &Tensor, stride: usize) -> Result<Tensor> {
    if stride == 1 {
        return Ok(x.clone());
    }
    let (_, _, h, w) = x.dims4()?;
    let rows: Vec<u32> = (0..h).step_by(stride).map(|i| i as u32).collect();
    let cols: Vec<u32> = (0..w).step_by(stride).map(|i| i as u32).collect();
    let r = Tensor::new(rows.as_slice(), x.device())?;
    let c = Tensor::new(cols.as_slice(), x.device())?;
    x.index_select(&r, 2)?.index_select(&c, 3)
}

impl ModuleT for BasicBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv1.forward_t(x, train)?;
        let y = self.act1.forward_t(&self.bn1.forward_t(&y, train)?, train)?;
        let y = self.bn2.forward_t(&self.conv2.forward_t(&y, train)?, train)?;
        self.act2.forward_t(&(y + self.shortcut.forward_t(x, train)?)?, train)
    }
}

/// Runs residual stages one after the other from the stem output `x`; returns each stage's
/// output followed by the globally average-pooled features (the `forward_stages` of ResNets).
pub fn run_stages<B: ModuleT>(stages: &[Vec<B>], x: Tensor, train: bool) -> Result<Vec<Tensor>> {
    let mut x = x;
    let mut outs = Vec::with_capacity(stages.len() + 1);
    for stage in stages {
        for b in stage {
            x = b.forward_t(&x, train)?;
        }
        outs.push(x.clone());
    }
    outs.push(crate::layers::GlobalAvgPool.forward_t(&x, train)?);
    Ok(outs)
}
