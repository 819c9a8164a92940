//! The command line: every subcommand and flag of `dataplane`, each flag
//! with its environment variable (the DaemonSet's ConfigMap sets those).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::IpAddr;

use crate::{
    agent::{self, MetricsConfig, RunConfig, SourceConfig},
    bpf::{loader::XdpAttachMode, map_sizes::MapSizes, pin},
    cli::trace::TraceProgram,
    model::maglev,
    reconcile::{Selection, SyncConfig},
};
use dataplane_common::{limits, timeouts, DpConfig};

/// eBPF Service dataplane for Kubernetes: a kube-proxy replacement.
#[derive(Parser)]
#[command(name = "dataplane", version)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "DATAPLANE_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Source {
    /// A directory of Service and EndpointSlice manifests (--dir).
    Files,
    /// The Kubernetes API: in-cluster configuration, or KUBECONFIG.
    Kubernetes,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load the programs, attach them, and keep the maps in sync with a source.
    Run(Box<RunArgs>),
    /// Remove everything the agent pinned: detach its programs (links) and
    /// delete its maps. Established connections through the node lose their
    /// conntrack entries.
    Cleanup {
        /// The agent's pin directory.
        #[arg(long, default_value = pin::DEFAULT_ROOT, env = "DATAPLANE_BPFFS_ROOT")]
        bpffs_root: PathBuf,
    },
    /// Service frontends from the pinned maps: name, VIP:port/proto,
    /// backends, selection, flags, counters.
    Services(InspectArgs),
    /// The backend slots of every frontend's current generation.
    Backends(InspectArgs),
    /// Connection tracking entries: direction, tuple, NAT, flags, age.
    Conntrack(InspectArgs),
    /// Datapath reason counters, conntrack occupancy, map capacity use.
    Stats(InspectArgs),
    /// Run a synthetic packet through a private copy of the programs,
    /// seeded from the live maps (which it does not change), and explain
    /// the decision.
    Trace(TraceArgs),
    /// The release, the commit it was built from and the map layout
    /// version (JSON with `--output json`).
    Version {
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// JSON, for scripts.
    Json,
}

#[derive(Args)]
pub struct InspectArgs {
    /// The running agent's pin directory.
    #[arg(long, default_value = pin::DEFAULT_ROOT, env = "DATAPLANE_BPFFS_ROOT")]
    pub bpffs_root: PathBuf,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Proto {
    Tcp,
    Udp,
}

#[derive(Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub inspect: InspectArgs,
    /// Source address and port of the packet (IPv6: `[2001:db8::1]:40000`;
    /// both ends of one family).
    #[arg(long)]
    pub src: std::net::SocketAddr,
    /// Destination address and port (a Service frontend, or a client for a
    /// reply).
    #[arg(long)]
    pub dst: std::net::SocketAddr,
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    pub proto: Proto,
    /// TCP flags, comma separated (syn, ack, fin, rst, psh).
    #[arg(long, default_value = "syn")]
    pub flags: String,
    /// Which program the packet runs through.
    #[arg(long, value_enum, default_value_t = TraceProgram::Tc)]
    pub program: TraceProgram,
    /// Load this eBPF object for the private copy instead of the one built
    /// into the binary.
    #[arg(long, env = "DATAPLANE_BPF_OBJECT")]
    pub bpf_object: Option<PathBuf>,
}

