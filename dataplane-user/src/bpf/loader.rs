//! Loading the eBPF object and attaching its programs to interfaces.

use std::{
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink},
        xdp::XdpLink,
        CgroupAttachMode, CgroupSock, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use dataplane_common::kernel_features;
use dataplane_common::{
    map_names, map_shapes, program_names, AffinityKey, AffinityValue, Backend, BackendKey, CtKey, CtValue, DpConfig,
    MaglevChunk, MaglevKey, ServiceKey, ServiceName, ServiceStats, ServiceValue, SockAffinityKey, SockNatKey,
    SockNatValue, SourceRangeKey, VipFilter, CLUSTER_CIDRS_V4, CLUSTER_CIDRS_V6, CT_MIGRATE_GLOBAL, CT_PREV_MAP,
    DEBUG_GLOBAL, DEFAULT_NEW_FLOWS_PER_CPU, DEFAULT_SNAT_PORTS, HOST_ROUTING_GLOBAL, KERNEL_GLOBAL, NEW_FLOWS_GLOBAL,
    SKB_SUMMED_GLOBAL, SNAT_PORTS_GLOBAL, SOCK_ROUTING_GLOBAL,
};
use thiserror::Error;

use crate::bpf::{
    kernel, kfunc,
    map_sizes::MapSizes,
    pin::{PinError, PinRoot},
};

/// The object built by `cargo xtask build-ebpf`, embedded at compile time
/// (empty if it was not built before this crate).
static EMBEDDED_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane.bpf.o"));

