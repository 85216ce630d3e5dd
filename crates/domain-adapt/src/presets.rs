//! Presets for the paper's object-recognition protocols on class-folder data
//! (`<domains_dir>/<domain>/<class>/<image>.{jpg,png}`):
//!
//! | preset | backbone | classes | domains |
//! |---|---|---|---|
//! | `office31` | ResNet-50 | 31 | amazon, dslr, webcam |
//! | `office-home` | ResNet-50 | 65 | Art, Clipart, Product, Real_World |
//! | `visda` | ResNet-101 | 12 | train (synthetic), validation (real) |
//!
//! Images: shorter side 256, centre crop 224, bottleneck 256. Source training and SHOT-IM
//! follow SHOT's settings (SGD lr 0.01, momentum 0.9, batch 64, label smoothing 0.1, SHOT's
//! decay); clustering and class-aware sampling follow CAN (`D_0` 0.05, `N_0` 3, classes and
//! samples per step as in CAN's Office-31 / VisDA configurations). These values were not
//! checked against an SFDA-DE release, and the papers start from ImageNet-pretrained
//! backbones, which this workspace does not have: the presets define the protocol and run on
//! any folder, but no result of them is claimed.

use crate::data::LabeledImages;
use crate::{EstimatorConfig, KMeansConfig, ModelSpec, SfdaDeConfig, ShotImConfig, SourceTrainConfig};
use anyhow::{bail, Context, Result};
use nn_core::data::{ImageFolderDataset, ImageFolderOptions};
use std::path::Path;

/// A protocol: model, domains and the three phases' settings.
#[derive(Debug, Clone)]
pub struct Preset {
    pub name: &'static str,
    pub spec: ModelSpec,
    pub domains: &'static [&'static str],
    /// Shorter side before the centre crop of `spec.image_size`.
    pub resize_shorter: usize,
    pub source: SourceTrainConfig,
    pub shot: ShotImConfig,
    pub sfda: SfdaDeConfig,
}

/// Names accepted by [`preset`].
pub const PRESETS: &[&str] = &["office31", "office-home", "visda"];

/// The preset `name` (see [`PRESETS`]).
pub fn preset(name: &str) -> Result<Preset> {
    let (arch, classes, domains, src_epochs, shot_epochs, classes_per_step, samples_per_class): (
        _,
        _,
        &'static [&'static str],
        _,
        _,
        _,
        _,
    ) = match name {
        "office31" => ("resnet50", 31, &["amazon", "dslr", "webcam"], 100, 15, 3, 10),
        "office-home" => ("resnet50", 65, &["Art", "Clipart", "Product", "Real_World"], 50, 15, 3, 10),
        "visda" => ("resnet101", 12, &["train", "validation"], 10, 2, 12, 3),
        o => bail!("unknown preset `{o}`; valid presets: {}", PRESETS.join(", ")),
    };
    Ok(Preset {
        name: PRESETS.iter().find(|p| **p == name).expect("listed"),
        spec: ModelSpec {
            arch: arch.into(),
            in_channels: 3,
            image_size: 224,
            num_classes: classes,
            bottleneck_dim: 256,
            classifier: crate::model::ClassifierKind::Linear,
        },
        domains,
        resize_shorter: 256,
        source: SourceTrainConfig {
            epochs: src_epochs,
            ..Default::default()
        },
        shot: ShotImConfig {
            epochs: shot_epochs,
            ..Default::default()
        },
        sfda: SfdaDeConfig {
            loops: 50,
            steps_per_loop: 20,
            classes_per_step,
            samples_per_class,
            lr: 0.001,
            kmeans: KMeansConfig::default(),
            estimator: EstimatorConfig::default(),
            ..Default::default()
        },
    })
}

impl Preset {
    /// Loads `domains_dir/domain` (class folders) at the preset's image size, checking that it
    /// has the preset's number of classes. `max_per_class` keeps the first files of each class.
    pub fn load_domain(&self, domains_dir: &Path, domain: &str, max_per_class: Option<usize>) -> Result<LabeledImages> {
        if !self.domains.contains(&domain) {
            bail!(
                "preset {}: unknown domain `{domain}`; its domains are {}",
                self.name,
                self.domains.join(", ")
            );
        }
        let dir = domains_dir.join(domain);
        let opts = ImageFolderOptions {
            resize_shorter: self.resize_shorter.max(self.spec.image_size),
            crop: self.spec.image_size,
            random_crop: false,
            max_per_class,
        };
        let folder = ImageFolderDataset::open(&dir, opts).with_context(|| format!("preset {}: opening {}", self.name, dir.display()))?;
        if folder.class_names().len() != self.spec.num_classes {
            bail!(
                "preset {}: {} has {} class folders, the protocol has {}",
                self.name,
                dir.display(),
                folder.class_names().len(),
                self.spec.num_classes
            );
        }
        let ds = folder.to_memory()?;
        LabeledImages::from_dataset(&ds, self.spec.in_channels, self.spec.image_size)
    }

    /// The preset scaled down for a smoke run on tiny folders: images of `image_size`, one
    /// optimisation step per phase, every clustered sample kept.
    pub fn smoke(mut self, image_size: usize, batch_size: usize) -> Self {
        self.spec.image_size = image_size;
        self.resize_shorter = image_size;
        self.source.batch_size = batch_size;
        self.source.max_steps = Some(1);
        self.shot.batch_size = batch_size;
        self.shot.max_steps = Some(1);
        self.sfda.loops = 1;
        self.sfda.steps_per_loop = 1;
        self.sfda.classes_per_step = 4;
        self.sfda.samples_per_class = 2;
        self.sfda.kmeans.distance_threshold = 1.0;
        self.sfda.kmeans.min_class_size = 1;
        self
    }
}
