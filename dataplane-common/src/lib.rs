//! The kernel/user ABI of the dataplane.
//!
//! Every BPF map key and value, every map name and size, every flag bit and
//! every counter index that the eBPF programs (`dataplane-ebpf`) and the agent
//! (`dataplane-user`) share is defined here and nowhere else. All types are
//! `#[repr(C)]` plain data with explicit padding so that their layout is the
//! same on both sides; `tests` below pin sizes and field offsets.
//!
//! Byte order: addresses and ports are stored in **network byte order**
//! exactly as they appear in packets (the datapath compares them without
//! swapping). Use the constructors on the user side, which take host-order
//! values.
//!
//! Both address families share every map and every code path: an address is
//! an [`Addr`] of 16 bytes, an IPv4 address in its first 4 bytes and zeros
//! after; keys that could otherwise collide across families (service and
//! conntrack keys) carry the family ([`FAMILY_V4`] / [`FAMILY_V6`]). Values
//! reached through such a key (a service's backends, its affinity and
//! source-range entries) are of the key's family.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Bumped whenever a map layout below changes in an incompatible way.
pub const ABI_VERSION: u32 = 2;

/// IP protocol numbers used in keys.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Address family tags in keys (the IP version number).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// An IPv4 or IPv6 address as four 32-bit words in network byte order, as
/// the bytes appear in a packet. IPv4: word 0, words 1-3 zero.
pub type Addr = [u32; 4];

/// The IPv4 address `a` (network order) as an [`Addr`].
#[inline(always)]
pub const fn v4_addr(a: u32) -> Addr {
    [a, 0, 0, 0]
}

/// `a == b`, word by word (no `memcmp`, which eBPF does not have).
#[inline(always)]
pub const fn addr_eq(a: &Addr, b: &Addr) -> bool {
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0
}

/// The four words of `a` folded into one (XOR). For an IPv4 [`Addr`] this is
/// the IPv4 address itself.
#[inline(always)]
pub const fn fold_addr(a: &Addr) -> u32 {
    a[0] ^ a[1] ^ a[2] ^ a[3]
}

/// Map names as they appear in the eBPF object (the symbol names of the map
/// statics). The kernel truncates names to 15 bytes; all of these fit.
pub mod map_names {
    pub const SERVICES: &str = "DP_SERVICES";
    pub const BACKENDS: &str = "DP_BACKENDS";
    pub const CONNTRACK: &str = "DP_CONNTRACK";
    pub const MAGLEV: &str = "DP_MAGLEV";
    pub const AFFINITY: &str = "DP_AFFINITY";
    pub const SOURCE_RANGES: &str = "DP_SRC_RANGES";
    pub const NAMES: &str = "DP_NAMES";
    pub const CONFIG: &str = "DP_CONFIG";
    pub const SERVICE_STATS: &str = "DP_SVC_STATS";
    pub const REASON_STATS: &str = "DP_REASONS";
    /// Kernel-side scratch space (`CtScratch`), never pinned.
    pub const SCRATCH: &str = "DP_SCRATCH";
    /// Socket-level load balancing: per-socket translations
    /// (`SockNatKey` -> `SockNatValue`).
    pub const SOCK_NAT: &str = "DP_SOCK_NAT";
    /// Socket-level session affinity (`SockAffinityKey` -> `AffinityValue`).
    pub const SOCK_AFFINITY: &str = "DP_SOCK_AFFIN";
    /// Socket-level counters, one per `SockEvent`, per CPU.
    pub const SOCK_STATS: &str = "DP_SOCK_STATS";
}

/// The shape of every map: what a pinned map must match to be adopted by a
/// restarted agent (name, key size, value size, max entries).
pub mod map_shapes {
    use core::mem::size_of;

    use super::*;

    pub struct MapShape {
        pub name: &'static str,
        pub key_size: u32,
        pub value_size: u32,
        pub max_entries: u32,
    }

    const fn shape<K, V>(name: &'static str, max_entries: u32) -> MapShape {
        MapShape {
            name,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries,
        }
    }

    pub const ALL: [MapShape; 13] = [
        shape::<u32, ServiceName>(map_names::NAMES, limits::MAX_SERVICES),
        // LPM trie keys carry a u32 prefix length in front of the data.
        MapShape {
            name: map_names::SOURCE_RANGES,
            key_size: 4 + size_of::<SourceRangeKey>() as u32,
            value_size: 1,
            max_entries: limits::MAX_SOURCE_RANGES,
        },
        shape::<ServiceKey, ServiceValue>(map_names::SERVICES, limits::MAX_SERVICES),
        shape::<BackendKey, Backend>(map_names::BACKENDS, limits::MAX_BACKEND_SLOTS),
        shape::<MaglevKey, MaglevChunk>(map_names::MAGLEV, limits::MAX_MAGLEV_CHUNKS),
        shape::<CtKey, CtValue>(map_names::CONNTRACK, limits::MAX_CONNTRACK),
        shape::<AffinityKey, AffinityValue>(map_names::AFFINITY, limits::MAX_AFFINITY),
        shape::<u32, ServiceStats>(map_names::SERVICE_STATS, limits::MAX_SERVICES),
        shape::<u32, u64>(map_names::REASON_STATS, counters::ENTRIES),
        shape::<u32, DpConfig>(map_names::CONFIG, 1),
        shape::<SockNatKey, SockNatValue>(map_names::SOCK_NAT, limits::MAX_SOCK_NAT),
        shape::<SockAffinityKey, AffinityValue>(map_names::SOCK_AFFINITY, limits::MAX_AFFINITY),
        shape::<u32, u64>(map_names::SOCK_STATS, SOCK_EVENT_COUNT),
    ];
}

/// The read-only global the agent sets (at load time) to 1 to make the
/// programs log their decisions through aya-log (`--bpf-debug-log`). With 0
/// the verifier removes the logging code: no cost per packet.
pub const DEBUG_GLOBAL: &str = "DP_DEBUG";

