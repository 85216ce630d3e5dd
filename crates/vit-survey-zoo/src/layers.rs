//! Building blocks shared by the transformers: linear and normalisation layers whose gradients
//! reach every parameter, the pre-norm MLP and multi-head self-attention, stochastic depth,
//! patch embedding, position-embedding resampling and analytic MAC formulas.
//!
//! LayerNorm and softmax go through nn-core's functional forms (`nn_core::layers::functional`),
//! which are written with candle primitives so they record a backward pass; candle-nn's fused
//! versions are forward-only.

use candle_core::{DType, Result, Tensor, Var};
use nn_core::init::Init;
use nn_core::layers::functional;
use nn_core::layers::{Conv2d, Conv2dConfig};
use nn_core::{ParamKind, VarPath};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    static CHEAP_INIT: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every parameter initialised to zero instead of its random initialisation
/// (a "meta-like" build: parameter counting and weight loading do not need random draws).
pub fn with_cheap_init<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let old = CHEAP_INIT.with(|c| c.replace(on));
    let out = f();
    CHEAP_INIT.with(|c| c.set(old));
    out
}

/// Whether parameters are being built with [`with_cheap_init`] (zeros, no random draws).
pub fn cheap_init_on() -> bool {
    CHEAP_INIT.with(|c| c.get())
}

fn init_or_cheap(init: Init) -> Init {
    if CHEAP_INIT.with(|c| c.get()) {
        Init::ZEROS
    } else {
        init
    }
}

/// Creates a parameter, honouring [`with_cheap_init`].
pub fn param(vp: &VarPath, leaf: &str, dims: &[usize], init: Init, kind: ParamKind) -> Result<Var> {
    vp.param(leaf, dims, init_or_cheap(init), kind)
}

/// timm's default for transformer weights: truncated normal with std 0.02.
pub const TRUNC_002: Init = Init::TruncNormal { mean: 0.0, std: 0.02 };

/// `y = x W^T + b` over the last dimension (timm init: trunc-normal(0.02) weight, zero bias).
#[derive(Clone)]
pub struct Linear {
    pub weight: Var,
    pub bias: Option<Var>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    pub fn new(vp: &VarPath, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        Self::with_init(vp, in_features, out_features, bias, TRUNC_002)
    }

    pub fn with_init(vp: &VarPath, in_features: usize, out_features: usize, bias: bool, init: Init) -> Result<Self> {
        let weight = param(vp, "weight", &[out_features, in_features], init, ParamKind::Weight)?;
        let bias = if bias {
            Some(param(vp, "bias", &[out_features], Init::ZEROS, ParamKind::Bias)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            in_features,
            out_features,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let last = *dims.last().unwrap_or(&0);
        if last != self.in_features {
            candle_core::bail!("linear layer expects last dimension {}, got shape {dims:?}", self.in_features);
        }
        // fused product + bias, row-parallel on CPU (nn-core's op)
        nn_core::ops::linear::linear(x, self.weight.as_tensor(), self.bias.as_ref().map(|b| b.as_tensor()))
    }

    /// Multiply-accumulates for `rows` input vectors.
    pub fn macs(&self, rows: usize) -> u64 {
        (rows * self.in_features * self.out_features) as u64
    }
}

/// Layer normalisation over the last dimension (weight `weight`, bias `bias`, as PyTorch).
#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Var,
    pub bias: Var,
    pub eps: f64,
    pub dim: usize,
}

impl LayerNorm {
    pub fn new(vp: &VarPath, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: param(vp, "weight", &[dim], Init::ONES, ParamKind::NormWeight)?,
            bias: param(vp, "bias", &[dim], Init::ZEROS, ParamKind::NormBias)?,
            eps,
            dim,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dims().last() != Some(&self.dim) {
            candle_core::bail!("LayerNorm expects last dimension {}, got shape {:?}", self.dim, x.dims());
        }
        functional::layer_norm(x, Some(self.weight.as_tensor()), Some(self.bias.as_tensor()), self.eps)
    }
}

/// A convolution with timm-style initialisation; `macs` for an output of `oh x ow`.
pub fn conv2d(vp: &VarPath, cfg: Conv2dConfig) -> Result<Conv2d> {
    let fan_out = cfg.out_channels * cfg.kernel.0 * cfg.kernel.1 / cfg.groups.max(1);
    let init = Init::Normal {
        mean: 0.0,
        std: (2.0 / fan_out.max(1) as f64).sqrt(),
    };
    let c = Conv2d::with_init(vp, cfg, init_or_cheap(init))?;
    if let Some(b) = &c.bias {
        b.set(&b.as_tensor().zeros_like()?)?;
    }
    Ok(c)
}

/// Applies a convolution (no profiling; the crate counts MACs analytically).
pub fn conv_forward(c: &Conv2d, x: &Tensor) -> Result<Tensor> {
    let y = nn_core::layers::conv::conv2d(x, c.weight.as_tensor(), &c.config)?;
    match &c.bias {
        Some(b) => y.broadcast_add(&b.as_tensor().reshape((1, c.config.out_channels, 1, 1))?),
        None => Ok(y),
    }
}

/// Output size and MACs of a convolution on an `h x w` input.
pub fn conv_macs(c: &Conv2d, h: usize, w: usize) -> (u64, usize, usize) {
    let (oh, ow) = c.config.output_hw(h, w);
    (c.config.macs(oh, ow), oh, ow)
}

/// GELU (exact, erf form), as `nn.GELU`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    nn_core::ops::rowwise::gelu_erf(x)
}

