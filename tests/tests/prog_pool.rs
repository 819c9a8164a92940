//! The program tests' pool of loaded objects (`tests/src/prog.rs`): an
//! object taken again from the pool must be indistinguishable from one
//! loaded now. A real workload dirties the maps (a synced Service with
//! session affinity, frames through XDP and TC that create conntrack,
//! affinity, statistics, events and flood-guard state, the agent's other
//! writes); whatever map it cannot reach gets an entry written directly.
//! Every map must then differ from a freshly loaded object's, and after
//! the object went back to the pool and was taken again, every map must
//! hold exactly what the fresh object's holds, map by map: a map the reset
//! forgets fails here. The maps compared are checked against the object
//! file's own list of maps.
//!
//! One test in this binary: nothing else takes the pooled object between
//! the give-back and the take.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use dataplane::bpf::loader::Globals;
use dataplane_common::{SockNatKey, SockNatValue, IFACE_F_VETH};
use dataplane_tests::{
    packet::{Frame, ACK, SYN, TCP, UDP},
    prog::{pin_to_cpu, Loaded, PoolKey, Prog, PROGRAM_TEST_GLOBALS},
};
use object::{Object, ObjectSection, ObjectSymbol};

const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10));
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 100, 2));
const QUOTA: u32 = 4;

fn b(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 1, i))
}

/// Maps no workload can change: the programs' read-only constants (frozen
/// at load) and the log ring (the programs log only with `--bpf-debug-log`,
/// never in program tests).
fn unchangeable(name: &str) -> bool {
    name.ends_with(".rodata") || name == "AYA_LOGS"
}

/// The maps the object file defines, as the kernel names them (cut at 15
/// bytes): the symbols of its `maps` section, and its `.rodata`.
fn maps_of_the_object_file() -> BTreeSet<String> {
    let path = std::env::var_os("DATAPLANE_BPF_OBJECT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/bpfel-unknown-none/release/dataplane")
        });
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; build it with `cargo xtask build-ebpf`", path.display()));
    let obj = object::File::parse(&*bytes).expect("an ELF object");
    let maps = obj.section_by_name("maps").expect("a maps section").index();
    let mut names: BTreeSet<String> = obj
        .symbols()
        .filter(|s| s.section_index() == Some(maps))
        .map(|s| s.name().expect("a symbol name").chars().take(15).collect())
        .collect();
    assert!(names.len() > 20, "only {} maps in {}", names.len(), path.display());
    if obj.section_by_name(".rodata").is_some() {
        names.insert(".rodata".into());
    }
    names
}

#[test]
fn a_pooled_object_after_a_workload_holds_exactly_what_a_fresh_one_holds() {
    pin_to_cpu(0);
    let globals = Globals {
        new_flows_per_cpu: QUOTA,
        ..PROGRAM_TEST_GLOBALS
    };
    let key = PoolKey {
        globals,
        ..Loaded::default_key()
    };
    let take = || Loaded::with_globals(dataplane_common::DpConfig::defaults(), globals);
    let mut l = take();

    // The workload, as the agent and the traffic do it.
    l.dp.set_interface_kinds(&[(1, IFACE_F_VETH)]).unwrap();
    l.sync.track_endpoints(true).unwrap();
    l.sync
        .writer_mut()
        .write_cluster_cidrs(&[("198.18.0.0".parse().unwrap(), 16)])
        .unwrap();
    let backends = [(b(1), 8080), (b(2), 8080), (b(3), 8080)];
    l.set_service(VIP, 80, TCP, &backends);
    l.set_service_with(VIP, 53, UDP, &backends, Some(600));
    l.sync.writer_mut().fill_backend_filter().unwrap();
    for prog in Prog::BOTH {
        l.freeze_flood_window(0);
        for port in 40000..40002 {
            let syn = Frame::tcp((CLIENT, port), (VIP, 80), SYN).build();
            l.run(prog, &syn);
            l.run(prog, &Frame::tcp((CLIENT, port), (VIP, 80), ACK).build());
            l.run(prog, &Frame::udp((CLIENT, port), (VIP, 53), b"q").build());
            l.run(prog, &Frame::udp((CLIENT, port), (b(9), 53), b"not a service").build());
        }
        // The quota used up: new flows go without state, their replies
        // tracked by the flood guard.
        l.freeze_flood_window(QUOTA);
        for port in 41000..41004 {
            l.run(prog, &Frame::tcp((CLIENT, port), (VIP, 80), SYN).build());
        }
    }
    assert!(!l.embryonic_entries().is_empty(), "the flood guard tracked replies");
    assert!(l.conntrack_len() > 0);
    // What only the socket-level programs write (not loaded here).
    l.sync
        .writer_mut()
        .sock_nat
        .insert(
            SockNatKey {
                cookie: 7,
                ..Default::default()
            },
            SockNatValue::default(),
            0,
        )
        .unwrap();

    // A freshly loaded object, never pooled, kept alive to the end (so
    // that the pool cannot hand it out below).
    let fresh = Loaded::loaded_now(key);
    let want = fresh.map_contents().unwrap();
    let names: BTreeSet<String> = want.keys().cloned().collect();
    let defined = maps_of_the_object_file();
    let missing: Vec<_> = defined.difference(&names).collect();
    assert!(
        missing.is_empty(),
        "maps of the object the pool does not track: {missing:?}"
    );

    // Every map the workload left alone gets an entry of its own.
    let dirty = l.map_contents().unwrap();
    let mut by_hand = Vec::new();
    for m in l.tracked_maps() {
        if dirty[&m.name] == want[&m.name] && !unchangeable(&m.name) {
            m.write_marker().unwrap();
            by_hand.push(m.name.clone());
        }
    }
    eprintln!("written directly (no workload reaches them here): {by_hand:?}");
    let dirty = l.map_contents().unwrap();
    let same: Vec<_> = names
        .iter()
        .filter(|n| dirty[*n] == want[*n] && !unchangeable(n))
        .collect();
    assert!(same.is_empty(), "maps left as after the load: {same:?}");

    let id = l.object_id();
    drop(l);
    let l = take();
    assert_eq!(l.object_id(), id, "the object comes back from the pool");
    let got = l.map_contents().unwrap();
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    let differ: Vec<_> = names.iter().filter(|n| got[*n] != want[*n]).collect();
    assert!(
        differ.is_empty(),
        "maps of the pooled object that differ from a fresh object's: {differ:?}"
    );
    drop(fresh);
}
