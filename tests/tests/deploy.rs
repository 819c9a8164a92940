//! The `deploy/` manifests against the agent's contract: every document is
//! parsed into the k8s-openapi type of its kind (fields the type does not
//! know are errors), then each concern is checked by a function that
//! returns the problems it found. The `*_catches_*` tests break the real
//! manifests one setting at a time and require the check to notice, so no
//! assertion here can pass vacuously. `deploy/examples/` is not read here
//! (the unit tests and the demo use it).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::Parser;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetUpdateStrategy},
        core::v1::{ConfigMap, Container, Namespace, PodSpec, ServiceAccount, Toleration, VolumeMount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

const NAMESPACE: &str = "dataplane-system";
const CONFIG_MAP: &str = "dataplane-config";
const HEALTH_PORT: i32 = 10256;
const AGENT_COMMAND: [&str; 4] = ["/usr/local/bin/dataplane", "run", "--source", "kubernetes"];
const BPFFS: &str = "/sys/fs/bpf";
const BTF: &str = "/sys/kernel/btf";
/// The host directory whose cgroup v2 hierarchy the socket-level programs
/// attach to.
const HOST_CGROUP: &str = "/sys/fs/cgroup";

/// What the agent may do: these verbs on these (apiGroup, resource) pairs,
/// and nothing else.
const RBAC_RESOURCES: [(&str, &str); 3] = [("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices")];
const RBAC_VERBS: [&str; 3] = ["get", "list", "watch"];

/// Settings the deployment must set explicitly in the ConfigMap (which
/// keys exist at all comes from the agent's parser, see `check_config`).
const CONFIG_KEYS: [&str; 7] = [
    "DATAPLANE_TC_IFACES",
    "DATAPLANE_XDP_IFACES",
    "DATAPLANE_XDP_MODE",
    "DATAPLANE_SOCKET_LB_CGROUP",
    "DATAPLANE_LOG",
    "DATAPLANE_LOG_FORMAT",
    "DATAPLANE_HEALTH_BIND",
];
/// Keys the ConfigMap may also hold: the API server address for when
/// kube-proxy no longer translates the `kubernetes` Service (read by kube).
const OPTIONAL_CONFIG_KEYS: [&str; 2] = ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"];

/// Every manifest of `deploy/`, by kind, and what kustomization.yaml lists.
#[derive(Clone, Debug, Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    /// Manifest files in `deploy/` (not kustomization.yaml), by name.
    files: Vec<String>,
    /// The `resources` of kustomization.yaml.
    kustomization: Vec<String>,
    /// The image names kustomization.yaml rewrites (`images[].name`).
    kustomization_images: Vec<String>,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .join("deploy")
}

fn is_yaml(name: &str) -> bool {
    name.ends_with(".yaml") || name.ends_with(".yml")
}

/// Loads every YAML file directly in `deploy/` (subdirectories such as
/// `examples/` are not manifests to apply).
fn load() -> Manifests {
    load_dir(&deploy_dir()).unwrap_or_else(|e| panic!("{e}"))
}

fn load_dir(dir: &Path) -> Result<Manifests, String> {
    let mut m = Manifests::default();
    let entries = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("reading {}: {e}", dir.display()))?;
        let is_file = entry
            .file_type()
            .map_err(|e| format!("{:?}: {e}", entry.path()))?
            .is_file();
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_file && is_yaml(&name) {
            names.push(name);
        }
    }
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let text = fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        if name == "kustomization.yaml" {
            (m.kustomization, m.kustomization_images) =
                parse_kustomization(&text).map_err(|e| format!("deploy/{name}: {e}"))?;
        } else {
            parse_manifests(&format!("deploy/{name}"), &text, &mut m)?;
            m.files.push(name);
        }
    }
    Ok(m)
}

/// The `resources` and the `images[].name`s of a kustomization.
fn parse_kustomization(text: &str) -> Result<(Vec<String>, Vec<String>), String> {
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    let resources = value
        .get("resources")
        .and_then(|r| r.as_sequence())
        .ok_or("no `resources` list")?
        .iter()
        .map(|r| {
            r.as_str()
                .map(String::from)
                .ok_or(format!("resource {r:?} is not a file name"))
        })
        .collect::<Result<_, _>>()?;
    let images = match value.get("images") {
        None => Vec::new(),
        Some(images) => images
            .as_sequence()
            .ok_or("`images` is not a list")?
            .iter()
            .map(|i| {
                i.get("name")
                    .and_then(|n| n.as_str())
                    .map(String::from)
                    .ok_or(format!("image {i:?} has no name"))
            })
            .collect::<Result<_, _>>()?,
    };
    Ok((resources, images))
}

/// Parses every document of one file into the type of its kind.
fn parse_manifests(file: &str, text: &str, m: &mut Manifests) -> Result<(), String> {
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let at = format!("{file} document {}", i + 1);
        let value = serde_yaml_ng::Value::deserialize(doc).map_err(|e| format!("{at}: invalid YAML: {e}"))?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
        let name = value
            .get("metadata")
            .and_then(|md| md.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("<no name>");
        let at = format!("{at} ({kind} {name})");
        match kind.as_str() {
            "Namespace" => m.namespaces.push(typed(&at, &value)?),
            "ServiceAccount" => m.service_accounts.push(typed(&at, &value)?),
            "ClusterRole" => m.cluster_roles.push(typed(&at, &value)?),
            "ClusterRoleBinding" => m.bindings.push(typed(&at, &value)?),
            "ConfigMap" => m.config_maps.push(typed(&at, &value)?),
            "DaemonSet" => m.daemon_sets.push(typed(&at, &value)?),
            _ => return Err(format!("{at}: kind {kind:?} is not one this test knows how to check")),
        }
    }
    Ok(())
}

/// Deserializes into `T` and requires the result to serialize back to the
/// same document: k8s-openapi ignores fields it does not know, so a
/// misspelt field (`mountPropogation`) would otherwise vanish silently.
fn typed<T: DeserializeOwned + Serialize>(at: &str, value: &serde_yaml_ng::Value) -> Result<T, String> {
    let object: T = serde_yaml_ng::from_value(value.clone()).map_err(|e| format!("{at}: {e}"))?;
    let written = serde_json::to_value(value).map_err(|e| format!("{at}: {e}"))?;
    let read = serde_json::to_value(&object).map_err(|e| format!("{at}: {e}"))?;
    match first_difference("", &written, &read) {
        None => Ok(object),
        Some(path) => Err(format!(
            "{at}: field {path} is not part of the API type (misspelt or misplaced?)"
        )),
    }
}

/// The path of the first value in `written` that `read` lost or changed.
fn first_difference(path: &str, written: &serde_json::Value, read: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match (written, read) {
        (Value::Object(w), Value::Object(r)) => w.iter().find_map(|(k, wv)| match r.get(k) {
            Some(rv) => first_difference(&format!("{path}.{k}"), wv, rv),
            None => Some(format!("{path}.{k}")),
        }),
        (Value::Array(w), Value::Array(r)) if w.len() == r.len() => w
            .iter()
            .zip(r)
            .enumerate()
            .find_map(|(i, (wv, rv))| first_difference(&format!("{path}[{i}]"), wv, rv)),
        _ if written == read => None,
        _ => Some(path.to_string()),
    }
}

/// The one DaemonSet, its pod spec and its one container.
fn agent(m: &Manifests) -> Result<(&DaemonSet, &PodSpec, &Container), String> {
    let [ds] = m.daemon_sets.as_slice() else {
        return Err(format!("expected one DaemonSet, found {}", m.daemon_sets.len()));
    };
    let name = ds.metadata.name.as_deref().unwrap_or("<no name>");
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .ok_or(format!("DaemonSet {name}: no pod template spec"))?;
    let [container] = pod.containers.as_slice() else {
        return Err(format!(
            "DaemonSet {name}: expected one container, found {}",
            pod.containers.len()
        ));
    };
    Ok((ds, pod, container))
}

