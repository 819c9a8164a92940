//! The Kubernetes source: kube-rs watchers on v1 Service,
//! discovery.k8s.io/v1 EndpointSlice and this node's v1 Node.
//!
//! Each kind runs `kube::runtime::watcher` with its default backoff: it
//! lists, then watches from the list's resourceVersion, resumes from the
//! last seen resourceVersion (bookmarks included) when a connection drops,
//! and relists when the server answers 410 Gone. Errors never clear
//! anything: the maps keep serving the last programmed state while the
//! watcher retries.
//!
//! The lists are streaming lists where the server offers them (`watchList`,
//! on by default since Kubernetes 1.34): one watch request with
//! `sendInitialEvents=true` that delivers every object as an event, then a
//! bookmark that ends the list, and goes on as the watch. The objects
//! arrive as the server sends them, not in pages of 500 that each wait
//! for the previous one, and the server answers from its watch cache. A
//! server without the feature refuses the request (422 Invalid, or 400);
//! the watcher then lists in pages as before, for as long as the agent
//! runs, as client-go's reflector falls back.
//!
//! Each object is converted as it arrives into the record the model reads
//! (`model::ServiceRecord`, `model::SliceRecord`): the API object itself
//! is not kept. The records are kept in one [`Store`] per kind, a `Vec`
//! plus an index by namespace/name, rather than in kube's reflector
//! stores: the desired-state function takes the records as slices, and a
//! reflector store would have to be cloned into one on every sync (10,000
//! Services on every endpoint change). Watcher events update the `Vec` in
//! place instead; relists are applied atomically at `InitDone`, like the
//! reflector does.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use anyhow::Context;
use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{Keyed, Source, SourceCounters, View};
use crate::model::{self, ServiceRecord, SliceRecord, Tracked};

/// The objects of one kind, as a `Vec` the desired-state function can take
/// by reference, indexed by `namespace/name`.
#[derive(Debug)]
pub struct Store<K> {
    items: Vec<K>,
    index: HashMap<String, usize>,
    /// Objects of a list in progress (between `Init` and `InitDone`); the
    /// current items stay in use until the list is complete.
    pending: Option<Vec<K>>,
    /// Set once the first list completed.
    listed: bool,
    /// Completed lists so far.
    lists: u64,
    /// Keys of the objects added, modified or deleted since the last
    /// [`Store::take_changes`].
    changed: HashSet<String>,
    /// Set by a completed list: everything may have changed.
    all_changed: bool,
}

impl<K> Default for Store<K> {
    fn default() -> Self {
        Store {
            items: Vec::new(),
            index: HashMap::new(),
            pending: None,
            listed: false,
            lists: 0,
            changed: HashSet::new(),
            all_changed: true,
        }
    }
}

/// The desired state's key, so it can find objects by it.
fn key<K: Keyed>(obj: &K) -> String {
    obj.key()
}

impl<K: Keyed> Store<K> {
    pub fn items(&self) -> &[K] {
        &self.items
    }

    pub fn listed(&self) -> bool {
        self.listed
    }

    /// `namespace/name` -> position in [`Store::items`].
    pub fn index(&self) -> &HashMap<String, usize> {
        &self.index
    }

    /// The keys changed since the previous call, `None` when a list
    /// replaced everything meanwhile.
    pub fn changes(&self) -> Option<&HashSet<String>> {
        (!self.all_changed).then_some(&self.changed)
    }

    /// Forgets the changes: the caller has seen the current items.
    pub fn take_changes(&mut self) {
        self.changed.clear();
        self.all_changed = false;
    }

    /// Applies one watcher event. Returns true when the visible set changed
    /// (or may have), i.e. when a sync is worth running.
    pub fn apply(&mut self, event: watcher::Event<K>) -> bool {
        match event {
            watcher::Event::Init => {
                self.pending = Some(Vec::new());
                false
            }
            watcher::Event::InitApply(obj) => {
                self.pending.get_or_insert_with(Vec::new).push(obj);
                false
            }
            watcher::Event::InitDone => {
                let items = self.pending.take().unwrap_or_default();
                self.replace(items);
                self.listed = true;
                self.lists += 1;
                self.all_changed = true;
                self.changed.clear();
                true
            }
            watcher::Event::Apply(obj) => {
                if !self.all_changed {
                    self.changed.insert(key(&obj));
                }
                self.upsert(obj);
                true
            }
            watcher::Event::Delete(obj) => {
                let k = key(&obj);
                self.remove(&k);
                if !self.all_changed {
                    self.changed.insert(k);
                }
                true
            }
        }
    }

