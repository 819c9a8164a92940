//! Property tests (proptest) of the agent's userspace input path: manifest
//! parsing, the desired-state function and the map sync.
//!
//! - arbitrary text, YAML-ish documents and mutations of deploy/examples
//!   never panic `parse_manifests` or `model::compute`;
//! - Services and EndpointSlices with arbitrary field values never panic
//!   `compute`, every frontend it returns is well formed, and adding such
//!   objects never changes the frontends of the valid Services around them;
//! - under random sequences of desired states (with and without failing map
//!   writes) the maps hold exactly what the syncer says is programmed, which
//!   is the desired state whenever no write failed: every Maglev entry
//!   points at a backend slot of its generation, no slot or chunk is stale.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    rc::Rc,
    time::Instant,
};

use dataplane::{
    model::maglev,
    model::{self, Desired, Frontend, SERVICE_NAME_LABEL},
    reconcile::{MapWriter, Selection, SyncConfig, Syncer, WriteError, RETIRE_GRACE},
    source::files::parse_manifests,
};
use dataplane_common::{
    limits, Backend, BackendKey, MaglevChunk, MaglevKey, ServiceKey, ServiceValue, IPPROTO_TCP, IPPROTO_UDP,
    SVC_F_AFFINITY, SVC_F_OTHER_PORTS, SVC_F_RANDOM,
};
use k8s_openapi::{
    api::{
        core::v1::{ClientIPConfig, Service, ServicePort, ServiceSpec, SessionAffinityConfig},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use proptest::prelude::*;

const EXAMPLES: [&str; 4] = ["web.yaml", "skip.yaml", "edge.yaml", "dual.yaml"];

fn example(name: &str) -> String {
    let path = format!("{}/../deploy/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn examples() -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for name in EXAMPLES {
        let (o, _) = parse_manifests(name, &example(name)).unwrap();
        services.extend(o.services);
        slices.extend(o.slices);
    }
    (services, slices)
}

/// What every frontend `compute` returns must satisfy, whatever its input.
fn well_formed(d: &Desired) -> Result<(), String> {
    for (k, fe) in &d.frontends {
        // A ClusterIP's entry for the ports its Service lacks: port 0,
        // protocol 0, the flag, nothing else.
        if fe.flags & SVC_F_OTHER_PORTS != 0 || (k.port, k.proto) == (0, 0) {
            if (k.port, k.proto, fe.flags) != (0, 0, SVC_F_OTHER_PORTS) || !fe.backends.is_empty() {
                return Err(format!("{k:?}: a malformed other-ports entry {fe:?}"));
            }
            continue;
        }
        if k.proto != IPPROTO_TCP && k.proto != IPPROTO_UDP {
            return Err(format!("{k:?}: protocol {}", k.proto));
        }
        if k.port == 0 {
            return Err(format!("{k:?}: port 0"));
        }
        if fe.backends.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("{k:?}: backends not sorted and unique: {:?}", fe.backends));
        }
        if fe.backends.len() > limits::MAX_BACKENDS_PER_SERVICE as usize {
            return Err(format!("{k:?}: {} backends", fe.backends.len()));
        }
        if fe.backends.iter().any(|b| b.port == 0) {
            return Err(format!("{k:?}: a backend with port 0"));
        }
        if fe
            .affinity_timeout_s
            .is_some_and(|t| t == 0 || t > model::MAX_AFFINITY_TIMEOUT_S)
        {
            return Err(format!("{k:?}: affinity timeout {:?}", fe.affinity_timeout_s));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- strategies

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-zA-Z0-9 .:_/-]{0,24}",
        ".{0,24}",
        any::<String>().prop_map(|s| s.chars().take(24).collect()),
    ]
}

