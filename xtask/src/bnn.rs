//! bnn-core commands: train binary nn-core backbones with a chosen quantizer, fine-tune with
//! LNS, train BiMLP; each writes `runs/<name>/summary.json` (nn-core's schema plus `method`
//! and the binary counts) and a section of `docs/results/bnn-core.md`.

use crate::cli::DataArgs;
use crate::grid::{covers_all, seeded_section};
use anyhow::{bail, Context, Result};
use bnn_core::{BiMlp, BiMlpConfig, BinaryConfig, BinaryCounts, BinaryFactory, FdaCallback, LnsCallback, LnsRegistry};
use clap::{Args, Subcommand};
use nn_core::experiment::{standard_data, summary_markdown, StandardData};
use nn_core::models::{create_model, MODEL_NAMES};
use nn_core::train::{Callback, Checkpoint, OptimizerConfig, Schedule, TrainConfig, TrainSummary, Trainer};
use nn_core::{Model, VarStore};
use std::path::PathBuf;

const RESULTS: &str = "docs/results/bnn-core.md";

#[derive(Subcommand, Debug, Clone)]
pub enum BnnCommand {
    /// Train a binary nn-core backbone (default binary ResNet-20) with a quantizer.
    Train(TrainArgs),
    /// Fine-tune a trained binary network (a `bnn train` run directory) with or without LNS.
    Lns(LnsArgs),
    /// Train a BiMLP (or its plain ablation).
    Bimlp(BimlpArgs),
    /// Experiment A: every quantizer x every seed on the same budget (finished runs are
    /// skipped, so the grid resumes), then the mean +- std table in docs/results/bnn-core.md.
    ExpA(ExpAArgs),
    /// Experiment C: the small BiMLP against its plain ablation (no multi-branch blocks, no
    /// universal shortcuts) and a binary ResNet-20 over seeds on one budget (finished runs are
    /// skipped), then accuracy and OPs side by side in docs/results/bnn-core.md.
    ExpC(ExpCArgs),
    /// Experiment B: per seed, an STE binary network trained from scratch, then fine-tuned for
    /// the same budget with and without LNS (finished runs are skipped), then the table.
    ExpB(ExpBArgs),
    /// Binary GEMM (bit-packed XNOR-popcount) vs candle f32 matmul, 1 and 2 threads.
    BenchGemm(crate::bnn_deploy::BenchGemmArgs),
    /// Export a trained binary ResNet run to the packed inference engine's file format.
    Export(crate::bnn_deploy::ExportArgs),
    /// Run a packed model file on a test set, checking it against the candle model.
    Infer(crate::bnn_deploy::InferArgs),
    /// End-to-end images/s and peak memory: packed engine vs candle binary vs float.
    BenchDeploy(crate::bnn_deploy::BenchDeployArgs),
    /// Internal: peak memory of one forward pass (used by bench-deploy).
    #[command(hide = true)]
    MemProbe(crate::bnn_deploy::MemProbeArgs),
    /// Run a paper-protocol preset (`cargo xtask bnn preset --list` names them); flags given
    /// here override the preset's values.
    Preset(PresetArgs),
}

/// A paper's own training protocol, runnable given its data (CIFAR-10 is on this machine;
/// ImageNet is read from `imagenet/{train,val}/<class>/` in a data root).
#[derive(Debug, Clone, Copy)]
pub struct BnnPreset {
    pub name: &'static str,
    pub about: &'static str,
    /// An nn-core backbone name, or a BiMLP variant (`bimlp-s`, `bimlp-m`, ...).
    pub model: &'static str,
    pub quantizer: &'static str,
    pub dataset: &'static str,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub adamw: bool,
    pub nesterov: bool,
}

/// Paper protocols. CIFAR-10 and ImageNet ResNets follow the IR-Net training scripts that the
/// binary-network code of FDA's authors starts from (SGD momentum 0.9, cosine to 0: CIFAR-10 400
/// epochs, batch 128, lr 0.1, wd 1e-4; ImageNet 120 epochs, batch 256, lr 0.1, wd 1e-5). BiMLP
/// on ImageNet uses the ReActNet-style recipe of binary MLPs (Adam(W) lr 5e-4, batch 256, 256
/// epochs, no weight decay on the binary model); these are our reading of the papers and are all
/// overridable.
pub const BNN_PRESETS: &[BnnPreset] = &[
    BnnPreset {
        name: "fda-cifar10-resnet20",
        about: "FDA (+ noise adaptation) binary ResNet-20, CIFAR-10, 400 epochs (paper: 86.2%)",
        model: "resnet20",
        quantizer: "fda-noise",
        dataset: "cifar10",
        epochs: 400,
        batch_size: 128,
        lr: 0.1,
        weight_decay: 1e-4,
        adamw: false,
        nesterov: false,
    },
    BnnPreset {
        name: "fda-cifar10-vgg-small",
        about: "FDA (+ noise adaptation) binary VGG-small, CIFAR-10, 400 epochs (paper: 92.5%)",
        model: "vgg-small",
        quantizer: "fda-noise",
        dataset: "cifar10",
        epochs: 400,
        batch_size: 128,
        lr: 0.1,
        weight_decay: 1e-4,
        adamw: false,
        nesterov: false,
    },
    BnnPreset {
        name: "ste-cifar10-resnet20",
        about: "STE binary ResNet-20, CIFAR-10, 400 epochs (the baseline FDA and LNS start from)",
        model: "resnet20",
        quantizer: "ste",
        dataset: "cifar10",
        epochs: 400,
        batch_size: 128,
        lr: 0.1,
        weight_decay: 1e-4,
        adamw: false,
        nesterov: false,
    },
    BnnPreset {
        name: "fda-imagenet-resnet18",
        about: "FDA (+ noise adaptation) binary ResNet-18, ImageNet, 120 epochs, batch 256",
        model: "resnet18",
        quantizer: "fda-noise",
        dataset: "imagenet",
        epochs: 120,
        batch_size: 256,
        lr: 0.1,
        weight_decay: 1e-5,
        adamw: false,
        nesterov: false,
    },
    BnnPreset {
        name: "bimlp-imagenet-s",
        about: "BiMLP-S ([2,2,4,2], 64-128-320-512), ImageNet 224x224, AdamW 5e-4, 256 epochs",
        model: "bimlp-s",
        quantizer: "approxsign",
        dataset: "imagenet",
        epochs: 256,
        batch_size: 256,
        lr: 5e-4,
        weight_decay: 0.0,
        adamw: true,
        nesterov: false,
    },
    BnnPreset {
        name: "bimlp-imagenet-m",
        about: "BiMLP-M ([2,3,10,3]), ImageNet 224x224, AdamW 5e-4, 256 epochs",
        model: "bimlp-m",
        quantizer: "approxsign",
        dataset: "imagenet",
        epochs: 256,
        batch_size: 256,
        lr: 5e-4,
        weight_decay: 0.0,
        adamw: true,
        nesterov: false,
    },
];

