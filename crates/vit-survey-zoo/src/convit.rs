//! ConViT (d'Ascoli et al. 2021): the first blocks use gated positional self-attention (GPSA),
//! `A = (1 - sigmoid(lambda)) softmax(Q K^T / sqrt(d)) + sigmoid(lambda) softmax(v_pos^T r)`,
//! renormalised (Eq. (5) of the ConViT paper), where `r` holds relative offsets (dx, dy,
//! dx^2 + dy^2) and the positional part is initialised to act like a convolution; the class
//! token joins at `local_up_to_layer`, after which blocks use plain self-attention.

use crate::layers::{
    check_input, conv2d, conv_forward, conv_macs, drop_path_rate, flatten_tokens, param, DropPath, LayerNorm, Linear, Mlp, TRUNC_002,
};
use crate::registry::{ModelOptions, ZooModel};
use candle_core::{Device, Result, Tensor, Var};
use nn_core::init::Init;
use nn_core::layers::functional::softmax_last_dim;
use nn_core::layers::{Conv2d, Conv2dConfig};
use nn_core::{Model, ParamKind, VarPath};

/// Hyper-parameters of a ConViT.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvitConfig {
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub local_up_to_layer: usize,
    pub locality_strength: f64,
}

impl ConvitConfig {
    /// ConViT-Ti: 4 heads of 48, 12 blocks, the first 10 GPSA.
    pub fn tiny() -> Self {
        Self {
            patch_size: 16,
            embed_dim: 192,
            depth: 12,
            num_heads: 4,
            local_up_to_layer: 10,
            locality_strength: 1.0,
        }
    }
}

/// `[1, N, N, 3]` relative offsets (dx, dy, dx^2 + dy^2) between the patches of a `g x g` grid.
pub fn rel_indices(g: usize) -> Vec<f32> {
    let n = g * g;
    let mut v = Vec::with_capacity(n * n * 3);
    for a in 0..n {
        for b in 0..n {
            let dx = (b % g) as f32 - (a % g) as f32;
            let dy = (b / g) as f32 - (a / g) as f32;
            v.extend_from_slice(&[dx, dy, dx * dx + dy * dy]);
        }
    }
    v
}

/// Gated positional self-attention.
pub struct Gpsa {
    pub qk: Linear,
    pub v: Linear,
    pub proj: Linear,
    pub pos_proj: Linear,
    pub gating_param: Var,
    rel: Tensor,
    heads: usize,
    head_dim: usize,
    n: usize,
}

impl Gpsa {
    fn new(vp: &VarPath, dim: usize, heads: usize, grid: usize, locality: f64) -> Result<Self> {
        let n = grid * grid;
        let s = Self {
            qk: Linear::new(&vp.pp("qk"), dim, 2 * dim, false)?,
            v: Linear::new(&vp.pp("v"), dim, dim, false)?,
            proj: Linear::new(&vp.pp("proj"), dim, dim, true)?,
            pos_proj: Linear::new(&vp.pp("pos_proj"), 3, heads, true)?,
            gating_param: param(vp, "gating_param", &[heads], Init::ONES, ParamKind::Weight)?,
            rel: Tensor::from_vec(rel_indices(grid), (1, n, n, 3), &Device::Cpu)?,
            heads,
            head_dim: dim / heads,
            n,
        };
        s.local_init(dim, locality)?;
        Ok(s)
    }

