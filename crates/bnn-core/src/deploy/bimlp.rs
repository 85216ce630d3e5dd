//! The packed BiMLP: bnn-core's [`BiMlp`] built with a [`PackedFactory`], so every binary FC
//! (1x1 channel FCs, depthwise 1x7 / 7x1 token FCs) runs on packed bits while the
//! full-precision parts (stem, BatchNorms, RPReLUs, phase modulation, branch reweighting,
//! downsampling, head) run the same candle operations as the trained model. The forward pass is
//! written once, in [`crate::bimlp`]; the packed layers compute the same exact integers as the
//! float convolutions of `sign(x)` and `sign(W)`, so the logits are bit-identical to the candle
//! forward pass in evaluation.
//!
//! # File
//! The model file of [`crate::deploy::format`] (same `format`, `version` and SHA-256 checksum)
//! with metadata `kind` = `bimlp` and `arch` = JSON [`BiMlpArch`]. Tensors: `float.{name}` f32,
//! every variable of the model other than binary weights (BatchNorm buffers included);
//! `binary.{prefix}.packed` u64 `[cout, words((cin / groups) kh kw)]` (bit 1 = `-1`, `(kh, kw, c)`
//! order), `binary.{prefix}.alpha` f32 `[cout]` and, for convolutions with a bias,
//! `binary.{prefix}.bias`.

use crate::bimlp::{BiMlp, BiMlpConfig};
use crate::deploy::format::{FormatError, VERSION};
use crate::deploy::gemm::Kernel;
use crate::deploy::layer::{KernelCell, PackedConvLayer, PackedFactory};
use crate::deploy::pack::{words, PackedMatrix};
use crate::factory::BinaryConfig;
use candle_core::{DType, Device, Tensor};
use nn_core::layers::Conv2dConfig;
use nn_core::models::ModelConfig;
use nn_core::{Model, VarStore};
use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

/// Metadata value of `kind` for BiMLP files.
pub const KIND: &str = "bimlp";

/// The architecture stored in a BiMLP file's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BiMlpArch {
    pub bimlp: BiMlpConfig,
    pub binary: BinaryConfig,
    pub in_channels: usize,
    pub image_size: usize,
    pub num_classes: usize,
    /// Every packed layer's configuration, by variable prefix.
    pub layers: BTreeMap<String, Conv2dConfig>,
    /// Free-form provenance (the run directory it was exported from, the method).
    #[serde(default)]
    pub source: BTreeMap<String, String>,
}

/// A BiMLP ready for inference.
pub struct PackedBiMlp {
    pub config: BiMlpConfig,
    pub binary: BinaryConfig,
    pub model_config: ModelConfig,
    /// The full-precision variables (no binary weights).
    pub floats: BTreeMap<String, Tensor>,
    pub layers: BTreeMap<String, Arc<PackedConvLayer>>,
    model: BiMlp,
    kernel: KernelCell,
}

impl std::fmt::Debug for PackedBiMlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedBiMlp({}, {} packed layers, {} float tensors)",
            self.config.name,
            self.layers.len(),
            self.floats.len()
        )
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Builds the model with `factory`, then loads exactly the variables it created from `vars`.
fn build(
    config: &BiMlpConfig,
    mc: &ModelConfig,
    factory: &PackedFactory,
    vars: &HashMap<String, Tensor>,
) -> Result<(BiMlp, VarStore), String> {
    let vs = VarStore::new(0, &Device::Cpu);
    let model = BiMlp::new(&vs.root(), mc, config, factory).map_err(err)?;
    let mut wanted = HashMap::new();
    for v in vs.all() {
        let t = vars
            .get(&v.name)
            .ok_or_else(|| format!("the model needs the full-precision tensor `{}`, which is missing", v.name))?;
        wanted.insert(v.name.clone(), t.clone());
    }
    vs.load_tensors(&wanted, true).map_err(err)?;
    Ok((model, vs))
}

impl PackedBiMlp {
    /// Packs a trained BiMLP: `vars` are its variables (a checkpoint's `model` map or
    /// `VarStore::tensors()`), `binary` the configuration of the [`BinaryFactory`](crate::BinaryFactory)
    /// it was trained with. FDA's noise modules (training only) are left out.
    pub fn export(
        vars: &HashMap<String, Tensor>,
        mc: &ModelConfig,
        config: &BiMlpConfig,
        binary: &BinaryConfig,
        kernel: Kernel,
    ) -> Result<Self, String> {
        let kernel = KernelCell::new(kernel);
        let factory = PackedFactory::from_trained(*binary, vars, kernel.clone())?;
        let (model, vs) = build(config, mc, &factory, vars)?;
        Ok(Self {
            config: config.clone(),
            binary: *binary,
            model_config: *mc,
            floats: vs.tensors().into_iter().collect(),
            layers: factory.layers(),
            model,
            kernel,
        })
    }

