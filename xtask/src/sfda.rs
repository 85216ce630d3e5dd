//! `cargo xtask sfda`: source-free domain adaptation (domain-adapt). For every seed: train the
//! source model (or reuse the one a previous run saved), evaluate it on the target test split
//! (source-only), adapt copies of it with SHOT-IM and SFDA-DE on the unlabelled target training
//! split, evaluate again. Each method writes `runs/<prefix>-<src>2<tgt>-<method>-s<seed>/summary.json`;
//! the mean +- std table over seeds goes into `docs/results/domain-adapt.md`.

use anyhow::{bail, Context, Result};
use clap::Args;
use domain_adapt::*;
use nn_core::data::{LoadOptions, Split};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

const RESULTS: &str = "docs/results/domain-adapt.md";
const TITLE: &str = "domain-adapt results";

/// Options of `cargo xtask sfda`.
#[derive(Args, Debug, Clone)]
pub struct SfdaArgs {
    /// Source dataset (nn-core registry name: mnist, usps, fashion-mnist, ...).
    #[arg(long, default_value = "mnist")]
    pub source: String,
    /// Target dataset (registry name); ignored when --target-dir is given.
    #[arg(long, default_value = "usps")]
    pub target: String,
    /// An IDX folder (MNIST file names, any image size and class count) used as the target.
    #[arg(long)]
    pub target_dir: Option<PathBuf>,
    /// Search this data root first (registry datasets).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Methods to run: source-only, shot-im, sfda-de.
    #[arg(long, value_delimiter = ',', default_value = "source-only,shot-im,sfda-de")]
    pub methods: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// nn-core backbone of the source model.
    #[arg(long, default_value = "lenet5")]
    pub arch: String,
    /// Classifier of the source model: `linear`, or `wn` (weight-normalised, as SHOT's
    /// released code trains its source models).
    #[arg(long, default_value = "linear")]
    pub classifier: domain_adapt::model::ClassifierKind,
    /// Input size every domain is resized to (SHOT's digit protocol: 28).
    #[arg(long, default_value_t = 28)]
    pub image_size: usize,
    #[arg(long, default_value_t = 256)]
    pub bottleneck: usize,
    /// Source epochs (0: about 120,000 images' worth, at least 2).
    #[arg(long, default_value_t = 0)]
    pub source_epochs: usize,
    /// Class-balanced subset of the source training split.
    #[arg(long)]
    pub source_subset: Option<usize>,
    /// Class-balanced subset of the (unlabelled) target training split used for adaptation.
    #[arg(long)]
    pub target_subset: Option<usize>,
    /// Class-balanced subset of the target test split used for evaluation.
    #[arg(long)]
    pub test_subset: Option<usize>,
    /// SHOT-IM epochs over the target training images.
    #[arg(long, default_value_t = 4)]
    pub shot_epochs: usize,
    /// SFDA-DE loops (re-clustering + re-estimation each).
    #[arg(long, default_value_t = 10)]
    pub loops: usize,
    /// SFDA-DE steps per loop (0: the same number of images as SHOT-IM sees).
    #[arg(long, default_value_t = 0)]
    pub steps_per_loop: usize,
    #[arg(long, default_value_t = 10)]
    pub samples_per_class: usize,
    /// Cosine-distance threshold of confident pseudo-labels (D_0).
    #[arg(long, default_value_t = 0.05)]
    pub distance_threshold: f64,
    /// Minimum confident members of a kept class (N_0).
    #[arg(long, default_value_t = 3)]
    pub min_class_size: usize,
    /// full or diag.
    #[arg(long, default_value = "full")]
    pub covariance: String,
    /// Scale gamma of the estimated covariance.
    #[arg(long, default_value_t = 1.0)]
    pub cov_scale: f64,
    /// Learning rate of source training and both adaptations (SGD, momentum 0.9, SHOT decay).
    #[arg(long, default_value_t = 0.01)]
    pub lr: f64,
    /// Learning rate of the adaptations only (default: --lr).
    #[arg(long)]
    pub adapt_lr: Option<f64>,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Prefix of the run directories.
    #[arg(long, default_value = "sfda")]
    pub prefix: String,
    /// Results page (section `sfda-<src>-<tgt>` unless --section).
    #[arg(long, default_value = RESULTS)]
    pub results: String,
    #[arg(long)]
    pub section: Option<String>,
    /// Retrain the source model even when runs/ holds one for the same settings.
    #[arg(long)]
    pub retrain_source: bool,
    /// A paper protocol on class folders: office31, office-home, visda (then --source and
    /// --target name domains, e.g. amazon, webcam, and --domains-dir holds `<domain>/<class>/`).
    #[arg(long)]
    pub preset: Option<String>,
    /// Folder holding one class-folder tree per domain (with --preset).
    #[arg(long)]
    pub domains_dir: Option<PathBuf>,
    /// Keep at most this many images per class and domain (with --preset).
    #[arg(long)]
    pub max_per_class: Option<usize>,
    /// With --preset: 32x32 images and one optimisation step per phase (checks the pipeline;
    /// nothing is written to the results page).
    #[arg(long)]
    pub smoke: bool,
}

