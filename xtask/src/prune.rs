//! pruning commands: prune a trained nn-core model with SCOP, ManiDP, L1-norm or random
//! selection at a rate, fine-tune, and report accuracy before/after with parameters and MACs
//! removed; benchmark physically pruned models against the dense one.

use crate::cli::DataArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use nn_core::candle_core::{DType, Device, Tensor};
use nn_core::experiment::{standard_data, DataSpec, StandardData};
use nn_core::models::ModelConfig;
use nn_core::train::{evaluate, BatchSource, Callback, Checkpoint, OptimizerConfig, Schedule, TrainConfig, TrainSummary, Trainer};
use nn_core::{LayerFactory, Model, StandardFactory, VarStore};
use pruning::manidp::{instance_macs, ManiDpCallback, ManiDpConfig, ManiDpFactory};
use pruning::scop::{
    gamma_scores, scop_scores, selection_stats, train_selection, GaussianKnockoffs, ScopConfig, ScopFactory, SelectionStats,
};
use pruning::{count, criteria, prune_model, Arch};
use std::path::{Path, PathBuf};

const RESULTS: &str = "docs/results/pruning.md";
const METHODS: &[&str] = &["l1", "random", "scop", "manidp"];

#[derive(Subcommand, Debug, Clone)]
pub enum PruneCommand {
    /// Prune a trained model (a `cargo xtask train` run directory) with one method, fine-tune,
    /// write runs/<name>/summary.json and a section of docs/results/pruning.md.
    Run(RunArgs),
    /// Every method x every seed from the same trained model, then the mean +- std table.
    Grid(GridArgs),
    /// Inference speed of physically pruned models vs the dense model (batch 128), next to
    /// the MAC reduction, measured in the same run.
    Bench(BenchArgs),
    /// Run a paper-protocol preset (`cargo xtask prune preset --list` names them): train the
    /// dense model (unless --base gives one), prune, fine-tune.
    Preset(PresetArgs),
}

impl Common {
    /// Everything that decides a run's result except method and seed, as one string: the base
    /// run, the pruning and fine-tuning settings and the data subsets.
    pub fn protocol(&self) -> String {
        format!(
            "base={} rate={} finetune_epochs={} lr={} batch={} scop_epochs={} knockoff_rank={} target_kept={} manidp_updates={} manidp_ramp={} data={:?} train_subset={:?} test_subset={:?} max_steps={:?}",
            self.base.display(),
            self.rate,
            self.finetune_epochs,
            self.lr,
            self.batch_size,
            self.scop_epochs,
            self.knockoff_rank,
            self.target_kept,
            self.manidp_updates_per_epoch,
            self.manidp_ramp,
            self.data.data,
            self.data.train_subset,
            self.data.test_subset,
            self.max_steps
        )
    }
}

/// Options shared by `run` and `grid`.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Run directory of the trained dense model (config.json + checkpoint.safetensors).
    #[arg(long)]
    pub base: PathBuf,
    /// Fraction of each block's inner channels to remove (SCOP, L1, random); 0.5 removes about
    /// half of a CIFAR ResNet's MACs.
    #[arg(long, default_value_t = 0.5)]
    pub rate: f64,
    /// Fine-tuning epochs after pruning (ManiDP: epochs of gated training).
    #[arg(long, default_value_t = 10)]
    pub finetune_epochs: usize,
    /// Fine-tuning learning rate (SGD Nesterov, cosine).
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// SCOP: epochs of the selection phase (network frozen).
    #[arg(long, default_value_t = 1)]
    pub scop_epochs: usize,
    /// SCOP: principal directions of the Gaussian knockoff model.
    #[arg(long, default_value_t = 64)]
    pub knockoff_rank: usize,
    /// ManiDP: target fraction of channels a gate keeps open, ranked by mean gate value (the
    /// per-instance open fraction ends lower: on the 100-epoch ResNet-20 with 2 epochs, 0.62
    /// removed 68.7% of the MACs and 0.88 about half; docs/results/pruning.md).
    #[arg(long, default_value_t = 0.6)]
    pub target_kept: f64,
    /// ManiDP: gate threshold updates per epoch (the official code: 1). With one update per
    /// epoch a run of a few epochs trains with almost every channel open.
    #[arg(long, default_value_t = 10)]
    pub manidp_updates_per_epoch: usize,
    /// ManiDP: fraction of the run over which the kept ratio falls to --target-kept, the rest
    /// trains at the target (the official code: 1).
    #[arg(long, default_value_t = 0.5)]
    pub manidp_ramp: f64,
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long)]
    pub quiet: bool,
    /// Stop every training phase (SCOP selection, ManiDP gates, fine-tuning) after this many
    /// steps: a smoke test of a long protocol.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Markdown page (relative to the workspace root) that receives the results.
    #[arg(long, default_value = RESULTS)]
    pub results: String,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// l1, random, scop or manidp.
    #[arg(long)]
    pub method: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug, Clone)]
pub struct GridArgs {
    #[arg(long, value_delimiter = ',', default_value = "l1,random,scop,manidp")]
    pub methods: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// Prefix of the run directories (runs/<prefix>-<method>-s<seed>).
    #[arg(long, default_value = "prune")]
    pub prefix: String,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[arg(long, default_value = "resnet56")]
    pub model: String,
    #[arg(long, value_delimiter = ',', default_value = "0.3,0.5,0.7")]
    pub rates: Vec<f64>,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
}

pub fn run(cmd: PruneCommand) -> Result<()> {
    match cmd {
        PruneCommand::Run(a) => run_one(&a).map(|_| ()),
        PruneCommand::Grid(a) => grid(&a),
        PruneCommand::Bench(a) => bench(&a),
        PruneCommand::Preset(a) => preset(&a).map(|_| ()),
    }
}