/// The eBPF object's bytes: the file at `path`, else the embedded one.
fn object_bytes(path: Option<&Path>) -> Result<std::borrow::Cow<'static, [u8]>, LoadError> {
    match path {
        Some(p) => std::fs::read(p)
            .map(std::borrow::Cow::Owned)
            .map_err(|source| LoadError::Read {
                path: p.display().to_string(),
                source,
            }),
        None if EMBEDDED_OBJECT.is_empty() => Err(LoadError::NoObject),
        None => Ok(std::borrow::Cow::Borrowed(EMBEDDED_OBJECT)),
    }
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(
        "no eBPF object: this binary was built before `cargo xtask build-ebpf`; \
         run `cargo xtask build-ebpf` and rebuild, or pass --bpf-object PATH"
    )]
    NoObject,
    #[error("reading eBPF object {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("loading eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("eBPF object: {0}")]
    Object(String),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {0} is missing from the eBPF object (object and agent from different versions?)")]
    MissingMap(&'static str),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    Migrate(#[from] Box<crate::bpf::migrate::MigrateError>),
    #[error("reading the programs' log records: {0}")]
    Logger(String),
    #[error("attaching {program} to interface {iface}: {source}")]
    Attach {
        program: &'static str,
        iface: String,
        source: aya::programs::ProgramError,
    },
    #[error("socket-level load balancing (--socket-lb-cgroup): {0}")]
    SocketLb(#[from] crate::bpf::cgroup::CgroupError),
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttachMode {
    /// Let the kernel choose (native when the driver supports it).
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode.
    Generic,
}

impl From<XdpAttachMode> for XdpMode {
    fn from(m: XdpAttachMode) -> Self {
        match m {
            XdpAttachMode::Auto => XdpMode::Default,
            XdpAttachMode::Native => XdpMode::Driver,
            XdpAttachMode::Generic => XdpMode::Skb,
        }
    }
}

/// Typed handles on the dataplane's maps.
pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, BackendKey, Backend>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub maglev: HashMap<MapData, MaglevKey, MaglevChunk>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub config: Array<MapData, DpConfig>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    pub names: HashMap<MapData, u32, ServiceName>,
    pub service_stats: PerCpuArray<MapData, ServiceStats>,
    pub reasons: PerCpuArray<MapData, u64>,
    pub sock_nat: HashMap<MapData, SockNatKey, SockNatValue>,
    pub sock_affinity: HashMap<MapData, SockAffinityKey, AffinityValue>,
    pub sock_stats: PerCpuArray<MapData, u64>,
    pub ct_events: PerCpuArray<MapData, u64>,
    pub route_events: PerCpuArray<MapData, u64>,
    pub vip_filter: Array<MapData, VipFilter>,
    pub backend_filter: Array<MapData, dataplane_common::BackendFilter>,
    /// The endpoint set (see `reconcile::endpoints`).
    pub endpoints: HashMap<MapData, dataplane_common::EndpointKey, u8>,
    pub frontend_cache: Array<MapData, dataplane_common::FrontendBucket>,
    pub frontend_filter: Array<MapData, dataplane_common::FrontendFilter>,
    /// The flood guard's reply entries of flows without state (never
    /// pinned: this object's own; `None` when the maps were opened from
    /// their pins, as the CLI does).
    pub ct_syn: Option<HashMap<MapData, CtKey, CtValue>>,
}

impl Maps {
    /// Takes the datapath maps out of a loaded object (the agent's, or any
    /// object built from the same map definitions, like the benchmarks').
    pub fn take(ebpf: &mut Ebpf) -> Result<Maps, LoadError> {
        fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, LoadError> {
            ebpf.take_map(name).ok_or(LoadError::MissingMap(name))
        }
        let e = ebpf;
        let m = |name: &'static str| move |source| LoadError::Map { name, source };
        Ok(Maps {
            services: HashMap::try_from(take(e, map_names::SERVICES)?).map_err(m(map_names::SERVICES))?,
            backends: HashMap::try_from(take(e, map_names::BACKENDS)?).map_err(m(map_names::BACKENDS))?,
            conntrack: HashMap::try_from(take(e, map_names::CONNTRACK)?).map_err(m(map_names::CONNTRACK))?,
            maglev: HashMap::try_from(take(e, map_names::MAGLEV)?).map_err(m(map_names::MAGLEV))?,
            affinity: HashMap::try_from(take(e, map_names::AFFINITY)?).map_err(m(map_names::AFFINITY))?,
            config: Array::try_from(take(e, map_names::CONFIG)?).map_err(m(map_names::CONFIG))?,
            names: HashMap::try_from(take(e, map_names::NAMES)?).map_err(m(map_names::NAMES))?,
            source_ranges: LpmTrie::try_from(take(e, map_names::SOURCE_RANGES)?)
                .map_err(m(map_names::SOURCE_RANGES))?,
            service_stats: PerCpuArray::try_from(take(e, map_names::SERVICE_STATS)?)
                .map_err(m(map_names::SERVICE_STATS))?,
            reasons: PerCpuArray::try_from(take(e, map_names::REASON_STATS)?).map_err(m(map_names::REASON_STATS))?,
            sock_nat: HashMap::try_from(take(e, map_names::SOCK_NAT)?).map_err(m(map_names::SOCK_NAT))?,
            sock_affinity: HashMap::try_from(take(e, map_names::SOCK_AFFINITY)?)
                .map_err(m(map_names::SOCK_AFFINITY))?,
            sock_stats: PerCpuArray::try_from(take(e, map_names::SOCK_STATS)?).map_err(m(map_names::SOCK_STATS))?,
            ct_events: PerCpuArray::try_from(take(e, map_names::CT_EVENTS)?).map_err(m(map_names::CT_EVENTS))?,
            route_events: PerCpuArray::try_from(take(e, map_names::ROUTE_EVENTS)?)
                .map_err(m(map_names::ROUTE_EVENTS))?,
            vip_filter: Array::try_from(take(e, map_names::VIP_FILTER)?).map_err(m(map_names::VIP_FILTER))?,
            backend_filter: Array::try_from(take(e, map_names::BACKEND_FILTER)?)
                .map_err(m(map_names::BACKEND_FILTER))?,
            endpoints: HashMap::try_from(take(e, map_names::ENDPOINTS)?).map_err(m(map_names::ENDPOINTS))?,
            frontend_cache: Array::try_from(take(e, map_names::FRONTEND_CACHE)?)
                .map_err(m(map_names::FRONTEND_CACHE))?,
            frontend_filter: Array::try_from(take(e, map_names::FRONTEND_FILTER)?)
                .map_err(m(map_names::FRONTEND_FILTER))?,
            ct_syn: Some(HashMap::try_from(take(e, map_names::CT_SYN)?).map_err(m(map_names::CT_SYN))?),
        })
    }

    /// Writes the datapath settings (conntrack timeouts).
    pub fn write_config(&mut self, config: &DpConfig) -> Result<(), LoadError> {
        self.config.set(0, config, 0).map_err(|source| LoadError::Map {
            name: map_names::CONFIG,
            source,
        })
    }

    /// Makes the cluster's pod CIDRs in `DP_SRC_RANGES` (under the reserved
    /// ids `CLUSTER_CIDRS_V4` / `CLUSTER_CIDRS_V6`) exactly `cidrs`:
    /// entries a previous agent wrote for other CIDRs are removed.
    pub fn write_cluster_cidrs(&mut self, cidrs: &[(std::net::IpAddr, u8)]) -> Result<(), LoadError> {
        let err = |source| LoadError::Map {
            name: map_names::SOURCE_RANGES,
            source,
        };
        let key = |(ip, len): (std::net::IpAddr, u8)| {
            let id = if ip.is_ipv6() {
                CLUSTER_CIDRS_V6
            } else {
                CLUSTER_CIDRS_V4
            };
            aya::maps::lpm_trie::Key::new(
                32 + len as u32,
                SourceRangeKey::new(id, dataplane_common::addr_of(ip).0),
            )
        };
        let want: Vec<_> = cidrs.iter().map(|c| key(*c)).collect();
        let same = |a: &aya::maps::lpm_trie::Key<SourceRangeKey>, b: &aya::maps::lpm_trie::Key<SourceRangeKey>| {
            a.prefix_len() == b.prefix_len() && a.data() == b.data()
        };
        let stale: Vec<_> = self
            .source_ranges
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?
            .into_iter()
            .filter(|k| {
                let id = u32::from_be(k.data().service_id_be);
                (id == CLUSTER_CIDRS_V4 || id == CLUSTER_CIDRS_V6) && !want.iter().any(|w| same(w, k))
            })
            .collect();
        for k in &stale {
            self.source_ranges.remove(k).map_err(err)?;
        }
        for k in &want {
            self.source_ranges.insert(k, 1, 0).map_err(err)?;
        }
        Ok(())
    }
}

/// A loaded dataplane: programs in the kernel, maps open.
///
/// Without pins, dropping it detaches every program it attached. With pins
/// (`load_pinned`), maps and links live in bpffs: programs stay attached
/// when the agent exits, and the next agent adopts them.
pub struct Dataplane {
    ebpf: Ebpf,
    pins: Option<PinRoot>,
    /// Whether the socket-level programs were loaded (on first attach).
    sock_loaded: bool,
    /// Whether the sock_release program loaded (see `load_socket_programs`).
    sock_release: bool,
    /// The XDP program this kernel took: `program_names::XDP`, or
    /// `XDP_NO_FRAGS` before 5.18.
    xdp: &'static str,
    /// Pinned maps of another size or layout being migrated: copied into
    /// the new maps at load, finished once the programs are swapped.
    migration: Option<crate::bpf::migrate::Migration>,
    /// Whether TC reads `skb->ip_summed` (`kernel_features::SKB_SUMMED`,
    /// `bpf::kfunc`) in the programs loaded.
    tc_reads_ip_summed: bool,
}

/// Loads the XDP program with frags support, or, when the kernel refuses
/// that (before 5.18: EINVAL for the flag), the same code without it
/// (`frags`, `no_frags`: the two programs). Returns the name of the one
/// loaded.
fn load_xdp(
    frags: &mut aya::programs::Program,
    no_frags: &mut aya::programs::Program,
) -> Result<&'static str, LoadError> {
    let mut first = None;
    for (name, p) in [(program_names::XDP, frags), (program_names::XDP_NO_FRAGS, no_frags)] {
        let p: &mut Xdp = p.try_into().map_err(|source| LoadError::Program { name, source })?;
        match retry_eagain(|| p.load()) {
            Ok(()) if first.is_none() => return Ok(name),
            Ok(()) => {
                tracing::warn!(
                    refused = %first.unwrap_or_default(),
                    "this kernel refuses XDP with frags support (5.18+); loaded {name} instead: it cannot attach to an interface whose MTU needs more than one buffer per frame"
                );
                return Ok(name);
            }
            Err(source) if first.is_none() => first = Some(format!("{name}: {source}")),
            Err(source) => return Err(LoadError::Program { name, source }),
        }
    }
    unreachable!("the loop returns on its second program")
}

