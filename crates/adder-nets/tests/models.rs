//! AdderNet backbones through the factory, gradients of every parameter, counting and energy,
//! the adaptive learning rate, and PKKD's kernel maps and pair.

use adder_nets::pkkd::{gaussian_kernel_map, laplacian_kernel_map, patch_sq_norm, PkkdConfig, PkkdPair};
use adder_nets::{adaptive_alpha, count, AdaptiveLr, AdderConfig, AdderCounts, AdderFactory, ADD_PJ, MUL_PJ};
use candle_core::{DType, Device, Tensor};
use nn_core::layers::Conv2dConfig;
use nn_core::models::{create_model, ModelConfig};
use nn_core::testing::check_all_params_get_gradients;
use nn_core::train::cross_entropy;
use nn_core::VarStore;

fn input(n: usize, c: usize, s: usize) -> Tensor {
    let v: Vec<f32> = (0..n * c * s * s).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    Tensor::from_vec(v, (n, c, s, s), &Device::Cpu).unwrap()
}

#[test]
fn every_parameter_of_every_ann_gets_a_finite_gradient() {
    for (name, c, s) in [
        ("lenet5-bn", 1, 28),
        ("resnet20-b", 3, 16),
        ("resnet20", 3, 16),
        ("resnet18", 3, 32),
    ] {
        let vs = VarStore::new(0, &Device::Cpu);
        let f = AdderFactory::default();
        let m = create_model(name, &ModelConfig::new(c, 10, s), &vs.root(), &f).unwrap();
        check_all_params_get_gradients(m.as_ref(), &vs, &input(4, c, s)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!f.registry().is_empty(), "{name}: no adder layers");
    }
}

#[test]
fn stem_and_classifier_stay_full_precision_and_counts_split() {
    let vs = VarStore::new(0, &Device::Cpu);
    let f = AdderFactory::default();
    let m = create_model("resnet20-b", &ModelConfig::new(3, 10, 32), &vs.root(), &f).unwrap();
    let (c, s) = count(m.as_ref(), (3, 32, 32), &Device::Cpu).unwrap();
    let kind = |n: &str| s.layers.iter().find(|l| l.name == n).map(|l| l.kind.clone()).unwrap();
    assert_eq!(kind("conv1"), "Conv2d");
    assert_eq!(kind("fc"), "Linear");
    assert_eq!(kind("layer1.0.conv1"), "AdderConv2d");
    assert_eq!(kind("layer2.0.shortcut.conv"), "AdderConv2d");
    // multiplications: the 3->16 3x3 stem on 32x32 and the 64->10 classifier only
    assert_eq!(c.multiplications, (16 * 3 * 9 * 32 * 32 + 64 * 10) as u64);
    // body 3x3 layers: the float ResNet-20-B MACs minus stem and head, times 2 additions
    let vf = VarStore::new(0, &Device::Cpu);
    let mf = create_model("resnet20-b", &ModelConfig::new(3, 10, 32), &vf.root(), &nn_core::StandardFactory).unwrap();
    let (cf, _) = count(mf.as_ref(), (3, 32, 32), &Device::Cpu).unwrap();
    assert_eq!(cf.multiplications, cf.additions);
    assert_eq!(c.additions, c.multiplications + 2 * (cf.multiplications - c.multiplications));
    assert!(c.energy_uj < cf.energy_uj / 2.0, "{c:?} vs {cf:?}");
    assert_eq!(c.params, cf.params);
}

#[test]
fn energy_uses_the_45nm_figures() {
    let mut s = nn_core::summary::ModelSummary::default();
    s.layers.push(nn_core::summary::LayerStat {
        macs: 1000,
        additions: 500,
        params: 3,
        ..Default::default()
    });
    let c = AdderCounts::from_summary(&s);
    assert_eq!((c.multiplications, c.additions), (1000, 1500));
    assert!((c.energy_uj - (1000.0 * 3.7 + 1500.0 * 0.9) * 1e-6).abs() < 1e-12);
    assert_eq!((ADD_PJ, MUL_PJ), (0.9, 3.7));
}

