//! Layers: small modules, one concept per file, implementing candle-nn's `Module`/`ModuleT`.
//!
//! Every layer reports itself to [`crate::summary`] during a profiled forward pass.

pub mod activation;
pub mod conv;
pub mod dropout;
pub mod functional;
pub mod linear;
pub mod norm;
pub mod pool;

pub use activation::Activation;
pub use conv::{Conv2d, Conv2dConfig};
pub use dropout::Dropout;
pub use linear::Linear;
pub use norm::{BatchNorm, LayerNorm};
pub use pool::{AdaptiveAvgPool2d, AvgPool2d, Flatten, GlobalAvgPool, MaxPool2d};

use candle_core::{Result, Tensor};
use candle_nn::ModuleT;

/// A boxed layer usable from several threads.
pub type BoxedLayer = Box<dyn ModuleT + Send + Sync>;

/// Layers applied one after the other.
#[derive(Default)]
pub struct Sequential {
    layers: Vec<BoxedLayer>,
}

impl Sequential {
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends a layer.
    pub fn push(&mut self, layer: BoxedLayer) {
        self.layers.push(layer)
    }
    /// Appends a layer (builder style).
    pub fn add<L: ModuleT + Send + Sync + 'static>(mut self, layer: L) -> Self {
        self.layers.push(Box::new(layer));
        self
    }
    pub fn len(&self) -> usize {
        self.layers.len()
    }
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

impl ModuleT for Sequential {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = xs.clone();
        for l in &self.layers {
            x = l.forward_t(&x, train)?;
        }
        Ok(x)
    }
}