/// Loads the TC program.
fn load_tc(p: &mut aya::programs::Program) -> Result<(), LoadError> {
    let name = program_names::TC;
    let p: &mut SchedClassifier = p.try_into().map_err(|source| LoadError::Program { name, source })?;
    retry_eagain(|| p.load()).map_err(|source| LoadError::Program { name, source })
}

/// Loads the XDP and the TC program side by side, on two threads: each is
/// a few hundred milliseconds of verifier work on one CPU (more on an
/// older kernel), on the critical path of every start. The kernel verifies
/// a privileged process's programs concurrently. Returns the name of the
/// XDP program loaded ([`load_xdp`]).
fn load_datapath_programs(ebpf: &mut Ebpf) -> Result<&'static str, LoadError> {
    let (mut frags, mut no_frags, mut tc) = (None, None, None);
    for (name, p) in ebpf.programs_mut() {
        match name {
            n if n == program_names::XDP => frags = Some(p),
            n if n == program_names::XDP_NO_FRAGS => no_frags = Some(p),
            n if n == program_names::TC => tc = Some(p),
            _ => {}
        }
    }
    let missing = |name| LoadError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    };
    let frags = frags.ok_or_else(|| missing(program_names::XDP))?;
    let no_frags = no_frags.ok_or_else(|| missing(program_names::XDP_NO_FRAGS))?;
    let tc = tc.ok_or_else(|| missing(program_names::TC))?;
    std::thread::scope(|scope| {
        let tc = scope.spawn(move || load_tc(tc));
        let xdp = load_xdp(frags, no_frags);
        let tc = tc.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let xdp = xdp?;
        tc?;
        Ok(xdp)
    })
}

/// This kernel's [`kfunc::SkbSummed`]; unit tests may put another in its
/// place (`SUMMED_OVERRIDE`).
fn skb_summed_for_load() -> kfunc::SkbSummed {
    #[cfg(test)]
    if let Some(s) = SUMMED_OVERRIDE.with(|o| o.get()) {
        return s;
    }
    kfunc::skb_summed()
}

#[cfg(test)]
thread_local! {
    static SUMMED_OVERRIDE: std::cell::Cell<Option<kfunc::SkbSummed>> = const { std::cell::Cell::new(None) };
}

