//! Binary and float 2-D convolutions of the inference engine, on channels-last (NHWC) maps.
//!
//! # Binary convolution
//! The input is binarised and packed once per pixel (`C` bits, `sign(x) = +1` for `x >= 0`),
//! then each output pixel's receptive field is gathered into one bit string of
//! `K = kh * kw * C` bits ordered `(kh, kw, c)` (a bit-level im2col: the `C`-bit fields are
//! concatenated without word alignment, so `C = 16` packs 4 taps per word) and multiplied
//! against the packed weights `[O, K]` with the binary GEMM ([`crate::deploy::gemm`]).
//! im2col is done per tile of [`ROW_TILE`] output pixels inside the parallel loop, so the full
//! im2col matrix never exists in memory.
//!
//! # Padding correction
//! The training graph (bnn-core's [`BinaryConv2d`](crate::BinaryConv2d)) binarises first and
//! then convolves with zero padding, so a padded tap contributes `0`, which a bit cannot
//! represent. The engine writes padded taps as bit 0 (`+1`), which adds
//! `sum_c sign(W[o, c, tap])` for every padded tap to the popcount result, and subtracts it
//! again: with `T[o][tap] = sum_c sign(W[o, c, tap])` precomputed per output channel and tap,
//! `dot[p][o] = (K - 2 popcount(x_p xor w_o)) - sum_{tap padded at p} T[o][tap]`.
//! Only pixels whose receptive field crosses the border pay for the correction. The result is
//! the exact integer the float graph computes.
//!
//! # Output transform
//! Each output channel then gets `y = ((dot * alpha[o]) [+ conv_bias[o]]) * scale[o] + bias[o]`
//! in f32, in exactly this order: the per-channel weight scale `alpha_o`, the convolution bias
//! if any, then the following BatchNorm as nn-core's eval kernel computes it (`x * scale +
//! shift`). The candle forward pass computes the same operations on the same exact integer, so
//! the results are bit-identical (see [`crate::deploy::export`]).
//!
//! # Float convolution
//! The full-precision convolutions (stem, option-B shortcuts) call nn-core's own convolution
//! kernel and BatchNorm kernel on a candle CPU tensor, so they are bit-identical to the candle
//! forward pass when run on the same batch.

use crate::deploy::gemm::{xor_popcount_block, Kernel, ROW_TILE};
use crate::deploy::pack::{pack_into, words, BitWriter, PackedMatrix};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// A batch of feature maps, channels last: `data[((n * h + y) * w + x) * c + ch]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Nhwc {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Nhwc {
    pub fn zeros(n: usize, h: usize, w: usize, c: usize) -> Self {
        Self {
            n,
            h,
            w,
            c,
            data: vec![0.0; n * h * w * c],
        }
    }

    /// From an NCHW buffer.
    pub fn from_nchw(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Self {
        assert_eq!(
            x.len(),
            n * c * h * w,
            "Nhwc::from_nchw: {} values for [{n}, {c}, {h}, {w}]",
            x.len()
        );
        let mut out = Self::zeros(n, h, w, c);
        for b in 0..n {
            for ch in 0..c {
                for y in 0..h {
                    for xx in 0..w {
                        out.data[((b * h + y) * w + xx) * c + ch] = x[((b * c + ch) * h + y) * w + xx];
                    }
                }
            }
        }
        out
    }

    /// To an NCHW buffer.
    pub fn to_nchw(&self) -> Vec<f32> {
        let (n, h, w, c) = (self.n, self.h, self.w, self.c);
        let mut out = vec![0.0; self.data.len()];
        for b in 0..n {
            for y in 0..h {
                for x in 0..w {
                    for ch in 0..c {
                        out[((b * c + ch) * h + y) * w + x] = self.data[((b * h + y) * w + x) * c + ch];
                    }
                }
            }
        }
        out
    }

    pub fn pixels(&self) -> usize {
        self.n * self.h * self.w
    }
}