/// IP address strings: valid IPv4 (often near the VIP range), IPv6, and
/// the invalid forms a hand-written manifest has.
fn ip_string() -> impl Strategy<Value = String> {
    prop_oneof![
        // The VIPs of deploy/examples: conflicts with real Services.
        6 => prop::sample::select(&["198.19.0.10", "198.19.0.20", "198.19.0.30"][..]).prop_map(String::from),
        12 => (0u8..64).prop_map(|i| format!("198.19.0.{i}")),
        20 => (0u8..8, 0u8..8).prop_map(|(a, b)| format!("198.18.{a}.{b}")),
        1 => any::<[u8; 4]>().prop_map(|o| Ipv4Addr::from(o).to_string()),
        1 => Just("None".to_string()),
        1 => Just(String::new()),
        1 => Just("2001:db8::1".to_string()),
        1 => Just("::ffff:198.19.0.1".to_string()),
        1 => Just("198.019.0.10".to_string()),
        1 => Just("256.1.1.1".to_string()),
        1 => Just("198.19.0".to_string()),
        1 => Just(" 198.19.0.1".to_string()),
        1 => text(),
    ]
}

fn port_number() -> impl Strategy<Value = i32> {
    prop_oneof![4 => 1..=3i32, 8 => 79..=81i32, 1 => Just(0), 1 => Just(-1), 1 => Just(65535), 1 => Just(65536), 1 => any::<i32>()]
}

fn protocol() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(
        0.9,
        prop_oneof![
            8 => Just("TCP".to_string()),
            3 => Just("UDP".to_string()),
            1 => Just("SCTP".to_string()),
            1 => Just("tcp".to_string()),
            1 => text(),
        ],
    )
}

fn port_name() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(
        0.5,
        prop_oneof![
            1 => Just(String::new()),
            6 => Just("http".to_string()),
            1 => Just("dns".to_string()),
            1 => text()
        ],
    )
}

fn labels(service_names: BoxedStrategy<String>) -> impl Strategy<Value = Option<BTreeMap<String, String>>> {
    (
        prop::option::weighted(0.85, service_names),
        prop::collection::btree_map(text(), text(), 0..2),
    )
        .prop_map(|(service, mut other)| {
            if let Some(name) = service {
                other.insert(SERVICE_NAME_LABEL.to_string(), name);
            }
            (!other.is_empty()).then_some(other)
        })
}

fn service(namespace: &'static str) -> impl Strategy<Value = Service> {
    let port = (
        port_name(),
        port_number(),
        protocol(),
        prop::option::of(prop_oneof![
            port_number().prop_map(IntOrString::Int),
            text().prop_map(IntOrString::String),
        ]),
    )
        .prop_map(|(name, port, protocol, target_port)| ServicePort {
            name,
            port,
            protocol,
            target_port,
            ..Default::default()
        });
    (
        prop::option::weighted(0.95, prop_oneof![4 => Just("web".to_string()), 1 => text()]),
        prop::option::weighted(0.9, ip_string()),
        prop::option::weighted(0.3, prop::collection::vec(ip_string(), 0..3)),
        prop::option::of(prop_oneof![
            6 => Just("ClusterIP".to_string()),
            1 => Just("ExternalName".to_string()),
            1 => Just("NodePort".to_string()),
            1 => text()
        ]),
        prop::option::weighted(0.9, prop::collection::vec(port, 1..4)),
        prop::option::of(prop_oneof![
            Just("ClientIP".to_string()),
            Just("None".to_string()),
            text()
        ]),
        prop::option::of(prop::option::of(any::<i32>())),
    )
        .prop_map(
            move |(name, cluster_ip, cluster_ips, type_, ports, affinity, timeout)| Service {
                metadata: ObjectMeta {
                    name,
                    namespace: Some(namespace.to_string()),
                    ..Default::default()
                },
                spec: Some(ServiceSpec {
                    cluster_ip,
                    cluster_ips,
                    type_,
                    ports,
                    session_affinity: affinity,
                    session_affinity_config: timeout.map(|t| SessionAffinityConfig {
                        client_ip: Some(ClientIPConfig { timeout_seconds: t }),
                    }),
                    ..Default::default()
                }),
                status: None,
            },
        )
}

