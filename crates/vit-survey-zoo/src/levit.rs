//! LeViT (Graham et al. 2021): a 4-convolution stride-16 stem, then stages of attention blocks
//! on a shrinking grid. Every linear layer is followed by BatchNorm (`LinearNorm`), the
//! attention adds a learned bias per head indexed by the absolute offset between positions
//! (the "attention bias" replacing position embeddings), values are wider than keys, and
//! between stages a shrinking attention block ("attention downsample") takes queries from a
//! stride-2 subsample of the grid. Hardswish activations. Names follow timm's `levit`.

use crate::layers::{conv_macs, param, DropPath};
use crate::registry::{ModelOptions, ZooModel};
use candle_core::{Device, Result, Tensor, Var};
use nn_core::init::Init;
use nn_core::layers::functional::softmax_last_dim;
use nn_core::layers::{Activation, BatchNorm, Conv2d, Conv2dConfig};
use nn_core::{Model, ParamKind, VarPath};

fn hswish(x: &Tensor) -> Result<Tensor> {
    Activation::Hardswish.apply(x)
}

fn batch_norm(vp: &VarPath, n: usize, weight: f64) -> Result<BatchNorm> {
    let bn = BatchNorm::new(vp, n)?;
    if weight != 1.0 {
        if let Some(w) = &bn.weight {
            w.set(&w.as_tensor().affine(0.0, weight)?)?;
        }
    }
    Ok(bn)
}

/// A linear layer without bias followed by BatchNorm over the channels.
pub struct LinearNorm {
    pub linear: crate::layers::Linear,
    pub bn: BatchNorm,
}

impl LinearNorm {
    fn new(vp: &VarPath, i: usize, o: usize, bn_weight: f64) -> Result<Self> {
        Ok(Self {
            linear: crate::layers::Linear::new(&vp.pp("linear"), i, o, false)?,
            bn: batch_norm(&vp.pp("bn"), o, bn_weight)?,
        })
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.linear.forward(x)?;
        let (b, n, c) = y.dims3()?;
        candle_nn::ModuleT::forward_t(&self.bn, &y.reshape((b * n, c))?, train)?.reshape((b, n, c))
    }
    fn macs(&self, rows: usize) -> u64 {
        self.linear.macs(rows)
    }
}

/// A convolution without bias followed by BatchNorm.
pub struct ConvNorm {
    pub linear: Conv2d,
    pub bn: BatchNorm,
}

/// Attention-bias indices `|dy| * res + |dx|` for queries at `stride` steps, keys everywhere.
fn bias_index(res: usize, stride: usize) -> Vec<u32> {
    let q: Vec<(usize, usize)> = (0..res)
        .step_by(stride)
        .flat_map(|y| (0..res).step_by(stride).map(move |x| (y, x)))
        .collect();
    let mut idx = Vec::new();
    for &(qy, qx) in &q {
        for ky in 0..res {
            for kx in 0..res {
                idx.push((qy.abs_diff(ky) * res + qx.abs_diff(kx)) as u32);
            }
        }
    }
    idx
}

/// LeViT attention (with `stride = 2`, the downsampling variant with `kv` and `q`).
pub struct LevitAttention {
    /// Fused q, k, v (stride 1) or k, v (stride 2).
    pub qkv: LinearNorm,
    /// Queries of the subsampled grid (stride 2).
    pub q: Option<LinearNorm>,
    pub proj: LinearNorm,
    pub attention_biases: Var,
    idx: Tensor,
    heads: usize,
    key_dim: usize,
    val_dim: usize,
    res: usize,
    stride: usize,
}

