//! The per-packet story: service lookup, conntrack, backend selection, NAT.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use dataplane_common::{
    flow_hash, limits, BackendKey, MaglevKey, Reason, ServiceKey, ServiceValue, CT_F_CLOSING, CT_F_REPLY,
    CT_F_SEEN_REPLY, SVC_F_AFFINITY, SVC_F_RANDOM,
};

use crate::{
    affinity, conntrack,
    maps::{DP_BACKENDS, DP_MAGLEV, DP_SERVICES},
    nat::{PacketCtx, Side},
    parse::{self, Packet, TCP_ACK, TCP_SYN},
    stats,
};

/// What the entry program does with the packet.
#[derive(Clone, Copy)]
pub enum Verdict {
    Pass,
    Drop,
    /// Answer with a TCP RST / ICMP port unreachable (a Service without
    /// endpoints); the entry program builds the reply.
    Reject,
}

#[inline(always)]
pub fn process<C: PacketCtx>(ctx: &C, p: &Packet) -> Verdict {
    let key = ServiceKey {
        addr: p.daddr,
        port: p.dport,
        proto: p.proto,
        _pad: 0,
    };
    // Copy the value out: the agent may replace it at any time.
    let svc = match DP_SERVICES.get_ptr(key) {
        // SAFETY: the map is not preallocated, so the element stays valid
        // (RCU) for this program run.
        Some(v) => unsafe { *v },
        None => return reply(ctx, p),
    };
    to_service(ctx, p, &svc)
}

/// A packet addressed to a service frontend.
#[inline(always)]
fn to_service<C: PacketCtx>(ctx: &C, p: &Packet, svc: &ServiceValue) -> Verdict {
    let ct_key = conntrack::tuple(p);
    let starts_flow = p.is_tcp() && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if let Some(ct) = conntrack::lookup(&ct_key, p) {
        // A SYN on a tuple whose connection was closed starts a new flow
        // (port reuse); anything else follows the recorded backend.
        if !(starts_flow && ct.flags & CT_F_CLOSING != 0) {
            return translate(ctx, p, svc.service_id, ct.nat_addr, ct.nat_port, Reason::NatEstablished);
        }
    }

    if svc.backend_count == 0 {
        stats::service(svc.service_id, |s| s.no_backend += 1);
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
    if conntrack::create(p, svc.service_id, backend.addr, backend.port).is_err() {
        // The packet still goes to the chosen backend; the next one of the
        // flow picks the same backend again by hash as long as the set is
        // unchanged.
        stats::count(Reason::CtInsertFailed);
    }
    stats::service(svc.service_id, |s| s.new_flows += 1);
    translate(ctx, p, svc.service_id, backend.addr, backend.port, Reason::NatNewFlow)
}

/// The index of the backend slot a new flow goes to: the Maglev table's
/// entry for the flow's hash, or a random one.
#[inline(always)]
fn select(p: &Packet, svc: &ServiceValue) -> Option<u32> {
    let count = svc.backend_count as u32;
    if svc.flags & SVC_F_RANDOM != 0 || svc.maglev_size == 0 {
        // SAFETY: helper without preconditions.
        return Some(unsafe { bpf_get_prandom_u32() } % count);
    }
    let pos = flow_hash(p.saddr, p.daddr, p.sport, p.dport, p.proto) % svc.maglev_size;
    let chunk = DP_MAGLEV.get_ptr(MaglevKey::new(svc.service_id, svc.generation, pos))?;
    let i = (pos % limits::MAGLEV_CHUNK) as usize;
    // SAFETY: the value stays valid (RCU, not preallocated) for this run; the
    // index is below the array length by construction.
    let index = unsafe { (*chunk).entries.get(i).copied()? } as u32;
    (index < count).then_some(index)
}

#[inline(always)]
fn translate<C: PacketCtx>(ctx: &C, p: &Packet, service_id: u32, addr: u32, port: u16, reason: Reason) -> Verdict {
    if ctx.rewrite(p, Side::Dst, addr, port).is_err() {
        stats::count(Reason::DropRewriteFailed);
        return Verdict::Drop;
    }
    stats::service(service_id, |s| {
        s.packets += 1;
        s.bytes += p.l3_len as u64;
    });
    stats::count(reason);
    Verdict::Pass
}

/// A packet not addressed to a service: a reply of a tracked flow gets the
/// VIP back as its source; anything else passes untouched.
#[inline(always)]
fn reply<C: PacketCtx>(ctx: &C, p: &Packet) -> Verdict {
    let key = conntrack::tuple(p);
    match conntrack::lookup(&key, p) {
        Some(ct) if ct.flags & CT_F_REPLY != 0 => {
            let mut flags = 0;
            if ct.flags & CT_F_SEEN_REPLY == 0 && conntrack::first_reply(&key) {
                flags |= CT_F_SEEN_REPLY;
            }
            if conntrack::closes(p) {
                flags |= CT_F_CLOSING;
            }
            if flags != 0 {
                conntrack::flag_original(p, ct.nat_addr, ct.nat_port, flags);
            }
            if ctx.rewrite(p, Side::Src, ct.nat_addr, ct.nat_port).is_err() {
                stats::count(Reason::DropRewriteFailed);
                return Verdict::Drop;
            }
            stats::count(Reason::NatReply);
            Verdict::Pass
        }
        _ => {
            stats::count(Reason::PassNoService);
            Verdict::Pass
        }
    }
}

/// Parses and processes one frame. The packet is returned with the verdict
/// (kept out of the enum: a payload-carrying enum let LLVM read
/// uninitialised registers on other variants, which the verifier rejects).
#[inline(always)]
pub fn handle<C: PacketCtx>(ctx: &C) -> Result<(Verdict, Packet), Reason> {
    let p = parse::parse(ctx.data(), ctx.data_end())?;
    Ok((process(ctx, &p), p))
}
