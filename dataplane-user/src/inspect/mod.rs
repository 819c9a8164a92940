//! Reading the live dataplane state back: the maps a running agent pinned
//! (or, for the agent's own metrics, second handles on its maps), turned
//! into plain rows for `dataplane services|backends|conntrack|stats`, their
//! tables and JSON, and the metrics.
//!
//! Nothing here writes to a map.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, IterableMap, LpmTrie, Map, MapData, PerCpuArray};
use dataplane_common::{
    counters, family_of, ip_of, map_names, Addr, BackendKey, CtEvent, CtKey, CtValue, Reason, RouteEvent, ServiceKey,
    ServiceValue, SockEvent, ABI_VERSION, BACKEND_F_REMOTE, CLUSTER_CIDRS_V6, CT_F_CLOSING, CT_F_ORIGINAL, CT_F_REPLY,
    CT_F_SEEN_REPLY, CT_F_SNAT, FAMILY_V4, FAMILY_V6, SVC_F_AFFINITY, SVC_F_DROP_NO_LOCAL, SVC_F_EXTERNAL,
    SVC_F_IN_CLUSTER_VIEW, SVC_F_OTHER_PORTS, SVC_F_RANDOM, SVC_F_SOURCE_RANGES,
};
use serde::Serialize;
use thiserror::Error;

use crate::{
    bpf::{loader::Maps, pin::PinRoot},
    model::proto_name,
};

pub mod snapshot;

