//! The per-packet story: service lookup, conntrack, backend selection, NAT.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use aya_ebpf::maps::lpm_trie::Key;
use aya_log_ebpf::info;
use dataplane_common::{
    addr_eq, flow_hash, fold_addr, limits, Addr, Backend, BackendKey, CtEvent, CtValue, MaglevKey, Reason, ServiceKey,
    ServiceValue, SourceRangeKey, BACKEND_F_REMOTE, CLUSTER_CIDRS_V4, CLUSTER_CIDRS_V6, CT_F_CLOSING, CT_F_REPLY,
    CT_F_SEEN_REPLY, CT_F_SNAT, KEY_IN_CLUSTER, SOURCE_RANGE_FULL_PREFIX, SVC_F_AFFINITY, SVC_F_DROP_NO_LOCAL,
    SVC_F_EXTERNAL, SVC_F_IN_CLUSTER_VIEW, SVC_F_RANDOM, SVC_F_SOURCE_RANGES,
};

use crate::{
    affinity, conntrack,
    maps::{DP_BACKENDS, DP_CONFIG, DP_MAGLEV, DP_SERVICES, DP_SRC_RANGES},
    nat::{Endpoint, PacketCtx},
    parse::{Packet, TCP_ACK, TCP_SYN},
    stats,
};

/// What the entry program does with the packet.
#[derive(Clone, Copy)]
pub enum Verdict {
    Pass,
    /// Translated: on to the backend or the client (TC: straight to the
    /// FIB's egress interface with host routing, see `forward`).
    Forward,
    Drop,
    /// Answer with a TCP RST / ICMP port unreachable (a Service without
    /// endpoints); the entry program builds the reply.
    Reject,
}

/// What [`track`] found out about a packet before the service map.
#[derive(Clone, Copy)]
pub enum Front {
    /// Translated (or passed, or dropped): nothing more to do.
    Done(Verdict),
    /// Conntrack was asked and has no entry for the tuple.
    Untracked,
    /// Conntrack was not asked, or has an original entry that the service
    /// path must look at again (a SYN, a frontend not in the cache).
    Unknown,
}

/// The part of the per-packet story that needs no service map: packets of
/// tracked flows to cached frontends, and replies. Inlined into the entry
/// program's parsing subprogram (`entry.rs`), so that established flows and
/// replies make one BPF-to-BPF call, not two.
///
/// A SYN may start a new flow on an old tuple and needs the Service's
/// value; anything else may be a packet of a tracked flow to a cached
/// frontend (`cached_flow`). A packet from an address that may be a
/// backend may be a reply: conntrack is asked before the service map
/// (`from_backend`), so that replies skip it. What is neither takes
/// [`process`] (`Untracked`: conntrack was asked already and has no entry
/// for the tuple).
#[inline(always)]
pub fn track<C: PacketCtx>(ctx: &C, p: &Packet) -> Front {
    let cached = if starts_flow(p) {
        None
    } else {
        crate::maps::cached_frontend(&service_key(p))
    };
    let asked = match cached {
        Some(service_id) => cached_flow(ctx, p, service_id),
        None => Tracked::NotAsked,
    };
    match asked {
        Tracked::Done(v) => Front::Done(v),
        Tracked::Untracked => Front::Untracked,
        // (One call site: the verifier walks the function once.)
        t if matches!(t, Tracked::Reply) || crate::maps::maybe_backend(&p.saddr) => match from_backend(ctx, p) {
            Tracked::Done(v) => Front::Done(v),
            Tracked::Untracked => Front::Untracked,
            // An original entry: a flow a backend (a pod that is also a
            // client) opened to a Service, to a frontend not in the cache
            // (or a SYN): the service path, which asks conntrack again.
            _ => Front::Unknown,
        },
        _ => Front::Unknown,
    }
}

#[inline(always)]
fn service_key(p: &Packet) -> ServiceKey {
    ServiceKey {
        addr: p.daddr,
        port: p.dport,
        proto: p.proto,
        family: p.family,
    }
}