fn domain_name(a: &SfdaArgs) -> String {
    match &a.target_dir {
        Some(d) => d
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "target".into()),
        None => a.target.clone(),
    }
}

fn load(name: &str, dir: Option<&Path>, data: Option<&Path>, train: bool, channels: usize, size: usize) -> Result<LabeledImages> {
    let ds = match dir {
        Some(d) => domain_adapt::data::load_idx_dir(d, train)?,
        None => {
            let split = if train { Split::Train } else { Split::Test };
            nn_core::data::load_in_memory(name, split, &LoadOptions::with_data_dir(data.map(Path::to_path_buf)))
                .with_context(|| format!("loading {name} ({split})"))?
        }
    };
    LabeledImages::from_dataset(&ds, channels, size)
}

use nn_core::experiment::mean_std;

struct Row {
    method: String,
    seed: u64,
    before: f64,
    after: f64,
    wall_s: f64,
}

pub fn run(a: SfdaArgs) -> Result<()> {
    if a.preset.is_some() {
        return run_preset(&a);
    }
    for m in &a.methods {
        if !["source-only", "shot-im", "sfda-de"].contains(&m.as_str()) {
            bail!("unknown method `{m}`; valid: source-only, shot-im, sfda-de");
        }
    }
    if a.seeds.is_empty() {
        bail!("--seeds is empty");
    }
    let covariance: Covariance = a.covariance.parse()?;
    let t_all = Instant::now();
    let tname = domain_name(&a);
    eprintln!("loading {} -> {tname}", a.source);
    let src_probe = match a.data.as_deref() {
        d => nn_core::data::load_in_memory(&a.source, Split::Train, &LoadOptions::with_data_dir(d.map(Path::to_path_buf)))
            .with_context(|| format!("loading the source {}", a.source))?,
    };
    let channels = src_probe.channels;
    let source_train = LabeledImages::from_dataset(&src_probe, channels, a.image_size)?;
    drop(src_probe);
    let tgt_train = load(&a.target, a.target_dir.as_deref(), a.data.as_deref(), true, channels, a.image_size)?;
    let tgt_test = load(&a.target, a.target_dir.as_deref(), a.data.as_deref(), false, channels, a.image_size)?;
    if tgt_train.num_classes > source_train.num_classes || tgt_test.num_classes > source_train.num_classes {
        bail!(
            "the target has labels up to {} but the source only {} classes",
            tgt_train.num_classes.max(tgt_test.num_classes),
            source_train.num_classes
        );
    }
    let spec = ModelSpec {
        arch: a.arch.clone(),
        in_channels: channels,
        image_size: a.image_size,
        num_classes: source_train.num_classes,
        bottleneck_dim: a.bottleneck,
        classifier: a.classifier,
    };
    let mut rows: Vec<Row> = Vec::new();
    let pair = format!("{}2{}", a.source, tname);
    let mut sizes = String::new();
    for &seed in &a.seeds {
        let src = source_train.subset(a.source_subset, seed)?;
        let ttrain = tgt_train.subset(a.target_subset, seed)?;
        let ttest = tgt_test.subset(a.test_subset, seed.wrapping_add(1))?;
        let source_epochs = if a.source_epochs > 0 {
            a.source_epochs
        } else {
            (120_000 / src.len()).max(2)
        };
        let shot = ShotImConfig {
            epochs: a.shot_epochs,
            batch_size: a.batch_size,
            lr: a.adapt_lr.unwrap_or(a.lr),
            seed,
            ..Default::default()
        };
        let shot_images = a.shot_epochs * (ttrain.len() / a.batch_size) * a.batch_size;
        let per_step = spec.num_classes * a.samples_per_class;
        let steps_per_loop = if a.steps_per_loop > 0 {
            a.steps_per_loop
        } else {
            (shot_images / (per_step * a.loops.max(1))).max(1)
        };
        let sfda = SfdaDeConfig {
            loops: a.loops,
            steps_per_loop,
            samples_per_class: a.samples_per_class,
            lr: a.adapt_lr.unwrap_or(a.lr),
            kmeans: KMeansConfig {
                distance_threshold: a.distance_threshold,
                min_class_size: a.min_class_size,
                ..Default::default()
            },
            estimator: EstimatorConfig {
                covariance,
                cov_scale: a.cov_scale,
                ..Default::default()
            },
            seed,
            ..Default::default()
        };
        sizes = format!(
            "source {} ({} train images, {source_epochs} epochs, batch {}, label smoothing 0.1), target {tname} ({} unlabelled train images for adaptation, {} test images), {} {}x{} input, bottleneck {}, {} classifier; \
             SHOT-IM {} epochs x batch {} ({shot_images} images); SFDA-DE {} loops x {steps_per_loop} steps x {} classes x {} samples ({} images), D_0 {}, N_0 {}, {covariance:?} covariance, gamma {}; SGD lr {} (source) / {} (adaptation) with SHOT's decay, momentum 0.9, wd 5e-4",
            a.source,
            src.len(),
            a.batch_size,
            ttrain.len(),
            ttest.len(),
            a.arch,
            a.image_size,
            a.image_size,
            a.bottleneck,
            match a.classifier {
                domain_adapt::model::ClassifierKind::Linear => "linear",
                domain_adapt::model::ClassifierKind::WeightNorm => "weight-normalised",
            },
            a.shot_epochs,
            a.batch_size,
            a.loops,
            spec.num_classes,
            a.samples_per_class,
            a.loops * steps_per_loop * per_step,
            a.distance_threshold,
            a.min_class_size,
            a.cov_scale,
            a.lr,
            a.adapt_lr.unwrap_or(a.lr)
        );
        // ---- source model (trained once per seed and setting, then reused)
        let sdir = PathBuf::from(format!("runs/{}-{}-source-s{seed}", a.prefix, a.source));
        std::fs::create_dir_all(&sdir)?;
        let key =
            json!({"spec": spec, "epochs": source_epochs, "subset": a.source_subset, "lr": a.lr, "batch": a.batch_size, "seed": seed});
        let wpath = sdir.join("source.safetensors");
        let kpath = sdir.join("source.json");
        let reuse = !a.retrain_source
            && wpath.is_file()
            && std::fs::read_to_string(&kpath)
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .map(|v| v["key"] == key)
                == Some(true);
        let (model, src_report) = if reuse {
            eprintln!("[seed {seed}] reusing the source model in {}", sdir.display());
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&kpath)?)?;
            (SourceModel::load(&spec, &wpath)?, v["report"].clone())
        } else {
            eprintln!(
                "[seed {seed}] training the source model on {} ({} images, {source_epochs} epochs)",
                a.source,
                src.len()
            );
            let model = SourceModel::new(&spec, seed)?;
            let cfg = SourceTrainConfig {
                epochs: source_epochs,
                batch_size: a.batch_size,
                lr: a.lr,
                seed,
                verbose: true,
                ..Default::default()
            };
            let r = train_source(&model, &src, &cfg)?;
            model.save(&wpath)?;
            let rj = serde_json::to_value(&r)?;
            std::fs::write(&kpath, serde_json::to_string_pretty(&json!({"key": key, "report": rj}))?)?;
            (model, rj)
        };
        let params = model.num_params();
        let macs = model.macs()?;
        let before = accuracy(&model, &ttest, 500)?;
        eprintln!("[seed {seed}] source-only on {tname} test: {before:.2}%");
        let base = json!({
            "model": a.arch, "dataset": format!("{}->{tname}", a.source), "source": a.source, "target": tname,
            "seed": seed, "params": params, "macs": macs, "command": nn_core::report::command_line(),
            "before_top1": before, "source_epochs": source_epochs, "source_train": src_report,
            "source_images": src.len(), "target_train_images": ttrain.len(), "target_test_images": ttest.len(),
        });
        let write = |method: &str, extra: serde_json::Value| -> Result<()> {
            let dir = PathBuf::from(format!("runs/{}-{pair}-{method}-s{seed}", a.prefix));
            std::fs::create_dir_all(&dir)?;
            let mut v = base.clone();
            v["method"] = json!(method);
            for (k, x) in extra.as_object().expect("object") {
                v[k] = x.clone();
            }
            std::fs::write(dir.join("summary.json"), serde_json::to_string_pretty(&v)?)?;
            Ok(())
        };
        if a.methods.iter().any(|m| m == "source-only") {
            let sw = src_report["wall_s"].as_f64().unwrap_or(f64::NAN);
            write(
                "source-only",
                json!({"epochs": source_epochs, "test_top1": before, "after_top1": before,
                       "train_images_per_s": src_report["images_per_s"], "wall_s": sw}),
            )?;
            rows.push(Row {
                method: "source-only".into(),
                seed,
                before,
                after: before,
                wall_s: sw,
            });
        }
        let target = ttrain.without_labels()?; // adaptation sees images only
        for method in a.methods.iter().filter(|m| *m != "source-only") {
            let mut curve = Vec::new();
            let mut obs = |st: &RoundStats, m: &SourceModel| -> Result<()> {
                let acc = accuracy(m, &ttest, 500)?;
                eprintln!(
                    "[seed {seed}] {method} round {}: loss {:.4}, selected {}, classes {}, kmeans iters {}, agree {:.3}, target test {acc:.2}%",
                    st.round + 1,
                    st.mean_loss,
                    st.selected,
                    st.kept_classes,
                    st.kmeans_iters,
                    st.agree_with_classifier
                );
                curve.push(json!({"round": st.round + 1, "test_top1": acc, "stats": st}));
                Ok(())
            };
            let (adapted, report, cfgv, epochs) = match method.as_str() {
                "shot-im" => {
                    let (m, r) = adapt_shot_im(&model, &target, &shot, Some(&mut obs))?;
                    (m, r, serde_json::to_value(&shot)?, shot.epochs)
                }
                _ => {
                    let (m, r) = adapt_sfda_de(&model, &target, &sfda, Some(&mut obs))?;
                    (m, r, serde_json::to_value(&sfda)?, sfda.loops)
                }
            };
            let after = accuracy(&adapted, &ttest, 500)?;
            eprintln!("[seed {seed}] {method}: {before:.2}% -> {after:.2}% ({:.0} s)", report.wall_s);
            write(
                method,
                json!({"epochs": epochs, "test_top1": after, "after_top1": after, "train_images_per_s": report.images_per_s,
                       "wall_s": report.wall_s, "adapt_steps": report.steps, "adapt_images": report.images_seen,
                       "config": cfgv, "curve": curve}),
            )?;
            rows.push(Row {
                method: method.clone(),
                seed,
                before,
                after,
                wall_s: report.wall_s,
            });
        }
    }
    let body = table(&a, &tname, &rows, &sizes, t_all.elapsed().as_secs_f64());
    println!("{body}");
    let key = a.section.clone().unwrap_or_else(|| format!("sfda-{}-{tname}", a.source));
    let page = nn_core::report::write_section(&a.results, TITLE, &key, &body)?;
    eprintln!("written to {}", page.display());
    Ok(())
}

