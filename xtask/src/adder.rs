//! adder-nets commands: the adder-vs-convolution benchmark, AdderNet / CNN / PKKD training runs
//! (each writes `runs/<name>/summary.json` with nn-core's schema plus `method` and the
//! addition/multiplication/energy counts, and a section of `docs/results/adder-nets.md`), the
//! CNN vs ANN vs ANN+PKKD comparison over seeds, and the papers' presets.

use crate::cli::DataArgs;
use adder_nets::pkkd::{PkkdConfig, PkkdLoss, PkkdPair};
use adder_nets::{AdaptiveLr, AdderConfig, AdderCounts, AdderFactory};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use nn_core::candle_core::{Device, Tensor, Var};
use nn_core::experiment::{standard_data, summary_markdown};
use nn_core::models::{create_model, MODEL_NAMES};
use nn_core::ops::Conv2dOpts;
use nn_core::train::{Callback, OptimizerConfig, Schedule, TrainConfig, TrainSummary, Trainer};
use nn_core::{Model, StandardFactory, VarStore};
use std::path::PathBuf;

const RESULTS: &str = "docs/results/adder-nets.md";
const TITLE: &str = "adder-nets results";

#[derive(Subcommand, Debug, Clone)]
pub enum AdderCommand {
    /// Adder layer forward and forward+backward vs nn-core conv2d on ResNet-20 shapes (batch 128),
    /// with ratios and peak memory, measured in the same run.
    Bench(BenchArgs),
    /// Train one network: the CNN, the AdderNet (ANN) or the ANN with PKKD (co-trained CNN teacher).
    Train(TrainArgs),
    /// CNN vs ANN vs ANN+PKKD over seeds on one budget (finished runs are skipped), then the
    /// mean +- std table.
    Compare(CompareArgs),
    /// List the presets (the papers' protocols and the CPU-sized ones).
    Presets,
    /// Runs one optimizer step of every preset, ANN and ANN+PKKD, on generated files in the
    /// official dataset layouts (CIFAR-10 binary batches, ImageNet class folders) in a temporary
    /// directory; MNIST uses the real files. Batch size 2 (the step, not the protocol's batch).
    CheckPresets,
}

/// A named protocol.
pub struct Preset {
    pub name: &'static str,
    pub about: &'static str,
    pub model: &'static str,
    pub dataset: &'static str,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
}

/// The papers' protocols (as we read them: SGD momentum 0.9, cosine decay) and CPU-sized ones.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "mnist-lenet5bn",
        about: "LeNet-5-BN on MNIST, 50 epochs, batch 256, lr 0.1 cosine, wd 5e-4 (AdderNet Sec. 4.1 as we read it)",
        model: "lenet5-bn",
        dataset: "mnist",
        epochs: 50,
        batch_size: 256,
        lr: 0.1,
        weight_decay: 5e-4,
    },
    Preset {
        name: "mnist-lenet5bn-cpu",
        about: "LeNet-5-BN on MNIST, 3 epochs, batch 128, lr 0.1 cosine, wd 5e-4 (the CPU budget of docs/results)",
        model: "lenet5-bn",
        dataset: "mnist",
        epochs: 3,
        batch_size: 128,
        lr: 0.1,
        weight_decay: 5e-4,
    },
    Preset {
        name: "cifar10-resnet20-400ep",
        about: "ResNet-20 (shortcut B, adder 1x1) on CIFAR-10, 400 epochs, batch 256, lr 0.1 cosine, wd 5e-4 (AdderNet/PKKD CIFAR protocol)",
        model: "resnet20-b",
        dataset: "cifar10",
        epochs: 400,
        batch_size: 256,
        lr: 0.1,
        weight_decay: 5e-4,
    },
    Preset {
        name: "imagenet-resnet18",
        about: "ResNet-18 on ImageNet, 150 epochs, batch 256, lr 0.1 cosine, wd 1e-4 (AdderNet ImageNet protocol; not runnable on this machine)",
        model: "resnet18",
        dataset: "imagenet",
        epochs: 150,
        batch_size: 256,
        lr: 0.1,
        weight_decay: 1e-4,
    },
    Preset {
        name: "imagenet-resnet50",
        about: "ResNet-50 on ImageNet, 150 epochs, batch 256, lr 0.1 cosine, wd 1e-4 (AdderNet ImageNet protocol; not runnable on this machine)",
        model: "resnet50",
        dataset: "imagenet",
        epochs: 150,
        batch_size: 256,
        lr: 0.1,
        weight_decay: 1e-4,
    },
];

