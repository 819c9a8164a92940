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

mod adopt;
mod bulk;
mod endpoints;
mod maps;
#[cfg(test)]
mod tests;

pub use adopt::AdoptReport;
pub use bulk::{NewFrontendWriter, NewSlots, MAX_BULK_THREADS};

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use dataplane_common::{
    limits, map_names, vip_filter_bit, AffinityValue, Backend, BackendKey, FrontendFilter, MaglevChunk, MaglevKey,
    ServiceKey, ServiceName, ServiceStats, ServiceValue, SourceRangeKey, VipFilter, CT_F_ORIGINAL, IPPROTO_UDP,
    SOCK_NAT_FORWARD, SVC_F_AFFINITY, SVC_F_DROP_NO_LOCAL, SVC_F_EXTERNAL, SVC_F_IN_CLUSTER_VIEW, SVC_F_NONE,
    SVC_F_OTHER_PORTS, SVC_F_RANDOM, SVC_F_SOURCE_RANGES, VIP_FILTER_WORDS,
};
use thiserror::Error;

use crate::model::{maglev, proto_name, Desired, Frontend};

/// Why a map write failed.
#[derive(Debug, Error)]
pub enum WriteError {
    /// A map operation through aya, on the map named.
    #[error("{map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// A raw bpf(2) command (batched reads and writes), on the map named.
    #[error("{map}: {source}")]
    Sys {
        map: &'static str,
        #[source]
        source: crate::bpf::sys::SysError,
    },
    /// The possible CPUs (the size of a per-CPU value) could not be read.
    #[error("reading the possible CPUs: {0}")]
    Cpus(String),
    /// A writer other than the BPF maps refused the write (the tests'
    /// recording writers inject failures this way).
    #[error("{0}")]
    Refused(String),
}

