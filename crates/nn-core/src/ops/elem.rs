//! Element-type plumbing shared by the CPU kernels: a tiny float trait implemented for
//! `f32` and `f64`, thread-local scratch buffers, storage access helpers and a thin
//! wrapper over the `gemm` crate.

use candle_core::{CpuStorage, Layout, Result};
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

/// A `len`-element `f32` output written in parallel chunks of `chunk` elements by
/// `fill(chunk_index, chunk)`. Unlike `vec![0.0; len]` nothing is zeroed first: for the
/// single-pass elementwise ops that pass was a tenth of their time.
///
/// # Safety
/// `fill` must write every element of the chunk it is given; unwritten elements would be read
/// as uninitialised memory. Nothing checks this.
pub(crate) unsafe fn par_fill_f32(len: usize, chunk: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    let mut y: Vec<f32> = Vec::with_capacity(len);
    y.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, o)| fill(i, o));
    // SAFETY: every element of the first `len` was initialised by `fill` (the caller's contract).
    unsafe { y.set_len(len) };
    y
}

/// A raw output pointer shared by parallel tasks that write disjoint ranges.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub *mut MaybeUninit<f32>);
// SAFETY: used only by tasks that write disjoint element ranges.
unsafe impl Sync for SharedOut {}
unsafe impl Send for SharedOut {}

impl SharedOut {
    /// The `len` elements from `off`.
    ///
    /// # Safety
    /// No other task may access that range at the same time, and it must lie in the buffer.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn range(&self, off: usize, len: usize) -> &mut [MaybeUninit<f32>] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}

/// Floating point element handled by the CPU kernels (`f32` for training, `f64` for
/// high-precision gradient checks).
pub(crate) trait Elem:
    Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    /// Whether this is `f32` (for hand-written f32 SIMD paths).
    const IS_F32: bool;
    fn from_f64(v: f64) -> Self;
    /// Borrows the whole storage buffer if it has this element type.
    fn storage_slice(s: &CpuStorage) -> Option<&[Self]>;
    /// Wraps a result buffer into a storage.
    fn into_storage(v: Vec<Self>) -> CpuStorage;
    /// Runs `f` with a thread-local scratch buffer of at least `len` elements (contents
    /// unspecified). The buffer is reused across calls: no allocation per image.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
    /// A second, independent scratch buffer (usable inside [`Elem::with_scratch`]).
    fn with_scratch2<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

thread_local! {
    static SCRATCH_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_F64: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
    static SCRATCH2_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH2_F64: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

macro_rules! impl_elem {
    ($t:ty, $variant:ident, $scratch:ident, $scratch2:ident) => {
        impl Elem for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INF: Self = <$t>::NEG_INFINITY;
            const IS_F32: bool = std::mem::size_of::<$t>() == 4;
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn storage_slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v.as_slice()),
                    _ => None,
                }
            }
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                $scratch.with(|cell| {
                    let mut buf = cell.borrow_mut();
                    if buf.len() < len {
                        buf.resize(len, 0.0);
                    }
                    f(&mut buf[..len])
                })
            }
            fn with_scratch2<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                $scratch2.with(|cell| {
                    let mut buf = cell.borrow_mut();
                    if buf.len() < len {
                        buf.resize(len, 0.0);
                    }
                    f(&mut buf[..len])
                })
            }
        }
    };
}
impl_elem!(f32, F32, SCRATCH_F32, SCRATCH2_F32);
impl_elem!(f64, F64, SCRATCH_F64, SCRATCH2_F64);

/// The contiguous slice of `s` described by `l`, or an error if the layout is strided.
pub(crate) fn contiguous<'a, T: Elem>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let data = T::storage_slice(s).ok_or_else(|| candle_core::Error::Msg(format!("{what}: unexpected dtype")))?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Row-major matrix view used by [`gemm`]: pointer plus row and column strides.
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

impl<T> Mat<T> {
    /// Row-major `[rows, cols]` matrix with row stride `ld`.
    pub fn rm(s: &[T], ld: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            rs: ld as isize,
            cs: 1,
        }
    }
    /// Transposed view of a row-major matrix with row stride `ld`.
    pub fn tr(s: &[T], ld: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            rs: 1,
            cs: ld as isize,
        }
    }
}

