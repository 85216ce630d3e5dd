//! ImageNet-style ResNets (He et al. 2016): 7x7/2 stem, 3x3/2 max-pool, four stages,
//! option-B projection shortcuts; basic blocks for ResNet-18/34 (stage widths 64-512) and
//! bottleneck blocks for ResNet-50/101/152 (stage widths 256-2048, inner widths a quarter).

use crate::factory::{LayerFactory, LayerRole};
use crate::layers::{Activation, BoxedLayer, Conv2dConfig, MaxPool2d};
use crate::model::Model;
use crate::models::blocks::{BasicBlock, Bottleneck, ResidualBlock, Shortcut};
use crate::models::ModelConfig;
use crate::var_store::VarPath;
use candle_core::{Result, Tensor};
use candle_nn::ModuleT;

/// Structure of an ImageNet ResNet.
#[derive(Debug, Clone, PartialEq)]
pub struct ResNetConfig {
    pub name: String,
    /// Bottleneck blocks (1x1-3x3-1x1) instead of basic blocks (3x3-3x3).
    pub bottleneck: bool,
    pub blocks: [usize; 4],
    /// Output channels of the stem conv.
    pub stem_width: usize,
    /// Output channels of each stage.
    pub widths: [usize; 4],
    /// A 3x3 stride-1 stem without max-pool, for 32x32 inputs.
    pub small_input_stem: bool,
    /// Optional inner widths in block order: one per basic block (after its first conv), two
    /// per bottleneck block (after its 1x1 and its 3x3 conv). Channel pruning builds smaller
    /// models with this; by default a basic block's inner width is its stage width and a
    /// bottleneck's is a quarter of it.
    pub block_mid_widths: Option<Vec<usize>>,
}

impl ResNetConfig {
    fn basic(name: &str, blocks: [usize; 4]) -> Self {
        Self {
            name: name.into(),
            bottleneck: false,
            blocks,
            stem_width: 64,
            widths: [64, 128, 256, 512],
            small_input_stem: false,
            block_mid_widths: None,
        }
    }
    fn bottleneck(name: &str, blocks: [usize; 4]) -> Self {
        Self {
            bottleneck: true,
            widths: [256, 512, 1024, 2048],
            ..Self::basic(name, blocks)
        }
    }
    pub fn resnet18() -> Self {
        Self::basic("resnet18", [2, 2, 2, 2])
    }
    pub fn resnet34() -> Self {
        Self::basic("resnet34", [3, 4, 6, 3])
    }
    pub fn resnet50() -> Self {
        Self::bottleneck("resnet50", [3, 4, 6, 3])
    }
    pub fn resnet101() -> Self {
        Self::bottleneck("resnet101", [3, 4, 23, 3])
    }
    pub fn resnet152() -> Self {
        Self::bottleneck("resnet152", [3, 8, 36, 3])
    }

    /// Inner widths per block (see [`ResNetConfig::block_mid_widths`]).
    pub fn inner_widths_per_block(&self) -> usize {
        if self.bottleneck {
            2
        } else {
            1
        }
    }

    /// The dense network's inner widths, in block order.
    pub fn default_mid_widths(&self) -> Vec<usize> {
        let per = self.inner_widths_per_block();
        let div = if self.bottleneck { 4 } else { 1 };
        self.blocks
            .iter()
            .zip(self.widths)
            .flat_map(|(&n, w)| std::iter::repeat(w / div).take(n * per))
            .collect()
    }
}

/// An ImageNet-style ResNet.
pub struct ResNet {
    name: String,
    conv1: BoxedLayer,
    bn1: BoxedLayer,
    act1: BoxedLayer,
    maxpool: Option<MaxPool2d>,
    stages: Vec<Vec<ResidualBlock>>,
    fc: BoxedLayer,
    num_features: usize,
    num_classes: usize,
}

impl ResNet {
    pub fn new(vp: &VarPath, cfg: &ModelConfig, rc: &ResNetConfig, f: &dyn LayerFactory) -> Result<Self> {
        let w0 = rc.stem_width;
        let per = rc.inner_widths_per_block();
        let mids = rc.block_mid_widths.clone().unwrap_or_else(|| rc.default_mid_widths());
        let total_blocks: usize = rc.blocks.iter().sum();
        if mids.len() != total_blocks * per {
            candle_core::bail!(
                "block_mid_widths has {} entries, the network has {} blocks with {per} inner width(s) each",
                mids.len(),
                total_blocks
            );
        }
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
        let mut mid = mids.chunks(per);
        for (s, (&n, &cout)) in rc.blocks.iter().zip(rc.widths.iter()).enumerate() {
            let mut blocks = Vec::new();
            for b in 0..n {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let m = mid.next().expect("length checked above");
                let bvp = vp.pp(format!("layer{}.{b}", s + 1));
                blocks.push(if rc.bottleneck {
                    ResidualBlock::Bottleneck(Bottleneck::new(&bvp, cin, m[0], m[1], cout, stride, f)?)
                } else {
                    ResidualBlock::Basic(BasicBlock::new(&bvp, cin, m[0], cout, stride, Shortcut::B, f)?)
                });
                cin = cout;
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
