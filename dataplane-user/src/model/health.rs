//! The health-check ports of `externalTrafficPolicy: Local` LoadBalancer
//! Services (`spec.healthCheckNodePort`), as kube-proxy serves them
//! (`pkg/proxy/healthcheck/service_health.go`): cloud load balancers probe
//! the port on every node and send traffic only to nodes answering 200,
//! i.e. nodes with a local ready endpoint.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::{
    compute::{prepare_slice, protocol, valid_port},
    NodeInfo, Problem, ServiceRecord, SliceRecord, Tracked,
};

/// One health-check port to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    /// Ready endpoints on this node, counted once per Service port they
    /// serve (kube-proxy's `LocalReadyEndpoints`: a two-port Service with
    /// one local pod reports 2).
    pub local_endpoints: usize,
}

/// (namespace, name) of a Service.
type Named = (String, String);
/// (port name, protocol, address, port number) of a local endpoint.
type LocalEndpoint = (String, u8, std::net::IpAddr, i32);

/// The health-check port `svc` asks for: a LoadBalancer Service of ours
/// with `externalTrafficPolicy: Local` and a `healthCheckNodePort`.
fn asked_port(svc: &ServiceRecord) -> Option<i32> {
    let spec = svc.spec.as_ref().filter(|_| !svc.not_ours)?;
    let lb_local =
        spec.type_.as_deref() == Some("LoadBalancer") && spec.external_traffic_policy.as_deref() == Some("Local");
    spec.health_check_node_port.filter(|_| lb_local)
}

/// The health checks of `services` on `node`, ordered by namespace/name,
/// and the problems found: a port outside the node port range, or one
/// claimed by two Services (the first in namespace/name order keeps it).
pub fn health_checks(
    services: &[ServiceRecord],
    slices: &[SliceRecord],
    node: &NodeInfo,
) -> (Vec<HealthCheck>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut wanted: BTreeMap<Named, (u16, Vec<(String, u8)>)> = BTreeMap::new();
    for svc in services {
        let Some(port) = asked_port(svc) else { continue };
        let (Some((ns, name)), Some(spec)) = (svc.ns_name(), svc.spec.as_ref()) else {
            continue;
        };
        let (lo, hi) = node.node_port_range;
        let Some(port) = valid_port(port).filter(|p| (lo..=hi).contains(p)) else {
            problems.push(Problem {
                object: format!("Service {ns}/{name}"),
                reason: format!("healthCheckNodePort {port} is outside the node port range {lo}-{hi}; not served"),
            });
            continue;
        };
        let ports = spec.ports.iter();
        let ports = ports.filter_map(|p| Some((p.name.to_string(), protocol(p.protocol.as_deref()).ok()?)));
        wanted.insert((ns, name), (port, ports.collect()));
    }
    let mut owners: BTreeMap<u16, (String, String)> = BTreeMap::new();
    wanted.retain(|key, (port, _)| match owners.get(port) {
        Some((ns, name)) => {
            problems.push(Problem {
                object: format!("Service {}/{}", key.0, key.1),
                reason: format!("healthCheckNodePort {port} is already the one of Service {ns}/{name}; not served"),
            });
            false
        }
        None => {
            owners.insert(*port, key.clone());
            true
        }
    });

    // Local ready endpoints per (Service, port name, protocol), each
    // (address, port) once however many slices list it.
    if wanted.is_empty() {
        return (Vec::new(), problems);
    }
    let mut local: HashMap<Named, BTreeSet<LocalEndpoint>> = HashMap::new();
    let mut ignore = |_: String, _: String| {}; // the frontends report slice problems
    let keys: HashSet<(&str, &str)> = wanted.keys().map(|(ns, n)| (ns.as_str(), n.as_str())).collect();
    for s in slices {
        // Most slices belong to other Services: the label decides before
        // the endpoints are read.
        let svc = s.service_name.as_deref();
        if !svc.is_some_and(|svc| keys.contains(&(&*s.namespace, svc))) {
            continue;
        }
        let Some(((ns, svc), slice)) = prepare_slice(s, &mut ignore) else {
            continue;
        };
        let key = (ns, svc);
        let Some((_, ports)) = wanted.get(&key) else {
            continue;
        };
        for sp in slice.obj.ports.iter() {
            let (pname, Ok(proto)) = (sp.name.to_string(), protocol(sp.protocol.as_deref())) else {
                continue;
            };
            if !ports.contains(&(pname.clone(), proto)) {
                continue;
            }
            let eps = slice.endpoints.iter().filter(|e| e.ready && node.is_local(e.node_name));
            let set = local.entry(key.clone()).or_default();
            set.extend(eps.map(|e| (pname.clone(), proto, e.addr, sp.port.unwrap_or(0))));
        }
    }
    let checks = wanted
        .into_iter()
        .map(|(key, (port, _))| HealthCheck {
            local_endpoints: local.get(&key).map_or(0, BTreeSet::len),
            namespace: key.0,
            name: key.1,
            port,
        })
        .collect();
    (checks, problems)
}

