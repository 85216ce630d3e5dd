//! CMT (Guo et al. 2022): convolutional stem, then four stages of 2x2 patch aggregation and CMT
//! blocks. A block adds a local perception unit (LPU: x + DWConv3x3(x)), lightweight
//! multi-head self-attention (keys and values from a depthwise stride-`k` convolution with
//! BatchNorm, plus a learned relative position bias `B` per head: softmax(Q K'^T / sqrt(d) + B)
//! V') and an inverted residual feed-forward network (IRFFN: 1x1 conv, GELU, BN; x + DWConv3x3;
//! GELU, BN; 1x1 conv, BN). Head: 1x1 conv to 1280, BN, swish, global pooling, linear.
//! Parameter names follow the official code (huawei-noah/Efficient-AI-Backbones, `cmt_pytorch`).
//! The relative position tables are sized by the image size (CMT-Ti is published at 160x160).

use crate::layers::{
    check_input, conv2d, conv_forward, conv_macs, drop_path_rate, flatten_tokens, gelu, param, tokens_to_map, DropPath, LayerNorm, Linear,
};
use crate::registry::{ModelOptions, ZooModel};
use candle_core::{Result, Tensor, Var};
use candle_nn::ModuleT;
use nn_core::init::Init;
use nn_core::layers::{BatchNorm, Conv2d, Conv2dConfig};
use nn_core::{Model, ParamKind, VarPath};

/// Hyper-parameters of a CMT.
#[derive(Debug, Clone, PartialEq)]
pub struct CmtConfig {
    pub embed_dims: Vec<usize>,
    pub stem_channel: usize,
    pub fc_dim: usize,
    pub num_heads: Vec<usize>,
    pub mlp_ratio: f64,
    pub depths: Vec<usize>,
    pub sr_ratios: Vec<usize>,
}

impl CmtConfig {
    /// CMT-Ti: widths 46-92-184-368, stem 16, depths 2-2-10-2, MLP ratio 3.6.
    pub fn ti() -> Self {
        Self {
            embed_dims: vec![46, 92, 184, 368],
            stem_channel: 16,
            fc_dim: 1280,
            num_heads: vec![1, 2, 4, 8],
            mlp_ratio: 3.6,
            depths: vec![2, 2, 10, 2],
            sr_ratios: vec![8, 4, 2, 1],
        }
    }
}

/// A CMT block.
pub struct CmtBlock {
    pub proj: Conv2d,
    pub norm1: LayerNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub attn_proj: Linear,
    pub sr: Option<(Conv2d, BatchNorm)>,
    pub norm2: LayerNorm,
    pub conv1: Conv2d,
    pub conv1_bn: BatchNorm,
    pub dw: Conv2d,
    pub dw_bn: BatchNorm,
    pub conv2: Conv2d,
    pub conv2_bn: BatchNorm,
    heads: usize,
    dim: usize,
    drop_path: DropPath,
}

impl CmtBlock {
    fn new(vp: &VarPath, dim: usize, heads: usize, hidden: usize, sr: usize, dp: f64) -> Result<Self> {
        let a = vp.pp("attn");
        let m = vp.pp("mlp");
        let sr = if sr > 1 {
            let s = a.pp("sr");
            Some((
                conv2d(
                    &s.pp(0),
                    Conv2dConfig::new(dim, dim, sr).stride(sr).padding(0).groups(dim).bias(true),
                )?,
                BatchNorm::new(&s.pp(1), dim)?,
            ))
        } else {
            None
        };
        Ok(Self {
            proj: conv2d(&vp.pp("proj"), Conv2dConfig::new(dim, dim, 3).groups(dim).bias(true))?,
            norm1: LayerNorm::new(&vp.pp("norm1"), dim, 1e-6)?,
            q: Linear::new(&a.pp("q"), dim, dim, true)?,
            k: Linear::new(&a.pp("k"), dim, dim, true)?,
            v: Linear::new(&a.pp("v"), dim, dim, true)?,
            attn_proj: Linear::new(&a.pp("proj"), dim, dim, true)?,
            sr,
            norm2: LayerNorm::new(&vp.pp("norm2"), dim, 1e-6)?,
            conv1: conv2d(&m.pp("conv1").pp(0), Conv2dConfig::new(dim, hidden, 1).bias(true))?,
            conv1_bn: BatchNorm::new(&m.pp("conv1").pp(2), hidden)?,
            dw: conv2d(&m.pp("proj"), Conv2dConfig::new(hidden, hidden, 3).groups(hidden).bias(true))?,
            dw_bn: BatchNorm::new(&m.pp("proj_bn"), hidden)?,
            conv2: conv2d(&m.pp("conv2").pp(0), Conv2dConfig::new(hidden, dim, 1).bias(true))?,
            conv2_bn: BatchNorm::new(&m.pp("conv2").pp(1), dim)?,
            heads,
            dim,
            drop_path: DropPath::new(vp, dp),
        })
    }