#[derive(Debug, Error)]
pub enum InspectError {
    #[error("no agent state under {root}: is the agent running with --bpffs-root {root}?")]
    NothingPinned { root: String },
    #[error("pinned map {name} at {path}: {source}")]
    Open {
        name: &'static str,
        path: String,
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Pin(#[from] crate::bpf::pin::PinError),
    #[error(
        "the pinned maps under {root} were written by an agent with map layout version {found}, this \
         binary reads version {ABI_VERSION}: use the dataplane binary of the running agent"
    )]
    Abi { root: String, found: u32 },
    #[error(
        "pinned map {name} at {path} is not the map this binary reads ({what}): use the dataplane \
         binary of the running agent"
    )]
    Shape {
        name: &'static str,
        path: String,
        what: String,
    },
    #[error(
        "the agent state under {root} has no map {name}: it was pinned by an agent older than this \
         binary; use the dataplane binary of the running agent"
    )]
    Missing { root: String, name: &'static str },
    #[error("reading map {name}: {source}")]
    Read {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("reading map {name}: {source}")]
    ReadBatch {
        name: &'static str,
        source: crate::bpf::sys::SysError,
    },
    #[error("reading the kernel memory of map {map} from /proc/self/fdinfo: {error}")]
    Fdinfo { map: &'static str, error: String },
}

fn read_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> InspectError {
    move |source| InspectError::Read { name, source }
}

/// Builds typed handles from one `MapData` per map name.
fn typed(mut open: impl FnMut(&'static str) -> Result<MapData, InspectError>) -> Result<Maps, InspectError> {
    let mut map = |name: &'static str| -> Result<Map, InspectError> {
        let data = open(name)?;
        Map::from_map_data(data).map_err(read_err(name))
    };
    Ok(Maps {
        services: HashMap::try_from(map(map_names::SERVICES)?).map_err(read_err(map_names::SERVICES))?,
        backends: HashMap::try_from(map(map_names::BACKENDS)?).map_err(read_err(map_names::BACKENDS))?,
        conntrack: HashMap::try_from(map(map_names::CONNTRACK)?).map_err(read_err(map_names::CONNTRACK))?,
        maglev: HashMap::try_from(map(map_names::MAGLEV)?).map_err(read_err(map_names::MAGLEV))?,
        affinity: HashMap::try_from(map(map_names::AFFINITY)?).map_err(read_err(map_names::AFFINITY))?,
        config: Array::try_from(map(map_names::CONFIG)?).map_err(read_err(map_names::CONFIG))?,
        source_ranges: LpmTrie::try_from(map(map_names::SOURCE_RANGES)?).map_err(read_err(map_names::SOURCE_RANGES))?,
        names: HashMap::try_from(map(map_names::NAMES)?).map_err(read_err(map_names::NAMES))?,
        service_stats: PerCpuArray::try_from(map(map_names::SERVICE_STATS)?)
            .map_err(read_err(map_names::SERVICE_STATS))?,
        reasons: PerCpuArray::try_from(map(map_names::REASON_STATS)?).map_err(read_err(map_names::REASON_STATS))?,
        sock_nat: HashMap::try_from(map(map_names::SOCK_NAT)?).map_err(read_err(map_names::SOCK_NAT))?,
        sock_affinity: HashMap::try_from(map(map_names::SOCK_AFFINITY)?).map_err(read_err(map_names::SOCK_AFFINITY))?,
        sock_stats: PerCpuArray::try_from(map(map_names::SOCK_STATS)?).map_err(read_err(map_names::SOCK_STATS))?,
        ct_events: PerCpuArray::try_from(map(map_names::CT_EVENTS)?).map_err(read_err(map_names::CT_EVENTS))?,
        route_events: PerCpuArray::try_from(map(map_names::ROUTE_EVENTS)?)
            .map_err(read_err(map_names::ROUTE_EVENTS))?,
        vip_filter: Array::try_from(map(map_names::VIP_FILTER)?).map_err(read_err(map_names::VIP_FILTER))?,
        backend_filter: Array::try_from(map(map_names::BACKEND_FILTER)?)
            .map_err(read_err(map_names::BACKEND_FILTER))?,
        endpoints: HashMap::try_from(map(map_names::ENDPOINTS)?).map_err(read_err(map_names::ENDPOINTS))?,
        frontend_cache: Array::try_from(map(map_names::FRONTEND_CACHE)?)
            .map_err(read_err(map_names::FRONTEND_CACHE))?,
        frontend_filter: Array::try_from(map(map_names::FRONTEND_FILTER)?)
            .map_err(read_err(map_names::FRONTEND_FILTER))?,
        ct_syn: None,
    })
}

/// Opens the maps a running agent pinned under `root`, refusing maps of
/// another layout.
pub fn open_pinned(root: &Path) -> Result<Maps, InspectError> {
    let pins = PinRoot::new(root);
    let nothing = || InspectError::NothingPinned {
        root: root.display().to_string(),
    };
    if !pins.map(map_names::SERVICES).exists() {
        return Err(nothing());
    }
    // Key and value sizes only: the agent's --*-max-entries flags set the
    // capacities, and any capacity reads the same.
    if let Some(m) = pins.first_mismatch(None)? {
        return Err(InspectError::Shape {
            name: m.name,
            path: m.path,
            what: m.what,
        });
    }
    let maps = typed(|name| {
        let path: PathBuf = pins.map(name);
        if !path.exists() {
            return Err(InspectError::Missing {
                root: root.display().to_string(),
                name,
            });
        }
        MapData::from_pin(&path).map_err(|source| InspectError::Open {
            name,
            path: path.display().to_string(),
            source,
        })
    })?;
    let config = maps.config.get(&0, 0).map_err(read_err(map_names::CONFIG))?;
    if config.abi_version != 0 && config.abi_version != ABI_VERSION {
        return Err(InspectError::Abi {
            root: root.display().to_string(),
            found: config.abi_version,
        });
    }
    Ok(maps)
}

/// Second handles on the maps behind `maps` (by map id), for readers that
/// run next to the owner (the metrics).
pub fn reopen(maps: &Maps) -> Result<Maps, InspectError> {
    fn id<K: aya::Pod, V>(name: &'static str, m: &impl IterableMap<K, V>) -> Result<(&'static str, u32), InspectError> {
        Ok((name, m.map().info().map_err(read_err(name))?.id()))
    }
    let ids = [
        id(map_names::SERVICES, &maps.services)?,
        id(map_names::BACKENDS, &maps.backends)?,
        id(map_names::CONNTRACK, &maps.conntrack)?,
        id(map_names::MAGLEV, &maps.maglev)?,
        id(map_names::AFFINITY, &maps.affinity)?,
        id(map_names::CONFIG, &maps.config)?,
        id(map_names::SOURCE_RANGES, &maps.source_ranges)?,
        id(map_names::NAMES, &maps.names)?,
        id(map_names::SERVICE_STATS, &maps.service_stats)?,
        id(map_names::REASON_STATS, &maps.reasons)?,
        id(map_names::SOCK_NAT, &maps.sock_nat)?,
        id(map_names::SOCK_AFFINITY, &maps.sock_affinity)?,
        id(map_names::SOCK_STATS, &maps.sock_stats)?,
        id(map_names::CT_EVENTS, &maps.ct_events)?,
        id(map_names::ROUTE_EVENTS, &maps.route_events)?,
        id(map_names::VIP_FILTER, &maps.vip_filter)?,
        id(map_names::BACKEND_FILTER, &maps.backend_filter)?,
        id(map_names::ENDPOINTS, &maps.endpoints)?,
        id(map_names::FRONTEND_CACHE, &maps.frontend_cache)?,
        id(map_names::FRONTEND_FILTER, &maps.frontend_filter)?,
    ];
    typed(|name| {
        let id = ids
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, id)| *id)
            .expect("every map has an id");
        MapData::from_id(id).map_err(|source| InspectError::Open {
            name,
            path: format!("map id {id}"),
            source,
        })
    })
}

