//! Where a ViT-Ti block's forward time goes: each operation of one transformer block timed
//! alone on ViT-Ti shapes (197 tokens of 192 channels, 3 heads), median of several runs.
//!
//! `cargo run --release -p vit-survey-zoo --example block_profile [-- BATCH]`

use candle_core::{Device, Result, Tensor, D};
use nn_core::VarStore;
use std::time::Instant;
use vit_survey_zoo::layers::{gelu, Block};

fn time<T>(label: &str, total: &mut f64, f: impl Fn() -> Result<T>) -> Result<T> {
    let mut v = Vec::new();
    let mut out = f()?;
    for _ in 0..7 {
        let t = Instant::now();
        out = f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v[v.len() / 2];
    *total += m;
    println!("{label:<34} {m:>8.2} ms");
    Ok(out)
}

fn main() -> Result<()> {
    nn_core::runtime::tune();
    let b: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(16);
    let (n, c, h) = (197usize, 192usize, 3usize);
    let d = c / h;
    let dev = Device::Cpu;
    let vs = VarStore::new(0, &dev);
    let blk = Block::new(&vs.root().pp("blk"), c, h, 4.0, true, 1e-6, 0.0)?;
    let x = Tensor::randn(0f32, 1.0, (b, n, c), &dev)?;
    println!("batch {b}, {} threads", candle_core::utils::get_num_threads());
    let mut t = 0.0;
    let y = time("norm1 (LayerNorm)", &mut t, || blk.norm1.forward(&x))?;
    let qkv = time("qkv linear (matmul + bias)", &mut t, || blk.attn.qkv.forward(&y))?;
    let (q, k, v) = time("qkv split (reshape/permute)", &mut t, || {
        let p = qkv.reshape((b, n, 3, h, d))?.permute((2, 0, 3, 1, 4))?;
        Ok((p.get(0)?, p.get(1)?, p.get(2)?))
    })?;
    let qc = time("q contiguous * scale", &mut t, || q.contiguous()? * 0.125)?;
    let kt = time("k contiguous + transpose", &mut t, || {
        k.contiguous()?.transpose(D::Minus2, D::Minus1)
    })?;
    let s = time("Q K^T (batched matmul)", &mut t, || qc.matmul(&kt))?;
    let p = time("softmax (nn-core functional)", &mut t, || {
        nn_core::layers::functional::softmax_last_dim(&s)
    })?;
    let vc = time("v contiguous", &mut t, || v.contiguous())?;
    let o = time("A V (batched matmul)", &mut t, || p.matmul(&vc))?;
    let o2 = time("heads merge (transpose/reshape)", &mut t, || o.transpose(1, 2)?.reshape((b, n, c)))?;
    let pr = time("proj linear", &mut t, || blk.attn.proj.forward(&o2))?;
    let x1 = time("residual add", &mut t, || &x + &pr)?;
    let y2 = time("norm2 (LayerNorm)", &mut t, || blk.norm2.forward(&x1))?;
    let f1 = time("fc1 linear (192 -> 768)", &mut t, || blk.mlp.fc1.forward(&y2))?;
    let g = time("GELU (erf)", &mut t, || gelu(&f1))?;
    let f2 = time("fc2 linear (768 -> 192)", &mut t, || blk.mlp.fc2.forward(&g))?;
    let _ = time("residual add", &mut t, || &x1 + &f2)?;
    println!("{:<34} {t:>8.2} ms", "sum of the parts");
    // the fc1 product alone: transposed weight view (as Linear does) vs a [K, N] copy
    let x2 = y2.reshape((b * n, c))?;
    let w = blk.mlp.fc1.weight.as_tensor();
    let wt = w.t()?.contiguous()?;
    let mut u = 0.0;
    time("fc1 matmul, W^T view", &mut u, || x2.matmul(&w.t()?))?;
    let m = time("fc1 matmul, W^T contiguous", &mut u, || x2.matmul(&wt))?;
    let bias = blk.mlp.fc1.bias.as_ref().expect("bias").as_tensor();
    time("bias add alone (candle broadcast)", &mut u, || m.broadcast_add(bias))?;
    time("copy (candle, 1 pass)", &mut u, || m.copy())?;
    time("relu (nn-core fused)", &mut u, || nn_core::ops::activation::relu(&m))?;
    time("gelu (candle gelu_erf)", &mut u, || m.gelu_erf())?;
    let mut whole = 0.0;
    time("whole block forward", &mut whole, || blk.forward(&x, false))?;
    Ok(())
}