/// SHOT (ICML 2020) Table 2, LeNet: (source-only, SHOT-IM, SHOT) target accuracy.
fn paper_anchor(source: &str, target: &str) -> Option<(f64, f64, f64)> {
    match (source, target) {
        ("mnist", "usps") => Some((89.6, 91.9, 98.0)),
        ("usps", "mnist") => Some((87.8, 96.8, 98.4)),
        _ => None,
    }
}

fn table(a: &SfdaArgs, tname: &str, rows: &[Row], sizes: &str, wall: f64) -> String {
    let mut out = format!("## {} -> {tname}: {}\n\n", a.source, a.methods.join(", "));
    out += "Target test top-1 % (mean +- std over seeds; every adaptation starts from the same source model of its seed).\n\n";
    out += "| method | target top-1 % | per seed | adaptation wall s (mean) |\n|---|---|---|---|\n";
    let mut means = std::collections::HashMap::new();
    for m in &a.methods {
        let r: Vec<&Row> = rows.iter().filter(|r| &r.method == m).collect();
        let acc: Vec<f64> = r.iter().map(|r| r.after).collect();
        let (mu, sd) = mean_std(&acc);
        means.insert(m.clone(), mu);
        let per = r
            .iter()
            .map(|r| format!("s{}: {:.2}", r.seed, r.after))
            .collect::<Vec<_>>()
            .join(", ");
        let w = mean_std(&r.iter().map(|r| r.wall_s).collect::<Vec<_>>()).0;
        let wcol = if m == "source-only" {
            format!("{w:.0} (source training)")
        } else {
            format!("{w:.0}")
        };
        out += &format!("| {m} | {mu:.2} +- {sd:.2} | {per} | {wcol} |\n");
    }
    let _ = rows.first().map(|r| r.before);
    out += "\n";
    if let (Some(s), Some(i), Some(d)) = (means.get("source-only"), means.get("shot-im"), means.get("sfda-de")) {
        let gain = d - s;
        out += &format!(
            "**Target check** (SFDA-DE >= source-only + 5 and >= SHOT-IM): SFDA-DE is {gain:+.2} points over source-only ({}), and {:+.2} points vs SHOT-IM ({}).\n\n",
            if gain >= 5.0 { "met" } else { "NOT met" },
            d - i,
            if d >= i { "met" } else { "NOT met" }
        );
    }
    if let Some((s, i, f)) = paper_anchor(&a.source, tname) {
        out += &format!(
            "Published anchors (SHOT, ICML 2020, LeNet, full protocol): source-only {s}, SHOT-IM {i}, SHOT {f}. Our budget is much smaller (below), so absolute numbers are not comparable one to one.\n\n"
        );
    }
    out += &format!(
        "Settings: {sizes}. Seeds {:?}. Whole run {wall:.0} s wall on a shared 2-core CPU.\n\n```\n{}\n```\n",
        a.seeds,
        nn_core::report::command_line()
    );
    out
}

