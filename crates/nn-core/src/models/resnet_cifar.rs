//! CIFAR-style ResNets (He et al. 2016, section 4.2): a 3x3 stem with 16 channels, three stages
//! of n basic blocks with 16, 32, 64 channels (depth = 6n + 2), global average pooling, a
//! linear classifier.

use crate::factory::{LayerFactory, LayerRole};
use crate::layers::{Activation, BoxedLayer, Conv2dConfig};
use crate::model::Model;
use crate::models::blocks::BasicBlock;
pub use crate::models::blocks::Shortcut;
use crate::models::ModelConfig;
use crate::var_store::VarPath;
use candle_core::{Result, Tensor};

/// Structure of a CIFAR ResNet.
#[derive(Debug, Clone, PartialEq)]
pub struct CifarResNetConfig {
    /// 6n + 2 (20, 32, 44, 56, 110).
    pub depth: usize,
    pub shortcut: Shortcut,
    /// Channels of the stem and the three stages (16, 32, 64 in the paper).
    pub widths: [usize; 3],
    /// Optional inner width of each block (after its first conv), in block order; pruning
    /// builds smaller models with this instead of copying the backbone.
    pub block_mid_widths: Option<Vec<usize>>,
}

impl CifarResNetConfig {
    pub fn new(depth: usize, shortcut: Shortcut) -> Self {
        Self {
            depth,
            shortcut,
            widths: [16, 32, 64],
            block_mid_widths: None,
        }
    }
    /// Blocks per stage.
    pub fn blocks_per_stage(&self) -> Result<usize> {
        if self.depth < 8 || (self.depth - 2) % 6 != 0 {
            candle_core::bail!("CIFAR ResNet depth must be 6n + 2 with n >= 1, got {}", self.depth);
        }
        Ok((self.depth - 2) / 6)
    }
}

/// A CIFAR-style ResNet.
pub struct CifarResNet {
    name: String,
    conv1: BoxedLayer,
    bn1: BoxedLayer,
    act1: BoxedLayer,
    stages: Vec<Vec<BasicBlock>>,
    fc: BoxedLayer,
    num_features: usize,
    num_classes: usize,
}

impl CifarResNet {
    pub fn new(vp: &VarPath, cfg: &ModelConfig, rc: &CifarResNetConfig, f: &dyn LayerFactory) -> Result<Self> {
        let n = rc.blocks_per_stage()?;
        if let Some(m) = &rc.block_mid_widths {
            if m.len() != 3 * n {
                candle_core::bail!("block_mid_widths has {} entries, the network has {} blocks", m.len(), 3 * n);
            }
        }
        let w = rc.widths;
        let conv1 = f.conv2d(&vp.pp("conv1"), Conv2dConfig::new(cfg.in_channels, w[0], 3), LayerRole::Stem)?;
        let bn1 = f.norm(&vp.pp("bn1"), w[0], LayerRole::Stem)?;
        let act1 = f.activation(&vp.pp("act1"), Activation::Relu, w[0], LayerRole::Stem)?;
        let mut stages = Vec::new();
        let mut cin = w[0];
        let mut k = 0;
        for (s, &cout) in w.iter().enumerate() {
            let mut blocks = Vec::new();
            for b in 0..n {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let mid = rc.block_mid_widths.as_ref().map_or(cout, |m| m[k]);
                blocks.push(BasicBlock::new(
                    &vp.pp(format!("layer{}.{b}", s + 1)),
                    cin,
                    mid,
                    cout,
                    stride,
                    rc.shortcut,
                    f,
                )?);
                cin = cout;
                k += 1;
            }
            stages.push(blocks);
        }
        let fc = f.linear(&vp.pp("fc"), cin, cfg.num_classes, true, LayerRole::Head)?;
        let name = format!("resnet{}{}", rc.depth, if rc.shortcut == Shortcut::B { "-b" } else { "" });
        Ok(Self {
            name,
            conv1,
            bn1,
            act1,
            stages,
            fc,
            num_features: cin,
            num_classes: cfg.num_classes,
        })
    }

    fn stem(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.bn1.forward_t(&self.conv1.forward_t(x, train)?, train)?;
        self.act1.forward_t(&y, train)
    }
}

impl Model for CifarResNet {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_stages(x, train)?.pop().expect("pooled features"))
    }
    fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        crate::models::blocks::run_stages(&self.stages, self.stem(x, train)?, train)
    }
    fn forward_head(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        self.fc.forward_t(features, train)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn num_features(&self) -> usize {
        self.num_features
    }
}
