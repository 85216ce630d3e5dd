//! nn-core commands: train, demo, bench, summary, list.

use crate::cli::DataArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use nn_core::candle_core::{DType, Device, Tensor};
use nn_core::experiment::{standard_data, summary_markdown};
use nn_core::models::{create_model, ModelConfig, MODEL_NAMES};
use nn_core::train::{OptimizerConfig, Schedule, TrainConfig, Trainer};
use nn_core::{StandardFactory, VarStore};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq)]
pub enum Opt {
    Sgd,
    Adamw,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq)]
pub enum Sched {
    Cosine,
    Step,
    Constant,
}

/// Options of `cargo xtask train`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// A named configuration (see `cargo xtask list`); explicit flags override it.
    #[arg(long)]
    pub preset: Option<String>,
    /// Model name (see `cargo xtask list`).
    #[arg(long)]
    pub model: Option<String>,
    /// Dataset name: mnist, fashion-mnist, usps, cifar10, cifar100, imagenet.
    #[arg(long)]
    pub dataset: Option<String>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (default runs/<model>-<dataset>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, value_enum)]
    pub optimizer: Option<Opt>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// SGD momentum (Nesterov unless --no-nesterov).
    #[arg(long)]
    pub momentum: Option<f64>,
    #[arg(long)]
    pub no_nesterov: bool,
    #[arg(long, value_enum)]
    pub schedule: Option<Sched>,
    /// Epochs at which a step schedule multiplies the learning rate by 0.1.
    #[arg(long, value_delimiter = ',')]
    pub milestones: Option<Vec<f64>>,
    #[arg(long)]
    pub warmup_epochs: Option<f64>,
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    pub clip: Option<f64>,
    /// No random crop / flip.
    #[arg(long)]
    pub no_augment: bool,
    #[command(flatten)]
    pub data: DataArgs,
    /// Continue from the checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Replace an existing run in --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Checkpoint every this many steps (and at every epoch end).
    #[arg(long, default_value_t = 200)]
    pub checkpoint_every: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Results page the run's table is written into.
    #[arg(long, default_value = "docs/results/nn-core.md")]
    pub results: String,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// A named training configuration.
pub struct Preset {
    pub name: &'static str,
    pub about: &'static str,
    pub model: &'static str,
    pub dataset: &'static str,
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: Opt,
    pub lr: f64,
    pub weight_decay: f64,
    pub schedule: Sched,
    pub milestones: &'static [f64],
    pub warmup_epochs: f64,
}

pub const PRESETS: &[Preset] = &[
    Preset {
        name: "mnist-lenet5",
        about: "LeNet-5-BN on MNIST, 8 epochs",
        model: "lenet5-bn",
        dataset: "mnist",
        epochs: 8,
        batch_size: 128,
        optimizer: Opt::Sgd,
        lr: 0.05,
        weight_decay: 5e-4,
        schedule: Sched::Cosine,
        milestones: &[],
        warmup_epochs: 0.0,
    },
    Preset {
        name: "fashion-resnet20",
        about: "ResNet-20 on Fashion-MNIST, 8 epochs, SGD Nesterov 0.1, cosine, crop+flip (the PyTorch reference's recipe)",
        model: "resnet20",
        dataset: "fashion-mnist",
        epochs: 8,
        batch_size: 128,
        optimizer: Opt::Sgd,
        lr: 0.1,
        weight_decay: 5e-4,
        schedule: Sched::Cosine,
        milestones: &[],
        warmup_epochs: 0.0,
    },
    Preset {
        name: "cifar10-resnet20",
        about: "ResNet-20 on CIFAR-10, 30 epochs cosine (a CPU-sized schedule)",
        model: "resnet20",
        dataset: "cifar10",
        epochs: 30,
        batch_size: 128,
        optimizer: Opt::Sgd,
        lr: 0.1,
        weight_decay: 5e-4,
        schedule: Sched::Cosine,
        milestones: &[],
        warmup_epochs: 0.0,
    },
    Preset {
        name: "cifar10-resnet20-he2016",
        about: "He et al. 2016: ResNet-20, CIFAR-10, 164 epochs (64k iterations), lr 0.1 /10 at 82 and 123, wd 1e-4",
        model: "resnet20",
        dataset: "cifar10",
        epochs: 164,
        batch_size: 128,
        optimizer: Opt::Sgd,
        lr: 0.1,
        weight_decay: 1e-4,
        schedule: Sched::Step,
        milestones: &[82.0, 123.0],
        warmup_epochs: 0.0,
    },
    Preset {
        name: "cifar10-resnet20-400ep",
        about: "ResNet-20, CIFAR-10, 400 epochs cosine, wd 5e-4 (the binary/adder papers' long schedule)",
        model: "resnet20",
        dataset: "cifar10",
        epochs: 400,
        batch_size: 128,
        optimizer: Opt::Sgd,
        lr: 0.1,
        weight_decay: 5e-4,
        schedule: Sched::Cosine,
        milestones: &[],
        warmup_epochs: 0.0,
    },
    Preset {
        name: "imagenet-resnet18",
        about: "ResNet-18 on ImageNet, 90 epochs, batch 256, lr 0.1 /10 at 30, 60, wd 1e-4 (not runnable on this machine)",
        model: "resnet18",
        dataset: "imagenet",
        epochs: 90,
        batch_size: 256,
        optimizer: Opt::Sgd,
        lr: 0.1,
        weight_decay: 1e-4,
        schedule: Sched::Step,
        milestones: &[30.0, 60.0],
        warmup_epochs: 0.0,
    },
];

fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let n = s
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>())
                .transpose()
                .context("device must be cpu or cuda:N")?
                .unwrap_or(0);
            Ok(Device::new_cuda(n)?)
        }
        other => bail!("unknown device `{other}`: use cpu or cuda:N"),
    }
}

/// The fully resolved configuration of a run.
struct Resolved {
    model: String,
    dataset: String,
    epochs: usize,
    batch_size: usize,
    optimizer: OptimizerConfig,
    schedule: Schedule,
}

fn resolve(a: &TrainArgs) -> Result<Resolved> {
    let preset = match &a.preset {
        Some(p) => Some(PRESETS.iter().find(|q| q.name == p).with_context(|| {
            format!(
                "unknown preset `{p}`; valid presets: {}",
                PRESETS.iter().map(|q| q.name).collect::<Vec<_>>().join(", ")
            )
        })?),
        None => None,
    };
    let model = a
        .model
        .clone()
        .or(preset.map(|p| p.model.to_string()))
        .context("--model is required (or --preset); see `cargo xtask list`")?;
    if !MODEL_NAMES.iter().any(|(n, _)| *n == model) {
        bail!(
            "unknown model `{model}`; valid models: {}",
            MODEL_NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        );
    }
    let dataset = a
        .dataset
        .clone()
        .or(preset.map(|p| p.dataset.to_string()))
        .context("--dataset is required (or --preset)")?;
    let epochs = a.epochs.or(preset.map(|p| p.epochs)).unwrap_or(10);
    if epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    let batch_size = a.batch_size.or(preset.map(|p| p.batch_size)).unwrap_or(128);
    if batch_size < 2 {
        bail!("--batch-size must be at least 2 (BatchNorm needs two samples)");
    }
    let lr = a.lr.or(preset.map(|p| p.lr)).unwrap_or(0.1);
    if !(lr > 0.0 && lr.is_finite()) {
        bail!("--lr must be a positive number, got {lr}");
    }
    let wd = a.weight_decay.or(preset.map(|p| p.weight_decay)).unwrap_or(5e-4);
    let opt = a.optimizer.or(preset.map(|p| p.optimizer)).unwrap_or(Opt::Sgd);
    let optimizer = match opt {
        Opt::Sgd => {
            let mut o = OptimizerConfig::sgd(lr, wd);
            if let OptimizerConfig::Sgd { momentum, nesterov, .. } = &mut o {
                *momentum = a.momentum.unwrap_or(0.9);
                *nesterov = !a.no_nesterov && *momentum > 0.0;
            }
            o
        }
        Opt::Adamw => OptimizerConfig::adamw(lr, wd),
    };
    let sched = a.schedule.or(preset.map(|p| p.schedule)).unwrap_or(Sched::Cosine);
    let mut schedule = match sched {
        Sched::Cosine => Schedule::cosine(0.0),
        Sched::Constant => Schedule::Constant,
        Sched::Step => {
            let m = a.milestones.clone().unwrap_or_else(|| {
                preset
                    .map(|p| p.milestones.to_vec())
                    .unwrap_or_else(|| vec![epochs as f64 * 0.5, epochs as f64 * 0.75])
            });
            Schedule::Step { milestones: m, gamma: 0.1 }
        }
    };
    let warm = a.warmup_epochs.or(preset.map(|p| p.warmup_epochs)).unwrap_or(0.0);
    if warm > 0.0 {
        schedule = schedule.with_warmup(warm, 0.1);
    }
    Ok(Resolved {
        model,
        dataset,
        epochs,
        batch_size,
        optimizer,
        schedule,
    })
}