pub use crate::bpf::sys::monotonic_ns;

/// `ip:port` (IPv4) or `[ip]:port` (IPv6), from map fields.
pub fn endpoint(addr: &Addr, port_be: u16, family: u8) -> String {
    SocketAddr::new(ip_of(addr, family), u16::from_be(port_be)).to_string()
}

pub fn frontend(key: &ServiceKey) -> String {
    if (key.port, key.proto) == (0, 0) {
        // A ClusterIP's entry for the ports its Service lacks.
        return match key.ip() {
            IpAddr::V6(a) => format!("[{a}]:*"),
            a => format!("{a}:*"),
        };
    }
    format!(
        "{}/{}{}",
        SocketAddr::new(key.ip(), key.host_port()),
        proto_name(key.proto),
        // The view of an external frontend that sources inside the cluster
        // get (externalTrafficPolicy Local).
        if key.is_in_cluster() { "(in-cluster)" } else { "" }
    )
}

/// One frontend, as `dataplane services` shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ServiceRow {
    pub id: u32,
    /// `namespace/name:port` (empty if the agent wrote none).
    pub name: String,
    /// `vip:port/proto`.
    pub frontend: String,
    pub backends: u16,
    pub generation: u16,
    /// `maglev` or `random` (`none` without backends).
    pub selection: String,
    pub maglev_size: u32,
    /// Flags in words: `affinity=60s`, `external`, `drop-no-local`,
    /// `source-ranges`.
    pub flags: Vec<String>,
    /// loadBalancerSourceRanges, as `addr/len`.
    pub source_ranges: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub no_backend: u64,
}

fn service_flags(v: &ServiceValue) -> Vec<String> {
    let mut f = Vec::new();
    if v.flags & SVC_F_AFFINITY != 0 {
        f.push(format!("affinity={}s", v.affinity_timeout_s));
    }
    if v.flags & SVC_F_EXTERNAL != 0 {
        f.push("external".into());
    }
    if v.flags & SVC_F_DROP_NO_LOCAL != 0 {
        f.push("drop-no-local".into());
    }
    if v.flags & SVC_F_SOURCE_RANGES != 0 {
        f.push("source-ranges".into());
    }
    if v.flags & SVC_F_IN_CLUSTER_VIEW != 0 {
        f.push("in-cluster-view".into());
    }
    if v.flags & SVC_F_OTHER_PORTS != 0 {
        f.push("other-ports-rejected".into());
    }
    f
}

fn selection(v: &ServiceValue) -> String {
    if v.flags & SVC_F_RANDOM != 0 {
        "random".into()
    } else if v.maglev_size != 0 {
        "maglev".into()
    } else if v.backend_count == 0 {
        "none".into()
    } else {
        "random".into()
    }
}

/// The service's name from DP_NAMES (empty when missing).
pub fn name_of(maps: &Maps, id: u32) -> String {
    maps.names
        .get(&id, 0)
        .map(|n| n.as_str().to_string())
        .unwrap_or_default()
}

