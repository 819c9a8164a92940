//! Building and reading Ethernet frames on etherparse: IPv4 and IPv6,
//! TCP and UDP, and ICMP/ICMPv6 errors that quote a packet. `dataplane
//! trace` builds its synthetic packet and reads the program's output with
//! it; the tests craft their frames and check the programs' output with it.
//!
//! Headers are written, and checksums computed and verified, by etherparse,
//! never by the datapath's own code (`dataplane_common::csum`, the kernel's
//! checksum helpers): a test that reads a rewritten frame back does not
//! grade the datapath with its own arithmetic. Pure: no maps, no syscalls.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    checksum::Sum16BitWords, EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type,
    IpFragOffset, IpNumber, Ipv4Header, Ipv4Options, Ipv6FlowLabel, Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader,
    NetSlice, SlicedPacket, TcpHeader, TransportSlice, UdpHeader,
};

pub const TCP: u8 = IpNumber::TCP.0;
pub const UDP: u8 = IpNumber::UDP.0;
pub const ICMP: u8 = IpNumber::ICMP.0;
pub const ICMPV6: u8 = IpNumber::IPV6_ICMP.0;

/// TCP flag bits, as in the flags byte of the header.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;
pub const ECE: u8 = 0x40;
pub const CWR: u8 = 0x80;

/// The flags in the order they are named.
const FLAG_NAMES: [(u8, &str); 8] = [
    (SYN, "syn"),
    (ACK, "ack"),
    (FIN, "fin"),
    (RST, "rst"),
    (PSH, "psh"),
    (URG, "urg"),
    (ECE, "ece"),
    (CWR, "cwr"),
];

/// The MAC addresses of every crafted frame (the programs do not read them).
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

const HOP_LIMIT: u8 = 64;

/// `syn,ack`, or `none`.
pub fn flag_names(flags: u8) -> String {
    let v: Vec<&str> = FLAG_NAMES
        .iter()
        .filter(|(b, _)| flags & b != 0)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(",")
    }
}

/// A description of an Ethernet/IP/TCP-or-UDP frame; the family is the
/// family of its addresses.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// The TCP flags byte (`SYN | ACK`, ...).
    pub tcp_flags: u8,
    /// TCP sequence number; the acknowledgement number is 2000 when ACK is
    /// set.
    pub seq: u32,
    pub payload: Vec<u8>,
    /// IPv4 options (length a multiple of 4, at most 40).
    pub ip_options: Vec<u8>,
    /// The IPv4 flags/fragment-offset field (host order).
    pub frag: u16,
    /// For UDP: send a zero ("no") checksum (IPv4 only allows it).
    pub udp_zero_csum: bool,
    /// IPv6 extension headers in order: (header type, body after its
    /// next-header and length bytes; 2 + body a multiple of 8).
    pub ext_headers: Vec<(u8, Vec<u8>)>,
}

impl Frame {
    pub fn tcp(src: (impl Into<IpAddr>, u16), dst: (impl Into<IpAddr>, u16), flags: u8) -> Frame {
        Frame {
            src: src.0.into(),
            dst: dst.0.into(),
            sport: src.1,
            dport: dst.1,
            proto: TCP,
            tcp_flags: flags,
            seq: 1000,
            payload: Vec::new(),
            ip_options: Vec::new(),
            frag: 0x4000, // DF
            udp_zero_csum: false,
            ext_headers: Vec::new(),
        }
    }

    pub fn udp(src: (impl Into<IpAddr>, u16), dst: (impl Into<IpAddr>, u16), payload: &[u8]) -> Frame {
        Frame {
            proto: UDP,
            tcp_flags: 0,
            payload: payload.to_vec(),
            ..Frame::tcp(src, dst, 0)
        }
    }