/// Options of `cargo xtask bnn preset`.
#[derive(Args, Debug, Clone)]
pub struct PresetArgs {
    /// Preset name (see --list).
    #[arg(required_unless_present = "list")]
    pub name: Option<String>,
    /// List the presets and exit.
    #[arg(long)]
    pub list: bool,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Stop after this many optimizer steps (a smoke run: no results table is written).
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub quiet: bool,
}

/// Options of `cargo xtask bnn exp-a`.
#[derive(Args, Debug, Clone)]
pub struct ExpAArgs {
    #[arg(long, default_value = "resnet20")]
    pub model: String,
    /// Methods to compare (float is the full-precision upper line).
    #[arg(long, value_delimiter = ',', default_value = EXP_A_METHODS)]
    pub methods: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// Prefix of the run directories (runs/<prefix>-<method>-s<seed>).
    #[arg(long, default_value = "bnn-exp-a")]
    pub prefix: String,
    /// Directory that holds the run directories.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    #[command(flatten)]
    pub common: Common,
}

/// Options of `cargo xtask bnn exp-b`.
#[derive(Args, Debug, Clone)]
pub struct ExpBArgs {
    #[arg(long, default_value = "resnet20")]
    pub model: String,
    /// Epochs of the STE pretraining of each seed's base network (default: --epochs).
    #[arg(long)]
    pub pretrain_epochs: Option<usize>,
    /// Flip rate of the noisy labels sign(W*).
    #[arg(long, default_value_t = 0.1)]
    pub rho: f64,
    /// Weight of the LNS loss.
    #[arg(long, default_value_t = 1.0)]
    pub lambda: f64,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// Prefix of the run directories (<runs-dir>/<prefix>-<dataset>-{ste,finetune,lns}-s<seed>).
    #[arg(long, default_value = "bnn-exp-b")]
    pub prefix: String,
    /// Prefix of the STE base runs (<runs-dir>/<base-prefix>-<dataset>-ste-s<seed>; default:
    /// --prefix). Experiment A's STE runs can serve: `--base-prefix bnn-exp-a-e6` with the same
    /// budget reuses them instead of training the bases again (a finished base is never retrained).
    #[arg(long)]
    pub base_prefix: Option<String>,
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    #[command(flatten)]
    pub common: Common,
}

/// Options of `cargo xtask bnn exp-c`.
#[derive(Args, Debug, Clone)]
pub struct ExpCArgs {
    /// BiMLP variants (`bimlp-small`, `bimlp-small-plain`, ...) or nn-core backbones trained
    /// binary with the same quantizer (`resnet20`, ...).
    #[arg(long, value_delimiter = ',', default_value = EXP_C_MODELS)]
    pub models: Vec<String>,
    /// Quantizer of every model: ste, approxsign, fda, fda-noise.
    #[arg(long, default_value = "ste")]
    pub quantizer: String,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// Prefix of the run directories (<runs-dir>/<prefix>-<dataset>-<model>-s<seed>).
    #[arg(long, default_value = "bnn-exp-c")]
    pub prefix: String,
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    #[command(flatten)]
    pub common: Common,
}

/// Options shared by every bnn run.
#[derive(Args, Debug, Clone)]
pub struct Common {
    #[arg(long, default_value = "cifar10")]
    pub dataset: String,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// SGD (momentum 0.9, Nesterov) base learning rate, cosine schedule.
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Use AdamW instead of SGD.
    #[arg(long)]
    pub adamw: bool,
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub quiet: bool,
    /// Plain momentum instead of Nesterov (SGD).
    #[arg(long)]
    pub no_nesterov: bool,
    /// Stop after this many optimizer steps (a smoke run: writes runs/<name>/ but no results
    /// table, since a partial run is not a result).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Markdown page (relative to the workspace root) that receives the results table.
    #[arg(long, default_value = RESULTS)]
    pub results: String,
}

/// Options of `cargo xtask bnn train`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Any nn-core model (resnet20, resnet18, vgg-small, ...); `float` quantizer trains it in
    /// full precision (the upper line).
    #[arg(long, default_value = "resnet20")]
    pub model: String,
    /// ste, approxsign, fda, fda-noise, or float.
    #[arg(long, default_value = "fda")]
    pub quantizer: String,
    #[command(flatten)]
    pub common: Common,
}