/// The transformer MLP: `fc2(act(fc1(x)))` with hidden width `hidden`.
#[derive(Clone)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    pub fn new(vp: &VarPath, dim: usize, hidden: usize, out: usize) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(&vp.pp("fc1"), dim, hidden, true)?,
            fc2: Linear::new(&vp.pp("fc2"), hidden, out, true)?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&gelu(&self.fc1.forward(x)?)?)
    }
    pub fn macs(&self, tokens: usize) -> u64 {
        self.fc1.macs(tokens) + self.fc2.macs(tokens)
    }
}

/// Scaled dot-product attention, Eq. (1) of the survey: softmax(Q K^T * scale + bias) V.
///
/// `q`: `[B, H, Nq, d]`, `k`: `[B, H, Nk, d]`, `v`: `[B, H, Nk, dv]` (any strides: heads split
/// out of a projection by a permute are read in place); `bias` broadcasts to `[B, H, Nq, Nk]`.
/// nn-core's fused kernels (`nn_core::ops::attention`), with gradients; the result is a view
/// whose `transpose(1, 2)` is contiguous token layout.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    nn_core::ops::attention::scaled_dot_product_attention(q, k, v, scale, bias)
}

/// The attention matrix softmax(Q K^T * scale + bias), `[B, H, Nq, Nk]`.
pub fn attention_probs(q: &Tensor, k: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    nn_core::ops::attention::attention_probs(q, k, scale, bias)
}

/// MACs of the two attention matmuls (Q K^T and A V) per image.
pub fn attention_macs(heads: usize, nq: usize, nk: usize, d_qk: usize, d_v: usize) -> u64 {
    (heads * nq * nk * (d_qk + d_v)) as u64
}

/// Multi-head self-attention with a fused `qkv` projection and an output `proj` (timm's
/// `Attention`): Eq. (2) of the survey, MultiHead(Q, K, V) = Concat(head_1..head_h) W^O.
#[derive(Clone)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub heads: usize,
    pub head_dim: usize,
    /// The factor on Q K^T: `head_dim^-0.5` unless a model says otherwise (T2T-ViT's
    /// published checkpoints use `embed_dim^-0.5`).
    pub scale: f64,
}

impl Attention {
    pub fn new(vp: &VarPath, dim: usize, heads: usize, qkv_bias: bool) -> Result<Self> {
        if heads == 0 || !dim.is_multiple_of(heads) {
            candle_core::bail!("attention: dim {dim} must be divisible by the number of heads {heads}");
        }
        Self::with_head_dim(vp, dim, heads, dim / heads, qkv_bias)
    }

    /// `heads` heads of width `head_dim` on `dim`-wide tokens (`heads * head_dim` may differ
    /// from `dim`: what is left after pruning heads).
    pub fn with_head_dim(vp: &VarPath, dim: usize, heads: usize, head_dim: usize, qkv_bias: bool) -> Result<Self> {
        if heads == 0 || head_dim == 0 {
            candle_core::bail!("attention: needs at least one head of positive width, got {heads} x {head_dim}");
        }
        let inner = heads * head_dim;
        Ok(Self {
            qkv: Linear::new(&vp.pp("qkv"), dim, 3 * inner, qkv_bias)?,
            proj: Linear::new(&vp.pp("proj"), inner, dim, true)?,
            heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// Splits `[B, N, 3 * H * d]` into q, k, v of shape `[B, H, N, d]`.
    pub fn qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, n, _) = x.dims3()?;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, self.heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        Ok((qkv.get(0)?, qkv.get(1)?, qkv.get(2)?))
    }

    /// `x`: `[B, N, C]`; `bias` (relative position bias or mask) broadcasts to `[B, H, N, N]`.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let (q, k, v) = self.qkv(x)?;
        let o = attention(&q, &k, &v, self.scale, bias)?;
        let o = o.transpose(1, 2)?.reshape((b, n, self.heads * self.head_dim))?;
        self.proj.forward(&o)
    }

