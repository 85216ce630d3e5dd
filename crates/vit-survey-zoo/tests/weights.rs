//! Loading safetensors files with timm's key names.

use candle_core::{DType, Device, Result, Tensor};
use nn_core::VarStore;
use std::collections::HashMap;
use vit_survey_zoo::{create_model_with, weights, ModelOptions, ZooModel};

fn build(name: &str, size: usize, seed: u64) -> Result<(VarStore, Box<dyn ZooModel>)> {
    let vs = VarStore::new(seed, &Device::Cpu);
    let m = create_model_with(name, &ModelOptions::new(10, size), &vs.root())?;
    Ok((vs, m))
}

fn image(size: usize) -> Result<Tensor> {
    let v: Vec<f32> = (0..2 * 3 * size * size).map(|i| ((i * 13 % 29) as f32 / 14.0) - 1.0).collect();
    Tensor::from_vec(v, (2, 3, size, size), &Device::Cpu)
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vit-survey-zoo-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join("w.safetensors")
}

/// A file written with timm's names and shapes (here: from another model of the same
/// architecture) loads strictly, and the outputs are a deterministic function of it.
#[test]
fn timm_named_file_loads_and_determines_the_output() -> Result<()> {
    let path = tmp("det");
    let (a, ma) = build("vit_micro_patch4_32", 32, 1)?;
    // the names are timm's: spot-check a few
    for k in [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.5.mlp.fc2.weight",
        "head.weight",
    ] {
        assert!(a.get(k).is_some(), "missing timm name {k}");
    }
    let tensors: HashMap<String, Tensor> = a.all().into_iter().map(|e| (e.name, e.var.as_tensor().clone())).collect();
    candle_core::safetensors::save(&tensors, &path)?;
    let x = image(32)?;
    let ya = ma.forward_t(&x, false)?;
    let (b, mb) = build("vit_micro_patch4_32", 32, 2)?;
    assert!(
        (mb.forward_t(&x, false)? - &ya)?.abs()?.max_all()?.to_scalar::<f32>()? > 1e-4,
        "different seeds differ"
    );
    let rep = weights::load_safetensors(&b, &path, true)?;
    assert!(rep.is_clean(), "{rep}");
    assert_eq!(rep.loaded.len(), tensors.len());
    let yb = mb.forward_t(&x, false)?;
    assert_eq!(yb.flatten_all()?.to_vec1::<f32>()?, ya.flatten_all()?.to_vec1::<f32>()?);
    // changing one tensor of the file changes the output
    let mut t2 = tensors.clone();
    let w = &t2["head.bias"];
    t2.insert("head.bias".into(), (w + 1.0)?);
    weights::load_tensors(&b, &t2, true)?;
    let yc = mb.forward_t(&x, false)?;
    let d = (yc - ya)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    assert!(d.iter().all(|v| (v - 1.0).abs() < 1e-5), "{d:?}");
    std::fs::remove_dir_all(path.parent().unwrap()).ok();
    Ok(())
}

