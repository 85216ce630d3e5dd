//! Efficient transformers, the survey's last section, on ViT/DeiT ([`VisionTransformer`]):
//!
//! - **Attention-head pruning** (Michel et al. 2019, "Are Sixteen Heads Really Better than
//!   One?"): [`head_importance`] scores every head by `|dL/d xi_h|`, the gradient of the loss
//!   with respect to a gate `xi_h` on the head's output, summed over batches;
//!   [`heads_to_keep`] drops the globally least important heads (scores normalised per layer,
//!   at least one head left per block); [`prune_heads`] builds the smaller model, removing the
//!   heads' rows of `qkv` and columns of `proj`, so parameters and MACs really shrink.
//! - **Token pruning by class attention** (EViT, Liang et al. 2022): [`TokenPruning`] keeps,
//!   inside the chosen blocks, the patch tokens the class token attends to most (attention
//!   averaged over heads) and optionally fuses the others into one token weighted by that
//!   attention; the MLP and every later block see fewer tokens ([`token_pruning_macs`]).
//! - **Post-training int8 quantization** of linear weights, per output channel and symmetric
//!   ([`quantize_linear_weights`]): weights become `scale_c * q` with `q` in `-127..=127`.
//!
//! All three work on a trained model without fine-tuning (post-training), so the accuracy
//! change they cause is measured as is (`cargo xtask vit efficiency`).

use crate::layers::{attention_probs, Block};
use crate::vit::{VisionTransformer, VitConfig};
use crate::ZooModel;
use candle_core::{DType, IndexOp, Result, Tensor};
use nn_core::{Model, ParamKind, VarStore};

// ---------------------------------------------------------------- head pruning

/// Michel et al.'s head importance: for each batch, the loss (cross-entropy, eval mode) is
/// differentiated with respect to a gate on every head's output and the absolute values are
/// summed over batches. Returns `[block][head]`.
///
/// The gate gradient is read off the gradient of `proj.weight`: the head's output `o_h` enters
/// `proj` through the columns `c` of head `h`, so `dL/d xi_h = sum_{n, c in h} o_{n,c}
/// dL/do_{n,c} = sum_{i, c in h} W[i, c] dL/dW[i, c]`; no change to the forward pass is needed.
pub fn head_importance(model: &VisionTransformer, batches: &[(Tensor, Tensor)]) -> Result<Vec<Vec<f64>>> {
    let mut imp: Vec<Vec<f64>> = model.blocks.iter().map(|b| vec![0.0; b.attn.heads]).collect();
    for (x, y) in batches {
        let logits = model.forward_t(x, false)?;
        let loss = nn_core::train::cross_entropy(&logits, y, 0.0)?;
        let grads = loss.backward()?;
        for (blk, acc) in model.blocks.iter().zip(imp.iter_mut()) {
            let w = blk.attn.proj.weight.as_tensor();
            let Some(g) = grads.get(w) else {
                candle_core::bail!("head importance: no gradient reached a proj weight");
            };
            let per_head = (w * g)?
                .sum(0)?
                .reshape((blk.attn.heads, blk.attn.head_dim))?
                .sum(1)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            for (a, v) in acc.iter_mut().zip(per_head) {
                *a += v.abs();
            }
        }
    }
    Ok(imp)
}

/// Each block's scores divided by their L2 norm (Michel et al.'s per-layer normalisation).
pub fn normalize_per_layer(importance: &[Vec<f64>]) -> Vec<Vec<f64>> {
    importance
        .iter()
        .map(|l| {
            let n = l.iter().map(|v| v * v).sum::<f64>().sqrt();
            l.iter().map(|v| if n > 0.0 { v / n } else { *v }).collect()
        })
        .collect()
}

/// The heads left after removing the `prune` least important ones over all blocks (ties
/// broken by position), never the last head of a block. Returns sorted head indices per block.
pub fn heads_to_keep(importance: &[Vec<f64>], prune: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<(usize, usize, f64)> = importance
        .iter()
        .enumerate()
        .flat_map(|(l, hs)| hs.iter().enumerate().map(move |(h, &v)| (l, h, v)))
        .collect();
    order.sort_by(|a, b| a.2.total_cmp(&b.2).then((a.0, a.1).cmp(&(b.0, b.1))));
    let mut keep: Vec<Vec<bool>> = importance.iter().map(|l| vec![true; l.len()]).collect();
    let mut left: Vec<usize> = importance.iter().map(|l| l.len()).collect();
    let mut removed = 0;
    for (l, h, _) in order {
        if removed == prune {
            break;
        }
        if left[l] > 1 {
            keep[l][h] = false;
            left[l] -= 1;
            removed += 1;
        }
    }
    keep.iter()
        .map(|l| l.iter().enumerate().filter(|(_, &k)| k).map(|(h, _)| h).collect())
        .collect()
}

