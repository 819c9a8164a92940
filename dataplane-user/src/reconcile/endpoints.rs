//! The endpoint set (`map_names::ENDPOINTS`): the (address, port,
//! protocol) of every backend of the programmed frontends, which the TC
//! program reads to host-route the packets of connections the socket-level
//! programs translated (`dataplane-ebpf/src/forward.rs`,
//! `socket_translated`). Kept only while that is on (host routing and
//! socket-level load balancing both; [`Syncer::track_endpoints`]);
//! otherwise empty and untouched.
//!
//! An endpoint may back many frontends (a Service's ClusterIP, its
//! NodePorts, other Services): the syncer counts the frontends per
//! endpoint as it records what it programmed, and the map changes only
//! when a count leaves or reaches 0, written in one pass at the end of
//! each sync. On adoption (a restart, an upgrade: the map may be new, or
//! hold what an earlier agent left) the whole set is written and anything
//! else in the map removed.
//!
//! Each address's backend filter entry (`BackendFilter`) is set before
//! its endpoints enter the map: the program looks at the filter first,
//! so that packets of addresses that never were a backend pay an array
//! lookup, not a hash lookup.

use std::collections::{HashMap, HashSet};

use dataplane_common::{BackendFilter, EndpointKey};

use super::*;

/// Frontends per endpoint, and what the map still lacks.
#[derive(Debug, Default)]
pub(super) struct Endpoints {
    /// Programmed frontends with each endpoint among their backends.
    counts: HashMap<EndpointKey, u32>,
    /// Endpoints whose count reached or left 0 since the last write.
    dirty: HashSet<EndpointKey>,
    /// The map is to be made equal to `counts` whole (adoption, or a
    /// write that failed).
    whole: bool,
}

impl Endpoints {
    /// Counts the `backends` of frontend `key` in (`add`) or out.
    pub(super) fn count(&mut self, key: &ServiceKey, backends: &[Backend], add: bool) {
        for b in backends {
            let k = EndpointKey::of(key, b);
            if add {
                let n = self.counts.entry(k).or_insert(0);
                *n += 1;
                if *n == 1 {
                    self.dirty.insert(k);
                }
            } else if let Some(n) = self.counts.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&k);
                    self.dirty.insert(k);
                }
            }
        }
    }

    /// Distinct endpoints.
    pub(super) fn len(&self) -> usize {
        self.counts.len()
    }
}

impl<W: MapWriter> Syncer<W> {
    /// Keeps the endpoint set from now on (`on`: both host routing and
    /// socket-level load balancing are on), written whole now from what is
    /// programmed, entries of no programmed endpoint removed; or stops
    /// keeping it and empties it (what an earlier agent left there).
    /// Returns how many endpoints the set holds.
    pub fn track_endpoints(&mut self, on: bool) -> Result<usize, WriteError> {
        if !on {
            self.endpoints = None;
            let left = self.writer.endpoint_keys()?;
            self.writer.delete_endpoints(&left)?;
            return Ok(0);
        }
        let mut e = Endpoints {
            whole: true,
            ..Endpoints::default()
        };
        for (k, p) in &self.programmed {
            e.count(k, &p.frontend.backends, true);
        }
        self.endpoints = Some(e);
        self.write_endpoints()?;
        Ok(self.endpoints.as_ref().map_or(0, Endpoints::len))
    }

    /// The distinct endpoints in the set (0 when it is not kept).
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.as_ref().map_or(0, Endpoints::len)
    }

    /// Writes what changed in the endpoint set during this sync; on a
    /// failure the set is written whole at the next one.
    pub(super) fn sync_endpoints(&mut self, report: &mut SyncReport) {
        if let Err(cause) = self.write_endpoints() {
            if let Some(e) = &mut self.endpoints {
                e.whole = true;
            }
            report.errors.push(SyncError {
                service: String::new(),
                frontend: "endpoint set".into(),
                cause: format!("writing {}: {cause}; retried at the next sync", map_names::ENDPOINTS),
            });
        }
    }

    fn write_endpoints(&mut self) -> Result<(), WriteError> {
        let Some(e) = &mut self.endpoints else { return Ok(()) };
        let (put, delete): (Vec<EndpointKey>, Vec<EndpointKey>) = if e.whole {
            let present: HashSet<EndpointKey> = self.writer.endpoint_keys()?.into_iter().collect();
            let put = e.counts.keys().filter(|k| !present.contains(k)).copied().collect();
            let delete = present.into_iter().filter(|k| !e.counts.contains_key(k)).collect();
            (put, delete)
        } else {
            e.dirty.iter().partition(|k| e.counts.contains_key(k))
        };
        self.writer.put_endpoints(&put)?;
        self.writer.delete_endpoints(&delete)?;
        // Freed, not cleared: a cold start marks every endpoint.
        e.dirty = HashSet::new();
        e.whole = false;
        Ok(())
    }
}