    /// Rebuilds the model from stored parts (a model file).
    pub fn from_parts(
        arch: &BiMlpArch,
        floats: BTreeMap<String, Tensor>,
        layers: BTreeMap<String, Arc<PackedConvLayer>>,
        kernel: KernelCell,
    ) -> Result<Self, String> {
        let mc = ModelConfig::new(arch.in_channels, arch.num_classes, arch.image_size);
        let factory = PackedFactory::from_layers(arch.binary, layers.clone(), kernel.clone());
        let vars: HashMap<String, Tensor> = floats.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let (model, vs) = build(&arch.bimlp, &mc, &factory, &vars)?;
        if vs.all().len() != floats.len() {
            let known: std::collections::HashSet<String> = vs.all().into_iter().map(|v| v.name).collect();
            let extra = floats.keys().find(|k| !known.contains(*k)).cloned().unwrap_or_default();
            return Err(format!("the file has the tensor `float.{extra}`, which this model does not have"));
        }
        let used = factory.layers();
        if used.len() != layers.len() {
            let extra = layers.keys().find(|k| !used.contains_key(*k)).cloned().unwrap_or_default();
            return Err(format!("the file has the packed layer `{extra}`, which this model does not have"));
        }
        Ok(Self {
            config: arch.bimlp.clone(),
            binary: arch.binary,
            model_config: mc,
            floats,
            layers,
            model,
            kernel,
        })
    }

    /// The binary GEMM kernel used from now on.
    pub fn set_kernel(&self, k: Kernel) {
        self.kernel.set(k)
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel.get()
    }

    /// The candle module (packed binary layers inside).
    pub fn model(&self) -> &BiMlp {
        &self.model
    }

    /// Logits `[n, num_classes]` for `n` images given as NCHW floats (normalised as in training).
    pub fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>, String> {
        let mc = &self.model_config;
        let (c, s) = (mc.in_channels, mc.image_size);
        if x.len() != n * c * s * s {
            return Err(format!(
                "{}: expected {n} images of {c} x {s} x {s} ({} values), got {} values",
                self.config.name,
                n * c * s * s,
                x.len()
            ));
        }
        let run = || -> candle_core::Result<Vec<f32>> {
            let t = Tensor::from_slice(x, (n, c, s, s), &Device::Cpu)?;
            self.model.forward_t(&t, false)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
        };
        run().map_err(err)
    }

    /// Bytes of parameters held: packed layers and full-precision tensors.
    pub fn param_bytes(&self) -> usize {
        self.layers.values().map(|l| l.param_bytes()).sum::<usize>() + self.floats.values().map(|t| t.elem_count() * 4).sum::<usize>()
    }

    /// Bytes the binary weights take packed, and in f32.
    pub fn binary_weight_bytes(&self) -> (usize, usize) {
        let packed = self.layers.values().map(|l| l.weights.data.len() * 8).sum();
        let f32s = self.layers.values().map(|l| l.weights.rows * l.weights.k * 4).sum();
        (packed, f32s)
    }

    /// Same parameters and structure (what a file must load back to).
    pub fn same_as(&self, o: &PackedBiMlp) -> bool {
        let floats_eq = self.floats.len() == o.floats.len()
            && self.floats.iter().all(|(k, a)| {
                o.floats.get(k).is_some_and(|b| {
                    a.dims() == b.dims()
                        && a.flatten_all().and_then(|t| t.to_vec1::<f32>()).ok() == b.flatten_all().and_then(|t| t.to_vec1::<f32>()).ok()
                })
            });
        self.config == o.config
            && self.binary == o.binary
            && self.model_config == o.model_config
            && floats_eq
            && self.layers.len() == o.layers.len()
            && self.layers.iter().all(|(k, l)| o.layers.get(k).is_some_and(|m| **l == **m))
    }

    pub fn arch(&self, source: BTreeMap<String, String>) -> BiMlpArch {
        BiMlpArch {
            bimlp: self.config.clone(),
            binary: self.binary,
            in_channels: self.model_config.in_channels,
            image_size: self.model_config.image_size,
            num_classes: self.model_config.num_classes,
            layers: self.layers.iter().map(|(k, l)| (k.clone(), l.config)).collect(),
            source,
        }
    }

