//! Rejecting flows to a Service without endpoints, as kube-proxy does: a TCP
//! RST for TCP, an ICMP / ICMPv6 port unreachable for UDP, sent back out of
//! the interface the packet came in on, from the VIP. The client gets
//! ECONNREFUSED at once instead of a timeout.
//!
//! The reply is built in place: XDP resizes with adjust_head/adjust_tail and
//! transmits with XDP_TX; TC resizes with adjust_room/change_tail and
//! redirects to the same interface's egress. One implementation serves both
//! families, instantiated for each (`V6`): only the header layout differs.

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, TC_ACT_REDIRECT},
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
};
use dataplane_common::{csum, Addr, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP};

use crate::parse::{Packet, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;

/// The IP header length of a reply (IPv4 without options, IPv6 without
/// extension headers).
const fn l3_hlen(v6: bool) -> usize {
    if v6 {
        40
    } else {
        20
    }
}
/// A TCP RST: Ethernet, IP, TCP without options.
const fn rst_len(v6: bool) -> usize {
    ETH_HLEN + l3_hlen(v6) + TCP_HLEN
}
/// Bytes inserted in front of the original IP header for an ICMP error.
const fn icmp_room(v6: bool) -> usize {
    l3_hlen(v6) + ICMP_HLEN
}
/// An ICMP error quoting the original IP header (no options / extension
/// headers) and the UDP header (RFC 792; RFC 4443 allows more, this is
/// enough for the client to match its socket).
const fn icmp_len(v6: bool) -> usize {
    ETH_HLEN + icmp_room(v6) + l3_hlen(v6) + UDP_HLEN
}

/// What a reject needs to know about the original packet, read before the
/// buffer is rewritten.
#[derive(Clone, Copy)]
pub struct Original {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    /// Only for TCP: sequence, acknowledgement, segment length.
    seq: u32,
    ack_seq: u32,
    seg_len: u32,
    flags: u8,
}

/// Why a packet cannot be answered with a reject; it is dropped instead.
pub enum NoReject {
    /// Never answer a RST (RFC 793), nor reply to unparsable packets.
    NotAllowed,
    /// A helper or bounds check failed.
    Failed,
}

#[inline(always)]
fn read<T: Copy>(data: usize, end: usize, off: usize) -> Result<T, NoReject> {
    if data + off + core::mem::size_of::<T>() > end {
        return Err(NoReject::Failed);
    }
    // SAFETY: bounds checked just above; packet data is unaligned.
    Ok(unsafe { core::ptr::read_unaligned((data + off) as *const T) })
}

#[inline(always)]
pub fn original(data: usize, end: usize, p: &Packet) -> Result<Original, NoReject> {
    let dst_mac: [u8; 6] = read(data, end, 0)?;
    let src_mac: [u8; 6] = read(data, end, 6)?;
    if !p.is_tcp() {
        // UDP: the ICMP error quotes a fixed IP + UDP header; a header with
        // options or extension headers would not fit that layout.
        if p.l4_off != ETH_HLEN + l3_hlen(p.is_v6()) {
            return Err(NoReject::NotAllowed);
        }
        return Ok(Original {
            src_mac,
            dst_mac,
            seq: 0,
            ack_seq: 0,
            seg_len: 0,
            flags: 0,
        });
    }
    if p.tcp_flags & TCP_RST != 0 {
        return Err(NoReject::NotAllowed);
    }
    let seq = u32::from_be(read(data, end, p.l4_off + 4)?);
    let ack_seq = u32::from_be(read(data, end, p.l4_off + 8)?);
    let doff = ((read::<u8>(data, end, p.l4_off + 12)? >> 4) as u32) * 4;
    let ihl = p.l3_hlen() as u32;
    let payload = (p.l3_len as u32).saturating_sub(ihl + doff);
    let seg_len = payload + (p.tcp_flags & TCP_SYN != 0) as u32 + (p.tcp_flags & TCP_FIN != 0) as u32;
    Ok(Original {
        src_mac,
        dst_mac,
        seq,
        ack_seq,
        seg_len,
        flags: p.tcp_flags,
    })
}

/// Sum of a u32 in network order as two 16-bit words.
#[inline(always)]
fn words(v: u32) -> u32 {
    let v = u32::from_be(v);
    (v >> 16) + (v & 0xffff)
}

/// Sum of an address as 16-bit words (an IPv4 address's zero words add 0).
#[inline(always)]
fn addr_sum(a: &Addr) -> u32 {
    words(a[0]) + words(a[1]) + words(a[2]) + words(a[3])
}

#[inline(always)]
fn write<T>(data: usize, off: usize, v: T) {
    // SAFETY: callers check [data, data + total length) against data_end
    // before writing any field.
    unsafe { core::ptr::write_unaligned((data + off) as *mut T, v) }
}

/// Writes Ethernet + IP headers of a reply from `saddr` to `daddr`
/// carrying `payload_len` bytes of `proto`.
#[inline(always)]
fn write_eth_ip<const V6: bool>(data: usize, o: &Original, saddr: &Addr, daddr: &Addr, proto: u8, payload_len: u16) {
    write(data, 0, o.src_mac);
    write(data, 6, o.dst_mac);
    let l3 = ETH_HLEN;
    if V6 {
        write(data, 12, ETH_P_IPV6.to_be());
        write(data, l3, 0x6000_0000u32.to_be()); // version, class, flow label
        write(data, l3 + 4, payload_len.to_be());
        write(data, l3 + 6, proto);
        write(data, l3 + 7, 64u8); // hop limit
        write(data, l3 + 8, *saddr);
        write(data, l3 + 24, *daddr);
    } else {
        write(data, 12, ETH_P_IP.to_be());
        let tot_len = payload_len + 20;
        let frag: u16 = 0x4000; // DF
        let ttl_proto: u16 = (64 << 8) | proto as u16;
        let sum = 0x4500u32 + tot_len as u32 + frag as u32 + ttl_proto as u32 + words(saddr[0]) + words(daddr[0]);
        write(data, l3, 0x4500u16.to_be());
        write(data, l3 + 2, tot_len.to_be());
        write(data, l3 + 4, 0u16); // id
        write(data, l3 + 6, frag.to_be());
        write(data, l3 + 8, ttl_proto.to_be());
        write(data, l3 + 10, (!csum::fold(sum)).to_be());
        write(data, l3 + 12, saddr[0]);
        write(data, l3 + 16, daddr[0]);
    }
}

/// Writes a complete TCP RST answering `p` into `[data, data + rst_len)`.
#[inline(always)]
fn write_rst<const V6: bool>(data: usize, end: usize, p: &Packet, o: &Original) -> Result<(), NoReject> {
    if data + rst_len(V6) > end {
        return Err(NoReject::Failed);
    }
    write_eth_ip::<V6>(data, o, &p.daddr, &p.saddr, IPPROTO_TCP, TCP_HLEN as u16);
    // RFC 793: answer an ACK with <SEQ=SEG.ACK><CTL=RST>, anything else
    // with <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>.
    let (seq, ack, flags) = if o.flags & TCP_ACK != 0 {
        (o.ack_seq, 0, TCP_RST)
    } else {
        (0, o.seq.wrapping_add(o.seg_len), TCP_RST | TCP_ACK)
    };
    let l4 = ETH_HLEN + l3_hlen(V6);
    let off_flags: u16 = (5 << 12) | flags as u16;
    // The pseudo-header sums the same in both families (addresses, the
    // protocol and the TCP length).
    let sum = addr_sum(&p.daddr)
        + addr_sum(&p.saddr)
        + IPPROTO_TCP as u32
        + TCP_HLEN as u32
        + u16::from_be(p.dport) as u32
        + u16::from_be(p.sport) as u32
        + (seq >> 16)
        + (seq & 0xffff)
        + (ack >> 16)
        + (ack & 0xffff)
        + off_flags as u32;
    write(data, l4, p.dport);
    write(data, l4 + 2, p.sport);
    write(data, l4 + 4, seq.to_be());
    write(data, l4 + 8, ack.to_be());
    write(data, l4 + 12, off_flags.to_be());
    write(data, l4 + 14, 0u16); // window
    write(data, l4 + 16, (!csum::fold(sum)).to_be());
    write(data, l4 + 18, 0u16); // urgent pointer
    Ok(())
}

/// Writes the outer headers of an ICMP / ICMPv6 port unreachable into
/// `[data, data + icmp_len)`, whose tail already holds the quoted original
/// IP and UDP headers.
#[inline(always)]
fn write_icmp<const V6: bool>(data: usize, end: usize, p: &Packet, o: &Original) -> Result<(), NoReject> {
    if data + icmp_len(V6) > end {
        return Err(NoReject::Failed);
    }
    let (proto, type_code) = if V6 {
        (
            IPPROTO_ICMPV6,
            ((ICMPV6_DEST_UNREACH as u16) << 8) | ICMPV6_PORT_UNREACH as u16,
        )
    } else {
        (
            IPPROTO_ICMP,
            ((ICMP_DEST_UNREACH as u16) << 8) | ICMP_PORT_UNREACH as u16,
        )
    };
    let icmp_msg_len = (icmp_len(V6) - ETH_HLEN - l3_hlen(V6)) as u32;
    write_eth_ip::<V6>(data, o, &p.daddr, &p.saddr, proto, icmp_msg_len as u16);
    let icmp = ETH_HLEN + l3_hlen(V6);
    // The checksum covers the ICMP header and the quoted bytes; ICMPv6's
    // also a pseudo-header (RFC 4443 2.3).
    let mut sum = type_code as u32;
    if V6 {
        sum += addr_sum(&p.daddr) + addr_sum(&p.saddr) + icmp_msg_len + IPPROTO_ICMPV6 as u32;
    }
    let quoted = icmp + ICMP_HLEN;
    let mut i = 0;
    while i < l3_hlen(V6) + UDP_HLEN {
        // SAFETY: inside [data, data + icmp_len), checked above.
        sum += u16::from_be(unsafe { core::ptr::read_unaligned((data + quoted + i) as *const u16) }) as u32;
        i += 2;
    }
    write(data, icmp, type_code.to_be());
    write(data, icmp + 2, (!csum::fold(sum)).to_be());
    write(data, icmp + 4, 0u32); // unused
    Ok(())
}

/// Turns the packet into its reject and returns the XDP action to send it.
#[inline(always)]
pub fn xdp(ctx: &XdpContext, p: &Packet) -> Result<u32, NoReject> {
    if p.is_v6() {
        xdp_family::<true>(ctx, p)
    } else {
        xdp_family::<false>(ctx, p)
    }
}

#[inline(always)]
fn xdp_family<const V6: bool>(ctx: &XdpContext, p: &Packet) -> Result<u32, NoReject> {
    let o = original(ctx.data(), ctx.data_end(), p)?;
    let len = (ctx.data_end() - ctx.data()) as i32;
    if p.is_tcp() {
        // SAFETY: helper call on our own context.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx as *mut _, rst_len(V6) as i32 - len) } != 0 {
            return Err(NoReject::Failed);
        }
        write_rst::<V6>(ctx.data(), ctx.data_end(), p, &o)?;
    } else {
        let room = icmp_room(V6) as i32;
        // SAFETY: helper calls on our own context.
        unsafe {
            if bpf_xdp_adjust_head(ctx.ctx as *mut _, -room) != 0 {
                return Err(NoReject::Failed);
            }
            if bpf_xdp_adjust_tail(ctx.ctx as *mut _, icmp_len(V6) as i32 - (len + room)) != 0 {
                return Err(NoReject::Failed);
            }
        }
        write_icmp::<V6>(ctx.data(), ctx.data_end(), p, &o)?;
    }
    Ok(aya_ebpf::bindings::xdp_action::XDP_TX)
}

