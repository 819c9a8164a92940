//! Building and reading Ethernet/IP/TCP-or-UDP frames, IPv4 and IPv6, on
//! etherparse: `dataplane trace` builds its synthetic packet and reads the
//! program's output with it, and the tests craft their frames and check the
//! programs' output with it. Headers are written and checksums computed
//! and verified by etherparse, never by the datapath's own code, so a test
//! that reads a rewritten frame back does not grade the datapath with its
//! own arithmetic.

use std::net::IpAddr;

use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options, Ipv6FlowLabel, Ipv6Header, NetSlice,
    SlicedPacket, TcpHeader, TransportSlice, UdpHeader,
};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// The MAC addresses of every crafted frame (the programs do not read them).
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// A description of an Ethernet/IP/TCP-or-UDP frame; the family is the
/// family of its addresses.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
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
        let mut out = Vec::new();
        match self.proto {
            TCP => {
                let mut h = TcpHeader::new(self.sport, self.dport, self.seq, 64240);
                h.fin = self.tcp_flags & FIN != 0;
                h.syn = self.tcp_flags & SYN != 0;
                h.rst = self.tcp_flags & RST != 0;
                h.psh = self.tcp_flags & PSH != 0;
                h.ack = self.tcp_flags & ACK != 0;
                if h.ack {
                    h.acknowledgment_number = 2000;
                }
                h.checksum = match (self.src, self.dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => h.calc_checksum_ipv4_raw(s.octets(), d.octets(), &self.payload),
                    (IpAddr::V6(s), IpAddr::V6(d)) => h.calc_checksum_ipv6_raw(s.octets(), d.octets(), &self.payload),
                    _ => panic!("mixed address families"),
                }
                .expect("payload fits a TCP segment");
                h.write(&mut out).expect("writing into a Vec");
            }
            UDP => {
                let mut h = match (self.src, self.dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        UdpHeader::with_ipv4_checksum(self.sport, self.dport, &ipv4(s, d, 0), &self.payload)
                    }
                    (IpAddr::V6(s), IpAddr::V6(d)) => {
                        UdpHeader::with_ipv6_checksum(self.sport, self.dport, &ipv6(s, d, 0, 0), &self.payload)
                    }
                    _ => panic!("mixed address families"),
                }
                .expect("payload fits a UDP datagram");
                if self.udp_zero_csum {
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
        let mut f = Vec::new();
        let ether_type = if self.src.is_ipv6() {
            EtherType::IPV6
        } else {
            EtherType::IPV4
        };
        Ethernet2Header {
            source: SRC_MAC,
            destination: DST_MAC,
            ether_type,
        }
        .write(&mut f)
        .expect("writing into a Vec");
        match (self.src, self.dst) {
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                // Extension headers are opaque bytes to us (and to etherparse
                // when written raw): each is next header, length, body.
                let types: Vec<u8> = self.ext_headers.iter().map(|(t, _)| *t).chain([self.proto]).collect();
                let mut ext = Vec::new();
                for (i, (_, body)) in self.ext_headers.iter().enumerate() {
                    assert!((2 + body.len()).is_multiple_of(8), "bad extension header length");
                    ext.push(types[i + 1]);
                    ext.push(((2 + body.len()) / 8 - 1) as u8);
                    ext.extend_from_slice(body);
                }
                let mut ip = ipv6(s, d, types[0], (ext.len() + l4.len()) as u16);
                ip.hop_limit = 64;
                ip.write(&mut f).expect("writing into a Vec");
                f.extend(ext);
            }
            (IpAddr::V4(s), IpAddr::V4(d)) => {
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
            _ => panic!("mixed address families"),
        }
        f.extend(l4);
        f
    }
}

fn ipv4(s: std::net::Ipv4Addr, d: std::net::Ipv4Addr, proto: u8) -> Ipv4Header {
    Ipv4Header::new(0, 64, IpNumber(proto), s.octets(), d.octets()).expect("empty payload")
}

fn ipv6(s: std::net::Ipv6Addr, d: std::net::Ipv6Addr, next: u8, payload_length: u16) -> Ipv6Header {
    Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length,
        next_header: IpNumber(next),
        hop_limit: 64,
        source: s.octets(),
        destination: d.octets(),
    }
}

/// The addresses, the protocol and the L4 bytes (header and payload, as
/// far as the IP length says) of an Ethernet/IP frame, IPv6 extension
/// headers walked over. Nothing is verified.
pub fn ip_payload(frame: &[u8]) -> Result<(IpAddr, IpAddr, u8, &[u8]), String> {
    let p = SlicedPacket::from_ethernet(frame).map_err(|e| format!("not a valid frame: {e}"))?;
    let net = p.net.ok_or("not an IP frame")?;
    let (src, dst) = match &net {
        NetSlice::Ipv4(ip) => (ip.header().source_addr().into(), ip.header().destination_addr().into()),
        NetSlice::Ipv6(ip) => (ip.header().source_addr().into(), ip.header().destination_addr().into()),
        _ => return Err("not an IP frame".into()),
    };
    let payload = net.ip_payload_ref().ok_or("not an IP frame")?;
    Ok((src, dst, payload.ip_number.0, payload.payload))
}

