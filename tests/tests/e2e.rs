//! End-to-end: the real agent (file source) in a node namespace, real TCP
//! and UDP sockets in client and backend namespaces.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use dataplane_tests::{
    agent::Agent,
    manifests::{service, slice, slice_with_conditions},
    netns::{backend_addr, Topology},
    servers::{tcp_server, Conn},
    web::{manifests, start_servers, PORTS, TARGETS, VIP},
};

const TIMEOUT: Duration = Duration::from_secs(3);

/// Backend i (1-based) answers with its name "b{i}" on TCP 8080 and UDP 5353.
fn start_agent(t: &Topology, tc: bool, xdp: bool, backends: &[usize]) -> Agent {
    let m = manifests(backends);
    let m: Vec<(&str, &str)> = m.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let ifaces = t.node_ifaces();
    Agent::start(
        &t.node,
        if tc { &ifaces } else { &[] },
        if xdp { &ifaces } else { &[] },
        &m,
    )
    .unwrap()
}

/// `n` sequential connections through the VIP from the client namespace,
/// each asking once: the backend names, or the first error.
fn connections(t: &Topology, n: usize) -> Result<BTreeMap<String, usize>, String> {
    t.client
        .run(move || {
            let mut counts = BTreeMap::new();
            for i in 0..n {
                let mut c = Conn::connect(SocketAddr::from((VIP, 80)), TIMEOUT)
                    .map_err(|e| format!("connection {i} to {VIP}:80: {e}"))?;
                let who = c.ask().map_err(|e| format!("connection {i}: {e}"))?;
                *counts.entry(who).or_insert(0) += 1;
            }
            Ok(counts)
        })
        .join()
        .unwrap()
}

/// One UDP request to the VIP: (answer, the address the answer came from).
fn udp_ask(t: &Topology) -> Result<(String, SocketAddr), String> {
    t.client
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            s.send_to(b"who", (VIP, 53)).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            let (n, from) = s
                .recv_from(&mut buf)
                .map_err(|e| format!("no UDP answer through {VIP}:53: {e}"))?;
            Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
        })
        .join()
        .unwrap()
}

fn assert_spread(counts: &BTreeMap<String, usize>, total: usize, names: &[&str]) {
    assert_eq!(counts.values().sum::<usize>(), total, "{counts:?}");
    for n in names {
        assert!(
            counts.get(*n).copied().unwrap_or(0) > 0,
            "backend {n} got no connection: {counts:?}"
        );
    }
    assert_eq!(counts.len(), names.len(), "unexpected backends: {counts:?}");
}

#[test]
fn tc_300_tcp_connections_all_succeed_and_spread_over_backends() {
    let t = Topology::new(3).unwrap();
    let _servers = start_servers(&t);
    let _agent = start_agent(&t, true, false, &[1, 2, 3]);
    let counts = connections(&t, 300).unwrap();
    eprintln!("per-backend connections: {counts:?}");
    assert_spread(&counts, 300, &["b1", "b2", "b3"]);
}

#[test]
fn udp_request_response_through_the_vip_comes_back_from_the_vip() {
    let t = Topology::new(3).unwrap();
    let _servers = start_servers(&t);
    let _agent = start_agent(&t, true, false, &[1, 2, 3]);
    let mut seen = BTreeMap::new();
    for _ in 0..30 {
        let (who, from) = udp_ask(&t).unwrap();
        assert_eq!(from, SocketAddr::from((VIP, 53)), "the reply must come from the VIP");
        *seen.entry(who).or_insert(0) += 1;
    }
    assert!(
        seen.keys().all(|k| ["b1", "b2", "b3"].contains(&k.as_str())),
        "{seen:?}"
    );
}