/// Shape of a 2-D convolution (no groups, no dilation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvGeom {
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvGeom {
    /// Output size for an `h x w` input.
    pub fn output_hw(&self, h: usize, w: usize) -> Result<(usize, usize), String> {
        if h + 2 * self.pad < self.kh || w + 2 * self.pad < self.kw || self.stride == 0 {
            return Err(format!("convolution {self:?} does not fit an input of {h} x {w}"));
        }
        Ok((
            (h + 2 * self.pad - self.kh) / self.stride + 1,
            (w + 2 * self.pad - self.kw) / self.stride + 1,
        ))
    }
    /// Length of the reduction dimension `kh * kw * cin`.
    pub fn k(&self) -> usize {
        self.kh * self.kw * self.cin
    }
    fn check(&self, x: &Nhwc) -> Result<(usize, usize), String> {
        if x.c != self.cin {
            return Err(format!("convolution expects {} input channels, got {}", self.cin, x.c));
        }
        self.output_hw(x.h, x.w)
    }
}

/// A binary convolution ready for inference: packed `sign(W)` in `(kh, kw, c)` order, the
/// per-tap sums for the padding correction and the per-channel output transform.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedConv {
    pub geom: ConvGeom,
    /// `[cout, kh kw cin]` packed signs of the weights.
    pub weights: PackedMatrix,
    /// `T[o][tap] = sum_c sign(W[o, c, tap])`, `[cout, kh kw]`.
    pub tap_sums: Vec<i32>,
    /// Per-channel weight scale `alpha_o` (1 without weight scaling).
    pub alpha: Vec<f32>,
    /// The convolution's own bias, if it has one.
    pub conv_bias: Option<Vec<f32>>,
    /// `y = (dot * alpha[o] [+ conv_bias[o]]) * scale[o] + bias[o]` (BatchNorm's eval scale and shift).
    pub scale: Vec<f32>,
    pub bias: Vec<f32>,
}

impl PackedConv {
    /// From float weights `[cout, cin, kh, kw]` (PyTorch/candle layout; only their signs are
    /// kept) and the output transform.
    pub fn from_oihw(geom: ConvGeom, w: &[f32], scale: Vec<f32>, bias: Vec<f32>) -> Result<Self, String> {
        let ConvGeom { cin, cout, kh, kw, .. } = geom;
        if w.len() != cout * cin * kh * kw {
            return Err(format!(
                "binary conv {geom:?}: weight has {} values, want {}",
                w.len(),
                cout * cin * kh * kw
            ));
        }
        let mut reordered = vec![0f32; w.len()];
        for o in 0..cout {
            for c in 0..cin {
                for y in 0..kh {
                    for x in 0..kw {
                        reordered[o * geom.k() + (y * kw + x) * cin + c] = w[((o * cin + c) * kh + y) * kw + x];
                    }
                }
            }
        }
        Self::new(geom, PackedMatrix::from_f32(&reordered, cout, geom.k()), scale, bias)
    }

    /// From packed weights `[cout, kh kw cin]` (`(kh, kw, c)` order); computes the tap sums.
    pub fn new(geom: ConvGeom, weights: PackedMatrix, scale: Vec<f32>, bias: Vec<f32>) -> Result<Self, String> {
        if weights.rows != geom.cout || weights.k != geom.k() {
            return Err(format!(
                "binary conv {geom:?}: packed weights are {} x {}, want {} x {}",
                weights.rows,
                weights.k,
                geom.cout,
                geom.k()
            ));
        }
        if scale.len() != geom.cout || bias.len() != geom.cout {
            return Err(format!(
                "binary conv {geom:?}: {} scales and {} biases for {} output channels",
                scale.len(),
                bias.len(),
                geom.cout
            ));
        }
        let taps = geom.kh * geom.kw;
        let mut tap_sums = vec![0i32; geom.cout * taps];
        for o in 0..geom.cout {
            let row = weights.row(o);
            for t in 0..taps {
                let mut s = 0i32;
                for c in 0..geom.cin {
                    let j = t * geom.cin + c;
                    s += if (row[j / 64] >> (j % 64)) & 1 == 1 { -1 } else { 1 };
                }
                tap_sums[o * taps + t] = s;
            }
        }
        Ok(Self {
            geom,
            weights,
            tap_sums,
            alpha: vec![1.0; geom.cout],
            conv_bias: None,
            scale,
            bias,
        })
    }

