//! Crafting frames and checking them, independently of the datapath's own
//! code. TCP and UDP frames are built and read back by the agent's shared
//! packet module (`dataplane::packet`, on etherparse: headers and checksums
//! are etherparse's); ICMP errors, which quote a packet, are written here,
//! with checksums recomputed from scratch. IPv4 and IPv6: the family of a
//! frame is the family of its addresses.

use std::net::IpAddr;

pub use dataplane::packet::{Frame, Parsed, ACK, FIN, RST, SYN, TCP, UDP};

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

/// Parses an Ethernet/IP/TCP-or-UDP frame (either family) and checks the
/// IPv4 header checksum and the L4 checksum (`dataplane::packet`, by
/// etherparse). Panics with the reason on any mismatch.
pub fn parse_and_verify(frame: &[u8]) -> Parsed {
    dataplane::packet::parse_and_verify(frame).unwrap_or_else(|e| panic!("{e}: {frame:02x?}"))
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
        let (src, dst, nh, icmp) = dataplane::packet::ip_payload(frame).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(nh, ICMPV6, "not ICMPv6");
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
    let (_, _, _, t) = dataplane::packet::ip_payload(frame).unwrap_or_else(|e| panic!("{e}"));
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
    #[should_panic(expected = "TCP checksum")]
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
