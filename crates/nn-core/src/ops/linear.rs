//! Fully connected product `y = x W^T + b` over the last dimension, forward and backward,
//! as one CPU op.
//!
//! candle computes `x.matmul(&w.t())` with the `gemm` crate's own threading and then adds the
//! bias in a second pass through its elementwise thread pool. Here the rows of `x` are split
//! into a few blocks over rayon's threads, each block one single-threaded gemm whose output
//! starts as the bias (so there is no separate pass). On this project's 2-core machine
//! (`cargo run --release -p nn-core --example linear_speed`) the row split ran ViT-Ti's
//! products (1576 rows, 192 -> 576 / 768, 768 -> 192) 1.02-1.09x and the large-row products
//! of Swin-T and PVTv2 stage 1 (25088 rows) 1.3-1.7x as fast as candle's matmul.
//!
//! Since 2026-12-08 the products run on nn-core's own AVX2 6 x 16 micro-kernel (`ops::sgemm`)
//! where the CPU has AVX2+FMA but not AVX-512: the weight is packed once per call and shared by
//! the row tasks, and the bias is the kernel's starting value. On the 2-core Zen 3 machine
//! (`linear_speed` again) it ran ViT-Ti's four products 1.03-1.2x as fast as the `gemm` crate
//! and put Swin-T's whole forward from 0.85x to 1.16x of PyTorch's (`cargo xtask vit bench`).
//!
//! Backward, for `g = dL/dy` `[rows, out]`:
//! - `dx = g W` (the same row-split gemm),
//! - `dW = g^T x`, split over blocks of output features (each block reduces over all rows;
//!   no partial sums to add),
//! - `db = sum over rows of g`, one partial sum per row chunk.

use crate::ops::elem::{gemm, Mat};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Rows per task (at least 16) for a product with a `k x n` right-hand side. Every task's gemm
/// packs the whole right-hand side again, so a large one (64 Ki values and more: TNT-S's
/// 384 x 1536 MLP) gets one task per thread; smaller ones two per thread, which keeps the
/// load balanced when a thread is held up. On TNT-S at two threads (`perf record` of `cargo
/// xtask --threads 2 vit bench --no-torch --models tnt_s_patch16_224`) the packing took 4.1%
/// of a forward with two tasks per thread for every size, 2.4% with this rule (and 9% when
/// the tasks were cut further into gemm calls of 64 rows).
fn rows_per_task(rows: usize, k: usize, n: usize) -> usize {
    let per_thread = if k * n >= 1 << 16 { 1 } else { 2 };
    rows.div_ceil(per_thread * rayon::current_num_threads()).max(16)
}

static OWN_SGEMM: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

/// Whether the linear products use nn-core's AVX2 micro-kernel (`ops::sgemm`) instead of the
/// `gemm` crate: by default where the CPU has AVX2+FMA but not AVX-512 (there the `gemm`
/// crate's AVX-512 kernels ran 1.2-1.4x faster than its AVX2 ones, so they stay);
/// [`set_own_sgemm`] overrides.
pub(crate) fn own_sgemm() -> bool {
    match OWN_SGEMM.load(std::sync::atomic::Ordering::Relaxed) {
        0 => false,
        1 => true,
        _ => super::sgemm::available() && !super::has_avx512(),
    }
}

