//! End-to-end tests of the training engine: exact resume, refusing to clobber other runs,
//! NaN handling, outputs, callbacks and actual learning.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::ModuleT;
use nn_core::layers::Linear;
use nn_core::models::{create_model, ModelConfig};
use nn_core::rng::seeded;
use nn_core::train::checkpoint::Checkpoint;
use nn_core::train::trainer::{CHECKPOINT_FILE, CURVES_FILE, METRICS_FILE, SUMMARY_FILE};
use nn_core::train::{
    BatchSource, Callback, EpochMetrics, FitContext, InMemorySource, OptimizerConfig, Schedule, StepContext, TrainConfig, TrainError,
    TrainSummary, Trainer,
};
use nn_core::{Model, StandardFactory, VarPath, VarStore};
use rand::Rng;
use std::path::{Path, PathBuf};

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nncore-train-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    d
}

/// `n` random images `[n, 1, 28, 28]` with random labels in 0..10.
fn random_images(n: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let mut rng = seeded(seed);
    let x: Vec<f32> = (0..n * 28 * 28).map(|_| rng.gen::<f32>() - 0.5).collect();
    let y: Vec<u32> = (0..n).map(|_| rng.gen_range(0..10)).collect();
    Ok((
        Tensor::from_vec(x, (n, 1, 28, 28), &Device::Cpu)?,
        Tensor::from_vec(y, n, &Device::Cpu)?,
    ))
}

fn lenet(seed: u64) -> Result<(VarStore, Box<dyn Model>)> {
    let vs = VarStore::new(seed, &Device::Cpu);
    let m = create_model("lenet5-bn", &ModelConfig::new(1, 10, 28), &vs.root(), &StandardFactory)?;
    Ok((vs, m))
}

fn small_config(dir: &Path) -> TrainConfig {
    let mut c = TrainConfig::new("lenet5-bn", "random16", 2, dir);
    c.batch_size = 4;
    c.optimizer = OptimizerConfig::Sgd {
        lr: 0.05,
        momentum: 0.9,
        nesterov: true,
        weight_decay: 5e-4,
        no_decay_bias_norm: true,
    };
    c.schedule = Schedule::cosine(0.001).with_warmup(0.5, 0.1);
    c.label_smoothing = 0.1;
    c.grad_clip_norm = Some(1.0);
    c.checkpoint_every = 3;
    c.quiet = true;
    c.seed = 7;
    c
}

fn sources() -> Result<(InMemorySource, InMemorySource)> {
    let (x, y) = random_images(16, 1)?;
    let (tx, ty) = random_images(8, 2)?;
    Ok((InMemorySource::new(x, y, 4, true, 7)?, InMemorySource::new(tx, ty, 4, false, 0)?))
}

/// Every variable (buffers included) as f32 vectors, sorted by name.
fn weights(vs: &VarStore) -> Result<Vec<(String, Vec<f32>)>> {
    let mut v: Vec<_> = vs
        .tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.flatten_all()?.to_vec1::<f32>()?)))
        .collect::<Result<_>>()?;
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