impl LevitAttention {
    #[allow(clippy::too_many_arguments)]
    fn new(vp: &VarPath, dim: usize, out: usize, key_dim: usize, heads: usize, attn_ratio: f64, res: usize, stride: usize) -> Result<Self> {
        let val_dim = (attn_ratio * key_dim as f64) as usize;
        let (qkv, q, proj) = if stride == 1 {
            (
                LinearNorm::new(&vp.pp("qkv"), dim, heads * (2 * key_dim + val_dim), 1.0)?,
                None,
                LinearNorm::new(&vp.pp("proj").pp("ln"), heads * val_dim, out, 0.0)?,
            )
        } else {
            (
                LinearNorm::new(&vp.pp("kv"), dim, heads * (key_dim + val_dim), 1.0)?,
                Some(LinearNorm::new(&vp.pp("q").pp("ln"), dim, heads * key_dim, 1.0)?),
                LinearNorm::new(&vp.pp("proj").pp("ln"), heads * val_dim, out, 1.0)?,
            )
        };
        let idx = bias_index(res, stride);
        Ok(Self {
            qkv,
            q,
            proj,
            attention_biases: param(vp, "attention_biases", &[heads, res * res], Init::ZEROS, ParamKind::Embedding)?,
            idx: Tensor::from_vec(idx.clone(), idx.len(), &Device::Cpu)?,
            heads,
            key_dim,
            val_dim,
            res,
            stride,
        })
    }

    fn out_res(&self) -> usize {
        (self.res - 1) / self.stride + 1
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let (h, kd, vd) = (self.heads, self.key_dim, self.val_dim);
        let nq = self.out_res().pow(2);
        let (q, k, v) = match &self.q {
            None => {
                let t = self.qkv.forward(x, train)?.reshape((b, n, h, 2 * kd + vd))?;
                (t.narrow(3, 0, kd)?, t.narrow(3, kd, kd)?, t.narrow(3, 2 * kd, vd)?)
            }
            Some(ql) => {
                let t = self.qkv.forward(x, train)?.reshape((b, n, h, kd + vd))?;
                let r = self.res;
                let sub = x.reshape((b, r, r, ()))?;
                let rows: Vec<Tensor> = (0..r).step_by(self.stride).map(|y| sub.get_on_dim(1, y)).collect::<Result<_>>()?;
                let sub = Tensor::stack(&rows, 1)?; // [B, r', r, C]
                let cols: Vec<Tensor> = (0..r).step_by(self.stride).map(|xx| sub.get_on_dim(2, xx)).collect::<Result<_>>()?;
                let sub = Tensor::stack(&cols, 2)?.reshape((b, nq, ()))?;
                let q = ql.forward(&sub, train)?.reshape((b, nq, h, kd))?;
                (q, t.narrow(3, 0, kd)?, t.narrow(3, kd, vd)?)
            }
        };
        let (q, k, v) = (q.transpose(1, 2)?, k.transpose(1, 2)?, v.transpose(1, 2)?);
        let nk = self.res * self.res;
        let bias = self
            .attention_biases
            .as_tensor()
            .index_select(&self.idx.to_device(x.device())?, 1)?
            .reshape((1, h, nq, nk))?;
        let q = (q.contiguous()? * (kd as f64).powf(-0.5))?;
        let s = q.matmul(&k.contiguous()?.transpose(2, 3)?)?.broadcast_add(&bias)?;
        let o = softmax_last_dim(&s)?.matmul(&v.contiguous()?)?;
        let o = o.transpose(1, 2)?.reshape((b, nq, h * vd))?;
        self.proj.forward(&hswish(&o)?, train)
    }

    fn macs(&self) -> u64 {
        let n = self.res * self.res;
        let nq = self.out_res().pow(2);
        self.qkv.macs(n)
            + self.q.as_ref().map_or(0, |q| q.macs(nq))
            + crate::layers::attention_macs(self.heads, nq, n, self.key_dim, self.val_dim)
            + self.proj.macs(nq)
    }
}

/// LeViT's MLP: LinearNorm, hardswish, LinearNorm.
pub struct LevitMlp {
    pub ln1: LinearNorm,
    pub ln2: LinearNorm,
}

impl LevitMlp {
    fn new(vp: &VarPath, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            ln1: LinearNorm::new(&vp.pp("ln1"), dim, hidden, 1.0)?,
            ln2: LinearNorm::new(&vp.pp("ln2"), hidden, dim, 0.0)?,
        })
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.ln2.forward(&hswish(&self.ln1.forward(x, train)?)?, train)
    }
    fn macs(&self, n: usize) -> u64 {
        self.ln1.macs(n) + self.ln2.macs(n)
    }
}

