//! Weight sharing: sub-networks that pick the same op at a slot use the same `Var` (narrower
//! widths its leading channels), one training step on one path changes only that path's
//! parameters, and extraction copies exactly the path's (sliced) weights.

mod common;

use candle_core::{Device, Tensor};
use nas::space::{Arch, LayerChoice, Op};
use nas::supernet::{path_at, train_supernet, Supernet};
use nn_core::train::{cross_entropy, InMemorySource, OptimizerConfig, TrainConfig};
use std::collections::HashMap;

fn arch(ops: &[(Op, f64)]) -> Arch {
    Arch {
        layers: ops.iter().map(|&(op, width)| LayerChoice { op, width }).collect(),
    }
}

fn c3(w: f64) -> (Op, f64) {
    (Op::Conv { k: 3 }, w)
}

#[test]
fn sub_networks_share_the_supernets_variables() {
    let space = common::tiny_space(8);
    let sn = Supernet::new(&space, 0, &Device::Cpu).unwrap();
    let ir = (Op::InvRes { expand: 3, k: 5 }, 1.0);
    let a = arch(&[c3(1.0), ir, c3(1.0), c3(1.0), c3(1.0), c3(1.0), c3(1.0), c3(1.0)]);
    let b = arch(&[c3(0.5), (Op::Skip, 1.0), c3(0.5), c3(1.0), c3(1.0), c3(1.0), c3(1.0), c3(1.0)]);
    let x = Tensor::randn(0f32, 1.0, (4, 3, 8, 8), &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu).unwrap();
    let w0 = sn.vs.get("layers.0.conv3.conv.weight").unwrap().var;
    let grads = |arch: &Arch| {
        let loss = cross_entropy(&sn.net.forward_arch(&x, arch, true).unwrap(), &y, 0.0).unwrap();
        loss.backward().unwrap()
    };
    let (ga, gb) = (grads(&a), grads(&b));
    // Both paths reach the same Var at slot 0.
    let (da, db) = (ga.get(w0.as_tensor()).unwrap(), gb.get(w0.as_tensor()).unwrap());
    assert_eq!(da.dims(), db.dims());
    // Width 0.5 (8 of 16 channels) only touches the leading output channels.
    let tail = db
        .narrow(0, 8, 8)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let head = db
        .narrow(0, 0, 8)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(tail, 0.0);
    assert!(head > 0.0);
    // a's IR op at slot 1 gets a gradient; b (skip there) does not reach it.
    let ir_w = sn.vs.get("layers.1.ir_e3_k5.dw.conv.weight").unwrap().var;
    assert!(ga.get(ir_w.as_tensor()).is_some());
    assert!(gb.get(ir_w.as_tensor()).is_none());
    // Extraction copies the leading slice of the shared weight.
    let (_, vsb) = sn.extract(&b, false, 1.0).unwrap();
    let wb = vsb.get("layers.0.conv3.conv.weight").unwrap().var;
    assert_eq!(wb.dims(), &[8, 16, 3, 3]);
    let diff = (wb.as_tensor() - w0.as_tensor().narrow(0, 0, 8).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    // The extracted network computes what the supernet computes on that path.
    let (net_b, _) = sn.extract(&b, false, 0.1).unwrap();
    let y1 = net_b.forward_arch(&x, &b, true).unwrap();
    let y2 = sn.net.forward_arch(&x, &b, true).unwrap();
    let d = (y1 - y2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-4, "{d}");
}

#[test]
fn one_step_changes_only_the_sampled_path() {
    let space = common::tiny_space(8);
    let sn = Supernet::new(&space, 3, &Device::Cpu).unwrap();
    let before: HashMap<String, Tensor> = sn.vs.tensors();
    let data = common::tiny_data(8);
    let train = InMemorySource::new(data.train.images.clone(), data.train.labels.clone(), 16, true, 0).unwrap();
    let dir = common::tmp("one-step");
    let mut cfg = TrainConfig::new("supernet", "synthetic", 1, &dir);
    cfg.optimizer = OptimizerConfig::sgd(0.1, 5e-4);
    cfg.quiet = true;
    cfg.stop_after_steps = Some(1);
    let s = train_supernet(&sn, cfg, &train).unwrap();
    assert!(!s.completed);
    let path = path_at(&space, 3, 0);
    let on_path = |name: &str| -> bool {
        if name.starts_with("stem.") || name.starts_with("fc.") {
            return true;
        }
        let parts: Vec<&str> = name.split('.').collect();
        let slot: usize = parts[1].parse().unwrap();
        path.layers[slot].op.name() == parts[2]
    };
    let after = sn.vs.tensors();
    let mut changed_on = 0;
    for v in sn.vs.trainable() {
        let d = (&after[&v.name] - &before[&v.name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if on_path(&v.name) {
            changed_on += (d > 0.0) as usize;
        } else {
            assert_eq!(d, 0.0, "{} is off the path {} but changed", v.name, path.key());
        }
    }
    assert!(changed_on > 0);
    std::fs::remove_dir_all(&dir).ok();
}