    /// ConViT's convolutional initialisation: identity values, heads attending to the offsets
    /// of a sqrt(h) x sqrt(h) kernel.
    fn local_init(&self, dim: usize, locality: f64) -> Result<()> {
        let dev = self.v.weight.device().clone();
        self.v.weight.set(&Tensor::eye(dim, candle_core::DType::F32, &dev)?)?;
        let k = (self.heads as f64).sqrt() as usize;
        let center = if k.is_multiple_of(2) {
            (k as f64 - 1.0) / 2.0
        } else {
            (k / 2) as f64
        };
        let mut w = self.pos_proj.weight.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        for h1 in 0..k {
            for h2 in 0..k {
                let p = h1 + k * h2;
                w[p * 3 + 2] = -1.0;
                w[p * 3 + 1] = (2.0 * (h1 as f64 - center)) as f32;
                w[p * 3] = (2.0 * (h2 as f64 - center)) as f32;
            }
        }
        let w: Vec<f32> = w.iter().map(|x| x * locality as f32).collect();
        self.pos_proj.weight.set(&Tensor::from_vec(w, (self.heads, 3), &dev)?)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let qk = self
            .qk
            .forward(x)?
            .reshape((b, n, 2, self.heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        let patch = crate::layers::attention_probs(&qk.get(0)?, &qk.get(1)?, (self.head_dim as f64).powf(-0.5), None)?;
        let rel = self.rel.to_device(x.device())?.to_dtype(x.dtype())?;
        let pos = softmax_last_dim(&self.pos_proj.forward(&rel)?.permute((0, 3, 1, 2))?)?; // [1, H, N, N]
        let g = candle_nn::ops::sigmoid(&self.gating_param.as_tensor().reshape((1, self.heads, 1, 1))?)?;
        let attn = patch.broadcast_mul(&(1.0 - &g)?)?.broadcast_add(&pos.broadcast_mul(&g)?)?;
        let attn = attn.broadcast_div(&attn.sum_keepdim(3)?)?;
        let v = self
            .v
            .forward(x)?
            .reshape((b, n, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        self.proj.forward(&attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?)
    }

    fn macs(&self) -> u64 {
        let n = self.n;
        self.qk.macs(n)
            + self.v.macs(n)
            + self.proj.macs(n)
            + self.pos_proj.macs(n * n)
            + crate::layers::attention_macs(self.heads, n, n, self.head_dim, self.head_dim)
    }
}

/// Plain multi-head self-attention with timm's `MHSA` names (`qkv`, `proj`).
pub enum ConvitAttention {
    Gpsa(Gpsa),
    Mhsa(crate::layers::Attention),
}

/// A ConViT block.
pub struct ConvitBlock {
    pub norm1: LayerNorm,
    pub attn: ConvitAttention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    drop_path: DropPath,
}

impl ConvitBlock {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let a = match &self.attn {
            ConvitAttention::Gpsa(g) => g.forward(&h)?,
            ConvitAttention::Mhsa(m) => m.forward(&h, None)?,
        };
        let x = (x + self.drop_path.forward(&a, train)?)?;
        &x + self.drop_path.forward(&self.mlp.forward(&self.norm2.forward(&x)?)?, train)?
    }
    fn macs(&self, n: usize) -> u64 {
        self.mlp.macs(n)
            + match &self.attn {
                ConvitAttention::Gpsa(g) => g.macs(),
                ConvitAttention::Mhsa(m) => m.macs(n),
            }
    }
}

/// ConViT.
pub struct Convit {
    name: String,
    pub cfg: ConvitConfig,
    pub patch_embed: Conv2d,
    pub cls_token: Var,
    pub pos_embed: Var,
    pub blocks: Vec<ConvitBlock>,
    pub norm: LayerNorm,
    pub head: Linear,
    image_size: usize,
    in_chans: usize,
    num_classes: usize,
}

impl Convit {
    pub fn new(name: &str, vp: &VarPath, cfg: &ConvitConfig, o: &ModelOptions) -> Result<Self> {
        let (p, d) = (cfg.patch_size, cfg.embed_dim);
        if !o.image_size.is_multiple_of(p) {
            candle_core::bail!("{name}: image size {} is not a multiple of the patch size {p}", o.image_size);
        }
        let grid = o.image_size / p;
        let patch_embed = conv2d(
            &vp.pp("patch_embed").pp("proj"),
            Conv2dConfig::new(o.in_chans, d, p).stride(p).padding(0).bias(true),
        )?;
        let cls_token = param(vp, "cls_token", &[1, 1, d], TRUNC_002, ParamKind::Embedding)?;
        let pos_embed = param(vp, "pos_embed", &[1, grid * grid, d], TRUNC_002, ParamKind::Embedding)?;
        let mut blocks = Vec::new();
        for i in 0..cfg.depth {
            let bp = vp.pp("blocks").pp(i);
            let attn = if i < cfg.local_up_to_layer {
                ConvitAttention::Gpsa(Gpsa::new(&bp.pp("attn"), d, cfg.num_heads, grid, cfg.locality_strength)?)
            } else {
                ConvitAttention::Mhsa(crate::layers::Attention::new(&bp.pp("attn"), d, cfg.num_heads, false)?)
            };
            blocks.push(ConvitBlock {
                norm1: LayerNorm::new(&bp.pp("norm1"), d, 1e-6)?,
                attn,
                norm2: LayerNorm::new(&bp.pp("norm2"), d, 1e-6)?,
                mlp: Mlp::new(&bp.pp("mlp"), d, 4 * d, d)?,
                drop_path: DropPath::new(&bp, drop_path_rate(o.drop_path_rate, i, cfg.depth)),
            });
        }
        Ok(Self {
            name: name.to_string(),
            cfg: cfg.clone(),
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm: LayerNorm::new(&vp.pp("norm"), d, 1e-6)?,
            head: Linear::new(&vp.pp("head"), d, o.num_classes, true)?,
            image_size: o.image_size,
            in_chans: o.in_chans,
            num_classes: o.num_classes,
        })
    }

    pub fn macs(&self) -> u64 {
        let (pe, oh, ow) = conv_macs(&self.patch_embed, self.image_size, self.image_size);
        let n = oh * ow;
        pe + self
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| b.macs(if i < self.cfg.local_up_to_layer { n } else { n + 1 }))
            .sum::<u64>()
            + self.head.macs(1)
    }
}

impl Model for Convit {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        check_input(&self.name, x, self.in_chans, self.image_size)?;
        let b = x.dims()[0];
        let mut t = flatten_tokens(&conv_forward(&self.patch_embed, x)?)?.broadcast_add(self.pos_embed.as_tensor())?;
        for (i, blk) in self.blocks.iter().enumerate() {
            if i == self.cfg.local_up_to_layer {
                let cls = self.cls_token.as_tensor().broadcast_as((b, 1, self.cfg.embed_dim))?;
                t = Tensor::cat(&[&cls, &t], 1)?;
            }
            t = blk.forward(&t, train)?;
        }
        self.norm.forward(&t)?.get_on_dim(1, 0)
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

impl ZooModel for Convit {
    fn macs(&self) -> u64 {
        Convit::macs(self)
    }
    fn image_size(&self) -> usize {
        self.image_size
    }
}
