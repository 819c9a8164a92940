//! Host routing: translated packets go from TC straight to the interface
//! the FIB names for their new destination (`dataplane-ebpf/src/forward.rs`),
//! skipping netfilter and the node's forwarding path; what the FIB cannot
//! place goes to the stack.
//!
//! Program tests run the TC program with `BPF_PROG_TEST_RUN` inside a node
//! namespace with real interfaces, routes and neighbours (the skb arrives
//! on a given interface); end-to-end tests connect through the VIP with a
//! netfilter rule in the node that drops every forwarded packet.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use dataplane::bpf::{loader::Globals, testrun::RunResult};
use dataplane_common::{map_names, DpConfig, EndpointKey, RouteEvent, IFACE_F_PEER_NETNS, IFACE_F_VETH};
use dataplane_tests::{
    agent::Agent,
    cgroup::TestCgroup,
    netns::{
        backend_addr, backend_addr6, backend_iface, Netns, Topology, TwoNodes, BACKEND_A, BACKEND_B, CLIENT_ADDR,
        CLIENT_ADDR6, EXT_CLIENT, NODE_A, NODE_A_EXT, NODE_B, NODE_CLIENT_IFACE,
    },
    packet::{parse_and_verify, Frame, ACK, SYN, TCP, UDP},
    prog::{pin_to_cpu, Loaded, PROGRAM_TEST_GLOBALS},
    servers::{tcp_server, Conn},
    web::{manifests, start_servers, VIP},
};

const TC_ACT_REDIRECT: u32 = 7;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_UNSPEC: u32 = u32::MAX;

fn vip(i: u8) -> IpAddr {
    Ipv4Addr::new(198, 19, 7, i).into()
}

const VIP6: &str = "fd00:19::7:1";

