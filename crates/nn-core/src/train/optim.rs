//! Optimizers with PyTorch update semantics.
//!
//! Both optimizers take the parameters as the [`NamedVar`]s of [`crate::VarStore::trainable`],
//! update them in place with [`candle_core::Var::set`] on detached tensors (no autograd graph is
//! recorded for the update), skip parameters that received no gradient in a step, and expose
//! their state as tensors keyed by `"{param_name}.{slot}"` for checkpoints.
//!
//! ## SGD (`torch.optim.SGD`, dampening 0)
//! With gradient `g`, parameter `p`, learning rate `lr`, momentum `mu`, weight decay `wd`:
//! ```text
//! g   = g + wd * p                      (if wd != 0 and decay applies to p)
//! buf = g                               (first step)
//! buf = mu * buf + g                    (later steps; only if mu != 0)
//! g   = g + mu * buf   (Nesterov)   or   g = buf   (plain momentum)
//! p   = p - lr * g
//! ```
//!
//! ## AdamW (`torch.optim.AdamW`, no amsgrad)
//! With step count `t` (per parameter, starting at 1):
//! ```text
//! p  = p * (1 - lr * wd)                (decoupled decay, if decay applies to p)
//! m  = b1 * m + (1 - b1) * g
//! v  = b2 * v + (1 - b2) * g^2
//! p  = p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```

use crate::var_store::NamedVar;
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A first-order optimizer over a fixed list of named parameters.
pub trait Optimizer: Send {
    /// Applies one update using the gradients in `grads`; parameters without a gradient are
    /// left unchanged (and their state is not advanced).
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    /// The current learning rate.
    fn lr(&self) -> f64;
    /// Sets the learning rate used by the next [`Optimizer::step`].
    fn set_lr(&mut self, lr: f64);
    /// The parameters this optimizer updates.
    fn params(&self) -> &[NamedVar];
    /// A copy of the optimizer state, keyed `"{param_name}.{slot}"` (e.g.
    /// `conv1.weight.momentum_buffer`, `fc.bias.exp_avg`, `fc.bias.step`).
    fn state_tensors(&self) -> Result<HashMap<String, Tensor>>;
    /// Restores state produced by [`Optimizer::state_tensors`]. Every key must belong to a
    /// parameter of this optimizer and shapes must match; parameters absent from `state` start
    /// fresh. Nothing is changed if a check fails.
    fn load_state_tensors(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;
}

/// A serialisable description of an optimizer; [`OptimizerConfig::build`] makes one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerConfig {
    /// Stochastic gradient descent (see [`Sgd`]).
    Sgd {
        /// Base learning rate (the schedule multiplies or replaces it per iteration).
        lr: f64,
        /// Momentum factor `mu` (0 disables the buffer).
        #[serde(default)]
        momentum: f64,
        /// Nesterov momentum (requires `momentum > 0`).
        #[serde(default)]
        nesterov: bool,
        /// L2 weight decay added to the gradient.
        #[serde(default)]
        weight_decay: f64,
        /// Apply weight decay only to [`crate::ParamKind::Weight`] parameters (biases and
        /// normalisation parameters are not decayed).
        #[serde(default)]
        no_decay_bias_norm: bool,
    },
    /// AdamW (see [`AdamW`]).
    AdamW {
        /// Base learning rate.
        lr: f64,
        /// First-moment decay `b1` (PyTorch default 0.9).
        beta1: f64,
        /// Second-moment decay `b2` (PyTorch default 0.999).
        beta2: f64,
        /// Denominator epsilon (PyTorch default 1e-8).
        eps: f64,
        /// Decoupled weight decay (PyTorch default 0.01).
        weight_decay: f64,
        /// Decay only [`crate::ParamKind::Weight`] parameters.
        #[serde(default)]
        no_decay_bias_norm: bool,
    },
}

