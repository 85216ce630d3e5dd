//! Packed binary convolutions as candle layers, and the layer factory that puts them into any
//! backbone written against [`LayerFactory`] (BiMLP first).
//!
//! [`PackedConvLayer`] computes exactly what a trained [`BinaryConv2d`](crate::BinaryConv2d)
//! computes in evaluation, `conv(sign(x), sign(W)) * alpha [+ b]` on NCHW tensors, with the
//! integer `conv(sign(x), sign(W))` taken from XNOR-popcount over packed bits instead of a float
//! convolution:
//! - pointwise convolutions (1x1, stride 1, no padding: every channel FC of BiMLP) pack each
//!   pixel's channel signs straight from the NCHW input (the packed pixels are already the rows
//!   of the binary GEMM) and write `dot * alpha [+ b]` straight into the NCHW output;
//! - other dense convolutions with square kernel, stride and padding run the bit-level im2col
//!   and binary GEMM of [`PackedConv`] (AVX2 where available);
//! - grouped, rectangular or dilated ones (BiMLP's depthwise 1x7 / 7x1 token FCs, `K = (cin /
//!   groups) kh kw` of 7 or 14) are too short for popcount words: each output plane accumulates
//!   `sign(W[o, c, tap]) * sign(x)` (the weight sign read from the packed row, the input signs
//!   as `+-1` bytes) tap by tap over the output range where the tap is inside the input, so
//!   zero-padded taps count 0 as in the training graph.
//!
//! The dot product is an exact integer in both graphs and is then scaled once (`dot * alpha`)
//! and biased, as candle does, so the outputs are bit-identical.
//!
//! [`PackedFactory`] is a [`LayerFactory`] that hands out these layers where
//! [`BinaryFactory`](crate::BinaryFactory) would build a binary convolution and builds every
//! other layer exactly like it (its variables are then loaded from the trained run or the model
//! file). It packs from a trained run's variables ([`PackedFactory::from_trained`]) or serves
//! the layers read from a model file ([`PackedFactory::from_layers`]).

use crate::deploy::conv::{ConvGeom, Nhwc, PackedConv};
use crate::deploy::gemm::{xor_popcount_block, Kernel, ROW_TILE};
use crate::deploy::pack::{sign_bit, words, PackedMatrix};
use crate::factory::{BinaryConfig, BinaryFactory};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use candle_nn::ModuleT;
use nn_core::factory::{LayerFactory, LayerRole};
use nn_core::layers::{Activation, BoxedLayer, Conv2dConfig};
use nn_core::var_store::VarPath;
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

/// The binary GEMM kernel shared by every layer of one packed model (switchable at run time).
#[derive(Debug, Clone)]
pub struct KernelCell(Arc<RwLock<Kernel>>);

impl KernelCell {
    pub fn new(k: Kernel) -> Self {
        Self(Arc::new(RwLock::new(k)))
    }
    pub fn get(&self) -> Kernel {
        *self.0.read().unwrap_or_else(|e| e.into_inner())
    }
    pub fn set(&self, k: Kernel) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = k;
    }
}

/// A binary convolution for inference on NCHW candle tensors (see the module docs).
#[derive(Debug, Clone)]
pub struct PackedConvLayer {
    pub config: Conv2dConfig,
    /// `[cout, (cin / groups) kh kw]` signs of the weights, `(kh, kw, c)` order, bit 1 = `-1`.
    pub weights: PackedMatrix,
    /// Per-output-channel weight scale (ones without weight scaling).
    pub alpha: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    /// The GEMM form, for dense convolutions with square geometry.
    dense: Option<PackedConv>,
    kernel: KernelCell,
}

impl PartialEq for PackedConvLayer {
    fn eq(&self, o: &Self) -> bool {
        self.config == o.config && self.weights == o.weights && self.alpha == o.alpha && self.bias == o.bias
    }
}

impl PackedConvLayer {
    /// Reduction length of one output: `(cin / groups) kh kw`.
    pub fn k(cfg: &Conv2dConfig) -> usize {
        cfg.in_channels / cfg.groups * cfg.kernel.0 * cfg.kernel.1
    }

