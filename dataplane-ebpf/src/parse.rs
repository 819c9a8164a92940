//! Packet parsing with bounds checks the verifier accepts.
//!
//! Only what the service datapath needs is extracted: the 5-tuple (either
//! family, addresses as 16-byte `Addr`s), the header offsets for the
//! rewrite, the TCP flags and the L3 length. IPv6 extension headers that a
//! router or host may add on the way (hop-by-hop, destination options, a
//! routing header with no segments left) are walked over; fragments pass.

use core::mem::size_of;

use dataplane_common::{v4_addr, Addr, Reason, FAMILY_V4, FAMILY_V6, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

/// IPv4 "more fragments" flag and fragment offset mask (network order
/// applied after `u16::from_be`).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// IPv6 extension headers (next-header values).
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked over before giving up (RFC 8200's recommended
/// order has at most hop-by-hop, destination options, routing, destination
/// options before the upper layer).
const MAX_EXT_HEADERS: usize = 4;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SADDR_OFF: usize = 12;
pub const IP_DADDR_OFF: usize = 16;
/// Offsets inside the IPv6 header.
pub const IP6_SADDR_OFF: usize = 8;
pub const IP6_DADDR_OFF: usize = 24;
/// Offsets inside the TCP/UDP header.
pub const L4_SPORT_OFF: usize = 0;
pub const L4_DPORT_OFF: usize = 2;
pub const TCP_FLAGS_OFF: usize = 13;
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;

/// A parsed TCP or UDP packet of either family. Addresses and ports are in
/// network byte order, as in the packet and in the map keys.
#[derive(Clone, Copy)]
pub struct Packet {
    /// Offset of the IP header from the start of the frame.
    pub l3_off: usize,
    /// Offset of the TCP/UDP header from the start of the frame.
    pub l4_off: usize,
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// IP length in bytes (IPv4 total length, IPv6 40 + payload length),
    /// host order, for byte counters.
    pub l3_len: u16,
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
}

impl Packet {
    /// Offset of the L4 checksum field from the start of the frame.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off
            + if self.proto == IPPROTO_TCP {
                TCP_CSUM_OFF
            } else {
                UDP_CSUM_OFF
            }
    }

    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == IPPROTO_TCP
    }

    #[inline(always)]
    pub fn is_udp(&self) -> bool {
        self.proto == IPPROTO_UDP
    }

    #[inline(always)]
    pub fn is_v6(&self) -> bool {
        self.family == FAMILY_V6
    }

    /// Length of the IP header(s) in front of L4, extension headers included.
    #[inline(always)]
    pub fn l3_hlen(&self) -> usize {
        self.l4_off - self.l3_off
    }
}

#[inline(always)]
pub fn load<T: Copy>(data: usize, data_end: usize, off: usize) -> Result<T, ()> {
    if data + off + size_of::<T>() > data_end {
        return Err(());
    }
    // SAFETY: the range [data+off, data+off+size_of::<T>()) was checked to lie
    // inside the packet; unaligned reads because packet data has no alignment.
    Ok(unsafe { core::ptr::read_unaligned((data + off) as *const T) })
}

/// What the IP layer tells: where L4 starts, its protocol, the addresses
/// and the IP length.
struct L3 {
    family: u8,
    l4_off: usize,
    proto: u8,
    l3_len: u16,
    saddr: Addr,
    daddr: Addr,
}

/// Parses an Ethernet frame. `Err(reason)` says why the packet is not for
/// the service datapath; it is then passed untouched.
#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Result<Packet, Reason> {
    let ethertype: u16 = load(data, data_end, 12).map_err(|_| Reason::PassNotIp)?;
    let l3_off = ETH_HLEN;
    let l3 = if ethertype == ETH_P_IP.to_be() {
        ipv4(data, data_end, l3_off)?
    } else if ethertype == ETH_P_IPV6.to_be() {
        ipv6(data, data_end, l3_off)?
    } else {
        return Err(Reason::PassNotIp);
    };
    let proto = l3.proto;
    let l4_off = l3.l4_off;
    let l4_min = if proto == IPPROTO_TCP { TCP_MIN_HLEN } else { UDP_HLEN };
    // The IP header must claim at least its own headers and the L4 header,
    // and the frame must hold them.
    if (l3.l3_len as usize) < (l4_off - l3_off) + l4_min {
        return Err(Reason::PassTruncated);
    }
    if data + l4_off + l4_min > data_end {
        return Err(Reason::PassTruncated);
    }
    let sport: u16 = load(data, data_end, l4_off + L4_SPORT_OFF).map_err(|_| Reason::PassTruncated)?;
    let dport: u16 = load(data, data_end, l4_off + L4_DPORT_OFF).map_err(|_| Reason::PassTruncated)?;
    let tcp_flags = if proto == IPPROTO_TCP {
        load::<u8>(data, data_end, l4_off + TCP_FLAGS_OFF).map_err(|_| Reason::PassTruncated)?
    } else {
        0
    };
    Ok(Packet {
        l3_off,
        l4_off,
        proto,
        family: l3.family,
        tcp_flags,
        l3_len: l3.l3_len,
        saddr: l3.saddr,
        daddr: l3.daddr,
        sport,
        dport,
    })
}

