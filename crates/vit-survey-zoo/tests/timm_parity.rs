//! Output parity with timm: loads the weights and the input/logits written by
//! `python3 bench/torch/vit_survey_zoo_reference.py export DIR` and compares logits.
//! Ignored by default (needs PyTorch and timm to produce the files):
//! `VIT_REF_DIR=DIR cargo test -p vit-survey-zoo --test timm_parity -- --ignored --nocapture`

use candle_core::{Device, Result};
use nn_core::VarStore;
use vit_survey_zoo::{create_model_with, weights, ModelOptions, MODEL_NAMES};

#[test]
#[ignore]
fn logits_match_timm() -> Result<()> {
    let dir = std::env::var("VIT_REF_DIR").map_err(|_| candle_core::Error::Msg("set VIT_REF_DIR to the export directory".into()))?;
    let only = std::env::var("VIT_REF_MODELS").ok();
    let mut checked = 0;
    let mut bad = Vec::new();
    for (name, _) in MODEL_NAMES {
        if let Some(o) = &only {
            if !o.split(',').any(|m| m == *name) {
                continue;
            }
        }
        let wpath = format!("{dir}/{name}.safetensors");
        let iopath = format!("{dir}/{name}.io.safetensors");
        if !std::path::Path::new(&wpath).exists() {
            continue;
        }
        let io = candle_core::safetensors::load(&iopath, &Device::Cpu)?;
        let x = &io["input"];
        let vs = VarStore::new(0, &Device::Cpu);
        let opts = ModelOptions {
            cheap_init: true,
            ..ModelOptions::new(1000, x.dims()[2])
        };
        let m = create_model_with(name, &opts, &vs.root())?;
        let rep = weights::load_safetensors(&vs, &wpath, true)?;
        let y = m.forward_t(x, false)?;
        let want = &io["logits"];
        let diff = (y - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        println!(
            "{name:<36} loaded {:>4} tensors, max |diff| {diff:.2e} (max |logit| {scale:.2e})",
            rep.loaded.len()
        );
        // NaN fails too
        if diff.is_nan() || diff > 1e-3 * scale.max(1.0) {
            bad.push(format!("{name}: max |diff| {diff}"));
        }
        checked += 1;
    }
    assert!(checked > 0, "no exported models found in {dir}");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    Ok(())
}
