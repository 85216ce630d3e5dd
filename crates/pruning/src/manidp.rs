//! ManiDP: manifold-regularized dynamic pruning (Tang et al., CVPR 2021).
//!
//! Every body convolution of a backbone gets a **channel gate** computed from the
//! convolution's input: `m~ = min(ReLU(FC2(ReLU(FC1(GAP(x))))), clamp_max)` (bias-free FC1
//! squeezing by `squeeze_rate`; FC2 initialised with tiny weights and bias 1, so every gate
//! starts at ~1 and the gated network starts as the trained dense one), and a
//! per-instance mask `m = m~ * [m~ >= threshold]`. The mask multiplies the output of the
//! convolution's BatchNorm (before the ReLU, which commutes with a non-negative scale), so the
//! gated network is built from the unchanged nn-core backbone through [`ManiDpFactory`].
//!
//! Training adds two terms to the cross-entropy ([`ManiDpCallback`]):
//! - **Complexity-weighted sparsity** (paper, sec. 3.2): `sum_l mean_b(w_b * mean_c m~_{l,b,c})`
//!   with `w_b = 1[L_b < t * Lbar] * ((t * Lbar - L_b) / (t * Lbar))^gamma`, where `L_b` is the
//!   instance's cross-entropy and `Lbar` the mean training loss of the previous epoch: easy
//!   instances (small loss) are pushed to sparser sub-networks, hard ones are left alone.
//! - **Manifold alignment** (sec. 3.3): `sum_l || G(F_l) - G(M_l) ||_F^2 / B^2`, where `G(Z) =
//!   Z^ Z^T` is the cosine-similarity matrix of the row-normalised instances, `F_l` the
//!   globally pooled features of layer `l` and `M_l` its gate values `m~`: instances with
//!   similar features get similar sub-networks.
//!
//! At regular intervals the threshold of every gate is set so that a fraction `r` of its
//! channels, ranked by their mean gate value since the previous update, stays open, with `r`
//! going from 1 to the target kept ratio by a cosine schedule `r(p) = (1 - r*)/2 cos(pi p) +
//! (1 + r*)/2` of the run's progress `p` ([`kept_ratio_at`]).
//! These follow the official code (huawei-noah/Efficient-Computing, Pruning/ManiDP), with two
//! differences: the initial `Lbar` there comes from a pass over the training set before
//! training, here the first epoch uses the running mean of the losses seen so far; and the
//! official code updates the thresholds once per epoch and reaches the target only after the
//! last epoch, which is [`ManiDpConfig::threshold_updates_per_epoch`] = 1 and
//! [`ManiDpConfig::ramp_fraction`] = 1 here. A run of a few epochs would then train (and be
//! evaluated) with almost every channel open, so short runs update several times per epoch and
//! reach the target earlier.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use candle_nn::ModuleT;
use nn_core::init::Init;
use nn_core::layers::{BatchNorm, BoxedLayer, Conv2d, Conv2dConfig};
use nn_core::train::{Callback, EpochMetrics, FitContext, StepContext};
use nn_core::{LayerFactory, LayerRole, ParamKind, VarPath};
use std::sync::{Arc, Mutex};

/// Hyperparameters (defaults: the official CIFAR-10 settings).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ManiDpConfig {
    /// FC1 squeezes channels by this factor (by half of it below 80 channels).
    pub squeeze_rate: usize,
    /// Upper clamp of the gate values.
    pub clamp_max: f64,
    /// Weight of the complexity-weighted sparsity term (`lambda_s`).
    pub lambda_sparsity: f64,
    /// Weight of the manifold alignment term (`lambda_m`).
    pub lambda_manifold: f64,
    /// `t`: instances with loss below `t * Lbar` count as easy.
    pub easy_threshold: f64,
    /// `gamma` of the complexity weight.
    pub gamma: f64,
    /// Target fraction of channels kept open at the end (`r*`).
    pub target_kept: f64,
    /// Threshold updates per epoch (the official code: 1, after every epoch).
    #[serde(default = "one_update")]
    pub threshold_updates_per_epoch: usize,
    /// Fraction of the run over which the kept ratio falls from 1 to `target_kept`; the rest
    /// trains under the target ratio (the official code: 1, the target is reached at the end).
    #[serde(default = "full_ramp")]
    pub ramp_fraction: f64,
}

