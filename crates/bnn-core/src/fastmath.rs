//! Branch-free `sin` and the FDA cosine sum for the quantizers' CPU kernels, written so that
//! their slice loops auto-vectorise (4 `f64` lanes under AVX2+FMA, chosen at run time; the
//! crate is built for baseline x86-64).
//!
//! Profiling FDA training showed libm's scalar `cos` (the FDA gradient) and `sinf`/`cosf` (the
//! noise adaptation module's `0.1 sin t`) at about a quarter of a binary ResNet-20 step; these
//! kernels replace them.

use crate::quantizer::Quantizer;
use std::f64::consts::{FRAC_1_PI, PI};

/// Pi in three parts for Cody-Waite range reduction: `PI_A` and `PI_B` have 27 significant bits,
/// so `q * PI_A` and `q * PI_B` are exact for multipliers `q` of up to 26 bits (`|x| < 2^25`),
/// and `PI_A + PI_B + PI_C` is pi to about 1e-32.
const PI_A: f64 = 3.141_592_651_605_606;
const PI_B: f64 = 1.984_187_147_918_703_4e-9;
const PI_C: f64 = 1.144_237_745_221_966_4e-17;

/// Beyond this magnitude the reduction loses accuracy: the kernels fall back to libm.
const REDUCTION_LIMIT: f64 = 1e7;

/// `a * b + c`, fused where the FMA unit is enabled (libm's `fma` is slow without it).
#[inline(always)]
fn madd<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `sin r` on `|r| <= pi/2`: the Taylor polynomial to `r^19`, accurate to a few 1e-16 absolute
/// (the first omitted term is below 1e-17).
#[inline(always)]
fn sin_poly<const FMA: bool>(r: f64) -> f64 {
    // Horner in r^2 over the Taylor coefficients (-1)^k / (2k+1)!, k = 1..9 (literal
    // quotients, folded at compile time)
    const C: [f64; 9] = [
        -1.0 / 6.0,
        1.0 / 120.0,
        -1.0 / 5040.0,
        1.0 / 362_880.0,
        -1.0 / 39_916_800.0,
        1.0 / 6_227_020_800.0,
        -1.0 / 1_307_674_368_000.0,
        1.0 / 355_687_428_096_000.0,
        -1.0 / 121_645_100_408_832_000.0,
    ];
    let r2 = r * r;
    let mut p = C[8];
    p = madd::<FMA>(p, r2, C[7]);
    p = madd::<FMA>(p, r2, C[6]);
    p = madd::<FMA>(p, r2, C[5]);
    p = madd::<FMA>(p, r2, C[4]);
    p = madd::<FMA>(p, r2, C[3]);
    p = madd::<FMA>(p, r2, C[2]);
    p = madd::<FMA>(p, r2, C[1]);
    p = madd::<FMA>(p, r2, C[0]);
    let p = madd::<FMA>(p, r2, 1.0);
    r * p
}

/// `(-1)^k` for an integral `k` held in an `f64`, without integer conversions (they would stop
/// the loops from vectorising).
#[inline(always)]
fn parity_sign(k: f64) -> f64 {
    1.0 - 2.0 * (k - 2.0 * (k * 0.5).floor())
}

/// `x - q pi` in three exact-product steps.
#[inline(always)]
fn reduce<const FMA: bool>(x: f64, q: f64) -> f64 {
    madd::<FMA>(-q, PI_C, madd::<FMA>(-q, PI_B, madd::<FMA>(-q, PI_A, x)))
}

/// `sin x` and the multiple `k` of pi removed by the range reduction (`x = k pi + r`,
/// `|r| <= pi/2`, `sin x = (-1)^k sin r`), without branches. Valid for `|x| <= REDUCTION_LIMIT`;
/// the kernels fix larger inputs up with libm.
#[inline(always)]
pub(crate) fn sin_reduced<const FMA: bool>(x: f64) -> (f64, f64) {
    let k = (x * FRAC_1_PI + 0.5).floor();
    (parity_sign(k) * sin_poly::<FMA>(reduce::<FMA>(x, k)), k)
}

/// `sin x` for `|x| <= REDUCTION_LIMIT`.
#[inline(always)]
pub(crate) fn sin<const FMA: bool>(x: f64) -> f64 {
    sin_reduced::<FMA>(x).0
}

