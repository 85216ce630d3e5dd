//! PKKD: kernel based progressive knowledge distillation for adder networks (Xu et al., NeurIPS
//! 2020).
//!
//! * **Progressive**: a CNN of the same architecture is initialised and trained *together* with
//!   the ANN ([`PkkdPair`] holds both in one `VarStore`, one optimizer); the teacher learns from
//!   the labels (its own cross-entropy) and the ANN learns from the teacher at the same stage of
//!   training, rather than from a converged teacher.
//! * **Kernels** (Sec. 3.1): an ANN response `Y_a = -||x - f||_1` and a CNN response `Y_c = x . f`
//!   follow different distributions (Laplacian-like vs Gaussian-like). Both are mapped into a
//!   kernel space: the ANN's through the Laplacian kernel
//!   `k_a(x, f) = exp(-||x - f||_1 / sigma_a) = exp(Y_a / sigma_a)` ([`laplacian_kernel_map`]),
//!   the CNN's through the Gaussian (RBF) kernel
//!   `k_c(x, f) = exp(-||x - f||_2^2 / (2 sigma_c^2))`, written with the response as
//!   `exp(-(||x||^2 - 2 Y_c + ||f||^2) / (2 sigma_c^2))` ([`gaussian_kernel_map`]), where
//!   `||x||^2` is the squared norm of each receptive field (a convolution of `x^2` with ones).
//! * **Linear maps**: each kernel output goes through a learnable 1x1 convolution (initialised
//!   to the identity), and the two are matched with an L2 loss at intermediate layers
//!   ([`PkkdConfig::layers`], by default the last body layer of every stage). To keep the two
//!   learnable maps from shrinking to zero together, each mapped feature map is normalised to
//!   unit L2 norm per sample before the loss (our choice; the teacher features are detached,
//!   the teacher's map still learns).
//! * **Logits**: temperature-scaled KD (`T^2 KL(softmax(t/T) || softmax(s/T))`, nn-core's
//!   `kd_loss`) from the teacher's logits.
//!
//! Total loss of one step: `CE(ANN) + CE(CNN) * teacher_weight + feature_weight * sum_l L2_l +
//! kd_weight * KD`. The kernel widths are relative to the filter size `K = Cin/groups * kh * kw`
//! of the matched layer (`sigma_a = sigma_ann * K`, `2 sigma_c^2 = sigma_cnn * K`), since both
//! distances grow linearly with `K`. The paper's exact widths and loss weights are not given in
//! a form we could check here; every one of them is a parameter of [`PkkdConfig`].

use crate::factory::{AdderConfig, AdderFactory};
use crate::layer::AdderRegistry;
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::ModuleT;
use nn_core::layers::{Activation, BoxedLayer, Conv2d, Conv2dConfig};
use nn_core::models::{create_model, ModelConfig};
use nn_core::ops::Conv2dOpts;
use nn_core::train::{cross_entropy, kd_loss, Callback, StepContext};
use nn_core::var_store::VarPath;
use nn_core::{LayerFactory, LayerRole, Model, StandardFactory};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Laplacian kernel map of ANN responses: `exp(y / sigma)` for `y = -||x - f||_1`.
pub fn laplacian_kernel_map(y_ann: &Tensor, sigma: f64) -> Result<Tensor> {
    if sigma.is_nan() || sigma <= 0.0 {
        candle_core::bail!("laplacian kernel: sigma must be > 0, got {sigma}");
    }
    y_ann.affine(1.0 / sigma, 0.0)?.exp()
}

