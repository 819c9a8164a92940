//! Crafting frames and checking them, independently of the datapath's own
//! code: everything here is the agent's shared packet module
//! (`dataplane::packet`, on etherparse), whose headers and checksums are
//! etherparse's, never `dataplane_common::csum` or a kernel helper. This
//! file only turns its `Err`s into panics for the tests. IPv4 and IPv6:
//! the family of a frame is the family of its addresses.
//!
//! Frames etherparse cannot build on purpose (bad checksums, truncated or
//! inconsistent headers, VLAN tags, garbage) are byte edits on a built
//! frame in the tests themselves, and the hostile generator
//! (`crate::hostile`) writes its own frames byte by byte with `checksum`.

use std::net::IpAddr;

pub use dataplane::packet::{checksum, icmp_error, Frame, Parsed, ParsedIcmp, ACK, FIN, ICMPV6, RST, SYN, TCP, UDP};

pub fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Parses an Ethernet/IP/TCP-or-UDP frame (either family) and checks the
/// lengths, the IPv4 header checksum and the L4 checksum. Panics with the
/// reason on any mismatch.
pub fn parse_and_verify(frame: &[u8]) -> Parsed {
    dataplane::packet::parse_and_verify(frame).unwrap_or_else(|e| panic!("{e}: {frame:02x?}"))
}

/// Parses an Ethernet/IPv4/ICMP frame, checking the IPv4 header checksum and
/// the ICMP checksum (over the ICMP header and everything after it), or an
/// Ethernet/IPv6/ICMPv6 frame, checking the ICMPv6 checksum (with its
/// pseudo-header). Panics with the reason on any mismatch.
pub fn parse_icmp(frame: &[u8]) -> ParsedIcmp {
    dataplane::packet::parse_icmp(frame).unwrap_or_else(|e| panic!("{e}: {frame:02x?}"))
}

/// The TCP flags, sequence and acknowledgement numbers of a TCP frame
/// (IPv4 header of any length, IPv6 with or without extension headers).
pub fn tcp_fields(frame: &[u8]) -> (u8, u32, u32) {
    let p = dataplane::packet::parse(frame).unwrap_or_else(|e| panic!("{e}: {frame:02x?}"));
    assert_eq!(p.proto, TCP, "not TCP: {frame:02x?}");
    (p.tcp_flags, p.seq, p.ack)
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

    #[test]
    #[should_panic(expected = "IPv4 header checksum")]
    fn corrupted_ipv4_headers_do_not_verify() {
        let mut bytes = Frame::tcp(
            (Ipv4Addr::new(198, 18, 0, 1), 1),
            (Ipv4Addr::new(198, 19, 0, 1), 80),
            SYN,
        )
        .build();
        bytes[14 + 8] -= 1; // the TTL
        parse_and_verify(&bytes);
    }
}
