//! The file source: a directory of Service and EndpointSlice manifests
//! (YAML or JSON, several documents per file allowed), re-read when a file
//! changes. It feeds the same desired-state function as the Kubernetes
//! source, so the agent runs and is tested without a cluster.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;
use tracing::warn;

pub use super::Objects;
use super::{Source, SourceCounters, View};
use crate::model::Problem;

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

struct CachedFile {
    fingerprint: Fingerprint,
    objects: Objects,
    problems: Vec<Problem>,
}

/// A directory of manifests.
pub struct FileSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, CachedFile>,
    /// Set once the first scan happened, so the first poll always reports.
    scanned: bool,
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    !hidden && matches!(ext, "yaml" | "yml" | "json")
}

/// Lists manifest files under `dir`, recursively, skipping hidden entries
/// (ConfigMap volumes keep their data under `..data`).
fn list(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        // metadata() follows symlinks, as ConfigMap volumes need.
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => list(&path, out)?,
            Ok(m) if m.is_file() && is_manifest(&path) => out.push(path),
            _ => {}
        }
    }
    Ok(())
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
            files: BTreeMap::new(),
            scanned: false,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads changed files. Returns `None` when nothing changed since the
    /// last call, else every object of the directory and the problems found.
    /// A file that cannot be read or parsed keeps its previous objects (a
    /// half-written file must not delete Services), with a problem saying so.
    pub fn poll(&mut self) -> Result<Option<(Objects, Vec<Problem>)>, String> {
        let mut paths = Vec::new();
        list(&self.dir, &mut paths).map_err(|e| format!("reading directory {}: {e}", self.dir.display()))?;
        paths.sort();

        let mut changed = !self.scanned || paths.len() != self.files.len();
        let mut next = BTreeMap::new();
        for path in paths {
            let name = path.strip_prefix(&self.dir).unwrap_or(&path).display().to_string();
            let fp = match fs::metadata(&path) {
                Ok(m) => Fingerprint::of(&m),
                Err(_) => continue, // vanished between list and stat
            };
            // An unchanged file keeps its parsed objects: moved, not cloned
            // (a poll runs every 100 ms by default; cloning 10,000 Services
            // and their slices each time kept a core about 20 % busy).
            let old = match self.files.remove(&path) {
                Some(unchanged) if unchanged.fingerprint == fp => {
                    next.insert(path, unchanged);
                    continue;
                }
                other => other,
            };
            changed = true;
            let parsed = fs::read_to_string(&path)
                .map_err(|e| format!("{name}: {e}"))
                .and_then(|t| parse_manifests(&name, &t));
            match parsed {
                Ok((objects, problems)) => {
                    next.insert(
                        path,
                        CachedFile {
                            fingerprint: fp,
                            objects,
                            problems,
                        },
                    );
                }
                Err(e) => {
                    // Keep the last good objects until the file changes again.
                    let kept = old.map(|o| o.objects).unwrap_or_default();
                    let problem = Problem {
                        object: name.clone(),
                        reason: format!("cannot be parsed ({e}); keeping its previous objects"),
                    };
                    next.insert(
                        path,
                        CachedFile {
                            fingerprint: fp,
                            objects: kept,
                            problems: vec![problem],
                        },
                    );
                }
            }
        }
        if !self.files.is_empty() {
            changed = true; // files were removed
        }
        self.files = next;
        self.scanned = true;
        if !changed {
            return Ok(None);
        }
        let mut all = Objects::default();
        let mut problems = Vec::new();
        // An object defined twice (same kind, namespace and name) is kept
        // from the first file in path order only, and both files named:
        // the API server would hold one object, not two.
        let mut defined: BTreeMap<(&str, String, String), &Path> = BTreeMap::new();
        for (path, f) in &self.files {
            let mut first = |kind: &'static str, md: &ObjectMeta| {
                let ns = md.namespace.clone().unwrap_or_else(|| "default".into());
                let key = (kind, ns.clone(), md.name.clone().unwrap_or_default());
                match defined.get(&key) {
                    Some(earlier) => {
                        let name = |p: &Path| p.strip_prefix(&self.dir).unwrap_or(p).display().to_string();
                        problems.push(Problem {
                            object: format!("{kind} {ns}/{}", key.2),
                            reason: format!(
                                "defined in both {} and {}; the one in {} is ignored",
                                name(earlier),
                                name(path),
                                name(path)
                            ),
                        });
                        false
                    }
                    None => {
                        defined.insert(key, path);
                        true
                    }
                }
            };
            let services = f.objects.services.iter().filter(|o| first("Service", &o.metadata));
            all.services.extend(services.cloned());
            let slices = f.objects.slices.iter().filter(|o| first("EndpointSlice", &o.metadata));
            all.slices.extend(slices.cloned());
            let nodes = f.objects.nodes.iter().filter(|o| first("Node", &o.metadata));
            all.nodes.extend(nodes.cloned());
            problems.extend(f.problems.iter().cloned());
        }
        Ok(Some((all, problems)))
    }
}

