//! Depthwise convolution on channels-last tokens `[B, H*W, C]`, stride 1, "same" zero padding,
//! with backward: the depthwise 3x3 of PVTv2's MLP (and any token model's positional conv)
//! without leaving the token layout.
//!
//! The NCHW route costs a transpose to `[B, C, H, W]`, the convolution and a transpose back; on
//! PVTv2-B0's first stage (`8 x 3136 x 256`) the two transposes alone took 8-15 ms each next
//! to 11-16 ms for the convolution (`cargo run --release -p vit-survey-zoo --example
//! pvt_mlp_profile`). Channels-last, every tap is a multiply-add over `C` contiguous values,
//! so the inner loops vectorise along channels.
//!
//! - forward: `y[p, c] = b[c] + sum_tap w[c, tap] x[p + tap - centre, c]` (taps outside the
//!   map are zero);
//! - input gradient: `dx[q, c] = sum_tap w[c, tap] dy[q - tap + centre, c]`;
//! - weight and bias gradients: `dw[c, tap] = sum_(b, p) dy[p, c] x[p + tap - centre, c]`,
//!   `db[c] = sum_(b, p) dy[p, c]`, partial sums per image reduced at the end.
//!
//! Rows of the output are split over rayon's threads. CPU f32 only; elsewhere the NCHW route.

use crate::ops::elem::{contiguous, dispatch};
use crate::ops::rowwise::{gelu_erf, gelu_erf_backward, gelu_f32};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Geometry: map `h x w`, kernel `kh x kw` (odd), channels `c`.
#[derive(Clone, Copy)]
struct Geom {
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
}

impl Geom {
    /// `(dy, dx)` offsets of tap `t` from the centre.
    fn offset(&self, t: usize) -> (isize, isize) {
        (
            (t / self.kw) as isize - (self.kh / 2) as isize,
            (t % self.kw) as isize - (self.kw / 2) as isize,
        )
    }
    fn at(&self, y: usize, x: usize, dy: isize, dx: isize) -> Option<usize> {
        let (yy, xx) = (y as isize + dy, x as isize + dx);
        (yy >= 0 && xx >= 0 && (yy as usize) < self.h && (xx as usize) < self.w).then(|| yy as usize * self.w + xx as usize)
    }
}

/// `[C, taps]` weights as `[taps, C]`.
fn taps_major(w: &[f32], c: usize, taps: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for ch in 0..c {
        for k in 0..taps {
            t[k * c + ch] = w[ch * taps + k];
        }
    }
    t
}

/// `out[p] = init[p]? + sum_tap wt[tap] * src[p + sign * offset(tap)]`, per image, rows in
/// parallel; `sign` = 1 for the forward pass, -1 for the input gradient. Every output element
/// is written once, so the buffer is not zero-filled first.
#[allow(clippy::too_many_arguments)]
fn correlate(src: &[f32], wt: &[f32], bias: Option<&[f32]>, n: usize, c: usize, g: Geom, sign: isize, gelu: bool) -> Vec<f32> {
    let hw = g.h * g.w;
    let len = n * hw * c;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    if len > 0 {
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(g.w * c)
            .enumerate()
            .for_each(|(row, o)| {
                let (b, y) = (row / g.h, row % g.h);
                let img = &src[b * hw * c..(b + 1) * hw * c];
                correlate_row(o, img, wt, bias, c, g, y, sign, gelu);
            });
    }
    // SAFETY: correlate_row writes every element of every row (all channels of all pixels).
    unsafe { out.set_len(len) };
    out
}

/// Channels per register block of [`correlate_row`] (four AVX2 vectors).
const CHANNEL_BLOCK: usize = 32;

