//! Map sizes are configuration: a full conntrack map evicts (LRU) and new
//! flows keep working; a full service map refuses the overflow per frontend
//! and every frontend that fit keeps working.

use std::net::Ipv4Addr;

use dataplane::{bpf::map_sizes::MapSizes, model::Frontend, reconcile::SyncConfig};
use dataplane_common::{Backend, DpConfig, ServiceKey};
use dataplane_tests::{
    packet::{parse_and_verify, Frame, ACK, SYN, TCP},
    prog::{Loaded, Prog},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);

fn small(sizes: MapSizes) -> Loaded {
    Loaded::with_sizes(SyncConfig::default(), DpConfig::defaults(), &sizes)
}

#[test]
fn full_conntrack_evicts_and_new_flows_keep_working() {
    let mut l = small(MapSizes {
        conntrack: 64,
        ..MapSizes::default()
    });
    let vip = Ipv4Addr::new(198, 19, 0, 10);
    let backends = [
        (Ipv4Addr::new(198, 18, 1, 2), 8080),
        (Ipv4Addr::new(198, 18, 2, 2), 8080),
    ];
    l.set_service(vip, 80, TCP, &backends);
    let is_backend = |a: std::net::IpAddr| backends.iter().any(|(b, _)| a == *b);
    // Ten times the map's capacity in new flows: each is translated, and
    // its next packet follows it.
    for port in 0..640u16 {
        let client = (CLIENT, 20_000 + port);
        let syn = l.run(Prog::Tc, &Frame::tcp(client, (vip, 80), SYN).build());
        let first = parse_and_verify(&syn.data);
        assert!(is_backend(first.dst), "flow {port}: SYN went to {}", first.dst);
        let ack = l.run(Prog::Tc, &Frame::tcp(client, (vip, 80), ACK).build());
        let next = parse_and_verify(&ack.data);
        assert_eq!(next.dst, first.dst, "flow {port} moved after its SYN");
    }
    let n = l.conntrack_len();
    assert!(n <= 64, "conntrack holds {n} entries in a 64-entry map");
    // The evictions are visible (metrics, `dataplane stats`): every entry
    // created and no longer present was evicted.
    let s = dataplane::inspect::stats(l.sync.writer()).unwrap();
    assert_eq!(s.conntrack_created, 1280, "two entries per new flow");
    assert_eq!(s.conntrack_entries, n as u64);
    assert_eq!(s.conntrack_evicted, 1280 - n as u64);
}

#[test]
fn full_service_map_refuses_the_overflow_per_frontend_and_keeps_the_rest() {
    let mut l = small(MapSizes {
        services: 4,
        ..MapSizes::default()
    });
    let backend = Backend::new(Ipv4Addr::new(198, 18, 1, 2), 8080);
    for i in 0..6u8 {
        l.desired.frontends.insert(
            ServiceKey::new(Ipv4Addr::new(198, 19, 0, 10 + i), 80, TCP),
            Frontend {
                service: format!("shop/web{i}"),
                port_name: "http".into(),
                backends: vec![backend],
                affinity_timeout_s: None,
                flags: 0,
                source_ranges: Vec::new(),
                also_serving: Vec::new(),
            }
            .into(),
        );
    }
    let report = l.sync.apply(&l.desired);
    assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
    for e in &report.errors {
        let msg = e.to_string();
        assert!(
            msg.contains("shop/web") && msg.contains("service map is full (4 frontends)"),
            "{msg}"
        );
    }
    let programmed = l.sync.programmed().clone();
    assert_eq!(programmed.len(), 4);
    for key in l.desired.frontends.keys() {
        let client = (CLIENT, 30_000);
        let out = l.run(Prog::Tc, &Frame::tcp(client, (key.ip(), 80), SYN).build());
        let p = parse_and_verify(&out.data);
        if programmed.contains_key(key) {
            assert_eq!(p.dst, backend.ip(), "{} fit but is not served", key.ip());
        } else {
            assert_eq!(p.dst, key.ip(), "{} was refused but translated", key.ip());
        }
    }
    // The next sync still refuses exactly the overflow and changes nothing.
    let again = l.sync.apply(&l.desired);
    assert_eq!(again.errors.len(), 2, "{:?}", again.errors);
    assert_eq!(l.sync.programmed().len(), 4);
}
