//! The desired state kept up to date incrementally.

use super::compute::{prepare_slice, service_frontends, Slice};
use super::conflicts::{conflict, Claim, What};
use super::*;
use std::collections::btree_map;

/// A source's objects with what changed since the previous
/// [`Incremental::update`].
#[derive(Clone, Copy, Debug)]
pub struct Tracked<'a> {
    /// [`object_key`] -> position in the Service slice.
    pub service_index: &'a HashMap<String, usize>,
    /// [`object_key`] -> position in the EndpointSlice slice.
    pub slice_index: &'a HashMap<String, usize>,
    /// Keys of the Services and EndpointSlices added, modified or deleted
    /// since the previous update; `None`: anything may have changed (first
    /// list, relist).
    pub changed: Option<(&'a HashSet<String>, &'a HashSet<String>)>,
}

/// A Service's [`object_key`], held once: the per-Service record, the
/// claims index and the slices' links to their Service share it, and the
/// conflict order is read from it (docs/performance.md, "100,000
/// Services": a copy per structure and a separate (namespace, name) pair
/// were part of what 93 MiB of peak RSS came from).
type Key = Arc<str>;

/// One claim on a frontend key, as the incremental state indexes it.
/// Ordered as the conflict rule: (namespace, name), then the claim's index
/// within its Service.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Claimant {
    /// The claiming Service's [`object_key`], `namespace/name`.
    owner: Key,
    /// The length of the namespace in `owner` (a namespace with a `/`,
    /// which no API server accepts, still orders as its own).
    ns_len: u32,
    index: u32,
}

impl Claimant {
    /// (namespace, name) of the claiming Service.
    fn ns_name(&self) -> (&str, &str) {
        let (ns, slash_name) = self.owner.split_at(self.ns_len as usize);
        (ns, &slash_name[1..])
    }
}

impl Ord for Claimant {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.ns_name(), self.index).cmp(&(other.ns_name(), other.index))
    }
}

impl PartialOrd for Claimant {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The claims on one frontend key, in conflict order: nearly always one,
/// held inline.
#[derive(Debug)]
enum Claimants {
    One(Claimant),
    /// Two or more, sorted.
    Many(Vec<Claimant>),
}

impl Claimants {
    fn as_slice(&self) -> &[Claimant] {
        match self {
            Claimants::One(c) => std::slice::from_ref(c),
            Claimants::Many(v) => v,
        }
    }

    /// Adds `c` in its place (once).
    fn insert(&mut self, c: Claimant) {
        match self {
            Claimants::One(first) if *first == c => {}
            Claimants::One(first) => {
                let mut v = vec![first.clone(), c];
                v.sort();
                *self = Claimants::Many(v);
            }
            Claimants::Many(v) => {
                if let Err(pos) = v.binary_search(&c) {
                    v.insert(pos, c);
                }
            }
        }
    }