pub fn train(a: TrainArgs) -> Result<()> {
    let r = resolve(&a)?;
    let device = parse_device(&a.device)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/{}-{}", r.model, r.dataset)));
    let mut spec = a.data.spec(&r.dataset, r.batch_size, a.seed);
    spec.augment = !a.no_augment;
    spec.device = device.clone();
    let data = standard_data(&spec)?;
    let vs = VarStore::new(a.seed, &device);
    let model = create_model(&r.model, &data.model_config, &vs.root(), &StandardFactory)?;
    let mut cfg = TrainConfig::new(&r.model, &r.dataset, r.epochs, &out);
    cfg.batch_size = r.batch_size;
    cfg.seed = a.seed;
    cfg.optimizer = r.optimizer;
    cfg.schedule = r.schedule;
    cfg.label_smoothing = a.label_smoothing.unwrap_or(0.0);
    cfg.grad_clip_norm = a.clip;
    cfg.checkpoint_every = a.checkpoint_every;
    cfg.resume = a.resume;
    cfg.overwrite = a.overwrite;
    cfg.quiet = a.quiet;
    cfg.command = nn_core::report::command_line();
    eprintln!(
        "training {} ({} params) on {} ({} train / {} test images) for {} epochs, seed {}",
        r.model,
        vs.num_params(),
        r.dataset,
        data.num_train,
        data.num_test,
        r.epochs,
        a.seed
    );
    let summary = Trainer::new(cfg, model.as_ref(), &vs)?.fit(&data.train, Some(&data.test))?;
    let name = crate::grid::run_name(&out);
    let notes = a.data.subset_note();
    let page = nn_core::report::write_section(&a.results, "nn-core results", &name, &summary_markdown(&name, &summary, &notes))?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!("summary: {}/summary.json; table: {}", out.display(), page.display());
    Ok(())
}

/// Options of `cargo xtask demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Epochs of LeNet-5 on MNIST.
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "runs/demo-lenet5-mnist")]
    pub out: PathBuf,
}

pub fn demo(a: DemoArgs) -> Result<()> {
    println!("== compact-vision demo: nn-core ==\n");
    println!("{}", nn_core::data::registry::report_table(None));
    summary("lenet5-bn", "mnist")?;
    let args = TrainArgs::parse_from_preset("mnist-lenet5", a.epochs, a.seed, a.out.clone());
    train(args)?;
    let mut rows: Vec<(&str, String, f64)> = vec![("nn-core", "LeNet-5-BN, full precision".into(), top1_of(&a.out)?)];
    println!("\n== compact-vision demo: bnn-core (binary LeNet-5-BN, FDA + noise adaptation) ==\n");
    rows.push((
        "bnn-core",
        "LeNet-5-BN, binary conv/FC (FDA)".into(),
        crate::bnn::demo_row(a.epochs, a.seed)?,
    ));
    println!("\n== compact-vision demo: pruning (ResNet-20 on 10k MNIST images, L1-norm, half the inner channels) ==\n");
    let (dense, pruned, macs_removed) = crate::prune::demo_row(1, a.seed)?;
    rows.push(("pruning", "ResNet-20 dense (10k-image subset, 1 epoch)".into(), dense));
    rows.push((
        "pruning",
        format!("ResNet-20 pruned ({macs_removed:.0}% MACs removed), 1 fine-tuning epoch"),
        pruned,
    ));
    crate::sfda::demo(a.seed)?;
    crate::fedpu::demo()?;
    crate::adder::demo(a.epochs, a.seed)?;
    println!(
        "\n== demo summary: MNIST test top-1 after {} epoch(s), seed {} ==\n",
        a.epochs, a.seed
    );
    println!("| crate | model | test top-1 % |\n|---|---|---|");
    for (krate, what, acc) in rows {
        println!("| {krate} | {what} | {acc:.2} |");
    }
    Ok(())
}

/// The final test top-1 of a finished run directory.
pub fn top1_of(run: &std::path::Path) -> Result<f64> {
    let p = run.join("summary.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?)?;
    v["test_top1"].as_f64().with_context(|| format!("{} has no test_top1", p.display()))
}

impl TrainArgs {
    fn parse_from_preset(preset: &str, epochs: usize, seed: u64, out: PathBuf) -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            t: TrainArgs,
        }
        let mut t = W::parse_from(["train"]).t;
        t.preset = Some(preset.into());
        t.epochs = Some(epochs);
        t.seed = seed;
        t.out = Some(out);
        t.overwrite = true;
        t.results = "docs/results/demo.md".into();
        t
    }
}

