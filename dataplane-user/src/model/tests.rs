use super::*;
use crate::source::files::parse_manifests;
use dataplane_common::{SVC_F_DROP_NO_LOCAL, SVC_F_EXTERNAL, SVC_F_IN_CLUSTER_VIEW, SVC_F_SOURCE_RANGES};

/// The model's function, on API objects.
fn compute_for_node(services: &[Service], slices: &[EndpointSlice], node: &NodeInfo) -> Desired {
    super::compute_for_node(&records(services), &records(slices), node)
}

/// The model's function, on API objects.
fn health_checks(services: &[Service], slices: &[EndpointSlice], node: &NodeInfo) -> (Vec<HealthCheck>, Vec<Problem>) {
    super::health_checks(&records(services), &records(slices), node)
}

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
    // Two ports, and the ClusterIP's entry for the ports it lacks.
    assert_eq!(d.frontends.len(), 3);
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
        zone: None,
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
    assert_eq!(fe(&d, [198, 19, 1, 5], 443, IPPROTO_TCP).flags, SVC_F_IN_CLUSTER_VIEW);
    let lb = fe(&d, [198, 19, 2, 1], 443, IPPROTO_TCP);
    assert_eq!(lb.flags, SVC_F_SOURCE_RANGES | SVC_F_IN_CLUSTER_VIEW);
    assert_eq!(lb.source_ranges, vec![(Ipv4Addr::new(198, 18, 200, 0).into(), 24)]);
    // Each external frontend has an in-cluster view with every endpoint,
    // no SNAT (kube-proxy's short-circuit of pod and node traffic); the
    // load balancer IP's keeps its source ranges (checked first there).
    let every = sorted(vec![b(1, 7, 8443), remote(b(2, 7, 8443))]);
    for (vip, port) in [
        ([198, 19, 1, 5], 443),
        ([198, 18, 50, 1], 30443),
        ([198, 19, 2, 1], 443),
    ] {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let view = &d.frontends[&ServiceKey::new(Ipv4Addr::from(vip), port, proto).in_cluster()];
            assert_eq!(view.backends, every, "{vip:?}:{port}");
            let ranges = if vip == [198, 19, 2, 1] { SVC_F_SOURCE_RANGES } else { 0 };
            assert_eq!(view.flags, ranges, "{vip:?}:{port}");
        }
    }
    // 8 port frontends, their 6 external ones' in-cluster views, and the
    // ClusterIP's entry for other ports.
    assert_eq!(d.frontends.len(), 15, "{:?}", d.frontends.keys().collect::<Vec<_>>());

    // A node without local endpoints drops external traffic (kube-proxy),
    // but not what comes from inside the cluster.
    let d = compute_for_node(&svcs, &slices, &node("node-c"));
    let lb_key = ServiceKey::new(Ipv4Addr::new(198, 19, 2, 1), 443, IPPROTO_TCP);
    let lb = &d.frontends[&lb_key];
    assert!(lb.backends.is_empty());
    assert_eq!(
        lb.flags,
        SVC_F_DROP_NO_LOCAL | SVC_F_SOURCE_RANGES | SVC_F_IN_CLUSTER_VIEW
    );
    let view = &d.frontends[&lb_key.in_cluster()];
    assert_eq!(
        view.backends,
        sorted(vec![remote(b(1, 7, 8443)), remote(b(2, 7, 8443))])
    );
    assert_eq!(fe(&d, [198, 19, 0, 20], 443, IPPROTO_TCP).backends.len(), 2);

    // externalTrafficPolicy Cluster: no views.
    let mut cluster = svcs.clone();
    cluster[0].spec.as_mut().unwrap().external_traffic_policy = Some("Cluster".into());
    let d = compute_for_node(&cluster, &slices, &node("node-a"));
    assert!(d.frontends.keys().all(|k| !k.is_in_cluster()));
    assert!(d.frontends.values().all(|f| f.flags & SVC_F_IN_CLUSTER_VIEW == 0));
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
    // One port per family, and each ClusterIP's entry for other ports.
    assert_eq!(d.frontends.len(), 4, "{:?}", d.frontends.keys().collect::<Vec<_>>());
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

