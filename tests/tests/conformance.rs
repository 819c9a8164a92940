//! Kubernetes' own Service e2e scenarios (`test/e2e/network/service.go`,
//! `endpointslice.go`), one test each, named after the upstream test and
//! checking what it checks, with the real agent (file source) in a node
//! namespace and real TCP/UDP sockets in client and backend namespaces.
//! Scenarios other suites already cover are listed in `docs/conformance.md`
//! with the test that covers them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use dataplane_tests::{
    agent::Agent,
    manifests::{service, slice},
    netns::{backend_addr, Topology, CLIENT_ADDR, NODE_CLIENT_SIDE},
    servers::{tcp_server, Conn, Server},
    web::start_servers,
};

const TIMEOUT: Duration = Duration::from_secs(3);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 10);
const VIP2: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 20);
const HTTP: &[(&str, u16, &str)] = &[("http", 80, "TCP")];
const HTTP_TARGET: &[(&str, u16, &str)] = &[("http", 8080, "TCP")];

fn agent(t: &Topology, manifests: &[(&str, String)]) -> Agent {
    let m: Vec<(&str, &str)> = manifests.iter().map(|(n, c)| (*n, c.as_str())).collect();
    Agent::start(&t.node, &t.node_ifaces(), &[], &m).unwrap()
}

/// `n` TCP connections from the client to `to`: answers (backend names)
/// counted, or the first error.
fn tcp(t: &Topology, to: SocketAddr, n: usize) -> Result<BTreeMap<String, usize>, String> {
    t.client
        .run(move || {
            let mut seen = BTreeMap::new();
            for i in 0..n {
                let mut c = Conn::connect(to, TIMEOUT).map_err(|e| format!("connection {i} to {to}: {e}"))?;
                *seen
                    .entry(c.ask().map_err(|e| format!("connection {i} to {to}: {e}"))?)
                    .or_insert(0) += 1;
            }
            Ok(seen)
        })
        .join()
        .unwrap()
}

fn names(seen: &BTreeMap<String, usize>) -> Vec<&str> {
    seen.keys().map(String::as_str).collect()
}

/// One UDP request from the client to `to`: the answer.
fn udp(t: &Topology, to: SocketAddr) -> Result<String, String> {
    t.client
        .run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            s.send_to(b"who", to).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            let (n, _) = s
                .recv_from(&mut buf)
                .map_err(|e| format!("no UDP answer from {to}: {e}"))?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .join()
        .unwrap()
}

/// Whether a TCP connection to `to` is refused (RST) at once, as kube-proxy
/// rejects a Service without endpoints.
fn refused(t: &Topology, to: SocketAddr) -> bool {
    let r = t
        .client
        .run(move || Conn::connect(to, TIMEOUT).map(drop))
        .join()
        .unwrap();
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// Whether `to` is not served at all: the connection fails (nothing
/// translates it, the node has no route for the VIP range).
fn unserved(t: &Topology, to: SocketAddr) -> bool {
    t.client
        .run(move || Conn::connect(to, TIMEOUT).is_err())
        .join()
        .unwrap()
}

fn svc_slice(name: &str, vip: Ipv4Addr, backends: &[usize]) -> Vec<(&'static str, String)> {
    let addrs: Vec<Ipv4Addr> = backends.iter().map(|i| backend_addr(*i)).collect();
    vec![
        ("service.yaml", service("e2e", name, vip, HTTP)),
        (
            "slice.yaml",
            slice("e2e", &format!("{name}-1"), name, HTTP_TARGET, &addrs),
        ),
    ]
}

#[test]
fn services_should_serve_a_basic_endpoint_from_pods() {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t);
    let to = SocketAddr::from((VIP, 80));
    let mut a = agent(&t, &svc_slice("endpoint-test2", VIP, &[]));
    assert!(refused(&t, to), "no endpoints yet: rejected");
    for (backends, want) in [
        (&[1][..], &["b1"][..]),
        (&[1, 2], &["b1", "b2"]),
        (&[2], &["b2"]),
        (&[], &[]),
    ] {
        a.update("slice.yaml", &svc_slice("endpoint-test2", VIP, backends)[1].1)
            .unwrap();
        if want.is_empty() {
            assert!(refused(&t, to), "endpoints gone: rejected again");
        } else {
            assert_eq!(names(&tcp(&t, to, 30).unwrap()), want, "endpoints {backends:?}");
        }
    }
}

