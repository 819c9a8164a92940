//! Socket-level load balancing: cgroup sock_addr programs that translate a
//! Service frontend to a backend when a socket connects to it (TCP, connected
//! UDP) or sends a datagram to it (unconnected UDP), and show the frontend
//! again where the application would see the backend (getpeername, the
//! source address of received datagrams). The connection then runs between
//! the client and the backend directly: no packet of it needs translating,
//! and the per-packet programs find no Service in it.
//!
//! These programs run in process context, on behalf of the socket's owner:
//! they may be interrupted by the packet programs on the same CPU, so they
//! build keys on their own (small) stack rather than in the per-CPU scratch
//! entry, and add to shared counters atomically.
//!
//! What they leave to the per-packet path, untouched: frontends with
//! loadBalancerSourceRanges (the source address is not known when a socket
//! connects) and frontends whose Local traffic policy left no local
//! endpoint (kube-proxy drops those; the packet path does too).

use core::{
    intrinsics::{atomic_xadd, AtomicOrdering},
    mem::{size_of, MaybeUninit},
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use dataplane_common::{
    kernel_features, Addr, AffinityValue, Backend, BackendKey, DpConfig, ServiceKey, ServiceValue, SockAffinityKey,
    SockEvent, SockNatKey, SockNatValue, FAMILY_V4, FAMILY_V6, IPPROTO_TCP, IPPROTO_UDP, KEY_IN_CLUSTER,
    SOCK_F_SEEN_REPLY, SOCK_NAT_FORWARD, SOCK_NAT_REVERSE, SVC_F_AFFINITY, SVC_F_DROP_NO_LOCAL, SVC_F_IN_CLUSTER_VIEW,
    SVC_F_SOURCE_RANGES,
};

use crate::{
    conntrack::clock_ns,
    maps::{kernel_has, DP_BACKENDS, DP_CONFIG, DP_SERVICES, DP_SOCK_AFFIN, DP_SOCK_NAT, DP_SOCK_STATS, DP_SVC_STATS},
};

/// A stack value written as 64-bit words with volatile stores.
///
/// The eBPF stack must be accessed at aligned offsets, and this crate is
/// built with `allows-misaligned-mem-access` (for packet data): LLVM then
/// merges neighbouring 4-byte stores of a key into 8-byte stores at 4-byte
/// offsets, which the verifier rejects on the stack. Keys and values of the
/// socket programs are therefore built word by word here, 8-aligned, and
/// map values are read field by field, never copied onto the stack.
#[repr(C, align(8))]
struct Words<const N: usize>([u64; N]);

impl<const N: usize> Words<N> {
    #[inline(always)]
    fn new(w: [u64; N]) -> Self {
        let mut out = MaybeUninit::<Self>::uninit();
        let p = out.as_mut_ptr() as *mut u64;
        let mut i = 0;
        while i < N {
            // SAFETY: within `out`, 8-aligned.
            unsafe { write_volatile(p.add(i), w[i]) };
            i += 1;
        }
        // SAFETY: every word was written.
        unsafe { out.assume_init() }
    }

    /// The words as a `T` (no larger than them).
    #[inline(always)]
    fn as_ref<T>(&self) -> &T {
        const { assert!(size_of::<T>() <= 8 * N) };
        // SAFETY: size checked above; alignment 8 covers every key and
        // value here; every T used is plain data valid for any bytes.
        unsafe { &*(self as *const Self as *const T) }
    }
}

#[inline(always)]
fn pair(lo: u32, hi: u32) -> u64 {
    lo as u64 | (hi as u64) << 32
}

/// A `ServiceKey` (little-endian layout: addr, then port, proto, family).
#[inline(always)]
fn service_key(addr: &Addr, port: u16, proto: u8, family: u8) -> Words<3> {
    Words::new([
        pair(addr[0], addr[1]),
        pair(addr[2], addr[3]),
        port as u64 | (proto as u64) << 16 | (family as u64) << 24,
    ])
}

/// A `SockNatKey`.
#[inline(always)]
fn nat_key(cookie: u64, addr: &Addr, port: u16, family: u8, dir: u8) -> Words<4> {
    Words::new([
        cookie,
        pair(addr[0], addr[1]),
        pair(addr[2], addr[3]),
        port as u64 | (family as u64) << 16 | (dir as u64) << 24,
    ])
}

/// A `SockNatValue`.
#[inline(always)]
fn nat_value(addr: &Addr, port: u16, flags: u16, service_id: u32, now: u64) -> Words<4> {
    Words::new([
        pair(addr[0], addr[1]),
        pair(addr[2], addr[3]),
        port as u64 | (flags as u64) << 16 | (service_id as u64) << 32,
        now,
    ])
}

/// A `SockAffinityKey`.
#[inline(always)]
fn affinity_key(netns_cookie: u64, service_id: u32) -> Words<2> {
    Words::new([netns_cookie, service_id as u64])
}

/// An `AffinityValue` for `backend`.
#[inline(always)]
fn affinity_value(b: &Chosen, now: u64) -> Words<4> {
    Words::new([
        pair(b.addr[0], b.addr[1]),
        pair(b.addr[2], b.addr[3]),
        b.port as u64 | (b.flags as u64) << 16,
        now,
    ])
}

const _: () = {
    assert!(size_of::<ServiceKey>() == 20);
    assert!(size_of::<SockNatKey>() == 32 && size_of::<SockNatValue>() == 32);
    assert!(size_of::<SockAffinityKey>() == 16 && size_of::<AffinityValue>() == 32);
};

/// Let the call go on (with the address as the program left it).
const ALLOW: i32 = 1;
/// Fail the call: with the error set by `bpf_set_retval`, else EPERM.
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;
const NS_PER_S: u64 = 1_000_000_000;
/// Refresh `last_seen_ns` of a forward entry at most this often.
const REFRESH_NS: u64 = NS_PER_S;

/// An address as a sock_addr context carries it.
#[derive(Clone, Copy)]
struct SockAddr {
    addr: Addr,
    /// Network byte order.
    port: u16,
    family: u8,
    /// An IPv4 address the IPv6 API carried as `::ffff:a.b.c.d`.
    mapped: bool,
}

/// The `::ffff:0:0/96` prefix's third word, in network byte order.
const V4_MAPPED: u32 = 0xffffu32.to_be();

/// The user address of the context (the destination of connect/sendmsg,
/// the peer of getpeername, the source of recvmsg).
#[inline(always)]
fn read_addr(sa: *mut bpf_sock_addr, v6: bool) -> SockAddr {
    // SAFETY: `sa` is the program's context; the verifier checks these
    // fixed-offset 4-byte loads. Volatile so that LLVM keeps them 4-byte
    // loads of the fields themselves.
    unsafe {
        let port = read_volatile(&raw const (*sa).user_port) as u16;
        if !v6 {
            let a = read_volatile(&raw const (*sa).user_ip4);
            return SockAddr {
                addr: [a, 0, 0, 0],
                port,
                family: FAMILY_V4,
                mapped: false,
            };
        }
        let w = [
            read_volatile(&raw const (*sa).user_ip6[0]),
            read_volatile(&raw const (*sa).user_ip6[1]),
            read_volatile(&raw const (*sa).user_ip6[2]),
            read_volatile(&raw const (*sa).user_ip6[3]),
        ];
        if w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED {
            SockAddr {
                addr: [w[3], 0, 0, 0],
                port,
                family: FAMILY_V4,
                mapped: true,
            }
        } else {
            SockAddr {
                addr: w,
                port,
                family: FAMILY_V6,
                mapped: false,
            }
        }
    }
}

/// Replaces the user address of the context with `addr`:`port` (of the
/// family `to` was read as).
#[inline(always)]
fn write_addr(sa: *mut bpf_sock_addr, v6: bool, to: &SockAddr, addr: &Addr, port: u16) {
    // SAFETY: as in `read_addr`, 4-byte stores the verifier allows for
    // these hooks.
    unsafe {
        if !v6 {
            write_volatile(&raw mut (*sa).user_ip4, addr[0]);
        } else {
            let w = if to.mapped { [0, 0, V4_MAPPED, addr[0]] } else { *addr };
            write_volatile(&raw mut (*sa).user_ip6[0], w[0]);
            write_volatile(&raw mut (*sa).user_ip6[1], w[1]);
            write_volatile(&raw mut (*sa).user_ip6[2], w[2]);
            write_volatile(&raw mut (*sa).user_ip6[3], w[3]);
        }
        write_volatile(&raw mut (*sa).user_port, port as u32);
    }
}

#[inline(always)]
fn protocol(sa: *mut bpf_sock_addr) -> u32 {
    // SAFETY: as in `read_addr`.
    unsafe { read_volatile(&raw const (*sa).protocol) }
}

/// Adds `n` to a counter other CPUs' programs do not write, but packet
/// programs of this CPU may interrupt us on: one atomic add.
#[inline(always)]
fn add(p: *mut u64, n: u64) {
    // SAFETY: `p` points into a map value that stays valid for this run.
    // (`AtomicU64::fetch_add` does not exist for the bpf target; LLVM
    // lowers this to one BPF atomic add.)
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n) };
}