/// Every frontend, sorted by VIP, port, protocol.
pub fn services(maps: &Maps) -> Result<Vec<(ServiceKey, ServiceValue)>, InspectError> {
    let mut v: Vec<(ServiceKey, ServiceValue)> = maps
        .services
        .iter()
        .collect::<Result<_, _>>()
        .map_err(read_err(map_names::SERVICES))?;
    v.sort_by_key(|(k, _)| (k.ip(), k.host_port(), k.proto));
    Ok(v)
}

/// Source ranges by service id, as `addr/len`.
fn source_ranges(maps: &Maps) -> Result<std::collections::BTreeMap<u32, Vec<String>>, InspectError> {
    let mut out: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
    // The family of a range is its service's.
    let families: std::collections::BTreeMap<u32, u8> = services(maps)?
        .iter()
        .map(|(k, v)| (v.service_id, family_of(k.ip())))
        .collect();
    for key in maps.source_ranges.keys() {
        let key = key.map_err(read_err(map_names::SOURCE_RANGES))?;
        let data = key.data();
        let id = u32::from_be(data.service_id_be);
        let family = match id {
            CLUSTER_CIDRS_V6 => FAMILY_V6,
            _ => families.get(&id).copied().unwrap_or(FAMILY_V4),
        };
        out.entry(id).or_default().push(format!(
            "{}/{}",
            ip_of(&data.addr, family),
            key.prefix_len().saturating_sub(32)
        ));
    }
    Ok(out)
}

pub fn service_rows(maps: &Maps) -> Result<Vec<ServiceRow>, InspectError> {
    let ranges = source_ranges(maps)?;
    let mut rows = Vec::new();
    for (k, v) in services(maps)? {
        let stats = maps
            .service_stats
            .get(&v.service_id, 0)
            .map_err(read_err(map_names::SERVICE_STATS))?;
        let (mut packets, mut bytes, mut new_flows, mut no_backend) = (0, 0, 0, 0);
        for s in stats.iter() {
            packets += s.packets;
            bytes += s.bytes;
            new_flows += s.new_flows;
            no_backend += s.no_backend;
        }
        rows.push(ServiceRow {
            id: v.service_id,
            name: name_of(maps, v.service_id),
            frontend: frontend(&k),
            backends: v.backend_count,
            generation: v.generation,
            selection: selection(&v),
            maglev_size: v.maglev_size,
            flags: service_flags(&v),
            source_ranges: ranges.get(&v.service_id).cloned().unwrap_or_default(),
            packets,
            bytes,
            new_flows,
            no_backend,
        });
    }
    Ok(rows)
}

/// One backend slot of a frontend's current generation.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackendRow {
    pub service_id: u32,
    pub name: String,
    pub frontend: String,
    pub generation: u16,
    /// Index within the generation (what the Maglev table holds).
    pub slot: u32,
    /// `ip:port`, or `missing` when the slot is absent (never expected).
    pub backend: String,
    pub remote: bool,
}

pub fn backend_rows(maps: &Maps) -> Result<Vec<BackendRow>, InspectError> {
    let mut rows = Vec::new();
    for (k, v) in services(maps)? {
        let name = name_of(maps, v.service_id);
        for i in 0..u32::from(v.backend_count) {
            let b = maps
                .backends
                .get(&BackendKey::new(v.service_id, v.generation, i), 0)
                .ok();
            rows.push(BackendRow {
                service_id: v.service_id,
                name: name.clone(),
                frontend: frontend(&k),
                generation: v.generation,
                slot: i,
                backend: b.map_or("missing".into(), |b| endpoint(&b.addr, b.port, b.family())),
                remote: b.is_some_and(|b| b.flags & BACKEND_F_REMOTE != 0),
            });
        }
    }
    Ok(rows)
}

/// One conntrack entry.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ConntrackRow {
    /// `original` (client -> frontend) or `reply` (backend -> client).
    pub direction: String,
    pub proto: String,
    /// The tuple the entry is keyed by.
    pub src: String,
    pub dst: String,
    /// Original: the backend the destination becomes. Reply: the frontend
    /// the source becomes.
    pub nat: String,
    /// With SNAT. Original: the node address the source becomes. Reply: the
    /// client the destination becomes.
    pub snat: Option<String>,
    /// `seen-reply`, `closing`.
    pub flags: Vec<String>,
    pub service_id: u32,
    pub service: String,
    pub age_s: f64,
    pub idle_s: f64,
}

