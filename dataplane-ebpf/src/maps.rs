//! The BPF maps. Types, names and default sizes come from dataplane-common.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use dataplane_common::{
    counters, limits, AffinityKey, AffinityValue, Backend, BackendKey, CtKey, CtScratch, CtValue, DpConfig,
    MaglevChunk, MaglevKey, ServiceKey, ServiceName, ServiceStats, ServiceValue, SockAffinityKey, SockNatKey,
    SockNatValue, SourceRangeKey, VipFilter, CT_EVENT_SLOTS, ROUTE_EVENT_SLOTS, SOCK_EVENT_COUNT,
};

/// Hash maps written by the agent are not preallocated: an updated element is
/// freed only after an RCU grace period, so a lookup never reads an element
/// that is being recycled for another key (the agent's atomic backend-set
/// swap relies on this).
const BPF_F_NO_PREALLOC: u32 = 1;

#[map]
pub static DP_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(limits::MAX_SERVICES, BPF_F_NO_PREALLOC);

#[map]
pub static DP_BACKENDS: HashMap<BackendKey, Backend> =
    HashMap::with_max_entries(limits::MAX_BACKEND_SLOTS, BPF_F_NO_PREALLOC);

#[map]
pub static DP_MAGLEV: HashMap<MaglevKey, MaglevChunk> =
    HashMap::with_max_entries(limits::MAX_MAGLEV_CHUNKS, BPF_F_NO_PREALLOC);

#[map]
pub static DP_CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(limits::MAX_CONNTRACK, 0);

#[map]
pub static DP_SVC_STATS: PerCpuArray<ServiceStats> = PerCpuArray::with_max_entries(limits::MAX_SERVICES, 0);

#[map]
pub static DP_REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::ENTRIES, 0);

#[map]
pub static DP_AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::with_max_entries(limits::MAX_AFFINITY, 0);

/// Socket-level load balancing (`sock.rs`): what each translated socket
/// talks to, see `SockNatKey`.
#[map]
pub static DP_SOCK_NAT: LruHashMap<SockNatKey, SockNatValue> = LruHashMap::with_max_entries(limits::MAX_SOCK_NAT, 0);

/// Socket-level sessionAffinity ClientIP, per network namespace.
#[map]
pub static DP_SOCK_AFFIN: LruHashMap<SockAffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(limits::MAX_AFFINITY, 0);

/// Socket-level counters, one per `SockEvent`.
#[map]
pub static DP_SOCK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SOCK_EVENT_COUNT, 0);

/// The ClusterIP filter (see `VipFilter`).
#[map]
pub static DP_VIP_FILTER: Array<VipFilter> = Array::with_max_entries(1, 0);

/// Whether `addr`'s bit is set in the ClusterIP filter: only then can it
/// have an entry for the ports its Service lacks.
#[inline(always)]
pub fn maybe_cluster_ip(addr: &dataplane_common::Addr) -> bool {
    let bit = dataplane_common::vip_filter_bit(addr);
    match DP_VIP_FILTER.get(0) {
        Some(f) => f.bits[(bit >> 6) as usize & (dataplane_common::VIP_FILTER_WORDS - 1)] & (1 << (bit & 63)) != 0,
        None => false,
    }
}

/// The frontend filter (see `FrontendFilter`).
#[map]
pub static DP_FE_FILTER: Array<dataplane_common::FrontendFilter> = Array::with_max_entries(1, 0);

/// Whether `addr` may have a frontend: only then is the service map asked.
#[inline(always)]
pub fn maybe_frontend(addr: &dataplane_common::Addr) -> bool {
    DP_FE_FILTER.get(0).is_none_or(|f| f.has(addr))
}

/// The backend filter (see `BackendFilter`).
#[map]
pub static DP_BACKEND_FILTER: Array<dataplane_common::BackendFilter> = Array::with_max_entries(1, 0);

/// Whether `addr` may be the backend of a flow: only then can a packet
/// from it be a reply in conntrack.
#[inline(always)]
pub fn maybe_backend(addr: &dataplane_common::Addr) -> bool {
    DP_BACKEND_FILTER.get(0).is_none_or(|f| f.has(addr))
}

