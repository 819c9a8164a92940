//! The file source: a directory of Service and EndpointSlice manifests
//! (YAML or JSON, several documents per file allowed), re-read when a file
//! changes. It feeds the same desired-state function as the Kubernetes
//! source, so the agent runs and is tested without a cluster.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;
use tracing::warn;

pub use super::Objects;
use super::{
    watch::{Changes, DirWatch, Dirty},
    Keyed, Source, SourceCounters, View,
};
use crate::model::{Problem, ServiceRecord, SliceRecord, Tracked};

/// What identifies a version of a file without reading it: modification
/// time and length, plus the inode (a file replaced by a rename, as
/// editors and ConfigMap volume updates do) and the change time (a rewrite
/// that keeps the length and restores the mtime still moves the ctime).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    mtime: SystemTime,
    len: u64,
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

impl Fingerprint {
    fn of(m: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Fingerprint {
            mtime: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            len: m.len(),
            dev: m.dev(),
            ino: m.ino(),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// What the source keeps of one file: not its objects (they are in the
/// [`Kept`] stores, once), only the keys it defined, to know what a new
/// version or its removal may change.
struct CachedFile {
    fingerprint: Fingerprint,
    /// The number of the last scan that listed it.
    scan: u64,
    services: Box<[String]>,
    slices: Box<[String]>,
    nodes: Box<[String]>,
    problems: Vec<Problem>,
}

/// A file's path as the key of [`FileSource::files`]: hashed and compared
/// as bytes (a poll looks every file up; `Path`'s own comparison parses
/// both paths into components, a third of a poll's time at 10,000 files).
#[derive(Debug)]
struct FileKey(Arc<Path>);

impl PartialEq for FileKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_os_str() == other.0.as_os_str()
    }
}

impl Eq for FileKey {}

impl std::hash::Hash for FileKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.as_os_str().hash(state)
    }
}

impl std::borrow::Borrow<std::ffi::OsStr> for FileKey {
    fn borrow(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

/// Where a definition comes from: its file and its position among the
/// file's objects of its kind. The smallest wins (the first file in path
/// order, then the first document).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Origin {
    file: Arc<Path>,
    seq: u32,
}

/// The objects of one kind: the winning definition of every key, as a
/// `Vec` the desired-state function takes by reference, indexed by
/// [`crate::model::object_key`] like the Kubernetes source's stores, plus the
/// definitions other files (or the same file) also gave for a key
/// (duplicates: rare, reported as problems).
struct Kept<K> {
    items: Vec<K>,
    /// Key -> position in `items`.
    index: HashMap<String, usize>,
    /// Parallel to `items`: where each winning object was defined.
    from: Vec<Origin>,
    /// Key -> the losing definitions, in precedence order.
    shadowed: HashMap<String, Vec<(Origin, K)>>,
    /// Keys whose winning object was added, changed or removed since the
    /// last view.
    changed: HashSet<String>,
}

impl<K> Default for Kept<K> {
    fn default() -> Self {
        Kept {
            items: Vec::new(),
            index: HashMap::new(),
            from: Vec::new(),
            shadowed: HashMap::new(),
            changed: HashSet::new(),
        }
    }
}

impl<K: PartialEq + Keyed> Kept<K> {
    /// Brings the key `key` up to date after the files in `dropped` lost
    /// their definitions (removed or re-read) and `fresh` came from the
    /// files re-read (in file order). Returns whether it had or has
    /// duplicate definitions (the problems list must be rebuilt).
    fn settle(&mut self, key: &str, dropped: &HashSet<Arc<Path>>, fresh: Vec<(Origin, K)>) -> bool {
        let mut losers: Vec<(Origin, K)> = self.shadowed.remove(key).unwrap_or_default();
        let had_duplicates = !losers.is_empty();
        losers.retain(|(o, _)| !dropped.contains(&o.file));
        losers.extend(fresh);
        losers.sort_by(|a, b| a.0.cmp(&b.0));
        let pos = self.index.get(key).copied();
        match pos {
            // The winner stays unless an earlier definition came.
            Some(i) if !dropped.contains(&self.from[i].file) => {
                if losers.first().is_some_and(|(o, _)| *o < self.from[i]) {
                    let (origin, obj) = losers.remove(0);
                    let old_origin = std::mem::replace(&mut self.from[i], origin);
                    let old = std::mem::replace(&mut self.items[i], obj);
                    if old != self.items[i] {
                        self.changed.insert(key.to_string());
                    }
                    let at = losers.partition_point(|(o, _)| *o < old_origin);
                    losers.insert(at, (old_origin, old));
                }
            }
            // The winner's file lost its definitions: the first remaining
            // one, if any, takes its place.
            Some(i) => {
                if losers.is_empty() {
                    self.index.remove(key);
                    self.items.swap_remove(i);
                    self.from.swap_remove(i);
                    if let Some(moved) = self.items.get(i) {
                        // The last item moved into slot i.
                        self.index.insert(moved.key(), i);
                    }
                    self.changed.insert(key.to_string());
                } else {
                    let (origin, obj) = losers.remove(0);
                    self.from[i] = origin;
                    if std::mem::replace(&mut self.items[i], obj) != self.items[i] {
                        self.changed.insert(key.to_string());
                    }
                }
            }
            None => {
                if !losers.is_empty() {
                    let (origin, obj) = losers.remove(0);
                    self.index.insert(key.to_string(), self.items.len());
                    self.items.push(obj);
                    self.from.push(origin);
                    self.changed.insert(key.to_string());
                }
            }
        }
        let has_duplicates = !losers.is_empty();
        if has_duplicates {
            self.shadowed.insert(key.to_string(), losers);
        }
        had_duplicates || has_duplicates
    }
}

/// One kind's part of a poll: the keys the changed files defined before
/// and define now, and the objects they define now.
struct KindChanges<K> {
    affected: HashSet<String>,
    fresh: HashMap<String, Vec<(Origin, K)>>,
}

impl<K> Default for KindChanges<K> {
    fn default() -> Self {
        KindChanges {
            affected: HashSet::new(),
            fresh: HashMap::new(),
        }
    }
}

impl<K: Keyed> KindChanges<K> {
    /// Takes a re-read file's objects of this kind; returns their keys.
    fn add(&mut self, file: &Arc<Path>, objects: Vec<K>) -> Box<[String]> {
        let mut keys = Vec::with_capacity(objects.len());
        for (seq, obj) in objects.into_iter().enumerate() {
            let key = obj.key();
            let origin = Origin {
                file: file.clone(),
                seq: seq as u32,
            };
            self.fresh.entry(key.clone()).or_default().push((origin, obj));
            self.affected.insert(key.clone());
            keys.push(key);
        }
        keys.into()
    }

