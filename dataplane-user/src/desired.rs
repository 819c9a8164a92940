//! The desired state: a pure function from Services and EndpointSlices to the
//! frontends the maps must hold.
//!
//! Every source (files, Kubernetes) feeds the same function, and the sync
//! step diffs its output against what is programmed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use dataplane_common::{
    limits, Backend, ServiceKey, BACKEND_F_REMOTE, IPPROTO_TCP, IPPROTO_UDP, SVC_F_DROP_NO_LOCAL, SVC_F_EXTERNAL,
    SVC_F_SOURCE_RANGES,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

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
}

/// kube-apiserver's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: (u16, u16) = (30000, 32767);

impl Default for NodeInfo {
    fn default() -> Self {
        NodeInfo {
            name: None,
            addresses: Vec::new(),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
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
    pub frontends: BTreeMap<ServiceKey, Frontend>,
    /// Sorted and deduplicated.
    pub problems: Vec<Problem>,
}

fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<(String, String)> {
    Some((
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone()?,
    ))
}

fn protocol(p: Option<&str>) -> Result<u8, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(IPPROTO_TCP),
        "UDP" => Ok(IPPROTO_UDP),
        other => Err(format!("protocol {other} is not supported (TCP and UDP are)")),
    }
}

fn valid_port(p: i32) -> Option<u16> {
    (1..=65535).contains(&p).then_some(p as u16)
}

/// An endpoint of a slice, reduced to what selection needs.
struct Endpoint {
    addr: IpAddr,
    node_name: Option<String>,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// A slice, validated once: its usable endpoints and its ports by name.
struct Slice<'a> {
    name: String,
    obj: &'a EndpointSlice,
    endpoints: Vec<Endpoint>,
}

/// Computes the frontends for `services` from `slices`.
///
/// Rules (as kube-proxy applies them):
/// - ExternalName and headless Services have no VIP: ignored.
/// - Every address of a Service (ClusterIPs, externalIPs, load balancer
///   ingress IPs, node addresses for NodePorts) is a frontend, IPv4 and
///   IPv6 alike; a frontend only gets endpoints of its own family (from
///   slices of `addressType` IPv4 or IPv6), so a dual-stack Service's IPv4
///   VIP never picks an IPv6 backend and vice versa.
/// - A slice belongs to the Service named by its `kubernetes.io/service-name`
///   label in the same namespace; several slices are merged.
/// - Slice ports are matched to Service ports by name and protocol; the
///   slice's port number is the backend port (so named targetPorts resolve
///   per slice).
/// - New flows go to ready endpoints (`ready` unset counts as ready); when
///   none is ready, to endpoints that are serving and terminating.
pub fn compute(services: &[Service], slices: &[EndpointSlice]) -> Desired {
    compute_for_node(
        services,
        slices,
        &NodeInfo {
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            ..NodeInfo::default()
        },
    )
}

/// As [`compute`], for the node described by `node`: NodePorts on its
/// addresses, Local traffic policies against its endpoints, and remote
/// backends flagged for SNAT.
pub fn compute_for_node(services: &[Service], slices: &[EndpointSlice], node: &NodeInfo) -> Desired {
    let mut problems = BTreeSet::new();
    let mut problem = |object: String, reason: String| {
        problems.insert(Problem { object, reason });
    };

    // Slices by (namespace, service name).
    let mut by_service: BTreeMap<(String, String), Vec<Slice>> = BTreeMap::new();
    for s in slices {
        if let Some((owner, slice)) = prepare_slice(s, &mut problem) {
            by_service.entry(owner).or_default().push(slice);
        }
    }

    let mut services: Vec<&Service> = services.iter().collect();
    // Deterministic winner when two Services claim the same frontend.
    services.sort_by_cached_key(|s| ns_name(&s.metadata));
    let results: Vec<ServiceFrontends> = services
        .into_iter()
        .map(|svc| {
            let slices = ns_name(&svc.metadata)
                .and_then(|k| by_service.get(&k))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            service_frontends(svc, slices, node)
        })
        .collect();
    merge(results.iter(), problems)
}

/// One frontend key a Service asks for, in the order it asks.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Claim {
    key: ServiceKey,
    frontend: Frontend,
    /// "clusterIP", "externalIP", ... for the conflict message.
    what: &'static str,
}

/// One Service's share of the desired state, before conflicts between
/// Services are resolved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceFrontends {
    /// (namespace, name): the conflict order. `None` for an unnamed Service.
    order: Option<(String, String)>,
    claims: Vec<Claim>,
    problems: Vec<Problem>,
}

impl ServiceFrontends {
    /// The problem reported when `claim` loses its key to `winner`.
    fn conflict(&self, claim: &Claim, winner: &str) -> Problem {
        conflict(self.order.as_ref(), &claim.key, claim.what, winner)
    }
}

/// The problem reported when the Service `order` loses its claim on `key`
/// (a `what`: "clusterIP", ...) to `winner`.
fn conflict(order: Option<&(String, String)>, key: &ServiceKey, what: &str, winner: &str) -> Problem {
    Problem {
        object: match order {
            Some((ns, name)) => format!("Service {ns}/{name}"),
            None => "Service (unnamed)".into(),
        },
        reason: format!(
            "{what} {}:{}/{} is already used by {winner}; skipped",
            key.ip(),
            key.host_port(),
            proto_name(key.proto)
        ),
    }
}

fn out(order: Option<(String, String)>, claims: Vec<Claim>, problems: BTreeSet<Problem>) -> ServiceFrontends {
    ServiceFrontends {
        order,
        claims,
        problems: problems.into_iter().collect(),
    }
}

/// Merges per-Service results given in (namespace, name) order: the first
/// Service to claim a key gets it, later claims are reported.
fn merge<'a>(results: impl Iterator<Item = &'a ServiceFrontends>, mut problems: BTreeSet<Problem>) -> Desired {
    let mut frontends: BTreeMap<ServiceKey, Frontend> = BTreeMap::new();
    for r in results {
        problems.extend(r.problems.iter().cloned());
        for c in &r.claims {
            match frontends.get(&c.key) {
                Some(other) => {
                    problems.insert(r.conflict(c, &other.service));
                }
                None => {
                    frontends.insert(c.key, c.frontend.clone());
                }
            }
        }
    }
    Desired {
        frontends,
        problems: problems.into_iter().collect(),
    }
}

