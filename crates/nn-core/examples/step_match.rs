//! Step-by-step check that nn-core trains a CIFAR-10 ResNet-20 exactly like PyTorch.
//!
//! This side trains nn-core's ResNet-20 (shortcut option A, seed 0, the model `cargo xtask train
//! --preset cifar10-resnet20` builds) for K steps through the real [`Trainer`] (same loss,
//! optimizer and BatchNorm code as a training run), on the first K*B CIFAR-10 training images in
//! file order: nn-core's CIFAR reader and the `cifar10` pipeline of
//! [`nn_core::experiment::standard_data`] with augmentation off and shuffling off (pixels / 255,
//! then the per-channel normalisation), batch B = 128, SGD with Nesterov momentum 0.9, constant
//! lr 0.1, weight decay 5e-4 on all parameters, BatchNorm in training mode. It writes to `--out`:
//! - `initial.safetensors`: the initial variables (BatchNorm running statistics included),
//!   under nn-core's names (`layer1.0.conv1.weight`, ...);
//! - `checkpoint.safetensors`: the trainer's checkpoint after step K: `model/<name>` (weights and
//!   BatchNorm running statistics) and `optim/<name>.momentum_buffer` (SGD momentum buffers);
//! - `steps.json`: the configuration, the dataset directory used and one entry per step: loss,
//!   train top-1 of the batch, global gradient L2 norm (before weight decay), learning rate, and
//!   sha256 digests of the input batch (f32 little-endian) and its labels (u32 little-endian);
//! - `batch0.safetensors`: the first input batch and its labels (to check the inputs bit for bit);
//! - with `--snapshot-every N`: `state_SSSS.safetensors` (checkpoint layout) after steps
//!   N, N+1, 2N, 2N+1, ... (and 1), so the PyTorch side can replay single steps from nn-core's own
//!   state ("teacher forcing"); the run is then split into trainer sessions that stop and resume
//!   at those steps (resume restores weights and optimizer state exactly).
//!
//! The PyTorch side, `bench/torch/step_match.py`, loads `initial.safetensors` into the ResNet-20
//! of `bench/torch/train_resnet20.py`, reads the same images the same way, runs the same K steps
//! with `torch.optim.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)` and prints the
//! per-step losses side by side and per-tensor differences of weights, BatchNorm statistics and
//! momentum buffers after step K (and of every replayed single step with `--replay`).
//!
//! ```text
//! RAYON_NUM_THREADS=1 nice -n 10 cargo run --release -p nn-core --example step_match -- \
//!     --steps 200 --snapshot-every 10 --out target/step_match/k200 [--data ROOT] [--threads 1]
//! python3 bench/torch/step_match.py target/step_match/k200 --replay --f64-reference
//! ```
//!
//! How to read the result is explained in the script's docstring: in short, at lr 0.1 rounding
//! alone makes two float32 runs drift apart within about ten steps, so the free run is compared
//! with PyTorch float32 vs float64 (`--f64-reference`), and the replayed single steps must agree
//! with PyTorch to float32 rounding.
//!
//! Other options: `--batch-size B` (128), `--lr` (0.1), `--momentum` (0.9), `--weight-decay`
//! (5e-4), `--seed` (0, the model's initialisation seed), `--no-winograd` (every convolution and
//! its gradients through im2col + gemm instead of the default Winograd F(2x2, 3x3) path of
//! [`nn_core::ops::set_winograd`], to see what that path's rounding changes). K * B must not
//! exceed the 49,920 images of one epoch (390 batches of 128). The dataset is found like every
//! `cargo xtask` command does (`--data ROOT` is a data root, e.g. `../shared/datasets`).

use anyhow::{bail, Context, Result};
use nn_core::candle_core::backprop::GradStore;
use nn_core::candle_core::DType;
use nn_core::data::registry::{locate, Split};
use nn_core::experiment::{standard_data, DataSpec};
use nn_core::models::create_model;
use nn_core::train::{topk_correct, Callback, OptimizerConfig, Schedule, StepContext, TrainConfig, Trainer};
use nn_core::{StandardFactory, VarStore};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

