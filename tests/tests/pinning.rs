//! Pinned state: a second agent adopts the maps a first one pinned, without
//! rewriting them and keeping established flows; maps of other sizes are
//! migrated with their entries; cleanup removes everything.

use std::{net::Ipv4Addr, process::Command};

use dataplane::{
    bpf::loader::Dataplane,
    bpf::map_sizes::MapSizes,
    bpf::testrun,
    model::{Desired, Frontend},
    reconcile::{SyncConfig, Syncer},
};
use dataplane_common::{program_names, Backend, BackendKey, CtKey, CtValue, ServiceKey};
use dataplane_tests::{
    packet::{parse_and_verify, Frame, ACK, SYN, TCP},
    prog::PinDir,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);

fn desired() -> Desired {
    let backends: Vec<Backend> = (1..=3)
        .map(|i| Backend::new(Ipv4Addr::new(198, 18, i, 2), 8080))
        .collect();
    let mut d = Desired::default();
    d.frontends.insert(
        ServiceKey::new(VIP, 80, TCP),
        Frontend {
            service: "shop/web".into(),
            port_name: "http".into(),
            backends,
            affinity_timeout_s: Some(60),
            flags: 0,
            source_ranges: vec![],
            also_serving: Vec::new(),
        }
        .into(),
    );
    d
}

fn run(dp: &Dataplane, frame: &[u8]) -> Vec<u8> {
    let fd = dp.program_fd(program_names::TC).unwrap();
    testrun::run(fd, frame).unwrap().data
}

#[test]
fn a_restarted_agent_adopts_pinned_maps_without_rewriting_them() {
    let pins = PinDir::new();
    let client = (CLIENT, 41000);

    // First agent: program the service, open a flow, and die leaving a
    // half-written generation behind.
    let (mut dp, adopted) = Dataplane::load_pinned(None, pins.0.clone()).unwrap();
    assert!(!adopted, "fresh root");
    let maps = dp.take_maps().unwrap();
    let mut sync = Syncer::new(maps);
    assert_eq!(sync.apply(&desired()).added, 1);
    let first = parse_and_verify(&run(&dp, &Frame::tcp(client, (VIP, 80), SYN).build()));
    let id = sync.programmed()[&ServiceKey::new(VIP, 80, TCP)].service_id;
    let mut maps = sync.into_writer();
    maps.backends
        .insert(
            BackendKey::new(id, 1, 0),
            Backend::new(Ipv4Addr::new(198, 18, 9, 9), 1),
            0,
        )
        .unwrap();
    drop(maps);
    drop(dp);

    // Second agent.
    let (mut dp, adopted) = Dataplane::load_pinned(None, pins.0.clone()).unwrap();
    assert!(adopted);
    let maps = dp.take_maps().unwrap();
    let (mut sync, report) = Syncer::adopt(maps, SyncConfig::default()).unwrap();
    assert_eq!(
        (report.frontends, report.backends, report.stale_removed),
        (1, 3, 1),
        "{report:?}"
    );
    let r = sync.apply(&desired());
    assert_eq!(
        (r.added, r.updated, r.removed, r.unchanged),
        (0, 0, 0, 1),
        "the same state must write nothing: {r:?}"
    );
    assert_eq!(
        sync.programmed()[&ServiceKey::new(VIP, 80, TCP)].service_id,
        id,
        "ids are kept"
    );
    // The established flow keeps its backend through the new program.
    let next = parse_and_verify(&run(&dp, &Frame::tcp(client, (VIP, 80), ACK).build()));
    assert_eq!((next.dst, next.dport), (first.dst, first.dport));
    assert_eq!(sync.writer().conntrack.keys().count(), 2, "conntrack survived");
}

#[test]
fn pinned_maps_of_another_layout_are_refused() {
    let pins = PinDir::new();
    std::fs::create_dir_all(pins.0.maps()).unwrap();
    let path = pins.0.map("DP_SERVICES");
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&path)
        .args([
            "type",
            "hash",
            "key",
            "8",
            "value",
            "8",
            "entries",
            "16",
            "name",
            "DP_SERVICES",
        ])
        .output()
        .expect("bpftool is needed: run `cargo xtask setup`");
    assert!(
        out.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = Dataplane::load_pinned(None, pins.0.clone())
        .err()
        .expect("a mismatching pinned map was adopted");
    let msg = err.to_string();
    assert!(
        msg.contains("DP_SERVICES") && msg.contains("dataplane cleanup"),
        "{msg}"
    );
}

