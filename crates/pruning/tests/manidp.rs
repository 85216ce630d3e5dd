//! ManiDP: losses on hand-computed cases, gates through the layer factory, per-instance MACs
//! and the batch-of-one sparse inference path.

use nn_core::candle_core::{Device, Tensor};
use nn_core::models::ModelConfig;
use nn_core::train::{Callback, StepContext};
use nn_core::{Model, VarStore};
use pruning::manidp::{
    complexity_weights, instance_macs, kept_ratio, kept_ratio_at, similarity_loss, threshold_for, ManiDpCallback, ManiDpConfig,
    ManiDpFactory,
};
use pruning::{count, Arch};

#[test]
fn complexity_weights_push_only_easy_instances() {
    // t * Lbar = 0.5: loss 0.1 is easy, 0.5 and 1.0 are not
    let w = complexity_weights(&[0.1, 0.5, 1.0], 1.0, 0.5, 1.0);
    assert_eq!(w.len(), 3);
    assert!((w[0] - 0.8).abs() < 1e-6 && w[1] == 0.0 && w[2] == 0.0, "{w:?}");
    let w = complexity_weights(&[0.1], 1.0, 0.5, 2.0);
    assert!((w[0] - 0.64).abs() < 1e-6);
}

#[test]
fn similarity_loss_hand_case() {
    let dev = Device::Cpu;
    let a = Tensor::new(&[[1f32, 0.], [0., 2.]], &dev).unwrap();
    let b = Tensor::new(&[[3f32, 0.], [1., 0.]], &dev).unwrap();
    // G(a) = I, G(b) = all ones: two off-diagonal differences of 1, over B^2 = 4
    let l = similarity_loss(&a, &b).unwrap().to_scalar::<f32>().unwrap();
    assert!((l - 0.5).abs() < 1e-6, "{l}");
    assert!(similarity_loss(&a, &a).unwrap().to_scalar::<f32>().unwrap().abs() < 1e-7);
}

/// An instance whose gates are all closed has an all-zero row: the loss and every gradient
/// stay finite (a ResNet-20 run diverged to NaN on exactly this before the fix).
#[test]
fn similarity_loss_of_an_all_zero_row_has_finite_gradients() {
    let dev = Device::Cpu;
    let a = candle_core::Var::new(&[[0f32, 0., 0.], [1., 2., 0.], [0.5, 0., 1.]], &dev).unwrap();
    let b = candle_core::Var::new(&[[1f32, 0., 0.], [0., 0., 0.], [0., 1., 1.]], &dev).unwrap();
    let l = similarity_loss(a.as_tensor(), b.as_tensor()).unwrap();
    assert!(l.to_scalar::<f32>().unwrap().is_finite());
    let g = l.backward().unwrap();
    for v in [&a, &b] {
        let d = g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(d.iter().all(|x| x.is_finite()), "{d:?}");
    }
}

#[test]
fn threshold_schedule() {
    assert!((kept_ratio(9, 10, 0.65) - 0.65).abs() < 1e-12);
    assert!(kept_ratio(0, 10, 0.65) > 0.97);
    assert!(kept_ratio(3, 10, 0.65) > kept_ratio(4, 10, 0.65));
    assert_eq!(threshold_for(&[0.1, 0.5, 0.3, 0.9], 0.5), 0.5);
    assert_eq!(threshold_for(&[0.1, 0.5, 0.3, 0.9], 0.6), 0.3);
    assert_eq!(kept_ratio_at(0.0, 0.6), 1.0);
    assert!((kept_ratio_at(0.5, 0.6) - 0.8).abs() < 1e-12);
    assert!((kept_ratio_at(3.0, 0.6) - 0.6).abs() < 1e-12, "the target holds after the ramp");
}