#[test]
fn removing_a_backend_keeps_its_open_connection_and_new_ones_avoid_it() {
    let t = Topology::new(3).unwrap();
    let _servers = start_servers(&t);
    let mut agent = start_agent(&t, true, false, &[1, 2, 3]);

    // Open a connection and learn its backend.
    let (to_main, from_test) = std::sync::mpsc::channel::<()>();
    let (to_test, from_client) = std::sync::mpsc::channel::<Result<String, String>>();
    let client = t.client.run(move || {
        let mut c = Conn::connect(SocketAddr::from((VIP, 80)), TIMEOUT).map_err(|e| e.to_string())?;
        to_test.send(c.ask().map_err(|e| e.to_string())).unwrap();
        from_test
            .recv_timeout(Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
        // After the removal: the same connection still answers, 20 times.
        let mut answers = Vec::new();
        for _ in 0..20 {
            answers.push(
                c.ask()
                    .map_err(|e| format!("open connection broke after the removal: {e}"))?,
            );
        }
        Ok::<Vec<String>, String>(answers)
    });
    let first = from_client.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    let removed: usize = first[1..].parse().unwrap();
    let remaining: Vec<usize> = (1..=3).filter(|i| *i != removed).collect();

    let m = manifests(&remaining);
    agent.update("slice.yaml", &m[1].1).unwrap();
    to_main.send(()).unwrap();
    let answers = client.join().unwrap().unwrap();
    assert!(
        answers.iter().all(|a| *a == first),
        "the open connection moved: {answers:?}"
    );

    let counts = connections(&t, 60).unwrap();
    assert!(
        !counts.contains_key(&first),
        "a new connection went to removed backend {first}: {counts:?}"
    );
    let names: Vec<String> = remaining.iter().map(|i| format!("b{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_spread(&counts, 60, &names);
}

/// XDP on every node interface, with checksum offloads off everywhere: the
/// receiving kernels verify every checksum the program rewrote.
#[test]
fn xdp_with_offloads_off_translates_tcp_and_udp_with_valid_checksums() {
    let t = Topology::new(3).unwrap();
    t.disable_offloads().unwrap();
    let _servers = start_servers(&t);
    let _agent = start_agent(&t, false, true, &[1, 2, 3]);
    let counts = connections(&t, 60).unwrap();
    assert_spread(&counts, 60, &["b1", "b2", "b3"]);
    let (_, from) = udp_ask(&t).unwrap();
    assert_eq!(from, SocketAddr::from((VIP, 53)));
}

/// TC with offloads off: full checksums rewritten by the csum helpers.
#[test]
fn tc_with_offloads_off_translates_tcp_and_udp_with_valid_checksums() {
    let t = Topology::new(2).unwrap();
    t.disable_offloads().unwrap();
    let _servers = start_servers(&t);
    let _agent = start_agent(&t, true, false, &[1, 2]);
    let counts = connections(&t, 40).unwrap();
    assert_spread(&counts, 40, &["b1", "b2"]);
    let (_, from) = udp_ask(&t).unwrap();
    assert_eq!(from, SocketAddr::from((VIP, 53)));
}

/// TC on CHECKSUM_PARTIAL skbs from local sockets, with the node completing
/// checksums when it forwards and the receivers verifying them.
#[test]
fn tc_rewrites_partial_checksums_correctly() {
    let t = Topology::new(2).unwrap();
    t.complete_partial_checksums_on_node().unwrap();
    let _servers = start_servers(&t);
    let _agent = start_agent(&t, true, false, &[1, 2]);
    let counts = connections(&t, 40).unwrap();
    assert_spread(&counts, 40, &["b1", "b2"]);
    let (_, from) = udp_ask(&t).unwrap();
    assert_eq!(from, SocketAddr::from((VIP, 53)));
}

/// sessionAffinity ClientIP: 100 connections from one client all land on
/// one backend (without it they spread, see the 300-connection test).
#[test]
fn client_ip_affinity_sends_every_connection_to_one_backend() {
    let t = Topology::new(3).unwrap();
    let _servers = start_servers(&t);
    let svc = service("shop", "web", VIP, PORTS).replace(
        "  type: ClusterIP\n",
        "  type: ClusterIP\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}\n",
    );
    let addrs: Vec<Ipv4Addr> = (1..=3).map(backend_addr).collect();
    let slice = slice("shop", "web-abcde", "web", TARGETS, &addrs);
    let ifaces = t.node_ifaces();
    let _agent = Agent::start(&t.node, &ifaces, &[], &[("service.yaml", &svc), ("slice.yaml", &slice)]).unwrap();
    let counts = connections(&t, 100).unwrap();
    assert_eq!(
        counts.len(),
        1,
        "connections spread despite ClientIP affinity: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 100);
}

/// A Service without endpoints: TCP connects and UDP requests fail with
/// ECONNREFUSED (from the RST / ICMP port unreachable), not with a timeout.
#[test]
fn service_without_endpoints_refuses_tcp_and_udp() {
    for (tc, xdp) in [(true, false), (false, true)] {
        let t = Topology::new(1).unwrap();
        let _servers = start_servers(&t);
        let _agent = start_agent(&t, tc, xdp, &[]);
        // A veth only receives what its peer sends with XDP_TX when it runs
        // an XDP program itself (it needs NAPI; here GRO did not enable it).
        // Physical NICs have no such condition. A second agent with no
        // Services gives the client's end a pass-through XDP program.
        let _client_xdp = xdp.then(|| Agent::start(&t.client, &[], &["eth0".to_string()], &[]).unwrap());
        let what = if tc { "TC" } else { "XDP" };
        let (tcp, udp) = t
            .client
            .run(|| {
                let tcp = std::net::TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), TIMEOUT).map(|_| ());
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                s.connect((VIP, 53)).unwrap();
                s.send(b"who").unwrap();
                let mut buf = [0u8; 16];
                (tcp, s.recv(&mut buf).map(|_| ()))
            })
            .join()
            .unwrap();
        let tcp = tcp.expect_err("TCP connect to a Service without endpoints succeeded");
        assert_eq!(
            tcp.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{what}: TCP got {tcp}"
        );
        let udp = udp.expect_err("UDP request to a Service without endpoints was answered");
        assert_eq!(
            udp.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{what}: UDP got {udp}"
        );
    }
}

/// A ClusterIP on a port its Service does not define (81/TCP; 53/TCP,
/// which the Service has for UDP only; 54/UDP) is refused from the VIP, as
/// kube-proxy's nftables mode rejects it ("Reject traffic to invalid ports
/// of ClusterIPs"), instead of going into the node and timing out; the
/// Service's ports keep working.
#[test]
fn cluster_ip_refuses_the_ports_its_service_lacks() {
    for (tc, xdp) in [(true, false), (false, true)] {
        let t = Topology::new(1).unwrap();
        let _servers = start_servers(&t);
        let _agent = start_agent(&t, tc, xdp, &[1]);
        // As above: the client's veth end needs an XDP program to receive
        // what XDP_TX sends back.
        let _client_xdp = xdp.then(|| Agent::start(&t.client, &[], &["eth0".to_string()], &[]).unwrap());
        let what = if tc { "TC" } else { "XDP" };
        assert_eq!(
            connections(&t, 1).map(|c| c.into_keys().collect::<Vec<_>>()),
            Ok(vec!["b1".to_string()]),
            "{what}: the Service's own port"
        );
        let (tcp, udp) = t
            .client
            .run(|| {
                let tcp: Vec<_> = [81, 53]
                    .map(|port| {
                        std::net::TcpStream::connect_timeout(&SocketAddr::from((VIP, port)), TIMEOUT).map(|_| ())
                    })
                    .into();
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                s.connect((VIP, 54)).unwrap();
                s.send(b"who").unwrap();
                let mut buf = [0u8; 16];
                (tcp, s.recv(&mut buf).map(|_| ()))
            })
            .join()
            .unwrap();
        for (port, r) in [81, 53].iter().zip(tcp) {
            let e = r.expect_err("TCP connect to a port the Service lacks succeeded");
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "{what}: TCP {VIP}:{port} got {e}"
            );
        }
        let e = udp.expect_err("UDP to a port the Service lacks was answered");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{what}: UDP got {e}");
    }
}

/// The backend's port is closed: its kernel answers with an ICMP port
/// unreachable quoting client -> backend, which the node translates so that
/// the client's socket, connected to the VIP, gets ECONNREFUSED.
#[test]
fn closed_backend_port_gives_the_udp_client_econnrefused() {
    for (tc, xdp) in [(true, false), (false, true)] {
        let t = Topology::new(1).unwrap();
        let _servers = start_servers(&t);
        let svc = service("shop", "dns", VIP, &[("dns", 53, "UDP")]);
        let sl = slice("shop", "dns-abcde", "dns", &[("dns", 5454, "UDP")], &[backend_addr(1)]);
        let ifaces = t.node_ifaces();
        let _agent = Agent::start(
            &t.node,
            if tc { &ifaces } else { &[] },
            if xdp { &ifaces } else { &[] },
            &[("svc.yaml", &svc), ("slice.yaml", &sl)],
        )
        .unwrap();
        let err = t
            .client
            .run(|| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                s.connect((VIP, 53)).unwrap();
                s.send(b"who").unwrap();
                let mut buf = [0u8; 16];
                s.recv(&mut buf).map(|_| ())
            })
            .join()
            .unwrap()
            .expect_err("a closed backend port answered");
        let what = if tc { "TC" } else { "XDP" };
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{what}: got {err}");
    }
}

