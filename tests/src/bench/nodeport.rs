//! NodePort packets per second from outside the node: a traffic generator in
//! the client namespace sends small UDP packets (60-byte frames, 64 on a
//! wire with the FCS) to a NodePort on the node's client-side address, as
//! fast as one sender can, and the two backends count what arrives. One
//! copy of the test topology (`netns::Topology`: client, node, two
//! backends) per contender, side by side, measured interleaved:
//!
//! - `dataplane`: the real agent as deployed for traffic from outside: XDP
//!   (auto mode: native on veth) on the node's external interface (`vc`),
//!   TC on the pod-side interfaces (`vb1`, `vb2`), file source, the
//!   NodePort served on the node's client-side address (`--node-ip`);
//! - `iptables`, `nftables`: kube-proxy's rules for the same Services and
//!   NodePorts (`kube_rules`, externalTrafficPolicy Cluster: NodePort
//!   traffic is masqueraded), no BPF program;
//! - `direct`: no rules; the generator sends to backend 1's own address
//!   through the node (routed, not translated): the floor.
//!
//! Netfilter conntrack is loaded in every node namespace (`NODE_CONNTRACK`,
//! as in the through-VIP part). The generator is an AF_PACKET socket with
//! `PACKET_QDISC_BYPASS` sending prebuilt frames with `sendmmsg`, pinned to
//! `PIN_CPU`; a fixed set of `flows` source ports is cycled, so that after
//! the first packets every contender sees established flows (conntrack
//! entries, NAT bindings, our conntrack), spread over both backends. Every
//! send is bounded in time and in packets.
//!
//! By default (`Config::node_cpu`) the node receives on the other CPU:
//! the node's client-side veth runs its NAPI in a thread pinned there, as
//! a NIC's queue would be served by its own CPU, so what is measured is
//! the node's capacity, not one CPU shared by the sender and the node.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{
    kube_rules::{Proto, SvcPort},
    pin_thread,
    vip::{check_node, install_kube_proxy, vip, NodeHolds},
    xdp_gen, PIN_CPU,
};
use crate::{
    agent::Agent,
    netns::{backend_addr, backend_iface, Netns, Topology, CLIENT_ADDR, NODE_CLIENT_IFACE, NODE_CLIENT_SIDE},
    packet::Frame,
};

pub struct Config {
    pub scales: Vec<usize>,
    pub rounds: usize,
    /// Send time per contender per round.
    pub send: Duration,
    /// Packets per contender per round at most (the send stops at whichever
    /// of `send` and this comes first).
    pub max_packets: u64,
    /// Distinct flows (source ports) the generator cycles through.
    pub flows: u16,
    /// The whole part stops starting new rounds after this.
    pub deadline: Duration,
    /// Who is measured, in this order every round (rotating).
    pub contenders: Vec<Contender>,
    /// Netfilter conntrack loaded in every node namespace (as real nodes).
    pub node_conntrack: bool,
    /// The agent's `--host-routing` (as in the through-VIP part).
    pub host_routing: bool,
    /// GRO on the backends' interfaces (`eth0` in the backend namespaces,
    /// the pods' ends of their veths), for every contender: a veth takes
    /// frames redirected by XDP only while its peer has GRO on (or an XDP
    /// program), so without it the dataplane's XDP passes NodePort
    /// packets to the node's stack instead of redirecting them.
    pub backend_gro: bool,
    /// The node's receive on the other CPU: GRO on at the node's
    /// client-side veth (`vc`) for every contender, its NAPI threaded and
    /// the thread pinned to `receiver_cpu()`, so that what the node does
    /// with a packet (and the backends' receive, which runs after it in
    /// the same context) no longer shares the generator's CPU; the
    /// backends' sockets are then not read (a reader would share that
    /// CPU), so socket pps is not measured.
    pub node_cpu: bool,
    /// How frames leave the client.
    pub generator: Generator,
    /// The backends stand for pods on another node: their endpoints name
    /// another node (the dataplane SNATs their flows, as kube-proxy's
    /// masquerade does), and each backend's interface receives as that
    /// node would, off the node's CPU: an XDP sink on it (`xdp_gen`) drops
    /// the translated datagrams and counts them, its NAPI threaded and
    /// pinned to the generator's CPU. What the node's CPU does is then
    /// only the node's work: receive, translate, forward.
    pub remote_backends: bool,
}

/// How the client sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generator {
    /// An AF_PACKET socket (`sendmmsg`): frames reach the node's veth as
    /// skbs, which XDP on a veth must copy into an XDP buffer.
    AfPacket,
    /// `BPF_PROG_TEST_RUN` in live-frames mode with a program returning
    /// `XDP_TX` on the client's veth (`xdp_gen`): frames reach the node's
    /// veth as XDP frames, as a NIC's driver hands them to XDP; the stack
    /// builds its skb around them without a copy.
    LiveFrames,
}

impl Generator {
    pub fn name(self) -> &'static str {
        match self {
            Generator::AfPacket => "af-packet",
            Generator::LiveFrames => "live-frames",
        }
    }

    pub fn from_name(name: &str) -> Option<Generator> {
        [Generator::AfPacket, Generator::LiveFrames]
            .into_iter()
            .find(|g| g.name() == name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    /// The agent: XDP on the external interface, TC on the pod side.
    Dataplane,
    /// The agent with the XDP program in generic (skb) mode.
    DataplaneGeneric,
    Iptables,
    Nftables,
    /// No rules, straight to backend 1 through the node.
    Direct,
}

pub const DEFAULT_CONTENDERS: [Contender; 4] = [
    Contender::Dataplane,
    Contender::Iptables,
    Contender::Nftables,
    Contender::Direct,
];

const ALL_CONTENDERS: [Contender; 5] = [
    Contender::Dataplane,
    Contender::DataplaneGeneric,
    Contender::Iptables,
    Contender::Nftables,
    Contender::Direct,
];

impl Contender {
    pub fn name(self) -> &'static str {
        match self {
            Contender::Dataplane => "dataplane",
            Contender::DataplaneGeneric => "dataplane-xdp-generic",
            Contender::Iptables => "iptables",
            Contender::Nftables => "nftables",
            Contender::Direct => "direct",
        }
    }

    pub fn from_name(name: &str) -> Option<Contender> {
        ALL_CONTENDERS.into_iter().find(|c| c.name() == name)
    }
}

