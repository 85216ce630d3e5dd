//! Swin Transformer (Liu et al. 2021): attention inside non-overlapping `M x M` windows with a
//! learned relative position bias, windows shifted by `M/2` in every other block, and patch
//! merging (2x2 neighbours concatenated, LayerNorm, linear 4C -> 2C) between stages.
//!
//! Attention(Q, K, V) = SoftMax(Q K^T / sqrt(d) + B) V (Eq. (4) of the Swin paper), with `B`
//! gathered from a `(2M-1)^2 x heads` table. Names follow timm 1.0 (`layers.{i}.downsample`
//! at the start of stages 1-3, `head.fc`).

use crate::layers::{check_input, conv2d, conv_forward, conv_macs, drop_path_rate, param, DropPath, LayerNorm, Linear, Mlp, TRUNC_002};
use crate::registry::{ModelOptions, ZooModel};
use candle_core::{Device, Result, Tensor, Var};
use nn_core::layers::{Conv2d, Conv2dConfig};
use nn_core::{Model, ParamKind, VarPath};

/// Hyper-parameters of a Swin Transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct SwinConfig {
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depths: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub window_size: usize,
    pub mlp_ratio: f64,
}

impl SwinConfig {
    /// Swin-T: C = 96, depths 2-2-6-2, heads 3-6-12-24, window 7, patch 4.
    pub fn tiny() -> Self {
        Self {
            patch_size: 4,
            embed_dim: 96,
            depths: vec![2, 2, 6, 2],
            num_heads: vec![3, 6, 12, 24],
            window_size: 7,
            mlp_ratio: 4.0,
        }
    }
}

/// Window attention with a relative position bias table.
pub struct WindowAttention {
    pub qkv: Linear,
    pub proj: Linear,
    pub relative_position_bias_table: Var,
    /// `[N*N]` indices into the table for a window of N = M*M tokens.
    index: Tensor,
    heads: usize,
    head_dim: usize,
    window: usize,
}

/// The `(M*M)^2` table indices of relative positions (dh + M - 1) * (2M - 1) + (dw + M - 1).
pub fn relative_position_index(m: usize) -> Vec<u32> {
    let n = m * m;
    let mut idx = Vec::with_capacity(n * n);
    for i in 0..n {
        for j in 0..n {
            let dh = (i / m) as i64 - (j / m) as i64 + m as i64 - 1;
            let dw = (i % m) as i64 - (j % m) as i64 + m as i64 - 1;
            idx.push((dh * (2 * m as i64 - 1) + dw) as u32);
        }
    }
    idx
}

impl WindowAttention {
    fn new(vp: &VarPath, dim: usize, heads: usize, window: usize) -> Result<Self> {
        let n = window * window;
        Ok(Self {
            qkv: Linear::new(&vp.pp("qkv"), dim, 3 * dim, true)?,
            proj: Linear::new(&vp.pp("proj"), dim, dim, true)?,
            relative_position_bias_table: param(
                vp,
                "relative_position_bias_table",
                &[(2 * window - 1).pow(2), heads],
                TRUNC_002,
                ParamKind::Embedding,
            )?,
            index: Tensor::from_vec(relative_position_index(window), n * n, &Device::Cpu)?,
            heads,
            head_dim: dim / heads,
            window,
        })
    }

    /// The bias `[heads, N, N]`.
    fn bias(&self) -> Result<Tensor> {
        let n = self.window * self.window;
        let t = self.relative_position_bias_table.as_tensor();
        t.index_select(&self.index.to_device(t.device())?, 0)?
            .reshape((n, n, self.heads))?
            .permute((2, 0, 1))
    }