/// Options of `cargo xtask bnn lns`.
#[derive(Args, Debug, Clone)]
pub struct LnsArgs {
    /// Run directory of the pretrained binary network (`bnn train`, e.g. with --quantizer ste).
    #[arg(long)]
    pub from: PathBuf,
    /// Fine-tune without the LNS term (the baseline of experiment B).
    #[arg(long)]
    pub no_lns: bool,
    /// Flip rate of the noisy labels sign(W*).
    #[arg(long, default_value_t = 0.1)]
    pub rho: f64,
    /// Weight of the LNS loss.
    #[arg(long, default_value_t = 1.0)]
    pub lambda: f64,
    #[command(flatten)]
    pub common: Common,
}

/// Options of `cargo xtask bnn bimlp`.
#[derive(Args, Debug, Clone)]
pub struct BimlpArgs {
    /// bimlp-small, bimlp-s, bimlp-m, each optionally with -plain (the ablation).
    #[arg(long, default_value = "bimlp-small")]
    pub variant: String,
    /// ste, approxsign, fda, fda-noise.
    #[arg(long, default_value = "ste")]
    pub quantizer: String,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(cmd: BnnCommand) -> Result<()> {
    match cmd {
        BnnCommand::Train(a) => train(a),
        BnnCommand::Lns(a) => lns(a),
        BnnCommand::Bimlp(a) => bimlp(a),
        BnnCommand::ExpA(a) => exp_a(a),
        BnnCommand::ExpC(a) => exp_c(a),
        BnnCommand::ExpB(a) => exp_b(a),
        BnnCommand::Preset(a) => preset(a),
        BnnCommand::BenchGemm(a) => crate::bnn_deploy::bench_gemm(a),
        BnnCommand::Export(a) => crate::bnn_deploy::export_cmd(a),
        BnnCommand::Infer(a) => crate::bnn_deploy::infer(a),
        BnnCommand::BenchDeploy(a) => crate::bnn_deploy::bench_deploy(a),
        BnnCommand::MemProbe(a) => crate::bnn_deploy::mem_probe(a),
    }
}

fn find_preset(name: &str) -> Result<&'static BnnPreset> {
    BNN_PRESETS.iter().find(|p| p.name == name).with_context(|| {
        format!(
            "unknown bnn preset `{name}`; valid presets: {}",
            BNN_PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
        )
    })
}

/// The `train`/`bimlp` invocation a preset stands for, with the overrides applied.
fn preset_common(p: &BnnPreset, a: &PresetArgs) -> Common {
    Common {
        dataset: p.dataset.into(),
        epochs: a.epochs.unwrap_or(p.epochs),
        seed: a.seed,
        batch_size: a.batch_size.unwrap_or(p.batch_size),
        lr: a.lr.unwrap_or(p.lr),
        weight_decay: p.weight_decay,
        adamw: p.adamw,
        data: a.data.clone(),
        out: a.out.clone(),
        overwrite: a.overwrite,
        resume: a.resume,
        quiet: a.quiet,
        no_nesterov: !p.nesterov,
        max_steps: a.max_steps,
        results: RESULTS.into(),
    }
}

fn preset(a: PresetArgs) -> Result<()> {
    if a.list {
        println!("bnn presets (cargo xtask bnn preset NAME):");
        for p in BNN_PRESETS {
            println!("  {:<24} {}", p.name, p.about);
        }
        return Ok(());
    }
    let p = find_preset(a.name.as_deref().unwrap_or_default())?;
    let common = preset_common(p, &a);
    if p.model.starts_with("bimlp") {
        bimlp(BimlpArgs {
            variant: p.model.into(),
            quantizer: p.quantizer.into(),
            common,
        })
    } else {
        train(TrainArgs {
            model: p.model.into(),
            quantizer: p.quantizer.into(),
            common,
        })
    }
}

fn data(c: &Common) -> Result<StandardData> {
    if c.epochs == 0 || c.batch_size < 2 {
        bail!("--epochs must be >= 1 and --batch-size >= 2");
    }
    standard_data(&c.data.spec(&c.dataset, c.batch_size, c.seed))
}

fn config(c: &Common, model: &str, out: &PathBuf) -> TrainConfig {
    let mut cfg = TrainConfig::new(model, &c.dataset, c.epochs, out);
    cfg.batch_size = c.batch_size;
    cfg.seed = c.seed;
    cfg.optimizer = if c.adamw {
        OptimizerConfig::adamw(c.lr, c.weight_decay)
    } else {
        let mut o = OptimizerConfig::sgd(c.lr, c.weight_decay);
        if let OptimizerConfig::Sgd { momentum, nesterov, .. } = &mut o {
            *momentum = 0.9;
            *nesterov = !c.no_nesterov;
        }
        o
    };
    cfg.schedule = Schedule::cosine(0.0);
    cfg.checkpoint_every = 200;
    cfg.overwrite = c.overwrite;
    cfg.resume = c.resume;
    cfg.quiet = c.quiet;
    cfg.stop_after_steps = c.max_steps;
    cfg.command = nn_core::report::command_line();
    cfg
}