#[test]
fn services_should_serve_multiport_endpoints_from_pods() {
    let t = Topology::new(2).unwrap();
    let _servers = [
        tcp_server(&t.backends[0], backend_addr(1), 8080, "b1"),
        tcp_server(&t.backends[1], backend_addr(2), 8081, "b2"),
    ];
    let ports = &[("portname1", 80, "TCP"), ("portname2", 81, "TCP")];
    // One pod per port, each in the slice of its own port (as the
    // EndpointSlice controller groups endpoints by port set).
    let a = slice(
        "e2e",
        "multi-endpoint-test-a",
        "multi-endpoint-test",
        &[("portname1", 8080, "TCP")],
        &[backend_addr(1)],
    );
    let b = slice(
        "e2e",
        "multi-endpoint-test-b",
        "multi-endpoint-test",
        &[("portname2", 8081, "TCP")],
        &[backend_addr(2)],
    );
    let _a = agent(
        &t,
        &[
            ("service.yaml", service("e2e", "multi-endpoint-test", VIP, ports)),
            ("a.yaml", a),
            ("b.yaml", b),
        ],
    );
    assert_eq!(names(&tcp(&t, SocketAddr::from((VIP, 80)), 10).unwrap()), ["b1"]);
    assert_eq!(names(&tcp(&t, SocketAddr::from((VIP, 81)), 10).unwrap()), ["b2"]);
}

#[test]
fn services_should_serve_endpoints_on_same_port_and_different_protocols() {
    let t = Topology::new(1).unwrap();
    let _servers = start_servers(&t);
    let ports = &[("tcp-port", 80, "TCP"), ("udp-port", 80, "UDP")];
    let targets = &[("tcp-port", 8080, "TCP"), ("udp-port", 5353, "UDP")];
    let _a = agent(
        &t,
        &[
            ("service.yaml", service("e2e", "multiprotocol-test", VIP, ports)),
            (
                "slice.yaml",
                slice(
                    "e2e",
                    "multiprotocol-test-1",
                    "multiprotocol-test",
                    targets,
                    &[backend_addr(1)],
                ),
            ),
        ],
    );
    let to = SocketAddr::from((VIP, 80));
    assert_eq!(names(&tcp(&t, to, 3).unwrap()), ["b1"]);
    assert_eq!(udp(&t, to).unwrap(), "b1");
}

/// `svc` (from `manifests::service`, ports last) with sessionAffinity
/// ClientIP and, if given, its timeout.
fn with_affinity(svc: &str, timeout_s: Option<u32>) -> String {
    let cfg = timeout_s.map_or(String::new(), |s| {
        format!("  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {s}}}}}\n")
    });
    format!("{svc}  sessionAffinity: ClientIP\n{cfg}")
}

/// `svc` as a NodePort Service on `node_port`.
fn as_node_port(svc: &str, node_port: u16) -> String {
    svc.replace("type: ClusterIP", "type: NodePort")
        .replace("protocol: TCP}", &format!("protocol: TCP, nodePort: {node_port}}}"))
        .replace("protocol: UDP}", &format!("protocol: UDP, nodePort: {node_port}}}"))
}

/// Upstream's `execAffinityTestForNonLBServiceWithTransition`: no affinity
/// spreads, ClientIP pins, off again spreads; through `to`.
fn affinity_switch(node_port: Option<u16>) {
    let t = Topology::new(3).unwrap();
    let _servers = start_servers(&t);
    let mut m = svc_slice("affinity-transition", VIP, &[1, 2, 3]);
    let to = match node_port {
        Some(p) => {
            m[0].1 = as_node_port(&m[0].1, p);
            SocketAddr::from((NODE_CLIENT_SIDE, p))
        }
        None => SocketAddr::from((VIP, 80)),
    };
    let mut a = agent(&t, &m);
    assert!(tcp(&t, to, 30).unwrap().len() > 1, "no affinity: spread");
    a.update("service.yaml", &with_affinity(&m[0].1, None)).unwrap();
    assert_eq!(tcp(&t, to, 30).unwrap().len(), 1, "ClientIP: one backend");
    a.update("service.yaml", &m[0].1).unwrap();
    assert!(tcp(&t, to, 30).unwrap().len() > 1, "affinity off again: spread");
}

