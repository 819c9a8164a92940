//! Hostile packets: a seeded generator of malformed and random Ethernet
//! frames, and a reference model of what the datapath must do with each.
//!
//! The model is written from the datapath's specification (README, "How it
//! works"), not from its code: it parses frames its own way, keeps its own
//! conntrack table, picks backends with the userspace Maglev table and the
//! shared flow hash, and builds the expected rejects byte by byte. Every
//! outcome it predicts is checked exactly against the program's output.

use std::{collections::HashMap, fmt::Write as _, net::Ipv4Addr};

use dataplane::model::maglev;
use dataplane_common::{
    flow_hash, Backend, Reason, BACKEND_F_REMOTE, CT_F_CLOSING, CT_F_ORIGINAL, CT_F_REPLY, CT_F_SEEN_REPLY, CT_F_SNAT,
    SVC_F_DROP_NO_LOCAL, SVC_F_EXTERNAL, SVC_F_SOURCE_RANGES,
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

/// One Service frontend the maps hold during the run.
#[derive(Clone, Debug)]
pub struct Svc {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    /// In the order the datapath indexes them (sorted, as the agent writes).
    pub backends: Vec<Backend>,
    /// `maglev::table(backends, DEFAULT_SIZE)`, computed once.
    pub table: Vec<u16>,
    /// Bumped each time the backend set changes (the agent then writes a
    /// new generation with a new epoch).
    pub version: u64,
    /// An external frontend (NodePort): flows to its remote backends are
    /// SNATed to the node's address (`SNAT_ADDR`).
    pub external: bool,
    /// loadBalancerSourceRanges (address, prefix length): new flows from
    /// other sources are dropped. Empty: no ranges.
    pub source_ranges: Vec<([u8; 4], u8)>,
    /// externalTrafficPolicy Local without a local endpoint: new flows
    /// are dropped, not rejected.
    pub drop_no_local: bool,
    /// sessionAffinity ClientIP (a timeout far beyond the run): a
    /// client's new flows go to the backend its first flow went to.
    pub affinity: bool,
}

impl Svc {
    pub fn new(vip: Ipv4Addr, port: u16, proto: u8, backends: &[(Ipv4Addr, u16)]) -> Svc {
        let mut b: Vec<Backend> = backends.iter().map(|(a, p)| Backend::new(*a, *p)).collect();
        b.sort();
        let table = if b.is_empty() {
            Vec::new()
        } else {
            maglev::table(&b, maglev::DEFAULT_SIZE)
        };
        Svc {
            vip,
            port,
            proto,
            backends: b,
            table,
            version: 0,
            external: false,
            source_ranges: Vec::new(),
            drop_no_local: false,
            affinity: false,
        }
    }

    /// An external frontend (a NodePort on `SNAT_ADDR`) whose backends
    /// `remote` are on other nodes (`BACKEND_F_REMOTE`).
    pub fn external(port: u16, proto: u8, local: &[(Ipv4Addr, u16)], remote: &[(Ipv4Addr, u16)]) -> Svc {
        let mut b: Vec<Backend> = local.iter().map(|(a, p)| Backend::new(*a, *p)).collect();
        b.extend(remote.iter().map(|(a, p)| {
            let mut b = Backend::new(*a, *p);
            b.flags |= BACKEND_F_REMOTE;
            b
        }));
        b.sort();
        let table = if b.is_empty() {
            Vec::new()
        } else {
            maglev::table(&b, maglev::DEFAULT_SIZE)
        };
        Svc {
            vip: Ipv4Addr::from(SNAT_ADDR),
            port,
            proto,
            backends: b,
            table,
            version: 0,
            external: true,
            source_ranges: Vec::new(),
            drop_no_local: false,
            affinity: false,
        }
    }

    /// The `SVC_F_*` flags the agent writes for this frontend.
    pub fn flags(&self) -> u32 {
        let mut f = 0;
        if self.external {
            f |= SVC_F_EXTERNAL;
        }
        if !self.source_ranges.is_empty() {
            f |= SVC_F_SOURCE_RANGES;
        }
        if self.drop_no_local {
            f |= SVC_F_DROP_NO_LOCAL;
        }
        f
    }
}

/// Whether `a` lies in `prefix`/`len`.
fn in_prefix(a: [u8; 4], prefix: [u8; 4], len: u8) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
    u32::from_be_bytes(a) & mask == u32::from_be_bytes(prefix) & mask
}

/// The node's address: NodePorts are served on it and SNATed flows leave
/// from it.
pub const SNAT_ADDR: [u8; 4] = [198, 18, 50, 1];

/// SNAT source ports (the agent's default range without a node to read:
/// `dataplane_common::DEFAULT_SNAT_PORTS`), and how many candidates a
/// flow tries: the specification in docs/services.md ("SNAT port range").
pub const SNAT_PORTS: (u16, u16) = dataplane_common::DEFAULT_SNAT_PORTS;
pub const SNAT_TRIES: u32 = 8;