#[derive(Args)]
pub struct RunArgs {
    /// Where Services and EndpointSlices come from.
    #[arg(long, value_enum, default_value_t = Source::Files, env = "DATAPLANE_SOURCE")]
    pub source: Source,
    /// Manifest directory (with --source files).
    #[arg(long, env = "DATAPLANE_DIR", required_if_eq("source", "files"))]
    pub dir: Option<PathBuf>,
    /// This node's name (with --source kubernetes).
    #[arg(long, env = "NODE_NAME", required_if_eq("source", "kubernetes"))]
    pub node_name: Option<String>,
    /// Attach the TC ingress program to these interfaces (repeatable or comma separated).
    #[arg(long = "tc-iface", env = "DATAPLANE_TC_IFACES", value_delimiter = ',')]
    pub tc_ifaces: Vec<String>,
    /// Attach the XDP program to these interfaces (repeatable or comma separated).
    #[arg(long = "xdp-iface", env = "DATAPLANE_XDP_IFACES", value_delimiter = ',')]
    pub xdp_ifaces: Vec<String>,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpAttachMode::Auto, env = "DATAPLANE_XDP_MODE")]
    pub xdp_mode: XdpAttachMode,
    /// Attach to no interface: only program the maps. For benchmarks and
    /// tests of the control plane; no traffic is translated.
    #[arg(
        long,
        env = "DATAPLANE_NO_ATTACH",
        conflicts_with_all = ["tc_ifaces", "xdp_ifaces", "socket_lb_cgroup"]
    )]
    pub no_attach: bool,
    /// Socket-level load balancing: attach the connect/sendmsg/recvmsg/
    /// getpeername programs to this cgroup v2 directory, so that sockets of
    /// its processes (pods and host processes, with the cgroup root) reach
    /// Services through a backend chosen at connect time, with no
    /// per-packet translation. Off when not given.
    /// An empty value (`DATAPLANE_SOCKET_LB_CGROUP=""`, as the ConfigMap
    /// documents) turns it off.
    #[arg(
        long,
        env = "DATAPLANE_SOCKET_LB_CGROUP",
        value_parser = clap::builder::TypedValueParser::map(clap::builder::OsStringValueParser::new(), PathBuf::from)
    )]
    pub socket_lb_cgroup: Option<PathBuf>,
    /// Load this eBPF object instead of the one built into the binary.
    #[arg(long, env = "DATAPLANE_BPF_OBJECT")]
    pub bpf_object: Option<PathBuf>,
    /// The manifest directory: the least time between two checks for
    /// changes, in ms. With inotify a change is checked when its event
    /// comes, at most this long after the previous check; without inotify
    /// (its limits reached) the directory is scanned this often.
    #[arg(long, default_value_t = 100, env = "DATAPLANE_POLL_INTERVAL_MS")]
    pub poll_interval_ms: u64,
    /// The manifest directory: how often every file is looked at even
    /// though inotify reported nothing, in s (changes inotify cannot see:
    /// files symlinked from outside the directory, network filesystems).
    /// 0: never.
    #[arg(long, default_value_t = 60, env = "DATAPLANE_RESCAN_INTERVAL_S")]
    pub rescan_interval_s: u64,
    /// How long a burst of changes settles before a sync, in ms.
    #[arg(long, default_value_t = agent::DEFAULT_DEBOUNCE.as_millis() as u64, env = "DATAPLANE_DEBOUNCE_MS")]
    pub debounce_ms: u64,
    /// Address of the /healthz and /readyz endpoints, or `off`.
    #[arg(long, default_value = "0.0.0.0:10256", env = "DATAPLANE_HEALTH_BIND")]
    pub health_bind: String,
    /// Address of the Prometheus /metrics endpoint, or `off`.
    #[arg(long, default_value = "127.0.0.1:10249", env = "DATAPLANE_METRICS_BIND")]
    pub metrics_bind: String,
    /// How often the datapath's metrics (counters, conntrack and other
    /// entries the programs write) are read from the maps, in ms: a scrape
    /// shows the last read, at most this old.
    #[arg(
        long,
        default_value_t = crate::http::metrics::DEFAULT_INTERVAL.as_millis() as u64,
        env = "DATAPLANE_METRICS_INTERVAL_MS"
    )]
    pub metrics_interval_ms: u64,
    /// Export per-frontend counters (`dataplane_service_*`, four series per
    /// Service port and address): off by default, since 100,000 Services
    /// make 400,000+ series.
    #[arg(long, env = "DATAPLANE_METRICS_PER_SERVICE")]
    pub metrics_per_service: bool,
    /// Make the eBPF programs log their decisions (new flows with the chosen
    /// backend, rejects, source-range drops) into the agent's log (info
    /// level). Off: the logging code is removed by the verifier, no
    /// per-packet cost.
    #[arg(long, env = "DATAPLANE_BPF_DEBUG_LOG")]
    pub bpf_debug_log: bool,
    /// Where maps and program links are pinned (on bpffs, mounted at
    /// /sys/fs/bpf if missing). A restarted agent adopts them: traffic keeps
    /// flowing and established connections keep their backends.
    #[arg(long, default_value = pin::DEFAULT_ROOT, env = "DATAPLANE_BPFFS_ROOT")]
    pub bpffs_root: PathBuf,
    /// Pin nothing: the programs detach when the agent exits.
    #[arg(long, env = "DATAPLANE_NO_PIN")]
    pub no_pin: bool,
    /// Addresses NodePort Services are served on, IPv4 and IPv6 (repeatable
    /// or comma separated); default: every address of the node but loopback
    /// and IPv6 link-local ones.
    #[arg(long = "node-ip", env = "DATAPLANE_NODE_IPS", value_delimiter = ',')]
    pub node_ips: Vec<IpAddr>,
    /// The cluster's pod CIDRs, IPv4 and IPv6 (repeatable or comma
    /// separated), as kube-proxy's --cluster-cidr: packets from these
    /// sources to a NodePort, externalIP or load balancer IP of an
    /// externalTrafficPolicy Local Service use every endpoint of the
    /// cluster, not only this node's. Empty: only the node's own sockets do
    /// (socket-level load balancing).
    #[arg(long = "cluster-cidr", env = "DATAPLANE_CLUSTER_CIDR", value_delimiter = ',', value_parser = cidr)]
    pub cluster_cidrs: Vec<(IpAddr, u8)>,
    /// The NodePort range, as the API server's --service-node-port-range.
    #[arg(long, default_value = "30000-32767", env = "DATAPLANE_NODE_PORT_RANGE")]
    pub node_port_range: String,
    /// Source address for flows SNATed to remote backends (and hairpin), at
    /// most one per family (repeatable or comma separated); default: the
    /// first node address of each family.
    #[arg(long = "snat-ip", env = "DATAPLANE_SNAT_IP", value_delimiter = ',')]
    pub snat_ips: Vec<IpAddr>,
    /// Source ports for SNATed flows, LOW-HIGH. They must lie outside the
    /// node's ephemeral ports (net.ipv4.ip_local_port_range) and the
    /// NodePort range, so that no socket of the node can use the same tuple
    /// and receive a stranger's replies. Default: the largest range of
    /// 1024-65535 outside both, read at start.
    #[arg(long, env = "DATAPLANE_SNAT_PORT_RANGE")]
    pub snat_port_range: Option<String>,
    /// The flood guard: new TCP and UDP flows per CPU per second that get
    /// conntrack state. Beyond it, TCP segments (SYNs, ACKs, any) and UDP
    /// datagrams of new tuples are translated without state until the next
    /// second, and a flow gets its state from the client's next packet
    /// once the backend answered (a handshake's ACK after the SYN-ACK): a
    /// flood cannot evict established flows. 0: no limit.
    #[arg(long, default_value_t = dataplane_common::DEFAULT_NEW_FLOWS_PER_CPU, env = "DATAPLANE_NEW_FLOWS_PER_CPU")]
    pub new_flows_per_cpu: u32,
    /// Host routing: a packet the TC program translated goes straight to
    /// the interface the kernel's routing table (FIB) names for its new
    /// destination, skipping netfilter and the forwarding path of the
    /// node; packets the FIB cannot place (local destinations, no route,
    /// too large) still go to the stack. Off by default: translated
    /// packets would also skip NetworkPolicy that the CNI enforces with
    /// iptables or nftables rules on the node (Calico's iptables
    /// dataplane, kube-router, ...). Turn it on where no such rules
    /// exist.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, env = "DATAPLANE_HOST_ROUTING")]
    pub host_routing: bool,
    /// With --host-routing and --socket-lb-cgroup: the packets of
    /// connections translated at the socket level (which carry the
    /// endpoint's address from the client on) are host-routed too, by a
    /// set of every Service endpoint's address, port and protocol. The
    /// datapath cannot tell them from a pod addressing an endpoint
    /// directly, so all traffic to and from Service endpoints skips the
    /// node's netfilter. `false` leaves it to the stack.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "DATAPLANE_SOCKET_HOST_ROUTING")]
    pub socket_host_routing: bool,
    /// How new flows pick a backend.
    #[arg(long, value_enum, default_value_t = Selection::Maglev, env = "DATAPLANE_LB_ALGORITHM")]
    pub lb_algorithm: Selection,
    /// Maglev table size per service (a prime: 251, 509, 1021, 2039, 4093,
    /// 8191, 16381, 32749, 65521).
    #[arg(long, default_value_t = maglev::DEFAULT_SIZE, env = "DATAPLANE_MAGLEV_TABLE_SIZE")]
    pub maglev_table_size: u32,
    /// Conntrack map entries (LRU, preallocated; two per flow).
    #[arg(long, default_value_t = limits::MAX_CONNTRACK, env = "DATAPLANE_CT_MAX_ENTRIES")]
    pub ct_max_entries: u32,
    /// Session affinity map entries (LRU, preallocated).
    #[arg(long, default_value_t = limits::MAX_AFFINITY, env = "DATAPLANE_AFFINITY_MAX_ENTRIES")]
    pub affinity_max_entries: u32,
    /// Service frontends: the service map, its per-service counters and
    /// names. One per Service port and one per ClusterIP (its entry for
    /// the ports it lacks): a one-port ClusterIP Service takes two.
    #[arg(long, default_value_t = limits::MAX_SERVICES, env = "DATAPLANE_SERVICES_MAX_ENTRIES")]
    pub services_max_entries: u32,
    /// Backend slots, all frontends together (both generations of each).
    #[arg(long, default_value_t = limits::MAX_BACKEND_SLOTS, env = "DATAPLANE_BACKENDS_MAX_ENTRIES")]
    pub backends_max_entries: u32,
    /// Maglev table chunks of 256 entries, all frontends together.
    #[arg(long, default_value_t = limits::MAX_MAGLEV_CHUNKS, env = "DATAPLANE_MAGLEV_MAX_CHUNKS")]
    pub maglev_max_chunks: u32,
    /// loadBalancerSourceRanges entries, all frontends together.
    #[arg(long, default_value_t = limits::MAX_SOURCE_RANGES, env = "DATAPLANE_SOURCE_RANGES_MAX_ENTRIES")]
    pub source_ranges_max_entries: u32,
    /// Socket-level translations (LRU, preallocated): one per socket
    /// connected to a Service, two per unconnected UDP socket and Service.
    #[arg(long, default_value_t = limits::MAX_SOCK_NAT, env = "DATAPLANE_SOCK_NAT_MAX_ENTRIES")]
    pub sock_nat_max_entries: u32,
    /// Idle timeout of TCP flows before a reply, in seconds.
    #[arg(long, default_value_t = timeouts::TCP_SYN_S, env = "DATAPLANE_CT_TCP_SYN_TIMEOUT")]
    pub ct_tcp_syn_timeout: u64,
    /// Idle timeout of established TCP flows, in seconds.
    #[arg(long, default_value_t = timeouts::TCP_ESTABLISHED_S, env = "DATAPLANE_CT_TCP_ESTABLISHED_TIMEOUT")]
    pub ct_tcp_established_timeout: u64,
    /// Idle timeout of TCP flows after a FIN or RST, in seconds.
    #[arg(long, default_value_t = timeouts::TCP_CLOSING_S, env = "DATAPLANE_CT_TCP_CLOSING_TIMEOUT")]
    pub ct_tcp_closing_timeout: u64,
    /// Idle timeout of UDP flows before a reply, in seconds.
    #[arg(long, default_value_t = timeouts::UDP_S, env = "DATAPLANE_CT_UDP_TIMEOUT")]
    pub ct_udp_timeout: u64,
    /// Idle timeout of UDP flows that saw a reply, in seconds.
    #[arg(long, default_value_t = timeouts::UDP_STREAM_S, env = "DATAPLANE_CT_UDP_STREAM_TIMEOUT")]
    pub ct_udp_stream_timeout: u64,
}

