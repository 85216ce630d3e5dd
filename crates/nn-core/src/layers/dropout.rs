//! Dropout with a seeded mask (candle's CPU generator cannot be seeded).

use crate::rng::{seeded, ChaCha8Rng};
use candle_core::{Result, Tensor};
use candle_nn::ModuleT;
use rand::Rng;
use std::sync::Mutex;

/// Inverted dropout: in training, zeroes each element with probability `p` and scales the rest
/// by 1/(1-p); identity in evaluation. The mask comes from the layer's own seeded generator,
/// so a run with the same seed drops the same units.
pub struct Dropout {
    p: f32,
    rng: Mutex<ChaCha8Rng>,
}

impl Dropout {
    /// A dropout layer with drop probability `p` in [0, 1) and mask seed `seed`
    /// (use `VarPath::derived_seed` for a per-layer seed).
    pub fn new(p: f32, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout probability must be in [0, 1), got {p}");
        }
        Ok(Self {
            p,
            rng: Mutex::new(seeded(seed)),
        })
    }
}

impl ModuleT for Dropout {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let scale = 1.0 / keep;
        let mask: Vec<f32> = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            (0..x.elem_count())
                .map(|_| if rng.gen::<f32>() < keep { scale } else { 0.0 })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.dims(), &candle_core::Device::Cpu)?
            .to_device(x.device())?
            .to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn seeded_and_scaled() -> Result<()> {
        let x = Tensor::ones((1000,), DType::F32, &Device::Cpu)?;
        let a = Dropout::new(0.25, 3)?.forward_t(&x, true)?.to_vec1::<f32>()?;
        let b = Dropout::new(0.25, 3)?.forward_t(&x, true)?.to_vec1::<f32>()?;
        assert_eq!(a, b);
        let zeros = a.iter().filter(|&&v| v == 0.0).count();
        assert!((200..300).contains(&zeros), "{zeros}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        assert_eq!(Dropout::new(0.25, 3)?.forward_t(&x, false)?.to_vec1::<f32>()?, vec![1.0; 1000]);
        assert!(Dropout::new(1.0, 0).is_err());
        Ok(())
    }
}
