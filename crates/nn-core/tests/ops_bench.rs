//! Benchmark entry point (ignored by default; run optimized):
//! `NN_BENCH_THREADS=1,2 cargo test --release -p nn-core --test ops_bench -- --ignored --nocapture`
//! Set `NN_BENCH_QUICK=1` to skip stock candle (slow) and use fewer runs.

#[test]
#[ignore]
fn conv_benchmark() {
    let threads: Vec<usize> = std::env::var("NN_BENCH_THREADS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let quick = std::env::var("NN_BENCH_QUICK").is_ok_and(|v| v == "1");
    let cases = nn_core::bench::resnet20_cases();
    let report = if quick {
        nn_core::bench::conv_benchmark_cases(&cases, &threads, 5, 0)
    } else {
        nn_core::bench::conv_benchmark(&threads)
    }
    .unwrap();
    assert!(!report.rows.is_empty());
}

/// Profiling loop: `NN_PROF_CASE=<index into resnet20_cases> NN_PROF_MODE=fwd|fb NN_PROF_ITERS=20`.
#[test]
#[ignore]
fn conv_profile_loop() {
    use candle_core::{Device, Tensor, Var};
    let idx: usize = std::env::var("NN_PROF_CASE").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let mode = std::env::var("NN_PROF_MODE").unwrap_or_default();
    let fb = mode != "fwd";
    let iters: usize = std::env::var("NN_PROF_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    if let Some(v) = std::env::var("NN_LHS_PACK").ok().and_then(|v| v.parse().ok()) {
        println!("lhs packing threshold {} -> {v}", gemm::get_lhs_packing_threshold_single_thread());
        gemm::set_lhs_packing_threshold_single_thread(v);
    }
    let c = &nn_core::bench::resnet20_cases()[idx];
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (c.n, c.cin, c.h, c.w), &Device::Cpu).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (c.cout, c.cin / c.groups, c.k, c.k), &Device::Cpu).unwrap()).unwrap();
    let o = nn_core::ops::Conv2dOpts::new(c.stride, c.padding).with_groups(c.groups);
    let cpu = || -> f64 {
        let st = std::fs::read_to_string("/proc/self/stat").unwrap();
        let f: Vec<&str> = st.rsplit(')').next().unwrap().split_whitespace().collect();
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) * 10.0
    };
    let c0 = cpu();
    let t = nn_core::bench::time_it(1, iters, || {
        // gx: only the input gradient, gw: only the weight gradient, fb: both.
        let xt = if mode == "gw" {
            x.as_detached_tensor()
        } else {
            x.as_tensor().clone()
        };
        let wt = if mode == "gx" {
            w.as_detached_tensor()
        } else {
            w.as_tensor().clone()
        };
        let y = nn_core::ops::conv2d(&xt, &wt, o)?;
        if fb {
            y.sum_all()?.backward()?;
        }
        Ok(())
    })
    .unwrap();
    let cpu_ms = (cpu() - c0) / (iters + 1) as f64;
    println!(
        "{} {}: median {:.2} ms min {:.2} ms, process cpu {cpu_ms:.1} ms/iter",
        c.name, mode, t.median_ms, t.min_ms
    );
}