#[inline(always)]
fn count(e: SockEvent) {
    if let Some(c) = DP_SOCK_STATS.get_ptr_mut(e as u32) {
        add(c, 1);
    }
}

#[inline(always)]
fn count_new_flow(service_id: u32) {
    if let Some(s) = DP_SVC_STATS.get_ptr_mut(service_id) {
        // SAFETY: a field of this CPU's value, valid for this run.
        add(unsafe { &raw mut (*s).new_flows }, 1);
    }
}

#[inline(always)]
fn count_no_backend(service_id: u32) {
    if let Some(s) = DP_SVC_STATS.get_ptr_mut(service_id) {
        // SAFETY: as above.
        add(unsafe { &raw mut (*s).no_backend }, 1);
    }
}

/// A backend, read field by field out of its map value.
#[derive(Clone, Copy)]
struct Chosen {
    addr: Addr,
    port: u16,
    flags: u16,
}

impl Chosen {
    /// # Safety
    /// `b` points at a live map value.
    #[inline(always)]
    unsafe fn read(b: *const Backend) -> Chosen {
        Chosen {
            addr: [(*b).addr[0], (*b).addr[1], (*b).addr[2], (*b).addr[3]],
            port: (*b).port,
            flags: (*b).flags,
        }
    }
}

/// What to do with a socket call to a frontend.
enum Pick {
    /// Translate to this backend.
    To(Chosen),
    /// Not translated here; the per-packet path decides.
    Leave,
    /// Fail the call with ECONNREFUSED (no endpoints).
    Reject,
}