/// Parses `LOW-HIGH`.
pub fn parse_port_range(s: &str) -> anyhow::Result<(u16, u16)> {
    parse_range("--node-port-range", s)
}

/// A `LOW-HIGH` port range given to `flag`.
fn parse_range(flag: &str, s: &str) -> anyhow::Result<(u16, u16)> {
    let (lo, hi) = s
        .split_once('-')
        .with_context(|| format!("{flag} {s:?}: expected LOW-HIGH, e.g. 30000-32767"))?;
    let lo: u16 = lo
        .trim()
        .parse()
        .with_context(|| format!("{flag} {s:?}: bad low port"))?;
    let hi: u16 = hi
        .trim()
        .parse()
        .with_context(|| format!("{flag} {s:?}: bad high port"))?;
    anyhow::ensure!(lo >= 1 && lo <= hi, "{flag} {s:?}: need 1 <= LOW <= HIGH");
    Ok((lo, hi))
}

impl RunArgs {
    pub fn into_config(mut self) -> anyhow::Result<RunConfig> {
        // An empty value (DATAPLANE_SOCKET_LB_CGROUP="") turns it off.
        self.socket_lb_cgroup = self.socket_lb_cgroup.filter(|p| !p.as_os_str().is_empty());
        if self.tc_ifaces.is_empty() && self.xdp_ifaces.is_empty() && self.socket_lb_cgroup.is_none() && !self.no_attach
        {
            anyhow::bail!(
                "nothing to attach to: pass --tc-iface, --xdp-iface and/or --socket-lb-cgroup (or --no-attach to only \
                 program the maps)"
            );
        }
        let source = match self.source {
            Source::Files => SourceConfig::Files {
                dir: self.dir.context("--source files needs --dir")?,
                poll_interval: Duration::from_millis(self.poll_interval_ms),
                rescan_interval: (self.rescan_interval_s > 0).then(|| Duration::from_secs(self.rescan_interval_s)),
            },
            Source::Kubernetes => SourceConfig::Kubernetes,
        };
        let health_bind = match self.health_bind.as_str() {
            "off" | "" => None,
            a => Some(
                a.parse::<SocketAddr>()
                    .with_context(|| format!("--health-bind {a:?}: not an address:port"))?,
            ),
        };
        let metrics_bind = match self.metrics_bind.as_str() {
            "off" | "" => None,
            a => Some(
                a.parse::<SocketAddr>()
                    .with_context(|| format!("--metrics-bind {a:?}: not an address:port"))?,
            ),
        };
        anyhow::ensure!(
            self.metrics_interval_ms >= 10,
            "--metrics-interval-ms must be at least 10"
        );
        let node_port_range = parse_port_range(&self.node_port_range)?;
        let maglev_size = maglev::validate_size(self.maglev_table_size).map_err(|e| anyhow::anyhow!("{e}"))?;
        let secs = |s: u64, flag: &str| -> anyhow::Result<u64> {
            anyhow::ensure!(s > 0, "{flag} must be at least 1 second");
            Ok(s * 1_000_000_000)
        };
        let datapath = DpConfig {
            tcp_syn_timeout_ns: secs(self.ct_tcp_syn_timeout, "--ct-tcp-syn-timeout")?,
            tcp_established_timeout_ns: secs(self.ct_tcp_established_timeout, "--ct-tcp-established-timeout")?,
            tcp_closing_timeout_ns: secs(self.ct_tcp_closing_timeout, "--ct-tcp-closing-timeout")?,
            udp_timeout_ns: secs(self.ct_udp_timeout, "--ct-udp-timeout")?,
            udp_stream_timeout_ns: secs(self.ct_udp_stream_timeout, "--ct-udp-stream-timeout")?,
            ..DpConfig::defaults()
        };
        let map_sizes = MapSizes {
            services: self.services_max_entries,
            backends: self.backends_max_entries,
            maglev_chunks: self.maglev_max_chunks,
            conntrack: self.ct_max_entries,
            affinity: self.affinity_max_entries,
            source_ranges: self.source_ranges_max_entries,
            sock_nat: self.sock_nat_max_entries,
        };
        map_sizes.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(RunConfig {
            map_sizes,
            pin_root: (!self.no_pin).then_some(self.bpffs_root),
            node_ips: self.node_ips,
            cluster_cidrs: self.cluster_cidrs,
            node_port_range,
            snat_port_range: match self.snat_port_range.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(s) => Some(parse_range("--snat-port-range", s)?),
            },
            snat_ips: self.snat_ips,
            new_flows_per_cpu: self.new_flows_per_cpu,
            host_routing: self.host_routing,
            socket_host_routing: self.socket_host_routing,
            sync: SyncConfig {
                selection: self.lb_algorithm,
                maglev_size,
            },
            datapath,
            source,
            node_name: self.node_name.filter(|n| !n.is_empty()),
            tc_ifaces: self.tc_ifaces,
            xdp_ifaces: self.xdp_ifaces,
            xdp_mode: self.xdp_mode,
            socket_lb_cgroup: self.socket_lb_cgroup,
            bpf_object: self.bpf_object,
            health_bind,
            metrics_bind,
            metrics: MetricsConfig {
                interval: Duration::from_millis(self.metrics_interval_ms),
                per_service: self.metrics_per_service,
            },
            bpf_debug_log: self.bpf_debug_log,
            debounce: Duration::from_millis(self.debounce_ms),
        })
    }
}