/// `cos x` for `|x| <= REDUCTION_LIMIT`: with `k = floor(x / pi)` and `x = (k + 1/2) pi + r`,
/// `cos x = -(-1)^k sin r`. (Reducing `x` itself rather than computing `sin(x + pi/2)` keeps the
/// accuracy for large `x`.)
#[inline(always)]
pub(crate) fn cos<const FMA: bool>(x: f64) -> f64 {
    let k = (x * FRAC_1_PI).floor();
    -parity_sign(k) * sin_poly::<FMA>(reduce::<FMA>(x, k + 0.5))
}

/// `sum_{k=0..n} cos((2k+1) t)` in closed form: `sin(2 (n+1) t) / (2 sin t)` (the sum of a
/// geometric series of `e^{i(2k+1)t}`), with its limit `(n+1) (-1)^m` where `t` is within
/// 1e-6 of `m pi`. Branch-free; valid for `|2 (n+1) t| <= REDUCTION_LIMIT`.
#[inline(always)]
pub(crate) fn cos_odd_sum<const FMA: bool>(t: f64, n: usize) -> f64 {
    let m = (n + 1) as f64;
    let (s, k) = sin_reduced::<FMA>(t);
    let num = sin_reduced::<FMA>(2.0 * m * t).0;
    let near_pole = s.abs() < 1e-6;
    let limit = m * parity_sign(k);
    let ratio = num / (2.0 * if near_pole { 1.0 } else { s });
    if near_pole {
        limit
    } else {
        ratio
    }
}

/// `sum_{k=0..n} cos((2k+1) t)` by the Chebyshev recurrence
/// `cos((2k+3)t) = 2 cos(2t) cos((2k+1)t) - cos((2k-1)t)` (the scalar reference, and the
/// fallback for arguments beyond the reduction limit).
pub(crate) fn cos_odd_sum_recurrence(t: f64, n: usize) -> f64 {
    let c1 = t.cos();
    let c2 = 2.0 * (2.0 * c1 * c1 - 1.0);
    let (mut prev, mut cur) = (c1, c1); // cos(-t), cos(t)
    let mut sum = cur;
    for _ in 0..n {
        let next = c2 * cur - prev;
        sum += next;
        prev = cur;
        cur = next;
    }
    sum
}

