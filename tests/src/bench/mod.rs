//! Benchmarks run by `cargo xtask bench` (the `dp-bench` binary): per-packet
//! cost with BPF_PROG_TEST_RUN, and latency/throughput through a VIP in
//! network namespaces against kube-proxy's iptables and nftables rules.
//! They report; they never assert a speed.

pub mod control;
pub mod kube_rules;
pub mod nodeport;
pub mod perpacket;
pub mod vip;
pub mod xdp_gen;

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde_json::{json, Value};

/// The CPU the benchmarks' measuring threads run on.
///
/// Through the VIP: left to the scheduler, a client and its server
/// sometimes share a CPU and sometimes not: on this VM a request/response
/// then took 17 µs or 50-60 µs depending on the round, for every contender
/// alike (a cross-CPU wakeup of an idle vCPU), which swamped the
/// differences measured. On one CPU every exchange is the same path:
/// sender, veths, node forwarding and receiver in softirq and a context
/// switch, no wakeup of another CPU.
///
/// Per packet: BPF_PROG_TEST_RUN runs the program on the calling thread's
/// CPU; pinned, every series runs on the same CPU at every scale and in
/// every round, so no migration falls between the two values of a paired
/// ratio. (The rounds still fall into two groups on this VM, an
/// established flow at about 112 or about 155 ns, changing within seconds
/// whichever CPU is used: the host's doing, which the interleaving of the
/// scales is there to cancel.)
pub const PIN_CPU: usize = 0;

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
    // within it; sched_setaffinity(0) affects the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The calling thread pinned to `cpu` until dropped, then allowed the
/// CPUs it had before (threads started meanwhile keep the pin).
pub struct Pinned(libc::cpu_set_t);

impl Pinned {
    pub fn to(cpu: usize) -> Result<Pinned> {
        // SAFETY: sched_getaffinity(0) fills a cpu_set_t of the size given
        // for the calling thread.
        let before = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
            }
            set
        };
        pin_thread(cpu)?;
        Ok(Pinned(before))
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: the set sched_getaffinity gave for this thread.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0);
        }
    }
}

/// Sets up every contender (`setup`) for one scale of a namespace
/// benchmark (`part` names it in the progress lines), saying how long each
/// took to install its rules (`install_s`).
pub fn set_up_all<C: Copy, S>(
    part: &str,
    n: usize,
    contenders: &[C],
    name: impl Fn(C) -> &'static str,
    mut setup: impl FnMut(C) -> Result<S>,
    install_s: impl Fn(&S) -> Option<f64>,
) -> Result<Vec<S>> {
    use anyhow::Context;
    eprintln!(
        "dp-bench: {part}, {n} Services: setting up {} contenders",
        contenders.len()
    );
    let mut setups = Vec::new();
    for &who in contenders {
        let s = setup(who).with_context(|| format!("setting up {} at {n} Services", name(who)))?;
        if let Some(t) = install_s(&s) {
            eprintln!("dp-bench:   {}: installed in {t:.2} s", name(who));
        }
        setups.push(s);
    }
    Ok(setups)
}

/// Measures `contenders` contenders interleaved: `rounds` rounds, each
/// measuring every contender in turn (`measure(contender, round)`), the
/// order rotating by one from round to round so that no contender always
/// follows the same one (or the setup) and the machine's drift hits all
/// alike; no new round starts after `deadline` from `started`.
/// `after_round(round, results)` runs after each round (progress lines).
/// Returns each contender's results, one per round done.
pub fn interleaved<R>(
    contenders: usize,
    rounds: usize,
    started: std::time::Instant,
    deadline: std::time::Duration,
    mut measure: impl FnMut(usize, usize) -> Result<R>,
    mut after_round: impl FnMut(usize, &[Vec<R>]),
) -> Result<Vec<Vec<R>>> {
    let mut results: Vec<Vec<R>> = (0..contenders).map(|_| Vec::new()).collect();
    for round in 0..rounds {
        if started.elapsed() > deadline {
            eprintln!("dp-bench: deadline reached, stopping after {round} rounds");
            break;
        }
        for k in 0..contenders {
            let i = (k + round) % contenders;
            results[i].push(measure(i, round)?);
        }
        after_round(round, &results);
    }
    Ok(results)
}

/// Summary of a sample: median, spread and tail.
/// What `/proc/PID/fdinfo` says of one BPF object a process holds.
#[derive(Clone, Copy, Debug)]
pub struct BpfObject {
    /// The kernel's memory accounting (`memlock`): for maps since 6.4 what
    /// the map uses (entries actually allocated where not preallocated).
    pub memlock: u64,
    /// Maps only (0 for programs).
    pub max_entries: u32,
}

/// The BPF maps and programs process `pid` ("self" for this one) holds an
/// fd of, by object (`("map", id)` or `("prog", id)`), each once.
pub fn bpf_objects(pid: &str) -> BTreeMap<(&'static str, u32), BpfObject> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        let id = match (field("map_id:"), field("prog_id:")) {
            (Some(id), _) => ("map", id as u32),
            (None, Some(id)) => ("prog", id as u32),
            _ => continue,
        };
        if let Some(memlock) = field("memlock:") {
            let max_entries = field("max_entries:").unwrap_or(0) as u32;
            out.insert(id, BpfObject { memlock, max_entries });
        }
    }
    out
}