    /// From packed weights and the output transform.
    pub fn new(
        config: Conv2dConfig,
        weights: PackedMatrix,
        alpha: Vec<f32>,
        bias: Option<Vec<f32>>,
        kernel: KernelCell,
    ) -> std::result::Result<Self, String> {
        config.validate().map_err(|e| e.to_string())?;
        let (cout, k) = (config.out_channels, Self::k(&config));
        if weights.rows != cout || weights.k != k {
            return Err(format!(
                "packed conv {config:?}: weights are {} x {}, want {cout} x {k}",
                weights.rows, weights.k
            ));
        }
        if alpha.len() != cout || bias.as_ref().is_some_and(|b| b.len() != cout) || bias.is_some() != config.bias {
            return Err(format!(
                "packed conv {config:?}: {} weight scales and {:?} biases for {cout} output channels",
                alpha.len(),
                bias.as_ref().map(|b| b.len())
            ));
        }
        let square = config.kernel.0 == config.kernel.1 && config.stride.0 == config.stride.1 && config.padding.0 == config.padding.1;
        let dense = if config.groups == 1 && square && config.dilation == (1, 1) {
            let geom = ConvGeom {
                cin: config.in_channels,
                cout,
                kh: config.kernel.0,
                kw: config.kernel.1,
                stride: config.stride.0,
                pad: config.padding.0,
            };
            Some(PackedConv::new(geom, weights.clone(), vec![1.0; cout], vec![0.0; cout])?)
        } else {
            None
        };
        Ok(Self {
            config,
            weights,
            alpha,
            bias,
            dense,
            kernel,
        })
    }

    /// From float weights `[cout, cin / groups, kh, kw]` (only their signs are kept).
    pub fn from_oihw(
        config: Conv2dConfig,
        w: &[f32],
        alpha: Vec<f32>,
        bias: Option<Vec<f32>>,
        kernel: KernelCell,
    ) -> std::result::Result<Self, String> {
        let (cout, gi, kh, kw) = (
            config.out_channels,
            config.in_channels / config.groups,
            config.kernel.0,
            config.kernel.1,
        );
        if w.len() != cout * gi * kh * kw {
            return Err(format!("packed conv {config:?}: {} weights, want {}", w.len(), cout * gi * kh * kw));
        }
        let k = gi * kh * kw;
        let mut reordered = vec![0f32; w.len()];
        for o in 0..cout {
            for c in 0..gi {
                for y in 0..kh {
                    for x in 0..kw {
                        reordered[o * k + (y * kw + x) * gi + c] = w[((o * gi + c) * kh + y) * kw + x];
                    }
                }
            }
        }
        Self::new(config, PackedMatrix::from_f32(&reordered, cout, k), alpha, bias, kernel)
    }

