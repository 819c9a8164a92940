//! Control-plane benchmark: the real release `dataplane` binary with
//! `--source kubernetes --no-attach --no-pin` against the in-process fake
//! API server, N Services x 4 endpoints (one EndpointSlice each), and, for
//! comparison, the time `iptables-restore` and `nft -f` take to install
//! kube-proxy's rules for the same Services (`kube_rules`). Per scale it
//! reports
//!
//! - cold start: from spawning the agent to the first sync that programmed
//!   every frontend (process start, BPF load, list, compute, map writes),
//!   and that sync's own compute + map-write time; each agent starts once
//!   the machine is quiet (`wait_quiet`: the kernel frees the previous
//!   agent's maps for about a second after it exits);
//! - change latency: from one EndpointSlice change in the API to the sync
//!   that wrote it, over `changes` changes;
//! - the agent's peak RSS (VmHWM);
//! - the same with the Services as a manifest directory (`--source files`,
//!   one YAML file per Service and its slice, polled every 10 ms): cold
//!   start, and one file rewritten per change, timed from the write;
//! - `iptables-restore` and `nft -f` wall time for the same rule sets, each
//!   in a fresh namespace, stopped after `install_limit` (then reported as
//!   stopped, not as a number).
//!
//! Agent times come from its JSON log timestamps and this process's wall
//! clock (the same clock). Everything runs inside network namespaces
//! created here (the fake listens on a namespace's loopback); nothing is
//! attached.

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use dataplane_common::bench::service_frontend;
use serde_json::{json, Value};

use super::kube_rules::{self, SvcPort};
use crate::{
    agent::TempDir,
    fake_api::{objects, FakeApi, Kind},
    netns::{self, Netns},
};

#[derive(Clone)]
pub struct Config {
    pub scales: Vec<usize>,
    /// Agent runs (cold start + changes) per scale.
    pub rounds: usize,
    /// EndpointSlice changes timed per agent run.
    pub changes: usize,
    /// `iptables-restore` / `nft -f` are stopped after this.
    pub install_limit: Duration,
    /// Bound on one cold start (the agent is stopped and the run fails).
    pub cold_timeout: Duration,
    /// Time `iptables-restore` and `nft -f` too (`dp-bench --agent-only`
    /// skips them, for quick looks at the agent).
    pub kube_proxy: bool,
}

pub const ENDPOINTS: usize = 4;
pub const BACKEND_PORT: u16 = 8080;
const NODE: &str = "bench-node";
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
const DEBOUNCE_MS: u64 = 2;

/// Service `i`'s frontend for kube-proxy's rule sets: the per-packet
/// benchmark's layout, VIP 198.19.0.0 + (i mod 65536), port 80 + i / 65536,
/// so that 100,000 fit in 198.19.0.0/16 and one `iptables-restore` / `nft`
/// run installs them all (rules do not mind two Services on one address).
fn frontend(i: usize) -> (Ipv4Addr, u16) {
    let (addr, port) = service_frontend(i as u32);
    (Ipv4Addr::from(addr), port)
}

/// IPv4 ClusterIPs in 198.19.0.0/16 for the agent.
const V4_SERVICES: usize = 65_536;

/// Service `i`'s ClusterIP in the fake API: unique, as the API server
/// allocates them (the agent skips a Service whose ClusterIP another one
/// holds). The first 65,536 are 198.19.0.0 + i; the others are IPv6
/// (2001:db8:19::/64, single-stack Services with IPv6 endpoints), since
/// 198.19.0.0/16 holds no more. Port 80 for all.
fn cluster_ip(i: usize) -> IpAddr {
    if i < V4_SERVICES {
        IpAddr::V4(frontend(i).0)
    } else {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, (i >> 16) as u16, i as u16))
    }
}

/// Endpoint `j` of Service `i`; `gen` shifts the address so a change is a
/// real change.
fn endpoint(i: usize, j: usize, gen: usize) -> Ipv4Addr {
    let n = (i * ENDPOINTS + j + gen * 7) % (250 * 250);
    Ipv4Addr::new(198, 18, (n / 250) as u8, (n % 250 + 1) as u8)
}

/// Endpoint `j` of Service `i` in the fake API: of the ClusterIP's family.
fn endpoint_addr(i: usize, j: usize, gen: usize) -> IpAddr {
    let v4 = endpoint(i, j, gen);
    if i < V4_SERVICES {
        IpAddr::V4(v4)
    } else {
        let [_, _, a, b] = v4.octets();
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0x18,
            0,
            0,
            0,
            0,
            u16::from_be_bytes([a, b]),
        ))
    }
}

fn namespace(i: usize) -> String {
    format!("ns{}", i % 50)
}

/// Service `i`, as the fake API holds it.
fn service(i: usize) -> Value {
    let mut svc = objects::service(
        &namespace(i),
        &format!("svc{i}"),
        &cluster_ip(i).to_string(),
        &[("http", 80, "TCP")],
    );
    if i >= V4_SERVICES {
        svc["spec"]["ipFamilies"] = json!(["IPv6"]);
    }
    svc
}

