//! Prometheus metrics on `/metrics` (default 127.0.0.1:10249, like
//! kube-proxy's), encoded by prometheus-client in the Prometheus text
//! format 0.0.4.
//!
//! A scrape reads no map: its cost does not grow with the Services (only
//! with the series asked for). Two collectors render what is already at
//! hand: the agent's counters and the entries of the maps it writes, from
//! [`AgentState`]; the datapath's counters and the entries of the maps the
//! programs write, from the last [`Snapshot`], which a background task
//! reads in batches every `--metrics-interval-ms` from second handles on
//! the agent's maps (opened by map id, so this works pinned or not).

use std::{
    fmt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, UNIX_EPOCH},
};

use hyper::StatusCode;
use prometheus_client::{
    collector::Collector,
    encoding::{prometheus_text, DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use dataplane_common::map_names;

use super::{Handler, Reply};
use crate::{
    bpf::loader::Maps,
    inspect::{
        snapshot::{self, ServiceCounters, Snapshot},
        MapCapacity,
    },
    state::AgentState,
};

/// Encodes one unlabelled counter; `name` without `_total` (the encoder
/// adds it).
fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

/// Encodes one unlabelled gauge.
fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let g = ConstGauge::new(v as i64);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// Label pairs of one sample.
type Labels = Vec<(&'static str, String)>;

/// Encodes a labelled family of `kind` (counter or gauge), one sample per
/// (labels, value).
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl Iterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in samples {
        let sample = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(sample)?,
            _ => ConstGauge::new(v as i64).encode(sample)?,
        }
    }
    Ok(())
}

/// The agent's own counters, read from [`AgentState`] at scrape time.
#[derive(Debug)]
struct AgentCollector(Arc<AgentState>);

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let state = &self.0;
        family(
            &mut enc,
            "dataplane_build_info",
            "The agent's release, commit and map layout version; always 1.",
            MetricType::Gauge,
            std::iter::once((
                vec![
                    ("version", crate::version::VERSION.to_string()),
                    ("commit", crate::version::COMMIT.to_string()),
                    ("abi", crate::version::ABI.to_string()),
                ],
                1,
            )),
        )?;
        let c = state.counters();
        counter(&mut enc, "dataplane_syncs", "Syncs applied.", c.syncs)?;
        counter(
            &mut enc,
            "dataplane_watch_restarts",
            "Watch or list failures the source retried.",
            c.watch_restarts,
        )?;
        counter(
            &mut enc,
            "dataplane_relists",
            "Full relists after the first list (410 Gone).",
            c.relists,
        )?;
        gauge(
            &mut enc,
            "dataplane_skipped_objects",
            "Objects (or parts) skipped as invalid in the last sync.",
            c.skipped_objects,
        )?;
        counter(
            &mut enc,
            "dataplane_skipped_objects",
            "Objects skipped as invalid, summed over syncs.",
            c.skipped_total,
        )?;
        counter(
            &mut enc,
            "dataplane_sync_errors",
            "Frontends whose map writes failed, summed over syncs.",
            c.sync_errors,
        )?;
        counter(
            &mut enc,
            "dataplane_migration_lost_entries",
            "Entries of pinned maps a migration to new sizes could not keep (each named in the log).",
            state.migration_lost.load(std::sync::atomic::Ordering::Relaxed),
        )?;
        gauge(
            &mut enc,
            "dataplane_ready",
            "1 once the first full sync is programmed.",
            u64::from(state.is_ready()),
        )?;
        let h = &state.sync_duration.0;
        h.encode(enc.encode_descriptor(
            "dataplane_sync_duration_seconds",
            "Time one sync took (desired state, diff, map writes).",
            None,
            h.metric_type(),
        )?)
    }
}

/// A per-service counter family: name (without `_total`), help, how to read
/// it from a row.
type PerService = (&'static str, &'static str, fn(&ServiceCounters) -> u64);

const PER_SERVICE: [PerService; 4] = [
    (
        "dataplane_service_packets",
        "Packets translated towards a backend, per frontend.",
        |r| r.packets,
    ),
    (
        "dataplane_service_bytes",
        "Bytes (L3) of the packets translated towards a backend, per frontend.",
        |r| r.bytes,
    ),
    ("dataplane_service_new_flows", "New flows created, per frontend.", |r| {
        r.new_flows
    }),
    (
        "dataplane_service_no_backend",
        "Packets rejected or dropped for lack of a usable backend, per frontend.",
        |r| r.no_backend,
    ),
];

