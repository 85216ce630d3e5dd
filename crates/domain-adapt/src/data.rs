//! Domain data: labelled images (source training, evaluation) and [`TargetImages`], the
//! label-free view of a target domain that the adaptation methods accept.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use nn_core::data::{ImageDataset, Pipeline};
use std::path::{Path, PathBuf};

/// Images of one domain with their labels, preprocessed for a model (`[N, C, S, S]` f32).
#[derive(Clone)]
pub struct LabeledImages {
    pub name: String,
    pub images: Tensor,
    pub labels: Vec<u32>,
    pub num_classes: usize,
}

/// Unlabelled target images `[N, C, H, W]` (f32, preprocessed). There is no way to attach
/// labels: the adaptation methods can only see images.
#[derive(Clone)]
pub struct TargetImages {
    images: Tensor,
}

impl TargetImages {
    /// Wraps preprocessed images `[N, C, H, W]`, `N >= 2`.
    pub fn new(images: Tensor) -> Result<Self> {
        if images.rank() != 4 || images.dims()[0] < 2 {
            bail!("target images must be [N >= 2, C, H, W], got {:?}", images.dims());
        }
        Ok(Self {
            images: images.to_dtype(candle_core::DType::F32)?,
        })
    }
    pub fn len(&self) -> usize {
        self.images.dims()[0]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn images(&self) -> &Tensor {
        &self.images
    }
    /// The images at `idx`, `[idx.len(), C, H, W]`.
    pub fn gather(&self, idx: &[usize]) -> Result<Tensor> {
        let i = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), &Device::Cpu)?;
        Ok(self.images.index_select(&i, 0)?)
    }
}

impl LabeledImages {
    /// Drops the labels: what an adaptation method may receive.
    pub fn without_labels(&self) -> Result<TargetImages> {
        TargetImages::new(self.images.clone())
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Converts a dataset to `channels x size x size` images scaled to [-1, 1]
    /// (`(x - 0.5) / 0.5`, the SHOT digit preprocessing, the same for every domain): grey images
    /// are replicated to RGB, RGB averaged to grey, and every image resized bilinearly.
    pub fn from_dataset(ds: &ImageDataset, channels: usize, size: usize) -> Result<Self> {
        if ds.is_empty() {
            bail!("{}: the dataset has no image", ds.name);
        }
        if !(channels == ds.channels || channels == 1 || ds.channels == 1) {
            bail!("{}: cannot convert {}-channel images to {channels} channels", ds.name, ds.channels);
        }
        let (h, w) = (ds.height, ds.width);
        let pipe = Pipeline::new()
            .resize(size, size)
            .normalize(&vec![0.5; channels], &vec![0.5; channels]);
        let mut rng = nn_core::rng::seeded(0);
        let mut out = Vec::with_capacity(ds.len() * channels * size * size);
        let plane = h * w;
        let mut px = vec![0u8; channels * plane];
        for i in 0..ds.len() {
            let img = ds.image(i);
            if channels == ds.channels {
                px.copy_from_slice(img);
            } else if channels == 1 {
                for p in 0..plane {
                    let s: u32 = (0..ds.channels).map(|c| img[c * plane + p] as u32).sum();
                    px[p] = (s / ds.channels as u32) as u8;
                }
            } else {
                for c in 0..channels {
                    px[c * plane..(c + 1) * plane].copy_from_slice(img);
                }
            }
            let s = pipe.run_u8(&px, (channels, h, w), &mut rng)?;
            out.extend_from_slice(&s.data);
        }
        Ok(Self {
            name: ds.name.clone(),
            images: Tensor::from_vec(out, (ds.len(), channels, size, size), &Device::Cpu)?,
            labels: ds.labels.clone(),
            num_classes: ds.num_classes,
        })
    }

    /// A class-balanced subset of `n` images (all of them when `n >= len`).
    pub fn subset(&self, n: Option<usize>, seed: u64) -> Result<Self> {
        match n {
            Some(n) if n < self.len() => {
                let idx = nn_core::data::sampling::balanced_subset(&self.labels, self.num_classes, n, seed)?;
                let t = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), &Device::Cpu)?;
                Ok(Self {
                    name: self.name.clone(),
                    images: self.images.index_select(&t, 0)?,
                    labels: idx.iter().map(|&i| self.labels[i]).collect(),
                    num_classes: self.num_classes,
                })
            }
            _ => Ok(self.clone()),
        }
    }
}

/// The image and label files of split `train` (`train-*`) or test (`t10k-*`) in an IDX folder
/// laid out like MNIST (`{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`).
pub fn idx_split_files(dir: &Path, train: bool) -> Result<(PathBuf, PathBuf)> {
    let prefix = if train { "train" } else { "t10k" };
    let find = |stem: &str| -> Result<PathBuf> {
        for name in [format!("{prefix}-{stem}-ubyte.gz"), format!("{prefix}-{stem}-ubyte")] {
            let p = dir.join(&name);
            if p.is_file() {
                return Ok(p);
            }
        }
        bail!(
            "{}: no {prefix}-{stem}-ubyte[.gz] here; an IDX target folder needs train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (optionally .gz)",
            dir.display()
        )
    };
    Ok((find("images-idx3")?, find("labels-idx1")?))
}

/// Loads a split of an IDX folder (any image size and class count).
pub fn load_idx_dir(dir: &Path, train: bool) -> Result<ImageDataset> {
    let (i, l) = idx_split_files(dir, train)?;
    let name = format!("{}/{}", dir.display(), if train { "train" } else { "test" });
    nn_core::data::idx::load_idx_images_labels_with(&i, &l, None, &name).with_context(|| format!("reading {}", i.display()))
}

/// Top-1 accuracy (percent) of `model` on labelled images, evaluated in batches.
pub fn accuracy(model: &dyn nn_core::Model, data: &LabeledImages, batch: usize) -> Result<f64> {
    let n = data.len();
    if n == 0 {
        bail!("accuracy: {} has no image", data.name);
    }
    let mut correct = 0usize;
    let mut start = 0;
    while start < n {
        let len = batch.max(1).min(n - start);
        let x = data.images.narrow(0, start, len)?;
        let pred = model.forward_t(&x, false)?.argmax(1)?.to_vec1::<u32>()?;
        correct += pred.iter().zip(&data.labels[start..start + len]).filter(|(p, l)| p == l).count();
        start += len;
    }
    Ok(100.0 * correct as f64 / n as f64)
}

/// Features (`[N, D]` row-major) and logits of all target images, in evaluation mode.
pub fn extract(model: &crate::SourceModel, target: &TargetImages, batch: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = target.len();
    let (mut f, mut l) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < n {
        let len = batch.max(1).min(n - start);
        let x = target.images().narrow(0, start, len)?;
        let feats = model.features(&x, false)?;
        l.extend(model.head(&feats)?.flatten_all()?.to_vec1::<f32>()?);
        f.extend(feats.flatten_all()?.to_vec1::<f32>()?);
        start += len;
    }
    Ok((f, l))
}