/// The Services of the hostile run: TCP and UDP, several backends, one
/// backend, and frontends without endpoints.
pub fn services() -> Vec<Svc> {
    let b = |i: u8| Ipv4Addr::new(198, 18, i, 2);
    vec![
        Svc::new(VIPS[0], 80, TCP, &[(b(1), 8080), (b(2), 8080), (b(3), 8081)]),
        Svc::new(VIPS[0], 53, UDP, &[(b(1), 5353), (b(2), 5353)]),
        Svc::new(
            VIPS[1],
            443,
            TCP,
            &[(b(4), 8443), (b(5), 8443), (b(6), 8443), (b(7), 8443), (b(8), 8443)],
        ),
        Svc::new(VIPS[1], 443, UDP, &[(b(9), 4433)]),
        Svc::new(VIPS[2], 80, TCP, &[]),
        Svc::new(VIPS[2], 53, UDP, &[]),
        // The first frontend's backends behind another VIP: one client port
        // to both can land on one backend, whose reply tuple is then taken.
        Svc::new(VIPS[2], 8080, TCP, &[(b(1), 8080), (b(2), 8080), (b(3), 8081)]),
        // A NodePort with a local and two remote backends (SNATed), and a
        // UDP one with a remote backend only.
        Svc::external(30080, TCP, &[(b(12), 8080)], &[(b(13), 8080), (b(14), 8080)]),
        Svc::external(30053, UDP, &[], &[(b(15), 5353)]),
        // A load balancer IP that admits half the client pool.
        Svc {
            vip: LB_IP,
            source_ranges: vec![([198, 18, 100, 0], 27)],
            ..Svc::external(443, TCP, &[(b(16), 8443), (b(17), 8443)], &[])
        },
        // sessionAffinity ClientIP.
        Svc {
            affinity: true,
            ..Svc::new(VIPS[1], 8443, TCP, &[(b(18), 8443), (b(19), 8443), (b(20), 8443)])
        },
        // externalTrafficPolicy Local, no endpoint on this node.
        Svc {
            drop_no_local: true,
            ..Svc::external(30443, TCP, &[], &[])
        },
    ]
}

/// The load balancer IP of the frontend with source ranges.
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 1);

pub const VIPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 19, 0, 10),
    Ipv4Addr::new(198, 19, 0, 11),
    Ipv4Addr::new(198, 19, 0, 12),
];

/// A 5-tuple as written in the packet (host-order ports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// A conntrack entry of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    pub nat_addr: [u8; 4],
    pub nat_port: u16,
    pub flags: u16,
    /// The service's `version` when the flow was created.
    pub version: u64,
    /// SNAT: original entry, the node's address and port the source
    /// becomes; reply entry, the client the destination goes back to.
    pub snat: Option<([u8; 4], u16)>,
}

/// Which address/port pair a translation rewrites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Dst,
    Src,
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
    /// One side rewritten to `addr:port`, checksums kept consistent, this
    /// reason counted; nothing else changes.
    Translate {
        side: Side,
        addr: [u8; 4],
        port: u16,
        reason: Reason,
    },
    /// Answered with exactly these bytes, sent back out (XDP_TX / redirect).
    Reject(Vec<u8>),
    /// Both ends rewritten (SNAT and DNAT, or their reverse), checksums
    /// kept consistent, this reason counted.
    TranslateBoth {
        dst: ([u8; 4], u16),
        src: ([u8; 4], u16),
        reason: Reason,
    },
}