/// `--cluster-cidr`: an IPv4 or IPv6 CIDR.
fn cidr(s: &str) -> Result<(IpAddr, u8), String> {
    crate::model::parse_cidr(s.trim()).ok_or_else(|| format!("{s:?} is not a CIDR (address/prefix length)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunConfig, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        let Command::Run(a) = cli.command else {
            return Err("not run".into());
        };
        a.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn kubernetes_source_needs_a_node_name() {
        // NODE_NAME may be set where the tests run; this test is about the flag.
        if std::env::var_os("NODE_NAME").is_some() {
            return;
        }
        let e = parse(&["dataplane", "run", "--source", "kubernetes", "--tc-iface", "eth0"]).unwrap_err();
        assert!(e.contains("--node-name"), "{e}");
        let c = parse(&[
            "dataplane",
            "run",
            "--source",
            "kubernetes",
            "--node-name",
            "n1",
            "--tc-iface",
            "eth0,cni0",
        ])
        .unwrap();
        assert!(matches!(c.source, SourceConfig::Kubernetes));
        assert_eq!(c.node_name.as_deref(), Some("n1"));
        assert_eq!(c.tc_ifaces, ["eth0", "cni0"]);
    }

    /// deploy/configmap.yaml: `Set it to "" to turn it off`. (clap's path
    /// parser refuses an empty value: found by the pod test.)
    #[test]
    fn an_empty_socket_lb_cgroup_turns_it_off() {
        let c = parse(&[
            "dataplane",
            "run",
            "--dir",
            "/tmp",
            "--tc-iface",
            "eth0",
            "--socket-lb-cgroup",
            "",
        ])
        .unwrap();
        assert_eq!(c.socket_lb_cgroup, None);
        let e = parse(&["dataplane", "run", "--dir", "/tmp", "--socket-lb-cgroup", ""]).unwrap_err();
        assert!(e.contains("nothing to attach to"), "{e}");
    }

    #[test]
    fn files_source_needs_a_dir_and_an_interface_or_no_attach() {
        let e = parse(&["dataplane", "run", "--source", "files", "--tc-iface", "eth0"]).unwrap_err();
        assert!(e.contains("--dir"), "{e}");
        let e = parse(&["dataplane", "run", "--dir", "/tmp"]).unwrap_err();
        assert!(e.contains("nothing to attach to"), "{e}");
        let c = parse(&[
            "dataplane",
            "run",
            "--dir",
            "/tmp",
            "--socket-lb-cgroup",
            "/sys/fs/cgroup",
        ])
        .unwrap();
        assert_eq!(
            c.socket_lb_cgroup.as_deref(),
            Some(std::path::Path::new("/sys/fs/cgroup"))
        );
        let e = parse(&[
            "dataplane",
            "run",
            "--dir",
            "/tmp",
            "--no-attach",
            "--socket-lb-cgroup",
            "/x",
        ])
        .unwrap_err();
        assert!(e.contains("cannot be used with"), "{e}");
        let c = parse(&["dataplane", "run", "--dir", "/tmp", "--no-attach"]).unwrap();
        assert!(c.tc_ifaces.is_empty() && c.xdp_ifaces.is_empty());
        assert_eq!(c.health_bind, Some("0.0.0.0:10256".parse().unwrap()));
        let e = parse(&["dataplane", "run", "--dir", "/tmp", "--no-attach", "--tc-iface", "x"]).unwrap_err();
        assert!(e.contains("cannot be used with"), "{e}");
    }

    #[test]
    fn health_bind_can_be_turned_off_or_moved() {
        let c = parse(&[
            "dataplane",
            "run",
            "--dir",
            "/tmp",
            "--no-attach",
            "--health-bind",
            "off",
        ])
        .unwrap();
        assert_eq!(c.health_bind, None);
        let c = parse(&[
            "dataplane",
            "run",
            "--dir",
            "/tmp",
            "--no-attach",
            "--health-bind",
            "127.0.0.1:9",
        ])
        .unwrap();
        assert_eq!(c.health_bind, Some("127.0.0.1:9".parse().unwrap()));
        let e = parse(&[
            "dataplane",
            "run",
            "--dir",
            "/tmp",
            "--no-attach",
            "--health-bind",
            "nope",
        ])
        .unwrap_err();
        assert!(e.contains("--health-bind"), "{e}");
    }
}
