//! Splits a convolution's training cost into the forward, input-gradient and weight-gradient
//! kernels (medians over a few runs; the gradient kernels through `conv2d_backward`-style
//! calls given a random output gradient) and the whole autograd step (`conv2d`, `sum_all`,
//! `backward`) on the ResNet-20 shapes: `cargo run --release -p nn-core --example
//! conv_parts`. An argument such as `64ch@8x8` keeps only
//! the shapes whose name contains it, `--all-only` times just the full step (for profiling),
//! `--im2col` turns the Winograd path off.
use candle_core::{Device, Tensor, Var};
use nn_core::ops::{conv2d, conv2d_input_grad, conv2d_weight_grad, Conv2dOpts};
use std::time::Instant;

fn median_ms(runs: usize, mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[runs / 2])
}

fn main() -> candle_core::Result<()> {
    nn_core::runtime::tune();
    let dev = Device::Cpu;
    let shapes = [
        (16, 32, 16, 1, 1),
        (32, 16, 32, 1, 1),
        (64, 8, 64, 1, 1),
        (16, 28, 16, 1, 1),
        (32, 14, 32, 1, 1),
        (64, 7, 64, 1, 1),
        (64, 16, 64, 1, 64),
    ];
    println!(
        "{:<22} {:>8} {:>10} {:>10} {:>8} {:>8}",
        "shape (batch 128)", "fwd ms", "dX ms", "dW ms", "step ms", "seq ms"
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    let all_only = args.iter().any(|a| a == "--all-only");
    let filter = args.iter().find(|a| !a.starts_with("--"));
    if args.iter().any(|a| a == "--im2col") {
        nn_core::ops::set_winograd(false);
    }
    for (cin, hw, cout, s, groups) in shapes {
        let name = if groups > 1 {
            format!("{cin}ch@{hw}x{hw}->{cout} s{s} g{groups}")
        } else {
            format!("{cin}ch@{hw}x{hw}->{cout} s{s}")
        };
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (128, cin, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 0.1, (cout, cin / groups, 3, 3), &dev)?;
        let (xv, wv) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?);
        let o = Conv2dOpts::new(s, 1).with_groups(groups);
        let step = || conv2d(xv.as_tensor(), wv.as_tensor(), o)?.sum_all()?.backward().map(|_| ());
        if all_only {
            println!("{name:<22} {:>8} {:>10} {:>10} {:>8.2}", "-", "-", "-", median_ms(41, step)?);
            continue;
        }
        let fwd = median_ms(7, || conv2d(&x, &w, o).map(|_| ()))?;
        let gy = Tensor::randn(0f32, 1.0, conv2d(&x, &w, o)?.shape(), &dev)?;
        let dx = median_ms(7, || conv2d_input_grad(&gy, &w, x.dims(), o).map(|_| ()))?;
        let dw = median_ms(7, || conv2d_weight_grad(&x, &gy, w.dims(), o).map(|_| ()))?;
        let all = median_ms(7, step)?;
        let seq = median_ms(7, || {
            let y = conv2d(&x, &w, o)?;
            let gy = y.ones_like()?;
            conv2d_input_grad(&gy, &w, x.dims(), o)?;
            conv2d_weight_grad(&x, &gy, w.dims(), o).map(|_| ())
        })?;
        println!("{name:<22} {fwd:>8.2} {dx:>10.2} {dw:>10.2} {all:>8.2} {seq:>8.2}");
    }
    Ok(())
}