#[inline(always)]
fn ipv4(data: usize, data_end: usize, l3_off: usize) -> Result<L3, Reason> {
    let vhl: u8 = load(data, data_end, l3_off).map_err(|_| Reason::PassTruncated)?;
    if vhl >> 4 != 4 {
        return Err(Reason::PassTruncated);
    }
    let ihl = ((vhl & 0x0f) as usize) * 4;
    if ihl < IPV4_MIN_HLEN {
        return Err(Reason::PassTruncated);
    }
    // The fixed part of the header must be present before reading fields.
    if data + l3_off + IPV4_MIN_HLEN > data_end {
        return Err(Reason::PassTruncated);
    }
    let tot_len = u16::from_be(load::<u16>(data, data_end, l3_off + 2).map_err(|_| Reason::PassTruncated)?);
    let frag = u16::from_be(load::<u16>(data, data_end, l3_off + 6).map_err(|_| Reason::PassTruncated)?);
    let proto: u8 = load(data, data_end, l3_off + 9).map_err(|_| Reason::PassTruncated)?;
    let saddr: u32 = load(data, data_end, l3_off + IP_SADDR_OFF).map_err(|_| Reason::PassTruncated)?;
    let daddr: u32 = load(data, data_end, l3_off + IP_DADDR_OFF).map_err(|_| Reason::PassTruncated)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Reason::PassNotTcpUdp);
    }
    // Any fragment, first or later: the ports are not in every fragment, so
    // translating only some of them would break reassembly. Passed untouched.
    if frag & (IP_MF | IP_OFFSET) != 0 {
        return Err(Reason::PassFragment);
    }
    Ok(L3 {
        family: FAMILY_V4,
        l4_off: l3_off + ihl,
        proto,
        l3_len: tot_len,
        saddr: v4_addr(saddr),
        daddr: v4_addr(daddr),
    })
}

#[inline(always)]
fn ipv6(data: usize, data_end: usize, l3_off: usize) -> Result<L3, Reason> {
    if data + l3_off + IPV6_HLEN > data_end {
        return Err(Reason::PassTruncated);
    }
    let vtc: u8 = load(data, data_end, l3_off).map_err(|_| Reason::PassTruncated)?;
    if vtc >> 4 != 6 {
        return Err(Reason::PassTruncated);
    }
    let payload_len = u16::from_be(load::<u16>(data, data_end, l3_off + 4).map_err(|_| Reason::PassTruncated)?);
    let mut nexthdr: u8 = load(data, data_end, l3_off + 6).map_err(|_| Reason::PassTruncated)?;
    let saddr: Addr = load(data, data_end, l3_off + IP6_SADDR_OFF).map_err(|_| Reason::PassTruncated)?;
    let daddr: Addr = load(data, data_end, l3_off + IP6_DADDR_OFF).map_err(|_| Reason::PassTruncated)?;
    let mut off = l3_off + IPV6_HLEN;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        match nexthdr {
            IPPROTO_TCP | IPPROTO_UDP => break,
            NEXTHDR_FRAGMENT => return Err(Reason::PassFragment),
            NEXTHDR_HOP | NEXTHDR_DEST | NEXTHDR_ROUTING => {
                // [next header, length in 8-octet units beyond the first 8, ...]
                let hdr: [u8; 4] = load(data, data_end, off).map_err(|_| Reason::PassTruncated)?;
                // A routing header with segments left: the destination is
                // an intermediate hop, not the final (L4 checksummed) one.
                if nexthdr == NEXTHDR_ROUTING && hdr[3] != 0 {
                    return Err(Reason::PassExtHeaders);
                }
                nexthdr = hdr[0];
                off += (hdr[1] as usize + 1) * 8;
            }
            _ => return Err(Reason::PassNotTcpUdp),
        }
        i += 1;
    }
    if nexthdr != IPPROTO_TCP && nexthdr != IPPROTO_UDP {
        return Err(Reason::PassExtHeaders);
    }
    Ok(L3 {
        family: FAMILY_V6,
        l4_off: off,
        proto: nexthdr,
        l3_len: (IPV6_HLEN as u16).saturating_add(payload_len),
        saddr,
        daddr,
    })
}