fn agent_mut(m: &mut Manifests) -> &mut PodSpec {
    m.daemon_sets[0].spec.as_mut().unwrap().template.spec.as_mut().unwrap()
}

fn container_mut(m: &mut Manifests) -> &mut Container {
    &mut agent_mut(m).containers[0]
}

fn config_map_mut(m: &mut Manifests) -> &mut BTreeMap<String, String> {
    m.config_maps[0].data.as_mut().unwrap()
}

fn name_of(md: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    md.name.as_deref().unwrap_or("<no name>")
}

// ---- checks: each returns every problem it finds ----

/// One object of each kind, namespaced ones in the agent's namespace.
fn check_objects(m: &Manifests) -> Vec<String> {
    let mut problems = Vec::new();
    for (kind, count) in [
        ("Namespace", m.namespaces.len()),
        ("ServiceAccount", m.service_accounts.len()),
        ("ClusterRole", m.cluster_roles.len()),
        ("ClusterRoleBinding", m.bindings.len()),
        ("ConfigMap", m.config_maps.len()),
        ("DaemonSet", m.daemon_sets.len()),
    ] {
        if count != 1 {
            problems.push(format!("expected one {kind}, found {count}"));
        }
    }
    if !m.namespaces.iter().any(|ns| name_of(&ns.metadata) == NAMESPACE) {
        problems.push(format!("no Namespace {NAMESPACE}"));
    }
    let namespaced = m
        .service_accounts
        .iter()
        .map(|o| ("ServiceAccount", &o.metadata))
        .chain(m.config_maps.iter().map(|o| ("ConfigMap", &o.metadata)))
        .chain(m.daemon_sets.iter().map(|o| ("DaemonSet", &o.metadata)));
    for (kind, md) in namespaced {
        if md.namespace.as_deref() != Some(NAMESPACE) {
            problems.push(format!(
                "{kind} {}: namespace {:?}, expected {NAMESPACE}",
                name_of(md),
                md.namespace
            ));
        }
    }
    problems
}

/// Exactly get/list/watch on services, nodes and endpointslices; no
/// wildcard, no non-resource URL.
fn check_rbac(m: &Manifests) -> Vec<String> {
    let mut problems = Vec::new();
    let mut granted = BTreeSet::new();
    for role in &m.cluster_roles {
        let name = name_of(&role.metadata);
        if role.aggregation_rule.is_some() {
            problems.push(format!("ClusterRole {name}: aggregates other roles"));
        }
        for (i, rule) in role.rules.iter().flatten().enumerate() {
            let at = format!("ClusterRole {name} rule {}", i + 1);
            let PolicyRule {
                api_groups,
                non_resource_urls,
                resource_names,
                resources,
                verbs,
            } = rule;
            for (field, values) in [
                ("apiGroups", api_groups.as_deref().unwrap_or_default()),
                ("resources", resources.as_deref().unwrap_or_default()),
                ("verbs", verbs.as_slice()),
                ("nonResourceURLs", non_resource_urls.as_deref().unwrap_or_default()),
                ("resourceNames", resource_names.as_deref().unwrap_or_default()),
            ] {
                if values.iter().any(|v| v.contains('*')) {
                    problems.push(format!("{at}: wildcard in {field} {values:?}"));
                }
            }
            if non_resource_urls.as_ref().is_some_and(|u| !u.is_empty()) {
                problems.push(format!("{at}: grants non-resource URLs {non_resource_urls:?}"));
            }
            if resource_names.as_ref().is_some_and(|n| !n.is_empty()) {
                problems.push(format!("{at}: limited to resourceNames {resource_names:?}"));
            }
            for group in api_groups.iter().flatten() {
                for resource in resources.iter().flatten() {
                    for verb in verbs {
                        granted.insert((group.clone(), resource.clone(), verb.clone()));
                    }
                }
            }
        }
    }
    let expected: BTreeSet<(String, String, String)> = RBAC_RESOURCES
        .iter()
        .flat_map(|(g, r)| RBAC_VERBS.iter().map(|v| (g.to_string(), r.to_string(), v.to_string())))
        .collect();
    for (group, resource, verb) in expected.difference(&granted) {
        problems.push(format!("verb {verb} on {resource} (apiGroup {group:?}) is not granted"));
    }
    for (group, resource, verb) in granted.difference(&expected) {
        problems.push(format!(
            "verb {verb} on {resource} (apiGroup {group:?}) is granted but the agent does not need it"
        ));
    }
    problems
}

