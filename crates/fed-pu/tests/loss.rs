//! The FedPU loss against a host computation of the risk, term by term.

use candle_core::{Device, Tensor};
use fed_pu::loss::{fedpu_loss, masked_cross_entropy, objective_loss, FedPuConfig, NnPu, Objective};

fn softmax(row: &[f64]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

const EPS: f64 = 1e-6;
fn psi(p: f64) -> f64 {
    -(1.0 - p + EPS).ln()
}

#[test]
fn fedpu_loss_matches_the_hand_computed_risk() {
    // rows 0, 1: labeled, class 0; rows 2, 3: unlabeled (their labels must not be read)
    let rows = [[1.0, 0.0, -1.0], [0.0, 2.0, 0.0], [0.5, 0.5, 0.0], [-1.0, 0.0, 1.0]];
    let logits = Tensor::new(&rows, &Device::Cpu).unwrap();
    let labels = [0u32, 0, 1, 2];
    let labeled = [true, true, false, false];
    let positive = [0u32, 2]; // class 2 is positive but has no labeled sample in this batch
    let priors = [0.2, 0.5, 0.3];
    let cfg = FedPuConfig {
        weight: 0.5,
        ..FedPuConfig::default()
    };
    let (loss, terms) = fedpu_loss(&logits, &labels, &labeled, &positive, &priors, &cfg).unwrap();
    let p: Vec<Vec<f64>> = rows.iter().map(|r| softmax(r)).collect();
    let ce = -(p[0][0].ln() + p[1][0].ln()) / 2.0;
    let r0 = (psi(p[2][0]) + psi(p[3][0])) / 2.0 - 0.2 * (psi(p[0][0]) + psi(p[1][0])) / 2.0;
    let r2 = (psi(p[2][2]) + psi(p[3][2])) / 2.0;
    let want = ce + 0.5 * (r0 + r2);
    let got = loss.to_scalar::<f64>().unwrap();
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    assert!((terms.ce - ce).abs() < 1e-12);
    assert!((terms.class_risks[0] - r0).abs() < 1e-12 && terms.class_risks[1] == 0.0 && (terms.class_risks[2] - r2).abs() < 1e-12);
    // changing the hidden labels of unlabeled rows changes nothing
    let (l2, _) = fedpu_loss(&logits, &[0, 0, 0, 0], &labeled, &positive, &priors, &cfg).unwrap();
    assert_eq!(l2.to_scalar::<f64>().unwrap(), got);
    // the gradient is the derivative of that risk
    nn_core::testing::check_gradient(
        &logits,
        |x| Ok(fedpu_loss(x, &labels, &labeled, &positive, &priors, &cfg)?.0),
        1e-6,
        1e-6,
    )
    .unwrap();
}

#[test]
fn nnpu_correction_flips_negative_class_risks() {
    // labeled class-0 samples are confidently class 0 (large psi_0), unlabeled ones are not
    // (small psi_0), and the prior is large: the unbiased estimate r_0 goes negative
    let rows = [[6.0, 0.0, 0.0], [5.0, 0.0, 0.0], [-3.0, 1.0, 0.0], [-2.0, 0.0, 1.0]];
    let logits = Tensor::new(&rows, &Device::Cpu).unwrap();
    let (labels, labeled, positive, priors) = ([0u32, 0, 1, 2], [true, true, false, false], [0u32], [0.9, 0.05, 0.05]);
    let upu = FedPuConfig::default();
    let nn = FedPuConfig {
        nnpu: Some(NnPu { beta: 0.0, gamma: 0.5 }),
        ..FedPuConfig::default()
    };
    let (lu, tu) = fedpu_loss(&logits, &labels, &labeled, &positive, &priors, &upu).unwrap();
    let (ln, tn) = fedpu_loss(&logits, &labels, &labeled, &positive, &priors, &nn).unwrap();
    let r0 = tu.class_risks[0];
    assert!(r0 < 0.0, "the unbiased estimate is negative here: {r0}");
    assert!((lu.to_scalar::<f64>().unwrap() - (tu.ce + r0)).abs() < 1e-12);
    assert!(
        (ln.to_scalar::<f64>().unwrap() - (tn.ce - 0.5 * r0)).abs() < 1e-12,
        "nnPU steps on -gamma * r"
    );
    assert!(tn.pu > 0.0);
}

#[test]
fn baselines_are_masked_cross_entropy() {
    let rows = [[1.0, 0.0], [0.0, 3.0], [2.0, 1.0]];
    let logits = Tensor::new(&rows, &Device::Cpu).unwrap();
    let labels = [1u32, 1, 0];
    let p: Vec<Vec<f64>> = rows.iter().map(|r| softmax(r)).collect();
    let only_first = masked_cross_entropy(&logits, &labels, &[true, false, false])
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((only_first + p[0][1].ln()).abs() < 1e-12);
    let pos = objective_loss(&Objective::PositivesOnly, &logits, &labels, &[true, false, true], &[0, 1], &[]).unwrap();
    assert!((pos.to_scalar::<f64>().unwrap() + (p[0][1].ln() + p[2][0].ln()) / 2.0).abs() < 1e-12);
    let sup = objective_loss(&Objective::Supervised, &logits, &labels, &[false, false, false], &[], &[]).unwrap();
    assert!((sup.to_scalar::<f64>().unwrap() + (p[0][1].ln() + p[1][1].ln() + p[2][0].ln()) / 3.0).abs() < 1e-12);
    assert_eq!(
        masked_cross_entropy(&logits, &labels, &[false; 3])
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );
}
