//! Times forward and forward+backward passes of a registered model on random input:
//! `cargo run --release -p vit-survey-zoo --example step_time -- MODEL IMAGE_SIZE BATCH [STEPS]`.

use candle_core::{Device, Result, Tensor};
use std::time::Instant;
use vit_survey_zoo::create_model;

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let name = a.get(1).map(String::as_str).unwrap_or("vit_micro_patch4_32");
    let size: usize = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(32);
    let batch: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(32);
    let steps: usize = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(3);
    let b = create_model(name, 10, size)?;
    let x = Tensor::randn(0f32, 1.0, (batch, 3, size, size), &Device::Cpu)?;
    b.model.forward_t(&x, true)?;
    let t = Instant::now();
    for _ in 0..steps {
        b.model.forward_t(&x, false)?;
    }
    let f = t.elapsed().as_secs_f64() / steps as f64;
    let t = Instant::now();
    for _ in 0..steps {
        let y = b.model.forward_t(&x, true)?;
        y.sqr()?.mean_all()?.backward()?;
    }
    let fb = t.elapsed().as_secs_f64() / steps as f64;
    println!(
        "{name} {size}x{size} batch {batch}: forward {:.3} s ({:.1} img/s), forward+backward {:.3} s ({:.1} img/s)",
        f,
        batch as f64 / f,
        fb,
        batch as f64 / fb
    );
    Ok(())
}
