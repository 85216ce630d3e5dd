//! Pooling checks: naive f64 references, candle's max/avg pool where it applies and
//! central finite differences for the backward passes.

use candle_core::{DType, Device, Tensor, Var};
use nn_core::ops::{adaptive_avg_pool2d, avg_pool2d, global_avg_pool, max_pool2d};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Max,
    Avg(bool),
    Adaptive(usize, usize),
}

/// Per-axis windows `(start, end, full_size)` computed independently of the crate.
fn windows(len: usize, k: usize, s: usize, p: usize) -> Vec<(usize, usize, usize)> {
    let out = (len + 2 * p - k) / s + 1;
    (0..out)
        .map(|i| {
            let a = i as i64 * s as i64 - p as i64;
            let b = (a + k as i64).min((len + p) as i64);
            (
                a.max(0) as usize,
                b.min(len as i64) as usize,
                (b - a) as usize,
            )
        })
        .collect()
}

fn adaptive(len: usize, out: usize) -> Vec<(usize, usize, usize)> {
    (0..out)
        .map(|i| {
            let a = (i as f64 * len as f64 / out as f64).floor() as usize;
            let b = ((i + 1) as f64 * len as f64 / out as f64).ceil() as usize;
            (a, b, b - a)
        })
        .collect()
}

/// Reference forward and gradient (for loss `sum(y * r)`).
fn reference(
    x: &[f64],
    d: (usize, usize, usize, usize),
    rows: &[(usize, usize, usize)],
    cols: &[(usize, usize, usize)],
    kind: Kind,
    r: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let (n, c, h, w) = d;
    let (oh, ow) = (rows.len(), cols.len());
    let mut y = vec![0.0; n * c * oh * ow];
    let mut gx = vec![0.0; x.len()];
    for p in 0..n * c {
        for (i, rr) in rows.iter().enumerate() {
            for (j, cc) in cols.iter().enumerate() {
                let yi = (p * oh + i) * ow + j;
                let idx: Vec<usize> = (rr.0..rr.1)
                    .flat_map(|a| (cc.0..cc.1).map(move |b| p * h * w + a * w + b))
                    .collect();
                match kind {
                    Kind::Max => {
                        let mut best = idx[0];
                        for &k in &idx {
                            if x[k] > x[best] {
                                best = k;
                            }
                        }
                        y[yi] = x[best];
                        gx[best] += r[yi];
                    }
                    Kind::Avg(_) | Kind::Adaptive(..) => {
                        let div = match kind {
                            Kind::Avg(true) => (rr.2 * cc.2) as f64,
                            _ => idx.len() as f64,
                        };
                        y[yi] = idx.iter().map(|&k| x[k]).sum::<f64>() / div;
                        for &k in &idx {
                            gx[k] += r[yi] / div;
                        }
                    }
                }
            }
        }
    }
    (y, gx)
}

fn run(x: &Tensor, kind: Kind, k: (usize, usize), s: (usize, usize), p: (usize, usize)) -> Tensor {
    match kind {
        Kind::Max => max_pool2d(x, k, s, p).unwrap(),
        Kind::Avg(inc) => avg_pool2d(x, k, s, p, inc).unwrap(),
        Kind::Adaptive(a, b) => adaptive_avg_pool2d(x, (a, b)).unwrap(),
    }
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}[{i}]: {a} vs {b}"
        );
    }
}

