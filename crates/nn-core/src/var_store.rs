//! Named, seeded parameter storage.
//!
//! A [`VarStore`] owns every trainable parameter and buffer (BatchNorm running statistics) of a
//! model, in creation order, under hierarchical names (`layer1.0.conv1.weight`). Parameters are
//! initialised from the store's own seeded generator, so the same seed and the same model code
//! give the same weights on every device. Each entry carries a [`ParamKind`] so optimizers can,
//! for example, exclude biases and normalisation parameters from weight decay, and later crates
//! can count binary versus float parameters.

use crate::init::Init;
use crate::rng::{seeded, ChaCha8Rng};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// What a stored variable is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// A weight of a conv/linear layer (decayed).
    Weight,
    /// A bias (no weight decay by default).
    Bias,
    /// A normalisation scale (BN/LN gamma; no weight decay by default).
    NormWeight,
    /// A normalisation shift (BN/LN beta; no weight decay by default).
    NormBias,
    /// An embedding-like parameter (position embeddings, class tokens; no weight decay by default).
    Embedding,
    /// A non-trainable state tensor (running statistics, masks).
    Buffer,
}

impl ParamKind {
    /// Whether weight decay applies to this kind when the "exclude norm and bias" option is on.
    pub fn decays_by_default(self) -> bool {
        matches!(self, ParamKind::Weight)
    }
}

/// One stored variable.
#[derive(Clone, Debug)]
pub struct NamedVar {
    pub name: String,
    pub var: Var,
    pub kind: ParamKind,
    pub trainable: bool,
}

struct Inner {
    entries: Vec<NamedVar>,
    index: HashMap<String, usize>,
    rng: ChaCha8Rng,
}

/// Storage for a model's variables; cheap to clone (shared).
#[derive(Clone)]
pub struct VarStore {
    inner: Arc<Mutex<Inner>>,
    device: Device,
    dtype: DType,
    seed: u64,
}

