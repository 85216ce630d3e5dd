//! Partitioners: sizes, disjointness, coverage, seeds, and FedPU's labeling.

use fed_pu::partition::{cyclic_positive_classes, dirichlet, fedpu_clients, iid, OFFICIAL_CLASSES_PER_CLIENT};

fn labels(n: usize, classes: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + i / 5) % classes) as u32).collect()
}

fn assert_exact_cover(parts: &[Vec<u32>], n: usize) {
    let mut seen = vec![0u8; n];
    for p in parts {
        for &i in p {
            seen[i as usize] += 1;
        }
        assert!(p.windows(2).all(|w| w[0] < w[1]), "indices sorted and unique within a client");
    }
    assert!(seen.iter().all(|&s| s == 1), "every sample in exactly one client");
}

#[test]
fn iid_sizes_cover_and_seed() {
    let parts = iid(1003, 10, 5).unwrap();
    assert_eq!(parts.len(), 10);
    let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![101, 101, 101, 100, 100, 100, 100, 100, 100, 100]);
    assert_exact_cover(&parts, 1003);
    assert_eq!(parts, iid(1003, 10, 5).unwrap(), "same seed, same partition");
    assert_ne!(parts, iid(1003, 10, 6).unwrap(), "another seed, another partition");
    assert!(iid(5, 6, 0).is_err());
}

#[test]
fn dirichlet_covers_and_skews() {
    let l = labels(2000, 10);
    let parts = dirichlet(&l, 10, 20, 0.1, 3).unwrap();
    assert_exact_cover(&parts, 2000);
    assert_eq!(parts, dirichlet(&l, 10, 20, 0.1, 3).unwrap());
    assert_ne!(parts, dirichlet(&l, 10, 20, 0.1, 4).unwrap());
    // small alpha: a typical client is dominated by few classes; large alpha: close to uniform
    let top_share = |parts: &[Vec<u32>]| {
        let mut s = 0.0;
        let mut k = 0;
        for p in parts.iter().filter(|p| p.len() >= 20) {
            let mut c = [0usize; 10];
            for &i in p {
                c[l[i as usize] as usize] += 1;
            }
            s += *c.iter().max().unwrap() as f64 / p.len() as f64;
            k += 1;
        }
        s / k as f64
    };
    let skewed = top_share(&parts);
    let flat = top_share(&dirichlet(&l, 10, 20, 1000.0, 3).unwrap());
    assert!(
        skewed > 0.5 && flat < 0.2,
        "top-class share: alpha 0.1 {skewed:.2}, alpha 1000 {flat:.2}"
    );
}

#[test]
fn official_cyclic_positive_classes() {
    let p = cyclic_positive_classes(10, 10, &OFFICIAL_CLASSES_PER_CLIENT).unwrap();
    assert_eq!(p[0], vec![0, 1, 2, 3]);
    assert_eq!(p[1], vec![4, 5, 6, 7]);
    assert_eq!(p[2], vec![0, 8, 9]);
    assert_eq!(p[3], vec![1, 2, 3]);
    assert_eq!(p[4], vec![4, 5]);
    assert_eq!(p[9], vec![1]);
    let mut times = [0; 10];
    p.iter().flatten().for_each(|&c| times[c as usize] += 1);
    assert!(times.iter().all(|&t| t >= 2), "every class is positive somewhere: {times:?}");
}

#[test]
fn fedpu_labels_a_fraction_of_positive_classes_only() {
    let n = 3000;
    let l = labels(n, 10);
    let parts = iid(n, 10, 1).unwrap();
    let pos = cyclic_positive_classes(10, 10, &OFFICIAL_CLASSES_PER_CLIENT).unwrap();
    let clients = fedpu_clients(&l, 10, parts.clone(), &pos, 0.33, 7).unwrap();
    for (k, c) in clients.iter().enumerate() {
        assert_eq!(c.indices, parts[k], "FedPU keeps the partition");
        for class in 0..10u32 {
            let of_c: Vec<usize> = (0..c.len()).filter(|&j| l[c.indices[j] as usize] == class).collect();
            let lab = of_c.iter().filter(|&&j| c.labeled[j]).count();
            if pos[k].contains(&class) {
                assert_eq!(lab, (0.33 * of_c.len() as f64).floor() as usize, "client {k} class {class}");
            } else {
                assert_eq!(lab, 0, "client {k} labels only its positive classes");
            }
            // prior = share of the class among the unlabeled samples
            let nu = c.len() - c.num_labeled();
            let want = (of_c.len() - lab) as f64 / nu as f64;
            assert!((c.priors[class as usize] - want).abs() < 1e-12);
        }
        assert!((c.priors.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }
    assert_eq!(clients, fedpu_clients(&l, 10, parts.clone(), &pos, 0.33, 7).unwrap());
    let other = fedpu_clients(&l, 10, parts, &pos, 0.33, 8).unwrap();
    assert_ne!(clients[0].labeled, other[0].labeled, "the labeled subset depends on the seed");
}
