//! Timing harness and the convolution benchmark comparing nn-core's CPU kernels
//! ([`crate::ops`]) with stock candle and (when importable) PyTorch.
//!
//! nn-core runs inside a dedicated rayon [`rayon::ThreadPool`] with the requested thread
//! count. Candle's CPU convolution uses rayon's *current* pool for its batch loop and reads
//! `RAYON_NUM_THREADS` for its gemm parallelism, so it is run inside the same pool with
//! that variable set. PyTorch runs in a `python3` subprocess (`bench/torch/conv_bench.py`)
//! with `torch.set_num_threads`.

use crate::ops::{conv2d, Conv2dOpts};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Summary of repeated timings of one closure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Timing {
    /// Median wall time in milliseconds.
    pub median_ms: f64,
    /// Fastest run in milliseconds.
    pub min_ms: f64,
    /// Number of timed runs (after warmup).
    pub runs: usize,
}

/// The machine a benchmark ran on, for its report: the CPU's model name (with family and
/// model numbers from `/proc/cpuinfo` where present), the number of logical CPUs, and which
/// build of nn-core's vectorised kernels runs (the `gemm` crate chooses its own the same way).
/// Timings from different machines are not comparable; this line says which one it was.
pub fn machine_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let name = field("model name").unwrap_or_else(|| "unknown CPU".into());
    let ids = match (field("cpu family"), field("model")) {
        (Some(f), Some(m)) => format!(" (family {f}, model {m})"),
        _ => String::new(),
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    let simd = if crate::ops::has_avx512() {
        "AVX-512"
    } else if avx2 {
        "AVX2+FMA"
    } else {
        "baseline"
    };
    format!("{name}{ids}, {cpus} logical CPUs, {simd} kernels")
}

/// Runs `f` `warmup` times untimed, then `runs` times timed, and returns the median.
pub fn time_it(warmup: usize, runs: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Timing> {
    for _ in 0..warmup {
        f()?;
    }
    let mut ts = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        f()?;
        ts.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(Timing {
        median_ms: ts[ts.len() / 2],
        min_ms: ts[0],
        runs: ts.len(),
    })
}

/// One convolution shape of the benchmark (square kernel, stride and padding).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConvCase {
    /// Short label, e.g. `16ch@32x32->16 3x3 s1`.
    pub name: String,
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub cin: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel size.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Padding.
    pub padding: usize,
    /// Channel groups.
    pub groups: usize,
}

impl ConvCase {
    fn new(n: usize, cin: usize, hw: usize, cout: usize, k: usize, stride: usize, padding: usize, groups: usize) -> Self {
        let dw = if groups > 1 { format!(" g{groups}") } else { String::new() };
        Self {
            name: format!("{cin}ch@{hw}x{hw}->{cout} {k}x{k} s{stride}{dw}"),
            n,
            cin,
            h: hw,
            w: hw,
            cout,
            k,
            stride,
            padding,
            groups,
        }
    }
}

/// The benchmark's shapes: the three ResNet-20 stages, a depthwise 3x3 and a strided
/// downsampling convolution, all at batch 128; then the same stages on 28x28 inputs
/// (as used in training), the second downsampling convolution and the 3-channel stem.
pub fn resnet20_cases() -> Vec<ConvCase> {
    vec![
        ConvCase::new(128, 16, 32, 16, 3, 1, 1, 1),
        ConvCase::new(128, 32, 16, 32, 3, 1, 1, 1),
        ConvCase::new(128, 64, 8, 64, 3, 1, 1, 1),
        ConvCase::new(128, 64, 16, 64, 3, 1, 1, 64),
        ConvCase::new(128, 16, 32, 32, 3, 2, 1, 1),
        ConvCase::new(128, 16, 28, 16, 3, 1, 1, 1),
        ConvCase::new(128, 32, 14, 32, 3, 1, 1, 1),
        ConvCase::new(128, 64, 7, 64, 3, 1, 1, 1),
        ConvCase::new(128, 32, 16, 64, 3, 2, 1, 1),
        ConvCase::new(128, 16, 28, 32, 3, 2, 1, 1),
        ConvCase::new(128, 32, 14, 64, 3, 2, 1, 1),
        ConvCase::new(128, 3, 32, 16, 3, 1, 1, 1),
    ]
}