    /// `x`: `[B, N, C]` on an `h x w` grid; `rel`: `[heads, N, N']`.
    fn forward(&self, x: &Tensor, h: usize, w: usize, rel: &Tensor, train: bool) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let map = tokens_to_map(x, h, w)?;
        let x = flatten_tokens(&(conv_forward(&self.proj, &map)? + &map)?)?;
        // lightweight attention
        let y = self.norm1.forward(&x)?;
        let q = self.q.forward(&y)?.reshape((b, n, self.heads, hd))?.transpose(1, 2)?;
        let kv_in = match &self.sr {
            Some((conv, norm)) => flatten_tokens(&norm.forward_t(&conv_forward(conv, &tokens_to_map(&y, h, w)?)?, train)?)?,
            None => y.clone(),
        };
        let nk = kv_in.dims()[1];
        let k = self.k.forward(&kv_in)?.reshape((b, nk, self.heads, hd))?.transpose(1, 2)?;
        let v = self.v.forward(&kv_in)?.reshape((b, nk, self.heads, hd))?.transpose(1, 2)?;
        let o = crate::layers::attention(&q, &k, &v, (hd as f64).powf(-0.5), Some(&rel.unsqueeze(0)?))?;
        let a = self.attn_proj.forward(&o.transpose(1, 2)?.reshape((b, n, c))?)?;
        let x = (x + self.drop_path.forward(&a, train)?)?;
        // inverted residual feed-forward
        let m = tokens_to_map(&self.norm2.forward(&x)?, h, w)?;
        let m = self.conv1_bn.forward_t(&gelu(&conv_forward(&self.conv1, &m)?)?, train)?;
        let m = (conv_forward(&self.dw, &m)? + &m)?;
        let m = self.dw_bn.forward_t(&gelu(&m)?, train)?;
        let m = self.conv2_bn.forward_t(&conv_forward(&self.conv2, &m)?, train)?;
        &x + self.drop_path.forward(&flatten_tokens(&m)?, train)?
    }

    fn macs(&self, h: usize, w: usize) -> u64 {
        let n = h * w;
        let mut m = conv_macs(&self.proj, h, w).0;
        let mut nk = n;
        if let Some((c, _)) = &self.sr {
            let (cm, oh, ow) = conv_macs(c, h, w);
            m += cm;
            nk = oh * ow;
        }
        let hd = self.dim / self.heads;
        m += self.q.macs(n)
            + self.k.macs(nk)
            + self.v.macs(nk)
            + self.attn_proj.macs(n)
            + crate::layers::attention_macs(self.heads, n, nk, hd, hd);
        m + conv_macs(&self.conv1, h, w).0 + conv_macs(&self.dw, h, w).0 + conv_macs(&self.conv2, h, w).0
    }
}

/// A stage: 2x2 patch aggregation (conv + LayerNorm), relative position table, blocks.
pub struct CmtStage {
    pub patch_proj: Conv2d,
    pub patch_norm: LayerNorm,
    pub relative_pos: Var,
    pub blocks: Vec<CmtBlock>,
}

/// CMT.
pub struct Cmt {
    name: String,
    pub stem: Vec<(Conv2d, BatchNorm)>,
    pub stages: Vec<CmtStage>,
    pub fc: Conv2d,
    pub fc_bn: BatchNorm,
    pub head: Linear,
    image_size: usize,
    in_chans: usize,
    num_classes: usize,
    num_features: usize,
}