    /// Serialises the model (with provenance `source`) to the bytes of a model file.
    pub fn to_bytes(&self, source: BTreeMap<String, String>) -> Result<Vec<u8>, FormatError> {
        let ferr = |s: String| FormatError(s);
        let arch_json = serde_json::to_string(&self.arch(source)).map_err(|e| ferr(format!("serialising the architecture: {e}")))?;
        let mut t = crate::deploy::format::RawTensors::new();
        let le_f32 = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        for (k, v) in &self.floats {
            let vals: Vec<f32> = v
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .map_err(|e| ferr(format!("reading `{k}`: {e}")))?;
            t.insert(format!("float.{k}"), (Dtype::F32, v.dims().to_vec(), le_f32(&vals)));
        }
        for (k, l) in &self.layers {
            let w = &l.weights;
            let bytes = w.data.iter().flat_map(|x| x.to_le_bytes()).collect();
            t.insert(format!("binary.{k}.packed"), (Dtype::U64, vec![w.rows, w.words_per_row()], bytes));
            t.insert(format!("binary.{k}.alpha"), (Dtype::F32, vec![l.alpha.len()], le_f32(&l.alpha)));
            if let Some(b) = &l.bias {
                t.insert(format!("binary.{k}.bias"), (Dtype::F32, vec![b.len()], le_f32(b)));
            }
        }
        crate::deploy::format::serialize(KIND, VERSION, arch_json, &t)
    }

    /// Writes the model to `path` (via a temporary file and a rename); returns the file size.
    pub fn save(&self, source: BTreeMap<String, String>, path: &Path) -> Result<u64, FormatError> {
        let bytes = self.to_bytes(source)?;
        crate::deploy::format::write_atomically(path, &bytes)?;
        Ok(bytes.len() as u64)
    }

    /// Reads a BiMLP model file.
    pub fn load(path: &Path, kernel: Kernel) -> Result<(Self, BiMlpArch), FormatError> {
        let bytes = std::fs::read(path).map_err(|e| FormatError(format!("reading {}: {e}", path.display())))?;
        Self::from_bytes(&bytes, kernel).map_err(|e| FormatError(format!("{}: {}", path.display(), e.0)))
    }

    /// Parses the bytes of a BiMLP model file, checking format, kind, version and checksum.
    pub fn from_bytes(bytes: &[u8], kernel: Kernel) -> Result<(Self, BiMlpArch), FormatError> {
        let ferr = |s: String| FormatError(s);
        let checked = crate::deploy::format::open_checked(bytes, KIND)?;
        let arch: BiMlpArch = serde_json::from_str(&checked.arch_json).map_err(|e| ferr(format!("unreadable BiMLP architecture: {e}")))?;
        let map = &checked.tensors;
        let kernel = KernelCell::new(kernel);
        let mut floats = BTreeMap::new();
        for (k, v) in map.iter() {
            if let Some(name) = k.strip_prefix("float.") {
                let t = crate::deploy::format::f32s(map, k, v.shape()).map_err(ferr)?;
                let t = Tensor::from_vec(t, v.shape(), &Device::Cpu).map_err(|e| ferr(format!("`{k}`: {e}")))?;
                floats.insert(name.to_string(), t);
            } else if !k.starts_with("binary.") {
                return Err(ferr(format!("unexpected tensor `{k}` in a BiMLP file")));
            }
        }
        let mut layers = BTreeMap::new();
        for (p, cfg) in &arch.layers {
            let (cout, k) = (cfg.out_channels, PackedConvLayer::k(cfg));
            let name = format!("binary.{p}.packed");
            let v = map.get(&name).ok_or_else(|| ferr(format!("missing tensor `{name}`")))?;
            if v.dtype() != Dtype::U64 || v.shape() != [cout, words(k)] {
                return Err(ferr(format!(
                    "tensor `{name}` is {:?} {:?}, expected U64 [{cout}, {}]",
                    v.dtype(),
                    v.shape(),
                    words(k)
                )));
            }
            let data = v
                .data()
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
            let w = PackedMatrix::from_words(cout, k, data).map_err(|e| ferr(format!("`{name}`: {e}")))?;
            let alpha = crate::deploy::format::f32s(map, &format!("binary.{p}.alpha"), &[cout]).map_err(ferr)?;
            let bn = format!("binary.{p}.bias");
            let bias = map
                .contains_key(&bn)
                .then(|| crate::deploy::format::f32s(map, &bn, &[cout]))
                .transpose()
                .map_err(ferr)?;
            let l = PackedConvLayer::new(*cfg, w, alpha, bias, kernel.clone()).map_err(|e| ferr(format!("layer `{p}`: {e}")))?;
            layers.insert(p.clone(), Arc::new(l));
        }
        let n_binary = map.keys().filter(|k| k.starts_with("binary.")).count();
        let expected: usize = layers.values().map(|l| 2 + l.bias.is_some() as usize).sum();
        if n_binary != expected {
            return Err(ferr(format!(
                "{n_binary} binary tensors in the file, but its architecture describes {expected}"
            )));
        }
        let m = Self::from_parts(&arch, floats, layers, kernel).map_err(ferr)?;
        Ok((m, arch))
    }
}