/// Program names (the entry function symbols in the eBPF object).
pub mod program_names {
    pub const XDP: &str = "dp_xdp";
    pub const TC: &str = "dp_tc";
    /// Socket-level load balancing (cgroup sock_addr programs), with the
    /// hook each attaches to.
    pub const CONNECT4: &str = "dp_connect4";
    pub const CONNECT6: &str = "dp_connect6";
    pub const SENDMSG4: &str = "dp_sendmsg4";
    pub const SENDMSG6: &str = "dp_sendmsg6";
    pub const RECVMSG4: &str = "dp_recvmsg4";
    pub const RECVMSG6: &str = "dp_recvmsg6";
    pub const GETPEERNAME4: &str = "dp_getpeername4";
    pub const GETPEERNAME6: &str = "dp_getpeername6";
    /// Every socket-level program, as (program, hook name used in pins and
    /// messages).
    pub const SOCK: [(&str, &str); 8] = [
        (CONNECT4, "connect4"),
        (CONNECT6, "connect6"),
        (SENDMSG4, "sendmsg4"),
        (SENDMSG6, "sendmsg6"),
        (RECVMSG4, "recvmsg4"),
        (RECVMSG6, "recvmsg6"),
        (GETPEERNAME4, "getpeername4"),
        (GETPEERNAME6, "getpeername6"),
    ];
}

/// Default map capacities. The agent may override them at load time; the
/// kernel side only uses the ones that bound loops or index arithmetic.
pub mod limits {
    /// Service frontends (VIP, port, protocol) the maps hold.
    pub const MAX_SERVICES: u32 = 131_072;
    /// Backends one frontend can hold. Larger backend sets are truncated by
    /// the agent with a logged reason.
    pub const MAX_BACKENDS_PER_SERVICE: u32 = 1024;
    /// Entries of the backend slot map (both generations of every service).
    pub const MAX_BACKEND_SLOTS: u32 = 524_288;
    /// Connection tracking entries (two per flow: original and reply).
    pub const MAX_CONNTRACK: u32 = 262_144;
    /// Maglev table entries per chunk (one map value).
    pub const MAGLEV_CHUNK: u32 = 256;
    /// Chunks one generation of one service's table may use: tables up to
    /// 65536 entries.
    pub const MAGLEV_MAX_CHUNKS: u32 = 256;
    /// Session affinity entries (client, service) -> backend.
    pub const MAX_AFFINITY: u32 = 65_536;
    /// loadBalancerSourceRanges entries, all services together.
    pub const MAX_SOURCE_RANGES: u32 = 16_384;
    /// Entries of the Maglev chunk map (the map is not preallocated: this is
    /// a ceiling, memory follows use).
    pub const MAX_MAGLEV_CHUNKS: u32 = 1_048_576;
    /// Socket-level translations (one per socket connected to a Service,
    /// two per unconnected UDP socket and Service it sends to).
    pub const MAX_SOCK_NAT: u32 = 131_072;
}

/// Key of the service map: a frontend as clients address it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ServiceKey {
    /// Virtual address (VIP, node address, ...).
    pub addr: Addr,
    /// Frontend port, network byte order.
    pub port: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}

/// Value of the service map.
///
/// Backends of a service live in the backend map under
/// `BackendKey { service_id, slot: generation * MAX_BACKENDS_PER_SERVICE + i }`
/// for `i < backend_count`. The agent writes a new generation's slots first
/// and then replaces this value in one map update (hash map updates are
/// atomic for readers), so the datapath sees either the old backend set or the
/// new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceValue {
    /// Stable id of this frontend: index into the per-service counters and
    /// part of every backend key. Below `limits::MAX_SERVICES`.
    pub service_id: u32,
    /// Number of backends usable for new flows. 0 means "no endpoints".
    pub backend_count: u16,
    /// Which half of the slot space holds the current backend set (0 or 1).
    pub generation: u16,
    /// `SVC_F_*` bits.
    pub flags: u32,
    /// Size of the service's Maglev table (a prime), 0 when it has none.
    pub maglev_size: u32,
    /// sessionAffinity ClientIP timeout in seconds (with `SVC_F_AFFINITY`).
    pub affinity_timeout_s: u32,
    pub _pad: u32,
}

/// Key of the backend slot map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct BackendKey {
    pub service_id: u32,
    pub slot: u32,
}

impl BackendKey {
    /// The key of backend `index` in `generation` of `service_id`.
    #[inline(always)]
    pub fn new(service_id: u32, generation: u16, index: u32) -> Self {
        BackendKey {
            service_id,
            slot: (generation as u32 & 1) * limits::MAX_BACKENDS_PER_SERVICE + index,
        }
    }
}

/// Value of the backend slot map: where a flow is translated to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Backend {
    /// Backend address, of the family of the service it belongs to
    /// (`BACKEND_F_V6` says which, for readers without the service).
    pub addr: Addr,
    /// Backend port, network byte order.
    pub port: u16,
    /// `BACKEND_F_*` bits.
    pub flags: u16,
}

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
    /// `CT_F_*` bits: direction, TCP state, SNAT.
    pub flags: u16,
    /// As `snat_addr`, for the port.
    pub snat_port: u16,
    pub _pad: [u16; 3],
}

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
}

/// Service flag bits (`ServiceValue::flags`).
pub const SVC_F_NONE: u32 = 0;
/// New flows pick a backend at random instead of by Maglev.
pub const SVC_F_RANDOM: u32 = 1 << 0;
/// sessionAffinity ClientIP: new flows from a client go to the backend its
/// previous flow to this frontend went to, within `affinity_timeout_s`.
pub const SVC_F_AFFINITY: u32 = 1 << 1;
/// A frontend for traffic from outside the cluster (NodePort, LoadBalancer
/// ingress IP, externalIP) with externalTrafficPolicy Cluster: flows to a
/// backend on another node are SNATed to this node's address so that
/// replies come back through it.
pub const SVC_F_EXTERNAL: u32 = 1 << 2;
/// The backend set is empty because of a Local traffic policy (endpoints
/// exist on other nodes): drop, as kube-proxy does, instead of rejecting.
pub const SVC_F_DROP_NO_LOCAL: u32 = 1 << 3;
/// New flows must come from a source in `DP_SRC_RANGES` for this service
/// (loadBalancerSourceRanges); others are dropped.
pub const SVC_F_SOURCE_RANGES: u32 = 1 << 4;

