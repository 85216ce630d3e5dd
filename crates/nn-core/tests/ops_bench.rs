//! Benchmark entry point (ignored by default; run optimized):
//! `NN_BENCH_THREADS=1,2 cargo test --release -p nn-core --test ops_bench -- --ignored --nocapture`
//! Set `NN_BENCH_QUICK=1` to skip stock candle (slow) and use fewer runs, and
//! `NN_BENCH_CASES=pat1,pat2` to run only the cases whose name contains a pattern.

#[test]
#[ignore]
fn conv_benchmark() {
    let threads: Vec<usize> = std::env::var("NN_BENCH_THREADS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let quick = std::env::var("NN_BENCH_QUICK").is_ok_and(|v| v == "1");
    let cases = nn_core::bench::selected_cases();
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

/// Probe of the `gemm` crate's single-thread speed for the layouts the conv kernels can
/// use (GFLOP/s, best of several interleaved repeats): `NN_PROBE=1`.
#[test]
#[ignore]
fn gemm_layout_probe() {
    use gemm::{gemm, Parallelism};
    use std::time::Instant;
    // (name, m, n, k, dst (cs, rs), lhs (cs, rs), rhs (cs, rs)) with buffers sized generously.
    let shapes = [(16usize, 144usize), (32, 288), (64, 576)];
    let ns = [128usize, 256, 512, 1024];
    let buf = |len: usize| -> Vec<f32> { (0..len).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect() };
    for &(co, k) in &shapes {
        for &n in &ns {
            let ld = n + 16;
            let w = buf(co * k);
            let col = buf(k * ld);
            let g = buf(co * n);
            let mut dst = buf(co.max(k) * ld.max(k + 16));
            let flops = 2.0 * (co * n * k) as f64;
            type V<'a> = (
                &'a str,
                usize,
                usize,
                usize,
                isize,
                isize,
                *const f32,
                isize,
                isize,
                *const f32,
                isize,
                isize,
            );
            let variants: Vec<V> = vec![
                // forward: out[co, n] = W[co, k] x col[k, n]
                (
                    "fwd rm",
                    co,
                    n,
                    k,
                    1,
                    n as isize,
                    w.as_ptr(),
                    1,
                    k as isize,
                    col.as_ptr(),
                    1,
                    ld as isize,
                ),
                (
                    "fwd dstT",
                    co,
                    n,
                    k,
                    co as isize,
                    1,
                    w.as_ptr(),
                    1,
                    k as isize,
                    col.as_ptr(),
                    1,
                    ld as isize,
                ),
                (
                    "fwd colT",
                    co,
                    n,
                    k,
                    1,
                    n as isize,
                    w.as_ptr(),
                    1,
                    k as isize,
                    col.as_ptr(),
                    k as isize,
                    1,
                ),
                (
                    "fwd colT dstT",
                    co,
                    n,
                    k,
                    co as isize,
                    1,
                    w.as_ptr(),
                    1,
                    k as isize,
                    col.as_ptr(),
                    k as isize,
                    1,
                ),
                // input grad: gcol[k, n] = W^T[k, co] x g[co, n]
                (
                    "gx rm",
                    k,
                    n,
                    co,
                    1,
                    ld as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    g.as_ptr(),
                    1,
                    n as isize,
                ),
                (
                    "gx dstT",
                    k,
                    n,
                    co,
                    k as isize,
                    1,
                    w.as_ptr(),
                    k as isize,
                    1,
                    g.as_ptr(),
                    1,
                    n as isize,
                ),
                // weight grad: gw[co, k] = g[co, n] x col^T[n, k]
                (
                    "gw rm",
                    co,
                    k,
                    n,
                    1,
                    k as isize,
                    g.as_ptr(),
                    1,
                    n as isize,
                    col.as_ptr(),
                    ld as isize,
                    1,
                ),
                (
                    "gw colT",
                    co,
                    k,
                    n,
                    1,
                    k as isize,
                    g.as_ptr(),
                    1,
                    n as isize,
                    col.as_ptr(),
                    1,
                    k as isize,
                ),
                (
                    "gw dstT",
                    co,
                    k,
                    n,
                    co as isize,
                    1,
                    g.as_ptr(),
                    1,
                    n as isize,
                    col.as_ptr(),
                    ld as isize,
                    1,
                ),
            ];
            let mut best = vec![f64::MAX; variants.len() * 2];
            for _rep in 0..3 {
                for (vi, v) in variants.iter().enumerate() {
                    for pack in 0..2 {
                        gemm::set_lhs_packing_threshold_single_thread(if pack == 0 { 8 } else { 0 });
                        let reps = (2e8 / flops).ceil() as usize;
                        let t0 = Instant::now();
                        for _ in 0..reps {
                            unsafe {
                                gemm(
                                    v.1,
                                    v.2,
                                    v.3,
                                    dst.as_mut_ptr(),
                                    v.4,
                                    v.5,
                                    false,
                                    v.6,
                                    v.7,
                                    v.8,
                                    v.9,
                                    v.10,
                                    v.11,
                                    0.0f32,
                                    1.0f32,
                                    false,
                                    false,
                                    false,
                                    Parallelism::None,
                                )
                            }
                        }
                        let dt = t0.elapsed().as_secs_f64() / reps as f64;
                        let b = &mut best[vi * 2 + pack];
                        *b = b.min(dt);
                    }
                }
            }
            gemm::set_lhs_packing_threshold_single_thread(8);
            let line: Vec<String> = variants
                .iter()
                .enumerate()
                .map(|(vi, v)| format!("{} {:.0}/{:.0}", v.0, flops / best[vi * 2] * 1e-9, flops / best[vi * 2 + 1] * 1e-9))
                .collect();
            println!("co {co} k {k} n {n}: {}", line.join(" | "));
        }
    }
}
