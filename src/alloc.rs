//! The process's allocator: mimalloc, counting the bytes in use so `/memory` can report them.
//!
//! mimalloc's per-thread free lists fit the worker model (each worker allocates and frees its own connections'
//! memory); glibc malloc's arena locking and consolidation showed as ~4% of CPU in the HTTP benchmark profile.
//! mimalloc is built without transparent huge pages (`no_thp`): with them its first arena made 32 MiB resident in an
//! idle proxy (45 MiB RSS against 29 MiB without, `/proc/<pid>/status` after start with the tcp bench bootstrap). The
//! count is kept per stats shard (each worker has its own, on its own cache line), so counting costs one relaxed
//! add on a line no other worker writes; reading sums the shards.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicI64, Ordering};

use mimalloc::MiMalloc;

#[repr(align(64))]
struct Padded(AtomicI64);

static IN_USE: [Padded; crate::stats::MAX_SHARDS] = [const { Padded(AtomicI64::new(0)) }; crate::stats::MAX_SHARDS];

fn count(delta: i64) {
    // A block freed on another thread than the one that allocated it moves bytes between shards; only the sum means
    // anything.
    IN_USE[crate::stats::thread_shard()].0.fetch_add(delta, Ordering::Relaxed);
}

/// Bytes allocated and not yet freed, over all threads.
pub fn allocated() -> u64 {
    let sum: i64 = IN_USE.iter().map(|p| p.0.load(Ordering::Relaxed)).sum();
    u64::try_from(sum).unwrap_or(0)
}

/// mimalloc with a count of the bytes in use.
pub struct Counting;

// SAFETY: every call forwards to mimalloc with the same arguments; the counting only reads the layouts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as received.
        let p = unsafe { MiMalloc.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as received.
        let p = unsafe { MiMalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received.
        unsafe { MiMalloc.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as received.
        let p = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

/// Bytes mimalloc holds from the system (its committed memory).
pub fn committed() -> u64 {
    let (mut elapsed, mut user, mut system, mut rss, mut peak_rss, mut commit, mut peak_commit, mut faults) =
        (0, 0, 0, 0, 0, 0, 0, 0);
    // SAFETY: every pointer is to a live local usize that mi_process_info only writes.
    unsafe {
        libmimalloc_sys::mi_process_info(
            &mut elapsed,
            &mut user,
            &mut system,
            &mut rss,
            &mut peak_rss,
            &mut commit,
            &mut peak_commit,
            &mut faults,
        );
    }
    commit as u64
}
