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
//! - [`Kernel::Avx2`]: popcount by a 16-entry nibble table looked up with `vpshufb`
//!   (`_mm256_shuffle_epi8`): both operands are split once into low- and high-nibble planes,
//!   so a 256-bit step is two `xor`s, two lookups and two byte adds; a `2 x 4` register tile;
//!   byte counts widened with `vpsadbw` every 31 steps; the words that do not fill a 256-bit
//!   vector go through `popcnt`. With 4-5 vectors per row (`K` from 1024 to 1535) a row of `A`
//!   is held in registers instead and `B` streamed from L1, four columns at a time (the tile's
//!   setup and reductions cost more than its step loop at so few steps). Below 16 words per
//!   row it uses the `popcnt` loops.
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
/// Bytes of split `B` planes per block for the row-in-registers AVX2 kernel (L1 is 32 KiB).
const L1_B_BYTES: usize = 20 * 1024;

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
    /// available, otherwise `avx2` where available, then `popcnt`, then portable. The AVX2
    /// kernel runs the `popcnt` loops below 16 words per row (every convolution of ResNet-20)
    /// and its nibble-plane path above, which was 1.9x faster than `popcnt` at `K = 1024` and
    /// 2.2x at `K = 4096` on this project's machine (`cargo xtask bnn bench-gemm`,
    /// docs/results/bnn-deploy.md).
    pub fn best() -> Kernel {
        if let Ok(s) = std::env::var("BNN_KERNEL") {
            if let Some(k) = Kernel::parse(&s).filter(|k| k.is_available()) {
                return k;
            }
        }
        [Kernel::Avx2, Kernel::Popcnt]
            .into_iter()
            .find(|k| k.is_available())
            .unwrap_or(Kernel::Portable)
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
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx2 && wpr >= 16 && kernel.is_available() {
        // split B into nibble planes once for every tile of A (not once per tile)
        // SAFETY: AVX2 and popcnt availability checked just above.
        unsafe { bgemm_avx2_presplit(a, b, nb, out) };
        return;
    }
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

/// [`bgemm_into`] with the AVX2 kernel, `B` split into nibble planes once up front.
///
/// # Safety
/// AVX2 and popcnt must be available. (The caller uses it for `wpr >= 16` only, where it is
/// faster; smaller rows are still correct.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
unsafe fn bgemm_avx2_presplit(a: &PackedMatrix, b: &PackedMatrix, nb: usize, out: &mut [i32]) {
    let (m, n, wpr, k) = (a.rows, b.rows, a.words_per_row(), a.k as i32);
    let vecs = avx2_vecs(wpr);
    // the row kernel (4-5 vectors per row) streams B past a row held in registers: keep the
    // block's split planes in L1
    let nb = if (4..=5).contains(&vecs) {
        (L1_B_BYTES / (64 * vecs)).clamp(4, n.max(4)) / 4 * 4
    } else {
        nb
    };
    let sb = split_nibbles(&b.data, n, wpr, vecs);
    out.par_chunks_mut(ROW_TILE * n).enumerate().for_each(|(t, tile)| {
        let i0 = t * ROW_TILE;
        let rows = tile.len() / n;
        let pc: &mut [u32] = bytemuck_i32_as_u32(tile);
        let ar = &a.data[i0 * wpr..(i0 + rows) * wpr];
        // (the closure inherits the function's target features)
        let sa = split_nibbles(ar, rows, wpr, vecs);
        for j0 in (0..n).step_by(nb) {
            let cols = nb.min(n - j0);
            avx2_split_block(
                &sa,
                ar,
                rows,
                &sb[j0 * 2 * vecs..(j0 + cols) * 2 * vecs],
                &b.data[j0 * wpr..(j0 + cols) * wpr],
                cols,
                wpr,
                vecs,
                &mut pc[j0..],
                n,
            );
        }
        for v in tile.iter_mut() {
            *v = k - 2 * (*v as u32 as i32);
        }
    });
    debug_assert_eq!(out.len(), m * n);
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
#[inline(never)]
fn block_popcnt(a: &[u64], m: usize, b: &[u64], n: usize, wpr: usize, out: &mut [u32], ldo: usize) {
    drive_any(a, m, b, n, wpr, out, ldo)
}

/// The AVX2 kernel. Both operands are first split into nibble planes (`x & 0x0f` and
/// `(x >> 4) & 0x0f` per byte, see [`split_nibbles`]): since `(a ^ b) & 0x0f = (a & 0x0f) ^
/// (b & 0x0f)`, the per-byte popcount of `a ^ b` is then `lut[a_lo ^ b_lo] + lut[a_hi ^ b_hi]`
/// with two `vpshufb` lookups, six vector operations per 256 bits instead of eight, and the
/// splitting is paid once per row instead of once per pair of rows. A `2 x 4` register tile
/// (two rows of `A` against four of `B`, every load used twice), columns outer so that the
/// tile's rows of `B` stay in L1 while the rows of `A` stream past. Byte counts are widened
/// with `vpsadbw` every 31 steps (each step adds at most 8 per byte, 31 * 8 < 256) and the
/// totals reduced four at a time. Words that do not fill a vector go through `popcnt`.
/// (A variant that also ran two more columns with scalar `popcnt` in the same loop, to use the
/// idle integer ALUs, was slower on this machine: 7.2 vs 4.9 ms at 1024^3, one thread.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
fn block_avx2(a: &[u64], m: usize, b: &[u64], n: usize, wpr: usize, out: &mut [u32], ldo: usize) {
    if wpr < 16 {
        // under four vectors per dot product the splitting and the reductions do not pay off:
        // at K = 576 (9 words, ResNet-20's last stage) this path took 2.66 ms against 1.62 ms
        // for the popcnt loops (docs/results/bnn-deploy.md, 2026-12-05). Through the separate
        // popcnt-only function: compiled inline here, LLVM vectorises those loops with AVX2
        // and a table popcount, which is slower on this machine.
        return block_popcnt(a, m, b, n, wpr, out, ldo);
    }
    let vecs = avx2_vecs(wpr);
    let sa = split_nibbles(a, m, wpr, vecs);
    let sb = split_nibbles(b, n, wpr, vecs);
    avx2_split_block(&sa, a, m, &sb, b, n, wpr, vecs, out, ldo)
}

/// The body of [`block_avx2`] on operands already split into nibble planes (`sa`, `sb` from
/// [`split_nibbles`] of the first `wpr / 4` vectors of every row of `a` and `b`); the raw
/// rows are still needed for the words past the last whole vector.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
#[allow(clippy::too_many_arguments)]
fn avx2_split_block(
    sa: &[std::arch::x86_64::__m256i],
    a: &[u64],
    m: usize,
    sb: &[std::arch::x86_64::__m256i],
    b: &[u64],
    n: usize,
    wpr: usize,
    vecs: usize,
    out: &mut [u32],
    ldo: usize,
) {
    let tail = vecs * 4;
    assert!(
        sa.len() >= m * 2 * vecs && sb.len() >= n * 2 * vecs,
        "avx2_split_block: planes too short"
    );
    // few vectors per row (K from 1024 to 1535): a row of A fits in registers
    // SAFETY: AVX2 and popcnt are enabled here; the plane lengths are asserted above.
    let ops = SplitOperands { sa, a, m, sb, b, n, wpr };
    match vecs {
        4 => return unsafe { avx2_row_block::<4, 4>(&ops, out, ldo) },
        5 => return unsafe { avx2_row_block::<5, 2>(&ops, out, ldo) },
        _ => {}
    }
    let dot = |i: usize, j: usize, from: usize| row_dot_from(a, b, wpr, i, j, from);
    // columns outer, rows inner: the tile's four rows of B stay in L1 while the rows of A
    // (a task's tile of at most ROW_TILE rows) stream past them
    let full = n / 4 * 4;
    for j in (0..full).step_by(4) {
        let mut i = 0;
        while i < m {
            let rows = 2.min(m - i);
            let mut sums = [[0u32; 4]; 2];
            let t = Tile { sa, sb, vecs, i, j };
            // SAFETY: rows i..i+rows and columns j..j+4 exist in the split planes (asserted above).
            unsafe {
                if rows == 2 {
                    t.run::<2>(&mut sums)
                } else {
                    t.run::<1>(&mut sums)
                }
            }
            for (r, row) in sums.iter().enumerate().take(rows) {
                let o = &mut out[(i + r) * ldo + j..][..4];
                o.copy_from_slice(row);
                if tail < wpr {
                    for (c, v) in o.iter_mut().enumerate() {
                        *v += dot(i + r, j + c, tail);
                    }
                }
            }
            i += rows;
        }
    }
    for r in 0..m {
        for jj in full..n {
            out[r * ldo + jj] = dot(r, jj, 0);
        }
    }
}

/// [`avx2_split_block`] for `V` (4 or 5) vectors per row: one row of `A` at a time with both
/// of its nibble planes held in registers (`2 V` of the 16 `ymm` registers), against `G`
/// columns of `B` per step. With so few steps per dot product the `2 x 4` tile spent over a
/// third of its time outside its step loop (setting up the tile, widening and storing the
/// eight sums); here the per-pair overhead is one `vpsadbw` and a quarter of a four-way
/// reduction. `B` is walked in blocks that fit L1 (see `bgemm_avx2_presplit`).
///
/// # Safety
/// AVX2 and popcnt must be available; `sa` must hold `m` rows and `sb` `n` rows of `2 V`
/// vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
unsafe fn avx2_row_block<const V: usize, const G: usize>(ops: &SplitOperands, out: &mut [u32], ldo: usize) {
    use std::arch::x86_64::*;
    let SplitOperands { sa, a, m, sb, b, n, wpr } = *ops;
    debug_assert!(G <= 4 && V * 8 < 256, "byte counters must not overflow");
    debug_assert!(sa.len() >= m * 2 * V && sb.len() >= n * 2 * V);
    let lut = _mm256_setr_epi8(
        0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
    );
    let zero = _mm256_setzero_si256();
    let tail = 4 * V;
    let dot = |i: usize, j: usize, from: usize| row_dot_from(a, b, wpr, i, j, from);
    let full = n / G * G;
    for i in 0..m {
        let pa = sa.as_ptr().add(i * 2 * V);
        let al: [__m256i; V] = std::array::from_fn(|v| *pa.add(v));
        let ah: [__m256i; V] = std::array::from_fn(|v| *pa.add(V + v));
        let orow = &mut out[i * ldo..i * ldo + n];
        let mut j = 0;
        while j < full {
            let mut sums = [zero; 4];
            for (c, sum) in sums.iter_mut().enumerate().take(G) {
                let pb = sb.as_ptr().add((j + c) * 2 * V);
                let mut acc = zero;
                for v in 0..V {
                    let lo = _mm256_shuffle_epi8(lut, _mm256_xor_si256(al[v], *pb.add(v)));
                    let hi = _mm256_shuffle_epi8(lut, _mm256_xor_si256(ah[v], *pb.add(V + v)));
                    acc = _mm256_add_epi8(acc, _mm256_add_epi8(lo, hi));
                }
                *sum = _mm256_sad_epu8(acc, zero);
            }
            let t = totals4(sums);
            let mut four = [0u32; 4];
            _mm_storeu_si128(four.as_mut_ptr() as *mut __m128i, t);
            orow[j..j + G].copy_from_slice(&four[..G]);
            j += G;
        }
        if tail < wpr {
            for (jj, o) in orow.iter_mut().enumerate().take(full) {
                *o += dot(i, jj, tail);
            }
        }
        for (jj, o) in orow.iter_mut().enumerate().skip(full) {
            *o = dot(i, jj, 0);
        }
    }
}

/// The operands of an AVX2 block: `m` rows of `a` and `n` rows of `b` (`wpr` words each) and
/// their nibble planes `sa`, `sb` from [`split_nibbles`].
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct SplitOperands<'a> {
    sa: &'a [std::arch::x86_64::__m256i],
    a: &'a [u64],
    m: usize,
    sb: &'a [std::arch::x86_64::__m256i],
    b: &'a [u64],
    n: usize,
    wpr: usize,
}

/// The four totals of four vectors of `u64` lane sums (from `vpsadbw`), as `u32`s: pair the
/// lanes of `(s0, s1)` and `(s2, s3)` as `u32` halves, add the two `u64` halves of every
/// 128-bit lane, then the two 128-bit lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn totals4([s0, s1, s2, s3]: [std::arch::x86_64::__m256i; 4]) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::*;
    let t01 = _mm256_or_si256(s0, _mm256_slli_epi64::<32>(s1));
    let t23 = _mm256_or_si256(s2, _mm256_slli_epi64::<32>(s3));
    let u = _mm256_add_epi32(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23));
    _mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256::<1>(u))
}