/// Validates one slice: the Service it belongs to (namespace, name) and its
/// usable endpoints; `None` when it is ignored.
fn prepare_slice<'a>(
    s: &'a EndpointSlice,
    problem: &mut dyn FnMut(String, String),
) -> Option<((String, String), Slice<'a>)> {
    let Some((ns, name)) = ns_name(&s.metadata) else {
        problem(
            "EndpointSlice (unnamed)".into(),
            "metadata.name is missing; ignored".into(),
        );
        return None;
    };
    let object = format!("EndpointSlice {ns}/{name}");
    let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
        problem(object, format!("no {SERVICE_NAME_LABEL} label; ignored"));
        return None;
    };
    let v6 = match s.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        // FQDN slices are not for proxies.
        "FQDN" => return None,
        other => {
            problem(object, format!("unknown addressType {other:?}; ignored"));
            return None;
        }
    };
    let mut endpoints = Vec::new();
    for ep in &s.endpoints {
        let Some(first) = ep.addresses.first() else {
            problem(object.clone(), "an endpoint has no address; skipped".into());
            continue;
        };
        let addr = match first.parse::<IpAddr>() {
            Ok(a) if a.is_ipv6() == v6 => a,
            _ => {
                problem(
                    object.clone(),
                    format!(
                        "endpoint address {first:?} is not a valid {} address; skipped",
                        s.address_type
                    ),
                );
                continue;
            }
        };
        let c = ep.conditions.clone().unwrap_or_default();
        let ready = c.ready.unwrap_or(true);
        endpoints.push(Endpoint {
            addr,
            node_name: ep.node_name.clone(),
            ready,
            serving: c.serving.unwrap_or(ready),
            terminating: c.terminating.unwrap_or(false),
        });
    }
    Some((
        (ns, svc.clone()),
        Slice {
            name,
            obj: s,
            endpoints,
        },
    ))
}

