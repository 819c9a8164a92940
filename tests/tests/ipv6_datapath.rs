//! IPv6 through the loaded programs with BPF_PROG_TEST_RUN: DNAT and reverse
//! NAT with the L4 checksums recomputed here, extension headers, rejects
//! (TCP RST, ICMPv6 port unreachable), ICMPv6 errors about translated flows,
//! SNAT, source ranges, and IPv4/IPv6 frontends of one Service side by side.
//! Needs root (BPF).

use std::net::{IpAddr, Ipv6Addr};

use dataplane::model::Frontend;
use dataplane_common::{
    addr_of, Backend, DpConfig, Reason, ServiceKey, BACKEND_F_REMOTE, SVC_F_EXTERNAL, SVC_F_SOURCE_RANGES,
};
use dataplane_tests::{
    packet::{icmp_error, octets, parse_and_verify, parse_icmp, tcp_fields, Frame, ACK, FIN, RST, SYN, TCP, UDP},
    prog::{expected, Loaded, Prog},
};

fn v6(s: &str) -> IpAddr {
    s.parse::<Ipv6Addr>().unwrap().into()
}

fn vip() -> IpAddr {
    v6("fd00:198:19::10")
}

fn client() -> IpAddr {
    v6("2001:db8:100::2")
}

fn b(i: u8) -> IpAddr {
    v6(&format!("2001:db8:18:{i}::2"))
}

fn loaded() -> Loaded {
    let mut l = Loaded::new();
    l.set_service(vip(), 80, TCP, &[(b(1), 8080), (b(2), 8080), (b(3), 8081)]);
    l.set_service(vip(), 53, UDP, &[(b(1), 5353), (b(2), 5353)]);
    l
}

#[test]
fn tcp_and_udp_to_an_ipv6_vip_are_dnated_and_replies_get_the_vip_back() {
    for prog in Prog::BOTH {
        let l = loaded();
        for (port, proto, cport) in [(80, TCP, 40000), (53, UDP, 50000)] {
            let c = (client(), cport);
            let mut f = if proto == TCP {
                Frame::tcp(c, (vip(), port), SYN)
            } else {
                Frame::udp(c, (vip(), port), b"query")
            };
            f.payload = b"some payload".to_vec();
            let frame = f.build();
            let out = l.run(prog, &frame);
            assert_eq!(out.retval, prog.pass(), "{prog:?}");
            assert_eq!(out.data.len(), frame.len());
            // parse_and_verify recomputes the L4 checksum over the IPv6
            // pseudo-header: the rewrite must have updated it.
            let p = parse_and_verify(&out.data);
            let want = expected(&l.backends(vip(), port, proto), c, (vip(), port), proto);
            assert_eq!((p.src, p.sport), c, "{prog:?}: source untouched");
            assert_eq!((p.dst, p.dport), (want.ip(), want.host_port()), "{prog:?}");
            // The same choice by the independent implementation.
            let oracle =
                dataplane_tests::oracle::expected(&l.backends(vip(), port, proto), 1021, c, (vip(), port), proto);
            assert_eq!((p.dst, p.dport), (oracle.ip(), oracle.host_port()), "{prog:?}");
            assert_eq!(&out.data[out.data.len() - 12..], b"some payload");

            let reply = if proto == TCP {
                Frame::tcp((p.dst, p.dport), c, SYN | ACK)
            } else {
                Frame::udp((p.dst, p.dport), c, b"answer")
            };
            let back = parse_and_verify(&l.run(prog, &reply.build()).data);
            assert_eq!((back.src, back.sport), (vip(), port), "{prog:?}: reply from the VIP");
            assert_eq!((back.dst, back.dport), c);
        }
        assert_eq!(l.reason(Reason::NatNewFlow), 2, "{prog:?}");
        assert_eq!(l.reason(Reason::NatReply), 2, "{prog:?}");
        assert_eq!(l.conntrack_len(), 4, "{prog:?}");
    }
}

