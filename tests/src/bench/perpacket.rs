//! Per-packet cost of each datapath path with BPF_PROG_TEST_RUN.
//!
//! A repeat loop runs a program again on its own output, and a fixed tuple
//! hits conntrack after the first run. So every path runs in the bench
//! object's wrapper (`dataplane-ebpf/src/bin/bench.rs`): the frame is copied
//! back before each run, new-flow paths get a new source address/port each
//! run, and the wrapper's own cost (the same copy without the datapath) is
//! measured right before and subtracted. The reason counters are read around
//! every measurement: each run must have taken the path it is named after.
//!
//! The scales (numbers of Services) are all loaded at once and measured
//! interleaved: in every round each series is measured at every scale in
//! turn, in an order of the scales that rotates from round to round, so
//! that the machine's drift over the run hits every scale alike; the ratio
//! of a scale to 1 Service is also taken per round (`paired_ratio_to_1`),
//! between measurements milliseconds apart. The rounds run on one CPU
//! (`PIN_CPU`).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData},
    programs::{SchedClassifier, Xdp},
    Ebpf,
};
use dataplane::{
    bpf::loader::Maps,
    bpf::testrun,
    model::{Desired, Frontend},
    reconcile::{SyncConfig, Syncer},
};
use dataplane_common::{
    bench::{names, service_frontend, BenchFrame, FRAME_LEN, OFFSETS_V4, OFFSETS_V6, VARY_FLOW, VARY_SERVICE},
    Backend, DpConfig, Reason, ServiceKey, ServiceValue, DEFAULT_SNAT_PORTS, IPPROTO_TCP, IPPROTO_UDP, KERNEL_GLOBAL,
    NEW_FLOWS_GLOBAL, SKB_SUMMED_GLOBAL, SNAT_PORTS_GLOBAL,
};
use serde_json::{json, Value};

use crate::packet::{Frame, ACK, SYN};

pub struct Config {
    pub scales: Vec<u32>,
    pub rounds: usize,
    pub repeat: u32,
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
/// Source of the new-flow frames (the wrapper adds up to 255 to it), apart
/// from `CLIENT` so that a varied tuple never hits the established flows.
const NEW_FLOW_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 101, 0);
const BACKENDS: usize = 4;
/// The IPv6 paths' frontend (TCP and UDP), client and new-flow client.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x19, 0, 0, 0, 0, 0x10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 2);
const NEW_FLOW_CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x101, 0, 0, 0, 0, 0);
const BACKEND_PORT: u16 = 8080;

/// A path of the datapath and how to drive it.
struct PathSpec {
    name: &'static str,
    what: &'static str,
    vary: u32,
    reason: Reason,
}

const PATHS: &[PathSpec] = &[
    PathSpec {
        name: "no_service",
        what: "TCP to an address that is no VIP: service miss, reply-conntrack miss, pass",
        vary: 0,
        reason: Reason::PassNoService,
    },
    PathSpec {
        name: "tcp_new",
        what: "TCP SYN, new tuple every run, to the last Service: lookup, Maglev pick, 2 conntrack inserts, DNAT",
        vary: VARY_FLOW,
        reason: Reason::NatNewFlow,
    },
    PathSpec {
        name: "tcp6_new",
        what: "as tcp_new over IPv6 (one IPv6 frontend besides the N IPv4 Services)",
        vary: VARY_FLOW,
        reason: Reason::NatNewFlow,
    },
    PathSpec {
        name: "tcp_new_any_service",
        what: "as tcp_new, each run to the next of all N Services (cold map entries)",
        vary: VARY_FLOW | VARY_SERVICE,
        reason: Reason::NatNewFlow,
    },
    PathSpec {
        name: "tcp_established",
        what: "TCP ACK of an existing flow: lookup, conntrack hit, DNAT",
        vary: 0,
        reason: Reason::NatEstablished,
    },
    PathSpec {
        name: "tcp_reply",
        what: "TCP ACK from the backend: service miss, reply-conntrack hit, reverse NAT",
        vary: 0,
        reason: Reason::NatReply,
    },
    PathSpec {
        name: "udp_new",
        what: "UDP datagram, new tuple every run: lookup, Maglev pick, 2 conntrack inserts, DNAT",
        vary: VARY_FLOW,
        reason: Reason::NatNewFlow,
    },
    PathSpec {
        name: "udp6_new",
        what: "as udp_new over IPv6",
        vary: VARY_FLOW,
        reason: Reason::NatNewFlow,
    },
    PathSpec {
        name: "udp_established",
        what: "UDP datagram of an existing flow: conntrack hit, DNAT",
        vary: 0,
        reason: Reason::NatEstablished,
    },
    PathSpec {
        name: "tcp6_established",
        what: "as tcp_established over IPv6",
        vary: 0,
        reason: Reason::NatEstablished,
    },
    PathSpec {
        name: "tcp6_reply",
        what: "as tcp_reply over IPv6",
        vary: 0,
        reason: Reason::NatReply,
    },
];