/// `--bpf-debug-log` makes the programs log their decisions into the agent's
/// log; without it they log nothing.
#[test]
fn bpf_debug_log_only_when_asked_for() {
    let t = Topology::new(1).unwrap();
    let _servers = start_servers(&t);
    let m = manifests(&[1]);
    let m: Vec<(&str, &str)> = m.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let quiet = Agent::start(&t.node, &t.node_ifaces(), &[], &m).unwrap();
    assert_eq!(connections(&t, 3).unwrap().get("b1"), Some(&3));
    // Not a synchronisation: a negative assertion needs a window. A
    // logging agent's decision lines reach its log within milliseconds of
    // the packets (measured below); a quiet one must show none in 500 ms.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!quiet.log().contains("new flow"), "{}", quiet.log());
    drop(quiet);
    let loud = Agent::start_with(&t.node, &t.node_ifaces(), &[], &m, &["--bpf-debug-log"]).unwrap();
    assert_eq!(connections(&t, 3).unwrap().get("b1"), Some(&3));
    // The log text is what this test is about (the programs' decisions
    // forwarded to the agent's log), so here the wait is on the log, with
    // a deadline.
    let start = std::time::Instant::now();
    let decisions = |a: &Agent| {
        a.log()
            .lines()
            .filter(|l| l.contains("new flow") && l.contains("backend 198.18.1.2:8080"))
            .count()
    };
    while decisions(&loud) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no decision log:\n{}",
            loud.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "the 3 decision lines were in the log {:?} after the connections",
        start.elapsed()
    );
}

