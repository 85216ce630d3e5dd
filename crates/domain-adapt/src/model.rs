//! The source model of the SHOT / SFDA-DE protocol: an nn-core backbone's pooled features, a
//! bottleneck (linear + BatchNorm) and a linear classifier whose weight rows are the class
//! "anchors" of SFDA-DE. The classifier is either a plain linear layer or, as in SHOT's
//! released code (`feat_classifier(type='wn')`), weight-normalised: `W_k = g_k v_k / ||v_k||`
//! (Salimans & Kingma 2016), so each anchor is a learned direction `v_k` with its own scale.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use nn_core::layers::{BatchNorm, Linear};
use nn_core::models::{create_model, ModelConfig};
use nn_core::var_store::NamedVar;
use nn_core::{Model, StandardFactory, VarStore};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Name prefix of the classifier's parameters (frozen during adaptation, as in SHOT and SFDA-DE).
pub const CLASSIFIER: &str = "classifier";

/// What a [`SourceModel`] is built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// An nn-core backbone name (`lenet5`, `lenet5-bn`, `resnet18`, ...) or `resnet50` /
    /// `resnet101` ([`crate::backbones`]); its pooled features
    /// feed the bottleneck, its own head is not used.
    pub arch: String,
    pub in_channels: usize,
    /// Height = width of the input images.
    pub image_size: usize,
    pub num_classes: usize,
    /// Width of the bottleneck, i.e. of the features the adaptation works on (SHOT: 256).
    pub bottleneck_dim: usize,
    /// The classifier layer (specs written before this field existed mean `Linear`; a linear
    /// one is not written, so their serialised form stays as it was).
    #[serde(default, skip_serializing_if = "ClassifierKind::is_linear")]
    pub classifier: ClassifierKind,
}

/// How the classifier's weights are parameterised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClassifierKind {
    /// `W` itself.
    #[default]
    Linear,
    /// `W_k = g_k v_k / ||v_k||` (SHOT's `wn` classifier).
    #[serde(rename = "wn")]
    WeightNorm,
}

impl ClassifierKind {
    pub fn is_linear(&self) -> bool {
        *self == ClassifierKind::Linear
    }
}

impl std::str::FromStr for ClassifierKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Self::Linear),
            "wn" => Ok(Self::WeightNorm),
            _ => bail!("unknown classifier `{s}`: linear or wn"),
        }
    }
}

/// The classifier: logits `f W^T + b`.
enum Classifier {
    Linear(Linear),
    /// Direction `v` `[K, D]`, scale `g` `[K]`, bias `[K]`.
    WeightNorm {
        v: Var,
        g: Var,
        bias: Var,
    },
}

impl Classifier {
    fn new(root: &nn_core::VarPath, kind: ClassifierKind, dim: usize, classes: usize) -> Result<Self> {
        let vp = root.pp(CLASSIFIER);
        Ok(match kind {
            ClassifierKind::Linear => Classifier::Linear(Linear::new(&vp, dim, classes, true)?),
            ClassifierKind::WeightNorm => {
                // v drawn like a linear layer's weight; g = ||v_k|| so that W = v at the start
                // (PyTorch's weight_norm does the same)
                let lin = Linear::new(&vp, dim, classes, true)?;
                let v = lin.weight.clone();
                let bias = lin.bias.clone().context("classifier bias")?;
                let g = vp.param("g", &[classes], nn_core::init::Init::Const(1.0), nn_core::ParamKind::Weight)?;
                g.set(&row_norms(v.as_tensor())?)?;
                Classifier::WeightNorm { v, g, bias }
            }
        })
    }

    /// The effective weight matrix `[K, D]`.
    fn weight(&self) -> candle_core::Result<Tensor> {
        match self {
            Classifier::Linear(l) => Ok(l.weight.as_tensor().clone()),
            Classifier::WeightNorm { v, g, .. } => {
                let scale = (g.as_tensor() / row_norms(v.as_tensor())?)?;
                v.as_tensor().broadcast_mul(&scale.unsqueeze(1)?)
            }
        }
    }

    fn forward(&self, features: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        use candle_core::ModuleT;
        match self {
            Classifier::Linear(l) => l.forward_t(features, train),
            Classifier::WeightNorm { bias, .. } => features.matmul(&self.weight()?.t()?)?.broadcast_add(bias.as_tensor()),
        }
    }
}

