//! Which interfaces take frames redirected by XDP (`IFACE_F_XDP_XMIT`),
//! from the kernel's own answer: the XDP features of every device in the
//! netdev generic netlink family (`NETDEV_CMD_DEV_GET`, kernel 6.3 and
//! newer). A device without `NETDEV_XDP_ACT_NDO_XMIT` drops redirected
//! frames (6.3+ checks the flag before sending); a veth reports it only
//! while its peer can receive them (an XDP program or GRO on the peer,
//! since 6.4; 6.3 reported the veth's own state). Where the family is
//! missing (5.10, 6.1) no interface gets the bit and XDP passes what it
//! cannot send back out of a non-veth to the stack.
//!
//! A peer turning GRO on or off changes the veth's features without a
//! link notification in this namespace: [`watch`] follows the family's
//! `mgmt` group (`NETDEV_CMD_DEV_CHANGE_NTF`) for that.

use std::{
    io::{self, Read},
    os::fd::{AsRawFd, FromRawFd},
};

// linux/netlink.h, linux/genetlink.h, linux/netdev.h.
const NETLINK_GENERIC: i32 = 16;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// `NETDEV_XDP_ACT_NDO_XMIT`: the device takes redirected frames.
pub const NETDEV_XDP_ACT_NDO_XMIT: u64 = 4;
const SOL_NETLINK: i32 = 270;
const NETLINK_ADD_MEMBERSHIP: i32 = 1;

fn socket() -> io::Result<std::fs::File> {
    // SAFETY: a plain socket call; the fd is ours and owned by the File.
    unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_GENERIC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(std::fs::File::from_raw_fd(fd))
    }
}

/// Netlink reading helpers, shared with `ifwatch`.
pub(super) fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_ne_bytes([b[o], b[o + 1]])
}

pub(super) fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Attributes in `b[at..to]`: (type without flag bits, payload range).
pub(super) fn attrs(b: &[u8], mut at: usize, to: usize) -> Vec<(u16, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    while at + 4 <= to {
        let len = u16_at(b, at) as usize;
        if len < 4 || at + len > to {
            break;
        }
        out.push((u16_at(b, at + 2) & 0x3fff, at + 4..at + len));
        at += (len + 3) & !3;
    }
    out
}

/// Sends a generic netlink request (`cmd` to family `family`, with the
/// attributes `attrs` already encoded) and calls `each` with every
/// answer's buffer and the range of its attributes, until the answer is
/// complete. `Ok(false)`: the kernel answered ENOENT (no such family).
fn request(
    sock: &std::fs::File,
    family: u16,
    cmd: u8,
    dump: bool,
    attrs_in: &[u8],
    mut each: impl FnMut(&[u8], usize, usize),
) -> io::Result<bool> {
    let len = 16 + 4 + attrs_in.len();
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&family.to_ne_bytes());
    let flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
    req.extend_from_slice(&flags.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
    req.extend_from_slice(&[cmd, 1, 0, 0]); // genlmsghdr: cmd, version
    req.extend_from_slice(attrs_in);
    // SAFETY: the socket is open; the request buffer is valid for the call.
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = (&*sock).read(&mut buf)?;
        let b = &buf[..n];
        let mut at = 0;
        while at + 16 <= n {
            let len = u32_at(b, at) as usize;
            if len < 16 || at + len > n {
                break;
            }
            match u16_at(b, at + 4) {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(b[at + 16..at + 20].try_into().unwrap_or_default());
                    return match -errno {
                        0 => Ok(true),
                        libc::ENOENT => Ok(false),
                        e => Err(io::Error::from_raw_os_error(e)),
                    };
                }
                _ if len >= 20 => {
                    each(b, at + 20, at + len);
                    if !dump {
                        return Ok(true);
                    }
                }
                _ => {}
            }
            at += (len + 3) & !3;
        }
    }
}

