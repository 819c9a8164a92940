//! Names shared with the eBPF object: maps, programs, globals.

use crate::*;

/// Map names as they appear in the eBPF object (the symbol names of the map
/// statics). The kernel truncates names to 15 bytes: all of these fit but
/// `BACKEND_FILTER`, which it shows as `DP_BACKEND_FILT`.
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
    /// Conntrack event counters, one per `CtEvent`, per CPU.
    pub const CT_EVENTS: &str = "DP_CT_EVENTS";
    /// Host routing's counters (`RouteEvent` -> per-CPU u64).
    pub const ROUTE_EVENTS: &str = "DP_ROUTE_EVENTS";
    /// The ClusterIP filter (`VipFilter`), one entry.
    pub const VIP_FILTER: &str = "DP_VIP_FILTER";
    /// The backend filter (`BackendFilter`, one entry): the entries of
    /// every address that was a backend of a flow.
    pub const BACKEND_FILTER: &str = "DP_BACKEND_FILTER";
    /// The frontend cache (`FrontendBucket`, `FRONTEND_CACHE_BUCKETS`
    /// entries): service ids of frontends by hashed key, for established
    /// packets.
    pub const FRONTEND_CACHE: &str = "DP_FE_CACHE";
    /// The frontend filter (`FrontendFilter`, one entry): a bit per hashed
    /// address that has a frontend, read before the service map.
    pub const FRONTEND_FILTER: &str = "DP_FE_FILTER";
    /// The flood guard's reply entries of flows without state yet
    /// (`CtKey` -> `CtValue`, `limits::MAX_CT_SYN`), never pinned: a
    /// restart of the programs forgets at most the handshakes under way.
    pub const CT_SYN: &str = "DP_CT_SYN";
    /// When the flood guard last served a UDP datagram without state (the
    /// conntrack clock, one `u64`; 0: never), never pinned: UDP packets
    /// that match no conntrack entry look `DP_CT_SYN` up only within a UDP
    /// timeout of that.
    pub const GUARD: &str = "DP_GUARD";
    /// The kinds of the node's interfaces (ifindex -> `IFACE_F_*` bits),
    /// written by the agent as interfaces come and go, for host routing;
    /// never pinned (a new agent writes its own).
    pub const IFACES: &str = "DP_IFACES";
    /// The endpoint set (`EndpointKey` -> 1): every backend of the
    /// programmed frontends, written by the agent only while socket-level
    /// connections are host-routed (`SOCK_ROUTING_GLOBAL`), empty
    /// otherwise. Sized as the backend slots (`--backends-max-entries`):
    /// every endpoint has at least one slot.
    pub const ENDPOINTS: &str = "DP_ENDPOINTS";
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

    pub const ALL: [MapShape; 20] = [
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
        shape::<u32, u64>(map_names::CT_EVENTS, CT_EVENT_SLOTS),
        shape::<u32, u64>(map_names::ROUTE_EVENTS, ROUTE_EVENT_SLOTS),
        shape::<u32, VipFilter>(map_names::VIP_FILTER, 1),
        shape::<u32, BackendFilter>(map_names::BACKEND_FILTER, 1),
        shape::<EndpointKey, u8>(map_names::ENDPOINTS, limits::MAX_BACKEND_SLOTS),
        shape::<u32, FrontendBucket>(map_names::FRONTEND_CACHE, FRONTEND_CACHE_BUCKETS),
        shape::<u32, FrontendFilter>(map_names::FRONTEND_FILTER, 1),
    ];
}

/// The previous conntrack map while a migration of conntrack to a new size
/// is under way (see `CT_MIGRATE_GLOBAL`); never pinned under its own name.
pub const CT_PREV_MAP: &str = "DP_CT_PREV";

/// The read-only global the agent sets (at load time) to 1 while it
/// migrates conntrack to a map of another size: the programs then read
/// `CT_PREV_MAP` (the old map) on a miss and write new flows to both maps,
/// so a flow started by the old programs is found by the new ones and the
/// other way round while the links are swapped one by one. With 0 the
/// verifier removes that code.
pub const CT_MIGRATE_GLOBAL: &str = "DP_CT_MIGRATE";

