//! Hostile packets: a seeded generator of malformed and random Ethernet
//! frames, and a reference model of what the datapath must do with each.
//!
//! The model is written from the datapath's specification (README, "How it
//! works" and "Connection tracking"; docs/services.md), not from its code:
//! it parses frames its own way, keeps its own conntrack and affinity
//! tables, picks backends with the userspace Maglev table and the shared
//! flow hash, picks SNAT and clash source ports by the documented rule, and
//! builds the expected rejects byte by byte. Every outcome it predicts is
//! checked exactly against the program's output.
//!
//! What it covers: IPv4 and IPv6 frontends (extension headers included);
//! DNAT, replies, rejects; SNAT of external frontends to remote backends
//! and of hairpin flows, with the SNAT source port; load balancer source
//! ranges; Local-policy drops; session affinity; reply-tuple clashes;
//! reselection of a new SYN on an entry of an older backend set; the flood
//! guard (SYNs beyond the quota served without state, their SYN-ACKs from
//! the guard's own table, the state created by the flow's next packet),
//! with the quota's window frozen by the test so that the guard's
//! decisions follow from the frames (`Model::flood_limit`).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    rc::Rc,
};

use dataplane::model::{maglev, Frontend};
use dataplane_common::{
    addr_of, flow_hash, fold_addr, Backend, Reason, BACKEND_F_REMOTE, CT_F_CLOSING, CT_F_ORIGINAL, CT_F_REPLY,
    CT_F_SEEN_REPLY, CT_F_SNAT, SVC_F_DROP_NO_LOCAL, SVC_F_EXTERNAL, SVC_F_SOURCE_RANGES,
};

use crate::packet::{checksum, ACK, FIN, RST, SYN, TCP, UDP};

/// splitmix64: small, fast, and good enough to drive a generator; the same
/// seed always gives the same sequence.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is irrelevant here.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u32) -> bool {
        (self.next_u64() % 100) < percent as u64
    }

    pub fn u8(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn u16(&mut self) -> u16 {
        self.next_u64() as u16
    }

    pub fn u32(&mut self) -> u32 {
        self.next_u64() as u32
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// An address and a port (host order).
pub type Ep = (IpAddr, u16);

/// The node's addresses: NodePorts listen on them, SNAT uses them
/// (`DpConfig::snat_addr`, `snat_addr6`).
pub const NODE4: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 1);
pub const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x50, 0, 0, 0, 0, 1);

/// The SNAT port range the programs are loaded with (`--snat-port-range`):
/// small, so that candidates are found in use and flows run out of ports.
pub const SNAT_PORTS: (u16, u16) = (20000, 20511);
/// Candidate source ports per SNATed or clashing flow, and the step between
/// them (docs/services.md, "SNAT port range").
pub const SNAT_TRIES: u32 = 8;
pub const SNAT_STEP: u32 = 0x9e37_79b1;

/// sessionAffinity timeout: far beyond the run, so that a client's
/// remembered backend never expires during it.
pub const AFFINITY_S: u32 = 10_800;

pub const VIPS: [Ipv4Addr; 5] = [
    Ipv4Addr::new(198, 19, 0, 10),
    Ipv4Addr::new(198, 19, 0, 11),
    Ipv4Addr::new(198, 19, 0, 12),
    Ipv4Addr::new(198, 19, 0, 13),
    Ipv4Addr::new(198, 19, 0, 14),
];
pub const VIPS6: [Ipv6Addr; 4] = [
    Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0x10),
    Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0x12),
    Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0x14),
];
/// Load balancer IPs with loadBalancerSourceRanges.
pub const LB4: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 1);
pub const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 0x20);

/// Backend `i` of either family: 198.18.i.2 or fd00:18:i::2.
fn b4(i: u8) -> IpAddr {
    Ipv4Addr::new(198, 18, i, 2).into()
}

fn b6(i: u16) -> IpAddr {
    Ipv6Addr::new(0xfd00, 0x18, i, 0, 0, 0, 0, 2).into()
}

/// A backend on this node.
pub fn local(ip: IpAddr, port: u16) -> Backend {
    Backend::new(ip, port)
}

/// A backend on another node (`BACKEND_F_REMOTE`).
pub fn remote(ip: IpAddr, port: u16) -> Backend {
    let b = Backend::new(ip, port);
    Backend {
        flags: b.flags | BACKEND_F_REMOTE,
        ..b
    }
}

/// One Service frontend the maps hold during the run.
#[derive(Clone, Debug)]
pub struct Svc {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: u8,
    /// In the order the datapath indexes them (sorted, as the agent writes).
    pub backends: Rc<Vec<Backend>>,
    /// `maglev::table(backends, DEFAULT_SIZE)`, computed once.
    pub table: Rc<Vec<u16>>,
    /// Bumped each time the backend set changes (the agent then writes a
    /// new generation with a new epoch).
    pub version: u64,
    /// `SVC_F_EXTERNAL`, `SVC_F_DROP_NO_LOCAL`, `SVC_F_SOURCE_RANGES`.
    pub flags: u32,
    /// loadBalancerSourceRanges (with `SVC_F_SOURCE_RANGES`).
    pub source_ranges: Vec<(IpAddr, u8)>,
    /// sessionAffinity ClientIP.
    pub affinity_s: Option<u32>,
}

impl Svc {
    pub fn new(vip: impl Into<IpAddr>, port: u16, proto: u8, backends: &[Backend]) -> Svc {
        let mut b = backends.to_vec();
        b.sort();
        let table = if b.is_empty() {
            Vec::new()
        } else {
            maglev::table(&b, maglev::DEFAULT_SIZE)
        };
        Svc {
            vip: vip.into(),
            port,
            proto,
            backends: Rc::new(b),
            table: Rc::new(table),
            version: 0,
            flags: 0,
            source_ranges: Vec::new(),
            affinity_s: None,
        }
    }

    pub fn flags(mut self, flags: u32) -> Svc {
        self.flags |= flags;
        self
    }

    pub fn source_ranges(mut self, ranges: &[(IpAddr, u8)]) -> Svc {
        self.flags |= SVC_F_SOURCE_RANGES;
        self.source_ranges = ranges.to_vec();
        self.source_ranges.sort();
        self
    }

    pub fn affinity(mut self, timeout_s: u32) -> Svc {
        self.affinity_s = Some(timeout_s);
        self
    }

    /// The same frontend with another backend set.
    pub fn with_backends(&self, backends: &[Backend]) -> Svc {
        let mut next = Svc::new(self.vip, self.port, self.proto, backends);
        next.flags = self.flags;
        next.source_ranges = self.source_ranges.clone();
        next.affinity_s = self.affinity_s;
        next
    }

    /// The frontend as the agent's desired state holds it.
    pub fn frontend(&self) -> Frontend {
        Frontend {
            service: "hostile/svc".into(),
            port_name: String::new(),
            backends: self.backends.to_vec(),
            affinity_timeout_s: self.affinity_s,
            flags: self.flags,
            source_ranges: self.source_ranges.clone(),
            also_serving: Vec::new(),
        }
    }
}

/// The Services of the hostile run, both families: ClusterIPs with several
/// backends, one backend, none; two ClusterIPs sharing a backend with
/// another (tuple clashes); external frontends (NodePorts) with remote
/// backends (SNAT); load balancer IPs with source ranges; Local-policy
/// frontends without local endpoints; session affinity.
pub fn services() -> Vec<Svc> {
    let l4 = |i: u8, p: u16| local(b4(i), p);
    let r4 = |i: u8, p: u16| remote(b4(i), p);
    let l6 = |i: u16, p: u16| local(b6(i), p);
    let r6 = |i: u16, p: u16| remote(b6(i), p);
    let ranges4 = [
        (IpAddr::from([198, 18, 100, 0]), 28),
        (IpAddr::from([198, 18, 100, 20]), 32),
    ];
    let ranges6 = [
        (IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0)), 124),
        (IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 20)), 128),
    ];
    vec![
        // 0-7: IPv4 ClusterIPs (0 and 1 change under the flows).
        Svc::new(VIPS[0], 80, TCP, &[l4(1, 8080), l4(2, 8080), l4(3, 8081)]),
        Svc::new(VIPS[0], 53, UDP, &[l4(1, 5353), l4(2, 5353)]),
        Svc::new(
            VIPS[1],
            443,
            TCP,
            &[l4(4, 8443), l4(5, 8443), l4(6, 8443), l4(7, 8443), l4(8, 8443)],
        ),
        Svc::new(VIPS[1], 443, UDP, &[l4(9, 4433)]),
        Svc::new(VIPS[2], 80, TCP, &[]),
        Svc::new(VIPS[2], 53, UDP, &[]),
        // Sharing 198.18.1.2:8080 and :5353 with 0 and 1: one client port
        // to both VIPs clashes.
        Svc::new(VIPS[3], 80, TCP, &[l4(1, 8080)]),
        Svc::new(VIPS[3], 53, UDP, &[l4(1, 5353)]),
        // 8-9: NodePorts, Cluster policy: remote backends are SNATed (8
        // changes under the flows).
        Svc::new(NODE4, 30080, TCP, &[l4(11, 8080), r4(12, 8080), r4(13, 8080)]).flags(SVC_F_EXTERNAL),
        Svc::new(NODE4, 30053, UDP, &[r4(12, 5353), l4(11, 5353)]).flags(SVC_F_EXTERNAL),
        // 10: a load balancer IP with source ranges.
        Svc::new(LB4, 443, TCP, &[l4(14, 8443), r4(15, 8443)])
            .flags(SVC_F_EXTERNAL)
            .source_ranges(&ranges4),
        // 11-12: Local policy, no local endpoint: dropped.
        Svc::new(NODE4, 30081, TCP, &[]).flags(SVC_F_EXTERNAL | SVC_F_DROP_NO_LOCAL),
        Svc::new(NODE4, 30082, UDP, &[]).flags(SVC_F_EXTERNAL | SVC_F_DROP_NO_LOCAL),
        // 13-14: sessionAffinity ClientIP.
        Svc::new(VIPS[4], 8000, TCP, &[l4(16, 8000), l4(17, 8000), l4(18, 8000)]).affinity(AFFINITY_S),
        Svc::new(VIPS[4], 8000, UDP, &[l4(16, 8000), l4(17, 8000)]).affinity(AFFINITY_S),
        // 15-23: IPv6 (15 and 16 change under the flows).
        Svc::new(VIPS6[0], 80, TCP, &[l6(1, 8080), l6(2, 8080), l6(3, 8081)]),
        Svc::new(VIPS6[0], 53, UDP, &[l6(1, 5353), l6(2, 5353)]),
        Svc::new(VIPS6[1], 80, TCP, &[]),
        Svc::new(VIPS6[1], 53, UDP, &[]),
        Svc::new(VIPS6[2], 80, TCP, &[l6(1, 8080)]),
        Svc::new(NODE6, 30080, TCP, &[l6(11, 8080), r6(12, 8080)]).flags(SVC_F_EXTERNAL),
        Svc::new(NODE6, 30053, UDP, &[r6(12, 5353)]).flags(SVC_F_EXTERNAL),
        Svc::new(LB6, 443, TCP, &[l6(14, 8443)])
            .flags(SVC_F_EXTERNAL)
            .source_ranges(&ranges6),
        Svc::new(NODE6, 30081, TCP, &[]).flags(SVC_F_EXTERNAL | SVC_F_DROP_NO_LOCAL),
        Svc::new(VIPS6[3], 8000, TCP, &[l6(16, 8000), l6(17, 8000), l6(18, 8000)]).affinity(AFFINITY_S),
    ]
}