/// An interface's ifindex and MAC address in `ns`.
fn link(ns: &Netns, iface: &str) -> (u32, [u8; 6]) {
    let read = |what: &str| {
        ns.exec(&["cat", &format!("/sys/class/net/{iface}/{what}")])
            .unwrap_or_else(|e| panic!("{iface} {what}: {e}"))
            .trim()
            .to_string()
    };
    let ifindex = read("ifindex").parse().unwrap();
    let mut mac = [0u8; 6];
    for (b, h) in mac.iter_mut().zip(read("address").split(':')) {
        *b = u8::from_str_radix(h, 16).unwrap();
    }
    (ifindex, mac)
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// What one run did: verdict, the redirect target the program recorded
/// (in the scratch entry of CPU 0, where the test thread runs), the
/// output frame.
struct Ran {
    retval: u32,
    ifindex: u32,
    out: Vec<u8>,
}

impl Ran {
    fn of(l: &Loaded, r: RunResult) -> Ran {
        Ran {
            retval: r.retval,
            ifindex: l.redirect_ifindex(0),
            out: r.data,
        }
    }
}

/// TTL / hop limit of an Ethernet + IPv4/IPv6 frame.
fn ttl(f: &[u8]) -> u8 {
    if u16::from_be_bytes([f[12], f[13]]) == 0x86dd {
        f[14 + 7]
    } else {
        f[14 + 8]
    }
}

/// `frame` with its IPv4 TTL set to `ttl`, header checksum recomputed.
fn with_ttl(mut f: Vec<u8>, ttl: u8) -> Vec<u8> {
    f[14 + 8] = ttl;
    f[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let c = dataplane_tests::packet::checksum(&f[14..34], 0);
    f[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    f
}

/// The TC program in the node namespace of a real topology, asked where
/// translated packets go. Backend 1 and the client have resolved
/// neighbours (permanent entries with their real MACs), backend 2 has
/// none; frontends lead to backend 1 (IPv4 and IPv6), to backend 2, to the
/// node's own address (local delivery) and to an address without a route.
///
/// - a resolved neighbour: `bpf_redirect` to the backend's interface, the
///   Ethernet header rewritten to the node side's MAC and the backend's,
///   TTL / hop limit one less, IPv4 header checksum valid;
/// - no neighbour entry: `bpf_redirect_neigh` to the backend's interface,
///   the Ethernet header left to the kernel, TTL one less;
/// - the reply, arriving on the backend's interface: redirected to the
///   client's;
/// - local destination, no route, a TTL of 1, host routing off: handed to
///   the stack (`TC_ACT_UNSPEC`), translated, TTL untouched.
#[test]
fn tc_sends_translated_packets_to_the_fib_egress_interface_or_to_the_stack() {
    let t = Topology::new(2).unwrap();
    t.enable_ipv6().unwrap();
    let (vc, node_vc_mac) = link(&t.node, NODE_CLIENT_IFACE);
    let (vb1, node_vb1_mac) = link(&t.node, &backend_iface(1));
    let (vb2, _) = link(&t.node, &backend_iface(2));
    let (_, b1_mac) = link(&t.backends[0], "eth0");
    let (_, client_mac) = link(&t.client, "eth0");
    let neigh = |family: &str, addr: &str, mac: &[u8; 6], dev: &str| {
        t.node
            .ip(&[
                family,
                "neigh",
                "replace",
                addr,
                "lladdr",
                &mac_str(mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ])
            .unwrap();
    };
    neigh("-4", &backend_addr(1).to_string(), &b1_mac, &backend_iface(1));
    neigh("-6", &backend_addr6(1).to_string(), &b1_mac, &backend_iface(1));
    neigh("-4", &CLIENT_ADDR.to_string(), &client_mac, NODE_CLIENT_IFACE);
    t.node.ip(&["neigh", "flush", "dev", &backend_iface(2)]).unwrap();
    let node_side_1 = Ipv4Addr::new(198, 18, 1, 1);
    let unrouted = Ipv4Addr::new(198, 18, 77, 2);

    let (runs, counted, off_counted) = t
        .node
        .run(move || {
            pin_to_cpu(0);
            let globals = Globals {
                host_routing: true,
                ..PROGRAM_TEST_GLOBALS
            };
            let mut l = Loaded::with_globals(DpConfig::defaults(), globals);
            l.set_service(vip(1), 80, TCP, &[(backend_addr(1), 8080)]);
            l.set_service(vip(1), 53, UDP, &[(backend_addr(1), 5353)]);
            l.set_service(vip(2), 80, TCP, &[(backend_addr(2), 8080)]);
            l.set_service(vip(3), 80, TCP, &[(node_side_1, 8080)]);
            l.set_service(vip(4), 80, TCP, &[(unrouted, 8080)]);
            let b6: IpAddr = backend_addr6(1).into();
            let vip6: IpAddr = VIP6.parse::<Ipv6Addr>().unwrap().into();
            l.set_service(vip6, 80, TCP, &[(b6, 8080)]);
            let run = |l: &Loaded, f: &[u8], on: u32| Ran::of(l, l.run_tc_on(f, on));
            let client = (IpAddr::from(CLIENT_ADDR), 40100);
            let client6: (IpAddr, u16) = (CLIENT_ADDR6.parse::<Ipv6Addr>().unwrap().into(), 40100);
            let syn = |v: IpAddr| Frame::tcp(client, (v, 80), SYN).build();
            let mut v = vec![
                ("resolved", run(&l, &syn(vip(1)), vc)),
                ("no neighbour", run(&l, &syn(vip(2)), vc)),
                (
                    "reply",
                    run(&l, &Frame::tcp((backend_addr(1), 8080), client, SYN | ACK).build(), vb1),
                ),
                ("local", run(&l, &syn(vip(3)), vc)),
                ("no route", run(&l, &syn(vip(4)), vc)),
                (
                    "ttl 1",
                    run(
                        &l,
                        &with_ttl(Frame::tcp((client.0, 40101), (vip(1), 80), SYN).build(), 1),
                        vc,
                    ),
                ),
                ("ipv6", run(&l, &Frame::tcp(client6, (vip6, 80), SYN).build(), vc)),
                // 42 bytes: Ethernet, IPv4 and a UDP header, nothing else.
                (
                    "udp, no payload",
                    run(&l, &Frame::udp(client, (vip(1), 53), b"").build(), vc),
                ),
            ];
            // Counted per result: resolved, reply, IPv6 and UDP redirected; one
            // redirect leaving the neighbour to the kernel; local, no
            // route and TTL 1 to the stack.
            let counted = RouteEvent::ALL.map(|e| l.route_event(e));
            let mut off = Loaded::with_globals(DpConfig::defaults(), PROGRAM_TEST_GLOBALS);
            off.set_service(vip(1), 80, TCP, &[(backend_addr(1), 8080)]);
            v.push(("host routing off", run(&off, &syn(vip(1)), vc)));
            let off_counted = RouteEvent::ALL.map(|e| off.route_event(e));
            (v, counted, off_counted)
        })
        .join()
        .expect("the program runs in the node namespace");
    let get = |name: &str| &runs.iter().find(|(n, _)| *n == name).unwrap().1;
    let input_macs = Frame::tcp((CLIENT_ADDR, 1), (vip(1), 80), SYN).build()[..12].to_vec();

    let r = get("resolved");
    assert_eq!((r.retval, r.ifindex), (TC_ACT_REDIRECT, vb1), "resolved neighbour");
    assert_eq!(&r.out[..6], &b1_mac, "destination MAC: the backend's");
    assert_eq!(&r.out[6..12], &node_vb1_mac, "source MAC: the node side of its link");
    assert_eq!(ttl(&r.out), 63);
    assert_eq!(parse_and_verify(&r.out).dst, IpAddr::from(backend_addr(1)));

    let r = get("no neighbour");
    assert_eq!(
        (r.retval, r.ifindex),
        (TC_ACT_REDIRECT, vb2),
        "no neighbour: the kernel resolves it"
    );
    assert_eq!(&r.out[..12], &input_macs[..], "Ethernet header left to the kernel");
    assert_eq!(ttl(&r.out), 63);
    assert_eq!(parse_and_verify(&r.out).dst, IpAddr::from(backend_addr(2)));

    let r = get("reply");
    assert_eq!(
        (r.retval, r.ifindex),
        (TC_ACT_REDIRECT, vc),
        "the reply goes to the client's link"
    );
    assert_eq!(&r.out[..6], &client_mac);
    assert_eq!(&r.out[6..12], &node_vc_mac);
    let p = parse_and_verify(&r.out);
    assert_eq!((p.src, p.sport, p.dst), (vip(1), 80, IpAddr::from(CLIENT_ADDR)));

    for (name, dst, want_ttl) in [
        ("local", IpAddr::from(node_side_1), 64),
        ("no route", IpAddr::from(unrouted), 64),
        ("ttl 1", IpAddr::from(backend_addr(1)), 1),
        ("host routing off", IpAddr::from(backend_addr(1)), 64),
    ] {
        let r = get(name);
        assert_eq!((r.retval, r.ifindex), (TC_ACT_UNSPEC, 0), "{name}: to the stack");
        assert_eq!(&r.out[..12], &input_macs[..], "{name}: Ethernet header untouched");
        assert_eq!(ttl(&r.out), want_ttl, "{name}: the stack decrements the TTL itself");
        assert_eq!(parse_and_verify(&r.out).dst, dst, "{name}: translated all the same");
    }

    assert_eq!(
        counted,
        [4, 1, 3, 0, 0, 0],
        "dataplane_host_routing_packets: redirected, redirected_neigh, to_stack, redirected_peer, xdp_tx, xdp_redirect (the interfaces' kinds unknown)"
    );
    assert_eq!(off_counted, [0; 6], "nothing counted with host routing off");

    let r = get("udp, no payload");
    assert_eq!(r.out.len(), 42);
    assert_eq!(
        (r.retval, r.ifindex),
        (TC_ACT_REDIRECT, vb1),
        "the shortest translated packet"
    );
    assert_eq!(ttl(&r.out), 63);
    assert_eq!(parse_and_verify(&r.out).dst, IpAddr::from(backend_addr(1)));

    let r = get("ipv6");
    assert_eq!(
        (r.retval, r.ifindex),
        (TC_ACT_REDIRECT, vb1),
        "IPv6, resolved neighbour"
    );
    assert_eq!(&r.out[..6], &b1_mac);
    assert_eq!(&r.out[6..12], &node_vb1_mac);
    assert_eq!(ttl(&r.out), 63, "hop limit");
    assert_eq!(parse_and_verify(&r.out).dst, IpAddr::from(backend_addr6(1)));
}

/// Netfilter in the node: conntrack loaded (a `ct state` rule on
/// prerouting, as the CNI and kubelet rules of real nodes load it) and a
/// forward chain that counts and drops every packet the node forwards.
const DROP_FORWARDED: &str = "table inet dptest {
  chain seen { type filter hook prerouting priority 0; ct state new,established counter; }
  chain forwarded { type filter hook forward priority 0; counter drop; }
}";

/// Packets the node's forward chain dropped.
fn forwarded_drops(node: &Netns) -> u64 {
    let out = node
        .exec(&["nft", "list", "chain", "inet", "dptest", "forwarded"])
        .unwrap();
    let at = out.find("packets ").expect("the chain's counter");
    out[at + 8..].split_whitespace().next().unwrap().parse().unwrap()
}

fn load_rules(node: &Netns) {
    let have_nft = std::process::Command::new("sh")
        .args(["-c", "command -v nft"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        have_nft,
        "`nft` is missing: run `cargo xtask setup` (or apt-get install nftables)"
    );
    let file = std::env::temp_dir().join(format!("{}.nft", node.name));
    std::fs::write(&file, DROP_FORWARDED).unwrap();
    node.exec(&["nft", "-f", file.to_str().unwrap()]).unwrap();
    let _ = std::fs::remove_file(file);
}

/// `n` connections through the VIP, each asking once; the answers, or the
/// first failure (connections time out after 1 s: the failing case of
/// the test must not wait long).
fn ask(client: &Netns, to: SocketAddr, n: usize) -> Result<Vec<String>, String> {
    client
        .run(move || {
            (0..n)
                .map(|i| {
                    let mut c =
                        Conn::connect(to, Duration::from_secs(1)).map_err(|e| format!("connection {i}: {e}"))?;
                    c.ask().map_err(|e| format!("connection {i}: {e}"))
                })
                .collect()
        })
        .join()
        .unwrap()
}

/// With a forward chain in the node that drops every forwarded packet,
/// connections through a ClusterIP still work: their packets, translated
/// in TC, never reach the forward hook (its counter stays 0). Without
/// host routing (`--host-routing=false`, the default) the same
/// connections go through the forward chain and fail; without the chain
/// they work through the stack.
#[test]
fn connections_through_the_vip_skip_the_node_forwarding_path() {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t);
    let m = manifests(&[1, 2]);
    let m: Vec<(&str, &str)> = m.iter().map(|(n, c)| (*n, c.as_str())).collect();
    load_rules(&t.node);
    let to = SocketAddr::from((VIP, 80));
    {
        let agent = Agent::start_with(&t.node, &t.node_ifaces(), &[], &m, &["--host-routing=true"]).unwrap();
        let answers = ask(&t.client, to, 20).expect("through the VIP, host routed");
        assert!(answers.iter().all(|a| a == "b1" || a == "b2"), "{answers:?}");
        assert_eq!(
            forwarded_drops(&t.node),
            0,
            "no translated packet reached the forward hook"
        );
        // Every packet of the 20 connections both ways was redirected (at
        // least SYN, request, FIN and their answers: 6 per connection),
        // none handed to the stack.
        let metrics = agent.fresh_metrics().unwrap();
        let routed = |result: &str| {
            metrics
                .get(&format!("dataplane_host_routing_packets_total{{result=\"{result}\"}}"))
                .copied()
                .unwrap_or_else(|| panic!("no host routing series {result}: {metrics:?}"))
        };
        let redirected = routed("redirected") + routed("redirected_neigh") + routed("redirected_peer");
        assert!(redirected >= 20.0 * 6.0, "redirected {redirected}");
        assert_eq!(routed("to_stack"), 0.0);
        // Every node interface here is a veth, which the agent found and
        // told the programs: packets enter the pods' and the client's
        // namespaces directly, none takes a plain redirect.
        assert!(routed("redirected_peer") > 0.0, "{metrics:?}");
        assert_eq!(routed("redirected"), 0.0);
    }
    let _agent = Agent::start_with(&t.node, &t.node_ifaces(), &[], &m, &["--host-routing=false"]).unwrap();
    let err = ask(&t.client, to, 1).expect_err("without host routing the forward chain drops");
    eprintln!("without host routing: {err}");
    assert!(forwarded_drops(&t.node) > 0, "the forward chain saw the packets");
    t.node.exec(&["nft", "delete", "table", "inet", "dptest"]).unwrap();
    let answers = ask(&t.client, to, 5).expect("through the stack without the chain");
    assert!(answers.iter().all(|a| a == "b1" || a == "b2"), "{answers:?}");
}

/// Socket-level connections (`forward::socket_translated`): with host
/// routing and socket-level load balancing both on, a packet the TC
/// program finds no Service in, to an endpoint of some Service (its
/// address, port and protocol, of either family) or from one (the reply),
/// goes to the FIB's egress interface as a translated packet does:
/// redirected, Ethernet header rewritten, TTL one less, addresses and
/// ports untouched. Another port or protocol of the same address, an
/// address that is no endpoint, and everything with either setting off
/// (the endpoint set filled all the same) go to the stack untouched.
#[test]
fn tc_host_routes_packets_to_and_from_service_endpoints_when_sockets_are_translated() {
    let t = Topology::new(2).unwrap();
    t.enable_ipv6().unwrap();
    let (vc, node_vc_mac) = link(&t.node, NODE_CLIENT_IFACE);
    let (vb1, node_vb1_mac) = link(&t.node, &backend_iface(1));
    let (_, b1_mac) = link(&t.backends[0], "eth0");
    let (_, client_mac) = link(&t.client, "eth0");
    for (family, addr, mac, dev) in [
        ("-4", backend_addr(1).to_string(), b1_mac, backend_iface(1)),
        ("-6", backend_addr6(1).to_string(), b1_mac, backend_iface(1)),
        ("-4", CLIENT_ADDR.to_string(), client_mac, NODE_CLIENT_IFACE.to_string()),
        (
            "-6",
            CLIENT_ADDR6.to_string(),
            client_mac,
            NODE_CLIENT_IFACE.to_string(),
        ),
    ] {
        t.node
            .ip(&[
                family,
                "neigh",
                "replace",
                &addr,
                "lladdr",
                &mac_str(&mac),
                "dev",
                &dev,
                "nud",
                "permanent",
            ])
            .unwrap();
    }
    let b1 = IpAddr::from(backend_addr(1));
    let b2 = IpAddr::from(backend_addr(2));
    let b1v6 = IpAddr::from(backend_addr6(1));
    let client = (IpAddr::from(CLIENT_ADDR), 40200);
    let client6: (IpAddr, u16) = (CLIENT_ADDR6.parse::<Ipv6Addr>().unwrap().into(), 40200);
    // (name, frame, ingress interface), ingress "b" for backend 1's link.
    let frames: Vec<(&str, Vec<u8>, &str)> = vec![
        ("to endpoint", Frame::tcp(client, (b1, 8080), SYN).build(), "c"),
        ("reply", Frame::tcp((b1, 8080), client, SYN | ACK).build(), "b"),
        ("udp to endpoint", Frame::udp(client, (b1, 5353), b"q").build(), "c"),
        ("ipv6 to endpoint", Frame::tcp(client6, (b1v6, 8080), SYN).build(), "c"),
        ("ipv6 reply", Frame::tcp((b1v6, 8080), client6, ACK).build(), "b"),
        ("other port", Frame::tcp(client, (b1, 9090), SYN).build(), "c"),
        ("udp to the tcp port", Frame::udp(client, (b1, 8080), b"q").build(), "c"),
        ("from other port", Frame::tcp((b1, 9090), client, ACK).build(), "b"),
        ("not an endpoint", Frame::tcp(client, (b2, 8080), SYN).build(), "c"),
    ];
    let frames_in = frames.clone();
    let (runs, counted, off) = t
        .node
        .run(move || {
            pin_to_cpu(0);
            let program = |host_routing: bool, sock_routing: bool| {
                let globals = Globals {
                    host_routing,
                    sock_routing,
                    ..PROGRAM_TEST_GLOBALS
                };
                let mut l = Loaded::with_globals(DpConfig::defaults(), globals);
                // Kept whatever the settings: the programs' global decides.
                l.sync.track_endpoints(true).unwrap();
                l.set_service(vip(1), 80, TCP, &[(b1, 8080)]);
                l.set_service(vip(1), 53, UDP, &[(b1, 5353)]);
                let vip6: IpAddr = VIP6.parse::<Ipv6Addr>().unwrap().into();
                l.set_service(vip6, 80, TCP, &[(b1v6, 8080)]);
                l
            };
            let run = |l: &Loaded, f: &[u8], on: &str| Ran::of(l, l.run_tc_on(f, if on == "b" { vb1 } else { vc }));
            let l = program(true, true);
            let runs: Vec<(&str, Ran)> = frames_in.iter().map(|(n, f, on)| (*n, run(&l, f, on))).collect();
            let counted = RouteEvent::ALL.map(|e| l.route_event(e));
            let mut off = Vec::new();
            for (name, host, sock) in [
                ("host routing without socket routing", true, false),
                ("socket routing without host routing", false, true),
                ("both off", false, false),
            ] {
                let l = program(host, sock);
                for (n, f, on) in &frames_in[..2] {
                    off.push((format!("{name}, {n}"), run(&l, f, on)));
                }
                assert_eq!(RouteEvent::ALL.map(|e| l.route_event(e)), [0; 6], "{name}: counted");
            }
            (runs, counted, off)
        })
        .join()
        .expect("the program runs in the node namespace");
    let get = |name: &str| &runs.iter().find(|(n, _)| *n == name).unwrap().1;
    let input = |name: &str| &frames.iter().find(|(n, _, _)| *n == name).unwrap().1;

    for (name, out_if, dst_mac, src_mac) in [
        ("to endpoint", vb1, b1_mac, node_vb1_mac),
        ("udp to endpoint", vb1, b1_mac, node_vb1_mac),
        ("ipv6 to endpoint", vb1, b1_mac, node_vb1_mac),
        ("reply", vc, client_mac, node_vc_mac),
        ("ipv6 reply", vc, client_mac, node_vc_mac),
    ] {
        let r = get(name);
        assert_eq!((r.retval, r.ifindex), (TC_ACT_REDIRECT, out_if), "{name}: redirected");
        assert_eq!(&r.out[..6], &dst_mac, "{name}: destination MAC");
        assert_eq!(&r.out[6..12], &src_mac, "{name}: source MAC");
        assert_eq!(ttl(&r.out), 63, "{name}: TTL / hop limit");
        let (got, sent) = (parse_and_verify(&r.out), parse_and_verify(input(name)));
        assert_eq!(
            (got.src, got.sport, got.dst, got.dport),
            (sent.src, sent.sport, sent.dst, sent.dport),
            "{name}: nothing translated"
        );
    }
    // (These never reach the routing: the redirect target recorded by the
    // last run that did stays in the scratch entry, and nothing is counted.)
    for name in [
        "other port",
        "udp to the tcp port",
        "from other port",
        "not an endpoint",
    ] {
        let r = get(name);
        assert_eq!(r.retval, TC_ACT_UNSPEC, "{name}: to the stack");
        assert_eq!(&r.out, input(name), "{name}: untouched");
    }
    assert_eq!(
        counted,
        [5, 0, 0, 0, 0, 0],
        "redirected, redirected_neigh, to_stack, redirected_peer, xdp_tx, xdp_redirect: only the five"
    );
    for (name, r) in &off {
        assert_eq!(r.retval, TC_ACT_UNSPEC, "{name}: to the stack");
        let sent = if name.ends_with("reply") {
            input("reply")
        } else {
            input("to endpoint")
        };
        assert_eq!(&r.out, sent, "{name}: untouched");
    }
}

/// `n` TCP connections through the VIP from `dp-client`, a process in the
/// client namespace and in `cg` (translated when it connects): its JSON
/// lines.
fn socket_client(t: &Topology, cg: &TestCgroup, mode: &str, to: &str, n: usize) -> Vec<serde_json::Value> {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &t.client.name, env!("CARGO_BIN_EXE_dp-client")])
        .args([mode, to, &n.to_string()]);
    let out = cg.output(&mut cmd, Duration::from_secs(60)).unwrap();
    assert!(
        out.status.success(),
        "dp-client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("dp-client printed {l:?}: {e}")))
        .collect()
}

/// The endpoint set the agent pinned.
fn endpoint_set(agent: &Agent) -> Vec<EndpointKey> {
    let maps = dataplane::inspect::open_pinned(&agent.pins).unwrap();
    maps.endpoints.keys().map(Result::unwrap).collect()
}

/// The agent's socket-level counters and packet reasons, by name.
fn counters(agent: &Agent) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let maps = dataplane::inspect::open_pinned(&agent.pins).unwrap();
    let s = dataplane::inspect::stats(&maps).unwrap();
    (
        s.socket_lb.into_iter().map(|e| (e.event, e.count)).collect(),
        s.reasons.into_iter().map(|r| (r.reason, r.packets)).collect(),
    )
}

/// Connections translated at `connect()` (socket-level load balancing on
/// the client's cgroup) run through the node while its forward chain
/// drops every forwarded packet: with `--host-routing=true` their packets,
/// which carry the endpoint's address and which the TC program does not
/// translate, go straight to the backend's and the client's namespaces
/// (the chain's counter stays 0, `/metrics` counts them redirected into
/// the peer namespaces, none to the stack). With
/// `--socket-host-routing=false`, and with host routing off, the same
/// connections take the forwarding path, where the chain drops them.
#[test]
fn socket_level_connections_skip_the_node_forwarding_path() {
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t);
    let m = manifests(&[1, 2]);
    let m: Vec<(&str, &str)> = m.iter().map(|(n, c)| (*n, c.as_str())).collect();
    load_rules(&t.node);
    let cg = TestCgroup::new().unwrap();
    let cg_path = cg.path().display().to_string();
    let to = format!("{VIP}:80");
    let start = |extra: &[&str]| {
        let mut args = vec!["--socket-lb-cgroup", cg_path.as_str()];
        args.extend(extra);
        Agent::start_with(&t.node, &t.node_ifaces(), &[], &m, &args).unwrap()
    };
    {
        let agent = start(&["--host-routing=true"]);
        let (sock0, reasons0) = counters(&agent);
        // One first: a connection the chain drops fails after 3 s.
        let mut r = socket_client(&t, &cg, "tcp", &to, 1);
        assert_eq!(r[0]["ok"], true, "{r:?}");
        r.extend(socket_client(&t, &cg, "tcp", &to, 19));
        assert_eq!(r.len(), 20);
        for c in &r {
            assert_eq!(c["ok"], true, "{c}");
            assert!(c["backend"] == "b1" || c["backend"] == "b2", "{c}");
            assert_eq!(c["peer"], to, "{c}");
        }
        let r = socket_client(&t, &cg, "udp", &format!("{VIP}:53"), 5);
        for d in &r {
            assert_eq!(d["ok"], true, "{d}");
            assert_eq!(d["from"], format!("{VIP}:53"), "{d}");
        }
        assert_eq!(forwarded_drops(&t.node), 0, "no packet reached the forward hook");
        let (sock, reasons) = counters(&agent);
        let d = |m: &BTreeMap<String, u64>, m0: &BTreeMap<String, u64>, k: &str| m[k] - m0[k];
        assert_eq!(d(&sock, &sock0, "connect_translated"), 20, "{sock:?}");
        assert_eq!(
            d(&reasons, &reasons0, "nat_new_flow"),
            0,
            "TC translated a flow: {reasons:?}"
        );
        let metrics = agent.fresh_metrics().unwrap();
        let routed = |result: &str| {
            metrics
                .get(&format!("dataplane_host_routing_packets_total{{result=\"{result}\"}}"))
                .copied()
                .unwrap_or_else(|| panic!("no host routing series {result}: {metrics:?}"))
        };
        // SYN, request, FIN and their answers at least, both ways, and the
        // datagrams.
        assert!(routed("redirected_peer") >= 20.0 * 6.0 + 10.0, "{metrics:?}");
        assert_eq!(routed("to_stack"), 0.0, "{metrics:?}");
        // The set: both backends' TCP and UDP ports, in the maps and in
        // the agent's record that `/metrics` shows.
        assert_eq!(endpoint_set(&agent).len(), 4);
        assert_eq!(
            metrics.get("dataplane_map_entries{map=\"DP_ENDPOINTS\"}").copied(),
            Some(4.0),
            "{metrics:?}"
        );

        // A restart over a set holding what is no endpoint (an earlier
        // agent's), and one without the map (an upgrade from a release
        // that has none: the loader creates it empty): the new agent
        // writes the set whole before its programs take over.
        let mut agent = agent;
        let pin = agent.pins.join("maps").join(map_names::ENDPOINTS);
        let stale = EndpointKey {
            addr: dataplane_common::addr_of(IpAddr::from(Ipv4Addr::new(198, 18, 9, 9))).0,
            port: 1234u16.to_be(),
            proto: TCP,
            family: dataplane_common::FAMILY_V4,
        };
        let mut set: aya::maps::HashMap<_, EndpointKey, u8> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(aya::maps::MapData::from_pin(&pin).unwrap())).unwrap();
        set.insert(stale, 1, 0).unwrap();
        drop(set);
        let flags = ["--socket-lb-cgroup", cg_path.as_str(), "--host-routing=true"];
        agent.replace(&dataplane_tests::agent::agent_binary(), &flags).unwrap();
        let after = endpoint_set(&agent);
        assert_eq!(after.len(), 4, "{after:?}");
        assert!(!after.contains(&stale), "{after:?}");
        std::fs::remove_file(&pin).unwrap();
        agent.replace(&dataplane_tests::agent::agent_binary(), &flags).unwrap();
        assert_eq!(endpoint_set(&agent).len(), 4);
        let r = socket_client(&t, &cg, "tcp", &to, 5);
        assert!(r.iter().all(|c| c["ok"] == true), "after the restarts: {r:?}");
        assert_eq!(forwarded_drops(&t.node), 0, "after the restarts");
    }
    for flags in [
        &["--host-routing=true", "--socket-host-routing=false"][..],
        &["--host-routing=false"][..],
    ] {
        let before = forwarded_drops(&t.node);
        let _agent = start(flags);
        let r = socket_client(&t, &cg, "tcp", &to, 1);
        assert_eq!(r[0]["ok"], false, "{flags:?}: the forward chain let it through: {r:?}");
        assert!(
            forwarded_drops(&t.node) > before,
            "{flags:?}: the forward chain saw nothing"
        );
    }
}