#[test]
fn interrupted_and_resumed_run_equals_uninterrupted_run() -> Result<()> {
    let (train, test) = sources()?;
    // uninterrupted reference
    let dir_a = tmp_dir("resume-a");
    let (vs_a, model_a) = lenet(11)?;
    let sum_a = Trainer::new(small_config(&dir_a), model_a.as_ref(), &vs_a)?.fit(&train, Some(&test))?;
    assert!(sum_a.completed);
    let hist_a = Checkpoint::load(&dir_a.join(CHECKPOINT_FILE))?.state.history;
    let w_a = weights(&vs_a)?;
    assert!(
        w_a.iter().any(|(k, _)| k.ends_with("running_var")),
        "BN buffers are part of the check"
    );

    // stop mid-epoch 2 (5 steps of 4+4), and exactly at the end of epoch 1 (4 steps)
    for stop in [5usize, 4, 3] {
        let dir_b = tmp_dir(&format!("resume-b{stop}"));
        let (vs_b, model_b) = lenet(11)?;
        let mut cfg = small_config(&dir_b);
        cfg.stop_after_steps = Some(stop);
        let partial = Trainer::new(cfg, model_b.as_ref(), &vs_b)?.fit(&train, Some(&test))?;
        assert!(!partial.completed);
        let ck = Checkpoint::load(&dir_b.join(CHECKPOINT_FILE))?;
        assert_eq!(ck.state.global_step, stop);
        assert_eq!((ck.state.epoch, ck.state.step_in_epoch), (stop / 4, stop % 4));
        drop((vs_b, model_b));

        // a new process: a model initialised differently, then resumed
        let (vs_c, model_c) = lenet(999)?;
        assert_ne!(weights(&vs_c)?, w_a);
        let cfg = TrainConfig::for_resume(&dir_b)?;
        assert_eq!(cfg.identity(), small_config(&dir_b).identity());
        let sum_c = Trainer::new(cfg, model_c.as_ref(), &vs_c)?.fit(&train, Some(&test))?;
        assert!(sum_c.completed);
        let w_c = weights(&vs_c)?;
        for ((ka, va), (kc, vc)) in w_a.iter().zip(&w_c) {
            assert_eq!(ka, kc);
            let max = va.iter().zip(vc).map(|(a, c)| (a - c).abs()).fold(0.0f32, f32::max);
            assert!(max == 0.0, "stop {stop}: `{ka}` differs by {max} after resume");
        }
        let hist_c = Checkpoint::load(&dir_b.join(CHECKPOINT_FILE))?.state.history;
        assert_eq!(hist_a.len(), hist_c.len());
        for (a, c) in hist_a.iter().zip(&hist_c) {
            assert_eq!(
                (a.train_loss, a.train_top1, a.test_loss, a.test_top1, a.lr),
                (c.train_loss, c.train_top1, c.test_loss, c.test_top1, c.lr)
            );
        }
        assert_eq!(sum_a.test_top1, sum_c.test_top1);
        std::fs::remove_dir_all(&dir_b).ok();
    }
    std::fs::remove_dir_all(&dir_a).ok();
    Ok(())
}