/// The fields of a service value the socket programs use.
#[derive(Clone, Copy)]
struct Svc {
    service_id: u32,
    backend_count: u16,
    generation: u16,
    flags: u32,
    affinity_timeout_s: u32,
}

/// The frontend `to` addresses, if it is one.
#[inline(always)]
fn frontend(to: &SockAddr, proto: u32) -> Option<Svc> {
    if !crate::maps::maybe_frontend(&to.addr) {
        return None;
    }
    let key = service_key(&to.addr, to.port, proto as u8, to.family);
    let mut v: *const ServiceValue = DP_SERVICES.get_ptr(key.as_ref::<ServiceKey>())?;
    // Every socket here is inside the cluster (the node's, or a pod's on
    // this node): an external frontend of a Local-policy Service is reached
    // through its in-cluster view, every endpoint (kube-proxy
    // short-circuits the node's traffic to external destinations).
    // SAFETY: as below.
    if unsafe { (*v).flags } & SVC_F_IN_CLUSTER_VIEW != 0 {
        let key = service_key(&to.addr, to.port, proto as u8, to.family | KEY_IN_CLUSTER);
        if let Some(view) = DP_SERVICES.get_ptr(key.as_ref::<ServiceKey>()) {
            v = view;
        }
    }
    // SAFETY: not preallocated: the value stays valid (RCU) for this run;
    // read field by field (see `Words`).
    unsafe {
        Some(Svc {
            service_id: (*v).service_id,
            backend_count: (*v).backend_count,
            generation: (*v).generation,
            flags: (*v).flags,
            affinity_timeout_s: (*v).affinity_timeout_s,
        })
    }
}

