//! The `dataplane` binary: everything is in the library's `cli` module, so
//! the tests parse and run the same command line.

/// mimalloc instead of glibc's malloc: at 100,000 Services the agent's
/// peak RSS was 345 instead of 423 MiB with it (docs/performance.md,
/// "100,000 Services"). The agent holds millions of small records, keys
/// and tree nodes, allocated by the watcher tasks on the runtime's threads
/// and by the sync on another: glibc keeps an arena per such thread, with
/// a per-allocation header and freed chunks it rarely returns; mimalloc
/// packs small objects by size class and gives back what the first sync
/// frees.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's `mi_option_set` (mimalloc.h), in the library the
    /// `mimalloc` crate links.
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` of mimalloc.h's `mi_option_e`: 15 in v2 and v3
/// (retired options keep their numbers).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

fn main() -> anyhow::Result<()> {
    // No transparent huge pages for the agent's heap: mimalloc asks for
    // them (`madvise(MADV_HUGEPAGE)` on its arenas, its `allow_thp`
    // option), and a 2 MiB page counts whole in RSS, and is zeroed whole
    // at its first touch, however little of it holds objects. At 100,000
    // Services the peak RSS was 228 MiB without them against 246-250 with
    // (docs/performance.md, "100,000 Services"). What mimalloc itself
    // does with `MIMALLOC_ALLOW_THP=0`, done here because its options are
    // read before `main`; an operator's MIMALLOC_ALLOW_THP, if set, wins.
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: prctl with integer arguments only; it sets a flag of
        // this process (inherited by children), no memory is passed.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    // Pages freed whole go back to the kernel at once instead of 10 ms
    // later: the first sync frees and allocates in bursts, and the delay
    // showed in the peak (docs/performance.md, "100,000 Services"). The
    // operator's MIMALLOC_PURGE_DELAY, if set, wins.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options (an atomic store), which
        // it allows at any time.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
    dataplane::cli::main()
}
