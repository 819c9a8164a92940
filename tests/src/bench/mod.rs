//! Benchmarks run by `cargo xtask bench` (the `dp-bench` binary): per-packet
//! cost with BPF_PROG_TEST_RUN, and latency/throughput through a VIP in
//! network namespaces against kube-proxy's iptables and nftables rules.
//! They report; they never assert a speed.

pub mod kube_rules;
pub mod perpacket;
pub mod vip;

use serde_json::{json, Value};

/// Summary of a sample: median, spread and tail.
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
