//! `dataplane trace`: runs one synthetic packet through the program with
//! BPF_PROG_TEST_RUN and explains what the datapath decided, without
//! touching the live state.
//!
//! The live maps are only read. A private, unpinned copy of the object is
//! loaded, and exactly the live entries this packet can look at are copied
//! into its maps (the service entry, its current generation's backend slots
//! and Maglev chunks, its source ranges and name, the conntrack entries of
//! the tuple and of its other direction, the affinity entry of (source,
//! service), the configuration). The packet runs there; every conntrack,
//! affinity or counter write lands in the copy, which is dropped after.

use std::{net::SocketAddr, path::Path};

use aya::maps::lpm_trie::Key;
use dataplane_common::{
    addr_of, flow_hash, fold_addr, limits, map_names, program_names, AffinityKey, BackendKey, CtKey, CtValue,
    MaglevKey, Reason, ServiceKey, SourceRangeKey, CLUSTER_CIDRS_V4, CLUSTER_CIDRS_V6, CT_F_CLOSING, CT_F_ORIGINAL,
    CT_F_SNAT, IPPROTO_TCP, SOURCE_RANGE_FULL_PREFIX, SVC_F_AFFINITY, SVC_F_IN_CLUSTER_VIEW, SVC_F_RANDOM,
};
use serde::Serialize;

use crate::{
    bpf::{
        loader::{Dataplane, Globals, Maps},
        map_sizes::MapSizes,
        testrun,
    },
    cli::tables::Table,
    inspect::{self, conntrack_row, endpoint, frontend, monotonic_ns, ConntrackRow},
    model::proto_name,
    packet::{self, Frame, ACK, FIN, PSH, RST, SYN},
};

/// Which program the packet runs through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceProgram {
    /// The TC ingress program (pod and host interfaces).
    #[default]
    Tc,
    /// The XDP program (external interfaces).
    Xdp,
}

/// What to trace.
#[derive(Clone, Debug)]
pub struct TraceRequest {
    /// Source and destination, of one family.
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
    /// TCP flags (`packet::SYN | packet::ACK`, ...); ignored for UDP.
    pub tcp_flags: u8,
    pub program: TraceProgram,
}

/// Parses `syn`, `syn,ack`, `ack|psh`, ... into TCP flag bits.
pub fn parse_tcp_flags(s: &str) -> Result<u8, String> {
    s.split([',', '|', '+'])
        .filter(|f| !f.is_empty())
        .try_fold(0u8, |acc, f| {
            let bit = match f.trim().to_ascii_lowercase().as_str() {
                "fin" => FIN,
                "syn" => SYN,
                "rst" => RST,
                "psh" => PSH,
                "ack" => ACK,
                "none" => 0,
                other => return Err(format!("unknown TCP flag {other:?} (fin, syn, rst, psh, ack)")),
            };
            Ok(acc | bit)
        })
}

/// The service a traced packet was addressed to.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TracedService {
    pub id: u32,
    pub name: String,
    pub frontend: String,
    pub backends: u16,
    pub generation: u16,
}

/// The Maglev step of a new flow, computed as the datapath does.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MaglevStep {
    pub hash: u32,
    pub table_size: u32,
    /// `hash % table_size`.
    pub position: u32,
    /// The backend slot index the table holds at that position.
    pub slot: u32,
    /// The backend in that slot.
    pub backend: String,
}

