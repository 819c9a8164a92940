//! The inspection CLI against known map contents: maps pinned in a unique
//! /sys/fs/bpf dir and programmed through the agent's sync path, conntrack
//! entries made by running frames with BPF_PROG_TEST_RUN, then the real
//! `dataplane` binary's `services`, `backends`, `conntrack`, `stats` and
//! `trace` read them (table and JSON).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use dataplane::{
    bpf::loader::{Dataplane, Maps},
    bpf::testrun,
    model::{Desired, Frontend},
    reconcile::Syncer,
};
use dataplane_common::{
    program_names, Backend, DpConfig, ServiceKey, SVC_F_DROP_NO_LOCAL, SVC_F_IN_CLUSTER_VIEW, SVC_F_OTHER_PORTS,
    SVC_F_SOURCE_RANGES,
};
use dataplane_tests::{
    agent::agent_binary,
    netns::{require_root_and_tools, unique_prefix},
    packet::{parse_and_verify, Frame, ACK, SYN, TCP, UDP},
    prog::PinDir,
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);

fn backend(i: u8, port: u16) -> Backend {
    Backend::new(Ipv4Addr::new(198, 18, i, 2), port)
}

/// web:http (TCP, 3 backends, affinity 60 s), web:dns (UDP, 2 backends),
/// empty:http (TCP, no backends, a source range).
fn desired() -> Desired {
    let fe = |service: &str, port_name: &str, backends: Vec<Backend>| Frontend {
        service: service.into(),
        port_name: port_name.into(),
        backends,
        affinity_timeout_s: None,
        flags: 0,
        source_ranges: vec![],
        also_serving: Vec::new(),
    };
    let mut d = Desired::default();
    d.frontends.insert(
        ServiceKey::new(VIP, 80, TCP),
        std::sync::Arc::new(Frontend {
            affinity_timeout_s: Some(60),
            ..fe("shop/web", "http", (1..=3).map(|i| backend(i, 8080)).collect())
        }),
    );
    d.frontends.insert(
        ServiceKey::new(VIP, 53, UDP),
        std::sync::Arc::new(fe("shop/web", "dns", (1..=2).map(|i| backend(i, 5353)).collect())),
    );
    d.frontends.insert(
        ServiceKey::new(EMPTY_VIP, 80, TCP),
        std::sync::Arc::new(Frontend {
            flags: SVC_F_SOURCE_RANGES,
            source_ranges: vec![(Ipv4Addr::new(198, 18, 100, 0).into(), 24)],
            also_serving: Vec::new(),
            ..fe("shop/empty", "http", vec![])
        }),
    );
    d
}

/// The pinned, programmed dataplane of one test.
struct Live {
    dp: Dataplane,
    sync: Syncer<Maps>,
    pins: PinDir,
}

impl Live {
    fn new() -> Live {
        let pins = PinDir::new();
        let (mut dp, _) = Dataplane::load_pinned(None, pins.0.clone()).unwrap_or_else(|e| panic!("{e}"));
        let mut maps = dp.take_maps().unwrap();
        maps.write_config(&DpConfig::defaults()).unwrap();
        let mut sync = Syncer::new(maps);
        let r = sync.apply(&desired());
        assert!(r.errors.is_empty() && r.added == 3, "{r:?}");
        Live { dp, sync, pins }
    }

    fn run(&self, frame: &[u8]) -> testrun::RunResult {
        let fd = self.dp.program_fd(program_names::TC).unwrap();
        testrun::run(fd, frame).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"))
    }

    fn root(&self) -> &Path {
        &self.pins.0.root
    }

