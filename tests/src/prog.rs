//! The real eBPF object, loaded (not attached) for BPF_PROG_TEST_RUN, with
//! its maps programmed through the agent's own sync path.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::BorrowedFd,
    sync::{Mutex, OnceLock},
};

use aya::maps::{HashMap, IterableMap, MapData, PerCpuArray, PerCpuValues};
use dataplane::{
    bpf::loader::{Dataplane, Globals, Maps},
    bpf::map_sizes::MapSizes,
    bpf::pin::{ensure_bpffs, PinRoot},
    bpf::testrun::{self, RunResult},
    model::maglev,
    model::{Desired, Frontend},
    reconcile::{SyncConfig, Syncer},
};

use crate::mapstate::{self, Content, ObjectMaps};
use dataplane_common::{
    addr_of, flow_hash, fold_addr, map_names, program_names, Backend, CtKey, CtScratch, CtValue, DpConfig, Reason,
    ServiceKey,
};

/// The backend the datapath must pick for a new flow of either family: the
/// Maglev table (default size) computed in userspace, at the position of
/// the shared flow hash.
pub fn expected(backends: &[Backend], src: (IpAddr, u16), dst: (IpAddr, u16), proto: u8) -> Backend {
    expected_in(maglev::DEFAULT_SIZE, backends, src, dst, proto)
}

/// As [`expected`], with a table of `size` entries.
pub fn expected_in(size: u32, backends: &[Backend], src: (IpAddr, u16), dst: (IpAddr, u16), proto: u8) -> Backend {
    backends[expected_index(&maglev::table(backends, size), src, dst, proto)]
}

/// The index into the backends of the entry of `table` (a Maglev table of
/// those backends) that a new flow uses: at the position of the shared
/// flow hash.
pub fn expected_index(table: &[u16], src: (IpAddr, u16), dst: (IpAddr, u16), proto: u8) -> usize {
    let h = flow_hash(
        fold_addr(&addr_of(src.0).0),
        fold_addr(&addr_of(dst.0).0),
        src.1.to_be(),
        dst.1.to_be(),
        proto,
    );
    table[(h % table.len() as u32) as usize] as usize
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
/// TC_ACT_UNSPEC (-1) as the u32 the kernel reports.
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;

/// Which program a frame is run through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    Xdp,
    Tc,
}

impl Prog {
    pub const BOTH: [Prog; 2] = [Prog::Xdp, Prog::Tc];

    pub fn pass(self) -> u32 {
        match self {
            Prog::Xdp => XDP_PASS,
            Prog::Tc => TC_ACT_UNSPEC,
        }
    }

    /// The action that sends a reply back out of the incoming interface:
    /// XDP_TX, or TC_ACT_REDIRECT (to the same interface's egress).
    pub fn bounce(self) -> u32 {
        match self {
            Prog::Xdp => 3,
            Prog::Tc => 7,
        }
    }

    pub fn drop_code(self) -> u32 {
        match self {
            Prog::Xdp => XDP_DROP,
            Prog::Tc => TC_ACT_SHOT,
        }
    }
}

/// Pins the calling thread to one CPU (program runs then use that CPU's
/// per-CPU entries).
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the call only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A field of [`Loaded`] that its `Drop` can take back for the pool:
/// reads and writes through it as through the value (`l.dp.program_fd(..)`,
/// `l.sync.writer_mut()`).
pub struct Held<T>(Option<T>);

impl<T> std::ops::Deref for Held<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0.as_ref().expect("a Loaded being dropped")
    }
}

impl<T> std::ops::DerefMut for Held<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.0.as_mut().expect("a Loaded being dropped")
    }
}