const BACKEND_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;
/// The first NodePort; Service `i` of the last `NODE_PORTS` gets the next.
const FIRST_NODE_PORT: u16 = 30000;
/// How many of the Services (the last ones) have a NodePort: the range
/// 30000-32767 holds 2,768, so not every one of 10,000 Services can.
const NODE_PORTS: usize = 1000;
/// UDP payload: 14 + 20 + 8 + 18 = 60 bytes, a 64-byte frame with the FCS.
const PAYLOAD: usize = 18;
/// Frames per `sendmmsg` call.
const BATCH: usize = 64;
/// The first source port of the generator's flows.
const FIRST_SRC_PORT: u16 = 40000;
const RECEIVER_LIFETIME: Duration = Duration::from_secs(3600);

/// The CPU the backends' receiving threads run on: the other one of two
/// (the generator and the whole forwarding path in softirq run on
/// `PIN_CPU`).
fn receiver_cpu() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores > 1 {
        (PIN_CPU + 1) % cores
    } else {
        PIN_CPU
    }
}

/// The Services: as in the through-VIP part, UDP, both backends each; the
/// last `NODE_PORTS` of them have a NodePort, the measured one (the last)
/// has the highest.
fn services(n: usize) -> Vec<SvcPort> {
    let first_np = n.saturating_sub(NODE_PORTS);
    (0..n)
        .map(|i| SvcPort {
            namespace: "bench".into(),
            name: format!("svc-{i}"),
            port_name: "dns".into(),
            vip: vip(i),
            port: SERVICE_PORT,
            protocol: Proto::Udp,
            node_port: (i >= first_np).then(|| FIRST_NODE_PORT + (i - first_np) as u16),
            endpoints: vec![(backend_addr(1), BACKEND_PORT), (backend_addr(2), BACKEND_PORT)],
        })
        .collect()
}

/// The node the agent runs as with `Config::remote_backends`, and the
/// node its endpoints are on then.
const NODE_NAME: &str = "node-a";
const REMOTE_NODE: &str = "node-b";

/// The agent's manifests for the same Services (type NodePort where they
/// have one); endpoints without a node name (local to the agent's node),
/// or on `REMOTE_NODE` with `remote`.
fn manifests(svcs: &[SvcPort], remote: bool) -> String {
    let mut docs = String::new();
    for p in svcs {
        let (ty, np) = match p.node_port {
            Some(np) => ("NodePort", format!(", nodePort: {np}")),
            None => ("ClusterIP", String::new()),
        };
        docs.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec:\n  type: {ty}\n  clusterIP: {vip}\n  clusterIPs: [{vip}]\n  ports:\n  - {{name: {}, port: {}, protocol: UDP{np}}}\n",
            p.name, p.namespace, p.port_name, p.port, vip = p.vip
        ));
        docs.push_str("---\n");
        let slice = crate::manifests::slice(
            &p.namespace,
            &format!("{}-1", p.name),
            &p.name,
            &[(p.port_name.as_str(), BACKEND_PORT, "UDP")],
            &[backend_addr(1), backend_addr(2)],
        );
        if remote {
            docs.push_str(&slice.replace(
                "\n  conditions:",
                &format!("\n  nodeName: {REMOTE_NODE}\n  conditions:"),
            ));
        } else {
            docs.push_str(&slice);
        }
    }
    docs
}

/// The backends' receiving sockets (one bound in each backend namespace)
/// read by one thread pinned to `receiver_cpu()`, which counts datagrams
/// per socket (`recvmmsg`). While `active` (a send is on) it polls the
/// sockets without sleeping: a sleeping reader costs the sending CPU a
/// wakeup (an IPI, expensive in a VM) per packet or batch, which here took
/// a fifth of the path's time; otherwise it sleeps in `poll` (100 ms at a
/// time) until stopped or its lifetime ends.
struct Receivers {
    stop: Arc<AtomicBool>,
    active: Arc<AtomicBool>,
    counts: Vec<Arc<AtomicU64>>,
    thread: Option<JoinHandle<()>>,
    /// The sockets when not read (else the thread owns them).
    _held: Vec<UdpSocket>,
}

impl Drop for Receivers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Receivers {
    fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// A UDP socket bound to `addr:BACKEND_PORT` in `ns` (a socket stays in
/// the namespace it was made in, whichever thread reads it).
fn bind_in(ns: &Netns, addr: Ipv4Addr) -> Result<UdpSocket> {
    let sock = ns
        .run(move || UdpSocket::bind((addr, BACKEND_PORT)))
        .join()
        .map_err(|_| anyhow::anyhow!("the bind thread panicked"))?
        .with_context(|| format!("bind {addr}:{BACKEND_PORT}/udp"))?;
    sock.set_nonblocking(true)?;
    let size: libc::c_int = 8 << 20;
    // SAFETY: setsockopt with a pointer to a c_int and its size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    Ok(sock)
}

/// The backends' receiver; with `read` false the sockets are only held
/// (datagrams fill their queues, then are dropped there) and nothing is
/// counted.
fn receivers(socks: Vec<UdpSocket>, read: bool) -> Result<Receivers> {
    let stop = Arc::new(AtomicBool::new(false));
    let active = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<AtomicU64>> = socks.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
    if !read {
        return Ok(Receivers {
            stop,
            active,
            counts,
            thread: None,
            _held: socks,
        });
    }
    let (s, a, c) = (stop.clone(), active.clone(), counts.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        if let Err(e) = pin_thread(receiver_cpu()) {
            let _ = tx.send(Err(e.to_string()));
            return;
        }
        let _ = tx.send(Ok(()));
        let mut bufs = vec![[0u8; 128]; BATCH];
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: a zeroed mmsghdr is valid (null name and control).
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut pfds: Vec<libc::pollfd> = socks
            .iter()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let started = Instant::now();
        while !s.load(Ordering::Relaxed) && started.elapsed() < RECEIVER_LIFETIME {
            let mut got = 0;
            for (sock, count) in socks.iter().zip(&c) {
                // SAFETY: `msgs` holds BATCH headers, each pointing to one
                // iovec over a live buffer; non-blocking.
                let n = unsafe {
                    libc::recvmmsg(
                        sock.as_raw_fd(),
                        msgs.as_mut_ptr(),
                        BATCH as libc::c_uint,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                if n > 0 {
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    got += n;
                }
            }
            if got == 0 && !a.load(Ordering::Relaxed) {
                // SAFETY: valid pollfds for the duration of the call.
                unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .context("the backends' receiver did not start")?
        .map_err(anyhow::Error::msg)?;
    Ok(Receivers {
        stop,
        active,
        counts,
        thread: Some(thread),
        _held: Vec::new(),
    })
}

/// CPU seconds (user + system) a thread has used, from `/proc/PID/stat`.
fn thread_cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("/proc/{pid}/stat"))?;
    // Fields after the command (in parentheses, which may hold spaces):
    // state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc/PID/stat without a command")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f
        .get(11)
        .zip(f.get(12))
        .and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?))
        .context("/proc/PID/stat: utime, stime")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / hz.max(1) as f64)
}

/// PIDs of the kernel's threaded-NAPI threads (`napi/<dev>-<id>`), all
/// namespaces.
fn napi_threads() -> Result<std::collections::BTreeSet<u32>> {
    let mut set = std::collections::BTreeSet::new();
    for e in std::fs::read_dir("/proc").context("/proc")? {
        let e = e?;
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with("napi/")) {
            set.insert(pid);
        }
    }
    Ok(set)
}

