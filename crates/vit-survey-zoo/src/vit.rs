//! ViT (Dosovitskiy et al. 2021) and DeiT with a distillation token (Touvron et al. 2021).
//!
//! An image is cut into `P x P` patches, each linearly embedded (a `P x P` stride-`P`
//! convolution), a class token (and for DeiT-distilled a distillation token) is prepended, a
//! learned position embedding added, and a stack of pre-norm encoder blocks applied. Parameter
//! names follow timm's `VisionTransformer` (`patch_embed.proj`, `blocks.{i}.attn.qkv`, ...).

use crate::layers::{
    check_input, conv2d, conv_forward, conv_macs, drop_path_rate, flatten_tokens, param, Block, LayerNorm, Linear, TRUNC_002,
};
use crate::registry::{ModelOptions, ZooModel};
use candle_core::{Result, Tensor, Var};
use nn_core::init::Init;
use nn_core::layers::{Conv2d, Conv2dConfig};
use nn_core::{Model, ParamKind, VarPath};

/// Hyper-parameters of a ViT/DeiT.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    /// DeiT's distillation token and second head.
    pub distilled: bool,
    /// CPVT (Chu et al. 2021): no learned position embedding; a positional encoding generator
    /// (PEG, a 3x3 depthwise convolution on the token grid added to the tokens) after the
    /// first block, so positions are conditioned on the neighbourhood and any grid size works.
    pub peg: bool,
    /// Heads per block when some were pruned (each `embed_dim / num_heads` wide); `None`:
    /// `num_heads` everywhere. See [`crate::efficient::prune_heads`].
    pub block_heads: Option<Vec<usize>>,
}

impl VitConfig {
    pub fn new(patch_size: usize, embed_dim: usize, depth: usize, num_heads: usize) -> Self {
        Self {
            patch_size,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            qkv_bias: true,
            distilled: false,
            peg: false,
            block_heads: None,
        }
    }
    /// ViT-Ti/16 (DeiT-Ti): 192 wide, 12 deep, 3 heads.
    pub fn tiny(patch: usize) -> Self {
        Self::new(patch, 192, 12, 3)
    }
    /// ViT-S/16 (DeiT-S): 384 wide, 12 deep, 6 heads.
    pub fn small(patch: usize) -> Self {
        Self::new(patch, 384, 12, 6)
    }
    /// ViT-B/16: 768 wide, 12 deep, 12 heads.
    pub fn base(patch: usize) -> Self {
        Self::new(patch, 768, 12, 12)
    }
    pub fn distilled(mut self) -> Self {
        self.distilled = true;
        self
    }
    /// CPVT: the PEG replaces the position embedding.
    pub fn cpvt(mut self) -> Self {
        self.peg = true;
        self
    }
}

/// A ViT / DeiT.
pub struct VisionTransformer {
    name: String,
    pub cfg: VitConfig,
    pub patch_embed: Conv2d,
    pub cls_token: Var,
    pub dist_token: Option<Var>,
    /// Absent in CPVT (replaced by the PEG).
    pub pos_embed: Option<Var>,
    /// CPVT's positional encoding generator (`pos_block.proj.0`, depthwise 3x3 with bias).
    pub pos_block: Option<Conv2d>,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub head: Linear,
    pub head_dist: Option<Linear>,
    image_size: usize,
    in_chans: usize,
    num_classes: usize,
}

