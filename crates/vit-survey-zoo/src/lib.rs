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
//!   embedding resampling, analytic MAC formulas.
//! - [`vit`]: ViT-Ti/S/B, DeiT-Ti with the distillation token, CPVT-S (positional encoding
//!   generator instead of a position embedding).
//! - [`swin`]: Swin-T (shifted windows, relative position bias, patch merging).
//! - [`pvt`]: PVT v1 Tiny/Small (official code's names) and PVTv2-B0 (overlapping patch
//!   embedding, spatial-reduction attention, convolutional feed-forward).
//! - [`pit`]: PiT-Ti (pooling between stages); [`convit`]: ConViT-Ti (gated positional
//!   self-attention); [`tnt`]: TNT-S/B (inner and outer transformers); [`levit`]: LeViT-128S
//!   (attention biases, BatchNorm'd linears, attention downsampling); [`cmt`]: CMT-Ti
//!   (convolutional stem, local perception unit, lightweight attention, IRFFN).
//! - [`t2t`]: T2T-ViT-7/14 (tokens-to-token module with Performer layers, the official
//!   repository's `performer` variant).
//! - [`efficient`]: the survey's efficiency methods on ViT/DeiT: attention-head pruning
//!   (gradient head importance, physical removal), token pruning by class attention (EViT),
//!   int8 per-channel post-training quantization of the linear layers.
//! - [`weights`]: loading safetensors files with timm's key names, with a report of missing,
//!   unexpected and mis-shaped keys; position embeddings are resampled to the model's grid.
//!
//! ## The registry
//!
//! `create_model("swin_tiny_patch4_window7_224", 1000, 224)` builds a model with seeded
//! random weights and returns it with its [`nn_core::VarStore`]; [`create_model_with`] takes
//! [`ModelOptions`] (input channels, stochastic depth, `cheap_init` to skip random draws when
//! only counting or before loading weights) and a [`nn_core::VarPath`]. The image size sets the
//! token grid and the position tables; models built for one size reject other input sizes with
//! an error naming both. [`MODEL_NAMES`] lists every name with a description; the `_32` names
//! are small CIFAR-size variants of the same code.
//!
//! Exactness: each model's parameter count equals timm 1.0.31's (the official code's for PVT
//! v1), pinned in `tests/counts.rs`, and with the same weights (timm's state dict written to
//! safetensors) the logits agree with timm's to about 1e-6 (`tests/timm_parity.rs`, run by hand
//! with the files from `bench/torch/vit_survey_zoo_reference.py export`).
//!
//! ## Why each dependency is here
//! - `nn-core`: the [`nn_core::Model`] trait, the variable store (names, seeded init,
//!   safetensors), convolution kernels, and the differentiable softmax / LayerNorm
//!   (candle-nn's fused ones record no backward pass).
//! - `candle-core`: tensors and autograd; `candle-nn`: the `ModuleT` trait of nn-core's
//!   BatchNorm (LeViT) and the sigmoid of ConViT's gates.
//! - `rand`: the seeded stochastic-depth masks.

pub mod cmt;
pub mod convit;
pub mod efficient;
pub mod layers;
pub mod levit;
pub mod pit;
pub mod pvt;
pub mod registry;
pub mod swin;
pub mod t2t;
pub mod tnt;
pub mod vit;
pub mod weights;

pub use registry::{create_model, create_model_with, model_names, vit_config, Built, ModelOptions, ZooModel, MODEL_NAMES};
