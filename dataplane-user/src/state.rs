//! The agent's own state as the HTTP endpoints see it: counters, health
//! and the sync-duration histogram. Written by the sync loop, read by
//! `/healthz`, `/readyz` and `/metrics`.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

use prometheus_client::metrics::histogram::Histogram;

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
    /// Entries a migration of the pinned maps could not keep (a smaller
    /// map); each named in the log.
    pub migration_lost: AtomicU64,
    /// Set while the sync loop runs.
    pub alive: AtomicBool,
    /// Set once the first full sync has been applied.
    pub ready: AtomicBool,
    /// Cleared while this node is being deleted or is tainted
    /// `ToBeDeletedByClusterAutoscaler` (set until a Node says otherwise,
    /// as kube-proxy does): `/healthz` then answers 503 so that load
    /// balancers drain the node.
    pub node_ineligible: AtomicBool,
    /// Unix time (ms) of the last applied sync; 0 before the first.
    pub last_sync_ms: AtomicU64,
    /// How long syncs take.
    pub sync_duration: SyncHistogram,
    /// Entries of the maps the agent writes, as it programmed them
    /// (published after every sync): `/metrics` counts them from here
    /// instead of walking the maps.
    pub programmed: Mutex<ProgrammedEntries>,
}

/// Entries of the maps only the agent writes, from its own record of what
/// it programmed (not a read of the maps).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgrammedEntries {
    /// `DP_SERVICES`: one per frontend.
    pub services: u64,
    /// `DP_BACKENDS`: the slots of every current generation, plus those of
    /// generations waiting out their grace period before deletion.
    pub backends: u64,
    /// `DP_MAGLEV`: the chunks of the Maglev tables, counted the same way.
    pub maglev: u64,
    /// `DP_NAMES`: one per frontend.
    pub names: u64,
    /// `DP_SRC_RANGES`: loadBalancerSourceRanges of every frontend, plus
    /// the cluster CIDRs.
    pub source_ranges: u64,
    /// `DP_ENDPOINTS`: distinct endpoints, while the agent keeps the set
    /// (host routing of socket-level connections), else 0.
    pub endpoints: u64,
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

    /// What the agent last programmed (see [`ProgrammedEntries`]).
    pub fn programmed(&self) -> ProgrammedEntries {
        *self.programmed.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_programmed(&self, entries: ProgrammedEntries) {
        *self.programmed.lock().unwrap_or_else(|p| p.into_inner()) = entries;
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn node_eligible(&self) -> bool {
        !self.node_ineligible.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the sync duration histogram's buckets, in seconds.
pub const SYNC_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The histogram of sync durations (lock-free; `/metrics` encodes it).
#[derive(Clone, Debug)]
pub struct SyncHistogram(pub Histogram);

impl Default for SyncHistogram {
    fn default() -> Self {
        SyncHistogram(Histogram::new(SYNC_BUCKETS))
    }
}

impl SyncHistogram {
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}
