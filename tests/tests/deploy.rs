//! The `deploy/` manifests and container build against the agent's
//! contract. Every manifest is parsed into the k8s-openapi type of its kind
//! (a field the type does not know is an error); each concern is a check
//! ([`CHECKS`]) that lists the problems it finds. The real files must pass
//! every check, and [`CASES`] break them one edit at a time and require the
//! named check to notice, so no check can pass vacuously. The ConfigMap is
//! checked against the agent's own command line (`dataplane::cli::args::Cli`),
//! not a list kept here. `deploy/examples/` is not read (the unit tests and
//! the demo use it).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::{CommandFactory, Parser};
use dataplane::cli::args::{self, Cli};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, ServiceAccount, Toleration, VolumeMount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Subject},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_yaml_ng::Value;

const NAMESPACE: &str = "dataplane-system";
const CONFIG_MAP: &str = "dataplane-config";
const HEALTH_PORT: i32 = 10256;
const AGENT_COMMAND: [&str; 4] = ["/usr/local/bin/dataplane", "run", "--source", "kubernetes"];
const BPFFS: &str = "/sys/fs/bpf";
const BTF: &str = "/sys/kernel/btf";
/// The host directory whose cgroup v2 hierarchy the socket-level programs attach to.
const HOST_CGROUP: &str = "/sys/fs/cgroup";
/// What the agent may do: these verbs on these (apiGroup, resource) pairs, and nothing else.
const RBAC_RESOURCES: [(&str, &str); 3] = [("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices")];
const RBAC_VERBS: [&str; 3] = ["get", "list", "watch"];
/// Settings the deployment must set explicitly (which keys exist at all
/// comes from the agent's parser, see `check_config`).
const CONFIG_KEYS: [&str; 7] = [
    "DATAPLANE_TC_IFACES",
    "DATAPLANE_XDP_IFACES",
    "DATAPLANE_XDP_MODE",
    "DATAPLANE_SOCKET_LB_CGROUP",
    "DATAPLANE_LOG",
    "DATAPLANE_LOG_FORMAT",
    "DATAPLANE_HEALTH_BIND",
];
/// The API server's address, for when kube-proxy no longer translates the
/// `kubernetes` Service: read by kube's in-cluster configuration, no flag.
const KUBE_KEYS: [&str; 2] = ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"];
/// Files outside `deploy/` that the checks read, relative to it.
const OUTSIDE: [&str; 3] = [
    "../.dockerignore",
    "../dataplane-ebpf/rust-toolchain.toml",
    "../xtask/src/main.rs",
];

// ---- loading ----

/// Files by path relative to `deploy/`: its YAML files and Dockerfile, and [`OUTSIDE`].
type Files = BTreeMap<String, String>;

/// Every manifest, by kind, what kustomization.yaml lists, and the other files.
#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    /// The manifest files (not kustomization.yaml).
    files: Vec<String>,
    kustomization: Kustomization,
    /// The files that are not YAML.
    texts: Files,
}

#[derive(Default, Deserialize)]
struct Kustomization {
    resources: Vec<String>,
    #[serde(default)]
    images: Vec<KustomizationImage>,
}

#[derive(Default, Deserialize)]
struct KustomizationImage {
    name: String,
}

/// The YAML files and the Dockerfile directly in `dir` (subdirectories such
/// as `examples/` hold no manifests to apply).
fn read_dir(dir: &Path) -> Result<Files, String> {
    let io = |e: std::io::Error| format!("reading {}: {e}", dir.display());
    let mut files = Files::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let wanted = name.ends_with(".yaml") || name.ends_with(".yml") || name == "Dockerfile";
        if wanted && entry.file_type().map_err(io)?.is_file() {
            files.insert(name, fs::read_to_string(entry.path()).map_err(io)?);
        }
    }
    Ok(files)
}

fn load() -> Files {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut files = read_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    for path in OUTSIDE {
        let text = fs::read_to_string(dir.join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        files.insert(path.into(), text);
    }
    files
}

fn parse(files: &Files) -> Result<Manifests, String> {
    let mut m = Manifests::default();
    for (name, text) in files {
        if name == "kustomization.yaml" {
            m.kustomization = serde_yaml_ng::from_str(text).map_err(|e| format!("deploy/{name}: {e}"))?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            parse_manifests(&format!("deploy/{name}"), text, &mut m)?;
            m.files.push(name.clone());
        } else {
            m.texts.insert(name.clone(), text.clone());
        }
    }
    Ok(m)
}

/// Parses every document of one file into the type of its kind.
fn parse_manifests(file: &str, text: &str, m: &mut Manifests) -> Result<(), String> {
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let at = format!("{file} document {}", i + 1);
        let value = Value::deserialize(doc).map_err(|e| format!("{at}: invalid YAML: {e}"))?;
        let field = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
        let (kind, md) = (field(value.get("kind")), value.get("metadata"));
        let at = format!("{at} ({kind} {})", field(md.and_then(|md| md.get("name"))));
        match kind.as_str() {
            _ if value.is_null() => {}
            "Namespace" => m.namespaces.push(typed(&at, value)?),
            "ServiceAccount" => m.service_accounts.push(typed(&at, value)?),
            "ClusterRole" => m.cluster_roles.push(typed(&at, value)?),
            "ClusterRoleBinding" => m.bindings.push(typed(&at, value)?),
            "ConfigMap" => m.config_maps.push(typed(&at, value)?),
            "DaemonSet" => m.daemon_sets.push(typed(&at, value)?),
            _ => return Err(format!("{at}: kind {kind:?} is not one this test knows how to check")),
        }
    }
    Ok(())
}

/// Deserializes into `T` and requires the result to serialize back to the
/// same document: k8s-openapi ignores fields it does not know, so a
/// misspelt field (`mountPropogation`) would otherwise vanish silently.
fn typed<T: DeserializeOwned + Serialize>(at: &str, value: Value) -> Result<T, String> {
    let written = serde_json::to_value(&value).map_err(|e| format!("{at}: {e}"))?;
    let object: T = serde_yaml_ng::from_value(value).map_err(|e| format!("{at}: {e}"))?;
    let read = serde_json::to_value(&object).map_err(|e| format!("{at}: {e}"))?;
    match first_difference("", &written, &read) {
        None => Ok(object),
        Some(path) => Err(format!("{at}: field {path} is not part of the API type")),
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
        (Value::Array(w), Value::Array(r)) if w.len() == r.len() => {
            let mut items = w.iter().zip(r).enumerate();
            items.find_map(|(i, (wv, rv))| first_difference(&format!("{path}[{i}]"), wv, rv))
        }
        _ if written == read => None,
        _ => Some(path.to_string()),
    }
}