#[derive(Subcommand, Debug, Clone)]
pub enum BenchCommand {
    /// Convolution forward and forward+backward: nn-core vs stock candle vs PyTorch (when
    /// `python3 -c "import torch"` works), ResNet-20 shapes at batch 128, with ratios.
    Conv {
        /// Thread counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
    },
    /// Training throughput of a model, nn-core vs the PyTorch reference script, same run.
    Train {
        #[arg(long, default_value = "resnet20")]
        model: String,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 128)]
        batch_size: usize,
    },
}

pub fn bench(which: BenchCommand) -> Result<()> {
    match which {
        BenchCommand::Train { model, steps, batch_size } => bench_train(&model, steps, batch_size),
        BenchCommand::Conv { threads } => {
            let report = nn_core::bench::conv_benchmark(&threads)?;
            let body = format!(
                "## Convolution benchmark (ms, median)\n\n{}\n\n```\n{}\n```\n",
                report.to_markdown(),
                nn_core::report::command_line()
            );
            let page = nn_core::report::write_section("docs/results/nn-core.md", "nn-core results", "bench-conv", &body)?;
            eprintln!("written to {}", page.display());
            Ok(())
        }
    }
}

fn bench_train(model: &str, steps: usize, batch: usize) -> Result<()> {
    use nn_core::train::cross_entropy;
    let dev = Device::Cpu;
    let vs = VarStore::new(0, &dev);
    let cfg = ModelConfig::new(1, 10, 28);
    let m = create_model(model, &cfg, &vs.root(), &StandardFactory)?;
    let mut opt = OptimizerConfig::sgd(0.1, 5e-4).build(vs.trainable())?;
    let x = Tensor::randn(0f32, 1.0, (batch, 1, 28, 28), &dev)?;
    let y = Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(), batch, &dev)?;
    let mut step = || -> Result<()> {
        let loss = cross_entropy(&m.forward_t(&x, true)?, &y, 0.0)?;
        let g = loss.backward()?;
        opt.step(&g)?;
        Ok(())
    };
    step()?;
    let t = std::time::Instant::now();
    for _ in 0..steps {
        step()?;
    }
    let train_ips = (steps * batch) as f64 / t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    for _ in 0..steps {
        m.forward_t(&x, false)?.to_dtype(DType::F32)?;
    }
    let eval_ips = (steps * batch) as f64 / t.elapsed().as_secs_f64();
    let threads = rayon::current_num_threads();
    println!("nn-core {model} 1x28x28 batch {batch}: train {train_ips:.1} images/s, eval {eval_ips:.1} images/s ({threads} threads)");
    let mut table = format!(
        "## Training throughput, {model}, 1x28x28, batch {batch}, {threads} threads\n\n| framework | train images/s | eval images/s |\n|---|---|---|\n| nn-core | {train_ips:.1} | {eval_ips:.1} |\n"
    );
    if model == "resnet20" {
        match torch_train_bench(steps, batch, threads) {
            Ok((t_train, t_eval, version)) => {
                println!("{version} resnet20: train {t_train:.1} images/s, eval {t_eval:.1} images/s");
                println!(
                    "ratio nn-core / PyTorch: train {:.2}x, eval {:.2}x (higher is better for nn-core)",
                    train_ips / t_train,
                    eval_ips / t_eval
                );
                table += &format!(
                    "| {version} | {t_train:.1} | {t_eval:.1} |\n\nnn-core / PyTorch: train {:.2}x, eval {:.2}x.\n",
                    train_ips / t_train,
                    eval_ips / t_eval
                );
            }
            Err(e) => {
                println!("PyTorch reference not run: {e:#}");
                table += &format!("\nPyTorch reference not run: {e}\n");
            }
        }
    }
    table += &format!(
        "\nSynthetic inputs, {steps} timed steps after one warm-up step, SGD step included.\n\n```\n{}\n```\n",
        nn_core::report::command_line()
    );
    nn_core::report::write_section(
        "docs/results/nn-core.md",
        "nn-core results",
        &format!("bench-train-{model}-{threads}t"),
        &table,
    )?;
    Ok(())
}