    pub fn macs(&self, n: usize) -> u64 {
        self.qkv.macs(n) + attention_macs(self.heads, n, n, self.head_dim, self.head_dim) + self.proj.macs(n)
    }
}

/// Stochastic depth (Huang et al. 2016) on the residual branch: in training, each sample's
/// branch is dropped with probability `p` and kept ones are scaled by 1/(1-p). The masks come
/// from a seeded stream (seed from the layer's path, a call counter).
pub struct DropPath {
    pub p: f64,
    seed: u64,
    calls: AtomicU64,
}

impl DropPath {
    pub fn new(vp: &VarPath, p: f64) -> Self {
        Self {
            p,
            seed: vp.derived_seed(),
            calls: AtomicU64::new(0),
        }
    }
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p <= 0.0 {
            return Ok(x.clone());
        }
        use rand::Rng;
        let k = self.calls.fetch_add(1, Ordering::Relaxed);
        let mut rng = nn_core::rng::derived(self.seed, k);
        let b = x.dims()[0];
        let keep = 1.0 - self.p;
        let m: Vec<f32> = (0..b)
            .map(|_| if rng.gen::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 })
            .collect();
        let mut shape = vec![1; x.rank()];
        shape[0] = b;
        let m = Tensor::from_vec(m, shape, x.device())?.to_dtype(x.dtype())?;
        x.broadcast_mul(&m)
    }
}

impl Clone for DropPath {
    fn clone(&self) -> Self {
        Self {
            p: self.p,
            seed: self.seed,
            calls: AtomicU64::new(self.calls.load(Ordering::Relaxed)),
        }
    }
}

/// Stochastic-depth rate of block `i` of `n` with a linear rule up to `rate` (timm).
pub fn drop_path_rate(rate: f64, i: usize, n: usize) -> f64 {
    if n <= 1 {
        0.0
    } else {
        rate * i as f64 / (n - 1) as f64
    }
}

/// The pre-norm transformer encoder block of ViT/DeiT (Eq. (4)-(5) of the survey):
/// `x + Attn(LN(x))`, then `x + MLP(LN(x))`.
#[derive(Clone)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub drop_path: DropPath,
}

impl Block {
    pub fn new(vp: &VarPath, dim: usize, heads: usize, mlp_ratio: f64, qkv_bias: bool, eps: f64, drop_path: f64) -> Result<Self> {
        if heads == 0 || !dim.is_multiple_of(heads) {
            candle_core::bail!("attention: dim {dim} must be divisible by the number of heads {heads}");
        }
        Self::with_heads(vp, dim, heads, dim / heads, mlp_ratio, qkv_bias, eps, drop_path)
    }

    /// A block whose attention has `heads` heads of width `head_dim` (a head-pruned block).
    #[allow(clippy::too_many_arguments)]
    pub fn with_heads(
        vp: &VarPath,
        dim: usize,
        heads: usize,
        head_dim: usize,
        mlp_ratio: f64,
        qkv_bias: bool,
        eps: f64,
        drop_path: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(&vp.pp("norm1"), dim, eps)?,
            attn: Attention::with_head_dim(&vp.pp("attn"), dim, heads, head_dim, qkv_bias)?,
            norm2: LayerNorm::new(&vp.pp("norm2"), dim, eps)?,
            mlp: Mlp::new(&vp.pp("mlp"), dim, (dim as f64 * mlp_ratio) as usize, dim)?,
            drop_path: DropPath::new(vp, drop_path),
        })
    }
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = (x + self.drop_path.forward(&self.attn.forward(&self.norm1.forward(x)?, None)?, train)?)?;
        &x + self.drop_path.forward(&self.mlp.forward(&self.norm2.forward(&x)?)?, train)?
    }
    pub fn macs(&self, n: usize) -> u64 {
        self.attn.macs(n) + self.mlp.macs(n)
    }
}