    /// Applies the changes to `kept`; returns whether duplicates were
    /// involved.
    fn apply(mut self, kept: &mut Kept<K>, dropped: &HashSet<Arc<Path>>) -> bool
    where
        K: PartialEq,
    {
        let mut duplicates = false;
        for key in &self.affected {
            let fresh = self.fresh.remove(key).unwrap_or_default();
            duplicates |= kept.settle(key, dropped, fresh);
        }
        duplicates
    }
}

/// A directory of manifests.
///
/// Each poll re-reads the files whose [`Fingerprint`] changed and settles
/// only the keys those files defined before or define now, comparing each
/// key's winning object with the previous one: the keys whose object
/// changed are reported through [`model::Tracked`], so the sync recomputes
/// only the Services they touch, as with the Kubernetes source.
pub struct FileSource {
    dir: PathBuf,
    files: HashMap<FileKey, CachedFile>,
    /// What the model reads of each object (see `model::ServiceRecord`).
    services: Kept<ServiceRecord>,
    slices: Kept<SliceRecord>,
    nodes: Kept<Node>,
    /// The files' problems and the duplicate definitions.
    problems: Vec<Problem>,
    /// Set once the first scan happened, so the first poll always reports.
    scanned: bool,
    /// Scans so far.
    scans: u64,
    /// Set until a view saw the whole state (the first poll): the sync
    /// recomputes everything.
    all_changed: bool,
    /// Change detection by inotify; `None`: every poll is a full scan.
    watch: Option<DirWatch>,
    counts: ScanCounts,
}

/// How often the source looked at the whole directory and how often only
/// at the paths inotify named (scans that completed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanCounts {
    /// Every file listed and stat'ed: the first poll, each poll without
    /// inotify, after lost events or a replaced directory, the periodic
    /// rescan.
    pub full: u64,
    /// Only the paths events named.
    pub targeted: u64,
}

pub(super) fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    !hidden && matches!(ext, "yaml" | "yml" | "json")
}

/// Lists manifest files under `dir`, recursively, skipping hidden entries
/// (ConfigMap volumes keep their data under `..data`), with their
/// fingerprints: one `stat` per file, relative to its directory where the
/// entry is a regular file. `on_dir` sees each directory before it is
/// read (the inotify watch is added there, so that nothing created during
/// the listing goes unseen).
fn list(dir: &Path, out: &mut Vec<(PathBuf, Fingerprint)>, on_dir: &mut dyn FnMut(&Path)) -> std::io::Result<()> {
    on_dir(dir);
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let hidden = name.to_str().is_none_or(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        // Symlinks are followed, as ConfigMap volumes need.
        let meta = match entry.file_type() {
            Ok(t) if t.is_file() => entry.metadata(),
            _ => fs::metadata(entry.path()),
        };
        match meta {
            Ok(m) if m.is_dir() => list(&entry.path(), out, on_dir)?,
            Ok(m) if m.is_file() => {
                let path = entry.path();
                if is_manifest(&path) {
                    out.push((path, Fingerprint::of(&m)));
                }
            }
            // Vanished since the listing, or a dangling link.
            _ => {}
        }
    }
    Ok(())
}

/// The records of parsed objects (the objects themselves are not kept).
fn keep<K, R: From<K>>(objects: Vec<K>) -> Vec<R> {
    objects.into_iter().map(R::from).collect()
}

/// Parses one file's documents. A syntax error fails the whole file (it may
/// be half written); a document that is valid YAML but not a valid object is
/// skipped with a problem naming it.
pub fn parse_manifests(name: &str, text: &str) -> Result<(Objects, Vec<Problem>), String> {
    let mut objects = Objects::default();
    let mut problems = Vec::new();
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let value = serde_yaml_ng::Value::deserialize(doc).map_err(|e| format!("{name}: {e}"))?;
        docs.push(value);
    }
    for (i, value) in docs.into_iter().enumerate() {
        add_object(name, i + 1, value, &mut objects, &mut problems);
    }
    Ok((objects, problems))
}

