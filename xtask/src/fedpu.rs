//! fed-pu commands: one federated run, the FedPU grid (methods x seeds, mean +- std table in
//! `docs/results/fed-pu.md`), the scale benchmark (100 / 1,000 clients), and the demo row.
//! Every run writes `runs/<name>/summary.json` and keeps its checkpoint, so `--resume`
//! continues an interrupted run and the grid skips finished ones.

use crate::cli::DataArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fed_pu::engine::{FedConfig, ModelBuilder, Simulation};
use fed_pu::loss::{FedPuConfig, NnPu, Objective};
use fed_pu::partition::{cyclic_positive_classes, dirichlet, fedpu_clients, iid, OFFICIAL_CLASSES_PER_CLIENT};
use fed_pu::{FedDataset, Strategy};
use nn_core::data::{self, transforms, LoadOptions, Split};
use nn_core::models::{create_model, ModelConfig};
use nn_core::VarStore;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

const RESULTS: &str = "docs/results/fed-pu.md";
const TITLE: &str = "fed-pu results";

#[derive(Subcommand, Debug, Clone)]
pub enum FedPuCommand {
    /// One federated run (FedPU or a baseline), writing runs/<name>/summary.json.
    Run(RunArgs),
    /// Methods x seeds on one setting (finished runs are skipped), then the mean +- std table
    /// in docs/results/fed-pu.md.
    Grid(GridArgs),
    /// Scale benchmark: 100 and 1,000 clients, 10% sampled per round; round time split into
    /// local compute and engine overhead, and peak memory (each scale in a fresh process).
    Bench(BenchArgs),
    /// One scale of the benchmark (used by `bench`; prints one JSON line).
    #[command(hide = true)]
    BenchOne(BenchOneArgs),
    /// The fed-pu part of `cargo xtask demo` alone (small FedPU run, section in docs/results/fed-pu.md).
    Demo,
}

/// Options shared by runs.
#[derive(Args, Debug, Clone)]
pub struct Common {
    #[arg(long, default_value = "mnist")]
    pub dataset: String,
    #[arg(long, default_value = "lenet5")]
    pub model: String,
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Clients sampled per round (default: all).
    #[arg(long)]
    pub clients_per_round: Option<usize>,
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    #[arg(long, default_value_t = 1)]
    pub local_epochs: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0.01)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// fedavg or fedprox.
    #[arg(long, default_value = "fedavg")]
    pub strategy: String,
    /// FedProx proximal weight.
    #[arg(long, default_value_t = 0.01)]
    pub mu: f64,
    /// iid or dirichlet (the partition of samples over clients, before FedPU's labeling).
    #[arg(long, default_value = "iid")]
    pub partition: String,
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Fraction of each positive class's samples a client labels.
    #[arg(long, default_value_t = 0.33)]
    pub labeled: f64,
    /// FedPU PU-term weight (official code: puW).
    #[arg(long, default_value_t = 1.0)]
    pub pu_weight: f64,
    /// Clients trained in parallel.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Evaluate every this many rounds (0: after the last round only).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub overwrite: bool,
}

/// Options of `fedpu run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// fedpu, fedpu-nnpu, positives-only, supervised, or local-nnpu (the per-client nnPU
    /// baseline: every client trains alone on its own PU data, no aggregation; the reported
    /// accuracy is the mean over the clients' models).
    #[arg(long, default_value = "fedpu")]
    pub method: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

/// Options of `fedpu grid`.
#[derive(Args, Debug, Clone)]
pub struct GridArgs {
    #[arg(long, value_delimiter = ',', default_value = "fedpu,positives-only,supervised")]
    pub methods: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// Run directories are runs/<prefix>-<method>-s<seed>; also the results section key.
    #[arg(long, default_value = "fedpu-mnist")]
    pub prefix: String,
    #[command(flatten)]
    pub common: Common,
}

/// Options of `fedpu bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub scales: Vec<usize>,
    /// Fraction of clients sampled per round.
    #[arg(long, default_value_t = 0.1)]
    pub fraction: f64,
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value = "lenet5")]
    pub model: String,
    /// Clients trained in parallel. With 1, round time = local compute + engine overhead exactly.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    #[arg(long)]
    pub data: Option<PathBuf>,
}