/// What a frame says, read back from bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// The L4 checksum as found in the frame.
    pub l4_csum: u16,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
}

/// Reads an Ethernet/IP/TCP-or-UDP frame (IPv6 extension headers walked
/// over) and verifies the IPv4 header checksum and the L4 checksum, each
/// recomputed by etherparse (a zero UDP checksum over IPv4 means none).
/// `Err` says what is wrong.
pub fn parse_and_verify(frame: &[u8]) -> Result<Parsed, String> {
    let p = SlicedPacket::from_ethernet(frame).map_err(|e| format!("not a valid frame: {e}"))?;
    let (src, dst, proto) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            if h.calc_header_checksum() != h.header_checksum {
                return Err(format!(
                    "IPv4 header checksum {:#06x} invalid (should be {:#06x})",
                    h.header_checksum,
                    h.calc_header_checksum()
                ));
            }
            (
                IpAddr::from(h.source),
                IpAddr::from(h.destination),
                ip.payload().ip_number.0,
            )
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            (
                IpAddr::from(h.source_addr()),
                IpAddr::from(h.destination_addr()),
                ip.payload().ip_number.0,
            )
        }
        _ => return Err("not an IP frame".into()),
    };
    // (what, ports, the checksum found, the checksum it should be; None:
    // none to check, a zero UDP checksum over IPv4), by etherparse.
    let (what, sport, dport, found, want, tcp_flags) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let h = t.to_header();
            let want = match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => h.calc_checksum_ipv4_raw(s.octets(), d.octets(), t.payload()),
                (IpAddr::V6(s), IpAddr::V6(d)) => h.calc_checksum_ipv6_raw(s.octets(), d.octets(), t.payload()),
                _ => unreachable!("one IP header"),
            }
            .map_err(|e| e.to_string())?;
            let flags = [(h.fin, FIN), (h.syn, SYN), (h.rst, RST), (h.psh, PSH), (h.ack, ACK)]
                .iter()
                .filter(|(set, _)| *set)
                .fold(0, |f, (_, bit)| f | bit);
            ("TCP", h.source_port, h.destination_port, h.checksum, Some(want), flags)
        }
        Some(TransportSlice::Udp(u)) => {
            let h = u.to_header();
            let want = match (src, dst) {
                (IpAddr::V4(_), _) if h.checksum == 0 => None,
                (IpAddr::V4(s), IpAddr::V4(d)) => Some(h.calc_checksum_ipv4_raw(s.octets(), d.octets(), u.payload())),
                (IpAddr::V6(s), IpAddr::V6(d)) => Some(h.calc_checksum_ipv6_raw(s.octets(), d.octets(), u.payload())),
                _ => unreachable!("one IP header"),
            }
            .transpose()
            .map_err(|e| e.to_string())?;
            ("UDP", h.source_port, h.destination_port, h.checksum, want, 0)
        }
        _ => return Err(format!("protocol {proto} is neither TCP nor UDP ({src} -> {dst})")),
    };
    if let Some(want) = want.filter(|w| *w != found) {
        return Err(format!(
            "{what} checksum {found:#06x} invalid for {src} -> {dst} (should be {want:#06x})"
        ));
    }
    Ok(Parsed {
        src,
        dst,
        sport,
        dport,
        proto,
        l4_csum: found,
        tcp_flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_read_back_with_valid_checksums() {
        let v4 = |a: [u8; 4]| IpAddr::from(a);
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
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
        frames.push(opts);
        let mut ext = frames[2].clone();
        ext.ext_headers = vec![(0, vec![1, 4, 0, 0, 0, 0])];
        frames.push(ext);
        for f in frames {
            let bytes = f.build();
            let p = parse_and_verify(&bytes).unwrap_or_else(|e| panic!("{f:?}: {e}"));
            assert_eq!(
                (p.src, p.dst, p.sport, p.dport, p.proto),
                (f.src, f.dst, f.sport, f.dport, f.proto)
            );
            assert_eq!(p.tcp_flags, f.tcp_flags);
            // One flipped bit in the L4 checksum is caught.
            let mut bad = bytes.clone();
            let at = bytes.len() - f.payload.len() - if f.proto == TCP { 4 } else { 2 };
            bad[at] ^= 1;
            assert!(parse_and_verify(&bad).is_err(), "{f:?}");
        }
    }
}