/// Threads the NAPI of `iface` in `ns` (which must have one: GRO on or an
/// XDP program) and pins the new `napi/` thread to `cpu`. Returns its PID
/// and name.
fn thread_napi(ns: &Netns, iface: &str, cpu: usize) -> Result<(u32, String)> {
    let before = napi_threads()?;
    ns.exec(&["sh", "-c", &format!("echo 1 > /sys/class/net/{iface}/threaded")])?;
    let new: Vec<u32> = napi_threads()?.difference(&before).copied().collect();
    let [pid] = new[..] else {
        bail!("threaded NAPI on {iface}: expected one new napi/ thread, found {new:?}");
    };
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
    // within it; the PID is a kernel thread found above.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid as libc::pid_t, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "pinning the NAPI thread {pid} of {iface} to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    Ok((pid, comm.trim().to_string()))
}

/// Moves the node's receive on its client-side veth off the generator's
/// CPU: GRO on (the veth then receives through its own NAPI, as a NIC's
/// driver does), NAPI threaded, the thread pinned to `receiver_cpu()`.
/// Returns what was done, for the notes.
fn node_receive_on_other_cpu(topo: &Topology) -> Result<(u32, String)> {
    topo.node.exec(&["ethtool", "-K", NODE_CLIENT_IFACE, "gro", "on"])?;
    // A veth hands a frame to its peer's NAPI only if the frame may be
    // aggregated: sent by a device without TSO (or the peer forwarding
    // UDP GRO, which would aggregate kube-proxy's forwarded datagrams).
    // Attaching XDP to `vc` turns its peer's TSO off by itself; for the
    // other contenders the packets would go to the sender's CPU's
    // backlog instead. So TSO off on the client's veth for everyone.
    topo.client.exec(&["ethtool", "-K", "eth0", "tso", "off"])?;
    let cpu = receiver_cpu();
    let (pid, comm) = thread_napi(&topo.node, NODE_CLIENT_IFACE, cpu)?;
    Ok((
        pid,
        format!(
            "the node's receive on {NODE_CLIENT_IFACE}: GRO on, threaded NAPI, thread {comm} (PID {pid}) pinned to CPU {cpu}; TSO off on the client's eth0"
        ),
    ))
}

/// The backends as pods of another node (`Config::remote_backends`): an
/// XDP sink for UDP to `BACKEND_PORT` on each backend's `eth0` (native
/// mode), its NAPI threaded and pinned to the generator's CPU. Returns
/// the links (the sinks stay while they are open) and a note.
fn remote_sinks(topo: &Topology) -> Result<(Vec<std::os::fd::OwnedFd>, String)> {
    let prog = Arc::new(xdp_gen::load("bench_sink", &xdp_gen::sink_program(BACKEND_PORT))?);
    let mut links = Vec::new();
    let mut threads = Vec::new();
    for b in &topo.backends {
        let p = prog.clone();
        let link = b
            .run(move || -> Result<std::os::fd::OwnedFd> {
                let ifindex = ifindex_of("eth0")?;
                xdp_gen::attach_native(&p, ifindex)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the attach thread panicked"))??;
        links.push(link);
        let (pid, comm) = thread_napi(b, "eth0", PIN_CPU)?;
        // Real-time, so that it runs as soon as frames wait, before the
        // generator it shares the CPU with: else the backend's ring (256
        // frames) fills while the generator runs and the node's transmit
        // fails, which would be measured as the node's loss.
        let param = libc::sched_param { sched_priority: 50 };
        // SAFETY: a valid sched_param for a kernel thread found above.
        if unsafe { libc::sched_setscheduler(pid as libc::pid_t, libc::SCHED_FIFO, &param) } != 0 {
            bail!(
                "SCHED_FIFO for the NAPI thread {pid} of a backend's eth0: {}",
                std::io::Error::last_os_error()
            );
        }
        threads.push(format!("{comm} (PID {pid})"));
    }
    Ok((
        links,
        format!(
            "backends on another node: an XDP sink (native mode) on each backend's eth0 drops UDP to port {BACKEND_PORT} and counts it (rx_queue_0_xdp_drops: delivered), its NAPI threaded ({}), pinned to CPU {PIN_CPU}, the generator's, standing for the other node's CPUs, and real-time (SCHED_FIFO 50) so that it receives before the generator sends more",
            threads.join(", ")
        ),
    ))
}

/// The index of interface `iface` in the calling thread's namespace.
fn ifindex_of(iface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {iface}: {}", std::io::Error::last_os_error());
    }
    Ok(ifindex)
}

/// The generator's frames: one per flow, source ports `FIRST_SRC_PORT..`,
/// valid IPv4 and UDP checksums, the given MAC addresses.
pub fn frames(src_mac: [u8; 6], dst_mac: [u8; 6], dst: (Ipv4Addr, u16), flows: u16) -> Vec<Vec<u8>> {
    (0..flows)
        .map(|i| {
            let mut f = Frame::udp((CLIENT_ADDR, FIRST_SRC_PORT + i), dst, &[0x5a; PAYLOAD]).build();
            f[0..6].copy_from_slice(&dst_mac);
            f[6..12].copy_from_slice(&src_mac);
            f
        })
        .collect()
}

/// What one send measured.
#[derive(Clone, Copy, Debug, Default)]
struct Sent {
    packets: u64,
    secs: f64,
    /// `sendmmsg` calls that failed with ENOBUFS (frames not sent).
    enobufs: u64,
}

/// Sends `frames` in turn out of `iface` of the calling thread's
/// namespace with an AF_PACKET socket (`PACKET_QDISC_BYPASS`,
/// `sendmmsg`), for `limit` or `max_packets`, whichever comes first.
fn generate(iface: &str, frames: &[Vec<u8>], limit: Duration, max_packets: u64) -> Result<Sent> {
    let ifindex = ifindex_of(iface)?;
    // Protocol 0: a send-only socket, nothing is queued to it.
    // SAFETY: plain socket call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_ll is valid; bind with its size.
    let rc = unsafe {
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "binding the AF_PACKET socket to {iface}: {}",
            std::io::Error::last_os_error()
        );
    }
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("PACKET_QDISC_BYPASS: {}", std::io::Error::last_os_error());
    }
    let mut iovs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    // SAFETY: a zeroed mmsghdr is valid (null name and control).
    let mut msgs: Vec<libc::mmsghdr> = (0..frames.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut s = Sent::default();
    let mut at = 0usize;
    let t = Instant::now();
    while s.packets < max_packets && t.elapsed() < limit {
        let n = BATCH
            .min(msgs.len() - at)
            .min((max_packets - s.packets).min(BATCH as u64) as usize);
        // SAFETY: `msgs[at..at + n]` are valid headers over frames that
        // outlive the call.
        let rc = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr().add(at), n as libc::c_uint, 0) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                s.enobufs += 1;
                continue;
            }
            bail!("sendmmsg: {e}");
        }
        s.packets += rc as u64;
        at = (at + rc as usize) % msgs.len();
    }
    s.secs = t.elapsed().as_secs_f64();
    Ok(s)
}