/// Options of `cargo xtask adder train`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// cnn, ann or pkkd.
    #[arg(long, default_value = "ann")]
    pub method: String,
    #[command(flatten)]
    pub common: Common,
}

/// The methods a full comparison runs (the default of `--methods`).
const COMPARE_METHODS: &str = "cnn,ann,pkkd";

/// Options of `cargo xtask adder compare`.
#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    #[arg(long, value_delimiter = ',', default_value = COMPARE_METHODS)]
    pub methods: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// Prefix of the run directories (runs/<prefix>-<dataset>-<method>-s<seed>).
    #[arg(long, default_value = "adder-cmp")]
    pub prefix: String,
    #[command(flatten)]
    pub common: Common,
}

/// Options shared by every run.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// A preset (see `cargo xtask adder presets`); explicit options override it.
    #[arg(long)]
    pub preset: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub dataset: Option<String>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// SGD (momentum 0.9, Nesterov) base learning rate, cosine schedule.
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// eta of the adaptive learning rate (0 turns it off); 0.2 as in the released AdderNet code.
    #[arg(long, default_value_t = 0.2)]
    pub eta: f64,
    /// PKKD: Laplacian width relative to the filter size K.
    #[arg(long, default_value_t = 1.0)]
    pub sigma_ann: f64,
    /// PKKD: Gaussian width, 2 sigma^2 relative to K.
    #[arg(long, default_value_t = 2.0)]
    pub sigma_cnn: f64,
    /// PKKD: weight of the kernel feature losses.
    #[arg(long, default_value_t = 1.0)]
    pub feature_weight: f64,
    /// PKKD: weight of the logit KD loss.
    #[arg(long, default_value_t = 1.0)]
    pub kd_weight: f64,
    /// PKKD: KD temperature.
    #[arg(long, default_value_t = 4.0)]
    pub temperature: f64,
    /// PKKD: matched layers (default: the last body conv of every stage).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<String>,
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Stop after this many optimizer steps (smoke runs of the long presets); `--max-steps`
    /// as in the other runners (`--stop-after-steps` is kept as an alias).
    #[arg(long, alias = "stop-after-steps")]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub quiet: bool,
    /// Results page the run's section goes to.
    #[arg(long, default_value = RESULTS)]
    pub results: String,
    /// Write no results section (implied by --max-steps).
    #[arg(long)]
    pub no_results: bool,
}

/// Options of `cargo xtask adder bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Timed repetitions per measurement (median reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
}

pub fn run(cmd: AdderCommand) -> Result<()> {
    match cmd {
        AdderCommand::Bench(a) => bench(a),
        AdderCommand::Train(a) => train(&a.method, &a.common).map(|_| ()),
        AdderCommand::Compare(a) => compare(a),
        AdderCommand::CheckPresets => check_presets(),
        AdderCommand::Presets => {
            for p in PRESETS {
                println!("{:<24} {}", p.name, p.about);
            }
            Ok(())
        }
    }
}

/// Peak resident set size since the last reset, and the current one, in MiB (Linux).
fn rss_mib() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Resets the peak RSS to the current RSS (`/proc/self/clear_refs`, value 5).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