#[test]
fn cleanup_removes_every_pin() {
    let pins = PinDir::new();
    let (dp, _) = Dataplane::load_pinned(None, pins.0.clone()).unwrap();
    drop(dp);
    assert!(pins.0.map("DP_CONNTRACK").exists());
    // The ABI's shape table describes exactly the maps the object creates.
    pins.0
        .check_maps()
        .expect("dataplane_common::map_shapes disagrees with the eBPF object");
    let removed = pins.0.cleanup().unwrap();
    assert!(removed.iter().any(|r| r == "map DP_CONNTRACK"), "{removed:?}");
    assert!(!pins.0.root.exists(), "{} left behind", pins.0.root.display());
}

/// A conntrack entry of flow `i` (a made-up client port).
fn ct_entry(i: u16) -> (CtKey, CtValue) {
    let key = CtKey {
        saddr: dataplane_common::v4_addr(u32::from(CLIENT).to_be()),
        daddr: dataplane_common::v4_addr(u32::from(VIP).to_be()),
        sport: (40_000 + i).to_be(),
        dport: 80u16.to_be(),
        proto: TCP,
        family: dataplane_common::FAMILY_V4,
        _pad: 0,
    };
    let value = CtValue {
        nat_port: 8080u16.to_be(),
        flags: dataplane_common::CT_F_ORIGINAL,
        service_id: u32::from(i),
        ..Default::default()
    };
    (key, value)
}

/// Map sizes are configuration: maps pinned with one size are adopted with
/// the same size; an agent configured with other sizes migrates them: its
/// new maps hold every entry of the old ones, and once its programs are
/// attached the old maps are gone. A map made too small keeps what fits
/// and counts the rest.
#[test]
fn pinned_maps_of_another_configured_size_are_migrated_with_their_entries() {
    use dataplane::bpf::migrate::OLD_DIR;
    use dataplane_common::map_names;
    let pins = PinDir::new();
    let small = MapSizes {
        conntrack: 64,
        services: 16,
        ..MapSizes::default()
    };
    let (mut dp, _) = Dataplane::load_pinned_with(None, pins.0.clone(), &small).unwrap();
    let mut maps = dp.take_maps().unwrap();
    for i in 0..10 {
        let (k, v) = ct_entry(i);
        maps.conntrack.insert(k, v, 0).unwrap();
    }
    drop((maps, dp));
    pins.0
        .check_maps_with(&small)
        .expect("the maps were not created with the configured sizes");
    let (dp, adopted) = Dataplane::load_pinned_with(None, pins.0.clone(), &small).unwrap();
    assert!(adopted);
    drop(dp);

    // Default sizes: conntrack and the three maps sized by --services-max-entries move.
    let (mut dp, adopted) = Dataplane::load_pinned(None, pins.0.clone()).unwrap();
    assert!(adopted);
    let m = dp.take_migration().expect("maps of another size are migrated");
    let moved: Vec<&str> = m.moves.iter().map(|mv| mv.map).collect();
    for name in [
        map_names::CONNTRACK,
        map_names::SERVICES,
        map_names::NAMES,
        map_names::SERVICE_STATS,
    ] {
        assert!(moved.contains(&name), "{name} not migrated: {moved:?}");
    }
    let ct = m.copied.iter().find(|c| c.map == map_names::CONNTRACK).unwrap();
    assert_eq!((ct.read, ct.kept, ct.lost), (10, 10, 0));
    assert!(
        pins.0.root.join(OLD_DIR).exists(),
        "the old maps wait until the programs are swapped"
    );
    m.finish().unwrap();
    assert!(!pins.0.root.join(OLD_DIR).exists());
    pins.0.check_maps().expect("the pinned maps have the default sizes now");
    let maps = dp.take_maps().unwrap();
    for i in 0..10 {
        let (k, v) = ct_entry(i);
        assert_eq!(maps.conntrack.get(&k, 0).unwrap(), v, "flow {i}");
    }
    drop((maps, dp));

    // Too small: 4 of the 10 entries fit (an LRU map may keep fewer than
    // its capacity: what matters is that every entry is either there or
    // counted).
    let tiny = MapSizes {
        conntrack: 4,
        ..MapSizes::default()
    };
    let (mut dp, _) = Dataplane::load_pinned_with(None, pins.0.clone(), &tiny).unwrap();
    let m = dp.take_migration().expect("a smaller conntrack is a migration too");
    let ct = m.copied.iter().find(|c| c.map == map_names::CONNTRACK).unwrap();
    let maps = dp.take_maps().unwrap();
    let present = (0..10)
        .filter(|i| maps.conntrack.get(&ct_entry(*i).0, 0).is_ok())
        .count();
    assert_eq!((ct.read, ct.kept, ct.lost), (10, present, 10 - present), "{ct:?}");
    assert!(ct.lost >= 6, "{ct:?}");
    // An agent that stops before finishing leaves maps-old/ behind:
    // cleanup removes it with the rest.
    drop((maps, dp, m));
    assert!(pins.0.root.join(OLD_DIR).exists());
    let removed = pins.0.cleanup().unwrap();
    assert_eq!(
        removed.iter().filter(|r| *r == "map DP_CONNTRACK").count(),
        2,
        "{removed:?}"
    );
    assert!(!pins.0.root.exists(), "{removed:?}");
}