#[test]
fn random_pools_match_reference_and_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let dev = Device::Cpu;
    for it in 0..90 {
        let d = (
            rng.gen_range(1..3),
            rng.gen_range(1..4),
            rng.gen_range(3..12),
            rng.gen_range(3..12),
        );
        let kind = match it % 4 {
            0 | 1 => Kind::Max,
            2 => Kind::Avg(rng.gen_bool(0.5)),
            _ => Kind::Adaptive(rng.gen_range(1..d.2 + 3), rng.gen_range(1..d.3 + 2)),
        };
        let k = (
            rng.gen_range(1..4.min(d.2) + 1),
            rng.gen_range(1..4.min(d.3) + 1),
        );
        let s = (rng.gen_range(1..4), rng.gen_range(1..4));
        let p = (rng.gen_range(0..k.0 / 2 + 1), rng.gen_range(0..k.1 / 2 + 1));
        let (rows, cols) = match kind {
            Kind::Adaptive(a, b) => (adaptive(d.2, a), adaptive(d.3, b)),
            _ => (windows(d.2, k.0, s.0, p.0), windows(d.3, k.1, s.1, p.1)),
        };
        let len = d.0 * d.1 * d.2 * d.3;
        let x: Vec<f64> = (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let r: Vec<f64> = (0..d.0 * d.1 * rows.len() * cols.len())
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        let (y_ref, gx_ref) = reference(&x, d, &rows, &cols, kind, &r);
        for dt in [DType::F64, DType::F32] {
            let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
            let xv = Var::from_tensor(
                &Tensor::from_slice(&x, d, &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap(),
            )
            .unwrap();
            let y = run(xv.as_tensor(), kind, k, s, p);
            assert_eq!(
                y.dims(),
                &[d.0, d.1, rows.len(), cols.len()],
                "{kind:?} {d:?}"
            );
            close(
                &format!("y {kind:?} {d:?} k{k:?} s{s:?} p{p:?}"),
                &flat(&y),
                &y_ref,
                tol,
            );
            let rt = Tensor::from_slice(&r, y.dims(), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let g = (&y * &rt).unwrap().sum_all().unwrap().backward().unwrap();
            close(
                &format!("gx {kind:?} {d:?}"),
                &flat(g.get(xv.as_tensor()).unwrap()),
                &gx_ref,
                tol,
            );
        }
        // Finite differences (f64) on a few coordinates.
        if it % 3 == 0 {
            let xt = Tensor::from_slice(&x, d, &dev).unwrap();
            let rt = Tensor::from_slice(&r, (d.0, d.1, rows.len(), cols.len()), &dev).unwrap();
            let loss = |xs: &[f64]| {
                let xx = Tensor::from_slice(xs, d, &dev).unwrap();
                (run(&xx, kind, k, s, p) * &rt)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let _ = xt;
            for _ in 0..5 {
                let i = rng.gen_range(0..len);
                let eps = 1e-7;
                let (mut a, mut b) = (x.clone(), x.clone());
                a[i] += eps;
                b[i] -= eps;
                let fd = (loss(&a) - loss(&b)) / (2.0 * eps);
                assert!(
                    (fd - gx_ref[i]).abs() < 1e-5,
                    "fd {fd} vs {} ({kind:?})",
                    gx_ref[i]
                );
            }
        }
    }
}

#[test]
fn matches_candle_pools_where_supported() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let dev = Device::Cpu;
    for k in [2usize, 3] {
        let x: Vec<f32> = (0..2 * 3 * 12 * 12)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        let xv = Var::from_tensor(&Tensor::from_vec(x, (2, 3, 12, 12), &dev).unwrap()).unwrap();
        let ours = max_pool2d(xv.as_tensor(), (k, k), (k, k), (0, 0)).unwrap();
        let theirs = xv.max_pool2d(k).unwrap();
        close("max vs candle", &flat(&ours), &flat(&theirs), 1e-6);
        let g1 = ours.sum_all().unwrap().backward().unwrap();
        let g2 = theirs.sum_all().unwrap().backward().unwrap();
        // candle 0.11's max-pool backward multiplies the routed gradient by
        // (number of maxima in the window) / k^2 instead of dividing by the number of
        // maxima, i.e. it is 1/k^2 too small for unique maxima (random inputs): rescale.
        // (It also maps windows by nearest upsampling, so sizes must divide evenly.)
        let cg: Vec<f64> = flat(g2.get(xv.as_tensor()).unwrap())
            .iter()
            .map(|v| v * (k * k) as f64)
            .collect();
        close(
            "max grad vs candle",
            &flat(g1.get(xv.as_tensor()).unwrap()),
            &cg,
            1e-6,
        );
        let ours = avg_pool2d(xv.as_tensor(), (k, k), (k, k), (0, 0), true).unwrap();
        let theirs = xv.avg_pool2d(k).unwrap();
        close("avg vs candle", &flat(&ours), &flat(&theirs), 1e-6);
    }
}

#[test]
fn resnet_stem_max_pool_and_global_avg() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4, 16, 16), &dev).unwrap()).unwrap();
    let y = max_pool2d(x.as_tensor(), (3, 3), (2, 2), (1, 1)).unwrap();
    assert_eq!(y.dims(), &[2, 4, 8, 8]);
    let g = y.sum_all().unwrap().backward().unwrap();
    // Every output routes exactly one unit of gradient.
    let total = g
        .get(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(total, (2 * 4 * 8 * 8) as f32);
    // Global average pooling equals candle's mean and has the right gradient.
    let ours = global_avg_pool(x.as_tensor()).unwrap();
    let theirs = x.mean((2, 3)).unwrap();
    assert_eq!(ours.dims(), &[2, 4]);
    close("gap", &flat(&ours), &flat(&theirs), 1e-5);
    let g = (ours * 2.0).unwrap().sum_all().unwrap().backward().unwrap();
    close(
        "gap grad",
        &flat(g.get(x.as_tensor()).unwrap()),
        &vec![2.0 / 256.0; 2 * 4 * 256],
        1e-7,
    );
    // Non-contiguous input.
    let xt = x.as_tensor().transpose(2, 3).unwrap();
    let a = max_pool2d(&xt, (2, 2), (2, 2), (0, 0)).unwrap();
    let b = max_pool2d(&xt.contiguous().unwrap(), (2, 2), (2, 2), (0, 0)).unwrap();
    close("non-contiguous", &flat(&a), &flat(&b), 0.0);
    // Invalid parameters error out.
    assert!(max_pool2d(x.as_tensor(), (2, 2), (2, 2), (2, 2)).is_err());
}