/// Trains, then adds `method` and the binary counts to `summary.json` and writes the results
/// section.
#[allow(clippy::too_many_arguments)]
fn fit_and_report(
    c: &Common,
    d: &StandardData,
    model: &dyn Model,
    vs: &VarStore,
    method: &str,
    out: PathBuf,
    callbacks: Vec<Box<dyn Callback + '_>>,
    notes: &str,
    count_model: Option<&dyn Model>,
) -> Result<TrainSummary> {
    let mc = d.model_config;
    let (counts, _) = bnn_core::count(
        count_model.unwrap_or(model),
        (mc.in_channels, mc.image_size, mc.image_size),
        &nn_core::candle_core::Device::Cpu,
    )?;
    let cfg = config(c, model.name(), &out);
    eprintln!(
        "training {} [{method}] on {} ({} train / {} test), {} epochs, seed {}: {} float + {} binary params, OPs {:.3e}",
        model.name(),
        c.dataset,
        d.num_train,
        d.num_test,
        c.epochs,
        c.seed,
        counts.float_params,
        counts.binary_params,
        counts.ops
    );
    let mut trainer = Trainer::new(cfg, model, vs)?;
    for cb in callbacks {
        trainer.add_callback(cb);
    }
    let summary = trainer.fit(&d.train, Some(&d.test))?;
    write_summary(&out, &summary, method, &counts)?;
    let name = crate::grid::run_name(&out);
    let mut n = format!(
        "Method `{method}`. Inference counts per image: {} float params, {} binary params, FLOPs {}, BOPs {}, OPs = FLOPs + BOPs/64 = {:.4e}, packed size {:.1} KiB. {notes}",
        counts.float_params,
        counts.binary_params,
        counts.flops,
        counts.bops,
        counts.ops,
        counts.size_bytes / 1024.0
    );
    n.truncate(n.trim_end().len());
    c.data.append_subset_note(&mut n);
    if c.max_steps.is_some() {
        eprintln!(
            "smoke run (--max-steps): summary in {}/summary.json, no results table written",
            out.display()
        );
        return Ok(summary);
    }
    let page = nn_core::report::write_section(&c.results, "bnn-core results", &name, &summary_markdown(&name, &summary, n.trim()))?;
    eprintln!("summary: {}/summary.json; table: {}", out.display(), page.display());
    Ok(summary)
}