/// A residual attention + MLP block, or (downsampling) attention without residual + MLP.
pub struct LevitBlock {
    pub attn: LevitAttention,
    pub mlp: LevitMlp,
    residual_attn: bool,
    drop_path: DropPath,
}

impl LevitBlock {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let a = self.attn.forward(x, train)?;
        let x = if self.residual_attn {
            (x + self.drop_path.forward(&a, train)?)?
        } else {
            a
        };
        &x + self.drop_path.forward(&self.mlp.forward(&x, train)?, train)?
    }
    fn macs(&self) -> u64 {
        self.attn.macs() + self.mlp.macs(self.attn.out_res().pow(2))
    }
}

/// Hyper-parameters of a LeViT.
#[derive(Debug, Clone, PartialEq)]
pub struct LevitConfig {
    pub embed_dim: Vec<usize>,
    pub key_dim: usize,
    pub num_heads: Vec<usize>,
    pub depth: Vec<usize>,
    pub attn_ratio: f64,
    pub mlp_ratio: f64,
    pub distilled: bool,
}

impl LevitConfig {
    /// LeViT-128S: widths 128-256-384, heads 4-6-8, depths 2-3-4, key dim 16, distilled head.
    pub fn levit_128s() -> Self {
        Self {
            embed_dim: vec![128, 256, 384],
            key_dim: 16,
            num_heads: vec![4, 6, 8],
            depth: vec![2, 3, 4],
            attn_ratio: 2.0,
            mlp_ratio: 2.0,
            distilled: true,
        }
    }
}

/// BatchNorm then linear (LeViT's classifier).
pub struct NormLinear {
    pub bn: BatchNorm,
    pub linear: crate::layers::Linear,
}

impl NormLinear {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.linear.forward(&candle_nn::ModuleT::forward_t(&self.bn, x, train)?)
    }
}

/// LeViT.
pub struct Levit {
    name: String,
    pub stem: Vec<ConvNorm>,
    /// Per stage: blocks (the first of stages 1.. is the downsampling one).
    pub stages: Vec<Vec<LevitBlock>>,
    pub head: NormLinear,
    pub head_dist: Option<NormLinear>,
    image_size: usize,
    in_chans: usize,
    num_classes: usize,
    num_features: usize,
}