/// The map type and flags of the object are part of a pinned map's shape
/// too: aya adopts a pinned map whatever they are, so a release whose
/// object changes them (say, conntrack no longer an LRU, or another LRU
/// flag) would run on the old map. Such maps are migrated with their
/// entries, as maps of another size are; a change between one value per
/// CPU and one in all cannot be copied and is refused, naming the map.
#[test]
fn pinned_maps_of_another_type_or_flags_are_migrated_with_their_entries() {
    use dataplane::bpf::sys;
    use dataplane_common::map_names;
    use std::os::fd::AsFd;
    const LRU_HASH: u32 = 9;
    const HASH: u32 = 1;
    const ARRAY: u32 = 2;
    const NO_PREALLOC: u32 = 1;
    const NO_COMMON_LRU: u32 = 2;
    let pins = PinDir::new();
    let (mut dp, _) = Dataplane::load_pinned(None, pins.0.clone()).unwrap();
    let mut maps = dp.take_maps().unwrap();
    for i in 0..10 {
        let (k, v) = ct_entry(i);
        maps.conntrack.insert(k, v, 0).unwrap();
    }
    drop((maps, dp));
    let info = |name: &str| aya::maps::MapData::from_pin(pins.0.map(name)).unwrap().info().unwrap();
    // What an older release would have pinned: conntrack with per-CPU LRU
    // lists, the affinity map a plain hash map; the same entries in them.
    let replace = |name: &str, map_type: u32, flags: u32, entries: &[(Vec<u8>, Vec<u8>)]| {
        let i = info(name);
        let fd = sys::map_create(map_type, i.key_size(), i.value_size(), i.max_entries(), flags).unwrap();
        for (k, v) in entries {
            sys::map_update_elem_raw(fd.as_fd(), k, v, 0).unwrap();
        }
        std::fs::remove_file(pins.0.map(name)).unwrap();
        sys::obj_pin(fd.as_fd(), &pins.0.map(name)).unwrap();
    };
    let bytes = |x: &[u8]| x.to_vec();
    let ct: Vec<(Vec<u8>, Vec<u8>)> = (0..10)
        .map(|i| {
            let (k, v) = ct_entry(i);
            // SAFETY: plain-data map types, read as their bytes.
            unsafe {
                (
                    bytes(std::slice::from_raw_parts(
                        (&k as *const CtKey).cast(),
                        size_of::<CtKey>(),
                    )),
                    bytes(std::slice::from_raw_parts(
                        (&v as *const CtValue).cast(),
                        size_of::<CtValue>(),
                    )),
                )
            }
        })
        .collect();
    let affinity_entry = {
        let i = info(map_names::AFFINITY);
        (vec![7u8; i.key_size() as usize], vec![9u8; i.value_size() as usize])
    };
    replace(map_names::CONNTRACK, LRU_HASH, NO_COMMON_LRU, &ct);
    replace(
        map_names::AFFINITY,
        HASH,
        NO_PREALLOC,
        std::slice::from_ref(&affinity_entry),
    );
    assert_eq!(info(map_names::CONNTRACK).map_flags(), NO_COMMON_LRU);

    let (mut dp, adopted) = Dataplane::load_pinned(None, pins.0.clone()).unwrap();
    assert!(adopted);
    let m = dp.take_migration().expect("maps of another type or flags are migrated");
    let why = |name: &str| {
        m.moves
            .iter()
            .find(|mv| mv.map == name)
            .unwrap_or_else(|| panic!("{name} not migrated: {:?}", m.moves))
            .why
            .clone()
    };
    assert_eq!(why(map_names::CONNTRACK), "map flags 0x2 -> 0x0");
    assert_eq!(why(map_names::AFFINITY), "hash -> lru_hash map, map flags 0x1 -> 0x0");
    assert_eq!(m.moves.len(), 2, "only those two: {:?}", m.moves);
    let copied = m.copied.iter().find(|c| c.map == map_names::CONNTRACK).unwrap();
    assert_eq!((copied.read, copied.kept, copied.lost), (10, 10, 0));
    m.finish().unwrap();
    // The pinned maps are the object's now, with their entries.
    let ct_info = info(map_names::CONNTRACK);
    assert_eq!((ct_info.map_type().unwrap() as u32, ct_info.map_flags()), (LRU_HASH, 0));
    let aff = info(map_names::AFFINITY);
    assert_eq!((aff.map_type().unwrap() as u32, aff.map_flags()), (LRU_HASH, 0));
    let aff_map = aya::maps::MapData::from_pin(pins.0.map(map_names::AFFINITY)).unwrap();
    let mut value = vec![0u8; affinity_entry.1.len()];
    assert!(sys::map_lookup_elem_raw(aff_map.fd().as_fd(), &affinity_entry.0, &mut value).unwrap());
    assert_eq!(value, affinity_entry.1);
    let maps = dp.take_maps().unwrap();
    for i in 0..10 {
        let (k, v) = ct_entry(i);
        assert_eq!(maps.conntrack.get(&k, 0).unwrap(), v, "flow {i}");
    }
    drop((maps, dp, aff_map));
    // Adopted as they are from now on.
    let (mut dp, _) = Dataplane::load_pinned(None, pins.0.clone()).unwrap();
    assert!(dp.take_migration().is_none());
    drop(dp);

    // One value per CPU against one in all: no copy can do that.
    let reasons = info(map_names::REASON_STATS);
    assert_eq!(reasons.map_type().unwrap() as u32, 6, "DP_REASONS is a per-CPU array");
    replace(map_names::REASON_STATS, ARRAY, 0, &[]);
    let err = match Dataplane::load_pinned(None, pins.0.clone()) {
        Ok(_) => panic!("a per-CPU map pinned as a plain array was adopted"),
        Err(e) => e.to_string(),
    };
    for part in [
        map_names::REASON_STATS,
        "is of type array,",
        "makes it percpu_array,",
        "dataplane cleanup",
    ] {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }
}