struct Case {
    name: String,
    cin: usize,
    hw: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

fn case(cin: usize, hw: usize, cout: usize, k: usize, stride: usize) -> Case {
    Case {
        name: format!("{cin}ch@{hw}x{hw}->{cout} {k}x{k} s{stride}"),
        cin,
        hw,
        cout,
        k,
        stride,
        pad: k / 2,
    }
}

fn bench(a: BenchArgs) -> Result<()> {
    let dev = Device::Cpu;
    let threads = rayon::current_num_threads();
    // the body layers of ResNet-20 (option B) on 32x32 CIFAR images
    let cases = [
        case(16, 32, 16, 3, 1),
        case(16, 32, 32, 3, 2),
        case(32, 16, 32, 3, 1),
        case(32, 16, 64, 3, 2),
        case(64, 8, 64, 3, 1),
        case(16, 32, 32, 1, 2),
        case(32, 16, 64, 1, 2),
    ];
    let mut rows = String::new();
    let (mut conv_total, mut adder_total) = (0.0, 0.0);
    println!(
        "adder2d vs nn-core conv2d, batch {}, {threads} threads, median of {} runs (ms); shared machine, both measured here",
        a.batch, a.runs
    );
    for c in &cases {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (a.batch, c.cin, c.hw, c.hw), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (c.cout, c.cin, c.k, c.k), &dev)?)?;
        let o = Conv2dOpts::new(c.stride, c.pad);
        let conv = |bwd: bool| -> Result<()> {
            let y = nn_core::ops::conv2d(x.as_tensor(), w.as_tensor(), o)?;
            if bwd {
                let g = y.sum_all()?.backward()?;
                g.get(w.as_tensor()).context("no conv gradient")?;
            }
            Ok(())
        };
        let adder = |bwd: bool| -> Result<()> {
            let y = adder_nets::adder2d(x.as_tensor(), w.as_tensor(), o)?;
            if bwd {
                let g = y.sum_all()?.backward()?;
                g.get(w.as_tensor()).context("no adder gradient")?;
            }
            Ok(())
        };
        let cf = nn_core::bench::time_it(1, a.runs, || conv(false))?;
        let af = nn_core::bench::time_it(1, a.runs, || adder(false))?;
        reset_peak();
        let base = rss_mib().1;
        let cb = nn_core::bench::time_it(1, a.runs, || conv(true))?;
        let conv_peak = rss_mib().0 - base;
        reset_peak();
        let base = rss_mib().1;
        let ab = nn_core::bench::time_it(1, a.runs, || adder(true))?;
        let adder_peak = rss_mib().0 - base;
        let geom = adder_nets::AdderGeom::new(x.dims(), w.dims(), o)?;
        let scratch_mib = (geom.scratch_floats() * 4 * threads) as f64 / (1 << 20) as f64;
        let naive_mib = (c.cout * geom.k() * a.batch * geom.l() * 4) as f64 / (1 << 20) as f64;
        conv_total += cb.median_ms;
        adder_total += ab.median_ms;
        println!(
            "{:<26} fwd conv {:>8.2} adder {:>8.2} ratio {:>5.2}x | fwd+bwd conv {:>8.2} adder {:>8.2} ratio {:>5.2}x | peak +MiB conv {:>6.1} adder {:>6.1}",
            c.name,
            cf.median_ms,
            af.median_ms,
            af.median_ms / cf.median_ms,
            cb.median_ms,
            ab.median_ms,
            ab.median_ms / cb.median_ms,
            conv_peak,
            adder_peak
        );
        rows += &format!(
            "| {} | {:.2} | {:.2} | {:.2}x | {:.2} | {:.2} | {:.2}x | {:.1} | {:.1} | {:.2} | {:.0} |\n",
            c.name,
            cf.median_ms,
            af.median_ms,
            af.median_ms / cf.median_ms,
            cb.median_ms,
            ab.median_ms,
            ab.median_ms / cb.median_ms,
            conv_peak,
            adder_peak,
            scratch_mib,
            naive_mib
        );
    }
    println!(
        "total fwd+bwd over the shapes: conv {conv_total:.1} ms, adder {adder_total:.1} ms, ratio {:.2}x (target <= 3x)",
        adder_total / conv_total
    );
    let body = format!(
        "## Benchmark: adder layer vs nn-core conv2d (batch {}, {threads} threads)\n\n\
         Median of {} runs in ms, both measured in this run on a shared 2-core machine (other jobs were running, so absolute \
         times are noisy; the ratios are the result). Forward+backward = forward, `sum` and backward for input and filters. \
         Peak +MiB: rise of the process's peak resident set during the forward+backward runs over the resident set before them \
         (`/proc/self/status` VmHWM after a reset through `clear_refs`; the allocator keeps freed buffers, so after the first \
         shape this mostly reads 0: nothing new was needed). Adder scratch: the kernel's per-worker buffers (column matrix, its \
         gradient, padded dY of one image) times the threads, from the geometry; naive unfold: the (Cout x K x N*L) tensor a \
         broadcast-and-reduce implementation (e.g. the released PyTorch code) would materialise.\n\n\
         | shape | conv fwd | adder fwd | ratio | conv fwd+bwd | adder fwd+bwd | ratio | conv peak +MiB | adder peak +MiB | adder scratch MiB | naive unfold MiB |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n{rows}\n\
         Total forward+backward over these shapes: conv {conv_total:.1} ms, adder {adder_total:.1} ms, **{:.2}x** (target <= 3x).\n\n```\n{}\n```\n",
        a.batch,
        a.runs,
        adder_total / conv_total,
        nn_core::report::command_line()
    );
    let page = nn_core::report::write_section(RESULTS, TITLE, "bench", &body)?;
    eprintln!("written to {}", page.display());
    Ok(())
}

