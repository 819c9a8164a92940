//! IPv6 and dual-stack end to end: the real agent (file source) on the node
//! namespace, real TCP/UDP sockets in client and backend namespaces, and
//! path-MTU discovery through a VIP (IPv4 and IPv6) across a router with a
//! smaller MTU. Needs root, iproute2 and ethtool.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use dataplane_tests::{
    agent::Agent,
    manifests::{service_ips, slice_ips},
    netns::{addr6, backend_addr, backend_addr6, unique_prefix, veth, Netns, Topology},
    servers::{tcp_server, udp_server, Conn, Server},
};

const TIMEOUT: Duration = Duration::from_secs(3);
const PORTS: &[(&str, u16, &str)] = &[("http", 80, "TCP"), ("dns", 53, "UDP")];
const TARGETS: &[(&str, u16, &str)] = &[("http", 8080, "TCP"), ("dns", 5353, "UDP")];

fn vip6() -> IpAddr {
    "fd00:198:19::10".parse().unwrap()
}

fn vip4() -> IpAddr {
    Ipv4Addr::new(198, 19, 0, 10).into()
}

/// Backend i answers "b{i}" on TCP 8080 and UDP 5353 on each of its
/// addresses (IPv4 and IPv6).
fn start_servers(t: &Topology, v4: bool) -> Vec<Server> {
    let mut v = Vec::new();
    for (i, ns) in t.backends.iter().enumerate() {
        let name = format!("b{}", i + 1);
        v.push(tcp_server(ns, backend_addr6(i + 1), 8080, &name));
        v.push(udp_server(ns, backend_addr6(i + 1), 5353, &name));
        if v4 {
            v.push(tcp_server(ns, backend_addr(i + 1), 8080, &name));
            v.push(udp_server(ns, backend_addr(i + 1), 5353, &name));
        }
    }
    v
}

fn start_agent(t: &Topology, manifests: &[(&str, String)]) -> Agent {
    let m: Vec<(&str, &str)> = manifests.iter().map(|(n, c)| (*n, c.as_str())).collect();
    Agent::start(&t.node, &t.node_ifaces(), &[], &m).unwrap()
}

/// `n` connections to `to`, one question each: answers by backend, and
/// the client address the backend saw, or the first error.
fn connections(t: &Topology, to: SocketAddr, n: usize) -> Result<(BTreeMap<String, usize>, Vec<String>), String> {
    t.client
        .run(move || {
            let (mut counts, mut peers) = (BTreeMap::new(), Vec::new());
            for i in 0..n {
                let mut c = Conn::connect(to, TIMEOUT).map_err(|e| format!("connection {i} to {to}: {e}"))?;
                let (who, peer) = c.ask_peer().map_err(|e| format!("connection {i}: {e}"))?;
                *counts.entry(who).or_insert(0) += 1;
                peers.push(peer);
            }
            Ok((counts, peers))
        })
        .join()
        .unwrap()
}