/// What a pruning run reports (also the extra fields of its summary.json).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PruneReport {
    pub method: String,
    pub model: String,
    pub seed: u64,
    pub base_top1: f64,
    /// Accuracy right after pruning, before fine-tuning (static methods).
    pub pruned_top1: Option<f64>,
    pub final_top1: f64,
    pub dense_params: usize,
    pub dense_macs: u64,
    pub params: usize,
    /// MACs per image (ManiDP: mean over the test set of the per-instance MACs).
    pub macs: f64,
    pub macs_removed_pct: f64,
    pub params_removed_pct: f64,
    pub finetune_epochs: usize,
    pub wall_s: f64,
    /// The settings the run followed ([`Common::protocol`]); `grid` reuses a finished run only
    /// when they match its own (empty in summaries written before this field existed).
    #[serde(default)]
    pub protocol: String,
    /// SCOP: how the trained selection scales are spread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scop_beta: Option<SelectionStats>,
    /// SCOP: fraction of the removed channels that `|gamma|` alone (BN-scale pruning) would
    /// also have removed; 1 means the knockoffs changed nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scop_same_as_gamma: Option<f64>,
}

fn base_config(base: &Path) -> Result<TrainConfig> {
    let p = base.join(nn_core::train::trainer::CONFIG_FILE);
    serde_json::from_str(
        &std::fs::read_to_string(&p).with_context(|| format!("reading {} (is --base a `cargo xtask train` run?)", p.display()))?,
    )
    .with_context(|| format!("parsing {}", p.display()))
}

fn load_data(c: &Common, dataset: &str, seed: u64) -> Result<StandardData> {
    if !(0.0..1.0).contains(&c.rate) {
        bail!("--rate must be in [0, 1), got {}", c.rate);
    }
    if !(0.0..=1.0).contains(&c.target_kept) || c.target_kept == 0.0 {
        bail!("--target-kept must be in (0, 1], got {}", c.target_kept);
    }
    if c.manidp_updates_per_epoch == 0 {
        bail!("--manidp-updates-per-epoch must be at least 1");
    }
    if !(c.manidp_ramp > 0.0 && c.manidp_ramp <= 1.0) {
        bail!("--manidp-ramp must be in (0, 1], got {}", c.manidp_ramp);
    }
    if c.batch_size < 2 {
        bail!("--batch-size must be >= 2");
    }
    standard_data(&c.data.spec(dataset, c.batch_size, seed))
}

/// Builds `arch` through `factory` and loads the trained weights of `base` (the factory's
/// extra parameters, such as gates or selection scales, keep their initial values).
fn load_base(arch: &Arch, cfg: &ModelConfig, base: &Path, factory: &dyn LayerFactory, seed: u64) -> Result<(VarStore, Box<dyn Model>)> {
    let vs = VarStore::new(seed, &Device::Cpu);
    let model = arch.build(cfg, &vs.root(), factory)?;
    let ck = Checkpoint::load(&base.join(nn_core::train::trainer::CHECKPOINT_FILE))?;
    let missing: Vec<String> = {
        let dense = VarStore::new(0, &Device::Cpu);
        arch.build(cfg, &dense.root(), &StandardFactory)?;
        dense
            .all()
            .into_iter()
            .map(|v| v.name)
            .filter(|n| !ck.model.contains_key(n))
            .collect()
    };
    if !missing.is_empty() {
        bail!(
            "{} does not hold a trained {}: missing {}",
            base.display(),
            arch.base_name(),
            missing.join(", ")
        );
    }
    vs.load_tensors(&ck.model, false)?;
    Ok((vs, model))
}

fn finetune_config(c: &Common, model: &str, dataset: &str, epochs: usize, seed: u64, out: &Path) -> TrainConfig {
    let mut cfg = TrainConfig::new(model, dataset, epochs, out);
    cfg.batch_size = c.batch_size;
    cfg.seed = seed;
    cfg.optimizer = OptimizerConfig::sgd_nesterov(c.lr, 5e-4);
    cfg.schedule = Schedule::cosine(0.0);
    cfg.overwrite = c.overwrite;
    cfg.quiet = c.quiet;
    cfg.stop_after_steps = c.max_steps;
    cfg.command = nn_core::report::command_line();
    cfg
}

/// The first `n` (augmented, normalised) training images.
fn training_images(src: &dyn BatchSource, n: usize) -> Result<Tensor> {
    let mut parts = Vec::new();
    let mut have = 0;
    for b in src.batches(0, 0) {
        let (x, _) = b?;
        have += x.dim(0)?;
        parts.push(x);
        if have >= n {
            break;
        }
    }
    let x = Tensor::cat(&parts, 0)?;
    Ok(x.narrow(0, 0, n.min(x.dim(0)?))?)
}

