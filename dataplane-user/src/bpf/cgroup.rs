//! Socket-level load balancing: the cgroup the socket programs attach to,
//! and the bpf(2) commands aya 0.14 has no wrapper for (opening a pinned
//! link, reading which cgroup it is attached to, replacing its program,
//! listing what a cgroup runs).
//!
//! The programs (`dataplane-ebpf/src/sock.rs`) run for every socket of
//! every process in the cgroup and its descendants: on a node, the cgroup
//! v2 root covers pods and host processes alike.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// The kernel's `enum bpf_attach_type` values of the hooks we use, by the
/// hook names of `dataplane_common::program_names::SOCK`.
pub fn attach_type(hook: &str) -> Option<u32> {
    Some(match hook {
        "connect4" => 10,     // BPF_CGROUP_INET4_CONNECT
        "connect6" => 11,     // BPF_CGROUP_INET6_CONNECT
        "sendmsg4" => 14,     // BPF_CGROUP_UDP4_SENDMSG
        "sendmsg6" => 15,     // BPF_CGROUP_UDP6_SENDMSG
        "recvmsg4" => 19,     // BPF_CGROUP_UDP4_RECVMSG
        "recvmsg6" => 20,     // BPF_CGROUP_UDP6_RECVMSG
        "getpeername4" => 29, // BPF_CGROUP_INET4_GETPEERNAME
        "getpeername6" => 30, // BPF_CGROUP_INET6_GETPEERNAME
        _ => return None,
    })
}

fn bpf(cmd: libc::c_long, attr: *mut libc::c_void, size: usize) -> io::Result<libc::c_long> {
    // SAFETY: callers pass a live attr of `size` bytes laid out as the
    // kernel's union bpf_attr member for `cmd`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size as u32) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The cgroup v2 directory `path`, checked, and its cgroup id (the inode
/// number of the directory, which is what the kernel reports for links).
pub fn cgroup_id(path: &Path) -> Result<u64, String> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: statfs/stat write into zeroed structs we own; the path is a
    // valid C string.
    let (fs, st) = unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        let mut st: libc::stat = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut fs) != 0 || libc::stat(c.as_ptr(), &mut st) != 0 {
            return Err(format!("{}: {}", path.display(), io::Error::last_os_error()));
        }
        (fs, st)
    };
    // f_type's integer type differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    let f_type = fs.f_type as i64;
    if f_type != CGROUP2_SUPER_MAGIC {
        return Err(format!(
            "{} is not a cgroup v2 directory (cgroup2 is mounted at /sys/fs/cgroup on cgroup v2 hosts and at \
             /sys/fs/cgroup/unified on hybrid ones; see `mount -t cgroup2`)",
            path.display()
        ));
    }
    Ok(st.st_ino)
}

/// Opens a pinned BPF object (a link).
pub fn obj_get(pin: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(pin.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let mut attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = bpf(
        BPF_OBJ_GET,
        &mut attr as *mut Attr as *mut _,
        std::mem::size_of::<Attr>(),
    )?;
    // SAFETY: a new fd the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What the kernel says of a cgroup link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub prog_id: u32,
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// The cgroup and hook a link attaches to; `None` if it is no cgroup link.
pub fn cgroup_link_info(link: BorrowedFd<'_>) -> io::Result<Option<CgroupLinkInfo>> {
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) a union
    // whose cgroup member is { u64 cgroup_id; u32 attach_type; }. A larger
    // zeroed buffer is accepted (its tail must be zero).
    let mut info = [0u64; 32];
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = Attr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        &mut attr as *mut Attr as *mut _,
        std::mem::size_of::<Attr>(),
    )?;
    let link_type = info[0] as u32;
    if link_type != BPF_LINK_TYPE_CGROUP {
        return Ok(None);
    }
    Ok(Some(CgroupLinkInfo {
        prog_id: (info[1] & 0xffff_ffff) as u32,
        cgroup_id: info[2],
        attach_type: info[3] as u32,
    }))
}

/// Replaces the program of a link atomically (no moment without one).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(
        BPF_LINK_UPDATE,
        &mut attr as *mut Attr as *mut _,
        std::mem::size_of::<Attr>(),
    )
    .map(drop)
}

/// The ids of the programs attached to cgroup `path` (itself, not its
/// ancestors) at `hook`.
pub fn attached_programs(path: &Path, hook: &str) -> io::Result<Vec<u32>> {
    let attach_type = attach_type(hook).ok_or_else(|| io::Error::other(format!("unknown hook {hook}")))?;
    let dir = std::fs::File::open(path)?;
    let mut ids = [0u32; 64];
    #[repr(C)]
    struct Attr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    let mut attr = Attr {
        target_fd: dir.as_raw_fd() as u32,
        attach_type,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
    };
    bpf(
        BPF_PROG_QUERY,
        &mut attr as *mut Attr as *mut _,
        std::mem::size_of::<Attr>(),
    )?;
    Ok(ids[..(attr.prog_cnt as usize).min(ids.len())].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_socket_program_has_a_hook() {
        for (_, hook) in dataplane_common::program_names::SOCK {
            assert!(attach_type(hook).is_some(), "{hook}");
        }
    }

    #[test]
    fn a_plain_directory_is_no_cgroup() {
        let e = cgroup_id(Path::new("/")).unwrap_err();
        assert!(e.contains("not a cgroup v2 directory"), "{e}");
    }
}