/// The binding gives the ClusterRole to the ServiceAccount the DaemonSet
/// runs as, and that account exists.
fn check_binding(m: &Manifests) -> Vec<String> {
    let (ds, pod, _) = match agent(m) {
        Ok(a) => a,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    let account = pod.service_account_name.as_deref().unwrap_or("default");
    let account_ns = ds.metadata.namespace.as_deref().unwrap_or("default");
    if !m
        .service_accounts
        .iter()
        .any(|sa| name_of(&sa.metadata) == account && sa.metadata.namespace.as_deref() == Some(account_ns))
    {
        problems.push(format!(
            "DaemonSet {}: runs as ServiceAccount {account_ns}/{account}, which deploy/ does not create",
            name_of(&ds.metadata)
        ));
    }
    for role in &m.cluster_roles {
        let role_name = name_of(&role.metadata);
        let bound = m.bindings.iter().any(|b| {
            b.role_ref.kind == "ClusterRole"
                && b.role_ref.api_group == "rbac.authorization.k8s.io"
                && b.role_ref.name == role_name
                && b.subjects.iter().flatten().any(|s| {
                    s.kind == "ServiceAccount" && s.name == account && s.namespace.as_deref() == Some(account_ns)
                })
        });
        if !bound {
            problems.push(format!(
                "ClusterRole {role_name}: not bound to ServiceAccount {account_ns}/{account}, the DaemonSet's"
            ));
        }
    }
    for b in &m.bindings {
        let name = name_of(&b.metadata);
        if !m.cluster_roles.iter().any(|r| name_of(&r.metadata) == b.role_ref.name) {
            problems.push(format!(
                "ClusterRoleBinding {name}: refers to {} {}, which deploy/ does not create",
                b.role_ref.kind, b.role_ref.name
            ));
        }
        for s in b.subjects.iter().flatten() {
            if s.kind != "ServiceAccount" || s.name != account || s.namespace.as_deref() != Some(account_ns) {
                problems.push(format!(
                    "ClusterRoleBinding {name}: also grants to {} {:?}/{}",
                    s.kind, s.namespace, s.name
                ));
            }
        }
    }
    problems
}

/// Privileged, host network, no host PID namespace, cluster DNS.
fn check_privileges(m: &Manifests) -> Vec<String> {
    let (ds, pod, c) = match agent(m) {
        Ok(a) => a,
        Err(e) => return vec![e],
    };
    let at = format!("DaemonSet {}", name_of(&ds.metadata));
    let mut problems = Vec::new();
    if c.security_context.as_ref().and_then(|s| s.privileged) != Some(true) {
        problems.push(format!("{at}: container {} is not privileged", c.name));
    }
    if pod.host_network != Some(true) {
        problems.push(format!("{at}: hostNetwork is not true"));
    }
    if pod.host_pid == Some(true) {
        problems.push(format!("{at}: hostPID is true; the agent does not need it"));
    }
    if pod.dns_policy.as_deref() != Some("ClusterFirstWithHostNet") {
        problems.push(format!(
            "{at}: dnsPolicy {:?}, expected ClusterFirstWithHostNet",
            pod.dns_policy
        ));
    }
    problems
}

/// bpffs from the host with Bidirectional propagation, BTF read-only.
fn check_mounts(m: &Manifests) -> Vec<String> {
    let (ds, pod, c) = match agent(m) {
        Ok(a) => a,
        Err(e) => return vec![e],
    };
    let at = format!("DaemonSet {}", name_of(&ds.metadata));
    let mut problems = Vec::new();
    for (path, propagation, read_only) in [(BPFFS, Some("Bidirectional"), false), (BTF, None, true)] {
        let Some(mount) = c.volume_mounts.iter().flatten().find(|vm| vm.mount_path == path) else {
            problems.push(format!("{at}: nothing mounted at {path}"));
            continue;
        };
        if let Some(p) = propagation {
            if mount.mount_propagation.as_deref() != Some(p) {
                problems.push(format!(
                    "{at}: mount {path} has propagation {:?}, expected {p}",
                    mount.mount_propagation
                ));
            }
        }
        if mount.read_only.unwrap_or(false) != read_only {
            problems.push(format!(
                "{at}: mount {path} readOnly is {:?}, expected {read_only}",
                mount.read_only
            ));
        }
        let host_path = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .and_then(|v| v.host_path.as_ref());
        match host_path {
            Some(hp) if hp.path == path => {}
            Some(hp) => problems.push(format!(
                "{at}: volume {} mounted at {path} is the host's {}, expected {path}",
                mount.name, hp.path
            )),
            None => problems.push(format!(
                "{at}: volume {} mounted at {path} is not a hostPath volume",
                mount.name
            )),
        }
    }
    problems
}

/// Socket-level load balancing, when configured, attaches to a directory
/// under a read-only mount of the host's /sys/fs/cgroup (inside the
/// container the node's own cgroup tree is not visible otherwise).
fn check_socket_lb(m: &Manifests) -> Vec<String> {
    let (ds, pod, c) = match agent(m) {
        Ok(a) => a,
        Err(e) => return vec![e],
    };
    let Some(cm) = m.config_maps.iter().find(|cm| name_of(&cm.metadata) == CONFIG_MAP) else {
        return vec![format!("no ConfigMap {CONFIG_MAP}")];
    };
    let Some(path) = cm.data.as_ref().and_then(|d| d.get("DATAPLANE_SOCKET_LB_CGROUP")) else {
        return vec![format!("ConfigMap {CONFIG_MAP}: no key DATAPLANE_SOCKET_LB_CGROUP")];
    };
    if path.is_empty() {
        return Vec::new(); // turned off
    }
    let at = format!("DaemonSet {}", name_of(&ds.metadata));
    let mount = c.volume_mounts.iter().flatten().find(|vm| {
        Path::new(path).starts_with(&vm.mount_path)
            && pod
                .volumes
                .iter()
                .flatten()
                .any(|v| v.name == vm.name && v.host_path.as_ref().is_some_and(|hp| hp.path == HOST_CGROUP))
    });
    match mount {
        None => vec![format!(
            "{at}: DATAPLANE_SOCKET_LB_CGROUP {path:?} is not under a mount of the host's {HOST_CGROUP}"
        )],
        Some(vm) if !vm.read_only.unwrap_or(false) => vec![format!(
            "{at}: the host's {HOST_CGROUP} is mounted writable at {}; attaching needs only read access",
            vm.mount_path
        )],
        Some(_) => Vec::new(),
    }
}

/// A probe's port as a number, resolving a named container port.
fn probe_port(c: &Container, port: &IntOrString) -> Option<i32> {
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port),
    }
}

/// Liveness on /healthz, readiness on /readyz, both HTTP on the health port.
fn check_probes(m: &Manifests) -> Vec<String> {
    let (ds, _, c) = match agent(m) {
        Ok(a) => a,
        Err(e) => return vec![e],
    };
    let at = format!("DaemonSet {}", name_of(&ds.metadata));
    let mut problems = Vec::new();
    for (kind, probe, path) in [
        ("liveness", &c.liveness_probe, "/healthz"),
        ("readiness", &c.readiness_probe, "/readyz"),
    ] {
        let Some(get) = probe.as_ref().and_then(|p| p.http_get.as_ref()) else {
            problems.push(format!("{at}: no HTTP {kind} probe"));
            continue;
        };
        if get.path.as_deref() != Some(path) {
            problems.push(format!("{at}: {kind} probe path {:?}, expected {path}", get.path));
        }
        if probe_port(c, &get.port) != Some(HEALTH_PORT) {
            problems.push(format!(
                "{at}: {kind} probe port {:?}, expected {HEALTH_PORT}",
                get.port
            ));
        }
    }
    problems
}

/// NODE_NAME from the downward API, the rest from the ConfigMap.
fn check_env(m: &Manifests) -> Vec<String> {
    let (ds, _, c) = match agent(m) {
        Ok(a) => a,
        Err(e) => return vec![e],
    };
    let at = format!("DaemonSet {}", name_of(&ds.metadata));
    let mut problems = Vec::new();
    let node_name = c.env.iter().flatten().find(|e| e.name == "NODE_NAME");
    let field = node_name
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    if field != Some("spec.nodeName") {
        problems.push(format!(
            "{at}: NODE_NAME does not come from fieldRef spec.nodeName ({node_name:?})"
        ));
    }
    let refs: Vec<_> = c
        .env_from
        .iter()
        .flatten()
        .filter_map(|e| e.config_map_ref.as_ref())
        .collect();
    if !refs.iter().any(|r| r.name == CONFIG_MAP) {
        problems.push(format!("{at}: no envFrom of ConfigMap {CONFIG_MAP}"));
    }
    for r in refs {
        if r.optional == Some(true) {
            problems.push(format!("{at}: envFrom ConfigMap {} is optional", r.name));
        }
        let exists = m
            .config_maps
            .iter()
            .any(|cm| name_of(&cm.metadata) == r.name && cm.metadata.namespace == ds.metadata.namespace);
        if !exists {
            problems.push(format!(
                "{at}: envFrom ConfigMap {}, which deploy/ does not create in {:?}",
                r.name, ds.metadata.namespace
            ));
        }
    }
    problems
}

/// The environment variables of the agent's real command line
/// (`dataplane::cli::args::Cli`, global flags and those of `dataplane run`):
/// variable -> (long flag, whether it takes a value).
fn agent_settings() -> BTreeMap<String, (String, bool)> {
    use clap::CommandFactory;
    let cli = dataplane::cli::args::Cli::command();
    let run = cli.find_subcommand("run").expect("`dataplane run` exists").clone();
    cli.get_arguments()
        .chain(run.get_arguments())
        .filter_map(|a| {
            let env = a.get_env()?.to_string_lossy().into_owned();
            Some((env, (a.get_long()?.to_string(), a.get_action().takes_values())))
        })
        .collect()
}

