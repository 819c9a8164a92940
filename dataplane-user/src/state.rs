//! The agent's own state as the HTTP endpoints see it: counters, health
//! and the sync-duration histogram. Written by the sync loop, read by
//! `/healthz`, `/readyz` and `/metrics`.

use std::{
    fmt::Write,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

/// The agent's counters and health, shared with the health
/// endpoints and the metrics.
#[derive(Debug, Default)]
pub struct AgentState {
    /// Syncs applied so far.
    pub syncs: AtomicU64,
    /// Objects (or parts of objects) skipped or cut in the last sync.
    pub skipped_objects: AtomicU64,
    /// Sum over all syncs of the objects skipped in each (an object that
    /// stays bad counts once per sync).
    pub skipped_total: AtomicU64,
    /// Watch failures after which the source retried (see
    /// [`crate::source::SourceCounters`]).
    pub watch_restarts: AtomicU64,
    /// Relists after the first list (410 Gone).
    pub relists: AtomicU64,
    /// Frontends whose map writes failed, summed over syncs.
    pub sync_errors: AtomicU64,
    /// Set while the sync loop runs.
    pub alive: AtomicBool,
    /// Set once the first full sync has been applied.
    pub ready: AtomicBool,
    /// How long syncs take.
    pub sync_duration: SyncHistogram,
}

/// A copy of [`AgentState`]'s counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub syncs: u64,
    pub skipped_objects: u64,
    pub skipped_total: u64,
    pub watch_restarts: u64,
    pub relists: u64,
    pub sync_errors: u64,
}

impl AgentState {
    pub fn counters(&self) -> Counters {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            syncs: l(&self.syncs),
            skipped_objects: l(&self.skipped_objects),
            skipped_total: l(&self.skipped_total),
            watch_restarts: l(&self.watch_restarts),
            relists: l(&self.relists),
            sync_errors: l(&self.sync_errors),
        }
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the sync duration histogram's buckets, in seconds.
pub const SYNC_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A lock-free histogram of sync durations.
#[derive(Debug, Default)]
pub struct SyncHistogram {
    /// Observations per bucket (not cumulative; summed when rendered).
    buckets: [AtomicU64; SYNC_BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl SyncHistogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = SYNC_BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub(crate) fn render(&self, name: &str, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {name} Time one sync took (desired state, diff, map writes)."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in SYNC_BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = SyncHistogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10));
        let mut out = String::new();
        h.render("x", &mut out);
        assert!(out.contains("x_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"2.5\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }
}
