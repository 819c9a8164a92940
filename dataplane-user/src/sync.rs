//! Programming the maps: diff the desired frontends against what is
//! programmed and write only the difference, in an order the datapath can
//! never observe half done.
//!
//! Order of writes for one frontend:
//! - new: backend slots of generation 0, then the service entry;
//! - changed backends: slots of the other generation, then the service entry
//!   (count and generation flip in one atomic map update), then the old
//!   generation's slots are deleted;
//! - removed: the service entry first, then its slots.

use std::collections::{BTreeMap, BTreeSet};

use dataplane_common::{
    limits, map_names, AffinityValue, Backend, BackendKey, MaglevChunk, MaglevKey, ServiceKey, ServiceName,
    ServiceStats, ServiceValue, SourceRangeKey, CT_F_ORIGINAL, CT_F_REPLY, IPPROTO_UDP, SOCK_NAT_FORWARD,
    SVC_F_AFFINITY, SVC_F_DROP_NO_LOCAL, SVC_F_EXTERNAL, SVC_F_NONE, SVC_F_RANDOM, SVC_F_SOURCE_RANGES,
};
use thiserror::Error;

use crate::{
    desired::{proto_name, Desired, Frontend},
    maglev,
};

/// Where the sync writes. Implemented for the real BPF maps and, in tests,
/// for a recording fake.
pub trait MapWriter {
    fn put_backend(&mut self, key: BackendKey, value: Backend) -> Result<(), String>;
    /// Several backend slots (one generation of a frontend); the real maps
    /// write them in one batch call.
    fn put_backends(&mut self, keys: &[BackendKey], values: &[Backend]) -> Result<(), String> {
        keys.iter().zip(values).try_for_each(|(k, v)| self.put_backend(*k, *v))
    }
    fn delete_backend(&mut self, key: BackendKey) -> Result<(), String>;
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), String>;
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), String>;
    fn put_maglev(&mut self, key: MaglevKey, value: MaglevChunk) -> Result<(), String>;
    /// A whole Maglev table (one generation); one batch call for the real
    /// maps.
    fn put_maglev_chunks(&mut self, keys: &[MaglevKey], values: &[MaglevChunk]) -> Result<(), String> {
        keys.iter().zip(values).try_for_each(|(k, v)| self.put_maglev(*k, *v))
    }
    fn delete_maglev(&mut self, key: MaglevKey) -> Result<(), String>;
    /// Deletes the session affinity entries of `service_id` whose backend is
    /// not in `keep` (all of them when `keep` is empty).
    fn prune_affinity(&mut self, service_id: u32, keep: &[Backend]) -> Result<(), String>;
    /// Records `namespace/name:port` of `service_id` for inspection.
    fn put_name(&mut self, service_id: u32, name: &str) -> Result<(), String>;
    fn delete_name(&mut self, service_id: u32) -> Result<(), String>;
    /// Allows sources in `addr/len` for `service_id` (loadBalancerSourceRanges).
    fn put_source_range(&mut self, service_id: u32, addr: std::net::IpAddr, len: u8) -> Result<(), String>;
    fn delete_source_range(&mut self, service_id: u32, addr: std::net::IpAddr, len: u8) -> Result<(), String>;
    /// Zeroes the per-service counters of a newly allocated id.
    fn reset_service_stats(&mut self, service_id: u32) -> Result<(), String>;
    /// Deletes the UDP flows of each `(service_id, backend)` in `stale`
    /// (an endpoint that stopped serving): both conntrack entries, and the
    /// socket-level forward entries that send an unconnected socket's
    /// datagrams to it. Returns how many flows and socket entries it
    /// deleted.
    fn clear_udp_flows(&mut self, stale: &[(u32, Backend)]) -> Result<usize, String>;
}

/// The service flags that come from the desired state (the others come
/// from the sync's own configuration).
const FRONTEND_FLAGS: u32 = SVC_F_EXTERNAL | SVC_F_DROP_NO_LOCAL | SVC_F_SOURCE_RANGES;

/// The endpoints `old` kept flows to (backends, or still serving) that
/// `new` does not: a UDP frontend's flows to them are cleared.
fn left_serving(old: &Frontend, new: &Frontend) -> Vec<Backend> {
    let kept = |b: &Backend| {
        new.backends
            .iter()
            .chain(&new.also_serving)
            .any(|n| n.addr == b.addr && n.port == b.port)
    };
    old.backends
        .iter()
        .chain(&old.also_serving)
        .filter(|b| !kept(b))
        .copied()
        .collect()
}

/// Whether two frontends program the same datapath state (names aside).
fn same_datapath(a: &Frontend, b: &Frontend) -> bool {
    a.backends == b.backends
        && a.affinity_timeout_s == b.affinity_timeout_s
        && a.flags == b.flags
        && a.source_ranges == b.source_ranges
}

/// A frontend as programmed in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Programmed {
    pub service_id: u32,
    pub generation: u16,
    /// Size of the Maglev table written for this generation (0: none).
    pub maglev_size: u32,
    pub frontend: Frontend,
}

/// How new flows pick a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Selection {
    /// Maglev consistent hashing: minimal disruption when backends change.
    #[default]
    Maglev,
    /// Uniformly random among the backends.
    Random,
}

/// Settings of the sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncConfig {
    pub selection: Selection,
    /// One of `maglev::SIZES`.
    pub maglev_size: u32,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            selection: Selection::Maglev,
            maglev_size: maglev::DEFAULT_SIZE,
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("service {service} ({frontend}): {cause}")]
pub struct SyncError {
    pub service: String,
    pub frontend: String,
    pub cause: String,
}

/// What one `apply` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Frontends that could not be (fully) written; their previous state, if
    /// any, stays in place.
    pub errors: Vec<SyncError>,
    /// UDP flows (and socket-level forward entries) deleted because their
    /// endpoint stopped serving.
    pub udp_flows_cleared: usize,
}

/// Endpoints of one UDP frontend that stopped serving, whose flows are
/// still to be cleared.
#[derive(Clone, Debug)]
struct StaleUdp {
    key: ServiceKey,
    service: String,
    service_id: u32,
    backends: Vec<Backend>,
}

/// Keeps the maps equal to the last desired state it was given.
pub struct Syncer<W: MapWriter> {
    writer: W,
    programmed: BTreeMap<ServiceKey, Programmed>,
    /// Frontends whose last write failed: [`Syncer::apply_changed`] retries
    /// them.
    failed: BTreeSet<ServiceKey>,
    free_ids: Vec<u32>,
    next_id: u32,
    /// The maps were created empty by this process (see
    /// [`Syncer::with_fresh_maps`]): ids not taken from `free_ids` were
    /// never used, their counters are known to be zero.
    fresh_maps: bool,
    max_services: u32,
    config: SyncConfig,
    /// Maglev tables computed ahead of the writes of one apply (in
    /// parallel, see [`Syncer::precompute_tables`]), by frontend.
    tables: BTreeMap<ServiceKey, Vec<u16>>,
    /// Collected by the upserts of one apply, cleared at its end (kept for
    /// the next apply when that failed).
    stale_udp: Vec<StaleUdp>,
}

/// Frontends whose tables are computed together, just before they are
/// written: bounds the memory the tables take (256 x 2 KiB at the default
/// size) while keeping every CPU busy.
const TABLE_BATCH: usize = 256;

