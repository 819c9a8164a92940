//! User-side constructors and conversions (feature `user`).

use crate::*;

// SAFETY: every type below is #[repr(C)], has no padding bytes that are
// not explicit fields, and is bytemuck::Pod (checked by the derive).
unsafe impl aya::Pod for ServiceKey {}
unsafe impl aya::Pod for ServiceValue {}
unsafe impl aya::Pod for VipFilter {}
unsafe impl aya::Pod for FrontendFilter {}
unsafe impl aya::Pod for BackendFilter {}
unsafe impl aya::Pod for FrontendBucket {}
unsafe impl aya::Pod for FrontendWay {}
unsafe impl aya::Pod for BackendKey {}
unsafe impl aya::Pod for Backend {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtValue {}
unsafe impl aya::Pod for ServiceStats {}
unsafe impl aya::Pod for MaglevKey {}
unsafe impl aya::Pod for MaglevChunk {}
unsafe impl aya::Pod for AffinityKey {}
unsafe impl aya::Pod for AffinityValue {}
unsafe impl aya::Pod for DpConfig {}
unsafe impl aya::Pod for SourceRangeKey {}
unsafe impl aya::Pod for ServiceName {}
#[cfg(feature = "bench")]
unsafe impl aya::Pod for bench::BenchFrame {}
unsafe impl aya::Pod for SockNatKey {}
unsafe impl aya::Pod for SockNatValue {}
unsafe impl aya::Pod for SockAffinityKey {}
unsafe impl aya::Pod for CtScratch {}
unsafe impl aya::Pod for EndpointKey {}

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `ip` as an [`Addr`] and its family tag.
pub fn addr_of(ip: IpAddr) -> (Addr, u8) {
    match ip {
        IpAddr::V4(a) => (v4_addr(u32::from_ne_bytes(a.octets())), FAMILY_V4),
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// The address `a` of `family` (`FAMILY_V6`, anything else is IPv4).
pub fn ip_of(a: &Addr, family: u8) -> IpAddr {
    if family == FAMILY_V6 {
        let mut o = [0u8; 16];
        for (i, w) in a.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        IpAddr::V4(Ipv4Addr::from(a[0].to_ne_bytes()))
    }
}

/// The family tag of `ip`.
pub fn family_of(ip: IpAddr) -> u8 {
    if ip.is_ipv6() {
        FAMILY_V6
    } else {
        FAMILY_V4
    }
}

impl ServiceKey {
    /// From host-order values.
    pub fn new(addr: impl Into<IpAddr>, port: u16, proto: u8) -> Self {
        let (addr, family) = addr_of(addr.into());
        ServiceKey {
            addr,
            port: port.to_be(),
            proto,
            family,
        }
    }
    pub fn ip(&self) -> IpAddr {
        ip_of(&self.addr, self.family & !KEY_IN_CLUSTER)
    }
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
    pub fn is_v6(&self) -> bool {
        self.family & !KEY_IN_CLUSTER == FAMILY_V6
    }
    /// The in-cluster view of this (external) frontend.
    pub fn in_cluster(self) -> Self {
        ServiceKey {
            family: self.family | KEY_IN_CLUSTER,
            ..self
        }
    }
    pub fn is_in_cluster(&self) -> bool {
        self.family & KEY_IN_CLUSTER != 0
    }
}

impl Backend {
    /// From host-order values.
    pub fn new(addr: impl Into<IpAddr>, port: u16) -> Self {
        let (addr, family) = addr_of(addr.into());
        Backend {
            addr,
            port: port.to_be(),
            flags: if family == FAMILY_V6 {
                BACKEND_F_V6
            } else {
                BACKEND_F_NONE
            },
        }
    }
    pub fn ip(&self) -> IpAddr {
        ip_of(&self.addr, self.family())
    }
    pub fn family(&self) -> u8 {
        if self.flags & BACKEND_F_V6 != 0 {
            FAMILY_V6
        } else {
            FAMILY_V4
        }
    }
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

impl CtKey {
    /// From host-order values; both addresses of one family.
    pub fn new(saddr: impl Into<IpAddr>, sport: u16, daddr: impl Into<IpAddr>, dport: u16, proto: u8) -> Self {
        let (saddr, family) = addr_of(saddr.into());
        let (daddr, _) = addr_of(daddr.into());
        CtKey {
            saddr,
            daddr,
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            family,
            _pad: 0,
        }
    }
    pub fn src_ip(&self) -> IpAddr {
        ip_of(&self.saddr, self.family)
    }
    pub fn dst_ip(&self) -> IpAddr {
        ip_of(&self.daddr, self.family)
    }
}

impl DpConfig {
    /// The SNAT address of `family`, `None` when unset.
    pub fn snat_ip(&self, family: u8) -> Option<IpAddr> {
        let a = if family == FAMILY_V6 {
            self.snat_addr6
        } else {
            v4_addr(self.snat_addr)
        };
        (a != [0; 4]).then(|| ip_of(&a, family))
    }
}