    /// Removes `c` if present; true when no claim is left.
    fn remove(&mut self, c: &Claimant) -> bool {
        match self {
            Claimants::One(first) => first == c,
            Claimants::Many(v) => {
                if let Ok(pos) = v.binary_search(c) {
                    v.remove(pos);
                }
                if v.len() == 1 {
                    *self = Claimants::One(v.remove(0));
                }
                false
            }
        }
    }
}

/// What the incremental state keeps of one Service: the keys it claims,
/// not their frontends. A winning claim's frontend is in the desired state;
/// a losing one's is computed again when it comes to win.
#[derive(Debug)]
struct KeptService {
    /// The length of the namespace in its key; `None` for an unnamed
    /// Service (which claims nothing).
    ns_len: Option<u32>,
    /// The claimed keys in claim order, with what they are to the Service
    /// for conflict messages.
    claims: Box<[(ServiceKey, What)]>,
    problems: Box<[Problem]>,
}

/// What the incremental state knows about one slice.
#[derive(Debug)]
struct SliceEntry {
    /// The [`object_key`] of the Service it belongs to.
    owner: Option<Key>,
    /// Problems of the slice on its own (label, address type, addresses).
    problems: Box<[Problem]>,
}

/// The bookkeeping of one [`Incremental::update`].
#[derive(Default)]
struct Round {
    /// Keys whose claims changed.
    touched: BTreeSet<ServiceKey>,
    /// For each touched key, the Service that won it before this update.
    before: HashMap<ServiceKey, Option<Arc<str>>>,
    /// The claims, frontends included, of the Services computed in this
    /// update, by object key.
    fresh: HashMap<Arc<str>, Vec<Claim>>,
}

/// The desired state kept up to date incrementally: an update recomputes
/// only the Services whose Service object or slices changed, then resolves
/// the frontend keys they claimed or released with the same rule as
/// [`compute_for_node`] (the first Service in namespace/name order wins).
/// Its result is always equal to `compute_for_node` on the same objects,
/// given object keys are unique (as in a Kubernetes store).
///
/// Each frontend is held once, in the desired state: the claims index and
/// the per-Service records hold keys only (at 10,000 Services a second
/// copy of every frontend and a B-tree per key cost some 20 MB).
#[derive(Debug)]
pub struct Incremental {
    node: NodeInfo,
    /// By the Service's [`object_key`].
    services: HashMap<Key, KeptService>,
    /// By the slice's [`object_key`].
    slices: HashMap<Arc<str>, SliceEntry>,
    /// A Service's [`object_key`] -> keys of its slices, sorted.
    by_owner: HashMap<Key, Vec<Arc<str>>>,
    /// Every claim on a frontend key, in conflict order. The first wins.
    claims: BTreeMap<ServiceKey, Claimants>,
    /// The losing claims' problems, by key.
    conflicts: BTreeMap<ServiceKey, Vec<Problem>>,
    /// A problem appeared or went away in this update: the desired state's
    /// list is collected again (a walk of every Service and slice, which an
    /// update without one skips).
    problems_changed: bool,
    /// Set anew ([`super::next_version`]) whenever the problem list is
    /// collected.
    problems_version: u64,
    desired: Desired,
}

/// `namespace/name` of a Service, as [`object_key`] gives it.
fn owner_key((ns, name): &(String, String)) -> String {
    format!("{ns}/{name}")
}

impl Incremental {
    pub fn new(node: NodeInfo) -> Self {
        Incremental {
            node,
            services: HashMap::new(),
            slices: HashMap::new(),
            by_owner: HashMap::new(),
            claims: BTreeMap::new(),
            conflicts: BTreeMap::new(),
            problems_changed: false,
            problems_version: super::next_version(),
            desired: Desired::default(),
        }
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Differs from every earlier value (of any `Incremental`) whenever
    /// `desired().problems` may have changed: the sync loop diffs the
    /// problems it reports only then, not at every update (a cluster with
    /// tens of thousands of invalid objects would pay for a copy of them
    /// all at every change).
    pub fn problems_version(&self) -> u64 {
        self.problems_version
    }

    /// Brings the state up to date with `services` and `slices`. Returns
    /// the frontend keys whose entry may have changed, or `None` when
    /// everything was recomputed.
    pub fn update(
        &mut self,
        services: &[ServiceRecord],
        slices: &[SliceRecord],
        t: &Tracked<'_>,
    ) -> Option<BTreeSet<ServiceKey>> {
        let Some((changed_services, changed_slices)) = t.changed else {
            self.rebuild(services, slices, t);
            return None;
        };
        // Services to recompute, by object key.
        let mut affected: BTreeSet<String> = changed_services.iter().cloned().collect();
        for key in changed_slices {
            if let Some((key, old)) = self.slices.remove_entry(key.as_str()) {
                self.problems_changed |= !old.problems.is_empty();
                if let Some(owner) = old.owner {
                    if let Some(keys) = self.by_owner.get_mut(&owner) {
                        if let Ok(pos) = keys.binary_search(&key) {
                            keys.remove(pos);
                        }
                        if keys.is_empty() {
                            self.by_owner.remove(&owner);
                        }
                    }
                    affected.insert(owner.to_string());
                }
            }
            if let Some(&i) = t.slice_index.get(key) {
                let key: Arc<str> = key.as_str().into();
                let entry = self.slice_entry(&slices[i]);
                self.problems_changed |= !entry.problems.is_empty();
                if let Some(owner) = &entry.owner {
                    let keys = self.by_owner.entry(owner.clone()).or_default();
                    if let Err(pos) = keys.binary_search(&key) {
                        keys.insert(pos, key.clone());
                    }
                    affected.insert(owner.to_string());
                }
                self.slices.insert(key, entry);
            }
        }
        let mut round = Round::default();
        for key in &affected {
            self.release(key, &mut round);
            if let Some(result) = self.compute_service(key, services, slices, t) {
                self.claim(key, result, &mut round);
            }
        }
        // A key whose winner was not computed in this update and did not
        // win it before needs that Service's frontends: compute them (its
        // claims are the same, or it would have been recomputed).
        let mut pending = Vec::new();
        for key in &round.touched {
            if !self.resolve(key, &round) {
                pending.push(*key);
            }
        }
        for key in &pending {
            let owner = self.claims[key].as_slice()[0].owner.clone();
            if let std::collections::hash_map::Entry::Vacant(e) = round.fresh.entry(owner) {
                let result = self
                    .compute_service(e.key(), services, slices, t)
                    .expect("a claiming Service is in the store");
                e.insert(result.claims);
            }
            let resolved = self.resolve(key, &round);
            debug_assert!(resolved);
        }
        if std::mem::take(&mut self.problems_changed) {
            self.collect_problems();
        }
        Some(round.touched)
    }

    /// The shared copy of the Service key `key`: the one already held for
    /// the Service or its slices, else a new one.
    fn shared_key(&self, key: &str) -> Key {
        match self.services.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => match self.by_owner.get_key_value(key) {
                Some((k, _)) => k.clone(),
                None => key.into(),
            },
        }
    }