/// Frames per live-frames run: about a second at the rates
/// seen here. Each run costs about 25 ms to set up in the kernel (its page
/// pool), so runs must be long for the setup not to count.
const LIVE_RUN: u64 = 1 << 21;

/// The live generator's frame: the first flow's frame without a UDP
/// checksum (0: none, valid for IPv4), since `xdp_gen::tx_program`
/// rewrites the source port.
fn live_frame(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut f = frames[0].clone();
    f[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    f
}

/// Sends `frame` out of `iface` of the calling thread's namespace as XDP
/// frames (`xdp_gen::send_live` of the program `prog`, which gives each a
/// random source port of the flows), in runs of `LIVE_RUN`, for `limit`
/// (the last run may end after it: the rates are over the time taken) or
/// `max_packets`, whichever comes first. Frames the node's ring cannot
/// take are dropped unreported: offered counts what the program sent.
fn generate_live(
    prog: &std::os::fd::OwnedFd,
    iface: &str,
    frame: &[u8],
    limit: Duration,
    max_packets: u64,
) -> Result<Sent> {
    let ifindex = ifindex_of(iface)?;
    let mut s = Sent::default();
    let t = Instant::now();
    while s.packets < max_packets && t.elapsed() < limit {
        let n = LIVE_RUN.min(max_packets - s.packets);
        xdp_gen::send_live(prog, ifindex, frame, n as u32)?;
        s.packets += n;
    }
    s.secs = t.elapsed().as_secs_f64();
    Ok(s)
}

/// Interface counters (`ip -s -j link`) of some interfaces of a namespace.
fn link_stats(ns: &Netns, ifaces: &[&str]) -> Result<BTreeMap<String, [u64; 4]>> {
    let out = ns.ip(&["-s", "-j", "link", "show"])?;
    let v: Value = serde_json::from_str(&out).context("ip -s -j link")?;
    let mut m = BTreeMap::new();
    for l in v.as_array().into_iter().flatten() {
        let Some(name) = l["ifname"].as_str().filter(|n| ifaces.contains(n)) else {
            continue;
        };
        let s = &l["stats64"];
        let g = |dir: &str, k: &str| s[dir][k].as_u64().unwrap_or(0);
        m.insert(
            name.to_string(),
            [
                g("rx", "packets"),
                g("rx", "dropped"),
                g("tx", "packets"),
                g("tx", "dropped"),
            ],
        );
    }
    Ok(m)
}

fn mac_of(ns: &Netns, iface: &str) -> Result<[u8; 6]> {
    let out = ns.ip(&["-j", "link", "show", "dev", iface])?;
    let v: Value = serde_json::from_str(&out)?;
    let s = v[0]["address"].as_str().context("no MAC address")?;
    let b: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<_, _>>()?;
    b.try_into().map_err(|_| anyhow::anyhow!("bad MAC address {s}"))
}

/// All counters of one contender's topology that the path touches.
struct Counters {
    client: BTreeMap<String, [u64; 4]>,
    node: BTreeMap<String, [u64; 4]>,
    backends: Vec<BTreeMap<String, [u64; 4]>>,
    /// What the XDP sinks on the backends' interfaces dropped (with
    /// `Config::remote_backends`; else empty).
    sinks: Vec<u64>,
}

fn counters(t: &Topology, remote: bool) -> Result<Counters> {
    let ifaces = t.node_ifaces();
    let ifaces: Vec<&str> = ifaces.iter().map(String::as_str).collect();
    Ok(Counters {
        client: link_stats(&t.client, &["eth0"])?,
        node: link_stats(&t.node, &ifaces)?,
        backends: t
            .backends
            .iter()
            .map(|b| link_stats(b, &["eth0"]))
            .collect::<Result<_>>()?,
        sinks: if remote {
            t.backends
                .iter()
                .map(|b| xdp_gen::xdp_drops(b, "eth0"))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        },
    })
}

/// `after - before` of every counter, as `{ns: {iface: {rx_packets, ...}}}`.
fn delta(before: &Counters, after: &Counters) -> Value {
    let d = |b: &BTreeMap<String, [u64; 4]>, a: &BTreeMap<String, [u64; 4]>| -> Value {
        let mut m = serde_json::Map::new();
        for (k, av) in a {
            let bv = b.get(k).copied().unwrap_or_default();
            let x: Vec<u64> = (0..4).map(|i| av[i].saturating_sub(bv[i])).collect();
            m.insert(
                k.clone(),
                json!({ "rx_packets": x[0], "rx_dropped": x[1], "tx_packets": x[2], "tx_dropped": x[3] }),
            );
        }
        Value::Object(m)
    };
    let mut backends = serde_json::Map::new();
    for (i, (b, a)) in before.backends.iter().zip(&after.backends).enumerate() {
        backends.insert(format!("backend{}", i + 1), d(b, a));
    }
    let mut v = json!({ "client": d(&before.client, &after.client), "node": d(&before.node, &after.node), "backends": backends });
    for (i, (b, a)) in before.sinks.iter().zip(&after.sinks).enumerate() {
        v["sinks"][format!("backend{}", i + 1)] = json!({ "xdp_drops": a.saturating_sub(*b) });
    }
    v
}

/// The sum of counter records (`delta`'s shape: nested objects with
/// numbers at the leaves).
pub fn sum_counters<'a>(records: impl Iterator<Item = &'a Value>) -> Value {
    fn add(into: &mut Value, x: &Value) {
        match (into, x) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    add(a.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
            (slot, Value::Number(n)) => {
                *slot = json!(slot.as_u64().unwrap_or(0) + n.as_u64().unwrap_or(0));
            }
            (slot @ Value::Null, v) => *slot = v.clone(),
            _ => {}
        }
    }
    let mut total = json!({});
    for r in records {
        add(&mut total, r);
    }
    total
}