/// Bilinear interpolation matrix `[out, inp]` (PyTorch `align_corners=False`, no antialias).
fn bilinear_matrix(out: usize, inp: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * inp];
    let scale = inp as f64 / out as f64;
    for o in 0..out {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        let l1 = src - i0 as f64;
        m[o * inp + i0] += (1.0 - l1) as f32;
        m[o * inp + i1] += l1 as f32;
    }
    m
}

/// Resamples a grid of embeddings `[B, C, H, W]` to `[B, C, h, w]` by bilinear interpolation,
/// written as two matrix products so it is differentiable.
pub fn resample_grid(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, c, ih, iw) = x.dims4()?;
    if (ih, iw) == (h, w) {
        return Ok(x.clone());
    }
    let dev = x.device();
    let mh = Tensor::from_vec(bilinear_matrix(h, ih), (h, ih), dev)?.to_dtype(x.dtype())?;
    let mw = Tensor::from_vec(bilinear_matrix(w, iw), (w, iw), dev)?.to_dtype(x.dtype())?;
    // rows: [B*C, ih, iw] -> [B*C, h, iw] -> [B*C, h, w]
    let x3 = x.reshape((b * c, ih, iw))?;
    let y = mh.broadcast_left(b * c)?.matmul(&x3)?;
    let y = y.matmul(&mw.t()?.broadcast_left(b * c)?)?;
    y.reshape((b, c, h, w))
}

/// Resamples a token position embedding `[1, prefix + gh * gw, C]` (row-major grid after
/// `prefix` class/distillation tokens) to a `h x w` grid (timm's `resample_abs_pos_embed`,
/// bilinear instead of bicubic).
pub fn resample_pos_embed(pe: &Tensor, prefix: usize, h: usize, w: usize) -> Result<Tensor> {
    let (one, n, c) = pe.dims3()?;
    let grid = n - prefix;
    let g = (grid as f64).sqrt().round() as usize;
    if g * g != grid {
        candle_core::bail!("position embedding with {grid} grid tokens is not a square grid");
    }
    let pre = pe.narrow(1, 0, prefix)?;
    let body = pe.narrow(1, prefix, grid)?.reshape((one, g, g, c))?.permute((0, 3, 1, 2))?;
    let body = resample_grid(&body.contiguous()?, h, w)?
        .permute((0, 2, 3, 1))?
        .reshape((one, h * w, c))?;
    if prefix == 0 {
        Ok(body)
    } else {
        Tensor::cat(&[&pre, &body], 1)
    }
}

/// `[B, C, H, W]` -> `[B, H*W, C]`.
pub fn flatten_tokens(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    nn_core::ops::transpose::transpose_last2(&x.reshape((b, c, h * w))?)
}

/// A convolution whose kernel equals its stride (no padding, dilation or groups: a patchify
/// layer such as PVT's spatial reduction) applied to tokens `[B, h*w, C]`, returning tokens
/// `[B, oh*ow, out]`: `flatten_tokens(conv_forward(c, tokens_to_map(x, h, w)))` without the two
/// transposes and the im2col of the map route. The non-overlapping `s x s` patches are gathered
/// as rows of `s*s*C` values (runs of `s*C` contiguous values), the weight is read in the
/// matching `(ky, kx, C)` order, and one linear layer does the rest. On PVTv2-B0 the two
/// transposes took 3.7% and the im2col 2.6% of a forward (`perf record`, 2026-12-07).
pub fn patchify_conv_tokens(c: &Conv2d, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let cfg = &c.config;
    let (s, ci, co) = (cfg.kernel.0, cfg.in_channels, cfg.out_channels);
    let (b, n, xc) = x.dims3()?;
    if cfg.kernel != (s, s) || cfg.stride != cfg.kernel || cfg.padding != (0, 0) || cfg.dilation != (1, 1) || cfg.groups != 1 {
        candle_core::bail!("patchify conv on tokens: needs kernel = stride, no padding, dilation or groups, got {cfg:?}");
    }
    if n != h * w || xc != ci {
        candle_core::bail!("patchify conv on tokens: {:?} is not {h}x{w} tokens of {ci} channels", x.dims());
    }
    let (oh, ow) = cfg.output_hw(h, w);
    let mut map = x.reshape((b, h, w, ci))?;
    if (oh * s, ow * s) != (h, w) {
        // the rows and columns past the last whole patch, which the convolution skips
        map = map.narrow(1, 0, oh * s)?.narrow(2, 0, ow * s)?.contiguous()?;
    }
    let patches = map
        .reshape((b, oh, s, ow, s, ci))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b * oh * ow, s * s * ci))?;
    let weight = c
        .weight
        .as_tensor()
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((co, s * s * ci))?;
    let bias = c.bias.as_ref().map(|v| v.as_tensor());
    nn_core::ops::linear::linear(&patches, &weight, bias)?.reshape((b, oh * ow, co))
}

