//! `/memory`: the process's memory in the shape of Envoy's `envoy.admin.v3.Memory`, filled from what glibc's
//! allocator and the kernel report. Envoy's figures come from tcmalloc; the ones glibc has no counterpart for are 0.

use envoy_types::pb::envoy::admin::v3::Memory;

/// The figures, measured now:
/// - `allocated`: bytes handed out by malloc and not freed (glibc `mallinfo2`: `uordblks` + `hblkhd`, the latter
///   being chunks served by their own mmap);
/// - `heap_size`: bytes the allocator holds from the system (`arena` + `hblkhd`);
/// - `pageheap_free`: bytes free inside that heap, held but unused (`fordblks`);
/// - `total_physical_bytes`: the resident set size (`/proc/self/statm`, resident pages × page size);
/// - `pageheap_unmapped` and `total_thread_cache`: 0, glibc does not report them (its per-thread caches are counted
///   as free heap).
pub fn measure() -> Memory {
    let mut memory = Memory { total_physical_bytes: resident_bytes().unwrap_or(0), ..Default::default() };
    if let Some(m) = malloc_figures() {
        memory.allocated = m.allocated;
        memory.heap_size = m.heap_size;
        memory.pageheap_free = m.free;
    }
    memory
}

struct MallocFigures {
    allocated: u64,
    heap_size: u64,
    free: u64,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn malloc_figures() -> Option<MallocFigures> {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value; it only reads the allocator's
    // own bookkeeping under its locks.
    let m = unsafe { libc::mallinfo2() };
    Some(MallocFigures {
        allocated: (m.uordblks + m.hblkhd) as u64,
        heap_size: (m.arena + m.hblkhd) as u64,
        free: m.fordblks as u64,
    })
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn malloc_figures() -> Option<MallocFigures> {
    None
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
        let keep = vec![7u8; 4 << 20];
        let m = measure();
        assert!(m.total_physical_bytes > 0);
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(m.allocated >= keep.len() as u64, "{m:?}");
            assert!(m.heap_size >= m.allocated, "{m:?}");
        }
        drop(keep);
    }
}
