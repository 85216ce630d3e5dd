//! The timm-like registry: model names, [`create_model`], and the [`ZooModel`] interface every
//! architecture implements on top of nn-core's [`Model`].

use candle_core::{Device, Result};
use nn_core::{Model, VarPath, VarStore};

/// A survey backbone: nn-core's [`Model`] (`forward_features`, `forward_head`,
/// `forward_stages`) plus analytic counting.
pub trait ZooModel: Model {
    /// Multiply-accumulates of one forward pass of one image at [`ZooModel::image_size`]:
    /// every matrix product (linear layers, Q K^T, A V) and convolution, what papers call FLOPs.
    fn macs(&self) -> u64;
    /// The input height = width the model was built for.
    fn image_size(&self) -> usize;
}

/// What [`create_model_with`] builds a model for.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelOptions {
    pub num_classes: usize,
    pub image_size: usize,
    pub in_chans: usize,
    /// Stochastic-depth rate of the last block (linearly increasing from 0).
    pub drop_path_rate: f64,
    /// Initialise every parameter to zero (cheap construction for counting or before loading).
    pub cheap_init: bool,
}

impl ModelOptions {
    pub fn new(num_classes: usize, image_size: usize) -> Self {
        Self {
            num_classes,
            image_size,
            in_chans: 3,
            drop_path_rate: 0.0,
            cheap_init: false,
        }
    }
}

/// A built model and the store holding its parameters.
pub struct Built {
    pub vs: VarStore,
    pub model: Box<dyn ZooModel>,
}

/// Registered names (timm's where the model exists there), with a description each.
pub const MODEL_NAMES: &[(&str, &str)] = &[
    ("vit_tiny_patch16_224", "ViT-Ti/16 (DeiT-Ti): 192 wide, 12 blocks, 3 heads"),
    ("vit_small_patch16_224", "ViT-S/16 (DeiT-S): 384 wide, 12 blocks, 6 heads"),
    ("vit_base_patch16_224", "ViT-B/16: 768 wide, 12 blocks, 12 heads"),
    ("deit_tiny_distilled_patch16_224", "DeiT-Ti with the distillation token and head"),
    (
        "cpvt_small_224",
        "CPVT-S: DeiT-S with a positional encoding generator after block 1 instead of a position embedding",
    ),
    (
        "swin_tiny_patch4_window7_224",
        "Swin-T: C = 96, depths 2-2-6-2, heads 3-6-12-24, 7x7 windows",
    ),
    ("pvt_v2_b0", "PVTv2-B0: widths 32-64-160-256, 2 blocks per stage, SR ratios 8-4-2-1"),
    (
        "pvt_tiny",
        "PVT-Tiny (v1): patch 4, widths 64-128-320-512, depths 2-2-2-2, SR ratios 8-4-2-1",
    ),
    ("pvt_small", "PVT-Small (v1): as PVT-Tiny with depths 3-4-6-3"),
    (
        "pit_ti_224",
        "PiT-Ti: stride-8 patch embedding, pooling stages 64-128-256, depths 2-6-4",
    ),
    (
        "convit_tiny",
        "ConViT-Ti: 10 gated positional self-attention blocks, then 2 plain ones",
    ),
    ("tnt_s_patch16_224", "TNT-S: outer 384 / inner 24, 12 blocks"),
    ("tnt_b_patch16_224", "TNT-B: outer 640 / inner 40, 12 blocks"),
    (
        "cmt_ti",
        "CMT-Ti (published at 160x160): conv stem, LPU + lightweight attention + IRFFN blocks",
    ),
    (
        "levit_128s",
        "LeViT-128S: conv stem, attention-bias stages 128-256-384, distilled head",
    ),
    (
        "t2t_vit_7",
        "T2T-ViT-7 (official code, performer T2T module): 256 wide, 7 blocks, 4 heads, MLP ratio 2",
    ),
    (
        "t2t_vit_14",
        "T2T-ViT-14 (official code, performer T2T module): 384 wide, 14 blocks, 6 heads, MLP ratio 3",
    ),
    (
        "vit_micro_patch4_32",
        "CIFAR ViT: 4x4 patches, 128 wide, 6 blocks, 4 heads, MLP ratio 2",
    ),
    (
        "deit_micro_distilled_patch4_32",
        "CIFAR DeiT: vit_micro_patch4_32 with a distillation token",
    ),
    (
        "swin_micro_patch2_window4_32",
        "CIFAR Swin: 2x2 patches, C = 48, depths 2-2-2-2, heads 2-4-8-16, 4x4 windows",
    ),
    ("pvt_v2_micro_32", "CIFAR PVTv2: B0 widths, stride-2 stem, SR ratios 4-2-1-1"),
];

/// Names accepted by [`create_model`].
pub fn model_names() -> Vec<&'static str> {
    MODEL_NAMES.iter().map(|(n, _)| *n).collect()
}

