//! Checks of the specialised convolution paths (padded im2col with chunked row copies,
//! AVX2 stride-2 gathers, padded/interleaved col2im, multi-image gemm blocks) on the
//! feature-map widths of the ResNet stages (7, 8, 14, 16, 28, 32 and odd ones), against a
//! naive f64 reference (1e-12) and in f32 (1e-4 relative); the Winograd F(2x2, 3x3) path
//! of 3x3 stride-1 layers and the im2col path that replaces it when switched off.

use candle_core::{DType, Device, Tensor, Var};
use nn_core::ops::{conv2d, Conv2dOpts};

#[allow(clippy::too_many_arguments)]
fn reference(
    (n, cin, h, w): (usize, usize, usize, usize),
    (cout, k): (usize, usize),
    o: Conv2dOpts,
    x: &[f64],
    wt: &[f64],
    r: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (s, p, d) = (o.stride.0, o.padding.0, o.dilation.0);
    let oh = (h + 2 * p - d * (k - 1) - 1) / s + 1;
    let ow = (w + 2 * p - d * (k - 1) - 1) / s + 1;
    let mut y = vec![0.0; n * cout * oh * ow];
    let mut gx = vec![0.0; x.len()];
    let mut gw = vec![0.0; wt.len()];
    for b in 0..n {
        for co in 0..cout {
            for oy in 0..oh {
                for ox in 0..ow {
                    let yi = ((b * cout + co) * oh + oy) * ow + ox;
                    for ci in 0..cin {
                        for ki in 0..k {
                            for kj in 0..k {
                                let ih = (oy * s + ki * d) as isize - p as isize;
                                let iw = (ox * s + kj * d) as isize - p as isize;
                                if ih < 0 || iw < 0 || ih >= h as isize || iw >= w as isize {
                                    continue;
                                }
                                let xi = ((b * cin + ci) * h + ih as usize) * w + iw as usize;
                                let wi = ((co * cin + ci) * k + ki) * k + kj;
                                y[yi] += x[xi] * wt[wi];
                                gx[xi] += r[yi] * wt[wi];
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

fn vals(len: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

fn run(
    dims: (usize, usize, usize, usize),
    wd: (usize, usize),
    o: Conv2dOpts,
    x: &[f64],
    w: &[f64],
    r: &[f64],
    dt: DType,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let dev = Device::Cpu;
    let (n, cin, h, wi) = dims;
    let xv = Var::from_tensor(&Tensor::from_slice(x, (n, cin, h, wi), &dev).unwrap().to_dtype(dt).unwrap()).unwrap();
    let wv = Var::from_tensor(&Tensor::from_slice(w, (wd.0, cin, wd.1, wd.1), &dev).unwrap().to_dtype(dt).unwrap()).unwrap();
    let y = conv2d(xv.as_tensor(), wv.as_tensor(), o).unwrap();
    let rt = Tensor::from_slice(r, y.dims(), &dev).unwrap().to_dtype(dt).unwrap();
    let g = (&y * &rt).unwrap().sum_all().unwrap().backward().unwrap();
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    (f(&y), f(g.get(xv.as_tensor()).unwrap()), f(g.get(wv.as_tensor()).unwrap()))
}

fn close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol * scale, "{what}[{i}]: {a} vs {b}");
    }
}

#[test]
fn stage_widths_strides_and_paddings() {
    let mut seed = 1;
    for &hw in &[7usize, 8, 9, 14, 16, 17, 28, 32] {
        for &(s, p, k, d) in &[
            (1, 1, 3, 1),
            (2, 1, 3, 1),
            (2, 0, 1, 1),
            (1, 0, 3, 1),
            (2, 2, 3, 2),
            (3, 1, 3, 1),
            (1, 2, 5, 1),
        ] {
            if hw + 2 * p < d * (k - 1) + 1 {
                continue;
            }
            let (n, cin, cout) = (3, 3, 5);
            let o = Conv2dOpts::new(s, p).with_dilation(d);
            let x = vals(n * cin * hw * hw, seed);
            let w = vals(cout * cin * k * k, seed + 1);
            let oh = (hw + 2 * p - d * (k - 1) - 1) / s + 1;
            let r = vals(n * cout * oh * oh, seed + 2);
            seed += 3;
            let dims = (n, cin, hw, hw);
            let want = reference(dims, (cout, k), o, &x, &w, &r);
            let what = format!("hw {hw} s {s} p {p} k {k} d {d}");
            for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-4)] {
                let got = run(dims, (cout, k), o, &x, &w, &r, dt);
                close(&format!("{what} {dt:?} y"), &got.0, &want.0, tol);
                close(&format!("{what} {dt:?} gx"), &got.1, &want.1, tol);
                close(&format!("{what} {dt:?} gw"), &got.2, &want.2, tol);
            }
        }
    }
}

/// 3x3 stride-1 layers take the Winograd F(2x2, 3x3) path for the weight gradient from 8
/// channels on, and for the forward pass and input gradient from 32; with it switched off,
/// im2col. Both must match the reference on even and odd sizes, paddings 0-2 and channel
/// counts that are not multiples of the 8-channel vector width.
#[test]
fn winograd_path_and_im2col_both_match_the_reference() {
    let mut seed = 100;
    for &hw in &[4usize, 7, 8, 9, 12] {
        for &p in &[0usize, 1, 2] {
            for &(cin, cout) in &[(8, 16), (12, 20), (32, 36), (36, 32)] {
                let n = 2;
                let o = Conv2dOpts::new(1, p);
                let x = vals(n * cin * hw * hw, seed);
                let w = vals(cout * cin * 9, seed + 1);
                let oh = hw + 2 * p - 2;
                let r = vals(n * cout * oh * oh, seed + 2);
                seed += 3;
                let dims = (n, cin, hw, hw);
                let want = reference(dims, (cout, 3), o, &x, &w, &r);
                for winograd in [true, false] {
                    let before = nn_core::ops::set_winograd(winograd);
                    let what = format!("hw {hw} p {p} cin {cin} cout {cout} winograd {winograd}");
                    for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-4)] {
                        let got = run(dims, (cout, 3), o, &x, &w, &r, dt);
                        close(&format!("{what} {dt:?} y"), &got.0, &want.0, tol);
                        close(&format!("{what} {dt:?} gx"), &got.1, &want.1, tol);
                        close(&format!("{what} {dt:?} gw"), &got.2, &want.2, tol);
                    }
                    nn_core::ops::set_winograd(before);
                }
            }
        }
    }
}