/// Gaussian kernel map of CNN responses: `exp(-(x_sq - 2 y + f_sq) / (2 sigma^2))`, with `y`
/// `[N, C, H, W]` the responses `x . f`, `x_sq` `[N, 1, H, W]` the squared norms of the
/// receptive fields and `f_sq` `[C]` the squared norms of the filters. The squared distance is
/// clamped at 0 against rounding.
pub fn gaussian_kernel_map(y_cnn: &Tensor, x_sq: &Tensor, f_sq: &Tensor, sigma: f64) -> Result<Tensor> {
    if sigma.is_nan() || sigma <= 0.0 {
        candle_core::bail!("gaussian kernel: sigma must be > 0, got {sigma}");
    }
    let c = y_cnn.dims()[1];
    let d2 = y_cnn
        .affine(-2.0, 0.0)?
        .broadcast_add(x_sq)?
        .broadcast_add(&f_sq.reshape((1, c, 1, 1))?)?
        .relu()?;
    d2.affine(-1.0 / (2.0 * sigma * sigma), 0.0)?.exp()
}

/// Squared norm of every receptive field of `x` under a convolution `cfg` (one group):
/// `[N, 1, OH, OW]`.
pub fn patch_sq_norm(x: &Tensor, cfg: &Conv2dConfig) -> Result<Tensor> {
    if cfg.groups != 1 {
        candle_core::bail!("pkkd: matched layers must have one group, got {}", cfg.groups);
    }
    let ones = Tensor::ones((1, cfg.in_channels, cfg.kernel.0, cfg.kernel.1), x.dtype(), x.device())?;
    nn_core::ops::conv2d(
        &x.sqr()?,
        &ones,
        Conv2dOpts {
            stride: cfg.stride,
            padding: cfg.padding,
            dilation: cfg.dilation,
            groups: 1,
        },
    )
}

/// Widths, weights and matched layers of PKKD.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PkkdConfig {
    /// Laplacian width relative to the filter size: `sigma_a = sigma_ann * K`.
    pub sigma_ann: f64,
    /// Gaussian width relative to the filter size: `2 sigma_c^2 = sigma_cnn * K`.
    pub sigma_cnn: f64,
    /// Weight of the summed kernel feature losses.
    pub feature_weight: f64,
    /// Weight of the logit KD loss.
    pub kd_weight: f64,
    /// KD temperature.
    pub temperature: f64,
    /// Weight of the teacher's own cross-entropy (the co-training of the CNN).
    pub teacher_weight: f64,
    /// Matched layers, as parameter paths inside the model (`layer1.2.conv2`); empty: the
    /// defaults of [`default_layers`].
    pub layers: Vec<String>,
}

impl Default for PkkdConfig {
    fn default() -> Self {
        Self {
            sigma_ann: 1.0,
            sigma_cnn: 2.0,
            feature_weight: 1.0,
            kd_weight: 1.0,
            temperature: 4.0,
            teacher_weight: 1.0,
            layers: Vec::new(),
        }
    }
}

/// The last body layer of every stage: `layer{s}.{n-1}.conv2` for basic-block ResNets,
/// `layer{s}.{n-1}.conv3` for the bottleneck ResNet-50/101/152, `conv2` for LeNet.
pub fn default_layers(model: &str) -> Result<Vec<String>> {
    let stage = |stages: usize, blocks: usize| (1..=stages).map(|s| format!("layer{s}.{}.conv2", blocks - 1)).collect();
    let bottleneck = |blocks: [usize; 4]| {
        blocks
            .iter()
            .enumerate()
            .map(|(s, n)| format!("layer{}.{}.conv3", s + 1, n - 1))
            .collect()
    };
    Ok(match model {
        m if m.starts_with("lenet5") => vec!["conv2".into()],
        "resnet18" | "resnet18-cifar" => stage(4, 2),
        "resnet34" => stage(4, 3),
        "resnet50" => bottleneck([3, 4, 6, 3]),
        "resnet101" => bottleneck([3, 4, 23, 3]),
        "resnet152" => bottleneck([3, 8, 36, 3]),
        m if m.starts_with("resnet") => {
            let depth: usize = m[6..]
                .trim_end_matches("-b")
                .parse()
                .map_err(|_| candle_core::Error::Msg(format!("pkkd: no default layers for `{m}`")))?;
            stage(3, (depth - 2) / 6)
        }
        m => candle_core::bail!("pkkd: no default matched layers for model `{m}`; pass PkkdConfig::layers"),
    })
}