    /// Sets the weight scales and the convolution bias applied before `scale`/`bias`.
    pub fn with_alpha(mut self, alpha: Vec<f32>, conv_bias: Option<Vec<f32>>) -> Result<Self, String> {
        let c = self.geom.cout;
        if alpha.len() != c || conv_bias.as_ref().is_some_and(|b| b.len() != c) {
            return Err(format!(
                "binary conv {:?}: {} weight scales and {:?} conv biases for {c} output channels",
                self.geom,
                alpha.len(),
                conv_bias.as_ref().map(|b| b.len())
            ));
        }
        self.alpha = alpha;
        self.conv_bias = conv_bias;
        Ok(self)
    }

    /// The output transform of one output pixel's `cout` exact dot products.
    #[inline]
    fn transform(&self, d: &[i32], y: &mut [f32]) {
        match &self.conv_bias {
            None => {
                for ((((y, &d), &a), &s), &b) in y.iter_mut().zip(d).zip(&self.alpha).zip(&self.scale).zip(&self.bias) {
                    *y = (d as f32 * a) * s + b;
                }
            }
            Some(cb) => {
                for (((((y, &d), &a), &c), &s), &b) in y.iter_mut().zip(d).zip(&self.alpha).zip(cb).zip(&self.scale).zip(&self.bias) {
                    *y = (d as f32 * a + c) * s + b;
                }
            }
        }
    }

    /// The exact integer convolution `conv(sign(x), sign(W))` with zero padding, `[pixels, cout]`.
    pub fn forward_i32(&self, x: &Nhwc, kernel: Kernel) -> Result<(Vec<i32>, usize, usize), String> {
        let (oh, ow) = self.geom.check(x)?;
        let mut out = vec![0i32; x.n * oh * ow * self.geom.cout];
        self.run(x, kernel, &mut out, |_, dots, tile| tile.copy_from_slice(dots))?;
        Ok((out, oh, ow))
    }

    /// The output transform of the exact dot products, NHWC.
    pub fn forward(&self, x: &Nhwc, kernel: Kernel) -> Result<Nhwc, String> {
        self.forward_with(x, kernel, |_, _| {})
    }

    /// [`PackedConv::forward`] followed by `epilogue(first_pixel, tile)` on each tile of
    /// `[rows, cout]` outputs while it is in cache (the model fuses activations and the residual
    /// sum here).
    pub fn forward_with(&self, x: &Nhwc, kernel: Kernel, epilogue: impl Fn(usize, &mut [f32]) + Sync) -> Result<Nhwc, String> {
        let (oh, ow) = self.geom.check(x)?;
        let cout = self.geom.cout;
        let mut out = Nhwc::zeros(x.n, oh, ow, cout);
        self.run(x, kernel, &mut out.data, |p0, dots, tile| {
            for (d, y) in dots.chunks_exact(cout).zip(tile.chunks_exact_mut(cout)) {
                self.transform(d, y);
            }
            epilogue(p0, tile);
        })?;
        Ok(out)
    }

