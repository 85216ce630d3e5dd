//! Networks of a search space: one code path builds both the weight-sharing supernet (every op
//! of every slot, at the widest width) and a stand-alone sub-network (only the chosen ops, at
//! their widths).
//!
//! Weight sharing follows single-path one-shot NAS: a slot's op owns one set of weights at the
//! widest width, and a narrower choice uses its leading channels (`W[:c_out, :c_in]`), so
//! every sub-network that picks the same op at a slot trains the same [`candle_core::Var`].
//! Parameter names are identical in both kinds of network, which is how
//! [`crate::supernet::Supernet::extract`] copies (and slices) a sub-network out of the supernet.

use crate::space::{Arch, Op, SearchSpace};
use candle_core::{DType, Result, Tensor, Var};
use nn_core::candle_nn::ModuleT;
use nn_core::init::Init;
use nn_core::layers::{Activation, BatchNorm, Conv2dConfig, Linear};
use nn_core::summary::{self, LayerStat};
use nn_core::{Model, ParamKind, VarPath};

/// Convolution (no bias) + BatchNorm whose weights may be used sliced to fewer channels.
pub struct ConvBn {
    /// `[out_max, in_max (1 for depthwise), k, k]`.
    pub weight: Var,
    pub bn: BatchNorm,
    k: usize,
    stride: usize,
    depthwise: bool,
    name: String,
}

impl ConvBn {
    /// A `k x k` convolution from `cin` to `cout` channels (depthwise: `cin == cout`, one input
    /// channel per group), He-initialised like nn-core's `Conv2d`, then BN with `bn_momentum`.
    pub fn new(vp: &VarPath, cin: usize, cout: usize, k: usize, stride: usize, depthwise: bool, bn_momentum: f64) -> Result<Self> {
        let dims = [cout, if depthwise { 1 } else { cin }, k, k];
        let weight = vp
            .pp("conv")
            .param("weight", &dims, Init::KAIMING_RELU_FAN_OUT, ParamKind::Weight)?;
        let bn = BatchNorm::with_options(&vp.pp("bn"), cout, 1e-5, bn_momentum, true)?;
        Ok(Self {
            weight,
            bn,
            k,
            stride,
            depthwise,
            name: vp.pp("conv").prefix().to_string(),
        })
    }

    /// Widest output width.
    pub fn max_out(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Applies the layer to `x` (its channel count picks the input slice) producing `cout`
    /// channels (the output slice).
    pub fn forward(&self, x: &Tensor, cout: usize, train: bool) -> Result<Tensor> {
        let cin = x.dim(1)?;
        let cout = if self.depthwise { cin } else { cout };
        let full = self.max_out();
        if cout > full || (!self.depthwise && cin > self.weight.dims()[1]) {
            candle_core::bail!(
                "{}: asked for {cin} -> {cout} channels, built for at most {:?}",
                self.name,
                self.weight.dims()
            );
        }
        let mut w = self.weight.as_tensor().clone();
        if cout < full {
            w = w.narrow(0, 0, cout)?;
        }
        if !self.depthwise && cin < w.dim(1)? {
            w = w.narrow(1, 0, cin)?;
        }
        let cfg = Conv2dConfig::new(cin, cout, self.k)
            .stride(self.stride)
            .groups(if self.depthwise { cin } else { 1 });
        let y = nn_core::layers::conv::conv2d(x, &w, &cfg)?;
        if summary::is_recording() {
            let (oh, ow) = (y.dims()[2], y.dims()[3]);
            summary::record(|| LayerStat {
                name: self.name.clone(),
                kind: "Conv2d".into(),
                out_shape: y.dims().to_vec(),
                params: w.elem_count(),
                macs: cfg.macs(oh, ow),
                ..Default::default()
            });
        }
        if cout == full {
            return self.bn.forward_t(&y, train);
        }
        // The supernet's narrower choice: BN over the leading channels' parameters.
        let (g, b) = (
            self.bn.weight.as_ref().expect("affine").as_tensor().narrow(0, 0, cout)?,
            self.bn.bias.as_ref().expect("affine").as_tensor().narrow(0, 0, cout)?,
        );
        let shape = [1, cout, 1, 1];
        if train {
            if y.device().is_cpu() && y.dtype() == DType::F32 {
                return Ok(nn_core::ops::batch_norm::batch_norm_train(&y, &g, &b, self.bn.eps)?.0);
            }
            let mean = y.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
            let xc = y.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
            let xn = xc.broadcast_div(&(var + self.bn.eps)?.sqrt()?)?;
            return xn.broadcast_mul(&g.reshape(&shape)?)?.broadcast_add(&b.reshape(&shape)?);
        }
        let rm = self.bn.running_mean.as_tensor().narrow(0, 0, cout)?;
        let rv = self.bn.running_var.as_tensor().narrow(0, 0, cout)?;
        let scale = g.div(&(rv + self.bn.eps)?.sqrt()?)?;
        let shift = (b - rm.mul(&scale)?)?;
        y.broadcast_mul(&scale.reshape(&shape)?)?.broadcast_add(&shift.reshape(&shape)?)
    }
}

/// The module of one op at one slot.
pub enum Block {
    /// conv + BN + ReLU.
    Conv(ConvBn),
    /// Inverted residual (ReLU6 after expansion and depthwise, linear projection); the
    /// shortcut is added by [`Network`].
    InvRes {
        expand: Option<Box<ConvBn>>,
        ratio: usize,
        dw: Box<ConvBn>,
        project: Box<ConvBn>,
        stride: usize,
    },
    /// Identity.
    Skip,
}

impl Block {
    /// Builds `op` from `cin` to `cout` channels (the widest ones in a supernet).
    pub fn new(vp: &VarPath, op: Op, cin: usize, cout: usize, stride: usize, bn_momentum: f64) -> Result<Self> {
        Ok(match op {
            Op::Conv { k } => Block::Conv(ConvBn::new(vp, cin, cout, k, stride, false, bn_momentum)?),
            Op::InvRes { expand, k } => {
                let hidden = cin * expand;
                Block::InvRes {
                    expand: if expand == 1 {
                        None
                    } else {
                        Some(Box::new(ConvBn::new(&vp.pp("expand"), cin, hidden, 1, 1, false, bn_momentum)?))
                    },
                    ratio: expand,
                    dw: Box::new(ConvBn::new(&vp.pp("dw"), hidden, hidden, k, stride, true, bn_momentum)?),
                    project: Box::new(ConvBn::new(&vp.pp("project"), hidden, cout, 1, 1, false, bn_momentum)?),
                    stride,
                }
            }
            Op::Skip => Block::Skip,
        })
    }

