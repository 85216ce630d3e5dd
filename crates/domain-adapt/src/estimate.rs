//! Source class-conditional distribution estimation (SFDA-DE, Sec. 3.3) and surrogate feature
//! sampling (Sec. 3.4).
//!
//! The source features of class `k` are modelled as a Gaussian `N(mu_k^s, Sigma_k^s)`. Without
//! source data, its parameters are estimated from the target samples pseudo-labelled `k`
//! (`T_k`, the confident members of the spherical k-means cluster) and the anchor `w_k`:
//! - mean: the direction of the anchor (the classifier was trained on source features, so `w_k`
//!   points at the source class), the length of the target class mean:
//!   `mu_k^s = |mu_k^t| * w_k / |w_k|`, with `mu_k^t = mean_{i in T_k} f_i`;
//! - covariance: the spread of the target class, `Sigma_k^s = gamma * Sigma_k^t` with
//!   `Sigma_k^t = 1/(|T_k| - 1) sum_{i in T_k} (f_i - mu_k^t)(f_i - mu_k^t)^T` (full) or only its
//!   diagonal, plus `ridge * (tr Sigma / dim) * I` (relative to the mean variance, so it works at
//!   any feature scale) so the Cholesky factor exists with fewer samples than dimensions.
//!
//! Surrogate source features are `mu_k^s + L_k z`, `z ~ N(0, I)`, `L_k L_k^T = Sigma_k^s`.

use anyhow::{bail, Result};
use rand::Rng;
use rand_distr::StandardNormal;

/// Full or diagonal covariance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Covariance {
    Full,
    Diagonal,
}

impl std::str::FromStr for Covariance {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(Covariance::Full),
            "diag" | "diagonal" => Ok(Covariance::Diagonal),
            o => bail!("unknown covariance `{o}`; valid: full, diag"),
        }
    }
}

/// Options of the estimator.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EstimatorConfig {
    pub covariance: Covariance,
    /// `gamma`: scale of the target class covariance.
    pub cov_scale: f64,
    /// Added to the diagonal of the covariance, relative to its mean variance.
    pub ridge: f64,
}

impl Default for EstimatorConfig {
    fn default() -> Self {
        Self {
            covariance: Covariance::Full,
            cov_scale: 1.0,
            ridge: 1e-4,
        }
    }
}

/// The estimated source distribution of one class.
#[derive(Debug, Clone)]
pub struct ClassGaussian {
    pub class: usize,
    /// Target samples the estimate used.
    pub count: usize,
    pub dim: usize,
    /// Estimated source mean `mu_k^s`.
    pub mean: Vec<f64>,
    /// The target class mean `mu_k^t` it was derived from.
    pub target_mean: Vec<f64>,
    /// Estimated covariance: `dim x dim` row-major (full) or `dim` variances (diagonal).
    pub cov: Vec<f64>,
    pub kind: Covariance,
    /// Lower Cholesky factor (full) or standard deviations (diagonal).
    factor: Vec<f64>,
}

