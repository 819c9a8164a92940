//! Rejecting flows to a Service without endpoints, as kube-proxy does: a TCP
//! RST for TCP, an ICMP port unreachable for UDP, sent back out of the
//! interface the packet came in on, from the VIP. The client gets
//! ECONNREFUSED at once instead of a timeout.
//!
//! The reply is built in place: XDP resizes with adjust_head/adjust_tail and
//! transmits with XDP_TX; TC resizes with adjust_room/change_tail and
//! redirects to the same interface's egress.

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, TC_ACT_REDIRECT},
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
};
use dataplane_common::{csum, IPPROTO_TCP};

use crate::parse::{Packet, ETH_HLEN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

const IPV4_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;
/// A TCP RST: Ethernet, IPv4 without options, TCP without options.
const RST_LEN: usize = ETH_HLEN + IPV4_HLEN + TCP_HLEN;
/// Bytes inserted in front of the original IPv4 header for an ICMP error.
const ICMP_ROOM: usize = IPV4_HLEN + ICMP_HLEN;
/// An ICMP error quoting the original IPv4 header (no options) and the
/// first 8 bytes of its payload (RFC 792).
const ICMP_LEN: usize = ETH_HLEN + ICMP_ROOM + IPV4_HLEN + UDP_HLEN;
const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

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
        // UDP: the ICMP error quotes a fixed 28 bytes; a header with options
        // would not fit that layout.
        if p.l4_off != ETH_HLEN + IPV4_HLEN {
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
    let ihl = (p.l4_off - p.l3_off) as u32;
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

#[inline(always)]
fn write<T>(data: usize, off: usize, v: T) {
    // SAFETY: callers check [data, data + total length) against data_end
    // before writing any field.
    unsafe { core::ptr::write_unaligned((data + off) as *mut T, v) }
}

/// Writes Ethernet + IPv4 headers of a reply from `saddr` to `daddr`.
#[inline(always)]
fn write_eth_ip(data: usize, o: &Original, saddr: u32, daddr: u32, proto: u8, tot_len: u16) {
    write(data, 0, o.src_mac);
    write(data, 6, o.dst_mac);
    write(data, 12, 0x0800u16.to_be());
    let l3 = ETH_HLEN;
    let frag: u16 = 0x4000; // DF
    let ttl_proto: u16 = (64 << 8) | proto as u16;
    let sum = 0x4500u32 + tot_len as u32 + frag as u32 + ttl_proto as u32 + words(saddr) + words(daddr);
    write(data, l3, 0x4500u16.to_be());
    write(data, l3 + 2, tot_len.to_be());
    write(data, l3 + 4, 0u16); // id
    write(data, l3 + 6, frag.to_be());
    write(data, l3 + 8, ttl_proto.to_be());
    write(data, l3 + 10, (!csum::fold(sum)).to_be());
    write(data, l3 + 12, saddr);
    write(data, l3 + 16, daddr);
}

/// Writes a complete TCP RST answering `p` into `[data, data + RST_LEN)`.
#[inline(always)]
fn write_rst(data: usize, end: usize, p: &Packet, o: &Original) -> Result<(), NoReject> {
    if data + RST_LEN > end {
        return Err(NoReject::Failed);
    }
    write_eth_ip(data, o, p.daddr, p.saddr, IPPROTO_TCP, (IPV4_HLEN + TCP_HLEN) as u16);
    // RFC 793: answer an ACK with <SEQ=SEG.ACK><CTL=RST>, anything else
    // with <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>.
    let (seq, ack, flags) = if o.flags & TCP_ACK != 0 {
        (o.ack_seq, 0, TCP_RST)
    } else {
        (0, o.seq.wrapping_add(o.seg_len), TCP_RST | TCP_ACK)
    };
    let l4 = ETH_HLEN + IPV4_HLEN;
    let off_flags: u16 = (5 << 12) | flags as u16;
    let sum = words(p.daddr)
        + words(p.saddr)
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

/// Writes the outer headers of an ICMP port unreachable into
/// `[data, data + ICMP_LEN)`, whose last 28 bytes already hold the quoted
/// original IPv4 and UDP headers.
#[inline(always)]
fn write_icmp(data: usize, end: usize, p: &Packet, o: &Original) -> Result<(), NoReject> {
    if data + ICMP_LEN > end {
        return Err(NoReject::Failed);
    }
    write_eth_ip(data, o, p.daddr, p.saddr, IPPROTO_ICMP, (ICMP_LEN - ETH_HLEN) as u16);
    let icmp = ETH_HLEN + IPV4_HLEN;
    let type_code: u16 = ((ICMP_DEST_UNREACH as u16) << 8) | ICMP_PORT_UNREACH as u16;
    // The checksum covers the ICMP header and the 28 quoted bytes.
    let mut sum = type_code as u32;
    let quoted = icmp + ICMP_HLEN;
    let mut i = 0;
    while i < IPV4_HLEN + UDP_HLEN {
        // SAFETY: inside [data, data + ICMP_LEN), checked above.
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
    let o = original(ctx.data(), ctx.data_end(), p)?;
    let len = (ctx.data_end() - ctx.data()) as i32;
    if p.is_tcp() {
        // SAFETY: helper call on our own context.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx as *mut _, RST_LEN as i32 - len) } != 0 {
            return Err(NoReject::Failed);
        }
        write_rst(ctx.data(), ctx.data_end(), p, &o)?;
    } else {
        // SAFETY: helper calls on our own context.
        unsafe {
            if bpf_xdp_adjust_head(ctx.ctx as *mut _, -(ICMP_ROOM as i32)) != 0 {
                return Err(NoReject::Failed);
            }
            if bpf_xdp_adjust_tail(ctx.ctx as *mut _, ICMP_LEN as i32 - (len + ICMP_ROOM as i32)) != 0 {
                return Err(NoReject::Failed);
            }
        }
        write_icmp(ctx.data(), ctx.data_end(), p, &o)?;
    }
    Ok(aya_ebpf::bindings::xdp_action::XDP_TX)
}

/// Turns the skb into its reject and redirects it out of the interface it
/// came in on; returns the TC action.
#[inline(always)]
pub fn tc(ctx: &TcContext, p: &Packet) -> Result<i32, NoReject> {
    let o = original(ctx.data(), ctx.data_end(), p)?;
    let skb = ctx.skb.skb;
    if p.is_tcp() {
        // SAFETY: helper call on our own context.
        if unsafe { bpf_skb_change_tail(skb, RST_LEN as u32, 0) } != 0 {
            return Err(NoReject::Failed);
        }
        write_rst(ctx.data(), ctx.data_end(), p, &o)?;
    } else {
        ctx.adjust_room(ICMP_ROOM as i32, BPF_ADJ_ROOM_MAC, 0)
            .map_err(|_| NoReject::Failed)?;
        // SAFETY: helper call on our own context.
        if unsafe { bpf_skb_change_tail(skb, ICMP_LEN as u32, 0) } != 0 {
            return Err(NoReject::Failed);
        }
        // change_tail may leave the new bytes in paged data.
        ctx.pull_data(ICMP_LEN as u32).map_err(|_| NoReject::Failed)?;
        write_icmp(ctx.data(), ctx.data_end(), p, &o)?;
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
