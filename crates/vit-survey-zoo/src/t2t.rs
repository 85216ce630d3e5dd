//! T2T-ViT (Yuan et al. 2021, "Tokens-to-Token ViT"), the `performer` variant of the official
//! repository (yitu-opensource/T2T-ViT, `t2t_vit_7` / `t2t_vit_14`).
//!
//! The tokens-to-token module replaces ViT's patch embedding: the image is cut into
//! overlapping 7x7 patches (stride 4, an "unfold" or soft split), each patch vector is
//! re-structured by a one-head Performer layer (linear attention with positive random
//! features), the tokens are folded back into a map and soft-split again (3x3, stride 2) twice,
//! so 224x224 images give 14x14 tokens carrying local structure. A linear projection to the
//! embedding width, a class token and a fixed sinusoidal position table then feed a standard
//! pre-norm ViT backbone (no biases on `qkv`, deep-narrow: T2T-ViT-7 is 256 wide with MLP
//! ratio 2, T2T-ViT-14 384 wide with MLP ratio 3).
//!
//! Parameter names follow the official code (`tokens_to_token.attention1.kqv`,
//! `blocks.{i}.attn.qkv`, ...). As there, the sinusoidal `pos_embed` and the Performer's
//! random-feature matrices `w` are parameters that are not trained: [`nn_core::VarStore`]
//! counts them in `num_params` (as `sum(p.numel() for p in model.parameters())`, the count the
//! official training script prints) but not in `num_trainable_params`. The Performer's two
//! dropouts (p = 0.1, always on in the official code) act in training mode only.
//!
//! Scale of Q K^T in the backbone: `head_dim^-0.5` (the code's default, used to train from
//! scratch); the published checkpoints were trained with `embed_dim^-0.5`
//! ([`T2tConfig::pretrained_scale`]).

use crate::layers::{check_input, drop_path_rate, gelu, param, Block, LayerNorm, Linear, TRUNC_002};
use crate::registry::{ModelOptions, ZooModel};
use candle_core::{Result, Tensor, Var, D};
use nn_core::init::Init;
use nn_core::{Model, ParamKind, VarPath};
use std::sync::atomic::{AtomicU64, Ordering};

/// Hyper-parameters of a T2T-ViT (performer tokens-to-token module).
#[derive(Debug, Clone, PartialEq)]
pub struct T2tConfig {
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    /// Width of the tokens inside the tokens-to-token module (64).
    pub token_dim: usize,
    /// Random features per Performer layer as a fraction of `token_dim` (0.5: 32 features).
    pub kernel_ratio: f64,
    /// Scale of Q K^T in the backbone blocks; `None`: `head_dim^-0.5`.
    pub qk_scale: Option<f64>,
}

impl T2tConfig {
    /// T2T-ViT-7: 256 wide, 7 blocks, 4 heads, MLP ratio 2 (published: 4.3M parameters).
    pub fn t2t_vit_7() -> Self {
        Self {
            embed_dim: 256,
            depth: 7,
            num_heads: 4,
            mlp_ratio: 2.0,
            token_dim: 64,
            kernel_ratio: 0.5,
            qk_scale: None,
        }
    }
    /// T2T-ViT-14: 384 wide, 14 blocks, 6 heads, MLP ratio 3 (published: 21.5M parameters).
    pub fn t2t_vit_14() -> Self {
        Self {
            embed_dim: 384,
            depth: 14,
            num_heads: 6,
            mlp_ratio: 3.0,
            ..Self::t2t_vit_7()
        }
    }
    /// The scale the published checkpoints were trained with: `embed_dim^-0.5`.
    pub fn pretrained_scale(mut self) -> Self {
        self.qk_scale = Some((self.embed_dim as f64).powf(-0.5));
        self
    }
}