fn write_summary(out: &std::path::Path, s: &TrainSummary, method: &str, counts: &BinaryCounts) -> Result<()> {
    let mut v = serde_json::to_value(s)?;
    if let Some(m) = v.as_object_mut() {
        m.insert("method".into(), method.into());
        m.insert("binary_counts".into(), serde_json::to_value(counts)?);
    }
    let p = out.join("summary.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&v)?).with_context(|| format!("writing {}", p.display()))
}

/// The summary of the grid run in `out`: read back when a completed run of the same epochs is
/// there, otherwise trained by `run` with `common` pointed at `out` and `seed`.
fn grid_run(common: &Common, seed: u64, out: &std::path::Path, run: impl FnOnce(Common) -> Result<()>) -> Result<serde_json::Value> {
    let done = std::fs::read(out.join("summary.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter(|v| v["completed"].as_bool() == Some(true) && v["epochs"].as_u64() == Some(common.epochs as u64));
    if let Some(v) = done {
        return Ok(v);
    }
    let mut c = common.clone();
    c.seed = seed;
    c.out = Some(out.to_path_buf());
    c.overwrite = !c.resume;
    run(c)?;
    Ok(serde_json::from_slice(&std::fs::read(out.join("summary.json"))?)?)
}

fn exp_a(a: ExpAArgs) -> Result<()> {
    let mut rows = Vec::new();
    for method in &a.methods {
        let mut accs = Vec::new();
        let mut walls = Vec::new();
        for &seed in &a.seeds {
            let out = a.runs_dir.join(format!("{}-{}-{}-s{seed}", a.prefix, a.common.dataset, method));
            let v = grid_run(&a.common, seed, &out, |c| {
                train(TrainArgs {
                    model: a.model.clone(),
                    quantizer: method.clone(),
                    common: c,
                })
            })?;
            accs.push(grid_top1(&v)?);
            walls.push(v["wall_s"].as_f64().unwrap_or(0.0));
        }
        rows.push((method.clone(), accs, walls));
    }
    let stats = nn_core::experiment::mean_std;
    let c = &a.common;
    let mut t = format!(
        "## Experiment A: quantizers on binary (W1A1) {}, {}\n\nBudget: {} epochs per run, batch {}, SGD Nesterov lr {} cosine, weight decay {}{}; seeds {:?}. Mean +- sample std of the final test top-1.\n\n| method | test top-1 % (mean +- std) | per seed | mean wall s |\n|---|---|---|---|\n",
        a.model,
        c.dataset,
        c.epochs,
        c.batch_size,
        c.lr,
        c.weight_decay,
        c.data.subset_clause(),
        a.seeds
    );
    for (m, accs, walls) in &rows {
        let cell = nn_core::experiment::mean_std_cell(accs);
        t += &format!(
            "| {m} | {cell} | {} | {:.0} |\n",
            accs.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", "),
            stats(walls).0
        );
    }
    let mut ranked: Vec<_> = rows
        .iter()
        .filter(|r| r.0 != "float")
        .map(|r| (r.0.clone(), stats(&r.1).0))
        .collect();
    ranked.sort_by(|x, y| y.1.total_cmp(&x.1));
    t += &format!(
        "\nRanking of the binary methods in this run: {}. The paper's claim is FDA > ApproxSign > STE (400 epochs, full CIFAR-10).\n\n```\n{}\n```\n",
        ranked.iter().map(|r| format!("{} ({:.2})", r.0, r.1)).collect::<Vec<_>>().join(" > "),
        nn_core::report::command_line()
    );
    println!("{t}");
    if c.max_steps.is_some() {
        eprintln!("partial runs (--max-steps): table printed, not written");
        return Ok(());
    }
    let Some(key) = exp_a_section(&a) else {
        eprintln!(
            "--methods {} leaves out some of {EXP_A_METHODS}: table printed, not written to {} (the experiment's table compares every method; a grid split over processes by --methods writes it when rerun with all of them)",
            a.methods.join(","),
            c.results
        );
        return Ok(());
    };
    let page = nn_core::report::write_section(&c.results, "bnn-core results", &key, &t)?;
    eprintln!("table: {} (section {key})", page.display());
    Ok(())
}

/// Experiment C's models (the default of `--models`).
const EXP_C_MODELS: &str = "bimlp-small,bimlp-small-plain,resnet20";

/// Experiment A's methods (the default of `--methods`).
const EXP_A_METHODS: &str = "float,ste,approxsign,fda,fda-noise";

/// The results section of an experiment A grid: `<prefix>-<dataset>` for the default seeds,
/// `<prefix>-<dataset>-seeds-<list>` for another seed set (so a grid over one seed does not
/// replace the table of three), `None` for a grid that leaves out some of the methods.
fn exp_a_section(a: &ExpAArgs) -> Option<String> {
    if !covers_all(EXP_A_METHODS, &a.methods) {
        return None;
    }
    Some(seeded_section(&format!("{}-{}", a.prefix, a.common.dataset), &a.seeds))
}

/// Test top-1 of a grid run's summary: required of a completed run, NaN for a stopped
/// (`--max-steps`) one, which has none.
fn grid_top1(v: &serde_json::Value) -> Result<f64> {
    let acc = v["test_top1"].as_f64();
    if v["completed"].as_bool() == Some(true) {
        acc.context("summary without test_top1")
    } else {
        Ok(acc.unwrap_or(f64::NAN))
    }
}

fn exp_b(a: ExpBArgs) -> Result<()> {
    let c = &a.common;
    let mut pre = c.clone();
    pre.epochs = a.pretrain_epochs.unwrap_or(c.epochs);
    let stats = nn_core::experiment::mean_std;
    let mut rows: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
        ("ste (pretrained base)", vec![], vec![]),
        ("finetune", vec![], vec![]),
        ("lns", vec![], vec![]),
    ];
    let mut complete = true;
    for &seed in &a.seeds {
        let run = |tag: &str| a.runs_dir.join(format!("{}-{}-{tag}-s{seed}", a.prefix, c.dataset));
        let base_prefix = a.base_prefix.as_deref().unwrap_or(&a.prefix);
        let base = a.runs_dir.join(format!("{base_prefix}-{}-ste-s{seed}", c.dataset));
        let mut vs = vec![grid_run(&pre, seed, &base, |common| {
            train(TrainArgs {
                model: a.model.clone(),
                quantizer: "ste".into(),
                common,
            })
        })?];
        for no_lns in [true, false] {
            let out = run(if no_lns { "finetune" } else { "lns" });
            vs.push(grid_run(c, seed, &out, |common| {
                lns(LnsArgs {
                    from: base.clone(),
                    no_lns,
                    rho: a.rho,
                    lambda: a.lambda,
                    common,
                })
            })?);
        }
        for (row, v) in rows.iter_mut().zip(&vs) {
            complete &= v["completed"].as_bool() == Some(true);
            row.1.push(grid_top1(v)?);
            row.2.push(v["wall_s"].as_f64().unwrap_or(0.0));
        }
    }
    let mut t = format!(
        "## Experiment B: LNS on binary {}, {}\n\nPer seed: an STE binary network trained for {} epochs (run `{}-{}-ste-s<seed>`), then fine-tuned from it for {} epochs (batch {}, {} lr {} cosine, weight decay {}{}) without LNS (`finetune`) and with LNS (rho {}, lambda {}); seeds {:?}. Mean +- sample std of the final test top-1.\n\n| run | test top-1 % (mean +- std) | per seed | mean wall s |\n|---|---|---|---|\n",
        a.model,
        c.dataset,
        pre.epochs,
        a.base_prefix.as_deref().unwrap_or(&a.prefix),
        c.dataset,
        c.epochs,
        c.batch_size,
        if c.adamw { "AdamW" } else { "SGD Nesterov" },
        c.lr,
        c.weight_decay,
        c.data.subset_clause(),
        a.rho,
        a.lambda,
        a.seeds
    );
    for (name, accs, walls) in &rows {
        let cell = nn_core::experiment::mean_std_cell(accs);
        t += &format!(
            "| {name} | {cell} | {} | {:.0} |\n",
            accs.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", "),
            stats(walls).0
        );
    }
    let claim = "The paper's claim: fine-tuning with LNS beats fine-tuning without it from the same binary network.";
    finish_grid_table(
        t,
        claim,
        complete && c.max_steps.is_none(),
        &c.results,
        &seeded_section(&format!("{}-{}", a.prefix, c.dataset), &a.seeds),
    )
}