pub fn run_one(a: &RunArgs) -> Result<PruneReport> {
    let c = &a.common;
    if !METHODS.contains(&a.method.as_str()) {
        bail!("unknown pruning method `{}`; valid methods: {}", a.method, METHODS.join(", "));
    }
    let t0 = std::time::Instant::now();
    let base_cfg = base_config(&c.base)?;
    let arch = Arch::from_name(&base_cfg.model)?;
    let d = load_data(c, &base_cfg.dataset, a.seed)?;
    let mc = d.model_config;
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "runs/prune-{}-{}-{}-s{}",
            base_cfg.model, base_cfg.dataset, a.method, a.seed
        ))
    });
    let graph = arch.graph(&mc);
    let (dense_params, dense_macs) = {
        let vs = VarStore::new(0, &Device::Cpu);
        count(arch.build(&mc, &vs.root(), &StandardFactory)?.as_ref(), &mc, &Device::Cpu)?
    };
    eprintln!(
        "pruning {} on {} with {} (rate {}, seed {}), base {}",
        base_cfg.model,
        base_cfg.dataset,
        a.method,
        c.rate,
        a.seed,
        c.base.display()
    );
    let report = if a.method == "manidp" {
        let mcfg = ManiDpConfig {
            target_kept: c.target_kept,
            threshold_updates_per_epoch: c.manidp_updates_per_epoch,
            ramp_fraction: c.manidp_ramp,
            ..ManiDpConfig::default()
        };
        let f = ManiDpFactory::new(mcfg.clone());
        let (vs, model) = load_base(&arch, &mc, &c.base, &f, a.seed)?;
        let base_top1 = evaluate(model.as_ref(), &d.test)?.top1;
        // dense convolutions plus the gates' own MACs; instances save what their gates close
        let (_, gated_dense_macs) = count(model.as_ref(), &mc, &Device::Cpu)?;
        let mut cb = ManiDpCallback::new(mcfg, f.state.clone());
        let cfg = finetune_config(c, model.name(), &base_cfg.dataset, c.finetune_epochs, a.seed, &out);
        let mut trainer = Trainer::new(cfg, model.as_ref(), &vs)?;
        trainer.add_callback(Box::new(&mut cb) as Box<dyn Callback + '_>);
        let summary = trainer.fit(&d.train, Some(&d.test))?;
        drop(trainer);
        // accuracy and mean per-instance MACs over the test set, both with the final thresholds
        // (the trainer's last evaluation ran before the last threshold updates could matter)
        let (mut sum, mut correct, mut n) = (0f64, 0usize, 0usize);
        for b in d.test.batches(0, 0) {
            let (x, y) = b?;
            let pred: Vec<u32> = model.forward_t(&x, false)?.argmax(1)?.to_vec1()?;
            let y: Vec<u32> = y.to_dtype(DType::U32)?.to_vec1()?;
            correct += pred.iter().zip(&y).filter(|(p, y)| p == y).count();
            for m in instance_macs(&f.state, gated_dense_macs)? {
                sum += m as f64;
                n += 1;
            }
        }
        let macs = sum / n.max(1) as f64;
        let final_top1 = 100.0 * correct as f64 / n.max(1) as f64;
        eprintln!(
            "ManiDP with the final thresholds: top-1 {final_top1:.2} (trainer's last evaluation {:.2}), mean MACs/image {macs:.0}",
            summary.test_top1.unwrap_or(f64::NAN)
        );
        let gate_params = vs.num_params() - dense_params;
        finish(
            a,
            &out,
            &summary,
            PruneReport {
                method: a.method.clone(),
                model: base_cfg.model.clone(),
                seed: a.seed,
                base_top1,
                pruned_top1: None,
                final_top1,
                dense_params,
                dense_macs,
                params: dense_params + gate_params,
                macs,
                macs_removed_pct: 100.0 * (1.0 - macs / dense_macs as f64),
                params_removed_pct: -100.0 * gate_params as f64 / dense_params as f64,
                finetune_epochs: c.finetune_epochs,
                wall_s: t0.elapsed().as_secs_f64(),
                protocol: c.protocol(),
                scop_beta: None,
                scop_same_as_gamma: None,
            },
        )?
    } else {
        let scop = ScopFactory::default();
        let factory: &dyn LayerFactory = if a.method == "scop" { &scop } else { &StandardFactory };
        let (vs, model) = load_base(&arch, &mc, &c.base, factory, a.seed)?;
        let base_top1 = evaluate(model.as_ref(), &d.test)?.top1;
        let scores = match a.method.as_str() {
            "l1" => criteria::l1_scores(&graph, &vs)?,
            "random" => criteria::random_scores(&graph, a.seed),
            _ => {
                let images = training_images(&d.train, 2048)?;
                let n = images.dim(0)?;
                let rank = c.knockoff_rank.min(n.saturating_sub(1));
                if rank < c.knockoff_rank {
                    eprintln!(
                        "knockoff model: only {n} training images, rank {} lowered to {rank}",
                        c.knockoff_rank
                    );
                }
                let gen = GaussianKnockoffs::fit(&images.to_dtype(DType::F32)?, rank, a.seed)?;
                let loss = train_selection(
                    model.as_ref(),
                    &vs,
                    &scop,
                    &d.train,
                    &gen,
                    &ScopConfig {
                        epochs: c.scop_epochs,
                        lr: 0.004,
                        seed: a.seed,
                        max_steps: c.max_steps,
                    },
                )?;
                eprintln!("SCOP selection phase: {} epoch(s), final task loss {loss:.4}", c.scop_epochs);
                scop_scores(&graph, &vs)?
            }
        };
        let inner = |g: &pruning::graph::ChannelGroup| criteria::is_block_inner(&graph, g);
        let sel = criteria::select_lowest(&graph, &scores, c.rate, inner);
        let (scop_beta, scop_same_as_gamma) = if a.method == "scop" {
            let st = selection_stats(&vs)?;
            let by_gamma = criteria::select_lowest(&graph, &gamma_scores(&graph, &vs)?, c.rate, inner);
            let common: usize = sel
                .remove
                .iter()
                .map(|(g, units)| by_gamma.remove.get(g).map_or(0, |o| units.iter().filter(|u| o.contains(u)).count()))
                .sum();
            let same = common as f64 / sel.count().max(1) as f64;
            eprintln!("{}", scop_diagnostics(&st, same));
            (Some(st), Some(same))
        } else {
            (None, None)
        };
        let pruned = prune_model(&arch, &mc, &vs, &sel, &StandardFactory)?;
        drop(model);
        let pruned_top1 = evaluate(pruned.model.as_ref(), &d.test)?.top1;
        let (params, macs) = count(pruned.model.as_ref(), &mc, &Device::Cpu)?;
        eprintln!(
            "pruned {} units: params {dense_params} -> {params}, MACs {dense_macs} -> {macs}; top-1 {base_top1:.2} -> {pruned_top1:.2} before fine-tuning",
            sel.count()
        );
        let cfg = finetune_config(c, &base_cfg.model, &base_cfg.dataset, c.finetune_epochs, a.seed, &out);
        let summary = Trainer::new(cfg, pruned.model.as_ref(), &pruned.vs)?.fit(&d.train, Some(&d.test))?;
        pruned.save(out.join("pruned"))?;
        finish(
            a,
            &out,
            &summary,
            PruneReport {
                method: a.method.clone(),
                model: base_cfg.model.clone(),
                seed: a.seed,
                base_top1,
                pruned_top1: Some(pruned_top1),
                final_top1: summary.test_top1.unwrap_or(0.0),
                dense_params,
                dense_macs,
                params,
                macs: macs as f64,
                macs_removed_pct: 100.0 * (1.0 - macs as f64 / dense_macs as f64),
                params_removed_pct: 100.0 * (1.0 - params as f64 / dense_params as f64),
                finetune_epochs: c.finetune_epochs,
                wall_s: t0.elapsed().as_secs_f64(),
                protocol: c.protocol(),
                scop_beta,
                scop_same_as_gamma,
            },
        )?
    };
    Ok(report)
}

