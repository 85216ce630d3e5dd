//! Pyramid Vision Transformer v2 (Wang et al. 2022): four stages of overlapping patch
//! embeddings (strided convolutions with LayerNorm), spatial-reduction attention (keys and
//! values from a feature map shrunk by an `R x R` stride-`R` convolution, SRA(Q, K, V) =
//! Concat(head_j) W^O with head_j = Attention(Q W_j^Q, SR(K) W_j^K, SR(V) W_j^V)) and a
//! convolutional feed-forward (a 3x3 depthwise convolution between the two linear layers).
//! Names follow timm 1.0's `pvt_v2`.

use crate::layers::{
    check_input, conv2d, conv_forward, conv_macs, drop_path_rate, flatten_tokens, patchify_conv_tokens, tokens_to_map, DropPath, LayerNorm,
    Linear,
};
use crate::registry::{ModelOptions, ZooModel};
use candle_core::{Result, Tensor};
use nn_core::layers::{Conv2d, Conv2dConfig};
use nn_core::{Model, VarPath};

/// Hyper-parameters of a PVTv2.
#[derive(Debug, Clone, PartialEq)]
pub struct PvtV2Config {
    pub embed_dims: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub mlp_ratios: Vec<usize>,
    pub depths: Vec<usize>,
    pub sr_ratios: Vec<usize>,
    /// Stride of the first patch embedding (4 on ImageNet; kernel 2 * stride - 1).
    pub stem_stride: usize,
}

impl PvtV2Config {
    /// PVTv2-B0: widths 32-64-160-256, depth 2 per stage, heads 1-2-5-8, SR ratios 8-4-2-1.
    pub fn b0() -> Self {
        Self {
            embed_dims: vec![32, 64, 160, 256],
            num_heads: vec![1, 2, 5, 8],
            mlp_ratios: vec![8, 8, 4, 4],
            depths: vec![2, 2, 2, 2],
            sr_ratios: vec![8, 4, 2, 1],
            stem_stride: 4,
        }
    }
}

/// Spatial-reduction attention.
pub struct SrAttention {
    pub q: Linear,
    pub kv: Linear,
    pub proj: Linear,
    /// `sr` (R x R conv, stride R) and its LayerNorm `norm`, when R > 1.
    pub sr: Option<(Conv2d, LayerNorm)>,
    heads: usize,
    head_dim: usize,
}

impl SrAttention {
    fn new(vp: &VarPath, dim: usize, heads: usize, sr: usize) -> Result<Self> {
        if !dim.is_multiple_of(heads) {
            candle_core::bail!("pvt: dim {dim} not divisible by {heads} heads");
        }
        let sr = if sr > 1 {
            Some((
                conv2d(&vp.pp("sr"), Conv2dConfig::new(dim, dim, sr).stride(sr).padding(0).bias(true))?,
                LayerNorm::new(&vp.pp("norm"), dim, 1e-5)?,
            ))
        } else {
            None
        };
        Ok(Self {
            q: Linear::new(&vp.pp("q"), dim, dim, true)?,
            kv: Linear::new(&vp.pp("kv"), dim, 2 * dim, true)?,
            proj: Linear::new(&vp.pp("proj"), dim, dim, true)?,
            sr,
            heads,
            head_dim: dim / heads,
        })
    }