fn add_object(file: &str, doc: usize, value: serde_yaml_ng::Value, objects: &mut Objects, problems: &mut Vec<Problem>) {
    if value.is_null() {
        return; // empty document
    }
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>")
        .to_string();
    let object = format!("{file} document {doc} ({kind} {name})");
    match kind.as_str() {
        "Service" => match serde_yaml_ng::from_value::<Service>(value) {
            Ok(s) => objects.services.push(s),
            Err(e) => problems.push(Problem {
                object,
                reason: format!("not a valid Service: {e}; skipped"),
            }),
        },
        "EndpointSlice" => match serde_yaml_ng::from_value::<EndpointSlice>(value) {
            Ok(s) => objects.slices.push(s),
            Err(e) => problems.push(Problem {
                object,
                reason: format!("not a valid EndpointSlice: {e}; skipped"),
            }),
        },
        // The node the agent runs on, described by the directory (its
        // labels: the topology zone; its deletion state: /healthz).
        "Node" => match serde_yaml_ng::from_value::<Node>(value) {
            Ok(n) => objects.nodes.push(n),
            Err(e) => problems.push(Problem {
                object,
                reason: format!("not a valid Node: {e}; skipped"),
            }),
        },
        "List" | "ServiceList" | "EndpointSliceList" => {
            if let Some(serde_yaml_ng::Value::Sequence(items)) = value.get("items").cloned() {
                for item in items {
                    add_object(file, doc, item, objects, problems);
                }
            }
        }
        "" => problems.push(Problem {
            object,
            reason: "no kind; skipped".into(),
        }),
        // Other kinds (Deployments, ...) may share the directory.
        _ => {}
    }
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileSource {
            dir: dir.into(),
            files: HashMap::new(),
            services: Kept::default(),
            slices: Kept::default(),
            nodes: Kept::default(),
            problems: Vec::new(),
            scanned: false,
            scans: 0,
            all_changed: true,
            watch: None,
            counts: ScanCounts::default(),
        }
    }

    /// A source whose polls look only at the paths inotify reports changed
    /// (after a first full scan), or, when inotify cannot be set up (its
    /// limits: the warning names the sysctl), one that scans the whole
    /// directory on every poll.
    pub fn watched(dir: impl Into<PathBuf>) -> Self {
        let mut source = FileSource::new(dir);
        match DirWatch::new(&source.dir) {
            Ok(w) => source.watch = Some(w),
            Err(e) => warn!(
                "{e}; falling back to polling {}: every poll stats every file",
                source.dir.display()
            ),
        }
        source
    }

    /// Whether inotify watches the directory (else each poll is a full
    /// scan).
    pub fn watching(&self) -> bool {
        self.watch.is_some()
    }

    /// The inotify descriptor, readable when events are queued.
    pub fn watch_fd(&self) -> Option<&std::os::fd::OwnedFd> {
        self.watch.as_ref().map(|w| w.fd())
    }

    /// Whether the next poll is a full scan although inotify watches (lost
    /// events, the directory replaced or missing): it is retried at the
    /// poll interval, with no event to wait for.
    pub fn rescan_pending(&self) -> bool {
        self.watch.as_ref().is_some_and(|w| w.rescan_pending())
    }

    pub fn scan_counts(&self) -> ScanCounts {
        self.counts
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads changed files. Returns false when no file changed since
    /// the last call (the first call always returns true). A file that
    /// cannot be read or parsed keeps its previous objects (a half-written
    /// file must not delete Services), with a problem saying so.
    ///
    /// With inotify ([`FileSource::watched`]) only the paths its events
    /// named are looked at (none: no system call beyond reading the
    /// events), else every file is stat'ed.
    pub fn poll(&mut self) -> Result<bool, String> {
        let scope = match self.watch.as_mut() {
            Some(w) if self.scanned => match w.take() {
                Changes::Rescan => None,
                Changes::Paths(d) if d.is_empty() => return Ok(false),
                Changes::Paths(d) => Some(d),
            },
            _ => None,
        };
        self.scan(scope)
    }

    /// Looks at every file, whatever inotify said (the periodic safety
    /// net: changes inotify cannot see, such as files symlinked from
    /// outside the directory).
    pub fn rescan(&mut self) -> Result<bool, String> {
        self.scan(None)
    }

    /// Lists the files in `scope` (`None`: all) with their fingerprints,
    /// keeping inotify's watches on the directories listed.
    fn list_scope(&mut self, scope: Option<&Dirty>) -> Result<Vec<(PathBuf, Fingerprint)>, String> {
        let mut listing = Vec::new();
        let mut watch = self.watch.take();
        let before = match (scope, watch.as_mut()) {
            (None, Some(w)) => Some(w.begin_full()),
            _ => None,
        };
        let listed = {
            let mut on_dir = |d: &Path| {
                if let Some(w) = watch.as_mut() {
                    w.watch(d);
                }
            };
            match scope {
                None => {
                    listing.reserve(self.files.len());
                    list(&self.dir, &mut listing, &mut on_dir)
                }
                Some(dirty) => {
                    for path in &dirty.files {
                        match fs::metadata(path) {
                            Ok(m) if m.is_file() => listing.push((path.clone(), Fingerprint::of(&m))),
                            _ => {}
                        }
                    }
                    let mut r = Ok(());
                    for tree in &dirty.trees {
                        match fs::metadata(tree) {
                            Ok(m) if m.is_dir() => match list(tree, &mut listing, &mut on_dir) {
                                // Gone meanwhile: its removal has its own
                                // event.
                                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                                other => r = r.and(other),
                            },
                            Ok(m) if m.is_file() && is_manifest(tree) => {
                                listing.push((tree.clone(), Fingerprint::of(&m)));
                            }
                            _ => {}
                        }
                    }
                    r
                }
            }
        };
        if let Some(w) = watch.as_mut() {
            match before {
                Some(before) => w.end_full(before, listed.is_ok()),
                None if listed.is_err() => w.force_rescan(),
                None => {}
            }
            if let Some(e) = w.take_failure() {
                warn!(
                    "{e}; falling back to polling {}: every poll stats every file",
                    self.dir.display()
                );
                watch = None;
            }
        }
        self.watch = watch;
        listed.map_err(|e| format!("reading directory {}: {e}", self.dir.display()))?;
        Ok(listing)
    }

    fn scan(&mut self, scope: Option<Dirty>) -> Result<bool, String> {
        let listing = self.list_scope(scope.as_ref())?;
        match scope {
            None => self.counts.full += 1,
            Some(_) => self.counts.targeted += 1,
        }

        let mut changed = !self.scanned;
        let mut problems_changed = !self.scanned;
        // Files whose previous definitions no longer count (re-read or
        // removed), and what the re-read ones define now.
        let mut dropped: HashSet<Arc<Path>> = HashSet::new();
        let mut services = KindChanges::<ServiceRecord>::default();
        let mut slices = KindChanges::<SliceRecord>::default();
        let mut nodes = KindChanges::<Node>::default();
        // Files seen in this scan are marked with its number; the others
        // were removed.
        self.scans += 1;
        let scan = self.scans;
        let mut seen = 0;
        for (path, fp) in listing {
            seen += 1;
            // An unchanged file stays as it is (a poll runs every 100 ms
            // by default).
            let (file, old) = match self.files.get_mut(path.as_os_str()) {
                Some(unchanged) if unchanged.fingerprint == fp => {
                    unchanged.scan = scan;
                    continue;
                }
                Some(_) => {
                    let (file, old) = self.files.remove_entry(path.as_os_str()).expect("just found");
                    (file.0, Some(old))
                }
                None => (Arc::from(path.as_path()), None),
            };
            changed = true;
            let name = self.name(&file);
            let parsed = fs::read_to_string(&file)
                .map_err(|e| format!("{name}: {e}"))
                .and_then(|t| parse_manifests(&name, &t));
            let cached = match parsed {
                Ok((objects, problems)) => {
                    if let Some(old) = &old {
                        dropped.insert(file.clone());
                        services.affected.extend(old.services.iter().cloned());
                        slices.affected.extend(old.slices.iter().cloned());
                        nodes.affected.extend(old.nodes.iter().cloned());
                        problems_changed |= !old.problems.is_empty();
                    }
                    problems_changed |= !problems.is_empty();
                    CachedFile {
                        fingerprint: fp,
                        scan,
                        services: services.add(&file, keep(objects.services)),
                        slices: slices.add(&file, keep(objects.slices)),
                        nodes: nodes.add(&file, objects.nodes),
                        problems,
                    }
                }
                Err(e) => {
                    // Keep the last good objects until the file changes again.
                    problems_changed = true;
                    let problems = vec![Problem {
                        object: name.clone(),
                        reason: format!("cannot be parsed ({e}); keeping its previous objects"),
                    }];
                    match old {
                        Some(old) => CachedFile {
                            fingerprint: fp,
                            scan,
                            problems,
                            ..old
                        },
                        None => CachedFile {
                            fingerprint: fp,
                            scan,
                            services: Box::default(),
                            slices: Box::default(),
                            nodes: Box::default(),
                            problems,
                        },
                    }
                }
            };
            self.files.insert(FileKey(file), cached);
        }
        let removed: Vec<Arc<Path>> = match &scope {
            // Some were removed.
            None if seen < self.files.len() => (self.files.iter())
                .filter(|(_, f)| f.scan != scan)
                .map(|(p, _)| p.0.clone())
                .collect(),
            None => Vec::new(),
            // The files named and those under the directories named that
            // this scan did not find.
            Some(dirty) => {
                let mut gone: HashSet<Arc<Path>> = (dirty.files.iter())
                    .filter_map(|f| self.files.get_key_value(f.as_os_str()))
                    .filter(|(_, f)| f.scan != scan)
                    .map(|(p, _)| p.0.clone())
                    .collect();
                if !dirty.trees.is_empty() {
                    gone.extend(
                        (self.files.iter())
                            .filter(|(p, f)| f.scan != scan && dirty.trees.iter().any(|t| p.0.starts_with(t)))
                            .map(|(p, _)| p.0.clone()),
                    );
                }
                gone.into_iter().collect()
            }
        };
        {
            for file in removed {
                let old = self.files.remove(file.as_os_str()).expect("just found");
                changed = true;
                services.affected.extend(old.services.into_vec());
                slices.affected.extend(old.slices.into_vec());
                nodes.affected.extend(old.nodes.into_vec());
                problems_changed |= !old.problems.is_empty();
                dropped.insert(file);
            }
        }
        problems_changed |= services.apply(&mut self.services, &dropped);
        problems_changed |= slices.apply(&mut self.slices, &dropped);
        problems_changed |= nodes.apply(&mut self.nodes, &dropped);
        if problems_changed {
            self.collect_problems();
        }
        self.scanned = true;
        Ok(changed)
    }

    /// `path` relative to the directory, as problems name it.
    fn name(&self, path: &Path) -> String {
        path.strip_prefix(&self.dir).unwrap_or(path).display().to_string()
    }

    /// The files' own problems, and one per losing definition of an object
    /// defined more than once (same kind, namespace and name: the API
    /// server would hold one object, not two), naming the winner's file.
    fn collect_problems(&mut self) {
        let mut problems: Vec<Problem> = self.files.values().flat_map(|f| f.problems.iter().cloned()).collect();
        self.duplicate_problems("Service", &self.services, &mut problems);
        self.duplicate_problems("EndpointSlice", &self.slices, &mut problems);
        self.duplicate_problems("Node", &self.nodes, &mut problems);
        problems.sort();
        self.problems = problems;
    }

    fn duplicate_problems<K>(&self, kind: &str, kept: &Kept<K>, out: &mut Vec<Problem>) {
        for (key, losers) in &kept.shadowed {
            let winner = &kept.from[kept.index[key]];
            for (loser, _) in losers {
                let (w, l) = (self.name(&winner.file), self.name(&loser.file));
                out.push(Problem {
                    object: format!("{kind} {key}"),
                    reason: format!("defined in both {w} and {l}; the one in {l} is ignored"),
                });
            }
        }
    }

    pub fn services(&self) -> &[ServiceRecord] {
        &self.services.items
    }

    pub fn slices(&self) -> &[SliceRecord] {
        &self.slices.items
    }

    /// The Node the directory describes: the first in path order.
    pub fn node(&self) -> Option<&Node> {
        let nodes = &self.nodes;
        nodes
            .items
            .iter()
            .zip(&nodes.from)
            .min_by(|a, b| a.1.cmp(b.1))
            .map(|(n, _)| n)
    }

    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// Runs `f` on the current objects with the keys changed since the
    /// previous call (everything on the first), then forgets those changes.
    pub fn view<R>(&mut self, f: impl FnOnce(View<'_>) -> R) -> R {
        let changed = (!self.all_changed).then_some((&self.services.changed, &self.slices.changed));
        let r = f(View {
            services: &self.services.items,
            slices: &self.slices.items,
            problems: &self.problems,
            tracked: Some(Tracked {
                service_index: &self.services.index,
                slice_index: &self.slices.index,
                changed,
            }),
            node: self.node(),
        });
        self.services.changed.clear();
        self.slices.changed.clear();
        self.nodes.changed.clear();
        self.all_changed = false;
        r
    }
}

/// The manifest directory as a [`Source`].
///
/// With inotify ([`FileSource::watched`]) the source sleeps until an event
/// comes, then polls the paths it named; polls that look at something are
/// at least `interval` apart, so a burst of writes costs one poll per
/// interval and a change waits at most one interval after the previous
/// poll. Every `rescan` it
/// scans the whole directory anyway, for what inotify cannot see (files
/// symlinked from outside the directory, network filesystems). Without
/// inotify (its limits reached: a warning names the sysctl), every poll
/// scans the whole directory, every `interval`.
pub struct PolledFiles {
    files: FileSource,
    interval: Duration,
    rescan: Option<Duration>,
    /// The inotify descriptor (a duplicate) registered with the runtime.
    events: Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
    last_poll: Option<tokio::time::Instant>,
    next_rescan: Option<tokio::time::Instant>,
    read_errors: u64,
}

impl PolledFiles {
    /// Watches `dir` (polls at most every `interval`, rescans it whole
    /// every `rescan`; `None`: never after the first scan). Must run
    /// inside a Tokio runtime.
    pub fn new(dir: impl Into<PathBuf>, interval: Duration, rescan: Option<Duration>) -> Self {
        let files = FileSource::watched(dir);
        let events = (files.watch_fd())
            .and_then(|fd| fd.try_clone().ok())
            // SAFETY: the `AsyncFd` owns the descriptor, which stays open
            // until it is dropped.
            .and_then(|fd| {
                match unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        // Still correct: the polls at `interval` read the events.
                        warn!(
                            "cannot wait for inotify events: {e}; polling every {} ms",
                            interval.as_millis()
                        );
                        None
                    }
                }
            });
        PolledFiles {
            files,
            interval,
            rescan,
            events,
            last_poll: None,
            next_rescan: rescan.map(|r| tokio::time::Instant::now() + r),
            read_errors: 0,
        }
    }

    pub fn dir(&self) -> &Path {
        self.files.dir()
    }

    /// Whether inotify watches the directory.
    pub fn watching(&self) -> bool {
        self.files.watching()
    }

    pub fn scan_counts(&self) -> ScanCounts {
        self.files.scan_counts()
    }
}

