//! The socket-level (cgroup) programs' translations and events.

use bytemuck::{Pod, Zeroable};

use crate::*;

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