/// One line on SCOP's selection scales and its overlap with `|gamma|`-only pruning.
fn scop_diagnostics(b: &SelectionStats, same_as_gamma: f64) -> String {
    format!(
        "SCOP selection scales: {} channels, {} at 1, {} at 0, mean {:.3}; {:.1}% of the removed channels are the ones `|gamma|` alone would remove",
        b.channels,
        b.at_one,
        b.at_zero,
        b.mean,
        100.0 * same_as_gamma
    )
}

fn finish(a: &RunArgs, out: &Path, s: &TrainSummary, r: PruneReport) -> Result<PruneReport> {
    let mut v = serde_json::to_value(s)?;
    if let Some(m) = v.as_object_mut() {
        m.insert("method".into(), r.method.clone().into());
        m.insert("pruning".into(), serde_json::to_value(&r)?);
        m.insert("macs".into(), (r.macs.round() as u64).into());
        m.insert("params".into(), r.params.into());
        m.insert("wall_s".into(), r.wall_s.into());
    }
    std::fs::write(out.join("summary.json"), serde_json::to_vec_pretty(&v)?)?;
    if a.common.max_steps.is_some() {
        eprintln!(
            "smoke run (--max-steps): summary in {}/summary.json, no results table written",
            out.display()
        );
        return Ok(r);
    }
    let name = crate::grid::run_name(&out);
    let body = format!(
        "## {name}\n\n{} of {} ({}), seed {}, rate {}: top-1 {:.2} (dense) -> {} (pruned, before fine-tuning) -> **{:.2}** after {} fine-tuning epoch(s); parameters {} -> {} ({:+.1}% removed), MACs/image {} -> {:.0} ({:.1}% removed); wall {:.0} s.\n\n```\n{}\n```\n",
        r.method,
        r.model,
        s.dataset,
        r.seed,
        a.common.rate,
        r.base_top1,
        r.pruned_top1.map_or("n/a (dynamic)".to_string(), |v| format!("{v:.2}")),
        r.final_top1,
        r.finetune_epochs,
        r.dense_params,
        r.params,
        r.params_removed_pct,
        r.dense_macs,
        r.macs,
        r.macs_removed_pct,
        r.wall_s,
        nn_core::report::command_line()
    );
    let mut body = body;
    if let (Some(b), Some(same)) = (r.scop_beta, r.scop_same_as_gamma) {
        body += &format!("\n{}.\n", scop_diagnostics(&b, same));
    }
    nn_core::report::write_section(&a.common.results, "pruning results", &name, &body)?;
    eprintln!("summary: {}/summary.json; table: {}", out.display(), a.common.results);
    Ok(r)
}

/// What `grid` does with the run directory `out`: reuse a run that finished under `protocol`
/// (`Some`), run it (`None`: nothing finished there, or `overwrite` replaces a run made with
/// other settings), or refuse to replace a finished run made with other settings (error).
fn reusable_run(out: &Path, protocol: &str, overwrite: bool) -> Result<Option<PruneReport>> {
    let done = finished_run(out, protocol);
    if done.is_none() && out.join("summary.json").exists() {
        if !overwrite {
            bail!(
                "{} holds a run made with other settings; pass --overwrite to replace it, or --prefix to write the grid elsewhere",
                out.display()
            );
        }
        eprintln!("{}: finished with other settings, running it again (--overwrite)", out.display());
    }
    Ok(done)
}

