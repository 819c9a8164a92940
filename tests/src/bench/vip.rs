//! Latency and throughput through a VIP in network namespaces, for four
//! contenders built side by side, each in its own copy of the test topology
//! (client, node, two backends; `netns::Topology`):
//!
//! - `dataplane-socket`: the real agent as deployed: socket-level load
//!   balancing on a cgroup the client process runs in (the Service is
//!   translated when the client connects) and TC ingress (tcx) on every
//!   node interface, no iptables/nft rules in the node namespace. With
//!   host routing (the bench's default) its packets are host-routed by the
//!   endpoint set; `dataplane-socket-stack` (on request) is the same
//!   with `--socket-host-routing=false`, its packets through the stack;
//! - `dataplane`: the agent with TC only: every packet of the connection is
//!   translated by the per-packet path (what traffic from outside the
//!   node, or from pods outside the cgroup, gets);
//! - `iptables`: kube-proxy iptables-mode rules (`kube_rules::iptables`)
//!   loaded with `iptables-restore` in the node namespace, no BPF program;
//! - `nftables`: kube-proxy nftables-mode rules (`kube_rules::nftables`)
//!   loaded with `nft -f` in the node namespace, no BPF program;
//! - `direct`: no rules at all; the client talks to backend 1 directly
//!   (through the same node): the floor;
//! - `direct-both`: no rules; each new connection goes directly to backend
//!   1 or 2 in turn: the floor with the spread a VIP gives.
//!
//! Every Service has both backends as endpoints; the one measured is the
//! last (the last rule of KUBE-SERVICES). The contenders are measured
//! interleaved, round after round, so that drift on a shared machine hits
//! them alike. The client of every contender is a process of its own
//! (`dp-bench --client-round`, started in the client namespace for each
//! round), so that the socket-level contender's client can run in its
//! cgroup and every contender's client is the same kind of process.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{
    kube_rules::{self, Proto, SvcPort},
    pin_thread, PIN_CPU,
};
use crate::{
    agent::{Agent, TempDir},
    manifests,
    netns::{backend_addr, Netns, Topology},
};

pub struct Config {
    pub scales: Vec<usize>,
    pub rounds: usize,
    /// New connections per contender per round.
    pub conns: usize,
    /// Request/response exchanges per contender per round.
    pub rr: usize,
    /// Single-stream send time per contender per round.
    pub stream: Duration,
    /// The whole part stops starting new rounds after this.
    pub deadline: Duration,
    /// Who is measured, in this order every round; must include `direct`.
    pub contenders: Vec<Contender>,
    /// Netfilter conntrack loaded in every contender's node namespace
    /// (`NODE_CONNTRACK`), as on real nodes; `dp-bench
    /// --no-node-conntrack` measures without it.
    pub node_conntrack: bool,
    /// The dataplane contenders run with `--host-routing=true` (not the
    /// agent's default); `dp-bench --no-host-routing` measures without.
    pub host_routing: bool,
}

/// Netfilter conntrack in a node namespace, as real nodes have it (the
/// CNI's, the kubelet's and the container runtime's rules keep it loaded):
/// a table whose rules only read each packet's conntrack state, which
/// makes the kernel track every flow through the namespace.
const NODE_CONNTRACK: &str = "table inet dp_bench_node_conntrack {
  chain prerouting { type filter hook prerouting priority -150; ct state invalid counter; }
  chain output { type filter hook output priority -150; ct state invalid counter; }
}
";

const BACKEND_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;
const MSG: usize = 32;
const IO_TIMEOUT: Duration = Duration::from_secs(3);
const SERVER_LIFETIME: Duration = Duration::from_secs(3600);

