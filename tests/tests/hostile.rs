//! Hostile packets: a million seeded malformed and random frames through the
//! loaded XDP and TC programs (BPF_PROG_TEST_RUN), each checked against the
//! reference model in `dataplane_tests::hostile`.
//!
//! `DATAPLANE_FUZZ_SEED` picks the seed (decimal or 0x-hex) and
//! `DATAPLANE_FUZZ_PACKETS` the number of frames; a failure prints both, the
//! frame's index and its bytes, and the same seed replays the same run.

use std::{collections::BTreeMap, time::Instant};

use dataplane::bpf::{loader::Globals, testrun};
use dataplane_common::{
    addr_of, ip_of, limits, program_names, CtEvent, CtKey, CtValue, DpConfig, Reason, ServiceKey, CT_F_SNAT,
};
use dataplane_tests::{
    hostile::{
        check, churned, hex, services, Ep, Expect, Generator, Hook, Kind, Model, Tuple, NODE4, NODE6, SNAT_PORTS,
    },
    prog::{pin_to_cpu, Loaded},
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
/// the model says so (never), so the model needs no clock. The node's
/// addresses for SNAT, both families.
fn config() -> DpConfig {
    let forever = 1u64 << 60;
    DpConfig {
        tcp_syn_timeout_ns: forever,
        tcp_established_timeout_ns: forever,
        tcp_closing_timeout_ns: forever,
        udp_timeout_ns: forever,
        udp_stream_timeout_ns: forever,
        snat_addr: addr_of(NODE4.into()).0[0],
        snat_addr6: addr_of(NODE6.into()).0,
        ..DpConfig::defaults()
    }
}

/// The flood guard's quota in this run: never reached by counting alone;
/// the phases (`flood_phase`) set how much of it is left.
const FLOOD_LIMIT: u32 = 1_000_000;

/// The programs with the model's SNAT port range and flood guard quota and
/// every frontend of the model, programmed through the agent's sync path.
fn loaded(model: &Model) -> Loaded {
    let globals = Globals {
        snat_ports: SNAT_PORTS,
        new_flows_per_cpu: FLOOD_LIMIT,
        host_routing: false,
        sock_routing: false,
    };
    let mut l = Loaded::with_globals(config(), globals);
    for s in &model.services {
        l.set_frontend(ServiceKey::new(s.vip, s.port, s.proto), s.frontend());
        assert_eq!(
            l.backends(s.vip, s.port, s.proto),
            *s.backends,
            "the model indexes backends as the datapath does"
        );
    }
    l
}

/// How often the backend sets change during the run.
const CHURN_EVERY: u64 = 50_000;

/// Changes backend sets under the flows (`hostile::churned`): established
/// TCP flows must keep their backend (a new SYN on an entry of an older
/// set picks again), UDP flows to endpoints that left are cleared by the
/// sync (the model drops them too), new flows follow the new set, and
/// flows to a frontend left without endpoints are rejected unless tracked.
fn churn(l: &mut Loaded, model: &mut Model, round: u64) {
    for (i, backends) in churned(round) {
        let next = model.services[i].with_backends(&backends);
        l.set_frontend(ServiceKey::new(next.vip, next.port, next.proto), next.frontend());
        assert_eq!(l.backends(next.vip, next.port, next.proto), *next.backends);
        model.replace_service(i, next);
    }
}

/// How often the flood guard's phase changes.
const FLOOD_EVERY: u64 = 20_000;

/// The flood guard's window, frozen (it never ends, so the guard's count
/// follows from the frames alone) with a quota that is, by phase: open
/// (nothing used), used up to its last few flows (the next 0-39 eligible
/// SYNs get state, the rest of the phase none), or used up (a flood in
/// progress: every eligible SYN goes without state).
fn flood_phase(l: &mut Loaded, model: &mut Model, phase: u64) {
    let used = match phase % 3 {
        0 => 0,
        1 => FLOOD_LIMIT - (phase * 7 % 40) as u32,
        _ => FLOOD_LIMIT,
    };
    l.freeze_flood_window(used);
    model.flood_used = used;
}

/// A conntrack entry as the model keeps it: translation, SNAT source,
/// state flags.
type Entry = (Ep, Option<Ep>, u16);

/// A map entry (conntrack or the flood guard's) as the model's.
fn entry(k: &CtKey, v: &CtValue) -> (Tuple, Entry) {
    let ip = |a| ip_of(a, k.family);
    let t = Tuple {
        saddr: ip(&k.saddr),
        daddr: ip(&k.daddr),
        sport: u16::from_be(k.sport),
        dport: u16::from_be(k.dport),
        proto: k.proto,
    };
    // Without SNAT the SNAT fields stay zero.
    let snat = (ip(&v.snat_addr), u16::from_be(v.snat_port));
    let zero = (ip_of(&[0; 4], k.family), 0);
    let snat = if v.flags & CT_F_SNAT != 0 {
        Some(snat)
    } else {
        assert_eq!(snat, zero, "SNAT fields of {t:?} without CT_F_SNAT");
        None
    };
    (t, ((ip(&v.nat_addr), u16::from_be(v.nat_port)), snat, v.state()))
}

#[test]
fn a_million_hostile_packets_follow_the_reference_model() {
    // The flood guard counts per CPU: every frame runs on this one.
    pin_to_cpu(0);
    let seed = env_u64("DATAPLANE_FUZZ_SEED", DEFAULT_SEED);
    let packets = env_u64("DATAPLANE_FUZZ_PACKETS", DEFAULT_PACKETS);
    eprintln!("hostile packets: seed {seed:#x}, {packets} frames (DATAPLANE_FUZZ_SEED / DATAPLANE_FUZZ_PACKETS)");
    let mut model = Model::new(services());
    model.flood_limit = FLOOD_LIMIT;
    let mut l = loaded(&model);
    let xdp = l.dp.program_fd(l.dp.xdp_program()).unwrap();
    let tc = l.dp.program_fd(program_names::TC).unwrap();
    let mut gen = Generator::new(seed);
    let mut kinds: BTreeMap<Kind, u64> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut clashes = 0;
    let mut stateless = (0, 0);
    let start = Instant::now();
    for i in 0..packets {
        if i > 0 && i % CHURN_EVERY == 0 {
            churn(&mut l, &mut model, i / CHURN_EVERY);
        }
        if i % FLOOD_EVERY == 0 {
            flood_phase(&mut l, &mut model, i / FLOOD_EVERY);
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
        if verdict.is_ok() && model.clashes != clashes {
            // A clash was resolved: counted as the event, once.
            clashes = model.clashes;
            let counted = l.ct_event(CtEvent::ClashResolved);
            if counted != clashes {
                verdict = Err(format!("clash_resolved reads {counted}, the model says {clashes}"));
            }
        }
        if verdict.is_ok() && (model.stateless, model.stateless_replies) != stateless {
            // The flood guard acted: counted as its events.
            stateless = (model.stateless, model.stateless_replies);
            let counted = (
                l.ct_event(CtEvent::StatelessNewFlow),
                l.ct_event(CtEvent::StatelessReply),
            );
            if counted != stateless {
                verdict = Err(format!(
                    "stateless_new_flow, stateless_reply read {counted:?}, the model says {stateless:?}"
                ));
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
            Expect::Reject(_) => "reject".to_string(),
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    let elapsed = start.elapsed();
    eprintln!("{packets} frames in {elapsed:.1?}; by kind: {kinds:?}");
    eprintln!("outcomes: {outcomes:#?}");
    eprintln!("translations of the model: {:#?}", model.notes);

    // Every outcome the model knows happened, so the run exercised them all.
    for want in [
        "pass pass_not_ip",
        "pass pass_not_tcp_udp",
        "pass pass_fragment",
        "pass pass_ext_headers",
        "pass pass_truncated",
        "pass pass_no_service",
        "translate nat_new_flow",
        "translate nat_established",
        "translate nat_reply",
        "drop drop_no_backend",
        "drop drop_source_range",
        "drop drop_no_local_backend",
        "drop drop_snat_failed",
        "reject",
        "refused by test_run",
    ] {
        assert!(
            outcomes.contains_key(want),
            "no frame had outcome {want:?}: {outcomes:?}"
        );
    }
    for want in [
        "IPv6 new flow",
        "IPv6 new flow behind extension headers",
        "IPv6 established",
        "IPv6 reply",
        "IPv6 reject",
        "new flow: remote backend, SNATed to the node",
        "new flow: hairpin, SNATed to the node",
        "SNAT: a later candidate port (earlier ones in use)",
        "SNAT: all 8 candidate ports in use",
        "SNAT: a port a closed flow held, taken again",
        "established: SNATed",
        "reply: SNAT reversed",
        "affinity: the client's earlier backend, not the hash's",
        "new flow: reply tuple clash, another source port",
        "established: moved source port (after a clash)",
        "reply: moved source port (after a clash) restored",
        "reply of a flow another one clashed with",
        "new SYN on an entry of an older backend set: picked again",
        "flood guard: new flow without state",
        "flood guard: SNATed new flow without state",
        "flood guard: the quota's last flow with state",
        "flood guard: a SYN on a tracked tuple gets state beyond the quota",
        "flood guard: SYN-ACK of a flow without state, from the frontend",
        "flood guard: the flow's state created by its next packet",
        "flood guard: UDP datagram without state",
        "flood guard: UDP answer of a datagram without state, from the frontend",
        "flood guard: a UDP flow's state created by its datagram after an answer",
        "flood guard: TCP segment of an untracked tuple without state (not a SYN)",
        "flood guard: TCP answer (not a SYN-ACK) of a flow without state, from the frontend",
        "flood guard: a TCP flow's state created beyond the quota by its segment after an answer",
    ] {
        assert!(
            model.notes.contains_key(want),
            "the model never predicted {want:?}: {:?}",
            model.notes
        );
    }

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
    assert_eq!(l.ct_event(CtEvent::ClashResolved), model.clashes, "clash_resolved");
    assert_eq!(
        l.ct_event(CtEvent::StatelessNewFlow),
        model.stateless,
        "stateless_new_flow"
    );
    assert_eq!(
        l.ct_event(CtEvent::StatelessReply),
        model.stateless_replies,
        "stateless_reply"
    );

    // The conntrack map holds exactly the model's entries: nothing evicted,
    // nothing extra, same translations, SNAT sources and state flags.
    // The client pools keep the entries far below the map size (bit flips
    // in addresses add a few more), so LRU eviction never had to act.
    eprintln!(
        "conntrack: {} entries for {} flows (map size {})",
        model.ct.len(),
        model.flows.len(),
        limits::MAX_CONNTRACK
    );
    assert!(model.ct.len() < limits::MAX_CONNTRACK as usize / 4);
    let real: BTreeMap<Tuple, Entry> = l
        .sync
        .writer()
        .conntrack
        .iter()
        .map(|kv| {
            let (k, v) = kv.unwrap();
            entry(&k, &v)
        })
        .collect();
    let want: BTreeMap<Tuple, Entry> = model.ct.iter().map(|(t, e)| (*t, (e.nat, e.snat, e.flags))).collect();
    assert_eq!(real.len(), want.len(), "conntrack entries: map vs model");
    for (t, w) in &want {
        assert_eq!(real.get(t), Some(w), "conntrack entry {t:?}");
    }

    // The flood guard's table holds exactly the model's reply entries
    // (far below its size: nothing evicted).
    eprintln!(
        "flood guard: {} new flows without state (SYNs, datagrams, segments), {} reply entries, {} answers translated from them",
        model.stateless,
        model.syn.len(),
        model.stateless_replies
    );
    assert!(model.syn.len() < limits::MAX_CT_SYN as usize / 4);
    let real: BTreeMap<Tuple, Entry> = l.embryonic_entries().iter().map(|(k, v)| entry(k, v)).collect();
    let want: BTreeMap<Tuple, Entry> = model.syn.iter().map(|(t, e)| (*t, (e.nat, e.snat, e.flags))).collect();
    assert_eq!(real, want, "the flood guard's reply entries: map vs model");
}
