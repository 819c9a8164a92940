//! Default map capacities. The agent may override them at load time; the
//! kernel side only uses the ones that bound loops or index arithmetic.

/// Service frontends (VIP, port, protocol) the maps hold.
pub const MAX_SERVICES: u32 = 131_072;
/// Backends one frontend can hold. Larger backend sets are truncated by
/// the agent with a logged reason.
pub const MAX_BACKENDS_PER_SERVICE: u32 = 16_384;
/// Backends per generation in the first range of backend slots (the whole
/// slot space of releases up to 0.2.0, so that the slots of their
/// frontends keep their numbers); indexes from here on live in a second
/// range (see `BackendKey::new`).
pub const SLOTS_FIRST_RANGE: u32 = 1024;
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
/// Reply entries of new TCP flows served without conntrack state by the
/// flood guard (see `NEW_FLOWS_GLOBAL`), until the client's next packet
/// proves the flow and creates its state: a separate LRU, so that a SYN
/// flood churns this map, not the flows in conntrack.
pub const MAX_CT_SYN: u32 = 65_536;

/// Interfaces of the node's namespace whose kind the agent tells the
/// programs (`map_names::IFACES`).
pub const MAX_IFACES: u32 = 16_384;