#[test]
fn established_ipv6_flows_keep_their_backend() {
    for prog in Prog::BOTH {
        let mut l = loaded();
        let c = (client(), 40100);
        let first = parse_and_verify(&l.run(prog, &Frame::tcp(c, (vip(), 80), SYN).build()).data);
        // Take every other backend away: the flow stays where it is.
        let keep: Vec<(IpAddr, u16)> = l
            .backends(vip(), 80, TCP)
            .iter()
            .filter(|x| x.ip() != first.dst)
            .map(|x| (x.ip(), x.host_port()))
            .collect();
        l.set_service(vip(), 80, TCP, &keep);
        let again = parse_and_verify(&l.run(prog, &Frame::tcp(c, (vip(), 80), ACK).build()).data);
        assert_eq!((again.dst, again.dport), (first.dst, first.dport), "{prog:?}");
        assert_eq!(l.reason(Reason::NatEstablished), 1, "{prog:?}");
    }
}

/// New IPv6 flows reach fixed backends, through both programs: computed
/// once (2026-12-05) from the Maglev paper and the documented flow hash
/// (addresses folded by xoring their four words), default table size.
/// DO NOT UPDATE THEM to make a test pass: another backend for the same
/// flow on a node of another release breaks connections during a rolling
/// update.
#[test]
fn ipv6_new_flows_reach_the_backends_of_fixed_vectors() {
    let tcp: [(u16, u8, u16); 8] = [
        (40000, 1, 8080),
        (40001, 1, 8080),
        (40002, 2, 8080),
        (40003, 3, 8081),
        (40004, 3, 8081),
        (40005, 3, 8081),
        (40006, 1, 8080),
        (40007, 1, 8080),
    ];
    let udp: [(u16, u8, u16); 4] = [(50000, 1, 5353), (50001, 2, 5353), (50002, 1, 5353), (50003, 1, 5353)];
    for prog in Prog::BOTH {
        let l = loaded();
        for (proto, vport, vectors) in [(TCP, 80, &tcp[..]), (UDP, 53, &udp[..])] {
            for (cport, backend, port) in vectors {
                let c = (client(), *cport);
                let frame = if proto == TCP {
                    Frame::tcp(c, (vip(), vport), SYN).build()
                } else {
                    Frame::udp(c, (vip(), vport), b"q").build()
                };
                let p = parse_and_verify(&l.run(prog, &frame).data);
                assert_eq!(
                    (p.dst, p.dport),
                    (b(*backend), *port),
                    "{prog:?}: [{}]:{cport} -> [{}]:{vport}/{proto}",
                    client(),
                    vip()
                );
            }
        }
        assert_eq!(l.reason(Reason::NatNewFlow), 12, "{prog:?}");
    }
}

/// Hop-by-hop and destination options (and a routing header with no
/// segments left) are walked over; the translation keeps them and the
/// checksums valid. A routing header with segments left and a fragment
/// header make the packet pass untouched.
#[test]
fn extension_headers_are_walked_over_or_passed() {
    let padn = |n: usize| {
        let mut v = vec![1u8, (n - 2) as u8];
        v.resize(n, 0);
        v
    };
    for prog in Prog::BOTH {
        let l = loaded();
        let c = (client(), 40200);
        let mut f = Frame::tcp(c, (vip(), 80), SYN);
        // Hop-by-hop (6 bytes of PadN), destination options (14 bytes),
        // routing type 0 with 0 segments left.
        f.ext_headers = vec![(0, padn(6)), (60, padn(14)), (43, vec![0, 0, 0, 0, 0, 0])];
        f.payload = b"x".to_vec();
        let frame = f.build();
        let out = l.run(prog, &frame);
        let p = parse_and_verify(&out.data);
        let want = expected(&l.backends(vip(), 80, TCP), c, (vip(), 80), TCP);
        assert_eq!((p.dst, p.dport), (want.ip(), want.host_port()), "{prog:?}");
        assert_eq!(
            &out.data[54..54 + 32],
            &frame[54..54 + 32],
            "{prog:?}: extension headers unchanged"
        );

        // Segments left: the destination is not final. Untouched.
        let mut f = Frame::tcp((client(), 40201), (vip(), 80), SYN);
        f.ext_headers = vec![(43, vec![0, 1, 0, 0, 0, 0])];
        let frame = f.build();
        assert_eq!(l.run(prog, &frame).data, frame, "{prog:?}");
        // A fragment header (an atomic fragment, even): untouched.
        let mut f = Frame::tcp((client(), 40202), (vip(), 80), SYN);
        f.ext_headers = vec![(44, vec![0, 0, 0, 0, 0, 1])];
        let frame = f.build();
        assert_eq!(l.run(prog, &frame).data, frame, "{prog:?}");
        assert_eq!(l.reason(Reason::PassExtHeaders), 1, "{prog:?}");
        assert_eq!(l.reason(Reason::PassFragment), 1, "{prog:?}");
        assert_eq!(l.reason(Reason::NatNewFlow), 1, "{prog:?}");
    }
}

