//! bnn-core deploy commands: the binary GEMM benchmark, export of a trained binary ResNet or
//! BiMLP to the packed engine, inference with exactness checks against candle, the end-to-end speed and
//! memory comparison. Every command writes its section of `docs/results/bnn-deploy.md`.

use anyhow::{anyhow, bail, Context, Result};
use bnn_core::deploy::format;
use bnn_core::deploy::gemm::{bgemm_into, Kernel};
use bnn_core::deploy::{export, DeployedModel, PackedBiMlp, PackedMatrix, PackedResNet};
use bnn_core::{BiMlp, BiMlpConfig, BinaryConfig, BinaryFactory};
use clap::Args;
use nn_core::candle_core::{DType, Device, Tensor};
use nn_core::experiment::{standard_data, DataSpec};
use nn_core::models::{create_model, ModelConfig};
use nn_core::train::{Checkpoint, TrainConfig};
use nn_core::{LayerFactory, Model, VarStore};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

const RESULTS: &str = "docs/results/bnn-deploy.md";
const TITLE: &str = "bnn-core deploy: binary inference engine";

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn minimum(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::INFINITY, f64::min)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "n/a".into())
}

/// Runs `f` inside a rayon pool of `t` threads with `RAYON_NUM_THREADS = t` (candle's gemm reads it).
fn with_threads<R: Send>(t: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build()?;
    let old = std::env::var("RAYON_NUM_THREADS").ok();
    std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    let r = pool.install(f);
    match old {
        Some(v) => std::env::set_var("RAYON_NUM_THREADS", v),
        None => std::env::remove_var("RAYON_NUM_THREADS"),
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// bench-gemm

/// Options of `cargo xtask bnn bench-gemm`.
#[derive(Args, Debug, Clone)]
pub struct BenchGemmArgs {
    /// Square sizes M = N = K.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    pub sizes: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    /// Timed runs per measurement (3 for shapes above 1e11 FLOPs).
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Skip the ResNet-20-shaped GEMMs.
    #[arg(long)]
    pub no_resnet: bool,
}

/// Medians of candle, of each binary kernel and of packing A, then the fastest candle and binary runs (ms).
type GemmTimes = (f64, Vec<f64>, f64, (f64, f64));

struct GemmCase {
    name: String,
    m: usize,
    n: usize,
    k: usize,
}

fn gemm_cases(a: &BenchGemmArgs) -> Vec<GemmCase> {
    let mut v: Vec<GemmCase> = a
        .sizes
        .iter()
        .map(|&s| GemmCase {
            name: format!("square {s}"),
            m: s,
            n: s,
            k: s,
        })
        .collect();
    if !a.no_resnet {
        // im2col GEMMs of binary ResNet-20's 3x3 convolutions: M = batch x output pixels,
        // N = output channels, K = 9 x input channels
        for (batch, hw, cin, cout, label) in [
            (1usize, 32usize, 16usize, 16usize, "stage 1"),
            (1, 8, 64, 64, "stage 3"),
            (128, 32, 16, 16, "stage 1"),
            (128, 16, 32, 32, "stage 2"),
            (128, 8, 64, 64, "stage 3"),
        ] {
            v.push(GemmCase {
                name: format!("ResNet-20 {label} conv, batch {batch}"),
                m: batch * hw * hw,
                n: cout,
                k: 9 * cin,
            });
        }
    }
    v
}

pub fn bench_gemm(a: BenchGemmArgs) -> Result<()> {
    let kernels: Vec<Kernel> = Kernel::available().into_iter().filter(|k| *k != Kernel::Portable).collect();
    let kernels = if kernels.is_empty() { vec![Kernel::Portable] } else { kernels };
    let start_load = loadavg();
    let mut table = String::from("| GEMM (M x N x K) | threads | candle f32 ms |");
    for k in &kernels {
        table += &format!(" binary {} ms |", k.name());
    }
    table += " pack A ms | candle / best binary | candle / (pack A + best binary) | ratio of fastest runs |\n|---|---|---|";
    for _ in &kernels {
        table += "---|";
    }
    table += "---|---|---|---|\n";
    let dev = Device::Cpu;
    for c in gemm_cases(&a) {
        let flops = 2.0 * (c.m * c.n * c.k) as f64;
        let runs = if flops > 1e11 { 3.min(a.runs) } else { a.runs }.max(1);
        let av = bnn_core_rand(c.m * c.k, 1);
        let bv = bnn_core_rand(c.n * c.k, 2);
        let at = Tensor::from_vec(av.clone(), (c.m, c.k), &dev)?;
        let bt = Tensor::from_vec(bv.clone(), (c.n, c.k), &dev)?;
        let pb = PackedMatrix::from_f32(&bv, c.n, c.k);
        for &t in &a.threads {
            let r = with_threads(t, || -> Result<GemmTimes> {
                let pa = PackedMatrix::from_f32(&av, c.m, c.k);
                let mut out = vec![0i32; c.m * c.n];
                let mut tc = Vec::new();
                let mut tb = vec![Vec::new(); kernels.len()];
                let mut tp = Vec::new();
                // one warm-up, then interleaved timed runs
                for r in 0..=runs {
                    let t0 = Instant::now();
                    let y = at.matmul(&bt.t()?)?;
                    let _ = y.dims();
                    let e = ms(t0);
                    drop(y);
                    if r > 0 {
                        tc.push(e);
                    }
                    for (i, &k) in kernels.iter().enumerate() {
                        let t0 = Instant::now();
                        bgemm_into(&pa, &pb, k, &mut out);
                        if r > 0 {
                            tb[i].push(ms(t0));
                        }
                    }
                    let t0 = Instant::now();
                    let p = PackedMatrix::from_f32(&av, c.m, c.k);
                    if r > 0 {
                        tp.push(ms(t0));
                    }
                    drop(p);
                }
                let mins = (minimum(&tc), minimum(&tb.iter().map(|v| minimum(v)).collect::<Vec<_>>()));
                Ok((median(&mut tc), tb.iter_mut().map(|v| median(v)).collect(), median(&mut tp), mins))
            })??;
            let (candle, bins, pack, (cmin, bmin)) = r;
            let best = bins.iter().cloned().fold(f64::INFINITY, f64::min);
            table += &format!("| {} ({} x {} x {}) | {t} | {candle:.3} |", c.name, c.m, c.n, c.k);
            for b in &bins {
                table += &format!(" {b:.3} |");
            }
            table += &format!(
                " {pack:.3} | **{:.1}x** | {:.1}x | {:.1}x |\n",
                candle / best,
                candle / (pack + best),
                cmin / bmin
            );
            println!(
                "{:<40} t={t} candle {candle:>10.3} ms  binary {} ms  pack {pack:.3} ms  ratio {:.1}x",
                format!("{} ({}x{}x{})", c.name, c.m, c.n, c.k),
                bins.iter().map(|b| format!("{b:.3}")).collect::<Vec<_>>().join(" / "),
                candle / best
            );
        }
    }
    let body = format!(
        "## Binary GEMM vs candle f32 matmul\n\n{table}\nBinary: `C = K - 2 popcount(A xor B)` on operands packed along K (i32 result); candle: `A.matmul(B^T)` in f32 \
         (gemm crate). Both operands are random; B (the weights) is packed once outside the timing, A's packing is the `pack A` column (in a \
         convolution the engine packs activations once per layer). Median of {} interleaved runs (3 for shapes above 1e11 FLOPs) after one \
         warm-up; the last column divides candle's fastest run by the fastest binary run (less affected by contention). Each thread count runs in its own rayon pool with `RAYON_NUM_THREADS` set. Load average at start {start_load}, at end {}; the \
         machine is shared (other builds and a training run), so absolute times are noisy, ratios less so.\n\n```\n{}\n```\n",
        a.runs,
        loadavg(),
        nn_core::report::command_line()
    );
    let page = nn_core::report::write_section(RESULTS, TITLE, "bench-gemm", &body)?;
    eprintln!("results: {}", page.display());
    Ok(())
}

/// Deterministic values in [-1, 1) (xorshift).
fn bnn_core_rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// loading a trained run

/// nn-core's registry model `name`, or a BiMLP (`bimlp-small`, ...), built with `f`.
fn any_model(name: &str, mc: &ModelConfig, vs: &VarStore, f: &dyn LayerFactory) -> Result<Box<dyn Model>> {
    match BiMlpConfig::by_name(name) {
        Ok(cfg) => Ok(Box::new(BiMlp::new(&vs.root(), mc, &cfg, f)?)),
        Err(_) => Ok(create_model(name, mc, &vs.root(), f)?),
    }
}

/// An exported model: a packed ResNet or a packed BiMLP.
enum Exported {
    ResNet(Box<PackedResNet>),
    BiMlp(Box<PackedBiMlp>),
}

/// A trained binary run: its config, method, data shapes and variables.
struct TrainedRun {
    dir: PathBuf,
    config: TrainConfig,
    method: String,
    model_config: ModelConfig,
    vars: std::collections::HashMap<String, Tensor>,
}

fn model_config_for(dataset: &str, data: Option<&Path>) -> Result<ModelConfig> {
    let mut spec = DataSpec::new(dataset, 256, 0);
    spec.data_dir = data.map(Path::to_path_buf);
    spec.train_subset = Some(16);
    Ok(standard_data(&spec)?.model_config)
}

fn load_run(dir: &Path, data: Option<&Path>) -> Result<TrainedRun> {
    let cfg_path = dir.join("config.json");
    let config: TrainConfig =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?)
            .with_context(|| format!("parsing {}", cfg_path.display()))?;
    let summary_path = dir.join("summary.json");
    let method = std::fs::read_to_string(&summary_path)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["method"].as_str().map(String::from))
        .with_context(|| format!("{} has no `method` (not a finished `bnn train` run?)", summary_path.display()))?;
    if method == "float" || method.contains('+') {
        bail!(
            "run {} has method `{method}`: only plain binary runs (ste, approxsign, fda, fda-noise) can be exported",
            dir.display()
        );
    }
    let ck = Checkpoint::load(&dir.join(nn_core::train::trainer::CHECKPOINT_FILE))?;
    let model_config = model_config_for(&config.dataset, data)?;
    Ok(TrainedRun {
        dir: dir.to_path_buf(),
        config,
        method,
        model_config,
        vars: ck.model,
    })
}