#[test]
fn missing_unexpected_and_misshaped_keys_are_named() -> Result<()> {
    let (a, _) = build("vit_micro_patch4_32", 32, 1)?;
    let mut t: HashMap<String, Tensor> = a.all().into_iter().map(|e| (e.name, e.var.as_tensor().clone())).collect();
    t.remove("blocks.3.norm1.weight");
    t.insert("blocks.0.attn.qkv.weight".into(), Tensor::zeros((5, 5), DType::F32, &Device::Cpu)?);
    t.insert("fc_norm.weight".into(), Tensor::zeros(128, DType::F32, &Device::Cpu)?);
    t.insert(
        "blocks.0.attn.relative_position_index".into(),
        Tensor::zeros(4, DType::U32, &Device::Cpu)?,
    );
    let (b, _) = build("vit_micro_patch4_32", 32, 2)?;
    let before = b.get("head.weight").unwrap().var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    let err = weights::load_tensors(&b, &t, true).unwrap_err().to_string();
    for k in ["blocks.3.norm1.weight", "blocks.0.attn.qkv.weight", "fc_norm.weight", "[5, 5]"] {
        assert!(err.contains(k), "`{k}` not in: {err}");
    }
    let after = b.get("head.weight").unwrap().var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(before, after, "a failed strict load changes nothing");
    let rep = weights::load_tensors(&b, &t, false)?;
    assert_eq!(rep.missing, vec!["blocks.3.norm1.weight".to_string()]);
    assert_eq!(rep.unexpected, vec!["fc_norm.weight".to_string()]);
    assert_eq!(rep.mismatched.len(), 1);
    assert_eq!(rep.ignored, vec!["blocks.0.attn.relative_position_index".to_string()]);
    // the rest was loaded
    let loaded = b.get("head.weight").unwrap().var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(loaded, t["head.weight"].flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}

/// Position embeddings saved for one image size are resampled into a model built for another
/// (ViT token grid with a class token, PiT's [1, C, H, W] map).
#[test]
fn position_embeddings_resize_to_other_image_sizes() -> Result<()> {
    for (name, from, to) in [
        ("vit_micro_patch4_32", 32, 48),
        ("pit_ti_224", 64, 96),
        ("deit_micro_distilled_patch4_32", 32, 16),
    ] {
        let (a, _) = build(name, from, 1)?;
        let path = tmp(&format!("resize-{name}"));
        a.save(&path)?;
        let (b, mb) = build(name, to, 2)?;
        let rep = weights::load_safetensors(&b, &path, true)?;
        assert_eq!(rep.resampled.len(), 1, "{name}: {rep}");
        let y = mb.forward_t(&image(to)?, false)?;
        assert_eq!(y.dims(), &[2, 10]);
        std::fs::remove_dir_all(path.parent().unwrap()).ok();
    }
    Ok(())
}

#[test]
fn bad_files_give_errors_naming_the_file() -> Result<()> {
    let (b, _) = build("vit_micro_patch4_32", 32, 2)?;
    let path = tmp("garbage");
    std::fs::write(&path, b"not a safetensors file").unwrap();
    let err = weights::load_safetensors(&b, &path, true).unwrap_err().to_string();
    assert!(err.contains("w.safetensors"), "{err}");
    let err = weights::load_safetensors(&b, path.with_file_name("absent.safetensors"), true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.safetensors"), "{err}");
    std::fs::remove_dir_all(path.parent().unwrap()).ok();
    Ok(())
}

/// T2T-ViT with the official code's state-dict names, including the untrained `pos_embed` and
/// Performer random features `w`: a file from another seed reproduces that model exactly.
#[test]
fn t2t_vit_loads_the_official_names() -> Result<()> {
    let path = tmp("t2t");
    let (a, ma) = build("t2t_vit_7", 32, 1)?;
    for k in [
        "tokens_to_token.attention1.kqv.weight",
        "tokens_to_token.attention1.w",
        "tokens_to_token.attention1.mlp.2.bias",
        "tokens_to_token.attention2.norm1.weight",
        "tokens_to_token.project.weight",
        "pos_embed",
        "blocks.6.attn.qkv.weight",
        "blocks.6.mlp.fc2.weight",
        "norm.bias",
        "head.weight",
    ] {
        assert!(a.get(k).is_some(), "missing official name {k}");
    }
    assert!(a.get("blocks.0.attn.qkv.bias").is_none(), "T2T-ViT's qkv has no bias");
    assert_eq!(a.get("tokens_to_token.attention1.w").unwrap().var.dims(), &[32, 64]);
    let tensors: HashMap<String, Tensor> = a.all().into_iter().map(|e| (e.name, e.var.as_tensor().clone())).collect();
    candle_core::safetensors::save(&tensors, &path)?;
    let x = image(32)?;
    let ya = ma.forward_t(&x, false)?;
    let (b, mb) = build("t2t_vit_7", 32, 2)?;
    assert!((mb.forward_t(&x, false)? - &ya)?.abs()?.max_all()?.to_scalar::<f32>()? > 1e-4);
    let rep = weights::load_safetensors(&b, &path, true)?;
    assert!(rep.is_clean(), "{rep}");
    let yb = mb.forward_t(&x, false)?;
    assert_eq!(yb.flatten_all()?.to_vec1::<f32>()?, ya.flatten_all()?.to_vec1::<f32>()?);
    let _ = std::fs::remove_file(&path);
    Ok(())
}