#[test]
fn ipv6_service_without_backends_answers_rst_and_icmpv6_port_unreachable() {
    for prog in Prog::BOTH {
        let mut l = Loaded::new();
        l.set_service::<IpAddr>(vip(), 80, TCP, &[]);
        l.set_service::<IpAddr>(vip(), 53, UDP, &[]);
        let mut syn = Frame::tcp((client(), 40300), (vip(), 80), SYN);
        syn.ext_headers = vec![(0, vec![1, 4, 0, 0, 0, 0])];
        let input = syn.build();
        let out = l.run(prog, &input);
        assert_eq!(out.retval, prog.bounce(), "{prog:?}");
        assert_eq!(out.data.len(), 14 + 40 + 20, "{prog:?}: a fresh RST");
        assert_eq!(&out.data[0..6], &input[6..12], "{prog:?}: back to the sender");
        let p = parse_and_verify(&out.data);
        assert_eq!(
            (p.src, p.sport, p.dst, p.dport),
            (vip(), 80, client(), 40300),
            "{prog:?}"
        );
        let (flags, seq, ack) = tcp_fields(&out.data);
        assert_eq!((flags, seq, ack), (RST | ACK, 0, 1001), "{prog:?}");

        let input = Frame::udp((client(), 50300), (vip(), 53), b"a query longer than the quote").build();
        let out = l.run(prog, &input);
        assert_eq!(out.retval, prog.bounce(), "{prog:?}");
        assert_eq!(out.data.len(), 14 + 40 + 8 + 48, "{prog:?}");
        let icmp = parse_icmp(&out.data);
        assert_eq!((icmp.src, icmp.dst), (vip(), client()), "{prog:?}");
        assert_eq!((icmp.icmp_type, icmp.code), (1, 4), "{prog:?}: ICMPv6 port unreachable");
        assert_eq!(icmp.quoted, &input[14..14 + 48], "{prog:?}: the IPv6 + UDP headers");
        assert_eq!(l.reason(Reason::RejectNoBackend), 2, "{prog:?}");
    }
}