/// Load balancer ingress IPs are frontends unless `ipMode: Proxy` (the
/// load balancer proxies to the nodes itself: KEP-1860, kube-proxy skips
/// them); an address written in a non-canonical form still counts, and
/// an invalid one is reported with its own text.
#[test]
fn load_balancer_ingress_ips_by_ip_mode() {
    let svc = service(
        "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: n}\nspec:\n  type: LoadBalancer\n  \
         clusterIP: 198.19.0.41\n  ports: [{port: 80, protocol: TCP, nodePort: 30080}]\n\
         status: {loadBalancer: {ingress: [{ip: 198.19.2.1}, {ip: 198.19.2.2, ipMode: Proxy}, \
         {ip: 198.19.2.3, ipMode: VIP}, {hostname: lb.example}, {ip: \"2001:DB8:19::5\"}, {ip: not-an-ip}]}}\n",
    );
    let d = compute_for_node(&[svc], &[], &node("node-a"));
    let has = |ip: &str| {
        d.frontends
            .contains_key(&ServiceKey::new(ip.parse::<IpAddr>().unwrap(), 80, IPPROTO_TCP))
    };
    assert!(has("198.19.2.1"), "no ipMode: a frontend");
    assert!(!has("198.19.2.2"), "ipMode Proxy: not programmed");
    assert!(has("198.19.2.3"), "ipMode VIP: a frontend");
    assert!(has("2001:db8:19::5"), "non-canonical text of a valid address");
    assert_eq!(
        d.problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["Service n/lb: load balancer ingress IP \"not-an-ip\" is not a valid IP address; ignored"]
    );
}

fn service(yaml: &str) -> Service {
    serde_yaml_ng::from_str(yaml).unwrap()
}

fn slice(yaml: &str) -> EndpointSlice {
    serde_yaml_ng::from_str(yaml).unwrap()
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

/// The API: "serving ... A nil value should be interpreted as true"
/// (EndpointConditions), as kube-proxy does (`Serving == nil || *Serving`);
/// `ready` unset is true too, `terminating` unset false.
#[test]
fn unset_conditions_mean_what_the_api_says() {
    let sl = slice(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1, namespace: n, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [198.18.0.1]\n  conditions: {ready: false, terminating: true}\n- addresses: [198.18.0.2]\n  conditions: {ready: false}\n",
    );
    let d = compute(&[service(SVC)], std::slice::from_ref(&sl));
    // Nothing ready: the terminating endpoint with `serving` unset is the fallback.
    assert_eq!(fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP).backends, vec![b(0, 1, 8080)]);
    let mut sl = sl;
    sl.endpoints
        .push(serde_yaml_ng::from_str("addresses: [198.18.0.3]").unwrap());
    let d = compute(&[service(SVC)], &[sl]);
    // No conditions at all: ready, so the only backend.
    assert_eq!(fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP).backends, vec![b(0, 3, 8080)]);
}

/// kube-proxy lists and watches with `!service.kubernetes.io/service-proxy-name`
/// and `!service.kubernetes.io/headless` (cmd/kube-proxy/app/server.go):
/// objects with either label, whatever its value, do not exist for it.
#[test]
fn services_and_slices_of_another_proxy_are_left_alone() {
    let labelled =
        |label: &str| service(&SVC.replace("namespace: n}", &format!("namespace: n, labels: {{{label}: other}}}}")));
    let sl = |label: &str| {
        slice(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s-1, namespace: n, labels: {{kubernetes.io/service-name: s{label}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n- addresses: [198.18.0.1]\n"
        ))
    };
    let d = compute(&[service(SVC)], &[sl("")]);
    assert_eq!(fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP).backends, vec![b(0, 1, 8080)]);
    for label in [
        "service.kubernetes.io/service-proxy-name",
        "service.kubernetes.io/headless",
    ] {
        let d = compute(&[labelled(label)], &[sl("")]);
        assert!(d.frontends.is_empty(), "{label}: {:?}", d.frontends);
        assert!(d.problems.is_empty(), "{label}: left alone silently: {:?}", d.problems);
        let d = compute(&[service(SVC)], &[sl(&format!(", {label}: x"))]);
        assert!(fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP).backends.is_empty(), "{label}");
    }
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
            "Service n/t: clusterIP 198.19.0.1 is already used by n/s; skipped",
            "Service n/t: clusterIP 198.19.0.1:80/tcp is already used by n/s; skipped",
        ]
    );
    assert_eq!(fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP).service, "n/s");
    fe(&d, [198, 19, 0, 2], 53, IPPROTO_UDP);
}