/// What one contender measured in one round.
#[derive(Clone, Debug)]
struct RoundResult {
    sent: Sent,
    /// Packets that reached the backends' interfaces (rx_packets; with
    /// `Config::remote_backends`, what their XDP sinks dropped: UDP to the
    /// backend port).
    delivered: u64,
    /// Datagrams the backends' sockets read.
    received: u64,
    /// CPU time of the node's NAPI thread over the send time (with
    /// `Config::node_cpu`; it includes the 100 ms after the send).
    napi_busy: Option<f64>,
    /// Every interface counter's change over the round.
    counters: Value,
}

impl RoundResult {
    fn offered_pps(&self) -> f64 {
        self.sent.packets as f64 / self.sent.secs
    }
    fn delivered_pps(&self) -> f64 {
        self.delivered as f64 / self.sent.secs
    }
    fn received_pps(&self) -> f64 {
        self.received as f64 / self.sent.secs
    }
}

/// One contender's topology with what it needs running.
struct Setup {
    who: Contender,
    topo: Topology,
    receivers: Receivers,
    agent: Option<Agent>,
    frames: Vec<Vec<u8>>,
    target: (Ipv4Addr, u16),
    install_s: Option<f64>,
    notes: Vec<String>,
    /// The node's NAPI thread on the other CPU (`Config::node_cpu`).
    napi: Option<u32>,
    /// The live-frames generator's `XDP_TX` program (`Generator::LiveFrames`).
    tx: Option<Arc<std::os::fd::OwnedFd>>,
    /// `Config::remote_backends`: the links of the backends' XDP sinks.
    sinks: Vec<std::os::fd::OwnedFd>,
}

