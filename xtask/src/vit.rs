//! vit-survey-zoo commands: list the registry with exact counts, summarise a model, train the
//! CIFAR-size variants (and an nn-core CNN of similar MACs for comparison), and benchmark the
//! forward pass at 224x224 against PyTorch/timm. Results go to `docs/results/vit-survey-zoo.md`.

use crate::cli::DataArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use nn_core::candle_core::{DType, Device, Tensor};
use nn_core::experiment::{standard_data, summary_markdown, DataSpec};
use nn_core::train::{OptimizerConfig, Schedule, TrainConfig, Trainer};
use nn_core::{Model, VarStore};
use std::path::PathBuf;
use vit_survey_zoo::{create_model_with, ModelOptions, ZooModel, MODEL_NAMES};

const RESULTS: &str = "docs/results/vit-survey-zoo.md";
const TITLE: &str = "vit-survey-zoo results";

#[derive(Subcommand, Debug, Clone)]
pub enum VitCommand {
    /// Every registered model with its parameter count and MACs at its default image size
    /// (written to docs/results/vit-survey-zoo.md with the reference figures).
    List,
    /// Compare logits with timm / the official code on the files written by
    /// `python3 bench/torch/vit_survey_zoo_reference.py export DIR` (and `export-official`).
    Parity {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Parameters per top-level module and MACs of one model.
    Summary {
        #[arg(long, default_value = "vit_tiny_patch16_224")]
        model: String,
        /// Default: 32 for the `_32` variants, else 224.
        #[arg(long)]
        image_size: Option<usize>,
        #[arg(long, default_value_t = 1000)]
        num_classes: usize,
    },
    /// Train a model on CIFAR-10 (a zoo model, or an nn-core CNN such as resnet20 as the baseline).
    Train(TrainArgs),
    /// Forward images/s at 224x224 (batch 8) for ViT-Ti, Swin-T, PVTv2-B0 and TNT-S, next to
    /// PyTorch/timm when `python3` can import them.
    Bench(BenchArgs),
    /// The survey's efficiency methods on a trained ViT/DeiT (a `vit train` run's checkpoint):
    /// attention-head pruning, token pruning by class attention (EViT), int8 weight
    /// quantization; parameters, MACs, test top-1 and forward speed of each, in one table.
    Efficiency(EfficiencyArgs),
    /// One table comparing finished `vit train` runs (their summary.json): the survey's CNN vs
    /// transformer comparison at the runs' budget.
    Compare {
        /// Run directories, comma-separated.
        #[arg(long)]
        runs: String,
        /// Name of the results section.
        #[arg(long, default_value = "cifar10-cnn-vs-transformers")]
        section: String,
        #[arg(long, default_value = "")]
        note: String,
    },
}

#[derive(Args, Debug, Clone)]
pub struct EfficiencyArgs {
    #[arg(long, default_value = "vit_micro_patch4_32")]
    pub model: String,
    /// Directory of a `vit train` run of that model (reads its `checkpoint.safetensors`).
    #[arg(long)]
    pub run: PathBuf,
    #[arg(long, default_value = "cifar10")]
    pub dataset: String,
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Class-balanced test subset to measure accuracy and speed on.
    #[arg(long, default_value_t = 1000)]
    pub test_subset: usize,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Training batches (no augmentation) for the head-importance gradients.
    #[arg(long, default_value_t = 8)]
    pub importance_batches: usize,
    /// Numbers of heads to prune (comma-separated), each a separate model.
    #[arg(long, default_value = "6,12")]
    pub prune_heads: String,
    /// Blocks (0-based, comma-separated) that prune tokens.
    #[arg(long, default_value = "1,3")]
    pub token_layers: String,
    /// Keep ratios (comma-separated), each a separate setting; inattentive tokens are fused.
    #[arg(long, default_value = "0.7,0.5")]
    pub keep_ratios: String,
    /// Speed: rounds of timed passes (every model once per round), the fastest kept.
    #[arg(long, default_value_t = 5)]
    pub speed_repeats: usize,
    /// Speed: test batches per timed pass.
    #[arg(long, default_value_t = 2)]
    pub speed_batches: usize,
    #[arg(long, default_value = "")]
    pub note: String,
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    #[arg(long, default_value = "vit_micro_patch4_32")]
    pub model: String,
    #[arg(long, default_value = "cifar10")]
    pub dataset: String,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// AdamW learning rate (cosine schedule after a linear warmup) for transformers; SGD
    /// (momentum 0.9, Nesterov) with `--sgd`.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub warmup_epochs: f64,
    #[arg(long)]
    pub sgd: bool,
    #[arg(long, default_value_t = 0.1)]
    pub drop_path: f64,
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long)]
    pub quiet: bool,
    /// Stop after this many steps (a smoke run: no results table).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Free text added to the results section (e.g. the time budget).
    /// Speed: rounds of timed passes (every model once per round), the fastest kept.
    #[arg(long, default_value_t = 5)]
    pub speed_repeats: usize,
    /// Speed: test batches per timed pass.
    #[arg(long, default_value_t = 2)]
    pub speed_batches: usize,
    #[arg(long, default_value = "")]
    pub note: String,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[arg(long, default_value = DEFAULT_BENCH_MODELS)]
    pub models: String,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Minimum timed seconds per model.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Skip the PyTorch reference.
    #[arg(long)]
    pub no_torch: bool,
    /// Rounds; in each, every model runs here and in PyTorch back to back (the order of the
    /// pair alternating by round), so a slow period of the shared machine hits both sides
    /// alike; the table reports medians over rounds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub rounds: u64,
}

