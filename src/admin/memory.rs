//! `/memory`: the process's memory in the shape of Envoy's `envoy.admin.v3.Memory`, filled from what the allocator in
//! use and the kernel report. Envoy's figures come from tcmalloc; the ones our allocator has no counterpart for are 0,
//! as Envoy reports them when built without tcmalloc.

use std::sync::OnceLock;

use envoy_types::pb::envoy::admin::v3::Memory;

/// What an allocator can say about itself; None where it cannot.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllocatorFigures {
    /// Bytes handed out and not freed.
    pub allocated: Option<u64>,
    /// Bytes the allocator holds from the system.
    pub heap_size: Option<u64>,
    /// Bytes held but unused.
    pub free: Option<u64>,
}

static GLOBAL_ALLOCATOR: OnceLock<fn() -> AllocatorFigures> = OnceLock::new();

/// Tells `/memory` how to read the process's global allocator (the binary installs mimalloc); without it, glibc's
/// malloc is read.
pub fn set_global_allocator(figures: fn() -> AllocatorFigures) {
    let _ = GLOBAL_ALLOCATOR.set(figures);
}

/// The figures, measured now:
/// - `allocated`, `heap_size`, `pageheap_free`: from the global allocator (see [`glibc`] and the binary's mimalloc
///   reader), 0 where it does not tell;
/// - `total_physical_bytes`: the resident set size (`/proc/self/statm`, resident pages × page size);
/// - `pageheap_unmapped` and `total_thread_cache`: 0, neither glibc nor mimalloc reports them.
pub fn measure() -> Memory {
    let figures = GLOBAL_ALLOCATOR.get().map_or_else(glibc, |read| read());
    Memory {
        allocated: figures.allocated.unwrap_or(0),
        heap_size: figures.heap_size.unwrap_or(0),
        pageheap_free: figures.free.unwrap_or(0),
        total_physical_bytes: resident_bytes().unwrap_or(0),
        ..Default::default()
    }
}

/// glibc's `mallinfo2`: `allocated` is `uordblks` + `hblkhd` (the latter being chunks served by their own mmap),
/// `heap_size` is `arena` + `hblkhd`, `free` is `fordblks`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn glibc() -> AllocatorFigures {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value; it only reads the allocator's
    // own bookkeeping under its locks.
    let m = unsafe { libc::mallinfo2() };
    AllocatorFigures {
        allocated: Some((m.uordblks + m.hblkhd) as u64),
        heap_size: Some((m.arena + m.hblkhd) as u64),
        free: Some(m.fordblks as u64),
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn glibc() -> AllocatorFigures {
    AllocatorFigures::default()
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