/// The backend for a new socket (or a new unconnected UDP conversation) to
/// `svc`: session affinity per network namespace, else uniformly at random
/// among the usable backends (there is no flow to hash yet; the choice
/// stays with the socket, so Maglev's consistency has nothing to keep).
#[inline(always)]
fn pick(netns_cookie: u64, svc: &Svc, now: u64) -> Pick {
    if svc.flags & SVC_F_SOURCE_RANGES != 0 {
        return Pick::Leave;
    }
    if svc.backend_count == 0 {
        if svc.flags & SVC_F_DROP_NO_LOCAL != 0 {
            return Pick::Leave;
        }
        return Pick::Reject;
    }
    let affinity = svc.flags & SVC_F_AFFINITY != 0;
    let akey = affinity_key(netns_cookie, svc.service_id);
    if affinity {
        if let Some(e) = DP_SOCK_AFFIN.get_ptr_mut(akey.as_ref::<SockAffinityKey>()) {
            // SAFETY: the LRU value stays valid for this run; a racing
            // refresh of last_seen is harmless.
            unsafe {
                if now.saturating_sub((*e).last_seen_ns) <= svc.affinity_timeout_s as u64 * NS_PER_S {
                    (*e).last_seen_ns = now;
                    return Pick::To(Chosen::read(&raw const (*e).backend));
                }
            }
        }
    }
    // SAFETY: helper without preconditions.
    let r = unsafe { bpf_get_prandom_u32() };
    let Some(index) = r.checked_rem(svc.backend_count as u32) else {
        return Pick::Reject;
    };
    let Some(b) = DP_BACKENDS.get_ptr(BackendKey::new(svc.service_id, svc.generation, index)) else {
        count(SockEvent::BackendMissing);
        return Pick::Leave;
    };
    // SAFETY: not preallocated: the value stays valid (RCU) for this run.
    let chosen = unsafe { Chosen::read(b) };
    if affinity {
        // Best effort, as in the packet path.
        let v = affinity_value(&chosen, now);
        let _ = DP_SOCK_AFFIN.insert(akey.as_ref::<SockAffinityKey>(), v.as_ref::<AffinityValue>(), 0);
    }
    Pick::To(chosen)
}

/// Remembers that socket `cookie`'s backend `b` stands for frontend `to`.
#[inline(always)]
fn remember_reverse(cookie: u64, to: &SockAddr, b: &Chosen, service_id: u32, now: u64) {
    let key = nat_key(cookie, &b.addr, b.port, to.family, SOCK_NAT_REVERSE);
    let value = nat_value(&to.addr, to.port, 0, service_id, now);
    if DP_SOCK_NAT
        .insert(key.as_ref::<SockNatKey>(), value.as_ref::<SockNatValue>(), 0)
        .is_err()
    {
        count(SockEvent::NatEntryFailed);
    }
}

/// A socket of the node (or a pod) connecting or sending to a ClusterIP on
/// a port its Service does not define (`SVC_F_OTHER_PORTS`): refused, as
/// kube-proxy rejects it in its output chain; any other address is let
/// through.
#[inline(always)]
fn other_ports(to: &SockAddr) -> i32 {
    if !crate::maps::maybe_cluster_ip(&to.addr) {
        return ALLOW;
    }
    let key = service_key(&to.addr, 0, 0, to.family);
    match DP_SERVICES.get_ptr(key.as_ref::<ServiceKey>()) {
        // SAFETY: as in `frontend`.
        Some(v) => reject(unsafe { (*v).service_id }),
        None => ALLOW,
    }
}

#[inline(always)]
fn reject(service_id: u32) -> i32 {
    count(SockEvent::RejectNoBackend);
    count_no_backend(service_id);
    // Before 5.18 (no bpf_set_retval) the call fails with EPERM.
    if kernel_has(kernel_features::SET_RETVAL) {
        // SAFETY: allowed in connect and sendmsg programs (kernel 5.18+).
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    DENY
}

/// `connect()` (TCP, UDP) to a frontend: the socket connects to a backend.
#[inline(always)]
pub fn connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let proto = protocol(sa);
    if proto != IPPROTO_TCP as u32 && proto != IPPROTO_UDP as u32 {
        return ALLOW;
    }
    let to = read_addr(sa, v6);
    let Some(svc) = frontend(&to, proto) else {
        return other_ports(&to);
    };
    // SAFETY: helpers valid for sock_addr programs.
    let (netns, now) = unsafe { (bpf_get_netns_cookie(ctx.as_ptr()), clock_ns()) };
    match pick(netns, &svc, now) {
        Pick::To(b) => {
            write_addr(sa, v6, &to, &b.addr, b.port);
            // SAFETY: as above.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            remember_reverse(cookie, &to, &b, svc.service_id, now);
            translated(SockEvent::ConnectTranslated, svc.service_id)
        }
        other => not_translated(other, svc.service_id),
    }
}

