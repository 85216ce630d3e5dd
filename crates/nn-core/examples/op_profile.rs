//! Forward+backward time of single ops on LeNet/ResNet shapes.
use candle_core::{Device, Tensor, Var};
use std::time::Instant;

fn time<F: FnMut() -> candle_core::Result<()>>(name: &str, n: usize, mut f: F) -> candle_core::Result<()> {
    f()?;
    let t = Instant::now();
    for _ in 0..n {
        f()?;
    }
    println!("{name:<44} {:>8.2} ms", t.elapsed().as_secs_f64() * 1e3 / n as f64);
    Ok(())
}

fn main() -> candle_core::Result<()> {
    nn_core::runtime::tune();
    let dev = Device::Cpu;
    {
        use candle_nn::ModuleT;
        let vs = nn_core::VarStore::new(0, &dev);
        let bn = nn_core::layers::BatchNorm::new(&vs.root(), 16)?;
        let a = Tensor::randn(0f32, 1.0, (128, 16, 28, 28), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (16, 16, 3, 3), &dev)?;
        let o = nn_core::ops::Conv2dOpts::new(1, 1);
        time("conv 16@28 fwd", 5, || nn_core::ops::conv2d(&a, &w, o).map(|_| ()))?;
        time("bn eval 16@28", 5, || bn.forward_t(&a, false).map(|_| ()))?;
        time("bn train 16@28", 5, || bn.forward_t(&a, true).map(|_| ()))?;
        time("relu 16@28", 5, || nn_core::ops::activation::relu(&a).map(|_| ()))?;
        time("add 16@28", 5, || (&a + &a).map(|_| ()))?;
        time("subsample+pad 16@28", 5, || {
            nn_core::models::blocks::subsample(&a, 2)?.pad_with_zeros(1, 8, 8).map(|_| ())
        })?;
        time("zeros_like 16@28", 5, || a.zeros_like().map(|_| ()))?;
        time("copy 16@28", 5, || a.copy().map(|_| ()))?;
    }
    let x6 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (128, 6, 28, 28), &dev)?)?;
    time("maxpool 2x2 6x28x28 fwd", 5, || {
        nn_core::ops::max_pool2d(x6.as_tensor(), (2, 2), (2, 2), (0, 0)).map(|_| ())
    })?;
    time("maxpool 2x2 6x28x28 fwd+bwd", 5, || {
        nn_core::ops::max_pool2d(x6.as_tensor(), (2, 2), (2, 2), (0, 0))?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    let x1 = Tensor::randn(0f32, 1.0, (128, 1, 28, 28), &dev)?;
    let w1 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 1, 5, 5), &dev)?)?;
    let o = nn_core::ops::Conv2dOpts::new(1, 2);
    time("conv1 1->6 5x5 fwd", 5, || nn_core::ops::conv2d(&x1, w1.as_tensor(), o).map(|_| ()))?;
    time("conv1 1->6 5x5 fwd+bwd", 5, || {
        nn_core::ops::conv2d(&x1, w1.as_tensor(), o)?.sum_all()?.backward().map(|_| ())
    })?;
    let x2 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (128, 6, 14, 14), &dev)?)?;
    let w2 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (16, 6, 5, 5), &dev)?)?;
    let o2 = nn_core::ops::Conv2dOpts::new(1, 0);
    time("conv2 6->16 5x5 fwd", 5, || {
        nn_core::ops::conv2d(x2.as_tensor(), w2.as_tensor(), o2).map(|_| ())
    })?;
    time("conv2 6->16 5x5 fwd+bwd", 5, || {
        nn_core::ops::conv2d(x2.as_tensor(), w2.as_tensor(), o2)?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (128, 400), &dev)?)?;
    let wl = Var::from_tensor(&Tensor::randn(0f32, 1.0, (120, 400), &dev)?)?;
    time("linear 400->120 fwd+bwd", 5, || {
        h.as_tensor().matmul(&wl.as_tensor().t()?)?.sum_all()?.backward().map(|_| ())
    })?;
    let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (128, 120), &dev)?)?;
    let vs = nn_core::VarStore::new(0, &dev);
    let bn = nn_core::layers::BatchNorm::new(&vs.root(), 120)?;
    use candle_nn::ModuleT;
    time("bn1d 120 fwd+bwd", 5, || {
        bn.forward_t(b.as_tensor(), true)?.sum_all()?.backward().map(|_| ())
    })?;
    time("relu 6x28x28 fwd+bwd", 5, || {
        nn_core::ops::activation::relu(x6.as_tensor())?.sum_all()?.backward().map(|_| ())
    })?;
    time("sum_all 6x28x28 fwd+bwd", 5, || x6.as_tensor().sum_all()?.backward().map(|_| ()))?;
    Ok(())
}