/// Chooses between nn-core's AVX2 micro-kernel (true; only where the CPU has AVX2+FMA) and
/// the `gemm` crate (false) for the linear layers' products, to compare the two.
#[doc(hidden)]
pub fn set_own_sgemm(on: bool) {
    let v = if on && super::sgemm::available() { 1 } else { 0 };
    OWN_SGEMM.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// `out[rows, n] = x[rows, k] * rhs[k, n] (+ bias)`, rows split over rayon's threads; `rhs`
/// is the `k x n` view of the slice with row stride `rs` and column stride `cs`.
#[allow(clippy::too_many_arguments)]
fn rows_times(x: &[f32], rows: usize, k: usize, rhs: &[f32], rs: usize, cs: usize, n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let len = rows * n;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    #[cfg(target_arch = "x86_64")]
    if len > 0 && own_sgemm() {
        let packed = super::sgemm::PackedRhs::new(rhs, rs, cs, k, n);
        let rb = rows.div_ceil(2 * rayon::current_num_threads()).max(super::sgemm::MR);
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(rb * n)
            .enumerate()
            .for_each(|(t, o)| {
                let r = o.len() / n;
                let dst = o.as_mut_ptr() as *mut f32;
                // SAFETY: the CPU has AVX2+FMA (own_sgemm), x holds rows t*rb..t*rb+r of k
                // values, dst this task's r x n block (written, not read: no accumulation).
                unsafe { super::sgemm::gemm_rows(r, x[t * rb * k..].as_ptr(), k, &packed, bias, dst, n, false) };
            });
        // SAFETY: every row block was written by gemm_rows.
        unsafe { out.set_len(len) };
        return out;
    }
    if len > 0 {
        let rb = rows_per_task(rows, k, n);
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(rb * n)
            .enumerate()
            .for_each(|(t, o)| {
                let r = o.len() / n;
                if let Some(b) = bias {
                    for row in o.chunks_exact_mut(n) {
                        for (d, &v) in row.iter_mut().zip(b) {
                            d.write(v);
                        }
                    }
                }
                // (taken after the bias writes, which reborrow `o`)
                let dst = o.as_mut_ptr() as *mut f32;
                let lhs = Mat::rm(&x[t * rb * k..], k);
                let rhs = Mat {
                    ptr: rhs.as_ptr(),
                    rs: rs as isize,
                    cs: cs as isize,
                };
                // SAFETY: lhs covers rows t*rb.. of x (r x k), rhs the k x n view checked by the
                // caller, dst this task's r x n block (initialised above when accumulating).
                unsafe { gemm(r, n, k, dst, n, bias.is_some(), lhs, rhs, gemm::Parallelism::None) };
            });
    }
    // SAFETY: every row block was written by its gemm (or is empty).
    unsafe { out.set_len(len) };
    out
}

/// `dW[n, k] = g^T x` for `g [rows, n]`, `x [rows, k]`, split over blocks of the `n` outputs.
fn weight_grad(g: &[f32], x: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
    let len = n * k;
    if rows == 0 {
        // no rows: the gradient is zero (and `g` is empty, so no column views to take)
        return vec![0.0; len];
    }
    let mut dw: Vec<f32> = Vec::with_capacity(len);
    if len > 0 {
        let nb = n.div_ceil(2 * rayon::current_num_threads()).max(8);
        dw.spare_capacity_mut()[..len]
            .par_chunks_mut(nb * k)
            .enumerate()
            .for_each(|(t, o)| {
                let cnt = o.len() / k;
                let lhs = Mat {
                    ptr: g[t * nb..].as_ptr(),
                    rs: 1,
                    cs: n as isize,
                };
                // SAFETY: lhs is the (cnt x rows) transpose view of columns t*nb.. of g, rhs x
                // (rows x k), dst this task's cnt x k block, which gemm writes whole.
                unsafe {
                    gemm(
                        cnt,
                        k,
                        rows,
                        o.as_mut_ptr() as *mut f32,
                        k,
                        false,
                        lhs,
                        Mat::rm(x, k),
                        gemm::Parallelism::None,
                    )
                };
            });
    }
    // SAFETY: every block of outputs was written above (or there are none).
    unsafe { dw.set_len(len) };
    dw
}

/// Column sums of `g [rows, n]`: one partial sum per chunk of 256 rows (a size that does not
/// depend on the thread count), added in chunk order, so the result is the same on any
/// number of threads.
fn bias_grad(g: &[f32], rows: usize, n: usize) -> Vec<f32> {
    let mut total = vec![0f32; n];
    if n == 0 || rows == 0 {
        return total;
    }
    let rb = 256;
    let parts: Vec<Vec<f32>> = g
        .par_chunks(rb * n)
        .map(|c| {
            let mut s = vec![0f32; n];
            for row in c.chunks_exact(n) {
                for (a, &v) in s.iter_mut().zip(row) {
                    *a += v;
                }
            }
            s
        })
        .collect();
    for p in parts {
        for (x, y) in total.iter_mut().zip(p) {
            *x += y;
        }
    }
    total
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("linear: contiguous f32 {what} expected"),
    }
}

