//! The model interface shared by every backbone of the workspace (timm-style split into
//! `forward_features` and `forward_head`).

use candle_core::{Result, Tensor};

/// A classification network.
pub trait Model: Send + Sync {
    /// A short name (`resnet20`, `lenet5`, ...).
    fn name(&self) -> &str;

    /// The pooled (or flattened) feature vector before the classifier, `[B, num_features]`.
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor>;

    /// The classifier applied to [`Model::forward_features`]' output: logits `[B, num_classes]`.
    fn forward_head(&self, features: &Tensor, train: bool) -> Result<Tensor>;

    /// Logits for a batch of images.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let f = self.forward_features(x, train)?;
        self.forward_head(&f, train)
    }

    /// Intermediate feature maps at the end of each stage (for distillation and pyramid use),
    /// followed by the pooled features. The default has only the pooled features.
    fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        Ok(vec![self.forward_features(x, train)?])
    }

    /// Number of output classes.
    fn num_classes(&self) -> usize;

    /// Width of the feature vector fed to the head.
    fn num_features(&self) -> usize;
}
