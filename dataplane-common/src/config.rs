//! The datapath's run-time configuration (one array entry the agent writes).

use bytemuck::{Pod, Zeroable};

use crate::*;

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
