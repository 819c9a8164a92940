//! Kubernetes Service semantics end to end, on two nodes: NodePort on every
//! node address, externalTrafficPolicy Local (client address preserved) and
//! Cluster (remote backends SNATed), loadBalancerSourceRanges, hairpin,
//! internalTrafficPolicy Local. Real agents, real sockets.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use dataplane::inspect;
use dataplane_tests::{
    agent::Agent,
    netns::{Netns, TwoNodes, BACKEND_A, BACKEND_B, EXT_CLIENT, NODE_A, NODE_A_EXT, NODE_B},
    servers::{tcp_server, Conn, Server},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 40);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 1);
const NODE_PORT: u16 = 30080;
const HEALTH_CHECK_PORT: u16 = 30999;
const TIMEOUT: Duration = Duration::from_secs(3);

fn manifests(external_policy: &str, internal_policy: &str) -> Vec<(&'static str, String)> {
    // The API server allocates one to every LoadBalancer Service with
    // externalTrafficPolicy Local.
    let health_check = match external_policy {
        "Local" => format!("\n  healthCheckNodePort: {HEALTH_CHECK_PORT}"),
        _ => String::new(),
    };
    let svc = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: edge, namespace: ingress}}
spec:
  type: LoadBalancer
  clusterIP: {CLUSTER_IP}
  externalTrafficPolicy: {external_policy}
  internalTrafficPolicy: {internal_policy}{health_check}
  loadBalancerSourceRanges: [198.18.200.0/24]
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}]
status:
  loadBalancer:
    ingress: [{{ip: {LB_IP}}}]
"
    );
    let slice = dataplane_tests::manifests::two_node_slice("ingress", "edge-abcde", "edge", ("http", "TCP", 8080));
    vec![("service.yaml", svc), ("slice.yaml", slice)]
}

struct Cluster {
    t: TwoNodes,
    _servers: Vec<Server>,
    _agents: Vec<Agent>,
}

fn cluster(external_policy: &str, internal_policy: &str) -> Cluster {
    cluster_with(external_policy, internal_policy, false)
}

/// With `xdp`, node A's external interfaces get the XDP program instead of
/// TC (the client's checksum offload is off: XDP sees full checksums only
/// from real NICs, see README).
fn cluster_with(external_policy: &str, internal_policy: &str, xdp: bool) -> Cluster {
    cluster_of(manifests(external_policy, internal_policy), xdp, &[], |_| {})
}

/// Both nodes' agents on `m`, started after `setup`; node A's agent gets
/// `args_a` too.
fn cluster_of(m: Vec<(&'static str, String)>, xdp: bool, args_a: &[&str], setup: impl FnOnce(&TwoNodes)) -> Cluster {
    let t = TwoNodes::new().unwrap();
    setup(&t);
    if xdp {
        t.client.exec(&["ethtool", "-K", "eth0", "tx", "off"]).unwrap();
    }
    let servers = vec![
        tcp_server(&t.backend_a, BACKEND_A, 8080, "a"),
        tcp_server(&t.backend_b, BACKEND_B, 8080, "b"),
    ];
    let m: Vec<(&str, &str)> = m.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (tc_a, xdp_a) = if xdp {
        (s(&["vn", "vb1"]), s(&["ve", "ve2"]))
    } else {
        (s(&["ve", "ve2", "vn", "vb1"]), vec![])
    };
    let mut args = vec![
        "--node-name",
        "node-a",
        "--snat-ip",
        "198.18.250.1",
        "--node-ip",
        "198.18.200.1,198.18.250.1",
    ];
    args.extend_from_slice(args_a);
    let a = Agent::start_with(&t.node_a, &tc_a, &xdp_a, &m, &args).unwrap();
    let b = Agent::start_with(
        &t.node_b,
        &s(&["vn", "vb1"]),
        &[],
        &m,
        &[
            "--node-name",
            "node-b",
            "--snat-ip",
            "198.18.250.2",
            "--node-ip",
            "198.18.250.2",
        ],
    )
    .unwrap();
    Cluster {
        t,
        _servers: servers,
        _agents: vec![a, b],
    }
}

/// `n` connections from `ns` to `to`: (backend, client address it saw) ->
/// count, or the first error.
fn connect(ns: &Netns, to: SocketAddr, n: usize) -> Result<BTreeMap<(String, String), usize>, String> {
    ns.run(move || {
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let mut c = Conn::connect(to, TIMEOUT).map_err(|e| format!("connection {i} to {to}: {e}"))?;
            let who = c.ask_peer().map_err(|e| format!("connection {i} to {to}: {e}"))?;
            *seen.entry(who).or_insert(0) += 1;
        }
        Ok(seen)
    })
    .join()
    .unwrap()
}