/// kube-proxy uses every endpoint of a Service port; so do we, up to
/// `MAX_BACKENDS_PER_SERVICE` (16,384) per frontend: 10,000 endpoints are
/// all kept, 50,000 (bad input for one Service) are cut to the lowest
/// addresses with a message naming both numbers.
#[test]
fn large_services_keep_every_endpoint_up_to_the_limit() {
    let slice_of = |n: u32| {
        let mut sl = slice(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1, namespace: n, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: []",
        );
        sl.endpoints = (0..n)
            .map(|i| k8s_openapi::api::discovery::v1::Endpoint {
                addresses: vec![Ipv4Addr::from(0xc612_0000 + i).to_string()],
                ..Default::default()
            })
            .collect();
        sl
    };
    let d = compute(&[service(SVC)], &[slice_of(10_000)]);
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP).backends.len(), 10_000);

    // Bad input for one Service disturbs no other.
    let other = service(&SVC.replace("name: s,", "name: t,").replace("198.19.0.1", "198.19.0.2"));
    let mut other_slice = slice_of(2);
    other_slice.metadata.name = Some("t-1".into());
    other_slice.metadata.labels = Some([("kubernetes.io/service-name".to_string(), "t".to_string())].into());
    let d = compute(&[service(SVC), other], &[slice_of(50_000), other_slice]);
    assert_eq!(fe(&d, [198, 19, 0, 2], 80, IPPROTO_TCP).backends.len(), 2);
    let kept = &fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP).backends;
    assert_eq!(kept.len(), limits::MAX_BACKENDS_PER_SERVICE as usize);
    // The lowest addresses: 198.18.0.0 to 198.18.63.255.
    assert_eq!(
        kept.iter().map(|b| b.ip()).max(),
        Some(Ipv4Addr::from(0xc612_0000 + 16_383).into())
    );
    assert_eq!(
        d.problems.iter().map(|p| format!("{}: {}", p.object, p.reason)).collect::<Vec<_>>(),
        [
            "Service n/s: port \"\": 50000 endpoints, more than the 16384 one frontend holds; the 16384 lowest addresses are used"
        ]
    );
}

/// kube-proxy's health-check ports (service_health.go and the endpoints
/// map's `LocalReadyEndpoints`): LoadBalancer Services with
/// `externalTrafficPolicy: Local` and a `healthCheckNodePort`; the count is
/// of local ready endpoints, once per Service port they serve.
#[test]
fn health_check_ports_count_local_ready_endpoints_per_port() {
    let lb = |name: &str, policy: &str, hc: u32| {
        service(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: n}}\nspec:\n  type: LoadBalancer\n  clusterIP: 198.19.0.{}\n  externalTrafficPolicy: {policy}\n  healthCheckNodePort: {hc}\n  ports: [{{name: http, port: 80, protocol: TCP}}, {{name: dns, port: 53, protocol: UDP}}]\n",
            name.len()
        ))
    };
    let sl = |svc: &str| {
        slice(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-1, namespace: n, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]\nendpoints:\n- {{addresses: [198.18.0.1], nodeName: node-1}}\n- {{addresses: [198.18.0.2], nodeName: node-1}}\n- {{addresses: [198.18.0.3], nodeName: node-1, conditions: {{ready: false}}}}\n- {{addresses: [198.18.0.4], nodeName: node-2}}\n"
        ))
    };
    let hc = |ns: &str, name: &str, port: u16, local_endpoints: usize| HealthCheck {
        namespace: ns.into(),
        name: name.into(),
        port,
        local_endpoints,
    };
    // Two local ready endpoints, two ports: 4, as kube-proxy reports.
    let (checks, problems) = health_checks(&[lb("a", "Local", 30100)], &[sl("a")], &node("node-1"));
    assert_eq!(checks, vec![hc("n", "a", 30100, 4)]);
    assert!(problems.is_empty(), "{problems:?}");
    // node-2 has one ready endpoint (2 over two ports); node-3 none.
    let (checks, _) = health_checks(&[lb("a", "Local", 30100)], &[sl("a")], &node("node-2"));
    assert_eq!(checks, vec![hc("n", "a", 30100, 2)]);
    let (checks, _) = health_checks(&[lb("a", "Local", 30100)], &[sl("a")], &node("node-3"));
    assert_eq!(checks, vec![hc("n", "a", 30100, 0)]);
    // Cluster policy: no health check, whatever the field says.
    let (checks, _) = health_checks(&[lb("a", "Cluster", 30100)], &[sl("a")], &node("node-1"));
    assert!(checks.is_empty());
    // Outside the node port range, or taken by another Service: named.
    let (checks, problems) = health_checks(&[lb("a", "Local", 29999)], &[sl("a")], &node("node-1"));
    assert!(checks.is_empty());
    assert!(
        problems.len() == 1 && problems[0].object == "Service n/a" && problems[0].reason.contains("29999"),
        "{problems:?}"
    );
    let (checks, problems) = health_checks(
        &[
            lb("bb", "Local", 30100),
            lb("a", "Local", 30100),
            lb("ccc", "Local", 30101),
        ],
        &[sl("a"), sl("bb")],
        &node("node-1"),
    );
    assert_eq!(checks, vec![hc("n", "a", 30100, 4), hc("n", "ccc", 30101, 0)]);
    assert!(
        problems.len() == 1 && problems[0].object == "Service n/bb" && problems[0].reason.contains("Service n/a"),
        "{problems:?}"
    );
}