/// The datapath's side of the metrics: the maps' capacities (read once)
/// and the last [`Snapshot`], replaced by [`refresh`].
#[derive(Debug)]
pub struct Datapath {
    capacities: Vec<MapCapacity>,
    last: Mutex<Option<Arc<Snapshot>>>,
    /// The last read failed (the previous snapshot, if any, stays).
    failed: AtomicBool,
}

impl Datapath {
    pub fn new(capacities: Vec<MapCapacity>) -> Self {
        Datapath {
            capacities,
            last: Mutex::new(None),
            failed: AtomicBool::new(false),
        }
    }

    /// Takes the result of one read.
    pub fn store(&self, read: Result<Snapshot, String>) {
        match read {
            Ok(s) => {
                *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(s));
                if self.failed.swap(false, Ordering::Relaxed) {
                    info!("metrics: reading the maps works again");
                }
            }
            Err(e) => {
                if !self.failed.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, "metrics: reading the maps failed; /metrics shows the last snapshot read");
                }
            }
        }
    }

    fn last(&self) -> Option<Arc<Snapshot>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Renders the last snapshot and the agent's record of the maps it
/// writes: no map is read here.
struct DatapathCollector {
    state: Arc<AgentState>,
    datapath: Arc<Datapath>,
}

impl fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatapathCollector")
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        gauge(
            &mut enc,
            "dataplane_map_read_errors",
            "1 when the last read of the maps failed (the datapath series are then those of the last read that worked).",
            u64::from(self.datapath.failed.load(Ordering::Relaxed)),
        )?;
        let Some(snap) = self.datapath.last() else {
            return Ok(());
        };
        let programmed = self.state.programmed();
        let entries = |c: &MapCapacity| -> u64 {
            match c.map {
                m if m == map_names::SERVICES => programmed.services,
                m if m == map_names::BACKENDS => programmed.backends,
                m if m == map_names::MAGLEV => programmed.maglev,
                m if m == map_names::NAMES => programmed.names,
                m if m == map_names::SOURCE_RANGES => programmed.source_ranges,
                m if m == map_names::ENDPOINTS => programmed.endpoints,
                m => snap
                    .entries(m)
                    .unwrap_or(if c.is_array() { c.max_entries.into() } else { 0 }),
            }
        };
        let ts = snap.taken_at.duration_since(UNIX_EPOCH).unwrap_or_default();
        ConstGauge::new(ts.as_secs_f64()).encode(enc.encode_descriptor(
            "dataplane_datapath_snapshot_timestamp_seconds",
            "When the datapath series were read (Unix time): the maps are read every --metrics-interval-ms, not at each scrape.",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(snap.took.as_secs_f64()).encode(enc.encode_descriptor(
            "dataplane_datapath_snapshot_duration_seconds",
            "How long the last read of the maps took.",
            None,
            MetricType::Gauge,
        )?)?;
        if let Some(services) = &snap.services {
            for (name, help, get) in PER_SERVICE {
                family(
                    &mut enc,
                    name,
                    help,
                    MetricType::Counter,
                    services.iter().map(|r| {
                        (
                            vec![("service", r.name.clone()), ("frontend", r.frontend.clone())],
                            get(r),
                        )
                    }),
                )?;
            }
        }
        family(
            &mut enc,
            "dataplane_datapath_packets",
            "Packets seen by the programs, by reason (drop=\"true\" for drops).",
            MetricType::Counter,
            snap.reasons.iter().map(|r| {
                (
                    vec![("reason", r.reason.to_string()), ("drop", r.drop.to_string())],
                    r.packets,
                )
            }),
        )?;
        family(
            &mut enc,
            "dataplane_conntrack_events",
            "Conntrack events: clash_resolved counts new flows given another source port because another live flow held their reply tuple; stateless_new_flow counts TCP segments (SYNs, and others of flows conntrack does not know) and UDP datagrams translated without conntrack state by the flood guard (--new-flows-per-cpu), stateless_reply the answers (SYN-ACKs, TCP segments, UDP datagrams) translated back for them.",
            MetricType::Counter,
            snap.conntrack_events
                .iter()
                .map(|e| (vec![("event", e.event.to_string())], e.count)),
        )?;
        family(
            &mut enc,
            "dataplane_host_routing_packets",
            "What host routing (--host-routing) did with translated packets: TC redirected them to the FIB's egress interface with the neighbour's MAC (redirected), into the peer namespace of that veth (redirected_peer) or with the kernel resolving the neighbour (redirected_neigh); XDP sent them back out of their interface (xdp_tx) or to another interface that takes XDP frames (xdp_redirect); or they went to the node's stack (to_stack: local destination, no route, fragmentation needed, forwarding off, TTL expiring; for XDP also no neighbour entry yet and interfaces that cannot take XDP frames).",
            MetricType::Counter,
            snap.host_routing.iter().map(|e| (vec![("result", e.event.to_string())], e.count)),
        )?;
        family(
            &mut enc,
            "dataplane_socket_lb_events",
            "What the socket-level programs did (--socket-lb-cgroup): connects and datagrams translated, replies and peer names restored, rejects.",
            MetricType::Counter,
            snap.socket_lb.iter().map(|e| (vec![("event", e.event.to_string())], e.count)),
        )?;
        gauge(
            &mut enc,
            "dataplane_conntrack_entries",
            "Conntrack entries (two per flow).",
            snap.conntrack_entries(),
        )?;
        gauge(
            &mut enc,
            "dataplane_conntrack_capacity",
            "Conntrack map size.",
            self.datapath
                .capacities
                .iter()
                .find(|c| c.map == map_names::CONNTRACK)
                .map_or(0, |c| c.max_entries.into()),
        )?;
        counter(
            &mut enc,
            "dataplane_conntrack_created",
            "Conntrack entries written for new flows (two per flow).",
            snap.conntrack_created,
        )?;
        counter(
            &mut enc,
            "dataplane_conntrack_evictions",
            "Conntrack entries the LRU evicted to make room (created - written over an existing entry - present).",
            snap.conntrack_evicted(),
        )?;
        family(
            &mut enc,
            "dataplane_map_entries",
            "Entries in each map: those the agent writes as it programmed them, those the programs write as last read, arrays always full.",
            MetricType::Gauge,
            self.datapath
                .capacities
                .iter()
                .map(|c| (vec![("map", c.map.to_string())], entries(c))),
        )?;
        family(
            &mut enc,
            "dataplane_map_memory_bytes",
            "Kernel memory of each of the agent's maps as the kernel accounts it (memlock in the map's fdinfo): since kernel 6.4 what the map uses, which for a preallocated map (LRU hashes, arrays) is its whole size from creation and for the other hash maps their bucket array plus the entries present; before 6.4 an estimate from the map's size.",
            MetricType::Gauge,
            snap.map_memory.iter().map(|m| (vec![("map", m.map.clone())], m.bytes)),
        )?;
        family(
            &mut enc,
            "dataplane_map_capacity",
            "max_entries of each map.",
            MetricType::Gauge,
            self.datapath
                .capacities
                .iter()
                .map(|c| (vec![("map", c.map.to_string())], c.max_entries.into())),
        )
    }
}

