//! Network namespaces, veths and addresses for one test, removed on drop.
//!
//! Rules (../shared/TESTING.md): everything lives in namespaces created here,
//! never in the root namespace; hosts use 198.18.0.0/16 and VIPs
//! 198.19.0.0/16; names carry a per-test unique prefix.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context, Result};

/// Fails loudly when the suite cannot do its job here.
pub fn require_root_and_tools() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests need root (network namespaces, BPF): run `cargo xtask test` as root"
    );
    for tool in ["ip", "ethtool", "nsenter"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "`{tool}` is missing: run `cargo xtask setup` (or apt-get install iproute2 ethtool)"
        );
    }
}

/// A short prefix unique to this process and call, for namespace names.
pub fn unique_prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("dpt{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted (with its interfaces) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Result<Netns> {
        sh(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["ip", "-n", &self.name];
        a.extend_from_slice(args);
        sh(&a)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["ip", "netns", "exec", &self.name];
        a.extend_from_slice(args);
        sh(&a)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it
    /// opens belong to the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // SAFETY: setns on a valid namespace fd affects only the calling thread
    // for CLONE_NEWNET.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = sh(&["ip", "netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Creates a veth pair with one end `a_name` in `a` and the other `b_name`
/// in `b`, without touching the root namespace, and sets both up with the
/// given addresses (prefix length 24).
pub fn veth(a: &Netns, a_name: &str, a_addr: Ipv4Addr, b: &Netns, b_name: &str, b_addr: Ipv4Addr) -> Result<()> {
    a.ip(&[
        "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", &b.name,
    ])?;
    a.ip(&["addr", "add", &format!("{a_addr}/24"), "dev", a_name])?;
    b.ip(&["addr", "add", &format!("{b_addr}/24"), "dev", b_name])?;
    a.ip(&["link", "set", a_name, "up"])?;
    b.ip(&["link", "set", b_name, "up"])?;
    Ok(())
}

/// Adds IPv6 address `addr` (prefix length 64, no duplicate address
/// detection: usable at once) to `iface` in `ns`.
pub fn addr6(ns: &Netns, iface: &str, addr: &str) -> Result<()> {
    ns.ip(&["-6", "addr", "add", &format!("{addr}/64"), "dev", iface, "nodad"])?;
    Ok(())
}

/// IPv6 addresses of the one-machine cluster (2001:db8::/32, VIPs in
/// fd00::/8): the client's, the node's side towards it, and backend `i`'s.
pub const CLIENT_ADDR6: &str = "2001:db8:100::2";
pub const NODE_CLIENT_SIDE6: &str = "2001:db8:100::1";
pub fn backend_addr6(i: usize) -> std::net::Ipv6Addr {
    format!("2001:db8:18:{i}::2").parse().unwrap()
}

/// The one-machine cluster:
///
/// ```text
///  [client ns] eth0 --- vc [node ns] vb1 --- eth0 [backend ns 1]
///  198.18.100.2    198.18.100.1  198.18.1.1    198.18.1.2
///                                vbN --- eth0 [backend ns N] 198.18.N.2
/// ```
///
/// The client routes 198.18.0.0/16 and the VIP range 198.19.0.0/16 via the
/// node; backends route 198.18.0.0/16 via the node. The node forwards.
pub struct Topology {
    pub client: Netns,
    pub node: Netns,
    pub backends: Vec<Netns>,
}

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
pub const NODE_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
/// The node-side interface towards the client.
pub const NODE_CLIENT_IFACE: &str = "vc";

/// The address of backend `i` (1-based).
pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, i as u8, 2)
}

/// The node-side interface towards backend `i` (1-based).
pub fn backend_iface(i: usize) -> String {
    format!("vb{i}")
}

