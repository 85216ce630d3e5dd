//! Parameter counts (timm 1.0.31's, 1000 classes at 224x224) and MACs (PyTorch's FLOP counter,
//! halved) of every registered model. Models are built with zero initialisation and never run.

use candle_core::{Device, Result};
use nn_core::VarStore;
use vit_survey_zoo::{create_model_with, ModelOptions};

fn build(name: &str, image_size: usize) -> Result<(usize, u64)> {
    let vs = VarStore::new(0, &Device::Cpu);
    let opts = ModelOptions {
        cheap_init: true,
        ..ModelOptions::new(1000, image_size)
    };
    let m = create_model_with(name, &opts, &vs.root())?;
    Ok((vs.num_params(), m.macs()))
}

/// (name, image size, exact parameter count, reference MACs in G or 0 when not pinned)
const EXPECTED: &[(&str, usize, usize, f64)] = &[
    ("vit_tiny_patch16_224", 224, 5_717_416, 1.254),
    ("vit_small_patch16_224", 224, 22_050_664, 0.0),
    ("vit_base_patch16_224", 224, 86_567_656, 0.0),
    ("deit_tiny_distilled_patch16_224", 224, 5_910_800, 1.261),
    ("swin_tiny_patch4_window7_224", 224, 28_288_354, 4.491),
    ("pvt_v2_b0", 224, 3_666_760, 0.566),
    ("pit_ti_224", 224, 4_847_272, 0.0),
    ("convit_tiny", 224, 5_710_512, 1.252),
    ("tnt_s_patch16_224", 224, 23_768_584, 5.217),
    ("tnt_b_patch16_224", 224, 65_428_680, 0.0),
    ("levit_128s", 224, 7_777_058, 0.305),
    // PVT v1 from the official repository's code (no timm reference); published 13.2M / 24.5M
    ("pvt_tiny", 224, 13_229_288, 0.0),
    ("pvt_small", 224, 24_485_864, 0.0),
    // CPVT-S: DeiT-S less its position embedding plus the PEG (published: 22M)
    ("cpvt_small_224", 224, 21_978_856, 0.0),
    // CMT-Ti from the official code at 160x160 (published: 9.5M)
    ("cmt_ti", 160, 9_492_426, 0.0),
];

#[test]
fn parameter_counts_and_macs_match_the_references() -> Result<()> {
    let mut bad = Vec::new();
    for &(name, size, params, gmacs) in EXPECTED {
        let (p, macs) = build(name, size)?;
        let g = macs as f64 / 1e9;
        println!("{name:<36} params {p:>11} MACs {g:.4} G");
        if p != params {
            bad.push(format!("{name}: {p} parameters, expected {params}"));
        }
        if gmacs > 0.0 && (g / gmacs - 1.0).abs() > 0.02 {
            bad.push(format!("{name}: {g:.4} GMACs, reference {gmacs} G (more than 2% off)"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    Ok(())
}

/// T2T-ViT from the official repository's code (`t2t_vit_7`, `t2t_vit_14`, performer T2T
/// module), published as 4.3M and 21.5M: all parameters as the official training script counts
/// them (`model.parameters()`, including the fixed sinusoidal `pos_embed` and the Performer
/// random features `w`, which are not trained), and the trainable ones.
#[test]
fn t2t_vit_counts_match_the_official_code() -> Result<()> {
    for (name, all, trainable) in [("t2t_vit_7", 4_310_222, 4_255_694), ("t2t_vit_14", 21_545_550, 21_465_806)] {
        let vs = VarStore::new(0, &Device::Cpu);
        let opts = ModelOptions {
            cheap_init: true,
            ..ModelOptions::new(1000, 224)
        };
        let m = create_model_with(name, &opts, &vs.root())?;
        println!(
            "{name}: {} params ({} trainable), {:.4} GMACs",
            vs.num_params(),
            vs.num_trainable_params(),
            m.macs() as f64 / 1e9
        );
        assert_eq!((vs.num_params(), vs.num_trainable_params()), (all, trainable), "{name}");
    }
    Ok(())
}