impl Levit {
    pub fn new(name: &str, vp: &VarPath, cfg: &LevitConfig, o: &ModelOptions) -> Result<Self> {
        if !o.image_size.is_multiple_of(16) {
            candle_core::bail!("{name}: image size {} must be a multiple of 16 (the stem's stride)", o.image_size);
        }
        let d0 = cfg.embed_dim[0];
        let chans = [o.in_chans, d0 / 8, d0 / 4, d0 / 2, d0];
        let stem = (0..4)
            .map(|i| {
                let p = vp.pp("stem").pp(format!("conv{}", i + 1));
                Ok(ConvNorm {
                    linear: crate::layers::conv2d(&p.pp("linear"), Conv2dConfig::new(chans[i], chans[i + 1], 3).stride(2).padding(1))?,
                    bn: batch_norm(&p.pp("bn"), chans[i + 1], 1.0)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut res = o.image_size / 16;
        let total: usize = cfg.depth.iter().sum();
        let mut k = 0;
        let mut stages = Vec::new();
        let mut in_dim = d0;
        for (i, &dim) in cfg.embed_dim.iter().enumerate() {
            let sp = vp.pp("stages").pp(i);
            let mut blocks = Vec::new();
            if i > 0 {
                let dp = sp.pp("downsample");
                let attn = LevitAttention::new(
                    &dp.pp("attn_downsample"),
                    in_dim,
                    dim,
                    cfg.key_dim,
                    in_dim / cfg.key_dim,
                    4.0,
                    res,
                    2,
                )?;
                res = attn.out_res();
                blocks.push(LevitBlock {
                    attn,
                    mlp: LevitMlp::new(&dp.pp("mlp"), dim, dim * 2)?,
                    residual_attn: false,
                    drop_path: DropPath::new(&dp, 0.0),
                });
            }
            for j in 0..cfg.depth[i] {
                let bp = sp.pp("blocks").pp(j);
                let dpr = crate::layers::drop_path_rate(o.drop_path_rate, k + j, total);
                blocks.push(LevitBlock {
                    attn: LevitAttention::new(&bp.pp("attn"), dim, dim, cfg.key_dim, cfg.num_heads[i], cfg.attn_ratio, res, 1)?,
                    mlp: LevitMlp::new(&bp.pp("mlp"), dim, (dim as f64 * cfg.mlp_ratio) as usize)?,
                    residual_attn: true,
                    drop_path: DropPath::new(&bp, dpr),
                });
            }
            k += cfg.depth[i];
            stages.push(blocks);
            in_dim = dim;
        }
        let head = |p: VarPath| -> Result<NormLinear> {
            Ok(NormLinear {
                bn: batch_norm(&p.pp("bn"), in_dim, 1.0)?,
                linear: crate::layers::Linear::new(&p.pp("linear"), in_dim, o.num_classes, true)?,
            })
        };
        Ok(Self {
            name: name.to_string(),
            stem,
            stages,
            head: head(vp.pp("head"))?,
            head_dist: if cfg.distilled { Some(head(vp.pp("head_dist"))?) } else { None },
            image_size: o.image_size,
            in_chans: o.in_chans,
            num_classes: o.num_classes,
            num_features: in_dim,
        })
    }

    fn run(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        crate::layers::check_input(&self.name, x, self.in_chans, self.image_size)?;
        let mut x = x.clone();
        for (i, c) in self.stem.iter().enumerate() {
            x = candle_nn::ModuleT::forward_t(&c.bn, &crate::layers::conv_forward(&c.linear, &x)?, train)?;
            if i < 3 {
                x = hswish(&x)?;
            }
        }
        let mut t = crate::layers::flatten_tokens(&x)?;
        let mut outs = Vec::new();
        for st in &self.stages {
            for b in st {
                t = b.forward(&t, train)?;
            }
            outs.push(t.clone());
        }
        Ok(outs)
    }

    pub fn macs(&self) -> u64 {
        let (mut m, mut h, mut w) = (0, self.image_size, self.image_size);
        for c in &self.stem {
            let (cm, oh, ow) = conv_macs(&c.linear, h, w);
            m += cm;
            (h, w) = (oh, ow);
        }
        m += self.stages.iter().flatten().map(|b| b.macs()).sum::<u64>();
        m + self.head.linear.macs(1) + self.head_dist.as_ref().map_or(0, |h| h.linear.macs(1))
    }

    /// Class-head and distillation-head logits.
    pub fn forward_distill(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let hd = self
            .head_dist
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg(format!("{} has no distillation head", self.name)))?;
        let f = self.forward_features(x, train)?;
        Ok((self.head.forward(&f, train)?, hd.forward(&f, train)?))
    }
}

impl Model for Levit {
    fn name(&self) -> &str {
        &self.name
    }
    /// Tokens of the last stage averaged.
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.run(x, train)?.pop().expect("stages").mean(1)
    }
    /// With a distillation head, the two heads' logits averaged (timm's inference rule).
    fn forward_head(&self, f: &Tensor, train: bool) -> Result<Tensor> {
        let a = self.head.forward(f, train)?;
        match &self.head_dist {
            None => Ok(a),
            Some(hd) => (a + hd.forward(f, train)?)? / 2.0,
        }
    }
    /// The stage outputs as `[B, C_i, H_i, W_i]`, then the pooled features.
    fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let outs = self.run(x, train)?;
        let pooled = outs.last().expect("stages").mean(1)?;
        let mut maps = Vec::new();
        for t in &outs {
            let r = (t.dims()[1] as f64).sqrt().round() as usize;
            maps.push(crate::layers::tokens_to_map(t, r, r)?);
        }
        maps.push(pooled);
        Ok(maps)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn num_features(&self) -> usize {
        self.num_features
    }
}

impl ZooModel for Levit {
    fn macs(&self) -> u64 {
        Levit::macs(self)
    }
    fn image_size(&self) -> usize {
        self.image_size
    }
}