/// The backend sets that change under the flows in churn round `round`
/// (by index into `services()`): the first TCP frontend of each family
/// gains and loses a 4th backend, the first UDP frontend of each family
/// loses all its endpoints and gets them back, the IPv4 NodePort loses
/// and regains a remote backend.
pub fn churned(round: u64) -> Vec<(usize, Vec<Backend>)> {
    let odd = round % 2 == 1;
    let l4 = |i: u8, p: u16| local(b4(i), p);
    let l6 = |i: u16, p: u16| local(b6(i), p);
    let mut tcp4 = vec![l4(1, 8080), l4(2, 8080), l4(3, 8081)];
    let mut tcp6 = vec![l6(1, 8080), l6(2, 8080), l6(3, 8081)];
    let mut node = vec![l4(11, 8080), remote(b4(12), 8080)];
    if odd {
        tcp4.push(l4(10, 8080));
        tcp6.push(l6(10, 8080));
    } else {
        node.push(remote(b4(13), 8080));
    }
    let udp4 = if odd { vec![] } else { vec![l4(1, 5353), l4(2, 5353)] };
    let udp6 = if odd { vec![] } else { vec![l6(1, 5353), l6(2, 5353)] };
    vec![(0, tcp4), (1, udp4), (8, node), (15, tcp6), (16, udp6)]
}

/// A 5-tuple as written in the packet (host-order ports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple {
    fn reversed(&self) -> Tuple {
        Tuple {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

/// A conntrack entry of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// Original entry: the backend. Reply entry: the frontend.
    pub nat: Ep,
    /// With `CT_F_SNAT`. Original entry: the source the flow leaves with.
    /// Reply entry: the client's own address and port.
    pub snat: Option<Ep>,
    pub flags: u16,
    /// The service's `version` when the flow was created.
    pub version: u64,
}

/// What the datapath must do with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// BPF_PROG_TEST_RUN itself refuses the frame (EINVAL): the program
    /// never sees it.
    Refused,
    /// Passed byte for byte, with this reason counted.
    Pass(Reason),
    /// Dropped, with this reason counted.
    Drop(Reason),
    /// The destination and/or the source rewritten to these, checksums
    /// kept consistent, this reason counted; nothing else changes.
    Translate {
        dst: Option<Ep>,
        src: Option<Ep>,
        reason: Reason,
    },
    /// Answered with exactly these bytes, sent back out (XDP_TX / redirect).
    Reject(Vec<u8>),
}

impl Expect {
    /// The reason counter the frame increments (none when refused).
    pub fn reason(&self) -> Option<Reason> {
        match self {
            Expect::Refused => None,
            Expect::Pass(r) | Expect::Drop(r) | Expect::Translate { reason: r, .. } => Some(*r),
            Expect::Reject(_) => Some(Reason::RejectNoBackend),
        }
    }
}

/// Which program a frame goes through; the model is the same for both
/// except for what BPF_PROG_TEST_RUN accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

/// A frame the model understands as TCP/UDP for the datapath.
#[derive(Clone, Copy, Debug)]
struct L4 {
    v6: bool,
    /// IPv4 header with options, or IPv6 header with extension headers.
    l3_hlen: usize,
    /// The IP length as the datapath reads it: IPv4 total length, IPv6
    /// 40 + payload length (at most 65535).
    l3_len: usize,
    /// The L4 length the packet claims (for checksums).
    l4_len: usize,
    l4: usize,
    tuple: Tuple,
    flags: u8,
}