/// The rest of the story after [`track`]: the service map, new flows.
#[inline(always)]
pub fn process<C: PacketCtx>(ctx: &C, p: &Packet, front: Front) -> Verdict {
    let untracked = match front {
        Front::Done(v) => return v,
        Front::Untracked => true,
        Front::Unknown => false,
    };
    // Most traffic of a node (pod to pod) goes to addresses without a
    // frontend: the frontend filter spares it the hash lookup.
    if !crate::maps::maybe_frontend(&p.daddr) {
        return no_service(p, false);
    }
    // Copy the value out: the agent may replace it at any time.
    let mut svc = match DP_SERVICES.get_ptr(service_key(p)) {
        // SAFETY: the map is not preallocated, so the element stays valid
        // (RCU) for this program run.
        Some(v) => unsafe { *v },
        None => return no_service(p, true),
    };
    if svc.flags & SVC_F_IN_CLUSTER_VIEW != 0 {
        if let Some(v) = in_cluster_view(p) {
            // SAFETY: as above.
            svc = unsafe { *v };
        }
    }
    to_service(ctx, p, &svc, untracked)
}

/// A TCP SYN (without ACK): may start a new flow on a tuple conntrack
/// already has.
#[inline(always)]
fn starts_flow(p: &Packet) -> bool {
    p.is_tcp() && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// A packet of a tracked flow to a cached frontend (of `service_id`) is
/// translated without the service map: the frontend cache says the
/// frontend exists and under which id, which is all a packet of a tracked
/// flow needs of it (see `FrontendBucket`). A reply entry for the tuple
/// makes it a reply whose destination (the client's address and port) is
/// a frontend as well (`Tracked::Reply`: left to `from_backend`, which
/// reverse-translates it as any reply). (A function of its own: in the
/// entry program's frame, its locals would take the stack the new-flow
/// path's chain of frames needs: inlined into the parsing subprogram.)
#[inline(always)]
fn cached_flow<C: PacketCtx>(ctx: &C, p: &Packet, service_id: u32) -> Tracked {
    let Some(ct) = conntrack::lookup(p) else {
        return Tracked::Untracked;
    };
    // SAFETY: an entry of this run's lookup.
    if unsafe { (*ct).flags } & CT_F_REPLY != 0 {
        return Tracked::Reply;
    }
    Tracked::Done(established(ctx, p, service_id, ct))
}

/// What conntrack said about a packet.
#[derive(Clone, Copy)]
enum Tracked {
    /// Translated, or passed.
    Done(Verdict),
    /// Conntrack has no entry for the tuple.
    Untracked,
    /// Not asked.
    NotAsked,
    /// A reply entry, not translated yet.
    Reply,
    /// An original entry, not translated yet.
    Original,
}

/// A packet whose source may be a backend (`maybe_backend`) and whose
/// destination is no cached frontend (or one that a reply entry says is
/// the client of a flow), looked up in conntrack by its own tuple before
/// the service map. A reply entry (or, for a SYN-ACK without one, the
/// flood guard's entry of a SYN served without state): the packet is a
/// reply, reverse-translated without the service map. A reply entry's
/// tuple is (backend, client): its destination is the flow's client, and
/// the packet a reply even when that address and port are also a frontend
/// (a node address and a NodePort). `Original`: the packet is one of a
/// flow a backend opened as a client, left to the service path.
/// (Inlined into the parsing subprogram, as `cached_flow`.)
#[inline(always)]
fn from_backend<C: PacketCtx>(ctx: &C, p: &Packet) -> Tracked {
    let ct = match conntrack::lookup(p) {
        Some(e) => e,
        // A SYN-ACK may answer a SYN served without state, any other TCP
        // segment but a SYN a segment, any UDP datagram a datagram.
        None if p.is_udp() || p.is_tcp() && p.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN => match stateless_reply(p) {
            Some(e) => e,
            None => return Tracked::Untracked,
        },
        None => return Tracked::Untracked,
    };
    // SAFETY: an entry of this run's lookup.
    if unsafe { (*ct).flags } & CT_F_REPLY != 0 {
        return Tracked::Done(reply(ctx, p, ct));
    }
    Tracked::Original
}

/// A packet of the tracked flow `ct` to the frontend of `service_id`: on
/// to the flow's backend.
#[inline(always)]
fn established<C: PacketCtx>(ctx: &C, p: &Packet, service_id: u32, ct: *mut CtValue) -> Verdict {
    // SAFETY: an entry of this run's lookup.
    let ct = unsafe { &*ct };
    if conntrack::closes(p) {
        // The flow's reply entry closes with it: its tuple is free for a
        // new flow once the closing timeout passes or a SYN reuses it.
        conntrack::flag_reply(p, ct, CT_F_CLOSING);
    }
    let snat = (ct.flags & CT_F_SNAT != 0).then_some((&ct.snat_addr, ct.snat_port));
    translate(
        ctx,
        p,
        service_id,
        (&ct.nat_addr, ct.nat_port),
        snat,
        Reason::NatEstablished,
    )
}

/// The in-cluster view of an external frontend of a Local-policy Service,
/// when the packet comes from inside the cluster (a source in the cluster
/// CIDRs): kube-proxy sends such traffic to every endpoint.
#[inline(never)]
fn in_cluster_view(p: &Packet) -> Option<*const ServiceValue> {
    let cidrs = if p.is_v6() { CLUSTER_CIDRS_V6 } else { CLUSTER_CIDRS_V4 };
    DP_SRC_RANGES.get(Key::new(SOURCE_RANGE_FULL_PREFIX, SourceRangeKey::new(cidrs, p.saddr)))?;
    DP_SERVICES.get_ptr(ServiceKey {
        addr: p.daddr,
        port: p.dport,
        proto: p.proto,
        family: p.family | KEY_IN_CLUSTER,
    })
}

/// Whether a new SYN on the tuple of `ct` starts a new flow: its flow
/// closed, or it was made for another frontend or backend set. (A function
/// of its own: the comparisons stay out of the caller's registers, so that
/// the verifier walks the translation after it once, not once per way
/// there.)
#[inline(never)]
fn stale(ct: &CtValue, svc: &ServiceValue) -> bool {
    ct.state() & CT_F_CLOSING != 0 || ct.service_id != svc.service_id || ct.epoch != svc.epoch as u16
}

/// A packet addressed to a service frontend (`untracked`: conntrack has
/// no entry for its tuple, already asked).
#[inline(never)]
fn to_service<C: PacketCtx>(ctx: &C, p: &Packet, svc: &ServiceValue, untracked: bool) -> Verdict {
    let tracked = if untracked { None } else { conntrack::lookup(p) };
    if let Some(ct) = tracked {
        // A SYN on a tuple whose connection was closed starts a new flow
        // (port reuse), and so does one whose entry was made for another
        // frontend or another backend set (a client reusing its port after
        // an unclean close must not follow a backend that may be gone);
        // anything else follows the recorded backend.
        // SAFETY: an entry of this run's lookup.
        if !(starts_flow(p) && stale(unsafe { &*ct }, svc)) {
            return established(ctx, p, svc.service_id, ct);
        }
    }

    // The flood guard's decision for this new flow (read by
    // `conntrack::create`), taken before the paths below split.
    conntrack::flood_check(p, svc, tracked.is_none());
    if svc.flags & SVC_F_SOURCE_RANGES != 0
        && DP_SRC_RANGES
            .get(Key::new(
                SOURCE_RANGE_FULL_PREFIX,
                SourceRangeKey::new(svc.service_id, p.saddr),
            ))
            .is_none()
    {
        if crate::maps::debug_enabled() {
            if p.is_v6() {
                let a = as_bytes(&p.saddr);
                info!(ctx, "source {:i} outside the ranges of service {}", a, svc.service_id);
            } else {
                let a = u32::from_be(p.saddr[0]);
                info!(ctx, "source {:i} outside the ranges of service {}", a, svc.service_id);
            }
        }
        stats::count(Reason::DropSourceRange);
        return Verdict::Drop;
    }
    if svc.backend_count == 0 {
        stats::service(svc.service_id, |s| s.no_backend += 1);
        if crate::maps::debug_enabled() {
            info!(ctx, "service {} has no backend (flags {:x})", svc.service_id, svc.flags);
        }
        if svc.flags & SVC_F_DROP_NO_LOCAL != 0 {
            stats::count(Reason::DropNoLocalBackend);
            return Verdict::Drop;
        }
        return Verdict::Reject;
    }
    let affinity = svc.flags & SVC_F_AFFINITY != 0;
    let remembered = if affinity { affinity::lookup(p, svc) } else { None };
    let backend = match remembered {
        Some(b) => b,
        None => {
            let slot = select(p, svc)
                .and_then(|index| DP_BACKENDS.get_ptr(BackendKey::new(svc.service_id, svc.generation, index)));
            match slot {
                // SAFETY: as for the service value.
                Some(b) => unsafe { *b },
                None => {
                    stats::count(Reason::DropBackendMissing);
                    return Verdict::Drop;
                }
            }
        }
    };
    if affinity && remembered.is_none() {
        affinity::remember(p, svc, backend);
    }
    // The source is translated too when replies would otherwise not come
    // back through this node: a remote backend of an external frontend, or
    // a backend reaching itself through its Service (hairpin: it would drop
    // a packet from its own address).
    let needs_snat =
        (svc.flags & SVC_F_EXTERNAL != 0 && backend.flags & BACKEND_F_REMOTE != 0) || addr_eq(&p.saddr, &backend.addr);
    let mut snat = if needs_snat {
        match snat_source(p, &backend) {
            Some(s) => Some(s),
            None => {
                stats::count(Reason::DropSnatFailed);
                return Verdict::Drop;
            }
        }
    } else {
        None
    };
    let mut created = conntrack::create(p, svc, &backend, snat.as_ref());
    if created == Err(conntrack::CLASH) {
        snat = clash_source(p, &backend, snat.as_ref());
        if snat.is_none() {
            stats::count(Reason::DropSnatFailed);
            return Verdict::Drop;
        }
        stats::ct_event(CtEvent::ClashResolved);
        created = conntrack::create(p, svc, &backend, snat.as_ref());
    }
    if conntrack::held_without_state() {
        stats::count(Reason::DropSnatFailed);
        return Verdict::Drop;
    }
    if created.is_err() {
        // The packet still goes to the chosen backend; the next one of the
        // flow picks the same backend again by hash as long as the set is
        // unchanged.
        stats::count(Reason::CtInsertFailed);
    }
    if crate::maps::debug_enabled() {
        let (service_id, port) = (svc.service_id, u16::from_be(backend.port));
        if p.is_v6() {
            let addr = as_bytes(&backend.addr);
            info!(ctx, "new flow service {} backend [{:i}]:{}", service_id, addr, port);
        } else {
            let addr = u32::from_be(backend.addr[0]);
            info!(ctx, "new flow service {} backend {:i}:{}", service_id, addr, port);
        }
    }
    translate(
        ctx,
        p,
        svc.service_id,
        (&backend.addr, backend.port),
        snat.as_ref().map(|(a, port)| (a, *port)),
        Reason::NatNewFlow,
    )
}

/// The flood guard's reply entry for a SYN-ACK, another TCP segment (not
/// a SYN) or a UDP datagram that matches no flow in conntrack: the
/// backend answering a SYN, segment or datagram served without state.
/// Only SYN-ACKs look the guard's entries up whenever the guard is on:
/// anything else only while the guard served more than SYNs without
/// state (`conntrack::embryonic_gated`).
#[inline(never)]
fn stateless_reply(p: &Packet) -> Option<*mut CtValue> {
    if crate::maps::new_flows_per_cpu() == 0 {
        return None;
    }
    let e = if p.is_tcp() && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        conntrack::embryonic(p)?
    } else {
        conntrack::embryonic_gated(p)?
    };
    stats::ct_event(CtEvent::StatelessReply);
    Some(e)
}

