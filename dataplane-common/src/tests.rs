extern crate std;
use crate::*;
use core::mem::{align_of, offset_of, size_of};

// These pin the ABI: the eBPF object was compiled against these layouts,
// and the agent writes maps with them. A change here must bump
// ABI_VERSION.
#[test]
fn service_key_layout() {
    assert_eq!(size_of::<ServiceKey>(), 20);
    assert_eq!(align_of::<ServiceKey>(), 4);
    assert_eq!(offset_of!(ServiceKey, addr), 0);
    assert_eq!(offset_of!(ServiceKey, port), 16);
    assert_eq!(offset_of!(ServiceKey, proto), 18);
    assert_eq!(offset_of!(ServiceKey, family), 19);
}

#[test]
fn endpoint_key_layout() {
    assert_eq!(size_of::<EndpointKey>(), 20);
    assert_eq!(align_of::<EndpointKey>(), 4);
    assert_eq!(offset_of!(EndpointKey, addr), 0);
    assert_eq!(offset_of!(EndpointKey, port), 16);
    assert_eq!(offset_of!(EndpointKey, proto), 18);
    assert_eq!(offset_of!(EndpointKey, family), 19);
}

#[test]
fn an_endpoint_key_has_its_frontends_protocol_and_plain_family() {
    let b = Backend {
        addr: v4_addr(0x0102_0304),
        port: 8080u16.to_be(),
        flags: 0,
    };
    let fe = ServiceKey {
        addr: v4_addr(0x0506_0708),
        port: 80u16.to_be(),
        proto: IPPROTO_UDP,
        family: FAMILY_V4 | KEY_IN_CLUSTER,
    };
    let k = EndpointKey::of(&fe, &b);
    assert_eq!(
        (k.addr, k.port, k.proto, k.family),
        (b.addr, b.port, IPPROTO_UDP, FAMILY_V4)
    );
}

#[test]
fn service_value_layout() {
    assert_eq!(size_of::<ServiceValue>(), 24);
    assert_eq!(offset_of!(ServiceValue, affinity_timeout_s), 16);
    assert_eq!(offset_of!(ServiceValue, service_id), 0);
    assert_eq!(offset_of!(ServiceValue, backend_count), 4);
    assert_eq!(offset_of!(ServiceValue, generation), 6);
    assert_eq!(offset_of!(ServiceValue, flags), 8);
    assert_eq!(offset_of!(ServiceValue, maglev_size), 12);
    // Where 0.2.0 had padding (always 0).
    assert_eq!(offset_of!(ServiceValue, epoch), 20);
}

#[test]
fn socket_lb_layout() {
    assert_eq!(size_of::<SockNatKey>(), 32);
    assert_eq!(offset_of!(SockNatKey, cookie), 0);
    assert_eq!(offset_of!(SockNatKey, addr), 8);
    assert_eq!(offset_of!(SockNatKey, port), 24);
    assert_eq!(offset_of!(SockNatKey, family), 26);
    assert_eq!(offset_of!(SockNatKey, dir), 27);
    assert_eq!(size_of::<SockNatValue>(), 32);
    assert_eq!(offset_of!(SockNatValue, port), 16);
    assert_eq!(offset_of!(SockNatValue, flags), 18);
    assert_eq!(offset_of!(SockNatValue, service_id), 20);
    assert_eq!(offset_of!(SockNatValue, last_seen_ns), 24);
    assert_eq!(size_of::<SockAffinityKey>(), 16);
    assert_eq!(offset_of!(SockAffinityKey, service_id), 8);
    for (i, e) in SockEvent::ALL.iter().enumerate() {
        assert_eq!(*e as usize, i);
        assert!(SockEvent::ALL[..i].iter().all(|o| o.name() != e.name()));
    }
}

#[test]
fn affinity_and_config_layout() {
    assert_eq!(size_of::<AffinityKey>(), 20);
    assert_eq!(offset_of!(AffinityKey, service_id), 16);
    assert_eq!(size_of::<AffinityValue>(), 32);
    assert_eq!(offset_of!(AffinityValue, last_seen_ns), 24);
    assert_eq!(size_of::<DpConfig>(), 64);
    assert_eq!(offset_of!(DpConfig, snat_addr6), 48);
    assert_eq!(offset_of!(DpConfig, snat_addr), 4);
    assert_eq!(offset_of!(DpConfig, tcp_syn_timeout_ns), 8);
    assert_eq!(offset_of!(DpConfig, udp_stream_timeout_ns), 40);
}