/// The interfaces' kinds the agent writes (`DP_IFACES`) steer two more
/// paths, in the node namespace of a real topology:
///
/// - TC: a resolved neighbour behind a veth whose peer is in another
///   namespace is reached in that namespace (`bpf_redirect_peer`, counted
///   `redirected_peer`); before the kinds are known, and behind a veth
///   whose peer is in this namespace, by a plain redirect;
/// - XDP: a packet whose route leads back out of the interface it came in
///   on (a backend behind the client's link) is sent back with `XDP_TX`,
///   Ethernet header and TTL rewritten, unless that interface is a veth
///   (`XDP_TX` onto a veth drops the frame unless its peer runs XDP);
///   a route out of another interface passes to the stack.
#[test]
fn veths_get_their_peer_and_xdp_sends_back_only_out_of_its_own_non_veth_interface() {
    let t = Topology::new(1).unwrap();
    let (vc, node_vc_mac) = link(&t.node, NODE_CLIENT_IFACE);
    let (vb1, _) = link(&t.node, &backend_iface(1));
    let (_, b1_mac) = link(&t.backends[0], "eth0");
    let (_, client_mac) = link(&t.client, "eth0");
    for (addr, mac, dev) in [
        (backend_addr(1), b1_mac, backend_iface(1)),
        (CLIENT_ADDR, client_mac, NODE_CLIENT_IFACE.to_string()),
    ] {
        t.node
            .ip(&[
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                &mac_str(&mac),
                "dev",
                &dev,
                "nud",
                "permanent",
            ])
            .unwrap();
    }
    // A backend network behind the client's link.
    let behind_client = Ipv4Addr::new(198, 18, 99, 2);
    t.node
        .ip(&["route", "add", "198.18.99.0/24", "via", &CLIENT_ADDR.to_string()])
        .unwrap();

    let (runs, counted) = t
        .node
        .run(move || {
            pin_to_cpu(0);
            let globals = Globals {
                host_routing: true,
                ..PROGRAM_TEST_GLOBALS
            };
            let mut l = Loaded::with_globals(DpConfig::defaults(), globals);
            l.set_service(vip(1), 80, TCP, &[(backend_addr(1), 8080)]);
            l.set_service(vip(5), 80, TCP, &[(behind_client, 8080)]);
            let syn = |port: u16, v: IpAddr| Frame::tcp((CLIENT_ADDR, port), (v, 80), SYN).build();
            let tc = |l: &Loaded, f: &[u8]| Ran::of(l, l.run_tc_on(f, vc));
            let xdp = |l: &Loaded, f: &[u8]| Ran::of(l, l.run_xdp_on(f, vc));
            let mut v = vec![("tc, kinds unknown", tc(&l, &syn(41000, vip(1))))];
            l.dp.set_interface_kinds(&[(vb1, IFACE_F_VETH | IFACE_F_PEER_NETNS), (vc, 0)])
                .unwrap();
            v.push(("tc, veth", tc(&l, &syn(41001, vip(1)))));
            v.push(("xdp, back out", xdp(&l, &syn(41002, vip(5)))));
            v.push(("xdp, other interface", xdp(&l, &syn(41003, vip(1)))));
            l.dp.set_interface_kinds(&[(vb1, IFACE_F_VETH), (vc, IFACE_F_VETH)])
                .unwrap();
            // A veth whose peer is in this namespace: a plain redirect
            // (bpf_redirect_peer would drop the packet).
            v.push(("tc, veth with its peer here", tc(&l, &syn(41005, vip(1)))));
            v.push(("xdp, back out of a veth", xdp(&l, &syn(41004, vip(5)))));
            (v, RouteEvent::ALL.map(|e| l.route_event(e)))
        })
        .join()
        .expect("the programs run in the node namespace");
    let get = |name: &str| &runs.iter().find(|(n, _)| *n == name).unwrap().1;
    let input_macs = Frame::tcp((CLIENT_ADDR, 1), (vip(1), 80), SYN).build()[..12].to_vec();

    for name in ["tc, kinds unknown", "tc, veth", "tc, veth with its peer here"] {
        let r = get(name);
        assert_eq!((r.retval, r.ifindex), (TC_ACT_REDIRECT, vb1), "{name}");
        assert_eq!(&r.out[..6], &b1_mac, "{name}");
        assert_eq!(ttl(&r.out), 63, "{name}");
    }
    let r = get("xdp, back out");
    assert_eq!((r.retval, r.ifindex), (XDP_TX, vc), "XDP_TX out of the client's link");
    assert_eq!(&r.out[..6], &client_mac, "towards the gateway");
    assert_eq!(&r.out[6..12], &node_vc_mac);
    assert_eq!(ttl(&r.out), 63);
    assert_eq!(parse_and_verify(&r.out).dst, IpAddr::from(behind_client));
    for (name, dst) in [
        ("xdp, other interface", IpAddr::from(backend_addr(1))),
        ("xdp, back out of a veth", IpAddr::from(behind_client)),
    ] {
        let r = get(name);
        assert_eq!((r.retval, r.ifindex), (XDP_PASS, 0), "{name}: to the stack");
        assert_eq!(&r.out[..12], &input_macs[..], "{name}");
        assert_eq!(ttl(&r.out), 64, "{name}");
        assert_eq!(parse_and_verify(&r.out).dst, dst, "{name}: translated all the same");
    }
    // redirected, redirected_neigh, to_stack, redirected_peer, xdp_tx, xdp_redirect
    assert_eq!(counted, [2, 0, 2, 1, 1, 0]);
}

