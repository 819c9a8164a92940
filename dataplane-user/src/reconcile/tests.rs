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
    /// The ClusterIP filter last written, and how many writes (not in
    /// `log`).
    vip_filter: Option<Box<VipFilter>>,
    vip_filter_writes: usize,
    /// The frontend filter last written, and how many writes (not in
    /// `log`). Every service entry is checked against it as it is
    /// written: its address's bit must be set already.
    frontend_filter: Option<Box<FrontendFilter>>,
    frontend_filter_writes: usize,
    /// Set: batches of new frontends are written from other threads
    /// (`new_frontend_writer`) into these maps; [`Fake::merge`] takes
    /// them in.
    shared: Option<Arc<std::sync::Mutex<Fake>>>,
    /// Frontends `cache_services` was told of, in order.
    cached: Vec<ServiceKey>,
    /// What `narrow_backend_filter` says live flows alone still hold.
    held_by_flows: usize,
}

/// The writer other threads get from a [`Fake`] with `shared` maps. Each
/// step takes the lock on its own, so that the batches of several threads
/// interleave; the service entries of a batch check, as they are written,
/// that every slot and chunk they point at is there.
struct SharedWriter(Arc<std::sync::Mutex<Fake>>);

impl NewFrontendWriter for SharedWriter {
    fn put_new(&self, s: &NewSlots) -> Result<(), WriteError> {
        let lock = || self.0.lock().unwrap();
        lock().put_names(&s.names)?;
        lock().put_backends(&s.backend_keys, &s.backends)?;
        std::thread::yield_now();
        lock().put_maglev_chunks(&s.chunk_keys, &s.chunks)?;
        std::thread::yield_now();
        let mut f = lock();
        for v in &s.values {
            for i in 0..v.backend_count as u32 {
                assert!(
                    f.backends.contains_key(&BackendKey::new(v.service_id, v.generation, i)),
                    "service {} written before its slot {i}",
                    v.service_id
                );
            }
            for pos in (0..v.maglev_size).step_by(limits::MAGLEV_CHUNK as usize) {
                assert!(
                    f.maglev.contains_key(&MaglevKey::new(v.service_id, v.generation, pos)),
                    "service {} written before its chunk {pos}",
                    v.service_id
                );
            }
        }
        f.put_services(&s.keys, &s.values)
    }
}

impl MapWriter for Fake {
    fn new_frontend_writer(&self) -> Option<Box<dyn NewFrontendWriter>> {
        let shared = self.shared.clone()?;
        Some(Box::new(SharedWriter(shared)))
    }
    fn cache_services(&mut self, keys: &[ServiceKey], _values: &[ServiceValue]) -> Result<(), WriteError> {
        // Cached only once written.
        let shared = self.shared.as_ref().expect("cache_services after shared writes");
        let written = &shared.lock().unwrap().services;
        assert!(keys.iter().all(|k| written.contains_key(k)), "cached before its entry");
        self.cached.extend_from_slice(keys);
        Ok(())
    }
    fn put_vip_filter(&mut self, filter: &VipFilter) -> Result<(), WriteError> {
        self.vip_filter = Some(Box::new(*filter));
        self.vip_filter_writes += 1;
        Ok(())
    }
    fn put_frontend_filter(&mut self, filter: &FrontendFilter) -> Result<(), WriteError> {
        let mut copy: Box<FrontendFilter> = bytemuck::zeroed_box();
        *copy = *filter;
        // The same map for the writers of other threads.
        if let Some(shared) = &self.shared {
            shared.lock().unwrap().frontend_filter = Some(copy.clone());
        }
        self.frontend_filter = Some(copy);
        self.frontend_filter_writes += 1;
        Ok(())
    }
    fn put_backend(&mut self, k: BackendKey, v: Backend) -> Result<(), WriteError> {
        if self.fail_backend_writes {
            return Err(WriteError::Refused("map full".into()));
        }
        self.log.push(format!("put_backend {} {}", k.service_id, k.slot));
        self.backends.insert(k, v);
        Ok(())
    }
    fn delete_backend(&mut self, k: BackendKey) -> Result<(), WriteError> {
        self.log.push(format!("delete_backend {} {}", k.service_id, k.slot));
        self.backends
            .remove(&k)
            .map(|_| ())
            .ok_or_else(|| WriteError::Refused("not found".into()))
    }
    fn put_service(&mut self, k: ServiceKey, v: ServiceValue) -> Result<(), WriteError> {
        assert!(
            self.frontend_filter.as_ref().is_some_and(|f| f.has(&k.addr)),
            "service {} written before its address's bit in the frontend filter",
            v.service_id
        );
        self.log.push(format!(
            "put_service {} gen {} count {}",
            v.service_id, v.generation, v.backend_count
        ));
        self.services.insert(k, v);
        Ok(())
    }
    fn delete_service(&mut self, k: ServiceKey) -> Result<(), WriteError> {
        self.log.push("delete_service".into());
        self.services.remove(&k);
        Ok(())
    }
    fn put_maglev(&mut self, k: MaglevKey, v: MaglevChunk) -> Result<(), WriteError> {
        self.log.push(format!("put_maglev {} {}", k.service_id, k.chunk));
        self.maglev.insert(k, v);
        Ok(())
    }
    fn delete_maglev(&mut self, k: MaglevKey) -> Result<(), WriteError> {
        self.log.push(format!("delete_maglev {} {}", k.service_id, k.chunk));
        self.maglev
            .remove(&k)
            .map(|_| ())
            .ok_or_else(|| WriteError::Refused("not found".into()))
    }
    fn prune_affinity(&mut self, service_id: u32, keep: &[Backend]) -> Result<(), WriteError> {
        self.log
            .push(format!("prune_affinity {service_id} keep {}", keep.len()));
        Ok(())
    }
    fn put_name(&mut self, id: u32, name: &str) -> Result<(), WriteError> {
        self.names.insert(id, name.to_string());
        Ok(())
    }
    fn delete_name(&mut self, id: u32) -> Result<(), WriteError> {
        self.names.remove(&id);
        Ok(())
    }
    fn put_names(&mut self, names: &[(u32, String)]) -> Result<(), WriteError> {
        self.log.push(format!("put_names {}", names.len()));
        names.iter().try_for_each(|(id, n)| self.put_name(*id, n))
    }
    fn put_services(&mut self, keys: &[ServiceKey], values: &[ServiceValue]) -> Result<(), WriteError> {
        self.log.push(format!("put_services {}", keys.len()));
        keys.iter().zip(values).try_for_each(|(k, v)| self.put_service(*k, *v))
    }
    fn put_source_range(&mut self, id: u32, addr: std::net::IpAddr, len: u8) -> Result<(), WriteError> {
        self.log.push(format!("put_source_range {id} {addr}/{len}"));
        Ok(())
    }
    fn delete_source_range(&mut self, id: u32, addr: std::net::IpAddr, len: u8) -> Result<(), WriteError> {
        self.log.push(format!("delete_source_range {id} {addr}/{len}"));
        Ok(())
    }
    fn narrow_backend_filter(&mut self) -> Result<Narrowed, WriteError> {
        self.log.push("narrow_backend_filter".into());
        Ok(Narrowed {
            held_by_flows: self.held_by_flows,
            ..Narrowed::default()
        })
    }
    fn clear_udp_flows(&mut self, stale: &[(u32, Backend)]) -> Result<usize, WriteError> {
        let list: Vec<String> = stale.iter().map(|(id, b)| format!("{id} {}", b.ip())).collect();
        self.log.push(format!("clear_udp_flows {}", list.join(", ")));
        Ok(stale.len())
    }
    fn reset_service_stats(&mut self, id: u32) -> Result<(), WriteError> {
        self.log.push(format!("reset_service_stats {id}"));
        Ok(())
    }
}