/// An address as its 16 bytes (aya-log prints `[u8; 16]` as IPv6).
#[inline(always)]
fn as_bytes(a: &Addr) -> [u8; 16] {
    // SAFETY: same size, both plain data.
    unsafe { core::mem::transmute(*a) }
}

/// Candidate source ports tried for one SNATed flow.
const SNAT_TRIES: u32 = 8;

/// This node's address and a source port no other flow to `backend` uses
/// with it (the reply tuple must be unique).
#[inline(never)]
fn snat_source(p: &Packet, backend: &Backend) -> Option<(Addr, u16)> {
    let config = DP_CONFIG.get(0)?;
    // 8-byte aligned: LLVM merges the zero words into one 8-byte store,
    // which the verifier refuses at a 4-byte aligned stack slot.
    #[repr(C, align(8))]
    struct Aligned(Addr);
    let node = Aligned(if p.is_v6() {
        config.snat_addr6
    } else {
        dataplane_common::v4_addr(config.snat_addr)
    });
    if addr_eq(&node.0, &[0; 4]) {
        return None;
    }
    free_source(p, backend, &node.0)
}

/// Another live flow translates to the same reply tuple as this new one
/// (this client port to another frontend with this backend, or a SNATed
/// flow that won a race): as netfilter does, the new flow gets another
/// source port, on the node's address when it was SNATed, else on the
/// client's own, and the other flow keeps its replies. `None` when no port
/// is free.
#[inline(never)]
fn clash_source(p: &Packet, backend: &Backend, snat: Option<&(Addr, u16)>) -> Option<(Addr, u16)> {
    let addr = match snat {
        Some((a, _)) => a,
        None => &p.saddr,
    };
    free_source(p, backend, addr)
}