/// Turns the skb into its reject and redirects it out of the interface it
/// came in on; returns the TC action.
#[inline(always)]
pub fn tc(ctx: &TcContext, p: &Packet) -> Result<i32, NoReject> {
    if p.is_v6() {
        tc_family::<true>(ctx, p)
    } else {
        tc_family::<false>(ctx, p)
    }
}

#[inline(always)]
fn tc_family<const V6: bool>(ctx: &TcContext, p: &Packet) -> Result<i32, NoReject> {
    let o = original(ctx.data(), ctx.data_end(), p)?;
    let skb = ctx.skb.skb;
    if p.is_tcp() {
        // SAFETY: helper call on our own context.
        if unsafe { bpf_skb_change_tail(skb, rst_len(V6) as u32, 0) } != 0 {
            return Err(NoReject::Failed);
        }
        write_rst::<V6>(ctx.data(), ctx.data_end(), p, &o)?;
    } else {
        ctx.adjust_room(icmp_room(V6) as i32, BPF_ADJ_ROOM_MAC, 0)
            .map_err(|_| NoReject::Failed)?;
        // SAFETY: helper call on our own context.
        if unsafe { bpf_skb_change_tail(skb, icmp_len(V6) as u32, 0) } != 0 {
            return Err(NoReject::Failed);
        }
        // change_tail may leave the new bytes in paged data.
        ctx.pull_data(icmp_len(V6) as u32).map_err(|_| NoReject::Failed)?;
        write_icmp::<V6>(ctx.data(), ctx.data_end(), p, &o)?;
    }
    // SAFETY: reading the ingress ifindex of our own skb.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: helper call without memory arguments.
    let action = unsafe { bpf_redirect(ifindex, 0) } as i32;
    if action != TC_ACT_REDIRECT {
        return Err(NoReject::Failed);
    }
    Ok(action)
}
