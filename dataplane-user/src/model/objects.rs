//! What the agent keeps of each Service and EndpointSlice: the fields the
//! model reads, and nothing else.
//!
//! The sources convert every object as it arrives (a watch event, a
//! manifest file) and keep only these records. The API types hold every
//! field of the object, most of them unused here: a `Service` is 824 bytes
//! before its strings, an `EndpointSlice` 432 plus 352 per endpoint, and
//! metadata (labels, annotations, owner references) comes on top. At
//! 100,000 Services that was most of the agent's memory. kube-proxy does
//! the same conversion (`pkg/proxy/servicechangetracker.go`,
//! `endpointslicecache.go`) for the same reason.
//!
//! The conversion only selects and shrinks: it keeps the text of every
//! field the model validates, so the model reports the same problems, in
//! the same words, as it would from the API objects.

use std::{
    borrow::Cow,
    collections::HashSet,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{not_ours, SERVICE_NAME_LABEL};

/// Text that is nearly always one of a few API values (a Service type, a
/// protocol, a policy): those are kept without an allocation.
pub type Word = Cow<'static, str>;

fn word(s: String, known: &[&'static str]) -> Word {
    match known.iter().find(|k| **k == s) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(s),
    }
}

const SERVICE_TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP"];
const POLICIES: &[&str] = &["Cluster", "Local"];
const AFFINITIES: &[&str] = &["None", "ClientIP"];
const ADDRESS_TYPES: &[&str] = &["IPv4", "IPv6", "FQDN"];

/// An address field: parsed when it is an address in its canonical form,
/// its text otherwise (parsed again where it is used, so an invalid one is
/// reported with its own text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    Ip(IpAddr),
    Text(Box<str>),
}

impl Addr {
    pub fn new(s: String) -> Self {
        match s.parse::<IpAddr>() {
            Ok(ip) if ip.to_string() == s => Addr::Ip(ip),
            _ => Addr::Text(s.into()),
        }
    }

    /// The address, or its text when it is not one.
    pub fn parse(&self) -> Result<IpAddr, &str> {
        match self {
            Addr::Ip(ip) => Ok(*ip),
            Addr::Text(t) => t.parse().map_err(|_| &**t),
        }
    }

    /// The field's text, as the object had it.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            Addr::Ip(ip) => Cow::Owned(ip.to_string()),
            Addr::Text(t) => Cow::Borrowed(t),
        }
    }
}

fn addrs(v: Option<Vec<String>>) -> Box<[Addr]> {
    v.into_iter().flatten().map(Addr::new).collect()
}

fn boxed(v: Option<Vec<String>>) -> Box<[Box<str>]> {
    v.into_iter().flatten().map(Into::into).collect()
}