impl OptimizerConfig {
    /// SGD with momentum 0.9, weight decay `wd`, no Nesterov, decay on all parameters
    /// (the usual CIFAR ResNet recipe is `sgd(0.1, 5e-4)` or `sgd(0.1, 1e-4)`).
    pub fn sgd(lr: f64, weight_decay: f64) -> Self {
        OptimizerConfig::Sgd {
            lr,
            momentum: 0.9,
            nesterov: false,
            weight_decay,
            no_decay_bias_norm: false,
        }
    }

    /// [`sgd`](Self::sgd) with Nesterov momentum (the training recipe of most runners here).
    pub fn sgd_nesterov(lr: f64, weight_decay: f64) -> Self {
        OptimizerConfig::Sgd {
            lr,
            momentum: 0.9,
            nesterov: true,
            weight_decay,
            no_decay_bias_norm: false,
        }
    }

    /// AdamW with PyTorch's default betas and eps.
    pub fn adamw(lr: f64, weight_decay: f64) -> Self {
        OptimizerConfig::AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            no_decay_bias_norm: false,
        }
    }

    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerConfig::Sgd { lr, .. } | OptimizerConfig::AdamW { lr, .. } => *lr,
        }
    }

    /// `"sgd"` or `"adamw"`.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerConfig::Sgd { .. } => "sgd",
            OptimizerConfig::AdamW { .. } => "adamw",
        }
    }

    /// Builds the optimizer over `params` (usually `vs.trainable()`).
    pub fn build(&self, params: Vec<NamedVar>) -> Result<Box<dyn Optimizer>> {
        Ok(match *self {
            OptimizerConfig::Sgd {
                lr,
                momentum,
                nesterov,
                weight_decay,
                no_decay_bias_norm,
            } => Box::new(Sgd::new(
                params,
                SgdParams {
                    lr,
                    momentum,
                    nesterov,
                    weight_decay,
                    no_decay_bias_norm,
                },
            )?),
            OptimizerConfig::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                no_decay_bias_norm,
            } => Box::new(AdamW::new(
                params,
                AdamWParams {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    no_decay_bias_norm,
                },
            )?),
        })
    }
}

/// Whether weight decay applies to `p` given the "exclude biases and norms" flag.
fn decays(p: &NamedVar, no_decay_bias_norm: bool) -> bool {
    !no_decay_bias_norm || p.kind.decays_by_default()
}

/// The gradient of `p` in `grads`, detached, with the parameter's dtype.
fn grad_of(grads: &GradStore, p: &NamedVar) -> Result<Option<Tensor>> {
    match grads.get(p.var.as_tensor()) {
        None => Ok(None),
        Some(g) => {
            if g.dims() != p.var.dims() {
                candle_core::bail!(
                    "gradient of `{}` has shape {:?}, parameter has {:?}",
                    p.name,
                    g.dims(),
                    p.var.dims()
                );
            }
            Ok(Some(g.detach().to_dtype(p.var.dtype())?))
        }
    }
}

fn check_and_collect(
    params: &[NamedVar],
    state: &HashMap<String, Tensor>,
    slots: &[&str],
    what: &str,
) -> Result<Vec<(usize, usize, Tensor)>> {
    let mut plan = Vec::new();
    let mut used = 0;
    for (i, p) in params.iter().enumerate() {
        for (s, slot) in slots.iter().enumerate() {
            let key = format!("{}.{slot}", p.name);
            if let Some(t) = state.get(&key) {
                used += 1;
                let expect: Vec<usize> = if *slot == "step" { vec![1] } else { p.var.dims().to_vec() };
                if t.dims() != expect.as_slice() {
                    candle_core::bail!("{what} state `{key}` has shape {:?}, expected {:?}", t.dims(), expect);
                }
                plan.push((i, s, t.clone()));
            }
        }
    }
    if used != state.len() {
        let known: std::collections::HashSet<String> = params
            .iter()
            .flat_map(|p| slots.iter().map(move |s| format!("{}.{s}", p.name)))
            .collect();
        let unknown = state.keys().find(|k| !known.contains(*k)).cloned().unwrap_or_default();
        candle_core::bail!("{what} state has `{unknown}`, which belongs to no parameter of this optimizer");
    }
    Ok(plan)
}