dispatch! {
    /// One output row `o` (`w` pixels of `c` channels) of [`correlate`] at map row `y`. The
    /// channels go in blocks of [`CHANNEL_BLOCK`] whose sums stay in registers over all taps
    /// (one store per output instead of a load and a store per tap), and the taps inside the
    /// map are listed once per pixel, not per block: PVTv2-B0's stage-1 conv (8 x 3136 tokens,
    /// 256 channels, 2 threads) 6.5-7.6 -> 4.2-4.3 ms with the register blocks, -> 2.8-2.9 ms
    /// with the tap list, `cargo run --release -p vit-survey-zoo --example pvt_mlp_profile`.
    /// With `gelu`, each sum goes through GELU before its store (the fused conv + GELU of
    /// PVTv2's MLP).
    #[allow(clippy::too_many_arguments)]
    fn correlate_row(o: &mut [MaybeUninit<f32>], img: &[f32], wt: &[f32], bias: Option<&[f32]>, c: usize, g: Geom, y: usize, sign: isize, gelu: bool) {
        let madd = |a: f32, b: f32, acc: f32| if FMA { a.mul_add(b, acc) } else { a * b + acc };
        let full = c / CHANNEL_BLOCK * CHANNEL_BLOCK;
        let taps = g.kh * g.kw;
        let offsets: Vec<(isize, isize)> = (0..taps).map(|t| g.offset(t)).collect();
        // (weight row, input pixel) of the taps inside the map, per output pixel
        let mut valid: Vec<(usize, usize)> = Vec::with_capacity(taps);
        for x in 0..g.w {
            valid.clear();
            for (t, &(dy, dx)) in offsets.iter().enumerate() {
                if let Some(q) = g.at(y, x, sign * dy, sign * dx) {
                    valid.push((t * c, q * c));
                }
            }
            let out = &mut o[x * c..(x + 1) * c];
            for cb in (0..full).step_by(CHANNEL_BLOCK) {
                let mut acc = [0f32; CHANNEL_BLOCK];
                if let Some(bv) = bias {
                    acc.copy_from_slice(&bv[cb..cb + CHANNEL_BLOCK]);
                }
                for &(wo, xo) in &valid {
                    let wv = &wt[wo + cb..][..CHANNEL_BLOCK];
                    let xv = &img[xo + cb..][..CHANNEL_BLOCK];
                    for i in 0..CHANNEL_BLOCK {
                        acc[i] = madd(wv[i], xv[i], acc[i]);
                    }
                }
                if gelu {
                    for v in &mut acc {
                        *v = gelu_f32::<FMA>(*v);
                    }
                }
                for (d, &v) in out[cb..cb + CHANNEL_BLOCK].iter_mut().zip(&acc) {
                    d.write(v);
                }
            }
            for ch in full..c {
                let mut acc = bias.map_or(0.0, |bv| bv[ch]);
                for &(wo, xo) in &valid {
                    acc = madd(wt[wo + ch], img[xo + ch], acc);
                }
                out[ch].write(if gelu { gelu_f32::<FMA>(acc) } else { acc });
            }
        }
    }
}

dispatch! {
    /// Adds one image's `dy[p, c] x[p + tap - centre, c]` into `acc[tap, c]`.
    fn weight_grad_image(acc: &mut [f32], img: &[f32], gimg: &[f32], c: usize, g: Geom) {
        for y in 0..g.h {
            for xx in 0..g.w {
                let gv = &gimg[(y * g.w + xx) * c..(y * g.w + xx + 1) * c];
                for t in 0..g.kh * g.kw {
                    let (dy, dx) = g.offset(t);
                    if let Some(q) = g.at(y, xx, dy, dx) {
                        for ((a, &d), &v) in acc[t * c..(t + 1) * c].iter_mut().zip(gv).zip(&img[q * c..(q + 1) * c]) {
                            *a += d * v;
                        }
                    }
                }
            }
        }
    }
}

struct DepthwiseTokens {
    g: Geom,
    /// GELU applied to the output (forward fused; the backward recomputes the pre-activation)
    gelu: bool,
}