/// The loaded programs and their maps, through the agent's own sync path.
///
/// Loading verifies the XDP and the TC program again, about 1.6 s of CPU
/// on the test machine and ~15 times that in a software-emulated VM:
/// most of a program test's time. A `Loaded` therefore comes from a
/// process-wide pool when an object loaded with the same [`PoolKey`] is
/// idle there, and goes back to it when it is dropped at the end of a test
/// that did not panic, after every map of the object was brought back to
/// its content right after the load ([`crate::mapstate`]: hash maps
/// emptied, arrays and per-CPU arrays restored where they differ, ring
/// buffers drained); the syncer and the desired state are made anew
/// each time. An object of a panicking test is dropped, never reused. A
/// test cannot tell a pooled object from a fresh one
/// (`tests/tests/prog_pool.rs` checks it map by map after a real
/// workload). `DATAPLANE_TEST_POOL=0` turns reuse off; another number sets
/// how many idle objects are kept (default [`POOL_IDLE`]; each holds about
/// 110 MiB of preallocated map memory); `DATAPLANE_TEST_POOL_LOG=1` prints
/// every load.
pub struct Loaded {
    pub dp: Held<Dataplane>,
    pub sync: Held<Syncer<Maps>>,
    pub desired: Desired,
    /// The per-CPU scratch entry (the flood guard's window lives there).
    scratch: Held<PerCpuArray<MapData, CtScratch>>,
    /// The flood guard's reply entries.
    ct_syn: Held<HashMap<MapData, CtKey, CtValue>>,
    /// What the pool needs to take the object back.
    pool: Option<PoolState>,
}

/// Everything that changes what a load gives: two loads with equal keys
/// give the same programs (same load-time constants) and the same maps
/// (same sizes). The syncer's settings and `DpConfig` are not part of it:
/// they are set after the load, on every take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolKey {
    pub sizes: MapSizes,
    pub globals: Globals,
    /// The `kernel_features` bits the programs were loaded with.
    pub features: u32,
}

/// Idle objects the pool keeps by default (`DATAPLANE_TEST_POOL`): as many
/// as the test threads of the VM runs (`--test-threads=2`); more would
/// hold more kernel memory in the VM's 2 GiB than the hits are worth.
pub const POOL_IDLE: usize = 2;

struct PoolState {
    key: PoolKey,
    maps: ObjectMaps,
    /// Each of `maps`' content right after the load.
    saved: Vec<Content>,
}

/// An idle loaded object with its maps as right after the load.
struct Pooled {
    dp: Dataplane,
    maps: Maps,
    scratch: PerCpuArray<MapData, CtScratch>,
    ct_syn: HashMap<MapData, CtKey, CtValue>,
    state: PoolState,
}

/// The idle objects, and how often each key was asked for.
struct Pool {
    idle: Vec<Pooled>,
    asked: Vec<(PoolKey, u32)>,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    idle: Vec::new(),
    asked: Vec::new(),
});

impl Pool {
    fn asked(&self, key: &PoolKey) -> u32 {
        self.asked.iter().find(|(k, _)| k == key).map_or(0, |(_, n)| *n)
    }
}

fn pool_idle() -> usize {
    static IDLE: OnceLock<usize> = OnceLock::new();
    *IDLE.get_or_init(|| match std::env::var("DATAPLANE_TEST_POOL") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("DATAPLANE_TEST_POOL={v}: a number of idle objects")),
        Err(_) => POOL_IDLE,
    })
}

