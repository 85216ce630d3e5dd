//! The registry: every name builds, the CIFAR-size variants run, bad requests fail clearly.

use candle_core::{Device, Result, Tensor};
use nn_core::VarStore;
use vit_survey_zoo::{create_model, create_model_with, model_names, ModelOptions, MODEL_NAMES};

#[test]
fn every_registered_name_builds_at_its_size() -> Result<()> {
    for (name, desc) in MODEL_NAMES {
        assert!(!desc.is_empty());
        let size = if name.ends_with("_32") { 32 } else { 224 };
        let vs = VarStore::new(0, &Device::Cpu);
        let opts = ModelOptions {
            cheap_init: true,
            ..ModelOptions::new(10, size)
        };
        let m = create_model_with(name, &opts, &vs.root())?;
        assert_eq!(m.name(), *name);
        assert_eq!(m.image_size(), size);
        assert_eq!(m.num_classes(), 10);
        assert!(m.macs() > 0);
    }
    Ok(())
}

#[test]
fn small_variants_run_and_pyramids_return_stages() -> Result<()> {
    let x = Tensor::zeros((2, 3, 32, 32), candle_core::DType::F32, &Device::Cpu)?;
    for name in model_names().into_iter().filter(|n| n.ends_with("_32")) {
        let b = create_model(name, 10, 32)?;
        let y = b.model.forward_t(&x, false)?;
        assert_eq!(y.dims(), &[2, 10], "{name}");
        let st = b.model.forward_stages(&x, false)?;
        assert_eq!(st.last().unwrap().dims(), &[2, b.model.num_features()], "{name}");
        if name.starts_with("swin") || name.starts_with("pvt") {
            assert_eq!(st.len(), 5, "{name}: four stage maps and the pooled features");
            assert_eq!(st[0].rank(), 4);
        }
    }
    Ok(())
}

#[test]
fn timm_models_build_for_other_image_sizes() -> Result<()> {
    // built (not run) at 384 / 256: grids and position tables follow the image size
    let b = create_model_with(
        "vit_tiny_patch16_224",
        &ModelOptions {
            cheap_init: true,
            ..ModelOptions::new(10, 384)
        },
        &VarStore::new(0, &Device::Cpu).root(),
    )?;
    assert!(b.macs() > 3_000_000_000);
    let vs = VarStore::new(0, &Device::Cpu);
    create_model_with(
        "vit_tiny_patch16_224",
        &ModelOptions {
            cheap_init: true,
            ..ModelOptions::new(10, 384)
        },
        &vs.root(),
    )?;
    assert_eq!(vs.get("pos_embed").unwrap().var.dims(), &[1, 24 * 24 + 1, 192]);
    let vs = VarStore::new(0, &Device::Cpu);
    create_model_with(
        "swin_tiny_patch4_window7_224",
        &ModelOptions {
            cheap_init: true,
            ..ModelOptions::new(10, 448)
        },
        &vs.root(),
    )?;
    Ok(())
}

#[test]
fn bad_requests_fail_with_clear_errors() -> Result<()> {
    let err = |r: Result<vit_survey_zoo::Built>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let e = err(create_model("vit_huge", 10, 224));
    assert!(
        e.contains("unknown model `vit_huge`") && e.contains("swin_tiny_patch4_window7_224"),
        "{e}"
    );
    let e = err(create_model("vit_tiny_patch16_224", 10, 100));
    assert!(e.contains("not a multiple of the patch size 16"), "{e}");
    let e = err(create_model("swin_tiny_patch4_window7_224", 10, 200));
    assert!(e.contains("multiple of 32"), "{e}");
    let e = err(create_model("vit_tiny_patch16_224", 0, 224));
    assert!(e.contains("must be positive"), "{e}");
    // a model built for 32x32 refuses 64x64 images and says what it expects
    let b = create_model("vit_micro_patch4_32", 10, 32)?;
    let x = Tensor::zeros((1, 3, 64, 64), candle_core::DType::F32, &Device::Cpu)?;
    let e = b.model.forward_t(&x, false).unwrap_err().to_string();
    assert!(e.contains("[B, 3, 32, 32]") && e.contains("[1, 3, 64, 64]"), "{e}");
    Ok(())
}