/// The models of the issue's forward benchmark.
const DEFAULT_BENCH_MODELS: &str = "vit_tiny_patch16_224,swin_tiny_patch4_window7_224,pvt_v2_b0,tnt_s_patch16_224";

pub fn run(cmd: VitCommand) -> Result<()> {
    match cmd {
        VitCommand::List => list(),
        VitCommand::Parity { dir } => parity(&dir),
        VitCommand::Summary {
            model,
            image_size,
            num_classes,
        } => summary(&model, image_size.unwrap_or_else(|| default_size(&model)), num_classes),
        VitCommand::Train(a) => train(a),
        VitCommand::Bench(a) => bench(a),
        VitCommand::Efficiency(a) => efficiency(a),
        VitCommand::Compare { runs, section, note } => compare(&runs, &section, &note),
    }
}

fn default_size(name: &str) -> usize {
    if name.ends_with("_32") {
        32
    } else {
        224
    }
}

fn cheap(name: &str, num_classes: usize, size: usize) -> Result<(VarStore, Box<dyn ZooModel>)> {
    let vs = VarStore::new(0, &Device::Cpu);
    let opts = ModelOptions {
        cheap_init: true,
        ..ModelOptions::new(num_classes, size)
    };
    let m = create_model_with(name, &opts, &vs.root())?;
    Ok((vs, m))
}

/// Reference figures from the issue: timm 1.0.31's parameter counts and PyTorch's FLOP counter
/// (halved) at 224x224, 1000 classes; published figures for the official-code models.
const REFERENCE: &[(&str, &str, &str)] = &[
    ("vit_tiny_patch16_224", "5,717,416", "1.254"),
    ("vit_small_patch16_224", "22,050,664", ""),
    ("vit_base_patch16_224", "86,567,656", ""),
    ("deit_tiny_distilled_patch16_224", "5,910,800", "1.261"),
    ("swin_tiny_patch4_window7_224", "28,288,354", "4.491"),
    ("pvt_v2_b0", "3,666,760", "0.566"),
    ("pit_ti_224", "4,847,272", ""),
    ("convit_tiny", "5,710,512", "1.252"),
    ("tnt_s_patch16_224", "23,768,584", "5.217"),
    ("tnt_b_patch16_224", "65,428,680", ""),
    ("levit_128s", "7,777,058", "0.305"),
    ("pvt_tiny", "13.2M (paper)", "1.9 (paper)"),
    ("pvt_small", "24.5M (paper)", "3.8 (paper)"),
    ("cpvt_small_224", "22M (paper)", ""),
    ("cmt_ti", "9.5M (paper, 160x160)", "0.6 (paper, 160x160)"),
    ("t2t_vit_7", "4.3M (paper)", "1.1 (paper)"),
    ("t2t_vit_14", "21.5M (paper)", "4.8 (paper)"),
];

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn list() -> Result<()> {
    println!("{:<34} {:>6} {:>12} {:>9}  description", "model", "size", "params", "GMACs");
    let mut table = String::from(
        "## Registry: parameters and MACs\n\n| model | image size | classes | params | reference params | GMACs | reference GMACs |\n|---|---|---|---|---|---|---|\n",
    );
    let mut frozen = Vec::new();
    for (name, desc) in MODEL_NAMES {
        let size = if *name == "cmt_ti" { 160 } else { default_size(name) };
        let classes = if size == 32 { 10 } else { 1000 };
        let (vs, m) = cheap(name, classes, size)?;
        if vs.num_trainable_params() != vs.num_params() {
            frozen.push(format!("{name} {}", group(vs.num_trainable_params() as u64)));
        }
        let g = m.macs() as f64 / 1e9;
        println!("{name:<34} {size:>6} {:>12} {g:>9.3}  {desc}", vs.num_params());
        let (rp, rm) = REFERENCE.iter().find(|r| r.0 == *name).map_or(("", ""), |r| (r.1, r.2));
        table += &format!(
            "| {name} | {size} | {classes} | {} | {rp} | {g:.3} | {rm} |\n",
            group(vs.num_params() as u64)
        );
    }
    table += &format!(
        "\nCounted from the built models (zero-initialised, never run), all parameters as `model.parameters()` counts them, including ones the reference code does not train; trainable only: {}. MACs are the analytic count of every matmul (linear layers, Q K^T, A V) and convolution. Reference columns: timm 1.0.31's counts and PyTorch's FLOP counter halved, from issue 10; papers' figures for models timm lacks. Exact counts are pinned in `crates/vit-survey-zoo/tests/counts.rs`.\n\n```\n{}\n```\n",
        if frozen.is_empty() { "every model is fully trainable".to_string() } else { frozen.join(", ") },
        nn_core::report::command_line()
    );
    nn_core::report::write_section(RESULTS, TITLE, "registry", &table)?;
    Ok(())
}

