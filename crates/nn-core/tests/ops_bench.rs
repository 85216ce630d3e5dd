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