/// Pins a new link at `pin`, so that it outlives the agent.
fn pin_link(fd: FdLink, pin: &Path) -> Result<(), LoadError> {
    fd.pin(pin).map(drop).map_err(|e| pin_error(pin, e))
}

fn pin_error(pin: &Path, e: impl std::fmt::Display) -> LoadError {
    LoadError::Pin(PinError::Io {
        path: pin.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Retries a program load that failed with EAGAIN: the verifier gives up
/// with EAGAIN when a signal is pending for the loading thread (a child
/// process exiting, for instance), and succeeds when simply run again, as
/// libbpf does.
fn retry_eagain(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    let mut tries = 0;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < 5 =>
            {
                tries += 1;
            }
            other => return other,
        }
    }
}

/// The programs' aya-log records (with `--bpf-debug-log`), to be read when
/// its fd is readable.
pub type BpfLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// How a program got attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    pub mode: AttachMode,
    /// A pinned link from a previous agent had its program replaced
    /// atomically (no moment without a program).
    pub replaced: bool,
    /// The link is pinned and survives the agent.
    pub pinned: bool,
}

impl std::fmt::Display for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.mode {
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "clsact",
            AttachMode::XdpLink => "XDP link",
            AttachMode::XdpNetlink => "XDP (netlink)",
            AttachMode::CgroupLink => "cgroup link",
        })?;
        if self.replaced {
            f.write_str(", pinned link adopted, program replaced atomically")
        } else if self.pinned {
            f.write_str(", link pinned")
        } else {
            Ok(())
        }
    }
}

/// Settings the programs read as constants, fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Globals {
    /// SNAT source ports, inclusive (`SNAT_PORTS_GLOBAL`).
    pub snat_ports: (u16, u16),
    /// The flood guard's new flows with state per CPU per second, 0 for
    /// no limit (`NEW_FLOWS_GLOBAL`).
    pub new_flows_per_cpu: u32,
    /// Translated packets go from TC straight to the FIB's egress
    /// interface (`HOST_ROUTING_GLOBAL`; off by default, as
    /// `--host-routing`).
    pub host_routing: bool,
    /// With `host_routing`, the packets of connections the socket-level
    /// programs translated are host-routed too (`SOCK_ROUTING_GLOBAL`;
    /// the agent sets it when socket-level load balancing is on as well,
    /// and keeps the endpoint set).
    pub sock_routing: bool,
}

impl Default for Globals {
    fn default() -> Self {
        Globals {
            snat_ports: DEFAULT_SNAT_PORTS,
            new_flows_per_cpu: DEFAULT_NEW_FLOWS_PER_CPU,
            host_routing: false,
            sock_routing: false,
        }
    }
}

impl Dataplane {
    /// Loads the embedded object, or the one at `path`, with maps of its
    /// own (nothing pinned).
    pub fn load(path: Option<&Path>) -> Result<Self, LoadError> {
        Self::load_inner(
            path,
            None,
            &MapSizes::default(),
            false,
            Globals::default(),
            None,
            kernel::features(),
        )
    }

    /// As `load`, with the given map capacities.
    /// [`Self::load`] of the embedded object with only the `features` of
    /// this kernel's (`kernel_features` bits; tests take the paths of
    /// older kernels with it) and the load-time settings `globals`.
    pub fn load_with_features(features: u32, globals: Globals) -> Result<Self, LoadError> {
        let features = features & kernel::features();
        Self::load_inner(None, None, &MapSizes::default(), false, globals, None, features)
    }

    pub fn load_sized(path: Option<&Path>, sizes: &MapSizes) -> Result<Self, LoadError> {
        Self::load_inner(path, None, sizes, false, Globals::default(), None, kernel::features())
    }

    /// Loads the object with its maps pinned under `pins` (adopting maps
    /// pinned by a previous agent after checking their shapes). Returns
    /// whether pinned maps were adopted.
    pub fn load_pinned(path: Option<&Path>, pins: PinRoot) -> Result<(Self, bool), LoadError> {
        Self::load_with(path, Some(pins), &MapSizes::default(), false, Globals::default())
    }

    /// As `load_pinned`, with the given map capacities: pinned maps of
    /// another size are refused.
    pub fn load_pinned_with(path: Option<&Path>, pins: PinRoot, sizes: &MapSizes) -> Result<(Self, bool), LoadError> {
        Self::load_with(path, Some(pins), sizes, false, Globals::default())
    }