/// The frontends one Service asks for, from its slices, with its own
/// problems (conflicts with other Services are the merge's business).
fn service_frontends(svc: &Service, slices: &[Slice], node: &NodeInfo) -> ServiceFrontends {
    let mut claims = Vec::new();
    let mut problems = BTreeSet::new();
    let mut problem = |object: String, reason: String| {
        problems.insert(Problem { object, reason });
    };
    let Some((ns, name)) = ns_name(&svc.metadata) else {
        problem("Service (unnamed)".into(), "metadata.name is missing; ignored".into());
        return out(None, claims, problems);
    };
    let object = format!("Service {ns}/{name}");
    let order = Some((ns.clone(), name.clone()));
    let Some(spec) = &svc.spec else {
        return out(order, claims, problems);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return out(order, claims, problems);
    }
    let ips: Vec<String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.clone(),
        _ => spec.cluster_ip.iter().cloned().collect(),
    };
    if ips.is_empty() || ips.iter().any(|ip| ip == "None" || ip.is_empty()) {
        return out(order, claims, problems); // headless
    }
    let mut vips = Vec::new();
    for ip in &ips {
        match ip.parse::<IpAddr>() {
            Ok(a) => vips.push(a),
            Err(_) => problem(
                object.clone(),
                format!("clusterIP {ip:?} is not a valid IP address; ignored"),
            ),
        }
    }
    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT_S as i32).contains(&t) => Some(t as u32),
                Some(t) => {
                    problem(
                        object.clone(),
                        format!(
                            "sessionAffinityConfig.clientIP.timeoutSeconds {t} is outside 1-{MAX_AFFINITY_TIMEOUT_S}; \
                             using {DEFAULT_AFFINITY_TIMEOUT_S}"
                        ),
                    );
                    Some(DEFAULT_AFFINITY_TIMEOUT_S)
                }
            }
        }
        Some("None") | None => None,
        Some(other) => {
            problem(
                object.clone(),
                format!("unknown sessionAffinity {other:?}; treated as None"),
            );
            None
        }
    };

    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    let parse_ips = |ips: Vec<String>, what: &str, problem: &mut dyn FnMut(String, String)| {
        let mut out = Vec::new();
        for ip in ips {
            match ip.parse::<IpAddr>() {
                Ok(a) => out.push(a),
                Err(_) => problem(
                    object.clone(),
                    format!("{what} {ip:?} is not a valid IP address; ignored"),
                ),
            }
        }
        out
    };
    let external_ips = parse_ips(
        spec.external_ips.clone().unwrap_or_default(),
        "externalIP",
        &mut problem,
    );
    let lb_ips = if svc_type == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.clone())
            .unwrap_or_default();
        // ipMode Proxy: the load balancer proxies to the nodes itself;
        // kube-proxy does not program such IPs either.
        let ips = ingress
            .into_iter()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip)
            .collect();
        parse_ips(ips, "load balancer ingress IP", &mut problem)
    } else {
        Vec::new()
    };
    let mut source_ranges = Vec::new();
    if svc_type == "LoadBalancer" {
        for r in spec.load_balancer_source_ranges.clone().unwrap_or_default() {
            match parse_cidr(r.trim()) {
                Some(c) => source_ranges.push(c),
                None => problem(
                    object.clone(),
                    format!("loadBalancerSourceRanges entry {r:?} is not a valid CIDR; ignored"),
                ),
            }
        }
        source_ranges.sort();
        source_ranges.dedup();
    }
    let ports = spec.ports.as_deref().unwrap_or(&[]);
    let known: BTreeSet<(String, u8)> = ports
        .iter()
        .filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                protocol(p.protocol.as_deref()).ok()?,
            ))
        })
        .collect();
    for sl in slices {
        for sp in sl.obj.ports.as_deref().unwrap_or(&[]) {
            let pname = sp.name.clone().unwrap_or_default();
            if let Ok(proto) = protocol(sp.protocol.as_deref()) {
                if !known.contains(&(pname.clone(), proto)) {
                    problem(
                        format!("EndpointSlice {ns}/{}", sl.name),
                        format!("port {pname:?} is not a port of Service {ns}/{name}; ignored"),
                    );
                }
            }
        }
    }

    for port in ports {
        let pname = port.name.clone().unwrap_or_default();
        let proto = match protocol(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                problem(object.clone(), format!("port {pname:?}: {e}; skipped"));
                continue;
            }
        };
        let Some(svc_port) = valid_port(port.port) else {
            problem(
                object.clone(),
                format!("port {pname:?}: {} is outside 1-65535; skipped", port.port),
            );
            continue;
        };

        // Endpoints by family, readiness and locality.
        let mut sets = [EndpointSets::default(), EndpointSets::default()];
        for sl in slices {
            let Some(sp) = sl.obj.ports.as_deref().unwrap_or(&[]).iter().find(|sp| {
                sp.name.clone().unwrap_or_default() == pname && protocol(sp.protocol.as_deref()) == Ok(proto)
            }) else {
                continue;
            };
            let Some(target) = sp.port.and_then(valid_port) else {
                problem(
                    format!("EndpointSlice {ns}/{}", sl.name),
                    format!(
                        "port {pname:?}: port number {:?} is missing or outside 1-65535; skipped",
                        sp.port
                    ),
                );
                continue;
            };
            for ep in &sl.endpoints {
                let local = node.is_local(ep.node_name.as_deref());
                let mut b = Backend::new(ep.addr, target);
                if !local {
                    b.flags |= BACKEND_F_REMOTE;
                }
                sets[ep.addr.is_ipv6() as usize].add(b, local, ep.ready, ep.serving && ep.terminating);
            }
        }
        let mut truncated = |mut backends: Vec<Backend>| {
            let max = limits::MAX_BACKENDS_PER_SERVICE as usize;
            if backends.len() > max {
                problem(
                    object.clone(),
                    format!(
                        "port {pname:?}: {} endpoints, only the first {max} are used",
                        backends.len()
                    ),
                );
                backends.truncate(max);
            }
            backends
        };
        // internalTrafficPolicy for the ClusterIPs, externalTrafficPolicy
        // for everything reached from outside.
        let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
        // One internal and one external frontend per family, each with the
        // endpoints of its family only.
        let mut frontends = |sets: &EndpointSets, v6: bool| {
            let any = !sets.pick(false).is_empty();
            let internal = truncated(sets.pick(internal_local));
            let external = truncated(sets.pick(external_local));
            // Only UDP flows are cleared when their endpoint leaves: TCP
            // frontends carry no list (no memory at scale).
            let udp = proto == IPPROTO_UDP;
            let serving = |picked: &[Backend]| if udp { sets.serving_besides(picked) } else { Vec::new() };
            let base = Frontend {
                service: format!("{ns}/{name}"),
                port_name: pname.clone(),
                also_serving: serving(&internal),
                backends: internal,
                affinity_timeout_s,
                flags: 0,
                source_ranges: Vec::new(),
            };
            let internal_fe = Frontend {
                flags: if internal_local && any && base.backends.is_empty() {
                    SVC_F_DROP_NO_LOCAL
                } else {
                    0
                },
                ..base.clone()
            };
            let external_fe = Frontend {
                also_serving: serving(&external),
                backends: external.clone(),
                flags: if external_local {
                    if any && external.is_empty() {
                        SVC_F_DROP_NO_LOCAL
                    } else {
                        0
                    }
                } else {
                    SVC_F_EXTERNAL
                },
                ..base.clone()
            };
            // Load balancer IPs: loadBalancerSourceRanges of the frontend's
            // family; as kube-proxy does, a family without ranges is not
            // restricted, and externalIPs and NodePorts never are.
            let mut lb_fe = external_fe.clone();
            let ranges: Vec<(IpAddr, u8)> = source_ranges
                .iter()
                .filter(|(a, _)| a.is_ipv6() == v6)
                .copied()
                .collect();
            if !ranges.is_empty() {
                lb_fe.flags |= SVC_F_SOURCE_RANGES;
                lb_fe.source_ranges = ranges;
            }
            [internal_fe, external_fe, lb_fe]
        };
        let by_family = [frontends(&sets[0], false), frontends(&sets[1], true)];
        let node_port = match port
            .node_port
            .filter(|_| matches!(svc_type, "NodePort" | "LoadBalancer"))
        {
            None => None,
            Some(np) => {
                let (lo, hi) = node.node_port_range;
                let valid = u16::try_from(np).ok().filter(|p| (lo..=hi).contains(p));
                if valid.is_none() {
                    problem(
                        object.clone(),
                        format!("port {pname:?}: nodePort {np} is outside the node port range {lo}-{hi}; skipped"),
                    );
                }
                valid
            }
        };
        // Which of a family's frontends: 0 internal, 1 external, 2 load
        // balancer.
        let mut add = |ip: IpAddr, port: u16, which: usize, what: &'static str| {
            claims.push(Claim {
                key: ServiceKey::new(ip, port, proto),
                frontend: by_family[ip.is_ipv6() as usize][which].clone(),
                what,
            });
        };
        for vip in &vips {
            add(*vip, svc_port, 0, "clusterIP");
        }
        for ip in &external_ips {
            add(*ip, svc_port, 1, "externalIP");
        }
        if let Some(np) = node_port {
            for ip in &node.addresses {
                add(*ip, np, 1, "nodePort on");
            }
        }
        for ip in &lb_ips {
            add(*ip, svc_port, 2, "load balancer IP");
        }
    }
    out(order, claims, problems)
}

/// Endpoints of one Service port by readiness and locality.
#[derive(Default)]
struct EndpointSets {
    ready: BTreeSet<Backend>,
    terminating: BTreeSet<Backend>,
    ready_local: BTreeSet<Backend>,
    terminating_local: BTreeSet<Backend>,
}

impl EndpointSets {
    fn add(&mut self, b: Backend, local: bool, ready: bool, serving_terminating: bool) {
        if ready {
            self.ready.insert(b);
            if local {
                self.ready_local.insert(b);
            }
        } else if serving_terminating {
            self.terminating.insert(b);
            if local {
                self.terminating_local.insert(b);
            }
        }
    }

    /// Every serving endpoint (ready, or terminating and serving), local
    /// or not, that is not in `picked`.
    fn serving_besides(&self, picked: &[Backend]) -> Vec<Backend> {
        self.ready
            .union(&self.terminating)
            .filter(|b| !picked.contains(b))
            .copied()
            .collect()
    }

    /// The backends for new flows: ready ones, or when none is ready the
    /// serving terminating ones (kube-proxy's fallback), among local
    /// endpoints only when `local`.
    fn pick(&self, local: bool) -> Vec<Backend> {
        let (ready, terminating) = if local {
            (&self.ready_local, &self.terminating_local)
        } else {
            (&self.ready, &self.terminating)
        };
        let set = if ready.is_empty() { terminating } else { ready };
        set.iter().copied().collect()
    }
}