/// Below this many tables to compute, one thread does them all.
const PARALLEL_TABLES_MIN: usize = 64;

/// Maglev tables for `work` (frontend, backends), computed on every CPU.
fn tables_in_parallel(work: &[(ServiceKey, &[Backend])], size: u32) -> Vec<(ServiceKey, Vec<u16>)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    if threads < 2 || work.len() < PARALLEL_TABLES_MIN {
        return work.iter().map(|(k, b)| (*k, maglev::table(b, size))).collect();
    }
    let per = work.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = work
            .chunks(per)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|(k, b)| (*k, maglev::table(b, size)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("maglev table thread panicked"))
            .collect()
    })
}

fn describe(key: &ServiceKey) -> String {
    format!("{}:{}/{}", key.ip(), key.host_port(), proto_name(key.proto))
}

impl<W: MapWriter> Syncer<W> {
    pub fn new(writer: W) -> Self {
        Self::with_config(writer, SyncConfig::default())
    }

    pub fn with_config(writer: W, config: SyncConfig) -> Self {
        Syncer {
            writer,
            programmed: BTreeMap::new(),
            failed: BTreeSet::new(),
            free_ids: Vec::new(),
            next_id: 0,
            fresh_maps: false,
            max_services: limits::MAX_SERVICES,
            config,
            tables: BTreeMap::new(),
            stale_udp: Vec::new(),
        }
    }

    /// Tells the syncer the maps were just created, empty: ids it allocates
    /// for the first time skip the counter reset (one syscall per frontend
    /// on a cold start). Recycled ids are still reset.
    pub fn with_fresh_maps(mut self) -> Self {
        self.fresh_maps = true;
        self
    }

    /// Follows a service map loaded with `n` entries (`MapSizes::services`):
    /// service ids stay below it, frontends beyond it are refused.
    pub fn set_max_services(&mut self, n: u32) {
        self.max_services = n;
    }

    pub fn programmed(&self) -> &BTreeMap<ServiceKey, Programmed> {
        &self.programmed
    }

    pub fn writer(&self) -> &W {
        &self.writer
    }

    pub fn into_writer(self) -> W {
        self.writer
    }

    fn alloc_id(&mut self) -> Option<u32> {
        if let Some(id) = self.free_ids.pop() {
            return Some(id);
        }
        (self.next_id < self.max_services).then(|| {
            self.next_id += 1;
            self.next_id - 1
        })
    }

    /// The Maglev table size `fe` gets (0: none).
    fn maglev_size_for(&self, fe: &Frontend) -> u32 {
        match self.config.selection {
            Selection::Maglev if !fe.backends.is_empty() => self.config.maglev_size,
            _ => 0,
        }
    }

    /// Writes one generation of `fe` (backend slots, Maglev table) and
    /// returns the service value that makes it current.
    fn write_generation(
        &mut self,
        key: &ServiceKey,
        id: u32,
        generation: u16,
        fe: &Frontend,
    ) -> Result<ServiceValue, String> {
        let keys: Vec<BackendKey> = (0..fe.backends.len())
            .map(|i| BackendKey::new(id, generation, i as u32))
            .collect();
        self.writer.put_backends(&keys, &fe.backends)?;
        let (flags, maglev_size) = match self.config.selection {
            Selection::Random => (SVC_F_RANDOM, 0),
            Selection::Maglev if fe.backends.is_empty() => (SVC_F_NONE, 0),
            Selection::Maglev => {
                let size = self.config.maglev_size;
                let table = match self.tables.remove(key) {
                    Some(t) => t,
                    None => maglev::table(&fe.backends, size),
                };
                let (mut keys, mut chunks) = (Vec::new(), Vec::new());
                for (c, part) in table.chunks(limits::MAGLEV_CHUNK as usize).enumerate() {
                    let mut chunk = MaglevChunk {
                        entries: [0; limits::MAGLEV_CHUNK as usize],
                    };
                    chunk.entries[..part.len()].copy_from_slice(part);
                    keys.push(MaglevKey::new(id, generation, c as u32 * limits::MAGLEV_CHUNK));
                    chunks.push(chunk);
                }
                self.writer.put_maglev_chunks(&keys, &chunks)?;
                (SVC_F_NONE, size)
            }
        };
        let flags = flags | (fe.flags & FRONTEND_FLAGS);
        for (addr, len) in &fe.source_ranges {
            self.writer.put_source_range(id, *addr, *len)?;
        }
        let (flags, affinity_timeout_s) = match fe.affinity_timeout_s {
            Some(t) => (flags | SVC_F_AFFINITY, t),
            None => (flags, 0),
        };
        Ok(ServiceValue {
            service_id: id,
            backend_count: fe.backends.len() as u16,
            generation,
            flags,
            maglev_size,
            affinity_timeout_s,
            _pad: 0,
        })
    }

    /// Deletes one generation's backend slots and Maglev chunks.
    fn delete_generation(&mut self, id: u32, generation: u16, backends: usize, maglev_size: u32) {
        // Missing entries are already what we want.
        for i in 0..backends {
            let _ = self.writer.delete_backend(BackendKey::new(id, generation, i as u32));
        }
        for pos in (0..maglev_size).step_by(limits::MAGLEV_CHUNK as usize) {
            let _ = self.writer.delete_maglev(MaglevKey::new(id, generation, pos));
        }
    }