fn index(ids: &[usize], dev: &candle_core::Device) -> Result<Tensor> {
    Tensor::from_vec(ids.iter().map(|&i| i as u32).collect::<Vec<_>>(), ids.len(), dev)
}

/// Builds the model with only the heads in `keep[block]` (sorted indices) and copies the
/// trained weights into it: rows of `qkv` (weight and bias) and columns of `proj.weight` of the
/// removed heads are dropped, everything else is copied. The new model has its own store
/// (trainable, for fine-tuning) and computes exactly what the original computes with the
/// removed heads' outputs masked to zero.
pub fn prune_heads(vs: &VarStore, model: &VisionTransformer, keep: &[Vec<usize>]) -> Result<(VarStore, VisionTransformer)> {
    if keep.len() != model.blocks.len() {
        candle_core::bail!("prune_heads: {} head lists for {} blocks", keep.len(), model.blocks.len());
    }
    let mut tensors = vs.tensors();
    for (i, (blk, k)) in model.blocks.iter().zip(keep).enumerate() {
        let (h, hd) = (blk.attn.heads, blk.attn.head_dim);
        if k.is_empty() || k.iter().any(|&j| j >= h) || k.windows(2).any(|w| w[0] >= w[1]) {
            candle_core::bail!("prune_heads: block {i} keeps {k:?}, need sorted distinct heads in 0..{h}, at least one");
        }
        let dev = blk.attn.qkv.weight.device();
        // qkv rows: part p (q, k, v) of head j is p * h * hd + j * hd .. + hd
        let rows: Vec<usize> = (0..3)
            .flat_map(|p| k.iter().flat_map(move |&j| (0..hd).map(move |c| p * h * hd + j * hd + c)))
            .collect();
        let cols: Vec<usize> = k.iter().flat_map(|&j| (0..hd).map(move |c| j * hd + c)).collect();
        let (ri, ci) = (index(&rows, dev)?, index(&cols, dev)?);
        let pre = format!("blocks.{i}.attn");
        let mut take = |name: String, dim: usize, idx: &Tensor| -> Result<()> {
            if let Some(t) = tensors.get(&name) {
                let t = t.index_select(idx, dim)?;
                tensors.insert(name, t);
            }
            Ok(())
        };
        take(format!("{pre}.qkv.weight"), 0, &ri)?;
        take(format!("{pre}.qkv.bias"), 0, &ri)?;
        take(format!("{pre}.proj.weight"), 1, &ci)?;
    }
    let cfg = VitConfig {
        block_heads: Some(keep.iter().map(|k| k.len()).collect()),
        ..model.cfg.clone()
    };
    let new_vs = VarStore::new(vs.seed(), vs.device());
    let pruned = crate::layers::with_cheap_init(true, || {
        VisionTransformer::new(model.name(), &new_vs.root(), &cfg, &model.options())
    })?;
    crate::weights::load_tensors(&new_vs, &tensors, true)?;
    Ok((new_vs, pruned))
}

/// Zeroes the `proj` columns of every head not in `keep[block]`, in place: the "masked"
/// model that [`prune_heads`] must reproduce exactly.
pub fn mask_heads(model: &VisionTransformer, keep: &[Vec<usize>]) -> Result<()> {
    for (blk, k) in model.blocks.iter().zip(keep) {
        let (h, hd) = (blk.attn.heads, blk.attn.head_dim);
        let m: Vec<f32> = (0..h * hd).map(|c| if k.contains(&(c / hd)) { 1.0 } else { 0.0 }).collect();
        let w = &blk.attn.proj.weight;
        let m = Tensor::from_vec(m, (1, h * hd), w.device())?.to_dtype(w.dtype())?;
        w.set(&w.as_tensor().broadcast_mul(&m)?)?;
    }
    Ok(())
}

// ---------------------------------------------------------------- token pruning