/// The read-only global the agent sets (at load time) to 1 to make the
/// programs log their decisions through aya-log (`--bpf-debug-log`). With 0
/// the verifier removes the logging code: no cost per packet.
pub const DEBUG_GLOBAL: &str = "DP_DEBUG";

/// The read-only global the agent sets (at load time) to the helpers this
/// kernel offers that the programs use when present ([`kernel_features`]).
/// A feature's bit at 0 makes the programs take the older path, and the
/// verifier removes the newer one, so the object loads on kernels that lack
/// the helper.
pub const KERNEL_GLOBAL: &str = "DP_KERNEL";

/// Read-only global: the source ports SNAT picks from, `low | high << 16`
/// (host order, inclusive), set by the agent at load time; 0 means
/// [`DEFAULT_SNAT_PORTS`].
pub const SNAT_PORTS_GLOBAL: &str = "DP_SNAT_PORTS";

/// SNAT source ports when the loader sets none: below kube-apiserver's
/// default NodePort range (30000-32767) and Linux's default ephemeral
/// range (32768-60999), so that no socket of the node picks one of them
/// for a connection of its own. The agent computes its range from the
/// node's actual settings (`dataplane::node::snat_ports`).
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (1024, 29999);

/// Read-only global: new TCP flows (SYNs of Maglev frontends without
/// session affinity) per CPU per second that get conntrack
/// state (the flood guard); beyond it, TCP SYNs of Maglev frontends are
/// translated without state until the next second (`CtEvent::StatelessNewFlow`).
/// 0 turns the guard off. Set by the agent at load time
/// (`--new-flows-per-cpu`).
pub const NEW_FLOWS_GLOBAL: &str = "DP_NEW_FLOWS";

/// Read-only global: 1 when translated packets go straight to the FIB's
/// egress interface from TC (host routing, `--host-routing`), 0 when they
/// go back to the stack. Set by the agent at load time.
pub const HOST_ROUTING_GLOBAL: &str = "DP_HOST_ROUTING";

/// Read-only global: 1 when, besides translated packets, TC host-routes
/// the packets of connections the socket-level programs translated (a
/// packet of no Service to or from an endpoint in `map_names::ENDPOINTS`).
/// The agent sets it at load time when host routing, socket-level load
/// balancing and `--socket-host-routing` are all on; with 0 the verifier
/// removes that code.
pub const SOCK_ROUTING_GLOBAL: &str = "DP_SOCK_ROUTING";

/// Read-only global: where `skb->ip_summed` lies in this kernel's
/// `struct sk_buff` ([`skb_summed::encode`]), found by the agent in the
/// kernel's BTF at load time; 0 where it is not known (no BTF, or no
/// kfunc `bpf_cast_to_kern_ctx`: kernels before 6.2). With it TC updates
/// L4 checksums itself for the kinds of skb it can (a full checksum not
/// covered by `skb->csum`, or a `CHECKSUM_PARTIAL` pseudo-header sum) and
/// calls `bpf_l4_csum_replace` only for `CHECKSUM_COMPLETE`; with 0 it
/// always calls the helper, and the verifier removes the other code.
pub const SKB_SUMMED_GLOBAL: &str = "DP_SKB_SUMMED";

/// The value of [`SKB_SUMMED_GLOBAL`], and the call the programs read
/// `skb->ip_summed` through.
pub mod skb_summed {
    /// The 2-bit field's byte offset in `struct sk_buff` and its bit
    /// offset in that byte (little-endian bitfields), with bit 31 set.
    pub const fn encode(byte_off: u16, shift: u8) -> u32 {
        1 << 31 | (shift as u32 & 7) << 16 | byte_off as u32
    }

    /// `(byte offset, bit offset)` of a non-zero value.
    pub const fn decode(v: u32) -> Option<(u16, u8)> {
        if v & 1 << 31 == 0 {
            return None;
        }
        Some(((v & 0xffff) as u16, ((v >> 16) & 7) as u8))
    }