impl Fake {
    /// A Fake whose batches of new frontends are written from other
    /// threads.
    fn shared() -> Fake {
        Fake {
            shared: Some(Default::default()),
            ..Default::default()
        }
    }

    /// Takes in what other threads wrote (see `shared`), their log after
    /// this one's.
    fn merge(&mut self) {
        let Some(shared) = &self.shared else { return };
        let mut lock = shared.lock().unwrap();
        let mut other = std::mem::take(&mut *lock);
        lock.frontend_filter = other.frontend_filter.take();
        drop(lock);
        self.log.append(&mut other.log);
        self.services.append(&mut other.services);
        self.backends.append(&mut other.backends);
        self.maglev.append(&mut other.maglev);
        self.names.append(&mut other.names);
    }

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
                    Arc::new(Frontend {
                        service: "shop/web".into(),
                        port_name: "http".into(),
                        backends: backends(b),
                        affinity_timeout_s: None,
                        flags: 0,
                        source_ranges: vec![],
                        also_serving: Vec::new(),
                    }),
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
            Arc::make_mut(d.frontends.get_mut(k).unwrap()).also_serving = backends(serving);
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

/// A removed UDP frontend's flows are cleared (kube-proxy clears the UDP
/// conntrack entries of a frontend that lead to no serving endpoint),
/// before a frontend added in the same apply takes its id; a removed TCP
/// frontend's flows are not (an established connection keeps its
/// backend). Through the incremental path too.
#[test]
fn a_removed_udp_frontends_flows_are_cleared_before_its_id_is_reused() {
    let udp = |last: u8| ServiceKey::new(Ipv4Addr::new(198, 19, 0, last), 53, IPPROTO_UDP);
    let mut s = syncer();
    s.apply(&desired(&[(udp(53), &[1, 2]), (key(1), &[3])]));
    let id = s.programmed()[&udp(53)].service_id;
    s.writer.log.clear();
    // The UDP frontend goes, another one comes, with the freed id.
    let r = s.apply(&desired(&[(udp(54), &[4]), (key(1), &[3])]));
    assert_eq!(s.programmed()[&udp(54)].service_id, id, "the id is reused");
    let log = std::mem::take(&mut s.writer.log);
    let cleared = log
        .iter()
        .position(|l| *l == format!("clear_udp_flows {id} 198.18.1.1, {id} 198.18.1.2"))
        .unwrap_or_else(|| panic!("the removed frontend's flows were not cleared: {log:?}"));
    let reused = log
        .iter()
        .position(|l| l.starts_with(&format!("put_backend {id} ")))
        .expect("the new frontend's slots");
    assert!(cleared < reused, "cleared after the id was reused: {log:?}");
    assert_eq!(
        log.iter().filter(|l| l.starts_with("clear_udp_flows")).count(),
        1,
        "{log:?}"
    );
    assert_eq!(r.removed, 1);
    // A TCP frontend's removal clears nothing.
    s.apply(&desired(&[(udp(54), &[4])]));
    assert!(
        !s.writer.log.iter().any(|l| l.starts_with("clear_udp_flows")),
        "{:?}",
        s.writer.log
    );
    // The incremental path.
    s.writer.log.clear();
    let id = s.programmed()[&udp(54)].service_id;
    let changed: BTreeSet<ServiceKey> = [udp(54)].into();
    s.apply_changed(&desired(&[]), &changed);
    assert_eq!(
        s.writer
            .log
            .iter()
            .filter(|l| l.starts_with("clear_udp_flows"))
            .collect::<Vec<_>>(),
        [&format!("clear_udp_flows {id} 198.18.1.4")]
    );
}

/// The backend filter is narrowed once backend slots were deleted (the
/// old generation reaped), at most once per `FILTER_NARROW_SPACING`, and
/// again after `FILTER_NARROW_RECHECK` while live flows alone hold
/// entries; the reap timer wakes the agent for it.
#[test]
fn the_backend_filter_is_narrowed_after_backends_leave_at_most_once_per_spacing() {
    let narrowings = |s: &mut Syncer<Fake>| {
        let log = std::mem::take(&mut s.writer.log);
        log.iter().filter(|l| *l == "narrow_backend_filter").count()
    };
    let mut s = syncer();
    s.apply(&desired(&[(key(1), &[1, 2])]));
    s.reap_at(Instant::now() + RETIRE_GRACE);
    assert_eq!(narrowings(&mut s), 0, "nothing left the maps");
    assert_eq!(s.next_reap(), None);
    // Backend 1 leaves: narrowed once its old generation is reaped.
    s.apply(&desired(&[(key(1), &[2])]));
    let reaped = Instant::now() + RETIRE_GRACE;
    s.reap_at(reaped - Duration::from_millis(500));
    assert_eq!(narrowings(&mut s), 0, "the old generation is still in its grace period");
    s.reap_at(reaped);
    assert_eq!(narrowings(&mut s), 1);
    assert_eq!(s.next_reap(), None, "nothing more to do");
    // Backend 2 leaves soon after: narrowed one spacing after the last.
    s.apply(&desired(&[(key(1), &[3])]));
    let t = Instant::now() + RETIRE_GRACE;
    s.reap_at(t);
    assert_eq!(narrowings(&mut s), 0, "within the spacing");
    let due = reaped + FILTER_NARROW_SPACING;
    assert_eq!(s.next_reap(), Some(due.max(t)));
    s.writer.held_by_flows = 1;
    s.reap_at(due.max(t));
    assert_eq!(narrowings(&mut s), 1);
    // Live flows held an entry: again after the recheck period.
    let again = due.max(t) + FILTER_NARROW_RECHECK;
    assert_eq!(s.next_reap(), Some(again));
    s.writer.held_by_flows = 0;
    s.reap_at(again);
    assert_eq!(narrowings(&mut s), 1);
    assert_eq!(s.next_reap(), None);
    // Due (as after an adoption), a sync does not narrow: the reap timer,
    // due at once, does.
    let mut s = syncer();
    s.filter_stale = true;
    s.apply(&desired(&[(key(1), &[1])]));
    assert_eq!(narrowings(&mut s), 0, "narrowed inside a sync");
    assert!(s.next_reap().is_some_and(|t| t <= Instant::now()));
    s.reap();
    assert_eq!(narrowings(&mut s), 1);
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
    let slot1 = limits::SLOTS_FIRST_RANGE;
    let chunk1 = limits::MAGLEV_MAX_CHUNKS;
    assert_eq!(
        s.writer().log[before..],
        [
            format!("put_backend 0 {slot1}"),
            format!("put_backend 0 {}", slot1 + 1),
            format!("put_backend 0 {}", slot1 + 2),
            format!("put_maglev 0 {chunk1}"),
            "put_service 0 gen 1 count 3".to_string(),
        ]
    );
    assert_eq!(s.writer().visible(&key(1)), backends(&[2, 3, 4]));
    // The old generation stays for the grace period: a packet that read
    // the old service entry still finds its slots.
    let flipped = std::time::Instant::now();
    s.reap_at(flipped);
    assert_eq!(
        s.writer().backends.len(),
        5,
        "old generation deleted under in-flight packets"
    );
    assert!(s
        .next_reap()
        .is_some_and(|t| t >= flipped + RETIRE_GRACE - std::time::Duration::from_millis(50)));
    let before = s.writer().log.len();
    s.reap_at(flipped + RETIRE_GRACE);
    assert_eq!(
        s.writer().log[before..],
        [
            "delete_backend 0 0",
            "delete_backend 0 1",
            "delete_maglev 0 0",
            // Their addresses may be no backend any more.
            "narrow_backend_filter"
        ]
    );
    assert_eq!(s.writer().backends.len(), 3, "old generation left behind");
    assert_eq!(s.writer().maglev.len(), 1, "old generation left behind");
    assert_eq!(s.next_reap(), None);
}

/// An id whose generation is still retired is written again (its frontend
/// flipped twice within the grace period, or it was removed and the id
/// reused): the reaping later spares what the new set wrote.
#[test]
fn reaping_spares_slots_written_again_within_the_grace_period() {
    let mut s = syncer();
    s.apply(&desired(&[(key(1), &[1, 2, 3]), (key(2), &[9])]));
    // key(1) removed (id 0 retired with 3 slots), key(3) takes id 0.
    s.apply(&desired(&[(key(2), &[9]), (key(3), &[4])]));
    assert_eq!(s.programmed()[&key(3)].service_id, 0);
    s.reap_at(std::time::Instant::now() + RETIRE_GRACE);
    assert_eq!(s.writer().visible(&key(3)), backends(&[4]));
    // Only the slots the new set does not use went.
    assert_eq!(s.writer().backends.len(), 2, "{:?}", s.writer().backends);
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

/// The frontend filter has a bit for every programmed frontend's address
/// (checked by `Fake::put_service` before each entry is written) and
/// loses it with the address's last frontend; an apply that changes no
/// address does not write it.
#[test]
fn the_frontend_filter_follows_the_frontend_addresses() {
    let bits = |s: &Syncer<Fake>| s.writer().frontend_filter.as_ref().unwrap().count();
    let has = |s: &Syncer<Fake>, k: ServiceKey| s.writer().frontend_filter.as_ref().unwrap().has(&k.addr);
    let mut s = syncer();
    let udp = ServiceKey::new(Ipv4Addr::new(198, 19, 0, 1), 53, IPPROTO_UDP);
    s.apply(&desired(&[(key(1), &[1]), (udp, &[1]), (key(2), &[2])]));
    assert_eq!((bits(&s), s.writer().frontend_filter_writes), (2, 1));
    // Other backends, same addresses: no write.
    s.apply(&desired(&[(key(1), &[2]), (udp, &[1]), (key(2), &[1])]));
    assert_eq!(s.writer().frontend_filter_writes, 1);
    // One of two frontends of an address goes: its bit stays.
    s.apply(&desired(&[(udp, &[1]), (key(2), &[1])]));
    assert!(has(&s, key(1)));
    // A new address in the same apply as the last removal of another.
    let changed: BTreeSet<ServiceKey> = [udp, key(3)].into();
    s.apply_changed(&desired(&[(key(2), &[1]), (key(3), &[3])]), &changed);
    assert!(!has(&s, key(1)) && has(&s, key(2)) && has(&s, key(3)));
    assert_eq!(bits(&s), 2);
    s.apply(&desired(&[]));
    assert_eq!(bits(&s), 0);
}

#[test]
fn removal_deletes_service_before_slots_and_reuses_the_id() {
    let mut s = syncer();
    s.apply(&desired(&[(key(1), &[1]), (key(2), &[2])]));
    let before = s.writer().log.len();
    let r = s.apply(&desired(&[(key(2), &[2])]));
    assert_eq!(r.removed, 1);
    assert_eq!(s.writer().log[before..], ["delete_service", "prune_affinity 0 keep 0"]);
    assert!(!s.writer().services.contains_key(&key(1)));
    // The slots go after the grace period.
    let before = s.writer().log.len();
    s.reap_at(std::time::Instant::now() + RETIRE_GRACE);
    assert_eq!(
        s.writer().log[before..],
        ["delete_backend 0 0", "delete_maglev 0 0", "narrow_backend_filter"]
    );
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
    Arc::make_mut(d.frontends.get_mut(&key(1)).unwrap()).port_name = "web".into();
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
    use crate::model::{
        compute_for_node, health_checks, records, HealthCache, Incremental, NodeInfo, Problem, ServiceRecord,
        SliceRecord, Tracked,
    };

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

    // "a" sorts before "a-b", but "a-b/..." before "a/...": the conflict
    // order is by (namespace, name), not by object key.
    const NAMESPACES: &[&str] = &["a", "a-b"];
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
        .map(|mut s: Service| {
            // Health-check ports: valid, shared with another Service, or
            // outside the node port range.
            s.spec.as_mut().unwrap().health_check_node_port = Some(*rng.pick(&[30100, 30101, 5]));
            s
        })
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

    /// The two syncers wrote the same maps.
    fn same_maps(incr: &Syncer<Fake>, full: &Syncer<Fake>, ctx: &str) {
        let (a, b) = (incr.writer(), full.writer());
        assert_eq!(a.services, b.services, "{ctx}");
        assert_eq!(a.backends, b.backends, "{ctx}");
        assert_eq!(
            a.maglev.keys().collect::<Vec<_>>(),
            b.maglev.keys().collect::<Vec<_>>(),
            "{ctx}"
        );
        assert_eq!(a.names, b.names, "{ctx}");
    }

    #[test]
    fn incremental_path_equals_full_path() {
        let node = NodeInfo {
            name: Some("n1".into()),
            addresses: vec![Ipv4Addr::new(198, 18, 0, 1).into(), Ipv4Addr::new(198, 18, 0, 2).into()],
            ..NodeInfo::default()
        };
        // The sequences must exercise what they are meant to.
        let (mut conflicts, mut frontends, mut health_checked) = (0, 0, 0);
        // Updates that left the problem lists' versions alone, and that
        // moved them (the sync loop diffs the problems only on a move).
        let (mut problems_kept, mut problems_moved) = (0, 0);
        for seed in 0..40u64 {
            let mut rng = Rng(seed);
            let mut services: BTreeMap<String, Service> = BTreeMap::new();
            let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
            let mut incremental = Incremental::new(node.clone());
            let mut health_cache = HealthCache::default();
            let (mut full_sync, mut incr_sync) = (syncer(), syncer());
            let (mut changed_services, mut changed_slices) = (HashSet::new(), HashSet::new());
            let mut last_problems: Option<(u64, Vec<Problem>, u64, Vec<Problem>)> = None;
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
                let mut svc_list: Vec<ServiceRecord> = records(&services.values().cloned().collect::<Vec<Service>>());
                let mut slice_list: Vec<SliceRecord> =
                    records(&slices.values().cloned().collect::<Vec<EndpointSlice>>());
                let n = svc_list.len();
                if n > 1 {
                    svc_list.swap(rng.below(n), rng.below(n));
                }
                let n = slice_list.len();
                if n > 1 {
                    slice_list.swap(rng.below(n), rng.below(n));
                }
                let service_index: HashMap<String, usize> =
                    svc_list.iter().enumerate().map(|(i, s)| (s.key(), i)).collect();
                let slice_index: HashMap<String, usize> =
                    slice_list.iter().enumerate().map(|(i, s)| (s.key(), i)).collect();
                let tracked = Tracked {
                    service_index: &service_index,
                    slice_index: &slice_index,
                    // The first sync (and now and then a relist) sees everything.
                    changed: (step != 0 && step % 50 != 0).then_some((&changed_services, &changed_slices)),
                };

                let full = compute_for_node(&svc_list, &slice_list, &node);
                full_sync.apply(&full);
                let checks = health_checks(&svc_list, &slice_list, &node);
                health_checked += checks.0.iter().filter(|c| c.local_endpoints > 0).count();
                // Problems in any order: the sync loop reports them as a set.
                let sorted = |(c, mut p): (Vec<_>, Vec<Problem>)| {
                    p.sort();
                    (c, p)
                };
                assert_eq!(
                    sorted(health_cache.get(&svc_list, &slice_list, &node, Some(&tracked))),
                    sorted(checks),
                    "health checks, seed {seed} step {step}"
                );
                let report = match incremental.update(&svc_list, &slice_list, &tracked) {
                    Some(keys) => incr_sync.apply_changed(incremental.desired(), &keys),
                    None => incr_sync.apply(incremental.desired()),
                };
                assert!(report.errors.is_empty(), "{:?}", report.errors);
                changed_services.clear();
                changed_slices.clear();
                // A version that stayed means a list that stayed.
                let (pv, hv) = (incremental.problems_version(), health_cache.version());
                if let Some((last_pv, last_p, last_hv, last_h)) = &last_problems {
                    if pv == *last_pv {
                        assert_eq!(
                            &incremental.desired().problems,
                            last_p,
                            "problems kept, seed {seed} step {step}"
                        );
                        problems_kept += 1;
                    } else {
                        problems_moved += 1;
                    }
                    if hv == *last_hv {
                        assert_eq!(
                            health_cache.problems(),
                            last_h,
                            "health problems kept, seed {seed} step {step}"
                        );
                    }
                }
                let (p, h) = (incremental.desired().problems.clone(), health_cache.problems().to_vec());
                last_problems = Some((pv, p, hv, h));

                conflicts += full
                    .problems
                    .iter()
                    .filter(|p| p.reason.contains("already used"))
                    .count();
                frontends += full.frontends.len();
                let ctx = format!("seed {seed} step {step}");
                assert_eq!(incremental.desired(), &full, "{ctx}");
                assert_eq!(incr_sync.programmed(), full_sync.programmed(), "{ctx}");
                let sum: usize = full.frontends.values().map(|f| f.backends.len()).sum();
                assert_eq!(incr_sync.programmed_backends(), sum, "{ctx}");
                assert_eq!(full_sync.programmed_backends(), sum, "{ctx}");
                same_maps(&incr_sync, &full_sync, &ctx);
            }
        }
        assert!(
            conflicts > 100 && frontends > 1000 && health_checked > 100,
            "{conflicts} conflicts, {frontends} frontends, {health_checked} health checks with local endpoints"
        );
        assert!(
            problems_kept > 500 && problems_moved > 500,
            "problem list versions kept {problems_kept} times, moved {problems_moved} times"
        );
    }

    /// Random manifest text: up to three random Services and
    /// EndpointSlices, as YAML documents or a JSON List.
    fn random_manifest(rng: &mut Rng, json: bool) -> String {
        let mut docs = Vec::new();
        for _ in 0..rng.below(4) {
            let ns = *rng.pick(NAMESPACES);
            let doc = if rng.below(2) == 0 {
                let name = *rng.pick(SERVICES);
                let v = random_service(rng, ns, name);
                serde_json::to_value(v).unwrap()
            } else {
                let name = format!("e{}", rng.below(6));
                serde_json::to_value(random_slice(rng, ns, &name)).unwrap()
            };
            docs.push(doc);
        }
        match json {
            true => serde_json::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": docs})).unwrap(),
            false => docs
                .iter()
                .map(|d| serde_yaml_ng::to_string(d).unwrap())
                .collect::<Vec<_>>()
                .join("---\n"),
        }
    }

    /// The same through the manifest-directory source, polled and watched
    /// by inotify: random writes, rewrites, renames (within the directory,
    /// in from and out to another one), deletions of files holding random
    /// Services and EndpointSlices (the same keys in several files, so
    /// duplicate definitions come and go; now and then a file that cannot
    /// be parsed), a subdirectory moved out and back in, a ConfigMap-style
    /// `..data` symlink swap, and (watched) events lost to a full queue;
    /// one poll after each batch. After every poll the incremental path
    /// fed by the keys the source reports equals the full one on the same
    /// objects, and the source's objects and problems equal those of a
    /// fresh source reading the directory from scratch. The watched source
    /// must have seen it all through events: one full scan per lost queue
    /// and the first.
    #[test]
    fn file_source_incremental_path_equals_full_path() {
        use std::{fs, os::unix::fs::symlink, time::SystemTime};

        use crate::source::files::{write_with_mtime, FileSource};

        let node = NodeInfo {
            name: Some("n1".into()),
            addresses: vec![Ipv4Addr::new(198, 18, 0, 1).into()],
            ..NodeInfo::default()
        };
        let dir = std::env::temp_dir().join(format!("dp-files-incr-{}", std::process::id()));
        let outside = std::env::temp_dir().join(format!("dp-files-incr-outside-{}", std::process::id()));
        struct Cleanup(Vec<std::path::PathBuf>);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                for d in &self.0 {
                    let _ = fs::remove_dir_all(d);
                }
            }
        }
        let _cleanup = Cleanup(vec![dir.clone(), outside.clone()]);
        const FILES: &[&str] = &["f0.yaml", "f1.yaml", "f2.yaml", "f3.json", "sub/f4.yaml", "sub/f5.yaml"];
        // The keys of the ConfigMap-style subdirectory `cm`.
        const CM_KEYS: &[&str] = &["c0.yaml", "c1.yaml"];
        // Every write gets its own mtime, so that no rewrite escapes the
        // fingerprint however fast the writes come.
        let mut writes = 0u64;
        let mut write = |path: &std::path::Path, text: &str| {
            writes += 1;
            let mtime = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + writes);
            write_with_mtime(path, text, mtime);
        };
        let sorted_objects = |src: &FileSource| {
            let mut services: Vec<(String, &ServiceRecord)> = src.services().iter().map(|s| (s.key(), s)).collect();
            services.sort_by(|a, b| a.0.cmp(&b.0));
            let mut slices: Vec<(String, &SliceRecord)> = src.slices().iter().map(|s| (s.key(), s)).collect();
            slices.sort_by(|a, b| a.0.cmp(&b.0));
            let mut problems = src.problems().to_vec();
            problems.sort();
            (format!("{services:?}"), format!("{slices:?}"), problems)
        };
        // A new version of the ConfigMap-style directory, as the kubelet
        // writes it: a timestamped directory, `..data` renamed over.
        let cm_version = |rng: &mut Rng, n: u32| {
            let cm = dir.join("cm");
            let v = format!("..v{n}");
            fs::create_dir(cm.join(&v)).unwrap();
            for key in CM_KEYS {
                // Now and then a key missing: its link dangles.
                if rng.below(4) != 0 {
                    fs::write(cm.join(&v).join(key), random_manifest(rng, false)).unwrap();
                }
            }
            symlink(&v, cm.join("..data_tmp")).unwrap();
            fs::rename(cm.join("..data_tmp"), cm.join("..data")).unwrap();
            if n > 0 {
                fs::remove_dir_all(cm.join(format!("..v{}", n - 1))).unwrap();
            }
        };
        // The sequences must exercise what they are meant to.
        let (mut tracked_changes, mut duplicates, mut unparsable, mut frontends) = (0, 0, 0, 0);
        let (mut moved_dirs, mut swaps, mut overflows, mut targeted) = (0, 0, 0, 0);
        let queue_max: usize = (fs::read_to_string("/proc/sys/fs/inotify/max_queued_events").unwrap())
            .trim()
            .parse()
            .unwrap();
        for watched in [false, true] {
            for seed in 0..12u64 {
                let mut rng = Rng(seed);
                let _ = fs::remove_dir_all(&dir);
                let _ = fs::remove_dir_all(&outside);
                fs::create_dir_all(dir.join("sub")).unwrap();
                fs::create_dir_all(dir.join("cm")).unwrap();
                fs::create_dir_all(&outside).unwrap();
                let mut cm_n = 0;
                cm_version(&mut rng, cm_n);
                for key in CM_KEYS {
                    symlink(format!("..data/{key}"), dir.join("cm").join(key)).unwrap();
                }
                let mut src = match watched {
                    true => FileSource::watched(&dir),
                    false => FileSource::new(&dir),
                };
                assert_eq!(src.watching(), watched, "inotify could not be set up");
                let mut incremental = Incremental::new(node.clone());
                let mut health_cache = HealthCache::default();
                let (mut full_sync, mut incr_sync) = (syncer(), syncer());
                // Files that hold something unparsable now.
                let mut broken: HashSet<&str> = HashSet::new();
                // Whether `sub` is outside the directory now.
                let mut sub_out = false;
                let path_of = |file: &str, sub_out: bool| match sub_out && file.starts_with("sub/") {
                    true => outside.join(file),
                    false => dir.join(file),
                };
                let mut seed_overflows = 0;
                for step in 0..80 {
                    if watched && step % 40 == 39 {
                        // The queue filled with events of files that are
                        // no manifests (two: identical events in a row are
                        // merged), so that this step's events are lost.
                        for i in 0..=queue_max {
                            fs::File::create(dir.join(["flood-a.txt", "flood-b.txt"][i % 2])).unwrap();
                        }
                        seed_overflows += 1;
                    }
                    for _ in 0..1 + rng.below(3) {
                        let file = *rng.pick(FILES);
                        let path = path_of(file, sub_out);
                        match rng.below(12) {
                            0 => {
                                let _ = fs::remove_file(&path);
                                broken.remove(file);
                            }
                            1 => {
                                // Within the directory or, with `sub`
                                // outside, in or out of it.
                                let to = *rng.pick(FILES);
                                if path.exists() && to != file {
                                    fs::rename(&path, path_of(to, sub_out)).unwrap();
                                    if broken.remove(file) {
                                        broken.insert(to);
                                    } else {
                                        broken.remove(to);
                                    }
                                }
                            }
                            2 => {
                                write(&path, "kind: Service\n  metadata: [\n");
                                broken.insert(file);
                            }
                            3 if path.exists() => {
                                // Rewritten as it is.
                                let text = fs::read_to_string(&path).unwrap();
                                write(&path, &text);
                            }
                            10 => {
                                // `sub` moved out of the directory or back.
                                let (inside, out) = (dir.join("sub"), outside.join("sub"));
                                match sub_out {
                                    false => fs::rename(inside, out).unwrap(),
                                    true => fs::rename(out, inside).unwrap(),
                                }
                                sub_out = !sub_out;
                                moved_dirs += 1;
                            }
                            11 => {
                                cm_n += 1;
                                cm_version(&mut rng, cm_n);
                                swaps += 1;
                            }
                            _ => {
                                let text = random_manifest(&mut rng, file.ends_with(".json"));
                                write(&path, &text);
                                broken.remove(file);
                            }
                        }
                    }
                    src.poll().unwrap();
                    let ctx = format!("watched {watched} seed {seed} step {step}");
                    src.view(|v| {
                        let tracked = v.tracked.expect("the file source tracks its objects");
                        assert_eq!(tracked.changed.is_none(), step == 0, "{ctx}");
                        if let Some((s, e)) = tracked.changed {
                            tracked_changes += s.len() + e.len();
                        }
                        let full = compute_for_node(v.services, v.slices, &node);
                        full_sync.apply(&full);
                        let checks = health_checks(v.services, v.slices, &node);
                        let sorted = |(c, mut p): (Vec<_>, Vec<Problem>)| {
                            p.sort();
                            (c, p)
                        };
                        assert_eq!(
                            sorted(health_cache.get(v.services, v.slices, &node, Some(&tracked))),
                            sorted(checks),
                            "health checks, {ctx}"
                        );
                        let report = match incremental.update(v.services, v.slices, &tracked) {
                            Some(keys) => incr_sync.apply_changed(incremental.desired(), &keys),
                            None => incr_sync.apply(incremental.desired()),
                        };
                        assert!(report.errors.is_empty(), "{:?}", report.errors);
                        frontends += full.frontends.len();
                        assert_eq!(incremental.desired(), &full, "{ctx}");
                        assert_eq!(incr_sync.programmed(), full_sync.programmed(), "{ctx}");
                        same_maps(&incr_sync, &full_sync, &ctx);
                    });
                    duplicates += src
                        .problems()
                        .iter()
                        .filter(|p| p.reason.contains("defined in both"))
                        .count();
                    unparsable += broken.len();
                    // A broken file keeps its previous objects, which a
                    // fresh source never saw: compare with one only without
                    // them.
                    if broken.is_empty() {
                        let mut fresh = FileSource::new(&dir);
                        fresh.poll().unwrap();
                        assert_eq!(sorted_objects(&src), sorted_objects(&fresh), "{ctx}");
                    }
                }
                let counts = src.scan_counts();
                if watched {
                    // Only the first scan and those after lost events
                    // were full: the rest came from events.
                    assert!(src.watching(), "fell back to polling, seed {seed}");
                    assert_eq!(counts.full, 1 + seed_overflows, "seed {seed}: {counts:?}");
                    targeted += counts.targeted;
                    overflows += seed_overflows;
                } else {
                    assert_eq!(counts.targeted, 0);
                }
            }
        }
        assert!(
            tracked_changes > 1000 && duplicates > 400 && unparsable > 200 && frontends > 2000,
            "{tracked_changes} changed keys, {duplicates} duplicate definitions, {unparsable} broken files, {frontends} frontends"
        );
        assert!(
            moved_dirs > 50 && swaps > 50 && overflows == 12 * 2 && targeted > 12 * 60,
            "{moved_dirs} directory moves, {swaps} ConfigMap swaps, {overflows} lost queues, {targeted} targeted polls"
        );
    }
}

