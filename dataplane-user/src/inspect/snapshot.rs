//! What `/metrics` shows of the datapath, read in batches: the counters
//! the programs keep (per-CPU arrays, one `BPF_MAP_LOOKUP_BATCH` call
//! each), the entries of the maps the programs write (LRU hashes, counted
//! 4096 entries per call), and, when asked for, the per-frontend counters.
//! The metrics take one of these on a timer and render the last one at
//! every scrape; the entries of the maps the agent writes come from the
//! agent's own record ([`crate::state::ProgrammedEntries`]), not from here.

use std::{collections::HashMap, os::fd::AsFd, time::SystemTime};

use aya::maps::IterableMap;
use dataplane_common::{
    counters, map_names, AffinityKey, AffinityValue, CtEvent, CtKey, CtValue, Reason, RouteEvent, ServiceKey,
    ServiceName, ServiceStats, ServiceValue, SockAffinityKey, SockEvent, SockNatKey, SockNatValue,
};

use super::{frontend, EventRow, InspectError, ReasonRow};
use crate::bpf::{batch, loader::Maps};

/// One frontend's counters, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceCounters {
    /// `namespace/name:port` (empty if the agent wrote none).
    pub name: String,
    /// `vip:port/proto`.
    pub frontend: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub no_backend: u64,
}

/// The datapath's side of the metrics at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// When the read started.
    pub taken_at: SystemTime,
    /// How long the read took.
    pub took: std::time::Duration,
    pub reasons: Vec<ReasonRow>,
    pub conntrack_events: Vec<EventRow>,
    pub host_routing: Vec<EventRow>,
    pub socket_lb: Vec<EventRow>,
    /// Conntrack entries written for new flows, and of those the ones
    /// written over an existing (expired or closed) entry.
    pub conntrack_created: u64,
    pub conntrack_replaced: u64,
    /// Entries of the maps the programs write (LRU hashes), by map name.
    pub datapath_entries: Vec<(&'static str, u64)>,
    /// Per-frontend counters, sorted by VIP, port, protocol; `None` when
    /// not asked for.
    pub services: Option<Vec<ServiceCounters>>,
    /// The kernel memory of every map this process holds, by name.
    pub map_memory: Vec<crate::bpf::mapmem::MapMemory>,
}

impl Snapshot {
    /// Entries of `map` (one of [`Snapshot::datapath_entries`]).
    pub fn entries(&self, map: &str) -> Option<u64> {
        self.datapath_entries.iter().find(|(m, _)| *m == map).map(|(_, n)| *n)
    }

    pub fn conntrack_entries(&self) -> u64 {
        self.entries(map_names::CONNTRACK).unwrap_or(0)
    }

    /// Entries the LRU evicted to make room: created, minus those written
    /// over an existing entry, minus those present.
    pub fn conntrack_evicted(&self) -> u64 {
        evicted(
            self.conntrack_created,
            self.conntrack_replaced,
            self.conntrack_entries(),
        )
    }
}

pub(super) fn evicted(created: u64, replaced: u64, present: u64) -> u64 {
    created.saturating_sub(replaced).saturating_sub(present)
}

/// Reads a [`Snapshot`] from `maps`: about 8 + (conntrack + affinity +
/// socket entries) / 4096 `bpf(2)` calls, plus, with `per_service`, the
/// services and names in batches of 4096 and the per-frontend counters
/// in batches of at most 1 MiB. `cpus`: the possible CPUs (the size of a
/// per-CPU value).
pub fn read(maps: &Maps, cpus: usize, per_service: bool) -> Result<Snapshot, InspectError> {
    let taken_at = SystemTime::now();
    let started = std::time::Instant::now();
    let reasons = counter_sums(maps.reasons.map(), map_names::REASON_STATS, cpus)?;
    let events = |map: &aya::maps::MapData, name: &'static str, all: &mut dyn Iterator<Item = (u32, &'static str)>| {
        let sums = counter_sums(map, name, cpus)?;
        Ok::<_, InspectError>(
            all.map(|(i, event)| EventRow {
                event: event.into(),
                count: sums.get(i as usize).copied().unwrap_or(0),
            })
            .collect(),
        )
    };
    let conntrack_events = events(
        maps.ct_events.map(),
        map_names::CT_EVENTS,
        &mut CtEvent::ALL.iter().map(|e| (*e as u32, e.name())),
    )?;
    let host_routing = events(
        maps.route_events.map(),
        map_names::ROUTE_EVENTS,
        &mut RouteEvent::ALL.iter().map(|e| (*e as u32, e.name())),
    )?;
    let socket_lb = events(
        maps.sock_stats.map(),
        map_names::SOCK_STATS,
        &mut SockEvent::ALL.iter().map(|e| (*e as u32, e.name())),
    )?;
    let count_err = |name: &'static str| move |source| InspectError::ReadBatch { name, source };
    let datapath_entries = vec![
        (
            map_names::CONNTRACK,
            batch::count::<CtKey, CtValue>(maps.conntrack.map().fd().as_fd())
                .map_err(count_err(map_names::CONNTRACK))?,
        ),
        (
            map_names::AFFINITY,
            batch::count::<AffinityKey, AffinityValue>(maps.affinity.map().fd().as_fd())
                .map_err(count_err(map_names::AFFINITY))?,
        ),
        (
            map_names::SOCK_NAT,
            batch::count::<SockNatKey, SockNatValue>(maps.sock_nat.map().fd().as_fd())
                .map_err(count_err(map_names::SOCK_NAT))?,
        ),
        (
            map_names::SOCK_AFFINITY,
            batch::count::<SockAffinityKey, AffinityValue>(maps.sock_affinity.map().fd().as_fd())
                .map_err(count_err(map_names::SOCK_AFFINITY))?,
        ),
    ]
    .into_iter()
    .map(|(m, n)| (m, n as u64))
    .collect();
    let services = match per_service {
        true => Some(service_counters(maps, cpus)?),
        false => None,
    };
    let map_memory = crate::bpf::mapmem::of_process().map_err(|e| InspectError::Fdinfo {
        map: "(every map)",
        error: e.to_string(),
    })?;
    let at = |i: u32| reasons.get(i as usize).copied().unwrap_or(0);
    Ok(Snapshot {
        taken_at,
        took: started.elapsed(),
        reasons: Reason::ALL
            .iter()
            .map(|r| ReasonRow {
                reason: r.name().into(),
                drop: r.is_drop(),
                packets: at(*r as u32),
            })
            .collect(),
        conntrack_events,
        host_routing,
        socket_lb,
        conntrack_created: at(counters::CT_CREATED),
        conntrack_replaced: at(counters::CT_REPLACED),
        datapath_entries,
        services,
        map_memory,
    })
}

