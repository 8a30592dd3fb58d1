//! `/memory`: the process's memory in the shape of Envoy's `envoy.admin.v3.Memory`, filled from what our allocator
//! (mimalloc, counted by [`crate::alloc`]) and the kernel report. Envoy's figures come from tcmalloc; the ones
//! mimalloc has no counterpart for are 0.

use envoy_types::pb::envoy::admin::v3::Memory;

/// The figures, measured now:
/// - `allocated`: bytes handed out by the allocator and not freed (counted by [`crate::alloc`]);
/// - `heap_size`: bytes mimalloc holds from the system (its committed memory);
/// - `pageheap_free`: held but not handed out (`heap_size` − `allocated`, mimalloc's free pages and lists);
/// - `total_physical_bytes`: the resident set size (`/proc/self/statm`, resident pages × page size);
/// - `pageheap_unmapped` and `total_thread_cache`: 0, mimalloc does not report them apart (its per-thread free
///   lists are counted as free heap).
pub fn measure() -> Memory {
    let allocated = crate::alloc::allocated();
    let heap_size = crate::alloc::committed().max(allocated);
    Memory {
        allocated,
        heap_size,
        pageheap_free: heap_size - allocated,
        total_physical_bytes: resident_bytes().unwrap_or(0),
        ..Default::default()
    }
}

/// Resident set size in bytes: `/proc/self/statm`'s second field is resident pages.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page_size).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_consistent() {
        // Other tests allocate and free on other threads meanwhile: the block is large and the margins wide.
        const BLOCK: u64 = 64 << 20;
        const SLACK: u64 = 16 << 20;
        let before = measure();
        let keep = vec![7u8; BLOCK as usize];
        let m = measure();
        assert!(m.total_physical_bytes > 0);
        assert!(m.allocated + SLACK >= before.allocated + BLOCK, "{before:?} then {m:?}");
        assert!(m.heap_size >= m.allocated, "{m:?}");
        drop(keep);
        assert!(measure().allocated + BLOCK <= m.allocated + SLACK, "freeing is counted");
    }
}