    /// Every entry of every map, as text, in a stable order.
    fn dump(&self) -> BTreeMap<&'static str, Vec<String>> {
        let m = self.sync.writer();
        let mut out = BTreeMap::new();
        fn sorted<I: Iterator<Item = String>>(i: I) -> Vec<String> {
            let mut v: Vec<String> = i.collect();
            v.sort();
            v
        }
        out.insert(
            "services",
            sorted(m.services.iter().map(|e| format!("{:?}", e.unwrap()))),
        );
        out.insert(
            "backends",
            sorted(m.backends.iter().map(|e| format!("{:?}", e.unwrap()))),
        );
        out.insert("maglev", sorted(m.maglev.iter().map(|e| format!("{:?}", e.unwrap()))));
        out.insert(
            "conntrack",
            sorted(m.conntrack.iter().map(|e| format!("{:?}", e.unwrap()))),
        );
        out.insert(
            "affinity",
            sorted(m.affinity.iter().map(|e| format!("{:?}", e.unwrap()))),
        );
        out.insert("names", sorted(m.names.iter().map(|e| format!("{:?}", e.unwrap()))));
        out.insert(
            "source_ranges",
            sorted(m.source_ranges.iter().map(|e| {
                let (k, v) = e.unwrap();
                format!("{} {:?} {v}", k.prefix_len(), k.data())
            })),
        );
        out.insert("config", vec![format!("{:?}", m.config.get(&0, 0).unwrap())]);
        out.insert(
            "reasons",
            m.reasons
                .iter()
                .map(|v| format!("{:?}", v.unwrap().iter().collect::<Vec<_>>()))
                .collect(),
        );
        // Only ids in use can move; all of them are dumped anyway.
        out.insert(
            "service_stats",
            m.service_stats
                .iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    let v = v.unwrap();
                    v.iter()
                        .any(|s| *s != Default::default())
                        .then(|| format!("{i} {:?}", v.iter().collect::<Vec<_>>()))
                })
                .collect(),
        );
        out
    }
}

/// Runs `dataplane ARGS --bpffs-root ROOT`; stdout, or panics with stderr.
fn cli(root: &Path, args: &[&str]) -> String {
    let out = Command::new(agent_binary())
        .args(args)
        .arg("--bpffs-root")
        .arg(root)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("running dataplane");
    assert!(
        out.status.success(),
        "dataplane {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    // Shown with --nocapture: what the README's examples come from.
    eprintln!("$ dataplane {}\n{text}", args.join(" "));
    text
}

/// Runs `dataplane CMD --bpffs-root ROOT`, which must fail; its stderr.
fn cli_fails(root: &Path, cmd: &str) -> String {
    let out = Command::new(agent_binary())
        .args([cmd, "--bpffs-root"])
        .arg(root)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("running dataplane");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "dataplane {cmd} succeeded: {err}");
    err
}

/// The element of JSON array `rows` whose `key` is `name`.
fn entry<'a>(rows: &'a Value, key: &str, name: &str) -> &'a Value {
    rows.as_array()
        .unwrap_or_else(|| panic!("not an array: {rows}"))
        .iter()
        .find(|r| r[key] == name)
        .unwrap_or_else(|| panic!("no {key} {name} in {rows}"))
}

fn json(root: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    let s = cli(root, &a);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("dataplane {args:?}: not JSON ({e}): {s}"))
}