impl Cmt {
    pub fn new(name: &str, vp: &VarPath, cfg: &CmtConfig, o: &ModelOptions) -> Result<Self> {
        if !o.image_size.is_multiple_of(32) {
            candle_core::bail!("{name}: image size {} must be a multiple of 32", o.image_size);
        }
        let sc = cfg.stem_channel;
        let stem = (0..3)
            .map(|i| {
                let cin = if i == 0 { o.in_chans } else { sc };
                let c = Conv2dConfig::new(cin, sc, 3).stride(if i == 0 { 2 } else { 1 }).bias(true);
                Ok((
                    conv2d(&vp.pp(format!("stem_conv{}", i + 1)), c)?,
                    BatchNorm::new(&vp.pp(format!("stem_norm{}", i + 1)), sc)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let total: usize = cfg.depths.iter().sum();
        let (mut cin, mut res, mut k) = (sc, o.image_size / 2, 0);
        let mut stages = Vec::new();
        for (i, letter) in ["a", "b", "c", "d"].iter().enumerate().take(cfg.depths.len()) {
            let dim = cfg.embed_dims[i];
            res /= 2;
            let sr = cfg.sr_ratios[i];
            if res % sr != 0 {
                candle_core::bail!("{name}: stage {} map {res}x{res} is not divisible by its reduction {sr}", i + 1);
            }
            let pe = vp.pp(format!("patch_embed_{letter}"));
            let n = res * res;
            let hidden = (dim as f64 * cfg.mlp_ratio) as usize;
            let blocks = (0..cfg.depths[i])
                .map(|j| {
                    CmtBlock::new(
                        &vp.pp(format!("blocks_{letter}")).pp(j),
                        dim,
                        cfg.num_heads[i],
                        hidden,
                        sr,
                        drop_path_rate(o.drop_path_rate, k + j, total),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            k += cfg.depths[i];
            stages.push(CmtStage {
                patch_proj: conv2d(&pe.pp("proj"), Conv2dConfig::new(cin, dim, 2).stride(2).padding(0).bias(true))?,
                patch_norm: LayerNorm::new(&pe.pp("norm"), dim, 1e-5)?,
                relative_pos: param(
                    vp,
                    &format!("relative_pos_{letter}"),
                    &[cfg.num_heads[i], n, n / (sr * sr)],
                    Init::Normal { mean: 0.0, std: 1.0 },
                    ParamKind::Embedding,
                )?,
                blocks,
            });
            cin = dim;
        }
        Ok(Self {
            name: name.to_string(),
            stem,
            stages,
            fc: conv2d(&vp.pp("_fc"), Conv2dConfig::new(cin, cfg.fc_dim, 1).bias(true))?,
            fc_bn: BatchNorm::new(&vp.pp("_bn"), cfg.fc_dim)?,
            head: Linear::new(&vp.pp("head"), cfg.fc_dim, o.num_classes, true)?,
            image_size: o.image_size,
            in_chans: o.in_chans,
            num_classes: o.num_classes,
            num_features: cfg.fc_dim,
        })
    }

    fn run(&self, x: &Tensor, train: bool) -> Result<(Vec<Tensor>, Tensor)> {
        check_input(&self.name, x, self.in_chans, self.image_size)?;
        let mut x = x.clone();
        for (c, b) in &self.stem {
            x = b.forward_t(&gelu(&conv_forward(c, &x)?)?, train)?;
        }
        let mut maps = Vec::new();
        for s in &self.stages {
            let y = conv_forward(&s.patch_proj, &x)?;
            let (h, w) = (y.dims()[2], y.dims()[3]);
            let mut t = s.patch_norm.forward(&flatten_tokens(&y)?)?;
            let rel = s.relative_pos.as_tensor();
            for b in &s.blocks {
                t = b.forward(&t, h, w, rel, train)?;
            }
            x = tokens_to_map(&t, h, w)?;
            maps.push(x.clone());
        }
        let f = self.fc_bn.forward_t(&conv_forward(&self.fc, &x)?, train)?.silu()?;
        Ok((maps, f.mean(3)?.mean(2)?))
    }

    pub fn macs(&self) -> u64 {
        let (mut m, mut h, mut w) = (0, self.image_size, self.image_size);
        for (c, _) in &self.stem {
            let (cm, oh, ow) = conv_macs(c, h, w);
            m += cm;
            (h, w) = (oh, ow);
        }
        for s in &self.stages {
            let (cm, oh, ow) = conv_macs(&s.patch_proj, h, w);
            m += cm;
            (h, w) = (oh, ow);
            m += s.blocks.iter().map(|b| b.macs(h, w)).sum::<u64>();
        }
        m + conv_macs(&self.fc, h, w).0 + self.head.macs(1)
    }
}

impl Model for Cmt {
    fn name(&self) -> &str {
        &self.name
    }
    /// The pooled 1280-wide features (after the 1x1 conv, BN and swish).
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.run(x, train)?.1)
    }
    fn forward_head(&self, f: &Tensor, _train: bool) -> Result<Tensor> {
        self.head.forward(f)
    }
    /// The four stage maps `[B, C_i, H_i, W_i]`, then the pooled features.
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

impl ZooModel for Cmt {
    fn macs(&self) -> u64 {
        Cmt::macs(self)
    }
    fn image_size(&self) -> usize {
        self.image_size
    }
}
