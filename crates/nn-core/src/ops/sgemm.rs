//! A small AVX2+FMA single-precision matrix product for the linear layers'
//! `rows x k` by `k x n` products: the right-hand side is packed once per call into panels of
//! 16 columns, and a 6 x 16 register-blocked micro-kernel (12 accumulators: 6 broadcasts of
//! the left-hand side and 2 loads of the panel per step of `k`) reads the left-hand rows in
//! place. Rows are taken in chunks that stay in L2 while every panel passes over them, so a
//! panel (at most `16 k` floats) stays in L1 across the chunk's row blocks.
//!
//! Used only where the CPU has AVX2 and FMA ([`available`]); the `gemm` crate covers the rest.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Columns per packed panel (two 8-lane registers).
pub(crate) const NR: usize = 16;
/// Rows per micro-kernel call.
pub(crate) const MR: usize = 6;

/// Whether the micro-kernel can run here (x86-64 with AVX2 and FMA).
#[inline]
pub(crate) fn available() -> bool {
    super::conv::has_avx2()
}

/// Right-hand side `B[k, n]` packed into `ceil(n / 16)` panels of `k x 16` values
/// (`panel[p][kk][j] = B[kk, 16 p + j]`, zero past column `n`).
pub(crate) struct PackedRhs {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl PackedRhs {
    /// Packs the `k x n` view of `b` with row stride `rs` and column stride `cs`.
    pub(crate) fn new(b: &[f32], rs: usize, cs: usize, k: usize, n: usize) -> Self {
        if k > 0 && n > 0 {
            assert!((k - 1) * rs + (n - 1) * cs < b.len(), "PackedRhs: view exceeds the slice");
        }
        // SAFETY: the assertion above keeps every read inside `b`.
        unsafe { Self::from_ptr(b.as_ptr(), rs, cs, k, n, true) }
    }