/// `popcount(a_i xor b_j)` over words `from..wpr` of row `i` of `a` and row `j` of `b` (the
/// words past the AVX2 kernels' last whole vector; `popcnt` where the caller enables it).
#[inline(always)]
fn row_dot_from(a: &[u64], b: &[u64], wpr: usize, i: usize, j: usize, from: usize) -> u32 {
    let (ar, br) = (&a[i * wpr..(i + 1) * wpr], &b[j * wpr..(j + 1) * wpr]);
    ar[from..].iter().zip(&br[from..]).map(|(x, y)| (x ^ y).count_ones()).sum()
}

/// 256-bit vectors per row for the AVX2 part of [`block_avx2`] (the words after them go
/// through `popcnt`). Handing more words to scalar `popcnt`, on the integer units the vector
/// loop leaves idle, was slower on this machine: 2.6 and 3.5 ms instead of 1.7 ms at 1024^3
/// with 4 and 8 of the 16 words per row (2 threads, `--example gemm_kernel`).
fn avx2_vecs(wpr: usize) -> usize {
    wpr / 4
}

/// One register tile of [`block_avx2`]: rows `i..` of split `A`, columns `j..` of split `B`.
#[cfg(target_arch = "x86_64")]
struct Tile<'a> {
    sa: &'a [std::arch::x86_64::__m256i],
    sb: &'a [std::arch::x86_64::__m256i],
    vecs: usize,
    i: usize,
    j: usize,
}

