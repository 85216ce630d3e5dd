//! bnn-core commands: train binary nn-core backbones with a chosen quantizer, fine-tune with
//! LNS, train BiMLP; each writes `runs/<name>/summary.json` (nn-core's schema plus `method`
//! and the binary counts) and a section of `docs/results/bnn-core.md`.

use anyhow::{bail, Context, Result};
use bnn_core::{BiMlp, BiMlpConfig, BinaryConfig, BinaryCounts, BinaryFactory, FdaCallback, LnsCallback, LnsRegistry};
use clap::{Args, Subcommand};
use nn_core::experiment::{standard_data, summary_markdown, DataSpec, StandardData};
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
}

/// Options of `cargo xtask bnn exp-a`.
#[derive(Args, Debug, Clone)]
pub struct ExpAArgs {
    #[arg(long, default_value = "resnet20")]
    pub model: String,
    /// Methods to compare (float is the full-precision upper line).
    #[arg(long, value_delimiter = ',', default_value = "float,ste,approxsign,fda,fda-noise")]
    pub methods: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// Prefix of the run directories (runs/<prefix>-<method>-s<seed>).
    #[arg(long, default_value = "bnn-exp-a")]
    pub prefix: String,
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
    #[arg(long)]
    pub train_subset: Option<usize>,
    #[arg(long)]
    pub test_subset: Option<usize>,
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub quiet: bool,
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
        BnnCommand::BenchGemm(a) => crate::bnn_deploy::bench_gemm(a),
        BnnCommand::Export(a) => crate::bnn_deploy::export_cmd(a),
        BnnCommand::Infer(a) => crate::bnn_deploy::infer(a),
        BnnCommand::BenchDeploy(a) => crate::bnn_deploy::bench_deploy(a),
        BnnCommand::MemProbe(a) => crate::bnn_deploy::mem_probe(a),
    }
}

fn data(c: &Common) -> Result<StandardData> {
    if c.epochs == 0 || c.batch_size < 2 {
        bail!("--epochs must be >= 1 and --batch-size >= 2");
    }
    let mut spec = DataSpec::new(&c.dataset, c.batch_size, c.seed);
    spec.data_dir = c.data.clone();
    spec.train_subset = c.train_subset;
    spec.test_subset = c.test_subset;
    standard_data(&spec)
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
            *nesterov = true;
        }
        o
    };
    cfg.schedule = Schedule::cosine(0.0);
    cfg.checkpoint_every = 200;
    cfg.overwrite = c.overwrite;
    cfg.resume = c.resume;
    cfg.quiet = c.quiet;
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
    let name = out
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "run".into());
    let mut n = format!(
        "Method `{method}`. Inference counts per image: {} float params, {} binary params, FLOPs {}, BOPs {}, OPs = FLOPs + BOPs/64 = {:.4e}, packed size {:.1} KiB. {notes}",
        counts.float_params,
        counts.binary_params,
        counts.flops,
        counts.bops,
        counts.ops,
        counts.size_bytes / 1024.0
    );
    if let Some(k) = c.train_subset {
        n += &format!(" Class-balanced training subset of {k} images.");
    }
    if let Some(k) = c.test_subset {
        n += &format!(" Class-balanced test subset of {k} images.");
    }
    let page = nn_core::report::write_section(RESULTS, "bnn-core results", &name, &summary_markdown(&name, &summary, n.trim()))?;
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

fn exp_a(a: ExpAArgs) -> Result<()> {
    let mut rows = Vec::new();
    for method in &a.methods {
        let mut accs = Vec::new();
        let mut walls = Vec::new();
        for &seed in &a.seeds {
            let out = PathBuf::from(format!("runs/{}-{}-{}-s{seed}", a.prefix, a.common.dataset, method));
            let done = std::fs::read(out.join("summary.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .filter(|v| v["completed"].as_bool() == Some(true) && v["epochs"].as_u64() == Some(a.common.epochs as u64));
            let v = match done {
                Some(v) => v,
                None => {
                    let mut c = a.common.clone();
                    c.seed = seed;
                    c.out = Some(out.clone());
                    c.overwrite = !c.resume;
                    train(TrainArgs {
                        model: a.model.clone(),
                        quantizer: method.clone(),
                        common: c,
                    })?;
                    serde_json::from_slice(&std::fs::read(out.join("summary.json"))?)?
                }
            };
            accs.push(v["test_top1"].as_f64().context("summary without test_top1")?);
            walls.push(v["wall_s"].as_f64().unwrap_or(0.0));
        }
        rows.push((method.clone(), accs, walls));
    }
    let stats = |v: &[f64]| {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let sd = if v.len() > 1 {
            (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
        } else {
            0.0
        };
        (m, sd)
    };
    let c = &a.common;
    let mut t = format!(
        "## Experiment A: quantizers on binary (W1A1) {}, {}\n\nBudget: {} epochs per run, batch {}, SGD Nesterov lr {} cosine, weight decay {}{}{}; seeds {:?}. Mean +- sample std of the final test top-1.\n\n| method | test top-1 % (mean +- std) | per seed | mean wall s |\n|---|---|---|---|\n",
        a.model,
        c.dataset,
        c.epochs,
        c.batch_size,
        c.lr,
        c.weight_decay,
        c.train_subset.map_or(String::new(), |n| format!(", class-balanced training subset of {n} images")),
        c.test_subset.map_or(String::new(), |n| format!(", test subset of {n} images")),
        a.seeds
    );
    for (m, accs, walls) in &rows {
        let (mean, sd) = stats(accs);
        t += &format!(
            "| {m} | {mean:.2} +- {sd:.2} | {} | {:.0} |\n",
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
    let page = nn_core::report::write_section(RESULTS, "bnn-core results", &format!("{}-{}", a.prefix, c.dataset), &t)?;
    println!("{t}");
    eprintln!("table: {}", page.display());
    Ok(())
}

fn train(a: TrainArgs) -> Result<()> {
    if !MODEL_NAMES.iter().any(|(n, _)| *n == a.model) {
        bail!(
            "unknown model `{}`; valid: {}",
            a.model,
            MODEL_NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        );
    }
    let c = &a.common;
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