impl Topology {
    pub fn new(backends: usize) -> Result<Topology> {
        assert!((1..100).contains(&backends));
        let p = unique_prefix();
        let client = Netns::new(format!("{p}-client"))?;
        let node = Netns::new(format!("{p}-node"))?;
        let mut bns = Vec::new();
        for i in 1..=backends {
            bns.push(Netns::new(format!("{p}-b{i}"))?);
        }
        veth(&node, NODE_CLIENT_IFACE, NODE_CLIENT_SIDE, &client, "eth0", CLIENT_ADDR)?;
        let gw = NODE_CLIENT_SIDE.to_string();
        client.ip(&["route", "add", "198.18.0.0/16", "via", &gw])?;
        client.ip(&["route", "add", "198.19.0.0/16", "via", &gw])?;
        for (i, b) in bns.iter().enumerate() {
            let i = i + 1;
            let node_side = Ipv4Addr::new(198, 18, i as u8, 1);
            veth(&node, &backend_iface(i), node_side, b, "eth0", backend_addr(i))?;
            b.ip(&["route", "add", "198.18.0.0/16", "via", &node_side.to_string()])?;
        }
        node.sysctl("net.ipv4.ip_forward", "1")?;
        for k in ["all", "default", NODE_CLIENT_IFACE] {
            node.sysctl(&format!("net.ipv4.conf.{k}.rp_filter"), "0")?;
        }
        Ok(Topology {
            client,
            node,
            backends: bns,
        })
    }

    /// Adds backend `backends.len() + 1` (namespace, veth, routes) to a
    /// running topology, as a pod starting on the node; returns its index.
    pub fn add_backend(&mut self) -> Result<usize> {
        let i = self.backends.len() + 1;
        let prefix = self.node.name.trim_end_matches("-node").to_string();
        let b = Netns::new(format!("{prefix}-b{i}"))?;
        let node_side = Ipv4Addr::new(198, 18, i as u8, 1);
        veth(&self.node, &backend_iface(i), node_side, &b, "eth0", backend_addr(i))?;
        b.ip(&["route", "add", "198.18.0.0/16", "via", &node_side.to_string()])?;
        self.backends.push(b);
        Ok(i)
    }

    /// Makes the topology dual-stack: IPv6 addresses on every link
    /// (`CLIENT_ADDR6`, `NODE_CLIENT_SIDE6`, `backend_addr6(i)` with the
    /// node side at `2001:db8:18:i::1`), routes to 2001:db8::/32 and the
    /// VIP range fd00::/8 via the node, and IPv6 forwarding on the node.
    pub fn enable_ipv6(&self) -> Result<()> {
        for ns in std::iter::once(&self.client).chain(&self.backends).chain([&self.node]) {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0")?;
        }
        self.node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        addr6(&self.node, NODE_CLIENT_IFACE, NODE_CLIENT_SIDE6)?;
        addr6(&self.client, "eth0", CLIENT_ADDR6)?;
        self.client
            .ip(&["-6", "route", "add", "2001:db8::/32", "via", NODE_CLIENT_SIDE6])?;
        self.client
            .ip(&["-6", "route", "add", "fd00::/8", "via", NODE_CLIENT_SIDE6])?;
        for (i, b) in self.backends.iter().enumerate() {
            let i = i + 1;
            let node_side = format!("2001:db8:18:{i}::1");
            addr6(&self.node, &backend_iface(i), &node_side)?;
            addr6(b, "eth0", &backend_addr6(i).to_string())?;
            b.ip(&["-6", "route", "add", "2001:db8::/32", "via", &node_side])?;
        }
        Ok(())
    }

    /// Node-side interface names: the client's and every backend's.
    pub fn node_ifaces(&self) -> Vec<String> {
        let mut v = vec![NODE_CLIENT_IFACE.to_string()];
        v.extend((1..=self.backends.len()).map(backend_iface));
        v
    }

    /// Turns off checksum offloads on every veth end, so that the kernel
    /// computes and verifies full checksums (catches a wrong incremental
    /// update that CHECKSUM_PARTIAL would hide).
    pub fn disable_offloads(&self) -> Result<()> {
        for ns in std::iter::once(&self.client).chain(&self.backends) {
            ns.exec(&["ethtool", "-K", "eth0", "tx", "off", "rx", "off"])?;
        }
        for iface in self.node_ifaces() {
            self.node.exec(&["ethtool", "-K", &iface, "tx", "off", "rx", "off"])?;
        }
        Ok(())
    }

