//! Endpoint churn under load: continuous TCP connections through three VIPs
//! while their EndpointSlices are rewritten 100 times per second for 30 s.
//!
//! Every Service keeps one stable backend; the others are added and removed
//! all the time. Each churned backend is a fresh address, used once: all of
//! them live in one "pool" namespace that accepts a whole /20 locally
//! (`ip route add local`), where one server answers with the address a
//! connection reached. So every connection is attributed to exactly one
//! backend, and a backend that was removed never comes back.
//!
//! "Programmed": the file source reads the directory only after the previous
//! sync was logged, so the first sync whose predecessor was logged after a
//! slice was renamed into place reflects that write; when it is logged, the
//! removal is in the maps. That bound is conservative (it may be later than
//! the real moment), never early.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use dataplane_tests::{
    agent::Agent,
    manifests::{service, slice},
    netns::{backend_addr, Topology},
    servers::{tcp_server_any_addr, Conn},
};

const SERVICES: usize = 3;
const PORTS: &[(&str, u16, &str)] = &[("http", 80, "TCP")];
const TARGETS: &[(&str, u16, &str)] = &[("http", 8080, "TCP")];
const CHURN_FOR: Duration = Duration::from_secs(30);
/// 100 slice rewrites per second.
const STEP: Duration = Duration::from_millis(10);
const TIMEOUT: Duration = Duration::from_secs(3);
/// Bounds on every client loop, whatever happens.
const CLIENT_MAX_TIME: Duration = Duration::from_secs(60);
const CLIENT_MAX_CONNS: usize = 20_000;
/// Churned backends per Service stay within these bounds.
const MIN_CHURNED: usize = 2;
const MAX_CHURNED: usize = 6;
/// The pool namespace answers for 198.18.64.0/20.
const POOL: &str = "198.18.64.0/20";

fn vip(s: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, 10 + s as u8)
}

/// The stable backend of Service `s`: backend namespace s+1.
fn stable(s: usize) -> Ipv4Addr {
    backend_addr(s + 1)
}

/// The n-th churned backend address in the pool (no .0 or .255).
fn pool_addr(n: usize) -> Ipv4Addr {
    assert!(n < 16 * 254, "pool exhausted");
    Ipv4Addr::new(198, 18, 64 + (n / 254) as u8, 1 + (n % 254) as u8)
}

fn slice_name(s: usize) -> String {
    format!("slice-{s}.yaml")
}

fn slice_for(s: usize, churned: &[Ipv4Addr]) -> String {
    let mut addrs = vec![stable(s)];
    addrs.extend_from_slice(churned);
    slice("churn", &format!("svc{s}-abcde"), &format!("svc{s}"), TARGETS, &addrs)
}

/// A small deterministic generator, so a failing run can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// What the writer did to one churned backend.
#[derive(Default, Clone, Copy)]
struct Life {
    service: usize,
    /// Just before the slice that adds it was written.
    added: Option<SystemTime>,
    /// Just after the slice that removes it was renamed into place.
    removed: Option<SystemTime>,
}

/// One short connection: when it started and ended, and the backend that
/// answered or the error.
struct Record {
    service: usize,
    start: SystemTime,
    end: SystemTime,
    result: Result<Ipv4Addr, String>,
}

/// Parses the tracing timestamp at the start of a log line,
/// `2025-01-02T03:04:05.123456Z`, as UTC.
fn parse_timestamp(line: &str) -> Option<SystemTime> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<u64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let nanos: u64 = format!("{frac:0<9}")[..9].parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = u64::try_from(days).ok()? * 86400 + hh * 3600 + mm * 60 + ss;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(nanos))
}

/// The `sync applied` lines of the agent's log: (when logged, errors).
fn syncs(log: &str) -> Vec<(SystemTime, u64)> {
    log.lines()
        .filter(|l| l.contains("sync applied"))
        .map(|l| {
            let at = parse_timestamp(l).unwrap_or_else(|| panic!("no timestamp in log line {l:?}"));
            let errors = l
                .split_whitespace()
                .find_map(|f| f.strip_prefix("errors="))
                .and_then(|e| e.parse().ok())
                .unwrap_or_else(|| panic!("no errors= field in log line {l:?}"));
            (at, errors)
        })
        .collect()
}

/// When a write at `written` was certainly in the maps: the end of the
/// first sync whose predecessor ended after the write. None if the log
/// has no such sync.
fn programmed(syncs: &[(SystemTime, u64)], written: SystemTime) -> Option<SystemTime> {
    let j = syncs.iter().position(|(at, _)| *at >= written)?;
    syncs.get(j + 1).map(|(at, _)| *at)
}