impl Expect {
    /// The reason counter the frame increments (none when refused).
    pub fn reason(&self) -> Option<Reason> {
        match self {
            Expect::Refused => None,
            Expect::Pass(r)
            | Expect::Drop(r)
            | Expect::Translate { reason: r, .. }
            | Expect::TranslateBoth { reason: r, .. } => Some(*r),
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

/// A frame the model understands as IPv4 TCP/UDP for the datapath.
#[derive(Clone, Copy, Debug)]
struct L4 {
    ihl: usize,
    tot_len: usize,
    l4: usize,
    tuple: Tuple,
    flags: u8,
}

const ETH: usize = 14;

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn addr(b: &[u8], off: usize) -> [u8; 4] {
    [b[off], b[off + 1], b[off + 2], b[off + 3]]
}

/// The datapath's input contract: only unfragmented IPv4 TCP/UDP with
/// complete IPv4 and L4 headers, claimed by the total length, is processed;
/// everything else passes with the reason that says why.
fn classify(f: &[u8]) -> Result<L4, Reason> {
    if f.len() >= ETH && be16(f, 12) == 0x86dd {
        return Err(classify6(f));
    }
    if f.len() < ETH || be16(f, 12) != 0x0800 {
        return Err(Reason::PassNotIp);
    }
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
        ihl,
        tot_len,
        l4,
        tuple: Tuple {
            saddr: addr(f, ETH + 12),
            daddr: addr(f, ETH + 16),
            sport: be16(f, l4),
            dport: be16(f, l4 + 2),
            proto,
        },
        flags: if proto == TCP { f[l4 + 13] } else { 0 },
    })
}

/// The reference model: the Services and a conntrack table of its own.
pub struct Model {
    pub services: Vec<Svc>,
    pub ct: HashMap<Tuple, CtEntry>,
    /// Originals created so far (client tuples), for replies and follow-ups.
    pub flows: Vec<Tuple>,
    /// What each reason counter must read.
    pub counts: HashMap<Reason, u64>,
    /// Frames the programs actually ran.
    pub runs: u64,
    /// New flows moved to another source port because their reply tuple
    /// belonged to another live flow (`CtEvent::ClashResolved`).
    pub clashes: u64,
    /// Session affinity: (client address, frontend) -> the backend its
    /// new flows go to.
    pub affinity: HashMap<([u8; 4], [u8; 4], u16, u8), Backend>,
}

impl Model {
    pub fn new(services: Vec<Svc>) -> Model {
        Model {
            services,
            ct: HashMap::new(),
            flows: Vec::new(),
            counts: HashMap::new(),
            runs: 0,
            clashes: 0,
            affinity: HashMap::new(),
        }
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
        let gone: Vec<([u8; 4], u16)> = old
            .backends
            .iter()
            .filter(|b| !new.backends.iter().any(|n| n.addr == b.addr && n.port == b.port))
            .map(|b| (v4_octets(b.ip()), b.host_port()))
            .collect();
        let (vip, port) = (old.vip.octets(), old.port);
        let is_gone = |a: [u8; 4], p: u16| gone.contains(&(a, p));
        self.ct.retain(|t, e| {
            let original =
                e.flags & CT_F_ORIGINAL != 0 && t.daddr == vip && t.dport == port && is_gone(e.nat_addr, e.nat_port);
            !(t.proto == UDP && original)
        });
        let ct = &self.ct;
        self.flows.retain(|f| ct.contains_key(f));
    }