impl VisionTransformer {
    pub fn new(name: &str, vp: &VarPath, cfg: &VitConfig, opts: &ModelOptions) -> Result<Self> {
        let (p, d) = (cfg.patch_size, cfg.embed_dim);
        if !opts.image_size.is_multiple_of(p) {
            candle_core::bail!("{name}: image size {} is not a multiple of the patch size {p}", opts.image_size);
        }
        let grid = opts.image_size / p;
        let prefix = 1 + cfg.distilled as usize;
        if cfg.num_heads == 0 || !d.is_multiple_of(cfg.num_heads) {
            candle_core::bail!("{name}: embed dim {d} is not divisible by {} heads", cfg.num_heads);
        }
        let head_dim = d / cfg.num_heads;
        if let Some(bh) = &cfg.block_heads {
            if bh.len() != cfg.depth || bh.iter().any(|&h| h == 0 || h > cfg.num_heads) {
                candle_core::bail!(
                    "{name}: block_heads {bh:?} must give 1..={} heads for each of {} blocks",
                    cfg.num_heads,
                    cfg.depth
                );
            }
        }
        let patch_embed = conv2d(
            &vp.pp("patch_embed").pp("proj"),
            Conv2dConfig::new(opts.in_chans, d, p).stride(p).padding(0).bias(true),
        )?;
        let cls_token = param(
            vp,
            "cls_token",
            &[1, 1, d],
            Init::Normal { mean: 0.0, std: 1e-6 },
            ParamKind::Embedding,
        )?;
        let dist_token = if cfg.distilled {
            Some(param(vp, "dist_token", &[1, 1, d], TRUNC_002, ParamKind::Embedding)?)
        } else {
            None
        };
        let (pos_embed, pos_block) = if cfg.peg {
            let c = Conv2dConfig::new(d, d, 3).groups(d).bias(true);
            (None, Some(conv2d(&vp.pp("pos_block").pp("proj").pp(0), c)?))
        } else {
            (
                Some(param(
                    vp,
                    "pos_embed",
                    &[1, grid * grid + prefix, d],
                    TRUNC_002,
                    ParamKind::Embedding,
                )?),
                None,
            )
        };
        let blocks = (0..cfg.depth)
            .map(|i| {
                Block::with_heads(
                    &vp.pp("blocks").pp(i),
                    d,
                    cfg.block_heads.as_ref().map_or(cfg.num_heads, |h| h[i]),
                    head_dim,
                    cfg.mlp_ratio,
                    cfg.qkv_bias,
                    1e-6,
                    drop_path_rate(opts.drop_path_rate, i, cfg.depth),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(&vp.pp("norm"), d, 1e-6)?;
        let head = Linear::new(&vp.pp("head"), d, opts.num_classes, true)?;
        let head_dist = if cfg.distilled {
            Some(Linear::new(&vp.pp("head_dist"), d, opts.num_classes, true)?)
        } else {
            None
        };
        Ok(Self {
            name: name.to_string(),
            cfg: cfg.clone(),
            patch_embed,
            cls_token,
            dist_token,
            pos_embed,
            pos_block,
            blocks,
            norm,
            head,
            head_dist,
            image_size: opts.image_size,
            in_chans: opts.in_chans,
            num_classes: opts.num_classes,
        })
    }

    /// Class (and distillation) tokens before the patch tokens: 1 or 2.
    pub fn prefix(&self) -> usize {
        1 + self.dist_token.is_some() as usize
    }

    /// What the model was built for (no stochastic depth): rebuilding with these options and
    /// the same config gives the same parameter shapes.
    pub fn options(&self) -> ModelOptions {
        ModelOptions {
            in_chans: self.in_chans,
            ..ModelOptions::new(self.num_classes, self.image_size)
        }
    }

    /// The token sequence `[B, prefix + N, D]` that enters the first block: patch embedding,
    /// class (and distillation) tokens, position embedding.
    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        check_input(&self.name, x, self.in_chans, self.image_size)?;
        let b = x.dims()[0];
        let t = flatten_tokens(&conv_forward(&self.patch_embed, x)?)?;
        let d = self.cfg.embed_dim;
        let mut parts = vec![self.cls_token.as_tensor().broadcast_as((b, 1, d))?];
        if let Some(dt) = &self.dist_token {
            parts.push(dt.as_tensor().broadcast_as((b, 1, d))?);
        }
        parts.push(t);
        let mut x = Tensor::cat(&parts, 1)?;
        if let Some(pe) = &self.pos_embed {
            x = x.broadcast_add(pe.as_tensor())?;
        }
        Ok(x)
    }

    /// The normalised token sequence `[B, prefix + N, D]` after the last block.
    pub fn forward_tokens(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.embed(x)?;
        let g = self.image_size / self.cfg.patch_size;
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(&x, train)?;
            if let (0, Some(peg)) = (i, &self.pos_block) {
                // PEG on the patch tokens (class tokens excluded): x + DWConv(x)
                let p = self.prefix();
                let grid = crate::layers::tokens_to_map(&x.narrow(1, p, g * g)?, g, g)?;
                let pos = crate::layers::flatten_tokens(&(conv_forward(peg, &grid)? + &grid)?)?;
                x = Tensor::cat(&[&x.narrow(1, 0, p)?, &pos], 1)?;
            }
        }
        self.norm.forward(&x)
    }

    /// DeiT: the class-head and distillation-head logits (train the second against a teacher).
    pub fn forward_distill(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let hd = self
            .head_dist
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg(format!("{} has no distillation token", self.name)))?;
        let t = self.forward_tokens(x, train)?;
        Ok((self.head.forward(&t.get_on_dim(1, 0)?)?, hd.forward(&t.get_on_dim(1, 1)?)?))
    }

    /// MACs per image: patch embedding, blocks, head(s).
    pub fn macs(&self) -> u64 {
        let (pe, oh, ow) = conv_macs(&self.patch_embed, self.image_size, self.image_size);
        let n = oh * ow + self.prefix();
        let peg = self.pos_block.as_ref().map_or(0, |c| conv_macs(c, oh, ow).0);
        pe + peg + self.blocks.iter().map(|b| b.macs(n)).sum::<u64>() + self.head.macs(1) + self.head_dist.as_ref().map_or(0, |h| h.macs(1))
    }
}

impl Model for VisionTransformer {
    fn name(&self) -> &str {
        &self.name
    }
    /// The class token (DeiT-distilled: class and distillation tokens concatenated, `[B, 2D]`).
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let t = self.forward_tokens(x, train)?;
        t.narrow(1, 0, self.prefix())?.flatten_from(1)
    }
    /// DeiT-distilled averages the two heads' logits (timm's inference rule).
    fn forward_head(&self, f: &Tensor, _train: bool) -> Result<Tensor> {
        let d = self.cfg.embed_dim;
        match &self.head_dist {
            None => self.head.forward(f),
            Some(hd) => {
                let a = self.head.forward(&f.narrow(1, 0, d)?)?;
                let b = hd.forward(&f.narrow(1, d, d)?)?;
                (a + b)? / 2.0
            }
        }
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn num_features(&self) -> usize {
        self.cfg.embed_dim * self.prefix()
    }
}

impl ZooModel for VisionTransformer {
    fn macs(&self) -> u64 {
        VisionTransformer::macs(self)
    }
    fn image_size(&self) -> usize {
        self.image_size
    }
}