/// A soft split (PyTorch's `nn.Unfold`): overlapping `k x k` patches with stride `s` and zero
/// padding `p`, each flattened channel-major (`c * k * k + i * k + j`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoftSplit {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl SoftSplit {
    /// Output side for an input side `h`.
    pub fn out(&self, h: usize) -> usize {
        (h + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// `[B, C, H, W]` -> `[B, oh * ow, C * k * k]` (PyTorch's `unfold(x).transpose(1, 2)`),
    /// written with narrow/reshape/stack so it is differentiable.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let (oh, ow) = (self.out(h), self.out(w));
        // pad so that every window start + s * o fits and the stride can be taken by a reshape
        let extra_h = (k - 1 + s * oh).saturating_sub(h + 2 * p);
        let extra_w = (k - 1 + s * ow).saturating_sub(w + 2 * p);
        let xp = x.pad_with_zeros(2, p, p + extra_h)?.pad_with_zeros(3, p, p + extra_w)?;
        let wp = w + 2 * p + extra_w;
        let mut cols = Vec::with_capacity(k * k);
        for i in 0..k {
            // rows i, i + s, ..., i + s (oh - 1): [B, C, oh, Wp]
            let rows = xp.narrow(2, i, s * oh)?.reshape((b, c, oh, s, wp))?.narrow(3, 0, 1)?.squeeze(3)?;
            for j in 0..k {
                let t = rows.narrow(3, j, s * ow)?.reshape((b, c, oh, ow, s))?.narrow(4, 0, 1)?.squeeze(4)?;
                cols.push(t);
            }
        }
        Tensor::stack(&cols, 2)? // [B, C, k*k, oh, ow]
            .reshape((b, c * k * k, oh * ow))?
            .transpose(1, 2)?
            .contiguous()
    }
}

/// Element-wise dropout with a seeded mask stream (training only).
struct Dropout {
    p: f64,
    seed: u64,
    calls: AtomicU64,
}

impl Dropout {
    fn new(vp: &VarPath, p: f64) -> Self {
        Self {
            p,
            seed: vp.derived_seed(),
            calls: AtomicU64::new(0),
        }
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p <= 0.0 {
            return Ok(x.clone());
        }
        use rand::Rng;
        let mut rng = nn_core::rng::derived(self.seed, self.calls.fetch_add(1, Ordering::Relaxed));
        let keep = 1.0 - self.p;
        let scale = (1.0 / keep) as f32;
        let m: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.gen::<f64>() < keep { scale } else { 0.0 })
            .collect();
        let m = Tensor::from_vec(m, x.dims(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&m)
    }
}

/// The official `Token_performer`: one-head attention approximated with `m` positive random
/// features (FAVOR+, Choromanski et al. 2021), `v` as the skip connection, then an MLP of
/// ratio 1. Input `[B, T, dim]`, output `[B, T, emb]`.
pub struct TokenPerformer {
    pub norm1: LayerNorm,
    pub kqv: Linear,
    pub proj: Linear,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    /// Random features `[m, emb]`: orthogonal rows scaled by `sqrt(m)`; not trained.
    pub w: Var,
    pub emb: usize,
    pub m: usize,
    dp1: Dropout,
    dp2: Dropout,
}

/// Orthogonal `[rows, cols]` matrix (rows <= cols: orthonormal rows) from a seeded normal
/// draw by Gram-Schmidt, as `nn.init.orthogonal_` gives in distribution.
fn orthogonal(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = nn_core::rng::seeded(seed);
    let g = Init::Normal { mean: 0.0, std: 1.0 }.sample(&[rows, cols], &mut rng);
    let mut q: Vec<Vec<f64>> = Vec::with_capacity(rows);
    for r in 0..rows {
        let mut v: Vec<f64> = g[r * cols..(r + 1) * cols].iter().map(|&x| x as f64).collect();
        // two passes of classical Gram-Schmidt for stability
        for _ in 0..2 {
            for u in &q {
                let d: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(u).for_each(|(a, b)| *a -= d * b);
            }
        }
        let n = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
        q.push(v.into_iter().map(|a| a / n).collect());
    }
    q.into_iter().flatten().map(|x| x as f32).collect()
}

