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

#[cfg(test)]
mod tests {
    #[test]
    fn lists_no_loopback_or_link_local_address() {
        let addrs = super::local_addresses().unwrap();
        assert!(addrs.iter().all(super::usable), "{addrs:?}");
        assert!(!super::usable(&"fe80::1".parse().unwrap()));
        assert!(!super::usable(&"::1".parse().unwrap()));
        assert!(super::usable(&"2001:db8::1".parse().unwrap()));
    }
}
