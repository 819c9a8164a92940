//! Hostile packets: a million seeded malformed and random frames through the
//! loaded XDP and TC programs (BPF_PROG_TEST_RUN), each checked against the
//! reference model in `dataplane_tests::hostile`.
//!
//! `DATAPLANE_FUZZ_SEED` picks the seed (decimal or 0x-hex) and
//! `DATAPLANE_FUZZ_PACKETS` the number of frames; a failure prints both, the
//! frame's index and its bytes, and the same seed replays the same run.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Instant};

use dataplane::model::Frontend;
use dataplane::{bpf::testrun, reconcile::SyncConfig};
use dataplane_common::{limits, program_names, DpConfig, Reason, ServiceKey, CT_F_SNAT};
use dataplane_tests::{
    hostile::{check, hex, services, Expect, Generator, Hook, Kind, Model, Svc, Tuple, SNAT_ADDR},
    prog::Loaded,
};

const DEFAULT_SEED: u64 = 0x00c0_ffee_d00d_2024;
const DEFAULT_PACKETS: u64 = 1_000_000;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("{name}={v}: {e}"))
        }
        Err(_) => default,
    }
}

/// Conntrack timeouts far beyond the run's length: entries leave only when
/// the model says so (never), so the model needs no clock.
fn no_expiry() -> DpConfig {
    let forever = 1u64 << 60;
    DpConfig {
        snat_addr: u32::from_ne_bytes(SNAT_ADDR),
        tcp_syn_timeout_ns: forever,
        tcp_established_timeout_ns: forever,
        tcp_closing_timeout_ns: forever,
        udp_timeout_ns: forever,
        udp_stream_timeout_ns: forever,
        ..DpConfig::defaults()
    }
}

fn loaded(model: &Model) -> Loaded {
    let mut l = Loaded::with_configs(SyncConfig::default(), no_expiry());
    for s in &model.services {
        if s.flags() != 0 || s.affinity {
            // A NodePort or load balancer IP: remote backends SNATed,
            // source ranges, a Local policy without local endpoints.
            l.set_frontend(
                ServiceKey::new(s.vip, s.port, s.proto),
                Frontend {
                    service: format!("hostile/np-{}", s.port),
                    port_name: String::new(),
                    backends: s.backends.clone(),
                    affinity_timeout_s: s.affinity.then_some(1 << 30),
                    flags: s.flags(),
                    source_ranges: s
                        .source_ranges
                        .iter()
                        .map(|(a, len)| (std::net::IpAddr::from(*a), *len))
                        .collect(),
                    also_serving: Vec::new(),
                },
            );
            assert_eq!(l.backends(s.vip, s.port, s.proto), s.backends);
            continue;
        }
        let b: Vec<(std::net::IpAddr, u16)> = s.backends.iter().map(|b| (b.ip(), b.host_port())).collect();
        l.set_service(s.vip, s.port, s.proto, &b);
        assert_eq!(
            l.backends(s.vip, s.port, s.proto),
            s.backends,
            "the model indexes backends as the datapath does"
        );
    }
    l
}

/// How often the backend sets change during the run.
const CHURN_EVERY: u64 = 50_000;

/// Changes backend sets under the flows: the first TCP frontend gains and
/// loses a 4th backend, the first UDP frontend loses all its endpoints and
/// gets them back. Established TCP flows must keep their backend, UDP
/// flows to endpoints that left are cleared by the sync (the model drops
/// them too), new flows follow the new set, and flows to a frontend left
/// without endpoints are rejected unless tracked.
fn churn(l: &mut Loaded, model: &mut Model, round: u64) {
    let b = |i: u8| Ipv4Addr::new(198, 18, i, 2);
    let tcp: &[(Ipv4Addr, u16)] = if round % 2 == 1 {
        &[(b(1), 8080), (b(2), 8080), (b(3), 8081), (b(10), 8080)]
    } else {
        &[(b(1), 8080), (b(2), 8080), (b(3), 8081)]
    };
    let udp: &[(Ipv4Addr, u16)] = if round % 2 == 1 {
        &[]
    } else {
        &[(b(1), 5353), (b(2), 5353)]
    };
    for (i, backends) in [(0, tcp), (1, udp)] {
        let s = &model.services[i];
        let next = Svc::new(s.vip, s.port, s.proto, backends);
        l.set_service(next.vip, next.port, next.proto, backends);
        assert_eq!(l.backends(next.vip, next.port, next.proto), next.backends);
        model.replace_service(i, next);
    }
}