    /// The general form: pinned or not, with the given map capacities,
    /// with the programs' decision logging compiled in (`debug_log`; read
    /// it with [`Dataplane::take_logger`]) or removed by the verifier, and
    /// the settings fixed at load time (`globals`).
    /// Pinned maps of other capacities are migrated (see
    /// [`crate::bpf::migrate`]): their entries are in the new maps when
    /// this returns, and [`Dataplane::take_migration`] gives what remains
    /// to do once the programs are attached. Returns whether pinned maps
    /// were adopted.
    pub fn load_with(
        path: Option<&Path>,
        pins: Option<PinRoot>,
        sizes: &MapSizes,
        debug_log: bool,
        globals: Globals,
    ) -> Result<(Self, bool), LoadError> {
        let (adopted, migration) = match &pins {
            Some(p) => {
                let adopted = p.prepare()?;
                let defs = crate::bpf::migrate::object_map_defs(&object_bytes(path)?).map_err(LoadError::Object)?;
                let migration = crate::bpf::migrate::prepare(p, sizes, &defs).map_err(Box::new)?;
                p.check_maps_with(sizes)?;
                (adopted, migration)
            }
            None => (false, None),
        };
        // Conntrack migrating to another size: the new programs also read
        // and write the old map until every link runs them.
        let ct_prev = match (&migration, &pins) {
            (Some(m), Some(p)) if m.dual_conntrack() => Some(crate::bpf::migrate::old_map(p, map_names::CONNTRACK)),
            _ => None,
        };
        let mut dp = Self::load_inner(
            path,
            pins,
            sizes,
            debug_log,
            globals,
            ct_prev.as_deref(),
            kernel::features(),
        )?;
        let mut migration = migration;
        if let Some(m) = &mut migration {
            if !m.swapped {
                m.copy().map_err(Box::new)?;
            }
        }
        dp.migration = migration;
        Ok((dp, adopted))
    }

    /// The migration of pinned maps this load started, if any: call
    /// [`crate::bpf::migrate::Migration::finish`] once every program is
    /// attached.
    pub fn take_migration(&mut self) -> Option<crate::bpf::migrate::Migration> {
        self.migration.take()
    }

    /// The reader of the programs' log records (only with `debug_log`).
    pub fn take_logger(&mut self) -> Result<BpfLogger, LoadError> {
        aya_log::EbpfLogger::init(&mut self.ebpf).map_err(|e| LoadError::Logger(e.to_string()))
    }

    fn load_inner(
        path: Option<&Path>,
        pins: Option<PinRoot>,
        sizes: &MapSizes,
        debug_log: bool,
        globals: Globals,
        ct_prev: Option<&Path>,
        features: u32,
    ) -> Result<Self, LoadError> {
        let object = object_bytes(path)?;
        // The kfunc placeholders of TC's checksum updates: resolved where
        // this kernel has the kfunc and the caller did not take it away.
        let summed = skb_summed_for_load();
        let summed = if features & kernel_features::SKB_SUMMED != 0 {
            summed
        } else {
            Default::default()
        };
        let object = kfunc::patch_object(&object, summed.kfunc_id).map_err(LoadError::Object)?;
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&'static str, PathBuf)> = match &pins {
            Some(p) => map_shapes::ALL.iter().map(|s| (s.name, p.map(s.name))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let debug: u8 = debug_log.into();
        loader.override_global(DEBUG_GLOBAL, &debug, true);
        let migrating: u8 = ct_prev.is_some().into();
        loader.override_global(CT_MIGRATE_GLOBAL, &migrating, true);
        loader.override_global(KERNEL_GLOBAL, &features, true);
        loader.override_global(SKB_SUMMED_GLOBAL, &summed.global, true);
        let snat = globals.snat_ports.0 as u32 | (globals.snat_ports.1 as u32) << 16;
        loader.override_global(SNAT_PORTS_GLOBAL, &snat, true);
        loader.override_global(NEW_FLOWS_GLOBAL, &globals.new_flows_per_cpu, true);
        let host_routing: u8 = globals.host_routing.into();
        loader.override_global(HOST_ROUTING_GLOBAL, &host_routing, true);
        let sock_routing: u8 = (globals.host_routing && globals.sock_routing).into();
        loader.override_global(SOCK_ROUTING_GLOBAL, &sock_routing, true);
        if let Some(old) = ct_prev {
            loader.map_pin_path(CT_PREV_MAP, old);
        }
        for shape in &map_shapes::ALL {
            if let Some(n) = sizes.max_entries(shape.name) {
                loader.map_max_entries(shape.name, n);
            }
        }
        let mut ebpf = loader.load(&object)?;
        let xdp = match load_datapath_programs(&mut ebpf) {
            // The probe program read the field, but this kernel's verifier
            // refused how the TC program does it: the helper's path, which
            // every kernel takes, rather than no dataplane.
            Err(LoadError::Program { name, source }) if name == program_names::TC && summed.global != 0 => {
                tracing::warn!(
                    error = %source,
                    "this kernel refused the TC program reading skb->ip_summed: loading it again with every L4 checksum through bpf_l4_csum_replace"
                );
                drop(ebpf);
                let features = features & !kernel_features::SKB_SUMMED;
                return Self::load_inner(path, pins, sizes, debug_log, globals, ct_prev, features);
            }
            r => r?,
        };
        Ok(Dataplane {
            ebpf,
            pins,
            sock_loaded: false,
            sock_release: false,
            xdp,
            migration: None,
            tc_reads_ip_summed: summed.global != 0,
        })
    }

    /// Whether TC reads `skb->ip_summed` and updates L4 checksums itself
    /// (see `bpf::kfunc`), or calls `bpf_l4_csum_replace` for every rewrite.
    pub fn tc_reads_ip_summed(&self) -> bool {
        self.tc_reads_ip_summed
    }

    /// The name of the XDP program this kernel took (`program_names::XDP`,
    /// or `XDP_NO_FRAGS` on kernels before 5.18).
    pub fn xdp_program(&self) -> &'static str {
        self.xdp
    }

