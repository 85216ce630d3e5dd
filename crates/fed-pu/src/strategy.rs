//! Server strategies: how client replies become the next global model.
//!
//! - FedAvg (McMahan et al. 2017): `w = sum_k (n_k / n) w_k`, `n = sum_k n_k`, over the
//!   sampled clients' replies. Accumulated in `f64` in the order given (the engine passes
//!   replies sorted by client id), so the result does not depend on which thread finished
//!   first.
//! - FedProx (Li et al. 2020): the same aggregation; the difference is on the client, whose
//!   local objective gains `mu/2 * ||w - w_global||^2` (applied as the gradient term
//!   `mu * (w - w_global)`, see [`crate::engine`]).

use crate::message::Weights;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// The federated optimisation strategy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Strategy {
    /// FedAvg, replies weighted by their example counts.
    FedAvg,
    /// FedProx with proximal weight `mu` (FedAvg aggregation).
    FedProx {
        /// Proximal term weight.
        mu: f64,
    },
}

impl Strategy {
    /// The proximal weight (0 for FedAvg).
    pub fn mu(&self) -> f64 {
        match self {
            Strategy::FedAvg => 0.0,
            Strategy::FedProx { mu } => *mu,
        }
    }
    /// `fedavg` or `fedprox`.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::FedAvg => "fedavg",
            Strategy::FedProx { .. } => "fedprox",
        }
    }
}

/// Weighted mean of `replies` (`(examples, weights)`), accumulated in `f64` in the given order.
/// Every reply must have the same names and shapes. Replies with 0 examples are ignored; fails
/// when no reply has examples.
pub fn weighted_average(replies: &[(u64, Weights)]) -> Result<Weights> {
    let total: u64 = replies.iter().map(|(n, _)| *n).sum();
    if total == 0 {
        bail!("no client reply carries examples");
    }
    let first = &replies.iter().find(|(n, _)| *n > 0).expect("total > 0").1;
    let mut out = Weights::new();
    for (name, t0) in first {
        let len = t0.elem_count();
        let mut acc = vec![0f64; len];
        for (n, w) in replies {
            if *n == 0 {
                continue;
            }
            let t = match w.get(name) {
                Some(t) => t,
                None => bail!("a reply lacks `{name}`"),
            };
            if t.dims() != t0.dims() {
                bail!("`{name}`: shapes {:?} and {:?} differ between replies", t.dims(), t0.dims());
            }
            let a = *n as f64 / total as f64;
            for (s, v) in acc
                .iter_mut()
                .zip(t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?)
            {
                *s += a * v as f64;
            }
        }
        let v: Vec<f32> = acc.into_iter().map(|x| x as f32).collect();
        out.insert(name.clone(), Tensor::from_vec(v, t0.dims(), &Device::Cpu)?);
    }
    for (_, w) in replies {
        if w.len() != out.len() {
            bail!("replies have different sets of variables ({} vs {})", w.len(), out.len());
        }
    }
    Ok(out)
}