fn one_update() -> usize {
    1
}

fn full_ramp() -> f64 {
    1.0
}

impl Default for ManiDpConfig {
    fn default() -> Self {
        Self {
            squeeze_rate: 2,
            clamp_max: 1000.0,
            lambda_sparsity: 0.1,
            lambda_manifold: 0.1,
            easy_threshold: 0.5,
            gamma: 1.0,
            target_kept: 0.65,
            threshold_updates_per_epoch: 1,
            ramp_fraction: 1.0,
        }
    }
}

/// The latest forward pass through one gate.
#[derive(Debug, Clone)]
pub struct GateRecord {
    /// Gate values before thresholding `[B, C]` (in the autograd graph in training).
    pub gate: Tensor,
    /// Globally pooled BN output of the gated layer `[B, C]`.
    pub pooled: Tensor,
    /// Open channels per instance.
    pub open: Vec<usize>,
    /// Indices of the first instance's open channels.
    pub open_first: Vec<usize>,
    /// Output height x width of the convolution.
    pub out_hw: usize,
}

/// One gated convolution.
#[derive(Debug, Clone)]
pub struct GateInfo {
    pub name: String,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Kernel elements (kh * kw).
    pub kernel: usize,
    /// The gate whose mask zeroes this convolution's input channels (the block's first gate
    /// for its second convolution).
    pub input_gate: Option<usize>,
    pub threshold: f32,
    /// Sum over training instances of the gate values since the last threshold update.
    pub value_sum: Vec<f64>,
    pub samples: usize,
    pub last: Option<GateRecord>,
}

/// Gates of one network, shared by its layers, the factory and the callback.
#[derive(Debug, Default)]
pub struct GateState {
    pub gates: Vec<GateInfo>,
    /// Set between a gated conv and the norm that applies its mask.
    pending: Option<(usize, Tensor, Tensor)>,
}

pub type SharedGates = Arc<Mutex<GateState>>;

/// The gate sub-network `FC2(ReLU(FC1(GAP(x))))`.
struct Gate {
    fc1: candle_core::Var,
    fc2: candle_core::Var,
    b2: candle_core::Var,
}

/// A convolution whose output channels are gated per instance (the mask is applied by the
/// [`GatedNorm`] that follows it).
pub struct GatedConv {
    conv: Conv2d,
    gate: Gate,
    index: usize,
    clamp_max: f64,
    state: SharedGates,
}

impl GatedConv {
    /// Gate values `m~` `[B, C_out]` from the input.
    fn gate_values(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let pooled = x.mean(D::Minus1)?.mean(D::Minus1)?;
        let h = pooled.matmul(&self.gate.fc1.as_tensor().t()?)?.relu()?;
        let y = h.matmul(&self.gate.fc2.as_tensor().t()?)?.broadcast_add(self.gate.b2.as_tensor())?;
        y.relu()?.clamp(0f64, self.clamp_max)
    }
}

impl ModuleT for GatedConv {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let values = self.gate_values(x)?;
        let (threshold, input_gate) = {
            let s = self.state.lock().expect("gate state");
            (s.gates[self.index].threshold, s.gates[self.index].input_gate)
        };
        let keep = values.ge(threshold as f64)?.to_dtype(values.dtype())?.detach();
        let mask = (&values * &keep)?;
        let y = if !train && x.dim(0)? == 1 {
            // batch of one: compute only the open filters over the open input channels
            let open_out = open_indices(&keep.squeeze(0)?)?;
            let open_in = match input_gate {
                Some(g) => self.state.lock().expect("gate state").gates[g]
                    .last
                    .as_ref()
                    .map(|r| r.open_first.clone()),
                None => None,
            };
            self.sparse_forward(x, &open_out, open_in.as_deref())?
        } else {
            nn_core::layers::conv::conv2d(x, self.conv.weight.as_tensor(), &self.conv.config)?
        };
        if nn_core::summary::is_recording() {
            // dense counts (the per-instance savings are in `instance_macs`), gate included
            let cfg = self.conv.config;
            let (oh, ow) = (y.dim(2)?, y.dim(3)?);
            let gate_params = self.gate.fc1.elem_count() + self.gate.fc2.elem_count() + self.gate.b2.elem_count();
            nn_core::summary::record(|| nn_core::summary::LayerStat {
                name: self.conv.name().to_string(),
                kind: "GatedConv2d".into(),
                out_shape: y.dims().to_vec(),
                params: self.conv.weight.elem_count() + gate_params,
                macs: cfg.macs(oh, ow) + (self.gate.fc1.elem_count() + self.gate.fc2.elem_count()) as u64,
                ..Default::default()
            });
        }
        self.state.lock().expect("gate state").pending = Some((self.index, values, mask));
        Ok(y)
    }
}