/// Parses an IPv4 or IPv6 CIDR (`addr/len`); `None` when invalid. Host
/// bits are cleared.
fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let len: u8 = len.parse().ok()?;
    match ip.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Some((IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask)), len))
        }
        IpAddr::V6(a) if len <= 128 => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            Some((IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)), len))
        }
        _ => None,
    }
}

/// "tcp" / "udp".
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
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

/// A source's objects with what changed since the previous
/// [`Incremental::update`].
#[derive(Clone, Copy, Debug)]
pub struct Tracked<'a> {
    /// [`object_key`] -> position in the Service slice.
    pub service_index: &'a HashMap<String, usize>,
    /// [`object_key`] -> position in the EndpointSlice slice.
    pub slice_index: &'a HashMap<String, usize>,
    /// Keys of the Services and EndpointSlices added, modified or deleted
    /// since the previous update; `None`: anything may have changed (first
    /// list, relist).
    pub changed: Option<(&'a HashSet<String>, &'a HashSet<String>)>,
}

/// One claim on a frontend key, as the incremental state indexes it.
/// Ordered as the conflict rule: (namespace, name), then the claim's index
/// within its Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claimant {
    order: Arc<(String, String)>,
    index: u32,
    /// The claiming Service's [`object_key`].
    owner: Arc<str>,
}

