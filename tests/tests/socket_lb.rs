//! Socket-level load balancing (`dataplane run --socket-lb-cgroup`): the
//! real agent attaches its cgroup programs to the test's own cgroup, and
//! real TCP/UDP clients (`dp-client`, a process in that cgroup and in the
//! client namespace) reach Services through a backend chosen when they
//! connect or send. The packets then carry the backend's address from the
//! client on: the node's TC program (attached too) finds no Service in
//! them.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use dataplane::{bpf::cgroup, inspect};
use dataplane_tests::{
    agent::Agent,
    cgroup::TestCgroup,
    manifests::{service, service_ips, slice, slice_ips},
    netns::{backend_addr, backend_addr6, Topology, CLIENT_ADDR},
    servers::{tcp_server, udp_server, Conn, Server},
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x19, 0, 0, 0, 0, 0x10);
const PORTS: &[(&str, u16, &str)] = &[("http", 80, "TCP"), ("dns", 53, "UDP")];
const TARGETS: &[(&str, u16, &str)] = &[("http", 8080, "TCP"), ("dns", 5353, "UDP")];

/// Backend i (1-based) answers with its name "b{i}" on TCP 8080 and UDP
/// 5353, on its IPv4 address and (with `v6`) its IPv6 one.
fn start_servers(t: &Topology, v6: bool) -> Vec<Server> {
    let mut v = Vec::new();
    for (i, ns) in t.backends.iter().enumerate() {
        let name = format!("b{}", i + 1);
        let mut addrs = vec![IpAddr::from(backend_addr(i + 1))];
        if v6 {
            addrs.push(backend_addr6(i + 1).into());
        }
        for a in addrs {
            v.push(tcp_server(ns, a, 8080, &name));
            v.push(udp_server(ns, a, 5353, &name));
        }
    }
    v
}

fn manifests(backends: &[usize]) -> Vec<(String, String)> {
    let addrs: Vec<Ipv4Addr> = backends.iter().map(|i| backend_addr(*i)).collect();
    vec![
        ("service.yaml".into(), service("shop", "web", VIP, PORTS)),
        ("slice.yaml".into(), slice("shop", "web-abcde", "web", TARGETS, &addrs)),
    ]
}

/// The agent with TC on the node's interfaces and the socket programs on
/// `cg`.
fn start_agent(t: &Topology, cg: &TestCgroup, files: &[(String, String)]) -> Agent {
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (n.as_str(), c.as_str())).collect();
    let cg = cg.path().display().to_string();
    Agent::start_with(&t.node, &t.node_ifaces(), &[], &files, &["--socket-lb-cgroup", &cg]).unwrap()
}

/// `dp-client ARGS` in the client namespace, as a process in `cg`: its
/// JSON lines.
fn client(t: &Topology, cg: &TestCgroup, args: &[&str]) -> Vec<Value> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &t.client.name, env!("CARGO_BIN_EXE_dp-client")])
        .args(args);
    json_lines(cg.output(&mut cmd, Duration::from_secs(60)).unwrap(), args)
}

/// What a `dp-client` run printed, one JSON value per line.
fn json_lines(out: std::process::Output, args: &[&str]) -> Vec<Value> {
    assert!(
        out.status.success(),
        "dp-client {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("dp-client printed {l:?}: {e}")))
        .collect()
}

fn all_ok(results: &[Value], what: &str) {
    for r in results {
        assert_eq!(r["ok"], true, "{what}: {r}");
    }
}

fn backends_of(results: &[Value]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in results {
        *m.entry(r["backend"].as_str().unwrap_or_default().to_string())
            .or_insert(0) += 1;
    }
    m
}

/// The socket-level counters and the packet reasons of the agent's maps.
fn counters(agent: &Agent) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let maps = inspect::open_pinned(&agent.pins).unwrap();
    let s = inspect::stats(&maps).unwrap();
    (
        s.socket_lb.into_iter().map(|e| (e.event, e.count)).collect(),
        s.reasons.into_iter().map(|r| (r.reason, r.packets)).collect(),
    )
}