/// Graceful termination: a terminating endpoint keeps its open connection
/// but gets no new ones while a ready endpoint exists; when only
/// terminating endpoints are left, they serve new connections (kube-proxy's
/// fallback).
#[test]
fn terminating_endpoints_keep_their_flows_and_serve_as_a_last_resort() {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t);
    let mut agent = start_agent(&t, true, false, &[1, 2]);
    let (to_main, from_test) = std::sync::mpsc::channel::<()>();
    let (to_test, from_client) = std::sync::mpsc::channel::<Result<String, String>>();
    let client = t.client.run(move || {
        let mut c = Conn::connect(SocketAddr::from((VIP, 80)), TIMEOUT).map_err(|e| e.to_string())?;
        to_test.send(c.ask().map_err(|e| e.to_string())).unwrap();
        from_test
            .recv_timeout(Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
        (0..10)
            .map(|_| c.ask().map_err(|e| format!("open connection broke: {e}")))
            .collect::<Result<Vec<_>, _>>()
    });
    let first = from_client.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    let term: usize = first[1..].parse().unwrap();
    let other = 3 - term;
    let conds = |t_ready: bool| {
        let mut v = vec![(backend_addr(term), false, true, true)];
        v.push((backend_addr(other), t_ready, true, !t_ready));
        slice_with_conditions("shop", "web-abcde", "web", TARGETS, &v)
    };
    agent.update("slice.yaml", &conds(true)).unwrap();
    to_main.send(()).unwrap();
    let answers = client.join().unwrap().unwrap();
    assert!(
        answers.iter().all(|a| *a == first),
        "the open connection moved: {answers:?}"
    );
    let counts = connections(&t, 30).unwrap();
    assert_eq!(
        counts,
        BTreeMap::from([(format!("b{other}"), 30)]),
        "a terminating endpoint got new connections"
    );
    // Both terminating: both serve.
    agent.update("slice.yaml", &conds(false)).unwrap();
    let counts = connections(&t, 60).unwrap();
    assert_spread(&counts, 60, &["b1", "b2"]);
}