/// The report of a run in `out` that finished under `protocol`, if there is one.
fn finished_run(out: &Path, protocol: &str) -> Option<PruneReport> {
    std::fs::read(out.join("summary.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| serde_json::from_value::<PruneReport>(v["pruning"].clone()).ok())
        .filter(|r| r.protocol == protocol)
}

fn grid(a: &GridArgs) -> Result<()> {
    let base_cfg = base_config(&a.common.base)?;
    let mut rows = Vec::new();
    for m in &a.methods {
        let mut reps = Vec::new();
        for &seed in &a.seeds {
            let out = PathBuf::from(format!("runs/{}-{}-{}-s{seed}", a.prefix, base_cfg.model, m));
            let done = reusable_run(&out, &a.common.protocol(), a.common.overwrite)?;
            let r = match done {
                Some(r) => r,
                None => {
                    let mut c = a.common.clone();
                    c.overwrite = true;
                    run_one(&RunArgs {
                        method: m.clone(),
                        seed,
                        out: Some(out),
                        common: c,
                    })?
                }
            };
            reps.push(r);
        }
        rows.push((m.clone(), reps));
    }
    let stats = nn_core::experiment::mean_std;
    let c = &a.common;
    let mut t = format!(
        "## Pruning {} on {} at about half the MACs\n\nBase model: `{}` ({} epochs). Static methods remove a fraction {} of every block's inner channels, then fine-tune {} epoch(s) (SGD Nesterov lr {} cosine, wd 5e-4, batch {}); ManiDP trains its gates for the same {} epoch(s) with target kept ratio {} ({} threshold updates per epoch, target reached after {} of the run; accuracy and MACs measured with the final thresholds). Seeds {:?}; mean +- sample std.\n\n| method | dense top-1 | after pruning | after fine-tuning | accuracy change | MACs removed | params removed | mean wall s |\n|---|---|---|---|---|---|---|---|\n",
        base_cfg.model,
        base_cfg.dataset,
        c.base.display(),
        base_cfg.epochs,
        c.rate,
        c.finetune_epochs,
        c.lr,
        c.batch_size,
        c.finetune_epochs,
        c.target_kept,
        c.manidp_updates_per_epoch,
        c.manidp_ramp,
        a.seeds
    );
    for (m, reps) in &rows {
        let f = |g: &dyn Fn(&PruneReport) -> f64| stats(&reps.iter().map(g).collect::<Vec<_>>());
        let (b, _) = f(&|r| r.base_top1);
        let (fin, fsd) = f(&|r| r.final_top1);
        let after = if reps.iter().all(|r| r.pruned_top1.is_some()) {
            let (p, psd) = f(&|r| r.pruned_top1.unwrap_or(0.0));
            format!("{p:.2} +- {psd:.2}")
        } else {
            "dynamic".into()
        };
        let (mr, _) = f(&|r| r.macs_removed_pct);
        let (pr, _) = f(&|r| r.params_removed_pct);
        let (w, _) = f(&|r| r.wall_s);
        t += &format!(
            "| {m} | {b:.2} | {after} | {fin:.2} +- {fsd:.2} | {:+.2} | {mr:.1}% | {pr:.1}% | {w:.0} |\n",
            fin - b
        );
    }
    if let Some((_, reps)) = rows.iter().find(|(m, _)| m == "scop") {
        let same: Vec<f64> = reps.iter().filter_map(|r| r.scop_same_as_gamma).collect();
        let at_one: Vec<f64> = reps
            .iter()
            .filter_map(|r| r.scop_beta.map(|b| 100.0 * b.at_one as f64 / b.channels.max(1) as f64))
            .collect();
        if !same.is_empty() {
            let (s, ssd) = stats(&same);
            let (o, _) = stats(&at_one);
            t += &format!(
                "\nSCOP diagnostics: after the selection phase {o:.1}% of the selection scales sit at 1 (real feature kept whole); {:.1} +- {:.1}% of the channels SCOP removes are the ones `|gamma|` alone (BN-scale pruning) would remove.\n",
                100.0 * s,
                100.0 * ssd
            );
        }
    }
    t += &format!("\n```\n{}\n```\n", nn_core::report::command_line());
    println!("{t}");
    if c.max_steps.is_some() {
        eprintln!("smoke grid (--max-steps): table printed only, {} not changed", c.results);
        return Ok(());
    }
    nn_core::report::write_section(&c.results, "pruning results", &format!("{}-grid-{}", a.prefix, base_cfg.model), &t)?;
    Ok(())
}

fn bench(a: &BenchArgs) -> Result<()> {
    let arch = Arch::from_name(&a.model)?;
    let mc = ModelConfig::new(3, 10, 32);
    let dev = Device::Cpu;
    let vs = VarStore::new(0, &dev);
    let dense = arch.build(&mc, &vs.root(), &StandardFactory)?;
    let (_, dense_macs) = count(dense.as_ref(), &mc, &dev)?;
    let x = Tensor::randn(0f32, 1.0, (a.batch_size, 3, 32, 32), &dev)?;
    let time = |m: &dyn Model| -> Result<f64> {
        m.forward_t(&x, false)?;
        let mut ts = Vec::new();
        for _ in 0..a.iters {
            let t = std::time::Instant::now();
            m.forward_t(&x, false)?;
            ts.push(t.elapsed().as_secs_f64());
        }
        ts.sort_by(f64::total_cmp);
        Ok(ts[ts.len() / 2])
    };
    let graph = arch.graph(&mc);
    let scores = criteria::l1_scores(&graph, &vs)?;
    let mut rows = Vec::new();
    for &rate in &a.rates {
        let sel = criteria::select_lowest(&graph, &scores, rate, |g| criteria::is_block_inner(&graph, g));
        let p = prune_model(&arch, &mc, &vs, &sel, &StandardFactory)?;
        let (_, macs) = count(p.model.as_ref(), &mc, &dev)?;
        // interleave dense and pruned timings
        let (td, tp) = (time(dense.as_ref())?, time(p.model.as_ref())?);
        let (td2, tp2) = (time(dense.as_ref())?, time(p.model.as_ref())?);
        let (td, tp) = (td.min(td2), tp.min(tp2));
        let mac_ratio = dense_macs as f64 / macs as f64;
        let speedup = td / tp;
        rows.push(format!(
            "| {rate} | {:.1}% | {:.2}x | {:.1} | {:.1} | {speedup:.2}x | {:.2} |",
            100.0 * (1.0 - macs as f64 / dense_macs as f64),
            mac_ratio,
            td * 1e3,
            tp * 1e3,
            speedup / mac_ratio
        ));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let body = format!(
        "## Inference speed of physically pruned {} (batch {}, 32x32, {} threads)\n\nBlock-inner channels removed by L1 norm at each rate; median of {} forward passes, dense and pruned interleaved in the same run (load average at the end: {}). Target: speedup >= 0.8 x the MAC ratio.\n\n| rate | MACs removed | MAC ratio | dense ms | pruned ms | speedup | speedup / MAC ratio |\n|---|---|---|---|---|---|---|\n{}\n\n```\n{}\n```\n",
        a.model,
        a.batch_size,
        rayon::current_num_threads(),
        a.iters,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        rows.join("\n"),
        nn_core::report::command_line()
    );
    nn_core::report::write_section(RESULTS, "pruning results", &format!("bench-{}", a.model), &body)?;
    println!("{body}");
    Ok(())
}

/// A paper's pruning protocol: the dense model and how it is trained, the method, its rate
/// and the fine-tuning budget. CIFAR-10 is on this machine; ImageNet is read from
/// `imagenet/{train,val}/<class>/` in a data root.
#[derive(Debug, Clone, Copy)]
pub struct PrunePreset {
    pub name: &'static str,
    pub about: &'static str,
    pub model: &'static str,
    pub dataset: &'static str,
    pub method: &'static str,
    /// Fraction of block-inner channels removed (SCOP, L1, random).
    pub rate: f64,
    /// ManiDP's target kept ratio.
    pub target_kept: f64,
    /// Dense training when no --base is given (SGD Nesterov, cosine).
    pub base_epochs: usize,
    pub base_lr: f64,
    pub base_weight_decay: f64,
    pub finetune_epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
}

/// The protocols of SCOP (NeurIPS 2020) and ManiDP (CVPR 2021) as we read their papers and
/// code: CIFAR-10 ResNet-56 (option A, as in their code bases) and ImageNet ResNet-34/50/101
/// (torchvision layout). Rates are chosen to remove the papers' share of MACs with this
/// library's block-inner pruning (ResNet-56: SCOP about 56%, ManiDP 62.4%; ImageNet about
/// 45-55%). Dense training is the usual recipe (CIFAR-10 200 epochs lr 0.1 wd 5e-4; ImageNet
/// 90 epochs lr 0.1 wd 1e-4, batch 256); fine-tuning budgets are ours; everything is
/// overridable on the command line.
pub const PRUNE_PRESETS: &[PrunePreset] = &[
    PrunePreset {
        name: "scop-cifar10-resnet56",
        about: "SCOP on CIFAR-10 ResNet-56, ~56% of MACs removed (paper: 93.70 -> 93.64)",
        model: "resnet56",
        dataset: "cifar10",
        method: "scop",
        rate: 0.56,
        target_kept: 0.6,
        base_epochs: 200,
        base_lr: 0.1,
        base_weight_decay: 5e-4,
        finetune_epochs: 200,
        lr: 0.05,
        batch_size: 128,
    },
    PrunePreset {
        name: "manidp-cifar10-resnet56",
        about: "ManiDP on CIFAR-10 ResNet-56, target 62.4% of MACs removed (paper: 6.30 -> 6.36% error)",
        model: "resnet56",
        dataset: "cifar10",
        method: "manidp",
        rate: 0.5,
        target_kept: 0.4,
        base_epochs: 200,
        base_lr: 0.1,
        base_weight_decay: 5e-4,
        finetune_epochs: 200,
        lr: 0.05,
        batch_size: 128,
    },
    PrunePreset {
        name: "scop-imagenet-resnet34",
        about: "SCOP on ImageNet ResNet-34, ~45% of MACs removed",
        model: "resnet34",
        dataset: "imagenet",
        method: "scop",
        rate: 0.45,
        target_kept: 0.6,
        base_epochs: 90,
        base_lr: 0.1,
        base_weight_decay: 1e-4,
        finetune_epochs: 120,
        lr: 0.1,
        batch_size: 256,
    },
    PrunePreset {
        name: "scop-imagenet-resnet50",
        about: "SCOP on ImageNet ResNet-50 (bottleneck, both inner widths pruned), ~55% of MACs removed",
        model: "resnet50",
        dataset: "imagenet",
        method: "scop",
        rate: 0.45,
        target_kept: 0.6,
        base_epochs: 90,
        base_lr: 0.1,
        base_weight_decay: 1e-4,
        finetune_epochs: 120,
        lr: 0.1,
        batch_size: 256,
    },
    PrunePreset {
        name: "scop-imagenet-resnet101",
        about: "SCOP on ImageNet ResNet-101, ~60% of MACs removed",
        model: "resnet101",
        dataset: "imagenet",
        method: "scop",
        rate: 0.5,
        target_kept: 0.6,
        base_epochs: 90,
        base_lr: 0.1,
        base_weight_decay: 1e-4,
        finetune_epochs: 120,
        lr: 0.1,
        batch_size: 256,
    },
    PrunePreset {
        name: "manidp-imagenet-resnet34",
        about: "ManiDP on ImageNet ResNet-34, dynamic gates with target kept ratio 0.55",
        model: "resnet34",
        dataset: "imagenet",
        method: "manidp",
        rate: 0.5,
        target_kept: 0.55,
        base_epochs: 90,
        base_lr: 0.1,
        base_weight_decay: 1e-4,
        finetune_epochs: 120,
        lr: 0.1,
        batch_size: 256,
    },
    PrunePreset {
        name: "manidp-imagenet-resnet50",
        about: "ManiDP on ImageNet ResNet-50, dynamic gates with target kept ratio 0.5",
        model: "resnet50",
        dataset: "imagenet",
        method: "manidp",
        rate: 0.5,
        target_kept: 0.5,
        base_epochs: 90,
        base_lr: 0.1,
        base_weight_decay: 1e-4,
        finetune_epochs: 120,
        lr: 0.1,
        batch_size: 256,
    },
];

/// Options of `cargo xtask prune preset`.
#[derive(Args, Debug, Clone)]
pub struct PresetArgs {
    /// Preset name (see --list).
    #[arg(required_unless_present = "list")]
    pub name: Option<String>,
    /// List the presets and exit.
    #[arg(long)]
    pub list: bool,
    /// A trained dense model (a `cargo xtask train` run of the preset's model and dataset);
    /// without it the preset trains one first, into <out>/base.
    #[arg(long)]
    pub base: Option<PathBuf>,
    #[arg(long)]
    pub base_epochs: Option<usize>,
    #[arg(long)]
    pub finetune_epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long)]
    pub target_kept: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub data: DataArgs,
    /// Run directory (default runs/<preset>-s<seed>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Stop every training phase after this many steps (smoke test).
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long)]
    pub quiet: bool,
}