const ETH: usize = 14;

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn ip4_at(b: &[u8], off: usize) -> IpAddr {
    IpAddr::from([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn ip6_at(b: &[u8], off: usize) -> IpAddr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[off..off + 16]);
    IpAddr::from(o)
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The datapath's input contract: only unfragmented IPv4 or IPv6 TCP/UDP
/// with complete headers, claimed by the IP length, is processed;
/// everything else passes with the reason that says why.
fn classify(f: &[u8]) -> Result<L4, Reason> {
    if f.len() < ETH {
        return Err(Reason::PassNotIp);
    }
    match be16(f, 12) {
        0x0800 => classify4(f),
        0x86dd => classify6(f),
        _ => Err(Reason::PassNotIp),
    }
}

fn classify4(f: &[u8]) -> Result<L4, Reason> {
    if f.len() < ETH + 20 || f[ETH] >> 4 != 4 || (f[ETH] & 0xf) < 5 {
        return Err(Reason::PassTruncated);
    }
    let ihl = (f[ETH] & 0xf) as usize * 4;
    let proto = f[ETH + 9];
    if proto != TCP && proto != UDP {
        return Err(Reason::PassNotTcpUdp);
    }
    // MF set or a non-zero offset: any fragment.
    if be16(f, ETH + 6) & 0x3fff != 0 {
        return Err(Reason::PassFragment);
    }
    let min_l4 = if proto == TCP { 20 } else { 8 };
    let tot_len = be16(f, ETH + 2) as usize;
    if tot_len < ihl + min_l4 || f.len() < ETH + ihl + min_l4 {
        return Err(Reason::PassTruncated);
    }
    let l4 = ETH + ihl;
    Ok(L4 {
        v6: false,
        l3_hlen: ihl,
        l3_len: tot_len,
        l4_len: tot_len - ihl,
        l4,
        tuple: Tuple {
            saddr: ip4_at(f, ETH + 12),
            daddr: ip4_at(f, ETH + 16),
            sport: be16(f, l4),
            dport: be16(f, l4 + 2),
            proto,
        },
        flags: if proto == TCP { f[l4 + 13] } else { 0 },
    })
}

/// IPv6: the extension-header walk of the specification (hop-by-hop,
/// destination options and routing headers without segments left are
/// skipped, at most 4; a fragment header passes; a routing header with
/// segments left passes; anything else that is not TCP/UDP passes).
fn classify6(f: &[u8]) -> Result<L4, Reason> {
    if f.len() < ETH + 40 || f[ETH] >> 4 != 6 {
        return Err(Reason::PassTruncated);
    }
    let payload_len = be16(f, ETH + 4) as usize;
    let (mut nh, mut off) = (f[ETH + 6], ETH + 40);
    for _ in 0..4 {
        match nh {
            TCP | UDP => break,
            44 => return Err(Reason::PassFragment),
            0 | 43 | 60 => {
                if f.len() < off + 4 {
                    return Err(Reason::PassTruncated);
                }
                if nh == 43 && f[off + 3] != 0 {
                    return Err(Reason::PassExtHeaders);
                }
                nh = f[off];
                off += (f[off + 1] as usize + 1) * 8;
            }
            _ => return Err(Reason::PassNotTcpUdp),
        }
    }
    if nh != TCP && nh != UDP {
        return Err(Reason::PassExtHeaders);
    }
    let min_l4 = if nh == TCP { 20 } else { 8 };
    let l3_len = (40 + payload_len).min(0xffff);
    let l3_hlen = off - ETH;
    if l3_len < l3_hlen + min_l4 || f.len() < off + min_l4 {
        return Err(Reason::PassTruncated);
    }
    Ok(L4 {
        v6: true,
        l3_hlen,
        l3_len,
        l4_len: 40 + payload_len - l3_hlen,
        l4: off,
        tuple: Tuple {
            saddr: ip6_at(f, ETH + 8),
            daddr: ip6_at(f, ETH + 24),
            sport: be16(f, off),
            dport: be16(f, off + 2),
            proto: nh,
        },
        flags: if nh == TCP { f[off + 13] } else { 0 },
    })
}

/// The shared flow hash of a tuple, as the specification defines it for
/// Maglev positions and SNAT candidates.
fn hash(t: &Tuple) -> u32 {
    flow_hash(
        fold_addr(&addr_of(t.saddr).0),
        fold_addr(&addr_of(t.daddr).0),
        t.sport.to_be(),
        t.dport.to_be(),
        t.proto,
    )
}

/// Whether `ip` lies in `net/len` (of its own family).
fn in_prefix(ip: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// The node address SNAT uses for a flow of `client`'s family.
fn node_addr(client: IpAddr) -> IpAddr {
    if client.is_ipv6() {
        NODE6.into()
    } else {
        NODE4.into()
    }
}

/// The reference model: the Services, a conntrack table and an affinity
/// table of its own.
pub struct Model {
    pub services: Vec<Svc>,
    pub ct: HashMap<Tuple, CtEntry>,
    /// Originals created so far (client tuples), for replies and follow-ups.
    pub flows: Vec<Tuple>,
    /// What each reason counter must read.
    pub counts: HashMap<Reason, u64>,
    /// Frames the programs actually ran.
    pub runs: u64,
    /// sessionAffinity: (service index, client) -> backend.
    pub affinity: HashMap<(usize, IpAddr), Backend>,
    /// What `CtEvent::ClashResolved` must read.
    pub clashes: u64,
    /// How often each translation the model knows was predicted (for the
    /// statistics and the list of what must have happened).
    pub notes: BTreeMap<&'static str, u64>,
    /// Reply keys of flows another flow clashed with.
    clashed: HashSet<Tuple>,
    /// The flood guard's quota (`--new-flows-per-cpu`; 0: off) and how
    /// much of it the current window has used: the test freezes the
    /// window (it never ends) and runs every frame on one CPU, so the
    /// guard's count is this one.
    pub flood_limit: u32,
    pub flood_used: u32,
    /// The flood guard's reply entries (`DP_CT_SYN`) of SYNs served
    /// without state, by reply key.
    pub syn: HashMap<Tuple, CtEntry>,
    /// Their reply keys in the order they were written (for the
    /// generator's answers and follow-ups).
    pub embryonic: Vec<Tuple>,
    /// What `CtEvent::StatelessNewFlow` / `StatelessReply` must read.
    pub stateless: u64,
    pub stateless_replies: u64,
    /// Whether the guard served anything but a SYN without state
    /// (`DP_GUARD`): only then do UDP datagrams and TCP segments other
    /// than SYN-ACKs from backends look the guard's entries up (its
    /// window never closes in this test).
    pub gate: bool,
}

impl Model {
    pub fn new(services: Vec<Svc>) -> Model {
        Model {
            services,
            ct: HashMap::new(),
            flows: Vec::new(),
            counts: HashMap::new(),
            runs: 0,
            affinity: HashMap::new(),
            clashes: 0,
            notes: BTreeMap::new(),
            clashed: HashSet::new(),
            flood_limit: 0,
            flood_used: 0,
            syn: HashMap::new(),
            embryonic: Vec::new(),
            stateless: 0,
            stateless_replies: 0,
            gate: false,
        }
    }

    /// The flood guard's count for one more eligible new flow: whether it
    /// gets state (the quota has room, or the guard is off).
    fn admit_new_flow(&mut self) -> bool {
        if self.flood_limit == 0 {
            return true;
        }
        if self.flood_used >= self.flood_limit {
            return false;
        }
        self.flood_used += 1;
        if self.flood_used == self.flood_limit {
            self.note("flood guard: the quota's last flow with state");
        }
        true
    }

    fn note(&mut self, what: &'static str) {
        *self.notes.entry(what).or_default() += 1;
    }

    /// Service `i` gets `next`'s backends, as the agent's sync writes them:
    /// if it is UDP, the flows to endpoints that left are cleared (their
    /// original entries; the reply entries stay for answers on their way),
    /// as the sync does for endpoints that stop serving; TCP flows stay.
    pub fn replace_service(&mut self, i: usize, mut next: Svc) {
        let current = &self.services[i];
        next.version = current.version + u64::from(next.backends != current.backends);
        let old = std::mem::replace(&mut self.services[i], next);
        let new = &self.services[i];
        if old.proto != UDP {
            return;
        }
        let gone: Vec<Ep> = old
            .backends
            .iter()
            .filter(|b| !new.backends.iter().any(|n| n.addr == b.addr && n.port == b.port))
            .map(|b| (b.ip(), b.host_port()))
            .collect();
        let (vip, port) = (old.vip, old.port);
        self.ct.retain(|t, e| {
            let original = e.flags & CT_F_ORIGINAL != 0 && t.daddr == vip && t.dport == port && gone.contains(&e.nat);
            !(t.proto == UDP && original)
        });
        let ct = &self.ct;
        self.flows.retain(|f| ct.contains_key(f));
    }

    fn service_index(&self, t: &Tuple) -> Option<usize> {
        self.services
            .iter()
            .position(|s| s.vip == t.daddr && s.port == t.dport && s.proto == t.proto)
    }

    /// What `hook` must do with `frame`; updates the model's conntrack and
    /// counters as the datapath would.
    pub fn predict(&mut self, hook: Hook, frame: &[u8]) -> Expect {
        if refused(hook, frame) {
            return Expect::Refused;
        }
        self.runs += 1;
        let e = self.decide(frame);
        *self.counts.entry(e.reason().expect("ran")).or_default() += 1;
        e
    }

    fn decide(&mut self, f: &[u8]) -> Expect {
        let p = match classify(f) {
            Ok(p) => p,
            Err(r) => return Expect::Pass(r),
        };
        let t = p.tuple;
        let closes = t.proto == TCP && p.flags & (FIN | RST) != 0;
        let starts = t.proto == TCP && p.flags & (SYN | ACK) == SYN;
        let Some(si) = self.service_index(&t) else {
            return self.reply(&p, closes);
        };
        let version = self.services[si].version;
        let untracked = !self.ct.contains_key(&t);
        if let Some(e) = self.ct.get_mut(&t) {
            if closes {
                e.flags |= CT_F_CLOSING;
            }
            // Port reuse after a close starts a new flow, and so does a SYN
            // on an entry made under another backend set; anything else
            // follows the entry.
            let closed = e.flags & CT_F_CLOSING != 0;
            let stale = closed || e.version != version;
            if !(starts && stale) {
                let e = *e;
                // A FIN or RST closes the flow's reply entry too.
                if closes {
                    let (c, cport) = e.snat.unwrap_or((t.saddr, t.sport));
                    let reply_key = Tuple {
                        saddr: e.nat.0,
                        daddr: c,
                        sport: e.nat.1,
                        dport: cport,
                        proto: t.proto,
                    };
                    if let Some(r) = self.ct.get_mut(&reply_key) {
                        r.flags |= CT_F_CLOSING;
                    }
                }
                if e.snat.is_some() {
                    self.note(if e.snat.map(|s| s.0) == Some(t.saddr) {
                        "established: moved source port (after a clash)"
                    } else {
                        "established: SNATed"
                    });
                }
                if p.v6 {
                    self.note("IPv6 established");
                }
                return Expect::Translate {
                    dst: Some(e.nat),
                    src: e.snat,
                    reason: Reason::NatEstablished,
                };
            }
            if !closed {
                self.note("new SYN on an entry of an older backend set: picked again");
            }
        }
        self.new_flow(f, &p, si, untracked)
    }

    /// A new flow to frontend `si` (or a packet without state on its way
    /// to become one). `untracked`: its tuple has no conntrack entry.
    fn new_flow(&mut self, f: &[u8], p: &L4, si: usize, untracked: bool) -> Expect {
        let t = p.tuple;
        // The flood guard decides first (before the source ranges): a TCP
        // segment or a UDP datagram of an untracked tuple to a frontend
        // whose backend follows from the hash (Maglev with endpoints, no
        // affinity) counts against the quota, and beyond it goes without
        // state (a flow whose reply entry there saw an answer gets state
        // all the same with its next packet but a SYN, below).
        let starts = t.proto == TCP && p.flags & (SYN | ACK) == SYN;
        let svc = &self.services[si];
        let eligible = (t.proto == TCP || t.proto == UDP) && svc.affinity_s.is_none() && !svc.backends.is_empty();
        let stateless = eligible && untracked && !self.admit_new_flow();
        if eligible && !untracked && self.flood_limit != 0 && self.flood_used >= self.flood_limit {
            self.note("flood guard: a SYN on a tracked tuple gets state beyond the quota");
        }
        let svc = &self.services[si];
        if svc.flags & SVC_F_SOURCE_RANGES != 0 && !svc.source_ranges.iter().any(|r| in_prefix(t.saddr, *r)) {
            return Expect::Drop(Reason::DropSourceRange);
        }
        if svc.backends.is_empty() {
            if svc.flags & SVC_F_DROP_NO_LOCAL != 0 {
                return Expect::Drop(Reason::DropNoLocalBackend);
            }
            let e = reject(f, p);
            if p.v6 && matches!(e, Expect::Reject(_)) {
                self.note("IPv6 reject");
            }
            return e;
        }
        let picked = svc.backends[svc.table[(hash(&t) % maglev::DEFAULT_SIZE) as usize] as usize];
        let (version, flags, affinity) = (svc.version, svc.flags, svc.affinity_s.is_some());
        // The client's remembered backend, or the one it is remembered with.
        let backend = if affinity {
            *self.affinity.entry((si, t.saddr)).or_insert(picked)
        } else {
            picked
        };
        if backend != picked {
            self.note("affinity: the client's earlier backend, not the hash's");
        }
        let be = (backend.ip(), backend.host_port());
        let external = flags & SVC_F_EXTERNAL != 0 && backend.flags & BACKEND_F_REMOTE != 0;
        let hairpin = t.saddr == be.0;
        let mut src = None;
        if external || hairpin {
            let node = node_addr(t.saddr);
            match self.free_source(&t, be, node) {
                Some((port, tries)) => {
                    src = Some((node, port));
                    self.note(if hairpin {
                        "new flow: hairpin, SNATed to the node"
                    } else {
                        "new flow: remote backend, SNATed to the node"
                    });
                    if tries > 0 {
                        self.note("SNAT: a later candidate port (earlier ones in use)");
                    }
                    let held = Tuple {
                        saddr: be.0,
                        daddr: node,
                        sport: be.1,
                        dport: port,
                        proto: t.proto,
                    };
                    if self.ct.contains_key(&held) {
                        self.note("SNAT: a port a closed flow held, taken again");
                    }
                }
                None => {
                    self.note("SNAT: all 8 candidate ports in use");
                    return Expect::Drop(Reason::DropSnatFailed);
                }
            }
        }
        let reply_key = |src: Option<Ep>| Tuple {
            saddr: be.0,
            daddr: src.map_or(t.saddr, |s| s.0),
            sport: be.1,
            dport: src.map_or(t.sport, |s| s.1),
            proto: t.proto,
        };
        let reply_value = |src: Option<Ep>| CtEntry {
            nat: (t.daddr, t.dport),
            snat: src.map(|_| (t.saddr, t.sport)),
            flags: CT_F_REPLY | if src.is_some() { CT_F_SNAT } else { 0 },
            version,
        };
        let answered = stateless
            && !starts
            && self
                .syn
                .get(&reply_key(src))
                .is_some_and(|e| e.flags & CT_F_SEEN_REPLY != 0);
        if answered {
            self.note(if t.proto == UDP {
                "flood guard: a UDP flow's state created by its datagram after an answer"
            } else {
                "flood guard: a TCP flow's state created beyond the quota by its segment after an answer"
            });
        }
        if stateless && !answered {
            // Only the reply entry, in the guard's own table: the SYN-ACK
            // (or UDP answer) finds it when conntrack has nothing. Another
            // flow's entry there is not written over: the packet is
            // dropped (a SNATed flow's port was chosen free of them, so
            // this is one client port to two frontends with one backend).
            if let Some(old) = self.syn.get(&reply_key(src)) {
                let new = reply_value(src);
                if old.nat != new.nat || old.snat != new.snat {
                    self.note("flood guard: another flow's entry without state on the reply tuple, dropped");
                    return Expect::Drop(Reason::DropSnatFailed);
                }
            }
            if self.syn.insert(reply_key(src), reply_value(src)).is_none() {
                self.embryonic.push(reply_key(src));
            }
            self.stateless += 1;
            if !starts {
                self.gate = true;
            }
            if t.proto == UDP {
                self.note("flood guard: UDP datagram without state");
            } else if !starts {
                self.note("flood guard: TCP segment of an untracked tuple without state (not a SYN)");
            }
            self.note(if src.is_some() {
                "flood guard: SNATed new flow without state"
            } else {
                "flood guard: new flow without state"
            });
            return Expect::Translate {
                dst: Some(be),
                src,
                reason: Reason::NatNewFlow,
            };
        }
        if t.proto == TCP
            && !starts
            && self
                .syn
                .get(&reply_key(src))
                .is_some_and(|e| e.nat == (t.daddr, t.dport))
        {
            self.note("flood guard: the flow's state created by its next packet");
        }
        // The reply entry of another live flow is never written over: the
        // new flow moves to another source port (on its own address, or
        // the node's when SNATed).
        if let Some(old) = self.ct.get(&reply_key(src)) {
            let new = reply_value(src);
            let live = old.flags & CT_F_CLOSING == 0;
            let same = old.nat == new.nat && old.flags & CT_F_SNAT == new.flags & CT_F_SNAT && old.snat == new.snat;
            if live && !same {
                let addr = src.map_or(t.saddr, |s| s.0);
                match self.free_source(&t, be, addr) {
                    Some((port, _)) => {
                        self.clashed.insert(reply_key(src));
                        src = Some((addr, port));
                        self.clashes += 1;
                        self.note("new flow: reply tuple clash, another source port");
                    }
                    None => return Expect::Drop(Reason::DropSnatFailed),
                }
            }
        }
        self.ct.insert(reply_key(src), reply_value(src));
        let original = CtEntry {
            nat: be,
            snat: src,
            flags: CT_F_ORIGINAL | if src.is_some() { CT_F_SNAT } else { 0 },
            version,
        };
        if self.ct.insert(t, original).is_none() {
            self.flows.push(t);
        }
        if p.v6 {
            self.note("IPv6 new flow");
            if p.l3_hlen > 40 {
                self.note("IPv6 new flow behind extension headers");
            }
        }
        Expect::Translate {
            dst: Some(be),
            src,
            reason: Reason::NatNewFlow,
        }
    }

    /// The documented SNAT port rule: candidate `i` (0..8) is
    /// `first + (h + i * SNAT_STEP) mod span` (32-bit wrapping sum), `h`
    /// the flow hash of the client's tuple towards the frontend; the first
    /// candidate whose reply tuple (`backend` towards `addr:port`) has no
    /// entry of a flow still open (none, or one of a closed flow) is taken.
    /// Returns the port and how many candidates were passed over.
    fn free_source(&self, t: &Tuple, backend: Ep, addr: IpAddr) -> Option<(u16, u32)> {
        let (first, last) = SNAT_PORTS;
        let span = (last - first) as u32 + 1;
        let h = hash(t);
        (0..SNAT_TRIES).find_map(|i| {
            let port = first + (h.wrapping_add(i.wrapping_mul(SNAT_STEP)) % span) as u16;
            let key = Tuple {
                saddr: backend.0,
                daddr: addr,
                sport: backend.1,
                dport: port,
                proto: t.proto,
            };
            // A flow the flood guard served without state holds its port
            // too (its entry never expires in this test).
            let free = self.ct.get(&key).is_none_or(|e| e.flags & CT_F_CLOSING != 0)
                && (self.flood_limit == 0 || !self.syn.contains_key(&key));
            free.then_some((port, i))
        })
    }

    /// Not addressed to a frontend: a reply of a tracked flow gets the
    /// frontend back as its source (and the client back as its destination
    /// when the flow was SNATed); the original entry learns that a reply
    /// was seen / the flow closes.
    fn reply(&mut self, p: &L4, closes: bool) -> Expect {
        let t = p.tuple;
        // Conntrack first; a SYN-ACK that finds nothing there may answer a
        // SYN the flood guard served without state (its entry is not
        // marked closing by the reply itself: only conntrack's are).
        let syn_ack = t.proto == TCP && p.flags & (SYN | ACK) == SYN | ACK;
        let gated = t.proto == UDP || t.proto == TCP && p.flags & (SYN | ACK) != SYN;
        let looks = syn_ack || gated && self.gate;
        let e = match self.ct.get_mut(&t) {
            Some(e) => {
                if closes {
                    e.flags |= CT_F_CLOSING;
                }
                e
            }
            None if looks && self.flood_limit != 0 && self.syn.contains_key(&t) => {
                self.stateless_replies += 1;
                self.note(if t.proto == UDP {
                    "flood guard: UDP answer of a datagram without state, from the frontend"
                } else if syn_ack {
                    "flood guard: SYN-ACK of a flow without state, from the frontend"
                } else {
                    "flood guard: TCP answer (not a SYN-ACK) of a flow without state, from the frontend"
                });
                self.syn.get_mut(&t).expect("checked")
            }
            None => return self.pass_no_service(p),
        };
        if e.flags & CT_F_REPLY == 0 {
            return self.pass_no_service(p);
        }
        let mut learn = 0;
        if e.flags & CT_F_SEEN_REPLY == 0 {
            e.flags |= CT_F_SEEN_REPLY;
            learn |= CT_F_SEEN_REPLY;
        }
        if closes {
            learn |= CT_F_CLOSING;
        }
        let e = *e;
        let (client, cport) = e.snat.unwrap_or((t.daddr, t.dport));
        let original = Tuple {
            saddr: client,
            daddr: e.nat.0,
            sport: cport,
            dport: e.nat.1,
            proto: t.proto,
        };
        if let Some(o) = self.ct.get_mut(&original) {
            o.flags |= learn;
        }
        match e.snat {
            Some((c, _)) if c == t.daddr => self.note("reply: moved source port (after a clash) restored"),
            Some(_) => self.note("reply: SNAT reversed"),
            None => {}
        }
        if self.clashed.contains(&t) {
            self.note("reply of a flow another one clashed with");
        }
        if p.v6 {
            self.note("IPv6 reply");
        }
        Expect::Translate {
            dst: e.snat,
            src: Some(e.nat),
            reason: Reason::NatReply,
        }
    }

    /// Passing untouched; a TCP SYN whose reversed tuple is the reply entry
    /// of a closing flow removes that flow's entries (its tuple is taken).
    fn pass_no_service(&mut self, p: &L4) -> Expect {
        let t = &p.tuple;
        if t.proto == TCP && p.flags & (SYN | ACK) == SYN {
            let reversed = t.reversed();
            let both = CT_F_REPLY | CT_F_CLOSING;
            if let Some(e) = self.ct.get(&reversed).filter(|e| e.flags & both == both) {
                let (client, cport) = e.snat.unwrap_or((t.saddr, t.sport));
                let original = Tuple {
                    saddr: client,
                    daddr: e.nat.0,
                    sport: cport,
                    dport: e.nat.1,
                    proto: t.proto,
                };
                self.ct.remove(&reversed);
                self.ct.remove(&original);
                self.flows.retain(|f| *f != original);
            }
        }
        Expect::Pass(Reason::PassNoService)
    }
}

/// Frames BPF_PROG_TEST_RUN refuses before running the program: shorter
/// than an Ethernet header (both hooks); for skb programs also IPv4 and
/// IPv6 frames whose fixed network header is incomplete.
fn refused(hook: Hook, f: &[u8]) -> bool {
    if f.len() < ETH {
        return true;
    }
    hook == Hook::Tc
        && match be16(f, 12) {
            0x0800 => f.len() < ETH + 20,
            0x86dd => f.len() < ETH + 40,
            _ => false,
        }
}

/// The reject for a frame to a frontend without endpoints: a RST from the
/// VIP (never for a RST), or an ICMP / ICMPv6 port unreachable quoting the
/// IP header and 8 bytes (only for headers without options or extension
/// headers).
fn reject(f: &[u8], p: &L4) -> Expect {
    let t = &p.tuple;
    if t.proto == TCP && p.flags & RST != 0 {
        return Expect::Drop(Reason::DropNoBackend);
    }
    let plain = if p.v6 { 40 } else { 20 };
    if t.proto == UDP && p.l3_hlen != plain {
        return Expect::Drop(Reason::DropNoBackend);
    }
    let mut out = Vec::with_capacity(110);
    out.extend_from_slice(&f[6..12]);
    out.extend_from_slice(&f[0..6]);
    out.extend_from_slice(if p.v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    let ip = |proto: u8, payload: u16| -> Vec<u8> {
        if p.v6 {
            let mut h = vec![0x60, 0, 0, 0];
            h.extend_from_slice(&payload.to_be_bytes());
            h.extend_from_slice(&[proto, 64]);
            h.extend(octets(t.daddr));
            h.extend(octets(t.saddr));
            return h;
        }
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&(payload + 20).to_be_bytes());
        h.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
        h.extend(octets(t.daddr));
        h.extend(octets(t.saddr));
        let c = checksum(&h, 0);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    };
    if t.proto == TCP {
        let l4 = &f[p.l4..];
        let seq = u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]);
        let ack = u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]);
        let doff = (l4[12] >> 4) as usize * 4;
        let seg = p.l3_len.saturating_sub(p.l3_hlen + doff) as u32
            + (p.flags & SYN != 0) as u32
            + (p.flags & FIN != 0) as u32;
        let (rseq, rack, rflags) = if p.flags & ACK != 0 {
            (ack, 0, RST)
        } else {
            (0, seq.wrapping_add(seg), RST | ACK)
        };
        out.extend(ip(TCP, 20));
        let mut tcp = Vec::with_capacity(20);
        tcp.extend_from_slice(&t.dport.to_be_bytes());
        tcp.extend_from_slice(&t.sport.to_be_bytes());
        tcp.extend_from_slice(&rseq.to_be_bytes());
        tcp.extend_from_slice(&rack.to_be_bytes());
        tcp.extend_from_slice(&[0x50, rflags, 0, 0, 0, 0, 0, 0]);
        let c = checksum(&tcp, pseudo(t.daddr, t.saddr, TCP, 20));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&tcp);
    } else if p.v6 {
        out.extend(ip(58, 56));
        let mut icmp = vec![1, 4, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&f[ETH..ETH + 48]);
        let c = checksum(&icmp, pseudo(t.daddr, t.saddr, 58, 56));
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&icmp);
    } else {
        out.extend(ip(1, 36));
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&f[ETH..ETH + 28]);
        let c = checksum(&icmp, 0);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&icmp);
    }
    Expect::Reject(out)
}

