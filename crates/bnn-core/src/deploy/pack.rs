//! Bit packing of ±1 values into `u64` words along the reduction dimension.
//!
//! Convention (the same as Larq Compute Engine's): bit `1` encodes `-1`, bit `0` encodes `+1`,
//! and a value `x` is `+1` when `x >= 0` (so `sign(0) = +1`, exactly like bnn-core's
//! [`Quantizer`](crate::Quantizer) forward; NaN packs as `-1`, as `NaN >= 0` is false there too).
//! Bit `j` of a row lives in word `j / 64` at position `j % 64`. The unused high bits of the
//! last word of a row are always 0 in both operands of a product, so they add nothing to the
//! popcount of an `xor` and a dot product over `K` true elements is exactly
//! `K - 2 * popcount(a xor b)`.

use rayon::prelude::*;

/// Number of `u64` words that hold `k` bits.
#[inline]
pub fn words(k: usize) -> usize {
    k.div_ceil(64)
}

/// The bit of one value: 1 for `-1` (`x < 0` or NaN), 0 for `+1` (`x >= 0`).
#[inline]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // `!(x >= 0)` is deliberate: NaN packs as -1
pub fn sign_bit(x: f32) -> u64 {
    (!(x >= 0.0)) as u64
}

/// A row-major matrix of ±1 values, `rows x k`, each row packed into `words(k)` words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedMatrix {
    pub rows: usize,
    /// True length of each row in bits (the reduction dimension `K`).
    pub k: usize,
    /// `rows * words(k)` words.
    pub data: Vec<u64>,
}

impl PackedMatrix {
    /// Packs the signs of a row-major `rows x k` float matrix.
    pub fn from_f32(x: &[f32], rows: usize, k: usize) -> Self {
        assert_eq!(
            x.len(),
            rows * k,
            "PackedMatrix::from_f32: {} values for a {rows} x {k} matrix",
            x.len()
        );
        let wpr = words(k);
        let mut data = vec![0u64; rows * wpr];
        if k > 0 {
            data.par_chunks_mut(wpr * 64).zip(x.par_chunks(k * 64)).for_each(|(d, xs)| {
                for (dr, xr) in d.chunks_mut(wpr).zip(xs.chunks(k)) {
                    pack_into(xr, dr);
                }
            });
        }
        Self { rows, k, data }
    }

    /// Wraps already packed words (checks the length and that padding bits are 0).
    pub fn from_words(rows: usize, k: usize, data: Vec<u64>) -> Result<Self, String> {
        let wpr = words(k);
        if data.len() != rows * wpr {
            return Err(format!("packed matrix {rows} x {k} needs {} words, got {}", rows * wpr, data.len()));
        }
        let m = Self { rows, k, data };
        if k % 64 != 0 {
            let mask = !((1u64 << (k % 64)) - 1);
            if (0..rows).any(|r| m.row(r)[wpr - 1] & mask != 0) {
                return Err(format!("packed matrix {rows} x {k}: padding bits of a row are not zero"));
            }
        }
        Ok(m)
    }

    /// Words per row.
    #[inline]
    pub fn words_per_row(&self) -> usize {
        words(self.k)
    }

    #[inline]
    pub fn row(&self, r: usize) -> &[u64] {
        let w = self.words_per_row();
        &self.data[r * w..(r + 1) * w]
    }

    /// Unpacks back to ±1 floats (tests, debugging).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.k);
        for r in 0..self.rows {
            let row = self.row(r);
            for j in 0..self.k {
                out.push(if (row[j / 64] >> (j % 64)) & 1 == 1 { -1.0 } else { 1.0 });
            }
        }
        out
    }
}

/// Packs the signs of `x` into `out` (`words(x.len())` words; unused bits cleared). With AVX2,
/// eight values at a time: `vcmpps` with "not greater or equal, unordered" (true for `x < 0`
/// and NaN, false for `-0.0`) and `vmovmskps`.
pub fn pack_into(x: &[f32], out: &mut [u64]) {
    assert_eq!(out.len(), words(x.len()), "pack_into: {} words for {} values", out.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available.
        unsafe { pack_avx2(x, out) };
        return;
    }
    pack_scalar(x, out)
}