    /// Computes, on every CPU, the Maglev tables of the frontends among
    /// `keys` (one batch of `TABLE_BATCH`) that the coming writes will give
    /// a new generation (new ones, and those whose datapath state changed):
    /// at 10,000 new frontends that is most of a cold sync's CPU time
    /// outside the kernel.
    fn precompute_tables<'a>(&mut self, desired: &Desired, keys: impl Iterator<Item = &'a ServiceKey>) {
        self.tables.clear();
        if self.config.selection != Selection::Maglev {
            return;
        }
        let size = self.config.maglev_size;
        let work: Vec<(ServiceKey, &[Backend])> = keys
            .filter_map(|k| {
                let fe = desired.frontends.get(k)?;
                let needs = match self.programmed.get(k) {
                    None => true,
                    Some(p) => !same_datapath(&p.frontend, fe) || p.maglev_size != self.maglev_size_for(fe),
                };
                (needs && !fe.backends.is_empty()).then_some((*k, fe.backends.as_slice()))
            })
            .collect();
        self.tables = tables_in_parallel(&work, size).into_iter().collect();
    }

    /// Makes the maps hold exactly `desired.frontends`.
    pub fn apply(&mut self, desired: &Desired) -> SyncReport {
        let mut report = SyncReport::default();
        let mut failed = BTreeSet::new();

        // Removals first: they free ids and map room for additions.
        let gone: Vec<ServiceKey> = self
            .programmed
            .keys()
            .filter(|k| !desired.frontends.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            self.tracked(key, &mut report, &mut failed, |s, r| s.remove_one(key, r));
        }
        let entries: Vec<(&ServiceKey, &Frontend)> = desired.frontends.iter().collect();
        for batch in entries.chunks(TABLE_BATCH) {
            self.precompute_tables(desired, batch.iter().map(|(k, _)| *k));
            for (key, fe) in batch {
                self.tracked(**key, &mut report, &mut failed, |s, r| s.upsert_one(key, fe, r));
            }
        }
        self.tables.clear();
        self.failed = failed;
        self.clear_stale_udp(&mut report);
        report
    }

    /// As [`Syncer::apply`], when only the frontends under `changed` can
    /// differ from the state last applied (plus those whose writes failed
    /// then, which are retried): the same writes in the same order, without
    /// visiting the others.
    pub fn apply_changed(&mut self, desired: &Desired, changed: &BTreeSet<ServiceKey>) -> SyncReport {
        let mut report = SyncReport::default();
        let mut failed = BTreeSet::new();
        let keys: BTreeSet<ServiceKey> = changed.union(&self.failed).copied().collect();
        for key in &keys {
            if self.programmed.contains_key(key) && !desired.frontends.contains_key(key) {
                self.tracked(*key, &mut report, &mut failed, |s, r| s.remove_one(*key, r));
            }
        }
        let upserts: Vec<&ServiceKey> = keys.iter().filter(|k| desired.frontends.contains_key(k)).collect();
        for batch in upserts.chunks(TABLE_BATCH) {
            self.precompute_tables(desired, batch.iter().copied());
            for key in batch {
                let fe = &desired.frontends[*key];
                self.tracked(**key, &mut report, &mut failed, |s, r| s.upsert_one(key, fe, r));
            }
        }
        self.tables.clear();
        self.failed = failed;
        self.clear_stale_udp(&mut report);
        report
    }

    /// Deletes the UDP flows to the endpoints that stopped serving in this
    /// apply, in one pass over the maps. The frontends' new state is
    /// already written, so a datagram that finds no flow any more starts a
    /// new one to a serving endpoint.
    fn clear_stale_udp(&mut self, report: &mut SyncReport) {
        if self.stale_udp.is_empty() {
            return;
        }
        let stale = std::mem::take(&mut self.stale_udp);
        let pairs: Vec<(u32, Backend)> = stale
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| (s.service_id, *b)))
            .collect();
        match self.writer.clear_udp_flows(&pairs) {
            Ok(n) => report.udp_flows_cleared += n,
            Err(cause) => {
                for s in &stale {
                    report.errors.push(SyncError {
                        service: s.service.clone(),
                        frontend: describe(&s.key),
                        cause: format!(
                            "clearing the UDP flows to endpoints that stopped serving: {cause}; retried at the next sync"
                        ),
                    });
                }
                self.stale_udp = stale;
            }
        }
    }

    /// Runs `op` on `key`, remembering the key when it reported an error.
    fn tracked(
        &mut self,
        key: ServiceKey,
        report: &mut SyncReport,
        failed: &mut BTreeSet<ServiceKey>,
        op: impl FnOnce(&mut Self, &mut SyncReport),
    ) {
        let errors = report.errors.len();
        op(self, report);
        if report.errors.len() > errors {
            failed.insert(key);
        }
    }

    /// Removes the frontend `key`: service entry first, then its slots.
    fn remove_one(&mut self, key: ServiceKey, report: &mut SyncReport) {
        let p = self.programmed.remove(&key).expect("key from programmed");
        if let Err(cause) = self.writer.delete_service(key) {
            report.errors.push(SyncError {
                service: p.frontend.service.clone(),
                frontend: describe(&key),
                cause: format!("deleting the service entry: {cause}"),
            });
            self.programmed.insert(key, p);
            return;
        }
        self.delete_generation(p.service_id, p.generation, p.frontend.backends.len(), p.maglev_size);
        for (addr, len) in &p.frontend.source_ranges {
            let _ = self.writer.delete_source_range(p.service_id, *addr, *len);
        }
        let _ = self.writer.delete_name(p.service_id);
        // The id is reused: no affinity may outlive the service.
        if let Err(cause) = self.writer.prune_affinity(p.service_id, &[]) {
            report.errors.push(SyncError {
                service: p.frontend.service.clone(),
                frontend: describe(&key),
                cause: format!("deleting session affinity entries: {cause}"),
            });
        }
        self.free_ids.push(p.service_id);
        report.removed += 1;
    }

    /// Adds or updates the frontend `key` (see the module doc for the order).
    fn upsert_one(&mut self, key: &ServiceKey, fe: &Frontend, report: &mut SyncReport) {
        let err = |cause: String| SyncError {
            service: fe.service.clone(),
            frontend: describe(key),
            cause,
        };
        let maglev_size = self.maglev_size_for(fe);
        // UDP only: the state before, to tell which endpoints stopped
        // serving.
        let before = match key.proto {
            IPPROTO_UDP => self.programmed.get(key).map(|p| (p.service_id, p.frontend.clone())),
            _ => None,
        };
        self.upsert_inner(key, fe, maglev_size, &err, report);
        // UDP flows to endpoints that stopped serving go (once the new
        // state is written: the flows' next datagrams pick among it).
        if let Some((service_id, old)) = before {
            let written = self.programmed.get(key).is_some_and(|p| p.frontend == *fe);
            if written {
                let backends = left_serving(&old, fe);
                if !backends.is_empty() {
                    self.stale_udp.push(StaleUdp {
                        key: *key,
                        service: fe.service.clone(),
                        service_id,
                        backends,
                    });
                }
            }
        }
    }

    fn upsert_inner(
        &mut self,
        key: &ServiceKey,
        fe: &Frontend,
        maglev_size: u32,
        err: &dyn Fn(String) -> SyncError,
        report: &mut SyncReport,
    ) {
        match self.programmed.get(key).cloned() {
            Some(p) if p.frontend == *fe && p.maglev_size == maglev_size => report.unchanged += 1,
            Some(p) if same_datapath(&p.frontend, fe) && p.maglev_size == maglev_size => {
                // Only names changed (or a restarted agent learns them):
                // nothing but the name to write.
                if p.frontend.display_name() != fe.display_name() {
                    if let Err(cause) = self.writer.put_name(p.service_id, &fe.display_name()) {
                        report.errors.push(err(format!("writing the name: {cause}")));
                    }
                }
                self.programmed.insert(
                    *key,
                    Programmed {
                        frontend: fe.clone(),
                        ..p
                    },
                );
                report.unchanged += 1;
            }
            Some(p) => {
                let generation = p.generation ^ 1;
                // Partial writes of the new generation are removed again on
                // failure; the current generation is never touched before
                // the flip.
                let value = match self.write_generation(key, p.service_id, generation, fe) {
                    Ok(v) => v,
                    Err(cause) => {
                        self.delete_generation(p.service_id, generation, fe.backends.len(), self.config.maglev_size);
                        report
                            .errors
                            .push(err(format!("writing backends: {cause}; previous backends kept")));
                        return;
                    }
                };
                if let Err(cause) = self.writer.put_service(*key, value) {
                    self.delete_generation(p.service_id, generation, fe.backends.len(), value.maglev_size);
                    report.errors.push(err(format!(
                        "updating the service entry: {cause}; previous backends kept"
                    )));
                    return;
                }
                self.delete_generation(p.service_id, p.generation, p.frontend.backends.len(), p.maglev_size);
                if p.frontend.display_name() != fe.display_name() {
                    let _ = self.writer.put_name(p.service_id, &fe.display_name());
                }
                for (addr, len) in &p.frontend.source_ranges {
                    if !fe.source_ranges.contains(&(*addr, *len)) {
                        let _ = self.writer.delete_source_range(p.service_id, *addr, *len);
                    }
                }
                // Clients remembered on a backend that left go elsewhere.
                if p.frontend.affinity_timeout_s.is_some() {
                    let keep: &[Backend] = if fe.affinity_timeout_s.is_some() {
                        &fe.backends
                    } else {
                        &[]
                    };
                    if let Err(cause) = self.writer.prune_affinity(p.service_id, keep) {
                        report
                            .errors
                            .push(err(format!("pruning session affinity entries: {cause}")));
                    }
                }
                self.programmed.insert(
                    *key,
                    Programmed {
                        service_id: p.service_id,
                        generation,
                        maglev_size: value.maglev_size,
                        frontend: fe.clone(),
                    },
                );
                report.updated += 1;
            }
            None => {
                // An id from the free list was used before; a new one from
                // fresh maps never was.
                let recycled = !self.free_ids.is_empty();
                let Some(id) = self.alloc_id() else {
                    report.errors.push(err(format!(
                        "the service map is full ({} frontends); not programmed",
                        self.max_services
                    )));
                    return;
                };
                let reset = if self.fresh_maps && !recycled {
                    Ok(())
                } else {
                    self.writer.reset_service_stats(id)
                };
                let written = reset
                    .and_then(|()| self.writer.put_name(id, &fe.display_name()))
                    .and_then(|()| self.write_generation(key, id, 0, fe));
                let written = written.and_then(|v| self.writer.put_service(*key, v).map(|()| v));
                match written {
                    Ok(v) => {
                        self.programmed.insert(
                            *key,
                            Programmed {
                                service_id: id,
                                generation: 0,
                                maglev_size: v.maglev_size,
                                frontend: fe.clone(),
                            },
                        );
                        report.added += 1;
                    }
                    Err(cause) => {
                        self.delete_generation(id, 0, fe.backends.len(), self.config.maglev_size);
                        self.free_ids.push(id);
                        report.errors.push(err(format!("{cause}; not programmed")));
                    }
                }
            }
        }
    }
}

