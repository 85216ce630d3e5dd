//! Standard experiment plumbing shared by every crate's `cargo xtask` commands: the usual
//! data pipeline per dataset (normalisation and augmentation), class-balanced subsets, and
//! writing a run's table into `docs/results/<crate>.md`.

use crate::data::{self, transforms, DataLoader, Dataset, LoadOptions, Pipeline, Split};
use crate::models::ModelConfig;
use crate::train::TrainSummary;
use anyhow::{Context, Result};
use candle_core::Device;
use std::path::PathBuf;

/// How to load a dataset for an experiment.
#[derive(Debug, Clone)]
pub struct DataSpec {
    /// Dataset name (`mnist`, `fashion-mnist`, `usps`, `cifar10`, `cifar100`, `imagenet`).
    pub dataset: String,
    /// Explicit data directory (`--data DIR`).
    pub data_dir: Option<PathBuf>,
    pub batch_size: usize,
    /// Keep a class-balanced subset of this many training images.
    pub train_subset: Option<usize>,
    /// Keep a class-balanced subset of this many test images.
    pub test_subset: Option<usize>,
    /// Training augmentation (random crop with padding, plus horizontal flip where it makes
    /// sense); normalisation is always applied.
    pub augment: bool,
    pub seed: u64,
    pub device: Device,
}

impl DataSpec {
    pub fn new(dataset: &str, batch_size: usize, seed: u64) -> Self {
        Self {
            dataset: dataset.to_string(),
            data_dir: None,
            batch_size,
            train_subset: None,
            test_subset: None,
            augment: true,
            seed,
            device: Device::Cpu,
        }
    }
}

/// Train and test loaders and the model configuration they imply.
pub struct StandardData {
    pub train: DataLoader,
    pub test: DataLoader,
    pub model_config: ModelConfig,
    pub num_train: usize,
    pub num_test: usize,
}

/// Per-channel mean/std and whether horizontal flips are label-preserving.
fn dataset_norm(name: &str) -> Result<(Vec<f32>, Vec<f32>, bool)> {
    Ok(match name {
        "mnist" => (transforms::MNIST_MEAN.to_vec(), transforms::MNIST_STD.to_vec(), false),
        "fashion-mnist" => (
            transforms::FASHION_MNIST_MEAN.to_vec(),
            transforms::FASHION_MNIST_STD.to_vec(),
            true,
        ),
        "usps" => (transforms::USPS_MEAN.to_vec(), transforms::USPS_STD.to_vec(), false),
        "cifar10" => (transforms::CIFAR10_MEAN.to_vec(), transforms::CIFAR10_STD.to_vec(), true),
        "cifar100" => (transforms::CIFAR100_MEAN.to_vec(), transforms::CIFAR100_STD.to_vec(), true),
        "imagenet" => (transforms::IMAGENET_MEAN.to_vec(), transforms::IMAGENET_STD.to_vec(), true),
        other => anyhow::bail!(
            "unknown dataset `{other}`; valid datasets: {}",
            data::registry::datasets().iter().map(|d| d.name).collect::<Vec<_>>().join(", ")
        ),
    })
}

fn subset(ds: data::AnyDataset, n: Option<usize>, seed: u64) -> Result<std::sync::Arc<dyn Dataset>> {
    match (n, ds) {
        (Some(n), data::AnyDataset::Memory(m)) if n < m.len() => {
            let idx = data::sampling::balanced_subset(&m.labels, m.num_classes, n, seed)?;
            Ok(std::sync::Arc::new(m.subset(&idx)?))
        }
        (Some(n), data::AnyDataset::Folder(_)) => anyhow::bail!("subsets of image-folder datasets are not supported (asked for {n})"),
        (_, ds) => Ok(std::sync::Arc::new(ds)),
    }
}