/// Hyper-parameters of [`Sgd`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdParams {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0: no momentum buffer).
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f64,
    /// Decay only `ParamKind::Weight` parameters.
    pub no_decay_bias_norm: bool,
}

/// SGD with momentum (dampening 0), optional Nesterov and L2 weight decay (PyTorch semantics,
/// see the [module docs](self)).
pub struct Sgd {
    params: Vec<NamedVar>,
    hp: SgdParams,
    /// Momentum buffers, created on a parameter's first update.
    buffers: Vec<Option<Tensor>>,
}

impl Sgd {
    /// SGD over `params`. Fails on a negative lr/momentum/decay or Nesterov without momentum.
    pub fn new(params: Vec<NamedVar>, hp: SgdParams) -> Result<Self> {
        if hp.lr < 0.0 || hp.momentum < 0.0 || hp.weight_decay < 0.0 {
            candle_core::bail!("SGD: lr, momentum and weight decay must be >= 0, got {hp:?}");
        }
        if hp.nesterov && hp.momentum <= 0.0 {
            candle_core::bail!("SGD: Nesterov momentum requires momentum > 0");
        }
        let buffers = vec![None; params.len()];
        Ok(Self { params, hp, buffers })
    }

    /// The hyper-parameters.
    pub fn hyper_params(&self) -> &SgdParams {
        &self.hp
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let hp = self.hp;
        for (p, buf) in self.params.iter().zip(self.buffers.iter_mut()) {
            let Some(mut g) = grad_of(grads, p)? else { continue };
            let w = p.var.as_tensor().detach();
            if hp.weight_decay != 0.0 && decays(p, hp.no_decay_bias_norm) {
                g = (g + w.affine(hp.weight_decay, 0.0)?)?;
            }
            if hp.momentum != 0.0 {
                let b = match buf.take() {
                    None => g.copy()?,
                    Some(b) => (b.affine(hp.momentum, 0.0)? + &g)?,
                };
                g = if hp.nesterov {
                    (g + b.affine(hp.momentum, 0.0)?)?
                } else {
                    b.clone()
                };
                *buf = Some(b);
            }
            let new = (w - g.affine(hp.lr, 0.0)?)?;
            p.var.set(&new)?;
        }
        Ok(())
    }

    fn lr(&self) -> f64 {
        self.hp.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.hp.lr = lr;
    }

    fn params(&self) -> &[NamedVar] {
        &self.params
    }

    fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut m = HashMap::new();
        for (p, b) in self.params.iter().zip(&self.buffers) {
            if let Some(b) = b {
                m.insert(format!("{}.momentum_buffer", p.name), b.copy()?);
            }
        }
        Ok(m)
    }

    fn load_state_tensors(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let plan = check_and_collect(&self.params, state, &["momentum_buffer"], "SGD")?;
        self.buffers = vec![None; self.params.len()];
        for (i, _, t) in plan {
            let dt = self.params[i].var.dtype();
            self.buffers[i] = Some(t.to_device(self.params[i].var.device())?.to_dtype(dt)?.detach());
        }
        Ok(())
    }
}

/// Hyper-parameters of [`AdamW`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Decay only `ParamKind::Weight` parameters.
    pub no_decay_bias_norm: bool,
}