/// Where the sync writes. Implemented for the real BPF maps and, in tests,
/// for a recording fake.
pub trait MapWriter {
    fn put_backend(&mut self, key: BackendKey, value: Backend) -> Result<(), WriteError>;
    /// Several backend slots (one generation of a frontend); the real maps
    /// write them in one batch call.
    fn put_backends(&mut self, keys: &[BackendKey], values: &[Backend]) -> Result<(), WriteError> {
        keys.iter().zip(values).try_for_each(|(k, v)| self.put_backend(*k, *v))
    }
    fn delete_backend(&mut self, key: BackendKey) -> Result<(), WriteError>;
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), WriteError>;
    /// Several service entries (new frontends, see `bulk.rs`); one batch
    /// call for the real maps. On an error, those before the failing one
    /// may be written.
    fn put_services(&mut self, keys: &[ServiceKey], values: &[ServiceValue]) -> Result<(), WriteError> {
        keys.iter().zip(values).try_for_each(|(k, v)| self.put_service(*k, *v))
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), WriteError>;
    fn put_maglev(&mut self, key: MaglevKey, value: MaglevChunk) -> Result<(), WriteError>;
    /// A whole Maglev table (one generation); one batch call for the real
    /// maps.
    fn put_maglev_chunks(&mut self, keys: &[MaglevKey], values: &[MaglevChunk]) -> Result<(), WriteError> {
        keys.iter().zip(values).try_for_each(|(k, v)| self.put_maglev(*k, *v))
    }
    fn delete_maglev(&mut self, key: MaglevKey) -> Result<(), WriteError>;
    /// Deletes the session affinity entries of `service_id` whose backend is
    /// not in `keep` (all of them when `keep` is empty).
    fn prune_affinity(&mut self, service_id: u32, keep: &[Backend]) -> Result<(), WriteError>;
    /// Records `namespace/name:port` of `service_id` for inspection.
    fn put_name(&mut self, service_id: u32, name: &str) -> Result<(), WriteError>;
    /// Several names (new frontends); one batch call for the real maps.
    fn put_names(&mut self, names: &[(u32, String)]) -> Result<(), WriteError> {
        names.iter().try_for_each(|(id, n)| self.put_name(*id, n))
    }
    /// The names, backend slots and Maglev chunks of new frontends (see
    /// `bulk.rs`), in no particular order among themselves; the real maps
    /// write the chunks on a second thread meanwhile.
    fn put_new_slots(
        &mut self,
        names: &[(u32, String)],
        backend_keys: &[BackendKey],
        backends: &[Backend],
        chunk_keys: &[MaglevKey],
        chunks: &[MaglevChunk],
    ) -> Result<(), WriteError> {
        self.put_names(names)?;
        self.put_backends(backend_keys, backends)?;
        self.put_maglev_chunks(chunk_keys, chunks)
    }
    /// A writer of new frontends' batches that other threads use while
    /// this one is in use (a cold start's, see `bulk.rs`); `None`: the
    /// sync's own thread writes them (`put_new_slots`, `put_services`).
    fn new_frontend_writer(&self) -> Option<Box<dyn NewFrontendWriter>> {
        None
    }
    /// Caches frontends whose service entries a [`NewFrontendWriter`]
    /// wrote (writers without a frontend cache ignore it).
    fn cache_services(&mut self, _keys: &[ServiceKey], _values: &[ServiceValue]) -> Result<(), WriteError> {
        Ok(())
    }
    fn delete_name(&mut self, service_id: u32) -> Result<(), WriteError>;
    /// Allows sources in `addr/len` for `service_id` (loadBalancerSourceRanges).
    fn put_source_range(&mut self, service_id: u32, addr: std::net::IpAddr, len: u8) -> Result<(), WriteError>;
    fn delete_source_range(&mut self, service_id: u32, addr: std::net::IpAddr, len: u8) -> Result<(), WriteError>;
    /// Zeroes the per-service counters of a newly allocated id.
    fn reset_service_stats(&mut self, service_id: u32) -> Result<(), WriteError>;
    /// Replaces the ClusterIP filter (`VipFilter`). Writers without one
    /// (test doubles) ignore it.
    fn put_vip_filter(&mut self, _filter: &VipFilter) -> Result<(), WriteError> {
        Ok(())
    }
    /// Replaces the frontend filter (`FrontendFilter`). Writers without
    /// one ignore it.
    fn put_frontend_filter(&mut self, _filter: &FrontendFilter) -> Result<(), WriteError> {
        Ok(())
    }
    /// Deletes the UDP flows of each `(service_id, backend)` in `stale`
    /// (an endpoint that stopped serving): the original conntrack entries
    /// (the reply entries stay for answers already on their way), and the
    /// socket-level forward entries that send an unconnected socket's
    /// datagrams to it. Returns how many flows and socket entries it
    /// deleted.
    fn clear_udp_flows(&mut self, stale: &[(u32, Backend)]) -> Result<usize, WriteError>;
    /// Clears the backend filter's entries (`BackendFilter`) that no
    /// address needs any more: set only for addresses that are backends in
    /// the maps (slots, endpoints, affinity), or the backend of a flow
    /// whose reply entry is live in conntrack or the flood guard's table.
    /// The programs only ever set entries, so without this the filter
    /// fills with every address that was ever a backend (pods come and go)
    /// and stops sparing anyone the conntrack lookup. The default does
    /// nothing.
    fn narrow_backend_filter(&mut self) -> Result<Narrowed, WriteError> {
        Ok(Narrowed::default())
    }
    /// Adds `keys` to the endpoint set (`map_names::ENDPOINTS`), each
    /// address's backend filter entry set first (see `endpoints.rs`).
    /// Writers without one (test doubles) ignore it.
    fn put_endpoints(&mut self, _keys: &[dataplane_common::EndpointKey]) -> Result<(), WriteError> {
        Ok(())
    }
    /// Removes `keys` from the endpoint set (missing ones are fine).
    fn delete_endpoints(&mut self, _keys: &[dataplane_common::EndpointKey]) -> Result<(), WriteError> {
        Ok(())
    }
    /// The keys in the endpoint set.
    fn endpoint_keys(&mut self) -> Result<Vec<dataplane_common::EndpointKey>, WriteError> {
        Ok(Vec::new())
    }
}

/// The service flags that come from the desired state (the others come
/// from the sync's own configuration).
const FRONTEND_FLAGS: u32 =
    SVC_F_EXTERNAL | SVC_F_DROP_NO_LOCAL | SVC_F_SOURCE_RANGES | SVC_F_OTHER_PORTS | SVC_F_IN_CLUSTER_VIEW;

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
    /// The desired state's own (shared, not copied).
    pub frontend: Arc<Frontend>,
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

/// What [`MapWriter::narrow_backend_filter`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Narrowed {
    /// Entries cleared.
    pub cleared: usize,
    /// Entries set after it.
    pub set: usize,
    /// Of those, entries set only for live flows to addresses that are no
    /// backend in the maps any more (cleared by a later pass once the
    /// flows are over).
    pub held_by_flows: usize,
}