fn parity(dir: &std::path::Path) -> Result<()> {
    let mut table = String::from(
        "## Output parity with the reference implementations\n\n| model | image size | tensors loaded | max abs logit difference | max abs logit |\n|---|---|---|---|---|\n",
    );
    let mut n = 0;
    for (name, _) in MODEL_NAMES {
        let w = dir.join(format!("{name}.safetensors"));
        let io = dir.join(format!("{name}.io.safetensors"));
        if !w.exists() || !io.exists() {
            continue;
        }
        let t = nn_core::candle_core::safetensors::load(&io, &Device::Cpu).with_context(|| format!("reading {}", io.display()))?;
        let (x, want) = (&t["input"], &t["logits"]);
        let size = x.dims()[2];
        let (vs, m) = cheap(name, want.dims()[1], size)?;
        let rep = vit_survey_zoo::weights::load_safetensors(&vs, &w, true)?;
        let y = m.forward_t(x, false)?;
        let d = (y - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let s = want.abs()?.max_all()?.to_scalar::<f32>()?;
        println!(
            "{name:<34} {size:>4} loaded {:>4}  max |diff| {d:.2e}  max |logit| {s:.2e}",
            rep.loaded.len()
        );
        table += &format!("| {name} | {size} | {} | {d:.2e} | {s:.2e} |\n", rep.loaded.len());
        n += 1;
    }
    if n == 0 {
        bail!("no exported models in {}", dir.display());
    }
    table += &format!(
        "\nWeights: each reference model's own random initialisation (seed 0, every parameter perturbed, BatchNorm statistics randomised) saved with its state-dict names and loaded strictly by name; input: 2 images of N(0, 1) noise; eval mode. References: timm 1.0.31 (`bench/torch/vit_survey_zoo_reference.py export DIR`), the official PVT and CMT code (`export-official`).\n\n```\n{}\n```\n",
        nn_core::report::command_line()
    );
    nn_core::report::write_section(RESULTS, TITLE, "parity", &table)?;
    Ok(())
}

fn summary(name: &str, size: usize, classes: usize) -> Result<()> {
    let (vs, m) = cheap(name, classes, size)?;
    let mut groups: Vec<(String, usize)> = Vec::new();
    for e in vs.all() {
        if e.kind == nn_core::ParamKind::Buffer {
            continue;
        }
        let parts: Vec<&str> = e.name.split('.').collect();
        let key = if parts.len() > 2 && parts[1].parse::<usize>().is_ok() {
            format!("{}.{}", parts[0], parts[1])
        } else {
            parts[0].to_string()
        };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some(g) => g.1 += e.var.elem_count(),
            None => groups.push((key, e.var.elem_count())),
        }
    }
    println!("{name} at {size}x{size}, {classes} classes");
    for (k, n) in &groups {
        println!("  {k:<28} {n:>12}");
    }
    println!(
        "  {:<28} {:>12}\n  MACs per image: {} ({:.3} G); features: {}",
        "total",
        vs.num_params(),
        m.macs(),
        m.macs() as f64 / 1e9,
        m.num_features()
    );
    Ok(())
}