/// EViT-style token pruning: inside each block in `layers` (0-based), after attention, keep
/// the `ceil(keep_ratio * n)` patch tokens with the highest class attention (mean over heads
/// of the class token's attention row; `n` counts every non-class token, earlier fused tokens
/// included), and with `fuse` add one token, the class-attention-weighted sum of the others.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenPruning {
    pub layers: Vec<usize>,
    pub keep_ratio: f64,
    pub fuse: bool,
}

impl TokenPruning {
    fn kept(&self, n: usize) -> usize {
        ((self.keep_ratio * n as f64).ceil() as usize).clamp(1, n)
    }

    /// Non-class tokens after each block, starting from `n` patch tokens.
    pub fn tokens_per_block(&self, depth: usize, n: usize) -> Vec<(usize, usize)> {
        let mut cur = n;
        (0..depth)
            .map(|i| {
                let before = cur;
                if self.layers.contains(&i) {
                    let k = self.kept(cur);
                    cur = k + (self.fuse && k < cur) as usize;
                }
                (before, cur)
            })
            .collect()
    }

    fn check(&self, model: &VisionTransformer) -> Result<()> {
        if model.pos_block.is_some() {
            candle_core::bail!("token pruning needs a ViT with a position embedding (CPVT's PEG needs the full grid)");
        }
        if !(self.keep_ratio > 0.0 && self.keep_ratio <= 1.0) {
            candle_core::bail!("token pruning: keep ratio must be in (0, 1], got {}", self.keep_ratio);
        }
        if let Some(l) = self.layers.iter().find(|&&l| l >= model.blocks.len()) {
            candle_core::bail!("token pruning: layer {l} but the model has {} blocks", model.blocks.len());
        }
        Ok(())
    }
}

/// One block with EViT's token reorganisation after the attention.
fn pruned_block(blk: &Block, x: &Tensor, prefix: usize, tp: &TokenPruning) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    let a = &blk.attn;
    let (q, k, v) = a.qkv(&blk.norm1.forward(x)?)?;
    let probs = attention_probs(&q, &k, a.scale, None)?; // [B, H, N, N]
    let o = probs
        .matmul(&v.contiguous()?)?
        .transpose(1, 2)?
        .reshape((b, n, a.heads * a.head_dim))?;
    let x = (x + a.proj.forward(&o)?)?;
    let np = n - prefix;
    let keep = tp.kept(np);
    let x = if keep < np {
        // class attention to the patch tokens, mean over heads: [B, np]
        let cls = probs.i((.., .., 0, prefix..))?.mean(1)?.contiguous()?;
        let order = cls.arg_sort_last_dim(false)?; // [B, np], most attended first
        let top = order.narrow(1, 0, keep)?.contiguous()?;
        let patches = x.narrow(1, prefix, np)?.contiguous()?;
        let gather = |idx: &Tensor| -> Result<Tensor> {
            let m = idx.dims()[1];
            patches.gather(&idx.unsqueeze(2)?.broadcast_as((b, m, c))?.contiguous()?, 1)
        };
        let mut parts = vec![x.narrow(1, 0, prefix)?, gather(&top)?];
        if tp.fuse {
            let rest = order.narrow(1, keep, np - keep)?.contiguous()?;
            let w = cls.gather(&rest, 1)?; // [B, np - keep]
            let fused = gather(&rest)?.broadcast_mul(&w.unsqueeze(2)?)?.sum_keepdim(1)?;
            parts.push(fused);
        }
        Tensor::cat(&parts, 1)?
    } else {
        x
    };
    &x + blk.mlp.forward(&blk.norm2.forward(&x)?)?
}

/// The normalised token sequence after the last block with token pruning (eval mode).
pub fn forward_tokens_pruned(model: &VisionTransformer, x: &Tensor, tp: &TokenPruning) -> Result<Tensor> {
    tp.check(model)?;
    let mut x = model.embed(x)?;
    for (i, blk) in model.blocks.iter().enumerate() {
        x = if tp.layers.contains(&i) {
            pruned_block(blk, &x, model.prefix(), tp)?
        } else {
            blk.forward(&x, false)?
        };
    }
    model.norm.forward(&x)
}

