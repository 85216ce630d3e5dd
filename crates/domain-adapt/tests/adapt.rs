//! The adaptation entry points end to end on tiny synthetic domains (16x16 images, 3 classes).

use candle_core::{Device, Tensor};
use domain_adapt::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Class c is a bright horizontal bar at row 3 + 4c; the target domain is inverted in contrast
/// and shifted by `shift` rows, a domain shift the source model only partly survives.
fn domain(n_per_class: usize, invert: bool, shift: usize, seed: u64) -> LabeledImages {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut px, mut labels) = (Vec::new(), Vec::new());
    for i in 0..3 * n_per_class {
        let c = i % 3;
        for y in 0..16 {
            for x in 0..16 {
                let on = (y as isize - (3 + 4 * c + shift) as isize).abs() <= 1 && x >= 2 && x < 14;
                let v: f32 = if on { 1.0 } else { 0.0 } + rng.gen_range(-0.3..0.3);
                px.push(if invert { 0.8 - v } else { v });
            }
        }
        labels.push(c as u32);
    }
    LabeledImages {
        name: "synthetic".into(),
        images: Tensor::from_vec(px, (3 * n_per_class, 1, 16, 16), &Device::Cpu).unwrap(),
        labels,
        num_classes: 3,
    }
}

fn spec() -> ModelSpec {
    ModelSpec {
        arch: "lenet5".into(),
        in_channels: 1,
        image_size: 16,
        num_classes: 3,
        bottleneck_dim: 16,
        classifier: domain_adapt::model::ClassifierKind::Linear,
    }
}

fn trained_source() -> SourceModel {
    let model = SourceModel::new(&spec(), 0).unwrap();
    let cfg = SourceTrainConfig {
        epochs: 8,
        batch_size: 16,
        lr: 0.05,
        ..Default::default()
    };
    train_source(&model, &domain(32, false, 0, 1), &cfg).unwrap();
    model
}

fn snapshot(m: &SourceModel, prefix: &str) -> Vec<f32> {
    let mut all: Vec<_> = m.var_store().all().into_iter().filter(|v| v.name.starts_with(prefix)).collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all.iter()
        .flat_map(|v| v.var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn source_training_learns_the_source() {
    let m = trained_source();
    let acc = accuracy(&m, &domain(10, false, 0, 7), 64).unwrap();
    assert!(acc > 90.0, "source accuracy {acc}");
}

#[test]
fn sfda_de_and_shot_im_adapt_a_copy_with_the_classifier_frozen() {
    let source = trained_source();
    let before = snapshot(&source, "");
    let target = domain(30, false, 1, 3).without_labels().unwrap();
    let cfg = SfdaDeConfig {
        loops: 2,
        steps_per_loop: 3,
        samples_per_class: 6,
        kmeans: KMeansConfig {
            distance_threshold: 0.5,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut seen_rounds = 0;
    let mut obs = |st: &RoundStats, _: &SourceModel| -> anyhow::Result<()> {
        assert!(st.kept_classes >= 2 && st.selected > 0 && st.mean_loss.is_finite(), "{st:?}");
        seen_rounds += 1;
        Ok(())
    };
    let (adapted, report) = adapt_sfda_de(&source, &target, &cfg, Some(&mut obs)).unwrap();
    assert_eq!(seen_rounds, 2);
    assert_eq!(report.steps, 6);
    assert_eq!(snapshot(&source, ""), before, "the source model must not change");
    assert_eq!(
        snapshot(&adapted, "classifier"),
        snapshot(&source, "classifier"),
        "classifier frozen"
    );
    assert_ne!(snapshot(&adapted, "backbone"), snapshot(&source, "backbone"), "features adapted");

    let (adapted, report) = adapt_shot_im(
        &source,
        &target,
        &ShotImConfig {
            epochs: 1,
            batch_size: 16,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    assert_eq!(report.steps, 90 / 16);
    assert_eq!(snapshot(&adapted, "classifier"), snapshot(&source, "classifier"));
    assert_ne!(snapshot(&adapted, "bottleneck"), snapshot(&source, "bottleneck"));
}

#[test]
fn information_maximization_by_hand() {
    // uniform predictions: entropy log K, diversity term -log K (up to the 1e-5 guard)
    let u = Tensor::zeros((4, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
    let v = information_maximization(&u, 1.0).unwrap().to_scalar::<f32>().unwrap();
    assert!(v.abs() < 1e-3, "{v}");
    // confident but all the same class: entropy ~0, diversity term ~0 -> loss ~0;
    // confident and diverse: entropy ~0, diversity term -log 2 -> the minimum
    let same = Tensor::new(&[[30f32, 0.0], [30.0, 0.0]], &Device::Cpu).unwrap();
    let diverse = Tensor::new(&[[30f32, 0.0], [0.0, 30.0]], &Device::Cpu).unwrap();
    let s = information_maximization(&same, 1.0).unwrap().to_scalar::<f32>().unwrap();
    let d = information_maximization(&diverse, 1.0).unwrap().to_scalar::<f32>().unwrap();
    assert!(s.abs() < 1e-3 && (d + 2f32.ln()).abs() < 1e-3, "{s} {d}");
}

#[test]
fn bad_configurations_are_refused_with_the_reason() {
    let source = SourceModel::new(&spec(), 0).unwrap();
    let target = domain(2, false, 0, 3).without_labels().unwrap();
    let e = adapt_sfda_de(
        &source,
        &target,
        &SfdaDeConfig {
            loops: 0,
            ..Default::default()
        },
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("loops >= 1"), "{e}");
    // an untrained model with an impossible threshold keeps no class
    let cfg = SfdaDeConfig {
        kmeans: KMeansConfig {
            distance_threshold: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let e = adapt_sfda_de(&source, &target, &cfg, None).err().unwrap().to_string();
    assert!(e.contains("distance_threshold"), "{e}");
    let e = adapt_shot_im(&source, &target, &ShotImConfig::default(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("batch size"), "{e}");
    let e = TargetImages::new(Tensor::zeros((3, 16), candle_core::DType::F32, &Device::Cpu).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("[N >= 2, C, H, W]"), "{e}");
}
