//! [`AdderFactory`]: an nn-core [`LayerFactory`] whose body convolutions (and, by default, 1x1
//! projection shortcuts and hidden fully connected layers) are adder layers, so
//! `nn_core::models::create_model("resnet20-b", .., &factory)` is the AdderNet ResNet-20 and
//! `lenet5-bn` the AdderNet LeNet-5-BN. As in the paper, the first convolution and the classifier
//! stay full precision; BatchNorm follows every adder layer (the backbones already put one there).

use crate::layer::{AdderConv2d, AdderLinear, AdderRegistry};
use candle_core::Result;
use nn_core::layers::{BoxedLayer, Conv2dConfig};
use nn_core::var_store::VarPath;
use nn_core::{LayerFactory, LayerRole, StandardFactory};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Which layers of a backbone become adder layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdderConfig {
    /// 1x1 projection shortcuts (ResNet option B) are adder layers (the paper's ResNet-20).
    pub adder_shortcut: bool,
    /// Hidden fully connected layers (LeNet-5's fc1, fc2) are adder layers.
    pub adder_hidden: bool,
}

impl Default for AdderConfig {
    fn default() -> Self {
        Self {
            adder_shortcut: true,
            adder_hidden: true,
        }
    }
}

/// Builds adder layers for the body of any nn-core backbone and records their filters.
pub struct AdderFactory {
    pub config: AdderConfig,
    registry: Arc<AdderRegistry>,
}

impl Default for AdderFactory {
    fn default() -> Self {
        Self::new(AdderConfig::default())
    }
}

impl AdderFactory {
    pub fn new(config: AdderConfig) -> Self {
        Self {
            config,
            registry: AdderRegistry::new(),
        }
    }
    /// Every adder filter built so far (for [`crate::AdaptiveLr`]).
    pub fn registry(&self) -> Arc<AdderRegistry> {
        self.registry.clone()
    }
    fn is_adder(&self, role: LayerRole) -> bool {
        match role {
            LayerRole::Body => true,
            LayerRole::Shortcut => self.config.adder_shortcut,
            LayerRole::Hidden => self.config.adder_hidden,
            LayerRole::Stem | LayerRole::Head => false,
        }
    }
}

impl LayerFactory for AdderFactory {
    fn conv2d(&self, vp: &VarPath, cfg: Conv2dConfig, role: LayerRole) -> Result<BoxedLayer> {
        if self.is_adder(role) {
            Ok(Box::new(AdderConv2d::new(vp, cfg, Some(&self.registry))?))
        } else {
            StandardFactory.conv2d(vp, cfg, role)
        }
    }
    fn linear(&self, vp: &VarPath, in_features: usize, out_features: usize, bias: bool, role: LayerRole) -> Result<BoxedLayer> {
        if self.is_adder(role) {
            Ok(Box::new(AdderLinear::new(
                vp,
                in_features,
                out_features,
                bias,
                Some(&self.registry),
            )?))
        } else {
            StandardFactory.linear(vp, in_features, out_features, bias, role)
        }
    }
    fn name(&self) -> &str {
        "adder"
    }
}
