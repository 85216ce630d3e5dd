//! Contrastive domain discrepancy (CDD) with multi-kernel Gaussian MMD (CAN, Kang et al.,
//! CVPR 2019, Eqs. 3-6), the adaptation loss of SFDA-DE (Sec. 3.4, Eq. 9 of Ding et al.).
//!
//! For classes `c1, c2`, with `S_c1` the (surrogate) source features of class `c1` and `T_c2`
//! the target features pseudo-labelled `c2`, the biased MMD^2 estimate is
//! `D(c1, c2) = mean k(S_c1, S_c1) + mean k(T_c2, T_c2) - 2 mean k(S_c1, T_c2)` (CAN Eq. 5),
//! and over the `M` classes present on both sides (CAN Eq. 6)
//! `CDD = 1/M sum_c D(c, c) - 1/(M (M - 1)) sum_{c != c'} D(c, c')`:
//! intra-class discrepancy minus inter-class discrepancy.
//!
//! The kernel is a sum of Gaussians `k(a, b) = sum_i exp(-|a - b|^2 / s_i)` with
//! `s_i = s * mul^(i - floor(num / 2))`, `s` the mean squared distance between distinct
//! features of the step (detached; DAN/CAN's choice) or a fixed value. CAN computes `s` per
//! class pair; here one `s` serves the whole step, which keeps the loss a single matrix
//! expression (`B = P^T K P` with `P` the class-membership averaging matrix).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Options of the multi-kernel Gaussian MMD.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KernelConfig {
    /// Number of Gaussian kernels (CAN: 5).
    pub num_kernels: usize,
    /// Ratio between consecutive bandwidths (CAN: 2).
    pub kernel_mul: f64,
    /// Use this base bandwidth instead of the data's mean squared distance.
    pub fixed_bandwidth: Option<f64>,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            num_kernels: 5,
            kernel_mul: 2.0,
            fixed_bandwidth: None,
        }
    }
}

/// The CDD and its two parts (f64 scalar tensors; gradients reach both feature sets).
#[derive(Debug, Clone)]
pub struct CddLoss {
    /// `intra - inter`.
    pub loss: Tensor,
    /// Mean intra-class discrepancy `1/M sum_c D(c, c)`.
    pub intra: Tensor,
    /// Mean inter-class discrepancy `1/(M (M-1)) sum_{c != c'} D(c, c')` (0 for one class).
    pub inter: Tensor,
    /// The classes that took part, in order.
    pub classes: Vec<usize>,
}

/// Pairwise squared Euclidean distances of the rows of `z`, `[N, N]`.
fn sq_dists(z: &Tensor) -> Result<Tensor> {
    let sq = z.sqr()?.sum_keepdim(1)?; // [N, 1]
    let g = z.matmul(&z.t()?)?;
    Ok(sq.broadcast_add(&sq.t()?)?.sub(&(g * 2.0)?)?.relu()?)
}

/// Multi-kernel Gaussian kernel matrix of `z`'s rows.
fn kernel_matrix(z: &Tensor, k: &KernelConfig) -> Result<Tensor> {
    if k.num_kernels == 0 || !(k.kernel_mul > 0.0) {
        bail!(
            "kernel: need num_kernels >= 1 and kernel_mul > 0, got {} and {}",
            k.num_kernels,
            k.kernel_mul
        );
    }
    let n = z.dims()[0];
    let d2 = sq_dists(z)?;
    let base = match k.fixed_bandwidth {
        Some(b) if b > 0.0 => b,
        Some(b) => bail!("kernel: fixed bandwidth must be > 0, got {b}"),
        None => {
            let s = d2.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let pairs = (n * n - n).max(1) as f64;
            (s / pairs).max(1e-12)
        }
    };
    let mut sum: Option<Tensor> = None;
    for i in 0..k.num_kernels {
        let s = base * k.kernel_mul.powi(i as i32 - (k.num_kernels / 2) as i32);
        let e = (&d2 * (-1.0 / s))?.exp()?;
        sum = Some(match sum {
            None => e,
            Some(a) => (a + e)?,
        });
    }
    Ok(sum.expect("at least one kernel"))
}