/// Options of `fedpu bench-one`.
#[derive(Args, Debug, Clone)]
pub struct BenchOneArgs {
    #[arg(long)]
    pub clients: usize,
    #[arg(long)]
    pub fraction: f64,
    #[arg(long)]
    pub rounds: usize,
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub workers: usize,
    #[arg(long)]
    pub data: Option<PathBuf>,
}

pub fn run(cmd: FedPuCommand) -> Result<()> {
    match cmd {
        FedPuCommand::Run(a) => {
            let out = a
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("runs/fedpu-{}-{}-s{}", a.common.dataset, a.method, a.seed)));
            let s = run_one(&a.common, &a.method, a.seed, &out)?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }
        FedPuCommand::Grid(a) => grid(a),
        FedPuCommand::Bench(a) => bench(a),
        FedPuCommand::BenchOne(a) => bench_one(a),
        FedPuCommand::Demo => demo(),
    }
}

fn objective(method: &str, c: &Common) -> Result<Objective> {
    Ok(match method {
        "fedpu" => Objective::FedPu(FedPuConfig {
            weight: c.pu_weight,
            ..FedPuConfig::default()
        }),
        "fedpu-nnpu" | "local-nnpu" => Objective::FedPu(FedPuConfig {
            weight: c.pu_weight,
            nnpu: Some(NnPu::default()),
            ..FedPuConfig::default()
        }),
        "positives-only" => Objective::PositivesOnly,
        "supervised" => Objective::Supervised,
        m => bail!("unknown method `{m}` (fedpu, fedpu-nnpu, local-nnpu, positives-only, supervised)"),
    })
}

fn norm(dataset: &str) -> Result<(Vec<f32>, Vec<f32>)> {
    Ok(match dataset {
        "mnist" => (transforms::MNIST_MEAN.to_vec(), transforms::MNIST_STD.to_vec()),
        "fashion-mnist" => (transforms::FASHION_MNIST_MEAN.to_vec(), transforms::FASHION_MNIST_STD.to_vec()),
        "cifar10" => (transforms::CIFAR10_MEAN.to_vec(), transforms::CIFAR10_STD.to_vec()),
        d => bail!("fedpu runs support mnist, fashion-mnist and cifar10, not `{d}`"),
    })
}

/// Loads a split (optionally a class-balanced subset) as a shared [`FedDataset`].
fn load(dataset: &str, split: Split, subset: Option<usize>, seed: u64, dir: &Option<PathBuf>) -> Result<FedDataset> {
    let ds =
        data::load_in_memory(dataset, split, &LoadOptions::with_data_dir(dir.clone())).with_context(|| format!("loading {dataset}"))?;
    let ds = match subset {
        Some(n) if n < ds.len() => {
            let idx = data::sampling::balanced_subset(&ds.labels, ds.num_classes, n, seed)?;
            ds.subset(&idx)?
        }
        _ => ds,
    };
    let (m, s) = norm(dataset)?;
    FedDataset::from_image_dataset(&ds, &m, &s)
}

fn builder(model: &str, d: &FedDataset) -> ModelBuilder {
    let cfg = ModelConfig::new(d.shape.0, d.num_classes, d.shape.1);
    let model = model.to_string();
    Arc::new(move |vp| create_model(&model, &cfg, vp, &nn_core::StandardFactory))
}

fn params_and_macs(b: &ModelBuilder, d: &FedDataset) -> Result<(usize, u64)> {
    let vs = VarStore::new(0, &nn_core::candle_core::Device::Cpu);
    let m = b(&vs.root())?;
    let x = d.batch(&[0], &nn_core::candle_core::Device::Cpu)?;
    let (_, s) = nn_core::summary::profile(|| m.forward_t(&x, false))?;
    Ok((vs.num_params(), s.total_macs()))
}

fn strategy(c: &Common) -> Result<Strategy> {
    Ok(match c.strategy.as_str() {
        "fedavg" => Strategy::FedAvg,
        "fedprox" => Strategy::FedProx { mu: c.mu },
        s => bail!("unknown strategy `{s}` (fedavg, fedprox)"),
    })
}