/// The demo's adaptation row: MNIST -> USPS on a small budget (10,000 source images, 2 epochs,
/// one seed) when USPS is found, written as the `demo-sfda` section of the domain-adapt page;
/// says why it is skipped otherwise.
pub fn demo(seed: u64) -> Result<()> {
    println!("\n== domain-adapt: source-free adaptation MNIST -> USPS ==\n");
    if let Err(e) = nn_core::data::registry::locate("usps", Some(Split::Train), None) {
        println!("skipping the adaptation row: USPS was not found ({e})");
        return Ok(());
    }
    use clap::Parser;
    #[derive(Parser)]
    struct W {
        #[command(flatten)]
        a: SfdaArgs,
    }
    let mut a = W::parse_from(["sfda"]).a;
    a.seeds = vec![seed];
    a.source_subset = Some(10_000);
    a.source_epochs = 2;
    a.shot_epochs = 1;
    a.loops = 4;
    a.prefix = "demo-sfda".into();
    a.section = Some("demo-sfda".into());
    run(a)
}

/// `--preset`: the Office-31 / Office-Home / VisDA protocols on class folders. The target
/// domain is both the unlabelled adaptation set and the evaluation set (the usual protocol).
fn run_preset(a: &SfdaArgs) -> Result<()> {
    use domain_adapt::presets::preset;
    let name = a.preset.as_deref().expect("preset");
    let mut p = preset(name)?;
    if a.smoke {
        p = p.smoke(32, 4);
    }
    let dir = a
        .domains_dir
        .as_deref()
        .context("--preset needs --domains-dir DIR holding <domain>/<class>/<image>")?;
    let t0 = Instant::now();
    let source = p.load_domain(dir, &a.source, a.max_per_class)?;
    let target = p.load_domain(dir, &a.target, a.max_per_class)?;
    eprintln!(
        "preset {name}: {} {} ({} images) -> {} ({} images), {} classes, {}x{}",
        p.spec.arch,
        a.source,
        source.len(),
        a.target,
        target.len(),
        p.spec.num_classes,
        p.spec.image_size,
        p.spec.image_size
    );
    let mut lines = Vec::new();
    for &seed in &a.seeds {
        let model = SourceModel::new(&p.spec, seed)?;
        let sc = SourceTrainConfig {
            seed,
            verbose: true,
            ..p.source.clone()
        };
        let sr = train_source(&model, &source, &sc)?;
        let before = accuracy(&model, &target, 32)?;
        let t = target.without_labels()?;
        let (m1, r1) = adapt_shot_im(&model, &t, &ShotImConfig { seed, ..p.shot.clone() }, None)?;
        let (m2, r2) = adapt_sfda_de(&model, &t, &SfdaDeConfig { seed, ..p.sfda.clone() }, None)?;
        let (a1, a2) = (accuracy(&m1, &target, 32)?, accuracy(&m2, &target, 32)?);
        for (method, acc, wall, ips, steps) in [
            ("source-only", before, sr.wall_s, sr.images_per_s, sr.steps),
            ("shot-im", a1, r1.wall_s, r1.images_per_s, r1.steps),
            ("sfda-de", a2, r2.wall_s, r2.images_per_s, r2.steps),
        ] {
            let out = PathBuf::from(format!("runs/{}-{name}-{}2{}-{method}-s{seed}", a.prefix, a.source, a.target));
            std::fs::create_dir_all(&out)?;
            let v = json!({
                "model": p.spec.arch, "dataset": format!("{name}:{}->{}", a.source, a.target), "source": a.source,
                "target": a.target, "method": method, "epochs": p.source.epochs, "seed": seed, "test_top1": acc,
                "before_top1": before, "after_top1": acc, "params": model.num_params(), "macs": model.macs()?,
                "train_images_per_s": ips, "wall_s": wall, "steps": steps, "smoke": a.smoke,
                "command": nn_core::report::command_line(),
            });
            std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&v)?)?;
            lines.push(format!("| {method} | {seed} | {acc:.2} | {steps} |"));
        }
    }
    let body = format!(
        "## preset {name}: {} -> {}\n\n| method | seed | target top-1 % | steps |\n|---|---|---|---|\n{}\n\n{:.0} s wall.\n\n```\n{}\n```\n",
        a.source,
        a.target,
        lines.join("\n"),
        t0.elapsed().as_secs_f64(),
        nn_core::report::command_line()
    );
    println!("{body}");
    if a.smoke {
        eprintln!("smoke run: the pipeline works; nothing written to {}", a.results);
    } else {
        let key = a
            .section
            .clone()
            .unwrap_or_else(|| format!("sfda-{name}-{}-{}", a.source, a.target));
        let page = nn_core::report::write_section(&a.results, TITLE, &key, &body)?;
        eprintln!("written to {}", page.display());
    }
    Ok(())
}