/// What a tapped layer saw in the last training forward pass.
#[derive(Clone)]
struct TapValue {
    input: Tensor,
    output: Tensor,
}

#[derive(Default)]
struct TapStore {
    values: Mutex<HashMap<String, TapValue>>,
}

/// A layer that records its input and output (training passes only).
struct Tap {
    inner: BoxedLayer,
    key: String,
    store: Arc<TapStore>,
}

impl ModuleT for Tap {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.inner.forward_t(x, train)?;
        if train {
            self.store.values.lock().unwrap_or_else(|e| e.into_inner()).insert(
                self.key.clone(),
                TapValue {
                    input: x.clone(),
                    output: y.clone(),
                },
            );
        }
        Ok(y)
    }
}

/// A matched layer: its key, configuration and (teacher) filters.
#[derive(Clone)]
struct TapInfo {
    key: String,
    cfg: Conv2dConfig,
    weight: Option<Var>,
}

/// Wraps a factory so the body convolutions named in `keys` record their input and output; for the
/// teacher these are nn-core `Conv2d`s whose filters are kept for the Gaussian kernel.
struct TapFactory<'a> {
    inner: &'a dyn LayerFactory,
    keys: Vec<String>,
    store: Arc<TapStore>,
    teacher: bool,
    found: Mutex<Vec<TapInfo>>,
}

impl TapFactory<'_> {
    fn key_of(&self, vp: &VarPath) -> Option<String> {
        let p = vp.prefix();
        self.keys.iter().find(|k| p == k.as_str() || p.ends_with(&format!(".{k}"))).cloned()
    }
}

impl LayerFactory for TapFactory<'_> {
    fn conv2d(&self, vp: &VarPath, cfg: Conv2dConfig, role: LayerRole) -> Result<BoxedLayer> {
        let key = match (role, self.key_of(vp)) {
            (LayerRole::Body, Some(k)) => k,
            _ => return self.inner.conv2d(vp, cfg, role),
        };
        let (inner, weight): (BoxedLayer, Option<Var>) = if self.teacher {
            let c = Conv2d::new(vp, cfg)?;
            let w = c.weight.clone();
            (Box::new(c), Some(w))
        } else {
            (self.inner.conv2d(vp, cfg, role)?, None)
        };
        self.found.lock().unwrap_or_else(|e| e.into_inner()).push(TapInfo {
            key: key.clone(),
            cfg,
            weight,
        });
        Ok(Box::new(Tap {
            inner,
            key,
            store: self.store.clone(),
        }))
    }
    fn linear(&self, vp: &VarPath, i: usize, o: usize, bias: bool, role: LayerRole) -> Result<BoxedLayer> {
        self.inner.linear(vp, i, o, bias, role)
    }
    fn norm(&self, vp: &VarPath, channels: usize, role: LayerRole) -> Result<BoxedLayer> {
        self.inner.norm(vp, channels, role)
    }
    fn activation(&self, vp: &VarPath, act: Activation, channels: usize, role: LayerRole) -> Result<BoxedLayer> {
        self.inner.activation(vp, act, channels, role)
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
}

/// One matched layer pair with its two learnable 1x1 maps.
struct Match {
    key: String,
    student_cfg: Conv2dConfig,
    teacher_cfg: Conv2dConfig,
    teacher_weight: Var,
    map_student: Conv2d,
    map_teacher: Conv2d,
}

/// The loss terms of one PKKD step (detached scalars, for logging and tests).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PkkdTerms {
    pub teacher_ce: f64,
    pub feature: f64,
    pub kd: f64,
}

/// An ANN student and its co-trained CNN teacher. As an nn-core [`Model`] it *is* the student
/// (logits, features, evaluation); in training passes it also runs the teacher and keeps its
/// logits and the matched layers' responses for [`PkkdLoss`].
pub struct PkkdPair {
    pub student: Box<dyn Model>,
    pub teacher: Box<dyn Model>,
    pub config: PkkdConfig,
    registry: Arc<AdderRegistry>,
    s_store: Arc<TapStore>,
    t_store: Arc<TapStore>,
    matches: Vec<Match>,
    teacher_logits: Mutex<Option<Tensor>>,
    name: String,
}

