//! BPF_MAP_UPDATE_BATCH: many entries of one map in one bpf(2) call. aya
//! 0.14 has no wrapper for it. The first sync of a large cluster writes
//! hundreds of thousands of entries; one call per frontend's backend slots
//! and one per its Maglev table instead of one per entry is most of what
//! the cold start spends in syscalls.

use std::os::fd::{AsRawFd, BorrowedFd};

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