    /// The frontends the Service `key` asks for now (`None`: not in the
    /// store).
    fn compute_service(
        &self,
        key: &str,
        services: &[ServiceRecord],
        slices: &[SliceRecord],
        t: &Tracked<'_>,
    ) -> Option<ServiceFrontends> {
        let svc = &services[*t.service_index.get(key)?];
        Some(self.frontends_of(svc, slices, t))
    }

    /// The frontends `svc` asks for, from its slices as the index links
    /// them (each slice validated again here, and dropped with the result:
    /// nothing is held for every Service at once).
    fn frontends_of(&self, svc: &ServiceRecord, slices: &[SliceRecord], t: &Tracked<'_>) -> ServiceFrontends {
        frontends_of(&self.by_owner, &self.node, svc, slices, t)
    }

    /// Recomputes everything from scratch. Services are visited in conflict
    /// order, so the first claim on a key wins as it is made; each
    /// Service's slices are validated just before its frontends are
    /// computed, and its frontends dropped (or moved into the desired
    /// state) as soon as it is done.
    ///
    /// The per-object work (validating each slice, each Service's
    /// frontends) runs on the node's CPUs ([`map_in_order`]); this thread
    /// takes the results in the objects' order and does the bookkeeping,
    /// exactly as one thread doing both would (a cold start at 100,000
    /// Services spent 0.85-1.3 s here on one CPU while the other waited).
    fn rebuild(&mut self, services: &[ServiceRecord], slices: &[SliceRecord], t: &Tracked<'_>) {
        *self = Incremental::new(self.node.clone());
        map_in_order(
            slices,
            |s| {
                let mut problems = BTreeSet::new();
                let owner = prepare_slice(s, &mut |object, reason| {
                    problems.insert(Problem { object, reason });
                })
                .map(|(owner, _)| owner_key(&owner));
                (s.key(), owner, problems)
            },
            |(key, owner, problems)| {
                let key: Arc<str> = key.into();
                // The one copy of the owner's key (no Service is kept yet).
                let owner: Option<Key> = owner.map(|o| match self.by_owner.get_key_value(o.as_str()) {
                    Some((k, _)) => k.clone(),
                    None => o.into(),
                });
                if let Some(owner) = &owner {
                    self.by_owner.entry(owner.clone()).or_default().push(key.clone());
                }
                let entry = SliceEntry {
                    owner,
                    problems: problems.into_iter().collect(),
                };
                self.slices.insert(key, entry);
            },
        );
        for keys in self.by_owner.values_mut() {
            keys.sort();
            keys.dedup();
            keys.shrink_to_fit();
        }
        // In conflict order (namespace, name), without a copy of either.
        let mut ordered: Vec<&ServiceRecord> = services.iter().collect();
        ordered.sort_by(|a, b| conflict_order(a).cmp(&conflict_order(b)));
        // The workers read the slices' index while this thread adds the
        // Services (which it does not touch).
        let by_owner = std::mem::take(&mut self.by_owner);
        let node = self.node.clone();
        map_in_order(
            &ordered,
            |svc| (frontends_of(&by_owner, &node, svc, slices, t), svc.key()),
            |(result, key)| self.add_rebuilt(&by_owner, &key, result),
        );
        self.by_owner = by_owner;
        self.collect_problems();
    }