fn slice(i: usize, gen: usize) -> Value {
    let addrs: Vec<String> = (0..ENDPOINTS).map(|j| endpoint_addr(i, j, gen).to_string()).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let mut s = objects::slice(
        &namespace(i),
        &format!("svc{i}-abcde"),
        &format!("svc{i}"),
        &[("http", BACKEND_PORT, "TCP")],
        &refs,
    );
    if i >= V4_SERVICES {
        s["addressType"] = "IPv6".into();
    }
    s
}

/// The same Services as kube-proxy sees them (for its rule sets).
fn svc_ports(n: usize) -> Vec<SvcPort> {
    (0..n)
        .map(|i| {
            let (vip, port) = frontend(i);
            SvcPort {
                namespace: namespace(i),
                name: format!("svc{i}"),
                port_name: "http".into(),
                vip,
                port,
                protocol: kube_rules::Proto::Tcp,
                node_port: None,
                endpoints: (0..ENDPOINTS).map(|j| (endpoint(i, j, 0), BACKEND_PORT)).collect(),
            }
        })
        .collect()
}

/// Parses tracing-subscriber's RFC 3339 UTC timestamp
/// (`2026-05-02T10:11:12.123456Z`) into microseconds since the epoch.
pub fn parse_ts(ts: &str) -> Option<i64> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, dd) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>());
    let (h, mi, s) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    // Fraction to microseconds, whatever its number of digits.
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
    let us: i64 = digits.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + s) * 1_000_000) + us)
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

/// One `sync applied` line of the agent's JSON log.
#[derive(Debug, Clone, Copy)]
struct SyncLine {
    at_us: i64,
    sync: u64,
    frontends: u64,
    backends: u64,
    updated: u64,
    /// The desired-state computation's share of `elapsed_us`.
    compute_us: u64,
    elapsed_us: u64,
    /// A relist or a watch error during the run would distort the numbers.
    relists: u64,
    watch_restarts: u64,
}

struct AgentProc {
    child: Child,
    log: PathBuf,
    /// When it was spawned (µs since the epoch).
    spawned_us: i64,
}

impl AgentProc {
    fn syncs(&self) -> Vec<SyncLine> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("sync applied"))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "sync applied")
            .filter_map(|v| {
                let f = &v["fields"];
                Some(SyncLine {
                    at_us: parse_ts(v["timestamp"].as_str()?)?,
                    sync: f["sync"].as_u64()?,
                    frontends: f["frontends"].as_u64()?,
                    backends: f["backends"].as_u64()?,
                    updated: f["updated"].as_u64()?,
                    compute_us: f["compute_us"].as_u64()?,
                    elapsed_us: f["elapsed_us"].as_u64()?,
                    relists: f["relists"].as_u64()?,
                    watch_restarts: f["watch_restarts"].as_u64()?,
                })
            })
            .collect()
    }

    /// The log's lines up to `until_us` as (ms since `from_us`, message and
    /// fields): where the cold start's time goes.
    fn phases(&self, from_us: i64, until_us: i64) -> Vec<(f64, String)> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| {
                let at = parse_ts(v["timestamp"].as_str()?)?;
                let mut f = v["fields"].as_object()?.clone();
                let msg = f.remove("message")?.as_str()?.to_string();
                let rest: Vec<String> = f.iter().map(|(k, v)| format!("{k}={v}")).collect();
                (at <= until_us).then(|| ((at - from_us) as f64 / 1000.0, format!("{msg} {}", rest.join(" "))))
            })
            .collect()
    }

    /// Waits for a sync line matching `pred`, polling the log every 200 µs
    /// (the timestamps, not the polling, give the times).
    fn wait_sync(&mut self, timeout: Duration, pred: impl Fn(&SyncLine) -> bool) -> Result<SyncLine> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(s) = self.syncs().into_iter().find(&pred) {
                return Ok(s);
            }
            if let Some(st) = self.child.try_wait()? {
                bail!("the agent exited ({st}); its log:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        bail!(
            "no matching sync within {timeout:?}; the end of the agent's log:\n{}",
            self.log_tail()
        )
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// (VmHWM, VmRSS) in KiB.
    fn memory_kib(&self) -> Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} not in /proc/PID/status"))
        };
        Ok((field("VmHWM:")?, field("VmRSS:")?))
    }

    /// The kernel memory of the agent's maps, as the kernel accounts it
    /// (`memlock` in each map fd's fdinfo: since 6.4 what the map uses, a
    /// preallocated map its whole size), per map name, in KiB.
    fn maps_kernel_kib(&self) -> Vec<(String, u64, u32)> {
        super::bpf_objects(&self.child.id().to_string())
            .into_iter()
            .filter(|((kind, _), _)| *kind == "map")
            .map(|((_, id), o)| {
                let name = aya::maps::MapInfo::from_id(id)
                    .ok()
                    .and_then(|i| i.name_as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("map {id}"));
                (name, o.memlock.div_ceil(1024), o.max_entries)
            })
            .collect()
    }

    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill on the PID of our own, not yet reaped, child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Frontends of `n` Services: one per Service (a single port each) and one