/// The eBPF objects: `DP_BENCH_EBPF_DIR` (to compare a changed build), else
/// what `cargo xtask build-ebpf` wrote.
fn ebpf_dir() -> std::path::PathBuf {
    std::env::var_os("DP_BENCH_EBPF_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/bpfel-unknown-none/release"))
}

/// The flood guard's quota the bench object is loaded with: the guard's
/// check runs on every SYN, as deployed (the agent's default is 10,000 per
/// CPU per second), but never trips, so every new-flow run gets state (the
/// bench makes far more new flows per second than any quota).
const BENCH_NEW_FLOWS: u32 = u32::MAX;

/// The default SNAT ports as the `SNAT_PORTS_GLOBAL` value.
const BENCH_SNAT_PORTS: u32 = DEFAULT_SNAT_PORTS.0 as u32 | (DEFAULT_SNAT_PORTS.1 as u32) << 16;

/// The read-only globals the bench object gets, as the agent sets them on
/// this kernel (`Dataplane::load_inner`): the kernel's features (the
/// coarse clock, `BPF_F_IPV6` checksums, ...), where `skb->ip_summed` lies
/// (`bpf::kfunc`: TC's own checksum updates), the default SNAT ports, the
/// flood guard on ([`BENCH_NEW_FLOWS`]), host routing and debug logging
/// off. Without them the programs would take the oldest kernels' paths.
fn deployed_globals<'a>(loader: &mut aya::EbpfLoader<'a>, features: &'a u32, summed: &'a u32) {
    loader.override_global(KERNEL_GLOBAL, features, true);
    loader.override_global(SKB_SUMMED_GLOBAL, summed, true);
    loader.override_global(SNAT_PORTS_GLOBAL, &BENCH_SNAT_PORTS, true);
    loader.override_global(NEW_FLOWS_GLOBAL, &BENCH_NEW_FLOWS, true);
}

/// Loads object `name`; the datapath's (`bench`) with the globals the
/// agent would set here, the baseline (which has none) as it is.
fn load_object(name: &str) -> Result<Ebpf> {
    let path = ebpf_dir().join(name);
    let bytes = std::fs::read(&path).with_context(|| format!("{}: run `cargo xtask build-ebpf`", path.display()))?;
    // The placeholders of the kfunc call (TC's checksum updates), as the
    // agent's loader resolves them.
    let summed = dataplane::bpf::kfunc::skb_summed();
    let bytes = dataplane::bpf::kfunc::patch_object(&bytes, summed.kfunc_id)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut loader = aya::EbpfLoader::new();
    let features = dataplane::bpf::kernel::features();
    if name == "bench" {
        deployed_globals(&mut loader, &features, &summed.global);
    }
    loader
        .load(&bytes)
        .with_context(|| format!("loading {}", path.display()))
}

fn load_xdp(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let p: &mut Xdp = ebpf.program_mut(name).context(name.to_string())?.try_into()?;
    p.load().with_context(|| format!("loading {name}"))
}

fn load_tc(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let p: &mut SchedClassifier = ebpf.program_mut(name).context(name.to_string())?.try_into()?;
    p.load().with_context(|| format!("loading {name}"))
}