    /// Adds the Service `key` with its frontends `result` to the state
    /// being rebuilt (in conflict order: the first claim on a key wins).
    fn add_rebuilt(&mut self, by_owner: &HashMap<Key, Vec<Arc<str>>>, key: &str, result: ServiceFrontends) {
        let ServiceFrontends {
            order,
            claims,
            problems,
        } = result;
        // The shared copy of the key ([`Incremental::shared_key`], with the
        // slices' index held apart).
        let owner = match self.services.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => match by_owner.get_key_value(key) {
                Some((k, _)) => k.clone(),
                None => key.into(),
            },
        };
        let ns_len = order.as_ref().map(|(ns, _)| ns.len() as u32);
        let mut kept = Vec::with_capacity(claims.len());
        for (i, c) in claims.into_iter().enumerate() {
            kept.push((c.key, c.what));
            let (Some(ns_len), Some((ns, name))) = (ns_len, &order) else {
                continue;
            };
            match self.desired.frontends.get(&c.key) {
                Some(winner) => self.conflicts.entry(c.key).or_default().push(conflict(
                    Some((ns.as_str(), name.as_str())),
                    &c.key,
                    c.what,
                    &winner.service,
                )),
                None => {
                    self.desired.frontends.insert(c.key, c.frontend);
                }
            }
            let claimant = Claimant {
                owner: owner.clone(),
                ns_len,
                index: i as u32,
            };
            self.add_claimant(c.key, claimant);
        }
        self.services.insert(
            owner,
            KeptService {
                ns_len,
                claims: kept.into_boxed_slice(),
                problems: problems.into_boxed_slice(),
            },
        );
    }

    /// Adds `claimant` to the claims on `key`.
    fn add_claimant(&mut self, key: ServiceKey, claimant: Claimant) {
        match self.claims.entry(key) {
            btree_map::Entry::Vacant(e) => {
                e.insert(Claimants::One(claimant));
            }
            btree_map::Entry::Occupied(mut e) => e.get_mut().insert(claimant),
        }
    }

    /// Notes that `key`'s claims change in this round (first: who won it).
    fn touch(&self, key: ServiceKey, round: &mut Round) {
        if round.touched.insert(key) {
            let winner = self.claims.get(&key).map(|c| c.as_slice()[0].owner.clone());
            round.before.insert(key, winner);
        }
    }