fn exp_c(a: ExpCArgs) -> Result<()> {
    let c = &a.common;
    let mut t = format!(
        "## Experiment C: BiMLP vs its plain ablation vs binary ResNet-20, {}\n\nBudget: {} epochs per run, batch {}, {} lr {} cosine, weight decay {}{}; quantizer `{}`; seeds {:?}. Mean +- sample std of the final test top-1; counts per image at inference (OPs = FLOPs + BOPs/64).\n\n| model | test top-1 % (mean +- std) | per seed | binary params | float params | OPs | mean wall s |\n|---|---|---|---|---|---|---|\n",
        c.dataset,
        c.epochs,
        c.batch_size,
        if c.adamw { "AdamW" } else { "SGD Nesterov" },
        c.lr,
        c.weight_decay,
        c.data.subset_clause(),
        a.quantizer,
        a.seeds
    );
    let stats = nn_core::experiment::mean_std;
    let mut complete = true;
    for model in &a.models {
        let (mut accs, mut walls, mut counts) = (Vec::new(), Vec::new(), serde_json::Value::Null);
        for &seed in &a.seeds {
            let out = a.runs_dir.join(format!("{}-{}-{}-s{seed}", a.prefix, c.dataset, model));
            let v = grid_run(c, seed, &out, |common| {
                if model.starts_with("bimlp") {
                    bimlp(BimlpArgs {
                        variant: model.clone(),
                        quantizer: a.quantizer.clone(),
                        common,
                    })
                } else {
                    train(TrainArgs {
                        model: model.clone(),
                        quantizer: a.quantizer.clone(),
                        common,
                    })
                }
            })?;
            complete &= v["completed"].as_bool() == Some(true);
            accs.push(grid_top1(&v)?);
            walls.push(v["wall_s"].as_f64().unwrap_or(0.0));
            counts = v["binary_counts"].clone();
        }
        let cell = nn_core::experiment::mean_std_cell(&accs);
        t += &format!(
            "| {model} | {cell} | {} | {} | {} | {:.4e} | {:.0} |\n",
            accs.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", "),
            counts["binary_params"],
            counts["float_params"],
            counts["ops"].as_f64().unwrap_or(f64::NAN),
            stats(&walls).0
        );
    }
    let claim = "The paper's ablation claim: the multi-branch blocks and universal shortcuts raise the accuracy of the binary MLP at almost the same OPs.";
    // another model list gets its own section too (a grid split over processes by --models)
    let mut base = format!("{}-{}", a.prefix, c.dataset);
    if a.models.join(",") != EXP_C_MODELS {
        base += &format!("-models-{}", a.models.join("-"));
    }
    finish_grid_table(
        t,
        claim,
        complete && c.max_steps.is_none(),
        &c.results,
        &seeded_section(&base, &a.seeds),
    )
}

/// Appends the paper's claim and the command to a grid's table, prints it and, when every run
/// completed, writes it into the results page as section `key` (partial runs are not results).
fn finish_grid_table(mut t: String, claim: &str, complete: bool, results: &str, key: &str) -> Result<()> {
    t += &format!("\n{claim}\n\n```\n{}\n```\n", nn_core::report::command_line());
    println!("{t}");
    if !complete {
        eprintln!("partial runs (--max-steps): table printed, not written");
        return Ok(());
    }
    let page = nn_core::report::write_section(results, "bnn-core results", key, &t)?;
    eprintln!("table: {}", page.display());
    Ok(())
}

pub(crate) fn train(a: TrainArgs) -> Result<()> {
    if !MODEL_NAMES.iter().any(|(n, _)| *n == a.model) {
        bail!(
            "unknown model `{}`; valid: {}",
            a.model,
            MODEL_NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        );
    }
    let c = &a.common;
    if a.quantizer != "float" {
        BinaryConfig::from_method(&a.quantizer)?;
    }
    let d = data(c)?;
    let vs = VarStore::new(c.seed, &nn_core::candle_core::Device::Cpu);
    let out = c
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/bnn-{}-{}-{}-s{}", a.model, a.quantizer, c.dataset, c.seed)));
    if a.quantizer == "float" {
        let m = create_model(&a.model, &d.model_config, &vs.root(), &nn_core::StandardFactory)?;
        fit_and_report(c, &d, m.as_ref(), &vs, "float", out, Vec::new(), "Full-precision upper line.", None)?;
        return Ok(());
    }
    let f = BinaryFactory::new(BinaryConfig::from_method(&a.quantizer)?);
    let m = create_model(&a.model, &d.model_config, &vs.root(), &f)?;
    let cb: Vec<Box<dyn Callback>> = vec![Box::new(FdaCallback { control: f.control() })];
    let note = format!("Binary factory config: {:?}.", f.config);
    fit_and_report(c, &d, m.as_ref(), &vs, &f.config.method(), out, cb, &note, None)?;
    Ok(())
}

fn lns(a: LnsArgs) -> Result<()> {
    let c = &a.common;
    let cfg_path = a.from.join("config.json");
    let pre: TrainConfig =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?)
            .with_context(|| format!("parsing {}", cfg_path.display()))?;
    let summary_path = a.from.join("summary.json");
    let method = std::fs::read_to_string(&summary_path)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["method"].as_str().map(String::from))
        .unwrap_or_else(|| "ste".into());
    let d = data(c)?;
    let vs = VarStore::new(c.seed, &nn_core::candle_core::Device::Cpu);
    let reg = LnsRegistry::new();
    let mut f = BinaryFactory::new(BinaryConfig::from_method(&method)?);
    if !a.no_lns {
        f = f.with_lns(reg.clone());
    }
    let m = create_model(&pre.model, &d.model_config, &vs.root(), &f)?;
    let ck = Checkpoint::load(&a.from.join(nn_core::train::trainer::CHECKPOINT_FILE))?;
    // the pretrained network has no mapping networks: load what it has
    vs.load_tensors(&ck.model, false)?;
    reg.set_labels_from_weights()?;
    let tag = if a.no_lns { "finetune" } else { "lns" };
    let out = c
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/bnn-{}-{tag}-{}-s{}", pre.model, c.dataset, c.seed)));
    let mut cbs: Vec<Box<dyn Callback>> = vec![Box::new(FdaCallback { control: f.control() })];
    if !a.no_lns {
        cbs.push(Box::new(LnsCallback {
            registry: reg.clone(),
            lambda: a.lambda,
            rho: a.rho,
        }));
    }
    let note = format!(
        "Fine-tuned from {} ({} layers with mapping networks, rho {}, lambda {}).",
        a.from.display(),
        reg.len(),
        a.rho,
        a.lambda
    );
    // the mapping networks are training-only (inference stores sign(f(W))): count without them
    let vs_count = VarStore::new(c.seed, &nn_core::candle_core::Device::Cpu);
    let plain = BinaryFactory::new(BinaryConfig::from_method(&method)?);
    let m_count = create_model(&pre.model, &d.model_config, &vs_count.root(), &plain)?;
    fit_and_report(
        c,
        &d,
        m.as_ref(),
        &vs,
        &format!("{method}+{tag}"),
        out,
        cbs,
        &note,
        Some(m_count.as_ref()),
    )?;
    Ok(())
}