/// What the agent tells the programs about interfaces
/// (`ifwatch::interface_kinds`, read from a netlink link dump in its
/// namespace): a veth with its peer in another namespace (a pod's) gets
/// both bits, a veth pair inside the namespace only the veth bit (a peer
/// redirect would drop its packets), loopback none.
#[test]
fn interface_kinds_tell_veths_with_a_peer_elsewhere_from_other_links() {
    let t = Topology::new(1).unwrap();
    t.node
        .ip(&["link", "add", "loc0", "type", "veth", "peer", "name", "loc1"])
        .unwrap();
    let index = |name: &str| link(&t.node, name).0;
    let want = [
        (index(&backend_iface(1)), IFACE_F_VETH | IFACE_F_PEER_NETNS),
        (index(NODE_CLIENT_IFACE), IFACE_F_VETH | IFACE_F_PEER_NETNS),
        (index("loc0"), IFACE_F_VETH),
        (index("loc1"), IFACE_F_VETH),
        (1, 0),
    ];
    let kinds = t
        .node
        .run(|| dataplane::bpf::ifwatch::interface_kinds().expect("the link dump"))
        .join()
        .unwrap();
    for (ifindex, flags) in want {
        assert!(
            kinds.contains(&(ifindex, flags)),
            "ifindex {ifindex} flags {flags}: {kinds:?}"
        );
    }
    assert_eq!(kinds.len(), want.len(), "{kinds:?}");
}

