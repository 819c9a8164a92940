//! Crafting frames and checking them, independently of the datapath's own
//! code: checksums here are always recomputed from scratch. IPv4 and IPv6:
//! the family of a frame is the family of its addresses.

use std::net::IpAddr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;

/// The Internet checksum of `data` with an initial partial `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            (chunk[0] as u16) << 8
        };
        sum += word as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub const ICMPV6: u8 = 58;

pub fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn ip_at(b: &[u8], v6: bool) -> IpAddr {
    if v6 {
        IpAddr::from(<[u8; 16]>::try_from(&b[..16]).unwrap())
    } else {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    }
}

/// The pseudo-header sum (RFC 793 / RFC 8200 8.1: the same sum for both).
fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut sum = proto as u32 + len as u32;
    for a in [octets(src), octets(dst)] {
        for w in a.chunks(2) {
            sum += u16::from_be_bytes([w[0], w[1]]) as u32;
        }
    }
    sum
}

/// A description of an Ethernet/IP/TCP-or-UDP frame (IPv4 or IPv6, after
/// the addresses).
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// IPv4 options (length a multiple of 4, at most 40).
    pub ip_options: Vec<u8>,
    /// The IPv4 flags/fragment-offset field (host order).
    pub frag: u16,
    /// For UDP: send a zero ("no") checksum.
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

    /// The frame's bytes, with valid checksums.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // dst MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // src MAC
        let l4 = self.l4_bytes();
        if self.src.is_ipv6() {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            let mut ext = Vec::new();
            let types: Vec<u8> = self.ext_headers.iter().map(|(t, _)| *t).chain([self.proto]).collect();
            for (i, (_, body)) in self.ext_headers.iter().enumerate() {
                assert!((2 + body.len()).is_multiple_of(8), "bad extension header length");
                ext.push(types[i + 1]);
                ext.push(((2 + body.len()) / 8 - 1) as u8);
                ext.extend_from_slice(body);
            }
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
            f.push(types[0]);
            f.push(64);
            f.extend(octets(self.src));
            f.extend(octets(self.dst));
            f.extend(ext);
            f.extend(l4);
            return f;
        }
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let ihl = 20 + self.ip_options.len();
        assert!(ihl <= 60 && ihl.is_multiple_of(4), "bad IP options length");
        let mut ip = Vec::with_capacity(ihl);
        ip.push(0x40 | (ihl / 4) as u8);
        ip.push(0);
        ip.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&0x1234u16.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.push(64);
        ip.push(self.proto);
        ip.extend_from_slice(&[0, 0]);
        ip.extend(octets(self.src));
        ip.extend(octets(self.dst));
        ip.extend_from_slice(&self.ip_options);
        let c = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == TCP {
            l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
            l4.extend_from_slice(&(if self.tcp_flags & ACK != 0 { 2000u32 } else { 0 }).to_be_bytes());
            l4.push(5 << 4);
            l4.push(self.tcp_flags);
            l4.extend_from_slice(&64240u16.to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            l4.extend_from_slice(&self.payload);
            let c = checksum(&l4, pseudo_sum(self.src, self.dst, TCP, l4.len()));
            l4[16..18].copy_from_slice(&c.to_be_bytes());
        } else {
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            l4.extend_from_slice(&self.payload);
            if !self.udp_zero_csum {
                let mut c = checksum(&l4, pseudo_sum(self.src, self.dst, UDP, l4.len()));
                if c == 0 {
                    c = 0xffff;
                }
                l4[6..8].copy_from_slice(&c.to_be_bytes());
            }
        }
        l4
    }
}

/// What a frame says, read back from bytes, with every checksum verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub l4_csum: u16,
}

/// Where an IP packet's L4 header starts and ends and what it is:
/// (src, dst, proto, l4 range within `ip`). IPv6 extension headers
/// (hop-by-hop, routing, destination options) are walked over.
fn ip_layout(frame: &[u8]) -> (IpAddr, IpAddr, u8, std::ops::Range<usize>) {
    let ip = &frame[14..];
    if frame[12..14] == [0x86, 0xdd] {
        assert!(ip.len() >= 40, "IPv6 frame too short: {}", frame.len());
        let tot = 40 + u16::from_be_bytes([ip[4], ip[5]]) as usize;
        assert_eq!(tot, ip.len(), "IPv6 payload length does not match the frame");
        let (mut nh, mut off) = (ip[6], 40);
        while matches!(nh, 0 | 43 | 60) {
            nh = ip[off];
            off += (ip[off + 1] as usize + 1) * 8;
        }
        return (ip_at(&ip[8..], true), ip_at(&ip[24..], true), nh, off..tot);
    }
    assert!(frame.len() >= 34, "frame too short: {}", frame.len());
    assert_eq!(&frame[12..14], &[0x08, 0x00], "neither IPv4 nor IPv6");
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    assert_eq!(
        checksum(&ip[..ihl], 0),
        0,
        "IPv4 header checksum invalid: {:02x?}",
        &ip[..ihl]
    );
    (ip_at(&ip[12..], false), ip_at(&ip[16..], false), ip[9], ihl..tot)
}