/// The TCP/UDP (ICMPv6) pseudo-header sum of either family.
fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let words = |ip: IpAddr| -> u32 { octets(ip).chunks(2).map(|w| be16(w, 0) as u32).sum() };
    words(src) + words(dst) + proto as u32 + (len >> 16) as u32 + (len & 0xffff) as u32
}

/// One's complement sum of `data` folded to 16 bits, with 0xffff and 0
/// both read as zero.
fn residual(data: &[u8], init: u32) -> u16 {
    let r = !checksum(data, init);
    if r == 0xffff {
        0
    } else {
        r
    }
}

/// The checksum sums a translation must preserve: the IPv4 header's (0
/// for IPv6), and the L4 segment's with its pseudo-header (over the bytes
/// present, up to the IP length). A rewrite with a correct incremental
/// update keeps both: a valid checksum stays valid, a broken one stays
/// exactly as broken.
fn residuals(f: &[u8]) -> (u16, u16) {
    let p = classify(f).expect("a translated frame parses");
    let ip = if p.v6 { 0 } else { residual(&f[ETH..ETH + p.l3_hlen], 0) };
    let end = (p.l4 + p.l4_len).min(f.len());
    let l4 = residual(
        &f[p.l4..end],
        pseudo(p.tuple.saddr, p.tuple.daddr, p.tuple.proto, p.l4_len),
    );
    (ip, l4)
}

/// Whether the IPv4 header and L4 checksums of `f` verify from scratch (a
/// zero UDP checksum counts as valid: none was sent).
pub fn checksums_valid(f: &[u8]) -> bool {
    let Ok(p) = classify(f) else { return false };
    if p.l4 + p.l4_len > f.len() {
        return false;
    }
    let udp_none = p.tuple.proto == UDP && be16(f, p.l4 + 6) == 0;
    let r = residuals(f);
    r == (0, 0) || (udp_none && r.0 == 0)
}