/// per ClusterIP (its entry for the ports the Service lacks).
fn frontends(n: usize) -> usize {
    let vips: std::collections::HashSet<IpAddr> = (0..n).map(cluster_ip).collect();
    n + vips.len()
}

/// `--services-max-entries` for `n` Services: the default (131,072
/// frontends) where they fit, else the next power of two (100,000
/// Services are 200,000 frontends).
fn services_max_entries(n: usize) -> u32 {
    let default = dataplane_common::limits::MAX_SERVICES;
    (frontends(n) as u32).max(default).next_power_of_two()
}

/// The fake API with `n` Services in it, running in the current namespace.
async fn fill(n: usize) -> Result<FakeApi> {
    let fake = FakeApi::start().await?;
    fake.apply(Kind::Node, objects::node(NODE, "198.18.0.1".parse()?));
    for i in 0..n {
        fake.apply(Kind::Service, service(i));
        fake.apply(Kind::EndpointSlice, slice(i, 0));
    }
    // The initial objects come from the list, not from a replayed history.
    fake.compact();
    Ok(fake)
}

/// The CPU time of the whole machine so far, from `/proc/stat`'s first
/// line: (busy, total) in clock ticks, idle and iowait counting as idle.
fn cpu_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().context("a /proc/stat field"))
        .collect::<Result<_>>()?;
    let total: u64 = f.iter().sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// A cold start waits until the machine is this idle...
const QUIET_BUSY: f64 = 0.10;
/// ...over a window this long...
const QUIET_WINDOW: Duration = Duration::from_millis(250);
/// ...for at most this long, then starts anyway (and says so).
const QUIET_LIMIT: Duration = Duration::from_secs(30);

/// How the machine was when a cold start began.
struct Quiet {
    waited_ms: f64,
    /// Busy share of all CPUs over the last window before the start.
    busy: f64,
}

/// Waits until the CPUs were at most `QUIET_BUSY` busy over one
/// `QUIET_WINDOW`, for at most `QUIET_LIMIT`. The kernel frees a stopped
/// agent's maps in a worker thread after the process exits (at 100,000
/// Services about a second of CPU in `htab_map_free`), and a namespace
/// torn down after `nft -f` frees its rules the same way: a cold start
/// begun meanwhile shares the two CPUs with that and measures it too. A
/// node's agent starts without either (a restart reuses its pinned maps).
fn wait_quiet() -> Result<Quiet> {
    let start = Instant::now();
    loop {
        let (b0, t0) = cpu_ticks()?;
        std::thread::sleep(QUIET_WINDOW);
        let (b1, t1) = cpu_ticks()?;
        let busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64;
        if busy <= QUIET_BUSY || start.elapsed() >= QUIET_LIMIT {
            if busy > QUIET_BUSY {
                eprintln!(
                    "dp-bench:   the machine stayed busy ({:.0} % of the CPUs) for {} s: starting the agent anyway",
                    busy * 100.0,
                    QUIET_LIMIT.as_secs()
                );
            }
            return Ok(Quiet {
                waited_ms: start.elapsed().as_secs_f64() * 1000.0,
                busy,
            });
        }
    }
}

/// Starts the release agent (`--no-attach --no-pin`, JSON log into `dir`)
/// with `source_args` for `n` Services.
fn spawn_agent(bin: &Path, dir: &TempDir, source_args: &[&str], n: usize, env: &[(&str, &Path)]) -> Result<AgentProc> {
    let log = dir.0.join("agent.log");
    let logf = std::fs::File::create(&log)?;
    let mut cmd = Command::new(bin);
    cmd.args(["--log-format", "json", "run", "--no-attach", "--no-pin"])
        .args(source_args)
        .args(["--health-bind", "127.0.0.1:10256"])
        .args(["--services-max-entries", &services_max_entries(n).to_string()])
        .env("DATAPLANE_LOG", "info")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let spawned_us = now_us();
    let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
    Ok(AgentProc { child, log, spawned_us })
}

/// A cold start: the first sync that programmed all Services, the time
/// from spawning the agent to it (ms), and the log lines up to it.
type Cold = (SyncLine, f64, Vec<(f64, String)>);