struct Args {
    steps: usize,
    batch_size: usize,
    out: PathBuf,
    data: Option<PathBuf>,
    threads: usize,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    seed: u64,
    snapshot_every: usize,
    no_winograd: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        steps: 20,
        batch_size: 128,
        out: PathBuf::from("target/step_match"),
        data: None,
        threads: 1,
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 5e-4,
        seed: 0,
        snapshot_every: 0,
        no_winograd: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("usage: step_match [--steps K] [--batch-size B] [--out DIR] [--data ROOT] [--threads N] [--lr X] [--momentum X] [--weight-decay X] [--seed S] [--snapshot-every N] [--no-winograd]\n(see the doc comment of crates/nn-core/examples/step_match.rs)");
            std::process::exit(0);
        }
        if flag == "--no-winograd" {
            a.no_winograd = true;
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("{flag} {value}: {e}");
        match flag.as_str() {
            "--steps" => a.steps = value.parse().map_err(|e| bad(&e))?,
            "--batch-size" => a.batch_size = value.parse().map_err(|e| bad(&e))?,
            "--out" => a.out = PathBuf::from(&value),
            "--data" => a.data = Some(PathBuf::from(&value)),
            "--threads" => a.threads = value.parse().map_err(|e| bad(&e))?,
            "--lr" => a.lr = value.parse().map_err(|e| bad(&e))?,
            "--momentum" => a.momentum = value.parse().map_err(|e| bad(&e))?,
            "--weight-decay" => a.weight_decay = value.parse().map_err(|e| bad(&e))?,
            "--seed" => a.seed = value.parse().map_err(|e| bad(&e))?,
            "--snapshot-every" => a.snapshot_every = value.parse().map_err(|e| bad(&e))?,
            other => bail!("unknown option `{other}` (try --help)"),
        }
    }
    if a.steps == 0 || a.batch_size < 2 {
        bail!("--steps must be >= 1 and --batch-size >= 2");
    }
    Ok(a)
}

