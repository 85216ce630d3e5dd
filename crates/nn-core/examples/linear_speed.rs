//! Linear-layer products `x W^T` on transformer shapes: candle's matmul (the gemm crate's own
//! threading) against the product split into row blocks over rayon's threads, each block one
//! single-threaded gemm. `cargo run --release -p nn-core --example linear_speed`
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use std::time::Instant;

fn median_ms(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..15)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[7]
}

fn rowblock(x: &[f32], w: &[f32], out: &mut [f32], rows: usize, k: usize, n: usize, block: usize) {
    out.par_chunks_mut(block * n).enumerate().for_each(|(i, o)| {
        let r = o.len() / n;
        unsafe {
            gemm::gemm(
                r,
                n,
                k,
                o.as_mut_ptr(),
                1,
                n as isize,
                false,
                x[i * block * k..].as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
    let _ = rows;
}

fn main() -> candle_core::Result<()> {
    nn_core::runtime::tune();
    let dev = Device::Cpu;
    for (name, rows, k, n) in [
        ("vit-ti qkv", 1576, 192, 576),
        ("vit-ti proj", 1576, 192, 192),
        ("vit-ti fc1", 1576, 192, 768),
        ("vit-ti fc2", 1576, 768, 192),
        ("swin-t s1 fc1", 8 * 3136, 96, 384),
        ("pvt-b0 s1 fc1", 8 * 3136, 32, 256),
    ] {
        let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let candle = median_ms(|| {
            x.matmul(&w.t().unwrap()).unwrap();
        });
        let lin = |own: bool| {
            nn_core::ops::linear::set_own_sgemm(own);
            median_ms(|| {
                nn_core::ops::linear::linear(&x, &w, None).unwrap();
            })
        };
        let (crate_ms, own_ms) = (lin(false), lin(true));
        let gf = |ms: f64| 2.0 * (rows * k * n) as f64 / ms / 1e6;
        println!(
            "{name:<16} {rows}x{k}x{n}: linear with gemm crate {crate_ms:.2} ms ({:.0} GFLOP/s), own AVX2 kernel {own_ms:.2} ms ({:.0} GFLOP/s)",
            gf(crate_ms),
            gf(own_ms)
        );
        if std::env::args().any(|a| a == "--linear-only") {
            continue;
        }
        let (xv, wv) = (x.flatten_all()?.to_vec1::<f32>()?, w.flatten_all()?.to_vec1::<f32>()?);
        let mut out = vec![0f32; rows * n];
        let mut line = format!("{name:<16} {rows}x{k}x{n}: candle {candle:.2} ms");
        for block in [128, 256, 394, 512, 788] {
            let t = median_ms(|| rowblock(&xv, &wv, &mut out, rows, k, n, block));
            line += &format!(" | rows/{block} {t:.2} ({:.2}x)", candle / t);
        }
        println!("{line}");
    }
    Ok(())
}
