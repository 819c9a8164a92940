//! Adopting the maps a previous agent left pinned: the programmed state is
//! rebuilt from them instead of wiping them.

use super::*;

/// What adopting pinned maps found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AdoptReport {
    pub frontends: usize,
    pub backends: usize,
    /// Backend slots and Maglev chunks no service pointed at (a generation
    /// half written when the previous agent stopped), deleted.
    pub stale_removed: usize,
    /// Bits the backend filter lacked for the flows and backends found
    /// (see `Maps::fill_backend_filter`): nonzero after an upgrade from a
    /// release without the filter.
    pub backend_filter_set: usize,
    /// Frontends the rebuilt frontend cache holds (see
    /// `Maps::fill_frontend_cache`).
    pub frontends_cached: usize,
    /// Bits set in the rewritten frontend filter (see
    /// `Syncer::rewrite_frontend_filter`).
    pub frontend_filter_bits: usize,
}

impl Syncer<crate::bpf::loader::Maps> {
    /// Rebuilds the programmed state from maps a previous agent left pinned,
    /// instead of wiping them: the next `apply` then writes only what
    /// changed meanwhile. Entries no service points at are deleted.
    pub fn adopt(maps: crate::bpf::loader::Maps, config: SyncConfig) -> Result<(Self, AdoptReport), WriteError> {
        let mut report = AdoptReport::default();
        let mut programmed = BTreeMap::new();
        let services: Vec<(ServiceKey, ServiceValue)> =
            maps.services
                .iter()
                .collect::<Result<_, _>>()
                .map_err(|source| WriteError::Map {
                    map: map_names::SERVICES,
                    source,
                })?;
        let mut live: BTreeMap<u32, ServiceValue> = BTreeMap::new();
        let mut ranges: BTreeMap<u32, Vec<(std::net::IpAddr, u8)>> = BTreeMap::new();
        // A range has the family of its service.
        let families: BTreeMap<u32, u8> = services
            .iter()
            .map(|(k, v)| (v.service_id, dataplane_common::family_of(k.ip())))
            .collect();
        for key in maps.source_ranges.keys() {
            let key = key.map_err(|source| WriteError::Map {
                map: map_names::SOURCE_RANGES,
                source,
            })?;
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
        let mut maps = maps;
        // Before the programs of this release are attached (see
        // `Maps::fill_frontend_cache`).
        report.frontends_cached = maps.fill_frontend_cache(&services)?;
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
                    frontend: std::sync::Arc::new(Frontend {
                        service,
                        port_name,
                        backends,
                        affinity_timeout_s,
                        flags: value.flags & FRONTEND_FLAGS,
                        source_ranges: ranges.remove(&value.service_id).unwrap_or_default(),
                        also_serving: Vec::new(),
                    }),
                },
            );
        }
        report.frontends = programmed.len();

        let current_slot = |k: &BackendKey| {
            live.get(&k.service_id).is_some_and(|v| {
                let (generation, index) = k.generation_and_index();
                generation == v.generation & 1 && index < v.backend_count as u32
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

        report.backend_filter_set = maps.fill_backend_filter()?;

        let mut syncer = Syncer::with_config(maps, config);
        let used: std::collections::BTreeSet<u32> = live.keys().copied().collect();
        syncer.next_id = used.iter().next_back().map_or(0, |m| m + 1);
        syncer.free_ids = (0..syncer.next_id).filter(|i| !used.contains(i)).rev().collect();
        syncer.set_all_programmed(programmed);
        report.frontend_filter_bits = syncer.rewrite_frontend_filter()?;
        // Epochs keep growing across agents: a new backend set never
        // takes the epoch of one its conntrack entries were made under.
        syncer.epoch = live.values().map(|v| v.epoch).max().unwrap_or(0);
        // The filter holds what earlier agents' programs set: narrowed at
        // the first sync (see `MapWriter::narrow_backend_filter`).
        syncer.filter_stale = true;
        Ok((syncer, report))
    }
}
