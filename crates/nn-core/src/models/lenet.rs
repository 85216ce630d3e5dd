//! LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling, optionally with BatchNorm
//! (the "LeNet-5-BN" of the AdderNet paper), and the wider LeNet feature extractor that SHOT
//! (Liang et al., ICML 2020) uses for its digit adaptation tasks.

use crate::factory::{LayerFactory, LayerRole};
use crate::layers::{Activation, BoxedLayer, Conv2dConfig, Dropout, MaxPool2d};
use crate::model::Model;
use crate::models::ModelConfig;
use crate::var_store::VarPath;
use candle_core::{Result, Tensor};
use candle_nn::ModuleT;

/// LeNet-5: conv5x5(6) - pool - conv5x5(16) - pool - fc120 - fc84 - fc(classes).
/// For 28x28 inputs the first convolution pads by 2 so the feature map is 5x5 as for 32x32.
pub struct LeNet5 {
    conv1: BoxedLayer,
    bn1: Option<BoxedLayer>,
    act1: BoxedLayer,
    conv2: BoxedLayer,
    bn2: Option<BoxedLayer>,
    act2: BoxedLayer,
    fc1: BoxedLayer,
    bn3: Option<BoxedLayer>,
    act3: BoxedLayer,
    fc2: BoxedLayer,
    bn4: Option<BoxedLayer>,
    act4: BoxedLayer,
    fc3: BoxedLayer,
    pool: MaxPool2d,
    num_classes: usize,
}

