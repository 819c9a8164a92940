//! Packet parsing with bounds checks the verifier accepts.
//!
//! Only what the service datapath needs is extracted: the IPv4 5-tuple, the
//! header offsets for the rewrite, the TCP flags and the L3 length.

use core::mem::size_of;

use dataplane_common::{Reason, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPV4_MIN_HLEN: usize = 20;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

/// IPv4 "more fragments" flag and fragment offset mask (network order
/// applied after `u16::from_be`).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SADDR_OFF: usize = 12;
pub const IP_DADDR_OFF: usize = 16;
/// Offsets inside the TCP/UDP header.
pub const L4_SPORT_OFF: usize = 0;
pub const L4_DPORT_OFF: usize = 2;
pub const TCP_FLAGS_OFF: usize = 13;
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;

/// A parsed IPv4 TCP or UDP packet. Addresses and ports are in network byte
/// order, as in the packet and in the map keys.
#[derive(Clone, Copy)]
pub struct Packet {
    /// Offset of the IPv4 header from the start of the frame.
    pub l3_off: usize,
    /// Offset of the TCP/UDP header from the start of the frame.
    pub l4_off: usize,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// IPv4 total length (host order), for byte counters.
    pub l3_len: u16,
    pub saddr: u32,
    pub daddr: u32,
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
}

#[inline(always)]
fn load<T: Copy>(data: usize, data_end: usize, off: usize) -> Result<T, ()> {
    if data + off + size_of::<T>() > data_end {
        return Err(());
    }
    // SAFETY: the range [data+off, data+off+size_of::<T>()) was checked to lie
    // inside the packet; unaligned reads because packet data has no alignment.
    Ok(unsafe { core::ptr::read_unaligned((data + off) as *const T) })
}

/// Parses an Ethernet frame. `Err(reason)` says why the packet is not for
/// the service datapath; it is then passed untouched.
#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Result<Packet, Reason> {
    let ethertype: u16 = load(data, data_end, 12).map_err(|_| Reason::PassNotIp)?;
    if ethertype != ETH_P_IP.to_be() {
        return Err(Reason::PassNotIp);
    }
    let l3_off = ETH_HLEN;
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
    let l4_off = l3_off + ihl;
    let l4_min = if proto == IPPROTO_TCP { TCP_MIN_HLEN } else { UDP_HLEN };
    // The IP header must claim at least its own header and the L4 header,
    // and the frame must hold them.
    if (tot_len as usize) < ihl + l4_min {
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
        tcp_flags,
        l3_len: tot_len,
        saddr,
        daddr,
        sport,
        dport,
    })
}