/// MACs per image of the token-pruned forward pass.
pub fn token_pruning_macs(model: &VisionTransformer, tp: &TokenPruning) -> u64 {
    let p = model.prefix();
    let full = model.macs();
    let n0 = (model.image_size() / model.cfg.patch_size).pow(2);
    let blocks_full: u64 = model.blocks.iter().map(|b| b.macs(n0 + p)).sum();
    let blocks: u64 = model
        .blocks
        .iter()
        .zip(tp.tokens_per_block(model.blocks.len(), n0))
        .map(|(b, (before, after))| b.attn.macs(before + p) + b.mlp.macs(after + p))
        .sum();
    full - blocks_full + blocks
}

/// A ViT/DeiT evaluated with token pruning (eval mode only), as an nn-core [`Model`].
pub struct TokenPruned<'a> {
    pub model: &'a VisionTransformer,
    pub pruning: TokenPruning,
}

impl Model for TokenPruned<'_> {
    fn name(&self) -> &str {
        self.model.name()
    }
    fn forward_features(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let t = forward_tokens_pruned(self.model, x, &self.pruning)?;
        t.narrow(1, 0, self.model.prefix())?.flatten_from(1)
    }
    fn forward_head(&self, f: &Tensor, train: bool) -> Result<Tensor> {
        self.model.forward_head(f, train)
    }
    fn num_classes(&self) -> usize {
        self.model.num_classes()
    }
    fn num_features(&self) -> usize {
        self.model.num_features()
    }
}

// ---------------------------------------------------------------- quantization

/// Symmetric per-row int8 quantization of a 2-D weight `[out, in]`: `scale_r = max|w_r| / 127`
/// (1 for an all-zero row), `q = round(w / scale_r)` in `-127..=127`.
pub fn quantize_int8_per_channel(w: &Tensor) -> Result<(Vec<i8>, Vec<f32>)> {
    let (rows, cols) = w.dims2()?;
    let v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut q = Vec::with_capacity(rows * cols);
    let mut scales = Vec::with_capacity(rows);
    for r in 0..rows {
        let row = &v[r * cols..(r + 1) * cols];
        let m = row.iter().fold(0f32, |a, x| a.max(x.abs()));
        let s = if m > 0.0 { m / 127.0 } else { 1.0 };
        scales.push(s);
        q.extend(row.iter().map(|x| (x / s).round().clamp(-127.0, 127.0) as i8));
    }
    Ok((q, scales))
}

/// `scale_r * q` as a `[rows, cols]` f32 tensor.
pub fn dequantize_int8(q: &[i8], scales: &[f32], cols: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<f32> = q.iter().enumerate().map(|(i, &x)| x as f32 * scales[i / cols]).collect();
    Tensor::from_vec(v, (scales.len(), cols), dev)
}

/// What [`quantize_linear_weights`] changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantReport {
    /// Quantized weights, by name.
    pub tensors: Vec<String>,
    /// Scalars quantized.
    pub params: usize,
    /// Their size in f32 and as int8 values plus one f32 scale per output channel.
    pub f32_bytes: usize,
    pub int8_bytes: usize,
    /// Largest `|w - dequantized w|` over all quantized weights.
    pub max_abs_error: f32,
}

/// Replaces every 2-D weight of kind `Weight` in `vs` (the linear layers: attention, MLPs,
/// heads; convolutions are 4-D and stay in f32) by its int8 per-channel quantize-dequantize,
/// in place. Inference then runs the f32 kernels on the dequantized values (simulated int8:
/// the accuracy is the int8 model's, the speed is not an int8 kernel's).
pub fn quantize_linear_weights(vs: &VarStore) -> Result<QuantReport> {
    let mut rep = QuantReport::default();
    for e in vs.all() {
        if e.kind != ParamKind::Weight || e.var.rank() != 2 {
            continue;
        }
        let w = e.var.as_tensor();
        let (rows, cols) = w.dims2()?;
        let (q, s) = quantize_int8_per_channel(w)?;
        let dq = dequantize_int8(&q, &s, cols, w.device())?.to_dtype(w.dtype())?;
        let err = (w - &dq)?.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        rep.max_abs_error = rep.max_abs_error.max(err);
        e.var.set(&dq)?;
        rep.tensors.push(e.name.clone());
        rep.params += rows * cols;
        rep.f32_bytes += 4 * rows * cols;
        rep.int8_bytes += rows * cols + 4 * rows;
    }
    Ok(rep)
}
