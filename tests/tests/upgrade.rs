//! Upgrades, rollbacks and map resizes on a busy node: continuous TCP and
//! UDP traffic through a VIP while the agent is replaced by another
//! release (built from git history by `cargo xtask test`, see
//! `xtask/src/release.rs`) or restarted with other map sizes. No
//! connection may fail, and long-lived TCP connections and a long-lived
//! UDP flow must keep their backends throughout.

use std::{
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::MapData;
use dataplane_common::map_names;
use dataplane_tests::{
    agent::{agent_binary, Agent},
    netns::Topology,
    servers::Conn,
    web::{manifests, start_servers, VIP},
};

const TIMEOUT: Duration = Duration::from_secs(3);
/// Long-lived TCP connections kept open through every step.
const LONG_LIVED: usize = 3;

/// The previous release's agent, built by `cargo xtask test`.
fn previous_release() -> (PathBuf, String) {
    let bin = std::env::var_os("DATAPLANE_PREV_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "DATAPLANE_PREV_BIN is not set: run the suite with `cargo xtask test`, which builds the previous \
             release from git history, or build it with `cargo xtask previous-release` and set DATAPLANE_PREV_BIN \
             to the path it prints"
            )
        });
    assert!(bin.exists(), "previous release agent {} not found", bin.display());
    // `cargo xtask test` names it; else the binary says it itself.
    let version = std::env::var("DATAPLANE_PREV_VERSION").unwrap_or_else(|_| {
        std::process::Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|e| format!("{} (--version failed: {e})", bin.display()))
    });
    (bin, version)
}

fn start_agent(t: &Topology, binary: &std::path::Path, extra: &[&str]) -> Agent {
    let m = manifests(&[1, 2, 3]);
    let m: Vec<(&str, &str)> = m.iter().map(|(n, c)| (*n, c.as_str())).collect();
    Agent::start_binary(binary, &t.node, &t.node_ifaces(), &[], &m, extra).unwrap()
}

/// What the load saw.
#[derive(Debug, Default)]
struct Report {
    tcp_new: usize,
    udp_new: usize,
    long_asks: usize,
    failed: Vec<String>,
}

/// Continuous traffic from the client namespace until stopped (at most
/// 120 s or 200,000 rounds): per round one new TCP connection, one UDP
/// exchange from a new socket, and one question on each long-lived TCP
/// connection and on the long-lived UDP flow. A long-lived connection that
/// breaks or answers from another backend ends the load with an error.
struct Load {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicUsize>,
    handle: JoinHandle<Result<Report, String>>,
}

impl Load {
    fn start(t: &Topology) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicUsize::new(0));
        let (s, r) = (stop.clone(), rounds.clone());
        let handle = t.client.run(move || {
            let vip = |port| SocketAddr::from((VIP, port));
            let mut long = Vec::new();
            for i in 0..LONG_LIVED {
                let mut c = Conn::connect(vip(80), TIMEOUT).map_err(|e| format!("long-lived {i}: {e}"))?;
                let who = c.ask().map_err(|e| format!("long-lived {i}: {e}"))?;
                long.push((c, who));
            }
            let udp_ask = |s: &UdpSocket| -> Result<String, String> {
                s.send(b"who").map_err(|e| e.to_string())?;
                let mut buf = [0u8; 64];
                let n = s.recv(&mut buf).map_err(|e| format!("no UDP answer: {e}"))?;
                Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
            };
            let udp_socket = || -> Result<UdpSocket, String> {
                let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
                s.connect(vip(53)).map_err(|e| e.to_string())?;
                Ok(s)
            };
            let udp_long = udp_socket()?;
            let udp_first = udp_ask(&udp_long)?;
            let mut rep = Report::default();
            let started = Instant::now();
            while !s.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                if r.load(Ordering::Relaxed) >= 200_000 {
                    break;
                }
                match Conn::connect(vip(80), TIMEOUT).and_then(|mut c| c.ask()) {
                    Ok(_) => rep.tcp_new += 1,
                    Err(e) => rep.failed.push(format!("new TCP connection: {e}")),
                }
                match udp_socket().and_then(|s| udp_ask(&s)) {
                    Ok(_) => rep.udp_new += 1,
                    Err(e) => rep.failed.push(format!("new UDP exchange: {e}")),
                }
                for (i, (c, first)) in long.iter_mut().enumerate() {
                    match c.ask() {
                        Ok(who) if &who == first => rep.long_asks += 1,
                        Ok(who) => return Err(format!("long-lived connection {i} moved from {first} to {who}")),
                        Err(e) => return Err(format!("long-lived connection {i} broke: {e}")),
                    }
                }
                match udp_ask(&udp_long) {
                    Ok(who) if who == udp_first => {}
                    Ok(who) => return Err(format!("the long-lived UDP flow moved from {udp_first} to {who}")),
                    Err(e) => rep.failed.push(format!("long-lived UDP flow: {e}")),
                }
                r.fetch_add(1, Ordering::Relaxed);
            }
            Ok(rep)
        });
        Load { stop, rounds, handle }
    }

    /// Waits until the load has made `n` more rounds (deadline 30 s).
    fn advance(&self, n: usize) {
        let target = self.rounds.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.rounds.load(Ordering::Relaxed) < target {
            assert!(
                !self.handle.is_finished(),
                "the load ended early (a long-lived connection failed?)"
            );
            assert!(Instant::now() < deadline, "the load made no progress for 30 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let rep = self.handle.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "{} new TCP connections, {} UDP exchanges, {} answers on long-lived connections; {} failed",
            rep.tcp_new,
            rep.udp_new,
            rep.long_asks,
            rep.failed.len()
        );
        assert!(rep.failed.is_empty(), "failures under load: {:?}", rep.failed);
        rep
    }
}