    fn forward(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let q = self.q.forward(x)?.reshape((b, n, self.heads, self.head_dim))?.transpose(1, 2)?;
        let kv_in = match &self.sr {
            Some((conv, norm)) => norm.forward(&patchify_conv_tokens(conv, x, h, w)?)?,
            None => x.clone(),
        };
        let nk = kv_in.dims()[1];
        let kv = self
            .kv
            .forward(&kv_in)?
            .reshape((b, nk, 2, self.heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        let o = crate::layers::attention(&q, &kv.get(0)?, &kv.get(1)?, (self.head_dim as f64).powf(-0.5), None)?;
        self.proj.forward(&o.transpose(1, 2)?.reshape((b, n, c))?)
    }

    fn macs(&self, h: usize, w: usize) -> u64 {
        let n = h * w;
        let (mut m, mut nk) = (0, n);
        if let Some((conv, _)) = &self.sr {
            let (cm, oh, ow) = conv_macs(conv, h, w);
            m += cm;
            nk = oh * ow;
        }
        m + self.q.macs(n)
            + self.kv.macs(nk)
            + self.proj.macs(n)
            + crate::layers::attention_macs(self.heads, n, nk, self.head_dim, self.head_dim)
    }
}

/// The convolutional feed-forward: fc1, 3x3 depthwise conv, GELU, fc2.
pub struct ConvMlp {
    pub fc1: Linear,
    pub dwconv: Conv2d,
    pub fc2: Linear,
}

impl ConvMlp {
    fn forward(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let y = self.fc1.forward(x)?;
        // the 3x3 depthwise conv directly on the tokens (no layout round trip)
        let bias = match &self.dwconv.bias {
            Some(b) => b.as_tensor().clone(),
            None => Tensor::zeros(self.dwconv.config.out_channels, y.dtype(), y.device())?,
        };
        let bias = &bias;
        // the convolution and GELU in one pass
        let y = nn_core::ops::depthwise_tokens::depthwise_conv_tokens_gelu(&y, self.dwconv.weight.as_tensor(), bias, h, w)?;
        self.fc2.forward(&y)
    }
    fn macs(&self, h: usize, w: usize) -> u64 {
        self.fc1.macs(h * w) + conv_macs(&self.dwconv, h, w).0 + self.fc2.macs(h * w)
    }
}

/// A PVTv2 block.
pub struct PvtBlock {
    pub norm1: LayerNorm,
    pub attn: SrAttention,
    pub norm2: LayerNorm,
    pub mlp: ConvMlp,
    drop_path: DropPath,
}

impl PvtBlock {
    fn new(vp: &VarPath, dim: usize, heads: usize, sr: usize, mlp_ratio: usize, dp: f64) -> Result<Self> {
        let hidden = dim * mlp_ratio;
        let m = vp.pp("mlp");
        Ok(Self {
            norm1: LayerNorm::new(&vp.pp("norm1"), dim, 1e-6)?,
            attn: SrAttention::new(&vp.pp("attn"), dim, heads, sr)?,
            norm2: LayerNorm::new(&vp.pp("norm2"), dim, 1e-6)?,
            mlp: ConvMlp {
                fc1: Linear::new(&m.pp("fc1"), dim, hidden, true)?,
                dwconv: conv2d(&m.pp("dwconv"), Conv2dConfig::new(hidden, hidden, 3).groups(hidden).bias(true))?,
                fc2: Linear::new(&m.pp("fc2"), hidden, dim, true)?,
            },
            drop_path: DropPath::new(vp, dp),
        })
    }
    fn forward(&self, x: &Tensor, h: usize, w: usize, train: bool) -> Result<Tensor> {
        let x = (x + self.drop_path.forward(&self.attn.forward(&self.norm1.forward(x)?, h, w)?, train)?)?;
        &x + self.drop_path.forward(&self.mlp.forward(&self.norm2.forward(&x)?, h, w)?, train)?
    }
}

/// Overlapping patch embedding: conv (kernel 2s - 1, stride s, padding s - 1), LayerNorm.
pub struct OverlapPatchEmbed {
    pub proj: Conv2d,
    pub norm: LayerNorm,
}

impl OverlapPatchEmbed {
    fn new(vp: &VarPath, cin: usize, cout: usize, kernel: usize, stride: usize) -> Result<Self> {
        Ok(Self {
            proj: conv2d(
                &vp.pp("proj"),
                Conv2dConfig::new(cin, cout, kernel).stride(stride).padding(kernel / 2).bias(true),
            )?,
            norm: LayerNorm::new(&vp.pp("norm"), cout, 1e-5)?,
        })
    }
}

/// A stage: (down-sampling) patch embedding, blocks, LayerNorm.
pub struct PvtStage {
    pub embed: OverlapPatchEmbed,
    pub blocks: Vec<PvtBlock>,
    pub norm: LayerNorm,
}

/// PVTv2.
pub struct PvtV2 {
    name: String,
    pub stages: Vec<PvtStage>,
    pub head: Linear,
    image_size: usize,
    in_chans: usize,
    num_classes: usize,
    num_features: usize,
}

impl PvtV2 {
    pub fn new(name: &str, vp: &VarPath, cfg: &PvtV2Config, o: &ModelOptions) -> Result<Self> {
        let total: usize = cfg.depths.iter().sum();
        let mut stages = Vec::new();
        let mut cin = o.in_chans;
        let mut k = 0;
        let mut res = o.image_size;
        for i in 0..cfg.depths.len() {
            let dim = cfg.embed_dims[i];
            // timm: stage 0's embedding is the top-level `patch_embed`, later ones `stages.{i}.downsample`
            let (embed, stride) = if i == 0 {
                let s = cfg.stem_stride;
                (OverlapPatchEmbed::new(&vp.pp("patch_embed"), cin, dim, 2 * s - 1, s)?, s)
            } else {
                (OverlapPatchEmbed::new(&vp.pp("stages").pp(i).pp("downsample"), cin, dim, 3, 2)?, 2)
            };
            res = res.div_ceil(stride);
            if !res.is_multiple_of(cfg.sr_ratios[i]) {
                candle_core::bail!(
                    "{name}: stage {i} feature map {res}x{res} is not divisible by its spatial reduction {}",
                    cfg.sr_ratios[i]
                );
            }
            let sp = vp.pp("stages").pp(i);
            let blocks = (0..cfg.depths[i])
                .map(|j| {
                    let dp = drop_path_rate(o.drop_path_rate, k + j, total);
                    PvtBlock::new(
                        &sp.pp("blocks").pp(j),
                        dim,
                        cfg.num_heads[i],
                        cfg.sr_ratios[i],
                        cfg.mlp_ratios[i],
                        dp,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            k += cfg.depths[i];
            let norm = LayerNorm::new(&sp.pp("norm"), dim, 1e-6)?;
            stages.push(PvtStage { embed, blocks, norm });
            cin = dim;
        }
        Ok(Self {
            name: name.to_string(),
            stages,
            head: Linear::new(&vp.pp("head"), cin, o.num_classes, true)?,
            image_size: o.image_size,
            in_chans: o.in_chans,
            num_classes: o.num_classes,
            num_features: cin,
        })
    }

    fn stage_maps(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        check_input(&self.name, x, self.in_chans, self.image_size)?;
        let mut x = x.clone();
        let mut outs = Vec::new();
        for s in &self.stages {
            let y = conv_forward(&s.embed.proj, &x)?;
            let (h, w) = (y.dims()[2], y.dims()[3]);
            let mut t = s.embed.norm.forward(&flatten_tokens(&y)?)?;
            for b in &s.blocks {
                t = b.forward(&t, h, w, train)?;
            }
            x = tokens_to_map(&s.norm.forward(&t)?, h, w)?;
            outs.push(x.clone());
        }
        Ok(outs)
    }

    pub fn macs(&self) -> u64 {
        let mut m = 0;
        let (mut h, mut w) = (self.image_size, self.image_size);
        for s in &self.stages {
            let (cm, oh, ow) = conv_macs(&s.embed.proj, h, w);
            m += cm;
            (h, w) = (oh, ow);
            m += s.blocks.iter().map(|b| b.attn.macs(h, w) + b.mlp.macs(h, w)).sum::<u64>();
        }
        m + self.head.macs(1)
    }
}

impl Model for PvtV2 {
    fn name(&self) -> &str {
        &self.name
    }
    /// The last stage averaged over positions.
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.stage_maps(x, train)?.pop().expect("stages").mean(3)?.mean(2)
    }
    fn forward_head(&self, f: &Tensor, _train: bool) -> Result<Tensor> {
        self.head.forward(f)
    }
    /// The four stage maps `[B, C_i, H_i, W_i]`, then the pooled features.
    fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut st = self.stage_maps(x, train)?;
        let pooled = st.last().expect("stages").mean(3)?.mean(2)?;
        st.push(pooled);
        Ok(st)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn num_features(&self) -> usize {
        self.num_features
    }
}

impl ZooModel for PvtV2 {
    fn macs(&self) -> u64 {
        PvtV2::macs(self)
    }
    fn image_size(&self) -> usize {
        self.image_size
    }
}

/// Hyper-parameters of PVT v1 (Wang et al. 2021).
#[derive(Debug, Clone, PartialEq)]
pub struct PvtV1Config {
    pub patch_size: usize,
    pub embed_dims: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub mlp_ratios: Vec<usize>,
    pub depths: Vec<usize>,
    pub sr_ratios: Vec<usize>,
}

impl PvtV1Config {
    /// PVT-Tiny: widths 64-128-320-512, depths 2-2-2-2, heads 1-2-5-8, SR 8-4-2-1.
    pub fn tiny() -> Self {
        Self {
            patch_size: 4,
            embed_dims: vec![64, 128, 320, 512],
            num_heads: vec![1, 2, 5, 8],
            mlp_ratios: vec![8, 8, 4, 4],
            depths: vec![2, 2, 2, 2],
            sr_ratios: vec![8, 4, 2, 1],
        }
    }
    /// PVT-Small: as Tiny with depths 3-4-6-3.
    pub fn small() -> Self {
        Self {
            depths: vec![3, 4, 6, 3],
            ..Self::tiny()
        }
    }
}

/// A PVT v1 block: spatial-reduction attention and a plain MLP.
pub struct PvtV1Block {
    pub norm1: LayerNorm,
    pub attn: SrAttention,
    pub norm2: LayerNorm,
    pub mlp: crate::layers::Mlp,
    drop_path: DropPath,
}

/// A PVT v1 stage: non-overlapping patch embedding (conv + LayerNorm), a learned position
/// embedding (the last stage also has the class token's), blocks.
pub struct PvtV1Stage {
    pub patch_embed: OverlapPatchEmbed,
    pub pos_embed: candle_core::Var,
    pub blocks: Vec<PvtV1Block>,
}

/// PVT v1 with the official repository's parameter names (`patch_embed{i}`, `pos_embed{i}`,
/// `block{i}.{j}`, `cls_token`, `norm`, `head`); the class token joins at the last stage.
pub struct PvtV1 {
    name: String,
    pub stages: Vec<PvtV1Stage>,
    pub cls_token: candle_core::Var,
    pub norm: LayerNorm,
    pub head: Linear,
    image_size: usize,
    in_chans: usize,
    num_classes: usize,
    num_features: usize,
}

impl PvtV1 {
    pub fn new(name: &str, vp: &VarPath, cfg: &PvtV1Config, o: &ModelOptions) -> Result<Self> {
        use crate::layers::{param, TRUNC_002};
        use nn_core::ParamKind;
        let n = cfg.depths.len();
        let total_down = cfg.patch_size << (n - 1);
        if !o.image_size.is_multiple_of(total_down) {
            candle_core::bail!("{name}: image size {} must be a multiple of {total_down}", o.image_size);
        }
        let total: usize = cfg.depths.iter().sum();
        let mut stages = Vec::new();
        let (mut cin, mut res, mut k) = (o.in_chans, o.image_size, 0);
        for i in 0..n {
            let (dim, p) = (cfg.embed_dims[i], if i == 0 { cfg.patch_size } else { 2 });
            res /= p;
            if res % cfg.sr_ratios[i] != 0 {
                candle_core::bail!(
                    "{name}: stage {} map {res}x{res} is not divisible by its spatial reduction {}",
                    i + 1,
                    cfg.sr_ratios[i]
                );
            }
            let pe = vp.pp(format!("patch_embed{}", i + 1));
            let patch_embed = OverlapPatchEmbed {
                proj: conv2d(&pe.pp("proj"), Conv2dConfig::new(cin, dim, p).stride(p).padding(0).bias(true))?,
                norm: LayerNorm::new(&pe.pp("norm"), dim, 1e-5)?,
            };
            let tokens = res * res + (i == n - 1) as usize;
            let pos_embed = param(
                vp,
                &format!("pos_embed{}", i + 1),
                &[1, tokens, dim],
                TRUNC_002,
                ParamKind::Embedding,
            )?;
            let blocks = (0..cfg.depths[i])
                .map(|j| {
                    let bp = vp.pp(format!("block{}", i + 1)).pp(j);
                    Ok(PvtV1Block {
                        norm1: LayerNorm::new(&bp.pp("norm1"), dim, 1e-6)?,
                        attn: SrAttention::new(&bp.pp("attn"), dim, cfg.num_heads[i], cfg.sr_ratios[i])?,
                        norm2: LayerNorm::new(&bp.pp("norm2"), dim, 1e-6)?,
                        mlp: crate::layers::Mlp::new(&bp.pp("mlp"), dim, dim * cfg.mlp_ratios[i], dim)?,
                        drop_path: DropPath::new(&bp, drop_path_rate(o.drop_path_rate, k + j, total)),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            k += cfg.depths[i];
            stages.push(PvtV1Stage {
                patch_embed,
                pos_embed,
                blocks,
            });
            cin = dim;
        }
        Ok(Self {
            name: name.to_string(),
            stages,
            cls_token: param(vp, "cls_token", &[1, 1, cin], TRUNC_002, ParamKind::Embedding)?,
            norm: LayerNorm::new(&vp.pp("norm"), cin, 1e-6)?,
            head: Linear::new(&vp.pp("head"), cin, o.num_classes, true)?,
            image_size: o.image_size,
            in_chans: o.in_chans,
            num_classes: o.num_classes,
            num_features: cin,
        })
    }

    fn run(&self, x: &Tensor, train: bool) -> Result<(Vec<Tensor>, Tensor)> {
        check_input(&self.name, x, self.in_chans, self.image_size)?;
        let b = x.dims()[0];
        let last = self.stages.len() - 1;
        let mut x = x.clone();
        let mut maps = Vec::new();
        let mut cls = None;
        for (i, s) in self.stages.iter().enumerate() {
            let y = conv_forward(&s.patch_embed.proj, &x)?;
            let (h, w) = (y.dims()[2], y.dims()[3]);
            let mut t = s.patch_embed.norm.forward(&flatten_tokens(&y)?)?;
            if i == last {
                let c = self.cls_token.as_tensor().broadcast_as((b, 1, self.num_features))?;
                t = Tensor::cat(&[&c, &t], 1)?;
            }
            t = t.broadcast_add(s.pos_embed.as_tensor())?;
            for blk in &s.blocks {
                // the class token takes part in attention; the spatial reduction sees the grid only
                t = if i == last {
                    let h1 = blk.norm1.forward(&t)?;
                    let a = Self::attn_with_cls(&blk.attn, &h1, h, w)?;
                    let t2 = (&t + blk.drop_path.forward(&a, train)?)?;
                    (&t2 + blk.drop_path.forward(&blk.mlp.forward(&blk.norm2.forward(&t2)?)?, train)?)?
                } else {
                    let t2 = (&t + blk.drop_path.forward(&blk.attn.forward(&blk.norm1.forward(&t)?, h, w)?, train)?)?;
                    (&t2 + blk.drop_path.forward(&blk.mlp.forward(&blk.norm2.forward(&t2)?)?, train)?)?
                };
            }
            if i == last {
                let t = self.norm.forward(&t)?;
                maps.push(tokens_to_map(&t.narrow(1, 1, h * w)?, h, w)?);
                cls = Some(t.get_on_dim(1, 0)?);
            } else {
                x = tokens_to_map(&t, h, w)?;
                maps.push(x.clone());
            }
        }
        Ok((maps, cls.expect("last stage")))
    }

    /// Attention of the last stage (sr = 1 there in every published size; with sr > 1 the
    /// class token is left out of the reduced keys, as the reference reshape would fail).
    fn attn_with_cls(a: &SrAttention, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        if a.sr.is_none() {
            return a.forward(x, h, w);
        }
        candle_core::bail!("PVT v1: spatial reduction in the class-token stage is not supported ({h}x{w})")
    }

    pub fn macs(&self) -> u64 {
        let (mut m, mut h, mut w) = (0, self.image_size, self.image_size);
        let last = self.stages.len() - 1;
        for (i, s) in self.stages.iter().enumerate() {
            let (cm, oh, ow) = conv_macs(&s.patch_embed.proj, h, w);
            m += cm;
            (h, w) = (oh, ow);
            for b in &s.blocks {
                if i == last {
                    let n = h * w + 1;
                    m += b.attn.q.macs(n)
                        + b.attn.kv.macs(n)
                        + b.attn.proj.macs(n)
                        + crate::layers::attention_macs(b.attn.heads, n, n, b.attn.head_dim, b.attn.head_dim);
                    m += b.mlp.macs(n);
                } else {
                    m += b.attn.macs(h, w) + b.mlp.macs(h * w);
                }
            }
        }
        m + self.head.macs(1)
    }
}

impl Model for PvtV1 {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.run(x, train)?.1)
    }
    fn forward_head(&self, f: &Tensor, _train: bool) -> Result<Tensor> {
        self.head.forward(f)
    }
    /// The four stage maps `[B, C_i, H_i, W_i]` (the last normalised), then the class token.
    fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let (mut maps, f) = self.run(x, train)?;
        maps.push(f);
        Ok(maps)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn num_features(&self) -> usize {
        self.num_features
    }
}

impl ZooModel for PvtV1 {
    fn macs(&self) -> u64 {
        PvtV1::macs(self)
    }
    fn image_size(&self) -> usize {
        self.image_size
    }
}
