//! `dp-bench`: the benchmarks behind `cargo xtask bench`. Writes one JSON
//! file per part into the output directory, merged with what is there (a
//! part or a scale measured now replaces the same one, the others stay);
//! the plots are drawn by xtask.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use dataplane_tests::bench::{self, control, nodeport, perpacket, vip};

struct Args {
    quick: bool,
    out: PathBuf,
    parts: Vec<String>,
    /// Overrides the scales of every part run (for re-running some).
    scales: Option<Vec<u32>>,
    /// Overrides the through-VIP contenders (for investigations).
    contenders: Option<Vec<vip::Contender>>,
    /// Overrides the NodePort contenders (for investigations).
    nodeport_contenders: Option<Vec<nodeport::Contender>>,
    /// Overrides the number of rounds of every part run.
    rounds: Option<usize>,
    /// Through the VIP and NodePort without netfilter conntrack in the node
    /// namespaces.
    no_node_conntrack: bool,
    /// Through the VIP with the agent's default `--host-routing=false`.
    no_host_routing: bool,
    /// NodePort part: GRO left off on the backends' interfaces.
    no_backend_gro: bool,
    nodeport_node_cpu: Option<bool>,
    /// Overrides the NodePort parts' generator.
    nodeport_generator: Option<nodeport::Generator>,
    agent_only: bool,
    /// The release agent, for the control-plane part.
    release_agent: PathBuf,
}

impl Args {
    /// `--scales` as the namespace parts take them, else their `default`.
    fn scales_or(&self, default: Vec<usize>) -> Vec<usize> {
        self.scales
            .as_ref()
            .map_or(default, |v| v.iter().map(|&n| n as usize).collect())
    }
}

const PARTS: [&str; 5] = [
    "per-packet",
    "through-vip",
    "control-plane",
    "nodeport",
    "nodeport-remote",
];

fn args() -> Result<Args> {
    let mut a = Args {
        quick: false,
        out: PathBuf::from("bench-results"),
        parts: Vec::new(),
        scales: None,
        contenders: None,
        nodeport_contenders: None,
        rounds: None,
        no_node_conntrack: false,
        no_host_routing: false,
        no_backend_gro: false,
        nodeport_node_cpu: None,
        nodeport_generator: None,
        agent_only: false,
        release_agent: Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/dataplane"),
    };
    let usage = "expected --quick, --out DIR, --part per-packet|through-vip|control-plane|nodeport|nodeport-remote (repeatable or comma-separated), --scales N,N, --contenders a,b, --nodeport-contenders a,b, --no-node-conntrack, --no-host-routing, --no-backend-gro, --nodeport-node-cpu, --nodeport-one-cpu, --nodeport-generator af-packet|live-frames, --agent-only, --rounds N, --release-agent PATH";
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--out" => a.out = PathBuf::from(it.next().context("--out needs a directory")?),
            "--part" | "--only" => {
                let v = it
                    .next()
                    .context("--part needs per-packet, through-vip, control-plane, nodeport or nodeport-remote")?;
                for p in v.split(',') {
                    let p = if p == "vip" { "through-vip" } else { p };
                    if !PARTS.contains(&p) {
                        bail!("unknown part {p:?}: {}", PARTS.join(", "));
                    }
                    a.parts.push(p.to_string());
                }
            }
            "--scales" => {
                let v = it.next().context("--scales needs a list, e.g. 1,1000")?;
                a.scales = Some(v.split(',').map(|s| s.parse()).collect::<Result<_, _>>()?);
            }
            "--contenders" => {
                let v = it.next().context("--contenders needs a list, e.g. dataplane,direct")?;
                a.contenders = Some(
                    v.split(',')
                        .map(|c| vip::Contender::from_name(c).with_context(|| format!("unknown contender {c:?}")))
                        .collect::<Result<_>>()?,
                );
            }
            "--nodeport-contenders" => {
                let v = it
                    .next()
                    .context("--nodeport-contenders needs a list, e.g. dataplane,direct")?;
                a.nodeport_contenders = Some(
                    v.split(',')
                        .map(|c| nodeport::Contender::from_name(c).with_context(|| format!("unknown contender {c:?}")))
                        .collect::<Result<_>>()?,
                );
            }
            "--no-node-conntrack" => a.no_node_conntrack = true,
            "--no-host-routing" => a.no_host_routing = true,
            "--no-backend-gro" => a.no_backend_gro = true,
            "--nodeport-node-cpu" => a.nodeport_node_cpu = Some(true),
            "--nodeport-one-cpu" => a.nodeport_node_cpu = Some(false),
            "--nodeport-generator" => {
                let v = it
                    .next()
                    .context("--nodeport-generator needs af-packet or live-frames")?;
                a.nodeport_generator =
                    Some(nodeport::Generator::from_name(&v).with_context(|| format!("unknown generator {v:?}"))?);
            }
            "--agent-only" => a.agent_only = true,
            "--rounds" => a.rounds = Some(it.next().context("--rounds needs a number")?.parse()?),
            "--release-agent" => {
                a.release_agent = PathBuf::from(it.next().context("--release-agent needs a path")?);
            }
            other => bail!("unknown argument {other:?} ({usage})"),
        }
    }
    if a.parts.is_empty() {
        a.parts = PARTS.iter().map(|p| p.to_string()).collect();
    }
    Ok(a)
}