#[test]
fn service_names_round_trip_and_cut_on_char_boundaries() {
    assert_eq!(ServiceName::new("shop/web:http").as_str(), "shop/web:http");
    let long = "é".repeat(100); // 200 bytes
    let n = ServiceName::new(&long);
    assert_eq!(n.as_str().len(), 128);
    assert_eq!(size_of::<ServiceName>(), 128);
}

#[test]
fn timeouts_follow_state() {
    let c = DpConfig::defaults();
    let s = 1_000_000_000;
    assert_eq!(c.timeout_ns(IPPROTO_TCP, CT_F_ORIGINAL), 60 * s);
    assert_eq!(c.timeout_ns(IPPROTO_TCP, CT_F_ORIGINAL | CT_F_SEEN_REPLY), 86_400 * s);
    assert_eq!(c.timeout_ns(IPPROTO_TCP, CT_F_SEEN_REPLY | CT_F_CLOSING), 10 * s);
    assert_eq!(c.timeout_ns(IPPROTO_UDP, CT_F_ORIGINAL), 30 * s);
    assert_eq!(c.timeout_ns(IPPROTO_UDP, CT_F_SEEN_REPLY), 120 * s);
    let unset = DpConfig::default();
    assert_eq!(
        unset.timeout_ns(IPPROTO_UDP, CT_F_ORIGINAL),
        30 * s,
        "zero means default"
    );
    let short = DpConfig {
        udp_timeout_ns: 5,
        ..DpConfig::default()
    };
    assert_eq!(short.timeout_ns(IPPROTO_UDP, CT_F_ORIGINAL), 5);
}

#[test]
fn maglev_layout() {
    assert_eq!(size_of::<MaglevKey>(), 8);
    assert_eq!(offset_of!(MaglevKey, chunk), 4);
    assert_eq!(size_of::<MaglevChunk>(), 2 * limits::MAGLEV_CHUNK as usize);
    assert_eq!(
        MaglevKey::new(1, 1, 300),
        MaglevKey {
            service_id: 1,
            chunk: limits::MAGLEV_MAX_CHUNKS + 1
        }
    );
}

#[test]
fn backend_layout() {
    assert_eq!(size_of::<BackendKey>(), 8);
    assert_eq!(offset_of!(BackendKey, slot), 4);
    assert_eq!(size_of::<Backend>(), 20);
    assert_eq!(offset_of!(Backend, addr), 0);
    assert_eq!(offset_of!(Backend, port), 16);
    assert_eq!(offset_of!(Backend, flags), 18);
}

#[test]
fn frontend_cache_layout() {
    assert_eq!(size_of::<FrontendWay>(), 32);
    assert_eq!(offset_of!(FrontendWay, service_id), 20);
    assert_eq!(offset_of!(FrontendWay, check), 24);
    assert_eq!(size_of::<FrontendBucket>(), 64, "a bucket is one cache line");
    let key = ServiceKey {
        addr: [0x0113_12c6, 0, 0, 0],
        port: 80u16.to_be(),
        proto: 6,
        family: FAMILY_V4,
    };
    let mut b = FrontendBucket::default();
    let get = |b: &FrontendBucket, k: &ServiceKey| b.get(k, frontend_hash(k));
    assert_eq!(get(&b, &key), None, "an empty way matches no packet's key");
    b.ways[1] = FrontendWay::new(key, 7);
    assert_eq!(get(&b, &key), Some(7));
    let other = ServiceKey {
        port: 81u16.to_be(),
        ..key
    };
    assert_eq!(get(&b, &other), None);
    let in_cluster = ServiceKey {
        family: FAMILY_V4 | KEY_IN_CLUSTER,
        ..key
    };
    assert_eq!(get(&b, &in_cluster), None);
    // A way read half rewritten: another frontend's key with this one's
    // id and check (or the reverse) is no match.
    b.ways[0] = FrontendWay {
        key: other,
        ..FrontendWay::new(key, 7)
    };
    assert_eq!(get(&b, &other), None);
    b.ways[0] = FrontendWay {
        service_id: 8,
        ..FrontendWay::new(other, 9)
    };
    assert_eq!(get(&b, &other), None);
    assert!(frontend_bucket(&key) < FRONTEND_CACHE_BUCKETS);
}