fn train(a: TrainArgs) -> Result<()> {
    if a.epochs == 0 || a.batch_size < 2 {
        bail!("--epochs must be >= 1 and --batch-size >= 2");
    }
    let d = standard_data(&a.data.spec(&a.dataset, a.batch_size, a.seed))?;
    let mc = d.model_config;
    let vs = VarStore::new(a.seed, &Device::Cpu);
    let is_cnn = nn_core::models::MODEL_NAMES.iter().any(|(n, _)| *n == a.model);
    let (model, macs): (Box<dyn Model>, Option<u64>) = if is_cnn {
        let m = nn_core::models::create_model(&a.model, &mc, &vs.root(), &nn_core::StandardFactory)?;
        (m, None)
    } else {
        let opts = ModelOptions {
            in_chans: mc.in_channels,
            drop_path_rate: a.drop_path,
            ..ModelOptions::new(mc.num_classes, mc.image_size)
        };
        let m = create_model_with(&a.model, &opts, &vs.root()).with_context(|| format!("building {} for {}", a.model, a.dataset))?;
        let macs = m.macs();
        (Box::new(ZooAsModel(m)), Some(macs))
    };
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/vit-{}-{}-s{}", a.model, a.dataset, a.seed)));
    let mut cfg = TrainConfig::new(&a.model, &a.dataset, a.epochs, &out);
    cfg.batch_size = a.batch_size;
    cfg.seed = a.seed;
    cfg.optimizer = if a.sgd {
        OptimizerConfig::sgd(a.lr, a.weight_decay)
    } else {
        OptimizerConfig::adamw(a.lr, a.weight_decay)
    };
    cfg.schedule = if a.warmup_epochs > 0.0 {
        Schedule::cosine(0.0).with_warmup(a.warmup_epochs, 0.01)
    } else {
        Schedule::cosine(0.0)
    };
    cfg.label_smoothing = a.label_smoothing;
    cfg.checkpoint_every = 200;
    cfg.overwrite = a.overwrite;
    cfg.quiet = a.quiet;
    cfg.stop_after_steps = a.max_steps;
    cfg.command = nn_core::report::command_line();
    let threads = rayon::current_num_threads();
    eprintln!(
        "training {} on {} ({} train / {} test), {} epochs, {} threads: {} params",
        a.model,
        a.dataset,
        d.num_train,
        d.num_test,
        a.epochs,
        threads,
        vs.num_params()
    );
    let mut trainer = Trainer::new(cfg, model.as_ref(), &vs)?;
    let mut s = trainer.fit(&d.train, Some(&d.test))?;
    // nn-core's profiler sees only its own layers; the zoo counts every matmul analytically
    if let Some(m) = macs {
        s.macs = m;
        let p = out.join("summary.json");
        std::fs::write(&p, serde_json::to_string_pretty(&s)?).with_context(|| format!("writing {}", p.display()))?;
    }
    if a.max_steps.is_some() {
        eprintln!(
            "smoke run (--max-steps): summary in {}/summary.json, no results table written",
            out.display()
        );
        return Ok(());
    }
    let name = crate::grid::run_name(&out);
    let opt = if a.sgd { "SGD (momentum 0.9)" } else { "AdamW" };
    let mut notes = format!(
        "{opt}, lr {}, weight decay {}, cosine after {} warmup epoch(s), label smoothing {}, stochastic depth {}, batch {}, {threads} thread(s), crop + flip augmentation.",
        a.lr,
        a.weight_decay,
        a.warmup_epochs,
        a.label_smoothing,
        if is_cnn { 0.0 } else { a.drop_path },
        a.batch_size
    );
    a.data.append_subset_note(&mut notes);
    if !a.note.is_empty() {
        notes += &format!(" {}", a.note);
    }
    let page = nn_core::report::write_section(RESULTS, TITLE, &name, &summary_markdown(&name, &s, &notes))?;
    eprintln!("summary: {}/summary.json; table: {}", out.display(), page.display());
    Ok(())
}

/// Adapts a boxed zoo model to the `&dyn Model` the trainer takes.
struct ZooAsModel(Box<dyn ZooModel>);

impl Model for ZooAsModel {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> nn_core::candle_core::Result<Tensor> {
        self.0.forward_features(x, train)
    }
    fn forward_head(&self, f: &Tensor, train: bool) -> nn_core::candle_core::Result<Tensor> {
        self.0.forward_head(f, train)
    }
    fn forward_stages(&self, x: &Tensor, train: bool) -> nn_core::candle_core::Result<Vec<Tensor>> {
        self.0.forward_stages(x, train)
    }
    fn num_classes(&self) -> usize {
        self.0.num_classes()
    }
    fn num_features(&self) -> usize {
        self.0.num_features()
    }
}

