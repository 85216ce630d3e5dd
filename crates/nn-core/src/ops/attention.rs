//! Scaled dot-product attention, `softmax(Q K^T * scale + bias) V` (Vaswani et al. 2017, Eq. (1);
//! Eq. (1) of the vision-transformer survey), as two fused CPU kernels:
//!
//! 1. [`attention_probs`]: per (batch, head) one matrix product `Q K^T` read through the
//!    strides of `q` and `k` (heads split out of a `qkv` projection by a permute are not copied),
//!    then, in the same task while the score tile is in cache, the scale, the bias and the row
//!    softmax.
//! 2. [`attend`]: `P V` per (batch, head), written straight into token layout `[B, Nq, H, dv]`,
//!    so that merging the heads afterwards (`transpose(1, 2)` + `reshape`) needs no copy.
//!
//! # Why
//! Composed from separate ops, the same attention copied q, k and v into contiguous heads, ran
//! the softmax as a second pass over a scores tensor, and copied the transposed output back
//! into token layout: in a ViT-Ti forward, copies took 13% of the time on an AVX-512 machine
//! (`perf record` of `cargo xtask vit bench`), about 2% on an AVX2 one whose matrix products
//! are slower (docs/results/vit-survey-zoo.md has the measurements).
//!
//! # Backward
//! With `S = scale Q K^T + bias`, `P = softmax(S)`, `O = P V` and `dO` given:
//! `dV = P^T dO`, `dP = dO V^T`, `dS = P (dP - rowsum(dP P))`, `dQ = scale dS K`,
//! `dK = scale dS^T Q` and `dbias = dS` (summed over the dimensions the bias was broadcast
//! along by candle's `broadcast_as` backward). The products run through [`batched_matmul`],
//! which also reads strided operands in place.
//!
//! Other devices and dtypes take the composed form, which has the same gradients.

use crate::ops::elem::{gemm, Mat};
use crate::ops::matmul::{batch_matrix, batched_matmul, check_inside, BatchIndex};
use crate::ops::rowwise::{scaled_softmax_rows_inplace, softmax_last_dim, SoftmaxGrad};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

fn f32_data<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("{what}: f32 expected"),
    }
}

/// `(leading dimensions, rows, columns)` of a `[..., H, N, d]` layout (at least 4 dimensions:
/// batch dimensions, heads, tokens, features; Swin's windows are `[B, windows, H, N, d]`).
fn split_dims<'a>(l: &'a Layout, what: &str) -> Result<(&'a [usize], usize, usize)> {
    match l.dims() {
        [lead @ .., n, d] if lead.len() >= 2 => Ok((lead, *n, *d)),
        other => candle_core::bail!("{what}: expected at least 4 dimensions [..., H, N, d], got {other:?}"),
    }
}

/// An output pointer shared by parallel tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every task writes only its own (batch, head) block.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `c = a b` for one (batch, head): a single-threaded `gemm` (the tasks run in parallel).
///
/// Plain loops for TNT's tiny inner heads (16 tokens of width 6) were tried in place of `gemm`
/// for products below 8192 multiply-adds and took more of a TNT-S forward (7.2% against 4.7%
/// in `perf record` of `cargo xtask vit bench --models tnt_s_patch16_224`), so every size goes
/// through `gemm`.
///
/// # Safety
/// The views must cover `m x k`, `k x n` and `m x n` elements of live buffers.
///
/// Where the linear layers use nn-core's AVX2 micro-kernel (`ops::sgemm`), so does this
/// product when `a`'s rows are contiguous: `b` is packed per call (at most `k x n` values, a
/// few percent of the product's work).
unsafe fn product(m: usize, n: usize, k: usize, c: *mut f32, ldc: usize, a: Mat<f32>, b: Mat<f32>) {
    #[cfg(target_arch = "x86_64")]
    if a.cs == 1 && a.rs >= 0 && b.rs >= 0 && b.cs >= 0 && super::linear::own_sgemm() {
        let packed = super::sgemm::PackedRhs::from_ptr(b.ptr, b.rs as usize, b.cs as usize, k, n, false);
        super::sgemm::gemm_rows(m, a.ptr, a.rs as usize, &packed, None, c, ldc, false);
        return;
    }
    gemm(m, n, k, c, ldc, false, a, b, gemm::Parallelism::None)
}