/// The ClusterIP filter has the bit of every address with an entry for
/// the ports its Service lacks, computed here from the hash independently
/// of the syncer, and is written only when those addresses change.
#[test]
fn the_cluster_ip_filter_follows_the_entries_for_other_ports() {
    let marker = |ip: [u8; 4]| {
        (
            ServiceKey::new(Ipv4Addr::from(ip), 0, 0),
            Arc::new(Frontend {
                service: "ns/s".into(),
                port_name: String::new(),
                backends: vec![],
                affinity_timeout_s: None,
                flags: SVC_F_OTHER_PORTS,
                source_ranges: vec![],
                also_serving: vec![],
            }),
        )
    };
    let has = |s: &Syncer<Fake>, ip: [u8; 4]| {
        // The bit, as the programs compute it: the folded address times
        // the golden-ratio constant, top 16 bits.
        let folded = u32::from_ne_bytes(ip);
        let bit = (folded.wrapping_mul(0x9e37_79b1) >> 16) as usize;
        let f = s.writer().vip_filter.as_ref().expect("written");
        f.bits[bit / 64] & (1 << (bit % 64)) != 0
    };
    let mut s = syncer();
    let mut d = desired(&[(key(1), &[1])]);
    s.apply(&d);
    assert_eq!(s.writer().vip_filter_writes, 1, "the first sync writes it, empty");
    assert!(s.writer().vip_filter.as_ref().unwrap().bits.iter().all(|w| *w == 0));
    d.frontends.extend([marker([198, 19, 0, 1]), marker([198, 19, 0, 2])]);
    s.apply(&d);
    assert!(has(&s, [198, 19, 0, 1]) && has(&s, [198, 19, 0, 2]));
    assert_eq!(
        s.writer()
            .vip_filter
            .as_ref()
            .unwrap()
            .bits
            .iter()
            .map(|w| w.count_ones())
            .sum::<u32>(),
        2
    );
    assert_eq!(s.writer().vip_filter_writes, 2);
    // A change elsewhere does not write it.
    d.frontends
        .insert(key(2), desired(&[(key(2), &[2])]).frontends[&key(2)].clone());
    s.apply(&d);
    assert_eq!(s.writer().vip_filter_writes, 2);
    d.frontends.remove(&ServiceKey::new(Ipv4Addr::new(198, 19, 0, 1), 0, 0));
    s.apply(&d);
    assert!(!has(&s, [198, 19, 0, 1]) && has(&s, [198, 19, 0, 2]));
    assert_eq!(s.writer().vip_filter_writes, 3);
}

