//! The backend-selection contract, checked against an independent
//! implementation (`dataplane_tests::oracle`, written from the Maglev paper
//! and the documented hash definitions) and against fixed vectors.
//!
//! Every node computes its Maglev tables itself, and during a rolling
//! update two releases run side by side: if the same Service and endpoints
//! gave another table, or a flow another hash, on one node than on
//! another, a flow whose packets reach two nodes (ECMP towards a
//! LoadBalancer, a node replaced mid-connection) would be sent to two
//! backends. The fixed vectors below must therefore never change; a change
//! here is a breaking change of the datapath's contract.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use dataplane::model::maglev;
use dataplane_common::{flow_hash, Backend};
use dataplane_tests::oracle;

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn backend(&mut self) -> Backend {
        let port = 1 + (self.next() % 65535) as u16;
        if self.next().is_multiple_of(4) {
            let a = Ipv6Addr::new(
                0x2001,
                0xdb8,
                0,
                0,
                0,
                0,
                (self.next() >> 16) as u16,
                self.next() as u16,
            );
            Backend::new(a, port)
        } else {
            let x = self.next() as u16;
            Backend::new(Ipv4Addr::new(198, 18, (x >> 8) as u8, x as u8), port)
        }
    }
}

/// Fails, saying where, unless the agent's table for `backends` equals
/// the paper's.
fn same_table(backends: &[Backend], size: u32) {
    let (agent, paper) = (maglev::table(backends, size), oracle::maglev(backends, size));
    if agent != paper {
        let differ: Vec<usize> = (0..paper.len()).filter(|i| agent.get(*i) != paper.get(*i)).collect();
        panic!(
            "{} backends, table size {size}: the agent's table ({} entries) differs from the paper's at {} positions, \
             first {:?}; backends: {backends:?}",
            backends.len(),
            agent.len(),
            differ.len(),
            &differ[..differ.len().min(8)]
        );
    }
}

/// Every table size the agent accepts, written out here rather than taken
/// from the agent.
const ALL_SIZES: [u32; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];

#[test]
fn the_agents_maglev_tables_equal_the_papers_algorithm() {
    let mut rng = Rng(0x0dd_ba11);
    let mut compared = 0;
    for size in ALL_SIZES {
        // Fewer sets for the large tables: the oracle builds every
        // backend's whole permutation (M x N entries).
        let sets = if size <= 4093 { 40 } else { 8 };
        for _ in 0..sets {
            let n = 1 + (rng.next() % 60) as usize;
            let mut backends: Vec<Backend> = (0..n).map(|_| rng.backend()).collect();
            backends.sort();
            backends.dedup();
            // The agent is given them in any order: not sorted.
            backends.reverse();
            same_table(&backends, size);
            compared += 1;
        }
    }
    // Edge cases: one backend; one address on many ports; more backends
    // than positions (a Service may have up to 1024 endpoints, the
    // smallest table has 251 positions); many backends in a mid-size table.
    let one_address: Vec<Backend> = (0..20).map(|p| v4([198, 18, 7, 7], 8000 + p)).collect();
    let many = |n: usize, rng: &mut Rng| -> Vec<Backend> {
        let mut b: Vec<Backend> = (0..n).map(|_| rng.backend()).collect();
        b.sort();
        b.dedup();
        b
    };
    let edge: [(Vec<Backend>, u32); 5] = [
        (vec![v4([198, 18, 0, 1], 1)], 251),
        (vec![v4([198, 18, 0, 1], 1)], 65521),
        (one_address, 1021),
        (many(300, &mut rng), 251),
        (many(1000, &mut rng), 4093),
    ];
    for (backends, size) in &edge {
        same_table(backends, *size);
        compared += 1;
    }
    eprintln!("{compared} backend sets compared over {} table sizes", ALL_SIZES.len());
}

#[test]
fn the_agents_flow_hash_equals_its_documented_definition() {
    let mut rng = Rng(0xfeed_f00d);
    for _ in 0..100_000 {
        let (s, d, sp, dp) = (
            rng.next() as u32,
            rng.next() as u32,
            rng.next() as u16,
            rng.next() as u16,
        );
        let proto = [6u8, 17, 132][(rng.next() % 3) as usize];
        assert_eq!(flow_hash(s, d, sp, dp, proto), oracle::flow_hash(s, d, sp, dp, proto));
    }
}