/// Interfaces selected by a pattern get the program when they appear (a pod
/// starting) and lose their link when they go, without restarting the agent.
#[test]
fn new_interfaces_matching_a_pattern_get_the_program() {
    let mut t = Topology::new(2).unwrap();
    let mut servers = start_servers(&t);
    let m = manifests(&[1, 2]);
    let m: Vec<(&str, &str)> = m.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let mut agent = Agent::start(&t.node, &["vc".to_string(), "vb*".to_string()], &[], &m).unwrap();
    let i = t.add_backend().unwrap();
    servers.push(tcp_server(&t.backends[i - 1], backend_addr(i), 8080, &format!("b{i}")));
    let iface = format!("vb{i}");
    let pin = agent.pins.join("links").join(format!("tc-{iface}"));
    // Attached: the agent pinned the program's link on the new interface,
    // then let it accept local source addresses (the last step of an
    // attach, see `ifwatch::Attacher::reconcile`).
    let node = format!("/run/netns/{}", t.node.name);
    let accept_local = move |iface: &str| {
        let (node, path) = (node.clone(), format!("/proc/sys/net/ipv4/conf/{iface}/accept_local"));
        std::thread::spawn(move || {
            dataplane_tests::netns::enter(&node);
            std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1")
        })
        .join()
        .unwrap()
    };
    agent
        .wait_until(&format!("{iface} gets the program"), Duration::from_secs(10), |_| {
            pin.exists() && accept_local(&iface)
        })
        .unwrap();
    // Without the program on vb3 its replies would not get the VIP back and
    // every connection it gets would fail.
    agent.update("slice.yaml", &manifests(&[1, 2, 3])[1].1).unwrap();
    let counts = connections(&t, 90).unwrap();
    assert_spread(&counts, 90, &["b1", "b2", "b3"]);
    // The pod goes away: its interface's link pin is removed.
    t.node.ip(&["link", "del", &iface]).unwrap();
    agent
        .wait_until(
            &format!("the link pin of the gone {iface} is removed"),
            Duration::from_secs(10),
            |_| !pin.exists(),
        )
        .unwrap();
    // For people reading the log: the attach was logged (before the
    // removal began, so it is there by now).
    let attached = format!("iface={iface}");
    assert!(
        agent
            .log()
            .lines()
            .any(|l| l.contains("program attached") && l.contains(&attached)),
        "the attach to {iface} was not logged:\n{}",
        agent.log()
    );
}

/// Pinned programs keep serving after the agent exits; `dataplane cleanup`
/// detaches them.
#[test]
fn stopped_agent_keeps_serving_until_cleanup() {
    let t = Topology::new(1).unwrap();
    let _servers = start_servers(&t);
    let mut agent = start_agent(&t, true, false, &[1]);
    assert_eq!(connections(&t, 3).unwrap().get("b1"), Some(&3));
    assert!(
        agent.stop().unwrap().success(),
        "the agent must exit cleanly on SIGTERM"
    );
    assert_eq!(
        connections(&t, 3).unwrap().get("b1"),
        Some(&3),
        "pinned programs must keep serving"
    );
    let out = agent.cleanup().unwrap();
    assert!(out.contains("removed link tc on vc"), "{out}");
    // Without the program nothing answers on the VIP (the node has no
    // route for it), so the connection fails.
    assert!(
        connections(&t, 1).is_err(),
        "traffic to the VIP still translated after cleanup"
    );
}