fn fd(ebpf: &Ebpf, name: &str) -> Result<i32> {
    use std::os::fd::{AsFd, AsRawFd};
    let p = ebpf.program(name).context(name.to_string())?;
    Ok(p.fd()?.as_fd().as_raw_fd())
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name).with_context(|| format!("map {name} missing"))
}

/// The bench object's datapath maps, as the agent's sync path wants them.
fn datapath_maps(ebpf: &mut Ebpf) -> Result<Maps> {
    Ok(Maps::take(ebpf)?)
}

fn frame64(f: &Frame) -> [u8; FRAME_LEN] {
    let mut f = f.clone();
    let l3 = if f.src.is_ipv6() { 40 } else { 20 };
    let hdr = 14 + l3 + if f.proto == IPPROTO_TCP { 20 } else { 8 };
    f.payload = vec![0x5a; FRAME_LEN - hdr];
    let b = f.build();
    b.try_into().expect("bench frames are FRAME_LEN bytes")
}

/// Everything loaded for one scale.
struct Bench {
    _obj: Ebpf,
    _base: Ebpf,
    maps: Maps,
    frame: Array<MapData, BenchFrame>,
    prog: BTreeMap<&'static str, i32>,
    services: u32,
}

impl Bench {
    fn new(services: u32) -> Result<Bench> {
        let mut obj = load_object("bench")?;
        for p in [names::WRAP_XDP, names::FRAME_XDP] {
            load_xdp(&mut obj, p)?;
        }
        for p in [names::WRAP_TC, names::FRAME_TC] {
            load_tc(&mut obj, p)?;
        }
        let mut maps = datapath_maps(&mut obj)?;
        maps.write_config(&DpConfig::defaults())?;
        let frame = Array::try_from(take_map(&mut obj, names::FRAME)?)?;

        let mut desired = Desired::default();
        let backends: Vec<Backend> = (1..=BACKENDS)
            .map(|i| Backend::new(Ipv4Addr::new(198, 18, i as u8, 2), BACKEND_PORT))
            .collect();
        let mut keys = Vec::new();
        for i in 0..services {
            let (addr, port) = service_frontend(i);
            keys.push(ServiceKey::new(Ipv4Addr::from(addr), port, IPPROTO_TCP));
        }
        // The UDP paths use one more frontend: the last Service's VIP, UDP.
        let (addr, port) = service_frontend(services - 1);
        keys.push(ServiceKey::new(Ipv4Addr::from(addr), port, IPPROTO_UDP));
        // The IPv6 paths: one IPv6 VIP, TCP and UDP, with IPv6 backends.
        keys.push(ServiceKey::new(VIP6, 80, IPPROTO_TCP));
        keys.push(ServiceKey::new(VIP6, 80, IPPROTO_UDP));
        let backends6: Vec<Backend> = (1..=BACKENDS)
            .map(|i| Backend::new(Ipv6Addr::new(0x2001, 0xdb8, 0x18, i as u16, 0, 0, 0, 2), BACKEND_PORT))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            desired.frontends.insert(
                *k,
                Frontend {
                    service: format!("bench/svc-{i}"),
                    port_name: String::new(),
                    backends: if k.is_v6() { backends6.clone() } else { backends.clone() },
                    affinity_timeout_s: None,
                    flags: 0,
                    source_ranges: Vec::new(),
                    also_serving: Vec::new(),
                }
                .into(),
            );
        }
        let t = Instant::now();
        let mut sync = Syncer::with_config(maps, SyncConfig::default());
        let report = sync.apply(&desired);
        if !report.errors.is_empty() {
            bail!(
                "programming {services} Services: {:?}",
                &report.errors[..report.errors.len().min(3)]
            );
        }
        eprintln!(
            "dp-bench: {} frontends programmed through the agent's sync path in {:.2?}",
            keys.len(),
            t.elapsed()
        );
        let maps = sync.into_writer();