/// At most one narrowing of the backend filter per this (it reads the
/// whole conntrack map).
pub const FILTER_NARROW_SPACING: Duration = Duration::from_secs(60);
/// While live flows alone hold entries, the filter is narrowed again after
/// this.
pub const FILTER_NARROW_RECHECK: Duration = Duration::from_secs(300);

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
    /// The backends of `programmed`, summed (kept as it changes: the sum
    /// is logged at every sync).
    programmed_backends: usize,
    /// The Maglev chunks and source ranges of `programmed`, summed the
    /// same way (for the metrics' entry counts, see [`Syncer::entries`]).
    programmed_chunks: usize,
    programmed_ranges: usize,
    /// Source-range entries the agent wrote outside the sync (the
    /// cluster CIDRs), counted in [`Syncer::entries`].
    cluster_cidr_entries: usize,
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
    /// Backend slots were deleted (or live flows held filter entries at
    /// the last narrowing): the backend filter may hold entries no
    /// address needs.
    filter_stale: bool,
    /// When the backend filter is narrowed next (see
    /// [`MapWriter::narrow_backend_filter`]).
    filter_due: Option<Instant>,
    last_narrowed: Option<Instant>,
    /// Generations no service entry points at any more, deleted once
    /// [`RETIRE_GRACE`] has passed (see [`Syncer::reap_at`]).
    retired: Vec<Retired>,
    /// A ClusterIP's entry for other ports was added or removed (or the
    /// filter was never written): the filter is written again.
    markers_changed: bool,
    /// The frontend filter as last written (see
    /// [`Syncer::widen_frontend_filter`]; boxed: 128 KiB).
    frontend_filter: Box<FrontendFilter>,
    /// The map's copy may lack bits of `frontend_filter` (never written
    /// by this syncer, or its last write failed): the next apply writes it.
    frontend_filter_unsynced: bool,
    /// A frontend was removed since the filter was last narrowed: it may
    /// hold bits of addresses no frontend has any more.
    frontend_filter_wide: bool,
    /// The last `ServiceValue::epoch` written (they only grow, wrapping
    /// past 0).
    epoch: u32,
    /// The endpoint set's bookkeeping, while the agent keeps the set
    /// (see `endpoints.rs`).
    endpoints: Option<endpoints::Endpoints>,
}

/// How long the backend slots and Maglev chunks of a generation stay after
/// the service entry stopped pointing at them: a packet that read the old
/// entry just before the flip (or the removal) still finds them. A program
/// run lasts microseconds; the margin is for preempted runs.
pub const RETIRE_GRACE: Duration = Duration::from_secs(1);

/// One generation waiting for its deletion.
#[derive(Clone, Debug)]
struct Retired {
    id: u32,
    generation: u16,
    /// Backend indexes to delete.
    backends: std::ops::Range<usize>,
    /// Maglev positions to delete (chunk starts from `.start`).
    maglev: std::ops::Range<u32>,
    since: Instant,
}

/// Frontends whose tables are computed together, just before they are
/// written: bounds the memory the tables take (256 x 2 KiB at the default
/// size) while keeping every CPU busy.
const TABLE_BATCH: usize = 256;

/// Below this many tables to compute, one thread does them all.
const PARALLEL_TABLES_MIN: usize = 64;

/// Maglev tables for `work` (frontend, backends), computed on every CPU.
/// Maglev tables of `work`, each sized for its backends under the
/// configured `size` (`maglev::size_for`).
fn tables_in_parallel(work: &[(ServiceKey, &[Backend])], size: u32) -> Vec<(ServiceKey, Vec<u16>)> {
    let table = |b: &[Backend]| maglev::table(b, maglev::size_for(size, b.len()));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    if threads < 2 || work.len() < PARALLEL_TABLES_MIN {
        return work.iter().map(|(k, b)| (*k, table(b))).collect();
    }
    let per = work.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = work
            .chunks(per)
            .map(|part| scope.spawn(move || part.iter().map(|(k, b)| (*k, table(b))).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("maglev table thread panicked"))
            .collect()
    })
}

/// How the backends of `fe` are chosen under `config`: the selection's
/// service flags and the Maglev table size (0: none, for random selection
/// or no backends).
fn selection_of(config: &SyncConfig, fe: &Frontend) -> (u32, u32) {
    match config.selection {
        Selection::Random => (SVC_F_RANDOM, 0),
        Selection::Maglev if fe.backends.is_empty() => (SVC_F_NONE, 0),
        Selection::Maglev => (SVC_F_NONE, maglev::size_for(config.maglev_size, fe.backends.len())),
    }
}

