//! Binary GEMM: `C[i][j] = sum_k a_ik b_jk` for `a, b` in `{-1, +1}`, on bit-packed rows.
//!
//! With bit `1` for `-1` and `0` for `+1` (see [`crate::deploy::pack`]), the product of two
//! entries is `+1` when their bits agree and `-1` when they differ, so over `K` entries
//! `dot = (#agree) - (#differ) = K - 2 * #differ = K - 2 * popcount(a xor b)`.
//! One `xor` and one `popcount` thus do the work of 64 multiply-adds.
//!
//! Both operands are row-major with the reduction dimension packed along the row (`B` is given
//! as its transpose, one packed row per output column): this is what im2col of activations and
//! a flattened `[O, C kh kw]` weight tensor naturally give.
//!
//! Kernels ([`Kernel`]), chosen at run time:
//! - [`Kernel::Avx2`]: 256-bit `xor`, popcount by a 16-entry nibble table looked up with
//!   `vpshufb` (`_mm256_shuffle_epi8`) on the low and high nibble of each byte, byte counts
//!   accumulated for up to 31 steps (each step adds at most 8 per byte, 31 * 8 < 256) and then
//!   widened with `vpsadbw`; one row of `A` against four rows of `B`; the words that do not fill
//!   a 256-bit vector go through `popcnt`. Below 8 words per row it uses the `popcnt` loops.
//! - [`Kernel::Popcnt`]: the 64-bit `popcnt` instruction; rows of up to 12 words (`K <= 768`,
//!   every convolution of ResNet-20) use a loop specialised to the word count, fully unrolled,
//!   with the row of `A` in registers; longer rows a 2 x 4 register tile.
//! - [`Kernel::Portable`]: the same tile with `u64::count_ones` compiled for the baseline
//!   target (a software popcount on x86-64 without `popcnt`); any architecture.
//!
//! Work is split over rayon's current pool in tiles of [`ROW_TILE`] rows of `A`; inside a tile
//! the columns of `B` are walked in blocks that stay in cache.

use crate::deploy::pack::PackedMatrix;
use rayon::prelude::*;

/// Rows of `A` per parallel task.
pub const ROW_TILE: usize = 64;
/// Bytes of `B` per cache block (columns of `B` walked together for one tile of `A`).
const B_BLOCK_BYTES: usize = 96 * 1024;

/// A binary GEMM kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    Popcnt,
    Avx2,
}