/// `softmax(Q K^T * scale + bias)`; implemented as a 2-input op (no bias) and a 3-input one.
struct ScoresSoftmax {
    scale: f32,
}

impl ScoresSoftmax {
    fn forward(&self, q: &[f32], lq: &Layout, k: &[f32], lk: &Layout, bias: Option<(&[f32], &Layout)>) -> Result<(CpuStorage, Shape)> {
        let (lead, nq, d) = split_dims(lq, "attention scores (q)")?;
        let (lead_k, nk, dk) = split_dims(lk, "attention scores (k)")?;
        if (lead_k, dk) != (lead, d) {
            candle_core::bail!("attention scores: q {:?} and k {:?} do not match", lq.dims(), lk.dims());
        }
        let mut out_dims = lead.to_vec();
        out_dims.extend([nq, nk]);
        check_inside(lq, q.len(), "attention scores (q)")?;
        check_inside(lk, k.len(), "attention scores (k)")?;
        if let Some((bs, lb)) = bias {
            if lb.dims() != out_dims {
                candle_core::bail!("attention scores: bias {:?} is not [..., H, Nq, Nk] = {out_dims:?}", lb.dims());
            }
            check_inside(lb, bs.len(), "attention scores (bias)")?;
        }
        let (iq, ik) = (BatchIndex::of(lq), BatchIndex::of(lk));
        let ib = bias.map(|(_, lb)| BatchIndex::of(lb));
        let len = out_dims.iter().product();
        let mut out: Vec<f32> = Vec::with_capacity(len);
        if nq * nk > 0 {
            out.spare_capacity_mut()[..len]
                .par_chunks_mut(nq * nk)
                .enumerate()
                .for_each_init(Vec::new, |gathered, (i, p)| {
                    let p = p.as_mut_ptr() as *mut f32;
                    let (lhs, rhs) = (batch_matrix(q, lq, &iq, i, false), batch_matrix(k, lk, &ik, i, true));
                    // SAFETY: every element read lies inside q and k (checked above); `p` is
                    // this task's nq x nk block, written whole by the product.
                    unsafe { product(nq, nk, d, p, nk, lhs, rhs) };
                    let p = unsafe { std::slice::from_raw_parts_mut(p, nq * nk) };
                    let bias_rows = match (bias, &ib) {
                        (Some((bs, lb)), Some(ib)) => {
                            let off = lb.start_offset() + ib.offset(i);
                            let r = lb.stride().len();
                            let (rs, cs) = (lb.stride()[r - 2], lb.stride()[r - 1]);
                            if rs == nk && cs == 1 {
                                Some(&bs[off..off + nq * nk])
                            } else {
                                // a broadcast or transposed bias: gather this block's rows
                                gathered.clear();
                                gathered.extend((0..nq * nk).map(|j| bs[off + (j / nk) * rs + (j % nk) * cs]));
                                Some(&gathered[..])
                            }
                        }
                        _ => None,
                    };
                    scaled_softmax_rows_inplace(p, nk, self.scale, bias_rows);
                });
        }
        // SAFETY: every (batch, head) block was written above (or the output is empty).
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }

    /// `(dQ, dK, dS)` from `P` (the output) and `dP`.
    fn backward(&self, q: &Tensor, k: &Tensor, p: &Tensor, dp: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let ds = p.apply_op2_no_bwd(&dp.contiguous()?, &SoftmaxGrad)?;
        let ds_scaled = (&ds * self.scale as f64)?;
        let dq = batched_matmul(&ds_scaled, k)?;
        let dk = batched_matmul(&ds_scaled.transpose(D::Minus2, D::Minus1)?, q)?;
        Ok((dq, dk, ds))
    }
}

impl CustomOp2 for ScoresSoftmax {
    fn name(&self) -> &'static str {
        "attention-scores-softmax"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward(f32_data(s1, "attention scores")?, l1, f32_data(s2, "attention scores")?, l2, None)
    }
    fn bwd(&self, q: &Tensor, k: &Tensor, p: &Tensor, dp: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, _) = self.backward(q, k, p, dp)?;
        Ok((Some(dq), Some(dk)))
    }
}

