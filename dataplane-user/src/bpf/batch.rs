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

/// How many entries the hash map behind `fd` holds (key and value types
/// of the map's exact sizes; not per-CPU maps), counted in batches: no
/// kernel before 6.6 counts a hash map's entries for user space, and the
/// count has to be read from the entries themselves.
pub fn count<K: aya::Pod + bytemuck::Zeroable, V: aya::Pod + bytemuck::Zeroable>(
    fd: BorrowedFd<'_>,
) -> Result<usize, SysError> {
    for_each_entry(fd, |_: &K, _: &V| {})
}

/// Bytes of per-CPU values read per `BPF_MAP_LOOKUP_BATCH` call on a
/// per-CPU array (bounds the buffer on machines with many CPUs).
const PERCPU_BATCH_BYTES: usize = 1 << 20;

/// `ENOTSUPP`: the kernel's answer for a map type without batch
/// operations.
const ENOTSUPP: i32 = 524;

/// Set once a kernel refused a batch lookup on a per-CPU array (5.10
/// does, with `ENOTSUPP`): later reads go key by key without asking again.
static PERCPU_BATCH_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Calls `f(index, values)` for the entries `0..count` of the per-CPU
/// array behind `fd` (value type of the map's exact size, a multiple of
/// 8 bytes), `values` holding one value per possible CPU (`cpus` of them),
/// in index order, reading many entries per `BPF_MAP_LOOKUP_BATCH` call.
/// Kernels without batch operations on per-CPU arrays (5.10; 6.1 has
/// them) get one lookup per entry.
pub fn percpu_array<V: bytemuck::Pod>(
    fd: BorrowedFd<'_>,
    count: u32,
    cpus: usize,
    mut f: impl FnMut(u32, &[V]),
) -> Result<(), SysError> {
    use std::sync::atomic::Ordering::Relaxed;
    if PERCPU_BATCH_REFUSED.load(Relaxed) {
        return percpu_array_by_key(fd, count, cpus.max(1), f);
    }
    // The kernel lays per-CPU values out 8-byte aligned: our slices of V
    // match only when V needs no padding.
    assert_eq!(size_of::<V>() % 8, 0, "per-CPU value size must be a multiple of 8");
    let per_entry = cpus.max(1);
    let batch = (PERCPU_BATCH_BYTES / (size_of::<V>() * per_entry)).clamp(1, LOOKUP_BATCH);
    let mut keys: Vec<u32> = vec![0; batch];
    let mut values: Vec<V> = vec![V::zeroed(); batch * per_entry];
    let mut cursor = BatchCursor::default();
    let mut next = 0u32;
    while next < count {
        let want = batch.min((count - next) as usize);
        let read = sys::map_lookup_batch_raw(
            fd,
            &mut cursor,
            bytemuck::cast_slice_mut(&mut keys[..want]),
            bytemuck::cast_slice_mut(&mut values[..want * per_entry]),
            want,
        );
        let (read, end) = match read {
            Ok(r) => r,
            Err(e) if next == 0 && matches!(e.errno(), Some(ENOTSUPP | libc::EINVAL)) => {
                PERCPU_BATCH_REFUSED.store(true, Relaxed);
                return percpu_array_by_key(fd, count, per_entry, f);
            }
            Err(e) => return Err(e.context(format!("after {next} entries"))),
        };
        for (i, key) in keys[..read].iter().enumerate() {
            f(*key, &values[i * per_entry..(i + 1) * per_entry]);
        }
        next += read as u32;
        if end {
            break;
        }
    }
    Ok(())
}

/// [`percpu_array`] one `BPF_MAP_LOOKUP_ELEM` per entry.
fn percpu_array_by_key<V: bytemuck::Pod>(
    fd: BorrowedFd<'_>,
    count: u32,
    cpus: usize,
    mut f: impl FnMut(u32, &[V]),
) -> Result<(), SysError> {
    let mut values: Vec<V> = vec![V::zeroed(); cpus];
    for key in 0..count {
        if sys::map_lookup_elem_raw(fd, bytemuck::bytes_of(&key), bytemuck::cast_slice_mut(&mut values))? {
            f(key, &values);
        }
    }
    Ok(())
}