#[test]
fn conntrack_layout() {
    assert_eq!(size_of::<CtKey>(), 40);
    assert_eq!(offset_of!(CtKey, saddr), 0);
    assert_eq!(offset_of!(CtKey, daddr), 16);
    assert_eq!(offset_of!(CtKey, sport), 32);
    assert_eq!(offset_of!(CtKey, dport), 34);
    assert_eq!(offset_of!(CtKey, proto), 36);
    assert_eq!(offset_of!(CtKey, family), 37);
    assert_eq!(size_of::<CtValue>(), 64);
    assert_eq!(align_of::<CtValue>(), 8);
    assert_eq!(offset_of!(CtValue, nat_addr), 0);
    assert_eq!(offset_of!(CtValue, snat_addr), 16);
    assert_eq!(offset_of!(CtValue, created_ns), 32);
    assert_eq!(offset_of!(CtValue, last_seen_ns), 40);
    assert_eq!(offset_of!(CtValue, service_id), 48);
    // Where 0.2.0 had padding (always 0).
    assert_eq!(offset_of!(CtValue, epoch), 58);
    assert_eq!(offset_of!(CtValue, nat_port), 52);
    assert_eq!(offset_of!(CtValue, flags), 54);
    assert_eq!(offset_of!(CtValue, snat_port), 56);
    assert_eq!(size_of::<SourceRangeKey>(), 20);
    assert_eq!(offset_of!(SourceRangeKey, addr), 4);
}

#[test]
fn stats_layout() {
    assert_eq!(size_of::<ServiceStats>(), 32);
    assert_eq!(offset_of!(ServiceStats, new_flows), 16);
}

#[test]
fn reasons_are_dense_and_named_uniquely() {
    for (i, r) in Reason::ALL.iter().enumerate() {
        assert_eq!(*r as u32, i as u32, "{r:?} is out of place");
    }
    let mut names: std::vec::Vec<_> = Reason::ALL.iter().map(|r| r.name()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), REASON_COUNT as usize);
}

#[test]
fn backend_key_generations_do_not_overlap() {
    // Fixed vectors: the first 1,024 slots of each generation keep the
    // numbers releases up to 0.2.0 wrote (generation * 1024 + index), so a
    // new agent reads their maps as they are.
    for (g, i, slot) in [
        (0, 0, 0),
        (0, 5, 5),
        (0, 1023, 1023),
        (1, 0, 1024),
        (1, 5, 1029),
        (1, 1023, 2047),
    ] {
        assert_eq!(BackendKey::new(7, g, i), BackendKey { service_id: 7, slot }, "{g} {i}");
    }
    // Beyond: after both first ranges, generation 0 then generation 1.
    assert_eq!(BackendKey::new(7, 0, 1024).slot, 2048);
    assert_eq!(BackendKey::new(7, 1, 1024).slot, 2048 + 16_384 - 1024);
    assert_eq!(BackendKey::new(7, 2, 3), BackendKey::new(7, 0, 3));
    // Every (generation, index) has its own slot, and the inverse finds it.
    let mut seen = std::collections::BTreeSet::new();
    for g in 0..2u16 {
        for i in 0..limits::MAX_BACKENDS_PER_SERVICE {
            let k = BackendKey::new(7, g, i);
            assert!(seen.insert(k.slot), "slot {} twice", k.slot);
            assert_eq!(k.generation_and_index(), (g, i));
        }
    }
    assert_eq!(seen.len(), 2 * limits::MAX_BACKENDS_PER_SERVICE as usize);
}

/// Reference: the full Internet checksum of `words`.
fn full_csum(words: &[u16]) -> u16 {
    let mut sum: u32 = 0;
    for w in words {
        sum += *w as u32;
    }
    !csum::fold(sum)
}

#[test]
fn incremental_checksum_matches_recomputation() {
    let mut words = [
        0x4500u16, 0x0073, 0x0000, 0x4000, 0x4011, 0, 0xc0a8, 0x0001, 0xc0a8, 0x00c7,
    ];
    words[5] = full_csum(&words);
    let old = ((words[8] as u32) << 16) | words[9] as u32;
    let new = 0xc613_0a0bu32;
    let updated = csum::replace4(words[5], old, new);
    words[8] = (new >> 16) as u16;
    words[9] = new as u16;
    words[5] = 0;
    assert_eq!(updated, full_csum(&words));
    let updated = csum::replace2(updated, words[0], 0x4501);
    words[0] = 0x4501;
    assert_eq!(updated, full_csum(&words));
}

