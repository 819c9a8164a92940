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
//! Both families are handled by one implementation instantiated for each
//! (`V6`): ICMP errors (destination unreachable incl. fragmentation needed,
//! time exceeded, parameter problem) and ICMPv6 errors (destination
//! unreachable, packet too big, time exceeded, parameter problem). Only
//! IPv4 headers without options and IPv6 headers without extension headers
//! are handled (outer and quoted); other errors pass untouched. Every
//! checksum is updated incrementally: the outer IPv4 header's, the quoted
//! IPv4 header's, the quoted UDP checksum when present, and the ICMP
//! checksum over all of it (ICMPv6's also covers a pseudo-header with the
//! outer addresses; ICMP packets never carry partial checksums).

use dataplane_common::{
    csum, v4_addr, Addr, CtKey, CT_F_REPLY, CT_F_SNAT, FAMILY_V4, FAMILY_V6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
    IPPROTO_UDP,
};

use crate::{
    maps::scratch,
    nat::{self, csum_replace_addr, PacketCtx},
    parse::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_PARAMPROB: u8 = 4;

/// The layout of an error of one family: offsets from the start of the
/// frame of the outer IP header, the ICMP header, the quoted IP header and
/// the quoted L4 header, and where addresses sit in an IP header.
struct Layout {
    l3: usize,
    saddr: usize,
    daddr: usize,
    words: usize,
}

const fn layout(v6: bool) -> Layout {
    if v6 {
        Layout {
            l3: 40,
            saddr: 8,
            daddr: 24,
            words: 4,
        }
    } else {
        Layout {
            l3: 20,
            saddr: 12,
            daddr: 16,
            words: 1,
        }
    }
}

const OUTER: usize = ETH_HLEN;
const fn icmp_off(v6: bool) -> usize {
    OUTER + layout(v6).l3
}
const fn inner_off(v6: bool) -> usize {
    icmp_off(v6) + 8
}
const fn inner_l4_off(v6: bool) -> usize {
    inner_off(v6) + layout(v6).l3
}
/// The frame must hold the quoted IP header and 8 bytes of its payload.
pub const fn min_len(v6: bool) -> usize {
    inner_l4_off(v6) + 8
}

#[inline(always)]
fn at<T: Copy>(data: usize, off: usize) -> T {
    // SAFETY: callers check `data + min_len <= data_end` first, and every
    // offset used is below min_len of the family.
    unsafe { core::ptr::read_unaligned((data + off) as *const T) }
}

#[inline(always)]
fn put<T>(data: usize, off: usize, v: T) {
    // SAFETY: as for `at`; the program may write the packet (XDP, and TC
    // with direct packet access).
    unsafe { core::ptr::write_unaligned((data + off) as *mut T, v) }
}

#[inline(always)]
fn get_addr<const V6: bool>(data: usize, off: usize) -> Addr {
    if V6 {
        at(data, off)
    } else {
        v4_addr(at(data, off))
    }
}

#[inline(always)]
fn put_addr<const V6: bool>(data: usize, off: usize, a: &Addr) {
    if V6 {
        // SAFETY: as for `put`.
        unsafe { nat::put_addr16(data + off, a) }
    } else {
        put(data, off, a[0])
    }
}

/// Translates an ICMP or ICMPv6 error about a tracked, translated flow.
/// Returns whether the frame was rewritten.
#[inline(always)]
pub fn translate<C: PacketCtx>(ctx: &C) -> bool {
    let data = ctx.data();
    if data + 14 > ctx.data_end() {
        return false;
    }
    let ethertype: u16 = at(data, 12);
    if ethertype == ETH_P_IP.to_be() {
        translate_family::<false, C>(ctx)
    } else if ethertype == ETH_P_IPV6.to_be() {
        translate_family::<true, C>(ctx)
    } else {
        false
    }
}

/// Whether the frame is an error this module translates: the outer header
/// carries ICMP(v6) directly, of an error type, quoting TCP or UDP. Returns
/// the quoted protocol.
#[inline(always)]
fn quoted_proto<const V6: bool>(data: usize) -> Option<u8> {
    let (icmp, inner) = (icmp_off(V6), inner_off(V6));
    let proto: u8 = if V6 {
        if at::<u8>(data, OUTER) >> 4 != 6
            || at::<u8>(data, OUTER + 6) != IPPROTO_ICMPV6
            || !matches!(
                at::<u8>(data, icmp),
                ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED | ICMPV6_PARAMPROB
            )
            || at::<u8>(data, inner) >> 4 != 6
        {
            return None;
        }
        at(data, inner + 6)
    } else {
        if at::<u8>(data, OUTER) != 0x45
            || at::<u8>(data, OUTER + 9) != IPPROTO_ICMP
            || at::<u16>(data, OUTER + 6) & 0x3fffu16.to_be() != 0
            || !matches!(
                at::<u8>(data, icmp),
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
            )
            || at::<u8>(data, inner) != 0x45
        {
            return None;
        }
        at(data, inner + 9)
    };
    (proto == IPPROTO_TCP || proto == IPPROTO_UDP).then_some(proto)
}

/// The checksums an error's translation updates: the ICMP one, the quoted
/// IPv4 header's (IPv4 only) and the quoted UDP one (0: none).
struct Sums {
    icmp: u16,
    inner_ip: u16,
    udp: u16,
}

impl Sums {
    /// Rewrites one quoted endpoint, its address at `at.0` and its port at
    /// `at.1`, from `old` to `new`, folding the change into the checksums
    /// that cover it (the quoted UDP checksum's pseudo-header included).
    #[inline(always)]
    fn quoted<const V6: bool>(&mut self, data: usize, at: (usize, usize), old: (&Addr, u16), new: (&Addr, u16)) {
        let words = layout(V6).words;
        if !V6 {
            self.inner_ip = csum::replace4(self.inner_ip, old.0[0], new.0[0]);
        }
        self.icmp = csum::replace2(csum_replace_addr(self.icmp, old.0, new.0, words), old.1, new.1);
        if self.udp != 0 {
            self.udp = csum::replace2(csum_replace_addr(self.udp, old.0, new.0, words), old.1, new.1);
        }
        put_addr::<V6>(data, at.0, new.0);
        put(data, at.1, new.1);
    }

    /// Rewrites an outer address at `off` from `old` to `new`: in the IPv4
    /// header checksum, or in ICMPv6's pseudo-header.
    #[inline(always)]
    fn outer<const V6: bool>(&mut self, data: usize, off: usize, old: &Addr, new: &Addr) {
        if V6 {
            self.icmp = csum_replace_addr(self.icmp, old, new, 4);
        } else {
            let c: u16 = at(data, OUTER + 10);
            put(data, OUTER + 10, csum::replace4(c, old[0], new[0]));
        }
        put_addr::<V6>(data, off, new);
    }
}

#[inline(never)]
fn translate_family<const V6: bool, C: PacketCtx>(ctx: &C) -> bool {
    let data = ctx.data();
    if data + min_len(V6) > ctx.data_end() {
        return false;
    }
    let Some(proto) = quoted_proto::<V6>(data) else {
        return false;
    };
    let l = layout(V6);
    let (icmp, inner, inner_l4) = (icmp_off(V6), inner_off(V6), inner_l4_off(V6));
    let in_saddr = get_addr::<V6>(data, inner + l.saddr);
    let in_daddr = get_addr::<V6>(data, inner + l.daddr);
    let (in_sport, in_dport): (u16, u16) = (at(data, inner_l4), at(data, inner_l4 + 2));
    // The quoted packet went client -> backend: its reverse is the flow's
    // reply entry, which holds the VIP (and the client, when SNATed).
    let Some(s) = scratch() else {
        return false;
    };
    // SAFETY: this CPU's scratch entry (see `CtScratch`).
    let key = unsafe { &mut (*s).key };
    *key = CtKey {
        saddr: in_daddr,
        daddr: in_saddr,
        sport: in_dport,
        dport: in_sport,
        proto,
        family: if V6 { FAMILY_V6 } else { FAMILY_V4 },
        _pad: 0,
    };
    let ct = match crate::conntrack::entry(key) {
        // SAFETY: LRU values stay valid for the program run.
        Some(e) => unsafe { &*e },
        None => return false,
    };
    if ct.flags & CT_F_REPLY == 0 {
        return false;
    }
    let outer_saddr = get_addr::<V6>(data, OUTER + l.saddr);
    let outer_daddr = get_addr::<V6>(data, OUTER + l.daddr);
    let mut sums = Sums {
        icmp: at(data, icmp + 2),
        inner_ip: if V6 { 0 } else { at(data, inner + 10) },
        udp: if proto == IPPROTO_UDP {
            at(data, inner_l4 + 6)
        } else {
            0
        },
    };
    let (old_inner_ip_csum, old_udp_csum) = (sums.inner_ip, sums.udp);

    // Quoted destination: backend -> VIP.
    let dst = (inner + l.daddr, inner_l4 + 2);
    sums.quoted::<V6>(data, dst, (&in_daddr, in_dport), (&ct.nat_addr, ct.nat_port));
    if ct.flags & CT_F_SNAT != 0 {
        // Quoted source: node -> client; and the error goes to the client.
        let src = (inner + l.saddr, inner_l4);
        sums.quoted::<V6>(data, src, (&in_saddr, in_sport), (&ct.snat_addr, ct.snat_port));
        sums.outer::<V6>(data, OUTER + l.daddr, &outer_daddr, &ct.snat_addr);
    }
    if proto == IPPROTO_UDP && old_udp_csum != 0 {
        if sums.udp == 0 {
            sums.udp = 0xffff;
        }
        sums.icmp = csum::replace2(sums.icmp, old_udp_csum, sums.udp);
        put(data, inner_l4 + 6, sums.udp);
    }
    if !V6 {
        sums.icmp = csum::replace2(sums.icmp, old_inner_ip_csum, sums.inner_ip);
        put(data, inner + 10, sums.inner_ip);
    }
    // An error from the backend itself must come from the VIP.
    if dataplane_common::addr_eq(&outer_saddr, &in_daddr) {
        sums.outer::<V6>(data, OUTER + l.saddr, &outer_saddr, &ct.nat_addr);
    }
    let icmp_csum = sums.icmp;
    put(data, icmp + 2, icmp_csum);
    true
}