/// The data part of a source range map key (an LPM trie, whose keys are
/// this behind a `u32` prefix length): the prefix length counts the 32 bits
/// of `service_id_be`, always matched whole, plus the prefix of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SourceRangeKey {
    /// Big-endian, so that the trie matches it as the leading 32 bits.
    pub service_id_be: u32,
    /// Of the service's family (an IPv4 prefix covers at most the first 4
    /// bytes; the zeros after never take part in its match).
    pub addr: Addr,
}

impl SourceRangeKey {
    pub const fn new(service_id: u32, addr: Addr) -> Self {
        SourceRangeKey {
            service_id_be: service_id.to_be(),
            addr,
        }
    }
}

/// The prefix length that looks up one address of one service (either
/// family: IPv4 entries have prefixes of at most 32 + 32 bits).
pub const SOURCE_RANGE_FULL_PREFIX: u32 = 32 + 128;

/// Key of the session affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    /// Client address, of the service's family.
    pub client: Addr,
    pub service_id: u32,
}

/// Value of the session affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AffinityValue {
    /// The backend the client's flows go to. Stored by address, not slot
    /// index, so it stays valid when the backend set changes; the agent
    /// deletes entries whose backend left the service.
    pub backend: Backend,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns()` of the client's last new flow to the service.
    pub last_seen_ns: u64,
}

/// Key of the socket translation map (`map_names::SOCK_NAT`), written by
/// the socket-level programs only.
///
/// A socket that connected to (or sent to) a Service frontend got a
/// backend instead; the entries remember that per socket:
/// - `SOCK_NAT_REVERSE`: `addr`/`port` are the backend; the value is the
///   frontend, shown to the application instead of the backend
///   (getpeername, the source of received datagrams);
/// - `SOCK_NAT_FORWARD`: `addr`/`port` are the frontend; the value is the
///   backend an unconnected UDP socket's datagrams to it go to (so that
///   they stick to one backend while the socket keeps talking).
///
/// Both families share the map; a socket of the IPv6 API talking to an
/// IPv4 Service through an IPv4-mapped address (`::ffff:a.b.c.d`) has
/// entries of family `FAMILY_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockNatKey {
    /// `bpf_get_socket_cookie()`: unique per socket while the kernel runs.
    pub cookie: u64,
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// `SOCK_NAT_REVERSE` or `SOCK_NAT_FORWARD`.
    pub dir: u8,
    pub _pad: u32,
}

/// `SockNatKey::dir`: backend -> frontend.
pub const SOCK_NAT_REVERSE: u8 = 0;
/// `SockNatKey::dir`: frontend -> backend (unconnected UDP).
pub const SOCK_NAT_FORWARD: u8 = 1;

/// Value of the socket translation map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockNatValue {
    /// Reverse entry: the frontend address. Forward entry: the backend.
    pub addr: Addr,
    /// As `addr`, network byte order.
    pub port: u16,
    /// `SOCK_F_*` bits.
    pub flags: u16,
    /// The frontend's service id (counters, inspection).
    pub service_id: u32,
    /// When the entry was written or last used, on the clock of conntrack
    /// entries (`bpf_ktime_get_coarse_ns()`); forward entries expire after
    /// the UDP conntrack timeouts of `DpConfig`.
    pub last_seen_ns: u64,
}

/// `SockNatValue::flags`: a datagram from the backend reached the socket
/// (forward entries then live `udp_stream_timeout_ns`, as conntrack).
pub const SOCK_F_SEEN_REPLY: u16 = 1 << 0;

/// Key of the socket-level session affinity map: sockets have no client
/// address when they connect, so a client is its network namespace (a pod,
/// or the node itself), as Cilium's socket-level affinity does.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockAffinityKey {
    /// `bpf_get_netns_cookie()` of the socket's network namespace.
    pub netns_cookie: u64,
    pub service_id: u32,
    pub _pad: u32,
}

/// What the socket-level programs did: each value indexes a per-CPU
/// counter in the `SOCK_STATS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SockEvent {
    /// A connect() to a frontend was sent to a backend instead.
    ConnectTranslated = 0,
    /// A UDP datagram sent to a frontend went to a backend.
    SendmsgTranslated = 1,
    /// A datagram received from a backend was shown as from the frontend.
    ReplyRestored = 2,
    /// getpeername() of a translated socket returned the frontend.
    PeerRestored = 3,
    /// connect() or sendmsg() to a frontend without endpoints failed with
    /// ECONNREFUSED (kube-proxy rejects such traffic too).
    RejectNoBackend = 4,
    /// A frontend the socket programs leave to the per-packet path
    /// (loadBalancerSourceRanges, a Local policy without local endpoints):
    /// not translated here.
    LeftToDatapath = 5,
    /// The backend slot the service points at was missing: not translated.
    BackendMissing = 6,
    /// The socket was translated but its entry could not be stored:
    /// getpeername()/recvmsg() will show the backend.
    NatEntryFailed = 7,
}

/// Number of `SockEvent` values; the size of the socket counter array.
pub const SOCK_EVENT_COUNT: u32 = 8;

impl SockEvent {
    pub const ALL: [SockEvent; SOCK_EVENT_COUNT as usize] = [
        SockEvent::ConnectTranslated,
        SockEvent::SendmsgTranslated,
        SockEvent::ReplyRestored,
        SockEvent::PeerRestored,
        SockEvent::RejectNoBackend,
        SockEvent::LeftToDatapath,
        SockEvent::BackendMissing,
        SockEvent::NatEntryFailed,
    ];

    /// A stable snake_case name for CLIs and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            SockEvent::ConnectTranslated => "connect_translated",
            SockEvent::SendmsgTranslated => "sendmsg_translated",
            SockEvent::ReplyRestored => "reply_restored",
            SockEvent::PeerRestored => "peer_restored",
            SockEvent::RejectNoBackend => "reject_no_backend",
            SockEvent::LeftToDatapath => "left_to_datapath",
            SockEvent::BackendMissing => "backend_missing",
            SockEvent::NatEntryFailed => "nat_entry_failed",
        }
    }
}

