//! The real BPF maps as the reconciler's [`MapWriter`].

use dataplane_common::{AffinityKey, CtKey, CtValue, FrontendBucket, FrontendWay, CT_F_REPLY};

use super::*;
use crate::bpf::sys::SysError;

/// Deletes the entries of hash map `map` (named `name` in errors) that
/// `doomed` picks: read in batches (see `batch::for_each_entry`), deleted
/// one by one. Returns how many it deleted; entries gone meanwhile
/// (evicted by an LRU, say) are fine and not counted.
fn delete_where<K, V>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    name: &'static str,
    mut doomed: impl FnMut(&K, &V) -> bool,
) -> Result<usize, WriteError>
where
    K: aya::Pod + bytemuck::Zeroable,
    V: aya::Pod + bytemuck::Zeroable,
{
    use aya::maps::IterableMap;
    use std::os::fd::AsFd;
    let mut gone = Vec::new();
    crate::bpf::batch::for_each_entry(map.map().fd().as_fd(), |k: &K, v: &V| {
        if doomed(k, v) {
            gone.push(*k);
        }
    })
    .map_err(sys_err(name))?;
    Ok(gone.into_iter().filter(|k| map.remove(k).is_ok()).count())
}

impl crate::bpf::loader::Maps {
    /// Sets the backend filter's entry (`BackendFilter`) of every address
    /// that is a backend in the maps: the sources of conntrack's reply
    /// entries, the backend slots and the affinity entries' backends. The
    /// programs set the entry of each flow they create, but flows made by
    /// programs without the filter (an upgrade from a release before it)
    /// have none, nor do the flows the old programs still create until
    /// their links are swapped (to backends in the slots: this agent has
    /// not synced yet). Entries already set stay. The value is written
    /// whole and only when entries were missing: an entry a running
    /// program set between the read and that write would be lost (the
    /// programs of a release with the filter have set them all already).
    /// Returns how many entries it set.
    pub fn fill_backend_filter(&mut self) -> Result<usize, WriteError> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        let name = map_names::BACKEND_FILTER;
        let mut filter = self.backend_filter.get(&0, 0).map_err(map_err(name))?;
        let before = filter.count();
        crate::bpf::batch::for_each_entry(self.conntrack.map().fd().as_fd(), |k: &CtKey, v: &CtValue| {
            if v.flags & CT_F_REPLY != 0 {
                filter.set(&k.saddr);
            }
        })
        .map_err(sys_err(map_names::CONNTRACK))?;
        crate::bpf::batch::for_each_entry(self.backends.map().fd().as_fd(), |_: &BackendKey, b: &Backend| {
            filter.set(&b.addr)
        })
        .map_err(sys_err(map_names::BACKENDS))?;
        crate::bpf::batch::for_each_entry(
            self.affinity.map().fd().as_fd(),
            |_: &AffinityKey, v: &AffinityValue| filter.set(&v.backend.addr),
        )
        .map_err(sys_err(map_names::AFFINITY))?;
        let set = filter.count() - before;
        if set != 0 {
            self.backend_filter.set(0, filter, 0).map_err(map_err(name))?;
        }
        Ok(set)
    }
}