/// The health checks kept from one sync to the next. Computing them walks
/// every Service of the cluster (at 100,000 Services that is most of a
/// sync's time), so a sync that knows what changed ([`Tracked`]) computes
/// them again only when a change can touch them: a Service that asks for
/// a health-check port (or did), or a slice of one.
#[derive(Debug, Default)]
pub struct HealthCache {
    last: Option<(Vec<HealthCheck>, Vec<Problem>)>,
    /// Object keys of the Services that asked for a port at the last
    /// computation.
    services: HashSet<String>,
    /// Object keys of their slices.
    slices: HashSet<String>,
    /// Changes with every computation ([`super::next_version`]).
    version: u64,
}

impl HealthCache {
    /// [`health_checks`] of the objects, from the last computation when
    /// none of the changes `tracked` lists can make a difference.
    pub fn get(
        &mut self,
        services: &[ServiceRecord],
        slices: &[SliceRecord],
        node: &NodeInfo,
        tracked: Option<&Tracked<'_>>,
    ) -> (Vec<HealthCheck>, Vec<Problem>) {
        self.refresh(services, slices, node, tracked);
        (self.checks().to_vec(), self.problems().to_vec())
    }

    /// The health checks of the last [`HealthCache::refresh`].
    pub fn checks(&self) -> &[HealthCheck] {
        self.last.as_ref().map_or(&[], |l| &l.0)
    }

    /// The problems of the last [`HealthCache::refresh`].
    pub fn problems(&self) -> &[Problem] {
        self.last.as_ref().map_or(&[], |l| &l.1)
    }

    /// Differs from the previous value whenever the health checks or
    /// problems were computed again (they may be the same).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Brings [`HealthCache::checks`] and [`HealthCache::problems`] up to
    /// date, as [`HealthCache::get`] without the copy.
    pub fn refresh(
        &mut self,
        services: &[ServiceRecord],
        slices: &[SliceRecord],
        node: &NodeInfo,
        tracked: Option<&Tracked<'_>>,
    ) {
        let changes = tracked.and_then(|t| t.changed.map(|c| (t, c)));
        let reuse = match (&self.last, changes) {
            (Some(_), Some((t, (changed_services, changed_slices)))) => {
                let service_asks = |k: &String| {
                    self.services.contains(k)
                        || t.service_index
                            .get(k)
                            .is_some_and(|&i| asked_port(&services[i]).is_some())
                };
                let slice_counts = |k: &String| {
                    self.slices.contains(k)
                        || t.slice_index
                            .get(k)
                            .is_some_and(|&i| slices[i].owner_key().is_some_and(|o| self.services.contains(&o)))
                };
                !changed_services.iter().any(service_asks) && !changed_slices.iter().any(slice_counts)
            }
            _ => false,
        };
        if !reuse {
            self.services = services
                .iter()
                .filter(|s| asked_port(s).is_some())
                .map(|s| s.key())
                .collect();
            self.slices = slices
                .iter()
                .filter(|s| s.owner_key().is_some_and(|o| self.services.contains(&o)))
                .map(|s| s.key())
                .collect();
            self.last = Some(health_checks(services, slices, node));
            self.version = super::next_version();
        }
    }
}
