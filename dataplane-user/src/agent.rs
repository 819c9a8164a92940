//! `dataplane run`: load and attach the programs, then keep the maps in sync
//! with a source until SIGTERM/SIGINT.
//!
//! The sync loop is the same for every source: wait for a change, let a
//! burst of changes settle for a few milliseconds, compute the desired state
//! from the source's objects, apply the difference to the maps.

use std::{
    collections::BTreeSet,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

pub use crate::state::{AgentState, Counters};
use crate::{
    bpf::{
        ifwatch,
        loader::{Dataplane, Globals, XdpAttachMode},
        pin::PinRoot,
    },
    http::{health, service_health::HealthCheckServers},
    model,
    reconcile::{MapWriter, SyncConfig, Syncer},
    source::{files::PolledFiles, kubernetes::KubeSource, Source},
};
use dataplane_common::{map_names, DpConfig, ABI_VERSION};

/// The log reader's fd, for tokio's AsyncFd.
struct LoggerFd(crate::bpf::loader::BpfLogger);

impl std::os::fd::AsRawFd for LoggerFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// Where the objects come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of Service/EndpointSlice manifests, watched by inotify
    /// (polled where it cannot be): polls at least `poll_interval` apart,
    /// a full rescan every `rescan_interval` (`None`: never).
    Files {
        dir: PathBuf,
        poll_interval: Duration,
        rescan_interval: Option<Duration>,
    },
    /// The Kubernetes API (in-cluster configuration or KUBECONFIG).
    Kubernetes,
}

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub source: SourceConfig,
    /// This node's name (required with the Kubernetes source): its Node
    /// object is watched, and traffic policies will tell local endpoints
    /// by it.
    pub node_name: Option<String>,
    /// Interfaces that get the TC ingress program (pod/host side).
    pub tc_ifaces: Vec<String>,
    /// Interfaces that get the XDP program (external side).
    pub xdp_ifaces: Vec<String>,
    pub xdp_mode: XdpAttachMode,
    /// Where the socket-level programs attach (a cgroup v2 directory);
    /// `None`: socket-level load balancing is off (and links a previous
    /// agent pinned for it are removed).
    pub socket_lb_cgroup: Option<PathBuf>,
    /// Load this object instead of the embedded one.
    pub bpf_object: Option<PathBuf>,
    /// Where `/healthz` and `/readyz` are served; `None` disables them.
    pub health_bind: Option<SocketAddr>,
    /// Where Prometheus `/metrics` is served; `None` disables it.
    pub metrics_bind: Option<SocketAddr>,
    /// How the datapath's series are read for `/metrics`.
    pub metrics: MetricsConfig,
    /// Compile the programs' decision logging in (aya-log) and forward it.
    pub bpf_debug_log: bool,
    /// How long a burst of changes may settle before a sync.
    pub debounce: Duration,
    /// Where maps and links are pinned (bpffs); `None`: nothing is pinned
    /// and the programs are detached when the agent exits.
    pub pin_root: Option<PathBuf>,
    /// Addresses NodePorts are served on; empty: every address of the
    /// node's interfaces but loopback and IPv6 link-local ones.
    pub node_ips: Vec<std::net::IpAddr>,
    /// The cluster's pod CIDRs (`--cluster-cidr`): sources inside the
    /// cluster, for the in-cluster view of external frontends.
    pub cluster_cidrs: Vec<(std::net::IpAddr, u8)>,
    /// The NodePort range (inclusive).
    pub node_port_range: (u16, u16),
    /// SNAT source ports (inclusive); `None`: chosen outside the node's
    /// ephemeral port range and the NodePort range.
    pub snat_port_range: Option<(u16, u16)>,
    /// The flood guard's new flows with state per CPU per second (0: no
    /// limit); see `dataplane_common::NEW_FLOWS_GLOBAL`.
    pub new_flows_per_cpu: u32,
    /// Translated packets go from TC straight to the FIB's egress
    /// interface (`--host-routing`).
    pub host_routing: bool,
    /// With host routing and socket-level load balancing, the packets of
    /// socket-translated connections are host-routed too
    /// (`--socket-host-routing`).
    pub socket_host_routing: bool,
    /// The source addresses for SNAT, at most one per family; a family
    /// without one: the first node address of that family.
    pub snat_ips: Vec<std::net::IpAddr>,
    /// Backend selection and Maglev table size.
    pub sync: SyncConfig,
    /// Capacities of the maps.
    pub map_sizes: crate::bpf::map_sizes::MapSizes,
    /// Conntrack timeouts (the other fields are filled in by the agent).
    pub datapath: DpConfig,
}