/// A fully resolved run.
struct Resolved {
    model: String,
    dataset: String,
    epochs: usize,
    batch_size: usize,
    lr: f64,
    weight_decay: f64,
}

fn resolve(c: &Common) -> Result<Resolved> {
    let p = match &c.preset {
        Some(n) => Some(PRESETS.iter().find(|p| p.name == n).with_context(|| {
            format!(
                "unknown preset `{n}`; valid: {}",
                PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
            )
        })?),
        None => None,
    };
    let r = Resolved {
        model: c.model.clone().or(p.map(|p| p.model.into())).unwrap_or_else(|| "lenet5-bn".into()),
        dataset: c.dataset.clone().or(p.map(|p| p.dataset.into())).unwrap_or_else(|| "mnist".into()),
        epochs: c.epochs.or(p.map(|p| p.epochs)).unwrap_or(1),
        batch_size: c.batch_size.or(p.map(|p| p.batch_size)).unwrap_or(128),
        lr: c.lr.or(p.map(|p| p.lr)).unwrap_or(0.1),
        weight_decay: c.weight_decay.or(p.map(|p| p.weight_decay)).unwrap_or(5e-4),
    };
    if !MODEL_NAMES.iter().any(|(n, _)| *n == r.model) {
        bail!(
            "unknown model `{}`; valid: {}",
            r.model,
            MODEL_NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        );
    }
    if r.epochs == 0 || r.batch_size < 2 || !(r.lr > 0.0) || c.eta < 0.0 {
        bail!("need --epochs >= 1, --batch-size >= 2, --lr > 0 and --eta >= 0");
    }
    Ok(r)
}