    /// Forgets the Service `key`'s claims.
    fn release(&mut self, key: &str, round: &mut Round) {
        let Some((owner, old)) = self.services.remove_entry(key) else {
            return;
        };
        self.problems_changed |= !old.problems.is_empty();
        let Some(ns_len) = old.ns_len else { return };
        for (i, (k, _)) in old.claims.iter().enumerate() {
            self.touch(*k, round);
            let gone = Claimant {
                owner: owner.clone(),
                ns_len,
                index: i as u32,
            };
            if self.claims.get_mut(k).is_some_and(|c| c.remove(&gone)) {
                self.claims.remove(k);
            }
        }
    }

    fn claim(&mut self, key: &str, result: ServiceFrontends, round: &mut Round) {
        let owner = self.shared_key(key);
        let ns_len = result.order.as_ref().map(|(ns, _)| ns.len() as u32);
        if let Some(ns_len) = ns_len {
            for (i, c) in result.claims.iter().enumerate() {
                self.touch(c.key, round);
                let new = Claimant {
                    owner: owner.clone(),
                    ns_len,
                    index: i as u32,
                };
                self.add_claimant(c.key, new);
            }
        }
        let claims = result.claims.iter().map(|c| (c.key, c.what)).collect();
        self.problems_changed |= !result.problems.is_empty();
        round.fresh.insert(owner.clone(), result.claims);
        self.services.insert(
            owner,
            KeptService {
                ns_len,
                claims,
                problems: result.problems.into_boxed_slice(),
            },
        );
    }

    /// Sets the frontend of `key` to its first claim's, and reports the
    /// others. Returns false, changing nothing, when the winner's frontend
    /// is not at hand (see [`Incremental::update`]).
    fn resolve(&mut self, key: &ServiceKey, round: &Round) -> bool {
        let Some(claimants) = self.claims.get(key).map(Claimants::as_slice) else {
            self.desired.frontends.remove(key);
            self.problems_changed |= self.conflicts.remove(key).is_some();
            return true;
        };
        let w = &claimants[0];
        let frontend = match round.fresh.get(&w.owner) {
            Some(claims) => Some(claims[w.index as usize].frontend.clone()),
            // It won before and did not change: its frontend is in place.
            None if round.before.get(key).and_then(Option::as_ref) == Some(&w.owner) => None,
            None => return false,
        };
        let winner = match &frontend {
            Some(fe) => fe.service.clone(),
            None => self.desired.frontends[key].service.clone(),
        };
        let lost: Vec<Problem> = claimants[1..]
            .iter()
            .map(|c| {
                let what = self.services[&c.owner].claims[c.index as usize].1;
                conflict(Some(c.ns_name()), key, what, &winner)
            })
            .collect();
        if let Some(fe) = frontend {
            self.desired.frontends.insert(*key, fe);
        }
        let old = match lost.is_empty() {
            true => self.conflicts.remove(key),
            false => self.conflicts.insert(*key, lost),
        };
        self.problems_changed |= old.as_ref() != self.conflicts.get(key);
        true
    }

    fn collect_problems(&mut self) {
        let all: BTreeSet<Problem> = self
            .slices
            .values()
            .flat_map(|s| s.problems.iter())
            .chain(self.services.values().flat_map(|s| s.problems.iter()))
            .chain(self.conflicts.values().flatten())
            .cloned()
            .collect();
        self.desired.problems = all.into_iter().collect();
        self.problems_version = super::next_version();
    }

    /// A slice's owner (the shared key) and own problems.
    fn slice_entry(&self, s: &SliceRecord) -> SliceEntry {
        let mut problems = BTreeSet::new();
        let owner = prepare_slice(s, &mut |object, reason| {
            problems.insert(Problem { object, reason });
        })
        .map(|(owner, _)| self.shared_key(&owner_key(&owner)));
        SliceEntry {
            owner,
            problems: problems.into_iter().collect(),
        }
    }
}