fn name(md: &ObjectMeta) -> &str {
    md.name.as_deref().unwrap_or_default()
}

/// The items of an optional list (most lists of the API types are).
fn all<T>(list: &Option<Vec<T>>) -> &[T] {
    list.as_deref().unwrap_or_default()
}

/// The one DaemonSet, its pod spec and its one container.
fn agent(m: &Manifests) -> Result<(&DaemonSet, &PodSpec, &Container), String> {
    let [ds] = m.daemon_sets.as_slice() else {
        return Err(format!("expected one DaemonSet, found {}", m.daemon_sets.len()));
    };
    let pod = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref());
    match pod.map(|pod| (pod, pod.containers.as_slice())) {
        Some((pod, [container])) => Ok((ds, pod, container)),
        _ => Err("DaemonSet: not one container".into()),
    }
}

/// The data of the agent's ConfigMap.
fn config(m: &Manifests) -> Result<BTreeMap<String, String>, String> {
    let cm = m.config_maps.iter().find(|cm| name(&cm.metadata) == CONFIG_MAP);
    let cm = cm.ok_or(format!("no ConfigMap {CONFIG_MAP}"))?;
    Ok(cm.data.clone().unwrap_or_default())
}

/// The host path of the pod's volume `volume`, if it is a hostPath volume.
fn host_path<'a>(pod: &'a PodSpec, volume: &str) -> Option<&'a str> {
    let v = all(&pod.volumes).iter().find(|v| v.name == volume)?;
    Some(&v.host_path.as_ref()?.path)
}

fn text<'a>(m: &'a Manifests, file: &str) -> Result<&'a str, String> {
    m.texts.get(file).map(String::as_str).ok_or(format!("no file {file}"))
}

// ---- checks: each records every problem it finds, or why it cannot go on ----

type CheckFn = fn(&Manifests, &mut Vec<String>) -> Result<(), String>;

/// What the deployment promises, one concern each, by the name [`CASES`] uses.
const CHECKS: [(&str, CheckFn); 14] = [
    ("Objects", check_objects),
    ("Rbac", check_rbac),
    ("Binding", check_binding),
    ("Privileges", check_privileges),
    ("Mounts", check_mounts),
    ("SocketLb", check_socket_lb),
    ("Probes", check_probes),
    ("Env", check_env),
    ("Config", check_config),
    ("Command", check_command),
    ("Scheduling", check_scheduling),
    ("Kustomization", check_kustomization),
    ("Build", check_build),
    ("Toolchain", check_toolchain),
];

fn problems(check: CheckFn, m: &Manifests) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = check(m, &mut problems) {
        problems.push(e);
    }
    problems
}

/// Records a problem unless the condition holds.
macro_rules! require {
    ($problems:ident, $cond:expr, $($msg:tt)+) => {
        if !$cond {
            $problems.push(format!($($msg)+));
        }
    };
}

/// Records a problem unless `actual` is `expected`.
fn want<T: PartialEq + Debug>(p: &mut Vec<String>, what: &str, actual: T, expected: T) {
    require!(p, actual == expected, "{what}: {actual:?}, expected {expected:?}");
}

/// One object of each kind, namespaced ones in the agent's namespace.
fn check_objects(m: &Manifests, p: &mut Vec<String>) -> Result<(), String> {
    want(p, "number of Namespaces", m.namespaces.len(), 1);
    want(p, "number of ServiceAccounts", m.service_accounts.len(), 1);
    want(p, "number of ClusterRoles", m.cluster_roles.len(), 1);
    want(p, "number of ClusterRoleBindings", m.bindings.len(), 1);
    want(p, "number of ConfigMaps", m.config_maps.len(), 1);
    want(p, "number of DaemonSets", m.daemon_sets.len(), 1);
    let namespaces: Vec<&str> = m.namespaces.iter().map(|ns| name(&ns.metadata)).collect();
    require!(p, namespaces.contains(&NAMESPACE), "no Namespace {NAMESPACE}");
    let sa = m.service_accounts.iter().map(|o| ("ServiceAccount", &o.metadata));
    let cm = m.config_maps.iter().map(|o| ("ConfigMap", &o.metadata));
    let ds = m.daemon_sets.iter().map(|o| ("DaemonSet", &o.metadata));
    for (kind, md) in sa.chain(cm).chain(ds) {
        let what = format!("{kind} {} namespace", name(md));
        want(p, &what, md.namespace.as_deref(), Some(NAMESPACE));
    }
    Ok(())
}

