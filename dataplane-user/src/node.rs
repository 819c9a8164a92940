//! Facts about the node the agent runs on.

use std::net::Ipv4Addr;

/// The IPv4 addresses of this network namespace's interfaces, loopback
/// excluded, in interface order and without duplicates: where NodePort
/// Services are served when no `--node-ip` is given.
pub fn local_ipv4_addresses() -> std::io::Result<Vec<Ipv4Addr>> {
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
            if !a.is_null() && (*a).sa_family as i32 == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && !out.contains(&ip) {
                    out.push(ip);
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_no_loopback_address() {
        let addrs = super::local_ipv4_addresses().unwrap();
        assert!(addrs.iter().all(|a| !a.is_loopback()), "{addrs:?}");
    }
}
