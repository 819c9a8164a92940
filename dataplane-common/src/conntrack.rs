//! Connection tracking entries: two per translated flow.

use bytemuck::{Pod, Zeroable};

use crate::*;

/// Connection tracking key: a 5-tuple exactly as it appears in a packet.
///
/// Each translated flow has two entries: the original direction
/// (client -> VIP, `CT_F_ORIGINAL`) and the reply direction
/// (backend -> client, `CT_F_REPLY`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: u16,
}

/// Connection tracking value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtValue {
    /// Original entry: the backend address the destination is rewritten to.
    /// Reply entry: the VIP the source is rewritten to. Of the key's family.
    pub nat_addr: Addr,
    /// With `CT_F_SNAT`. Original entry: the node address the source is
    /// rewritten to. Reply entry: the client address the destination is
    /// rewritten back to.
    pub snat_addr: Addr,
    /// CLOCK_MONOTONIC at creation (`bpf_ktime_get_coarse_ns()`: tick resolution).
    pub created_ns: u64,
    /// The same clock at the last packet seen in the entry's
    /// direction (refreshed at most once a second).
    pub last_seen_ns: u64,
    /// The frontend this flow was created for (counters).
    pub service_id: u32,
    /// As `nat_addr`, for the port (network byte order).
    pub nat_port: u16,
    /// `CT_F_*` bits: direction and SNAT, fixed when the entry is made, and
    /// the state bits (`CT_F_SEEN_REPLY`, `CT_F_CLOSING`) as releases up to
    /// 0.2 read them. Programs update the state bits with a plain
    /// read-modify-write, where two CPUs can lose one of them: the bytes
    /// below hold the state authoritatively; read it with [`CtValue::state`].
    pub flags: u16,
    /// As `snat_addr`, for the port.
    pub snat_port: u16,
    /// The low 16 bits of the frontend's `ServiceValue::epoch` when the
    /// flow was created (0 in entries of earlier releases).
    pub epoch: u16,
    /// 1 once a reply was seen (`CT_F_SEEN_REPLY`). Set with a
    /// one-byte store, which no other CPU's update can undo (BPF atomic OR
    /// needs 5.12; a byte per bit works on every kernel). 0 in entries of
    /// earlier releases, whose `flags` bits count instead.
    pub seen_reply: u8,
    /// 1 once the flow closes (`CT_F_CLOSING`), as `seen_reply`.
    pub closing: u8,
    pub _pad: u16,
}

impl CtValue {
    /// The entry's flags: `flags` with the state bytes folded in. Everything
    /// that decides on the state (timeouts, reuse, displays) reads this.
    /// (The bytes hold 0 or 1: folded without branches, which the verifier
    /// would otherwise walk at every use.)
    #[inline(always)]
    pub const fn state(&self) -> u16 {
        self.flags | ((self.seen_reply & 1) as u16) << 3 | ((self.closing & 1) as u16) << 2
    }
}

const _: () = assert!(CT_F_SEEN_REPLY == 1 << 3 && CT_F_CLOSING == 1 << 2);

/// Per-CPU scratch space of the programs (one entry of a per-CPU array
/// that is neither pinned nor read by the agent): conntrack keys and values
/// are built here rather than on the 512-byte eBPF stack. Programs of one
/// CPU do not interleave (XDP and TC ingress run in softirq context), so
/// one entry per CPU suffices.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtScratch {
    pub key: CtKey,
    pub value: CtValue,
    /// The flood guard's window on this CPU: when it started
    /// (`bpf_ktime_get_coarse_ns`) and the new flows given state in it.
    pub flood_window_ns: u64,
    pub flood_count: u32,
    /// Set by the flood guard's check for the flow being created: 1 when it
    /// goes without state.
    pub stateless: u8,
    pub _flood_pad: [u8; 3],
    /// Host routing: the interface the TC program last redirected a
    /// packet to, 0 when it handed the packet to the stack (for tests and
    /// inspection).
    pub redirect_ifindex: u32,
    pub _redirect_pad: u32,
    /// The clock as last read on this CPU (`bpf_ktime_get_coarse_ns`) and
    /// the jiffy (`bpf_jiffies64`) it was read in: reused while the jiffy
    /// lasts (the kernel side's `conntrack::now_ns_in`).
    pub clock_jiffies: u64,
    pub clock_ns: u64,
}

/// Conntrack flag bits (`CtValue::flags`).
pub const CT_F_ORIGINAL: u16 = 1 << 0;

pub const CT_F_REPLY: u16 = 1 << 1;

/// A FIN or RST was seen: a new SYN on the same tuple starts a new flow.
pub const CT_F_CLOSING: u16 = 1 << 2;

/// A reply was seen (set on both entries of the flow).
pub const CT_F_SEEN_REPLY: u16 = 1 << 3;

/// The flow's source is translated too (remote backend of an external
/// frontend, or hairpin): see `CtValue::snat_addr`.
pub const CT_F_SNAT: u16 = 1 << 4;

