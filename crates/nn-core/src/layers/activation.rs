//! Element-wise activations as a named, swappable component.

use candle_core::{Result, Tensor};
use candle_nn::ModuleT;

/// An element-wise activation function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Identity,
    Relu,
    /// ReLU6 (MobileNet): min(max(x, 0), 6).
    Relu6,
    LeakyRelu(f64),
    /// Exact GELU, x * Phi(x).
    Gelu,
    /// GELU with the tanh approximation.
    GeluTanh,
    Sigmoid,
    Tanh,
    /// Hard tanh: clamp(x, -1, 1).
    Hardtanh,
    /// SiLU / swish: x * sigmoid(x).
    Silu,
    /// Hard swish (MobileNetV3): x * relu6(x + 3) / 6.
    Hardswish,
}

impl Activation {
    /// Applies the activation.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match *self {
            Activation::Identity => Ok(x.clone()),
            Activation::Relu => crate::ops::activation::relu(x),
            Activation::Relu6 => x.clamp(0f32, 6f32),
            Activation::LeakyRelu(slope) => {
                let pos = x.relu()?;
                let neg = (x - &pos)?;
                pos + (neg * slope)?
            }
            Activation::Gelu => crate::ops::rowwise::gelu_erf(x),
            Activation::GeluTanh => x.gelu(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(x),
            Activation::Tanh => x.tanh(),
            Activation::Hardtanh => x.clamp(-1f32, 1f32),
            Activation::Silu => x.silu(),
            Activation::Hardswish => x.mul(&((x + 3.0)?.clamp(0f32, 6f32)? / 6.0)?),
        }
    }
}

impl ModuleT for Activation {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        self.apply(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::check_gradient;
    use candle_core::Device;

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let x = Tensor::new(&[-2.3f64, -0.7, -0.2, 0.3, 0.9, 1.7, 4.0], &Device::Cpu)?;
        for act in [
            Activation::Relu,
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Sigmoid,
            Activation::Tanh,
            Activation::Silu,
            Activation::LeakyRelu(0.1),
            Activation::Hardtanh,
            Activation::Hardswish,
        ] {
            check_gradient(&x, |x| act.apply(x)?.sqr()?.sum_all(), 1e-6, 1e-4)
                .map_err(|e| candle_core::Error::Msg(format!("{act:?}: {e}")))?;
        }
        Ok(())
    }
}