impl CustomOp3 for DepthwiseTokens {
    fn name(&self) -> &'static str {
        if self.gelu {
            "depthwise-conv-tokens-gelu"
        } else {
            "depthwise-conv-tokens"
        }
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s1, l1, "input")?;
        let w = contiguous::<f32>(s2, l2, "weight")?;
        let b = contiguous::<f32>(s3, l3, "bias")?;
        let (n, _, c) = l1.shape().dims3()?;
        let taps = self.g.kh * self.g.kw;
        let y = correlate(x, &taps_major(w, c, taps), Some(b), n, c, self.g, 1, self.gelu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = if self.gelu {
            // recompute the convolution's output (not kept by the forward) for GELU's gradient
            let z = x.apply_op3_no_bwd(w, b, &DepthwiseTokens { g: self.g, gelu: false })?;
            gelu_erf_backward(&z, dy)?
        } else {
            dy.contiguous()?
        };
        let dx = x.apply_op3_no_bwd(w, &dy, &DepthwiseTokensGrad { g: self.g, input: true })?;
        let dw = x
            .apply_op3_no_bwd(w, &dy, &DepthwiseTokensGrad { g: self.g, input: false })?
            .reshape(w.shape())?;
        let (n, hw, c) = dy.dims3()?;
        let db = dy.reshape((n * hw, c))?.sum(0)?.reshape(b.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The input gradient (`input`) or the weight gradient `[C, taps]` from `(x, w, dy)`.
struct DepthwiseTokensGrad {
    g: Geom,
    input: bool,
}

impl CustomOp3 for DepthwiseTokensGrad {
    fn name(&self) -> &'static str {
        "depthwise-conv-tokens-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s1, l1, "input")?;
        let w = contiguous::<f32>(s2, l2, "weight")?;
        let dy = contiguous::<f32>(s3, l3, "output gradient")?;
        let (n, hw, c) = l1.shape().dims3()?;
        let g = self.g;
        let taps = g.kh * g.kw;
        if self.input {
            let dx = correlate(dy, &taps_major(w, c, taps), None, n, c, g, -1, false);
            return Ok((CpuStorage::F32(dx), l1.shape().clone()));
        }
        // dw[tap, c] per image, then summed
        let partial = (0..n)
            .into_par_iter()
            .map(|b| {
                let (img, gimg) = (&x[b * hw * c..(b + 1) * hw * c], &dy[b * hw * c..(b + 1) * hw * c]);
                let mut acc = vec![0f32; taps * c];
                weight_grad_image(&mut acc, img, gimg, c, g);
                acc
            })
            .reduce(
                || vec![0f32; taps * c],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        // [taps, C] -> [C, taps]
        let mut dw = vec![0f32; taps * c];
        for t in 0..taps {
            for ch in 0..c {
                dw[ch * taps + t] = partial[t * c + ch];
            }
        }
        Ok((CpuStorage::F32(dw), Shape::from((c, taps))))
    }
}

/// Depthwise `kh x kw` convolution (odd kernel, stride 1, zero padding `k / 2`) of tokens
/// `x: [B, h*w, C]` with `weight: [C, 1, kh, kw]` and `bias: [C]`, returning `[B, h*w, C]`;
/// with gradients. Equal to transposing to `[B, C, h, w]`, nn-core's depthwise `conv2d` and
/// transposing back.
pub fn depthwise_conv_tokens(x: &Tensor, weight: &Tensor, bias: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    depthwise_tokens(x, weight, bias, h, w, false)
}

/// `gelu_erf(depthwise_conv_tokens(x, weight, bias, h, w))` (PVTv2's MLP) in one pass: GELU is
/// applied to each output while it is in registers, so the `[B, h*w, C]` pre-activation is
/// neither written nor read back. The backward recomputes it (one more convolution) instead
/// of keeping it. On PVTv2-B0 the separate GELU pass took 5% of a forward (`perf record`).
pub fn depthwise_conv_tokens_gelu(x: &Tensor, weight: &Tensor, bias: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    depthwise_tokens(x, weight, bias, h, w, true)
}

fn depthwise_tokens(x: &Tensor, weight: &Tensor, bias: &Tensor, h: usize, w: usize, gelu: bool) -> Result<Tensor> {
    let (n, hw, c) = x.dims3()?;
    let wd = weight.dims();
    if hw != h * w || wd.len() != 4 || wd[0] != c || wd[1] != 1 || wd[2].is_multiple_of(2) || wd[3].is_multiple_of(2) || bias.dims() != [c]
    {
        candle_core::bail!(
            "depthwise tokens: x {:?} as a {h}x{w} map, weight {wd:?} (want [{c}, 1, odd, odd]), bias {:?}",
            x.dims(),
            bias.dims()
        );
    }
    let cpu = x.device().is_cpu() && [x.dtype(), weight.dtype(), bias.dtype()].iter().all(|d| *d == DType::F32);
    if !cpu {
        let mut cfg = crate::layers::Conv2dConfig::new(c, c, wd[2]).groups(c);
        (cfg.kernel, cfg.padding) = ((wd[2], wd[3]), (wd[2] / 2, wd[3] / 2));
        let map = x.transpose(1, 2)?.contiguous()?.reshape((n, c, h, w))?;
        let y = crate::layers::conv::conv2d(&map, weight, &cfg)?.broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
        let y = y.reshape((n, c, hw))?.transpose(1, 2)?.contiguous()?;
        return if gelu { gelu_erf(&y) } else { Ok(y) };
    }
    let g = Geom {
        h,
        w,
        kh: wd[2],
        kw: wd[3],
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, DepthwiseTokens { g, gelu })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// `fast` and `slow` agree within 1e-5, and so do the gradients of a random weighting of
    /// them with respect to every variable in `vars`.
    fn assert_same_with_gradients(fast: &Tensor, slow: &Tensor, vars: &[&Var]) -> Result<()> {
        let max_diff = |a: &Tensor, b: &Tensor| (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>();
        let d = max_diff(fast, slow)?;
        assert!(d < 1e-5, "forward {d}");
        let probe = Tensor::randn(0f32, 1.0, fast.dims(), fast.device())?;
        let gf = fast.mul(&probe)?.sum_all()?.backward()?;
        let gs = slow.mul(&probe)?.sum_all()?.backward()?;
        for v in vars {
            let d = max_diff(
                gf.get(v.as_tensor()).expect("a gradient"),
                gs.get(v.as_tensor()).expect("a gradient"),
            )?;
            assert!(d < 1e-4, "gradient {d} for {:?}", v.dims());
        }
        Ok(())
    }

    #[test]
    fn equals_the_nchw_convolution_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (n, h, w, c, k) in [
            (2usize, 5usize, 7usize, 19usize, 3usize),
            (1, 3, 2, 8, 5),
            (2, 1, 1, 4, 3),
            (1, 4, 3, 70, 3),
            (2, 3, 3, 32, 3),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, h * w, c), &dev)?)?;
            let wt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (c, 1, k, k), &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, c, &dev)?)?;
            let fast = depthwise_conv_tokens(x.as_tensor(), wt.as_tensor(), b.as_tensor(), h, w)?;
            let cfg = crate::layers::Conv2dConfig::new(c, c, k).groups(c);
            let map = x.as_tensor().transpose(1, 2)?.reshape((n, c, h, w))?;
            let slow = crate::layers::conv::conv2d(&map, wt.as_tensor(), &cfg)?
                .broadcast_add(&b.as_tensor().reshape((1, c, 1, 1))?)?
                .reshape((n, c, h * w))?
                .transpose(1, 2)?;
            assert_same_with_gradients(&fast, &slow, &[&x, &wt, &b])?;
        }
        Ok(())
    }

    #[test]
    fn fused_gelu_equals_the_convolution_then_gelu_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (n, h, w, c) in [(2usize, 5usize, 7usize, 37usize), (1, 4, 4, 64), (1, 1, 3, 5)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, h * w, c), &dev)?)?;
            let wt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (c, 1, 3, 3), &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, c, &dev)?)?;
            let fused = depthwise_conv_tokens_gelu(x.as_tensor(), wt.as_tensor(), b.as_tensor(), h, w)?;
            // reference: the unfused op, then candle's own erf GELU
            let apart = depthwise_conv_tokens(x.as_tensor(), wt.as_tensor(), b.as_tensor(), h, w)?.gelu_erf()?;
            assert_same_with_gradients(&fused, &apart, &[&x, &wt, &b])?;
        }
        Ok(())
    }

    #[test]
    fn rejects_a_map_that_does_not_match_the_tokens() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 6, 4), DType::F32, &dev)?;
        let e = depthwise_conv_tokens(
            &x,
            &Tensor::zeros((4, 1, 3, 3), DType::F32, &dev)?,
            &Tensor::zeros(4, DType::F32, &dev)?,
            2,
            2,
        );
        assert!(e.unwrap_err().to_string().contains("2x2 map"));
        Ok(())
    }
}