#[cfg(target_arch = "x86_64")]
impl Tile<'_> {
    /// Popcounts over the first `4 vecs` words of `R` rows of `A` against 4 rows of `B` into
    /// `sums[r]`.
    ///
    /// # Safety
    /// AVX2 must be available; `sa` must hold rows `i..i + R` and `sb` rows `j..j + 4`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn run<const R: usize>(&self, sums: &mut [[u32; 4]; 2]) {
        use std::arch::x86_64::*;
        let lut = _mm256_setr_epi8(
            0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
        );
        let zero = _mm256_setzero_si256();
        // (a compile-time vector count that unrolls the step loop made LLVM spill accumulators
        // to the stack: slower)
        let (vecs, i, j) = (self.vecs, self.i, self.j);
        let rl = 2 * vecs;
        debug_assert!(self.sa.len() >= (i + R) * rl && self.sb.len() >= (j + 4) * rl);
        let pa: [*const __m256i; R] = std::array::from_fn(|r| self.sa.as_ptr().add((i + r) * rl));
        let pb: [*const __m256i; 4] = std::array::from_fn(|c| self.sb.as_ptr().add((j + c) * rl));
        // byte counts of steps v..end (at most 31 steps, so no byte overflows)
        let steps = |mut v: usize, end: usize| -> [[__m256i; 4]; R] {
            let mut acc = [[zero; 4]; R];
            while v < end {
                let al: [__m256i; R] = std::array::from_fn(|r| *pa[r].add(v));
                let ah: [__m256i; R] = std::array::from_fn(|r| *pa[r].add(vecs + v));
                for c in 0..4 {
                    let (bl, bh) = (*pb[c].add(v), *pb[c].add(vecs + v));
                    for r in 0..R {
                        let lo = _mm256_shuffle_epi8(lut, _mm256_xor_si256(al[r], bl));
                        let hi = _mm256_shuffle_epi8(lut, _mm256_xor_si256(ah[r], bh));
                        acc[r][c] = _mm256_add_epi8(acc[r][c], _mm256_add_epi8(lo, hi));
                    }
                }
                v += 1;
            }
            acc
        };
        let mut wide = [[zero; 4]; R];
        if vecs <= 31 {
            // one flush (K <= 7936): no running u64 sums to add to
            let acc = steps(0, vecs);
            for r in 0..R {
                for c in 0..4 {
                    wide[r][c] = _mm256_sad_epu8(acc[r][c], zero);
                }
            }
        } else {
            let mut v = 0;
            while v < vecs {
                let end = (v + 31).min(vecs);
                let acc = steps(v, end);
                for r in 0..R {
                    for c in 0..4 {
                        wide[r][c] = _mm256_add_epi64(wide[r][c], _mm256_sad_epu8(acc[r][c], zero));
                    }
                }
                v = end;
            }
        }
        for r in 0..R {
            _mm_storeu_si128(sums[r].as_mut_ptr() as *mut __m128i, totals4(wide[r]));
        }
    }
}