/// [`resnet20_cases`] whose name contains one of the comma-separated patterns in the
/// environment variable `NN_BENCH_CASES` (all cases when unset or empty).
pub fn selected_cases() -> Vec<ConvCase> {
    let pat = std::env::var("NN_BENCH_CASES").unwrap_or_default();
    let pats: Vec<&str> = pat.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
    resnet20_cases()
        .into_iter()
        .filter(|c| pats.is_empty() || pats.iter().any(|p| c.name.contains(p)))
        .collect()
}

/// One row of the report: one shape at one thread count. Times are medians in ms.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConvBenchRow {
    /// Shape label.
    pub case: String,
    /// Thread count.
    pub threads: usize,
    /// nn-core forward.
    pub nn_fwd_ms: f64,
    /// Stock candle forward (`None` if it failed).
    pub candle_fwd_ms: Option<f64>,
    /// PyTorch forward (`None` if torch is unavailable).
    pub torch_fwd_ms: Option<f64>,
    /// nn-core forward + backward (input and weight gradients).
    pub nn_fwd_bwd_ms: f64,
    /// Stock candle forward + backward.
    pub candle_fwd_bwd_ms: Option<f64>,
    /// PyTorch forward + backward.
    pub torch_fwd_bwd_ms: Option<f64>,
    /// Smallest and largest per-round nn-core/PyTorch forward+backward ratio.
    #[serde(default)]
    pub round_ratios: Option<(f64, f64)>,
    /// nn-core's kernels alone: forward, then the input and weight gradients of a fixed
    /// output gradient ([`crate::ops::conv2d_input_grad`], [`crate::ops::conv2d_weight_grad`]),
    /// no autograd bookkeeping.
    #[serde(default)]
    pub nn_kernels_ms: Option<f64>,
    /// PyTorch's kernels alone: forward, then `aten.convolution_backward` for both gradients.
    #[serde(default)]
    pub torch_kernels_ms: Option<f64>,
    /// Smallest and largest per-round nn-core/PyTorch kernel-time ratio.
    #[serde(default)]
    pub kernel_round_ratios: Option<(f64, f64)>,
}

impl ConvBenchRow {
    /// nn-core / PyTorch forward+backward time ratio (target: <= 1).
    pub fn ratio_nn_torch(&self) -> Option<f64> {
        self.torch_fwd_bwd_ms.map(|t| self.nn_fwd_bwd_ms / t)
    }
    /// nn-core / PyTorch ratio of the kernels alone (forward + both gradient kernels;
    /// target: <= 1).
    pub fn ratio_kernels(&self) -> Option<f64> {
        Some(self.nn_kernels_ms? / self.torch_kernels_ms?)
    }
    /// candle / nn-core forward+backward time ratio (speed-up over stock candle).
    pub fn ratio_candle_nn(&self) -> Option<f64> {
        self.candle_fwd_bwd_ms.map(|c| c / self.nn_fwd_bwd_ms)
    }
}

/// Result of [`conv_benchmark`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConvBenchReport {
    /// One row per (shape, thread count).
    pub rows: Vec<ConvBenchRow>,
    /// Whether PyTorch could be imported.
    pub torch_available: bool,
    /// Measurement conditions (load average, thread handling, failures).
    pub notes: Vec<String>,
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.digits$}"))
}

