//! Host routing: a packet the TC program translated goes straight to the
//! interface the kernel's FIB names for its new destination, instead of
//! back to the node's stack (netfilter's hooks, the forwarding path, a
//! second pass through routing). What Cilium calls "BPF host routing".
//!
//! The FIB lookup (`bpf_fib_lookup`) decides, with the ingress interface
//! as the packet's input (its forwarding setting, policy routing). TC:
//!
//! - a route and a resolved neighbour: the TTL (hop limit) is decremented
//!   as forwarding does, the Ethernet addresses become the egress
//!   interface's and the neighbour's, and the packet is redirected to the
//!   egress interface (`bpf_redirect`), or, when the agent says it is a
//!   veth whose peer is in another namespace (`DP_IFACES`), straight into
//!   that namespace (`bpf_redirect_peer`: a pod on this node, one queue
//!   less);
//! - a route but no neighbour entry yet: the same, with the kernel
//!   resolving the neighbour (`bpf_redirect_neigh`);
//! - anything else (the destination is local, unreachable, needs
//!   fragmentation, forwarding is off on the interface, a TTL that would
//!   expire): the packet goes to the stack, which handles it as before.
//!
//! XDP, with the same FIB lookup (the packet's length given, as the XDP
//! helper checks the MTU only against it), when the neighbour is resolved:
//!
//! - the route leads back out of the interface the packet came in on:
//!   `XDP_TX` (external traffic to a NodePort whose backend is on another
//!   node behind the same interface, and the replies of such flows);
//! - another interface: `bpf_redirect` to it (`XDP_REDIRECT`: a local
//!   pod's veth, another uplink);
//!
//! in both cases only when the agent says the egress interface takes XDP
//! frames (`IFACE_F_XDP_XMIT`, from the kernel's XDP features; `XDP_TX`
//! out of a non-veth needs nothing): a driver without `ndo_xdp_xmit`, or a
//! veth whose peer has neither an XDP program nor GRO, drops redirected
//! frames, and the program cannot tell afterwards. Everything else (no
//! neighbour entry, which XDP cannot resolve; a frame longer than its
//! first buffer) passes to the stack (and to TC), as in TC.
//!
//! Socket-level connections ([`socket_translated`]): a socket the cgroup
//! programs translated sends its packets to the backend itself, so TC
//! finds no Service in them; with host routing and socket-level load
//! balancing both on, TC sends them (and their replies) the same way, by
//! the endpoint set the agent keeps (`DP_ENDPOINTS`).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibLookup, xdp_action, TC_ACT_UNSPEC},
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::map,
    maps::HashMap,
    programs::{TcContext, XdpContext},
};

use dataplane_common::{limits, Addr, EndpointKey, RouteEvent, IFACE_F_PEER_NETNS, IFACE_F_VETH, IFACE_F_XDP_XMIT};

use crate::{
    maps,
    nat::PacketCtx,
    parse::{Packet, ETH_HLEN, ETH_P_IP, ETH_P_IPV6},
    stats,
};

/// The endpoint set (`dataplane_common::map_names::ENDPOINTS`): every
/// backend of the programmed frontends, kept by the agent while
/// [`sock_routing`] is on. Not preallocated, as the agent's other hash
/// maps (see `maps.rs`).
#[map]
pub static DP_ENDPOINTS: HashMap<EndpointKey, u8> =
    HashMap::with_max_entries(limits::MAX_BACKEND_SLOTS, BPF_F_NO_PREALLOC);

const BPF_F_NO_PREALLOC: u32 = 1;

/// Set to 1 by the agent at load time when host routing and socket-level
/// load balancing are both on (unless `--socket-host-routing=false`); see
/// `dataplane_common::SOCK_ROUTING_GLOBAL`.
#[no_mangle]
static DP_SOCK_ROUTING: u8 = 0;

/// Whether the packets of socket-translated connections are host-routed.
#[inline(always)]
pub fn sock_routing() -> bool {
    // SAFETY: reading a static; volatile so that the load-time value is
    // read, not the compile-time 0.
    unsafe { core::ptr::read_volatile(&DP_SOCK_ROUTING) != 0 }
}

/// An `EndpointKey` on the stack, 8-aligned (LLVM merges the key's 4-byte
/// stores into 8-byte ones, which the verifier refuses at a 4-aligned
/// stack offset).
#[repr(C, align(8))]
struct EndpointSlot(EndpointKey);

