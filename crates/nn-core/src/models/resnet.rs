//! ImageNet-style ResNets with basic blocks (ResNet-18/34, He et al. 2016): 7x7/2 stem,
//! 3x3/2 max-pool, four stages (64, 128, 256, 512), option-B projection shortcuts.

use crate::factory::{LayerFactory, LayerRole};
use crate::layers::{Activation, BoxedLayer, Conv2dConfig, MaxPool2d};
use crate::model::Model;
use crate::models::blocks::{BasicBlock, Shortcut};
use crate::models::ModelConfig;
use crate::var_store::VarPath;
use candle_core::{Result, Tensor};
use candle_nn::ModuleT;

/// Structure of an ImageNet ResNet with basic blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct ResNetConfig {
    pub name: String,
    pub blocks: [usize; 4],
    pub widths: [usize; 4],
    /// A 3x3 stride-1 stem without max-pool, for 32x32 inputs.
    pub small_input_stem: bool,
    /// Optional inner width of each block (after its first conv), in block order; channel
    /// pruning builds smaller models with this.
    pub block_mid_widths: Option<Vec<usize>>,
}

impl ResNetConfig {
    pub fn resnet18() -> Self {
        Self {
            name: "resnet18".into(),
            blocks: [2, 2, 2, 2],
            widths: [64, 128, 256, 512],
            small_input_stem: false,
            block_mid_widths: None,
        }
    }
    pub fn resnet34() -> Self {
        Self {
            name: "resnet34".into(),
            blocks: [3, 4, 6, 3],
            widths: [64, 128, 256, 512],
            small_input_stem: false,
            block_mid_widths: None,
        }
    }
}

/// An ImageNet-style ResNet.
pub struct ResNet {
    name: String,
    conv1: BoxedLayer,
    bn1: BoxedLayer,
    act1: BoxedLayer,
    maxpool: Option<MaxPool2d>,
    stages: Vec<Vec<BasicBlock>>,
    fc: BoxedLayer,
    num_features: usize,
    num_classes: usize,
}

impl ResNet {
    pub fn new(vp: &VarPath, cfg: &ModelConfig, rc: &ResNetConfig, f: &dyn LayerFactory) -> Result<Self> {
        let w0 = rc.widths[0];
        let total_blocks: usize = rc.blocks.iter().sum();
        if let Some(m) = &rc.block_mid_widths {
            if m.len() != total_blocks {
                candle_core::bail!("block_mid_widths has {} entries, the network has {} blocks", m.len(), total_blocks);
            }
        }
        let mut k = 0;
        let stem = if rc.small_input_stem {
            Conv2dConfig::new(cfg.in_channels, w0, 3)
        } else {
            Conv2dConfig::new(cfg.in_channels, w0, 7).stride(2).padding(3)
        };
        let conv1 = f.conv2d(&vp.pp("conv1"), stem, LayerRole::Stem)?;
        let bn1 = f.norm(&vp.pp("bn1"), w0, LayerRole::Stem)?;
        let act1 = f.activation(&vp.pp("act1"), Activation::Relu, w0, LayerRole::Stem)?;
        let maxpool = (!rc.small_input_stem).then(|| MaxPool2d::new(3, 2, 1));
        let mut stages = Vec::new();
        let mut cin = w0;
        for (s, (&n, &cout)) in rc.blocks.iter().zip(rc.widths.iter()).enumerate() {
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
                    Shortcut::B,
                    f,
                )?);
                cin = cout;
                k += 1;
            }
            stages.push(blocks);
        }
        let fc = f.linear(&vp.pp("fc"), cin, cfg.num_classes, true, LayerRole::Head)?;
        let name = if rc.small_input_stem {
            format!("{}-cifar", rc.name)
        } else {
            rc.name.clone()
        };
        Ok(Self {
            name,
            conv1,
            bn1,
            act1,
            maxpool,
            stages,
            fc,
            num_features: cin,
            num_classes: cfg.num_classes,
        })
    }
}

impl Model for ResNet {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_stages(x, train)?.pop().expect("pooled features"))
    }
    fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut x = self
            .act1
            .forward_t(&self.bn1.forward_t(&self.conv1.forward_t(x, train)?, train)?, train)?;
        if let Some(p) = &self.maxpool {
            x = p.forward_t(&x, train)?;
        }
        crate::models::blocks::run_stages(&self.stages, x, train)
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
