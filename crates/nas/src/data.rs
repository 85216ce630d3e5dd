//! The data of a search, held in memory: a class-balanced training subset (supernet and
//! stand-alone training), a disjoint validation subset of the training split (the cheap
//! criterion and the choice among stand-alone results), a test subset (reported accuracy), a
//! fixed probe batch (features) and a fixed calibration batch (BatchNorm recalibration).

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use nn_core::data::{self, sampling, ImageDataset, LoadOptions, Split};
use std::path::PathBuf;

/// Images `[N, C, H, W]` (normalised f32) and labels `[N]` (u32).
#[derive(Clone, Debug)]
pub struct Split2 {
    pub images: Tensor,
    pub labels: Tensor,
}

impl Split2 {
    pub fn len(&self) -> usize {
        self.labels.dims()[0]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything a search reads.
#[derive(Clone, Debug)]
pub struct NasData {
    pub dataset: String,
    /// What the subsets are (dataset, sizes, seed): stand-alone results cached for other data
    /// are never reused (see [`crate::standalone::cached`]).
    pub id: String,
    pub train: Split2,
    pub val: Split2,
    pub test: Split2,
    /// The fixed probe batch (first images of the training subset).
    pub probe: Tensor,
    /// The fixed BatchNorm calibration batch (first images of the training subset).
    pub calib: Tensor,
    pub num_classes: usize,
}

/// Sizes of the subsets.
#[derive(Clone, Debug)]
pub struct DataSizes {
    pub train: usize,
    pub val: usize,
    pub test: usize,
    pub probe: usize,
    pub calib: usize,
}

fn to_tensors(ds: &ImageDataset, mean: &[f32], std: &[f32], device: &Device) -> Result<Split2> {
    let (c, h, w) = (ds.channels, ds.height, ds.width);
    let plane = h * w;
    let v: Vec<f32> = ds
        .images
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            let ch = (i / plane) % c;
            (b as f32 / 255.0 - mean[ch]) / std[ch]
        })
        .collect();
    Ok(Split2 {
        images: Tensor::from_vec(v, (ds.len(), c, h, w), device)?,
        labels: Tensor::from_vec(ds.labels.clone(), ds.len(), device)?,
    })
}

impl NasData {
    /// Builds the subsets from in-memory training and test splits: `train + val` class-balanced
    /// images of the training split (split stratified into the two), `test` of the test split
    /// (all if larger). Normalised with the training subset's channel mean and std.
    pub fn from_datasets(
        dataset: &str,
        train: &ImageDataset,
        test: &ImageDataset,
        sizes: &DataSizes,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let k = train.num_classes;
        let pool = if sizes.train + sizes.val < train.len() {
            train.subset(&sampling::balanced_subset(&train.labels, k, sizes.train + sizes.val, seed)?)?
        } else {
            train.clone()
        };
        let frac = sizes.val as f64 / pool.len() as f64;
        let (v_idx, t_idx) = sampling::stratified_split(&pool.labels, k, frac, seed.wrapping_add(7))?;
        let (tr, va) = (pool.subset(&t_idx)?, pool.subset(&v_idx)?);
        let te = if sizes.test < test.len() {
            test.subset(&sampling::balanced_subset(&test.labels, k, sizes.test, seed.wrapping_add(1))?)?
        } else {
            test.clone()
        };
        let (mean, std) = tr.channel_mean_std();
        let std: Vec<f32> = std.iter().map(|s| s.max(1e-3)).collect();
        let train = to_tensors(&tr, &mean, &std, device)?;
        let n = train.len();
        Ok(Self {
            dataset: dataset.into(),
            id: format!("{dataset} train {} val {} test {} seed {seed}", tr.len(), va.len(), te.len()),
            probe: train.images.narrow(0, 0, sizes.probe.min(n))?,
            calib: train.images.narrow(0, 0, sizes.calib.min(n))?,
            val: to_tensors(&va, &mean, &std, device)?,
            test: to_tensors(&te, &mean, &std, device)?,
            train,
            num_classes: k,
        })
    }

    /// Loads `dataset` through nn-core's registry (`--data DIR` first) and builds the subsets.
    pub fn load(dataset: &str, data_dir: Option<PathBuf>, sizes: &DataSizes, seed: u64, device: &Device) -> Result<Self> {
        let opts = LoadOptions {
            eager: true,
            ..LoadOptions::with_data_dir(data_dir)
        };
        let train = data::load(dataset, Split::Train, &opts)
            .with_context(|| format!("loading the {dataset} training split"))?
            .into_memory()?;
        let test = data::load(dataset, Split::Test, &opts)
            .with_context(|| format!("loading the {dataset} test split"))?
            .into_memory()?;
        Self::from_datasets(dataset, &train, &test, sizes, seed, device)
    }

    /// (channels, height) of the images.
    pub fn image_shape(&self) -> (usize, usize) {
        let d = self.train.images.dims();
        (d[1], d[2])
    }
}
