//! The layer factory: backbones are written once and ask a factory for their convolutions,
//! linear layers, normalisations and activations, so binary, adder, gated or pruned variants
//! swap the implementation without copying a backbone.
//!
//! Each request carries a [`LayerRole`], so a factory can, e.g., keep the stem and the
//! classifier in full precision (as binary and adder networks do).

use crate::layers::{Activation, BatchNorm, BoxedLayer, Conv2d, Conv2dConfig, Linear};
use crate::var_store::VarPath;
use candle_core::Result;

/// Where in the network a layer sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerRole {
    /// The first convolution (input image to features).
    Stem,
    /// A layer inside the body of the network.
    Body,
    /// A projection on a residual shortcut (1x1 conv, option B).
    Shortcut,
    /// A hidden fully connected layer before the classifier (LeNet, VGG).
    Hidden,
    /// The final classifier.
    Head,
}

/// Builds the layers of a backbone. Every method has a standard default.
pub trait LayerFactory: Send + Sync {
    /// A convolution.
    fn conv2d(&self, vp: &VarPath, cfg: Conv2dConfig, role: LayerRole) -> Result<BoxedLayer> {
        let _ = role;
        Ok(Box::new(Conv2d::new(vp, cfg)?))
    }

    /// A fully connected layer.
    fn linear(&self, vp: &VarPath, in_features: usize, out_features: usize, bias: bool, role: LayerRole) -> Result<BoxedLayer> {
        let _ = role;
        Ok(Box::new(Linear::new(vp, in_features, out_features, bias)?))
    }

    /// A normalisation over `channels` (BatchNorm by default), placed after a layer of `role`.
    fn norm(&self, vp: &VarPath, channels: usize, role: LayerRole) -> Result<BoxedLayer> {
        let _ = role;
        Ok(Box::new(BatchNorm::new(vp, channels)?))
    }

    /// An activation over `channels` channels after a layer of `role` (binary networks may
    /// replace it, e.g. by a learnable PReLU or by nothing).
    fn activation(&self, vp: &VarPath, act: Activation, channels: usize, role: LayerRole) -> Result<BoxedLayer> {
        let _ = (vp, channels, role);
        Ok(Box::new(act))
    }

    /// A short name of the factory, used in model names and summaries (`float`, `binary-fda`, ...).
    fn name(&self) -> &str {
        "float"
    }
}

/// Full-precision convolutions, linear layers, BatchNorm and the requested activations.
#[derive(Debug, Clone, Copy, Default)]
pub struct StandardFactory;

impl LayerFactory for StandardFactory {}