/// Every required setting present; every key one the agent reads (an
/// environment variable of a flag of its real parser, or one read by its
/// logger or by kube); the values accepted by that parser and by the
/// agent's own validation (`RunArgs::into_config`), as the DaemonSet runs
/// it; and the deploy-specific rules (interface names, the probes' port).
fn check_config(m: &Manifests) -> Vec<String> {
    let Some(cm) = m.config_maps.iter().find(|cm| name_of(&cm.metadata) == CONFIG_MAP) else {
        return vec![format!("no ConfigMap {CONFIG_MAP}")];
    };
    let at = format!("ConfigMap {CONFIG_MAP}");
    let empty = BTreeMap::new();
    let data = cm.data.as_ref().unwrap_or(&empty);
    let mut problems = Vec::new();
    for key in CONFIG_KEYS {
        match data.get(key) {
            None => problems.push(format!("{at}: no key {key}")),
            // An empty socket-LB cgroup turns socket-level load balancing off.
            Some(v) if v.trim().is_empty() && key != "DATAPLANE_SOCKET_LB_CGROUP" => {
                problems.push(format!("{at}: {key} is empty"))
            }
            Some(_) => {}
        }
    }
    // The command line the pod runs, with the ConfigMap's values as the
    // flags their variables stand for (the process environment is not
    // touched: tests run in parallel).
    let settings = agent_settings();
    let mut global = vec!["dataplane".to_string()];
    let mut run: Vec<String> = AGENT_COMMAND[1..].iter().map(|s| s.to_string()).collect();
    run.extend(["--node-name".into(), "node-1".into()]);
    for (key, value) in data {
        match key.as_str() {
            "NODE_NAME" => problems.push(format!(
                "{at}: key NODE_NAME is not a setting for the ConfigMap: it is per node (the downward API sets it)"
            )),
            // Read by the agent's logger (tracing's EnvFilter), not a flag.
            "DATAPLANE_LOG" => {
                if let Err(e) = tracing_subscriber::EnvFilter::try_new(value) {
                    problems.push(format!("{at}: DATAPLANE_LOG={value:?} is not a log filter: {e}"));
                }
            }
            k if OPTIONAL_CONFIG_KEYS.contains(&k) => {}
            k => match settings.get(k) {
                None => problems.push(format!(
                    "{at}: key {k} is not a setting the agent reads (no flag of `dataplane run` has this variable)"
                )),
                Some((long, takes_value)) => {
                    let args = if k == "DATAPLANE_LOG_FORMAT" {
                        &mut global
                    } else {
                        &mut run
                    };
                    match (takes_value, value.as_str()) {
                        // An empty value is an absent one, as the agent documents.
                        (true, "") => {}
                        (true, v) => args.extend([format!("--{long}"), v.to_string()]),
                        (false, "true") => args.push(format!("--{long}")),
                        (false, _) => {}
                    }
                }
            },
        }
    }
    global.extend(run);
    match dataplane::cli::args::Cli::try_parse_from(&global) {
        Err(e) => problems.push(format!(
            "{at}: refused by the agent's parser ({}): {}",
            global.join(" "),
            e.to_string().lines().next().unwrap_or_default()
        )),
        Ok(cli) => match cli.command {
            dataplane::cli::args::Command::Run(args) => {
                if let Err(e) = args.into_config() {
                    problems.push(format!("{at}: refused by the agent: {e:#}"));
                }
            }
            _ => problems.push(format!("{at}: the pod does not run `dataplane run`")),
        },
    }
    for key in ["DATAPLANE_TC_IFACES", "DATAPLANE_XDP_IFACES"] {
        if let Some(v) = data.get(key) {
            if v.split(',')
                .any(|i| i.is_empty() || i.contains(char::is_whitespace) || i.len() > 15)
            {
                problems.push(format!(
                    "{at}: {key} {v:?} is not a comma-separated list of interface names"
                ));
            }
        }
    }
    if let Some(v) = data.get("DATAPLANE_HEALTH_BIND") {
        match v.parse::<SocketAddr>() {
            // With hostNetwork the kubelet probes the node's address.
            Ok(addr) if addr.ip().is_unspecified() && i32::from(addr.port()) == HEALTH_PORT => {}
            Ok(_) => problems.push(format!(
                "{at}: DATAPLANE_HEALTH_BIND {v:?} is not reachable by the probes (expected 0.0.0.0:{HEALTH_PORT})"
            )),
            Err(_) => {} // the parser's refusal above names it
        }
    }
    problems
}

/// The container runs `dataplane run --source kubernetes`.
fn check_command(m: &Manifests) -> Vec<String> {
    let (ds, _, c) = match agent(m) {
        Ok(a) => a,
        Err(e) => return vec![e],
    };
    let argv: Vec<&str> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .map(String::as_str)
        .collect();
    if argv != AGENT_COMMAND {
        return vec![format!(
            "DaemonSet {}: container runs {argv:?}, expected {AGENT_COMMAND:?}",
            name_of(&ds.metadata)
        )];
    }
    if c.image.as_deref().unwrap_or("").is_empty() {
        return vec![format!("DaemonSet {}: container has no image", name_of(&ds.metadata))];
    }
    Vec::new()
}

/// A toleration that matches every taint: operator Exists, no key, no
/// effect.
fn tolerates_everything(t: &Toleration) -> bool {
    t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
}

/// On every node, node-critical, updated one node at a time, with
/// resources and a grace period.
fn check_scheduling(m: &Manifests) -> Vec<String> {
    let (ds, pod, c) = match agent(m) {
        Ok(a) => a,
        Err(e) => return vec![e],
    };
    let at = format!("DaemonSet {}", name_of(&ds.metadata));
    let mut problems = Vec::new();
    if pod.priority_class_name.as_deref() != Some("system-node-critical") {
        problems.push(format!(
            "{at}: priorityClassName {:?}, expected system-node-critical",
            pod.priority_class_name
        ));
    }
    if !pod.tolerations.iter().flatten().any(tolerates_everything) {
        problems.push(format!(
            "{at}: no toleration with operator Exists and no key or effect: tainted nodes get no agent"
        ));
    }
    let strategy = ds.spec.as_ref().and_then(|s| s.update_strategy.as_ref());
    let rolling = strategy.and_then(|s| s.rolling_update.as_ref());
    if strategy.and_then(|s| s.type_.as_deref()) != Some("RollingUpdate") {
        problems.push(format!("{at}: update strategy is not RollingUpdate"));
    }
    if rolling.and_then(|r| r.max_unavailable.as_ref()) != Some(&IntOrString::Int(1)) {
        problems.push(format!(
            "{at}: maxUnavailable {:?}, expected 1 (one node at a time)",
            rolling.and_then(|r| r.max_unavailable.as_ref())
        ));
    }
    match rolling.and_then(|r| r.max_surge.as_ref()) {
        None | Some(IntOrString::Int(0)) => {}
        Some(surge) => problems.push(format!(
            "{at}: maxSurge {surge:?}: two agents on one node would share its attach points and pins"
        )),
    }
    if pod.termination_grace_period_seconds.is_none_or(|s| s <= 0) {
        problems.push(format!(
            "{at}: terminationGracePeriodSeconds {:?} is not set",
            pod.termination_grace_period_seconds
        ));
    }
    let resources = c.resources.as_ref();
    for (kind, list, name) in [
        ("request", resources.and_then(|r| r.requests.as_ref()), "cpu"),
        ("request", resources.and_then(|r| r.requests.as_ref()), "memory"),
        ("limit", resources.and_then(|r| r.limits.as_ref()), "memory"),
    ] {
        if !list.is_some_and(|l| l.contains_key(name)) {
            problems.push(format!("{at}: container {} has no {name} {kind}", c.name));
        }
    }
    problems
}

/// kustomization.yaml lists every manifest file, once, and nothing else,
/// and its image override names the image the DaemonSet runs (a name that
/// matches nothing is silently ignored by kustomize).
fn check_kustomization(m: &Manifests) -> Vec<String> {
    let mut problems = Vec::new();
    let image = agent(m).ok().and_then(|(_, _, c)| c.image.clone()).unwrap_or_default();
    // The name without tag or digest; a registry port (`host:5000/x`) stays.
    let untagged = image.split('@').next().unwrap_or_default();
    let image_name = match untagged.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => name,
        _ => untagged,
    };
    for name in &m.kustomization_images {
        if name != image_name {
            problems.push(format!(
                "kustomization.yaml rewrites image {name}, but the DaemonSet runs {image}"
            ));
        }
    }
    let listed: BTreeSet<&String> = m.kustomization.iter().collect();
    if listed.len() != m.kustomization.len() {
        problems.push(format!("kustomization.yaml lists a file twice: {:?}", m.kustomization));
    }
    for file in &m.files {
        if !listed.contains(file) {
            problems.push(format!("kustomization.yaml does not list deploy/{file}"));
        }
    }
    for file in listed {
        if !m.files.contains(file) {
            problems.push(format!(
                "kustomization.yaml lists {file}, which is not a manifest in deploy/"
            ));
        }
    }
    problems
}

