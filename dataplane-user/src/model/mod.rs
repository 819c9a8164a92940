//! The model: a pure function from Services and EndpointSlices to the
//! frontends the maps must hold (the desired state), kept up to date
//! incrementally, and the Maglev tables of its backends.
//!
//! Every source (files, Kubernetes) feeds the same function, and the
//! reconciler diffs its output against what is programmed. Nothing here
//! touches the kernel: no aya, no maps, no syscalls.

mod compute;
mod conflicts;
mod health;
mod incremental;
pub mod maglev;
mod objects;
#[cfg(test)]
mod tests;

pub use compute::{compute, compute_for_node, parse_cidr};
pub use conflicts::ServiceFrontends;
pub use health::{health_checks, HealthCache, HealthCheck};
pub use incremental::{Incremental, Tracked};
pub use objects::{
    node_name, records, Addr, EndpointRecord, Hints, ServicePortRecord, ServiceRecord, ServiceSpecRecord,
    SlicePortRecord, SliceRecord, Word,
};

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use dataplane_common::{
    limits, Backend, ServiceKey, BACKEND_F_REMOTE, IPPROTO_TCP, IPPROTO_UDP, SVC_F_DROP_NO_LOCAL, SVC_F_EXTERNAL,
    SVC_F_IN_CLUSTER_VIEW, SVC_F_OTHER_PORTS, SVC_F_SOURCE_RANGES,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// A number no earlier call returned, for the versions of problem lists
/// (`Incremental::problems_version`, `HealthCache::version`).
pub fn next_version() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Labels that put a Service (and its EndpointSlices, which carry the
/// Service's labels) out of this proxy's hands, whatever their value, as
/// kube-proxy does: another proxy implementation owns Services labelled
/// `service.kubernetes.io/service-proxy-name`; `service.kubernetes.io/headless`
/// marks the slices of headless Services.
pub const NOT_OURS_LABELS: [&str; 2] = [
    "service.kubernetes.io/service-proxy-name",
    "service.kubernetes.io/headless",
];

/// The label selector for [`NOT_OURS_LABELS`] (objects without them), as
/// the Kubernetes source lists and watches with it.
pub const OURS_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether load balancers may keep sending traffic to this node, as
/// kube-proxy's `/healthz` decides it: not when the Node is being deleted
/// (`deletionTimestamp` set) or carries [`TO_BE_DELETED_TAINT`].
pub fn node_eligible(node: &k8s_openapi::api::core::v1::Node) -> bool {
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    node.metadata.deletion_timestamp.is_none() && !tainted
}

/// The label naming a node's zone, for `hints.forZones`.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A Node's [`ZONE_LABEL`].
pub fn node_zone(node: &k8s_openapi::api::core::v1::Node) -> Option<String> {
    node.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned()
}

/// Whether an object carries one of [`NOT_OURS_LABELS`]: it is left alone,
/// silently (kube-proxy never even receives it).
pub fn not_ours(md: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    md.labels
        .as_ref()
        .is_some_and(|l| NOT_OURS_LABELS.iter().any(|k| l.contains_key(*k)))
}

/// One frontend (VIP, port, protocol) and the backends new flows go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// `namespace/name` of the Service.
    pub service: String,
    /// The Service port's name ("" when the port is unnamed).
    pub port_name: String,
    /// Sorted, without duplicates, at most `MAX_BACKENDS_PER_SERVICE`.
    pub backends: Vec<Backend>,
    /// sessionAffinity ClientIP: its timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    /// `SVC_F_EXTERNAL`, `SVC_F_DROP_NO_LOCAL`, `SVC_F_SOURCE_RANGES`.
    pub flags: u32,
    /// loadBalancerSourceRanges (with `SVC_F_SOURCE_RANGES`): (network,
    /// prefix length), sorted.
    pub source_ranges: Vec<(IpAddr, u8)>,
    /// UDP only: endpoints not in `backends` that are still serving (ready
    /// ones a Local policy leaves out, terminating ones that still serve),
    /// sorted. A UDP flow whose backend is in neither list any more is
    /// cleared, as kube-proxy clears stale UDP conntrack entries; flows to
    /// these keep going. Not written to the maps.
    pub also_serving: Vec<Backend>,
}

/// What the desired state needs to know about the node the agent runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's name, to tell local endpoints (EndpointSlice `nodeName`)
    /// from remote ones. `None`: every endpoint counts as local (a single
    /// node, as in the file-source demo).
    pub name: Option<String>,
    /// Addresses NodePort Services are served on (either family).
    pub addresses: Vec<IpAddr>,
    /// The NodePort range (inclusive).
    pub node_port_range: (u16, u16),
    /// The node's `topology.kubernetes.io/zone` label, for zone hints.
    pub zone: Option<String>,
}

/// kube-apiserver's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: (u16, u16) = (30000, 32767);

impl Default for NodeInfo {
    fn default() -> Self {
        NodeInfo {
            name: None,
            addresses: Vec::new(),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            zone: None,
        }
    }
}

impl NodeInfo {
    fn is_local(&self, node_name: Option<&str>) -> bool {
        match &self.name {
            None => true,
            Some(me) => node_name == Some(me.as_str()),
        }
    }
}

/// kube's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The API's upper bound for that field (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

impl Frontend {
    /// `namespace/name:port` as shown in logs and tables.
    pub fn display_name(&self) -> String {
        if self.port_name.is_empty() {
            self.service.clone()
        } else {
            format!("{}:{}", self.service, self.port_name)
        }
    }

    /// The inverse of [`Frontend::display_name`]: (service, port name).
    pub fn split_display_name(name: &str) -> (String, String) {
        match name.rsplit_once(':') {
            Some((service, port)) => (service.to_string(), port.to_string()),
            None => (name.to_string(), String::new()),
        }
    }
}

/// An object, or part of one, that was skipped or cut, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// `Service shop/web`, `EndpointSlice shop/web-bad01`, a file name, ...
    pub object: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// The output of [`compute`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Shared with the syncer's record of what it programmed (one copy of
    /// each frontend, not two: 200,000 frontends are some 60 MB each).
    pub frontends: BTreeMap<ServiceKey, Arc<Frontend>>,
    /// Sorted and deduplicated.
    pub problems: Vec<Problem>,
}

/// "tcp" / "udp".
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        0 => "any",
        _ => "?",
    }
}

/// The key sources index objects by: `namespace/name`, with the namespace
/// defaulted as the desired state does (so a slice's Service is found under
/// `namespace/<service-name label>`).
pub fn object_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}