/// Checks a program's answer against the model's expectation; `Err` says
/// what differs.
pub fn check(
    hook: Hook,
    input: &[u8],
    expect: &Expect,
    ran: Result<(u32, Vec<u8>), dataplane::bpf::sys::SysError>,
) -> Result<(), String> {
    let (pass, drop, bounce) = match hook {
        Hook::Xdp => (2u32, 1u32, 3u32),
        Hook::Tc => (u32::MAX, 2, 7),
    };
    let (retval, out) = match (expect, ran) {
        (Expect::Refused, Err(e)) if e.errno() == Some(libc::EINVAL) => return Ok(()),
        (Expect::Refused, r) => return Err(format!("expected EINVAL from BPF_PROG_TEST_RUN, got {r:?}")),
        (_, Err(e)) => return Err(format!("BPF_PROG_TEST_RUN failed: {e}")),
        (_, Ok(r)) => r,
    };
    match expect {
        Expect::Refused => unreachable!(),
        Expect::Pass(_) => {
            if retval != pass {
                return Err(format!("verdict {retval}, expected pass ({pass})"));
            }
            if out != input {
                return Err(format!("passed frame was modified: {}", hex(&out)));
            }
        }
        Expect::Drop(_) => {
            if retval != drop {
                return Err(format!("verdict {retval}, expected drop ({drop})"));
            }
        }
        Expect::Reject(want) => {
            if retval != bounce {
                return Err(format!("verdict {retval}, expected the reject sent back ({bounce})"));
            }
            if &out != want {
                return Err(format!("reject bytes {}\n   expected {}", hex(&out), hex(want)));
            }
        }
        Expect::Translate { dst, src, .. } => {
            if retval != pass {
                return Err(format!("verdict {retval}, expected pass ({pass}) after translation"));
            }
            return check_translation(input, &out, *dst, *src);
        }
    }
    Ok(())
}

fn check_translation(input: &[u8], out: &[u8], dst: Option<Ep>, src: Option<Ep>) -> Result<(), String> {
    let p = classify(input).expect("translated frames parse");
    let (saddr_off, daddr_off) = if p.v6 {
        (ETH + 8, ETH + 24)
    } else {
        (ETH + 12, ETH + 16)
    };
    let csum_off = p.l4 + if p.tuple.proto == TCP { 16 } else { 6 };
    let mut want = input.to_vec();
    for (ep, addr_off, port_off) in [(dst, daddr_off, p.l4 + 2), (src, saddr_off, p.l4)] {
        if let Some((a, port)) = ep {
            let o = octets(a);
            if a.is_ipv6() != p.v6 {
                return Err(format!("the model translates to {a}, of the other family"));
            }
            want[addr_off..addr_off + o.len()].copy_from_slice(&o);
            want[port_off..port_off + 2].copy_from_slice(&port.to_be_bytes());
        }
    }
    if out.len() != want.len() {
        return Err(format!("length {} instead of {}", out.len(), want.len()));
    }
    // Everything but the checksum fields is exact.
    let mut masked_out = out.to_vec();
    let mut sums = vec![csum_off];
    if !p.v6 {
        sums.push(ETH + 10);
    }
    for off in sums {
        masked_out[off..off + 2].copy_from_slice(&want[off..off + 2]);
    }
    if masked_out != want {
        return Err(format!("rewrite differs: got {}\n   expected {}", hex(out), hex(&want)));
    }
    let udp_none = p.tuple.proto == UDP && be16(input, csum_off) == 0;
    if udp_none {
        if be16(out, csum_off) != 0 {
            return Err("a zero UDP checksum (none) must stay zero".into());
        }
        if !p.v6 && residual(&out[ETH..ETH + p.l3_hlen], 0) != residual(&input[ETH..ETH + p.l3_hlen], 0) {
            return Err("IPv4 header checksum not updated consistently".into());
        }
    } else {
        if p.tuple.proto == UDP && be16(out, csum_off) == 0 {
            return Err("a UDP checksum became zero (would mean: none)".into());
        }
        if residuals(out) != residuals(input) {
            return Err(format!(
                "checksums not updated consistently: sums {:?} before, {:?} after",
                residuals(input),
                residuals(out)
            ));
        }
    }
    if checksums_valid(input) && !checksums_valid(out) {
        return Err("valid checksums became invalid".into());
    }
    Ok(())
}

pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// Clients come from a small pool per family so that the number of
/// distinct flows (two conntrack entries each) stays far below the
/// conntrack map size: LRU eviction never interferes with the model.
pub const CLIENT_NET: [u8; 3] = [198, 18, 100];
/// IPv6 clients: 2001:db8:100::1 to ::32.
pub const CLIENT_NET6: [u16; 3] = [0x2001, 0xdb8, 0x100];
pub const CLIENT_HOSTS: u8 = 32;
pub const CLIENT_PORTS: u16 = 32;
pub const CLIENT_PORT_BASE: u16 = 40000;
/// Source ports of backends reaching Services (hairpin).
pub const BACKEND_CLIENT_PORTS: u16 = 16;

/// What the generator built, for statistics and error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    ToService,
    Established,
    Reply,
    /// From a tracked flow's client and port straight to its backend (a
    /// connection that does not go through the VIP, reusing the port).
    DirectToBackend,
    /// From a backend to a frontend, mostly its own (hairpin when it is
    /// picked itself).
    FromBackend,
    /// The backend's answer (mostly a SYN-ACK) to a SYN the flood guard
    /// served without state.
    StatelessReply,
    /// The next packet of a client whose SYN was served without state
    /// (mostly its ACK).
    StatelessFollowUp,
    NoServicePort,
    Random5Tuple,
    Arp,
    Vlan,
    Ipv6,
    IcmpError,
    OtherProto,
    Garbage,
}

/// A frame under construction: IPv4 or IPv6 (the addresses' family) +
/// TCP/UDP, built valid, then perhaps broken.
struct Spec {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    proto: u8,
    flags: u8,
}

pub struct Generator {
    rng: Rng,
}

impl Generator {
    pub fn new(seed: u64) -> Generator {
        Generator { rng: Rng::new(seed) }
    }

    pub fn hook(&mut self) -> Hook {
        if self.rng.chance(50) {
            Hook::Xdp
        } else {
            Hook::Tc
        }
    }

    fn client(&mut self, v6: bool) -> (IpAddr, u16) {
        let h = 1 + self.rng.below(CLIENT_HOSTS as usize) as u8;
        let p = CLIENT_PORT_BASE + self.rng.below(CLIENT_PORTS as usize) as u16;
        let ip = if v6 {
            let [a, b, c] = CLIENT_NET6;
            IpAddr::from(Ipv6Addr::new(a, b, c, 0, 0, 0, 0, h as u16))
        } else {
            IpAddr::from([CLIENT_NET[0], CLIENT_NET[1], CLIENT_NET[2], h])
        };
        (ip, p)
    }

    fn tcp_flags(&mut self) -> u8 {
        *self.rng.pick(&[
            SYN,
            SYN,
            SYN,
            ACK,
            ACK,
            ACK | 0x08, // PSH
            SYN | ACK,
            FIN | ACK,
            RST,
            RST | ACK,
            SYN | FIN,
            0,
            0xff,
        ])
    }

    fn mac(&mut self) -> [u8; 6] {
        let mut m = [0u8; 6];
        for b in &mut m {
            *b = self.rng.u8();
        }
        m
    }

