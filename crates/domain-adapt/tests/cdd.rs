//! CDD / multi-kernel MMD on hand-computed cases.

use candle_core::{Device, Tensor};
use domain_adapt::{cdd, mmd2, KernelConfig};

fn t(v: &[f64], n: usize) -> Tensor {
    Tensor::from_vec(v.to_vec(), (n, v.len() / n), &Device::Cpu).unwrap()
}

fn one_kernel(bw: f64) -> KernelConfig {
    KernelConfig {
        num_kernels: 1,
        kernel_mul: 2.0,
        fixed_bandwidth: Some(bw),
    }
}

fn val(x: &Tensor) -> f64 {
    x.to_scalar::<f64>().unwrap()
}

#[test]
fn two_classes_by_hand() {
    // source: class 0 at 0, class 1 at 3; target: class 0 at 1, class 1 at 3; k = exp(-d^2)
    let s = t(&[0.0, 3.0], 2);
    let tg = t(&[1.0, 3.0], 2);
    let out = cdd(&s, &[0, 1], &tg, &[0, 1], &one_kernel(1.0)).unwrap();
    let e = |d2: f64| (-d2).exp();
    let d00 = 2.0 - 2.0 * e(1.0); // S0 vs T0
    let d11 = 0.0; // S1 vs T1 (same point)
    let d01 = 2.0 - 2.0 * e(9.0); // S0 vs T1
    let d10 = 2.0 - 2.0 * e(4.0); // S1 vs T0
    assert!((val(&out.intra) - (d00 + d11) / 2.0).abs() < 1e-12);
    assert!((val(&out.inter) - (d01 + d10) / 2.0).abs() < 1e-12);
    assert!((val(&out.loss) - ((d00 + d11) / 2.0 - (d01 + d10) / 2.0)).abs() < 1e-12);
    assert_eq!(out.classes, vec![0, 1]);
}

#[test]
fn multi_kernel_and_multiple_samples_by_hand() {
    // one class, x = {0, 2}, y = {1}; kernels with bandwidths 2 * 2^(i - 1) = 1, 2, 4
    let k = KernelConfig {
        num_kernels: 3,
        kernel_mul: 2.0,
        fixed_bandwidth: Some(2.0),
    };
    let kern = |d2: f64| [1.0, 2.0, 4.0].iter().map(|s| (-d2 / s).exp()).sum::<f64>();
    let xx = (2.0 * kern(0.0) + 2.0 * kern(4.0)) / 4.0;
    let yy = kern(0.0);
    let xy = (kern(1.0) + kern(1.0)) / 2.0;
    let got = val(&mmd2(&t(&[0.0, 2.0], 2), &t(&[1.0], 1), &k).unwrap());
    assert!((got - (xx + yy - 2.0 * xy)).abs() < 1e-12, "{got}");
    // identical sets: zero discrepancy
    let z = val(&mmd2(
        &t(&[0.5, 1.0, -2.0, 3.0], 2),
        &t(&[0.5, 1.0, -2.0, 3.0], 2),
        &KernelConfig::default(),
    )
    .unwrap());
    assert!(z.abs() < 1e-12, "{z}");
}

#[test]
fn data_bandwidth_and_classes_present_on_one_side_only() {
    // data bandwidth: mean squared distance over distinct pairs of {0, 1} u {3} = (1 + 9 + 4) * 2 / 6
    let k = KernelConfig {
        num_kernels: 1,
        kernel_mul: 2.0,
        fixed_bandwidth: None,
    };
    let s = t(&[0.0, 1.0], 2);
    let tg = t(&[3.0, 50.0], 2); // target class 7 has no source: ignored
    let out = cdd(&s, &[0, 0], &tg, &[0, 7], &k).unwrap();
    let bw = 28.0 / 6.0;
    let e = |d2: f64| (-d2 / bw).exp();
    let expected = (2.0 + 2.0 * e(1.0)) / 4.0 + 1.0 - 2.0 * (e(9.0) + e(4.0)) / 2.0;
    // the bandwidth is computed over every feature of the step, including the ignored one
    let bw_all = {
        let p = [0.0f64, 1.0, 3.0, 50.0];
        let mut s = 0.0;
        for a in p {
            for b in p {
                s += (a - b) * (a - b);
            }
        }
        s / 12.0
    };
    let e2 = |d2: f64| (-d2 / bw_all).exp();
    let expected_all = (2.0 + 2.0 * e2(1.0)) / 4.0 + 1.0 - 2.0 * (e2(9.0) + e2(4.0)) / 2.0;
    let got = val(&out.loss);
    assert!((got - expected_all).abs() < 1e-12, "{got} vs {expected_all} (not {expected})");
    assert_eq!(out.classes, vec![0]);
    assert_eq!(val(&out.inter), 0.0);
}

#[test]
fn gradients_match_finite_differences() {
    let s = t(&[0.1, 0.5, -0.3, 1.0, 0.7, 0.2, -1.0, 0.4], 4);
    let x = t(&[0.0, 0.3, 0.9, -0.2, 0.3, 0.8, -0.5, 0.1], 4);
    let k = KernelConfig {
        fixed_bandwidth: Some(1.5),
        ..Default::default()
    };
    nn_core::testing::check_gradient(&x, |x| Ok(cdd(&s, &[0, 0, 1, 1], x, &[0, 1, 0, 1], &k).unwrap().loss), 1e-6, 1e-6).unwrap();
}

#[test]
fn bad_inputs_are_named() {
    let k = KernelConfig::default();
    let e = cdd(&t(&[0.0, 1.0], 2), &[0, 0], &t(&[1.0, 2.0], 2), &[1, 1], &k)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no class has both"), "{e}");
    let e = cdd(&t(&[0.0, 1.0], 2), &[0], &t(&[1.0, 2.0], 2), &[0, 0], &k)
        .unwrap_err()
        .to_string();
    assert!(e.contains("labels"), "{e}");
    let e = cdd(&t(&[0.0, 1.0], 1), &[0], &t(&[1.0, 2.0, 3.0], 1), &[0], &k)
        .unwrap_err()
        .to_string();
    assert!(e.contains("same D"), "{e}");
}