/// How the datapath's series are read: from `maps` (second handles on the
/// agent's maps) every `interval`, the per-frontend counters with
/// `per_service`.
pub struct Refresh {
    pub maps: Maps,
    pub interval: Duration,
    pub per_service: bool,
}

/// Default for [`Refresh::interval`]: Prometheus' usual scrape interval
/// is 15 to 60 s; 10 s keeps the reads (about 64 `bpf(2)` calls for a
/// full default conntrack table) off the hot path and the series at most
/// that stale.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// Reads a snapshot now and then every `r.interval` into `datapath`,
/// until the task is aborted.
pub async fn refresh(r: Refresh, datapath: Arc<Datapath>) {
    let cpus = match aya::util::nr_cpus() {
        Ok(n) => n,
        Err((path, e)) => {
            datapath.store(Err(format!("reading {path}: {e}")));
            return;
        }
    };
    let maps = Arc::new(Mutex::new(r.maps));
    let mut tick = tokio::time::interval(r.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let maps = maps.clone();
        let per_service = r.per_service;
        // Reading the maps is syscalls: keep it off the async workers.
        let read = tokio::task::spawn_blocking(move || {
            let maps = maps.lock().unwrap_or_else(|p| p.into_inner());
            snapshot::read(&maps, cpus, per_service).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = &read {
            debug!(error = %e, "metrics: reading the maps failed");
        }
        datapath.store(read);
    }
}

/// The metrics of one agent: its counters, and the datapath's when
/// `datapath` (the snapshots [`refresh`] keeps) is given.
pub struct Metrics(Arc<Registry>);

impl Metrics {
    pub fn new(state: Arc<AgentState>, datapath: Option<Arc<Datapath>>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(AgentCollector(state.clone())));
        if let Some(datapath) = datapath {
            registry.register_collector(Box::new(DatapathCollector { state, datapath }));
        }
        Metrics(Arc::new(registry))
    }

    /// The whole exposition.
    pub fn render(&self) -> String {
        render(&self.0)
    }
}

fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; the collectors turn read errors
    // into a metric.
    prometheus_text::encode(&mut out, registry).expect("encoding into a String");
    out
}