/// A source port on `addr` that no other flow to `backend` uses with it.
#[inline(always)]
fn free_source(p: &Packet, backend: &Backend, addr: &Addr) -> Option<(Addr, u16)> {
    // From the SNAT port range (`--snat-port-range`), outside the node's
    // ephemeral ports: no socket of the node can hold the same tuple and
    // receive a stranger's replies.
    let (first, span) = crate::maps::snat_ports();
    let h = hash(p);
    let expiry = conntrack::SnatExpiry::now(p.proto)?;
    // Unrolled: walked as a loop, each candidate's outcomes multiplied
    // the verifier's states (`dp_tc` 294,000 instructions on 6.18 as a
    // loop, 253,000 unrolled).
    let candidate = |i: u32| {
        // (Checked: a zero divisor must not become a panic path.)
        let offset = h
            .wrapping_add(i.wrapping_mul(0x9e37_79b1))
            .checked_rem(span)
            .unwrap_or(0);
        ((first + offset) as u16).to_be()
    };
    macro_rules! try_candidate {
        ($i:expr) => {
            let port = candidate($i);
            if !conntrack::reply_tuple_in_use(p, backend, addr, port, &expiry) {
                return Some((*addr, port));
            }
        };
    }
    try_candidate!(0);
    try_candidate!(1);
    try_candidate!(2);
    try_candidate!(3);
    try_candidate!(4);
    try_candidate!(5);
    try_candidate!(6);
    try_candidate!(7);
    const _: () = assert!(SNAT_TRIES == 8);
    None
}