/// Datapath settings written by the agent (one entry, index 0, of the
/// config array). Zero timeouts mean "use the default" (see `Timeouts`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DpConfig {
    /// `ABI_VERSION` of the agent that wrote the pinned maps: a restarted
    /// agent refuses maps of another layout instead of misreading them.
    pub abi_version: u32,
    /// This node's address for SNAT (network byte order); 0: no SNAT (flows
    /// that need it are dropped and counted).
    pub snat_addr: u32,
    /// TCP flows that have not seen a reply yet.
    pub tcp_syn_timeout_ns: u64,
    /// TCP flows that have seen a reply.
    pub tcp_established_timeout_ns: u64,
    /// TCP flows that saw a FIN or RST.
    pub tcp_closing_timeout_ns: u64,
    /// UDP flows that have not seen a reply yet.
    pub udp_timeout_ns: u64,
    /// UDP flows that have seen a reply.
    pub udp_stream_timeout_ns: u64,
    /// This node's IPv6 address for SNAT of IPv6 flows; all zero: no SNAT
    /// for IPv6.
    pub snat_addr6: Addr,
}

/// Default conntrack timeouts, in seconds (netfilter's for UDP and SYN,
/// kube-proxy's setting for established TCP).
pub mod timeouts {
    pub const TCP_SYN_S: u64 = 60;
    pub const TCP_ESTABLISHED_S: u64 = 86_400;
    pub const TCP_CLOSING_S: u64 = 10;
    pub const UDP_S: u64 = 30;
    pub const UDP_STREAM_S: u64 = 120;
}

impl DpConfig {
    pub const fn defaults() -> Self {
        const NS: u64 = 1_000_000_000;
        DpConfig {
            abi_version: ABI_VERSION,
            snat_addr: 0,
            tcp_syn_timeout_ns: timeouts::TCP_SYN_S * NS,
            tcp_established_timeout_ns: timeouts::TCP_ESTABLISHED_S * NS,
            tcp_closing_timeout_ns: timeouts::TCP_CLOSING_S * NS,
            udp_timeout_ns: timeouts::UDP_S * NS,
            udp_stream_timeout_ns: timeouts::UDP_STREAM_S * NS,
            snat_addr6: [0; 4],
        }
    }

    /// How long an entry with `flags` of protocol `proto` lives without
    /// traffic. A zero setting (an agent that wrote no configuration) means
    /// the default.
    #[inline(always)]
    pub fn timeout_ns(&self, proto: u8, flags: u16) -> u64 {
        const D: DpConfig = DpConfig::defaults();
        let (set, default) = if proto == IPPROTO_TCP {
            if flags & CT_F_CLOSING != 0 {
                (self.tcp_closing_timeout_ns, D.tcp_closing_timeout_ns)
            } else if flags & CT_F_SEEN_REPLY != 0 {
                (self.tcp_established_timeout_ns, D.tcp_established_timeout_ns)
            } else {
                (self.tcp_syn_timeout_ns, D.tcp_syn_timeout_ns)
            }
        } else if flags & CT_F_SEEN_REPLY != 0 {
            (self.udp_stream_timeout_ns, D.udp_stream_timeout_ns)
        } else {
            (self.udp_timeout_ns, D.udp_timeout_ns)
        };
        if set == 0 {
            default
        } else {
            set
        }
    }
}

/// Value of the names map (service id -> `namespace/name:port`), written by
/// the agent for inspection (CLI, bpftool) and for a restarted agent; the
/// programs never read it. NUL-padded UTF-8, cut at 128 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceName {
    pub bytes: [u8; 128],
}

impl ServiceName {
    pub fn new(s: &str) -> Self {
        let mut bytes = [0u8; 128];
        let mut n = s.len().min(128);
        // Cut on a character boundary.
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        bytes[..n].copy_from_slice(&s.as_bytes()[..n]);
        ServiceName { bytes }
    }

    pub fn as_str(&self) -> &str {
        let end = self.bytes.iter().position(|b| *b == 0).unwrap_or(self.bytes.len());
        core::str::from_utf8(&self.bytes[..end]).unwrap_or("")
    }
}

/// Key of the Maglev map: one chunk of one generation of a service's table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct MaglevKey {
    pub service_id: u32,
    /// `generation * MAGLEV_MAX_CHUNKS + chunk index`.
    pub chunk: u32,
}

impl MaglevKey {
    /// The key of the chunk holding table position `pos`.
    #[inline(always)]
    pub fn new(service_id: u32, generation: u16, pos: u32) -> Self {
        MaglevKey {
            service_id,
            chunk: (generation as u32 & 1) * limits::MAGLEV_MAX_CHUNKS + pos / limits::MAGLEV_CHUNK,
        }
    }
}

// The largest supported table (65521) fits one generation's chunk range.
const _: () = assert!(65521 <= limits::MAGLEV_CHUNK * limits::MAGLEV_MAX_CHUNKS);

/// Value of the Maglev map: for each table position, the index of the
/// backend (in the same generation's backend slots) it maps to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct MaglevChunk {
    pub entries: [u16; limits::MAGLEV_CHUNK as usize],
}

/// Backend flag bits (`Backend::flags`).
pub const BACKEND_F_NONE: u16 = 0;
/// The backend runs on another node.
pub const BACKEND_F_REMOTE: u16 = 1 << 0;
/// The backend's address is IPv6.
pub const BACKEND_F_V6: u16 = 1 << 1;

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

/// Per-service counters, one per CPU, indexed by `service_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceStats {
    /// Packets translated towards a backend (new and established).
    pub packets: u64,
    /// Bytes of those packets (L3 length).
    pub bytes: u64,
    /// New flows created.
    pub new_flows: u64,
    /// Packets rejected or dropped because the service had no usable backend.
    pub no_backend: u64,
}