/// Trains the dense prunable model `cfg.model` from scratch with `cfg` (cosine schedule to 0)
/// into `cfg.out_dir`: the base that `run_one` then prunes.
fn train_dense(mut cfg: TrainConfig, d: &StandardData) -> Result<()> {
    let vs = VarStore::new(cfg.seed, &Device::Cpu);
    let model = Arch::from_name(&cfg.model)?.build(&d.model_config, &vs.root(), &StandardFactory)?;
    cfg.schedule = Schedule::cosine(0.0);
    cfg.command = nn_core::report::command_line();
    Trainer::new(cfg, model.as_ref(), &vs)?.fit(&d.train, Some(&d.test))?;
    Ok(())
}

fn find_preset(name: &str) -> Result<&'static PrunePreset> {
    PRUNE_PRESETS.iter().find(|p| p.name == name).with_context(|| {
        format!(
            "unknown pruning preset `{name}`; valid presets: {}",
            PRUNE_PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
        )
    })
}

fn preset(a: &PresetArgs) -> Result<Option<PruneReport>> {
    if a.list {
        println!("pruning presets (cargo xtask prune preset NAME):");
        for p in PRUNE_PRESETS {
            println!("  {:<26} {}", p.name, p.about);
        }
        return Ok(None);
    }
    let p = find_preset(a.name.as_deref().unwrap_or_default())?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/{}-s{}", p.name, a.seed)));
    let batch_size = a.batch_size.unwrap_or(p.batch_size);
    let base = match &a.base {
        Some(b) => {
            let cfg = base_config(b)?;
            if cfg.model != p.model || cfg.dataset != p.dataset {
                bail!(
                    "--base {} holds {} on {}, preset {} needs {} on {}",
                    b.display(),
                    cfg.model,
                    cfg.dataset,
                    p.name,
                    p.model,
                    p.dataset
                );
            }
            b.clone()
        }
        None => {
            let base = out.join("base");
            let d = standard_data(&a.data.spec(p.dataset, batch_size, a.seed))?;
            let mut cfg = TrainConfig::new(p.model, p.dataset, a.base_epochs.unwrap_or(p.base_epochs), &base);
            cfg.batch_size = batch_size;
            cfg.seed = a.seed;
            cfg.optimizer = OptimizerConfig::sgd_nesterov(p.base_lr, p.base_weight_decay);
            cfg.overwrite = a.overwrite;
            cfg.quiet = a.quiet;
            cfg.stop_after_steps = a.max_steps;
            eprintln!("{}: training the dense {} first ({})", p.name, p.model, base.display());
            train_dense(cfg, &d)?;
            base
        }
    };
    let r = run_one(&RunArgs {
        method: p.method.into(),
        seed: a.seed,
        out: Some(out),
        common: Common {
            base,
            rate: a.rate.unwrap_or(p.rate),
            finetune_epochs: a.finetune_epochs.unwrap_or(p.finetune_epochs),
            lr: a.lr.unwrap_or(p.lr),
            batch_size,
            scop_epochs: 1,
            knockoff_rank: 64,
            target_kept: a.target_kept.unwrap_or(p.target_kept),
            manidp_updates_per_epoch: 10,
            manidp_ramp: 0.5,
            data: a.data.clone(),
            overwrite: a.overwrite,
            quiet: a.quiet,
            max_steps: a.max_steps,
            results: RESULTS.into(),
        },
    })?;
    Ok(Some(r))
}