    /// The L4 header and payload, checksum computed by etherparse over the
    /// pseudo-header of `src`/`dst`.
    fn l4(&self) -> Vec<u8> {
        let (src, dst) = family(self.src, self.dst);
        let mut out = Vec::new();
        match self.proto {
            TCP => {
                let mut h = TcpHeader::new(self.sport, self.dport, self.seq, 64240);
                set_tcp_flags(&mut h, self.tcp_flags);
                if h.ack {
                    h.acknowledgment_number = 2000;
                }
                h.checksum = match (src, dst) {
                    (Addrs::V4(s), Addrs::V4(d)) => h.calc_checksum_ipv4_raw(s.octets(), d.octets(), &self.payload),
                    (Addrs::V6(s), Addrs::V6(d)) => h.calc_checksum_ipv6_raw(s.octets(), d.octets(), &self.payload),
                    _ => unreachable!("one family"),
                }
                .expect("payload fits a TCP segment");
                h.write(&mut out).expect("writing into a Vec");
            }
            UDP => {
                let mut h = match (src, dst) {
                    (Addrs::V4(s), Addrs::V4(d)) => {
                        UdpHeader::with_ipv4_checksum(self.sport, self.dport, &ipv4(s, d, UDP), &self.payload)
                    }
                    (Addrs::V6(s), Addrs::V6(d)) => {
                        UdpHeader::with_ipv6_checksum(self.sport, self.dport, &ipv6(s, d, UDP, 0), &self.payload)
                    }
                    _ => unreachable!("one family"),
                }
                .expect("payload fits a UDP datagram");
                if self.udp_zero_csum {
                    // Zero means "no checksum": a field value, not a sum
                    // etherparse would compute.
                    h.checksum = 0;
                }
                h.write(&mut out).expect("writing into a Vec");
            }
            p => panic!("Frame builds TCP and UDP only, not protocol {p}"),
        }
        out.extend_from_slice(&self.payload);
        out
    }

    /// The frame's bytes, with valid checksums.
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4();
        let mut f = ethernet(self.src.is_ipv6());
        match family(self.src, self.dst) {
            (Addrs::V6(s), Addrs::V6(d)) => {
                let ext = self.ipv6_extensions();
                let first = self.ext_headers.first().map_or(self.proto, |(t, _)| *t);
                let len = u16::try_from(ext.len() + l4.len()).expect("payload fits an IPv6 packet");
                ipv6(s, d, first, len).write(&mut f).expect("writing into a Vec");
                f.extend(ext);
            }
            (Addrs::V4(s), Addrs::V4(d)) => {
                let mut ip = ipv4(s, d, self.proto);
                ip.options = Ipv4Options::try_from(self.ip_options.as_slice()).expect("IPv4 options: at most 40 bytes");
                ip.set_payload_len(l4.len()).expect("payload fits an IPv4 packet");
                ip.identification = 0x1234;
                ip.dont_fragment = self.frag & 0x4000 != 0;
                ip.more_fragments = self.frag & 0x2000 != 0;
                ip.fragment_offset = IpFragOffset::try_new(self.frag & 0x1fff).expect("13 bits");
                ip.header_checksum = ip.calc_header_checksum();
                ip.write(&mut f).expect("writing into a Vec");
            }
            _ => unreachable!("one family"),
        }
        f.extend(l4);
        f
    }

    /// The extension headers, each written by etherparse: the fragment
    /// header (44) from its fields, every other one as the generic
    /// next-header/length/body layout.
    fn ipv6_extensions(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (t, body)) in self.ext_headers.iter().enumerate() {
            let next = IpNumber(self.ext_headers.get(i + 1).map_or(self.proto, |(t, _)| *t));
            if *t == IpNumber::IPV6_FRAGMENTATION_HEADER.0 {
                let b: [u8; 6] = body.as_slice().try_into().expect("a fragment header body is 6 bytes");
                let offset = IpFragOffset::try_new(u16::from_be_bytes([b[0], b[1]]) >> 3).expect("13 bits");
                let id = u32::from_be_bytes([b[2], b[3], b[4], b[5]]);
                out.extend(Ipv6FragmentHeader::new(next, offset, b[1] & 1 != 0, id).to_bytes());
            } else {
                let h = Ipv6RawExtHeader::new_raw(next, body).expect("extension header body: 6 + 8n bytes");
                out.extend(h.to_bytes());
            }
        }
        out
    }
}

fn set_tcp_flags(h: &mut TcpHeader, flags: u8) {
    h.fin = flags & FIN != 0;
    h.syn = flags & SYN != 0;
    h.rst = flags & RST != 0;
    h.psh = flags & PSH != 0;
    h.ack = flags & ACK != 0;
    h.urg = flags & URG != 0;
    h.ece = flags & ECE != 0;
    h.cwr = flags & CWR != 0;
}

