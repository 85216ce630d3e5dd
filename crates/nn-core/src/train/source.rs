//! The data interface of the trainer and an in-memory implementation for tests and small
//! experiments.

use crate::rng::derived;
use anyhow::Result;
use candle_core::Tensor;
use rand::Rng;

/// A dataset split as a sequence of batches per epoch.
///
/// Images are `f32 [B, C, H, W]`, labels `u32 [B]`. The batch order of an epoch must be a pure
/// function of the source's seed and `epoch`, so that resuming at batch `start` reproduces the
/// rest of an interrupted epoch exactly.
pub trait BatchSource {
    /// Batches per epoch.
    fn num_batches(&self) -> usize;
    /// Examples per epoch.
    fn num_examples(&self) -> usize;
    /// The batches of `epoch`, starting at batch `start` (0 for a full epoch).
    fn batches(&self, epoch: usize, start: usize) -> Box<dyn Iterator<Item = Result<(Tensor, Tensor)>> + '_>;
}

/// A dataset held in two tensors, batched (last batch may be smaller unless `drop_last`) and
/// optionally shuffled per epoch with a generator derived from `(seed, epoch)`.
#[derive(Clone)]
pub struct InMemorySource {
    images: Tensor,
    labels: Tensor,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    seed: u64,
}

impl InMemorySource {
    /// A source over `images` `[N, ...]` and `labels` `[N]`.
    pub fn new(images: Tensor, labels: Tensor, batch_size: usize, shuffle: bool, seed: u64) -> Result<Self> {
        let n = images.dims().first().copied().unwrap_or(0);
        if labels.dims() != [n] {
            anyhow::bail!("InMemorySource: {n} images but labels of shape {:?}", labels.dims());
        }
        if batch_size == 0 {
            anyhow::bail!("InMemorySource: batch size must be > 0");
        }
        Ok(Self {
            images,
            labels: labels.to_dtype(candle_core::DType::U32)?,
            batch_size,
            shuffle,
            drop_last: false,
            seed,
        })
    }

    /// Drops the last incomplete batch (useful with BatchNorm and a batch of one).
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// The example order of `epoch` (a Fisher-Yates shuffle from `derived(seed, epoch)`).
    pub fn order(&self, epoch: usize) -> Vec<u32> {
        let n = self.images.dims()[0];
        let mut idx: Vec<u32> = (0..n as u32).collect();
        if self.shuffle {
            let mut rng = derived(self.seed, epoch as u64);
            for i in (1..n).rev() {
                let j = rng.gen_range(0..=i);
                idx.swap(i, j);
            }
        }
        idx
    }
}

impl BatchSource for InMemorySource {
    fn num_batches(&self) -> usize {
        let n = self.images.dims()[0];
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    fn num_examples(&self) -> usize {
        let n = self.images.dims()[0];
        if self.drop_last {
            n / self.batch_size * self.batch_size
        } else {
            n
        }
    }

    fn batches(&self, epoch: usize, start: usize) -> Box<dyn Iterator<Item = Result<(Tensor, Tensor)>> + '_> {
        let order = self.order(epoch);
        let nb = self.num_batches();
        let bs = self.batch_size;
        Box::new((start..nb).map(move |b| {
            let end = ((b + 1) * bs).min(order.len());
            let idx = Tensor::new(&order[b * bs..end], self.images.device())?;
            Ok((self.images.index_select(&idx, 0)?, self.labels.index_select(&idx, 0)?))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn deterministic_order_and_resume_position() -> Result<()> {
        let x = Tensor::arange(0f32, 10.0, &Device::Cpu)?.reshape((10, 1))?;
        let y = Tensor::arange(0u32, 10, &Device::Cpu)?;
        let s = InMemorySource::new(x, y, 3, true, 5)?;
        assert_eq!(s.num_batches(), 4);
        let all: Vec<Vec<u32>> = s.batches(1, 0).map(|b| b.unwrap().1.to_vec1::<u32>().unwrap()).collect();
        let tail: Vec<Vec<u32>> = s.batches(1, 2).map(|b| b.unwrap().1.to_vec1::<u32>().unwrap()).collect();
        assert_eq!(&all[2..], &tail[..]);
        assert_eq!(all.concat().len(), 10);
        assert_ne!(s.order(0), s.order(1));
        assert_eq!(s.clone().drop_last(true).num_batches(), 3);
        Ok(())
    }
}

/// The data module's loader is a batch source: its epoch order is a function of
/// `(seed, epoch)` and it can start at any batch, which is what exact resume needs.
impl BatchSource for crate::data::DataLoader {
    fn num_batches(&self) -> usize {
        self.len_batches()
    }
    fn num_examples(&self) -> usize {
        self.dataset().len()
    }
    fn batches(&self, epoch: usize, start: usize) -> Box<dyn Iterator<Item = Result<(Tensor, Tensor)>> + '_> {
        Box::new(
            self.epoch_from(epoch as u64, start)
                .map(|b| b.map(|b| (b.images, b.labels)).map_err(anyhow::Error::from)),
        )
    }
}
