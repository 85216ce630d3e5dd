//! Baseline importance criteria and rate-based selection.
//!
//! - [`l1_scores`]: L1-norm filter pruning (Li et al., ICLR 2017): a unit's importance is the
//!   sum of |w| over the conv filters that produce it (all producers of a coupled unit).
//! - [`random_scores`]: seeded random importance (the random-pruning baseline).
//! - [`select_lowest`]: removes the lowest-scoring `rate` of the units of every chosen group.

use crate::graph::{ChannelGraph, ChannelGroup, Role};
use crate::prune::Selection;
use anyhow::{Context, Result};
use nn_core::VarStore;
use rand::{Rng, SeedableRng};

/// Per group, per unit: sum of the L1 norms of the unit's producing conv filters.
pub fn l1_scores(graph: &ChannelGraph, vs: &VarStore) -> Result<Vec<Vec<f32>>> {
    let mut cache = std::collections::HashMap::new();
    let mut filter_l1 = |param: &str| -> Result<Vec<f32>> {
        if let Some(v) = cache.get(param) {
            return Ok(Vec::clone(v));
        }
        let t = vs
            .get(param)
            .with_context(|| format!("no parameter `{param}`"))?
            .var
            .as_tensor()
            .clone();
        let v: Vec<f32> = t.abs()?.flatten_from(1)?.sum(1)?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        cache.insert(param.to_string(), v.clone());
        Ok(v)
    };
    let mut out = Vec::with_capacity(graph.groups.len());
    for g in &graph.groups {
        let mut s = vec![0f32; g.len()];
        for m in graph
            .members
            .iter()
            .filter(|m| m.role == Role::Producer && m.masks && m.param.ends_with(".weight"))
        {
            if let Some(pos) = g.spaces.iter().position(|&sp| sp == m.space) {
                // conv filters only (BN weights are 1-d)
                if vs.get(&m.param).is_some_and(|v| v.var.as_tensor().rank() == 4) {
                    let l1 = filter_l1(&m.param)?;
                    for (u, unit) in g.units.iter().enumerate() {
                        s[u] += l1[unit[pos]];
                    }
                }
            }
        }
        out.push(s);
    }
    Ok(out)
}

/// Seeded uniform random importance per unit.
pub fn random_scores(graph: &ChannelGraph, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    graph
        .groups
        .iter()
        .map(|g| (0..g.len()).map(|_| rng.gen::<f32>()).collect())
        .collect()
}

/// Removes `round(rate * units)` lowest-scoring units of every prunable group accepted by
/// `filter` (at least one unit always stays). Ties break by unit index.
pub fn select_lowest(graph: &ChannelGraph, scores: &[Vec<f32>], rate: f64, filter: impl Fn(&ChannelGroup) -> bool) -> Selection {
    let mut sel = Selection::default();
    for g in graph.prunable().filter(|g| filter(g)) {
        let n = ((rate * g.len() as f64).round() as usize).min(g.len() - 1);
        if n == 0 {
            continue;
        }
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| scores[g.id][a].total_cmp(&scores[g.id][b]).then(a.cmp(&b)));
        let mut remove: Vec<usize> = order[..n].to_vec();
        remove.sort_unstable();
        sel.remove.insert(g.id, remove);
    }
    sel
}

/// Groups inside one residual block (the outputs of a basic block's first conv, of a
/// bottleneck's first two convs), the usual target of channel pruning in ResNets; for plain
/// networks every prunable group.
pub fn is_block_inner(graph: &ChannelGraph, g: &ChannelGroup) -> bool {
    g.spaces.len() == 1 && {
        let name = &graph.spaces[g.spaces[0]].name;
        let bottleneck_middle = name
            .strip_suffix(".conv2")
            .is_some_and(|block| graph.space_id(&format!("{block}.conv3")).is_some());
        name.ends_with(".conv1") || bottleneck_middle || name.starts_with("features.")
    }
}
