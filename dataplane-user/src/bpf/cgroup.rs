//! Socket-level load balancing: the cgroup the socket programs attach to,
//! the links that attach them (which cgroup and hook a pinned link serves,
//! replacing its program), and what a cgroup runs. The raw commands are in
//! [`super::sys`].
//!
//! The programs (`dataplane-ebpf/src/sock.rs`) run for every socket of
//! every process in the cgroup and its descendants: on a node, the cgroup
//! v2 root covers pods and host processes alike.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use thiserror::Error;

use super::sys::{self, SysError};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// Why a directory cannot take the socket-level programs.
#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("{path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a cgroup v2 directory (cgroup2 is mounted at /sys/fs/cgroup on cgroup v2 hosts and at \
         /sys/fs/cgroup/unified on hybrid ones; see `mount -t cgroup2`)"
    )]
    NotCgroup2 { path: PathBuf },
}

/// The kernel's `enum bpf_attach_type` values of the hooks we use, by the
/// hook names of `dataplane_common::program_names::SOCK` and
/// `SOCK_RELEASE_HOOK`.
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
        "sock_release" => 34, // BPF_CGROUP_INET_SOCK_RELEASE
        _ => return None,
    })
}

/// The cgroup v2 directory `path`, checked, and its cgroup id (the inode
/// number of the directory, which is what the kernel reports for links).
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    let stat_err = |source| CgroupError::Stat {
        path: path.to_path_buf(),
        source,
    };
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| stat_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: statfs/stat write into zeroed structs we own; the path is a
    // valid C string.
    let (fs, st) = unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        let mut st: libc::stat = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut fs) != 0 || libc::stat(c.as_ptr(), &mut st) != 0 {
            return Err(stat_err(io::Error::last_os_error()));
        }
        (fs, st)
    };
    // f_type's integer type differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    let f_type = fs.f_type as i64;
    if f_type != CGROUP2_SUPER_MAGIC {
        return Err(CgroupError::NotCgroup2 {
            path: path.to_path_buf(),
        });
    }
    Ok(st.st_ino)
}

/// Opens a pinned link.
pub fn obj_get(pin: &Path) -> Result<OwnedFd, SysError> {
    sys::obj_get(pin)
}

/// What the kernel says of a cgroup link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub prog_id: u32,
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// The cgroup and hook a link attaches to; `None` if it is no cgroup link.
pub fn cgroup_link_info(link: BorrowedFd<'_>) -> Result<Option<CgroupLinkInfo>, SysError> {
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) a union
    // whose cgroup member is { u64 cgroup_id; u32 attach_type; }.
    let mut info = [0u64; 32];
    sys::obj_get_info_by_fd(link, &mut info)?;
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
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> Result<(), SysError> {
    sys::link_update(link, prog)
}

/// The ids of the programs attached to cgroup `path` (itself, not its
/// ancestors) at `hook`.
pub fn attached_programs(path: &Path, hook: &str) -> io::Result<Vec<u32>> {
    let attach_type = attach_type(hook).ok_or_else(|| io::Error::other(format!("unknown hook {hook}")))?;
    let dir = std::fs::File::open(path)?;
    let mut ids = [0u32; 64];
    let n = sys::prog_query(dir.as_fd(), attach_type, &mut ids)
        .map_err(|e| io::Error::other(e.context(path.display().to_string())))?;
    Ok(ids[..n].to_vec())
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
        assert!(matches!(e, CgroupError::NotCgroup2 { .. }), "{e}");
        assert!(e.to_string().contains("not a cgroup v2 directory"), "{e}");
    }
}