fn tcp_flags(h: &TcpHeader) -> u8 {
    [
        (h.fin, FIN),
        (h.syn, SYN),
        (h.rst, RST),
        (h.psh, PSH),
        (h.ack, ACK),
        (h.urg, URG),
        (h.ece, ECE),
        (h.cwr, CWR),
    ]
    .iter()
    .filter(|(set, _)| *set)
    .fold(0, |f, (_, bit)| f | bit)
}

/// Source and destination of one family.
#[derive(Clone, Copy)]
enum Addrs {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

fn family(src: IpAddr, dst: IpAddr) -> (Addrs, Addrs) {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (Addrs::V4(s), Addrs::V4(d)),
        (IpAddr::V6(s), IpAddr::V6(d)) => (Addrs::V6(s), Addrs::V6(d)),
        _ => panic!("{src} and {dst} are of different families"),
    }
}

fn ethernet(v6: bool) -> Vec<u8> {
    let ether_type = if v6 { EtherType::IPV6 } else { EtherType::IPV4 };
    Ethernet2Header {
        source: SRC_MAC,
        destination: DST_MAC,
        ether_type,
    }
    .to_bytes()
    .to_vec()
}

fn ipv4(s: Ipv4Addr, d: Ipv4Addr, proto: u8) -> Ipv4Header {
    Ipv4Header::new(0, HOP_LIMIT, IpNumber(proto), s.octets(), d.octets()).expect("empty payload")
}

fn ipv6(s: Ipv6Addr, d: Ipv6Addr, next: u8, payload_length: u16) -> Ipv6Header {
    Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length,
        next_header: IpNumber(next),
        hop_limit: HOP_LIMIT,
        source: s.octets(),
        destination: d.octets(),
    }
}

/// An Ethernet/IPv4/ICMP or Ethernet/IPv6/ICMPv6 error frame from `src` to
/// `dst` of `icmp_type` and `code`, quoting `quoted` (an IP header and the
/// start of its payload), every checksum computed by etherparse. `rest`
/// fills ICMP bytes 4..8 (the next-hop MTU of "fragmentation needed", the
/// MTU of "packet too big"). The IPv4 header has no DF and identification
/// 0, as routers send them.
pub fn icmp_error(
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    icmp_type: u8,
    code: u8,
    rest: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let (src, dst) = (src.into(), dst.into());
    // `Unknown` writes type, code and bytes 4..8 exactly as given, whatever
    // the type; the typed variants would drop the bytes their type leaves
    // unused, and the tests choose every byte.
    let (type_u8, code_u8, bytes5to8) = (icmp_type, code, rest.to_be_bytes());
    let mut f = ethernet(src.is_ipv6());
    match family(src, dst) {
        (Addrs::V4(s), Addrs::V4(d)) => {
            let icmp = Icmpv4Header::with_checksum(
                Icmpv4Type::Unknown {
                    type_u8,
                    code_u8,
                    bytes5to8,
                },
                quoted,
            );
            let mut ip = ipv4(s, d, ICMP);
            ip.set_payload_len(icmp.header_len() + quoted.len())
                .expect("payload fits an IPv4 packet");
            ip.dont_fragment = false;
            ip.header_checksum = ip.calc_header_checksum();
            ip.write(&mut f).expect("writing into a Vec");
            icmp.write(&mut f).expect("writing into a Vec");
        }
        (Addrs::V6(s), Addrs::V6(d)) => {
            let icmp = Icmpv6Header::with_checksum(
                Icmpv6Type::Unknown {
                    type_u8,
                    code_u8,
                    bytes5to8,
                },
                s.octets(),
                d.octets(),
                quoted,
            )
            .expect("payload fits an ICMPv6 message");
            let len = u16::try_from(icmp.header_len() + quoted.len()).expect("payload fits an IPv6 packet");
            ipv6(s, d, ICMPV6, len).write(&mut f).expect("writing into a Vec");
            icmp.write(&mut f).expect("writing into a Vec");
        }
        _ => unreachable!("one family"),
    }
    f.extend_from_slice(quoted);
    f
}