fn identity_1x1(vp: &VarPath, c: usize) -> Result<Conv2d> {
    let conv = Conv2d::new(vp, Conv2dConfig::new(c, c, 1).bias(true))?;
    let eye = Tensor::eye(c, DType::F32, vp.device())?
        .to_dtype(conv.weight.dtype())?
        .reshape((c, c, 1, 1))?;
    conv.weight.set(&eye)?;
    if let Some(b) = &conv.bias {
        b.set(&b.zeros_like()?)?;
    }
    Ok(conv)
}

impl PkkdPair {
    /// Builds the ANN (`student.*`, adder layers from an [`AdderFactory`] with `adder`) and the
    /// CNN (`teacher.*`) of architecture `model`, and the 1x1 maps (`pkkd.*`) under `vp`.
    pub fn new(vp: &VarPath, model: &str, mc: &ModelConfig, config: PkkdConfig, adder: AdderConfig) -> Result<Self> {
        let keys = if config.layers.is_empty() {
            default_layers(model)?
        } else {
            config.layers.clone()
        };
        let af = AdderFactory::new(adder);
        let (s_store, t_store) = (Arc::new(TapStore::default()), Arc::new(TapStore::default()));
        let sf = TapFactory {
            inner: &af,
            keys: keys.clone(),
            store: s_store.clone(),
            teacher: false,
            found: Mutex::new(Vec::new()),
        };
        let tf = TapFactory {
            inner: &StandardFactory,
            keys: keys.clone(),
            store: t_store.clone(),
            teacher: true,
            found: Mutex::new(Vec::new()),
        };
        let student = create_model(model, mc, &vp.pp("student"), &sf)?;
        let teacher = create_model(model, mc, &vp.pp("teacher"), &tf)?;
        let sfound = sf.found.into_inner().unwrap_or_default();
        let tfound = tf.found.into_inner().unwrap_or_default();
        let mut matches = Vec::new();
        for k in &keys {
            let s = sfound.iter().find(|t| &t.key == k);
            let t = tfound.iter().find(|t| &t.key == k);
            let (s, t) = match (s, t) {
                (Some(s), Some(t)) => (s, t),
                _ => candle_core::bail!(
                    "pkkd: layer `{k}` is not a body convolution of `{model}` (valid e.g.: {:?})",
                    default_layers(model).unwrap_or_default()
                ),
            };
            let c = s.cfg.out_channels;
            let mvp = vp.pp("pkkd").pp(k.replace('.', "_"));
            matches.push(Match {
                key: k.clone(),
                student_cfg: s.cfg,
                teacher_cfg: t.cfg,
                teacher_weight: t.weight.clone().expect("teacher taps keep their filters"),
                map_student: identity_1x1(&mvp.pp("student"), c)?,
                map_teacher: identity_1x1(&mvp.pp("teacher"), c)?,
            });
        }
        Ok(Self {
            name: format!("{}-pkkd", student.name()),
            student,
            teacher,
            config: PkkdConfig { layers: keys, ..config },
            registry: af.registry(),
            s_store,
            t_store,
            matches,
            teacher_logits: Mutex::new(None),
        })
    }

    /// The student's adder filters (for [`crate::AdaptiveLr`]).
    pub fn registry(&self) -> Arc<AdderRegistry> {
        self.registry.clone()
    }

    /// The matched layer names.
    pub fn layers(&self) -> Vec<String> {
        self.matches.iter().map(|m| m.key.clone()).collect()
    }

