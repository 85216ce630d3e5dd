//! nas commands: train the weight-sharing supernet, the ranking-quality study (cheap criterion
//! vs stand-alone accuracy, globally and within DC-NAS clusters), one search (DC-NAS, random
//! or global top-K on the same budget), the methods x seeds grid, and the presets.
//!
//! Every command writes `runs/<name>/summary.json` and its section of `docs/results/nas.md`.
//! Searches keep their state in `runs/<name>/state.json` (saved after every evaluation, so a
//! rerun of the same command resumes); stand-alone trainings are cached by architecture in
//! `runs/nas-pool/` and shared by every study and search with the same training config.

use crate::grid::run_name;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use nas::data::{DataSizes, NasData};
use nas::eval::FeatureKind;
use nas::presets::{self, PRESETS};
use nas::rank::{kendall_tau, within_cluster_tau};
use nas::search::{run_search, write_json_atomic, Method, SearchConfig, SearchContext, SearchState};
use nas::standalone::StandaloneConfig;
use nas::supernet::{train_supernet, Supernet, WEIGHTS_FILE};
use nn_core::experiment::mean_std;
use nn_core::report::{command_line, write_section};
use nn_core::train::{InMemorySource, OptimizerConfig, Schedule, TrainConfig};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

const RESULTS: &str = "docs/results/nas.md";
const TITLE: &str = "nas results (DC-NAS)";
const SETUP_FILE: &str = "nas.json";

#[derive(Subcommand, Debug, Clone)]
pub enum NasCommand {
    /// Train the weight-sharing supernet (uniform single-path sampling) on a class-balanced
    /// subset; writes runs/<name>/{supernet.safetensors, nas.json, summary.json}.
    Supernet(SupernetArgs),
    /// Ranking quality: N sampled architectures, cheap-evaluated and all trained stand-alone;
    /// Kendall tau globally and within the DC-NAS clusters.
    Rank(RankArgs),
    /// One search: dcnas, random or top1 (global top-K by the cheap criterion), K stand-alone trainings.
    Search(SearchArgs),
    /// Every method x seed (finished searches are resumed/skipped), then the mean +- std table.
    Grid(GridArgs),
    /// The named search spaces (`--list`), or one preset's space in detail.
    Preset(PresetArgs),
}

/// Options of `nas supernet`.
#[derive(Args, Debug, Clone)]
pub struct SupernetArgs {
    #[arg(long, default_value = "cifar10-small")]
    pub preset: String,
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Class-balanced training images (supernet and stand-alone training).
    #[arg(long, default_value_t = 5000)]
    pub train_subset: usize,
    /// Validation images, from the training split, disjoint from the training subset.
    #[arg(long, default_value_t = 1000)]
    pub val_subset: usize,
    #[arg(long, default_value_t = 2000)]
    pub test_subset: usize,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "runs/nas-supernet")]
    pub out: PathBuf,
    #[arg(long)]
    pub overwrite: bool,
}

/// Options shared by `rank`, `search` and `grid`.
#[derive(Args, Debug, Clone)]
pub struct SearchCommon {
    /// Run directory of `nas supernet`.
    #[arg(long, default_value = "runs/nas-supernet")]
    pub supernet: PathBuf,
    /// Sampled architectures N.
    #[arg(long, default_value_t = 40)]
    pub candidates: usize,
    /// Clusters K = stand-alone trainings per search.
    #[arg(long, default_value_t = 4)]
    pub clusters: usize,
    /// output-change or param-change.
    #[arg(long, default_value = "output-change")]
    pub feature: String,
    #[arg(long, default_value_t = 2)]
    pub standalone_epochs: usize,
    #[arg(long, default_value_t = 0.05)]
    pub standalone_lr: f64,
    #[arg(long, default_value_t = 32)]
    pub standalone_batch: usize,
    /// Candidates evaluated / trained in parallel (results do not depend on it).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Cache of stand-alone results.
    #[arg(long, default_value = "runs/nas-pool")]
    pub pool: PathBuf,
    #[arg(long)]
    pub data: Option<PathBuf>,
}

/// Options of `nas rank`.
#[derive(Args, Debug, Clone)]
pub struct RankArgs {
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "runs/nas-rank")]
    pub out: PathBuf,
    #[command(flatten)]
    pub common: SearchCommon,
}

/// Options of `nas search`.
#[derive(Args, Debug, Clone)]
pub struct SearchArgs {
    /// dcnas, random or top1.
    #[arg(long, default_value = "dcnas")]
    pub method: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Default: runs/nas-search-<method>-s<seed>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub common: SearchCommon,
}

