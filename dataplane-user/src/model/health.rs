//! The health-check ports of `externalTrafficPolicy: Local` LoadBalancer
//! Services (`spec.healthCheckNodePort`), as kube-proxy serves them
//! (`pkg/proxy/healthcheck/service_health.go`): cloud load balancers probe
//! the port on every node and send traffic only to nodes answering 200,
//! i.e. nodes with a local ready endpoint.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    compute::{ns_name, prepare_slice, protocol, valid_port},
    not_ours, NodeInfo, Problem, SERVICE_NAME_LABEL,
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

/// The health checks of `services` on `node`, ordered by namespace/name,
/// and the problems found: a port outside the node port range, or one
/// claimed by two Services (the first in namespace/name order keeps it).
pub fn health_checks(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeInfo,
) -> (Vec<HealthCheck>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut wanted: BTreeMap<Named, (u16, Vec<(String, u8)>)> = BTreeMap::new();
    for svc in services.iter().filter(|s| !not_ours(&s.metadata)) {
        let (Some((ns, name)), Some(spec)) = (ns_name(&svc.metadata), svc.spec.as_ref()) else {
            continue;
        };
        let local = spec.external_traffic_policy.as_deref() == Some("Local");
        let (true, true, Some(port)) = (
            spec.type_.as_deref() == Some("LoadBalancer"),
            local,
            spec.health_check_node_port,
        ) else {
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
        let ports = spec.ports.iter().flatten();
        let ports = ports.filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                protocol(p.protocol.as_deref()).ok()?,
            ))
        });
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
    let mut local: HashMap<Named, BTreeSet<LocalEndpoint>> = HashMap::new();
    let mut ignore = |_: String, _: String| {}; // the frontends report slice problems
    let keys: HashSet<(&str, &str)> = wanted.keys().map(|(ns, n)| (ns.as_str(), n.as_str())).collect();
    for s in slices {
        // Most slices belong to other Services: the label decides before
        // the endpoints are read.
        let svc = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL));
        let ns = s.metadata.namespace.as_deref().unwrap_or("default");
        if !svc.is_some_and(|svc| keys.contains(&(ns, svc.as_str()))) {
            continue;
        }
        let Some(((ns, svc), slice)) = prepare_slice(s, &mut ignore) else {
            continue;
        };
        let key = (ns, svc);
        let Some((_, ports)) = wanted.get(&key) else {
            continue;
        };
        for sp in slice.obj.ports.iter().flatten() {
            let (pname, Ok(proto)) = (sp.name.clone().unwrap_or_default(), protocol(sp.protocol.as_deref())) else {
                continue;
            };
            if !ports.contains(&(pname.clone(), proto)) {
                continue;
            }
            let eps = slice
                .endpoints
                .iter()
                .filter(|e| e.ready && node.is_local(e.node_name.as_deref()));
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