/// Counts a call sent to a newly picked backend; lets it go on.
#[inline(always)]
fn translated(event: SockEvent, service_id: u32) -> i32 {
    count(event);
    count_new_flow(service_id);
    ALLOW
}

/// A frontend left to the packet path goes on untouched; one without
/// endpoints is refused.
#[inline(always)]
fn not_translated(pick: Pick, service_id: u32) -> i32 {
    match pick {
        Pick::Reject => reject(service_id),
        _ => {
            count(SockEvent::LeftToDatapath);
            ALLOW
        }
    }
}

/// How long an unconnected UDP socket's choice of backend lives without
/// use: the UDP conntrack timeouts.
#[inline(always)]
fn udp_timeout_ns(flags: u16) -> u64 {
    const D: DpConfig = DpConfig::defaults();
    let seen = flags & SOCK_F_SEEN_REPLY != 0;
    let set = match DP_CONFIG.get_ptr(0) {
        // SAFETY: array values stay valid; read one field.
        Some(c) => unsafe {
            if seen {
                (*c).udp_stream_timeout_ns
            } else {
                (*c).udp_timeout_ns
            }
        },
        None => 0,
    };
    match (set, seen) {
        (0, true) => D.udp_stream_timeout_ns,
        (0, false) => D.udp_timeout_ns,
        (t, _) => t,
    }
}

/// `sendmsg()` with an address (unconnected UDP) to a frontend: the
/// datagram goes to the backend this socket's earlier datagrams to the
/// frontend went to, or to a newly picked one.
#[inline(always)]
pub fn sendmsg(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    if protocol(sa) != IPPROTO_UDP as u32 {
        return ALLOW;
    }
    let to = read_addr(sa, v6);
    let Some(svc) = frontend(&to, IPPROTO_UDP as u32) else {
        return other_ports(&to);
    };
    // SAFETY: helpers valid for sock_addr programs.
    let (cookie, now) = unsafe { (bpf_get_socket_cookie(ctx.as_ptr()), clock_ns()) };
    let fwd = nat_key(cookie, &to.addr, to.port, to.family, SOCK_NAT_FORWARD);
    if let Some(e) = DP_SOCK_NAT.get_ptr_mut(fwd.as_ref::<SockNatKey>()) {
        // SAFETY: the LRU value stays valid for this run; concurrent
        // writers only refresh last_seen/flags, where a lost update is
        // harmless.
        unsafe {
            let idle = now.saturating_sub((*e).last_seen_ns);
            if idle <= udp_timeout_ns((*e).flags) && (*e).service_id == svc.service_id {
                if idle > REFRESH_NS {
                    (*e).last_seen_ns = now;
                }
                let addr = [(*e).addr[0], (*e).addr[1], (*e).addr[2], (*e).addr[3]];
                write_addr(sa, v6, &to, &addr, (*e).port);
                count(SockEvent::SendmsgTranslated);
                return ALLOW;
            }
        }
    }
    // SAFETY: as above.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    match pick(netns, &svc, now) {
        Pick::To(b) => {
            write_addr(sa, v6, &to, &b.addr, b.port);
            let value = nat_value(&b.addr, b.port, 0, svc.service_id, now);
            if DP_SOCK_NAT
                .insert(fwd.as_ref::<SockNatKey>(), value.as_ref::<SockNatValue>(), 0)
                .is_err()
            {
                count(SockEvent::NatEntryFailed);
            }
            remember_reverse(cookie, &to, &b, svc.service_id, now);
            translated(SockEvent::SendmsgTranslated, svc.service_id)
        }
        other => not_translated(other, svc.service_id),
    }
}

