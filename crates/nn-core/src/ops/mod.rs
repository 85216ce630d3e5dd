//! Fast CPU convolution and pooling kernels with backward passes, as candle custom ops.
//!
//! # Why
//! Stock candle 0.11 runs CPU convolutions several times slower than PyTorch and computes
//! the input gradient with a direct-loop transposed convolution; its pooling backward only
//! works for `kernel == stride` without padding. Training the compact vision networks on a
//! 2-core CPU needs both to be fast and complete.
//!
//! # Algorithm
//! * **Forward** ([`conv2d`]): for each image (and group), the receptive fields are
//!   unrolled into a column matrix `col[K, OH*OW]` with `K = Cin/groups * kh * kw`
//!   (*im2col*, written row by row into a reused thread-local buffer, padding written as
//!   zeros so the buffer is never cleared), and the output plane block is the matrix product
//!   `W[Cout/groups, K] x col`, written by `gemm` straight into the NCHW output. A 1x1,
//!   stride-1, unpadded convolution skips im2col (the input planes already are `col`).
//!   This turns the convolution into a large matrix multiplication, which runs close to
//!   peak on the CPU's FMA units, instead of a memory-bound loop nest.
//! * **Input gradient**: `grad_col = W^T x grad_out[n]`, then *col2im* scatter-adds each
//!   column back to the input positions it was read from (handles stride, padding and
//!   dilation exactly, also overlapping windows).
//! * **Weight gradient**: `grad_W = sum_n grad_out[n] x col[n]^T`. The columns are
//!   recomputed (cheaper than keeping `N` column matrices alive); each worker thread owns a
//!   partial sum over a contiguous chunk of the batch, reduced at the end.
//! * **3x3, stride 1**, ungrouped: Winograd F(2x2, 3x3) (Lavin & Gray 2016, module
//!   `winograd`): 16 gemms over transformed 4x4 tiles, 2.25x fewer multiplications than
//!   im2col. Used for the forward pass from 32 channels in and out (the input gradient of
//!   such a layer is itself such a convolution, so it takes the same path) and for the
//!   weight gradient from 8. [`set_winograd`] turns it off (im2col only).
//! * **Depthwise** convolutions (`groups == Cin`, `Cout` a multiple of `Cin`) would become
//!   tiny `1 x k` products, so they use direct, vectorised row-loop kernels instead.
//! * The batch loop is parallel with rayon (each gemm single-threaded); with a batch of one
//!   the gemm itself runs in parallel. Inner loops are compiled for AVX2/FMA and selected
//!   at run time, because the crate is built for baseline x86-64.
//!
//! `gemm` (the same crate candle's CPU matmul uses) provides the packed, cache-blocked
//! matrix kernels; `rayon` provides the data parallelism, so callers control the thread
//! count with `ThreadPool::install` or `RAYON_NUM_THREADS`.
//!
//! # Devices and dtypes
//! The custom ops run on CPU for `f32` and `f64` (the latter is useful for finite
//! difference checks). Gradients flow through [`candle_core::Tensor::backward`]: the
//! backward of each op is computed by further custom ops (not differentiable again). On other
//! devices or dtypes, convolution falls back to candle's own `conv2d` when the parameters
//! are expressible there (square stride/padding/dilation), otherwise the tensors are moved
//! to CPU/f32, processed and moved back (both moves have backward in candle); pooling
//! always takes the move-to-CPU route.
//!
//! # Other kernels
//! * [`activation`]: single-pass ReLU and its backward.
//! * [`batch_norm`]: BatchNorm's fused training-mode forward and backward.
//! * [`rowwise`]: softmax, layer normalisation and exact GELU over the last dimension, fused
//!   and multi-threaded (vectorised `exp`/`erfc`), with backward.
//! * [`matmul`]: batched matrix products parallel over the batch (attention heads, windows).
//! * [`attention`]: scaled dot-product attention as two fused kernels reading heads in place.
//! * [`transpose`]: blocked, multi-threaded contiguous transpose of the last two dimensions.
//! * [`depthwise_tokens`]: depthwise convolution on channels-last tokens, with backward.
//! * `sgemm` (internal): an AVX2+FMA 6 x 16 micro-kernel over a packed right-hand side, used by
//!   [`linear`] on AVX2 machines without AVX-512 (faster than the `gemm` crate there).
//! * [`conv2d_input_grad`] / [`conv2d_weight_grad`]: the convolution's gradient kernels
//!   without autograd, for layers that recompute a convolution and for benchmarks.