/// A router's "packet too big" about a translated IPv6 flow quotes
/// client -> backend; the client must get one quoting client -> VIP, with
/// the ICMPv6 checksum (pseudo-header included) valid.
#[test]
fn icmpv6_packet_too_big_about_a_translated_flow_quotes_the_vip() {
    for prog in Prog::BOTH {
        let l = loaded();
        let c = (client(), 40900);
        let mut f = Frame::tcp(c, (vip(), 80), ACK);
        f.payload = vec![7; 64];
        let fwd = l.run(prog, &f.build()).data;
        let seen = parse_and_verify(&fwd);
        assert_ne!(seen.dst, vip());
        let router = v6("2001:db8:9::1");
        let quoted = &fwd[14..14 + 40 + 20 + 16];
        let err = icmp_error(router, client(), 2, 0, 1280, quoted);
        let out = l.run(prog, &err);
        assert_eq!(out.retval, prog.pass(), "{prog:?}");
        let icmp = parse_icmp(&out.data);
        assert_eq!((icmp.src, icmp.dst, icmp.icmp_type), (router, client(), 2), "{prog:?}");
        assert_eq!(
            &out.data[14 + 40 + 4..14 + 40 + 8],
            &1280u32.to_be_bytes(),
            "{prog:?}: the MTU"
        );
        let q = &icmp.quoted;
        assert_eq!(&q[8..24], &octets(client())[..], "{prog:?}");
        assert_eq!(
            &q[24..40],
            &octets(vip())[..],
            "{prog:?}: quoted destination is the VIP"
        );
        assert_eq!(u16::from_be_bytes([q[40], q[41]]), 40900);
        assert_eq!(u16::from_be_bytes([q[42], q[43]]), 80, "{prog:?}");
        assert_eq!(l.reason(Reason::NatIcmpError), 1, "{prog:?}");
    }
}

/// The backend's own "port unreachable" for a UDP flow comes from the VIP
/// and quotes exactly the datagram the client sent (UDP checksum included).
#[test]
fn icmpv6_port_unreachable_from_the_backend_comes_from_the_vip() {
    for prog in Prog::BOTH {
        let l = loaded();
        let sent = Frame::udp((client(), 50900), (vip(), 53), b"query").build();
        let fwd = l.run(prog, &sent).data;
        let backend = parse_and_verify(&fwd);
        let err = icmp_error(backend.dst, client(), 1, 4, 0, &fwd[14..]);
        let out = l.run(prog, &err);
        let icmp = parse_icmp(&out.data);
        assert_eq!((icmp.src, icmp.dst), (vip(), client()), "{prog:?}");
        assert_eq!(&icmp.quoted[..], &sent[14..], "{prog:?}: the client's own datagram");
    }
    // About a flow nobody tracks: untouched.
    let l = loaded();
    let quoted = Frame::udp((client(), 51000), (b(1), 5353), b"q").build();
    let err = icmp_error(b(1), client(), 1, 4, 0, &quoted[14..]);
    for prog in Prog::BOTH {
        assert_eq!(l.run(prog, &err).data, err, "{prog:?}");
    }
}

/// An external IPv6 frontend with a remote backend: the source becomes the
/// node's IPv6 address, and both translations are undone on the reply.
#[test]
fn remote_ipv6_backend_of_an_external_frontend_is_snated_and_reversed() {
    let node = v6("2001:db8:50::1");
    let outside = v6("2001:db8:200::5");
    let remote = v6("2001:db8:18:2::2");
    let mut remote_backend = Backend::new(remote, 8443);
    remote_backend.flags |= BACKEND_F_REMOTE;
    for prog in Prog::BOTH {
        let mut l = Loaded::with_configs(
            Default::default(),
            DpConfig {
                snat_addr6: addr_of(node).0,
                ..DpConfig::defaults()
            },
        );
        l.set_frontend(
            ServiceKey::new(node, 30443, TCP),
            Frontend {
                service: "test/np".into(),
                port_name: String::new(),
                backends: vec![remote_backend],
                affinity_timeout_s: None,
                flags: SVC_F_EXTERNAL,
                source_ranges: vec![],
                also_serving: Vec::new(),
            },
        );
        let c = (outside, 40700);
        let out = parse_and_verify(&l.run(prog, &Frame::tcp(c, (node, 30443), SYN).build()).data);
        assert_eq!((out.dst, out.dport), (remote, 8443), "{prog:?}");
        assert_eq!(out.src, node, "{prog:?}: SNAT to the node's IPv6 address");
        let back = parse_and_verify(
            &l.run(prog, &Frame::tcp((remote, 8443), (node, out.sport), SYN | ACK).build())
                .data,
        );
        assert_eq!(
            (back.src, back.sport, back.dst, back.dport),
            (node, 30443, c.0, c.1),
            "{prog:?}"
        );
        let fin = parse_and_verify(&l.run(prog, &Frame::tcp(c, (node, 30443), FIN | ACK).build()).data);
        assert_eq!((fin.src, fin.sport), (node, out.sport), "{prog:?}: same SNAT port");
    }
}

