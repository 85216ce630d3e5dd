//! Fully connected layer `y = x W^T + b`.

use crate::init::Init;
use crate::summary::{self, LayerStat};
use crate::var_store::{ParamKind, VarPath};
use candle_core::{Result, Tensor, Var};
use candle_nn::ModuleT;

/// A linear layer over the last dimension of its input.
#[derive(Clone)]
pub struct Linear {
    pub weight: Var,
    pub bias: Option<Var>,
    name: String,
}

impl Linear {
    /// PyTorch-default initialisation (uniform with bound 1/sqrt(in)) for weight and bias.
    pub fn new(vp: &VarPath, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        Self::with_init(vp, in_features, out_features, bias, Init::TORCH_DEFAULT)
    }

    /// A linear layer with a chosen weight initialisation (bias as in PyTorch).
    pub fn with_init(vp: &VarPath, in_features: usize, out_features: usize, bias: bool, init: Init) -> Result<Self> {
        let weight = vp.param("weight", &[out_features, in_features], init, ParamKind::Weight)?;
        let bias = if bias {
            let b = 1.0 / (in_features.max(1) as f64).sqrt();
            Some(vp.param("bias", &[out_features], Init::Uniform { lo: -b, hi: b }, ParamKind::Bias)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            name: vp.prefix().to_string(),
        })
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
}

impl ModuleT for Linear {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        if x.rank() == 0 {
            candle_core::bail!("linear layer {}: scalar input", self.name);
        }
        // fused product + bias (row-parallel on CPU, see crate::ops::linear)
        let y = crate::ops::linear::linear(x, self.weight.as_tensor(), self.bias.as_ref().map(|b| b.as_tensor()))?;
        if summary::is_recording() {
            // positions per sample: the dims between the batch and the features (1 for [B, F]
            // or an unbatched [F])
            let tokens: usize = x
                .dims()
                .get(1..x.rank().saturating_sub(1))
                .map_or(1, |d| d.iter().product::<usize>().max(1));
            summary::record(|| LayerStat {
                name: self.name.clone(),
                kind: "Linear".into(),
                out_shape: y.dims().to_vec(),
                params: self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count()),
                macs: (tokens * self.in_features() * self.out_features()) as u64,
                ..Default::default()
            });
        }
        Ok(y)
    }
}