/// The entry counts the metrics show come from the syncer's record, not
/// from the maps: after adds, flips, removals, id reuse within the grace
/// period and reaping, they equal what the (modelled) maps hold.
#[test]
fn entry_counts_follow_the_maps_without_reading_them() {
    let mut s = syncer();
    let check = |s: &Syncer<Fake>, step: &str| {
        let w = s.writer();
        let e = s.entries();
        let maps = (
            w.services.len() as u64,
            w.backends.len() as u64,
            w.maglev.len() as u64,
            w.names.len() as u64,
        );
        assert_eq!((e.services, e.backends, e.maglev, e.names), maps, "after {step}");
    };
    check(&s, "nothing");
    s.apply(&desired(&[(key(1), &[1, 2, 3]), (key(2), &[9])]));
    check(&s, "two adds");
    s.apply(&desired(&[(key(1), &[2, 3, 4, 5]), (key(2), &[9])]));
    check(&s, "a flip, old generation retired");
    // key(1) removed, key(3) takes its id while its generation is retired.
    s.apply(&desired(&[(key(2), &[9]), (key(3), &[4])]));
    check(&s, "a removal and id reuse");
    s.reap_at(std::time::Instant::now() + RETIRE_GRACE);
    check(&s, "reaping");
    s.apply(&desired(&[]));
    s.reap_at(std::time::Instant::now() + RETIRE_GRACE);
    check(&s, "removing everything");
    assert_eq!(s.entries(), crate::state::ProgrammedEntries::default());

    // Source ranges: the frontends' own plus the cluster CIDRs.
    let mut d = desired(&[(key(1), &[1]), (key(2), &[2])]);
    for fe in d.frontends.values_mut() {
        let fe = Arc::make_mut(fe);
        fe.flags |= SVC_F_SOURCE_RANGES;
        fe.source_ranges = vec![
            (Ipv4Addr::new(198, 18, 100, 0).into(), 24),
            (Ipv4Addr::new(198, 18, 7, 0).into(), 24),
        ];
    }
    s.set_cluster_cidr_entries(1);
    s.apply(&d);
    assert_eq!(s.entries().source_ranges, 5);
    d.frontends.remove(&key(2));
    s.apply(&d);
    assert_eq!(s.entries().source_ranges, 3);
}