impl VarStore {
    /// An empty store whose initialisations are drawn from `seed`, holding f32 variables on `device`.
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                entries: Vec::new(),
                index: HashMap::new(),
                rng: seeded(seed),
            })),
            device: device.clone(),
            dtype: DType::F32,
            seed,
        }
    }

    /// The root path (empty prefix).
    pub fn root(&self) -> VarPath {
        VarPath {
            store: self.clone(),
            prefix: String::new(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The seed the store was created with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// All variables (parameters and buffers), in creation order.
    pub fn all(&self) -> Vec<NamedVar> {
        self.lock().entries.clone()
    }

    /// Trainable parameters, in creation order.
    pub fn trainable(&self) -> Vec<NamedVar> {
        self.lock()
            .entries
            .iter()
            .filter(|e| e.trainable && e.kind != ParamKind::Buffer)
            .cloned()
            .collect()
    }

    /// The variable named `name`, if any.
    pub fn get(&self, name: &str) -> Option<NamedVar> {
        let g = self.lock();
        g.index.get(name).map(|&i| g.entries[i].clone())
    }

    /// Number of scalar parameters (buffers excluded; frozen parameters included).
    pub fn num_params(&self) -> usize {
        self.lock()
            .entries
            .iter()
            .filter(|e| e.kind != ParamKind::Buffer)
            .map(|e| e.var.elem_count())
            .sum()
    }

    /// Number of trainable scalar parameters.
    pub fn num_trainable_params(&self) -> usize {
        self.trainable().iter().map(|e| e.var.elem_count()).sum()
    }

    /// Freezes or unfreezes every parameter whose name starts with `prefix` (empty prefix: all).
    /// Returns how many variables changed.
    pub fn set_trainable(&self, prefix: &str, trainable: bool) -> usize {
        let mut g = self.lock();
        let mut n = 0;
        for e in g.entries.iter_mut() {
            if e.kind != ParamKind::Buffer && e.name.starts_with(prefix) && e.trainable != trainable {
                e.trainable = trainable;
                n += 1;
            }
        }
        n
    }

    /// A snapshot of every variable's current value, by name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.lock()
            .entries
            .iter()
            .map(|e| {
                (
                    e.name.clone(),
                    e.var.as_tensor().copy().unwrap_or_else(|_| e.var.as_tensor().clone()),
                )
            })
            .collect()
    }

    /// Sets variables from `tensors`. With `strict`, every stored variable must be present and no
    /// unknown name may appear; shapes must always match. Nothing is changed if any check fails.
    pub fn load_tensors(&self, tensors: &HashMap<String, Tensor>, strict: bool) -> Result<()> {
        let g = self.lock();
        let mut plan = Vec::new();
        for e in g.entries.iter() {
            match tensors.get(&e.name) {
                Some(t) => {
                    if t.dims() != e.var.dims() {
                        candle_core::bail!(
                            "variable `{}`: stored shape {:?} but checkpoint has {:?}",
                            e.name,
                            e.var.dims(),
                            t.dims()
                        );
                    }
                    plan.push((e.var.clone(), t.clone()));
                }
                None if strict => {
                    candle_core::bail!("variable `{}` is missing from the checkpoint", e.name)
                }
                None => {}
            }
        }
        if strict {
            if let Some(unknown) = tensors.keys().find(|k| !g.index.contains_key(*k)) {
                candle_core::bail!("checkpoint has `{unknown}`, which this model does not have");
            }
        }
        for (var, t) in plan {
            var.set(&t.to_device(&self.device)?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Saves every variable to a safetensors file, atomically (temporary file, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let tmp = path.with_extension("safetensors.tmp");
        candle_core::safetensors::save(&self.tensors(), &tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| candle_core::Error::Msg(format!("renaming {} to {}: {e}", tmp.display(), path.display())))
    }

    /// Loads variables saved by [`VarStore::save`] (strict: names and shapes must match).
    pub fn load(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let t = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| candle_core::Error::Msg(format!("reading weights from {}: {e}", path.display())))?;
        self.load_tensors(&t, true)
    }

    fn create(&self, name: String, dims: &[usize], init: Init, kind: ParamKind) -> Result<Var> {
        let mut g = self.lock();
        if g.index.contains_key(&name) {
            candle_core::bail!("variable `{name}` is created twice");
        }
        let values = init.sample(dims, &mut g.rng);
        let t = Tensor::from_vec(values, dims, &Device::Cpu)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let var = Var::from_tensor(&t)?;
        let idx = g.entries.len();
        g.entries.push(NamedVar {
            name: name.clone(),
            var: var.clone(),
            kind,
            trainable: kind != ParamKind::Buffer,
        });
        g.index.insert(name, idx);
        Ok(var)
    }

    /// Adds an existing tensor as a variable (e.g. a weight computed elsewhere).
    pub fn insert(&self, name: &str, value: &Tensor, kind: ParamKind) -> Result<Var> {
        let mut g = self.lock();
        if g.index.contains_key(name) {
            candle_core::bail!("variable `{name}` is created twice");
        }
        let var = Var::from_tensor(&value.to_device(&self.device)?.to_dtype(self.dtype)?)?;
        let idx = g.entries.len();
        g.entries.push(NamedVar {
            name: name.to_string(),
            var: var.clone(),
            kind,
            trainable: kind != ParamKind::Buffer,
        });
        g.index.insert(name.to_string(), idx);
        Ok(var)
    }
}

/// A position in a [`VarStore`]'s name hierarchy, used while building a model.
#[derive(Clone)]
pub struct VarPath {
    store: VarStore,
    prefix: String,
}

impl VarPath {
    /// The sub-path `prefix.name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> VarPath {
        VarPath {
            store: self.store.clone(),
            prefix: self.full_name(&name.to_string()),
        }
    }

    /// The full name of `leaf` below this path.
    pub fn full_name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }

    /// This path's own name (the prefix).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn store(&self) -> &VarStore {
        &self.store
    }

    pub fn device(&self) -> &Device {
        &self.store.device
    }

    /// Creates a trainable parameter `leaf` with the given shape and initialisation.
    pub fn param(&self, leaf: &str, dims: &[usize], init: Init, kind: ParamKind) -> Result<Var> {
        self.store.create(self.full_name(leaf), dims, init, kind)
    }

    /// Creates a non-trainable buffer `leaf`.
    pub fn buffer(&self, leaf: &str, dims: &[usize], init: Init) -> Result<Var> {
        self.store.create(self.full_name(leaf), dims, init, ParamKind::Buffer)
    }

    /// A seed for a stateful random layer at this path (dropout masks, noise), derived from the
    /// store's seed and the path's name, so it does not depend on creation order.
    pub fn derived_seed(&self) -> u64 {
        let mut parts = vec![self.store.seed];
        parts.extend(self.prefix.bytes().map(|b| b as u64));
        crate::rng::mix_seed(&parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_kinds_and_counts() -> Result<()> {
        let vs = VarStore::new(0, &Device::Cpu);
        let p = vs.root().pp("block").pp(0);
        p.param("weight", &[4, 3], Init::ONES, ParamKind::Weight)?;
        p.param("bias", &[4], Init::ZEROS, ParamKind::Bias)?;
        p.buffer("running_mean", &[4], Init::ZEROS)?;
        assert_eq!(vs.num_params(), 16);
        assert_eq!(vs.trainable().len(), 2);
        assert!(vs.get("block.0.weight").is_some());
        assert!(p.param("weight", &[1], Init::ONES, ParamKind::Weight).is_err());
        assert_eq!(vs.set_trainable("block.0.w", false), 1);
        assert_eq!(vs.num_trainable_params(), 4);
        Ok(())
    }

    #[test]
    fn save_load_roundtrip_and_strictness() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("nncore-vs-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("w.safetensors");
        let a = VarStore::new(1, &Device::Cpu);
        a.root()
            .param("w", &[3, 2], Init::Normal { mean: 0.0, std: 1.0 }, ParamKind::Weight)?;
        a.save(&path)?;
        let b = VarStore::new(2, &Device::Cpu);
        let wb = b.root().param("w", &[3, 2], Init::ZEROS, ParamKind::Weight)?;
        b.load(&path)?;
        let diff = (wb.as_tensor() - a.get("w").unwrap().var.as_tensor())?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let c = VarStore::new(2, &Device::Cpu);
        c.root().param("w", &[2, 3], Init::ZEROS, ParamKind::Weight)?;
        let err = c.load(&path).unwrap_err().to_string();
        assert!(err.contains("shape"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
