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

fn main() -> anyhow::Result<()> {
    dataplane::cli::main()
}
