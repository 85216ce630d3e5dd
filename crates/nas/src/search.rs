//! The search loop: DC-NAS and the two baselines on one budget, with a JSON state saved after
//! every evaluation so a killed search resumes without evaluating anything twice.
//!
//! - **DC-NAS** (Wang, Xu, Tao 2020): sample `N` sub-networks; cheap-evaluate each (supernet
//!   accuracy) and compute its layer-wise representation ([`crate::eval`]); standardise the
//!   representations, compute their pairwise similarity and cluster them with k-means++ into
//!   `K` clusters ([`crate::cluster`]); in each cluster keep the best sub-network by the cheap
//!   criterion; train those `K` stand-alone and pick the best by validation accuracy.
//! - **Global top-K**: the `K` best of the `N` by the cheap criterion, trained stand-alone.
//! - **Random**: `K` of the `N` uniformly at random, trained stand-alone (no supernet).
//! - **All**: every one of the `N` trained stand-alone (the ranking-quality study).
//!
//! The budget of the first three is the same: `K` stand-alone trainings.

use crate::cluster::{kmeans, similarity_matrix, standardize, KMeans};
use crate::data::NasData;
use crate::eval::{cheap_eval, CheapEval, FeatureKind};
use crate::parallel::run_jobs;
use crate::space::{Arch, SearchSpace};
use crate::standalone::{train_standalone, StandaloneConfig, StandaloneResult};
use crate::supernet::Supernet;
use anyhow::{bail, Context, Result};
use nn_core::rng::{derived, mix_seed};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Writes `value` as pretty JSON through a temporary file and a rename.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(value)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// The search method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Dcnas,
    Random,
    /// Global top-K by the cheap criterion (`top1` on the command line: the global ranking).
    TopK,
    /// Train every candidate (ranking study).
    All,
}

impl Method {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "dcnas" | "dc-nas" => Method::Dcnas,
            "random" => Method::Random,
            "top1" | "topk" | "top-k" => Method::TopK,
            "all" => Method::All,
            o => bail!("unknown method `{o}` (dcnas, random, top1, all)"),
        })
    }
    pub fn name(&self) -> &'static str {
        match self {
            Method::Dcnas => "dcnas",
            Method::Random => "random",
            Method::TopK => "top1",
            Method::All => "all",
        }
    }
    fn needs_cheap(&self) -> bool {
        !matches!(self, Method::Random)
    }
}

/// What defines a search (stored in the state; a resume must match it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchConfig {
    pub method: Method,
    pub seed: u64,
    /// Sampled sub-networks `N`.
    pub candidates: usize,
    /// Clusters `K` = stand-alone trainings (budget) for dcnas, random and top1.
    pub clusters: usize,
    pub feature: FeatureKind,
    pub space: String,
    pub standalone: StandaloneConfig,
    /// Identifies the trained supernet (cheap evaluations are only reused between searches
    /// with the same one).
    #[serde(default)]
    pub supernet_id: String,
}

/// One sampled sub-network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub key: String,
    pub arch: Arch,
    pub cheap: Option<CheapEval>,
}

/// Everything a search has done so far (`state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchState {
    pub config: SearchConfig,
    pub candidates: Vec<Candidate>,
    /// Cheap evaluations performed by this search, over all sessions (one per candidate when
    /// resume works).
    pub cheap_evaluations: usize,
    pub clustering: Option<KMeans>,
    /// Pairwise similarity of the standardised representations.
    pub similarity: Option<Vec<Vec<f64>>>,
    /// Indices of the candidates chosen for stand-alone training.
    pub chosen: Option<Vec<usize>>,
    /// Stand-alone results by candidate index (one per chosen candidate when done).
    pub standalone: Vec<(usize, StandaloneResult)>,
    /// The final architecture (candidate index).
    pub final_pick: Option<usize>,
    /// Wall seconds spent by this search, over all sessions.
    pub wall_s: f64,
}

impl SearchState {
    /// Loads `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The stand-alone result of candidate `i`.
    pub fn result(&self, i: usize) -> Option<&StandaloneResult> {
        self.standalone.iter().find(|(j, _)| *j == i).map(|(_, r)| r)
    }

    /// The cost of the method in seconds as if nothing were cached: the cheap evaluations it
    /// needs plus the recorded stand-alone training times of its chosen candidates.
    pub fn method_seconds(&self) -> f64 {
        let cheap: f64 = if self.config.method.needs_cheap() {
            self.candidates.iter().filter_map(|c| c.cheap.as_ref()).map(|c| c.seconds).sum()
        } else {
            0.0
        };
        cheap + self.standalone.iter().map(|(_, r)| r.seconds).sum::<f64>()
    }

