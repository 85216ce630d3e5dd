//! Named search setups: a space and the dataset it is meant for.

use crate::space::SearchSpace;
use anyhow::{bail, Result};

/// A named search setup.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub name: &'static str,
    pub dataset: &'static str,
    pub description: &'static str,
}

/// Every preset.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "cifar10-small",
        dataset: "cifar10",
        description: "32x32 RGB, 8 searchable layers (16-32-64 channels), conv 3/5/7, IR e1/e3/e6 x k3/k5, skip, widths 0.5/0.75/1",
    },
    Preset {
        name: "cifar10-fast",
        dataset: "cifar10",
        description:
            "cifar10-small with a stride-2 stem (16x16 feature maps from the start): a quarter of the cost, for CPU-budget studies",
    },
    Preset {
        name: "mnist-small",
        dataset: "mnist",
        description: "28x28 grey, the same 8-layer space as cifar10-small",
    },
    Preset {
        name: "imagenet-mbv2",
        dataset: "imagenet",
        description: "224x224, the MobileNetV2 space of ProxylessNAS/DC-NAS: 21 slots, IR e3/e6 x k3/k5/k7 or skip, head 1280",
    },
];

/// The preset `name`.
pub fn preset(name: &str) -> Result<Preset> {
    match PRESETS.iter().find(|p| p.name == name) {
        Some(p) => Ok(*p),
        None => bail!(
            "unknown preset `{name}`; valid presets: {}",
            PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The search space of preset `name` for `num_classes` classes (and `image_size` for the
/// small spaces, which accept 28 or 32).
pub fn space(name: &str, num_classes: usize) -> Result<SearchSpace> {
    Ok(match preset(name)?.name {
        "cifar10-small" => SearchSpace::small("cifar-small", 3, 32, num_classes),
        "cifar10-fast" => SearchSpace::small_with("cifar-fast", 3, 32, num_classes, 2, [16, 32, 64]),
        "mnist-small" => SearchSpace::small("mnist-small", 1, 28, num_classes),
        "imagenet-mbv2" => SearchSpace::imagenet_mbv2(num_classes),
        _ => unreachable!("listed presets"),
    })
}