/// TCP: each connection is translated when it connects (spread over both
/// backends), the application still sees the VIP as its peer, the backend
/// sees the client's own address, and no packet of these connections is
/// translated by the TC program. A client outside the cgroup (this test
/// process) is not affected by the socket programs and still reaches the
/// Service through the per-packet path.
#[test]
fn tcp_is_translated_at_connect_time_and_the_peer_stays_the_vip() {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t, false);
    let cg = TestCgroup::new().unwrap();
    let agent = start_agent(&t, &cg, &manifests(&[1, 2]));
    let (sock0, reasons0) = counters(&agent);

    let r = client(&t, &cg, &["tcp", "198.19.0.10:80", "40"]);
    assert_eq!(r.len(), 40);
    all_ok(&r, "connection through the VIP");
    let spread = backends_of(&r);
    assert!(
        spread.get("b1").copied().unwrap_or(0) > 0 && spread.get("b2").copied().unwrap_or(0) > 0,
        "40 connections did not reach both backends: {spread:?}"
    );
    for c in &r {
        assert_eq!(c["peer"], "198.19.0.10:80", "getpeername() showed the backend: {c}");
        assert_eq!(
            c["seen_as"],
            CLIENT_ADDR.to_string(),
            "the backend saw another source: {c}"
        );
    }
    let (sock, reasons) = counters(&agent);
    let d = |m: &BTreeMap<String, u64>, m0: &BTreeMap<String, u64>, k: &str| m[k] - m0[k];
    assert_eq!(d(&sock, &sock0, "connect_translated"), 40, "{sock:?}");
    assert!(d(&sock, &sock0, "peer_restored") >= 40, "{sock:?}");
    assert_eq!(
        d(&reasons, &reasons0, "nat_new_flow"),
        0,
        "TC translated a flow: {reasons:?}"
    );
    assert_eq!(d(&reasons, &reasons0, "nat_established"), 0, "{reasons:?}");
    assert!(
        d(&reasons, &reasons0, "pass_no_service") > 0,
        "the TC program saw none of the packets: {reasons:?}"
    );

    // A process outside the cgroup: per-packet translation.
    let who = t
        .client
        .run(|| {
            let mut c = Conn::connect(SocketAddr::from((VIP, 80)), Duration::from_secs(3)).unwrap();
            c.ask().unwrap()
        })
        .join()
        .unwrap();
    assert!(who == "b1" || who == "b2", "{who}");
    let (sock2, reasons2) = counters(&agent);
    assert_eq!(sock2["connect_translated"], sock["connect_translated"], "{sock2:?}");
    assert_eq!(d(&reasons2, &reasons, "nat_new_flow"), 1, "{reasons2:?}");
}

/// UDP: an unconnected socket's datagrams to the VIP go to one backend
/// while it keeps talking, and the answers come from the VIP (recvmsg
/// restores it); new sockets spread over the backends; a connected socket
/// gets the VIP back from recvfrom and getpeername.
#[test]
fn udp_datagrams_stick_to_one_backend_per_socket_and_answers_come_from_the_vip() {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t, false);
    let cg = TestCgroup::new().unwrap();
    let agent = start_agent(&t, &cg, &manifests(&[1, 2]));
    let (sock0, _) = counters(&agent);

    let r = client(&t, &cg, &["udp", "198.19.0.10:53", "20"]);
    assert_eq!(r.len(), 20);
    all_ok(&r, "datagram through the VIP");
    assert_eq!(backends_of(&r).len(), 1, "one socket's datagrams spread: {r:?}");
    for d in &r {
        assert_eq!(d["from"], "198.19.0.10:53", "the answer came from the backend: {d}");
    }

    let r = client(&t, &cg, &["udp-each", "198.19.0.10:53", "24"]);
    all_ok(&r, "datagram from a new socket");
    assert_eq!(backends_of(&r).len(), 2, "24 sockets all reached one backend: {r:?}");

    let r = client(&t, &cg, &["udp-connected", "198.19.0.10:53", "10"]);
    all_ok(&r, "datagram on a connected socket");
    assert_eq!(backends_of(&r).len(), 1, "{r:?}");
    for d in &r {
        assert_eq!(d["from"], "198.19.0.10:53", "{d}");
        assert_eq!(d["peer"], "198.19.0.10:53", "{d}");
    }
    let (sock, _) = counters(&agent);
    let d = |k: &str| sock[k] - sock0[k];
    // 20 + 24 sendmsg calls with an address; the connected socket is
    // translated once, when it connects.
    assert_eq!(d("sendmsg_translated"), 44, "{sock:?}");
    assert_eq!(d("connect_translated"), 1, "{sock:?}");
    assert!(d("reply_restored") >= 54, "{sock:?}");
}