    /// Packs, gathers and multiplies per tile of [`ROW_TILE`] output pixels; `emit(p0, dots, out)`
    /// turns the tile's `[rows, cout]` exact dot products (padding-corrected) into its slice of
    /// the `[pixels, cout]` output.
    fn run<T: Send>(&self, x: &Nhwc, kernel: Kernel, out: &mut [T], emit: impl Fn(usize, &[i32], &mut [T]) + Sync) -> Result<(), String> {
        let g = self.geom;
        let (oh, ow) = g.check(x)?;
        let (h, w, cin, cout) = (x.h, x.w, g.cin, g.cout);
        let m = x.n * oh * ow;
        assert_eq!(out.len(), m * cout, "binary conv: output buffer size");
        // 1. one packed bit field of C bits per input pixel
        let cw = words(cin);
        let mut px = vec![0u64; x.pixels() * cw];
        px.par_chunks_mut(cw * 256).zip(x.data.par_chunks(cin * 256)).for_each(|(pw, xv)| {
            for (p, v) in pw.chunks_mut(cw).zip(xv.chunks(cin)) {
                pack_into(v, p);
            }
        });
        // 2. per tile: im2col rows, xor-popcount against all weights, correction, emit
        let k = g.k();
        let wpr = words(k);
        let taps = g.kh * g.kw;
        let scratch = || {
            (
                vec![0u64; ROW_TILE * wpr],
                vec![0u32; ROW_TILE * cout],
                vec![0i32; ROW_TILE * cout],
                Vec::new(),
            )
        };
        out.par_chunks_mut(ROW_TILE * cout)
            .enumerate()
            .for_each_init(scratch, |(cols, pc, dots, padded), (t, tile)| {
                let p0 = t * ROW_TILE;
                let rows = tile.len() / cout;
                let cols = &mut cols[..rows * wpr];
                cols.fill(0);
                padded.clear();
                for r in 0..rows {
                    let p = p0 + r;
                    let (b, oy, ox) = (p / (oh * ow), (p / ow) % oh, p % ow);
                    let mut bw = BitWriter::new(&mut cols[r * wpr..(r + 1) * wpr]);
                    for ky in 0..g.kh {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        for kx in 0..g.kw {
                            let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                bw.skip(cin);
                                padded.push((r, ky * g.kw + kx));
                            } else {
                                let q = (b * h + iy as usize) * w + ix as usize;
                                bw.push_words(&px[q * cw..(q + 1) * cw], cin);
                            }
                        }
                    }
                }
                let (pc, dots) = (&mut pc[..rows * cout], &mut dots[..rows * cout]);
                xor_popcount_block(kernel, cols, rows, &self.weights.data, cout, wpr, pc, cout);
                for (d, &c) in dots.iter_mut().zip(pc.iter()) {
                    *d = k as i32 - 2 * c as i32;
                }
                for &(r, tap) in padded.iter() {
                    for o in 0..cout {
                        dots[r * cout + o] -= self.tap_sums[o * taps + tap];
                    }
                }
                emit(p0, dots, tile);
            });
        Ok(())
    }
}

/// A full-precision convolution (the stem, option-B shortcuts) followed by its BatchNorm:
/// `y = (conv(x, W) [+ conv_bias]) * scale[o] + bias[o]`, computed by nn-core's convolution
/// and channel-affine kernels (the ones the candle forward pass runs), not folded.
#[derive(Debug, Clone, PartialEq)]
pub struct FloatConv {
    pub geom: ConvGeom,
    /// `[cout, cin, kh, kw]` (candle layout).
    pub weight: Vec<f32>,
    pub conv_bias: Option<Vec<f32>>,
    pub scale: Vec<f32>,
    pub bias: Vec<f32>,
}

impl FloatConv {
    /// From `[cout, cin, kh, kw]` weights: `y = conv(x, W) * scale[o] + bias[o]`.
    pub fn from_oihw(geom: ConvGeom, w: &[f32], scale: &[f32], bias: Vec<f32>) -> Result<Self, String> {
        let ConvGeom { cin, cout, kh, kw, .. } = geom;
        if w.len() != cout * cin * kh * kw || scale.len() != cout || bias.len() != cout {
            return Err(format!(
                "float conv {geom:?}: weight {} values, {} scales, {} biases",
                w.len(),
                scale.len(),
                bias.len()
            ));
        }
        Ok(Self {
            geom,
            weight: w.to_vec(),
            conv_bias: None,
            scale: scale.to_vec(),
            bias,
        })
    }

