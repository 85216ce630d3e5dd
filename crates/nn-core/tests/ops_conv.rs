//! Randomised checks of `nn_core::ops::conv2d` against a naive f64 reference, candle's own
//! conv2d and central finite differences.

use candle_core::{DType, Device, Tensor, Var};
use nn_core::ops::{conv2d, Conv2dOpts};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Copy, Debug)]
struct Case {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    o: Conv2dOpts,
}

impl Case {
    fn out(&self) -> (usize, usize) {
        self.o.output_hw(self.h, self.w, self.kh, self.kw)
    }
}

/// Naive direct convolution and its gradients for the loss `sum(y * r)`.
fn reference(c: &Case, x: &[f64], w: &[f64], r: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (oh, ow) = c.out();
    let g = c.o.groups;
    let (cin_g, cout_g) = (c.cin / g, c.cout / g);
    let mut y = vec![0.0; c.n * c.cout * oh * ow];
    let mut gx = vec![0.0; x.len()];
    let mut gw = vec![0.0; w.len()];
    for n in 0..c.n {
        for co in 0..c.cout {
            let grp = co / cout_g;
            for oy in 0..oh {
                for ox in 0..ow {
                    let yi = ((n * c.cout + co) * oh + oy) * ow + ox;
                    for cig in 0..cin_g {
                        let ci = grp * cin_g + cig;
                        for ki in 0..c.kh {
                            for kj in 0..c.kw {
                                let ih = (oy * c.o.stride.0 + ki * c.o.dilation.0) as isize - c.o.padding.0 as isize;
                                let iw = (ox * c.o.stride.1 + kj * c.o.dilation.1) as isize - c.o.padding.1 as isize;
                                if ih < 0 || iw < 0 || ih >= c.h as isize || iw >= c.w as isize {
                                    continue;
                                }
                                let xi = ((n * c.cin + ci) * c.h + ih as usize) * c.w + iw as usize;
                                let wi = ((co * cin_g + cig) * c.kh + ki) * c.kw + kj;
                                y[yi] += x[xi] * w[wi];
                                gx[xi] += r[yi] * w[wi];
                                gw[wi] += r[yi] * x[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    (y, gx, gw)
}

fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

fn random_case(rng: &mut ChaCha8Rng) -> Case {
    let groups = match rng.gen_range(0..4) {
        0 | 1 => 1,
        2 => 2,
        _ => 0, // depthwise
    };
    let (cin, cout, groups) = if groups == 0 {
        let c = rng.gen_range(2..6);
        (c, c * rng.gen_range(1..3), c)
    } else {
        (groups * rng.gen_range(1..4), groups * rng.gen_range(1..4), groups)
    };
    let pointwise = rng.gen_bool(0.15);
    let (kh, kw) = if pointwise {
        (1, 1)
    } else {
        (rng.gen_range(1..4), rng.gen_range(1..4))
    };
    let stride = if pointwise {
        (1, 1)
    } else {
        (rng.gen_range(1..3), rng.gen_range(1..3))
    };
    let padding = if pointwise {
        (0, 0)
    } else {
        (rng.gen_range(0..4), rng.gen_range(0..4))
    };
    let dilation = if pointwise {
        (1, 1)
    } else {
        (rng.gen_range(1..3), rng.gen_range(1..3))
    };
    let h = rng.gen_range(kh * dilation.0..kh * dilation.0 + 8);
    let w = rng.gen_range(kw * dilation.1..kw * dilation.1 + 8);
    let n = if rng.gen_bool(0.25) { 1 } else { rng.gen_range(2..5) };
    Case {
        n,
        cin,
        h,
        w,
        cout,
        kh,
        kw,
        o: Conv2dOpts {
            stride,
            padding,
            dilation,
            groups,
        },
    }
}

fn assert_close(what: &str, c: &Case, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what} length, {c:?}");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol * scale, "{what}[{i}]: {a} vs {b} (tol {tol}), case {c:?}");
    }
}

fn run_ops(c: &Case, x: &[f64], w: &[f64], r: &[f64], dt: DType) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let dev = Device::Cpu;
    let xv = Var::from_tensor(&Tensor::from_slice(x, (c.n, c.cin, c.h, c.w), &dev).unwrap().to_dtype(dt).unwrap()).unwrap();
    let wv = Var::from_tensor(
        &Tensor::from_slice(w, (c.cout, c.cin / c.o.groups, c.kh, c.kw), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap(),
    )
    .unwrap();
    let (oh, ow) = c.out();
    let rt = Tensor::from_slice(r, (c.n, c.cout, oh, ow), &dev).unwrap().to_dtype(dt).unwrap();
    let y = conv2d(xv.as_tensor(), wv.as_tensor(), c.o).unwrap();
    assert_eq!(y.dims(), &[c.n, c.cout, oh, ow]);
    let loss = (&y * &rt).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let flat = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    (
        flat(&y),
        flat(grads.get(xv.as_tensor()).unwrap()),
        flat(grads.get(wv.as_tensor()).unwrap()),
    )
}

#[test]
fn random_shapes_match_reference_f64_and_f32() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..80 {
        let c = random_case(&mut rng);
        let (oh, ow) = c.out();
        let x = rand_vec(&mut rng, c.n * c.cin * c.h * c.w);
        let w = rand_vec(&mut rng, c.cout * c.cin / c.o.groups * c.kh * c.kw);
        let r = rand_vec(&mut rng, c.n * c.cout * oh * ow);
        let (y, gx, gw) = reference(&c, &x, &w, &r);
        let (y64, gx64, gw64) = run_ops(&c, &x, &w, &r, DType::F64);
        assert_close("y f64", &c, &y64, &y, 1e-12);
        assert_close("gx f64", &c, &gx64, &gx, 1e-12);
        assert_close("gw f64", &c, &gw64, &gw, 1e-12);
        let (y32, gx32, gw32) = run_ops(&c, &x, &w, &r, DType::F32);
        assert_close("y f32", &c, &y32, &y, 1e-4);
        assert_close("gx f32", &c, &gx32, &gx, 1e-4);
        assert_close("gw f32", &c, &gw32, &gw, 1e-4);
    }
}

#[test]
fn matches_candle_conv2d_and_its_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let dev = Device::Cpu;
    for i in 0..40 {
        let mut c = random_case(&mut rng);
        // candle only takes square stride / padding / dilation.
        c.o.stride.1 = c.o.stride.0;
        c.o.padding.1 = c.o.padding.0;
        c.o.dilation.1 = c.o.dilation.0;
        c.kw = c.kh;
        c.h = c.h.max(c.kh * c.o.dilation.0);
        c.w = c.w.max(c.kw * c.o.dilation.1);
        let (oh, ow) = c.out();
        let x = Tensor::from_vec(rand_vec(&mut rng, c.n * c.cin * c.h * c.w), (c.n, c.cin, c.h, c.w), &dev).unwrap();
        let w = Tensor::from_vec(
            rand_vec(&mut rng, c.cout * c.cin / c.o.groups * c.kh * c.kw),
            (c.cout, c.cin / c.o.groups, c.kh, c.kw),
            &dev,
        )
        .unwrap();
        let r = rand_vec(&mut rng, c.n * c.cout * oh * ow);
        let x = x.to_dtype(DType::F32).unwrap();
        let w = w.to_dtype(DType::F32).unwrap();
        let ours = conv2d(&x, &w, c.o).unwrap();
        let theirs = x.conv2d(&w, c.o.padding.0, c.o.stride.0, c.o.dilation.0, c.o.groups).unwrap();
        let flat = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_close("y vs candle", &c, &flat(&ours), &flat(&theirs), 1e-4);
        // Gradients: compare with candle where its backward supports the case.
        if c.o.groups == 1 && i % 2 == 0 {
            let rt = Tensor::from_slice(&r, (c.n, c.cout, oh, ow), &dev)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let xv = Var::from_tensor(&x).unwrap();
            let wv = Var::from_tensor(&w).unwrap();
            let y = xv.conv2d(&wv, c.o.padding.0, c.o.stride.0, c.o.dilation.0, 1).unwrap();
            let Ok(g) = (&y * &rt).unwrap().sum_all().unwrap().backward() else {
                continue;
            };
            let (_, gx, gw) = run_ops(&c, &flat(&x), &flat(&w), &r, DType::F32);
            if let Some(cgx) = g.get(xv.as_tensor()) {
                if cgx.dims() == x.dims() {
                    assert_close("gx vs candle", &c, &gx, &flat(cgx), 1e-4);
                }
            }
            assert_close("gw vs candle", &c, &gw, &flat(g.get(wv.as_tensor()).unwrap()), 1e-4);
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let eps = 1e-6;
    for _ in 0..12 {
        let mut c = random_case(&mut rng);
        c.n = c.n.min(2);
        let (oh, ow) = c.out();
        let x = rand_vec(&mut rng, c.n * c.cin * c.h * c.w);
        let w = rand_vec(&mut rng, c.cout * c.cin / c.o.groups * c.kh * c.kw);
        let r = rand_vec(&mut rng, c.n * c.cout * oh * ow);
        let (_, gx, gw) = run_ops(&c, &x, &w, &r, DType::F64);
        let loss = |x: &[f64], w: &[f64]| -> f64 {
            let (y, _, _) = run_ops(&c, x, w, &r, DType::F64);
            y.iter().zip(&r).map(|(a, b)| a * b).sum()
        };
        for _ in 0..6 {
            let i = rng.gen_range(0..x.len());
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += eps;
            xm[i] -= eps;
            let fd = (loss(&xp, &w) - loss(&xm, &w)) / (2.0 * eps);
            assert!((fd - gx[i]).abs() < 1e-6 * (1.0 + fd.abs()), "gx[{i}] {} vs fd {fd}, {c:?}", gx[i]);
            let j = rng.gen_range(0..w.len());
            let (mut wp, mut wm) = (w.clone(), w.clone());
            wp[j] += eps;
            wm[j] -= eps;
            let fd = (loss(&x, &wp) - loss(&x, &wm)) / (2.0 * eps);
            assert!((fd - gw[j]).abs() < 1e-6 * (1.0 + fd.abs()), "gw[{j}] {} vs fd {fd}, {c:?}", gw[j]);
        }
    }
}

#[test]
fn non_contiguous_input_and_resnet_like_shapes() {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // x stored as NHWC and permuted to NCHW: a strided view.
    let (n, c, h, w) = (3, 8, 10, 9);
    let nhwc = Tensor::from_vec(rand_vec(&mut rng, n * c * h * w), (n, h, w, c), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let x = nhwc.permute((0, 3, 1, 2)).unwrap();
    assert!(!x.is_contiguous());
    let wt = Tensor::from_vec(rand_vec(&mut rng, 16 * c * 9), (16, c, 3, 3), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    for o in [Conv2dOpts::new(1, 1), Conv2dOpts::new(2, 1), Conv2dOpts::new(1, 0)] {
        let ours = conv2d(&x, &wt, o).unwrap();
        let theirs = x.contiguous().unwrap().conv2d(&wt, o.padding.0, o.stride.0, 1, 1).unwrap();
        let d = (ours - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "max diff {d} for {o:?}");
    }
    // Larger batch of small maps: several multi-image gemm blocks with a ragged last one.
    let x2 = Tensor::randn(0f32, 1.0, (37, 3, 5, 4), &dev).unwrap();
    let w2 = Tensor::randn(0f32, 1.0, (5, 3, 3, 3), &dev).unwrap();
    let c2 = Case {
        n: 37,
        cin: 3,
        h: 5,
        w: 4,
        cout: 5,
        kh: 3,
        kw: 3,
        o: Conv2dOpts::new(1, 1),
    };
    let (oh, ow) = c2.out();
    let r2 = rand_vec(&mut rng, 37 * 5 * oh * ow);
    let flat = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let (xs, ws) = (flat(&x2), flat(&w2));
    let (y, gx, gw) = reference(&c2, &xs, &ws, &r2);
    let (y2, gx2, gw2) = run_ops(&c2, &xs, &ws, &r2, DType::F32);
    assert_close("y big batch", &c2, &y2, &y, 1e-4);
    assert_close("gx big batch", &c2, &gx2, &gx, 1e-4);
    assert_close("gw big batch", &c2, &gw2, &gw, 1e-4);
    // Bad shapes error out instead of panicking.
    assert!(conv2d(&x, &wt, Conv2dOpts::new(1, 1).with_groups(3)).is_err());
}

/// `conv2d_backward` (the kernels without autograd) gives the reference gradients, and
/// rejects an output gradient of the wrong shape with a message naming both shapes.
#[test]
fn conv2d_backward_matches_reference_and_checks_shape() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let dev = Device::Cpu;
    for _ in 0..30 {
        let c = random_case(&mut rng);
        let (oh, ow) = c.out();
        let x = rand_vec(&mut rng, c.n * c.cin * c.h * c.w);
        let w = rand_vec(&mut rng, c.cout * c.cin / c.o.groups * c.kh * c.kw);
        let r = rand_vec(&mut rng, c.n * c.cout * oh * ow);
        let (_, gx, gw) = reference(&c, &x, &w, &r);
        let xt = Tensor::from_slice(&x, (c.n, c.cin, c.h, c.w), &dev).unwrap();
        let wt = Tensor::from_slice(&w, (c.cout, c.cin / c.o.groups, c.kh, c.kw), &dev).unwrap();
        let rt = Tensor::from_slice(&r, (c.n, c.cout, oh, ow), &dev).unwrap();
        let (gxt, gwt) = nn_core::ops::conv2d_backward(&xt, &wt, &rt, c.o).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_close("conv2d_backward gx", &c, &flat(&gxt), &gx, 1e-12);
        assert_close("conv2d_backward gw", &c, &flat(&gwt), &gw, 1e-12);
        // Non-native dtype takes the autograd route and agrees to f32 rounding.
        let to32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let (gx16, gw16) = nn_core::ops::conv2d_backward(
            &xt.to_dtype(DType::BF16).unwrap(),
            &wt.to_dtype(DType::BF16).unwrap(),
            &rt.to_dtype(DType::BF16).unwrap(),
            c.o,
        )
        .unwrap();
        assert_eq!(gx16.dims(), xt.dims());
        assert_eq!(gw16.dims(), wt.dims());
        let f = |t: &Tensor| {
            to32(t)
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        assert_close("conv2d_backward gx bf16", &c, &f(&gx16), &gx, 0.1);
        assert_close("conv2d_backward gw bf16", &c, &f(&gw16), &gw, 0.1);
    }
    let xt = Tensor::zeros((2, 3, 8, 8), DType::F32, &dev).unwrap();
    let wt = Tensor::zeros((4, 3, 3, 3), DType::F32, &dev).unwrap();
    let bad = Tensor::zeros((2, 4, 7, 7), DType::F32, &dev).unwrap();
    let err = nn_core::ops::conv2d_backward(&xt, &wt, &bad, Conv2dOpts::new(1, 1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("[2, 4, 7, 7]") && err.contains("[2, 4, 8, 8]"), "{err}");
}

/// A depthwise-grouped convolution with no output channels has zero gradients (not
/// uninitialised memory) and an empty output.
#[test]
fn depthwise_grouping_without_output_channels_gives_zero_gradients() {
    let dev = Device::Cpu;
    let x = Tensor::ones((1, 2, 4, 4), DType::F32, &dev).unwrap();
    let w = Tensor::zeros((0, 1, 3, 3), DType::F32, &dev).unwrap();
    let o = Conv2dOpts::new(1, 1).with_groups(2);
    let y = conv2d(&x, &w, o).unwrap();
    assert_eq!(y.dims(), &[1, 0, 4, 4]);
    let gy = Tensor::zeros((1, 0, 4, 4), DType::F32, &dev).unwrap();
    let (gx, gw) = nn_core::ops::conv2d_backward(&x, &w, &gy, o).unwrap();
    assert_eq!(gx.dims(), x.dims());
    assert_eq!(gw.dims(), w.dims());
    assert!(gx.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| *v == 0.0));
}