    pub fn pins(&self) -> Option<&PinRoot> {
        self.pins.as_ref()
    }

    /// Takes the maps out of the object (once).
    pub fn take_maps(&mut self) -> Result<Maps, LoadError> {
        Maps::take(&mut self.ebpf)
    }

    /// Tells the programs the kinds of the namespace's interfaces
    /// (`map_names::IFACES`: ifindex -> `IFACE_F_*` bits): writes `kinds`
    /// and removes every other interface's entry.
    pub fn set_interface_kinds(&mut self, kinds: &[(u32, u32)]) -> Result<(), LoadError> {
        let name = map_names::IFACES;
        let map = self.ebpf.map_mut(name).ok_or(LoadError::MissingMap(name))?;
        let mut map: aya::maps::HashMap<_, u32, u32> =
            aya::maps::HashMap::try_from(map).map_err(|source| LoadError::Map { name, source })?;
        let stale: Vec<u32> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !kinds.iter().any(|(i, _)| i == k))
            .collect();
        for k in stale {
            // Gone meanwhile is fine.
            let _ = map.remove(&k);
        }
        for (ifindex, flags) in kinds {
            map.insert(ifindex, flags, 0)
                .map_err(|source| LoadError::Map { name, source })?;
        }
        Ok(())
    }

    /// Takes one map the agent does not keep in [`Maps`] (the per-CPU
    /// scratch entry) out of the object, for inspection by tests and
    /// tools; `None` when missing or taken.
    pub fn take_map(&mut self, name: &str) -> Option<aya::maps::Map> {
        self.ebpf.take_map(name)
    }

    /// Loads the socket-level programs (`program_names::SOCK`, and
    /// `SOCK_RELEASE` where the kernel takes it) into the kernel without
    /// attaching them (once; attaching does it too).
    pub fn load_socket_programs(&mut self) -> Result<(), LoadError> {
        if self.sock_loaded {
            return Ok(());
        }
        for (name, _) in program_names::SOCK {
            let p: &mut CgroupSockAddr = typed_program(&mut self.ebpf, name)?;
            retry_eagain(|| p.load()).map_err(|source| LoadError::Program { name, source })?;
        }
        let name = program_names::SOCK_RELEASE;
        let p: &mut CgroupSock = typed_program(&mut self.ebpf, name)?;
        // Optional: without it, socket-level entries leave by eviction.
        self.sock_release = match retry_eagain(|| p.load()) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    program = name,
                    error = %e,
                    "this kernel refuses the sock_release program: socket-level translations of closed sockets are then removed by LRU eviction only"
                );
                false
            }
        };
        self.sock_loaded = true;
        Ok(())
    }

    /// The file descriptor of a loaded program, for BPF_PROG_TEST_RUN.
    pub fn program_fd(&self, name: &'static str) -> Result<RawFd, LoadError> {
        let prog = self.ebpf.program(name).ok_or(LoadError::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?;
        let fd = prog.fd().map_err(|source| LoadError::Program { name, source })?;
        Ok(fd.as_fd().as_raw_fd())
    }

    /// Attaches the socket-level programs (`program_names::SOCK`) to the
    /// cgroup v2 directory `cgroup`: sockets of every process in it and its
    /// descendants reach Service frontends through a backend chosen when
    /// they connect or send. With pins, links pinned by a previous agent on
    /// the same cgroup get these programs atomically; links pinned on
    /// another cgroup are removed first; new links are pinned. Returns each
    /// hook with how it got attached.
    pub fn attach_socket_lb(&mut self, cgroup: &Path) -> Result<Vec<(&'static str, Attached)>, LoadError> {
        let cgroup_id = crate::bpf::cgroup::cgroup_id(cgroup)?;
        self.load_socket_programs()?;
        let mut out = Vec::new();
        // One body for both program types (aya gives them no common
        // trait for attaching).
        macro_rules! attach {
            ($ty:ty, $name:expr, $hook:expr) => {{
                let (name, hook) = ($name, $hook);
                let pin = self.pins.as_ref().map(|p| p.socket_link(hook));
                let p: &mut $ty = typed_program(&mut self.ebpf, name)?;
                let fd = program_fd_clone(name, p.fd())?;
                let attached = attach_cgroup_program(name, hook, cgroup, cgroup_id, pin, &fd, |dir, take| {
                    let id = p.attach(dir, CgroupAttachMode::Single)?;
                    Ok(match take {
                        true => Some(FdLink::try_from(p.take_link(id)?).map_err(|e| e.to_string())),
                        false => None,
                    })
                })?;
                out.push((hook, attached));
            }};
        }
        for (name, hook) in program_names::SOCK {
            attach!(CgroupSockAddr, name, hook);
        }
        if self.sock_release {
            attach!(
                CgroupSock,
                program_names::SOCK_RELEASE,
                program_names::SOCK_RELEASE_HOOK
            );
        }
        Ok(out)
    }

    /// Attaches the XDP program to `iface`. With pins, a link pinned by a
    /// previous agent gets this program atomically; a new link is pinned.
    pub fn attach_xdp(&mut self, iface: &str, mode: XdpAttachMode) -> Result<Attached, LoadError> {
        let name = self.xdp;
        let pin = self.pins.as_ref().map(|p| p.link("xdp", iface));
        let p: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .expect("loaded in Dataplane::load")
            .try_into()
            .map_err(|source| LoadError::Program { name, source })?;
        let attach_err = |source| LoadError::Attach {
            program: name,
            iface: iface.to_string(),
            source,
        };
        if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
            let replaced = PinnedLink::from_pin(pin)
                .ok()
                .and_then(|l| XdpLink::try_from(FdLink::from(l)).ok())
                .and_then(|l| p.attach_to_link(l).ok());
            if let Some(id) = replaced {
                // Keep the pinned link; our copy of its fd closes here.
                drop(p.take_link(id).map_err(attach_err)?);
                return Ok(Attached {
                    mode: AttachMode::XdpLink,
                    replaced: true,
                    pinned: true,
                });
            }
            // The interface went away and came back, or the pin is stale.
            PinRoot::unpin_link(pin)?;
        }
        let id = p.attach(iface, mode.into()).map_err(attach_err)?;
        let Some(pin) = pin else {
            return Ok(Attached {
                mode: AttachMode::XdpLink,
                replaced: false,
                pinned: false,
            });
        };
        let link = p.take_link(id).map_err(attach_err)?;
        match FdLink::try_from(link) {
            Ok(fd) => {
                pin_link(fd, &pin)?;
                Ok(Attached {
                    mode: AttachMode::XdpLink,
                    replaced: false,
                    pinned: true,
                })
            }
            // A netlink XDP attachment (kernels without XDP links): it stays
            // attached until `dataplane cleanup` or the interface goes.
            Err(_) => Ok(Attached {
                mode: AttachMode::XdpNetlink,
                replaced: false,
                pinned: false,
            }),
        }
    }

    /// Attaches the TC program to the ingress of `iface`: a tcx link where
    /// the kernel has them (6.6+), else a clsact qdisc filter. With pins, a
    /// tcx link pinned by a previous agent gets this program atomically; a
    /// new tcx link is pinned (clsact filters cannot be pinned: they are
    /// replaced on restart and removed when the agent exits).
    pub fn attach_tc(&mut self, iface: &str) -> Result<Attached, LoadError> {
        let name = program_names::TC;
        let pin = self.pins.as_ref().map(|p| p.link("tc", iface));
        let p: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .expect("loaded in Dataplane::load")
            .try_into()
            .map_err(|source| LoadError::Program { name, source })?;
        let attach_err = |source| LoadError::Attach {
            program: name,
            iface: iface.to_string(),
            source,
        };
        if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
            let replaced = PinnedLink::from_pin(pin)
                .ok()
                .and_then(|l| SchedClassifierLink::try_from(FdLink::from(l)).ok())
                .and_then(|l| p.attach_to_link(l).ok());
            if let Some(id) = replaced {
                drop(p.take_link(id).map_err(attach_err)?);
                return Ok(Attached {
                    mode: AttachMode::Tcx,
                    replaced: true,
                    pinned: true,
                });
            }
            PinRoot::unpin_link(pin)?;
        }
        match p.attach_with_options(
            iface,
            TcAttachType::Ingress,
            tc::TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default()),
        ) {
            Ok(id) => {
                let Some(pin) = pin else {
                    return Ok(Attached {
                        mode: AttachMode::Tcx,
                        replaced: false,
                        pinned: false,
                    });
                };
                let link = p.take_link(id).map_err(attach_err)?;
                let fd = FdLink::try_from(link).map_err(|e| pin_error(&pin, e))?;
                pin_link(fd, &pin)?;
                Ok(Attached {
                    mode: AttachMode::Tcx,
                    replaced: false,
                    pinned: true,
                })
            }
            Err(tcx_err) => {
                tracing::debug!(iface, error = %tcx_err, "tcx attach failed, falling back to clsact");
                // EEXIST: the qdisc is already there, which is fine.
                let _ = tc::qdisc_add_clsact(iface);
                p.attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    tc::TcAttachOptions::Netlink(tc::NlOptions::default()),
                )
                .map_err(attach_err)?;
                Ok(Attached {
                    mode: AttachMode::Clsact,
                    replaced: false,
                    pinned: false,
                })
            }
        }
    }
}