/// Shapes `(rows, k, n)` of `x [rows, k]` and `w [n, k]`, checked.
fn dims(lx: &Layout, lw: &Layout) -> Result<(usize, usize, usize)> {
    match (lx.dims(), lw.dims()) {
        (&[rows, k], &[n, kw]) if k == kw => Ok((rows, k, n)),
        (a, b) => candle_core::bail!("linear: input {a:?} does not match weight {b:?} (want [rows, in] and [out, in])"),
    }
}

fn with_cpu<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(s) = &*s else {
        candle_core::bail!("linear: {what} must be on the CPU");
    };
    f(contiguous_f32(s, l, what)?)
}

/// The two input gradients shared by both ops.
fn grads_x_w(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let (rows, k, n) = dims(x.layout(), w.layout())?;
    let dev = x.device();
    with_cpu(g, "gradient", |gv| {
        let dx = with_cpu(w, "weight", |wv| Ok(rows_times(gv, rows, n, wv, k, 1, k, None)))?;
        let dw = with_cpu(x, "input", |xv| Ok(weight_grad(gv, xv, rows, n, k)))?;
        Ok((Tensor::from_vec(dx, (rows, k), dev)?, Tensor::from_vec(dw, (n, k), dev)?))
    })
}

struct LinearNoBias;

impl CustomOp2 for LinearNoBias {
    fn name(&self) -> &'static str {
        "nn-core-linear"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, k, n) = dims(l1, l2)?;
        let (x, w) = (contiguous_f32(s1, l1, "input")?, contiguous_f32(s2, l2, "weight")?);
        Ok((CpuStorage::F32(rows_times(x, rows, k, w, 1, k, n, None)), Shape::from((rows, n))))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = grads_x_w(x, w, g)?;
        Ok((Some(dx), Some(dw)))
    }
}

struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "nn-core-linear-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k, n) = dims(l1, l2)?;
        let (x, w, b) = (
            contiguous_f32(s1, l1, "input")?,
            contiguous_f32(s2, l2, "weight")?,
            contiguous_f32(s3, l3, "bias")?,
        );
        if b.len() != n {
            candle_core::bail!("linear: bias has {} entries for {n} outputs", b.len());
        }
        Ok((CpuStorage::F32(rows_times(x, rows, k, w, 1, k, n, Some(b))), Shape::from((rows, n))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = grads_x_w(x, w, g)?;
        let (rows, _, n) = dims(x.layout(), w.layout())?;
        let db = with_cpu(g, "gradient", |gv| Ok(bias_grad(gv, rows, n)))?;
        Ok((Some(dx), Some(dw), Some(Tensor::from_vec(db, n, x.device())?)))
    }
}