fn open_indices(keep: &Tensor) -> candle_core::Result<Vec<u32>> {
    Ok(keep
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?
        .iter()
        .enumerate()
        .filter(|(_, &k)| k > 0.0)
        .map(|(i, _)| i as u32)
        .collect())
}

impl GatedConv {
    /// The convolution restricted to open output filters (and, when the input's gate is
    /// known, to its open channels), scattered back to the full channel count.
    fn sparse_forward(&self, x: &Tensor, open_out: &[u32], open_in: Option<&[usize]>) -> candle_core::Result<Tensor> {
        let cfg = self.conv.config;
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = cfg.output_hw(h, w);
        let cout = cfg.out_channels;
        if open_out.is_empty() {
            return Tensor::zeros((1, cout, oh, ow), x.dtype(), x.device());
        }
        let dev = x.device();
        let out_idx = Tensor::new(open_out, dev)?;
        let mut wgt = self.conv.weight.as_tensor().index_select(&out_idx, 0)?;
        let mut input = x.clone();
        let mut sub = cfg;
        sub.out_channels = open_out.len();
        if let Some(open_in) = open_in.filter(|o| !o.is_empty() && o.len() < cfg.in_channels && cfg.groups == 1) {
            let in_idx = Tensor::new(open_in.iter().map(|&i| i as u32).collect::<Vec<_>>().as_slice(), dev)?;
            wgt = wgt.index_select(&in_idx, 1)?;
            input = x.index_select(&in_idx, 1)?;
            sub.in_channels = open_in.len();
        }
        let y = nn_core::layers::conv::conv2d(&input, &wgt, &sub)?;
        if open_out.len() == cout {
            return Ok(y);
        }
        Tensor::zeros((1, cout, oh, ow), y.dtype(), dev)?.index_add(&out_idx, &y, 1)
    }
}

/// BatchNorm followed by the mask of the gated convolution before it.
pub struct GatedNorm {
    bn: BoxedLayer,
    state: SharedGates,
}

impl ModuleT for GatedNorm {
    fn forward_t(&self, y: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let z = self.bn.forward_t(y, train)?;
        let mut s = self.state.lock().expect("gate state");
        let Some((index, values, mask)) = s.pending.take() else {
            candle_core::bail!("a gated norm ran without the gated convolution before it");
        };
        let (b, c, h, w) = z.dims4()?;
        let (open, open_first) = {
            let m = mask.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let first = m[0]
                .iter()
                .enumerate()
                .filter(|(_, &v)| v > 0.0)
                .map(|(i, _)| i)
                .collect::<Vec<_>>();
            (
                m.iter().map(|row| row.iter().filter(|&&v| v > 0.0).count()).collect::<Vec<_>>(),
                first,
            )
        };
        let pooled = z.mean(D::Minus1)?.mean(D::Minus1)?;
        let info = &mut s.gates[index];
        if train {
            let sums = values.detach().to_dtype(DType::F64)?.sum(0)?.to_vec1::<f64>()?;
            for (acc, v) in info.value_sum.iter_mut().zip(sums) {
                *acc += v;
            }
            info.samples += b;
        }
        info.last = Some(GateRecord {
            gate: values,
            pooled,
            open,
            open_first,
            out_hw: h * w,
        });
        drop(s);
        z.broadcast_mul(&mask.reshape((b, c, 1, 1))?)?.reshape((b, c, h, w))
    }
}

