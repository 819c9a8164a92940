//! A second, read-only view of a loaded dataplane's service and backend
//! maps, so a test can check what the datapath would see while the sync
//! loop that owns the maps keeps running.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, IterableMap, Map, MapData};
use dataplane::bpf::loader::Maps;
use dataplane_common::{Backend, BackendKey, ServiceKey, ServiceValue};

/// A frontend as the datapath resolves it: (VIP, port, protocol) and the
/// backends of its current generation, in slot order.
pub type Programmed = BTreeMap<(IpAddr, u16, u8), Vec<(IpAddr, u16)>>;

pub struct MapView {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
}

fn reopen(map: &MapData) -> Result<MapData> {
    let id = map.info().context("reading map info")?.id();
    MapData::from_id(id).with_context(|| format!("opening map id {id}"))
}

impl MapView {
    /// Opens new handles on the maps behind `maps` (by map id).
    pub fn of(maps: &Maps) -> Result<MapView> {
        let services = reopen(IterableMap::map(&maps.services))?;
        let backends = reopen(IterableMap::map(&maps.backends))?;
        Ok(MapView {
            services: HashMap::try_from(Map::HashMap(services))?,
            backends: HashMap::try_from(Map::HashMap(backends))?,
        })
    }

    /// Every frontend with its current backends. Fails when a service entry
    /// points at a missing backend slot: the datapath would see a hole.
    pub fn dump(&self) -> Result<Programmed> {
        let mut out = BTreeMap::new();
        for entry in self.services.iter() {
            let (k, v) = entry?;
            let mut backends = Vec::new();
            for i in 0..u32::from(v.backend_count) {
                let slot = BackendKey::new(v.service_id, v.generation, i);
                let b = match self.backends.get(&slot, 0) {
                    Ok(b) => b,
                    Err(e) => bail!(
                        "{}:{} service id {} generation {}: slot {i} missing ({e})",
                        k.ip(),
                        k.host_port(),
                        v.service_id,
                        v.generation
                    ),
                };
                backends.push((b.ip(), b.host_port()));
            }
            out.insert((k.ip(), k.host_port(), k.proto), backends);
        }
        Ok(out)
    }

    /// Number of entries in the backend map (all generations).
    pub fn backend_slots(&self) -> usize {
        self.backends.keys().count()
    }
}
