//! Following interfaces as they come and go (pods start and stop): the
//! configured names may be glob patterns (`veth*`, `cni?`); every matching
//! interface gets the program, within moments of appearing, and links of
//! vanished interfaces are removed. Changes are noticed through netlink link
//! notifications (RTMGRP_LINK), then the interface list is read again.

use std::{collections::BTreeSet, io, os::fd::FromRawFd};

use tracing::{info, warn};

use crate::bpf::{
    loader::{Dataplane, LoadError, XdpAttachMode},
    pin::{PinError, PinRoot},
};

/// Whether `pattern` (with `*` and `?` wildcards) matches `name`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn m(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => m(&p[1..], n) || (!n.is_empty() && m(p, &n[1..])),
            (Some(b'?'), Some(_)) => m(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &n[1..]),
            _ => false,
        }
    }
    m(pattern.as_bytes(), name.as_bytes())
}

/// The interface names of this network namespace.
pub fn interfaces() -> io::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry,
    // freed with if_freenameindex; names are valid C strings until then.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut cur = list;
        while (*cur).if_index != 0 {
            out.insert(std::ffi::CStr::from_ptr((*cur).if_name).to_string_lossy().into_owned());
            cur = cur.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(out)
}

/// The driver of interface `name` (`ETHTOOL_GDRVINFO`, in the calling
/// thread's network namespace): "veth", "virtio_net", "mlx5_core", ...
pub fn driver(name: &str) -> io::Result<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 5 * 4],
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 32 * 4 + 12 + 5 * 4],
    };
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: a zeroed ifreq is valid; the name fits (checked) with its
    // terminating zero; the ioctl writes at most sizeof(DrvInfo) into
    // `info`, which outlives the call; the socket is closed below.
    unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL, &mut ifr);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(err);
        }
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The kinds of the interfaces in `present` for the programs
/// (`map_names::IFACES`): (ifindex, `IFACE_F_*` bits). Interfaces that
/// vanish while this runs are left out.
pub fn interface_kinds(present: &BTreeSet<String>) -> Vec<(u32, u32)> {
    present
        .iter()
        .filter_map(|name| {
            let c = std::ffi::CString::new(name.as_str()).ok()?;
            // SAFETY: a valid C string.
            let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
            if ifindex == 0 {
                return None;
            }
            let veth = driver(name).is_ok_and(|d| d == "veth");
            Some((ifindex, if veth { dataplane_common::IFACE_F_VETH } else { 0 }))
        })
        .collect()
}

/// The interfaces among `present` that `patterns` select.
pub fn select(patterns: &[String], present: &BTreeSet<String>) -> BTreeSet<String> {
    present
        .iter()
        .filter(|n| patterns.iter().any(|p| glob_match(p, n)))
        .cloned()
        .collect()
}

/// Starts a thread that sends `()` on `tx` whenever a link is added,
/// removed or changed in this network namespace. Stops when `tx` closes.
pub fn watch_links(tx: tokio::sync::mpsc::Sender<()>) -> io::Result<()> {
    const RTMGRP_LINK: u32 = 1;
    // SAFETY: plain socket/bind calls on a socket we own; the sockaddr is
    // zeroed and filled as netlink(7) describes.
    let fd = unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = RTMGRP_LINK;
        let rc = libc::bind(
            fd,
            &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        );
        if rc != 0 {
            let e = io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        std::fs::File::from_raw_fd(fd)
    };
    std::thread::Builder::new().name("ifwatch".into()).spawn(move || {
        use std::io::Read;
        let mut sock = fd;
        let mut buf = vec![0u8; 65536];
        loop {
            match sock.read(&mut buf) {
                // Any link message: the caller re-reads the list.
                Ok(_) => {
                    if tx.blocking_send(()).is_err() {
                        return;
                    }
                }
                // ENOBUFS: notifications were lost; a rescan covers them.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    if tx.blocking_send(()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!("netlink link notifications: {e}; new interfaces are no longer picked up");
                    return;
                }
            }
        }
    })?;
    Ok(())
}

