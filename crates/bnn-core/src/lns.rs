//! LNS: training binary networks through learning with noisy supervision (Han et al., ICML
//! 2020).
//!
//! * A mapping network `f_theta` ([`MappingNetwork`]) predicts the binary weights of a layer
//!   filter by filter: a filter `W_o` of shape `[c, k, k]` is treated as a `c`-channel `k x k`
//!   image, passed through 3x3 convolutions `c -> 2c -> 2c -> c` (BN + ReLU after the first two),
//!   and the layer binarises `f_theta(W)` instead of `W`. We add `W` back as a residual
//!   (`f_theta(W) = W + g(W)`, `g`'s last conv initialised small), so fine-tuning starts from the
//!   pretrained binary network; this residual is our choice, not taken from the paper.
//! * The signs `sign(W*)` of a pretrained binary network are noisy labels of the "true" binary
//!   weights. Treating them as labels flipped with rates `rho_+1`, `rho_-1`, the unbiased
//!   estimator of Natarajan et al. (NeurIPS 2013, Lemma 1) corrects the logistic loss
//!   `l(t, y) = log(1 + exp(-y t))`:
//!   `l~(t, y) = ((1 - rho_{-y}) l(t, y) - rho_y l(t, -y)) / (1 - rho_{+1} - rho_{-1})`,
//!   whose expectation over the label noise equals the clean loss ([`unbiased_logistic_loss`]).
//! * [`LnsCallback`] adds `lambda * mean_l l~(f_theta(W_l), sign(W*_l))` to the task loss
//!   through nn-core's `Callback::extra_loss`, so the whole binary network and the mapping
//!   networks are fine-tuned end to end.

use crate::binary::{BinaryConv2d, WeightMapper};
use anyhow::Context;
use candle_core::{Result, Tensor};
use candle_nn::ModuleT;
use nn_core::init::Init;
use nn_core::layers::{BatchNorm, Conv2d, Conv2dConfig};
use nn_core::train::{Callback, StepContext};
use nn_core::var_store::VarPath;
use std::sync::{Arc, Mutex};

/// `f_theta`: filters as `c`-channel images, 3x3 convs `c -> 2c -> 2c -> c`, BN + ReLU, plus the
/// identity.
pub struct MappingNetwork {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    conv3: Conv2d,
}

impl MappingNetwork {
    pub fn new(vp: &VarPath, c: usize) -> Result<Self> {
        Ok(Self {
            conv1: Conv2d::new(&vp.pp("conv1"), Conv2dConfig::new(c, 2 * c, 3))?,
            bn1: BatchNorm::new(&vp.pp("bn1"), 2 * c)?,
            conv2: Conv2d::new(&vp.pp("conv2"), Conv2dConfig::new(2 * c, 2 * c, 3))?,
            bn2: BatchNorm::new(&vp.pp("bn2"), 2 * c)?,
            conv3: Conv2d::with_init(
                &vp.pp("conv3"),
                Conv2dConfig::new(2 * c, c, 3),
                Init::Normal { mean: 0.0, std: 1e-3 },
            )?,
        })
    }

    /// `f_theta(W)` for `W: [o, c, k, k]` (`o` filters form the batch).
    pub fn forward(&self, w: &Tensor, train: bool) -> Result<Tensor> {
        let h = nn_core::ops::activation::relu(&self.bn1.forward_t(&self.conv1.forward_t(w, train)?, train)?)?;
        let h = nn_core::ops::activation::relu(&self.bn2.forward_t(&self.conv2.forward_t(&h, train)?, train)?)?;
        w + self.conv3.forward_t(&h, train)?
    }
}

impl WeightMapper for MappingNetwork {
    fn map(&self, w: &Tensor, train: bool) -> Result<Tensor> {
        self.forward(w, train)
    }
}

/// `log(1 + exp(t))`, computed stably.
fn softplus(t: &Tensor) -> Result<Tensor> {
    let r = nn_core::ops::activation::relu(t)?;
    r + ((t.abs()?.neg()?.exp()? + 1.0)?.log()?)
}

/// Mean over elements of the noise-corrected logistic loss `l~(t, y)` (Natarajan et al. 2013,
/// Lemma 1) for scores `t` and labels `y` in `{-1, +1}` (same shape), with flip rates
/// `rho_pos = P(label -1 | true +1)` and `rho_neg = P(label +1 | true -1)`,
/// `rho_pos + rho_neg < 1`.
pub fn unbiased_logistic_loss(t: &Tensor, y: &Tensor, rho_pos: f64, rho_neg: f64) -> Result<Tensor> {
    if !(rho_pos >= 0.0 && rho_neg >= 0.0 && rho_pos + rho_neg < 1.0) {
        candle_core::bail!("flip rates must be >= 0 with rho_pos + rho_neg < 1, got {rho_pos}, {rho_neg}");
    }
    let y = y.to_dtype(t.dtype())?;
    let yt = t.mul(&y)?;
    let l_y = softplus(&yt.neg()?)?; // l(t, y)
    let l_neg = softplus(&yt)?; // l(t, -y)
    let p = ((&y + 1.0)? * 0.5)?; // 1 where y = +1
    let rho_y = ((&p * rho_pos)? + ((p.neg()? + 1.0)? * rho_neg)?)?;
    let rho_not_y = ((&p * rho_neg)? + ((p.neg()? + 1.0)? * rho_pos)?)?;
    let num = (l_y.mul(&(rho_not_y.neg()? + 1.0)?)? - l_neg.mul(&rho_y)?)?;
    (num / (1.0 - rho_pos - rho_neg))?.mean_all()
}