/// Defines the slice kernels for one element type (computed in `f64` lanes). The loops are
/// branch-free so they vectorise; inputs beyond the reduction limit (and only those) are redone
/// with libm afterwards.
macro_rules! kernels {
    ($t:ty, $fda_grad:ident, $scaled_sin:ident, $act_noise_fwd:ident, $act_noise_grad:ident) => {
        /// `out = sign(x) + a (e + 0.1 sin x)`: a binarised activation with FDA's noise
        /// adaptation (`e` the module's FC path).
        pub(crate) fn $act_noise_fwd(x: &[$t], e: &[$t], out: &mut [$t], a: f64) {
            nn_core::simd_dispatch! {
                fn kernel(x: &[$t], e: &[$t], out: &mut [$t], a: f64) {
                    for ((o, &x), &e) in out.iter_mut().zip(x).zip(e) {
                        let x = x as f64;
                        let sign = if x >= 0.0 { 1.0 } else { -1.0 };
                        *o = (sign + a * (e as f64 + 0.1 * sin::<FMA>(x))) as $t;
                    }
                }
            }
            kernel(x, e, out, a);
            if x.iter().any(|v| !((*v as f64).abs() <= REDUCTION_LIMIT)) {
                for ((o, &x), &e) in out.iter_mut().zip(x).zip(e) {
                    let v = x as f64;
                    if !(v.abs() <= REDUCTION_LIMIT) {
                        let sign = if v >= 0.0 { 1.0 } else { -1.0 };
                        *o = (sign + a * (e as f64 + 0.1 * v.sin())) as $t;
                    }
                }
            }
        }

        /// `out = g (q'(x) + 0.1 a cos x)`: the input gradient of the activation above.
        pub(crate) fn $act_noise_grad(x: &[$t], g: &[$t], out: &mut [$t], q: Quantizer, a: f64) {
            nn_core::simd_dispatch! {
                fn kernel(x: &[$t], g: &[$t], out: &mut [$t], q: Quantizer, a: f64) {
                    match q {
                        Quantizer::Fda { omega, n } => {
                            let scale = 4.0 * omega / PI;
                            for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                                let x = x as f64;
                                let d = scale * cos_odd_sum::<FMA>(omega * x, n);
                                let d = if x.abs() <= 1.0 { d } else { 0.0 };
                                *o = (g as f64 * (d + 0.1 * a * cos::<FMA>(x))) as $t;
                            }
                        }
                        other => {
                            for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                                let x = x as f64;
                                *o = (g as f64 * (other.grad(x) + 0.1 * a * cos::<FMA>(x))) as $t;
                            }
                        }
                    }
                }
            }
            kernel(x, g, out, q, a);
            let fda_too_wide = matches!(q, Quantizer::Fda { omega, n } if 2.0 * (n + 1) as f64 * omega.abs() > REDUCTION_LIMIT);
            if fda_too_wide || x.iter().any(|v| !((*v as f64).abs() <= REDUCTION_LIMIT)) {
                for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                    let v = x as f64;
                    if fda_too_wide || !(v.abs() <= REDUCTION_LIMIT) {
                        *o = (g as f64 * (q.grad(v) + 0.1 * a * v.cos())) as $t;
                    }
                }
            }
        }

        /// `out = g * (4 w / pi) sum_{i=0..n} cos((2i+1) w x) * 1_{|x| <= 1}` (FDA's backward).
        pub(crate) fn $fda_grad(x: &[$t], g: &[$t], out: &mut [$t], omega: f64, n: usize) {
            nn_core::simd_dispatch! {
                fn kernel(x: &[$t], g: &[$t], out: &mut [$t], omega: f64, n: usize) {
                    let scale = 4.0 * omega / PI;
                    for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                        let x = x as f64;
                        let d = scale * cos_odd_sum::<FMA>(omega * x, n);
                        *o = (if x.abs() <= 1.0 { g as f64 * d } else { 0.0 }) as $t;
                    }
                }
            }
            kernel(x, g, out, omega, n);
            // |x| <= 1 below, so only a huge `omega * (n + 1)` can exceed the limit
            if 2.0 * (n + 1) as f64 * omega.abs() > REDUCTION_LIMIT {
                let scale = 4.0 * omega / PI;
                for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                    let x = x as f64;
                    if x.abs() <= 1.0 {
                        *o = (g as f64 * scale * cos_odd_sum_recurrence(omega * x, n)) as $t;
                    }
                }
            }
        }

        /// `out = scale * sin(x)` (`grad = None`) or `out = grad * scale * cos(x)` (its backward).
        pub(crate) fn $scaled_sin(x: &[$t], grad: Option<&[$t]>, out: &mut [$t], scale: f64) {
            nn_core::simd_dispatch! {
                fn kernel(x: &[$t], grad: Option<&[$t]>, out: &mut [$t], scale: f64) {
                    match grad {
                        None => {
                            for (o, &x) in out.iter_mut().zip(x) {
                                *o = (scale * sin::<FMA>(x as f64)) as $t;
                            }
                        }
                        Some(g) => {
                            for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                                *o = (g as f64 * scale * cos::<FMA>(x as f64)) as $t;
                            }
                        }
                    }
                }
            }
            kernel(x, grad, out, scale);
            if x.iter().any(|v| !((*v as f64).abs() <= REDUCTION_LIMIT)) {
                for (i, (o, &x)) in out.iter_mut().zip(x).enumerate() {
                    let v = x as f64;
                    if !(v.abs() <= REDUCTION_LIMIT) {
                        *o = match grad {
                            None => (scale * v.sin()) as $t,
                            Some(g) => (g[i] as f64 * scale * v.cos()) as $t,
                        };
                    }
                }
            }
        }
    };
}

kernels!(f32, fda_grad_f32, scaled_sin_f32, act_noise_fwd_f32, act_noise_grad_f32);
kernels!(f64, fda_grad_f64, scaled_sin_f64, act_noise_fwd_f64, act_noise_grad_f64);

#[cfg(test)]
mod tests {
    use super::*;

    fn both(f: impl Fn(bool)) {
        f(false);
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("fma") {
            f(true);
        }
    }

