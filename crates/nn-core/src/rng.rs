//! Reproducible random numbers.
//!
//! candle's CPU backend cannot be seeded (`Device::set_seed` bails), so every random tensor in
//! nn-core (initialisation, dropout masks, noise) is drawn on the host from a [`ChaCha8Rng`]
//! seeded by the user and then moved to the target device. ChaCha8 is portable and its stream is
//! fixed across platforms and `rand` versions, which makes runs reproducible bit for bit.

use rand::SeedableRng;
pub use rand_chacha::ChaCha8Rng;

/// A deterministic generator for `seed`.
pub fn seeded(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A deterministic generator for an independent stream derived from `seed` and `stream`
/// (e.g. the epoch, a client id, a layer index): streams with different ids do not overlap.
pub fn derived(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// splitmix64 mixing of several integers into one seed (cheap, well distributed).
pub fn mix_seed(parts: &[u64]) -> u64 {
    let mut h = 0x9E37_79B9_7F4A_7C15u64;
    for &p in parts {
        h ^= p.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(h << 6).wrapping_add(h >> 2);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}