#[test]
fn endpoint_churn_at_100_changes_per_second_keeps_every_connection_correct() {
    let t = Topology::new(SERVICES + 1).unwrap();
    let pool = &t.backends[SERVICES];
    let pool_gw = backend_addr(SERVICES + 1).to_string();
    t.node.ip(&["route", "add", POOL, "via", &pool_gw]).unwrap();
    pool.ip(&["route", "add", "local", POOL, "dev", "lo"]).unwrap();
    let _servers: Vec<_> = t.backends.iter().map(|ns| tcp_server_any_addr(ns, 8080)).collect();

    // Start with the stable backend plus MIN_CHURNED fresh ones each.
    let mut lives: BTreeMap<Ipv4Addr, Life> = BTreeMap::new();
    let mut churned: Vec<Vec<Ipv4Addr>> = vec![Vec::new(); SERVICES];
    let mut next_addr = 0;
    let t0 = SystemTime::now();
    for (s, set) in churned.iter_mut().enumerate() {
        for _ in 0..MIN_CHURNED {
            let a = pool_addr(next_addr);
            next_addr += 1;
            set.push(a);
            lives.insert(
                a,
                Life {
                    service: s,
                    added: Some(t0),
                    removed: None,
                },
            );
        }
    }
    let mut files = Vec::new();
    for (s, set) in churned.iter().enumerate() {
        files.push((
            format!("svc-{s}.yaml"),
            service("churn", &format!("svc{s}"), vip(s), PORTS),
        ));
        files.push((slice_name(s), slice_for(s, set)));
    }
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (n.as_str(), c.as_str())).collect();
    // Poll the directory often, so that syncs follow the churn closely.
    let agent = Agent::start_with(&t.node, &t.node_ifaces(), &[], &files, &["--poll-interval-ms", "10"]).unwrap();

    // Clients: per Service one thread of short connections (one question
    // each) and one thread holding two long connections open.
    let stop = Arc::new(AtomicBool::new(false));
    let mut short = Vec::new();
    let mut long = Vec::new();
    for s in 0..SERVICES {
        let stop_short = stop.clone();
        short.push(t.client.run(move || {
            let started = Instant::now();
            let mut records = Vec::new();
            while !stop_short.load(Ordering::Relaxed)
                && started.elapsed() < CLIENT_MAX_TIME
                && records.len() < CLIENT_MAX_CONNS
            {
                let start = SystemTime::now();
                let result = Conn::connect(SocketAddr::from((vip(s), 80)), TIMEOUT)
                    .and_then(|mut c| c.ask())
                    .map_err(|e| e.to_string())
                    .and_then(|who| who.parse::<Ipv4Addr>().map_err(|_| format!("odd answer {who:?}")));
                records.push(Record {
                    service: s,
                    start,
                    end: SystemTime::now(),
                    result,
                });
                // Keeps the client's ports in TIME_WAIT within bounds.
                std::thread::sleep(Duration::from_millis(3));
            }
            records
        }));
        let stop_long = stop.clone();
        long.push(t.client.run(move || {
            let mut problems = Vec::new();
            let mut conns = Vec::new();
            for _ in 0..2 {
                let mut c = Conn::connect(SocketAddr::from((vip(s), 80)), TIMEOUT).unwrap();
                let first = c.ask().unwrap();
                conns.push((c, first));
            }
            let started = Instant::now();
            let mut asked = 0;
            while !stop_long.load(Ordering::Relaxed) && started.elapsed() < CLIENT_MAX_TIME {
                for (c, first) in &mut conns {
                    match c.ask() {
                        Ok(who) if who == *first => {}
                        Ok(who) => problems.push(format!("svc{s}: a long connection moved from {first} to {who}")),
                        Err(e) => problems.push(format!("svc{s}: a long connection to {first} failed: {e}")),
                    }
                    asked += 1;
                }
                if problems.len() > 10 {
                    break;
                }
                // Paces the requests on the held connections (the loop is
                // bounded by CLIENT_MAX_TIME); not a synchronisation.
                std::thread::sleep(Duration::from_millis(50));
            }
            (problems, asked)
        }));
    }

    // The churn: Service k % 3 at step k gains or loses one backend.
    let mut rng = Lcg(0x5eed_c0de);
    let start = Instant::now();
    let steps = (CHURN_FOR.as_millis() / STEP.as_millis()) as u32;
    for k in 0..steps {
        // The churn's schedule (one change every STEP): the load itself,
        // not a synchronisation.
        if let Some(wait) = (STEP * k).checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let s = k as usize % SERVICES;
        let set = &mut churned[s];
        let add = set.len() < MIN_CHURNED || (set.len() < MAX_CHURNED && rng.next().is_multiple_of(2));
        if add {
            let a = pool_addr(next_addr);
            next_addr += 1;
            set.push(a);
            lives.insert(
                a,
                Life {
                    service: s,
                    added: Some(SystemTime::now()),
                    removed: None,
                },
            );
            agent.write(&slice_name(s), &slice_for(s, set)).unwrap();
        } else {
            let a = set.remove(rng.next() as usize % set.len());
            agent.write(&slice_name(s), &slice_for(s, set)).unwrap();
            lives.get_mut(&a).unwrap().removed = Some(SystemTime::now());
        }
    }
    let churn_took = start.elapsed();
    // Until the last write is known to be programmed (by the agent's
    // metrics: two more syncs, the second of which began after the write),
    // rewrite a slice unchanged (a new file, so the agent syncs again).
    let written_at = agent.syncs().unwrap();
    let settle = Instant::now();
    while agent.syncs().unwrap() < written_at + 2 {
        assert!(
            settle.elapsed() < Duration::from_secs(10),
            "the agent stopped syncing; its log:\n{}",
            agent.log()
        );
        agent.write(&slice_name(0), &slice_for(0, &churned[0])).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let records: Vec<Record> = short.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let long: Vec<(Vec<String>, usize)> = long.into_iter().map(|h| h.join().unwrap()).collect();

    // No sync failed, by the agent's metrics; the log's `sync applied`
    // lines below give the times at which removals were programmed.
    let metrics = agent.fresh_metrics().unwrap();
    assert_eq!(
        metrics.get("dataplane_sync_errors_total"),
        Some(&0.0),
        "syncs failed; agent log:\n{}",
        agent.log()
    );
    // No packet missed a backend slot: old generations outlive the flip
    // of their service entry by a grace period (`RETIRE_GRACE`).
    assert_eq!(
        metrics.get(r#"dataplane_datapath_packets_total{reason="drop_backend_missing",drop="true"}"#),
        Some(&0.0),
        "packets found a backend slot missing under churn"
    );
    let syncs = syncs(&agent.log());
    let failed_syncs: Vec<_> = syncs.iter().filter(|(_, e)| *e > 0).collect();
    assert!(
        failed_syncs.is_empty(),
        "{} syncs reported errors; agent log:\n{}",
        failed_syncs.len(),
        agent.log()
    );
    let removed_at: BTreeMap<Ipv4Addr, SystemTime> = lives
        .iter()
        .filter_map(|(a, l)| Some((*a, programmed(&syncs, l.removed?)?)))
        .collect();

    let mut violations = Vec::new();
    let (mut to_stable, mut to_churned) = (0, 0);
    for r in &records {
        let at = r.start.duration_since(t0).unwrap_or_default();
        match &r.result {
            Err(e) => violations.push(format!("svc{} connection at +{at:?} failed: {e}", r.service)),
            Ok(a) if *a == stable(r.service) => to_stable += 1,
            Ok(a) => match lives.get(a) {
                Some(l) if l.service == r.service => {
                    to_churned += 1;
                    if l.added.is_some_and(|w| r.end < w) {
                        violations.push(format!(
                            "svc{} connection at +{at:?} reached {a} before it was added",
                            r.service
                        ));
                    }
                    if let Some(p) = removed_at.get(a).filter(|p| r.start > **p) {
                        violations.push(format!(
                            "svc{} connection at +{at:?} reached {a}, whose removal was programmed at +{:?}",
                            r.service,
                            p.duration_since(t0).unwrap_or_default()
                        ));
                    }
                }
                _ => violations.push(format!(
                    "svc{} connection at +{at:?} reached {a}, not a backend of it",
                    r.service
                )),
            },
        }
    }
    let long_problems: Vec<&String> = long.iter().flat_map(|(p, _)| p).collect();
    let long_asks: usize = long.iter().map(|(_, n)| n).sum();
    eprintln!(
        "churn: {steps} slice writes in {churn_took:?}, {} syncs, {} churned backends; \
         {} short connections ({to_stable} to stable backends, {to_churned} to churned ones), \
         {long_asks} requests on {} long connections",
        syncs.len(),
        next_addr,
        records.len(),
        long.len() * 2
    );
    assert!(
        violations.is_empty() && long_problems.is_empty(),
        "{} bad short connections, first ones:\n{}\nlong connections:\n{}",
        violations.len(),
        violations.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
        long_problems
            .iter()
            .take(20)
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The churn really was under load: new connections reached churned
    // backends as well as stable ones.
    assert!(to_stable > 0 && to_churned > 0, "{to_stable} {to_churned}");
}

#[test]
fn log_timestamps_parse_as_utc() {
    let t = parse_timestamp("1970-01-02T00:00:01.500000Z  INFO x: sync applied").unwrap();
    assert_eq!(t, UNIX_EPOCH + Duration::from_millis(86_401_500));
    let t = parse_timestamp("2024-03-01T12:00:00.000001Z INFO").unwrap();
    assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().as_micros(), 1_709_294_400_000_001);
}