#[test]
fn outputs_are_written_and_other_runs_are_not_clobbered() -> Result<()> {
    let (train, test) = sources()?;
    let dir = tmp_dir("outputs");
    let (vs, model) = lenet(3)?;
    let mut cfg = small_config(&dir);
    cfg.command = "train --model lenet5-bn".into();
    cfg.accuracy_thresholds = vec![0.0, 101.0];
    let s = Trainer::new(cfg.clone(), model.as_ref(), &vs)?.fit(&train, Some(&test))?;

    let lines: Vec<EpochMetrics> = std::fs::read_to_string(dir.join(METRICS_FILE))?
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1].epoch, 2);
    assert!(lines
        .iter()
        .all(|m| m.test_top1.is_some() && m.train_loss.is_finite() && m.images_per_s > 0.0));
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(SUMMARY_FILE))?)?;
    for k in [
        "model",
        "dataset",
        "epochs",
        "seed",
        "test_top1",
        "test_top5",
        "params",
        "macs",
        "train_images_per_s",
        "eval_images_per_s",
        "wall_s",
        "command",
        "batch_size",
        "optimizer",
        "lr",
        "schedule",
        "time_to_accuracy",
        "started",
        "finished",
    ] {
        assert!(raw.get(k).is_some(), "summary.json lacks `{k}`");
    }
    let back: TrainSummary = serde_json::from_value(raw)?;
    assert_eq!(back.model, s.model);
    assert_eq!(back.params, vs.num_params());
    assert!(back.macs > 100_000, "{}", back.macs);
    assert_eq!(back.optimizer, "sgd");
    assert_eq!(back.command, "train --model lenet5-bn");
    assert_eq!(back.time_to_accuracy[0].epoch, Some(1));
    assert_eq!(back.time_to_accuracy[1].wall_s, None);
    let svg = std::fs::read_to_string(dir.join(CURVES_FILE))?;
    assert!(
        svg.contains("<svg") && svg.contains("polyline") || svg.contains("path"),
        "{}",
        &svg[..svg.len().min(300)]
    );

    // same directory, different config, no resume: refused, and the checkpoint is untouched
    let before = std::fs::read(dir.join(CHECKPOINT_FILE))?;
    let (vs2, model2) = lenet(3)?;
    let mut other = cfg.clone();
    other.optimizer = OptimizerConfig::adamw(1e-3, 0.01);
    let e = format!(
        "{:#}",
        Trainer::new(other.clone(), model2.as_ref(), &vs2)?
            .fit(&train, Some(&test))
            .unwrap_err()
    );
    assert!(e.contains("different run") && e.contains("optimizer"), "{e}");
    // the same config without resume is refused too
    let e = format!(
        "{:#}",
        Trainer::new(cfg.clone(), model2.as_ref(), &vs2)?
            .fit(&train, Some(&test))
            .unwrap_err()
    );
    assert!(e.contains("resume") && e.contains("overwrite"), "{e}");
    // resume with a different config is refused
    other.resume = true;
    let e = format!(
        "{:#}",
        Trainer::new(other.clone(), model2.as_ref(), &vs2)?
            .fit(&train, Some(&test))
            .unwrap_err()
    );
    assert!(e.contains("different run configuration"), "{e}");
    assert_eq!(before, std::fs::read(dir.join(CHECKPOINT_FILE))?);
    // explicit overwrite starts over
    other.resume = false;
    other.overwrite = true;
    other.epochs = 1;
    let s2 = Trainer::new(other, model2.as_ref(), &vs2)?.fit(&train, Some(&test))?;
    assert_eq!(s2.optimizer, "adamw");
    assert_eq!(std::fs::read_to_string(dir.join(METRICS_FILE))?.lines().count(), 1);

    // a corrupted checkpoint: resume fails naming the file
    let p = dir.join(CHECKPOINT_FILE);
    let bytes = std::fs::read(&p)?;
    std::fs::write(&p, &bytes[..bytes.len() - 100])?;
    let mut r = cfg.clone();
    r.resume = true;
    let e = format!(
        "{:#}",
        Trainer::new(r, model2.as_ref(), &vs2)?.fit(&train, Some(&test)).unwrap_err()
    );
    assert!(e.contains(&p.display().to_string()), "{e}");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// Returns a NaN extra loss at one global step.
struct NanAt(usize);
impl Callback for NanAt {
    fn name(&self) -> String {
        "nan".into()
    }
    fn extra_loss(&mut self, step: &StepContext) -> Result<Option<Tensor>> {
        Ok((step.global_step == self.0)
            .then(|| Tensor::new(f32::NAN, &Device::Cpu))
            .transpose()?)
    }
}

#[test]
fn nan_loss_stops_with_epoch_and_step_and_keeps_the_checkpoint() -> Result<()> {
    let (train, test) = sources()?;
    let dir = tmp_dir("nan");
    let (vs, model) = lenet(5)?;
    let err = Trainer::new(small_config(&dir), model.as_ref(), &vs)?
        .with_callback(NanAt(5))
        .fit(&train, Some(&test))
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("epoch 2 step 2") && msg.contains("last finite loss: Some("), "{msg}");
    assert!(matches!(
        err.downcast_ref::<TrainError>(),
        Some(TrainError::NonFiniteLoss { global_step: 5, .. })
    ));
    // no NaN update reached the weights, and the checkpoint is the one of the end of epoch 1
    assert!(weights(&vs)?.iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
    let ck = Checkpoint::load(&dir.join(CHECKPOINT_FILE))?;
    assert_eq!(ck.state.global_step, 4);
    assert!(ck
        .model
        .values()
        .all(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite())));
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// A linear classifier on flattened inputs.
struct LinearModel(Linear, usize);
impl Model for LinearModel {
    fn name(&self) -> &str {
        "linear"
    }
    fn forward_features(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        x.flatten_from(1)
    }
    fn forward_head(&self, f: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.0.forward_t(f, train)
    }
    fn num_classes(&self) -> usize {
        self.1
    }
    fn num_features(&self) -> usize {
        self.0.in_features()
    }
}