/// A Service without endpoints: connect() and sendto() fail at once with
/// ECONNREFUSED, as kube-proxy's reject does for packets; counted per
/// Service and as socket-level rejects.
#[test]
fn service_without_endpoints_refuses_connect_and_sendto() {
    let t = Topology::new(1).unwrap();
    let _servers = start_servers(&t, false);
    let cg = TestCgroup::new().unwrap();
    let agent = start_agent(&t, &cg, &manifests(&[]));
    let r = client(&t, &cg, &["tcp", "198.19.0.10:80", "3"]);
    for c in &r {
        assert_eq!(c["errno"], libc::ECONNREFUSED, "{c}");
    }
    let r = client(&t, &cg, &["udp", "198.19.0.10:53", "2"]);
    for c in &r {
        assert_eq!(c["op"], "send", "{c}");
        assert_eq!(c["errno"], libc::ECONNREFUSED, "{c}");
    }
    let (sock, reasons) = counters(&agent);
    assert_eq!(sock["reject_no_backend"], 5, "{sock:?}");
    assert_eq!(reasons["reject_no_backend"], 0, "the packet path saw them: {reasons:?}");
    let maps = inspect::open_pinned(&agent.pins).unwrap();
    let rows = inspect::service_rows(&maps).unwrap();
    let no_backend: u64 = rows.iter().map(|r| r.no_backend).sum();
    assert_eq!(no_backend, 5, "{rows:?}");
}

