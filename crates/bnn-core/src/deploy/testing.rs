//! Small deterministic helpers for the deploy tests (no `rand` dependency in this crate).

/// A 64-bit linear congruential generator (Knuth's MMIX constants), high bits used.
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    /// Uniform in `[-1, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
    }
}

/// `n` random values in `{-1, +1}`.
pub fn random_signs(rng: &mut Lcg, n: usize) -> Vec<f32> {
    (0..n).map(|_| if rng.next_u64() & 1 == 1 { 1.0 } else { -1.0 }).collect()
}

/// `n` random values in `[-1, 1)`.
pub fn random_values(rng: &mut Lcg, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.uniform()).collect()
}