fn bench(a: BenchArgs) -> Result<()> {
    let threads = rayon::current_num_threads();
    let load = || {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().map(String::from))
            .unwrap_or_else(|| "n/a".into())
    };
    let load_before = load();
    let models: Vec<&str> = a.models.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let v: Vec<f32> = (0..a.batch * 3 * 224 * 224).map(|i| ((i % 251) as f32 / 125.0) - 1.0).collect();
    let x = Tensor::from_vec(v, (a.batch, 3, 224, 224), &Device::Cpu)?;
    let mut built = Vec::new();
    for name in &models {
        let vs = VarStore::new(0, &Device::Cpu);
        let m = create_model_with(name, &ModelOptions::new(1000, 224), &vs.root())?;
        built.push((vs, m));
    }
    let rounds = a.rounds as usize;
    // per model: images/s of each round, ours and PyTorch's
    let mut ours = vec![Vec::new(); models.len()];
    let mut theirs: Vec<Vec<f64>> = vec![Vec::new(); models.len()];
    let mut torch_error = None;
    // one warm PyTorch process for the whole run (none with --no-torch)
    let mut torch = if a.no_torch {
        None
    } else {
        match TorchServer::start(threads, a.batch, a.seconds) {
            Ok(t) => Some(t),
            Err(e) => {
                torch_error = Some(e);
                None
            }
        }
    };
    // each model here and in PyTorch back to back (seconds apart, so that the shared machine's
    // speed changes hit both sides of a pair alike), the order of the pair alternating by round
    for round in 0..rounds {
        for (i, name) in models.iter().enumerate() {
            let torch_first = round % 2 == 1;
            let mut run_torch = |theirs: &mut Vec<Vec<f64>>| {
                if let Some(t) = torch.as_mut() {
                    match t.images_per_s(name) {
                        Ok(v) => theirs[i].push(v),
                        Err(e) => {
                            torch_error = Some(e);
                            torch = None;
                        }
                    }
                }
            };
            if torch_first {
                run_torch(&mut theirs);
            }
            let m = &built[i].1;
            // warm-up: at least one forward and 1 s, as on the PyTorch side
            let t = std::time::Instant::now();
            m.forward_t(&x, false)?.to_dtype(DType::F32)?;
            while t.elapsed().as_secs_f64() < 1.0 {
                m.forward_t(&x, false)?.to_dtype(DType::F32)?;
            }
            let t = std::time::Instant::now();
            let mut reps = 0;
            while reps < 3 || t.elapsed().as_secs_f64() < a.seconds {
                m.forward_t(&x, false)?.to_dtype(DType::F32)?;
                reps += 1;
            }
            let ips = (reps * a.batch) as f64 / t.elapsed().as_secs_f64();
            println!("round {}/{rounds} vit-survey-zoo {name}: {ips:.2} img/s", round + 1);
            ours[i].push(ips);
            if !torch_first {
                run_torch(&mut theirs);
            }
        }
    }
    drop(torch);
    let median = |v: &[f64]| -> Option<f64> {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    let mut table = format!(
        "## Forward benchmark, 224x224, batch {}, {threads} threads\n\n| model | MACs (G) | vit-survey-zoo img/s | PyTorch/timm img/s | ratio of medians | per-round ratios |\n|---|---|---|---|---|---|\n",
        a.batch
    );
    for (i, name) in models.iter().enumerate() {
        let (_, m) = cheap(name, 1000, 224)?;
        let (o, t) = (median(&ours[i]).unwrap_or(f64::NAN), median(&theirs[i]));
        let per_round: Vec<f64> = ours[i].iter().zip(&theirs[i]).map(|(a, b)| a / b).collect();
        let range = match (
            per_round.iter().cloned().reduce(f64::min),
            per_round.iter().cloned().reduce(f64::max),
        ) {
            (Some(lo), Some(hi)) => format!("{lo:.2}-{hi:.2}x"),
            _ => "n/a".into(),
        };
        table += &format!(
            "| {name} | {:.3} | {o:.2} | {} | {} | {range} |\n",
            m.macs() as f64 / 1e9,
            t.map_or("n/a".into(), |v| format!("{v:.2}")),
            t.map_or("n/a".into(), |v| format!("**{:.2}x**", o / v)),
        );
    }
    match (&torch_error, a.no_torch) {
        (_, true) => table += "\nPyTorch reference not run: --no-torch\n",
        (Some(e), _) => table += &format!("\nPyTorch reference not run: {e}\n"),
        (None, false) => table += &format!("\nImages/s are medians over {rounds} rounds; in every round each model runs here and in PyTorch back to back (PyTorch first in every other round), so that the shared machine's speed changes hit both sides of a pair alike; ratio = vit-survey-zoo / PyTorch (higher is better for vit-survey-zoo), also given per round (per pair). PyTorch numbers from `bench/torch/vit_survey_zoo_reference.py serve` (one warm process for the whole run, models built once, glibc malloc tuned through its environment variables as nn-core tunes this process: freed memory kept, mmap only above 32 MiB), run by this command on the same machine.\n"),
    }
    table += &format!(
        "\nEval mode, random weights, synthetic input; at least 3 timed forwards and {} s per model and round after at least 1 s of warm-up forwards, on both sides. 1-minute load average of the machine (shared with other jobs) {} before and {} after the runs. Machine: {}.\n\n```\n{}\n```\n",
        a.seconds,
        load_before,
        load(),
        nn_core::bench::machine_description(),
        nn_core::report::command_line()
    );
    print!("{table}");
    match bench_section(&a, threads, torch_error.is_none()) {
        Some(key) => {
            let page = nn_core::report::write_section(RESULTS, TITLE, &key, &table)?;
            eprintln!("written to {} (section {key})", page.display());
        }
        None => eprintln!("not written to {RESULTS}: without the PyTorch reference this is no comparison"),
    }
    Ok(())
}

/// The results section of a `vit bench` run: `bench-forward-<threads>t` for the issue's
/// comparison (default models, batch 8), suffixed by batch and models otherwise, so that a
/// bench of other models never replaces it; `None` (printed only) when PyTorch did not run.
fn bench_section(a: &BenchArgs, threads: usize, torch_ran: bool) -> Option<String> {
    if a.no_torch || !torch_ran {
        return None;
    }
    let mut key = format!("bench-forward-{threads}t");
    if a.batch != 8 {
        key += &format!("-b{}", a.batch);
    }
    let models: Vec<&str> = a.models.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if models != DEFAULT_BENCH_MODELS.split(',').collect::<Vec<_>>() {
        key += &format!("-{}", models.join("+"));
    }
    Some(key)
}