/// A [`FileSource`] polled at a fixed interval, as a [`Source`]: a
/// directory has no change stream that works for every volume type
/// (ConfigMap volumes swap a symlink), so it is polled.
pub struct PolledFiles {
    files: FileSource,
    tick: tokio::time::Interval,
    current: Option<(Objects, Vec<Problem>)>,
    read_errors: u64,
}

impl PolledFiles {
    pub fn new(dir: impl Into<PathBuf>, interval: Duration) -> Self {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        PolledFiles {
            files: FileSource::new(dir),
            tick,
            current: None,
            read_errors: 0,
        }
    }

    pub fn dir(&self) -> &Path {
        self.files.dir()
    }
}

impl Source for PolledFiles {
    async fn changed(&mut self) -> anyhow::Result<()> {
        loop {
            self.tick.tick().await;
            match self.files.poll() {
                Ok(Some(changed)) => {
                    self.current = Some(changed);
                    return Ok(());
                }
                Ok(None) => {}
                Err(e) => {
                    self.read_errors += 1;
                    warn!("{e}; keeping the programmed state");
                }
            }
        }
    }

    fn view<R>(&mut self, f: impl FnOnce(View<'_>) -> R) -> Option<R> {
        let (objects, problems) = self.current.as_ref()?;
        Some(f(View {
            tracked: None,
            node: objects.nodes.first(),
            services: &objects.services,
            slices: &objects.slices,
            problems,
        }))
    }

    fn counters(&self) -> SourceCounters {
        SourceCounters {
            watch_restarts: self.read_errors,
            relists: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn vip(o: &Objects) -> String {
        o.services[0].spec.as_ref().unwrap().cluster_ip.clone().unwrap()
    }

    #[test]
    fn same_length_rewrites_with_the_old_mtime_are_seen() {
        let dir = std::env::temp_dir().join(format!("dataplane-files-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("svc.yaml");
        fs::write(&path, svc_file(1)).unwrap();
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        let mut src = FileSource::new(&dir);
        let (o, _) = src.poll().unwrap().expect("first poll reports");
        assert_eq!(vip(&o), "198.19.0.1");
        assert!(src.poll().unwrap().is_none(), "nothing changed");

        // Rewritten in place: same length, mtime set back (only the ctime
        // tells).
        fs::write(&path, svc_file(2)).unwrap();
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let (o, _) = src.poll().unwrap().expect("in-place rewrite seen");
        assert_eq!(vip(&o), "198.19.0.2");

        // Replaced by a rename: a new inode with the same length and mtime.
        let tmp = dir.join(".svc.tmp");
        fs::write(&tmp, svc_file(3)).unwrap();
        fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        fs::rename(&tmp, &path).unwrap();
        let (o, _) = src.poll().unwrap().expect("replacement seen");
        assert_eq!(vip(&o), "198.19.0.3");
        assert!(src.poll().unwrap().is_none(), "nothing changed");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn poll_keeps_unchanged_files_and_rereads_changed_ones() {
        let dir = std::env::temp_dir().join(format!("dp-files-poll-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let svc = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: x}}\nspec: {{clusterIP: {ip}}}\n"
            )
        };
        fs::write(dir.join("a.yaml"), svc("a", "198.19.0.1")).unwrap();
        fs::write(dir.join("b.yaml"), svc("b", "198.19.0.2")).unwrap();
        let mut src = FileSource::new(&dir);
        let (o, _) = src.poll().unwrap().expect("the first poll reports");
        assert_eq!(o.services.len(), 2);
        assert!(src.poll().unwrap().is_none(), "nothing changed");
        // A different length changes the fingerprint whatever the mtime.
        fs::write(dir.join("b.yaml"), svc("b2", "198.19.0.22")).unwrap();
        let (o, _) = src.poll().unwrap().expect("b.yaml changed");
        let mut names: Vec<String> = o.services.iter().filter_map(|s| s.metadata.name.clone()).collect();
        names.sort();
        assert_eq!(names, ["a", "b2"]);
        assert!(src.poll().unwrap().is_none());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The API server holds one object per kind, namespace and name: the
    /// same Service in two files is one Service, named with both files.
    #[test]
    fn an_object_defined_in_two_files_is_kept_once_and_both_files_named() {
        let dir = std::env::temp_dir().join(format!("dp-files-dup-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("a.yaml"), svc_file(1)).unwrap();
        fs::write(dir.join("b.yaml"), svc_file(2)).unwrap();
        let (objects, problems) = FileSource::new(&dir).poll().unwrap().unwrap();
        assert_eq!(objects.services.len(), 1);
        assert_eq!(vip(&objects), "198.19.0.1", "the first file in path order");
        assert_eq!(problems.len(), 1, "{problems:?}");
        let p = &problems[0];
        assert!(p.reason.contains("a.yaml") && p.reason.contains("b.yaml"), "{p}");
        assert!(p.object.starts_with("Service "), "{p}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn syntax_error_fails_the_file() {
        assert!(parse_manifests("f.yaml", "kind: Service\n  metadata: [\n").is_err());
    }
}