impl CustomOp3 for ScoresSoftmax {
    fn name(&self) -> &'static str {
        "attention-scores-bias-softmax"
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
        let what = "attention scores";
        self.forward(f32_data(s1, what)?, l1, f32_data(s2, what)?, l2, Some((f32_data(s3, what)?, l3)))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        _bias: &Tensor,
        p: &Tensor,
        dp: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, ds) = self.backward(q, k, p, dp)?;
        Ok((Some(dq), Some(dk), Some(ds)))
    }
}

/// `P V` written in token layout `[..., Nq, H, dv]`.
struct AttendValues;

impl CustomOp2 for AttendValues {
    fn name(&self) -> &'static str {
        "attention-attend-values"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (p, v) = (f32_data(s1, "attention values")?, f32_data(s2, "attention values")?);
        let (lead, nq, nk) = split_dims(l1, "attention values (probabilities)")?;
        let (lead_v, nkv, dv) = split_dims(l2, "attention values (v)")?;
        if (lead_v, nkv) != (lead, nk) {
            candle_core::bail!("attention values: probabilities {:?} and v {:?} do not match", l1.dims(), l2.dims());
        }
        // heads: the last leading dimension; b: all the others together
        let h = lead[lead.len() - 1];
        let b = lead[..lead.len() - 1].iter().product::<usize>();
        let mut out_dims = lead[..lead.len() - 1].to_vec();
        out_dims.extend([nq, h, dv]);
        check_inside(l1, p.len(), "attention values (probabilities)")?;
        check_inside(l2, v.len(), "attention values (v)")?;
        let (ip, iv) = (BatchIndex::of(l1), BatchIndex::of(l2));
        let len = b * nq * h * dv;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let dst = SharedOut(out.as_mut_ptr());
        if len > 0 {
            (0..b * h).into_par_iter().for_each(|i| {
                let (bi, hi) = (i / h, i % h);
                let (lhs, rhs) = (batch_matrix(p, l1, &ip, i, false), batch_matrix(v, l2, &iv, i, false));
                // SAFETY: reads checked above; head `hi` of image `bi` is an nq x dv block with
                // row stride h * dv that no other task writes.
                unsafe { product(nq, dv, nk, dst.at(bi * nq * h * dv + hi * dv), h * dv, lhs, rhs) };
            });
        }
        // SAFETY: every (batch, head) block was written above (or the output is empty).
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
    fn bwd(&self, p: &Tensor, v: &Tensor, _o: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let r = g.rank();
        let g = g.transpose(r - 3, r - 2)?; // [..., H, Nq, dv]
        let dp = batched_matmul(&g, &v.transpose(D::Minus2, D::Minus1)?)?;
        let dv = batched_matmul(&p.transpose(D::Minus2, D::Minus1)?, &g)?;
        Ok((Some(dp), Some(dv)))
    }
}

fn fused(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() >= 4)
}

/// The attention matrix `softmax(Q K^T * scale + bias)`, `[B, H, Nq, Nk]`, with gradients.
///
/// `q`: `[B, H, Nq, d]`, `k`: `[B, H, Nk, d]` (any strides); `bias` broadcasts to
/// `[B, H, Nq, Nk]` (a relative position bias, a mask). More leading dimensions work alike
/// (`[B, W, H, N, d]`: Swin's windows, whose mask depends on the window `W` but not on the
/// image `B`, so that it broadcasts instead of being tiled over the batch).
pub fn attention_probs(q: &Tensor, k: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    if fused(&[q, k]) && bias.is_none_or(|b| b.device().is_cpu() && b.dtype() == DType::F32) {
        let op = ScoresSoftmax { scale: scale as f32 };
        return match bias {
            None => q.apply_op2(k, op),
            Some(bias) => {
                let mut dims = q.dims().to_vec();
                let r = dims.len();
                dims[r - 1] = k.dims()[r - 2];
                let bias = bias.broadcast_as(dims)?;
                q.apply_op3(k, &bias, op)
            }
        };
    }
    let q = (q.contiguous()? * scale)?;
    let kt = k.contiguous()?.transpose(candle_core::D::Minus2, candle_core::D::Minus1)?;
    let mut s = batched_matmul(&q, &kt)?;
    if let Some(b) = bias {
        s = s.broadcast_add(b)?;
    }
    softmax_last_dim(&s)
}

