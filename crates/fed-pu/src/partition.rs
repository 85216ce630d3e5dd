//! Partitioners: which samples each client holds, and which of them it has labeled.
//!
//! A partition is a list of index lists into the shared [`crate::FedDataset`]; a client costs
//! its indices (4 bytes per sample) and one flag per sample, so 1,000 clients over MNIST cost
//! about 300 KB however large the model is.
//!
//! - [`iid`]: a seeded shuffle cut into near-equal parts (sizes differ by at most one).
//! - [`dirichlet`]: per class, proportions over clients drawn from `Dir(alpha)` (Hsu et al.
//!   2019, Flower's `DirichletPartitioner`); small `alpha` gives skewed label distributions.
//! - [`fedpu_clients`]: FedPU's setting on top of any partition: client `k` labels a fraction
//!   of the samples of its positive classes `P_k`; every other sample it holds, of any class,
//!   is unlabeled. Positive classes are assigned cyclically as in the official code
//!   (client `k` takes the next `m_k` classes after those handed out so far), with
//!   `m = [4, 4, 3, 3, 2, 2, 1, 1, 1, 1]` for 10 clients ([`OFFICIAL_CLASSES_PER_CLIENT`]).

use anyhow::{bail, Result};
use nn_core::rng::{derived, mix_seed};
use rand::Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

/// Positive classes per client in the official FedPU code (10 clients).
pub const OFFICIAL_CLASSES_PER_CLIENT: [usize; 10] = [4, 4, 3, 3, 2, 2, 1, 1, 1, 1];

const TAG_IID: u64 = 0x11D;
const TAG_DIR: u64 = 0xD1C;
const TAG_LABEL: u64 = 0x1AB;

/// What one client holds: indices into the shared dataset and, per index, whether the client
/// knows its label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientData {
    /// Client id (position in the client list).
    pub id: u32,
    /// Dataset indices of the client's samples, increasing.
    pub indices: Vec<u32>,
    /// `labeled[j]`: whether the label of `indices[j]` is known to the client.
    pub labeled: Vec<bool>,
    /// The classes this client labels (`P_k`), increasing.
    pub positive_classes: Vec<u32>,
    /// `priors[i]`: the share of class `i` among the client's unlabeled samples (`pi_i`; the
    /// class priors the PU risk needs, taken from the true counts as in the paper's
    /// experiments and the official code). Empty when the client has no unlabeled sample.
    pub priors: Vec<f64>,
}

impl ClientData {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.indices.len()
    }
    /// Whether the client holds no sample.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
    /// Number of labeled samples.
    pub fn num_labeled(&self) -> usize {
        self.labeled.iter().filter(|&&l| l).count()
    }
}

fn shuffle<T>(v: &mut [T], rng: &mut impl Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.gen_range(0..=i);
        v.swap(i, j);
    }
}

/// IID partition of `n` samples into `num_clients` parts of near-equal size (seeded).
pub fn iid(n: usize, num_clients: usize, seed: u64) -> Result<Vec<Vec<u32>>> {
    if num_clients == 0 || num_clients > n {
        bail!("cannot split {n} samples into {num_clients} non-empty clients");
    }
    let mut all: Vec<u32> = (0..n as u32).collect();
    shuffle(&mut all, &mut derived(seed, TAG_IID));
    let (q, r) = (n / num_clients, n % num_clients);
    let mut out = Vec::with_capacity(num_clients);
    let mut start = 0;
    for k in 0..num_clients {
        let len = q + usize::from(k < r);
        let mut part = all[start..start + len].to_vec();
        part.sort_unstable();
        out.push(part);
        start += len;
    }
    Ok(out)
}

/// Dirichlet non-IID partition: for each class, client shares drawn from `Dir(alpha * 1)`,
/// then the class's shuffled samples cut at the cumulative shares. Clients may end up empty
/// for very small `alpha` or many clients.
pub fn dirichlet(labels: &[u32], num_classes: usize, num_clients: usize, alpha: f64, seed: u64) -> Result<Vec<Vec<u32>>> {
    if num_clients == 0 || alpha <= 0.0 {
        bail!("dirichlet partition needs clients > 0 and alpha > 0 (got {num_clients}, {alpha})");
    }
    let gamma = Gamma::new(alpha, 1.0)?;
    let mut out = vec![Vec::new(); num_clients];
    for c in 0..num_classes {
        let mut idx: Vec<u32> = (0..labels.len() as u32).filter(|&i| labels[i as usize] == c as u32).collect();
        let mut rng = derived(mix_seed(&[seed, TAG_DIR]), c as u64);
        shuffle(&mut idx, &mut rng);
        let mut w: Vec<f64> = (0..num_clients).map(|_| gamma.sample(&mut rng)).collect();
        let s: f64 = w.iter().sum();
        if s <= 0.0 {
            w = vec![1.0; num_clients];
        }
        let s: f64 = w.iter().sum();
        let mut cum = 0.0;
        let mut start = 0usize;
        for (k, wk) in w.iter().enumerate() {
            cum += wk / s;
            let end = if k + 1 == num_clients {
                idx.len()
            } else {
                ((cum * idx.len() as f64).floor() as usize).min(idx.len())
            };
            out[k].extend_from_slice(&idx[start..end.max(start)]);
            start = end.max(start);
        }
    }
    for p in &mut out {
        p.sort_unstable();
    }
    Ok(out)
}