/// How `/metrics` reads the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// How often the datapath's series are read (their staleness).
    pub interval: Duration,
    /// Export the per-frontend series (`dataplane_service_*`, four per
    /// frontend).
    pub per_service: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            interval: crate::http::metrics::DEFAULT_INTERVAL,
            per_service: false,
        }
    }
}

/// Default for [`RunConfig::debounce`]: long enough to fold the events of
/// one `kubectl apply` (Service, then its slices) into one sync, short
/// enough to stay far below the 10 ms change-to-map target.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(2);

/// Clears `alive` when the loop ends, whichever way it ends.
struct AliveGuard<'a>(&'a AgentState);

impl Drop for AliveGuard<'_> {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Relaxed);
    }
}

/// The source-agnostic sync loop: runs until `shutdown` resolves or the
/// source fails for good.
/// Sleeps until `at`; forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

pub async fn sync_loop<S: Source, W: MapWriter>(
    source: &mut S,
    syncer: &mut Syncer<W>,
    node: &model::NodeInfo,
    state: &AgentState,
    debounce: Duration,
    mut health_checks: Option<&mut HealthCheckServers>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    state.alive.store(true, Ordering::Relaxed);
    let _alive = AliveGuard(state);
    let mut shutdown = std::pin::pin!(shutdown);
    // The node as the source describes it may change (its zone label).
    let mut node = node.clone();
    let mut incremental = model::Incremental::new(node.clone());
    let mut health_cache = model::HealthCache::default();
    // The problems reported (logged) so far, and the versions of the lists
    // they came from: while none moved, a sync skips the diff.
    let mut reported = BTreeSet::new();
    let mut reported_versions = None;
    let mut source_problems: Vec<model::Problem> = Vec::new();
    let mut source_version = model::next_version();
    loop {
        // Retired backend generations are deleted after their grace period
        // even when nothing else changes.
        let reap = syncer.next_reap();
        tokio::select! {
            r = source.changed() => r?,
            _ = sleep_until(reap) => {
                syncer.reap();
                state.set_programmed(syncer.entries());
                continue;
            }
            _ = &mut shutdown => return Ok(()),
        }
        if !debounce.is_zero() {
            // Changes arriving meanwhile are folded into this sync; their
            // notification may cause one more (then unchanged) sync.
            tokio::select! {
                _ = tokio::time::sleep(debounce) => {}
                _ = &mut shutdown => return Ok(()),
            }
        }
        let started = Instant::now();
        let Some((full, changed, eligible)) = source.view(|v| {
            let eligible = v.node.is_none_or(model::node_eligible);
            // A new zone changes every Service's topology: start over.
            let zone = v.node.and_then(model::node_zone);
            let rezoned = zone != node.zone;
            if rezoned {
                info!(zone = zone.as_deref().unwrap_or("<none>"), "this node's topology zone");
                node.zone = zone;
                incremental = model::Incremental::new(node.clone());
            }
            if health_checks.is_some() {
                health_cache.refresh(v.services, v.slices, &node, v.tracked.as_ref().filter(|_| !rezoned));
            }
            if v.problems != source_problems.as_slice() {
                source_problems = v.problems.to_vec();
                source_version = model::next_version();
            }
            match &v.tracked {
                // The source says what changed: recompute only that.
                Some(t) => {
                    let t = model::Tracked {
                        changed: t.changed.filter(|_| !rezoned),
                        ..*t
                    };
                    let changed = incremental.update(v.services, v.slices, &t);
                    (None, changed, eligible)
                }
                None => {
                    let d = model::compute_for_node(v.services, v.slices, &node);
                    (Some(d), None, eligible)
                }
            }
        }) else {
            continue; // initial lists not complete yet
        };
        if let Some(servers) = health_checks.as_deref_mut() {
            for e in servers.sync(health_cache.checks()).await {
                error!("{e}");
            }
        }
        if state.node_ineligible.swap(!eligible, Ordering::Relaxed) == eligible {
            match eligible {
                false => warn!(
                    "this Node is being deleted or tainted {}: /healthz answers 503 so that load balancers drain it",
                    model::TO_BE_DELETED_TAINT
                ),
                true => info!("this Node is eligible again: /healthz answers 200"),
            }
        }
        let desired = full.as_ref().unwrap_or_else(|| incremental.desired());
        let health_problems = health_cache.problems();
        let skipped = health_problems.len() + source_problems.len() + desired.problems.len();
        // Each problem once, when it appears (or its reason changes), not
        // at every sync; its end is said too. The lists are compared only
        // when one of them may have changed.
        let versions = full
            .is_none()
            .then(|| (health_cache.version(), source_version, incremental.problems_version()));
        if versions.is_none() || versions != reported_versions {
            let all = health_problems.iter().chain(&source_problems).chain(&desired.problems);
            let now: BTreeSet<model::Problem> = all.cloned().collect();
            for p in now.difference(&reported) {
                warn!(object = %p.object, "{}", p.reason);
            }
            for p in reported.difference(&now) {
                if !now.iter().any(|n| n.object == p.object) {
                    info!(object = %p.object, "no longer skipped: {}", p.reason);
                }
            }
            reported = now;
            reported_versions = versions;
        }
        let computed = started.elapsed();
        let report = match &changed {
            Some(keys) => syncer.apply_changed(desired, keys),
            None => syncer.apply(desired),
        };
        for e in &report.errors {
            error!("{e}");
        }
        state.set_programmed(syncer.entries());
        let sc = source.counters();
        state.watch_restarts.store(sc.watch_restarts, Ordering::Relaxed);
        state.relists.store(sc.relists, Ordering::Relaxed);
        state.skipped_objects.store(skipped as u64, Ordering::Relaxed);
        state.skipped_total.fetch_add(skipped as u64, Ordering::Relaxed);
        state
            .sync_errors
            .fetch_add(report.errors.len() as u64, Ordering::Relaxed);
        state.sync_duration.observe(started.elapsed());
        let syncs = state.syncs.fetch_add(1, Ordering::Relaxed) + 1;
        state.last_sync_ms.store(unix_ms(), Ordering::Relaxed);
        state.ready.store(true, Ordering::Relaxed);
        let backends = syncer.programmed_backends();
        info!(
            sync = syncs,
            frontends = syncer.programmed().len(),
            backends,
            added = report.added,
            updated = report.updated,
            removed = report.removed,
            unchanged = report.unchanged,
            errors = report.errors.len(),
            udp_flows_cleared = report.udp_flows_cleared,
            skipped,
            watch_restarts = sc.watch_restarts,
            relists = sc.relists,
            compute_us = computed.as_micros() as u64,
            elapsed_us = started.elapsed().as_micros() as u64,
            "sync applied"
        );
    }
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    info!(
        version = crate::version::VERSION,
        commit = crate::version::COMMIT,
        abi = crate::version::ABI,
        "{} starting",
        crate::version::describe()
    );
    let state = Arc::new(AgentState::default());
    // Bind first: a port conflict should stop the agent before it loads
    // anything.
    let health = match cfg.health_bind {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the health endpoints to {addr}"))?;
            info!(addr = %listener.local_addr()?, "serving /healthz, /livez and /readyz");
            Some(tokio::spawn(health::serve(listener, state.clone())))
        }
        None => None,
    };
    let metrics_listener = match cfg.metrics_bind {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics endpoint to {addr}"))?,
        ),
        None => None,
    };

    // The watchers start before the eBPF object is loaded: the initial
    // lists (about 0.3 s for 10,000 Services and their slices) then run on
    // the runtime's workers while this thread loads (about 0.2 s).
    let kube_source = match &cfg.source {
        SourceConfig::Kubernetes => {
            let node_name = cfg
                .node_name
                .as_deref()
                .context("the Kubernetes source needs the node name (--node-name or NODE_NAME)")?;
            Some(KubeSource::connect(node_name).await?)
        }
        SourceConfig::Files { .. } => None,
    };

    let snat_ports = crate::node::snat_ports(cfg.snat_port_range, cfg.node_port_range)?;
    info!(
        first = snat_ports.0,
        last = snat_ports.1,
        "SNAT source ports (outside the node's ephemeral ports and the NodePort range)"
    );
    if cfg.host_routing {
        info!("host routing on: translated packets go from TC straight to their egress interface, skipping netfilter (and NetworkPolicy enforced there)");
    }
    // Host routing for socket-level connections too: only with both on.
    let sock_routing = cfg.host_routing && cfg.socket_lb_cgroup.is_some() && cfg.socket_host_routing;
    let globals = Globals {
        snat_ports,
        new_flows_per_cpu: cfg.new_flows_per_cpu,
        host_routing: cfg.host_routing,
        sock_routing,
    };
    let pins = cfg.pin_root.clone().map(PinRoot::new);
    let (mut dp, adopted) = Dataplane::load_with(
        cfg.bpf_object.as_deref(),
        pins.clone(),
        &cfg.map_sizes,
        cfg.bpf_debug_log,
        globals,
    )
    .context("loading the eBPF programs")?;
    if dp.tc_reads_ip_summed() {
        info!(
            "TC updates L4 checksums itself (skb->ip_summed read through the kfunc bpf_cast_to_kern_ctx); \
             CHECKSUM_COMPLETE skbs through bpf_l4_csum_replace"
        );
    } else {
        let why = crate::bpf::kfunc::skb_summed()
            .missing
            .unwrap_or("the kernel refused the TC program reading it (see the warning above)");
        info!(reason = why, "TC updates every L4 checksum through bpf_l4_csum_replace");
    }
    // The programs' decision log (--bpf-debug-log), forwarded to our log.
    let bpf_log = if cfg.bpf_debug_log {
        let logger = dp.take_logger()?;
        // SAFETY: the fd stays open as long as the AsyncFd owns the logger,
        // and nothing else registers it.
        let mut fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(LoggerFd(logger), tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow::anyhow!("watching the programs' log buffer: {}", e.into_parts().1))?;
        info!("eBPF decision logging on (--bpf-debug-log): one line per new flow, reject and range drop");
        Some(tokio::spawn(async move {
            loop {
                let Ok(mut ready) = fd.readable_mut().await else { return };
                // The logger drains the ring buffer; records go through `log`.
                ready.get_inner_mut().0.flush();
                ready.clear_ready();
            }
        }))
    } else {
        None
    };
    let mut maps = dp.take_maps()?;
    let metrics = match metrics_listener {
        Some(listener) => {
            let reader = crate::inspect::reopen(&maps).context("opening the maps for the metrics")?;
            let capacities = crate::inspect::capacities(&reader).context("reading the maps' sizes for the metrics")?;
            info!(
                addr = %listener.local_addr()?,
                interval_ms = cfg.metrics.interval.as_millis() as u64,
                per_service = cfg.metrics.per_service,
                "serving /metrics (datapath series read every interval_ms)"
            );
            let refresh = crate::http::metrics::Refresh {
                maps: reader,
                interval: cfg.metrics.interval,
                per_service: cfg.metrics.per_service,
            };
            Some(tokio::spawn(crate::http::metrics::serve(
                listener,
                state.clone(),
                Some((refresh, capacities)),
            )))
        }
        None => None,
    };
    if adopted {
        let previous = maps.config.get(&0, 0).context("reading the pinned configuration")?;
        if previous.abi_version != 0 && previous.abi_version != ABI_VERSION {
            anyhow::bail!(
                "the pinned maps under {} were written by an agent with map layout version {}, this agent has {}; \
                 run `dataplane cleanup` (established connections through this node lose their conntrack entries) \
                 or run the matching version",
                cfg.pin_root
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                previous.abi_version,
                ABI_VERSION
            );
        }
    }

    let node_ips = if cfg.node_ips.is_empty() {
        crate::node::local_addresses().context("listing the node's addresses")?
    } else {
        cfg.node_ips.clone()
    };
    let snat_for = |v6: bool| {
        let first = |ips: &[std::net::IpAddr]| ips.iter().find(|ip| ip.is_ipv6() == v6).copied();
        first(&cfg.snat_ips).or_else(|| first(&node_ips))
    };
    let (snat_ip, snat_ip6) = (snat_for(false), snat_for(true));
    let node = model::NodeInfo {
        name: cfg.node_name.clone(),
        addresses: node_ips.clone(),
        node_port_range: cfg.node_port_range,
        zone: None,
    };
    info!(addresses = ?node_ips, snat = ?snat_ip, snat6 = ?snat_ip6, "node addresses (NodePorts, SNAT)");
    let datapath = DpConfig {
        abi_version: ABI_VERSION,
        snat_addr: snat_ip.map_or(0, |ip| dataplane_common::addr_of(ip).0[0]),
        snat_addr6: snat_ip6.map_or([0; 4], |ip| dataplane_common::addr_of(ip).0),
        ..cfg.datapath
    };
    maps.write_config(&datapath)?;
    maps.write_cluster_cidrs(&cfg.cluster_cidrs)?;
    let cidrs: Vec<String> = cfg.cluster_cidrs.iter().map(|(a, l)| format!("{a}/{l}")).collect();
    info!(
        ?cidrs,
        "cluster CIDRs: their sources reach Local-policy external frontends through every endpoint"
    );

    let mut syncer = if adopted {
        let (syncer, report) =
            Syncer::adopt(maps, cfg.sync).map_err(|e| anyhow::anyhow!("adopting the pinned maps: {e}"))?;
        info!(
            frontends = report.frontends,
            backends = report.backends,
            stale_removed = report.stale_removed,
            backend_filter_set = report.backend_filter_set,
            frontends_cached = report.frontends_cached,
            frontend_filter_bits = report.frontend_filter_bits,
            "adopted the pinned maps of a previous agent"
        );
        syncer
    } else {
        // Nothing pinned was adopted: the maps were created by this load.
        Syncer::with_config(maps, cfg.sync).with_fresh_maps()
    };
    syncer.set_max_services(cfg.map_sizes.services);
    // Before the programs are attached: they find the endpoints of what is
    // programmed already (adopted) from their first packet on.
    let endpoints = syncer
        .track_endpoints(sock_routing)
        .map_err(|e| anyhow::anyhow!("writing the endpoint set ({}): {e}", map_names::ENDPOINTS))?;
    if sock_routing {
        info!(
            endpoints,
            "host routing for socket-level connections: packets to and from Service endpoints go from TC straight to their egress interface"
        );
    }
    syncer.set_cluster_cidr_entries(cfg.cluster_cidrs.iter().collect::<BTreeSet<_>>().len());
    state.set_programmed(syncer.entries());

    let mut attacher = ifwatch::Attacher::new(cfg.tc_ifaces.clone(), cfg.xdp_ifaces.clone(), cfg.xdp_mode);
    attacher.reconcile(&mut dp, pins.as_ref(), true)?;
    match (&cfg.socket_lb_cgroup, pins.as_ref()) {
        (Some(cgroup), _) => {
            let attached = dp
                .attach_socket_lb(cgroup)
                .context("attaching the socket-level programs")?;
            let how = attached.first().map(|(_, a)| a.to_string()).unwrap_or_default();
            let hooks: Vec<&str> = attached.iter().map(|(h, _)| *h).collect();
            info!(
                cgroup = %cgroup.display(),
                hooks = ?hooks,
                "socket-level load balancing attached ({how})"
            );
        }
        (None, Some(pins)) => {
            let removed = pins.unpin_socket_links()?;
            if !removed.is_empty() {
                info!(hooks = ?removed, "socket-level load balancing is off: removed the links a previous agent pinned");
            }
        }
        (None, None) => {}
    }
    // Every program now runs from this agent's object: the maps of a
    // migration are the live ones, and the old ones can go.
    if let Some(migration) = dp.take_migration() {
        let reload = migration.dual_conntrack();
        let moved: Vec<&str> = migration.moves.iter().map(|m| m.map).collect();
        let lost: usize = migration.copied.iter().map(|c| c.lost).sum();
        let kept: usize = migration.copied.iter().map(|c| c.kept).sum();
        state.migration_lost.fetch_add(lost as u64, Ordering::Relaxed);
        migration
            .finish()
            .context("finishing the migration of the pinned maps")?;
        info!(
            maps = ?moved,
            entries = kept,
            lost,
            "pinned maps migrated with their entries; every program now uses the new maps"
        );
        if reload {
            // The programs still look up the old conntrack map on a miss:
            // load them again without that, and swap them in the same way.
            let (mut fresh, _) = Dataplane::load_with(
                cfg.bpf_object.as_deref(),
                pins.clone(),
                &cfg.map_sizes,
                cfg.bpf_debug_log,
                globals,
            )
            .context("loading the eBPF programs again after the migration")?;
            let mut fresh_attacher =
                ifwatch::Attacher::new(cfg.tc_ifaces.clone(), cfg.xdp_ifaces.clone(), cfg.xdp_mode);
            fresh_attacher.reconcile(&mut fresh, pins.as_ref(), false)?;
            if let Some(cgroup) = &cfg.socket_lb_cgroup {
                fresh
                    .attach_socket_lb(cgroup)
                    .context("attaching the socket-level programs")?;
            }
            dp = fresh;
            attacher = fresh_attacher;
            info!("programs loaded again without the migration's look-ups in the old conntrack map");
        }
    }
    if cfg.tc_ifaces.is_empty() && cfg.xdp_ifaces.is_empty() {
        if cfg.socket_lb_cgroup.is_some() {
            info!("no interface attached: only sockets in the cgroup are load-balanced, no packet is translated");
        } else {
            warn!("no interface attached (--no-attach): the maps are programmed but no traffic is translated");
        }
    }

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    };
    // Interfaces come and go (pods): follow netlink link notifications.
    let (link_tx, mut link_rx) = tokio::sync::mpsc::channel(16);
    if !cfg.tc_ifaces.is_empty() || !cfg.xdp_ifaces.is_empty() {
        ifwatch::watch_links(link_tx).context("subscribing to netlink link notifications")?;
    }
    let follow_links = async {
        while link_rx.recv().await.is_some() {
            // One rescan covers a burst of notifications.
            while link_rx.try_recv().is_ok() {}
            if let Err(e) = attacher.reconcile(&mut dp, pins.as_ref(), false) {
                warn!("following interfaces: {e}");
            }
        }
        std::future::pending::<()>().await
    };
    // healthCheckNodePorts on every address, as kube-proxy serves them.
    let mut health_checks = HealthCheckServers::new(std::net::Ipv4Addr::UNSPECIFIED.into(), state.clone());
    let sync = async {
        match (&cfg.source, kube_source) {
            (_, Some(mut source)) => {
                sync_loop(
                    &mut source,
                    &mut syncer,
                    &node,
                    &state,
                    cfg.debounce,
                    Some(&mut health_checks),
                    shutdown,
                )
                .await
            }
            (
                SourceConfig::Files {
                    dir,
                    poll_interval,
                    rescan_interval,
                },
                None,
            ) => {
                info!(dir = %dir.display(), "watching manifests");
                let mut source = PolledFiles::new(dir, *poll_interval, *rescan_interval);
                if source.watching() {
                    info!(
                        full_rescan_s = rescan_interval.map_or(0, |r| r.as_secs()),
                        "changes detected by inotify"
                    );
                }
                sync_loop(
                    &mut source,
                    &mut syncer,
                    &node,
                    &state,
                    cfg.debounce,
                    Some(&mut health_checks),
                    shutdown,
                )
                .await
            }
            (SourceConfig::Kubernetes, None) => unreachable!("connected above"),
        }
    };
    let result = tokio::select! {
        r = sync => r,
        _ = follow_links => unreachable!("follow_links never ends"),
    };
    if let Some(h) = health {
        h.abort();
    }
    if let Some(h) = bpf_log {
        h.abort();
    }
    if let Some(m) = metrics {
        m.abort();
    }
    if pins.is_some() {
        info!("shutting down; pinned programs stay attached and keep serving (`dataplane cleanup` removes them)");
    } else {
        info!("shutting down: detaching programs");
    }
    drop(syncer);
    drop(dp);
    result
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| d.as_millis() as u64)
}