/// The pruning row of `cargo xtask demo`: ResNet-20 on a 10,000-image MNIST subset, L1-norm
/// pruning of half of every block's inner channels, one fine-tuning epoch. Returns (dense
/// top-1, pruned and fine-tuned top-1, MACs removed %).
pub fn demo_row(epochs: usize, seed: u64) -> Result<(f64, f64, f64)> {
    let base = PathBuf::from("runs/demo-prune-base");
    let mut spec = DataSpec::new("mnist", 128, seed);
    spec.train_subset = Some(10_000);
    let d = standard_data(&spec)?;
    let mut cfg = TrainConfig::new("resnet20", "mnist", epochs, &base);
    cfg.seed = seed;
    cfg.optimizer = OptimizerConfig::sgd_nesterov(0.1, 5e-4);
    cfg.overwrite = true;
    train_dense(cfg, &d)?;
    let r = run_one(&RunArgs {
        method: "l1".into(),
        seed,
        out: Some(PathBuf::from("runs/demo-prune-l1")),
        common: Common {
            base,
            rate: 0.5,
            finetune_epochs: 1,
            lr: 0.05,
            batch_size: 128,
            scop_epochs: 1,
            knockoff_rank: 64,
            target_kept: 0.6,
            manidp_updates_per_epoch: 10,
            manidp_ramp: 0.5,
            data: DataArgs {
                train_subset: Some(10_000),
                ..Default::default()
            },
            overwrite: true,
            quiet: false,
            max_steps: None,
            results: "docs/results/demo.md".into(),
        },
    })?;
    Ok((r.base_top1, r.final_top1, r.macs_removed_pct))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct W {
        #[command(subcommand)]
        c: PruneCommand,
    }

    /// Every paper preset runs one step of each phase (dense training, SCOP selection or
    /// ManiDP gates, fine-tuning) on generated files in the official layouts.
    #[test]
    fn every_preset_runs_one_step_on_generated_files() {
        let root = crate::test_files::temp_dir("prune-presets");
        crate::test_files::write_cifar10(&root, 4).unwrap();
        crate::test_files::write_imagenet(&root, 2, 2).unwrap();
        for p in PRUNE_PRESETS {
            let out = root.join(format!("runs/{}", p.name));
            let W {
                c: PruneCommand::Preset(mut a),
            } = W::try_parse_from(["prune", "preset", p.name, "--batch-size", "2", "--max-steps", "1", "--quiet"]).unwrap()
            else {
                panic!("not a preset command")
            };
            a.data.data = Some(root.clone());
            a.out = Some(out.clone());
            let r = preset(&a).unwrap_or_else(|e| panic!("preset {}: {e:#}", p.name)).expect("a report");
            assert_eq!(r.model, p.model);
            assert!(r.macs_removed_pct > 0.0 || p.method == "manidp", "{}: {r:?}", p.name);
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
            assert_eq!(v["method"].as_str(), Some(p.method), "{}", p.name);
            assert_eq!(v["completed"].as_bool(), Some(false), "{}: a 1-step run is not complete", p.name);
            assert!(
                out.join("base/checkpoint.safetensors").exists(),
                "{}: the dense model was trained first",
                p.name
            );
        }
        let e = format!("{:#}", find_preset("scop-cifar10-resnet57").unwrap_err());
        assert!(e.contains("valid presets: scop-cifar10-resnet56"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }

    /// `grid` skips a finished run only when base, settings and data subsets all match.
    #[test]
    fn grid_reuses_only_runs_of_the_same_protocol() {
        let parse = |a: &[&str]| match W::try_parse_from(["prune", "grid", "--base", "runs/a"].iter().chain(a).copied())
            .unwrap()
            .c
        {
            PruneCommand::Grid(g) => g.common,
            _ => panic!("not a grid"),
        };
        let base = parse(&[]);
        let dir = crate::test_files::temp_dir("prune-grid-protocol");
        let report = |protocol: String| PruneReport {
            method: "l1".into(),
            model: "resnet20".into(),
            seed: 0,
            base_top1: 90.0,
            pruned_top1: Some(50.0),
            final_top1: 89.0,
            dense_params: 10,
            dense_macs: 100,
            params: 5,
            macs: 50.0,
            macs_removed_pct: 50.0,
            params_removed_pct: 50.0,
            finetune_epochs: 10,
            wall_s: 1.0,
            protocol,
            scop_beta: None,
            scop_same_as_gamma: None,
        };
        let write = |v: serde_json::Value| std::fs::write(dir.join("summary.json"), serde_json::to_vec(&v).unwrap()).unwrap();
        write(serde_json::json!({ "pruning": report(base.protocol()) }));
        assert!(finished_run(&dir, &base.protocol()).is_some());
        assert!(reusable_run(&dir, &base.protocol(), false).unwrap().is_some());
        for other in [
            parse(&["--finetune-epochs", "2"]),
            parse(&["--train-subset", "1000"]),
            parse(&["--rate", "0.3"]),
            parse(&["--lr", "0.01"]),
            parse(&["--max-steps", "1"]),
        ] {
            assert!(finished_run(&dir, &other.protocol()).is_none(), "{}", other.protocol());
            // A grid with other settings (a smoke grid, say) never replaces a finished run silently.
            let e = reusable_run(&dir, &other.protocol(), false).unwrap_err().to_string();
            assert!(e.contains("other settings") && e.contains("--overwrite"), "{e}");
            assert!(reusable_run(&dir, &other.protocol(), true).unwrap().is_none());
        }
        assert!(reusable_run(&dir.join("never-run"), &base.protocol(), false).unwrap().is_none());
        let mut other_base = base.clone();
        other_base.base = "runs/b".into();
        assert!(finished_run(&dir, &other_base.protocol()).is_none());
        // A summary written before the protocol was recorded is never reused.
        let mut old = serde_json::to_value(report(String::new())).unwrap();
        old.as_object_mut().unwrap().remove("protocol");
        write(serde_json::json!({ "pruning": old }));
        assert!(finished_run(&dir, &base.protocol()).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn invalid_flags_are_named() {
        let parse = |a: &[&str]| W::try_parse_from(std::iter::once("prune").chain(a.iter().copied())).map(|w| w.c);
        assert!(parse(&["run", "--method", "l1"]).is_err(), "--base is required");
        let PruneCommand::Run(mut a) = parse(&["run", "--method", "l2", "--base", "/nonexistent"]).unwrap() else {
            panic!("not a run")
        };
        let e = format!("{:#}", run_one(&a).unwrap_err());
        assert!(e.contains("unknown pruning method `l2`") && e.contains("scop"), "{e}");
        a.method = "l1".into();
        let e = format!("{:#}", run_one(&a).unwrap_err());
        assert!(e.contains("/nonexistent") && e.contains("config.json"), "{e}");
        a.common.rate = 1.5;
        let dir = std::env::temp_dir().join(format!("cv-prune-flags-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = TrainConfig::new("resnet20", "mnist", 1, &dir);
        std::fs::write(dir.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
        a.common.base = dir.clone();
        let e = format!("{:#}", run_one(&a).unwrap_err());
        assert!(e.contains("--rate"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