#[test]
fn ipv6_source_ranges_admit_only_listed_sources() {
    let lb = v6("fd00:198:19::77");
    for prog in Prog::BOTH {
        let mut l = Loaded::new();
        l.set_frontend(
            ServiceKey::new(lb, 443, TCP),
            Frontend {
                service: "test/lb".into(),
                port_name: String::new(),
                backends: vec![Backend::new(b(1), 8443)],
                affinity_timeout_s: None,
                flags: SVC_F_SOURCE_RANGES,
                source_ranges: vec![(v6("2001:db8:200::"), 48), (v6("2001:db8:77::7"), 128)],
                also_serving: Vec::new(),
            },
        );
        for (src, admitted) in [
            (v6("2001:db8:200:1::5"), true),
            (v6("2001:db8:77::7"), true),
            (v6("2001:db8:77::8"), false),
            (v6("2001:db8:201::5"), false),
        ] {
            let out = l.run(prog, &Frame::tcp((src, 41000), (lb, 443), SYN).build());
            if admitted {
                assert_eq!(parse_and_verify(&out.data).dst, b(1), "{prog:?} {src}");
            } else {
                assert_eq!(out.retval, prog.drop_code(), "{prog:?} {src}");
            }
        }
        assert_eq!(l.reason(Reason::DropSourceRange), 2, "{prog:?}");
    }
}

/// One Service, two families: the IPv4 VIP only ever reaches IPv4
/// backends, the IPv6 VIP only IPv6 ones, and an IPv4 key that looks like
/// the start of the IPv6 VIP finds nothing.
#[test]
fn ipv4_and_ipv6_frontends_of_one_service_keep_to_their_family() {
    let vip4: IpAddr = "198.19.0.10".parse().unwrap();
    let b4: IpAddr = "198.18.1.2".parse().unwrap();
    for prog in Prog::BOTH {
        let mut l = Loaded::new();
        l.set_service(vip4, 80, TCP, &[(b4, 8080)]);
        l.set_service(vip(), 80, TCP, &[(b(1), 8080)]);
        for port in 42000..42020u16 {
            let p4 = parse_and_verify(
                &l.run(
                    prog,
                    &Frame::tcp(("198.18.100.2".parse::<IpAddr>().unwrap(), port), (vip4, 80), SYN).build(),
                )
                .data,
            );
            assert_eq!(p4.dst, b4, "{prog:?}");
            let p6 = parse_and_verify(
                &l.run(prog, &Frame::tcp((client(), port), (vip(), 80), SYN).build())
                    .data,
            );
            assert_eq!(p6.dst, b(1), "{prog:?}");
        }
        // fd00:198:19::10's first 4 bytes as an IPv4 address: no Service.
        let lookalike = IpAddr::from([0xfd, 0x00, 0x01, 0x98]);
        let f = Frame::tcp(("198.18.100.2".parse::<IpAddr>().unwrap(), 1), (lookalike, 80), SYN).build();
        assert_eq!(l.run(prog, &f).data, f, "{prog:?}");
    }
}

