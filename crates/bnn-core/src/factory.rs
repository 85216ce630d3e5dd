//! [`BinaryFactory`]: an nn-core [`LayerFactory`] that builds binary convolutions and linear
//! layers, so every nn-core backbone (`create_model`) comes out binary without being copied.
//!
//! Roles (as in the papers): the stem convolution and the classifier stay full precision;
//! 1x1 projection shortcuts stay full precision by default (Bi-Real Net / ReActNet practice;
//! the CIFAR ResNet-20 with option-A shortcuts has none); body convolutions and hidden fully
//! connected layers are binary.
//!
//! Activations: nn-core's blocks ask for an activation after each BatchNorm (and after the
//! residual sum). In FDA's ResNet-20 (MindSpore release, `BasicCell`) each binary conv is
//! followed by a learnable PReLU (a single slope initialised to 0.25) and then BN, nothing
//! follows the residual sum, and the stem has no activation. A ReLU before a binary layer would
//! make every binarised input +1, so this factory returns [`BodyActivation::Prelu`] (one slope
//! per channel, 0.25) in the body by default and the identity after the stem. The PReLU
//! therefore sits after BN (nn-core's block order) rather than before it, and also after the
//! residual sum; both differences are documented here rather than hidden.

use crate::binary::{BinaryControl, BinaryConv2d, BinaryLinear, BinaryOptions, FdaSchedule, PRelu};
use crate::lns::LnsRegistry;
use crate::quantizer::Quantizer;
use candle_core::Result;
use nn_core::layers::{Activation, BoxedLayer, Conv2dConfig};
use nn_core::var_store::VarPath;
use nn_core::{LayerFactory, LayerRole, StandardFactory};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What a binary factory puts in the activation slots of the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyActivation {
    /// Learnable per-channel PReLU, slope 0.25 (FDA's ResNet-20 uses a PReLU).
    Prelu,
    /// Hard tanh (BinaryNet, XNOR-Net).
    Hardtanh,
    /// Nothing.
    Identity,
    /// Whatever the backbone asked for (usually ReLU).
    AsRequested,
}

/// Configuration of a [`BinaryFactory`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BinaryConfig {
    /// Quantizer of weights and activations.
    pub quantizer: Quantizer,
    /// FDA's frequency, `n` schedule and noise weight schedule.
    pub fda: FdaSchedule,
    /// FDA's noise adaptation modules (training only).
    pub noise: bool,
    /// Hidden width ratio of the noise modules.
    pub noise_ratio: usize,
    /// Scale binary weights by the per-output-channel mean |W|.
    pub scale_weights: bool,
    /// Binarise projection shortcuts too.
    pub binarize_shortcut: bool,
    /// Binarise hidden fully connected layers (LeNet, VGG).
    pub binarize_hidden: bool,
    /// Binarise activations (false: W1A32).
    pub binarize_activations: bool,
    pub body_activation: BodyActivation,
}

impl BinaryConfig {
    pub fn new(quantizer: Quantizer) -> Self {
        Self {
            quantizer,
            fda: FdaSchedule::default(),
            noise: false,
            noise_ratio: 64,
            scale_weights: true,
            binarize_shortcut: false,
            binarize_hidden: true,
            binarize_activations: true,
            body_activation: BodyActivation::Prelu,
        }
    }
    /// FDA with the noise adaptation module.
    pub fn fda_noise() -> Self {
        Self {
            noise: true,
            ..Self::new(Quantizer::FDA)
        }
    }
    /// `ste`, `approxsign`, `fda` or `fda-noise`.
    pub fn from_method(method: &str) -> Result<Self> {
        match method {
            "fda-noise" => Ok(Self::fda_noise()),
            m => Ok(Self::new(Quantizer::parse(m).map_err(|_| {
                candle_core::Error::Msg(format!("unknown binary method `{m}`; valid: ste, approxsign, fda, fda-noise"))
            })?)),
        }
    }
    /// The method name (`ste`, `approxsign`, `fda`, `fda-noise`).
    pub fn method(&self) -> String {
        match (self.quantizer, self.noise) {
            (Quantizer::Fda { .. }, true) => "fda-noise".into(),
            (q, _) => q.name().into(),
        }
    }
}