fn assert_clean(check: &str, problems: Vec<String>) {
    assert!(problems.is_empty(), "{check}:\n  {}", problems.join("\n  "));
}

/// Breaks the real manifests with `mutate` and requires `check` to report
/// a problem containing `expect`.
fn assert_catches(case: &str, check: fn(&Manifests) -> Vec<String>, mutate: impl FnOnce(&mut Manifests), expect: &str) {
    let mut m = load();
    assert_clean(case, check(&m));
    mutate(&mut m);
    let problems = check(&m);
    assert!(
        problems.iter().any(|p| p.contains(expect)),
        "{case}: the check did not notice (expected a problem containing {expect:?}, got {problems:?})"
    );
}

// ---- the real manifests ----

#[test]
fn manifests_parse_into_api_types_without_unknown_fields() {
    let m = load();
    assert!(!m.files.is_empty(), "no manifests found in {}", deploy_dir().display());
    assert_clean("objects", check_objects(&m));
}

#[test]
fn rbac_grants_exactly_get_list_watch_on_services_endpointslices_nodes() {
    assert_clean("rbac", check_rbac(&load()));
}

#[test]
fn cluster_role_is_bound_to_the_daemonsets_service_account() {
    assert_clean("binding", check_binding(&load()));
}

#[test]
fn agent_runs_privileged_on_the_host_network() {
    assert_clean("privileges", check_privileges(&load()));
}

#[test]
fn agent_mounts_bpffs_bidirectional_and_btf_read_only() {
    assert_clean("mounts", check_mounts(&load()));
}

#[test]
fn socket_load_balancing_attaches_under_a_read_only_mount_of_the_host_cgroup_tree() {
    assert_clean("socket lb", check_socket_lb(&load()));
}

#[test]
fn socket_lb_check_catches_a_missing_or_writable_cgroup_mount() {
    assert_catches(
        "cgroup not mounted",
        check_socket_lb,
        |m| {
            let vm = container_mut(m).volume_mounts.as_mut().unwrap();
            vm.retain(|v| !v.mount_path.starts_with("/run/dataplane/cgroupv2"));
        },
        "DATAPLANE_SOCKET_LB_CGROUP \"/run/dataplane/cgroupv2\" is not under a mount of the host's /sys/fs/cgroup",
    );
    assert_catches(
        "cgroup path outside the mount",
        check_socket_lb,
        |m| {
            config_map_mut(m).insert("DATAPLANE_SOCKET_LB_CGROUP".into(), "/sys/fs/cgroup".into());
        },
        "is not under a mount of the host's /sys/fs/cgroup",
    );
    assert_catches(
        "cgroup writable",
        check_socket_lb,
        |m| {
            for vm in container_mut(m).volume_mounts.as_mut().unwrap() {
                if vm.mount_path.starts_with("/run/dataplane/cgroupv2") {
                    vm.read_only = None;
                }
            }
        },
        "mounted writable",
    );
    let mut m = load();
    config_map_mut(&mut m).insert("DATAPLANE_SOCKET_LB_CGROUP".into(), String::new());
    assert_clean("socket lb off", check_socket_lb(&m));
}

#[test]
fn agent_probes_healthz_and_readyz_on_the_health_port() {
    assert_clean("probes", check_probes(&load()));
}

#[test]
fn agent_gets_node_name_from_the_downward_api_and_config_from_the_config_map() {
    assert_clean("env", check_env(&load()));
}

#[test]
fn config_map_holds_every_agent_setting_with_a_valid_value() {
    assert_clean("config", check_config(&load()));
}

#[test]
fn agent_runs_dataplane_run_source_kubernetes() {
    assert_clean("command", check_command(&load()));
}

#[test]
fn agent_runs_on_every_node_and_updates_one_node_at_a_time() {
    assert_clean("scheduling", check_scheduling(&load()));
}

#[test]
fn kustomization_lists_every_manifest() {
    assert_clean("kustomization", check_kustomization(&load()));
}

// ---- each check notices when the manifests break ----

#[test]
fn parsing_catches_unknown_fields_and_kinds() {
    let mut m = Manifests::default();
    let typo = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  namespace: dataplane-system\ndatta:\n  A: b\n";
    let err = parse_manifests("typo.yaml", typo, &mut m).unwrap_err();
    assert!(err.contains("field .datta"), "{err}");

    let nested = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n  lables:\n    a: b\n";
    let err = parse_manifests("nested.yaml", nested, &mut m).unwrap_err();
    assert!(err.contains("field .metadata.lables"), "{err}");

    let role = "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: x\n";
    let err = parse_manifests("role.yaml", role, &mut m).unwrap_err();
    assert!(err.contains("role.yaml document 1 (Role x): kind \"Role\""), "{err}");

    let wrong_version = "apiVersion: apps/v1beta2\nkind: DaemonSet\nmetadata:\n  name: x\n";
    assert!(parse_manifests("old.yaml", wrong_version, &mut m).is_err());

    let two = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: b\n---\n";
    parse_manifests("two.yaml", two, &mut m).unwrap();
    assert_eq!(m.namespaces.len(), 2);
}

#[test]
fn object_check_catches_a_missing_object_or_wrong_namespace() {
    assert_catches(
        "second DaemonSet",
        check_objects,
        |m| m.daemon_sets.push(m.daemon_sets[0].clone()),
        "expected one DaemonSet, found 2",
    );
    assert_catches(
        "no ServiceAccount",
        check_objects,
        |m| m.service_accounts.clear(),
        "expected one ServiceAccount, found 0",
    );
    assert_catches(
        "Namespace renamed",
        check_objects,
        |m| m.namespaces[0].metadata.name = Some("kube-system".into()),
        "no Namespace dataplane-system",
    );
    assert_catches(
        "ConfigMap elsewhere",
        check_objects,
        |m| m.config_maps[0].metadata.namespace = Some("default".into()),
        "ConfigMap dataplane-config: namespace",
    );
}

fn rule<'a>(m: &'a mut Manifests, resource: &str) -> &'a mut PolicyRule {
    m.cluster_roles[0]
        .rules
        .as_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r.resources.iter().flatten().any(|x| x == resource))
        .unwrap()
}