impl LeNet5 {
    pub fn new(vp: &VarPath, cfg: &ModelConfig, batch_norm: bool, f: &dyn LayerFactory) -> Result<Self> {
        let pad = if cfg.image_size < 32 {
            (32usize.saturating_sub(cfg.image_size) + 1) / 2
        } else {
            0
        };
        let c1 = Conv2dConfig::new(cfg.in_channels, 6, 5).padding(pad).bias(!batch_norm);
        let (h1, _) = c1.output_hw(cfg.image_size, cfg.image_size);
        let c2 = Conv2dConfig::new(6, 16, 5).padding(0).bias(!batch_norm);
        let (h2, _) = c2.output_hw(h1 / 2, h1 / 2);
        let s = h2 / 2;
        if s == 0 {
            candle_core::bail!("LeNet-5 needs images of at least 16x16, got {}", cfg.image_size);
        }
        let flat = 16 * s * s;
        let bn = |name: &str, c: usize, role| -> Result<Option<BoxedLayer>> {
            if batch_norm {
                Ok(Some(f.norm(&vp.pp(name), c, role)?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            conv1: f.conv2d(&vp.pp("conv1"), c1, LayerRole::Stem)?,
            bn1: bn("bn1", 6, LayerRole::Stem)?,
            act1: f.activation(&vp.pp("act1"), Activation::Relu, 6, LayerRole::Stem)?,
            conv2: f.conv2d(&vp.pp("conv2"), c2, LayerRole::Body)?,
            bn2: bn("bn2", 16, LayerRole::Body)?,
            act2: f.activation(&vp.pp("act2"), Activation::Relu, 16, LayerRole::Body)?,
            fc1: f.linear(&vp.pp("fc1"), flat, 120, !batch_norm, LayerRole::Hidden)?,
            bn3: bn("bn3", 120, LayerRole::Hidden)?,
            act3: f.activation(&vp.pp("act3"), Activation::Relu, 120, LayerRole::Hidden)?,
            fc2: f.linear(&vp.pp("fc2"), 120, 84, !batch_norm, LayerRole::Hidden)?,
            bn4: bn("bn4", 84, LayerRole::Hidden)?,
            act4: f.activation(&vp.pp("act4"), Activation::Relu, 84, LayerRole::Hidden)?,
            fc3: f.linear(&vp.pp("fc3"), 84, cfg.num_classes, true, LayerRole::Head)?,
            pool: MaxPool2d::new(2, 2, 0),
            num_classes: cfg.num_classes,
        })
    }
}

fn maybe(l: &Option<BoxedLayer>, x: Tensor, train: bool) -> Result<Tensor> {
    match l {
        Some(l) => l.forward_t(&x, train),
        None => Ok(x),
    }
}

impl Model for LeNet5 {
    fn name(&self) -> &str {
        "lenet5"
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.conv1.forward_t(x, train)?;
        let x = self.act1.forward_t(&maybe(&self.bn1, x, train)?, train)?;
        let x = self.pool.forward_t(&x, train)?;
        let x = self.conv2.forward_t(&x, train)?;
        let x = self.act2.forward_t(&maybe(&self.bn2, x, train)?, train)?;
        let x = self.pool.forward_t(&x, train)?.flatten_from(1)?;
        let x = self.fc1.forward_t(&x, train)?;
        let x = self.act3.forward_t(&maybe(&self.bn3, x, train)?, train)?;
        let x = self.fc2.forward_t(&x, train)?;
        self.act4.forward_t(&maybe(&self.bn4, x, train)?, train)
    }
    fn forward_head(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        self.fc3.forward_t(features, train)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn num_features(&self) -> usize {
        84
    }
}

/// SHOT's digit backbone (`LeNetBase` in its code): conv5x5(20) - max-pool - ReLU - conv5x5(50) -
/// channel dropout 0.5 - max-pool - ReLU - flatten (800 features for 28x28 inputs), then a linear
/// classifier. No padding: a 28x28 image gives 24 -> 12 -> 8 -> 4.
pub struct ShotLeNet {
    conv1: BoxedLayer,
    act1: BoxedLayer,
    conv2: BoxedLayer,
    drop: Dropout,
    act2: BoxedLayer,
    fc: BoxedLayer,
    pool: MaxPool2d,
    num_features: usize,
    num_classes: usize,
}

impl ShotLeNet {
    pub fn new(vp: &VarPath, cfg: &ModelConfig, f: &dyn LayerFactory) -> Result<Self> {
        // 16 -> 12 -> 6 -> 2 -> 1 is the smallest input that leaves a feature map
        if cfg.image_size < 16 {
            candle_core::bail!("the SHOT LeNet needs images of at least 16x16, got {}", cfg.image_size);
        }
        let c1 = Conv2dConfig::new(cfg.in_channels, 20, 5).padding(0).bias(true);
        let (h1, _) = c1.output_hw(cfg.image_size, cfg.image_size);
        let c2 = Conv2dConfig::new(20, 50, 5).padding(0).bias(true);
        let (h2, _) = c2.output_hw(h1 / 2, h1 / 2);
        let s = h2 / 2;
        let num_features = 50 * s * s;
        Ok(Self {
            conv1: f.conv2d(&vp.pp("conv1"), c1, LayerRole::Stem)?,
            act1: f.activation(&vp.pp("act1"), Activation::Relu, 20, LayerRole::Stem)?,
            conv2: f.conv2d(&vp.pp("conv2"), c2, LayerRole::Body)?,
            drop: Dropout::channels(&vp.pp("drop"), 0.5)?,
            act2: f.activation(&vp.pp("act2"), Activation::Relu, 50, LayerRole::Body)?,
            fc: f.linear(&vp.pp("fc"), num_features, cfg.num_classes, true, LayerRole::Head)?,
            pool: MaxPool2d::new(2, 2, 0),
            num_features,
            num_classes: cfg.num_classes,
        })
    }
}

impl Model for ShotLeNet {
    fn name(&self) -> &str {
        "lenet-shot"
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.conv1.forward_t(x, train)?;
        let x = self.act1.forward_t(&self.pool.forward_t(&x, train)?, train)?;
        let x = self.drop.forward_t(&self.conv2.forward_t(&x, train)?, train)?;
        let x = self.act2.forward_t(&self.pool.forward_t(&x, train)?, train)?;
        x.flatten_from(1)
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