impl TokenPerformer {
    pub fn new(vp: &VarPath, dim: usize, emb: usize, kernel_ratio: f64) -> Result<Self> {
        let m = (emb as f64 * kernel_ratio) as usize;
        if m == 0 {
            candle_core::bail!("token performer: {emb} x kernel ratio {kernel_ratio} gives no random features");
        }
        let w = param(vp, "w", &[m, emb], Init::ZEROS, ParamKind::Weight)?;
        if !crate::layers::cheap_init_on() {
            let v: Vec<f32> = orthogonal(m, emb, vp.pp("w").derived_seed())
                .into_iter()
                .map(|x| x * (m as f32).sqrt())
                .collect();
            w.set(&Tensor::from_vec(v, (m, emb), vp.device())?.to_dtype(w.dtype())?)?;
        }
        vp.store().set_trainable(&vp.full_name("w"), false);
        Ok(Self {
            norm1: LayerNorm::new(&vp.pp("norm1"), dim, 1e-5)?,
            kqv: Linear::new(&vp.pp("kqv"), dim, 3 * emb, true)?,
            proj: Linear::new(&vp.pp("proj"), emb, emb, true)?,
            norm2: LayerNorm::new(&vp.pp("norm2"), emb, 1e-5)?,
            fc1: Linear::new(&vp.pp("mlp").pp(0), emb, emb, true)?,
            fc2: Linear::new(&vp.pp("mlp").pp(2), emb, emb, true)?,
            w,
            emb,
            m,
            dp1: Dropout::new(&vp.pp("dp"), 0.1),
            dp2: Dropout::new(&vp.pp("mlp").pp(3), 0.1),
        })
    }

    /// Positive random features `exp(w x - |x|^2 / 2) / sqrt(m)`: `[B, T, emb]` -> `[B, T, m]`.
    fn prm_exp(&self, x: &Tensor) -> Result<Tensor> {
        let xd = (x.sqr()?.sum_keepdim(D::Minus1)? / 2.0)?;
        let wtx = x.broadcast_matmul(&self.w.as_tensor().t()?)?;
        wtx.broadcast_sub(&xd)?.exp()? / (self.m as f64).sqrt()
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.norm1.forward(x)?;
        let kqv = self.kqv.forward(&x)?;
        let e = self.emb;
        let (k, q, v) = (kqv.narrow(2, 0, e)?, kqv.narrow(2, e, e)?, kqv.narrow(2, 2 * e, e)?.contiguous()?);
        let (kp, qp) = (self.prm_exp(&k.contiguous()?)?, self.prm_exp(&q.contiguous()?)?);
        // normaliser D = qp . sum_t kp: [B, T, 1]
        let d = qp.broadcast_mul(&kp.sum_keepdim(1)?)?.sum_keepdim(D::Minus1)?;
        let kptv = v.transpose(1, 2)?.contiguous()?.matmul(&kp)?; // [B, emb, m]
        let y = qp.matmul(&kptv.transpose(1, 2)?.contiguous()?)?; // [B, T, emb]
        let y = y.broadcast_div(&(d + 1e-8)?)?;
        let y = (v + self.dp1.forward(&self.proj.forward(&y)?, train)?)?;
        let h = self.fc2.forward(&gelu(&self.fc1.forward(&self.norm2.forward(&y)?)?)?)?;
        &y + self.dp2.forward(&h, train)?
    }

    /// MACs for `t` tokens: the `kqv` projection, the random features of k and q, the
    /// normaliser, `v^T kp`, `qp (v^T kp)^T`, `proj` and the MLP.
    pub fn macs(&self, t: usize) -> u64 {
        let (e, m, t) = (self.emb as u64, self.m as u64, t as u64);
        self.kqv.macs(t as usize)
            + 2 * t * e * m
            + t * m
            + 2 * t * e * m
            + self.proj.macs(t as usize)
            + self.fc1.macs(t as usize)
            + self.fc2.macs(t as usize)
    }
}

/// The sinusoidal position table of the official code: `[1, n, d]`, even channels
/// `sin(pos / 10000^(2 (j / 2) / d))`, odd channels the cosine.
pub fn sinusoid_table(n: usize, d: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n * d);
    for pos in 0..n {
        for j in 0..d {
            let angle = pos as f64 / 10000f64.powf(2.0 * (j / 2) as f64 / d as f64);
            v.push(if j % 2 == 0 { angle.sin() } else { angle.cos() } as f32);
        }
    }
    v
}