        let mut base = load_object("baseline")?;
        load_xdp(&mut base, names::EMPTY)?;
        load_xdp(&mut base, names::PARSE_LOOKUP)?;
        let mut bl: HashMap<MapData, ServiceKey, ServiceValue> =
            HashMap::try_from(take_map(&mut base, names::BASELINE_SERVICES)?)?;
        for (i, k) in keys.iter().enumerate() {
            let v = ServiceValue {
                service_id: i as u32,
                backend_count: BACKENDS as u16,
                ..Default::default()
            };
            bl.insert(k, v, 0)?;
        }

        let mut prog = BTreeMap::new();
        for p in [names::WRAP_XDP, names::FRAME_XDP, names::WRAP_TC, names::FRAME_TC] {
            prog.insert(p, fd(&obj, p)?);
        }
        for p in [names::EMPTY, names::PARSE_LOOKUP] {
            prog.insert(p, fd(&base, p)?);
        }
        Ok(Bench {
            _obj: obj,
            _base: base,
            maps,
            frame,
            prog,
            services,
        })
    }

    fn set_frame(&mut self, bytes: [u8; FRAME_LEN], vary: u32) -> Result<()> {
        let v6 = bytes[12..14] == [0x86, 0xdd];
        let f = BenchFrame {
            vary,
            services: self.services,
            offsets: if v6 { OFFSETS_V6 } else { OFFSETS_V4 },
            bytes,
        };
        self.frame.set(0, f, 0)?;
        Ok(())
    }

    fn reason(&self, r: Reason) -> Result<u64> {
        Ok(self.maps.reasons.get(&(r as u32), 0)?.iter().sum())
    }

    fn reasons(&self) -> Result<Vec<u64>> {
        Reason::ALL.iter().map(|r| self.reason(*r)).collect()
    }

    fn clear_conntrack(&mut self) -> Result<()> {
        let keys: Vec<_> = self.maps.conntrack.keys().collect::<Result<_, _>>()?;
        for k in keys {
            let _ = self.maps.conntrack.remove(&k);
        }
        Ok(())
    }

    /// One run of the XDP wrapper (to create a flow); returns the output.
    fn once(&mut self, bytes: [u8; FRAME_LEN]) -> Result<Vec<u8>> {
        self.set_frame(bytes, 0)?;
        let r = testrun::run(self.prog[names::WRAP_XDP], &bytes)?;
        Ok(r.data)
    }
}

/// The frames of each path; the reply frame needs the backend the
/// established flow got, so it is built after that flow exists.
struct Frames {
    by_path: BTreeMap<&'static str, [u8; FRAME_LEN]>,
}

fn frames(b: &mut Bench) -> Result<Frames> {
    let (vaddr, vport) = service_frontend(b.services - 1);
    let vip = Ipv4Addr::from(vaddr);
    let mut m = BTreeMap::new();
    m.insert(
        "no_service",
        frame64(&Frame::tcp((CLIENT, 40000), (Ipv4Addr::new(198, 18, 50, 2), 80), ACK)),
    );
    m.insert("tcp_new", frame64(&Frame::tcp((NEW_FLOW_CLIENT, 1), (vip, vport), SYN)));
    m.insert(
        "tcp_new_any_service",
        frame64(&Frame::tcp((NEW_FLOW_CLIENT, 1), (vip, vport), SYN)),
    );
    m.insert(
        "tcp_established",
        frame64(&Frame::tcp((CLIENT, 40001), (vip, vport), ACK)),
    );
    m.insert("udp_new", frame64(&Frame::udp((NEW_FLOW_CLIENT, 1), (vip, vport), b"")));
    m.insert(
        "udp_established",
        frame64(&Frame::udp((CLIENT, 40002), (vip, vport), b"")),
    );
    m.insert("tcp6_new", frame64(&Frame::tcp((NEW_FLOW_CLIENT6, 1), (VIP6, 80), SYN)));
    m.insert(
        "tcp6_established",
        frame64(&Frame::tcp((CLIENT6, 40001), (VIP6, 80), ACK)),
    );
    m.insert("udp6_new", frame64(&Frame::udp((NEW_FLOW_CLIENT6, 1), (VIP6, 80), b"")));
    // Placeholders until the flows exist (see `prime`).
    m.insert("tcp_reply", [0; FRAME_LEN]);
    m.insert("tcp6_reply", [0; FRAME_LEN]);
    Ok(Frames { by_path: m })
}