/// Conntrack events the programs count (per CPU, `DP_CT_EVENTS`), apart
/// from the packet reasons.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtEvent {
    /// A new flow's reply tuple was held by another live flow (one client
    /// port to two frontends sharing a backend, or two SNATed flows
    /// racing): the new flow got another source port, as netfilter
    /// resolves NAT clashes, instead of taking the other flow's replies.
    ClashResolved = 0,
    /// A TCP SYN or a UDP datagram of a new flow was translated without
    /// conntrack state: this CPU had already given state to its quota of
    /// new flows in the current second (the flood guard,
    /// `--new-flows-per-cpu`). Only the reply entry is written, to a
    /// separate LRU (`DP_CT_SYN`); the flow gets state when the client's
    /// next packet (the handshake's ACK; for UDP, a datagram after the
    /// backend answered) arrives, with the same backend (the consistent
    /// hash). Spoofed sources never send that packet, so a flood cannot
    /// evict established flows.
    StatelessNewFlow = 1,
    /// A SYN-ACK or UDP answer of such a flow was translated back from its
    /// entry in the flood guard's LRU.
    StatelessReply = 2,
}

/// Slots of the conntrack event array: room for events to come without
/// resizing the pinned map.
pub const CT_EVENT_SLOTS: u32 = 8;

/// `DP_IFACES` bit: the interface is a veth. XDP does not send frames back
/// out of it (`XDP_TX` onto a veth drops them unless the peer is set up
/// for XDP).
pub const IFACE_F_VETH: u32 = 1;

/// `DP_IFACES` bit: a veth whose peer is in another network namespace (a
/// pod's). Host routing sends packets for it straight into that
/// namespace (`bpf_redirect_peer`, which drops packets for a peer in the
/// same namespace).
pub const IFACE_F_PEER_NETNS: u32 = 2;

/// `DP_IFACES` bit: the interface takes frames redirected by XDP right now
/// (the kernel reports `NETDEV_XDP_ACT_NDO_XMIT` in its XDP features; for a
/// veth, only while its peer runs an XDP program or has GRO on, else the
/// kernel drops such frames). XDP redirects translated packets only to
/// interfaces with this bit (`XDP_TX` onto a veth only when it has it) and
/// passes the rest to the stack. Never set on kernels without the netdev
/// netlink family's XDP features (before 6.3), nor for veths before 6.4.
pub const IFACE_F_XDP_XMIT: u32 = 4;

/// What host routing (`HOST_ROUTING_GLOBAL`) did with a packet the
/// programs translated (per CPU, `DP_ROUTE_EVENTS`). Not counted with host
/// routing off.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteEvent {
    /// Sent to the FIB's egress interface with the neighbour's MAC address
    /// (`bpf_redirect`).
    Redirected = 0,
    /// Sent to the FIB's egress interface, the kernel resolving the
    /// neighbour (`bpf_redirect_neigh`).
    RedirectedNeigh = 1,
    /// Handed to the node's stack: a local destination, no route,
    /// fragmentation needed, forwarding off on the input interface, or a
    /// TTL / hop limit about to expire (XDP: also no neighbour entry yet,
    /// and an egress interface that cannot take XDP frames,
    /// `IFACE_F_XDP_XMIT`).
    ToStack = 2,
    /// Sent into the namespace of the egress veth's peer, the neighbour's
    /// MAC written (`bpf_redirect_peer`: a pod on this node).
    RedirectedPeer = 3,
    /// Sent back out of the interface it came in on by XDP (`XDP_TX`).
    XdpTx = 4,
    /// Sent by XDP to another interface (`bpf_redirect`, `XDP_REDIRECT`),
    /// the neighbour's MAC written: a local pod's veth or another uplink.
    XdpRedirect = 5,
}

/// Slots of the host routing event array (room for more without resizing
/// the pinned map).
pub const ROUTE_EVENT_SLOTS: u32 = 8;

impl RouteEvent {
    pub const ALL: [RouteEvent; 6] = [
        RouteEvent::Redirected,
        RouteEvent::RedirectedNeigh,
        RouteEvent::ToStack,
        RouteEvent::RedirectedPeer,
        RouteEvent::XdpTx,
        RouteEvent::XdpRedirect,
    ];

    /// A stable snake_case name for CLIs and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            RouteEvent::Redirected => "redirected",
            RouteEvent::RedirectedNeigh => "redirected_neigh",
            RouteEvent::ToStack => "to_stack",
            RouteEvent::RedirectedPeer => "redirected_peer",
            RouteEvent::XdpTx => "xdp_tx",
            RouteEvent::XdpRedirect => "xdp_redirect",
        }
    }
}

impl CtEvent {
    pub const ALL: [CtEvent; 3] = [
        CtEvent::ClashResolved,
        CtEvent::StatelessNewFlow,
        CtEvent::StatelessReply,
    ];

    /// A stable snake_case name for CLIs and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            CtEvent::ClashResolved => "clash_resolved",
            CtEvent::StatelessNewFlow => "stateless_new_flow",
            CtEvent::StatelessReply => "stateless_reply",
        }
    }
}
