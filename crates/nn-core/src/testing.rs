//! Test utilities shared by every crate of the workspace: finite-difference gradient checks and
//! the "every parameter gets a gradient" check, the largest elementwise difference.

use crate::model::Model;
use crate::var_store::VarStore;
use candle_core::{DType, Result, Tensor, Var};

/// Compares the autograd gradient of `f` (a scalar function) at `x` with central finite
/// differences of step `eps`. Fails when `|analytic - numeric| > tol * max(1, |numeric|)` for any
/// element. Works in f32 and f64 (use f64 for tight tolerances).
pub fn check_gradient(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>, eps: f64, tol: f64) -> Result<()> {
    let var = Var::from_tensor(x)?;
    let y = f(var.as_tensor())?;
    if y.elem_count() != 1 {
        candle_core::bail!("check_gradient: f must return a scalar, got shape {:?}", y.dims());
    }
    let grads = y.backward()?;
    let analytic = match grads.get(var.as_tensor()) {
        Some(g) => g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
        None => vec![0.0; x.elem_count()],
    };
    let base = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    for i in 0..base.len() {
        let eval = |delta: f64| -> Result<f64> {
            let mut v = base.clone();
            v[i] += delta;
            let t = Tensor::from_vec(v, x.dims(), x.device())?.to_dtype(x.dtype())?;
            f(&t)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>().map(|v| v[0])
        };
        let numeric = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
        let err = (analytic[i] - numeric).abs();
        if !(err <= tol * numeric.abs().max(1.0)) {
            candle_core::bail!(
                "gradient mismatch at element {i}: analytic {} vs finite difference {numeric} (tolerance {tol})",
                analytic[i]
            );
        }
    }
    Ok(())
}

/// Runs one forward and backward pass of `model` on `input` (training mode) and checks that
/// every trainable parameter of `vs` received a finite gradient that is not all zeros.
/// Returns the names of offending parameters in the error.
pub fn check_all_params_get_gradients(model: &dyn Model, vs: &VarStore, input: &Tensor) -> Result<()> {
    let logits = model.forward_t(input, true)?;
    // A loss whose gradient reaches every logit with different weights.
    let n = logits.elem_count();
    let w: Vec<f32> = (0..n).map(|i| ((i * 7919 % 13) as f32 - 6.0) / 6.0).collect();
    let w = Tensor::from_vec(w, logits.dims(), logits.device())?.to_dtype(logits.dtype())?;
    let loss = (logits.mul(&w)?.sum_all()? + logits.sqr()?.mean_all()?)?;
    let grads = loss.backward()?;
    let mut bad = Vec::new();
    for p in vs.trainable() {
        match grads.get(p.var.as_tensor()) {
            None => bad.push(format!("{} (no gradient)", p.name)),
            Some(g) => {
                let v = g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                if v.iter().any(|x| !x.is_finite()) {
                    bad.push(format!("{} (non-finite gradient)", p.name));
                } else if v.iter().all(|&x| x == 0.0) {
                    bad.push(format!("{} (all-zero gradient)", p.name));
                }
            }
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        candle_core::bail!(
            "{} of {} parameters of {} get no usable gradient: {}",
            bad.len(),
            vs.trainable().len(),
            model.name(),
            bad.join(", ")
        )
    }
}

/// Largest absolute elementwise difference of two tensors of the same shape (as f32).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F32)?.to_scalar::<f32>()
}