impl Handler for Metrics {
    async fn get(&self, path: &str) -> Reply {
        if path != "/metrics" {
            return Reply::text(StatusCode::NOT_FOUND, "not found\n");
        }
        // Rendering reads no map, but 100,000 frontends' series take a
        // while to encode: keep it off the async workers.
        let registry = self.0.clone();
        match tokio::task::spawn_blocking(move || render(&registry)).await {
            Ok(body) => Reply {
                status: StatusCode::OK,
                content_type: prometheus_text::CONTENT_TYPE,
                body,
            },
            Err(e) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    }
}

/// Serves `/metrics`, and with `refresh` keeps its datapath snapshot
/// fresh, until the task is aborted. `capacities`: of `refresh`'s maps.
pub async fn serve(listener: TcpListener, state: Arc<AgentState>, refresh: Option<(Refresh, Vec<MapCapacity>)>) {
    match refresh {
        Some((r, capacities)) => {
            let datapath = Arc::new(Datapath::new(capacities));
            let metrics = Arc::new(Metrics::new(state, Some(datapath.clone())));
            tokio::join!(super::serve(listener, metrics, "metrics"), self::refresh(r, datapath));
        }
        None => super::serve(listener, Arc::new(Metrics::new(state, None)), "metrics").await,
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::Ordering, time::Duration};

    use super::*;

    #[test]
    fn agent_counters_render_without_maps() {
        let s = Arc::new(AgentState::default());
        s.syncs.store(4, Ordering::Relaxed);
        let out = Metrics::new(s, None).render();
        assert!(
            out.contains("# TYPE dataplane_syncs_total counter\ndataplane_syncs_total 4\n"),
            "{out}"
        );
        assert!(out.contains("dataplane_sync_duration_seconds_count 0"), "{out}");
        let info = format!(
            "dataplane_build_info{{version=\"{}\",commit=\"{}\",abi=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION"),
            crate::version::COMMIT,
            dataplane_common::ABI_VERSION
        );
        assert!(out.contains(&info), "{out}");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let s = Arc::new(AgentState::default());
        s.sync_duration.observe(Duration::from_micros(300));
        s.sync_duration.observe(Duration::from_millis(3));
        s.sync_duration.observe(Duration::from_secs(10));
        let out = Metrics::new(s, None).render();
        let x = "dataplane_sync_duration_seconds";
        assert!(out.contains(&format!("{x}_bucket{{le=\"0.0005\"}} 1\n")), "{out}");
        assert!(out.contains(&format!("{x}_bucket{{le=\"0.005\"}} 2\n")), "{out}");
        assert!(out.contains(&format!("{x}_bucket{{le=\"2.5\"}} 2\n")), "{out}");
        assert!(out.contains(&format!("{x}_bucket{{le=\"+Inf\"}} 3\n")), "{out}");
        assert!(out.contains(&format!("{x}_count 3\n")), "{out}");
    }

    /// A snapshot of the datapath with `conntrack` entries and, with
    /// `per_service`, one frontend's counters.
    fn snapshot(conntrack: u64, per_service: bool) -> Snapshot {
        Snapshot {
            taken_at: UNIX_EPOCH + Duration::from_secs(1_000_000),
            took: Duration::from_millis(3),
            reasons: vec![crate::inspect::ReasonRow {
                reason: "nat_new_flow".into(),
                drop: false,
                packets: 7,
            }],
            conntrack_events: vec![],
            host_routing: vec![],
            socket_lb: vec![],
            conntrack_created: 20,
            conntrack_replaced: 2,
            datapath_entries: vec![(map_names::CONNTRACK, conntrack), (map_names::AFFINITY, 1)],
            map_memory: vec![crate::bpf::mapmem::MapMemory {
                map: map_names::CONNTRACK.into(),
                bytes: 44_040_192,
            }],
            services: per_service.then(|| {
                vec![ServiceCounters {
                    name: "shop/web:http".into(),
                    frontend: "198.19.0.10:80/tcp".into(),
                    packets: 5,
                    bytes: 300,
                    new_flows: 2,
                    no_backend: 0,
                }]
            }),
        }
    }

