//! The Kubernetes source against the in-process fake API server
//! (`dataplane_tests::fake_api`): the real watchers, the agent's sync loop
//! and the real eBPF maps (loaded, attached nowhere). After every change
//! the maps must hold exactly the expected frontends and backends.
//!
//! The last test runs against a real cluster; it is ignored unless asked
//! for (see its doc comment).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use dataplane::{
    agent::{sync_loop, AgentState},
    bpf::loader::Dataplane,
    model::NodeInfo,
    reconcile::Syncer,
    source::kubernetes::KubeSource,
};
use dataplane_common::{IPPROTO_TCP, IPPROTO_UDP};
use dataplane_tests::{
    fake_api::{objects, FakeApi, Kind, Seen},
    mapview::{MapView, Programmed},
    netns::require_root_and_tools,
};
use tokio::{sync::oneshot, task::JoinHandle};

const NODE: &str = "node-1";
/// Covers the watcher's default backoff after two consecutive errors
/// (0.8 s then 1.6 s, each up to doubled by jitter) with room to spare.
const CONVERGE: Duration = Duration::from_secs(30);

const HTTP: &[(&str, u16, &str)] = &[("http", 80, "TCP")];
const HTTP_TARGET: &[(&str, u16, &str)] = &[("http", 8080, "TCP")];

/// The fake API, the loaded maps and the sync loop running on them.
struct Rig {
    fake: FakeApi,
    view: MapView,
    state: Arc<AgentState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dp: Dataplane,
}

