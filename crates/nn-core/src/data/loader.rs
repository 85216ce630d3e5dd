//! Mini-batch loader with reproducible shuffling, deterministic augmentation, resumption
//! and background prefetch.
//!
//! * The sample order of epoch `e` is a Fisher–Yates shuffle driven by a
//!   [`ChaCha8Rng`] seeded from `(seed, e)`, so any epoch can be regenerated on its own.
//! * Every sample's augmentation (and decode-time random crop) uses its own `ChaCha8Rng`
//!   seeded from `(seed, e, index)`: results do not depend on threads, prefetch or timing.
//! * Consequently batch `b` of epoch `e` is a pure function of the configuration, and
//!   [`DataLoader::epoch_from`] resumes an interrupted run exactly.
//! * With `prefetch > 0` a worker thread prepares the next batches into a bounded channel
//!   while the caller trains on the current one. Lazy datasets (image folders) decode the
//!   samples of a batch in parallel with rayon.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::transforms::{Pipeline, Sample};
use super::{DataError, Dataset, Result};

/// A batch ready for a model.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `f32` images `[B, C, H, W]` on the loader's device.
    pub images: Tensor,
    /// `u32` labels `[B]` on the loader's device.
    pub labels: Tensor,
    /// Dataset index of every sample of the batch.
    pub indices: Vec<usize>,
}

/// A batch in host memory, before conversion to tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct HostBatch {
    /// `B*C*H*W` values, sample after sample, CHW each.
    pub images: Vec<f32>,
    /// `B` labels.
    pub labels: Vec<u32>,
    /// Dataset index of every sample.
    pub indices: Vec<usize>,
    /// `(C, H, W)` of each sample.
    pub shape: (usize, usize, usize),
}

impl HostBatch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// `true` without samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Converts to tensors on `device` (no copy on the CPU device).
    pub fn to_batch(self, device: &Device) -> Result<Batch> {
        let (c, h, w) = self.shape;
        let b = self.labels.len();
        let images = Tensor::from_vec(self.images, (b, c, h, w), device)?;
        let labels = Tensor::from_vec(self.labels, b, device)?;
        Ok(Batch {
            images,
            labels,
            indices: self.indices,
        })
    }
}

/// SplitMix64 finaliser: a bijective mixer used to derive independent seeds.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A `ChaCha8Rng` seeded from a tuple of values (order matters).
pub fn derived_rng(parts: &[u64]) -> ChaCha8Rng {
    let mut h = 0x005E_ED0F_C0DE_u64;
    for &p in parts {
        h = mix64(h ^ mix64(p));
    }
    let mut seed = [0u8; 32];
    for (k, chunk) in seed.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&mix64(h.wrapping_add(k as u64)).to_le_bytes());
    }
    ChaCha8Rng::from_seed(seed)
}

const TAG_SHUFFLE: u64 = 1;
const TAG_SAMPLE: u64 = 2;

/// Configuration shared with the prefetch thread.
struct Inner {
    dataset: Arc<dyn Dataset>,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    seed: u64,
    pipeline: Pipeline,
    parallel: Option<bool>,
}

impl Inner {
    fn len_batches(&self) -> usize {
        let n = self.dataset.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let n = self.dataset.len();
        let mut order: Vec<usize> = (0..n).collect();
        if self.shuffle {
            let mut rng = derived_rng(&[TAG_SHUFFLE, self.seed, epoch]);
            for i in (1..n).rev() {
                let j = rng.gen_range(0..=i as u64) as usize;
                order.swap(i, j);
            }
        }
        order
    }

    fn batch_indices<'a>(&self, order: &'a [usize], b: usize) -> &'a [usize] {
        let start = (b * self.batch_size).min(order.len());
        let end = (start + self.batch_size).min(order.len());
        &order[start..end]
    }

    /// Reads, transforms and stacks the samples `indices` of `epoch`.
    fn build(&self, epoch: u64, indices: &[usize]) -> Result<HostBatch> {
        let in_shape = self.dataset.shape();
        let shape = self.pipeline.output_shape(in_shape)?;
        let in_len = in_shape.0 * in_shape.1 * in_shape.2;
        let out_len = shape.0 * shape.1 * shape.2;
        let mut images = vec![0f32; indices.len() * out_len];
        let mut labels = vec![0u32; indices.len()];
        let ds = &*self.dataset;
        let pipeline = &self.pipeline;
        let seed = self.seed;
        let one = |st: &mut (Vec<u8>, Sample, Vec<f32>), (out, (label, &idx)): (&mut [f32], (&mut u32, &usize))| -> Result<()> {
            let (raw, sample, scratch) = st;
            let mut rng = derived_rng(&[TAG_SAMPLE, seed, epoch, idx as u64]);
            *label = ds.read_into(idx, &mut rng, raw)?;
            sample.load_u8(raw, in_shape);
            pipeline.apply(sample, scratch, &mut rng);
            out.copy_from_slice(&sample.data);
            Ok(())
        };
        let init = || (vec![0u8; in_len], Sample::default(), Vec::new());
        if out_len == 0 {
            for (l, &i) in labels.iter_mut().zip(indices) {
                *l = ds.label(i)?;
            }
        } else if self.parallel.unwrap_or_else(|| ds.is_lazy()) {
            images
                .par_chunks_mut(out_len)
                .zip(labels.par_iter_mut().zip(indices.par_iter()))
                .try_for_each_init(init, one)?;
        } else {
            let mut st = init();
            for item in images.chunks_mut(out_len).zip(labels.iter_mut().zip(indices.iter())) {
                one(&mut st, item)?;
            }
        }
        Ok(HostBatch {
            images,
            labels,
            indices: indices.to_vec(),
            shape,
        })
    }
}