/// Whether (`addr`, `port`) of the packet's protocol and family is in the
/// endpoint set: first the backend filter's entry of the address (an
/// array lookup; every endpoint's entry is set before it enters the set),
/// then the set itself.
#[inline(always)]
fn is_endpoint(p: &Packet, addr: &Addr, port: u16) -> bool {
    if !maps::maybe_backend(addr) {
        return false;
    }
    let key = EndpointSlot(EndpointKey {
        addr: *addr,
        port,
        proto: p.proto,
        family: p.family,
    });
    // By reference: the helper gets the key in its aligned slot, not a
    // moved copy.
    #[allow(clippy::needless_borrows_for_generic_args)]
    DP_ENDPOINTS.get_ptr(&key.0).is_some()
}

/// Whether a packet that matched no Service (and no tracked flow) is one
/// of a connection the socket-level programs translated: its destination
/// is an endpoint of some Service, or it is the reply, from one. Such
/// packets then go through [`tc`] like translated ones. The datapath
/// cannot tell these from a pod addressing the endpoint directly: both
/// are routed so. Always `false` unless the agent turned it on
/// ([`sock_routing`]).
#[inline(never)]
pub fn socket_translated(p: &Packet) -> bool {
    if !sock_routing() {
        return false;
    }
    is_endpoint(p, &p.daddr, p.dport) || is_endpoint(p, &p.saddr, p.sport)
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const FIB_SUCCESS: i64 = 0;
const FIB_NO_NEIGH: i64 = 7;

/// Where the translated packet in `ctx` goes: redirected (the helper's
/// verdict, `TC_ACT_REDIRECT`) or to the stack (`TC_ACT_UNSPEC`). With
/// host routing on, the egress interface is left in this CPU's scratch
/// entry (`CtScratch::redirect_ifindex`, 0 when the packet went to the
/// stack).
#[inline(never)]
pub fn tc(ctx: &TcContext) -> i32 {
    if !maps::host_routing() {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: the skb pointer is valid for the program run.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    let mut fib = FibSlot(core::mem::MaybeUninit::uninit());
    let fib = zero_fib(&mut fib);
    let route = match lookup(ctx, ctx.skb.skb as *mut c_void, ingress, fib, false) {
        Some(resolved) if forward_headers(ctx, fib, resolved) => Some((fib.ifindex, resolved)),
        _ => None,
    };
    record(route.map_or(0, |(i, _)| i));
    match route {
        Some((i, true)) if maps::iface_has(i, IFACE_F_VETH | IFACE_F_PEER_NETNS) => {
            stats::route_event(RouteEvent::RedirectedPeer);
            // SAFETY: a helper call with plain arguments (TC ingress, as
            // the helper requires).
            unsafe { bpf_redirect_peer(i, 0) as i32 }
        }
        Some((i, true)) => {
            stats::route_event(RouteEvent::Redirected);
            // SAFETY: as above.
            unsafe { bpf_redirect(i, 0) as i32 }
        }
        Some((i, false)) => {
            stats::route_event(RouteEvent::RedirectedNeigh);
            // SAFETY: as above; no neighbour parameters (the kernel
            // resolves the route's next hop).
            unsafe { bpf_redirect_neigh(i, core::ptr::null_mut(), 0, 0) as i32 }
        }
        None => {
            stats::route_event(RouteEvent::ToStack);
            TC_ACT_UNSPEC
        }
    }
}

/// Where the translated packet in `ctx` goes from XDP: back out of its
/// interface (`XDP_TX`) or to another one (`XDP_REDIRECT`) when the FIB
/// names a resolved neighbour and the egress interface can take the
/// frame, else to the stack (`XDP_PASS`). Recorded and counted as for
/// [`tc`].
#[inline(never)]
pub fn xdp(ctx: &XdpContext) -> u32 {
    if !maps::host_routing() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the context pointer is valid for the program run.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut fib = FibSlot(core::mem::MaybeUninit::uninit());
    let fib = zero_fib(&mut fib);
    let out = match lookup(ctx, ctx.ctx as *mut c_void, ingress, fib, true) {
        Some(true) => {
            let out = fib.ifindex;
            // One DP_IFACES lookup: the egress interface's kinds.
            // SAFETY: a plain u32 value, read once.
            let kinds = maps::DP_IFACES.get_ptr(out).map_or(0, |f| unsafe { *f });
            let takes_frames = kinds & IFACE_F_XDP_XMIT != 0;
            // XDP_TX onto a non-veth needs no more than the driver's own
            // XDP support, which the attached program proves.
            let ok = takes_frames || (out == ingress && kinds & IFACE_F_VETH == 0);
            if ok && forward_headers(ctx, fib, true) {
                out
            } else {
                0
            }
        }
        _ => 0,
    };
    record(out);
    if out == 0 {
        stats::route_event(RouteEvent::ToStack);
        xdp_action::XDP_PASS
    } else if out == ingress {
        stats::route_event(RouteEvent::XdpTx);
        xdp_action::XDP_TX
    } else {
        stats::route_event(RouteEvent::XdpRedirect);
        // SAFETY: a helper call with plain arguments; with flags 0 it
        // answers XDP_REDIRECT (the frame is sent once the program
        // returns).
        unsafe { bpf_redirect(out, 0) as u32 }
    }
}

/// Leaves the egress interface of this run in the scratch entry.
#[inline(always)]
fn record(ifindex: u32) {
    if let Some(s) = maps::scratch() {
        // SAFETY: this CPU's scratch entry, not shared with a concurrent run.
        unsafe { (*s).redirect_ifindex = ifindex };
    }
}

/// Stack room for a `bpf_fib_lookup`, 8-byte aligned: the target lets
/// LLVM merge two 4-byte accesses into one 8-byte access wherever it
/// likes, and the verifier refuses an 8-byte stack access that is not
/// 8-byte aligned (the struct's own alignment is 4).
#[repr(C, align(8))]
struct FibSlot(core::mem::MaybeUninit<FibLookup>);

/// Zeroes `fib` in place, with volatile 4-byte stores: a plain zeroing
/// (`mem::zeroed`, or moving a zeroed value) becomes a call to `memset`, a
/// byte-by-byte loop of 64 iterations on BPF.
#[inline(always)]
fn zero_fib(slot: &mut FibSlot) -> &mut FibLookup {
    let fib = &mut slot.0;
    const WORDS: usize = core::mem::size_of::<FibLookup>() / 4;
    const _: () =
        assert!(core::mem::size_of::<FibLookup>().is_multiple_of(4) && core::mem::align_of::<FibLookup>() >= 4);
    let w = fib.as_mut_ptr() as *mut u32;
    for i in 0..WORDS {
        // SAFETY: within the struct, 4-byte aligned (asserted above).
        unsafe { core::ptr::write_volatile(w.add(i), 0) };
    }
    // SAFETY: every byte written; a bpf_fib_lookup of zeros is valid
    // (plain integers).
    unsafe { fib.assume_init_mut() }
}

/// 16 bytes at `at` as four words. Array copies (`[u32; 4]`, `[u8; 6]`)
/// become calls to `memmove`, a byte-by-byte loop on BPF; word loads and
/// stores do not.
///
/// # Safety
/// `at..at + 16` is readable (bounds checked by the caller).
#[inline(always)]
unsafe fn read_words(at: usize) -> [u32; 4] {
    let w = at as *const u32;
    [
        core::ptr::read_unaligned(w),
        core::ptr::read_unaligned(w.add(1)),
        core::ptr::read_unaligned(w.add(2)),
        core::ptr::read_unaligned(w.add(3)),
    ]
}

/// Writes the MAC address `mac` at `at` with a 4-byte and a 2-byte store
/// (see [`read_words`]).
///
/// # Safety
/// `at..at + 6` is writable (bounds checked by the caller).
#[inline(always)]
unsafe fn write_mac(at: usize, mac: &[u8; 6]) {
    core::ptr::write_unaligned(at as *mut u32, u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]));
    core::ptr::write_unaligned((at + 4) as *mut u16, u16::from_ne_bytes([mac[4], mac[5]]));
}