    /// `x`: `[B * nW, N, C]`; `mask`: `[nW, N, N]` for shifted windows.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (bw, n, c) = x.dims3()?;
        let qkv = self.qkv.forward(x)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        // heads as [B, nW, H, N, d] (nW = 1 without a mask), so that the [nW, H, N, N] mask +
        // bias broadcasts over the images instead of being tiled into a [B * nW, H, N, N] copy
        let bias = self.bias()?.unsqueeze(0)?; // [1, H, N, N]
        let (nw, bias) = match mask {
            None => (1, bias),
            Some(m) => (m.dims()[0], m.unsqueeze(1)?.broadcast_add(&bias)?),
        };
        let qkv = qkv
            .reshape((bw / nw, nw, n, 3, self.heads, self.head_dim))?
            .permute((3, 0, 1, 4, 2, 5))?;
        let o = crate::layers::attention(&qkv.get(0)?, &qkv.get(1)?, &qkv.get(2)?, scale, Some(&bias))?;
        // [B, nW, H, N, d] -> [B, nW, N, H, d], contiguous on the fused path
        let o = o.transpose(2, 3)?.reshape((bw, n, c))?;
        self.proj.forward(&o)
    }

    fn macs(&self, windows: usize) -> u64 {
        let n = self.window * self.window;
        windows as u64
            * (self.qkv.macs(n) + self.proj.macs(n) + crate::layers::attention_macs(self.heads, n, n, self.head_dim, self.head_dim))
    }
}

/// A Swin block: `x + WMSA(LN(x))`, `x + MLP(LN(x))`, windows shifted when `shift > 0`.
pub struct SwinBlock {
    pub norm1: LayerNorm,
    pub attn: WindowAttention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    drop_path: DropPath,
    window: usize,
    shift: usize,
    resolution: usize,
    mask: Option<Tensor>,
}

/// The `[nW, N, N]` mask (0 or -100) that keeps shifted windows from attending across the
/// image border (regions labelled as in the paper's cyclic-shift figure).
fn shift_mask(res: usize, window: usize, shift: usize) -> Result<Tensor> {
    let region = |i: usize| {
        if i < res - window {
            0
        } else if i < res - shift {
            1
        } else {
            2
        }
    };
    let nwin = res / window;
    let n = window * window;
    let mut out = Vec::with_capacity(nwin * nwin * n * n);
    for wh in 0..nwin {
        for ww in 0..nwin {
            let labels: Vec<usize> = (0..n)
                .map(|t| region(wh * window + t / window) * 3 + region(ww * window + t % window))
                .collect();
            for a in 0..n {
                for b in 0..n {
                    out.push(if labels[a] == labels[b] { 0f32 } else { -100f32 });
                }
            }
        }
    }
    Tensor::from_vec(out, (nwin * nwin, n, n), &Device::Cpu)
}

