//! The desired state: a pure function from Services and EndpointSlices to the
//! frontends the maps must hold.
//!
//! Every source (files, Kubernetes) feeds the same function, and the sync
//! step diffs its output against what is programmed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use dataplane_common::{limits, Backend, ServiceKey, IPPROTO_TCP, IPPROTO_UDP};
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
    addr: Ipv4Addr,
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
/// - Only the ClusterIPs are frontends for now; IPv6 addresses are ignored
///   until the IPv6 datapath exists.
/// - A slice belongs to the Service named by its `kubernetes.io/service-name`
///   label in the same namespace; several slices are merged.
/// - Slice ports are matched to Service ports by name and protocol; the
///   slice's port number is the backend port (so named targetPorts resolve
///   per slice).
/// - New flows go to ready endpoints (`ready` unset counts as ready); when
///   none is ready, to endpoints that are serving and terminating.
pub fn compute(services: &[Service], slices: &[EndpointSlice]) -> Desired {
    let mut problems = BTreeSet::new();
    let mut problem = |object: String, reason: String| {
        problems.insert(Problem { object, reason });
    };

    // Slices by (namespace, service name).
    let mut by_service: BTreeMap<(String, String), Vec<Slice>> = BTreeMap::new();
    for s in slices {
        let Some((ns, name)) = ns_name(&s.metadata) else {
            problem(
                "EndpointSlice (unnamed)".into(),
                "metadata.name is missing; ignored".into(),
            );
            continue;
        };
        let object = format!("EndpointSlice {ns}/{name}");
        let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            problem(object, format!("no {SERVICE_NAME_LABEL} label; ignored"));
            continue;
        };
        match s.address_type.as_str() {
            "IPv4" => {}
            // The IPv6 datapath comes later; FQDN slices are not for proxies.
            "IPv6" | "FQDN" => continue,
            other => {
                problem(object, format!("unknown addressType {other:?}; ignored"));
                continue;
            }
        }
        let mut endpoints = Vec::new();
        for ep in &s.endpoints {
            let Some(first) = ep.addresses.first() else {
                problem(object.clone(), "an endpoint has no address; skipped".into());
                continue;
            };
            let addr = match first.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) => a,
                _ => {
                    problem(
                        object.clone(),
                        format!("endpoint address {first:?} is not a valid IPv4 address; skipped"),
                    );
                    continue;
                }
            };
            let c = ep.conditions.clone().unwrap_or_default();
            let ready = c.ready.unwrap_or(true);
            endpoints.push(Endpoint {
                addr,
                ready,
                serving: c.serving.unwrap_or(ready),
                terminating: c.terminating.unwrap_or(false),
            });
        }
        by_service.entry((ns, svc.clone())).or_default().push(Slice {
            name,
            obj: s,
            endpoints,
        });
    }

    let mut frontends: BTreeMap<ServiceKey, Frontend> = BTreeMap::new();
    let mut services: Vec<&Service> = services.iter().collect();
    // Deterministic winner when two Services claim the same frontend.
    services.sort_by_key(|s| ns_name(&s.metadata));

    for svc in services {
        let Some((ns, name)) = ns_name(&svc.metadata) else {
            problem("Service (unnamed)".into(), "metadata.name is missing; ignored".into());
            continue;
        };
        let object = format!("Service {ns}/{name}");
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let ips: Vec<String> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.clone(),
            _ => spec.cluster_ip.iter().cloned().collect(),
        };
        if ips.is_empty() || ips.iter().any(|ip| ip == "None" || ip.is_empty()) {
            continue; // headless
        }
        let mut vips = Vec::new();
        for ip in &ips {
            match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) => vips.push(a),
                Ok(IpAddr::V6(_)) => {} // IPv6 datapath not there yet.
                Err(_) => problem(
                    object.clone(),
                    format!("clusterIP {ip:?} is not a valid IP address; ignored"),
                ),
            }
        }
        let slices = by_service
            .get(&(ns.clone(), name.clone()))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
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

            let mut ready = BTreeSet::new();
            let mut terminating = BTreeSet::new();
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
                    let b = Backend::new(ep.addr, target);
                    if ep.ready {
                        ready.insert(b);
                    } else if ep.serving && ep.terminating {
                        terminating.insert(b);
                    }
                }
            }
            let chosen = if ready.is_empty() { terminating } else { ready };
            let mut backends: Vec<Backend> = chosen.into_iter().collect();
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
            for vip in &vips {
                let key = ServiceKey::new(*vip, svc_port, proto);
                let fe = Frontend {
                    service: format!("{ns}/{name}"),
                    port_name: pname.clone(),
                    backends: backends.clone(),
                    affinity_timeout_s,
                };
                if let Some(other) = frontends.get(&key) {
                    problem(
                        object.clone(),
                        format!(
                            "{vip}:{svc_port}/{} is already used by {}; skipped",
                            proto_name(proto),
                            other.service
                        ),
                    );
                    continue;
                }
                frontends.insert(key, fe);
            }
        }
    }
    Desired {
        frontends,
        problems: problems.into_iter().collect(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::files::parse_manifests;

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

    #[test]
    fn dual_stack_service_feeds_ipv4_frontend_from_ipv4_slice_only() {
        let d = examples(&["dual.yaml"]);
        assert_eq!(d.frontends.len(), 1);
        assert_eq!(
            fe(&d, [198, 19, 0, 30], 50051, IPPROTO_TCP).backends,
            vec![b(1, 9, 50051)]
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
                "Service n/t: 198.19.0.1:80/tcp is already used by n/s; skipped",
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