    /// [`PackedRhs::new`] from a pointer; with `parallel`, the panels of a large matrix are
    /// packed over rayon's threads (callers already inside a parallel task pass false).
    ///
    /// # Safety
    /// `b[kk * rs + j * cs]` must be readable for every `kk < k`, `j < n`.
    pub(crate) unsafe fn from_ptr(b: *const f32, rs: usize, cs: usize, k: usize, n: usize, parallel: bool) -> Self {
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        let base = b as usize; // (a plain address, so that the closure can cross threads)
        let pack = move |(p, panel): (usize, &mut [f32])| {
            let b = base as *const f32;
            let cols = NR.min(n - p * NR);
            if rs == 1 && cs != 1 {
                // a transposed view (the linear weight, attention's K^T): each column of B is a
                // contiguous run, read in order and spread with stride NR inside the panel
                for j in 0..cols {
                    // SAFETY: kk < k and p * NR + j < n (the caller's contract)
                    let col = unsafe { std::slice::from_raw_parts(b.add((p * NR + j) * cs), k) };
                    for (kk, v) in col.iter().enumerate() {
                        panel[kk * NR + j] = *v;
                    }
                }
                return;
            }
            for (kk, row) in panel.chunks_exact_mut(NR).enumerate() {
                for (j, v) in row.iter_mut().enumerate().take(cols) {
                    // SAFETY: kk < k and p * NR + j < n (the caller's contract)
                    *v = unsafe { *b.add(kk * rs + (p * NR + j) * cs) };
                }
            }
        };
        if parallel && k > 0 && k * n >= 1 << 15 {
            // (1.8% of a Swin-T forward when packed on one thread)
            use rayon::prelude::*;
            data.par_chunks_exact_mut(k * NR).enumerate().for_each(pack);
        } else if k > 0 {
            data.chunks_exact_mut(k * NR).enumerate().for_each(pack);
        }
        Self { data, k, n }
    }
}

/// `C[m, n] (+)= A[m, k] B` on one thread: `a` row-major with row stride `lda`, `c` row-major
/// with row stride `ldc`; `accumulate` adds to `c` instead of overwriting it.
///
/// # Safety
/// [`available`] must be true, `a` must hold `m` rows of `k` values at stride `lda`, and `c`
/// must be valid for writes (and reads when accumulating) of `m` rows of `n` values at
/// stride `ldc`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn gemm_rows(
    m: usize,
    a: *const f32,
    lda: usize,
    b: &PackedRhs,
    bias: Option<&[f32]>,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 {
        return;
    }
    // the bias padded to whole panels, added by the micro-kernel as its starting value (a
    // separate pass writing it into `c` first would send the output through memory twice)
    let bias_padded: Option<Vec<f32>> = bias.map(|bv| {
        let mut v = vec![0f32; n.div_ceil(NR) * NR];
        v[..n].copy_from_slice(&bv[..n]);
        v
    });
    let panels = n.div_ceil(NR);
    let tile = |i: usize, p: usize| {
        let r = MR.min(m - i);
        let cols = NR.min(n - p * NR);
        let (ai, bp, ci) = (a.add(i * lda), b.data.as_ptr().add(p * k * NR), c.add(i * ldc + p * NR));
        let bias_p = bias_padded.as_ref().map_or(std::ptr::null(), |v| v.as_ptr().add(p * NR));
        if r == MR && cols == NR {
            kernel_6x16(k, ai, lda, bp, bias_p, ci, ldc, MR, accumulate);
        } else {
            // edge tile: compute into a local tile, then copy the valid part
            let mut t = [0f32; MR * NR];
            kernel_6x16(k, ai, lda, bp, bias_p, t.as_mut_ptr(), NR, r, false);
            for ii in 0..r {
                let dst = ci.add(ii * ldc);
                for (jj, v) in t[ii * NR..ii * NR + cols].iter().enumerate() {
                    if accumulate {
                        *dst.add(jj) += v;
                    } else {
                        *dst.add(jj) = *v;
                    }
                }
            }
        }
    };
    if k * n <= 32 * 1024 {
        // small right-hand side (fits L1/L2 whole): row blocks outer, so that the output is
        // written row after row and the 6 rows of A stay in L1 across all panels
        for i in (0..m).step_by(MR) {
            for p in 0..panels {
                tile(i, p);
            }
        }
        return;
    }
    // rows per chunk: the chunk's rows of A (about 128 KiB) stay in L2 while every panel
    // passes over them, each panel staying in L1 across the chunk's row blocks
    let mc = ((128 * 1024 / 4) / k).clamp(MR, 32 * MR) / MR * MR;
    let mut i0 = 0;
    while i0 < m {
        let rows = mc.min(m - i0);
        for p in 0..panels {
            for i in (i0..i0 + rows).step_by(MR) {
                tile(i, p);
            }
        }
        i0 += rows;
    }
}

