//! 2-D convolution layer (cross-correlation, NCHW), any stride, padding, dilation and groups.
//!
//! On CPU the forward and backward passes run nn-core's im2col + gemm kernels
//! ([`crate::ops::conv2d`]); other devices use candle's own convolution.

use crate::init::Init;
use crate::summary::{self, LayerStat};
use crate::var_store::{ParamKind, VarPath};
use candle_core::{Result, Tensor, Var};
use candle_nn::ModuleT;

/// Hyper-parameters of a 2-D convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Conv2dConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
    pub bias: bool,
}

impl Conv2dConfig {
    /// A square `k x k` convolution with stride 1, "same"-style padding k/2, no bias.
    pub fn new(in_channels: usize, out_channels: usize, k: usize) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel: (k, k),
            stride: (1, 1),
            padding: (k / 2, k / 2),
            dilation: (1, 1),
            groups: 1,
            bias: false,
        }
    }
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = (s, s);
        self
    }
    pub fn padding(mut self, p: usize) -> Self {
        self.padding = (p, p);
        self
    }
    pub fn dilation(mut self, d: usize) -> Self {
        self.dilation = (d, d);
        self
    }
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
    pub fn bias(mut self, b: bool) -> Self {
        self.bias = b;
        self
    }
    /// Weight shape `[out, in / groups, kh, kw]`.
    pub fn weight_dims(&self) -> [usize; 4] {
        [
            self.out_channels,
            self.in_channels / self.groups.max(1),
            self.kernel.0,
            self.kernel.1,
        ]
    }
    /// Output spatial size for an input of `h x w`.
    pub fn output_hw(&self, h: usize, w: usize) -> (usize, usize) {
        crate::ops::Conv2dOpts {
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            groups: self.groups,
        }
        .output_hw(h, w, self.kernel.0, self.kernel.1)
    }
    /// Checks channel/group divisibility.
    pub fn validate(&self) -> Result<()> {
        if self.groups == 0 || self.in_channels % self.groups != 0 || self.out_channels % self.groups != 0 {
            candle_core::bail!(
                "conv2d: in_channels {} and out_channels {} must be divisible by groups {}",
                self.in_channels,
                self.out_channels,
                self.groups
            );
        }
        if self.kernel.0 == 0
            || self.kernel.1 == 0
            || self.stride.0 == 0
            || self.stride.1 == 0
            || self.dilation.0 == 0
            || self.dilation.1 == 0
        {
            candle_core::bail!("conv2d: kernel, stride and dilation must be positive: {self:?}");
        }
        Ok(())
    }
    /// Multiply-accumulates per image producing an `oh x ow` output.
    pub fn macs(&self, oh: usize, ow: usize) -> u64 {
        let [o, i, kh, kw] = self.weight_dims();
        (o * i * kh * kw * oh * ow) as u64
    }
}

/// Convolution of `x` `[N, C, H, W]` with `w` `[O, C/groups, kh, kw]` using the fastest
/// implementation for the tensor's device.
pub fn conv2d(x: &Tensor, w: &Tensor, cfg: &Conv2dConfig) -> Result<Tensor> {
    if x.rank() != 4 {
        candle_core::bail!("conv2d expects an NCHW input, got shape {:?}", x.dims());
    }
    if x.dims()[1] != cfg.in_channels {
        candle_core::bail!("conv2d expects {} input channels, got shape {:?}", cfg.in_channels, x.dims());
    }
    crate::ops::conv2d(
        x,
        w,
        crate::ops::Conv2dOpts {
            stride: cfg.stride,
            padding: cfg.padding,
            dilation: cfg.dilation,
            groups: cfg.groups,
        },
    )
}

/// A convolution layer with its own weight (and optional bias).
#[derive(Clone)]
pub struct Conv2d {
    pub weight: Var,
    pub bias: Option<Var>,
    pub config: Conv2dConfig,
    name: String,
}

impl Conv2d {
    /// He initialisation (fan-out, ReLU gain) as used by ResNets.
    pub fn new(vp: &VarPath, config: Conv2dConfig) -> Result<Self> {
        Self::with_init(vp, config, Init::KAIMING_RELU_FAN_OUT)
    }

    pub fn with_init(vp: &VarPath, config: Conv2dConfig, init: Init) -> Result<Self> {
        config.validate()?;
        let weight = vp.param("weight", &config.weight_dims(), init, ParamKind::Weight)?;
        let bias = if config.bias {
            let [_, i, kh, kw] = config.weight_dims();
            let b = 1.0 / ((i * kh * kw).max(1) as f64).sqrt();
            Some(vp.param("bias", &[config.out_channels], Init::Uniform { lo: -b, hi: b }, ParamKind::Bias)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            config,
            name: vp.prefix().to_string(),
        })
    }

    /// The layer's parameter path.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl ModuleT for Conv2d {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let y = conv2d(x, self.weight.as_tensor(), &self.config)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.as_tensor().reshape((1, self.config.out_channels, 1, 1))?)?,
            None => y,
        };
        if summary::is_recording() {
            let (oh, ow) = (y.dims()[2], y.dims()[3]);
            summary::record(|| LayerStat {
                name: self.name.clone(),
                kind: "Conv2d".into(),
                out_shape: y.dims().to_vec(),
                params: self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count()),
                macs: self.config.macs(oh, ow),
                ..Default::default()
            });
        }
        Ok(y)
    }
}