/// Topology hints by kube-proxy's rule (`pkg/proxy/topology.go`,
/// `CategorizeEndpoints` and `topologyModeFromHints`): node hints when every
/// ready endpoint has one and one names this node; else zone hints when
/// every ready endpoint has one and one names this node's zone; else all.
/// Expected sets written from that rule, case by case.
#[test]
fn topology_hints_choose_endpoints_as_kube_proxy_does() {
    // (address last byte, ready, serving+terminating, nodeName, forNodes, forZones)
    type Ep<'a> = (u8, bool, bool, &'a str, &'a [&'a str], &'a [&'a str]);
    let slice_of = |eps: &[Ep]| {
        let mut yaml = String::from("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1, namespace: n, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n");
        for (last, ready, term, node_name, nodes, zones) in eps {
            let list = |v: &[&str]| {
                v.iter()
                    .map(|n| format!("{{name: {n}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            yaml += &format!(
                "- addresses: [198.18.0.{last}]\n  nodeName: {node_name}\n  conditions: {{ready: {ready}, serving: {}, terminating: {term}}}\n",
                *ready || *term
            );
            if !nodes.is_empty() || !zones.is_empty() {
                yaml += &format!(
                    "  hints: {{forNodes: [{}], forZones: [{}]}}\n",
                    list(nodes),
                    list(zones)
                );
            }
        }
        slice(&yaml)
    };
    let on = |name: &str, zone: Option<&str>| NodeInfo {
        zone: zone.map(String::from),
        ..node(name)
    };
    let picked = |eps: &[Ep], n: &NodeInfo, svc: &str| -> Vec<u8> {
        let d = compute_for_node(&[service(svc)], &[slice_of(eps)], n);
        let f = fe(&d, [198, 19, 0, 1], 80, IPPROTO_TCP);
        let mut v: Vec<u8> = f
            .backends
            .iter()
            .map(|b| b.ip().to_string().rsplit('.').next().unwrap().parse().unwrap())
            .collect();
        v.sort();
        v
    };
    let zone_a = on("n1", Some("a"));
    let zoned: &[Ep] = &[
        (1, true, false, "n1", &[], &["a"]),
        (2, true, false, "n2", &[], &["b"]),
        (3, true, false, "n3", &[], &["a"]),
    ];
    assert_eq!(
        picked(zoned, &zone_a, SVC),
        [1, 3],
        "zone hints: the endpoints for zone a"
    );
    assert_eq!(picked(zoned, &on("n2", Some("b")), SVC), [2]);
    assert_eq!(
        picked(zoned, &on("n9", Some("c")), SVC),
        [1, 2, 3],
        "no endpoint for zone c: all"
    );
    assert_eq!(
        picked(zoned, &on("n1", None), SVC),
        [1, 2, 3],
        "node without a zone label: all"
    );
    let one_unhinted: &[Ep] = &[(1, true, false, "n1", &[], &["a"]), (2, true, false, "n2", &[], &[])];
    assert_eq!(
        picked(one_unhinted, &zone_a, SVC),
        [1, 2],
        "a ready endpoint without a hint: all"
    );
    let unready_unhinted: &[Ep] = &[
        (1, true, false, "n1", &[], &["a"]),
        (2, true, false, "n2", &[], &["b"]),
        (4, false, false, "n1", &[], &[]),
    ];
    assert_eq!(
        picked(unready_unhinted, &zone_a, SVC),
        [1],
        "only ready endpoints' hints count"
    );
    let by_node: &[Ep] = &[
        (1, true, false, "n1", &["n1"], &["a"]),
        (2, true, false, "n2", &["n2"], &["a"]),
        (3, true, false, "n3", &["n3"], &["b"]),
    ];
    assert_eq!(picked(by_node, &zone_a, SVC), [1], "node hints first");
    assert_eq!(
        picked(by_node, &on("n4", Some("a")), SVC),
        [1, 2],
        "no endpoint for this node: zone hints"
    );
    // The fallback to serving terminating endpoints ignores topology.
    let terminating: &[Ep] = &[(1, false, true, "n2", &[], &["b"]), (2, false, true, "n3", &[], &["c"])];
    assert_eq!(picked(terminating, &zone_a, SVC), [1, 2]);
    // externalTrafficPolicy Local takes the local endpoints, hints or not
    // (the external frontend; internal traffic still follows the hints).
    let lb = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: n}\nspec:\n  type: LoadBalancer\n  clusterIP: 198.19.0.1\n  externalTrafficPolicy: Local\n  externalIPs: [198.19.5.5]\n  ports: [{port: 80, protocol: TCP}]\n";
    let d = compute_for_node(&[service(lb)], &[slice_of(zoned)], &on("n2", Some("a")));
    let external: Vec<String> = fe(&d, [198, 19, 5, 5], 80, IPPROTO_TCP)
        .backends
        .iter()
        .map(|b| b.ip().to_string())
        .collect();
    assert_eq!(
        external,
        ["198.18.0.2"],
        "Local: the endpoint on n2, though hinted for zone b"
    );
    assert_eq!(
        picked(zoned, &on("n2", Some("a")), lb),
        [1, 3],
        "internal traffic: zone a"
    );
}

