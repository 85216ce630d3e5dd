//! Removing channel units: masks (zeroed producers) and physical pruning (smaller tensors,
//! smaller model), and the counts of what was removed.

use crate::arch::Arch;
use crate::graph::ChannelGraph;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use nn_core::models::ModelConfig;
use nn_core::{LayerFactory, Model, VarStore};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Units to remove, per group id.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Selection {
    pub remove: BTreeMap<usize, Vec<usize>>,
}

impl Selection {
    /// Total removed units.
    pub fn count(&self) -> usize {
        self.remove.values().map(|v| v.len()).sum()
    }
}

/// Channels each space keeps (sorted), after removing `sel`; checks that every removed group
/// is prunable, unit indices are in range and every group keeps at least one unit.
pub fn kept_channels(graph: &ChannelGraph, sel: &Selection) -> Result<Vec<Vec<usize>>> {
    let mut kept: Vec<Vec<bool>> = graph.spaces.iter().map(|s| vec![true; s.size]).collect();
    for (&gid, units) in &sel.remove {
        let g = graph.groups.get(gid).with_context(|| format!("no channel group {gid}"))?;
        if let Some(why) = &g.blocked {
            if !units.is_empty() {
                bail!("group {gid} (`{}`) cannot be pruned: {why}", g.name);
            }
        }
        let mut seen = vec![false; g.len()];
        for &u in units {
            if u >= g.len() {
                bail!("group {gid} (`{}`) has {} units, asked to remove unit {u}", g.name, g.len());
            }
            if std::mem::replace(&mut seen[u], true) {
                bail!("group {gid} (`{}`): unit {u} selected twice", g.name);
            }
            for (&space, &ch) in g.spaces.iter().zip(&g.units[u]) {
                kept[space][ch] = false;
            }
        }
        if seen.iter().all(|&s| s) {
            bail!("group {gid} (`{}`) would lose all {} channels", g.name, g.len());
        }
    }
    Ok(kept
        .into_iter()
        .map(|k| k.iter().enumerate().filter(|(_, &keep)| keep).map(|(i, _)| i).collect())
        .collect())
}

fn expand(channels: &[usize], per_channel: usize) -> Vec<u32> {
    channels
        .iter()
        .flat_map(|&c| (0..per_channel).map(move |k| (c * per_channel + k) as u32))
        .collect()
}

/// The tensors of a model with the channels not in `kept` removed along every member axis.
pub fn prune_tensors(graph: &ChannelGraph, tensors: &HashMap<String, Tensor>, kept: &[Vec<usize>]) -> Result<HashMap<String, Tensor>> {
    let mut out = tensors.clone();
    for m in &graph.members {
        let keep = &kept[m.space];
        if keep.len() == graph.spaces[m.space].size {
            continue;
        }
        let t = out
            .get(&m.param)
            .with_context(|| format!("the model has no parameter `{}`", m.param))?;
        let expected = graph.spaces[m.space].size * m.per_channel;
        let dim = t.dim(m.axis)?;
        if dim != expected {
            bail!(
                "`{}` axis {} has {dim} entries, its channel space `{}` needs {expected}",
                m.param,
                m.axis,
                graph.spaces[m.space].name
            );
        }
        let idx = Tensor::new(expand(keep, m.per_channel).as_slice(), t.device())?;
        let pruned = t.index_select(&idx, m.axis)?;
        out.insert(m.param.clone(), pruned);
    }
    Ok(out)
}

/// Zeroes the removed channels' producers (conv filters and biases, BN weight and bias) in
/// place: the masked model computes exactly what the pruned model computes (a channel whose
/// BN weight and bias are zero is zero after BN and ReLU, and consumers ignore it).
pub fn apply_mask(graph: &ChannelGraph, vs: &VarStore, sel: &Selection) -> Result<()> {
    let kept = kept_channels(graph, sel)?;
    for m in graph.members.iter().filter(|m| m.masks) {
        let size = graph.spaces[m.space].size;
        if kept[m.space].len() == size {
            continue;
        }
        let var = vs
            .get(&m.param)
            .with_context(|| format!("the model has no parameter `{}`", m.param))?
            .var;
        let t = var.as_tensor();
        let mut mask = vec![0f32; size * m.per_channel];
        for i in expand(&kept[m.space], m.per_channel) {
            mask[i as usize] = 1.0;
        }
        let mut shape = vec![1; t.rank()];
        shape[m.axis] = size * m.per_channel;
        let mask = Tensor::from_vec(mask, shape, t.device())?.to_dtype(t.dtype())?;
        var.set(&t.broadcast_mul(&mask)?)?;
    }
    Ok(())
}

/// A physically pruned model: new architecture, new parameters.
pub struct Pruned {
    pub arch: Arch,
    pub vs: VarStore,
    pub model: Box<dyn Model>,
}

/// Builds the smaller model that `sel` leaves of `arch` (parameters in `vs`), through
/// `factory`, and loads its weights (strictly: every name and shape must match).
pub fn prune_model(arch: &Arch, cfg: &ModelConfig, vs: &VarStore, sel: &Selection, factory: &dyn LayerFactory) -> Result<Pruned> {
    let graph = arch.graph(cfg);
    let kept = kept_channels(&graph, sel)?;
    let sizes: Vec<usize> = kept.iter().map(|k| k.len()).collect();
    let new_arch = arch.resized(&graph, &sizes)?;
    let mut tensors = prune_tensors(&graph, &vs.tensors(), &kept)?;
    let new_vs = VarStore::new(vs.seed(), vs.device());
    let model = new_arch.build(cfg, &new_vs.root(), factory)?;
    // training-only extras of the source model (ManiDP gates, SCOP selection scales) are not
    // part of the pruned model; everything the pruned model has must come from the source
    let names: std::collections::HashSet<String> = new_vs.all().into_iter().map(|v| v.name).collect();
    tensors.retain(|k, _| names.contains(k));
    new_vs
        .load_tensors(&tensors, true)
        .context("loading the pruned weights into the rebuilt model")?;
    Ok(Pruned {
        arch: new_arch,
        vs: new_vs,
        model,
    })
}

/// Parameters and multiply-accumulates of one image through `model`.
pub fn count(model: &dyn Model, cfg: &ModelConfig, device: &Device) -> Result<(usize, u64)> {
    let x = Tensor::zeros((1, cfg.in_channels, cfg.image_size, cfg.image_size), DType::F32, device)?;
    let (_, s) = nn_core::summary::profile(|| model.forward_t(&x, false))?;
    Ok((s.total_params(), s.total_macs()))
}

/// File names of a saved pruned model.
pub const ARCH_FILE: &str = "arch.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

impl Pruned {
    /// Saves the architecture (JSON) and the weights (nn-core safetensors) into `dir`.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join(format!("{ARCH_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.arch)?)?;
        std::fs::rename(&tmp, dir.join(ARCH_FILE))?;
        self.vs.save(dir.join(WEIGHTS_FILE))?;
        Ok(())
    }

    /// Loads a model saved by [`Pruned::save`], building it through `factory`.
    pub fn load(dir: impl AsRef<Path>, cfg: &ModelConfig, factory: &dyn LayerFactory, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let p = dir.join(ARCH_FILE);
        let arch: Arch = serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?)
            .with_context(|| format!("parsing {}", p.display()))?;
        let vs = VarStore::new(0, device);
        let model = arch.build(cfg, &vs.root(), factory)?;
        vs.load(dir.join(WEIGHTS_FILE))
            .with_context(|| format!("loading {}", dir.join(WEIGHTS_FILE).display()))?;
        Ok(Self { arch, vs, model })
    }
}