/// Batches a [`Dataset`]; see the [module documentation](self).
///
/// ```no_run
/// # use nn_core::data::{registry, DataLoader, Pipeline, Split, LoadOptions, transforms::*};
/// let train = registry::load("mnist", Split::Train, &LoadOptions::default())?;
/// let loader = DataLoader::new(train, 128)
///     .shuffle(true)
///     .seed(42)
///     .transform(Pipeline::new().random_crop(28, 2).hflip(0.5).normalize(&MNIST_MEAN, &MNIST_STD))
///     .prefetch(2);
/// for batch in loader.epoch(0) {
///     let batch = batch?;
///     // batch.images: f32 [128, 1, 28, 28], batch.labels: u32 [128]
/// }
/// # Ok::<(), nn_core::data::DataError>(())
/// ```
#[derive(Clone)]
pub struct DataLoader {
    inner: Arc<Inner>,
    device: Device,
    prefetch: usize,
}

impl std::fmt::Debug for DataLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataLoader")
            .field("dataset", &self.inner.dataset.name())
            .field("len", &self.inner.dataset.len())
            .field("batch_size", &self.inner.batch_size)
            .field("shuffle", &self.inner.shuffle)
            .field("drop_last", &self.inner.drop_last)
            .field("seed", &self.inner.seed)
            .field("pipeline", &self.inner.pipeline)
            .field("prefetch", &self.prefetch)
            .finish()
    }
}

