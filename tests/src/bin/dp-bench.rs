//! `dp-bench`: the benchmarks behind `cargo xtask bench`. Writes one JSON
//! file per part into the output directory; the plots are drawn by xtask.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use dataplane_tests::bench::{self, perpacket, vip};

struct Args {
    quick: bool,
    out: PathBuf,
    parts: Vec<String>,
    /// Overrides the per-packet scales (for trying things out).
    scales: Option<Vec<u32>>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        quick: false,
        out: PathBuf::from("bench-results"),
        parts: Vec::new(),
        scales: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--out" => a.out = PathBuf::from(it.next().context("--out needs a directory")?),
            "--part" => a.parts.push(it.next().context("--part needs per-packet or vip")?),
            "--scales" => {
                let v = it.next().context("--scales needs a list, e.g. 1,1000")?;
                a.scales = Some(v.split(',').map(|s| s.parse()).collect::<Result<_, _>>()?);
            }
            other => {
                bail!("unknown argument {other:?} (expected --quick, --out DIR, --part per-packet|vip, --scales N,N)")
            }
        }
    }
    if a.parts.is_empty() {
        a.parts = vec!["per-packet".into(), "vip".into()];
    }
    Ok(a)
}

fn write(out: &std::path::Path, name: &str, mut v: serde_json::Value, quick: bool) -> Result<()> {
    v["machine"] = bench::machine();
    v["quick"] = quick.into();
    v["unix_time"] = bench::unix_time().into();
    v["command"] = if quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    }
    .into();
    std::fs::create_dir_all(out)?;
    let path = out.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(&v)? + "\n")?;
    eprintln!("dp-bench: wrote {}", path.display());
    Ok(())
}

fn main() -> Result<()> {
    let a = args()?;
    dataplane_tests::netns::require_root_and_tools();
    for part in &a.parts {
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
                    ..cfg
                };
                write(&a.out, "per-packet.json", perpacket::run(&cfg)?, a.quick)?;
            }
            "vip" => {
                let cfg = if a.quick {
                    vip::Config {
                        scales: vec![1, 1_000, 10_000],
                        rounds: 5,
                        conns: 200,
                        rr: 500,
                        stream: std::time::Duration::from_secs(1),
                        deadline: std::time::Duration::from_secs(600),
                    }
                } else {
                    vip::Config {
                        scales: vec![1, 1_000, 10_000],
                        rounds: 15,
                        conns: 500,
                        rr: 2_000,
                        stream: std::time::Duration::from_secs(3),
                        deadline: std::time::Duration::from_secs(3600),
                    }
                };
                let cfg = vip::Config {
                    scales: a
                        .scales
                        .clone()
                        .map(|v| v.into_iter().map(|n| n as usize).collect())
                        .unwrap_or(cfg.scales),
                    ..cfg
                };
                write(&a.out, "through-vip.json", vip::run(&cfg)?, a.quick)?;
            }
            other => bail!("unknown part {other:?}"),
        }
    }
    Ok(())
}
