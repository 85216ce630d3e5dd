//! SCOP: the selection layer, the knockoff model, the selection phase and the importance.

use nn_core::candle_core::{Device, Tensor};
use nn_core::models::ModelConfig;
use nn_core::train::InMemorySource;
use nn_core::{Model, VarStore};
use pruning::scop::{scop_scores, symmetric_eigen, train_selection, GaussianKnockoffs, KnockoffGenerator, ScopConfig, ScopFactory};
use pruning::{criteria, prune_model, Arch};
use std::sync::atomic::Ordering;

#[test]
fn jacobi_eigen_of_a_hand_matrix() {
    // [[2, 1], [1, 2]]: eigenvalues 3 and 1, eigenvectors (1, 1)/sqrt2 and (1, -1)/sqrt2
    let (vals, vecs) = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2);
    assert!((vals[0] - 3.0).abs() < 1e-12 && (vals[1] - 1.0).abs() < 1e-12, "{vals:?}");
    assert!((vecs[0].abs() - 0.5f64.sqrt()).abs() < 1e-9 && (vecs[0] * vecs[2]) > 0.0);
}

#[test]
fn gaussian_knockoffs_recover_the_data_model() {
    // 2 strong directions (std 3 and 2) plus isotropic noise (std 0.1) in 4x4x1 images
    let dev = Device::Cpu;
    let n = 4000;
    let d = 16;
    let mut u1 = vec![0f32; d];
    let mut u2 = vec![0f32; d];
    for i in 0..d {
        u1[i] = if i < 8 { 0.25f32.sqrt() * 0.5 } else { -(0.25f32.sqrt()) * 0.5 };
        u2[i] = if i % 2 == 0 { 0.25 } else { -0.25 };
    }
    let z = Tensor::randn(0f32, 1.0, (n, 2), &dev).unwrap();
    let basis = Tensor::from_vec([u1.clone(), u2.clone()].concat(), (2, d), &dev).unwrap();
    let scale = Tensor::new(&[[3f32, 2.0]], &dev).unwrap();
    let noise = (Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap() * 0.1).unwrap();
    let x = (z.broadcast_mul(&scale).unwrap().matmul(&basis).unwrap() + noise)
        .unwrap()
        .affine(1.0, 0.5)
        .unwrap();
    let model = GaussianKnockoffs::fit(&x.reshape((n, 1, 4, 4)).unwrap(), 2, 0).unwrap();
    assert!(
        (model.scales[0] - 3.0).abs() < 0.2 && (model.scales[1] - 2.0).abs() < 0.15,
        "{:?}",
        model.scales
    );
    assert!((model.residual_std - 0.1).abs() < 0.02, "{}", model.residual_std);
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>().abs();
    assert!(cos(&model.basis[..d], &u1) > 0.99 && cos(&model.basis[d..], &u2) > 0.99);
    assert!(model.mean.iter().all(|m| (m - 0.5).abs() < 0.2));
    // samples follow the model and depend on the seed only
    let s = model.sample(3000, 7, &dev).unwrap().reshape((3000, d)).unwrap();
    let proj = s
        .affine(1.0, -0.5)
        .unwrap()
        .matmul(&Tensor::from_vec(u1.clone(), (d, 1), &dev).unwrap())
        .unwrap();
    let sd = proj.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    assert!((sd - 3.0).abs() < 0.25, "{sd}");
    let a = model.sample(2, 9, &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = model.sample(2, 9, &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, b);
    assert!(GaussianKnockoffs::fit(&x.reshape((n, 1, 4, 4)).unwrap(), 16, 0).is_err());
}

fn scop_resnet20() -> (VarStore, Box<dyn Model>, ScopFactory, ModelConfig) {
    let cfg = ModelConfig::new(1, 4, 8);
    let vs = VarStore::new(5, &Device::Cpu);
    let f = ScopFactory::default();
    let m = Arch::from_name("resnet20").unwrap().build(&cfg, &vs.root(), &f).unwrap();
    (vs, m, f, cfg)
}

#[test]
fn selection_layer_mixes_real_and_knockoff_halves() {
    let (vs, m, f, _) = scop_resnet20();
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 1, 8, 8), &dev).unwrap();
    // mixing off: the plain network
    let plain = m.forward_t(&x, false).unwrap();
    let vs2 = VarStore::new(5, &dev);
    let m2 = Arch::from_name("resnet20")
        .unwrap()
        .build(&nn_core::models::ModelConfig::new(1, 4, 8), &vs2.root(), &nn_core::StandardFactory)
        .unwrap();
    let t = vs.tensors();
    vs2.load_tensors(&t, false).unwrap();
    let d = (plain - m2.forward_t(&x, false).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-6);
    // one selection layer against eq. 6 with a known beta
    assert_eq!(f.selections.lock().unwrap().len(), 18);
    let lvs = VarStore::new(1, &dev);
    let lf = ScopFactory::default();
    let layer = nn_core::LayerFactory::conv2d(
        &lf,
        &lvs.root().pp("c"),
        nn_core::layers::Conv2dConfig::new(2, 3, 3),
        nn_core::LayerRole::Body,
    )
    .unwrap();
    let (_, beta) = lf.selections.lock().unwrap()[0].clone();
    beta.set(&Tensor::new(&[0.0f32, 0.25, 1.0], &dev).unwrap()).unwrap();
    lf.mixing.store(true, Ordering::Relaxed);
    let xr = Tensor::randn(0f32, 1.0, (2, 2, 5, 5), &dev).unwrap();
    let xk = Tensor::randn(0f32, 1.0, (2, 2, 5, 5), &dev).unwrap();
    let out = layer.forward_t(&Tensor::cat(&[&xr, &xk], 0).unwrap(), true).unwrap();
    let w = lvs.get("c.weight").unwrap().var.as_tensor().clone();
    let (yr, yk) = (xr.conv2d(&w, 1, 1, 1, 1).unwrap(), xk.conv2d(&w, 1, 1, 1, 1).unwrap());
    let b = Tensor::new(&[0.0f32, 0.25, 1.0], &dev).unwrap().reshape((1, 3, 1, 1)).unwrap();
    let want = (yr.broadcast_mul(&b).unwrap() + yk.broadcast_mul(&b.affine(-1.0, 1.0).unwrap()).unwrap()).unwrap();
    let err = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(err(&out.narrow(0, 0, 2).unwrap(), &want) < 1e-4, "real half follows eq. 6");
    assert!(err(&out.narrow(0, 2, 2).unwrap(), &yk) < 1e-4, "knockoff half passes unchanged");
    assert!(
        layer
            .forward_t(&Tensor::cat(&[&xr, &xk, &xr.narrow(0, 0, 1).unwrap()], 0).unwrap(), true)
            .is_err(),
        "odd batch"
    );
    // mixing off (eval): the plain convolution
    lf.mixing.store(false, Ordering::Relaxed);
    assert!(err(&layer.forward_t(&xr, true).unwrap(), &yr) < 1e-4);
}