/// A socket on the node reaching an externalIP of an
/// externalTrafficPolicy Local Service whose endpoints are all on other
/// nodes: kube-proxy short-circuits the node's own traffic to the
/// cluster-wide endpoints, so the connection succeeds (the per-packet path
/// would drop it: no local endpoint, and this client is in no cluster CIDR).
#[test]
fn sockets_reach_external_addresses_of_a_local_policy_service_through_every_endpoint() {
    let t = Topology::new(1).unwrap();
    let _servers = start_servers(&t, false);
    let cg = TestCgroup::new().unwrap();
    let files = [
        (
            "service.yaml",
            "apiVersion: v1
kind: Service
metadata: {name: edge, namespace: shop}
spec:
  type: NodePort
  clusterIP: 198.19.0.10
  externalIPs: [198.19.5.5]
  externalTrafficPolicy: Local
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}]
"
            .to_string(),
        ),
        (
            "slice.yaml",
            format!(
                "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: edge-abcde
  namespace: shop
  labels: {{kubernetes.io/service-name: edge}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
- addresses: [{}]
  conditions: {{ready: true}}
  nodeName: node-2
",
                backend_addr(1)
            ),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let cgroup = cg.path().display().to_string();
    let agent = Agent::start_with(
        &t.node,
        &t.node_ifaces(),
        &[],
        &files,
        &["--socket-lb-cgroup", &cgroup, "--node-name", "node-1"],
    )
    .unwrap();
    let r = client(&t, &cg, &["tcp", "198.19.5.5:80", "3"]);
    all_ok(&r, "connection to the externalIP from a socket of the node");
    assert_eq!(backends_of(&r), BTreeMap::from([("b1".to_string(), 3)]));
    let (sock, _) = counters(&agent);
    assert_eq!(sock["connect_translated"], 3, "{sock:?}");
    // The per-packet path, from the same namespace outside the cgroup: no
    // local endpoint and no cluster CIDR, dropped as traffic from outside.
    let outside = t
        .client
        .run(|| Conn::connect(SocketAddr::from(([198, 19, 5, 5], 80)), Duration::from_secs(1)).map(drop))
        .join()
        .unwrap();
    assert!(outside.is_err(), "{outside:?}");
    let (_, reasons) = counters(&agent);
    assert!(reasons["drop_no_local_backend"] >= 1, "{reasons:?}");
}

/// A socket connecting or sending to a ClusterIP on a port its Service
/// does not define is refused at once (kube-proxy rejects it in its output
/// chain), counted on the ClusterIP's entry for other ports; the
/// Service's own port is served.
#[test]
fn ports_a_cluster_ip_lacks_are_refused_at_connect_and_sendto() {
    let t = Topology::new(1).unwrap();
    let _servers = start_servers(&t, false);
    let cg = TestCgroup::new().unwrap();
    let agent = start_agent(&t, &cg, &manifests(&[1]));
    all_ok(
        &client(&t, &cg, &["tcp", "198.19.0.10:80", "1"]),
        "the Service's own port",
    );
    for c in &client(&t, &cg, &["tcp", "198.19.0.10:81", "2"]) {
        assert_eq!(c["errno"], libc::ECONNREFUSED, "{c}");
    }
    for c in &client(&t, &cg, &["udp", "198.19.0.10:54", "1"]) {
        assert_eq!(
            (&c["op"], &c["errno"]),
            (&"send".into(), &libc::ECONNREFUSED.into()),
            "{c}"
        );
    }
    let (sock, _) = counters(&agent);
    assert_eq!(sock["reject_no_backend"], 3, "{sock:?}");
    let maps = inspect::open_pinned(&agent.pins).unwrap();
    let rows = inspect::service_rows(&maps).unwrap();
    let other = rows
        .iter()
        .find(|r| r.frontend == "198.19.0.10:*")
        .expect("the entry for other ports");
    assert_eq!(other.no_backend, 3, "{rows:?}");
}

/// IPv6 Services from IPv6 sockets, and an IPv4 Service from an IPv6
/// socket through its IPv4-mapped address (`::ffff:198.19.0.10`): both
/// translated at connect time, the peer shown as the address connected to.
#[test]
fn ipv6_and_ipv4_mapped_addresses() {
    let t = Topology::new(2).unwrap();
    t.enable_ipv6().unwrap();
    let _servers = start_servers(&t, true);
    let cg = TestCgroup::new().unwrap();
    let v6: Vec<IpAddr> = (1..=2).map(|i| backend_addr6(i).into()).collect();
    let v4: Vec<IpAddr> = (1..=2).map(|i| backend_addr(i).into()).collect();
    let files = vec![
        (
            "service.yaml".to_string(),
            service_ips("shop", "web", &[VIP.into(), VIP6.into()], PORTS),
        ),
        (
            "slice4.yaml".to_string(),
            slice_ips("shop", "web-v4", "web", TARGETS, &v4),
        ),
        (
            "slice6.yaml".to_string(),
            slice_ips("shop", "web-v6", "web", TARGETS, &v6),
        ),
    ];
    let agent = start_agent(&t, &cg, &files);
    let (sock0, _) = counters(&agent);

    let to6 = format!("[{VIP6}]:80");
    let r = client(&t, &cg, &["tcp", &to6, "20"]);
    all_ok(&r, "IPv6 connection");
    assert_eq!(backends_of(&r).len(), 2, "{r:?}");
    for c in &r {
        assert_eq!(c["peer"], to6.as_str(), "{c}");
    }
    let r = client(&t, &cg, &["udp", &format!("[{VIP6}]:53"), "5"]);
    all_ok(&r, "IPv6 datagram");
    for d in &r {
        assert_eq!(d["from"], format!("[{VIP6}]:53"), "{d}");
    }

    let mapped = "[::ffff:198.19.0.10]:80";
    let r = client(&t, &cg, &["tcp", mapped, "20"]);
    all_ok(&r, "IPv4-mapped connection");
    assert_eq!(backends_of(&r).len(), 2, "{r:?}");
    for c in &r {
        assert_eq!(c["peer"], mapped, "{c}");
    }
    let r = client(&t, &cg, &["udp", "[::ffff:198.19.0.10]:53", "5"]);
    all_ok(&r, "IPv4-mapped datagram");
    for d in &r {
        assert_eq!(d["from"], "[::ffff:198.19.0.10]:53", "{d}");
    }
    let (sock, _) = counters(&agent);
    assert_eq!(sock["connect_translated"] - sock0["connect_translated"], 40, "{sock:?}");
    assert_eq!(sock["sendmsg_translated"] - sock0["sendmsg_translated"], 10, "{sock:?}");
}

/// sessionAffinity ClientIP: a client (its network namespace) keeps its
/// backend across connections; without affinity the same 30 connections
/// spread (see the TCP test).
#[test]
fn client_ip_affinity_keeps_a_namespace_on_one_backend() {
    let t = Topology::new(3).unwrap();
    let _servers = start_servers(&t, false);
    let cg = TestCgroup::new().unwrap();
    let svc = service("shop", "web", VIP, PORTS).replace(
        "  type: ClusterIP\n",
        "  type: ClusterIP\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}\n",
    );
    let addrs: Vec<Ipv4Addr> = (1..=3).map(backend_addr).collect();
    let files = vec![
        ("service.yaml".to_string(), svc),
        (
            "slice.yaml".to_string(),
            slice("shop", "web-abcde", "web", TARGETS, &addrs),
        ),
    ];
    let _agent = start_agent(&t, &cg, &files);
    let r = client(&t, &cg, &["tcp", "198.19.0.10:80", "30"]);
    all_ok(&r, "connection with affinity");
    assert_eq!(
        backends_of(&r).len(),
        1,
        "connections spread despite ClientIP affinity: {r:?}"
    );
    let r2 = client(&t, &cg, &["udp-each", "198.19.0.10:53", "10"]);
    all_ok(&r2, "datagram with affinity");
    assert_eq!(backends_of(&r2).len(), 1, "{r2:?}");
}

/// An open connection keeps its backend when that backend leaves the
/// Service (as conntrack keeps it in the packet path); new connections go
/// to the remaining one.
#[test]
fn an_open_connection_keeps_its_backend_and_new_ones_avoid_a_removed_one() {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t, false);
    let cg = TestCgroup::new().unwrap();
    let mut agent = start_agent(&t, &cg, &manifests(&[1]));
    std::thread::scope(|s| {
        let hold = s.spawn(|| client(&t, &cg, &["tcp-hold", "198.19.0.10:80", "2.0"]));
        // The held connection is open once the agent's counters show it
        // translated at connect().
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while agent.translations().unwrap().0 < 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the held connection never connected"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let new = manifests(&[2]);
        agent.update("slice.yaml", &new[1].1).unwrap();
        let r = client(&t, &cg, &["tcp", "198.19.0.10:80", "20"]);
        all_ok(&r, "new connection after the change");
        assert_eq!(backends_of(&r).keys().collect::<Vec<_>>(), ["b2"], "{r:?}");
        let held = hold.join().unwrap();
        assert_eq!(held.len(), 1, "{held:?}");
        let held = &held[0];
        assert_eq!(held["ok"], true, "the open connection broke: {held}");
        assert_eq!(held["backends"], serde_json::json!(["b1"]), "{held}");
        assert!(held["exchanges"].as_u64().unwrap() > 20, "{held}");
    });
}