impl Pooled {
    /// An object of `key` from the pool, or loaded now.
    fn take(key: PoolKey) -> Pooled {
        crate::netns::require_root_and_tools();
        {
            let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
            match pool.asked.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => pool.asked.push((key, 1)),
            }
            if let Some(i) = pool.idle.iter().rposition(|p| p.state.key == key) {
                return pool.idle.remove(i);
            }
        }
        Self::load(key)
    }

    /// Loads an object of `key` (never from the pool) and reads every map
    /// right after the load.
    fn load(key: PoolKey) -> Pooled {
        if std::env::var_os("DATAPLANE_TEST_POOL_LOG").is_some() {
            eprintln!("program test pool: loading {key:?}");
        }
        let dp = if key.features == dataplane::bpf::kernel::features() {
            Dataplane::load_with(None, None, &key.sizes, false, key.globals).map(|(dp, _)| dp)
        } else {
            assert_eq!(
                key.sizes,
                MapSizes::default(),
                "older kernels' paths are loaded with the default sizes"
            );
            Dataplane::load_with_features(key.features, key.globals)
        };
        let mut dp = dp.unwrap_or_else(|e| panic!("{e}"));
        let scratch = PerCpuArray::try_from(dp.take_map(map_names::SCRATCH).expect("scratch map")).unwrap();
        let maps = dp.take_maps().unwrap();
        // A handle of its own on the flood guard's map (`Maps` has one too).
        let ct_syn = {
            use std::os::fd::AsFd;
            let fd = IterableMap::map(maps.ct_syn.as_ref().expect("the object's DP_CT_SYN"))
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .expect("dup DP_CT_SYN");
            HashMap::try_from(aya::maps::Map::LruHashMap(MapData::from_fd(fd).expect("DP_CT_SYN"))).unwrap()
        };
        let maps_of = || -> anyhow::Result<ObjectMaps> {
            let mut ids = mapstate::handle_ids(&maps)?;
            for m in [IterableMap::map(&scratch), IterableMap::map(&ct_syn)] {
                ids.push(m.info()?.id());
            }
            let progs = [dp.program_fd(dp.xdp_program())?, dp.program_fd(program_names::TC)?];
            // SAFETY: the object owns these fds for as long as `dp` lives,
            // past this call.
            let progs = progs.map(|fd| unsafe { BorrowedFd::borrow_raw(fd) });
            ObjectMaps::open(&progs, &ids)
        };
        let tracked = maps_of().unwrap_or_else(|e| panic!("the maps of the loaded object: {e:#}"));
        let saved = tracked
            .maps
            .iter()
            .map(|m| m.read())
            .collect::<anyhow::Result<Vec<_>>>()
            .unwrap_or_else(|e| panic!("reading the maps after the load: {e:#}"));
        Pooled {
            dp,
            maps,
            scratch,
            ct_syn,
            state: PoolState {
                key,
                maps: tracked,
                saved,
            },
        }
    }

    /// Brings every map back to its content right after the load.
    fn reset(&self) -> anyhow::Result<()> {
        for (m, saved) in self.state.maps.maps.iter().zip(&self.state.saved) {
            m.restore(saved)
                .map_err(|e| e.context(format!("restoring map {}", m.name)))?;
        }
        Ok(())
    }

    /// Resets the object and keeps it for the next take, unless it holds
    /// more than the maps (socket-level programs loaded) or the reset
    /// failed: then it is dropped.
    fn give_back(self) {
        let sock_loaded = program_names::SOCK
            .iter()
            .any(|(name, _)| self.dp.program_fd(name).is_ok());
        if sock_loaded || pool_idle() == 0 {
            return;
        }
        if let Err(e) = self.reset() {
            eprintln!("program test pool: object dropped: {e:#}");
            return;
        }
        let evicted = {
            let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
            pool.idle.push(self);
            // Beyond the limit, the objects of the keys asked for least
            // (the settings one test uses) go first, the oldest among
            // equals: the default programs most tests take stay.
            let mut evicted = Vec::new();
            while pool.idle.len() > pool_idle() {
                let i = (0..pool.idle.len())
                    .min_by_key(|&i| pool.asked(&pool.idle[i].state.key))
                    .expect("a full pool is not empty");
                evicted.push(pool.idle.remove(i));
            }
            evicted
        };
        // Dropped outside the lock: closing a map is the kernel's work.
        drop(evicted);
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let Some(state) = self.pool.take() else { return };
        // A panicking test may have left anything behind: its object is
        // dropped, never reused.
        if std::thread::panicking() {
            return;
        }
        let (Some(dp), Some(sync), Some(scratch), Some(ct_syn)) = (
            self.dp.0.take(),
            self.sync.0.take(),
            self.scratch.0.take(),
            self.ct_syn.0.take(),
        ) else {
            return;
        };
        Pooled {
            dp,
            maps: sync.into_writer(),
            scratch,
            ct_syn,
            state,
        }
        .give_back();
    }
}

/// The programs' settings in program tests: the defaults without the flood
/// guard and without host routing (TC hands translated packets to the
/// stack: the verdict must not depend on the routes of the namespace the
/// test runs in).
pub const PROGRAM_TEST_GLOBALS: Globals = Globals {
    snat_ports: dataplane_common::DEFAULT_SNAT_PORTS,
    new_flows_per_cpu: 0,
    host_routing: false,
    sock_routing: false,
};