impl DataLoader {
    /// A loader over `dataset` with batches of `batch_size` (a size of 0 is treated as 1):
    /// no shuffling, seed 0, last partial batch kept, no transform, CPU device, prefetch of
    /// 2 batches.
    pub fn new<D: Dataset + 'static>(dataset: D, batch_size: usize) -> Self {
        Self::from_arc(Arc::new(dataset), batch_size)
    }

    /// Like [`new`](DataLoader::new) for an already shared dataset.
    pub fn from_arc(dataset: Arc<dyn Dataset>, batch_size: usize) -> Self {
        DataLoader {
            inner: Arc::new(Inner {
                dataset,
                batch_size: batch_size.max(1),
                shuffle: false,
                drop_last: false,
                seed: 0,
                pipeline: Pipeline::new(),
                parallel: None,
            }),
            device: Device::Cpu,
            prefetch: 2,
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        let old = &*self.inner;
        let mut inner = Inner {
            dataset: old.dataset.clone(),
            batch_size: old.batch_size,
            shuffle: old.shuffle,
            drop_last: old.drop_last,
            seed: old.seed,
            pipeline: old.pipeline.clone(),
            parallel: old.parallel,
        };
        f(&mut inner);
        self.inner = Arc::new(inner);
        self
    }

    /// Shuffle the sample order every epoch.
    pub fn shuffle(self, on: bool) -> Self {
        self.edit(|i| i.shuffle = on)
    }
    /// Seed of shuffles and augmentations.
    pub fn seed(self, seed: u64) -> Self {
        self.edit(|i| i.seed = seed)
    }
    /// Drop the last batch when it is smaller than the batch size.
    pub fn drop_last(self, on: bool) -> Self {
        self.edit(|i| i.drop_last = on)
    }
    /// Per-sample transform pipeline (applied after scaling pixels to `[0, 1]`).
    pub fn transform(self, pipeline: Pipeline) -> Self {
        self.edit(|i| i.pipeline = pipeline)
    }
    /// Decode the samples of a batch in parallel (`Some(true)`), sequentially
    /// (`Some(false)`), or in parallel only for lazy datasets (`None`, the default).
    pub fn parallel(self, parallel: Option<bool>) -> Self {
        self.edit(|i| i.parallel = parallel)
    }
    /// Number of batches prepared ahead by a worker thread; 0 builds batches synchronously.
    pub fn prefetch(mut self, batches: usize) -> Self {
        self.prefetch = batches;
        self
    }
    /// Device of the returned tensors.
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.inner.dataset
    }
    /// Batch size.
    pub fn batch_size(&self) -> usize {
        self.inner.batch_size
    }
    /// Number of batches per epoch.
    pub fn len_batches(&self) -> usize {
        self.inner.len_batches()
    }
    /// Shape `(C, H, W)` of the samples after the transform pipeline.
    pub fn sample_shape(&self) -> Result<(usize, usize, usize)> {
        self.inner.pipeline.output_shape(self.inner.dataset.shape())
    }
    /// The sample order of `epoch` (identity without shuffling).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        self.inner.epoch_order(epoch)
    }

    /// Builds batch `batch` of `epoch` in host memory, independently of any iterator.
    pub fn host_batch(&self, epoch: u64, batch: usize) -> Result<HostBatch> {
        if batch >= self.len_batches() {
            return Err(DataError::InvalidArgument(format!(
                "batch {batch} out of range: an epoch has {} batches",
                self.len_batches()
            )));
        }
        let order = self.inner.epoch_order(epoch);
        self.inner.build(epoch, self.inner.batch_indices(&order, batch))
    }

    /// Builds batch `batch` of `epoch` as tensors.
    pub fn batch(&self, epoch: u64, batch: usize) -> Result<Batch> {
        self.host_batch(epoch, batch)?.to_batch(&self.device)
    }

    /// Iterates over all batches of `epoch`.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.epoch_from(epoch, 0)
    }

    /// Iterates over the batches of `epoch` starting at batch `start_batch` (to resume an
    /// interrupted run: the batches are exactly those an uninterrupted run would produce).
    pub fn epoch_from(&self, epoch: u64, start_batch: usize) -> EpochIter {
        let end = self.len_batches();
        let start = start_batch.min(end);
        let order = Arc::new(self.inner.epoch_order(epoch));
        let (rx, worker) = if self.prefetch > 0 && start < end {
            let (tx, rx) = sync_channel(self.prefetch);
            let inner = self.inner.clone();
            let order = order.clone();
            let handle = std::thread::Builder::new().name("data-prefetch".into()).spawn(move || {
                for b in start..end {
                    let r = inner.build(epoch, inner.batch_indices(&order, b));
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        break;
                    }
                }
            });
            match handle {
                Ok(h) => (Some(rx), Some(h)),
                // Could not spawn a thread: fall back to synchronous loading.
                Err(_) => (None, None),
            }
        } else {
            (None, None)
        };
        EpochIter {
            inner: self.inner.clone(),
            device: self.device.clone(),
            epoch,
            order,
            next: start,
            end,
            rx,
            worker,
            failed: false,
        }
    }
}

/// Iterator over the batches of one epoch, created by [`DataLoader::epoch`] /
/// [`DataLoader::epoch_from`]. Stops after the first error.
pub struct EpochIter {
    inner: Arc<Inner>,
    device: Device,
    epoch: u64,
    order: Arc<Vec<usize>>,
    next: usize,
    end: usize,
    rx: Option<Receiver<Result<HostBatch>>>,
    worker: Option<JoinHandle<()>>,
    failed: bool,
}

