//! The efficiency methods: head pruning removes exactly the heads' parameters and MACs and
//! computes what the masked model computes; token pruning that keeps every token is the
//! unpruned model; int8 quantization stays within half a quantization step.

use candle_core::{Device, Result, Tensor};
use nn_core::init::Init;
use nn_core::{Model, VarStore};
use vit_survey_zoo::efficient::{
    dequantize_int8, forward_tokens_pruned, head_importance, heads_to_keep, mask_heads, normalize_per_layer, prune_heads,
    quantize_int8_per_channel, quantize_linear_weights, token_pruning_macs, TokenPruned, TokenPruning,
};
use vit_survey_zoo::vit::{VisionTransformer, VitConfig};
use vit_survey_zoo::ModelOptions;

fn perturb(vs: &VarStore) -> Result<()> {
    let mut rng = nn_core::rng::seeded(11);
    for p in vs.trainable() {
        let noise = Init::Normal { mean: 0.0, std: 0.1 }.sample(p.var.dims(), &mut rng);
        p.var
            .set(&(p.var.as_tensor() + Tensor::from_vec(noise, p.var.dims(), &Device::Cpu)?)?)?;
    }
    Ok(())
}

fn input(b: usize, size: usize) -> Result<Tensor> {
    let n = b * 3 * size * size;
    let v: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    Tensor::from_vec(v, (b, 3, size, size), &Device::Cpu)
}

/// 16x16 images, 4x4 patches: 16 patch tokens, 32 wide, 4 heads of 8.
fn small(distilled: bool) -> Result<(VarStore, VisionTransformer)> {
    let vs = VarStore::new(0, &Device::Cpu);
    let mut cfg = VitConfig::new(4, 32, 2, 4);
    cfg.distilled = distilled;
    let m = VisionTransformer::new("vit", &vs.root(), &cfg, &ModelOptions::new(5, 16))?;
    perturb(&vs)?;
    Ok((vs, m))
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
}

#[test]
fn pruned_heads_remove_their_parameters_and_macs_and_equal_the_masked_model() -> Result<()> {
    let (vs, m) = small(false)?;
    let keep = vec![vec![0, 2], vec![1, 2, 3]];
    let (pvs, pm) = prune_heads(&vs, &m, &keep)?;
    // 3 heads of 8 removed from 32-wide blocks: q, k, v rows (weight and bias) and proj columns
    let per_head = 3 * 8 * 32 + 3 * 8 + 8 * 32;
    assert_eq!(pvs.num_params(), vs.num_params() - 3 * per_head);
    // 17 tokens: qkv and proj lose 4 * 8 * 32 per token per head, Q K^T and A V 2 * 17 * 8
    let n = 17;
    assert_eq!(pm.macs(), m.macs() - 3 * (n * 4 * 8 * 32 + 2 * n * n * 8) as u64);
    assert_eq!(pm.blocks[0].attn.heads, 2);
    let x = input(2, 16)?;
    let y = pm.forward_t(&x, false)?;
    mask_heads(&m, &keep)?;
    let d = max_diff(&y, &m.forward_t(&x, false)?)?;
    assert!(d < 1e-5, "pruned vs masked: {d}");
    // nothing pruned: the same model
    let all = vec![vec![0, 1, 2, 3]; 2];
    let (avs, am) = prune_heads(&vs, &m, &all)?;
    assert_eq!(avs.num_params(), vs.num_params());
    assert!(max_diff(&am.forward_t(&x, false)?, &m.forward_t(&x, false)?)? < 1e-6);
    assert!(prune_heads(&vs, &m, &[vec![], vec![0]]).is_err());
    Ok(())
}

#[test]
fn head_importance_and_selection() -> Result<()> {
    let (_vs, m) = small(false)?;
    let x = input(4, 16)?;
    let y = Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu)?;
    let imp = head_importance(&m, &[(x, y)])?;
    assert_eq!(imp.len(), 2);
    assert!(imp.iter().flatten().all(|v| v.is_finite() && *v >= 0.0) && imp.iter().flatten().any(|v| *v > 0.0));
    let n = normalize_per_layer(&imp);
    for l in &n {
        assert!((l.iter().map(|v| v * v).sum::<f64>() - 1.0).abs() < 1e-9);
    }
    // lowest first, at least one head per block
    let scores = vec![vec![0.1, 0.9, 0.2], vec![0.05, 0.01]];
    assert_eq!(heads_to_keep(&scores, 1), vec![vec![0, 1, 2], vec![0]]);
    // the next lowest (block 1, head 0) is the last of its block: skipped
    assert_eq!(heads_to_keep(&scores, 2), vec![vec![1, 2], vec![0]]);
    assert_eq!(heads_to_keep(&scores, 3), vec![vec![1], vec![0]]);
    assert_eq!(heads_to_keep(&scores, 10), vec![vec![1], vec![0]]);
    assert_eq!(heads_to_keep(&scores, 0), vec![vec![0, 1, 2], vec![0, 1]]);
    Ok(())
}

