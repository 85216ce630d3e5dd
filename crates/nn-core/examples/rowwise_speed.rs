//! Throughput of the fused row-wise kernels (nn_core::ops::rowwise) against candle's composed
//! or stock versions, per element, for an in-cache and a large tensor.
//!
//! `cargo run --release -p nn-core --example rowwise_speed`

use candle_core::{Device, Result, Tensor};
use nn_core::layers::functional;
use nn_core::ops::rowwise;
use std::time::Instant;

fn ns_per_elem(n: usize, f: impl Fn() -> Result<Tensor>) -> Result<f64> {
    f()?;
    let reps = (20_000_000 / n).clamp(3, 2000);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e9 / (reps * n) as f64);
    }
    Ok(best)
}

fn main() -> Result<()> {
    nn_core::runtime::tune();
    println!("{} threads; ns per element (best of 3)", candle_core::utils::get_num_threads());
    for (rows, d) in [(64usize, 256usize), (12288, 197)] {
        let n = rows * d;
        let x = Tensor::randn(0f32, 1.0, (rows, d), &Device::Cpu)?;
        let g = Tensor::ones(d, candle_core::DType::F32, &Device::Cpu)?;
        let b = Tensor::zeros(d, candle_core::DType::F32, &Device::Cpu)?;
        println!("{rows} x {d} ({:.1} MB):", n as f64 * 4e-6);
        println!("  copy            {:.3}", ns_per_elem(n, || x.copy())?);
        println!(
            "  gelu fused      {:.3}   candle {:.3}",
            ns_per_elem(n, || rowwise::gelu_erf(&x))?,
            ns_per_elem(n, || x.gelu_erf())?
        );
        println!(
            "  softmax fused   {:.3}   composed {:.3}",
            ns_per_elem(n, || rowwise::softmax_last_dim(&x))?,
            ns_per_elem(n, || functional::softmax_composed(&x, 1))?
        );
        println!(
            "  layernorm fused {:.3}   composed {:.3}",
            ns_per_elem(n, || rowwise::layer_norm(&x, Some(&g), Some(&b), 1e-6))?,
            ns_per_elem(n, || functional::layer_norm_composed(&x, Some(&g), Some(&b), 1e-6))?
        );
    }
    Ok(())
}