    fn eth(&mut self, ethertype: u16) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&self.mac());
        f.extend_from_slice(&self.mac());
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    /// The TCP (random options, sequence numbers, window) or UDP header
    /// and a random payload, checksum zero.
    fn l4(&mut self, s: &Spec) -> Vec<u8> {
        let mut l4 = Vec::with_capacity(64);
        l4.extend_from_slice(&s.sport.to_be_bytes());
        l4.extend_from_slice(&s.dport.to_be_bytes());
        let payload_len = if self.rng.chance(50) { 0 } else { self.rng.below(300) };
        if s.proto == TCP {
            let tcp_opt_words = if self.rng.chance(20) { 1 + self.rng.below(10) } else { 0 };
            l4.extend_from_slice(&self.rng.u32().to_be_bytes());
            l4.extend_from_slice(&self.rng.u32().to_be_bytes());
            l4.push(((5 + tcp_opt_words) as u8) << 4);
            l4.push(s.flags);
            l4.extend_from_slice(&self.rng.u16().to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 0]);
            l4.extend(std::iter::repeat_n(1u8, tcp_opt_words * 4)); // NOPs
        } else {
            l4.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend(self.rng.bytes(payload_len));
        l4
    }

    /// A valid frame for `s` of its addresses' family, with correct
    /// checksums (a zero UDP checksum sometimes).
    fn build(&mut self, s: &Spec) -> Vec<u8> {
        let mut f = if s.src.is_ipv6() {
            self.build6(s)
        } else {
            self.build4(s)
        };
        let zero_udp = s.proto == UDP && self.rng.chance(10);
        fix_checksums(&mut f, !zero_udp);
        if self.rng.chance(10) {
            // Ethernet padding after the IP packet.
            let n = 1 + self.rng.below(40);
            let pad = self.rng.bytes(n);
            f.extend(pad);
        }
        f
    }

    /// IPv4 with random options.
    fn build4(&mut self, s: &Spec) -> Vec<u8> {
        let mut f = self.eth(0x0800);
        let opt_words = if self.rng.chance(15) { 1 + self.rng.below(10) } else { 0 };
        let ihl = 20 + opt_words * 4;
        let l4 = self.l4(s);
        let mut ip = vec![0x40 | (ihl / 4) as u8, self.rng.u8()];
        ip.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&self.rng.u16().to_be_bytes());
        ip.extend_from_slice(&(if self.rng.chance(50) { 0x4000u16 } else { 0 }).to_be_bytes());
        ip.push(1 + self.rng.u8() / 2);
        ip.push(s.proto);
        ip.extend_from_slice(&[0, 0]);
        ip.extend(octets(s.src));
        ip.extend(octets(s.dst));
        for _ in 0..opt_words {
            // NOPs, or a record-route-like option of garbage.
            if self.rng.chance(50) {
                ip.extend_from_slice(&[1, 1, 1, 1]);
            } else {
                ip.extend_from_slice(&[7, 4, self.rng.u8(), self.rng.u8()]);
            }
        }
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }

    /// IPv6, sometimes with extension headers in front of L4: hop-by-hop,
    /// destination options, routing (mostly without segments left), now
    /// and then a fragment header.
    fn build6(&mut self, s: &Spec) -> Vec<u8> {
        let mut f = self.eth(0x86dd);
        let l4 = self.l4(s);
        let mut kinds = Vec::new();
        if self.rng.chance(20) {
            for _ in 0..1 + self.rng.below(3) {
                kinds.push(*self.rng.pick(&[0u8, 60, 60, 43, 43, 44]));
            }
        }
        let mut ext = Vec::new();
        for (i, k) in kinds.iter().enumerate() {
            let next = kinds.get(i + 1).copied().unwrap_or(s.proto);
            match k {
                44 => {
                    ext.extend_from_slice(&[next, 0]);
                    let rest = self.rng.bytes(6);
                    ext.extend(rest);
                }
                43 => {
                    let units = self.rng.below(3);
                    let left = if self.rng.chance(85) {
                        0
                    } else {
                        1 + self.rng.below(3) as u8
                    };
                    ext.extend_from_slice(&[next, units as u8, self.rng.u8(), left]);
                    let rest = self.rng.bytes(4 + units * 8);
                    ext.extend(rest);
                }
                _ => {
                    let units = self.rng.below(3);
                    ext.extend_from_slice(&[next, units as u8]);
                    let rest = self.rng.bytes(6 + units * 8);
                    ext.extend(rest);
                }
            }
        }
        f.push(0x60 | (self.rng.u8() & 0x0f));
        let flow = self.rng.bytes(3);
        f.extend(flow);
        f.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
        f.push(kinds.first().copied().unwrap_or(s.proto));
        f.push(1 + self.rng.u8() / 2);
        f.extend(octets(s.src));
        f.extend(octets(s.dst));
        f.extend(ext);
        f.extend(l4);
        f
    }

    /// Breaks a valid frame in one or more of the ways a hostile network
    /// does; recomputes the checksums afterwards or not.
    fn mutate(&mut self, f: Vec<u8>) -> Vec<u8> {
        if f.len() >= ETH && be16(&f, 12) == 0x86dd {
            self.mutate6(f)
        } else {
            self.mutate4(f)
        }
    }

    fn mutate4(&mut self, mut f: Vec<u8>) -> Vec<u8> {
        let rounds = 1 + self.rng.below(2);
        for _ in 0..rounds {
            let ihl = ((f.get(ETH).copied().unwrap_or(0x45) & 0xf) as usize * 4).max(20);
            match self.rng.below(11) {
                0 => {
                    // Truncate at a header boundary (or one byte either side).
                    let b = *self.rng.pick(&[
                        0,
                        1,
                        ETH - 1,
                        ETH,
                        ETH + 1,
                        ETH + 10,
                        ETH + 19,
                        ETH + 20,
                        ETH + ihl - 1,
                        ETH + ihl,
                        ETH + ihl + 1,
                        ETH + ihl + 4,
                        ETH + ihl + 7,
                        ETH + ihl + 8,
                        ETH + ihl + 13,
                        ETH + ihl + 19,
                        ETH + ihl + 20,
                    ]);
                    let b = if self.rng.chance(20) {
                        self.rng.below(f.len() + 1)
                    } else {
                        b
                    };
                    f.truncate(b);
                }
                1 if f.len() > ETH => f[ETH] = (f[ETH] & 0xf0) | self.rng.below(16) as u8,
                2 if f.len() > ETH => f[ETH] = (self.rng.u8() & 0xf0) | (f[ETH] & 0x0f),
                3 if f.len() >= ETH + 4 => {
                    let real = f.len() - ETH;
                    let v = match self.rng.below(5) {
                        0 => 0,
                        1 => self.rng.below(real + 1),
                        2 => real + 1 + self.rng.below(100),
                        3 => 0xffff,
                        _ => ihl + self.rng.below(30),
                    };
                    f[ETH + 2..ETH + 4].copy_from_slice(&(v as u16).to_be_bytes());
                }
                4 if f.len() >= ETH + 8 => {
                    // First, middle, last fragment, or DF only.
                    let off = 1 + self.rng.below(0x1fff) as u16;
                    let v = *self
                        .rng
                        .pick(&[0x2000u16, 0x2000 | off, off, 0x4000 | off, 0x6000, 0x4000]);
                    f[ETH + 6..ETH + 8].copy_from_slice(&v.to_be_bytes());
                }
                5 if f.len() > ETH + ihl + 12 => {
                    let doff = self.rng.below(16) as u8;
                    f[ETH + ihl + 12] = (doff << 4) | (f[ETH + ihl + 12] & 0x0f);
                }
                6 if f.len() >= ETH + 12 => {
                    // Zero or bogus IPv4 checksum.
                    let v = if self.rng.chance(50) { 0 } else { self.rng.u16() };
                    f[ETH + 10..ETH + 12].copy_from_slice(&v.to_be_bytes());
                    return f;
                }
                7 if f.len() >= ETH + ihl + 18 => {
                    // Zero or bogus L4 checksum (TCP offset; UDP payload
                    // bytes otherwise).
                    let off = if f[ETH + 9] == UDP {
                        ETH + ihl + 6
                    } else {
                        ETH + ihl + 16
                    };
                    let v = if self.rng.chance(50) { 0 } else { self.rng.u16() };
                    f[off..off + 2].copy_from_slice(&v.to_be_bytes());
                    return f;
                }
                8 if !f.is_empty() => self.flip_bits(&mut f),
                9 => {
                    let n = 1 + self.rng.below(64);
                    let extra = self.rng.bytes(n);
                    f.extend(extra);
                }
                _ if f.len() >= ETH + 10 => f[ETH + 9] = *self.rng.pick(&[TCP, UDP, 1, 47, 132, 0, 255]),
                _ => {}
            }
        }
        if self.rng.chance(60) {
            fix_checksums(&mut f, true);
        }
        f
    }

    fn flip_bits(&mut self, f: &mut [u8]) {
        for _ in 0..1 + self.rng.below(3) {
            let i = self.rng.below(f.len());
            f[i] ^= 1 << self.rng.below(8);
        }
    }

    /// IPv6: truncation at every header boundary, other versions, payload
    /// lengths zero, short, long, other next headers, extension header
    /// lengths, TCP data offsets, checksums, bit flips, trailing bytes.
    fn mutate6(&mut self, mut f: Vec<u8>) -> Vec<u8> {
        let rounds = 1 + self.rng.below(2);
        for _ in 0..rounds {
            let l4 = l4_offset6(&f).unwrap_or(ETH + 40);
            match self.rng.below(10) {
                0 => {
                    let b = *self.rng.pick(&[
                        0,
                        ETH - 1,
                        ETH,
                        ETH + 1,
                        ETH + 7,
                        ETH + 39,
                        ETH + 40,
                        ETH + 41,
                        ETH + 44,
                        l4 - 1,
                        l4,
                        l4 + 1,
                        l4 + 4,
                        l4 + 7,
                        l4 + 8,
                        l4 + 13,
                        l4 + 19,
                        l4 + 20,
                    ]);
                    let b = if self.rng.chance(20) {
                        self.rng.below(f.len() + 1)
                    } else {
                        b
                    };
                    f.truncate(b.min(f.len()));
                }
                1 if f.len() > ETH => f[ETH] = (self.rng.u8() & 0xf0) | (f[ETH] & 0x0f),
                2 if f.len() >= ETH + 6 => {
                    let real = f.len().saturating_sub(ETH + 40);
                    let v = match self.rng.below(5) {
                        0 => 0,
                        1 => self.rng.below(real + 1),
                        2 => real + 1 + self.rng.below(100),
                        3 => 0xffff,
                        _ => (l4 - ETH - 40) + self.rng.below(30),
                    };
                    f[ETH + 4..ETH + 6].copy_from_slice(&(v as u16).to_be_bytes());
                }
                3 if f.len() > ETH + 6 => f[ETH + 6] = *self.rng.pick(&[TCP, UDP, 0, 43, 44, 60, 58, 59, 255]),
                4 if f.len() > ETH + 41 && l4 > ETH + 40 => {
                    // An extension header's length or next header.
                    if self.rng.chance(50) {
                        f[ETH + 41] = self.rng.u8();
                    } else {
                        f[ETH + 40] = *self.rng.pick(&[TCP, UDP, 0, 43, 44, 60, 58]);
                    }
                }
                5 if f.len() > l4 + 12 => {
                    let doff = self.rng.below(16) as u8;
                    f[l4 + 12] = (doff << 4) | (f[l4 + 12] & 0x0f);
                }
                6 if f.len() >= l4 + 18 => {
                    let off = if l4_proto6(&f) == Some(UDP) { l4 + 6 } else { l4 + 16 };
                    let v = if self.rng.chance(50) { 0 } else { self.rng.u16() };
                    f[off..off + 2].copy_from_slice(&v.to_be_bytes());
                    return f;
                }
                7 if !f.is_empty() => self.flip_bits(&mut f),
                8 => {
                    let n = 1 + self.rng.below(64);
                    let extra = self.rng.bytes(n);
                    f.extend(extra);
                }
                _ => {}
            }
        }
        if self.rng.chance(60) {
            fix_checksums(&mut f, true);
        }
        f
    }

    /// The next frame, built against what the model knows (services, and
    /// flows for replies and follow-ups).
    pub fn frame(&mut self, model: &Model) -> (Kind, Vec<u8>) {
        let kind = match self.rng.below(100) {
            0..=27 => Kind::ToService,
            28 => Kind::StatelessReply,
            29 => Kind::StatelessFollowUp,
            30..=44 => Kind::Established,
            45..=59 => Kind::Reply,
            60..=62 => Kind::NoServicePort,
            63..=66 => Kind::DirectToBackend,
            67..=70 => Kind::FromBackend,
            71..=73 => Kind::Random5Tuple,
            74..=75 => Kind::Arp,
            76..=78 => Kind::Vlan,
            79..=82 => Kind::Ipv6,
            83..=86 => Kind::IcmpError,
            87..=89 => Kind::OtherProto,
            _ => Kind::Garbage,
        };
        let kind = match kind {
            Kind::Established | Kind::Reply | Kind::DirectToBackend if model.flows.is_empty() => Kind::ToService,
            Kind::StatelessReply | Kind::StatelessFollowUp if model.embryonic.is_empty() => Kind::ToService,
            k => k,
        };
        let f = match kind {
            Kind::ToService => {
                let svc = self.rng.pick(&model.services).clone();
                let (c, cp) = self.client(svc.vip.is_ipv6());
                let flags = if svc.proto == TCP { self.tcp_flags() } else { 0 };
                let s = Spec {
                    src: c,
                    dst: svc.vip,
                    sport: cp,
                    dport: svc.port,
                    proto: svc.proto,
                    flags,
                };
                self.valid_or_broken(&s)
            }
            Kind::Established => {
                let t = *self.rng.pick(&model.flows);
                let flags = if t.proto == TCP { self.tcp_flags() } else { 0 };
                let s = Spec {
                    src: t.saddr,
                    dst: t.daddr,
                    sport: t.sport,
                    dport: t.dport,
                    proto: t.proto,
                    flags,
                };
                self.valid_or_broken(&s)
            }
            Kind::Reply => {
                let t = *self.rng.pick(&model.flows);
                let e = model.ct[&t];
                let flags = if t.proto == TCP {
                    *self.rng.pick(&[SYN | ACK, ACK, FIN | ACK, RST, RST | ACK, 0x18])
                } else {
                    0
                };
                // To the client, or to the source the flow was given.
                let (dst, dport) = e.snat.unwrap_or((t.saddr, t.sport));
                let s = Spec {
                    src: e.nat.0,
                    dst,
                    sport: e.nat.1,
                    dport,
                    proto: t.proto,
                    flags,
                };
                self.valid_or_broken(&s)
            }
            Kind::StatelessReply => {
                let r = *self.rng.pick(&model.embryonic);
                let flags = if r.proto == TCP {
                    *self
                        .rng
                        .pick(&[SYN | ACK, SYN | ACK, SYN | ACK, SYN | ACK | FIN, ACK, RST])
                } else {
                    0
                };
                let s = Spec {
                    src: r.saddr,
                    dst: r.daddr,
                    sport: r.sport,
                    dport: r.dport,
                    proto: r.proto,
                    flags,
                };
                self.valid_or_broken(&s)
            }
            Kind::StatelessFollowUp => {
                let r = *self.rng.pick(&model.embryonic);
                let e = model.syn[&r];
                let (client, cport) = e.snat.unwrap_or((r.daddr, r.dport));
                let flags = if r.proto == TCP {
                    *self.rng.pick(&[ACK, ACK, ACK, ACK | 0x08, SYN, FIN | ACK, RST])
                } else {
                    0
                };
                let s = Spec {
                    src: client,
                    dst: e.nat.0,
                    sport: cport,
                    dport: e.nat.1,
                    proto: r.proto,
                    flags,
                };
                self.valid_or_broken(&s)
            }
            Kind::DirectToBackend => {
                let t = *self.rng.pick(&model.flows);
                let e = model.ct[&t];
                let flags = if t.proto == TCP {
                    *self.rng.pick(&[SYN, SYN, ACK, FIN | ACK])
                } else {
                    0
                };
                let s = Spec {
                    src: t.saddr,
                    dst: e.nat.0,
                    sport: t.sport,
                    dport: e.nat.1,
                    proto: t.proto,
                    flags,
                };
                self.valid_or_broken(&s)
            }
            Kind::FromBackend => {
                let with_backends: Vec<&Svc> = model.services.iter().filter(|s| !s.backends.is_empty()).collect();
                let own = *self.rng.pick(&with_backends);
                let b = *self.rng.pick(&own.backends);
                // Mostly its own Service; sometimes another of its family.
                let svc = if self.rng.chance(90) {
                    own.clone()
                } else {
                    let same: Vec<&Svc> = model
                        .services
                        .iter()
                        .filter(|s| s.vip.is_ipv6() == own.vip.is_ipv6())
                        .collect();
                    (*self.rng.pick(&same)).clone()
                };
                let flags = if svc.proto == TCP { self.tcp_flags() } else { 0 };
                let s = Spec {
                    src: b.ip(),
                    dst: svc.vip,
                    sport: CLIENT_PORT_BASE + self.rng.below(BACKEND_CLIENT_PORTS as usize) as u16,
                    dport: svc.port,
                    proto: svc.proto,
                    flags,
                };
                self.valid_or_broken(&s)
            }
            Kind::NoServicePort => {
                let v6 = self.rng.chance(40);
                let vip: IpAddr = if v6 {
                    (*self.rng.pick(&VIPS6)).into()
                } else {
                    (*self.rng.pick(&VIPS)).into()
                };
                let (c, cp) = self.client(v6);
                let proto = if self.rng.chance(50) { TCP } else { UDP };
                let port = *self.rng.pick(&[80, 53, 443, 81, 8080, 8000, 0, 65535]);
                let s = Spec {
                    src: c,
                    dst: vip,
                    sport: cp,
                    dport: port,
                    proto,
                    flags: SYN,
                };
                self.valid_or_broken(&s)
            }
            Kind::Random5Tuple => {
                let (src, dst) = if self.rng.chance(20) {
                    let mut d = [0u8; 16];
                    d[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
                    d[4..].copy_from_slice(&self.rng.bytes(12));
                    if self.rng.chance(30) {
                        d[..8].copy_from_slice(&[0xfd, 0, 0, 0x18, 0, 0, 0, self.rng.u8()]);
                    }
                    let mut s = [0u8; 16];
                    s.copy_from_slice(&self.rng.bytes(16));
                    (IpAddr::from(s), IpAddr::from(d))
                } else {
                    let mut dst = self.rng.u32().to_be_bytes();
                    if self.rng.chance(30) {
                        dst = [198, 18, self.rng.u8(), 2];
                    }
                    (IpAddr::from(self.rng.u32().to_be_bytes()), IpAddr::from(dst))
                };
                let proto = if self.rng.chance(50) { TCP } else { UDP };
                let flags = self.tcp_flags();
                let s = Spec {
                    src,
                    dst,
                    sport: self.rng.u16(),
                    dport: self.rng.u16(),
                    proto,
                    flags,
                };
                self.valid_or_broken(&s)
            }
            Kind::Arp => {
                let mut f = self.eth(0x0806);
                f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1 + self.rng.below(2) as u8]);
                let body = self.rng.bytes(20);
                f.extend(body);
                self.maybe_truncate(f)
            }
            Kind::Vlan => {
                // A frame to a VIP behind a VLAN tag (or two): the datapath
                // does not parse tags, so it must pass untouched.
                let svc = self.rng.pick(&model.services).clone();
                let (c, cp) = self.client(svc.vip.is_ipv6());
                let inner = self.build(&Spec {
                    src: c,
                    dst: svc.vip,
                    sport: cp,
                    dport: svc.port,
                    proto: svc.proto,
                    flags: SYN,
                });
                let tpid = *self.rng.pick(&[0x8100u16, 0x88a8]);
                let mut f = inner[..12].to_vec();
                f.extend_from_slice(&tpid.to_be_bytes());
                f.extend_from_slice(&self.rng.u16().to_be_bytes());
                if tpid == 0x88a8 {
                    f.extend_from_slice(&0x8100u16.to_be_bytes());
                    f.extend_from_slice(&self.rng.u16().to_be_bytes());
                }
                f.extend_from_slice(&inner[12..]);
                self.maybe_truncate(f)
            }
            Kind::Ipv6 => self.ipv6(),
            Kind::IcmpError => self.icmp_error(model),
            Kind::OtherProto => {
                let svc = self.rng.pick(&model.services).clone();
                let (c, cp) = self.client(svc.vip.is_ipv6());
                let mut f = self.build(&Spec {
                    src: c,
                    dst: svc.vip,
                    sport: cp,
                    dport: svc.port,
                    proto: TCP,
                    flags: SYN,
                });
                if svc.vip.is_ipv6() {
                    f[ETH + 6] = *self.rng.pick(&[1, 58, 47, 50, 132, 59, 255]);
                } else {
                    f[ETH + 9] = *self.rng.pick(&[1, 2, 4, 41, 47, 50, 132, 136, 255]);
                    fix_checksums(&mut f, true);
                }
                f
            }
            Kind::Garbage => {
                let n = self.rng.below(160);
                let mut f = self.rng.bytes(n);
                if f.len() >= ETH && self.rng.chance(60) {
                    f[12..14].copy_from_slice(&[0x08, 0x00]);
                    if f.len() > ETH && self.rng.chance(60) {
                        f[ETH] = 0x40 | (f[ETH] & 0x0f);
                        if f.len() > ETH + 9 && self.rng.chance(60) {
                            f[ETH + 9] = *self.rng.pick(&[TCP, UDP]);
                            f[ETH + 6] &= 0xc0;
                            f[ETH + 7] = 0;
                        }
                    }
                }
                f
            }
        };
        (kind, f)
    }

    fn valid_or_broken(&mut self, s: &Spec) -> Vec<u8> {
        let f = self.build(s);
        if self.rng.chance(35) {
            self.mutate(f)
        } else {
            f
        }
    }

    fn maybe_truncate(&mut self, mut f: Vec<u8>) -> Vec<u8> {
        if self.rng.chance(20) {
            let n = self.rng.below(f.len() + 1);
            f.truncate(n);
        }
        f
    }

    /// IPv6 with a chain of random extension headers (hop-by-hop, routing,
    /// fragment, destination options) and random L4 bytes towards random
    /// addresses in 2001:db8::/32, where no Service is: it passes
    /// untouched (see `classify6` for the reason counted).
    fn ipv6(&mut self) -> Vec<u8> {
        let mut f = self.eth(0x86dd);
        let n_ext = self.rng.below(5);
        let exts: Vec<u8> = (0..n_ext).map(|_| *self.rng.pick(&[0u8, 43, 44, 60])).collect();
        let last = if self.rng.chance(50) { TCP } else { UDP };
        let mut body = Vec::new();
        for (i, _) in exts.iter().enumerate() {
            let next = exts.get(i + 1).copied().unwrap_or(last);
            let len_units = self.rng.below(3);
            body.push(next);
            body.push(len_units as u8);
            let rest = self.rng.bytes(6 + len_units * 8);
            body.extend(rest);
        }
        let l4_len = if last == TCP { 20 } else { 8 };
        let l4 = self.rng.bytes(l4_len);
        body.extend(l4);
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(body.len() as u16).to_be_bytes());
        f.push(exts.first().copied().unwrap_or(last));
        f.push(64);
        f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        let src = self.rng.bytes(12);
        f.extend(src);
        f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        let dst = self.rng.bytes(12);
        f.extend(dst);
        f.extend(body);
        self.maybe_truncate(f)
    }

    /// ICMP errors (unreachable, time exceeded) quoting garbage, or an
    /// IPv4 tracked flow's headers as the client sent them, towards a
    /// client or a VIP: no reply entry matches them, they pass.
    fn icmp_error(&mut self, model: &Model) -> Vec<u8> {
        let (c, _) = self.client(false);
        let dst = if self.rng.chance(50) {
            c
        } else {
            (*self.rng.pick(&VIPS)).into()
        };
        let t = (!model.flows.is_empty() && self.rng.chance(50))
            .then(|| *self.rng.pick(&model.flows))
            .filter(|t| t.saddr.is_ipv4());
        let mut quoted = if let Some(t) = t {
            let q = self.build(&Spec {
                src: t.saddr,
                dst: t.daddr,
                sport: t.sport,
                dport: t.dport,
                proto: t.proto,
                flags: SYN,
            });
            q[ETH..].to_vec()
        } else {
            let n = self.rng.below(60);
            self.rng.bytes(n)
        };
        quoted.truncate(28 + self.rng.below(40));
        let mut icmp = vec![
            *self.rng.pick(&[3u8, 11, 12, 5]),
            self.rng.below(16) as u8,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        icmp.extend(quoted);
        let c2 = checksum(&icmp, 0);
        icmp[2..4].copy_from_slice(&c2.to_be_bytes());
        let src = [198, 18, self.rng.u8(), 1];
        let mut f = self.eth(0x0800);
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
        ip.extend_from_slice(&src);
        ip.extend(octets(dst));
        let c3 = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c3.to_be_bytes());
        f.extend(ip);
        f.extend(icmp);
        f
    }
}