impl ConvBenchReport {
    /// The report as a markdown table followed by the notes.
    pub fn to_markdown(&self) -> String {
        let mut s = String::from(
            "| shape (batch 128) | threads | nn-core fwd | candle fwd | torch fwd | nn-core kernels | torch kernels | nn-core/torch (kernels) | per-round (kernels) | nn-core step | candle step | torch step | nn-core/torch (step) | candle/nn-core (step) | per-round (step) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        let range = |r: Option<(f64, f64)>| r.map_or_else(|| "n/a".to_string(), |(lo, hi)| format!("{lo:.2}-{hi:.2}"));
        for r in &self.rows {
            s += &format!(
                "| {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} |\n",
                r.case,
                r.threads,
                r.nn_fwd_ms,
                fmt_opt(r.candle_fwd_ms, 1),
                fmt_opt(r.torch_fwd_ms, 1),
                fmt_opt(r.nn_kernels_ms, 1),
                fmt_opt(r.torch_kernels_ms, 1),
                fmt_opt(r.ratio_kernels(), 2),
                range(r.kernel_round_ratios),
                r.nn_fwd_bwd_ms,
                fmt_opt(r.candle_fwd_bwd_ms, 1),
                fmt_opt(r.torch_fwd_bwd_ms, 1),
                fmt_opt(r.ratio_nn_torch(), 2),
                fmt_opt(r.ratio_candle_nn(), 1),
                range(r.round_ratios),
            );
        }
        s += "\nTimes are medians in milliseconds.\n";
        for n in &self.notes {
            s += &format!("\n- {n}");
        }
        s.push('\n');
        s
    }
}

impl std::fmt::Display for ConvBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_markdown())
    }
}

type ConvFn = fn(&Tensor, &Tensor, &ConvCase) -> candle_core::Result<Tensor>;

fn nn_conv(x: &Tensor, w: &Tensor, c: &ConvCase) -> candle_core::Result<Tensor> {
    conv2d(x, w, Conv2dOpts::new(c.stride, c.padding).with_groups(c.groups))
}

fn candle_conv(x: &Tensor, w: &Tensor, c: &ConvCase) -> candle_core::Result<Tensor> {
    x.conv2d(w, c.padding, c.stride, 1, c.groups)
}

/// Times forward and forward+backward (`sum().backward()`, both gradients) of `f`.
fn time_conv(f: ConvFn, c: &ConvCase, x: &Var, w: &Var, runs: usize) -> anyhow::Result<(f64, f64)> {
    let fwd = time_it(1, runs, || {
        f(x.as_tensor(), w.as_tensor(), c)?;
        Ok(())
    })?;
    let fb = time_it(1, runs, || {
        let g = f(x.as_tensor(), w.as_tensor(), c)?.sum_all()?.backward()?;
        anyhow::ensure!(g.get(x.as_tensor()).is_some() && g.get(w.as_tensor()).is_some(), "missing gradient");
        Ok(())
    })?;
    Ok((fwd.median_ms, fb.median_ms))
}

/// Times nn-core's kernels alone: forward, input gradient and weight gradient of the fixed
/// output gradient `gy`.
fn time_kernels(c: &ConvCase, x: &Tensor, w: &Tensor, gy: &Tensor, runs: usize) -> anyhow::Result<f64> {
    let o = Conv2dOpts::new(c.stride, c.padding).with_groups(c.groups);
    Ok(time_it(1, runs, || {
        conv2d(x, w, o)?;
        crate::ops::conv2d_input_grad(gy, w, x.dims(), o)?;
        crate::ops::conv2d_weight_grad(x, gy, w.dims(), o)?;
        Ok(())
    })?
    .median_ms)
}

#[derive(Deserialize)]
struct TorchTiming {
    name: String,
    fwd_ms: f64,
    fwd_bwd_ms: f64,
    kernels_ms: f64,
}

fn torch_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import torch"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn torch_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/torch/conv_bench.py")
}

