//! Transformer in Transformer (Han et al. 2021): every 16x16 patch ("visual sentence") is
//! itself a sequence of 4x4 sub-patch "visual words" (pixel embeddings from a 7x7 stride-4
//! convolution of the patch). Each block runs an inner transformer on the words of every patch,
//! adds their flattened projection to the patch embedding (Eq. (7)-(9) of the TNT paper), then
//! an outer transformer on the patches. Names follow timm 1.0's non-legacy `tnt`.

use crate::layers::{
    attention, check_input, conv2d, conv_forward, conv_macs, drop_path_rate, param, DropPath, LayerNorm, Linear, Mlp, TRUNC_002,
};
use crate::registry::{ModelOptions, ZooModel};
use candle_core::{Result, Tensor, Var};
use nn_core::layers::{Conv2d, Conv2dConfig};
use nn_core::{Model, ParamKind, VarPath};

/// Hyper-parameters of a TNT.
#[derive(Debug, Clone, PartialEq)]
pub struct TntConfig {
    pub patch_size: usize,
    pub embed_dim: usize,
    pub inner_dim: usize,
    pub depth: usize,
    pub num_heads_inner: usize,
    pub num_heads_outer: usize,
    pub mlp_ratio: f64,
    /// Stride of the pixel-embedding convolution (4: 4x4 words in a 16x16 patch).
    pub inner_stride: usize,
}

impl TntConfig {
    /// TNT-S: outer 384 (6 heads), inner 24 (4 heads), 12 blocks.
    pub fn small() -> Self {
        Self {
            patch_size: 16,
            embed_dim: 384,
            inner_dim: 24,
            depth: 12,
            num_heads_inner: 4,
            num_heads_outer: 6,
            mlp_ratio: 4.0,
            inner_stride: 4,
        }
    }
    /// TNT-B: outer 640 (10 heads), inner 40 (4 heads), 12 blocks.
    pub fn base() -> Self {
        Self {
            embed_dim: 640,
            inner_dim: 40,
            num_heads_outer: 10,
            ..Self::small()
        }
    }
}