    fn service(&self, t: &Tuple) -> Option<&Svc> {
        self.services
            .iter()
            .find(|s| s.vip.octets() == t.daddr && s.port == t.dport && s.proto == t.proto)
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
        let closes = p.tuple.proto == TCP && p.flags & (FIN | RST) != 0;
        let starts = p.tuple.proto == TCP && p.flags & (SYN | ACK) == SYN;
        let Some(svc) = self.service(&p.tuple).cloned() else {
            return self.reply(&p, closes);
        };
        if let Some(e) = self.ct.get_mut(&p.tuple) {
            if closes {
                e.flags |= CT_F_CLOSING;
            }
            // Port reuse after a close starts a new flow, and so does a SYN
            // on an entry made under another backend set; anything else
            // follows the entry.
            let stale = e.flags & CT_F_CLOSING != 0 || e.version != svc.version;
            if !(starts && stale) {
                let (addr, port, snat) = (e.nat_addr, e.nat_port, e.snat);
                // A FIN or RST closes the flow's reply entry too (keyed
                // by the node's address and port when SNATed).
                if closes {
                    let (client, cport) = snat.unwrap_or((p.tuple.saddr, p.tuple.sport));
                    let reply_key = Tuple {
                        saddr: addr,
                        daddr: client,
                        sport: port,
                        dport: cport,
                        proto: p.tuple.proto,
                    };
                    if let Some(r) = self.ct.get_mut(&reply_key) {
                        r.flags |= CT_F_CLOSING;
                    }
                }
                if let Some(src) = snat {
                    return Expect::TranslateBoth {
                        dst: (addr, port),
                        src,
                        reason: Reason::NatEstablished,
                    };
                }
                return Expect::Translate {
                    side: Side::Dst,
                    addr,
                    port,
                    reason: Reason::NatEstablished,
                };
            }
        }
        // New flows only (an established flow passed above): a source
        // outside the load balancer's ranges is dropped.
        if !svc.source_ranges.is_empty()
            && !svc
                .source_ranges
                .iter()
                .any(|(a, len)| in_prefix(p.tuple.saddr, *a, *len))
        {
            return Expect::Drop(Reason::DropSourceRange);
        }
        if svc.backends.is_empty() {
            if svc.drop_no_local {
                return Expect::Drop(Reason::DropNoLocalBackend);
            }
            return reject(f, &p);
        }
        let t = &p.tuple;
        let h = flow_hash(
            u32::from_ne_bytes(t.saddr),
            u32::from_ne_bytes(t.daddr),
            t.sport.to_be(),
            t.dport.to_be(),
            t.proto,
        );
        let mut b = svc.backends[svc.table[(h % maglev::DEFAULT_SIZE) as usize] as usize];
        if svc.affinity {
            // The first flow's backend, remembered for the client.
            let key = (t.saddr, t.daddr, t.dport, t.proto);
            b = *self.affinity.entry(key).or_insert(b);
        }
        let (baddr, bport) = (v4_octets(b.ip()), b.host_port());
        // SNAT: a remote backend of an external frontend, or a backend
        // reaching itself (hairpin).
        let snat = if (svc.external && b.flags & BACKEND_F_REMOTE != 0) || t.saddr == baddr {
            match self.snat_port(h, baddr, bport, t.proto) {
                Some(port) => Some((SNAT_ADDR, port)),
                None => return Expect::Drop(Reason::DropSnatFailed),
            }
        } else {
            None
        };
        let mut snat = snat;
        let (client, cport) = snat.unwrap_or((t.saddr, t.sport));
        let mut reply_key = Tuple {
            saddr: baddr,
            daddr: client,
            sport: bport,
            dport: cport,
            proto: t.proto,
        };
        // The reply entry of another live flow is never written over (see
        // docs/services.md, "Reply-tuple clashes"): the new flow gets
        // another source port, on its own address (or the node's when
        // SNATed), by the SNAT candidate rule. An entry of the same flow
        // (same frontend and client) or of a closed one may be replaced.
        let new_snat = snat.map(|_| (t.saddr, t.sport));
        if let Some(old) = self.ct.get(&reply_key) {
            let same = (old.nat_addr, old.nat_port) == (t.daddr, t.dport) && old.snat == new_snat;
            if old.flags & CT_F_CLOSING == 0 && !same {
                let addr = snat.map_or(t.saddr, |(a, _)| a);
                let Some(port) = self.free_port(h, baddr, bport, addr, t.proto) else {
                    return Expect::Drop(Reason::DropSnatFailed);
                };
                self.clashes += 1;
                snat = Some((addr, port));
                reply_key.daddr = addr;
                reply_key.dport = port;
            }
        }
        self.ct.insert(
            reply_key,
            CtEntry {
                nat_addr: t.daddr,
                nat_port: t.dport,
                flags: CT_F_REPLY | if snat.is_some() { CT_F_SNAT } else { 0 },
                version: svc.version,
                snat: snat.map(|_| (t.saddr, t.sport)),
            },
        );
        if self
            .ct
            .insert(
                *t,
                CtEntry {
                    nat_addr: baddr,
                    nat_port: bport,
                    flags: CT_F_ORIGINAL | if snat.is_some() { CT_F_SNAT } else { 0 },
                    version: svc.version,
                    snat,
                },
            )
            .is_none()
        {
            self.flows.push(*t);
        }
        if let Some(src) = snat {
            return Expect::TranslateBoth {
                dst: (baddr, bport),
                src,
                reason: Reason::NatNewFlow,
            };
        }
        Expect::Translate {
            side: Side::Dst,
            addr: baddr,
            port: bport,
            reason: Reason::NatNewFlow,
        }
    }

    /// Not addressed to a frontend: a reply of a tracked flow gets the VIP
    /// back; the original entry learns that a reply was seen / the flow closes.
    fn reply(&mut self, p: &L4, closes: bool) -> Expect {
        let Some(e) = self.ct.get_mut(&p.tuple) else {
            return self.pass_no_service(p);
        };
        if closes {
            e.flags |= CT_F_CLOSING;
        }
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
        let (vip, vport, snat) = (e.nat_addr, e.nat_port, e.snat);
        let (client, cport) = snat.unwrap_or((p.tuple.daddr, p.tuple.dport));
        let original = Tuple {
            saddr: client,
            daddr: vip,
            sport: cport,
            dport: vport,
            proto: p.tuple.proto,
        };
        if let Some(o) = self.ct.get_mut(&original) {
            o.flags |= learn;
        }
        if let Some(dst) = snat {
            return Expect::TranslateBoth {
                dst,
                src: (vip, vport),
                reason: Reason::NatReply,
            };
        }
        Expect::Translate {
            side: Side::Src,
            addr: vip,
            port: vport,
            reason: Reason::NatReply,
        }
    }
}

impl Model {
    /// The SNAT source port of a new flow whose tuple hashes to `h`
    /// (`flow_hash`, as for Maglev), as docs/services.md specifies: of the
    /// candidates `first + (h + i * 0x9e3779b1) mod span` (i = 0..8, u32
    /// arithmetic), the first whose reply tuple (backend -> node:port) has
    /// no conntrack entry.
    fn snat_port(&self, h: u32, baddr: [u8; 4], bport: u16, proto: u8) -> Option<u16> {
        self.free_port(h, baddr, bport, SNAT_ADDR, proto)
    }