/// Upstream's `execAffinityTestForSessionAffinityTimeout`: pinned within
/// the timeout, free again after it.
fn affinity_timeout(node_port: Option<u16>) {
    let t = Topology::new(3).unwrap();
    let _servers = start_servers(&t);
    let mut m = svc_slice("affinity-timeout", VIP, &[1, 2, 3]);
    let to = match node_port {
        Some(p) => {
            m[0].1 = as_node_port(&m[0].1, p);
            SocketAddr::from((NODE_CLIENT_SIDE, p))
        }
        None => SocketAddr::from((VIP, 80)),
    };
    let _a = agent(&t, &[("service.yaml", with_affinity(&m[0].1, Some(2))), m[1].clone()]);
    assert_eq!(tcp(&t, to, 15).unwrap().len(), 1, "within the timeout: one backend");
    // After the timeout the client is free again: later connections (each
    // after the previous one's affinity expired) reach other backends.
    let start = Instant::now();
    let mut seen = BTreeSet::new();
    while seen.len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "always the same backend: {seen:?}"
        );
        // Not a synchronisation: the 2 s affinity timeout has to pass.
        std::thread::sleep(Duration::from_millis(2100));
        seen.extend(tcp(&t, to, 1).unwrap().into_keys());
    }
}

#[test]
fn services_should_be_able_to_switch_session_affinity_for_service_with_type_clusterip() {
    affinity_switch(None);
}

#[test]
fn services_should_be_able_to_switch_session_affinity_for_nodeport_service() {
    affinity_switch(Some(30082));
}

#[test]
fn services_should_have_session_affinity_timeout_work_for_service_with_type_clusterip() {
    affinity_timeout(None);
}

#[test]
fn services_should_have_session_affinity_timeout_work_for_nodeport_service() {
    affinity_timeout(Some(30083));
}

#[test]
fn services_should_be_able_to_change_the_type_from_externalname_to_clusterip_and_to_nodeport_and_back() {
    let t = Topology::new(1).unwrap();
    let _servers = start_servers(&t);
    let external = "apiVersion: v1\nkind: Service\nmetadata: {name: externalsvc, namespace: e2e}\nspec:\n  type: ExternalName\n  externalName: foo.example.com\n";
    let m = svc_slice("externalsvc", VIP, &[1]);
    let mut a = agent(&t, &[("service.yaml", external.into()), m[1].clone()]);
    let to = SocketAddr::from((VIP, 80));
    let node_port = SocketAddr::from((NODE_CLIENT_SIDE, 30081));
    assert!(unserved(&t, to), "ExternalName: no VIP");
    a.update("service.yaml", &m[0].1).unwrap();
    assert_eq!(names(&tcp(&t, to, 5).unwrap()), ["b1"], "ClusterIP");
    let np = m[0]
        .1
        .replace("type: ClusterIP", "type: NodePort")
        .replace("protocol: TCP}", "protocol: TCP, nodePort: 30081}");
    a.update("service.yaml", &np).unwrap();
    assert_eq!(names(&tcp(&t, node_port, 5).unwrap()), ["b1"], "NodePort");
    assert_eq!(names(&tcp(&t, to, 5).unwrap()), ["b1"], "NodePort keeps its ClusterIP");
    a.update("service.yaml", external).unwrap();
    assert!(
        unserved(&t, to) && unserved(&t, node_port),
        "back to ExternalName: nothing served"
    );
}

#[test]
fn services_should_preserve_source_pod_ip_for_traffic_thru_service_cluster_ip() {
    let t = Topology::new(1).unwrap();
    let _servers = start_servers(&t);
    let _a = agent(&t, &svc_slice("sourceip-test", VIP, &[1]));
    let to = SocketAddr::from((VIP, 80));
    let peer = t
        .client
        .run(move || Conn::connect(to, TIMEOUT).and_then(|mut c| c.ask_peer()))
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(
        peer,
        ("b1".to_string(), CLIENT_ADDR.to_string()),
        "the backend sees the client's address"
    );
}

#[test]
fn services_should_be_able_to_up_and_down_services() {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t);
    let one = svc_slice("service-up-down-1", VIP, &[1]);
    let two = svc_slice("service-up-down-2", VIP2, &[2]);
    let mut a = agent(
        &t,
        &[
            one[0].clone(),
            one[1].clone(),
            ("service2.yaml", two[0].1.clone()),
            ("slice2.yaml", two[1].1.clone()),
        ],
    );
    let (to1, to2) = (SocketAddr::from((VIP, 80)), SocketAddr::from((VIP2, 80)));
    assert_eq!(names(&tcp(&t, to1, 5).unwrap()), ["b1"]);
    assert_eq!(names(&tcp(&t, to2, 5).unwrap()), ["b2"]);
    a.update("service.yaml", "").unwrap();
    assert!(unserved(&t, to1), "service 1 down");
    assert_eq!(names(&tcp(&t, to2, 5).unwrap()), ["b2"], "service 2 still up");
    a.update("service.yaml", &one[0].1).unwrap();
    assert_eq!(names(&tcp(&t, to1, 5).unwrap()), ["b1"], "service 1 up again");
}