    /// Output for input `x` with `cout` output channels.
    pub fn forward(&self, x: &Tensor, cout: usize, train: bool) -> Result<Tensor> {
        match self {
            Block::Conv(c) => Activation::Relu.apply(&c.forward(x, cout, train)?),
            Block::InvRes {
                expand,
                ratio,
                dw,
                project,
                ..
            } => {
                let cin = x.dim(1)?;
                let h = match expand {
                    Some(e) => Activation::Relu6.apply(&e.forward(x, cin * ratio, train)?)?,
                    None => x.clone(),
                };
                let h = Activation::Relu6.apply(&dw.forward(&h, cin * ratio, train)?)?;
                project.forward(&h, cout, train)
            }
            Block::Skip => Ok(x.clone()),
        }
    }
}

/// The parameter-free shortcut of `x` to `cout` channels at `stride`: strided identity with
/// the channels zero-padded (more) or truncated (fewer).
pub fn shortcut(x: &Tensor, stride: usize, cout: usize) -> Result<Tensor> {
    let x = nn_core::models::blocks::subsample(x, stride)?;
    let c = x.dim(1)?;
    if c < cout {
        x.pad_with_zeros(1, 0, cout - c)
    } else if c > cout {
        x.narrow(1, 0, cout)
    } else {
        Ok(x)
    }
}

/// A network of a [`SearchSpace`]: the supernet ([`Network::supernet`]) or one sub-network
/// ([`Network::standalone`]).
pub struct Network {
    pub space: SearchSpace,
    stem: ConvBn,
    first: Option<(Block, usize)>,
    /// Per slot, the built ops (all of them in a supernet, the chosen one stand-alone).
    slots: Vec<Vec<(Op, Block)>>,
    head: Option<ConvBn>,
    fc: Linear,
    /// The fixed architecture of a stand-alone network.
    arch: Option<Arch>,
    name: String,
}

impl Network {
    fn build(vp: &VarPath, space: &SearchSpace, arch: Option<&Arch>, bn_momentum: f64) -> Result<Self> {
        if let Some(a) = arch {
            space.validate(a).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        }
        let stem = ConvBn::new(
            &vp.pp("stem"),
            space.in_channels,
            space.stem_channels,
            3,
            space.stem_stride,
            false,
            bn_momentum,
        )?;
        let mut c = space.stem_channels;
        let first = match space.first_block {
            Some((op, out)) => {
                let b = Block::new(&vp.pp("first"), op, c, out, 1, bn_momentum)?;
                c = out;
                Some((b, out))
            }
            None => None,
        };
        let wmax = space.max_width();
        let mut slots = Vec::with_capacity(space.slots.len());
        for (i, slot) in space.slots.iter().enumerate() {
            let svp = vp.pp("layers").pp(i);
            let mut ops = Vec::new();
            match arch {
                Some(a) => {
                    let l = a.layers[i];
                    if l.op != Op::Skip {
                        let cout = space.channels(i, l.width);
                        ops.push((l.op, Block::new(&svp.pp(l.op.name()), l.op, c, cout, slot.stride, bn_momentum)?));
                        c = cout;
                    } else {
                        ops.push((Op::Skip, Block::Skip));
                    }
                }
                None => {
                    let cout = space.channels(i, wmax);
                    for &op in &space.ops {
                        if op == Op::Skip && !slot.skippable {
                            continue;
                        }
                        ops.push((op, Block::new(&svp.pp(op.name()), op, c, cout, slot.stride, bn_momentum)?));
                    }
                    c = cout;
                }
            }
            slots.push(ops);
        }
        let head = match space.head_channels {
            Some(h) => {
                let hb = ConvBn::new(&vp.pp("head"), c, h, 1, 1, false, bn_momentum)?;
                c = h;
                Some(hb)
            }
            None => None,
        };
        let fc = Linear::new(&vp.pp("fc"), c, space.num_classes, true)?;
        Ok(Self {
            space: space.clone(),
            stem,
            first,
            slots,
            head,
            fc,
            arch: arch.cloned(),
            name: format!("nas-{}", space.name),
        })
    }

