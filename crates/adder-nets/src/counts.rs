//! Operation counts and the energy estimate of the AdderNet paper (Sec. 4, Table 1 footnotes):
//! 45 nm figures of Horowitz (ISSCC 2014) for 32-bit floats, an addition 0.9 pJ and a
//! multiplication 3.7 pJ.
//!
//! From nn-core's per-layer summary: a full-precision layer's multiply-accumulate is one
//! multiplication and one addition; an adder layer reports its subtractions and accumulations
//! as `additions` (2 per tap) and no multiplications. BatchNorm, activations and pooling are
//! not counted (nn-core's summary gives them no MACs), as in the paper's tables.

use candle_core::{DType, Device, Result, Tensor};
use nn_core::summary::{profile, ModelSummary};
use nn_core::Model;
use serde::Serialize;

/// Energy of one fp32 addition at 45 nm, picojoules.
pub const ADD_PJ: f64 = 0.9;
/// Energy of one fp32 multiplication at 45 nm, picojoules.
pub const MUL_PJ: f64 = 3.7;

/// Per-image operation counts and energy of a model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AdderCounts {
    pub params: usize,
    /// Multiplications (the MACs of full-precision layers).
    pub multiplications: u64,
    /// Additions: the MACs' accumulations plus the adder layers' subtractions and accumulations.
    pub additions: u64,
    /// `multiplications * 3.7 pJ + additions * 0.9 pJ`, in microjoules.
    pub energy_uj: f64,
}

impl AdderCounts {
    pub fn from_summary(s: &ModelSummary) -> Self {
        let multiplications = s.total_macs();
        let additions = s.total_macs() + s.total_additions();
        Self {
            params: s.total_params(),
            multiplications,
            additions,
            energy_uj: (multiplications as f64 * MUL_PJ + additions as f64 * ADD_PJ) * 1e-6,
        }
    }
}

/// Profiles `model` on one zero image of shape `(C, H, W)` and returns the counts and the summary.
pub fn count(model: &dyn Model, chw: (usize, usize, usize), device: &Device) -> Result<(AdderCounts, ModelSummary)> {
    let x = Tensor::zeros((1, chw.0, chw.1, chw.2), DType::F32, device)?;
    let (_, s) = profile(|| model.forward_t(&x, false))?;
    Ok((AdderCounts::from_summary(&s), s))
}
