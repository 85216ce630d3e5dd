//! The pool of samples the simulated clients index into.
//!
//! A [`FedDataset`] holds the whole training split once, normalised to `f32`, shared by every
//! client through an `Arc`: a client owns only the indices of its samples
//! ([`crate::partition::ClientData`]), never a copy of the images.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use nn_core::data::ImageDataset;

/// Normalised images (`N x C x H x W`, `f32`) and their labels.
#[derive(Debug, Clone)]
pub struct FedDataset {
    /// Name used in messages (`mnist/train`).
    pub name: String,
    /// `N*C*H*W` values, image after image.
    pub images: Vec<f32>,
    /// One label per image, `< num_classes`.
    pub labels: Vec<u32>,
    /// `(C, H, W)` of every image.
    pub shape: (usize, usize, usize),
    /// Number of classes.
    pub num_classes: usize,
}

impl FedDataset {
    /// Builds a dataset from raw values; checks sizes and labels.
    pub fn new(
        name: impl Into<String>,
        images: Vec<f32>,
        labels: Vec<u32>,
        shape: (usize, usize, usize),
        num_classes: usize,
    ) -> Result<Self> {
        let per = shape.0 * shape.1 * shape.2;
        if images.len() != per * labels.len() {
            bail!("{} values for {} images of {:?}", images.len(), labels.len(), shape);
        }
        if let Some(l) = labels.iter().find(|&&l| l as usize >= num_classes) {
            bail!("label {l} is not below {num_classes}");
        }
        Ok(Self {
            name: name.into(),
            images,
            labels,
            shape,
            num_classes,
        })
    }

    /// Converts an nn-core in-memory dataset, scaling bytes to `[0, 1]` and normalising each
    /// channel with `mean` and `std` (no augmentation: simulated clients see fixed images).
    pub fn from_image_dataset(ds: &ImageDataset, mean: &[f32], std: &[f32]) -> Result<Self> {
        let (c, h, w) = (ds.channels, ds.height, ds.width);
        if mean.len() != c || std.len() != c {
            bail!("{}: {} channels but {} means and {} stds", ds.name, c, mean.len(), std.len());
        }
        let plane = h * w;
        let images = ds
            .images
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let ch = (i / plane) % c;
                (v as f32 / 255.0 - mean[ch]) / std[ch]
            })
            .collect();
        Self::new(ds.name.clone(), images, ds.labels.clone(), (c, h, w), ds.num_classes)
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.shape.0 * self.shape.1 * self.shape.2
    }

    /// The images at `indices` as a `[B, C, H, W]` tensor on `device`.
    pub fn batch(&self, indices: &[u32], device: &Device) -> Result<Tensor> {
        let n = self.image_len();
        let mut v = Vec::with_capacity(indices.len() * n);
        for &i in indices {
            let i = i as usize;
            if i >= self.len() {
                bail!("{}: index {i} out of range ({} images)", self.name, self.len());
            }
            v.extend_from_slice(&self.images[i * n..(i + 1) * n]);
        }
        let (c, h, w) = self.shape;
        Ok(Tensor::from_vec(v, (indices.len(), c, h, w), device)?)
    }
}