    /// The weight-sharing supernet: every op of every slot at the widest width.
    pub fn supernet(vp: &VarPath, space: &SearchSpace) -> Result<Self> {
        Self::build(vp, space, None, 0.1)
    }

    /// The stand-alone network of `arch` (BatchNorm momentum 0.1).
    pub fn standalone(vp: &VarPath, space: &SearchSpace, arch: &Arch) -> Result<Self> {
        Self::build(vp, space, Some(arch), 0.1)
    }

    /// The stand-alone network of `arch` with a chosen BatchNorm momentum (1.0: one training-mode
    /// pass sets the running statistics to that batch's, used to recalibrate extracted nets).
    pub fn standalone_with_momentum(vp: &VarPath, space: &SearchSpace, arch: &Arch, bn_momentum: f64) -> Result<Self> {
        Self::build(vp, space, Some(arch), bn_momentum)
    }

    /// The fixed architecture of a stand-alone network.
    pub fn arch(&self) -> Option<&Arch> {
        self.arch.as_ref()
    }

    /// Runs `arch` up to the pooled features; also returns each slot's output when `collect`.
    pub fn forward_path(&self, x: &Tensor, arch: &Arch, train: bool, collect: bool) -> Result<(Tensor, Vec<Tensor>)> {
        if arch.layers.len() != self.slots.len() {
            candle_core::bail!("architecture has {} layers, network {}", arch.layers.len(), self.slots.len());
        }
        let mut h = Activation::Relu6.apply(&self.stem.forward(x, self.space.stem_channels, train)?)?;
        if let Some((b, out)) = &self.first {
            h = b.forward(&h, *out, train)?;
        }
        let mut outs = Vec::new();
        for (i, l) in arch.layers.iter().enumerate() {
            let block = self.slots[i]
                .iter()
                .find(|(op, _)| *op == l.op)
                .map(|(_, b)| b)
                .ok_or_else(|| candle_core::Error::Msg(format!("layer {i}: op {} is not built in this network", l.op.name())))?;
            let cout = if l.op == Op::Skip {
                h.dim(1)?
            } else {
                self.space.channels(i, l.width)
            };
            let y = block.forward(&h, cout, train)?;
            let stride = self.space.slots[i].stride;
            h = match l.op {
                Op::Skip => y,
                _ if self.space.residual_all => (y + shortcut(&h, stride, cout)?)?,
                Op::InvRes { .. } if stride == 1 && h.dim(1)? == cout => (y + &h)?,
                _ => y,
            };
            if collect {
                outs.push(h.clone());
            }
        }
        if let Some(head) = &self.head {
            h = Activation::Relu6.apply(&head.forward(&h, head.max_out(), train)?)?;
        }
        let f = nn_core::layers::GlobalAvgPool.forward_t(&h, train)?;
        Ok((f, outs))
    }

    /// The classifier on pooled features of any width up to the widest (leading input columns).
    pub fn head_forward(&self, f: &Tensor, train: bool) -> Result<Tensor> {
        let c = f.dim(1)?;
        if c == self.fc.in_features() {
            return self.fc.forward_t(f, train);
        }
        let w = self.fc.weight.as_tensor().narrow(1, 0, c)?;
        let y = f.matmul(&w.t()?)?;
        match &self.fc.bias {
            Some(b) => y.broadcast_add(b.as_tensor()),
            None => Ok(y),
        }
    }

    /// Logits of sub-network `arch`.
    pub fn forward_arch(&self, x: &Tensor, arch: &Arch, train: bool) -> Result<Tensor> {
        let (f, _) = self.forward_path(x, arch, train, false)?;
        self.head_forward(&f, train)
    }

    fn fixed(&self) -> Result<&Arch> {
        self.arch
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("the supernet has no fixed architecture; use forward_arch".into()))
    }
}

impl Model for Network {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_path(x, self.fixed()?, train, false)?.0)
    }
    fn forward_head(&self, f: &Tensor, train: bool) -> Result<Tensor> {
        self.head_forward(f, train)
    }
    fn num_classes(&self) -> usize {
        self.space.num_classes
    }
    fn num_features(&self) -> usize {
        self.fc.in_features()
    }
}
