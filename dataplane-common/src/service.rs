//! Services as the datapath looks them up: frontends, backend slots, Maglev
//! tables, session affinity, source ranges and per-service counters.

use bytemuck::{Pod, Zeroable};

use crate::*;

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
    /// `FAMILY_V4` or `FAMILY_V6`, with `KEY_IN_CLUSTER` for the view of
    /// an external frontend that sources inside the cluster get.
    pub family: u8,
}

/// Set in `ServiceKey::family` of the in-cluster view of an external
/// frontend (NodePort, externalIP, load balancer IP) of a Service with
/// `externalTrafficPolicy: Local`: the same address, port and protocol,
/// served by the cluster-wide endpoints. The datapath looks it up when the
/// frontend has `SVC_F_IN_CLUSTER_VIEW` and the packet comes from inside
/// the cluster (a source in the `--cluster-cidr` ranges, or any socket of
/// the node at the socket level), as kube-proxy short-circuits "pod traffic
/// for external destinations" and the node's own traffic.
pub const KEY_IN_CLUSTER: u8 = 0x80;

/// Value of the service map.
///
/// Backends of a service live in the backend map under
/// `BackendKey::new(service_id, generation, i)`
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
    /// Changes whenever the agent writes this frontend's backends again
    /// (never 0 once written by an agent that sets it; 0 in entries of
    /// earlier releases). A conntrack entry records its low 16 bits
    /// (`CtValue::epoch`): a new SYN on the tuple of an entry made under
    /// another epoch picks its backend again.
    pub epoch: u32,
}

/// Key of the backend slot map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct BackendKey {
    pub service_id: u32,
    pub slot: u32,
}

impl BackendKey {
    /// The key of backend `index` (below `MAX_BACKENDS_PER_SERVICE`) in
    /// `generation` of `service_id`. The first `SLOTS_FIRST_RANGE` indexes
    /// of each generation keep the numbering of earlier releases
    /// (`generation * 1024 + index`), so their maps stay valid; the rest
    /// follow both generations' first ranges.
    #[inline(always)]
    pub fn new(service_id: u32, generation: u16, index: u32) -> Self {
        const FIRST: u32 = limits::SLOTS_FIRST_RANGE;
        const REST: u32 = limits::MAX_BACKENDS_PER_SERVICE - FIRST;
        let g = generation as u32 & 1;
        let slot = if index < FIRST {
            g * FIRST + index
        } else {
            2 * FIRST + g * REST + (index - FIRST)
        };
        BackendKey { service_id, slot }
    }

    /// The inverse of [`BackendKey::new`]: (generation, index) of a slot.
    pub fn generation_and_index(&self) -> (u16, u32) {
        const FIRST: u32 = limits::SLOTS_FIRST_RANGE;
        const REST: u32 = limits::MAX_BACKENDS_PER_SERVICE - FIRST;
        let s = self.slot;
        if s < 2 * FIRST {
            ((s / FIRST) as u16, s % FIRST)
        } else {
            let r = s - 2 * FIRST;
            ((r / REST) as u16, FIRST + r % REST)
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

/// The entry of a ClusterIP for the ports its Service does not define: key
/// port 0 and protocol 0, no backends. The datapath looks it up when a
/// packet matches no frontend and no tracked flow, and rejects the packet
/// (TCP RST / ICMP port unreachable), as kube-proxy's nftables mode rejects
/// traffic to invalid ports of ClusterIPs.
pub const SVC_F_OTHER_PORTS: u32 = 1 << 5;

/// The frontend has an in-cluster view (its key with `KEY_IN_CLUSTER`):
/// packets from inside the cluster use that entry instead.
pub const SVC_F_IN_CLUSTER_VIEW: u32 = 1 << 6;

/// Service ids no frontend gets (ids stay below the service map's size):
/// under them `DP_SRC_RANGES` holds the cluster's pod CIDRs
/// (`--cluster-cidr`), one id per family so that an IPv6 source never
/// matches an IPv4 prefix.
pub const CLUSTER_CIDRS_V4: u32 = u32::MAX;
pub const CLUSTER_CIDRS_V6: u32 = u32::MAX - 1;

/// Words of the ClusterIP filter (`VipFilter`): 65,536 bits.
pub const VIP_FILTER_WORDS: usize = 1024;

/// A bitmap of the addresses that have an entry for the ports their
/// Service lacks (`SVC_F_OTHER_PORTS`), one bit per hash
/// (`vip_filter_bit`): a packet that matches no frontend and no flow looks
/// that entry up only when its destination's bit is set, so that traffic
/// to other addresses pays one array read, not a hash lookup. False
/// positives only cost the lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct VipFilter {
    pub bits: [u64; VIP_FILTER_WORDS],
}

/// The bit of `addr` in a `VipFilter` (below `64 * VIP_FILTER_WORDS`).
#[inline(always)]
pub fn vip_filter_bit(addr: &Addr) -> u32 {
    fold_addr(addr).wrapping_mul(0x9e37_79b1) >> 16
}

impl VipFilter {
    /// Whether `addr`'s bit is set.
    #[inline(always)]
    pub fn has(&self, addr: &Addr) -> bool {
        let bit = vip_filter_bit(addr);
        self.bits[(bit >> 6) as usize & (VIP_FILTER_WORDS - 1)] & (1 << (bit & 63)) != 0
    }

    /// Sets `addr`'s bit.
    #[inline(always)]
    pub fn set(&mut self, addr: &Addr) {
        let bit = vip_filter_bit(addr);
        self.bits[(bit >> 6) as usize & (VIP_FILTER_WORDS - 1)] |= 1 << (bit & 63);
    }
}

/// Bits of the frontend filter (`FrontendFilter`): 2^20, 128 KiB.
pub const FRONTEND_FILTER_BITS: usize = 1 << 20;

/// The frontend filter (`map_names::FRONTEND_FILTER`): a bit per hash
/// (`frontend_filter_bit`) of every address that has a frontend of any
/// kind (ClusterIP, a node address of a NodePort, externalIP, load-balancer
/// address, the ClusterIP's entry for other ports). A packet whose
/// destination's bit is clear is no Service's: it passes without the
/// service map's hash lookup (most of a node's traffic, pod to pod, is
/// such). The agent sets an address's bit before it writes the address's
/// first frontend and clears it only after its last frontend is deleted;
/// a restarted agent writes it again from the service map before its
/// programs are attached. A false positive (about 1 in 8 addresses at
/// 131,072 frontend addresses) only costs the lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FrontendFilter {
    /// Nested arrays: `bytemuck` has `Pod` for these sizes.
    pub words: [[u64; 4096]; FRONTEND_FILTER_BITS / 64 / 4096],
}

/// The bit of `addr` in a `FrontendFilter` (below `FRONTEND_FILTER_BITS`):
/// the top 20 bits of the folded address times 2^32 / phi, which spreads
/// the consecutive addresses of a service CIDR over the whole filter.
#[inline(always)]
pub fn frontend_filter_bit(addr: &Addr) -> u32 {
    fold_addr(addr).wrapping_mul(0x9e37_79b1) >> 12
}

impl FrontendFilter {
    #[inline(always)]
    fn slot(addr: &Addr) -> (usize, usize, u64) {
        let bit = frontend_filter_bit(addr) as usize;
        ((bit >> 18) & 3, (bit >> 6) & 4095, 1 << (bit & 63))
    }