pub mod activation;
pub mod attention;
pub mod batch_norm;
pub mod channel;
mod conv;
mod depthwise;
pub mod depthwise_tokens;
mod elem;
pub mod linear;
pub mod matmul;
mod pool;
pub mod rowwise;
mod sgemm;
pub mod transpose;
mod winograd;

use candle_core::{DType, Device, Result, Tensor};
pub use conv::{set_winograd, winograd_enabled};
use std::sync::Arc;

/// Whether the vectorised kernels (`simd_dispatch!`) take their AVX-512 build: the CPU has
/// AVX-512 F/BW/DQ/VL and the environment variable `NN_CORE_NO_AVX512` is unset (set it to
/// compare against the AVX2 build on the same machine). Read once.
#[doc(hidden)]
pub fn has_avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var_os("NN_CORE_NO_AVX512").is_none()
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512dq")
                && std::is_x86_feature_detected!("avx512vl")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Parameters of [`conv2d`]; all pairs are `(height, width)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Conv2dOpts {
    /// Step between neighbouring output positions.
    pub stride: (usize, usize),
    /// Zero padding added on both sides.
    pub padding: (usize, usize),
    /// Spacing between kernel taps.
    pub dilation: (usize, usize),
    /// Number of channel groups (`Cin` and `Cout` must be divisible by it).
    pub groups: usize,
}

impl Default for Conv2dOpts {
    fn default() -> Self {
        Self {
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }
}

impl Conv2dOpts {
    /// Output height and width for an `h x w` input and a `kh x kw` kernel (0 where the
    /// dilated kernel does not fit).
    pub fn output_hw(&self, h: usize, w: usize, kh: usize, kw: usize) -> (usize, usize) {
        let o = |i: usize, k: usize, s: usize, p: usize, d: usize| (i + 2 * p).saturating_sub(d * (k - 1) + 1) / s + 1;
        (
            o(h, kh, self.stride.0, self.padding.0, self.dilation.0),
            o(w, kw, self.stride.1, self.padding.1, self.dilation.1),
        )
    }

    /// Square stride and padding, no dilation, one group.
    pub fn new(stride: usize, padding: usize) -> Self {
        Self {
            stride: (stride, stride),
            padding: (padding, padding),
            ..Self::default()
        }
    }
    /// Same options with `groups` channel groups.
    pub fn with_groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }
    /// Same options with a square dilation.
    pub fn with_dilation(mut self, dilation: usize) -> Self {
        self.dilation = (dilation, dilation);
        self
    }
    fn square(&self) -> Option<(usize, usize, usize)> {
        let sq = |p: (usize, usize)| (p.0 == p.1).then_some(p.0);
        Some((sq(self.stride)?, sq(self.padding)?, sq(self.dilation)?))
    }
}

fn native(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Runs `f` on a CPU copy of `x` (f32 unless already f32/f64) and moves the result back.
fn via_cpu(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let dt = x.dtype();
    let work = if matches!(dt, DType::F32 | DType::F64) { dt } else { DType::F32 };
    let y = f(&x.to_device(&Device::Cpu)?.to_dtype(work)?)?;
    y.to_dtype(dt)?.to_device(x.device())
}

/// 2-D convolution of an NCHW input `x` with weight `w: [Cout, Cin/groups, kh, kw]`
/// (no bias), returning `[N, Cout, OH, OW]` with
/// `OH = (H + 2*ph - dh*(kh-1) - 1) / sh + 1` (same for width).
///
/// On CPU with f32/f64 this is an nn-core custom op (im2col + gemm, see the module doc)
/// with gradients for both `x` and `w`; non-contiguous inputs are made contiguous first.
/// On other devices it uses candle's `conv2d`, or a CPU round trip for non-square
/// parameters; other dtypes on CPU (bf16, f16) take the round trip through f32.
pub fn conv2d(x: &Tensor, w: &Tensor, opts: Conv2dOpts) -> Result<Tensor> {
    if native(x) && x.dtype() == w.dtype() && w.device().is_cpu() {
        // Validate early for a clear error message.
        conv::ConvGeom::new(x.dims(), w.dims(), &opts)?;
        let x = x.contiguous()?;
        let w = w.contiguous()?;
        return x.apply_op2(&w, conv::Conv2dOp(opts));
    }
    match opts.square() {
        // candle's CPU conv2d has no bf16/f16 matmul: those go through the f32 round trip
        Some((s, p, d)) if x.device().same_device(w.device()) && !x.device().is_cpu() => x.conv2d(w, p, s, d, opts.groups),
        _ => via_cpu(x, |xc| {
            let wc = w.to_device(&Device::Cpu)?.to_dtype(xc.dtype())?;
            conv2d(xc, &wc, opts)
        }),
    }
}

/// Gradients of [`conv2d`] for a given output gradient, without building an autograd
/// graph: `(d loss/d x, d loss/d w)` for `grad_out = d loss/d conv2d(x, w, opts)`.
/// See [`conv2d_input_grad`] and [`conv2d_weight_grad`] for one of the two.
pub fn conv2d_backward(x: &Tensor, w: &Tensor, grad_out: &Tensor, opts: Conv2dOpts) -> Result<(Tensor, Tensor)> {
    Ok((
        conv2d_input_grad(grad_out, w, x.dims(), opts)?,
        conv2d_weight_grad(x, grad_out, w.dims(), opts)?,
    ))
}

/// Checks `grad_out` against the output shape of a convolution of an `x_dims` input with a
/// `w_dims` weight.
fn check_grad_out(x_dims: &[usize], w_dims: &[usize], grad_out: &Tensor, opts: &Conv2dOpts) -> Result<conv::ConvGeom> {
    let g = conv::ConvGeom::new(x_dims, w_dims, opts)?;
    let (n, c, oh, ow) = g.out_dims();
    if grad_out.dims() != [n, c, oh, ow] {
        candle_core::bail!(
            "conv2d gradient: grad_out has shape {:?}, the convolution's output has [{n}, {c}, {oh}, {ow}]",
            grad_out.dims()
        );
    }
    Ok(g)
}

/// Input gradient of [`conv2d`]: `d loss/d x` (shape `x_dims`) for
/// `grad_out = d loss/d conv2d(x, w, opts)`, without an autograd graph.
///
/// On CPU with f32/f64 this is the same kernel as the backward pass of [`conv2d`] (useful
/// for layers that recompute a convolution in their own backward, and for timing the kernel
/// without autograd bookkeeping); elsewhere candle's autograd runs on
/// `sum(conv2d(0, w) * grad_out)` (the input gradient does not depend on `x`).
pub fn conv2d_input_grad(grad_out: &Tensor, w: &Tensor, x_dims: &[usize], opts: Conv2dOpts) -> Result<Tensor> {
    let g = check_grad_out(x_dims, w.dims(), grad_out, &opts)?;
    if native(grad_out) && w.dtype() == grad_out.dtype() && w.device().is_cpu() {
        return grad_out.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &conv::ConvInputGradOp(g));
    }
    let xv = candle_core::Var::zeros(x_dims, w.dtype(), w.device())?;
    let y = conv2d(xv.as_tensor(), &w.detach(), opts)?;
    let grads = (y * grad_out.detach())?.sum_all()?.backward()?;
    match grads.get(xv.as_tensor()) {
        Some(t) => Ok(t.clone()),
        None => xv.as_tensor().zeros_like(),
    }
}

/// Weight gradient of [`conv2d`]: `d loss/d w` (shape `w_dims`) for
/// `grad_out = d loss/d conv2d(x, w, opts)`, without an autograd graph (same kernel as the
/// backward pass of [`conv2d`] on CPU with f32/f64, candle's autograd elsewhere).
pub fn conv2d_weight_grad(x: &Tensor, grad_out: &Tensor, w_dims: &[usize], opts: Conv2dOpts) -> Result<Tensor> {
    let g = check_grad_out(x.dims(), w_dims, grad_out, &opts)?;
    if native(x) && grad_out.dtype() == x.dtype() && grad_out.device().is_cpu() {
        return x
            .contiguous()?
            .apply_op2_no_bwd(&grad_out.contiguous()?, &conv::ConvWeightGradOp(g));
    }
    let wv = candle_core::Var::zeros(w_dims, x.dtype(), x.device())?;
    let y = conv2d(&x.detach(), wv.as_tensor(), opts)?;
    let grads = (y * grad_out.detach())?.sum_all()?.backward()?;
    match grads.get(wv.as_tensor()) {
        Some(t) => Ok(t.clone()),
        None => wv.as_tensor().zeros_like(),
    }
}

fn pool(
    x: &Tensor,
    rows: impl FnOnce(usize) -> Result<Vec<pool::Win>>,
    cols: impl FnOnce(usize) -> Result<Vec<pool::Win>>,
    kind: pool::PoolKind,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let g = pool::PoolGeom {
        n,
        c,
        h,
        w,
        rows: rows(h)?,
        cols: cols(w)?,
        kind,
    };
    let g = Arc::new(g);
    if native(x) {
        x.contiguous()?.apply_op1(pool::PoolOp(g))
    } else {
        via_cpu(x, |xc| xc.contiguous()?.apply_op1(pool::PoolOp(g)))
    }
}

/// 2-D max pooling of an NCHW tensor with any `kernel`, `stride` and `padding`
/// (`(height, width)` pairs; padding at most half the kernel, as in PyTorch; padded
/// positions never win). Output size `(H + 2p - k) / s + 1`. The backward pass sends each
/// output gradient to the first maximal input of its window.
pub fn max_pool2d(x: &Tensor, kernel: (usize, usize), stride: (usize, usize), padding: (usize, usize)) -> Result<Tensor> {
    pool(
        x,
        |h| pool::fixed_windows(h, kernel.0, stride.0, padding.0, "max_pool2d"),
        |w| pool::fixed_windows(w, kernel.1, stride.1, padding.1, "max_pool2d"),
        pool::PoolKind::Max,
    )
}

/// 2-D average pooling with any `kernel`, `stride` and `padding` (`(height, width)`
/// pairs). With `count_include_pad` the divisor is the window size clipped to the padded
/// input (PyTorch's rule); otherwise it is the number of real input elements in the window.
pub fn avg_pool2d(
    x: &Tensor,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    count_include_pad: bool,
) -> Result<Tensor> {
    pool(
        x,
        |h| pool::fixed_windows(h, kernel.0, stride.0, padding.0, "avg_pool2d"),
        |w| pool::fixed_windows(w, kernel.1, stride.1, padding.1, "avg_pool2d"),
        pool::PoolKind::Avg {
            include_pad: count_include_pad,
        },
    )
}

/// Adaptive average pooling to an `(oh, ow)` output: output cell `i` averages input rows
/// `floor(i*H/oh) .. ceil((i+1)*H/oh)` (PyTorch's rule), likewise for columns.
pub fn adaptive_avg_pool2d(x: &Tensor, out: (usize, usize)) -> Result<Tensor> {
    if out.0 == 0 || out.1 == 0 {
        candle_core::bail!("adaptive_avg_pool2d: output size must be positive, got {out:?}");
    }
    pool(
        x,
        |h| Ok(pool::adaptive_windows(h, out.0)),
        |w| Ok(pool::adaptive_windows(w, out.1)),
        pool::PoolKind::Avg { include_pad: false },
    )
}

/// Global average pooling `[N, C, H, W] -> [N, C]` (mean over each plane), the usual
/// step before a classifier head; a dedicated fast path with backward.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    if native(x) {
        x.contiguous()?.apply_op1(pool::GlobalAvgOp)
    } else {
        via_cpu(x, |xc| xc.contiguous()?.apply_op1(pool::GlobalAvgOp))
    }
}