/// Appends the chunks of `fe`'s Maglev table of `size` positions (none
/// when 0) for generation `generation` of service `id` to `keys` and
/// `chunks`; `table` when it was computed already. The one place both
/// the one-by-one and the batched path (`bulk.rs`) take the table from,
/// so that a cold start and every later sync build the same one.
fn push_table(
    fe: &Frontend,
    size: u32,
    id: u32,
    generation: u16,
    table: Option<Vec<u16>>,
    keys: &mut Vec<MaglevKey>,
    chunks: &mut Vec<MaglevChunk>,
) {
    if size == 0 {
        return;
    }
    let table = table.unwrap_or_else(|| maglev::table(&fe.backends, size));
    for (c, part) in table.chunks(limits::MAGLEV_CHUNK as usize).enumerate() {
        let mut chunk = MaglevChunk {
            entries: [0; limits::MAGLEV_CHUNK as usize],
        };
        chunk.entries[..part.len()].copy_from_slice(part);
        keys.push(MaglevKey::new(id, generation, c as u32 * limits::MAGLEV_CHUNK));
        chunks.push(chunk);
    }
}

/// The Maglev chunks a table of `size` positions takes.
fn maglev_chunks(size: u32) -> usize {
    size.div_ceil(limits::MAGLEV_CHUNK) as usize
}