/// Builds gated backbones: every `Body` convolution gets a gate, and the `Body` norm that
/// follows it applies the mask. Stem, shortcuts and the classifier are left dense.
pub struct ManiDpFactory {
    pub config: ManiDpConfig,
    pub state: SharedGates,
}

impl ManiDpFactory {
    pub fn new(config: ManiDpConfig) -> Self {
        Self {
            config,
            state: Arc::new(Mutex::new(GateState::default())),
        }
    }
}

impl LayerFactory for ManiDpFactory {
    fn conv2d(&self, vp: &VarPath, cfg: Conv2dConfig, role: LayerRole) -> candle_core::Result<BoxedLayer> {
        let conv = Conv2d::new(vp, cfg)?;
        if role != LayerRole::Body || cfg.bias {
            return Ok(Box::new(conv));
        }
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let sq = if cout < 80 {
            (self.config.squeeze_rate / 2).max(1)
        } else {
            self.config.squeeze_rate.max(1)
        };
        let hidden = (cout / sq).max(1);
        let g = vp.pp("gate");
        let fc1 = g.param("fc1.weight", &[hidden, cin], Init::KAIMING_RELU_FAN_OUT, ParamKind::Weight)?;
        // tiny FC2 weights with bias 1: every gate starts open at ~1, so the gated network starts
        // as (almost exactly) the trained dense one while FC1 still gets gradients (the official
        // code draws FC2 with Kaiming init, which changes the network's function before training)
        let fc2 = g.param(
            "fc2.weight",
            &[cout, hidden],
            Init::Normal { mean: 0.0, std: 1e-3 },
            ParamKind::Weight,
        )?;
        let b2 = g.param("fc2.bias", &[cout], Init::ONES, ParamKind::Bias)?;
        let mut s = self.state.lock().expect("gate state");
        let name = vp.prefix().to_string();
        let input_gate = name
            .strip_suffix("conv2")
            .and_then(|p| s.gates.iter().position(|gi| gi.name == format!("{p}conv1")));
        s.gates.push(GateInfo {
            name,
            in_channels: cin,
            out_channels: cout,
            kernel: cfg.kernel.0 * cfg.kernel.1,
            input_gate,
            threshold: f32::NEG_INFINITY,
            value_sum: vec![0.0; cout],
            samples: 0,
            last: None,
        });
        Ok(Box::new(GatedConv {
            conv,
            gate: Gate { fc1, fc2, b2 },
            index: s.gates.len() - 1,
            clamp_max: self.config.clamp_max,
            state: self.state.clone(),
        }))
    }

    fn norm(&self, vp: &VarPath, channels: usize, role: LayerRole) -> candle_core::Result<BoxedLayer> {
        let bn: BoxedLayer = Box::new(BatchNorm::new(vp, channels)?);
        if role != LayerRole::Body {
            return Ok(bn);
        }
        Ok(Box::new(GatedNorm {
            bn,
            state: self.state.clone(),
        }))
    }

    fn name(&self) -> &str {
        "manidp"
    }
}