/// Records `addr` as the backend of a flow (before its entries exist).
#[inline(always)]
pub fn note_backend(addr: &dataplane_common::Addr) {
    if let Some(f) = DP_BACKEND_FILTER.get_ptr_mut(0) {
        // SAFETY: the map's one value, valid for this run. Concurrent
        // writers only ever store 1 into a byte of their own address (no
        // read-modify-write of a neighbour's entry). It is read first, so
        // that the shared line is written once per address, not once per
        // flow.
        unsafe {
            if !(*f).has(addr) {
                (*f).set(addr);
            }
        }
    }
}

/// The frontend cache (see `FrontendBucket`).
#[map]
pub static DP_FE_CACHE: Array<dataplane_common::FrontendBucket> =
    Array::with_max_entries(dataplane_common::FRONTEND_CACHE_BUCKETS, 0);

/// The service id the frontend cache holds for `key`: the service map has
/// an entry for `key` with this id (and without an in-cluster view).
/// `None` says nothing: the service map must be asked.
#[inline(always)]
pub fn cached_frontend(key: &ServiceKey) -> Option<u32> {
    let hash = dataplane_common::frontend_hash(key);
    DP_FE_CACHE
        .get(dataplane_common::frontend_bucket_of(hash))?
        .get(key, hash)
}

/// Conntrack event counters, one per `CtEvent`.
#[map]
pub static DP_CT_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CT_EVENT_SLOTS, 0);

/// The kinds of the node's interfaces (`dataplane_common::IFACE_F_*`),
/// written by the agent.
#[map]
pub static DP_IFACES: HashMap<u32, u32> = HashMap::with_max_entries(limits::MAX_IFACES, 0);

/// Whether the agent says interface `ifindex` has all of `flags`
/// (`dataplane_common::IFACE_F_*`).
#[inline(always)]
pub fn iface_has(ifindex: u32, flags: u32) -> bool {
    // SAFETY: a plain u32 value, read once.
    DP_IFACES
        .get_ptr(ifindex)
        .is_some_and(|f| unsafe { *f } & flags == flags)
}

/// Host routing's counters (`dataplane_common::RouteEvent`).
#[map]
pub static DP_ROUTE_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ROUTE_EVENT_SLOTS, 0);

/// The flood guard's reply entries of flows without state yet (see
/// `dataplane_common::map_names::CT_SYN`).
#[map]
pub static DP_CT_SYN: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(limits::MAX_CT_SYN, 0);

/// When the flood guard last served a UDP datagram without state (see
/// `dataplane_common::map_names::GUARD`).
#[map]
pub static DP_GUARD: Array<u64> = Array::with_max_entries(1, 0);

/// Set by the agent at load time; see `dataplane_common::NEW_FLOWS_GLOBAL`.
#[no_mangle]
static DP_NEW_FLOWS: u32 = 0;

/// New flows per CPU per second that get state (0: no limit).
#[inline(always)]
pub fn new_flows_per_cpu() -> u32 {
    // SAFETY: reading a static; volatile so that the load-time value is
    // read, not the compile-time 0.
    unsafe { core::ptr::read_volatile(&DP_NEW_FLOWS) }
}

/// Set to 1 by the agent at load time for host routing; see
/// `dataplane_common::HOST_ROUTING_GLOBAL`.
#[no_mangle]
static DP_HOST_ROUTING: u8 = 0;

/// Whether translated packets are redirected to the FIB's egress
/// interface (`forward`) rather than handed to the stack.
#[inline(always)]
pub fn host_routing() -> bool {
    // SAFETY: reading a static; volatile so that the load-time value is
    // read, not the compile-time 0.
    unsafe { core::ptr::read_volatile(&DP_HOST_ROUTING) != 0 }
}

/// Index 0: where conntrack keys and values are built (see `CtScratch`).
#[map]
pub static DP_SCRATCH: PerCpuArray<CtScratch> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch entry.
#[inline(always)]
pub fn scratch() -> Option<*mut CtScratch> {
    DP_SCRATCH.get_ptr_mut(0)
}

