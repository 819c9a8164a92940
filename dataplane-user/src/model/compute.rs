//! The desired state of one node, computed in full from the objects.

use super::conflicts::{merge, out, Claim, ServiceFrontends, What};
use super::*;

/// The API's name of an IP protocol number of [`protocol`].
pub(super) fn protocol_name(p: u8) -> &'static str {
    match p {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "?",
    }
}

pub(super) fn protocol(p: Option<&str>) -> Result<u8, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(IPPROTO_TCP),
        "UDP" => Ok(IPPROTO_UDP),
        other => Err(format!("protocol {other} is not supported (TCP and UDP are)")),
    }
}

pub(super) fn valid_port(p: i32) -> Option<u16> {
    (1..=65535).contains(&p).then_some(p as u16)
}

/// An endpoint of a slice, reduced to what selection needs.
pub(super) struct Endpoint<'a> {
    pub(super) addr: IpAddr,
    pub(super) node_name: Option<&'a str>,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
    /// `hints.forNodes` and `hints.forZones` names (empty: no hint).
    pub(super) for_nodes: &'a [Box<str>],
    pub(super) for_zones: &'a [Box<str>],
}

/// A slice, validated once: its usable endpoints and its ports by name.
pub(super) struct Slice<'a> {
    pub(super) name: String,
    pub(super) obj: &'a SliceRecord,
    pub(super) endpoints: Vec<Endpoint<'a>>,
}

/// Computes the frontends for `services` from `slices`.
///
/// Rules (as kube-proxy applies them):
/// - ExternalName and headless Services have no VIP: ignored. Services and
///   slices with a label of `NOT_OURS_LABELS` belong to another proxy:
///   ignored.
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
        &records(services),
        &records(slices),
        &NodeInfo {
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            ..NodeInfo::default()
        },
    )
}

/// As [`compute`], from the sources' records, for the node described by
/// `node`: NodePorts on its addresses, Local traffic policies against its
/// endpoints, and remote backends flagged for SNAT.
pub fn compute_for_node(services: &[ServiceRecord], slices: &[SliceRecord], node: &NodeInfo) -> Desired {
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

    let mut services: Vec<&ServiceRecord> = services.iter().collect();
    // Deterministic winner when two Services claim the same frontend.
    services.sort_by_cached_key(|s| s.ns_name());
    let results: Vec<ServiceFrontends> = services
        .into_iter()
        .map(|svc| {
            let slices = svc
                .ns_name()
                .and_then(|k| by_service.get(&k))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            service_frontends(svc, slices, node)
        })
        .collect();
    merge(results.iter(), problems)
}

/// Validates one slice: the Service it belongs to (namespace, name) and its
/// usable endpoints; `None` when it is ignored.
pub(super) fn prepare_slice<'a>(
    s: &'a SliceRecord,
    problem: &mut dyn FnMut(String, String),
) -> Option<((String, String), Slice<'a>)> {
    let Some(name) = s.name.as_deref() else {
        problem(
            "EndpointSlice (unnamed)".into(),
            "metadata.name is missing; ignored".into(),
        );
        return None;
    };
    if s.not_ours {
        return None;
    }
    let ns = &*s.namespace;
    // Named only in a problem (most slices have none).
    let object = || format!("EndpointSlice {ns}/{name}");
    let Some(svc) = s.service_name.as_deref() else {
        problem(object(), format!("no {SERVICE_NAME_LABEL} label; ignored"));
        return None;
    };
    let v6 = match &*s.address_type {
        "IPv4" => false,
        "IPv6" => true,
        // FQDN slices are not for proxies.
        "FQDN" => return None,
        other => {
            problem(object(), format!("unknown addressType {other:?}; ignored"));
            return None;
        }
    };
    let mut endpoints = Vec::new();
    for ep in &s.endpoints {
        let Some(first) = &ep.address else {
            problem(object(), "an endpoint has no address; skipped".into());
            continue;
        };
        let addr = match first.parse() {
            Ok(a) if a.is_ipv6() == v6 => a,
            _ => {
                problem(
                    object(),
                    format!(
                        "endpoint address {:?} is not a valid {} address; skipped",
                        first.text(),
                        s.address_type
                    ),
                );
                continue;
            }
        };
        // Unset: ready and serving, not terminating (the API's field docs;
        // kube-proxy reads them the same way).
        endpoints.push(Endpoint {
            addr,
            node_name: ep.node_name.as_deref(),
            ready: ep.ready.unwrap_or(true),
            serving: ep.serving.unwrap_or(true),
            terminating: ep.terminating.unwrap_or(false),
            for_nodes: ep.hints.as_ref().map_or(&[], |h| &h.for_nodes),
            for_zones: ep.hints.as_ref().map_or(&[], |h| &h.for_zones),
        });
    }
    Some((
        (ns.to_string(), svc.to_string()),
        Slice {
            name: name.to_string(),
            obj: s,
            endpoints,
        },
    ))
}