/// Counts steps and epochs (state kept across resume), adds a small L2 penalty.
#[derive(Default)]
struct Recorder {
    steps: usize,
    epochs: usize,
    penalty_seen: bool,
}
impl Callback for Recorder {
    fn name(&self) -> String {
        "recorder".into()
    }
    fn extra_loss(&mut self, step: &StepContext) -> Result<Option<Tensor>> {
        let w = step.vs.get("fc.weight").expect("fc.weight").var;
        self.penalty_seen = true;
        Ok(Some(w.as_tensor().sqr()?.sum_all()?.affine(1e-4, 0.0)?))
    }
    fn on_step_end(&mut self, step: &StepContext, loss: f64) -> Result<()> {
        assert!(loss.is_finite() && step.lr > 0.0);
        self.steps += 1;
        Ok(())
    }
    fn on_epoch_end(&mut self, m: &EpochMetrics, ctx: &FitContext) -> Result<()> {
        self.epochs += 1;
        assert_eq!(m.epoch, ctx.state.epoch);
        Ok(())
    }
    fn state(&self) -> Result<Option<serde_json::Value>> {
        Ok(Some(serde_json::json!({"steps": self.steps, "epochs": self.epochs})))
    }
    fn load_state(&mut self, s: &serde_json::Value) -> Result<()> {
        self.steps = s["steps"].as_u64().unwrap_or(0) as usize;
        self.epochs = s["epochs"].as_u64().unwrap_or(0) as usize;
        Ok(())
    }
}

/// Gaussian blobs around 4 class centres in 8 dimensions.
fn blobs(n: usize, seed: u64) -> Result<InMemorySource> {
    let mut rng = seeded(seed);
    let centres: Vec<Vec<f32>> = (0..4)
        .map(|c| (0..8).map(|d| if d % 4 == c { 2.0 } else { 0.0 }).collect())
        .collect();
    let mut x = Vec::new();
    let mut y = Vec::new();
    for _ in 0..n {
        let c = rng.gen_range(0..4usize);
        x.extend(centres[c].iter().map(|v| v + (rng.gen::<f32>() - 0.5)));
        y.push(c as u32);
    }
    InMemorySource::new(
        Tensor::from_vec(x, (n, 1, 1, 8), &Device::Cpu)?,
        Tensor::from_vec(y, n, &Device::Cpu)?,
        16,
        true,
        seed,
    )
}