/// Attaches one socket-level program (`name`, at `hook`) to `cgroup`,
/// whose id is `cgroup_id`. With a `pin`: a link pinned there by a previous
/// agent on the same cgroup and hook gets the program atomically; one on
/// another cgroup is removed first; a new link is pinned. `attach` attaches
/// the program and, when asked, hands over its link for pinning.
fn attach_cgroup_program(
    name: &'static str,
    hook: &str,
    cgroup: &Path,
    cgroup_id: u64,
    pin: Option<PathBuf>,
    fd: &aya::programs::ProgramFd,
    attach: impl FnOnce(&std::fs::File, bool) -> Result<Option<Result<FdLink, String>>, aya::programs::ProgramError>,
) -> Result<Attached, LoadError> {
    let attach_err = |source| LoadError::Attach {
        program: name,
        iface: format!("cgroup {}", cgroup.display()),
        source,
    };
    if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
        if replace_cgroup_link(pin, fd.as_fd(), cgroup_id, hook) {
            return Ok(Attached {
                mode: AttachMode::CgroupLink,
                replaced: true,
                pinned: true,
            });
        }
        // Attached to another cgroup (the flag changed), or stale.
        PinRoot::unpin_link(pin)?;
    }
    let dir = std::fs::File::open(cgroup).map_err(|source| crate::bpf::cgroup::CgroupError::Stat {
        path: cgroup.to_path_buf(),
        source,
    })?;
    // Cgroup links always let other programs run next to ours.
    let link = attach(&dir, pin.is_some()).map_err(attach_err)?;
    let pinned = match (pin, link) {
        (Some(pin), Some(fd)) => {
            pin_link(fd.map_err(|e| pin_error(&pin, e))?, &pin)?;
            true
        }
        _ => false,
    };
    Ok(Attached {
        mode: AttachMode::CgroupLink,
        replaced: false,
        pinned,
    })
}