/// `dataplane_common::flow_hash_key` of the packet's tuple.
#[inline(always)]
fn hash(p: &Packet) -> u32 {
    flow_hash(fold_addr(&p.saddr), fold_addr(&p.daddr), p.sport, p.dport, p.proto)
}

/// The index of the backend slot a new flow goes to: the Maglev table's
/// entry for the flow's hash, or a random one.
#[inline(never)]
fn select(p: &Packet, svc: &ServiceValue) -> Option<u32> {
    let count = svc.backend_count as u32;
    if svc.flags & SVC_F_RANDOM != 0 || svc.maglev_size == 0 {
        // SAFETY: helper without preconditions.
        return unsafe { bpf_get_prandom_u32() }.checked_rem(count);
    }
    // (Checked: a zero divisor must not become a panic path, which the
    // verifier rejects in a function of its own.)
    let pos = hash(p).checked_rem(svc.maglev_size)?;
    let chunk = DP_MAGLEV.get_ptr(MaglevKey::new(svc.service_id, svc.generation, pos))?;
    let i = (pos % limits::MAGLEV_CHUNK) as usize;
    // SAFETY: the value stays valid (RCU, not preallocated) for this run; the
    // index is below the array length by construction.
    let index = unsafe { (*chunk).entries.get(i).copied()? } as u32;
    (index < count).then_some(index)
}