#[test]
fn adaptive_learning_rate_scales_to_eta_sqrt_k() {
    let g = Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
    let a = adaptive_alpha(&g, 0.2).unwrap();
    assert!((a - 0.2 * 2f64.sqrt() / 5.0).abs() < 1e-12, "{a}");
    assert_eq!(
        adaptive_alpha(&Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(), 0.2).unwrap(),
        0.0
    );
    // on a real model: every adder filter gradient ends with norm eta * sqrt(k), others untouched
    let vs = VarStore::new(1, &Device::Cpu);
    let f = AdderFactory::default();
    let m = create_model("lenet5-bn", &ModelConfig::new(1, 10, 28), &vs.root(), &f).unwrap();
    let y = Tensor::new(&[1u32, 2, 3, 4], &Device::Cpu).unwrap();
    let mut grads = cross_entropy(&m.forward_t(&input(4, 1, 28), true).unwrap(), &y, 0.0)
        .unwrap()
        .backward()
        .unwrap();
    let stem = vs.get("conv1.weight").unwrap();
    let before = grads
        .get(stem.var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let n = AdaptiveLr::new(f.registry(), 0.2).apply(&mut grads).unwrap();
    assert_eq!(n, 3, "conv2, fc1, fc2 are adder layers");
    for (name, w) in f.registry().weights() {
        let g = grads.get(w.as_tensor()).unwrap();
        let norm = g.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap() as f64;
        let want = 0.2 * (w.elem_count() as f64).sqrt();
        assert!((norm - want).abs() < 1e-4 * want, "{name}: {norm} vs {want}");
    }
    let after = grads
        .get(stem.var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(before, after, "the full-precision stem is not rescaled");
}

#[test]
fn kernel_maps_match_hand_computed_values() {
    let d = Device::Cpu;
    // Laplacian: exp(y / sigma); y = -||x - f||_1 = -2 with sigma 1 -> e^-2; y = -3, sigma 2 -> e^-1.5
    let y = Tensor::new(&[-2.0f32, -3.0, 0.0], &d).unwrap().reshape((1, 3, 1, 1)).unwrap();
    let l = laplacian_kernel_map(&y, 1.0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((l[0] - 0.135_335_28).abs() < 1e-6 && (l[2] - 1.0).abs() < 1e-7, "{l:?}");
    let l2 = laplacian_kernel_map(&y, 2.0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((l2[1] - 0.223_130_16).abs() < 1e-6, "{l2:?}");
    // Gaussian: x = (1, 1), f = (1, 2): y = x.f = 3, ||x||^2 = 2, ||f||^2 = 5, ||x - f||^2 = 1
    // sigma 1: exp(-1/2) = 0.60653066; sigma 0.5: exp(-2) = 0.13533528
    let y = Tensor::new(&[3.0f32], &d).unwrap().reshape((1, 1, 1, 1)).unwrap();
    let xs = Tensor::new(&[2.0f32], &d).unwrap().reshape((1, 1, 1, 1)).unwrap();
    let fs = Tensor::new(&[5.0f32], &d).unwrap();
    let g = gaussian_kernel_map(&y, &xs, &fs, 1.0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((g[0] - 0.606_530_66).abs() < 1e-6, "{g:?}");
    let g = gaussian_kernel_map(&y, &xs, &fs, 0.5)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((g[0] - 0.135_335_28).abs() < 1e-6, "{g:?}");
    // receptive-field norms: [[1, 2], [3, 4]] under a 2x2 window -> 1 + 4 + 9 + 16 = 30
    let x = Tensor::new(&[1.0f32, 2.0, 3.0, 4.0], &d).unwrap().reshape((1, 1, 2, 2)).unwrap();
    let p = patch_sq_norm(&x, &Conv2dConfig::new(1, 1, 2).padding(0)).unwrap();
    assert_eq!(p.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![30.0]);
    assert!(laplacian_kernel_map(&y, 0.0).is_err() && gaussian_kernel_map(&y, &xs, &fs, -1.0).is_err());
}

#[test]
fn gaussian_map_of_conv_responses_is_the_rbf_of_patches_and_filters() {
    let d = Device::Cpu;
    let x = input(2, 3, 5);
    let w = Tensor::new(
        (0..3 * 3 * 9)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0)
            .collect::<Vec<_>>()
            .as_slice(),
        &d,
    )
    .unwrap()
    .reshape((3, 3, 3, 3))
    .unwrap();
    let cfg = Conv2dConfig::new(3, 3, 3);
    let y = nn_core::layers::conv::conv2d(&x, &w, &cfg).unwrap();
    let fsq = w.sqr().unwrap().flatten_from(1).unwrap().sum(1).unwrap();
    let g = gaussian_kernel_map(&y, &patch_sq_norm(&x, &cfg).unwrap(), &fsq, 2.0).unwrap();
    // direct: ||x_patch - f||^2 is minus the adder response with squared differences; check one
    // position by hand: image 1, channel 2, pixel (0, 0) with padding 1
    let xf = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let wf = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut d2 = 0.0f64;
    for c in 0..3 {
        for i in 0..3 {
            for j in 0..3 {
                let (iy, ix) = (i as isize - 1, j as isize - 1);
                let xv = if iy < 0 || ix < 0 {
                    0.0
                } else {
                    xf[((3 + c) * 5 + iy as usize) * 5 + ix as usize] as f64
                };
                let wv = wf[((2 * 3 + c) * 3 + i) * 3 + j] as f64;
                d2 += (xv - wv).powi(2);
            }
        }
    }
    let got = g
        .get(1)
        .unwrap()
        .get(2)
        .unwrap()
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let want = (-d2 / 8.0).exp();
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}

#[test]
fn every_parameter_of_the_pkkd_pair_gets_a_finite_gradient() {
    for (name, c, s) in [("lenet5-bn", 1, 28), ("resnet20-b", 3, 16)] {
        let vs = VarStore::new(0, &Device::Cpu);
        let pair = PkkdPair::new(
            &vs.root(),
            name,
            &ModelConfig::new(c, 10, s),
            PkkdConfig::default(),
            AdderConfig::default(),
        )
        .unwrap();
        let x = input(4, c, s);
        let y = Tensor::new(&[1u32, 2, 3, 4], &Device::Cpu).unwrap();
        let logits = nn_core::Model::forward_t(&pair, &x, true).unwrap();
        let (extra, terms) = pair.distill_loss(&logits, &y).unwrap();
        assert!(terms.feature > 0.0 && terms.kd >= 0.0 && terms.teacher_ce > 0.0, "{terms:?}");
        let loss = (cross_entropy(&logits, &y, 0.0).unwrap() + extra).unwrap();
        let grads = loss.backward().unwrap();
        let mut bad = Vec::new();
        for p in vs.trainable() {
            match grads.get(p.var.as_tensor()) {
                None => bad.push(format!("{} (none)", p.name)),
                Some(g) => {
                    let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    if v.iter().any(|x| !x.is_finite()) || v.iter().all(|x| *x == 0.0) {
                        bad.push(p.name.clone());
                    }
                }
            }
        }
        assert!(bad.is_empty(), "{name}: {bad:?}");
        assert!(vs.trainable().iter().any(|p| p.name.starts_with("pkkd.")));
        // evaluation runs the student only and needs no teacher state
        let e = nn_core::Model::forward_t(&pair, &x, false).unwrap();
        assert_eq!(e.dims(), &[4, 10]);
        assert!(pair.distill_loss(&e, &y).is_err(), "no teacher logits after an eval pass");
    }
}

#[test]
fn pkkd_default_layers_exist_in_basic_and_bottleneck_resnets() {
    use adder_nets::pkkd::default_layers;
    assert_eq!(
        default_layers("resnet20").unwrap(),
        ["layer1.2.conv2", "layer2.2.conv2", "layer3.2.conv2"]
    );
    assert_eq!(
        default_layers("resnet50").unwrap(),
        ["layer1.2.conv3", "layer2.3.conv3", "layer3.5.conv3", "layer4.2.conv3"]
    );
    // the pair builds (it rejects layer names that the model does not have, see below)
    for model in ["resnet18", "resnet50"] {
        let vs = VarStore::new(0, &Device::Cpu);
        PkkdPair::new(
            &vs.root(),
            model,
            &ModelConfig::new(3, 10, 64),
            PkkdConfig::default(),
            AdderConfig::default(),
        )
        .unwrap_or_else(|e| panic!("{model}: {e}"));
    }
}

#[test]
fn pkkd_rejects_unknown_layers() {
    let vs = VarStore::new(0, &Device::Cpu);
    let cfg = PkkdConfig {
        layers: vec!["layer9.0.conv2".into()],
        ..Default::default()
    };
    let e = PkkdPair::new(&vs.root(), "resnet20", &ModelConfig::new(3, 10, 16), cfg, AdderConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("layer9.0.conv2"), "{e}");
}

#[test]
fn adder_linear_is_the_negative_l1_distance_and_counts_additions() {
    use candle_nn::ModuleT;
    let vs = VarStore::new(3, &Device::Cpu);
    let l = adder_nets::AdderLinear::new(&vs.root().pp("fc"), 3, 2, true, None).unwrap();
    l.weight
        .set(&Tensor::new(&[[1.0f32, 0.0, -1.0], [0.5, 0.5, 0.5]], &Device::Cpu).unwrap())
        .unwrap();
    l.bias
        .as_ref()
        .unwrap()
        .set(&Tensor::new(&[10.0f32, 0.0], &Device::Cpu).unwrap())
        .unwrap();
    let x = Tensor::new(&[[0.0f32, 1.0, 2.0], [1.0, 1.0, 1.0]], &Device::Cpu).unwrap();
    let (y, s) = nn_core::summary::profile(|| l.forward_t(&x, false)).unwrap();
    // row 0: -(1 + 1 + 3) + 10 = 5, -(0.5 + 0.5 + 1.5) = -2.5; row 1: -(0 + 1 + 2) + 10 = 7, -1.5
    assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![5.0, -2.5], vec![7.0, -1.5]]);
    assert_eq!((s.layers[0].additions, s.layers[0].macs), (12, 0));
    assert!(l
        .forward_t(&Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap(), false)
        .is_err());
}