/// The program `name` of the object as its type `T` (`CgroupSockAddr`, ...).
fn typed_program<'a, T>(ebpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })
}

/// An owned copy of a loaded program's fd.
fn program_fd_clone(
    name: &'static str,
    fd: Result<&aya::programs::ProgramFd, aya::programs::ProgramError>,
) -> Result<aya::programs::ProgramFd, LoadError> {
    let fd = fd.map_err(|source| LoadError::Program { name, source })?;
    fd.try_clone().map_err(|e| LoadError::Program {
        name,
        source: aya::programs::ProgramError::IOError(e),
    })
}

/// Gives the cgroup link pinned at `pin` the program `prog`, if that link
/// is attached to cgroup `cgroup_id` at `hook`. Returns whether it did.
fn replace_cgroup_link(pin: &Path, prog: std::os::fd::BorrowedFd<'_>, cgroup_id: u64, hook: &str) -> bool {
    let Ok(link) = crate::bpf::cgroup::obj_get(pin) else {
        return false;
    };
    let same = crate::bpf::cgroup::cgroup_link_info(link.as_fd())
        .ok()
        .flatten()
        .is_some_and(|i| i.cgroup_id == cgroup_id && Some(i.attach_type) == crate::bpf::cgroup::attach_type(hook));
    if !same {
        return false;
    }
    crate::bpf::cgroup::link_update(link.as_fd(), prog).is_ok()
}

/// The kind of attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// A tcx link (kernel 6.6+): pinnable, atomically replaceable.
    Tcx,
    /// A clsact qdisc filter (older kernels).
    Clsact,
    /// An XDP link: pinnable, atomically replaceable.
    XdpLink,
    /// A netlink XDP attachment (kernels without XDP links).
    XdpNetlink,
    /// A cgroup link (socket-level programs): pinnable, atomically
    /// replaceable.
    CgroupLink,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the TC program reading `skb->ip_summed` does not load (here: a
    /// byte offset past the end of `struct sk_buff`, which the verifier
    /// refuses), the programs are loaded again on the helper's path, as
    /// on kernels without the kfunc; with this kernel's own values they
    /// load on the new path.
    #[test]
    fn a_refused_ip_summed_read_falls_back_to_the_checksum_helper() {
        let real = kfunc::skb_summed();
        assert!(
            real.global != 0,
            "this test needs a kernel with the kfunc bpf_cast_to_kern_ctx (6.2+) and BTF: {real:?}"
        );
        let dp = Dataplane::load(None).expect("loading the programs");
        assert!(dp.tc_reads_ip_summed());
        drop(dp);
        let bad = kfunc::SkbSummed {
            global: dataplane_common::skb_summed::encode(0x7ff0, 0),
            ..real
        };
        SUMMED_OVERRIDE.with(|o| o.set(Some(bad)));
        let dp = Dataplane::load(None);
        SUMMED_OVERRIDE.with(|o| o.set(None));
        let dp = dp.expect("the programs load on the helper's path");
        assert!(!dp.tc_reads_ip_summed());
    }
}
