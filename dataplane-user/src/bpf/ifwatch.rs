//! Following interfaces as they come and go (pods start and stop): the
//! configured names may be glob patterns (`veth*`, `cni?`); every matching
//! interface gets the program, within moments of appearing, and links of
//! vanished interfaces are removed. Changes are noticed through netlink link
//! notifications (RTMGRP_LINK), then the interface list is read again.

use std::{
    collections::BTreeSet,
    io,
    os::fd::{AsRawFd, FromRawFd},
};

use tracing::{info, warn};

use crate::bpf::{
    loader::{Dataplane, LoadError, XdpAttachMode},
    pin::{PinError, PinRoot},
    xdpfeatures,
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

/// A netlink route socket of this network namespace (closed on drop).
fn route_socket() -> io::Result<std::fs::File> {
    // SAFETY: a plain socket call; the fd is ours and owned by the File.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(std::fs::File::from_raw_fd(fd))
    }
}

/// The kinds of this network namespace's interfaces for the programs
/// (`map_names::IFACES`): (ifindex, `IFACE_F_*` bits), from one netlink
/// link dump (RTM_GETLINK): a veth by its link kind, its peer in another
/// namespace by the presence of `IFLA_LINK_NETNSID`; whether it takes
/// frames redirected by XDP from the kernel's XDP features
/// (`xdpfeatures`).
pub fn interface_kinds() -> io::Result<Vec<(u32, u32)>> {
    let mut kinds = link_kinds()?;
    let features = xdpfeatures::xdp_features().unwrap_or_else(|e| {
        warn!("reading the interfaces' XDP features (netdev netlink): {e}; XDP redirects nothing");
        Vec::new()
    });
    let veths_follow_peer = xdpfeatures::veth_features_follow_peer();
    for (ifindex, flags) in &mut kinds {
        let xmit = features
            .iter()
            .any(|(i, f)| i == ifindex && f & xdpfeatures::NETDEV_XDP_ACT_NDO_XMIT != 0);
        if xmit && (*flags & dataplane_common::IFACE_F_VETH == 0 || veths_follow_peer) {
            *flags |= dataplane_common::IFACE_F_XDP_XMIT;
        }
    }
    Ok(kinds)
}

/// The link-kind part of [`interface_kinds`].
fn link_kinds() -> io::Result<Vec<(u32, u32)>> {
    // linux/rtnetlink.h, linux/netlink.h, linux/if_link.h.
    const RTM_NEWLINK: u16 = 16;
    const RTM_GETLINK: u16 = 18;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const IFLA_LINKINFO: u16 = 18;
    const IFLA_LINK_NETNSID: u16 = 37;
    const IFLA_INFO_KIND: u16 = 1;
    // nlmsghdr (16 bytes) + ifinfomsg (16 bytes, all zero: every link).
    let mut req = [0u8; 32];
    req[0..4].copy_from_slice(&32u32.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    let sock = route_socket()?;
    // SAFETY: the socket is open; the request buffer is valid for the call.
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    use super::xdpfeatures::{attrs, u16_at, u32_at};
    let mut kinds = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        use std::io::Read;
        let n = (&sock).read(&mut buf)?;
        let b = &buf[..n];
        let mut at = 0;
        while at + 16 <= n {
            let len = u32_at(b, at) as usize;
            if len < 16 || at + len > n {
                break;
            }
            match u16_at(b, at + 4) {
                NLMSG_DONE => return Ok(kinds),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(b[at + 16..at + 20].try_into().unwrap_or_default());
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                RTM_NEWLINK if len >= 32 => {
                    let ifindex = u32_at(b, at + 20);
                    let (mut veth, mut peer_elsewhere) = (false, false);
                    for (kind, payload) in attrs(b, at + 32, at + len) {
                        match kind {
                            IFLA_LINK_NETNSID => peer_elsewhere = true,
                            IFLA_LINKINFO => {
                                for (k, v) in attrs(b, payload.start, payload.end) {
                                    if k == IFLA_INFO_KIND && b[v].starts_with(b"veth\0") {
                                        veth = true;
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    let mut flags = 0;
                    if veth {
                        flags |= dataplane_common::IFACE_F_VETH;
                        if peer_elsewhere {
                            flags |= dataplane_common::IFACE_F_PEER_NETNS;
                        }
                    }
                    kinds.push((ifindex, flags));
                }
                _ => {}
            }
            at += (len + 3) & !3;
        }
    }
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
/// removed or changed in this network namespace, or a device's XDP
/// features change (`xdpfeatures::watch`). Stops when `tx` closes.
pub fn watch_links(tx: tokio::sync::mpsc::Sender<()>) -> io::Result<()> {
    const RTMGRP_LINK: u32 = 1;
    if let Err(e) = xdpfeatures::watch(tx.clone()) {
        warn!("subscribing to netdev netlink notifications: {e}; XDP does not learn of veth peers turning GRO or XDP on or off");
    }
    let fd = route_socket()?;
    // SAFETY: a bind call on a socket we own; the sockaddr is zeroed and
    // filled as netlink(7) describes.
    unsafe {
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = RTMGRP_LINK;
        let rc = libc::bind(
            fd.as_raw_fd(),
            &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
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
    /// The interface kinds last written to the programs' map: a link event
    /// that changes no kind (most do not) writes nothing.
    kinds: Vec<(u32, u32)>,
}

impl Attacher {
    pub fn new(tc_patterns: Vec<String>, xdp_patterns: Vec<String>, xdp_mode: XdpAttachMode) -> Self {
        Attacher {
            tc_patterns,
            xdp_patterns,
            xdp_mode,
            tc: BTreeSet::new(),
            xdp: BTreeSet::new(),
            kinds: Vec::new(),
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
        match interface_kinds() {
            Ok(kinds) if kinds == self.kinds => {}
            Ok(kinds) => match dp.set_interface_kinds(&kinds) {
                Ok(()) => {
                    let targets = xdp_targets(&kinds);
                    if targets != xdp_targets(&self.kinds) {
                        info!(ifindexes = ?targets, "interfaces XDP can redirect translated packets to");
                    }
                    self.kinds = kinds
                }
                Err(e) => {
                    // Written again at the next link event.
                    self.kinds.clear();
                    warn!("telling the programs the interfaces' kinds: {e}; host routing redirects to veths without entering their peers");
                }
            },
            Err(e) => warn!("reading the interfaces' kinds (RTM_GETLINK): {e}; the programs keep the last ones"),
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

/// The interfaces among `kinds` that take XDP frames (`IFACE_F_XDP_XMIT`).
fn xdp_targets(kinds: &[(u32, u32)]) -> Vec<u32> {
    kinds
        .iter()
        .filter(|(_, f)| f & dataplane_common::IFACE_F_XDP_XMIT != 0)
        .map(|(i, _)| *i)
        .collect()
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
        let kinds = interface_kinds().unwrap();
        assert!(kinds.contains(&(1, 0)), "{kinds:?}");
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
