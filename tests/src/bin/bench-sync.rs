//! Control-plane benchmark (not a test): the real `dataplane` binary with
//! `--source kubernetes --no-attach --no-pin` against the in-process fake API server,
//! 10,000 Services x 4 endpoints. Reports
//!
//! - cold start: from spawning the agent to the first sync that programmed
//!   every frontend (process start, BPF load, list, compute, map writes);
//! - change latency: from one EndpointSlice change in the API to the sync
//!   that wrote it, median (and spread) over `CHANGES` changes;
//! - the agent's peak RSS (VmHWM).
//!
//! Times come from the agent's own JSON log timestamps and this process's
//! wall clock (the same clock). Everything runs inside a network namespace
//! created here (the fake listens on its loopback); nothing is attached.
//! Run it with `cargo xtask bench-sync` (as root); the numbers are printed
//! and written to `bench-results/control-plane.json`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use dataplane_tests::{
    agent::TempDir,
    fake_api::{objects, FakeApi, Kind},
    netns::{self, Netns},
};
use serde_json::{json, Value};

/// Default number of Services; `BENCH_SERVICES` overrides it (to see how
/// the numbers scale).
const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 4;
const CHANGES: usize = 50;
const NODE: &str = "bench-node";
/// Bounds for every wait.
const COLD_TIMEOUT: Duration = Duration::from_secs(120);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

fn vip(i: usize) -> String {
    format!("198.19.{}.{}", i / 250, i % 250 + 1)
}

/// Endpoint `j` of Service `i`; `gen` shifts the address so a change is a
/// real change.
fn endpoint(i: usize, j: usize, gen: usize) -> String {
    let n = (i * ENDPOINTS + j + gen * 7) % (250 * 250);
    format!("198.18.{}.{}", n / 250, n % 250 + 1)
}

fn slice(i: usize, gen: usize) -> Value {
    let addrs: Vec<String> = (0..ENDPOINTS).map(|j| endpoint(i, j, gen)).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    objects::slice(
        &format!("ns{}", i % 50),
        &format!("svc{i}-abcde"),
        &format!("svc{i}"),
        &[("http", 8080, "TCP")],
        &refs,
    )
}

/// Parses tracing-subscriber's RFC 3339 UTC timestamp
/// (`2026-05-02T10:11:12.123456Z`) into microseconds since the epoch.
fn parse_ts(ts: &str) -> Option<i64> {
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
}

impl AgentProc {
    fn syncs(&self) -> Vec<SyncLine> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
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

    /// Waits for a sync line matching `pred`, polling the log every 200 µs
    /// (the timestamps, not the polling, give the times).
    fn wait_sync(&mut self, timeout: Duration, pred: impl Fn(&SyncLine) -> bool) -> Result<SyncLine> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(s) = self.syncs().into_iter().find(&pred) {
                return Ok(s);
            }
            if let Some(st) = self.child.try_wait()? {
                bail!("the agent exited ({st}); its log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        bail!(
            "no matching sync within {timeout:?}; the agent's log:\n{}",
            self.log_text()
        )
    }