/// Who is measured. The default set is `DEFAULT_CONTENDERS`; the others
/// are for investigations (`dp-bench --contenders ...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    /// The agent with socket-level load balancing on the client's cgroup
    /// and TC on the node's interfaces (as deployed).
    DataplaneSocket,
    /// As `DataplaneSocket`, with `--socket-host-routing=false`: the
    /// socket-translated connections' packets take the node's stack even
    /// with host routing on (the path before socket-level host routing).
    DataplaneSocketStack,
    /// The agent with TC only (the per-packet path).
    Dataplane,
    /// The agent with XDP (auto mode: native on veth) on the node's
    /// interfaces instead of TC.
    DataplaneXdp,
    /// The agent (TC) loading the eBPF object named by `DP_BENCH_ALT_OBJECT`
    /// (`--bpf-object`): an A/B of a kernel-side change in one run.
    DataplaneAlt,
    /// The agent (TC) attached with the same Services, but the client talks
    /// to backend 1 directly, as `direct`: every packet crosses the TC
    /// program and finds no Service (hook, parse, two lookups, counters).
    DirectTc,
    Iptables,
    Nftables,
    Direct,
    /// No rules; each new connection goes directly to backend 1 or 2 in
    /// turn, as a VIP spreads them: the floor with the same spread.
    DirectBoth,
}

pub const DEFAULT_CONTENDERS: [Contender; 6] = [
    Contender::DataplaneSocket,
    Contender::Dataplane,
    Contender::Iptables,
    Contender::Nftables,
    Contender::Direct,
    Contender::DirectBoth,
];

const ALL_CONTENDERS: [Contender; 10] = [
    Contender::DataplaneSocket,
    Contender::DataplaneSocketStack,
    Contender::Dataplane,
    Contender::DataplaneXdp,
    Contender::DataplaneAlt,
    Contender::DirectTc,
    Contender::Iptables,
    Contender::Nftables,
    Contender::Direct,
    Contender::DirectBoth,
];

/// The environment variable naming the eBPF object of `dataplane-alt`.
pub const ALT_OBJECT_ENV: &str = "DP_BENCH_ALT_OBJECT";

impl Contender {
    pub fn name(self) -> &'static str {
        match self {
            Contender::DataplaneSocket => "dataplane-socket",
            Contender::DataplaneSocketStack => "dataplane-socket-stack",
            Contender::Dataplane => "dataplane",
            Contender::DataplaneXdp => "dataplane-xdp",
            Contender::DataplaneAlt => "dataplane-alt",
            Contender::DirectTc => "direct-tc",
            Contender::Iptables => "iptables",
            Contender::Nftables => "nftables",
            Contender::Direct => "direct",
            Contender::DirectBoth => "direct-both",
        }
    }

    pub fn from_name(name: &str) -> Option<Contender> {
        ALL_CONTENDERS.into_iter().find(|c| c.name() == name)
    }

    /// Socket-level load balancing on the client's cgroup.
    fn is_socket(self) -> bool {
        matches!(self, Contender::DataplaneSocket | Contender::DataplaneSocketStack)
    }

    fn is_dataplane(self) -> bool {
        matches!(
            self,
            Contender::DataplaneSocket
                | Contender::DataplaneSocketStack
                | Contender::Dataplane
                | Contender::DataplaneXdp
                | Contender::DataplaneAlt
                | Contender::DirectTc
        )
    }
}

/// Service `i`'s VIP: 198.19.0.0/16 from .0.1 on.
pub(crate) fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0xc613_0000u32 + 1 + i as u32)
}

fn services(n: usize) -> Vec<SvcPort> {
    (0..n)
        .map(|i| SvcPort {
            namespace: "bench".into(),
            name: format!("svc-{i}"),
            port_name: "http".into(),
            vip: vip(i),
            port: SERVICE_PORT,
            protocol: Proto::Tcp,
            node_port: None,
            endpoints: vec![(backend_addr(1), BACKEND_PORT), (backend_addr(2), BACKEND_PORT)],
        })
        .collect()
}