impl Loaded {
    pub fn new() -> Loaded {
        Self::with_config(SyncConfig::default())
    }

    pub fn with_config(config: SyncConfig) -> Loaded {
        Self::with_configs(config, DpConfig::defaults())
    }

    pub fn with_configs(config: SyncConfig, dp_config: DpConfig) -> Loaded {
        Self::with_sizes(config, dp_config, &MapSizes::default())
    }

    /// Loaded with the map capacities `sizes`, the syncer following them.
    /// Program tests run without the flood guard (`--new-flows-per-cpu 0`):
    /// what they send must not depend on how fast they send it. The
    /// guard's own tests turn it on ([`Loaded::with_new_flows_per_cpu`]).
    pub fn with_sizes(config: SyncConfig, dp_config: DpConfig, sizes: &MapSizes) -> Loaded {
        let key = PoolKey {
            sizes: *sizes,
            globals: PROGRAM_TEST_GLOBALS,
            features: dataplane::bpf::kernel::features(),
        };
        Self::from_pooled(Pooled::take(key), config, dp_config)
    }

    /// Loaded with SNAT taking source ports from `snat_ports` (inclusive).
    pub fn with_snat_ports(dp_config: DpConfig, snat_ports: (u16, u16)) -> Loaded {
        Self::with_globals(
            dp_config,
            Globals {
                snat_ports,
                ..PROGRAM_TEST_GLOBALS
            },
        )
    }

    /// The programs with the flood guard giving state to `per_cpu` new
    /// flows per CPU per second (`--new-flows-per-cpu`).
    pub fn with_new_flows_per_cpu(per_cpu: u32) -> Loaded {
        Self::with_globals(
            DpConfig::defaults(),
            Globals {
                new_flows_per_cpu: per_cpu,
                ..PROGRAM_TEST_GLOBALS
            },
        )
    }

    /// Loaded with the programs' load-time settings `globals`.
    pub fn with_globals(dp_config: DpConfig, globals: Globals) -> Loaded {
        let key = PoolKey {
            sizes: MapSizes::default(),
            globals,
            features: dataplane::bpf::kernel::features(),
        };
        let mut l = Self::from_pooled(Pooled::take(key), SyncConfig::default(), dp_config);
        // As the agent: the endpoint set is kept when the programs read it.
        l.sync
            .track_endpoints(globals.host_routing && globals.sock_routing)
            .unwrap_or_else(|e| panic!("{e}"));
        l
    }

    /// The programs as loaded on a kernel with only the `features` of this
    /// one (`dataplane_common::kernel_features` bits): the paths older
    /// kernels take, run here.
    pub fn with_kernel_features(features: u32) -> Loaded {
        let key = PoolKey {
            sizes: MapSizes::default(),
            globals: PROGRAM_TEST_GLOBALS,
            features: features & dataplane::bpf::kernel::features(),
        };
        Self::from_pooled(Pooled::take(key), SyncConfig::default(), DpConfig::defaults())
    }

    /// A `Loaded` of `key` freshly loaded, never taken from the pool (it
    /// goes to the pool when dropped, as any): what a pooled one is
    /// compared with.
    pub fn loaded_now(key: PoolKey) -> Loaded {
        crate::netns::require_root_and_tools();
        Self::from_pooled(Pooled::load(key), SyncConfig::default(), DpConfig::defaults())
    }

    /// The key of the plain [`Loaded::new`].
    pub fn default_key() -> PoolKey {
        PoolKey {
            sizes: MapSizes::default(),
            globals: PROGRAM_TEST_GLOBALS,
            features: dataplane::bpf::kernel::features(),
        }
    }

    fn from_pooled(p: Pooled, config: SyncConfig, dp_config: DpConfig) -> Loaded {
        let Pooled {
            dp,
            mut maps,
            scratch,
            ct_syn,
            state,
        } = p;
        maps.write_config(&dp_config).unwrap();
        let mut sync = Syncer::with_config(maps, config);
        sync.set_max_services(state.key.sizes.services);
        Loaded {
            dp: Held(Some(dp)),
            sync: Held(Some(sync)),
            desired: Desired::default(),
            scratch: Held(Some(scratch)),
            ct_syn: Held(Some(ct_syn)),
            pool: Some(state),
        }
    }