/// Why the datapath did what it did to a packet. Each value indexes a
/// per-CPU counter in the `REASON_STATS` map. Passing reasons are counted too,
/// so operators can see what fraction of traffic the programs touch.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Neither IPv4 nor IPv6 (ARP, LLDP, ...): passed untouched.
    PassNotIp = 0,
    /// IP but neither TCP nor UDP (nor an ICMP/ICMPv6 error about a
    /// translated flow): passed untouched.
    PassNotTcpUdp = 1,
    /// IPv4 fragment or IPv6 packet with a fragment header (first or
    /// later): passed untouched.
    PassFragment = 2,
    /// Headers shorter than they claim: passed untouched.
    PassTruncated = 3,
    /// Not addressed to a Service and not a reply of a tracked flow.
    PassNoService = 4,
    /// A new flow was created and translated.
    NatNewFlow = 5,
    /// A packet of a tracked flow was translated towards its backend.
    NatEstablished = 6,
    /// A reply of a tracked flow was translated back to the VIP.
    NatReply = 7,
    /// Dropped: the Service has no usable backend and the packet cannot be
    /// answered with a reject (a RST, a UDP packet with IP options, a failed
    /// rewrite).
    DropNoBackend = 8,
    /// Dropped: the backend slot the service points at is missing (the
    /// agent's writes are ordered so this should never be counted).
    DropBackendMissing = 9,
    /// Dropped: a packet rewrite or checksum helper failed.
    DropRewriteFailed = 10,
    /// A new flow was translated but its conntrack entries could not be
    /// stored (map update failed); the packet still goes to the backend.
    CtInsertFailed = 11,
    /// The Service has no usable backend: answered with a TCP RST or an ICMP
    /// port unreachable, as kube-proxy does.
    RejectNoBackend = 12,
    /// Dropped: a Local traffic policy and no endpoint on this node.
    DropNoLocalBackend = 13,
    /// Dropped: source not in the service's loadBalancerSourceRanges.
    DropSourceRange = 14,
    /// Dropped: the flow needed SNAT but no node address is configured or
    /// no free source port was found.
    DropSnatFailed = 15,
    /// An ICMP error quoting a translated flow was translated back for the
    /// client (quoted destination -> VIP, from the VIP when the backend sent
    /// it, SNAT undone).
    NatIcmpError = 16,
    /// IPv6 whose extension headers the datapath does not walk through
    /// (more than it follows, an unknown one, or a routing header with
    /// segments left: the destination is not final): passed untouched.
    PassExtHeaders = 17,
}

/// Number of `Reason` values; the size of the reason counter array.
pub const REASON_COUNT: u32 = 18;

/// Counters kept in the reason array after the reasons (per CPU, like them;
/// not reasons: a packet moves one reason and possibly some of these).
pub mod counters {
    use super::REASON_COUNT;
    /// Conntrack entries written for new flows (two per flow).
    pub const CT_CREATED: u32 = REASON_COUNT;
    /// Of those, entries written over an existing one (an expired entry, a
    /// SYN reusing a closed tuple): they evicted nothing.
    pub const CT_REPLACED: u32 = REASON_COUNT + 1;
    /// Size of the reason array.
    pub const ENTRIES: u32 = REASON_COUNT + 2;
}

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::PassNotIp,
        Reason::PassNotTcpUdp,
        Reason::PassFragment,
        Reason::PassTruncated,
        Reason::PassNoService,
        Reason::NatNewFlow,
        Reason::NatEstablished,
        Reason::NatReply,
        Reason::DropNoBackend,
        Reason::DropBackendMissing,
        Reason::DropRewriteFailed,
        Reason::CtInsertFailed,
        Reason::RejectNoBackend,
        Reason::DropNoLocalBackend,
        Reason::DropSourceRange,
        Reason::DropSnatFailed,
        Reason::NatIcmpError,
        Reason::PassExtHeaders,
    ];

    /// A stable snake_case name for CLIs and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotTcpUdp => "pass_not_tcp_udp",
            Reason::PassFragment => "pass_fragment",
            Reason::PassTruncated => "pass_truncated",
            Reason::PassNoService => "pass_no_service",
            Reason::NatNewFlow => "nat_new_flow",
            Reason::NatEstablished => "nat_established",
            Reason::NatReply => "nat_reply",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropBackendMissing => "drop_backend_missing",
            Reason::DropRewriteFailed => "drop_rewrite_failed",
            Reason::CtInsertFailed => "ct_insert_failed",
            Reason::RejectNoBackend => "reject_no_backend",
            Reason::DropNoLocalBackend => "drop_no_local_backend",
            Reason::DropSourceRange => "drop_source_range",
            Reason::DropSnatFailed => "drop_snat_failed",
            Reason::NatIcmpError => "nat_icmp_error",
            Reason::PassExtHeaders => "pass_ext_headers",
        }
    }

    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::DropNoBackend
                | Reason::DropBackendMissing
                | Reason::DropRewriteFailed
                | Reason::DropNoLocalBackend
                | Reason::DropSourceRange
                | Reason::DropSnatFailed
        )
    }
}

/// The hash that picks a backend for a new flow, from the original 5-tuple
/// (fields in network byte order, as in `CtKey`; addresses folded with
/// [`fold_addr`], see [`flow_hash_key`]). Shared so that the agent
/// (`trace`, tests) predicts exactly what the datapath chooses.
///
/// A multiply-xorshift mix: cheap in eBPF (no loops), and well spread in its
/// low bits, which the modulo by the backend count uses.
#[inline(always)]
pub fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h: u64 = ((saddr as u64) << 32) | daddr as u64;
    h ^= ((sport as u64) << 24) ^ ((dport as u64) << 8) ^ proto as u64;
    h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 32;
    h as u32
}

/// [`flow_hash`] of a conntrack key (either family).
#[inline(always)]
pub fn flow_hash_key(k: &CtKey) -> u32 {
    flow_hash(fold_addr(&k.saddr), fold_addr(&k.daddr), k.sport, k.dport, k.proto)
}

/// Internet checksum helpers for incremental updates (RFC 1624), used by the
/// XDP program where no checksum helper exists. Values are taken exactly as
/// loaded from the packet (network order in a native integer): one's
/// complement sums do not depend on byte order as long as every operand uses
/// the same one.
pub mod csum {
    #[inline(always)]
    pub fn fold(mut sum: u32) -> u16 {
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum as u16
    }

    /// The checksum `check` after a 32-bit field changed from `from` to `to`.
    #[inline(always)]
    pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
        let sum = (!check) as u32 + ((!from) >> 16) + ((!from) & 0xffff) + (to >> 16) + (to & 0xffff);
        !fold(sum)
    }

    /// The checksum `check` after a 16-bit field changed from `from` to `to`.
    #[inline(always)]
    pub fn replace2(check: u16, from: u16, to: u16) -> u16 {
        let sum = (!check) as u32 + (!from) as u32 + to as u32;
        !fold(sum)
    }
}