impl EpochIter {
    /// Epoch being iterated.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// Index of the batch the next call to `next` returns.
    pub fn next_batch_index(&self) -> usize {
        self.next
    }
    /// Next batch in host memory (no tensor conversion).
    pub fn next_host(&mut self) -> Option<Result<HostBatch>> {
        if self.failed || self.next >= self.end {
            return None;
        }
        let r = match &self.rx {
            Some(rx) => rx
                .recv()
                .unwrap_or_else(|_| Err(DataError::InvalidArgument("data prefetch thread stopped unexpectedly".into()))),
            None => self.inner.build(self.epoch, self.inner.batch_indices(&self.order, self.next)),
        };
        self.next += 1;
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        let device = self.device.clone();
        self.next_host().map(|r| r.and_then(|hb| hb.to_batch(&device)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = if self.failed { 0 } else { self.end - self.next };
        (n, Some(n))
    }
}

impl ExactSizeIterator for EpochIter {}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Closing the channel makes the worker's next send fail, so it exits promptly.
        self.rx.take();
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageDataset;

    /// 10 single-channel 2x3 images; image i has pixel values i*10 + p.
    fn toy(n: usize) -> ImageDataset {
        let images = (0..n).flat_map(|i| (0..6).map(move |p| (i * 10 + p) as u8)).collect();
        let labels = (0..n).map(|i| (i % 3) as u32).collect();
        ImageDataset::new("toy", 1, 2, 3, 3, images, labels, vec![]).unwrap()
    }

    fn collect(l: &DataLoader, e: u64, from: usize) -> Vec<HostBatch> {
        let mut it = l.epoch_from(e, from);
        let mut v = Vec::new();
        while let Some(b) = it.next_host() {
            v.push(b.unwrap());
        }
        v
    }

    fn aug() -> Pipeline {
        Pipeline::new().random_crop(2, 1).hflip(0.5).normalize(&[0.5], &[0.25])
    }

    #[test]
    fn order_is_deterministic_and_complete() {
        let l = DataLoader::new(toy(10), 4).shuffle(true).seed(9);
        assert_eq!(l.len_batches(), 3);
        let o0 = l.epoch_order(0);
        assert_eq!(o0, l.epoch_order(0));
        assert_ne!(o0, l.epoch_order(1));
        let mut s = o0.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
        assert_ne!(o0, DataLoader::new(toy(10), 4).shuffle(true).seed(10).epoch_order(0));
        let batches = collect(&l, 0, 0);
        assert_eq!(batches.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![4, 4, 2]);
        let idx: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        assert_eq!(idx, o0);
        // Without transform, values are pixels / 255 and labels match.
        let b = &batches[0];
        for (k, &i) in b.indices.iter().enumerate() {
            assert_eq!(b.labels[k], (i % 3) as u32);
            assert_eq!(b.images[k * 6 + 5], (i * 10 + 5) as f32 / 255.0);
        }
        let l2 = DataLoader::new(toy(10), 4).drop_last(true);
        assert_eq!(l2.len_batches(), 2);
        assert_eq!(collect(&l2, 0, 0)[1].indices, vec![4, 5, 6, 7]);
    }

    #[test]
    fn resume_and_prefetch_reproduce_batches() {
        let base = DataLoader::new(toy(23), 5).shuffle(true).seed(3).transform(aug());
        for prefetch in [0, 1, 3] {
            for parallel in [Some(false), Some(true)] {
                let l = base.clone().prefetch(prefetch).parallel(parallel);
                for epoch in 0..2 {
                    let full = collect(&base.clone().prefetch(0), epoch, 0);
                    assert_eq!(collect(&l, epoch, 0), full);
                    assert_eq!(collect(&l, epoch, 3), full[3..].to_vec());
                    assert_eq!(l.host_batch(epoch, 2).unwrap(), full[2]);
                }
            }
        }
        let e0 = collect(&base, 0, 0);
        let e1 = collect(&base, 1, 0);
        assert_ne!(e0, e1);
        // Same sample in two epochs gets different augmentation draws (most of the time).
        assert!(collect(&base, 5, 5).is_empty());
        // Dropping an iterator early stops its worker without hanging.
        let mut it = base.clone().prefetch(1).epoch(0);
        assert!(it.next().unwrap().is_ok());
        drop(it);
    }

    #[test]
    fn tensors_have_expected_shapes() {
        let l = DataLoader::new(toy(7), 4).transform(aug());
        let b: Vec<Batch> = l.epoch(0).collect::<Result<_>>().unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].images.dims(), &[4, 1, 2, 2]);
        assert_eq!(b[0].labels.dims(), &[4]);
        assert_eq!(b[1].images.dims(), &[3, 1, 2, 2]);
        assert_eq!(b[1].labels.to_vec1::<u32>().unwrap(), vec![1, 2, 0]);
        assert!(l.host_batch(0, 2).is_err());
    }

    #[test]
    fn errors_stop_the_epoch() {
        let l = DataLoader::new(toy(7), 4).transform(Pipeline::new().normalize(&[0.1, 0.2], &[1.0, 1.0]));
        let r: Vec<_> = l.epoch(0).collect();
        assert_eq!(r.len(), 1);
        assert!(r[0].as_ref().unwrap_err().to_string().contains("Normalize"));
    }

    #[test]
    fn loader_full_epoch_with_augmentation() {
        // 2000 MNIST-sized samples with crop + flip + normalize, prefetched: every sample once.
        let n = 2000;
        let images = (0..n * 784).map(|i| (i % 256) as u8).collect();
        let labels = (0..n).map(|i| (i % 10) as u32).collect();
        let ds = ImageDataset::new("bench", 1, 28, 28, 10, images, labels, vec![]).unwrap();
        let l = DataLoader::new(ds, 128)
            .shuffle(true)
            .transform(Pipeline::new().random_crop(28, 2).hflip(0.5).normalize(&[0.1307], &[0.3081]))
            .prefetch(2);
        let mut seen: Vec<usize> = l.epoch(0).flat_map(|b| b.unwrap().indices).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
    }
}