/// `[B, H*W, C]` -> `[B, C, H, W]`.
pub fn tokens_to_map(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    if n != h * w {
        candle_core::bail!("{n} tokens do not form a {h}x{w} grid");
    }
    nn_core::ops::transpose::transpose_last2(x)?.reshape((b, c, h, w))
}

/// Checks an input batch is `[B, in_chans, size, size]`.
pub fn check_input(model: &str, x: &Tensor, in_chans: usize, size: usize) -> Result<()> {
    let d = x.dims();
    if d.len() != 4 || d[1] != in_chans || d[2] != size || d[3] != size {
        candle_core::bail!(
            "{model} was built for [B, {in_chans}, {size}, {size}] inputs, got shape {d:?}; build it with image_size {} or resample its position embeddings",
            d.get(2).copied().unwrap_or(0)
        );
    }
    Ok(())
}

/// Converts to f32 for host-side checks.
pub fn to_f32(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use nn_core::testing::check_gradient;
    use nn_core::VarStore;

    #[test]
    fn bilinear_resample_matches_hand_values() -> Result<()> {
        // 2x2 -> 4x4 with align_corners=False: first row 1, 1.25, 1.75, 2 for [1, 2]
        let x = Tensor::new(&[[[[1f32, 2.0], [3.0, 4.0]]]], &Device::Cpu)?;
        let y = resample_grid(&x, 4, 4)?.flatten_all()?.to_vec1::<f32>()?;
        let expect = [1.0, 1.25, 1.75, 2.0];
        for (a, b) in y[..4].iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
        assert!((y[15] - 4.0).abs() < 1e-6);
        // same size is the identity
        assert_eq!(resample_grid(&x, 2, 2)?.flatten_all()?.to_vec1::<f32>()?, vec![1.0, 2.0, 3.0, 4.0]);
        Ok(())
    }

    #[test]
    fn attention_softmax_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::new(&[[[[0.3f64, -0.2], [1.0, 0.5], [-0.7, 0.1]]]], &dev)?; // [1,1,3,2]
        let k = Tensor::new(&[[[[0.2f64, 0.4], [-1.0, 0.3], [0.6, -0.5]]]], &dev)?;
        let v = Tensor::new(&[[[[1.0f64, 0.0], [0.5, -1.0], [2.0, 0.3]]]], &dev)?;
        let bias = Tensor::new(&[[[0.1f64, -0.3, 0.0], [0.2, 0.0, -0.1], [0.0, 0.4, 0.3]]], &dev)?;
        let w = Tensor::new(&[[[[0.3f64, -1.0], [2.0, 0.5], [1.0, 1.5]]]], &dev)?;
        let f = |q: &Tensor, k: &Tensor, v: &Tensor, b: &Tensor| attention(q, k, v, 0.7, Some(b))?.mul(&w)?.sum_all();
        check_gradient(&q, |q| f(q, &k, &v, &bias), 1e-6, 1e-6)?;
        check_gradient(&k, |k| f(&q, k, &v, &bias), 1e-6, 1e-6)?;
        check_gradient(&v, |v| f(&q, &k, v, &bias), 1e-6, 1e-6)?;
        check_gradient(&bias, |b| f(&q, &k, &v, b), 1e-6, 1e-6)?;
        Ok(())
    }

    /// The patchify convolution on tokens equals the map route (transpose, convolution with
    /// bias, transpose back), values and gradients of input, weight and bias, also when the
    /// map is not a whole number of patches; other convolutions are refused.
    #[test]
    fn patchify_conv_on_tokens_equals_the_map_route() -> Result<()> {
        let dev = Device::Cpu;
        for (b, h, w, ci, co, s) in [
            (2usize, 8usize, 8usize, 5usize, 7usize, 4usize),
            (1, 5, 7, 3, 4, 2),
            (2, 3, 3, 2, 6, 3),
        ] {
            let vs = VarStore::new(7, &dev);
            let c = conv2d(&vs.root().pp("sr"), Conv2dConfig::new(ci, co, s).stride(s).padding(0).bias(true))?;
            let bias = c.bias.as_ref().expect("a bias");
            bias.set(&Tensor::randn(0f32, 1.0, co, &dev)?)?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h * w, ci), &dev)?)?;
            let fast = patchify_conv_tokens(&c, x.as_tensor(), h, w)?;
            let slow = flatten_tokens(&conv_forward(&c, &tokens_to_map(x.as_tensor(), h, w)?)?)?;
            assert_eq!(fast.dims(), slow.dims());
            let d = nn_core::testing::max_abs_diff(&fast, &slow)?;
            assert!(d < 1e-5, "forward differs by {d}");
            let probe = Tensor::randn(0f32, 1.0, fast.dims(), &dev)?;
            let gf = fast.mul(&probe)?.sum_all()?.backward()?;
            let gs = slow.mul(&probe)?.sum_all()?.backward()?;
            for t in [x.as_tensor(), c.weight.as_tensor(), bias.as_tensor()] {
                let d = nn_core::testing::max_abs_diff(gf.get(t).expect("a gradient"), gs.get(t).expect("a gradient"))?;
                assert!(d < 1e-4, "gradient of {:?} differs by {d}", t.dims());
            }
        }
        let vs = VarStore::new(7, &dev);
        let overlapping = conv2d(&vs.root().pp("c"), Conv2dConfig::new(2, 2, 3).stride(2))?;
        let x = Tensor::zeros((1, 16, 2), DType::F32, &dev)?;
        let e = patchify_conv_tokens(&overlapping, &x, 4, 4).unwrap_err().to_string();
        assert!(e.contains("kernel = stride"), "{e}");
        Ok(())
    }

    #[test]
    fn layer_norm_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let vs = VarStore::new(0, &dev);
        let ln = LayerNorm::new(&vs.root(), 4, 1e-6)?;
        ln.weight.set(&Tensor::new(&[1.0f32, 0.5, -2.0, 0.3], &dev)?)?;
        let x = Tensor::new(&[[0.3f32, -0.2, 1.0, 0.5], [2.0, 0.1, -0.4, 0.0]], &dev)?;
        let w = Tensor::new(&[[0.3f32, -1.0, 2.0, 0.5], [1.0, 1.5, -0.2, 0.7]], &dev)?;
        check_gradient(&x, |x| ln.forward(x)?.mul(&w)?.sum_all(), 1e-2, 2e-2)?;
        let xd = x.to_dtype(DType::F64)?;
        let g = ln.weight.as_tensor().to_dtype(DType::F64)?;
        let wd = w.to_dtype(DType::F64)?;
        check_gradient(
            &g,
            |g| functional::layer_norm(&xd, Some(g), None, 1e-6)?.mul(&wd)?.sum_all(),
            1e-6,
            1e-5,
        )?;
        Ok(())
    }

    #[test]
    fn drop_path_drops_whole_samples_and_rescales() -> Result<()> {
        let vs = VarStore::new(0, &Device::Cpu);
        let dp = DropPath::new(&vs.root().pp("dp"), 0.5);
        let x = Tensor::ones((64, 3, 2), DType::F32, &Device::Cpu)?;
        assert_eq!(dp.forward(&x, false)?.sum_all()?.to_scalar::<f32>()?, 384.0);
        let y = dp.forward(&x, true)?;
        let per: Vec<f32> = y.sum((1, 2))?.to_vec1()?;
        assert!(per.iter().all(|&v| v == 0.0 || v == 12.0), "{per:?}");
        let kept = per.iter().filter(|&&v| v > 0.0).count();
        assert!((16..=48).contains(&kept), "{kept}");
        assert_ne!(
            y.to_vec3::<f32>()?,
            dp.forward(&x, true)?.to_vec3::<f32>()?,
            "each call draws a new mask"
        );
        Ok(())
    }

    #[test]
    fn resampled_pos_embed_keeps_prefix_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let pe = Tensor::arange(0f64, (1 + 4) as f64 * 2.0, &dev)?.reshape((1, 5, 2))?;
        let r = resample_pos_embed(&pe, 1, 3, 3)?;
        assert_eq!(r.dims(), &[1, 10, 2]);
        assert_eq!(r.narrow(1, 0, 1)?.flatten_all()?.to_vec1::<f64>()?, vec![0.0, 1.0]);
        check_gradient(&pe, |p| resample_pos_embed(p, 1, 3, 3)?.sqr()?.sum_all(), 1e-6, 1e-5)?;
        assert!(resample_pos_embed(&pe.narrow(1, 0, 4)?, 1, 2, 2).is_err());
        Ok(())
    }
}