impl Setup {
    /// One send of up to `limit` / `max_packets` from the client namespace,
    /// with the counters around it: with the AF_PACKET generator when
    /// `warm_up` (every flow in turn) or when it is the configured one,
    /// else with the live-frames generator.
    fn round(&self, limit: Duration, max_packets: u64, warm_up: bool) -> Result<RoundResult> {
        let remote = !self.sinks.is_empty();
        let before = counters(&self.topo, remote)?;
        let cpu0 = self.napi.map(thread_cpu_secs).transpose()?;
        let received0 = self.receivers.total();
        let frames = self.frames.clone();
        let tx = if warm_up { None } else { self.tx.clone() };
        self.receivers.active.store(true, Ordering::Relaxed);
        let sent = self
            .topo
            .client
            .run(move || -> Result<Sent> {
                pin_thread(PIN_CPU)?;
                match tx {
                    Some(prog) => generate_live(&prog, "eth0", &live_frame(&frames), limit, max_packets),
                    None => generate("eth0", &frames, limit, max_packets),
                }
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the generator thread panicked"));
        // What is still in flight (the receivers' queues) lands within
        // milliseconds; the rates are over the send time.
        std::thread::sleep(Duration::from_millis(100));
        self.receivers.active.store(false, Ordering::Relaxed);
        let sent = sent??;
        let napi_busy = match (self.napi, cpu0) {
            (Some(pid), Some(c0)) => Some((thread_cpu_secs(pid)? - c0) / sent.secs),
            _ => None,
        };
        let after = counters(&self.topo, remote)?;
        let received = self.receivers.total() - received0;
        let delivered = if remote {
            before
                .sinks
                .iter()
                .zip(&after.sinks)
                .map(|(b, a)| a.saturating_sub(*b))
                .sum()
        } else {
            before
                .backends
                .iter()
                .zip(&after.backends)
                .map(|(b, a)| a["eth0"][0].saturating_sub(b["eth0"][0]))
                .sum()
        };
        Ok(RoundResult {
            sent,
            delivered,
            received,
            napi_busy,
            counters: delta(&before, &after),
        })
    }

    fn xdp_mode(&self) -> String {
        let out = self
            .topo
            .node
            .ip(&["-d", "link", "show", "dev", NODE_CLIENT_IFACE])
            .unwrap_or_default();
        if out.contains("xdpgeneric") {
            "generic (skb)".into()
        } else if out.contains("xdpdrv") || out.contains("prog/xdp") {
            "native (driver)".into()
        } else {
            format!("unknown: {}", out.lines().find(|l| l.contains("xdp")).unwrap_or("none"))
        }
    }
}

fn setup(who: Contender, svcs: &[SvcPort], cfg: &Config) -> Result<Setup> {
    let topo = Topology::new(2)?;
    if cfg.backend_gro {
        for b in &topo.backends {
            b.exec(&["ethtool", "-K", "eth0", "gro", "on"])?;
        }
    }
    let (napi, napi_note) = if cfg.node_cpu {
        let (pid, note) = node_receive_on_other_cpu(&topo)?;
        (Some(pid), Some(note))
    } else {
        (None, None)
    };
    if cfg.generator == Generator::LiveFrames && !cfg.node_cpu {
        bail!(
            "the live-frames generator needs the node's receive on its own CPU (its veth's NAPI takes the XDP frames)"
        );
    }
    let (sinks, sink_note) = if cfg.remote_backends {
        let (links, note) = remote_sinks(&topo)?;
        (links, Some(note))
    } else {
        (Vec::new(), None)
    };
    // Remote backends receive in their XDP sinks: no socket.
    let socks = if cfg.remote_backends {
        Vec::new()
    } else {
        vec![
            bind_in(&topo.backends[0], backend_addr(1))?,
            bind_in(&topo.backends[1], backend_addr(2))?,
        ]
    };
    let receivers = receivers(socks, !cfg.node_cpu)?;
    let last = svcs.last().expect("at least one Service");
    let node_port = last.node_port.context("the measured Service has a NodePort")?;
    let target = match who {
        Contender::Direct => (backend_addr(1), BACKEND_PORT),
        _ => (NODE_CLIENT_SIDE, node_port),
    };
    let frames = frames(
        mac_of(&topo.client, "eth0")?,
        mac_of(&topo.node, NODE_CLIENT_IFACE)?,
        target,
        cfg.flows,
    );
    let tx = match cfg.generator {
        Generator::LiveFrames => {
            let headers = live_frame(&frames)[..xdp_gen::HEADERS]
                .try_into()
                .expect("a frame holds its headers");
            Some(Arc::new(xdp_gen::load(
                "bench_gen_tx",
                &xdp_gen::tx_program(&headers, FIRST_SRC_PORT, cfg.flows),
            )?))
        }
        Generator::AfPacket => None,
    };
    let mut s = Setup {
        who,
        topo,
        receivers,
        agent: None,
        frames,
        target,
        install_s: None,
        notes: napi_note.into_iter().chain(sink_note).collect(),
        napi,
        tx,
        sinks,
    };
    match who {
        Contender::Dataplane | Contender::DataplaneGeneric => {
            let docs = manifests(svcs, cfg.remote_backends);
            let xdp = vec![NODE_CLIENT_IFACE.to_string()];
            let tc: Vec<String> = (1..=s.topo.backends.len()).map(backend_iface).collect();
            let mode = if who == Contender::Dataplane { "auto" } else { "generic" };
            let mut extra = vec![
                format!("--host-routing={}", cfg.host_routing),
                format!("--node-ip={NODE_CLIENT_SIDE}"),
                format!("--xdp-mode={mode}"),
            ];
            if cfg.remote_backends {
                extra.push(format!("--node-name={NODE_NAME}"));
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let t = Instant::now();
            let agent = Agent::start_with(&s.topo.node, &tc, &xdp, &[("services.yaml", &docs)], &extra)?;
            s.install_s = Some(t.elapsed().as_secs_f64());
            s.agent = Some(agent);
            s.notes.push(format!(
                "the agent ({}, file source, {}) with XDP ({mode} mode: {}) on {NODE_CLIENT_IFACE} and TC ingress (tcx) on {}; install time is agent start to first sync, including YAML parsing",
                crate::agent::agent_binary().display(),
                extra.join(" "),
                s.xdp_mode(),
                tc.join(", "),
            ));
        }
        Contender::Iptables | Contender::Nftables => {
            let (t, note) = install_kube_proxy(&s.topo.node, who == Contender::Iptables, svcs)?;
            s.install_s = Some(t);
            s.notes.push(note);
        }
        Contender::Direct => {}
    }
    let holds = match who {
        Contender::Dataplane | Contender::DataplaneGeneric => NodeHolds::Agent(s.agent.as_ref()),
        Contender::Iptables | Contender::Nftables => NodeHolds::KubeProxy,
        Contender::Direct => NodeHolds::Nothing,
    };
    let notes = check_node(&s.topo, who.name(), holds, cfg.node_conntrack)?;
    s.notes.extend(notes);
    // Before timing: every flow once (neighbours resolved, conntrack and
    // NAT entries made), and the packets must arrive; the dataplane must
    // have translated each flow once, per packet (in XDP: no TC program
    // sees the client's side).
    let before = s.agent.as_ref().map(Agent::translations).transpose()?;
    let flows = u64::from(cfg.flows);
    let mut warm = s.round(Duration::from_secs(5), flows, true)?;
    std::thread::sleep(Duration::from_millis(200));
    let more = s.round(Duration::from_secs(5), 4 * flows, true)?;
    warm.delivered += more.delivered;
    if warm.delivered < 4 * flows {
        bail!(
            "{}: {} of {} warm-up packets reached the backends ({:?})",
            who.name(),
            warm.delivered,
            5 * flows,
            more.counters
        );
    }
    if let (Some(a), Some((_, nat0))) = (s.agent.as_ref(), before) {
        let (_, nat) = a.translations()?;
        if nat - nat0 != flows {
            bail!(
                "{}: {flows} flows were translated {} times per packet, expected {flows}",
                who.name(),
                nat - nat0
            );
        }
        s.notes.push(format!(
            "checked before timing: {flows} flows translated {flows} times per packet (XDP: TC is not on the client's side)"
        ));
        // Which way XDP sent them: redirected to the backends' veths, or
        // to the stack (the first packets, before the node has resolved
        // the backends' addresses, always take the stack).
        let st = dataplane::inspect::stats(&dataplane::inspect::open_pinned(&a.pins)?)?;
        let count = |e: &str| st.host_routing.iter().find(|r| r.event == e).map_or(0, |r| r.count);
        let (redirected, to_stack) = (count("xdp_redirect"), count("to_stack"));
        s.notes.push(format!(
            "host routing in the warm-up: {redirected} packets redirected by XDP (xdp_redirect), {to_stack} to the stack"
        ));
        if cfg.remote_backends {
            // Endpoints of another node: every flow SNATed, so that
            // replies would come back through this node.
            let maps = dataplane::inspect::open_pinned(&a.pins)?;
            let rows = dataplane::inspect::conntrack_rows(&maps)?;
            let original: Vec<_> = rows.iter().filter(|r| r.direction == "original").collect();
            let snat = original.iter().filter(|r| r.snat.is_some()).count();
            if original.len() as u64 != flows || snat != original.len() {
                bail!(
                    "{}: remote endpoints: {snat} of {} flows SNATed, expected all {flows}",
                    who.name(),
                    original.len()
                );
            }
            s.notes.push(format!(
                "checked before timing: the {flows} flows to remote endpoints are SNATed"
            ));
        }
        if cfg.host_routing && cfg.backend_gro && redirected < 4 * flows {
            bail!(
                "{}: XDP redirected {redirected} of {} warm-up packets ({to_stack} to the stack); the backends' veths should take XDP frames with GRO on at their ends",
                who.name(),
                5 * flows
            );
        }
    }
    Ok(s)
}

/// `a / b` per round (same round, seconds apart), summarized, and the ratio
/// of the medians; `None` when either has no values.
pub fn ratio(a: &[f64], b: &[f64]) -> Option<Value> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let paired: Vec<f64> = a.iter().zip(b).filter(|(_, y)| **y > 0.0).map(|(x, y)| x / y).collect();
    Some(json!({
        "paired": { "summary": super::summary(&paired), "raw": paired },
        "of_medians": super::median(a) / super::median(b),
    }))
}

/// The ratios reported: ours to each kube-proxy mode and to the floor, and
/// each kube-proxy mode to the floor, from delivered pps per round by
/// contender.
pub fn ratios(delivered: &BTreeMap<&str, Vec<f64>>) -> Value {
    let pairs = [
        ("dataplane", "iptables"),
        ("dataplane", "nftables"),
        ("dataplane", "direct"),
        ("dataplane-xdp-generic", "iptables"),
        ("dataplane-xdp-generic", "nftables"),
        ("dataplane-xdp-generic", "direct"),
        ("iptables", "direct"),
        ("nftables", "direct"),
    ];
    let mut m = serde_json::Map::new();
    for (a, b) in pairs {
        if let (Some(x), Some(y)) = (delivered.get(a), delivered.get(b)) {
            if let Some(r) = ratio(x, y) {
                m.insert(format!("{a}/{b}"), r);
            }
        }
    }
    Value::Object(m)
}

/// The node's NAPI thread's busy share of the send time per round.
fn napi_busy(rs: &[RoundResult]) -> Value {
    let busy: Vec<f64> = rs.iter().filter_map(|r| r.napi_busy).collect();
    if busy.is_empty() {
        Value::Null
    } else {
        json!({ "summary": super::summary(&busy), "raw": busy })
    }
}

pub fn run(cfg: &Config) -> Result<Value> {
    if cfg.flows == 0 || cfg.rounds == 0 {
        bail!("NodePort: flows and rounds must be at least 1");
    }
    let started = Instant::now();
    let mut scales_out = Vec::new();
    for &n in &cfg.scales {
        let svcs = services(n);
        let setups = super::set_up_all(
            "NodePort",
            n,
            &cfg.contenders,
            Contender::name,
            |who| setup(who, &svcs, cfg),
            |s| s.install_s,
        )?;
        let results = super::interleaved(
            setups.len(),
            cfg.rounds,
            started,
            cfg.deadline,
            |i, round| {
                let s = &setups[i];
                s.round(cfg.send, cfg.max_packets, false)
                    .with_context(|| format!("{} at {n} Services, round {round}", s.who.name()))
            },
            |round, results| {
                let line: Vec<String> = setups
                    .iter()
                    .zip(results)
                    .filter_map(|(s, r)| {
                        let r = r.last()?;
                        Some(format!(
                            "{} {:.0} kpps ({:.0} offered)",
                            s.who.name(),
                            r.delivered_pps() / 1e3,
                            r.offered_pps() / 1e3
                        ))
                    })
                    .collect();
                eprintln!("dp-bench:   round {}/{}: {}", round + 1, cfg.rounds, line.join(", "));
            },
        )?;
        let rounds_done = results.first().map_or(0, Vec::len);
        let mut contenders = serde_json::Map::new();
        let mut delivered_by: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for (s, rs) in setups.iter().zip(&results) {
            let offered: Vec<f64> = rs.iter().map(RoundResult::offered_pps).collect();
            let delivered: Vec<f64> = rs.iter().map(RoundResult::delivered_pps).collect();
            let received: Vec<f64> = rs.iter().map(RoundResult::received_pps).collect();
            let sent: u64 = rs.iter().map(|r| r.sent.packets).sum();
            let arrived: u64 = rs.iter().map(|r| r.delivered).sum();
            delivered_by.insert(s.who.name(), delivered.clone());
            contenders.insert(
                s.who.name().into(),
                json!({
                    "target": format!("{}:{}", s.target.0, s.target.1),
                    "install_s": s.install_s,
                    "notes": s.notes,
                    "offered_pps": { "summary": super::summary(&offered), "raw": offered },
                    "delivered_pps": { "summary": super::summary(&delivered), "raw": delivered },
                    "socket_pps": { "summary": super::summary(&received), "raw": received },
                    "sent_packets": sent,
                    "delivered_packets": arrived,
                    "lost_packets": sent.saturating_sub(arrived),
                    "enobufs": rs.iter().map(|r| r.sent.enobufs).sum::<u64>(),
                    "node_napi_thread_busy": napi_busy(rs),
                    "per_round": {
                        "sent": rs.iter().map(|r| r.sent.packets).collect::<Vec<_>>(),
                        "secs": rs.iter().map(|r| r.sent.secs).collect::<Vec<_>>(),
                        "delivered": rs.iter().map(|r| r.delivered).collect::<Vec<_>>(),
                        "socket_received": rs.iter().map(|r| r.received).collect::<Vec<_>>(),
                    },
                    "interface_counters_over_all_rounds": sum_counters(rs.iter().map(|r| &r.counters)),
                }),
            );
        }
        let last = svcs.last().expect("at least one Service");
        scales_out.push(json!({
            "services": n,
            "node_ports": svcs.iter().filter(|s| s.node_port.is_some()).count(),
            "measured": {
                "node_ip": NODE_CLIENT_SIDE.to_string(),
                "node_port": last.node_port,
                "cluster_ip": last.vip.to_string(),
                "protocol": "UDP",
                "endpoints": 2,
            },
            "rounds": rounds_done,
            "contenders": contenders,
            "ratios": ratios(&delivered_by),
        }));
        drop(setups);
    }
    Ok(json!({
        "part": if cfg.remote_backends { "nodeport-remote" } else { "nodeport" },
        "method": "One copy of the topology (client, node, 2 backends) per contender, built side by side. A generator thread in the client namespace (pinned to PIN_CPU) sends prebuilt 60-byte Ethernet/IPv4/UDP frames (64 bytes on a wire with the FCS; valid checksums) out of the client's veth (see generator), cycling through `flows` source ports, for `send_s` seconds or `max_packets` per contender per round, whichever comes first; every round measures each contender in turn (the order rotating by one from round to round). Offered pps: frames the socket accepted over the send time. Delivered pps: the backends' interfaces' rx_packets over the same time (read before and 100 ms after the send). Socket pps: datagrams the backends' UDP sockets read (one thread pinned to the other CPU reads both with non-blocking recvmmsg, polling without sleeping while a send is on, so that no packet costs the sending CPU a wakeup). Before timing, every flow is sent 5 times (neighbours, conntrack, NAT bindings), the packets must arrive, and the dataplane must have translated each flow once per packet (XDP: no TC program is on the client's side). Ratios: per round, a contender's delivered pps over another's (seconds apart), median over rounds; and the ratio of the medians.",
        "generator": match cfg.generator {
            Generator::AfPacket => "AF_PACKET, PACKET_QDISC_BYPASS, sendmmsg (64 frames per call), one thread; a call the node's veth cannot take (its ring full) fails with ENOBUFS and is sent again",
            Generator::LiveFrames => "live frames: BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES of an XDP program on the client's eth0 that writes the first flow's headers over the frame (live frames are recycled pages, which come back as the node left them), gives it a random source port of the flows (UDP checksum 0) and returns XDP_TX; one thread, 2^21 frames per call (each call sets up a page pool, about 25 ms); the frames reach the node's veth as XDP frames, as a NIC's driver hands frames to XDP (no skb for XDP to copy; the stack builds its skb around the frame). A frame the node's ring cannot take is dropped by the kernel unreported, so offered pps (what the program sent) exceeds delivered once the node is saturated, and lost counts those frames. The warm-up sends with the AF_PACKET socket (each flow in turn)",
        },
        "remote_backends": cfg.remote_backends,
        "node_cpu": if cfg.node_cpu && cfg.remote_backends {
            "The node's receive on the other CPU: GRO on at the node's client-side veth vc for every contender, so that every frame goes through vc's NAPI; vc's NAPI threaded, its thread pinned to receiver_cpu. Everything the node does with a packet (XDP or the stack, netfilter, forwarding, the transmit to the backend's veth) runs on that CPU; the generator and the backends' receive (their veths' NAPI threads, real-time) run on pinned_cpu, standing for the client's and the other node's CPUs: the rates are the node's capacity (the thread's busy share of the send time is in node_napi_thread_busy)."
        } else if cfg.node_cpu {
            "The node's receive on the other CPU (the default): GRO on at the node's client-side veth vc and TSO off at the client's eth0 for every contender, so that every frame goes through vc's NAPI; vc's NAPI threaded, its thread pinned to receiver_cpu. Everything the node does with a packet (XDP or the stack, netfilter, forwarding) and the backends' receive (which runs after it in the same context) runs on that CPU, the generator alone on pinned_cpu: the rates are the node's capacity (the thread's busy share of the send time is in node_napi_thread_busy; with the AF_PACKET generator offered equals delivered because a frame the full ring refuses is sent again, ENOBUFS counts those calls). The backends' sockets are held but not read (a reader would share the node's CPU): socket_pps is 0."
        } else {
            "One CPU (--nodeport-one-cpu): the generator and, in softirq in its context, the node's and the backends' receive all run on pinned_cpu; the backends' sockets are read on receiver_cpu. Every rate is then one CPU over the whole path's cost, generator included."
        },
        "frame_bytes": 14 + 20 + 8 + PAYLOAD,
        "flows": cfg.flows,
        "send_s": cfg.send.as_secs_f64(),
        "max_packets": cfg.max_packets,
        "pinned_cpu": PIN_CPU,
        "receiver_cpu": receiver_cpu(),
        "dp_bench_build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "netfilter_conntrack": if cfg.node_conntrack {
            "Loaded in every contender's node namespace, as on real nodes: a table whose rules read `ct state` in prerouting and output, besides the contender's own rules."
        } else {
            "Not loaded by the bench (--no-node-conntrack): only the iptables and nftables node namespaces track flows (their NAT needs it)."
        },
        "host_routing": cfg.host_routing,
        "backend_gro": cfg.backend_gro,
        "attach_point": if cfg.backend_gro && cfg.host_routing {
            "dataplane: XDP (auto mode) on the node's client-side veth (vc), TC ingress (tcx) on the backend-side veths; the XDP program translates and redirects each packet to its backend's veth (XDP_REDIRECT: the backends' eth0 have GRO on, so those veths take XDP frames), so the node's stack never sees it"
        } else {
            "dataplane: XDP (auto mode) on the node's client-side veth (vc), TC ingress (tcx) on the backend-side veths; the XDP program translates and passes the packet to the stack (the backends' veths cannot take XDP frames without GRO on their peers, or host routing is off), so the node still forwards it"
        },
        "external_traffic_policy": if cfg.remote_backends {
            "Cluster (the default), endpoints on another node (nodeName node-b, the agent runs as node-a): kube-proxy masquerades NodePort traffic to the node's address, the dataplane SNATs it to the node's address (--node-ip) with a port of its SNAT range, so replies would come back through the node. Delivered: the datagrams the backends' XDP sinks dropped (UDP to the backend port, so translated), their rx_queue_0_xdp_drops"
        } else {
            "Cluster (the default): kube-proxy masquerades NodePort traffic to the node's address; the dataplane does not SNAT local endpoints (no --node-name: every endpoint is local), so its backends see the client's address"
        },
        "contenders": cfg.contenders.iter().map(|c| c.name()).collect::<Vec<_>>(),
        "scales": scales_out,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_64_bytes_on_a_wire_with_valid_checksums() {
        let f = frames([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], (NODE_CLIENT_SIDE, 30999), 3);
        assert_eq!(f.len(), 3);
        for (i, fr) in f.iter().enumerate() {
            assert_eq!(fr.len() + 4, 64);
            assert_eq!(&fr[0..6], &[2, 0, 0, 0, 0, 2]);
            assert_eq!(&fr[6..12], &[2, 0, 0, 0, 0, 1]);
            let p = crate::packet::parse_and_verify(fr);
            assert_eq!(p.sport, FIRST_SRC_PORT + i as u16);
            assert_eq!(p.dport, 30999);
            assert_eq!(p.dst, std::net::IpAddr::from(NODE_CLIENT_SIDE));
        }
    }

    #[test]
    fn the_measured_service_has_the_highest_node_port() {
        for n in [1, 10, 10_000] {
            let s = services(n);
            let np: Vec<u16> = s.iter().filter_map(|s| s.node_port).collect();
            assert_eq!(np.len(), n.min(NODE_PORTS));
            assert_eq!(s.last().unwrap().node_port, np.iter().max().copied());
            assert!(np.iter().all(|p| (30000..=32767).contains(p)));
        }
        let m = manifests(&services(2), false);
        assert!(m.contains("type: NodePort"));
        assert!(m.contains("protocol: UDP, nodePort: 30001}"));
        assert!(!m.contains("nodeName"));
    }

    #[test]
    fn remote_backends_are_endpoints_of_another_node() {
        let m = manifests(&services(2), true);
        // Two Services, two endpoints each, every one on the other node.
        assert_eq!(m.matches("- addresses: [").count(), 4);
        assert_eq!(
            m.matches(&format!("\n  nodeName: {REMOTE_NODE}\n  conditions:"))
                .count(),
            4
        );
        assert_ne!(NODE_NAME, REMOTE_NODE);
    }

    #[test]
    fn counters_add_up_over_rounds() {
        let a = json!({ "node": { "vc": { "rx_packets": 10, "rx_dropped": 1 } }, "backends": {} });
        let b = json!({ "node": { "vc": { "rx_packets": 5, "rx_dropped": 0 }, "vb1": { "tx_packets": 3 } } });
        let t = sum_counters([&a, &b].into_iter());
        assert_eq!(
            t,
            json!({ "node": { "vc": { "rx_packets": 15, "rx_dropped": 1 }, "vb1": { "tx_packets": 3 } }, "backends": {} })
        );
    }

    #[test]
    fn ratios_are_paired_per_round_and_of_medians() {
        let d = BTreeMap::from([
            ("dataplane", vec![300.0, 400.0, 330.0]),
            ("iptables", vec![100.0, 100.0, 110.0]),
            ("direct", vec![400.0, 400.0, 330.0]),
        ]);
        let r = ratios(&d);
        assert_eq!(r["dataplane/iptables"]["paired"]["raw"], json!([3.0, 4.0, 3.0]));
        assert_eq!(r["dataplane/iptables"]["paired"]["summary"]["median"], json!(3.0));
        assert_eq!(r["dataplane/iptables"]["of_medians"], json!(3.3));
        assert_eq!(r["dataplane/direct"]["paired"]["summary"]["median"], json!(1.0));
        assert!(r.get("dataplane/nftables").is_none());
        assert!(r.get("iptables/direct").is_some());
        assert!(ratio(&[], &[1.0]).is_none());
    }
}
