//! Capacities of the maps that grow with the cluster, chosen at load time
//! (`EbpfLoader::set_max_entries`). The defaults are `dataplane_common::limits`.

use dataplane_common::{limits, map_names};

/// max_entries of the sized maps. The service capacity covers the service
/// map, the per-service counters and the service names together (they are
/// indexed by the same service ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub maglev_chunks: u32,
    pub conntrack: u32,
    pub affinity: u32,
    pub source_ranges: u32,
    pub sock_nat: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            services: limits::MAX_SERVICES,
            backends: limits::MAX_BACKEND_SLOTS,
            maglev_chunks: limits::MAX_MAGLEV_CHUNKS,
            conntrack: limits::MAX_CONNTRACK,
            affinity: limits::MAX_AFFINITY,
            source_ranges: limits::MAX_SOURCE_RANGES,
            sock_nat: limits::MAX_SOCK_NAT,
        }
    }
}

impl MapSizes {
    /// The configured max_entries of map `name`, or `None` for the maps
    /// whose size is fixed (config, drop reasons).
    pub fn max_entries(&self, name: &str) -> Option<u32> {
        Some(match name {
            map_names::SERVICES | map_names::SERVICE_STATS | map_names::NAMES => self.services,
            // Every endpoint in the set has a backend slot.
            map_names::BACKENDS | map_names::ENDPOINTS => self.backends,
            map_names::MAGLEV => self.maglev_chunks,
            map_names::CONNTRACK => self.conntrack,
            map_names::AFFINITY | map_names::SOCK_AFFINITY => self.affinity,
            map_names::SOCK_NAT => self.sock_nat,
            map_names::SOURCE_RANGES => self.source_ranges,
            _ => return None,
        })
    }

    /// Every size at least 1 (the kernel refuses empty maps).
    pub fn validate(&self) -> Result<(), String> {
        for (flag, v) in [
            ("--services-max-entries", self.services),
            ("--backends-max-entries", self.backends),
            ("--maglev-max-chunks", self.maglev_chunks),
            ("--ct-max-entries", self.conntrack),
            ("--affinity-max-entries", self.affinity),
            ("--source-ranges-max-entries", self.source_ranges),
            ("--sock-nat-max-entries", self.sock_nat),
        ] {
            if v == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use dataplane_common::map_shapes;

    use super::*;

    #[test]
    fn defaults_are_the_compiled_shapes() {
        let d = MapSizes::default();
        for s in &map_shapes::ALL {
            assert_eq!(
                d.max_entries(s.name).unwrap_or(s.max_entries),
                s.max_entries,
                "{}",
                s.name
            );
        }
    }
}