/// The netdev family's id and its `mgmt` group's, `None` where the kernel
/// has no such family (before 6.3).
fn family(sock: &std::fs::File) -> io::Result<Option<(u16, Option<u32>)>> {
    let name = b"netdev\0";
    let mut a = Vec::new();
    a.extend_from_slice(&((4 + name.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&CTRL_ATTR_FAMILY_NAME.to_ne_bytes());
    a.extend_from_slice(name);
    a.resize((a.len() + 3) & !3, 0);
    let (mut id, mut group) = (None, None);
    let found = request(sock, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, false, &a, |b, from, to| {
        for (t, p) in attrs(b, from, to) {
            match t {
                CTRL_ATTR_FAMILY_ID if p.len() >= 2 => id = Some(u16_at(b, p.start)),
                CTRL_ATTR_MCAST_GROUPS => {
                    for (_, g) in attrs(b, p.start, p.end) {
                        let (mut gname, mut gid) = (None, None);
                        for (k, v) in attrs(b, g.start, g.end) {
                            match k {
                                CTRL_ATTR_MCAST_GRP_NAME => gname = Some(b[v].to_vec()),
                                CTRL_ATTR_MCAST_GRP_ID if v.len() >= 4 => gid = Some(u32_at(b, v.start)),
                                _ => {}
                            }
                        }
                        if gname.as_deref() == Some(b"mgmt\0") {
                            group = gid;
                        }
                    }
                }
                _ => {}
            }
        }
    })?;
    Ok(if found { id.map(|id| (id, group)) } else { None })
}

/// The XDP features of every device of this network namespace, by
/// ifindex; empty where the kernel cannot tell (no netdev family).
pub fn xdp_features() -> io::Result<Vec<(u32, u64)>> {
    let sock = socket()?;
    let Some((id, _)) = family(&sock)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    request(&sock, id, NETDEV_CMD_DEV_GET, true, &[], |b, from, to| {
        let (mut ifindex, mut features) = (None, 0u64);
        for (t, p) in attrs(b, from, to) {
            match t {
                NETDEV_A_DEV_IFINDEX if p.len() >= 4 => ifindex = Some(u32_at(b, p.start)),
                NETDEV_A_DEV_XDP_FEATURES if p.len() >= 8 => {
                    features = u64::from_ne_bytes(b[p.start..p.start + 8].try_into().unwrap_or_default())
                }
                _ => {}
            }
        }
        if let Some(i) = ifindex {
            out.push((i, features));
        }
    })?;
    Ok(out)
}

/// Whether this kernel's veths report their peer's readiness in
/// `NDO_XMIT` (6.4 and newer; 6.3 reported the veth's own GRO state).
pub fn veth_features_follow_peer() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 4)
}

/// Starts a thread that sends `()` on `tx` whenever a device's XDP
/// features (or the device) change, from the netdev family's `mgmt`
/// group. Does nothing where the kernel has no such family. Stops when
/// `tx` closes.
pub fn watch(tx: tokio::sync::mpsc::Sender<()>) -> io::Result<()> {
    let sock = socket()?;
    let Some((_, Some(group))) = family(&sock)? else {
        return Ok(());
    };
    // SAFETY: a setsockopt on a socket we own, with a u32 option value.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            SOL_NETLINK,
            NETLINK_ADD_MEMBERSHIP,
            (&group as *const u32).cast(),
            4,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    std::thread::Builder::new().name("xdpfeatures".into()).spawn(move || {
        let mut sock = sock;
        let mut buf = vec![0u8; 65536];
        loop {
            match sock.read(&mut buf) {
                // Any notification (or lost ones, ENOBUFS): the caller
                // reads the features again.
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("netdev netlink notifications: {e}; XDP may keep redirecting to an interface that no longer takes XDP frames, or not redirect to one that does");
                    return;
                }
            }
            if tx.blocking_send(()).is_err() {
                return;
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_takes_no_redirected_frames() {
        // lo is ifindex 1 in every namespace; where the kernel has the
        // family it lists lo without NDO_XMIT.
        let f = xdp_features().unwrap();
        if let Some((_, features)) = f.iter().find(|(i, _)| *i == 1) {
            assert_eq!(features & NETDEV_XDP_ACT_NDO_XMIT, 0, "{f:?}");
        } else {
            assert!(f.is_empty(), "lo missing from {f:?}");
        }
    }
}