/// Creates the established TCP and UDP flows and the reply frame.
fn prime(b: &mut Bench, f: &mut Frames) -> Result<()> {
    let (vaddr, vport) = service_frontend(b.services - 1);
    let vip = Ipv4Addr::from(vaddr);
    let syn = frame64(&Frame::tcp((CLIENT, 40001), (vip, vport), SYN));
    let out = b.once(syn)?;
    let p = crate::packet::parse_and_verify(&out);
    if p.dst == vip {
        bail!("the SYN to {vip}:{vport} was not translated");
    }
    f.by_path.insert(
        "tcp_reply",
        frame64(&Frame::tcp((p.dst, p.dport), (CLIENT, 40001), SYN | ACK)),
    );
    let out = b.once(f.by_path["udp_established"])?;
    if crate::packet::parse_and_verify(&out).dst == vip {
        bail!("the UDP datagram to {vip}:{vport} was not translated");
    }
    let out = b.once(frame64(&Frame::tcp((CLIENT6, 40001), (VIP6, 80), SYN)))?;
    let p = crate::packet::parse_and_verify(&out);
    if p.dst == VIP6 {
        bail!("the SYN to [{VIP6}]:80 was not translated");
    }
    f.by_path.insert(
        "tcp6_reply",
        frame64(&Frame::tcp((p.dst, p.dport), (CLIENT6, 40001), SYN | ACK)),
    );
    Ok(())
}

/// One measurement of `repeat` runs: ns per run as the kernel reports it.
fn measure(fd: i32, frame: &[u8], repeat: u32) -> Result<f64> {
    let r = testrun::run_repeat(fd, frame, repeat)?;
    Ok(r.duration_ns as f64)
}

/// This process's resident memory in bytes (`VmRSS`).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .map_or(0, |kb| kb * 1024)
}

const MIB: f64 = 1024.0 * 1024.0;

/// One scale, loaded for the whole run, and what it measured.
struct Scale {
    bench: Bench,
    frames: Frames,
    /// raw[series] = one value per round.
    raw: BTreeMap<String, Vec<f64>>,
    /// Kernel memory of this scale's maps and programs, and the growth of
    /// the process's RSS while loading it.
    bpf_bytes: u64,
    rss_bytes: u64,
}

impl Scale {
    fn load(n: u32) -> Result<Scale> {
        let objects = super::bpf_objects("self");
        let rss = rss_bytes();
        let mut bench = Bench::new(n)?;
        let frames = frames(&mut bench)?;
        let bpf_bytes = super::bpf_objects("self")
            .iter()
            .filter(|(id, _)| !objects.contains_key(id))
            .map(|(_, o)| o.memlock)
            .sum();
        let rss_bytes = rss_bytes().saturating_sub(rss);
        eprintln!(
            "dp-bench: per-packet, {n} Services loaded: BPF maps and programs {:.1} MiB, process RSS +{:.1} MiB",
            bpf_bytes as f64 / MIB,
            rss_bytes as f64 / MIB
        );
        Ok(Scale {
            bench,
            frames,
            raw: BTreeMap::new(),
            bpf_bytes,
            rss_bytes,
        })
    }

    fn push(&mut self, series: String, value: f64) {
        self.raw.entry(series).or_default().push(value);
    }

    /// The start of this scale's part of a round: conntrack cleared, the
    /// established flows created again.
    fn prepare(&mut self) -> Result<()> {
        self.bench.clear_conntrack()?;
        prime(&mut self.bench, &mut self.frames)
    }

    /// The baselines, run directly (they do not rewrite).
    fn baselines(&mut self, repeat: u32) -> Result<()> {
        let any = self.frames.by_path["tcp_new"];
        let est = self.frames.by_path["tcp_established"];
        let empty = measure(self.bench.prog[names::EMPTY], &any, repeat)?;
        let lookup = measure(self.bench.prog[names::PARSE_LOOKUP], &est, repeat)?;
        self.push("baseline_empty".into(), empty);
        self.push("baseline_parse_lookup".into(), lookup);
        // The repeat loop's own per-run cost (the empty program) taken
        // out, comparable with the wrapped paths, whose wrapper
        // measurement takes it out too.
        self.push("baseline_parse_lookup_net".into(), lookup - empty);
        Ok(())
    }