/// `n` frontends on distinct ClusterIPs with three backends each.
fn many(n: usize) -> Vec<(ServiceKey, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let vip = Ipv4Addr::new(198, 19, (i / 250) as u8 + 1, (i % 250) as u8 + 1);
            let b = (i % 200) as u8 + 1;
            (ServiceKey::new(vip, 80, IPPROTO_TCP), vec![b, b + 1, 250])
        })
        .collect()
}

/// A cold start (maps this process created) writes its new frontends in
/// batches: the same maps as one by one, a frontend's name, slots and
/// Maglev chunks before its service entry, both through `apply` and
/// `apply_changed` (the Kubernetes source's first sync).
#[test]
fn fresh_maps_write_new_frontends_in_batches_slots_first() {
    let n = TABLE_BATCH + 44;
    let entries = many(n);
    let refs: Vec<(ServiceKey, &[u8])> = entries.iter().map(|(k, b)| (*k, b.as_slice())).collect();
    let d = desired(&refs);
    let mut one_by_one = syncer();
    assert_eq!(one_by_one.apply(&d).added, n);
    let all: BTreeSet<ServiceKey> = d.frontends.keys().copied().collect();
    for changed in [false, true] {
        let mut s = syncer().with_fresh_maps();
        let r = match changed {
            false => s.apply(&d),
            true => s.apply_changed(&d, &all),
        };
        assert_eq!((r.added, r.errors.len()), (n, 0));
        let (w, o) = (s.writer(), one_by_one.writer());
        assert_eq!(w.services, o.services);
        assert_eq!(w.backends, o.backends);
        assert_eq!(w.maglev, o.maglev);
        assert_eq!(w.names, o.names);
        let batches = |what: &str| w.log.iter().filter(|l| l.starts_with(what)).count();
        assert_eq!((batches("put_services"), batches("put_names")), (2, 2), "{:?}", w.log);
        // Each service entry after every slot and chunk of its id.
        let mut seen_entry = std::collections::HashSet::new();
        for line in &w.log {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next()) {
                (Some("put_service"), Some(id)) => assert!(seen_entry.insert(id.to_string())),
                (Some("put_backend" | "put_maglev"), Some(id)) => {
                    assert!(!seen_entry.contains(id), "{line} after the service entry of {id}")
                }
                _ => {}
            }
        }
        assert_eq!(seen_entry.len(), n);
        for k in all.iter() {
            assert_eq!(w.visible(k), o.visible(k));
        }
    }
}

