//! Where PVTv2-B0's first-stage convolutional MLP spends its forward time (batch 8, 56x56
//! tokens of 32 channels, hidden 256): each operation timed alone, median of 7 runs.
//!
//! `cargo run --release -p vit-survey-zoo --example pvt_mlp_profile`

use candle_core::{Device, Result, Tensor};
use nn_core::layers::Conv2dConfig;
use nn_core::VarStore;
use std::time::Instant;
use vit_survey_zoo::layers::{conv2d, conv_forward, flatten_tokens, gelu, tokens_to_map, Linear};

fn time<T>(label: &str, f: impl Fn() -> Result<T>) -> Result<T> {
    let mut v = Vec::new();
    let mut out = f()?;
    for _ in 0..7 {
        let t = Instant::now();
        out = f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    println!("{label:<36} {:>8.2} ms", v[v.len() / 2]);
    Ok(out)
}

fn main() -> Result<()> {
    nn_core::runtime::tune();
    let (b, h, w, c, hid) = (8usize, 56usize, 56usize, 32usize, 256usize);
    let vs = VarStore::new(0, &Device::Cpu);
    let fc1 = Linear::new(&vs.root().pp("fc1"), c, hid, true)?;
    let fc2 = Linear::new(&vs.root().pp("fc2"), hid, c, true)?;
    let dw = conv2d(&vs.root().pp("dw"), Conv2dConfig::new(hid, hid, 3).groups(hid).bias(true))?;
    let x = Tensor::randn(0f32, 1.0, (b, h * w, c), &Device::Cpu)?;
    println!("batch {b}, {} threads", candle_core::utils::get_num_threads());
    let y = time("fc1 (32 -> 256)", || fc1.forward(&x))?;
    time("plain copy of the same tensor", || y.copy())?;
    let m = time("tokens_to_map (transpose copy)", || tokens_to_map(&y, h, w))?;
    let d = time("dwconv 3x3, 256 ch, 56x56", || conv_forward(&dw, &m))?;
    let f = time("flatten_tokens (transpose copy)", || flatten_tokens(&d))?;
    let wt = dw.weight.as_tensor();
    let bias = dw.bias.as_ref().expect("bias").as_tensor();
    time("dwconv on tokens (channels-last op)", || {
        nn_core::ops::depthwise_tokens::depthwise_conv_tokens(&y, wt, bias, h, w)
    })?;
    let g = time("GELU", || gelu(&f))?;
    time("fc2 (256 -> 32)", || fc2.forward(&g))?;
    Ok(())
}