/// Options of `nas grid`.
#[derive(Args, Debug, Clone)]
pub struct GridArgs {
    #[arg(long, value_delimiter = ',', default_value = "dcnas,random,top1")]
    pub methods: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// Names the runs: searches in runs/<prefix>-search-<method>-s<seed>, the table in
    /// runs/<prefix>-grid/summary.json and the `<prefix>-grid` section of docs/results/nas.md.
    #[arg(long, default_value = "nas")]
    pub prefix: String,
    #[command(flatten)]
    pub common: SearchCommon,
}

/// Options of `nas preset`.
#[derive(Args, Debug, Clone)]
pub struct PresetArgs {
    /// A preset name.
    pub name: Option<String>,
    /// List the presets.
    #[arg(long)]
    pub list: bool,
}

/// What `nas supernet` used, read back by the searches.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Setup {
    preset: String,
    dataset: String,
    num_classes: usize,
    train_subset: usize,
    val_subset: usize,
    test_subset: usize,
    data_seed: u64,
    supernet_seed: u64,
    supernet_epochs: usize,
    supernet_wall_s: f64,
    command: String,
}

fn sizes(train: usize, val: usize, test: usize) -> DataSizes {
    DataSizes {
        train,
        val,
        test,
        probe: 16,
        calib: 256,
    }
}

pub fn run(cmd: NasCommand) -> Result<()> {
    match cmd {
        NasCommand::Supernet(a) => supernet(a),
        NasCommand::Rank(a) => rank(a),
        NasCommand::Search(a) => search(a).map(|_| ()),
        NasCommand::Grid(a) => grid(a),
        NasCommand::Preset(a) => preset(a),
    }
}

fn preset(a: PresetArgs) -> Result<()> {
    if a.list || a.name.is_none() {
        println!("nas presets (cargo xtask nas supernet --preset NAME):");
        for p in PRESETS {
            println!("  {:<15} {:<9} {}", p.name, p.dataset, p.description);
        }
        return Ok(());
    }
    let name = a.name.expect("checked");
    let p = presets::preset(&name)?;
    let space = presets::space(p.name, if p.dataset == "imagenet" { 1000 } else { 10 })?;
    println!("{} ({}): {}", p.name, p.dataset, p.description);
    println!(
        "input {}x{}x{}, {} slots, {} ops, widths {:?}, {:.3e} architectures",
        space.in_channels,
        space.image_size,
        space.image_size,
        space.slots.len(),
        space.ops.len(),
        space.widths,
        space.size()
    );
    for (i, s) in space.slots.iter().enumerate() {
        println!(
            "  slot {i:>2}: {:>4} channels, stride {}, skip {}",
            s.channels, s.stride, s.skippable
        );
    }
    println!("  ops: {}", space.ops.iter().map(|o| o.name()).collect::<Vec<_>>().join(", "));
    Ok(())
}

fn load_data(setup: &Setup, data: Option<PathBuf>) -> Result<NasData> {
    NasData::load(
        &setup.dataset,
        data,
        &sizes(setup.train_subset, setup.val_subset, setup.test_subset),
        setup.data_seed,
        &candle_core::Device::Cpu,
    )
}