/// Complexity weights `w_b` of the instances' losses (sparsity term of sec. 3.2).
pub fn complexity_weights(losses: &[f32], mean_loss: f64, easy_threshold: f64, gamma: f64) -> Vec<f32> {
    let t = easy_threshold * mean_loss;
    losses
        .iter()
        .map(|&l| {
            let l = l as f64;
            if l < t && t > 0.0 {
                ((t - l) / t).max(1e-10).powf(gamma) as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// `|| G(a) - G(b) ||_F^2 / B^2` with `G(Z)` the cosine similarities of the rows of `Z`
/// (manifold alignment, sec. 3.3).
pub fn similarity_loss(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let gram = |z: &Tensor| -> candle_core::Result<Tensor> {
        let z = z.flatten_from(1)?;
        // clamp the squared norm before the square root: clamping after it sends a zero
        // gradient into sqrt's infinite derivative at 0, and 0 * inf is NaN (an instance whose
        // gates are all closed has an all-zero row)
        let norm = z.sqr()?.sum_keepdim(1)?.clamp(1e-24, f64::INFINITY)?.sqrt()?;
        let z = z.broadcast_div(&norm)?;
        z.matmul(&z.t()?)
    };
    let bsz = a.dim(0)? as f64;
    let d = (gram(a)? - gram(b)?)?;
    d.sqr()?.sum_all()? / (bsz * bsz)
}

/// Kept-channel ratio at progress `p` of the schedule (cosine from 1 at `p = 0` to `target`
/// at `p >= 1`).
pub fn kept_ratio_at(progress: f64, target: f64) -> f64 {
    (1.0 - target) / 2.0 * (std::f64::consts::PI * progress.clamp(0.0, 1.0)).cos() + (1.0 + target) / 2.0
}

/// Kept-channel ratio after epoch `epoch` of `epochs` with one update per epoch (the official
/// schedule).
pub fn kept_ratio(epoch: usize, epochs: usize, target: f64) -> f64 {
    kept_ratio_at((epoch + 1) as f64 / epochs as f64, target)
}

/// Threshold that keeps the `ceil(ratio * C)` largest mean gate values open.
pub fn threshold_for(mean_values: &[f64], ratio: f64) -> f32 {
    let mut v = mean_values.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    let k = ((ratio * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[k - 1] as f32
}

/// Multiply-accumulates of each instance of the latest forward pass: the dense count minus
/// what the gates closed (closed output filters and, for a block's second convolution, the
/// input channels its first gate closed).
pub fn instance_macs(state: &SharedGates, dense_macs: u64) -> Result<Vec<u64>> {
    let s = state.lock().expect("gate state");
    let Some(b) = s.gates.first().and_then(|g| g.last.as_ref()).map(|r| r.open.len()) else {
        bail!("no forward pass recorded by the gates");
    };
    let mut out = vec![dense_macs; b];
    for g in &s.gates {
        let r = g.last.as_ref().ok_or_else(|| anyhow::anyhow!("gate {} has no record", g.name))?;
        for (i, m) in out.iter_mut().enumerate() {
            let a_in = match g.input_gate {
                Some(ig) => s.gates[ig].last.as_ref().map_or(g.in_channels, |r| r.open[i]),
                None => g.in_channels,
            };
            let dense = (g.kernel * g.in_channels * g.out_channels * r.out_hw) as u64;
            let sparse = (g.kernel * a_in * r.open[i] * r.out_hw) as u64;
            *m -= dense - sparse;
        }
    }
    Ok(out)
}

/// The ManiDP training terms and the threshold schedule, as an nn-core training callback.
pub struct ManiDpCallback {
    pub config: ManiDpConfig,
    pub state: SharedGates,
    /// Mean training cross-entropy of the previous epoch (`Lbar`).
    pub prev_mean_loss: Option<f64>,
    loss_sum: f64,
    loss_count: usize,
    /// (sparsity, manifold) of the last step.
    pub last_terms: (f64, f64),
}

impl ManiDpCallback {
    pub fn new(config: ManiDpConfig, state: SharedGates) -> Self {
        Self {
            config,
            state,
            prev_mean_loss: None,
            loss_sum: 0.0,
            loss_count: 0,
            last_terms: (0.0, 0.0),
        }
    }

    /// Fraction of gate channels open in the latest forward pass (mean over instances).
    pub fn open_fraction(&self) -> f64 {
        let s = self.state.lock().expect("gate state");
        let (mut open, mut total) = (0usize, 0usize);
        for g in &s.gates {
            if let Some(r) = &g.last {
                open += r.open.iter().sum::<usize>();
                total += g.out_channels * r.open.len();
            }
        }
        if total == 0 {
            1.0
        } else {
            open as f64 / total as f64
        }
    }
}

impl Callback for ManiDpCallback {
    fn name(&self) -> String {
        "manidp".into()
    }

    fn on_epoch_begin(&mut self, _epoch: usize, _ctx: &FitContext) -> Result<()> {
        self.loss_sum = 0.0;
        self.loss_count = 0;
        Ok(())
    }

    fn extra_loss(&mut self, step: &StepContext) -> Result<Option<Tensor>> {
        let logp = nn_core::layers::functional::log_softmax(&step.logits.detach(), 1)?;
        let labels = step.labels.to_dtype(DType::U32)?.unsqueeze(1)?;
        let losses: Vec<f32> = logp.gather(&labels, 1)?.squeeze(1)?.neg()?.to_dtype(DType::F32)?.to_vec1()?;
        self.loss_sum += losses.iter().map(|&l| l as f64).sum::<f64>();
        self.loss_count += losses.len();
        let mean = self.prev_mean_loss.unwrap_or(self.loss_sum / self.loss_count.max(1) as f64);
        let c = &self.config;
        let w = complexity_weights(&losses, mean, c.easy_threshold, c.gamma);
        let dev = step.logits.device();
        let w = Tensor::new(w.as_slice(), dev)?;
        let s = self.state.lock().expect("gate state");
        let mut sparsity: Option<Tensor> = None;
        let mut manifold: Option<Tensor> = None;
        for g in &s.gates {
            let Some(r) = &g.last else { continue };
            let sp = (r.gate.mean(1)? * &w)?.mean_all()?;
            let mf = similarity_loss(&r.gate, &r.pooled)?;
            sparsity = Some(match sparsity {
                Some(a) => (a + sp)?,
                None => sp,
            });
            manifold = Some(match manifold {
                Some(a) => (a + mf)?,
                None => mf,
            });
        }
        drop(s);
        let (Some(sp), Some(mf)) = (sparsity, manifold) else {
            return Ok(None);
        };
        self.last_terms = (sp.to_scalar::<f32>()? as f64, mf.to_scalar::<f32>()? as f64);
        Ok(Some(((sp * c.lambda_sparsity)? + (mf * c.lambda_manifold)?)?))
    }

    /// Every `steps_per_epoch / threshold_updates_per_epoch` steps: thresholds from the mean
    /// gate values since the previous update, at the kept ratio of the run's progress.
    fn on_step_end(&mut self, step: &StepContext, _loss: f64) -> Result<()> {
        let interval = (step.steps_per_epoch / self.config.threshold_updates_per_epoch.max(1)).max(1);
        let done = step.global_step + 1;
        if done % interval != 0 {
            return Ok(());
        }
        let updates = (step.total_steps / interval).max(1) as f64;
        let progress = (done / interval) as f64 / (updates * self.config.ramp_fraction.clamp(1e-6, 1.0));
        let ratio = kept_ratio_at(progress, self.config.target_kept);
        let mut s = self.state.lock().expect("gate state");
        for g in s.gates.iter_mut().filter(|g| g.samples > 0) {
            let means: Vec<f64> = g.value_sum.iter().map(|v| v / g.samples as f64).collect();
            g.threshold = threshold_for(&means, ratio);
            g.value_sum.iter_mut().for_each(|v| *v = 0.0);
            g.samples = 0;
        }
        Ok(())
    }

    fn on_epoch_end(&mut self, _metrics: &EpochMetrics, _ctx: &FitContext) -> Result<()> {
        if self.loss_count > 0 {
            self.prev_mean_loss = Some(self.loss_sum / self.loss_count as f64);
        }
        Ok(())
    }

    fn state(&self) -> Result<Option<serde_json::Value>> {
        let s = self.state.lock().expect("gate state");
        Ok(Some(serde_json::json!({
            "thresholds": s.gates.iter().map(|g| g.threshold as f64).collect::<Vec<_>>(),
            "prev_mean_loss": self.prev_mean_loss,
        })))
    }

    fn load_state(&mut self, v: &serde_json::Value) -> Result<()> {
        let mut s = self.state.lock().expect("gate state");
        if let Some(t) = v["thresholds"].as_array() {
            if t.len() != s.gates.len() {
                bail!("checkpoint has {} gate thresholds, the model has {} gates", t.len(), s.gates.len());
            }
            for (g, x) in s.gates.iter_mut().zip(t) {
                g.threshold = x.as_f64().map_or(f32::NEG_INFINITY, |x| x as f32);
            }
        }
        self.prev_mean_loss = v["prev_mean_loss"].as_f64();
        Ok(())
    }
}