/// `||v_k||` of every row of `v` `[K, D]`: `[K]`.
fn row_norms(v: &Tensor) -> candle_core::Result<Tensor> {
    v.sqr()?.sum(1)?.sqrt()
}

impl ModelSpec {
    /// The digit protocol's model: `arch` on 1x28x28 images, 10 classes, bottleneck 256.
    pub fn digits(arch: &str) -> Self {
        Self {
            arch: arch.to_string(),
            in_channels: 1,
            image_size: 28,
            num_classes: 10,
            bottleneck_dim: 256,
            classifier: ClassifierKind::Linear,
        }
    }

    /// The same spec with another classifier.
    pub fn with_classifier(mut self, classifier: ClassifierKind) -> Self {
        self.classifier = classifier;
        self
    }
}

/// Backbone -> bottleneck (linear + BN) -> linear classifier.
pub struct SourceModel {
    vs: VarStore,
    spec: ModelSpec,
    backbone: Box<dyn Model>,
    bottleneck: Linear,
    bottleneck_bn: BatchNorm,
    classifier: Classifier,
}

impl SourceModel {
    /// A freshly initialised model (parameters drawn from `seed`).
    pub fn new(spec: &ModelSpec, seed: u64) -> Result<Self> {
        if spec.num_classes < 2 || spec.bottleneck_dim == 0 || spec.in_channels == 0 {
            bail!("invalid model spec {spec:?}: need >= 2 classes, a bottleneck and input channels");
        }
        let vs = VarStore::new(seed, &Device::Cpu);
        let root = vs.root();
        // The backbone's own head is never called; one output keeps it tiny.
        let cfg = ModelConfig::new(spec.in_channels, 1, spec.image_size);
        let bvp = root.pp("backbone");
        let backbone: Box<dyn Model> = match spec.arch.as_str() {
            "resnet50" | "resnet101" => Box::new(crate::backbones::BottleneckResNet::new(&spec.arch, &bvp, &cfg, &StandardFactory)?),
            _ => create_model(&spec.arch, &cfg, &bvp, &StandardFactory).with_context(|| format!("building backbone `{}`", spec.arch))?,
        };
        let nf = backbone.num_features();
        let bottleneck = Linear::new(&root.pp("bottleneck"), nf, spec.bottleneck_dim, true)?;
        let bottleneck_bn = BatchNorm::new(&root.pp("bottleneck_bn"), spec.bottleneck_dim)?;
        let classifier = Classifier::new(&root, spec.classifier, spec.bottleneck_dim, spec.num_classes)?;
        Ok(Self {
            vs,
            spec: spec.clone(),
            backbone,
            bottleneck,
            bottleneck_bn,
            classifier,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// An independent copy (same architecture, same values, separate storage), so the source
    /// model stays untouched while a copy is adapted.
    pub fn duplicate(&self) -> Result<Self> {
        let m = Self::new(&self.spec, self.vs.seed())?;
        m.vs.load_tensors(&self.vs.tensors(), true)?;
        Ok(m)
    }

    /// Bottleneck features `[B, bottleneck_dim]`: the space of the anchors and of the
    /// adaptation losses.
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        use candle_core::ModuleT;
        let f = self.backbone.forward_features(x, train)?;
        let f = self.bottleneck.forward_t(&f, train)?;
        Ok(self.bottleneck_bn.forward_t(&f, train)?)
    }

    /// Logits of bottleneck features.
    pub fn head(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self.classifier.forward(features, false)?)
    }

    /// The anchors: the classifier's (effective) weight vectors, `[num_classes,
    /// bottleneck_dim]` (a copy, outside the autograd graph).
    pub fn anchors(&self) -> Result<Tensor> {
        Ok(self.classifier.weight()?.detach().copy()?)
    }

    /// The parameters adaptation may change: everything except the classifier.
    pub fn feature_params(&self) -> Vec<NamedVar> {
        self.vs
            .trainable()
            .into_iter()
            .filter(|v| !v.name.starts_with(CLASSIFIER))
            .collect()
    }

    /// Parameters actually used by the forward pass (the backbone's unused head excluded).
    pub fn num_params(&self) -> usize {
        let unused: usize = self
            .vs
            .all()
            .iter()
            .filter(|v| v.name.starts_with("backbone.") && v.kind != nn_core::ParamKind::Buffer)
            .map(|v| v.var.elem_count())
            .sum::<usize>()
            - self.backbone_used_params();
        self.vs.num_params() - unused
    }

    fn backbone_used_params(&self) -> usize {
        // Count what a profiled forward pass of the features records for the backbone.
        let x = Tensor::zeros(
            (2, self.spec.in_channels, self.spec.image_size, self.spec.image_size),
            candle_core::DType::F32,
            &Device::Cpu,
        );
        match x.and_then(|x| nn_core::summary::profile(|| self.backbone.forward_features(&x, false))) {
            Ok((_, s)) => s.total_params(),
            Err(_) => 0,
        }
    }

    /// Multiply-accumulates per image of the full forward pass.
    pub fn macs(&self) -> Result<u64> {
        let x = Tensor::zeros(
            (2, self.spec.in_channels, self.spec.image_size, self.spec.image_size),
            candle_core::DType::F32,
            &Device::Cpu,
        )?;
        let (_, s) = nn_core::summary::profile(|| self.forward_t(&x, false))?;
        Ok(s.total_macs())
    }

    /// Saves every variable (safetensors).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        Ok(self.vs.save(path)?)
    }