    /// Whether `addr`'s bit is set.
    #[inline(always)]
    pub fn has(&self, addr: &Addr) -> bool {
        let (a, b, m) = Self::slot(addr);
        self.words[a][b] & m != 0
    }

    /// Sets `addr`'s bit.
    #[inline(always)]
    pub fn set(&mut self, addr: &Addr) {
        let (a, b, m) = Self::slot(addr);
        self.words[a][b] |= m;
    }

    /// Bits set.
    pub fn count(&self) -> usize {
        self.words.iter().flatten().map(|w| w.count_ones() as usize).sum()
    }
}

/// Entries of a `BackendFilter`: one per value of `vip_filter_bit`.
pub const BACKEND_FILTER_ENTRIES: usize = 64 * VIP_FILTER_WORDS;

/// The backend filter (`map_names::BACKEND_FILTER`): a nonzero byte for the
/// hash (`vip_filter_bit`) of every address that is or was the backend of a
/// flow. Replies come from backends, so a packet that matches no frontend
/// and whose source's byte is zero cannot be the reply of a tracked flow:
/// it skips the conntrack lookup (a hash of a 40-byte key and a bucket
/// walk, the largest part of a packet to no Service). Entries are only
/// ever set: by the programs when they create a flow (`conntrack::create`),
/// and by the agent when it adopts pinned maps, from the flows and backends
/// already there (a release without the filter made them). A false
/// positive only costs the lookup; a missing entry would leave a flow's
/// replies untranslated.
///
/// Bytes, not bits as in `VipFilter`: the programs set entries from every
/// CPU at once, and a bit set by a read-modify-write of a shared word can
/// be lost to another CPU's write of the same word; the bpf target has no
/// atomic OR on the oldest kernels supported (5.10). A byte store loses
/// nothing. (Nested arrays: `bytemuck` has `Pod` for these sizes.)
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendFilter {
    pub bytes: [[u8; 4096]; BACKEND_FILTER_ENTRIES / 4096],
}

impl BackendFilter {
    #[inline(always)]
    fn slot(addr: &Addr) -> (usize, usize) {
        let i = vip_filter_bit(addr) as usize & (BACKEND_FILTER_ENTRIES - 1);
        (i >> 12, i & 4095)
    }

    /// Whether `addr`'s entry is set.
    #[inline(always)]
    pub fn has(&self, addr: &Addr) -> bool {
        let (a, b) = Self::slot(addr);
        self.bytes[a][b] != 0
    }

    /// Sets `addr`'s entry.
    #[inline(always)]
    pub fn set(&mut self, addr: &Addr) {
        let (a, b) = Self::slot(addr);
        self.bytes[a][b] = 1;
    }

