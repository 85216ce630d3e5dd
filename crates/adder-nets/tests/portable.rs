//! The portable tiles give the same forward and backward as the AVX2 ones (which `op.rs` checks
//! against the naive reference). One test per process: it switches a global flag.

use adder_nets::adder2d;
use adder_nets::op::force_portable;
use candle_core::{Device, Tensor, Var};
use nn_core::ops::Conv2dOpts;

fn run(x: &[f32], xd: (usize, usize, usize, usize), w: &[f32], wd: (usize, usize, usize, usize), o: Conv2dOpts) -> Vec<Vec<f32>> {
    let xv = Var::from_vec(x.to_vec(), xd, &Device::Cpu).unwrap();
    let wv = Var::from_vec(w.to_vec(), wd, &Device::Cpu).unwrap();
    let y = adder2d(xv.as_tensor(), wv.as_tensor(), o).unwrap();
    let gy = Tensor::arange(0u32, y.elem_count() as u32, &Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let gy = ((gy * 0.37).unwrap().sin().unwrap()).reshape(y.dims()).unwrap();
    let g = (y.clone() * gy).unwrap().sum_all().unwrap().backward().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    vec![flat(&y), flat(g.get(xv.as_tensor()).unwrap()), flat(g.get(wv.as_tensor()).unwrap())]
}

#[test]
fn portable_tiles_match_the_avx2_tiles() {
    let cases = [
        ((3, 5, 9, 7), (6, 5, 3, 3), Conv2dOpts::new(1, 1)),
        ((2, 4, 8, 8), (10, 2, 3, 3), Conv2dOpts::new(2, 1).with_groups(2)),
        ((2, 7, 6, 6), (5, 7, 1, 1), Conv2dOpts::new(2, 0)),
    ];
    for (xd, wd, o) in cases {
        let nx = xd.0 * xd.1 * xd.2 * xd.3;
        let nw = wd.0 * wd.1 * wd.2 * wd.3;
        let x: Vec<f32> = (0..nx).map(|i| ((i * 7919 % 97) as f32 / 24.0) - 2.0).collect();
        let w: Vec<f32> = (0..nw).map(|i| ((i * 104729 % 89) as f32 / 22.0) - 2.0).collect();
        force_portable(false);
        let a = run(&x, xd, &w, wd, o);
        force_portable(true);
        let b = run(&x, xd, &w, wd, o);
        force_portable(false);
        for (k, (u, v)) in a.iter().zip(&b).enumerate() {
            for (i, (p, q)) in u.iter().zip(v).enumerate() {
                assert!((p - q).abs() <= 1e-4 * p.abs().max(1.0), "{xd:?} output {k} [{i}]: {p} vs {q}");
            }
        }
    }
}
