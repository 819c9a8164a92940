//! Why a packet took the path it took: every verdict is counted by reason.

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
    /// agent writes new slots before the flip and deletes old ones a grace
    /// period after it, so this should never be counted).
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