impl SwinBlock {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vp: &VarPath,
        dim: usize,
        heads: usize,
        resolution: usize,
        window: usize,
        shifted: bool,
        mlp_ratio: f64,
        dp: f64,
    ) -> Result<Self> {
        // timm: a window larger than the feature map shrinks to it, and then nothing shifts.
        let (window, shift) = if resolution <= window {
            (resolution, 0)
        } else {
            (window, if shifted { window / 2 } else { 0 })
        };
        if !resolution.is_multiple_of(window) {
            candle_core::bail!("swin: a {resolution}x{resolution} feature map is not divisible into {window}x{window} windows");
        }
        let mask = if shift > 0 {
            Some(shift_mask(resolution, window, shift)?)
        } else {
            None
        };
        Ok(Self {
            norm1: LayerNorm::new(&vp.pp("norm1"), dim, 1e-5)?,
            attn: WindowAttention::new(&vp.pp("attn"), dim, heads, window)?,
            norm2: LayerNorm::new(&vp.pp("norm2"), dim, 1e-5)?,
            mlp: Mlp::new(&vp.pp("mlp"), dim, (dim as f64 * mlp_ratio) as usize, dim)?,
            drop_path: DropPath::new(vp, dp),
            window,
            shift,
            resolution,
            mask,
        })
    }

    /// `x`: `[B, H, W, C]` (channels last, as timm).
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let m = self.window;
        let mut y = self.norm1.forward(x)?;
        if self.shift > 0 {
            y = y.roll(-(self.shift as i32), 1)?.roll(-(self.shift as i32), 2)?;
        }
        // partition into windows [B * nW, M*M, C]
        let win = y
            .reshape((b, h / m, m, w / m, m, c))?
            .permute((0, 1, 3, 2, 4, 5))?
            .contiguous()?
            .reshape((b * (h / m) * (w / m), m * m, c))?;
        let mask = match &self.mask {
            Some(mk) => Some(mk.to_device(x.device())?.to_dtype(x.dtype())?),
            None => None,
        };
        let o = self.attn.forward(&win, mask.as_ref())?;
        let mut o = o
            .reshape((b, h / m, w / m, m, m, c))?
            .permute((0, 1, 3, 2, 4, 5))?
            .contiguous()?
            .reshape((b, h, w, c))?;
        if self.shift > 0 {
            o = o.roll(self.shift as i32, 1)?.roll(self.shift as i32, 2)?;
        }
        let x = (x + self.drop_path.forward(&o, train)?)?;
        &x + self.drop_path.forward(&self.mlp.forward(&self.norm2.forward(&x)?)?, train)?
    }

    fn macs(&self) -> u64 {
        let r = self.resolution;
        let windows = (r / self.window).pow(2);
        self.attn.macs(windows) + self.mlp.macs(r * r)
    }
}

/// Patch merging: 2x2 neighbours concatenated (timm's order), LayerNorm, linear 4C -> 2C.
pub struct PatchMerging {
    pub norm: LayerNorm,
    pub reduction: Linear,
}

impl PatchMerging {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        if h % 2 != 0 || w % 2 != 0 {
            candle_core::bail!("patch merging needs an even feature map, got {h}x{w}");
        }
        let x = x
            .reshape((b, h / 2, 2, w / 2, 2, c))?
            .permute((0, 1, 3, 4, 2, 5))?
            .contiguous()?
            .reshape((b, h / 2, w / 2, 4 * c))?;
        self.reduction.forward(&self.norm.forward(&x)?)
    }
}

/// One stage: optional patch merging, then blocks.
pub struct SwinStage {
    pub downsample: Option<PatchMerging>,
    pub blocks: Vec<SwinBlock>,
}

/// A Swin Transformer.
pub struct SwinTransformer {
    name: String,
    pub cfg: SwinConfig,
    pub patch_embed: Conv2d,
    pub patch_norm: LayerNorm,
    pub layers: Vec<SwinStage>,
    pub norm: LayerNorm,
    pub head: Linear,
    image_size: usize,
    in_chans: usize,
    num_classes: usize,
    num_features: usize,
}