/// The benchmark programs (`dataplane-ebpf/src/bin/bench.rs` and
/// `baseline.rs`), built next to the dataplane but never loaded by the agent.
///
/// BPF_PROG_TEST_RUN with `repeat > 1` runs a program again on its own
/// output. The bench wrapper therefore copies a template frame over the
/// packet at the start of every run (optionally varying the flow or the
/// Service) and then runs the datapath; the same copy without the datapath
/// is measured on its own and subtracted.
pub mod bench {
    use super::*;

    /// Every bench frame is exactly this long (headers plus padding
    /// payload; an IPv6 TCP frame needs 74).
    pub const FRAME_LEN: usize = 96;
    /// Offsets of the fields the wrapper varies, Ethernet + IPv4 without
    /// options: (source address, destination address, source port,
    /// destination port); for IPv6 the low 32-bit word of each address.
    pub const OFFSETS_V4: [u32; 4] = [26, 30, 34, 36];
    pub const OFFSETS_V6: [u32; 4] = [14 + 8 + 12, 14 + 24 + 12, 54, 56];

    /// Every run gets a new source address/port: every run is a new flow.
    pub const VARY_FLOW: u32 = 1;
    /// Run `n` goes to Service `n % services` (see `service_frontend`).
    pub const VARY_SERVICE: u32 = 2;

    /// Services of the per-packet benchmark: VIP 198.19.0.0 + (i mod 65536),
    /// port 80 + i / 65536, so that 100,000 of them stay in 198.19.0.0/16.
    pub const fn service_frontend(i: u32) -> (u32, u16) {
        (0xc613_0000 + (i & 0xffff), 80 + (i >> 16) as u16)
    }

    /// Value of `BENCH_FRAME[0]`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
    pub struct BenchFrame {
        /// `VARY_*` bits.
        pub vary: u32,
        /// How many Services `VARY_SERVICE` walks over (at least 1).
        pub services: u32,
        /// Where the varied fields are: `OFFSETS_V4` or `OFFSETS_V6`.
        pub offsets: [u32; 4],
        pub bytes: [u8; FRAME_LEN],
    }

    pub mod names {
        /// Array, one `BenchFrame`.
        pub const FRAME: &str = "BENCH_FRAME";
        /// Array, one u64: the run counter that drives the variations (not
        /// per-CPU: runs that migrate between CPUs must not repeat tuples).
        pub const SEQ: &str = "BENCH_SEQ";
        /// The baseline's own service map (same key, value and size as
        /// `DP_SERVICES`).
        pub const BASELINE_SERVICES: &str = "BL_SERVICES";
        /// XDP: returns XDP_PASS.
        pub const EMPTY: &str = "bl_empty";
        /// XDP: parses and looks the destination up in `BL_SERVICES`.
        pub const PARSE_LOOKUP: &str = "bl_parse_lookup";
        /// XDP/TC: restores (and varies) the frame, then runs the datapath.
        pub const WRAP_XDP: &str = "bench_xdp";
        pub const WRAP_TC: &str = "bench_tc";
        /// XDP/TC: only restores (and varies) the frame.
        pub const FRAME_XDP: &str = "bench_frame_xdp";
        pub const FRAME_TC: &str = "bench_frame_tc";
    }
}

#[cfg(feature = "user")]
pub use user::{addr_of, family_of, ip_of};

/// User-side constructors and conversions (feature `user`).
#[cfg(feature = "user")]
pub mod user {
    use super::*;

    // SAFETY: every type below is #[repr(C)], has no padding bytes that are
    // not explicit fields, and is bytemuck::Pod (checked by the derive).
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for MaglevKey {}
    unsafe impl aya::Pod for MaglevChunk {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for DpConfig {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for bench::BenchFrame {}
    unsafe impl aya::Pod for SockNatKey {}
    unsafe impl aya::Pod for SockNatValue {}
    unsafe impl aya::Pod for SockAffinityKey {}

    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    /// `ip` as an [`Addr`] and its family tag.
    pub fn addr_of(ip: IpAddr) -> (Addr, u8) {
        match ip {
            IpAddr::V4(a) => (v4_addr(u32::from_ne_bytes(a.octets())), FAMILY_V4),
            IpAddr::V6(a) => {
                let o = a.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                ([w(0), w(4), w(8), w(12)], FAMILY_V6)
            }
        }
    }

    /// The address `a` of `family` (`FAMILY_V6`, anything else is IPv4).
    pub fn ip_of(a: &Addr, family: u8) -> IpAddr {
        if family == FAMILY_V6 {
            let mut o = [0u8; 16];
            for (i, w) in a.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(o))
        } else {
            IpAddr::V4(Ipv4Addr::from(a[0].to_ne_bytes()))
        }
    }

    /// The family tag of `ip`.
    pub fn family_of(ip: IpAddr) -> u8 {
        if ip.is_ipv6() {
            FAMILY_V6
        } else {
            FAMILY_V4
        }
    }

    impl ServiceKey {
        /// From host-order values.
        pub fn new(addr: impl Into<IpAddr>, port: u16, proto: u8) -> Self {
            let (addr, family) = addr_of(addr.into());
            ServiceKey {
                addr,
                port: port.to_be(),
                proto,
                family,
            }
        }
        pub fn ip(&self) -> IpAddr {
            ip_of(&self.addr, self.family)
        }
        pub fn host_port(&self) -> u16 {
            u16::from_be(self.port)
        }
        pub fn is_v6(&self) -> bool {
            self.family == FAMILY_V6
        }
    }

    impl Backend {
        /// From host-order values.
        pub fn new(addr: impl Into<IpAddr>, port: u16) -> Self {
            let (addr, family) = addr_of(addr.into());
            Backend {
                addr,
                port: port.to_be(),
                flags: if family == FAMILY_V6 {
                    BACKEND_F_V6
                } else {
                    BACKEND_F_NONE
                },
            }
        }
        pub fn ip(&self) -> IpAddr {
            ip_of(&self.addr, self.family())
        }
        pub fn family(&self) -> u8 {
            if self.flags & BACKEND_F_V6 != 0 {
                FAMILY_V6
            } else {
                FAMILY_V4
            }
        }
        pub fn host_port(&self) -> u16 {
            u16::from_be(self.port)
        }
    }

