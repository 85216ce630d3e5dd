//! Datasets, loaders and augmentations for compact vision experiments.
//!
//! # Layout
//!
//! * [`idx`]: reader for IDX files (MNIST, Fashion-MNIST, USPS), raw or gzip-compressed,
//!   every IDX element type.
//! * [`cifar`]: CIFAR-10 and CIFAR-100 readers for the official binary layout.
//! * [`image_folder`]: ImageNet-style `split/<class>/<image>` folders, decoded lazily per
//!   sample or eagerly into memory.
//! * [`ImageDataset`]: the in-memory dataset (u8 CHW images + u32 labels) every reader
//!   produces, and the [`Dataset`] trait shared with the lazy folder dataset.
//! * [`transforms`]: per-sample augmentation pipeline (random crop with padding, flip,
//!   resize, normalisation) on f32 CHW buffers.
//! * [`loader`]: [`DataLoader`], seeded per-epoch shuffling, resumable at any
//!   (epoch, batch), background prefetch, deterministic augmentation.
//! * [`sampling`]: class subsets, per-class sampling, balanced subsets, stratified splits.
//! * [`registry`]: named datasets, search paths, checksum manifest and status report.
//!
//! # Why each dependency is used
//!
//! * `flate2`: decompress gzip IDX files (`*.gz`, detected by the 1f 8b magic bytes).
//! * `sha2`: sha256 checksums of the known files in the [`registry`] manifest.
//! * `image`: decode JPEG/PNG files of image-folder datasets and resize them.
//! * `rand_chacha`: a portable, seedable generator ([`rand_chacha::ChaCha8Rng`]) so that
//!   shuffles and augmentations are identical across machines, runs and resumptions.
//! * `rayon`: parallel decoding of image-folder samples within a batch.
//! * `thiserror`: the [`DataError`] enum; every error names the file and what is wrong.
//! * `candle-core`: batches are returned as [`candle_core::Tensor`]s on the requested device.
//!
//! No code path accesses the network.

#![warn(missing_docs)]

pub mod cifar;
pub mod error;
pub mod idx;
pub mod image_folder;
pub mod loader;
pub mod registry;
pub mod sampling;
pub mod transforms;

#[cfg(test)]
mod test_util;

use rand::RngCore;

pub use error::{DataError, Result};
pub use image_folder::{ImageFolderDataset, ImageFolderOptions};
pub use loader::{Batch, DataLoader, HostBatch};

pub use registry::{load, load_in_memory, report, report_table, AnyDataset, DatasetStatus, LoadOptions, Split};
pub use transforms::{Pipeline, Transform};

/// A source of labelled images that a [`DataLoader`] can batch.
///
/// Samples are CHW `u8` images of a fixed [`shape`](Dataset::shape). Implementations must be
/// cheap to share between threads; [`read_into`](Dataset::read_into) is called from the
/// loader's worker thread(s).
pub trait Dataset: Send + Sync {
    /// Short name used in messages (e.g. `mnist/train`).
    fn name(&self) -> &str;
    /// Number of samples.
    fn len(&self) -> usize;
    /// `true` when the dataset holds no sample.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `(channels, height, width)` of every sample produced by [`read_into`](Dataset::read_into).
    fn shape(&self) -> (usize, usize, usize);
    /// Number of classes; every label is `< num_classes()`.
    fn num_classes(&self) -> usize;
    /// Label of sample `i` without decoding its image.
    fn label(&self, i: usize) -> Result<u32>;
    /// Writes sample `i` (CHW, `u8`) into `out`, whose length must be `C*H*W`, and returns
    /// its label. `rng` drives decode-time randomness (e.g. the random crop of a lazily
    /// decoded image folder); in-memory datasets ignore it.
    fn read_into(&self, i: usize, rng: &mut dyn RngCore, out: &mut [u8]) -> Result<u32>;
    /// Allocating convenience wrapper around [`read_into`](Dataset::read_into).
    fn get(&self, i: usize, rng: &mut dyn RngCore) -> Result<(Vec<u8>, u32)> {
        let (c, h, w) = self.shape();
        let mut out = vec![0u8; c * h * w];
        let label = self.read_into(i, rng, &mut out)?;
        Ok((out, label))
    }
    /// `true` when reading a sample is expensive (file decode); the loader then decodes the
    /// samples of a batch in parallel.
    fn is_lazy(&self) -> bool {
        false
    }
}

impl<T: Dataset + ?Sized> Dataset for std::sync::Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        (**self).shape()
    }
    fn num_classes(&self) -> usize {
        (**self).num_classes()
    }
    fn label(&self, i: usize) -> Result<u32> {
        (**self).label(i)
    }
    fn read_into(&self, i: usize, rng: &mut dyn RngCore, out: &mut [u8]) -> Result<u32> {
        (**self).read_into(i, rng, out)
    }
    fn is_lazy(&self) -> bool {
        (**self).is_lazy()
    }
}

/// An in-memory labelled image dataset: `N` images of `C x H x W` bytes stored contiguously
/// (CHW per image) and one `u32` label per image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageDataset {
    /// Name used in messages, e.g. `mnist/train`.
    pub name: String,
    /// Channels per image (1 for grey, 3 for RGB).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Number of classes; every label is smaller.
    pub num_classes: usize,
    /// `N*C*H*W` bytes, image after image, each in CHW order.
    pub images: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u32>,
    /// Optional class names (`num_classes` entries, or empty when unknown).
    pub class_names: Vec<String>,
}

