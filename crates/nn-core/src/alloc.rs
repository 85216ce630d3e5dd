//! Allocator tuning for CPU training.
//!
//! Every candle op allocates its output. With glibc's defaults, buffers above the (dynamic)
//! mmap threshold are returned to the kernel when freed and the next step faults fresh
//! zeroed pages in again: measured 10% of a ResNet-20 training step in page-fault handling and
//! page clearing, and the forward pass ran 1.8x faster once freed memory was kept for reuse.
//! [`tune_allocator`] makes glibc keep freed memory in the process (per-allocation mmap only
//! above 32 MiB, no trimming), which costs resident memory equal to the peak working set.
//!
//! 32 MiB is glibc's ceiling for the mmap threshold on 64-bit targets, so larger buffers
//! (Swin-T's stage-1 MLP activation at batch 8 is 38.5 MB; ImageNet-size feature maps at
//! training batch sizes are larger still) are still mapped and unmapped on every use: 5% of
//! a Swin-T forward was page-fault handling. [`LargeBlockCache`] is a global allocator that
//! keeps a few freed large blocks for reuse by the next allocation of the same size; a
//! binary opts in with `#[global_allocator]` (xtask does).

/// glibc's mmap threshold set by [`tune_allocator`]: 32 MiB, glibc's ceiling on 64-bit.
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Extra memory requested whenever the heap grows (64 MiB).
const TOP_PAD: i32 = 64 << 20;