/// `dst[m, n] (row stride ldd) (+)= lhs[m, k] * rhs[k, n]`; accumulates when `acc`.
///
/// # Safety
/// The views must cover `m x k`, `k x n` and `m x n` elements inside live buffers.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) unsafe fn gemm<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    ldd: usize,
    acc: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                std::ptr::write_bytes(dst.add(i * ldd), 0, n);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        ldd as isize,
        acc,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        if acc { T::ONE } else { T::ZERO },
        T::ONE,
        false,
        false,
        false,
        par,
    )
}

/// Parallelism for a gemm issued from outside a parallel batch loop.
pub(crate) fn outer_par() -> gemm::Parallelism {
    let t = rayon::current_num_threads();
    if t > 1 {
        gemm::Parallelism::Rayon(t)
    } else {
        gemm::Parallelism::None
    }
}

/// Defines `fn name(args)` whose body is compiled three times, for baseline x86-64, with AVX2+FMA
/// and with AVX-512 (F, BW, DQ, VL) enabled, the best one the CPU has chosen at run time (the
/// crate is built for baseline x86-64; the body is inlined into each, so its loops vectorise
/// with 256- or 512-bit registers).
/// Prefer it to [`simd`] for large kernels: a closure passed to `simd` is not always inlined
/// into the vector function, and then runs as baseline code.
///
/// Exported as `nn_core::simd_dispatch!` for other crates' kernels (bnn-core's quantizers).
/// The body sees a `const FMA: bool` (true in the AVX2+FMA and AVX-512 builds).
#[macro_export]
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) {
            // `FMA` selects fused multiply-adds in the polynomial helpers (see `fma`)
            #[inline(always)]
            fn imp<const FMA: bool>($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn avx512($($a: $t),*) {
                    imp::<true>($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) {
                    imp::<true>($($a),*)
                }
                if $crate::ops::has_avx512() {
                    // SAFETY: the CPU has the features enabled for `avx512`.
                    return unsafe { avx512($($a),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features enabled for `avx2`.
                    return unsafe { avx2($($a),*) };
                }
            }
            imp::<false>($($a),*)
        }
    };
}
pub(crate) use crate::simd_dispatch as dispatch;

/// Runs `f` compiled with AVX-512 or AVX2+FMA enabled when the CPU supports it (the crate is
/// built for baseline x86-64), so that the auto-vectorised inner loops use 512- or 256-bit
/// registers.
///
/// The closure must be marked `#[inline(always)]` (`simd(#[inline(always)] || { .. })`):
/// the features only apply to code inlined into the wrappers below, and LLVM does not
/// inline a large closure on its own; it then stays a separate function compiled for
/// baseline x86-64 (SSE2). Until 2026-12-08 none of the call sites had the attribute and
/// the depthwise, Winograd-transform, BatchNorm and pooling loops ran as SSE2 code
/// (the test `simd_closures_are_inlined` guards against that).
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if crate::ops::has_avx512() {
            return unsafe { avx512(f) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return unsafe { avx2(f) };
        }
    }
    f()
}

#[cfg(test)]
mod simd_call_sites {
    /// Every `simd(..)` closure in this crate (and adder-nets) carries `#[inline(always)]`;
    /// see [`super::simd`] for why.
    #[test]
    fn simd_closures_are_inlined() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut bad = Vec::new();
        let mut files = 0;
        for dir in ["nn-core/src", "adder-nets/src"] {
            let mut stack = vec![root.join(dir)];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if p.extension().is_some_and(|x| x == "rs") {
                        files += 1;
                        let text = std::fs::read_to_string(&p).unwrap();
                        // patterns split so that this test does not match itself
                        let (plain, moved) = (["simd(", "||"].concat(), ["simd(", "move ||"].concat());
                        for (i, line) in text.lines().enumerate() {
                            if line.contains(&plain) || line.contains(&moved) {
                                bad.push(format!("{}:{}", p.display(), i + 1));
                            }
                        }
                    }
                }
            }
        }
        assert!(files > 10, "source files not found under {}", root.display());
        assert!(bad.is_empty(), "simd closures without #[inline(always)]: {bad:?}");
    }
}