    /// Output size of an `h x w` input.
    pub fn output_hw(&self, h: usize, w: usize) -> std::result::Result<(usize, usize), String> {
        let c = &self.config;
        let span = |len: usize, k: usize, s: usize, p: usize, d: usize| {
            let eff = d * (k - 1) + 1;
            (len + 2 * p).checked_sub(eff).map(|v| v / s + 1)
        };
        match (
            span(h, c.kernel.0, c.stride.0, c.padding.0, c.dilation.0),
            span(w, c.kernel.1, c.stride.1, c.padding.1, c.dilation.1),
        ) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(format!("packed conv {c:?}: input {h} x {w} is smaller than the kernel")),
        }
    }

    fn is_pointwise(&self) -> bool {
        let c = &self.config;
        c.groups == 1 && c.kernel == (1, 1) && c.stride == (1, 1) && c.padding == (0, 0)
    }

    /// The pointwise fast path: `dot * alpha [+ bias]` for NCHW `x`, NCHW output.
    fn forward_pointwise(&self, x: &[f32], n: usize, hw: usize) -> Vec<f32> {
        let (cin, cout) = (self.config.in_channels, self.config.out_channels);
        let wpr = words(cin);
        // 1. pack: bit c of pixel p's row = sign of x[b, c, p]; channel planes read contiguously
        let mut packed = vec![0u64; n * hw * wpr];
        packed.par_chunks_mut(hw * wpr).enumerate().for_each(|(b, rows)| {
            for c in 0..cin {
                let plane = &x[(b * cin + c) * hw..(b * cin + c + 1) * hw];
                let (word, bit) = (c / 64, c % 64);
                for (p, &v) in plane.iter().enumerate() {
                    rows[p * wpr + word] |= sign_bit(v) << bit;
                }
            }
        });
        // 2. per tile of pixels (inside one image): xor-popcount against all weights, then the
        //    output transform written into the image's channel planes
        let mut y = vec![0f32; n * cout * hw];
        let kernel = self.kernel.get();
        let tiles = hw.div_ceil(ROW_TILE);
        y.par_chunks_mut(cout * hw).enumerate().for_each(|(b, img)| {
            let mut pc = vec![0u32; ROW_TILE * cout];
            for t in 0..tiles {
                let p0 = t * ROW_TILE;
                let rows = (hw - p0).min(ROW_TILE);
                let a = &packed[(b * hw + p0) * wpr..(b * hw + p0 + rows) * wpr];
                xor_popcount_block(kernel, a, rows, &self.weights.data, cout, wpr, &mut pc, cout);
                for o in 0..cout {
                    let al = self.alpha[o];
                    let out = &mut img[o * hw + p0..o * hw + p0 + rows];
                    for (r, v) in out.iter_mut().enumerate() {
                        let dot = cin as i32 - 2 * pc[r * cout + o] as i32;
                        *v = dot as f32 * al;
                    }
                    if let Some(bias) = &self.bias {
                        out.iter_mut().for_each(|v| *v += bias[o]);
                    }
                }
            }
        });
        y
    }

    /// The exact integer `conv(sign(x), sign(W))` with zero padding for NCHW `x`, NCHW output.
    pub fn forward_i32_nchw(&self, x: &[f32], n: usize, h: usize, w: usize) -> std::result::Result<Vec<i32>, String> {
        let c = &self.config;
        if x.len() != n * c.in_channels * h * w {
            return Err(format!("packed conv: {} values for {n} x {} x {h} x {w}", x.len(), c.in_channels));
        }
        let (oh, ow) = self.output_hw(h, w)?;
        let cout = c.out_channels;
        let mut out = vec![0i32; n * cout * oh * ow];
        if let Some(d) = &self.dense {
            let nhwc = Nhwc::from_nchw(x, n, c.in_channels, h, w);
            let (dots, _, _) = d.forward_i32(&nhwc, self.kernel.get())?;
            // [n, oh, ow, cout] -> [n, cout, oh, ow]
            out.par_chunks_mut(cout * oh * ow).enumerate().for_each(|(b, img)| {
                let src = &dots[b * oh * ow * cout..(b + 1) * oh * ow * cout];
                for (p, px) in src.chunks_exact(cout).enumerate() {
                    for (o, &v) in px.iter().enumerate() {
                        img[o * oh * ow + p] = v;
                    }
                }
            });
            return Ok(out);
        }
        let (cin, groups) = (c.in_channels, c.groups);
        let (gi, go) = (cin / groups, cout / groups);
        // +-1 per input value; each weight sign is read from the packed row and the plane
        // accumulates sign(W) * sign(x) tap by tap over the valid output range, so padded taps
        // add nothing (as the zero-padded float convolution) and the row loops vectorise
        let signs: Vec<i8> = x.par_iter().map(|&v| 1 - 2 * sign_bit(v) as i8).collect();
        let (sh, sw, ph, pw, dh, dw) = (c.stride.0, c.stride.1, c.padding.0, c.padding.1, c.dilation.0, c.dilation.1);
        // output positions o with 0 <= o s + off - p < len
        let valid = |len: usize, outs: usize, s: usize, off: usize, p: usize| -> (usize, usize) {
            let lo = p.saturating_sub(off).div_ceil(s).min(outs);
            let hi = if len + p > off {
                ((len + p - off - 1) / s + 1).min(outs)
            } else {
                0
            };
            (lo, hi.max(lo))
        };
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(bo, plane)| {
            let (b, o) = (bo / cout, bo % cout);
            let g = o / go;
            let wrow = self.weights.row(o);
            for ky in 0..c.kernel.0 {
                let (y_lo, y_hi) = valid(h, oh, sh, ky * dh, ph);
                for kx in 0..c.kernel.1 {
                    let (x_lo, x_hi) = valid(w, ow, sw, kx * dw, pw);
                    if x_lo == x_hi || y_lo == y_hi {
                        continue;
                    }
                    for ci in 0..gi {
                        let j = (ky * c.kernel.1 + kx) * gi + ci;
                        let ws = 1 - 2 * ((wrow[j / 64] >> (j % 64)) & 1) as i32;
                        let xp = &signs[(b * cin + g * gi + ci) * h * w..(b * cin + g * gi + ci + 1) * h * w];
                        for oy in y_lo..y_hi {
                            let iy = oy * sh + ky * dh - ph;
                            let row = &mut plane[oy * ow..(oy + 1) * ow];
                            if sw == 1 {
                                let ix0 = x_lo + kx * dw - pw;
                                let src = &xp[iy * w + ix0..iy * w + ix0 + (x_hi - x_lo)];
                                for (acc, &v) in row[x_lo..x_hi].iter_mut().zip(src) {
                                    *acc += ws * v as i32;
                                }
                            } else {
                                for ox in x_lo..x_hi {
                                    row[ox] += ws * xp[iy * w + ox * sw + kx * dw - pw] as i32;
                                }
                            }
                        }
                    }
                }
            }
        });
        Ok(out)
    }

    /// `dot * alpha [+ bias]` for NCHW `x`, NCHW output (as values).
    pub fn forward_nchw(&self, x: &[f32], n: usize, h: usize, w: usize) -> std::result::Result<(Vec<f32>, usize, usize), String> {
        if self.is_pointwise() {
            if x.len() != n * self.config.in_channels * h * w {
                return Err(format!(
                    "packed conv: {} values for {n} x {} x {h} x {w}",
                    x.len(),
                    self.config.in_channels
                ));
            }
            return Ok((self.forward_pointwise(x, n, h * w), h, w));
        }
        let dots = self.forward_i32_nchw(x, n, h, w)?;
        let (oh, ow) = self.output_hw(h, w)?;
        let cout = self.config.out_channels;
        let mut y = vec![0f32; dots.len()];
        y.par_chunks_mut(oh * ow)
            .zip(dots.par_chunks(oh * ow))
            .enumerate()
            .for_each(|(bo, (yp, dp))| {
                let o = bo % cout;
                let a = self.alpha[o];
                match &self.bias {
                    None => yp.iter_mut().zip(dp).for_each(|(y, &d)| *y = d as f32 * a),
                    Some(bias) => yp.iter_mut().zip(dp).for_each(|(y, &d)| *y = d as f32 * a + bias[o]),
                }
            });
        Ok((y, oh, ow))
    }

    /// Bytes of parameters held: packed words, scales and biases.
    pub fn param_bytes(&self) -> usize {
        self.weights.data.len() * 8 + (self.alpha.len() + self.bias.as_ref().map_or(0, |b| b.len())) * 4
    }
}