#[test]
fn token_pruning_keeping_every_token_is_the_unpruned_model() -> Result<()> {
    for distilled in [false, true] {
        let (_vs, m) = small(distilled)?;
        let x = input(2, 16)?;
        let full = m.forward_tokens(&x, false)?;
        for fuse in [false, true] {
            let tp = TokenPruning {
                layers: vec![0, 1],
                keep_ratio: 1.0,
                fuse,
            };
            let t = forward_tokens_pruned(&m, &x, &tp)?;
            let p = m.prefix();
            // the class tokens are order-invariant to the (re-sorted) patch tokens
            let d = max_diff(&t.narrow(1, 0, p)?, &full.narrow(1, 0, p)?)?;
            assert!(d < 1e-5, "distilled {distilled} fuse {fuse}: {d}");
            assert_eq!(token_pruning_macs(&m, &tp), m.macs());
            let e = max_diff(
                &TokenPruned {
                    model: &m,
                    pruning: tp.clone(),
                }
                .forward_t(&x, false)?,
                &m.forward_t(&x, false)?,
            )?;
            assert!(e < 1e-5);
        }
    }
    Ok(())
}

#[test]
fn token_pruning_shrinks_tokens_and_macs() -> Result<()> {
    let (_vs, m) = small(false)?;
    let x = input(2, 16)?;
    let tp = TokenPruning {
        layers: vec![0],
        keep_ratio: 0.5,
        fuse: true,
    };
    // 16 patch tokens -> 8 kept + 1 fused after block 0
    assert_eq!(tp.tokens_per_block(2, 16), vec![(16, 9), (9, 9)]);
    let t = forward_tokens_pruned(&m, &x, &tp)?;
    assert_eq!(t.dims(), &[2, 10, 32]);
    let no_fuse = TokenPruning { fuse: false, ..tp.clone() };
    assert_eq!(forward_tokens_pruned(&m, &x, &no_fuse)?.dims(), &[2, 9, 32]);
    // block 0: attention on 17 tokens, MLP on 10; block 1 all on 10
    let (b0, b1) = (&m.blocks[0], &m.blocks[1]);
    let want = m.macs() - b0.macs(17) - b1.macs(17) + b0.attn.macs(17) + b0.mlp.macs(10) + b1.macs(10);
    assert_eq!(token_pruning_macs(&m, &tp), want);
    assert!(token_pruning_macs(&m, &tp) < m.macs());
    let bad = TokenPruning {
        layers: vec![2],
        ..tp.clone()
    };
    assert!(forward_tokens_pruned(&m, &x, &bad).is_err());
    Ok(())
}

#[test]
fn int8_quantization_error_is_at_most_half_a_step() -> Result<()> {
    let w = Tensor::new(
        &[[0.5f32, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.0, -2.0, 0.001]],
        &Device::Cpu,
    )?;
    let (q, s) = quantize_int8_per_channel(&w)?;
    assert_eq!(&q[..4], &[64, -127, 32, 0]);
    assert_eq!(&q[4..8], &[0, 0, 0, 0]);
    assert_eq!(q[8], 127);
    assert!((s[0] - 1.0 / 127.0).abs() < 1e-9 && s[1] == 1.0 && (s[2] - 3.0 / 127.0).abs() < 1e-9);
    let dq = dequantize_int8(&q, &s, 4, &Device::Cpu)?.to_vec2::<f32>()?;
    for (r, row) in w.to_vec2::<f32>()?.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            assert!((v - dq[r][c]).abs() <= s[r] / 2.0 + 1e-7, "{r} {c}");
        }
    }
    // on a model: every linear weight quantized, convolutions untouched, output close
    let (vs, m) = small(false)?;
    let x = input(2, 16)?;
    let before = m.forward_t(&x, false)?;
    let conv = vs.get("patch_embed.proj.weight").unwrap().var.as_tensor().copy()?;
    let rep = quantize_linear_weights(&vs)?;
    // qkv, proj, fc1, fc2 per block, and the head
    assert_eq!(rep.tensors.len(), 2 * 4 + 1);
    assert!(rep.max_abs_error > 0.0 && rep.max_abs_error < 0.5 / 127.0);
    assert!(rep.int8_bytes * 3 < rep.f32_bytes);
    assert_eq!(max_diff(&conv, vs.get("patch_embed.proj.weight").unwrap().var.as_tensor())?, 0.0);
    let after = m.forward_t(&x, false)?;
    let d = max_diff(&before, &after)?;
    assert!(d > 0.0 && d < 0.05, "{d}");
    Ok(())
}