    /// The final architecture's stand-alone result.
    pub fn final_result(&self) -> Option<&StandaloneResult> {
        self.final_pick.and_then(|i| self.result(i))
    }
}

/// The fixed inputs of a search run.
pub struct SearchContext<'a> {
    pub supernet: Option<&'a Supernet>,
    pub space: &'a SearchSpace,
    pub data: &'a NasData,
    /// Directory of cached stand-alone results.
    pub pool: PathBuf,
    /// Candidates evaluated in parallel.
    pub workers: usize,
    /// Stop (state saved) after this many evaluations of this session (tests, time slices).
    pub stop_after: Option<usize>,
    /// States of other searches with the same supernet and data whose cheap evaluations may be
    /// reused (a cheap evaluation is a function of the supernet, the architecture and the
    /// feature kind); reused ones keep their recorded seconds.
    pub cheap_sources: Vec<PathBuf>,
}

/// `n` distinct uniformly sampled architectures (a function of `seed`).
pub fn sample_candidates(space: &SearchSpace, n: usize, seed: u64) -> Vec<Arch> {
    let mut rng = derived(mix_seed(&[seed, 0xca4d]), 0);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut tries = 0;
    while out.len() < n && tries < 100 * n.max(1) {
        let a = space.sample(&mut rng);
        if seen.insert(a.key()) {
            out.push(a);
        }
        tries += 1;
    }
    out
}

/// DC-NAS's choice: cluster the standardised representations with k-means++ and keep the
/// candidate with the best cheap score in each cluster (clusters in index order).
pub fn dcnas_choice(cheap: &[&CheapEval], k: usize, seed: u64) -> Result<(KMeans, Vec<Vec<f64>>, Vec<usize>)> {
    let pts: Vec<Vec<f64>> = cheap.iter().map(|c| c.features.iter().map(|&v| v as f64).collect()).collect();
    let z = standardize(&pts);
    let km = kmeans(&z, k, mix_seed(&[seed, 0xc1]), 100)?;
    let sim = similarity_matrix(&z);
    let chosen = km
        .members()
        .iter()
        .filter(|m| !m.is_empty())
        .map(|m| best_by_cheap(cheap, m))
        .collect();
    Ok((km, sim, chosen))
}

/// The member with the highest validation accuracy (then lowest loss, then lowest index).
fn best_by_cheap(cheap: &[&CheapEval], members: &[usize]) -> usize {
    *members
        .iter()
        .max_by(|&&a, &&b| {
            cheap[a]
                .val_top1
                .total_cmp(&cheap[b].val_top1)
                .then(cheap[b].val_loss.total_cmp(&cheap[a].val_loss))
                .then(b.cmp(&a))
        })
        .expect("non-empty cluster")
}

