//! `cargo xtask demo`: a one-machine cluster in network namespaces, the real
//! agent fed with deploy/examples manifests, and real connections through
//! the Service VIP, load-balanced by the eBPF program.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use dataplane_tests::{
    agent::Agent,
    netns::{addr6, backend_addr, require_root_and_tools, Topology, CLIENT_ADDR},
    servers::{tcp_server, Conn},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const CONNECTIONS: usize = 400;

fn step(msg: &str) {
    println!("\n==> {msg}");
}

fn spread(t: &Topology, n: usize) -> Result<BTreeMap<String, usize>> {
    spread_to(t, SocketAddr::from((VIP, 80)), n)
}

/// `n` connections to `to`, one question each: answers by backend.
fn spread_to(t: &Topology, to: SocketAddr, n: usize) -> Result<BTreeMap<String, usize>> {
    t.client
        .run(move || {
            let mut counts = BTreeMap::new();
            for i in 0..n {
                let mut c =
                    Conn::connect(to, Duration::from_secs(3)).with_context(|| format!("connection {i} to {to}"))?;
                let (who, peer) = c.ask_peer()?;
                *counts.entry(format!("{who} (sees {peer})")).or_insert(0) += 1;
            }
            Ok(counts)
        })
        .join()
        .expect("client thread panicked")
}

fn print_spread(counts: &BTreeMap<String, usize>, n: usize, elapsed: Duration) {
    println!(
        "    {:<48} {:>6}  share",
        "backend (and the client address it sees)", "conns"
    );
    for (who, c) in counts {
        let bar = "#".repeat(c * 40 / n);
        println!("    {who:<48} {c:>6}  {bar}");
    }
    println!("    {n} connections, all answered, in {:.2} s", elapsed.as_secs_f64());
}

/// `text` without the endpoint entry whose address is `addr`.
fn remove_endpoint(text: &str, addr: &str) -> String {
    text.split("\n- addresses: ")
        .filter(|chunk| !chunk.starts_with(&format!("[{addr}]")) && !chunk.starts_with(&format!("[\"{addr}\"]")))
        .collect::<Vec<_>>()
        .join("\n- addresses: ")
}

fn main() -> Result<()> {
    require_root_and_tools();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let web = std::fs::read_to_string(root.join("deploy/examples/web.yaml"))?;
    let skip = std::fs::read_to_string(root.join("deploy/examples/skip.yaml"))?;
    let dual = std::fs::read_to_string(root.join("deploy/examples/dual.yaml"))?;

    step("Building the one-machine cluster: client, node and 5 backend namespaces");
    let t = Topology::new(5)?;
    t.enable_ipv6()?;
    println!(
        "    client {CLIENT_ADDR} / 2001:db8:100::2 --veth-- node (eBPF programs) --veth-- backends \
         198.18.{{1..5}}.2 / 2001:db8:18:{{1..5}}::2"
    );
    // Ports as deploy/examples/web.yaml's EndpointSlices serve them: the
    // named target port "http" is 8080 in one slice and 8081 in the other.
    let ports = [8080, 8080, 8081, 8081, 8080];
    let mut servers = Vec::new();
    for (i, ns) in t.backends.iter().enumerate() {
        let addr = backend_addr(i + 1);
        let port = ports[i];
        servers.push(tcp_server(ns, addr, port, &format!("{addr}:{port}")));
    }
    // deploy/examples/dual.yaml's endpoints (grpc 50051), both on backend 1.
    let b1 = &t.backends[0];
    b1.ip(&["addr", "add", "198.18.1.9/24", "dev", "eth0"])?;
    addr6(b1, "eth0", "2001:db8:18:1::9")?;
    for addr in ["198.18.1.9", "2001:db8:18:1::9"] {
        let ip: IpAddr = addr.parse()?;
        servers.push(tcp_server(b1, ip, 50051, &SocketAddr::new(ip, 50051).to_string()));
    }

    step("Starting the agent in the node namespace with deploy/examples/{web,skip,dual}.yaml");
    let mut agent = Agent::start(
        &t.node,
        &t.node_ifaces(),
        &[],
        &[
            ("web.yaml", web.as_str()),
            ("skip.yaml", skip.as_str()),
            ("dual.yaml", dual.as_str()),
        ],
    )?;
    for line in agent.log().lines() {
        if line.contains("attached") || line.contains("WARN") || line.contains("sync applied") {
            println!("    agent| {}", line.trim());
        }
    }
    println!("    (198.18.2.2 is terminating and ready ones exist: it gets no new flows)");

    step(&format!(
        "{CONNECTIONS} TCP connections from the client to Service shop/web at {VIP}:80"
    ));
    let started = Instant::now();
    let counts = spread(&t, CONNECTIONS)?;
    print_spread(&counts, CONNECTIONS, started.elapsed());

    step("The dual-stack Service default/api: 50 connections to each of its ClusterIPs");
    println!("    each ClusterIP reaches only the endpoint of its own family (an EndpointSlice per family)");
    for vip in ["198.19.0.30", "2001:db8:19::30"] {
        let to = SocketAddr::new(vip.parse()?, 50051);
        let started = Instant::now();
        println!("    to {to}:");
        print_spread(&spread_to(&t, to, 50)?, 50, started.elapsed());
    }

    step("An open connection, then its backend is removed from the EndpointSlice");
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (who_tx, who_rx) = std::sync::mpsc::channel::<String>();
    let open = t.client.run(move || -> Result<Vec<String>> {
        let mut c = Conn::connect(SocketAddr::from((VIP, 80)), Duration::from_secs(3))?;
        who_tx.send(c.ask()?)?;
        go_rx.recv_timeout(Duration::from_secs(30))?;
        (0..5).map(|_| Ok(c.ask()?)).collect()
    });
    let who = who_rx.recv_timeout(Duration::from_secs(10))?;
    let addr = who.split(':').next().unwrap_or_default().to_string();
    println!("    open connection {} -> {VIP}:80 is served by {who}", CLIENT_ADDR);
    // Remove that endpoint from its EndpointSlice, as the EndpointSlice
    // controller does when a pod goes away.
    for (file, text) in [("web.yaml", &web), ("skip.yaml", &skip)] {
        let edited = remove_endpoint(text, &addr);
        if edited != *text {
            agent.update(file, &edited)?;
            println!("    {file} edited: endpoint {addr} removed; the agent re-synced the maps");
        }
    }
    go_tx.send(())?;
    let answers = open.join().expect("client thread panicked")?;
    println!("    the open connection still answers, from: {}", answers.join(", "));
    assert!(answers.iter().all(|a| *a == who), "the open connection moved");

    step("New connections after the change");
    let started = Instant::now();
    let counts = spread(&t, CONNECTIONS)?;
    print_spread(&counts, CONNECTIONS, started.elapsed());
    assert!(
        !counts.keys().any(|k| k.starts_with(&format!("{addr}:"))),
        "new connections reached the removed backend"
    );
    println!("    {addr} gets no new connections");

    step("Stopping the agent, `dataplane cleanup` (programs detach), removing the namespaces");
    agent.stop()?;
    print!(
        "{}",
        agent
            .cleanup()?
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    );
    drop(servers);
    drop(t);
    println!("    done");
    Ok(())
}