    /// Loads a model saved by [`SourceModel::save`] with the same spec.
    pub fn load(spec: &ModelSpec, path: impl AsRef<Path>) -> Result<Self> {
        let m = Self::new(spec, 0)?;
        m.vs.load(path.as_ref())
            .with_context(|| format!("loading the source model {}", path.as_ref().display()))?;
        Ok(m)
    }
}

impl Model for SourceModel {
    fn name(&self) -> &str {
        &self.spec.arch
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.features(x, train).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    }
    fn forward_head(&self, features: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.classifier.forward(features, train)
    }
    fn num_classes(&self) -> usize {
        self.spec.num_classes
    }
    fn num_features(&self) -> usize {
        self.spec.bottleneck_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(classifier: ClassifierKind) -> ModelSpec {
        ModelSpec {
            arch: "lenet5".into(),
            in_channels: 1,
            image_size: 28,
            num_classes: 4,
            bottleneck_dim: 8,
            classifier,
        }
    }

    /// `g` starts at `||v_k||`, so a weight-normalised model starts as the plain one of the same
    /// seed; `v`, `g` and the bias all get gradients; the anchors keep `v`'s directions.
    #[test]
    fn weight_normalised_classifier() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (3, 1, 28, 28), &Device::Cpu)?;
        let plain = SourceModel::new(&spec(ClassifierKind::Linear), 7)?;
        let wn = SourceModel::new(&spec(ClassifierKind::WeightNorm), 7)?;
        let (a, b) = (plain.forward_t(&x, false)?, wn.forward_t(&x, false)?);
        let d = (a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        let names: Vec<String> = wn.var_store().trainable().iter().map(|v| v.name.clone()).collect();
        for n in ["classifier.weight", "classifier.g", "classifier.bias"] {
            assert!(names.iter().any(|m| m == n), "{n} in {names:?}");
        }
        assert!(wn.feature_params().iter().all(|v| !v.name.starts_with(CLASSIFIER)));
        let grads = b.sqr()?.sum_all()?.backward()?;
        for v in wn.var_store().trainable().iter().filter(|v| v.name.starts_with(CLASSIFIER)) {
            let g = grads.get(v.var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {}", v.name));
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{}", v.name);
        }
        // doubling g doubles the anchors but keeps their directions
        let g = wn.var_store().trainable().into_iter().find(|v| v.name == "classifier.g").unwrap();
        let before = wn.anchors()?;
        g.var.set(&(g.var.as_tensor() * 2.0)?)?;
        let after = wn.anchors()?;
        let d = ((before * 2.0)? - after)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    #[test]
    fn specs_without_the_field_are_linear_and_linear_specs_serialise_as_before() {
        let old = r#"{"arch":"lenet5","in_channels":1,"image_size":28,"num_classes":10,"bottleneck_dim":256}"#;
        let s: ModelSpec = serde_json::from_str(old).unwrap();
        assert_eq!(s.classifier, ClassifierKind::Linear);
        assert_eq!(serde_json::to_string(&s).unwrap(), old);
        let wn = s.with_classifier(ClassifierKind::WeightNorm);
        assert!(serde_json::to_string(&wn).unwrap().contains(r#""classifier":"wn""#));
        assert_eq!("wn".parse::<ClassifierKind>().unwrap(), ClassifierKind::WeightNorm);
        assert!("l2".parse::<ClassifierKind>().unwrap_err().to_string().contains("linear or wn"));
    }
}
