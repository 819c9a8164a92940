//! Connection tracking: two LRU entries per translated flow.
//!
//! The original entry, keyed by the client's tuple towards the VIP, records
//! the backend. The reply entry, keyed by the backend's tuple towards the
//! client, records the VIP. An established flow therefore keeps its backend
//! whatever happens to the service's backend set.

// Keys are passed to the map helpers by reference into the scratch entry:
// the by-value form clippy prefers would copy them onto the stack.
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use dataplane_common::{
    addr_eq, counters, kernel_features, Addr, Backend, CtEvent, CtKey, CtScratch, CtValue, DpConfig, ServiceValue,
    CT_F_CLOSING, CT_F_ORIGINAL, CT_F_REPLY, CT_F_SEEN_REPLY, CT_F_SNAT, SVC_F_AFFINITY, SVC_F_RANDOM,
};

use crate::{
    maps::{
        ct_migrating, kernel_has, new_flows_per_cpu, scratch, DP_CONFIG, DP_CONNTRACK, DP_CT_PREV, DP_CT_SYN, DP_GUARD,
    },
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Refresh `last_seen_ns` at most this often, so that established flows
/// do not write a shared cache line on every packet.
const REFRESH_NS: u64 = 1_000_000_000;

/// The clock of every timestamp in conntrack and affinity entries:
/// CLOCK_MONOTONIC as of the last timer tick (`bpf_ktime_get_coarse_ns`,
/// 5.11+). Timeouts are seconds and `last_seen_ns` is refreshed at most once
/// a second, so a tick's resolution (1-10 ms) changes nothing that matters,
/// and it is cheaper than `bpf_ktime_get_ns` (a clocksource read, the
/// hypervisor's on a VM): 10-20 ns less per tracked packet here. It lags
/// the agent's CLOCK_MONOTONIC (`inspect::monotonic_ns`), never leads it;
/// ages are computed with saturating subtractions so that a timestamp a
/// tick ahead (written by a program using the precise clock, before an
/// upgrade) counts as fresh, not as expired. Kernels before 5.11 lack the
/// coarse helper: there the precise one is read (same clock).
///
/// For the programs of XDP and TC (softirq: one run per CPU at a time), see
/// [`now_ns`], which reads this once per tick. The socket programs
/// (process context, which a softirq may interrupt) read it directly.
#[inline(always)]
pub fn clock_ns() -> u64 {
    // SAFETY: helpers without preconditions.
    unsafe {
        if kernel_has(kernel_features::COARSE_CLOCK) {
            bpf_ktime_get_coarse_ns()
        } else {
            bpf_ktime_get_ns()
        }
    }
}

/// [`clock_ns`] read at most once per jiffy on this CPU: the value is kept
/// in the scratch entry of this CPU with the jiffy it was read in
/// (`bpf_jiffies64`, which the verifier turns into a load of `jiffies_64`
/// on 64-bit JITs: no call), and reused while the jiffy lasts. The coarse
/// clock and `jiffies_64` both move at the timer tick, jiffies first (the
/// timekeeper is updated just after): a reading taken between the two is
/// the previous tick's and is kept until the next jiffy, a tick late at
/// most. So the value lags the clock by at most one more tick, never leads
/// it, as [`clock_ns`] itself. Saves the clock helper call (a call and
/// return, two with its callee) on every tracked packet but the first of
/// each tick.
#[inline(always)]
pub fn now_ns_in(s: *mut CtScratch) -> u64 {
    // SAFETY: a helper without preconditions; this CPU's scratch entry,
    // not shared with a concurrent run (XDP and TC: softirq).
    unsafe {
        let jiffies = bpf_jiffies64();
        if (*s).clock_jiffies == jiffies {
            return (*s).clock_ns;
        }
        let now = clock_ns();
        (*s).clock_jiffies = jiffies;
        (*s).clock_ns = now;
        now
    }
}

/// [`now_ns_in`] with this CPU's scratch entry ([`clock_ns`] without it).
#[inline(always)]
pub fn now_ns() -> u64 {
    match scratch() {
        Some(s) => now_ns_in(s),
        None => clock_ns(),
    }
}

/// Writes a key into this CPU's scratch entry and returns it. Keys and
/// values live there, not on the stack (see `CtScratch`); each use fills
/// the key it needs right before its map call.
#[inline(always)]
fn key_of(saddr: &Addr, daddr: &Addr, sport: u16, dport: u16, p: &Packet) -> Option<*mut CtKey> {
    Some(fill_key(scratch()?, saddr, daddr, sport, dport, p))
}

/// [`key_of`] with this CPU's scratch entry `s`.
#[inline(always)]
fn fill_key(s: *mut CtScratch, saddr: &Addr, daddr: &Addr, sport: u16, dport: u16, p: &Packet) -> *mut CtKey {
    // SAFETY: this CPU's scratch entry, not shared with a concurrent run.
    unsafe {
        let k = &mut (*s).key;
        k.saddr = *saddr;
        k.daddr = *daddr;
        k.sport = sport;
        k.dport = dport;
        k.proto = p.proto;
        k.family = p.family;
        k._pad = 0;
        k
    }
}

#[inline(always)]
pub fn closes(p: &Packet) -> bool {
    p.is_tcp() && p.tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// The entry of `key`. While conntrack migrates to a map of another size
/// (`ct_migrating`), an entry missing from the new map is looked up in the
/// old one, where the old programs, still attached to some interfaces,
/// keep writing until their links are swapped.
#[inline(always)]
pub fn entry(key: &CtKey) -> Option<*mut CtValue> {
    match DP_CONNTRACK.get_ptr_mut(key) {
        Some(e) => Some(e),
        None if ct_migrating() => DP_CT_PREV.get_ptr_mut(key),
        None => None,
    }
}

/// Removes the entry of `key` (from both maps while migrating).
#[inline(always)]
fn remove(key: &CtKey) {
    let _ = DP_CONNTRACK.remove(key);
    if ct_migrating() {
        let _ = DP_CT_PREV.remove(key);
    }
}

/// How long entries live, from the agent's configuration.
#[inline(always)]
fn timeout_ns(proto: u8, flags: u16) -> u64 {
    match DP_CONFIG.get(0) {
        Some(c) => c.timeout_ns(proto, flags),
        None => DpConfig::defaults().timeout_ns(proto, flags),
    }
}

/// Looks up the entry of `p`'s own tuple, refreshes it for `p` and returns
/// it (in the map: read what is needed, do not keep it beyond this run).
/// An entry idle for longer than its state's timeout counts as missing
/// (expiry needs no sweep: the next packet of the tuple overwrites it, and
/// LRU eviction reclaims the rest).
#[inline(always)]
pub fn lookup(p: &Packet) -> Option<*mut CtValue> {
    let s = scratch()?;
    let key = fill_key(s, &p.saddr, &p.daddr, p.sport, p.dport, p);
    // SAFETY: the key was just written to the scratch entry.
    let e = entry(unsafe { &*key })?;
    // SAFETY: LRU map values stay valid for the program run; concurrent
    // writers only touch last_seen (a lost refresh is harmless) and the
    // state (see `set_state`).
    unsafe {
        let now = now_ns_in(s);
        let idle = now.saturating_sub((*e).last_seen_ns);
        let state = (*e).state();
        if idle > timeout_ns(p.proto, state) {
            return None;
        }
        if idle > REFRESH_NS {
            (*e).last_seen_ns = now;
        }
        if closes(p) && state & CT_F_CLOSING == 0 {
            set_state(e, CT_F_CLOSING);
        }
    }
    Some(e)
}

/// Sets `flags` on the original entry of a flow, from one of its replies
/// (reply seen, closing).
#[inline(always)]
pub fn flag_original(reply: &Packet, ct: &CtValue, flags: u16) {
    let (client, client_port) = if ct.flags & CT_F_SNAT != 0 {
        (&ct.snat_addr, ct.snat_port)
    } else {
        (&reply.daddr, reply.dport)
    };
    let Some(key) = key_of(client, &ct.nat_addr, client_port, ct.nat_port, reply) else {
        return;
    };
    // SAFETY: the key was just written to the scratch entry.
    if let Some(e) = entry(unsafe { &*key }) {
        set_state(e, flags);
    }
}

/// Sets `flags` on the reply entry of a flow, from one of its packets in
/// the original direction (closing).
#[inline(never)]
pub fn flag_reply(orig: &Packet, ct: &CtValue, flags: u16) {
    let (client, client_port) = if ct.flags & CT_F_SNAT != 0 {
        (&ct.snat_addr, ct.snat_port)
    } else {
        (&orig.saddr, orig.sport)
    };
    let Some(key) = key_of(&ct.nat_addr, client, ct.nat_port, client_port, orig) else {
        return;
    };
    // SAFETY: the key was just written to the scratch entry.
    if let Some(e) = entry(unsafe { &*key }) {
        set_state(e, flags);
    }
}

/// Whether replies from `backend` to `addr:port` (a candidate SNAT source)
/// belong to another flow that is still live. The entry of a flow that
/// closed or expired leaves the tuple free (as for
/// [`held_by_another_flow`], and as netfilter's NAT passes over expired
/// entries): a client reusing one source port for connection after
/// connection, and the UDP flows that never close, must not run out of
/// candidates while their entries wait for eviction (conntrack has no
/// sweep). The flow that expired finds its own entry expired too when it
/// comes back ([`lookup`]) and is a new flow then.
///
/// `expiry`: the cut-offs of all candidates ([`SnatExpiry::now`]).
#[inline(always)]
pub fn reply_tuple_in_use(p: &Packet, backend: &Backend, addr: &Addr, port: u16, expiry: &SnatExpiry) -> bool {
    let Some(key) = key_of(&backend.addr, addr, backend.port, port, p) else {
        return true;
    };
    // SAFETY: the key was just written to the scratch entry; the value is
    // an LRU value, valid for this run.
    // (A conntrack entry that is closing or expired may sit on a tuple a
    // flow without state holds in the guard's table.)
    match entry(unsafe { &*key }) {
        Some(e) if expiry.live(unsafe { &*e }) => true,
        _ => expiry.guard_holds(unsafe { &*key }),
    }
}

/// Liveness of the entries met while SNAT source ports are tried, decided
/// without a branch per timeout: the oldest `last_seen_ns` a flow not
/// closing may have and still be live, without and with a reply seen,
/// computed once before the candidates. (The timeouts' branches and the
/// configuration's lookup in the candidate loop, [`live`] there,
/// multiplied the paths the verifier walks: `dp_xdp` 159,000 -> 391,000
/// on 6.18.)
pub struct SnatExpiry {
    unreplied_since: u64,
    replied_since: u64,
}

impl SnatExpiry {
    /// The cut-offs for entries of protocol `proto`, now.
    #[inline(always)]
    pub fn now(proto: u8) -> Option<SnatExpiry> {
        let config = DP_CONFIG.get(0)?;
        let now = now_ns();
        Some(SnatExpiry {
            unreplied_since: now.saturating_sub(config.timeout_ns(proto, 0)),
            replied_since: now.saturating_sub(config.timeout_ns(proto, CT_F_SEEN_REPLY)),
        })
    }

    /// Whether the flood guard's table has a live entry at `key` (a flow
    /// served without state, within its protocol's timeout before a
    /// reply: see [`embryonic_gated`]): its port is taken too, or a flow
    /// given that port would take the other's answers (conntrack is asked
    /// first) or, without state too, overwrite its entry.
    #[inline(always)]
    fn guard_holds(&self, key: &CtKey) -> bool {
        new_flows_per_cpu() != 0
            && DP_CT_SYN
                .get_ptr(key)
                // SAFETY: an LRU value, valid for this run.
                .is_some_and(|e| unsafe { (*e).last_seen_ns } >= self.unreplied_since)
    }

    /// [`live`] by the cut-offs: the one of the entry's state chosen by a
    /// mask; a timestamp ahead of the clock is live, as there.
    #[inline(always)]
    fn live(&self, e: &CtValue) -> bool {
        let state = e.state();
        let seen = ((state & CT_F_SEEN_REPLY) >> 3) as u64;
        let since = self.unreplied_since ^ ((self.unreplied_since ^ self.replied_since) & 0u64.wrapping_sub(seen));
        state & CT_F_CLOSING == 0 && e.last_seen_ns >= since
    }
}

/// Whether an entry's flow is neither closing nor expired.
#[inline(always)]
fn live(e: &CtValue, proto: u8) -> bool {
    let idle = now_ns().saturating_sub(e.last_seen_ns);
    let state = e.state();
    state & CT_F_CLOSING == 0 && idle <= timeout_ns(proto, state)
}

/// Marks a reply entry as having seen a reply; returns whether it had not.
#[inline(always)]
pub fn first_reply(e: *mut CtValue) -> bool {
    // SAFETY: an entry returned by `lookup` in this run.
    let first = unsafe { (*e).state() } & CT_F_SEEN_REPLY == 0;
    set_state(e, CT_F_SEEN_REPLY);
    first
}

/// Sets state bits (`CT_F_SEEN_REPLY`, `CT_F_CLOSING`) of an entry that
/// other CPUs may update at the same time. Each bit has a byte of its own,
/// set with a one-byte store: no read-modify-write, so no CPU can undo
/// another's update (a lost `SEEN_REPLY` would leave an established flow
/// on the short SYN timeout). The `flags` bits are set too, for the
/// programs and agents of releases up to 0.2, which read only them; a lost
/// update there loses nothing the bytes do not keep.
#[inline(always)]
pub fn set_state(e: *mut CtValue, flags: u16) {
    // SAFETY: an LRU map value, valid for this program run.
    unsafe {
        if flags & CT_F_SEEN_REPLY != 0 {
            core::ptr::write_volatile(&mut (*e).seen_reply, 1);
        }
        if flags & CT_F_CLOSING != 0 {
            core::ptr::write_volatile(&mut (*e).closing, 1);
        }
        (*e).flags |= flags;
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
    let replaced = match DP_CONNTRACK.insert(key, value, BPF_NOEXIST) {
        Ok(()) => Ok(0),
        Err(e) if e == -EEXIST => DP_CONNTRACK.insert(key, value, 0).map(|()| 1),
        Err(e) => Err(e),
    };
    // While migrating, the old programs must see the new flows too.
    if ct_migrating() && replaced.is_ok() {
        let _ = DP_CT_PREV.insert(key, value, 0);
    }
    replaced
}

/// What [`create`] returns when the new flow's reply tuple belongs to
/// another live flow: nothing was written; the caller picks another source
/// port and tries again.
pub const CLASH: i32 = i32::MIN;

/// What [`create`] leaves in the scratch entry's `stateless` when the reply
/// tuple of a new flow served without state is held by another such flow
/// in the flood guard's table: nothing was written, and the packet must
/// not go out translated (the answers would go to the other flow's
/// client).
const HELD: u8 = 2;

/// Whether the entry at the reply key of a new flow belongs to another flow
/// that is still live: replies must keep going to it. An entry of the same
/// flow (its original entry was evicted) or of a flow that closed or
/// expired may be written over.
#[inline(always)]
fn held_by_another_flow(existing: &CtValue, new: &CtValue, proto: u8) -> bool {
    live(existing, proto) && !same_flow(existing, new)
}

/// Whether two reply entries translate alike: the same flow's.
#[inline(always)]
fn same_flow(a: &CtValue, b: &CtValue) -> bool {
    a.nat_port == b.nat_port
        && addr_eq(&a.nat_addr, &b.nat_addr)
        && a.flags & CT_F_SNAT == b.flags & CT_F_SNAT
        && a.snat_port == b.snat_port
        && addr_eq(&a.snat_addr, &b.snat_addr)
}

/// [`insert_counting_replaced`] for the reply entry of a new flow: an
/// existing entry is written over only when no other live flow holds it
/// ([`CLASH`] otherwise, nothing written).
#[inline(always)]
fn insert_reply(key: &CtKey, value: &CtValue, proto: u8) -> Result<u64, i32> {
    const BPF_NOEXIST: u64 = 1;
    const EEXIST: i32 = 17;
    let replaced = match DP_CONNTRACK.insert(key, value, BPF_NOEXIST) {
        Ok(()) => 0,
        Err(e) if e == -EEXIST => {
            if let Some(old) = DP_CONNTRACK.get_ptr(key) {
                // SAFETY: an LRU value, valid for this run.
                if held_by_another_flow(unsafe { &*old }, value, proto) {
                    return Err(CLASH);
                }
            }
            DP_CONNTRACK.insert(key, value, 0)?;
            1
        }
        Err(e) => return Err(e),
    };
    // While migrating, the old programs must see the new flows too.
    if ct_migrating() {
        let _ = DP_CT_PREV.insert(key, value, 0);
    }
    Ok(replaced)
}

/// Writes the reply entry of a new flow from client `p` to `backend`
/// (SNATed to `snat` when given) into `key` and `v`: the backend's tuple
/// towards the client, and the VIP to translate its replies back to.
#[inline(always)]
fn fill_reply(
    key: &mut CtKey,
    v: &mut CtValue,
    p: &Packet,
    svc: &ServiceValue,
    backend: &Backend,
    snat: Option<&(Addr, u16)>,
    now: u64,
) {
    key.saddr = backend.addr;
    key.daddr = p.saddr;
    key.sport = backend.port;
    key.dport = p.sport;
    key.proto = p.proto;
    key.family = p.family;
    key._pad = 0;
    v.nat_addr = p.daddr;
    v.nat_port = p.dport;
    v.flags = CT_F_REPLY;
    v.service_id = svc.service_id;
    v.epoch = svc.epoch as u16;
    v.snat_port = 0;
    v.created_ns = now;
    v.last_seen_ns = now;
    // Zeroed with volatile stores: LLVM merges plain zero stores of these
    // arrays into `memset` calls, a byte-by-byte loop on BPF.
    // SAFETY: fields of this CPU's scratch value.
    unsafe {
        for w in v.snat_addr.iter_mut() {
            core::ptr::write_volatile(w, 0);
        }
        core::ptr::write_volatile(&mut v.seen_reply, 0);
        core::ptr::write_volatile(&mut v.closing, 0);
        core::ptr::write_volatile(&mut v._pad, 0);
    }
    if let Some((node, port)) = snat {
        key.daddr = *node;
        key.dport = *port;
        v.flags |= CT_F_SNAT;
        v.snat_addr = p.saddr;
        v.snat_port = p.sport;
    }
}

/// Creates both entries of a new flow from client `p` (towards the VIP) to
/// `backend`, with the source translated to `snat` when given. The key and
/// value are built in the scratch entry and changed in place between the
/// two inserts. Never writes over the reply entry of another live flow:
/// returns [`CLASH`] instead, having written nothing.
///
/// The flood guard: when `p` starts a TCP flow (a SYN) or is a UDP
/// datagram of an untracked tuple beyond this CPU's quota of new flows
/// with state this second, and the flow's backend follows from its tuple
/// alone (Maglev, no session affinity, so that the packet that later
/// creates its state picks the same one), only the reply entry is
/// written, to `DP_CT_SYN`; the flow gets its state from the client's
/// next packet: a TCP flow's ACK (not a SYN: never held back), a UDP
/// flow's next datagram once a reply was seen (the two-way traffic a
/// spoofed source never has; before that its datagrams go on without
/// state, each to the same backend). [`flood_check`] decides, earlier on the
/// new-flow path, and leaves the answer in the scratch entry: a branch of
/// the caller's here would have the verifier walk what follows twice.
#[inline(never)]
pub fn create(p: &Packet, svc: &ServiceValue, backend: &Backend, snat: Option<&(Addr, u16)>) -> Result<(), i32> {
    let s = scratch().ok_or(-1)?;
    let now = now_ns_in(s);
    // SAFETY: this CPU's scratch entry, not shared with a concurrent run.
    let (key, v) = unsafe { (&mut (*s).key, &mut (*s).value) };
    // The reply entry first: once the original exists, replies must
    // translate.
    // Before the reply entry exists: its replies must find the filter's bit.
    crate::maps::note_backend(&backend.addr);
    fill_reply(key, v, p, svc, backend, snat, now);
    // SAFETY: as above.
    if unsafe { (*s).stateless } != 0 {
        if !opens(p) && answered_without_state(key) {
            // The flow proved itself (a TCP handshake's ACK after the
            // SYN-ACK, a UDP datagram or a TCP segment after an answer):
            // it gets its state, also when its reply tuple clashes and
            // `create` runs again with another source port.
            // SAFETY: as above.
            unsafe { (*s).stateless = 0 };
        } else {
            if insert_without_state(key, v, p.proto) {
                // SAFETY: as above.
                unsafe { (*s).stateless = HELD };
                return Ok(());
            }
            if !opens(p) {
                note_without_state(now);
            }
            crate::stats::ct_event(CtEvent::StatelessNewFlow);
            return Ok(());
        }
    }
    let mut replaced = insert_reply(key, v, p.proto)?;

    key.saddr = p.saddr;
    key.daddr = p.daddr;
    key.sport = p.sport;
    key.dport = p.dport;
    v.nat_addr = backend.addr;
    v.nat_port = backend.port;
    v.flags = CT_F_ORIGINAL;
    if let Some((node, port)) = snat {
        v.flags |= CT_F_SNAT;
        v.snat_addr = *node;
        v.snat_port = *port;
    }
    replaced += insert_counting_replaced(key, v)?;
    crate::stats::add(counters::CT_CREATED, 2);
    if replaced != 0 {
        crate::stats::add(counters::CT_REPLACED, replaced);
    }
    Ok(())
}

/// The flood guard: whether this CPU may give conntrack state to one more
/// new flow in the current second (`dataplane_common::NEW_FLOWS_GLOBAL`).
/// The count lives in this CPU's scratch entry; a window is one second of
/// the coarse clock.
#[inline(always)]
fn admit_new_flow() -> bool {
    let limit = new_flows_per_cpu();
    if limit == 0 {
        return true;
    }
    let Some(s) = scratch() else {
        return true;
    };
    let now = now_ns_in(s);
    // SAFETY: this CPU's scratch entry, not shared with a concurrent run.
    unsafe {
        if now.saturating_sub((*s).flood_window_ns) >= 1_000_000_000 {
            (*s).flood_window_ns = now;
            (*s).flood_count = 0;
        }
        if (*s).flood_count >= limit {
            return false;
        }
        (*s).flood_count += 1;
    }
    true
}

/// Decides whether the new flow of `p` goes without state (see
/// [`create`]) and leaves the answer in this CPU's scratch entry, where
/// `create` reads it. (Not an argument: the verifier then sees one path
/// into `create`, not two.)
///
/// `untracked`: the tuple has no entry. A SYN that finds one (a closed or
/// stale flow, port reuse) always gets state: it replaces that entry in
/// place, which takes no room from other flows, and were it served without
/// state its next packet would find the old entry and follow the old
/// flow's backend, not the one its SYN went to.
#[inline(never)]
pub fn flood_check(p: &Packet, svc: &ServiceValue, untracked: bool) {
    let stateless = untracked
        && (p.is_udp() || p.is_tcp())
        && svc.flags & (SVC_F_AFFINITY | SVC_F_RANDOM) == 0
        && svc.maglev_size != 0
        && !admit_new_flow();
    if let Some(s) = scratch() {
        // SAFETY: this CPU's scratch entry, not shared with a concurrent run.
        unsafe { (*s).stateless = stateless as u8 };
    }
}

/// Writes the flood guard's reply entry of a flow served without state;
/// true (nothing written) when the entry there is another flow's,
/// written within its protocol's timeout before a reply (see
/// [`embryonic_gated`]): its answers must not go to this flow's client, nor
/// this flow's to the other's. A SNATed flow's port was chosen free of
/// such entries ([`SnatExpiry::guard_holds`]), so this is one client port
/// to two frontends that share a backend, or two CPUs racing for a port.
/// ([`create`] then leaves [`HELD`] in the scratch entry and the caller
/// drops the packet. Moving the flow to another port, as a conntrack
/// clash does, or an error returned, made the verifier walk the rest of
/// the new-flow path again for every flow without state: about +30,000
/// instructions per program.)
#[inline(always)]
fn insert_without_state(key: &CtKey, value: &CtValue, proto: u8) -> bool {
    const BPF_NOEXIST: u64 = 1;
    const EEXIST: i32 = 17;
    match DP_CT_SYN.insert(key, value, BPF_NOEXIST) {
        Err(e) if e == -EEXIST => {
            if let (Some(old), Some(c)) = (DP_CT_SYN.get_ptr(key), DP_CONFIG.get(0)) {
                // SAFETY: an LRU value, valid for this run.
                let old = unsafe { &*old };
                // The timeout before a reply, chosen by a mask (a branch
                // per protocol would double the paths the verifier walks
                // from here; an agent always writes non-zero timeouts).
                let tcp = 0u64.wrapping_sub((proto == dataplane_common::IPPROTO_TCP) as u64);
                let timeout = c.udp_timeout_ns ^ ((c.udp_timeout_ns ^ c.tcp_syn_timeout_ns) & tcp);
                let live = value.last_seen_ns.wrapping_sub(old.last_seen_ns) <= timeout;
                if live && !same_flow(old, value) {
                    return true;
                }
            }
            let _ = DP_CT_SYN.insert(key, value, 0);
            false
        }
        _ => false,
    }
}

/// Whether the last [`create`] on this CPU found the reply tuple of its
/// flow without state held by another such flow ([`HELD`]).
#[inline(always)]
pub fn held_without_state() -> bool {
    // SAFETY: this CPU's scratch entry, not shared with a concurrent run.
    scratch().is_some_and(|s| unsafe { (*s).stateless } == HELD)
}

/// Whether the flood guard's reply entry at `key` (a UDP flow served
/// without state) has seen a reply.
#[inline(always)]
fn answered_without_state(key: &CtKey) -> bool {
    DP_CT_SYN
        .get_ptr(key)
        // SAFETY: an LRU value, valid for this run.
        .is_some_and(|e| unsafe { (*e).state() } & CT_F_SEEN_REPLY != 0)
}

/// A TCP SYN (without ACK): the first packet of a TCP flow, whose answer
/// (a SYN-ACK) the flood guard's entry is always looked up for.
#[inline(always)]
fn opens(p: &Packet) -> bool {
    p.is_tcp() && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Records that a packet other than a SYN (a UDP datagram, a TCP segment
/// of a flow conntrack does not know) was served without state now (at
/// most once a second: a flood writes the shared entry rarely).
#[inline(always)]
fn note_without_state(now: u64) {
    if let Some(t) = DP_GUARD.get_ptr_mut(0) {
        // SAFETY: the map's only entry; a lost update between CPUs writes
        // a time a few ns apart.
        unsafe {
            if now.saturating_sub(*t) >= 1_000_000_000 {
                *t = now;
            }
        }
    }
}

/// The flood guard's reply entry for a UDP datagram or a TCP segment
/// other than a SYN-ACK `p` that matches no flow in conntrack: the
/// backend answering a datagram or segment served without state. Looked
/// up only while the guard served such packets without state within
/// their protocol's timeout before a reply and the second
/// [`note_without_state`] may lag (otherwise one array read), and only
/// an entry written within that timeout counts: an entry of the guard
/// lives for its protocol's timeout before a reply (`--ct-udp-timeout`,
/// `--ct-tcp-syn-timeout`), answered or not (the flow's next packet after
/// an answer gets state), and SNAT port selection takes its port again
/// after that ([`SnatExpiry::guard_holds`]).
#[inline(always)]
pub fn embryonic_gated(p: &Packet) -> Option<*mut CtValue> {
    let last = *DP_GUARD.get(0)?;
    if last == 0 {
        return None;
    }
    let timeout = timeout_ns(p.proto, 0);
    let now = now_ns();
    if now.saturating_sub(last) > timeout.saturating_add(1_000_000_000) {
        return None;
    }
    let e = embryonic(p)?;
    // SAFETY: an LRU value, valid for this run.
    (now.saturating_sub(unsafe { (*e).last_seen_ns }) <= timeout).then_some(e)
}

/// The flood guard's reply entry for `p` (a SYN-ACK), if any.
#[inline(always)]
pub fn embryonic(p: &Packet) -> Option<*mut CtValue> {
    let key = key_of(&p.saddr, &p.daddr, p.sport, p.dport, p)?;
    // SAFETY: the key was just written to the scratch entry.
    DP_CT_SYN.get_ptr_mut(unsafe { &*key })
}

/// A TCP SYN of a flow the datapath does not translate (a client talking to
/// a backend directly, or through the socket-level programs) whose reply
/// tuple is the reply tuple of a translated flow that is closing: that
/// flow is over and its tuple is taken by this one (the backend cannot tell
/// the two apart), so both of its entries go. Otherwise this flow's
/// SYN-ACK would match the old reply entry and reach the client rewritten
/// to the old flow's VIP. Entries that are not closing are kept: the same
/// SYN may be a translated flow's own (XDP and TC on one interface see it
/// twice, translated the second time).
#[inline(always)]
pub fn remove_closing_reply(p: &Packet) {
    let Some(key) = key_of(&p.daddr, &p.saddr, p.dport, p.sport, p) else {
        return;
    };
    // SAFETY: the key was just written to the scratch entry.
    let Some(e) = entry(unsafe { &*key }) else {
        return;
    };
    // SAFETY: an LRU value, valid for this run; read before the scratch
    // key is rewritten below.
    let (flags, vip, vport, client, cport) = unsafe {
        (
            (*e).state(),
            (*e).nat_addr,
            (*e).nat_port,
            (*e).snat_addr,
            (*e).snat_port,
        )
    };
    if flags & (CT_F_REPLY | CT_F_CLOSING) != CT_F_REPLY | CT_F_CLOSING {
        return;
    }
    // SAFETY: as above.
    remove(unsafe { &*key });
    // The original entry: client -> VIP (the client is the SNATed source
    // when the flow was SNATed, else this SYN's own source).
    let (client, cport) = if flags & CT_F_SNAT != 0 {
        (client, cport)
    } else {
        (p.saddr, p.sport)
    };
    if let Some(key) = key_of(&client, &vip, cport, vport, p) {
        // SAFETY: as above.
        remove(unsafe { &*key });
    }
}