/// A Service, as the model reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    /// `metadata.namespace`, "default" when unset.
    pub namespace: Box<str>,
    pub name: Option<Box<str>>,
    /// It carries one of [`super::NOT_OURS_LABELS`].
    pub not_ours: bool,
    pub spec: Option<Box<ServiceSpecRecord>>,
    /// `status.loadBalancer.ingress[].ip`, without the `ipMode: Proxy`
    /// ones (the load balancer proxies to the nodes itself; kube-proxy
    /// does not program those either).
    pub ingress_ips: Box<[Addr]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpecRecord {
    pub type_: Option<Word>,
    /// `clusterIPs`, or `clusterIP` when that list is unset or empty.
    pub cluster_ips: Box<[Addr]>,
    pub session_affinity: Option<Word>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout_s: Option<i32>,
    pub external_ips: Box<[Addr]>,
    pub load_balancer_source_ranges: Box<[Box<str>]>,
    pub ports: Box<[ServicePortRecord]>,
    pub internal_traffic_policy: Option<Word>,
    pub external_traffic_policy: Option<Word>,
    pub health_check_node_port: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortRecord {
    /// "" when unnamed.
    pub name: Box<str>,
    pub protocol: Option<Word>,
    pub port: i32,
    pub node_port: Option<i32>,
}

/// An EndpointSlice, as the model reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceRecord {
    /// `metadata.namespace`, "default" when unset.
    pub namespace: Box<str>,
    pub name: Option<Box<str>>,
    /// It carries one of [`super::NOT_OURS_LABELS`].
    pub not_ours: bool,
    /// Its [`SERVICE_NAME_LABEL`].
    pub service_name: Option<Box<str>>,
    pub address_type: Word,
    pub ports: Box<[SlicePortRecord]>,
    pub endpoints: Box<[EndpointRecord]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortRecord {
    /// "" when unnamed.
    pub name: Box<str>,
    pub protocol: Option<Word>,
    pub port: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRecord {
    /// The first of `addresses` (the only one the API allows and
    /// consumers read); `None` when the list is empty.
    pub address: Option<Addr>,
    /// Shared by every endpoint on the node ([`node_name`]).
    pub node_name: Option<Arc<str>>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    /// `None` when the endpoint has no hints (most have none).
    pub hints: Option<Box<Hints>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// `hints.forNodes[].name`.
    pub for_nodes: Box<[Box<str>]>,
    /// `hints.forZones[].name`.
    pub for_zones: Box<[Box<str>]>,
}

/// Node names, each held once however many endpoints name it (a cluster
/// has few nodes and many endpoints: 400,000 copies of a handful of names
/// otherwise). Names no endpoint holds any more are dropped whenever the
/// set has doubled since the last sweep.
struct Names {
    set: HashSet<Arc<str>>,
    sweep_at: usize,
}

/// The shared copy of the node name `name`.
pub fn node_name(name: String) -> Arc<str> {
    static NAMES: Mutex<Option<Names>> = Mutex::new(None);
    let mut guard = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    let names = guard.get_or_insert_with(|| Names {
        set: HashSet::new(),
        sweep_at: 1024,
    });
    if let Some(n) = names.set.get(name.as_str()) {
        return n.clone();
    }
    if names.set.len() >= names.sweep_at {
        names.set.retain(|n| Arc::strong_count(n) > 1);
        names.sweep_at = (names.set.len() * 2).max(1024);
    }
    let n: Arc<str> = name.into();
    names.set.insert(n.clone());
    n
}

impl ServiceRecord {
    /// The key sources index objects by ([`super::object_key`]).
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name.as_deref().unwrap_or(""))
    }

    /// (namespace, name): the conflict order; `None` when unnamed.
    pub fn ns_name(&self) -> Option<(String, String)> {
        Some((self.namespace.to_string(), self.name.as_deref()?.to_string()))
    }
}

impl SliceRecord {
    /// The key sources index objects by ([`super::object_key`]).
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name.as_deref().unwrap_or(""))
    }

    /// The object key of the Service it belongs to, by its label.
    pub fn owner_key(&self) -> Option<String> {
        Some(format!("{}/{}", self.namespace, self.service_name.as_deref()?))
    }
}

impl From<Service> for ServiceRecord {
    fn from(svc: Service) -> Self {
        let not_ours = not_ours(&svc.metadata);
        let md = svc.metadata;
        let ingress_ips = svc
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|l| l.ingress)
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip)
            .map(Addr::new)
            .collect();
        let spec = svc.spec.map(|spec| {
            let cluster_ips = match spec.cluster_ips {
                Some(ips) if !ips.is_empty() => ips,
                _ => spec.cluster_ip.into_iter().collect(),
            };
            Box::new(ServiceSpecRecord {
                type_: spec.type_.map(|t| word(t, SERVICE_TYPES)),
                cluster_ips: addrs(Some(cluster_ips)),
                session_affinity: spec.session_affinity.map(|a| word(a, AFFINITIES)),
                affinity_timeout_s: spec
                    .session_affinity_config
                    .and_then(|c| c.client_ip)
                    .and_then(|c| c.timeout_seconds),
                external_ips: addrs(spec.external_ips),
                load_balancer_source_ranges: boxed(spec.load_balancer_source_ranges),
                ports: (spec.ports.into_iter().flatten())
                    .map(|p| ServicePortRecord {
                        name: p.name.unwrap_or_default().into(),
                        protocol: p.protocol.map(|p| word(p, PROTOCOLS)),
                        port: p.port,
                        node_port: p.node_port,
                    })
                    .collect(),
                internal_traffic_policy: spec.internal_traffic_policy.map(|p| word(p, POLICIES)),
                external_traffic_policy: spec.external_traffic_policy.map(|p| word(p, POLICIES)),
                health_check_node_port: spec.health_check_node_port,
            })
        });
        ServiceRecord {
            namespace: md.namespace.unwrap_or_else(|| "default".into()).into(),
            name: md.name.map(Into::into),
            not_ours,
            spec,
            ingress_ips,
        }
    }
}

