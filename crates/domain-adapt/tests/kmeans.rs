//! Spherical k-means with anchor initialisation.

use domain_adapt::{spherical_kmeans, KMeansConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` points per direction, each a direction plus small noise, scaled by a random norm.
fn blobs(dirs: &[[f32; 3]], n: usize, noise: f32, seed: u64) -> (Vec<f32>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut f, mut y) = (Vec::new(), Vec::new());
    for (c, d) in dirs.iter().enumerate() {
        for _ in 0..n {
            let s: f32 = rng.gen_range(0.5..3.0);
            f.extend(d.iter().map(|v| s * (v + noise * rng.gen_range(-1.0f32..1.0))));
            y.push(c);
        }
    }
    (f, y)
}

#[test]
fn anchors_fix_which_cluster_is_which_class() {
    let dirs = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    let (f, y) = blobs(&dirs, 50, 0.2, 1);
    // Anchors roughly (not exactly) along the class directions, in a permuted order: class k's
    // anchor is near dirs[perm[k]], so the clusters must come out labelled by perm.
    let perm = [2usize, 0, 1];
    let anchors: Vec<f32> = perm.iter().flat_map(|&p| dirs[p].iter().map(|v| v * 2.0 + 0.3)).collect();
    let c = spherical_kmeans(&f, 3, &anchors, &KMeansConfig::default()).unwrap();
    assert!(c.converged && c.iterations >= 2, "{} iterations", c.iterations);
    for (i, &t) in y.iter().enumerate() {
        let expected = perm.iter().position(|&p| p == t).unwrap();
        assert_eq!(c.labels[i], expected, "sample {i}");
    }
    // centres moved from the (offset) anchors to unit class directions
    for (k, &p) in perm.iter().enumerate() {
        let cos: f32 = c.centers[k].iter().zip(&dirs[p]).map(|(a, b)| a * b).sum();
        assert!(cos > 0.97, "centre {k}: cos {cos}");
        let norm: f32 = c.centers[k].iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    assert_eq!(c.sizes, vec![50, 50, 50]);
}

#[test]
fn empty_cluster_keeps_its_anchor_and_is_dropped() {
    let dirs = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
    let (f, _) = blobs(&dirs, 20, 0.1, 2);
    // third anchor points where no sample is
    let anchors = [1.0, 0.1, 0.0, 0.1, 1.0, 0.0, 0.0, 0.0, -3.0];
    let c = spherical_kmeans(&f, 3, &anchors, &KMeansConfig::default()).unwrap();
    assert_eq!(c.sizes, vec![20, 20, 0]);
    assert_eq!(c.centers[2], vec![0.0, 0.0, -1.0], "an empty cluster keeps its (normalised) anchor");
    assert_eq!(c.kept_classes, vec![true, true, false]);
    assert!(c.members(2).is_empty());
}

#[test]
fn threshold_and_min_class_size_filter_samples() {
    let f = [
        1.0, 0.0, // d = 0 to centre 0
        1.0, 0.05, // close
        1.0, 1.0, // cos 0.707 -> d ~ 0.146 to its centre: not confident at 0.05
        0.0, 1.0, // alone in class 1
        -1.0, 0.0, // tie-free: class 0 at d=1, class 1 at d=0.5
    ];
    let anchors = [1.0, 0.0, 0.0, 1.0];
    let cfg = KMeansConfig {
        max_iters: 1,
        distance_threshold: 0.05,
        min_class_size: 2,
    };
    let c = spherical_kmeans(&f, 2, &anchors, &cfg).unwrap();
    assert_eq!(c.labels, vec![0, 0, 0, 1, 1]);
    assert!((c.distances[4] - 0.5).abs() < 1e-6, "{:?}", c.distances);
    assert_eq!(c.kept_classes, vec![true, false], "class 1 has one confident member < 2");
    assert_eq!(c.selected, vec![true, true, false, false, false]);
    assert_eq!(c.num_selected(), 2);
}

#[test]
fn bad_inputs_are_named() {
    let cfg = KMeansConfig::default();
    let e = spherical_kmeans(&[1.0, 2.0, 3.0], 2, &[1.0, 0.0], &cfg).unwrap_err().to_string();
    assert!(e.contains("multiples of dim"), "{e}");
    let e = spherical_kmeans(&[f32::NAN, 0.0], 2, &[1.0, 0.0], &cfg).unwrap_err().to_string();
    assert!(e.contains("NaN"), "{e}");
    let e = spherical_kmeans(&[], 2, &[1.0, 0.0], &cfg).unwrap_err().to_string();
    assert!(e.contains("at least one sample"), "{e}");
}