/// The official code's cyclic choice of positive classes: client `k` takes the `m_k` classes
/// following the ones already handed out (`counts[k % counts.len()]` classes for client `k`).
pub fn cyclic_positive_classes(num_clients: usize, num_classes: usize, counts: &[usize]) -> Result<Vec<Vec<u32>>> {
    if counts.is_empty() || counts.iter().any(|&m| m == 0 || m > num_classes) {
        bail!("positive classes per client must be in 1..={num_classes}, got {counts:?}");
    }
    let mut next = 0usize;
    let mut out = Vec::with_capacity(num_clients);
    for k in 0..num_clients {
        let m = counts[k % counts.len()];
        let mut p: Vec<u32> = (0..m).map(|j| ((next + j) % num_classes) as u32).collect();
        p.sort_unstable();
        next += m;
        out.push(p);
    }
    Ok(out)
}

/// FedPU clients from a partition: client `k` labels `floor(labeled_fraction * n_{k,i})`
/// randomly chosen samples of each of its positive classes `i in positive[k]` (the official
/// code's `int(positiveRate * samplesize)`); everything else is unlabeled. Also computes the
/// priors `pi_{k,i} = n^U_{k,i} / n^U_k`.
pub fn fedpu_clients(
    labels: &[u32],
    num_classes: usize,
    parts: Vec<Vec<u32>>,
    positive: &[Vec<u32>],
    labeled_fraction: f64,
    seed: u64,
) -> Result<Vec<ClientData>> {
    if positive.len() != parts.len() {
        bail!("{} partitions but {} positive-class lists", parts.len(), positive.len());
    }
    if !(0.0..=1.0).contains(&labeled_fraction) {
        bail!("labeled fraction must be in [0, 1], got {labeled_fraction}");
    }
    let mut out = Vec::with_capacity(parts.len());
    for (k, (indices, pos)) in parts.into_iter().zip(positive).enumerate() {
        let mut labeled = vec![false; indices.len()];
        let mut rng = derived(mix_seed(&[seed, TAG_LABEL]), k as u64);
        for &c in pos {
            if c as usize >= num_classes {
                bail!("client {k}: positive class {c} is not below {num_classes}");
            }
            let mut of_c: Vec<usize> = (0..indices.len()).filter(|&j| labels[indices[j] as usize] == c).collect();
            shuffle(&mut of_c, &mut rng);
            let take = (labeled_fraction * of_c.len() as f64).floor() as usize;
            for &j in &of_c[..take] {
                labeled[j] = true;
            }
        }
        let mut counts = vec![0usize; num_classes];
        for (j, &i) in indices.iter().enumerate() {
            if !labeled[j] {
                counts[labels[i as usize] as usize] += 1;
            }
        }
        let nu: usize = counts.iter().sum();
        let priors = if nu == 0 {
            Vec::new()
        } else {
            counts.iter().map(|&n| n as f64 / nu as f64).collect()
        };
        let mut positive_classes = pos.clone();
        positive_classes.sort_unstable();
        positive_classes.dedup();
        out.push(ClientData {
            id: k as u32,
            indices,
            labeled,
            positive_classes,
            priors,
        });
    }
    Ok(out)
}

/// Fully labeled clients (every sample's label known, every class positive): the supervised
/// setting and the plain FedAvg/FedProx use of the engine.
pub fn labeled_clients(labels: &[u32], num_classes: usize, parts: Vec<Vec<u32>>) -> Vec<ClientData> {
    parts
        .into_iter()
        .enumerate()
        .map(|(k, indices)| {
            let mut present = vec![false; num_classes];
            for &i in &indices {
                present[labels[i as usize] as usize] = true;
            }
            ClientData {
                id: k as u32,
                labeled: vec![true; indices.len()],
                indices,
                positive_classes: (0..num_classes as u32).filter(|&c| present[c as usize]).collect(),
                priors: Vec::new(),
            }
        })
        .collect()
}