impl Rig {
    /// Starts the fake with `setup`'s objects (and this node), then the
    /// source and the sync loop.
    async fn start(setup: impl FnOnce(&FakeApi)) -> Rig {
        require_root_and_tools();
        let fake = FakeApi::start().await.expect("fake API server");
        fake.apply(Kind::Node, objects::node(NODE, Ipv4Addr::new(198, 18, 0, 1)));
        setup(&fake);
        let mut dp = Dataplane::load(None).unwrap_or_else(|e| panic!("loading the eBPF object: {e}"));
        let maps = dp.take_maps().expect("maps");
        let view = MapView::of(&maps).expect("a second view of the maps");
        // Maps just created, as the agent tells its syncer: new
        // frontends go in batches (`reconcile/bulk.rs`), through the real
        // maps' batched writes.
        let mut syncer = Syncer::new(maps).with_fresh_maps();
        let mut source = KubeSource::start(fake.client(), NODE);
        let state = Arc::new(AgentState::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let st = state.clone();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            sync_loop(
                &mut source,
                &mut syncer,
                &NodeInfo::default(),
                &st,
                Duration::from_millis(2),
                None,
                shutdown,
            )
            .await
        });
        Rig {
            fake,
            view,
            state,
            stop: Some(stop),
            task: Some(task),
            _dp: dp,
        }
    }

    fn dump(&self) -> Programmed {
        let mut d = self.view.dump().unwrap_or_else(|e| panic!("reading the maps: {e}"));
        for b in d.values_mut() {
            b.sort();
        }
        d
    }

    /// Waits until the maps hold exactly `want`; fails with both states.
    async fn expect(&self, what: &str, want: &Programmed) {
        let start = Instant::now();
        loop {
            let have = self.dump();
            if &have == want {
                return;
            }
            if start.elapsed() > CONVERGE {
                panic!(
                    "{what}: the maps did not converge within {CONVERGE:?}\n want: {want:?}\n have: {have:?}\n counters: {:?}\n fake saw: {:?}",
                    self.state.counters(),
                    self.fake.seen()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the sync loop has applied more than `n` syncs.
    async fn wait_syncs_above(&self, n: u64) {
        let start = Instant::now();
        while self.state.counters().syncs <= n {
            assert!(start.elapsed() < CONVERGE, "no sync after sync {n}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let r = tokio::time::timeout(Duration::from_secs(5), self.task.take().unwrap())
            .await
            .expect("the sync loop stops on shutdown");
        r.expect("sync loop task").expect("sync loop result");
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

fn vip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 1, n)
}

fn be(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, n)
}

/// Builds an expected map state: (vip, port, proto, backends on a port).
fn want(entries: &[(Ipv4Addr, u16, u8, &[Ipv4Addr], u16)]) -> Programmed {
    with_other_ports(
        entries
            .iter()
            .map(|(v, p, proto, bs, bp)| {
                let mut b: Vec<(IpAddr, u16)> = bs.iter().map(|a| (IpAddr::V4(*a), *bp)).collect();
                b.sort();
                ((IpAddr::V4(*v), *p, *proto), b)
            })
            .collect(),
    )
}

/// `frontends` plus the entry each of their ClusterIPs has for the ports
/// its Service lacks (port 0, protocol 0, no backends).
fn with_other_ports(mut frontends: Programmed) -> Programmed {
    let vips: BTreeSet<IpAddr> = frontends.keys().map(|k| k.0).collect();
    frontends.extend(vips.into_iter().map(|v| ((v, 0, 0), Vec::new())));
    frontends
}

fn s(a: Ipv4Addr) -> String {
    a.to_string()
}

/// The lists of `kind` the fake served: list pages plus streaming lists.
fn listings(seen: &Seen, kind: &str) -> u64 {
    seen.lists.get(kind).copied().unwrap_or(0) + seen.initial_events.get(kind).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_streams_every_service() {
    let seen = initial_list_programs_every_service(true).await;
    // One streaming list per kind, and no list request at all.
    for kind in ["Service", "EndpointSlice", "Node"] {
        assert_eq!(seen.initial_events.get(kind), Some(&1), "{kind}: {seen:?}");
        assert_eq!(
            seen.watches[kind][0], "0",
            "{kind}: a streaming list from any state: {seen:?}"
        );
    }
    assert!(seen.lists.is_empty(), "{seen:?}");
    assert_eq!(seen.invalid, 0, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_falls_back_to_pages_without_watch_list() {
    let seen = initial_list_programs_every_service(false).await;
    // 600 of each: more than the watcher's page size (500), so the list
    // takes two pages, after the streaming list was refused once per kind.
    assert_eq!(seen.lists.get("Service"), Some(&2), "two pages of Services: {seen:?}");
    assert_eq!(seen.lists.get("EndpointSlice"), Some(&2), "{seen:?}");
    assert_eq!(seen.lists.get("Node"), Some(&1), "{seen:?}");
    assert_eq!(
        seen.invalid, 3,
        "one refused streaming list per kind, then none: {seen:?}"
    );
    assert!(seen.initial_events.is_empty(), "{seen:?}");
}

/// 600 Services and slices listed (streamed when `watch_list`, else in
/// pages), all programmed; what the fake saw.
async fn initial_list_programs_every_service(watch_list: bool) -> Seen {
    let n = 600u16;
    let rig = Rig::start(|f| {
        f.set_watch_list(watch_list);
        for i in 0..n {
            let v = Ipv4Addr::new(198, 19, 10 + (i / 250) as u8, (i % 250) as u8 + 1);
            let b = Ipv4Addr::new(198, 18, 10 + (i / 250) as u8, (i % 250) as u8 + 1);
            f.apply(Kind::Service, objects::service("bulk", &format!("s{i}"), &s(v), HTTP));
            f.apply(
                Kind::EndpointSlice,
                objects::slice("bulk", &format!("s{i}-x"), &format!("s{i}"), HTTP_TARGET, &[&s(b)]),
            );
        }
    })
    .await;
    let expected: Programmed = (0..n)
        .map(|i| {
            let v = Ipv4Addr::new(198, 19, 10 + (i / 250) as u8, (i % 250) as u8 + 1);
            let b = Ipv4Addr::new(198, 18, 10 + (i / 250) as u8, (i % 250) as u8 + 1);
            ((v.into(), 80, IPPROTO_TCP), vec![(b.into(), 8080)])
        })
        .collect();
    let expected = with_other_ports(expected);
    rig.expect("initial list", &expected).await;
    let seen = rig.fake.seen();
    // Like kube-proxy, objects of another proxy and headless slices are
    // not asked for (the API server filters them).
    // (kube-proxy: `labels.NewRequirement(..., selection.DoesNotExist, nil)`
    // for both, cmd/kube-proxy/app/server.go.)
    let requirements = |kind: &str| -> Vec<BTreeSet<&str>> {
        let sent = seen.label_selectors.get(kind).into_iter().flatten();
        sent.map(|s| s.split(',').filter(|r| !r.is_empty()).collect()).collect()
    };
    let ours = BTreeSet::from([
        "!service.kubernetes.io/headless",
        "!service.kubernetes.io/service-proxy-name",
    ]);
    assert_eq!(requirements("Service"), vec![ours.clone()], "{seen:?}");
    assert_eq!(requirements("EndpointSlice"), vec![ours], "{seen:?}");
    assert_eq!(requirements("Node"), [BTreeSet::new()], "{seen:?}");
    assert!(rig.state.is_ready());
    assert_eq!(rig.view.backend_slots(), n as usize, "one generation of slots only");
    assert_eq!(
        rig.state.counters().watch_restarts,
        0,
        "a refused streaming list is no error"
    );
    rig.stop().await;
    seen
}

/// One HTTP/1.1 GET; (status, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n");
    c.write_all(req.as_bytes()).await.expect("send");
    let mut text = String::new();
    c.read_to_string(&mut text).await.expect("receive");
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (
        code,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

/// kube-proxy's `/healthz` (proxy_health.go) answers 503 while this Node is
/// being deleted or tainted `ToBeDeletedByClusterAutoscaler`, so that load
/// balancers drain it; `/livez` ignores the Node. The Node changes arrive
/// through the watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_503_while_the_node_is_going_away() {
    let rig = Rig::start(|_| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(dataplane::http::health::serve(listener, rig.state.clone()));
    rig.wait_syncs_above(0).await;
    let expect = |path: &'static str, code: u16, why: &'static str| async move {
        let start = Instant::now();
        loop {
            let (have, body) = http_get(addr, path).await;
            if have == code {
                return body;
            }
            assert!(
                start.elapsed() < CONVERGE,
                "{why}: {path} answers {have}, not {code}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let body = expect("/healthz", 200, "a node in service").await;
    assert!(body.contains(r#""nodeEligible":true"#), "{body}");

    let node = objects::node(NODE, Ipv4Addr::new(198, 18, 0, 1));
    let mut tainted = node.clone();
    tainted["spec"] = serde_json::json!({"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1764925200", "effect": "NoSchedule"}]});
    rig.fake.apply(Kind::Node, tainted);
    let body = expect("/healthz", 503, "tainted by the autoscaler").await;
    assert!(body.contains(r#""nodeEligible":false"#), "{body}");
    expect("/livez", 200, "tainted by the autoscaler").await;

    rig.fake.apply(Kind::Node, node.clone());
    expect("/healthz", 200, "the taint removed").await;

    let mut deleting = node;
    deleting["metadata"]["deletionTimestamp"] = "2026-12-05T09:00:00Z".into();
    rig.fake.apply(Kind::Node, deleting);
    expect("/healthz", 503, "being deleted").await;
    expect("/livez", 200, "being deleted").await;
    server.abort();
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_and_slice_add_modify_delete_reach_the_maps() {
    let rig = Rig::start(|f| {
        f.apply(Kind::Service, objects::service("shop", "web", &s(vip(1)), HTTP));
        f.apply(
            Kind::EndpointSlice,
            objects::slice("shop", "web-1", "web", HTTP_TARGET, &[&s(be(2)), &s(be(3))]),
        );
        // No endpoints yet: programmed with zero backends (dropped and counted).
        f.apply(
            Kind::Service,
            objects::service("shop", "dns", &s(vip(2)), &[("dns", 53, "UDP")]),
        );
    })
    .await;
    rig.expect(
        "initial list",
        &want(&[
            (vip(1), 80, IPPROTO_TCP, &[be(2), be(3)], 8080),
            (vip(2), 53, IPPROTO_UDP, &[], 0),
        ]),
    )
    .await;

    // ADDED: a Service and its slice.
    rig.fake
        .apply(Kind::Service, objects::service("shop", "api", &s(vip(3)), HTTP));
    rig.fake.apply(
        Kind::EndpointSlice,
        objects::slice("shop", "api-1", "api", HTTP_TARGET, &[&s(be(7))]),
    );
    rig.expect(
        "service and slice added",
        &want(&[
            (vip(1), 80, IPPROTO_TCP, &[be(2), be(3)], 8080),
            (vip(2), 53, IPPROTO_UDP, &[], 0),
            (vip(3), 80, IPPROTO_TCP, &[be(7)], 8080),
        ]),
    )
    .await;

    // MODIFIED slice: one more endpoint.
    rig.fake.apply(
        Kind::EndpointSlice,
        objects::slice("shop", "web-1", "web", HTTP_TARGET, &[&s(be(2)), &s(be(3)), &s(be(4))]),
    );
    rig.expect(
        "slice modified",
        &want(&[
            (vip(1), 80, IPPROTO_TCP, &[be(2), be(3), be(4)], 8080),
            (vip(2), 53, IPPROTO_UDP, &[], 0),
            (vip(3), 80, IPPROTO_TCP, &[be(7)], 8080),
        ]),
    )
    .await;

    // MODIFIED Service: its port moves from 80 to 81.
    rig.fake.apply(
        Kind::Service,
        objects::service("shop", "web", &s(vip(1)), &[("http", 81, "TCP")]),
    );
    rig.expect(
        "service port changed",
        &want(&[
            (vip(1), 81, IPPROTO_TCP, &[be(2), be(3), be(4)], 8080),
            (vip(2), 53, IPPROTO_UDP, &[], 0),
            (vip(3), 80, IPPROTO_TCP, &[be(7)], 8080),
        ]),
    )
    .await;

    // DELETED slice: the Service stays, without backends.
    assert!(rig.fake.delete(Kind::EndpointSlice, "shop", "web-1"));
    rig.expect(
        "slice deleted",
        &want(&[
            (vip(1), 81, IPPROTO_TCP, &[], 0),
            (vip(2), 53, IPPROTO_UDP, &[], 0),
            (vip(3), 80, IPPROTO_TCP, &[be(7)], 8080),
        ]),
    )
    .await;

    // DELETED Service.
    assert!(rig.fake.delete(Kind::Service, "shop", "dns"));
    rig.expect(
        "service deleted",
        &want(&[
            (vip(1), 81, IPPROTO_TCP, &[], 0),
            (vip(3), 80, IPPROTO_TCP, &[be(7)], 8080),
        ]),
    )
    .await;
    // Slots of removed frontends and old generations are gone once their
    // grace period has passed (`RETIRE_GRACE`), with no further change:
    // the sync loop reaps them on its own.
    let start = Instant::now();
    while rig.view.backend_slots() != 1 {
        assert!(
            start.elapsed() < CONVERGE,
            "{} backend slots left after {CONVERGE:?}",
            rig.view.backend_slots()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmark_advances_the_resume_point() {
    let rig = Rig::start(|f| {
        f.apply(Kind::Service, objects::service("shop", "web", &s(vip(1)), HTTP));
        f.apply(
            Kind::EndpointSlice,
            objects::slice("shop", "web-1", "web", HTTP_TARGET, &[&s(be(2))]),
        );
    })
    .await;
    let initial = want(&[(vip(1), 80, IPPROTO_TCP, &[be(2)], 8080)]);
    rig.expect("initial list", &initial).await;
    rig.fake
        .wait_watches(Kind::Service, 1, CONVERGE)
        .await
        .expect("the Service watch started");

    // Changes to another kind move the resourceVersion past anything the
    // Service watch has seen; only a bookmark tells it so.
    rig.fake.apply(
        Kind::EndpointSlice,
        objects::slice("shop", "other-1", "other", HTTP_TARGET, &[&s(be(9))]),
    );
    let bookmark = rig.fake.bookmark();
    // The bookmark is written before the connection breaks (same channel,
    // in order), so the watcher has it when it resumes.
    rig.fake.drop_connections();
    rig.fake
        .wait_watches(Kind::Service, 2, CONVERGE)
        .await
        .expect("the Service watch resumed");
    let seen = rig.fake.seen();
    assert_eq!(
        seen.watches["Service"][1],
        bookmark.to_string(),
        "the Service watch must resume from the bookmark's resourceVersion: {seen:?}"
    );
    assert_eq!(seen.gone, 0);
    assert_eq!(listings(&seen, "Service"), 1, "a bookmark needs no relist: {seen:?}");
    // Nothing changed in the maps, and a change after the resume arrives.
    assert_eq!(rig.dump(), initial);
    rig.fake.apply(
        Kind::EndpointSlice,
        objects::slice("shop", "web-1", "web", HTTP_TARGET, &[&s(be(2)), &s(be(5))]),
    );
    rig.expect(
        "change after resume",
        &want(&[(vip(1), 80, IPPROTO_TCP, &[be(2), be(5)], 8080)]),
    )
    .await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_410_forces_a_relist_that_removes_and_adds() {
    gone_410_relists(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_410_forces_a_paged_relist_without_watch_list() {
    gone_410_relists(false).await;
}

/// A 410 relist (streamed when `watch_list`, else in pages) removes what
/// was deleted and adds what was created while the watch was down.
async fn gone_410_relists(watch_list: bool) {
    let rig = Rig::start(|f| {
        f.set_watch_list(watch_list);
        for (name, n) in [("a", 1), ("b", 2)] {
            f.apply(Kind::Service, objects::service("shop", name, &s(vip(n)), HTTP));
            f.apply(
                Kind::EndpointSlice,
                objects::slice("shop", &format!("{name}-1"), name, HTTP_TARGET, &[&s(be(n))]),
            );
        }
    })
    .await;
    rig.expect(
        "initial list",
        &want(&[
            (vip(1), 80, IPPROTO_TCP, &[be(1)], 8080),
            (vip(2), 80, IPPROTO_TCP, &[be(2)], 8080),
        ]),
    )
    .await;
    rig.fake
        .wait_watches(Kind::Service, 1, CONVERGE)
        .await
        .expect("watch started");
    let lists_before = listings(&rig.fake.seen(), "Service");

    // While the watch is down the history is compacted: "a" is deleted and
    // "c" added, and no watch can replay that; only a relist shows it.
    rig.fake.batch(|t| {
        t.expire();
        t.delete(Kind::Service, "shop", "a");
        t.delete(Kind::EndpointSlice, "shop", "a-1");
        t.apply(Kind::Service, objects::service("shop", "c", &s(vip(3)), HTTP));
        t.apply(
            Kind::EndpointSlice,
            objects::slice("shop", "c-1", "c", HTTP_TARGET, &[&s(be(3))]),
        );
        t.expire();
    });
    rig.expect(
        "after the relist",
        &want(&[
            (vip(2), 80, IPPROTO_TCP, &[be(2)], 8080),
            (vip(3), 80, IPPROTO_TCP, &[be(3)], 8080),
        ]),
    )
    .await;
    let seen = rig.fake.seen();
    assert!(seen.gone >= 2, "both watches got 410 Gone: {seen:?}");
    assert!(
        listings(&seen, "Service") > lists_before,
        "Services were relisted: {seen:?}"
    );
    let streamed = seen.initial_events.get("Service").copied().unwrap_or(0);
    match watch_list {
        true => assert!(streamed >= 2, "the relist streamed too: {seen:?}"),
        false => assert_eq!(streamed, 0, "{seen:?}"),
    }
    let c = rig.state.counters();
    assert!(c.relists >= 2, "relists counted: {c:?}");
    assert!(
        c.watch_restarts >= 2,
        "the dropped watches and the 410s are counted: {c:?}"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_resumes_and_converges_without_relist() {
    let rig = Rig::start(|f| {
        f.apply(Kind::Service, objects::service("shop", "web", &s(vip(1)), HTTP));
        f.apply(
            Kind::EndpointSlice,
            objects::slice("shop", "web-1", "web", HTTP_TARGET, &[&s(be(2))]),
        );
    })
    .await;
    rig.expect("initial list", &want(&[(vip(1), 80, IPPROTO_TCP, &[be(2)], 8080)]))
        .await;
    rig.fake
        .wait_watches(Kind::EndpointSlice, 1, CONVERGE)
        .await
        .expect("watch started");

    // Break the connections, then change things while the watchers back off:
    // they resume from their resourceVersion and get the changes replayed.
    rig.fake.batch(|t| {
        t.drop_connections();
        t.apply(
            Kind::EndpointSlice,
            objects::slice("shop", "web-1", "web", HTTP_TARGET, &[&s(be(2)), &s(be(3))]),
        );
        t.apply(Kind::Service, objects::service("shop", "api", &s(vip(4)), HTTP));
    });
    rig.expect(
        "after reconnecting",
        &want(&[
            (vip(1), 80, IPPROTO_TCP, &[be(2), be(3)], 8080),
            (vip(4), 80, IPPROTO_TCP, &[], 0),
        ]),
    )
    .await;
    let seen = rig.fake.seen();
    assert_eq!(seen.gone, 0);
    assert_eq!(listings(&seen, "Service"), 1, "resumed, not relisted: {seen:?}");
    assert_eq!(listings(&seen, "EndpointSlice"), 1, "{seen:?}");
    // kube-rs treats a watch body cut short as a resumable end, not an
    // error, so this is seen as a second watch request, not in the counters.
    assert!(seen.watches["EndpointSlice"].len() >= 2, "{seen:?}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_outage_keeps_the_maps_then_catches_up() {
    let rig = Rig::start(|f| {
        f.apply(Kind::Service, objects::service("shop", "web", &s(vip(1)), HTTP));
        f.apply(
            Kind::EndpointSlice,
            objects::slice("shop", "web-1", "web", HTTP_TARGET, &[&s(be(2))]),
        );
    })
    .await;
    let initial = want(&[(vip(1), 80, IPPROTO_TCP, &[be(2)], 8080)]);
    rig.expect("initial list", &initial).await;
    rig.fake
        .wait_watches(Kind::Service, 1, CONVERGE)
        .await
        .expect("watch started");

    rig.fake.set_unavailable(true);
    // Wait until the watchers hit the outage more than once (backoff).
    let start = Instant::now();
    while rig.fake.seen().unavailable < 4 {
        assert!(
            start.elapsed() < CONVERGE,
            "the watchers did not retry: {:?}",
            rig.fake.seen()
        );
        assert_eq!(rig.dump(), initial, "the maps must keep serving during the outage");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rig.dump(), initial);

    let syncs = rig.state.counters().syncs;
    rig.fake.set_unavailable(false);
    rig.fake.apply(
        Kind::EndpointSlice,
        objects::slice("shop", "web-1", "web", HTTP_TARGET, &[&s(be(6))]),
    );
    rig.expect("after the outage", &want(&[(vip(1), 80, IPPROTO_TCP, &[be(6)], 8080)]))
        .await;
    rig.wait_syncs_above(syncs).await;
    let c = rig.state.counters();
    assert!(c.watch_restarts >= 2, "{c:?}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_objects_are_skipped_without_disturbing_others() {
    let rig = Rig::start(|f| {
        f.apply(Kind::Service, objects::service("shop", "web", &s(vip(1)), HTTP));
        // One good endpoint, one invalid address.
        f.apply(
            Kind::EndpointSlice,
            objects::slice("shop", "web-1", "web", HTTP_TARGET, &[&s(be(2)), "198.18.1.999"]),
        );
        // A Service whose clusterIP is not an address.
        f.apply(Kind::Service, objects::service("shop", "broken", "198.19.1.300", HTTP));
        // A slice without the service-name label.
        let mut orphan = objects::slice("shop", "orphan-1", "x", HTTP_TARGET, &[&s(be(8))]);
        orphan["metadata"]["labels"] = serde_json::json!({});
        f.apply(Kind::EndpointSlice, orphan);
        f.apply(Kind::Service, objects::service("shop", "api", &s(vip(3)), HTTP));
        f.apply(
            Kind::EndpointSlice,
            objects::slice("shop", "api-1", "api", HTTP_TARGET, &[&s(be(3))]),
        );
    })
    .await;
    rig.expect(
        "bad parts skipped",
        &want(&[
            (vip(1), 80, IPPROTO_TCP, &[be(2)], 8080),
            (vip(3), 80, IPPROTO_TCP, &[be(3)], 8080),
        ]),
    )
    .await;
    let c = rig.state.counters();
    assert_eq!(
        c.skipped_objects, 3,
        "invalid endpoint, invalid clusterIP, unlabelled slice: {c:?}"
    );

    // A bad update to one slice leaves the other Service alone, and fixing
    // it takes effect.
    rig.fake.apply(
        Kind::EndpointSlice,
        objects::slice("shop", "api-1", "api", HTTP_TARGET, &[&s(be(3)), "not-an-ip"]),
    );
    rig.fake.apply(
        Kind::EndpointSlice,
        objects::slice("shop", "web-1", "web", HTTP_TARGET, &[&s(be(2)), &s(be(4))]),
    );
    rig.expect(
        "bad slice updated, good one fixed",
        &want(&[
            (vip(1), 80, IPPROTO_TCP, &[be(2), be(4)], 8080),
            (vip(3), 80, IPPROTO_TCP, &[be(3)], 8080),
        ]),
    )
    .await;
    rig.stop().await;
}

/// Runs the Kubernetes source against the cluster in `KUBECONFIG` (read
/// only: it lists and watches Services, EndpointSlices and Nodes) and
/// checks that the loaded maps converge to exactly the desired state
/// computed from a direct list of the same objects. Run it with
///
/// ```sh
/// KUBECONFIG=~/.kube/config NODE_NAME=<a node> \
///   cargo test -p dataplane-tests --test kube_source -- --ignored real_cluster
/// ```
///
/// as root (it loads the eBPF object; nothing is attached).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real cluster: set KUBECONFIG and run with --ignored (see the doc comment)"]
async fn real_cluster_when_kubeconfig_is_set() {
    use dataplane::model;
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use kube::{api::ListParams, Api};

    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG is not set: this test needs a real cluster and must not pass without one"
    );
    require_root_and_tools();
    let node = std::env::var("NODE_NAME").unwrap_or_else(|_| "dataplane-test-no-such-node".into());
    let client = kube::Client::try_default().await.expect("a client from KUBECONFIG");
    let mut dp = Dataplane::load(None).expect("eBPF object");
    let maps = dp.take_maps().unwrap();
    let view = MapView::of(&maps).unwrap();
    let mut syncer = Syncer::new(maps);
    let mut source = KubeSource::start(client.clone(), &node);
    let state = Arc::new(AgentState::default());
    let st = state.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        sync_loop(
            &mut source,
            &mut syncer,
            &NodeInfo::default(),
            &st,
            Duration::from_millis(2),
            None,
            shutdown,
        )
        .await
    });

    let start = Instant::now();
    let (mut have, mut want) = (Programmed::new(), Programmed::new());
    while start.elapsed() < Duration::from_secs(60) {
        let services = Api::<Service>::all(client.clone())
            .list(&ListParams::default())
            .await
            .unwrap();
        let slices = Api::<EndpointSlice>::all(client.clone())
            .list(&ListParams::default())
            .await
            .unwrap();
        let d = model::compute(&services.items, &slices.items);
        want = d
            .frontends
            .iter()
            .map(|(k, f)| {
                let mut b: Vec<_> = f.backends.iter().map(|b| (b.ip(), b.host_port())).collect();
                b.sort();
                ((k.ip(), k.host_port(), k.proto), b)
            })
            .collect();
        have = view.dump().unwrap();
        for b in have.values_mut() {
            b.sort();
        }
        if state.is_ready() && have == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(state.is_ready(), "no sync within 60 s: {:?}", state.counters());
    assert_eq!(have, want, "the maps do not match the cluster's Services");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