pub fn summary(samples: &[f64]) -> Value {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    json!({
        "n": v.len(),
        "median": percentile(&v, 50.0),
        "p25": percentile(&v, 25.0),
        "p75": percentile(&v, 75.0),
        "p99": percentile(&v, 99.0),
        "min": v.first().copied(),
        "max": v.last().copied(),
    })
}

/// Nearest-rank percentile of sorted `v` (None when empty).
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

pub fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(&v, 50.0).unwrap_or(f64::NAN)
}

/// The machine the numbers come from.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim())
        })
        .unwrap_or("unknown")
        .to_string();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    json!({ "cpu_model": model, "cores": cores, "kernel": kernel })
}

/// Seconds since the Unix epoch, for the result files.
pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where one scale's numbers came from: the run's command, mode and time.
fn run_of(v: &Value) -> Value {
    json!({ "command": v["command"], "quick": v["quick"], "unix_time": v["unix_time"] })
}

/// Merges a new result file of one part into the previous one (if any), so
/// that a part can be re-run for some scales only: every scale of `new`
/// replaces the same scale (number of Services) of `old`, the others are
/// kept. Each scale carries the run it came from (`run`); the rest of the
/// file (method, settings, machine) is the new run's.
pub fn merge(old: Option<&Value>, mut new: Value) -> Value {
    let new_run = run_of(&new);
    let mut scales: Vec<Value> = new["scales"].as_array().cloned().unwrap_or_default();
    for s in &mut scales {
        s["run"] = new_run.clone();
    }
    if let Some(old) = old.filter(|o| o["part"] == new["part"]) {
        let old_run = run_of(old);
        for s in old["scales"].as_array().into_iter().flatten() {
            if scales.iter().any(|n| n["services"] == s["services"]) {
                continue;
            }
            let mut s = s.clone();
            if s.get("run").is_none() {
                s["run"] = old_run.clone();
            }
            scales.push(s);
        }
    }
    scales.sort_by_key(|s| s["services"].as_u64().unwrap_or(0));
    new["scales"] = Value::Array(scales);
    new
}

/// Arrays of raw samples longer than this are kept out of the committed
/// results (`compact`); per-round values (a few dozen) stay.
pub const RAW_IN_GIT: usize = 1000;

/// Where a result file keeps its raw samples: `<dir>/raw/<name>`
/// (git-ignored).
pub fn raw_path(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    dir.join("raw").join(name)
}

/// The result without its long arrays of raw samples (every `"raw"` array
/// longer than `RAW_IN_GIT`): what is committed. The report reads only the
/// summaries next to them.
pub fn compact(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, x)| !(k.as_str() == "raw" && x.as_array().is_some_and(|a| a.len() > RAW_IN_GIT)))
                .map(|(k, x)| (k.clone(), compact(x)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(compact).collect()),
        x => x.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_rotates_the_order_and_stops_at_the_deadline() {
        let mut order = Vec::new();
        let r = interleaved(
            3,
            3,
            std::time::Instant::now(),
            std::time::Duration::from_secs(60),
            |i, round| {
                order.push(i);
                Ok(i * 10 + round)
            },
            |_, _| {},
        )
        .unwrap();
        assert_eq!(order, [0, 1, 2, 1, 2, 0, 2, 0, 1]);
        assert_eq!(r, vec![vec![0, 1, 2], vec![10, 11, 12], vec![20, 21, 22]]);
        let none = interleaved(
            2,
            5,
            std::time::Instant::now() - std::time::Duration::from_secs(2),
            std::time::Duration::from_secs(1),
            |_, _| Ok(()),
            |_, _| {},
        )
        .unwrap();
        assert_eq!(none, vec![Vec::<()>::new(), Vec::new()]);
    }

    #[test]
    fn compact_drops_only_long_raw_arrays() {
        let long: Vec<u32> = (0..2000).collect();
        let v = serde_json::json!({
            "a": { "raw": long, "summary": { "median": 1 } },
            "b": { "raw": [1, 2, 3] },
            "raw_count": 7
        });
        let c = compact(&v);
        assert_eq!(c["a"], serde_json::json!({ "summary": { "median": 1 } }));
        assert_eq!(c["b"]["raw"], serde_json::json!([1, 2, 3]));
        assert_eq!(c["raw_count"], 7);
    }

    #[test]
    fn merge_replaces_measured_scales_and_keeps_the_others() {
        let old = json!({"part": "p", "command": "old", "quick": true, "unix_time": 1,
            "scales": [{"services": 1, "x": "old"}, {"services": 1000, "x": "old"}]});
        let new = json!({"part": "p", "command": "new", "quick": false, "unix_time": 2,
            "scales": [{"services": 1000, "x": "new"}, {"services": 100000, "x": "new"}]});
        let m = merge(Some(&old), new.clone());
        let s = m["scales"].as_array().unwrap();
        let got: Vec<(u64, &str, &str)> = s
            .iter()
            .map(|s| {
                (
                    s["services"].as_u64().unwrap(),
                    s["x"].as_str().unwrap(),
                    s["run"]["command"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![(1, "old", "old"), (1000, "new", "new"), (100000, "new", "new")]
        );
        // Another part's file is not merged in.
        let other = json!({"part": "q", "scales": [{"services": 5}]});
        assert_eq!(merge(Some(&other), new.clone())["scales"].as_array().unwrap().len(), 2);
        assert_eq!(merge(None, new)["scales"].as_array().unwrap().len(), 2);
    }
}