/// TNT's attention: separate `qk` and `v` projections, no biases on them.
pub struct TntAttention {
    pub qk: Linear,
    pub v: Linear,
    pub proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl TntAttention {
    fn new(vp: &VarPath, dim: usize, heads: usize) -> Result<Self> {
        if !dim.is_multiple_of(heads) {
            candle_core::bail!("tnt: dim {dim} not divisible by {heads} heads");
        }
        Ok(Self {
            qk: Linear::new(&vp.pp("qk"), dim, 2 * dim, false)?,
            v: Linear::new(&vp.pp("v"), dim, dim, false)?,
            proj: Linear::new(&vp.pp("proj"), dim, dim, true)?,
            heads,
            head_dim: dim / heads,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let qk = self
            .qk
            .forward(x)?
            .reshape((b, n, 2, self.heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        let v = self.v.forward(x)?.reshape((b, n, self.heads, self.head_dim))?.transpose(1, 2)?;
        let o = attention(&qk.get(0)?, &qk.get(1)?, &v, (self.head_dim as f64).powf(-0.5), None)?;
        self.proj.forward(&o.transpose(1, 2)?.reshape((b, n, c))?)
    }
    fn macs(&self, n: usize) -> u64 {
        self.qk.macs(n) + self.v.macs(n) + self.proj.macs(n) + crate::layers::attention_macs(self.heads, n, n, self.head_dim, self.head_dim)
    }
}

/// A TNT block (inner and outer transformer).
pub struct TntBlock {
    pub norm_in: LayerNorm,
    pub attn_in: TntAttention,
    pub norm_mlp_in: LayerNorm,
    pub mlp_in: Mlp,
    pub norm1_proj: LayerNorm,
    pub proj: Linear,
    pub norm2_proj: LayerNorm,
    pub norm_out: LayerNorm,
    pub attn_out: TntAttention,
    pub norm_mlp: LayerNorm,
    pub mlp: Mlp,
    drop_path: DropPath,
}

impl TntBlock {
    fn new(vp: &VarPath, cfg: &TntConfig, num_pixel: usize, dp: f64) -> Result<Self> {
        let (i, d) = (cfg.inner_dim, cfg.embed_dim);
        Ok(Self {
            norm_in: LayerNorm::new(&vp.pp("norm_in"), i, 1e-5)?,
            attn_in: TntAttention::new(&vp.pp("attn_in"), i, cfg.num_heads_inner)?,
            norm_mlp_in: LayerNorm::new(&vp.pp("norm_mlp_in"), i, 1e-5)?,
            mlp_in: Mlp::new(&vp.pp("mlp_in"), i, 4 * i, i)?,
            norm1_proj: LayerNorm::new(&vp.pp("norm1_proj"), i * num_pixel, 1e-5)?,
            proj: Linear::new(&vp.pp("proj"), i * num_pixel, d, false)?,
            norm2_proj: LayerNorm::new(&vp.pp("norm2_proj"), d, 1e-5)?,
            norm_out: LayerNorm::new(&vp.pp("norm_out"), d, 1e-5)?,
            attn_out: TntAttention::new(&vp.pp("attn_out"), d, cfg.num_heads_outer)?,
            norm_mlp: LayerNorm::new(&vp.pp("norm_mlp"), d, 1e-5)?,
            mlp: Mlp::new(&vp.pp("mlp"), d, (d as f64 * cfg.mlp_ratio) as usize, d)?,
            drop_path: DropPath::new(vp, dp),
        })
    }

    /// `pixel`: `[B*N, words, inner]`, `patch`: `[B, 1 + N, D]`.
    fn forward(&self, pixel: &Tensor, patch: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let dp = |t: Tensor| self.drop_path.forward(&t, train);
        let pixel = (pixel + dp(self.attn_in.forward(&self.norm_in.forward(pixel)?)?)?)?;
        let pixel = (&pixel + dp(self.mlp_in.forward(&self.norm_mlp_in.forward(&pixel)?)?)?)?;
        let (b, n1, _) = patch.dims3()?;
        let words = pixel.reshape((b, n1 - 1, ()))?;
        let add = self.norm2_proj.forward(&self.proj.forward(&self.norm1_proj.forward(&words)?)?)?;
        let patch = Tensor::cat(&[&patch.narrow(1, 0, 1)?, &(patch.narrow(1, 1, n1 - 1)? + add)?], 1)?;
        let patch = (&patch + dp(self.attn_out.forward(&self.norm_out.forward(&patch)?)?)?)?;
        let patch = (&patch + dp(self.mlp.forward(&self.norm_mlp.forward(&patch)?)?)?)?;
        Ok((pixel, patch))
    }

    fn macs(&self, patches: usize, words: usize) -> u64 {
        patches as u64 * (self.attn_in.macs(words) + self.mlp_in.macs(words))
            + self.proj.macs(patches)
            + self.attn_out.macs(patches + 1)
            + self.mlp.macs(patches + 1)
    }
}

/// TNT.
pub struct Tnt {
    name: String,
    pub cfg: TntConfig,
    pub pixel_embed: Conv2d,
    pub pixel_pos: Var,
    pub patch_pos: Var,
    pub cls_token: Var,
    pub norm1_proj: LayerNorm,
    pub proj: Linear,
    pub norm2_proj: LayerNorm,
    pub blocks: Vec<TntBlock>,
    pub norm: LayerNorm,
    pub head: Linear,
    image_size: usize,
    in_chans: usize,
    num_classes: usize,
    grid: usize,
    word_grid: usize,
}

impl Tnt {
    pub fn new(name: &str, vp: &VarPath, cfg: &TntConfig, o: &ModelOptions) -> Result<Self> {
        let p = cfg.patch_size;
        if !o.image_size.is_multiple_of(p) {
            candle_core::bail!("{name}: image size {} is not a multiple of the patch size {p}", o.image_size);
        }
        let grid = o.image_size / p;
        let pe = Conv2dConfig::new(o.in_chans, cfg.inner_dim, 7)
            .stride(cfg.inner_stride)
            .padding(3)
            .bias(true);
        let word_grid = pe.output_hw(p, p).0;
        let num_pixel = word_grid * word_grid;
        let (i, d) = (cfg.inner_dim, cfg.embed_dim);
        let blocks = (0..cfg.depth)
            .map(|k| {
                TntBlock::new(
                    &vp.pp("blocks").pp(k),
                    cfg,
                    num_pixel,
                    drop_path_rate(o.drop_path_rate, k, cfg.depth),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            name: name.to_string(),
            cfg: cfg.clone(),
            pixel_embed: conv2d(&vp.pp("pixel_embed").pp("proj"), pe)?,
            pixel_pos: param(vp, "pixel_pos", &[1, i, word_grid, word_grid], TRUNC_002, ParamKind::Embedding)?,
            patch_pos: param(vp, "patch_pos", &[1, grid * grid + 1, d], TRUNC_002, ParamKind::Embedding)?,
            cls_token: param(vp, "cls_token", &[1, 1, d], TRUNC_002, ParamKind::Embedding)?,
            norm1_proj: LayerNorm::new(&vp.pp("norm1_proj"), num_pixel * i, 1e-5)?,
            proj: Linear::new(&vp.pp("proj"), num_pixel * i, d, true)?,
            norm2_proj: LayerNorm::new(&vp.pp("norm2_proj"), d, 1e-5)?,
            blocks,
            norm: LayerNorm::new(&vp.pp("norm"), d, 1e-5)?,
            head: Linear::new(&vp.pp("head"), d, o.num_classes, true)?,
            image_size: o.image_size,
            in_chans: o.in_chans,
            num_classes: o.num_classes,
            grid,
            word_grid,
        })
    }

    pub fn macs(&self) -> u64 {
        let n = self.grid * self.grid;
        let words = self.word_grid * self.word_grid;
        let p = self.cfg.patch_size;
        n as u64 * conv_macs(&self.pixel_embed, p, p).0
            + self.proj.macs(n)
            + self.blocks.iter().map(|b| b.macs(n, words)).sum::<u64>()
            + self.head.macs(1)
    }
}

impl Model for Tnt {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        check_input(&self.name, x, self.in_chans, self.image_size)?;
        let (b, c, _, _) = x.dims4()?;
        let (g, p, n) = (self.grid, self.cfg.patch_size, self.grid * self.grid);
        // each patch as its own image [B*N, C, p, p]
        let patches = x
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * n, c, p, p))?;
        let w = conv_forward(&self.pixel_embed, &patches)?.broadcast_add(self.pixel_pos.as_tensor())?;
        let words = self.word_grid * self.word_grid;
        let mut pixel = w.reshape((b * n, self.cfg.inner_dim, words))?.transpose(1, 2)?.contiguous()?;
        let pe = self
            .norm2_proj
            .forward(&self.proj.forward(&self.norm1_proj.forward(&pixel.reshape((b, n, ()))?)?)?)?;
        let cls = self.cls_token.as_tensor().broadcast_as((b, 1, self.cfg.embed_dim))?;
        let mut patch = Tensor::cat(&[&cls, &pe], 1)?.broadcast_add(self.patch_pos.as_tensor())?;
        for blk in &self.blocks {
            (pixel, patch) = blk.forward(&pixel, &patch, train)?;
        }
        self.norm.forward(&patch)?.get_on_dim(1, 0)
    }
    fn forward_head(&self, f: &Tensor, _train: bool) -> Result<Tensor> {
        self.head.forward(f)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn num_features(&self) -> usize {
        self.cfg.embed_dim
    }
}

impl ZooModel for Tnt {
    fn macs(&self) -> u64 {
        Tnt::macs(self)
    }
    fn image_size(&self) -> usize {
        self.image_size
    }
}