    /// Kernel feature loss of one matched layer from the recorded responses.
    fn feature_loss(&self, m: &Match) -> Result<Tensor> {
        let get = |s: &TapStore| {
            s.values
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&m.key)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("pkkd: no recorded response of `{}` (run a training forward first)", m.key)))
        };
        let (s, t) = (get(&self.s_store)?, get(&self.t_store)?);
        let ks = m.student_cfg.weight_dims()[1..].iter().product::<usize>() as f64;
        let kt = m.teacher_cfg.weight_dims()[1..].iter().product::<usize>() as f64;
        let lap = laplacian_kernel_map(&s.output, self.config.sigma_ann * ks)?;
        let w = m.teacher_weight.as_tensor().detach();
        let f_sq = w.sqr()?.flatten_from(1)?.sum(1)?;
        let x_sq = patch_sq_norm(&t.input.detach(), &m.teacher_cfg)?;
        let gauss = gaussian_kernel_map(&t.output.detach(), &x_sq, &f_sq, (self.config.sigma_cnn * kt / 2.0).sqrt())?;
        let ms = unit_rows(&m.map_student.forward_t(&lap, true)?)?;
        let mt = unit_rows(&m.map_teacher.forward_t(&gauss, true)?)?;
        let n = ms.dims()[0] as f64;
        (ms - mt)?.sqr()?.sum_all()?.affine(1.0 / n, 0.0)
    }

    /// The PKKD terms added to the student's cross-entropy, from the last training forward:
    /// `teacher_weight * CE(teacher) + feature_weight * sum_l L2_l + kd_weight * KD(student, teacher)`.
    pub fn distill_loss(&self, student_logits: &Tensor, labels: &Tensor) -> Result<(Tensor, PkkdTerms)> {
        let t = self
            .teacher_logits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg("pkkd: no teacher logits (run a training forward first)".into()))?;
        let c = &self.config;
        let ce_t = cross_entropy(&t, labels, 0.0)?;
        let kd = kd_loss(student_logits, &t, c.temperature)?;
        let mut feat = Tensor::zeros((), DType::F32, student_logits.device())?;
        for m in &self.matches {
            feat = (feat + self.feature_loss(m)?.to_dtype(DType::F32)?)?;
        }
        let scalar = |x: &Tensor| x.to_dtype(DType::F64)?.to_scalar::<f64>();
        let terms = PkkdTerms {
            teacher_ce: scalar(&ce_t)?,
            feature: scalar(&feat)?,
            kd: scalar(&kd)?,
        };
        let total = ((ce_t.affine(c.teacher_weight, 0.0)? + feat.affine(c.feature_weight, 0.0)?.to_dtype(ce_t.dtype())?)?
            + kd.affine(c.kd_weight, 0.0)?)?;
        self.s_store.values.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.t_store.values.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok((total, terms))
    }
}

/// Each sample's feature map scaled to unit L2 norm.
fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let n = x.dims()[0];
    let f = x.reshape((n, ()))?;
    let norm = f.sqr()?.sum_keepdim(1)?.affine(1.0, 1e-12)?.sqrt()?;
    f.broadcast_div(&norm)
}

impl Model for PkkdPair {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.student.forward_features(x, train)
    }
    fn forward_head(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        self.student.forward_head(features, train)
    }
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            let t = self.teacher.forward_t(x, true)?;
            *self.teacher_logits.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        }
        self.student.forward_t(x, train)
    }
    fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        self.student.forward_stages(x, train)
    }
    fn num_classes(&self) -> usize {
        self.student.num_classes()
    }
    fn num_features(&self) -> usize {
        self.student.num_features()
    }
}

/// The training callback adding PKKD's terms to the ANN's cross-entropy; keeps the last terms
/// and their running means over the epoch.
pub struct PkkdLoss<'a> {
    pub pair: &'a PkkdPair,
    pub last: PkkdTerms,
}

impl<'a> PkkdLoss<'a> {
    pub fn new(pair: &'a PkkdPair) -> Self {
        Self {
            pair,
            last: PkkdTerms::default(),
        }
    }
}

impl Callback for PkkdLoss<'_> {
    fn name(&self) -> String {
        "pkkd".into()
    }
    fn extra_loss(&mut self, step: &StepContext) -> anyhow::Result<Option<Tensor>> {
        let (l, t) = self.pair.distill_loss(step.logits, step.labels)?;
        self.last = t;
        Ok(Some(l))
    }
}
