//! Facts about the node the agent runs on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The IPv4 and IPv6 addresses of this network namespace's interfaces, in
/// interface order and without duplicates, loopback and IPv6 link-local
/// addresses excluded: where NodePort Services are served when no
/// `--node-ip` is given.
pub fn local_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we free with freeifaddrs; every
    // node and its ifa_addr are valid until then.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let a = (*cur).ifa_addr;
            let ip = if a.is_null() {
                None
            } else if (*a).sa_family as i32 == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
            } else if (*a).sa_family as i32 == libc::AF_INET6 {
                let sin6 = &*(a as *const libc::sockaddr_in6);
                Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            } else {
                None
            };
            if let Some(ip) = ip {
                if usable(&ip) && !out.contains(&ip) {
                    out.push(ip);
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    Ok(out)
}

/// Not loopback, not IPv6 link-local (fe80::/10: one per interface, not
/// an address clients reach a node on).
fn usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !a.is_loopback(),
        IpAddr::V6(a) => !a.is_loopback() && (a.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// Where the kernel keeps the ephemeral port range (both families).
pub const EPHEMERAL_PORTS: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// The node's ephemeral port range (`net.ipv4.ip_local_port_range`, in
/// this network namespace).
pub fn ephemeral_ports() -> anyhow::Result<(u16, u16)> {
    let text =
        std::fs::read_to_string(EPHEMERAL_PORTS).map_err(|e| anyhow::anyhow!("reading {EPHEMERAL_PORTS}: {e}"))?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Ok((lo, hi)),
        _ => anyhow::bail!("{EPHEMERAL_PORTS}: expected two ports, found {text:?}"),
    }
}

/// The SNAT source port range: `configured` if it avoids the node's
/// ephemeral ports and `node_ports`, else an error naming the overlap;
/// without one, the largest range of 1024-65535 outside both.
pub fn snat_ports(configured: Option<(u16, u16)>, node_ports: (u16, u16)) -> anyhow::Result<(u16, u16)> {
    choose_snat_ports(configured, ephemeral_ports()?, node_ports)
}

/// [`snat_ports`] with the ephemeral range given.
pub fn choose_snat_ports(
    configured: Option<(u16, u16)>,
    ephemeral: (u16, u16),
    node_ports: (u16, u16),
) -> anyhow::Result<(u16, u16)> {
    let overlaps = |a: (u16, u16), b: (u16, u16)| a.0 <= b.1 && b.0 <= a.1;
    if let Some(r) = configured {
        anyhow::ensure!(
            !overlaps(r, ephemeral),
            "--snat-port-range {}-{} overlaps the node's ephemeral ports (net.ipv4.ip_local_port_range = {} {}): \
             a socket of the node could hold the tuple of a SNATed flow and receive its replies; choose ports \
             outside it, or reserve them with net.ipv4.ip_local_reserved_ports and narrow ip_local_port_range",
            r.0,
            r.1,
            ephemeral.0,
            ephemeral.1
        );
        anyhow::ensure!(
            !overlaps(r, node_ports),
            "--snat-port-range {}-{} overlaps the NodePort range {}-{}: replies to SNATed flows would look like \
             NodePort traffic; choose ports outside it",
            r.0,
            r.1,
            node_ports.0,
            node_ports.1
        );
        return Ok(r);
    }
    // The gaps of 1024-65535 around the two ranges, largest first (the
    // lower one on a tie).
    let mut taken = [ephemeral, node_ports];
    taken.sort();
    let mut best: Option<(u16, u16)> = None;
    let mut from: u32 = 1024;
    for (lo, hi) in taken
        .iter()
        .map(|(l, h)| (*l as u32, *h as u32))
        .chain([(65536, 65536)])
    {
        if lo > from {
            let gap = (from as u16, (lo - 1).min(65535) as u16);
            if best.is_none_or(|b| gap.1 - gap.0 > b.1 - b.0) {
                best = Some(gap);
            }
        }
        from = from.max(hi + 1);
    }
    best.ok_or_else(|| {
        anyhow::anyhow!(
            "no ports for SNAT: the ephemeral ports ({}-{}) and the NodePort range ({}-{}) cover 1024-65535; \
             narrow net.ipv4.ip_local_port_range or pass --snat-port-range",
            ephemeral.0,
            ephemeral.1,
            node_ports.0,
            node_ports.1
        )
    })
}

#[cfg(test)]
mod tests {
    use super::choose_snat_ports;

    #[test]
    fn lists_no_loopback_or_link_local_address() {
        let addrs = super::local_addresses().unwrap();
        assert!(addrs.iter().all(super::usable), "{addrs:?}");
        assert!(!super::usable(&"fe80::1".parse().unwrap()));
        assert!(!super::usable(&"::1".parse().unwrap()));
        assert!(super::usable(&"2001:db8::1".parse().unwrap()));
    }

    /// Linux's and kube-apiserver's defaults leave 1024-29999 and
    /// 61000-65535: the larger is chosen. Other settings move it; a
    /// configured range that overlaps either is refused by name.
    #[test]
    fn snat_ports_avoid_ephemeral_and_node_ports() {
        let np = (30000, 32767);
        assert_eq!(choose_snat_ports(None, (32768, 60999), np).unwrap(), (1024, 29999));
        assert_eq!(choose_snat_ports(None, (1024, 65000), np).unwrap(), (65001, 65535));
        assert_eq!(choose_snat_ports(None, (10000, 29999), np).unwrap(), (32768, 65535));
        assert_eq!(choose_snat_ports(None, (40000, 50000), np).unwrap(), (1024, 29999));
        assert_eq!(
            choose_snat_ports(Some((61000, 62000)), (32768, 60999), np).unwrap(),
            (61000, 62000)
        );
        let e = choose_snat_ports(Some((60000, 61000)), (32768, 60999), np)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("overlaps the node's ephemeral ports (net.ipv4.ip_local_port_range = 32768 60999)"),
            "{e}"
        );
        let e = choose_snat_ports(Some((29000, 30000)), (32768, 60999), np)
            .unwrap_err()
            .to_string();
        assert!(e.contains("overlaps the NodePort range 30000-32767"), "{e}");
        let e = choose_snat_ports(None, (1024, 65535), np).unwrap_err().to_string();
        assert!(e.contains("no ports for SNAT"), "{e}");
    }
}