/// A T2T-ViT.
pub struct T2tVit {
    name: String,
    pub cfg: T2tConfig,
    pub splits: [SoftSplit; 3],
    pub attention1: TokenPerformer,
    pub attention2: TokenPerformer,
    pub project: Linear,
    pub cls_token: Var,
    /// The fixed sinusoidal table `[1, 1 + N, D]` (a parameter that is not trained).
    pub pos_embed: Var,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub head: Linear,
    image_size: usize,
    in_chans: usize,
    num_classes: usize,
}

impl T2tVit {
    pub fn new(name: &str, vp: &VarPath, cfg: &T2tConfig, opts: &ModelOptions) -> Result<Self> {
        if !opts.image_size.is_multiple_of(16) {
            candle_core::bail!(
                "{name}: image size {} is not a multiple of 16 (soft splits of stride 4, 2, 2)",
                opts.image_size
            );
        }
        let (d, td) = (cfg.embed_dim, cfg.token_dim);
        let splits = [
            SoftSplit {
                kernel: 7,
                stride: 4,
                padding: 2,
            },
            SoftSplit {
                kernel: 3,
                stride: 2,
                padding: 1,
            },
            SoftSplit {
                kernel: 3,
                stride: 2,
                padding: 1,
            },
        ];
        let t2t = vp.pp("tokens_to_token");
        let attention1 = TokenPerformer::new(&t2t.pp("attention1"), opts.in_chans * 49, td, cfg.kernel_ratio)?;
        let attention2 = TokenPerformer::new(&t2t.pp("attention2"), td * 9, td, cfg.kernel_ratio)?;
        let project = Linear::new(&t2t.pp("project"), td * 9, d, true)?;
        let g = opts.image_size / 16;
        let n = g * g + 1;
        let cls_token = param(vp, "cls_token", &[1, 1, d], TRUNC_002, ParamKind::Embedding)?;
        let pos_embed = param(vp, "pos_embed", &[1, n, d], Init::ZEROS, ParamKind::Embedding)?;
        pos_embed.set(&Tensor::from_vec(sinusoid_table(n, d), (1, n, d), vp.device())?.to_dtype(pos_embed.dtype())?)?;
        vp.store().set_trainable(&vp.full_name("pos_embed"), false);
        let blocks = (0..cfg.depth)
            .map(|i| {
                let mut b = Block::new(
                    &vp.pp("blocks").pp(i),
                    d,
                    cfg.num_heads,
                    cfg.mlp_ratio,
                    false,
                    1e-5,
                    drop_path_rate(opts.drop_path_rate, i, cfg.depth),
                )?;
                if let Some(s) = cfg.qk_scale {
                    b.attn.scale = s;
                }
                Ok(b)
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(&vp.pp("norm"), d, 1e-5)?;
        let head = Linear::new(&vp.pp("head"), d, opts.num_classes, true)?;
        Ok(Self {
            name: name.to_string(),
            cfg: cfg.clone(),
            splits,
            attention1,
            attention2,
            project,
            cls_token,
            pos_embed,
            blocks,
            norm,
            head,
            image_size: opts.image_size,
            in_chans: opts.in_chans,
            num_classes: opts.num_classes,
        })
    }

    /// The tokens-to-token module: `[B, C, H, W]` -> `[B, (H/16) (W/16), D]`.
    pub fn tokens_to_token(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let b = x.dims()[0];
        let mut h = self.image_size;
        let t = self.splits[0].forward(x)?;
        h = self.splits[0].out(h);
        let t = self.attention1.forward(&t, train)?;
        let t = crate::layers::tokens_to_map(&t, h, h)?;
        let t = self.splits[1].forward(&t)?;
        h = self.splits[1].out(h);
        let t = self.attention2.forward(&t, train)?;
        let t = crate::layers::tokens_to_map(&t, h, h)?;
        let t = self.splits[2].forward(&t)?;
        let t = self.project.forward(&t)?;
        debug_assert_eq!(t.dims()[0], b);
        Ok(t)
    }

    /// The normalised token sequence `[B, 1 + N, D]` after the last block.
    pub fn forward_tokens(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        check_input(&self.name, x, self.in_chans, self.image_size)?;
        let b = x.dims()[0];
        let t = self.tokens_to_token(x, train)?;
        let cls = self.cls_token.as_tensor().broadcast_as((b, 1, self.cfg.embed_dim))?;
        let mut x = Tensor::cat(&[&cls, &t], 1)?.broadcast_add(self.pos_embed.as_tensor())?;
        for blk in &self.blocks {
            x = blk.forward(&x, train)?;
        }
        self.norm.forward(&x)
    }

    /// MACs per image: both Performer layers, the projection, the blocks and the head.
    pub fn macs(&self) -> u64 {
        let h1 = self.splits[0].out(self.image_size);
        let h2 = self.splits[1].out(h1);
        let h3 = self.splits[2].out(h2);
        let n = h3 * h3 + 1;
        self.attention1.macs(h1 * h1)
            + self.attention2.macs(h2 * h2)
            + self.project.macs(h3 * h3)
            + self.blocks.iter().map(|b| b.macs(n)).sum::<u64>()
            + self.head.macs(1)
    }
}

impl Model for T2tVit {
    fn name(&self) -> &str {
        &self.name
    }
    /// The normalised class token `[B, D]`.
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_tokens(x, train)?.get_on_dim(1, 0)
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

impl ZooModel for T2tVit {
    fn macs(&self) -> u64 {
        T2tVit::macs(self)
    }
    fn image_size(&self) -> usize {
        self.image_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use nn_core::testing::check_gradient;

    /// PyTorch's `nn.Unfold(3, stride=2, padding=1)` on a 2-channel 4x4 ramp, by hand.
    #[test]
    fn soft_split_matches_unfold_ordering() -> Result<()> {
        let x = Tensor::arange(0f32, 32.0, &Device::Cpu)?.reshape((1, 2, 4, 4))?;
        let s = SoftSplit {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        let y = s.forward(&x)?;
        assert_eq!(y.dims(), &[1, 4, 18]);
        let y = y.to_vec3::<f32>()?;
        // window 0 (top-left, centre (0, 0)), channel 0: rows -1..1, cols -1..1
        assert_eq!(&y[0][0][..9], &[0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 4.0, 5.0]);
        // window 3 (centre (2, 2)), channel 1: rows 1..3, cols 1..3 of 16..31
        assert_eq!(&y[0][3][9..], &[21.0, 22.0, 23.0, 25.0, 26.0, 27.0, 29.0, 30.0, 31.0]);
        // 7x7 stride 4 padding 2 on 16x16: 4x4 windows of 3 * 49 values
        let x = Tensor::ones((2, 3, 16, 16), candle_core::DType::F32, &Device::Cpu)?;
        let s0 = SoftSplit {
            kernel: 7,
            stride: 4,
            padding: 2,
        };
        assert_eq!(s0.forward(&x)?.dims(), &[2, 16, 147]);
        Ok(())
    }

    #[test]
    fn orthogonal_rows_are_orthonormal() {
        let q = orthogonal(4, 8, 3);
        for i in 0..4 {
            for j in 0..4 {
                let d: f32 = (0..8).map(|k| q[i * 8 + k] * q[j * 8 + k]).sum();
                assert!((d - if i == j { 1.0 } else { 0.0 }).abs() < 1e-5, "{i} {j} {d}");
            }
        }
    }

    #[test]
    fn sinusoid_table_values() {
        let t = sinusoid_table(3, 4);
        // pos 1: sin(1), cos(1), sin(1 / 100), cos(1 / 100)
        let want = [1f64.sin(), 1f64.cos(), 0.01f64.sin(), 0.01f64.cos()];
        for (a, b) in t[4..8].iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6);
        }
        assert_eq!(&t[..4], &[0.0, 1.0, 0.0, 1.0]);
    }

    #[test]
    fn soft_split_gradient_matches_finite_differences() -> Result<()> {
        let x = Tensor::arange(0f64, 18.0, &Device::Cpu)?.reshape((1, 2, 3, 3))?;
        let s = SoftSplit {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        check_gradient(&x, |x| s.forward(x)?.sqr()?.sum_all(), 1e-6, 1e-5)
    }
}