impl Source for PolledFiles {
    async fn changed(&mut self) -> anyhow::Result<()> {
        use tokio::time::{sleep_until, Instant};
        loop {
            let earliest = self.last_poll.map(|t| t + self.interval);
            let wait_events = self.files.watching() && !self.files.rescan_pending();
            let result = match self.events.as_ref().filter(|_| wait_events) {
                Some(events) => {
                    let rescan_at = self.next_rescan;
                    let rescan = async move {
                        match rescan_at {
                            Some(t) => sleep_until(t).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        ready = events.readable() => {
                            let mut ready = ready?;
                            if let Some(t) = earliest {
                                sleep_until(t).await;
                            }
                            let (started, before) = (Instant::now(), self.files.scan_counts());
                            let r = self.files.poll();
                            // Only a check that looked at something counts:
                            // events that named nothing (a hidden temporary
                            // file written before its rename) do not delay
                            // the next one.
                            if self.files.scan_counts() != before {
                                self.last_poll = Some(started);
                            }
                            // The queue was read to its end; readiness
                            // that came meanwhile is kept (a new tick).
                            ready.clear_ready();
                            r
                        }
                        _ = rescan => {
                            self.last_poll = Some(Instant::now());
                            self.next_rescan = self.rescan.map(|r| Instant::now() + r);
                            self.files.rescan()
                        }
                    }
                }
                // No inotify, or a full scan due (the first, lost events,
                // the directory replaced or missing): at the interval.
                None => {
                    if let Some(t) = earliest {
                        sleep_until(t).await;
                    }
                    self.last_poll = Some(Instant::now());
                    self.files.poll()
                }
            };
            if !self.files.watching() {
                self.events = None;
            }
            match result {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    self.read_errors += 1;
                    warn!("{e}; keeping the programmed state");
                }
            }
        }
    }