fn pair(b: &str, peer: Ipv4Addr) -> (String, String) {
    (b.to_string(), peer.to_string())
}

#[test]
fn node_port_with_cluster_policy_on_every_node_snats_remote_backends_only() {
    let c = cluster("Cluster", "Cluster");
    for node in [NODE_A_EXT, NODE_A, NODE_B] {
        let seen = connect(&c.t.client, SocketAddr::from((node, NODE_PORT)), 40).unwrap();
        eprintln!("via {node}: {seen:?}");
        assert_eq!(seen.values().sum::<usize>(), 40);
        // Each node sends local flows with the client's address and SNATs
        // flows to the other node's backend to its own address.
        let (local, remote, snat) = if node == NODE_B {
            ("b", "a", NODE_B)
        } else {
            ("a", "b", NODE_A)
        };
        for (who, _) in seen.keys() {
            assert!(who == local || who == remote, "{seen:?}");
        }
        assert!(
            seen.contains_key(&pair(local, EXT_CLIENT)),
            "via {node}: local backend must see the client: {seen:?}"
        );
        assert!(
            seen.contains_key(&pair(remote, snat)),
            "via {node}: remote backend must see the node: {seen:?}"
        );
        assert_eq!(seen.len(), 2, "via {node}: {seen:?}");
    }
}

#[test]
fn external_policy_local_keeps_traffic_on_the_node_and_the_client_address() {
    let c = cluster("Local", "Cluster");
    let via_a = connect(&c.t.client, SocketAddr::from((NODE_A_EXT, NODE_PORT)), 30).unwrap();
    assert_eq!(via_a, BTreeMap::from([(pair("a", EXT_CLIENT), 30)]));
    let via_b = connect(&c.t.client, SocketAddr::from((NODE_B, NODE_PORT)), 30).unwrap();
    assert_eq!(via_b, BTreeMap::from([(pair("b", EXT_CLIENT), 30)]));
    // The load balancer IP behaves the same (node A is the entry).
    let lb = connect(&c.t.client, SocketAddr::from((LB_IP, 80)), 20).unwrap();
    assert_eq!(lb, BTreeMap::from([(pair("a", EXT_CLIENT), 20)]));
}

/// kube-proxy's short-circuit of "pod traffic for external destinations":
/// with externalTrafficPolicy Local and the only endpoint on node B, a pod
/// on node A (inside `--cluster-cidr`) reaching the load balancer IP or node
/// A's NodePort gets node B's endpoint, with its own address, while the
/// same addresses from outside the cluster stay dropped on node A (no
/// local endpoint).
#[test]
fn pods_reach_external_addresses_of_a_local_policy_service_through_every_endpoint() {
    let mut m = manifests("Local", "Cluster");
    let a_endpoint = format!("- addresses: [{BACKEND_A}]\n  conditions: {{ready: true}}\n  nodeName: node-a\n");
    assert!(m[1].1.contains(&a_endpoint), "{}", m[1].1);
    m[1].1 = m[1].1.replace(&a_endpoint, "");
    // The load balancer admits node A's pods too (its source ranges apply
    // to pods as well, in kube-proxy as here).
    m[0].1 = m[0].1.replace("[198.18.200.0/24]", "[198.18.200.0/24, 198.18.1.0/24]");
    // The pods' addresses (node A's behind vb1, node B's).
    let c = cluster_of(m, false, &["--cluster-cidr", "198.18.1.0/24,198.18.2.0/24"], |_| {});
    for to in [SocketAddr::from((LB_IP, 80)), SocketAddr::from((NODE_A, NODE_PORT))] {
        let seen = connect(&c.t.backend_a, to, 10).unwrap();
        assert_eq!(
            seen,
            BTreeMap::from([(pair("b", BACKEND_A), 10)]),
            "pod on node A to {to}"
        );
    }
    // From outside, node A has no local endpoint: dropped, as kube-proxy.
    let outside = connect(&c.t.client, SocketAddr::from((NODE_A_EXT, NODE_PORT)), 1);
    assert!(outside.is_err(), "{outside:?}");
}