pub fn summary(model: &str, dataset: &str) -> Result<()> {
    let cfg = match dataset {
        "mnist" | "fashion-mnist" => ModelConfig::new(1, 10, 28),
        "usps" => ModelConfig::new(1, 10, 16),
        "cifar10" => ModelConfig::new(3, 10, 32),
        "cifar100" => ModelConfig::new(3, 100, 32),
        "imagenet" => ModelConfig::new(3, 1000, 224),
        other => bail!("unknown dataset `{other}`; valid: mnist, fashion-mnist, usps, cifar10, cifar100, imagenet"),
    };
    let vs = VarStore::new(0, &Device::Cpu);
    let m = create_model(model, &cfg, &vs.root(), &StandardFactory)?;
    let x = Tensor::zeros((1, cfg.in_channels, cfg.image_size, cfg.image_size), DType::F32, &Device::Cpu)?;
    let (_, s) = nn_core::summary::profile(|| m.forward_t(&x, false))?;
    println!(
        "{model} on {dataset} ({}x{}x{}, {} classes)\n{s}",
        cfg.in_channels, cfg.image_size, cfg.image_size, cfg.num_classes
    );
    Ok(())
}

pub fn list() -> Result<()> {
    println!("models:");
    for (n, d) in MODEL_NAMES {
        println!("  {n:<16} {d}");
    }
    println!("\ndatasets:");
    for d in nn_core::data::registry::datasets() {
        println!("  {}", d.name);
    }
    println!("\npresets (cargo xtask train --preset NAME):");
    for p in PRESETS {
        println!("  {:<26} {}", p.name, p.about);
    }
    println!("\nnas search spaces (cargo xtask nas supernet --preset NAME):");
    for p in nas::presets::PRESETS {
        println!("  {:<26} {}", p.name, p.description);
    }
    Ok(())
}

/// Runs `bench/torch/bench_train.py` (same model, batch and thread count) and returns
/// (train images/s, eval images/s, version).
fn torch_train_bench(steps: usize, batch: usize, threads: usize) -> Result<(f64, f64, String)> {
    let script = nn_core::report::workspace_root().join("bench/torch/bench_train.py");
    let out = std::process::Command::new("python3")
        // glibc malloc tuned as this process is (nn_core::alloc::tune_allocator)
        .envs(nn_core::alloc::glibc_tuning_env())
        .arg(&script)
        .args([
            "--steps",
            &steps.to_string(),
            "--batch-size",
            &batch.to_string(),
            "--threads",
            &threads.to_string(),
        ])
        .output()
        .context("starting python3")?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        );
    }
    let last = out.stdout.split(|&b| b == b'\n').filter(|l| !l.is_empty()).last().unwrap_or(b"{}");
    let v: serde_json::Value = serde_json::from_slice(last)?;
    Ok((
        v["train_images_per_s"].as_f64().context("train_images_per_s")?,
        v["eval_images_per_s"].as_f64().context("eval_images_per_s")?,
        v["framework"].as_str().unwrap_or("pytorch").to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct W {
        #[command(flatten)]
        t: TrainArgs,
    }

    fn args(a: &[&str]) -> TrainArgs {
        W::parse_from(std::iter::once("train").chain(a.iter().copied())).t
    }

    #[test]
    fn invalid_flags_are_named_in_the_error() {
        let e = |a: &[&str]| resolve(&args(a)).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(e(&["--model", "resnet21", "--dataset", "mnist"]).contains("valid models: lenet5"));
        assert!(e(&["--preset", "nope"]).contains("valid presets: mnist-lenet5"));
        assert!(e(&["--model", "resnet20", "--dataset", "mnist", "--epochs", "0"]).contains("--epochs"));
        assert!(e(&["--model", "resnet20", "--dataset", "mnist", "--lr=-1"]).contains("--lr"));
        assert!(e(&["--model", "resnet20", "--dataset", "mnist", "--batch-size", "1"]).contains("--batch-size"));
        assert!(e(&["--dataset", "mnist"]).contains("--model is required"));
    }

    #[test]
    fn presets_resolve_and_flags_override_them() {
        for p in PRESETS {
            let r = resolve(&args(&["--preset", p.name])).unwrap();
            assert_eq!(
                (r.model.as_str(), r.dataset.as_str(), r.epochs),
                (p.model, p.dataset, p.epochs),
                "{}",
                p.name
            );
        }
        let r = resolve(&args(&["--preset", "fashion-resnet20", "--epochs", "3", "--lr", "0.05"])).unwrap();
        assert_eq!(r.epochs, 3);
        assert_eq!(r.optimizer.lr(), 0.05);
        let r = resolve(&args(&["--preset", "cifar10-resnet20-he2016"])).unwrap();
        assert!(matches!(r.schedule, Schedule::Step { ref milestones, .. } if milestones == &vec![82.0, 123.0]));
    }
}