/// kube-proxy's nftables mode rejects traffic to a ClusterIP on a port its
/// Service does not define ("Reject traffic to invalid ports of ClusterIPs"):
/// every ClusterIP, of either family, gets one entry (port 0, protocol 0, no
/// backends, `SVC_F_OTHER_PORTS`); externalIPs, load balancer IPs and node
/// addresses do not.
#[test]
fn every_cluster_ip_rejects_the_ports_its_service_lacks() {
    let d = examples(&["web.yaml", "dual.yaml"]);
    let others: Vec<(IpAddr, u16, u8)> = d
        .frontends
        .iter()
        .filter(|(_, f)| f.flags & SVC_F_OTHER_PORTS != 0)
        .map(|(k, _)| (k.ip(), k.host_port(), k.proto))
        .collect();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        others,
        [
            (ip("198.19.0.10"), 0, 0),
            (ip("198.19.0.30"), 0, 0),
            (ip("2001:db8:19::30"), 0, 0)
        ]
    );
    assert!(d
        .frontends
        .iter()
        .filter(|(k, _)| k.port == 0)
        .all(|(_, f)| f.backends.is_empty()));
    // A Service without ports has no entry (kube-proxy fills its
    // `cluster-ips` set from Service ports).
    let portless = service("metadata: {name: p, namespace: n}\nspec: {clusterIP: 198.19.0.77}");
    let d = compute_for_node(&[portless], &[], &node("node-a"));
    assert!(d.frontends.is_empty(), "{:?}", d.frontends.keys().collect::<Vec<_>>());
    let lb = examples(&["edge.yaml"]);
    let zero: Vec<IpAddr> = lb.frontends.keys().filter(|k| k.port == 0).map(|k| k.ip()).collect();
    assert_eq!(zero.len(), 1, "only the ClusterIP: {zero:?}");
}
