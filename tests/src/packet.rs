//! Crafting frames and checking them, independently of the datapath's own
//! code: checksums here are always recomputed from scratch.

use std::net::Ipv4Addr;

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

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    u16::from_be_bytes([s[0], s[1]]) as u32
        + u16::from_be_bytes([s[2], s[3]]) as u32
        + u16::from_be_bytes([d[0], d[1]]) as u32
        + u16::from_be_bytes([d[2], d[3]]) as u32
        + proto as u32
        + len as u32
}

/// A description of an Ethernet/IPv4/TCP-or-UDP frame.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
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
}

impl Frame {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Frame {
        Frame {
            src: src.0,
            dst: dst.0,
            sport: src.1,
            dport: dst.1,
            proto: TCP,
            tcp_flags: flags,
            payload: Vec::new(),
            ip_options: Vec::new(),
            frag: 0x4000, // DF
            udp_zero_csum: false,
        }
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Frame {
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
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let l4 = self.l4_bytes();
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
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
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
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub l4_csum: u16,
}

/// Parses an Ethernet/IPv4/TCP-or-UDP frame and checks the IPv4 header
/// checksum and the L4 checksum (recomputed over pseudo-header, header and
/// payload). Panics with the reason on any mismatch.
pub fn parse_and_verify(frame: &[u8]) -> Parsed {
    assert!(frame.len() >= 34, "frame too short: {}", frame.len());
    assert_eq!(&frame[12..14], &[0x08, 0x00], "not IPv4");
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    assert_eq!(
        checksum(&ip[..ihl], 0),
        0,
        "IPv4 header checksum invalid: {:02x?}",
        &ip[..ihl]
    );
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    let l4 = &ip[ihl..tot];
    let l4_csum = match proto {
        TCP => u16::from_be_bytes([l4[16], l4[17]]),
        UDP => u16::from_be_bytes([l4[6], l4[7]]),
        p => panic!("unexpected protocol {p}"),
    };
    if !(proto == UDP && l4_csum == 0) {
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

/// An Ethernet/IPv4/ICMP error frame from `src` to `dst` of `icmp_type` and
/// `code`, quoting `quoted` (an IPv4 header and the start of its payload),
/// with every checksum valid. `rest` fills ICMP bytes 4..8 (the next-hop
/// MTU of "fragmentation needed").
pub fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, icmp_type: u8, code: u8, rest: u32, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let c = checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend(ip);
    f.extend(icmp);
    f
}

/// An ICMP error read back from a frame, with both checksums verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedIcmp {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub icmp_type: u8,
    pub code: u8,
    /// The quoted bytes: the original IPv4 header and 8 bytes of its payload.
    pub quoted: Vec<u8>,
}

/// Parses an Ethernet/IPv4/ICMP frame, checking the IPv4 header checksum and
/// the ICMP checksum (over the ICMP header and everything after it).
pub fn parse_icmp(frame: &[u8]) -> ParsedIcmp {
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
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        icmp_type: icmp[0],
        code: icmp[1],
        quoted: icmp[8..].to_vec(),
    }
}

/// The TCP flags, sequence and acknowledgement numbers of a TCP frame
/// (IPv4 header of any length).
pub fn tcp_fields(frame: &[u8]) -> (u8, u32, u32) {
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    let t = &frame[14 + ihl..];
    (
        t[13],
        u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_verify() {
        let a = (Ipv4Addr::new(198, 18, 0, 1), 1234);
        let b = (Ipv4Addr::new(198, 19, 0, 1), 80);
        let p = parse_and_verify(&Frame::tcp(a, b, SYN).build());
        assert_eq!((p.src, p.dport), (a.0, 80));
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
