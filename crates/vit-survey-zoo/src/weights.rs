//! Loading weights saved with timm's parameter names (`model.state_dict()` written with
//! `safetensors.torch.save_file`).
//!
//! Every model of the zoo names its parameters as timm does, so loading is a match by name.
//! Absolute position embeddings saved for another image size are resampled (bilinearly) to the
//! model's grid. Index buffers that timm recomputes (`relative_position_index`,
//! `attention_bias_idxs`) and BatchNorm's `num_batches_tracked` are ignored.

use crate::layers::{resample_grid, resample_pos_embed};
use candle_core::{Device, Result, Tensor};
use nn_core::VarStore;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// What a load matched, by parameter name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    /// In the model, not in the file.
    pub missing: Vec<String>,
    /// In the file, not in the model.
    pub unexpected: Vec<String>,
    /// (name, model shape, file shape).
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Position embeddings resampled to the model's grid.
    pub resampled: Vec<String>,
    /// Buffers timm stores that this crate recomputes.
    pub ignored: Vec<String>,
}

impl LoadReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} tensors loaded", self.loaded.len())?;
        if !self.missing.is_empty() {
            write!(f, "; missing from the file: {}", self.missing.join(", "))?;
        }
        if !self.unexpected.is_empty() {
            write!(f, "; unexpected in the file: {}", self.unexpected.join(", "))?;
        }
        for (n, m, t) in &self.mismatched {
            write!(f, "; `{n}` has shape {t:?} in the file but {m:?} in the model")?;
        }
        if !self.resampled.is_empty() {
            write!(f, "; resampled: {}", self.resampled.join(", "))?;
        }
        Ok(())
    }
}

const IGNORED_SUFFIXES: &[&str] = &["num_batches_tracked", "relative_position_index", "attention_bias_idxs"];

fn is_square(n: usize) -> bool {
    let r = (n as f64).sqrt().round() as usize;
    r * r == n
}

/// Tries to resample a position embedding `t` to the model's shape `want`.
fn try_resample(name: &str, t: &Tensor, want: &[usize]) -> Result<Option<Tensor>> {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    if !matches!(leaf, "pos_embed" | "patch_pos") {
        return Ok(None);
    }
    match (t.dims(), want) {
        (&[1, n, c], &[1, m, c2]) if c == c2 => {
            for prefix in 0..=2usize {
                if n > prefix && m > prefix && is_square(n - prefix) && is_square(m - prefix) {
                    let g = ((m - prefix) as f64).sqrt().round() as usize;
                    return Ok(Some(resample_pos_embed(t, prefix, g, g)?));
                }
            }
            Ok(None)
        }
        (&[1, c, _, _], &[1, c2, h, w]) if c == c2 => Ok(Some(resample_grid(t, h, w)?)),
        _ => Ok(None),
    }
}

/// Matches `tensors` against the store by name. With `strict`, any missing, unexpected or
/// mis-shaped key is an error naming them all, and nothing is changed; otherwise the matching
/// tensors are loaded and the report lists the rest.
pub fn load_tensors(vs: &VarStore, tensors: &HashMap<String, Tensor>, strict: bool) -> Result<LoadReport> {
    let mut report = LoadReport::default();
    let mut plan = Vec::new();
    for e in vs.all() {
        match tensors.get(&e.name) {
            None => {
                if e.kind != nn_core::ParamKind::Buffer || !e.name.ends_with("calls") {
                    report.missing.push(e.name.clone())
                }
            }
            Some(t) if t.dims() == e.var.dims() => {
                report.loaded.push(e.name.clone());
                plan.push((e.var.clone(), t.clone()));
            }
            Some(t) => match try_resample(&e.name, &t.to_dtype(candle_core::DType::F32)?, e.var.dims())? {
                Some(r) => {
                    report.loaded.push(e.name.clone());
                    report.resampled.push(format!("{} {:?} -> {:?}", e.name, t.dims(), e.var.dims()));
                    plan.push((e.var.clone(), r));
                }
                None => report.mismatched.push((e.name.clone(), e.var.dims().to_vec(), t.dims().to_vec())),
            },
        }
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for k in names {
        if vs.get(k).is_none() {
            if IGNORED_SUFFIXES.iter().any(|s| k.ends_with(s)) {
                report.ignored.push(k.clone());
            } else {
                report.unexpected.push(k.clone());
            }
        }
    }
    if strict && !report.is_clean() {
        candle_core::bail!("weights do not match the model: {report}");
    }
    for (var, t) in plan {
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(report)
}

/// Loads a safetensors file written from a timm model's `state_dict()` (see [`load_tensors`]).
pub fn load_safetensors(vs: &VarStore, path: impl AsRef<Path>, strict: bool) -> Result<LoadReport> {
    let path = path.as_ref();
    let t = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| candle_core::Error::Msg(format!("reading weights from {}: {e}", path.display())))?;
    load_tensors(vs, &t, strict).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
}