/// A batch that fails is undone and goes one by one, which reports each
/// frontend's failure; the next apply writes them all.
#[test]
fn a_failed_batch_goes_one_by_one() {
    let entries = many(3);
    let refs: Vec<(ServiceKey, &[u8])> = entries.iter().map(|(k, b)| (*k, b.as_slice())).collect();
    let d = desired(&refs);
    let mut s = syncer().with_fresh_maps();
    s.writer.fail_backend_writes = true;
    let r = s.apply(&d);
    assert_eq!((r.added, r.errors.len()), (0, 3), "{:?}", r.errors);
    for (e, (k, _)) in r.errors.iter().zip(&refs) {
        assert!(e.to_string().contains(&describe(k)), "{e}");
    }
    let w = s.writer();
    assert!(w.services.is_empty() && w.backends.is_empty() && w.maglev.is_empty());
    s.writer.fail_backend_writes = false;
    assert_eq!(s.apply(&d).added, 3);
    let mut clean = syncer();
    clean.apply(&d);
    // Epochs only grow: the failed attempt used some.
    let no_epoch = |w: &Fake| -> Vec<(ServiceKey, ServiceValue)> {
        w.services
            .iter()
            .map(|(k, v)| (*k, ServiceValue { epoch: 0, ..*v }))
            .collect()
    };
    assert_eq!(no_epoch(s.writer()), no_epoch(clean.writer()));
    assert_eq!(s.writer().backends, clean.writer().backends);
    assert_eq!(s.writer().maglev, clean.writer().maglev);
}