    /// Entries set.
    pub fn count(&self) -> usize {
        self.bytes.iter().flatten().filter(|b| **b != 0).count()
    }
}

/// Buckets of the frontend cache (`FrontendBucket`), a power of two: as
/// many as frontends the service map holds, two ways each, so that at
/// 100,000 frontends only a few percent share a full bucket.
pub const FRONTEND_CACHE_BUCKETS: u32 = limits::MAX_SERVICES;

/// One frontend in the frontend cache: its service map key and the id its
/// value has. An all-zero way is empty (no packet's key has family 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FrontendWay {
    pub key: ServiceKey,
    pub service_id: u32,
    /// `frontend_check(key, service_id)`. The agent rewrites a bucket
    /// while programs read it, and an array value is copied, not swapped:
    /// a program may read a way half old, half new. Such a mix of two
    /// frontends' fields (or of one and zeros) fails this check, bar a
    /// 32-bit hash collision, so it is never taken for a frontend.
    pub check: u32,
    pub _pad: u32,
}

/// A bucket of the frontend cache (`map_names::FRONTEND_CACHE`, an array
/// indexed by `frontend_bucket`): up to two frontends whose key hashes
/// there, each with its service id. Established packets look it up instead
/// of the service map (an array read the verifier inlines, not a hash
/// lookup): a way holding the packet's key says the frontend exists with
/// that id, so that a packet of a tracked flow is translated at once.
///
/// Written by the agent only, with the service map (`reconcile/maps.rs`):
/// a frontend is cached after its service entry is written and uncached
/// before it is deleted, never cached while its value has
/// `SVC_F_IN_CLUSTER_VIEW` (whose packets may count under another id), and
/// the whole cache is rebuilt from the service map when pinned maps are
/// adopted (a previous release did not keep it). A frontend missing from
/// the cache (a full bucket, an older agent) only takes the slower path
/// through the service map; a cached way is always true of the service
/// map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FrontendBucket {
    pub ways: [FrontendWay; 2],
}

/// The hash of `key` that places it in the frontend cache: its bucket is
/// the high bits (`frontend_bucket`). One multiplication (Fibonacci
/// hashing): every packet to no Service computes it.
#[inline(always)]
pub fn frontend_hash(key: &ServiceKey) -> u32 {
    let mixed = fold_addr(&key.addr) ^ ((key.port as u32) << 16 | (key.proto as u32) << 8 | key.family as u32);
    mixed.wrapping_mul(0x9e37_79b1)
}

/// log2 of `FRONTEND_CACHE_BUCKETS`.
const FRONTEND_CACHE_BITS: u32 = FRONTEND_CACHE_BUCKETS.trailing_zeros();

/// The bucket of a key from its `frontend_hash` (below
/// `FRONTEND_CACHE_BUCKETS`).
#[inline(always)]
pub fn frontend_bucket_of(hash: u32) -> u32 {
    hash >> (32 - FRONTEND_CACHE_BITS)
}

/// The bucket of `key` in the frontend cache.
#[inline(always)]
pub fn frontend_bucket(key: &ServiceKey) -> u32 {
    frontend_bucket_of(frontend_hash(key))
}

/// `FrontendWay::check` of a way holding `key` with `service_id`, from
/// `frontend_hash(key)`.
#[inline(always)]
pub fn frontend_check(hash: u32, service_id: u32) -> u32 {
    (hash ^ service_id.wrapping_mul(0x9e37_79b1)) | 1
}

impl FrontendWay {
    /// The way holding `key` with `service_id`.
    pub fn new(key: ServiceKey, service_id: u32) -> Self {
        FrontendWay {
            key,
            service_id,
            check: frontend_check(frontend_hash(&key), service_id),
            _pad: 0,
        }
    }
}

const _: () = assert!(FRONTEND_CACHE_BUCKETS.is_power_of_two());

impl FrontendBucket {
    /// The service id cached for `key` (whose `frontend_hash` is `hash`),
    /// if any.
    #[inline(always)]
    pub fn get(&self, key: &ServiceKey, hash: u32) -> Option<u32> {
        let w = if same_key(&self.ways[0].key, key) {
            &self.ways[0]
        } else if same_key(&self.ways[1].key, key) {
            &self.ways[1]
        } else {
            return None;
        };
        // Read once: the check must be of the id returned.
        // SAFETY: a field of a live reference.
        let id = unsafe { core::ptr::read_volatile(&w.service_id) };
        (w.check == frontend_check(hash, id)).then_some(id)
    }
}

/// Field by field (the derived `PartialEq` is the same, but this keeps the
/// eBPF code to five word compares).
#[inline(always)]
fn same_key(a: &ServiceKey, b: &ServiceKey) -> bool {
    a.addr[0] == b.addr[0]
        && a.addr[1] == b.addr[1]
        && a.addr[2] == b.addr[2]
        && a.addr[3] == b.addr[3]
        && a.port == b.port
        && a.proto == b.proto
        && a.family == b.family
}

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