    /// Keeps checksum offload on the senders (client and backends send
    /// CHECKSUM_PARTIAL skbs, whose L4 field holds only the pseudo-header
    /// sum) but makes the node complete checksums in software when it
    /// forwards (`tx off` on its interfaces) and the receivers verify them
    /// (`rx off`). A rewrite that mishandles partial checksums (an address
    /// change not folded into the pseudo-header sum) is then dropped by the
    /// receiver instead of silently passing over veth.
    pub fn complete_partial_checksums_on_node(&self) -> Result<()> {
        for ns in std::iter::once(&self.client).chain(&self.backends) {
            ns.exec(&["ethtool", "-K", "eth0", "rx", "off"])?;
        }
        for iface in self.node_ifaces() {
            self.node.exec(&["ethtool", "-K", &iface, "tx", "off"])?;
        }
        Ok(())
    }
}

/// Two nodes and clients outside the cluster:
///
/// ```text
///  [client 198.18.200.5] -- ve 198.18.200.1 [node A] vb1 198.18.1.1 -- [backend a 198.18.1.2]
///  [client2 198.18.201.5] - ve2 198.18.201.1 [node A]
///                                  vn 198.18.250.1
///                                        |
///                                  vn 198.18.250.2 [node B] vb1 198.18.2.1 -- [backend b 198.18.2.2]
/// ```
///
/// Node B is reached through node A; each node routes the other's pod
/// subnet over the link between them.
pub struct TwoNodes {
    pub client: Netns,
    pub client2: Netns,
    pub node_a: Netns,
    pub node_b: Netns,
    pub backend_a: Netns,
    pub backend_b: Netns,
}

pub const EXT_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 5);
pub const EXT_CLIENT2: Ipv4Addr = Ipv4Addr::new(198, 18, 201, 5);
pub const NODE_A_EXT: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
pub const NODE_A: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 1);
pub const NODE_B: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 2);
pub const BACKEND_A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const BACKEND_B: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);

impl TwoNodes {
    pub fn new() -> Result<TwoNodes> {
        let p = unique_prefix();
        let t = TwoNodes {
            client: Netns::new(format!("{p}-c1"))?,
            client2: Netns::new(format!("{p}-c2"))?,
            node_a: Netns::new(format!("{p}-na"))?,
            node_b: Netns::new(format!("{p}-nb"))?,
            backend_a: Netns::new(format!("{p}-ba"))?,
            backend_b: Netns::new(format!("{p}-bb"))?,
        };
        veth(&t.node_a, "ve", NODE_A_EXT, &t.client, "eth0", EXT_CLIENT)?;
        veth(
            &t.node_a,
            "ve2",
            Ipv4Addr::new(198, 18, 201, 1),
            &t.client2,
            "eth0",
            EXT_CLIENT2,
        )?;
        veth(&t.node_a, "vn", NODE_A, &t.node_b, "vn", NODE_B)?;
        veth(
            &t.node_a,
            "vb1",
            Ipv4Addr::new(198, 18, 1, 1),
            &t.backend_a,
            "eth0",
            BACKEND_A,
        )?;
        veth(
            &t.node_b,
            "vb1",
            Ipv4Addr::new(198, 18, 2, 1),
            &t.backend_b,
            "eth0",
            BACKEND_B,
        )?;
        for (c, gw) in [(&t.client, "198.18.200.1"), (&t.client2, "198.18.201.1")] {
            c.ip(&["route", "add", "198.18.0.0/16", "via", gw])?;
            c.ip(&["route", "add", "198.19.0.0/16", "via", gw])?;
        }
        for (b, gw) in [(&t.backend_a, "198.18.1.1"), (&t.backend_b, "198.18.2.1")] {
            b.ip(&["route", "add", "198.18.0.0/16", "via", gw])?;
            b.ip(&["route", "add", "198.19.0.0/16", "via", gw])?;
        }
        t.node_a.ip(&["route", "add", "198.18.2.0/24", "via", "198.18.250.2"])?;
        for net in ["198.18.1.0/24", "198.18.200.0/24", "198.18.201.0/24"] {
            t.node_b.ip(&["route", "add", net, "via", "198.18.250.1"])?;
        }
        for n in [&t.node_a, &t.node_b] {
            n.sysctl("net.ipv4.ip_forward", "1")?;
            n.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            n.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        }
        Ok(t)
    }
}