    /// Makes `items` (a complete list) the store's objects. The list's
    /// `Vec` becomes the store's own (no second copy of 10,000 objects at
    /// the peak); a key listed twice keeps its first position and its last
    /// object, as upserting each in turn would.
    fn replace(&mut self, mut items: Vec<K>) {
        // The old objects go first: they and the new ones are not both
        // held longer than needed.
        self.items = Vec::new();
        self.index = HashMap::with_capacity(items.len());
        let mut kept = 0;
        for i in 0..items.len() {
            let k = key(&items[i]);
            match self.index.get(&k) {
                // Slots from `kept` up to `i` hold discarded objects.
                Some(&first) => items.swap(first, i),
                None => {
                    self.index.insert(k, kept);
                    items.swap(kept, i);
                    kept += 1;
                }
            }
        }
        items.truncate(kept);
        self.items = items;
    }

    fn upsert(&mut self, obj: K) {
        let k = key(&obj);
        match self.index.get(&k) {
            Some(&i) => self.items[i] = obj,
            None => {
                self.index.insert(k, self.items.len());
                self.items.push(obj);
            }
        }
    }

    fn remove(&mut self, k: &str) {
        let Some(i) = self.index.remove(k) else { return };
        self.items.swap_remove(i);
        // The last item moved into slot i.
        if let Some(moved) = self.items.get(i) {
            self.index.insert(key(moved), i);
        }
    }
}

/// How the initial list (and every relist) is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListMode {
    /// A streaming list where the server offers it, else paged lists.
    Streaming,
    /// Paged lists (`limit`/`continue`) only.
    Paged,
}

/// Whether `e` is the server refusing a streaming list: it does not know
/// `sendInitialEvents` or has the WatchList feature off (422 Invalid from
/// the option validation; 400 from servers or proxies that reject unknown
/// parameters).
fn streaming_refused(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchStartFailed(kube::Error::Api(s)) => matches!(s.code, 400 | 422),
        _ => false,
    }
}

/// Everything the watchers write and the sync loop reads.
#[derive(Debug, Default)]
pub struct Cache {
    pub services: Store<ServiceRecord>,
    pub slices: Store<SliceRecord>,
    /// This node (a field selector on its name): for node IPs and topology
    /// once traffic policies use them.
    pub nodes: Store<Node>,
}

impl Cache {
    /// True once every kind has been listed completely.
    pub fn complete(&self) -> bool {
        self.services.listed() && self.slices.listed() && self.nodes.listed()
    }
}