const XDP_REDIRECT: u32 = 4;

/// XDP sends a translated packet to another interface (`XDP_REDIRECT`,
/// `bpf_redirect`) exactly when the FIB names a resolved neighbour there,
/// the packet fits the egress MTU and the agent says the interface takes
/// XDP frames (`IFACE_F_XDP_XMIT`); everything else passes to the stack,
/// translated, headers otherwise untouched. In the node namespace of a
/// real topology (backend 2's link with an MTU of 1000):
///
/// - redirected, IPv4 and IPv6: verdict `XDP_REDIRECT`, the target
///   backend 1's link, Ethernet header the node side's and the backend's
///   MACs, TTL / hop limit one less, checksums valid;
/// - to the stack: no neighbour entry, a packet over the egress MTU, an
///   egress veth that cannot take XDP frames, back out of a veth that
///   cannot, host routing off;
/// - back out of a veth that takes XDP frames: `XDP_TX`.
#[test]
fn xdp_redirects_to_interfaces_that_take_xdp_frames_and_passes_the_rest() {
    let t = Topology::new(2).unwrap();
    t.enable_ipv6().unwrap();
    let (vc, node_vc_mac) = link(&t.node, NODE_CLIENT_IFACE);
    let (vb1, node_vb1_mac) = link(&t.node, &backend_iface(1));
    let (vb2, node_vb2_mac) = link(&t.node, &backend_iface(2));
    let (_, b1_mac) = link(&t.backends[0], "eth0");
    let (_, b2_mac) = link(&t.backends[1], "eth0");
    let (_, client_mac) = link(&t.client, "eth0");
    for (family, addr, mac, dev) in [
        ("-4", backend_addr(1).to_string(), b1_mac, backend_iface(1)),
        ("-6", backend_addr6(1).to_string(), b1_mac, backend_iface(1)),
        ("-4", backend_addr(2).to_string(), b2_mac, backend_iface(2)),
        ("-4", CLIENT_ADDR.to_string(), client_mac, NODE_CLIENT_IFACE.to_string()),
    ] {
        t.node
            .ip(&[
                family,
                "neigh",
                "replace",
                &addr,
                "lladdr",
                &mac_str(&mac),
                "dev",
                &dev,
                "nud",
                "permanent",
            ])
            .unwrap();
    }
    t.node.ip(&["link", "set", &backend_iface(2), "mtu", "1000"]).unwrap();
    let behind_client = Ipv4Addr::new(198, 18, 99, 2);
    t.node
        .ip(&["route", "add", "198.18.99.0/24", "via", &CLIENT_ADDR.to_string()])
        .unwrap();
    // On backend 1's link, no neighbour entry.
    let unresolved = Ipv4Addr::new(198, 18, 1, 3);

    let (runs, counted, off_counted) = t
        .node
        .run(move || {
            pin_to_cpu(0);
            let globals = Globals {
                host_routing: true,
                ..PROGRAM_TEST_GLOBALS
            };
            let mut l = Loaded::with_globals(DpConfig::defaults(), globals);
            let vip6: IpAddr = VIP6.parse::<Ipv6Addr>().unwrap().into();
            l.set_service(vip(1), 80, TCP, &[(backend_addr(1), 8080)]);
            l.set_service(vip(2), 53, UDP, &[(backend_addr(2), 5353)]);
            l.set_service(vip(3), 80, TCP, &[(unresolved, 8080)]);
            l.set_service(vip(5), 80, TCP, &[(behind_client, 8080)]);
            l.set_service(vip6, 80, TCP, &[(IpAddr::from(backend_addr6(1)), 8080)]);
            let xdp = |l: &Loaded, f: &[u8]| Ran::of(l, l.run_xdp_on(f, vc));
            let syn = |port: u16, v: IpAddr| Frame::tcp((CLIENT_ADDR, port), (v, 80), SYN).build();
            let udp = |port: u16, len: usize| Frame::udp((CLIENT_ADDR, port), (vip(2), 53), &vec![7u8; len]).build();
            let client6: IpAddr = CLIENT_ADDR6.parse::<Ipv6Addr>().unwrap().into();
            let xmit = dataplane_common::IFACE_F_XDP_XMIT;
            let peer = IFACE_F_VETH | IFACE_F_PEER_NETNS;
            l.dp.set_interface_kinds(&[(vb1, peer | xmit), (vb2, peer | xmit), (vc, peer)])
                .unwrap();
            let mut v = vec![
                ("redirect", xdp(&l, &syn(42000, vip(1)))),
                (
                    "redirect ipv6",
                    xdp(&l, &Frame::tcp((client6, 42001), (vip6, 80), SYN).build()),
                ),
                ("under the mtu", xdp(&l, &udp(42002, 900))),
                ("over the mtu", xdp(&l, &udp(42003, 1100))),
                ("no neighbour", xdp(&l, &syn(42004, vip(3)))),
                ("back out of a veth without", xdp(&l, &syn(42005, vip(5)))),
            ];
            l.dp.set_interface_kinds(&[(vb1, peer), (vb2, peer), (vc, peer | xmit)])
                .unwrap();
            v.push(("veth without", xdp(&l, &syn(42006, vip(1)))));
            v.push(("back out of a veth with", xdp(&l, &syn(42007, vip(5)))));
            let counted = RouteEvent::ALL.map(|e| l.route_event(e));
            let mut off = Loaded::with_globals(DpConfig::defaults(), PROGRAM_TEST_GLOBALS);
            off.set_service(vip(1), 80, TCP, &[(backend_addr(1), 8080)]);
            off.dp
                .set_interface_kinds(&[(vb1, peer | xmit), (vc, peer | xmit)])
                .unwrap();
            v.push(("host routing off", xdp(&off, &syn(42008, vip(1)))));
            let off_counted = RouteEvent::ALL.map(|e| off.route_event(e));
            (v, counted, off_counted)
        })
        .join()
        .expect("the program runs in the node namespace");
    let get = |name: &str| &runs.iter().find(|(n, _)| *n == name).unwrap().1;
    let input_macs = Frame::tcp((CLIENT_ADDR, 1), (vip(1), 80), SYN).build()[..12].to_vec();

    for (name, want) in [
        ("redirect", IpAddr::from(backend_addr(1))),
        ("redirect ipv6", IpAddr::from(backend_addr6(1))),
    ] {
        let r = get(name);
        assert_eq!((r.retval, r.ifindex), (XDP_REDIRECT, vb1), "{name}");
        assert_eq!(&r.out[..6], &b1_mac, "{name}: destination MAC, the backend's");
        assert_eq!(&r.out[6..12], &node_vb1_mac, "{name}: source MAC, the node side's");
        assert_eq!(ttl(&r.out), 63, "{name}: TTL / hop limit");
        assert_eq!(parse_and_verify(&r.out).dst, want, "{name}");
    }
    let r = get("under the mtu");
    assert_eq!(
        (r.retval, r.ifindex),
        (XDP_REDIRECT, vb2),
        "928-byte IP packet, MTU 1000"
    );
    assert_eq!(&r.out[..12], &[b2_mac, node_vb2_mac].concat()[..]);
    assert_eq!(parse_and_verify(&r.out).dst, IpAddr::from(backend_addr(2)));

    for (name, dst) in [
        ("over the mtu", IpAddr::from(backend_addr(2))),
        ("no neighbour", IpAddr::from(unresolved)),
        ("back out of a veth without", IpAddr::from(behind_client)),
        ("veth without", IpAddr::from(backend_addr(1))),
        ("host routing off", IpAddr::from(backend_addr(1))),
    ] {
        let r = get(name);
        assert_eq!((r.retval, r.ifindex), (XDP_PASS, 0), "{name}: to the stack");
        assert_eq!(&r.out[..12], &input_macs[..], "{name}: Ethernet header untouched");
        assert_eq!(ttl(&r.out), 64, "{name}: TTL untouched");
        assert_eq!(parse_and_verify(&r.out).dst, dst, "{name}: translated all the same");
    }
    let r = get("back out of a veth with");
    assert_eq!(
        (r.retval, r.ifindex),
        (XDP_TX, vc),
        "XDP_TX onto a veth that takes frames"
    );
    assert_eq!(&r.out[..12], &[client_mac, node_vc_mac].concat()[..]);
    assert_eq!(ttl(&r.out), 63);

    // redirected, redirected_neigh, to_stack, redirected_peer, xdp_tx, xdp_redirect
    assert_eq!(counted, [0, 0, 4, 0, 1, 3]);
    assert_eq!(off_counted, [0; 6], "nothing counted with host routing off");
}