impl Kernel {
    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Popcnt => std::is_x86_feature_detected!("popcnt"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("popcnt"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every kernel this CPU can run.
    pub fn available() -> Vec<Kernel> {
        [Kernel::Portable, Kernel::Popcnt, Kernel::Avx2]
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// The kernel used by default: `BNN_KERNEL` (`portable`, `popcnt`, `avx2`) when set and
    /// available, otherwise `popcnt` where available, otherwise portable. On this project's
    /// machine (AMD Zen 3, four scalar ALUs that each run `popcnt`) `popcnt` was as fast or
    /// faster than the AVX2 nibble table up to `K = 1024`, which covers every convolution of
    /// ResNet-20; AVX2 won only at `K = 4096` (`cargo xtask bnn bench-gemm`,
    /// docs/results/bnn-deploy.md).
    pub fn best() -> Kernel {
        if let Ok(s) = std::env::var("BNN_KERNEL") {
            if let Some(k) = Kernel::parse(&s).filter(|k| k.is_available()) {
                return k;
            }
        }
        if Kernel::Popcnt.is_available() {
            Kernel::Popcnt
        } else {
            Kernel::Portable
        }
    }

    pub fn parse(s: &str) -> Option<Kernel> {
        match s {
            "portable" => Some(Kernel::Portable),
            "popcnt" => Some(Kernel::Popcnt),
            "avx2" => Some(Kernel::Avx2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Popcnt => "popcnt",
            Kernel::Avx2 => "avx2",
        }
    }
}

/// `out[i * ldo + j] = popcount(a_i xor b_j)` for `m` rows of `a` and `n` rows of `b`, all of
/// `wpr` words, on the calling thread. Panics if `kernel` is not available on this CPU.
#[allow(clippy::too_many_arguments)]
pub fn xor_popcount_block(kernel: Kernel, a: &[u64], m: usize, b: &[u64], n: usize, wpr: usize, out: &mut [u32], ldo: usize) {
    assert!(a.len() >= m * wpr && b.len() >= n * wpr, "xor_popcount_block: operands too short");
    assert!(m == 0 || out.len() >= (m - 1) * ldo + n, "xor_popcount_block: output too short");
    assert!(
        kernel.is_available(),
        "binary GEMM kernel `{}` is not available on this CPU",
        kernel.name()
    );
    match kernel {
        Kernel::Portable => block_scalar(a, m, b, n, wpr, out, ldo),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: availability of popcnt was checked above.
        Kernel::Popcnt => unsafe { block_popcnt(a, m, b, n, wpr, out, ldo) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: availability of avx2 and popcnt was checked above.
        Kernel::Avx2 => unsafe { block_avx2(a, m, b, n, wpr, out, ldo) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!(),
    }
}

/// Binary GEMM `C = K - 2 popcount(A xor B)`: `a` is `M x K`, `b` is `N x K` (the transpose of
/// the right operand), the result `M x N` row-major. Parallel over tiles of [`ROW_TILE`] rows
/// of `A` in rayon's current pool.
pub fn bgemm(a: &PackedMatrix, b: &PackedMatrix, kernel: Kernel) -> Vec<i32> {
    let mut out = vec![0i32; a.rows * b.rows];
    bgemm_into(a, b, kernel, &mut out);
    out
}

/// [`bgemm`] into a caller-provided `M x N` buffer.
pub fn bgemm_into(a: &PackedMatrix, b: &PackedMatrix, kernel: Kernel, out: &mut [i32]) {
    assert_eq!(a.k, b.k, "bgemm: A has K = {} but B has K = {}", a.k, b.k);
    let (m, n, wpr, k) = (a.rows, b.rows, a.words_per_row(), a.k as i32);
    assert_eq!(out.len(), m * n, "bgemm: output has {} entries, want {m} x {n}", out.len());
    if m == 0 || n == 0 {
        return;
    }
    let nb = (B_BLOCK_BYTES / (8 * wpr.max(1))).clamp(4, n.max(4)) / 4 * 4;
    out.par_chunks_mut(ROW_TILE * n).enumerate().for_each(|(t, tile)| {
        let i0 = t * ROW_TILE;
        let rows = tile.len() / n;
        let pc: &mut [u32] = bytemuck_i32_as_u32(tile);
        for j0 in (0..n).step_by(nb) {
            let cols = nb.min(n - j0);
            xor_popcount_block(
                kernel,
                &a.data[i0 * wpr..(i0 + rows) * wpr],
                rows,
                &b.data[j0 * wpr..(j0 + cols) * wpr],
                cols,
                wpr,
                &mut pc[j0..],
                n,
            );
        }
        for v in tile.iter_mut() {
            *v = k - 2 * (*v as u32 as i32);
        }
    });
}

/// Views an `i32` buffer as `u32` (same size and alignment; every bit pattern valid).
fn bytemuck_i32_as_u32(x: &mut [i32]) -> &mut [u32] {
    // SAFETY: i32 and u32 have identical size and alignment and no invalid bit patterns.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut u32, x.len()) }
}

const MR: usize = 2;
const NR: usize = 4;

/// The scalar driver: `MR x NR` tiles, one-by-one dot products at the edges.
#[inline(always)]
fn drive_scalar(a: &[u64], m: usize, b: &[u64], n: usize, wpr: usize, out: &mut [u32], ldo: usize) {
    let mut i = 0;
    while i < m {
        let mr = MR.min(m - i);
        let mut j = 0;
        while j < n {
            let nr = NR.min(n - j);
            if mr == MR && nr == NR {
                let mut acc = [[0u32; NR]; MR];
                let ar: [&[u64]; MR] = std::array::from_fn(|r| &a[(i + r) * wpr..(i + r + 1) * wpr]);
                let br: [&[u64]; NR] = std::array::from_fn(|c| &b[(j + c) * wpr..(j + c + 1) * wpr]);
                for w in 0..wpr {
                    for r in 0..MR {
                        let av = ar[r][w];
                        for c in 0..NR {
                            acc[r][c] += (av ^ br[c][w]).count_ones();
                        }
                    }
                }
                for r in 0..MR {
                    out[(i + r) * ldo + j..(i + r) * ldo + j + NR].copy_from_slice(&acc[r]);
                }
            } else {
                for r in 0..mr {
                    for c in 0..nr {
                        let ar = &a[(i + r) * wpr..(i + r + 1) * wpr];
                        let br = &b[(j + c) * wpr..(j + c + 1) * wpr];
                        out[(i + r) * ldo + j + c] = ar.iter().zip(br).map(|(x, y)| (x ^ y).count_ones()).sum();
                    }
                }
            }
            j += nr;
        }
        i += mr;
    }
}

/// Rows of exactly `W` words (the small `K` of convolutions: `W = words(9 C)`, 3 to 9 for
/// ResNet-20): each row of `A` is held in an array and dotted with every row of `B`, the word
/// loop fully unrolled.
#[inline(always)]
fn drive_fixed<const W: usize>(a: &[u64], m: usize, b: &[u64], n: usize, out: &mut [u32], ldo: usize) {
    for (i, ar) in a.chunks_exact(W).take(m).enumerate() {
        let ar: &[u64; W] = ar.try_into().expect("W words");
        let o = &mut out[i * ldo..i * ldo + n];
        for (oj, br) in o.iter_mut().zip(b.chunks_exact(W)) {
            let br: &[u64; W] = br.try_into().expect("W words");
            let mut acc = 0u32;
            for w in 0..W {
                acc += (ar[w] ^ br[w]).count_ones();
            }
            *oj = acc;
        }
    }
}

/// Dispatches to [`drive_fixed`] for `wpr <= 12`, else to the tiled loop.
#[inline(always)]
fn drive_any(a: &[u64], m: usize, b: &[u64], n: usize, wpr: usize, out: &mut [u32], ldo: usize) {
    match wpr {
        1 => drive_fixed::<1>(a, m, b, n, out, ldo),
        2 => drive_fixed::<2>(a, m, b, n, out, ldo),
        3 => drive_fixed::<3>(a, m, b, n, out, ldo),
        4 => drive_fixed::<4>(a, m, b, n, out, ldo),
        5 => drive_fixed::<5>(a, m, b, n, out, ldo),
        6 => drive_fixed::<6>(a, m, b, n, out, ldo),
        7 => drive_fixed::<7>(a, m, b, n, out, ldo),
        8 => drive_fixed::<8>(a, m, b, n, out, ldo),
        9 => drive_fixed::<9>(a, m, b, n, out, ldo),
        10 => drive_fixed::<10>(a, m, b, n, out, ldo),
        11 => drive_fixed::<11>(a, m, b, n, out, ldo),
        12 => drive_fixed::<12>(a, m, b, n, out, ldo),
        _ => drive_scalar(a, m, b, n, wpr, out, ldo),
    }
}

fn block_scalar(a: &[u64], m: usize, b: &[u64], n: usize, wpr: usize, out: &mut [u32], ldo: usize) {
    drive_any(a, m, b, n, wpr, out, ldo)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
fn block_popcnt(a: &[u64], m: usize, b: &[u64], n: usize, wpr: usize, out: &mut [u32], ldo: usize) {
    drive_any(a, m, b, n, wpr, out, ldo)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
fn block_avx2(a: &[u64], m: usize, b: &[u64], n: usize, wpr: usize, out: &mut [u32], ldo: usize) {
    use std::arch::x86_64::*;
    if wpr < 8 {
        // under two vectors per dot product the table lookups do not pay off
        return drive_any(a, m, b, n, wpr, out, ldo);
    }
    let vecs = wpr / 4;
    let tail = vecs * 4;
    let lut = _mm256_setr_epi8(
        0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
    );
    let low = _mm256_set1_epi8(0x0f);
    let zero = _mm256_setzero_si256();
    // byte-wise popcount of x, added to acc
    let pc8 = |acc: __m256i, x: __m256i| -> __m256i {
        let lo = _mm256_and_si256(x, low);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), low);
        _mm256_add_epi8(acc, _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi)))
    };
    let hsum = |v: __m256i| -> u32 {
        let s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        (_mm_cvtsi128_si64(s) + _mm_extract_epi64::<1>(s)) as u32
    };
    let tail_pc = |ar: &[u64], br: &[u64]| -> u32 { ar[tail..].iter().zip(&br[tail..]).map(|(x, y)| (x ^ y).count_ones()).sum() };
    const NB: usize = 4; // 1 x 4 tile: one row of A against four rows of B
    for i in 0..m {
        let ar = &a[i * wpr..(i + 1) * wpr];
        let ap = ar.as_ptr() as *const __m256i;
        let mut j = 0;
        while j + NB <= n {
            let br: [&[u64]; NB] = std::array::from_fn(|c| &b[(j + c) * wpr..(j + c + 1) * wpr]);
            let bp: [*const __m256i; NB] = std::array::from_fn(|c| br[c].as_ptr() as *const __m256i);
            let (mut s0, mut s1, mut s2, mut s3) = (zero, zero, zero, zero);
            let mut v = 0;
            while v < vecs {
                let end = (v + 31).min(vecs);
                let (mut c0, mut c1, mut c2, mut c3) = (zero, zero, zero, zero);
                while v < end {
                    // SAFETY: v < vecs, so the 4 words at 4 v are inside each row.
                    unsafe {
                        let x = _mm256_loadu_si256(ap.add(v));
                        c0 = pc8(c0, _mm256_xor_si256(x, _mm256_loadu_si256(bp[0].add(v))));
                        c1 = pc8(c1, _mm256_xor_si256(x, _mm256_loadu_si256(bp[1].add(v))));
                        c2 = pc8(c2, _mm256_xor_si256(x, _mm256_loadu_si256(bp[2].add(v))));
                        c3 = pc8(c3, _mm256_xor_si256(x, _mm256_loadu_si256(bp[3].add(v))));
                    }
                    v += 1;
                }
                s0 = _mm256_add_epi64(s0, _mm256_sad_epu8(c0, zero));
                s1 = _mm256_add_epi64(s1, _mm256_sad_epu8(c1, zero));
                s2 = _mm256_add_epi64(s2, _mm256_sad_epu8(c2, zero));
                s3 = _mm256_add_epi64(s3, _mm256_sad_epu8(c3, zero));
            }
            let o = &mut out[i * ldo + j..i * ldo + j + NB];
            o[0] = hsum(s0) + tail_pc(ar, br[0]);
            o[1] = hsum(s1) + tail_pc(ar, br[1]);
            o[2] = hsum(s2) + tail_pc(ar, br[2]);
            o[3] = hsum(s3) + tail_pc(ar, br[3]);
            j += NB;
        }
        for jj in j..n {
            let br = &b[jj * wpr..(jj + 1) * wpr];
            out[i * ldo + jj] = ar.iter().zip(br).map(|(x, y)| (x ^ y).count_ones()).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::testing::{random_signs, Lcg};

    fn reference(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<i32> {
        let mut c = vec![0i32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|t| (a[i * k + t] * b[j * k + t]) as i32).sum();
            }
        }
        c
    }

    #[test]
    fn every_kernel_matches_the_float_reference() {
        let mut rng = Lcg::new(7);
        // K around word and vector boundaries, M and N not multiples of the tiles
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 63),
            (7, 9, 64),
            (5, 6, 65),
            (66, 7, 200),
            (9, 13, 256),
            (4, 4, 257),
            (70, 11, 2100),
        ] {
            let a = random_signs(&mut rng, m * k);
            let b = random_signs(&mut rng, n * k);
            let want = reference(&a, &b, m, n, k);
            let (pa, pb) = (PackedMatrix::from_f32(&a, m, k), PackedMatrix::from_f32(&b, n, k));
            for kernel in Kernel::available() {
                assert_eq!(bgemm(&pa, &pb, kernel), want, "kernel {} at M {m} N {n} K {k}", kernel.name());
            }
        }
    }

    #[test]
    fn mismatched_k_is_rejected() {
        let a = PackedMatrix::from_f32(&[1.0; 10], 1, 10);
        let b = PackedMatrix::from_f32(&[1.0; 11], 1, 11);
        let r = std::panic::catch_unwind(|| bgemm(&a, &b, Kernel::Portable));
        assert!(r.is_err());
    }
}