/// The frontends one Service asks for, from its slices, with its own
/// problems (conflicts with other Services are the merge's business).
pub(super) fn service_frontends(svc: &ServiceRecord, slices: &[Slice], node: &NodeInfo) -> ServiceFrontends {
    let mut claims = Vec::new();
    let mut problems = BTreeSet::new();
    let mut problem = |object: String, reason: String| {
        problems.insert(Problem { object, reason });
    };
    let Some((ns, name)) = svc.ns_name() else {
        problem("Service (unnamed)".into(), "metadata.name is missing; ignored".into());
        return out(None, claims, problems);
    };
    let object = format!("Service {ns}/{name}");
    let order = Some((ns.clone(), name.clone()));
    let Some(spec) = &svc.spec else {
        return out(order, claims, problems);
    };
    if spec.type_.as_deref() == Some("ExternalName") || svc.not_ours {
        return out(order, claims, problems);
    }
    let ips = &spec.cluster_ips;
    let headless = |a: &Addr| matches!(a, Addr::Text(t) if &**t == "None" || t.is_empty());
    if ips.is_empty() || ips.iter().any(headless) {
        return out(order, claims, problems); // headless
    }
    let mut vips = Vec::new();
    for ip in ips.iter() {
        match ip.parse() {
            Ok(a) => vips.push(a),
            Err(ip) => problem(
                object.clone(),
                format!("clusterIP {ip:?} is not a valid IP address; ignored"),
            ),
        }
    }
    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let t = spec.affinity_timeout_s;
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
    let parse_ips = |ips: &[Addr], what: &str, problem: &mut dyn FnMut(String, String)| {
        let mut out = Vec::new();
        for ip in ips {
            match ip.parse() {
                Ok(a) => out.push(a),
                Err(ip) => problem(
                    object.clone(),
                    format!("{what} {ip:?} is not a valid IP address; ignored"),
                ),
            }
        }
        out
    };
    let external_ips = parse_ips(&spec.external_ips, "externalIP", &mut problem);
    let lb_ips = if svc_type == "LoadBalancer" {
        // Without the ipMode Proxy ones (see `ServiceRecord::ingress_ips`).
        parse_ips(&svc.ingress_ips, "load balancer ingress IP", &mut problem)
    } else {
        Vec::new()
    };
    let mut source_ranges = Vec::new();
    if svc_type == "LoadBalancer" {
        for r in spec.load_balancer_source_ranges.iter() {
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
    let ports = &spec.ports;
    let known: BTreeSet<(String, u8)> = ports
        .iter()
        .filter_map(|p| Some((p.name.to_string(), protocol(p.protocol.as_deref()).ok()?)))
        .collect();
    for sl in slices {
        for sp in sl.obj.ports.iter() {
            let pname = sp.name.to_string();
            if let Ok(proto) = protocol(sp.protocol.as_deref()) {
                if !known.contains(&(pname.clone(), proto)) {
                    let theirs: Vec<String> = known
                        .iter()
                        .map(|(n, p)| format!("{n:?}/{}", protocol_name(*p)))
                        .collect();
                    problem(
                        format!("EndpointSlice {ns}/{}", sl.name),
                        format!(
                            "port {pname:?}/{} is not a port of Service {ns}/{name} (its ports: {}); ignored",
                            protocol_name(proto),
                            theirs.join(", ")
                        ),
                    );
                }
            }
        }
    }

    for port in ports.iter() {
        let pname = port.name.to_string();
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
        let mut port_endpoints: Vec<(&Endpoint, u16)> = Vec::new();
        for sl in slices {
            let Some(sp) =
                (sl.obj.ports.iter()).find(|sp| *sp.name == *pname && protocol(sp.protocol.as_deref()) == Ok(proto))
            else {
                continue;
            };
            let Some(target) = sp.port.and_then(valid_port) else {
                let number = match sp.port {
                    Some(n) => format!("port number {n} is outside 1-65535"),
                    None => "no port number".to_string(),
                };
                problem(
                    format!("EndpointSlice {ns}/{}", sl.name),
                    format!("port {pname:?}/{}: {number}; skipped", protocol_name(proto)),
                );
                continue;
            };
            port_endpoints.extend(sl.endpoints.iter().map(|ep| (ep, target)));
        }
        // Topology (kube-proxy's `CategorizeEndpoints`), per family: which
        // ready endpoints Cluster-policy traffic from this node may use.
        let modes = [false, true].map(|v6| {
            let ready = port_endpoints
                .iter()
                .filter(|(ep, _)| ep.ready && ep.addr.is_ipv6() == v6);
            topology_mode(ready.map(|(ep, _)| *ep), node)
        });
        for (ep, target) in &port_endpoints {
            let local = node.is_local(ep.node_name);
            let mut b = Backend::new(ep.addr, *target);
            if !local {
                b.flags |= BACKEND_F_REMOTE;
            }
            let family = ep.addr.is_ipv6() as usize;
            let in_topology = modes[family].admits(ep, node);
            sets[family].add(b, local, ep.ready, ep.serving && ep.terminating, in_topology);
        }
        let mut truncated = |mut backends: Vec<Backend>| {
            let max = limits::MAX_BACKENDS_PER_SERVICE as usize;
            if backends.len() > max {
                problem(
                    object.clone(),
                    format!(
                        "port {pname:?}: {} endpoints, more than the {max} one frontend holds; the {max} lowest addresses are used",
                        backends.len()
                    ),
                );
                // The lowest addresses (then ports), kept in the set's
                // own order.
                backends.sort_by_key(|b| (b.ip(), b.host_port()));
                backends.truncate(max);
                backends.sort();
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
                    // Sources inside the cluster use the in-cluster view.
                    SVC_F_IN_CLUSTER_VIEW
                        | if any && external.is_empty() {
                            SVC_F_DROP_NO_LOCAL
                        } else {
                            0
                        }
                } else {
                    SVC_F_EXTERNAL
                },
                ..base.clone()
            };
            // The in-cluster view of a Local-policy external frontend:
            // kube-proxy sends pod and node traffic for external
            // destinations to the cluster-wide endpoints (its
            // `UsesClusterEndpoints`: "we need Cluster endpoints to
            // implement short circuiting"). No SNAT: such flows start on
            // this node, so their replies come back through it.
            let cluster = truncated(sets.pick(false));
            let in_cluster_fe = Frontend {
                also_serving: serving(&cluster),
                backends: cluster,
                flags: 0,
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
            let mut in_cluster_lb_fe = in_cluster_fe.clone();
            if !ranges.is_empty() {
                lb_fe.flags |= SVC_F_SOURCE_RANGES;
                lb_fe.source_ranges = ranges.clone();
                // kube-proxy checks the ranges before any short-circuit.
                in_cluster_lb_fe.flags |= SVC_F_SOURCE_RANGES;
                in_cluster_lb_fe.source_ranges = ranges;
            }
            [internal_fe, external_fe, lb_fe, in_cluster_fe, in_cluster_lb_fe].map(Arc::new)
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
        // balancer (3 and 4: their in-cluster views).
        let mut add = |ip: IpAddr, port: u16, which: usize, what: What| {
            let key = ServiceKey::new(ip, port, proto);
            claims.push(Claim {
                key,
                frontend: by_family[ip.is_ipv6() as usize][which].clone(),
                what,
            });
            if which > 0 && external_local {
                claims.push(Claim {
                    key: key.in_cluster(),
                    frontend: by_family[ip.is_ipv6() as usize][which + 2].clone(),
                    what,
                });
            }
        };
        for vip in &vips {
            add(*vip, svc_port, 0, What::ClusterIp);
        }
        for ip in &external_ips {
            add(*ip, svc_port, 1, What::ExternalIp);
        }
        if let Some(np) = node_port {
            for ip in &node.addresses {
                add(*ip, np, 1, What::NodePort);
            }
        }
        for ip in &lb_ips {
            add(*ip, svc_port, 2, What::LoadBalancerIp);
        }
    }
    // Every ClusterIP rejects the ports its Service does not define, once
    // the Service has a port of that family (kube-proxy's `cluster-ips` set
    // is filled from the Service's ports).
    let with_ports: Vec<IpAddr> = vips
        .iter()
        .copied()
        .filter(|vip| claims.iter().any(|c| c.key.ip() == *vip))
        .collect();
    for vip in &with_ports {
        claims.push(Claim {
            key: ServiceKey::new(*vip, 0, 0),
            frontend: Arc::new(Frontend {
                service: format!("{ns}/{name}"),
                port_name: String::new(),
                backends: Vec::new(),
                affinity_timeout_s: None,
                flags: SVC_F_OTHER_PORTS,
                source_ranges: Vec::new(),
                also_serving: Vec::new(),
            }),
            what: What::ClusterIp,
        });
    }
    out(order, claims, problems)
}

/// Endpoints of one Service port by readiness and locality.
#[derive(Default)]
pub(super) struct EndpointSets {
    pub(super) ready: BTreeSet<Backend>,
    pub(super) terminating: BTreeSet<Backend>,
    pub(super) ready_local: BTreeSet<Backend>,
    pub(super) terminating_local: BTreeSet<Backend>,
    /// Ready endpoints the topology leaves out (still serving).
    pub(super) ready_elsewhere: BTreeSet<Backend>,
}

/// Which ready endpoints Cluster-policy traffic from this node uses, from
/// the slices' hints, by kube-proxy's rule (`pkg/proxy/topology.go`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Topology {
    /// Every ready endpoint.
    All,
    /// Those hinted for this node (`hints.forNodes`).
    SameNode,
    /// Those hinted for this node's zone (`hints.forZones`).
    SameZone,
}

impl Topology {
    fn admits(self, ep: &Endpoint, node: &NodeInfo) -> bool {
        let has = |names: &[Box<str>], me: Option<&String>| me.is_some_and(|me| names.iter().any(|n| **n == **me));
        match self {
            Topology::All => true,
            Topology::SameNode => has(ep.for_nodes, node.name.as_ref()),
            Topology::SameZone => has(ep.for_zones, node.zone.as_ref()),
        }
    }
}

/// The topology of a Service port's `ready` endpoints: same node when
/// every one has a node hint and one is hinted for this node; else same
/// zone when every one has a zone hint and one is hinted for this node's
/// zone; else all. (Hints come from the EndpointSlice controller, for
/// `trafficDistribution: PreferSameNode` / `PreferSameZone` /
/// `PreferClose` and topology-aware routing.)
pub(super) fn topology_mode<'a, 'b: 'a>(
    ready: impl Iterator<Item = &'a Endpoint<'b>> + Clone,
    node: &NodeInfo,
) -> Topology {
    let mut any = false;
    let (mut all_node, mut for_node, mut all_zone, mut for_zone) = (true, false, true, false);
    for ep in ready {
        any = true;
        all_node &= !ep.for_nodes.is_empty();
        for_node |= Topology::SameNode.admits(ep, node);
        all_zone &= !ep.for_zones.is_empty();
        for_zone |= Topology::SameZone.admits(ep, node);
    }
    match (any, all_node && for_node, all_zone && for_zone) {
        (false, _, _) => Topology::All,
        (true, true, _) => Topology::SameNode,
        (true, false, true) => Topology::SameZone,
        _ => Topology::All,
    }
}

impl EndpointSets {
    /// `in_topology`: a ready endpoint Cluster-policy traffic may use
    /// ([`Topology`]); the fallback to terminating endpoints and the Local
    /// sets ignore topology, as kube-proxy's do.
    fn add(&mut self, b: Backend, local: bool, ready: bool, serving_terminating: bool, in_topology: bool) {
        if ready {
            if in_topology {
                self.ready.insert(b);
            } else {
                self.ready_elsewhere.insert(b);
            }
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
        let ready = self.ready.iter().chain(&self.ready_elsewhere);
        let all: BTreeSet<&Backend> = ready.chain(&self.terminating).collect();
        all.into_iter().filter(|b| !picked.contains(b)).copied().collect()
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
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
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