/// What the incremental state keeps of one Service: the keys it claims,
/// not their frontends. A winning claim's frontend is in the desired state;
/// a losing one's is computed again when it comes to win.
#[derive(Debug)]
struct KeptService {
    /// (namespace, name): the conflict order. `None` for an unnamed Service.
    order: Option<Arc<(String, String)>>,
    /// The claimed keys in claim order, with what they are ("clusterIP",
    /// ...) for conflict messages.
    claims: Vec<(ServiceKey, &'static str)>,
    problems: Vec<Problem>,
}

/// What the incremental state knows about one slice.
#[derive(Debug)]
struct SliceEntry {
    /// The [`object_key`] of the Service it belongs to.
    owner: Option<String>,
    /// Problems of the slice on its own (label, address type, addresses).
    problems: Vec<Problem>,
}

/// The bookkeeping of one [`Incremental::update`].
#[derive(Default)]
struct Round {
    /// Keys whose claims changed.
    touched: BTreeSet<ServiceKey>,
    /// For each touched key, the Service that won it before this update.
    before: HashMap<ServiceKey, Option<Arc<str>>>,
    /// The claims, frontends included, of the Services computed in this
    /// update, by object key.
    fresh: HashMap<Arc<str>, Vec<Claim>>,
}

/// The desired state kept up to date incrementally: an update recomputes
/// only the Services whose Service object or slices changed, then resolves
/// the frontend keys they claimed or released with the same rule as
/// [`compute_for_node`] (the first Service in namespace/name order wins).
/// Its result is always equal to `compute_for_node` on the same objects,
/// given object keys are unique (as in a Kubernetes store).
///
/// Each frontend is held once, in the desired state: the claims index and
/// the per-Service records hold keys only (at 10,000 Services a second
/// copy of every frontend and a B-tree per key cost some 20 MB).
#[derive(Debug)]
pub struct Incremental {
    node: NodeInfo,
    /// By the Service's [`object_key`].
    services: HashMap<Arc<str>, KeptService>,
    /// By the slice's [`object_key`].
    slices: HashMap<Arc<str>, SliceEntry>,
    /// A Service's [`object_key`] -> keys of its slices, sorted.
    by_owner: HashMap<String, Vec<Arc<str>>>,
    /// Every claim on a frontend key, in conflict order. The first wins.
    claims: BTreeMap<ServiceKey, Vec<Claimant>>,
    /// The losing claims' problems, by key.
    conflicts: BTreeMap<ServiceKey, Vec<Problem>>,
    desired: Desired,
}

/// `namespace/name` of a Service, as [`object_key`] gives it.
fn owner_key((ns, name): &(String, String)) -> String {
    format!("{ns}/{name}")
}

impl Incremental {
    pub fn new(node: NodeInfo) -> Self {
        Incremental {
            node,
            services: HashMap::new(),
            slices: HashMap::new(),
            by_owner: HashMap::new(),
            claims: BTreeMap::new(),
            conflicts: BTreeMap::new(),
            desired: Desired::default(),
        }
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Brings the state up to date with `services` and `slices`. Returns
    /// the frontend keys whose entry may have changed, or `None` when
    /// everything was recomputed.
    pub fn update(
        &mut self,
        services: &[Service],
        slices: &[EndpointSlice],
        t: &Tracked<'_>,
    ) -> Option<BTreeSet<ServiceKey>> {
        let Some((changed_services, changed_slices)) = t.changed else {
            self.rebuild(services, slices);
            return None;
        };
        // Services to recompute, by object key.
        let mut affected: BTreeSet<String> = changed_services.iter().cloned().collect();
        for key in changed_slices {
            if let Some((key, old)) = self.slices.remove_entry(key.as_str()) {
                if let Some(owner) = old.owner {
                    if let Some(keys) = self.by_owner.get_mut(&owner) {
                        if let Ok(pos) = keys.binary_search(&key) {
                            keys.remove(pos);
                        }
                        if keys.is_empty() {
                            self.by_owner.remove(&owner);
                        }
                    }
                    affected.insert(owner);
                }
            }
            if let Some(&i) = t.slice_index.get(key) {
                let key: Arc<str> = key.as_str().into();
                let entry = slice_entry(&slices[i]);
                if let Some(owner) = &entry.owner {
                    let keys = self.by_owner.entry(owner.clone()).or_default();
                    if let Err(pos) = keys.binary_search(&key) {
                        keys.insert(pos, key.clone());
                    }
                    affected.insert(owner.clone());
                }
                self.slices.insert(key, entry);
            }
        }
        let mut round = Round::default();
        for key in &affected {
            self.release(key, &mut round);
            if let Some(result) = self.compute_service(key, services, slices, t) {
                self.claim(key, result, &mut round);
            }
        }
        // A key whose winner was not computed in this update and did not
        // win it before needs that Service's frontends: compute them (its
        // claims are the same, or it would have been recomputed).
        let mut pending = Vec::new();
        for key in &round.touched {
            if !self.resolve(key, &round) {
                pending.push(*key);
            }
        }
        for key in &pending {
            let owner = self.claims[key][0].owner.clone();
            if let std::collections::hash_map::Entry::Vacant(e) = round.fresh.entry(owner) {
                let result = self
                    .compute_service(e.key(), services, slices, t)
                    .expect("a claiming Service is in the store");
                e.insert(result.claims);
            }
            let resolved = self.resolve(key, &round);
            debug_assert!(resolved);
        }
        self.collect_problems();
        Some(round.touched)
    }

    /// The frontends the Service `key` asks for now (`None`: not in the
    /// store).
    fn compute_service(
        &self,
        key: &str,
        services: &[Service],
        slices: &[EndpointSlice],
        t: &Tracked<'_>,
    ) -> Option<ServiceFrontends> {
        let svc = &services[*t.service_index.get(key)?];
        let mine: Vec<Slice> = ns_name(&svc.metadata)
            .and_then(|owner| self.by_owner.get(&owner_key(&owner)))
            .into_iter()
            .flatten()
            .filter_map(|k| t.slice_index.get(&**k))
            .filter_map(|&i| prepare_slice(&slices[i], &mut |_, _| {}).map(|(_, s)| s))
            .collect();
        Some(service_frontends(svc, &mine, &self.node))
    }

    /// Recomputes everything from scratch. Services are visited in conflict
    /// order, so the first claim on a key wins as it is made and each
    /// Service's frontends are dropped (or moved into the desired state) as
    /// soon as it is done.
    fn rebuild(&mut self, services: &[Service], slices: &[EndpointSlice]) {
        *self = Incremental::new(self.node.clone());
        let mut by_service: HashMap<String, Vec<Slice>> = HashMap::new();
        for s in slices {
            let key: Arc<str> = object_key(&s.metadata).into();
            let mut problems = BTreeSet::new();
            let prepared = prepare_slice(s, &mut |object, reason| {
                problems.insert(Problem { object, reason });
            });
            let owner = prepared.map(|(owner, slice)| {
                let owner = owner_key(&owner);
                by_service.entry(owner.clone()).or_default().push(slice);
                self.by_owner.entry(owner.clone()).or_default().push(key.clone());
                owner
            });
            self.slices.insert(
                key,
                SliceEntry {
                    owner,
                    problems: problems.into_iter().collect(),
                },
            );
        }
        for keys in self.by_owner.values_mut() {
            keys.sort();
            keys.dedup();
        }
        let mut ordered: Vec<(Option<(String, String)>, &Service)> =
            services.iter().map(|s| (ns_name(&s.metadata), s)).collect();
        ordered.sort_by(|a, b| a.0.cmp(&b.0));
        for (order, svc) in ordered {
            let mine = order
                .as_ref()
                .and_then(|o| by_service.get(&owner_key(o)))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let result = service_frontends(svc, mine, &self.node);
            let owner: Arc<str> = object_key(&svc.metadata).into();
            let order = result.order.map(Arc::new);
            let mut kept = Vec::with_capacity(result.claims.len());
            for (i, c) in result.claims.into_iter().enumerate() {
                kept.push((c.key, c.what));
                let Some(order) = &order else { continue };
                let claimants = self.claims.entry(c.key).or_default();
                match self.desired.frontends.get(&c.key) {
                    Some(winner) => self.conflicts.entry(c.key).or_default().push(conflict(
                        Some(order),
                        &c.key,
                        c.what,
                        &winner.service,
                    )),
                    None => {
                        self.desired.frontends.insert(c.key, c.frontend);
                    }
                }
                claimants.push(Claimant {
                    order: order.clone(),
                    index: i as u32,
                    owner: owner.clone(),
                });
            }
            self.services.insert(
                owner,
                KeptService {
                    order,
                    claims: kept,
                    problems: result.problems,
                },
            );
        }
        self.collect_problems();
    }

    /// Notes that `key`'s claims change in this round (first: who won it).
    fn touch(&self, key: ServiceKey, round: &mut Round) {
        if round.touched.insert(key) {
            let winner = self.claims.get(&key).and_then(|c| c.first()).map(|c| c.owner.clone());
            round.before.insert(key, winner);
        }
    }

    /// Forgets the Service `key`'s claims.
    fn release(&mut self, key: &str, round: &mut Round) {
        let Some((owner, old)) = self.services.remove_entry(key) else {
            return;
        };
        let Some(order) = old.order else { return };
        for (i, (k, _)) in old.claims.iter().enumerate() {
            self.touch(*k, round);
            if let Some(claimants) = self.claims.get_mut(k) {
                let gone = Claimant {
                    order: order.clone(),
                    index: i as u32,
                    owner: owner.clone(),
                };
                if let Ok(pos) = claimants.binary_search(&gone) {
                    claimants.remove(pos);
                }
                if claimants.is_empty() {
                    self.claims.remove(k);
                }
            }
        }
    }

    fn claim(&mut self, key: &str, result: ServiceFrontends, round: &mut Round) {
        let owner: Arc<str> = key.into();
        let order = result.order.map(Arc::new);
        if let Some(order) = &order {
            for (i, c) in result.claims.iter().enumerate() {
                self.touch(c.key, round);
                let claimants = self.claims.entry(c.key).or_default();
                let new = Claimant {
                    order: order.clone(),
                    index: i as u32,
                    owner: owner.clone(),
                };
                if let Err(pos) = claimants.binary_search(&new) {
                    claimants.insert(pos, new);
                }
            }
        }
        let claims = result.claims.iter().map(|c| (c.key, c.what)).collect();
        round.fresh.insert(owner.clone(), result.claims);
        self.services.insert(
            owner,
            KeptService {
                order,
                claims,
                problems: result.problems,
            },
        );
    }

    /// Sets the frontend of `key` to its first claim's, and reports the
    /// others. Returns false, changing nothing, when the winner's frontend
    /// is not at hand (see [`Incremental::update`]).
    fn resolve(&mut self, key: &ServiceKey, round: &Round) -> bool {
        let Some(claimants) = self.claims.get(key).filter(|c| !c.is_empty()) else {
            self.desired.frontends.remove(key);
            self.conflicts.remove(key);
            return true;
        };
        let w = &claimants[0];
        let frontend = match round.fresh.get(&w.owner) {
            Some(claims) => Some(claims[w.index as usize].frontend.clone()),
            // It won before and did not change: its frontend is in place.
            None if round.before.get(key).and_then(Option::as_ref) == Some(&w.owner) => None,
            None => return false,
        };
        let winner = match &frontend {
            Some(fe) => fe.service.clone(),
            None => self.desired.frontends[key].service.clone(),
        };
        let lost: Vec<Problem> = claimants[1..]
            .iter()
            .map(|c| {
                let what = self.services[&c.owner].claims[c.index as usize].1;
                conflict(Some(&c.order), key, what, &winner)
            })
            .collect();
        if let Some(fe) = frontend {
            self.desired.frontends.insert(*key, fe);
        }
        if lost.is_empty() {
            self.conflicts.remove(key);
        } else {
            self.conflicts.insert(*key, lost);
        }
        true
    }

    fn collect_problems(&mut self) {
        let all: BTreeSet<Problem> = self
            .slices
            .values()
            .flat_map(|s| &s.problems)
            .chain(self.services.values().flat_map(|s| &s.problems))
            .chain(self.conflicts.values().flatten())
            .cloned()
            .collect();
        self.desired.problems = all.into_iter().collect();
    }
}

/// A slice's owner and own problems.
fn slice_entry(s: &EndpointSlice) -> SliceEntry {
    let mut problems = BTreeSet::new();
    let owner = prepare_slice(s, &mut |object, reason| {
        problems.insert(Problem { object, reason });
    })
    .map(|(owner, _)| owner_key(&owner));
    SliceEntry {
        owner,
        problems: problems.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::files::parse_manifests;
    use dataplane_common::{SVC_F_DROP_NO_LOCAL, SVC_F_EXTERNAL, SVC_F_SOURCE_RANGES};

    fn example(name: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
        let path = format!("{}/../deploy/examples/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let (o, p) = parse_manifests(name, &text).unwrap();
        assert!(p.is_empty(), "{p:?}");
        (o.services, o.slices)
    }

    fn examples(names: &[&str]) -> Desired {
        let (mut svcs, mut slices) = (vec![], vec![]);
        for n in names {
            let (s, e) = example(n);
            svcs.extend(s);
            slices.extend(e);
        }
        compute(&svcs, &slices)
    }

    fn fe(d: &Desired, vip: [u8; 4], port: u16, proto: u8) -> &Frontend {
        d.frontends
            .get(&ServiceKey::new(Ipv4Addr::from(vip), port, proto))
            .unwrap_or_else(|| {
                panic!(
                    "no frontend {vip:?}:{port}; have {:?}",
                    d.frontends.values().collect::<Vec<_>>()
                )
            })
    }

    fn b(last3: u8, last4: u8, port: u16) -> Backend {
        Backend::new(Ipv4Addr::new(198, 18, last3, last4), port)
    }

    fn sorted(mut v: Vec<Backend>) -> Vec<Backend> {
        v.sort();
        v
    }

    #[test]
    fn slices_merge_and_named_ports_resolve_per_slice() {
        let d = examples(&["web.yaml"]);
        assert_eq!(d.frontends.len(), 2);
        let http = fe(&d, [198, 19, 0, 10], 80, IPPROTO_TCP);
        assert_eq!(http.service, "shop/web");
        assert_eq!(http.display_name(), "shop/web:http");
        // 198.18.2.2 is terminating while others are ready: no new flows.
        assert_eq!(http.backends, sorted(vec![b(1, 2, 8080), b(3, 2, 8081), b(4, 2, 8081)]));
        let metrics = fe(&d, [198, 19, 0, 10], 9090, IPPROTO_TCP);
        assert_eq!(
            metrics.backends,
            sorted(vec![b(1, 2, 9090), b(3, 2, 9090), b(4, 2, 9090)])
        );
        assert!(d.problems.is_empty(), "{:?}", d.problems);
    }

    #[test]
    fn objects_to_skip_are_skipped_with_named_reasons() {
        let d = examples(&["web.yaml", "skip.yaml"]);
        // Headless and ExternalName Services produce nothing.
        assert!(
            d.frontends.values().all(|f| f.service == "shop/web"),
            "{:?}",
            d.frontends
        );
        let problems: Vec<String> = d.problems.iter().map(|p| p.to_string()).collect();
        assert!(
            problems.contains(&"EndpointSlice shop/orphan-abc12: no kubernetes.io/service-name label; ignored".into()),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("EndpointSlice shop/web-bad01: endpoint address \"198.18.300.1\"")),
            "{problems:?}"
        );
        // The valid endpoint of the bad slice is still used.
        let http = fe(&d, [198, 19, 0, 10], 80, IPPROTO_TCP);
        assert!(http.backends.contains(&b(5, 2, 8080)), "{:?}", http.backends);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn every_port_and_protocol_of_a_service_is_a_frontend() {
        let d = examples(&["edge.yaml"]);
        let tcp = fe(&d, [198, 19, 0, 20], 443, IPPROTO_TCP);
        let udp = fe(&d, [198, 19, 0, 20], 443, IPPROTO_UDP);
        assert_eq!(tcp.backends, sorted(vec![b(1, 7, 8443), b(2, 7, 8443)]));
        assert_eq!(udp.backends, tcp.backends);
        assert_eq!(udp.port_name, "quic");
    }

    #[test]
    fn client_ip_affinity_and_its_timeout() {
        let d = examples(&["edge.yaml", "web.yaml"]);
        assert_eq!(fe(&d, [198, 19, 0, 20], 443, IPPROTO_TCP).affinity_timeout_s, Some(600));
        assert_eq!(fe(&d, [198, 19, 0, 10], 80, IPPROTO_TCP).affinity_timeout_s, None);
        let default = service(&SVC.replace("spec:\n", "spec:\n  sessionAffinity: ClientIP\n"));
        let d = compute(&[default], &[]);
        assert_eq!(
            fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP).affinity_timeout_s,
            Some(10_800)
        );
        let bad = service(&SVC.replace(
            "spec:\n",
            "spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n",
        ));
        let d = compute(&[bad], &[]);
        assert_eq!(
            fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP).affinity_timeout_s,
            Some(10_800)
        );
        assert!(d.problems[0].reason.contains("timeoutSeconds 0"), "{:?}", d.problems);
    }

    fn node(name: &str) -> NodeInfo {
        NodeInfo {
            name: Some(name.into()),
            addresses: vec![Ipv4Addr::new(198, 18, 50, 1).into()],
            node_port_range: DEFAULT_NODE_PORT_RANGE,
        }
    }

    fn remote(b: Backend) -> Backend {
        Backend {
            flags: BACKEND_F_REMOTE,
            ..b
        }
    }

    #[test]
    fn load_balancer_frontends_with_local_external_policy() {
        let (svcs, slices) = example("edge.yaml");
        let d = compute_for_node(&svcs, &slices, &node("node-a"));
        // ClusterIP: internalTrafficPolicy Cluster, every endpoint, the
        // remote one flagged.
        let cluster = fe(&d, [198, 19, 0, 20], 443, IPPROTO_TCP);
        assert_eq!(cluster.backends, sorted(vec![b(1, 7, 8443), remote(b(2, 7, 8443))]));
        assert_eq!(cluster.flags, 0);
        // externalTrafficPolicy Local: only node-a's endpoint, no SNAT, on
        // the externalIP, the node's address and the load balancer IP.
        for (vip, port) in [
            ([198, 19, 1, 5], 443),
            ([198, 18, 50, 1], 30443),
            ([198, 19, 2, 1], 443),
        ] {
            for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                assert_eq!(fe(&d, vip, port, proto).backends, vec![b(1, 7, 8443)], "{vip:?}:{port}");
            }
        }
        assert_eq!(fe(&d, [198, 19, 1, 5], 443, IPPROTO_TCP).flags, 0);
        let lb = fe(&d, [198, 19, 2, 1], 443, IPPROTO_TCP);
        assert_eq!(lb.flags, SVC_F_SOURCE_RANGES);
        assert_eq!(lb.source_ranges, vec![(Ipv4Addr::new(198, 18, 200, 0).into(), 24)]);
        assert_eq!(d.frontends.len(), 8, "{:?}", d.frontends.keys().collect::<Vec<_>>());

        // A node without local endpoints drops external traffic (kube-proxy).
        let d = compute_for_node(&svcs, &slices, &node("node-c"));
        let lb = fe(&d, [198, 19, 2, 1], 443, IPPROTO_TCP);
        assert!(lb.backends.is_empty());
        assert_eq!(lb.flags, SVC_F_DROP_NO_LOCAL | SVC_F_SOURCE_RANGES);
        assert_eq!(fe(&d, [198, 19, 0, 20], 443, IPPROTO_TCP).backends.len(), 2);
    }