/// Waits for the first sync that programmed all `n` Services.
fn wait_cold(agent: &mut AgentProc, n: usize, cfg: &Config) -> Result<Cold> {
    let full = (frontends(n) as u64, (n * ENDPOINTS) as u64);
    let cold =
        tokio::task::block_in_place(|| agent.wait_sync(cfg.cold_timeout, |s| (s.frontends, s.backends) == full))?;
    let cold_ms = (cold.at_us - agent.spawned_us) as f64 / 1000.0;
    eprintln!(
        "dp-bench:   agent: all {n} Services programmed {cold_ms:.0} ms after start (first sync's compute + map writes {:.0} ms)",
        cold.elapsed_us as f64 / 1000.0
    );
    let phases = agent.phases(agent.spawned_us, cold.at_us);
    for (ms, line) in &phases {
        eprintln!("dp-bench:     {ms:8.1} ms  {line}");
    }
    Ok((cold, cold_ms, phases))
}

/// What `cfg.changes` single-slice changes took.
struct Changes {
    /// From the change (API write, file write) to the sync that wrote it.
    latencies_ms: Vec<f64>,
    /// That sync's compute + map writes.
    sync_work_ms: Vec<f64>,
    compute_ms: Vec<f64>,
}

/// Makes change `c` with `change` for each of `cfg.changes`, each timed
/// from just before `change` to the agent's next sync that updated an
/// entry.
async fn time_changes(
    agent: &mut AgentProc,
    cfg: &Config,
    mut change: impl FnMut(usize) -> Result<()>,
) -> Result<Changes> {
    let mut out = Changes {
        latencies_ms: Vec::new(),
        sync_work_ms: Vec::new(),
        compute_ms: Vec::new(),
    };
    let mut last_sync = agent.syncs().last().map_or(0, |s| s.sync);
    for c in 0..cfg.changes {
        let before = now_us();
        change(c)?;
        let s =
            tokio::task::block_in_place(|| agent.wait_sync(CHANGE_TIMEOUT, |s| s.sync > last_sync && s.updated >= 1))?;
        out.latencies_ms.push((s.at_us - before) as f64 / 1000.0);
        out.sync_work_ms.push(s.elapsed_us as f64 / 1000.0);
        out.compute_ms.push(s.compute_us as f64 / 1000.0);
        last_sync = agent.syncs().last().map_or(s.sync, |l| l.sync);
        // Let the change settle so the next one is a separate sync.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(out)
}

/// One agent run against `fake` (which holds `n` Services): cold start,
/// then `changes` EndpointSlice changes with generations from `gen0` on.
async fn agent_run(bin: &Path, fake: &FakeApi, n: usize, round: usize, cfg: &Config, gen0: usize) -> Result<Value> {
    let dir = TempDir::new("dataplane-bench");
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig())?;
    let quiet = tokio::task::block_in_place(wait_quiet)?;
    let mut agent = spawn_agent(
        bin,
        &dir,
        &["--source", "kubernetes", "--node-name", NODE],
        n,
        &[("KUBECONFIG", &kubeconfig)],
    )?;
    let (cold, cold_ms, phases) = wait_cold(&mut agent, n, cfg)?;
    fake.wait_watches(Kind::EndpointSlice, round + 1, cfg.cold_timeout)
        .await?;

    let changes = time_changes(&mut agent, cfg, |c| {
        fake.apply(Kind::EndpointSlice, slice((c * 197) % n, gen0 + c + 1));
        Ok(())
    })
    .await?;
    let scrape = tokio::task::block_in_place(|| scrape_cost(&mut agent))?;
    let (hwm_kib, rss_kib) = agent.memory_kib()?;
    let maps = agent.maps_kernel_kib();
    let maps_kib: u64 = maps.iter().map(|(_, k, _)| k).sum();
    let last = agent.syncs().last().copied();
    agent.stop();
    let Changes {
        latencies_ms,
        sync_work_ms,
        compute_ms,
    } = changes;
    if !latencies_ms.is_empty() {
        eprintln!(
            "dp-bench:   agent: {} changes, median {:.1} ms to the map write; peak RSS {:.0} MiB",
            latencies_ms.len(),
            median(&latencies_ms),
            hwm_kib as f64 / 1024.0
        );
    }
    Ok(json!({
        "quiet_wait_ms": quiet.waited_ms,
        "busy_before_start": quiet.busy,
        "cold_start_to_all_programmed_ms": cold_ms,
        "cold_sync_compute_and_apply_ms": cold.elapsed_us as f64 / 1000.0,
        "cold_sync_compute_ms": cold.compute_us as f64 / 1000.0,
        "cold_start_log_ms": phases.iter().map(|(ms, line)| json!([ms, line])).collect::<Vec<_>>(),
        "change_to_map_write_ms": latencies_ms,
        "change_sync_compute_and_apply_ms": sync_work_ms,
        "change_sync_compute_ms": compute_ms,
        "peak_rss_mib": hwm_kib as f64 / 1024.0,
        "rss_at_end_mib": rss_kib as f64 / 1024.0,
        "maps_kernel_mib": maps_kib as f64 / 1024.0,
        "maps_kernel_kib": maps.iter().map(|(n, k, max)| json!({"map": n, "kib": k, "max_entries": max})).collect::<Vec<_>>(),
        "agent_relists": last.map_or(0, |l| l.relists),
        "agent_watch_restarts": last.map_or(0, |l| l.watch_restarts),
        "scrape": scrape,
    }))
}

