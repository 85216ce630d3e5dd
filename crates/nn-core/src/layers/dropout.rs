//! Dropout with a seeded, checkpointable mask stream (candle's CPU generator cannot be seeded).

use crate::init::Init;
use crate::rng::derived;
use crate::var_store::VarPath;
use candle_core::{Result, Tensor, Var};
use candle_nn::ModuleT;
use rand::Rng;

/// Inverted dropout: in training, zeroes each element with probability `p` and scales the rest
/// by 1/(1-p); identity in evaluation. [`Dropout::channels`] drops whole feature maps instead
/// (PyTorch's `Dropout2d`): one draw per (sample, channel), shared by all positions.
///
/// The mask of the k-th training call is drawn from a generator derived from the layer's seed
/// and k, and k is kept as a buffer (`<path>.calls`) in the [`crate::VarStore`], so it is saved
/// in checkpoints and a resumed run drops exactly the units an uninterrupted run would.
pub struct Dropout {
    p: f32,
    seed: u64,
    calls: Var,
    whole_channels: bool,
}

impl Dropout {
    /// A dropout layer with drop probability `p` in [0, 1) whose seed derives from the store's
    /// seed and the layer's path.
    pub fn new(vp: &VarPath, p: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout probability must be in [0, 1), got {p}");
        }
        let calls = vp.buffer("calls", &[1], Init::ZEROS)?;
        Ok(Self {
            p,
            seed: vp.derived_seed(),
            calls,
            whole_channels: false,
        })
    }

    /// Channel dropout: each (sample, channel) map of an input of rank >= 3 is kept or zeroed as
    /// a whole. Inputs of rank < 3 fall back to element-wise dropout.
    pub fn channels(vp: &VarPath, p: f32) -> Result<Self> {
        Ok(Self {
            whole_channels: true,
            ..Self::new(vp, p)?
        })
    }
}

impl ModuleT for Dropout {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        let k = self.calls.as_tensor().to_vec1::<f32>()?[0];
        self.calls.set(&(self.calls.as_tensor() + 1.0)?)?;
        let mut rng = derived(self.seed, k as u64);
        let keep = 1.0 - self.p;
        let scale = 1.0 / keep;
        let mask_dims: Vec<usize> = if self.whole_channels && x.rank() >= 3 {
            x.dims().iter().enumerate().map(|(i, &d)| if i < 2 { d } else { 1 }).collect()
        } else {
            x.dims().to_vec()
        };
        let mask: Vec<f32> = (0..mask_dims.iter().product::<usize>())
            .map(|_| if rng.gen::<f32>() < keep { scale } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, mask_dims, &candle_core::Device::Cpu)?
            .to_device(x.device())?
            .to_dtype(x.dtype())?;
        x.broadcast_mul(&mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VarStore;
    use candle_core::{DType, Device};

    #[test]
    fn seeded_scaled_and_resumable() -> Result<()> {
        let x = Tensor::ones((1000,), DType::F32, &Device::Cpu)?;
        let make = || -> Result<(VarStore, Dropout)> {
            let vs = VarStore::new(3, &Device::Cpu);
            let d = Dropout::new(&vs.root().pp("drop"), 0.25)?;
            Ok((vs, d))
        };
        let (vs_a, a) = make()?;
        let (_, b) = make()?;
        let a1 = a.forward_t(&x, true)?.to_vec1::<f32>()?;
        assert_eq!(a1, b.forward_t(&x, true)?.to_vec1::<f32>()?);
        let a2 = a.forward_t(&x, true)?.to_vec1::<f32>()?;
        assert_ne!(a1, a2, "consecutive calls draw new masks");
        let zeros = a1.iter().filter(|&&v| v == 0.0).count();
        assert!((200..300).contains(&zeros), "{zeros}");
        assert!(a1.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        assert_eq!(a.forward_t(&x, false)?.to_vec1::<f32>()?, vec![1.0; 1000]);
        // restoring the buffer (as a checkpoint does) replays the same mask stream
        let (vs_c, c) = make()?;
        vs_c.load_tensors(&vs_a.tensors(), true)?;
        assert_eq!(c.forward_t(&x, true)?.to_vec1::<f32>()?, a.forward_t(&x, true)?.to_vec1::<f32>()?);
        assert!(Dropout::new(&VarStore::new(0, &Device::Cpu).root(), 1.0).is_err());
        Ok(())
    }

    #[test]
    fn channel_dropout_drops_whole_maps() -> Result<()> {
        let vs = VarStore::new(5, &Device::Cpu);
        let d = Dropout::channels(&vs.root().pp("drop"), 0.5)?;
        let x = Tensor::ones((8, 50, 4, 4), DType::F32, &Device::Cpu)?;
        let y = d.forward_t(&x, true)?.reshape((400, 16))?.to_vec2::<f32>()?;
        let mut dropped = 0;
        for map in &y {
            assert!(map.iter().all(|&v| v == map[0]), "a map is kept or dropped as a whole: {map:?}");
            assert!(map[0] == 0.0 || (map[0] - 2.0).abs() < 1e-6, "{}", map[0]);
            dropped += usize::from(map[0] == 0.0);
        }
        assert!((140..260).contains(&dropped), "{dropped} of 400 maps dropped at p = 0.5");
        assert_eq!(d.forward_t(&x, false)?.sum_all()?.to_scalar::<f32>()?, 8.0 * 50.0 * 16.0);
        Ok(())
    }
}