/// Builds binary layers for the body of any nn-core backbone.
pub struct BinaryFactory {
    pub config: BinaryConfig,
    control: Arc<BinaryControl>,
    name: String,
    lns: Option<Arc<LnsRegistry>>,
}

impl BinaryFactory {
    pub fn new(config: BinaryConfig) -> Self {
        Self {
            control: BinaryControl::new(config.quantizer, config.fda),
            name: format!("binary-{}", config.method()),
            config,
            lns: None,
        }
    }

    /// Registers every binary convolution in `registry` (LNS fine-tuning).
    pub fn with_lns(mut self, registry: Arc<LnsRegistry>) -> Self {
        self.lns = Some(registry);
        self
    }

    /// The control shared by all layers built by this factory (FDA's `n`, the noise weight).
    pub fn control(&self) -> Arc<BinaryControl> {
        self.control.clone()
    }

    /// Options given to each binary layer.
    pub fn options(&self) -> BinaryOptions {
        let mut o = BinaryOptions::new(self.control.clone());
        o.noise = self.config.noise;
        o.noise_ratio = self.config.noise_ratio;
        o.scale_weights = self.config.scale_weights;
        o.binarize_input = self.config.binarize_activations;
        o
    }

    /// A binary convolution built with this factory's options (also for custom models).
    pub fn binary_conv2d(&self, vp: &VarPath, cfg: Conv2dConfig) -> Result<Arc<BinaryConv2d>> {
        let layer = Arc::new(BinaryConv2d::new(vp, cfg, self.options())?);
        if let Some(r) = &self.lns {
            r.register(vp, layer.clone())?;
        }
        Ok(layer)
    }
}

struct Shared(Arc<BinaryConv2d>);

impl candle_nn::ModuleT for Shared {
    fn forward_t(&self, x: &candle_core::Tensor, train: bool) -> Result<candle_core::Tensor> {
        self.0.forward_t(x, train)
    }
}

impl LayerFactory for BinaryFactory {
    fn conv2d(&self, vp: &VarPath, cfg: Conv2dConfig, role: LayerRole) -> Result<BoxedLayer> {
        let binary = match role {
            LayerRole::Body => true,
            LayerRole::Shortcut => self.config.binarize_shortcut,
            LayerRole::Hidden => self.config.binarize_hidden,
            LayerRole::Stem | LayerRole::Head => false,
        };
        if binary {
            Ok(Box::new(Shared(self.binary_conv2d(vp, cfg)?)))
        } else {
            StandardFactory.conv2d(vp, cfg, role)
        }
    }

    fn linear(&self, vp: &VarPath, in_features: usize, out_features: usize, bias: bool, role: LayerRole) -> Result<BoxedLayer> {
        let binary = match role {
            LayerRole::Body => true,
            LayerRole::Hidden => self.config.binarize_hidden,
            LayerRole::Shortcut => self.config.binarize_shortcut,
            LayerRole::Stem | LayerRole::Head => false,
        };
        if binary {
            Ok(Box::new(BinaryLinear::new(vp, in_features, out_features, bias, self.options())?))
        } else {
            StandardFactory.linear(vp, in_features, out_features, bias, role)
        }
    }

    fn activation(&self, vp: &VarPath, act: Activation, channels: usize, role: LayerRole) -> Result<BoxedLayer> {
        match role {
            // a ReLU here would make the first binary layer's inputs all +1
            LayerRole::Stem => Ok(Box::new(Activation::Identity)),
            LayerRole::Head => Ok(Box::new(act)),
            _ => Ok(match self.config.body_activation {
                BodyActivation::Prelu => Box::new(PRelu::new(vp, channels)?),
                BodyActivation::Hardtanh => Box::new(Activation::Hardtanh),
                BodyActivation::Identity => Box::new(Activation::Identity),
                BodyActivation::AsRequested => Box::new(act),
            }),
        }
    }

    fn name(&self) -> &str {
        &self.name
    }
}