/// Trains `method` (cnn, ann, pkkd) and writes summary.json and the results section.
fn train(method: &str, c: &Common) -> Result<serde_json::Value> {
    if !["cnn", "ann", "pkkd"].contains(&method) {
        bail!("unknown method `{method}`; valid: cnn, ann, pkkd");
    }
    let r = resolve(c)?;
    let d = standard_data(&c.data.spec(&r.dataset, r.batch_size, c.seed))?;
    let mc = d.model_config;
    let dev = Device::Cpu;
    let vs = VarStore::new(c.seed, &dev);
    let out = c
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/adder-{}-{}-{}-s{}", r.model, method, r.dataset, c.seed)));
    let mut cfg = TrainConfig::new(&r.model, &r.dataset, r.epochs, &out);
    cfg.batch_size = r.batch_size;
    cfg.seed = c.seed;
    cfg.optimizer = OptimizerConfig::sgd_nesterov(r.lr, r.weight_decay);
    cfg.schedule = Schedule::cosine(0.0);
    cfg.checkpoint_every = 200;
    cfg.overwrite = c.overwrite;
    cfg.resume = c.resume;
    cfg.quiet = c.quiet;
    cfg.stop_after_steps = c.max_steps;
    cfg.command = nn_core::report::command_line();
    let chw = (mc.in_channels, mc.image_size, mc.image_size);

    let factory = AdderFactory::new(AdderConfig::default());
    let pkkd_cfg = PkkdConfig {
        sigma_ann: c.sigma_ann,
        sigma_cnn: c.sigma_cnn,
        feature_weight: c.feature_weight,
        kd_weight: c.kd_weight,
        temperature: c.temperature,
        teacher_weight: 1.0,
        layers: c.layers.clone(),
    };
    let mut single: Option<Box<dyn Model>> = None;
    let mut pair: Option<PkkdPair> = None;
    match method {
        "cnn" => single = Some(create_model(&r.model, &mc, &vs.root(), &StandardFactory)?),
        "ann" => single = Some(create_model(&r.model, &mc, &vs.root(), &factory)?),
        _ => pair = Some(PkkdPair::new(&vs.root(), &r.model, &mc, pkkd_cfg.clone(), AdderConfig::default())?),
    }
    let model: &dyn Model = match (&single, &pair) {
        (Some(m), _) => m.as_ref(),
        (_, Some(p)) => p,
        _ => unreachable!(),
    };
    let counted: &dyn Model = match &pair {
        Some(p) => p.student.as_ref(),
        None => model,
    };
    let (counts, _) = adder_nets::count(counted, chw, &dev)?;
    eprintln!(
        "training {} [{method}] on {} ({} train / {} test), {} epochs, seed {}: {} params, {} multiplications, {} additions, {:.2} uJ per image",
        r.model, r.dataset, d.num_train, d.num_test, r.epochs, c.seed, counts.params, counts.multiplications, counts.additions, counts.energy_uj
    );
    let mut trainer = Trainer::new(cfg, model, &vs)?;
    let registry = match (&pair, method) {
        (Some(p), _) => Some(p.registry()),
        (None, "ann") => Some(factory.registry()),
        _ => None,
    };
    if let (Some(reg), true) = (registry, c.eta > 0.0) {
        trainer.add_callback(Box::new(AdaptiveLr::new(reg, c.eta)));
    }
    if let Some(p) = &pair {
        let cb: Box<dyn Callback + '_> = Box::new(PkkdLoss::new(p));
        trainer.add_callback(cb);
    }
    let summary = trainer.fit(&d.train, Some(&d.test))?;
    drop(trainer);
    let v = write_summary(
        &out,
        &summary,
        method,
        &counts,
        c,
        pair.as_ref().map(|p| &p.config),
        vs.num_params(),
    )?;
    let name = crate::grid::run_name(&out);
    let mut notes =
        format!(
        "Method `{method}`{}. Per image: {} multiplications, {} additions, energy {:.3} uJ (45 nm: add 0.9 pJ, mul 3.7 pJ); {} params{}.",
        if method == "cnn" { String::new() } else { format!(", adaptive-LR eta {}", c.eta) },
        counts.multiplications,
        counts.additions,
        counts.energy_uj,
        counts.params,
        if method == "pkkd" { format!(" (student; {} with the teacher and maps)", vs.num_params()) } else { String::new() }
    );
    if let Some(p) = &pair {
        notes += &format!(" PKKD {:?}.", p.config);
    }
    c.data.append_subset_note(&mut notes);
    if c.no_results || c.max_steps.is_some() {
        // a partial (--max-steps) run is not a result
        eprintln!("summary: {}/summary.json (no results section written)", out.display());
    } else {
        let page = nn_core::report::write_section(&c.results, TITLE, &name, &summary_markdown(&name, &summary, &notes))?;
        eprintln!("summary: {}/summary.json; table: {}", out.display(), page.display());
    }
    Ok(v)
}