/// One run; returns its summary (also written to `out/summary.json`).
fn run_one(c: &Common, method: &str, seed: u64, out: &PathBuf) -> Result<serde_json::Value> {
    let t0 = Instant::now();
    let train = Arc::new(load(&c.dataset, Split::Train, c.data.train_subset, seed, &c.data.data)?);
    let test = Arc::new(load(
        &c.dataset,
        Split::Test,
        c.data.test_subset,
        seed.wrapping_add(1),
        &c.data.data,
    )?);
    let k = train.num_classes;
    let parts = match c.partition.as_str() {
        "iid" => iid(train.len(), c.clients, seed)?,
        "dirichlet" => dirichlet(&train.labels, k, c.clients, c.alpha, seed)?,
        p => bail!("unknown partition `{p}` (iid, dirichlet)"),
    };
    let positive = cyclic_positive_classes(c.clients, k, &OFFICIAL_CLASSES_PER_CLIENT)?;
    let clients = fedpu_clients(&train.labels, k, parts, &positive, c.labeled, seed)?;
    let labeled: usize = clients.iter().map(|c| c.num_labeled()).sum();
    let b = builder(&c.model, &train);
    let (params, macs) = params_and_macs(&b, &train)?;
    let cfg = FedConfig {
        rounds: c.rounds,
        clients_per_round: c.clients_per_round.unwrap_or(c.clients),
        local_epochs: c.local_epochs,
        batch_size: c.batch_size,
        lr: c.lr,
        momentum: c.momentum,
        weight_decay: c.weight_decay,
        strategy: strategy(c)?,
        objective: objective(method, c)?,
        seed,
        workers: c.workers,
        eval_every: c.eval_every,
    };
    std::fs::create_dir_all(out)?;
    let ckpt = out.join("checkpoint.safetensors");
    if c.overwrite {
        let _ = std::fs::remove_file(&ckpt);
    } else if !c.resume {
        for f in [ckpt.clone(), out.join("client-0/checkpoint.safetensors")] {
            if f.exists() {
                bail!("{} exists: pass --resume to continue it or --overwrite to start again", f.display());
            }
        }
    }
    eprintln!(
        "fedpu [{method}] {} on {} ({} train, {} labeled, {} test), {} clients, {} rounds, seed {seed}",
        c.model,
        c.dataset,
        train.len(),
        labeled,
        test.len(),
        c.clients,
        c.rounds
    );
    let (test_top1, history, client_top1) = if method == "local-nnpu" {
        // per-client nnPU: each client is its own one-client "federation" (no aggregation),
        // trained for the same rounds x local epochs; clients run `workers` at a time
        let pool = rayon::ThreadPoolBuilder::new().num_threads(c.workers.max(1)).build()?;
        let results: Vec<Result<(f64, Vec<fed_pu::engine::RoundMetrics>)>> = pool.install(|| {
            use rayon::prelude::*;
            clients
                .into_par_iter()
                .map(|client| {
                    let id = client.id;
                    let dir = out.join(format!("client-{id}"));
                    std::fs::create_dir_all(&dir)?;
                    let ckpt = dir.join("checkpoint.safetensors");
                    if c.overwrite {
                        let _ = std::fs::remove_file(&ckpt);
                    }
                    let local = FedConfig {
                        clients_per_round: 1,
                        workers: 1,
                        eval_every: 0,
                        ..cfg.clone()
                    };
                    let mut sim = Simulation::new(local, train.clone(), None, vec![client], b.clone())?.with_checkpoint(&ckpt);
                    sim.resume()?;
                    sim.run(|_| ())?;
                    let top1 = sim.evaluate(&test)?.0;
                    eprintln!("  client {id} alone (nnPU): test top-1 {top1:.2}%");
                    Ok((top1, sim.state().history.clone()))
                })
                .collect()
        });
        let mut accs = Vec::new();
        let mut hist = Vec::new();
        for r in results {
            let (a, h) = r?;
            accs.push(a);
            hist.extend(h);
        }
        (accs.iter().sum::<f64>() / accs.len() as f64, hist, Some(accs))
    } else {
        let mut sim = Simulation::new(cfg.clone(), train.clone(), Some(test.clone()), clients, b)?.with_checkpoint(&ckpt);
        if sim.resume()? {
            eprintln!("resumed at round {}", sim.state().round);
        }
        sim.run(|m| {
            eprintln!(
                "  round {:>3}: loss {:.4}, {} examples, {:.1}s (local compute {:.1}s){}",
                m.round + 1,
                m.train_loss,
                m.examples,
                m.wall_s,
                m.local_compute_s,
                m.test_top1.map(|t| format!(", test top-1 {t:.2}%")).unwrap_or_default()
            )
        })?;
        let st = sim.state();
        let test_top1 = match st.history.last().and_then(|m| m.test_top1) {
            Some(t) => t,
            None => sim.evaluate(&test)?.0,
        };
        (test_top1, st.history.clone(), None)
    };
    let examples: u64 = history.iter().map(|m| m.examples).sum();
    let train_s: f64 = history.iter().map(|m| m.wall_s).sum();
    let summary = json!({
        "method": method,
        "model": c.model,
        "dataset": c.dataset,
        "rounds": c.rounds,
        "epochs": c.local_epochs,
        "local_epochs": c.local_epochs,
        "seed": seed,
        "test_top1": test_top1,
        "params": params,
        "macs": macs,
        "train_images_per_s": if train_s > 0.0 { examples as f64 / train_s } else { 0.0 },
        "wall_s": t0.elapsed().as_secs_f64(),
        "train_wall_s": train_s,
        "command": nn_core::report::command_line(),
        "clients": c.clients,
        "clients_per_round": cfg.clients_per_round,
        "labeled_fraction": c.labeled,
        "train_images": train.len(),
        "labeled_images": labeled,
        "test_images": test.len(),
        "config": cfg,
        "client_test_top1": client_top1,
        "history": history,
    });
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    eprintln!(
        "[{method}] seed {seed}: test top-1 {test_top1:.2}%  ({:.0}s)",
        t0.elapsed().as_secs_f64()
    );
    Ok(summary)
}