#[test]
fn services_should_work_after_the_service_has_been_recreated() {
    let t = Topology::new(1).unwrap();
    let _servers = start_servers(&t);
    let m = svc_slice("recreated", VIP, &[1]);
    let mut a = agent(&t, &m);
    let to = SocketAddr::from((VIP, 80));
    assert_eq!(names(&tcp(&t, to, 3).unwrap()), ["b1"]);
    a.update("service.yaml", "").unwrap();
    assert!(unserved(&t, to));
    a.update("service.yaml", &m[0].1).unwrap();
    assert_eq!(names(&tcp(&t, to, 3).unwrap()), ["b1"]);
}

#[test]
fn services_should_be_able_to_connect_to_terminating_and_unready_endpoints_if_publishnotreadyaddresses_is_true() {
    let t = Topology::new(1).unwrap();
    let _servers = start_servers(&t);
    let m = svc_slice("tolerate-unready", VIP, &[1]);
    // For such a Service the EndpointSlice controller marks a pod that is
    // neither ready nor serving, and terminating, as ready anyway.
    let svc = m[0]
        .1
        .replace("  ports:\n", "  publishNotReadyAddresses: true\n  ports:\n");
    let sl = m[1].1.replace(
        "{ready: true, serving: true, terminating: false}",
        "{ready: true, serving: false, terminating: true}",
    );
    assert!(sl.contains("terminating: true"), "{sl}");
    let _a = agent(&t, &[("service.yaml", svc), ("slice.yaml", sl)]);
    assert_eq!(names(&tcp(&t, SocketAddr::from((VIP, 80)), 3).unwrap()), ["b1"]);
}

#[test]
fn services_should_implement_service_kubernetes_io_service_proxy_name() {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t);
    let one = svc_slice("service-proxy-toggled", VIP, &[1]);
    let two = svc_slice("service-proxy-untoggled", VIP2, &[2]);
    let labelled = one[0].1.replace(
        "namespace: e2e}",
        "namespace: e2e, labels: {service.kubernetes.io/service-proxy-name: foo-bar}}",
    );
    assert!(labelled.contains("foo-bar"), "{labelled}");
    let mut a = agent(
        &t,
        &[
            ("service.yaml", labelled),
            one[1].clone(),
            ("service2.yaml", two[0].1.clone()),
            ("slice2.yaml", two[1].1.clone()),
        ],
    );
    let (to1, to2) = (SocketAddr::from((VIP, 80)), SocketAddr::from((VIP2, 80)));
    assert!(unserved(&t, to1), "another proxy's Service is not served");
    assert_eq!(names(&tcp(&t, to2, 3).unwrap()), ["b2"]);
    a.update("service.yaml", &one[0].1).unwrap();
    assert_eq!(names(&tcp(&t, to1, 3).unwrap()), ["b1"], "label removed: served");
}

#[test]
fn services_should_implement_service_kubernetes_io_headless() {
    let t = Topology::new(1).unwrap();
    let _servers = start_servers(&t);
    let m = svc_slice("service-headless-toggled", VIP, &[1]);
    let labelled = m[0].1.replace(
        "namespace: e2e}",
        "namespace: e2e, labels: {service.kubernetes.io/headless: \"\"}}",
    );
    let mut a = agent(&t, &[("service.yaml", labelled), m[1].clone()]);
    let to = SocketAddr::from((VIP, 80));
    assert!(unserved(&t, to), "labelled headless: not served");
    a.update("service.yaml", &m[0].1).unwrap();
    assert_eq!(names(&tcp(&t, to, 3).unwrap()), ["b1"], "label removed: served");
}

#[test]
fn services_should_be_possible_to_connect_to_a_service_via_externalip_when_the_external_ip_is_not_assigned_to_a_node() {
    let t = Topology::new(1).unwrap();
    let _servers = start_servers(&t);
    let external_ip = Ipv4Addr::new(198, 19, 77, 7);
    let m = svc_slice("externalip-test", VIP, &[1]);
    let svc = m[0]
        .1
        .replace("  ports:\n", &format!("  externalIPs: [{external_ip}]\n  ports:\n"));
    let _a = agent(&t, &[("service.yaml", svc), m[1].clone()]);
    assert!(t
        .node
        .exec(&["ip", "-o", "addr"])
        .unwrap()
        .lines()
        .all(|l| !l.contains(&external_ip.to_string())));
    assert_eq!(names(&tcp(&t, SocketAddr::from((external_ip, 80)), 3).unwrap()), ["b1"]);
}

