//! `cargo xtask demo`: a one-machine cluster in network namespaces, the real
//! agent fed with deploy/examples manifests, and real connections through
//! the Service VIP, load-balanced by the eBPF programs: per packet (TC) and,
//! for a client process in the agent's cgroup, at connect time.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use dataplane_tests::{
    agent::Agent,
    cgroup::TestCgroup,
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

/// `n` connections to the VIP from `dp-client`, a process in `cg` (the
/// cgroup the socket-level programs are attached to): answers by backend,
/// and the peer address the client's sockets reported.
fn spread_from_cgroup(t: &Topology, cg: &TestCgroup, n: usize) -> Result<(BTreeMap<String, usize>, Vec<String>)> {
    let client = std::env::current_exe()?.with_file_name("dp-client");
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &t.client.name])
        .arg(&client)
        .args(["tcp", &format!("{VIP}:80"), &n.to_string()]);
    let out = cg.output(&mut cmd, Duration::from_secs(60))?;
    let mut counts = BTreeMap::new();
    let mut peers = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["ok"] != true {
            bail!("a connection from the cgroup failed: {v}");
        }
        let key = format!(
            "{} (sees {})",
            v["backend"].as_str().unwrap_or("?"),
            v["seen_as"].as_str().unwrap_or("?")
        );
        *counts.entry(key).or_insert(0) += 1;
        let peer = v["peer"].as_str().unwrap_or("?").to_string();
        if !peers.contains(&peer) {
            peers.push(peer);
        }
    }
    if counts.values().sum::<usize>() != n {
        bail!(
            "{} of {n} connections answered: {}",
            counts.values().sum::<usize>(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((counts, peers))
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
    // The socket-level programs act on processes of one cgroup: the demo's
    // own (a node attaches them to its cgroup root instead).
    let cg = TestCgroup::new()?;
    let cg_path = cg.path().display().to_string();
    println!("    TC ingress on the node's interfaces; socket-level programs on cgroup {cg_path}");
    let mut agent = Agent::start_with(
        &t.node,
        &t.node_ifaces(),
        &[],
        &[
            ("web.yaml", web.as_str()),
            ("skip.yaml", skip.as_str()),
            ("dual.yaml", dual.as_str()),
        ],
        &["--socket-lb-cgroup", &cg_path],
    )?;
    for line in agent.log().lines() {
        if line.contains("attached") || line.contains("WARN") || line.contains("sync applied") {
            println!("    agent| {}", line.trim());
        }
    }
    println!("    (198.18.2.2 is terminating and ready ones exist: it gets no new flows)");

    step(&format!(
        "{CONNECTIONS} TCP connections from the client to Service shop/web at {VIP}:80 (per-packet path: TC)"
    ));
    let before = agent.translations()?;
    let started = Instant::now();
    let counts = spread(&t, CONNECTIONS)?;
    print_spread(&counts, CONNECTIONS, started.elapsed());
    let after = agent.translations()?;
    println!(
        "    agent counters: {} new flows translated by the TC program, {} connections at connect time",
        after.1 - before.1,
        after.0 - before.0
    );

    step(&format!(
        "The same {CONNECTIONS} connections from a client process in the cgroup (socket-level load balancing)"
    ));
    let started = Instant::now();
    let (counts, peers) = spread_from_cgroup(&t, &cg, CONNECTIONS)?;
    print_spread(&counts, CONNECTIONS, started.elapsed());
    let later = agent.translations()?;
    println!(
        "    agent counters: {} connections got their backend at connect(), {} new flows translated per packet",
        later.0 - after.0,
        later.1 - after.1
    );
    println!(
        "    the client's sockets report their peer as {} (getpeername shows the VIP, not the backend)",
        peers.join(", ")
    );
    if later.0 - after.0 != CONNECTIONS as u64 || later.1 != after.1 {
        bail!("the cgroup's connections were not all translated at connect time");
    }

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
    drop(cg);
    drop(t);
    println!("    done");
    Ok(())
}