    /// Every map of the object with its current content, by kernel name
    /// (see [`crate::mapstate`]).
    pub fn map_contents(&self) -> anyhow::Result<BTreeMap<String, Content>> {
        self.pool.as_ref().expect("a Loaded being dropped").maps.read()
    }

    /// Every map of the object, as the pool tracks it.
    pub fn tracked_maps(&self) -> &[mapstate::TrackedMap] {
        &self.pool.as_ref().expect("a Loaded being dropped").maps.maps
    }

    /// A number that tells objects apart (the id of the kernel's first
    /// map of it): equal for a `Loaded` taken again from the pool.
    pub fn object_id(&self) -> u32 {
        self.pool.as_ref().expect("a Loaded being dropped").maps.maps[0].id
    }

    /// The same, with a syncer that knows the maps are new, as the
    /// agent's is when it created them: new frontends are written in bulk
    /// (`reconcile/bulk.rs`).
    pub fn fresh(mut self) -> Loaded {
        let sync = self.sync.0.take().expect("a Loaded being dropped");
        self.sync = Held(Some(sync.with_fresh_maps()));
        self
    }

    /// Freezes the flood guard's window on every CPU with `used` new flows
    /// already given state in it: the window never ends (it starts at the
    /// largest clock value), so what the guard decides depends on the
    /// frames sent, not on how fast they are sent. With the test thread
    /// on one CPU, the next `quota - used` SYNs that the guard counts get
    /// state and the rest do not, until the next call.
    pub fn freeze_flood_window(&mut self, used: u32) {
        let ncpus = aya::util::nr_cpus().expect("number of possible CPUs");
        let entry = CtScratch {
            flood_window_ns: u64::MAX,
            flood_count: used,
            ..CtScratch::default()
        };
        let values = PerCpuValues::try_from(vec![entry; ncpus]).unwrap();
        self.scratch.set(0, values, 0).expect("writing the scratch entry");
    }

    /// The interface the TC program last redirected a packet to on CPU
    /// `cpu` (host routing), 0 when it handed the packet to the stack.
    pub fn redirect_ifindex(&self, cpu: usize) -> u32 {
        let v = self.scratch.get(&0, 0).expect("reading the scratch entry");
        v[cpu].redirect_ifindex
    }

    /// The flood guard's reply entries (`DP_CT_SYN`).
    pub fn embryonic_entries(&self) -> Vec<(CtKey, CtValue)> {
        self.ct_syn.iter().map(|kv| kv.expect("reading DP_CT_SYN")).collect()
    }

    /// Sets the last packet of every reply entry of the flood guard
    /// (`DP_CT_SYN`) `idle_ns` back from now.
    pub fn set_embryonic_idle(&mut self, idle_ns: u64) {
        let since = dataplane::inspect::monotonic_ns().saturating_sub(idle_ns);
        for (k, mut v) in self.embryonic_entries() {
            v.last_seen_ns = since;
            self.ct_syn.insert(k, v, 0).expect("writing DP_CT_SYN");
        }
    }

    /// Sets the backends of frontend `vip:port/proto` (creating it) and
    /// programs the maps.
    pub fn set_service<B: Into<IpAddr> + Copy>(
        &mut self,
        vip: impl Into<IpAddr>,
        port: u16,
        proto: u8,
        backends: &[(B, u16)],
    ) {
        self.set_service_with(vip, port, proto, backends, None)
    }

