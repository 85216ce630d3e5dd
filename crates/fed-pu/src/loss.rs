//! Local objectives: FedPU's positive-unlabeled risk and the two baselines.
//!
//! ## FedPU (Lin et al., ICML 2022), as implemented here
//! The paper's PDF was not readable offline while this was written, so no equation numbers
//! of it are cited; the risk below is the per-class uPU decomposition the paper describes
//! (Sec. 3: the negative classes' risk of a client estimated from its unlabeled data minus
//! its positive part, the remaining classes covered by other clients through aggregation),
//! checked term by term against the official loss.
//! Client `k` knows the labels of some samples of its positive classes `P_k`; all its other
//! samples (any class, including classes it has never seen labeled) form the unlabeled set
//! `U_k`, with class shares `pi_i` ([`crate::partition::ClientData::priors`]). Writing
//! `psi_i(x) = -log(1 - softmax(f(x))_i + eps)` for the loss of declaring `x` *not* class `i`
//! (one-vs-rest), the negative part of the binary problem "class `i` vs rest" is estimated
//! uPU-style (du Plessis et al. 2014/2015; the rewrite `(1 - pi) E_N[.] = E_U[.] - pi E_P[.]`
//! behind the unbiased PU risk, Kiryo et al. 2017, Sec. 2) from unlabeled data minus the
//! positive part:
//!
//! ```text
//! r_i  = E_U[ psi_i(x) ] - pi_i * E_{P_i}[ psi_i(x) ]              for i in P_k
//! R_k  = E_L[ CE(f(x), y) ] + lambda * sum_{i in P_k} r_i
//! ```
//!
//! The first term is the labeled positives' risk (cross-entropy over the labeled samples of
//! the batch); the sum is the risk of the samples that are negative for each positive class.
//! Classes in `N_k` (not positive on client `k`) get no positive risk here: the clients for
//! which they are positive supply it, and FedAvg aggregation combines the two, which is the
//! paper's central argument (the negative classes' risk of one client is covered by other
//! clients' labeled data). Expectations are batch means: `E_U` over the batch's unlabeled
//! samples, `E_{P_i}` over its labeled samples of class `i`; a class with no labeled sample in a
//! batch contributes only its `E_U` term in that batch (a small bias, as in the official code,
//! which also mixes labeled and unlabeled samples in a batch).
//!
//! **nnPU option** (Kiryo et al. 2017, Sec. 3, the non-negative estimator and the training
//! rule of their Algorithm 1):
//! the true `r_i` is a risk, so non-negative; when the estimate drops below `-beta`, the step
//! is taken on `-gamma * r_i` instead (pushing the estimate back up), else on `r_i`.
//!
//! ## Where the official code (littleSunlxy/FedPU-torch, `MPULoss_V2`) differs
//! - it divides the `E_U` term by `|P_k|` (a mean over positive classes instead of a sum);
//! - its subtraction averages `pi_y * psi_y(x)` over *all* labeled samples of the batch, so the
//!   class term carries an extra factor `n_{P_i} / n_L` compared with `pi_i * E_{P_i}`;
//! - it adds a third term, `pi_{first positive class} * mean_L sum_{i in P_k} psi_i(x) /
//!   (C - |P_k|)`, that does not appear in the risk above;
//! - `eps = 1e-6` there (an older version used 0.01); the default here is `1e-6` too.
//!
//! ## Baselines
//! - [`Objective::PositivesOnly`]: cross-entropy on the labeled positives only (the client
//!   trains on nothing else) — FedAvg with the labels FedPU has, without the unlabeled data.
//! - [`Objective::Supervised`]: cross-entropy on every sample with its true label — the
//!   upper bound where every client labels everything.

use candle_core::{DType, Result, Tensor};
use nn_core::layers::functional::log_softmax;
use serde::{Deserialize, Serialize};

/// The nnPU training rule's parameters (Kiryo et al. 2017).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NnPu {
    /// Threshold: a class risk estimate below `-beta` triggers the correction (paper: 0).
    pub beta: f64,
    /// Step weight of the correction `-gamma * r_i` (paper: 1).
    pub gamma: f64,
}

impl Default for NnPu {
    fn default() -> Self {
        Self { beta: 0.0, gamma: 1.0 }
    }
}

/// FedPU loss settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FedPuConfig {
    /// `lambda`, the weight of the PU term (official code: `puW`, 1 in its scripts).
    pub weight: f64,
    /// `eps` inside `-log(1 - p + eps)`.
    pub eps: f64,
    /// Non-negative correction (nnPU); `None` is the unbiased (uPU-style) estimate.
    pub nnpu: Option<NnPu>,
}

impl Default for FedPuConfig {
    fn default() -> Self {
        Self {
            weight: 1.0,
            eps: 1e-6,
            nnpu: None,
        }
    }
}

/// What a client minimises locally.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Objective {
    /// FedPU: labeled positives' cross-entropy plus the PU risk of the negatives.
    FedPu(FedPuConfig),
    /// Cross-entropy on labeled positives only; the client trains on those samples only.
    PositivesOnly,
    /// Cross-entropy on every sample with its true label (upper bound).
    Supervised,
}

impl Objective {
    /// Short name used in run names and tables.
    pub fn name(&self) -> &'static str {
        match self {
            Objective::FedPu(c) if c.nnpu.is_some() => "fedpu-nnpu",
            Objective::FedPu(_) => "fedpu",
            Objective::PositivesOnly => "positives-only",
            Objective::Supervised => "supervised",
        }
    }

    /// Whether the client trains on its labeled samples only.
    pub fn labeled_only(&self) -> bool {
        matches!(self, Objective::PositivesOnly)
    }
}