/// Where TCP/UDP starts in an IPv6 frame, walking extension headers as
/// they claim to be (for the generator; `None` when the chain is cut).
fn l4_offset6(f: &[u8]) -> Option<usize> {
    walk6(f).map(|(off, _)| off)
}

fn l4_proto6(f: &[u8]) -> Option<u8> {
    walk6(f).map(|(_, nh)| nh)
}

fn walk6(f: &[u8]) -> Option<(usize, u8)> {
    if f.len() < ETH + 40 {
        return None;
    }
    let (mut nh, mut off) = (f[ETH + 6], ETH + 40);
    for _ in 0..8 {
        match nh {
            TCP | UDP => return Some((off, nh)),
            0 | 43 | 44 | 60 => {
                if f.len() < off + 2 {
                    return None;
                }
                nh = f[off];
                off += (f[off + 1] as usize + 1) * 8;
            }
            _ => return None,
        }
    }
    None
}

/// Recomputes the IPv4 header checksum and, when the headers allow it, the
/// TCP/UDP checksum over what the IP length claims (UDP: left zero when
/// `udp_csum` is false). IPv6: the TCP/UDP checksum behind the extension
/// headers.
pub fn fix_checksums(f: &mut [u8], udp_csum: bool) {
    if f.len() < ETH {
        return;
    }
    let (l4, end, proto, src, dst) = match be16(f, 12) {
        0x0800 => {
            if f.len() < ETH + 20 {
                return;
            }
            let ihl = (f[ETH] & 0xf) as usize * 4;
            if ihl < 20 || f.len() < ETH + ihl {
                return;
            }
            f[ETH + 10] = 0;
            f[ETH + 11] = 0;
            let c = checksum(&f[ETH..ETH + ihl], 0);
            f[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
            let tot = be16(f, ETH + 2) as usize;
            if tot < ihl {
                return;
            }
            (
                ETH + ihl,
                ETH + tot,
                f[ETH + 9],
                ip4_at(f, ETH + 12),
                ip4_at(f, ETH + 16),
            )
        }
        0x86dd => {
            let Some((l4, nh)) = walk6(f) else { return };
            let end = ETH + 40 + be16(f, ETH + 4) as usize;
            (l4, end, nh, ip6_at(f, ETH + 8), ip6_at(f, ETH + 24))
        }
        _ => return,
    };
    if end > f.len() {
        return;
    }
    let off = match proto {
        TCP if end >= l4 + 20 => l4 + 16,
        UDP if end >= l4 + 8 => l4 + 6,
        _ => return,
    };
    f[off] = 0;
    f[off + 1] = 0;
    if proto == UDP && !udp_csum {
        return;
    }
    let mut c = checksum(&f[l4..end], pseudo(src, dst, proto, end - l4));
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    f[off..off + 2].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Frame;

    const CLIENT: ([u8; 4], u16) = ([198, 18, 100, 7], 40007);

    fn syn_to(svc: &Svc) -> Vec<u8> {
        Frame::tcp((IpAddr::from(CLIENT.0), CLIENT.1), (svc.vip, svc.port), SYN).build()
    }

    #[test]
    fn same_seed_same_frames() {
        let model = Model::new(services());
        let mut a = Generator::new(7);
        let mut b = Generator::new(7);
        for _ in 0..1000 {
            assert_eq!(a.frame(&model), b.frame(&model));
        }
    }

    #[test]
    fn model_tracks_a_flow_and_its_reply() {
        let mut m = Model::new(services());
        let svc = m.services[0].clone();
        let frame = syn_to(&svc);
        let Expect::Translate {
            dst: Some((addr, port)),
            src: None,
            reason,
        } = m.predict(Hook::Xdp, &frame)
        else {
            panic!("a SYN to a service is translated")
        };
        assert_eq!(reason, Reason::NatNewFlow);
        assert!(svc.backends.iter().any(|b| (b.ip(), b.host_port()) == (addr, port)));
        let again = Expect::Translate {
            dst: Some((addr, port)),
            src: None,
            reason: Reason::NatEstablished,
        };
        assert_eq!(m.predict(Hook::Tc, &frame), again);
        let reply = Frame::tcp((addr, port), (IpAddr::from(CLIENT.0), CLIENT.1), SYN | ACK).build();
        assert_eq!(
            m.predict(Hook::Xdp, &reply),
            Expect::Translate {
                dst: None,
                src: Some((svc.vip, svc.port)),
                reason: Reason::NatReply,
            }
        );
        assert_eq!(m.ct.len(), 2);
        assert_eq!(m.runs, 3);
    }

    /// A remote backend of a NodePort: the source becomes the node, on a
    /// port of the SNAT range; the reply goes back to the client.
    #[test]
    fn model_snats_remote_backends_and_reverses_both() {
        let mut m = Model::new(services());
        let svc = m.services[21].clone();
        assert_eq!(svc.vip, IpAddr::from(NODE6));
        let client = (IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 3)), 40003);
        let frame = Frame::udp(client, (svc.vip, svc.port), b"q").build();
        let Expect::Translate {
            dst: Some(be),
            src: Some((node, port)),
            ..
        } = m.predict(Hook::Tc, &frame)
        else {
            panic!("SNATed")
        };
        assert_eq!(node, IpAddr::from(NODE6));
        assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port));
        let reply = Frame::udp(be, (node, port), b"a").build();
        assert_eq!(
            m.predict(Hook::Xdp, &reply),
            Expect::Translate {
                dst: Some(client),
                src: Some((svc.vip, svc.port)),
                reason: Reason::NatReply,
            }
        );
    }

    /// One client port to two VIPs sharing the backend: the second flow
    /// moves to another source port.
    #[test]
    fn model_moves_a_clashing_flow_to_another_port() {
        let mut m = Model::new(services());
        let client = (IpAddr::from([198, 18, 100, 9]), 40009);
        let mut found = false;
        for port in 40000..40032 {
            let c = (client.0, port);
            let first = m.predict(Hook::Tc, &Frame::tcp(c, (VIPS[0], 80), SYN).build());
            if !matches!(
                first,
                Expect::Translate {
                    dst: Some((_, 8080)),
                    ..
                }
            ) {
                continue;
            }
            let Expect::Translate { dst: Some((a, _)), .. } = first else {
                unreachable!()
            };
            if a != b4(1) {
                continue;
            }
            let second = m.predict(Hook::Tc, &Frame::tcp(c, (VIPS[3], 80), SYN).build());
            let Expect::Translate {
                src: Some((same, moved)),
                ..
            } = second
            else {
                panic!("{second:?}")
            };
            assert_eq!(same, client.0);
            assert_ne!(moved, port);
            found = true;
            break;
        }
        assert!(found);
        assert_eq!(m.clashes, 1);
    }

    /// The checker is what makes the hostile test worth anything: it must
    /// refuse outputs a broken datapath would produce.
    #[test]
    fn check_refuses_wrong_outputs() {
        let mut m = Model::new(services());
        let frame = syn_to(&m.services[0]);
        let expect = m.predict(Hook::Xdp, &frame);
        let Expect::Translate {
            dst: Some((addr, port)),
            ..
        } = expect.clone()
        else {
            panic!()
        };
        let mut good = frame.clone();
        good[30..34].copy_from_slice(&octets(addr));
        good[36..38].copy_from_slice(&port.to_be_bytes());
        fix_checksums(&mut good, true);
        assert_eq!(check(Hook::Xdp, &frame, &expect, Ok((2, good.clone()))), Ok(()));

        // Port rewritten without updating the TCP checksum.
        let mut stale = good.clone();
        stale[50..52].copy_from_slice(&frame[50..52]);
        assert!(check(Hook::Xdp, &frame, &expect, Ok((2, stale))).is_err());
        // Another backend.
        let mut other = good.clone();
        other[33] ^= 1;
        fix_checksums(&mut other, true);
        assert!(check(Hook::Xdp, &frame, &expect, Ok((2, other))).is_err());
        // The source rewritten too.
        let mut snated = good.clone();
        snated[34..36].copy_from_slice(&20000u16.to_be_bytes());
        fix_checksums(&mut snated, true);
        assert!(check(Hook::Xdp, &frame, &expect, Ok((2, snated))).is_err());
        // Wrong verdict, changed payload length, untranslated.
        assert!(check(Hook::Xdp, &frame, &expect, Ok((1, good.clone()))).is_err());
        let mut longer = good.clone();
        longer.push(0);
        assert!(check(Hook::Xdp, &frame, &expect, Ok((2, longer))).is_err());
        assert!(check(Hook::Xdp, &frame, &expect, Ok((2, frame.clone()))).is_err());

        // A pass that modified one byte.
        let pass = Expect::Pass(Reason::PassNoService);
        let mut touched = frame.clone();
        touched[20] ^= 0x80;
        assert!(check(Hook::Tc, &frame, &pass, Ok((u32::MAX, touched))).is_err());
        assert_eq!(check(Hook::Tc, &frame, &pass, Ok((u32::MAX, frame.clone()))), Ok(()));
    }

    #[test]
    fn rejects_are_built_from_scratch() {
        let mut m = Model::new(services());
        let empty = m
            .services
            .iter()
            .find(|s| s.backends.is_empty() && s.proto == TCP)
            .unwrap()
            .clone();
        let Expect::Reject(rst) = m.predict(Hook::Tc, &syn_to(&empty)) else {
            panic!("a SYN to a service without endpoints is rejected")
        };
        let p = crate::packet::parse_and_verify(&rst);
        assert_eq!((p.src, p.sport), (empty.vip, empty.port));
        assert_eq!(crate::packet::tcp_fields(&rst), (RST | ACK, 0, 1001));
    }

    /// IPv6 rejects and generated frames verify with the shared packet
    /// module's checksums (etherparse), not only with the model's.
    #[test]
    fn ipv6_frames_and_rejects_verify() {
        let mut m = Model::new(services());
        let client = (IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 5)), 40005);
        let tcp = Frame::tcp(client, (IpAddr::from(VIPS6[1]), 80), SYN).build();
        let Expect::Reject(rst) = m.predict(Hook::Xdp, &tcp) else {
            panic!("rejected")
        };
        let p = crate::packet::parse_and_verify(&rst);
        assert_eq!((p.src, p.sport), (IpAddr::from(VIPS6[1]), 80));
        let udp = Frame::udp(client, (IpAddr::from(VIPS6[1]), 53), b"q").build();
        let Expect::Reject(icmp) = m.predict(Hook::Xdp, &udp) else {
            panic!("rejected")
        };
        crate::packet::parse_icmp(&icmp);
        let mut g = Generator::new(3);
        for _ in 0..200 {
            let s = Spec {
                src: client.0,
                dst: VIPS6[0].into(),
                sport: client.1,
                dport: 80,
                proto: TCP,
                flags: SYN,
            };
            let f = g.build(&s);
            // (Without Ethernet padding, which the parser refuses.)
            if l4_offset6(&f) == Some(ETH + 40) && f.len() == ETH + 40 + be16(&f, ETH + 4) as usize {
                crate::packet::parse_and_verify(&f);
            }
            if classify(&f).is_ok() {
                assert!(checksums_valid(&f), "{}", hex(&f));
            }
        }
    }
}