/// Tunes glibc malloc for training (see the module docs). Returns whether it was applied
/// (false on non-glibc targets). Call once at program start, before heavy allocation.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; called before threads allocate.
        unsafe {
            let a = libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            let b = libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            let c = libc::mallopt(libc::M_TOP_PAD, TOP_PAD);
            a == 1 && b == 1 && c == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The glibc environment variables that give a process started from here the settings
/// [`tune_allocator`] gives this one. Benchmarks pass them to their PyTorch reference, so that
/// a comparison does not pit a tuned allocator against glibc's defaults: PyTorch's PVTv2-B0
/// forward ran at 23-24 img/s with the defaults and 37-40 with these (fresh processes, 2
/// threads, 2026-12-07).
pub fn glibc_tuning_env() -> [(&'static str, String); 3] {
    [
        ("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD.to_string()),
        ("MALLOC_TRIM_THRESHOLD_", i32::MAX.to_string()),
        ("MALLOC_TOP_PAD_", TOP_PAD.to_string()),
    ]
}

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Number of freed blocks a [`LargeBlockCache`] keeps.
const CACHE_SLOTS: usize = 16;

/// A freed block kept for reuse: address, rounded size, alignment.
#[derive(Clone, Copy)]
struct Block {
    ptr: usize,
    size: usize,
    align: usize,
}

/// Global allocator wrapping [`System`] that keeps up to 16 freed blocks of at least
/// `min_bytes` (sizes rounded up to 1 MiB), at most `max_cached_bytes` in all, and hands one
/// back to the next allocation with the same rounded size and alignment: a training or
/// inference loop allocates the same large activations on every step, so after the first
/// step they no longer cost page faults. Smaller allocations go straight to [`System`].
/// When the slots are full the oldest cached block is freed to make room (sizes that stop
/// recurring do not pin the cache), and when the system allocator fails, the cache is
/// emptied and the allocation tried once more.
///
/// ```no_run
/// #[global_allocator]
/// static ALLOC: nn_core::alloc::LargeBlockCache = nn_core::alloc::LargeBlockCache::new(32 << 20, 1 << 30);
/// ```
pub struct LargeBlockCache {
    min_bytes: usize,
    max_cached_bytes: usize,
    cache: Mutex<Slots>,
    hits: AtomicUsize,
}

/// The cached blocks, oldest first, and their total size (guarded by the cache's mutex).
struct Slots {
    blocks: [Option<Block>; CACHE_SLOTS],
    /// Insertion counter of every slot, to find the oldest.
    ages: [u64; CACHE_SLOTS],
    clock: u64,
    bytes: usize,
}

const MIB: usize = 1 << 20;

impl LargeBlockCache {
    /// A cache for blocks of at least `min_bytes` (keep it well above the few bytes a lazily
    /// allocated mutex could need on other platforms), holding at most `max_cached_bytes`.
    pub const fn new(min_bytes: usize, max_cached_bytes: usize) -> Self {
        Self {
            min_bytes,
            max_cached_bytes,
            cache: Mutex::new(Slots {
                blocks: [None; CACHE_SLOTS],
                ages: [0; CACHE_SLOTS],
                clock: 0,
                bytes: 0,
            }),
            hits: AtomicUsize::new(0),
        }
    }

    /// How many allocations were served from the cache so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    /// Bytes currently held in the cache.
    pub fn cached_bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rounded(&self, layout: Layout) -> Option<Layout> {
        if layout.size() < self.min_bytes {
            return None;
        }
        Layout::from_size_align(layout.size().div_ceil(MIB) * MIB, layout.align()).ok()
    }

    fn take(&self, l: Layout) -> Option<*mut u8> {
        let mut c = self.lock();
        let i = c
            .blocks
            .iter()
            .position(|s| s.is_some_and(|b| b.size == l.size() && b.align == l.align()))?;
        let b = c.blocks[i].take()?;
        c.bytes -= b.size;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(b.ptr as *mut u8)
    }

    /// Caches the block if it fits under the byte limit (freeing the oldest cached block when
    /// every slot is taken); returns false if the caller must free it.
    ///
    /// # Safety
    /// `ptr` must have been allocated by `System` with layout `l` and not be used afterwards.
    unsafe fn keep(&self, ptr: *mut u8, l: Layout) -> bool {
        let evicted = {
            let mut c = self.lock();
            if l.size() > self.max_cached_bytes {
                return false;
            }
            // (a fixed array: nothing is allocated while the lock is held)
            let mut evicted = [None; CACHE_SLOTS];
            let mut n_evicted = 0;
            // make room under the byte limit and in the slots, oldest first
            while c.bytes + l.size() > self.max_cached_bytes || c.blocks.iter().all(|s| s.is_some()) {
                let Some(i) = (0..CACHE_SLOTS).filter(|&i| c.blocks[i].is_some()).min_by_key(|&i| c.ages[i]) else {
                    break;
                };
                let b = c.blocks[i].take().expect("an occupied slot");
                c.bytes -= b.size;
                evicted[n_evicted] = Some(b);
                n_evicted += 1;
            }
            let i = c.blocks.iter().position(|s| s.is_none()).expect("a free slot after eviction");
            c.clock += 1;
            let clock = c.clock;
            c.blocks[i] = Some(Block {
                ptr: ptr as usize,
                size: l.size(),
                align: l.align(),
            });
            c.ages[i] = clock;
            c.bytes += l.size();
            evicted
        };
        // freed outside the lock
        for b in evicted.into_iter().flatten() {
            System.dealloc(b.ptr as *mut u8, Layout::from_size_align_unchecked(b.size, b.align));
        }
        true
    }

    /// Frees every cached block (used before retrying a failed allocation).
    unsafe fn flush(&self) {
        let blocks = {
            let mut c = self.lock();
            c.bytes = 0;
            std::mem::replace(&mut c.blocks, [None; CACHE_SLOTS])
        };
        for b in blocks.into_iter().flatten() {
            System.dealloc(b.ptr as *mut u8, Layout::from_size_align_unchecked(b.size, b.align));
        }
    }

    /// `f()`, and if it returns null, `f()` again after emptying the cache.
    unsafe fn or_retry(&self, f: impl Fn() -> *mut u8) -> *mut u8 {
        let p = f();
        if p.is_null() && self.cached_bytes() > 0 {
            self.flush();
            return f();
        }
        p
    }
}

// SAFETY: every block handed out was allocated by `System` with the rounded layout that
// `dealloc`/`realloc` recompute from the caller's layout, and a cached block is handed out
// at most once (it is removed from its slot under the lock).
unsafe impl GlobalAlloc for LargeBlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match self.rounded(layout) {
            Some(l) => match self.take(l) {
                Some(p) => p,
                None => self.or_retry(|| System.alloc(l)),
            },
            None => System.alloc(layout),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match self.rounded(layout) {
            Some(l) => match self.take(l) {
                Some(p) => {
                    std::ptr::write_bytes(p, 0, layout.size());
                    p
                }
                None => self.or_retry(|| System.alloc_zeroed(l)),
            },
            None => System.alloc_zeroed(layout),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match self.rounded(layout) {
            Some(l) => {
                if !self.keep(ptr, l) {
                    System.dealloc(ptr, l)
                }
            }
            None => System.dealloc(ptr, layout),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = self.rounded(layout);
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let new = self.rounded(new_layout);
        match (old, new) {
            // both small: the system allocator resizes in place when it can
            (None, None) => System.realloc(ptr, layout, new_size),
            // same rounded block: nothing to do
            (Some(a), Some(b)) if a.size() == b.size() => ptr,
            // both large: glibc can move the mapping (mremap) instead of copying
            (Some(a), Some(b)) => self.or_retry(|| System.realloc(ptr, a, b.size())),
            _ => {
                let p = self.alloc(new_layout);
                if !p.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                p
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_reused_small_ones_pass_through_and_zeroing_holds() {
        let cache = LargeBlockCache::new(4 * MIB, 64 * MIB);
        unsafe {
            let l = Layout::from_size_align(5 * MIB + 3, 64).unwrap();
            let a = cache.alloc(l);
            assert!(!a.is_null());
            a.write_bytes(7, l.size());
            cache.dealloc(a, l);
            assert_eq!(cache.cached_bytes(), 6 * MIB);
            // same rounded size and alignment: the same block, zeroed on request
            let l2 = Layout::from_size_align(6 * MIB - 1, 64).unwrap();
            let b = cache.alloc_zeroed(l2);
            assert_eq!(b, a);
            assert_eq!(cache.hits(), 1);
            assert!(std::slice::from_raw_parts(b, l2.size()).iter().all(|&v| v == 0));
            // another alignment is not served from the cache
            let l3 = Layout::from_size_align(6 * MIB, 4096).unwrap();
            cache.dealloc(b, l2);
            let c = cache.alloc(l3);
            assert_eq!(cache.hits(), 1);
            // growing through realloc keeps the contents
            c.write_bytes(3, l3.size());
            let d = cache.realloc(c, l3, 9 * MIB);
            assert_eq!(*d.add(6 * MIB - 1), 3);
            cache.dealloc(d, Layout::from_size_align(9 * MIB, 4096).unwrap());
            // the cache never holds more than its limit
            assert!(cache.cached_bytes() <= 64 * MIB);
            let big = Layout::from_size_align(80 * MIB, 64).unwrap();
            let e = cache.alloc(big);
            cache.dealloc(e, big);
            assert!(cache.cached_bytes() <= 64 * MIB);
            // small allocations bypass the cache
            let s = Layout::from_size_align(100, 8).unwrap();
            let f = cache.alloc(s);
            cache.dealloc(f, s);
            assert!(cache.cached_bytes() <= 64 * MIB);
            // one-off sizes do not pin the cache: with every slot taken the oldest goes
            let sizes: Vec<Layout> = (0..CACHE_SLOTS + 4)
                .map(|i| Layout::from_size_align((4 + i % 3) * MIB, 64).unwrap())
                .collect();
            let ptrs: Vec<*mut u8> = sizes.iter().map(|&l| cache.alloc(l)).collect();
            for (&p, &l) in ptrs.iter().zip(&sizes) {
                cache.dealloc(p, l);
            }
            assert!(cache.cached_bytes() <= 64 * MIB);
            let last = Layout::from_size_align(4 * MIB, 64).unwrap();
            let hits = cache.hits();
            let g = cache.alloc(last);
            assert_eq!(cache.hits(), hits + 1, "the newest blocks stay cached");
            cache.dealloc(g, last);
            cache.flush();
            assert_eq!(cache.cached_bytes(), 0);
        }
    }
}