#[test]
fn rbac_check_catches_a_missing_verb_an_extra_grant_or_a_wildcard() {
    for (resource, verb) in [("services", "watch"), ("endpointslices", "list"), ("nodes", "get")] {
        assert_catches(
            &format!("{verb} removed from {resource}"),
            check_rbac,
            |m| rule(m, resource).verbs.retain(|v| v != verb),
            &format!("verb {verb} on {resource}"),
        );
    }
    assert_catches(
        "nodes removed",
        check_rbac,
        |m| rule(m, "nodes").resources.as_mut().unwrap().retain(|r| r != "nodes"),
        "verb get on nodes (apiGroup \"\") is not granted",
    );
    assert_catches(
        "create on services",
        check_rbac,
        |m| rule(m, "services").verbs.push("create".into()),
        "verb create on services (apiGroup \"\") is granted",
    );
    assert_catches(
        "pods added",
        check_rbac,
        |m| rule(m, "services").resources.as_mut().unwrap().push("pods".into()),
        "on pods",
    );
    assert_catches(
        "services/status added",
        check_rbac,
        |m| {
            rule(m, "services")
                .resources
                .as_mut()
                .unwrap()
                .push("services/status".into())
        },
        "on services/status",
    );
    assert_catches(
        "endpointslices in the core group",
        check_rbac,
        |m| rule(m, "endpointslices").api_groups = Some(vec![String::new()]),
        "on endpointslices (apiGroup \"\") is granted",
    );
    assert_catches(
        "wildcard verb",
        check_rbac,
        |m| rule(m, "nodes").verbs = vec!["*".into()],
        "wildcard in verbs",
    );
    assert_catches(
        "wildcard resource",
        check_rbac,
        |m| rule(m, "nodes").resources = Some(vec!["*".into()]),
        "wildcard in resources",
    );
    assert_catches(
        "wildcard group",
        check_rbac,
        |m| rule(m, "endpointslices").api_groups = Some(vec!["*".into()]),
        "wildcard in apiGroups",
    );
    assert_catches(
        "non-resource URL",
        check_rbac,
        |m| {
            m.cluster_roles[0].rules.as_mut().unwrap().push(PolicyRule {
                non_resource_urls: Some(vec!["/metrics".into()]),
                verbs: vec!["get".into()],
                ..Default::default()
            })
        },
        "grants non-resource URLs",
    );
    assert_catches(
        "second role with events",
        check_rbac,
        |m| {
            let mut extra = m.cluster_roles[0].clone();
            extra.rules = Some(vec![PolicyRule {
                api_groups: Some(vec!["events.k8s.io".into()]),
                resources: Some(vec!["events".into()]),
                verbs: vec!["create".into()],
                ..Default::default()
            }]);
            m.cluster_roles.push(extra);
        },
        "verb create on events",
    );
}

#[test]
fn binding_check_catches_a_binding_to_another_account_or_role() {
    assert_catches(
        "DaemonSet runs as another account",
        check_binding,
        |m| agent_mut(m).service_account_name = Some("other".into()),
        "runs as ServiceAccount dataplane-system/other, which deploy/ does not create",
    );
    assert_catches(
        "DaemonSet runs as default",
        check_binding,
        |m| agent_mut(m).service_account_name = None,
        "dataplane-system/default",
    );
    assert_catches(
        "subject renamed",
        check_binding,
        |m| m.bindings[0].subjects.as_mut().unwrap()[0].name = "other".into(),
        "not bound to ServiceAccount dataplane-system/dataplane",
    );
    assert_catches(
        "subject in another namespace",
        check_binding,
        |m| m.bindings[0].subjects.as_mut().unwrap()[0].namespace = Some("kube-system".into()),
        "not bound to ServiceAccount",
    );
    assert_catches(
        "roleRef to another role",
        check_binding,
        |m| m.bindings[0].role_ref.name = "cluster-admin".into(),
        "refers to ClusterRole cluster-admin, which deploy/ does not create",
    );
    assert_catches(
        "roleRef kind Role",
        check_binding,
        |m| m.bindings[0].role_ref.kind = "Role".into(),
        "not bound",
    );
    assert_catches(
        "extra subject",
        check_binding,
        |m| {
            let mut s = m.bindings[0].subjects.as_ref().unwrap()[0].clone();
            s.name = "default".into();
            m.bindings[0].subjects.as_mut().unwrap().push(s);
        },
        "also grants to ServiceAccount",
    );
}

#[test]
fn privilege_check_catches_missing_privileges_and_host_pid() {
    assert_catches(
        "not privileged",
        check_privileges,
        |m| container_mut(m).security_context.as_mut().unwrap().privileged = Some(false),
        "is not privileged",
    );
    assert_catches(
        "no securityContext",
        check_privileges,
        |m| container_mut(m).security_context = None,
        "is not privileged",
    );
    assert_catches(
        "no hostNetwork",
        check_privileges,
        |m| agent_mut(m).host_network = None,
        "hostNetwork is not true",
    );
    assert_catches(
        "hostPID",
        check_privileges,
        |m| agent_mut(m).host_pid = Some(true),
        "hostPID is true",
    );
    assert_catches(
        "dnsPolicy",
        check_privileges,
        |m| agent_mut(m).dns_policy = Some("ClusterFirst".into()),
        "dnsPolicy",
    );
}

#[test]
fn mount_check_catches_wrong_propagation_paths_and_missing_mounts() {
    fn mount<'a>(m: &'a mut Manifests, path: &str) -> (&'a mut Vec<VolumeMount>, usize) {
        let vm = container_mut(m).volume_mounts.as_mut().unwrap();
        let i = vm.iter().position(|v| v.mount_path == path).unwrap();
        (vm, i)
    }
    assert_catches(
        "bpffs HostToContainer",
        check_mounts,
        |m| {
            let (vm, i) = mount(m, BPFFS);
            vm[i].mount_propagation = Some("HostToContainer".into());
        },
        "mount /sys/fs/bpf has propagation Some(\"HostToContainer\"), expected Bidirectional",
    );
    assert_catches(
        "bpffs without propagation",
        check_mounts,
        |m| {
            let (vm, i) = mount(m, BPFFS);
            vm[i].mount_propagation = None;
        },
        "expected Bidirectional",
    );
    assert_catches(
        "bpffs read-only",
        check_mounts,
        |m| {
            let (vm, i) = mount(m, BPFFS);
            vm[i].read_only = Some(true);
        },
        "mount /sys/fs/bpf readOnly",
    );
    assert_catches(
        "btf writable",
        check_mounts,
        |m| {
            let (vm, i) = mount(m, BTF);
            vm[i].read_only = None;
        },
        "mount /sys/kernel/btf readOnly is None, expected true",
    );
    assert_catches(
        "btf not mounted",
        check_mounts,
        |m| {
            let (vm, i) = mount(m, BTF);
            vm.remove(i);
        },
        "nothing mounted at /sys/kernel/btf",
    );
    assert_catches(
        "bpffs from another host path",
        check_mounts,
        |m| {
            for v in agent_mut(m).volumes.as_mut().unwrap() {
                if let Some(hp) = v.host_path.as_mut().filter(|hp| hp.path == BPFFS) {
                    hp.path = "/run/bpf".into();
                }
            }
        },
        "is the host's /run/bpf, expected /sys/fs/bpf",
    );
    assert_catches(
        "bpffs as emptyDir",
        check_mounts,
        |m| {
            for v in agent_mut(m).volumes.as_mut().unwrap() {
                if v.host_path.as_ref().is_some_and(|hp| hp.path == BPFFS) {
                    v.host_path = None;
                    v.empty_dir = Some(Default::default());
                }
            }
        },
        "mounted at /sys/fs/bpf is not a hostPath volume",
    );
}

#[test]
fn probe_check_catches_wrong_paths_ports_and_missing_probes() {
    assert_catches(
        "liveness on /readyz",
        check_probes,
        |m| {
            let p = container_mut(m).liveness_probe.as_mut().unwrap();
            p.http_get.as_mut().unwrap().path = Some("/readyz".into());
        },
        "liveness probe path Some(\"/readyz\"), expected /healthz",
    );
    assert_catches(
        "readiness on another port",
        check_probes,
        |m| {
            let p = container_mut(m).readiness_probe.as_mut().unwrap();
            p.http_get.as_mut().unwrap().port = IntOrString::Int(10257);
        },
        "readiness probe port Int(10257), expected 10256",
    );
    assert_catches(
        "readiness on an unknown named port",
        check_probes,
        |m| {
            let p = container_mut(m).readiness_probe.as_mut().unwrap();
            p.http_get.as_mut().unwrap().port = IntOrString::String("nope".into());
        },
        "readiness probe port String(\"nope\")",
    );
    assert_catches(
        "no readiness probe",
        check_probes,
        |m| container_mut(m).readiness_probe = None,
        "no HTTP readiness probe",
    );
    assert_catches(
        "liveness by exec",
        check_probes,
        |m| container_mut(m).liveness_probe.as_mut().unwrap().http_get = None,
        "no HTTP liveness probe",
    );
}