/// `dp-client ARGS` in the client namespace but outside the cgroup (the
/// packet path): its JSON lines.
fn client_outside(t: &Topology, args: &[&str]) -> Vec<Value> {
    // dp-client bounds its own run (60 s at most).
    let out = Command::new("ip")
        .args(["netns", "exec", &t.client.name, env!("CARGO_BIN_EXE_dp-client")])
        .args(args)
        .output()
        .unwrap();
    json_lines(out, args)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// UDP flows leave an endpoint once it stops serving, as kube-proxy clears
/// stale UDP conntrack entries; while it is terminating but still serving,
/// they stay. Both paths at once: an unconnected socket in the cgroup
/// (the socket programs' forward entry) and one outside it (the TC
/// program's conntrack), each a datagram every 20 ms from one port.
#[test]
fn udp_flows_leave_an_endpoint_once_it_stops_serving() {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t, false);
    let cg = TestCgroup::new().unwrap();
    let mut agent = start_agent(&t, &cg, &manifests(&[1]));
    let both = slice("shop", "web-abcde", "web", TARGETS, &[backend_addr(1), backend_addr(2)]);
    let ready = "conditions: {ready: true, serving: true, terminating: false}";
    assert!(both.contains(ready), "{both}");
    let terminating = both.replacen(ready, "conditions: {ready: false, serving: true, terminating: true}", 1);
    let only_b2 = manifests(&[2]).remove(1).1;
    let hold = ["udp-hold", "198.19.0.10:53", "3.5"];
    let (results, marks) = std::thread::scope(|s| {
        let socket = s.spawn(|| client(&t, &cg, &hold));
        let packet = s.spawn(|| client_outside(&t, &hold));
        // Phases of the held UDP flows (they send for 3.5 s): a stretch of
        // time with each endpoint set, so each phase carries datagrams; the
        // checks below use the marks, not these durations.
        std::thread::sleep(Duration::from_millis(700));
        // b1 terminating (still serving), b2 ready: new flows go to b2,
        // b1's flows stay.
        agent.update("slice.yaml", &terminating).unwrap();
        let terminating_at = unix_ms();
        std::thread::sleep(Duration::from_millis(900));
        // b1 gone: its flows are cleared, the next datagrams go to b2.
        let gone_from = unix_ms();
        agent.update("slice.yaml", &only_b2).unwrap();
        let gone_at = unix_ms();
        let results = [("socket", socket.join().unwrap()), ("packet", packet.join().unwrap())];
        (results, (terminating_at, gone_from, gone_at))
    });
    let (terminating_at, gone_from, gone_at) = marks;
    for (path, r) in &results {
        assert_eq!(r.len(), 1, "{path}: {r:?}");
        let answers: Vec<(u64, &str)> = r[0]["answers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a[0].as_u64().unwrap(), a[1].as_str().unwrap()))
            .collect();
        assert_eq!(r[0]["from"], serde_json::json!(["198.19.0.10:53"]), "{path}: {}", r[0]);
        // The answers that arrived within (from, to) Unix ms: at least 10,
        // all from `want`.
        let window = |from: u64, to: u64, want: &str, what: &str| {
            let w: Vec<&str> = answers
                .iter()
                .filter(|(ms, _)| (from + 1..to).contains(ms))
                .map(|(_, b)| *b)
                .collect();
            assert!(w.len() >= 10, "{path}: only {} answers {what}: {}", w.len(), r[0]);
            assert!(
                w.iter().all(|b| *b == want),
                "{path}: not all from {want} {what}: {}",
                r[0]
            );
        };
        window(
            terminating_at,
            gone_from,
            "b1",
            "while b1 was terminating (its flows stay)",
        );
        // One datagram may be in flight while the sync clears the flow.
        window(gone_at + 100, u64::MAX, "b2", "after b1 stopped serving");
    }
    // The packet path's flow (its original conntrack entry: the reply
    // entry stays for answers on their way) and the socket's forward entry.
    let last = agent
        .log()
        .lines()
        .rfind(|l| l.contains("sync applied"))
        .unwrap_or_default()
        .to_string();
    assert!(
        last.contains("udp_flows_cleared=2"),
        "the last sync did not report 2 entries cleared: {last}"
    );
}

/// The pinned cgroup links survive the agent: killed and restarted, it
/// adopts them (one program per hook on the cgroup, never two, never
/// none), and connections made meanwhile are still translated; `dataplane
/// cleanup` detaches them.
#[test]
fn restart_adopts_the_cgroup_links_and_cleanup_detaches_them() {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t, false);
    let cg = TestCgroup::new().unwrap();
    let mut agent = start_agent(&t, &cg, &manifests(&[1, 2]));
    let progs = |hook: &str| cgroup::attached_programs(cg.path(), hook).unwrap();
    for (_, hook) in dataplane_common::program_names::SOCK {
        assert_eq!(progs(hook).len(), 1, "{hook}: {:?}", progs(hook));
    }
    let before = progs("connect4");
    agent.kill_and_restart().unwrap();
    assert!(
        agent
            .log()
            .contains("socket-level load balancing attached (cgroup link, pinned link adopted"),
        "{}",
        agent.log()
    );
    for (_, hook) in dataplane_common::program_names::SOCK {
        assert_eq!(progs(hook).len(), 1, "{hook} after the restart: {:?}", progs(hook));
    }
    assert_ne!(
        progs("connect4"),
        before,
        "the restarted agent did not replace the program"
    );
    let r = client(&t, &cg, &["tcp", "198.19.0.10:80", "10"]);
    all_ok(&r, "connection after the restart");
    for c in &r {
        assert_eq!(c["peer"], "198.19.0.10:80", "{c}");
    }
    agent.stop().unwrap();
    // Stopped, the pinned programs keep serving.
    let r = client(&t, &cg, &["tcp", "198.19.0.10:80", "5"]);
    all_ok(&r, "connection with the agent stopped");
    let out = agent.cleanup().unwrap();
    assert!(out.contains("link socket-lb connect4"), "{out}");
    for (_, hook) in dataplane_common::program_names::SOCK {
        assert!(progs(hook).is_empty(), "{hook} still attached after cleanup");
    }
}