/// `P V` for `p`: `[B, H, Nq, Nk]` and `v`: `[B, H, Nk, dv]`, returned as `[B, H, Nq, dv]`
/// (or with more leading dimensions, `[..., H, Nq, dv]`).
///
/// On the fused path the result is a `transpose(1, 2)` view of a contiguous `[B, Nq, H, dv]`
/// tensor: `o.transpose(1, 2)?.reshape((B, Nq, H * dv))` merges the heads without a copy.
pub fn attend(p: &Tensor, v: &Tensor) -> Result<Tensor> {
    if fused(&[p, v]) {
        let r = p.rank();
        return p.apply_op2(v, AttendValues)?.transpose(r - 3, r - 2);
    }
    batched_matmul(&p.contiguous()?, &v.contiguous()?)
}

/// `softmax(Q K^T * scale + bias) V`: [`attention_probs`] then [`attend`]; `[B, H, Nq, dv]`.
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    attend(&attention_probs(q, k, scale, bias)?, v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()
    }

    /// The composed reference in f64 (the fused kernels take only f32).
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
        let s = (q.contiguous()?.matmul(&k.contiguous()?.t()?.contiguous()?)? * scale)?;
        let s = match bias {
            Some(b) => s.broadcast_add(b)?,
            None => s,
        };
        let last = s.rank() - 1;
        let m = s.max_keepdim(last)?;
        let e = s.broadcast_sub(&m)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(last)?)?.matmul(&v.contiguous()?)
    }

    /// q, k, v split out of one `[B, N, 3, H, d]` projection by a permute (the layout of every
    /// ViT), a bias broadcast over the batch, and a fixed weighting of the output: values and
    /// all four gradients equal the f64 composed reference (a few tokens, and more tokens than
    /// one register tile of `gemm`).
    #[test]
    fn fused_attention_equals_composed_reference_on_strided_heads() -> Result<()> {
        for (n, d) in [(7, 5), (40, 8)] {
            check_against_reference(3, n, 2, d)?;
        }
        Ok(())
    }

    fn check_against_reference(b: usize, n: usize, h: usize, d: usize) -> Result<()> {
        let dev = Device::Cpu;
        let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, 3 * h * d), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, (h, n, n), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?;
        let heads = |t: &Tensor| -> Result<(Tensor, Tensor, Tensor)> {
            let t = t.reshape((b, n, 3, h, d))?.permute((2, 0, 3, 1, 4))?;
            Ok((t.get(0)?, t.get(1)?, t.get(2)?))
        };
        let scale = 0.37;
        for with_bias in [false, true] {
            let (q, k, v) = heads(qkv.as_tensor())?;
            let bias_t = with_bias.then(|| bias.as_tensor().clone());
            let fast = scaled_dot_product_attention(&q, &k, &v, scale, bias_t.as_ref())?;
            assert_eq!(fast.dims(), [b, h, n, d]);
            let loss = fast.mul(&w)?.sum_all()?;
            let grads = loss.backward()?;

            let qkv64 = Var::from_tensor(&qkv.as_tensor().to_dtype(DType::F64)?)?;
            let bias64 = Var::from_tensor(&bias.as_tensor().to_dtype(DType::F64)?)?;
            let (q, k, v) = heads(qkv64.as_tensor())?;
            let slow = reference(&q, &k, &v, scale, with_bias.then(|| bias64.as_tensor()))?;
            let grads64 = slow.mul(&w.to_dtype(DType::F64)?)?.sum_all()?.backward()?;

            assert!(max_diff(&fast, &slow)? < 1e-5, "values, bias {with_bias}");
            let gq = grads.get(qkv.as_tensor()).expect("gradient of qkv");
            assert!(
                max_diff(gq, grads64.get(qkv64.as_tensor()).unwrap())? < 1e-4,
                "d qkv, bias {with_bias}"
            );
            if with_bias {
                let gb = grads.get(bias.as_tensor()).expect("gradient of the bias");
                assert!(max_diff(gb, grads64.get(bias64.as_tensor()).unwrap())? < 1e-4, "d bias");
            }
        }
        Ok(())
    }

    /// Heads are merged by `transpose(1, 2)` + `reshape` without a copy, different query and
    /// key lengths work (PVT's reduced keys), and mismatched shapes are refused by name.
    /// Five dimensions `[B, W, H, N, d]` (Swin's windows) with a bias `[W, H, N, N]` that
    /// broadcasts over `B`: values and the gradients of q, k, v and the bias against the f64
    /// composed reference.
    #[test]
    fn fused_attention_takes_extra_batch_dimensions() -> Result<()> {
        let dev = Device::Cpu;
        let (b, w, h, n, d) = (2usize, 3usize, 2usize, 6usize, 4usize);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, w, n, 3, h, d), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, (w, h, n, n), &dev)?)?;
        let weight = Tensor::randn(0f32, 1.0, (b, w, h, n, d), &dev)?;
        let heads = |x: &Tensor, i: usize| x.permute((3, 0, 1, 4, 2, 5))?.get(i);
        let xs = x.as_tensor();
        let fast = scaled_dot_product_attention(&heads(xs, 0)?, &heads(xs, 1)?, &heads(xs, 2)?, 0.4, Some(bias.as_tensor()))?;
        let x64 = Var::from_tensor(&xs.to_dtype(DType::F64)?)?;
        let bias64 = Var::from_tensor(&bias.as_tensor().to_dtype(DType::F64)?)?;
        let xd = x64.as_tensor();
        // the reference on [B * W, H, N, d] with the bias tiled over the images (candle's
        // matmul takes at most two batch dimensions)
        let flat = |t: Tensor| t.contiguous()?.reshape((b * w, h, n, d));
        let tiled = bias64
            .as_tensor()
            .unsqueeze(0)?
            .broadcast_as((b, w, h, n, n))?
            .reshape((b * w, h, n, n))?;
        let slow = reference(
            &flat(heads(xd, 0)?)?,
            &flat(heads(xd, 1)?)?,
            &flat(heads(xd, 2)?)?,
            0.4,
            Some(&tiled),
        )?
        .reshape((b, w, h, n, d))?;
        assert_eq!(fast.dims(), [b, w, h, n, d]);
        assert!(max_diff(&fast, &slow)? < 1e-5, "values");
        let gf = fast.mul(&weight)?.sum_all()?.backward()?;
        let gs = slow.mul(&weight.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
        assert!(max_diff(gf.get(xs).unwrap(), gs.get(xd).unwrap())? < 1e-4, "d qkv");
        assert!(
            max_diff(gf.get(bias.as_tensor()).unwrap(), gs.get(bias64.as_tensor()).unwrap())? < 1e-4,
            "d bias"
        );
        Ok(())
    }

    #[test]
    fn output_is_token_layout_and_shapes_are_checked() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 6, 4), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 2, 4), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 2, 5), &dev)?;
        let o = scaled_dot_product_attention(&q, &k, &v, 0.5, None)?;
        assert_eq!(o.dims(), [2, 3, 6, 5]);
        assert!(o.transpose(1, 2)?.is_contiguous());
        let r = reference(&q, &k, &v, 0.5, None)?;
        assert!(max_diff(&o, &r)? < 1e-5);
        let e = attention_probs(&q, &Tensor::zeros((2, 3, 2, 3), DType::F32, &dev)?, 1.0, None).unwrap_err();
        assert!(e.to_string().contains("do not match"), "{e}");
        let e = attend(
            &attention_probs(&q, &k, 1.0, None)?,
            &Tensor::zeros((2, 3, 4, 5), DType::F32, &dev)?,
        )
        .unwrap_err();
        assert!(e.to_string().contains("do not match"), "{e}");
        Ok(())
    }
}