#[test]
fn env_check_catches_a_missing_node_name_or_config_map() {
    assert_catches(
        "NODE_NAME from metadata.name",
        check_env,
        |m| {
            let env = container_mut(m).env.as_mut().unwrap();
            let e = env.iter_mut().find(|e| e.name == "NODE_NAME").unwrap();
            e.value_from.as_mut().unwrap().field_ref.as_mut().unwrap().field_path = "metadata.name".into();
        },
        "NODE_NAME does not come from fieldRef spec.nodeName",
    );
    assert_catches(
        "no NODE_NAME",
        check_env,
        |m| container_mut(m).env.as_mut().unwrap().retain(|e| e.name != "NODE_NAME"),
        "NODE_NAME does not come from fieldRef spec.nodeName (None)",
    );
    assert_catches(
        "envFrom another ConfigMap",
        check_env,
        |m| {
            let from = container_mut(m).env_from.as_mut().unwrap();
            from[0].config_map_ref.as_mut().unwrap().name = "dataplane-cfg".into();
        },
        "envFrom ConfigMap dataplane-cfg, which deploy/ does not create",
    );
    assert_catches(
        "no envFrom",
        check_env,
        |m| container_mut(m).env_from = None,
        "no envFrom of ConfigMap dataplane-config",
    );
    assert_catches(
        "ConfigMap renamed",
        check_env,
        |m| m.config_maps[0].metadata.name = Some("other".into()),
        "envFrom ConfigMap dataplane-config, which deploy/ does not create",
    );
    assert_catches(
        "optional envFrom",
        check_env,
        |m| {
            let from = container_mut(m).env_from.as_mut().unwrap();
            from[0].config_map_ref.as_mut().unwrap().optional = Some(true);
        },
        "is optional",
    );
}

#[test]
fn config_check_catches_missing_unknown_and_invalid_settings() {
    for key in CONFIG_KEYS {
        assert_catches(
            &format!("{key} removed"),
            check_config,
            |m| {
                config_map_mut(m).remove(key);
            },
            &format!("no key {key}"),
        );
    }
    let set = |key: &'static str, value: &'static str| {
        move |m: &mut Manifests| {
            config_map_mut(m).insert(key.into(), value.into());
        }
    };
    for (case, key, value, expect) in [
        (
            "typo key",
            "DATAPLANE_XDP_IFACE",
            "eth0",
            "key DATAPLANE_XDP_IFACE is not a setting the agent reads",
        ),
        (
            "empty TC list",
            "DATAPLANE_TC_IFACES",
            "",
            "DATAPLANE_TC_IFACES is empty",
        ),
        (
            "trailing comma",
            "DATAPLANE_XDP_IFACES",
            "eth0,",
            "not a comma-separated list",
        ),
        (
            "space in list",
            "DATAPLANE_TC_IFACES",
            "eth0, cni0",
            "not a comma-separated list",
        ),
        (
            "bad XDP mode",
            "DATAPLANE_XDP_MODE",
            "skb",
            "refused by the agent's parser",
        ),
        (
            "bad log format",
            "DATAPLANE_LOG_FORMAT",
            "logfmt",
            "invalid value 'logfmt' for '--log-format",
        ),
        (
            "loopback health",
            "DATAPLANE_HEALTH_BIND",
            "127.0.0.1:10256",
            "not reachable by the probes",
        ),
        (
            "other health port",
            "DATAPLANE_HEALTH_BIND",
            "0.0.0.0:8080",
            "not reachable by the probes",
        ),
        (
            "zero conntrack size",
            "DATAPLANE_CT_MAX_ENTRIES",
            "0",
            "refused by the agent",
        ),
        (
            "conntrack size not a number",
            "DATAPLANE_CT_MAX_ENTRIES",
            "lots",
            "refused by the agent's parser",
        ),
        (
            "health not an address",
            "DATAPLANE_HEALTH_BIND",
            ":10256",
            "refused by the agent: --health-bind",
        ),
    ] {
        assert_catches(case, check_config, set(key, value), expect);
    }
    assert_catches(
        "NODE_NAME in the ConfigMap",
        check_config,
        set("NODE_NAME", "node-1"),
        "key NODE_NAME is not a setting for the ConfigMap",
    );
}

#[test]
fn command_check_catches_another_source_or_binary() {
    assert_catches(
        "file source",
        check_command,
        |m| container_mut(m).args = Some(vec!["run".into(), "--source".into(), "files".into()]),
        "expected [\"/usr/local/bin/dataplane\", \"run\", \"--source\", \"kubernetes\"]",
    );
    assert_catches(
        "no command (image entrypoint)",
        check_command,
        |m| container_mut(m).command = None,
        "container runs [\"run\"",
    );
    assert_catches(
        "other binary",
        check_command,
        |m| container_mut(m).command = Some(vec!["/bin/dataplane".into()]),
        "container runs [\"/bin/dataplane\"",
    );
    assert_catches(
        "no image",
        check_command,
        |m| container_mut(m).image = None,
        "container has no image",
    );
}