/// Rewrites the destination to `dst` (and the source to `snat`, if any).
/// Counts the packet in its Service's counters, and the new flow with
/// `NatNewFlow` (in the same update: one counter lookup per packet).
#[inline(always)]
fn translate<C: PacketCtx>(
    ctx: &C,
    p: &Packet,
    service_id: u32,
    dst: Endpoint,
    snat: Option<Endpoint>,
    reason: Reason,
) -> Verdict {
    if ctx.rewrite(p, Some(dst), snat).is_err() {
        stats::count(Reason::DropRewriteFailed);
        return Verdict::Drop;
    }
    stats::service(service_id, |s| {
        if matches!(reason, Reason::NatNewFlow) {
            s.new_flows += 1;
        }
        s.packets += 1;
        s.bytes += p.l3_len as u64;
    });
    stats::count(reason);
    Verdict::Forward
}

/// A reply of the tracked flow whose reply entry is `e`: the frontend
/// back as its source (and, with SNAT, the client back as its
/// destination).
#[inline(always)]
fn reply<C: PacketCtx>(ctx: &C, p: &Packet, e: *mut CtValue) -> Verdict {
    // SAFETY: an entry of this run's lookup.
    let ct = unsafe { &*e };
    let mut flags = 0;
    if ct.state() & CT_F_SEEN_REPLY == 0 && conntrack::first_reply(e) {
        flags |= CT_F_SEEN_REPLY;
    }
    if conntrack::closes(p) {
        flags |= CT_F_CLOSING;
    }
    if flags != 0 {
        conntrack::flag_original(p, ct, flags);
    }
    // With SNAT, also back to the client the node translated the
    // source of.
    let client = (ct.flags & CT_F_SNAT != 0).then_some((&ct.snat_addr, ct.snat_port));
    if ctx.rewrite(p, client, Some((&ct.nat_addr, ct.nat_port))).is_err() {
        stats::count(Reason::DropRewriteFailed);
        return Verdict::Drop;
    }
    stats::count(Reason::NatReply);
    Verdict::Forward
}

/// A packet not addressed to a service and no tracked reply (conntrack
/// was asked in `from_backend` when its source may be a backend; a source
/// that never was one has no reply entry, see `BackendFilter`): it passes
/// untouched, or is rejected (a ClusterIP's port its Service lacks).
#[inline(never)]
fn no_service(p: &Packet, frontend_address: bool) -> Verdict {
    // (The reply entry it looks for comes from the destination.)
    if p.is_tcp() && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && crate::maps::maybe_backend(&p.daddr) {
        conntrack::remove_closing_reply(p);
    }
    // A ClusterIP on a port its Service does not define
    // (`SVC_F_OTHER_PORTS`): rejected, not passed to the node.
    // The filter spares other addresses the hash lookup; an address the
    // frontend filter rules out has no such entry either.
    if !frontend_address || !crate::maps::maybe_cluster_ip(&p.daddr) {
        stats::count(Reason::PassNoService);
        return Verdict::Pass;
    }
    let other_ports = ServiceKey {
        addr: p.daddr,
        port: 0,
        proto: 0,
        family: p.family,
    };
    if let Some(v) = DP_SERVICES.get_ptr(other_ports) {
        // SAFETY: as for the service value in `process`.
        let id = unsafe { (*v).service_id };
        stats::service(id, |s| s.no_backend += 1);
        return Verdict::Reject;
    }
    stats::count(Reason::PassNoService);
    Verdict::Pass
}
