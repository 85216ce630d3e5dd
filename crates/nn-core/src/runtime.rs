//! Process-wide CPU runtime settings to apply once at program start: [`tune`].
//!
//! Two things outside nn-core's own kernels cost measurable time on a small CPU:
//! - glibc's allocator returning large freed buffers to the kernel (see [`crate::alloc`]);
//! - candle 0.11's elementwise thread pool: after each binary op (`a + b`, broadcast adds)
//!   its worker threads spin for 25,000 iterations before parking (`candle-bp-*` threads),
//!   which on 2 cores competes with the rayon threads that run every other op. Profiles of a
//!   ViT-Ti forward showed 12.6% of all CPU samples and a ResNet-20 training step 6.4% in
//!   that spinning; with the spin limit at 0 the ViT-Ti forward ran 37.4-37.9 -> 38.8-41.3
//!   img/s (three alternating runs each, 2 threads, `cargo xtask vit bench`).

/// candle's environment variable for its elementwise pool's spin limit.
pub const CANDLE_SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Sets candle's elementwise worker spin limit to 0 (park right away) unless the variable is
/// already set, in which case the user's value is kept. Returns the variable's value (candle
/// falls back to its default of 25,000 if that does not parse as a number).
///
/// Call it before candle's first elementwise op (the pool reads the variable when it starts)
/// and while the program has a single thread: it writes the process environment, which races
/// with C code reading it on other threads (`std::env::set_var` is `unsafe` in edition 2024
/// for that reason).
pub fn tune_candle_pool() -> String {
    let (value, set) = spin_limit_to_use(std::env::var(CANDLE_SPIN_LIMIT_VAR).ok());
    if set {
        std::env::set_var(CANDLE_SPIN_LIMIT_VAR, &value);
    }
    value
}

/// The spin limit to use given the variable's current value, and whether it must be set.
fn spin_limit_to_use(current: Option<String>) -> (String, bool) {
    match current {
        Some(v) => (v, false),
        None => ("0".into(), true),
    }
}

/// Applies [`crate::alloc::tune_allocator`] and [`tune_candle_pool`]; call first thing in
/// `main` of a training or benchmark program.
pub fn tune() {
    crate::alloc::tune_allocator();
    tune_candle_pool();
}

/// Limits every CPU thread pool of the process to `threads` threads: rayon's global pool (which
/// runs nn-core's kernels), and candle's own two notions of the thread count, which read the
/// environment instead of rayon: `RAYON_NUM_THREADS` (the thread count candle's matmul hands to
/// the gemm crate) and `CANDLE_NUM_THREADS` (candle's elementwise pool, `threads - 1` workers
/// next to the calling thread). Without the variables, a `--threads 1` process still ran
/// candle's binary ops on two threads and its calling thread spun while waiting for the
/// second one: 10.9% of the samples of a 1-thread binary ResNet-20 training step on a loaded
/// machine.
///
/// Call it once, at program start, before the first candle op and while the program has a
/// single thread (it writes the process environment, see [`tune_candle_pool`]).
pub fn set_threads(threads: usize) -> anyhow::Result<()> {
    if threads == 0 {
        anyhow::bail!("the thread count must be at least 1");
    }
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        std::env::set_var(var, threads.to_string());
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| anyhow::anyhow!("setting up {threads} worker thread(s): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_value_the_user_set_and_defaults_to_zero() {
        // (the pure rule: the tests share one process environment)
        assert_eq!(spin_limit_to_use(Some("123".into())), ("123".to_string(), false));
        assert_eq!(spin_limit_to_use(None), ("0".to_string(), true));
    }
}