/// `bench/torch/vit_survey_zoo_reference.py serve`: one warm PyTorch process, asked for one
/// model at a time, so that its measurements can alternate with ours without paying (or
/// suffering) a fresh process each time.
struct TorchServer {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    /// Drains the child's stderr (so that warnings can never fill the pipe and stall it) and
    /// returns the text for error messages.
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl TorchServer {
    fn start(threads: usize, batch: usize, seconds: f64) -> Result<Self> {
        use std::process::{Command, Stdio};
        let script = nn_core::report::workspace_root().join("bench/torch/vit_survey_zoo_reference.py");
        let mut child = Command::new("python3")
            // glibc malloc tuned as nn_core::alloc::tune_allocator tunes this process
            .envs(nn_core::alloc::glibc_tuning_env())
            .arg(&script)
            .args([
                "serve",
                "--threads",
                &threads.to_string(),
                "--batch",
                &batch.to_string(),
                "--seconds",
                &seconds.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running python3 {}", script.display()))?;
        let stdin = child.stdin.take().context("python3: no stdin")?;
        let stdout = child.stdout.take().context("python3: no stdout")?;
        let lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        let mut err_pipe = child.stderr.take().context("python3: no stderr")?;
        let stderr = Some(std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut err_pipe, &mut text);
            text
        }));
        let mut server = Self {
            child,
            stdin,
            lines,
            stderr,
        };
        // wait until python has imported torch and timm (seconds of CPU), so that its start
        // does not overlap the first measurement here
        match server.lines.next() {
            Some(Ok(l)) if l.trim() == "ready" => Ok(server),
            _ => Err(server.failure("start")),
        }
    }

    /// The error of a server that stopped answering: its last line on stderr.
    fn failure(&mut self, during: &str) -> anyhow::Error {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let err = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        anyhow::anyhow!(
            "bench/torch/vit_survey_zoo_reference.py serve failed ({during}): {}",
            err.lines().last().unwrap_or("no output")
        )
    }

    /// PyTorch/timm images/s of `model`.
    fn images_per_s(&mut self, model: &str) -> Result<f64> {
        use std::io::Write;
        let asked = writeln!(self.stdin, "{model}").and_then(|_| self.stdin.flush());
        let line = match (asked, self.lines.next()) {
            (Ok(()), Some(Ok(line))) => line,
            // the process died (an unknown model, ...)
            _ => return Err(self.failure(model)),
        };
        let mut it = line.split_whitespace();
        match (it.next(), it.next().and_then(|v| v.parse::<f64>().ok())) {
            (Some(n), Some(ips)) if n == model => {
                println!("PyTorch/timm {n}: {ips:.2} img/s");
                Ok(ips)
            }
            _ => bail!("bench/torch/vit_survey_zoo_reference.py serve: unexpected answer `{line}` for {model}"),
        }
    }
}

impl Drop for TorchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<T>().map_err(|_| anyhow::anyhow!("{what}: cannot parse `{x}`")))
        .collect()
}

/// Top-1 (percent) of `model` over `batches`.
fn top1(model: &dyn Model, batches: &[(Tensor, Tensor)]) -> Result<f64> {
    let (mut correct, mut n) = (0usize, 0usize);
    for (x, y) in batches {
        let logits = model.forward_t(x, false)?;
        correct += nn_core::train::topk_correct(&logits, y, 1)?;
        n += y.dims()[0];
    }
    Ok(100.0 * correct as f64 / n.max(1) as f64)
}

/// Images/s of each model over `batches`: `repeats` rounds, each timing one pass of every
/// model in turn (so load changes from other jobs hit all models alike), fastest pass kept.
fn round_robin_speed(models: &[&dyn Model], batches: &[(Tensor, Tensor)], repeats: usize) -> Result<Vec<f64>> {
    let imgs: usize = batches.iter().map(|b| b.1.dims()[0]).sum();
    let mut best = vec![f64::INFINITY; models.len()];
    for _ in 0..repeats.max(1) {
        for (m, b) in models.iter().zip(best.iter_mut()) {
            let t = std::time::Instant::now();
            for (x, _) in batches {
                m.forward_t(x, false)?;
            }
            *b = b.min(t.elapsed().as_secs_f64());
        }
    }
    Ok(best.into_iter().map(|s| imgs as f64 / s).collect())
}

