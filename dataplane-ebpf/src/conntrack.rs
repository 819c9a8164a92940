//! Connection tracking: two LRU entries per translated flow.
//!
//! The original entry, keyed by the client's tuple towards the VIP, records
//! the backend. The reply entry, keyed by the backend's tuple towards the
//! client, records the VIP. An established flow therefore keeps its backend
//! whatever happens to the service's backend set.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use dataplane_common::{
    counters, Backend, CtKey, CtValue, DpConfig, CT_F_CLOSING, CT_F_ORIGINAL, CT_F_REPLY, CT_F_SEEN_REPLY, CT_F_SNAT,
};

use crate::{
    maps::{DP_CONFIG, DP_CONNTRACK},
    parse::{Packet, TCP_FIN, TCP_RST},
};

/// Refresh `last_seen_ns` at most this often, so that established flows
/// do not write a shared cache line on every packet.
const REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
pub fn tuple(p: &Packet) -> CtKey {
    CtKey {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
pub fn closes(p: &Packet) -> bool {
    p.is_tcp() && p.tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// How long entries live, from the agent's configuration.
#[inline(always)]
fn timeout_ns(proto: u8, flags: u16) -> u64 {
    match DP_CONFIG.get(0) {
        Some(c) => c.timeout_ns(proto, flags),
        None => DpConfig::defaults().timeout_ns(proto, flags),
    }
}

/// Looks up the entry of `key`, refreshes it for packet `p` and returns a
/// copy of it. An entry idle for longer than its state's timeout counts as
/// missing (expiry needs no sweep: the next packet of the tuple overwrites
/// it, and LRU eviction reclaims the rest).
#[inline(always)]
pub fn lookup(key: &CtKey, p: &Packet) -> Option<CtValue> {
    let e = DP_CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: LRU map values stay valid for the program run; concurrent
    // writers only touch last_seen/flags, where a lost update is harmless.
    unsafe {
        let now = bpf_ktime_get_ns();
        let idle = now.wrapping_sub((*e).last_seen_ns);
        if idle > timeout_ns(p.proto, (*e).flags) {
            return None;
        }
        if idle > REFRESH_NS {
            (*e).last_seen_ns = now;
        }
        if closes(p) && (*e).flags & CT_F_CLOSING == 0 {
            (*e).flags |= CT_F_CLOSING;
        }
        Some(*e)
    }
}

/// The original entry's key of a flow, from its reply entry.
#[inline(always)]
fn original_key(reply: &Packet, ct: &CtValue) -> CtKey {
    let (client, client_port) = if ct.flags & CT_F_SNAT != 0 {
        (ct.snat_addr, ct.snat_port)
    } else {
        (reply.daddr, reply.dport)
    };
    CtKey {
        saddr: client,
        daddr: ct.nat_addr,
        sport: client_port,
        dport: ct.nat_port,
        proto: reply.proto,
        _pad: [0; 3],
    }
}

/// Sets `flags` on the original entry of a flow, from one of its replies
/// (reply seen, closing).
#[inline(always)]
pub fn flag_original(reply: &Packet, ct: &CtValue, flags: u16) {
    if let Some(e) = DP_CONNTRACK.get_ptr_mut(original_key(reply, ct)) {
        // SAFETY: as in `lookup`.
        unsafe { (*e).flags |= flags };
    }
}

/// The key replies from `backend` to `addr:port` are tracked under.
#[inline(always)]
pub fn reply_key(backend: &Backend, proto: u8, addr: u32, port: u16) -> CtKey {
    CtKey {
        saddr: backend.addr,
        daddr: addr,
        sport: backend.port,
        dport: port,
        proto,
        _pad: [0; 3],
    }
}

/// Marks a reply entry as having seen a reply; returns whether it had not.
#[inline(always)]
pub fn first_reply(key: &CtKey) -> bool {
    match DP_CONNTRACK.get_ptr_mut(key) {
        // SAFETY: as in `lookup`.
        Some(e) => unsafe {
            let first = (*e).flags & CT_F_SEEN_REPLY == 0;
            (*e).flags |= CT_F_SEEN_REPLY;
            first
        },
        None => false,
    }
}

/// Inserts an entry; returns 1 when it was written over an existing one
/// (which evicts nothing: counted apart so that evictions, created -
/// replaced - present, can be told). New keys, the common case, cost one
/// insert and no lookup.
#[inline(always)]
fn insert_counting_replaced(key: &CtKey, value: &CtValue) -> Result<u64, i32> {
    const BPF_NOEXIST: u64 = 1;
    const EEXIST: i32 = 17;
    match DP_CONNTRACK.insert(key, value, BPF_NOEXIST) {
        Ok(()) => Ok(0),
        Err(e) if e == -EEXIST => DP_CONNTRACK.insert(key, value, 0).map(|()| 1),
        Err(e) => Err(e),
    }
}

/// Creates both entries of a new flow from client `p` (towards the VIP) to
/// `backend`, with the source translated to `snat` when given.
#[inline(always)]
pub fn create(p: &Packet, service_id: u32, backend: &Backend, snat: Option<(u32, u16)>) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let (snat_flag, (snat_addr, snat_port)) = match snat {
        Some(s) => (CT_F_SNAT, s),
        None => (0, (0, 0)),
    };
    let original = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags: CT_F_ORIGINAL | snat_flag,
        service_id,
        snat_addr,
        created_ns: now,
        last_seen_ns: now,
        snat_port,
        _pad: [0; 3],
    };
    let (reply_key, reply) = match snat {
        Some((node, port)) => (
            reply_key(backend, p.proto, node, port),
            CtValue {
                nat_addr: p.daddr,
                nat_port: p.dport,
                flags: CT_F_REPLY | CT_F_SNAT,
                snat_addr: p.saddr,
                snat_port: p.sport,
                ..original
            },
        ),
        None => (
            reply_key(backend, p.proto, p.saddr, p.sport),
            CtValue {
                nat_addr: p.daddr,
                nat_port: p.dport,
                flags: CT_F_REPLY,
                snat_addr: 0,
                snat_port: 0,
                ..original
            },
        ),
    };
    // Reply first: once the original exists, replies must translate.
    let replaced = insert_counting_replaced(&reply_key, &reply)? + insert_counting_replaced(&tuple(p), &original)?;
    crate::stats::add(counters::CT_CREATED, 2);
    if replaced != 0 {
        crate::stats::add(counters::CT_REPLACED, replaced);
    }
    Ok(())
}
