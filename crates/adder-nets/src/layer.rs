//! Adder layers: [`AdderConv2d`] (Eq. (2) of AdderNet in place of a convolution) and
//! [`AdderLinear`] (the same l1 response for fully connected layers: `y_t = -sum_k |x_k - W_tk|`).
//!
//! Both register their filters in an [`AdderRegistry`] so the adaptive learning rate
//! ([`crate::adaptive::AdaptiveLr`]) can find them, and report themselves to nn-core's summary
//! with `macs = 0` and `additions = 2 * K` per output element (one subtraction and one
//! accumulation per tap, the counting of the AdderNet paper's tables).

use crate::op::adder2d;
use candle_core::{Result, Tensor, Var};
use candle_nn::ModuleT;
use nn_core::init::Init;
use nn_core::layers::Conv2dConfig;
use nn_core::ops::Conv2dOpts;
use nn_core::summary::{self, LayerStat};
use nn_core::var_store::{ParamKind, VarPath};
use std::sync::{Arc, Mutex};

/// Initialisation of adder filters: standard normal, as the released AdderNet code
/// (`torch.randn`); the BatchNorm after every adder layer absorbs the scale.
pub const ADDER_INIT: Init = Init::Normal { mean: 0.0, std: 1.0 };

/// The filters of every adder layer of a model (name, variable), in construction order.
#[derive(Default, Debug)]
pub struct AdderRegistry {
    weights: Mutex<Vec<(String, Var)>>,
}

impl AdderRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn register(&self, name: &str, w: &Var) {
        self.weights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_string(), w.clone()));
    }
    /// The registered `(name, filter)` pairs.
    pub fn weights(&self) -> Vec<(String, Var)> {
        self.weights.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn len(&self) -> usize {
        self.weights.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn opts(cfg: &Conv2dConfig) -> Conv2dOpts {
    Conv2dOpts {
        stride: cfg.stride,
        padding: cfg.padding,
        dilation: cfg.dilation,
        groups: cfg.groups,
    }
}

/// An adder layer with the geometry of a convolution (any kernel, stride, padding, dilation,
/// groups), optionally with a bias.
pub struct AdderConv2d {
    pub weight: Var,
    pub bias: Option<Var>,
    pub config: Conv2dConfig,
    name: String,
}

impl AdderConv2d {
    pub fn new(vp: &VarPath, config: Conv2dConfig, registry: Option<&AdderRegistry>) -> Result<Self> {
        config.validate()?;
        let weight = vp.param("weight", &config.weight_dims(), ADDER_INIT, ParamKind::Weight)?;
        let bias = if config.bias {
            Some(vp.param("bias", &[config.out_channels], Init::ZEROS, ParamKind::Bias)?)
        } else {
            None
        };
        let name = vp.prefix().to_string();
        if let Some(r) = registry {
            r.register(&name, &weight);
        }
        Ok(Self {
            weight,
            bias,
            config,
            name,
        })
    }
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl ModuleT for AdderConv2d {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        if x.rank() != 4 || x.dims()[1] != self.config.in_channels {
            candle_core::bail!(
                "{}: expected an NCHW input with {} channels, got shape {:?}",
                self.name,
                self.config.in_channels,
                x.dims()
            );
        }
        let y = adder2d(x, self.weight.as_tensor(), opts(&self.config))?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.as_tensor().reshape((1, self.config.out_channels, 1, 1))?)?,
            None => y,
        };
        if summary::is_recording() {
            let (oh, ow) = (y.dims()[2], y.dims()[3]);
            summary::record(|| LayerStat {
                name: self.name.clone(),
                kind: "AdderConv2d".into(),
                out_shape: y.dims().to_vec(),
                params: self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count()),
                additions: 2 * self.config.macs(oh, ow),
                ..Default::default()
            });
        }
        Ok(y)
    }
}

/// A fully connected adder layer over `[B, in]`: `y[b, t] = -sum_k |x[b, k] - W[t, k]| (+ bias)`.
/// Runs the adder kernel with the batch laid out as the pixels of one image, so small batches
/// still fill whole tiles.
pub struct AdderLinear {
    pub weight: Var,
    pub bias: Option<Var>,
    in_features: usize,
    out_features: usize,
    name: String,
}

impl AdderLinear {
    pub fn new(vp: &VarPath, in_features: usize, out_features: usize, bias: bool, registry: Option<&AdderRegistry>) -> Result<Self> {
        if in_features == 0 || out_features == 0 {
            candle_core::bail!("adder linear {}: features must be positive", vp.prefix());
        }
        let weight = vp.param("weight", &[out_features, in_features], ADDER_INIT, ParamKind::Weight)?;
        let bias = if bias {
            Some(vp.param("bias", &[out_features], Init::ZEROS, ParamKind::Bias)?)
        } else {
            None
        };
        let name = vp.prefix().to_string();
        if let Some(r) = registry {
            r.register(&name, &weight);
        }
        Ok(Self {
            weight,
            bias,
            in_features,
            out_features,
            name,
        })
    }
}

impl ModuleT for AdderLinear {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        if x.rank() != 2 || x.dims()[1] != self.in_features {
            candle_core::bail!("{}: expected [B, {}], got shape {:?}", self.name, self.in_features, x.dims());
        }
        let b = x.dims()[0];
        let xt = x.t()?.contiguous()?.reshape((1, self.in_features, 1, b))?;
        let w = self.weight.as_tensor().reshape((self.out_features, self.in_features, 1, 1))?;
        let y = adder2d(&xt, &w, Conv2dOpts::default())?.reshape((self.out_features, b))?.t()?;
        let y = match &self.bias {
            Some(bb) => y.broadcast_add(bb.as_tensor())?,
            None => y,
        };
        if summary::is_recording() {
            summary::record(|| LayerStat {
                name: self.name.clone(),
                kind: "AdderLinear".into(),
                out_shape: y.dims().to_vec(),
                params: self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count()),
                additions: 2 * (self.in_features * self.out_features) as u64,
                ..Default::default()
            });
        }
        Ok(y)
    }
}
