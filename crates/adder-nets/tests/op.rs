//! The adder kernel against a naive reference (forward) and against the paper's formulas
//! (backward), on random shapes with stride, padding, dilation and groups.

use adder_nets::adder2d;
use candle_core::{DType, Device, Tensor, Var};
use nn_core::ops::Conv2dOpts;

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }
}

#[derive(Debug, Clone, Copy)]
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
    fn out_hw(&self) -> (usize, usize) {
        self.o.output_hw(self.h, self.w, self.kh, self.kw)
    }
    /// Input value under tap (c, i, j) of output pixel (oy, ox) of image b (0 on padding), and
    /// its flat index if not padding.
    #[allow(clippy::too_many_arguments)]
    fn tap(&self, x: &[f32], b: usize, c: usize, i: usize, j: usize, oy: usize, ox: usize) -> (f64, Option<usize>) {
        let iy = (oy * self.o.stride.0 + i * self.o.dilation.0) as isize - self.o.padding.0 as isize;
        let ix = (ox * self.o.stride.1 + j * self.o.dilation.1) as isize - self.o.padding.1 as isize;
        if iy < 0 || ix < 0 || iy >= self.h as isize || ix >= self.w as isize {
            return (0.0, None);
        }
        let idx = ((b * self.cin + c) * self.h + iy as usize) * self.w + ix as usize;
        (x[idx] as f64, Some(idx))
    }
}

/// Naive forward, Eq. (2), plus the backward of Eq. (5) and Eq. (7)-(8) for upstream gradient `gy`.
fn naive(c: &Case, x: &[f32], w: &[f32], gy: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (oh, ow) = c.out_hw();
    let g = c.o.groups;
    let (cin_g, cout_g) = (c.cin / g, c.cout / g);
    let mut y = vec![0.0; c.n * c.cout * oh * ow];
    let mut gx = vec![0.0; x.len()];
    let mut gw = vec![0.0; w.len()];
    for b in 0..c.n {
        for t in 0..c.cout {
            let grp = t / cout_g;
            for oy in 0..oh {
                for ox in 0..ow {
                    let yi = ((b * c.cout + t) * oh + oy) * ow + ox;
                    let mut s = 0.0;
                    for ci in 0..cin_g {
                        for i in 0..c.kh {
                            for j in 0..c.kw {
                                let (xv, xi) = c.tap(x, b, grp * cin_g + ci, i, j, oy, ox);
                                let wi = ((t * cin_g + ci) * c.kh + i) * c.kw + j;
                                let wv = w[wi] as f64;
                                s += (xv - wv).abs();
                                gw[wi] += gy[yi] as f64 * (xv - wv);
                                if let Some(xi) = xi {
                                    gx[xi] += gy[yi] as f64 * (wv - xv).clamp(-1.0, 1.0);
                                }
                            }
                        }
                    }
                    y[yi] = -s;
                }
            }
        }
    }
    (y, gx, gw)
}

fn close(name: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(((*g as f64) - w).abs() <= tol * w.abs().max(1.0), "{name}[{i}]: got {g}, want {w}");
    }
}

