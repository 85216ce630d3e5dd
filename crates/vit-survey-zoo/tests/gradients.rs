//! One forward and backward pass per model family on a small input (tiny configurations of the
//! same code): every trainable parameter must get a finite gradient that is not all zeros.
//!
//! Parameters are first perturbed by seeded noise: some published initialisations zero a
//! branch on purpose (LeViT's `bn_weight_init = 0`), which would hide a broken path.

use candle_core::{Device, Result, Tensor};
use nn_core::init::Init;
use nn_core::testing::check_all_params_get_gradients;
use nn_core::VarStore;
use vit_survey_zoo::cmt::{Cmt, CmtConfig};
use vit_survey_zoo::convit::{Convit, ConvitConfig};
use vit_survey_zoo::levit::{Levit, LevitConfig};
use vit_survey_zoo::pit::{Pit, PitConfig};
use vit_survey_zoo::pvt::{PvtV1, PvtV1Config, PvtV2, PvtV2Config};
use vit_survey_zoo::swin::{SwinConfig, SwinTransformer};
use vit_survey_zoo::t2t::{T2tConfig, T2tVit};
use vit_survey_zoo::tnt::{Tnt, TntConfig};
use vit_survey_zoo::vit::{VisionTransformer, VitConfig};
use vit_survey_zoo::{ModelOptions, ZooModel};

fn perturb(vs: &VarStore) -> Result<()> {
    let mut rng = nn_core::rng::seeded(7);
    for p in vs.trainable() {
        let noise = Init::Normal { mean: 0.0, std: 0.05 }.sample(p.var.dims(), &mut rng);
        let n = Tensor::from_vec(noise, p.var.dims(), &Device::Cpu)?;
        p.var.set(&(p.var.as_tensor() + n)?)?;
    }
    Ok(())
}

fn input(size: usize) -> Result<Tensor> {
    let n = 2 * 3 * size * size;
    let v: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    Tensor::from_vec(v, (2, 3, size, size), &Device::Cpu)
}

fn check<M: ZooModel + 'static>(size: usize, build: impl FnOnce(&VarStore, &ModelOptions) -> Result<M>) -> Result<()> {
    let vs = VarStore::new(0, &Device::Cpu);
    // no stochastic depth here: a seeded draw could drop a whole branch for the batch
    let opts = ModelOptions::new(5, size);
    let m = build(&vs, &opts)?;
    perturb(&vs)?;
    let x = input(size)?;
    let y = m.forward_t(&x, false)?;
    assert_eq!(y.dims(), &[2, 5]);
    let f = m.forward_features(&x, false)?;
    assert_eq!(f.dims(), &[2, m.num_features()]);
    check_all_params_get_gradients(&m, &vs, &x)
}

#[test]
fn vit_and_deit_gradients() -> Result<()> {
    let cfg = VitConfig::new(4, 32, 2, 2);
    check(16, |vs, o| VisionTransformer::new("vit", &vs.root(), &cfg, o))?;
    check(16, |vs, o| VisionTransformer::new("deit", &vs.root(), &cfg.clone().distilled(), o))?;
    check(16, |vs, o| VisionTransformer::new("cpvt", &vs.root(), &cfg.clone().cpvt(), o))
}

#[test]
fn swin_gradients_with_shifted_windows() -> Result<()> {
    let cfg = SwinConfig {
        patch_size: 2,
        embed_dim: 16,
        depths: vec![2, 2],
        num_heads: vec![1, 2],
        window_size: 2,
        mlp_ratio: 2.0,
    };
    check(16, |vs, o| SwinTransformer::new("swin", &vs.root(), &cfg, o))
}

#[test]
fn pvt_v2_gradients() -> Result<()> {
    let cfg = PvtV2Config {
        embed_dims: vec![16, 32],
        num_heads: vec![1, 2],
        mlp_ratios: vec![2, 2],
        depths: vec![1, 1],
        sr_ratios: vec![2, 1],
        stem_stride: 2,
    };
    check(16, |vs, o| PvtV2::new("pvt", &vs.root(), &cfg, o))
}

#[test]
fn pvt_v1_gradients_with_the_class_token_stage() -> Result<()> {
    let cfg = PvtV1Config {
        patch_size: 2,
        embed_dims: vec![16, 32],
        num_heads: vec![1, 2],
        mlp_ratios: vec![2, 2],
        depths: vec![1, 1],
        sr_ratios: vec![2, 1],
    };
    check(16, |vs, o| PvtV1::new("pvt_v1", &vs.root(), &cfg, o))
}

#[test]
fn pit_gradients() -> Result<()> {
    let cfg = PitConfig {
        patch_size: 4,
        stride: 2,
        base_dims: vec![8, 8],
        depth: vec![1, 1],
        heads: vec![2, 4],
        mlp_ratio: 2.0,
    };
    check(16, |vs, o| Pit::new("pit", &vs.root(), &cfg, o))
}

#[test]
fn convit_gradients() -> Result<()> {
    let cfg = ConvitConfig {
        patch_size: 4,
        embed_dim: 16,
        depth: 3,
        num_heads: 4,
        local_up_to_layer: 2,
        locality_strength: 1.0,
    };
    check(16, |vs, o| Convit::new("convit", &vs.root(), &cfg, o))
}

#[test]
fn tnt_gradients() -> Result<()> {
    let cfg = TntConfig {
        patch_size: 8,
        embed_dim: 32,
        inner_dim: 8,
        depth: 2,
        num_heads_inner: 2,
        num_heads_outer: 2,
        mlp_ratio: 2.0,
        inner_stride: 4,
    };
    check(16, |vs, o| Tnt::new("tnt", &vs.root(), &cfg, o))
}

#[test]
fn levit_gradients() -> Result<()> {
    let cfg = LevitConfig {
        embed_dim: vec![32, 48],
        key_dim: 8,
        num_heads: vec![2, 3],
        depth: vec![1, 1],
        attn_ratio: 2.0,
        mlp_ratio: 2.0,
        distilled: true,
    };
    check(64, |vs, o| Levit::new("levit", &vs.root(), &cfg, o))
}

#[test]
fn cmt_gradients() -> Result<()> {
    let cfg = CmtConfig {
        embed_dims: vec![8, 16],
        stem_channel: 4,
        fc_dim: 24,
        num_heads: vec![1, 2],
        mlp_ratio: 2.0,
        depths: vec![1, 1],
        sr_ratios: vec![2, 1],
    };
    check(32, |vs, o| Cmt::new("cmt", &vs.root(), &cfg, o))
}

#[test]
fn t2t_vit_gradients_through_the_performer_and_soft_splits() -> Result<()> {
    let cfg = T2tConfig {
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        mlp_ratio: 2.0,
        token_dim: 8,
        kernel_ratio: 0.5,
        qk_scale: None,
    };
    check(32, |vs, o| T2tVit::new("t2t", &vs.root(), &cfg, o))
}