    /// As `set_service`, with sessionAffinity ClientIP when `affinity_s` is set.
    pub fn set_service_with<B: Into<IpAddr> + Copy>(
        &mut self,
        vip: impl Into<IpAddr>,
        port: u16,
        proto: u8,
        backends: &[(B, u16)],
        affinity_s: Option<u32>,
    ) {
        let mut b: Vec<Backend> = backends.iter().map(|(a, p)| Backend::new(*a, *p)).collect();
        b.sort();
        self.desired.frontends.insert(
            ServiceKey::new(vip, port, proto),
            Frontend {
                service: "test/svc".into(),
                port_name: String::new(),
                backends: b,
                affinity_timeout_s: affinity_s,
                flags: 0,
                source_ranges: Vec::new(),
                also_serving: Vec::new(),
            }
            .into(),
        );
        let r = self.sync.apply(&self.desired);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }

    /// Programs an arbitrary frontend (flags, source ranges, remote backends).
    pub fn set_frontend(&mut self, key: ServiceKey, mut fe: Frontend) {
        fe.backends.sort();
        self.desired.frontends.insert(key, fe.into());
        let r = self.sync.apply(&self.desired);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }

    pub fn remove_service(&mut self, vip: impl Into<IpAddr>, port: u16, proto: u8) {
        self.desired.frontends.remove(&ServiceKey::new(vip, port, proto));
        let r = self.sync.apply(&self.desired);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }

    /// The backends of a frontend in the order the datapath indexes them.
    pub fn backends(&self, vip: impl Into<IpAddr>, port: u16, proto: u8) -> Vec<Backend> {
        self.desired.frontends[&ServiceKey::new(vip, port, proto)]
            .backends
            .clone()
    }

    pub fn run(&self, prog: Prog, frame: &[u8]) -> RunResult {
        let name = match prog {
            Prog::Xdp => self.dp.xdp_program(),
            Prog::Tc => program_names::TC,
        };
        let fd = self.dp.program_fd(name).unwrap();
        testrun::run(fd, frame).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {name}: {e}"))
    }

    /// Runs the TC program on `frame` as if it arrived on interface
    /// `ifindex` of the calling thread's network namespace.
    pub fn run_tc_on(&self, frame: &[u8], ifindex: u32) -> RunResult {
        let fd = self.dp.program_fd(program_names::TC).unwrap();
        testrun::run_on(fd, frame, ifindex)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {}: {e}", program_names::TC))
    }

    /// The reason counter summed over CPUs.
    pub fn reason(&self, r: Reason) -> u64 {
        let v = self.sync.writer().reasons.get(&(r as u32), 0).unwrap();
        v.iter().sum()
    }

    /// Runs the XDP program on `frame` as if it arrived on interface
    /// `ifindex` of the calling thread's network namespace.
    pub fn run_xdp_on(&self, frame: &[u8], ifindex: u32) -> RunResult {
        let name = self.dp.xdp_program();
        let fd = self.dp.program_fd(name).unwrap();
        testrun::run_xdp_on(fd, frame, ifindex).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {name}: {e}"))
    }

    /// A host routing event's count, all CPUs summed.
    pub fn route_event(&self, e: dataplane_common::RouteEvent) -> u64 {
        let v = self.sync.writer().route_events.get(&(e as u32), 0).unwrap();
        v.iter().sum()
    }

    /// A conntrack event's count, all CPUs summed.
    pub fn ct_event(&self, e: dataplane_common::CtEvent) -> u64 {
        let v = self.sync.writer().ct_events.get(&(e as u32), 0).unwrap();
        v.iter().sum()
    }

    pub fn conntrack_len(&self) -> usize {
        self.sync.writer().conntrack.keys().count()
    }
}

impl Default for Loaded {
    fn default() -> Self {
        Self::new()
    }
}

/// A pin root of a test under /sys/fs/bpf (bpffs mounted if missing),
/// removed with everything pinned below it on drop, also when the test
/// fails.
pub struct PinDir(pub PinRoot);

impl PinDir {
    pub fn new() -> PinDir {
        crate::netns::require_root_and_tools();
        let root = std::path::PathBuf::from("/sys/fs/bpf").join(crate::netns::unique_prefix());
        ensure_bpffs(&root).expect("bpffs at /sys/fs/bpf");
        PinDir(PinRoot::new(root))
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = self.0.cleanup() {
            eprintln!("cleanup of {}: {e}", self.0.root.display());
        }
        let _ = std::fs::remove_dir_all(&self.0.root);
    }
}