/// SNAT source ports stay out of the node's ephemeral ports: with node A's
/// `ip_local_port_range` moved to 20000-40000, its agent takes 40001-65535
/// (the largest range of 1024-65535 outside it and the NodePort range),
/// and the flows it SNATs to node B's backend use ports from there.
#[test]
fn snat_ports_avoid_the_nodes_ephemeral_ports() {
    let c = cluster_of(manifests("Cluster", "Cluster"), false, &[], |t| {
        t.node_a.sysctl("net.ipv4.ip_local_port_range", "20000 40000").unwrap()
    });
    let seen = connect(&c.t.client, SocketAddr::from((NODE_A_EXT, NODE_PORT)), 30).unwrap();
    assert!(
        seen.contains_key(&pair("b", NODE_A)),
        "no SNATed flow to node B: {seen:?}"
    );
    let maps = inspect::open_pinned(&c._agents[0].pins).unwrap();
    let ports: Vec<u16> = inspect::conntrack_rows(&maps)
        .unwrap()
        .iter()
        .filter(|r| r.direction == "original")
        .filter_map(|r| r.snat.as_ref())
        .map(|s| s.rsplit(':').next().unwrap().parse().unwrap())
        .collect();
    assert!(!ports.is_empty());
    assert!(ports.iter().all(|p| *p > 40000), "SNAT ports {ports:?}");
}