/// The Internet checksum (RFC 1071) of `data` on top of a partial sum
/// `partial` of 16-bit words in host order (a pseudo-header, say), by
/// etherparse's one's complement arithmetic: for bytes no header type
/// describes (deliberately broken frames, quoted headers). A correct
/// checksum field makes the checksum of its whole header zero.
pub fn checksum(data: &[u8], partial: u32) -> u16 {
    let sum = Sum16BitWords::new().add_4bytes(partial.to_be_bytes()).add_slice(data);
    // etherparse sums in native byte order and gives the result in the
    // order of the bytes it summed (`to_be` turns it into a value).
    u16::from_be(sum.ones_complement())
}

/// A frame sliced by etherparse: its IP addresses and protocol, and the
/// IP header's checksum as found and as it should be (IPv4).
struct Ip<'a> {
    packet: SlicedPacket<'a>,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    header_csum: Option<(u16, u16)>,
}

/// Slices an Ethernet/IP frame (VLAN tags and IPv6 extension headers walked
/// over by etherparse) whose IP packet ends exactly where the frame ends.
fn slice(frame: &[u8]) -> Result<Ip<'_>, String> {
    let packet = SlicedPacket::from_ethernet(frame).map_err(|e| format!("not a valid frame: {e}"))?;
    let (src, dst, start, len, header_csum) = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            let header = h.to_header();
            (
                IpAddr::from(h.source_addr()),
                IpAddr::from(h.destination_addr()),
                h.slice(),
                usize::from(h.total_len()),
                Some((header.header_checksum, header.calc_header_checksum())),
            )
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            (
                IpAddr::from(h.source_addr()),
                IpAddr::from(h.destination_addr()),
                h.slice(),
                Ipv6Header::LEN + usize::from(h.payload_length()),
                None,
            )
        }
        _ => return Err("not an IP frame".into()),
    };
    let at = start.as_ptr() as usize - frame.as_ptr() as usize;
    if frame.len() != at + len {
        return Err(format!(
            "the IP length says {len} bytes, the frame holds {} after the link header",
            frame.len() - at
        ));
    }
    let payload = packet
        .net
        .as_ref()
        .and_then(|n| n.ip_payload_ref())
        .ok_or("not an IP frame")?;
    let proto = payload.ip_number.0;
    Ok(Ip {
        packet,
        src,
        dst,
        proto,
        header_csum,
    })
}

impl Ip<'_> {
    fn verify_header(&self) -> Result<(), String> {
        match self.header_csum {
            Some((found, want)) if found != want => Err(format!(
                "IPv4 header checksum {found:#06x} invalid (should be {want:#06x})"
            )),
            _ => Ok(()),
        }
    }
}

/// What a TCP or UDP frame says, read back from bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// The L4 checksum as found in the frame.
    pub l4_csum: u16,
    /// The TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgement numbers (0 for UDP).
    pub seq: u32,
    pub ack: u32,
}

/// Reads an Ethernet/IP/TCP-or-UDP frame; nothing is verified but the
/// lengths. `Err` says what it is not.
pub fn parse(frame: &[u8]) -> Result<Parsed, String> {
    read(&slice(frame)?).map(|(p, _)| p)
}

/// Reads an Ethernet/IP/TCP-or-UDP frame and verifies the IPv4 header
/// checksum and the L4 checksum, each recomputed by etherparse (a zero UDP
/// checksum over IPv4 means none). `Err` says what is wrong.
pub fn parse_and_verify(frame: &[u8]) -> Result<Parsed, String> {
    let ip = slice(frame)?;
    ip.verify_header()?;
    let (p, want) = read(&ip)?;
    if let Some(want) = want.filter(|w| *w != p.l4_csum) {
        return Err(format!(
            "{} checksum {:#06x} invalid for {} -> {} (should be {want:#06x})",
            if p.proto == TCP { "TCP" } else { "UDP" },
            p.l4_csum,
            p.src,
            p.dst
        ));
    }
    Ok(p)
}