fn slice(
    namespace: BoxedStrategy<String>,
    service_names: BoxedStrategy<String>,
) -> impl Strategy<Value = EndpointSlice> {
    let endpoint = (
        prop::collection::vec(ip_string(), 0..3),
        prop::option::weighted(
            0.7,
            (
                prop::option::of(any::<bool>()),
                prop::option::of(any::<bool>()),
                prop::option::of(any::<bool>()),
            ),
        ),
    )
        .prop_map(|(addresses, c)| Endpoint {
            addresses,
            conditions: c.map(|(ready, serving, terminating)| EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            ..Default::default()
        });
    let port =
        (port_name(), prop::option::of(port_number()), protocol()).prop_map(|(name, port, protocol)| EndpointPort {
            name,
            port,
            protocol,
            app_protocol: None,
        });
    (
        namespace,
        prop::option::of(text()),
        labels(service_names),
        prop_oneof![
            8 => Just("IPv4".to_string()),
            1 => Just("IPv6".to_string()),
            1 => Just("FQDN".to_string()),
            1 => text()
        ],
        prop::collection::vec(endpoint, 0..6),
        prop::option::weighted(0.9, prop::collection::vec(port, 1..3)),
    )
        .prop_map(|(ns, name, labels, address_type, endpoints, ports)| EndpointSlice {
            metadata: ObjectMeta {
                name,
                namespace: Some(ns),
                labels,
                ..Default::default()
            },
            address_type,
            endpoints,
            ports,
        })
}

/// Edits that turn a manifest into a hostile one: cut, duplicate, swap
/// lines, insert YAML-significant characters, replace bytes.
#[derive(Clone, Debug)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, String),
    DuplicateLine(usize),
    SwapLines(usize, usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let yamlish = prop_oneof![
        Just(": ".to_string()),
        Just("- ".to_string()),
        Just("{".to_string()),
        Just("]".to_string()),
        Just("&a ".to_string()),
        Just("*a".to_string()),
        Just("!!binary ".to_string()),
        Just("\n---\n".to_string()),
        Just("\t".to_string()),
        Just("'".to_string()),
        Just("\"".to_string()),
        Just("<<: *a\n".to_string()),
        Just("99999999999999999999".to_string()),
        Just("-1".to_string()),
        Just("null".to_string()),
        Just("~".to_string()),
        text(),
    ];
    prop_oneof![
        (any::<usize>(), 0usize..40).prop_map(|(a, n)| Edit::Delete(a, n)),
        (any::<usize>(), yamlish).prop_map(|(a, s)| Edit::Insert(a, s)),
        any::<usize>().prop_map(Edit::DuplicateLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn floor_char(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply_edit(s: &str, e: &Edit) -> String {
    let n = s.len().max(1);
    match e {
        Edit::Delete(a, len) => {
            let a = floor_char(s, a % n);
            let b = floor_char(s, a + len);
            format!("{}{}", &s[..a], &s[b..])
        }
        Edit::Insert(a, t) => {
            let a = floor_char(s, a % n);
            format!("{}{t}{}", &s[..a], &s[a..])
        }
        Edit::DuplicateLine(i) | Edit::SwapLines(i, _) if s.lines().count() == 0 => {
            let _ = i;
            s.to_string()
        }
        Edit::DuplicateLine(i) => {
            let mut lines: Vec<&str> = s.lines().collect();
            let i = i % lines.len();
            lines.insert(i, lines[i]);
            lines.join("\n")
        }
        Edit::SwapLines(a, b) => {
            let mut lines: Vec<&str> = s.lines().collect();
            let (a, b) = (a % lines.len(), b % lines.len());
            lines.swap(a, b);
            lines.join("\n")
        }
        Edit::Truncate(a) => s[..floor_char(s, a % n)].to_string(),
    }
}

/// YAML-ish documents built from the words manifests use.
fn yamlish_doc() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("kind"),
        Just("metadata"),
        Just("name"),
        Just("namespace"),
        Just("labels"),
        Just("spec"),
        Just("clusterIP"),
        Just("clusterIPs"),
        Just("ports"),
        Just("port"),
        Just("protocol"),
        Just("targetPort"),
        Just("addressType"),
        Just("endpoints"),
        Just("addresses"),
        Just("conditions"),
        Just("ready"),
        Just("items"),
        Just("kubernetes.io/service-name"),
    ];
    let value = prop_oneof![
        Just("Service".to_string()),
        Just("EndpointSlice".to_string()),
        Just("List".to_string()),
        Just("IPv4".to_string()),
        Just("TCP".to_string()),
        Just("[198.19.0.10]".to_string()),
        Just("198.18.1.2".to_string()),
        Just("80".to_string()),
        Just("-80".to_string()),
        Just("true".to_string()),
        Just("{}".to_string()),
        Just("[]".to_string()),
        Just("null".to_string()),
        text(),
    ];
    let line = (0usize..4, key, value, any::<bool>())
        .prop_map(|(indent, k, v, dash)| format!("{}{}{k}: {v}", "  ".repeat(indent), if dash { "- " } else { "" }));
    prop::collection::vec(line, 0..14).prop_map(|l| l.join("\n"))
}

// ------------------------------------------------------------ parse + compute

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics_the_parser(s in any::<String>()) {
        if let Ok((o, _)) = parse_manifests("fuzz.yaml", &s) {
            let d = model::compute(&o.services, &o.slices);
            prop_assert_eq!(well_formed(&d), Ok(()));
        }
    }

    #[test]
    fn yamlish_documents_never_panic(docs in prop::collection::vec(yamlish_doc(), 1..4)) {
        let text = docs.join("\n---\n");
        if let Ok((o, _)) = parse_manifests("fuzz.yaml", &text) {
            let d = model::compute(&o.services, &o.slices);
            prop_assert_eq!(well_formed(&d), Ok(()));
        }
    }

    #[test]
    fn mutated_examples_never_panic(file in 0..EXAMPLES.len(), edits in prop::collection::vec(edit(), 1..6)) {
        let mut text = example(EXAMPLES[file]);
        for e in &edits {
            text = apply_edit(&text, e);
        }
        if let Ok((o, _)) = parse_manifests(EXAMPLES[file], &text) {
            let d = model::compute(&o.services, &o.slices);
            prop_assert_eq!(well_formed(&d), Ok(()));
        }
    }

    #[test]
    fn arbitrary_objects_never_panic_and_give_well_formed_frontends(
        services in prop::collection::vec(service("shop"), 0..6),
        slices in prop::collection::vec(
            slice(
                prop_oneof![6 => Just("shop".to_string()), 1 => text()].boxed(),
                prop_oneof![6 => Just("web".to_string()), 1 => text()].boxed(),
            ),
            0..8,
        ),
    ) {
        let d = model::compute(&services, &slices);
        prop_assert_eq!(well_formed(&d), Ok(()));
        // The same objects in another order give the same frontends (for
        // distinct names: two objects with the same namespace/name, which
        // the API cannot hold, are taken in input order, and the file
        // source reads files in sorted order).
        let mut seen = BTreeSet::new();
        let services: Vec<Service> = services
            .into_iter()
            .filter(|s| seen.insert((s.metadata.namespace.clone(), s.metadata.name.clone())))
            .collect();
        let d = model::compute(&services, &slices);
        let mut rs = services.clone();
        rs.reverse();
        let mut rl = slices.clone();
        rl.reverse();
        prop_assert_eq!(model::compute(&rs, &rl).frontends, d.frontends);
    }

    #[test]
    fn garbage_objects_do_not_change_other_services(
        services in prop::collection::vec(service("garbage"), 0..5),
        slices in prop::collection::vec(
            slice(
                prop_oneof![Just("garbage".to_string()), Just("shop".to_string()), Just("default".to_string())].boxed(),
                // Never the name of a valid Service of the examples.
                prop_oneof![Just("web".to_string()), text()].prop_map(|n| format!("g-{n}")).boxed(),
            ),
            0..5,
        ),
    ) {
        let (mut all_services, mut all_slices) = examples();
        let before = model::compute(&all_services, &all_slices);
        prop_assert!(!before.frontends.is_empty());
        let vips: BTreeSet<std::net::IpAddr> = before.frontends.keys().map(|k| k.ip()).collect();
        // A garbage Service claiming a valid VIP is a conflict with defined
        // winner (namespace/name order), not garbage: moved off the VIPs.
        let services: Vec<Service> = services
            .into_iter()
            .map(|mut s| {
                let spec = s.spec.as_mut().unwrap();
                let taken = |ip: &String| ip.parse::<std::net::IpAddr>().is_ok_and(|a| vips.contains(&a));
                if spec.cluster_ip.as_ref().is_some_and(taken) {
                    spec.cluster_ip = Some("198.19.99.99".into());
                }
                if let Some(ips) = spec.cluster_ips.as_mut() {
                    for ip in ips.iter_mut().filter(|ip| taken(ip)) {
                        *ip = "198.19.99.98".into();
                    }
                }
                s
            })
            .collect();
        all_services.extend(services);
        all_slices.extend(slices);
        let after = model::compute(&all_services, &all_slices);
        prop_assert_eq!(well_formed(&after), Ok(()));
        for (k, fe) in &before.frontends {
            prop_assert_eq!(after.frontends.get(k), Some(fe), "frontend {:?} changed", k);
        }
    }
}

// ---------------------------------------------------------------------- sync

/// A map writer over in-memory maps that can fail chosen writes.
#[derive(Default)]
struct Maps {
    services: BTreeMap<ServiceKey, ServiceValue>,
    backends: BTreeMap<BackendKey, Backend>,
    maglev: BTreeMap<MaglevKey, MaglevChunk>,
    /// Writes (puts) so far, and which of them fail (cycled pattern; the
    /// test keeps a handle to change it between syncs).
    puts: usize,
    fail: Rc<RefCell<Vec<bool>>>,
}

impl Maps {
    fn put_ok(&mut self) -> Result<(), WriteError> {
        self.puts += 1;
        let fail = self.fail.borrow();
        if !fail.is_empty() && fail[self.puts % fail.len()] {
            return Err(WriteError::Refused("injected failure (map full)".into()));
        }
        Ok(())
    }
}

impl MapWriter for Maps {
    fn put_backend(&mut self, key: BackendKey, value: Backend) -> Result<(), WriteError> {
        self.put_ok()?;
        self.backends.insert(key, value);
        Ok(())
    }
    fn delete_backend(&mut self, key: BackendKey) -> Result<(), WriteError> {
        self.backends.remove(&key);
        Ok(())
    }
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), WriteError> {
        self.put_ok()?;
        self.services.insert(key, value);
        Ok(())
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), WriteError> {
        self.services.remove(&key);
        Ok(())
    }
    fn put_maglev(&mut self, key: MaglevKey, value: MaglevChunk) -> Result<(), WriteError> {
        self.put_ok()?;
        self.maglev.insert(key, value);
        Ok(())
    }
    fn delete_maglev(&mut self, key: MaglevKey) -> Result<(), WriteError> {
        self.maglev.remove(&key);
        Ok(())
    }
    fn put_name(&mut self, _service_id: u32, _name: &str) -> Result<(), WriteError> {
        self.put_ok()
    }
    fn delete_name(&mut self, _service_id: u32) -> Result<(), WriteError> {
        Ok(())
    }
    fn put_source_range(&mut self, _service_id: u32, _addr: std::net::IpAddr, _len: u8) -> Result<(), WriteError> {
        self.put_ok()
    }
    fn delete_source_range(&mut self, _service_id: u32, _addr: std::net::IpAddr, _len: u8) -> Result<(), WriteError> {
        Ok(())
    }
    fn prune_affinity(&mut self, _service_id: u32, _keep: &[Backend]) -> Result<(), WriteError> {
        Ok(())
    }
    fn reset_service_stats(&mut self, _service_id: u32) -> Result<(), WriteError> {
        Ok(())
    }
    fn clear_udp_flows(&mut self, _stale: &[(u32, Backend)]) -> Result<usize, WriteError> {
        // The model keeps no flows.
        Ok(0)
    }
}

/// The maps hold exactly what `programmed` says: one service entry per
/// frontend with its current generation's slots and Maglev chunks, and
/// nothing else.
/// The maps hold exactly what `s` programmed; with `retired_ok`, slots and
/// chunks outside it may remain (retired generations within their grace
/// period).
fn maps_match_programmed(
    s: &Syncer<Maps>,
    maglev_size: u32,
    selection: Selection,
    retired_ok: bool,
) -> Result<(), String> {
    let m = s.writer();
    let programmed = s.programmed();
    let keys: BTreeSet<_> = m.services.keys().copied().collect();
    let want: BTreeSet<_> = programmed.keys().copied().collect();
    if keys != want {
        return Err(format!("service keys {keys:?} != programmed {want:?}"));
    }
    let mut ids = BTreeSet::new();
    let mut slots = BTreeSet::new();
    let mut chunks = BTreeSet::new();
    for (k, p) in programmed {
        let v = m.services[k];
        if !ids.insert(v.service_id) {
            return Err(format!("service id {} used twice", v.service_id));
        }
        let n = p.frontend.backends.len();
        if (v.service_id, v.generation, v.backend_count as usize) != (p.service_id, p.generation, n) {
            return Err(format!("{k:?}: entry {v:?} != programmed {p:?}"));
        }
        if (v.flags & SVC_F_AFFINITY != 0) != p.frontend.affinity_timeout_s.is_some() {
            return Err(format!("{k:?}: affinity flag"));
        }
        for (i, b) in p.frontend.backends.iter().enumerate() {
            let key = BackendKey::new(v.service_id, v.generation, i as u32);
            if m.backends.get(&key) != Some(b) {
                return Err(format!("{k:?}: slot {i} holds {:?}, not {b:?}", m.backends.get(&key)));
            }
            slots.insert(key);
        }
        match selection {
            Selection::Random => {
                if v.flags & SVC_F_RANDOM == 0 || v.maglev_size != 0 {
                    return Err(format!("{k:?}: random selection not set: {v:?}"));
                }
            }
            Selection::Maglev if n == 0 => {
                if v.maglev_size != 0 {
                    return Err(format!("{k:?}: a Maglev table without backends"));
                }
            }
            Selection::Maglev => {
                if v.maglev_size != maglev_size {
                    return Err(format!("{k:?}: maglev size {}", v.maglev_size));
                }
                let table = maglev::table(&p.frontend.backends, maglev_size);
                for pos in 0..maglev_size {
                    let key = MaglevKey::new(v.service_id, v.generation, pos);
                    let Some(chunk) = m.maglev.get(&key) else {
                        return Err(format!("{k:?}: no Maglev chunk for position {pos}"));
                    };
                    let entry = chunk.entries[(pos % limits::MAGLEV_CHUNK) as usize];
                    if entry as usize >= n {
                        return Err(format!("{k:?}: Maglev position {pos} points at slot {entry} of {n}"));
                    }
                    if entry != table[pos as usize] {
                        return Err(format!("{k:?}: Maglev position {pos} differs from the table"));
                    }
                    chunks.insert(key);
                }
            }
        }
    }
    let stale_slots: Vec<_> = m.backends.keys().filter(|k| !slots.contains(k)).collect();
    let stale_chunks: Vec<_> = m.maglev.keys().filter(|k| !chunks.contains(k)).collect();
    if !retired_ok && (!stale_slots.is_empty() || !stale_chunks.is_empty()) {
        return Err(format!("stale slots {stale_slots:?}, stale chunks {stale_chunks:?}"));
    }
    Ok(())
}

fn frontend_key(i: u8) -> ServiceKey {
    ServiceKey::new(
        Ipv4Addr::new(198, 19, 0, 10 + i / 2),
        80,
        if i.is_multiple_of(2) { IPPROTO_TCP } else { IPPROTO_UDP },
    )
}

/// Desired states over 6 frontends and 10 backends.
fn desired_state() -> impl Strategy<Value = Desired> {
    let frontend = (
        prop::collection::btree_set(0u8..10, 0..7),
        prop::option::of(1u32..100),
        0u8..2,
    );
    prop::collection::btree_map(0u8..6, frontend, 0..6).prop_map(|m| Desired {
        frontends: m
            .into_iter()
            .map(|(i, (backends, affinity, name))| {
                (
                    frontend_key(i),
                    Frontend {
                        service: format!("ns/svc{i}"),
                        port_name: format!("p{name}"),
                        backends: backends
                            .into_iter()
                            .map(|b| Backend::new(Ipv4Addr::new(198, 18, b, 2), 8080 + b as u16 % 2))
                            .collect(),
                        affinity_timeout_s: affinity,
                        flags: 0,
                        source_ranges: vec![],
                        also_serving: Vec::new(),
                    }
                    .into(),
                )
            })
            .collect(),
        problems: Vec::new(),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 120, ..ProptestConfig::default() })]

    #[test]
    fn sync_maps_equal_the_last_desired_state(
        states in prop::collection::vec(desired_state(), 1..8),
        random in any::<bool>(),
        reap in prop::collection::vec(any::<bool>(), 8),
    ) {
        let selection = if random { Selection::Random } else { Selection::Maglev };
        let size = maglev::SIZES[0];
        let mut s = Syncer::with_config(Maps::default(), SyncConfig { selection, maglev_size: size });
        for (i, d) in states.iter().enumerate() {
            let r = s.apply(d);
            prop_assert!(r.errors.is_empty(), "{:?}", r.errors);
            let programmed: BTreeMap<_, _> = s.programmed().iter().map(|(k, p)| (*k, p.frontend.clone())).collect();
            prop_assert_eq!(&programmed, &d.frontends);
            prop_assert_eq!(maps_match_programmed(&s, size, selection, true), Ok(()));
            // Sometimes the grace period passes between two states, and
            // sometimes generations pile up (a frontend flips twice, an id
            // is reused): reaping never takes what is live.
            if reap[i] {
                s.reap_at(Instant::now() + RETIRE_GRACE);
                prop_assert_eq!(maps_match_programmed(&s, size, selection, false), Ok(()));
            }
        }
        s.reap_at(Instant::now() + RETIRE_GRACE);
        prop_assert_eq!(maps_match_programmed(&s, size, selection, false), Ok(()));
    }

    #[test]
    fn failed_map_writes_keep_previous_state_and_converge_after(
        states in prop::collection::vec(desired_state(), 1..8),
        fail in prop::collection::vec(prop::bool::weighted(0.05), 1..40),
    ) {
        let size = maglev::SIZES[0];
        let failing = Rc::new(RefCell::new(Vec::new()));
        let maps = Maps { fail: failing.clone(), ..Maps::default() };
        let mut s = Syncer::with_config(maps, SyncConfig { selection: Selection::Maglev, maglev_size: size });
        for d in &states {
            let before: BTreeMap<_, _> = s.programmed().iter().map(|(k, p)| (*k, p.frontend.clone())).collect();
            *failing.borrow_mut() = fail.clone();
            let r = s.apply(d);
            failing.borrow_mut().clear();
            prop_assert_eq!(maps_match_programmed(&s, size, Selection::Maglev, true), Ok(()));
            let failed: BTreeSet<String> = r.errors.iter().map(|e| e.frontend.clone()).collect();
            for (k, fe) in &d.frontends {
                let now = s.programmed().get(k).map(|p| &p.frontend);
                if now != Some(fe) {
                    // Only a frontend with a reported error may differ, and
                    // then it keeps what it had.
                    prop_assert!(!failed.is_empty(), "{:?} not programmed and no error reported", k);
                    prop_assert_eq!(now, before.get(k), "{:?}: neither desired nor previous", k);
                }
            }
            // Without failures the next sync converges.
            let r = s.apply(d);
            prop_assert!(r.errors.is_empty(), "{:?}", r.errors);
            let programmed: BTreeMap<_, _> = s.programmed().iter().map(|(k, p)| (*k, p.frontend.clone())).collect();
            prop_assert_eq!(&programmed, &d.frontends);
            prop_assert_eq!(maps_match_programmed(&s, size, Selection::Maglev, true), Ok(()));
        }
        s.reap_at(Instant::now() + RETIRE_GRACE);
        prop_assert_eq!(maps_match_programmed(&s, size, Selection::Maglev, false), Ok(()));
    }
}