/// Asks the FIB for the packet's destination (`raw`: the program's
/// context for the helper, `ingress` the interface the packet came in
/// on; `fib` zeroed, the answer is left in it): whether the neighbour is
/// resolved (its MAC then in the answer). `None`: the packet is neither
/// IPv4 nor IPv6, its TTL would expire, or the FIB has no route for it.
/// `xdp`: the packet's IP length goes into the lookup (the XDP helper
/// checks the egress MTU against that alone), and a packet longer than
/// the frame's first buffer (a multi-buffer frame, or a truncated one) is
/// `None`: redirecting those needs more of the target than
/// `IFACE_F_XDP_XMIT` says.
#[inline(always)]
fn lookup<C: PacketCtx>(ctx: &C, raw: *mut c_void, ingress: u32, fib: &mut FibLookup, xdp: bool) -> Option<bool> {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HLEN + 20 > end {
        return None;
    }
    // SAFETY: bounds checked above (ETH_HLEN + 20 bytes).
    let proto = u16::from_be(unsafe { core::ptr::read_unaligned((data + 12) as *const u16) });
    let ip = data + ETH_HLEN;
    let mut tot_len = 0u16;
    fib.ifindex = ingress;
    if proto == ETH_P_IP {
        // SAFETY: bounds checked above.
        unsafe {
            if *((ip + 8) as *const u8) <= 1 {
                return None;
            }
            fib.family = AF_INET;
            fib.__bindgen_anon_2.tos = *((ip + 1) as *const u8);
            fib.l4_protocol = *((ip + 9) as *const u8);
            fib.__bindgen_anon_3.ipv4_src = core::ptr::read_unaligned((ip + 12) as *const u32);
            fib.__bindgen_anon_4.ipv4_dst = core::ptr::read_unaligned((ip + 16) as *const u32);
            if xdp {
                tot_len = u16::from_be(core::ptr::read_unaligned((ip + 2) as *const u16));
            }
        }
    } else if proto == ETH_P_IPV6 {
        if data + ETH_HLEN + 40 > end {
            return None;
        }
        // SAFETY: bounds checked just above.
        unsafe {
            if *((ip + 7) as *const u8) <= 1 {
                return None;
            }
            fib.family = AF_INET6;
            fib.__bindgen_anon_2.flowinfo = core::ptr::read_unaligned(ip as *const u32) & u32::to_be(0x0fff_ffff);
            fib.l4_protocol = *((ip + 6) as *const u8);
            fib.__bindgen_anon_3.ipv6_src = read_words(ip + 8);
            fib.__bindgen_anon_4.ipv6_dst = read_words(ip + 24);
            if xdp {
                let payload = u16::from_be(core::ptr::read_unaligned((ip + 4) as *const u16));
                tot_len = payload.saturating_add(40);
            }
        }
    } else {
        return None;
    }
    if xdp {
        if ip + tot_len as usize > end {
            return None;
        }
        fib.__bindgen_anon_1.tot_len = tot_len;
    }
    // TC: tot_len 0, the helper checks the packet itself against the
    // egress MTU (for skbs GSO packets included) and answers FRAG_NEEDED
    // when it does not fit. XDP: the IP length, checked the same way.
    // SAFETY: the context and a parameter block of the helper's size.
    let rc = unsafe { bpf_fib_lookup(raw, fib, core::mem::size_of::<FibLookup>() as i32, 0) };
    match rc {
        FIB_SUCCESS => Some(true),
        FIB_NO_NEIGH => Some(false),
        _ => None,
    }
}