/// Runs (or resumes) the search whose state lives in `state_path`.
pub fn run_search(config: &SearchConfig, ctx: &SearchContext, state_path: &Path) -> Result<SearchState> {
    let t0 = Instant::now();
    let mut state = if state_path.exists() {
        let s = SearchState::load(state_path)?;
        if &s.config != config {
            bail!(
                "{} belongs to a different search ({:?}); use another output directory or remove it",
                state_path.display(),
                s.config
            );
        }
        s
    } else {
        let cands = sample_candidates(ctx.space, config.candidates, config.seed);
        if cands.len() < config.candidates {
            bail!("the space has fewer than {} distinct architectures", config.candidates);
        }
        let mut fresh = SearchState {
            config: config.clone(),
            candidates: cands
                .into_iter()
                .map(|a| Candidate {
                    key: a.key(),
                    arch: a,
                    cheap: None,
                })
                .collect(),
            cheap_evaluations: 0,
            clustering: None,
            similarity: None,
            chosen: None,
            standalone: Vec::new(),
            final_pick: None,
            wall_s: 0.0,
        };
        for src in &ctx.cheap_sources {
            let Ok(other) = SearchState::load(src) else { continue };
            let o = &other.config;
            if o.space != config.space || o.feature != config.feature || o.supernet_id != config.supernet_id {
                continue;
            }
            for c in fresh.candidates.iter_mut().filter(|c| c.cheap.is_none()) {
                if let Some(o) = other.candidates.iter().find(|o| o.key == c.key && o.cheap.is_some()) {
                    c.cheap = o.cheap.clone();
                }
            }
        }
        fresh
    };
    if config.clusters == 0 || config.clusters > config.candidates {
        bail!(
            "--clusters {} must be between 1 and --candidates {}",
            config.clusters,
            config.candidates
        );
    }
    let session_start = state.wall_s;
    let save = |s: &mut SearchState| -> Result<()> {
        s.wall_s = session_start + t0.elapsed().as_secs_f64();
        write_json_atomic(state_path, s)
    };
    save(&mut state)?;
    let mut budget = ctx.stop_after;

    // 1. Cheap evaluation of every candidate (supernet accuracy and representation).
    if config.method.needs_cheap() {
        let sn = ctx.supernet.context("this method needs a trained supernet")?;
        let pending: Vec<usize> = (0..state.candidates.len())
            .filter(|&i| state.candidates[i].cheap.is_none())
            .collect();
        let archs: Vec<Arch> = state.candidates.iter().map(|c| c.arch.clone()).collect();
        let n = run_jobs(
            &pending,
            ctx.workers,
            budget,
            |i| cheap_eval(sn, &archs[i], ctx.data, config.feature),
            |i, r| {
                state.candidates[i].cheap = Some(r);
                state.cheap_evaluations += 1;
                save(&mut state)
            },
        )?;
        if let Some(b) = budget.as_mut() {
            *b -= n.min(*b);
        }
        if state.candidates.iter().any(|c| c.cheap.is_none()) {
            return Ok(state);
        }
    }

    // 2. The choice of the candidates to train.
    if state.chosen.is_none() {
        let k = config.clusters;
        let chosen = match config.method {
            Method::Dcnas => {
                let cheap: Vec<&CheapEval> = state.candidates.iter().map(|c| c.cheap.as_ref().expect("evaluated")).collect();
                let (km, sim, chosen) = dcnas_choice(&cheap, k, config.seed)?;
                state.clustering = Some(km);
                state.similarity = Some(sim);
                chosen
            }
            Method::TopK => {
                let cheap: Vec<&CheapEval> = state.candidates.iter().map(|c| c.cheap.as_ref().expect("evaluated")).collect();
                let mut idx: Vec<usize> = (0..cheap.len()).collect();
                idx.sort_by(|&a, &b| best_first(cheap[a], cheap[b]).then(a.cmp(&b)));
                idx.truncate(k);
                idx
            }
            Method::Random => {
                let mut rng = derived(mix_seed(&[config.seed, 0x7a4d]), 0);
                let mut idx: Vec<usize> = (0..state.candidates.len()).collect();
                for i in 0..k {
                    let j = rng.gen_range(i..idx.len());
                    idx.swap(i, j);
                }
                idx.truncate(k);
                idx
            }
            Method::All => {
                // Clusters are still computed for the within-cluster ranking study.
                let cheap: Vec<&CheapEval> = state.candidates.iter().map(|c| c.cheap.as_ref().expect("evaluated")).collect();
                let (km, sim, _) = dcnas_choice(&cheap, k, config.seed)?;
                state.clustering = Some(km);
                state.similarity = Some(sim);
                (0..state.candidates.len()).collect()
            }
        };
        state.chosen = Some(chosen);
        save(&mut state)?;
    }

    // 3. Stand-alone training of the chosen candidates.
    let chosen = state.chosen.clone().expect("set above");
    let pending: Vec<usize> = chosen.iter().cloned().filter(|&i| state.result(i).is_none()).collect();
    if !pending.is_empty() {
        if budget == Some(0) {
            return Ok(state);
        }
        let archs: Vec<Arch> = state.candidates.iter().map(|c| c.arch.clone()).collect();
        let n = run_jobs(
            &pending,
            ctx.workers,
            budget,
            |i| train_standalone(ctx.space, &archs[i], ctx.data, &config.standalone, &ctx.pool),
            |i, r| {
                state.standalone.push((i, r));
                state.standalone.sort_by_key(|(i, _)| *i);
                save(&mut state)
            },
        )?;
        if n < pending.len() {
            return Ok(state);
        }
    }

    // 4. The final pick: best validation accuracy among the trained candidates.
    state.final_pick = chosen.iter().cloned().max_by(|&a, &b| {
        let (ra, rb) = (state.result(a).expect("trained"), state.result(b).expect("trained"));
        ra.val_top1.total_cmp(&rb.val_top1).then(b.cmp(&a))
    });
    save(&mut state)?;
    Ok(state)
}

fn best_first(a: &CheapEval, b: &CheapEval) -> std::cmp::Ordering {
    b.val_top1.total_cmp(&a.val_top1).then(a.val_loss.total_cmp(&b.val_loss))
}