    /// `repeat` new flows through the XDP wrapper, not measured: the
    /// round's clear put the elements of last round's entries at the head
    /// of conntrack's free list, just touched by the deletes and so
    /// cache-warm, and the first new-flow series measured after it would
    /// take them (5-15 % cheaper than the series after it, whichever path
    /// comes first: a series order effect, not a cost of the path).
    fn warm_up(&mut self, repeat: u32) -> Result<()> {
        let bytes = self.frames.by_path["tcp_new"];
        self.bench.set_frame(bytes, VARY_FLOW)?;
        measure(self.bench.prog[names::WRAP_XDP], &bytes, repeat)?;
        Ok(())
    }

    /// One series once: the frame-restoring wrapper alone, then the
    /// program through it, every run checked to have taken `path`.
    fn series(&mut self, prog: &str, wrap: &str, frame_only: &str, path: &PathSpec, repeat: u32) -> Result<()> {
        let b = &mut self.bench;
        let bytes = self.frames.by_path[path.name];
        b.set_frame(bytes, path.vary)?;
        let overhead = measure(b.prog[frame_only], &bytes, repeat)?;
        let before = b.reasons()?;
        let total = measure(b.prog[wrap], &bytes, repeat)?;
        let after = b.reasons()?;
        let took = after[path.reason as usize] - before[path.reason as usize];
        if took != repeat as u64 {
            let deltas: Vec<String> = Reason::ALL
                .iter()
                .zip(before.iter().zip(&after))
                .filter(|(_, (b, a))| a != b)
                .map(|(r, (b, a))| format!("{r:?}: {}", a - b))
                .collect();
            bail!(
                "{prog} {} at {} Services: {took} of {repeat} runs counted as {:?} (counted: {}): the path is not what it claims",
                path.name,
                b.services,
                path.reason,
                deltas.join(", ")
            );
        }
        self.push(format!("{prog}_{}", path.name), total - overhead);
        self.push(format!("{prog}_{}_wrapper", path.name), overhead);
        Ok(())
    }
}

/// One round: every scale prepared, then each series measured at every
/// scale in turn (`order`), so that the values a paired ratio divides are
/// milliseconds apart. Each scale still sees the same sequence of series
/// every round (its own maps, its own conntrack).
fn measure_round(scales: &mut [Scale], order: &[usize], repeat: u32) -> Result<()> {
    for &i in order {
        scales[i].prepare()?;
        scales[i].warm_up(repeat)?;
    }
    for &i in order {
        scales[i].baselines(repeat)?;
    }
    for (prog, wrap, frame_only) in [
        ("xdp", names::WRAP_XDP, names::FRAME_XDP),
        ("tc", names::WRAP_TC, names::FRAME_TC),
    ] {
        for path in PATHS {
            for &i in order {
                scales[i].series(prog, wrap, frame_only, path, repeat)?;
            }
        }
    }
    Ok(())
}

/// Per round, the value at a scale over the value at the reference scale in
/// the same round (measured minutes apart at most, so drift of the machine
/// between rounds cancels). Not finite (a reference of 0) becomes `null`
/// in the JSON and is left out of the summary.
fn paired_ratios(values: &[f64], reference: &[f64]) -> Vec<f64> {
    values
        .iter()
        .zip(reference)
        .map(|(v, r)| (v / r * 1e4).round() / 1e4)
        .collect()
}