/// Exactly get/list/watch on services, nodes and endpointslices (so no
/// wildcard either); no non-resource URL, no resourceNames, no aggregation.
fn check_rbac(m: &Manifests, p: &mut Vec<String>) -> Result<(), String> {
    let grant = |g: &str, r: &str, v: &str| format!("verb {v} on {r} (apiGroup {g:?})");
    let mut granted = BTreeSet::new();
    for role in &m.cluster_roles {
        let at = format!("ClusterRole {}", name(&role.metadata));
        require!(p, role.aggregation_rule.is_none(), "{at}: aggregates other roles");
        for rule in all(&role.rules) {
            // Every field, so that a new one in the API type is a compile error here.
            let PolicyRule {
                api_groups,
                non_resource_urls,
                resource_names,
                resources,
                verbs,
            } = rule;
            let (urls, names) = (all(non_resource_urls), all(resource_names));
            require!(p, urls.is_empty(), "{at}: grants non-resource URLs {urls:?}");
            require!(p, names.is_empty(), "{at}: limited to resourceNames {names:?}");
            for g in all(api_groups) {
                for r in all(resources) {
                    granted.extend(verbs.iter().map(|v| grant(g, r, v)));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (g, r) in RBAC_RESOURCES {
        expected.extend(RBAC_VERBS.map(|v| grant(g, r, v)));
    }
    for missing in expected.difference(&granted) {
        p.push(format!("{missing} is not granted"));
    }
    for extra in granted.difference(&expected) {
        p.push(format!("{extra} is granted but the agent does not need it"));
    }
    Ok(())
}

/// Every ClusterRole is bound, and only to the ServiceAccount the DaemonSet
/// runs as, which deploy/ creates.
fn check_binding(m: &Manifests, p: &mut Vec<String>) -> Result<(), String> {
    let (ds, pod, _) = agent(m)?;
    let subject = |kind: &str, ns: &Option<String>, n: &str| format!("{kind} {}/{n}", ns.as_deref().unwrap_or(""));
    let account = pod.service_account_name.as_deref().unwrap_or("default");
    let runs_as = subject("ServiceAccount", &ds.metadata.namespace, account);
    let sa = |md: &ObjectMeta| subject("ServiceAccount", &md.namespace, name(md));
    let created = m.service_accounts.iter().any(|a| sa(&a.metadata) == runs_as);
    require!(p, created, "the DaemonSet runs as {runs_as}, not created by deploy/");
    let roles: Vec<&str> = m.cluster_roles.iter().map(|r| name(&r.metadata)).collect();
    for b in &m.bindings {
        let (at, r) = (format!("ClusterRoleBinding {}", name(&b.metadata)), &b.role_ref);
        let of = |s: &Subject| subject(&s.kind, &s.namespace, &s.name);
        let subjects: Vec<String> = all(&b.subjects).iter().map(of).collect();
        want(p, &format!("{at} subjects"), subjects, vec![runs_as.clone()]);
        let cluster_role = r.api_group == "rbac.authorization.k8s.io" && r.kind == "ClusterRole";
        let known = cluster_role && roles.contains(&&*r.name);
        require!(p, known, "{at}: refers to {} {}, not in deploy/", r.kind, r.name);
    }
    for role in roles {
        let refers = |b: &ClusterRoleBinding| b.role_ref.kind == "ClusterRole" && b.role_ref.name == role;
        require!(p, m.bindings.iter().any(refers), "ClusterRole {role} is not bound");
    }
    Ok(())
}

/// Privileged, host network, no host PID namespace, cluster DNS.
fn check_privileges(m: &Manifests, p: &mut Vec<String>) -> Result<(), String> {
    let (_, pod, c) = agent(m)?;
    let privileged = c.security_context.as_ref().and_then(|s| s.privileged);
    want(p, "securityContext.privileged", privileged, Some(true));
    want(p, "hostNetwork", pod.host_network, Some(true));
    want(p, "hostPID", pod.host_pid.unwrap_or(false), false);
    let dns = pod.dns_policy.as_deref();
    want(p, "dnsPolicy", dns, Some("ClusterFirstWithHostNet"));
    Ok(())
}

/// bpffs from the host with Bidirectional propagation, BTF read-only.
fn check_mounts(m: &Manifests, p: &mut Vec<String>) -> Result<(), String> {
    let (_, pod, c) = agent(m)?;
    for (path, propagation, read_only) in [(BPFFS, Some("Bidirectional"), false), (BTF, None, true)] {
        let Some(mount) = all(&c.volume_mounts).iter().find(|vm| vm.mount_path == path) else {
            p.push(format!("nothing mounted at {path}"));
            continue;
        };
        let what = |field: &str| format!("mount {path} {field}");
        if propagation.is_some() {
            let actual = mount.mount_propagation.as_deref();
            want(p, &what("mountPropagation"), actual, propagation);
        }
        want(p, &what("readOnly"), mount.read_only.unwrap_or(false), read_only);
        want(p, &what("hostPath"), host_path(pod, &mount.name), Some(path));
    }
    Ok(())
}

/// Socket-level load balancing, unless turned off (an empty value), attaches
/// to a directory under a read-only mount of the host's /sys/fs/cgroup
/// (inside the container the node's own cgroup tree is not visible
/// otherwise). That the key is there is `check_config`'s.
fn check_socket_lb(m: &Manifests, p: &mut Vec<String>) -> Result<(), String> {
    let (_, pod, c) = agent(m)?;
    let path = config(m)?.remove("DATAPLANE_SOCKET_LB_CGROUP").unwrap_or_default();
    let under = |vm: &&VolumeMount| {
        Path::new(&path).starts_with(&vm.mount_path) && host_path(pod, &vm.name) == Some(HOST_CGROUP)
    };
    match all(&c.volume_mounts).iter().find(under) {
        _ if path.is_empty() => {}
        None => p.push(format!("{path:?} is under no mount of the host's {HOST_CGROUP}")),
        // Attaching needs only a directory fd.
        Some(vm) => {
            let what = format!("{HOST_CGROUP} at {} readOnly", vm.mount_path);
            want(p, &what, vm.read_only, Some(true));
        }
    }
    Ok(())
}

/// Liveness on /healthz, readiness on /readyz, both HTTP on the health port
/// (a named port resolved through the container's ports).
fn check_probes(m: &Manifests, p: &mut Vec<String>) -> Result<(), String> {
    let (_, _, c) = agent(m)?;
    let liveness = ("livenessProbe", &c.liveness_probe, "/healthz");
    for (kind, probe, path) in [liveness, ("readinessProbe", &c.readiness_probe, "/readyz")] {
        let Some(get) = probe.as_ref().and_then(|p| p.http_get.as_ref()) else {
            p.push(format!("no HTTP {kind}"));
            continue;
        };
        want(p, &format!("{kind} path"), get.path.as_deref(), Some(path));
        let named = |n: &String| all(&c.ports).iter().find(|cp| cp.name.as_ref() == Some(n));
        let port = match &get.port {
            IntOrString::Int(n) => Some(*n),
            IntOrString::String(n) => named(n).map(|cp| cp.container_port),
        };
        want(p, &format!("{kind} port {:?}", get.port), port, Some(HEALTH_PORT));
    }
    Ok(())
}

/// NODE_NAME from the downward API, the rest from the ConfigMap (which
/// deploy/ creates next to the DaemonSet, and is not optional).
fn check_env(m: &Manifests, p: &mut Vec<String>) -> Result<(), String> {
    let (ds, _, c) = agent(m)?;
    let node_name = all(&c.env).iter().find(|e| e.name == "NODE_NAME");
    let field = node_name.and_then(|e| Some(e.value_from.as_ref()?.field_ref.as_ref()?.field_path.as_str()));
    want(p, "NODE_NAME fieldRef", field, Some("spec.nodeName"));
    let refs: Vec<_> = all(&c.env_from).iter().flat_map(|e| &e.config_map_ref).collect();
    let from_config_map = refs.iter().any(|r| r.name == CONFIG_MAP);
    require!(p, from_config_map, "no envFrom of ConfigMap {CONFIG_MAP}");
    for r in refs {
        require!(p, r.optional != Some(true), "envFrom ConfigMap {} is optional", r.name);
        let created = |cm: &ConfigMap| name(&cm.metadata) == r.name && cm.metadata.namespace == ds.metadata.namespace;
        let created = m.config_maps.iter().any(created);
        require!(p, created, "envFrom ConfigMap {}, not created by deploy/", r.name);
    }
    Ok(())
}

/// Every required setting present; every key one the agent reads; the
/// values accepted by the agent's real parser and by its own validation
/// (`RunArgs::into_config`), on the command line the DaemonSet runs; and
/// the deploy-specific rules (interface names, the probes' port).
fn check_config(m: &Manifests, p: &mut Vec<String>) -> Result<(), String> {
    let (_, _, c) = agent(m)?;
    let data = config(m)?;
    for key in CONFIG_KEYS {
        match data.get(key).map(|v| v.trim()) {
            None => p.push(format!("no key {key}")),
            // An empty socket-LB cgroup is meant to turn it off.
            Some("") if key != "DATAPLANE_SOCKET_LB_CGROUP" => p.push(format!("{key} is empty")),
            Some(_) => {}
        }
    }
    // The variable of every flag of the agent: its global ones and those of `dataplane run`.
    let cli = Cli::command();
    let run = cli.find_subcommand("run").ok_or("the agent has no `run` subcommand")?;
    let flags: BTreeMap<String, &clap::Arg> = (cli.get_arguments().chain(run.get_arguments()))
        .filter_map(|a| Some((a.get_env()?.to_string_lossy().into_owned(), a)))
        .collect();
    // The pod's command line, each ConfigMap value as the flag its variable
    // stands for (not through the process environment: tests run in
    // parallel threads), and NODE_NAME as the downward API sets it.
    let mut argv = vec!["dataplane".to_string()];
    argv.extend(all(&c.args).iter().cloned());
    argv.extend(["--node-name".into(), "node-1".into()]);
    for (key, value) in &data {
        match (key.as_str(), flags.get(key)) {
            ("NODE_NAME", _) => p.push("key NODE_NAME is per node: the downward API sets it".into()),
            // No flag: `dataplane::cli::main` hands it to tracing's EnvFilter,
            // and falls back to `info`, silently, when it does not parse.
            ("DATAPLANE_LOG", _) => {
                let e = tracing_subscriber::EnvFilter::try_new(value).err();
                require!(p, e.is_none(), "DATAPLANE_LOG={value:?} is not a log filter: {e:?}");
            }
            (k, _) if KUBE_KEYS.contains(&k) => {}
            (k, None) => p.push(format!("key {k} is not a setting the agent reads (no flag's)")),
            (k, Some(flag)) => {
                let long = format!("--{}", flag.get_long().ok_or(format!("{k}: no long flag"))?);
                // A switch takes exactly `true` or `false` from its variable.
                match (flag.get_action().takes_values(), value.as_str()) {
                    (true, v) => argv.extend([long, v.into()]),
                    (false, "true") => argv.push(long),
                    (false, "false") => {}
                    (false, v) => p.push(format!("{k}={v:?}: {long} is a switch, true or false")),
                }
            }
        }
    }
    match Cli::try_parse_from(&argv).map(|cli| cli.command) {
        Err(e) => {
            let e = e.to_string();
            let e = e.lines().next().unwrap_or_default();
            p.push(format!("refused by the agent's parser ({}): {e}", argv.join(" ")));
        }
        Ok(args::Command::Run(run)) => {
            let e = run.into_config().err();
            require!(p, e.is_none(), "refused by the agent: {:#}", e.unwrap());
        }
        Ok(_) => p.push("the pod does not run `dataplane run`".into()),
    }
    for key in ["DATAPLANE_TC_IFACES", "DATAPLANE_XDP_IFACES"] {
        let bad = |i: &str| i.is_empty() || i.contains(char::is_whitespace) || i.len() > 15;
        if let Some(v) = data.get(key).filter(|v| v.split(',').any(bad)) {
            p.push(format!("{key} {v:?} is not a comma-separated list of interface names"));
        }
    }
    // With hostNetwork the kubelet probes the node's address. (A value that
    // is no address at all is the refusal above.)
    if let Some(Ok(addr)) = data.get("DATAPLANE_HEALTH_BIND").map(|v| v.parse::<SocketAddr>()) {
        let reachable = addr.ip().is_unspecified() && i32::from(addr.port()) == HEALTH_PORT;
        require!(p, reachable, "health bind {addr} is not reachable by the probes");
    }
    Ok(())
}

/// The container runs `dataplane run --source kubernetes`, from an image.
fn check_command(m: &Manifests, p: &mut Vec<String>) -> Result<(), String> {
    let (_, _, c) = agent(m)?;
    let argv: Vec<&str> = all(&c.command).iter().chain(all(&c.args)).map(String::as_str).collect();
    want(p, "command and args", argv, AGENT_COMMAND.to_vec());
    let image = c.image.as_deref().unwrap_or_default();
    require!(p, !image.is_empty(), "container has no image");
    Ok(())
}

/// On every node, node-critical, updated one node at a time without surge
/// (two agents on one node would share its attach points and pins), with
/// resources and a grace period.
fn check_scheduling(m: &Manifests, p: &mut Vec<String>) -> Result<(), String> {
    let (ds, pod, c) = agent(m)?;
    let priority = pod.priority_class_name.as_deref();
    want(p, "priorityClassName", priority, Some("system-node-critical"));
    let any_taint = |t: &Toleration| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none();
    let tolerated = all(&pod.tolerations).iter().any(any_taint);
    require!(p, tolerated, "no toleration of every taint (Exists, no key or effect)");
    let strategy = ds.spec.as_ref().and_then(|s| s.update_strategy.clone());
    let strategy = strategy.unwrap_or_default();
    want(p, "updateStrategy", strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.unwrap_or_default();
    want(p, "maxUnavailable", rolling.max_unavailable, Some(IntOrString::Int(1)));
    let surge = rolling.max_surge.unwrap_or(IntOrString::Int(0));
    want(p, "maxSurge", surge, IntOrString::Int(0));
    let grace = pod.termination_grace_period_seconds;
    let graceful = grace.is_some_and(|s| s > 0);
    require!(p, graceful, "terminationGracePeriodSeconds {grace:?}");
    let r = c.resources.clone().unwrap_or_default();
    let (requests, limits) = (&r.requests, &r.limits);
    for (kind, list, resource) in [
        ("requests", requests, "cpu"),
        ("requests", requests, "memory"),
        ("limits", limits, "memory"),
    ] {
        let set = list.as_ref().is_some_and(|l| l.contains_key(resource));
        require!(p, set, "no {resource} in resources.{kind}");
    }
    Ok(())
}

/// kustomization.yaml lists every manifest file, once, and nothing else,
/// and its image override names the image the DaemonSet runs (a name that
/// matches nothing is silently ignored by kustomize).
fn check_kustomization(m: &Manifests, p: &mut Vec<String>) -> Result<(), String> {
    let image = agent(m).ok().and_then(|(_, _, c)| c.image.clone()).unwrap_or_default();
    // The name without tag or digest; a registry port (`host:5000/x`) stays.
    let untagged = image.split('@').next().unwrap_or_default();
    let tag = untagged.rsplit_once(':').filter(|(_, tag)| !tag.contains('/'));
    let image_name = tag.map_or(untagged, |(name, _)| name);
    for rewritten in m.kustomization.images.iter().map(|i| &i.name) {
        want(p, "kustomization.yaml image name", rewritten.as_str(), image_name);
    }
    let listed = &m.kustomization.resources;
    let unique: BTreeSet<&String> = listed.iter().collect();
    require!(p, unique.len() == listed.len(), "kustomization.yaml lists a file twice");
    for file in m.files.iter().filter(|f| !listed.contains(f)) {
        p.push(format!("kustomization.yaml does not list {file}"));
    }
    for file in listed.iter().filter(|f| !m.files.contains(f)) {
        p.push(format!("kustomization.yaml lists {file}, not in deploy/"));
    }
    Ok(())
}

/// The Dockerfile builds the eBPF object before the agent that embeds it,
/// with a bpf-linker of the pinned nightly, and puts the agent where the
/// DaemonSet runs it on a slim base; the build context leaves out target/.
fn check_build(m: &Manifests, p: &mut Vec<String>) -> Result<(), String> {
    // Instructions only: the comments mention the same commands.
    let lines = text(m, "Dockerfile")?.lines().map(str::trim);
    let lines: Vec<&str> = lines.filter(|l| !l.starts_with('#')).collect();
    let at = |needle: &str| lines.iter().position(|l| l.contains(needle));
    let stages: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].starts_with("FROM ")).collect();
    require!(p, stages.len() >= 2, "Dockerfile: {} stage(s), not 2", stages.len());
    let runtime = &lines[stages.last().copied().unwrap_or(lines.len())..];
    let base = runtime.first().copied().unwrap_or_default();
    require!(p, base.contains("-slim"), "Dockerfile: runtime stage {base:?} not slim");
    let (ebpf, agent) = (at("cargo xtask build-ebpf"), at("-p dataplane-user"));
    let ordered = matches!((ebpf, agent), (Some(e), Some(a)) if e < a);
    require!(p, ordered, "Dockerfile: eBPF build at {ebpf:?}, agent's at {agent:?}");
    let release = agent.is_some_and(|a| lines[a].contains("cargo build --release"));
    require!(p, release, "Dockerfile: no release build of dataplane-user");
    let linker = at("cargo \"+$NIGHTLY\" install bpf-linker").is_some();
    require!(p, linker, "Dockerfile: bpf-linker not built with the pinned nightly");
    let binary = AGENT_COMMAND[0];
    let copies = runtime
        .iter()
        .any(|l| l.starts_with("COPY --from=") && l.ends_with(&format!(" {binary}")));
    require!(p, copies, "Dockerfile: runtime stage has no agent at {binary}");
    let ignored = text(m, "../.dockerignore")?
        .lines()
        .any(|l| l.trim().trim_matches('/') == "target");
    require!(p, ignored, ".dockerignore: no target/");
    Ok(())
}

/// The container build pins the toolchain the repository pins: the nightly
/// of dataplane-ebpf/rust-toolchain.toml and xtask's bpf-linker release.
fn check_toolchain(m: &Manifests, p: &mut Vec<String>) -> Result<(), String> {
    let value = |file: &str, prefix: &str| -> Result<String, String> {
        let line = text(m, file)?.lines().find_map(|l| l.trim().strip_prefix(prefix));
        let line = line.ok_or(format!("{file}: no line starting with {prefix:?}"))?;
        Ok(line.trim_matches(['"', ';']).into())
    };
    let channel = value("../dataplane-ebpf/rust-toolchain.toml", "channel = ")?;
    require!(p, channel.starts_with("nightly-20"), "not a dated nightly: {channel}");
    let linker = value("../xtask/src/main.rs", "pub const BPF_LINKER_VERSION: &str = ")?;
    for (arg, pinned) in [("NIGHTLY", channel), ("BPF_LINKER_VERSION", linker)] {
        let v = value("Dockerfile", &format!("ARG {arg}="))?;
        want(p, &format!("Dockerfile ARG {arg}"), v, pinned);
    }
    Ok(())
}

// ---- the real files, and each check noticing when they break ----

#[test]
fn the_deployment_meets_the_agents_contract() {
    let m = parse(&load()).unwrap_or_else(|e| panic!("{e}"));
    let mut failures = Vec::new();
    for (name, check) in CHECKS {
        failures.extend(problems(check, &m).into_iter().map(|p| format!("{name}: {p}")));
    }
    let report = format!("deploy/ breaks the contract:\n  {}", failures.join("\n  "));
    assert!(failures.is_empty(), "{report}");
}

/// Edits of the real files, one a line: `check | file | text | replacement
/// | what the check must report`. The text must occur exactly once (`*`: the
/// whole file; none: the replacement is appended, to a new file if need be);
/// `\n` is a newline. `Parse`: loading itself must fail. `-` as the report:
/// the check must still pass. Each key of `CONFIG_KEYS`, commented out, is a
/// case too.
const CASES: &str = r#"
Parse | configmap.yaml | \ndata:\n | \ndatta:\n | configmap.yaml document 1 (ConfigMap dataplane-config): field .datta is not part of the API type
Parse | namespace.yaml | labels: | lables: | field .metadata.lables
Parse | daemonset.yaml | mountPropagation: | mountPropogation: | field .spec.template.spec.containers[0].volumeMounts[0].mountPropogation
Parse | serviceaccount.yaml | kind: ServiceAccount | kind: Role | (Role dataplane): kind "Role" is not one this test knows
Parse | daemonset.yaml | apiVersion: apps/v1 | apiVersion: apps/v1beta2 | deploy/daemonset.yaml document 1 (DaemonSet dataplane): invalid value
Parse | clusterrole.yaml | | ---\nrules: [ | deploy/clusterrole.yaml document 2: invalid YAML
Objects | daemonset.yaml | | ---\napiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: second, namespace: dataplane-system}\n | number of DaemonSets: 2, expected 1
Objects | serviceaccount.yaml | * | | number of ServiceAccounts: 0, expected 1
Objects | namespace.yaml | name: dataplane-system | name: kube-system | no Namespace dataplane-system
Objects | configmap.yaml | namespace: dataplane-system | namespace: default | ConfigMap dataplane-config namespace: Some("default")
Objects | namespace.yaml | | ---\n | -
Objects | namespace.yaml | | ---\napiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n | number of Namespaces: 2, expected 1
Objects | clusterrole.yaml | * | | number of ClusterRoles: 0, expected 1
Objects | clusterrolebinding.yaml | * | | number of ClusterRoleBindings: 0, expected 1
Objects | configmap.yaml | | ---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: other, namespace: dataplane-system}\n | number of ConfigMaps: 2, expected 1
Rbac | clusterrole.yaml | "nodes"]\n    verbs: ["get", "list", "watch"] | "nodes"]\n    verbs: ["get", "list"] | verb watch on services (apiGroup "") is not granted
Rbac | clusterrole.yaml | "nodes"]\n    verbs: ["get", "list", "watch"] | "nodes"]\n    verbs: ["list", "watch"] | verb get on nodes (apiGroup "") is not granted
Rbac | clusterrole.yaml | ["endpointslices"]\n    verbs: ["get", "list", "watch"] | ["endpointslices"]\n    verbs: ["get", "watch"] | verb list on endpointslices
Rbac | clusterrole.yaml | ["services", "nodes"] | ["services"] | verb get on nodes (apiGroup "") is not granted
Rbac | clusterrole.yaml | "nodes"]\n    verbs: ["get", "list", "watch"] | "nodes"]\n    verbs: ["get", "list", "watch", "create"] | verb create on services (apiGroup "") is granted
Rbac | clusterrole.yaml | ["services", "nodes"] | ["services", "nodes", "pods"] | on pods (apiGroup "") is granted
Rbac | clusterrole.yaml | ["services", "nodes"] | ["services", "nodes", "services/status"] | on services/status (apiGroup "") is granted
Rbac | clusterrole.yaml | ["discovery.k8s.io"] | [""] | on endpointslices (apiGroup "") is granted
Rbac | clusterrole.yaml | ["endpointslices"]\n    verbs: ["get", "list", "watch"] | ["endpointslices"]\n    verbs: ["*"] | verb * on endpointslices (apiGroup "discovery.k8s.io") is granted
Rbac | clusterrole.yaml | ["services", "nodes"] | ["*"] | verb get on * (apiGroup "") is granted
Rbac | clusterrole.yaml | ["discovery.k8s.io"] | ["*"] | verb get on endpointslices (apiGroup "*") is granted
Rbac | clusterrole.yaml | \nrules:\n | \nrules:\n  - {nonResourceURLs: ["/metrics"], verbs: ["get"]}\n | grants non-resource URLs ["/metrics"]
Rbac | clusterrole.yaml | \nrules:\n | \nrules:\n  - {apiGroups: [""], resources: ["nodes"], resourceNames: ["node-1"], verbs: ["get"]}\n | limited to resourceNames ["node-1"]
Rbac | clusterrole.yaml | | aggregationRule: {clusterRoleSelectors: [{matchLabels: {a: b}}]}\n | ClusterRole dataplane: aggregates other roles
Rbac | clusterrole.yaml | | ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: events}\nrules: [{apiGroups: [events.k8s.io], resources: [events], verbs: [create]}]\n | verb create on events
Binding | daemonset.yaml | serviceAccountName: dataplane | serviceAccountName: other | the DaemonSet runs as ServiceAccount dataplane-system/other, not created by deploy/
Binding | daemonset.yaml | \n      serviceAccountName: dataplane | | runs as ServiceAccount dataplane-system/default
Binding | clusterrolebinding.yaml | \n    name: dataplane | \n    name: other | subjects: ["ServiceAccount dataplane-system/other"], expected ["ServiceAccount dataplane-system/dataplane"]
Binding | clusterrolebinding.yaml | namespace: dataplane-system | namespace: kube-system | subjects: ["ServiceAccount kube-system/dataplane"]
Binding | clusterrolebinding.yaml | kind: ClusterRole\n  name: dataplane | kind: ClusterRole\n  name: cluster-admin | ClusterRoleBinding dataplane: refers to ClusterRole cluster-admin, not in deploy/
Binding | clusterrolebinding.yaml | kind: ClusterRole\n | kind: Role\n | ClusterRole dataplane is not bound
Binding | clusterrolebinding.yaml | \nsubjects:\n | \nsubjects:\n  - {kind: ServiceAccount, name: default, namespace: dataplane-system}\n | subjects: ["ServiceAccount dataplane-system/default", "ServiceAccount dataplane-system/dataplane"]
Binding | clusterrolebinding.yaml | \nsubjects:\n | \nsubjects:\n  - {kind: Group, name: "system:nodes"}\n | subjects: ["Group /system:nodes", "ServiceAccount dataplane-system/dataplane"]
Privileges | daemonset.yaml | privileged: true | privileged: false | securityContext.privileged: Some(false), expected Some(true)
Privileges | daemonset.yaml | securityContext:\n            privileged: true | securityContext: {} | securityContext.privileged: None
Privileges | daemonset.yaml | \n      hostNetwork: true | | hostNetwork: None, expected Some(true)
Privileges | daemonset.yaml | hostPID: false | hostPID: true | hostPID: true, expected false
Privileges | daemonset.yaml | dnsPolicy: ClusterFirstWithHostNet | dnsPolicy: ClusterFirst | dnsPolicy: Some("ClusterFirst")
Mounts | daemonset.yaml | mountPropagation: Bidirectional | mountPropagation: HostToContainer | mount /sys/fs/bpf mountPropagation: Some("HostToContainer"), expected Some("Bidirectional")
Mounts | daemonset.yaml | \n              mountPropagation: Bidirectional | | mount /sys/fs/bpf mountPropagation: None
Mounts | daemonset.yaml | mountPropagation: Bidirectional | mountPropagation: Bidirectional\n              readOnly: true | mount /sys/fs/bpf readOnly: true, expected false
Mounts | daemonset.yaml | /sys/kernel/btf\n              readOnly: true | /sys/kernel/btf | mount /sys/kernel/btf readOnly: false, expected true
Mounts | daemonset.yaml | mountPath: /sys/kernel/btf | mountPath: /sys/kernel/btf2 | nothing mounted at /sys/kernel/btf
Mounts | daemonset.yaml | path: /sys/fs/bpf | path: /run/bpf | mount /sys/fs/bpf hostPath: Some("/run/bpf"), expected Some("/sys/fs/bpf")
Mounts | daemonset.yaml | hostPath:\n            path: /sys/fs/bpf\n            type: DirectoryOrCreate | emptyDir: {} | mount /sys/fs/bpf hostPath: None
SocketLb | daemonset.yaml | mountPath: /run/dataplane/cgroupv2 | mountPath: /run/cgroupv2 | "/run/dataplane/cgroupv2" is under no mount of the host's /sys/fs/cgroup
SocketLb | configmap.yaml | "/run/dataplane/cgroupv2" | "/sys/fs/cgroup" | "/sys/fs/cgroup" is under no mount of the host's /sys/fs/cgroup
SocketLb | daemonset.yaml | /run/dataplane/cgroupv2\n              readOnly: true | /run/dataplane/cgroupv2 | /sys/fs/cgroup at /run/dataplane/cgroupv2 readOnly: None, expected Some(true)
SocketLb | daemonset.yaml | path: /sys/fs/cgroup | path: /sys/fs/cgroup/unified | is under no mount of the host's /sys/fs/cgroup
SocketLb | configmap.yaml | "/run/dataplane/cgroupv2" | "" | -
Probes | daemonset.yaml | path: /healthz | path: /readyz | livenessProbe path: Some("/readyz"), expected Some("/healthz")
Probes | daemonset.yaml | /readyz\n              port: 10256 | /readyz\n              port: 10257 | readinessProbe port Int(10257): Some(10257), expected Some(10256)
Probes | daemonset.yaml | /readyz\n              port: 10256 | /readyz\n              port: nope | readinessProbe port String("nope"): None
Probes | daemonset.yaml | /readyz\n              port: 10256 | /readyz\n              port: health | -
Probes | daemonset.yaml | readinessProbe: | startupProbe: | no HTTP readinessProbe
Probes | daemonset.yaml | httpGet:\n              path: /healthz\n              port: 10256 | exec: {command: ["true"]} | no HTTP livenessProbe
Env | daemonset.yaml | fieldPath: spec.nodeName | fieldPath: metadata.name | NODE_NAME fieldRef: Some("metadata.name"), expected Some("spec.nodeName")
Env | daemonset.yaml | name: NODE_NAME | name: NODE | NODE_NAME fieldRef: None
Env | daemonset.yaml | name: dataplane-config | name: dataplane-cfg | envFrom ConfigMap dataplane-cfg, not created by deploy/
Env | daemonset.yaml | \n          envFrom:\n            - configMapRef:\n                name: dataplane-config | | no envFrom of ConfigMap dataplane-config
Env | configmap.yaml | name: dataplane-config | name: other | envFrom ConfigMap dataplane-config, not created by deploy/
Env | configmap.yaml | namespace: dataplane-system | namespace: default | envFrom ConfigMap dataplane-config, not created by deploy/
Env | daemonset.yaml | name: dataplane-config | name: dataplane-config\n                optional: true | envFrom ConfigMap dataplane-config is optional
Config | configmap.yaml | \ndata:\n | \ndata:\n  DATAPLANE_TC_IFACE: "cni0"\n | key DATAPLANE_TC_IFACE is not a setting the agent reads
Config | configmap.yaml | \ndata:\n | \ndata:\n  NODE_NAME: "node-1"\n | key NODE_NAME is per node: the downward API sets it
Config | configmap.yaml | DATAPLANE_XDP_MODE: "auto" | DATAPLANE_XDP_MODE: "bogus" | refused by the agent's parser
Config | configmap.yaml | DATAPLANE_LOG_FORMAT: "json" | DATAPLANE_LOG_FORMAT: "logfmt" | invalid value 'logfmt' for '--log-format
Config | configmap.yaml | DATAPLANE_LOG: "info" | DATAPLANE_LOG: "dataplane=loud" | DATAPLANE_LOG="dataplane=loud" is not a log filter
Config | configmap.yaml | \ndata:\n | \ndata:\n  DATAPLANE_NO_PIN: "yes"\n | DATAPLANE_NO_PIN="yes": --no-pin is a switch
Config | configmap.yaml | \ndata:\n | \ndata:\n  DATAPLANE_CT_MAX_ENTRIES: "0"\n | refused by the agent: 
Config | configmap.yaml | \ndata:\n | \ndata:\n  DATAPLANE_CT_MAX_ENTRIES: "lots"\n | refused by the agent's parser
Config | configmap.yaml | \ndata:\n | \ndata:\n  DATAPLANE_NO_ATTACH: "true"\n | refused by the agent's parser
Config | configmap.yaml | DATAPLANE_HEALTH_BIND: "0.0.0.0:10256" | DATAPLANE_HEALTH_BIND: ":10256" | refused by the agent: --health-bind ":10256"
Config | configmap.yaml | DATAPLANE_HEALTH_BIND: "0.0.0.0:10256" | DATAPLANE_HEALTH_BIND: "127.0.0.1:10256" | health bind 127.0.0.1:10256 is not reachable by the probes
Config | configmap.yaml | DATAPLANE_HEALTH_BIND: "0.0.0.0:10256" | DATAPLANE_HEALTH_BIND: "0.0.0.0:8080" | health bind 0.0.0.0:8080 is not reachable by the probes
Config | configmap.yaml | DATAPLANE_TC_IFACES: "cni0" | DATAPLANE_TC_IFACES: "" | DATAPLANE_TC_IFACES is empty
Config | configmap.yaml | DATAPLANE_XDP_IFACES: "eth0" | DATAPLANE_XDP_IFACES: "eth0," | not a comma-separated list
Config | configmap.yaml | DATAPLANE_TC_IFACES: "cni0" | DATAPLANE_TC_IFACES: "eth0, cni0" | not a comma-separated list
Config | configmap.yaml | # KUBERNETES_SERVICE_HOST: "<API server address>" | KUBERNETES_SERVICE_HOST: "10.0.0.1" | -
Config | configmap.yaml | # KUBERNETES_SERVICE_PORT: | KUBERNETES_SERVICE_PORT: | -
Config | configmap.yaml | \ndata:\n | \ndata:\n  DATAPLANE_NO_PIN: "false"\n  DATAPLANE_BPF_DEBUG_LOG: "true"\n | -
Command | daemonset.yaml | "--source", "kubernetes" | "--source", "files" | expected ["/usr/local/bin/dataplane", "run", "--source", "kubernetes"]
Command | daemonset.yaml | \n          command: ["/usr/local/bin/dataplane"] | | command and args: ["run"
Command | daemonset.yaml | "/usr/local/bin/dataplane" | "/bin/dataplane" | command and args: ["/bin/dataplane"
Command | daemonset.yaml | \n          image: dataplane:0.1.0 | | container has no image
Scheduling | daemonset.yaml | \n      priorityClassName: system-node-critical | | priorityClassName: None, expected Some("system-node-critical")
Scheduling | daemonset.yaml | - operator: Exists | - {key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule} | no toleration of every taint
Scheduling | daemonset.yaml | - operator: Exists | - {operator: Exists, effect: NoSchedule} | no toleration of every taint
Scheduling | daemonset.yaml | \n      tolerations:\n        - operator: Exists | | no toleration of every taint
Scheduling | daemonset.yaml | type: RollingUpdate\n    rollingUpdate:\n      maxUnavailable: 1\n      maxSurge: 0 | type: OnDelete | updateStrategy: Some("OnDelete"), expected Some("RollingUpdate")
Scheduling | daemonset.yaml | maxUnavailable: 1 | maxUnavailable: 2 | maxUnavailable: Some(Int(2)), expected Some(Int(1))
Scheduling | daemonset.yaml | maxUnavailable: 1 | maxUnavailable: "10%" | maxUnavailable: Some(String("10%"))
Scheduling | daemonset.yaml | maxSurge: 0 | maxSurge: 1 | maxSurge: Int(1), expected Int(0)
Scheduling | daemonset.yaml | \n      terminationGracePeriodSeconds: 30 | | terminationGracePeriodSeconds None
Scheduling | daemonset.yaml | limits:\n              memory: 512Mi | limits: {} | no memory in resources.limits
Scheduling | daemonset.yaml | requests:\n              cpu: 100m\n              memory: 128Mi | requests: {} | no cpu in resources.requests
Kustomization | kustomization.yaml | \n  - clusterrole.yaml | | kustomization.yaml does not list clusterrole.yaml
Kustomization | extra.yaml | | apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: extra, namespace: dataplane-system}\n | kustomization.yaml does not list extra.yaml
Kustomization | kustomization.yaml | \nresources:\n | \nresources:\n  - service.yaml\n | kustomization.yaml lists service.yaml, not in deploy/
Kustomization | kustomization.yaml | \n  - namespace.yaml | \n  - namespace.yaml\n  - namespace.yaml | lists a file twice
Kustomization | daemonset.yaml | image: dataplane:0.1.0 | image: dataplane-agent:0.1.0 | kustomization.yaml image name: "dataplane", expected "dataplane-agent"
Kustomization | daemonset.yaml | image: dataplane:0.1.0 | image: localhost:5000/dataplane:0.1.0 | kustomization.yaml image name: "dataplane", expected "localhost:5000/dataplane"
Kustomization | daemonset.yaml | image: dataplane:0.1.0 | image: dataplane@sha256:0123 | -
Build | Dockerfile | /out/dataplane /usr/local/bin/dataplane | /out/dataplane /bin/dataplane | Dockerfile: runtime stage has no agent at /usr/local/bin/dataplane
Build | Dockerfile | debian:${DEBIAN_RELEASE}-slim | debian:${DEBIAN_RELEASE} | Dockerfile: runtime stage "FROM debian:${DEBIAN_RELEASE}" not slim
Build | Dockerfile | \nFROM debian:${DEBIAN_RELEASE}-slim | | Dockerfile: 1 stage(s), not 2
Build | Dockerfile | cargo xtask build-ebpf; | true; | Dockerfile: eBPF build at None, agent's at Some(
Build | Dockerfile | -p dataplane-user | -p xtask | no release build of dataplane-user
Build | Dockerfile | cargo "+$NIGHTLY" install bpf-linker | cargo install bpf-linker | Dockerfile: bpf-linker not built with the pinned nightly
Build | ../.dockerignore | * | bench-results/\n | .dockerignore: no target/
Toolchain | Dockerfile | ARG NIGHTLY=nightly- | ARG NIGHTLY=nightly-0 | Dockerfile ARG NIGHTLY: "nightly-02
Toolchain | Dockerfile | ARG BPF_LINKER_VERSION= | ARG BPF_LINKER_VERSION=9 | Dockerfile ARG BPF_LINKER_VERSION: "90.13
Toolchain | ../dataplane-ebpf/rust-toolchain.toml | channel = " | channel = "stable-x | not a dated nightly: stable-xnightly-20
"#;

/// The rows of [`CASES`], and per key of `CONFIG_KEYS` its removal.
fn cases() -> Vec<[String; 5]> {
    let row = |l: &str| -> [String; 5] {
        let fields: Vec<String> = l.split('|').map(|f| f.trim().replace("\\n", "\n")).collect();
        fields.try_into().unwrap_or_else(|_| panic!("not 5 fields: {l}"))
    };
    let removals = CONFIG_KEYS.map(|k| format!("Config | configmap.yaml | \\n  {k}: | \\n  # {k}: | no key {k}"));
    let lines = CASES.lines().chain(removals.iter().map(String::as_str));
    lines.filter(|l| !l.is_empty()).map(row).collect()
}

/// What `check` reports once `from` in `file` is replaced by `to`
/// (`Parse`: why the files do not load); `Err` when the case cannot run.
fn run_case(mut files: Files, check: &str, file: &str, from: &str, to: &str) -> Result<Vec<String>, String> {
    let text = files.entry(file.into()).or_default();
    match (from, text.matches(from).count()) {
        ("", _) => text.push_str(to),
        ("*", _) => *text = to.into(),
        (_, 1) => *text = text.replacen(from, to, 1),
        (_, n) => return Err(format!("the text occurs {n} times, not once")),
    }
    match (parse(&files), CHECKS.iter().find(|(name, _)| *name == check)) {
        (Err(e), None) if check == "Parse" => Ok(vec![e]),
        (Ok(_), None) if check == "Parse" => Ok(Vec::new()),
        (_, None) => Err(format!("no check {check}")),
        (Err(e), Some(_)) => Err(format!("does not load: {e}")),
        (Ok(m), Some((_, c))) => Ok(problems(*c, &m)),
    }
}

#[test]
fn every_check_notices_when_the_deployment_breaks() {
    let (files, cases) = (load(), cases());
    let mut failures = Vec::new();
    for (check, _) in CHECKS.iter().filter(|(name, _)| !cases.iter().any(|c| c[0] == *name)) {
        failures.push(format!("{check}: no case breaks what it checks"));
    }
    for [check, file, from, to, expect] in &cases {
        let at = format!("{check} | {file} | {from:?} -> {to:?}");
        match (run_case(files.clone(), check, file, from, to), expect.as_str()) {
            (Err(e), _) => failures.push(format!("{at}: {e}")),
            (Ok(problems), "-") if !problems.is_empty() => failures.push(format!("{at}: refused: {problems:?}")),
            (Ok(problems), e) if e != "-" && !problems.iter().any(|p| p.contains(e)) => {
                failures.push(format!("{at}: not noticed (expected {e:?}, got {problems:?})"))
            }
            _ => {}
        }
    }
    let report = format!(
        "{} of {} cases failed:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
    assert!(failures.is_empty(), "{report}");
}

#[test]
fn loading_reads_the_manifests_and_dockerfile_of_a_directory_not_its_subdirectories() {
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let dir = Cleanup(std::env::temp_dir().join(format!("dpt{}-deploy", std::process::id())));
    fs::create_dir_all(dir.0.join("examples")).unwrap();
    for file in ["a.yaml", "b.yml", "Dockerfile", "README.md", "examples/c.yaml"] {
        fs::write(dir.0.join(file), "").unwrap();
    }
    let names: Vec<String> = read_dir(&dir.0).unwrap().into_keys().collect();
    assert_eq!(names, ["Dockerfile", "a.yaml", "b.yml"]);
}