/// The frame's TCP or UDP header, and the checksum it should carry (None:
/// none to check, a zero UDP checksum over IPv4), computed by etherparse.
fn read(ip: &Ip<'_>) -> Result<(Parsed, Option<u16>), String> {
    let (src, dst, proto) = (ip.src, ip.dst, ip.proto);
    let mut p = Parsed {
        src,
        dst,
        sport: 0,
        dport: 0,
        proto,
        l4_csum: 0,
        tcp_flags: 0,
        seq: 0,
        ack: 0,
    };
    let want = match &ip.packet.transport {
        Some(TransportSlice::Tcp(t)) => {
            let h = t.to_header();
            (p.sport, p.dport, p.l4_csum) = (h.source_port, h.destination_port, h.checksum);
            (p.tcp_flags, p.seq, p.ack) = (tcp_flags(&h), h.sequence_number, h.acknowledgment_number);
            Some(match family(src, dst) {
                (Addrs::V4(s), Addrs::V4(d)) => h.calc_checksum_ipv4_raw(s.octets(), d.octets(), t.payload()),
                (Addrs::V6(s), Addrs::V6(d)) => h.calc_checksum_ipv6_raw(s.octets(), d.octets(), t.payload()),
                _ => unreachable!("one family"),
            })
        }
        Some(TransportSlice::Udp(u)) => {
            let h = u.to_header();
            (p.sport, p.dport, p.l4_csum) = (h.source_port, h.destination_port, h.checksum);
            match family(src, dst) {
                (Addrs::V4(_), _) if h.checksum == 0 => None,
                (Addrs::V4(s), Addrs::V4(d)) => Some(h.calc_checksum_ipv4_raw(s.octets(), d.octets(), u.payload())),
                (Addrs::V6(s), Addrs::V6(d)) => Some(h.calc_checksum_ipv6_raw(s.octets(), d.octets(), u.payload())),
                _ => unreachable!("one family"),
            }
        }
        _ => return Err(format!("protocol {proto} is neither TCP nor UDP ({src} -> {dst})")),
    }
    .transpose()
    .map_err(|e| e.to_string())?;
    Ok((p, want))
}

/// An ICMP or ICMPv6 message read back from a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedIcmp {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub icmp_type: u8,
    pub code: u8,
    /// ICMP bytes 4..8 (an MTU, a pointer, or unused).
    pub rest: u32,
    /// Everything after the 8-byte ICMP header: for an error, the quoted
    /// IP header and the start of its payload.
    pub quoted: Vec<u8>,
}

/// Reads an Ethernet/IPv4/ICMP frame, verifying the IPv4 header checksum
/// and the ICMP checksum (over the ICMP header and everything after it), or
/// an Ethernet/IPv6/ICMPv6 frame, verifying the ICMPv6 checksum (with its
/// pseudo-header); every checksum recomputed by etherparse.
pub fn parse_icmp(frame: &[u8]) -> Result<ParsedIcmp, String> {
    let ip = slice(frame)?;
    ip.verify_header()?;
    // The checksums are computed from the raw type, code and bytes 4..8
    // (`Unknown`): the typed variants assume unused bytes are zero.
    let (raw, found, want) = match (&ip.packet.transport, family(ip.src, ip.dst)) {
        (Some(TransportSlice::Icmpv4(i)), (Addrs::V4(_), _)) => {
            let t = Icmpv4Type::Unknown {
                type_u8: i.type_u8(),
                code_u8: i.code_u8(),
                bytes5to8: i.bytes5to8(),
            };
            (i.slice(), i.checksum(), t.calc_checksum(&i.slice()[8..]))
        }
        (Some(TransportSlice::Icmpv6(i)), (Addrs::V6(s), Addrs::V6(d))) => {
            let t = Icmpv6Type::Unknown {
                type_u8: i.type_u8(),
                code_u8: i.code_u8(),
                bytes5to8: i.bytes5to8(),
            };
            let want = t
                .calc_checksum(s.octets(), d.octets(), &i.slice()[8..])
                .map_err(|e| e.to_string())?;
            (i.slice(), i.checksum(), want)
        }
        _ => {
            return Err(format!(
                "protocol {} is not ICMP of its family ({} -> {})",
                ip.proto, ip.src, ip.dst
            ))
        }
    };
    if found != want {
        return Err(format!(
            "ICMP checksum {found:#06x} invalid for {} -> {} (should be {want:#06x})",
            ip.src, ip.dst
        ));
    }
    Ok(ParsedIcmp {
        src: ip.src,
        dst: ip.dst,
        icmp_type: raw[0],
        code: raw[1],
        rest: u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]),
        quoted: raw[8..].to_vec(),
    })
}