    /// The SNAT candidate rule for source address `addr`: the first
    /// candidate port whose reply tuple (backend -> addr:port) has no
    /// entry of an open flow (none, or one of a closed flow).
    fn free_port(&self, h: u32, baddr: [u8; 4], bport: u16, addr: [u8; 4], proto: u8) -> Option<u16> {
        let (first, last) = (u32::from(SNAT_PORTS.0), u32::from(SNAT_PORTS.1));
        let span = last - first + 1;
        (0..SNAT_TRIES)
            .map(|i| (first + h.wrapping_add(i.wrapping_mul(0x9e37_79b1)) % span) as u16)
            .find(|port| {
                let key = Tuple {
                    saddr: baddr,
                    daddr: addr,
                    sport: bport,
                    dport: *port,
                    proto,
                };
                self.ct.get(&key).is_none_or(|e| e.flags & CT_F_CLOSING != 0)
            })
    }

    /// Passing untouched; a TCP SYN whose reversed tuple is the reply entry
    /// of a closing flow removes that flow's entries (its tuple is taken).
    fn pass_no_service(&mut self, p: &L4) -> Expect {
        let t = &p.tuple;
        if t.proto == TCP && p.flags & (SYN | ACK) == SYN {
            let reversed = Tuple {
                saddr: t.daddr,
                daddr: t.saddr,
                sport: t.dport,
                dport: t.sport,
                proto: t.proto,
            };
            let both = CT_F_REPLY | CT_F_CLOSING;
            if let Some(e) = self.ct.get(&reversed).filter(|e| e.flags & both == both) {
                let original = Tuple {
                    saddr: t.saddr,
                    daddr: e.nat_addr,
                    sport: t.sport,
                    dport: e.nat_port,
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

/// IPv6: the model has no IPv6 Service and no IPv6 flow, so every IPv6
/// frame passes untouched; this is the reason the datapath gives (its
/// extension-header walk: hop-by-hop, destination options and routing
/// headers without segments left are skipped, at most 4; a fragment header
/// passes; anything else that is not TCP/UDP passes).
fn classify6(f: &[u8]) -> Reason {
    if f.len() < ETH + 40 || f[ETH] >> 4 != 6 {
        return Reason::PassTruncated;
    }
    let payload_len = be16(f, ETH + 4) as usize;
    let (mut nh, mut off) = (f[ETH + 6], ETH + 40);
    for _ in 0..4 {
        match nh {
            TCP | UDP => break,
            44 => return Reason::PassFragment,
            0 | 43 | 60 => {
                if f.len() < off + 4 {
                    return Reason::PassTruncated;
                }
                if nh == 43 && f[off + 3] != 0 {
                    return Reason::PassExtHeaders;
                }
                nh = f[off];
                off += (f[off + 1] as usize + 1) * 8;
            }
            _ => return Reason::PassNotTcpUdp,
        }
    }
    if nh != TCP && nh != UDP {
        return Reason::PassExtHeaders;
    }
    let min_l4 = if nh == TCP { 20 } else { 8 };
    if 40 + payload_len < off - ETH + min_l4 || f.len() < off + min_l4 {
        return Reason::PassTruncated;
    }
    Reason::PassNoService
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
/// VIP (never for a RST), or an ICMP port unreachable quoting the IPv4
/// header and 8 bytes (only for headers without options).
fn reject(f: &[u8], p: &L4) -> Expect {
    let t = &p.tuple;
    let mut out = Vec::with_capacity(70);
    out.extend_from_slice(&f[6..12]);
    out.extend_from_slice(&f[0..6]);
    out.extend_from_slice(&[0x08, 0x00]);
    let ip = |proto: u8, tot: u16| -> Vec<u8> {
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&tot.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
        h.extend_from_slice(&t.daddr);
        h.extend_from_slice(&t.saddr);
        let c = checksum(&h, 0);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    };
    if t.proto == TCP {
        if p.flags & RST != 0 {
            return Expect::Drop(Reason::DropNoBackend);
        }
        let l4 = &f[p.l4..];
        let seq = u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]);
        let ack = u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]);
        let doff = (l4[12] >> 4) as usize * 4;
        let seg =
            p.tot_len.saturating_sub(p.ihl + doff) as u32 + (p.flags & SYN != 0) as u32 + (p.flags & FIN != 0) as u32;
        let (rseq, rack, rflags) = if p.flags & ACK != 0 {
            (ack, 0, RST)
        } else {
            (0, seq.wrapping_add(seg), RST | ACK)
        };
        out.extend_from_slice(&ip(TCP, 40));
        let mut tcp = Vec::with_capacity(20);
        tcp.extend_from_slice(&t.dport.to_be_bytes());
        tcp.extend_from_slice(&t.sport.to_be_bytes());
        tcp.extend_from_slice(&rseq.to_be_bytes());
        tcp.extend_from_slice(&rack.to_be_bytes());
        tcp.extend_from_slice(&[0x50, rflags, 0, 0, 0, 0, 0, 0]);
        let c = checksum(&tcp, pseudo(t.daddr, t.saddr, TCP, 20));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&tcp);
    } else {
        if p.ihl != 20 {
            return Expect::Drop(Reason::DropNoBackend);
        }
        out.extend_from_slice(&ip(1, 56));
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&f[ETH..ETH + 28]);
        let c = checksum(&icmp, 0);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&icmp);
    }
    Expect::Reject(out)
}

fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    be16(&src, 0) as u32
        + be16(&src, 2) as u32
        + be16(&dst, 0) as u32
        + be16(&dst, 2) as u32
        + proto as u32
        + len as u32
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

/// The checksum sums a translation must preserve: the IPv4 header's, and
/// the L4 segment's with its pseudo-header (over the bytes present, up to
/// the total length). A rewrite with a correct incremental update keeps
/// both: a valid checksum stays valid, a broken one stays exactly as broken.
fn residuals(f: &[u8]) -> (u16, u16) {
    let p = classify(f).expect("a translated frame parses");
    let ip = residual(&f[ETH..ETH + p.ihl], 0);
    let end = (ETH + p.tot_len).min(f.len());
    let l4 = residual(
        &f[p.l4..end],
        pseudo(p.tuple.saddr, p.tuple.daddr, p.tuple.proto, p.tot_len - p.ihl),
    );
    (ip, l4)
}

/// Whether the IPv4 header and L4 checksums of `f` verify from scratch (a
/// zero UDP checksum counts as valid: none was sent).
pub fn checksums_valid(f: &[u8]) -> bool {
    let Ok(p) = classify(f) else { return false };
    if p.tot_len + ETH > f.len() {
        return false;
    }
    let udp_none = p.tuple.proto == UDP && be16(f, p.l4 + 6) == 0;
    residuals(f) == (0, 0) || (udp_none && residual(&f[ETH..ETH + p.ihl], 0) == 0)
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
        Expect::Translate { side, addr, port, .. } => {
            if retval != pass {
                return Err(format!("verdict {retval}, expected pass ({pass}) after translation"));
            }
            return check_translation(input, &out, &[(*side, *addr, *port)]);
        }
        Expect::TranslateBoth { dst, src, .. } => {
            if retval != pass {
                return Err(format!("verdict {retval}, expected pass ({pass}) after translation"));
            }
            return check_translation(input, &out, &[(Side::Dst, dst.0, dst.1), (Side::Src, src.0, src.1)]);
        }
    }
    Ok(())
}