/// The first `vecs` 256-bit vectors of each of `rows` rows of `x` (`wpr` words each) as two
/// nibble planes: row `r` becomes vectors `[2 r vecs, (2 r + 1) vecs)` holding the low
/// nibbles of every byte and `[(2 r + 1) vecs, (2 r + 2) vecs)` the high nibbles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn split_nibbles(x: &[u64], rows: usize, wpr: usize, vecs: usize) -> Vec<std::arch::x86_64::__m256i> {
    use std::arch::x86_64::*;
    assert!(x.len() >= rows * wpr && vecs * 4 <= wpr);
    let low = _mm256_set1_epi8(0x0f);
    let mut out = Vec::with_capacity(rows * 2 * vecs);
    for r in 0..rows {
        let p = x[r * wpr..].as_ptr() as *const __m256i;
        // SAFETY: v < vecs and 4 vecs <= wpr: each load stays inside row r.
        unsafe {
            for v in 0..vecs {
                out.push(_mm256_and_si256(_mm256_loadu_si256(p.add(v)), low));
            }
            for v in 0..vecs {
                out.push(_mm256_and_si256(_mm256_srli_epi16::<4>(_mm256_loadu_si256(p.add(v))), low));
            }
        }
    }
    out
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
            // the AVX2 tile: odd M, N not a multiple of 4, and more than 31 vectors per row
            (5, 7, 512),
            (2, 4, 1024),
            (3, 6, 8200),
            (4, 10, 1088),
            (3, 11, 1600),
            // the row-in-registers kernel: 4 and 5 vectors per row, with tail words, N not a
            // multiple of its column group, more columns than one L1 block of B
            (3, 7, 1024),
            (2, 9, 1100),
            (3, 5, 1280),
            (2, 7, 1400),
            (65, 203, 1024),
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
    fn every_kernel_matches_portable_on_blocks_with_leftover_columns() {
        // xor_popcount_block directly: full 4-column tiles plus leftover columns, an output
        // stride wider than N, and more than 31 vectors per row (several byte-counter flushes)
        let mut rng = Lcg::new(11);
        let (m, n, k, ldo) = (5, 7, 8200, 9);
        let (a, b) = (random_signs(&mut rng, m * k), random_signs(&mut rng, n * k));
        let (pa, pb) = (PackedMatrix::from_f32(&a, m, k), PackedMatrix::from_f32(&b, n, k));
        let wpr = pa.words_per_row();
        let mut want = vec![u32::MAX; m * ldo];
        xor_popcount_block(Kernel::Portable, &pa.data, m, &pb.data, n, wpr, &mut want, ldo);
        let kernels = Kernel::available();
        eprintln!("kernels tested: {:?}", kernels.iter().map(|k| k.name()).collect::<Vec<_>>());
        for kernel in kernels {
            let mut got = vec![u32::MAX; m * ldo];
            xor_popcount_block(kernel, &pa.data, m, &pb.data, n, wpr, &mut got, ldo);
            assert_eq!(got, want, "kernel {}", kernel.name());
        }
    }

    #[test]
    fn byte_counters_do_not_overflow_when_every_bit_differs() {
        // all bits differ: every byte counter gains the maximum 8 per step, the worst case of
        // the 31-step flush
        for &(m, n, k) in &[(3, 5, 8192), (2, 4, 31 * 256), (1, 4, 32 * 256 + 64)] {
            let pa = PackedMatrix::from_f32(&vec![-1.0; m * k], m, k);
            let pb = PackedMatrix::from_f32(&vec![1.0; n * k], n, k);
            for kernel in Kernel::available() {
                assert_eq!(bgemm(&pa, &pb, kernel), vec![-(k as i32); m * n], "kernel {} K {k}", kernel.name());
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