    /// Sets the convolution's own bias (added before the BatchNorm).
    pub fn with_conv_bias(mut self, conv_bias: Option<Vec<f32>>) -> Result<Self, String> {
        if conv_bias.as_ref().is_some_and(|b| b.len() != self.geom.cout) {
            return Err(format!("float conv {:?}: conv bias of the wrong length", self.geom));
        }
        self.conv_bias = conv_bias;
        Ok(self)
    }

    /// On channels-last maps.
    pub fn forward(&self, x: &Nhwc) -> Result<Nhwc, String> {
        self.geom.check(x)?;
        self.forward_nchw(&x.to_nchw(), x.n, x.h, x.w)
    }

    /// On `n` NCHW images of `h x w`; channels-last result.
    pub fn forward_nchw(&self, x: &[f32], n: usize, h: usize, w: usize) -> Result<Nhwc, String> {
        let g = self.geom;
        g.output_hw(h, w)?;
        self.candle(x, n, h, w).map_err(|e| format!("float conv {g:?}: {e}"))
    }

    fn candle(&self, x: &[f32], n: usize, h: usize, w: usize) -> candle_core::Result<Nhwc> {
        use candle_core::{Device, Tensor};
        let g = self.geom;
        let dev = Device::Cpu;
        let cfg = nn_core::layers::Conv2dConfig {
            in_channels: g.cin,
            out_channels: g.cout,
            kernel: (g.kh, g.kw),
            stride: (g.stride, g.stride),
            padding: (g.pad, g.pad),
            dilation: (1, 1),
            groups: 1,
            bias: self.conv_bias.is_some(),
        };
        let xt = Tensor::from_slice(x, (n, g.cin, h, w), &dev)?;
        let wt = Tensor::from_slice(&self.weight, (g.cout, g.cin, g.kh, g.kw), &dev)?;
        // as nn-core's Conv2d layer
        let y = nn_core::layers::conv::conv2d(&xt, &wt, &cfg)?;
        let y = match &self.conv_bias {
            Some(b) => y.broadcast_add(&Tensor::from_slice(b, (1, g.cout, 1, 1), &dev)?)?,
            None => y,
        };
        // as nn-core's BatchNorm in evaluation
        let scale = Tensor::from_slice(&self.scale, g.cout, &dev)?;
        let shift = Tensor::from_slice(&self.bias, g.cout, &dev)?;
        let y = nn_core::ops::batch_norm::channel_affine(&y, &scale, &shift)?;
        let (_, c, oh, ow) = y.dims4()?;
        let v: Vec<f32> = y.flatten_all()?.to_vec1()?;
        Ok(Nhwc::from_nchw(&v, n, c, oh, ow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::testing::{random_values, Lcg};

    /// conv(sign(x), sign(w)) with zero padding, computed in floats on NCHW.
    fn reference(x: &[f32], n: usize, h: usize, w: usize, g: &ConvGeom, wt: &[f32]) -> Vec<f32> {
        let s = |v: f32| if v >= 0.0 { 1.0f32 } else { -1.0 };
        let (oh, ow) = g.output_hw(h, w).unwrap();
        let mut out = vec![0f32; n * g.cout * oh * ow];
        for b in 0..n {
            for o in 0..g.cout {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = 0f32;
                        for c in 0..g.cin {
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                    let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue; // zero padding after sign
                                    }
                                    let xv = x[((b * g.cin + c) * h + iy as usize) * w + ix as usize];
                                    acc += s(xv) * s(wt[((o * g.cin + c) * g.kh + ky) * g.kw + kx]);
                                }
                            }
                        }
                        out[((b * g.cout + o) * oh + oy) * ow + ox] = acc;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn binary_conv_is_exact_over_random_shapes() {
        let mut rng = Lcg::new(11);
        // (n, cin, h, w, cout, k, stride, pad): K not a multiple of 64, odd padding, stride 2,
        // channels above one word, non-square inputs
        let cases = [
            (2, 3, 7, 5, 4, 3, 1, 1),
            (1, 16, 8, 8, 16, 3, 1, 1),
            (2, 16, 9, 9, 32, 3, 2, 1),
            (1, 70, 6, 7, 5, 3, 2, 1),
            (1, 5, 9, 8, 3, 5, 2, 3),
            (3, 64, 5, 5, 7, 1, 1, 0),
            (1, 130, 4, 4, 9, 3, 1, 1),
            (1, 7, 10, 10, 6, 3, 3, 2),
        ];
        for &(n, cin, h, w, cout, k, stride, pad) in &cases {
            let g = ConvGeom {
                cin,
                cout,
                kh: k,
                kw: k,
                stride,
                pad,
            };
            let x = random_values(&mut rng, n * cin * h * w);
            let wt = random_values(&mut rng, cout * cin * k * k);
            let want = reference(&x, n, h, w, &g, &wt);
            let conv = PackedConv::from_oihw(g, &wt, vec![1.0; cout], vec![0.0; cout]).unwrap();
            let xin = Nhwc::from_nchw(&x, n, cin, h, w);
            for kernel in Kernel::available() {
                let y = conv.forward(&xin, kernel).unwrap();
                assert_eq!(
                    y.to_nchw(),
                    want,
                    "kernel {} case {:?}",
                    kernel.name(),
                    (n, cin, h, w, cout, k, stride, pad)
                );
            }
        }
    }

    #[test]
    fn output_transform_and_float_conv() {
        let mut rng = Lcg::new(5);
        let g = ConvGeom {
            cin: 3,
            cout: 4,
            kh: 3,
            kw: 3,
            stride: 2,
            pad: 1,
        };
        let x = random_values(&mut rng, 2 * 3 * 7 * 7);
        let wt = random_values(&mut rng, 4 * 3 * 9);
        let scale = vec![0.5, -2.0, 1.0, 3.0];
        let bias = vec![0.1, 0.2, -0.3, 0.0];
        let xin = Nhwc::from_nchw(&x, 2, 3, 7, 7);
        let dots = reference(&x, 2, 7, 7, &g, &wt);
        let y = PackedConv::from_oihw(g, &wt, scale.clone(), bias.clone())
            .unwrap()
            .forward(&xin, Kernel::best())
            .unwrap()
            .to_nchw();
        for (i, (a, d)) in y.iter().zip(&dots).enumerate() {
            let o = (i / 16) % 4;
            assert!((a - (d * scale[o] + bias[o])).abs() < 1e-5);
        }
        // the float conv on the signs of x and w equals the binary reference times the scale
        let sx: Vec<f32> = x.iter().map(|&v| if v >= 0.0 { 1.0 } else { -1.0 }).collect();
        let sw: Vec<f32> = wt.iter().map(|&v| if v >= 0.0 { 1.0 } else { -1.0 }).collect();
        let fc = FloatConv::from_oihw(g, &sw, &scale, bias.clone()).unwrap();
        let yf = fc.forward(&Nhwc::from_nchw(&sx, 2, 3, 7, 7)).unwrap().to_nchw();
        for (a, b) in yf.iter().zip(&y) {
            assert!((a - b).abs() < 1e-4);
        }
        // shape errors are reported
        assert!(PackedConv::from_oihw(g, &wt[1..], scale.clone(), bias.clone()).is_err());
        let bad = Nhwc::zeros(1, 7, 7, 2);
        assert!(PackedConv::from_oihw(g, &wt, scale, bias)
            .unwrap()
            .forward(&bad, Kernel::Portable)
            .unwrap_err()
            .contains("3 input channels"));
    }
}
