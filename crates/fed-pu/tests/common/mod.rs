//! Shared helpers of the integration tests: a synthetic dataset and a tiny MLP model.
#![allow(dead_code)]

use candle_core::{Result, Tensor};
use fed_pu::engine::ModelBuilder;
use fed_pu::FedDataset;
use nn_core::candle_nn::ModuleT;
use nn_core::layers::Linear;
use nn_core::models::{create_model, ModelConfig};
use nn_core::{Model, VarPath};
use rand::Rng;
use std::sync::Arc;

/// `n` images of `1 x s x s`, `classes` classes: class `c` lights up a class-specific block of
/// pixels, plus uniform noise (seeded), so a small model learns it in a few steps.
pub fn synthetic(n: usize, classes: usize, s: usize, seed: u64) -> FedDataset {
    let mut rng = nn_core::rng::seeded(seed);
    let mut images = Vec::with_capacity(n * s * s);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let c = (i * 7 + i / 3) % classes;
        labels.push(c as u32);
        for p in 0..s * s {
            let on = p % classes == c;
            images.push(if on { 1.0 } else { 0.0 } + rng.gen_range(-0.5f32..0.5));
        }
    }
    FedDataset::new("synthetic", images, labels, (1, s, s), classes).unwrap()
}

pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    classes: usize,
}

impl Model for Mlp {
    fn name(&self) -> &str {
        "mlp"
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.fc1.forward_t(&x.flatten_from(1)?, train)?.relu()
    }
    fn forward_head(&self, f: &Tensor, train: bool) -> Result<Tensor> {
        self.fc2.forward_t(f, train)
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn num_features(&self) -> usize {
        16
    }
}

pub fn mlp_builder(inputs: usize, classes: usize) -> ModelBuilder {
    Arc::new(move |vp: &VarPath| -> Result<Box<dyn Model>> {
        Ok(Box::new(Mlp {
            fc1: Linear::new(&vp.pp("fc1"), inputs, 16, true)?,
            fc2: Linear::new(&vp.pp("fc2"), 16, classes, true)?,
            classes,
        }))
    })
}

pub fn lenet_builder(classes: usize, size: usize) -> ModelBuilder {
    Arc::new(move |vp: &VarPath| create_model("lenet5", &ModelConfig::new(1, classes, size), vp, &nn_core::StandardFactory))
}

pub fn max_abs_diff(a: &fed_pu::Weights, b: &fed_pu::Weights) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut m = 0f32;
    for (k, ta) in a {
        let va = ta.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let vb = b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (x, y) in va.iter().zip(&vb) {
            m = m.max((x - y).abs());
        }
    }
    m
}
