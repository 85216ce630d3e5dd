//! Batched matrix products parallel over the batch, for many small matrices (attention heads,
//! windows).
//!
//! candle's CPU matmul loops over the batch and runs each product with the `gemm` crate's own
//! threading, which for small matrices (a ViT-Ti head: `197 x 64` by `64 x 197`; a Swin window:
//! `49 x 32` by `32 x 49`) spends much of its time synchronising threads. Here the batch is
//! split over rayon's threads and each product runs single-threaded, reading the operands
//! through their strides: a transposed view, or heads permuted out of a projection (batch
//! dimensions with any strides, [`BatchIndex`]), need no copy.
//!
//! Backward: `dA = dC B^T`, `dB = A^T dC`, with the same op on transposed views.

use crate::ops::elem::{gemm, Mat};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// The leading (batch) dimensions of a layout with their strides: the offset of product `i`
/// (row-major over the batch dimensions) is `BatchIndex::offset(i)`, so any strided view (a
/// permuted or transposed one: attention heads read straight out of a `qkv` projection)
/// needs no copy.
pub(crate) struct BatchIndex {
    dims: Vec<usize>,
    strides: Vec<usize>,
}

impl BatchIndex {
    pub(crate) fn of(l: &Layout) -> Self {
        let r = l.dims().len();
        Self {
            dims: l.dims()[..r - 2].to_vec(),
            strides: l.stride()[..r - 2].to_vec(),
        }
    }
    pub(crate) fn count(&self) -> usize {
        self.dims.iter().product()
    }
    /// Offset of product `i` from the layout's start.
    pub(crate) fn offset(&self, mut i: usize) -> usize {
        let mut off = 0;
        for (&d, &s) in self.dims.iter().zip(&self.strides).rev() {
            off += (i % d) * s;
            i /= d;
        }
        off
    }
}

/// The matrix of product `i` of a `[..., rows, cols]` layout over `data` (`batch` from
/// [`BatchIndex::of`] of the same layout), or, when `transposed`, its transpose.
pub(crate) fn batch_matrix(data: &[f32], l: &Layout, batch: &BatchIndex, i: usize, transposed: bool) -> Mat<f32> {
    let s = l.stride();
    let r = s.len();
    let (rs, cs) = if transposed { (s[r - 1], s[r - 2]) } else { (s[r - 2], s[r - 1]) };
    Mat {
        ptr: data.as_ptr().wrapping_add(l.start_offset() + batch.offset(i)),
        rs: rs as isize,
        cs: cs as isize,
    }
}

/// Checks that every element of the `rows x cols` matrices of `l` lies inside `len` values.
pub(crate) fn check_inside(l: &Layout, len: usize, what: &str) -> Result<()> {
    let (d, s) = (l.dims(), l.stride());
    if d.contains(&0) {
        return Ok(());
    }
    // the last element of the last product: every index at its maximum
    let last = l.start_offset() + d.iter().zip(s).map(|(&n, &st)| (n - 1) * st).sum::<usize>();
    if last >= len {
        candle_core::bail!("{what}: layout exceeds its storage");
    }
    Ok(())
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
        let (ia, ib) = (BatchIndex::of(l1), BatchIndex::of(l2));
        if ia.dims != ib.dims || db[r - 2] != k {
            candle_core::bail!("batched matmul: shapes {da:?} and {db:?} do not match");
        }
        let batch = ia.count();
        check_inside(l1, a.len(), "batched matmul")?;
        check_inside(l2, b.len(), "batched matmul")?;
        let len = batch * m * n;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        if m * n > 0 {
            // each product writes its whole m x n output (gemm without accumulation), so the
            // buffer is not zeroed first
            out.spare_capacity_mut()[..len]
                .par_chunks_mut(m * n)
                .enumerate()
                .for_each(|(i, c)| {
                    let (lhs, rhs) = (batch_matrix(a, l1, &ia, i, false), batch_matrix(b, l2, &ib, i, false));
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
        // candle's matmul refuses some strided batches: those are copied first
        return a.matmul(b).or_else(|_| a.contiguous()?.matmul(&b.contiguous()?));
    }
    a.apply_op2(b, BatchedMatmul)
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
        // a batch split by a non-collapsible permutation is read in place; shape errors are named
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