/// A backend server: answers every MSG-byte request with MSG bytes; a
/// connection whose first byte is `S` is a sink that counts what it gets
/// and answers the count when the sender shuts down. One connection at a
/// time (the client is sequential), so no thread start in the path.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn server(ns: &Netns, addr: Ipv4Addr) -> Result<Server> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = ns.run(move || {
        if let Err(e) = pin_thread(PIN_CPU) {
            let _ = tx.send(Err(e.to_string()));
            return;
        }
        let l = match TcpListener::bind((addr, BACKEND_PORT)) {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        };
        let _ = tx.send(Ok(()));
        let started = Instant::now();
        while !s.load(Ordering::Relaxed) && started.elapsed() < SERVER_LIFETIME {
            let mut pfd = libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, 100) };
            if n <= 0 {
                continue;
            }
            if let Ok((c, _)) = l.accept() {
                let _ = serve(c);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .context("backend server did not start")?
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("bind {addr}:{BACKEND_PORT}"))?;
    Ok(Server {
        stop,
        thread: Some(thread),
    })
}

fn serve(mut c: TcpStream) -> std::io::Result<()> {
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = vec![0u8; 256 * 1024];
    let n = c.read(&mut buf)?;
    if n == 0 {
        return Ok(());
    }
    if buf[0] == b'S' {
        let mut total = n as u64;
        loop {
            let n = c.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        return c.write_all(&total.to_be_bytes());
    }
    let mut have = n;
    loop {
        while have >= MSG {
            c.write_all(&buf[..MSG])?;
            have -= MSG;
        }
        let n = c.read(&mut buf[have..MSG])?;
        if n == 0 {
            return Ok(());
        }
        have += n;
    }
}

fn exchange(c: &mut TcpStream) -> std::io::Result<()> {
    let req = [b'E'; MSG];
    c.write_all(&req)?;
    let mut resp = [0u8; MSG];
    c.read_exact(&mut resp)
}

fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    let c = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(c)
}

/// What one contender measured in one round.
#[derive(Default)]
struct RoundResult {
    new_conn_us: Vec<f64>,
    rr_us: Vec<f64>,
    stream_gbps: f64,
}

/// The hidden `dp-bench` argument that runs one round's client (see
/// `client_main`).
pub const CLIENT_ROUND_ARG: &str = "--client-round";

/// `dp-bench --client-round TARGET ALT|- CONNS RR STREAM_S`: one round of
/// `measure_round` in this process (started by `client_round` in the
/// client namespace, and in a cgroup for the socket-level contender);
/// prints the result as one JSON object.
pub fn client_main(args: &[String]) -> Result<()> {
    let [to, alt, conns, rr, stream] = args else {
        bail!("{CLIENT_ROUND_ARG} needs TARGET ALT|- CONNS RR STREAM_S, got {args:?}");
    };
    let to: SocketAddr = to.parse()?;
    let alt: Option<SocketAddr> = if alt == "-" { None } else { Some(alt.parse()?) };
    let r = measure_round(
        to,
        alt,
        conns.parse()?,
        rr.parse()?,
        Duration::from_secs_f64(stream.parse()?),
    )?;
    println!(
        "{}",
        json!({ "new_conn_us": r.new_conn_us, "rr_us": r.rr_us, "stream_gbps": r.stream_gbps })
    );
    Ok(())
}