/// Shows the frontend instead of the backend `at` names, if socket
/// `cookie` was translated to it; returns the frontend's address and port.
#[inline(always)]
fn restore(sa: *mut bpf_sock_addr, v6: bool, cookie: u64, at: &SockAddr) -> Option<(Addr, u16)> {
    let key = nat_key(cookie, &at.addr, at.port, at.family, SOCK_NAT_REVERSE);
    let v = DP_SOCK_NAT.get_ptr(key.as_ref::<SockNatKey>())?;
    // SAFETY: the LRU value stays valid for this run; read field by field.
    let (addr, port) = unsafe { ([(*v).addr[0], (*v).addr[1], (*v).addr[2], (*v).addr[3]], (*v).port) };
    write_addr(sa, v6, at, &addr, port);
    Some((addr, port))
}

/// `recvmsg()` on a UDP socket: a datagram from a backend the socket was
/// translated to is shown as coming from the frontend.
#[inline(always)]
pub fn recvmsg(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let from = read_addr(sa, v6);
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some((addr, port)) = restore(sa, v6, cookie, &from) else {
        return ALLOW;
    };
    count(SockEvent::ReplyRestored);
    // The conversation got an answer: its forward entry (unconnected
    // sockets) now lives as long as an answered UDP flow.
    let fwd = nat_key(cookie, &addr, port, from.family, SOCK_NAT_FORWARD);
    if let Some(e) = DP_SOCK_NAT.get_ptr_mut(fwd.as_ref::<SockNatKey>()) {
        // SAFETY: as in `sendmsg`.
        unsafe {
            if (*e).flags & SOCK_F_SEEN_REPLY == 0 {
                (*e).flags |= SOCK_F_SEEN_REPLY;
                (*e).last_seen_ns = clock_ns();
            }
        }
    }
    ALLOW
}

/// `getpeername()` of a translated socket returns the frontend it
/// connected to.
#[inline(always)]
pub fn getpeername(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let peer = read_addr(sa, v6);
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if restore(sa, v6, cookie, &peer).is_some() {
        count(SockEvent::PeerRestored);
    }
    ALLOW
}

/// `sock_release`: the socket's reverse entry (its connected peer, the
/// backend connect() picked, towards the frontend) is deleted with the
/// socket, instead of waiting for LRU eviction: under socket churn the
/// map then holds live sockets only. Entries of unconnected UDP sockets
/// (one pair per frontend they sent to, keyed by addresses the socket does
/// not keep) are not found here; they expire with the UDP timeouts and
/// leave by eviction. Always lets the release go on (1).
#[inline(always)]
pub fn release(ctx: &SockContext) -> i32 {
    let sk: *mut bpf_sock = ctx.sock;
    // SAFETY: `sk` is the program's context; the verifier allows reads of
    // these fields at sock_release. The port is read as the 4-byte word
    // kernels before 5.17 only allow (the port, network order, in its low
    // half).
    let (family, port, w) = unsafe {
        let family = read_volatile(&raw const (*sk).family);
        let port = read_volatile((&raw const (*sk).dst_port).cast::<u32>()) as u16;
        let w = if family == AF_INET6 {
            [
                read_volatile(&raw const (*sk).dst_ip6[0]),
                read_volatile(&raw const (*sk).dst_ip6[1]),
                read_volatile(&raw const (*sk).dst_ip6[2]),
                read_volatile(&raw const (*sk).dst_ip6[3]),
            ]
        } else {
            [read_volatile(&raw const (*sk).dst_ip4), 0, 0, 0]
        };
        (family, port, w)
    };
    if port == 0 {
        return 1; // never connected
    }
    let (addr, family) = if family != AF_INET6 {
        (w, FAMILY_V4)
    } else if w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED {
        ([w[3], 0, 0, 0], FAMILY_V4)
    } else {
        (w, FAMILY_V6)
    };
    // SAFETY: a helper for cgroup sock programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = nat_key(cookie, &addr, port, family, SOCK_NAT_REVERSE);
    // (Not counted: the socket counter array has no free slot, and
    // growing a pinned map is a layout change.)
    let _ = DP_SOCK_NAT.remove(key.as_ref::<SockNatKey>());
    1
}

/// `AF_INET6` as `bpf_sock::family` holds it.
const AF_INET6: u32 = 10;