/// A ClusterIP's entry for the ports its Service lacks.
fn is_other_ports(key: &ServiceKey) -> bool {
    (key.port, key.proto) == (0, 0)
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
            programmed_backends: 0,
            programmed_chunks: 0,
            programmed_ranges: 0,
            cluster_cidr_entries: 0,
            failed: BTreeSet::new(),
            free_ids: Vec::new(),
            next_id: 0,
            fresh_maps: false,
            max_services: limits::MAX_SERVICES,
            config,
            tables: BTreeMap::new(),
            stale_udp: Vec::new(),
            filter_stale: false,
            filter_due: None,
            last_narrowed: None,
            retired: Vec::new(),
            markers_changed: true,
            frontend_filter: bytemuck::zeroed_box(),
            frontend_filter_unsynced: true,
            frontend_filter_wide: false,
            epoch: 0,
            endpoints: None,
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

    /// The backends of all programmed frontends together.
    pub fn programmed_backends(&self) -> usize {
        self.programmed_backends
    }

    /// Records `p` as what the maps hold for `key`.
    fn set_programmed(&mut self, key: ServiceKey, p: Programmed) {
        self.count(&key, &p, true);
        if let Some(old) = self.programmed.insert(key, p) {
            self.count(&key, &old, false);
        }
    }

    /// Takes `key` out of `programmed`, keeping the sums.
    fn take_programmed(&mut self, key: &ServiceKey) -> Option<Programmed> {
        let p = self.programmed.remove(key)?;
        self.count(key, &p, false);
        Some(p)
    }

    /// Replaces `programmed` (adoption), recomputing the sums.
    fn set_all_programmed(&mut self, programmed: BTreeMap<ServiceKey, Programmed>) {
        (self.programmed_backends, self.programmed_chunks, self.programmed_ranges) = (0, 0, 0);
        for (k, p) in &programmed {
            self.count(k, p, true);
        }
        self.programmed = programmed;
    }

    /// Adds `p`'s entries (of frontend `key`) to the sums (`add`), or takes
    /// them out.
    fn count(&mut self, key: &ServiceKey, p: &Programmed, add: bool) {
        if let Some(e) = &mut self.endpoints {
            e.count(key, &p.frontend.backends, add);
        }
        let parts = [
            (&mut self.programmed_backends, p.frontend.backends.len()),
            (&mut self.programmed_chunks, maglev_chunks(p.maglev_size)),
            (&mut self.programmed_ranges, p.frontend.source_ranges.len()),
        ];
        for (sum, n) in parts {
            *sum = if add { *sum + n } else { *sum - n };
        }
    }

    /// The cluster CIDR entries the agent wrote into the source-range map.
    pub fn set_cluster_cidr_entries(&mut self, n: usize) {
        self.cluster_cidr_entries = n;
    }

    /// The entries this syncer has in the service, backend, Maglev, name
    /// and source-range maps (with the cluster CIDRs the agent told it
    /// of), from its own record: no map is read. Retired
    /// generations count until they are deleted.
    pub fn entries(&self) -> crate::state::ProgrammedEntries {
        let (backends, chunks) = self.retired.iter().fold((0, 0), |(b, c), r| {
            (
                b + r.backends.len(),
                c + maglev_chunks(r.maglev.end.saturating_sub(r.maglev.start)),
            )
        });
        let frontends = self.programmed.len() as u64;
        crate::state::ProgrammedEntries {
            services: frontends,
            backends: (self.programmed_backends + backends) as u64,
            maglev: (self.programmed_chunks + chunks) as u64,
            names: frontends,
            source_ranges: (self.programmed_ranges + self.cluster_cidr_entries) as u64,
            endpoints: self.endpoint_count() as u64,
        }
    }

    pub fn writer(&self) -> &W {
        &self.writer
    }

    /// The maps, for settings outside the desired state (cluster CIDRs).
    pub fn writer_mut(&mut self) -> &mut W {
        &mut self.writer
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
        selection_of(&self.config, fe).1
    }

    /// How the backends of `fe` (frontend `key`, service `id`) are chosen
    /// ([`selection_of`]), with the table's chunks for generation
    /// `generation` appended to `keys` and `chunks` ([`push_table`]; the
    /// table precomputed for `key` if there is one).
    fn selection(
        &mut self,
        key: &ServiceKey,
        id: u32,
        generation: u16,
        fe: &Frontend,
        keys: &mut Vec<MaglevKey>,
        chunks: &mut Vec<MaglevChunk>,
    ) -> (u32, u32) {
        let (flags, size) = selection_of(&self.config, fe);
        push_table(fe, size, id, generation, self.tables.remove(key), keys, chunks);
        (flags, size)
    }

    /// Writes one generation of `fe` (backend slots, Maglev table) and
    /// returns the service value that makes it current.
    fn write_generation(
        &mut self,
        key: &ServiceKey,
        id: u32,
        generation: u16,
        fe: &Frontend,
    ) -> Result<ServiceValue, WriteError> {
        let maglev_size = self.maglev_size_for(fe);
        self.reclaim(id, generation, fe.backends.len(), maglev_size);
        let keys: Vec<BackendKey> = (0..fe.backends.len())
            .map(|i| BackendKey::new(id, generation, i as u32))
            .collect();
        self.writer.put_backends(&keys, &fe.backends)?;
        let (mut keys, mut chunks) = (Vec::new(), Vec::new());
        let (flags, maglev_size) = self.selection(key, id, generation, fe, &mut keys, &mut chunks);
        if !keys.is_empty() {
            self.writer.put_maglev_chunks(&keys, &chunks)?;
        }
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
            epoch: self.next_epoch(),
        })
    }

    /// Deletes one generation's backend slots and Maglev chunks.
    fn delete_generation(&mut self, id: u32, generation: u16, backends: usize, maglev_size: u32) {
        self.delete_slots(id, generation, 0..backends, 0..maglev_size);
    }

    /// Deletes some backend slots and Maglev chunks of one generation.
    fn delete_slots(
        &mut self,
        id: u32,
        generation: u16,
        backends: std::ops::Range<usize>,
        maglev: std::ops::Range<u32>,
    ) {
        // Their addresses may be no backend any more.
        self.filter_stale |= !backends.is_empty();
        // Missing entries are already what we want.
        for i in backends {
            let _ = self.writer.delete_backend(BackendKey::new(id, generation, i as u32));
        }
        for pos in maglev.step_by(limits::MAGLEV_CHUNK as usize) {
            let _ = self.writer.delete_maglev(MaglevKey::new(id, generation, pos));
        }
    }

    /// A generation the service entry no longer points at: deleted once
    /// [`RETIRE_GRACE`] has passed, so that no packet still using it misses.
    fn retire(&mut self, id: u32, generation: u16, backends: usize, maglev_size: u32) {
        self.retired.push(Retired {
            id,
            generation: generation & 1,
            backends: 0..backends,
            maglev: 0..maglev_size,
            since: Instant::now(),
        });
    }

    /// `generation` of `id` is about to be written with `backends` slots and
    /// a table of `maglev_size`: a retired set there (the id's generation
    /// before last, or a removed frontend's whose id is reused) keeps only
    /// what the new one does not overwrite.
    fn reclaim(&mut self, id: u32, generation: u16, backends: usize, maglev_size: u32) {
        let chunks_end = maglev_size.div_ceil(limits::MAGLEV_CHUNK) * limits::MAGLEV_CHUNK;
        for r in self.retired.iter_mut() {
            if r.id == id && r.generation == generation & 1 {
                r.backends.start = r.backends.start.max(backends);
                r.maglev.start = r.maglev.start.max(chunks_end);
            }
        }
    }

    /// Writes the ClusterIP filter again when the ClusterIPs with an entry
    /// for other ports changed: a bit per such address.
    fn sync_vip_filter(&mut self, report: &mut SyncReport) {
        if !self.markers_changed {
            return;
        }
        let mut filter = VipFilter {
            bits: [0; VIP_FILTER_WORDS],
        };
        for key in self.programmed.keys().filter(|k| is_other_ports(k)) {
            let bit = vip_filter_bit(&key.addr) as usize;
            filter.bits[(bit >> 6) % VIP_FILTER_WORDS] |= 1 << (bit & 63);
        }
        match self.writer.put_vip_filter(&filter) {
            Ok(()) => self.markers_changed = false,
            Err(cause) => report.errors.push(SyncError {
                service: String::new(),
                frontend: "ClusterIP filter".into(),
                cause: format!("writing {}: {cause}; retried at the next sync", map_names::VIP_FILTER),
            }),
        }
    }

    /// Before an apply writes frontends: sets the bits of `keys`'
    /// addresses that the frontend filter lacks, and writes it. No frontend
    /// is ever in the service map while its address's bit is clear in the
    /// map's filter: the programs would pass its packets untranslated.
    fn widen_frontend_filter<'k>(&mut self, keys: impl IntoIterator<Item = &'k ServiceKey>, report: &mut SyncReport) {
        let mut changed = false;
        for key in keys {
            if !self.frontend_filter.has(&key.addr) {
                self.frontend_filter.set(&key.addr);
                changed = true;
            }
        }
        if changed || self.frontend_filter_unsynced {
            self.write_frontend_filter(report);
        }
    }

    /// After an apply that removed frontends: clears the bits of addresses
    /// no programmed frontend has any more (until then their packets only
    /// pay the service map's lookup).
    fn narrow_frontend_filter(&mut self, report: &mut SyncReport) {
        if !self.frontend_filter_wide {
            return;
        }
        let exact = self.exact_frontend_filter();
        if exact != self.frontend_filter {
            self.frontend_filter = exact;
            self.write_frontend_filter(report);
        }
        self.frontend_filter_wide = false;
    }

    /// The frontend filter of exactly the programmed frontends' addresses.
    fn exact_frontend_filter(&self) -> Box<FrontendFilter> {
        let mut filter: Box<FrontendFilter> = bytemuck::zeroed_box();
        for key in self.programmed.keys() {
            filter.set(&key.addr);
        }
        filter
    }

    fn write_frontend_filter(&mut self, report: &mut SyncReport) {
        match self.writer.put_frontend_filter(&self.frontend_filter) {
            Ok(()) => self.frontend_filter_unsynced = false,
            Err(cause) => {
                self.frontend_filter_unsynced = true;
                report.errors.push(SyncError {
                    service: String::new(),
                    frontend: "frontend filter".into(),
                    cause: format!(
                        "writing {}: {cause}; packets to the addresses of frontends added since its last write pass \
                         untranslated until it is written; retried at the next sync",
                        map_names::FRONTEND_FILTER
                    ),
                });
            }
        }
    }

    /// Writes the frontend filter of the programmed frontends (adopted
    /// from pinned maps), before the programs are attached: the pinned
    /// filter may be missing (a release without it: an empty map) or stale
    /// (a rollback to such a release changed Services). Returns the bits
    /// set.
    pub fn rewrite_frontend_filter(&mut self) -> Result<usize, WriteError> {
        let filter = self.exact_frontend_filter();
        self.writer.put_frontend_filter(&filter)?;
        self.frontend_filter = filter;
        self.frontend_filter_unsynced = false;
        self.frontend_filter_wide = false;
        Ok(self.frontend_filter.count())
    }

    /// The epoch of a backend set being written: never 0 (the value of
    /// entries written by earlier releases).
    fn next_epoch(&mut self) -> u32 {
        self.epoch = match self.epoch.wrapping_add(1) {
            0 => 1,
            e => e,
        };
        self.epoch
    }

    /// Deletes the retired generations older than [`RETIRE_GRACE`] at `now`.
    pub fn reap_at(&mut self, now: Instant) {
        self.reap_slots_at(now);
        if self.filter_due.is_some_and(|due| due <= now) {
            self.narrow_backend_filter_at(now);
        }
    }

    /// The slots part of [`Syncer::reap_at`]: deletes what is due and
    /// schedules the backend filter's narrowing, without running it.
    fn reap_slots_at(&mut self, now: Instant) {
        let (due, keep): (Vec<Retired>, Vec<Retired>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|r| now.saturating_duration_since(r.since) >= RETIRE_GRACE);
        self.retired = keep;
        for r in due {
            self.delete_slots(r.id, r.generation, r.backends, r.maglev);
        }
        // Backends left the maps: their filter entries go too, once no
        // live flow needs them, at most once per FILTER_NARROW_SPACING.
        if self.filter_stale && self.filter_due.is_none() {
            let earliest = self.last_narrowed.map_or(now, |t| t + FILTER_NARROW_SPACING);
            self.filter_due = Some(earliest.max(now));
        }
    }

    /// Narrows the backend filter (see [`MapWriter::narrow_backend_filter`])
    /// and schedules the next pass while live flows alone hold entries.
    fn narrow_backend_filter_at(&mut self, now: Instant) {
        self.filter_due = None;
        self.filter_stale = false;
        self.last_narrowed = Some(now);
        let started = Instant::now();
        match self.writer.narrow_backend_filter() {
            Ok(n) => {
                if n.cleared != 0 || n.held_by_flows != 0 {
                    tracing::info!(
                        cleared = n.cleared,
                        set = n.set,
                        held_by_flows = n.held_by_flows,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "backend filter narrowed: entries of addresses that are no backend and have no live flow cleared"
                    );
                }
                if n.held_by_flows != 0 {
                    self.filter_stale = true;
                    self.filter_due = Some(now + FILTER_NARROW_RECHECK);
                }
            }
            Err(cause) => {
                tracing::warn!(%cause, "narrowing the backend filter failed; retried later");
                self.filter_stale = true;
                self.filter_due = Some(now + FILTER_NARROW_RECHECK);
            }
        }
    }

    /// [`Syncer::reap_at`] now.
    pub fn reap(&mut self) {
        self.reap_at(Instant::now());
    }

    /// When the oldest retired generation is due, if any.
    pub fn next_reap(&self) -> Option<Instant> {
        self.retired
            .iter()
            .map(|r| r.since + RETIRE_GRACE)
            .chain(self.filter_due)
            .min()
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
        // Not the filter's narrowing: a sync is not delayed by it (the
        // loop's reap timer runs it).
        self.reap_slots_at(Instant::now());
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
        // The removed UDP frontends' flows, before their ids are reused.
        self.clear_stale_udp(&mut report);
        self.widen_frontend_filter(desired.frontends.keys(), &mut report);
        // A cold start (nothing programmed in maps this process created):
        // the new frontends in batches on every CPU, then what is left one
        // by one.
        if self.programmed.is_empty() && self.bulk_ok() {
            let rest = self.add_new_in_bulk(desired.frontends.iter(), true, &mut report);
            for batch in rest.chunks(TABLE_BATCH) {
                self.precompute_tables(desired, batch.iter().map(|(k, _)| *k));
                for (key, fe) in batch {
                    self.tracked(**key, &mut report, &mut failed, |s, r| s.upsert_one(key, fe, r));
                }
            }
        } else {
            // A batch at a time, not a list of every frontend (200,000 at
            // 100,000 Services, held at the first sync's peak).
            let mut entries = desired.frontends.iter();
            let mut batch: Vec<(&ServiceKey, &Arc<Frontend>)> = Vec::with_capacity(TABLE_BATCH);
            loop {
                batch.clear();
                batch.extend(entries.by_ref().take(TABLE_BATCH));
                if batch.is_empty() {
                    break;
                }
                self.precompute_tables(desired, batch.iter().map(|(k, _)| *k));
                // New frontends in a few batched writes; the rest one by one.
                let rest = self.add_new_in_bulk(batch.iter().copied(), false, &mut report);
                for (key, fe) in &rest {
                    self.tracked(**key, &mut report, &mut failed, |s, r| s.upsert_one(key, fe, r));
                }
            }
        }
        self.tables.clear();
        self.failed = failed;
        self.clear_stale_udp(&mut report);
        self.sync_vip_filter(&mut report);
        self.narrow_frontend_filter(&mut report);
        self.sync_endpoints(&mut report);
        report
    }

    /// As [`Syncer::apply`], when only the frontends under `changed` can
    /// differ from the state last applied (plus those whose writes failed
    /// then, which are retried): the same writes in the same order, without
    /// visiting the others.
    pub fn apply_changed(&mut self, desired: &Desired, changed: &BTreeSet<ServiceKey>) -> SyncReport {
        // Not the filter's narrowing: a sync is not delayed by it (the
        // loop's reap timer runs it).
        self.reap_slots_at(Instant::now());
        let mut report = SyncReport::default();
        let mut failed = BTreeSet::new();
        let keys: BTreeSet<ServiceKey> = changed.union(&self.failed).copied().collect();
        for key in &keys {
            if self.programmed.contains_key(key) && !desired.frontends.contains_key(key) {
                self.tracked(*key, &mut report, &mut failed, |s, r| s.remove_one(*key, r));
            }
        }
        // The removed UDP frontends' flows, before their ids are reused.
        self.clear_stale_udp(&mut report);
        let upserts: Vec<(&ServiceKey, &Arc<Frontend>)> = keys
            .iter()
            .filter_map(|k| Some((k, desired.frontends.get(k)?)))
            .collect();
        self.widen_frontend_filter(upserts.iter().map(|(k, _)| *k), &mut report);
        for batch in upserts.chunks(TABLE_BATCH) {
            self.precompute_tables(desired, batch.iter().map(|(k, _)| *k));
            // New frontends in a few batched writes (a cold start's).
            let batch = self.add_new_in_bulk(batch.iter().copied(), false, &mut report);
            for (key, fe) in &batch {
                self.tracked(**key, &mut report, &mut failed, |s, r| s.upsert_one(key, fe, r));
            }
        }
        self.tables.clear();
        self.failed = failed;
        self.clear_stale_udp(&mut report);
        self.sync_vip_filter(&mut report);
        self.narrow_frontend_filter(&mut report);
        self.sync_endpoints(&mut report);
        report
    }

    /// Deletes the UDP flows to the endpoints that stopped serving in this
    /// apply, and those of the UDP frontends it removed, in one pass over
    /// the maps. The frontends' new state is already written, so a datagram
    /// that finds no flow any more starts a new one to a serving endpoint
    /// (or, its frontend gone, is no Service's).
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
                            "clearing the UDP flows to endpoints that stopped serving (or of a removed frontend): {cause}; retried at the next sync"
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
        let p = self.take_programmed(&key).expect("key from programmed");
        if let Err(cause) = self.writer.delete_service(key) {
            report.errors.push(SyncError {
                service: p.frontend.service.clone(),
                frontend: describe(&key),
                cause: format!("deleting the service entry: {cause}"),
            });
            self.set_programmed(key, p);
            return;
        }
        self.retire(p.service_id, p.generation, p.frontend.backends.len(), p.maglev_size);
        self.markers_changed |= is_other_ports(&key);
        self.frontend_filter_wide = true;
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
        // A UDP frontend's flows go with it, as kube-proxy clears every UDP
        // conntrack entry of a frontend that does not lead to a serving
        // endpoint: otherwise, should the same address and port become a
        // frontend again before they time out (the Service deleted and
        // created again, its ClusterIP or NodePort given to another), a
        // client's next datagram would follow the old endpoint (conntrack
        // is asked before the frontend's endpoints). Cleared before any
        // frontend of this apply takes the id again.
        if key.proto == IPPROTO_UDP {
            let backends: Vec<Backend> = p
                .frontend
                .backends
                .iter()
                .chain(&p.frontend.also_serving)
                .copied()
                .collect();
            if !backends.is_empty() {
                self.stale_udp.push(StaleUdp {
                    key,
                    service: p.frontend.service.clone(),
                    service_id: p.service_id,
                    backends,
                });
            }
        }
        self.free_ids.push(p.service_id);
        report.removed += 1;
    }

    /// Adds or updates the frontend `key` (see the module doc for the order).
    fn upsert_one(&mut self, key: &ServiceKey, fe: &Arc<Frontend>, report: &mut SyncReport) {
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
        fe: &Arc<Frontend>,
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
                self.set_programmed(
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
                        self.delete_generation(p.service_id, generation, fe.backends.len(), maglev_size);
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
                self.retire(p.service_id, p.generation, p.frontend.backends.len(), p.maglev_size);
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
                self.set_programmed(
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
                        self.set_programmed(
                            *key,
                            Programmed {
                                service_id: id,
                                generation: 0,
                                maglev_size: v.maglev_size,
                                frontend: fe.clone(),
                            },
                        );
                        self.markers_changed |= is_other_ports(key);
                        report.added += 1;
                    }
                    Err(cause) => {
                        self.delete_generation(id, 0, fe.backends.len(), maglev_size);
                        self.free_ids.push(id);
                        report.errors.push(err(format!("{cause}; not programmed")));
                    }
                }
            }
        }
    }
}