/// Everything `trace` found out.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TraceReport {
    pub program: TraceProgram,
    /// The input, e.g. `tcp 198.18.100.2:41000 -> 198.19.0.10:80 flags syn`.
    pub packet: String,
    /// The frontend the destination matched, if any.
    pub service: Option<TracedService>,
    /// `hit`, `miss`, `expired`, `closed` (a SYN on a closed flow's tuple
    /// starts a new one).
    pub conntrack: String,
    /// The live entry of the tuple, if any.
    pub conntrack_entry: Option<ConntrackRow>,
    /// With session affinity: `hit` or `miss` (`expired` when too old).
    pub affinity: Option<String>,
    /// The backend the affinity entry remembers.
    pub affinity_backend: Option<String>,
    /// The Maglev lookup a new flow makes.
    pub maglev: Option<MaglevStep>,
    /// The backend the packet went to (read from the rewritten packet).
    pub backend: Option<String>,
    /// The source the packet was translated to, with SNAT.
    pub snat: Option<String>,
    /// `pass`, `drop`, `reject` (answered with a RST or ICMP unreachable).
    pub verdict: String,
    /// The program's return code.
    pub retval: u32,
    /// The reason counters the run moved, by name.
    pub reasons: Vec<String>,
    /// The drop reason, if dropped.
    pub drop_reason: Option<String>,
    /// The packet as the program left it.
    pub output: String,
    /// One sentence per step of the decision.
    pub explanation: Vec<String>,
}

/// Ethernet + IPv4 or IPv6 + TCP/UDP, checksums filled in (by the shared
/// packet module).
pub fn build_frame(req: &TraceRequest) -> Vec<u8> {
    let (src, dst) = ((req.src.ip(), req.src.port()), (req.dst.ip(), req.dst.port()));
    if req.proto == IPPROTO_TCP {
        Frame::tcp(src, dst, req.tcp_flags).build()
    } else {
        Frame::udp(src, dst, b"tron").build()
    }
}

/// What the program left: one line about it, and its addresses, ports
/// and protocol if it is TCP or UDP over IP (read by the shared packet
/// module, nothing verified).
fn describe_frame(f: &[u8]) -> (String, Option<(SocketAddr, SocketAddr, u8)>) {
    let tuple = packet::parse(f).ok().map(|p| {
        (
            SocketAddr::new(p.src, p.sport),
            SocketAddr::new(p.dst, p.dport),
            p.proto,
        )
    });
    (packet::summary(f), tuple)
}

/// The address as in a map (folded for the flow hash) and the port in
/// network order.
fn be(a: &SocketAddr) -> (u32, u16) {
    (fold_addr(&addr_of(a.ip()).0), a.port().to_be())
}

fn copy_err(what: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("copying {what} into the private copy: {e}")
}

/// Copies the one entry of the array map `name` from the live maps into
/// the private copy.
fn copy_entry<V: aya::Pod>(
    live: &aya::maps::Array<aya::maps::MapData, V>,
    private: &mut aya::maps::Array<aya::maps::MapData, V>,
    name: &str,
) -> anyhow::Result<()> {
    let v = live.get(&0, 0).map_err(|e| anyhow::anyhow!("reading {name}: {e}"))?;
    private.set(0, v, 0).map_err(|e| copy_err(name, e))
}

/// The other direction's conntrack key of a live entry.
fn other_direction(k: &CtKey, v: &CtValue) -> CtKey {
    if v.flags & CT_F_ORIGINAL != 0 {
        // Reply: backend -> client (or the node's SNAT address).
        let (daddr, dport) = if v.flags & CT_F_SNAT != 0 {
            (v.snat_addr, v.snat_port)
        } else {
            (k.saddr, k.sport)
        };
        CtKey {
            saddr: v.nat_addr,
            sport: v.nat_port,
            daddr,
            dport,
            proto: k.proto,
            family: k.family,
            _pad: 0,
        }
    } else {
        let (saddr, sport) = if v.flags & CT_F_SNAT != 0 {
            (v.snat_addr, v.snat_port)
        } else {
            (k.daddr, k.dport)
        };
        CtKey {
            saddr,
            sport,
            daddr: v.nat_addr,
            dport: v.nat_port,
            proto: k.proto,
            family: k.family,
            _pad: 0,
        }
    }
}

