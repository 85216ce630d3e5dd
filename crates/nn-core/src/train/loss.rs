//! Differentiable classification losses (gradients flow to the logits through
//! [`crate::layers::functional::log_softmax`]).
//!
//! - [`cross_entropy`]: PyTorch `F.cross_entropy(logits, y, label_smoothing=eps)` with mean
//!   reduction: with `log p = log_softmax(logits)` over `K` classes,
//!   `loss = mean_b [ (1 - eps) * (-log p[b, y_b]) + eps * mean_k (-log p[b, k]) ]`.
//! - [`kd_loss`]: Hinton et al. knowledge distillation,
//!   `T^2 * sum_b KL(softmax(t_b / T) || softmax(s_b / T)) / B` (PyTorch `kl_div` with
//!   `reduction="batchmean"`, scaled by `T^2` so gradients keep their magnitude across `T`).
//! - [`soft_cross_entropy`]: `mean_b sum_k -q[b, k] log p[b, k]` for arbitrary soft targets.

use crate::layers::functional::{log_softmax, softmax};
use candle_core::{DType, Result, Tensor};

fn check_logits(logits: &Tensor, what: &str) -> Result<(usize, usize)> {
    match logits.dims() {
        &[b, k] if b > 0 && k > 0 => Ok((b, k)),
        d => candle_core::bail!("{what}: logits must be [batch, classes] and non-empty, got {d:?}"),
    }
}

/// Mean cross-entropy of `logits` `[B, K]` against class indices `targets` (`[B]`, any integer
/// dtype) with label smoothing `smoothing` in [0, 1) (PyTorch semantics, see the module docs).
/// Fails on a target outside `0..K`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, smoothing: f64) -> Result<Tensor> {
    let (b, k) = check_logits(logits, "cross_entropy")?;
    if !(0.0..1.0).contains(&smoothing) {
        candle_core::bail!("cross_entropy: label smoothing must be in [0, 1), got {smoothing}");
    }
    let t = targets.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if t.len() != b {
        candle_core::bail!("cross_entropy: {b} logits rows but {} targets", t.len());
    }
    // target distribution q = (1 - eps) * onehot + eps / K
    let off = smoothing / k as f64;
    let mut q = vec![off; b * k];
    for (i, &c) in t.iter().enumerate() {
        if c as usize >= k {
            candle_core::bail!("cross_entropy: target {c} at position {i} is not a class index below {k}");
        }
        q[i * k + c as usize] = 1.0 - smoothing + off;
    }
    let q = Tensor::from_vec(q, (b, k), logits.device())?.to_dtype(logits.dtype())?;
    soft_cross_entropy(logits, &q)
}

/// `mean_b sum_k -q[b, k] * log_softmax(logits)[b, k]` for a target distribution `q` of the
/// same shape (not differentiated).
pub fn soft_cross_entropy(logits: &Tensor, q: &Tensor) -> Result<Tensor> {
    let (b, _) = check_logits(logits, "soft_cross_entropy")?;
    if q.dims() != logits.dims() {
        candle_core::bail!("soft_cross_entropy: targets {:?} do not match logits {:?}", q.dims(), logits.dims());
    }
    let logp = log_softmax(logits, 1)?;
    logp.mul(&q.detach())?.sum_all()?.affine(-1.0 / b as f64, 0.0)
}

/// Hinton distillation loss `T^2 * KL(softmax(teacher / T) || softmax(student / T))`, averaged
/// over the batch. The teacher is detached (no gradient reaches it).
pub fn kd_loss(student_logits: &Tensor, teacher_logits: &Tensor, temperature: f64) -> Result<Tensor> {
    let (b, _) = check_logits(student_logits, "kd_loss")?;
    if teacher_logits.dims() != student_logits.dims() {
        candle_core::bail!(
            "kd_loss: teacher logits {:?} do not match student logits {:?}",
            teacher_logits.dims(),
            student_logits.dims()
        );
    }
    if temperature <= 0.0 {
        candle_core::bail!("kd_loss: temperature must be > 0, got {temperature}");
    }
    let inv_t = 1.0 / temperature;
    let t = teacher_logits.detach().affine(inv_t, 0.0)?;
    let log_pt = log_softmax(&t, 1)?;
    let pt = softmax(&t, 1)?;
    let log_ps = log_softmax(&student_logits.affine(inv_t, 0.0)?, 1)?;
    let kl = pt.mul(&(log_pt - log_ps)?)?.sum_all()?;
    kl.affine(temperature * temperature / b as f64, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::check_gradient;
    use candle_core::Device;

    fn logits() -> Result<Tensor> {
        Tensor::new(
            &[[1.0f64, 2.0, -0.5, 0.3], [0.1, -1.2, 0.7, 2.2], [0.0, 0.0, 0.0, 0.0]],
            &Device::Cpu,
        )
    }

    fn log_softmax_host(row: &[f64]) -> Vec<f64> {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
        row.iter().map(|x| x - lse).collect()
    }

    #[test]
    fn cross_entropy_values_match_hand_computation() -> Result<()> {
        let x = logits()?;
        let rows = x.to_vec2::<f64>()?;
        let y = Tensor::new(&[1u32, 3, 0], &Device::Cpu)?;
        for eps in [0.0, 0.1, 0.3] {
            let got = cross_entropy(&x, &y, eps)?.to_scalar::<f64>()?;
            let mut want = 0.0;
            for (r, &c) in rows.iter().zip(&[1usize, 3, 0]) {
                let lp = log_softmax_host(r);
                let nll = -lp[c];
                let smooth = -lp.iter().sum::<f64>() / 4.0;
                want += (1.0 - eps) * nll + eps * smooth;
            }
            want /= 3.0;
            assert!((got - want).abs() < 1e-12, "eps {eps}: {got} vs {want}");
        }
        assert!(cross_entropy(&x, &Tensor::new(&[1u32, 4, 0], &Device::Cpu)?, 0.0).is_err());
        assert!(cross_entropy(&x, &Tensor::new(&[1u32, 2], &Device::Cpu)?, 0.0).is_err());
        Ok(())
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() -> Result<()> {
        let y = Tensor::new(&[2u32, 0, 3], &Device::Cpu)?;
        check_gradient(&logits()?, |x| cross_entropy(x, &y, 0.1), 1e-6, 1e-6)
    }

    #[test]
    fn kd_loss_values_and_gradient() -> Result<()> {
        let s = logits()?;
        let t = Tensor::new(
            &[[0.5f64, 1.0, 0.0, -1.0], [2.0, 0.0, 0.1, 0.3], [1.0, -1.0, 0.5, 0.0]],
            &Device::Cpu,
        )?;
        let temp = 4.0;
        let got = kd_loss(&s, &t, temp)?.to_scalar::<f64>()?;
        let (sr, tr) = (s.to_vec2::<f64>()?, t.to_vec2::<f64>()?);
        let mut want = 0.0;
        for (a, b) in sr.iter().zip(&tr) {
            let ls = log_softmax_host(&a.iter().map(|v| v / temp).collect::<Vec<_>>());
            let lt = log_softmax_host(&b.iter().map(|v| v / temp).collect::<Vec<_>>());
            want += lt.iter().zip(&ls).map(|(t, s)| t.exp() * (t - s)).sum::<f64>();
        }
        want *= temp * temp / 3.0;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // identical logits: zero loss
        assert!(kd_loss(&t, &t, 2.0)?.to_scalar::<f64>()?.abs() < 1e-12);
        check_gradient(&s, |x| kd_loss(x, &t, temp), 1e-6, 1e-6)
    }
}
