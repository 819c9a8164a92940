//! ICMP errors about translated flows.
//!
//! A router between the node and a backend (fragmentation needed, time
//! exceeded) or the backend itself (port unreachable) answers a packet the
//! node DNATed: the error quotes `client -> backend` and, from the backend,
//! comes from the backend's address. The client only matches errors that
//! quote what it sent (`client -> VIP`) and, for port unreachable, that come
//! from the VIP. So the quoted destination becomes the VIP again, the outer
//! source too when the error came from the backend, and for SNATed flows the
//! quoted source and the outer destination become the client again.
//!
//! Only IPv4 headers without options are handled (outer and quoted); other
//! errors pass untouched. Every checksum is updated incrementally: the outer
//! IPv4 header's, the quoted IPv4 header's, the quoted UDP checksum when
//! present, and the ICMP checksum over all of it (ICMP has no pseudo-header,
//! and ICMP packets never carry partial checksums).

use dataplane_common::{csum, CtKey, CT_F_REPLY, CT_F_SNAT, IPPROTO_TCP, IPPROTO_UDP};

use crate::{maps::DP_CONNTRACK, nat::PacketCtx, parse::ETH_HLEN};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
/// Offsets from the start of the frame, with option-less IPv4 headers.
const OUTER: usize = ETH_HLEN;
const ICMP: usize = OUTER + 20;
const INNER: usize = ICMP + 8;
const INNER_L4: usize = INNER + 20;
/// The frame must hold the quoted IPv4 header and 8 bytes of its payload.
const MIN_LEN: usize = INNER_L4 + 8;

#[inline(always)]
fn at<T: Copy>(data: usize, off: usize) -> T {
    // SAFETY: callers check `data + MIN_LEN <= data_end` first, and every
    // offset used is below MIN_LEN.
    unsafe { core::ptr::read_unaligned((data + off) as *const T) }
}

#[inline(always)]
fn put<T>(data: usize, off: usize, v: T) {
    // SAFETY: as for `at`; the program may write the packet (XDP, and TC
    // with direct packet access).
    unsafe { core::ptr::write_unaligned((data + off) as *mut T, v) }
}

/// Translates an ICMP error about a tracked, translated flow. Returns
/// whether the frame was rewritten.
#[inline(always)]
pub fn translate<C: PacketCtx>(ctx: &C) -> bool {
    let data = ctx.data();
    if data + MIN_LEN > ctx.data_end() {
        return false;
    }
    if at::<u16>(data, 12) != 0x0800u16.to_be()
        || at::<u8>(data, OUTER) != 0x45
        || at::<u8>(data, OUTER + 9) != IPPROTO_ICMP
        || at::<u16>(data, OUTER + 6) & 0x3fffu16.to_be() != 0
        || !matches!(
            at::<u8>(data, ICMP),
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
        )
        || at::<u8>(data, INNER) != 0x45
    {
        return false;
    }
    let proto: u8 = at(data, INNER + 9);
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return false;
    }
    let (in_saddr, in_daddr): (u32, u32) = (at(data, INNER + 12), at(data, INNER + 16));
    let (in_sport, in_dport): (u16, u16) = (at(data, INNER_L4), at(data, INNER_L4 + 2));
    // The quoted packet went client -> backend: its reverse is the flow's
    // reply entry, which holds the VIP (and the client, when SNATed).
    let key = CtKey {
        saddr: in_daddr,
        daddr: in_saddr,
        sport: in_dport,
        dport: in_sport,
        proto,
        _pad: [0; 3],
    };
    let ct = match DP_CONNTRACK.get_ptr(key) {
        // SAFETY: LRU values stay valid for the program run; copied out.
        Some(e) => unsafe { *e },
        None => return false,
    };
    if ct.flags & CT_F_REPLY == 0 {
        return false;
    }
    let outer_saddr: u32 = at(data, OUTER + 12);
    let mut icmp_csum: u16 = at(data, ICMP + 2);
    let mut inner_ip_csum: u16 = at(data, INNER + 10);
    let mut udp_csum: u16 = if proto == IPPROTO_UDP {
        at(data, INNER_L4 + 6)
    } else {
        0
    };
    let old_inner_ip_csum = inner_ip_csum;
    let old_udp_csum = udp_csum;

    // Quoted destination: backend -> VIP.
    inner_ip_csum = csum::replace4(inner_ip_csum, in_daddr, ct.nat_addr);
    icmp_csum = csum::replace4(icmp_csum, in_daddr, ct.nat_addr);
    icmp_csum = csum::replace2(icmp_csum, in_dport, ct.nat_port);
    if udp_csum != 0 {
        udp_csum = csum::replace2(csum::replace4(udp_csum, in_daddr, ct.nat_addr), in_dport, ct.nat_port);
    }
    put(data, INNER + 16, ct.nat_addr);
    put(data, INNER_L4 + 2, ct.nat_port);

    let snat = ct.flags & CT_F_SNAT != 0;
    if snat {
        // Quoted source: node -> client; and the error goes to the client.
        inner_ip_csum = csum::replace4(inner_ip_csum, in_saddr, ct.snat_addr);
        icmp_csum = csum::replace4(icmp_csum, in_saddr, ct.snat_addr);
        icmp_csum = csum::replace2(icmp_csum, in_sport, ct.snat_port);
        if udp_csum != 0 {
            udp_csum = csum::replace2(csum::replace4(udp_csum, in_saddr, ct.snat_addr), in_sport, ct.snat_port);
        }
        put(data, INNER + 12, ct.snat_addr);
        put(data, INNER_L4, ct.snat_port);
        let outer_daddr: u32 = at(data, OUTER + 16);
        let c: u16 = at(data, OUTER + 10);
        put(data, OUTER + 10, csum::replace4(c, outer_daddr, ct.snat_addr));
        put(data, OUTER + 16, ct.snat_addr);
    }
    if proto == IPPROTO_UDP && old_udp_csum != 0 {
        if udp_csum == 0 {
            udp_csum = 0xffff;
        }
        icmp_csum = csum::replace2(icmp_csum, old_udp_csum, udp_csum);
        put(data, INNER_L4 + 6, udp_csum);
    }
    icmp_csum = csum::replace2(icmp_csum, old_inner_ip_csum, inner_ip_csum);
    put(data, INNER + 10, inner_ip_csum);
    put(data, ICMP + 2, icmp_csum);

    // An error from the backend itself must come from the VIP.
    if outer_saddr == in_daddr {
        let c: u16 = at(data, OUTER + 10);
        put(data, OUTER + 10, csum::replace4(c, outer_saddr, ct.nat_addr));
        put(data, OUTER + 12, ct.nat_addr);
    }
    true
}