/// Parses an Ethernet/IP/TCP-or-UDP frame (either family) and checks the
/// IPv4 header checksum and the L4 checksum (recomputed over
/// pseudo-header, header and payload). Panics with the reason on any
/// mismatch.
pub fn parse_and_verify(frame: &[u8]) -> Parsed {
    let (src, dst, proto, range) = ip_layout(frame);
    let l4 = &frame[14..][range];
    let l4_csum = match proto {
        TCP => u16::from_be_bytes([l4[16], l4[17]]),
        UDP => u16::from_be_bytes([l4[6], l4[7]]),
        p => panic!("unexpected protocol {p}"),
    };
    if !(proto == UDP && l4_csum == 0 && src.is_ipv4()) {
        assert_eq!(
            checksum(l4, pseudo_sum(src, dst, proto, l4.len())),
            0,
            "L4 checksum {l4_csum:#06x} invalid for {src} -> {dst}"
        );
    }
    Parsed {
        src,
        dst,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        proto,
        l4_csum,
    }
}

/// An Ethernet/IPv4/ICMP or Ethernet/IPv6/ICMPv6 error frame from `src` to
/// `dst` of `icmp_type` and `code`, quoting `quoted` (an IP header and the
/// start of its payload), with every checksum valid. `rest` fills ICMP
/// bytes 4..8 (the next-hop MTU of "fragmentation needed", the MTU of
/// "packet too big").
pub fn icmp_error(
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    icmp_type: u8,
    code: u8,
    rest: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let (src, dst) = (src.into(), dst.into());
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(quoted);
    if src.is_ipv6() {
        let c = checksum(&icmp, pseudo_sum(src, dst, ICMPV6, icmp.len()));
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut f = vec![
            0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd, 0x60, 0, 0, 0,
        ];
        f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[ICMPV6, 64]);
        f.extend(octets(src));
        f.extend(octets(dst));
        f.extend(icmp);
        return f;
    }
    let c = checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    ip.extend(octets(src));
    ip.extend(octets(dst));
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend(ip);
    f.extend(icmp);
    f
}

/// An ICMP error read back from a frame, with both checksums verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedIcmp {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub icmp_type: u8,
    pub code: u8,
    /// The quoted bytes: the original IPv4 header and 8 bytes of its payload.
    pub quoted: Vec<u8>,
}

/// Parses an Ethernet/IPv4/ICMP frame, checking the IPv4 header checksum and
/// the ICMP checksum (over the ICMP header and everything after it), or an
/// Ethernet/IPv6/ICMPv6 frame, checking the ICMPv6 checksum (with its
/// pseudo-header).
pub fn parse_icmp(frame: &[u8]) -> ParsedIcmp {
    if frame[12..14] == [0x86, 0xdd] {
        let (src, dst, nh, range) = ip_layout(frame);
        assert_eq!(nh, ICMPV6, "not ICMPv6");
        let icmp = &frame[14..][range];
        assert_eq!(
            checksum(icmp, pseudo_sum(src, dst, ICMPV6, icmp.len())),
            0,
            "ICMPv6 checksum invalid"
        );
        return ParsedIcmp {
            src,
            dst,
            icmp_type: icmp[0],
            code: icmp[1],
            quoted: icmp[8..].to_vec(),
        };
    }
    assert_eq!(&frame[12..14], &[0x08, 0x00], "not IPv4");
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    assert_eq!(tot, ip.len(), "IPv4 total length does not match the frame");
    assert_eq!(checksum(&ip[..ihl], 0), 0, "IPv4 header checksum invalid");
    assert_eq!(ip[9], 1, "not ICMP");
    let icmp = &ip[ihl..tot];
    assert_eq!(checksum(icmp, 0), 0, "ICMP checksum invalid");
    ParsedIcmp {
        src: ip_at(&ip[12..], false),
        dst: ip_at(&ip[16..], false),
        icmp_type: icmp[0],
        code: icmp[1],
        quoted: icmp[8..].to_vec(),
    }
}

/// The TCP flags, sequence and acknowledgement numbers of a TCP frame
/// (IPv4 header of any length, IPv6 with or without extension headers).
pub fn tcp_fields(frame: &[u8]) -> (u8, u32, u32) {
    let (_, _, _, range) = ip_layout(frame);
    let t = &frame[14 + range.start..];
    (
        t[13],
        u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn built_frames_verify() {
        let a = (Ipv4Addr::new(198, 18, 0, 1), 1234);
        let b = (Ipv4Addr::new(198, 19, 0, 1), 80);
        let p = parse_and_verify(&Frame::tcp(a, b, SYN).build());
        assert_eq!((p.src, p.dport), (a.0.into(), 80));
        let mut f = Frame::udp(a, b, b"hello");
        f.ip_options = vec![1, 1, 1, 0];
        parse_and_verify(&f.build());
    }

    #[test]
    #[should_panic(expected = "L4 checksum")]
    fn corrupted_frames_do_not_verify() {
        let mut bytes = Frame::tcp(
            (Ipv4Addr::new(198, 18, 0, 1), 1),
            (Ipv4Addr::new(198, 19, 0, 1), 80),
            SYN,
        )
        .build();
        bytes[14 + 20 + 3] ^= 1; // the port, not the checksum
        parse_and_verify(&bytes);
    }
}