/// (name, backends, table size, fingerprint, first 16 entries).
type Vector<'a> = (&'a str, &'a [Backend], u32, u32, [u16; 16]);

fn v4(a: [u8; 4], port: u16) -> Backend {
    Backend::new(Ipv4Addr::from(a), port)
}

/// (backends, table size) -> (fingerprint of the whole table, its first 16
/// entries): computed once by `oracle::maglev` and never to change.
#[test]
fn maglev_tables_match_fixed_vectors() {
    let three = vec![
        v4([198, 18, 1, 2], 8080),
        v4([198, 18, 2, 2], 8080),
        v4([198, 18, 3, 2], 8080),
    ];
    let mut reversed = three.clone();
    reversed.reverse();
    let ten: Vec<Backend> = (1..=10).map(|i| v4([198, 18, i, 2], 80)).collect();
    let six: Vec<Backend> = (1..=6)
        .map(|i| Backend::new(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x18, i, 0, 0, 0, 2)), 8080))
        .collect();
    let hundred: Vec<Backend> = (0..100u16)
        .map(|i| v4([198, 18, (i / 50 + 1) as u8, (i % 50 + 2) as u8], 8080 + i % 3))
        .collect();
    let ports: Vec<Backend> = (9000..9008).map(|p| v4([198, 18, 7, 7], p)).collect();
    let cases: [Vector; 7] = [
        ("three", &three, 251, FP[0], HEAD[0]),
        ("three reversed", &reversed, 251, FP[1], HEAD[1]),
        ("three", &three, 1021, FP[2], HEAD[2]),
        ("ten", &ten, 1021, FP[3], HEAD[3]),
        ("six ipv6", &six, 4093, FP[4], HEAD[4]),
        ("hundred", &hundred, 65521, FP[5], HEAD[5]),
        ("one address, eight ports", &ports, 16381, FP[6], HEAD[6]),
    ];
    // The order the endpoints are listed in changes nothing: position by
    // position, the same backend.
    let by_backend = |b: &[Backend]| -> Vec<Backend> { maglev::table(b, 251).iter().map(|i| b[*i as usize]).collect() };
    assert_eq!(by_backend(&three), by_backend(&reversed));
    for (name, backends, size, fp, head) in cases {
        for (who, table) in [
            ("oracle", oracle::maglev(backends, size)),
            ("agent", maglev::table(backends, size)),
        ] {
            println!(
                "{name} {size} {who}: {:#010x} {:?}",
                oracle::fingerprint(&table),
                &table[..16]
            );
            assert_eq!(oracle::fingerprint(&table), fp, "{who}: {name}, size {size}");
            assert_eq!(table[..16], head, "{who}: {name}, size {size}");
        }
    }
}

/// (source, destination, ports, protocol) -> flow hash, fixed.
#[test]
fn flow_hashes_match_fixed_vectors() {
    let cases: [(IpAddr, u16, IpAddr, u16, u8, u32); 4] = [
        (
            Ipv4Addr::new(198, 18, 100, 2).into(),
            40_000,
            Ipv4Addr::new(198, 19, 0, 10).into(),
            80,
            6,
            FH[0],
        ),
        (
            Ipv4Addr::new(198, 18, 100, 2).into(),
            40_001,
            Ipv4Addr::new(198, 19, 0, 10).into(),
            80,
            6,
            FH[1],
        ),
        (
            Ipv4Addr::new(198, 18, 100, 2).into(),
            5353,
            Ipv4Addr::new(198, 19, 0, 10).into(),
            53,
            17,
            FH[2],
        ),
        (
            "2001:db8:100::2".parse().unwrap(),
            40_000,
            "2001:db8:19::30".parse().unwrap(),
            50051,
            6,
            FH[3],
        ),
    ];
    for (s, sp, d, dp, proto, want) in cases {
        let oracle_h = oracle::flow_hash(oracle::fold(s), oracle::fold(d), sp.to_be(), dp.to_be(), proto);
        let agent_h = flow_hash(
            dataplane_common::fold_addr(&dataplane_common::addr_of(s).0),
            dataplane_common::fold_addr(&dataplane_common::addr_of(d).0),
            sp.to_be(),
            dp.to_be(),
            proto,
        );
        println!("{s}:{sp} -> {d}:{dp}/{proto}: oracle {oracle_h:#010x} agent {agent_h:#010x}");
        assert_eq!(oracle_h, want, "oracle: {s}:{sp} -> {d}:{dp}/{proto}");
        assert_eq!(agent_h, want, "agent: {s}:{sp} -> {d}:{dp}/{proto}");
    }
}