/// The parts of a FedPU loss evaluation (host values, for logging and tests).
#[derive(Debug, Clone, PartialEq)]
pub struct FedPuTerms {
    /// Cross-entropy of the labeled samples.
    pub ce: f64,
    /// `r_i` per class (0 for classes outside `P_k`).
    pub class_risks: Vec<f64>,
    /// The PU term actually optimised (`lambda * sum_i m_i r_i`, `m_i = -gamma` for corrected
    /// classes under nnPU, else 1).
    pub pu: f64,
}

fn zero_like(logits: &Tensor) -> Result<Tensor> {
    logits.sum_all()?.affine(0.0, 0.0)
}

/// Mean cross-entropy over the rows where `mask` is true (0, with a graph, when none is).
pub fn masked_cross_entropy(logits: &Tensor, labels: &[u32], mask: &[bool]) -> Result<Tensor> {
    let (b, c) = logits.dims2()?;
    if labels.len() != b || mask.len() != b {
        candle_core::bail!(
            "masked_cross_entropy: {b} rows, {} labels, {} mask entries",
            labels.len(),
            mask.len()
        );
    }
    let n = mask.iter().filter(|&&m| m).count();
    if n == 0 {
        return zero_like(logits);
    }
    let mut w = vec![0f64; b * c];
    for r in 0..b {
        if mask[r] {
            let y = labels[r] as usize;
            if y >= c {
                candle_core::bail!("label {y} is not below {c}");
            }
            w[r * c + y] = 1.0 / n as f64;
        }
    }
    let w = Tensor::from_vec(w, (b, c), logits.device())?.to_dtype(logits.dtype())?;
    log_softmax(logits, 1)?.mul(&w)?.sum_all()?.neg()
}

/// The FedPU loss of one batch (see the module docs). `labels[r]` is only read where
/// `labeled[r]` (unlabeled rows may hold anything); `priors` has one entry per class.
pub fn fedpu_loss(
    logits: &Tensor,
    labels: &[u32],
    labeled: &[bool],
    positive_classes: &[u32],
    priors: &[f64],
    cfg: &FedPuConfig,
) -> Result<(Tensor, FedPuTerms)> {
    let (b, c) = logits.dims2()?;
    if labels.len() != b || labeled.len() != b {
        candle_core::bail!("fedpu_loss: {b} rows, {} labels, {} flags", labels.len(), labeled.len());
    }
    let ce = masked_cross_entropy(logits, labels, labeled)?;
    let n_u = labeled.iter().filter(|&&l| !l).count();
    let mut is_pos = vec![false; c];
    for &p in positive_classes {
        if p as usize >= c {
            candle_core::bail!("positive class {p} is not below {c}");
        }
        is_pos[p as usize] = true;
    }
    if n_u == 0 || positive_classes.is_empty() {
        let v = ce.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        return Ok((
            ce,
            FedPuTerms {
                ce: v,
                class_risks: vec![0.0; c],
                pu: 0.0,
            },
        ));
    }
    if priors.len() != c {
        candle_core::bail!("fedpu_loss: {} priors for {c} classes", priors.len());
    }
    // labeled samples of each positive class in the batch
    let mut n_p = vec![0usize; c];
    for r in 0..b {
        if labeled[r] {
            let y = labels[r] as usize;
            if y >= c {
                candle_core::bail!("label {y} is not below {c}");
            }
            n_p[y] += 1;
        }
    }
    // weight matrix W so that r = sum_rows(W * psi): +1/n_U on unlabeled rows of positive
    // classes, -pi_y / n_{P_y} on the labeled row's own class
    let mut w = vec![0f64; b * c];
    for r in 0..b {
        if !labeled[r] {
            for i in 0..c {
                if is_pos[i] {
                    w[r * c + i] = 1.0 / n_u as f64;
                }
            }
        } else {
            let y = labels[r] as usize;
            if is_pos[y] {
                w[r * c + y] = -(priors[y] / n_p[y] as f64);
            }
        }
    }
    let w = Tensor::from_vec(w, (b, c), logits.device())?.to_dtype(logits.dtype())?;
    let p = log_softmax(logits, 1)?.exp()?;
    let psi = p.affine(-1.0, 1.0 + cfg.eps)?.log()?.neg()?;
    let r = psi.mul(&w)?.sum(0)?; // [C]
    let rv = r.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let m: Vec<f64> = rv
        .iter()
        .map(|&ri| match cfg.nnpu {
            Some(nn) if ri < -nn.beta => -nn.gamma,
            _ => 1.0,
        })
        .collect();
    let pu_value: f64 = rv.iter().zip(&m).map(|(ri, mi)| ri * mi).sum::<f64>() * cfg.weight;
    let m = Tensor::from_vec(m, c, logits.device())?.to_dtype(logits.dtype())?;
    let pu = r.mul(&m)?.sum_all()?.affine(cfg.weight, 0.0)?;
    let ce_v = ce.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((
        (ce + pu)?,
        FedPuTerms {
            ce: ce_v,
            class_risks: rv,
            pu: pu_value,
        },
    ))
}

/// The objective's loss on a batch of one client.
pub fn objective_loss(
    objective: &Objective,
    logits: &Tensor,
    labels: &[u32],
    labeled: &[bool],
    positive_classes: &[u32],
    priors: &[f64],
) -> Result<Tensor> {
    match objective {
        Objective::FedPu(cfg) => Ok(fedpu_loss(logits, labels, labeled, positive_classes, priors, cfg)?.0),
        Objective::PositivesOnly => masked_cross_entropy(logits, labels, labeled),
        Objective::Supervised => masked_cross_entropy(logits, labels, &vec![true; labels.len()]),
    }
}