/// max_entries of the pinned map `name`.
fn pinned_capacity(agent: &Agent, name: &str) -> u32 {
    MapData::from_pin(agent.pins.join("maps").join(name))
        .and_then(|m| m.info())
        .map(|i| i.max_entries())
        .unwrap_or_else(|e| panic!("pinned map {name}: {e}"))
}

/// The number a field of the last `adopted the pinned maps` line of the
/// agent's log has (`name=N`).
fn adoption_field(log: &str, name: &str) -> usize {
    let key = format!("{name}=");
    log.rsplit(key.as_str())
        .next()
        .filter(|_| log.contains(&key))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the adoption log: {log}"))
}

#[test]
fn upgrade_from_the_previous_release_and_rollback_keep_every_connection() {
    let (previous, version) = previous_release();
    let t = Topology::new(3).unwrap();
    let _servers = start_servers(&t);
    let mut agent = start_agent(&t, &previous, &[]);
    let load = Load::start(&t);
    load.advance(20);

    // Upgrade: the DaemonSet replaces the pod; the new agent adopts the
    // pinned maps and swaps the programs in the pinned links.
    agent.replace(&agent_binary(), &[]).unwrap();
    load.advance(20);
    let log = agent.log();
    assert!(
        log.contains(&format!("dataplane {} (commit ", env!("CARGO_PKG_VERSION"))),
        "the current release did not start: {log}"
    );
    // The previous release has no backend filter: adopting its maps must
    // set the bits of the backends its flows went to, or their replies
    // would pass untranslated (`Maps::fill_backend_filter`).
    assert!(
        adoption_field(&log, "backend_filter_set") > 0,
        "adopting the previous release's maps set no backend filter bit: {log}"
    );
    // Nor has it the frontend cache: the new agent builds it from the
    // service map before its programs take over.
    assert!(
        adoption_field(&log, "frontends_cached") > 0,
        "adoption cached no frontend: {log}"
    );
    // Nor the frontend filter: the loader creates the map empty, and the
    // new agent writes it from the service map before its programs take
    // over (without it they would pass every Service's new connections).
    assert!(
        adoption_field(&log, "frontend_filter_bits") > 0,
        "adoption set no frontend filter bit: {log}"
    );

    // Rollback (`kubectl rollout undo`): the previous release takes over
    // the same pins, leaving the pinned frontend cache alone.
    agent.replace(&previous, &[]).unwrap();
    load.advance(20);
    // And forward again: the cache the rollback left is rebuilt.
    agent.replace(&agent_binary(), &[]).unwrap();
    load.advance(20);
    let log = agent.log();
    assert!(
        adoption_field(&log, "frontends_cached") > 0,
        "adoption after the rollback cached no frontend: {log}"
    );
    assert!(
        adoption_field(&log, "frontend_filter_bits") > 0,
        "adoption after the rollback set no frontend filter bit: {log}"
    );
    let rep = load.finish();
    assert!(rep.tcp_new >= 60 && rep.long_asks >= 60 * LONG_LIVED, "{rep:?}");
    eprintln!("upgraded from {version}, rolled back and upgraded again without a failed connection");
}

#[test]
fn resizing_conntrack_by_flag_under_load_keeps_every_connection() {
    let t = Topology::new(3).unwrap();
    let _servers = start_servers(&t);
    let mut agent = start_agent(&t, &agent_binary(), &[]);
    let default = pinned_capacity(&agent, map_names::CONNTRACK);
    let load = Load::start(&t);
    load.advance(20);

    // Smaller, then back to the default: both directions migrate every
    // entry (a few hundred flows fit either size).
    for size in [65_536, default] {
        agent
            .replace(&agent_binary(), &["--ct-max-entries", &size.to_string()])
            .unwrap();
        load.advance(20);
        assert_eq!(pinned_capacity(&agent, map_names::CONNTRACK), size);
        assert!(
            !agent.pins.join(dataplane::bpf::migrate::OLD_DIR).exists(),
            "the old maps of the migration are still pinned"
        );
    }
    let rep = load.finish();
    assert!(rep.tcp_new >= 40 && rep.long_asks >= 40 * LONG_LIVED, "{rep:?}");
}