/// One registered binary layer.
pub struct LnsEntry {
    pub name: String,
    pub layer: Arc<BinaryConv2d>,
    pub mapping: Arc<MappingNetwork>,
    /// `sign(W*)` of the pretrained network (set by [`LnsRegistry::set_labels_from_weights`]).
    pub labels: Option<Tensor>,
}

/// The binary layers of a model fine-tuned with LNS and their mapping networks.
#[derive(Default)]
pub struct LnsRegistry {
    entries: Mutex<Vec<LnsEntry>>,
}

impl LnsRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Creates the mapping network of `layer` under `vp.lns_map` and makes the layer use it.
    pub fn register(&self, vp: &VarPath, layer: Arc<BinaryConv2d>) -> Result<()> {
        let c = layer.config.in_channels / layer.config.groups.max(1);
        let mapping = Arc::new(MappingNetwork::new(&vp.pp("lns_map"), c)?);
        layer.set_mapper(Some(mapping.clone()));
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).push(LnsEntry {
            name: vp.prefix().to_string(),
            layer,
            mapping,
            labels: None,
        });
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the noisy labels `sign(W)` from the layers' current latent weights (call it right
    /// after loading the pretrained binary network).
    pub fn set_labels_from_weights(&self) -> Result<()> {
        for e in self.entries.lock().unwrap_or_else(|e| e.into_inner()).iter_mut() {
            let w = e.layer.weight.as_tensor().detach();
            e.labels = Some(((w.ge(0f64)?.to_dtype(w.dtype())? * 2.0)? - 1.0)?);
        }
        Ok(())
    }

    /// Mean over layers of the unbiased loss of `f_theta(W)` against the labels.
    pub fn loss(&self, rho: f64, train: bool) -> Result<Option<Tensor>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut total: Option<Tensor> = None;
        let mut n = 0usize;
        for e in entries.iter() {
            let Some(y) = &e.labels else { continue };
            let t = e.mapping.forward(e.layer.weight.as_tensor(), train)?;
            let l = unbiased_logistic_loss(&t, y, rho, rho)?;
            total = Some(match total {
                Some(s) => (s + l)?,
                None => l,
            });
            n += 1;
        }
        total.map(|t| t / n as f64).transpose()
    }
}

/// Adds `lambda * LNS loss` to the task loss each training step.
pub struct LnsCallback {
    pub registry: Arc<LnsRegistry>,
    /// Weight of the LNS term.
    pub lambda: f64,
    /// Symmetric flip rate of the noisy labels.
    pub rho: f64,
}

impl Callback for LnsCallback {
    fn name(&self) -> String {
        "lns".into()
    }
    fn extra_loss(&mut self, _step: &StepContext) -> anyhow::Result<Option<Tensor>> {
        let l = self.registry.loss(self.rho, true).context("LNS loss")?;
        Ok(match l {
            Some(l) => Some((l * self.lambda)?),
            None => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn corrected_loss_matches_hand_computation() -> Result<()> {
        let dev = Device::Cpu;
        let t = Tensor::new(&[0.0f64, 2.0], &dev)?;
        let y = Tensor::new(&[1.0f64, -1.0], &dev)?;
        // l(0, 1) = l(0, -1) = ln 2 -> (0.8 ln2 - 0.2 ln2) / 0.6 = ln 2
        // l(2, -1) = ln(1 + e^2) = 2.126928, l(2, 1) = ln(1 + e^-2) = 0.126928
        //   -> (0.8 * 2.126928 - 0.2 * 0.126928) / 0.6 = 2.793595
        let got = unbiased_logistic_loss(&t, &y, 0.2, 0.2)?.to_scalar::<f64>()?;
        let want = (std::f64::consts::LN_2 + 2.793_595) / 2.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // rho = 0 gives the plain logistic loss
        let plain = unbiased_logistic_loss(&t, &y, 0.0, 0.0)?.to_scalar::<f64>()?;
        assert!((plain - (std::f64::consts::LN_2 + 2.126_928) / 2.0).abs() < 1e-5);
        // unbiasedness: E over flips of l~ equals the clean loss, for asymmetric rates too
        let (rp, rn) = (0.3, 0.1);
        for &(tv, yv) in &[(0.7f64, 1.0f64), (-1.3, 1.0), (0.4, -1.0)] {
            let tt = Tensor::new(&[tv], &dev)?;
            let l = |y: f64| -> Result<f64> { unbiased_logistic_loss(&tt, &Tensor::new(&[y], &dev)?, rp, rn)?.to_scalar::<f64>() };
            let flip = if yv > 0.0 { rp } else { rn };
            let expected = (1.0 - flip) * l(yv)? + flip * l(-yv)?;
            let clean = (1.0 + (-yv * tv).exp()).ln();
            assert!((expected - clean).abs() < 1e-12, "{expected} vs {clean}");
        }
        assert!(unbiased_logistic_loss(&t, &y, 0.5, 0.5).is_err());
        Ok(())
    }
}