/// What adopting pinned maps found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AdoptReport {
    pub frontends: usize,
    pub backends: usize,
    /// Backend slots and Maglev chunks no service pointed at (a generation
    /// half written when the previous agent stopped), deleted.
    pub stale_removed: usize,
}

impl Syncer<crate::loader::Maps> {
    /// Rebuilds the programmed state from maps a previous agent left pinned,
    /// instead of wiping them: the next `apply` then writes only what
    /// changed meanwhile. Entries no service points at are deleted.
    pub fn adopt(maps: crate::loader::Maps, config: SyncConfig) -> Result<(Self, AdoptReport), String> {
        let mut report = AdoptReport::default();
        let mut programmed = BTreeMap::new();
        let services: Vec<(ServiceKey, ServiceValue)> = maps
            .services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| format!("reading services: {e}"))?;
        let mut live: BTreeMap<u32, ServiceValue> = BTreeMap::new();
        let mut ranges: BTreeMap<u32, Vec<(std::net::IpAddr, u8)>> = BTreeMap::new();
        // A range has the family of its service.
        let families: BTreeMap<u32, u8> = services.iter().map(|(k, v)| (v.service_id, k.family)).collect();
        for key in maps.source_ranges.keys() {
            let key = key.map_err(|e| format!("reading source ranges: {e}"))?;
            let data = key.data();
            let id = u32::from_be(data.service_id_be);
            let family = families.get(&id).copied().unwrap_or(dataplane_common::FAMILY_V4);
            ranges.entry(id).or_default().push((
                dataplane_common::ip_of(&data.addr, family),
                (key.prefix_len() - 32) as u8,
            ));
        }
        for r in ranges.values_mut() {
            r.sort();
        }
        for (key, value) in services {
            let mut backends = Vec::with_capacity(value.backend_count as usize);
            for i in 0..value.backend_count as u32 {
                // A missing slot makes the set differ from any desired one,
                // so the next apply rewrites the service.
                if let Ok(b) = maps
                    .backends
                    .get(&BackendKey::new(value.service_id, value.generation, i), 0)
                {
                    backends.push(b);
                }
            }
            report.backends += backends.len();
            let affinity_timeout_s = (value.flags & SVC_F_AFFINITY != 0).then_some(value.affinity_timeout_s);
            let name = maps
                .names
                .get(&value.service_id, 0)
                .map(|n| n.as_str().to_string())
                .unwrap_or_default();
            let (service, port_name) = Frontend::split_display_name(&name);
            live.insert(value.service_id, value);
            programmed.insert(
                key,
                Programmed {
                    service_id: value.service_id,
                    generation: value.generation,
                    maglev_size: value.maglev_size,
                    frontend: Frontend {
                        service,
                        port_name,
                        backends,
                        affinity_timeout_s,
                        flags: value.flags & FRONTEND_FLAGS,
                        source_ranges: ranges.remove(&value.service_id).unwrap_or_default(),
                        also_serving: Vec::new(),
                    },
                },
            );
        }
        report.frontends = programmed.len();

        let mut maps = maps;
        let current_slot = |k: &BackendKey| {
            live.get(&k.service_id).is_some_and(|v| {
                let base = BackendKey::new(v.service_id, v.generation, 0).slot;
                (base..base + v.backend_count as u32).contains(&k.slot)
            })
        };
        let stale: Vec<BackendKey> = maps
            .backends
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !current_slot(k))
            .collect();
        for k in &stale {
            let _ = maps.backends.remove(k);
        }
        report.stale_removed += stale.len();
        let current_chunk = |k: &MaglevKey| {
            live.get(&k.service_id).is_some_and(|v| {
                let first = MaglevKey::new(v.service_id, v.generation, 0).chunk;
                let chunks = v.maglev_size.div_ceil(limits::MAGLEV_CHUNK);
                (first..first + chunks).contains(&k.chunk)
            })
        };
        let stale: Vec<MaglevKey> = maps
            .maglev
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !current_chunk(k))
            .collect();
        for k in &stale {
            let _ = maps.maglev.remove(k);
        }
        report.stale_removed += stale.len();

        let mut syncer = Syncer::with_config(maps, config);
        let used: std::collections::BTreeSet<u32> = live.keys().copied().collect();
        syncer.next_id = used.iter().next_back().map_or(0, |m| m + 1);
        syncer.free_ids = (0..syncer.next_id).filter(|i| !used.contains(i)).rev().collect();
        syncer.programmed = programmed;
        Ok((syncer, report))
    }
}

/// Deletes the entries of hash map `map` (named `name` in errors) that
/// `doomed` picks: read in batches (see `batch::for_each_entry`), deleted
/// one by one. Returns how many it deleted; entries gone meanwhile
/// (evicted by an LRU, say) are fine and not counted.
fn delete_where<K, V>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    name: &str,
    mut doomed: impl FnMut(&K, &V) -> bool,
) -> Result<usize, String>
where
    K: aya::Pod + bytemuck::Zeroable,
    V: aya::Pod + bytemuck::Zeroable,
{
    use aya::maps::IterableMap;
    use std::os::fd::AsFd;
    let mut gone = Vec::new();
    crate::batch::for_each_entry(map.map().fd().as_fd(), |k: &K, v: &V| {
        if doomed(k, v) {
            gone.push(*k);
        }
    })
    .map_err(|e| format!("reading {name}: {e}"))?;
    Ok(gone.into_iter().filter(|k| map.remove(k).is_ok()).count())
}