    fn view<R>(&mut self, f: impl FnOnce(View<'_>) -> R) -> Option<R> {
        // Nothing before the first complete scan.
        self.files.scanned.then(|| self.files.view(f))
    }

    fn counters(&self) -> SourceCounters {
        SourceCounters {
            watch_restarts: self.read_errors,
            relists: 0,
        }
    }
}

/// Writes `text` to `path` with the modification time `mtime` (tests: a
/// fingerprint that changes however fast the writes come).
#[cfg(test)]
pub(crate) fn write_with_mtime(path: &Path, text: &str, mtime: SystemTime) {
    fs::write(path, text).unwrap();
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source on a directory: polling only, or watched by inotify.
    type Make = fn(&Path) -> FileSource;

    fn polled(dir: &Path) -> FileSource {
        FileSource::new(dir)
    }

    fn watched(dir: &Path) -> FileSource {
        let src = FileSource::watched(dir);
        assert!(src.watching(), "inotify could not be set up");
        src
    }

    /// Runs each test with a polled source and with a watched one.
    macro_rules! both_ways {
        ($($test:ident),* $(,)?) => {
            mod polled {
                $(#[test]
                fn $test() {
                    super::$test(super::polled)
                })*
            }
            mod watched {
                $(#[test]
                fn $test() {
                    super::$test(super::watched)
                })*
            }
        };
    }

    both_ways!(
        same_length_rewrites_with_the_old_mtime_are_seen,
        poll_keeps_unchanged_files_and_rereads_changed_ones,
        an_object_defined_in_two_files_is_kept_once_and_both_files_named,
        a_poll_reports_the_keys_whose_object_changed,
        duplicate_definitions_change_the_key_only_when_the_winner_changes,
    );

    /// A fresh directory path of its own (tests run in parallel).
    fn unique_dir(tag: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::env::temp_dir().join(format!("dp-files-{tag}-{}-{n}", std::process::id()))
    }

    /// A watched source saw what changed through inotify alone: one full
    /// scan (the first), never a fallback to polling.
    fn check_watch(src: &FileSource) {
        let c = src.scan_counts();
        assert!(src.watching() || c.targeted == 0, "fell back to polling: {c:?}");
        assert!(!src.watching() || c.full == 1, "a full rescan happened: {c:?}");
    }

    /// The records a poll left in the source.
    struct Seen {
        services: Vec<ServiceRecord>,
    }

    /// Polls; when a file changed, the source's Services and problems.
    fn poll(src: &mut FileSource) -> Option<(Seen, Vec<Problem>)> {
        let changed = src.poll().unwrap();
        check_watch(src);
        changed.then(|| {
            let seen = Seen {
                services: src.services().to_vec(),
            };
            (seen, src.problems().to_vec())
        })
    }

    fn first_vip(s: &ServiceRecord) -> String {
        s.spec.as_ref().unwrap().cluster_ips[0].text().into_owned()
    }

    #[test]
    fn multi_document_file_with_other_kinds() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: x}\nspec: {clusterIP: 198.19.0.1}\n---\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a-1, namespace: x}\naddressType: IPv4\nendpoints: []\n";
        let (o, p) = parse_manifests("f.yaml", text).unwrap();
        assert_eq!(o.services.len(), 1);
        assert_eq!(o.slices.len(), 1);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn invalid_document_is_skipped_and_named() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {ports: 7}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: good}\n";
        let (o, p) = parse_manifests("f.yaml", text).unwrap();
        assert_eq!(o.services.len(), 1);
        assert_eq!(p.len(), 1);
        assert!(
            p[0].to_string().starts_with("f.yaml document 1 (Service bad)"),
            "{}",
            p[0]
        );
    }

    /// A service file whose VIP ends in `last` (same length for 1-9).
    fn svc_file(last: u8) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: a, namespace: x}}\nspec: {{clusterIP: 198.19.0.{last}, ports: [{{port: 80}}]}}\n")
    }

    fn vip(o: &Seen) -> String {
        first_vip(&o.services[0])
    }

    fn same_length_rewrites_with_the_old_mtime_are_seen(make: Make) {
        let dir = unique_dir("rewrites");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("svc.yaml");
        fs::write(&path, svc_file(1)).unwrap();
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        let mut src = make(&dir);
        let (o, _) = poll(&mut src).expect("first poll reports");
        assert_eq!(vip(&o), "198.19.0.1");
        assert!(poll(&mut src).is_none(), "nothing changed");

        // Rewritten in place: same length, mtime set back (only the ctime
        // tells).
        write_with_mtime(&path, &svc_file(2), mtime);
        let (o, _) = poll(&mut src).expect("in-place rewrite seen");
        assert_eq!(vip(&o), "198.19.0.2");

        // Replaced by a rename: a new inode with the same length and mtime.
        let tmp = dir.join(".svc.tmp");
        write_with_mtime(&tmp, &svc_file(3), mtime);
        fs::rename(&tmp, &path).unwrap();
        let (o, _) = poll(&mut src).expect("replacement seen");
        assert_eq!(vip(&o), "198.19.0.3");
        assert!(poll(&mut src).is_none(), "nothing changed");
        fs::remove_dir_all(&dir).unwrap();
    }

    fn poll_keeps_unchanged_files_and_rereads_changed_ones(make: Make) {
        let dir = unique_dir("poll");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let svc = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: x}}\nspec: {{clusterIP: {ip}}}\n"
            )
        };
        fs::write(dir.join("a.yaml"), svc("a", "198.19.0.1")).unwrap();
        fs::write(dir.join("b.yaml"), svc("b", "198.19.0.2")).unwrap();
        let mut src = make(&dir);
        let (o, _) = poll(&mut src).expect("the first poll reports");
        assert_eq!(o.services.len(), 2);
        assert!(poll(&mut src).is_none(), "nothing changed");
        // A different length changes the fingerprint whatever the mtime.
        fs::write(dir.join("b.yaml"), svc("b2", "198.19.0.22")).unwrap();
        let (o, _) = poll(&mut src).expect("b.yaml changed");
        let mut names: Vec<String> = o
            .services
            .iter()
            .filter_map(|s| s.name.as_deref().map(String::from))
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b2"]);
        assert!(poll(&mut src).is_none());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The API server holds one object per kind, namespace and name: the
    /// same Service in two files is one Service, named with both files.
    fn an_object_defined_in_two_files_is_kept_once_and_both_files_named(make: Make) {
        let dir = unique_dir("dup");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("a.yaml"), svc_file(1)).unwrap();
        fs::write(dir.join("b.yaml"), svc_file(2)).unwrap();
        let (objects, problems) = poll(&mut make(&dir)).unwrap();
        assert_eq!(objects.services.len(), 1);
        assert_eq!(vip(&objects), "198.19.0.1", "the first file in path order");
        assert_eq!(problems.len(), 1, "{problems:?}");
        let p = &problems[0];
        assert!(p.reason.contains("a.yaml") && p.reason.contains("b.yaml"), "{p}");
        assert!(p.object.starts_with("Service "), "{p}");
        fs::remove_dir_all(dir).unwrap();
    }

    /// A temporary manifest directory whose writes always change the
    /// fingerprint (each gets its own mtime), however fast they come.
    struct Dir(PathBuf, u64);

    impl Dir {
        fn new(tag: &str) -> Self {
            let dir = unique_dir(tag);
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Dir(dir, 0)
        }

        fn write(&mut self, name: &str, text: &str) {
            self.1 += 1;
            let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + self.1);
            write_with_mtime(&self.0.join(name), text, mtime);
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn service(name: &str, last: u8) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: x}}\nspec: {{clusterIP: 198.19.0.{last}, ports: [{{port: 80}}]}}\n")
    }

    fn slice(service: &str, name: &str, last: u8) -> String {
        format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: x, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [198.18.0.{last}]}}]\nports: [{{port: 8080}}]\n")
    }

    type Keys = Option<(Vec<String>, Vec<String>)>;

    /// Polls, then the keys the view reports as changed (sorted; `None`:
    /// everything), checking the index on the way.
    fn changes(src: &mut FileSource) -> Keys {
        let keys = changes_any(src);
        check_watch(src);
        keys
    }

    /// [`changes`] with full rescans allowed.
    fn changes_any(src: &mut FileSource) -> Keys {
        src.poll().unwrap();
        src.view(|v| {
            let t = v.tracked.expect("the file source tracks its objects");
            assert_eq!(t.service_index.len(), v.services.len());
            for (k, &i) in t.service_index {
                assert_eq!(&v.services[i].key(), k);
            }
            assert_eq!(t.slice_index.len(), v.slices.len());
            for (k, &i) in t.slice_index {
                assert_eq!(&v.slices[i].key(), k);
            }
            t.changed.map(|(s, e)| {
                let sorted = |set: &HashSet<String>| {
                    let mut v: Vec<String> = set.iter().cloned().collect();
                    v.sort();
                    v
                };
                (sorted(s), sorted(e))
            })
        })
    }

    fn keys(services: &[&str], slices: &[&str]) -> Keys {
        let owned = |k: &[&str]| k.iter().map(|s| s.to_string()).collect();
        Some((owned(services), owned(slices)))
    }

    fn vip_of(src: &FileSource, key: &str) -> String {
        let s = src.services().iter().find(|s| s.key() == key).unwrap();
        first_vip(s)
    }

    fn a_poll_reports_the_keys_whose_object_changed(make: Make) {
        let mut d = Dir::new("keys");
        d.write("a.yaml", &(service("a", 1) + "---\n" + &slice("a", "a-1", 1)));
        d.write("b.yaml", &service("b", 2));
        let mut src = make(&d.0);
        assert_eq!(changes(&mut src), None, "the first view recomputes everything");
        assert_eq!(changes(&mut src), keys(&[], &[]), "nothing changed");

        // Added: a new file's objects.
        d.write("c.yaml", &(service("c", 3) + "---\n" + &slice("c", "c-1", 3)));
        assert_eq!(changes(&mut src), keys(&["x/c"], &["x/c-1"]));
        // Modified: only the object that differs, not its file's others.
        d.write("a.yaml", &(service("a", 1) + "---\n" + &slice("a", "a-1", 9)));
        assert_eq!(changes(&mut src), keys(&[], &["x/a-1"]));
        // Rewritten unchanged (a new mtime): nothing.
        d.write("b.yaml", &service("b", 2));
        assert_eq!(changes(&mut src), keys(&[], &[]));
        // An object moved to another file of the same content: nothing.
        d.write("c.yaml", &service("c", 3));
        d.write("c-slice.yaml", &slice("c", "c-1", 3));
        assert_eq!(changes(&mut src), keys(&[], &[]));
        // Renamed file: nothing.
        fs::rename(d.0.join("b.yaml"), d.0.join("b2.yaml")).unwrap();
        assert_eq!(changes(&mut src), keys(&[], &[]));
        // Renamed within the file (a different key): both keys.
        d.write("b2.yaml", &service("b2", 2));
        assert_eq!(changes(&mut src), keys(&["x/b", "x/b2"], &[]));
        // Deleted: its objects.
        fs::remove_file(d.0.join("a.yaml")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/a"], &["x/a-1"]));
        let mut names: Vec<String> = src.services().iter().map(|s| s.key()).collect();
        names.sort();
        assert_eq!(names, ["x/b2", "x/c"]);
        assert_eq!(src.slices().len(), 1);
        // A file that cannot be parsed keeps its objects: nothing changes
        // but the problem list.
        d.write("c.yaml", "kind: Service\n  metadata: [\n");
        assert_eq!(changes(&mut src), keys(&[], &[]));
        assert_eq!(vip_of(&src, "x/c"), "198.19.0.3");
        assert_eq!(src.problems().len(), 1, "{:?}", src.problems());
        d.write("c.yaml", &service("c", 4));
        assert_eq!(changes(&mut src), keys(&["x/c"], &[]));
        assert!(src.problems().is_empty(), "{:?}", src.problems());
        // Changes accumulate until a view takes them.
        d.write("c.yaml", &service("c", 5));
        src.poll().unwrap();
        fs::remove_file(d.0.join("c-slice.yaml")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/c"], &["x/c-1"]));
    }

    fn duplicate_definitions_change_the_key_only_when_the_winner_changes(make: Make) {
        let mut d = Dir::new("dups");
        d.write("b.yaml", &service("a", 2));
        let mut src = make(&d.0);
        assert_eq!(changes(&mut src), None);
        // A later file: ignored, reported.
        d.write("c.yaml", &service("a", 3));
        assert_eq!(changes(&mut src), keys(&[], &[]));
        assert_eq!(vip_of(&src, "x/a"), "198.19.0.2");
        assert_eq!(src.problems().len(), 1, "{:?}", src.problems());
        assert!(
            src.problems()[0].reason.contains("in both b.yaml and c.yaml"),
            "{:?}",
            src.problems()
        );
        // An earlier file takes over.
        d.write("a.yaml", &service("a", 1));
        assert_eq!(changes(&mut src), keys(&["x/a"], &[]));
        assert_eq!(vip_of(&src, "x/a"), "198.19.0.1");
        assert_eq!(src.problems().len(), 2, "{:?}", src.problems());
        // ... with the same object as the winner: no change.
        d.write("0.yaml", &service("a", 1));
        assert_eq!(changes(&mut src), keys(&[], &[]));
        assert_eq!(src.problems().len(), 3, "{:?}", src.problems());
        // The shadowed copies change: nothing visible.
        d.write("c.yaml", &service("a", 7));
        assert_eq!(changes(&mut src), keys(&[], &[]));
        // The winners go, the next in path order comes back.
        fs::remove_file(d.0.join("0.yaml")).unwrap();
        fs::remove_file(d.0.join("a.yaml")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/a"], &[]));
        assert_eq!(vip_of(&src, "x/a"), "198.19.0.2");
        assert_eq!(src.problems().len(), 1, "{:?}", src.problems());
        // Twice in one file: the first document wins.
        d.write("b.yaml", &(service("a", 5) + "---\n" + &service("a", 6)));
        assert_eq!(changes(&mut src), keys(&["x/a"], &[]));
        assert_eq!(vip_of(&src, "x/a"), "198.19.0.5");
        assert_eq!(src.problems().len(), 2, "{:?}", src.problems());
        fs::remove_file(d.0.join("b.yaml")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/a"], &[]));
        assert_eq!(vip_of(&src, "x/a"), "198.19.0.7");
        assert!(src.problems().is_empty(), "{:?}", src.problems());
        fs::remove_file(d.0.join("c.yaml")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/a"], &[]));
        assert!(src.services().is_empty());
    }

    #[test]
    fn syntax_error_fails_the_file() {
        assert!(parse_manifests("f.yaml", "kind: Service\n  metadata: [\n").is_err());
    }

    /// Every kind of change reaches a watched source through inotify's
    /// events alone (one full scan, the first: `check_watch`).
    #[test]
    fn inotify_sees_every_kind_of_change() {
        use std::{io::Write, os::unix::fs::symlink};
        let mut d = Dir::new("kinds");
        let mut outside = Dir::new("kinds-outside");
        d.write("a.yaml", &service("a", 1));
        let mut src = watched(&d.0);
        assert_eq!(changes(&mut src), None);
        // Written in place.
        d.write("a.yaml", &service("a", 2));
        assert_eq!(changes(&mut src), keys(&["x/a"], &[]));
        // Renamed in from outside the directory, renamed out, deleted.
        outside.write("b.yaml", &service("b", 3));
        fs::rename(outside.0.join("b.yaml"), d.0.join("b.yaml")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/b"], &[]));
        fs::rename(d.0.join("b.yaml"), outside.0.join("b.yaml")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/b"], &[]));
        fs::remove_file(d.0.join("a.yaml")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/a"], &[]));
        // A new file counts when its writer closes it, never half written.
        let text = service("c", 4);
        let mut f = fs::File::create(d.0.join("c.yaml")).unwrap();
        f.write_all(&text.as_bytes()[..30]).unwrap();
        assert_eq!(changes(&mut src), keys(&[], &[]));
        f.write_all(&text.as_bytes()[30..]).unwrap();
        drop(f);
        assert_eq!(changes(&mut src), keys(&["x/c"], &[]));
        // A new subdirectory with files, and one below it, filled before
        // the poll (before any watch on them).
        fs::create_dir(d.0.join("sub")).unwrap();
        d.write("sub/d.yaml", &service("d", 5));
        fs::create_dir(d.0.join("sub/deeper")).unwrap();
        d.write("sub/deeper/e.yaml", &service("e", 6));
        assert_eq!(changes(&mut src), keys(&["x/d", "x/e"], &[]));
        // ... now watched.
        d.write("sub/deeper/e.yaml", &service("e", 7));
        assert_eq!(changes(&mut src), keys(&["x/e"], &[]));
        // Renamed within the tree: the same objects; watched at the new path.
        fs::rename(d.0.join("sub"), d.0.join("sub2")).unwrap();
        assert_eq!(changes(&mut src), keys(&[], &[]));
        d.write("sub2/deeper/e.yaml", &service("e", 8));
        assert_eq!(changes(&mut src), keys(&["x/e"], &[]));
        // Moved out of the tree: its objects go, its changes no longer count.
        fs::rename(d.0.join("sub2"), outside.0.join("sub2")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/d", "x/e"], &[]));
        outside.write("sub2/d.yaml", &service("d", 9));
        assert_eq!(changes(&mut src), keys(&[], &[]));
        // Moved back in, then deleted with its contents.
        fs::rename(outside.0.join("sub2"), d.0.join("sub2")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/d", "x/e"], &[]));
        assert_eq!(vip_of(&src, "x/d"), "198.19.0.9");
        fs::remove_dir_all(d.0.join("sub2")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/d", "x/e"], &[]));
        // A hard link to a complete file, then removed.
        outside.write("f.yaml", &service("f", 10));
        fs::hard_link(outside.0.join("f.yaml"), d.0.join("f.yaml")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/f"], &[]));
        fs::remove_file(d.0.join("f.yaml")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/f"], &[]));
        // A symlink to a file, and one to a directory whose files are then
        // watched through it.
        outside.write("g.yaml", &service("g", 11));
        symlink(outside.0.join("g.yaml"), d.0.join("g.yaml")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/g"], &[]));
        fs::create_dir(outside.0.join("linked")).unwrap();
        outside.write("linked/h.yaml", &service("h", 12));
        symlink(outside.0.join("linked"), d.0.join("linked")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/h"], &[]));
        outside.write("linked/h.yaml", &service("h", 13));
        assert_eq!(changes(&mut src), keys(&["x/h"], &[]));
        fs::remove_file(d.0.join("linked")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/h"], &[]));
        // Other files and hidden ones change nothing.
        d.write("README.md", "not a manifest");
        d.write(".c.yaml.swp", &service("z", 14));
        assert_eq!(changes(&mut src), keys(&[], &[]));
        let mut names: Vec<String> = src.services().iter().map(|s| s.key()).collect();
        names.sort();
        assert_eq!(names, ["x/c", "x/g"]);
    }

    /// A ConfigMap volume as the kubelet updates it: the visible files are
    /// symlinks into `..data`, itself a symlink to a timestamped
    /// directory, replaced by a rename.
    #[test]
    fn a_configmap_volume_update_is_seen() {
        use std::os::unix::fs::symlink;
        let d = Dir::new("configmap");
        let version = |n: u32, files: &[(&str, String)]| {
            let v = format!("..2026_12_06_{n}");
            fs::create_dir(d.0.join(&v)).unwrap();
            for (name, text) in files {
                fs::write(d.0.join(&v).join(name), text).unwrap();
            }
            symlink(&v, d.0.join("..data_tmp")).unwrap();
            fs::rename(d.0.join("..data_tmp"), d.0.join("..data")).unwrap();
            if n > 1 {
                fs::remove_dir_all(d.0.join(format!("..2026_12_06_{}", n - 1))).unwrap();
            }
        };
        version(1, &[("a.yaml", service("a", 1)), ("b.yaml", service("b", 2))]);
        symlink("..data/a.yaml", d.0.join("a.yaml")).unwrap();
        symlink("..data/b.yaml", d.0.join("b.yaml")).unwrap();
        let mut src = watched(&d.0);
        assert_eq!(changes(&mut src), None);
        assert_eq!(src.services().len(), 2);
        // One key's value changes.
        version(2, &[("a.yaml", service("a", 3)), ("b.yaml", service("b", 2))]);
        assert_eq!(changes(&mut src), keys(&["x/a"], &[]));
        assert_eq!(vip_of(&src, "x/a"), "198.19.0.3");
        // A key added (its link created after the swap), then removed.
        version(
            3,
            &[
                ("a.yaml", service("a", 3)),
                ("b.yaml", service("b", 2)),
                ("c.yaml", service("c", 4)),
            ],
        );
        symlink("..data/c.yaml", d.0.join("c.yaml")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/c"], &[]));
        version(4, &[("a.yaml", service("a", 3)), ("b.yaml", service("b", 5))]);
        fs::remove_file(d.0.join("c.yaml")).unwrap();
        assert_eq!(changes(&mut src), keys(&["x/b", "x/c"], &[]));
    }

    /// Events lost to a full queue (`IN_Q_OVERFLOW`): a full rescan, then
    /// events again.
    #[test]
    fn lost_events_mean_a_full_rescan() {
        let mut d = Dir::new("overflow");
        d.write("a.yaml", &service("a", 1));
        let mut src = watched(&d.0);
        assert_eq!(changes(&mut src), None);
        let max: usize = (fs::read_to_string("/proc/sys/fs/inotify/max_queued_events").unwrap())
            .trim()
            .parse()
            .unwrap();
        // The queue filled with events of files that are no manifests (two
        // of them: identical events in a row are merged) ...
        for i in 0..=max {
            fs::File::create(d.0.join(["flood-a.txt", "flood-b.txt"][i % 2])).unwrap();
        }
        // ... so that this one is lost.
        d.write("a.yaml", &service("a", 2));
        assert_eq!(changes_any(&mut src), keys(&["x/a"], &[]));
        assert_eq!(src.scan_counts(), ScanCounts { full: 2, targeted: 0 });
        d.write("a.yaml", &service("a", 3));
        assert_eq!(changes_any(&mut src), keys(&["x/a"], &[]));
        assert_eq!(src.scan_counts(), ScanCounts { full: 2, targeted: 1 });
    }

    /// The directory itself renamed away and replaced, or removed and made
    /// again: watched again at its path.
    #[test]
    fn a_replaced_directory_is_watched_again() {
        let mut d = Dir::new("replaced");
        let mut away = Dir::new("replaced-away");
        d.write("a.yaml", &service("a", 1));
        let mut src = watched(&d.0);
        assert_eq!(changes(&mut src), None);
        // Renamed over an empty directory elsewhere, another one made.
        fs::rename(&d.0, &away.0).unwrap();
        fs::create_dir(&d.0).unwrap();
        d.write("b.yaml", &service("b", 2));
        assert_eq!(changes_any(&mut src), keys(&["x/a", "x/b"], &[]));
        assert_eq!(src.scan_counts().full, 2);
        // The old one's changes no longer count; the new one's do, by events.
        away.write("a.yaml", &service("a", 3));
        assert_eq!(changes_any(&mut src), keys(&[], &[]));
        d.write("b.yaml", &service("b", 4));
        assert_eq!(changes_any(&mut src), keys(&["x/b"], &[]));
        assert_eq!(src.scan_counts(), ScanCounts { full: 2, targeted: 1 });
        // Removed: the poll fails, the objects stay, and it is retried.
        fs::remove_dir_all(&d.0).unwrap();
        assert!(src.poll().is_err());
        assert_eq!(src.services().len(), 1);
        assert!(src.rescan_pending());
        fs::create_dir(&d.0).unwrap();
        d.write("c.yaml", &service("c", 5));
        assert_eq!(changes_any(&mut src), keys(&["x/b", "x/c"], &[]));
        assert!(!src.rescan_pending());
        d.write("c.yaml", &service("c", 6));
        assert_eq!(changes_any(&mut src), keys(&["x/c"], &[]));
        // (The scan that failed is not counted.)
        assert_eq!(src.scan_counts(), ScanCounts { full: 3, targeted: 2 });
    }

    /// Out of inotify watches (`fs.inotify.max_user_watches`): polling,
    /// with a warning naming the sysctl.
    #[test]
    fn a_watch_limit_falls_back_to_polling() {
        use super::super::watch::WatchError;
        let mut d = Dir::new("limit");
        fs::create_dir(d.0.join("sub")).unwrap();
        d.write("sub/a.yaml", &service("a", 1));
        let mut src = watched(&d.0);
        // The directory's watch is added, its subdirectory's fails.
        src.watch.as_mut().unwrap().fail_after = Some(1);
        assert_eq!(changes_any(&mut src), None);
        assert!(!src.watching());
        d.write("sub/a.yaml", &service("a", 2));
        assert_eq!(changes_any(&mut src), keys(&["x/a"], &[]));
        assert_eq!(src.scan_counts(), ScanCounts { full: 2, targeted: 0 });
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = WatchError::Add {
            dir: d.0.clone(),
            source: enospc,
        };
        assert!(e.to_string().contains("sysctl -w fs.inotify.max_user_watches=N"), "{e}");
        let e = WatchError::Init {
            source: std::io::Error::from_raw_os_error(libc::EMFILE),
        };
        assert!(
            e.to_string().contains("sysctl -w fs.inotify.max_user_instances=N"),
            "{e}"
        );
    }

    /// The agent's source wakes on an event (no rescan timer), and the
    /// periodic rescan sees what inotify cannot: a file symlinked from
    /// outside the directory, changed there.
    #[tokio::test]
    async fn polled_files_wake_on_events_and_rescan_what_inotify_misses() {
        use std::os::unix::fs::symlink;
        const DEADLINE: Duration = Duration::from_secs(10);
        let mut d = Dir::new("wake");
        let mut outside = Dir::new("wake-outside");
        d.write("a.yaml", &service("a", 1));
        outside.write("b.yaml", &service("b", 2));
        symlink(outside.0.join("b.yaml"), d.0.join("b.yaml")).unwrap();
        let vip = |src: &mut PolledFiles, key: &str| src.view(|_| ()).map(|()| vip_of(&src.files, key));

        let mut src = PolledFiles::new(&d.0, Duration::from_millis(10), None);
        assert!(src.watching());
        tokio::time::timeout(DEADLINE, src.changed()).await.unwrap().unwrap();
        assert_eq!(vip(&mut src, "x/a").as_deref(), Some("198.19.0.1"));
        d.write("a.yaml", &service("a", 3));
        tokio::time::timeout(DEADLINE, src.changed()).await.unwrap().unwrap();
        assert_eq!(vip(&mut src, "x/a").as_deref(), Some("198.19.0.3"));
        assert_eq!(src.scan_counts(), ScanCounts { full: 1, targeted: 1 });
        // The link's target changes: no event in the directory.
        outside.write("b.yaml", &service("b", 4));
        assert!(!src.files.poll().unwrap());
        assert_eq!(vip_of(&src.files, "x/b"), "198.19.0.2");

        // With a periodic rescan it is seen.
        let mut src = PolledFiles::new(&d.0, Duration::from_millis(10), Some(Duration::from_millis(200)));
        tokio::time::timeout(DEADLINE, src.changed()).await.unwrap().unwrap();
        assert_eq!(vip(&mut src, "x/b").as_deref(), Some("198.19.0.4"));
        outside.write("b.yaml", &service("b", 5));
        tokio::time::timeout(DEADLINE, src.changed()).await.unwrap().unwrap();
        assert_eq!(vip(&mut src, "x/b").as_deref(), Some("198.19.0.5"));
        assert_eq!(src.scan_counts(), ScanCounts { full: 2, targeted: 0 });
    }
}