/// One round of contender `s`'s client, as a process of its own in the
/// client namespace (and in the contender's cgroup, if it has one).
fn client_round(s: &Setup, conns: usize, rr: usize, stream: Duration) -> Result<RoundResult> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &s.topo.client.name])
        .arg(std::env::current_exe().context("finding dp-bench")?)
        .arg(CLIENT_ROUND_ARG)
        .arg(s.target.to_string())
        .arg(s.alt_target.map_or("-".to_string(), |a| a.to_string()))
        .args([conns.to_string(), rr.to_string(), stream.as_secs_f64().to_string()]);
    let limit = Duration::from_secs(60) + stream + Duration::from_millis((conns + rr) as u64 * 20);
    let out = match &s.cgroup {
        Some(cg) => cg.output(&mut cmd, limit)?,
        None => crate::cgroup::output_with_limit(&mut cmd, limit)?,
    };
    if !out.status.success() {
        bail!(
            "the client round failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("the client round's output")?;
    let floats = |k: &str| -> Vec<f64> {
        v[k].as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    Ok(RoundResult {
        new_conn_us: floats("new_conn_us"),
        rr_us: floats("rr_us"),
        stream_gbps: v["stream_gbps"].as_f64().unwrap_or(0.0),
    })
}

fn measure_round(
    to: SocketAddr,
    alt: Option<SocketAddr>,
    conns: usize,
    rr: usize,
    stream: Duration,
) -> Result<RoundResult> {
    pin_thread(PIN_CPU)?;
    let mut r = RoundResult::default();
    for i in 0..conns {
        let to = match alt {
            Some(a) if i % 2 == 1 => a,
            _ => to,
        };
        let t = Instant::now();
        let mut c = connect(to).with_context(|| format!("connect {to}"))?;
        exchange(&mut c).with_context(|| format!("request to {to}"))?;
        drop(c);
        r.new_conn_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mut c = connect(to)?;
    exchange(&mut c)?;
    for _ in 0..rr {
        let t = Instant::now();
        exchange(&mut c).with_context(|| format!("request on an open connection to {to}"))?;
        r.rr_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(c);
    let mut c = connect(to)?;
    let buf = vec![b'S'; 128 * 1024];
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed() < stream {
        c.write_all(&buf).with_context(|| format!("stream to {to}"))?;
        sent += buf.len() as u64;
    }
    c.shutdown(Shutdown::Write)?;
    if sent == 0 {
        return Ok(r);
    }
    let mut got = [0u8; 8];
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.read_exact(&mut got).context("reading the sink's byte count")?;
    let secs = t.elapsed().as_secs_f64();
    let received = u64::from_be_bytes(got);
    if received != sent {
        bail!("stream to {to}: sent {sent} bytes, the sink counted {received}");
    }
    r.stream_gbps = received as f64 * 8.0 / secs / 1e9;
    Ok(r)
}

/// One contender's topology with what it needs running.
struct Setup {
    who: Contender,
    topo: Topology,
    _servers: Vec<Server>,
    _agent: Option<Agent>,
    _dir: Option<TempDir>,
    /// The socket-level contender's cgroup (its client runs in it).
    cgroup: Option<crate::cgroup::TestCgroup>,
    target: SocketAddr,
    /// Every other new connection goes here instead (`direct-both`).
    alt_target: Option<SocketAddr>,
    install_s: Option<f64>,
    notes: Vec<String>,
}

impl Setup {
    /// CPU time (user + system) the agent process used so far.
    fn agent_cpu_s(&self) -> Option<f64> {
        let pid = self._agent.as_ref()?.pid();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the line.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Some(ticks / hz)
    }
}

fn pipe_into(ns: &Netns, cmd: &[&str], input: &str) -> Result<f64> {
    let t = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Installs kube-proxy's rules for `svcs` in `node` (iptables mode, or
/// nftables mode): the time it took and the tool's version, for the notes.
pub(crate) fn install_kube_proxy(node: &Netns, iptables: bool, svcs: &[SvcPort]) -> Result<(f64, String)> {
    if iptables {
        let t = pipe_into(node, &["iptables-restore"], &kube_rules::iptables(svcs))?;
        let v = node.exec(&["iptables-restore", "--version"]).unwrap_or_default();
        Ok((t, format!("iptables-restore: {}", v.trim())))
    } else {
        let t = pipe_into(node, &["nft", "-f", "-"], &kube_rules::nftables(svcs))?;
        let v = node.exec(&["nft", "--version"]).unwrap_or_default();
        Ok((t, v.trim().to_string()))
    }
}

/// What a contender's node namespace is meant to hold.
pub(crate) enum NodeHolds<'a> {
    /// Our agent, attached to every node interface; no netfilter rules.
    Agent(Option<&'a Agent>),
    /// kube-proxy's netfilter rules; no BPF program.
    KubeProxy,
    /// Neither (the floor).
    Nothing,
}

/// The rules of the comparison: netfilter rules only for the kube-proxy
/// contenders, BPF programs only for ours (attached to every node
/// interface). Then, with `conntrack`, loads the node's netfilter
/// conntrack (`NODE_CONNTRACK`). Returns the notes for the record.
pub(crate) fn check_node(topo: &Topology, name: &str, holds: NodeHolds, conntrack: bool) -> Result<Vec<String>> {
    let (ipt, nft) = ruleset(&topo.node);
    let bpf = bpf_attached(&topo.node);
    match holds {
        NodeHolds::Agent(_) if ipt + nft > 0 => bail!("netfilter rules in the dataplane's node namespace"),
        NodeHolds::Agent(agent) => {
            let attached = agent
                .map(Agent::log)
                .unwrap_or_default()
                .matches("program attached")
                .count();
            if attached != topo.node_ifaces().len() {
                bail!("the agent did not attach to every node interface");
            }
        }
        _ if bpf => bail!("a BPF program is attached in the {name} node namespace"),
        NodeHolds::Nothing if ipt + nft > 0 => bail!("netfilter rules in the {name} contender's node namespace"),
        _ => {}
    }
    let mut notes = vec![format!(
        "node namespace: {ipt} iptables rules, {nft} lines of nft ruleset, XDP/clsact programs listed by bpftool: {bpf}"
    )];
    if conntrack {
        pipe_into(&topo.node, &["nft", "-f", "-"], NODE_CONNTRACK).context("loading the node's conntrack table")?;
        notes.push("node namespace: netfilter conntrack loaded (a table whose rules read `ct state`)".to_string());
    }
    Ok(notes)
}

/// What netfilter has in a namespace (for the record and the checks).
fn ruleset(ns: &Netns) -> (usize, usize) {
    let ipt = ns.exec(&["iptables-save"]).unwrap_or_default();
    let nft = ns.exec(&["nft", "list", "ruleset"]).unwrap_or_default();
    (
        ipt.lines().filter(|l| l.starts_with("-A")).count(),
        nft.lines().filter(|l| !l.trim().is_empty()).count(),
    )
}

/// Whether any XDP or clsact program is attached in `ns` (bpftool here
/// does not list tcx links per namespace: the dataplane's are checked in
/// its log; the other namespaces are fresh and nothing attaches to them).
fn bpf_attached(ns: &Netns) -> bool {
    // Every attachment entry names its interface; an empty listing has none.
    ns.exec(&["bpftool", "net", "show", "-j"])
        .is_ok_and(|s| s.contains("ifindex"))
}

fn setup(who: Contender, svcs: &[SvcPort], cfg: &Config) -> Result<Setup> {
    let topo = Topology::new(2)?;
    topo.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    let servers = vec![
        server(&topo.backends[0], backend_addr(1))?,
        server(&topo.backends[1], backend_addr(2))?,
    ];
    let last = svcs.last().expect("at least one Service");
    let via_vip = SocketAddr::from((last.vip, last.port));
    let mut s = Setup {
        who,
        target: via_vip,
        alt_target: None,
        _servers: servers,
        _agent: None,
        _dir: None,
        cgroup: None,
        install_s: None,
        notes: Vec::new(),
        topo,
    };
    match who {
        Contender::DataplaneSocket
        | Contender::DataplaneSocketStack
        | Contender::Dataplane
        | Contender::DataplaneXdp
        | Contender::DataplaneAlt
        | Contender::DirectTc => {
            if who == Contender::DirectTc {
                s.target = SocketAddr::from((backend_addr(1), BACKEND_PORT));
            }
            let dir = TempDir::new("dp-bench");
            let mut docs = String::new();
            let ports = [("http", SERVICE_PORT, "TCP")];
            let slice_ports = [("http", BACKEND_PORT, "TCP")];
            for p in svcs {
                docs.push_str("---\n");
                docs.push_str(&manifests::service(&p.namespace, &p.name, p.vip, &ports));
                docs.push_str("---\n");
                docs.push_str(&manifests::slice(
                    &p.namespace,
                    &format!("{}-1", p.name),
                    &p.name,
                    &slice_ports,
                    &[backend_addr(1), backend_addr(2)],
                ));
            }
            let ifaces = s.topo.node_ifaces();
            let (tc, xdp): (&[String], &[String]) = match who {
                Contender::DataplaneXdp => (&[], &ifaces),
                _ => (&ifaces, &[]),
            };
            let mut extra = Vec::new();
            if who == Contender::DataplaneAlt {
                let obj = std::env::var(ALT_OBJECT_ENV)
                    .with_context(|| format!("dataplane-alt needs {ALT_OBJECT_ENV}=PATH of an eBPF object"))?;
                s.notes.push(format!("eBPF object: {obj}"));
                extra = vec!["--bpf-object".to_string(), obj];
            }
            if who.is_socket() {
                let cg = crate::cgroup::TestCgroup::new()?;
                extra = vec!["--socket-lb-cgroup".to_string(), cg.path().display().to_string()];
                s.cgroup = Some(cg);
            }
            if who == Contender::DataplaneSocketStack {
                extra.push("--socket-host-routing=false".to_string());
            }
            extra.push(format!("--host-routing={}", cfg.host_routing));
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let t = Instant::now();
            let agent = Agent::start_with(&s.topo.node, tc, xdp, &[("services.yaml", &docs)], &extra)?;
            s.install_s = Some(t.elapsed().as_secs_f64());
            s.notes.push(format!(
                "the agent ({}, file source, --host-routing={}) with {} on the node's interfaces{}; install time is agent start to first sync, including YAML parsing",
                crate::agent::agent_binary().display(),
                cfg.host_routing,
                if xdp.is_empty() { "TC ingress (tcx)" } else { "XDP (auto mode)" },
                if who == Contender::DataplaneSocket {
                    " and socket-level load balancing on the client process's cgroup"
                } else if who == Contender::DataplaneSocketStack {
                    " and socket-level load balancing on the client process's cgroup, --socket-host-routing=false"
                } else {
                    ""
                }
            ));
            s._agent = Some(agent);
            s._dir = Some(dir);
        }
        Contender::Iptables | Contender::Nftables => {
            let (t, note) = install_kube_proxy(&s.topo.node, who == Contender::Iptables, svcs)?;
            s.install_s = Some(t);
            s.notes.push(note);
        }
        Contender::Direct => {
            s.target = SocketAddr::from((backend_addr(1), BACKEND_PORT));
        }
        Contender::DirectBoth => {
            s.target = SocketAddr::from((backend_addr(1), BACKEND_PORT));
            s.alt_target = Some(SocketAddr::from((backend_addr(2), BACKEND_PORT)));
        }
    }
    let holds = match who {
        w if w.is_dataplane() => NodeHolds::Agent(s._agent.as_ref()),
        Contender::Iptables | Contender::Nftables => NodeHolds::KubeProxy,
        _ => NodeHolds::Nothing,
    };
    let notes = check_node(&s.topo, who.name(), holds, cfg.node_conntrack)?;
    s.notes.extend(notes);
    // Each contender must work before it is timed, and the dataplane
    // contenders must take the path they are named after.
    let before = s._agent.as_ref().map(Agent::translations).transpose()?;
    let routed0 = s._agent.as_ref().map(host_routed).transpose()?;
    client_round(&s, 5, 1, Duration::ZERO).with_context(|| format!("{} does not answer", who.name()))?;
    if let (Some(a), Some((sock0, nat0)), Some(routed0)) = (s._agent.as_ref(), before, routed0) {
        // Host routing: every packet of these connections (socket-level
        // ones included) redirected, or none.
        let (redirected, to_stack) = host_routed(a)?;
        let routed = (redirected - routed0.0, to_stack - routed0.1);
        // (XDP: whether the pods' veths take redirected frames decides.)
        let expect_routed = match who {
            Contender::DataplaneSocketStack | Contender::DirectTc => Some(false),
            Contender::DataplaneXdp => None,
            _ => Some(cfg.host_routing),
        };
        if let Some(expect_routed) = expect_routed.filter(|e| (routed.0 > 0) != *e) {
            bail!(
                "{}: {} packets host-routed and {} to the stack, expected {}",
                who.name(),
                routed.0,
                routed.1,
                if expect_routed { "host routing" } else { "none" }
            );
        }
        s.notes.push(format!(
            "checked before timing: {} packets host-routed, {} to the stack",
            routed.0, routed.1
        ));
        let (sock, nat) = a.translations()?;
        let (by_socket, by_packet) = (sock - sock0, nat - nat0);
        // A round opens `conns` connections, one for the exchanges and one
        // for the stream.
        let conns = 5 + 2;
        let expected = match who {
            Contender::DataplaneSocket | Contender::DataplaneSocketStack => (conns, 0),
            Contender::DirectTc => (0, 0),
            _ => (0, conns),
        };
        if (by_socket, by_packet) != expected {
            bail!(
                "{}: {conns} connections were translated {by_socket} times at connect time and {by_packet} times per packet, expected {expected:?}",
                who.name()
            );
        }
        s.notes.push(format!(
            "checked before timing: {conns} connections translated {by_socket} times at connect time, {by_packet} times per packet"
        ));
    }
    Ok(s)
}

/// The agent's host routing counters so far: packets redirected (by any
/// helper, XDP's included), packets handed to the stack.
fn host_routed(a: &Agent) -> Result<(u64, u64)> {
    let s = dataplane::inspect::stats(&dataplane::inspect::open_pinned(&a.pins)?)?;
    let count = |stack: bool| {
        s.host_routing
            .iter()
            .filter(|e| (e.event == "to_stack") == stack)
            .map(|e| e.count)
            .sum::<u64>()
    };
    Ok((count(false), count(true)))
}

fn round1(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| (x * 10.0).round() / 10.0).collect()
}

pub fn run(cfg: &Config) -> Result<Value> {
    if !cfg.contenders.contains(&Contender::Direct) {
        bail!("through the VIP: the contenders must include direct (the ratios are to it)");
    }
    let started = Instant::now();
    let mut scales_out = Vec::new();
    for &n in &cfg.scales {
        let svcs = services(n);
        let setups = super::set_up_all(
            "through the VIP",
            n,
            &cfg.contenders,
            Contender::name,
            |who| setup(who, &svcs, cfg),
            |s| s.install_s,
        )?;
        let cpu_before: Vec<Option<f64>> = setups.iter().map(Setup::agent_cpu_s).collect();
        let results = super::interleaved(
            setups.len(),
            cfg.rounds,
            started,
            cfg.deadline,
            |i, round| {
                let s = &setups[i];
                client_round(s, cfg.conns, cfg.rr, cfg.stream)
                    .with_context(|| format!("{} at {n} Services, round {round}", s.who.name()))
            },
            |round, _| eprintln!("dp-bench:   round {}/{} done", round + 1, cfg.rounds),
        )?;
        let rounds_done = results.first().map_or(0, Vec::len);
        let agent_cpu: Vec<Option<f64>> = setups
            .iter()
            .zip(&cpu_before)
            .map(|(s, b)| Some(s.agent_cpu_s()? - (*b)?))
            .collect();
        let mut contenders = serde_json::Map::new();
        for ((s, rs), cpu) in setups.iter().zip(&results).zip(&agent_cpu) {
            let conn: Vec<f64> = rs.iter().flat_map(|r| r.new_conn_us.iter().copied()).collect();
            let rr: Vec<f64> = rs.iter().flat_map(|r| r.rr_us.iter().copied()).collect();
            let gbps: Vec<f64> = rs.iter().map(|r| r.stream_gbps).collect();
            contenders.insert(
                s.who.name().into(),
                json!({
                    "target": s.target.to_string(),
                    "install_s": s.install_s,
                    "agent_cpu_s_during_rounds": cpu,
                    "notes": s.notes,
                    "new_conn_us": { "summary": super::summary(&conn), "raw": round1(&conn) },
                    "rr_us": { "summary": super::summary(&rr), "raw": round1(&rr) },
                    "stream_gbps": { "summary": super::summary(&gbps), "raw": gbps },
                }),
            );
        }
        // Ratios of medians (and p99s) to the direct path, and of new
        // connections to the direct path with the same spread.
        let both_conn = contenders
            .get("direct-both")
            .and_then(|d| d["new_conn_us"]["summary"]["median"].as_f64());
        let mut ratios = serde_json::Map::new();
        let direct = &contenders["direct"];
        for (name, c) in &contenders {
            let r = |metric: &str, stat: &str| -> Option<f64> {
                Some(c[metric]["summary"][stat].as_f64()? / direct[metric]["summary"][stat].as_f64()?)
            };
            ratios.insert(
                name.clone(),
                json!({
                    "new_conn_median": r("new_conn_us", "median"),
                    "new_conn_p99": r("new_conn_us", "p99"),
                    "rr_median": r("rr_us", "median"),
                    "rr_p99": r("rr_us", "p99"),
                    "stream_median": r("stream_gbps", "median"),
                    "new_conn_median_to_direct_both": both_conn
                        .and_then(|b| Some(c["new_conn_us"]["summary"]["median"].as_f64()? / b)),
                }),
            );
        }
        scales_out.push(json!({
            "services": n,
            "measured": { "vip": vip(n - 1).to_string(), "port": SERVICE_PORT, "endpoints": 2 },
            "rounds": rounds_done,
            "contenders": contenders,
            "ratio_to_direct": ratios,
        }));
        drop(setups);
    }
    Ok(json!({
        "part": "through_vip",
        "method": "One copy of the topology (client, node, 2 backends) per contender, built side by side; every round measures each contender in turn (the order rotates by one from round to round): `conns` new connections (connect, one 32-byte request and response, close), `rr` request/response exchanges on one open connection, and one single-stream send of `stream_s` seconds (128 KiB writes to a sink that reports what it received). The client of each round is a process of its own (`dp-bench --client-round`) in the client namespace (and, for dataplane-socket, in the cgroup the agent's socket programs are attached to); servers are threads of dp-bench in the backend namespaces. Rust, TCP_NODELAY; client and servers all pinned to one CPU (PIN_CPU): unpinned, request/response took 17 or 50-60 µs depending on whether client and server shared a CPU, for every contender alike. Before timing, 5 connections per dataplane contender check the path it is named after (translated at connect time or per packet) from the agent's counters.",
        "pinned_cpu": PIN_CPU,
        "dp_bench_build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "netfilter_conntrack": if cfg.node_conntrack {
            "Loaded in every contender's node namespace, as on real nodes (the CNI, the kubelet and container runtimes keep it loaded): a table whose rules read `ct state` in prerouting and output, besides the contender's own rules (kube-proxy's NAT needs conntrack anyway)."
        } else {
            "Not loaded by the bench (--no-node-conntrack): in the iptables and nftables node namespaces the kernel's conntrack tracks every flow (NAT needs it); in the dataplane and direct node namespaces no rule asks for conntrack."
        },
        "host_routing": cfg.host_routing,
        "attach_point": "dataplane-socket: cgroup connect/sendmsg/recvmsg/getpeername programs on the client's cgroup plus TC ingress (tcx) on the node's veths; dataplane: TC ingress (tcx) on the node's client- and backend-side veths only; dataplane-xdp (if measured): XDP, auto mode",
        "contenders": cfg.contenders.iter().map(|c| c.name()).collect::<Vec<_>>(),
        "conns": cfg.conns,
        "rr": cfg.rr,
        "stream_s": cfg.stream.as_secs_f64(),
        "scales": scales_out,
    }))
}
