//! Source distribution estimation on synthetic Gaussian classes.

use domain_adapt::{ClassGaussian, Covariance, EstimatorConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// `n` samples of N(mean, L L^T) in 3-d.
fn gaussian(mean: [f64; 3], l: [[f64; 3]; 3], n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for _ in 0..n {
        let z: [f64; 3] = [rng.sample(StandardNormal), rng.sample(StandardNormal), rng.sample(StandardNormal)];
        for a in 0..3 {
            out.push((mean[a] + (0..3).map(|b| l[a][b] * z[b]).sum::<f64>()) as f32);
        }
    }
    out
}

const L: [[f64; 3]; 3] = [[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [-0.3, 0.2, 0.4]];

fn true_cov(a: usize, b: usize) -> f64 {
    (0..3).map(|k| L[a][k] * L[b][k]).sum()
}

#[test]
fn recovers_mean_and_full_covariance_when_anchor_points_at_the_class() {
    let mean = [3.0, 4.0, 0.0];
    let rows = gaussian(mean, L, 20000, 1);
    // anchor along the true mean, with a different length
    let g = ClassGaussian::estimate(0, &rows, 3, &[0.6, 0.8, 0.0], &EstimatorConfig::default()).unwrap();
    for a in 0..3 {
        assert!((g.mean[a] - mean[a]).abs() < 0.05, "mean {a}: {} vs {}", g.mean[a], mean[a]);
        for b in 0..3 {
            let (e, t) = (g.cov_at(a, b), true_cov(a, b));
            assert!((e - t).abs() < 0.05, "cov ({a},{b}): {e} vs {t}");
        }
    }
    assert_eq!(g.count, 20000);
}

#[test]
fn mean_takes_the_anchor_direction_and_the_target_length() {
    let rows = gaussian([0.0, 5.0, 0.0], L, 20000, 2);
    let g = ClassGaussian::estimate(3, &rows, 3, &[2.0, 0.0, 0.0], &EstimatorConfig::default()).unwrap();
    let tnorm = g.target_mean.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!((tnorm - 5.0).abs() < 0.1, "{tnorm}");
    assert!(
        (g.mean[0] - tnorm).abs() < 1e-9 && g.mean[1].abs() < 1e-12 && g.mean[2].abs() < 1e-12,
        "{:?}",
        g.mean
    );
    assert_eq!(g.class, 3);
}

#[test]
fn diagonal_option_scale_and_sampling() {
    let rows = gaussian([1.0, 0.0, 0.0], L, 20000, 3);
    let cfg = EstimatorConfig {
        covariance: Covariance::Diagonal,
        cov_scale: 2.0,
        ridge: 0.0,
    };
    let g = ClassGaussian::estimate(0, &rows, 3, &[1.0, 0.0, 0.0], &cfg).unwrap();
    for a in 0..3 {
        assert!((g.cov_at(a, a) - 2.0 * true_cov(a, a)).abs() < 0.08, "var {a}: {}", g.cov_at(a, a));
    }
    assert_eq!(g.cov_at(0, 1), 0.0);
    // samples of the estimate have its mean and covariance
    let full = ClassGaussian::estimate(0, &rows, 3, &[1.0, 0.0, 0.0], &EstimatorConfig::default()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let s = full.sample(20000, &mut rng);
    let back = ClassGaussian::estimate(
        0,
        &s,
        3,
        &[1.0, 0.0, 0.0],
        &EstimatorConfig {
            ridge: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    for a in 0..3 {
        assert!((back.target_mean[a] - full.mean[a]).abs() < 0.05);
        for b in 0..3 {
            assert!((back.cov_at(a, b) - full.cov_at(a, b)).abs() < 0.05, "({a},{b})");
        }
    }
}

#[test]
fn bad_inputs_are_named() {
    let cfg = EstimatorConfig::default();
    let e = ClassGaussian::estimate(4, &[1.0, 2.0], 2, &[1.0, 0.0], &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("class 4 has 1 target sample"), "{e}");
    let e = ClassGaussian::estimate(0, &[1.0, 2.0, 3.0, 4.0], 2, &[0.0, 0.0], &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("anchor"), "{e}");
    // rank-deficient covariance without a ridge cannot be factorised
    let e = ClassGaussian::estimate(0, &[1.0, 1.0, 2.0, 2.0], 2, &[1.0, 0.0], &EstimatorConfig { ridge: 0.0, ..cfg })
        .unwrap_err()
        .to_string();
    assert!(e.contains("positive definite"), "{e}");
}