pub fn ct_direction(flags: u16) -> &'static str {
    if flags & CT_F_ORIGINAL != 0 {
        "original"
    } else if flags & CT_F_REPLY != 0 {
        "reply"
    } else {
        "?"
    }
}

pub fn ct_flags(flags: u16) -> Vec<String> {
    let mut f = Vec::new();
    if flags & CT_F_SEEN_REPLY != 0 {
        f.push("seen-reply".to_string());
    }
    if flags & CT_F_CLOSING != 0 {
        f.push("closing".to_string());
    }
    f
}

pub fn conntrack_row(maps: &Maps, k: &CtKey, v: &CtValue, now_ns: u64) -> ConntrackRow {
    let secs = |ns: u64| (now_ns.saturating_sub(ns) / 1_000_000) as f64 / 1000.0;
    ConntrackRow {
        direction: ct_direction(v.flags).into(),
        proto: proto_name(k.proto).into(),
        src: endpoint(&k.saddr, k.sport, k.family),
        dst: endpoint(&k.daddr, k.dport, k.family),
        nat: endpoint(&v.nat_addr, v.nat_port, k.family),
        snat: (v.flags & CT_F_SNAT != 0).then(|| endpoint(&v.snat_addr, v.snat_port, k.family)),
        flags: ct_flags(v.state()),
        service_id: v.service_id,
        service: name_of(maps, v.service_id),
        age_s: secs(v.created_ns),
        idle_s: secs(v.last_seen_ns),
    }
}