    fn capacities() -> Vec<MapCapacity> {
        let c = |map, kind, max_entries| MapCapacity { map, kind, max_entries };
        vec![
            c(map_names::SERVICES, "hash", 100),
            c(map_names::BACKENDS, "hash", 400),
            c(map_names::CONNTRACK, "lru_hash", 1000),
            c(map_names::AFFINITY, "lru_hash", 50),
            c(map_names::REASON_STATS, "percpu_array", 20),
        ]
    }

    /// A scrape renders the last snapshot and the agent's record of what
    /// it programmed; a failed read keeps the last snapshot and says so.
    #[test]
    fn datapath_series_come_from_the_snapshot_and_the_agent() {
        let state = Arc::new(AgentState::default());
        state.set_programmed(crate::state::ProgrammedEntries {
            services: 3,
            backends: 12,
            ..Default::default()
        });
        let datapath = Arc::new(Datapath::new(capacities()));
        let metrics = Metrics::new(state.clone(), Some(datapath.clone()));
        // Before the first read: no datapath series, no error.
        let out = metrics.render();
        assert!(out.contains("dataplane_map_read_errors 0\n"), "{out}");
        assert!(!out.contains("dataplane_conntrack_entries"), "{out}");

        datapath.store(Ok(snapshot(8, false)));
        let out = metrics.render();
        for line in [
            "dataplane_map_entries{map=\"DP_SERVICES\"} 3\n",
            "dataplane_map_entries{map=\"DP_BACKENDS\"} 12\n",
            "dataplane_map_entries{map=\"DP_CONNTRACK\"} 8\n",
            "dataplane_map_entries{map=\"DP_AFFINITY\"} 1\n",
            "dataplane_map_entries{map=\"DP_REASONS\"} 20\n",
            "dataplane_map_capacity{map=\"DP_CONNTRACK\"} 1000\n",
            "dataplane_map_memory_bytes{map=\"DP_CONNTRACK\"} 44040192\n",
            "dataplane_conntrack_entries 8\n",
            "dataplane_conntrack_capacity 1000\n",
            "dataplane_conntrack_created_total 20\n",
            "dataplane_conntrack_evictions_total 10\n",
            "dataplane_datapath_packets_total{reason=\"nat_new_flow\",drop=\"false\"} 7\n",
            "dataplane_datapath_snapshot_timestamp_seconds 1000000.0\n",
            "dataplane_datapath_snapshot_duration_seconds 0.003\n",
        ] {
            assert!(out.contains(line), "no {line:?} in\n{out}");
        }
        assert!(
            !out.contains("dataplane_service_"),
            "per-service series not asked for:\n{out}"
        );

        // The agent's record moves between reads; the snapshot does not.
        state.set_programmed(crate::state::ProgrammedEntries {
            services: 4,
            ..Default::default()
        });
        datapath.store(Err("reading map DP_CONNTRACK: EPERM".into()));
        let out = metrics.render();
        assert!(out.contains("dataplane_map_entries{map=\"DP_SERVICES\"} 4\n"), "{out}");
        assert!(out.contains("dataplane_conntrack_entries 8\n"), "{out}");
        assert!(out.contains("dataplane_map_read_errors 1\n"), "{out}");

        datapath.store(Ok(snapshot(9, true)));
        let out = metrics.render();
        assert!(out.contains("dataplane_map_read_errors 0\n"), "{out}");
        let labels = "{service=\"shop/web:http\",frontend=\"198.19.0.10:80/tcp\"}";
        for (name, v) in [("packets", 5), ("bytes", 300), ("new_flows", 2), ("no_backend", 0)] {
            let line = format!("dataplane_service_{name}_total{labels} {v}\n");
            assert!(out.contains(&line), "no {line:?} in\n{out}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        let mut registry = Registry::default();
        #[derive(Debug)]
        struct One;
        impl Collector for One {
            fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
                family(
                    &mut enc,
                    "x",
                    "h",
                    MetricType::Counter,
                    std::iter::once((vec![("service", "a\"b\\c".to_string())], 1)),
                )
            }
        }
        registry.register_collector(Box::new(One));
        prometheus_text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("x_total{service=\"a\\\"b\\\\c\"} 1\n"), "{out}");
    }
}
