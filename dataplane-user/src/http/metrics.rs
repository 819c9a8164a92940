//! Prometheus metrics on `/metrics` (default 127.0.0.1:10249, like
//! kube-proxy's), encoded by prometheus-client in the Prometheus text
//! format 0.0.4.
//!
//! Nothing is copied into metric objects ahead of time: two collectors read
//! at scrape time what the agent already keeps, the agent's counters from
//! [`AgentState`] and the datapath's counters from second handles on the
//! agent's maps (opened by map id, so this works pinned or not).

use std::{
    fmt,
    sync::{Arc, Mutex},
};

use hyper::StatusCode;
use prometheus_client::{
    collector::Collector,
    encoding::{prometheus_text, DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::debug;

use super::{Handler, Reply};
use crate::{bpf::loader::Maps, inspect, state::AgentState};

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
type PerService = (&'static str, &'static str, fn(&inspect::ServiceRow) -> u64);

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

/// The datapath's counters and map use, read from the maps at scrape time.
struct MapsCollector(Arc<Mutex<Maps>>);

impl fmt::Debug for MapsCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MapsCollector")
    }
}

impl Collector for MapsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let maps = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Read everything first: a read error then leaves no half-written
        // family behind.
        let read = inspect::service_rows(&maps).and_then(|rows| Ok((rows, inspect::stats(&maps)?)));
        let (services, stats) = match read {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "metrics: reading the maps failed");
                return gauge(
                    &mut enc,
                    "dataplane_map_read_errors",
                    "1 when the maps could not be read.",
                    1,
                );
            }
        };
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
        family(
            &mut enc,
            "dataplane_datapath_packets",
            "Packets seen by the programs, by reason (drop=\"true\" for drops).",
            MetricType::Counter,
            stats.reasons.iter().map(|r| {
                (
                    vec![("reason", r.reason.to_string()), ("drop", r.drop.to_string())],
                    r.packets,
                )
            }),
        )?;
        family(
            &mut enc,
            "dataplane_conntrack_events",
            "Conntrack events: clash_resolved counts new flows given another source port because another live flow held their reply tuple; stateless_new_flow counts TCP SYNs translated without conntrack state by the flood guard (--new-flows-per-cpu), stateless_reply the SYN-ACKs translated back for them.",
            MetricType::Counter,
            stats
                .conntrack_events
                .iter()
                .map(|e| (vec![("event", e.event.to_string())], e.count)),
        )?;
        family(
            &mut enc,
            "dataplane_host_routing_packets",
            "What host routing (--host-routing) did with translated packets: TC redirected them to the FIB's egress interface with the neighbour's MAC (redirected), into the peer namespace of that veth (redirected_peer) or with the kernel resolving the neighbour (redirected_neigh); XDP sent them back out of their interface (xdp_tx); or they went to the node's stack (to_stack: local destination, no route, fragmentation needed, forwarding off, TTL expiring; for XDP also every other interface and veths).",
            MetricType::Counter,
            stats.host_routing.iter().map(|e| (vec![("result", e.event.to_string())], e.count)),
        )?;
        family(
            &mut enc,
            "dataplane_socket_lb_events",
            "What the socket-level programs did (--socket-lb-cgroup): connects and datagrams translated, replies and peer names restored, rejects.",
            MetricType::Counter,
            stats.socket_lb.iter().map(|e| (vec![("event", e.event.to_string())], e.count)),
        )?;
        gauge(
            &mut enc,
            "dataplane_conntrack_entries",
            "Conntrack entries (two per flow).",
            stats.conntrack_entries,
        )?;
        gauge(
            &mut enc,
            "dataplane_conntrack_capacity",
            "Conntrack map size.",
            stats.conntrack_max.into(),
        )?;
        counter(
            &mut enc,
            "dataplane_conntrack_created",
            "Conntrack entries written for new flows (two per flow).",
            stats.conntrack_created,
        )?;
        counter(
            &mut enc,
            "dataplane_conntrack_evictions",
            "Conntrack entries the LRU evicted to make room (created - written over an existing entry - present).",
            stats.conntrack_evicted,
        )?;
        family(
            &mut enc,
            "dataplane_map_entries",
            "Entries in each map (arrays are always full).",
            MetricType::Gauge,
            stats.maps.iter().map(|m| (vec![("map", m.map.to_string())], m.entries)),
        )?;
        family(
            &mut enc,
            "dataplane_map_capacity",
            "max_entries of each map.",
            MetricType::Gauge,
            stats
                .maps
                .iter()
                .map(|m| (vec![("map", m.map.to_string())], m.max_entries.into())),
        )
    }
}

/// The metrics of one agent: its counters, and the datapath's when `maps`
/// (second, read-only handles on the agent's maps) are given.
pub struct Metrics(Arc<Registry>);

impl Metrics {
    pub fn new(state: Arc<AgentState>, maps: Option<Arc<Mutex<Maps>>>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(AgentCollector(state)));
        if let Some(maps) = maps {
            registry.register_collector(Box::new(MapsCollector(maps)));
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
        // Reading the maps is syscalls: keep it off the async workers.
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

/// Serves `/metrics` until the task is aborted.
pub async fn serve(listener: TcpListener, state: Arc<AgentState>, maps: Option<Arc<Mutex<Maps>>>) {
    super::serve(listener, Arc::new(Metrics::new(state, maps)), "metrics").await
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