use nn_core::experiment::mean_std;

fn grid(a: GridArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut rows = Vec::new();
    let mut summaries = Vec::new();
    for method in &a.methods {
        let mut accs = Vec::new();
        let mut walls = Vec::new();
        for &seed in &a.seeds {
            let out = PathBuf::from(format!("runs/{}-{method}-s{seed}", a.prefix));
            let done = out.join("summary.json");
            let s: serde_json::Value = if done.exists() && !a.common.overwrite {
                eprintln!("{} exists, reusing it", done.display());
                serde_json::from_str(&std::fs::read_to_string(&done)?)?
            } else {
                let mut c = a.common.clone();
                c.resume = true;
                run_one(&c, method, seed, &out)?
            };
            accs.push(s["test_top1"].as_f64().unwrap_or(f64::NAN));
            walls.push(s["wall_s"].as_f64().unwrap_or(0.0));
            summaries.push(s);
        }
        let m = mean_std(&accs).0;
        rows.push((method.clone(), m, accs, walls.iter().sum::<f64>()));
    }
    let c = &a.common;
    let s0 = &summaries[0];
    let labeled: Vec<String> = summaries
        .iter()
        .take(a.seeds.len())
        .map(|s| s["labeled_images"].to_string())
        .collect();
    let mut body = format!(
        "## {}\n\n{} {} on {}: {} clients ({} per round), IID split of {} training images (class-balanced subset), positive classes per client {:?} \
         (assigned cyclically as in the official code), {:.0}% of each positive class labeled per client ({} labeled images in all for seeds {:?}), \
         {} rounds x {} local epoch(s), SGD lr {} momentum {}, batch {}, {}; test top-1 on {} test images after the last round. \
         Mean +- sample std over the seeds.\n\n\
         | method | test top-1 % (mean +- std) | per seed | wall s (sum over seeds) |\n|---|---|---|---|\n",
        a.prefix,
        c.model,
        c.strategy,
        c.dataset,
        c.clients,
        c.clients_per_round.unwrap_or(c.clients),
        s0["train_images"],
        &OFFICIAL_CLASSES_PER_CLIENT,
        c.labeled * 100.0,
        labeled.join("/"),
        a.seeds,
        c.rounds,
        c.local_epochs,
        c.lr,
        c.momentum,
        c.batch_size,
        if c.strategy == "fedprox" { format!("mu {}", c.mu) } else { "no proximal term".into() },
        s0["test_images"],
    );
    for (m, _, accs, wall) in &rows {
        let per: Vec<String> = accs.iter().map(|x| format!("{x:.2}")).collect();
        let cell = nn_core::experiment::mean_std_cell(accs);
        body.push_str(&format!("| {m} | {cell} | {} | {wall:.0} |\n", per.join(", ")));
    }
    if a.methods.iter().any(|m| m == "local-nnpu") {
        body.push_str(&format!(
            "\nlocal-nnpu is the per-client nnPU baseline: no aggregation, every client trains its own model on its own PU data \
             (FedPU's loss with the nnPU correction) for the same rounds x local epochs; its accuracy is the mean of the {} clients' \
             models on the test set (per-client values in `client_test_top1` of each summary.json).\n",
            c.clients
        ));
    }
    let get = |name: &str| rows.iter().find(|r| r.0 == name).map(|r| r.1);
    if let (Some(f), Some(p)) = (get("fedpu"), get("positives-only")) {
        body.push_str(&format!(
            "\nFedPU - positives-only: {:+.2} points (the paper's claim is that FedPU is much better than training on the labeled positives only: {}).\n",
            f - p,
            if f - p > 5.0 { "holds here" } else { "does not hold here" }
        ));
    }
    if let (Some(f), Some(l)) = (get("fedpu"), get("local-nnpu")) {
        body.push_str(&format!(
            "FedPU - per-client nnPU (each client alone on its own PU data, same local epochs; mean over the clients' models): {:+.2} points.\n",
            f - l
        ));
    }
    if let (Some(f), Some(s)) = (get("fedpu"), get("supervised")) {
        body.push_str(&format!("FedPU - fully supervised upper bound: {:+.2} points.\n", f - s));
    }
    body.push_str(&format!(
        "\nParams {}, MACs/image {}. Wall time of all runs {:.0} s (each run's own `wall_s`, also when this invocation reused \
         finished runs; this invocation took {:.0} s). Per-run `summary.json` (with per-round history) in `runs/{}-<method>-s<seed>/`.\n\n```\n{}\n```\n",
        s0["params"],
        s0["macs"],
        rows.iter().map(|r| r.3).sum::<f64>(),
        t0.elapsed().as_secs_f64(),
        a.prefix,
        nn_core::report::command_line()
    ));
    let page = nn_core::report::write_section(RESULTS, TITLE, &a.prefix, &body)?;
    println!("{body}");
    eprintln!("written to {}", page.display());
    Ok(())
}

