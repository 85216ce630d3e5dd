//! Times the binary GEMM kernels on one square size against candle's f32 matmul, for tuning
//! `deploy/gemm.rs` (the side-by-side table of record is `cargo xtask bnn bench-gemm`).
//!
//! `cargo run --release -p bnn-core --example gemm_kernel -- [SIZE] [THREADS] [RUNS]`

use bnn_core::deploy::gemm::{bgemm_into, Kernel};
use bnn_core::deploy::pack::PackedMatrix;
use candle_core::{Device, Tensor};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    nn_core::runtime::tune();
    let args: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().expect("a number")).collect();
    let size = args.first().copied().unwrap_or(1024);
    let threads = args.get(1).copied().unwrap_or(2);
    let runs = args.get(2).copied().unwrap_or(21);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let (m, n, k) = (size, size, size);
    let mut state = 0x2545f4914f6cdd1du64;
    let mut rnd = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                if state & 1 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect()
    };
    let (a, b) = (rnd(m * k), rnd(n * k));
    let (pa, pb) = (PackedMatrix::from_f32(&a, m, k), PackedMatrix::from_f32(&b, n, k));
    let ta = Tensor::from_vec(a, (m, k), &Device::Cpu)?;
    let tb = Tensor::from_vec(b, (n, k), &Device::Cpu)?.t()?;
    let mut out = vec![0i32; m * n];
    let mut times: Vec<(String, Vec<f64>)> = Kernel::available()
        .into_iter()
        .filter(|k| *k != Kernel::Portable)
        .map(|k| (k.name().to_string(), vec![]))
        .collect();
    times.push(("candle".into(), vec![]));
    pool.install(|| -> anyhow::Result<()> {
        for r in 0..runs + 1 {
            for (name, t) in times.iter_mut() {
                let t0 = Instant::now();
                if name == "candle" {
                    std::hint::black_box(ta.matmul(&tb)?);
                } else {
                    bgemm_into(&pa, &pb, Kernel::parse(name).unwrap(), &mut out);
                }
                if r > 0 {
                    t.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        Ok(())
    })?;
    let candle = median(times.last().unwrap().1.clone());
    for (name, t) in &times {
        let (med, min) = (median(t.clone()), t.iter().cloned().fold(f64::MAX, f64::min));
        println!(
            "{size}^3 {threads} threads {name:>7}: median {med:.3} ms min {min:.3} ms  candle/this {:.2}x",
            candle / med
        );
    }
    Ok(())
}