fn pack_scalar(x: &[f32], out: &mut [u64]) {
    for (w, chunk) in out.iter_mut().zip(x.chunks(64)) {
        let mut bits = 0u64;
        for (j, &v) in chunk.iter().enumerate() {
            bits |= sign_bit(v) << j;
        }
        *w = bits;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_avx2(x: &[f32], out: &mut [u64]) {
    use std::arch::x86_64::*;
    let zero = _mm256_setzero_ps();
    for (w, chunk) in out.iter_mut().zip(x.chunks(64)) {
        let groups = chunk.len() / 8;
        let mut bits = 0u64;
        for g in 0..groups {
            // SAFETY: g * 8 + 8 <= chunk.len().
            let v = _mm256_loadu_ps(chunk.as_ptr().add(g * 8));
            let m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NGE_UQ>(v, zero)) as u32 as u64;
            bits |= m << (g * 8);
        }
        for (j, &v) in chunk.iter().enumerate().skip(groups * 8) {
            bits |= sign_bit(v) << j;
        }
        *w = bits;
    }
}

/// Appends bit fields to a row of words (the bit-level im2col of [`crate::deploy::conv`]).
pub struct BitWriter<'a> {
    out: &'a mut [u64],
    pos: usize,
}

impl<'a> BitWriter<'a> {
    /// Starts writing at bit 0 of `out`, which must be zeroed.
    pub fn new(out: &'a mut [u64]) -> Self {
        Self { out, pos: 0 }
    }

    /// Appends the low `n` bits of `v` (`n <= 64`, higher bits of `v` must be 0).
    #[inline]
    pub fn push(&mut self, v: u64, n: usize) {
        if n == 0 {
            return;
        }
        let (w, b) = (self.pos / 64, self.pos % 64);
        self.out[w] |= v << b;
        if b + n > 64 {
            self.out[w + 1] |= v >> (64 - b);
        }
        self.pos += n;
    }

    /// Appends `n` zero bits (+1 values).
    #[inline]
    pub fn skip(&mut self, n: usize) {
        self.pos += n;
    }

    /// Appends the first `n` bits of a packed bit string.
    #[inline]
    pub fn push_words(&mut self, src: &[u64], n: usize) {
        let full = n / 64;
        for &s in &src[..full] {
            self.push(s, 64);
        }
        if n % 64 != 0 {
            self.push(src[full], n % 64);
        }
    }

    /// Bits written so far.
    pub fn len(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_roundtrip_and_sign_convention() {
        let x: Vec<f32> = (0..3 * 70).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
        let p = PackedMatrix::from_f32(&x, 3, 70);
        assert_eq!(p.words_per_row(), 2);
        let back = p.to_f32();
        for (a, b) in x.iter().zip(&back) {
            assert_eq!(*b, if *a >= 0.0 { 1.0 } else { -1.0 });
        }
        // sign(0) = +1 (bit 0), -0.0 too; NaN is -1
        assert_eq!(sign_bit(0.0), 0);
        assert_eq!(sign_bit(-0.0), 0);
        assert_eq!(sign_bit(f32::NAN), 1);
        // padding bits stay zero
        assert_eq!(p.row(1)[1] >> 6, 0);
        assert!(PackedMatrix::from_words(1, 70, vec![0, 1 << 10]).is_err());
        assert!(PackedMatrix::from_words(1, 70, vec![0]).is_err());
    }

    #[test]
    fn simd_and_scalar_packing_agree() {
        let mut x: Vec<f32> = (0..213).map(|i| ((i * 7919 % 23) as f32) - 11.0).collect();
        x[3] = -0.0;
        x[70] = f32::NAN;
        x[71] = 0.0;
        x[72] = f32::NEG_INFINITY;
        let mut a = vec![0u64; words(x.len())];
        let mut b = a.clone();
        pack_into(&x, &mut a);
        pack_scalar(&x, &mut b);
        assert_eq!(a, b);
        assert_eq!((a[0] >> 3) & 1, 0, "-0.0 is +1");
        assert_eq!((a[1] >> 6) & 0b111, 0b101, "NaN -1, 0.0 +1, -inf -1");
    }

    #[test]
    fn bit_writer_concatenates_fields() {
        let mut out = vec![0u64; 3];
        let mut w = BitWriter::new(&mut out);
        w.push(0b101, 3);
        w.skip(60);
        w.push(0b11, 2); // crosses the word boundary at bit 63
        w.push_words(&[u64::MAX, 0b1], 65);
        assert_eq!(w.len(), 3 + 60 + 2 + 65);
        assert_eq!(out[0], 0b101 | (1 << 63));
        assert_eq!(out[1] & 1, 1);
        // the u64::MAX field starts at bit 65 = word 1 bit 1
        assert_eq!(out[1] >> 1, u64::MAX >> 1);
        assert_eq!(out[2] & 0b11, 0b11);
    }
}