fn efficiency(a: EfficiencyArgs) -> Result<()> {
    use vit_survey_zoo::efficient::{
        head_importance, heads_to_keep, normalize_per_layer, prune_heads, quantize_linear_weights, token_pruning_macs, QuantReport,
        TokenPruned, TokenPruning,
    };
    use vit_survey_zoo::vit::VisionTransformer;
    let cfg = vit_survey_zoo::vit_config(&a.model).with_context(|| format!("{} is not a ViT/DeiT of the registry", a.model))?;
    let prune: Vec<usize> = parse_list(&a.prune_heads, "--prune-heads")?;
    let layers: Vec<usize> = parse_list(&a.token_layers, "--token-layers")?;
    let keeps: Vec<f64> = parse_list(&a.keep_ratios, "--keep-ratios")?;
    let mut spec = DataSpec::new(&a.dataset, a.batch_size, 0);
    spec.data_dir = a.data.clone();
    spec.test_subset = Some(a.test_subset);
    spec.train_subset = Some(a.importance_batches * a.batch_size);
    spec.augment = false;
    let d = standard_data(&spec)?;
    let mc = d.model_config;
    use nn_core::train::BatchSource;
    let test: Vec<(Tensor, Tensor)> = d.test.batches(0, 0).collect::<Result<_>>()?;
    let imp_batches: Vec<(Tensor, Tensor)> = d.train.batches(0, 0).take(a.importance_batches).collect::<Result<_>>()?;
    let opts = ModelOptions {
        in_chans: mc.in_channels,
        ..ModelOptions::new(mc.num_classes, mc.image_size)
    };
    let ck_path = a.run.join("checkpoint.safetensors");
    let ck = nn_core::train::Checkpoint::load(&ck_path)?;
    let build = || -> Result<(VarStore, VisionTransformer)> {
        let vs = VarStore::new(0, &Device::Cpu);
        let m = vit_survey_zoo::layers::with_cheap_init(true, || VisionTransformer::new(&a.model, &vs.root(), &cfg, &opts))?;
        vit_survey_zoo::weights::load_tensors(&vs, &ck.model, true).with_context(|| format!("loading {}", ck_path.display()))?;
        Ok((vs, m))
    };
    let load = || {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().map(String::from))
            .unwrap_or_else(|| "n/a".into())
    };
    let load_before = load();
    let threads = rayon::current_num_threads();
    let n0 = (mc.image_size / cfg.patch_size).pow(2);
    // the variants: (method, setting, params, MACs)
    let mut rows: Vec<(String, String, usize, u64)> = Vec::new();
    let (vs, base) = build()?;
    let base_macs = base.macs();
    rows.push((
        "none (trained model)".into(),
        format!("{} heads x {} blocks, {n0} patch tokens", cfg.num_heads, cfg.depth),
        vs.num_params(),
        base_macs,
    ));
    // head pruning (Michel et al.): importance on training batches, globally lowest heads removed
    let t = std::time::Instant::now();
    let imp = normalize_per_layer(&head_importance(&base, &imp_batches)?);
    eprintln!(
        "head importance from {} batches in {:.1}s: {imp:.3?}",
        imp_batches.len(),
        t.elapsed().as_secs_f64()
    );
    let mut pruned = Vec::new();
    for &k in &prune {
        let keep = heads_to_keep(&imp, k);
        let (pvs, pm) = prune_heads(&vs, &base, &keep)?;
        let per_block: Vec<String> = keep.iter().map(|h| h.len().to_string()).collect();
        rows.push((
            "attention-head pruning".into(),
            format!(
                "{k} of {} heads removed; heads per block {}",
                cfg.num_heads * cfg.depth,
                per_block.join("-")
            ),
            pvs.num_params(),
            pm.macs(),
        ));
        pruned.push((pvs, pm));
    }
    // token pruning by class attention (EViT), inattentive tokens fused
    let mut token = Vec::new();
    for &r in &keeps {
        let tp = TokenPruning {
            layers: layers.clone(),
            keep_ratio: r,
            fuse: true,
        };
        let tokens: Vec<String> = tp.tokens_per_block(cfg.depth, n0).iter().map(|c| c.1.to_string()).collect();
        rows.push((
            "token pruning (EViT)".into(),
            format!(
                "keep {r} in blocks {}, rest fused; patch tokens after each block {}",
                layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", "),
                tokens.join("-")
            ),
            vs.num_params(),
            token_pruning_macs(&base, &tp),
        ));
        token.push(TokenPruned { model: &base, pruning: tp });
    }
    // int8 per-channel post-training quantization of the linear weights
    let (qvs, qm) = build()?;
    let rep: QuantReport = quantize_linear_weights(&qvs)?;
    rows.push((
        "int8 weight quantization".into(),
        format!(
            "{} linear weights ({} values) per output channel: {:.1} KB f32 -> {:.1} KB int8 + scales; max abs weight error {:.2e}",
            rep.tensors.len(),
            rep.params,
            rep.f32_bytes as f64 / 1024.0,
            rep.int8_bytes as f64 / 1024.0,
            rep.max_abs_error
        ),
        qvs.num_params(),
        qm.macs(),
    ));
    let mut models: Vec<&dyn Model> = vec![&base];
    models.extend(pruned.iter().map(|(_, m)| m as &dyn Model));
    models.extend(token.iter().map(|m| m as &dyn Model));
    models.push(&qm);
    let mut acc = Vec::new();
    for (m, r) in models.iter().zip(&rows) {
        let t1 = top1(*m, &test)?;
        eprintln!("{} ({}): top-1 {t1:.2}%", r.0, r.1);
        acc.push(t1);
    }
    let sb = &test[..a.speed_batches.clamp(1, test.len())];
    let ips = round_robin_speed(&models, sb, a.speed_repeats)?;
    let name = crate::grid::run_name(&a.run);
    let mut table = format!(
        "## Efficiency methods on {} ({name})\n\n| method | setting | params | MACs (M) | MACs vs base | test top-1 % | change (points) | img/s | speed vs base |\n|---|---|---|---|---|---|---|---|---|\n",
        a.model
    );
    for (i, r) in rows.iter().enumerate() {
        table += &format!(
            "| {} | {} | {} | {:.2} | {:.2}x | {:.2} | {:+.2} | {:.1} | {:.2}x |\n",
            r.0,
            r.1,
            r.2,
            r.3 as f64 / 1e6,
            r.3 as f64 / base_macs as f64,
            acc[i],
            acc[i] - acc[0],
            ips[i],
            ips[i] / ips[0]
        );
    }
    table += &format!(
        "\nAll methods applied after training, without fine-tuning, to the weights in `{}`; test top-1 on a class-balanced {}-image test subset. img/s: eval-mode forward passes over the first {} test batches of {} images, {threads} thread(s), measured round-robin ({} rounds, each model once per round, fastest pass kept) so that load from other jobs hits every model alike. Head importance: Michel et al.'s |dL/d gate| per head, summed over {} unaugmented training batches, normalised per block; the globally least important heads are removed from the weights (at least one per block). Token pruning: EViT's class-attention top-k inside the listed blocks (0-based) with the inattentive tokens fused into one. int8: symmetric per-output-channel quantization of every linear layer (attention, MLP, head; the patch-embedding convolution stays f32), run as dequantized f32 weights, so its speed is that of the f32 kernels: the gain is weight storage. 1-minute load average of the machine (shared with other jobs) {} before and {} after.{}\n\n```\n{}\n```\n",
        ck_path.display(),
        test.iter().map(|b| b.1.dims()[0]).sum::<usize>(),
        sb.len(),
        a.batch_size,
        a.speed_repeats,
        imp_batches.len(),
        load_before,
        load(),
        if a.note.is_empty() { String::new() } else { format!(" {}", a.note) },
        nn_core::report::command_line()
    );
    print!("{table}");
    let page = nn_core::report::write_section(RESULTS, TITLE, &format!("efficiency-{name}"), &table)?;
    eprintln!("written to {}", page.display());
    Ok(())
}