/// Raw inputs (as the datapath passes them: folded addresses, ports as
/// stored) -> flow hash, fixed; the whole range of every field.
#[test]
fn flow_hashes_of_raw_inputs_match_fixed_vectors() {
    // (saddr, daddr, sport, dport, proto, hash): computed once like FH.
    // The fields overlap in the 64-bit word (the destination's low bits
    // with the protocol, the ports with the addresses), so (0, 1, 0, 0, 0)
    // and (0, 0, 0, 0, 1) collide: that too is part of the contract.
    let cases: [(u32, u32, u16, u16, u8, u32); 8] = [
        (0, 0, 0, 0, 0, 0x0000_0000),
        (u32::MAX, u32::MAX, u16::MAX, u16::MAX, u8::MAX, 0x946c_839b),
        (1, 0, 0, 0, 0, 0x7442_383e),
        (0, 1, 0, 0, 0, 0xf87d_8879),
        (0, 0, 1, 0, 0, 0xa50f_59e7),
        (0, 0, 0, 1, 0, 0xce40_5c9a),
        (0, 0, 0, 0, 1, 0xf87d_8879),
        (0x1234_5678, 0x9abc_def0, 0x1357, 0x2468, 17, 0xf66c_b216),
    ];
    for (s, d, sp, dp, proto, want) in cases {
        assert_eq!(
            oracle::flow_hash(s, d, sp, dp, proto),
            want,
            "oracle: {s:#x} {d:#x} {sp} {dp} {proto}"
        );
        assert_eq!(
            flow_hash(s, d, sp, dp, proto),
            want,
            "agent: {s:#x} {d:#x} {sp} {dp} {proto}"
        );
    }
}

// Computed once (2026-12-05) by `oracle::maglev` and `oracle::flow_hash`,
// and checked then against a third, throw-away implementation of the same
// definitions. DO NOT UPDATE THESE to make a test pass: a different table
// or hash sends flows to other backends on nodes running another release,
// which breaks connections during every rolling update (and between nodes
// of one cluster). A deliberate change of the contract needs a migration
// plan and a changelog entry, not new numbers here.
const FP: [u32; 7] = [
    0xaf40037f, 0x5b2f821d, 0x461d177d, 0x60346165, 0xf0ff12ed, 0xfaf08e79, 0x800559f1,
];
const HEAD: [[u16; 16]; 7] = [
    [2, 2, 1, 1, 2, 2, 0, 0, 2, 2, 1, 1, 0, 0, 2, 1],
    [0, 0, 1, 1, 0, 0, 2, 2, 0, 0, 1, 1, 2, 2, 0, 1],
    [0, 1, 2, 2, 1, 2, 2, 0, 2, 2, 2, 2, 1, 1, 2, 2],
    [6, 3, 1, 3, 7, 4, 2, 8, 3, 5, 8, 7, 0, 2, 7, 3],
    [3, 4, 0, 5, 2, 2, 0, 4, 2, 1, 1, 3, 2, 1, 1, 3],
    [94, 42, 78, 74, 11, 12, 92, 49, 27, 15, 84, 0, 14, 85, 33, 16],
    [7, 1, 2, 4, 7, 2, 0, 4, 7, 3, 6, 2, 7, 6, 6, 5],
];
const FH: [u32; 4] = [0xd40a6e94, 0x0fb9ea64, 0x0a82457d, 0x7d07c8a8];