#[test]
fn selection_phase_trains_only_beta_and_importance_prunes() {
    let (vs, m, f, cfg) = scop_resnet20();
    let dev = Device::Cpu;
    let n = 32;
    let images = Tensor::randn(0f32, 1.0, (n, 1, 8, 8), &dev).unwrap();
    let labels = Tensor::from_vec((0..n as u32).map(|i| i % 4).collect::<Vec<_>>(), n, &dev).unwrap();
    let data = InMemorySource::new(images.clone(), labels, 8, true, 0).unwrap();
    let gen = GaussianKnockoffs::fit(&images, 4, 1).unwrap();
    let before = vs.tensors();
    train_selection(
        m.as_ref(),
        &vs,
        &f,
        &data,
        &gen,
        &ScopConfig {
            epochs: 2,
            lr: 0.05,
            seed: 0,
            max_steps: None,
        },
    )
    .unwrap();
    let after = vs.tensors();
    let mut moved = 0;
    for (name, t) in &after {
        let d = (t - &before[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if name.ends_with(".selection") {
            let v = t.to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|b| (0.0..=1.0).contains(b)), "{name}: beta outside [0, 1]");
            moved += usize::from(d > 1e-4);
        } else {
            assert_eq!(d, 0.0, "{name} changed although the network is frozen");
        }
    }
    assert!(moved >= 9, "only {moved} selection layers moved");
    // importance |gamma| (2 beta - 1) by hand for one channel
    let g = Arch::from_name("resnet20").unwrap().graph(&cfg);
    let scores = scop_scores(&g, &vs).unwrap();
    let grp = g.group_of("layer1.0.conv1").unwrap();
    let beta = vs
        .get("layer1.0.conv1.selection")
        .unwrap()
        .var
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap();
    let gamma = vs.get("layer1.0.bn1.weight").unwrap().var.as_tensor().to_vec1::<f32>().unwrap();
    for u in 0..grp.len() {
        let want = gamma[u].abs() * (2.0 * beta[u] - 1.0);
        assert!((scores[grp.id][u] - want).abs() < 1e-6);
    }
    // prune by SCOP scores: the selection scales are not part of the pruned model
    let sel = criteria::select_lowest(&g, &scores, 0.5, |x| criteria::is_block_inner(&g, x));
    let p = prune_model(&Arch::from_name("resnet20").unwrap(), &cfg, &vs, &sel, &nn_core::StandardFactory).unwrap();
    assert!(p.vs.all().iter().all(|v| !v.name.ends_with(".selection")));
}