fn bimlp(a: BimlpArgs) -> Result<()> {
    let c = &a.common;
    let bc = BiMlpConfig::by_name(&a.variant)?;
    let d = data(c)?;
    let vs = VarStore::new(c.seed, &nn_core::candle_core::Device::Cpu);
    let f = BinaryFactory::new(BinaryConfig::from_method(&a.quantizer)?);
    let m = BiMlp::new(&vs.root(), &d.model_config, &bc, &f)?;
    let out = c
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/bnn-{}-{}-{}-s{}", a.variant, a.quantizer, c.dataset, c.seed)));
    let cb: Vec<Box<dyn Callback>> = vec![Box::new(FdaCallback { control: f.control() })];
    fit_and_report(c, &d, &m, &vs, &f.config.method(), out, cb, &format!("BiMLP config: {bc:?}."), None)?;
    Ok(())
}

/// The binary row of `cargo xtask demo`: LeNet-5-BN with FDA (+ noise adaptation) binary
/// layers on the embedded MNIST, next to the full-precision row.
pub fn demo_row(epochs: usize, seed: u64) -> Result<f64> {
    let common = Common {
        dataset: "mnist".into(),
        epochs,
        seed,
        batch_size: 128,
        lr: 0.1,
        weight_decay: 5e-4,
        adamw: false,
        data: DataArgs::default(),
        out: Some(PathBuf::from("runs/demo-bnn-lenet5-mnist")),
        overwrite: true,
        resume: false,
        quiet: false,
        no_nesterov: false,
        max_steps: None,
        results: "docs/results/demo.md".into(),
    };
    let out = common.out.clone().unwrap_or_default();
    train(TrainArgs {
        model: "lenet5-bn".into(),
        quantizer: "fda-noise".into(),
        common,
    })?;
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json"))?)?;
    v["test_top1"].as_f64().context("demo summary without test_top1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_files::{temp_dir, write_cifar10, write_imagenet};
    use clap::Parser;

    #[derive(Parser)]
    struct W {
        #[command(subcommand)]
        c: BnnCommand,
    }

    fn parse(a: &[&str]) -> std::result::Result<BnnCommand, clap::Error> {
        W::try_parse_from(std::iter::once("bnn").chain(a.iter().copied())).map(|w| w.c)
    }

    /// A grid command `cmd` as a smoke run: MNIST subsets, one seed, one step per run, run
    /// directories under `dir`.
    fn smoke(cmd: &str, dir: &std::path::Path, extra: &[&str]) -> BnnCommand {
        let dir = dir.to_string_lossy().to_string();
        let mut argv = vec![cmd, "--dataset", "mnist", "--seeds", "0", "--batch-size", "4"];
        argv.extend([
            "--train-subset",
            "40",
            "--test-subset",
            "20",
            "--max-steps",
            "1",
            "--quiet",
            "--runs-dir",
            &dir,
        ]);
        argv.extend_from_slice(extra);
        parse(&argv).unwrap()
    }

    #[test]
    fn exp_a_runs_every_method_and_a_smoke_grid_writes_no_table() {
        let dir = temp_dir("bnn-exp-a");
        let results = dir.join("results.md");
        let r = results.to_string_lossy().to_string();
        let BnnCommand::ExpA(a) = smoke(
            "exp-a",
            &dir,
            &["--model", "lenet5-bn", "--methods", "float,ste,fda", "--results", &r],
        ) else {
            panic!("not exp-a")
        };
        exp_a(a).unwrap();
        for m in ["float", "ste", "fda"] {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join(format!("bnn-exp-a-mnist-{m}-s0/summary.json"))).unwrap()).unwrap();
            assert_eq!(v["completed"].as_bool(), Some(false), "{m}: a 1-step run is not complete");
        }
        // per-run sections and no grid table: a partial grid is not a result
        let page = std::fs::read_to_string(&results).unwrap_or_default();
        assert!(!page.contains("begin bnn-exp-a-mnist -->"), "{page}");
    }

    #[test]
    fn exp_a_table_goes_to_a_section_only_for_every_method_and_is_keyed_by_seeds() {
        let args = |extra: &[&str]| {
            let mut argv = vec!["exp-a", "--dataset", "mnist"];
            argv.extend_from_slice(extra);
            let BnnCommand::ExpA(a) = parse(&argv).unwrap() else {
                panic!("not exp-a")
            };
            a
        };
        assert_eq!(exp_a_section(&args(&[])).as_deref(), Some("bnn-exp-a-mnist"));
        assert_eq!(exp_a_section(&args(&["--seeds", "2"])).as_deref(), Some("bnn-exp-a-mnist-seeds-2"));
        assert_eq!(
            exp_a_section(&args(&["--seeds", "0,1"])).as_deref(),
            Some("bnn-exp-a-mnist-seeds-0-1")
        );
        // a grid split over processes by --methods does not write (and so cannot replace) the table
        assert_eq!(exp_a_section(&args(&["--methods", "fda,fda-noise"])), None);
        assert_eq!(
            exp_a_section(&args(&["--methods", "fda-noise,fda,approxsign,ste,float"])).as_deref(),
            Some("bnn-exp-a-mnist")
        );
        assert_eq!(seeded_section("x", &[0, 1, 2]), "x");
        assert_eq!(seeded_section("x", &[3]), "x-seeds-3");
    }

    #[test]
    fn exp_b_pretrains_then_finetunes_with_and_without_lns() {
        let dir = temp_dir("bnn-exp-b");
        let BnnCommand::ExpB(a) = smoke("exp-b", &dir, &["--model", "lenet5-bn"]) else {
            panic!("not exp-b")
        };
        exp_b(a).unwrap();
        for tag in ["ste", "finetune", "lns"] {
            let p = dir.join(format!("bnn-exp-b-mnist-{tag}-s0/summary.json"));
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            assert_eq!(v["completed"].as_bool(), Some(false), "{tag}");
        }
        // fine-tuning from another experiment's STE runs: no base of its own
        let BnnCommand::ExpB(a) = smoke(
            "exp-b",
            &dir,
            &["--model", "lenet5-bn", "--prefix", "other", "--base-prefix", "bnn-exp-b"],
        ) else {
            panic!("not exp-b")
        };
        exp_b(a).unwrap();
        assert!(!dir.join("other-mnist-ste-s0").exists());
        for tag in ["finetune", "lns"] {
            assert!(dir.join(format!("other-mnist-{tag}-s0/summary.json")).exists(), "{tag}");
        }
        assert!(parse(&["exp-b", "--rho", "x"]).is_err());
    }

    #[test]
    fn exp_c_runs_every_model_and_prints_the_table() {
        let dir = temp_dir("bnn-exp-c");
        let BnnCommand::ExpC(a) = smoke("exp-c", &dir, &["--models", "bimlp-small,bimlp-small-plain,lenet5-bn"]) else {
            panic!("not exp-c")
        };
        exp_c(a).unwrap();
        for m in ["bimlp-small", "bimlp-small-plain", "lenet5-bn"] {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join(format!("bnn-exp-c-mnist-{m}-s0/summary.json"))).unwrap()).unwrap();
            assert!(v["binary_counts"]["ops"].as_f64().unwrap() > 0.0, "{m}");
            assert_eq!(v["completed"].as_bool(), Some(false), "{m}: a 1-step run is not complete");
        }
        assert!(parse(&["exp-c", "--models", "bimlp-small", "--seeds", "x"]).is_err());
    }

    #[test]
    fn preset_flags_parse_and_unknown_names_list_the_valid_ones() {
        assert!(matches!(
            parse(&["preset", "--list"]).unwrap(),
            BnnCommand::Preset(PresetArgs { list: true, .. })
        ));
        assert!(parse(&["preset"]).is_err(), "a preset name (or --list) is required");
        assert!(parse(&["preset", "fda-cifar10-resnet20", "--epochs", "x"]).is_err());
        let e = format!("{:#}", find_preset("fda-cifar10-resnet21").unwrap_err());
        assert!(e.contains("valid presets: fda-cifar10-resnet20"), "{e}");
        let BnnCommand::Preset(a) = parse(&["preset", "fda-cifar10-resnet20", "--epochs", "3", "--lr", "0.05"]).unwrap() else {
            panic!("not a preset command")
        };
        let c = preset_common(find_preset("fda-cifar10-resnet20").unwrap(), &a);
        assert_eq!(
            (c.epochs, c.lr, c.batch_size, c.weight_decay, c.no_nesterov),
            (3, 0.05, 128, 1e-4, true)
        );
        // every preset names a model, quantizer and dataset the runners accept
        for p in BNN_PRESETS {
            BinaryConfig::from_method(p.quantizer).unwrap();
            if p.model.starts_with("bimlp") {
                BiMlpConfig::by_name(p.model).unwrap();
            } else {
                assert!(MODEL_NAMES.iter().any(|(n, _)| *n == p.model), "{}", p.name);
            }
            nn_core::data::registry::info(p.dataset).unwrap();
        }
    }

    #[test]
    fn train_flags_are_checked() {
        assert!(parse(&["train", "--quantizer", "fda", "--epochs", "1"]).is_ok());
        assert!(parse(&["train", "--batch-size", "-3"]).is_err());
        let c = |a: &[&str]| match parse(a).unwrap() {
            BnnCommand::Train(t) => t,
            _ => panic!(),
        };
        let e = format!("{:#}", train(c(&["train", "--model", "resnet21"])).unwrap_err());
        assert!(e.contains("unknown model `resnet21`") && e.contains("resnet20"), "{e}");
        let e = format!(
            "{:#}",
            train(c(&["train", "--quantizer", "fdaa", "--dataset", "mnist", "--train-subset", "20"])).unwrap_err()
        );
        assert!(e.contains("fdaa"), "{e}");
        let e = format!("{:#}", train(c(&["train", "--epochs", "0"])).unwrap_err());
        assert!(e.contains("--epochs"), "{e}");
    }

    /// Every paper preset runs one optimizer step on generated files in the official layouts.
    #[test]
    fn every_preset_runs_one_step_on_generated_files() {
        let root = temp_dir("bnn-presets");
        write_cifar10(&root, 4).unwrap();
        write_imagenet(&root, 2, 2).unwrap();
        for p in BNN_PRESETS {
            let out = root.join(format!("runs/{}", p.name));
            let a = PresetArgs {
                name: Some(p.name.into()),
                list: false,
                epochs: None,
                batch_size: Some(2),
                lr: None,
                seed: 0,
                data: DataArgs {
                    data: Some(root.clone()),
                    ..Default::default()
                },
                out: Some(out.clone()),
                max_steps: Some(1),
                overwrite: true,
                resume: false,
                quiet: true,
            };
            preset(a).unwrap_or_else(|e| panic!("preset {}: {e:#}", p.name));
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
            assert_eq!(v["epochs"].as_u64(), Some(p.epochs as u64), "{}", p.name);
            assert_eq!(v["completed"].as_bool(), Some(false), "{}: a 1-step run is not complete", p.name);
            assert_eq!(
                v["method"].as_str(),
                Some(BinaryConfig::from_method(p.quantizer).unwrap().method().as_str())
            );
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}