fn supernet(a: SupernetArgs) -> Result<()> {
    let t0 = Instant::now();
    let p = presets::preset(&a.preset)?;
    if a.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    let mut setup = Setup {
        preset: p.name.into(),
        dataset: p.dataset.into(),
        num_classes: 0,
        train_subset: a.train_subset,
        val_subset: a.val_subset,
        test_subset: a.test_subset,
        data_seed: a.seed,
        supernet_seed: a.seed,
        supernet_epochs: a.epochs,
        supernet_wall_s: 0.0,
        command: command_line(),
    };
    let data = load_data(&setup, a.data.clone())?;
    setup.num_classes = data.num_classes;
    let space = presets::space(p.name, data.num_classes)?;
    let sn = Supernet::new(&space, a.seed, &candle_core::Device::Cpu)?;
    std::fs::create_dir_all(&a.out)?;
    let mut cfg = TrainConfig::new(&format!("nas-supernet-{}", p.name), p.dataset, a.epochs, &a.out);
    cfg.batch_size = a.batch_size;
    cfg.optimizer = OptimizerConfig::sgd_nesterov(a.lr, 5e-4);
    cfg.schedule = Schedule::Cosine { min_lr: 0.0 };
    cfg.seed = a.seed;
    cfg.eval_every = 0;
    cfg.command = setup.command.clone();
    cfg.resume = !a.overwrite;
    cfg.overwrite = a.overwrite;
    let train = InMemorySource::new(data.train.images.clone(), data.train.labels.clone(), a.batch_size, true, a.seed)?.drop_last(true);
    let s = train_supernet(&sn, cfg, &train)?;
    setup.supernet_wall_s = s.wall_s;
    write_json_atomic(&a.out.join(SETUP_FILE), &setup)?;
    let body = format!(
        "## Supernet ({}, `{}`)\n\n| preset | dataset | train / val / test images | epochs | seed | params (all ops) | last train loss | wall s |\n|---|---|---|---|---|---|---|---|\n| {} | {} | {} / {} / {} | {} | {} | {} | {:.3} | {:.0} |\n\nUniform single-path sampling (one random sub-network per step), SGD Nesterov lr {} cosine, batch {}, weight decay 5e-4. Class-balanced subsets of the CIFAR-10 training split (validation disjoint from training).\n\n```\n{}\n```\n",
        p.name,
        a.out.display(),
        p.name,
        p.dataset,
        data.train.len(),
        data.val.len(),
        data.test.len(),
        s.epochs_completed,
        a.seed,
        sn.vs.num_params(),
        s.train_loss.unwrap_or(f64::NAN),
        s.wall_s,
        a.lr,
        a.batch_size,
        setup.command
    );
    write_section(RESULTS, TITLE, &run_name(&a.out), &body)?;
    eprintln!(
        "supernet trained in {:.0} s (this session {:.0} s)",
        s.wall_s,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

struct Loaded {
    setup: Setup,
    space: nas::SearchSpace,
    data: NasData,
    sn: Supernet,
}

fn load_supernet(c: &SearchCommon) -> Result<Loaded> {
    let text = std::fs::read_to_string(c.supernet.join(SETUP_FILE)).with_context(|| {
        format!(
            "{} has no finished supernet; run `cargo xtask nas supernet` first",
            c.supernet.display()
        )
    })?;
    let setup: Setup = serde_json::from_str(&text)?;
    let data = load_data(&setup, c.data.clone())?;
    let space = presets::space(&setup.preset, setup.num_classes)?;
    let sn = Supernet::load(
        &space,
        setup.supernet_seed,
        &candle_core::Device::Cpu,
        &c.supernet.join(WEIGHTS_FILE),
    )?;
    Ok(Loaded { setup, space, data, sn })
}

fn config(method: Method, seed: u64, c: &SearchCommon, l: &Loaded) -> Result<SearchConfig> {
    let space = &l.space;
    Ok(SearchConfig {
        method,
        seed,
        candidates: c.candidates,
        clusters: c.clusters,
        feature: FeatureKind::parse(&c.feature)?,
        space: space.name.clone(),
        standalone: StandaloneConfig {
            epochs: c.standalone_epochs,
            lr: c.standalone_lr,
            batch_size: c.standalone_batch,
            ..StandaloneConfig::default()
        },
        supernet_id: format!("{}:{:.3}", c.supernet.display(), l.setup.supernet_wall_s),
    })
}

fn run_one(l: &Loaded, cfg: &SearchConfig, c: &SearchCommon, out: &Path) -> Result<SearchState> {
    std::fs::create_dir_all(out)?;
    let ctx = SearchContext {
        supernet: Some(&l.sn),
        space: &l.space,
        data: &l.data,
        pool: c.pool.clone(),
        workers: c.workers,
        stop_after: None,
        cheap_sources: cheap_sources(),
    };
    run_search(cfg, &ctx, &out.join("state.json"))
}

/// Search states whose cheap evaluations may be reused: every `runs/*/state.json` (the search
/// reads one only when its space, feature and supernet id match; other files are skipped).
fn cheap_sources() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("runs")
        .map(|rd| rd.flatten().map(|e| e.path().join("state.json")).filter(|p| p.exists()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.3}"))
}

fn rank(a: RankArgs) -> Result<()> {
    let l = load_supernet(&a.common)?;
    let cfg = config(Method::All, a.seed, &a.common, &l)?;
    let st = run_one(&l, &cfg, &a.common, &a.out)?;
    let idx: Vec<usize> = (0..st.candidates.len()).filter(|&i| st.result(i).is_some()).collect();
    let cheap: Vec<f64> = idx
        .iter()
        .map(|&i| st.candidates[i].cheap.as_ref().expect("evaluated").val_top1 as f64)
        .collect();
    let val: Vec<f64> = idx.iter().map(|&i| st.result(i).expect("trained").val_top1 as f64).collect();
    let test: Vec<f64> = idx.iter().map(|&i| st.result(i).expect("trained").test_top1 as f64).collect();
    let km = st.clustering.as_ref().context("clustering missing")?;
    let assign: Vec<usize> = idx.iter().map(|&i| km.assignments[i]).collect();
    let k = km.centroids.len();
    let g_val = kendall_tau(&cheap, &val);
    let g_test = kendall_tau(&cheap, &test);
    let w_val = within_cluster_tau(&cheap, &val, &assign, k);
    let w_test = within_cluster_tau(&cheap, &test, &assign, k);
    // Same cluster sizes, random groups: how much of the within-cluster value is just smaller groups.
    let mut rng = nn_core::rng::derived(a.seed, 99);
    let (mut rand_pooled, mut rand_mean) = (Vec::new(), Vec::new());
    for _ in 0..200 {
        let mut perm = assign.clone();
        for i in (1..perm.len()).rev() {
            let j = rand::Rng::gen_range(&mut rng, 0..=i);
            perm.swap(i, j);
        }
        let w = within_cluster_tau(&cheap, &val, &perm, k);
        rand_pooled.extend(w.pooled);
        rand_mean.extend(w.mean);
    }
    let (rp, rps) = mean_std(&rand_pooled);
    let (rm, rms) = mean_std(&rand_mean);
    let sizes: Vec<usize> = km.members().iter().map(|m| m.len()).collect();
    let standalone_s: f64 = st.standalone.iter().map(|(_, r)| r.seconds).sum();
    let cheap_s: f64 = st.candidates.iter().filter_map(|c| c.cheap.as_ref()).map(|c| c.seconds).sum();
    let summary = json!({
        "command": command_line(),
        "archs": idx.len(),
        "clusters": k,
        "cluster_sizes": sizes,
        "feature": a.common.feature,
        "seed": a.seed,
        "kendall_tau_global_val": g_val,
        "kendall_tau_global_test": g_test,
        "kendall_tau_within_val": w_val,
        "kendall_tau_within_test": w_test,
        "random_groups_pooled_val": [rp, rps],
        "random_groups_mean_val": [rm, rms],
        "cheap_eval_s": cheap_s,
        "standalone_s": standalone_s,
        "state_wall_s": st.wall_s,
        "supernet_epochs": l.setup.supernet_epochs,
        "standalone_epochs": a.common.standalone_epochs,
        "subsets": [l.setup.train_subset, l.setup.val_subset, l.setup.test_subset],
    });
    write_json_atomic(&a.out.join("summary.json"), &summary)?;
    let per = |w: &nas::rank::ClusterTau| w.per_cluster.iter().map(|t| fmt(*t)).collect::<Vec<_>>().join(", ");
    let body = format!(
        "## Ranking quality: cheap criterion vs stand-alone accuracy (`{}`)\n\n\
{} sampled architectures of `{}`, each evaluated with supernet weights (validation top-1 after BatchNorm recalibration on {} training images) and trained stand-alone ({} epochs, SGD Nesterov lr {} cosine, batch {}, seed 0) on the {}-image training subset. \
Clusters: k-means++ (K = {}, seed {}) on the standardised `{}` representations; cluster sizes {:?}.\n\n\
| Kendall tau of supernet val top-1 vs | stand-alone val top-1 | stand-alone test top-1 |\n|---|---|---|\n\
| all pairs (global) | {} | {} |\n\
| within clusters, mean over clusters | {} | {} |\n\
| within clusters, pooled pairs ({} pairs) | {} | {} |\n\
| random groups of the same sizes, pooled (mean +- std of 200) | {:.3} +- {:.3} | |\n\
| random groups of the same sizes, mean over groups | {:.3} +- {:.3} | |\n\n\
Per-cluster tau (val): {}.\n\n\
Cheap evaluation {:.0} s in all, stand-alone training {:.0} s in all (recorded per architecture; cached in `{}`). Supernet: {} epochs.\n\n```\n{}\n```\n",
        a.out.display(),
        idx.len(),
        l.space.name,
        l.data.calib.dims()[0],
        a.common.standalone_epochs,
        a.common.standalone_lr,
        a.common.standalone_batch,
        l.data.train.len(),
        k,
        a.seed,
        a.common.feature,
        sizes,
        fmt(g_val),
        fmt(g_test),
        fmt(w_val.mean),
        fmt(w_test.mean),
        w_val.pairs,
        fmt(w_val.pooled),
        fmt(w_test.pooled),
        rp,
        rps,
        rm,
        rms,
        per(&w_val),
        cheap_s,
        standalone_s,
        a.common.pool.display(),
        l.setup.supernet_epochs,
        command_line()
    );
    write_section(RESULTS, TITLE, &run_name(&a.out), &body)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
struct SearchRow {
    method: String,
    seed: u64,
    key: String,
    val_top1: f64,
    test_top1: f64,
    params: usize,
    macs: u64,
    /// Cheap evaluations + stand-alone trainings the method needs, as recorded (no cache).
    search_s: f64,
    trained: usize,
}

fn search_with(l: &Loaded, method: &str, seed: u64, c: &SearchCommon, out: &Path) -> Result<SearchRow> {
    let m = Method::parse(method)?;
    if m == Method::All {
        bail!("`all` is the ranking study: use `cargo xtask nas rank`");
    }
    let cfg = config(m, seed, c, l)?;
    let st = run_one(l, &cfg, c, out)?;
    let r = st.final_result().context("search did not finish")?;
    let row = SearchRow {
        method: m.name().into(),
        seed,
        key: r.key.clone(),
        val_top1: r.val_top1 as f64,
        test_top1: r.test_top1 as f64,
        params: r.params,
        macs: r.macs,
        search_s: st.method_seconds(),
        trained: st.standalone.len(),
    };
    let summary = json!({
        "command": command_line(),
        "method": row.method,
        "seed": seed,
        "candidates": c.candidates,
        "clusters": c.clusters,
        "feature": c.feature,
        "final": r,
        "search_s": row.search_s,
        "state_wall_s": st.wall_s,
        "supernet_s": l.setup.supernet_wall_s,
        "standalone_epochs": c.standalone_epochs,
        "subsets": [l.setup.train_subset, l.setup.val_subset, l.setup.test_subset],
    });
    write_json_atomic(&out.join("summary.json"), &summary)?;
    Ok(row)
}

fn search(a: SearchArgs) -> Result<SearchRow> {
    let l = load_supernet(&a.common)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/nas-search-{}-s{}", a.method, a.seed)));
    let row = search_with(&l, &a.method, a.seed, &a.common, &out)?;
    println!("{}", serde_json::to_string_pretty(&row)?);
    Ok(row)
}

fn grid(a: GridArgs) -> Result<()> {
    let t0 = Instant::now();
    if a.prefix.is_empty() || a.prefix.contains(['/', '\\']) {
        bail!("--prefix {:?} must be a plain, non-empty run-name prefix", a.prefix);
    }
    let l = load_supernet(&a.common)?;
    let mut rows = Vec::new();
    for (done, &seed) in a.seeds.iter().enumerate() {
        for method in &a.methods {
            let out = PathBuf::from(format!("runs/{}-search-{method}-s{seed}", a.prefix));
            let row = search_with(&l, method, seed, &a.common, &out)?;
            eprintln!("{method} seed {seed}: test top-1 {:.2}% ({})", row.test_top1, row.key);
            rows.push(row);
        }
        // The table so far (every finished seed), so an interrupted grid still reports.
        let body = grid_table(&a, &l, &rows, t0.elapsed().as_secs_f64(), done + 1 == a.seeds.len())?;
        if done + 1 == a.seeds.len() {
            println!("{body}");
        }
    }
    Ok(())
}

fn grid_table(a: &GridArgs, l: &Loaded, rows: &[SearchRow], wall_s: f64, finished: bool) -> Result<String> {
    let mut body = format!(
        "## Search: DC-NAS vs random vs global top-K, equal budget (`{}`)\n\n\
Per seed: N = {} architectures sampled from `{}` (seeded); every method trains K = {} of them stand-alone ({} epochs, SGD Nesterov lr {} cosine, batch {}, seed 0, {}-image training subset) and returns the one with the best stand-alone validation top-1 (validation: {} images from the training split). \
DC-NAS: k-means++ clusters of the `{}` representations, best supernet score per cluster. Top-1: the K best supernet scores globally. Random: K uniformly chosen. \
The supernet ({} epochs, {:.0} s, trained once with seed {}) is shared by all seeds. \
Search seconds = cheap evaluations the method needs + the recorded stand-alone trainings of its K candidates (stand-alone results are cached by architecture in `{}` and shared between methods and the ranking study, which is exact because a training is a function of the architecture). Accuracy on a class-balanced {}-image CIFAR-10 test subset.\n\n\
| method | test top-1 % (mean +- std) | val top-1 % | params | MACs | search s (excl. supernet) |\n|---|---|---|---|---|---|\n",
        format!("{}-grid", a.prefix),
        a.common.candidates,
        l.space.name,
        a.common.clusters,
        a.common.standalone_epochs,
        a.common.standalone_lr,
        a.common.standalone_batch,
        l.data.train.len(),
        l.data.val.len(),
        a.common.feature,
        l.setup.supernet_epochs,
        l.setup.supernet_wall_s,
        l.setup.supernet_seed,
        a.common.pool.display(),
        l.data.test.len(),
    );
    for method in &a.methods {
        let rs: Vec<&SearchRow> = rows
            .iter()
            .filter(|r| &r.method == method || Method::parse(method).map(|m| m.name() == r.method).unwrap_or(false))
            .collect();
        let col = |f: &dyn Fn(&SearchRow) -> f64| mean_std(&rs.iter().map(|r| f(r)).collect::<Vec<f64>>());
        let (t, ts) = col(&|r| r.test_top1);
        let (v, vs) = col(&|r| r.val_top1);
        let (p, _) = col(&|r| r.params as f64);
        let (m, _) = col(&|r| r.macs as f64);
        let (s, ss) = col(&|r| r.search_s);
        body += &format!("| {method} | {t:.2} +- {ts:.2} | {v:.2} +- {vs:.2} | {p:.0} | {m:.0} | {s:.0} +- {ss:.0} |\n");
    }
    body += "\nPer seed:\n\n| method | seed | test top-1 % | val top-1 % | params | MACs | search s | architecture |\n|---|---|---|---|---|---|---|---|\n";
    for r in rows {
        body += &format!(
            "| {} | {} | {:.2} | {:.2} | {} | {} | {:.0} | `{}` |\n",
            r.method,
            r.seed,
            r.test_top1,
            r.val_top1,
            r.params,
            r.macs,
            r.search_s,
            r.key.replace('|', "\\|")
        );
    }
    if !finished {
        body += "\n**Partial: not every seed has finished yet.**\n";
    }
    body += &format!(
        "\nWall time of this grid invocation {:.0} s (finished searches are read back from their states; each search's own wall time is `state_wall_s` in `runs/{}-search-<method>-s<seed>/summary.json`).\n\n```\n{}\n```\n",
        wall_s,
        a.prefix,
        command_line()
    );
    let name = format!("{}-grid", a.prefix);
    std::fs::create_dir_all(Path::new("runs").join(&name))?;
    write_json_atomic(
        &Path::new("runs").join(&name).join("summary.json"),
        &json!({"command": command_line(), "rows": rows, "wall_s": wall_s, "finished": finished}),
    )?;
    write_section(RESULTS, TITLE, &name, &body)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct W {
        #[command(subcommand)]
        c: NasCommand,
    }

    fn parse(a: &[&str]) -> std::result::Result<NasCommand, clap::Error> {
        W::try_parse_from(std::iter::once("nas").chain(a.iter().copied())).map(|w| w.c)
    }

    #[test]
    fn flags_parse() {
        assert!(matches!(
            parse(&["preset", "--list"]).unwrap(),
            NasCommand::Preset(PresetArgs { list: true, .. })
        ));
        let NasCommand::Search(s) = parse(&["search", "--method", "top1", "--seed", "2", "--candidates", "30"]).unwrap() else {
            panic!()
        };
        assert_eq!(
            (s.method.as_str(), s.seed, s.common.candidates, s.common.clusters),
            ("top1", 2, 30, 4)
        );
        assert!(parse(&["search", "--seed", "x"]).is_err());
        let NasCommand::Grid(g) = parse(&["grid", "--seeds", "0,1"]).unwrap() else {
            panic!()
        };
        assert_eq!((g.seeds.as_slice(), g.prefix.as_str()), ([0, 1].as_slice(), "nas"));
        let NasCommand::Grid(g) = parse(&["grid", "--prefix", "nas-10k"]).unwrap() else {
            panic!()
        };
        assert_eq!(g.prefix, "nas-10k");
        assert_eq!(run_name(Path::new("runs/nas-rank-10k")), "nas-rank-10k");
        assert!(Method::parse("dcnas").is_ok() && Method::parse("evolution").is_err());
        assert!(presets::preset("cifar10-small").is_ok());
    }
}