/// What forwarding does to the headers: the TTL / hop limit one less
/// (the IPv4 header checksum updated), and with a resolved neighbour
/// the egress interface's and the neighbour's MAC addresses. `false`
/// when the packet is too short (the caller then passes it on).
#[inline(always)]
fn forward_headers<C: PacketCtx>(ctx: &C, fib: &FibLookup, resolved: bool) -> bool {
    // The helper may not have moved the data, but the verifier forgets
    // packet bounds across helper calls: check again (the IPv4 checksum
    // and the IPv6 hop limit lie within the first 20 bytes of IP).
    let data = ctx.data();
    if data + ETH_HLEN + 20 > ctx.data_end() {
        return false;
    }
    let ip = data + ETH_HLEN;
    // SAFETY: bounds checked just above; both hooks may write the packet.
    unsafe {
        if fib.family == AF_INET {
            // TTL and protocol share a 16-bit word of the header checksum
            // (RFC 1624: HC' = ~(~HC + ~m + m')).
            let word = (ip + 8) as *mut u16;
            let old = core::ptr::read_unaligned(word);
            *((ip + 8) as *mut u8) -= 1;
            let new = core::ptr::read_unaligned(word);
            let csum = (ip + 10) as *mut u16;
            let mut sum = (!core::ptr::read_unaligned(csum)) as u32 + (!old) as u32 + new as u32;
            sum = (sum & 0xffff) + (sum >> 16);
            sum = (sum & 0xffff) + (sum >> 16);
            core::ptr::write_unaligned(csum, !(sum as u16));
        } else {
            *((ip + 7) as *mut u8) -= 1;
        }
        if resolved {
            write_mac(data, &fib.dmac);
            write_mac(data + 6, &fib.smac);
        }
    }
    true
}
