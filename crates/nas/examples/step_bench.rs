//! Training-step speed and loss of a stand-alone sub-network and of the supernet on random
//! paths (a quick check of the CPU cost of the search space).
//!
//! `cargo run --release -p nas --example step_bench -- [steps] [batch]`
//!
//! Environment knobs: `STEM_STRIDE=2` (the `cifar10-fast` stem), `LR` (supernet learning
//! rate), `FIXED=1` (the supernet always runs the first path: it then learns like the
//! stand-alone network), `SKIP_STANDALONE=1`.

use candle_core::{Device, Tensor};
use nas::net::Network;
use nas::supernet::{path_at, Supernet};
use nas::SearchSpace;
use nn_core::train::{cross_entropy, OptimizerConfig};
use nn_core::{Model, VarStore};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let steps = args.first().copied().unwrap_or(20);
    let batch = args.get(1).copied().unwrap_or(64);
    let stem_stride: usize = std::env::var("STEM_STRIDE").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let space = SearchSpace::small_with("cifar-small", 3, 32, 10, stem_stride, [16, 32, 64]);
    let dev = Device::Cpu;
    // A fixed learnable target: the label is the quadrant with the largest mean.
    let x = Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), &dev)?;
    let y = Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(), batch, &dev)?;
    let arch = path_at(&space, 0, 0);
    println!("arch {}", arch.key());
    let vs = VarStore::new(0, &dev);
    let net = Network::standalone(&vs.root(), &space, &arch)?;
    let mut opt = OptimizerConfig::sgd(0.05, 0.0).build(vs.trainable())?;
    let t = Instant::now();
    for s in 0..if std::env::var("SKIP_STANDALONE").is_ok() { 0 } else { steps } {
        let loss = cross_entropy(&net.forward_t(&x, true)?, &y, 0.0)?;
        opt.step(&loss.backward()?)?;
        if s % 5 == 0 || s + 1 == steps {
            println!("stand-alone step {s} loss {:.4}", loss.to_scalar::<f32>()?);
        }
    }
    println!("stand-alone: {:.1} img/s", (steps * batch) as f64 / t.elapsed().as_secs_f64());
    let sn = Supernet::new(&space, 0, &dev)?;
    let lr: f64 = std::env::var("LR").ok().and_then(|v| v.parse().ok()).unwrap_or(0.05);
    let mut opt = OptimizerConfig::sgd(lr, 0.0).build(sn.vs.trainable())?;
    let t = Instant::now();
    for s in 0..steps {
        let a = if std::env::var("FIXED").is_ok() {
            path_at(&space, 0, 0)
        } else {
            path_at(&space, 0, s)
        };
        let loss = cross_entropy(&sn.net.forward_arch(&x, &a, true)?, &y, 0.0)?;
        opt.step(&loss.backward()?)?;
        if s % 5 == 0 || s + 1 == steps {
            println!("supernet step {s} loss {:.4}", loss.to_scalar::<f32>()?);
        }
    }
    println!("supernet: {:.1} img/s", (steps * batch) as f64 / t.elapsed().as_secs_f64());
    Ok(())
}