impl ImageDataset {
    /// Builds a dataset and checks that sizes and labels are consistent.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: impl Into<String>,
        channels: usize,
        height: usize,
        width: usize,
        num_classes: usize,
        images: Vec<u8>,
        labels: Vec<u32>,
        class_names: Vec<String>,
    ) -> Result<Self> {
        let ds = ImageDataset {
            name: name.into(),
            channels,
            height,
            width,
            num_classes,
            images,
            labels,
            class_names,
        };
        ds.validate()?;
        Ok(ds)
    }

    /// Checks the invariants: `images.len() == N*C*H*W`, labels `< num_classes`, and
    /// `class_names` either empty or of length `num_classes`.
    pub fn validate(&self) -> Result<()> {
        let per = self.image_size();
        let expected = per
            .checked_mul(self.labels.len())
            .ok_or_else(|| DataError::InvalidArgument(format!("{}: image buffer size overflows", self.name)))?;
        if self.images.len() != expected {
            return Err(DataError::InvalidArgument(format!(
                "{}: {} image bytes for {} labels of {}x{}x{} (expected {expected})",
                self.name,
                self.images.len(),
                self.labels.len(),
                self.channels,
                self.height,
                self.width
            )));
        }
        if let Some((i, &l)) = self.labels.iter().enumerate().find(|(_, &l)| l as usize >= self.num_classes) {
            return Err(DataError::InvalidArgument(format!(
                "{}: label {l} of sample {i} is out of range (num_classes = {})",
                self.name, self.num_classes
            )));
        }
        if !self.class_names.is_empty() && self.class_names.len() != self.num_classes {
            return Err(DataError::InvalidArgument(format!(
                "{}: {} class names for {} classes",
                self.name,
                self.class_names.len(),
                self.num_classes
            )));
        }
        Ok(())
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// `true` when there is no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image, `C*H*W`.
    pub fn image_size(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The CHW bytes of image `i`. Panics if `i >= len()` (like slice indexing).
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_size();
        &self.images[i * n..(i + 1) * n]
    }

    /// Label of image `i`. Panics if `i >= len()` (like slice indexing).
    pub fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }

    /// A new dataset with the images at `indices`, in that order (repetitions allowed).
    pub fn subset(&self, indices: &[usize]) -> Result<ImageDataset> {
        let n = self.image_size();
        let mut images = Vec::with_capacity(indices.len().saturating_mul(n));
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            if i >= self.len() {
                return Err(DataError::InvalidArgument(format!(
                    "{}: subset index {i} out of range (len {})",
                    self.name,
                    self.len()
                )));
            }
            images.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Ok(ImageDataset {
            name: self.name.clone(),
            channels: self.channels,
            height: self.height,
            width: self.width,
            num_classes: self.num_classes,
            images,
            labels,
            class_names: self.class_names.clone(),
        })
    }

    /// Number of images of each class (`num_classes` entries).
    pub fn class_counts(&self) -> Vec<usize> {
        sampling::class_counts(&self.labels, self.num_classes)
    }

    /// Per-channel mean and standard deviation of the pixel values scaled to `[0, 1]`.
    pub fn channel_mean_std(&self) -> (Vec<f32>, Vec<f32>) {
        let c = self.channels;
        let plane = self.height * self.width;
        let mut sum = vec![0f64; c];
        let mut sq = vec![0f64; c];
        for img in self.images.chunks_exact(self.image_size().max(1)) {
            for ch in 0..c {
                let (mut s, mut q) = (0u64, 0u64);
                for &v in &img[ch * plane..(ch + 1) * plane] {
                    s += v as u64;
                    q += (v as u64) * (v as u64);
                }
                sum[ch] += s as f64;
                sq[ch] += q as f64;
            }
        }
        let count = (self.len() * plane).max(1) as f64;
        let mut mean = Vec::with_capacity(c);
        let mut std = Vec::with_capacity(c);
        for ch in 0..c {
            let m = sum[ch] / count / 255.0;
            let var = (sq[ch] / count / (255.0 * 255.0) - m * m).max(0.0);
            mean.push(m as f32);
            std.push(var.sqrt() as f32);
        }
        (mean, std)
    }
}

impl Dataset for ImageDataset {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn label(&self, i: usize) -> Result<u32> {
        self.labels
            .get(i)
            .copied()
            .ok_or_else(|| DataError::InvalidArgument(format!("{}: index {i} out of range (len {})", self.name, self.len())))
    }
    fn read_into(&self, i: usize, _rng: &mut dyn RngCore, out: &mut [u8]) -> Result<u32> {
        let label = Dataset::label(self, i)?;
        let n = self.image_size();
        if out.len() != n {
            return Err(DataError::InvalidArgument(format!(
                "{}: output buffer has {} bytes, image has {n}",
                self.name,
                out.len()
            )));
        }
        out.copy_from_slice(&self.images[i * n..(i + 1) * n]);
        Ok(label)
    }
}