fn run_case(c: &Case, rng: &mut Lcg) {
    let dev = Device::Cpu;
    let g = c.o.groups;
    let x = rng.vec(c.n * c.cin * c.h * c.w);
    let w = rng.vec(c.cout * (c.cin / g) * c.kh * c.kw);
    let (oh, ow) = c.out_hw();
    let gy = rng.vec(c.n * c.cout * oh * ow);
    let xv = Var::from_vec(x.clone(), (c.n, c.cin, c.h, c.w), &dev).unwrap();
    let wv = Var::from_vec(w.clone(), (c.cout, c.cin / g, c.kh, c.kw), &dev).unwrap();
    let gyt = Tensor::from_vec(gy.clone(), (c.n, c.cout, oh, ow), &dev).unwrap();
    let y = adder2d(xv.as_tensor(), wv.as_tensor(), c.o).unwrap();
    assert_eq!(y.dims(), &[c.n, c.cout, oh, ow], "{c:?}");
    let grads = (y.clone() * &gyt).unwrap().sum_all().unwrap().backward().unwrap();
    let (ry, rgx, rgw) = naive(c, &x, &w, &gy);
    close(
        &format!("forward {c:?}"),
        &y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        &ry,
        1e-5,
    );
    let gx = grads.get(xv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let gw = grads.get(wv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    close(&format!("dX = HT(F - X) {c:?}"), &gx, &rgx, 1e-4);
    close(&format!("dF = X - F {c:?}"), &gw, &rgw, 1e-4);
}

#[test]
fn forward_and_backward_match_the_formulas_on_fixed_shapes() {
    let mut rng = Lcg(1);
    let o = |s: usize, p: usize| Conv2dOpts::new(s, p);
    let cases = [
        // ResNet-like 3x3 same, stride 2, 1x1 shortcut, grouped, dilated, rectangular, 1 pixel
        Case {
            n: 2,
            cin: 3,
            h: 7,
            w: 6,
            cout: 5,
            kh: 3,
            kw: 3,
            o: o(1, 1),
        },
        Case {
            n: 3,
            cin: 4,
            h: 9,
            w: 9,
            cout: 6,
            kh: 3,
            kw: 3,
            o: o(2, 1),
        },
        Case {
            n: 2,
            cin: 8,
            h: 6,
            w: 6,
            cout: 7,
            kh: 1,
            kw: 1,
            o: o(2, 0),
        },
        Case {
            n: 2,
            cin: 6,
            h: 8,
            w: 5,
            cout: 9,
            kh: 3,
            kw: 3,
            o: o(1, 1).with_groups(3),
        },
        Case {
            n: 1,
            cin: 2,
            h: 9,
            w: 9,
            cout: 3,
            kh: 3,
            kw: 3,
            o: o(1, 2).with_dilation(2),
        },
        Case {
            n: 2,
            cin: 3,
            h: 6,
            w: 8,
            cout: 2,
            kh: 2,
            kw: 3,
            o: Conv2dOpts {
                stride: (1, 3),
                padding: (0, 2),
                dilation: (1, 1),
                groups: 1,
            },
        },
        Case {
            n: 5,
            cin: 4,
            h: 5,
            w: 5,
            cout: 17,
            kh: 5,
            kw: 5,
            o: o(1, 0),
        },
    ];
    for c in &cases {
        run_case(c, &mut rng);
    }
}

#[test]
fn forward_and_backward_match_the_formulas_on_random_shapes() {
    let mut rng = Lcg(42);
    for _ in 0..25 {
        let groups = [1, 1, 2, 3][rng.below(4)];
        let k = 1 + rng.below(3);
        let s = 1 + rng.below(2);
        let p = rng.below(k.max(1));
        let h = k + rng.below(8);
        let c = Case {
            n: 1 + rng.below(4),
            cin: groups * (1 + rng.below(4)),
            h,
            w: k + rng.below(8),
            cout: groups * (1 + rng.below(6)),
            kh: k,
            kw: k,
            o: Conv2dOpts::new(s, p).with_groups(groups),
        };
        run_case(&c, &mut rng);
    }
}

#[test]
fn other_dtypes_and_non_contiguous_inputs_take_the_fallback() {
    let mut rng = Lcg(7);
    let dev = Device::Cpu;
    let x = Tensor::from_vec(rng.vec(2 * 3 * 5 * 5), (2, 5, 5, 3), &dev)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap();
    let w = Tensor::from_vec(rng.vec(4 * 3 * 9), (4, 3, 3, 3), &dev).unwrap();
    let o = Conv2dOpts::new(1, 1);
    let y32 = adder2d(&x, &w, o).unwrap();
    let y64 = adder2d(&x.to_dtype(DType::F64).unwrap(), &w.to_dtype(DType::F64).unwrap(), o).unwrap();
    assert_eq!(y64.dtype(), DType::F64);
    let d = (y64.to_dtype(DType::F32).unwrap() - &y32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "{d}");
    // gradients flow through the dtype round trip
    let xv = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
    let g = adder2d(xv.as_tensor(), &w.to_dtype(DType::F64).unwrap(), o)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(g.get(xv.as_tensor()).unwrap().dims(), &[2, 3, 5, 5]);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 4, 5, 5), DType::F32, &dev).unwrap();
    let err = |w: Tensor, o: Conv2dOpts| adder2d(&x, &w, o).unwrap_err().to_string();
    let e = err(Tensor::zeros((2, 3, 3, 3), DType::F32, &dev).unwrap(), Conv2dOpts::new(1, 1));
    assert!(e.contains("groups"), "{e}");
    let e = err(Tensor::zeros((2, 4, 7, 7), DType::F32, &dev).unwrap(), Conv2dOpts::new(1, 0));
    assert!(e.contains("larger than the padded input"), "{e}");
    let e = err(Tensor::zeros((2, 4, 3, 3), DType::F32, &dev).unwrap(), Conv2dOpts::new(0, 0));
    assert!(e.contains("stride"), "{e}");
    let e = adder2d(
        &Tensor::zeros((4, 5, 5), DType::F32, &dev).unwrap(),
        &Tensor::zeros((2, 4, 3, 3), DType::F32, &dev).unwrap(),
        Conv2dOpts::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("4-d"), "{e}");
}