/// Reads the input storage in place and creates the output storage directly (no copies).
impl CustomOp1 for PackedConvLayer {
    fn name(&self) -> &'static str {
        "packed-binary-conv2d"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("packed conv: contiguous f32 input expected"),
        };
        let (n, _, h, w) = l.shape().dims4()?;
        let (y, oh, ow) = self.forward_nchw(x, n, h, w).map_err(candle_core::Error::msg)?;
        Ok((CpuStorage::F32(y), Shape::from((n, self.config.out_channels, oh, ow))))
    }
}

impl ModuleT for PackedConvLayer {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4()?;
        if c != self.config.in_channels {
            candle_core::bail!(
                "packed conv expects {} input channels, got shape {:?}",
                self.config.in_channels,
                x.dims()
            );
        }
        let (dev, dt) = (x.device().clone(), x.dtype());
        let y = x
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1_no_bwd(self)?;
        y.to_dtype(dt)?.to_device(&dev)
    }
}

struct SharedLayer(Arc<PackedConvLayer>);

impl ModuleT for SharedLayer {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.0.forward_t(x, train)
    }
}

/// A [`LayerFactory`] that builds the layers of a trained binary model for inference: packed
/// binary convolutions where [`BinaryFactory`] puts binary ones, and every other layer as
/// [`BinaryFactory`] builds it (their variables are loaded afterwards).
pub struct PackedFactory {
    inner: BinaryFactory,
    /// The trained run's variables, to pack layers from (`None`: only `layers` are served).
    trained: Option<HashMap<String, Tensor>>,
    layers: Mutex<BTreeMap<String, Arc<PackedConvLayer>>>,
    kernel: KernelCell,
}