    #[test]
    fn sin_and_cos_match_libm_over_a_wide_range() {
        both(|fma| {
            let mut worst = 0.0f64;
            for i in -200_000..=200_000 {
                let x = i as f64 * 0.001_234_567 + 1e-9;
                for x in [x, x * 1000.0] {
                    let (s, c) = if fma {
                        (sin::<true>(x), cos::<true>(x))
                    } else {
                        (sin::<false>(x), cos::<false>(x))
                    };
                    worst = worst.max((s - x.sin()).abs()).max((c - x.cos()).abs());
                }
            }
            assert!(worst < 1e-12, "fma {fma}: worst abs error {worst}");
        });
    }

    #[test]
    fn closed_form_cos_sum_matches_the_recurrence_incl_poles() {
        both(|fma| {
            for n in [0usize, 1, 9, 17, 18, 40] {
                let mut ts: Vec<f64> = (-3000..=3000).map(|i| i as f64 * 0.0037).collect();
                // exactly 0, exact multiples of pi and their neighbours (the 0/0 points)
                for m in -3..=3 {
                    let p = m as f64 * PI;
                    ts.extend([p, p + 1e-7, p - 1e-7, p + 1e-5, p - 2e-6]);
                }
                for t in ts {
                    let want = cos_odd_sum_recurrence(t, n);
                    let got = if fma {
                        cos_odd_sum::<true>(t, n)
                    } else {
                        cos_odd_sum::<false>(t, n)
                    };
                    let tol = 1e-9 * (n as f64 + 1.0);
                    assert!((got - want).abs() < tol, "fma {fma} n {n} t {t}: {got} vs {want}");
                }
            }
        });
    }

    #[test]
    fn slice_kernels_agree_with_scalar_formulas() {
        let xs: Vec<f64> = (-500..=500).map(|i| i as f64 * 0.0031 + 0.0007).collect();
        let gs: Vec<f64> = xs.iter().map(|x| 1.0 - 0.3 * x).collect();
        for &(omega, n) in &[(0.1, 9usize), (0.1, 18), (3.0, 12), (PI, 5)] {
            let mut out = vec![0.0; xs.len()];
            fda_grad_f64(&xs, &gs, &mut out, omega, n);
            for i in 0..xs.len() {
                let x = xs[i];
                let want = if x.abs() <= 1.0 {
                    gs[i] * 4.0 * omega / PI * cos_odd_sum_recurrence(omega * x, n)
                } else {
                    0.0
                };
                assert!((out[i] - want).abs() < 1e-9, "w {omega} n {n} x {x}: {} vs {want}", out[i]);
            }
        }
        let x32: Vec<f32> = xs.iter().map(|&x| (x * 40.0) as f32).collect();
        let g32: Vec<f32> = gs.iter().map(|&g| g as f32).collect();
        let mut fwd = vec![0f32; x32.len()];
        let mut bwd = vec![0f32; x32.len()];
        scaled_sin_f32(&x32, None, &mut fwd, 0.1);
        scaled_sin_f32(&x32, Some(&g32), &mut bwd, 0.1);
        for i in 0..x32.len() {
            let x = x32[i] as f64;
            assert!((fwd[i] as f64 - 0.1 * x.sin()).abs() < 1e-7);
            assert!((bwd[i] as f64 - g32[i] as f64 * 0.1 * x.cos()).abs() < 1e-7);
        }
        // beyond the reduction limit (and NaN) the kernels use libm
        let big = [3e7f64, -1e9, f64::NAN, 0.5];
        let mut out = [0.0; 4];
        scaled_sin_f64(&big, None, &mut out, 1.0);
        assert_eq!(out[..2], [3e7f64.sin(), (-1e9f64).sin()]);
        assert!(out[2].is_nan());
        assert!((out[3] - 0.5f64.sin()).abs() < 1e-15);
        let mut out = [0.0; 2];
        fda_grad_f64(&[0.3, -0.9], &[1.0, 2.0], &mut out, 1e8, 3);
        for (o, (x, g)) in out.iter().zip([(0.3f64, 1.0), (-0.9, 2.0)]) {
            assert!((o - g * 4e8 / PI * cos_odd_sum_recurrence(1e8 * x, 3)).abs() < 1e-6 * o.abs().max(1.0));
        }
    }
}