fn udp_ask(t: &Topology, to: SocketAddr) -> Result<(String, SocketAddr), String> {
    t.client
        .run(move || {
            let s = UdpSocket::bind(if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            s.send_to(b"who", to).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            let (n, from) = s
                .recv_from(&mut buf)
                .map_err(|e| format!("no UDP answer through {to}: {e}"))?;
            Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
        })
        .join()
        .unwrap()
}

#[test]
fn tcp_and_udp_through_an_ipv6_vip() {
    let t = Topology::new(2).unwrap();
    t.enable_ipv6().unwrap();
    let _servers = start_servers(&t, false);
    let backends: Vec<IpAddr> = (1..=2).map(|i| backend_addr6(i).into()).collect();
    let _agent = start_agent(
        &t,
        &[
            ("service.yaml", service_ips("shop", "web6", &[vip6()], PORTS)),
            ("slice.yaml", slice_ips("shop", "web6-v6", "web6", TARGETS, &backends)),
        ],
    );
    let (counts, peers) = connections(&t, SocketAddr::new(vip6(), 80), 100).unwrap();
    assert_eq!(counts.values().sum::<usize>(), 100);
    assert_eq!(counts.len(), 2, "both backends get connections: {counts:?}");
    assert!(
        peers.iter().all(|p| p == "2001:db8:100::2"),
        "backends see the client's own address: {peers:?}"
    );
    for _ in 0..10 {
        let (who, from) = udp_ask(&t, SocketAddr::new(vip6(), 53)).unwrap();
        assert_eq!(from, SocketAddr::new(vip6(), 53), "the answer comes from the VIP");
        assert!(["b1", "b2"].contains(&who.as_str()), "{who}");
    }
}

/// A dual-stack Service: each ClusterIP answers, and each only with
/// backends of its own family (the backend sees a client address of the
/// VIP's family).
#[test]
fn dual_stack_service_is_reached_on_both_vips() {
    let t = Topology::new(2).unwrap();
    t.enable_ipv6().unwrap();
    let _servers = start_servers(&t, true);
    let b4: Vec<IpAddr> = (1..=2).map(|i| backend_addr(i).into()).collect();
    let b6: Vec<IpAddr> = (1..=2).map(|i| backend_addr6(i).into()).collect();
    let _agent = start_agent(
        &t,
        &[
            ("service.yaml", service_ips("shop", "web", &[vip4(), vip6()], PORTS)),
            ("slice4.yaml", slice_ips("shop", "web-v4", "web", TARGETS, &b4)),
            ("slice6.yaml", slice_ips("shop", "web-v6", "web", TARGETS, &b6)),
        ],
    );
    for (vip, client) in [(vip4(), "198.18.100.2"), (vip6(), "2001:db8:100::2")] {
        let (counts, peers) = connections(&t, SocketAddr::new(vip, 80), 40).unwrap();
        assert_eq!(counts.len(), 2, "{vip}: {counts:?}");
        assert!(peers.iter().all(|p| p == client), "{vip}: {peers:?}");
        let (_, from) = udp_ask(&t, SocketAddr::new(vip, 53)).unwrap();
        assert_eq!(from, SocketAddr::new(vip, 53));
    }
}

/// Nothing listens on the backend's UDP port: its ICMPv6 port unreachable,
/// translated on the node, reaches the client's connected socket as
/// ECONNREFUSED.
#[test]
fn closed_backend_port_gives_the_ipv6_udp_client_econnrefused() {
    let t = Topology::new(1).unwrap();
    t.enable_ipv6().unwrap();
    let backends: Vec<IpAddr> = vec![backend_addr6(1).into()];
    let _agent = start_agent(
        &t,
        &[
            ("service.yaml", service_ips("shop", "dns6", &[vip6()], PORTS)),
            ("slice.yaml", slice_ips("shop", "dns6-v6", "dns6", TARGETS, &backends)),
        ],
    );
    let got = t
        .client
        .run(|| {
            let s = UdpSocket::bind("[::]:0").unwrap();
            s.connect(SocketAddr::new(vip6(), 53)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            let mut buf = [0u8; 16];
            // A few tries: the first datagram may race neighbour discovery.
            for _ in 0..6 {
                let _ = s.send(b"who");
                match s.recv(&mut buf) {
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(()),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
                    other => return Err(format!("{other:?}")),
                }
            }
            Err("no ECONNREFUSED within 3 s".to_string())
        })
        .join()
        .unwrap();
    got.unwrap();
}

/// Client, node, a router, backend; the router's link towards the backend
/// has an MTU of 1280 while every other link has 1500, so the backend
/// advertises a full-size MSS and the client's segments are too big for
/// that link. The router answers them with "fragmentation needed" / "packet
/// too big" quoting client -> backend; the node translates the quote to
/// client -> VIP, the client's TCP learns the path MTU and the upload
/// completes. Without the translation the client never matches the error
/// and retransmits full-size segments until the test's deadline.
struct PmtuRig {
    client: Netns,
    node: Netns,
    router: Netns,
    backend: Netns,
}

impl PmtuRig {
    fn new() -> PmtuRig {
        let p = unique_prefix();
        let rig = PmtuRig {
            client: Netns::new(format!("{p}-client")).unwrap(),
            node: Netns::new(format!("{p}-node")).unwrap(),
            router: Netns::new(format!("{p}-router")).unwrap(),
            backend: Netns::new(format!("{p}-backend")).unwrap(),
        };
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        veth(
            &rig.node,
            "vc",
            a("198.18.100.1"),
            &rig.client,
            "eth0",
            a("198.18.100.2"),
        )
        .unwrap();
        veth(&rig.node, "vr", a("198.18.60.1"), &rig.router, "eth0", a("198.18.60.2")).unwrap();
        veth(
            &rig.router,
            "vb",
            a("198.18.61.1"),
            &rig.backend,
            "eth0",
            a("198.18.61.2"),
        )
        .unwrap();
        for ns in [&rig.client, &rig.node, &rig.router, &rig.backend] {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0").unwrap();
        }
        addr6(&rig.node, "vc", "2001:db8:100::1").unwrap();
        addr6(&rig.client, "eth0", "2001:db8:100::2").unwrap();
        addr6(&rig.node, "vr", "2001:db8:60::1").unwrap();
        addr6(&rig.router, "eth0", "2001:db8:60::2").unwrap();
        addr6(&rig.router, "vb", "2001:db8:61::1").unwrap();
        addr6(&rig.backend, "eth0", "2001:db8:61::2").unwrap();
        // Only the router's side of the last link is small: the backend
        // still advertises an MSS for 1500.
        rig.router.ip(&["link", "set", "vb", "mtu", "1280"]).unwrap();
        for ns in [&rig.node, &rig.router] {
            ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
            ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
            for k in ["all", "default"] {
                ns.sysctl(&format!("net.ipv4.conf.{k}.rp_filter"), "0").unwrap();
            }
        }
        for (ns, v4, v6) in [
            (&rig.client, "198.18.100.1", "2001:db8:100::1"),
            (&rig.backend, "198.18.61.1", "2001:db8:61::1"),
        ] {
            ns.ip(&["route", "add", "198.18.0.0/16", "via", v4]).unwrap();
            ns.ip(&["-6", "route", "add", "2001:db8::/32", "via", v6]).unwrap();
        }
        rig.client
            .ip(&["route", "add", "198.19.0.0/16", "via", "198.18.100.1"])
            .unwrap();
        rig.client
            .ip(&["-6", "route", "add", "fd00::/8", "via", "2001:db8:100::1"])
            .unwrap();
        rig.node
            .ip(&["route", "add", "198.18.61.0/24", "via", "198.18.60.2"])
            .unwrap();
        rig.node
            .ip(&["-6", "route", "add", "2001:db8:61::/64", "via", "2001:db8:60::2"])
            .unwrap();
        rig.router
            .ip(&["route", "add", "198.18.100.0/24", "via", "198.18.60.1"])
            .unwrap();
        rig.router
            .ip(&["-6", "route", "add", "2001:db8:100::/64", "via", "2001:db8:60::1"])
            .unwrap();
        rig
    }

    /// The route MTU the client has learnt for `dst` (None: none cached).
    fn client_route_mtu(&self, dst: IpAddr) -> Option<u32> {
        let out = self.client.ip(&["route", "get", &dst.to_string()]).ok()?;
        let mut words = out.split_whitespace();
        while let Some(w) = words.next() {
            if w == "mtu" {
                return words.next()?.parse().ok();
            }
        }
        None
    }
}

/// A server at `addr:9000` in `ns` that reads one upload to its end and
/// answers with the number of bytes, once.
fn sink(ns: &Netns, addr: IpAddr) -> std::thread::JoinHandle<Result<usize, String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = ns.run(move || {
        let l = TcpListener::bind((addr, 9000)).map_err(|e| e.to_string())?;
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let started = Instant::now();
        let (mut c, _) = loop {
            match l.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == ErrorKind::WouldBlock && started.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        c.set_nonblocking(false).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut n = 0usize;
        let mut buf = [0u8; 65536];
        loop {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(format!("read after {n} bytes: {e}")),
            }
        }
        c.write_all(format!("{n}\n").as_bytes()).map_err(|e| e.to_string())?;
        Ok(n)
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("sink did not start");
    h
}

#[test]
fn path_mtu_behind_a_vip_is_discovered_over_ipv4_and_ipv6() {
    let rig = PmtuRig::new();
    let (vip4, vip6) = (vip4(), vip6());
    let back4: IpAddr = "198.18.61.2".parse().unwrap();
    let back6: IpAddr = "2001:db8:61::2".parse().unwrap();
    let ports = &[("up", 80, "TCP")];
    let targets = &[("up", 9000, "TCP")];
    let _agent = {
        let m = [
            ("service.yaml", service_ips("shop", "upload", &[vip4, vip6], ports)),
            (
                "slice4.yaml",
                slice_ips("shop", "upload-v4", "upload", targets, &[back4]),
            ),
            (
                "slice6.yaml",
                slice_ips("shop", "upload-v6", "upload", targets, &[back6]),
            ),
        ];
        let m: Vec<(&str, &str)> = m.iter().map(|(n, c)| (*n, c.as_str())).collect();
        Agent::start(&rig.node, &["vc".to_string(), "vr".to_string()], &[], &m).unwrap()
    };
    const UPLOAD: usize = 256 * 1024;
    for (vip, backend) in [(vip4, back4), (vip6, back6)] {
        assert_eq!(rig.client_route_mtu(vip), None, "{vip}: no path MTU known yet");
        let server = sink(&rig.backend, backend);
        let sent = rig
            .client
            .run(move || {
                let mut c =
                    TcpStream::connect_timeout(&SocketAddr::new(vip, 80), TIMEOUT).map_err(|e| e.to_string())?;
                c.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                c.write_all(&vec![0x5a; UPLOAD])
                    .map_err(|e| format!("upload through {vip}: {e}"))?;
                c.shutdown(std::net::Shutdown::Write).unwrap();
                let mut answer = String::new();
                c.read_to_string(&mut answer)
                    .map_err(|e| format!("no answer through {vip} (path MTU never learnt?): {e}"))?;
                Ok::<String, String>(answer)
            })
            .join()
            .unwrap();
        let received = server.join().unwrap();
        assert_eq!(sent.as_deref().map(str::trim), Ok(UPLOAD.to_string().as_str()), "{vip}");
        assert_eq!(received, Ok(UPLOAD), "{vip}");
        assert_eq!(
            rig.client_route_mtu(vip),
            Some(1280),
            "{vip}: the client learnt the router's MTU for the VIP"
        );
    }
}