    impl CtKey {
        /// From host-order values; both addresses of one family.
        pub fn new(saddr: impl Into<IpAddr>, sport: u16, daddr: impl Into<IpAddr>, dport: u16, proto: u8) -> Self {
            let (saddr, family) = addr_of(saddr.into());
            let (daddr, _) = addr_of(daddr.into());
            CtKey {
                saddr,
                daddr,
                sport: sport.to_be(),
                dport: dport.to_be(),
                proto,
                family,
                _pad: 0,
            }
        }
        pub fn src_ip(&self) -> IpAddr {
            ip_of(&self.saddr, self.family)
        }
        pub fn dst_ip(&self) -> IpAddr {
            ip_of(&self.daddr, self.family)
        }
    }

    impl DpConfig {
        /// The SNAT address of `family`, `None` when unset.
        pub fn snat_ip(&self, family: u8) -> Option<IpAddr> {
            let a = if family == FAMILY_V6 {
                self.snat_addr6
            } else {
                v4_addr(self.snat_addr)
            };
            (a != [0; 4]).then(|| ip_of(&a, family))
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    // These pin the ABI: the eBPF object was compiled against these layouts,
    // and the agent writes maps with them. A change here must bump
    // ABI_VERSION.
    #[test]
    fn service_key_layout() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(align_of::<ServiceKey>(), 4);
        assert_eq!(offset_of!(ServiceKey, addr), 0);
        assert_eq!(offset_of!(ServiceKey, port), 16);
        assert_eq!(offset_of!(ServiceKey, proto), 18);
        assert_eq!(offset_of!(ServiceKey, family), 19);
    }

    #[test]
    fn service_value_layout() {
        assert_eq!(size_of::<ServiceValue>(), 24);
        assert_eq!(offset_of!(ServiceValue, affinity_timeout_s), 16);
        assert_eq!(offset_of!(ServiceValue, service_id), 0);
        assert_eq!(offset_of!(ServiceValue, backend_count), 4);
        assert_eq!(offset_of!(ServiceValue, generation), 6);
        assert_eq!(offset_of!(ServiceValue, flags), 8);
        assert_eq!(offset_of!(ServiceValue, maglev_size), 12);
    }

    #[test]
    fn socket_lb_layout() {
        assert_eq!(size_of::<SockNatKey>(), 32);
        assert_eq!(offset_of!(SockNatKey, cookie), 0);
        assert_eq!(offset_of!(SockNatKey, addr), 8);
        assert_eq!(offset_of!(SockNatKey, port), 24);
        assert_eq!(offset_of!(SockNatKey, family), 26);
        assert_eq!(offset_of!(SockNatKey, dir), 27);
        assert_eq!(size_of::<SockNatValue>(), 32);
        assert_eq!(offset_of!(SockNatValue, port), 16);
        assert_eq!(offset_of!(SockNatValue, flags), 18);
        assert_eq!(offset_of!(SockNatValue, service_id), 20);
        assert_eq!(offset_of!(SockNatValue, last_seen_ns), 24);
        assert_eq!(size_of::<SockAffinityKey>(), 16);
        assert_eq!(offset_of!(SockAffinityKey, service_id), 8);
        for (i, e) in SockEvent::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i);
            assert!(SockEvent::ALL[..i].iter().all(|o| o.name() != e.name()));
        }
    }

    #[test]
    fn affinity_and_config_layout() {
        assert_eq!(size_of::<AffinityKey>(), 20);
        assert_eq!(offset_of!(AffinityKey, service_id), 16);
        assert_eq!(size_of::<AffinityValue>(), 32);
        assert_eq!(offset_of!(AffinityValue, last_seen_ns), 24);
        assert_eq!(size_of::<DpConfig>(), 64);
        assert_eq!(offset_of!(DpConfig, snat_addr6), 48);
        assert_eq!(offset_of!(DpConfig, snat_addr), 4);
        assert_eq!(offset_of!(DpConfig, tcp_syn_timeout_ns), 8);
        assert_eq!(offset_of!(DpConfig, udp_stream_timeout_ns), 40);
    }

    #[test]
    fn service_names_round_trip_and_cut_on_char_boundaries() {
        assert_eq!(ServiceName::new("shop/web:http").as_str(), "shop/web:http");
        let long = "é".repeat(100); // 200 bytes
        let n = ServiceName::new(&long);
        assert_eq!(n.as_str().len(), 128);
        assert_eq!(size_of::<ServiceName>(), 128);
    }

    #[test]
    fn timeouts_follow_state() {
        let c = DpConfig::defaults();
        let s = 1_000_000_000;
        assert_eq!(c.timeout_ns(IPPROTO_TCP, CT_F_ORIGINAL), 60 * s);
        assert_eq!(c.timeout_ns(IPPROTO_TCP, CT_F_ORIGINAL | CT_F_SEEN_REPLY), 86_400 * s);
        assert_eq!(c.timeout_ns(IPPROTO_TCP, CT_F_SEEN_REPLY | CT_F_CLOSING), 10 * s);
        assert_eq!(c.timeout_ns(IPPROTO_UDP, CT_F_ORIGINAL), 30 * s);
        assert_eq!(c.timeout_ns(IPPROTO_UDP, CT_F_SEEN_REPLY), 120 * s);
        let unset = DpConfig::default();
        assert_eq!(
            unset.timeout_ns(IPPROTO_UDP, CT_F_ORIGINAL),
            30 * s,
            "zero means default"
        );
        let short = DpConfig {
            udp_timeout_ns: 5,
            ..DpConfig::default()
        };
        assert_eq!(short.timeout_ns(IPPROTO_UDP, CT_F_ORIGINAL), 5);
    }

