//! The simulation engine: determinism across worker counts, exact resume, one model per
//! sampled client, FedProx, and that FedPU learns on synthetic data.

mod common;

use common::*;
use fed_pu::engine::{sample_clients, FedConfig, Simulation};
use fed_pu::loss::{FedPuConfig, Objective};
use fed_pu::partition::{cyclic_positive_classes, fedpu_clients, iid, labeled_clients};
use fed_pu::Strategy;
use std::sync::Arc;

fn fedpu_sim(cfg: FedConfig, lenet: bool) -> Simulation {
    let s = if lenet { 16 } else { 6 };
    let data = Arc::new(synthetic(320, 4, s, 1));
    let test = Arc::new(synthetic(200, 4, s, 2));
    let parts = iid(data.len(), 8, 0).unwrap();
    let pos = cyclic_positive_classes(8, 4, &[2, 1, 1, 2]).unwrap();
    let clients = fedpu_clients(&data.labels, 4, parts, &pos, 0.5, 0).unwrap();
    let builder = if lenet { lenet_builder(4, s) } else { mlp_builder(s * s, 4) };
    Simulation::new(cfg, data, Some(test), clients, builder).unwrap()
}

fn cfg(workers: usize, rounds: usize) -> FedConfig {
    FedConfig {
        rounds,
        clients_per_round: 5,
        local_epochs: 1,
        batch_size: 16,
        lr: 0.05,
        objective: Objective::FedPu(FedPuConfig::default()),
        seed: 3,
        workers,
        ..FedConfig::default()
    }
}

#[test]
fn sampling_is_seeded_and_without_replacement() {
    let a = sample_clients(1000, 100, 1, 4);
    assert_eq!(a.len(), 100);
    assert!(a.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(a, sample_clients(1000, 100, 1, 4));
    assert_ne!(a, sample_clients(1000, 100, 1, 5), "rounds sample different clients");
    assert_eq!(sample_clients(7, 10, 0, 0), (0..7).collect::<Vec<u32>>());
}

#[test]
fn same_weights_with_one_or_two_workers() {
    for lenet in [false, true] {
        let mut a = fedpu_sim(cfg(1, 2), lenet);
        let mut b = fedpu_sim(cfg(2, 2), lenet);
        a.run(|_| {}).unwrap();
        b.run(|_| {}).unwrap();
        assert_eq!(
            max_abs_diff(a.global_weights(), b.global_weights()),
            0.0,
            "lenet {lenet}: bit-identical"
        );
        assert!(b.max_live_models() <= 2, "at most one model per worker: {}", b.max_live_models());
        assert!(a.max_live_models() == 1);
    }
}

#[test]
fn resume_equals_uninterrupted() {
    let dir = std::env::temp_dir().join(format!("fedpu-resume-{}", std::process::id()));
    let ckpt = dir.join("checkpoint.safetensors");
    let _ = std::fs::remove_dir_all(&dir);
    let mut full = fedpu_sim(cfg(2, 4), false);
    full.run(|_| {}).unwrap();

    let mut first = fedpu_sim(cfg(2, 2), false).with_checkpoint(&ckpt);
    assert!(!first.resume().unwrap());
    first.run(|_| {}).unwrap();
    drop(first);
    let mut second = fedpu_sim(cfg(1, 4), false).with_checkpoint(&ckpt);
    assert!(second.resume().unwrap(), "the checkpoint is found");
    assert_eq!(second.state().round, 2);
    second.run(|_| {}).unwrap();
    assert_eq!(second.state().round, 4);
    assert_eq!(second.state().history.len(), 4);
    assert_eq!(
        max_abs_diff(full.global_weights(), second.global_weights()),
        0.0,
        "resumed run == uninterrupted run"
    );
    for (a, b) in full.state().history.iter().zip(&second.state().history) {
        assert_eq!((a.round, &a.sampled), (b.round, &b.sampled));
        // (the history went through JSON, whose float parsing may be 1 ulp off)
        assert!((a.train_loss - b.train_loss).abs() <= 1e-12 * a.train_loss.abs());
    }
    // a different configuration refuses the checkpoint
    let mut other = fedpu_sim(FedConfig { lr: 0.1, ..cfg(1, 4) }, false).with_checkpoint(&ckpt);
    assert!(other.resume().is_err());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn fedprox_pulls_towards_the_global_model() {
    let data = Arc::new(synthetic(200, 4, 6, 1));
    let parts = iid(data.len(), 4, 0).unwrap();
    let clients = labeled_clients(&data.labels, 4, parts);
    let run = |strategy| {
        let c = FedConfig {
            rounds: 1,
            clients_per_round: 4,
            batch_size: 10,
            lr: 0.1,
            momentum: 0.0,
            strategy,
            objective: Objective::Supervised,
            ..FedConfig::default()
        };
        let mut s = Simulation::new(c, data.clone(), None, clients.clone(), mlp_builder(36, 4)).unwrap();
        let init = s.global_weights().clone();
        s.run(|_| {}).unwrap();
        max_abs_diff(&init, s.global_weights())
    };
    let avg = run(Strategy::FedAvg);
    let prox = run(Strategy::FedProx { mu: 5.0 });
    assert!(prox < avg * 0.8, "FedProx moves less from the global model: {prox} vs FedAvg {avg}");
}

#[test]
fn fedpu_beats_positives_only_on_synthetic_data() {
    let run = |objective| {
        let mut s = fedpu_sim(
            FedConfig {
                rounds: 6,
                objective,
                eval_every: 6,
                ..cfg(2, 6)
            },
            false,
        );
        s.run(|_| {}).unwrap();
        s.state().history.last().unwrap().test_top1.unwrap()
    };
    let fedpu = run(Objective::FedPu(FedPuConfig::default()));
    let pos = run(Objective::PositivesOnly);
    let sup = run(Objective::Supervised);
    eprintln!("synthetic: FedPU {fedpu}, positives-only {pos}, supervised {sup}");
    assert!(sup >= 75.0, "the synthetic task is learnable: supervised {sup}");
    assert!(fedpu > pos + 20.0, "FedPU {fedpu} vs positives-only {pos}");
}