#[test]
fn learns_separable_data_with_adamw_and_callbacks() -> Result<()> {
    let train = blobs(128, 1)?;
    let test = blobs(64, 2)?;
    let dir = tmp_dir("learn");
    let vs = VarStore::new(0, &Device::Cpu);
    let vp: VarPath = vs.root().pp("fc");
    let model = LinearModel(Linear::new(&vp, 8, 4, true)?, 4);
    let mut cfg = TrainConfig::new("linear", "blobs", 6, dir.clone());
    cfg.optimizer = OptimizerConfig::adamw(0.05, 0.01);
    cfg.schedule = Schedule::step(&[4], 0.1);
    cfg.quiet = true;
    cfg.stop_after_steps = Some(20); // 8 batches per epoch: stop mid-epoch 3
    let mut tr = Trainer::new(cfg.clone(), &model, &vs)?.with_callback(Recorder::default());
    let s = tr.fit(&train, Some(&test))?;
    assert!(!s.completed && s.epochs_completed == 2);
    assert!(tr.state().callbacks.contains_key("recorder"));
    drop(tr);
    cfg.stop_after_steps = None;
    cfg.resume = true;
    let mut rec = Recorder::default();
    let s = {
        let mut tr = Trainer::new(cfg, &model, &vs)?.with_callback(&mut rec);
        tr.fit(&train, Some(&test))?
    };
    assert!(s.completed);
    assert_eq!((rec.steps, rec.epochs), (48, 6), "callback state survives resume");
    assert!(rec.penalty_seen);
    assert!(s.test_top1.unwrap() >= 95.0, "{s:?}");
    assert!(s.test_top5.unwrap() == 100.0);
    assert!(s.train_loss.unwrap() < 0.3, "{s:?}");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

#[test]
fn batch_source_contract_is_checked() -> Result<()> {
    /// Reports 3 batches but yields 2.
    struct Short(InMemorySource);
    impl BatchSource for Short {
        fn num_batches(&self) -> usize {
            3
        }
        fn num_examples(&self) -> usize {
            self.0.num_examples()
        }
        fn batches(&self, epoch: usize, start: usize) -> Box<dyn Iterator<Item = Result<(Tensor, Tensor)>> + '_> {
            Box::new(self.0.batches(epoch, start).take(2usize.saturating_sub(start)))
        }
    }
    let (x, y) = random_images(8, 3)?;
    let src = Short(InMemorySource::new(x, y, 4, false, 0)?);
    let dir = tmp_dir("short");
    let (vs, model) = lenet(1)?;
    let mut cfg = small_config(&dir);
    cfg.epochs = 1;
    let e = Trainer::new(cfg, model.as_ref(), &vs)?.fit(&src, None).unwrap_err().to_string();
    assert!(e.contains("yielded 2 batches") && e.contains("reports 3"), "{e}");
    let _ = DType::F32;
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

#[test]
fn resnet20_trains_a_few_steps() -> Result<()> {
    // one step of 8 images: candle's CPU conv backward dominates (seconds at this size)
    let mut rng = seeded(4);
    let n = 8;
    let x: Vec<f32> = (0..n * 3 * 32 * 32).map(|_| rng.gen::<f32>() - 0.5).collect();
    let y: Vec<u32> = (0..n).map(|_| rng.gen_range(0..10)).collect();
    let x = Tensor::from_vec(x, (n, 3, 32, 32), &Device::Cpu)?;
    let y = Tensor::from_vec(y, n, &Device::Cpu)?;
    let train = InMemorySource::new(x.clone(), y.clone(), 8, true, 4)?;
    let test = InMemorySource::new(x, y, 8, false, 0)?;
    let dir = tmp_dir("resnet20");
    let vs = VarStore::new(0, &Device::Cpu);
    let model = create_model("resnet20", &ModelConfig::new(3, 10, 32), &vs.root(), &StandardFactory)?;
    let mut cfg = TrainConfig::new("resnet20", "random", 1, dir.clone());
    cfg.optimizer = OptimizerConfig::Sgd {
        lr: 0.1,
        momentum: 0.9,
        nesterov: false,
        weight_decay: 1e-4,
        no_decay_bias_norm: false,
    };
    cfg.quiet = true;
    let s = Trainer::new(cfg, model.as_ref(), &vs)?.fit(&train, Some(&test))?;
    assert!((260_000..280_000).contains(&s.params), "{}", s.params);
    assert!((35_000_000..45_000_000).contains(&s.macs), "{}", s.macs);
    assert!(s.train_loss.unwrap().is_finite() && s.train_images_per_s > 0.0);
    eprintln!(
        "resnet20: {:.1} train img/s, {:.1} eval img/s",
        s.train_images_per_s, s.eval_images_per_s
    );
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