/// The EndpointSlice of UDP Service `name` (port "dns", 5353) with
/// backend `b` alone.
fn dns_slice(name: &str, b: usize) -> String {
    slice(
        "e2e",
        &format!("{name}-1"),
        name,
        &[("dns", 5353, "UDP")],
        &[backend_addr(b)],
    )
}

/// One connected UDP socket in the client namespace (one 5-tuple) asking
/// `to` who it is every 20 ms, for 30 s at most or until finished,
/// collecting the answers.
struct Asker {
    answers: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Asker {
    fn start(t: &Topology, to: SocketAddr) -> Asker {
        let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (heard, stopped) = (answers.clone(), stop.clone());
        let thread = t.client.run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            s.connect(to).unwrap();
            let start = Instant::now();
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) && start.elapsed() < Duration::from_secs(30) {
                let _ = s.send(b"who");
                let mut buf = [0u8; 64];
                if let Ok(n) = s.recv(&mut buf) {
                    heard
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
                std::thread::sleep(Duration::from_millis(20)); // pacing; the loop is bounded by its deadline
            }
        });
        Asker { answers, stop, thread }
    }

    /// Waits (10 s at most) until `who` answered.
    fn wait_for(&self, who: &str) {
        let start = Instant::now();
        while !self.answers.lock().unwrap().iter().any(|a| a == who) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no answer from {who}: {:?}",
                self.answers.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops asking; every answer, in order.
    fn finish(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap();
        self.answers.lock().unwrap().clone()
    }
}

#[test]
fn services_should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_clusterip_service() {
    udp_server_pod_cycles(None);
}

#[test]
fn services_should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_nodeport_service() {
    udp_server_pod_cycles(Some(30084));
}

/// Upstream: a client keeps one UDP socket sending while the server pod is
/// replaced; its datagrams reach the new pod (the flow to the old one is
/// cleared, not kept until its timeout).
fn udp_server_pod_cycles(node_port: Option<u16>) {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t);
    let dns = &[("dns", 53, "UDP")];
    let slice_of = |b: usize| dns_slice("udp-cycle", b);
    let mut svc = service("e2e", "udp-cycle", VIP, dns);
    let to = match node_port {
        Some(p) => {
            svc = as_node_port(&svc, p);
            SocketAddr::from((NODE_CLIENT_SIDE, p))
        }
        None => SocketAddr::from((VIP, 53)),
    };
    let mut a = agent(&t, &[("service.yaml", svc), ("slice.yaml", slice_of(1))]);
    // One client socket (one 5-tuple) asking all along, as upstream's
    // client pod does, while the server pod is replaced.
    let asker = Asker::start(&t, to);
    asker.wait_for("b1");
    a.update("slice.yaml", &slice_of(2)).unwrap();
    asker.wait_for("b2");
    let answers = asker.finish();
    let first_b2 = answers.iter().position(|a| a == "b2").unwrap();
    assert!(answers[..first_b2].iter().all(|a| a == "b1"), "{answers:?}");
    assert!(
        answers[first_b2..].iter().all(|a| a == "b2"),
        "the flow went back: {answers:?}"
    );
}

/// Not upstream's, the same client: one UDP socket sending all along to a
/// ClusterIP while its Service is deleted and created again with another
/// endpoint (the old pod still running). Its datagrams must reach the new
/// endpoint: the deleted frontend's flows were cleared with it, as
/// kube-proxy clears the UDP conntrack entries of a frontend that lead to
/// no serving endpoint, where an entry kept would send them on to the old
/// pod until it times out (never, while the client keeps sending).
#[test]
fn udp_traffic_follows_a_service_deleted_and_created_again_with_another_endpoint() {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t);
    let dns = &[("dns", 53, "UDP")];
    let slice_of = |b: usize| dns_slice("udp-again", b);
    let svc = service("e2e", "udp-again", VIP, dns);
    let to = SocketAddr::from((VIP, 53));
    let mut a = agent(&t, &[("service.yaml", svc.clone()), ("slice.yaml", slice_of(1))]);
    let asker = Asker::start(&t, to);
    asker.wait_for("b1");
    // The Service goes (its frontend with it), then comes back with the
    // other endpoint, the same ClusterIP and port.
    a.update("service.yaml", "").unwrap();
    a.update("slice.yaml", &slice_of(2)).unwrap();
    a.update("service.yaml", &svc).unwrap();
    asker.wait_for("b2");
    let answers = asker.finish();
    let first_b2 = answers.iter().position(|a| a == "b2").unwrap();
    assert!(
        answers[first_b2..].iter().all(|a| a == "b2"),
        "the flow went back to the old endpoint: {answers:?}"
    );
}