    /// `skb->ip_summed` values (`include/linux/skbuff.h`).
    pub const CHECKSUM_NONE: u8 = 0;
    pub const CHECKSUM_UNNECESSARY: u8 = 1;
    pub const CHECKSUM_COMPLETE: u8 = 2;
    pub const CHECKSUM_PARTIAL: u8 = 3;

    /// The immediate of the placeholder instruction the object holds where
    /// TC calls the kfunc `bpf_cast_to_kern_ctx`: our toolchain cannot
    /// emit a kfunc call with a relocation, so the program carries
    /// `call` with `src_reg` = `BPF_PSEUDO_KFUNC_CALL` and this immediate,
    /// and the loader replaces the immediate with the kfunc's BTF id, or
    /// the whole instruction with `r0 = 0` where the kernel lacks it
    /// (`dataplane::bpf::kfunc`). Never a valid BTF id of vmlinux.
    pub const PLACEHOLDER_IMM: u32 = 0x7dc5_ca57;

    /// The placeholder instruction as the object stores it (little-endian
    /// `struct bpf_insn`: code `BPF_JMP | BPF_CALL`, `src_reg` 2).
    pub const PLACEHOLDER_INSN: u64 = 0x85 | 0x20 << 8 | (PLACEHOLDER_IMM as u64) << 32;

    /// `r0 = 0` (`BPF_ALU64 | BPF_MOV | BPF_K`), what replaces the
    /// placeholder on kernels without the kfunc.
    pub const MOV_R0_0: u64 = 0xb7;
}

/// [`NEW_FLOWS_GLOBAL`] when the agent is not told otherwise.
pub const DEFAULT_NEW_FLOWS_PER_CPU: u32 = 10_000;

/// Bits of [`KERNEL_GLOBAL`].
pub mod kernel_features {
    /// `bpf_ktime_get_coarse_ns` (5.11): else `bpf_ktime_get_ns`, the same
    /// clock (CLOCK_MONOTONIC) read precisely, 10-20 ns dearer.
    pub const COARSE_CLOCK: u32 = 1;
    /// `bpf_set_retval` in cgroup sock_addr programs (5.18): a connect() to
    /// a Service without endpoints fails with ECONNREFUSED; else with EPERM,
    /// the error of a refusing cgroup program.
    pub const SET_RETVAL: u32 = 2;
    /// `BPF_F_IPV6` of `bpf_l4_csum_replace` (6.16): the helper leaves
    /// `skb->csum` alone for IPv6 address changes, whose L4 checksum
    /// change cancels the address change in a `CHECKSUM_COMPLETE` sum;
    /// else the helper subtracts the difference from `skb->csum` and TC
    /// adds it back with `bpf_csum_update`. Found by loading and running a
    /// probe program (`dataplane::bpf::kernel`), not a helper probe.
    pub const CSUM_IPV6: u32 = 4;
    /// The kfunc `bpf_cast_to_kern_ctx` (6.2) and `sk_buff.ip_summed` in
    /// the kernel's BTF, checked by a probe program
    /// (`dataplane::bpf::kfunc`): TC updates L4 checksums itself except
    /// under `CHECKSUM_COMPLETE` ([`super::SKB_SUMMED_GLOBAL`]); else every
    /// TC rewrite calls `bpf_l4_csum_replace`.
    pub const SKB_SUMMED: u32 = 8;
}

/// Program names (the entry function symbols in the eBPF object).
pub mod program_names {
    /// XDP, loaded with `BPF_F_XDP_HAS_FRAGS` (5.18).
    pub const XDP: &str = "dp_xdp";
    /// The same XDP program without the frags flag (names are cut at 15
    /// bytes by the kernel: this one fits), for kernels before
    /// 5.18 (the agent loads it when the kernel refuses [`XDP`]).
    pub const XDP_NO_FRAGS: &str = "dp_xdp_nofrags";
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
    /// Removes a released socket's socket-level translation (a cgroup
    /// `sock_release` program, 5.10+; attached with the others).
    pub const SOCK_RELEASE: &str = "dp_sock_release";
    /// Its hook name in pins and messages.
    pub const SOCK_RELEASE_HOOK: &str = "sock_release";
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