    /// The log's lines up to `until_us` as (µs since `from_us`, message
    /// and fields): where the cold start's time goes.
    fn phases(&self, from_us: i64, until_us: i64) -> Vec<(f64, String)> {
        self.log_text()
            .lines()
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

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

fn agent_binary() -> PathBuf {
    std::env::var_os("DATAPLANE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/dataplane"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    netns::require_root_and_tools();
    let bin = agent_binary();
    if !bin.exists() {
        bail!(
            "agent binary {} not found: run `cargo xtask bench-sync` (builds it in release)",
            bin.display()
        );
    }
    // The whole benchmark runs in its own namespace: this thread enters it
    // before the runtime starts, so the runtime's threads and the agent
    // (a child) are in it too.
    let ns = Netns::new(format!("{}-bench", netns::unique_prefix()))?;
    netns::enter(&format!("/run/netns/{}", ns.name));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(bench(&bin));
    drop(rt);
    drop(ns);
    let report = result?;
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-results");
    std::fs::create_dir_all(&out_dir)?;
    let path = out_dir.join("control-plane.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!("written to {}", path.canonicalize()?.display());
    Ok(())
}

async fn bench(bin: &Path) -> Result<Value> {
    let services: usize = match std::env::var("BENCH_SERVICES") {
        Ok(v) => v.parse().context("BENCH_SERVICES: not a number")?,
        Err(_) => SERVICES,
    };
    if !(1..=62_500).contains(&services) {
        bail!("BENCH_SERVICES must be within 1..=62500 (the VIP range used)");
    }
    let fake = FakeApi::start().await?;
    eprintln!("bench: creating {services} Services x {ENDPOINTS} endpoints in the fake API");
    fake.apply(Kind::Node, objects::node(NODE, "198.18.0.1".parse()?));
    for i in 0..services {
        fake.apply(
            Kind::Service,
            objects::service(
                &format!("ns{}", i % 50),
                &format!("svc{i}"),
                &vip(i),
                &[("http", 80, "TCP")],
            ),
        );
        fake.apply(Kind::EndpointSlice, slice(i, 0));
    }
    // The initial objects come from the list, not from a replayed history.
    fake.compact();

    let dir = TempDir::new("dataplane-bench");
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig())?;
    let log = dir.0.join("agent.log");
    let logf = std::fs::File::create(&log)?;
    eprintln!("bench: starting {} --source kubernetes --no-attach", bin.display());
    let spawned_us = now_us();
    let child = Command::new(bin)
        .args([
            "--log-format",
            "json",
            "run",
            "--source",
            "kubernetes",
            "--no-attach",
            "--no-pin",
        ])
        .args(["--node-name", NODE, "--health-bind", "127.0.0.1:10256"])
        .env("KUBECONFIG", &kubeconfig)
        .env("DATAPLANE_LOG", "info")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut agent = AgentProc { child, log };
    let pid = agent.child.id();

    let full = (services as u64, (services * ENDPOINTS) as u64);
    let cold = tokio::task::block_in_place(|| agent.wait_sync(COLD_TIMEOUT, |s| (s.frontends, s.backends) == full))?;
    let cold_ms = (cold.at_us - spawned_us) as f64 / 1000.0;
    eprintln!(
        "bench: all {} frontends programmed {cold_ms:.1} ms after start (sync {}, compute+apply {} ms)",
        cold.frontends,
        cold.sync,
        cold.elapsed_us / 1000
    );
    let phases = agent.phases(spawned_us, cold.at_us);
    for (ms, line) in &phases {
        eprintln!("bench:   {ms:8.1} ms  {line}");
    }
    fake.wait_watches(Kind::EndpointSlice, 1, COLD_TIMEOUT).await?;

    let mut latencies_ms = Vec::new();
    let mut sync_work_ms = Vec::new();
    let mut compute_ms = Vec::new();
    let mut last_sync = agent.syncs().last().map_or(0, |s| s.sync);
    for c in 0..CHANGES {
        let i = (c * 197) % services;
        let before = now_us();
        fake.apply(Kind::EndpointSlice, slice(i, c + 1));
        let s =
            tokio::task::block_in_place(|| agent.wait_sync(CHANGE_TIMEOUT, |s| s.sync > last_sync && s.updated >= 1))?;
        latencies_ms.push((s.at_us - before) as f64 / 1000.0);
        sync_work_ms.push(s.elapsed_us as f64 / 1000.0);
        compute_ms.push(s.compute_us as f64 / 1000.0);
        last_sync = agent.syncs().last().map_or(s.sync, |l| l.sync);
        // Let the change settle so the next one is a separate sync.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (hwm_kib, rss_kib) = agent.memory_kib()?;
    let last = agent.syncs().last().copied();
    agent.stop();

    let mut sorted = latencies_ms.clone();
    let med = median(&mut sorted);
    let max = sorted.last().copied().unwrap_or(0.0);
    let min = sorted.first().copied().unwrap_or(0.0);
    let p90 = sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)];
    let work_med = median(&mut sync_work_ms.clone());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(json!({
        "what": "control plane: dataplane run --source kubernetes --no-attach against the in-process fake API",
        "services": services,
        "endpoints_per_service": ENDPOINTS,
        "agent_pid": pid,
        "cold_start_to_all_programmed_ms": cold_ms,
        "cold_start_sync_compute_and_apply_ms": cold.elapsed_us as f64 / 1000.0,
        "cold_start_sync_compute_only_ms": cold.compute_us as f64 / 1000.0,
        "cold_start_log_ms": phases.iter().map(|(ms, line)| json!([ms, line])).collect::<Vec<_>>(),
        "endpoint_change_to_map_write_ms": {
            "changes": CHANGES,
            "median": med,
            "p90": p90,
            "min": min,
            "max": max,
            "raw": latencies_ms,
        },
        "change_sync_compute_and_apply_ms_median": work_med,
        "change_sync_compute_only_ms_median": median(&mut compute_ms),
        "debounce_ms": 2,
        "agent_relists": last.map_or(0, |l| l.relists),
        "agent_watch_restarts": last.map_or(0, |l| l.watch_restarts),
        "peak_rss_mib": hwm_kib as f64 / 1024.0,
        "rss_at_end_mib": rss_kib as f64 / 1024.0,
        "targets": {"cold_start_ms": 1000, "change_ms": 10, "peak_rss_mib": 100},
        "machine": {"kernel": kernel, "cpus": std::thread::available_parallelism().map_or(0, |n| n.get())},
        "measured_at_unix": now_us() / 1_000_000,
    }))
}

#[cfg(test)]
mod tests {
    use super::parse_ts;

    #[test]
    fn timestamps_parse_to_epoch_micros() {
        assert_eq!(parse_ts("1970-01-01T00:00:00.000001Z"), Some(1));
        // 2024-02-29 (leap day) 12:34:56.5 UTC
        assert_eq!(parse_ts("2024-02-29T12:34:56.500000Z"), Some(1_709_210_096_500_000));
        assert_eq!(parse_ts("2024-02-29T12:34:56Z"), Some(1_709_210_096_000_000));
        assert_eq!(parse_ts("garbage"), None);
    }
}