#[derive(Clone)]
struct AdamSlot {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW with decoupled weight decay and bias correction (PyTorch semantics, see the
/// [module docs](self)). The step count is kept per parameter, so parameters that miss a
/// gradient in some steps get the same bias correction as in PyTorch.
pub struct AdamW {
    params: Vec<NamedVar>,
    hp: AdamWParams,
    slots: Vec<Option<AdamSlot>>,
}

impl AdamW {
    /// AdamW over `params`. Fails on betas outside [0, 1) or a negative lr/eps/decay.
    pub fn new(params: Vec<NamedVar>, hp: AdamWParams) -> Result<Self> {
        if !(0.0..1.0).contains(&hp.beta1) || !(0.0..1.0).contains(&hp.beta2) {
            candle_core::bail!("AdamW: betas must be in [0, 1), got {} and {}", hp.beta1, hp.beta2);
        }
        if hp.lr < 0.0 || hp.eps < 0.0 || hp.weight_decay < 0.0 {
            candle_core::bail!("AdamW: lr, eps and weight decay must be >= 0, got {hp:?}");
        }
        let slots = vec![None; params.len()];
        Ok(Self { params, hp, slots })
    }

    /// The hyper-parameters.
    pub fn hyper_params(&self) -> &AdamWParams {
        &self.hp
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let hp = self.hp;
        for (p, slot) in self.params.iter().zip(self.slots.iter_mut()) {
            let Some(g) = grad_of(grads, p)? else { continue };
            let mut w = p.var.as_tensor().detach();
            if hp.weight_decay != 0.0 && decays(p, hp.no_decay_bias_norm) {
                w = w.affine(1.0 - hp.lr * hp.weight_decay, 0.0)?;
            }
            let s = match slot.take() {
                Some(s) => s,
                None => AdamSlot {
                    step: 0,
                    exp_avg: g.zeros_like()?,
                    exp_avg_sq: g.zeros_like()?,
                },
            };
            let step = s.step + 1;
            let m = (s.exp_avg.affine(hp.beta1, 0.0)? + g.affine(1.0 - hp.beta1, 0.0)?)?;
            let v = (s.exp_avg_sq.affine(hp.beta2, 0.0)? + g.sqr()?.affine(1.0 - hp.beta2, 0.0)?)?;
            let bc1 = 1.0 - hp.beta1.powi(step as i32);
            let bc2 = 1.0 - hp.beta2.powi(step as i32);
            let denom = v.sqrt()?.affine(1.0 / bc2.sqrt(), hp.eps)?;
            let new = (w - m.div(&denom)?.affine(hp.lr / bc1, 0.0)?)?;
            p.var.set(&new)?;
            *slot = Some(AdamSlot {
                step,
                exp_avg: m,
                exp_avg_sq: v,
            });
        }
        Ok(())
    }

    fn lr(&self) -> f64 {
        self.hp.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.hp.lr = lr;
    }

    fn params(&self) -> &[NamedVar] {
        &self.params
    }

    fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut m = HashMap::new();
        for (p, s) in self.params.iter().zip(&self.slots) {
            if let Some(s) = s {
                let dev = p.var.device();
                m.insert(format!("{}.step", p.name), Tensor::new(&[s.step as f64], dev)?);
                m.insert(format!("{}.exp_avg", p.name), s.exp_avg.copy()?);
                m.insert(format!("{}.exp_avg_sq", p.name), s.exp_avg_sq.copy()?);
            }
        }
        Ok(m)
    }

    fn load_state_tensors(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let plan = check_and_collect(&self.params, state, &["step", "exp_avg", "exp_avg_sq"], "AdamW")?;
        let mut parts: Vec<[Option<Tensor>; 3]> = vec![[None, None, None]; self.params.len()];
        for (i, s, t) in plan {
            parts[i][s] = Some(t);
        }
        let mut slots = vec![None; self.params.len()];
        for (i, [step, m, v]) in parts.into_iter().enumerate() {
            let p = &self.params[i];
            match (step, m, v) {
                (None, None, None) => {}
                (Some(step), Some(m), Some(v)) => {
                    let step = step.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
                    if !(step >= 1.0 && step.fract() == 0.0) {
                        candle_core::bail!("AdamW state `{}.step` is {step}, expected a positive integer", p.name);
                    }
                    let (dev, dt) = (p.var.device(), p.var.dtype());
                    slots[i] = Some(AdamSlot {
                        step: step as u64,
                        exp_avg: m.to_device(dev)?.to_dtype(dt)?.detach(),
                        exp_avg_sq: v.to_device(dev)?.to_dtype(dt)?.detach(),
                    });
                }
                _ => candle_core::bail!("AdamW state of `{}` is incomplete (needs step, exp_avg and exp_avg_sq)", p.name),
            }
        }
        self.slots = slots;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::Init;
    use crate::var_store::{ParamKind, VarStore};
    use candle_core::{Device, Var};

    /// A store with a weight [2] and a bias [1], and a "loss" whose gradient is a fixed vector.
    fn setup() -> Result<(VarStore, Var, Var)> {
        let vs = VarStore::new(0, &Device::Cpu);
        let w = vs.insert("w", &Tensor::new(&[1.0f32, -2.0], &Device::Cpu)?, ParamKind::Weight)?;
        let b = vs.insert("b", &Tensor::new(&[0.5f32], &Device::Cpu)?, ParamKind::Bias)?;
        let _ = Init::ZEROS;
        Ok((vs, w, b))
    }

    /// Gradients of sum(c_w * w) + sum(c_b * b) are c_w and c_b.
    fn grads(w: &Var, b: &Var, cw: [f32; 2], cb: f32) -> Result<GradStore> {
        let dev = Device::Cpu;
        let l = (w.as_tensor().mul(&Tensor::new(&cw, &dev)?)?.sum_all()? + b.as_tensor().affine(cb as f64, 0.0)?.sum_all()?)?;
        l.backward()
    }

    fn close(a: &Tensor, b: &[f64], tol: f64) -> Result<()> {
        let a = a.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{a:?} vs {b:?}");
        }
        assert_eq!(a.len(), b.len());
        Ok(())
    }

    #[test]
    fn sgd_momentum_nesterov_weight_decay_match_pytorch_semantics() -> Result<()> {
        for nesterov in [false, true] {
            let (vs, w, b) = setup()?;
            let mut opt = OptimizerConfig::Sgd {
                lr: 0.1,
                momentum: 0.9,
                nesterov,
                weight_decay: 0.01,
                no_decay_bias_norm: true,
            }
            .build(vs.trainable())?;
            // hand-computed reference
            let (lr, mu, wd) = (0.1f64, 0.9f64, 0.01f64);
            let mut pw = [1.0f64, -2.0];
            let mut pb = 0.5f64;
            let mut bw = [0.0f64; 2];
            let mut bb = 0.0f64;
            let gs = [([0.3f32, -0.7], 1.5f32), ([-0.2, 0.4], -0.5), ([1.0, 1.0], 0.25)];
            for (k, (cw, cb)) in gs.iter().enumerate() {
                opt.step(&grads(&w, &b, *cw, *cb)?)?;
                for i in 0..2 {
                    let g = cw[i] as f64 + wd * pw[i];
                    bw[i] = if k == 0 { g } else { mu * bw[i] + g };
                    let d = if nesterov { g + mu * bw[i] } else { bw[i] };
                    pw[i] -= lr * d;
                }
                // bias: no decay
                let g = *cb as f64;
                bb = if k == 0 { g } else { mu * bb + g };
                let d = if nesterov { g + mu * bb } else { bb };
                pb -= lr * d;
                close(w.as_tensor(), &pw, 1e-6)?;
                close(b.as_tensor(), &[pb], 1e-6)?;
            }
            let st = opt.state_tensors()?;
            close(&st["w.momentum_buffer"], &bw, 1e-6)?;
        }
        Ok(())
    }

    #[test]
    fn plain_sgd_and_skipped_parameters() -> Result<()> {
        let (vs, w, b) = setup()?;
        let mut opt = Sgd::new(
            vs.trainable(),
            SgdParams {
                lr: 0.5,
                momentum: 0.0,
                nesterov: false,
                weight_decay: 0.1,
                no_decay_bias_norm: false,
            },
        )?;
        // only w gets a gradient
        let g = w
            .as_tensor()
            .mul(&Tensor::new(&[1.0f32, 2.0], &Device::Cpu)?)?
            .sum_all()?
            .backward()?;
        opt.step(&g)?;
        close(w.as_tensor(), &[1.0 - 0.5 * (1.0 + 0.1), -2.0 - 0.5 * (2.0 - 0.2)], 1e-6)?;
        close(b.as_tensor(), &[0.5], 0.0 + 1e-12)?;
        assert!(opt.state_tensors()?.is_empty());
        assert!(Sgd::new(
            vs.trainable(),
            SgdParams {
                nesterov: true,
                ..*opt.hyper_params()
            }
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn adamw_matches_pytorch_semantics() -> Result<()> {
        let (vs, w, b) = setup()?;
        let (lr, b1, b2, eps, wd) = (0.01f64, 0.9f64, 0.99f64, 1e-8f64, 0.1f64);
        let mut opt = OptimizerConfig::AdamW {
            lr,
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
            no_decay_bias_norm: true,
        }
        .build(vs.trainable())?;
        let mut p = [1.0f64, -2.0, 0.5];
        let mut m = [0.0f64; 3];
        let mut v = [0.0f64; 3];
        let mut t = [0i32; 3];
        let gs = [([0.3f32, -0.7], Some(1.5f32)), ([-0.2, 0.4], None), ([1.0, 1.0], Some(0.25))];
        for (cw, cb) in gs {
            let g = match cb {
                Some(cb) => grads(&w, &b, cw, cb)?,
                None => w.as_tensor().mul(&Tensor::new(&cw, &Device::Cpu)?)?.sum_all()?.backward()?,
            };
            opt.step(&g)?;
            let gv = [cw[0] as f64, cw[1] as f64, cb.unwrap_or(0.0) as f64];
            for i in 0..3 {
                if i == 2 && cb.is_none() {
                    continue;
                }
                t[i] += 1;
                if i < 2 {
                    p[i] *= 1.0 - lr * wd;
                }
                m[i] = b1 * m[i] + (1.0 - b1) * gv[i];
                v[i] = b2 * v[i] + (1.0 - b2) * gv[i] * gv[i];
                let bc1 = 1.0 - b1.powi(t[i]);
                let bc2 = 1.0 - b2.powi(t[i]);
                p[i] -= lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + eps);
            }
            close(w.as_tensor(), &p[..2], 1e-6)?;
            close(b.as_tensor(), &p[2..], 1e-6)?;
        }
        let st = opt.state_tensors()?;
        close(&st["b.step"], &[2.0], 0.0 + 1e-12)?;
        close(&st["w.step"], &[3.0], 1e-12)?;
        close(&st["w.exp_avg_sq"], &v[..2], 1e-6)?;
        Ok(())
    }

    #[test]
    fn state_roundtrip_continues_identically_and_rejects_bad_state() -> Result<()> {
        for cfg in [OptimizerConfig::sgd(0.1, 1e-3), OptimizerConfig::adamw(0.01, 0.05)] {
            let (vs, w, b) = setup()?;
            let mut a = cfg.build(vs.trainable())?;
            a.step(&grads(&w, &b, [0.3, -0.7], 1.5)?)?;
            let snapshot = vs.tensors();
            let state = a.state_tensors()?;
            a.step(&grads(&w, &b, [0.1, 0.2], -0.3)?)?;
            let after_a = w.as_tensor().to_vec1::<f32>()?;

            // a fresh optimizer with the restored state does the same second step
            vs.load_tensors(&snapshot, true)?;
            let mut c = cfg.build(vs.trainable())?;
            c.load_state_tensors(&state)?;
            c.step(&grads(&w, &b, [0.1, 0.2], -0.3)?)?;
            assert_eq!(w.as_tensor().to_vec1::<f32>()?, after_a);

            let mut bad = state.clone();
            bad.insert("nope.exp_avg".into(), Tensor::zeros(2, DType::F32, &Device::Cpu)?);
            bad.insert("nope.momentum_buffer".into(), Tensor::zeros(2, DType::F32, &Device::Cpu)?);
            assert!(c.load_state_tensors(&bad).is_err());
            let mut bad = state.clone();
            let k = bad.keys().find(|k| k.starts_with("w.") && !k.ends_with("step")).unwrap().clone();
            bad.insert(k, Tensor::zeros(3, DType::F32, &Device::Cpu)?);
            assert!(c.load_state_tensors(&bad).unwrap_err().to_string().contains("shape"));
        }
        Ok(())
    }
}