/// Continuous new connections and one long-lived connection through the
/// VIP while the agent is SIGKILLed and started again: none fails, the
/// long-lived one keeps its backend, and the restarted agent adopts the
/// pinned maps without rewriting them.
#[test]
fn agent_restart_under_load_drops_no_connection() {
    let t = Topology::new(3).unwrap();
    let _servers = start_servers(&t);
    let mut agent = start_agent(&t, true, false, &[1, 2, 3]);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rounds = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (s, r) = (stop.clone(), rounds.clone());
    let load = t.client.run(move || {
        let mut long = Conn::connect(SocketAddr::from((VIP, 80)), TIMEOUT).map_err(|e| e.to_string())?;
        let first = long.ask().map_err(|e| e.to_string())?;
        let (mut ok, mut failed, mut long_answers) = (0usize, Vec::new(), 0usize);
        let started = std::time::Instant::now();
        // Bounded: until told to stop, at most 60 s.
        while !s.load(std::sync::atomic::Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
            match Conn::connect(SocketAddr::from((VIP, 80)), TIMEOUT).and_then(|mut c| c.ask()) {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e.to_string()),
            }
            match long.ask() {
                Ok(who) if who == first => long_answers += 1,
                Ok(who) => return Err(format!("the long-lived connection moved from {first} to {who}")),
                Err(e) => return Err(format!("the long-lived connection broke: {e}")),
            }
            r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok::<_, String>((ok, failed, long_answers))
    });
    // Traffic before and after the restart: wait for rounds of the load,
    // not for a time.
    let advance = |n: usize| {
        let target = rounds.load(std::sync::atomic::Ordering::Relaxed) + n;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while rounds.load(std::sync::atomic::Ordering::Relaxed) < target {
            assert!(!load.is_finished(), "the load ended early");
            assert!(std::time::Instant::now() < deadline, "the load made no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    advance(20);
    agent.kill_and_restart().unwrap();
    advance(20);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed, long_answers) = load.join().unwrap().unwrap();
    eprintln!(
        "{ok} connections during the restart, {} failed; long-lived answered {long_answers} times",
        failed.len()
    );
    assert!(failed.is_empty(), "connections failed across the restart: {failed:?}");
    assert!(
        ok >= 40 && long_answers >= 40,
        "too little traffic to show anything: {ok}, {long_answers}"
    );
    let log = agent.log();
    assert!(log.contains("adopted the pinned maps"), "{log}");
    let second = log
        .lines()
        .filter(|l| l.contains("sync applied"))
        .nth(1)
        .unwrap()
        .to_string();
    assert!(
        second.contains("added=0") && second.contains("updated=0") && second.contains("removed=0"),
        "the restarted agent rewrote maps it should have adopted: {second}"
    );
    assert!(log.contains("program replaced atomically"), "{log}");
}

#[test]
fn metrics_count_connections_per_service_and_reason() {
    const N: usize = 25;
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t);
    let m = manifests(&[1, 2]);
    let m: Vec<(&str, &str)> = m.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let agent = Agent::start_with(&t.node, &t.node_ifaces(), &[], &m, &["--metrics-per-service"]).unwrap();
    let before = agent.fresh_metrics().unwrap();
    let http = r#"{service="shop/web:http",frontend="198.19.0.10:80/tcp"}"#;
    let get = |m: &BTreeMap<String, f64>, series: &str| {
        *m.get(series)
            .unwrap_or_else(|| panic!("no {series} in /metrics: {:?}", m.keys().collect::<Vec<_>>()))
    };
    let ports = t
        .client
        .run(|| {
            let mut ports = std::collections::BTreeSet::new();
            for i in 0..N {
                let mut c = Conn::connect(SocketAddr::from((VIP, 80)), TIMEOUT)
                    .map_err(|e| format!("connection {i} to {VIP}:80: {e}"))?;
                c.ask().map_err(|e| format!("connection {i}: {e}"))?;
                ports.insert(c.local_addr().port());
            }
            Ok::<_, String>(ports)
        })
        .join()
        .unwrap()
        .unwrap();
    let after = agent.fresh_metrics().unwrap();
    let delta = |series: &str| get(&after, series) - get(&before, series);

    assert_eq!(delta(&format!("dataplane_service_new_flows_total{http}")), N as f64);
    assert_eq!(
        delta(r#"dataplane_datapath_packets_total{reason="nat_new_flow",drop="false"}"#),
        N as f64
    );
    // Each connection: SYN, ACK, request, FIN/ACKs at least.
    let packets = delta(&format!("dataplane_service_packets_total{http}"));
    assert!(packets >= 3.0 * N as f64, "{packets} packets for {N} connections");
    assert!(delta(&format!("dataplane_service_bytes_total{http}")) >= 40.0 * packets);
    assert!(delta(r#"dataplane_datapath_packets_total{reason="nat_reply",drop="false"}"#) >= 2.0 * N as f64);
    assert_eq!(delta(&format!("dataplane_service_no_backend_total{http}")), 0.0);
    // Two entries per flow (one flow per distinct client port).
    assert_eq!(delta("dataplane_conntrack_entries"), 2.0 * ports.len() as f64);
    assert_eq!(get(&after, "dataplane_conntrack_capacity"), 262_144.0);
    // Two ports, and the ClusterIP's entry for the ports the Service lacks.
    assert_eq!(get(&after, r#"dataplane_map_entries{map="DP_SERVICES"}"#), 3.0);
    assert_eq!(get(&after, r#"dataplane_map_entries{map="DP_BACKENDS"}"#), 4.0);
    assert_eq!(get(&after, r#"dataplane_map_capacity{map="DP_SERVICES"}"#), 131_072.0);
    // The kernel's accounting of each map, for every map of the agent,
    // pinned or not: a preallocated LRU holds at least max_entries keys and
    // values (40 + 64 bytes for conntrack, of any kernel's accounting), the
    // flood guard's SYN map (never pinned) too, and the backend filter
    // under its full name (the kernel's is cut at 15 bytes).
    let ct_floor = 262_144.0 * (40.0 + 64.0);
    let ct_mem = get(&after, r#"dataplane_map_memory_bytes{map="DP_CONNTRACK"}"#);
    assert!(
        ct_mem >= ct_floor,
        "conntrack accounted {ct_mem} bytes, below {ct_floor}"
    );
    let syn_mem = get(&after, r#"dataplane_map_memory_bytes{map="DP_CT_SYN"}"#);
    assert!(syn_mem >= 65_536.0 * 104.0, "SYN map accounted {syn_mem} bytes");
    assert!(get(&after, r#"dataplane_map_memory_bytes{map="DP_BACKEND_FILTER"}"#) >= 65_536.0);
    for reason in dataplane_common::Reason::ALL {
        let series = format!(
            "dataplane_datapath_packets_total{{reason=\"{}\",drop=\"{}\"}}",
            reason.name(),
            reason.is_drop()
        );
        get(&after, &series);
        if reason.is_drop() {
            assert_eq!(delta(&series), 0.0, "{series} moved");
        }
    }
    // A connection to a port the Service lacks is refused and counted
    // against the ClusterIP's entry for other ports.
    let other = r#"dataplane_service_no_backend_total{service="shop/web",frontend="198.19.0.10:*"}"#;
    let refused = t
        .client
        .run(|| Conn::connect(SocketAddr::from((VIP, 81)), TIMEOUT).map(drop))
        .join()
        .unwrap();
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "{refused:?}"
    );
    assert_eq!(get(&agent.fresh_metrics().unwrap(), other) - get(&after, other), 1.0);
    let syncs = get(&after, "dataplane_syncs_total");
    assert!(
        syncs >= 1.0 && syncs as usize == agent.logged_syncs(),
        "{syncs} syncs, the log has {}",
        agent.logged_syncs()
    );
    assert_eq!(get(&after, "dataplane_sync_duration_seconds_count"), syncs);
    assert_eq!(
        get(&after, r#"dataplane_sync_duration_seconds_bucket{le="+Inf"}"#),
        syncs
    );
    for series in [
        "dataplane_watch_restarts_total",
        "dataplane_relists_total",
        "dataplane_skipped_objects_total",
        "dataplane_sync_errors_total",
    ] {
        assert_eq!(get(&after, series), 0.0, "{series}");
    }
    assert_eq!(get(&after, "dataplane_ready"), 1.0);
}

/// A skipped object is named once when it appears, not again at every
/// sync, and its end is said once (issue: 17 problems made 157 warnings).
#[test]
fn a_skipped_object_is_named_once_not_at_every_sync() {
    let t = Topology::new(2).unwrap();
    let mut agent = start_agent(&t, true, false, &[1]);
    let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec:\n  clusterIP: 198.19.0.77\n  ports: [{name: http, port: 70000, protocol: TCP}]\n";
    agent.update("bad.yaml", bad).unwrap();
    // Three more syncs, each changing the good Service's endpoints.
    for backends in [&[1, 2][..], &[2], &[1]] {
        let m = manifests(backends);
        agent.update("slice.yaml", &m[1].1).unwrap();
    }
    let warned = |agent: &Agent| {
        agent
            .log()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("Service shop/bad") && l.contains("70000"))
            .count()
    };
    assert_eq!(warned(&agent), 1, "named once over four syncs:\n{}", agent.log());
    agent.update("bad.yaml", &bad.replace("70000", "80")).unwrap();
    let ended = agent.log().lines().filter(|l| l.contains("no longer skipped")).count();
    assert_eq!(ended, 1, "{}", agent.log());
    assert_eq!(warned(&agent), 1, "{}", agent.log());
}

/// The agent turns transparent huge pages off for itself (`main.rs`): the
/// kernel's own account of the process (`THP_enabled` in
/// /proc/PID/status, 0 once `PR_SET_THP_DISABLE` is set) says so. With
/// them, mimalloc's arenas took 2 MiB pages that count whole in RSS
/// (docs/performance.md, "100,000 Services").
#[test]
fn agent_runs_without_transparent_huge_pages() {
    let t = Topology::new(1).unwrap();
    let agent = Agent::start_with(&t.node, &[], &[], &[], &["--no-attach"]).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .unwrap_or_else(|| {
            panic!("no THP_enabled line in the agent's /proc status (kernel 5.0 or later has it):\n{status}")
        });
    assert_eq!(
        thp.trim(),
        "0",
        "the agent's process still allows transparent huge pages"
    );
}