pub fn conntrack_rows(maps: &Maps) -> Result<Vec<ConntrackRow>, InspectError> {
    let now = monotonic_ns();
    // In batches: a busy table does not restart the walk (see
    // `batch::lookup_all`).
    let mut entries: Vec<(CtKey, CtValue)> = {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        crate::bpf::batch::lookup_all(maps.conntrack.map().fd().as_fd()).map_err(|source| InspectError::ReadBatch {
            name: map_names::CONNTRACK,
            source,
        })?
    };
    // Each flow's two entries together: by service, then creation time.
    entries.sort_by_key(|(k, v)| (v.service_id, v.created_ns, v.flags & CT_F_REPLY, k.saddr, k.sport));
    Ok(entries.iter().map(|(k, v)| conntrack_row(maps, k, v, now)).collect())
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ReasonRow {
    pub reason: String,
    pub drop: bool,
    pub packets: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MapUse {
    pub map: String,
    /// `hash`, `lru_hash`, `lpm_trie`, `array`, `percpu_array`.
    pub kind: String,
    /// Entries present; arrays always hold `max_entries`.
    pub entries: u64,
    pub max_entries: u32,
    /// The kernel's accounting of the map's memory (`memlock` in its
    /// fdinfo, see [`crate::bpf::mapmem`]).
    pub memory_bytes: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Stats {
    pub reasons: Vec<ReasonRow>,
    pub conntrack_entries: u64,
    pub conntrack_max: u32,
    /// Conntrack entries written for new flows since the maps were created.
    pub conntrack_created: u64,
    /// Of those, evicted by the LRU to make room (created, minus those
    /// written over an existing entry, minus those present).
    pub conntrack_evicted: u64,
    /// What the socket-level programs did (`SockEvent`), all CPUs summed.
    pub socket_lb: Vec<EventRow>,
    /// Conntrack events (`CtEvent`), all CPUs summed.
    pub conntrack_events: Vec<EventRow>,
    /// What host routing did with translated packets (`RouteEvent`), all
    /// CPUs summed (zero with host routing off).
    pub host_routing: Vec<EventRow>,
    pub maps: Vec<MapUse>,
}

/// One counter of an event array (socket-level or conntrack events).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct EventRow {
    pub event: String,
    pub count: u64,
}

/// The per-CPU counters of `map` (named `name`) at the indexes of `events`,
/// summed over CPUs.
fn event_rows(
    map: &PerCpuArray<MapData, u64>,
    name: &'static str,
    events: impl Iterator<Item = (u32, &'static str)>,
) -> Result<Vec<EventRow>, InspectError> {
    events
        .map(|(index, event)| {
            let v = map.get(&index, 0).map_err(read_err(name))?;
            Ok(EventRow {
                event: event.into(),
                count: v.iter().sum(),
            })
        })
        .collect()
}

pub fn sock_event_rows(maps: &Maps) -> Result<Vec<EventRow>, InspectError> {
    let events = SockEvent::ALL.iter().map(|e| (*e as u32, e.name()));
    event_rows(&maps.sock_stats, map_names::SOCK_STATS, events)
}

pub fn ct_event_rows(maps: &Maps) -> Result<Vec<EventRow>, InspectError> {
    let events = CtEvent::ALL.iter().map(|e| (*e as u32, e.name()));
    event_rows(&maps.ct_events, map_names::CT_EVENTS, events)
}

pub fn route_event_rows(maps: &Maps) -> Result<Vec<EventRow>, InspectError> {
    let events = RouteEvent::ALL.iter().map(|e| (*e as u32, e.name()));
    event_rows(&maps.route_events, map_names::ROUTE_EVENTS, events)
}

pub fn reason_rows(maps: &Maps) -> Result<Vec<ReasonRow>, InspectError> {
    Reason::ALL
        .iter()
        .map(|r| {
            let v = maps
                .reasons
                .get(&(*r as u32), 0)
                .map_err(read_err(map_names::REASON_STATS))?;
            Ok(ReasonRow {
                reason: r.name().into(),
                drop: r.is_drop(),
                packets: v.iter().sum(),
            })
        })
        .collect()
}

/// One map's kind (`hash`, `lru_hash`, `lpm_trie`, `array`,
/// `percpu_array`) and capacity as loaded (the agent's map-size flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCapacity {
    pub map: &'static str,
    pub kind: &'static str,
    pub max_entries: u32,
}

impl MapCapacity {
    /// Arrays always hold all their entries.
    pub fn is_array(&self) -> bool {
        self.kind.ends_with("array")
    }
}

/// Every pinned map's kind and capacity, read from the maps (one
/// `BPF_OBJ_GET_INFO_BY_FD` each), in the order `dataplane stats` lists
/// them.
pub fn capacities(maps: &Maps) -> Result<Vec<MapCapacity>, InspectError> {
    every_map(maps)
        .into_iter()
        .map(|(map, kind, data)| {
            let info = data.info().map_err(read_err(map))?;
            Ok(MapCapacity {
                map,
                kind,
                max_entries: info.max_entries(),
            })
        })
        .collect()
}

/// Every map of [`Maps`]: name, kind, handle, in the order `dataplane
/// stats` lists them.
fn every_map(maps: &Maps) -> [(&'static str, &'static str, &aya::maps::MapData); 20] {
    [
        (map_names::SERVICES, "hash", maps.services.map()),
        (map_names::BACKENDS, "hash", maps.backends.map()),
        (map_names::MAGLEV, "hash", maps.maglev.map()),
        (map_names::CONNTRACK, "lru_hash", maps.conntrack.map()),
        (map_names::AFFINITY, "lru_hash", maps.affinity.map()),
        (map_names::SOURCE_RANGES, "lpm_trie", maps.source_ranges.map()),
        (map_names::NAMES, "hash", maps.names.map()),
        (map_names::SOCK_NAT, "lru_hash", maps.sock_nat.map()),
        (map_names::SOCK_AFFINITY, "lru_hash", maps.sock_affinity.map()),
        (map_names::SERVICE_STATS, "percpu_array", maps.service_stats.map()),
        (map_names::REASON_STATS, "percpu_array", maps.reasons.map()),
        (map_names::CONFIG, "array", maps.config.map()),
        (map_names::SOCK_STATS, "percpu_array", maps.sock_stats.map()),
        (map_names::CT_EVENTS, "percpu_array", maps.ct_events.map()),
        (map_names::ROUTE_EVENTS, "percpu_array", maps.route_events.map()),
        (map_names::VIP_FILTER, "array", maps.vip_filter.map()),
        (map_names::BACKEND_FILTER, "array", maps.backend_filter.map()),
        (map_names::ENDPOINTS, "hash", maps.endpoints.map()),
        (map_names::FRONTEND_CACHE, "array", maps.frontend_cache.map()),
        (map_names::FRONTEND_FILTER, "array", maps.frontend_filter.map()),
    ]
}

/// Everything `dataplane stats` shows. Counts the entries of every hash
/// map and trie key by key (`BPF_MAP_GET_NEXT_KEY`, one call per entry:
/// about 1.1 million calls for 100,000 Services of 4 endpoints with a
/// quarter-full conntrack table); on demand only, the metrics never call
/// it (see [`snapshot`]).
pub fn stats(maps: &Maps) -> Result<Stats, InspectError> {
    fn count<K>(
        name: &'static str,
        keys: impl Iterator<Item = Result<K, aya::maps::MapError>>,
    ) -> Result<u64, InspectError> {
        let mut n = 0u64;
        for k in keys {
            k.map_err(read_err(name))?;
            n += 1;
        }
        Ok(n)
    }
    let caps = capacities(maps)?;
    let max = |name: &str| caps.iter().find(|c| c.map == name).map_or(0, |c| c.max_entries);
    let entries = |name: &'static str| -> Result<u64, InspectError> {
        match name {
            map_names::SERVICES => count(name, maps.services.keys()),
            map_names::BACKENDS => count(name, maps.backends.keys()),
            map_names::MAGLEV => count(name, maps.maglev.keys()),
            map_names::CONNTRACK => count(name, maps.conntrack.keys()),
            map_names::AFFINITY => count(name, maps.affinity.keys()),
            map_names::SOURCE_RANGES => count(name, maps.source_ranges.keys().map(|k| k.map(|k| k.prefix_len()))),
            map_names::NAMES => count(name, maps.names.keys()),
            map_names::SOCK_NAT => count(name, maps.sock_nat.keys()),
            map_names::SOCK_AFFINITY => count(name, maps.sock_affinity.keys()),
            map_names::ENDPOINTS => count(name, maps.endpoints.keys()),
            _ => Ok(u64::from(max(name))),
        }
    };
    let mut uses = Vec::new();
    for (c, (_, _, data)) in caps.iter().zip(every_map(maps)) {
        uses.push(MapUse {
            map: c.map.into(),
            kind: c.kind.into(),
            entries: entries(c.map)?,
            max_entries: c.max_entries,
            memory_bytes: crate::bpf::mapmem::of_fd(std::os::fd::AsFd::as_fd(data.fd())).map_err(|e| {
                InspectError::Fdinfo {
                    map: c.map,
                    error: e.to_string(),
                }
            })?,
        });
    }
    let conntrack = uses
        .iter()
        .find(|u| u.map == map_names::CONNTRACK)
        .map_or(0, |u| u.entries);
    let counter = |index: u32| -> Result<u64, InspectError> {
        Ok(maps
            .reasons
            .get(&index, 0)
            .map_err(read_err(map_names::REASON_STATS))?
            .iter()
            .sum())
    };
    let created = counter(counters::CT_CREATED)?;
    let replaced = counter(counters::CT_REPLACED)?;
    Ok(Stats {
        conntrack_created: created,
        conntrack_evicted: snapshot::evicted(created, replaced, conntrack),
        reasons: reason_rows(maps)?,
        socket_lb: sock_event_rows(maps)?,
        conntrack_events: ct_event_rows(maps)?,
        host_routing: route_event_rows(maps)?,
        conntrack_entries: conntrack,
        conntrack_max: max(map_names::CONNTRACK),
        maps: uses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_in_words() {
        let v = ServiceValue {
            flags: SVC_F_AFFINITY | SVC_F_EXTERNAL | SVC_F_SOURCE_RANGES,
            affinity_timeout_s: 60,
            ..Default::default()
        };
        assert_eq!(service_flags(&v), ["affinity=60s", "external", "source-ranges"]);
        assert_eq!(ct_flags(CT_F_SEEN_REPLY | CT_F_CLOSING), ["seen-reply", "closing"]);
        assert_eq!(ct_direction(CT_F_REPLY), "reply");
    }
}
