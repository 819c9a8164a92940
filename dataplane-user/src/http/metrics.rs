//! Prometheus metrics on `/metrics` (default 127.0.0.1:10249, like
//! kube-proxy's), in the text exposition format, written by hand: a few
//! counter families do not need a metrics crate.
//!
//! Datapath counters are read at scrape time from second handles on the
//! agent's maps (opened by map id, so this works pinned or not); the
//! agent's own counters come from [`AgentState`].

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::{
    bpf::loader::Maps,
    http::health::{read_request_line, write_response},
    inspect,
    state::AgentState,
};

/// A label value, escaped as the exposition format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The agent's own counters.
fn render_agent(state: &AgentState, out: &mut String) {
    let c = state.counters();
    for (name, kind, help, v) in [
        ("dataplane_syncs_total", "counter", "Syncs applied.", c.syncs),
        (
            "dataplane_watch_restarts_total",
            "counter",
            "Watch or list failures the source retried.",
            c.watch_restarts,
        ),
        (
            "dataplane_relists_total",
            "counter",
            "Full relists after the first list (410 Gone).",
            c.relists,
        ),
        (
            "dataplane_skipped_objects",
            "gauge",
            "Objects (or parts) skipped as invalid in the last sync.",
            c.skipped_objects,
        ),
        (
            "dataplane_skipped_objects_total",
            "counter",
            "Objects skipped as invalid, summed over syncs.",
            c.skipped_total,
        ),
        (
            "dataplane_sync_errors_total",
            "counter",
            "Frontends whose map writes failed, summed over syncs.",
            c.sync_errors,
        ),
        (
            "dataplane_ready",
            "gauge",
            "1 once the first full sync is programmed.",
            u64::from(state.is_ready()),
        ),
    ] {
        family(out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    }
    state.sync_duration.render("dataplane_sync_duration_seconds", out);
}

/// A per-service counter family: name, help, how to read it from a row.
type PerService = (&'static str, &'static str, fn(&inspect::ServiceRow) -> u64);

/// The datapath's counters and map use.
pub fn render_maps(maps: &Maps, out: &mut String) -> Result<(), inspect::InspectError> {
    let services = inspect::service_rows(maps)?;
    let stats = inspect::stats(maps)?;
    let per_service: [PerService; 4] = [
        (
            "dataplane_service_packets_total",
            "Packets translated towards a backend, per frontend.",
            |r| r.packets,
        ),
        (
            "dataplane_service_bytes_total",
            "Bytes (L3) of the packets translated towards a backend, per frontend.",
            |r| r.bytes,
        ),
        (
            "dataplane_service_new_flows_total",
            "New flows created, per frontend.",
            |r| r.new_flows,
        ),
        (
            "dataplane_service_no_backend_total",
            "Packets rejected or dropped for lack of a usable backend, per frontend.",
            |r| r.no_backend,
        ),
    ];
    for (name, help, get) in per_service {
        family(out, name, "counter", help);
        for r in &services {
            let _ = writeln!(
                out,
                "{name}{{service=\"{}\",frontend=\"{}\"}} {}",
                label(&r.name),
                label(&r.frontend),
                get(r)
            );
        }
    }
    family(
        out,
        "dataplane_datapath_packets_total",
        "counter",
        "Packets seen by the programs, by reason (drop=\"true\" for drops).",
    );
    for r in &stats.reasons {
        let _ = writeln!(
            out,
            "dataplane_datapath_packets_total{{reason=\"{}\",drop=\"{}\"}} {}",
            r.reason, r.drop, r.packets
        );
    }
    family(
        out,
        "dataplane_socket_lb_events_total",
        "counter",
        "What the socket-level programs did (--socket-lb-cgroup): connects and datagrams translated, replies and peer names restored, rejects.",
    );
    for e in &stats.socket_lb {
        let _ = writeln!(
            out,
            "dataplane_socket_lb_events_total{{event=\"{}\"}} {}",
            e.event, e.count
        );
    }
    family(
        out,
        "dataplane_conntrack_entries",
        "gauge",
        "Conntrack entries (two per flow).",
    );
    let _ = writeln!(out, "dataplane_conntrack_entries {}", stats.conntrack_entries);
    family(out, "dataplane_conntrack_capacity", "gauge", "Conntrack map size.");
    let _ = writeln!(out, "dataplane_conntrack_capacity {}", stats.conntrack_max);
    family(
        out,
        "dataplane_conntrack_created_total",
        "counter",
        "Conntrack entries written for new flows (two per flow).",
    );
    let _ = writeln!(out, "dataplane_conntrack_created_total {}", stats.conntrack_created);
    family(
        out,
        "dataplane_conntrack_evictions_total",
        "counter",
        "Conntrack entries the LRU evicted to make room (created - written over an existing entry - present).",
    );
    let _ = writeln!(out, "dataplane_conntrack_evictions_total {}", stats.conntrack_evicted);
    family(
        out,
        "dataplane_map_entries",
        "gauge",
        "Entries in each map (arrays are always full).",
    );
    for m in &stats.maps {
        let _ = writeln!(out, "dataplane_map_entries{{map=\"{}\"}} {}", m.map, m.entries);
    }
    family(out, "dataplane_map_capacity", "gauge", "max_entries of each map.");
    for m in &stats.maps {
        let _ = writeln!(out, "dataplane_map_capacity{{map=\"{}\"}} {}", m.map, m.max_entries);
    }
    Ok(())
}

/// The whole exposition.
pub fn render(state: &AgentState, maps: Option<&Maps>) -> String {
    let mut out = String::new();
    render_agent(state, &mut out);
    if let Some(maps) = maps {
        let mut part = String::new();
        match render_maps(maps, &mut part) {
            Ok(()) => out.push_str(&part),
            Err(e) => {
                family(
                    &mut out,
                    "dataplane_map_read_errors",
                    "gauge",
                    "1 when the maps could not be read.",
                );
                let _ = writeln!(out, "# {}", e.to_string().replace('\n', " "));
                let _ = writeln!(out, "dataplane_map_read_errors 1");
            }
        }
    }
    out
}

/// Serves `/metrics` until the task is aborted. `maps` are the agent's
/// second handles (read only).
pub async fn serve(listener: TcpListener, state: Arc<AgentState>, maps: Option<Arc<Mutex<Maps>>>) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (state, maps) = (state.clone(), maps.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(conn, state, maps).await {
                debug!(%peer, error = %e, "metrics endpoint: request failed");
            }
        });
    }
}

async fn handle(mut conn: TcpStream, state: Arc<AgentState>, maps: Option<Arc<Mutex<Maps>>>) -> std::io::Result<()> {
    let line = read_request_line(&mut conn).await?;
    let mut parts = line.split_ascii_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or(target);
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return write_response(&mut conn, 405, "text/plain", "method not allowed\n", false).await;
    }
    if path != "/metrics" {
        return write_response(&mut conn, 404, "text/plain", "not found\n", head_only).await;
    }
    // Iterating the maps is a few syscalls per entry: keep it off the
    // async workers.
    let body = tokio::task::spawn_blocking(move || {
        let guard = maps.as_ref().map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
        render(&state, guard.as_deref())
    })
    .await
    .map_err(std::io::Error::other)?;
    write_response(
        &mut conn,
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        &body,
        head_only,
    )
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn agent_counters_render_without_maps() {
        let s = AgentState::default();
        s.syncs.store(4, Ordering::Relaxed);
        let out = render(&s, None);
        assert!(
            out.contains("# TYPE dataplane_syncs_total counter\ndataplane_syncs_total 4\n"),
            "{out}"
        );
        assert!(out.contains("dataplane_sync_duration_seconds_count 0"), "{out}");
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
