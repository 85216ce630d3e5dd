//! Similarity between sub-network representations and k-means clustering (k-means++ seeding,
//! Lloyd iterations, empty clusters re-seeded), all deterministic for a seed.
//!
//! DC-NAS (its clustering step) groups sampled sub-networks whose representations are similar with
//! k-means, minimising `sum_k sum_{i in C_k} ||f_i - c_k||^2` (the standard k-means
//! objective); sub-networks are then only compared inside their cluster.

use anyhow::{bail, Result};
use nn_core::rng::seeded;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Z-scores every dimension over the points (constant dimensions become 0), so that no layer
/// dominates the distances by its scale.
pub fn standardize(points: &[Vec<f64>]) -> Vec<Vec<f64>> {
    if points.is_empty() {
        return Vec::new();
    }
    let d = points[0].len();
    let n = points.len() as f64;
    let mut out = points.to_vec();
    for j in 0..d {
        let m = points.iter().map(|p| p[j]).sum::<f64>() / n;
        let sd = (points.iter().map(|p| (p[j] - m).powi(2)).sum::<f64>() / n).sqrt();
        for (o, p) in out.iter_mut().zip(points) {
            o[j] = if sd > 1e-12 { (p[j] - m) / sd } else { 0.0 };
        }
    }
    out
}

fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum()
}

/// Pairwise similarity `exp(-||f_i - f_j||^2 / mean distance)` (1 on the diagonal).
pub fn similarity_matrix(points: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = points.len();
    let mut d = vec![vec![0.0; n]; n];
    let mut sum = 0.0;
    for i in 0..n {
        for j in i + 1..n {
            let v = dist2(&points[i], &points[j]);
            d[i][j] = v;
            d[j][i] = v;
            sum += v;
        }
    }
    let mean = if n > 1 { sum / (n * (n - 1) / 2) as f64 } else { 1.0 }.max(1e-12);
    d.iter().map(|r| r.iter().map(|v| (-v / mean).exp()).collect()).collect()
}

/// A clustering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KMeans {
    /// Cluster of each point.
    pub assignments: Vec<usize>,
    pub centroids: Vec<Vec<f64>>,
    /// Sum of squared distances to the assigned centroids.
    pub inertia: f64,
    pub iterations: usize,
    /// How many times an empty cluster was re-seeded.
    pub reseeded: usize,
}

impl KMeans {
    /// Members of each cluster, in point order.
    pub fn members(&self) -> Vec<Vec<usize>> {
        let mut m = vec![Vec::new(); self.centroids.len()];
        for (i, &c) in self.assignments.iter().enumerate() {
            m[c].push(i);
        }
        m
    }
}

/// k-means++ seeding: the first centre uniformly, each next one with probability proportional
/// to the squared distance to the nearest chosen centre (uniformly if all points coincide).
pub fn kmeans_pp_init(points: &[Vec<f64>], k: usize, rng: &mut impl Rng) -> Vec<Vec<f64>> {
    let n = points.len();
    let mut centres = vec![points[rng.gen_range(0..n)].clone()];
    let mut d: Vec<f64> = points.iter().map(|p| dist2(p, &centres[0])).collect();
    while centres.len() < k {
        let total: f64 = d.iter().sum();
        let pick = if total <= 0.0 {
            rng.gen_range(0..n)
        } else {
            let mut r = rng.gen::<f64>() * total;
            let mut idx = n - 1;
            for (i, &di) in d.iter().enumerate() {
                if r < di {
                    idx = i;
                    break;
                }
                r -= di;
            }
            idx
        };
        centres.push(points[pick].clone());
        for (di, p) in d.iter_mut().zip(points) {
            *di = di.min(dist2(p, centres.last().expect("pushed")));
        }
    }
    centres
}

/// k-means with k-means++ seeding from `seed`, at most `max_iter` Lloyd iterations.
pub fn kmeans(points: &[Vec<f64>], k: usize, seed: u64, max_iter: usize) -> Result<KMeans> {
    if k == 0 || k > points.len() {
        bail!("k-means: k = {k} must be between 1 and the number of points ({})", points.len());
    }
    let mut rng = seeded(seed);
    let init = kmeans_pp_init(points, k, &mut rng);
    kmeans_from(points, init, max_iter)
}

/// Lloyd iterations from given centroids. A cluster that loses all its points is re-seeded
/// with the point farthest from its own centroid (taken from a cluster of at least two), so
/// the result always has `k` non-empty clusters when there are at least `k` points.
pub fn kmeans_from(points: &[Vec<f64>], mut centroids: Vec<Vec<f64>>, max_iter: usize) -> Result<KMeans> {
    let (n, k) = (points.len(), centroids.len());
    if k == 0 || k > n {
        bail!("k-means: {k} centroids for {n} points");
    }
    // Nearest centroid; on ties a point keeps its current cluster (else the lowest index), so
    // coincident points do not oscillate between clusters.
    let assign_all = |c: &[Vec<f64>], prev: Option<&[usize]>| -> Vec<usize> {
        points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut best = (f64::INFINITY, 0);
                for (j, cj) in c.iter().enumerate() {
                    let d = dist2(p, cj);
                    if d < best.0 {
                        best = (d, j);
                    }
                }
                match prev {
                    Some(pr) if dist2(p, &c[pr[i]]) <= best.0 => pr[i],
                    _ => best.1,
                }
            })
            .collect()
    };
    let mut assignments = assign_all(&centroids, None);
    let (mut iterations, mut reseeded) = (0, 0);
    // Empty clusters take the worst-fitted point of a cluster that can spare one.
    let fix_empty = |assignments: &mut Vec<usize>, centroids: &mut Vec<Vec<f64>>, reseeded: &mut usize| loop {
        let mut counts = vec![0usize; k];
        for &a in assignments.iter() {
            counts[a] += 1;
        }
        let Some(empty) = counts.iter().position(|&c| c == 0) else { break };
        let far = (0..n)
            .filter(|&i| counts[assignments[i]] > 1)
            .max_by(|&a, &b| {
                dist2(&points[a], &centroids[assignments[a]])
                    .total_cmp(&dist2(&points[b], &centroids[assignments[b]]))
                    .then(b.cmp(&a))
            })
            .expect("n >= k leaves a cluster with two points");
        assignments[far] = empty;
        centroids[empty] = points[far].clone();
        *reseeded += 1;
    };
    loop {
        fix_empty(&mut assignments, &mut centroids, &mut reseeded);
        for (j, c) in centroids.iter_mut().enumerate() {
            let members: Vec<&Vec<f64>> = points.iter().zip(&assignments).filter(|(_, &a)| a == j).map(|(p, _)| p).collect();
            for (d, v) in c.iter_mut().enumerate() {
                *v = members.iter().map(|p| p[d]).sum::<f64>() / members.len() as f64;
            }
        }
        iterations += 1;
        let next = assign_all(&centroids, Some(&assignments));
        let converged = next == assignments;
        assignments = next;
        if converged || iterations >= max_iter {
            fix_empty(&mut assignments, &mut centroids, &mut reseeded);
            break;
        }
    }
    let inertia = points.iter().zip(&assignments).map(|(p, &a)| dist2(p, &centroids[a])).sum();
    Ok(KMeans {
        assignments,
        centroids,
        inertia,
        iterations,
        reseeded,
    })
}
