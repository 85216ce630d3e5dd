//! ResNet-50/101 (He et al. 2016, bottleneck blocks; torchvision's layout with the stride on
//! the 3x3 convolution), the backbones of the Office-31 / Office-Home / VisDA protocols. nn-core
//! ships basic-block ResNets only; these are built from nn-core layers through its
//! [`LayerFactory`], so they live here without touching nn-core.

use candle_core::{ModuleT, Result, Tensor};
use nn_core::layers::{Activation, BoxedLayer, Conv2dConfig, GlobalAvgPool, MaxPool2d};
use nn_core::models::ModelConfig;
use nn_core::{LayerFactory, LayerRole, Model, VarPath};

/// 1x1 reduce - 3x3 (stride) - 1x1 expand (x4), each with BN, plus a projection shortcut when
/// the shape changes.
struct Bottleneck {
    convs: [BoxedLayer; 3],
    bns: [BoxedLayer; 3],
    acts: [BoxedLayer; 3],
    shortcut: Option<(BoxedLayer, BoxedLayer)>,
}

impl Bottleneck {
    fn new(vp: &VarPath, cin: usize, width: usize, stride: usize, f: &dyn LayerFactory) -> Result<Self> {
        let cout = width * 4;
        let c = |name: &str, cfg: Conv2dConfig| f.conv2d(&vp.pp(name), cfg, LayerRole::Body);
        let n = |name: &str, ch: usize| f.norm(&vp.pp(name), ch, LayerRole::Body);
        let a = |name: &str, ch: usize| f.activation(&vp.pp(name), Activation::Relu, ch, LayerRole::Body);
        let shortcut = if stride != 1 || cin != cout {
            Some((
                f.conv2d(
                    &vp.pp("downsample.conv"),
                    Conv2dConfig::new(cin, cout, 1).stride(stride).padding(0).bias(false),
                    LayerRole::Shortcut,
                )?,
                f.norm(&vp.pp("downsample.bn"), cout, LayerRole::Shortcut)?,
            ))
        } else {
            None
        };
        Ok(Self {
            convs: [
                c("conv1", Conv2dConfig::new(cin, width, 1).padding(0).bias(false))?,
                c("conv2", Conv2dConfig::new(width, width, 3).stride(stride).padding(1).bias(false))?,
                c("conv3", Conv2dConfig::new(width, cout, 1).padding(0).bias(false))?,
            ],
            bns: [n("bn1", width)?, n("bn2", width)?, n("bn3", cout)?],
            acts: [a("act1", width)?, a("act2", width)?, a("act3", cout)?],
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.clone();
        for i in 0..3 {
            y = self.bns[i].forward_t(&self.convs[i].forward_t(&y, train)?, train)?;
            if i < 2 {
                y = self.acts[i].forward_t(&y, train)?;
            }
        }
        let s = match &self.shortcut {
            Some((conv, bn)) => bn.forward_t(&conv.forward_t(x, train)?, train)?,
            None => x.clone(),
        };
        self.acts[2].forward_t(&(y + s)?, train)
    }
}

/// ResNet-50 (`[3, 4, 6, 3]` blocks) or ResNet-101 (`[3, 4, 23, 3]`), 2048 pooled features.
pub struct BottleneckResNet {
    name: String,
    stem: (BoxedLayer, BoxedLayer, BoxedLayer),
    pool: MaxPool2d,
    stages: Vec<Vec<Bottleneck>>,
    fc: BoxedLayer,
    num_classes: usize,
}

impl BottleneckResNet {
    /// `name` is `resnet50` or `resnet101`.
    pub fn new(name: &str, vp: &VarPath, cfg: &ModelConfig, f: &dyn LayerFactory) -> Result<Self> {
        let blocks: [usize; 4] = match name {
            "resnet50" => [3, 4, 6, 3],
            "resnet101" => [3, 4, 23, 3],
            o => candle_core::bail!("unknown bottleneck ResNet `{o}` (resnet50, resnet101)"),
        };
        let stem = (
            f.conv2d(
                &vp.pp("conv1"),
                Conv2dConfig::new(cfg.in_channels, 64, 7).stride(2).padding(3).bias(false),
                LayerRole::Stem,
            )?,
            f.norm(&vp.pp("bn1"), 64, LayerRole::Stem)?,
            f.activation(&vp.pp("act1"), Activation::Relu, 64, LayerRole::Stem)?,
        );
        let mut cin = 64;
        let mut stages = Vec::new();
        for (s, &n) in blocks.iter().enumerate() {
            let width = 64 << s;
            let mut stage = Vec::new();
            for b in 0..n {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                stage.push(Bottleneck::new(&vp.pp(format!("layer{}.{b}", s + 1)), cin, width, stride, f)?);
                cin = width * 4;
            }
            stages.push(stage);
        }
        Ok(Self {
            name: name.to_string(),
            stem,
            pool: MaxPool2d::new(3, 2, 1),
            stages,
            fc: f.linear(&vp.pp("fc"), cin, cfg.num_classes, true, LayerRole::Head)?,
            num_classes: cfg.num_classes,
        })
    }
}

impl Model for BottleneckResNet {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (c, b, a) = &self.stem;
        let mut x = a.forward_t(&b.forward_t(&c.forward_t(x, train)?, train)?, train)?;
        x = self.pool.forward_t(&x, train)?;
        for stage in &self.stages {
            for blk in stage {
                x = blk.forward(&x, train)?;
            }
        }
        GlobalAvgPool.forward_t(&x, train)
    }
    fn forward_head(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        self.fc.forward_t(features, train)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn num_features(&self) -> usize {
        2048
    }
}