/// Keeps the programs attached to exactly the interfaces the patterns select.
pub struct Attacher {
    tc_patterns: Vec<String>,
    xdp_patterns: Vec<String>,
    xdp_mode: XdpAttachMode,
    tc: BTreeSet<String>,
    xdp: BTreeSet<String>,
}

impl Attacher {
    pub fn new(tc_patterns: Vec<String>, xdp_patterns: Vec<String>, xdp_mode: XdpAttachMode) -> Self {
        Attacher {
            tc_patterns,
            xdp_patterns,
            xdp_mode,
            tc: BTreeSet::new(),
            xdp: BTreeSet::new(),
        }
    }

    /// Attaches to new matching interfaces, forgets (and unpins) vanished
    /// ones. On the first call, link pins of a previous agent that match
    /// nothing any more are removed too.
    pub fn reconcile(&mut self, dp: &mut Dataplane, pins: Option<&PinRoot>, first: bool) -> Result<(), LoadError> {
        let present = interfaces().map_err(|e| {
            LoadError::Pin(PinError::Io {
                path: "if_nameindex".into(),
                source: e,
            })
        })?;
        // Before attaching: host routing reads the kinds of egress
        // interfaces, which may be any interface of the namespace.
        if let Err(e) = dp.set_interface_kinds(&interface_kinds(&present)) {
            warn!("telling the programs the interfaces' kinds: {e}; host routing redirects to veths without entering their peers");
        }
        if first {
            for p in self.tc_patterns.iter().chain(&self.xdp_patterns) {
                if !p.contains(['*', '?']) && !present.contains(p) {
                    warn!(iface = %p, "interface not present yet; the program is attached when it appears");
                }
            }
        }
        for (program, patterns, attached) in [
            ("tc", &self.tc_patterns, &mut self.tc),
            ("xdp", &self.xdp_patterns, &mut self.xdp),
        ] {
            let want = select(patterns, &present);
            for iface in want.difference(&attached.clone()) {
                let how = if program == "tc" {
                    dp.attach_tc(iface)
                } else {
                    dp.attach_xdp(iface, self.xdp_mode)
                };
                match how {
                    Ok(how) => {
                        allow_local_sources(iface);
                        info!(iface = %iface, %how, "{} program attached", if program == "tc" { "TC ingress" } else { "XDP" });
                        attached.insert(iface.clone());
                    }
                    // The interface may have vanished meanwhile; the next
                    // notification retries.
                    Err(e) => warn!(iface = %iface, "attaching: {e}"),
                }
            }
            for iface in attached.difference(&want).cloned().collect::<Vec<_>>() {
                attached.remove(&iface);
                if let Some(pins) = pins {
                    let path = pins.link(program, &iface);
                    if path.exists() {
                        PinRoot::unpin_link(&path)?;
                    }
                }
                info!(iface = %iface, program, "interface gone: link removed");
            }
            if first {
                if let Some(pins) = pins {
                    for (p, iface, path) in pins.pinned_links()? {
                        if p == program && !attached.contains(&iface) {
                            PinRoot::unpin_link(&path)?;
                            info!(iface = %iface, program, "detached: the interface is no longer selected");
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Replies of NodePort flows leave with a node address as their source, and
/// SNATed flows (remote backends, hairpin) enter with one: without
/// accept_local the kernel drops such packets as martians when it forwards
/// them.
fn allow_local_sources(iface: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/accept_local");
    if let Err(e) = std::fs::write(&path, "1") {
        warn!(iface = %iface, "setting {path}: {e}; NodePort replies and SNATed flows through it may be dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_not_a_veth() {
        // lo is ifindex 1 in every network namespace.
        let present: BTreeSet<String> = ["lo".to_string()].into();
        assert_eq!(interface_kinds(&present), vec![(1, 0)]);
        assert!(interface_kinds(&["no-such-if0".to_string()].into()).is_empty());
    }

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth1a2b"));
        assert!(glob_match("veth*", "veth"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(glob_match("eth0", "eth0"));
        assert!(!glob_match("eth0", "eth01"));
        assert!(glob_match("cni?", "cni0"));
        assert!(!glob_match("cni?", "cni10"));
        assert!(glob_match("*", "lo"));
    }

    #[test]
    fn lists_loopback() {
        assert!(interfaces().unwrap().contains("lo"));
    }
}
