//! The desired state kept up to date incrementally.

use super::compute::{prepare_slice, service_frontends, Slice};
use super::conflicts::{conflict, Claim};
use super::*;

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

/// One claim on a frontend key, as the incremental state indexes it.
/// Ordered as the conflict rule: (namespace, name), then the claim's index
/// within its Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claimant {
    order: Arc<(String, String)>,
    index: u32,
    /// The claiming Service's [`object_key`].
    owner: Arc<str>,
}

/// What the incremental state keeps of one Service: the keys it claims,
/// not their frontends. A winning claim's frontend is in the desired state;
/// a losing one's is computed again when it comes to win.
#[derive(Debug)]
struct KeptService {
    /// (namespace, name): the conflict order. `None` for an unnamed Service.
    order: Option<Arc<(String, String)>>,
    /// The claimed keys in claim order, with what they are ("clusterIP",
    /// ...) for conflict messages.
    claims: Vec<(ServiceKey, &'static str)>,
    problems: Vec<Problem>,
}

/// What the incremental state knows about one slice.
#[derive(Debug)]
struct SliceEntry {
    /// The [`object_key`] of the Service it belongs to.
    owner: Option<String>,
    /// Problems of the slice on its own (label, address type, addresses).
    problems: Vec<Problem>,
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
    services: HashMap<Arc<str>, KeptService>,
    /// By the slice's [`object_key`].
    slices: HashMap<Arc<str>, SliceEntry>,
    /// A Service's [`object_key`] -> keys of its slices, sorted.
    by_owner: HashMap<String, Vec<Arc<str>>>,
    /// Every claim on a frontend key, in conflict order. The first wins.
    claims: BTreeMap<ServiceKey, Vec<Claimant>>,
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
            self.rebuild(services, slices);
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
                    affected.insert(owner);
                }
            }
            if let Some(&i) = t.slice_index.get(key) {
                let key: Arc<str> = key.as_str().into();
                let entry = slice_entry(&slices[i]);
                self.problems_changed |= !entry.problems.is_empty();
                if let Some(owner) = &entry.owner {
                    let keys = self.by_owner.entry(owner.clone()).or_default();
                    if let Err(pos) = keys.binary_search(&key) {
                        keys.insert(pos, key.clone());
                    }
                    affected.insert(owner.clone());
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
            let owner = self.claims[key][0].owner.clone();
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
        let mine: Vec<Slice> = svc
            .ns_name()
            .and_then(|owner| self.by_owner.get(&owner_key(&owner)))
            .into_iter()
            .flatten()
            .filter_map(|k| t.slice_index.get(&**k))
            .filter_map(|&i| prepare_slice(&slices[i], &mut |_, _| {}).map(|(_, s)| s))
            .collect();
        Some(service_frontends(svc, &mine, &self.node))
    }

    /// Recomputes everything from scratch. Services are visited in conflict
    /// order, so the first claim on a key wins as it is made and each
    /// Service's frontends are dropped (or moved into the desired state) as
    /// soon as it is done.
    fn rebuild(&mut self, services: &[ServiceRecord], slices: &[SliceRecord]) {
        *self = Incremental::new(self.node.clone());
        let mut by_service: HashMap<String, Vec<Slice>> = HashMap::new();
        for s in slices {
            let key: Arc<str> = s.key().into();
            let mut problems = BTreeSet::new();
            let prepared = prepare_slice(s, &mut |object, reason| {
                problems.insert(Problem { object, reason });
            });
            let owner = prepared.map(|(owner, slice)| {
                let owner = owner_key(&owner);
                by_service.entry(owner.clone()).or_default().push(slice);
                self.by_owner.entry(owner.clone()).or_default().push(key.clone());
                owner
            });
            self.slices.insert(
                key,
                SliceEntry {
                    owner,
                    problems: problems.into_iter().collect(),
                },
            );
        }
        for keys in self.by_owner.values_mut() {
            keys.sort();
            keys.dedup();
        }
        let mut ordered: Vec<(Option<(String, String)>, &ServiceRecord)> =
            services.iter().map(|s| (s.ns_name(), s)).collect();
        ordered.sort_by(|a, b| a.0.cmp(&b.0));
        for (order, svc) in ordered {
            let mine = order
                .as_ref()
                .and_then(|o| by_service.get(&owner_key(o)))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let result = service_frontends(svc, mine, &self.node);
            let owner: Arc<str> = svc.key().into();
            let order = result.order.map(Arc::new);
            let mut kept = Vec::with_capacity(result.claims.len());
            for (i, c) in result.claims.into_iter().enumerate() {
                kept.push((c.key, c.what));
                let Some(order) = &order else { continue };
                let claimants = self.claims.entry(c.key).or_default();
                match self.desired.frontends.get(&c.key) {
                    Some(winner) => self.conflicts.entry(c.key).or_default().push(conflict(
                        Some(order),
                        &c.key,
                        c.what,
                        &winner.service,
                    )),
                    None => {
                        self.desired.frontends.insert(c.key, c.frontend);
                    }
                }
                claimants.push(Claimant {
                    order: order.clone(),
                    index: i as u32,
                    owner: owner.clone(),
                });
            }
            self.services.insert(
                owner,
                KeptService {
                    order,
                    claims: kept,
                    problems: result.problems,
                },
            );
        }
        self.collect_problems();
    }

    /// Notes that `key`'s claims change in this round (first: who won it).
    fn touch(&self, key: ServiceKey, round: &mut Round) {
        if round.touched.insert(key) {
            let winner = self.claims.get(&key).and_then(|c| c.first()).map(|c| c.owner.clone());
            round.before.insert(key, winner);
        }
    }

    /// Forgets the Service `key`'s claims.
    fn release(&mut self, key: &str, round: &mut Round) {
        let Some((owner, old)) = self.services.remove_entry(key) else {
            return;
        };
        self.problems_changed |= !old.problems.is_empty();
        let Some(order) = old.order else { return };
        for (i, (k, _)) in old.claims.iter().enumerate() {
            self.touch(*k, round);
            if let Some(claimants) = self.claims.get_mut(k) {
                let gone = Claimant {
                    order: order.clone(),
                    index: i as u32,
                    owner: owner.clone(),
                };
                if let Ok(pos) = claimants.binary_search(&gone) {
                    claimants.remove(pos);
                }
                if claimants.is_empty() {
                    self.claims.remove(k);
                }
            }
        }
    }

    fn claim(&mut self, key: &str, result: ServiceFrontends, round: &mut Round) {
        let owner: Arc<str> = key.into();
        let order = result.order.map(Arc::new);
        if let Some(order) = &order {
            for (i, c) in result.claims.iter().enumerate() {
                self.touch(c.key, round);
                let claimants = self.claims.entry(c.key).or_default();
                let new = Claimant {
                    order: order.clone(),
                    index: i as u32,
                    owner: owner.clone(),
                };
                if let Err(pos) = claimants.binary_search(&new) {
                    claimants.insert(pos, new);
                }
            }
        }
        let claims = result.claims.iter().map(|c| (c.key, c.what)).collect();
        self.problems_changed |= !result.problems.is_empty();
        round.fresh.insert(owner.clone(), result.claims);
        self.services.insert(
            owner,
            KeptService {
                order,
                claims,
                problems: result.problems,
            },
        );
    }

    /// Sets the frontend of `key` to its first claim's, and reports the
    /// others. Returns false, changing nothing, when the winner's frontend
    /// is not at hand (see [`Incremental::update`]).
    fn resolve(&mut self, key: &ServiceKey, round: &Round) -> bool {
        let Some(claimants) = self.claims.get(key).filter(|c| !c.is_empty()) else {
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
                conflict(Some(&c.order), key, what, &winner)
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
            .flat_map(|s| &s.problems)
            .chain(self.services.values().flat_map(|s| &s.problems))
            .chain(self.conflicts.values().flatten())
            .cloned()
            .collect();
        self.desired.problems = all.into_iter().collect();
        self.problems_version = super::next_version();
    }
}

/// A slice's owner and own problems.
fn slice_entry(s: &SliceRecord) -> SliceEntry {
    let mut problems = BTreeSet::new();
    let owner = prepare_slice(s, &mut |object, reason| {
        problems.insert(Problem { object, reason });
    })
    .map(|(owner, _)| owner_key(&owner));
    SliceEntry {
        owner,
        problems: problems.into_iter().collect(),
    }
}