#[test]
fn scheduling_check_catches_priority_tolerations_strategy_and_resources() {
    assert_catches(
        "no priority class",
        check_scheduling,
        |m| agent_mut(m).priority_class_name = None,
        "priorityClassName None, expected system-node-critical",
    );
    assert_catches(
        "toleration for one taint",
        check_scheduling,
        |m| {
            agent_mut(m).tolerations = Some(vec![Toleration {
                key: Some("node-role.kubernetes.io/control-plane".into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Default::default()
            }])
        },
        "no toleration with operator Exists",
    );
    assert_catches(
        "toleration for NoSchedule only",
        check_scheduling,
        |m| agent_mut(m).tolerations.as_mut().unwrap()[0].effect = Some("NoSchedule".into()),
        "no toleration with operator Exists",
    );
    assert_catches(
        "no tolerations",
        check_scheduling,
        |m| agent_mut(m).tolerations = None,
        "tainted nodes get no agent",
    );
    fn strategy(m: &mut Manifests) -> &mut DaemonSetUpdateStrategy {
        m.daemon_sets[0]
            .spec
            .as_mut()
            .unwrap()
            .update_strategy
            .as_mut()
            .unwrap()
    }
    assert_catches(
        "OnDelete",
        check_scheduling,
        |m| {
            let s = strategy(m);
            s.type_ = Some("OnDelete".into());
            s.rolling_update = None;
        },
        "update strategy is not RollingUpdate",
    );
    assert_catches(
        "two nodes at a time",
        check_scheduling,
        |m| strategy(m).rolling_update.as_mut().unwrap().max_unavailable = Some(IntOrString::Int(2)),
        "maxUnavailable Some(Int(2)), expected 1",
    );
    assert_catches(
        "percentage",
        check_scheduling,
        |m| strategy(m).rolling_update.as_mut().unwrap().max_unavailable = Some(IntOrString::String("10%".into())),
        "maxUnavailable Some(String(\"10%\"))",
    );
    assert_catches(
        "surge",
        check_scheduling,
        |m| strategy(m).rolling_update.as_mut().unwrap().max_surge = Some(IntOrString::Int(1)),
        "maxSurge Int(1)",
    );
    assert_catches(
        "no grace period",
        check_scheduling,
        |m| agent_mut(m).termination_grace_period_seconds = None,
        "terminationGracePeriodSeconds None",
    );
    assert_catches(
        "no memory limit",
        check_scheduling,
        |m| {
            let r = container_mut(m).resources.as_mut().unwrap();
            r.limits.as_mut().unwrap().remove("memory");
        },
        "has no memory limit",
    );
    assert_catches(
        "no requests",
        check_scheduling,
        |m| container_mut(m).resources.as_mut().unwrap().requests = None,
        "has no cpu request",
    );
}

#[test]
fn kustomization_check_catches_missing_extra_and_duplicate_files_and_a_stray_image() {
    assert_catches(
        "file not listed",
        check_kustomization,
        |m| m.kustomization.retain(|f| f != "clusterrole.yaml"),
        "kustomization.yaml does not list deploy/clusterrole.yaml",
    );
    assert_catches(
        "new manifest not listed",
        check_kustomization,
        |m| m.files.push("networkpolicy.yaml".into()),
        "does not list deploy/networkpolicy.yaml",
    );
    assert_catches(
        "listed file missing",
        check_kustomization,
        |m| m.kustomization.push("service.yaml".into()),
        "lists service.yaml, which is not a manifest in deploy/",
    );
    assert_catches(
        "listed twice",
        check_kustomization,
        |m| {
            let first = m.kustomization[0].clone();
            m.kustomization.push(first);
        },
        "lists a file twice",
    );
    assert_catches(
        "image renamed in the DaemonSet only",
        check_kustomization,
        |m| container_mut(m).image = Some("dataplane-agent:0.1.0".into()),
        "rewrites image dataplane, but the DaemonSet runs dataplane-agent:0.1.0",
    );
}

#[test]
fn loading_reads_a_directory_of_manifests_and_its_kustomization() {
    // The loader itself, on a copy: a new manifest that kustomization.yaml
    // does not list is found (and the check fails), subdirectories are not
    // read.
    let dir = std::env::temp_dir().join(format!("dpt{}-deploy", std::process::id()));
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    fs::create_dir_all(dir.join("examples")).unwrap();
    for entry in fs::read_dir(deploy_dir()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    fs::write(dir.join("examples/ignored.yaml"), "kind: Whatever\n").unwrap();
    let m = load_dir(&dir).unwrap();
    assert_clean("copy", check_kustomization(&m));
    fs::write(
        dir.join("extra.yaml"),
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: extra\n  namespace: dataplane-system\n",
    )
    .unwrap();
    let m = load_dir(&dir).unwrap();
    assert_eq!(m.service_accounts.len(), 2);
    assert!(check_kustomization(&m)
        .iter()
        .any(|p| p.contains("does not list deploy/extra.yaml")));
    assert!(check_objects(&m)
        .iter()
        .any(|p| p.contains("expected one ServiceAccount, found 2")));
}

/// The build file puts the binary where the DaemonSet runs it, builds the
/// eBPF object before the agent that embeds it, and ends on a slim base;
/// the build context leaves out target/.
fn check_container_build(dockerfile: &str, dockerignore: &str) -> Vec<String> {
    let mut problems = Vec::new();
    // Instructions only: the comments mention the same commands.
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let stages: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("FROM ")).collect();
    if stages.len() < 2 {
        problems.push(format!(
            "Dockerfile: {} stage(s), expected a builder and a runtime stage",
            stages.len()
        ));
    }
    if !stages.last().is_some_and(|s| s.contains("-slim")) {
        problems.push(format!(
            "Dockerfile: the runtime stage {:?} is not a slim base",
            stages.last()
        ));
    }
    let position = |needle: &str| lines.iter().position(|l| l.contains(needle));
    match (position("cargo xtask build-ebpf"), position("cargo build --release")) {
        (Some(ebpf), Some(user)) if ebpf < user => {}
        (ebpf, user) => problems.push(format!(
            "Dockerfile: `cargo xtask build-ebpf` (line {ebpf:?}) must run before the agent's release build (line {user:?})"
        )),
    }
    if !lines
        .iter()
        .any(|l| l.contains("cargo build --release") && l.contains("-p dataplane-user"))
    {
        problems.push("Dockerfile: no release build of dataplane-user".into());
    }
    if !lines
        .iter()
        .any(|l| l.contains("cargo \"+$NIGHTLY\" install bpf-linker"))
    {
        problems.push("Dockerfile: bpf-linker is not built with the pinned nightly toolchain".into());
    }
    let binary = AGENT_COMMAND[0];
    let runtime_start = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap_or(0);
    if !lines[runtime_start..]
        .iter()
        .any(|l| l.starts_with("COPY --from=") && l.ends_with(&format!(" {binary}")))
    {
        problems.push(format!(
            "Dockerfile: the runtime stage does not copy the agent to {binary}"
        ));
    }
    if !dockerignore
        .lines()
        .any(|l| matches!(l.trim(), "target" | "target/" | "/target" | "/target/"))
    {
        problems.push(".dockerignore: target/ is not excluded".into());
    }
    problems
}

#[test]
fn container_build_installs_the_binary_the_daemonset_runs() {
    let root = deploy_dir().parent().unwrap().to_path_buf();
    let dockerfile = fs::read_to_string(root.join("deploy/Dockerfile")).expect("reading deploy/Dockerfile");
    let dockerignore = fs::read_to_string(root.join(".dockerignore")).expect("reading .dockerignore");
    assert_clean("container build", check_container_build(&dockerfile, &dockerignore));

    for (case, from, to, expect) in [
        (
            "binary elsewhere",
            "/out/dataplane /usr/local/bin/dataplane",
            "/out/dataplane /bin/dataplane",
            "does not copy the agent",
        ),
        (
            "full runtime base",
            "debian:${DEBIAN_RELEASE}-slim",
            "debian:${DEBIAN_RELEASE}",
            "is not a slim base",
        ),
        ("no eBPF build", "cargo xtask build-ebpf;", "true;", "must run before"),
        (
            "another package",
            "-p dataplane-user",
            "-p xtask",
            "no release build of dataplane-user",
        ),
        (
            "stable bpf-linker",
            "cargo \"+$NIGHTLY\" install bpf-linker",
            "cargo install bpf-linker",
            "bpf-linker is not built",
        ),
    ] {
        assert!(dockerfile.contains(from), "{case}: {from:?} not in the Dockerfile");
        let broken = dockerfile.replace(from, to);
        let problems = check_container_build(&broken, &dockerignore);
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "{case}: not noticed (expected {expect:?}, got {problems:?})"
        );
    }
    let problems = check_container_build(&dockerfile, "bench-results/\n");
    assert!(
        problems.iter().any(|p| p.contains("target/ is not excluded")),
        "{problems:?}"
    );
}

/// The container build pins the toolchain the repository pins: the nightly
/// of dataplane-ebpf/rust-toolchain.toml and xtask's bpf-linker release.
#[test]
fn container_build_pins_the_same_toolchain_as_the_repository() {
    let root = deploy_dir().parent().unwrap().to_path_buf();
    let read = |p: &str| fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let value_after = |text: &str, prefix: &str, end: char| -> String {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(|v| v.trim_matches(|c| c == '"' || c == end || c == ';').to_string())
            .unwrap_or_else(|| panic!("no line starting with {prefix:?}"))
    };
    let dockerfile = read("deploy/Dockerfile");
    let channel = value_after(&read("dataplane-ebpf/rust-toolchain.toml"), "channel = ", '"');
    let linker = value_after(&read("xtask/src/main.rs"), "pub const BPF_LINKER_VERSION: &str = ", '"');
    assert!(channel.starts_with("nightly-20"), "not a dated nightly: {channel}");
    assert_eq!(value_after(&dockerfile, "ARG NIGHTLY=", '"'), channel);
    assert_eq!(value_after(&dockerfile, "ARG BPF_LINKER_VERSION=", '"'), linker);
}
