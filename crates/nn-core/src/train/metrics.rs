//! Classification metrics: top-k accuracy counts and a running average.

use candle_core::{DType, Result, Tensor};

/// How many rows of `logits` `[B, K]` have their label (`labels`, `[B]`) among the `k` largest
/// logits. Ties are resolved in the label's favour: a row is correct when fewer than `k` classes
/// have a strictly larger logit (and the label's logit is not NaN).
pub fn topk_correct(logits: &Tensor, labels: &Tensor, k: usize) -> Result<usize> {
    Ok(topk_correct_many(logits, labels, &[k])?[0])
}

/// [`topk_correct`] for several `k` at once (one host copy of the logits), e.g. `&[1, 5]`.
pub fn topk_correct_many(logits: &Tensor, labels: &Tensor, ks: &[usize]) -> Result<Vec<usize>> {
    let (b, c) = match logits.dims() {
        &[b, c] => (b, c),
        d => candle_core::bail!("topk_correct: logits must be [batch, classes], got {d:?}"),
    };
    let l = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let y = labels.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if y.len() != b {
        candle_core::bail!("topk_correct: {b} logits rows but {} labels", y.len());
    }
    let mut out = vec![0; ks.len()];
    for (row, &label) in l.chunks(c.max(1)).zip(&y) {
        let Some(&v) = row.get(label as usize) else {
            candle_core::bail!("topk_correct: label {label} is not below the number of classes {c}");
        };
        if v.is_nan() {
            continue;
        }
        let above = row.iter().filter(|&&x| x > v).count();
        for (o, &k) in out.iter_mut().zip(ks) {
            if above < k {
                *o += 1;
            }
        }
    }
    Ok(out)
}

/// A running weighted mean: `sum(value_i * n_i) / sum(n_i)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AverageMeter {
    /// Weighted sum of the values.
    pub sum: f64,
    /// Total weight (e.g. number of examples).
    pub count: f64,
}

impl AverageMeter {
    /// An empty meter.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds `value` with weight `n` (e.g. a batch mean loss and the batch size).
    pub fn update(&mut self, value: f64, n: f64) {
        self.sum += value * n;
        self.count += n;
    }
    /// The mean so far (0 when empty).
    pub fn avg(&self) -> f64 {
        if self.count > 0.0 {
            self.sum / self.count
        } else {
            0.0
        }
    }
    /// Forgets everything.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn topk_counts_and_meter() -> Result<()> {
        let x = Tensor::new(
            &[
                [0.1f32, 0.9, 0.0, 0.0, 0.0, 0.0],
                [0.5, 0.1, 0.2, 0.3, 0.4, 0.6],
                [1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
                [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
            ],
            &Device::Cpu,
        )?;
        let y = Tensor::new(&[1u32, 0, 1, 0], &Device::Cpu)?;
        // row0 top1; row1 label rank 2 (top5); row2 tie -> top1 (nothing strictly larger); row3 rank 6
        assert_eq!(topk_correct_many(&x, &y, &[1, 2, 5])?, vec![2, 3, 3]);
        assert_eq!(topk_correct(&x, &y, 6)?, 4);
        assert!(topk_correct(&x, &Tensor::new(&[1u32, 0, 9, 0], &Device::Cpu)?, 1).is_err());
        let mut m = AverageMeter::new();
        m.update(1.0, 2.0);
        m.update(4.0, 1.0);
        assert!((m.avg() - 2.0).abs() < 1e-12);
        m.reset();
        assert_eq!(m.avg(), 0.0);
        Ok(())
    }
}