/// With several updates per epoch the thresholds move inside an epoch, from the gate means
/// since the previous update, and reach the target ratio after `ramp_fraction` of the run.
#[test]
fn thresholds_update_within_epochs_and_reach_the_target_after_the_ramp() {
    let (vs, m, f, _) = gated_resnet20();
    let config = ManiDpConfig {
        target_kept: 0.5,
        threshold_updates_per_epoch: 4,
        ramp_fraction: 0.5,
        ..ManiDpConfig::default()
    };
    let mut cb = ManiDpCallback::new(config, f.state.clone());
    let x = Tensor::zeros((1, 3, 16, 16), nn_core::candle_core::DType::F32, &Device::Cpu).unwrap();
    let labels = Tensor::zeros(1, nn_core::candle_core::DType::U32, &Device::Cpu).unwrap();
    // 8 steps per epoch, 2 epochs: an update every 2 steps, 8 updates, the target after 4
    let step = |global_step: usize| StepContext {
        epoch: global_step / 8,
        step_in_epoch: global_step % 8,
        global_step,
        steps_per_epoch: 8,
        total_steps: 16,
        lr: 0.1,
        images: &x,
        labels: &labels,
        logits: &x,
        model: m.as_ref(),
        vs: &vs,
    };
    // gate g, channel c has mean value c (+ g so the gates differ); 16 channels in stage 1
    let fill = || {
        let mut s = f.state.lock().unwrap();
        for (gi, g) in s.gates.iter_mut().enumerate() {
            g.samples = 2;
            g.value_sum = (0..g.out_channels).map(|c| 2.0 * (c + gi) as f64).collect();
        }
    };
    let expect = |ratio: f64| {
        let s = f.state.lock().unwrap();
        for (gi, g) in s.gates.iter().enumerate() {
            let means: Vec<f64> = (0..g.out_channels).map(|c| (c + gi) as f64).collect();
            assert_eq!(g.threshold, threshold_for(&means, ratio), "gate {gi} at ratio {ratio}");
            assert_eq!(g.samples, 0, "statistics restart after an update");
            assert!(g.value_sum.iter().all(|&v| v == 0.0));
        }
    };
    fill();
    cb.on_step_end(&step(0), 0.0).unwrap();
    assert!(
        f.state.lock().unwrap().gates.iter().all(|g| g.threshold == f32::NEG_INFINITY),
        "no update after one step"
    );
    cb.on_step_end(&step(1), 0.0).unwrap();
    expect(kept_ratio_at(0.25, 0.5));
    fill();
    cb.on_step_end(&step(3), 0.0).unwrap();
    expect(kept_ratio_at(0.5, 0.5));
    fill();
    cb.on_step_end(&step(7), 0.0).unwrap();
    expect(0.5);
    fill();
    cb.on_step_end(&step(15), 0.0).unwrap();
    expect(0.5);
}

fn gated_resnet20() -> (VarStore, Box<dyn Model>, ManiDpFactory, ModelConfig) {
    let cfg = ModelConfig::new(3, 10, 16);
    let vs = VarStore::new(3, &Device::Cpu);
    let f = ManiDpFactory::new(ManiDpConfig::default());
    let m = Arch::from_name("resnet20").unwrap().build(&cfg, &vs.root(), &f).unwrap();
    (vs, m, f, cfg)
}

#[test]
fn every_parameter_of_the_gated_network_gets_a_gradient() {
    let (vs, m, f, _) = gated_resnet20();
    assert_eq!(f.state.lock().unwrap().gates.len(), 18, "two gates per block");
    let x = Tensor::randn(0f32, 1.0, (4, 3, 16, 16), &Device::Cpu).unwrap();
    nn_core::testing::check_all_params_get_gradients(m.as_ref(), &vs, &x).unwrap();
}

#[test]
fn per_instance_macs_and_sparse_batch_of_one_inference() {
    let (vs, m, f, cfg) = gated_resnet20();
    let _ = &vs;
    // close about half the channels of every gate
    let x = Tensor::randn(0f32, 1.0, (3, 3, 16, 16), &Device::Cpu).unwrap();
    m.forward_t(&x, false).unwrap();
    {
        let mut s = f.state.lock().unwrap();
        for g in s.gates.iter_mut() {
            let v: Vec<f64> = g
                .last
                .as_ref()
                .unwrap()
                .gate
                .mean(0)
                .unwrap()
                .to_dtype(nn_core::candle_core::DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            g.threshold = threshold_for(&v, 0.5);
        }
    }
    let (_, dense) = count(m.as_ref(), &cfg, &Device::Cpu).unwrap();
    let dense_logits = m.forward_t(&x, false).unwrap();
    let macs = instance_macs(&f.state, dense).unwrap();
    // the same count by hand from the gates' open channels
    let s = f.state.lock().unwrap();
    for (i, &mi) in macs.iter().enumerate() {
        let mut saved = 0u64;
        for g in &s.gates {
            let r = g.last.as_ref().unwrap();
            let a_in = g.input_gate.map_or(g.in_channels, |ig| s.gates[ig].last.as_ref().unwrap().open[i]);
            saved += (9 * r.out_hw * (g.in_channels * g.out_channels - a_in * r.open[i])) as u64;
        }
        assert_eq!(mi, dense - saved);
        assert!(mi < dense * 8 / 10, "about half the channels are closed: {mi} vs {dense}");
    }
    drop(s);
    // batch of one: the sparse path (only open filters over open inputs) gives the same logits
    for i in 0..3 {
        let xi = x.narrow(0, i, 1).unwrap();
        let yi = m.forward_t(&xi, false).unwrap();
        let want = dense_logits.narrow(0, i, 1).unwrap();
        let d = (yi - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "instance {i}: sparse inference differs by {d}");
    }
}
