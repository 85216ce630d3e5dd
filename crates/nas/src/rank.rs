//! Rank correlation: Kendall's tau-b, globally and inside clusters.

/// Kendall's tau-b of `x` and `y` (ties handled as in SciPy's default):
/// `(P - Q) / sqrt((P + Q + T_x) (P + Q + T_y))`, with `P`/`Q` the concordant/discordant
/// pairs and `T_x`/`T_y` the pairs tied only in `x`/only in `y`. `None` when fewer than two
/// points or when one side is constant.
pub fn kendall_tau(x: &[f64], y: &[f64]) -> Option<f64> {
    let (p, q, tx, ty) = pair_counts(x, y);
    let den = ((p + q + tx) * (p + q + ty)).sqrt();
    if den <= 0.0 {
        None
    } else {
        Some((p - q) / den)
    }
}

/// (concordant, discordant, tied only in x, tied only in y) pair counts.
pub fn pair_counts(x: &[f64], y: &[f64]) -> (f64, f64, f64, f64) {
    assert_eq!(x.len(), y.len(), "kendall tau of sequences of different lengths");
    let (mut p, mut q, mut tx, mut ty) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..x.len() {
        for j in i + 1..x.len() {
            let dx = (x[i] - x[j]).partial_cmp(&0.0).unwrap_or(std::cmp::Ordering::Equal);
            let dy = (y[i] - y[j]).partial_cmp(&0.0).unwrap_or(std::cmp::Ordering::Equal);
            use std::cmp::Ordering::Equal;
            match (dx, dy) {
                (Equal, Equal) => {}
                (Equal, _) => tx += 1.0,
                (_, Equal) => ty += 1.0,
                (a, b) if a == b => p += 1.0,
                _ => q += 1.0,
            }
        }
    }
    (p, q, tx, ty)
}

/// Kendall tau inside clusters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClusterTau {
    /// Tau of each cluster (`None`: fewer than two members or constant).
    pub per_cluster: Vec<Option<f64>>,
    /// Mean over clusters whose tau is defined.
    pub mean: Option<f64>,
    /// Tau-b over the pooled within-cluster pairs only (pairs across clusters are ignored).
    pub pooled: Option<f64>,
    /// Number of within-cluster pairs.
    pub pairs: usize,
}

/// Kendall tau of `x` and `y` within each cluster of `assignments` (`k` clusters).
pub fn within_cluster_tau(x: &[f64], y: &[f64], assignments: &[usize], k: usize) -> ClusterTau {
    let mut per = Vec::with_capacity(k);
    let (mut p, mut q, mut tx, mut ty) = (0.0, 0.0, 0.0, 0.0);
    let mut pairs = 0;
    for c in 0..k {
        let idx: Vec<usize> = (0..x.len()).filter(|&i| assignments[i] == c).collect();
        let xs: Vec<f64> = idx.iter().map(|&i| x[i]).collect();
        let ys: Vec<f64> = idx.iter().map(|&i| y[i]).collect();
        per.push(kendall_tau(&xs, &ys));
        let (a, b, c1, d) = pair_counts(&xs, &ys);
        p += a;
        q += b;
        tx += c1;
        ty += d;
        pairs += idx.len() * idx.len().saturating_sub(1) / 2;
    }
    let defined: Vec<f64> = per.iter().flatten().cloned().collect();
    let den = ((p + q + tx) * (p + q + ty)).sqrt();
    ClusterTau {
        mean: if defined.is_empty() {
            None
        } else {
            Some(defined.iter().sum::<f64>() / defined.len() as f64)
        },
        per_cluster: per,
        pooled: if den > 0.0 { Some((p - q) / den) } else { None },
        pairs,
    }
}
