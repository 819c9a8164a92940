//! BPF_MAP_UPDATE_BATCH and BPF_MAP_LOOKUP_BATCH: many entries of one map
//! in one bpf(2) call. aya 0.14 has no wrapper for them. The first sync of
//! a large cluster writes hundreds of thousands of entries; one call per
//! frontend's backend slots and one per its Maglev table instead of one per
//! entry is most of what the cold start spends in syscalls. Reading a whole
//! conntrack table entry by entry (`BPF_MAP_GET_NEXT_KEY`, then a lookup)
//! costs two calls per entry and starts over from the first bucket
//! whenever the entry it stands on is evicted meanwhile; the batch lookup
//! walks the buckets by index.

use std::os::fd::BorrowedFd;

use super::sys::{self, BatchCursor, SysError};

/// Writes `keys[i] -> values[i]` for every `i` into the map behind `fd`
/// (key and value types of the map's exact sizes). On an error, the entries
/// before the failing one are written; the error says how many.
pub fn update<K: aya::Pod, V: aya::Pod>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> Result<(), SysError> {
    if keys.is_empty() {
        return Ok(());
    }
    sys::map_update_batch(fd, keys, values)
}

/// Entries read per `BPF_MAP_LOOKUP_BATCH` call. A call must fit a whole
/// hash bucket (else `ENOSPC`); buckets hold a handful of entries.
const LOOKUP_BATCH: usize = 4096;

/// Every entry of the hash map behind `fd` (key and value types of the
/// map's exact sizes; not per-CPU maps), in bucket order.
pub fn lookup_all<K: aya::Pod + bytemuck::Zeroable, V: aya::Pod + bytemuck::Zeroable>(
    fd: BorrowedFd<'_>,
) -> Result<Vec<(K, V)>, SysError> {
    let mut out = Vec::new();
    for_each_entry(fd, |k: &K, v: &V| out.push((*k, *v)))?;
    Ok(out)
}

/// Calls `f` on every entry of the hash map behind `fd` (key and value
/// types of the map's exact sizes; not per-CPU maps), in bucket order,
/// reading `LOOKUP_BATCH` entries at a time: a full conntrack table is
/// never held in memory at once. Entries added or removed while it reads
/// may or may not be seen; none is seen twice. Returns how many it saw.
pub fn for_each_entry<K: aya::Pod + bytemuck::Zeroable, V: aya::Pod + bytemuck::Zeroable>(
    fd: BorrowedFd<'_>,
    mut f: impl FnMut(&K, &V),
) -> Result<usize, SysError> {
    let mut seen = 0;
    let mut keys: Vec<K> = vec![K::zeroed(); LOOKUP_BATCH];
    let mut values: Vec<V> = vec![V::zeroed(); LOOKUP_BATCH];
    let mut cursor = BatchCursor::default();
    loop {
        let (read, end) = sys::map_lookup_batch(fd, &mut cursor, &mut keys, &mut values)
            .map_err(|e| e.context(format!("after {seen} entries")))?;
        for (k, v) in keys[..read].iter().zip(&values[..read]) {
            f(k, v);
        }
        seen += read;
        if end {
            return Ok(seen);
        }
    }
}