impl TrainedRun {
    fn binary_config(&self) -> Result<BinaryConfig> {
        Ok(BinaryConfig::from_method(&self.method)?)
    }
    /// The candle model (bnn-core layers on nn-core's backbone) with the trained variables.
    fn candle_model(&self) -> Result<(Box<dyn Model>, VarStore)> {
        let vs = VarStore::new(0, &Device::Cpu);
        let f = BinaryFactory::new(self.binary_config()?);
        let m = any_model(&self.config.model, &self.model_config, &vs, &f)?;
        vs.load_tensors(&self.vars, true)?;
        Ok((m, vs))
    }
    fn export(&self) -> Result<Exported> {
        let bc = self.binary_config()?;
        Ok(match BiMlpConfig::by_name(&self.config.model) {
            Ok(cfg) => Exported::BiMlp(Box::new(
                PackedBiMlp::export(&self.vars, &self.model_config, &cfg, &bc, Kernel::best()).map_err(|e| anyhow!("{e}"))?,
            )),
            Err(_) => Exported::ResNet(Box::new(
                export::export_resnet(&self.vars, &self.config.model, &self.model_config, &bc).map_err(|e| anyhow!("{e}"))?,
            )),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// export

/// Options of `cargo xtask bnn export`.
#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// Run directory of a trained binary ResNet (`cargo xtask bnn train --model resnet20 ...`) or
    /// BiMLP (`cargo xtask bnn bimlp ...`).
    #[arg(long)]
    pub run: PathBuf,
    /// Output file (default: <run>/model.bnn.safetensors).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub data: Option<PathBuf>,
}

fn file_size(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p).with_context(|| format!("stat {}", p.display()))?.len())
}

pub fn export_cmd(a: ExportArgs) -> Result<()> {
    let run = load_run(&a.run, a.data.as_deref())?;
    let packed = run.export()?;
    let out = a.out.clone().unwrap_or_else(|| a.run.join("model.bnn.safetensors"));
    let mut source = BTreeMap::new();
    source.insert("run".to_string(), run.dir.display().to_string());
    source.insert("method".to_string(), run.method.clone());
    source.insert("dataset".to_string(), run.config.dataset.clone());
    let (bytes, bin_f32, bin_packed, param_bytes) = match &packed {
        Exported::ResNet(p) => {
            let bytes = format::save(p, source, &out)?;
            // it must load back to the same model
            let (back, _) = format::load(&out)?;
            if back != **p {
                bail!("{} does not load back to the exported model", out.display());
            }
            let (mut bin_f32, mut bin_packed) = (0usize, 0usize);
            for b in &p.blocks {
                for c in [&b.conv1, &b.conv2] {
                    bin_f32 += c.geom.k() * c.geom.cout * 4;
                    bin_packed += c.weights.data.len() * 8;
                }
            }
            (bytes, bin_f32, bin_packed, p.param_bytes())
        }
        Exported::BiMlp(p) => {
            let bytes = p.save(source, &out)?;
            let (back, _) = PackedBiMlp::load(&out, Kernel::best())?;
            if !back.same_as(p) {
                bail!("{} does not load back to the exported model", out.display());
            }
            let (bin_packed, bin_f32) = p.binary_weight_bytes();
            (bytes, bin_f32, bin_packed, p.param_bytes())
        }
    };
    // sizes: the float model of the same architecture as safetensors, and the binary layers alone
    let tmp = std::env::temp_dir().join(format!("bnn-deploy-float-{}.safetensors", std::process::id()));
    let vs = VarStore::new(0, &Device::Cpu);
    let _m = any_model(&run.config.model, &run.model_config, &vs, &nn_core::StandardFactory)?;
    vs.save(&tmp)?;
    let float_bytes = file_size(&tmp)?;
    let _ = std::fs::remove_file(&tmp);
    let body = format!(
        "## Export of `{}`\n\nModel `{}` ({} method) trained on {} ({}). Exported file `{}`: **{bytes} bytes** ({:.1} KiB), vs the float \
         {} as a safetensors file of its parameters and BatchNorm buffers: {float_bytes} bytes ({:.1} KiB), **{:.1}x smaller**. Binary \
         convolution weights alone: {bin_packed} bytes packed vs {bin_f32} bytes in f32 ({:.1}x; rows are padded to whole 64-bit words). \
         Parameters held by the engine in memory: {} bytes. The file loads back to the identical model.\n\n```\n{}\n```\n",
        run.dir.display(),
        run.config.model,
        run.method,
        run.config.dataset,
        run.config.command,
        out.display(),
        bytes as f64 / 1024.0,
        run.config.model,
        float_bytes as f64 / 1024.0,
        float_bytes as f64 / bytes as f64,
        bin_f32 as f64 / bin_packed as f64,
        param_bytes,
        nn_core::report::command_line()
    );
    println!("{body}");
    let key = format!("export-{}", crate::grid::run_name(&run.dir));
    nn_core::report::write_section(RESULTS, TITLE, &key, &body)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// infer

/// Options of `cargo xtask bnn infer`.
#[derive(Args, Debug, Clone)]
pub struct InferArgs {
    /// A model file written by `cargo xtask bnn export`.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "mnist")]
    pub dataset: String,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    #[arg(long)]
    pub test_subset: Option<usize>,
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Also run the candle model of this training run (default: the run recorded in the file)
    /// and compare predictions and logits.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Skip the comparison with candle.
    #[arg(long)]
    pub no_reference: bool,
    /// Also run candle on the inputs scaled by (1 + 1e-6) and count the images whose candle
    /// prediction changes: how sensitive the float reference itself is to rounding-level changes.
    #[arg(long)]
    pub sensitivity: bool,
    /// Binary GEMM kernel: portable, popcnt, avx2 (default: the fastest available).
    #[arg(long)]
    pub kernel: Option<String>,
}

fn kernel_arg(k: &Option<String>) -> Result<Kernel> {
    match k {
        None => Ok(Kernel::best()),
        Some(s) => {
            let k = Kernel::parse(s).with_context(|| format!("unknown kernel `{s}`; valid: portable, popcnt, avx2"))?;
            if !k.is_available() {
                bail!("kernel `{s}` is not available on this CPU");
            }
            Ok(k)
        }
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |b, (i, x)| if *x > v[b] { i } else { b })
}

pub fn infer(a: InferArgs) -> Result<()> {
    let kernel = kernel_arg(&a.kernel)?;
    let m = DeployedModel::load(&a.model, kernel)?;
    let (in_channels, image_size, num_classes) = m.io();
    let mut spec = DataSpec::new(&a.dataset, a.batch_size.max(2), 0);
    spec.data_dir = a.data.clone();
    spec.train_subset = Some(16);
    spec.test_subset = a.test_subset;
    let d = standard_data(&spec)?;
    let mc = d.model_config;
    if (mc.in_channels, mc.image_size, mc.num_classes) != (in_channels, image_size, num_classes) {
        bail!(
            "{} expects {} x {} x {} inputs and {} classes, {} has {} x {} x {} and {}",
            a.model.display(),
            in_channels,
            image_size,
            image_size,
            num_classes,
            a.dataset,
            mc.in_channels,
            mc.image_size,
            mc.image_size,
            mc.num_classes
        );
    }
    let reference = if a.no_reference {
        None
    } else {
        a.reference.clone().or_else(|| m.source().get("run").map(PathBuf::from))
    };
    let candle = match &reference {
        Some(r) => Some(load_run(r, a.data.as_deref())?.candle_model()?),
        None => None,
    };
    let test = nn_core::data::DataLoader::from_arc(d.test.dataset().clone(), a.batch_size)
        .shuffle(false)
        .transform(nn_core::data::transforms::Pipeline::new().normalize(&norm(&a.dataset).0, &norm(&a.dataset).1));
    let (mut n, mut correct, mut correct_ref, mut agree, mut within) = (0usize, 0usize, 0usize, 0usize, 0usize);
    let (mut max_rel, mut max_abs) = (0f64, 0f64);
    let (mut t_engine, mut t_candle) = (0f64, 0f64);
    let mut perturbed_changes = 0usize;
    let mut it = test.epoch(0);
    while let Some(hb) = it.next_host() {
        let hb = hb?;
        let b = hb.len();
        let t0 = Instant::now();
        let logits = m.forward(&hb.images, b, kernel).map_err(|e| anyhow!("{e}"))?;
        t_engine += ms(t0);
        let k = num_classes;
        for i in 0..b {
            if argmax(&logits[i * k..(i + 1) * k]) == hb.labels[i] as usize {
                correct += 1;
            }
        }
        if let Some((cm, _)) = &candle {
            let (c, h, w) = hb.shape;
            let x = Tensor::from_vec(hb.images.clone(), (b, c, h, w), &Device::Cpu)?;
            let t0 = Instant::now();
            let y: Vec<f32> = cm.forward_t(&x, false)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            t_candle += ms(t0);
            if a.sensitivity {
                let y2: Vec<f32> = cm
                    .forward_t(&(&x * (1.0 + 1e-6))?, false)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                for i in 0..b {
                    if argmax(&y2[i * k..(i + 1) * k]) != argmax(&y[i * k..(i + 1) * k]) {
                        perturbed_changes += 1;
                    }
                }
            }
            for i in 0..b {
                let (p, q) = (&logits[i * k..(i + 1) * k], &y[i * k..(i + 1) * k]);
                let am = argmax(q);
                if am == hb.labels[i] as usize {
                    correct_ref += 1;
                }
                if am == argmax(p) {
                    agree += 1;
                }
                let scale = q.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-6) as f64;
                let diff = p.iter().zip(q).fold(0f32, |s, (a, b)| s.max((a - b).abs())) as f64;
                max_abs = max_abs.max(diff);
                max_rel = max_rel.max(diff / scale);
                if diff / scale <= 1e-3 {
                    within += 1;
                }
            }
        }
        n += b;
    }
    let mut body = format!(
        "## Inference of `{}` on {}\n\nPacked engine (kernel `{}`, {} threads): **test top-1 {:.2}%** on {n} images, {:.1} images/s at batch {} \
         (whole test loop, normalisation excluded).\n",
        a.model.display(),
        a.dataset,
        kernel.name(),
        rayon::current_num_threads(),
        100.0 * correct as f64 / n as f64,
        n as f64 / (t_engine / 1e3),
        a.batch_size
    );
    if let Some(r) = &reference {
        body += &format!(
            "\nExactness against the candle forward pass (bnn-core layers on nn-core's `{}`, eval mode) of the same trained run `{}`: candle \
             top-1 {:.2}% ({:.1} images/s); **same argmax on {agree} / {n} images**; logits within 1e-3 relative on **{within} / {n} images** (per image: max |engine - \
             candle| / max |candle logit|); worst image {max_abs:.3e} absolute, {max_rel:.3e} relative.\n",
            m.name(),
            r.display(),
            100.0 * correct_ref as f64 / n as f64,
            n as f64 / (t_candle / 1e3)
        );
    }
    if a.sensitivity && reference.is_some() {
        body += &format!(
            "\nSensitivity of the float reference: candle run on the same images scaled by (1 + 1e-6) changes its own prediction on \
             **{perturbed_changes} / {n} images** (a change of the size of f32 rounding flips binarised activations that sit at 0).\n"
        );
    }
    body += &format!("\n```\n{}\n```\n", nn_core::report::command_line());
    println!("{body}");
    let stem = a.model.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let parent = a
        .model
        .parent()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    nn_core::report::write_section(RESULTS, TITLE, &format!("infer-{parent}-{stem}-{}", a.dataset), &body)?;
    if reference.is_some() && agree != n {
        eprintln!("warning: {} of {n} predictions differ from candle", n - agree);
    }
    Ok(())
}

fn norm(dataset: &str) -> (Vec<f32>, Vec<f32>) {
    use nn_core::data::transforms as t;
    match dataset {
        "mnist" => (t::MNIST_MEAN.to_vec(), t::MNIST_STD.to_vec()),
        "fashion-mnist" => (t::FASHION_MNIST_MEAN.to_vec(), t::FASHION_MNIST_STD.to_vec()),
        "usps" => (t::USPS_MEAN.to_vec(), t::USPS_STD.to_vec()),
        "cifar100" => (t::CIFAR100_MEAN.to_vec(), t::CIFAR100_STD.to_vec()),
        _ => (t::CIFAR10_MEAN.to_vec(), t::CIFAR10_STD.to_vec()),
    }
}

// ---------------------------------------------------------------------------------------------
// bench-deploy: end to end

/// Options of `cargo xtask bnn bench-deploy`.
#[derive(Args, Debug, Clone)]
pub struct BenchDeployArgs {
    /// A model file written by `cargo xtask bnn export` (its training run must still exist).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,128")]
    pub batches: Vec<usize>,
    /// Timed runs per measurement (batch 1 runs 20 images per timed run).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Skip the peak-memory probes (child processes).
    #[arg(long)]
    pub no_memory: bool,
}

pub fn bench_deploy(a: BenchDeployArgs) -> Result<()> {
    let kernel = Kernel::best();
    let packed = DeployedModel::load(&a.model, kernel)?;
    let run_dir = packed
        .source()
        .get("run")
        .map(PathBuf::from)
        .context("the model file does not record its training run")?;
    let run = load_run(&run_dir, a.data.as_deref())?;
    let (bin, _vs) = run.candle_model()?;
    let vs_f = VarStore::new(0, &Device::Cpu);
    let float = any_model(&run.config.model, &run.model_config, &vs_f, &nn_core::StandardFactory)?;
    let (c, s, _) = packed.io();
    let start_load = loadavg();
    let mut table = String::from(
        "| batch | threads | packed engine img/s | candle binary img/s | nn-core float img/s | packed / candle binary | packed / float | same, fastest runs: / candle binary | / float |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for &t in &a.threads {
        for &b in &a.batches {
            let x = bnn_core_rand(b * c * s * s, 9);
            let xt = Tensor::from_vec(x.clone(), (b, c, s, s), &Device::Cpu)?;
            let reps = if b == 1 { 20 } else { 1 };
            let r = with_threads(t, || -> Result<[f64; 5]> {
                let mut ts = [Vec::new(), Vec::new(), Vec::new()];
                for r in 0..=a.runs {
                    let t0 = Instant::now();
                    for _ in 0..reps {
                        packed.forward(&x, b, kernel).map_err(|e| anyhow!("{e}"))?;
                    }
                    let e0 = ms(t0);
                    let t0 = Instant::now();
                    for _ in 0..reps {
                        bin.forward_t(&xt, false)?.flatten_all()?.to_vec1::<f32>()?;
                    }
                    let e1 = ms(t0);
                    let t0 = Instant::now();
                    for _ in 0..reps {
                        float.forward_t(&xt, false)?.flatten_all()?.to_vec1::<f32>()?;
                    }
                    let e2 = ms(t0);
                    if r > 0 {
                        ts[0].push(e0);
                        ts[1].push(e1);
                        ts[2].push(e2);
                    }
                }
                let ips = |v: &mut Vec<f64>| (b * reps) as f64 / (median(v) / 1e3);
                let best = |v: &Vec<f64>| (b * reps) as f64 / (minimum(v) / 1e3);
                Ok([
                    ips(&mut ts[0]),
                    ips(&mut ts[1]),
                    ips(&mut ts[2]),
                    best(&ts[0]) / best(&ts[1]),
                    best(&ts[0]) / best(&ts[2]),
                ])
            })??;
            println!(
                "batch {b:>3} threads {t}: packed {:.1} img/s, candle binary {:.1}, float {:.1}",
                r[0], r[1], r[2]
            );
            table += &format!(
                "| {b} | {t} | {:.1} | {:.1} | {:.1} | **{:.1}x** | **{:.1}x** | {:.1}x | {:.1}x |\n",
                r[0],
                r[1],
                r[2],
                r[0] / r[1],
                r[0] / r[2],
                r[3],
                r[4]
            );
        }
    }
    let mut mem = String::new();
    if !a.no_memory {
        mem += "\nPeak memory (peak resident set of a fresh process that loads the model and runs one forward pass on random input; \
                `before` is the process after start-up, before the model is loaded; 2 threads):\n\n| engine | batch | peak RSS MiB | before MiB | peak - before MiB |\n|---|---|---|---|---|\n";
        let exe = std::env::current_exe()?;
        for b in [1usize, 128] {
            for engine in ["packed", "candle-binary", "float"] {
                let out = std::process::Command::new(&exe)
                    .args(["--threads", "2", "bnn", "mem-probe", "--model"])
                    .arg(&a.model)
                    .args(["--engine", engine, "--batch", &b.to_string()])
                    .output()?;
                if !out.status.success() {
                    bail!("mem-probe {engine} failed: {}", String::from_utf8_lossy(&out.stderr));
                }
                let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
                let v: Vec<f64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
                if v.len() != 2 {
                    bail!("unexpected mem-probe output `{line}`");
                }
                mem += &format!(
                    "| {engine} | {b} | {:.1} | {:.1} | {:.1} |\n",
                    v[1] / 1024.0,
                    v[0] / 1024.0,
                    (v[1] - v[0]) / 1024.0
                );
            }
        }
    }
    let body = format!(
        "## End to end: packed binary {} vs candle\n\nModel file `{}` (from run `{}`, {} input {c} x {s} x {s}). Packed engine (kernel `{}`) vs \
         the same trained binary model run through candle (bnn-core layers on nn-core's backbone, eval mode) vs the float {} of nn-core \
         (StandardFactory, nn-core's im2col + gemm convolutions), all on the same random input. Images/s from the median of {} interleaved \
         timed runs after one warm-up (batch 1: 20 images per run). Load average at start {start_load}, at end {} (shared machine).\n\n{table}{mem}\n```\n{}\n```\n",
        packed.name(),
        a.model.display(),
        run_dir.display(),
        run.config.dataset,
        kernel.name(),
        packed.name(),
        a.runs,
        loadavg(),
        nn_core::report::command_line()
    );
    println!("{body}");
    nn_core::report::write_section(
        RESULTS,
        TITLE,
        &format!("bench-deploy-{}-{}", packed.name(), run.config.dataset),
        &body,
    )?;
    Ok(())
}

/// Options of the internal `cargo xtask bnn mem-probe`.
#[derive(Args, Debug, Clone)]
pub struct MemProbeArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// packed, candle-binary or float.
    #[arg(long)]
    pub engine: String,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
}