/// Writes one part's result, merged with the file already there.
fn write(out: &Path, name: &str, mut v: serde_json::Value, a: &Args, elapsed: Duration) -> Result<()> {
    let quick = a.quick;
    // The equivalent xtask command line.
    let mut command = String::from("cargo xtask bench");
    if quick {
        command.push_str(" --quick");
    }
    if a.parts.len() < PARTS.len() {
        command.push_str(&format!(" --only {}", a.parts.join(",")));
    }
    if let Some(s) = &a.scales {
        let s: Vec<String> = s.iter().map(u32::to_string).collect();
        command.push_str(&format!(" --scales {}", s.join(",")));
    }
    v["machine"] = bench::machine();
    v["quick"] = quick.into();
    v["unix_time"] = bench::unix_time().into();
    v["elapsed_s"] = elapsed.as_secs_f64().round().into();
    v["command"] = command.into();
    let path = out.join(name);
    let raw = bench::raw_path(out, name);
    std::fs::create_dir_all(raw.parent().unwrap())?;
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
    };
    let raw_old = read(&raw);
    let had_raw = raw_old.is_some();
    let (old, from_raw) = merge_base(raw_old, read(&path));
    if had_raw && !from_raw {
        eprintln!(
            "dp-bench: {} is not the full form of {} (left by another run): not merged in",
            raw.display(),
            path.display()
        );
    }
    let merged = bench::merge(old.as_ref(), v);
    std::fs::write(&raw, serde_json::to_string_pretty(&merged)? + "\n")?;
    std::fs::write(&path, serde_json::to_string_pretty(&bench::compact(&merged))? + "\n")?;
    eprintln!(
        "dp-bench: wrote {} (raw samples: {}, not in git) ({:.0} s)",
        path.display(),
        raw.display(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

/// What a new result is merged into: the committed file, or the raw file
/// when it is the full form of exactly that file (then the scales not
/// re-run keep their samples). A raw file left by another run (the
/// committed one since checked out, pulled or discarded) is not used, or
/// its scales would come back; the committed file is the state, `raw/`
/// only adds samples to it. Also says whether the raw file is the base.
fn merge_base(
    raw: Option<serde_json::Value>,
    committed: Option<serde_json::Value>,
) -> (Option<serde_json::Value>, bool) {
    match (raw, committed) {
        (Some(r), Some(c)) if bench::compact(&r) == c => (Some(r), true),
        (_, c) => (c, false),
    }
}

/// `dp-bench --compact [--out DIR]`: rewrites result files that still hold
/// their raw samples in the compact form, the full file moved to `raw/`.
fn compact_results(out: &Path) -> Result<()> {
    for name in [
        "per-packet.json",
        "through-vip.json",
        "control-plane.json",
        "nodeport.json",
        "nodeport-remote.json",
    ] {
        let path = out.join(name);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let c = bench::compact(&v);
        if c == v {
            continue;
        }
        let raw = bench::raw_path(out, name);
        std::fs::create_dir_all(raw.parent().unwrap())?;
        std::fs::write(&raw, text)?;
        std::fs::write(&path, serde_json::to_string_pretty(&c)? + "\n")?;
        eprintln!(
            "dp-bench: {} compacted, raw samples moved to {}",
            path.display(),
            raw.display()
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    // One round's client of the through-VIP part, started by dp-bench
    // itself in the client namespace (see `vip::client_round`).
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.first().map(String::as_str) == Some(vip::CLIENT_ROUND_ARG) {
        return vip::client_main(&raw[1..]);
    }
    if raw.first().map(String::as_str) == Some("--compact") {
        let out = match raw.get(1).map(String::as_str) {
            Some("--out") => PathBuf::from(raw.get(2).context("--out needs a directory")?),
            _ => PathBuf::from("bench-results"),
        };
        return compact_results(&out);
    }
    let a = args()?;
    dataplane_tests::netns::require_root_and_tools();
    for part in &a.parts {
        let started = Instant::now();
        match part.as_str() {
            "per-packet" => {
                let cfg = if a.quick {
                    perpacket::Config {
                        scales: vec![1, 1_000, 10_000, 100_000],
                        rounds: 7,
                        repeat: 5_000,
                    }
                } else {
                    perpacket::Config {
                        scales: vec![1, 1_000, 10_000, 100_000],
                        rounds: 25,
                        repeat: 10_000,
                    }
                };
                let cfg = perpacket::Config {
                    scales: a.scales.clone().unwrap_or(cfg.scales),
                    rounds: a.rounds.unwrap_or(cfg.rounds),
                    ..cfg
                };
                let v = perpacket::run(&cfg)?;
                write(&a.out, "per-packet.json", v, &a, started.elapsed())?;
            }
            "through-vip" => {
                let cfg = if a.quick {
                    vip::Config {
                        scales: vec![1, 1_000, 10_000],
                        rounds: 5,
                        // New connections take about 0.1 ms each: many
                        // cost little next to the stream.
                        conns: 500,
                        rr: 500,
                        stream: Duration::from_secs(1),
                        deadline: Duration::from_secs(600),
                        contenders: vip::DEFAULT_CONTENDERS.to_vec(),
                        node_conntrack: true,
                        host_routing: true,
                    }
                } else {
                    vip::Config {
                        scales: vec![1, 1_000, 10_000],
                        rounds: 15,
                        conns: 2_000,
                        rr: 2_000,
                        stream: Duration::from_secs(3),
                        deadline: Duration::from_secs(3600),
                        contenders: vip::DEFAULT_CONTENDERS.to_vec(),
                        node_conntrack: true,
                        host_routing: true,
                    }
                };
                let cfg = vip::Config {
                    scales: a.scales_or(cfg.scales),
                    contenders: a.contenders.clone().unwrap_or(cfg.contenders),
                    rounds: a.rounds.unwrap_or(cfg.rounds),
                    node_conntrack: !a.no_node_conntrack,
                    host_routing: !a.no_host_routing,
                    ..cfg
                };
                let v = vip::run(&cfg)?;
                write(&a.out, "through-vip.json", v, &a, started.elapsed())?;
            }
            "control-plane" => {
                let cfg = if a.quick {
                    control::Config {
                        scales: vec![1_000, 10_000],
                        rounds: 1,
                        changes: 50,
                        install_limit: Duration::from_secs(120),
                        cold_timeout: Duration::from_secs(120),
                        kube_proxy: true,
                    }
                } else {
                    control::Config {
                        scales: vec![1_000, 10_000, 100_000],
                        rounds: 3,
                        changes: 50,
                        // nft -f took 84-109 s for 10,000 Services here
                        // and grows about quadratically: at 100,000 both
                        // tools are stopped at this limit.
                        install_limit: Duration::from_secs(180),
                        cold_timeout: Duration::from_secs(300),
                        kube_proxy: true,
                    }
                };
                let cfg = control::Config {
                    scales: a.scales_or(cfg.scales),
                    rounds: a.rounds.unwrap_or(cfg.rounds),
                    kube_proxy: !a.agent_only,
                    ..cfg
                };
                let v = control::run(&cfg, &a.release_agent)?;
                write(&a.out, "control-plane.json", v, &a, started.elapsed())?;
            }
            "nodeport" | "nodeport-remote" => {
                // The second: backends on another node, frames from a
                // NIC-like (live-frames) generator.
                let remote = part.as_str() == "nodeport-remote";
                let generator = if remote {
                    nodeport::Generator::LiveFrames
                } else {
                    nodeport::Generator::AfPacket
                };
                let cfg = if a.quick {
                    nodeport::Config {
                        scales: vec![1_000],
                        rounds: 3,
                        send: Duration::from_secs(1),
                        max_packets: 5_000_000,
                        flows: 256,
                        deadline: Duration::from_secs(300),
                        contenders: nodeport::DEFAULT_CONTENDERS.to_vec(),
                        node_conntrack: true,
                        host_routing: true,
                        backend_gro: true,
                        node_cpu: true,
                        generator,
                        remote_backends: remote,
                    }
                } else {
                    nodeport::Config {
                        scales: vec![10_000],
                        rounds: 11,
                        send: Duration::from_secs(4),
                        // About 1 Mpps is the most one AF_PACKET sender
                        // reached here; the live-frames one sends more.
                        max_packets: if remote { 100_000_000 } else { 20_000_000 },
                        flows: 256,
                        deadline: Duration::from_secs(600),
                        contenders: nodeport::DEFAULT_CONTENDERS.to_vec(),
                        node_conntrack: true,
                        host_routing: true,
                        backend_gro: true,
                        node_cpu: true,
                        generator,
                        remote_backends: remote,
                    }
                };
                let cfg = nodeport::Config {
                    scales: a.scales_or(cfg.scales),
                    contenders: a.nodeport_contenders.clone().unwrap_or(cfg.contenders),
                    rounds: a.rounds.unwrap_or(cfg.rounds),
                    node_conntrack: !a.no_node_conntrack,
                    host_routing: !a.no_host_routing,
                    backend_gro: !a.no_backend_gro,
                    node_cpu: a.nodeport_node_cpu.unwrap_or(cfg.node_cpu),
                    generator: a.nodeport_generator.unwrap_or(cfg.generator),
                    ..cfg
                };
                let v = nodeport::run(&cfg)?;
                write(&a.out, &format!("{part}.json"), v, &a, started.elapsed())?;
            }
            other => bail!("unknown part {other:?}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merged_into_the_raw_file_only_when_it_is_the_committed_one() {
        let samples: Vec<f64> = (0..2000).map(f64::from).collect();
        let raw = json!({ "scales": [{ "services": 1, "x": { "raw": samples, "summary": { "median": 999.0 } } }] });
        let committed = bench::compact(&raw);
        assert_eq!(
            merge_base(Some(raw.clone()), Some(committed.clone())),
            (Some(raw.clone()), true)
        );
        // The committed file changed since (another run, checked out or
        // discarded): it is the base, the stale raw file is not.
        let mut other = committed.clone();
        other["scales"][0]["x"]["summary"]["median"] = json!(5.0);
        assert_eq!(merge_base(Some(raw.clone()), Some(other.clone())), (Some(other), false));
        assert_eq!(merge_base(Some(raw), None), (None, false));
        assert_eq!(merge_base(None, Some(committed.clone())), (Some(committed), false));
    }

    /// Result files are read back (merge, `--compact`): a number read and
    /// written again is the same number (serde_json's default parsing is
    /// off by one ulp for some, as this one was in through-vip.json).
    #[test]
    fn result_files_keep_numbers_exactly() {
        for s in ["0.9961077162739417", "1.1166654081401495", "1.3923648641119641"] {
            let v: serde_json::Value = serde_json::from_str(s).unwrap();
            assert_eq!(serde_json::to_string(&bench::compact(&v)).unwrap(), s);
        }
    }
}