/// Builds `name` with seeded random initialisation (seed 0) on the CPU.
pub fn create_model(name: &str, num_classes: usize, image_size: usize) -> Result<Built> {
    let vs = VarStore::new(0, &Device::Cpu);
    let model = create_model_with(name, &ModelOptions::new(num_classes, image_size), &vs.root())?;
    Ok(Built { vs, model })
}

/// Builds `name` with parameters under `vp`.
pub fn create_model_with(name: &str, opts: &ModelOptions, vp: &VarPath) -> Result<Box<dyn ZooModel>> {
    if opts.num_classes == 0 || opts.image_size == 0 || opts.in_chans == 0 {
        candle_core::bail!("{name}: num_classes, image_size and in_chans must be positive, got {opts:?}");
    }
    crate::layers::with_cheap_init(opts.cheap_init, || build(name, opts, vp))
}

/// The [`crate::vit::VitConfig`] behind a registered ViT/DeiT/CPVT name (to build the concrete
/// [`crate::vit::VisionTransformer`], e.g. for [`crate::efficient`]); `None` for other models.
pub fn vit_config(name: &str) -> Option<crate::vit::VitConfig> {
    use crate::vit::VitConfig;
    Some(match name {
        "vit_tiny_patch16_224" => VitConfig::tiny(16),
        "vit_small_patch16_224" => VitConfig::small(16),
        "vit_base_patch16_224" => VitConfig::base(16),
        "deit_tiny_distilled_patch16_224" => VitConfig::tiny(16).distilled(),
        "cpvt_small_224" => VitConfig::small(16).cpvt(),
        "vit_micro_patch4_32" => micro_vit(),
        "deit_micro_distilled_patch4_32" => micro_vit().distilled(),
        _ => return None,
    })
}

fn micro_vit() -> crate::vit::VitConfig {
    crate::vit::VitConfig {
        mlp_ratio: 2.0,
        ..crate::vit::VitConfig::new(4, 128, 6, 4)
    }
}

fn build(name: &str, o: &ModelOptions, vp: &VarPath) -> Result<Box<dyn ZooModel>> {
    use crate::vit::VisionTransformer as Vit;
    if let Some(cfg) = vit_config(name) {
        return Ok(Box::new(Vit::new(name, vp, &cfg, o)?));
    }
    let m: Box<dyn ZooModel> = match name {
        "swin_tiny_patch4_window7_224" => Box::new(crate::swin::SwinTransformer::new(name, vp, &crate::swin::SwinConfig::tiny(), o)?),
        "pvt_v2_b0" => Box::new(crate::pvt::PvtV2::new(name, vp, &crate::pvt::PvtV2Config::b0(), o)?),
        "pvt_tiny" => Box::new(crate::pvt::PvtV1::new(name, vp, &crate::pvt::PvtV1Config::tiny(), o)?),
        "pvt_small" => Box::new(crate::pvt::PvtV1::new(name, vp, &crate::pvt::PvtV1Config::small(), o)?),
        "pit_ti_224" => Box::new(crate::pit::Pit::new(name, vp, &crate::pit::PitConfig::ti(), o)?),
        "convit_tiny" => Box::new(crate::convit::Convit::new(name, vp, &crate::convit::ConvitConfig::tiny(), o)?),
        "tnt_s_patch16_224" => Box::new(crate::tnt::Tnt::new(name, vp, &crate::tnt::TntConfig::small(), o)?),
        "tnt_b_patch16_224" => Box::new(crate::tnt::Tnt::new(name, vp, &crate::tnt::TntConfig::base(), o)?),
        "cmt_ti" => Box::new(crate::cmt::Cmt::new(name, vp, &crate::cmt::CmtConfig::ti(), o)?),
        "levit_128s" => Box::new(crate::levit::Levit::new(name, vp, &crate::levit::LevitConfig::levit_128s(), o)?),
        "t2t_vit_7" => Box::new(crate::t2t::T2tVit::new(name, vp, &crate::t2t::T2tConfig::t2t_vit_7(), o)?),
        "t2t_vit_14" => Box::new(crate::t2t::T2tVit::new(name, vp, &crate::t2t::T2tConfig::t2t_vit_14(), o)?),
        "swin_micro_patch2_window4_32" => {
            let cfg = crate::swin::SwinConfig {
                patch_size: 2,
                embed_dim: 48,
                depths: vec![2, 2, 2, 2],
                num_heads: vec![2, 4, 8, 16],
                window_size: 4,
                mlp_ratio: 4.0,
            };
            Box::new(crate::swin::SwinTransformer::new(name, vp, &cfg, o)?)
        }
        "pvt_v2_micro_32" => {
            let cfg = crate::pvt::PvtV2Config {
                stem_stride: 2,
                sr_ratios: vec![4, 2, 1, 1],
                ..crate::pvt::PvtV2Config::b0()
            };
            Box::new(crate::pvt::PvtV2::new(name, vp, &cfg, o)?)
        }
        other => candle_core::bail!("unknown model `{other}`; valid models: {}", model_names().join(", ")),
    };
    Ok(m)
}