fn check_translation(input: &[u8], out: &[u8], rewrites: &[(Side, [u8; 4], u16)]) -> Result<(), String> {
    let p = classify(input).expect("translated frames parse");
    let csum_off = p.l4 + if p.tuple.proto == TCP { 16 } else { 6 };
    let mut want = input.to_vec();
    for (side, a, port) in rewrites {
        let (addr_off, port_off) = match side {
            Side::Dst => (ETH + 16, p.l4 + 2),
            Side::Src => (ETH + 12, p.l4),
        };
        want[addr_off..addr_off + 4].copy_from_slice(a);
        want[port_off..port_off + 2].copy_from_slice(&port.to_be_bytes());
    }
    if out.len() != want.len() {
        return Err(format!("length {} instead of {}", out.len(), want.len()));
    }
    // Everything but the two checksum fields is exact.
    let mut masked_out = out.to_vec();
    for off in [ETH + 10, csum_off] {
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
        if residual(&out[ETH..ETH + p.ihl], 0) != residual(&input[ETH..ETH + p.ihl], 0) {
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

/// Clients come from a small pool so that the number of distinct flows
/// (two conntrack entries each) stays far below the conntrack map size:
/// LRU eviction never interferes with the model.
pub const CLIENT_NET: [u8; 3] = [198, 18, 100];
pub const CLIENT_HOSTS: u8 = 64;
pub const CLIENT_PORTS: u16 = 64;
pub const CLIENT_PORT_BASE: u16 = 40000;

/// What the generator built, for statistics and error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    ToService,
    /// From one of a frontend's backends to the frontend (hairpin: when
    /// the flow lands on the sender itself, its source is SNATed).
    Hairpin,
    Established,
    Reply,
    /// From a tracked flow's client and port straight to its backend (a
    /// connection that does not go through the VIP, reusing the port).
    DirectToBackend,
    NoServicePort,
    Random5Tuple,
    Arp,
    Vlan,
    Ipv6,
    IcmpError,
    OtherProto,
    Garbage,
}

/// A frame under construction: IPv4 + TCP/UDP, built valid, then perhaps
/// broken.
struct Spec {
    src: [u8; 4],
    dst: [u8; 4],
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

    fn client(&mut self) -> ([u8; 4], u16) {
        let h = 1 + self.rng.below(CLIENT_HOSTS as usize) as u8;
        let p = CLIENT_PORT_BASE + self.rng.below(CLIENT_PORTS as usize) as u16;
        ([CLIENT_NET[0], CLIENT_NET[1], CLIENT_NET[2], h], p)
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

    /// A valid IPv4 frame for `s`, with random options, TCP options and
    /// payload, and correct checksums (a zero UDP checksum sometimes).
    fn build(&mut self, s: &Spec) -> Vec<u8> {
        let mut f = self.eth(0x0800);
        let opt_words = if self.rng.chance(15) { 1 + self.rng.below(10) } else { 0 };
        let ihl = 20 + opt_words * 4;
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
        let mut ip = vec![0x40 | (ihl / 4) as u8, self.rng.u8()];
        ip.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&self.rng.u16().to_be_bytes());
        ip.extend_from_slice(&(if self.rng.chance(50) { 0x4000u16 } else { 0 }).to_be_bytes());
        ip.push(1 + self.rng.u8() / 2);
        ip.push(s.proto);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&s.src);
        ip.extend_from_slice(&s.dst);
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
        let zero_udp = s.proto == UDP && self.rng.chance(10);
        fix_checksums(&mut f, !zero_udp);
        if self.rng.chance(10) {
            // Ethernet padding after the IPv4 packet.
            let n = 1 + self.rng.below(40);
            let pad = self.rng.bytes(n);
            f.extend(pad);
        }
        f
    }

    /// Breaks a valid frame in one or more of the ways a hostile network
    /// does; recomputes the checksums afterwards or not.
    fn mutate(&mut self, mut f: Vec<u8>) -> Vec<u8> {
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
                8 if !f.is_empty() => {
                    for _ in 0..1 + self.rng.below(3) {
                        let i = self.rng.below(f.len());
                        f[i] ^= 1 << self.rng.below(8);
                    }
                }
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

    /// The next frame, built against what the model knows (flows for
    /// replies and follow-ups).
    pub fn frame(&mut self, model: &Model) -> (Kind, Vec<u8>) {
        let kind = match self.rng.below(100) {
            0..=26 => Kind::ToService,
            27..=29 => Kind::Hairpin,
            30..=44 => Kind::Established,
            45..=59 => Kind::Reply,
            60..=64 => Kind::NoServicePort,
            65..=68 => Kind::DirectToBackend,
            69..=72 => Kind::Random5Tuple,
            73..=75 => Kind::Arp,
            76..=79 => Kind::Vlan,
            80..=84 => Kind::Ipv6,
            85..=88 => Kind::IcmpError,
            89..=91 => Kind::OtherProto,
            _ => Kind::Garbage,
        };
        let kind = if model.flows.is_empty() && matches!(kind, Kind::Established | Kind::Reply | Kind::DirectToBackend)
        {
            Kind::ToService
        } else {
            kind
        };
        let f = match kind {
            Kind::ToService => {
                let svc = self.rng.pick(&model.services).clone();
                let (c, cp) = self.client();
                let flags = if svc.proto == TCP { self.tcp_flags() } else { 0 };
                let s = Spec {
                    src: c,
                    dst: svc.vip.octets(),
                    sport: cp,
                    dport: svc.port,
                    proto: svc.proto,
                    flags,
                };
                self.valid_or_broken(&s)
            }
            Kind::Hairpin => {
                let with_backends: Vec<&Svc> = model.services.iter().filter(|s| !s.backends.is_empty()).collect();
                let svc = (*self.rng.pick(&with_backends)).clone();
                let src = v4_octets(self.rng.pick(&svc.backends).ip());
                let (_, cp) = self.client();
                let flags = if svc.proto == TCP { self.tcp_flags() } else { 0 };
                let s = Spec {
                    src,
                    dst: svc.vip.octets(),
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
                let (dst, dport) = e.snat.unwrap_or((t.saddr, t.sport));
                let s = Spec {
                    src: e.nat_addr,
                    dst,
                    sport: e.nat_port,
                    dport,
                    proto: t.proto,
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
                    dst: e.nat_addr,
                    sport: t.sport,
                    dport: e.nat_port,
                    proto: t.proto,
                    flags,
                };
                self.valid_or_broken(&s)
            }
            Kind::NoServicePort => {
                let vip = *self.rng.pick(&VIPS);
                let (c, cp) = self.client();
                let proto = if self.rng.chance(50) { TCP } else { UDP };
                let port = *self.rng.pick(&[80, 53, 443, 81, 8080, 0, 65535]);
                let s = Spec {
                    src: c,
                    dst: vip.octets(),
                    sport: cp,
                    dport: port,
                    proto,
                    flags: SYN,
                };
                self.valid_or_broken(&s)
            }
            Kind::Random5Tuple => {
                let mut dst = self.rng.u32().to_be_bytes();
                if self.rng.chance(30) {
                    dst = [198, 18, self.rng.u8(), 2];
                }
                let proto = if self.rng.chance(50) { TCP } else { UDP };
                let flags = self.tcp_flags();
                let s = Spec {
                    src: self.rng.u32().to_be_bytes(),
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
                let (c, cp) = self.client();
                let inner = self.build(&Spec {
                    src: c,
                    dst: svc.vip.octets(),
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
                let (c, cp) = self.client();
                let mut f = self.build(&Spec {
                    src: c,
                    dst: svc.vip.octets(),
                    sport: cp,
                    dport: svc.port,
                    proto: TCP,
                    flags: SYN,
                });
                f[ETH + 9] = *self.rng.pick(&[1, 2, 4, 41, 47, 50, 132, 136, 255]);
                fix_checksums(&mut f, true);
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

    /// IPv6 with a chain of extension headers (hop-by-hop, routing,
    /// fragment, destination options) before TCP/UDP towards
    /// 2001:db8::/32, where the model has no Service: it passes untouched
    /// (see `classify6` for the reason counted).
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

    /// ICMP errors (unreachable, time exceeded) quoting garbage, or a
    /// tracked flow's headers, towards a client or a VIP.
    fn icmp_error(&mut self, model: &Model) -> Vec<u8> {
        let (c, _) = self.client();
        let dst = if self.rng.chance(50) {
            c
        } else {
            self.rng.pick(&VIPS).octets()
        };
        let mut quoted = if !model.flows.is_empty() && self.rng.chance(50) {
            let t = *self.rng.pick(&model.flows);
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
        ip.extend_from_slice(&dst);
        let c3 = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c3.to_be_bytes());
        f.extend(ip);
        f.extend(icmp);
        f
    }
}

/// Recomputes the IPv4 header checksum and, when the headers allow it, the
/// TCP/UDP checksum over what the total length claims (UDP: left zero when
/// `udp_csum` is false).
pub fn fix_checksums(f: &mut [u8], udp_csum: bool) {
    if f.len() < ETH + 20 || be16(f, 12) != 0x0800 {
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
    let proto = f[ETH + 9];
    let l4 = ETH + ihl;
    let end = ETH + tot;
    if tot < ihl || end > f.len() {
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
    let mut c = checksum(
        &f[l4..end],
        pseudo(addr(f, ETH + 12), addr(f, ETH + 16), proto, end - l4),
    );
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    f[off..off + 2].copy_from_slice(&c.to_be_bytes());
}

/// The model covers IPv4: the octets of an IPv4 address.
fn v4_octets(ip: std::net::IpAddr) -> [u8; 4] {
    match ip {
        std::net::IpAddr::V4(a) => a.octets(),
        std::net::IpAddr::V6(a) => panic!("the hostile model is IPv4-only, got {a}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Frame;

    const CLIENT: ([u8; 4], u16) = ([198, 18, 100, 7], 40007);

    fn syn_to(svc: &Svc) -> Vec<u8> {
        Frame::tcp((Ipv4Addr::from(CLIENT.0), CLIENT.1), (svc.vip, svc.port), SYN).build()
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
        let Expect::Translate { addr, port, reason, .. } = m.predict(Hook::Xdp, &frame) else {
            panic!("a SYN to a service is translated")
        };
        assert_eq!(reason, Reason::NatNewFlow);
        assert!(svc
            .backends
            .iter()
            .any(|b| (v4_octets(b.ip()), b.host_port()) == (addr, port)));
        let again = Expect::Translate {
            side: Side::Dst,
            addr,
            port,
            reason: Reason::NatEstablished,
        };
        assert_eq!(m.predict(Hook::Tc, &frame), again);
        let reply = Frame::tcp(
            (Ipv4Addr::from(addr), port),
            (Ipv4Addr::from(CLIENT.0), CLIENT.1),
            SYN | ACK,
        )
        .build();
        assert_eq!(
            m.predict(Hook::Xdp, &reply),
            Expect::Translate {
                side: Side::Src,
                addr: svc.vip.octets(),
                port: svc.port,
                reason: Reason::NatReply,
            }
        );
        assert_eq!(m.ct.len(), 2);
        assert_eq!(m.runs, 3);
    }

    /// The checker is what makes the hostile test worth anything: it must
    /// refuse outputs a broken datapath would produce.
    #[test]
    fn check_refuses_wrong_outputs() {
        let mut m = Model::new(services());
        let frame = syn_to(&m.services[0]);
        let expect = m.predict(Hook::Xdp, &frame);
        let Expect::Translate { addr, port, .. } = expect.clone() else {
            panic!()
        };
        let mut good = frame.clone();
        good[30..34].copy_from_slice(&addr);
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
        assert_eq!((p.src, p.sport), (empty.vip.into(), empty.port));
        assert_eq!(crate::packet::tcp_fields(&rst), (RST | ACK, 0, 1001));
    }
}