fn sha256_hex(bytes: impl Iterator<Item = [u8; 4]>) -> String {
    let mut h = Sha256::new();
    for b in bytes {
        h.update(b);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Records what PyTorch has to reproduce at every step.
#[derive(Default)]
struct Recorder {
    steps: Vec<serde_json::Value>,
    grad_norm: f64,
}

impl Callback for Recorder {
    fn name(&self) -> String {
        "step_match".into()
    }

    /// Global L2 norm of the loss gradient (no weight decay), read only.
    fn after_backward(&mut self, step: &StepContext, grads: &mut GradStore) -> Result<()> {
        let mut sq = 0.0f64;
        for p in step.vs.trainable() {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                sq += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
            }
        }
        self.grad_norm = sq.sqrt();
        Ok(())
    }

    fn on_step_end(&mut self, step: &StepContext, loss: f64) -> Result<()> {
        let n = step.labels.dims()[0];
        let correct = topk_correct(&step.logits.detach(), step.labels, 1)?;
        let x = step.images.flatten_all()?.to_vec1::<f32>()?;
        let y = step.labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        self.steps.push(serde_json::json!({
            "step": step.global_step + 1,
            "lr": step.lr,
            "loss": loss,
            "top1": 100.0 * correct as f64 / n as f64,
            "grad_norm": self.grad_norm,
            "input_sha256": sha256_hex(x.iter().map(|v| v.to_le_bytes())),
            "labels_sha256": sha256_hex(y.iter().map(|v| v.to_le_bytes())),
        }));
        eprintln!(
            "step {:>4} loss {loss:.6} top1 {:.2}%",
            step.global_step + 1,
            100.0 * correct as f64 / n as f64
        );
        Ok(())
    }
}

fn main() -> Result<()> {
    nn_core::runtime::tune();
    let a = parse_args()?;
    nn_core::runtime::set_threads(a.threads)?;
    if a.no_winograd {
        nn_core::ops::set_winograd(false);
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;

    // The `cifar10` pipeline of `cargo xtask train`, without augmentation and shuffling.
    let mut spec = DataSpec::new("cifar10", a.batch_size, a.seed);
    spec.data_dir = a.data.clone();
    spec.augment = false;
    let data = standard_data(&spec)?;
    let train = data.train.shuffle(false).prefetch(0);
    let dataset_dir = locate("cifar10", Some(Split::Train), a.data.as_deref())?;
    let spe = train.len_batches();
    if a.steps > spe {
        bail!("--steps {} exceeds the {spe} batches of one epoch", a.steps);
    }
    eprintln!(
        "cifar10 from {}: {} training images, first {} in file order, batch {}, {} steps",
        dataset_dir.display(),
        data.num_train,
        a.steps * a.batch_size,
        a.batch_size,
        a.steps
    );
    let b0 = train.batch(0, 0)?;
    let mut first = HashMap::new();
    first.insert("images".to_string(), b0.images);
    first.insert("labels".to_string(), b0.labels.to_dtype(DType::I64)?);
    nn_core::candle_core::safetensors::save(&first, a.out.join("batch0.safetensors"))?;

    // The model and optimizer of `cargo xtask train --preset cifar10-resnet20`.
    let vs = VarStore::new(a.seed, &nn_core::candle_core::Device::Cpu);
    let model = create_model("resnet20", &data.model_config, &vs.root(), &StandardFactory)?;
    vs.save(a.out.join("initial.safetensors"))?;
    let mut cfg = TrainConfig::new("resnet20", "cifar10", 1, a.out.clone());
    cfg.batch_size = a.batch_size;
    cfg.seed = a.seed;
    cfg.optimizer = OptimizerConfig::Sgd {
        lr: a.lr,
        momentum: a.momentum,
        nesterov: a.momentum > 0.0,
        weight_decay: a.weight_decay,
        no_decay_bias_norm: false,
    };
    cfg.schedule = Schedule::Constant;
    cfg.quiet = true;
    cfg.command = nn_core::report::command_line();

    // Trainer sessions end at every snapshot step (and at K); each later one resumes.
    let mut ends = BTreeSet::new();
    if a.snapshot_every > 0 {
        ends.insert(1);
        for s in (a.snapshot_every..a.steps).step_by(a.snapshot_every) {
            ends.insert(s);
            ends.insert(s + 1);
        }
    }
    ends.retain(|&s| s <= a.steps);
    ends.insert(a.steps);
    let mut rec = Recorder::default();
    for (i, &end) in ends.iter().enumerate() {
        let mut c = cfg.clone();
        c.stop_after_steps = Some(end);
        c.resume = i > 0;
        c.overwrite = i == 0;
        Trainer::new(c, model.as_ref(), &vs)?.with_callback(&mut rec).fit(&train, None)?;
        if a.snapshot_every > 0 {
            let dst = a.out.join(format!("state_{end:04}.safetensors"));
            std::fs::copy(a.out.join("checkpoint.safetensors"), &dst).with_context(|| format!("writing {}", dst.display()))?;
        }
    }
    if rec.steps.len() != a.steps {
        bail!("recorded {} steps, expected {}", rec.steps.len(), a.steps);
    }

    let report = serde_json::json!({
        "model": "resnet20",
        "dataset_dir": dataset_dir,
        "steps": a.steps,
        "batch_size": a.batch_size,
        "lr": a.lr,
        "momentum": a.momentum,
        "nesterov": a.momentum > 0.0,
        "weight_decay": a.weight_decay,
        "seed": a.seed,
        "threads": a.threads,
        "snapshot_every": a.snapshot_every,
        "winograd": nn_core::ops::winograd_enabled(),
        "normalize_mean": nn_core::data::transforms::CIFAR10_MEAN,
        "normalize_std": nn_core::data::transforms::CIFAR10_STD,
        "records": rec.steps,
    });
    let path = a.out.join("steps.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "wrote {}, initial.safetensors and checkpoint.safetensors (after step {}) to {}",
        path.display(),
        a.steps,
        a.out.display()
    );
    Ok(())
}
