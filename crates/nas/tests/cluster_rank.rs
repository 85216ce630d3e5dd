//! k-means on synthetic clusters (with empty-cluster handling) and Kendall tau on known cases.

use nas::cluster::{kmeans, kmeans_from, similarity_matrix, standardize};
use nas::rank::{kendall_tau, within_cluster_tau};
use nn_core::rng::seeded;
use rand::Rng;

fn blobs(centres: &[[f64; 2]], per: usize, spread: f64, seed: u64) -> (Vec<Vec<f64>>, Vec<usize>) {
    let mut rng = seeded(seed);
    let mut pts = Vec::new();
    let mut truth = Vec::new();
    for (c, m) in centres.iter().enumerate() {
        for _ in 0..per {
            pts.push(vec![
                m[0] + spread * (rng.gen::<f64>() - 0.5),
                m[1] + spread * (rng.gen::<f64>() - 0.5),
            ]);
            truth.push(c);
        }
    }
    (pts, truth)
}

#[test]
fn kmeans_recovers_separated_clusters() {
    let (pts, truth) = blobs(&[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], 20, 2.0, 1);
    for seed in 0..5 {
        let km = kmeans(&pts, 3, seed, 100).unwrap();
        // Same partition as the truth, up to label permutation.
        for i in 0..pts.len() {
            for j in 0..pts.len() {
                assert_eq!(truth[i] == truth[j], km.assignments[i] == km.assignments[j]);
            }
        }
        assert!(km.inertia < 60.0 * 2.0, "{}", km.inertia);
        assert_eq!(km.members().iter().map(|m| m.len()).collect::<Vec<_>>().iter().sum::<usize>(), 60);
        // Deterministic for a seed.
        assert_eq!(km, kmeans(&pts, 3, seed, 100).unwrap());
    }
    assert!(kmeans(&pts, 0, 0, 10).is_err());
    assert!(kmeans(&pts, 61, 0, 10).is_err());
}

#[test]
fn empty_clusters_are_reseeded() {
    let (pts, _) = blobs(&[[0.0, 0.0], [10.0, 0.0]], 10, 1.0, 2);
    // A third centroid far from every point gets no member in the first assignment.
    let init = vec![vec![0.0, 0.0], vec![10.0, 0.0], vec![1000.0, 1000.0]];
    let km = kmeans_from(&pts, init, 50).unwrap();
    assert!(km.reseeded >= 1);
    assert!(km.members().iter().all(|m| !m.is_empty()), "{:?}", km.members());
    // Duplicated points: k-means++ must still give k non-empty clusters.
    let dup = vec![vec![1.0, 1.0]; 5];
    let km = kmeans(&dup, 3, 0, 20).unwrap();
    assert!(km.members().iter().all(|m| !m.is_empty()), "{:?}", km.members());
}

#[test]
fn standardize_and_similarity() {
    let pts = vec![vec![1.0, 100.0, 5.0], vec![3.0, 300.0, 5.0]];
    let z = standardize(&pts);
    assert_eq!(z, vec![vec![-1.0, -1.0, 0.0], vec![1.0, 1.0, 0.0]]);
    let s = similarity_matrix(&z);
    assert_eq!(s[0][0], 1.0);
    assert!((s[0][1] - (-1.0f64).exp()).abs() < 1e-12);
    assert_eq!(s[0][1], s[1][0]);
}

#[test]
fn kendall_tau_known_cases() {
    let x = [1.0, 2.0, 3.0, 4.0, 5.0];
    assert_eq!(kendall_tau(&x, &x), Some(1.0));
    assert_eq!(kendall_tau(&x, &[5.0, 4.0, 3.0, 2.0, 1.0]), Some(-1.0));
    // SciPy's documented example (tau-b with ties): -0.47140452079103173.
    let t = kendall_tau(&[12.0, 2.0, 1.0, 12.0, 2.0], &[1.0, 4.0, 7.0, 1.0, 0.0]).unwrap();
    assert!((t + 0.47140452079103173).abs() < 1e-12, "{t}");
    // One discordant pair of 6: (5 - 1) / 6.
    let t = kendall_tau(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]).unwrap();
    assert!((t - 4.0 / 6.0).abs() < 1e-12);
    assert_eq!(kendall_tau(&[1.0], &[2.0]), None);
    assert_eq!(kendall_tau(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
    // Within clusters: perfect inside each cluster, although reversed across them.
    let cheap = [1.0, 2.0, 3.0, 10.0, 11.0, 12.0];
    let acc = [11.0, 12.0, 13.0, 1.0, 2.0, 3.0];
    assert!(kendall_tau(&cheap, &acc).unwrap() < 0.0);
    let w = within_cluster_tau(&cheap, &acc, &[0, 0, 0, 1, 1, 1], 2);
    assert_eq!(w.per_cluster, vec![Some(1.0), Some(1.0)]);
    assert_eq!((w.mean, w.pooled, w.pairs), (Some(1.0), Some(1.0), 6));
}