/// A path that is no cgroup v2 directory stops the agent with a message
/// that names it.
#[test]
fn a_directory_that_is_no_cgroup_is_refused_by_name() {
    let t = Topology::new(1).unwrap();
    let files = manifests(&[1]);
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (n.as_str(), c.as_str())).collect();
    let dir = std::env::temp_dir();
    let err = match Agent::start_with(
        &t.node,
        &t.node_ifaces(),
        &[],
        &files,
        &["--socket-lb-cgroup", &dir.display().to_string()],
    ) {
        Ok(_) => panic!("the agent started with --socket-lb-cgroup {}", dir.display()),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(&format!("{} is not a cgroup v2 directory", dir.display())),
        "{err}"
    );
}

/// The reverse entries (`DP_SOCK_NAT`) of socket-level translations, as
/// (socket cookie, backend port) pairs.
fn reverse_entries(agent: &Agent) -> Vec<(u64, u16)> {
    let maps = inspect::open_pinned(&agent.pins).unwrap();
    maps.sock_nat
        .iter()
        .map(|kv| kv.unwrap().0)
        .filter(|k| k.dir == dataplane_common::SOCK_NAT_REVERSE)
        .map(|k| (k.cookie, u16::from_be(k.port)))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// A closed socket's translation goes with it (the cgroup `sock_release`
/// program), instead of staying in the LRU until eviction: after 40 TCP
/// connections and 20 connected UDP sockets, each closed, no reverse entry
/// is left, while a socket still open keeps its own. Without the program
/// all 60 entries stay (checked by removing its attachment).
#[test]
fn closed_sockets_take_their_translations_with_them() {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t, false);
    let cg = TestCgroup::new().unwrap();
    let agent = start_agent(&t, &cg, &manifests(&[1, 2]));
    assert_eq!(
        cgroup::attached_programs(cg.path(), dataplane_common::program_names::SOCK_RELEASE_HOOK)
            .unwrap()
            .len(),
        1,
        "sock_release attached"
    );
    let before = reverse_entries(&agent);
    all_ok(&client(&t, &cg, &["tcp", "198.19.0.10:80", "40"]), "TCP");
    all_ok(
        &client(&t, &cg, &["udp-connected", "198.19.0.10:53", "20"]),
        "connected UDP",
    );
    // dp-client exited: every one of its sockets is closed. The programs
    // ran at each close, before the process was reaped.
    assert_eq!(reverse_entries(&agent), before, "entries of closed sockets are left");

    // An open connection keeps its entry until it closes.
    let hold = {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &t.client.name, env!("CARGO_BIN_EXE_dp-client")])
            .args(["tcp-hold", "198.19.0.10:80", "3"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cg.enter_on_exec(&mut cmd).unwrap();
        cmd.spawn().unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while reverse_entries(&agent).len() == before.len() {
        assert!(std::time::Instant::now() < deadline, "the held connection has no entry");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(reverse_entries(&agent).len(), before.len() + 1);
    let out = hold.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(reverse_entries(&agent), before, "the held connection's entry is left");
}