impl SwinTransformer {
    pub fn new(name: &str, vp: &VarPath, cfg: &SwinConfig, o: &ModelOptions) -> Result<Self> {
        let stages = cfg.depths.len();
        let total_down = cfg.patch_size << (stages - 1);
        if !o.image_size.is_multiple_of(total_down) {
            candle_core::bail!(
                "{name}: image size {} must be a multiple of {total_down} (patch {} and {} merges)",
                o.image_size,
                cfg.patch_size,
                stages - 1
            );
        }
        let pe = vp.pp("patch_embed");
        let patch_embed = conv2d(
            &pe.pp("proj"),
            Conv2dConfig::new(o.in_chans, cfg.embed_dim, cfg.patch_size)
                .stride(cfg.patch_size)
                .padding(0)
                .bias(true),
        )?;
        let patch_norm = LayerNorm::new(&pe.pp("norm"), cfg.embed_dim, 1e-5)?;
        let total: usize = cfg.depths.iter().sum();
        let mut layers = Vec::new();
        let mut res = o.image_size / cfg.patch_size;
        let mut dim = cfg.embed_dim;
        let mut k = 0;
        for (i, (&depth, &heads)) in cfg.depths.iter().zip(&cfg.num_heads).enumerate() {
            let lp = vp.pp("layers").pp(i);
            let downsample = if i > 0 {
                let d = lp.pp("downsample");
                let m = PatchMerging {
                    norm: LayerNorm::new(&d.pp("norm"), 4 * dim, 1e-5)?,
                    reduction: Linear::new(&d.pp("reduction"), 4 * dim, 2 * dim, false)?,
                };
                dim *= 2;
                res /= 2;
                Some(m)
            } else {
                None
            };
            let mut blocks = Vec::new();
            for j in 0..depth {
                blocks.push(SwinBlock::new(
                    &lp.pp("blocks").pp(j),
                    dim,
                    heads,
                    res,
                    cfg.window_size,
                    j % 2 == 1,
                    cfg.mlp_ratio,
                    drop_path_rate(o.drop_path_rate, k, total),
                )?);
                k += 1;
            }
            layers.push(SwinStage { downsample, blocks });
        }
        Ok(Self {
            name: name.to_string(),
            cfg: cfg.clone(),
            patch_embed,
            patch_norm,
            layers,
            norm: LayerNorm::new(&vp.pp("norm"), dim, 1e-5)?,
            head: Linear::new(&vp.pp("head").pp("fc"), dim, o.num_classes, true)?,
            image_size: o.image_size,
            in_chans: o.in_chans,
            num_classes: o.num_classes,
            num_features: dim,
        })
    }

    /// Channels-last feature maps after each stage, the last one normalised.
    fn stages_nhwc(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        check_input(&self.name, x, self.in_chans, self.image_size)?;
        let x = conv_forward(&self.patch_embed, x)?.permute((0, 2, 3, 1))?.contiguous()?;
        let mut x = self.patch_norm.forward(&x)?;
        let mut outs = Vec::new();
        for s in &self.layers {
            if let Some(d) = &s.downsample {
                x = d.forward(&x)?;
            }
            for b in &s.blocks {
                x = b.forward(&x, train)?;
            }
            outs.push(x.clone());
        }
        let last = outs.len() - 1;
        outs[last] = self.norm.forward(&outs[last])?;
        Ok(outs)
    }

    pub fn macs(&self) -> u64 {
        let (mut m, oh, _) = conv_macs(&self.patch_embed, self.image_size, self.image_size);
        let mut res = oh;
        for s in &self.layers {
            if let Some(d) = &s.downsample {
                res /= 2;
                m += d.reduction.macs(res * res);
            }
            m += s.blocks.iter().map(|b| b.macs()).sum::<u64>();
        }
        m + self.head.macs(1)
    }
}

impl Model for SwinTransformer {
    fn name(&self) -> &str {
        &self.name
    }
    /// The normalised last stage averaged over positions, `[B, 8C]`.
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let last = self.stages_nhwc(x, train)?.pop().expect("stages");
        last.mean(2)?.mean(1)
    }
    fn forward_head(&self, f: &Tensor, _train: bool) -> Result<Tensor> {
        self.head.forward(f)
    }
    /// The four stage outputs as `[B, C_i, H_i, W_i]`, then the pooled features.
    fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let st = self.stages_nhwc(x, train)?;
        let pooled = st.last().expect("stages").mean(2)?.mean(1)?;
        let mut out = st
            .iter()
            .map(|s| s.permute((0, 3, 1, 2))?.contiguous())
            .collect::<Result<Vec<_>>>()?;
        out.push(pooled);
        Ok(out)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn num_features(&self) -> usize {
        self.num_features
    }
}

impl ZooModel for SwinTransformer {
    fn macs(&self) -> u64 {
        SwinTransformer::macs(self)
    }
    fn image_size(&self) -> usize {
        self.image_size
    }
}
