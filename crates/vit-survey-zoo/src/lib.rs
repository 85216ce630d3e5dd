//! # vit-survey-zoo
//!
//! The backbones reviewed in "A Survey on Vision Transformer" (Han et al., TPAMI 2022), written
//! on nn-core so that each one matches its reference architecture exactly (timm's parameter
//! names and counts), trains (gradients reach every parameter) and loads published weights.
//!
//! - [`registry`]: [`create_model`]`(name, num_classes, image_size)` and [`MODEL_NAMES`], like
//!   `timm.create_model`; every model implements nn-core's [`nn_core::Model`]
//!   (`forward_features`, `forward_head`, per-stage `forward_stages` for pyramid models) and
//!   [`ZooModel::macs`], an analytic count of multiply-accumulates.
//! - [`layers`]: linear, LayerNorm, MLP, multi-head attention, stochastic depth, position
//!   embedding resampling.
//! - [`vit`]: ViT and DeiT (distillation token).
//! - [`weights`]: loading safetensors files with timm's key names, with a report of missing,
//!   unexpected and mis-shaped keys.
//!
//! ## Why each dependency is here
//! - `nn-core`: the [`nn_core::Model`] trait, the variable store (names, seeded init,
//!   safetensors), convolution kernels, and the differentiable softmax / LayerNorm
//!   (candle-nn's fused ones record no backward pass).
//! - `candle-core`: tensors and autograd; `candle-nn`: re-exported types used by nn-core.
//! - `rand`: the seeded stochastic-depth masks.

pub mod convit;
pub mod layers;
pub mod levit;
pub mod pit;
pub mod pvt;
pub mod registry;
pub mod swin;
pub mod tnt;
pub mod vit;
pub mod weights;

pub use registry::{create_model, create_model_with, model_names, Built, ModelOptions, ZooModel, MODEL_NAMES};
