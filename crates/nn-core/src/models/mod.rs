//! Backbones written once, built through a [`crate::LayerFactory`], and a registry by name.

pub mod blocks;
pub mod lenet;
pub mod resnet;
pub mod resnet_cifar;
pub mod vgg;

use crate::factory::LayerFactory;
use crate::model::Model;
use crate::var_store::VarPath;
use candle_core::Result;

pub use lenet::{LeNet5, ShotLeNet};
pub use resnet::{ResNet, ResNetConfig};
pub use resnet_cifar::{CifarResNet, CifarResNetConfig, Shortcut};
pub use vgg::VggSmall;

/// What every backbone needs to know about its input and output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelConfig {
    pub in_channels: usize,
    pub num_classes: usize,
    /// Height = width of the input images.
    pub image_size: usize,
}

impl ModelConfig {
    pub fn new(in_channels: usize, num_classes: usize, image_size: usize) -> Self {
        Self {
            in_channels,
            num_classes,
            image_size,
        }
    }
}

/// Names accepted by [`create_model`], with a one-line description each.
pub const MODEL_NAMES: &[(&str, &str)] = &[
    ("lenet5", "LeNet-5 (conv 6-16, fc 120-84), ReLU, max-pool"),
    (
        "lenet-shot",
        "SHOT's digit LeNet (conv 20-50, channel dropout, 800 features for 28x28)",
    ),
    (
        "lenet5-bn",
        "LeNet-5 with BatchNorm after every conv and hidden fc (AdderNet's LeNet-5-BN)",
    ),
    (
        "vgg-small",
        "VGG-small of the binary-network literature (128-128-256-256-512-512, fc)",
    ),
    (
        "resnet20",
        "CIFAR ResNet-20, shortcut option A (strided identity, zero-padded channels)",
    ),
    ("resnet32", "CIFAR ResNet-32, shortcut option A"),
    ("resnet56", "CIFAR ResNet-56, shortcut option A"),
    ("resnet20-b", "CIFAR ResNet-20, shortcut option B (1x1 conv + BN)"),
    ("resnet32-b", "CIFAR ResNet-32, shortcut option B"),
    ("resnet56-b", "CIFAR ResNet-56, shortcut option B"),
    ("resnet18", "ImageNet ResNet-18 (7x7 stem, max-pool)"),
    ("resnet34", "ImageNet ResNet-34 (7x7 stem, max-pool)"),
    ("resnet50", "ImageNet ResNet-50 (bottleneck blocks, stride on the 3x3 conv)"),
    ("resnet101", "ImageNet ResNet-101 (bottleneck blocks)"),
    ("resnet152", "ImageNet ResNet-152 (bottleneck blocks)"),
    ("resnet18-cifar", "ResNet-18 with a 3x3 stem and no max-pool, for 32x32 inputs"),
];

/// Builds the model `name` (see [`MODEL_NAMES`]) with parameters under `vp`.
pub fn create_model(name: &str, cfg: &ModelConfig, vp: &VarPath, factory: &dyn LayerFactory) -> Result<Box<dyn Model>> {
    let m: Box<dyn Model> = match name {
        "lenet5" => Box::new(LeNet5::new(vp, cfg, false, factory)?),
        "lenet5-bn" => Box::new(LeNet5::new(vp, cfg, true, factory)?),
        "lenet-shot" => Box::new(ShotLeNet::new(vp, cfg, factory)?),
        "vgg-small" => Box::new(VggSmall::new(vp, cfg, 1.0, factory)?),
        "resnet20" | "resnet32" | "resnet56" | "resnet20-b" | "resnet32-b" | "resnet56-b" => {
            let depth: usize = name[6..8].parse().expect("two digits");
            let shortcut = if name.ends_with("-b") { Shortcut::B } else { Shortcut::A };
            Box::new(CifarResNet::new(vp, cfg, &CifarResNetConfig::new(depth, shortcut), factory)?)
        }
        "resnet18" => Box::new(ResNet::new(vp, cfg, &ResNetConfig::resnet18(), factory)?),
        "resnet34" => Box::new(ResNet::new(vp, cfg, &ResNetConfig::resnet34(), factory)?),
        "resnet50" => Box::new(ResNet::new(vp, cfg, &ResNetConfig::resnet50(), factory)?),
        "resnet101" => Box::new(ResNet::new(vp, cfg, &ResNetConfig::resnet101(), factory)?),
        "resnet152" => Box::new(ResNet::new(vp, cfg, &ResNetConfig::resnet152(), factory)?),
        "resnet18-cifar" => Box::new(ResNet::new(
            vp,
            cfg,
            &ResNetConfig {
                small_input_stem: true,
                ..ResNetConfig::resnet18()
            },
            factory,
        )?),
        other => candle_core::bail!(
            "unknown model `{other}`; valid models: {}",
            MODEL_NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        ),
    };
    Ok(m)
}