/// The manifest-directory variant's poll interval (`--poll-interval-ms`;
/// the default is 100): the least time between two checks of the
/// directory. inotify wakes the agent on a change, but a change that comes
/// sooner than one interval after the previous check waits for it (so does
/// every change when inotify is unavailable and the agent polls), so a
/// short one keeps that wait from hiding the rest.
const FILES_POLL_MS: u64 = 10;

/// Writes Service `i` and its EndpointSlice (generation `gen`) as
/// `svc{i}.yaml` in `dir`, two YAML documents, the way a user who keeps
/// one file per application would; a few big files would make every change
/// re-parse thousands of objects. Written to a hidden temporary file and
/// renamed, as editors and deployment tools do, so the agent never reads a
/// half-written file.
fn write_manifest(dir: &Path, i: usize, gen: usize) -> Result<()> {
    let mut svc = service(i);
    let meta = svc["metadata"].as_object_mut().expect("an object");
    meta.remove("uid");
    meta.remove("managedFields");
    svc["apiVersion"] = "v1".into();
    svc["kind"] = "Service".into();
    let mut sl = slice(i, gen);
    sl["apiVersion"] = "discovery.k8s.io/v1".into();
    sl["kind"] = "EndpointSlice".into();
    let text = format!(
        "{}---\n{}",
        serde_yaml_ng::to_string(&svc)?,
        serde_yaml_ng::to_string(&sl)?
    );
    let tmp = dir.join(format!(".svc{i}.yaml.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(format!("svc{i}.yaml")))?;
    Ok(())
}

/// One agent run on the manifest directory `manifests` (which holds `n`
/// Services): cold start, then `changes` rewrites of one Service's file
/// with a new EndpointSlice generation from `gen0` on, each timed from the
/// write to the sync that wrote it.
async fn files_run(bin: &Path, manifests: &Path, n: usize, cfg: &Config, gen0: usize) -> Result<Value> {
    let dir = TempDir::new("dataplane-bench");
    let interval = FILES_POLL_MS.to_string();
    let source = [
        "--source",
        "files",
        "--dir",
        manifests.to_str().context("a UTF-8 path")?,
        "--poll-interval-ms",
        &interval,
    ];
    let quiet = tokio::task::block_in_place(wait_quiet)?;
    let mut agent = spawn_agent(bin, &dir, &source, n, &[])?;
    let (cold, cold_ms, _) = wait_cold(&mut agent, n, cfg)?;
    let changes = time_changes(&mut agent, cfg, |c| {
        write_manifest(manifests, (c * 197) % n, gen0 + c + 1)
    })
    .await?;
    let (hwm_kib, rss_kib) = agent.memory_kib()?;
    agent.stop();
    eprintln!(
        "dp-bench:   agent on the manifest directory (--poll-interval-ms {FILES_POLL_MS}): {} changes, median {:.1} ms from the file write to the map write; peak RSS {:.0} MiB",
        changes.latencies_ms.len(),
        median(&changes.latencies_ms),
        hwm_kib as f64 / 1024.0
    );
    Ok(json!({
        "quiet_wait_ms": quiet.waited_ms,
        "busy_before_start": quiet.busy,
        "cold_start_to_all_programmed_ms": cold_ms,
        "cold_sync_compute_and_apply_ms": cold.elapsed_us as f64 / 1000.0,
        "change_to_map_write_ms": changes.latencies_ms,
        "change_sync_compute_and_apply_ms": changes.sync_work_ms,
        "change_sync_compute_ms": changes.compute_ms,
        "peak_rss_mib": hwm_kib as f64 / 1024.0,
        "rss_at_end_mib": rss_kib as f64 / 1024.0,
    }))
}

/// Scrapes of `/metrics` timed, then traced.
const SCRAPES_TIMED: usize = 5;
const SCRAPES_TRACED: usize = 2;
/// The agent's default metrics address (inside the bench's namespace).
const METRICS: ([u8; 4], u16) = ([127, 0, 0, 1], 10249);

/// One `GET /metrics` (a connection of its own, as the agent answers one
/// request per connection): the whole response.
fn scrape_once() -> Result<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect_timeout(&METRICS.into(), Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(300)))?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    if !out.starts_with("HTTP/1.1 200") {
        bail!("/metrics answered {:?}", out.lines().next().unwrap_or_default());
    }
    Ok(out)
}