/// Every address rewrite of TC keeps `skb->csum` right for a
/// `CHECKSUM_COMPLETE` skb (a NIC's sum over the whole packet): DNAT, its
/// reply, and SNAT with its reply, in both families, on the kernel's own
/// path (`BPF_F_IPV6`, 6.16+) and on the path of older kernels (the
/// difference added back with `bpf_csum_update`). The kernel checks the
/// sum after each run (`BPF_F_TEST_SKB_CHECKSUM_COMPLETE`, 6.17+) and
/// fails the run with EBADMSG when it is wrong, as the stack would log
/// "hw csum failure" for a NIC's packet. Without the fix every IPv6
/// address rewrite failed here; IPv4 was right already.
#[test]
fn tc_address_rewrites_keep_a_checksum_complete_sum_right() {
    use dataplane::bpf::testrun;
    use dataplane_common::{kernel_features, program_names};
    use std::net::Ipv4Addr;
    let all = dataplane::bpf::kernel::features();
    assert!(
        all & kernel_features::CSUM_IPV6 != 0,
        "this kernel lacks BPF_F_IPV6 for bpf_l4_csum_replace (6.16+): run this test on a newer one"
    );
    let v4 = |c: u8, d: u8| IpAddr::V4(Ipv4Addr::new(198, 18, c, d));
    let families = [
        // (VIP, client, backends, node, outside client, remote backend)
        (
            vip(),
            client(),
            [b(1), b(2)],
            v6("2001:db8:50::1"),
            v6("2001:db8:200::5"),
            v6("2001:db8:18:9::2"),
        ),
        (
            IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10)),
            v4(100, 2),
            [v4(1, 2), v4(2, 2)],
            v4(50, 1),
            v4(200, 5),
            v4(9, 2),
        ),
    ];
    for (name, features) in [
        ("BPF_F_IPV6", all),
        ("bpf_csum_update", all & !kernel_features::CSUM_IPV6),
    ] {
        for (vip, client, backends, node, outside, remote) in families {
            let mut l = Loaded::with_kernel_features(features);
            let mut config = DpConfig::defaults();
            config.snat_addr6 = addr_of(v6("2001:db8:50::1")).0;
            config.snat_addr = u32::from_ne_bytes([198, 18, 50, 1]);
            l.sync.writer_mut().write_config(&config).unwrap();
            l.set_service(vip, 80, TCP, &[(backends[0], 8080), (backends[1], 8080)]);
            l.set_service(vip, 53, UDP, &[(backends[0], 5353), (backends[1], 5353)]);
            let mut remote_backend = Backend::new(remote, 8443);
            remote_backend.flags |= BACKEND_F_REMOTE;
            l.set_frontend(
                ServiceKey::new(node, 30443, TCP),
                Frontend {
                    service: "test/np".into(),
                    port_name: String::new(),
                    backends: vec![remote_backend],
                    affinity_timeout_s: None,
                    flags: SVC_F_EXTERNAL,
                    source_ranges: vec![],
                    also_serving: Vec::new(),
                },
            );
            let tc = l.dp.program_fd(program_names::TC).unwrap();
            let run = |what: &str, frame: Vec<u8>| {
                let out = testrun::run_checksum_complete(tc, &frame).unwrap_or_else(|e| {
                    panic!("{name}, {vip}: {what}: the kernel refused the skb's sum after the run: {e}")
                });
                parse_and_verify(&out.data)
            };
            let mut syn = Frame::tcp((client, 40000), (vip, 80), SYN);
            syn.payload = b"some payload".to_vec();
            let fwd = run("TCP DNAT", syn.build());
            run(
                "TCP reply",
                Frame::tcp((fwd.dst, fwd.dport), (client, 40000), SYN | ACK).build(),
            );
            let fwd = run("UDP DNAT", Frame::udp((client, 50000), (vip, 53), b"query").build());
            run(
                "UDP reply",
                Frame::udp((fwd.dst, fwd.dport), (client, 50000), b"answer").build(),
            );
            let fwd = run("SNAT", Frame::tcp((outside, 40700), (node, 30443), SYN).build());
            assert_eq!((fwd.src, fwd.dst), (node, remote), "{name}: SNAT and DNAT");
            let back = run(
                "SNAT reply",
                Frame::tcp((remote, 8443), (node, fwd.sport), SYN | ACK).build(),
            );
            assert_eq!((back.src, back.dst), (node, outside), "{name}: both reversed");
        }
    }
}