impl PackedFactory {
    /// Packs each binary convolution from the trained variables `vars` as the model asks for it.
    pub fn from_trained(config: BinaryConfig, vars: &HashMap<String, Tensor>, kernel: KernelCell) -> std::result::Result<Self, String> {
        if !config.binarize_activations {
            return Err("cannot pack a W1A32 model (binarize_activations = false): the engine needs binary activations".into());
        }
        Ok(Self {
            inner: BinaryFactory::new(config),
            trained: Some(vars.clone()),
            layers: Mutex::new(BTreeMap::new()),
            kernel,
        })
    }

    /// Serves already packed layers, by variable prefix (read from a model file).
    pub fn from_layers(config: BinaryConfig, layers: BTreeMap<String, Arc<PackedConvLayer>>, kernel: KernelCell) -> Self {
        Self {
            inner: BinaryFactory::new(config),
            trained: None,
            layers: Mutex::new(layers),
            kernel,
        }
    }

    /// The packed layers built or served so far, by variable prefix.
    pub fn layers(&self) -> BTreeMap<String, Arc<PackedConvLayer>> {
        self.layers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn kernel(&self) -> &KernelCell {
        &self.kernel
    }

    fn is_binary(&self, role: LayerRole) -> bool {
        let c = &self.inner.config;
        match role {
            LayerRole::Body => true,
            LayerRole::Shortcut => c.binarize_shortcut,
            LayerRole::Hidden => c.binarize_hidden,
            LayerRole::Stem | LayerRole::Head => false,
        }
    }

    fn pack(&self, vars: &HashMap<String, Tensor>, prefix: &str, cfg: Conv2dConfig) -> Result<PackedConvLayer> {
        let name = format!("{prefix}.weight");
        let wt = vars
            .get(&name)
            .ok_or_else(|| candle_core::Error::msg(format!("the trained model has no tensor `{name}`")))?;
        let dims = cfg.weight_dims();
        if wt.dims() != dims {
            candle_core::bail!("tensor `{name}` has shape {:?}, expected {dims:?}", wt.dims());
        }
        let wt = wt.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let w: Vec<f32> = wt.flatten_all()?.to_vec1()?;
        let alpha = if self.inner.config.scale_weights {
            crate::binary::weight_scale(&wt)?.to_vec1::<f32>()?
        } else {
            vec![1.0; cfg.out_channels]
        };
        let bias = if cfg.bias {
            let bn = format!("{prefix}.bias");
            let b = vars
                .get(&bn)
                .ok_or_else(|| candle_core::Error::msg(format!("the trained model has no tensor `{bn}`")))?;
            Some(b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        } else {
            None
        };
        PackedConvLayer::from_oihw(cfg, &w, alpha, bias, self.kernel.clone())
            .map_err(|e| candle_core::Error::msg(format!("`{prefix}`: {e}")))
    }
}

impl LayerFactory for PackedFactory {
    fn conv2d(&self, vp: &VarPath, cfg: Conv2dConfig, role: LayerRole) -> Result<BoxedLayer> {
        if !self.is_binary(role) {
            return self.inner.conv2d(vp, cfg, role);
        }
        let prefix = vp.prefix().to_string();
        let mut layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = layers.get(&prefix) {
            if l.config != cfg {
                candle_core::bail!(
                    "packed layer `{prefix}` has configuration {:?}, the model asks for {cfg:?}",
                    l.config
                );
            }
            return Ok(Box::new(SharedLayer(l.clone())));
        }
        let Some(vars) = &self.trained else {
            candle_core::bail!("the model file has no packed layer `{prefix}`");
        };
        let l = Arc::new(self.pack(vars, &prefix, cfg)?);
        layers.insert(prefix, l.clone());
        Ok(Box::new(SharedLayer(l)))
    }

    fn linear(&self, vp: &VarPath, in_features: usize, out_features: usize, bias: bool, role: LayerRole) -> Result<BoxedLayer> {
        if self.is_binary(role) {
            candle_core::bail!(
                "`{}`: binary linear layers are not supported by the packed engine (use 1x1 convolutions)",
                vp.prefix()
            );
        }
        self.inner.linear(vp, in_features, out_features, bias, role)
    }

    fn norm(&self, vp: &VarPath, channels: usize, role: LayerRole) -> Result<BoxedLayer> {
        self.inner.norm(vp, channels, role)
    }

    fn activation(&self, vp: &VarPath, act: Activation, channels: usize, role: LayerRole) -> Result<BoxedLayer> {
        self.inner.activation(vp, act, channels, role)
    }

    fn name(&self) -> &str {
        "packed"
    }
}