impl ClassGaussian {
    /// Estimates class `class` from its target features (`rows` of `dim`) and its anchor.
    pub fn estimate(class: usize, rows: &[f32], dim: usize, anchor: &[f32], cfg: &EstimatorConfig) -> Result<Self> {
        if dim == 0 || rows.len() % dim != 0 || anchor.len() != dim {
            bail!(
                "estimate: {} feature values and an anchor of {} for dim {dim}",
                rows.len(),
                anchor.len()
            );
        }
        let n = rows.len() / dim;
        if n < 2 {
            bail!("estimate: class {class} has {n} target sample(s); a covariance needs at least 2");
        }
        if !(cfg.cov_scale >= 0.0 && cfg.ridge >= 0.0) {
            bail!(
                "estimate: cov_scale and ridge must be >= 0, got {} and {}",
                cfg.cov_scale,
                cfg.ridge
            );
        }
        let anchor_norm = anchor.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        if anchor_norm == 0.0 || !anchor_norm.is_finite() {
            bail!("estimate: the anchor of class {class} has norm {anchor_norm}");
        }
        let mut tmean = vec![0f64; dim];
        for r in rows.chunks_exact(dim) {
            tmean.iter_mut().zip(r).for_each(|(m, v)| *m += *v as f64);
        }
        tmean.iter_mut().for_each(|m| *m /= n as f64);
        let tnorm = tmean.iter().map(|v| v * v).sum::<f64>().sqrt();
        // mu_k^s = |mu_k^t| w_k / |w_k|
        let mean: Vec<f64> = anchor.iter().map(|a| tnorm * *a as f64 / anchor_norm).collect();
        let (cov, factor) = match cfg.covariance {
            Covariance::Full => {
                let mut c = vec![0f64; dim * dim];
                let mut d = vec![0f64; dim];
                for r in rows.chunks_exact(dim) {
                    d.iter_mut().zip(r).zip(&tmean).for_each(|((d, v), m)| *d = *v as f64 - m);
                    for a in 0..dim {
                        let da = d[a];
                        let row = &mut c[a * dim..a * dim + a + 1];
                        for (b, cab) in row.iter_mut().enumerate() {
                            *cab += da * d[b];
                        }
                    }
                }
                let s = cfg.cov_scale / (n - 1) as f64;
                for a in 0..dim {
                    for b in 0..=a {
                        let v = c[a * dim + b] * s;
                        c[a * dim + b] = v;
                        c[b * dim + a] = v;
                    }
                }
                let ridge = cfg.ridge * (0..dim).map(|a| c[a * dim + a]).sum::<f64>() / dim as f64;
                for a in 0..dim {
                    c[a * dim + a] += ridge;
                }
                let l = cholesky(&c, dim)?;
                (c, l)
            }
            Covariance::Diagonal => {
                let mut v = vec![0f64; dim];
                for r in rows.chunks_exact(dim) {
                    v.iter_mut()
                        .zip(r)
                        .zip(&tmean)
                        .for_each(|((v, x), m)| *v += (*x as f64 - m).powi(2));
                }
                v.iter_mut().for_each(|x| *x *= cfg.cov_scale / (n - 1) as f64);
                let ridge = cfg.ridge * v.iter().sum::<f64>() / dim as f64;
                v.iter_mut().for_each(|x| *x += ridge);
                let sd = v.iter().map(|x| x.sqrt()).collect();
                (v, sd)
            }
        };
        Ok(Self {
            class,
            count: n,
            dim,
            mean,
            target_mean: tmean,
            cov,
            kind: cfg.covariance,
            factor,
        })
    }

    /// Covariance entry `(a, b)`.
    pub fn cov_at(&self, a: usize, b: usize) -> f64 {
        match self.kind {
            Covariance::Full => self.cov[a * self.dim + b],
            Covariance::Diagonal if a == b => self.cov[a],
            Covariance::Diagonal => 0.0,
        }
    }

    /// `n` surrogate features (row-major `n x dim`).
    pub fn sample(&self, n: usize, rng: &mut impl Rng) -> Vec<f32> {
        let d = self.dim;
        let mut out = Vec::with_capacity(n * d);
        let mut z = vec![0f64; d];
        for _ in 0..n {
            z.iter_mut().for_each(|v| *v = rng.sample(StandardNormal));
            match self.kind {
                Covariance::Full => {
                    for a in 0..d {
                        let l = &self.factor[a * d..a * d + a + 1];
                        let s: f64 = l.iter().zip(&z).map(|(l, z)| l * z).sum();
                        out.push((self.mean[a] + s) as f32);
                    }
                }
                Covariance::Diagonal => {
                    out.extend((0..d).map(|a| (self.mean[a] + self.factor[a] * z[a]) as f32));
                }
            }
        }
        out
    }
}

/// Lower Cholesky factor of a symmetric positive definite `n x n` matrix.
pub fn cholesky(a: &[f64], n: usize) -> Result<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            if i == j {
                let v = a[i * n + i] - s;
                // a pivot lost to rounding (relative to the diagonal) means a singular matrix
                if !(v > 1e-10 * a[i * n + i].abs()) {
                    bail!("cholesky: matrix is not positive definite (pivot {i} = {v}); increase the ridge");
                }
                l[i * n + i] = v.sqrt();
            } else {
                l[i * n + j] = (a[i * n + j] - s) / l[j * n + j];
            }
        }
    }
    Ok(l)
}