/// `curl` from `ns`: (HTTP status, body).
/// A refused connection is status 0 (curl prints 000).
fn curl(ns: &Netns, url: &str) -> (u16, String) {
    let args = [
        "netns",
        "exec",
        &ns.name,
        "curl",
        "-s",
        "--max-time",
        "3",
        "-w",
        "\n%{http_code}",
        url,
    ];
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = out
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("no output from curl (apt-get install curl): {out:?}"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Polls `url` from `ns` until it answers `code` (at most 10 s).
fn curl_until(ns: &Netns, url: &str, code: u16) -> String {
    let start = std::time::Instant::now();
    loop {
        let (have, body) = curl(ns, url);
        if have == code {
            return body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{url}: {have}, not {code}: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// kube-proxy's `healthCheckNodePort` (service_health.go): every node
/// answers on it, 200 with its count of local ready endpoints while it has
/// one, 503 once it has none, so a cloud load balancer sends the Service's
/// traffic only to nodes with a local endpoint. Asked with curl from the
/// node itself and from outside, as a load balancer's probe would.
#[test]
fn health_check_node_port_answers_by_local_endpoints() {
    let mut c = cluster("Local", "Cluster");
    let url = |node: Ipv4Addr| format!("http://{node}:{HEALTH_CHECK_PORT}/");
    let body = curl_until(&c.t.node_a, &format!("http://127.0.0.1:{HEALTH_CHECK_PORT}/"), 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"service": {"namespace": "ingress", "name": "edge"}, "localEndpoints": 1, "serviceProxyHealthy": true})
    );
    assert_eq!(curl(&c.t.client, &url(NODE_A_EXT)).0, 200);
    assert_eq!(curl(&c.t.client, &url(NODE_B)).0, 200);

    // Node B's endpoint goes away: node B answers 503, node A still 200.
    let m = manifests("Local", "Cluster");
    let slice = m[1].1.replace(
        &format!("- addresses: [{BACKEND_B}]\n  conditions: {{ready: true}}\n  nodeName: node-b\n"),
        "",
    );
    assert!(!slice.contains("node-b"), "{slice}");
    c._agents[1].update("slice.yaml", &slice).unwrap();
    let body = curl_until(&c.t.client, &url(NODE_B), 503);
    assert!(body.contains(r#""localEndpoints":0"#), "{body}");
    assert_eq!(curl(&c.t.client, &url(NODE_A_EXT)).0, 200);
    // And traffic through node A keeps working meanwhile.
    let lb = connect(&c.t.client, SocketAddr::from((LB_IP, 80)), 5).unwrap();
    assert_eq!(lb, BTreeMap::from([(pair("a", EXT_CLIENT), 5)]));

    // Policy Cluster: no health-check port (the API server frees it).
    c._agents[1]
        .update("service.yaml", &manifests("Cluster", "Cluster")[0].1)
        .unwrap();
    let (code, _) = curl(&c.t.client, &url(NODE_B));
    assert_eq!(code, 0, "the port is closed: curl gets no HTTP answer");
}

#[test]
fn load_balancer_source_ranges_admit_listed_clients_only() {
    let c = cluster("Cluster", "Cluster");
    let ok = connect(&c.t.client, SocketAddr::from((LB_IP, 80)), 10).unwrap();
    assert_eq!(ok.values().sum::<usize>(), 10);
    let denied = connect(&c.t.client2, SocketAddr::from((LB_IP, 80)), 1);
    let err = denied.expect_err("a client outside loadBalancerSourceRanges got through");
    assert!(err.contains("timed out"), "expected a silent drop (timeout), got {err}");
    // The NodePort has no source ranges: the same client gets through there.
    assert_eq!(
        connect(&c.t.client2, SocketAddr::from((NODE_A_EXT, NODE_PORT)), 5)
            .unwrap()
            .values()
            .sum::<usize>(),
        5
    );
}

#[test]
fn internal_policy_local_and_hairpin() {
    let c = cluster("Cluster", "Local");
    // ClusterIP traffic entering node A only reaches node A's endpoint.
    let seen = connect(&c.t.client, SocketAddr::from((CLUSTER_IP, 80)), 20).unwrap();
    assert_eq!(seen.keys().map(|k| k.0.as_str()).collect::<Vec<_>>(), ["a"]);
    // Backend a reaches its own Service and is chosen itself: the node
    // SNATs the flow so that a accepts it, and the answer comes back.
    let hairpin = connect(&c.t.backend_a, SocketAddr::from((CLUSTER_IP, 80)), 10).unwrap();
    assert_eq!(hairpin, BTreeMap::from([(pair("a", NODE_A), 10)]));
}

/// Topology hints (`trafficDistribution: PreferSameZone` or topology-aware
/// routing, written into the slice by the EndpointSlice controller) keep
/// Cluster-policy traffic entering node A in node A's zone, by kube-proxy's
/// rule; the zone is the `topology.kubernetes.io/zone` label of the Node
/// (here a Node manifest in the agent's directory) and follows its changes.
#[test]
fn zone_hints_keep_cluster_ip_traffic_in_the_zone_of_the_node() {
    let mut c = cluster("Cluster", "Cluster");
    let backends = |seen: BTreeMap<(String, String), usize>| {
        let names: std::collections::BTreeSet<String> = seen.into_keys().map(|(b, _)| b).collect();
        names.into_iter().collect::<Vec<_>>()
    };
    let to_vip = SocketAddr::from((CLUSTER_IP, 80));
    // Without hints: both backends (30 connections miss one with p = 2^-29).
    assert_eq!(backends(connect(&c.t.client, to_vip, 30).unwrap()), ["a", "b"]);

    let node = |zone: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node-a, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n"
        )
    };
    let hinted = manifests("Cluster", "Cluster")[1]
        .1
        .replace(
            "nodeName: node-a\n",
            "nodeName: node-a\n  hints: {forZones: [{name: zone-a}]}\n",
        )
        .replace(
            "nodeName: node-b\n",
            "nodeName: node-b\n  hints: {forZones: [{name: zone-b}]}\n",
        );
    assert_eq!(hinted.matches("forZones").count(), 2, "{hinted}");
    let a = &mut c._agents[0];
    a.update("node.yaml", &node("zone-a")).unwrap();
    a.update("slice.yaml", &hinted).unwrap();
    assert_eq!(backends(connect(&c.t.client, to_vip, 20).unwrap()), ["a"]);
    // The node's label changes: the traffic follows.
    c._agents[0].update("node.yaml", &node("zone-b")).unwrap();
    assert_eq!(backends(connect(&c.t.client, to_vip, 20).unwrap()), ["b"]);
    // A zone no endpoint is hinted for: every endpoint again.
    c._agents[0].update("node.yaml", &node("zone-c")).unwrap();
    assert_eq!(backends(connect(&c.t.client, to_vip, 30).unwrap()), ["a", "b"]);
}

/// The same NodePort, with the lookup done by XDP on node A's external
/// interface.
#[test]
fn node_port_through_xdp_on_the_external_interface() {
    let c = cluster_with("Cluster", "Cluster", true);
    let seen = connect(&c.t.client, SocketAddr::from((NODE_A_EXT, NODE_PORT)), 40).unwrap();
    assert_eq!(seen.values().sum::<usize>(), 40);
    assert!(seen.contains_key(&pair("a", EXT_CLIENT)), "{seen:?}");
    assert!(seen.contains_key(&pair("b", NODE_A)), "{seen:?}");
    assert!(
        c._agents[0].log().contains("XDP program attached"),
        "{}",
        c._agents[0].log()
    );
}

/// A server in `ns` at `addr:9000` that keeps every connection: it answers
/// each line with its name and the client address it sees, and on
/// [`PushServer::push`] writes to every connection without being asked,
/// as a server pushing to long-lived clients does.
struct PushServer {
    name: &'static str,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PushServer {
    fn start(ns: &Netns, addr: Ipv4Addr, name: &'static str) -> PushServer {
        use std::{
            io::{BufRead, BufReader, Write},
            sync::{atomic::Ordering, Arc, Mutex},
        };
        let conns: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let stop: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (c, s) = (conns.clone(), stop.clone());
        let thread = ns.run(move || {
            let l = std::net::TcpListener::bind((addr, 9000)).unwrap_or_else(|e| panic!("bind {addr}:9000: {e}"));
            l.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            let started = std::time::Instant::now();
            while !s.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                match l.accept() {
                    Ok((stream, peer)) => {
                        stream.set_nonblocking(false).unwrap();
                        stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                        c.lock().unwrap().push(stream.try_clone().unwrap());
                        let s = s.clone();
                        std::thread::spawn(move || {
                            let mut w = stream.try_clone().unwrap();
                            let mut r = BufReader::new(stream);
                            let mut line = String::new();
                            while !s.load(Ordering::Relaxed) {
                                line.clear();
                                match r.read_line(&mut line) {
                                    Ok(0) => return,
                                    Ok(_) => {
                                        if w.write_all(format!("{name} {}\n", peer.ip()).as_bytes()).is_err() {
                                            return;
                                        }
                                    }
                                    Err(_) => continue, // read timeout: check `stop`
                                }
                            }
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => panic!("accept on {addr}:9000: {e}"),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("push server did not start");
        PushServer {
            name,
            conns,
            stop,
            thread: Some(thread),
        }
    }

    /// Writes `push <name>` to every connection; returns how many.
    fn push(&self) -> usize {
        use std::io::Write;
        let mut conns = self.conns.lock().unwrap();
        for c in conns.iter_mut() {
            c.write_all(format!("push {}\n", self.name).as_bytes()).unwrap();
        }
        conns.len()
    }
}

impl Drop for PushServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP server on `addr`:9000 in `ns` that answers every datagram with
/// its name (as a DNS server answers a flood of queries: the answers
/// look their flows' reply entries up, which keeps the flood's entries as
/// recently used as anyone's in the LRU), remembers who sent `hello`, and
/// on [`UdpPushServer::push`] sends `push <name>` to each of those
/// unasked.
struct UdpPushServer {
    name: &'static str,
    socket: std::net::UdpSocket,
    peers: std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpPushServer {
    fn start(ns: &Netns, addr: Ipv4Addr, name: &'static str) -> UdpPushServer {
        use std::sync::{atomic::Ordering, Arc, Mutex};
        let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let stop: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let socket = ns
            .run(move || {
                std::net::UdpSocket::bind((addr, 9000)).unwrap_or_else(|e| panic!("bind {addr}:9000/udp: {e}"))
            })
            .join()
            .unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let (sock, p, s) = (socket.try_clone().unwrap(), peers.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue; // read timeout: check `stop`
                };
                if &buf[..n] == b"hello" {
                    let mut peers = p.lock().unwrap();
                    if !peers.contains(&peer) {
                        peers.push(peer);
                    }
                }
                let _ = sock.send_to(name.as_bytes(), peer);
            }
        });
        UdpPushServer {
            name,
            socket,
            peers,
            stop,
            thread: Some(thread),
        }
    }

    /// Sends `push <name>` to every peer; returns how many.
    fn push(&self) -> usize {
        let peers = self.peers.lock().unwrap();
        for p in peers.iter() {
            self.socket
                .send_to(format!("push {}", self.name).as_bytes(), p)
                .unwrap();
        }
        peers.len()
    }
}

impl Drop for UdpPushServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The cluster of the flood guard's tests: NodePort `port` of Service
/// `name` (`protocol`, ClusterIP `cluster_ip`) with one endpoint on each
/// node, node A's agent with `ct_entries` conntrack entries and the guard's
/// quota from `DATAPLANE_TEST_NEW_FLOWS_PER_CPU` (default 200; `0` turns
/// the guard off, to see the test fail), which it returns too.
fn flood_test_cluster(name: &str, protocol: &str, cluster_ip: &str, port: u16, ct_entries: u32) -> (Cluster, String) {
    let guard = std::env::var("DATAPLANE_TEST_NEW_FLOWS_PER_CPU").unwrap_or_else(|_| "200".into());
    let svc = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: ingress}}
spec:
  type: NodePort
  clusterIP: {cluster_ip}
  ports: [{{name: push, protocol: {protocol}, port: 90, targetPort: 9000, nodePort: {port}}}]
"
    );
    let slice =
        dataplane_tests::manifests::two_node_slice("ingress", &format!("{name}-abcde"), name, ("push", protocol, 9000));
    let ct = ct_entries.to_string();
    let c = cluster_of(
        vec![("service.yaml", svc), ("slice.yaml", slice)],
        true,
        &["--ct-max-entries", &ct, "--new-flows-per-cpu", &guard],
        |_| {},
    );
    (c, guard)
}

/// What a flood of the flood guard's tests sends, from spoofed sources.
#[derive(Clone, Copy, Debug)]
enum Flood {
    /// TCP SYNs: new connections.
    Syns,
    /// TCP ACKs of connections nobody opened, as a flow picked up
    /// mid-stream would send.
    Acks,
    /// UDP datagrams.
    Datagrams,
}

impl Flood {
    fn what(self) -> &'static str {
        match self {
            Flood::Syns => "SYNs",
            Flood::Acks => "ACKs",
            Flood::Datagrams => "datagrams",
        }
    }
}

/// The flood of the flood guard's tests: spoofed packets at node A's
/// NodePort `port`, in batches until its XDP program has translated at
/// least four times `ct_entries` new flows (bounded). Returns how many it
/// served without conntrack state.
fn flood_node_a(c: &Cluster, port: u16, ct_entries: u32, flood: Flood) -> f64 {
    let agent = &c._agents[0];
    let new_flows = |a: &Agent| a.fresh_metrics().unwrap()[r#"dataplane_datapath_packets_total{reason="nat_new_flow",drop="false"}"#];
    let before = new_flows(agent);
    let macs = (mac(&c.t.client, "eth0"), mac(&c.t.node_a, "ve"));
    let mut sent = 0;
    for batch in 0..100 {
        if new_flows(agent) - before >= (4 * ct_entries + 1000) as f64 {
            break;
        }
        sent += spoofed(&c.t.client, "eth0", macs, (NODE_A_EXT, port), batch * 2000, 2000, flood);
    }
    let flooded = new_flows(agent) - before;
    let m = agent.fresh_metrics().unwrap();
    let stateless = m[r#"dataplane_conntrack_events_total{event="stateless_new_flow"}"#];
    let what = flood.what();
    eprintln!("{sent} spoofed {what} sent, {flooded} translated by XDP, {stateless} without conntrack state");
    assert!(
        flooded >= (4 * ct_entries) as f64,
        "the flood reached the programs: {flooded} {what} translated of {sent} sent"
    );
    stateless
}

/// The long-lived flows of the flood guard's tests reached both backends
/// (named `a` and `b`), the remote one SNATed.
fn both_backends<'a>(names: impl Iterator<Item = &'a String>) {
    let mut by_backend = BTreeMap::new();
    for who in names {
        *by_backend.entry(who.clone()).or_insert(0) += 1;
    }
    assert_eq!(
        by_backend.keys().collect::<Vec<_>>(),
        ["a", "b"],
        "both backends, the remote one SNATed: {by_backend:?}"
    );
}

/// The MAC address of `iface` in `ns`.
fn mac(ns: &Netns, iface: &str) -> [u8; 6] {
    let s = ns.exec(&["cat", &format!("/sys/class/net/{iface}/address")]).unwrap();
    let b: Vec<u8> = s
        .trim()
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap())
        .collect();
    b.try_into().unwrap_or_else(|b| panic!("MAC of {iface}: {b:?}"))
}

/// Sends `count` packets of `flood` (UDP datagrams read `flood`) to `dst`
/// from `iface` of `ns` through a packet socket, from spoofed sources
/// (198.18.200.10-250, every port). Returns how many the socket took.
fn spoofed(
    ns: &Netns,
    iface: &'static str,
    macs: ([u8; 6], [u8; 6]),
    dst: (Ipv4Addr, u16),
    first: u32,
    count: u32,
    flood: Flood,
) -> u32 {
    ns.run(move || {
        let (src_mac, dst_mac) = macs;
        // SAFETY: plain socket calls on a socket this function owns; the
        // sockaddr_ll outlives each call.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
            let name = std::ffi::CString::new(iface).unwrap();
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&dst_mac);
            let mut sent = 0;
            for i in first..first + count {
                let src = Ipv4Addr::new(198, 18, 200, 10 + (i % 241) as u8);
                let sport = 1024 + (i / 241 % 64000) as u16;
                let mut f = match flood {
                    Flood::Datagrams => dataplane::packet::Frame::udp((src, sport), dst, b"flood").build(),
                    Flood::Syns => dataplane::packet::Frame::tcp((src, sport), dst, dataplane::packet::SYN).build(),
                    Flood::Acks => dataplane::packet::Frame::tcp((src, sport), dst, dataplane::packet::ACK).build(),
                };
                f[..6].copy_from_slice(&dst_mac);
                f[6..12].copy_from_slice(&src_mac);
                let rc = libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                if rc > 0 {
                    sent += 1;
                }
            }
            libc::close(fd);
            sent
        }
    })
    .join()
    .unwrap()
}

/// The flood guard (issue: no flood guard): long-lived connections through
/// a NodePort, to a local backend and to a remote one (SNATed), keep working
/// while spoofed SYNs, four times the conntrack map's entries and more, hit
/// the node's XDP program. The servers then write first, so that each
/// flow's reply entry must still be there (the backend's packet finds no
/// translation otherwise, and the client, which talks to the NodePort,
/// never sees it); then the clients ask again. Without the guard
/// (`--new-flows-per-cpu 0`) the flood evicts the connections' entries and
/// the pushes are lost.
#[test]
fn established_node_port_connections_survive_a_syn_flood_of_four_times_the_conntrack_size() {
    connections_survive(Flood::Syns, "push", "198.19.0.41", 30090);
}

/// The same with spoofed ACKs of connections nobody opened: a TCP segment
/// of an untracked tuple counts against the guard's quota as a SYN does,
/// and beyond it goes without state until the backend answers, so the
/// flood cannot evict the connections' entries (netfilter's early drop
/// spares assured flows alike). Without the guard, or when ACKs took
/// state whatever the quota (before 0.2.0), the pushes are lost.
#[test]
fn established_node_port_connections_survive_an_ack_flood_of_four_times_the_conntrack_size() {
    connections_survive(Flood::Acks, "push-ack", "198.19.0.43", 30092);
}

/// The body of the TCP flood tests: Service `name` (ClusterIP
/// `cluster_ip`, NodePort `port`) flooded with `flood`.
fn connections_survive(flood: Flood, name: &str, cluster_ip: &str, port: u16) {
    const CT_ENTRIES: u32 = 4096;
    const CONNS: usize = 24;
    let (c, guard) = flood_test_cluster(name, "TCP", cluster_ip, port, CT_ENTRIES);
    let servers = [
        PushServer::start(&c.t.backend_a, BACKEND_A, "a"),
        PushServer::start(&c.t.backend_b, BACKEND_B, "b"),
    ];
    let to = SocketAddr::from((NODE_A_EXT, port));
    // The long-lived connections, each asked once: (backend, reader).
    let conns =
        c.t.client
            .run(move || {
                let mut conns = Vec::new();
                for i in 0..CONNS {
                    let mut c = Conn::connect(to, TIMEOUT).map_err(|e| format!("connection {i} to {to}: {e}"))?;
                    let (who, _) = c.ask_peer().map_err(|e| format!("connection {i}: {e}"))?;
                    conns.push((who, c));
                }
                Ok::<_, String>(conns)
            })
            .join()
            .unwrap()
            .unwrap();
    both_backends(conns.iter().map(|(who, _)| who));

    let stateless = flood_node_a(&c, port, CT_ENTRIES, flood);

    // The servers write first: every connection must get its push.
    let pushed: usize = servers.iter().map(|s| s.push()).sum();
    assert_eq!(pushed, CONNS, "every connection reached a push server");
    let failures =
        c.t.client
            .run(move || {
                let mut failures = Vec::new();
                for (i, (who, mut c)) in conns.into_iter().enumerate() {
                    let pushed = match c.read_line() {
                        Ok(line) if line.trim() == format!("push {who}") => None,
                        Ok(line) => Some(format!("pushed {line:?}")),
                        Err(e) => Some(format!("no push: {e}")),
                    };
                    // Asked only if the push came: a broken connection would
                    // wait for its timeout once more.
                    let asked = match pushed {
                        Some(_) => None,
                        None => match c.ask() {
                            Ok(again) if again == who => None,
                            Ok(other) => Some(format!("moved to {other}")),
                            Err(e) => Some(format!("asked again: {e}")),
                        },
                    };
                    if let Some(why) = pushed.or(asked) {
                        failures.push(format!("connection {i} to {who}: {why}"));
                    }
                }
                failures
            })
            .join()
            .unwrap();
    assert!(
        failures.is_empty(),
        "{} of {CONNS} connections broke under the flood of {}:\n{}",
        failures.len(),
        flood.what(),
        failures.join("\n")
    );
    if guard != "0" {
        assert!(stateless > 0.0, "the flood guard served {} without state", flood.what());
    }
}

/// The flood guard for UDP: long-lived UDP sessions (connected sockets)
/// through a NodePort, to a local backend and to a remote one (SNATed),
/// keep working while spoofed datagrams of new tuples, four times the
/// conntrack map's entries and more, hit the node's XDP program. Beyond
/// the quota those are served without state (a spoofed source never
/// answers an answer, so it never gets any), so the sessions' entries are
/// not evicted: the servers then send first, and each connected client
/// socket must receive the push from the NodePort (from anywhere else its
/// socket drops it); then the clients ask again. Without the guard
/// (`DATAPLANE_TEST_NEW_FLOWS_PER_CPU=0`) the flood evicts the sessions'
/// entries and the pushes are lost.
#[test]
fn udp_sessions_through_a_node_port_survive_a_flood_of_four_times_the_conntrack_size() {
    const CT_ENTRIES: u32 = 4096;
    const SESSIONS: usize = 24;
    const PORT: u16 = 30091;
    let (c, guard) = flood_test_cluster("push-udp", "UDP", "198.19.0.42", PORT, CT_ENTRIES);
    let servers = [
        UdpPushServer::start(&c.t.backend_a, BACKEND_A, "a"),
        UdpPushServer::start(&c.t.backend_b, BACKEND_B, "b"),
    ];
    let to = SocketAddr::from((NODE_A_EXT, PORT));
    // Each session: a socket connected to the NodePort, its backend named
    // by the answer to its `hello`.
    fn hello(s: &std::net::UdpSocket) -> Result<String, String> {
        s.send(b"hello").map_err(|e| format!("send: {e}"))?;
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).map_err(|e| format!("no answer: {e}"))?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
    let sessions =
        c.t.client
            .run(move || {
                let mut sessions = Vec::new();
                for i in 0..SESSIONS {
                    let s = std::net::UdpSocket::bind((EXT_CLIENT, 0)).map_err(|e| format!("bind: {e}"))?;
                    s.connect(to).map_err(|e| format!("connect: {e}"))?;
                    s.set_read_timeout(Some(TIMEOUT)).unwrap();
                    let who = hello(&s).map_err(|e| format!("session {i} to {to}: {e}"))?;
                    sessions.push((who, s));
                }
                Ok::<_, String>(sessions)
            })
            .join()
            .unwrap()
            .unwrap();
    both_backends(sessions.iter().map(|(who, _)| who));

    let stateless = flood_node_a(&c, PORT, CT_ENTRIES, Flood::Datagrams);

    // The servers send first: every session must get its push.
    let pushed: usize = servers.iter().map(|s| s.push()).sum();
    assert_eq!(pushed, SESSIONS, "every session reached a push server");
    let failures =
        c.t.client
            .run(move || {
                let mut failures = Vec::new();
                for (i, (who, s)) in sessions.into_iter().enumerate() {
                    let mut buf = [0u8; 64];
                    let pushed = match s.recv(&mut buf) {
                        Ok(n) if buf[..n] == *format!("push {who}").as_bytes() => None,
                        Ok(n) => Some(format!("pushed {:?}", String::from_utf8_lossy(&buf[..n]))),
                        Err(e) => Some(format!("no push: {e}")),
                    };
                    let asked = match pushed {
                        Some(_) => None,
                        None => match hello(&s) {
                            Ok(again) if again == who => None,
                            Ok(other) => Some(format!("moved to {other}")),
                            Err(e) => Some(format!("asked again: {e}")),
                        },
                    };
                    if let Some(why) = pushed.or(asked) {
                        failures.push(format!("session {i} to {who}: {why}"));
                    }
                }
                failures
            })
            .join()
            .unwrap();
    assert!(
        failures.is_empty(),
        "{} of {SESSIONS} sessions broke under the flood:\n{}",
        failures.len(),
        failures.join("\n")
    );
    if guard != "0" {
        assert!(stateless > 0.0, "the flood guard served datagrams without state");
    }
}