pub fn run(cfg: &Config) -> Result<Value> {
    // Every scale is loaded up front and kept for the whole run, so that
    // each round can measure all of them in turn.
    let mut scales: Vec<Scale> = Vec::new();
    for &n in &cfg.scales {
        scales.push(Scale::load(n)?);
    }
    let bpf_total: u64 = scales.iter().map(|s| s.bpf_bytes).sum();
    eprintln!(
        "dp-bench: per-packet, {} scales loaded together: BPF maps and programs {:.1} MiB, process RSS {:.1} MiB",
        scales.len(),
        bpf_total as f64 / MIB,
        rss_bytes() as f64 / MIB
    );
    // Loading may use every CPU (the agent's table computation); the rounds
    // run on one (see `PIN_CPU`).
    let pinned = super::Pinned::to(super::PIN_CPU)?;
    let mut orders: Vec<Vec<u32>> = Vec::new();
    for round in 0..cfg.rounds {
        // The order rotates by one from round to round, so that no scale
        // always comes first or always follows the same one.
        let order: Vec<usize> = (0..scales.len()).map(|k| (k + round) % scales.len()).collect();
        measure_round(&mut scales, &order, cfg.repeat)?;
        orders.push(order.iter().map(|&i| scales[i].bench.services).collect());
        eprintln!("dp-bench:   per-packet round {}/{} done", round + 1, cfg.rounds);
    }
    drop(pinned);
    // Paired ratios need the 1-Service scale measured in the same rounds.
    let reference = scales.iter().position(|s| s.bench.services == 1);
    if reference.is_none() {
        eprintln!(
            "dp-bench: per-packet: 1 Service not among the scales measured, so no paired ratios (add 1 to --scales)"
        );
    }
    let mut scales_out = Vec::new();
    for s in &scales {
        let mut series = serde_json::Map::new();
        for (k, v) in &s.raw {
            series.insert(k.clone(), json!({ "raw_ns": v, "summary": super::summary(v) }));
        }
        let mut out = json!({
            "services": s.bench.services,
            "series": series,
            "memory": {
                "bpf_bytes": s.bpf_bytes,
                "rss_growth_bytes": s.rss_bytes,
            },
        });
        if let Some(one) = reference {
            let mut ratios = serde_json::Map::new();
            for (k, v) in &s.raw {
                let r = paired_ratios(v, &scales[one].raw[k]);
                ratios.insert(k.clone(), json!({ "raw": r, "summary": super::summary(&r) }));
            }
            out["paired_ratio_to_1"] = ratios.into();
        }
        scales_out.push(out);
    }
    let paths: Vec<Value> = PATHS
        .iter()
        .map(|p| json!({ "name": p.name, "what": p.what }))
        .collect();
    Ok(json!({
        "part": "per_packet",
        "unit": "ns per packet (BPF_PROG_TEST_RUN duration / repeat; wrapper cost subtracted)",
        "method": "All scales (numbers of Services) loaded at once, each in its own copy of the bench and baseline objects; a round first clears each scale's conntrack and creates its established flows again, runs one unmeasured series of new flows (the clear leaves the deleted entries' elements, cache-warm, at the head of conntrack's free list: the first new-flow series would take them and come out 5-15 % cheaper than the next, whichever path it is), then measures each series once at every scale in turn (`repeat` runs in one BPF_PROG_TEST_RUN call each), the order of the scales rotating by one from round to round (`round_orders`), so that drift of the machine hits every scale alike and the values a paired ratio divides are milliseconds apart; the frame-restoring wrapper alone is measured just before each path and subtracted. Baselines run directly (they do not rewrite). The rounds run on one CPU (`pinned_cpu`): BPF_PROG_TEST_RUN runs the program on the calling thread's CPU, so no migration falls between the two values of a paired ratio. Reason counters checked: every run took its path. `paired_ratio_to_1`: per round, a series' value at a scale over its value at 1 Service in the same round, to 4 decimals (present when 1 was measured in the same run).",
        "repeat": cfg.repeat,
        "pinned_cpu": super::PIN_CPU,
        "kernel_features": dataplane::bpf::kernel::features(),
        "globals": "as the agent loads the programs on this kernel (kernel features, default SNAT ports), the flood guard on with a quota it never reaches, host routing off",
        "rounds": cfg.rounds,
        "round_orders": orders,
        "backends_per_service": BACKENDS,
        "selection": "maglev (default table size)",
        "paths": paths,
        "scales": scales_out,
    }))
}