#[cfg(feature = "user")]
#[test]
fn addresses_round_trip_in_both_families() {
    use core::net::IpAddr;
    for s in ["198.19.0.10", "2001:db8::10", "fd00::1:2:3:4", "0.0.0.1"] {
        let ip: IpAddr = s.parse().unwrap();
        let (a, f) = user::addr_of(ip);
        assert_eq!(user::ip_of(&a, f), ip, "{s}");
    }
    // IPv4 sits in word 0 in packet byte order, the rest is zero.
    let (a, f) = user::addr_of("198.19.0.10".parse().unwrap());
    assert_eq!(f, FAMILY_V4);
    assert_eq!(a, [u32::from_ne_bytes([198, 19, 0, 10]), 0, 0, 0]);
    let k4 = ServiceKey::new(core::net::Ipv4Addr::new(198, 19, 0, 10), 80, IPPROTO_TCP);
    let k6 = ServiceKey::new("c613:a::".parse::<core::net::Ipv6Addr>().unwrap(), 80, IPPROTO_TCP);
    assert_ne!(k4, k6, "the family keeps look-alike keys apart");
    let b = Backend::new("2001:db8::5".parse::<IpAddr>().unwrap(), 8080);
    assert_eq!(b.ip(), "2001:db8::5".parse::<IpAddr>().unwrap());
    assert_eq!(b.host_port(), 8080);
}

#[test]
fn flow_hash_of_an_ipv4_key_is_the_ipv4_hash() {
    let k = CtKey {
        saddr: v4_addr(0x0102_0304),
        daddr: v4_addr(0x0506_0708),
        sport: 1,
        dport: 2,
        proto: 6,
        family: FAMILY_V4,
        _pad: 0,
    };
    assert_eq!(flow_hash_key(&k), flow_hash(0x0102_0304, 0x0506_0708, 1, 2, 6));
}

#[test]
fn flow_hash_spreads_over_small_moduli() {
    // 3 backends, 3000 flows differing only in source port: each backend
    // must get a fair share (the e2e tests rely on a spread).
    let mut buckets = [0u32; 3];
    for p in 0..3000u16 {
        let h = flow_hash(0x0102_0304, 0x0506_0708, (32768 + p).to_be(), 80u16.to_be(), 6);
        buckets[(h % 3) as usize] += 1;
    }
    for b in buckets {
        assert!((800..1200).contains(&b), "unbalanced: {buckets:?}");
    }
}

#[test]
fn frontend_filter_bits_are_fixed() {
    // Computed apart (Python, from the definition: the address's 32-bit
    // words as read from network-order bytes on a little-endian host,
    // XORed, times 0x9e3779b1 mod 2^32, top 20 bits).
    assert_eq!(frontend_filter_bit(&octets_v4([198, 19, 0, 1])), 188_164);
    assert_eq!(frontend_filter_bit(&octets_v4([198, 19, 0, 2])), 913_156);
    assert_eq!(frontend_filter_bit(&octets_v4([198, 18, 0, 10])), 194_409);
    let v6 =
        |o: [u8; 16]| -> Addr { core::array::from_fn(|i| u32::from_ne_bytes(o[4 * i..4 * i + 4].try_into().unwrap())) };
    // fd00::1, 2001:db8::10
    assert_eq!(
        frontend_filter_bit(&v6([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])),
        56_628
    );
    assert_eq!(
        frontend_filter_bit(&v6([0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10])),
        345_694
    );
    assert_eq!(size_of::<FrontendFilter>(), FRONTEND_FILTER_BITS / 8);
}

#[test]
fn frontend_filter_spreads_a_service_cidr() {
    let mut f: FrontendFilter = bytemuck::Zeroable::zeroed();
    let a = octets_v4([198, 19, 0, 1]);
    assert!(!f.has(&a));
    f.set(&a);
    assert!(f.has(&a));
    assert_eq!(f.count(), 1);
    // Every address of a /16 service CIDR: a random hash would leave
    // about 2^20 * (1 - e^(-1/16)) = 63,540 distinct bits.
    for i in 0..=u16::MAX {
        let [hi, lo] = i.to_be_bytes();
        f.set(&octets_v4([198, 19, hi, lo]));
    }
    assert!(f.count() >= 63_000, "{} bits", f.count());
    // The hosts of another /16: a random hash would find about 6 % of them
    // set (false positives: a service map lookup each).
    let fp = (0..=u16::MAX)
        .filter(|i| {
            let [hi, lo] = i.to_be_bytes();
            f.has(&octets_v4([198, 18, hi, lo]))
        })
        .count();
    assert!(fp < 65_536 / 10, "{fp} false positives");
}

fn octets_v4(o: [u8; 4]) -> Addr {
    [u32::from_ne_bytes(o), 0, 0, 0]
}