/// Runs `req` through a private copy of the dataplane seeded from `live`.
pub fn trace(live: &Maps, bpf_object: Option<&Path>, req: &TraceRequest) -> anyhow::Result<TraceReport> {
    // Without host routing: the trace explains the translation; where the
    // FIB would send the packet depends on the namespace the CLI runs in.
    let globals = Globals {
        host_routing: false,
        sock_routing: false,
        ..Globals::default()
    };
    let (mut dp, _) = Dataplane::load_with(bpf_object, None, &MapSizes::default(), false, globals)
        .map_err(|e| anyhow::anyhow!("loading a private copy of the programs: {e}"))?;
    let mut private = dp.take_maps()?;
    let now = monotonic_ns();
    let mut explanation = Vec::new();

    let config = live
        .config
        .get(&0, 0)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", map_names::CONFIG))?;
    private.write_config(&config)?;
    // The filters decide which lookups the programs make: the ClusterIP
    // filter whether a packet to no frontend looks for a ClusterIP's entry
    // for other ports, the backend filter whether it is looked up in
    // conntrack as a reply, the frontend filter whether the service map is
    // asked at all.
    copy_entry(&live.vip_filter, &mut private.vip_filter, map_names::VIP_FILTER)?;
    copy_entry(
        &live.backend_filter,
        &mut private.backend_filter,
        map_names::BACKEND_FILTER,
    )?;
    copy_entry(
        &live.frontend_filter,
        &mut private.frontend_filter,
        map_names::FRONTEND_FILTER,
    )?;

    let (saddr, sport) = be(&req.src);
    let (daddr, dport) = be(&req.dst);
    if req.src.is_ipv6() != req.dst.is_ipv6() {
        anyhow::bail!(
            "source {} and destination {} are of different families",
            req.src,
            req.dst
        );
    }
    let base_key = ServiceKey::new(req.dst.ip(), req.dst.port(), req.proto);
    // The entry the programs will use: the frontend, its in-cluster view
    // for a source in the cluster CIDRs, or the ClusterIP's entry for the
    // ports its Service lacks.
    let (svc_key, svc) = match live.services.get(&base_key, 0).ok() {
        Some(base) if base.flags & SVC_F_IN_CLUSTER_VIEW != 0 => {
            let cidrs = if req.src.is_ipv6() {
                CLUSTER_CIDRS_V6
            } else {
                CLUSTER_CIDRS_V4
            };
            let key = Key::new(
                SOURCE_RANGE_FULL_PREFIX,
                SourceRangeKey::new(cidrs, addr_of(req.src.ip()).0),
            );
            let view = live.services.get(&base_key.in_cluster(), 0).ok();
            match view.filter(|_| live.source_ranges.get(&key, 0).is_ok()) {
                Some(view) => {
                    explanation.push(format!(
                        "{} is inside the cluster CIDRs: the in-cluster view of {} is used (every endpoint)",
                        req.src.ip(),
                        frontend(&base_key)
                    ));
                    private
                        .services
                        .insert(base_key, base, 0)
                        .map_err(|e| copy_err("the service", e))?;
                    (base_key.in_cluster(), Some(view))
                }
                None => (base_key, Some(base)),
            }
        }
        Some(base) => (base_key, Some(base)),
        None => {
            let other_ports = ServiceKey::new(req.dst.ip(), 0, 0);
            match live.services.get(&other_ports, 0) {
                Ok(v) => {
                    explanation.push(format!(
                        "{}/{} is not a service frontend, but {} is a ClusterIP: ports its Service lacks are rejected",
                        req.dst,
                        proto_name(req.proto),
                        req.dst.ip()
                    ));
                    (other_ports, Some(v))
                }
                Err(_) => (base_key, None),
            }
        }
    };
    let mut service = None;
    let mut affinity = None;
    let mut affinity_backend = None;
    let mut maglev = None;
    if let Some(v) = svc {
        let id = v.service_id;
        let name = inspect::name_of(live, id);
        explanation.push(format!(
            "{} is the frontend of service {} (id {id}, {} backends, generation {})",
            frontend(&svc_key),
            if name.is_empty() { "?" } else { &name },
            v.backend_count,
            v.generation
        ));
        service = Some(TracedService {
            id,
            name: name.clone(),
            frontend: frontend(&svc_key),
            backends: v.backend_count,
            generation: v.generation,
        });
        private
            .services
            .insert(svc_key, v, 0)
            .map_err(|e| copy_err("the service", e))?;
        if let Ok(n) = live.names.get(&id, 0) {
            private.names.insert(id, n, 0).map_err(|e| copy_err("the name", e))?;
        }
        for i in 0..u32::from(v.backend_count) {
            let k = BackendKey::new(id, v.generation, i);
            if let Ok(b) = live.backends.get(&k, 0) {
                private
                    .backends
                    .insert(k, b, 0)
                    .map_err(|e| copy_err("a backend slot", e))?;
            }
        }
        for pos in (0..v.maglev_size).step_by(limits::MAGLEV_CHUNK as usize) {
            let k = MaglevKey::new(id, v.generation, pos);
            if let Ok(c) = live.maglev.get(&k, 0) {
                private
                    .maglev
                    .insert(k, c, 0)
                    .map_err(|e| copy_err("a Maglev chunk", e))?;
            }
        }
        for entry in live.source_ranges.iter() {
            let (k, val) = entry.map_err(|e| anyhow::anyhow!("reading {}: {e}", map_names::SOURCE_RANGES))?;
            let data: SourceRangeKey = k.data();
            if [id, CLUSTER_CIDRS_V4, CLUSTER_CIDRS_V6].contains(&u32::from_be(data.service_id_be)) {
                private
                    .source_ranges
                    .insert(&Key::new(k.prefix_len(), data), val, 0)
                    .map_err(|e| copy_err("a source range", e))?;
            }
        }
        if v.flags & SVC_F_AFFINITY != 0 {
            let ak = AffinityKey {
                client: addr_of(req.src.ip()).0,
                service_id: id,
            };
            match live.affinity.get(&ak, 0) {
                Ok(a) => {
                    private
                        .affinity
                        .insert(ak, a, 0)
                        .map_err(|e| copy_err("the affinity entry", e))?;
                    let idle = now.saturating_sub(a.last_seen_ns);
                    let fresh = idle <= u64::from(v.affinity_timeout_s) * 1_000_000_000;
                    affinity = Some(if fresh { "hit" } else { "expired" }.to_string());
                    affinity_backend = Some(endpoint(&a.backend.addr, a.backend.port, a.backend.family()));
                }
                Err(_) => affinity = Some("miss".into()),
            }
        }
        if v.backend_count > 0 && v.maglev_size > 0 && v.flags & SVC_F_RANDOM == 0 {
            let hash = flow_hash(saddr, daddr, sport, dport, req.proto);
            let position = hash % v.maglev_size;
            if let Ok(chunk) = live.maglev.get(&MaglevKey::new(id, v.generation, position), 0) {
                let slot = u32::from(chunk.entries[(position % limits::MAGLEV_CHUNK) as usize]);
                let backend = live
                    .backends
                    .get(&BackendKey::new(id, v.generation, slot), 0)
                    .map_or("missing".into(), |b| endpoint(&b.addr, b.port, b.family()));
                maglev = Some(MaglevStep {
                    hash,
                    table_size: v.maglev_size,
                    position,
                    slot,
                    backend,
                });
            }
        }
    } else {
        explanation.push(format!(
            "{}/{} is not a service frontend",
            req.dst,
            proto_name(req.proto)
        ));
    }

    let ct_key = CtKey::new(req.src.ip(), req.src.port(), req.dst.ip(), req.dst.port(), req.proto);
    let ct = live.conntrack.get(&ct_key, 0).ok();
    let starts_flow = req.proto == IPPROTO_TCP && req.tcp_flags & (SYN | ACK) == SYN;
    let conntrack = match &ct {
        None => "miss",
        Some(v) if now.saturating_sub(v.last_seen_ns) > config.timeout_ns(req.proto, v.state()) => "expired",
        Some(v) if svc.is_some() && starts_flow && v.state() & CT_F_CLOSING != 0 => "closed",
        Some(_) => "hit",
    }
    .to_string();
    if let Some(v) = ct {
        private
            .conntrack
            .insert(ct_key, v, 0)
            .map_err(|e| copy_err("the conntrack entry", e))?;
        let other = other_direction(&ct_key, &v);
        if let Ok(o) = live.conntrack.get(&other, 0) {
            private
                .conntrack
                .insert(other, o, 0)
                .map_err(|e| copy_err("the conntrack entry", e))?;
        }
    }
    let conntrack_entry = ct.map(|v| conntrack_row(live, &ct_key, &v, now));
    match (conntrack.as_str(), &conntrack_entry) {
        ("hit", Some(e)) if e.direction == "original" => explanation.push(format!(
            "conntrack hit: an established flow, it keeps backend {}{}",
            e.nat,
            e.snat.as_ref().map(|s| format!(" with source {s}")).unwrap_or_default()
        )),
        ("hit", Some(e)) => explanation.push(format!(
            "conntrack hit on a reply entry: the source becomes {}{}",
            e.nat,
            e.snat
                .as_ref()
                .map(|s| format!(", the destination {s}"))
                .unwrap_or_default()
        )),
        ("expired", _) => explanation.push("conntrack: the tuple's entry is idle past its timeout: a new flow".into()),
        ("closed", _) => explanation.push("conntrack: a SYN on the tuple of a closed flow starts a new flow".into()),
        _ => explanation.push("conntrack miss".into()),
    }
    let new_flow = svc.is_some() && conntrack != "hit";
    if new_flow {
        if let (Some(a), Some(b)) = (&affinity, &affinity_backend) {
            explanation.push(format!("session affinity {a}: {b}"));
        } else if affinity.is_some() {
            explanation.push("session affinity miss: the backend is selected and remembered".into());
        }
        if affinity.as_deref() != Some("hit") {
            if let Some(m) = &maglev {
                explanation.push(format!(
                    "Maglev: flow hash {:#010x} % {} = position {}, which holds slot {}: {}",
                    m.hash, m.table_size, m.position, m.slot, m.backend
                ));
            } else if svc.is_some_and(|v| v.backend_count > 0) {
                explanation.push("random selection among the backends".into());
            }
        }
    }

    let frame = build_frame(req);
    let prog = match req.program {
        TraceProgram::Tc => program_names::TC,
        TraceProgram::Xdp => dp.xdp_program(),
    };
    let fd = dp.program_fd(prog)?;
    let ran = testrun::run(fd, &frame).map_err(|e| anyhow::anyhow!("BPF_PROG_TEST_RUN on {prog}: {e}"))?;

    let mut moved = Vec::new();
    for r in Reason::ALL {
        let n: u64 = private.reasons.get(&(r as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
        if n > 0 {
            moved.push(r);
        }
    }
    let drop_reason = moved.iter().find(|r| r.is_drop()).map(|r| r.name().to_string());
    let verdict = match (req.program, ran.retval) {
        (TraceProgram::Xdp, 1) | (TraceProgram::Tc, 2) => "drop",
        (TraceProgram::Xdp, 3) | (TraceProgram::Tc, 7) => "reject",
        (TraceProgram::Xdp, 2) | (TraceProgram::Tc, 0) | (TraceProgram::Tc, u32::MAX) => "pass",
        _ => "other",
    }
    .to_string();
    let (output, parsed) = describe_frame(&ran.data);
    let (mut backend, mut snat) = (None, None);
    let translated = moved
        .iter()
        .any(|r| matches!(r, Reason::NatNewFlow | Reason::NatEstablished));
    if let (true, Some((s, d, _))) = (translated, parsed) {
        backend = Some(d.to_string());
        if s != req.src {
            snat = Some(s.to_string());
        }
    }
    match verdict.as_str() {
        "drop" => explanation.push(format!(
            "dropped: {}",
            drop_reason.as_deref().unwrap_or("no drop reason counted")
        )),
        "reject" => explanation.push(format!("rejected (no usable backend): answered with {output}")),
        _ if translated => explanation.push(format!(
            "translated to backend {}{}",
            backend.as_deref().unwrap_or("?"),
            snat.as_ref()
                .map(|s| format!(", source {s} (SNAT)"))
                .unwrap_or_default()
        )),
        _ if moved.contains(&Reason::NatReply) => explanation.push(format!("reply translated back: {output}")),
        _ => explanation.push("passed untouched".into()),
    }
    let report = TraceReport {
        program: req.program,
        packet: packet::summary(&frame),
        service,
        conntrack,
        conntrack_entry,
        affinity,
        affinity_backend,
        maglev,
        backend,
        snat,
        verdict,
        retval: ran.retval,
        reasons: moved.iter().map(|r| r.name().to_string()).collect(),
        drop_reason,
        output,
        explanation,
    };
    // The private copy (programs and maps) goes away here.
    drop(private);
    drop(dp);
    Ok(report)
}

/// The report as aligned `key  value` lines, then the explanation.
pub fn trace_table(r: &TraceReport) -> String {
    let mut t = Table::new(vec!["STEP", "RESULT"]);
    let mut row = |k: &str, v: String| t.row(vec![k.to_string(), v]);
    row(
        "program",
        match r.program {
            TraceProgram::Tc => "tc".into(),
            TraceProgram::Xdp => "xdp".into(),
        },
    );
    row("packet", r.packet.clone());
    row(
        "service",
        r.service.as_ref().map_or("none".into(), |s| {
            format!(
                "{} {} (id {}, {} backends)",
                if s.name.is_empty() { "?" } else { &s.name },
                s.frontend,
                s.id,
                s.backends
            )
        }),
    );
    row("conntrack", r.conntrack.clone());
    if let Some(a) = &r.affinity {
        row(
            "affinity",
            format!(
                "{a}{}",
                r.affinity_backend
                    .as_ref()
                    .map(|b| format!(" ({b})"))
                    .unwrap_or_default()
            ),
        );
    }
    if let Some(m) = &r.maglev {
        row(
            "maglev",
            format!(
                "hash {:#010x} position {}/{} slot {} -> {}",
                m.hash, m.position, m.table_size, m.slot, m.backend
            ),
        );
    }
    row("backend", r.backend.clone().unwrap_or_else(|| "-".into()));
    row("snat", r.snat.clone().unwrap_or_else(|| "-".into()));
    row("verdict", format!("{} (return code {})", r.verdict, r.retval as i32));
    row("reasons", r.reasons.join(","));
    if let Some(d) = &r.drop_reason {
        row("drop reason", d.clone());
    }
    row("output", r.output.clone());
    let mut out = t.render();
    out.push('\n');
    for e in &r.explanation {
        out.push_str("- ");
        out.push_str(e);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane_common::IPPROTO_UDP;

    #[test]
    fn tcp_flags_parse() {
        assert_eq!(parse_tcp_flags("syn").unwrap(), SYN);
        assert_eq!(parse_tcp_flags("syn,ack").unwrap(), SYN | ACK);
        assert_eq!(parse_tcp_flags("ACK|psh").unwrap(), ACK | PSH);
        assert!(parse_tcp_flags("urg").unwrap_err().contains("urg"));
    }

    #[test]
    fn frames_carry_valid_checksums_and_read_back() {
        for (src, dst) in [
            ("198.18.100.2:41000", "198.19.0.10:80"),
            ("[2001:db8:100::2]:41000", "[fd00:198:19::10]:80"),
        ] {
            for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                let req = TraceRequest {
                    src: src.parse().unwrap(),
                    dst: dst.parse().unwrap(),
                    proto,
                    tcp_flags: SYN,
                    program: TraceProgram::Tc,
                };
                let f = build_frame(&req);
                let p = packet::parse_and_verify(&f).unwrap();
                assert_eq!(
                    (
                        SocketAddr::new(p.src, p.sport),
                        SocketAddr::new(p.dst, p.dport),
                        p.proto
                    ),
                    (req.src, req.dst, proto)
                );
                let (text, parsed) = describe_frame(&f);
                assert_eq!(parsed, Some((req.src, req.dst, proto)), "{text}");
                let flags = if proto == IPPROTO_TCP { " flags syn" } else { "" };
                let name = if proto == IPPROTO_TCP { "tcp" } else { "udp" };
                assert_eq!(text, format!("{name} {} -> {}{flags}", req.src, req.dst));
            }
        }
    }
}
