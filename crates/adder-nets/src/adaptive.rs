//! The adaptive learning rate of AdderNet (Eq. (12)-(13)): the update of the filters `F_l` of
//! adder layer `l` is `dF_l = gamma * alpha_l * dL/dF_l` with the local rate
//! `alpha_l = eta * sqrt(k) / ||dL/dF_l||_2` (`k` the number of elements of `F_l`, `eta` a
//! hyperparameter, 0.2 in the released code), so every adder layer moves by the same
//! relative amount whatever the magnitude of its (full-precision) gradient.
//!
//! [`AdaptiveLr`] is an nn-core training [`Callback`]: after backward and before the optimizer
//! step it multiplies the gradient of every registered adder filter by `alpha_l`; the global
//! rate `gamma` (schedule), momentum and weight decay then act as usual.

use crate::layer::AdderRegistry;
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use nn_core::train::{Callback, StepContext};
use std::sync::Arc;

/// `alpha = eta * sqrt(k) / ||grad||_2` for one layer's filter gradient (`k = grad.elem_count()`);
/// a zero gradient gives `alpha = 0` (nothing to scale).
pub fn adaptive_alpha(grad: &Tensor, eta: f64) -> Result<f64> {
    let norm = grad.to_dtype(DType::F64)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    if !norm.is_finite() {
        candle_core::bail!("adaptive learning rate: non-finite gradient norm {norm}");
    }
    if norm == 0.0 {
        return Ok(0.0);
    }
    Ok(eta * (grad.elem_count() as f64).sqrt() / norm)
}

/// `alpha * grad` (Eq. (13)).
pub fn scale_gradient(grad: &Tensor, eta: f64) -> Result<Tensor> {
    let a = adaptive_alpha(grad, eta)?;
    grad.affine(a, 0.0)
}

/// Training callback applying the adaptive learning rate to every adder filter of a model.
pub struct AdaptiveLr {
    pub eta: f64,
    registry: Arc<AdderRegistry>,
}

impl AdaptiveLr {
    pub fn new(registry: Arc<AdderRegistry>, eta: f64) -> Self {
        Self { eta, registry }
    }

    /// Scales the registered filters' gradients in `grads`; returns how many were scaled.
    pub fn apply(&self, grads: &mut GradStore) -> Result<usize> {
        let mut n = 0;
        for (_, v) in self.registry.weights() {
            if let Some(g) = grads.get(v.as_tensor()) {
                let s = scale_gradient(g, self.eta)?;
                grads.insert(v.as_tensor(), s);
                n += 1;
            }
        }
        Ok(n)
    }
}

impl Callback for AdaptiveLr {
    fn name(&self) -> String {
        "adder-adaptive-lr".into()
    }
    fn after_backward(&mut self, _step: &StepContext, grads: &mut GradStore) -> anyhow::Result<()> {
        self.apply(grads)?;
        Ok(())
    }
}