#[derive(Debug, Default)]
struct Shared {
    cache: Mutex<Cache>,
    /// Woken on every change; a permit is stored when nobody waits, so no
    /// change is lost between two syncs.
    changed: Notify,
    watch_restarts: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Cache> {
        // A watcher task that panicked while holding the lock left a cache
        // that is still structurally sound (every update is a single Vec or
        // HashMap operation), so keep serving it.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Watches Services, EndpointSlices and this node's Node object.
pub struct KubeSource {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    node_name: String,
}

impl KubeSource {
    /// Connects with the in-cluster configuration or KUBECONFIG
    /// (`kube::Config::infer`) and starts the watchers.
    pub async fn connect(node_name: &str) -> anyhow::Result<Self> {
        let config = kube::Config::infer()
            .await
            .context("no Kubernetes configuration: not in a cluster and no usable KUBECONFIG")?;
        info!(api_server = %config.cluster_url, node = node_name, "connecting to the Kubernetes API");
        let client = Client::try_from(config).context("building the Kubernetes client")?;
        Ok(Self::start(client, node_name))
    }

    /// Starts the watchers on `client` with streaming lists where the
    /// server offers them. Must run inside a tokio runtime.
    pub fn start(client: Client, node_name: &str) -> Self {
        Self::start_with(client, node_name, ListMode::Streaming)
    }

    /// [`KubeSource::start`] with the list mode chosen.
    pub fn start_with(client: Client, node_name: &str, mode: ListMode) -> Self {
        let shared = Arc::new(Shared::default());
        let tasks = vec![
            // Objects of another proxy are not even sent (the model also
            // ignores them, for the file source).
            spawn_watcher(
                Api::<Service>::all(client.clone()),
                watcher::Config::default().labels(model::OURS_SELECTOR),
                shared.clone(),
                |c| &mut c.services,
                ServiceRecord::from,
                mode,
            ),
            spawn_watcher(
                Api::<EndpointSlice>::all(client.clone()),
                watcher::Config::default().labels(model::OURS_SELECTOR),
                shared.clone(),
                |c| &mut c.slices,
                SliceRecord::from,
                mode,
            ),
            spawn_watcher(
                Api::<Node>::all(client),
                watcher::Config::default().fields(&format!("metadata.name={node_name}")),
                shared.clone(),
                |c| &mut c.nodes,
                |mut n: Node| {
                    n.managed_fields_mut().clear();
                    n.annotations_mut().clear();
                    // Image lists run to hundreds of entries per node.
                    if let Some(st) = n.status.as_mut() {
                        st.images = None;
                    }
                    n
                },
                mode,
            ),
        ];
        KubeSource {
            shared,
            tasks,
            node_name: node_name.to_string(),
        }
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Runs `f` on the cache (tests and diagnostics).
    pub fn with_cache<R>(&self, f: impl FnOnce(&Cache) -> R) -> R {
        f(&self.shared.lock())
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The kind's name for logs: `Service`, `EndpointSlice`, `Node`.
fn kind_of<K: Resource<DynamicType = ()>>() -> String {
    K::kind(&()).into_owned()
}

/// A watcher event with its object converted to what the store keeps.
fn convert<K, T>(event: watcher::Event<K>, f: fn(K) -> T) -> watcher::Event<T> {
    match event {
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(k) => watcher::Event::InitApply(f(k)),
        watcher::Event::InitDone => watcher::Event::InitDone,
        watcher::Event::Apply(k) => watcher::Event::Apply(f(k)),
        watcher::Event::Delete(k) => watcher::Event::Delete(f(k)),
    }
}

fn spawn_watcher<K, T>(
    api: Api<K>,
    config: watcher::Config,
    shared: Arc<Shared>,
    store: fn(&mut Cache) -> &mut Store<T>,
    keep: fn(K) -> T,
    mode: ListMode,
) -> JoinHandle<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    T: Keyed + Send + 'static,
{
    tokio::spawn(async move {
        let kind = kind_of::<K>();
        let mut streaming = mode == ListMode::Streaming;
        loop {
            let config = match streaming {
                true => config.clone().streaming_lists(),
                false => config.clone(),
            };
            follow(&kind, &shared, store, keep, streaming, watcher(api.clone(), config)).await;
            if !streaming {
                break;
            }
            // The server refused the streaming list: list in pages from now on.
            info!(kind = %kind, "the API server does not serve streaming lists (watchList); listing in pages");
            streaming = false;
        }
        debug!(kind = %kind, "watcher ended");
    })
}

/// Applies `events` to the cache until the stream ends (it only does when
/// dropped) or, with `streaming` lists, the server refuses them.
async fn follow<K, T>(
    kind: &str,
    shared: &Shared,
    store: fn(&mut Cache) -> &mut Store<T>,
    keep: fn(K) -> T,
    streaming: bool,
    events: impl futures_util::Stream<Item = watcher::Result<watcher::Event<K>>>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    T: Keyed + Send + 'static,
{
    {
        // The default backoff (client-go's: 800 ms doubling to 30 s, with
        // jitter) paces retries after list and watch errors.
        let mut events = std::pin::pin!(events.default_backoff());
        // The stream only ends when the watcher is dropped; errors are items.
        while let Some(item) = events.next().await {
            match item {
                Ok(event) => {
                    let event = convert(event, keep);
                    let relist_done = matches!(event, watcher::Event::InitDone);
                    let notify = {
                        let mut cache = shared.lock();
                        let s = store(&mut cache);
                        let changed = s.apply(event);
                        if relist_done {
                            let (n, lists) = (s.items().len(), s.lists);
                            drop(cache);
                            if lists == 1 {
                                info!(kind = %kind, objects = n, "initial list complete");
                            } else {
                                info!(kind = %kind, objects = n, "relist complete");
                            }
                        }
                        changed
                    };
                    if notify {
                        shared.changed.notify_one();
                    }
                }
                Err(e) if streaming && streaming_refused(&e) => {
                    debug!(kind = %kind, error = %e, "streaming list refused");
                    return;
                }
                Err(e) => {
                    shared.watch_restarts.fetch_add(1, Ordering::Relaxed);
                    // 410 Gone is routine (the watch fell behind compaction):
                    // the watcher relists by itself.
                    let gone = matches!(&e, watcher::Error::WatchError(s) if s.code == 410);
                    if gone {
                        info!(kind = %kind, "watch expired (410 Gone); relisting, the maps keep their state meanwhile");
                    } else {
                        warn!(kind = %kind, error = %e, "watch failed; retrying with backoff, the maps keep their state meanwhile");
                    }
                }
            }
        }
    }
}

impl Source for KubeSource {
    async fn changed(&mut self) -> anyhow::Result<()> {
        tokio::select! {
            _ = self.shared.changed.notified() => Ok(()),
            // Watcher tasks loop forever; one that ends has panicked. Do not
            // keep serving a source that no longer follows the cluster
            // without saying so.
            (ended, i, _) = futures_util::future::select_all(self.tasks.iter_mut()) => {
                let kind = ["Service", "EndpointSlice", "Node"].get(i).copied().unwrap_or("?");
                anyhow::bail!("the {kind} watcher task ended unexpectedly: {ended:?}")
            }
        }
    }

    fn view<R>(&mut self, f: impl FnOnce(View<'_>) -> R) -> Option<R> {
        let mut cache = self.shared.lock();
        if !cache.complete() {
            return None;
        }
        let changed = cache.services.changes().zip(cache.slices.changes());
        let r = f(View {
            services: cache.services.items(),
            slices: cache.slices.items(),
            problems: &[],
            tracked: Some(Tracked {
                service_index: cache.services.index(),
                slice_index: cache.slices.index(),
                changed,
            }),
            node: cache.nodes.items().first(),
        });
        cache.services.take_changes();
        cache.slices.take_changes();
        Some(r)
    }

    fn counters(&self) -> SourceCounters {
        let cache = self.shared.lock();
        let relists = [cache.services.lists, cache.slices.lists, cache.nodes.lists]
            .iter()
            .map(|l| l.saturating_sub(1))
            .sum();
        SourceCounters {
            watch_restarts: self.shared.watch_restarts.load(Ordering::Relaxed),
            relists,
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn svc(name: &str, ip: &str) -> ServiceRecord {
        ServiceRecord::from(Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::ServiceSpec {
                cluster_ip: Some(ip.into()),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn vip(s: &ServiceRecord) -> String {
        s.spec.as_ref().unwrap().cluster_ips[0].text().into_owned()
    }

    fn names(s: &Store<ServiceRecord>) -> Vec<String> {
        let mut v: Vec<String> = s
            .items()
            .iter()
            .map(|o| o.name.as_deref().unwrap().to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn store_applies_and_deletes_in_place() {
        let mut s = Store::default();
        assert!(!s.apply(watcher::Event::Init));
        assert!(!s.apply(watcher::Event::InitApply(svc("a", "198.19.0.1"))));
        assert!(!s.listed(), "a list in progress is not a complete view");
        assert!(s.apply(watcher::Event::InitDone));
        assert!(s.listed());
        s.apply(watcher::Event::Apply(svc("b", "198.19.0.2")));
        s.apply(watcher::Event::Apply(svc("c", "198.19.0.3")));
        s.apply(watcher::Event::Apply(svc("a", "198.19.0.9")));
        assert_eq!(names(&s), ["a", "b", "c"]);
        // Deleting the first item moves the last one into its slot; the
        // index must follow or the next update of "c" would hit "b".
        s.apply(watcher::Event::Delete(svc("a", "")));
        s.apply(watcher::Event::Apply(svc("c", "198.19.0.33")));
        assert_eq!(names(&s), ["b", "c"]);
        let c = s.items().iter().find(|o| o.name.as_deref() == Some("c")).unwrap();
        assert_eq!(vip(c), "198.19.0.33");
        s.apply(watcher::Event::Delete(svc("zz", "")));
        assert_eq!(names(&s), ["b", "c"]);
    }

    #[test]
    fn relist_replaces_the_set_only_when_done() {
        let mut s = Store::default();
        s.apply(watcher::Event::Init);
        s.apply(watcher::Event::InitApply(svc("a", "198.19.0.1")));
        s.apply(watcher::Event::InitApply(svc("b", "198.19.0.2")));
        s.apply(watcher::Event::InitDone);
        // A relist after a 410: "a" was deleted meanwhile, "d" added.
        s.apply(watcher::Event::Init);
        s.apply(watcher::Event::InitApply(svc("b", "198.19.0.2")));
        assert_eq!(names(&s), ["a", "b"], "the old set stays until the relist is complete");
        s.apply(watcher::Event::InitApply(svc("d", "198.19.0.4")));
        s.apply(watcher::Event::InitDone);
        assert_eq!(names(&s), ["b", "d"]);
        assert_eq!(s.lists, 2);
    }

    #[test]
    fn a_key_listed_twice_keeps_its_first_slot_and_last_object() {
        let mut s = Store::default();
        s.apply(watcher::Event::Init);
        for (name, ip) in [("a", "1"), ("b", "2"), ("a", "3"), ("c", "4"), ("b", "5"), ("d", "6")] {
            s.apply(watcher::Event::InitApply(svc(name, ip)));
        }
        s.apply(watcher::Event::InitDone);
        let items: Vec<(String, String)> = s
            .items()
            .iter()
            .map(|o| (o.name.as_deref().unwrap().to_string(), vip(o)))
            .collect();
        let expect = [("a", "3"), ("b", "5"), ("c", "4"), ("d", "6")];
        assert_eq!(items, expect.map(|(n, ip)| (n.to_string(), ip.to_string())));
        for (i, o) in s.items().iter().enumerate() {
            assert_eq!(s.index()[&key(o)], i);
        }
        assert_eq!(s.index().len(), 4);
    }
}