/// `x W^T + b` over the last dimension of `x` (`[..., in]`, weight `[out, in]`, bias `[out]`),
/// with gradients to all three. CPU f32 runs the fused op above; other devices and dtypes
/// candle's matmul and broadcast add.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let d = x.dims().to_vec();
    let Some((&k, lead)) = d.split_last() else {
        candle_core::bail!("linear: input must have at least one dimension, got a scalar");
    };
    if w.rank() != 2 || w.dims()[1] != k {
        candle_core::bail!(
            "linear: input {d:?} does not match weight {:?} (want [..., in] and [out, in])",
            w.dims()
        );
    }
    let n = w.dims()[0];
    if let Some(b) = b {
        if b.dims() != [n] {
            candle_core::bail!("linear: bias {:?} does not match {n} outputs", b.dims());
        }
    }
    let rows: usize = lead.iter().product();
    let x2 = x.reshape((rows, k))?;
    let fast = x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && b.is_none_or(|b| b.dtype() == DType::F32);
    let y = if fast {
        let (x2, w) = (x2.contiguous()?, w.contiguous()?);
        match b {
            Some(b) => x2.apply_op3(&w, &b.contiguous()?, LinearBias)?,
            None => x2.apply_op2(&w, LinearNoBias)?,
        }
    } else {
        let y = x2.matmul(&w.t()?)?;
        match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }
    };
    let mut out = lead.to_vec();
    out.push(n);
    y.reshape(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::testing::max_abs_diff(a, b).unwrap()
    }

    /// Values and all three gradients equal candle's composed form, for 3-d inputs, with and
    /// without bias, row counts that do not divide into the tasks, and tiny shapes.
    #[test]
    fn equals_candle_matmul_plus_bias_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for &(lead, k, n) in &[
            ((2usize, 37usize), 19usize, 23usize),
            ((1, 1), 1, 1),
            ((3, 50), 64, 8),
            ((1, 5), 3, 40),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (lead.0, lead.1, k), &dev)?)?;
            let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, k), &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, n, &dev)?)?;
            let probe = Tensor::randn(0f32, 1.0, (lead.0, lead.1, n), &dev)?;
            for with_bias in [true, false] {
                let bias = with_bias.then(|| b.as_tensor());
                let fast = linear(x.as_tensor(), w.as_tensor(), bias)?;
                let mut slow = x.as_tensor().broadcast_matmul(&w.as_tensor().t()?)?;
                if let Some(bb) = bias {
                    slow = slow.broadcast_add(bb)?;
                }
                assert!(max_diff(&fast, &slow) < 1e-4, "value {lead:?} {k} {n}");
                let gf = fast.mul(&probe)?.sum_all()?.backward()?;
                let gs = slow.mul(&probe)?.sum_all()?.backward()?;
                let mut vars = vec![&x, &w];
                if with_bias {
                    vars.push(&b);
                }
                for v in vars {
                    let d = max_diff(gf.get(v.as_tensor()).unwrap(), gs.get(v.as_tensor()).unwrap());
                    assert!(d < 1e-3, "gradient {lead:?} {k} {n}: {d}");
                }
            }
        }
        Ok(())
    }

    /// No rows (an empty batch): zero-size output, zero weight and bias gradients; a
    /// transposed (non-contiguous) weight view is accepted.
    #[test]
    fn empty_batches_and_strided_weights() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::zeros((2, 0, 5), DType::F32, &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (9, 5), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 9, &dev)?)?;
        let y = linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()))?;
        assert_eq!(y.dims(), &[2, 0, 9]);
        let g = y.sum_all()?.backward()?;
        assert_eq!(g.get(w.as_tensor()).unwrap().dims(), &[9, 5]);
        assert_eq!(g.get(w.as_tensor()).unwrap().abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        assert_eq!(g.get(b.as_tensor()).unwrap().abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        let xs = Tensor::randn(0f32, 1.0, (4, 6), &dev)?;
        let wt = Tensor::randn(0f32, 1.0, (6, 3), &dev)?.t()?;
        assert!(max_diff(&linear(&xs, &wt, None)?, &xs.matmul(&wt.t()?)?) < 1e-5);
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_named() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((4, 5), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((3, 6), DType::F32, &dev).unwrap();
        let e = linear(&x, &w, None).unwrap_err().to_string();
        assert!(e.contains("[4, 5]") && e.contains("[3, 6]"), "{e}");
        let w = Tensor::zeros((3, 5), DType::F32, &dev).unwrap();
        let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
        assert!(linear(&x, &w, Some(&b)).unwrap_err().to_string().contains("bias"));
    }
}