/// One line about a frame, nothing verified: `tcp 198.18.0.2:40000 ->
/// 198.19.0.10:80 flags syn`, `udp ...`, `icmp 198.19.0.10 -> 198.18.0.2
/// type 3 code 3`, `icmpv6 ...`, `ip proto 47 ...`, or what it is not.
pub fn summary(frame: &[u8]) -> String {
    let ip = match slice(frame) {
        Ok(ip) => ip,
        Err(e) => return e,
    };
    let (src, dst) = (ip.src, ip.dst);
    match &ip.packet.transport {
        Some(TransportSlice::Tcp(t)) => format!(
            "tcp {} -> {} flags {}",
            std::net::SocketAddr::new(src, t.source_port()),
            std::net::SocketAddr::new(dst, t.destination_port()),
            flag_names(tcp_flags(&t.to_header()))
        ),
        Some(TransportSlice::Udp(u)) => format!(
            "udp {} -> {}",
            std::net::SocketAddr::new(src, u.source_port()),
            std::net::SocketAddr::new(dst, u.destination_port())
        ),
        Some(TransportSlice::Icmpv4(i)) => {
            format!("icmp {src} -> {dst} type {} code {}", i.type_u8(), i.code_u8())
        }
        Some(TransportSlice::Icmpv6(i)) => {
            format!("icmpv6 {src} -> {dst} type {} code {}", i.type_u8(), i.code_u8())
        }
        _ => format!("ip proto {} {src} -> {dst}", ip.proto),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> IpAddr {
        IpAddr::from(a)
    }

    fn v6(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn built_frames_read_back_with_valid_checksums() {
        let mut frames = vec![
            Frame::tcp((v4([198, 18, 100, 2]), 40000), (v4([198, 19, 0, 10]), 80), SYN),
            Frame::udp((v4([198, 18, 100, 2]), 5353), (v4([198, 19, 0, 10]), 53), b"who"),
            Frame::tcp(
                (v6("2001:db8:100::2"), 40000),
                (v6("2001:db8:19::30"), 50051),
                SYN | ACK,
            ),
            Frame::udp((v6("2001:db8:100::2"), 5353), (v6("2001:db8:19::30"), 53), b"who"),
        ];
        let mut opts = frames[0].clone();
        opts.ip_options = vec![1, 1, 1, 0];
        opts.payload = b"data".to_vec();
        opts.tcp_flags = PSH | ACK | URG | ECE | CWR;
        frames.push(opts);
        let mut ext = frames[2].clone();
        ext.ext_headers = vec![
            (0, vec![1, 4, 0, 0, 0, 0]),
            (60, vec![1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        ];
        frames.push(ext);
        for f in frames {
            let bytes = f.build();
            let p = parse_and_verify(&bytes).unwrap_or_else(|e| panic!("{f:?}: {e}"));
            assert_eq!(
                (p.src, p.dst, p.sport, p.dport, p.proto),
                (f.src, f.dst, f.sport, f.dport, f.proto)
            );
            assert_eq!(p.tcp_flags, f.tcp_flags);
            assert_eq!(parse(&bytes), Ok(p.clone()));
            // One flipped bit in the L4 checksum is caught.
            let mut bad = bytes.clone();
            let at = bytes.len() - f.payload.len() - if f.proto == TCP { 4 } else { 2 };
            bad[at] ^= 1;
            let e = parse_and_verify(&bad).unwrap_err();
            assert!(e.contains("checksum"), "{e}");
            // Reading without verifying still works.
            assert_eq!(parse(&bad).map(|b| (b.sport, b.dport)), Ok((p.sport, p.dport)));
        }
    }

    /// The exact bytes of a TCP SYN, as the programs' tests expect them;
    /// the two checksums were worked out apart from etherparse (RFC 1071
    /// by hand: IPv4 header 0x9c74, TCP with its pseudo-header 0x125e).
    #[test]
    fn frames_have_the_expected_bytes() {
        let syn = Frame::tcp((v4([198, 18, 0, 1]), 0x1234), (v4([198, 19, 0, 1]), 80), SYN).build();
        let want: Vec<u8> = [
            &DST_MAC[..],
            &SRC_MAC,
            &[0x08, 0x00],
            // IPv4: 40 bytes, id 0x1234, DF, TTL 64, TCP.
            &[0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0x9c, 0x74],
            &[198, 18, 0, 1, 198, 19, 0, 1],
            // TCP: seq 1000, no ack, offset 5, SYN, window 64240.
            &[0x12, 0x34, 0, 80, 0, 0, 0x03, 0xe8, 0, 0, 0, 0, 0x50, 0x02, 0xfa, 0xf0],
            &[0x12, 0x5e, 0, 0],
        ]
        .concat();
        assert_eq!(syn, want);
        assert_eq!(checksum(&syn[14..34], 0), 0, "a valid header sums to zero");
        // The TCP segment with its pseudo-header (addresses, protocol, length).
        let pseudo = 0xc612 + 0x0001 + 0xc613 + 0x0001 + u32::from(TCP) + 20;
        assert_eq!(checksum(&syn[34..], pseudo), 0);
        // Without its checksum field (and the zero urgent pointer), the
        // segment sums to exactly that field.
        assert_eq!(checksum(&syn[34..50], pseudo), 0x125e);
    }

    #[test]
    fn ipv6_extension_headers_are_written_in_order() {
        let mut f = Frame::tcp((v6("2001:db8::1"), 1), (v6("2001:db8::2"), 2), SYN);
        f.ext_headers = vec![(0, vec![1, 4, 0, 0, 0, 0]), (44, vec![0, 0, 0, 0, 0, 1])];
        let b = f.build();
        assert_eq!(b[14 + 6], 0, "first: hop-by-hop");
        assert_eq!(&b[54..62], &[44, 0, 1, 4, 0, 0, 0, 0]);
        assert_eq!(&b[62..70], &[TCP, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(usize::from(u16::from_be_bytes([b[18], b[19]])), 16 + 20);
    }

    #[test]
    fn icmp_errors_read_back_with_valid_checksums() {
        let quoted = Frame::udp((v4([198, 18, 0, 1]), 5000), (v4([198, 19, 0, 1]), 53), b"q").build();
        for (src, dst, t, code, rest, q) in [
            (v4([198, 18, 9, 1]), v4([198, 18, 0, 1]), 3, 4, 1400, &quoted[14..42]),
            (v6("2001:db8:9::1"), v6("2001:db8::1"), 2, 0, 1280, &quoted[14..]),
        ] {
            let f = icmp_error(src, dst, t, code, rest, q);
            let i = parse_icmp(&f).unwrap();
            assert_eq!(
                i,
                ParsedIcmp {
                    src,
                    dst,
                    icmp_type: t,
                    code,
                    rest,
                    quoted: q.to_vec()
                }
            );
            assert_eq!(
                summary(&f),
                format!(
                    "icmp{} {src} -> {dst} type {t} code {code}",
                    if src.is_ipv6() { "v6" } else { "" }
                )
            );
            // A bit flipped in the quote, the checksum no longer holds.
            let mut bad = f.clone();
            *bad.last_mut().unwrap() ^= 0x40;
            assert!(parse_icmp(&bad).unwrap_err().contains("ICMP checksum"));
        }
    }

    #[test]
    fn lengths_must_fill_the_frame() {
        let mut f = Frame::tcp((v4([198, 18, 0, 1]), 1), (v4([198, 19, 0, 1]), 2), SYN).build();
        f.push(0);
        assert!(parse(&f).unwrap_err().contains("IP length"));
        f.truncate(f.len() - 2);
        assert!(parse(&f).is_err());
    }

    #[test]
    fn summaries_name_what_a_frame_is() {
        let f = Frame::tcp((v6("2001:db8::1"), 40000), (v6("2001:db8::2"), 80), SYN | ACK).build();
        assert_eq!(summary(&f), "tcp [2001:db8::1]:40000 -> [2001:db8::2]:80 flags syn,ack");
        let f = Frame::udp((v4([198, 18, 0, 1]), 1), (v4([198, 19, 0, 1]), 2), b"").build();
        assert_eq!(summary(&f), "udp 198.18.0.1:1 -> 198.19.0.1:2");
        assert_eq!(flag_names(0), "none");
        assert!(summary(&[0u8; 20]).starts_with("not"));
    }
}
