//! The packed model file: one safetensors file.
//!
//! Metadata (the safetensors header's `__metadata__`):
//! - `kind`: `resnet` (this module; files without `kind` are ResNets) or `bimlp`
//!   ([`crate::deploy::bimlp`]);
//! - `format`: `compact-vision/bnn-deploy`; `version`: [`VERSION`];
//! - `arch`: JSON [`Arch`]: model name, input and output sizes, every layer's geometry and
//!   activation kinds (no numbers that are also tensors);
//! - `sha256`: hex SHA-256 over `version`, `arch` and then, for every tensor in name order, its
//!   name, dtype, shape and bytes. Loading recomputes it, so a flipped byte anywhere in the
//!   tensors or in the architecture is reported as corruption; a truncated file fails to parse.
//!
//! Tensors (little endian): `stem.weight` f32 `[cout, cin, kh, kw]` (not folded), optional
//! `stem.conv_bias`, `stem.scale`, `stem.bias` f32 `[cout]` (the BatchNorm's eval scale and
//! shift); per block `blocks.{i}.conv{1,2}.packed` u64 `[cout, words(kh kw cin)]` (bit 1 =
//! `-1`, `(kh, kw, c)` order), `.alpha` (weight scales), optional `.conv_bias`, `.scale`,
//! `.bias` f32 `[cout]` (output transform `(dot * alpha [+ conv_bias]) * scale + bias`),
//! `blocks.{i}.act{1,2}.slope` f32 `[c]` for PReLU, `blocks.{i}.shortcut.*` for option-B
//! shortcuts (float or binary, as the stem and the binary convolutions); `fc.weight` f32
//! `[classes, features]`, `fc.bias`. The padding-correction tap sums are recomputed from the
//! packed weights when loading.
//!
//! Version history: 1 stored the weight scale and BatchNorm folded into one multiply-add and
//! the stem's BatchNorm folded into its weights (not bit-exact against candle); 2 stores them
//! separately. Files of another version are rejected.

use crate::deploy::conv::{ConvGeom, FloatConv, PackedConv};
use crate::deploy::model::{Activation, ActivationKind, PackedBlock, PackedResNet, ShortcutOp};
use crate::deploy::pack::{words, PackedMatrix};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const FORMAT: &str = "compact-vision/bnn-deploy";
pub const VERSION: u32 = 2;
/// Metadata value of `kind` for ResNet files (files without `kind` are ResNets).
pub const KIND: &str = "resnet";