#[test]
fn a_million_hostile_packets_follow_the_reference_model() {
    let seed = env_u64("DATAPLANE_FUZZ_SEED", DEFAULT_SEED);
    let packets = env_u64("DATAPLANE_FUZZ_PACKETS", DEFAULT_PACKETS);
    eprintln!("hostile packets: seed {seed:#x}, {packets} frames (DATAPLANE_FUZZ_SEED / DATAPLANE_FUZZ_PACKETS)");
    let mut model = Model::new(services());
    let mut l = loaded(&model);
    let xdp = l.dp.program_fd(l.dp.xdp_program()).unwrap();
    let tc = l.dp.program_fd(program_names::TC).unwrap();
    let mut gen = Generator::new(seed);
    let mut kinds: BTreeMap<Kind, u64> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let start = Instant::now();
    for i in 0..packets {
        if i > 0 && i % CHURN_EVERY == 0 {
            churn(&mut l, &mut model, i / CHURN_EVERY);
        }
        let hook = gen.hook();
        let (kind, frame) = gen.frame(&model);
        let expect = model.predict(hook, &frame);
        let fd = match hook {
            Hook::Xdp => xdp,
            Hook::Tc => tc,
        };
        let ran = testrun::run(fd, &frame).map(|r| (r.retval, r.data));
        let mut verdict = check(hook, &frame, &expect, ran);
        if let (Ok(()), Some(r)) = (&verdict, expect.reason()) {
            // The frame's own reason was counted (the totals at the end
            // show that nothing else was).
            let counted = l.reason(r);
            let want = model.counts[&r];
            if counted != want {
                verdict = Err(format!("counter {} reads {counted}, the model says {want}", r.name()));
            }
        }
        if let Err(why) = verdict {
            panic!(
                "hostile packet mismatch: seed {seed:#x} index {i} ({hook:?}, {kind:?})\n  {why}\n  expected {expect:?}\n  frame {}\n  reproduce: DATAPLANE_FUZZ_SEED={seed:#x} DATAPLANE_FUZZ_PACKETS={} cargo test -p dataplane-tests --test hostile",
                hex(&frame),
                i + 1,
            );
        }
        *kinds.entry(kind).or_default() += 1;
        let outcome = match &expect {
            Expect::Refused => "refused by test_run".to_string(),
            Expect::Pass(r) => format!("pass {}", r.name()),
            Expect::Drop(r) => format!("drop {}", r.name()),
            Expect::Translate { reason, .. } => format!("translate {}", reason.name()),
            Expect::TranslateBoth { reason, .. } => format!("translate both {}", reason.name()),
            Expect::Reject(_) => "reject".to_string(),
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    let elapsed = start.elapsed();
    eprintln!("{packets} frames in {elapsed:.1?}; by kind: {kinds:?}");
    eprintln!("outcomes: {outcomes:#?}");

    assert!(
        kinds.get(&Kind::Hairpin).copied().unwrap_or(0) > 0,
        "no hairpin frame: {kinds:?}"
    );
    // Every outcome the model knows happened, so the run exercised them all.
    for want in [
        "pass pass_not_ip",
        "pass pass_not_tcp_udp",
        "pass pass_fragment",
        "pass pass_truncated",
        "pass pass_no_service",
        "translate nat_new_flow",
        "translate nat_established",
        "translate nat_reply",
        "translate both nat_new_flow",
        "translate both nat_established",
        "translate both nat_reply",
        "drop drop_no_backend",
        "drop drop_source_range",
        "drop drop_no_local_backend",
        "reject",
        "refused by test_run",
    ] {
        assert!(
            outcomes.contains_key(want),
            "no frame had outcome {want:?}: {outcomes:?}"
        );
    }

    // Reply-tuple clashes: each resolved as the model says.
    eprintln!("reply-tuple clashes resolved: {}", model.clashes);
    assert!(model.clashes > 0, "no reply-tuple clash happened");
    assert_eq!(l.ct_event(dataplane_common::CtEvent::ClashResolved), model.clashes);

    // Counters: one reason per frame the programs ran, each as the model says.
    let total: u64 = Reason::ALL.iter().map(|r| l.reason(*r)).sum();
    assert_eq!(total, model.runs, "sum of the reason counters != frames run");
    for r in Reason::ALL {
        assert_eq!(
            l.reason(r),
            model.counts.get(&r).copied().unwrap_or(0),
            "counter {} differs from the model",
            r.name()
        );
    }

    // The conntrack map holds exactly the model's entries: nothing evicted,
    // nothing extra, same translations and state flags.
    // The client pools keep the entries far below the map size (bit flips
    // in addresses add a few more), so LRU eviction never had to act.
    eprintln!(
        "conntrack: {} entries for {} flows (map size {})",
        model.ct.len(),
        model.flows.len(),
        limits::MAX_CONNTRACK
    );
    // (A third at most: the kernel's LRU keeps per-CPU free lists and may
    // evict before it is full; the exact comparison below would show any
    // eviction.)
    assert!(model.ct.len() < limits::MAX_CONNTRACK as usize / 3);
    type Row = (Ipv4Addr, u16, u16, Option<(Ipv4Addr, u16)>);
    let mut real: BTreeMap<Tuple, Row> = BTreeMap::new();
    for kv in l.sync.writer().conntrack.iter() {
        let (k, v) = kv.unwrap();
        let t = Tuple {
            saddr: k.saddr[0].to_ne_bytes(),
            daddr: k.daddr[0].to_ne_bytes(),
            sport: u16::from_be(k.sport),
            dport: u16::from_be(k.dport),
            proto: k.proto,
        };
        let snat = (v.flags & CT_F_SNAT != 0)
            .then(|| (Ipv4Addr::from(v.snat_addr[0].to_ne_bytes()), u16::from_be(v.snat_port)));
        real.insert(
            t,
            (
                Ipv4Addr::from(v.nat_addr[0].to_ne_bytes()),
                u16::from_be(v.nat_port),
                v.state(),
                snat,
            ),
        );
    }
    let want: BTreeMap<Tuple, Row> = model
        .ct
        .iter()
        .map(|(t, e)| {
            let snat = e.snat.map(|(a, p)| (Ipv4Addr::from(a), p));
            (*t, (Ipv4Addr::from(e.nat_addr), e.nat_port, e.flags, snat))
        })
        .collect();
    assert_eq!(real.len(), want.len(), "conntrack entries: map vs model");
    for (t, w) in &want {
        assert_eq!(real.get(t), Some(w), "conntrack entry {t:?}");
    }
}