fn peak_rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    kb("VmHWM:") / 1024.0
}

fn bench_one(a: BenchOneArgs) -> Result<()> {
    let train = Arc::new(load("mnist", Split::Train, None, 0, &a.data)?);
    let rss_data = peak_rss_mib();
    let parts = iid(train.len(), a.clients, 0)?;
    let positive = cyclic_positive_classes(a.clients, train.num_classes, &OFFICIAL_CLASSES_PER_CLIENT)?;
    let clients = fedpu_clients(&train.labels, train.num_classes, parts, &positive, 0.33, 0)?;
    let client_bytes: usize = clients
        .iter()
        .map(|c| c.indices.len() * 4 + c.labeled.len() + c.positive_classes.len() * 4 + c.priors.len() * 8 + std::mem::size_of_val(c))
        .sum();
    let per_round = ((a.clients as f64 * a.fraction).round() as usize).max(1);
    let b = builder(&a.model, &train);
    let (params, _) = params_and_macs(&b, &train)?;
    let cfg = FedConfig {
        rounds: a.rounds,
        clients_per_round: per_round,
        local_epochs: 1,
        batch_size: 32,
        lr: 0.01,
        momentum: 0.9,
        objective: Objective::FedPu(FedPuConfig::default()),
        seed: 0,
        workers: a.workers,
        eval_every: 0,
        ..FedConfig::default()
    };
    let dir = std::env::temp_dir().join(format!("fedpu-bench-{}", std::process::id()));
    let mut sim = Simulation::new(cfg, train, None, clients, b)?.with_checkpoint(dir.join("checkpoint.safetensors"));
    let t = Instant::now();
    sim.run(|m| {
        eprintln!(
            "  [{} clients] round {}: {:.2}s, local compute {:.2}s",
            a.clients,
            m.round + 1,
            m.wall_s,
            m.local_compute_s
        )
    })?;
    let wall = t.elapsed().as_secs_f64();
    let h = &sim.state().history;
    let n = h.len() as f64;
    let round_s = h.iter().map(|m| m.wall_s).sum::<f64>() / n;
    let compute_s = h.iter().map(|m| m.local_compute_s).sum::<f64>() / n;
    let setup_s = h.iter().map(|m| m.client_setup_s).sum::<f64>() / n;
    let server_s = h.iter().map(|m| m.server_s).sum::<f64>() / n;
    let ckpt_s = h.iter().map(|m| m.checkpoint_s).sum::<f64>() / n;
    let examples = h.iter().map(|m| m.examples).sum::<u64>() as f64 / n;
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        json!({
            "clients": a.clients, "sampled_per_round": per_round, "rounds": a.rounds, "workers": a.workers,
            "examples_per_round": examples, "round_s": round_s, "local_compute_s": compute_s,
            "client_setup_s": setup_s, "server_s": server_s, "checkpoint_s": ckpt_s,
            "overhead_s": round_s - compute_s, "overhead_pct": 100.0 * (round_s - compute_s) / round_s,
            "peak_rss_mib": peak_rss_mib(), "rss_after_data_mib": rss_data, "client_state_bytes": client_bytes,
            "max_live_models": sim.max_live_models(), "params": params, "wall_s": wall,
        })
    );
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    // /proc/self/exe runs this very binary even if the shared target directory's xtask has
    // been rebuilt from another worktree since this process started
    let proc_exe = PathBuf::from("/proc/self/exe");
    let exe = if proc_exe.exists() { proc_exe } else { std::env::current_exe()? };
    let mut rows = Vec::new();
    for &n in &a.scales {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args([
            "fedpu",
            "bench-one",
            "--clients",
            &n.to_string(),
            "--fraction",
            &a.fraction.to_string(),
        ]);
        cmd.args([
            "--rounds",
            &a.rounds.to_string(),
            "--model",
            &a.model,
            "--workers",
            &a.workers.to_string(),
        ]);
        if let Some(d) = &a.data {
            cmd.arg("--data").arg(d);
        }
        eprintln!("bench: {n} clients");
        let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
        if !out.status.success() {
            bail!("bench-one with {n} clients failed");
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap_or("")).context("parsing bench-one output")?;
        rows.push(v);
    }
    let mut body = format!(
        "## Scale benchmark\n\n{} on the full MNIST training split (60,000 images, IID), FedPU clients (33% of positive classes labeled), \
         {:.0}% of the clients sampled per round, 1 local epoch, batch 32, {} worker(s), checkpoint written every round; mean over {} rounds. \
         With one worker, round time = local compute (forward, backward, SGD steps, summed over clients) + engine overhead \
         (model construction per sampled client, safetensors encode/decode of the weights, sampling, aggregation, checkpoint). \
         Each scale runs in a fresh process so the peak resident memory (VmHWM) is its own; it includes the dataset (60,000 x 784 f32 = 179 MiB).\n\n\
         | clients | sampled/round | images/round | round s | local compute s | overhead s (model setup + server + checkpoint) | overhead % | peak RSS MiB (after data load) | client state KiB | max live models |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        a.model,
        a.fraction * 100.0,
        a.workers,
        a.rounds
    );
    for v in &rows {
        body.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.3} ({:.3} + {:.3} + {:.3}) | {:.1} | {:.0} ({:.0}) | {:.0} | {} |\n",
            v["clients"],
            v["sampled_per_round"],
            v["examples_per_round"].as_f64().unwrap_or(0.0),
            v["round_s"].as_f64().unwrap_or(0.0),
            v["local_compute_s"].as_f64().unwrap_or(0.0),
            v["overhead_s"].as_f64().unwrap_or(0.0),
            v["client_setup_s"].as_f64().unwrap_or(0.0),
            v["server_s"].as_f64().unwrap_or(0.0),
            v["checkpoint_s"].as_f64().unwrap_or(0.0),
            v["overhead_pct"].as_f64().unwrap_or(0.0),
            v["peak_rss_mib"].as_f64().unwrap_or(0.0),
            v["rss_after_data_mib"].as_f64().unwrap_or(0.0),
            v["client_state_bytes"].as_f64().unwrap_or(0.0) / 1024.0,
            v["max_live_models"],
        ));
    }
    let ok = rows.iter().all(|v| v["overhead_pct"].as_f64().unwrap_or(100.0) <= 10.0);
    body.push_str(&format!(
        "\nTarget: overhead <= 10% of round time: {}.\n\n```\n{}\n```\n",
        if ok {
            "met at every scale"
        } else {
            "NOT met at every scale (see the table)"
        },
        nn_core::report::command_line()
    ));
    std::fs::create_dir_all("runs/fedpu-bench")?;
    std::fs::write("runs/fedpu-bench/summary.json", serde_json::to_string_pretty(&rows)?)?;
    let page = nn_core::report::write_section(RESULTS, TITLE, "bench-scale", &body)?;
    println!("{body}");
    eprintln!("written to {}", page.display());
    Ok(())
}

