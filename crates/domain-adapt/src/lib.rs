//! # domain-adapt
//!
//! Source-free domain adaptation on nn-core: a classifier trained on a labelled source domain
//! is adapted to an unlabelled target domain **without any source data**.
//!
//! ## Methods
//! - **SFDA-DE** (Ding et al., "Source-Free Domain Adaptation via Distribution Estimation",
//!   CVPR 2022), [`adapt_sfda_de`]. Each loop:
//!   1. pseudo-labels the target by spherical k-means (cosine distance) whose initial centres
//!      are the classifier's weight vectors, the *anchors*; confident samples (distance below
//!      `D_0`) of classes with at least `N_0` of them are kept ([`kmeans`]);
//!   2. estimates each class's source feature distribution as a Gaussian with the anchor's
//!      direction, the target class mean's length and the target class covariance (scaled by
//!      `gamma`; full or diagonal) ([`estimate`]);
//!   3. samples surrogate source features from it and minimises the contrastive domain
//!      discrepancy (CAN's CDD: intra-class minus inter-class multi-kernel MMD) between
//!      surrogates and target features, updating backbone and bottleneck with the classifier
//!      frozen ([`cdd`], [`adapt`]).
//! - **SHOT-IM** (Liang et al., ICML 2020), [`adapt_shot_im`], the baseline: entropy
//!   minimisation plus a diversity term on the target predictions, classifier frozen.
//! - Source training ([`train_source`]): SHOT's recipe, cross-entropy with label smoothing 0.1.
//!
//! ## API and the source-free guarantee
//! [`SourceModel`] is an nn-core backbone's pooled features, a bottleneck (linear + BatchNorm)
//! and a linear classifier ([`ModelSpec`]). The adaptation entry points are
//! `adapt_*(source: &SourceModel, target: &TargetImages, config, observer)`: the only data
//! they accept is [`TargetImages`], which holds images and has no labels. Source data has no way
//! in (a labelled [`LabeledImages`] does not type-check, see the `compile_fail` example on
//! [`adapt_sfda_de`]); the optional observer only receives the model after each round (for
//! logging accuracy on a labelled test split the method never sees). The adapted model is a
//! copy; the source model is left unchanged.
//!
//! ```no_run
//! use domain_adapt::*;
//! # fn main() -> anyhow::Result<()> {
//! # let (mnist, usps_train, usps_test): (LabeledImages, LabeledImages, LabeledImages) = todo!();
//! let model = SourceModel::new(&ModelSpec::digits("lenet5"), 0)?;
//! train_source(&model, &mnist, &SourceTrainConfig::default())?;      // source phase
//! let target = usps_train.without_labels()?;                           // labels dropped
//! let (adapted, report) = adapt_sfda_de(&model, &target, &SfdaDeConfig::default(), None)?;
//! println!("{:.2}% after {} steps", accuracy(&adapted, &usps_test, 500)?, report.steps);
//! # Ok(()) }
//! ```
//!
//! ## Presets
//! [`presets`] defines the paper's object-recognition protocols (Office-31, Office-Home with
//! ResNet-50 and VisDA with ResNet-101, [`backbones`]) on class-folder data; `cargo xtask sfda
//! --preset office31 --domains-dir DIR --source amazon --target webcam` runs them.
//!
//! ## Why each dependency is here
//! - `nn-core`: backbones, layers (linear, BatchNorm, differentiable softmax), the SGD
//!   optimizer, cross-entropy with label smoothing, seeded RNG streams, IDX reading and the
//!   resize/normalise transforms.
//! - `candle-core`: tensors and autograd (the CDD and IM losses are tensor expressions).
//! - `rand`, `rand_distr`: seeded sampling of classes, target samples and Gaussian surrogates.
//! - `serde`: serialisable configurations and reports (written into `summary.json`).
//! - `anyhow`: errors that say which input or step is wrong.
//! - `serde_json`, `rand_chacha`, `image` (tests only): the `ModelSpec` JSON round trip, seeded
//!   synthetic features, and the class-folder images generated for the preset tests.

pub mod adapt;
pub mod backbones;
pub mod cdd;
pub mod data;
pub mod estimate;
pub mod kmeans;
pub mod model;
pub mod presets;
pub mod source;

pub use adapt::{adapt_sfda_de, adapt_shot_im, information_maximization, AdaptReport, RoundStats, SfdaDeConfig, ShotImConfig};
pub use cdd::{cdd, mmd2, CddLoss, KernelConfig};
pub use data::{accuracy, LabeledImages, TargetImages};
pub use estimate::{ClassGaussian, Covariance, EstimatorConfig};
pub use kmeans::{spherical_kmeans, Clustering, KMeansConfig};
pub use model::{ModelSpec, SourceModel};
pub use source::{train_source, SourceTrainConfig, SourceTrainReport};