    #[test]
    fn maglev_layout() {
        assert_eq!(size_of::<MaglevKey>(), 8);
        assert_eq!(offset_of!(MaglevKey, chunk), 4);
        assert_eq!(size_of::<MaglevChunk>(), 2 * limits::MAGLEV_CHUNK as usize);
        assert_eq!(
            MaglevKey::new(1, 1, 300),
            MaglevKey {
                service_id: 1,
                chunk: limits::MAGLEV_MAX_CHUNKS + 1
            }
        );
    }

    #[test]
    fn backend_layout() {
        assert_eq!(size_of::<BackendKey>(), 8);
        assert_eq!(offset_of!(BackendKey, slot), 4);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(offset_of!(Backend, addr), 0);
        assert_eq!(offset_of!(Backend, port), 16);
        assert_eq!(offset_of!(Backend, flags), 18);
    }

    #[test]
    fn conntrack_layout() {
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(offset_of!(CtKey, saddr), 0);
        assert_eq!(offset_of!(CtKey, daddr), 16);
        assert_eq!(offset_of!(CtKey, sport), 32);
        assert_eq!(offset_of!(CtKey, dport), 34);
        assert_eq!(offset_of!(CtKey, proto), 36);
        assert_eq!(offset_of!(CtKey, family), 37);
        assert_eq!(size_of::<CtValue>(), 64);
        assert_eq!(align_of::<CtValue>(), 8);
        assert_eq!(offset_of!(CtValue, nat_addr), 0);
        assert_eq!(offset_of!(CtValue, snat_addr), 16);
        assert_eq!(offset_of!(CtValue, created_ns), 32);
        assert_eq!(offset_of!(CtValue, last_seen_ns), 40);
        assert_eq!(offset_of!(CtValue, service_id), 48);
        assert_eq!(offset_of!(CtValue, nat_port), 52);
        assert_eq!(offset_of!(CtValue, flags), 54);
        assert_eq!(offset_of!(CtValue, snat_port), 56);
        assert_eq!(size_of::<SourceRangeKey>(), 20);
        assert_eq!(offset_of!(SourceRangeKey, addr), 4);
    }

    #[test]
    fn stats_layout() {
        assert_eq!(size_of::<ServiceStats>(), 32);
        assert_eq!(offset_of!(ServiceStats, new_flows), 16);
    }

    #[test]
    fn reasons_are_dense_and_named_uniquely() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32, "{r:?} is out of place");
        }
        let mut names: std::vec::Vec<_> = Reason::ALL.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), REASON_COUNT as usize);
    }

    #[test]
    fn backend_key_generations_do_not_overlap() {
        let a = BackendKey::new(7, 0, limits::MAX_BACKENDS_PER_SERVICE - 1);
        let b = BackendKey::new(7, 1, 0);
        assert!(a.slot < b.slot);
        assert_eq!(BackendKey::new(7, 2, 3), BackendKey::new(7, 0, 3));
    }

    /// Reference: the full Internet checksum of `words`.
    fn full_csum(words: &[u16]) -> u16 {
        let mut sum: u32 = 0;
        for w in words {
            sum += *w as u32;
        }
        !csum::fold(sum)
    }

    #[test]
    fn incremental_checksum_matches_recomputation() {
        let mut words = [
            0x4500u16, 0x0073, 0x0000, 0x4000, 0x4011, 0, 0xc0a8, 0x0001, 0xc0a8, 0x00c7,
        ];
        words[5] = full_csum(&words);
        let old = ((words[8] as u32) << 16) | words[9] as u32;
        let new = 0xc613_0a0bu32;
        let updated = csum::replace4(words[5], old, new);
        words[8] = (new >> 16) as u16;
        words[9] = new as u16;
        words[5] = 0;
        assert_eq!(updated, full_csum(&words));
        let updated = csum::replace2(updated, words[0], 0x4501);
        words[0] = 0x4501;
        assert_eq!(updated, full_csum(&words));
    }

    #[cfg(feature = "user")]
    #[test]
    fn addresses_round_trip_in_both_families() {
        use core::net::IpAddr;
        for s in ["198.19.0.10", "2001:db8::10", "fd00::1:2:3:4", "0.0.0.1"] {
            let ip: IpAddr = s.parse().unwrap();
            let (a, f) = user::addr_of(ip);
            assert_eq!(user::ip_of(&a, f), ip, "{s}");
        }
        // IPv4 sits in word 0 in packet byte order, the rest is zero.
        let (a, f) = user::addr_of("198.19.0.10".parse().unwrap());
        assert_eq!(f, FAMILY_V4);
        assert_eq!(a, [u32::from_ne_bytes([198, 19, 0, 10]), 0, 0, 0]);
        let k4 = ServiceKey::new(core::net::Ipv4Addr::new(198, 19, 0, 10), 80, IPPROTO_TCP);
        let k6 = ServiceKey::new("c613:a::".parse::<core::net::Ipv6Addr>().unwrap(), 80, IPPROTO_TCP);
        assert_ne!(k4, k6, "the family keeps look-alike keys apart");
        let b = Backend::new("2001:db8::5".parse::<IpAddr>().unwrap(), 8080);
        assert_eq!(b.ip(), "2001:db8::5".parse::<IpAddr>().unwrap());
        assert_eq!(b.host_port(), 8080);
    }

    #[test]
    fn flow_hash_of_an_ipv4_key_is_the_ipv4_hash() {
        let k = CtKey {
            saddr: v4_addr(0x0102_0304),
            daddr: v4_addr(0x0506_0708),
            sport: 1,
            dport: 2,
            proto: 6,
            family: FAMILY_V4,
            _pad: 0,
        };
        assert_eq!(flow_hash_key(&k), flow_hash(0x0102_0304, 0x0506_0708, 1, 2, 6));
    }

    #[test]
    fn flow_hash_spreads_over_small_moduli() {
        // 3 backends, 3000 flows differing only in source port: each backend
        // must get a fair share (the e2e tests rely on a spread).
        let mut buckets = [0u32; 3];
        for p in 0..3000u16 {
            let h = flow_hash(0x0102_0304, 0x0506_0708, (32768 + p).to_be(), 80u16.to_be(), 6);
            buckets[(h % 3) as usize] += 1;
        }
        for b in buckets {
            assert!((800..1200).contains(&b), "unbalanced: {buckets:?}");
        }
    }
}
