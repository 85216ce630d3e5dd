//! Times the pieces of one ResNet-20 training step (batch 128, 1x28x28) to see where time goes.
//! `cargo run --release -p nn-core --example step_profile`
use candle_core::{DType, Device, Tensor};
use candle_nn::ModuleT;
use nn_core::layers::BatchNorm;
use nn_core::models::{create_model, ModelConfig};
use nn_core::{StandardFactory, VarStore};
use std::time::Instant;

fn time<F: FnMut() -> candle_core::Result<()>>(name: &str, n: usize, mut f: F) -> candle_core::Result<()> {
    f()?;
    let t = Instant::now();
    for _ in 0..n {
        f()?;
    }
    println!("{name:<40} {:>8.2} ms", t.elapsed().as_secs_f64() * 1e3 / n as f64);
    Ok(())
}

fn main() -> candle_core::Result<()> {
    nn_core::runtime::tune();
    let dev = Device::Cpu;
    let vs = VarStore::new(0, &dev);
    let name = std::env::args().nth(1).unwrap_or_else(|| "resnet20".into());
    let model = create_model(&name, &ModelConfig::new(1, 10, 28), &vs.root(), &StandardFactory)?;
    let mut opt = nn_core::train::OptimizerConfig::sgd(0.1, 5e-4).build(vs.trainable()).unwrap();
    let y = Tensor::from_vec((0..128u32).map(|i| i % 10).collect::<Vec<_>>(), 128, &dev)?;
    let x = Tensor::randn(0f32, 1.0, (128, 1, 28, 28), &dev)?;
    time("forward (eval)", 3, || model.forward_t(&x, false).map(|_| ()))?;
    time("forward (train)", 3, || model.forward_t(&x, true).map(|_| ()))?;
    time("forward+backward", 3, || {
        let l = model.forward_t(&x, true)?.sqr()?.mean_all()?;
        l.backward().map(|_| ())
    })?;
    let l = nn_core::train::cross_entropy(&model.forward_t(&x, true)?, &y, 0.0)?;
    let g = l.backward()?;
    time("optimizer step", 3, || opt.step(&g))?;
    time("cross entropy fwd+bwd", 3, || {
        let logits = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (128, 10), &dev)?)?;
        nn_core::train::cross_entropy(logits.as_tensor(), &y, 0.0)?.backward().map(|_| ())
    })?;
    let bvs = VarStore::new(0, &dev);
    let bn = BatchNorm::new(&bvs.root(), 16)?;
    let a = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (128, 16, 28, 28), &dev)?)?;
    time("batchnorm 16x28x28 fwd", 5, || bn.forward_t(a.as_tensor(), true).map(|_| ()))?;
    time("batchnorm 16x28x28 fwd+bwd", 5, || {
        bn.forward_t(a.as_tensor(), true)?.sum_all()?.backward().map(|_| ())
    })?;
    time("relu 16x28x28", 5, || a.as_tensor().relu().map(|_| ()))?;
    time("add 16x28x28", 5, || (a.as_tensor() + a.as_tensor()).map(|_| ()))?;
    let _ = DType::F32;
    Ok(())
}
