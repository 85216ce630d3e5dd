//! The source model of the SHOT / SFDA-DE protocol: an nn-core backbone's pooled features, a
//! bottleneck (linear + BatchNorm) and a linear classifier whose weight rows are the class
//! "anchors" of SFDA-DE.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
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
        }
    }
}

/// Backbone -> bottleneck (linear + BN) -> linear classifier.
pub struct SourceModel {
    vs: VarStore,
    spec: ModelSpec,
    backbone: Box<dyn Model>,
    bottleneck: Linear,
    bottleneck_bn: BatchNorm,
    classifier: Linear,
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
        let classifier = Linear::new(&root.pp(CLASSIFIER), spec.bottleneck_dim, spec.num_classes, true)?;
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
        use candle_core::ModuleT;
        Ok(self.classifier.forward_t(features, false)?)
    }

    /// The anchors: the classifier's weight vectors, `[num_classes, bottleneck_dim]` (a copy).
    pub fn anchors(&self) -> Result<Tensor> {
        Ok(self.classifier.weight.as_tensor().copy()?)
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
        use candle_core::ModuleT;
        self.classifier.forward_t(features, train)
    }
    fn num_classes(&self) -> usize {
        self.spec.num_classes
    }
    fn num_features(&self) -> usize {
        self.spec.bottleneck_dim
    }
}