/// The frontends `svc` asks for, from its slices as `by_owner` links them
/// (see [`Incremental::frontends_of`]).
fn frontends_of(
    by_owner: &HashMap<Key, Vec<Arc<str>>>,
    node: &NodeInfo,
    svc: &ServiceRecord,
    slices: &[SliceRecord],
    t: &Tracked<'_>,
) -> ServiceFrontends {
    let mine: Vec<Slice> = svc
        .ns_name()
        .and_then(|owner| by_owner.get(owner_key(&owner).as_str()))
        .into_iter()
        .flatten()
        .filter_map(|k| t.slice_index.get(&**k))
        .filter_map(|&i| prepare_slice(&slices[i], &mut |_, _| {}).map(|(_, s)| s))
        .collect();
    service_frontends(svc, &mine, node)
}

/// Objects per chunk [`map_in_order`] hands a thread (tests: a few, so
/// that small inputs go through several threads and chunks too).
const CHUNK: usize = if cfg!(test) { 3 } else { 512 };

/// Below this many objects [`map_in_order`] stays on the calling thread.
const PARALLEL_MIN: usize = if cfg!(test) { 1 } else { 4 * CHUNK };

/// Threads [`map_in_order`] computes on, at most.
const MAX_THREADS: usize = 4;

/// Calls `sink` with `f` of each of `items`, in the items' order, on this
/// thread, while `f` runs on a thread per CPU (at most [`MAX_THREADS`];
/// two at least in tests), a chunk of [`CHUNK`] items at a time and a few
/// chunks ahead of `sink`, no more (the results wait for `sink` in
/// memory).
fn map_in_order<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync, mut sink: impl FnMut(R)) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_THREADS);
    let threads = if cfg!(test) { threads.max(2) } else { threads };
    if threads < 2 || items.len() < PARALLEL_MIN {
        items.iter().map(&f).for_each(sink);
        return;
    }
    let chunks = items.len().div_ceil(CHUNK);
    let next = std::sync::atomic::AtomicUsize::new(0);
    // A worker blocks on a full channel: at most `2 * threads` chunks
    // are computed and not yet taken by `sink`, plus those waiting for an
    // earlier one.
    let (done, results) = std::sync::mpsc::sync_channel::<(usize, Vec<R>)>(2 * threads);
    let (f, next) = (&f, &next);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let done = done.clone();
            scope.spawn(move || loop {
                let c = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if c >= chunks {
                    return;
                }
                let part = &items[c * CHUNK..((c + 1) * CHUNK).min(items.len())];
                if done.send((c, part.iter().map(f).collect())).is_err() {
                    return;
                }
            });
        }
        drop(done);
        // Chunks finish out of order; each waits here for those before it.
        let mut early = BTreeMap::new();
        let mut want = 0;
        for (c, out) in results.iter() {
            early.insert(c, out);
            while let Some(out) = early.remove(&want) {
                out.into_iter().for_each(&mut sink);
                want += 1;
            }
        }
        // (A worker that panicked is raised when the scope ends.)
    });
}

/// (namespace, name) of `svc`, as [`ServiceRecord::ns_name`] orders it,
/// without the copies; `None` when unnamed.
fn conflict_order(svc: &ServiceRecord) -> Option<(&str, &str)> {
    Some((&svc.namespace, svc.name.as_deref()?))
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, sync::Mutex, time::Duration};

    use super::*;

    /// The rebuild's bookkeeping takes the per-object results in the
    /// objects' order however the threads finish: the first claim on a key
    /// wins, so an early result out of turn would pick another winner.
    #[test]
    fn map_in_order_hands_results_over_in_order_from_several_threads() {
        let items: Vec<usize> = (0..200).collect();
        let threads = Mutex::new(HashSet::new());
        let mut seen = Vec::new();
        map_in_order(
            &items,
            |i| {
                threads.lock().unwrap().insert(std::thread::current().id());
                // Even chunks are slow: the odd ones after them finish first.
                if (i / CHUNK).is_multiple_of(2) && i.is_multiple_of(CHUNK) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                i * 10
            },
            |r| seen.push(r),
        );
        assert_eq!(seen, items.iter().map(|i| i * 10).collect::<Vec<_>>());
        assert!(threads.into_inner().unwrap().len() >= 2, "computed on one thread only");
    }
}