fn run_torch(cases: &[ConvCase], threads: usize) -> anyhow::Result<Vec<TorchTiming>> {
    let out = std::process::Command::new("python3")
        .arg(torch_script())
        .arg(threads.to_string())
        .arg(serde_json::to_string(cases)?)
        .env("OMP_NUM_THREADS", threads.to_string())
        // glibc malloc tuned as this process is (crate::alloc::tune_allocator)
        .envs(crate::alloc::glibc_tuning_env())
        .output()?;
    anyhow::ensure!(out.status.success(), "torch bench failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Benchmarks nn-core, stock candle and PyTorch convolutions on [`resnet20_cases`] for
/// each thread count in `threads`; prints the table to stdout and returns it.
pub fn conv_benchmark(threads: &[usize]) -> anyhow::Result<ConvBenchReport> {
    conv_benchmark_cases(&selected_cases(), threads, 7, 3)
}

/// Rounds of [`conv_benchmark_cases`]: nn-core and PyTorch alternate (all shapes on one
/// side, then all on the other, repeated), so that a slow period of the shared machine
/// hits both sides; the table reports medians over the rounds.
pub const CONV_BENCH_ROUNDS: usize = 3;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// [`conv_benchmark`] on chosen cases with `runs` timed runs per round for nn-core and
/// `candle_runs` for stock candle (which is much slower, so it runs once, not per round;
/// 0 skips candle).
pub fn conv_benchmark_cases(cases: &[ConvCase], threads: &[usize], runs: usize, candle_runs: usize) -> anyhow::Result<ConvBenchReport> {
    let mut notes = Vec::new();
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        notes.push(format!("load average at start: {}", l.trim()));
    }
    let has_torch = torch_available();
    if !has_torch {
        notes.push("PyTorch not importable by python3: torch columns are n/a".into());
    }
    let old_env = std::env::var("RAYON_NUM_THREADS").ok();
    let mut rows = Vec::new();
    for &t in threads {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build()?;
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        let dev = Device::Cpu;
        let mut inputs = Vec::with_capacity(cases.len());
        for c in cases {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (c.n, c.cin, c.h, c.w), &dev)?)?;
            let w =
                Var::from_tensor(&(Tensor::randn(0f32, 1.0, (c.cout, c.cin / c.groups, c.k, c.k), &dev)? * 0.1)?.to_dtype(DType::F32)?)?;
            inputs.push((x, w));
        }
        let grads_out = inputs
            .iter()
            .zip(cases)
            .map(|((x, w), c)| Tensor::randn(0f32, 1.0, nn_conv(x.as_tensor(), w.as_tensor(), c)?.shape(), &dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // per case: one (fwd, fwd+bwd, kernels) triple per round
        let mut nn: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); cases.len()];
        let mut torch: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); cases.len()];
        let mut torch_ok = has_torch;
        for _round in 0..CONV_BENCH_ROUNDS {
            if torch_ok {
                match run_torch(cases, t) {
                    Ok(v) => {
                        for (i, c) in cases.iter().enumerate() {
                            if let Some(r) = v.iter().find(|r| r.name == c.name) {
                                torch[i].push((r.fwd_ms, r.fwd_bwd_ms, r.kernels_ms));
                            }
                        }
                    }
                    Err(e) => {
                        notes.push(format!("torch failed at {t} threads: {e}"));
                        torch_ok = false;
                    }
                }
            }
            for (i, c) in cases.iter().enumerate() {
                let (x, w) = &inputs[i];
                let (f, fb) = pool.install(|| time_conv(nn_conv, c, x, w, runs))?;
                let k = pool.install(|| time_kernels(c, x.as_tensor(), w.as_tensor(), &grads_out[i], runs))?;
                nn[i].push((f, fb, k));
            }
        }
        for (i, c) in cases.iter().enumerate() {
            let (x, w) = &inputs[i];
            let cf = if candle_runs == 0 {
                Err(anyhow::anyhow!("skipped"))
            } else {
                pool.install(|| time_conv(candle_conv, c, x, w, candle_runs))
            };
            let (cf, cfb) = match cf {
                Ok((a, b)) => (Some(a), Some(b)),
                Err(_) if candle_runs == 0 => (None, None),
                Err(e) => {
                    notes.push(format!("candle failed on {} at {t} threads: {e}", c.name));
                    (None, None)
                }
            };
            let nf: Vec<f64> = nn[i].iter().map(|r| r.0).collect();
            let nfb: Vec<f64> = nn[i].iter().map(|r| r.1).collect();
            let nk: Vec<f64> = nn[i].iter().map(|r| r.2).collect();
            let ratio_range = |a: &[f64], b: &[f64]| {
                let ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
                let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = ratios.iter().copied().fold(0.0, f64::max);
                (lo, hi)
            };
            let (tf, tfb, tk, range, krange) = if torch[i].len() == nn[i].len() {
                let tf: Vec<f64> = torch[i].iter().map(|r| r.0).collect();
                let tfb: Vec<f64> = torch[i].iter().map(|r| r.1).collect();
                let tk: Vec<f64> = torch[i].iter().map(|r| r.2).collect();
                (
                    Some(median(&tf)),
                    Some(median(&tfb)),
                    Some(median(&tk)),
                    Some(ratio_range(&nfb, &tfb)),
                    Some(ratio_range(&nk, &tk)),
                )
            } else {
                (None, None, None, None, None)
            };
            rows.push(ConvBenchRow {
                case: c.name.clone(),
                threads: t,
                nn_fwd_ms: median(&nf),
                candle_fwd_ms: cf,
                torch_fwd_ms: tf,
                nn_fwd_bwd_ms: median(&nfb),
                candle_fwd_bwd_ms: cfb,
                torch_fwd_bwd_ms: tfb,
                round_ratios: range,
                nn_kernels_ms: Some(median(&nk)),
                torch_kernels_ms: tk,
                kernel_round_ratios: krange,
            });
        }
    }
    match old_env {
        Some(v) => std::env::set_var("RAYON_NUM_THREADS", v),
        None => std::env::remove_var("RAYON_NUM_THREADS"),
    }
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        notes.push(format!("load average at end: {}", l.trim()));
    }
    notes.push(format!(
        "{CONV_BENCH_ROUNDS} alternating rounds (PyTorch, all shapes, in a fresh python3 process; then nn-core, all shapes); \
         per round and shape nn-core takes the median of {runs} timed runs and PyTorch of 7; the table gives the median \
         over rounds, the per-round columns the range of the per-round nn-core/torch ratios; candle: {candle_runs} runs, once"
    ));
    notes.push(
        "kernels = the convolution itself: forward, then the input- and weight-gradient kernels for a fixed random output \
         gradient (nn-core: conv2d, conv2d_input_grad, conv2d_weight_grad; PyTorch: F.conv2d and aten.convolution_backward, \
         the kernel its autograd calls). step = an autograd step: conv, sum, backward for input and weight; it adds each \
         framework's bookkeeping: candle materialises the broadcast gradient of the sum and accumulates every gradient into a \
         zero tensor (zeros_like + add), which costs stock candle and nn-core the same, several ms on the 8 MiB tensors here"
            .into(),
    );
    notes.push("candle runs inside the same rayon pool with RAYON_NUM_THREADS set to the thread count (its gemm reads it)".into());
    let report = ConvBenchReport {
        rows,
        torch_available: has_torch,
        notes,
    };
    println!("{report}");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_description_names_cpus_and_kernels() {
        let d = machine_description();
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert!(d.contains(&format!("{cpus} logical CPUs")), "{d}");
        assert!(
            ["AVX-512 kernels", "AVX2+FMA kernels", "baseline kernels"]
                .iter()
                .any(|k| d.ends_with(k)),
            "{d}"
        );
    }

    #[test]
    fn time_it_and_report_format() {
        let mut calls = 0;
        let t = time_it(2, 3, || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!((calls, t.runs), (5, 3));
        assert!(t.min_ms <= t.median_ms);
        let row = ConvBenchRow {
            case: "x".into(),
            threads: 2,
            nn_fwd_ms: 1.0,
            candle_fwd_ms: Some(6.0),
            torch_fwd_ms: None,
            nn_fwd_bwd_ms: 2.0,
            candle_fwd_bwd_ms: Some(18.0),
            torch_fwd_bwd_ms: Some(4.0),
            round_ratios: Some((0.45, 0.6)),
            nn_kernels_ms: Some(1.5),
            torch_kernels_ms: Some(2.0),
            kernel_round_ratios: Some((0.7, 0.8)),
        };
        assert_eq!(row.ratio_nn_torch(), Some(0.5));
        assert_eq!(row.ratio_kernels(), Some(0.75));
        assert_eq!(row.ratio_candle_nn(), Some(9.0));
        let rep = ConvBenchReport {
            rows: vec![row],
            torch_available: false,
            notes: vec!["note".into()],
        };
        let md = rep.to_markdown();
        assert!(
            md.contains("| x | 2 | 1.0 | 6.0 | n/a | 1.5 | 2.0 | 0.75 | 0.70-0.80 | 2.0 | 18.0 | 4.0 | 0.50 | 9.0 | 0.45-0.60 |"),
            "{md}"
        );
        let back: ConvBenchReport = serde_json::from_str(&serde_json::to_string(&rep).unwrap()).unwrap();
        assert_eq!(back.rows.len(), 1);
    }
}