/// `(VmRSS, VmHWM)` in KiB.
fn rss_kib() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

/// Prints `rss_before_kib peak_kib` after loading the model and one forward pass.
pub fn mem_probe(a: MemProbeArgs) -> Result<()> {
    let (before, _) = rss_kib();
    let packed = DeployedModel::load(&a.model, Kernel::best())?;
    let (c, s, num_classes) = packed.io();
    let b = a.batch;
    let x = bnn_core_rand(b * c * s * s, 3);
    match a.engine.as_str() {
        "packed" => {
            packed.forward(&x, b, Kernel::best()).map_err(|e| anyhow!("{e}"))?;
        }
        "candle-binary" | "float" => {
            let run_dir = packed.source().get("run").map(PathBuf::from).context("no training run recorded")?;
            let cfg: TrainConfig = serde_json::from_str(&std::fs::read_to_string(run_dir.join("config.json"))?)?;
            let mc = ModelConfig::new(c, num_classes, s);
            let vs = VarStore::new(0, &Device::Cpu);
            let m = if a.engine == "float" {
                any_model(&cfg.model, &mc, &vs, &nn_core::StandardFactory)?
            } else {
                let method = packed.source().get("method").cloned().unwrap_or_else(|| "ste".into());
                let m = any_model(&cfg.model, &mc, &vs, &BinaryFactory::new(BinaryConfig::from_method(&method)?))?;
                let ck = Checkpoint::load(&run_dir.join(nn_core::train::trainer::CHECKPOINT_FILE))?;
                vs.load_tensors(&ck.model, true)?;
                m
            };
            drop(packed);
            let xt = Tensor::from_vec(x, (b, c, s, s), &Device::Cpu)?;
            m.forward_t(&xt, false)?.flatten_all()?.to_vec1::<f32>()?;
        }
        e => bail!("unknown engine `{e}`; valid: packed, candle-binary, float"),
    }
    let (_, peak) = rss_kib();
    println!("{before} {peak}");
    Ok(())
}