/// The architecture stored in the metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arch {
    pub model: String,
    pub in_channels: usize,
    pub image_size: usize,
    pub num_classes: usize,
    pub stem: ConvGeom,
    pub stem_act: ActivationKind,
    pub blocks: Vec<BlockArch>,
    pub features: usize,
    /// Free-form provenance (the run directory it was exported from, the method).
    #[serde(default)]
    pub source: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockArch {
    pub conv1: ConvGeom,
    pub act1: ActivationKind,
    pub conv2: ConvGeom,
    pub act2: ActivationKind,
    pub shortcut: ShortcutArch,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShortcutArch {
    Identity,
    Pad { stride: usize, before: usize, after: usize },
    Float(ConvGeom),
    Binary(ConvGeom),
}

/// An error reading or writing a model file; always names the file.
#[derive(Debug)]
pub struct FormatError(pub String);

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for FormatError {}

enum Data {
    F32(Vec<f32>),
    U64(Vec<u64>),
}

struct Entry {
    shape: Vec<usize>,
    data: Data,
}

impl Entry {
    fn dtype(&self) -> Dtype {
        match self.data {
            Data::F32(_) => Dtype::F32,
            Data::U64(_) => Dtype::U64,
        }
    }
    fn bytes(&self) -> Vec<u8> {
        match &self.data {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::U64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

pub(crate) fn digest<'a>(version: &str, arch: &str, tensors: impl Iterator<Item = (&'a str, Dtype, &'a [usize], &'a [u8])>) -> String {
    let mut h = Sha256::new();
    h.update(version.as_bytes());
    h.update([0]);
    h.update(arch.as_bytes());
    h.update([0]);
    for (name, dt, shape, data) in tensors {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(format!("{dt:?}").as_bytes());
        for d in shape {
            h.update((*d as u64).to_le_bytes());
        }
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn act_slope(a: &Activation, name: String, t: &mut BTreeMap<String, Entry>) {
    if let Activation::Prelu(s) = a {
        t.insert(
            name,
            Entry {
                shape: vec![s.len()],
                data: Data::F32(s.clone()),
            },
        );
    }
}

fn put_f32(t: &mut BTreeMap<String, Entry>, name: String, shape: Vec<usize>, v: &[f32]) {
    t.insert(
        name,
        Entry {
            shape,
            data: Data::F32(v.to_vec()),
        },
    );
}

fn put_binary(t: &mut BTreeMap<String, Entry>, p: &str, c: &PackedConv) {
    t.insert(
        format!("{p}.packed"),
        Entry {
            shape: vec![c.weights.rows, c.weights.words_per_row()],
            data: Data::U64(c.weights.data.clone()),
        },
    );
    put_f32(t, format!("{p}.alpha"), vec![c.alpha.len()], &c.alpha);
    if let Some(b) = &c.conv_bias {
        put_f32(t, format!("{p}.conv_bias"), vec![b.len()], b);
    }
    put_f32(t, format!("{p}.scale"), vec![c.scale.len()], &c.scale);
    put_f32(t, format!("{p}.bias"), vec![c.bias.len()], &c.bias);
}

fn put_float(t: &mut BTreeMap<String, Entry>, p: &str, c: &FloatConv) {
    let g = c.geom;
    put_f32(t, format!("{p}.weight"), vec![g.cout, g.cin, g.kh, g.kw], &c.weight);
    if let Some(b) = &c.conv_bias {
        put_f32(t, format!("{p}.conv_bias"), vec![b.len()], b);
    }
    put_f32(t, format!("{p}.scale"), vec![g.cout], &c.scale);
    put_f32(t, format!("{p}.bias"), vec![g.cout], &c.bias);
}

/// The architecture of `m`, with `source` as provenance.
pub fn arch_of(m: &PackedResNet, source: BTreeMap<String, String>) -> Arch {
    Arch {
        model: m.model.clone(),
        in_channels: m.in_channels,
        image_size: m.image_size,
        num_classes: m.num_classes,
        stem: m.stem.geom,
        stem_act: m.stem_act.kind(),
        blocks: m
            .blocks
            .iter()
            .map(|b| BlockArch {
                conv1: b.conv1.geom,
                act1: b.act1.kind(),
                conv2: b.conv2.geom,
                act2: b.act2.kind(),
                shortcut: match &b.shortcut {
                    ShortcutOp::Identity => ShortcutArch::Identity,
                    ShortcutOp::Pad { stride, before, after } => ShortcutArch::Pad {
                        stride: *stride,
                        before: *before,
                        after: *after,
                    },
                    ShortcutOp::Float(f) => ShortcutArch::Float(f.geom),
                    ShortcutOp::Binary(c) => ShortcutArch::Binary(c.geom),
                },
            })
            .collect(),
        features: m.fc_weight.len() / m.num_classes.max(1),
        source,
    }
}

/// Serialises `m` (with provenance `source`) to the bytes of a model file.
pub fn to_bytes(m: &PackedResNet, source: BTreeMap<String, String>) -> Result<Vec<u8>, FormatError> {
    to_bytes_version(m, source, VERSION)
}

/// [`to_bytes`] with an explicit version number in the metadata (tests of version checks).
#[doc(hidden)]
pub fn to_bytes_version(m: &PackedResNet, source: BTreeMap<String, String>, version: u32) -> Result<Vec<u8>, FormatError> {
    let arch = arch_of(m, source);
    let arch_json = serde_json::to_string(&arch).map_err(|e| FormatError(format!("serialising the architecture: {e}")))?;
    let mut t = BTreeMap::new();
    put_float(&mut t, "stem", &m.stem);
    act_slope(&m.stem_act, "stem_act.slope".into(), &mut t);
    for (i, b) in m.blocks.iter().enumerate() {
        let p = format!("blocks.{i}");
        put_binary(&mut t, &format!("{p}.conv1"), &b.conv1);
        put_binary(&mut t, &format!("{p}.conv2"), &b.conv2);
        act_slope(&b.act1, format!("{p}.act1.slope"), &mut t);
        act_slope(&b.act2, format!("{p}.act2.slope"), &mut t);
        match &b.shortcut {
            ShortcutOp::Float(f) => put_float(&mut t, &format!("{p}.shortcut"), f),
            ShortcutOp::Binary(c) => put_binary(&mut t, &format!("{p}.shortcut"), c),
            _ => {}
        }
    }
    put_f32(&mut t, "fc.weight".into(), vec![m.num_classes, arch.features], &m.fc_weight);
    put_f32(&mut t, "fc.bias".into(), vec![m.num_classes], &m.fc_bias);
    let tensors = t
        .iter()
        .map(|(k, e)| (k.clone(), (e.dtype(), e.shape.clone(), e.bytes())))
        .collect();
    serialize(KIND, version, arch_json, &tensors)
}

/// Raw tensors of a model file by name: dtype, shape, little-endian bytes.
pub(crate) type RawTensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// The bytes of a model file: the tensors, and the metadata `format`, `kind`, `version`,
/// `arch` and the `sha256` checksum over version, architecture and tensors (see the module docs).
pub(crate) fn serialize(kind: &str, version: u32, arch_json: String, tensors: &RawTensors) -> Result<Vec<u8>, FormatError> {
    let version = version.to_string();
    let sum = digest(
        &version,
        &arch_json,
        tensors.iter().map(|(k, (d, s, b))| (k.as_str(), *d, s.as_slice(), b.as_slice())),
    );
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("kind".to_string(), kind.to_string());
    meta.insert("version".to_string(), version);
    meta.insert("arch".to_string(), arch_json);
    meta.insert("sha256".to_string(), sum);
    let views = tensors
        .iter()
        .map(|(k, (d, s, b))| TensorView::new(*d, s.clone(), b).map(|v| (k.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FormatError(format!("building tensor views: {e:?}")))?;
    safetensors::tensor::serialize(views, &Some(meta)).map_err(|e| FormatError(format!("serialising: {e:?}")))
}

/// Writes `m` to `path` (via a temporary file and a rename).
pub fn save(m: &PackedResNet, source: BTreeMap<String, String>, path: &Path) -> Result<u64, FormatError> {
    let bytes = to_bytes(m, source)?;
    write_atomically(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// Writes `bytes` to `path` via a temporary file and a rename.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), FormatError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| FormatError(format!("writing {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| FormatError(format!("renaming {} to {}: {e}", tmp.display(), path.display())))
}

/// Reads a model file written by [`save`].
pub fn load(path: &Path) -> Result<(PackedResNet, Arch), FormatError> {
    let bytes = std::fs::read(path).map_err(|e| FormatError(format!("reading {}: {e}", path.display())))?;
    from_bytes(&bytes).map_err(|e| FormatError(format!("{}: {}", path.display(), e.0)))
}

/// The model kind stored in the metadata's `kind` (absent in files written before BiMLP export:
/// they are ResNets).
pub fn kind_of(bytes: &[u8]) -> Result<String, FormatError> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| FormatError(format!("not a valid safetensors file (truncated or corrupted?): {e:?}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    Ok(meta.get("kind").cloned().unwrap_or_else(|| KIND.to_string()))
}

/// A model file whose format, kind, version and checksum were checked.
pub(crate) struct Checked<'a> {
    pub arch_json: String,
    pub tensors: HashMap<String, TensorView<'a>>,
}

/// Parses the safetensors bytes and checks format, `kind`, version and checksum.
pub(crate) fn open_checked<'a>(bytes: &'a [u8], kind: &str) -> Result<Checked<'a>, FormatError> {
    let err = |s: String| FormatError(s);
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| err(format!("not a valid safetensors file (truncated or corrupted?): {e:?}")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| err(format!("unreadable header: {e:?}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    match meta.get("format") {
        Some(f) if f == FORMAT => {}
        Some(f) => return Err(err(format!("format `{f}` is not `{FORMAT}`"))),
        None => return Err(err(format!("a safetensors file but not a `{FORMAT}` model (no `format` metadata)"))),
    }
    let stored_kind = meta.get("kind").map(String::as_str).unwrap_or(KIND);
    if stored_kind != kind {
        return Err(err(format!("a `{stored_kind}` model, not a `{kind}` model")));
    }
    let field = |k: &str| meta.get(k).ok_or_else(|| err(format!("metadata lacks `{k}`")));
    let version = field("version")?;
    if version != &VERSION.to_string() {
        return Err(err(format!(
            "format version {version}, but this build reads only version {VERSION} (version 1 files folded the \
             BatchNorm and are not bit-exact; export the run again with `cargo xtask bnn export`)"
        )));
    }
    let arch_json = field("arch")?;
    let mut items = st.tensors();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let got = digest(
        version,
        arch_json,
        items.iter().map(|(k, v)| (k.as_str(), v.dtype(), v.shape(), v.data())),
    );
    let want = field("sha256")?;
    if &got != want {
        return Err(err(format!("corrupted: checksum mismatch (stored {want}, computed {got})")));
    }
    Ok(Checked {
        arch_json: arch_json.clone(),
        tensors: items.into_iter().collect(),
    })
}

/// Parses the bytes of a ResNet model file, checking format, kind, version and checksum.
pub fn from_bytes(bytes: &[u8]) -> Result<(PackedResNet, Arch), FormatError> {
    let checked = open_checked(bytes, KIND)?;
    let arch: Arch = serde_json::from_str(&checked.arch_json).map_err(|e| FormatError(format!("unreadable architecture: {e}")))?;
    let m = build(&arch, &checked.tensors).map_err(FormatError)?;
    Ok((m, arch))
}

pub(crate) fn f32s(map: &HashMap<String, TensorView>, name: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
    let v = map.get(name).ok_or_else(|| format!("missing tensor `{name}`"))?;
    if v.dtype() != Dtype::F32 || v.shape() != shape {
        return Err(format!(
            "tensor `{name}` is {:?} {:?}, expected F32 {shape:?}",
            v.dtype(),
            v.shape()
        ));
    }
    Ok(v.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

fn binary(map: &HashMap<String, TensorView>, p: &str, g: ConvGeom) -> Result<PackedConv, String> {
    let name = format!("{p}.packed");
    let v = map.get(&name).ok_or_else(|| format!("missing tensor `{name}`"))?;
    let wpr = words(g.k());
    if v.dtype() != Dtype::U64 || v.shape() != [g.cout, wpr] {
        return Err(format!(
            "tensor `{name}` is {:?} {:?}, expected U64 [{}, {wpr}]",
            v.dtype(),
            v.shape(),
            g.cout
        ));
    }
    let data: Vec<u64> = v
        .data()
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let w = PackedMatrix::from_words(g.cout, g.k(), data).map_err(|e| format!("`{name}`: {e}"))?;
    PackedConv::new(
        g,
        w,
        f32s(map, &format!("{p}.scale"), &[g.cout])?,
        f32s(map, &format!("{p}.bias"), &[g.cout])?,
    )?
    .with_alpha(f32s(map, &format!("{p}.alpha"), &[g.cout])?, conv_bias(map, p, g)?)
}

fn conv_bias(map: &HashMap<String, TensorView>, p: &str, g: ConvGeom) -> Result<Option<Vec<f32>>, String> {
    let name = format!("{p}.conv_bias");
    map.contains_key(&name).then(|| f32s(map, &name, &[g.cout])).transpose()
}

fn float(map: &HashMap<String, TensorView>, p: &str, g: ConvGeom) -> Result<FloatConv, String> {
    Ok(FloatConv {
        geom: g,
        weight: f32s(map, &format!("{p}.weight"), &[g.cout, g.cin, g.kh, g.kw])?,
        conv_bias: conv_bias(map, p, g)?,
        scale: f32s(map, &format!("{p}.scale"), &[g.cout])?,
        bias: f32s(map, &format!("{p}.bias"), &[g.cout])?,
    })
}

fn act(map: &HashMap<String, TensorView>, name: &str, kind: ActivationKind, c: usize) -> Result<Activation, String> {
    Ok(match kind {
        ActivationKind::Identity => Activation::Identity,
        ActivationKind::Relu => Activation::Relu,
        ActivationKind::Hardtanh => Activation::Hardtanh,
        ActivationKind::Prelu => Activation::Prelu(f32s(map, name, &[c])?),
    })
}

fn build(a: &Arch, map: &HashMap<String, TensorView>) -> Result<PackedResNet, String> {
    let blocks = a
        .blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let p = format!("blocks.{i}");
            Ok(PackedBlock {
                conv1: binary(map, &format!("{p}.conv1"), b.conv1)?,
                act1: act(map, &format!("{p}.act1.slope"), b.act1, b.conv1.cout)?,
                conv2: binary(map, &format!("{p}.conv2"), b.conv2)?,
                act2: act(map, &format!("{p}.act2.slope"), b.act2, b.conv2.cout)?,
                shortcut: match &b.shortcut {
                    ShortcutArch::Identity => ShortcutOp::Identity,
                    ShortcutArch::Pad { stride, before, after } => ShortcutOp::Pad {
                        stride: *stride,
                        before: *before,
                        after: *after,
                    },
                    ShortcutArch::Float(g) => ShortcutOp::Float(float(map, &format!("{p}.shortcut"), *g)?),
                    ShortcutArch::Binary(g) => ShortcutOp::Binary(binary(map, &format!("{p}.shortcut"), *g)?),
                },
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(PackedResNet {
        model: a.model.clone(),
        in_channels: a.in_channels,
        image_size: a.image_size,
        num_classes: a.num_classes,
        stem: float(map, "stem", a.stem)?,
        stem_act: act(map, "stem_act.slope", a.stem_act, a.stem.cout)?,
        blocks,
        fc_weight: f32s(map, "fc.weight", &[a.num_classes, a.features])?,
        fc_bias: f32s(map, "fc.bias", &[a.num_classes])?,
    })
}
