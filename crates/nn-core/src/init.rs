//! Seeded parameter initialisation (Kaiming/He, Xavier/Glorot, truncated normal, constants).
//!
//! Fans follow PyTorch's convention: for a weight of shape `[out, in, k...]`,
//! `fan_in = in * prod(k)` and `fan_out = out * prod(k)`.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

/// Which fan a Kaiming initialisation preserves the variance of.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FanMode {
    FanIn,
    FanOut,
}

/// An initialisation scheme.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All elements equal to the value.
    Const(f64),
    /// Kaiming/He normal: std = gain / sqrt(fan); gain = sqrt(2) for ReLU.
    KaimingNormal { mode: FanMode, gain: f64 },
    /// Kaiming/He uniform: bound = gain * sqrt(3 / fan).
    KaimingUniform { mode: FanMode, gain: f64 },
    /// Xavier/Glorot uniform: bound = gain * sqrt(6 / (fan_in + fan_out)).
    XavierUniform { gain: f64 },
    /// Xavier/Glorot normal: std = gain * sqrt(2 / (fan_in + fan_out)).
    XavierNormal { gain: f64 },
    /// Normal(mean, std) truncated to [mean - 2 std, mean + 2 std] by rejection (timm/ViT style).
    TruncNormal { mean: f64, std: f64 },
    /// Normal(mean, std).
    Normal { mean: f64, std: f64 },
    /// Uniform in [lo, hi).
    Uniform { lo: f64, hi: f64 },
}

impl Init {
    /// He et al. initialisation for ReLU networks (fan-out, as torchvision's ResNets use).
    pub const KAIMING_RELU_FAN_OUT: Init = Init::KaimingNormal {
        mode: FanMode::FanOut,
        gain: std::f64::consts::SQRT_2,
    };
    /// PyTorch's default for Linear/Conv weights: kaiming_uniform(a = sqrt(5)), i.e. bound = 1/sqrt(fan_in).
    pub const TORCH_DEFAULT: Init = Init::KaimingUniform {
        mode: FanMode::FanIn,
        gain: 0.577_350_269_189_625_8,
    };
    pub const ZEROS: Init = Init::Const(0.0);
    pub const ONES: Init = Init::Const(1.0);

    /// Draws `prod(dims)` values for a tensor of shape `dims`.
    pub fn sample(&self, dims: &[usize], rng: &mut ChaCha8Rng) -> Vec<f32> {
        let n: usize = dims.iter().product();
        let (fan_in, fan_out) = fans(dims);
        let normal = |mean: f64, std: f64, rng: &mut ChaCha8Rng| -> Vec<f32> {
            let d = Normal::new(mean, std.max(0.0)).expect("finite std");
            (0..n).map(|_| d.sample(rng) as f32).collect()
        };
        let uniform = |lo: f64, hi: f64, rng: &mut ChaCha8Rng| -> Vec<f32> {
            if hi <= lo {
                return vec![lo as f32; n];
            }
            let d = Uniform::new(lo, hi);
            (0..n).map(|_| d.sample(rng) as f32).collect()
        };
        match *self {
            Init::Const(v) => vec![v as f32; n],
            Init::KaimingNormal { mode, gain } => {
                let fan = if mode == FanMode::FanIn { fan_in } else { fan_out };
                normal(0.0, gain / (fan.max(1) as f64).sqrt(), rng)
            }
            Init::KaimingUniform { mode, gain } => {
                let fan = if mode == FanMode::FanIn { fan_in } else { fan_out };
                let b = gain * (3.0 / fan.max(1) as f64).sqrt();
                uniform(-b, b, rng)
            }
            Init::XavierUniform { gain } => {
                let b = gain * (6.0 / (fan_in + fan_out).max(1) as f64).sqrt();
                uniform(-b, b, rng)
            }
            Init::XavierNormal { gain } => normal(0.0, gain * (2.0 / (fan_in + fan_out).max(1) as f64).sqrt(), rng),
            Init::Normal { mean, std } => normal(mean, std, rng),
            Init::Uniform { lo, hi } => uniform(lo, hi, rng),
            Init::TruncNormal { mean, std } => {
                let d = Normal::new(0.0, 1.0).expect("unit normal");
                (0..n)
                    .map(|_| loop {
                        let z: f64 = d.sample(rng);
                        if z.abs() <= 2.0 {
                            break (mean + std * z) as f32;
                        }
                        // keep the generator advancing deterministically
                        let _: u32 = rng.gen();
                    })
                    .collect()
            }
        }
    }
}

/// (fan_in, fan_out) of a weight of shape `dims` (PyTorch convention).
pub fn fans(dims: &[usize]) -> (usize, usize) {
    match dims.len() {
        0 => (1, 1),
        1 => (dims[0], dims[0]),
        _ => {
            let receptive: usize = dims[2..].iter().product();
            (dims[1] * receptive, dims[0] * receptive)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kaiming_std_matches_formula() {
        let mut rng = crate::rng::seeded(0);
        let v = Init::KAIMING_RELU_FAN_OUT.sample(&[64, 32, 3, 3], &mut rng);
        let var: f64 = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len() as f64;
        let expect = 2.0 / (64.0 * 9.0);
        assert!((var / expect - 1.0).abs() < 0.05, "var {var} expect {expect}");
    }

    #[test]
    fn same_seed_same_values() {
        let a = Init::XavierUniform { gain: 1.0 }.sample(&[10, 20], &mut crate::rng::seeded(7));
        let b = Init::XavierUniform { gain: 1.0 }.sample(&[10, 20], &mut crate::rng::seeded(7));
        let c = Init::XavierUniform { gain: 1.0 }.sample(&[10, 20], &mut crate::rng::seeded(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let bound = (6.0f64 / 30.0).sqrt() as f32;
        assert!(a.iter().all(|x| x.abs() <= bound));
    }

    #[test]
    fn trunc_normal_is_truncated() {
        let v = Init::TruncNormal { mean: 0.0, std: 0.02 }.sample(&[1000], &mut crate::rng::seeded(1));
        assert!(v.iter().all(|x| x.abs() <= 0.04 + 1e-6));
    }
}