/// A cold start whose writer takes batches from other threads (the real
/// maps do): the batches go to a thread per CPU, each writes its
/// frontends' slots and chunks before their service entries (checked as
/// each entry is written), the frontend cache hears of an entry only
/// once it is written, and the maps end up as one by one.
#[test]
fn a_cold_start_writes_batches_from_several_threads_slots_first() {
    let n = 5 * TABLE_BATCH + 17;
    let entries = many(n);
    let refs: Vec<(ServiceKey, &[u8])> = entries.iter().map(|(k, b)| (*k, b.as_slice())).collect();
    let d = desired(&refs);
    let mut one_by_one = syncer();
    assert_eq!(one_by_one.apply(&d).added, n);
    let mut s = Syncer::with_config(Fake::shared(), one_by_one.config).with_fresh_maps();
    let r = s.apply(&d);
    assert_eq!((r.added, r.errors.len()), (n, 0));
    // Nothing was written by the sync's own thread.
    assert_eq!(s.writer().log, Vec::<String>::new());
    s.writer.merge();
    let (w, o) = (s.writer(), one_by_one.writer());
    let no_epoch = |w: &Fake| -> Vec<(ServiceKey, ServiceValue)> {
        w.services
            .iter()
            .map(|(k, v)| (*k, ServiceValue { epoch: 0, ..*v }))
            .collect()
    };
    assert_eq!(no_epoch(w), no_epoch(o));
    assert_eq!(w.backends, o.backends);
    assert_eq!(w.maglev, o.maglev);
    assert_eq!(w.names, o.names);
    let mut cached = w.cached.clone();
    cached.sort();
    assert_eq!(cached, d.frontends.keys().copied().collect::<Vec<_>>());
    // Epochs only grow, in the order of the frontends.
    let epochs: Vec<u32> = w.services.values().map(|v| v.epoch).collect();
    assert!(epochs.windows(2).all(|e| e[0] < e[1]), "{epochs:?}");
    assert_eq!(s.programmed().len(), n);
    assert_eq!(s.entries(), one_by_one.entries());
    for k in d.frontends.keys() {
        assert_eq!(w.visible(k), o.visible(k));
    }
}