#[test]
fn endpointslice_should_support_a_service_with_multiple_ports_specified_in_multiple_endpointslices() {
    let t = Topology::new(1).unwrap();
    let _servers: Vec<Server> = vec![
        tcp_server(&t.backends[0], backend_addr(1), 8080, "b1-8080"),
        tcp_server(&t.backends[0], backend_addr(1), 8081, "b1-8081"),
    ];
    let ports = &[("example", 80, "TCP"), ("example-int", 81, "TCP")];
    let a = slice(
        "e2e",
        "example-custom-endpoints-1",
        "example-custom-endpoints",
        &[("example", 8080, "TCP")],
        &[backend_addr(1)],
    );
    let b = slice(
        "e2e",
        "example-custom-endpoints-2",
        "example-custom-endpoints",
        &[("example-int", 8081, "TCP")],
        &[backend_addr(1)],
    );
    let _a = agent(
        &t,
        &[
            ("service.yaml", service("e2e", "example-custom-endpoints", VIP, ports)),
            ("a.yaml", a),
            ("b.yaml", b),
        ],
    );
    assert_eq!(names(&tcp(&t, SocketAddr::from((VIP, 80)), 3).unwrap()), ["b1-8080"]);
    assert_eq!(names(&tcp(&t, SocketAddr::from((VIP, 81)), 3).unwrap()), ["b1-8081"]);
}

#[test]
fn endpointslice_should_support_a_service_with_multiple_endpoint_ips_specified_in_multiple_endpointslices() {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t);
    let one = slice(
        "e2e",
        "example-multi-1",
        "example-multi",
        HTTP_TARGET,
        &[backend_addr(1)],
    );
    let two = slice(
        "e2e",
        "example-multi-2",
        "example-multi",
        HTTP_TARGET,
        &[backend_addr(2)],
    );
    let _a = agent(
        &t,
        &[
            ("service.yaml", service("e2e", "example-multi", VIP, HTTP)),
            ("a.yaml", one),
            ("b.yaml", two),
        ],
    );
    assert_eq!(names(&tcp(&t, SocketAddr::from((VIP, 80)), 30).unwrap()), ["b1", "b2"]);
}

/// Upstream's "fallback to local terminating endpoints when there are no
/// ready endpoints": with a Local policy, this node's serving terminating
/// endpoint is used, not a ready endpoint of another node.
fn local_terminating_fallback(external: bool) {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t);
    let m = svc_slice("local-fallback", VIP, &[]);
    let (policy, to) = match external {
        true => (
            "  externalTrafficPolicy: Local\n",
            SocketAddr::from((NODE_CLIENT_SIDE, 30085)),
        ),
        false => ("  internalTrafficPolicy: Local\n", SocketAddr::from((VIP, 80))),
    };
    let svc = as_node_port(&m[0].1, 30085).replace("  ports:\n", &format!("{policy}  ports:\n"));
    let sl = format!(
        "{}- addresses: [{}]\n  nodeName: node-1\n  conditions: {{ready: false, serving: true, terminating: true}}\n- addresses: [{}]\n  nodeName: node-2\n  conditions: {{ready: true, serving: true, terminating: false}}\n",
        m[1].1.replace("endpoints: []\n", "endpoints:\n"),
        backend_addr(1),
        backend_addr(2)
    );
    let m: Vec<(&str, &str)> = vec![("service.yaml", &svc), ("slice.yaml", &sl)];
    let _a = Agent::start_with(&t.node, &t.node_ifaces(), &[], &m, &["--node-name", "node-1"]).unwrap();
    assert_eq!(
        names(&tcp(&t, to, 10).unwrap()),
        ["b1"],
        "the local terminating endpoint, not node-2's"
    );
}

#[test]
fn services_should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_internaltrafficpolicy_local(
) {
    local_terminating_fallback(false);
}

#[test]
fn services_should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_externaltrafficpolicy_local(
) {
    local_terminating_fallback(true);
}