    #[test]
    fn cluster_external_policy_snats_remote_backends_and_internal_local_filters() {
        let (mut svcs, slices) = example("edge.yaml");
        let spec = svcs[0].spec.as_mut().unwrap();
        spec.external_traffic_policy = Some("Cluster".into());
        spec.internal_traffic_policy = Some("Local".into());
        let d = compute_for_node(&svcs, &slices, &node("node-b"));
        let np = fe(&d, [198, 18, 50, 1], 30443, IPPROTO_TCP);
        assert_eq!(np.flags, SVC_F_EXTERNAL);
        assert_eq!(np.backends, sorted(vec![remote(b(1, 7, 8443)), b(2, 7, 8443)]));
        assert_eq!(fe(&d, [198, 19, 0, 20], 443, IPPROTO_TCP).backends, vec![b(2, 7, 8443)]);
        let d = compute_for_node(&svcs, &slices, &node("node-c"));
        let cluster = fe(&d, [198, 19, 0, 20], 443, IPPROTO_TCP);
        assert!(cluster.backends.is_empty());
        assert_eq!(
            cluster.flags, SVC_F_DROP_NO_LOCAL,
            "internalTrafficPolicy Local without local endpoints drops"
        );
    }

    #[test]
    fn node_ports_outside_the_range_are_reported() {
        let (svcs, slices) = example("edge.yaml");
        let mut n = node("node-a");
        n.node_port_range = (31000, 32000);
        let d = compute_for_node(&svcs, &slices, &n);
        assert!(!d
            .frontends
            .contains_key(&ServiceKey::new(Ipv4Addr::new(198, 18, 50, 1), 30443, IPPROTO_TCP)));
        assert!(
            d.problems.iter().any(|p| p
                .reason
                .contains("nodePort 30443 is outside the node port range 31000-32000")),
            "{:?}",
            d.problems
        );
    }