/// A NodePort Service with one endpoint on this node (`node-a`) and one
/// on node B.
fn node_port_manifests() -> Vec<(&'static str, String)> {
    let svc = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: np, namespace: default}}
spec:
  type: NodePort
  clusterIP: 198.19.7.40
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}]
"
    );
    let slice = dataplane_tests::manifests::two_node_slice("default", "np-abcde", "np", ("http", "TCP", 8080));
    vec![("service.yaml", svc), ("slice.yaml", slice)]
}

const NODE_PORT: u16 = 30080;

/// `n` connections from `ns` to `to`, each asking once: the backends
/// that answered and the client addresses they saw, or the first failure.
fn ask_peers(ns: &Netns, to: SocketAddr, n: usize) -> Result<Vec<(String, String)>, String> {
    ns.run(move || {
        (0..n)
            .map(|i| {
                let mut c = Conn::connect(to, Duration::from_secs(1)).map_err(|e| format!("connection {i}: {e}"))?;
                c.ask_peer().map_err(|e| format!("connection {i}: {e}"))
            })
            .collect()
    })
    .join()
    .unwrap()
}

/// The interfaces the agent last logged as taking XDP frames
/// ("interfaces XDP can redirect ... ifindexes=[4, 7]").
fn xdp_targets_logged(agent: &Agent) -> Option<Vec<u32>> {
    let log = agent.log();
    let line = log.lines().rev().find(|l| l.contains("interfaces XDP can redirect"))?;
    let list = line.split("ifindexes=[").nth(1)?.split(']').next()?;
    Some(
        list.split(", ")
            .filter(|i| !i.is_empty())
            .map(|i| i.parse().unwrap())
            .collect(),
    )
}