/// The demo row: FedPU on a small MNIST subset, a few rounds, into the `demo-fedpu` section of
/// docs/results/fed-pu.md (the demo page's other sections belong to nn-core).
pub fn demo() -> Result<()> {
    println!("\n== fed-pu: FedPU, 10 clients, MNIST subset ==\n");
    use clap::Parser;
    #[derive(Parser)]
    struct W {
        #[command(flatten)]
        c: Common,
    }
    let mut c = W::parse_from(["demo", "--train-subset", "3000", "--test-subset", "2000", "--rounds", "3"]).c;
    c.overwrite = true;
    let s = run_one(&c, "fedpu", 0, &PathBuf::from("runs/demo-fedpu"))?;
    let body = format!(
        "## demo-fedpu\n\n| method | model | dataset | clients | rounds | seed | test top-1 % | params | MACs | train img/s | wall s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n| fedpu | {} | {} (3,000-image subset, 33% of positives labeled) | 10 | 3 | 0 | {:.2} | {} | {} | {:.0} | {:.0} |\n\n\
         A smoke test of the whole path, not a result: 3 rounds are far too few for FedPU to converge.\n\n```\ncargo xtask demo   # or only this part: cargo xtask fedpu demo\n```\n",
        s["model"].as_str().unwrap_or(""),
        s["dataset"].as_str().unwrap_or(""),
        s["test_top1"].as_f64().unwrap_or(0.0),
        s["params"],
        s["macs"],
        s["train_images_per_s"].as_f64().unwrap_or(0.0),
        s["wall_s"].as_f64().unwrap_or(0.0)
    );
    nn_core::report::write_section(RESULTS, TITLE, "demo-fedpu", &body)?;
    println!("{body}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct W {
        #[command(subcommand)]
        c: FedPuCommand,
    }

    /// The per-client nnPU baseline trains every client alone and reports the mean of their
    /// test accuracies; a second run into the same directory needs --resume or --overwrite.
    #[test]
    fn local_nnpu_trains_each_client_alone() {
        let out = crate::test_files::temp_dir("fedpu-local");
        let W { c: FedPuCommand::Run(a) } = W::try_parse_from([
            "fedpu",
            "run",
            "--method",
            "local-nnpu",
            "--train-subset",
            "500",
            "--test-subset",
            "100",
            "--rounds",
            "1",
        ])
        .unwrap() else {
            panic!("not a run")
        };
        let s = run_one(&a.common, &a.method, 0, &out).unwrap();
        let per: Vec<f64> = s["client_test_top1"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(per.len(), 10);
        let mean = per.iter().sum::<f64>() / 10.0;
        assert!((s["test_top1"].as_f64().unwrap() - mean).abs() < 1e-9);
        assert_eq!(s["history"].as_array().unwrap().len(), 10, "one round per client");
        assert!(out.join("client-9/checkpoint.safetensors").exists());
        let e = format!("{:#}", run_one(&a.common, &a.method, 0, &out).unwrap_err());
        assert!(e.contains("client-0/checkpoint.safetensors") && e.contains("--resume"), "{e}");
        let _ = std::fs::remove_dir_all(&out);
    }
}