/// Loads `spec.dataset` with its standard pipeline: random crop (padding 4 for 32x32 sets, 2
/// for 28x28 and smaller) and, for natural images and Fashion-MNIST, horizontal flips, then
/// normalisation with the dataset's mean and std. The test split is only normalised.
pub fn standard_data(spec: &DataSpec) -> Result<StandardData> {
    let (mean, std, flip) = dataset_norm(&spec.dataset)?;
    let opts = LoadOptions::with_data_dir(spec.data_dir.clone());
    let train = data::load(&spec.dataset, Split::Train, &opts).with_context(|| format!("loading the {} training split", spec.dataset))?;
    let test = data::load(&spec.dataset, Split::Test, &opts).with_context(|| format!("loading the {} test split", spec.dataset))?;
    let num_classes = train.num_classes();
    let (c, h, _w) = train.shape();
    let train = subset(train, spec.train_subset, spec.seed)?;
    let test = subset(test, spec.test_subset, spec.seed.wrapping_add(1))?;
    let mut aug = Pipeline::new();
    if spec.augment && spec.dataset != "imagenet" {
        aug = aug.random_crop(h, if h >= 32 { 4 } else { 2 });
        if flip {
            aug = aug.hflip(0.5);
        }
    }
    let aug = aug.normalize(&mean, &std);
    let (num_train, num_test) = (train.len(), test.len());
    let train = DataLoader::from_arc(train, spec.batch_size)
        .shuffle(true)
        .seed(spec.seed)
        .drop_last(true)
        .transform(aug)
        .prefetch(2)
        .device(spec.device.clone());
    let test = DataLoader::from_arc(test, spec.batch_size.max(256))
        .shuffle(false)
        .transform(Pipeline::new().normalize(&mean, &std))
        .prefetch(2)
        .device(spec.device.clone());
    Ok(StandardData {
        train,
        test,
        model_config: ModelConfig::new(c, num_classes, h),
        num_train,
        num_test,
    })
}

/// A markdown table row of a finished run, with the command that reproduces it.
pub fn summary_markdown(title: &str, s: &TrainSummary, notes: &str) -> String {
    let pct = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.2}"));
    let mut out = format!("## {title}\n\n");
    out += "| model | dataset | epochs | seed | test top-1 % | test top-5 % | params | MACs | train img/s | eval img/s | wall s |\n";
    out += "|---|---|---|---|---|---|---|---|---|---|---|\n";
    out += &format!(
        "| {} | {} | {}{} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.0} |\n\n",
        s.model,
        s.dataset,
        s.epochs_completed,
        if s.completed { "" } else { " (stopped early)" },
        s.seed,
        pct(s.test_top1),
        pct(s.test_top5),
        s.params,
        s.macs,
        s.train_images_per_s,
        s.eval_images_per_s,
        s.wall_s
    );
    if !s.time_to_accuracy.is_empty() {
        out += "Time to accuracy: ";
        out += &s
            .time_to_accuracy
            .iter()
            .map(|t| match t.wall_s {
                Some(w) => format!("{:.1}% at {:.0} s", t.top1, w),
                None => format!("{:.1}% not reached", t.top1),
            })
            .collect::<Vec<_>>()
            .join(", ");
        out += "\n\n";
    }
    out += &format!(
        "Optimizer {} (lr {}), schedule {:?}, batch {}, label smoothing {}.\n",
        s.optimizer, s.lr, s.schedule, s.batch_size, s.label_smoothing
    );
    if !notes.is_empty() {
        out += &format!("{notes}\n");
    }
    out += &format!("\n```\n{}\n```\n", s.command);
    out
}

/// Mean and sample standard deviation (0 for fewer than two values) of per-seed results.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len().max(1) as f64;
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
    } else {
        0.0
    };
    (m, sd)
}

/// A table cell for per-seed results: `mean +- std` (two decimals), or `mean (one seed)` when
/// there is a single value, whose spread is unknown rather than zero.
pub fn mean_std_cell(v: &[f64]) -> String {
    let (m, sd) = mean_std(v);
    if v.len() > 1 {
        format!("{m:.2} +- {sd:.2}")
    } else {
        format!("{m:.2} (one seed)")
    }
}

#[cfg(test)]
mod mean_std_tests {
    #[test]
    fn sample_std() {
        let (m, s) = super::mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(super::mean_std(&[7.0]), (7.0, 0.0));
    }

    #[test]
    fn a_single_seed_cell_has_no_std() {
        assert_eq!(super::mean_std_cell(&[1.0, 2.0, 3.0]), "2.00 +- 1.00");
        assert_eq!(super::mean_std_cell(&[66.155]), "66.16 (one seed)");
    }
}