/// Socket-level links follow the configured cgroup: a restart with another
/// cgroup moves them (the old one runs nothing of ours any more), a
/// restart without socket load balancing removes them, and without pins
/// they live as long as the loader.
#[test]
fn socket_links_follow_the_configured_cgroup() {
    use dataplane::bpf::cgroup::attached_programs;
    use dataplane_tests::cgroup::TestCgroup;
    let (cg1, cg2) = (TestCgroup::new().unwrap(), TestCgroup::new().unwrap());
    // The eight sock_addr hooks and sock_release.
    let hooks: Vec<&str> = program_names::SOCK
        .iter()
        .map(|(_, hook)| *hook)
        .chain([program_names::SOCK_RELEASE_HOOK])
        .collect();
    let count = |cg: &TestCgroup| -> usize {
        hooks
            .iter()
            .map(|hook| attached_programs(cg.path(), hook).unwrap().len())
            .sum()
    };
    let pins = PinDir::new();
    let (mut dp, _) = Dataplane::load_pinned(None, pins.0.clone()).unwrap();
    let attached = dp.attach_socket_lb(cg1.path()).unwrap();
    assert_eq!(attached.len(), 9);
    assert!(attached.iter().all(|(_, a)| a.pinned && !a.replaced), "{attached:?}");
    drop(dp);
    assert_eq!(count(&cg1), 9, "the pinned links went with the loader");

    let (mut dp, _) = Dataplane::load_pinned(None, pins.0.clone()).unwrap();
    let attached = dp.attach_socket_lb(cg1.path()).unwrap();
    assert!(attached.iter().all(|(_, a)| a.replaced), "{attached:?}");
    assert_eq!(count(&cg1), 9);
    drop(dp);

    let (mut dp, _) = Dataplane::load_pinned(None, pins.0.clone()).unwrap();
    let attached = dp.attach_socket_lb(cg2.path()).unwrap();
    assert!(attached.iter().all(|(_, a)| !a.replaced), "{attached:?}");
    assert_eq!((count(&cg1), count(&cg2)), (0, 9), "the links did not move");
    drop(dp);

    let removed = pins.0.unpin_socket_links().unwrap();
    assert_eq!(removed.len(), 9, "{removed:?}");
    assert_eq!(count(&cg2), 0);

    let mut dp = Dataplane::load(None).unwrap();
    dp.attach_socket_lb(cg1.path()).unwrap();
    assert_eq!(count(&cg1), 9);
    drop(dp);
    assert_eq!(count(&cg1), 0, "unpinned links outlived their loader");
}
