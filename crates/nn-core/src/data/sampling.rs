//! Index-level sampling helpers: class subsets, per-class sampling, class-balanced subsets
//! and stratified splits.
//!
//! The functions work on label slices and return sorted dataset indices, so they apply to
//! any dataset (use [`ImageDataset::subset`] to materialise an in-memory subset). Random
//! choices use a `ChaCha8Rng` seeded by the caller's seed, so results are reproducible.

use rand::Rng;

use super::loader::derived_rng;
use super::{DataError, ImageDataset, Result};

const TAG_SAMPLING: u64 = 0x5A3F;

/// Number of labels equal to each class `0..num_classes` (labels out of range are ignored).
pub fn class_counts(labels: &[u32], num_classes: usize) -> Vec<usize> {
    let mut counts = vec![0usize; num_classes];
    for &l in labels {
        if let Some(c) = counts.get_mut(l as usize) {
            *c += 1;
        }
    }
    counts
}

/// Indices of each class, in increasing order.
pub fn indices_by_class(labels: &[u32], num_classes: usize) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        if let Some(v) = out.get_mut(l as usize) {
            v.push(i);
        }
    }
    out
}

fn shuffle(v: &mut [usize], rng: &mut impl Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.gen_range(0..=i as u64) as usize;
        v.swap(i, j);
    }
}

/// Keeps only the images whose label is in `classes`. With `remap`, labels become the
/// position of their class in `classes` (`0..classes.len()`), and `num_classes` and
/// `class_names` follow; otherwise labels and class count are unchanged.
pub fn select_classes(ds: &ImageDataset, classes: &[u32], remap: bool) -> Result<ImageDataset> {
    let mut map = vec![None; ds.num_classes];
    for (k, &c) in classes.iter().enumerate() {
        let slot = map
            .get_mut(c as usize)
            .ok_or_else(|| DataError::InvalidArgument(format!("{}: class {c} out of range ({} classes)", ds.name, ds.num_classes)))?;
        if slot.is_some() {
            return Err(DataError::InvalidArgument(format!("{}: class {c} selected twice", ds.name)));
        }
        *slot = Some(k as u32);
    }
    let keep: Vec<usize> = (0..ds.len()).filter(|&i| map[ds.labels[i] as usize].is_some()).collect();
    let mut out = ds.subset(&keep)?;
    if remap {
        for l in &mut out.labels {
            *l = map[*l as usize].unwrap_or(0);
        }
        out.num_classes = classes.len();
        if !ds.class_names.is_empty() {
            out.class_names = classes.iter().map(|&c| ds.class_names[c as usize].clone()).collect();
        }
    }
    Ok(out)
}

/// How to choose samples within a class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// The first ones in dataset order.
    First,
    /// Uniformly at random without replacement, seeded.
    Random {
        /// Seed of the choice.
        seed: u64,
    },
}

/// `n` indices of every class (sorted). Fails if a class has fewer than `n` samples.
pub fn per_class(labels: &[u32], num_classes: usize, n: usize, pick: Pick) -> Result<Vec<usize>> {
    per_class_counts(labels, &vec![n; num_classes], pick)
}

/// `counts[c]` indices of each class `c` (sorted). Fails if a class has too few samples.
pub fn per_class_counts(labels: &[u32], counts: &[usize], pick: Pick) -> Result<Vec<usize>> {
    let by_class = indices_by_class(labels, counts.len());
    let mut out = Vec::with_capacity(counts.iter().sum());
    for (c, (mut idx, &n)) in by_class.into_iter().zip(counts).enumerate() {
        if idx.len() < n {
            return Err(DataError::InvalidArgument(format!(
                "class {c} has {} samples, {n} requested",
                idx.len()
            )));
        }
        if let Pick::Random { seed } = pick {
            let mut rng = derived_rng(&[TAG_SAMPLING, seed, c as u64]);
            shuffle(&mut idx, &mut rng);
        }
        out.extend_from_slice(&idx[..n]);
    }
    out.sort_unstable();
    Ok(out)
}

/// A random class-balanced subset of `total` indices (sorted): every class gets
/// `total / num_classes` samples and `total % num_classes` randomly chosen classes get one
/// more. Fails if a class has too few samples.
pub fn balanced_subset(labels: &[u32], num_classes: usize, total: usize, seed: u64) -> Result<Vec<usize>> {
    if num_classes == 0 {
        return Err(DataError::InvalidArgument("balanced subset of 0 classes".into()));
    }
    let mut counts = vec![total / num_classes; num_classes];
    let mut classes: Vec<usize> = (0..num_classes).collect();
    let mut rng = derived_rng(&[TAG_SAMPLING, seed, u64::MAX]);
    shuffle(&mut classes, &mut rng);
    for &c in &classes[..total % num_classes] {
        counts[c] += 1;
    }
    per_class_counts(labels, &counts, Pick::Random { seed })
}