/// CDD between `source` features (`[Ns, D]`, class `source_labels[i]`) and `target` features
/// (`[Nt, D]`, pseudo-label `target_labels[i]`), over the classes present on both sides.
pub fn cdd(source: &Tensor, source_labels: &[usize], target: &Tensor, target_labels: &[usize], k: &KernelConfig) -> Result<CddLoss> {
    let (ns, nt) = (source.dims()[0], target.dims()[0]);
    if source.rank() != 2 || target.rank() != 2 || source.dims()[1] != target.dims()[1] {
        bail!(
            "cdd: features must be [N, D] with the same D, got {:?} and {:?}",
            source.dims(),
            target.dims()
        );
    }
    if source_labels.len() != ns || target_labels.len() != nt {
        bail!(
            "cdd: {ns} source rows with {} labels, {nt} target rows with {} labels",
            source_labels.len(),
            target_labels.len()
        );
    }
    let mut classes: Vec<usize> = source_labels.iter().copied().filter(|c| target_labels.contains(c)).collect();
    classes.sort_unstable();
    classes.dedup();
    let m = classes.len();
    if m == 0 {
        bail!("cdd: no class has both source and target features");
    }
    // P: [Ns + Nt, 2M], column j averages source class classes[j], column M + j target class.
    let n = ns + nt;
    let mut p = vec![0f64; n * 2 * m];
    for (j, &c) in classes.iter().enumerate() {
        let cs = source_labels.iter().filter(|&&l| l == c).count() as f64;
        let ct = target_labels.iter().filter(|&&l| l == c).count() as f64;
        for (i, &l) in source_labels.iter().enumerate() {
            if l == c {
                p[i * 2 * m + j] = 1.0 / cs;
            }
        }
        for (i, &l) in target_labels.iter().enumerate() {
            if l == c {
                p[(ns + i) * 2 * m + m + j] = 1.0 / ct;
            }
        }
    }
    // Computed in f64 whatever the feature dtype (squared distances of large f32 features
    // would overflow); gradients flow back through the conversion.
    let dtype = DType::F64;
    let dev = source.device();
    let p = Tensor::from_vec(p, (n, 2 * m), dev)?;
    let z = Tensor::cat(&[source.to_dtype(dtype)?, target.to_dtype(dtype)?], 0)?;
    let kmat = kernel_matrix(&z, k)?;
    let b = p.t()?.matmul(&kmat.matmul(&p)?)?; // [2M, 2M] block means
    let eye = Tensor::eye(m, dtype, dev)?;
    let ss = b.narrow(0, 0, m)?.narrow(1, 0, m)?.mul(&eye)?.sum(1)?; // [M]
    let tt = b.narrow(0, m, m)?.narrow(1, m, m)?.mul(&eye)?.sum(1)?; // [M]
    let st = b.narrow(0, 0, m)?.narrow(1, m, m)?; // [M, M]: (source c1, target c2)
                                                  // D(c1, c2) = SS(c1) + TT(c2) - 2 ST(c1, c2)   (CAN Eq. 5)
    let dmat = ss.unsqueeze(1)?.broadcast_add(&tt.unsqueeze(0)?)?.sub(&(st * 2.0)?)?;
    let trace = dmat.mul(&eye)?.sum_all()?;
    let intra = (&trace / m as f64)?;
    let inter = if m > 1 {
        ((dmat.sum_all()? - &trace)? / (m * (m - 1)) as f64)?
    } else {
        Tensor::zeros((), dtype, dev)?
    };
    let loss = (&intra - &inter)?;
    Ok(CddLoss {
        loss,
        intra,
        inter,
        classes,
    })
}

/// Biased multi-kernel MMD^2 between two feature sets (CDD with a single class).
pub fn mmd2(x: &Tensor, y: &Tensor, k: &KernelConfig) -> Result<Tensor> {
    let out = cdd(x, &vec![0; x.dims()[0]], y, &vec![0; y.dims()[0]], k)?;
    Ok(out.intra)
}
