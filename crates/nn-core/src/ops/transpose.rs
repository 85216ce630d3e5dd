//! A contiguous transpose of the last two dimensions, blocked and multi-threaded, with backward.
//!
//! Token-based vision models move between `[B, N, C]` tokens and `[B, C, H, W]` maps around
//! every convolution (PVTv2's depthwise MLP, CMT, CPVT's position encoding). candle's
//! `transpose(1, 2)?.contiguous()` is a single-threaded element-by-element strided copy: for
//! PVTv2-B0's first stage (`8 x 3136 x 256`) it took 12-29 ms, more than the depthwise
//! convolution between the two transposes (`cargo run --release -p vit-survey-zoo --example
//! pvt_mlp_profile`). Here the matrix of each batch entry is copied in `32 x 32` tiles (both
//! sides stay in cache lines), bands of output rows split over rayon's threads: 8-11 ms there,
//! still about 3x a plain copy of the tensor (writing rows while gathering down columns was
//! 1.5x slower again).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

const TILE: usize = 32;

struct TransposeLast2;

impl CustomOp1 for TransposeLast2 {
    fn name(&self) -> &'static str {
        "blocked-transpose-last2"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("transpose: contiguous f32 input expected"),
        };
        let dims = l.dims();
        let r = dims.len();
        let (rows, cols) = (dims[r - 2], dims[r - 1]);
        let plane = rows * cols;
        let mut y: Vec<f32> = Vec::with_capacity(x.len());
        if plane > 0 {
            // tasks: (batch entry, band of TILE output rows = input columns); every output
            // element is written once, so the buffer is not zeroed first
            y.spare_capacity_mut()[..x.len()]
                .par_chunks_mut(plane)
                .zip(x.par_chunks(plane))
                .for_each(|(yo, xi)| {
                    yo.par_chunks_mut(TILE * rows).enumerate().for_each(|(band, out)| {
                        let c0 = band * TILE;
                        let cw = (cols - c0).min(TILE);
                        for r0 in (0..rows).step_by(TILE) {
                            let rh = (rows - r0).min(TILE);
                            for c in 0..cw {
                                let dst = &mut out[c * rows + r0..c * rows + r0 + rh];
                                for (i, d) in dst.iter_mut().enumerate() {
                                    d.write(xi[(r0 + i) * cols + c0 + c]);
                                }
                            }
                        }
                    });
                });
        }
        // SAFETY: the bands above cover every element of every plane (or there are none).
        unsafe { y.set_len(x.len()) };
        let mut shape = dims.to_vec();
        shape.swap(r - 2, r - 1);
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(transpose_last2(g)?))
    }
}

/// `x` with its last two dimensions swapped, as a contiguous tensor (`x.transpose(-2,
/// -1)?.contiguous()`), with gradients; blocked and multi-threaded for CPU f32.
pub fn transpose_last2(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 2 {
        x.contiguous()?.apply_op1(TransposeLast2)
    } else {
        x.transpose(D::Minus2, D::Minus1)?.contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn equals_candle_transpose_with_gradient() -> Result<()> {
        for dims in [(2usize, 70usize, 33usize), (1, 1, 5), (3, 64, 64), (2, 5, 1)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?)?;
            let y = transpose_last2(x.as_tensor())?;
            let want = x.as_tensor().transpose(1, 2)?.contiguous()?;
            assert_eq!(y.dims(), want.dims());
            assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?.to_vec1::<f32>()?);
            let w = Tensor::randn(0f32, 1.0, y.dims(), &Device::Cpu)?;
            let g = y.mul(&w)?.sum_all()?.backward()?;
            let gx = g.get(x.as_tensor()).expect("gradient");
            assert_eq!(
                gx.flatten_all()?.to_vec1::<f32>()?,
                w.transpose(1, 2)?.flatten_all()?.to_vec1::<f32>()?
            );
        }
        Ok(())
    }
}
