//! BPF_MAP_UPDATE_BATCH and BPF_MAP_LOOKUP_BATCH: many entries of one map
//! in one bpf(2) call. aya 0.14 has no wrapper for them. The first sync of
//! a large cluster writes hundreds of thousands of entries; one call per
//! frontend's backend slots and one per its Maglev table instead of one per
//! entry is most of what the cold start spends in syscalls. Reading a whole
//! conntrack table entry by entry (`BPF_MAP_GET_NEXT_KEY`, then a lookup)
//! costs two calls per entry and starts over from the first bucket
//! whenever the entry it stands on is evicted meanwhile; the batch lookup
//! walks the buckets by index.

use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `keys[i] -> values[i]` for every `i` into the map behind `fd`
/// (key and value types of the map's exact sizes). On an error, the entries
/// before the failing one are written; the error says how many.
pub fn update<K: aya::Pod, V: aya::Pod>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> std::io::Result<()> {
    assert_eq!(keys.len(), values.len());
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: attr is a live, correctly laid out struct for the call; keys
    // and values point at `count` contiguous Pod elements each, of the
    // map's key and value sizes, which outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("{e} (after {} of {} entries)", attr.count, keys.len()),
        ));
    }
    Ok(())
}

/// Entries read per `BPF_MAP_LOOKUP_BATCH` call. A call must fit a whole
/// hash bucket (else `ENOSPC`); buckets hold a handful of entries.
const LOOKUP_BATCH: usize = 4096;

/// Every entry of the hash map behind `fd` (key and value types of the
/// map's exact sizes; not per-CPU maps), in bucket order.
pub fn lookup_all<K: aya::Pod + bytemuck::Zeroable, V: aya::Pod + bytemuck::Zeroable>(
    fd: BorrowedFd<'_>,
) -> std::io::Result<Vec<(K, V)>> {
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
) -> std::io::Result<usize> {
    let mut seen = 0;
    let mut keys: Vec<K> = vec![K::zeroed(); LOOKUP_BATCH];
    let mut values: Vec<V> = vec![V::zeroed(); LOOKUP_BATCH];
    // The position between calls, opaque (a bucket index for hash maps);
    // 8 bytes cover every map type's token.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &token_in as *const u64 as u64 },
            out_batch: &mut token_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: LOOKUP_BATCH as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: attr is a live, correctly laid out struct for the call;
        // keys and values have room for `count` elements of the map's key
        // and value sizes, the tokens for 8 bytes; all outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let end = err.as_ref().is_some_and(|e| e.raw_os_error() == Some(libc::ENOENT));
        if let Some(e) = err.filter(|_| !end) {
            return Err(std::io::Error::new(
                e.kind(),
                format!("{e} (batch lookup, after {seen} entries)"),
            ));
        }
        // On ENOENT (the end) `count` still says how many it read.
        let read = attr.count as usize;
        for (k, v) in keys[..read].iter().zip(&values[..read]) {
            f(k, v);
        }
        seen += read;
        if end {
            return Ok(seen);
        }
        token_in = token_out;
        first = false;
    }
}