/// Splits the indices into two stratified parts: in each class, `round(fraction * n_c)`
/// randomly chosen samples go to the first part, the rest to the second. Both are sorted.
pub fn stratified_split(labels: &[u32], num_classes: usize, fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(DataError::InvalidArgument(format!("split fraction {fraction} not in [0, 1]")));
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (c, mut idx) in indices_by_class(labels, num_classes).into_iter().enumerate() {
        let mut rng = derived_rng(&[TAG_SAMPLING, seed, c as u64, 1]);
        shuffle(&mut idx, &mut rng);
        let k = ((fraction * idx.len() as f64).round() as usize).min(idx.len());
        a.extend_from_slice(&idx[..k]);
        b.extend_from_slice(&idx[k..]);
    }
    a.sort_unstable();
    b.sort_unstable();
    Ok((a, b))
}

/// Partitions the indices into `parts` stratified, near-equal parts (each class is spread
/// as evenly as possible: part sizes per class differ by at most one). Useful for IID
/// federated splits and k-fold cross-validation.
pub fn stratified_partition(labels: &[u32], num_classes: usize, parts: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
    if parts == 0 {
        return Err(DataError::InvalidArgument("partition into 0 parts".into()));
    }
    let mut out = vec![Vec::new(); parts];
    // Rotating the starting part per class keeps total part sizes balanced too.
    let mut next = 0usize;
    for (c, mut idx) in indices_by_class(labels, num_classes).into_iter().enumerate() {
        let mut rng = derived_rng(&[TAG_SAMPLING, seed, c as u64, 2]);
        shuffle(&mut idx, &mut rng);
        for i in idx {
            out[next].push(i);
            next = (next + 1) % parts;
        }
    }
    for p in &mut out {
        p.sort_unstable();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<u32> {
        // 3 classes with 5, 4, 3 samples, interleaved.
        vec![0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 0]
    }

    #[test]
    fn counts_and_per_class() {
        let l = labels();
        assert_eq!(class_counts(&l, 3), vec![5, 4, 3]);
        assert_eq!(per_class(&l, 3, 2, Pick::First).unwrap(), vec![0, 1, 2, 3, 4, 5]);
        let r = per_class(&l, 3, 3, Pick::Random { seed: 1 }).unwrap();
        assert_eq!(class_counts(&r.iter().map(|&i| l[i]).collect::<Vec<_>>(), 3), vec![3, 3, 3]);
        assert_eq!(r, per_class(&l, 3, 3, Pick::Random { seed: 1 }).unwrap());
        assert!(per_class(&l, 3, 4, Pick::First).unwrap_err().to_string().contains("class 2"));
    }

    #[test]
    fn balanced_and_splits() {
        let l = labels();
        let b = balanced_subset(&l, 3, 8, 5).unwrap();
        let cc = class_counts(&b.iter().map(|&i| l[i]).collect::<Vec<_>>(), 3);
        assert_eq!(b.len(), 8);
        assert!(cc.iter().all(|&c| c == 2 || c == 3), "{cc:?}");
        let (a, rest) = stratified_split(&l, 3, 0.5, 2).unwrap();
        assert_eq!(a.len() + rest.len(), 12);
        // round(2.5)=3, round(2)=2, round(1.5)=2
        assert_eq!(class_counts(&a.iter().map(|&i| l[i]).collect::<Vec<_>>(), 3), vec![3, 2, 2]);
        let mut all: Vec<usize> = a.iter().chain(&rest).copied().collect();
        all.sort();
        assert_eq!(all, (0..12).collect::<Vec<_>>());
        let parts = stratified_partition(&l, 3, 4, 0).unwrap();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![3, 3, 3, 3]);
        assert!(stratified_split(&l, 3, 1.5, 0).is_err());
    }

    #[test]
    fn select_classes_remaps() {
        let ds = ImageDataset::new(
            "t",
            1,
            1,
            1,
            3,
            (0..12).collect(),
            labels(),
            vec!["a".into(), "b".into(), "c".into()],
        )
        .unwrap();
        let s = select_classes(&ds, &[2, 0], true).unwrap();
        assert_eq!(s.labels, vec![1, 0, 1, 0, 1, 0, 1, 1]);
        assert_eq!(s.images, vec![0, 2, 3, 5, 6, 8, 9, 11]);
        assert_eq!(s.class_names, vec!["c", "a"]);
        assert_eq!(s.num_classes, 2);
        let k = select_classes(&ds, &[1], false).unwrap();
        assert_eq!((k.len(), k.num_classes, k.labels[0]), (4, 3, 1));
        assert!(select_classes(&ds, &[3], true).is_err());
        assert!(select_classes(&ds, &[1, 1], true).is_err());
    }
}