/// NodePort connections from outside, through XDP on node A's external
/// interface, with a forward chain in node A that drops every forwarded
/// packet: the XDP program redirects the client's packets to the local
/// backend's veth and to node B's link (both with GRO on at the far
/// end, so they take XDP frames), TC host-routes the replies, and
/// nothing reaches the forward hook; node A's netfilter conntrack never
/// sees the flows. Once the far ends turn GRO off, the agent notices
/// (netdev netlink), XDP passes the packets to the stack instead of
/// redirecting them into a drop, the forward chain drops them, and
/// without the chain the same connections work through the stack.
#[test]
fn node_port_connections_through_xdp_skip_the_node_forwarding_path() {
    let t = TwoNodes::new().unwrap();
    // XDP sees full checksums only from real NICs (see README).
    t.client.exec(&["ethtool", "-K", "eth0", "tx", "off"]).unwrap();
    let gro = |on: &str| {
        t.backend_a.exec(&["ethtool", "-K", "eth0", "gro", on]).unwrap();
        t.node_b.exec(&["ethtool", "-K", "vn", "gro", on]).unwrap();
    };
    gro("on");
    let _servers = [
        tcp_server(&t.backend_a, BACKEND_A, 8080, "a"),
        tcp_server(&t.backend_b, BACKEND_B, 8080, "b"),
    ];
    let m = node_port_manifests();
    let m: Vec<(&str, &str)> = m.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let agent = Agent::start_with(
        &t.node_a,
        &s(&["vn", "vb1"]),
        &s(&["ve"]),
        &m,
        &[
            "--node-name",
            "node-a",
            "--snat-ip",
            "198.18.250.1",
            "--node-ip",
            "198.18.200.1,198.18.250.1",
            "--host-routing=true",
        ],
    )
    .unwrap();
    let index = |name: &str| link(&t.node_a, name).0;
    let (vb1, vn) = (index("vb1"), index("vn"));
    let targets = xdp_targets_logged(&agent).unwrap_or_else(|| panic!("no XDP targets logged:\n{}", agent.log()));
    for i in [vb1, vn] {
        assert!(targets.contains(&i), "ifindex {i} not in {targets:?}");
    }
    // XDP cannot resolve neighbours (the stack does it for the first
    // packets, and would here, before the forward chain drops them): the
    // node's neighbours are known, as traffic keeps them on real nodes.
    // One datagram to each makes node A resolve them.
    let peers = [BACKEND_A, NODE_B, EXT_CLIENT];
    t.node_a
        .run(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            for p in peers {
                s.send_to(b"x", (p, 9)).unwrap();
            }
        })
        .join()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for p in peers {
        loop {
            let n = t.node_a.ip(&["neigh", "show", &p.to_string()]).unwrap();
            if n.contains("lladdr") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "node A did not resolve {p}: {n}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    load_rules(&t.node_a);
    let to = SocketAddr::from((NODE_A_EXT, NODE_PORT));
    let seen = ask_peers(&t.client, to, 30).expect("NodePort through XDP, redirected");
    assert!(seen.contains(&("a".to_string(), EXT_CLIENT.to_string())), "{seen:?}");
    assert!(seen.contains(&("b".to_string(), NODE_A.to_string())), "{seen:?}");
    assert_eq!(forwarded_drops(&t.node_a), 0, "no packet reached the forward hook");
    let metrics = agent.fresh_metrics().unwrap();
    let routed = |m: &std::collections::BTreeMap<String, f64>, result: &str| {
        m.get(&format!("dataplane_host_routing_packets_total{{result=\"{result}\"}}"))
            .copied()
            .unwrap_or_else(|| panic!("no host routing series {result}: {m:?}"))
    };
    // Per connection at least SYN, ACK, request and FIN towards the
    // backend (XDP), their answers (TC).
    assert!(routed(&metrics, "xdp_redirect") >= 30.0 * 3.0, "{metrics:?}");
    assert!(routed(&metrics, "redirected_peer") >= 30.0 * 2.0, "{metrics:?}");
    assert_eq!(routed(&metrics, "to_stack"), 0.0, "{metrics:?}");
    let conntrack = || t.node_a.exec(&["cat", "/proc/net/nf_conntrack"]).unwrap();
    let ct = conntrack();
    assert!(
        !ct.contains(&format!("dport={NODE_PORT}")) && !ct.contains("dport=8080"),
        "node A's netfilter conntrack saw a NodePort flow:\n{ct}"
    );

    // The far ends stop taking XDP frames.
    gro("off");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let last = xdp_targets_logged(&agent).unwrap_or_default();
        if !last.contains(&vb1) && !last.contains(&vn) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not notice GRO off within 10 s:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = ask_peers(&t.client, to, 1).expect_err("to the stack, where the forward chain drops");
    eprintln!("through the stack with the chain: {err}");
    assert!(forwarded_drops(&t.node_a) > 0, "the forward chain saw the packets");
    // Without the forward chain; conntrack stays loaded (`seen`).
    t.node_a
        .exec(&["nft", "delete", "chain", "inet", "dptest", "forwarded"])
        .unwrap();
    let before = routed(&agent.fresh_metrics().unwrap(), "to_stack");
    let seen = ask_peers(&t.client, to, 20).expect("NodePort through XDP and the stack");
    assert!(seen.contains(&("a".to_string(), EXT_CLIENT.to_string())), "{seen:?}");
    assert!(seen.contains(&("b".to_string(), NODE_A.to_string())), "{seen:?}");
    let after = agent.fresh_metrics().unwrap();
    assert!(routed(&after, "to_stack") >= before + 20.0 * 3.0, "{after:?}");
    // The check above can see flows: these went through the stack.
    assert!(conntrack().contains("dport=8080"), "{}", conntrack());
}