/// The real maps' side of [`MapWriter::put_endpoints`]: the backend
/// filter's entries of the addresses first (the filter written only when
/// one was missing; entries the programs set meanwhile are for addresses
/// of backend slots, which are endpoints in the set, already set in an
/// earlier write or in this one), then the keys, in one batch.
pub(super) fn put(maps: &mut crate::bpf::loader::Maps, keys: &[EndpointKey]) -> Result<(), WriteError> {
    use aya::maps::IterableMap;
    use std::os::fd::AsFd;
    if keys.is_empty() {
        return Ok(());
    }
    let name = map_names::BACKEND_FILTER;
    let map_err = |map| move |source| WriteError::Map { map, source };
    let mut filter: BackendFilter = maps.backend_filter.get(&0, 0).map_err(map_err(name))?;
    let before = filter.count();
    for k in keys {
        filter.set(&k.addr);
    }
    if filter.count() != before {
        maps.backend_filter.set(0, filter, 0).map_err(map_err(name))?;
    }
    let ones = vec![1u8; keys.len()];
    crate::bpf::batch::update(maps.endpoints.map().fd().as_fd(), keys, &ones).map_err(|source| WriteError::Sys {
        map: map_names::ENDPOINTS,
        source,
    })
}

/// [`MapWriter::delete_endpoints`] for the real maps (the filter keeps
/// its entries: they are only ever set).
pub(super) fn delete(maps: &mut crate::bpf::loader::Maps, keys: &[EndpointKey]) -> Result<(), WriteError> {
    for k in keys {
        match maps.endpoints.remove(k) {
            Ok(()) => {}
            // Already gone.
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => {
                return Err(WriteError::Map {
                    map: map_names::ENDPOINTS,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// [`MapWriter::endpoint_keys`] for the real maps.
pub(super) fn keys(maps: &crate::bpf::loader::Maps) -> Result<Vec<EndpointKey>, WriteError> {
    use aya::maps::IterableMap;
    use std::os::fd::AsFd;
    let mut out = Vec::new();
    crate::bpf::batch::for_each_entry(maps.endpoints.map().fd().as_fd(), |k: &EndpointKey, _: &u8| {
        out.push(*k)
    })
    .map_err(|source| WriteError::Sys {
        map: map_names::ENDPOINTS,
        source,
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::{IpAddr, Ipv4Addr};

    use dataplane_common::{FAMILY_V4, IPPROTO_TCP, KEY_IN_CLUSTER};

    use super::*;

    /// The endpoint set as a map, and nothing else.
    #[derive(Default)]
    struct Set {
        keys: BTreeSet<EndpointKey>,
        fail: bool,
        puts: usize,
    }

    impl MapWriter for Set {
        fn put_backend(&mut self, _: BackendKey, _: Backend) -> Result<(), WriteError> {
            Ok(())
        }
        fn delete_backend(&mut self, _: BackendKey) -> Result<(), WriteError> {
            Ok(())
        }
        fn put_service(&mut self, _: ServiceKey, _: ServiceValue) -> Result<(), WriteError> {
            Ok(())
        }
        fn delete_service(&mut self, _: ServiceKey) -> Result<(), WriteError> {
            Ok(())
        }
        fn put_maglev(&mut self, _: MaglevKey, _: MaglevChunk) -> Result<(), WriteError> {
            Ok(())
        }
        fn delete_maglev(&mut self, _: MaglevKey) -> Result<(), WriteError> {
            Ok(())
        }
        fn prune_affinity(&mut self, _: u32, _: &[Backend]) -> Result<(), WriteError> {
            Ok(())
        }
        fn put_name(&mut self, _: u32, _: &str) -> Result<(), WriteError> {
            Ok(())
        }
        fn delete_name(&mut self, _: u32) -> Result<(), WriteError> {
            Ok(())
        }
        fn put_source_range(&mut self, _: u32, _: IpAddr, _: u8) -> Result<(), WriteError> {
            Ok(())
        }
        fn delete_source_range(&mut self, _: u32, _: IpAddr, _: u8) -> Result<(), WriteError> {
            Ok(())
        }
        fn reset_service_stats(&mut self, _: u32) -> Result<(), WriteError> {
            Ok(())
        }
        fn clear_udp_flows(&mut self, _: &[(u32, Backend)]) -> Result<usize, WriteError> {
            Ok(0)
        }
        fn put_endpoints(&mut self, keys: &[EndpointKey]) -> Result<(), WriteError> {
            if self.fail {
                return Err(WriteError::Refused("map full".into()));
            }
            self.puts += keys.len();
            self.keys.extend(keys);
            Ok(())
        }
        fn delete_endpoints(&mut self, keys: &[EndpointKey]) -> Result<(), WriteError> {
            for k in keys {
                self.keys.remove(k);
            }
            Ok(())
        }
        fn endpoint_keys(&mut self) -> Result<Vec<EndpointKey>, WriteError> {
            Ok(self.keys.iter().copied().collect())
        }
    }

    fn ep(last: u8, port: u16) -> EndpointKey {
        EndpointKey {
            addr: dataplane_common::addr_of(IpAddr::V4(Ipv4Addr::new(198, 18, 1, last))).0,
            port: port.to_be(),
            proto: IPPROTO_TCP,
            family: FAMILY_V4,
        }
    }

    fn frontend(backends: &[(u8, u16)]) -> Arc<Frontend> {
        Arc::new(Frontend {
            service: "shop/web".into(),
            port_name: "http".into(),
            backends: backends
                .iter()
                .map(|(last, port)| Backend::new(IpAddr::V4(Ipv4Addr::new(198, 18, 1, *last)), *port))
                .collect(),
            affinity_timeout_s: None,
            flags: 0,
            source_ranges: vec![],
            also_serving: vec![],
        })
    }

    fn key(vip: u8, port: u16) -> ServiceKey {
        ServiceKey::new(IpAddr::V4(Ipv4Addr::new(198, 19, 0, vip)), port, IPPROTO_TCP)
    }

    fn set(keys: &[EndpointKey]) -> BTreeSet<EndpointKey> {
        keys.iter().copied().collect()
    }

    /// The set holds exactly the endpoints of the programmed frontends: an
    /// endpoint shared by two frontends (and by a frontend's in-cluster
    /// view) stays until the last one lets it go; one sync writes only
    /// what entered or left.
    #[test]
    fn the_set_follows_the_programmed_backends_counting_shared_endpoints_once() {
        let mut s = Syncer::new(Set::default());
        assert_eq!(s.track_endpoints(true).unwrap(), 0);
        let mut d = Desired::default();
        d.frontends.insert(key(1, 80), frontend(&[(1, 8080), (2, 8080)]));
        d.frontends.insert(key(2, 80), frontend(&[(2, 8080), (3, 9090)]));
        let mut view = key(2, 80);
        view.family |= KEY_IN_CLUSTER;
        d.frontends.insert(view, frontend(&[(3, 9090)]));
        assert!(s.apply(&d).errors.is_empty());
        assert_eq!(s.writer().keys, set(&[ep(1, 8080), ep(2, 8080), ep(3, 9090)]));
        assert_eq!((s.endpoint_count(), s.writer().puts), (3, 3));

        // 2:8080 still backs the first frontend; 3:9090 the view.
        d.frontends.insert(key(2, 80), frontend(&[(4, 8080)]));
        assert!(s.apply(&d).errors.is_empty());
        assert_eq!(
            s.writer().keys,
            set(&[ep(1, 8080), ep(2, 8080), ep(3, 9090), ep(4, 8080)])
        );
        assert_eq!(s.writer().puts, 4, "only the new endpoint written");

        d.frontends.remove(&key(1, 80));
        d.frontends.remove(&view);
        assert!(s.apply(&d).errors.is_empty());
        assert_eq!(s.writer().keys, set(&[ep(4, 8080)]));
    }

    /// Turned on over a map an earlier agent left (adoption): entries of
    /// no programmed endpoint go, missing ones come; a failed write is
    /// made whole at the next sync; turned off, the set is emptied and no
    /// longer followed.
    #[test]
    fn the_set_is_written_whole_when_turned_on_and_after_a_failure_and_emptied_when_off() {
        let mut s = Syncer::new(Set::default());
        let mut d = Desired::default();
        d.frontends.insert(key(1, 80), frontend(&[(1, 8080)]));
        assert!(s.apply(&d).errors.is_empty());
        assert!(s.writer().keys.is_empty(), "not kept until turned on");
        s.writer_mut().keys.insert(ep(9, 1));
        assert_eq!(s.track_endpoints(true).unwrap(), 1);
        assert_eq!(s.writer().keys, set(&[ep(1, 8080)]));

        s.writer_mut().fail = true;
        d.frontends.insert(key(2, 80), frontend(&[(2, 8080)]));
        let r = s.apply(&d);
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert!(r.errors[0].cause.contains(map_names::ENDPOINTS), "{r:?}");
        s.writer_mut().fail = false;
        d.frontends.remove(&key(1, 80));
        assert!(s.apply(&d).errors.is_empty());
        assert_eq!(s.writer().keys, set(&[ep(2, 8080)]));

        assert_eq!(s.track_endpoints(false).unwrap(), 0);
        assert!(s.writer().keys.is_empty());
        d.frontends.insert(key(3, 80), frontend(&[(3, 8080)]));
        assert!(s.apply(&d).errors.is_empty());
        assert!(s.writer().keys.is_empty());
    }
}