/// What a `/metrics` scrape costs the agent: wall time of
/// `SCRAPES_TIMED` scrapes one after the other, then the agent's syscalls
/// (all threads, `strace -c -f`) over `SCRAPES_TRACED` more, per scrape.
/// Waits first for the datapath series (the first read of the maps).
fn scrape_cost(agent: &mut AgentProc) -> Result<Value> {
    let start = Instant::now();
    loop {
        if scrape_once().is_ok_and(|t| t.contains("dataplane_map_entries")) {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("no datapath series in /metrics after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut ms = Vec::new();
    let mut bytes = 0;
    for _ in 0..SCRAPES_TIMED {
        let t = Instant::now();
        bytes = scrape_once()?.len();
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let text = scrape_once()?;
    let sample = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
    };
    let refresh_ms = sample("dataplane_datapath_snapshot_duration_seconds").map(|s| s * 1000.0);
    let (syscalls, bpf) = traced_scrapes(agent.child.id())?;
    let per = |n: u64| n as f64 / SCRAPES_TRACED as f64;
    eprintln!(
        "dp-bench:   agent: /metrics scrape median {:.2} ms ({} bytes), {:.0} syscalls per scrape ({:.0} bpf){}",
        median(&ms),
        bytes,
        per(syscalls),
        per(bpf),
        refresh_ms.map_or(String::new(), |r| format!("; background read of the maps {r:.1} ms"))
    );
    Ok(json!({
        "scrape_ms": ms,
        "scrape_bytes": bytes,
        "syscalls_per_scrape": per(syscalls),
        "bpf_syscalls_per_scrape": per(bpf),
        "traced_scrapes": SCRAPES_TRACED,
        "background_read_ms": refresh_ms,
    }))
}

/// The scrape costs of all runs of one scale.
fn scrape_summary(runs: &[Value]) -> Value {
    let of = |key: &str| -> Vec<f64> {
        runs.iter()
            .flat_map(|r| match &r["scrape"][key] {
                Value::Array(a) => a.iter().filter_map(Value::as_f64).collect(),
                x => x.as_f64().into_iter().collect::<Vec<_>>(),
            })
            .collect()
    };
    json!({
        "scrape_ms": super::summary(&of("scrape_ms")),
        "syscalls_per_scrape": super::summary(&of("syscalls_per_scrape")),
        "bpf_syscalls_per_scrape": super::summary(&of("bpf_syscalls_per_scrape")),
        "background_read_ms": super::summary(&of("background_read_ms")),
    })
}

/// The agent's syscalls (all, and `bpf`) while `SCRAPES_TRACED` scrapes
/// run, counted by `strace -c -f` attached to every thread of `pid`
/// (started and stopped by its PID here). Anything else the agent does
/// meanwhile counts too (a background read of the maps: every 10 s by
/// default, rarely inside the window).
fn traced_scrapes(pid: u32) -> Result<(u64, u64)> {
    use std::io::BufRead;
    let out = TempDir::new("dataplane-bench-strace");
    let summary = out.0.join("strace.txt");
    let mut strace = Command::new("strace")
        .args(["-c", "-f", "-o"])
        .arg(&summary)
        .args(["-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting strace (apt-get install strace)")?;
    // "Process PID attached with N threads" once every thread is traced
    // (older strace: one "attached" line per thread).
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))?.count();
    let mut err = std::io::BufReader::new(strace.stderr.take().context("strace stderr")?);
    let mut attached = 0;
    let mut line = String::new();
    while attached < threads {
        line.clear();
        if err.read_line(&mut line)? == 0 {
            bail!("strace ended before attaching to the agent");
        }
        if line.contains("attached with") {
            break;
        }
        attached += usize::from(line.contains("attached"));
    }
    let scraped: Result<()> = (0..SCRAPES_TRACED).try_for_each(|_| scrape_once().map(drop));
    // SAFETY: kill on the PID of our own, not yet reaped, child.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    // strace prints the detaches on stderr: drain it so it can exit.
    std::io::copy(&mut err, &mut std::io::sink())?;
    strace.wait()?;
    scraped?;
    let text = std::fs::read_to_string(&summary)?;
    // `% time seconds usecs/call calls errors syscall`, the total line too.
    let calls = |name: &str| -> Option<u64> {
        let l = text.lines().find(|l| l.split_whitespace().last() == Some(name))?;
        l.split_whitespace().nth(3)?.parse().ok()
    };
    let total = calls("total").with_context(|| format!("no total in strace's summary:\n{text}"))?;
    Ok((total, calls("bpf").unwrap_or(0)))
}

/// Runs `cmd` in a fresh namespace with `input` on stdin; stops it (by its
/// PID) after `limit`. Returns the JSON record of what happened.
pub fn timed_install(cmd: &[&str], input: String, limit: Duration) -> Result<Value> {
    let ns = Netns::new(format!("{}-install", netns::unique_prefix()))?;
    // stderr to a file: a full pipe must not stall the command.
    let dir = TempDir::new("dp-bench-install");
    let err_path = dir.0.join("stderr");
    let err_file = std::fs::File::create(&err_path)?;
    let t = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(err_file)
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    // A writer thread, so that a command that stops reading cannot block
    // the time limit.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if t.elapsed() > limit {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = t.elapsed().as_secs_f64();
    let out = match status {
        Some(st) => {
            if !st.success() {
                let err = std::fs::read_to_string(&err_path).unwrap_or_default();
                bail!("{cmd:?} failed ({st}): {}", err.trim());
            }
            json!({ "status": "done", "seconds": elapsed })
        }
        None => {
            // `ip netns exec` execs the command: this PID is the command's.
            let _ = child.kill();
            let _ = child.wait();
            json!({ "status": "stopped", "limit_s": limit.as_secs_f64(), "seconds": Value::Null })
        }
    };
    let _ = writer.join();
    drop(ns);
    Ok(out)
}

fn tool_version(cmd: &[&str]) -> String {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn summary_of(runs: &[Value], key: &str) -> Value {
    let v: Vec<f64> = runs
        .iter()
        .flat_map(|r| match &r[key] {
            Value::Array(a) => a.iter().filter_map(Value::as_f64).collect::<Vec<_>>(),
            x => x.as_f64().into_iter().collect(),
        })
        .collect();
    super::summary(&v)
}

/// One scale: the fake API and the agent runs in one namespace, then the
/// two rule installs each in a fresh one.
fn scale(bin: &Path, n: usize, cfg: &Config) -> Result<Value> {
    let ns = Netns::new(format!("{}-cp", netns::unique_prefix()))?;
    let bin = bin.to_path_buf();
    let cfg2 = cfg.clone();
    // This thread enters the namespace before the runtime starts, so the
    // runtime's threads and the agent (a child) are in it too.
    let runs = ns
        .run(move || -> Result<(Vec<Value>, Vec<Value>)> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async {
                let t = Instant::now();
                let fake = fill(n).await?;
                eprintln!(
                    "dp-bench:   fake API holds {n} Services x {ENDPOINTS} endpoints ({:.1} s to create)",
                    t.elapsed().as_secs_f64()
                );
                let mut runs = Vec::new();
                for round in 0..cfg2.rounds {
                    runs.push(agent_run(&bin, &fake, n, round, &cfg2, round * cfg2.changes).await?);
                }
                drop(fake);
                // The same Services as a manifest directory.
                let t = Instant::now();
                let manifests = TempDir::new("dataplane-bench-manifests");
                for i in 0..n {
                    write_manifest(&manifests.0, i, 0)?;
                }
                eprintln!(
                    "dp-bench:   manifest directory holds {n} Services x {ENDPOINTS} endpoints, one file each ({:.1} s to write)",
                    t.elapsed().as_secs_f64()
                );
                let mut files_runs = Vec::new();
                for round in 0..cfg2.rounds {
                    files_runs.push(files_run(&bin, &manifests.0, n, &cfg2, round * cfg2.changes).await?);
                }
                Ok((runs, files_runs))
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("control-plane thread panicked"))??;
    let (runs, files_runs) = runs;
    drop(ns);

    let (ipt, nft) = if cfg.kube_proxy {
        kube_proxy_installs(n, cfg)?
    } else {
        let skipped = json!({"status": "skipped"});
        (skipped.clone(), skipped)
    };

    let changes_all: Vec<f64> = runs
        .iter()
        .flat_map(|r| r["change_to_map_write_ms"].as_array().cloned().unwrap_or_default())
        .filter_map(|x| x.as_f64())
        .collect();
    let mut sorted = changes_all.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    Ok(json!({
        "services": n,
        "endpoints_per_service": ENDPOINTS,
        "agent_runs": runs.len(),
        "agent": {
            "cold_start_to_all_programmed_ms": summary_of(&runs, "cold_start_to_all_programmed_ms"),
            "cold_sync_compute_and_apply_ms": summary_of(&runs, "cold_sync_compute_and_apply_ms"),
            "change_to_map_write_ms": super::summary(&changes_all),
            "change_to_map_write_ms_p90": super::percentile(&sorted, 90.0),
            "change_sync_compute_and_apply_ms": summary_of(&runs, "change_sync_compute_and_apply_ms"),
            "peak_rss_mib": summary_of(&runs, "peak_rss_mib"),
            "maps_kernel_mib": summary_of(&runs, "maps_kernel_mib"),
            "scrape": scrape_summary(&runs),
            "runs": runs,
        },
        "agent_files": {
            "poll_interval_ms": FILES_POLL_MS,
            "cold_start_to_all_programmed_ms": summary_of(&files_runs, "cold_start_to_all_programmed_ms"),
            "cold_sync_compute_and_apply_ms": summary_of(&files_runs, "cold_sync_compute_and_apply_ms"),
            "change_to_map_write_ms": summary_of(&files_runs, "change_to_map_write_ms"),
            "change_sync_compute_and_apply_ms": summary_of(&files_runs, "change_sync_compute_and_apply_ms"),
            "peak_rss_mib": summary_of(&files_runs, "peak_rss_mib"),
            "runs": files_runs,
        },
        "iptables_restore": ipt,
        "nft": nft,
    }))
}

/// Times `iptables-restore` and `nft -f` of kube-proxy's rules for `n`
/// Services, each in a fresh namespace.
fn kube_proxy_installs(n: usize, cfg: &Config) -> Result<(Value, Value)> {
    let svcs = svc_ports(n);
    eprintln!(
        "dp-bench:   iptables-restore of the same {n} Services (limit {} s)",
        cfg.install_limit.as_secs()
    );
    let ipt = timed_install(&["iptables-restore"], kube_rules::iptables(&svcs), cfg.install_limit)?;
    eprintln!("dp-bench:     {ipt}");
    eprintln!(
        "dp-bench:   nft -f of the same {n} Services (limit {} s)",
        cfg.install_limit.as_secs()
    );
    let nft = timed_install(&["nft", "-f", "-"], kube_rules::nftables(&svcs), cfg.install_limit)?;
    eprintln!("dp-bench:     {nft}");
    Ok((ipt, nft))
}

pub fn run(cfg: &Config, agent: &Path) -> Result<Value> {
    if !agent.exists() {
        bail!(
            "release agent {} not found: `cargo xtask bench` builds it",
            agent.display()
        );
    }
    if let Some(&n) = cfg.scales.iter().find(|&&n| n == 0 || n > 131_072) {
        bail!("control plane: {n} Services: must be within 1..=131072 (the agent's default map size)");
    }
    let mut scales = Vec::new();
    for &n in &cfg.scales {
        eprintln!("dp-bench: control plane, {n} Services x {ENDPOINTS} endpoints");
        scales.push(scale(agent, n, cfg).with_context(|| format!("control plane at {n} Services"))?);
    }
    Ok(json!({
        "part": "control_plane",
        "method": "Per scale: the fake API server (in-process, on a namespace's loopback) holds N Services x 4 endpoints (one EndpointSlice each); the release agent (`dataplane run --source kubernetes --no-attach --no-pin`) starts against it once the machine is quiet (at most 10 % of the CPUs busy over 250 ms, waited for up to 30 s: the kernel frees the previous agent's maps in a worker after it exits; `quiet_wait_ms`, `busy_before_start` per run): time from spawning it to the first sync that programmed every frontend and backend (the agent's JSON log timestamps), that sync's own compute + map writes, then `changes` single-EndpointSlice changes each timed from the API write to the sync that wrote it (2 ms debounce included), and the agent's VmHWM. Then the same Services as a manifest directory (one YAML file per Service holding it and its EndpointSlice, written atomically by rename) and the agent with `--source files --dir DIR --poll-interval-ms 10`: its cold start, then `changes` rewrites of one Service's file with a new EndpointSlice, each timed from the write to the sync that wrote it (the agent's inotify wake-up or, without inotify, up to one poll interval, the check of the directory and the 2 ms debounce included) (`agent_files`). Then kube-proxy's rules for the same Services and endpoints (tests/src/bench/kube_rules.rs) are piped into `iptables-restore` and `nft -f -`, each in a fresh namespace, wall time of the command, stopped after `install_limit_s`.",
        "agent": agent.display().to_string(),
        "rounds": cfg.rounds,
        "changes": cfg.changes,
        "debounce_ms": DEBOUNCE_MS,
        "install_limit_s": cfg.install_limit.as_secs_f64(),
        "iptables_version": tool_version(&["iptables-restore", "--version"]),
        "nft_version": tool_version(&["nft", "--version"]),
        "targets": {"cold_start_ms_at_10000": 1000, "change_ms": 10, "peak_rss_mib_at_10000": 100},
        "scales": scales,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_to_epoch_micros() {
        assert_eq!(parse_ts("1970-01-01T00:00:00.000001Z"), Some(1));
        // 2024-02-29 (leap day) 12:34:56.5 UTC
        assert_eq!(parse_ts("2024-02-29T12:34:56.500000Z"), Some(1_709_210_096_500_000));
        assert_eq!(parse_ts("2024-02-29T12:34:56Z"), Some(1_709_210_096_000_000));
        assert_eq!(parse_ts("garbage"), None);
    }

    #[test]
    fn frontends_are_distinct_up_to_100k() {
        let mut seen = std::collections::HashSet::new();
        let mut ips = std::collections::HashSet::new();
        for i in 0..100_000 {
            assert!(seen.insert(frontend(i)));
            assert!(ips.insert(cluster_ip(i)));
            assert_eq!(cluster_ip(i).is_ipv4(), endpoint_addr(i, 0, 0).is_ipv4());
        }
        assert_eq!(frontends(100_000), 200_000);
        assert_eq!(services_max_entries(100_000), 262_144);
        assert_eq!(services_max_entries(10_000), dataplane_common::limits::MAX_SERVICES);
        assert_eq!(svc_ports(3)[2].endpoints.len(), ENDPOINTS);
    }
}