fn compare(runs: &str, section: &str, note: &str) -> Result<()> {
    let mut table = String::from(
        "## CIFAR-10: CNN vs vision transformers at the same budget\n\n| model | kind | params | MACs (M) | epochs | test top-1 % | test top-5 % | train img/s | eval img/s | run |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for dir in runs.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let p = PathBuf::from(dir).join("summary.json");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?)?;
        if v["completed"].as_bool() != Some(true) {
            bail!("{} is not a finished run", p.display());
        }
        let model = v["model"].as_str().unwrap_or("?");
        let kind = if nn_core::models::MODEL_NAMES.iter().any(|(n, _)| *n == model) {
            "CNN"
        } else {
            "transformer"
        };
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        table += &format!(
            "| {model} | {kind} | {} | {:.1} | {} | {:.2} | {:.2} | {:.1} | {:.1} | `{dir}` |\n",
            v["params"].as_u64().unwrap_or(0),
            f("macs") / 1e6,
            v["epochs"].as_u64().unwrap_or(0),
            f("test_top1"),
            f("test_top5"),
            f("train_images_per_s"),
            f("eval_images_per_s"),
        );
    }
    table += &format!(
        "\nRead from each run's `summary.json` (the runs' own sections above give their settings and commands). MACs per 32x32 image: the zoo's analytic count for the transformers, nn-core's profiler for the CNN. Speeds were measured on a shared machine and are only indicative.{}\n\n```\n{}\n```\n",
        if note.is_empty() { String::new() } else { format!(" {note}") },
        nn_core::report::command_line()
    );
    print!("{table}");
    let page = nn_core::report::write_section(RESULTS, TITLE, section, &table)?;
    eprintln!("written to {}", page.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct W {
        #[command(flatten)]
        b: BenchArgs,
    }

    fn args(a: &[&str]) -> BenchArgs {
        W::try_parse_from(std::iter::once("bench").chain(a.iter().copied())).unwrap().b
    }

    #[test]
    fn only_the_full_comparison_writes_the_bench_section() {
        assert_eq!(bench_section(&args(&[]), 2, true).as_deref(), Some("bench-forward-2t"));
        // No PyTorch, by flag or because it failed: printed, not written.
        assert_eq!(bench_section(&args(&["--no-torch"]), 2, true), None);
        assert_eq!(bench_section(&args(&[]), 2, false), None);
        // Other models or batch: their own section, never the issue's comparison.
        assert_eq!(
            bench_section(&args(&["--models", "vit_tiny_patch16_224"]), 2, true).as_deref(),
            Some("bench-forward-2t-vit_tiny_patch16_224")
        );
        assert_eq!(
            bench_section(&args(&["--batch", "1"]), 1, true).as_deref(),
            Some("bench-forward-1t-b1")
        );
    }
}