/// The 6 x 16 micro-kernel: `C[0..6, 0..16] (+)= bias[0..16] + A[0..6, 0..k] panel[0..k, 0..16]`
/// (no bias when `bias` is null). With `rows < 6` the missing rows re-read row 0 and only
/// `rows` rows are written.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_6x16(
    k: usize,
    a: *const f32,
    lda: usize,
    bp: *const f32,
    bias: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    accumulate: bool,
) {
    let row = |i: usize| if i < rows { a.add(i * lda) } else { a };
    let (a0, a1, a2, a3, a4, a5) = (row(0), row(1), row(2), row(3), row(4), row(5));
    let (z, zh) = if bias.is_null() {
        (_mm256_setzero_ps(), _mm256_setzero_ps())
    } else {
        (_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8)))
    };
    let (mut c00, mut c01, mut c10, mut c11, mut c20, mut c21) = (z, zh, z, zh, z, zh);
    let (mut c30, mut c31, mut c40, mut c41, mut c50, mut c51) = (z, zh, z, zh, z, zh);
    // one step of k (the loop below is unrolled by 4: fewer loop-carried counter updates)
    macro_rules! step {
        ($kk:expr) => {{
            let kk = $kk;
            let b0 = _mm256_loadu_ps(bp.add(kk * NR));
            let b1 = _mm256_loadu_ps(bp.add(kk * NR + 8));
            let x = _mm256_broadcast_ss(&*a0.add(kk));
            c00 = _mm256_fmadd_ps(x, b0, c00);
            c01 = _mm256_fmadd_ps(x, b1, c01);
            let x = _mm256_broadcast_ss(&*a1.add(kk));
            c10 = _mm256_fmadd_ps(x, b0, c10);
            c11 = _mm256_fmadd_ps(x, b1, c11);
            let x = _mm256_broadcast_ss(&*a2.add(kk));
            c20 = _mm256_fmadd_ps(x, b0, c20);
            c21 = _mm256_fmadd_ps(x, b1, c21);
            let x = _mm256_broadcast_ss(&*a3.add(kk));
            c30 = _mm256_fmadd_ps(x, b0, c30);
            c31 = _mm256_fmadd_ps(x, b1, c31);
            let x = _mm256_broadcast_ss(&*a4.add(kk));
            c40 = _mm256_fmadd_ps(x, b0, c40);
            c41 = _mm256_fmadd_ps(x, b1, c41);
            let x = _mm256_broadcast_ss(&*a5.add(kk));
            c50 = _mm256_fmadd_ps(x, b0, c50);
            c51 = _mm256_fmadd_ps(x, b1, c51);
        }};
    }
    let mut kk = 0;
    while kk + 4 <= k {
        step!(kk);
        step!(kk + 1);
        step!(kk + 2);
        step!(kk + 3);
        kk += 4;
    }
    while kk < k {
        step!(kk);
        kk += 1;
    }
    let out = [(c00, c01), (c10, c11), (c20, c21), (c30, c31), (c40, c41), (c50, c51)];
    for (i, (lo, hi)) in out.into_iter().enumerate().take(rows) {
        let d = c.add(i * ldc);
        if accumulate {
            _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), lo));
            _mm256_storeu_ps(d.add(8), _mm256_add_ps(_mm256_loadu_ps(d.add(8)), hi));
        } else {
            _mm256_storeu_ps(d, lo);
            _mm256_storeu_ps(d.add(8), hi);
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c0: &[f32], acc: bool) -> Vec<f64> {
        (0..m * n)
            .map(|idx| {
                let (i, j) = (idx / n, idx % n);
                let s: f64 = (0..k).map(|kk| a[i * k + kk] as f64 * b[kk * n + j] as f64).sum();
                if acc {
                    s + c0[idx] as f64
                } else {
                    s
                }
            })
            .collect()
    }

    #[test]
    fn matches_naive_product_on_edge_shapes() {
        if !available() {
            return;
        }
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        for &(m, k, n) in &[
            (1, 1, 1),
            (6, 3, 16),
            (7, 5, 17),
            (13, 64, 33),
            (250, 200, 40),
            (5, 0, 9),
            (37, 700, 15),
            // k * n >= 2^15: the panels are packed in parallel
            (20, 256, 130),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            for acc in [false, true] {
                let mut c: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
                let want = naive(m, k, n, &a, &b, &c, acc);
                // B given transposed (column stride k): the linear layer's x W^T case
                let bt: Vec<f32> = (0..n * k).map(|idx| b[(idx % k) * n + idx / k]).collect();
                let packed = if acc {
                    PackedRhs::new(&b, n, 1, k, n)
                } else {
                    PackedRhs::new(&bt, 1, k, k, n)
                };
                let c_before = c.clone();
                unsafe { gemm_rows(m, a.as_ptr(), k, &packed, None, c.as_mut_ptr(), n, acc) };
                for (idx, (g, w)) in c.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{m}x{k}x{n} acc {acc} [{idx}]: {g} vs {w}"
                    );
                }
                // with a bias: every output row gains it
                let bias: Vec<f32> = (0..n).map(|_| rnd()).collect();
                let mut cb = c_before;
                unsafe { gemm_rows(m, a.as_ptr(), k, &packed, Some(&bias), cb.as_mut_ptr(), n, acc) };
                for (idx, (g, w)) in cb.iter().zip(&want).enumerate() {
                    let w = w + bias[idx % n] as f64;
                    assert!(
                        (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{m}x{k}x{n} acc {acc} bias [{idx}]: {g} vs {w}"
                    );
                }
            }
        }
    }
}