impl From<&Service> for ServiceRecord {
    fn from(svc: &Service) -> Self {
        svc.clone().into()
    }
}

impl From<EndpointSlice> for SliceRecord {
    fn from(s: EndpointSlice) -> Self {
        let not_ours = not_ours(&s.metadata);
        let service_name = s
            .metadata
            .labels
            .and_then(|mut l| l.remove(SERVICE_NAME_LABEL))
            .map(Into::into);
        SliceRecord {
            namespace: s.metadata.namespace.unwrap_or_else(|| "default".into()).into(),
            name: s.metadata.name.map(Into::into),
            not_ours,
            service_name,
            address_type: word(s.address_type, ADDRESS_TYPES),
            ports: (s.ports.into_iter().flatten())
                .map(|p| SlicePortRecord {
                    name: p.name.unwrap_or_default().into(),
                    protocol: p.protocol.map(|p| word(p, PROTOCOLS)),
                    port: p.port,
                })
                .collect(),
            endpoints: s
                .endpoints
                .into_iter()
                .map(|ep| {
                    let c = ep.conditions.unwrap_or_default();
                    let hints = ep
                        .hints
                        .map(|h| Hints {
                            for_nodes: h.for_nodes.into_iter().flatten().map(|n| n.name.into()).collect(),
                            for_zones: h.for_zones.into_iter().flatten().map(|z| z.name.into()).collect(),
                        })
                        .filter(|h| !h.for_nodes.is_empty() || !h.for_zones.is_empty())
                        .map(Box::new);
                    EndpointRecord {
                        address: ep.addresses.into_iter().next().map(Addr::new),
                        node_name: ep.node_name.map(node_name),
                        ready: c.ready,
                        serving: c.serving,
                        terminating: c.terminating,
                        hints,
                    }
                })
                .collect(),
        }
    }
}

impl From<&EndpointSlice> for SliceRecord {
    fn from(s: &EndpointSlice) -> Self {
        s.clone().into()
    }
}

/// Records of API objects (tests and tools that hold API objects).
pub fn records<'a, K: 'a, R: From<&'a K>>(objects: &'a [K]) -> Vec<R> {
    objects.iter().map(R::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Endpoints on one node share one copy of its name, and names still
    /// held survive the sweeps that more distinct names trigger.
    #[test]
    fn node_names_are_shared_and_swept() {
        let a = node_name("objects-test-node-a".into());
        let b = node_name(String::from("objects-test-node-a"));
        assert!(Arc::ptr_eq(&a, &b));
        // More distinct names than a sweep threshold: held ones survive.
        let held: Vec<Arc<str>> = (0..3000).map(|i| node_name(format!("objects-test-{i}"))).collect();
        for (i, n) in held.iter().enumerate() {
            assert!(Arc::ptr_eq(n, &node_name(format!("objects-test-{i}"))));
        }
        assert!(Arc::ptr_eq(&a, &node_name("objects-test-node-a".into())));
        assert_eq!(&*a, "objects-test-node-a");
    }
}