    #[test]
    fn dual_stack_service_feeds_each_family_from_its_own_slices() {
        let d = examples(&["dual.yaml"]);
        assert_eq!(d.frontends.len(), 2, "{:?}", d.frontends.keys().collect::<Vec<_>>());
        assert_eq!(
            fe(&d, [198, 19, 0, 30], 50051, IPPROTO_TCP).backends,
            vec![b(1, 9, 50051)]
        );
        let v6 = &d.frontends[&ServiceKey::new("2001:db8:19::30".parse::<Ipv6Addr>().unwrap(), 50051, IPPROTO_TCP)];
        assert_eq!(
            v6.backends,
            vec![Backend::new("2001:db8:18:1::9".parse::<Ipv6Addr>().unwrap(), 50051)]
        );
        assert!(v6.backends.iter().all(|b| b.ip().is_ipv6()));
    }

    #[test]
    fn ipv6_node_ports_source_ranges_and_mismatched_endpoints() {
        let svc = service(
            "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: n}\nspec:\n  type: LoadBalancer\n  \
             clusterIP: 198.19.0.40\n  clusterIPs: [198.19.0.40, \"fd00:198:19::40\"]\n  \
             loadBalancerSourceRanges: [198.18.200.0/24, \"2001:db8:200::/48\", \"2001:db8:77::7/128\"]\n  \
             ports: [{port: 443, protocol: TCP, nodePort: 30443}]\n\
             status: {loadBalancer: {ingress: [{ip: \"2001:db8:19:2::1\"}]}}\n",
        );
        let s6 = slice(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: lb-6, namespace: n, labels: \
             {kubernetes.io/service-name: lb}}\naddressType: IPv6\nports: [{port: 8443, protocol: TCP}]\nendpoints:\n\
             - addresses: [\"2001:db8:18:1::2\"]\n- addresses: [198.18.1.2]\n",
        );
        let node = NodeInfo {
            name: None,
            addresses: vec!["198.18.50.1".parse().unwrap(), "2001:db8:50::1".parse().unwrap()],
            ..NodeInfo::default()
        };
        let d = compute_for_node(&[svc], &[s6], &node);
        let key = |ip: &str, port| ServiceKey::new(ip.parse::<IpAddr>().unwrap(), port, IPPROTO_TCP);
        let be6 = Backend::new("2001:db8:18:1::2".parse::<Ipv6Addr>().unwrap(), 8443);
        // The IPv6 ClusterIP, NodePort on the IPv6 node address and the
        // IPv6 ingress IP get the IPv6 endpoint; the IPv4 ones get none
        // (there is no IPv4 slice) and an IPv4 address in an IPv6 slice is
        // reported and skipped.
        assert_eq!(d.frontends[&key("fd00:198:19::40", 443)].backends, vec![be6]);
        assert_eq!(d.frontends[&key("2001:db8:50::1", 30443)].backends, vec![be6]);
        assert!(d.frontends[&key("198.18.50.1", 30443)].backends.is_empty());
        assert!(d.frontends[&key("198.19.0.40", 443)].backends.is_empty());
        let lb6 = &d.frontends[&key("2001:db8:19:2::1", 443)];
        assert_eq!(lb6.backends, vec![be6]);
        assert_eq!(lb6.flags, SVC_F_EXTERNAL | SVC_F_SOURCE_RANGES);
        assert_eq!(
            lb6.source_ranges,
            vec![
                ("2001:db8:77::7".parse().unwrap(), 128),
                ("2001:db8:200::".parse().unwrap(), 48)
            ],
            "only the IPv6 ranges, sorted"
        );
        // NodePorts are not restricted (kube-proxy applies the ranges to
        // load balancer IPs only).
        assert_eq!(d.frontends[&key("2001:db8:50::1", 30443)].flags, SVC_F_EXTERNAL);
        assert!(
            d.problems
                .iter()
                .any(|p| p.to_string().contains("198.18.1.2") && p.to_string().contains("IPv6")),
            "{:?}",
            d.problems
        );
    }