/// Index 0: the agent's `DpConfig`.
#[map]
pub static DP_CONFIG: Array<DpConfig> = Array::with_max_entries(1, 0);

/// loadBalancerSourceRanges: (service, source prefix) -> 1.
#[map]
pub static DP_SRC_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::with_max_entries(limits::MAX_SOURCE_RANGES, BPF_F_NO_PREALLOC);

/// Service names for inspection; written by the agent, never read here.
#[map]
pub static DP_NAMES: HashMap<u32, ServiceName> = HashMap::with_max_entries(limits::MAX_SERVICES, BPF_F_NO_PREALLOC);

/// The old conntrack map while conntrack migrates to another size (the
/// agent pins this name to it); a one-entry placeholder otherwise. See
/// `dataplane_common::CT_MIGRATE_GLOBAL`.
#[map]
pub static DP_CT_PREV: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(1, 0);

/// Set to 1 by the agent at load time while conntrack migrates; see
/// `dataplane_common::CT_MIGRATE_GLOBAL`.
#[no_mangle]
static DP_CT_MIGRATE: u8 = 0;

#[inline(always)]
pub fn ct_migrating() -> bool {
    // SAFETY: reading a static; volatile so that the load-time value is
    // read, not the compile-time 0.
    unsafe { core::ptr::read_volatile(&DP_CT_MIGRATE) != 0 }
}

/// Set by the agent at load time to the helpers the kernel has; see
/// `dataplane_common::KERNEL_GLOBAL`.
#[no_mangle]
static DP_KERNEL: u32 = 0;

/// Whether the kernel has the helpers of `feature`
/// (`dataplane_common::kernel_features`).
#[inline(always)]
pub fn kernel_has(feature: u32) -> bool {
    // SAFETY: reading a static; volatile so that the load-time value is
    // read, not the compile-time 0.
    unsafe { core::ptr::read_volatile(&DP_KERNEL) & feature != 0 }
}

/// Set by the agent at load time to where `skb->ip_summed` lies; see
/// `dataplane_common::SKB_SUMMED_GLOBAL`.
#[no_mangle]
static DP_SKB_SUMMED: u32 = 0;

/// `(byte offset, bit offset)` of `skb->ip_summed` in this kernel's
/// `struct sk_buff`, when the agent found it and the kernel has
/// `bpf_cast_to_kern_ctx`.
#[inline(always)]
pub fn skb_summed_at() -> Option<(u16, u8)> {
    // SAFETY: reading a static; volatile so that the load-time value is
    // read, not the compile-time 0.
    dataplane_common::skb_summed::decode(unsafe { core::ptr::read_volatile(&DP_SKB_SUMMED) })
}

/// Set by the agent at load time to the SNAT source port range; see
/// `dataplane_common::SNAT_PORTS_GLOBAL`.
#[no_mangle]
static DP_SNAT_PORTS: u32 = 0;

/// The SNAT source port range: (first port, number of ports).
#[inline(always)]
pub fn snat_ports() -> (u32, u32) {
    // SAFETY: reading a static; volatile so that the load-time value is
    // read, not the compile-time 0.
    let v = unsafe { core::ptr::read_volatile(&DP_SNAT_PORTS) };
    let (lo, hi) = match v {
        0 => (
            dataplane_common::DEFAULT_SNAT_PORTS.0 as u32,
            dataplane_common::DEFAULT_SNAT_PORTS.1 as u32,
        ),
        v => (v & 0xffff, v >> 16),
    };
    if hi < lo {
        return (dataplane_common::DEFAULT_SNAT_PORTS.0 as u32, 1);
    }
    (lo, hi - lo + 1)
}

/// Set to 1 by the agent at load time to log decisions (aya-log); see
/// `dataplane_common::DEBUG_GLOBAL`.
#[no_mangle]
static DP_DEBUG: u8 = 0;

#[inline(always)]
pub fn debug_enabled() -> bool {
    // SAFETY: reading a static; volatile so that the load-time value is
    // read, not the compile-time 0.
    unsafe { core::ptr::read_volatile(&DP_DEBUG) != 0 }
}