/// The real maps.
impl MapWriter for crate::loader::Maps {
    fn put_backend(&mut self, key: BackendKey, value: Backend) -> Result<(), String> {
        self.backends.insert(key, value, 0).map_err(|e| e.to_string())
    }
    fn put_backends(&mut self, keys: &[BackendKey], values: &[Backend]) -> Result<(), String> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        let fd = self.backends.map().fd().as_fd();
        crate::batch::update(fd, keys, values).map_err(|e| e.to_string())
    }
    fn put_maglev_chunks(&mut self, keys: &[MaglevKey], values: &[MaglevChunk]) -> Result<(), String> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        let fd = self.maglev.map().fd().as_fd();
        crate::batch::update(fd, keys, values).map_err(|e| e.to_string())
    }
    fn delete_backend(&mut self, key: BackendKey) -> Result<(), String> {
        self.backends.remove(&key).map_err(|e| e.to_string())
    }
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), String> {
        self.services.insert(key, value, 0).map_err(|e| e.to_string())
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), String> {
        self.services.remove(&key).map_err(|e| e.to_string())
    }
    fn put_maglev(&mut self, key: MaglevKey, value: MaglevChunk) -> Result<(), String> {
        self.maglev.insert(key, value, 0).map_err(|e| e.to_string())
    }
    fn delete_maglev(&mut self, key: MaglevKey) -> Result<(), String> {
        self.maglev.remove(&key).map_err(|e| e.to_string())
    }
    fn put_name(&mut self, service_id: u32, name: &str) -> Result<(), String> {
        self.names
            .insert(service_id, ServiceName::new(name), 0)
            .map_err(|e| e.to_string())
    }
    fn delete_name(&mut self, service_id: u32) -> Result<(), String> {
        self.names.remove(&service_id).map_err(|e| e.to_string())
    }
    fn put_source_range(&mut self, service_id: u32, addr: std::net::IpAddr, len: u8) -> Result<(), String> {
        let key = aya::maps::lpm_trie::Key::new(
            32 + len as u32,
            SourceRangeKey::new(service_id, dataplane_common::addr_of(addr).0),
        );
        self.source_ranges.insert(&key, 1, 0).map_err(|e| e.to_string())
    }
    fn delete_source_range(&mut self, service_id: u32, addr: std::net::IpAddr, len: u8) -> Result<(), String> {
        let key = aya::maps::lpm_trie::Key::new(
            32 + len as u32,
            SourceRangeKey::new(service_id, dataplane_common::addr_of(addr).0),
        );
        self.source_ranges.remove(&key).map_err(|e| e.to_string())
    }
    fn prune_affinity(&mut self, service_id: u32, keep: &[Backend]) -> Result<(), String> {
        let stale = |id: u32, v: &AffinityValue| id == service_id && !keep.contains(&v.backend);
        delete_where(&mut self.affinity, map_names::AFFINITY, |k, v| stale(k.service_id, v))?;
        // The socket-level programs' affinity (per network namespace).
        delete_where(&mut self.sock_affinity, map_names::SOCK_AFFINITY, |k, v| {
            stale(k.service_id, v)
        })?;
        Ok(())
    }
    fn clear_udp_flows(&mut self, stale: &[(u32, Backend)]) -> Result<usize, String> {
        let stale: std::collections::HashSet<(u32, dataplane_common::Addr, u16)> =
            stale.iter().map(|(id, b)| (*id, b.addr, b.port)).collect();
        let is_stale =
            |service_id: u32, addr: &dataplane_common::Addr, port: u16| stale.contains(&(service_id, *addr, port));
        // Original entries carry the backend as their translation; reply
        // entries come from it.
        let flows = delete_where(&mut self.conntrack, map_names::CONNTRACK, |k, v| {
            k.proto == IPPROTO_UDP
                && ((v.flags & CT_F_ORIGINAL != 0 && is_stale(v.service_id, &v.nat_addr, v.nat_port))
                    || (v.flags & CT_F_REPLY != 0 && is_stale(v.service_id, &k.saddr, k.sport)))
        })?;
        // Unconnected UDP sockets of the socket-level programs: the next
        // datagram to the frontend picks a backend again. (The reverse
        // entries stay: a late answer from the old backend still shows
        // the frontend. Connected sockets keep their backend: see README.)
        let sockets = delete_where(&mut self.sock_nat, map_names::SOCK_NAT, |k, v| {
            k.dir == SOCK_NAT_FORWARD && is_stale(v.service_id, &v.addr, v.port)
        })?;
        Ok(flows + sockets)
    }
    fn reset_service_stats(&mut self, service_id: u32) -> Result<(), String> {
        // Read once: aya reads /sys/devices/system/cpu/possible per call.
        static CPUS: std::sync::OnceLock<Result<usize, String>> = std::sync::OnceLock::new();
        let cpus = CPUS
            .get_or_init(|| aya::util::nr_cpus().map_err(|(_, e)| e.to_string()))
            .clone()?;
        let zeros =
            aya::maps::PerCpuValues::try_from(vec![ServiceStats::default(); cpus]).map_err(|e| e.to_string())?;
        self.service_stats.set(service_id, zeros, 0).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use dataplane_common::IPPROTO_TCP;

    use super::*;

    /// Records every write, and models the two maps.
    #[derive(Default)]
    struct Fake {
        log: Vec<String>,
        services: BTreeMap<ServiceKey, ServiceValue>,
        backends: BTreeMap<BackendKey, Backend>,
        maglev: BTreeMap<MaglevKey, MaglevChunk>,
        names: BTreeMap<u32, String>,
        fail_backend_writes: bool,
    }

    impl MapWriter for Fake {
        fn put_backend(&mut self, k: BackendKey, v: Backend) -> Result<(), String> {
            if self.fail_backend_writes {
                return Err("map full".into());
            }
            self.log.push(format!("put_backend {} {}", k.service_id, k.slot));
            self.backends.insert(k, v);
            Ok(())
        }
        fn delete_backend(&mut self, k: BackendKey) -> Result<(), String> {
            self.log.push(format!("delete_backend {} {}", k.service_id, k.slot));
            self.backends.remove(&k).map(|_| ()).ok_or_else(|| "not found".into())
        }
        fn put_service(&mut self, k: ServiceKey, v: ServiceValue) -> Result<(), String> {
            self.log.push(format!(
                "put_service {} gen {} count {}",
                v.service_id, v.generation, v.backend_count
            ));
            self.services.insert(k, v);
            Ok(())
        }
        fn delete_service(&mut self, k: ServiceKey) -> Result<(), String> {
            self.log.push("delete_service".into());
            self.services.remove(&k);
            Ok(())
        }
        fn put_maglev(&mut self, k: MaglevKey, v: MaglevChunk) -> Result<(), String> {
            self.log.push(format!("put_maglev {} {}", k.service_id, k.chunk));
            self.maglev.insert(k, v);
            Ok(())
        }
        fn delete_maglev(&mut self, k: MaglevKey) -> Result<(), String> {
            self.log.push(format!("delete_maglev {} {}", k.service_id, k.chunk));
            self.maglev.remove(&k).map(|_| ()).ok_or_else(|| "not found".into())
        }
        fn prune_affinity(&mut self, service_id: u32, keep: &[Backend]) -> Result<(), String> {
            self.log
                .push(format!("prune_affinity {service_id} keep {}", keep.len()));
            Ok(())
        }
        fn put_name(&mut self, id: u32, name: &str) -> Result<(), String> {
            self.names.insert(id, name.to_string());
            Ok(())
        }
        fn delete_name(&mut self, id: u32) -> Result<(), String> {
            self.names.remove(&id);
            Ok(())
        }
        fn put_source_range(&mut self, id: u32, addr: std::net::IpAddr, len: u8) -> Result<(), String> {
            self.log.push(format!("put_source_range {id} {addr}/{len}"));
            Ok(())
        }
        fn delete_source_range(&mut self, id: u32, addr: std::net::IpAddr, len: u8) -> Result<(), String> {
            self.log.push(format!("delete_source_range {id} {addr}/{len}"));
            Ok(())
        }
        fn clear_udp_flows(&mut self, stale: &[(u32, Backend)]) -> Result<usize, String> {
            let list: Vec<String> = stale.iter().map(|(id, b)| format!("{id} {}", b.ip())).collect();
            self.log.push(format!("clear_udp_flows {}", list.join(", ")));
            Ok(stale.len())
        }
        fn reset_service_stats(&mut self, id: u32) -> Result<(), String> {
            self.log.push(format!("reset_service_stats {id}"));
            Ok(())
        }
    }

    impl Fake {
        /// What the datapath would select from: the backends behind `key`.
        fn visible(&self, key: &ServiceKey) -> Vec<Backend> {
            let Some(v) = self.services.get(key) else { return vec![] };
            // Every Maglev position points at a slot of the same generation.
            for pos in (0..v.maglev_size).step_by(limits::MAGLEV_CHUNK as usize) {
                let chunk = self.maglev[&MaglevKey::new(v.service_id, v.generation, pos)];
                let n = (v.maglev_size - pos).min(limits::MAGLEV_CHUNK) as usize;
                assert!(chunk.entries[..n].iter().all(|e| *e < v.backend_count));
            }
            (0..v.backend_count as u32)
                .map(|i| self.backends[&BackendKey::new(v.service_id, v.generation, i)])
                .collect()
        }
    }

    /// Maglev with the smallest table: one chunk per generation.
    fn syncer() -> Syncer<Fake> {
        Syncer::with_config(
            Fake::default(),
            SyncConfig {
                selection: Selection::Maglev,
                maglev_size: 251,
            },
        )
    }

    fn key(last: u8) -> ServiceKey {
        ServiceKey::new(Ipv4Addr::new(198, 19, 0, last), 80, IPPROTO_TCP)
    }

    fn backends(lasts: &[u8]) -> Vec<Backend> {
        lasts
            .iter()
            .map(|l| Backend::new(Ipv4Addr::new(198, 18, 1, *l), 8080))
            .collect()
    }

    fn desired(entries: &[(ServiceKey, &[u8])]) -> Desired {
        Desired {
            frontends: entries
                .iter()
                .map(|(k, b)| {
                    (
                        *k,
                        Frontend {
                            service: "shop/web".into(),
                            port_name: "http".into(),
                            backends: backends(b),
                            affinity_timeout_s: None,
                            flags: 0,
                            source_ranges: vec![],
                            also_serving: Vec::new(),
                        },
                    )
                })
                .collect(),
            problems: vec![],
        }
    }

    /// A UDP frontend's flows to an endpoint are cleared when it stops
    /// serving, not while it still serves (terminating, or left out by a
    /// Local policy), and never for TCP; one call per apply.
    #[test]
    fn udp_flows_are_cleared_when_their_endpoint_stops_serving() {
        let udp = ServiceKey::new(Ipv4Addr::new(198, 19, 0, 53), 53, IPPROTO_UDP);
        let state = |entries: &[(ServiceKey, &[u8], &[u8])]| {
            let mut d = desired(&entries.iter().map(|(k, b, _)| (*k, *b)).collect::<Vec<_>>());
            for (k, _, serving) in entries {
                d.frontends.get_mut(k).unwrap().also_serving = backends(serving);
            }
            d
        };
        let clears = |s: &mut Syncer<Fake>| -> Vec<String> {
            let log = std::mem::take(&mut s.writer.log);
            log.into_iter().filter(|l| l.starts_with("clear_udp_flows")).collect()
        };
        let mut s = syncer();
        let r = s.apply(&state(&[(udp, &[1, 2], &[]), (key(1), &[1, 2], &[])]));
        assert_eq!((r.added, r.udp_flows_cleared), (2, 0));
        let id = s.programmed()[&udp].service_id;
        assert!(clears(&mut s).is_empty());
        // 2 terminating but serving: no new flows, its flows stay.
        s.apply(&state(&[(udp, &[1], &[2]), (key(1), &[1], &[])]));
        assert!(clears(&mut s).is_empty());
        // 2 gone; 1 ready -> still serving (a Local policy left it out),
        // 3 new: 2 is cleared, TCP's 2 is not.
        s.apply(&state(&[(udp, &[3], &[1]), (key(1), &[3], &[])]));
        assert_eq!(clears(&mut s), [format!("clear_udp_flows {id} 198.18.1.2")]);
        // 1 stops serving with the backends unchanged (the names-only
        // path: nothing to write to the maps), TCP's 1 left as well.
        let r = s.apply(&state(&[(udp, &[3], &[]), (key(1), &[3], &[])]));
        assert_eq!(clears(&mut s), [format!("clear_udp_flows {id} 198.18.1.1")]);
        assert_eq!(r.udp_flows_cleared, 1);
        // Several at once, through the incremental path: one call.
        s.apply(&state(&[(udp, &[3, 4, 5], &[]), (key(1), &[3], &[])]));
        clears(&mut s);
        let changed: BTreeSet<ServiceKey> = [udp].into();
        s.apply_changed(&state(&[(udp, &[5], &[]), (key(1), &[3], &[])]), &changed);
        assert_eq!(
            clears(&mut s),
            [format!("clear_udp_flows {id} 198.18.1.3, {id} 198.18.1.4")]
        );
    }

    /// Maps this process created start with zeroed counters: first-time
    /// ids skip the reset, recycled ones do not.
    #[test]
    fn fresh_maps_reset_the_counters_of_recycled_ids_only() {
        let mut s = syncer().with_fresh_maps();
        s.apply(&desired(&[(key(1), &[1]), (key(2), &[1])]));
        assert!(
            !s.writer().log.iter().any(|l| l.starts_with("reset")),
            "{:?}",
            s.writer().log
        );
        s.apply(&desired(&[(key(1), &[1])]));
        s.writer.log.clear();
        s.apply(&desired(&[(key(1), &[1]), (key(3), &[1])]));
        assert!(
            s.writer().log.contains(&"reset_service_stats 1".to_string()),
            "id 1 was used by key 2: {:?}",
            s.writer().log
        );
        let mut unknown = syncer();
        unknown.apply(&desired(&[(key(1), &[1])]));
        assert!(unknown.writer().log.contains(&"reset_service_stats 0".to_string()));
    }

    /// Above `PARALLEL_TABLES_MIN` frontends the Maglev tables are computed
    /// on several threads: every chunk written is still the table of its
    /// own frontend's backends, and the same as a one-by-one apply writes.
    #[test]
    fn tables_computed_in_parallel_are_each_frontends_own() {
        let n = 3 * PARALLEL_TABLES_MIN as u8;
        let entries: Vec<(ServiceKey, Vec<u8>)> = (1..=n).map(|i| (key(i), vec![i, i.wrapping_add(7), 200])).collect();
        let refs: Vec<(ServiceKey, &[u8])> = entries.iter().map(|(k, b)| (*k, b.as_slice())).collect();
        let mut s = syncer();
        assert_eq!(s.apply(&desired(&refs)).added, n as usize);
        // One new frontend per apply: one table each, on this thread.
        let mut one_by_one = syncer();
        for i in 1..=refs.len() {
            assert_eq!(one_by_one.apply(&desired(&refs[..i])).added, 1);
        }
        assert_eq!(s.writer().maglev, one_by_one.writer().maglev);
        for (k, b) in &refs {
            let id = s.programmed()[k].service_id;
            let table = maglev::table(&backends(b), 251);
            let chunk0 = &s.writer().maglev[&MaglevKey::new(id, 0, 0)];
            assert_eq!(&chunk0.entries[..table.len()], &table[..], "{k:?}");
        }
    }

    #[test]
    fn new_service_writes_slots_before_the_service_entry() {
        let mut s = syncer();
        let r = s.apply(&desired(&[(key(1), &[1, 2])]));
        assert_eq!(r.added, 1);
        assert_eq!(
            s.writer().log,
            [
                "reset_service_stats 0",
                "put_backend 0 0",
                "put_backend 0 1",
                "put_maglev 0 0",
                "put_service 0 gen 0 count 2"
            ]
        );
        assert_eq!(s.writer().visible(&key(1)), backends(&[1, 2]));
    }

    #[test]
    fn backend_change_flips_generation_then_deletes_old_slots() {
        let mut s = syncer();
        s.apply(&desired(&[(key(1), &[1, 2])]));
        let before = s.writer().log.len();
        let r = s.apply(&desired(&[(key(1), &[2, 3, 4])]));
        assert_eq!((r.updated, r.added, r.removed), (1, 0, 0));
        let slot1 = limits::MAX_BACKENDS_PER_SERVICE;
        let chunk1 = limits::MAGLEV_MAX_CHUNKS;
        assert_eq!(
            s.writer().log[before..],
            [
                format!("put_backend 0 {slot1}"),
                format!("put_backend 0 {}", slot1 + 1),
                format!("put_backend 0 {}", slot1 + 2),
                format!("put_maglev 0 {chunk1}"),
                "put_service 0 gen 1 count 3".to_string(),
                "delete_backend 0 0".to_string(),
                "delete_backend 0 1".to_string(),
                "delete_maglev 0 0".to_string(),
            ]
        );
        assert_eq!(s.writer().visible(&key(1)), backends(&[2, 3, 4]));
        assert_eq!(s.writer().backends.len(), 3, "old generation left behind");
        assert_eq!(s.writer().maglev.len(), 1, "old generation left behind");
    }

    #[test]
    fn unchanged_state_writes_nothing() {
        let mut s = syncer();
        s.apply(&desired(&[(key(1), &[1]), (key(2), &[2])]));
        let before = s.writer().log.len();
        let r = s.apply(&desired(&[(key(1), &[1]), (key(2), &[2])]));
        assert_eq!(r.unchanged, 2);
        assert_eq!(s.writer().log.len(), before);
    }

    #[test]
    fn removal_deletes_service_before_slots_and_reuses_the_id() {
        let mut s = syncer();
        s.apply(&desired(&[(key(1), &[1]), (key(2), &[2])]));
        let before = s.writer().log.len();
        let r = s.apply(&desired(&[(key(2), &[2])]));
        assert_eq!(r.removed, 1);
        assert_eq!(
            s.writer().log[before..],
            [
                "delete_service",
                "delete_backend 0 0",
                "delete_maglev 0 0",
                "prune_affinity 0 keep 0"
            ]
        );
        assert!(!s.writer().services.contains_key(&key(1)));
        s.apply(&desired(&[(key(2), &[2]), (key(3), &[3])]));
        assert_eq!(s.programmed()[&key(3)].service_id, 0, "freed id reused");
    }

    #[test]
    fn failed_backend_write_keeps_previous_backends() {
        let mut s = syncer();
        s.apply(&desired(&[(key(1), &[1, 2])]));
        s.writer.fail_backend_writes = true;
        let r = s.apply(&desired(&[(key(1), &[3])]));
        assert_eq!(r.errors.len(), 1);
        assert!(r.errors[0].to_string().contains("shop/web"), "{}", r.errors[0]);
        assert!(r.errors[0].to_string().contains("198.19.0.1:80/tcp"), "{}", r.errors[0]);
        assert_eq!(s.writer().visible(&key(1)), backends(&[1, 2]));
        // Once writes work again, the next apply converges.
        s.writer.fail_backend_writes = false;
        let r = s.apply(&desired(&[(key(1), &[3])]));
        assert_eq!(r.updated, 1);
        assert_eq!(s.writer().visible(&key(1)), backends(&[3]));
    }

    #[test]
    fn names_are_written_renamed_and_deleted() {
        let mut s = syncer();
        s.apply(&desired(&[(key(1), &[1])]));
        assert_eq!(s.writer().names[&0], "shop/web:http");
        let mut d = desired(&[(key(1), &[1])]);
        d.frontends.get_mut(&key(1)).unwrap().port_name = "web".into();
        let r = s.apply(&d);
        assert_eq!((r.unchanged, r.updated), (1, 0));
        assert_eq!(s.writer().names[&0], "shop/web:web");
        s.apply(&desired(&[]));
        assert!(s.writer().names.is_empty());
    }

    #[test]
    fn random_selection_writes_no_maglev_table() {
        let mut s = Syncer::with_config(
            Fake::default(),
            SyncConfig {
                selection: Selection::Random,
                maglev_size: 251,
            },
        );
        s.apply(&desired(&[(key(1), &[1, 2])]));
        assert!(s.writer().maglev.is_empty());
        assert_eq!(s.writer().services[&key(1)].flags, SVC_F_RANDOM);
    }

    #[test]
    fn service_ids_are_bounded() {
        let mut s = syncer();
        s.max_services = 1;
        let r = s.apply(&desired(&[(key(1), &[1]), (key(2), &[2])]));
        assert_eq!(r.added, 1);
        assert_eq!(r.errors.len(), 1);
        assert!(r.errors[0].cause.contains("full"));
    }

    /// The incremental path (`desired::Incremental` + `Syncer::apply_changed`)
    /// against the full one (`compute_for_node` + `Syncer::apply`) over random
    /// sequences of Service and EndpointSlice adds, changes and deletes.
    mod incremental {
        use std::collections::{BTreeMap, HashMap, HashSet};
        use std::net::Ipv4Addr;

        use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
        use serde_json::json;

        use super::*;
        use crate::desired::{compute_for_node, object_key, Incremental, NodeInfo, Tracked};

        /// splitmix64: enough randomness for a reproducible test.
        struct Rng(u64);

        impl Rng {
            fn next(&mut self) -> u64 {
                self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = self.0;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            }
            fn below(&mut self, n: usize) -> usize {
                (self.next() % n as u64) as usize
            }
            fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
                &items[self.below(items.len())]
            }
        }

        const NAMESPACES: &[&str] = &["a", "b"];
        const SERVICES: &[&str] = &["s0", "s1", "s2", "s3", "s4"];

        fn random_service(rng: &mut Rng, ns: &str, name: &str) -> Service {
            // Few addresses and ports: Services often collide on a key.
            let ip = *rng.pick(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "None", "bogus"]);
            let ty = *rng.pick(&["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]);
            let mut ports = vec![];
            for _ in 0..1 + rng.below(2) {
                ports.push(json!({
                    "name": rng.pick(&["http", "dns", ""]),
                    "port": rng.pick(&[80, 53, 0]),
                    "protocol": rng.pick(&["TCP", "UDP"]),
                    "nodePort": rng.pick(&[30000, 30001, 5]),
                }));
            }
            let external: Vec<&str> = (0..rng.below(2))
                .map(|_| *rng.pick(&["10.0.0.1", "10.0.0.9"]))
                .collect();
            serde_json::from_value(json!({
                "metadata": {"namespace": ns, "name": name},
                "spec": {
                    "type": ty,
                    "clusterIP": ip,
                    "ports": ports,
                    "externalIPs": external,
                    "externalTrafficPolicy": rng.pick(&["Cluster", "Local"]),
                    "loadBalancerSourceRanges": if rng.below(2) == 0 { vec!["192.0.2.0/24"] } else { vec![] },
                },
                "status": {"loadBalancer": {"ingress": [{"ip": rng.pick(&["10.0.0.2", "10.0.0.8"])}]}},
            }))
            .unwrap()
        }

        fn random_slice(rng: &mut Rng, ns: &str, name: &str) -> EndpointSlice {
            let mut labels = serde_json::Map::new();
            if rng.below(8) != 0 {
                labels.insert("kubernetes.io/service-name".into(), json!(rng.pick(SERVICES)));
            }
            let endpoints: Vec<_> = (0..rng.below(4))
                .map(|_| {
                    json!({
                        "addresses": [rng.pick(&["192.168.0.1", "192.168.0.2", "192.168.0.3", "nope"])],
                        "conditions": {"ready": rng.below(3) != 0, "serving": true, "terminating": rng.below(2) == 0},
                        "nodeName": rng.pick(&["n1", "n2"]),
                    })
                })
                .collect();
            serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "labels": labels},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": rng.pick(&["http", "dns", "other"]), "port": rng.pick(&[8080, 5353]), "protocol": rng.pick(&["TCP", "UDP"])}],
        }))
        .unwrap()
        }

        fn syncer() -> Syncer<Fake> {
            Syncer::with_config(
                Fake::default(),
                SyncConfig {
                    selection: Selection::Maglev,
                    maglev_size: 251,
                },
            )
        }

        #[test]
        fn incremental_path_equals_full_path() {
            let node = NodeInfo {
                name: Some("n1".into()),
                addresses: vec![Ipv4Addr::new(198, 18, 0, 1).into(), Ipv4Addr::new(198, 18, 0, 2).into()],
                ..NodeInfo::default()
            };
            // The sequences must exercise what they are meant to.
            let (mut conflicts, mut frontends) = (0, 0);
            for seed in 0..40u64 {
                let mut rng = Rng(seed);
                let mut services: BTreeMap<String, Service> = BTreeMap::new();
                let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
                let mut incremental = Incremental::new(node.clone());
                let (mut full_sync, mut incr_sync) = (syncer(), syncer());
                let (mut changed_services, mut changed_slices) = (HashSet::new(), HashSet::new());
                for step in 0..150 {
                    // One to three changes per sync, as a debounce folds them.
                    for _ in 0..1 + rng.below(3) {
                        let ns = *rng.pick(NAMESPACES);
                        if rng.below(2) == 0 {
                            let name = *rng.pick(SERVICES);
                            let key = format!("{ns}/{name}");
                            if rng.below(4) == 0 {
                                services.remove(&key);
                            } else {
                                services.insert(key.clone(), random_service(&mut rng, ns, name));
                            }
                            changed_services.insert(key);
                        } else {
                            let name = format!("e{}", rng.below(8));
                            let key = format!("{ns}/{name}");
                            if rng.below(4) == 0 {
                                slices.remove(&key);
                            } else {
                                slices.insert(key.clone(), random_slice(&mut rng, ns, &name));
                            }
                            changed_slices.insert(key);
                        }
                    }
                    // Store order is arbitrary: use a shuffled one.
                    let mut svc_list: Vec<Service> = services.values().cloned().collect();
                    let mut slice_list: Vec<EndpointSlice> = slices.values().cloned().collect();
                    let n = svc_list.len();
                    if n > 1 {
                        svc_list.swap(rng.below(n), rng.below(n));
                    }
                    let n = slice_list.len();
                    if n > 1 {
                        slice_list.swap(rng.below(n), rng.below(n));
                    }
                    let service_index: HashMap<String, usize> = svc_list
                        .iter()
                        .enumerate()
                        .map(|(i, s)| (object_key(&s.metadata), i))
                        .collect();
                    let slice_index: HashMap<String, usize> = slice_list
                        .iter()
                        .enumerate()
                        .map(|(i, s)| (object_key(&s.metadata), i))
                        .collect();
                    let tracked = Tracked {
                        service_index: &service_index,
                        slice_index: &slice_index,
                        // The first sync (and now and then a relist) sees everything.
                        changed: (step != 0 && step % 50 != 0).then_some((&changed_services, &changed_slices)),
                    };

                    let full = compute_for_node(&svc_list, &slice_list, &node);
                    full_sync.apply(&full);
                    let report = match incremental.update(&svc_list, &slice_list, &tracked) {
                        Some(keys) => incr_sync.apply_changed(incremental.desired(), &keys),
                        None => incr_sync.apply(incremental.desired()),
                    };
                    assert!(report.errors.is_empty(), "{:?}", report.errors);
                    changed_services.clear();
                    changed_slices.clear();

                    conflicts += full
                        .problems
                        .iter()
                        .filter(|p| p.reason.contains("already used"))
                        .count();
                    frontends += full.frontends.len();
                    let ctx = format!("seed {seed} step {step}");
                    assert_eq!(incremental.desired(), &full, "{ctx}");
                    assert_eq!(incr_sync.programmed(), full_sync.programmed(), "{ctx}");
                    let (a, b) = (incr_sync.writer(), full_sync.writer());
                    assert_eq!(a.services, b.services, "{ctx}");
                    assert_eq!(a.backends, b.backends, "{ctx}");
                    assert_eq!(
                        a.maglev.keys().collect::<Vec<_>>(),
                        b.maglev.keys().collect::<Vec<_>>(),
                        "{ctx}"
                    );
                    assert_eq!(a.names, b.names, "{ctx}");
                }
            }
            assert!(
                conflicts > 100 && frontends > 1000,
                "{conflicts} conflicts, {frontends} frontends"
            );
        }
    }
}
