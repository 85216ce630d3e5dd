//! Batched matrix products parallel over the batch, for many small matrices (attention heads,
//! windows).
//!
//! candle's CPU matmul loops over the batch and runs each product with the `gemm` crate's own
//! threading, which for small matrices (a ViT-Ti head: `197 x 64` by `64 x 197`; a Swin window:
//! `49 x 32` by `32 x 49`) spends much of its time synchronising threads. Here the batch is
//! split over rayon's threads and each product runs single-threaded, reading the operands
//! through their strides (a transposed view needs no copy).
//!
//! Backward: `dA = dC B^T`, `dB = A^T dC`, with the same op on transposed views.

use crate::ops::elem::{gemm, Mat};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// `(batch, batch stride)` of the leading dimensions of `l`, if they collapse to one stride.
fn batch_of(l: &Layout) -> Option<(usize, usize)> {
    let (dims, strides) = (l.dims(), l.stride());
    let mut count = 1usize;
    let mut stride = None;
    // innermost batch dimension first: each outer one must step over all inner ones
    for i in (0..dims.len() - 2).rev() {
        if dims[i] == 1 {
            continue;
        }
        match stride {
            None => stride = Some(strides[i]),
            Some(s) if strides[i] == s * count => {}
            Some(_) => return None,
        }
        count *= dims[i];
    }
    Some((count, stride.unwrap_or(0)))
}

struct BatchedMatmul;

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b) = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => (a.as_slice(), b.as_slice()),
            _ => candle_core::bail!("batched matmul: f32 operands expected"),
        };
        let (da, db) = (l1.dims(), l2.dims());
        let r = da.len();
        let (m, k, n) = (da[r - 2], da[r - 1], db[r - 1]);
        let ((batch, bsa), (batch_b, bsb)) = match (batch_of(l1), batch_of(l2)) {
            (Some(x), Some(y)) => (x, y),
            _ => candle_core::bail!("batched matmul: batch dimensions must collapse to one stride"),
        };
        if batch != batch_b || db[r - 2] != k {
            candle_core::bail!("batched matmul: shapes {da:?} and {db:?} do not match");
        }
        let (sa, sb) = (l1.stride(), l2.stride());
        let (ra, ca, rb, cb) = (sa[r - 2], sa[r - 1], sb[r - 2], sb[r - 1]);
        // every element read must lie inside the buffers
        let last = |off: usize, bs: usize, rows: usize, cols: usize, rs: usize, cs: usize| {
            off + (batch - 1) * bs + (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs
        };
        if batch > 0
            && m * k * n > 0
            && (last(l1.start_offset(), bsa, m, k, ra, ca) >= a.len() || last(l2.start_offset(), bsb, k, n, rb, cb) >= b.len())
        {
            candle_core::bail!("batched matmul: layout exceeds its storage");
        }
        let len = batch * m * n;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        if m * n > 0 {
            // each product writes its whole m x n output (gemm without accumulation), so the
            // buffer is not zeroed first
            out.spare_capacity_mut()[..len]
                .par_chunks_mut(m * n)
                .enumerate()
                .for_each(|(i, c)| {
                    let lhs = Mat {
                        ptr: a[l1.start_offset() + i * bsa..].as_ptr(),
                        rs: ra as isize,
                        cs: ca as isize,
                    };
                    let rhs = Mat {
                        ptr: b[l2.start_offset() + i * bsb..].as_ptr(),
                        rs: rb as isize,
                        cs: cb as isize,
                    };
                    // SAFETY: bounds checked above; `c` is this product's m x n output.
                    unsafe { gemm(m, n, k, c.as_mut_ptr() as *mut f32, n, false, lhs, rhs, gemm::Parallelism::None) };
                });
        }
        // SAFETY: all `batch` products were written above (or the output is empty).
        unsafe { out.set_len(len) };
        let mut shape = da.to_vec();
        shape[r - 1] = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, _c: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let da = batched_matmul(g, &b.transpose(D::Minus2, D::Minus1)?)?;
        let db = batched_matmul(&a.transpose(D::Minus2, D::Minus1)?, g)?;
        Ok((Some(da), Some(db)))
    }
}

/// `a @ b` for `[..., m, k]` and `[..., k, n]` with the same batch dimensions, with gradients;
/// parallel over the batch on CPU for f32 (candle's `matmul` elsewhere, or when the batch is
/// too small to share among the threads).
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let r = a.rank();
    let fast = a.device().is_cpu()
        && b.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && r >= 3
        && b.rank() == r
        && a.dims()[..r - 2] == b.dims()[..r - 2]
        && a.dims()[..r - 2].iter().product::<usize>() >= 2 * rayon::current_num_threads();
    if !fast {
        return a.matmul(b);
    }
    let a = if batch_of(a.layout()).is_some() {
        a.clone()
    } else {
        a.contiguous()?
    };
    let b = if batch_of(b.layout()).is_some() {
        b.clone()
    } else {
        b.contiguous()?
    };
    a.apply_op2(&b, BatchedMatmul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn equals_candle_matmul_with_gradients_on_strided_views() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 7), &dev)?)?;
        let bt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4, 7), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &dev)?;
        // b as a transposed view (the attention's K^T), a as a permuted view
        let b = bt.as_tensor().transpose(2, 3)?;
        let ap = a.as_tensor().permute((1, 0, 2, 3))?.permute((1, 0, 2, 3))?;
        let fast = batched_matmul(&ap, &b)?;
        let slow = a.as_tensor().matmul(&b.contiguous()?)?;
        let diff = (&fast - &slow)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        let gf = fast.mul(&w)?.sum_all()?.backward()?;
        let gs = slow.mul(&w)?.sum_all()?.backward()?;
        for v in [&a, &bt] {
            let d = (gf.get(v.as_tensor()).unwrap() - gs.get(v.as_tensor()).unwrap())?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d < 1e-5, "{d}");
        }
        // a batch split by a non-collapsible permutation is copied first; shape errors are named
        let x = Tensor::randn(0f32, 1.0, (4, 6, 3, 3), &dev)?.permute((1, 0, 2, 3))?;
        let y = Tensor::randn(0f32, 1.0, (6, 4, 3, 2), &dev)?;
        let d = (batched_matmul(&x, &y)? - x.contiguous()?.matmul(&y)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5);
        assert!(batched_matmul(&x, &Tensor::zeros((6, 4, 2, 2), DType::F32, &dev)?).is_err());
        Ok(())
    }
}