/// Below this many Maglev chunks, [`MapWriter::put_new_slots`] writes
/// them on the calling thread (a thread costs more than it saves).
const PARALLEL_CHUNKS_MIN: usize = 256;
impl crate::bpf::loader::Maps {
    /// Makes the frontend cache's entry of `key` say `id` (`None`: not
    /// cached; see `FrontendBucket`). A full bucket leaves `key` uncached:
    /// its packets take the service map. The bucket is written only when
    /// it changes, and a way only ever goes from empty to a frontend or
    /// back (never from one frontend or id straight to another).
    fn cache_frontend(&mut self, key: &ServiceKey, id: Option<u32>) -> Result<(), WriteError> {
        let name = map_names::FRONTEND_CACHE;
        let index = dataplane_common::frontend_bucket(key);
        let mut bucket = self.frontend_cache.get(&index, 0).map_err(map_err(name))?;
        let before = bucket;
        let held = bucket.ways.iter().position(|w| w.key == *key);
        match (held, id) {
            (Some(i), Some(id)) if bucket.ways[i].service_id == id => {}
            (Some(i), Some(id)) => {
                // Another id under the same key: empty first, so that a
                // program never reads the new id with the old check.
                bucket.ways[i] = FrontendWay::default();
                self.frontend_cache.set(index, bucket, 0).map_err(map_err(name))?;
                bucket.ways[i] = FrontendWay::new(*key, id);
            }
            (Some(i), None) => bucket.ways[i] = FrontendWay::default(),
            (None, Some(id)) => {
                if let Some(w) = bucket.ways.iter_mut().find(|w| w.key.family == 0) {
                    *w = FrontendWay::new(*key, id);
                }
            }
            (None, None) => {}
        }
        if bucket != before {
            self.frontend_cache.set(index, bucket, 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Caches the cacheable ones of `keys` with the ids of `values`, all
    /// just written to the service map (new frontends written in bulk):
    /// each bucket they fall in read once, the changed buckets written in
    /// one batch call. A key the cache holds under another id goes through
    /// [`Maps::cache_frontend`], which empties its way first.
    fn cache_frontends(&mut self, keys: &[ServiceKey], values: &[ServiceValue]) -> Result<(), WriteError> {
        use aya::maps::IterableMap;
        use std::{collections::btree_map::Entry, os::fd::AsFd};
        let name = map_names::FRONTEND_CACHE;
        let mut buckets: std::collections::BTreeMap<u32, (FrontendBucket, FrontendBucket)> = Default::default();
        let mut moved = Vec::new();
        for (k, v) in keys.iter().zip(values).filter(|(k, v)| cacheable(k, v)) {
            let index = dataplane_common::frontend_bucket(k);
            let (_, bucket) = match buckets.entry(index) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let read = self.frontend_cache.get(&index, 0).map_err(map_err(name))?;
                    e.insert((read, read))
                }
            };
            match bucket.ways.iter().position(|w| w.key == *k) {
                Some(i) if bucket.ways[i].service_id == v.service_id => {}
                Some(_) => moved.push((*k, v.service_id)),
                None => {
                    if let Some(w) = bucket.ways.iter_mut().find(|w| w.key.family == 0) {
                        *w = FrontendWay::new(*k, v.service_id);
                    }
                }
            }
        }
        let (indexes, changed): (Vec<u32>, Vec<FrontendBucket>) = buckets
            .into_iter()
            .filter(|(_, (read, now))| read != now)
            .map(|(i, (_, now))| (i, now))
            .unzip();
        if !indexes.is_empty() {
            let fd = self.frontend_cache.map().fd().as_fd();
            crate::bpf::batch::update(fd, &indexes, &changed).map_err(sys_err(name))?;
        }
        for (k, id) in moved {
            self.cache_frontend(&k, Some(id))?;
        }
        Ok(())
    }

    /// Rebuilds the frontend cache from `services` (the service map's
    /// entries, as adoption read them), whole: after an adoption the cache
    /// may be missing (a release without it) or stale (a rollback to such
    /// a release, whose agent changed Services without keeping it). Called
    /// before the new programs are attached. Returns how many frontends it
    /// cached.
    pub fn fill_frontend_cache(&mut self, services: &[(ServiceKey, ServiceValue)]) -> Result<usize, WriteError> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        let mut cache = vec![FrontendBucket::default(); dataplane_common::FRONTEND_CACHE_BUCKETS as usize];
        let mut cached = 0;
        for (k, v) in services.iter().filter(|(k, v)| cacheable(k, v)) {
            let bucket = &mut cache[dataplane_common::frontend_bucket(k) as usize];
            if let Some(w) = bucket.ways.iter_mut().find(|w| w.key.family == 0) {
                *w = FrontendWay::new(*k, v.service_id);
                cached += 1;
            }
        }
        let keys: Vec<u32> = (0..dataplane_common::FRONTEND_CACHE_BUCKETS).collect();
        let fd = self.frontend_cache.map().fd().as_fd();
        crate::bpf::batch::update(fd, &keys, &cache).map_err(sys_err(map_names::FRONTEND_CACHE))?;
        Ok(cached)
    }
}

