//! Spherical k-means with anchor initialisation: SFDA-DE's pseudo-labelling (Sec. 3.2 of Ding
//! et al., CVPR 2022, following CAN's clustering, Kang et al., CVPR 2019, Sec. 3.3).
//!
//! Distances are cosine distances `d(a, b) = (1 - <a, b> / (|a| |b|)) / 2` in `[0, 1]` (CAN's
//! Eq. 7). The centres start at the classifier's weight vectors (the anchors) and alternate:
//! - assignment: `y_i = argmin_k d(f_i, O_k)`;
//! - update: `O_k = sum_{i: y_i = k} f_i / |f_i|` (then normalised; only the direction matters).
//!
//! until no assignment changes (or `max_iters`). A cluster that loses every member keeps its
//! previous centre, so a class the target happens not to contain cannot steal samples through a
//! degenerate (zero) centre, and it can still be re-populated later.
//!
//! Afterwards samples farther than `distance_threshold` from their centre are not confident
//! (CAN's `D_0`), and classes with fewer than `min_class_size` confident members are dropped
//! (CAN's `N_0`); only confident samples of kept classes take part in the adaptation.

use anyhow::{bail, Result};

/// Options of [`spherical_kmeans`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KMeansConfig {
    /// Upper bound on assignment/update rounds.
    pub max_iters: usize,
    /// Confident samples have a cosine distance to their centre below this (`D_0`).
    pub distance_threshold: f64,
    /// Classes with fewer confident members are dropped (`N_0`).
    pub min_class_size: usize,
}

impl Default for KMeansConfig {
    fn default() -> Self {
        Self {
            max_iters: 100,
            distance_threshold: 0.05,
            min_class_size: 3,
        }
    }
}

/// The result of a clustering.
#[derive(Debug, Clone)]
pub struct Clustering {
    /// Cluster (class) of every sample.
    pub labels: Vec<usize>,
    /// Cosine distance of every sample to its centre.
    pub distances: Vec<f32>,
    /// Unit-norm centres, `k` rows of `dim`.
    pub centers: Vec<Vec<f32>>,
    /// Assignment rounds run.
    pub iterations: usize,
    /// Whether assignments stopped changing before `max_iters`.
    pub converged: bool,
    /// Members per cluster (all samples).
    pub sizes: Vec<usize>,
    /// Whether each class has at least `min_class_size` confident members.
    pub kept_classes: Vec<bool>,
    /// Whether each sample is confident and of a kept class.
    pub selected: Vec<bool>,
}

impl Clustering {
    /// Indices of the selected samples of class `k`.
    pub fn members(&self, k: usize) -> Vec<usize> {
        (0..self.labels.len())
            .filter(|&i| self.selected[i] && self.labels[i] == k)
            .collect()
    }

    /// Number of selected samples.
    pub fn num_selected(&self) -> usize {
        self.selected.iter().filter(|&&s| s).count()
    }
}

fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
    if n > 0.0 {
        v.iter().map(|x| (*x as f64 / n) as f32).collect()
    } else {
        v.to_vec()
    }
}

/// Clusters `features` (`n` rows of `dim`, row-major) into `anchors.len() / dim` clusters whose
/// centres start at the anchors (row-major, one per class).
pub fn spherical_kmeans(features: &[f32], dim: usize, anchors: &[f32], cfg: &KMeansConfig) -> Result<Clustering> {
    if dim == 0 || features.len() % dim != 0 || anchors.len() % dim != 0 {
        bail!(
            "spherical_kmeans: feature length {} and anchor length {} must be multiples of dim {dim} > 0",
            features.len(),
            anchors.len()
        );
    }
    let (n, k) = (features.len() / dim, anchors.len() / dim);
    if n == 0 || k == 0 {
        bail!("spherical_kmeans: need at least one sample and one anchor, got {n} samples and {k} anchors");
    }
    if features.iter().chain(anchors).any(|v| !v.is_finite()) {
        bail!("spherical_kmeans: features or anchors contain NaN or infinity");
    }
    if !(0.0..=1.0).contains(&cfg.distance_threshold) {
        bail!(
            "spherical_kmeans: distance_threshold must be in [0, 1] (cosine distance), got {}",
            cfg.distance_threshold
        );
    }
    let rows: Vec<Vec<f32>> = features.chunks_exact(dim).map(unit).collect();
    let mut centers: Vec<Vec<f32>> = anchors.chunks_exact(dim).map(unit).collect();
    let mut labels = vec![usize::MAX; n];
    let mut distances = vec![0f32; n];
    let (mut iterations, mut converged) = (0, false);
    while iterations < cfg.max_iters.max(1) {
        iterations += 1;
        let mut changed = false;
        for (i, r) in rows.iter().enumerate() {
            let (mut best, mut best_d) = (0, f32::INFINITY);
            for (c, o) in centers.iter().enumerate() {
                let dot: f32 = r.iter().zip(o).map(|(a, b)| a * b).sum();
                let d = 0.5 * (1.0 - dot);
                if d < best_d {
                    best = c;
                    best_d = d;
                }
            }
            if labels[i] != best {
                labels[i] = best;
                changed = true;
            }
            distances[i] = best_d.max(0.0);
        }
        if !changed {
            converged = true;
            break;
        }
        let mut sums = vec![vec![0f32; dim]; k];
        let mut counts = vec![0usize; k];
        for (r, &l) in rows.iter().zip(&labels) {
            counts[l] += 1;
            sums[l].iter_mut().zip(r).for_each(|(s, v)| *s += v);
        }
        for c in 0..k {
            if counts[c] > 0 {
                centers[c] = unit(&sums[c]);
            } // empty cluster: keep the previous centre
        }
    }
    let mut sizes = vec![0usize; k];
    let mut confident_counts = vec![0usize; k];
    let confident: Vec<bool> = distances.iter().map(|&d| (d as f64) < cfg.distance_threshold).collect();
    for i in 0..n {
        sizes[labels[i]] += 1;
        if confident[i] {
            confident_counts[labels[i]] += 1;
        }
    }
    let kept_classes: Vec<bool> = confident_counts.iter().map(|&c| c >= cfg.min_class_size.max(1)).collect();
    let selected = (0..n).map(|i| confident[i] && kept_classes[labels[i]]).collect();
    Ok(Clustering {
        labels,
        distances,
        centers,
        iterations,
        converged,
        sizes,
        kept_classes,
        selected,
    })
}