fn write_summary(
    out: &std::path::Path,
    s: &TrainSummary,
    method: &str,
    counts: &AdderCounts,
    c: &Common,
    pkkd: Option<&PkkdConfig>,
    all_params: usize,
) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(s)?;
    if let Some(m) = v.as_object_mut() {
        m.insert("method".into(), method.into());
        m.insert("params".into(), counts.params.into());
        m.insert("params_trained".into(), all_params.into());
        m.insert("multiplications".into(), counts.multiplications.into());
        m.insert("additions".into(), counts.additions.into());
        m.insert("energy_uj".into(), counts.energy_uj.into());
        if method != "cnn" {
            m.insert("eta".into(), c.eta.into());
        }
        if let Some(p) = pkkd {
            m.insert("pkkd".into(), serde_json::to_value(p)?);
        }
        m.insert("train_subset".into(), serde_json::to_value(c.data.train_subset)?);
        m.insert("test_subset".into(), serde_json::to_value(c.data.test_subset)?);
    }
    std::fs::create_dir_all(out)?;
    let p = out.join("summary.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&v)?).with_context(|| format!("writing {}", p.display()))?;
    Ok(v)
}

fn compare(a: CompareArgs) -> Result<()> {
    let r = resolve(&a.common)?;
    let mut rows = Vec::new();
    for method in &a.methods {
        let mut runs = Vec::new();
        for &seed in &a.seeds {
            let out = PathBuf::from(format!("runs/{}-{}-{}-s{seed}", a.prefix, r.dataset, method));
            let done = std::fs::read(out.join("summary.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .filter(|v| v["completed"].as_bool() == Some(true) && v["epochs"].as_u64() == Some(r.epochs as u64));
            let v = match done {
                Some(v) => v,
                None => {
                    let mut c = a.common.clone();
                    c.seed = seed;
                    c.out = Some(out.clone());
                    c.overwrite = !c.resume;
                    train(method, &c)?
                }
            };
            runs.push(v);
        }
        rows.push((method.clone(), runs));
    }
    let stats = nn_core::experiment::mean_std;
    let c = &a.common;
    let mut t = format!(
        "## CNN vs ANN vs ANN+PKKD: {} on {}\n\nBudget per run: {} epochs, batch {}, SGD Nesterov (momentum 0.9) lr {} cosine, weight decay {}, adaptive-LR eta {}{}; seeds {:?}. \
         Mean +- sample std of the final test top-1. PKKD: sigma_ann {}, sigma_cnn {}, feature weight {}, KD weight {}, T {}.\n\n\
         | method | test top-1 % (mean +- std) | per seed | multiplications / image | additions / image | energy uJ / image | mean wall s |\n|---|---|---|---|---|---|---|\n",
        r.model,
        r.dataset,
        r.epochs,
        r.batch_size,
        r.lr,
        r.weight_decay,
        c.eta,
        c.data.subset_clause(),
        a.seeds,
        c.sigma_ann,
        c.sigma_cnn,
        c.feature_weight,
        c.kd_weight,
        c.temperature
    );
    let mut means = Vec::new();
    for (m, runs) in &rows {
        let accs: Vec<f64> = runs.iter().map(|v| v["test_top1"].as_f64().unwrap_or(f64::NAN)).collect();
        let walls: Vec<f64> = runs.iter().map(|v| v["wall_s"].as_f64().unwrap_or(0.0)).collect();
        let mean = stats(&accs).0;
        means.push((m.clone(), mean));
        let v0 = &runs[0];
        let ms = nn_core::experiment::mean_std_cell(&accs);
        t += &format!(
            "| {m} | {ms} | {} | {} | {} | {:.3} | {:.0} |\n",
            accs.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", "),
            v0["multiplications"],
            v0["additions"],
            v0["energy_uj"].as_f64().unwrap_or(f64::NAN),
            stats(&walls).0
        );
    }
    let get = |k: &str| means.iter().find(|(m, _)| m == k).map(|x| x.1);
    if let (Some(cnn), Some(ann)) = (get("cnn"), get("ann")) {
        t += &format!("\nGap CNN - ANN: {:.2} points.", cnn - ann);
        if let Some(p) = get("pkkd") {
            t += &format!(
                " Gap CNN - (ANN+PKKD): {:.2} points; PKKD {} the ANN by {:.2} points in this run.",
                cnn - p,
                if p >= ann { "improves on" } else { "falls behind" },
                (p - ann).abs()
            );
        }
        t += "\n";
    }
    t += &format!("\n```\n{}\n```\n", nn_core::report::command_line());
    println!("{t}");
    match compare_section(&a, &r.model, &r.dataset) {
        Some(section) if a.common.max_steps.is_none() => {
            let page = nn_core::report::write_section(RESULTS, TITLE, &section, &t)?;
            eprintln!("table: {}", page.display());
        }
        _ => eprintln!("table not written: a grid over part of the methods, or of stopped (--max-steps) runs, is not a result"),
    }
    Ok(())
}

/// The results section of a comparison: `<prefix>-<model>-<dataset>` for the default seeds,
/// with `-seeds-<list>` for another seed set, `None` when some of CNN, ANN and ANN+PKKD are
/// left out (a grid split over processes by `--methods` must not replace the full table).
fn compare_section(a: &CompareArgs, model: &str, dataset: &str) -> Option<String> {
    if !crate::grid::covers_all(COMPARE_METHODS, &a.methods) {
        return None;
    }
    Some(crate::grid::seeded_section(&format!("{}-{model}-{dataset}", a.prefix), &a.seeds))
}

/// Writes CIFAR-10 binary batches and an ImageNet class-folder tree (two classes) under `root`
/// in the official layouts.
fn generate_datasets(root: &std::path::Path) -> Result<()> {
    crate::test_files::write_cifar10(root, 8)?;
    crate::test_files::write_imagenet(root, 2, 2)?;
    Ok(())
}

fn check_presets() -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("adder-check-presets-{}", std::process::id()));
    generate_datasets(&tmp)?;
    let mut lines = Vec::new();
    for p in PRESETS {
        for method in ["ann", "pkkd"] {
            let c = Common {
                preset: Some(p.name.into()),
                model: None,
                dataset: None,
                epochs: None,
                seed: 0,
                batch_size: Some(2),
                lr: None,
                weight_decay: None,
                eta: 0.2,
                sigma_ann: 1.0,
                sigma_cnn: 2.0,
                feature_weight: 1.0,
                kd_weight: 1.0,
                temperature: 4.0,
                layers: Vec::new(),
                data: DataArgs {
                    data: if p.dataset == "mnist" { None } else { Some(tmp.clone()) },
                    ..Default::default()
                },
                out: Some(tmp.join(format!("run-{}-{method}", p.name))),
                max_steps: Some(1),
                overwrite: true,
                resume: false,
                quiet: true,
                results: RESULTS.into(),
                no_results: true,
            };
            let t0 = std::time::Instant::now();
            let r = train(method, &c);
            let line = match r {
                Ok(v) => format!(
                    "{:<24} {:<5} ok: {} on {}, {} multiplications + {} additions per image, one optimizer step with a finite loss, {:.1} s",
                    p.name,
                    method,
                    p.model,
                    p.dataset,
                    v["multiplications"],
                    v["additions"],
                    t0.elapsed().as_secs_f64()
                ),
                Err(e) => format!("{:<24} {:<5} FAILED: {e:#}", p.name, method),
            };
            println!("{line}");
            lines.push(line);
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let body = format!(
        "## Presets: one step on generated files\n\nEach preset's model, dataset pipeline, optimizer and adaptive learning rate, as ANN and as ANN+PKKD, for one \
         optimizer step at batch 2 on files generated in the official layouts (CIFAR-10 binary batches, ImageNet `train|val/<wnid>/*.JPEG`; \
         MNIST from the real files).\n\n```\n{}\n```\n\n```\n{}\n```\n",
        lines.join("\n"),
        nn_core::report::command_line()
    );
    nn_core::report::write_section(RESULTS, TITLE, "check-presets", &body)?;
    if lines.iter().any(|l| l.contains("FAILED")) {
        bail!("some presets failed");
    }
    Ok(())
}

/// The AdderNet row of `cargo xtask demo`: counts of the CNN and the ANN LeNet-5-BN, then the
/// ANN trained on (a 10k subset of) MNIST with the adaptive learning rate.
pub fn demo(epochs: usize, seed: u64) -> Result<()> {
    println!("\n== compact-vision demo: adder-nets (AdderNet LeNet-5-BN on MNIST) ==\n");
    let c = Common {
        preset: Some("mnist-lenet5bn-cpu".into()),
        model: None,
        dataset: None,
        epochs: Some(epochs),
        seed,
        batch_size: None,
        lr: None,
        weight_decay: None,
        eta: 0.2,
        sigma_ann: 1.0,
        sigma_cnn: 2.0,
        feature_weight: 1.0,
        kd_weight: 1.0,
        temperature: 4.0,
        layers: Vec::new(),
        data: DataArgs {
            train_subset: Some(10000),
            ..Default::default()
        },
        out: Some(PathBuf::from("runs/demo-adder-lenet5bn-mnist")),
        max_steps: None,
        overwrite: true,
        resume: false,
        quiet: false,
        results: "docs/results/demo.md".into(),
        no_results: false,
    };
    let v = train("ann", &c)?;
    println!(
        "AdderNet LeNet-5-BN: test top-1 {:.2}%, {} multiplications and {} additions per image ({:.3} uJ at 45 nm)",
        v["test_top1"].as_f64().unwrap_or(f64::NAN),
        v["multiplications"],
        v["additions"],
        v["energy_uj"].as_f64().unwrap_or(f64::NAN)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct W {
        #[command(subcommand)]
        c: AdderCommand,
    }

    fn train_args(extra: &[&str]) -> Result<TrainArgs, clap::Error> {
        let mut argv = vec!["adder", "train"];
        argv.extend_from_slice(extra);
        match W::try_parse_from(argv)?.c {
            AdderCommand::Train(a) => Ok(a),
            _ => unreachable!("parsed a train command"),
        }
    }

    #[test]
    fn max_steps_has_the_old_name_as_alias_and_shared_data_flags() {
        let a = train_args(&["--max-steps", "3", "--train-subset", "100", "--data", "/d"]).unwrap();
        assert_eq!(a.common.max_steps, Some(3));
        assert_eq!(a.common.data.train_subset, Some(100));
        assert_eq!(a.common.data.data, Some(PathBuf::from("/d")));
        assert_eq!(train_args(&["--stop-after-steps", "5"]).unwrap().common.max_steps, Some(5));
        assert!(train_args(&["--max-steps", "x"]).is_err());
        assert!(train_args(&["--no-such-flag"]).is_err());
    }

    #[test]
    fn compare_table_is_written_only_for_every_method_and_is_keyed_by_seeds() {
        let args = |extra: &[&str]| {
            let mut argv = vec!["adder", "compare"];
            argv.extend_from_slice(extra);
            match W::try_parse_from(argv).unwrap().c {
                AdderCommand::Compare(a) => a,
                _ => unreachable!("parsed a compare command"),
            }
        };
        let section = |extra: &[&str]| compare_section(&args(extra), "resnet20-b", "cifar10");
        assert_eq!(section(&[]).as_deref(), Some("adder-cmp-resnet20-b-cifar10"));
        assert_eq!(
            section(&["--prefix", "p", "--seeds", "1"]).as_deref(),
            Some("p-resnet20-b-cifar10-seeds-1")
        );
        // a grid split over processes by --methods does not write (and so cannot replace) the table
        assert_eq!(section(&["--methods", "cnn"]), None);
        assert_eq!(section(&["--methods", "cnn,ann"]), None);
        assert_eq!(
            section(&["--methods", "pkkd,cnn,ann"]).as_deref(),
            Some("adder-cmp-resnet20-b-cifar10")
        );
    }
}
