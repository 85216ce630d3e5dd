//! Branch-free `sin` and the FDA cosine sum for the quantizers' CPU kernels, written so that
//! their slice loops auto-vectorise (under AVX2+FMA, chosen at run time, 8 `f32` or 4 `f64`
//! lanes; the crate is built for baseline x86-64). `f32` tensors are computed in `f32` lanes:
//! the results are `f32` anyway, and the lanes are twice as many.
//!
//! Profiling FDA training showed libm's scalar `cos` (the FDA gradient) and `sinf`/`cosf` (the
//! noise adaptation module's `0.1 sin t`) at about a quarter of a binary ResNet-20 step; these
//! kernels replace them.

use crate::quantizer::Quantizer;
use std::f64::consts::PI;
use std::ops::{Add, Div, Mul, Neg, Sub};

/// A lane type of the kernels: the constants of its range reduction and `sin` polynomial.
pub(crate) trait Lane:
    'static + Copy + PartialOrd + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self> + Neg<Output = Self>
{
    /// Pi in three parts for Cody-Waite range reduction, the first two short enough that their
    /// products with the multiples of pi used below `REDUCTION_LIMIT` are exact.
    const PI_PARTS: [Self; 3];
    const FRAC_1_PI: Self;
    /// How many of the [`SIN_TAYLOR`] coefficients the lane's precision needs on `|r| <= pi/2`.
    const SIN_TERMS: usize;
    /// Beyond this magnitude the reduction is not exact: the kernels fall back to libm.
    const REDUCTION_LIMIT: f64;
    /// `|s| < NEAR_POLE`: the closed-form cosine sum takes its limit.
    const NEAR_POLE: Self;
    fn of(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn floor(self) -> Self;
    fn abs(self) -> Self;
    fn mul_add(self, b: Self, c: Self) -> Self;
}

/// The `Lane` methods that are the same for `f32` and `f64`: conversions through `as` and the
/// inherent `floor`, `abs` and `mul_add`.
macro_rules! lane_conversions {
    ($t:ty) => {
        #[inline(always)]
        fn of(v: f64) -> Self {
            v as $t
        }
        #[inline(always)]
        fn to_f64(self) -> f64 {
            self as f64
        }
        #[inline(always)]
        fn floor(self) -> Self {
            <$t>::floor(self)
        }
        #[inline(always)]
        fn abs(self) -> Self {
            <$t>::abs(self)
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            <$t>::mul_add(self, b, c)
        }
    };
}

impl Lane for f64 {
    // `PI_A`, `PI_B`: 27 significant bits, exact products with multipliers of up to 26 bits
    // (`|x| < 2^25`); the sum is pi to about 1e-32
    const PI_PARTS: [f64; 3] = [3.141_592_651_605_606, 1.984_187_147_918_703_4e-9, 1.144_237_745_221_966_4e-17];
    const FRAC_1_PI: f64 = std::f64::consts::FRAC_1_PI;
    // k = 1..9: the first omitted term is below 1e-17 on |r| <= pi/2
    const SIN_TERMS: usize = 9;
    const REDUCTION_LIMIT: f64 = 1e7;
    const NEAR_POLE: f64 = 1e-6;
    lane_conversions!(f64);
}

impl Lane for f32 {
    // `PI_A` = 3.140625 (8 bits) and `PI_B` (12 bits): exact products with multipliers of up
    // to 12 bits (`|x| < 2^11 pi`); the sum is pi to about 1e-15
    const PI_PARTS: [f32; 3] = [3.140_625, 9.675_026e-4, 1.509_958e-7];
    const FRAC_1_PI: f32 = std::f32::consts::FRAC_1_PI;
    // k = 1..6: the first omitted term is below 7e-10 on |r| <= pi/2
    const SIN_TERMS: usize = 6;
    const REDUCTION_LIMIT: f64 = 6000.0;
    const NEAR_POLE: f32 = 1e-5;
    lane_conversions!(f32);
}

/// Taylor coefficients `(-1)^k / (2k+1)!`, `k = 1..9`, of `sin r / r` in `r^2` (literal
/// quotients, folded at compile time); a lane uses the first `SIN_TERMS`.
const SIN_TAYLOR: [f64; 9] = [
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

/// `a * b + c`, fused where the FMA unit is enabled (libm's `fma` is slow without it).
#[inline(always)]
fn madd<L: Lane, const FMA: bool>(a: L, b: L, c: L) -> L {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `sin r` on `|r| <= pi/2` by the Taylor polynomial (Horner in `r^2`).
#[inline(always)]
fn sin_poly<L: Lane, const FMA: bool>(r: L) -> L {
    let r2 = r * r;
    let mut p = L::of(0.0);
    for &c in SIN_TAYLOR[..L::SIN_TERMS].iter().rev() {
        p = madd::<L, FMA>(p, r2, L::of(c));
    }
    r * madd::<L, FMA>(p, r2, L::of(1.0))
}

/// `(-1)^k` for an integral `k` held in a float, without integer conversions (they would stop
/// the loops from vectorising).
#[inline(always)]
fn parity_sign<L: Lane>(k: L) -> L {
    let two = L::of(2.0);
    L::of(1.0) - two * (k - two * (k * L::of(0.5)).floor())
}

/// `x - q pi` in three exact-product steps.
#[inline(always)]
fn reduce<L: Lane, const FMA: bool>(x: L, q: L) -> L {
    let [a, b, c] = L::PI_PARTS;
    madd::<L, FMA>(-q, c, madd::<L, FMA>(-q, b, madd::<L, FMA>(-q, a, x)))
}

/// `sin x` and the multiple `k` of pi removed by the range reduction (`x = k pi + r`,
/// `|r| <= pi/2`, `sin x = (-1)^k sin r`), without branches. Valid for
/// `|x| <= L::REDUCTION_LIMIT`; the kernels fix larger inputs up with libm.
#[inline(always)]
pub(crate) fn sin_reduced<L: Lane, const FMA: bool>(x: L) -> (L, L) {
    let k = (x * L::FRAC_1_PI + L::of(0.5)).floor();
    (parity_sign(k) * sin_poly::<L, FMA>(reduce::<L, FMA>(x, k)), k)
}

/// `sin x` for `|x| <= L::REDUCTION_LIMIT`.
#[inline(always)]
pub(crate) fn sin<L: Lane, const FMA: bool>(x: L) -> L {
    sin_reduced::<L, FMA>(x).0
}

/// `cos x` for `|x| <= L::REDUCTION_LIMIT`: with `k = floor(x / pi)` and `x = (k + 1/2) pi + r`,
/// `cos x = -(-1)^k sin r`. (Reducing `x` itself rather than computing `sin(x + pi/2)` keeps the
/// accuracy for large `x`.)
#[inline(always)]
pub(crate) fn cos<L: Lane, const FMA: bool>(x: L) -> L {
    let k = (x * L::FRAC_1_PI).floor();
    -parity_sign(k) * sin_poly::<L, FMA>(reduce::<L, FMA>(x, k + L::of(0.5)))
}

/// `sum_{k=0..n} cos((2k+1) t)` in closed form: `sin(2 (n+1) t) / (2 sin t)` (the sum of a
/// geometric series of `e^{i(2k+1)t}`), with its limit `(n+1) (-1)^m` where `t` is within
/// `L::NEAR_POLE` of `m pi`. Branch-free; valid for `|2 (n+1) t| <= L::REDUCTION_LIMIT`.
#[inline(always)]
pub(crate) fn cos_odd_sum<L: Lane, const FMA: bool>(t: L, n: usize) -> L {
    let m = L::of((n + 1) as f64);
    let (s, k) = sin_reduced::<L, FMA>(t);
    let num = sin_reduced::<L, FMA>(L::of(2.0) * m * t).0;
    let near_pole = s.abs() < L::NEAR_POLE;
    let limit = m * parity_sign(k);
    let ratio = num / (L::of(2.0) * if near_pole { L::of(1.0) } else { s });
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

/// Whether `v` is outside the reduction range (NaN included): such inputs are redone with libm.
#[inline(always)]
fn beyond(v: f64, limit: f64) -> bool {
    v.is_nan() || v.abs() > limit
}

/// Where FDA's gradient for `T` data is computed.
enum Lanes {
    /// In `T` lanes.
    Own,
    /// In `f64` lanes.
    F64,
    /// Scalar, by the recurrence (beyond every reduction limit).
    Scalar,
}

/// `f32` lanes are used while `|w| <= pi/2`: then `|t| = |w x| <= pi/2` on the gradient's
/// support and `sin t` stays away from its zeros except at `t = 0`, where the closed form is
/// accurate in relative terms. Near a zero `t = m pi`, `m != 0`, the rounding of `2 (n+1) t`
/// in `f32` (about `|2 (n+1) t| * 6e-8` absolute) is divided by `2 sin t`, hence `f64` lanes
/// for larger `w`. (The reference reimplementation's `w = 0.1` is far inside.)
fn fda_lanes<T: Lane>(omega: f64, n: usize) -> Lanes {
    let reach = 2.0 * (n + 1) as f64 * omega.abs();
    if reach > f64::REDUCTION_LIMIT {
        Lanes::Scalar
    } else if omega.abs() <= std::f64::consts::FRAC_PI_2 && reach <= T::REDUCTION_LIMIT {
        Lanes::Own
    } else {
        Lanes::F64
    }
}

/// FDA's backward over slices of `T`, computed in `L` lanes.
#[inline(always)]
fn fda_grad_lanes<T: Lane, L: Lane, const FMA: bool>(x: &[T], g: &[T], out: &mut [T], omega: f64, n: usize) {
    let (scale, omega) = (L::of(4.0 * omega / PI), L::of(omega));
    for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
        let x = L::of(x.to_f64());
        let d = scale * cos_odd_sum::<L, FMA>(omega * x, n);
        *o = T::of(if x.abs() <= L::of(1.0) { L::of(g.to_f64()) * d } else { L::of(0.0) }.to_f64());
    }
}

/// Defines the slice kernels for one element type, computed in lanes of that type. The loops
/// are branch-free so they vectorise; inputs beyond the reduction limit (and only those) are
/// redone with libm in `f64` afterwards.
macro_rules! kernels {
    ($t:ty, $fda_grad:ident, $scaled_sin:ident, $act_noise_fwd:ident, $act_noise_grad:ident) => {
        /// `out = sign(x) + a (e + 0.1 sin x)`: a binarised activation with FDA's noise
        /// adaptation (`e` the module's FC path).
        pub(crate) fn $act_noise_fwd(x: &[$t], e: &[$t], out: &mut [$t], a: f64) {
            nn_core::simd_dispatch! {
                fn kernel(x: &[$t], e: &[$t], out: &mut [$t], a: f64) {
                    let (a, tenth) = (a as $t, 0.1 as $t);
                    for ((o, &x), &e) in out.iter_mut().zip(x).zip(e) {
                        let sign: $t = if x >= 0.0 { 1.0 } else { -1.0 };
                        *o = sign + a * (e + tenth * sin::<$t, FMA>(x));
                    }
                }
            }
            kernel(x, e, out, a);
            let limit = <$t as Lane>::REDUCTION_LIMIT;
            if x.iter().any(|v| beyond(*v as f64, limit)) {
                for ((o, &x), &e) in out.iter_mut().zip(x).zip(e) {
                    let v = x as f64;
                    if beyond(v, limit) {
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
                    let c = (0.1 * a) as $t;
                    match q {
                        Quantizer::Fda { omega, n } if matches!(fda_lanes::<$t>(omega, n), Lanes::Own) => {
                            let (scale, omega) = ((4.0 * omega / PI) as $t, omega as $t);
                            for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                                let d = scale * cos_odd_sum::<$t, FMA>(omega * x, n);
                                let d = if x.abs() <= 1.0 { d } else { 0.0 };
                                *o = g * (d + c * cos::<$t, FMA>(x));
                            }
                        }
                        Quantizer::Fda { omega, n } => {
                            // the FDA part in f64 lanes (see `fda_lanes`)
                            let scale = 4.0 * omega / PI;
                            for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                                let xd = x as f64;
                                let d = scale * cos_odd_sum::<f64, FMA>(omega * xd, n);
                                let d = if xd.abs() <= 1.0 { d as $t } else { 0.0 };
                                *o = g * (d + c * cos::<$t, FMA>(x));
                            }
                        }
                        other => {
                            for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                                *o = g * (other.grad(x as f64) as $t + c * cos::<$t, FMA>(x));
                            }
                        }
                    }
                }
            }
            kernel(x, g, out, q, a);
            let limit = <$t as Lane>::REDUCTION_LIMIT;
            let fda_too_wide = matches!(q, Quantizer::Fda { omega, n } if matches!(fda_lanes::<$t>(omega, n), Lanes::Scalar));
            if fda_too_wide || x.iter().any(|v| beyond(*v as f64, limit)) {
                for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                    let v = x as f64;
                    if fda_too_wide || beyond(v, limit) {
                        *o = (g as f64 * (q.grad(v) + 0.1 * a * v.cos())) as $t;
                    }
                }
            }
        }

        /// `out = g * (4 w / pi) sum_{i=0..n} cos((2i+1) w x) * 1_{|x| <= 1}` (FDA's backward).
        pub(crate) fn $fda_grad(x: &[$t], g: &[$t], out: &mut [$t], omega: f64, n: usize) {
            match fda_lanes::<$t>(omega, n) {
                Lanes::Own => {
                    nn_core::simd_dispatch! {
                        fn kernel(x: &[$t], g: &[$t], out: &mut [$t], omega: f64, n: usize) {
                            fda_grad_lanes::<$t, $t, FMA>(x, g, out, omega, n)
                        }
                    }
                    kernel(x, g, out, omega, n)
                }
                Lanes::F64 => {
                    nn_core::simd_dispatch! {
                        fn kernel(x: &[$t], g: &[$t], out: &mut [$t], omega: f64, n: usize) {
                            fda_grad_lanes::<$t, f64, FMA>(x, g, out, omega, n)
                        }
                    }
                    kernel(x, g, out, omega, n)
                }
                Lanes::Scalar => {
                    let scale = 4.0 * omega / PI;
                    for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                        let x = x as f64;
                        *o = if x.abs() <= 1.0 { (g as f64 * scale * cos_odd_sum_recurrence(omega * x, n)) as $t } else { 0.0 };
                    }
                }
            }
        }

        /// `out = scale * sin(x)` (`grad = None`) or `out = grad * scale * cos(x)` (its backward).
        pub(crate) fn $scaled_sin(x: &[$t], grad: Option<&[$t]>, out: &mut [$t], scale: f64) {
            nn_core::simd_dispatch! {
                fn kernel(x: &[$t], grad: Option<&[$t]>, out: &mut [$t], scale: f64) {
                    let scale = scale as $t;
                    match grad {
                        None => {
                            for (o, &x) in out.iter_mut().zip(x) {
                                *o = scale * sin::<$t, FMA>(x);
                            }
                        }
                        Some(g) => {
                            for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                                *o = g * scale * cos::<$t, FMA>(x);
                            }
                        }
                    }
                }
            }
            kernel(x, grad, out, scale);
            let limit = <$t as Lane>::REDUCTION_LIMIT;
            if x.iter().any(|v| beyond(*v as f64, limit)) {
                for (i, (o, &x)) in out.iter_mut().zip(x).enumerate() {
                    let v = x as f64;
                    if beyond(v, limit) {
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
                        (sin::<f64, true>(x), cos::<f64, true>(x))
                    } else {
                        (sin::<f64, false>(x), cos::<f64, false>(x))
                    };
                    worst = worst.max((s - x.sin()).abs()).max((c - x.cos()).abs());
                }
            }
            assert!(worst < 1e-12, "fma {fma}: worst abs error {worst}");
        });
    }

    #[test]
    fn f32_lanes_match_libm_within_f32_accuracy() {
        both(|fma| {
            let (mut ws, mut wc, mut wsum) = (0.0f64, 0.0f64, 0.0f64);
            for i in -400_000..=400_000 {
                // |x| up to about 6000, the f32 reduction limit
                let x = (i as f64 * 0.015) as f32;
                let (s, c) = if fma {
                    (sin::<f32, true>(x), cos::<f32, true>(x))
                } else {
                    (sin::<f32, false>(x), cos::<f32, false>(x))
                };
                let xd = x as f64;
                ws = ws.max((s as f64 - xd.sin()).abs());
                wc = wc.max((c as f64 - xd.cos()).abs());
            }
            assert!(ws < 5e-7 && wc < 5e-7, "fma {fma}: sin {ws} cos {wc}");
            // the FDA sum on the f32 lanes' range, |t| <= pi/2 (see `fda_lanes`)
            for n in [0usize, 9, 18] {
                for i in -4000..=4000 {
                    let t = (i as f64 * 0.000_39) as f32;
                    let got = if fma {
                        cos_odd_sum::<f32, true>(t, n)
                    } else {
                        cos_odd_sum::<f32, false>(t, n)
                    };
                    let want = cos_odd_sum_recurrence(t as f64, n);
                    wsum = wsum.max((got as f64 - want).abs() / (n as f64 + 1.0));
                }
            }
            assert!(wsum < 2e-6, "fma {fma}: cosine sum {wsum}");
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
                        cos_odd_sum::<f64, true>(t, n)
                    } else {
                        cos_odd_sum::<f64, false>(t, n)
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
        // f32 lanes against the f64 formula of the same f32 inputs
        let x32: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
        let g32: Vec<f32> = gs.iter().map(|&g| g as f32).collect();
        for &(omega, n) in &[(0.1, 9usize), (0.1, 18), (3.0, 12), (PI, 5), (1e4, 3)] {
            let mut out = vec![0f32; x32.len()];
            fda_grad_f32(&x32, &g32, &mut out, omega, n);
            for i in 0..x32.len() {
                let x = x32[i] as f64;
                let want = if x.abs() <= 1.0 {
                    g32[i] as f64 * 4.0 * omega / PI * cos_odd_sum_recurrence(omega * x, n)
                } else {
                    0.0
                };
                let tol = 2e-6 * 4.0 * omega.abs() / PI * (n as f64 + 1.0);
                assert!(
                    (out[i] as f64 - want).abs() < tol,
                    "f32 w {omega} n {n} x {x}: {} vs {want}",
                    out[i]
                );
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
            assert!((bwd[i] as f64 - g32[i] as f64 * 0.1 * x.cos()).abs() < 2e-7);
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