    fn service(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(yaml).unwrap()
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: n}\nspec:\n  clusterIP: 198.19.0.1\n  ports: [{port: 80, protocol: TCP}]\n";

    #[test]
    fn terminating_endpoints_serve_only_when_nothing_is_ready() {
        let sl = slice(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1, namespace: n, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.0.1]\n  conditions: {ready: false, serving: true, terminating: true}\n- addresses: [198.18.0.2]\n  conditions: {ready: false, serving: false, terminating: true}\n- addresses: [198.18.0.3]\n  conditions: {ready: false, serving: false, terminating: false}\n",
        );
        let d = compute(&[service(SVC)], &[sl]);
        assert_eq!(fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP).backends, vec![b(0, 1, 8080)]);
    }

    /// A UDP frontend lists the serving endpoints that get no new flows
    /// (terminating ones while others are ready): their flows are kept,
    /// those of endpoints in neither list are cleared. TCP lists none.
    #[test]
    fn udp_frontends_list_the_endpoints_still_serving() {
        let svc = SVC.replace(
            "ports: [{port: 80, protocol: TCP}]",
            "ports: [{name: dns, port: 53, protocol: UDP}, {name: web, port: 80, protocol: TCP}]",
        );
        let sl = slice(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1, namespace: n, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nports: [{name: dns, port: 5353, protocol: UDP}, {name: web, port: 8080, protocol: TCP}]\nendpoints:\n- addresses: [198.18.0.1]\n  conditions: {ready: false, serving: true, terminating: true}\n- addresses: [198.18.0.2]\n  conditions: {ready: true, serving: true, terminating: false}\n- addresses: [198.18.0.3]\n  conditions: {ready: false, serving: false, terminating: true}\n",
        );
        let d = compute(&[service(&svc)], &[sl]);
        let udp = fe(&d, [198, 19, 0, 1], 53, IPPROTO_UDP);
        assert_eq!(udp.backends, vec![b(0, 2, 5353)]);
        assert_eq!(udp.also_serving, vec![b(0, 1, 5353)]);
        let tcp = fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP);
        assert_eq!(tcp.backends, vec![b(0, 2, 8080)]);
        assert!(tcp.also_serving.is_empty());
    }

    #[test]
    fn service_without_slices_has_a_frontend_with_no_backends() {
        let d = compute(&[service(SVC)], &[]);
        assert!(fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP).backends.is_empty());
    }

    #[test]
    fn duplicate_slices_do_not_duplicate_backends() {
        let text = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: NAME, namespace: n, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.0.1]\n";
        let d = compute(
            &[service(SVC)],
            &[slice(&text.replace("NAME", "a")), slice(&text.replace("NAME", "b"))],
        );
        assert_eq!(fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP).backends, vec![b(0, 1, 8080)]);
    }

    #[test]
    fn bad_ports_and_conflicts_are_reported_and_others_kept() {
        let bad = service(
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: n}\nspec:\n  clusterIP: 198.19.0.2\n  ports: [{name: a, port: 70000}, {name: b, port: 53, protocol: SCTP}, {name: c, port: 53, protocol: UDP}]\n",
        );
        let clash = service(
            "apiVersion: v1\nkind: Service\nmetadata: {name: t, namespace: n}\nspec:\n  clusterIP: 198.19.0.1\n  ports: [{port: 80}]\n",
        );
        let d = compute(&[service(SVC), bad, clash], &[]);
        let problems: Vec<String> = d.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            problems,
            [
                "Service n/bad: port \"a\": 70000 is outside 1-65535; skipped",
                "Service n/bad: port \"b\": protocol SCTP is not supported (TCP and UDP are); skipped",
                "Service n/t: clusterIP 198.19.0.1:80/tcp is already used by n/s; skipped",
            ]
        );
        assert_eq!(fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP).service, "n/s");
        fe(&d, [198, 19, 0, 2], 53, IPPROTO_UDP);
    }

    #[test]
    fn backend_sets_larger_than_a_service_holds_are_truncated() {
        let mut eps = String::new();
        for i in 0..(limits::MAX_BACKENDS_PER_SERVICE + 5) {
            eps.push_str(&format!("- addresses: [198.18.{}.{}]\n", i / 250, i % 250 + 1));
        }
        let sl = slice(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s-1, namespace: n, labels: {{kubernetes.io/service-name: s}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{eps}"
        ));
        let d = compute(&[service(SVC)], &[sl]);
        assert_eq!(
            fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP).backends.len(),
            limits::MAX_BACKENDS_PER_SERVICE as usize
        );
        assert!(d.problems[0].reason.contains("only the first 1024"), "{:?}", d.problems);
    }
}