/// Whitespace-separated tokens of `line` with their byte ranges.
fn tokens(line: &str) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in line.char_indices().chain([(line.len(), ' ')]) {
        match (c == ' ', start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                out.push((s, i, line[s..i].to_string()));
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// Checks that every cell of the table starts where its header does
/// (left-aligned columns) or ends where it ends (right-aligned numbers),
/// and returns the rows split on whitespace.
fn table(s: &str) -> Vec<Vec<String>> {
    let mut lines = s.lines().take_while(|l| !l.is_empty());
    let header = lines.next().expect("a header line");
    let cols = tokens(header);
    let mut rows = vec![cols.iter().map(|c| c.2.clone()).collect()];
    for l in lines {
        let cells = tokens(l);
        assert_eq!(cells.len(), cols.len(), "{l:?} under {header:?}");
        for (cell, col) in cells.iter().zip(&cols) {
            assert!(
                cell.0 == col.0 || cell.1 == col.1,
                "cell {:?} of {l:?} is aligned with neither end of {:?} in {header:?}",
                cell.2,
                col.2
            );
        }
        rows.push(cells.into_iter().map(|c| c.2).collect());
    }
    rows
}

/// A TCP SYN from the client and the backend's SYN-ACK, a UDP request:
/// returns the TCP backend.
fn traffic(live: &Live) -> Backend {
    let syn = parse_and_verify(&live.run(&Frame::tcp((CLIENT, 41000), (VIP, 80), SYN).build()).data);
    let reply = Frame::tcp((syn.dst, syn.dport), (CLIENT, 41000), SYN | ACK).build();
    let back = parse_and_verify(&live.run(&reply).data);
    assert_eq!((back.src, back.sport), (VIP.into(), 80), "the reply is translated back");
    parse_and_verify(&live.run(&Frame::udp((CLIENT, 41001), (VIP, 53), b"hi").build()).data);
    Backend::new(syn.dst, syn.dport)
}

#[test]
fn services_backends_conntrack_and_stats_show_the_maps() {
    let live = Live::new();
    let tcp_backend = traffic(&live);
    let root = live.root();

    // services, JSON.
    let s = json(root, &["services"]);
    let rows = s.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{s}");
    let by_frontend = |f: &str| entry(&s, "frontend", f);
    let http = by_frontend("198.19.0.10:80/tcp");
    assert_eq!(http["name"], "shop/web:http");
    assert_eq!(http["backends"], 3);
    assert_eq!(http["selection"], "maglev");
    assert_eq!(http["maglev_size"], 1021);
    assert_eq!(http["flags"], serde_json::json!(["affinity=60s"]));
    // One SYN of 40 bytes (IPv4 + TCP, no options).
    assert_eq!((http["packets"].as_u64(), http["bytes"].as_u64()), (Some(1), Some(40)));
    assert_eq!(
        (http["new_flows"].as_u64(), http["no_backend"].as_u64()),
        (Some(1), Some(0))
    );
    let dns = by_frontend("198.19.0.10:53/udp");
    assert_eq!(dns["name"], "shop/web:dns");
    assert_eq!((dns["packets"].as_u64(), dns["bytes"].as_u64()), (Some(1), Some(30)));
    let empty = by_frontend("198.19.0.11:80/tcp");
    assert_eq!(
        (empty["backends"].as_u64(), empty["selection"].as_str()),
        (Some(0), Some("none"))
    );
    assert_eq!(empty["flags"], serde_json::json!(["source-ranges"]));
    assert_eq!(empty["source_ranges"], serde_json::json!(["198.18.100.0/24"]));

    // services, table.
    let t = table(&cli(root, &["services"]));
    assert_eq!(
        t[0],
        [
            "ID",
            "NAME",
            "FRONTEND",
            "BACKENDS",
            "SELECTION",
            "FLAGS",
            "PACKETS",
            "BYTES",
            "NEW_FLOWS",
            "NO_BACKEND"
        ]
    );
    let row = t.iter().find(|r| r[2] == "198.19.0.10:80/tcp").expect("http row");
    assert_eq!(
        row[1..],
        [
            "shop/web:http",
            "198.19.0.10:80/tcp",
            "3",
            "maglev/1021",
            "affinity=60s",
            "1",
            "40",
            "1",
            "0"
        ]
    );
    let row = t.iter().find(|r| r[2] == "198.19.0.11:80/tcp").expect("empty row");
    assert_eq!(row[3..6], ["0", "none", "source-ranges=198.18.100.0/24"]);

    // backends: the current generation's slots, in slot order.
    let b = json(root, &["backends"]);
    let slots: Vec<(String, u64, String)> = b
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["frontend"].as_str().unwrap().to_string(),
                r["slot"].as_u64().unwrap(),
                r["backend"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, u64, String)> = [("198.19.0.10:53/udp", 5353, 2u64), ("198.19.0.10:80/tcp", 8080, 3u64)]
        .iter()
        .flat_map(|(f, port, n)| (1..=*n).map(move |i| (f.to_string(), i - 1, format!("198.18.{i}.2:{port}"))))
        .collect();
    assert_eq!(slots, want, "{b}");
    assert!(b.as_array().unwrap().iter().all(|r| r["remote"] == false));
    let t = table(&cli(root, &["backends"]));
    assert_eq!(t[0], ["ID", "NAME", "FRONTEND", "GEN", "SLOT", "BACKEND", "REMOTE"]);
    assert_eq!(t.len(), 6, "{t:?}");
    assert!(t
        .iter()
        .any(|r| r[1] == "shop/web:http" && r[5] == "198.18.3.2:8080" && r[6] == "local"));

    // conntrack: two entries per flow, the TCP one has seen its reply.
    let c = json(root, &["conntrack"]);
    let entries = c.as_array().unwrap();
    assert_eq!(entries.len(), 4, "{c}");
    let tcp_be = format!("{}:{}", tcp_backend.ip(), tcp_backend.host_port());
    let orig = entries
        .iter()
        .find(|e| e["direction"] == "original" && e["proto"] == "tcp")
        .expect("TCP original entry");
    assert_eq!(orig["src"], "198.18.100.2:41000");
    assert_eq!(orig["dst"], "198.19.0.10:80");
    assert_eq!(orig["nat"], tcp_be.as_str());
    assert_eq!(orig["snat"], Value::Null);
    assert_eq!(orig["flags"], serde_json::json!(["seen-reply"]));
    assert_eq!(orig["service"], "shop/web:http");
    let (age, idle) = (orig["age_s"].as_f64().unwrap(), orig["idle_s"].as_f64().unwrap());
    assert!((0.0..60.0).contains(&age) && idle <= age, "age {age} idle {idle}");
    let reply = entries
        .iter()
        .find(|e| e["direction"] == "reply" && e["proto"] == "tcp")
        .expect("TCP reply entry");
    assert_eq!(
        (reply["src"].as_str(), reply["dst"].as_str()),
        (Some(tcp_be.as_str()), Some("198.18.100.2:41000"))
    );
    assert_eq!(reply["nat"], "198.19.0.10:80");
    let udp = entries
        .iter()
        .find(|e| e["direction"] == "original" && e["proto"] == "udp")
        .expect("UDP original entry");
    assert_eq!(udp["flags"], serde_json::json!([]));
    let t = table(&cli(root, &["conntrack"]));
    assert_eq!(
        t[0],
        ["DIR", "PROTO", "SRC", "DST", "NAT", "SNAT", "FLAGS", "SERVICE", "AGE_S", "IDLE_S"]
    );
    assert_eq!(t.len(), 5);
    assert!(t
        .iter()
        .any(|r| r[0] == "original" && r[2] == "198.18.100.2:41000" && r[4] == tcp_be && r[6] == "seen-reply"));

    // stats.
    let s = json(root, &["stats"]);
    let reason = |name: &str| entry(&s["reasons"], "reason", name).clone();
    assert_eq!(reason("nat_new_flow")["packets"], 2);
    assert_eq!(reason("nat_reply")["packets"], 1);
    assert_eq!(reason("drop_source_range")["drop"], true);
    assert_eq!(reason("nat_reply")["drop"], false);
    assert_eq!(
        (s["conntrack_entries"].as_u64(), s["conntrack_max"].as_u64()),
        (Some(4), Some(262_144))
    );
    let map = |name: &str| entry(&s["maps"], "map", name).clone();
    assert_eq!(map("DP_SERVICES")["entries"], 3);
    assert_eq!(map("DP_BACKENDS")["entries"], 5);
    // Two tables of 1021 entries: 4 chunks each.
    assert_eq!(map("DP_MAGLEV")["entries"], 8);
    assert_eq!(map("DP_AFFINITY")["entries"], 1);
    assert_eq!(map("DP_SRC_RANGES")["entries"], 1);
    assert_eq!(map("DP_NAMES")["entries"], 3);
    assert_eq!(map("DP_SOCK_NAT")["entries"], 0);
    assert_eq!(map("DP_SOCK_NAT")["kind"], "lru_hash");
    assert_eq!(s["maps"].as_array().unwrap().len(), 20);
    assert_eq!(map("DP_VIP_FILTER")["kind"], "array");
    assert_eq!(map("DP_BACKEND_FILTER")["kind"], "array");
    assert_eq!(map("DP_FE_CACHE")["kind"], "array");
    assert_eq!(map("DP_FE_FILTER")["kind"], "array");
    assert_eq!(map("DP_CT_EVENTS")["kind"], "percpu_array");
    // The kernel's accounting of each map's memory: a preallocated LRU at
    // least max_entries keys and values, the Maglev map at least its 8
    // chunks of 512 bytes.
    assert!(map("DP_CONNTRACK")["memory_bytes"].as_u64().unwrap() >= 262_144 * (40 + 64));
    assert!(map("DP_MAGLEV")["memory_bytes"].as_u64().unwrap() >= 8 * 512);
    // Every conntrack event is listed, at 0 here.
    let ct_events = s["conntrack_events"].as_array().unwrap();
    assert_eq!(ct_events.len(), dataplane_common::CtEvent::ALL.len());
    assert!(ct_events.iter().all(|e| e["count"] == 0), "{ct_events:?}");
    // Host routing off: every result listed, at 0.
    assert_eq!(map("DP_ROUTE_EVENTS")["kind"], "percpu_array");
    let routed = s["host_routing"].as_array().unwrap();
    assert_eq!(routed.len(), dataplane_common::RouteEvent::ALL.len());
    assert!(routed.iter().all(|e| e["count"] == 0), "{routed:?}");
    // No socket-level programs here: every socket event is listed, at 0.
    let events = s["socket_lb"].as_array().unwrap();
    assert_eq!(events.len(), dataplane_common::SockEvent::ALL.len());
    assert!(events.iter().all(|e| e["count"] == 0), "{events:?}");
    let text = cli(root, &["stats"]);
    let t = table(&text);
    assert_eq!(t[0], ["REASON", "DROP", "PACKETS"]);
    assert!(t.iter().any(|r| r == &["nat_new_flow", "-", "2"]), "{text}");
    assert!(t.iter().any(|r| r == &["drop_source_range", "drop", "0"]), "{text}");
    assert!(text.contains("conntrack: 4 of 262144 entries"), "{text}");
    let ct_part = text.split("\n\n").nth(2).expect("the conntrack event table");
    assert_eq!(table(ct_part)[0], ["CONNTRACK_EVENT", "COUNT"]);
    assert!(table(ct_part).iter().any(|r| r == &["clash_resolved", "0"]), "{text}");
    let route_part = text.split("\n\n").nth(3).expect("the host routing table");
    assert_eq!(table(route_part)[0], ["HOST_ROUTING", "PACKETS"]);
    assert!(table(route_part).iter().any(|r| r == &["to_stack", "0"]), "{text}");
    let sock_part = text.split("\n\n").nth(4).expect("the socket-level table");
    let t = table(sock_part);
    assert_eq!(t[0], ["SOCKET_LB_EVENT", "COUNT"]);
    assert!(t.iter().any(|r| r == &["connect_translated", "0"]), "{text}");
    let maps_part = text.split("\n\n").nth(5).expect("the map table");
    let t = table(maps_part);
    assert_eq!(t[0], ["MAP", "KIND", "ENTRIES", "MAX_ENTRIES", "USE_%", "KERNEL_KIB"]);
    assert!(
        t.iter().any(|r| r[..4] == ["DP_CONNTRACK", "lru_hash", "4", "262144"]),
        "{text}"
    );
}

#[test]
fn inspecting_without_pinned_state_says_so() {
    require_root_and_tools();
    let root = PathBuf::from("/sys/fs/bpf").join(unique_prefix());
    for cmd in ["services", "backends", "conntrack", "stats"] {
        let err = cli_fails(&root, cmd);
        assert!(
            err.contains(&format!(
                "no agent state under {0}: is the agent running with --bpffs-root {0}?",
                root.display()
            )),
            "{cmd}: {err}"
        );
    }
    assert!(!root.exists(), "inspection created {}", root.display());
}

#[test]
fn trace_predicts_the_backend_and_changes_no_live_map() {
    let live = Live::new();
    let established = traffic(&live);
    let root = live.root();
    let before = live.dump();

    // A new flow: Maglev picks, affinity misses (another client).
    let new_client = Ipv4Addr::new(198, 18, 100, 3);
    let t = json(
        root,
        &[
            "trace",
            "--src",
            "198.18.100.3:42000",
            "--dst",
            "198.19.0.10:80",
            "--proto",
            "tcp",
            "--flags",
            "syn",
        ],
    );
    assert_eq!(t["service"]["name"], "shop/web:http", "{t}");
    assert_eq!(t["conntrack"], "miss");
    assert_eq!(t["affinity"], "miss");
    assert_eq!(t["verdict"], "pass");
    assert_eq!(t["reasons"], serde_json::json!(["nat_new_flow"]));
    let traced = t["backend"].as_str().expect("a backend").to_string();
    assert_eq!(
        t["maglev"]["backend"],
        traced.as_str(),
        "the Maglev step names the chosen backend"
    );
    assert_eq!(t["maglev"]["table_size"], 1021);
    let hash = dataplane_common::flow_hash(
        u32::from_ne_bytes(new_client.octets()),
        u32::from_ne_bytes(VIP.octets()),
        42000u16.to_be(),
        80u16.to_be(),
        TCP,
    );
    assert_eq!(t["maglev"]["hash"], hash);
    assert_eq!(t["maglev"]["position"], hash % 1021);
    assert_eq!(t["output"], format!("tcp 198.18.100.3:42000 -> {traced} flags syn"));

    // The established flow: a conntrack hit keeps its backend.
    let t = json(
        root,
        &[
            "trace",
            "--src",
            "198.18.100.2:41000",
            "--dst",
            "198.19.0.10:80",
            "--flags",
            "ack",
        ],
    );
    assert_eq!(t["conntrack"], "hit", "{t}");
    assert_eq!(t["conntrack_entry"]["direction"], "original");
    assert_eq!(t["reasons"], serde_json::json!(["nat_established"]));
    assert_eq!(
        t["backend"],
        format!("{}:{}", established.ip(), established.host_port())
    );

    // A service without backends: a reject, through XDP too.
    for program in ["tc", "xdp"] {
        let t = json(
            root,
            &[
                "trace",
                "--src",
                "198.18.100.2:41002",
                "--dst",
                "198.19.0.11:80",
                "--program",
                program,
            ],
        );
        assert_eq!(
            (t["verdict"].as_str(), t["backend"].as_str()),
            (Some("reject"), None),
            "{t}"
        );
        assert_eq!(t["reasons"], serde_json::json!(["reject_no_backend"]));
        assert!(t["output"].as_str().unwrap().contains("flags ack,rst"), "{t}");
    }
    // A source outside the service's ranges: dropped, and why.
    let t = json(root, &["trace", "--src", "198.18.7.2:41003", "--dst", "198.19.0.11:80"]);
    assert_eq!(t["verdict"], "drop", "{t}");
    assert_eq!(t["drop_reason"], "drop_source_range");
    // The reply of the established flow.
    let be = format!("{}:{}", established.ip(), established.host_port());
    let t = json(
        root,
        &["trace", "--src", &be, "--dst", "198.18.100.2:41000", "--flags", "ack"],
    );
    assert_eq!(
        (t["service"].clone(), t["reasons"].clone()),
        (Value::Null, serde_json::json!(["nat_reply"])),
        "{t}"
    );
    assert_eq!(
        t["output"],
        format!("tcp 198.19.0.10:80 -> 198.18.100.2:41000 flags ack")
    );

    // The table form tells the same story.
    let text = cli(
        root,
        &["trace", "--src", "198.18.100.3:42000", "--dst", "198.19.0.10:80"],
    );
    assert!(text.contains(&format!("backend    {traced}")), "{text}");
    assert!(text.contains("- conntrack miss"), "{text}");
    assert!(text.contains("Maglev: flow hash"), "{text}");

    assert_eq!(live.dump(), before, "trace changed a live map entry");

    // The real packet gets the backend trace announced.
    let real = parse_and_verify(&live.run(&Frame::tcp((new_client, 42000), (VIP, 80), SYN).build()).data);
    assert_eq!(format!("{}:{}", real.dst, real.dport), traced);
}

/// `trace` follows what the programs do with the newer entries: the
/// in-cluster view of a Local-policy external frontend for a source in the
/// cluster CIDRs (and the frontend itself for others), and the ClusterIP's
/// entry for ports its Service lacks.
#[test]
fn trace_follows_in_cluster_views_and_rejects_ports_a_cluster_ip_lacks() {
    let mut live = Live::new();
    let external = Ipv4Addr::new(198, 19, 5, 5);
    let fe = |backends: Vec<Backend>, flags: u32| Frontend {
        service: "shop/edge".into(),
        port_name: "http".into(),
        backends,
        affinity_timeout_s: None,
        flags,
        source_ranges: vec![],
        also_serving: Vec::new(),
    };
    let mut d = desired();
    let key = ServiceKey::new(external, 80, TCP);
    d.frontends.insert(
        key,
        std::sync::Arc::new(fe(vec![], SVC_F_DROP_NO_LOCAL | SVC_F_IN_CLUSTER_VIEW)),
    );
    d.frontends
        .insert(key.in_cluster(), std::sync::Arc::new(fe(vec![backend(7, 8080)], 0)));
    d.frontends.insert(
        ServiceKey::new(VIP, 0, 0),
        std::sync::Arc::new(Frontend {
            port_name: String::new(),
            ..fe(vec![], SVC_F_OTHER_PORTS)
        }),
    );
    let r = live.sync.apply(&d);
    assert!(r.errors.is_empty(), "{r:?}");
    live.sync
        .writer_mut()
        .write_cluster_cidrs(&[(Ipv4Addr::new(198, 18, 100, 0).into(), 24)])
        .unwrap();
    let root = live.root();
    let before = live.dump();

    let trace = |src: &str, dst: &str| json(root, &["trace", "--src", src, "--dst", dst, "--flags", "syn"]);
    let t = trace("198.18.100.3:42000", "198.19.5.5:80");
    assert_eq!(
        (t["verdict"].as_str(), t["backend"].as_str()),
        (Some("pass"), Some("198.18.7.2:8080")),
        "{t}"
    );
    assert_eq!(t["service"]["frontend"], "198.19.5.5:80/tcp(in-cluster)", "{t}");
    let t = trace("198.18.7.2:42000", "198.19.5.5:80");
    assert_eq!(t["verdict"], "drop", "{t}");
    assert_eq!(t["drop_reason"], "drop_no_local_backend", "{t}");
    let t = trace("198.18.100.3:42001", "198.19.0.10:81");
    assert_eq!(t["verdict"], "reject", "{t}");
    assert_eq!(t["reasons"], serde_json::json!(["reject_no_backend"]), "{t}");
    assert_eq!(live.dump(), before, "trace changed a live map entry");
}

/// The agent in a fresh namespace, no interface, with the Service
/// `shop/web` (one TCP port, two endpoints) and extra `run` arguments.
fn agent_with(extra: &[&str]) -> (dataplane_tests::netns::Netns, dataplane_tests::agent::Agent) {
    use dataplane_tests::{agent::Agent, manifests, netns::Netns};
    require_root_and_tools();
    let ns = Netns::new(format!("{}-insp", unique_prefix())).unwrap();
    let svc = manifests::service("shop", "web", VIP, &[("http", 80, "TCP")]);
    let slice = manifests::slice(
        "shop",
        "web-abcde",
        "web",
        &[("http", 8080, "TCP")],
        &[Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(198, 18, 2, 2)],
    );
    let mut args = vec!["--no-attach"];
    args.extend_from_slice(extra);
    let agent = Agent::start_with(&ns, &[], &[], &[("svc.yaml", &svc), ("slice.yaml", &slice)], &args).unwrap();
    (ns, agent)
}

#[test]
fn inspecting_an_agent_with_other_map_capacities_reads_them() {
    // The capacities come from the agent's --*-max-entries flags, which the
    // CLI is not given: it must read maps of any capacity, not refuse them
    // (nor tell the operator to run `dataplane cleanup`).
    let (_ns, agent) = agent_with(&[
        "--ct-max-entries",
        "65536",
        "--services-max-entries",
        "65536",
        "--backends-max-entries",
        "65536",
    ]);
    let root = agent.pins.as_path();
    let s = json(root, &["services"]);
    // The port and the ClusterIP's entry for the ports it lacks.
    assert_eq!(entry(&s, "frontend", "198.19.0.10:80/tcp")["backends"], 2);
    let b = json(root, &["backends"]);
    assert_eq!(b.as_array().unwrap().len(), 2, "{b}");
    json(root, &["conntrack"]);
    let st = json(root, &["stats"]);
    assert_eq!(st["conntrack_max"].as_u64(), Some(65_536), "{st}");
    let capacity = |name: &str| entry(&st["maps"], "map", name)["max_entries"].as_u64();
    assert_eq!(capacity("DP_SERVICES"), Some(65_536));
    assert_eq!(capacity("DP_BACKENDS"), Some(65_536));
}

#[test]
fn inspecting_the_pins_of_an_older_agent_names_the_map_it_lacks() {
    let (_ns, agent) = agent_with(&[]);
    // An older agent pinned no frontend filter (0.1.0 had none).
    let pin = agent.pins.join("maps").join("DP_FE_FILTER");
    std::fs::remove_file(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    for cmd in ["services", "backends", "conntrack", "stats"] {
        let err = cli_fails(&agent.pins, cmd);
        assert!(
            err.contains(&format!(
                "the agent state under {} has no map DP_FE_FILTER: it was pinned by an agent older than this binary",
                agent.pins.display()
            )),
            "{cmd}: {err}"
        );
    }
}