/// Whether the frontend cache may hold `key` with `value`: not the
/// in-cluster view of a frontend, nor a frontend that has one (its packets
/// count under either id, depending on the source).
fn cacheable(key: &ServiceKey, value: &ServiceValue) -> bool {
    key.family & dataplane_common::KEY_IN_CLUSTER == 0 && value.flags & dataplane_common::SVC_F_IN_CLUSTER_VIEW == 0
}

/// The maps a cold start's batches are written to from other threads
/// (see `bulk.rs`), through descriptors of their own.
struct NewFrontends {
    names: std::os::fd::OwnedFd,
    backends: std::os::fd::OwnedFd,
    maglev: std::os::fd::OwnedFd,
    services: std::os::fd::OwnedFd,
}

impl NewFrontendWriter for NewFrontends {
    fn put_new(&self, s: &NewSlots) -> Result<(), WriteError> {
        use crate::bpf::batch::update;
        use std::os::fd::AsFd;
        let (ids, names): (Vec<u32>, Vec<ServiceName>) =
            s.names.iter().map(|(id, n)| (*id, ServiceName::new(n))).unzip();
        update(self.names.as_fd(), &ids, &names).map_err(sys_err(map_names::NAMES))?;
        update(self.backends.as_fd(), &s.backend_keys, &s.backends).map_err(sys_err(map_names::BACKENDS))?;
        update(self.maglev.as_fd(), &s.chunk_keys, &s.chunks).map_err(sys_err(map_names::MAGLEV))?;
        // Last: the entries that make the above reachable.
        update(self.services.as_fd(), &s.keys, &s.values).map_err(sys_err(map_names::SERVICES))
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> WriteError {
    move |source| WriteError::Map { map, source }
}

fn sys_err(map: &'static str) -> impl Fn(SysError) -> WriteError {
    move |source| WriteError::Sys { map, source }
}

/// The real maps.
impl MapWriter for crate::bpf::loader::Maps {
    fn put_backend(&mut self, key: BackendKey, value: Backend) -> Result<(), WriteError> {
        self.backends
            .insert(key, value, 0)
            .map_err(map_err(map_names::BACKENDS))
    }
    fn put_backends(&mut self, keys: &[BackendKey], values: &[Backend]) -> Result<(), WriteError> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        let fd = self.backends.map().fd().as_fd();
        crate::bpf::batch::update(fd, keys, values).map_err(sys_err(map_names::BACKENDS))
    }
    fn put_maglev_chunks(&mut self, keys: &[MaglevKey], values: &[MaglevChunk]) -> Result<(), WriteError> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        let fd = self.maglev.map().fd().as_fd();
        crate::bpf::batch::update(fd, keys, values).map_err(sys_err(map_names::MAGLEV))
    }
    fn delete_backend(&mut self, key: BackendKey) -> Result<(), WriteError> {
        self.backends.remove(&key).map_err(map_err(map_names::BACKENDS))
    }
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), WriteError> {
        // The frontend cache never says more than the service map: a
        // frontend is cached after its entry is written, and uncached
        // before an entry that must not be cached replaces it.
        if !cacheable(&key, &value) {
            self.cache_frontend(&key, None)?;
        }
        self.services
            .insert(key, value, 0)
            .map_err(map_err(map_names::SERVICES))?;
        if cacheable(&key, &value) {
            self.cache_frontend(&key, Some(value.service_id))?;
        }
        Ok(())
    }
    fn put_services(&mut self, keys: &[ServiceKey], values: &[ServiceValue]) -> Result<(), WriteError> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        let fd = self.services.map().fd().as_fd();
        crate::bpf::batch::update(fd, keys, values).map_err(sys_err(map_names::SERVICES))?;
        // As `put_service`: cached once their entries are written.
        self.cache_frontends(keys, values)
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), WriteError> {
        // Uncached first: from then on its packets ask the service map.
        self.cache_frontend(&key, None)?;
        self.services.remove(&key).map_err(map_err(map_names::SERVICES))
    }
    fn put_maglev(&mut self, key: MaglevKey, value: MaglevChunk) -> Result<(), WriteError> {
        self.maglev.insert(key, value, 0).map_err(map_err(map_names::MAGLEV))
    }
    fn delete_maglev(&mut self, key: MaglevKey) -> Result<(), WriteError> {
        self.maglev.remove(&key).map_err(map_err(map_names::MAGLEV))
    }
    fn put_name(&mut self, service_id: u32, name: &str) -> Result<(), WriteError> {
        self.names
            .insert(service_id, ServiceName::new(name), 0)
            .map_err(map_err(map_names::NAMES))
    }
    fn put_names(&mut self, names: &[(u32, String)]) -> Result<(), WriteError> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        let (ids, values): (Vec<u32>, Vec<ServiceName>) =
            names.iter().map(|(id, n)| (*id, ServiceName::new(n))).unzip();
        let fd = self.names.map().fd().as_fd();
        crate::bpf::batch::update(fd, &ids, &values).map_err(sys_err(map_names::NAMES))
    }
    fn put_new_slots(
        &mut self,
        names: &[(u32, String)],
        backend_keys: &[BackendKey],
        backends: &[Backend],
        chunk_keys: &[MaglevKey],
        chunks: &[MaglevChunk],
    ) -> Result<(), WriteError> {
        use crate::bpf::batch;
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        let (ids, values): (Vec<u32>, Vec<ServiceName>) =
            names.iter().map(|(id, n)| (*id, ServiceName::new(n))).unzip();
        let names_fd = self.names.map().fd().as_fd();
        let backends_fd = self.backends.map().fd().as_fd();
        let maglev_fd = self.maglev.map().fd().as_fd();
        let rest = || {
            batch::update(names_fd, &ids, &values).map_err(sys_err(map_names::NAMES))?;
            batch::update(backends_fd, backend_keys, backends).map_err(sys_err(map_names::BACKENDS))
        };
        let maglev = || batch::update(maglev_fd, chunk_keys, chunks).map_err(sys_err(map_names::MAGLEV));
        if chunk_keys.len() < PARALLEL_CHUNKS_MIN {
            return rest().and_then(|()| maglev());
        }
        // The largest part (2 KiB of chunks per frontend at the default
        // table size) on a second CPU.
        std::thread::scope(|scope| {
            let chunks = scope.spawn(maglev);
            let rest = rest();
            let chunks = chunks.join().expect("the Maglev chunk writer panicked");
            rest.and(chunks)
        })
    }
    fn delete_name(&mut self, service_id: u32) -> Result<(), WriteError> {
        self.names.remove(&service_id).map_err(map_err(map_names::NAMES))
    }
    fn new_frontend_writer(&self) -> Option<Box<dyn NewFrontendWriter>> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        // Without descriptors of its own (out of them), the sync's thread
        // writes the batches.
        let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().ok();
        Some(Box::new(NewFrontends {
            names: dup(self.names.map().fd().as_fd())?,
            backends: dup(self.backends.map().fd().as_fd())?,
            maglev: dup(self.maglev.map().fd().as_fd())?,
            services: dup(self.services.map().fd().as_fd())?,
        }))
    }
    fn cache_services(&mut self, keys: &[ServiceKey], values: &[ServiceValue]) -> Result<(), WriteError> {
        self.cache_frontends(keys, values)
    }
    fn put_source_range(&mut self, service_id: u32, addr: std::net::IpAddr, len: u8) -> Result<(), WriteError> {
        let key = aya::maps::lpm_trie::Key::new(
            32 + len as u32,
            SourceRangeKey::new(service_id, dataplane_common::addr_of(addr).0),
        );
        self.source_ranges
            .insert(&key, 1, 0)
            .map_err(map_err(map_names::SOURCE_RANGES))
    }
    fn delete_source_range(&mut self, service_id: u32, addr: std::net::IpAddr, len: u8) -> Result<(), WriteError> {
        let key = aya::maps::lpm_trie::Key::new(
            32 + len as u32,
            SourceRangeKey::new(service_id, dataplane_common::addr_of(addr).0),
        );
        self.source_ranges
            .remove(&key)
            .map_err(map_err(map_names::SOURCE_RANGES))
    }
    fn prune_affinity(&mut self, service_id: u32, keep: &[Backend]) -> Result<(), WriteError> {
        let stale = |id: u32, v: &AffinityValue| id == service_id && !keep.contains(&v.backend);
        delete_where(&mut self.affinity, map_names::AFFINITY, |k, v| stale(k.service_id, v))?;
        // The socket-level programs' affinity (per network namespace).
        delete_where(&mut self.sock_affinity, map_names::SOCK_AFFINITY, |k, v| {
            stale(k.service_id, v)
        })?;
        Ok(())
    }
    fn clear_udp_flows(&mut self, stale: &[(u32, Backend)]) -> Result<usize, WriteError> {
        let stale: std::collections::HashSet<(u32, dataplane_common::Addr, u16)> =
            stale.iter().map(|(id, b)| (*id, b.addr, b.port)).collect();
        let is_stale =
            |service_id: u32, addr: &dataplane_common::Addr, port: u16| stale.contains(&(service_id, *addr, port));
        // The original entries, which carry the endpoint as their
        // translation: the client's next datagram starts a new flow. The
        // reply entries stay: an answer already on its way from the old
        // endpoint still comes back from the frontend's address, and they
        // age out with the UDP timeout (or a new flow of the same tuple
        // takes them over).
        let flows = delete_where(&mut self.conntrack, map_names::CONNTRACK, |k, v| {
            k.proto == IPPROTO_UDP && v.flags & CT_F_ORIGINAL != 0 && is_stale(v.service_id, &v.nat_addr, v.nat_port)
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
    fn narrow_backend_filter(&mut self) -> Result<Narrowed, WriteError> {
        use aya::maps::IterableMap;
        use bytemuck::Zeroable;
        use dataplane_common::BackendFilter;
        use std::os::fd::AsFd;
        let name = map_names::BACKEND_FILTER;
        // Maps opened from their pins lack the flood guard's: without its
        // entries nothing may be cleared.
        let Some(ct_syn) = &self.ct_syn else {
            return Ok(Narrowed::default());
        };
        let config = self.config.get(&0, 0).map_err(map_err(map_names::CONFIG))?;
        // The programs read a coarse clock (a tick behind at most): an
        // entry counts as live a little longer here than there.
        const MARGIN_NS: u64 = 2_000_000_000;
        let now = crate::bpf::sys::monotonic_ns();
        // Read before the flows: a flow the programs create meanwhile is to
        // a backend in the slots, whose entry is kept (this thread is the
        // only writer of the slots).
        // Boxed: 128 KiB each.
        let mut backends = Box::new(BackendFilter::zeroed());
        crate::bpf::batch::for_each_entry(self.backends.map().fd().as_fd(), |_: &BackendKey, b: &Backend| {
            backends.set(&b.addr)
        })
        .map_err(sys_err(map_names::BACKENDS))?;
        for k in super::endpoints::keys(self)? {
            backends.set(&k.addr);
        }
        crate::bpf::batch::for_each_entry(
            self.affinity.map().fd().as_fd(),
            |_: &AffinityKey, v: &AffinityValue| backends.set(&v.backend.addr),
        )
        .map_err(sys_err(map_names::AFFINITY))?;
        // A reply entry the programs would still use: conntrack's within
        // its state's timeout, the flood guard's whatever their age (a
        // SYN-ACK finds them without one).
        let mut flows = Box::new(BackendFilter::zeroed());
        crate::bpf::batch::for_each_entry(self.conntrack.map().fd().as_fd(), |k: &CtKey, v: &CtValue| {
            let idle = now.saturating_sub(v.last_seen_ns);
            if v.flags & CT_F_REPLY != 0 && idle <= config.timeout_ns(k.proto, v.state()).saturating_add(MARGIN_NS) {
                flows.set(&k.saddr);
            }
        })
        .map_err(sys_err(map_names::CONNTRACK))?;
        crate::bpf::batch::for_each_entry(ct_syn.map().fd().as_fd(), |k: &CtKey, v: &CtValue| {
            if v.flags & CT_F_REPLY != 0 {
                flows.set(&k.saddr);
            }
        })
        .map_err(sys_err(map_names::CT_SYN))?;
        let current = Box::new(self.backend_filter.get(&0, 0).map_err(map_err(name))?);
        let mut next = Box::new(BackendFilter::zeroed());
        let mut n = Narrowed::default();
        for ((slot, &b), (&f, &c)) in next
            .bytes
            .iter_mut()
            .flatten()
            .zip(backends.bytes.iter().flatten())
            .zip(flows.bytes.iter().flatten().zip(current.bytes.iter().flatten()))
        {
            let keep = b != 0 || f != 0;
            *slot = keep as u8;
            n.set += keep as usize;
            n.held_by_flows += (keep && b == 0) as usize;
            n.cleared += (c != 0 && !keep) as usize;
        }
        if n.cleared != 0 {
            self.backend_filter.set(0, *next, 0).map_err(map_err(name))?;
        }
        Ok(n)
    }
    fn put_endpoints(&mut self, keys: &[dataplane_common::EndpointKey]) -> Result<(), WriteError> {
        super::endpoints::put(self, keys)
    }
    fn delete_endpoints(&mut self, keys: &[dataplane_common::EndpointKey]) -> Result<(), WriteError> {
        super::endpoints::delete(self, keys)
    }
    fn endpoint_keys(&mut self) -> Result<Vec<dataplane_common::EndpointKey>, WriteError> {
        super::endpoints::keys(self)
    }
    fn put_vip_filter(&mut self, filter: &VipFilter) -> Result<(), WriteError> {
        self.vip_filter
            .set(0, filter, 0)
            .map_err(map_err(map_names::VIP_FILTER))
    }
    fn put_frontend_filter(&mut self, filter: &dataplane_common::FrontendFilter) -> Result<(), WriteError> {
        self.frontend_filter
            .set(0, filter, 0)
            .map_err(map_err(map_names::FRONTEND_FILTER))
    }
    fn reset_service_stats(&mut self, service_id: u32) -> Result<(), WriteError> {
        // Read once: aya reads /sys/devices/system/cpu/possible per call.
        static CPUS: std::sync::OnceLock<Result<usize, String>> = std::sync::OnceLock::new();
        let cpus = CPUS
            .get_or_init(|| aya::util::nr_cpus().map_err(|(path, e)| format!("{path}: {e}")))
            .clone()
            .map_err(WriteError::Cpus)?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![ServiceStats::default(); cpus])
            .map_err(|e| WriteError::Cpus(e.to_string()))?;
        self.service_stats
            .set(service_id, zeros, 0)
            .map_err(map_err(map_names::SERVICE_STATS))
    }
}
