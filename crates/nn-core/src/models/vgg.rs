//! VGG-small, the CIFAR VGG of the binary-network literature (XNOR-Net, LQ-Nets, IR-Net):
//! 2x128, pool, 2x256, pool, 2x512, pool, fc. Each conv is followed by BN and ReLU.

use crate::factory::{LayerFactory, LayerRole};
use crate::layers::{Activation, BoxedLayer, Conv2dConfig, MaxPool2d};
use crate::model::Model;
use crate::models::ModelConfig;
use crate::var_store::VarPath;
use candle_core::{Result, Tensor};
use candle_nn::ModuleT;

/// VGG-small with a width multiplier on every conv.
pub struct VggSmall {
    blocks: Vec<(BoxedLayer, BoxedLayer, BoxedLayer, bool)>,
    classifier: BoxedLayer,
    pool: MaxPool2d,
    num_features: usize,
    num_classes: usize,
}

impl VggSmall {
    pub fn new(vp: &VarPath, cfg: &ModelConfig, width_mult: f64, f: &dyn LayerFactory) -> Result<Self> {
        let w = |c: usize| ((c as f64 * width_mult).round() as usize).max(1);
        Self::with_widths(vp, cfg, [w(128), w(128), w(256), w(256), w(512), w(512)], f)
    }

    /// VGG-small with explicit output channels per conv (channel pruning builds smaller
    /// models with this).
    pub fn with_widths(vp: &VarPath, cfg: &ModelConfig, widths: [usize; 6], f: &dyn LayerFactory) -> Result<Self> {
        if widths.contains(&0) {
            candle_core::bail!("VGG-small widths must be >= 1, got {widths:?}");
        }
        let plan = [
            (widths[0], false),
            (widths[1], true),
            (widths[2], false),
            (widths[3], true),
            (widths[4], false),
            (widths[5], true),
        ];
        let mut blocks = Vec::new();
        let mut cin = cfg.in_channels;
        let mut size = cfg.image_size;
        for (i, &(cout, pool)) in plan.iter().enumerate() {
            let role = if i == 0 { LayerRole::Stem } else { LayerRole::Body };
            let conv = f.conv2d(&vp.pp(format!("features.{i}.conv")), Conv2dConfig::new(cin, cout, 3), role)?;
            let bn = f.norm(&vp.pp(format!("features.{i}.bn")), cout, role)?;
            let act = f.activation(&vp.pp(format!("features.{i}.act")), Activation::Relu, cout, role)?;
            blocks.push((conv, bn, act, pool));
            cin = cout;
            if pool {
                size /= 2;
            }
        }
        if size == 0 {
            candle_core::bail!("VGG-small needs images of at least 8x8, got {}", cfg.image_size);
        }
        let num_features = cin * size * size;
        let classifier = f.linear(&vp.pp("classifier"), num_features, cfg.num_classes, true, LayerRole::Head)?;
        Ok(Self {
            blocks,
            classifier,
            pool: MaxPool2d::new(2, 2, 0),
            num_features,
            num_classes: cfg.num_classes,
        })
    }
}

impl Model for VggSmall {
    fn name(&self) -> &str {
        "vgg-small"
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = x.clone();
        for (conv, bn, act, pool) in &self.blocks {
            x = conv.forward_t(&x, train)?;
            if *pool {
                x = self.pool.forward_t(&x, train)?;
            }
            x = act.forward_t(&bn.forward_t(&x, train)?, train)?;
        }
        x.flatten_from(1)
    }
    fn forward_head(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        self.classifier.forward_t(features, train)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn num_features(&self) -> usize {
        self.num_features
    }
}