/// Every entry of a per-CPU array of u64 counters, summed over CPUs, in
/// one batch call (these arrays hold a few dozen entries).
fn counter_sums(map: &aya::maps::MapData, name: &'static str, cpus: usize) -> Result<Vec<u64>, InspectError> {
    let len = map
        .info()
        .map_err(|source| InspectError::Read { name, source })?
        .max_entries();
    let mut sums = vec![0u64; len as usize];
    batch::percpu_array::<u64>(map.fd().as_fd(), len, cpus, |i, v| {
        sums[i as usize] = v.iter().sum();
    })
    .map_err(|source| InspectError::ReadBatch { name, source })?;
    Ok(sums)
}

/// Every frontend's counters: the services and names in batches, then
/// the counters of the ids in use (ids are allocated from 0 up and
/// reused, so `0..=max id` is about the number of frontends).
fn service_counters(maps: &Maps, cpus: usize) -> Result<Vec<ServiceCounters>, InspectError> {
    let err = |name: &'static str| move |source| InspectError::ReadBatch { name, source };
    let mut services = batch::lookup_all::<ServiceKey, ServiceValue>(maps.services.map().fd().as_fd())
        .map_err(err(map_names::SERVICES))?;
    services.sort_by_key(|(k, _)| (k.ip(), k.host_port(), k.proto));
    let names: HashMap<u32, ServiceName> = batch::lookup_all::<u32, ServiceName>(maps.names.map().fd().as_fd())
        .map_err(err(map_names::NAMES))?
        .into_iter()
        .collect();
    let ids = services.iter().map(|(_, v)| v.service_id + 1).max().unwrap_or(0);
    let mut stats = vec![ServiceStats::default(); ids as usize];
    batch::percpu_array::<ServiceStats>(maps.service_stats.map().fd().as_fd(), ids, cpus, |i, per_cpu| {
        stats[i as usize] = sum(per_cpu);
    })
    .map_err(err(map_names::SERVICE_STATS))?;
    Ok(services
        .iter()
        .map(|(k, v)| {
            let s = stats.get(v.service_id as usize).copied().unwrap_or_default();
            ServiceCounters {
                name: names
                    .get(&v.service_id)
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default(),
                frontend: frontend(k),
                packets: s.packets,
                bytes: s.bytes,
                new_flows: s.new_flows,
                no_backend: s.no_backend,
            }
        })
        .collect())
}

/// One frontend's counters summed over CPUs.
fn sum(per_cpu: &[ServiceStats]) -> ServiceStats {
    per_cpu.iter().fold(ServiceStats::default(), |a, s| ServiceStats {
        packets: a.packets + s.packets,
        bytes: a.bytes + s.bytes,
        new_flows: a.new_flows + s.new_flows,
        no_backend: a.no_backend + s.no_backend,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_cpu_counters_are_summed_field_by_field() {
        let a = ServiceStats {
            packets: 1,
            bytes: 40,
            new_flows: 1,
            no_backend: 0,
        };
        let b = ServiceStats {
            packets: 2,
            bytes: 100,
            new_flows: 0,
            no_backend: 3,
        };
        assert_eq!(
            sum(&[a, b, ServiceStats::default()]),
            ServiceStats {
                packets: 3,
                bytes: 140,
                new_flows: 1,
                no_backend: 3
            }
        );
    }

    #[test]
    fn evictions_never_go_below_zero() {
        assert_eq!(evicted(10, 2, 4), 4);
        // Entries present that were created before the counters (an
        // adopted map after a migration) do not make it negative.
        assert_eq!(evicted(2, 0, 6), 0);
    }
}
