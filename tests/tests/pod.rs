//! The DaemonSet's pod contract with a real OCI runtime: the agent runs in a
//! `runc` container set up as `deploy/daemonset.yaml` and
//! `deploy/configmap.yaml` describe it (the command and arguments, the
//! ConfigMap as environment, `NODE_NAME` from the downward API, privileged,
//! the host's network: here the test node's namespace, the volume mounts
//! with their propagation and read-only flags, the service-account token
//! and CA), and reaches the fake API server over HTTPS through in-cluster
//! configuration (`KUBERNETES_SERVICE_HOST`/`_PORT`; the server checks the
//! token, the CA checks the server). It must sync, attach (tcx links on the
//! node's interfaces, pinned in the test's bpffs through the bidirectional
//! mount), answer the DaemonSet's probes, carry traffic, and survive a
//! container restart with its pins: the programs keep serving while no
//! container runs, and the next container adopts the pinned maps and links
//! (its programs swapped in) and follows changes again.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr},
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use dataplane_tests::{
    agent::{agent_binary, TempDir},
    fake_api::{objects, FakeApi, Kind, Tls},
    netns::{backend_addr, require_root_and_tools, Topology},
    servers::Conn,
    web::start_servers,
};
use k8s_openapi::{
    api::{apps::v1::DaemonSet, core::v1::ConfigMap},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::{json, Value};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 4, 10);
const NODE_NAME: &str = "node-1";
const DEADLINE: Duration = Duration::from_secs(30);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn runc_present() {
    let ok = Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "runc is missing: apt-get install runc (`cargo xtask setup` installs it)"
    );
}

/// The container runtime's view of one test: its state directory and the
/// containers it started (deleted on drop).
struct Runc {
    state: PathBuf,
    started: Vec<String>,
}

impl Runc {
    fn cmd(&self) -> Command {
        let mut c = Command::new("runc");
        c.arg("--root").arg(&self.state);
        c
    }

    fn run(&mut self, bundle: &Path, id: &str, log_path: &Path) {
        let log = fs::OpenOptions::new().create(true).append(true).open(log_path).unwrap();
        let out = self
            .cmd()
            .args(["run", "--detach", "--bundle"])
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .status()
            .unwrap();
        // Before the check: a container created but not started is deleted
        // on drop too.
        self.started.push(id.to_string());
        let text = fs::read_to_string(log_path).unwrap_or_default();
        assert!(out.success(), "runc run {id} failed ({out}):\n{text}");
    }

    fn status(&self, id: &str) -> String {
        let out = self.cmd().args(["state", id]).output().unwrap();
        let state: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        state["status"].as_str().unwrap_or("gone").to_string()
    }

    /// SIGTERM, as the kubelet stops a pod, then waits for the exit and
    /// deletes the container.
    fn stop(&self, id: &str) {
        let out = self.cmd().args(["kill", id, "TERM"]).output().unwrap();
        assert!(
            out.status.success(),
            "runc kill: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let start = Instant::now();
        while self.status(id) == "running" {
            assert!(start.elapsed() < DEADLINE, "container {id} did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = self.cmd().args(["delete", id]).output().unwrap();
        assert!(
            out.status.success(),
            "runc delete: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        for id in &self.started {
            let _ = self.cmd().args(["delete", "--force", id]).output();
        }
    }
}

/// A bpffs of the test's own, mounted shared (as the host's /sys/fs/bpf is)
/// so that the container's Bidirectional mount reaches it; unmounted on drop.
struct Bpffs(PathBuf);

impl Bpffs {
    fn new(dir: PathBuf) -> Bpffs {
        fs::create_dir_all(&dir).unwrap();
        let sh = |args: &[&str]| {
            let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let d = dir.to_str().unwrap();
        sh(&["mount", "-t", "bpf", "bpf", d]);
        sh(&["mount", "--make-shared", d]);
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let pins = self.0.join("dataplane");
        if pins.exists() {
            let _ = Command::new(agent_binary())
                .args(["cleanup", "--bpffs-root"])
                .arg(&pins)
                .output();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// The agent binary and the shared libraries `ldd` lists for it, at their
/// paths, in `rootfs`.
fn build_rootfs(rootfs: &Path) {
    let bin = agent_binary();
    let dest = rootfs.join("usr/local/bin/dataplane");
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    fs::copy(&bin, &dest).unwrap();
    let ldd = Command::new("ldd").arg(&bin).output().expect("ldd (libc-bin)");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no file.
        let path = line.split("=>").last().unwrap().split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            let to = rootfs.join(path.trim_start_matches('/'));
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            fs::copy(path, &to).unwrap_or_else(|e| panic!("copying {path}: {e}"));
        }
    }
    for dir in [
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "var/run/secrets/kubernetes.io/serviceaccount",
    ] {
        fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
}

/// Every capability (privileged: true) this test's own process may give:
/// its bounding set (a sandbox may lack some; a container cannot get more).
fn all_capabilities() -> Vec<String> {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let bounding = status.lines().find_map(|l| l.strip_prefix("CapBnd:")).unwrap().trim();
    let bounding = u64::from_str_radix(bounding, 16).unwrap();
    let names = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let held = names.iter().enumerate().filter(|(bit, _)| bounding & (1 << bit) != 0);
    held.map(|(_, n)| format!("CAP_{n}")).collect()
}

/// The OCI runtime configuration of the DaemonSet's agent container.
/// `host_paths` maps the DaemonSet's hostPath volumes to this test's
/// stand-ins; `env_overrides` replace ConfigMap values that name this
/// test's interfaces (a value of `None` removes the key).
fn oci_config(
    netns: &str,
    host_paths: &BTreeMap<&str, PathBuf>,
    env_overrides: &BTreeMap<&str, Option<String>>,
    api: SocketAddr,
    service_account: &Path,
) -> Value {
    let ds: DaemonSet =
        serde_yaml_ng::from_str(&fs::read_to_string(root().join("deploy/daemonset.yaml")).unwrap()).unwrap();
    let cm: ConfigMap =
        serde_yaml_ng::from_str(&fs::read_to_string(root().join("deploy/configmap.yaml")).unwrap()).unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.host_network,
        Some(true),
        "the contract this test emulates: host network"
    );
    let c = &pod.containers[0];
    assert_eq!(c.security_context.as_ref().and_then(|s| s.privileged), Some(true));

    // envFrom the ConfigMap, then env (the downward API's NODE_NAME), as the
    // kubelet orders them; then what in-cluster configuration reads.
    let mut env: BTreeMap<String, String> = cm.data.unwrap_or_default().into_iter().collect();
    for (k, v) in env_overrides {
        match v {
            Some(v) => env.insert(k.to_string(), v.clone()),
            None => env.remove(*k),
        };
    }
    for e in c.env.iter().flatten() {
        let from_node = e
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .is_some_and(|f| f.field_path == "spec.nodeName");
        assert!(from_node, "env {} is not the downward API's node name", e.name);
        env.insert(e.name.clone(), NODE_NAME.into());
    }
    env.insert("KUBERNETES_SERVICE_HOST".into(), api.ip().to_string());
    env.insert("KUBERNETES_SERVICE_PORT".into(), api.port().to_string());
    env.insert("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into());
    let env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();

    let args: Vec<String> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .cloned()
        .collect();
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "rw"]}),
        json!({"destination": "/var/run/secrets/kubernetes.io/serviceaccount", "type": "bind",
               "source": service_account, "options": ["rbind", "ro"]}),
    ];
    let volumes: BTreeMap<String, String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.clone(), v.host_path.as_ref()?.path.clone())))
        .collect();
    for m in c.volume_mounts.iter().flatten() {
        let host = &volumes[&m.name];
        let source = host_paths
            .get(host.as_str())
            .unwrap_or_else(|| panic!("no stand-in for hostPath {host}"));
        let mut options = vec!["rbind", if m.read_only == Some(true) { "ro" } else { "rw" }];
        options.push(match m.mount_propagation.as_deref() {
            Some("Bidirectional") => "rshared",
            Some("HostToContainer") => "rslave",
            _ => "rprivate",
        });
        mounts.push(json!({"destination": m.mount_path, "type": "bind", "source": source, "options": options}));
    }
    // The container's "host network" is the test node's namespace, never
    // the one this test runs in.
    let netns_path = format!("/var/run/netns/{netns}");
    let ns_id = |p: &str| fs::metadata(p).map(|m| (m.dev(), m.ino())).unwrap();
    assert_ne!(
        ns_id(&netns_path),
        ns_id("/proc/self/ns/net"),
        "{netns_path} is the test's own namespace"
    );
    let caps = all_capabilities();
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": env,
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": false
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": NODE_NAME,
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": netns_path}
            ],
            // Bidirectional mounts need a shared root, as container
            // runtimes set it for such pods.
            "rootfsPropagation": "rshared",
            "resources": {"devices": [{"allow": true, "access": "rwm"}]}
        }
    })
}

/// `GET path` on 127.0.0.1:`port` in the node's namespace: the status code
/// and the response, or `None` while nothing answers.
fn http_get(t: &Topology, port: u16, path: &str) -> Option<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n");
    t.node
        .run(move || {
            use std::io::{Read, Write};
            let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let mut c = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            c.write_all(request.as_bytes()).ok()?;
            let mut text = String::new();
            c.read_to_string(&mut text).ok()?;
            let code = text.split_whitespace().nth(1)?.parse().ok()?;
            Some((code, text))
        })
        .join()
        .unwrap()
}

/// A Prometheus series of the agent in the node's namespace (its metrics
/// listen on 127.0.0.1:10249 there), or `None` while it does not answer.
fn metric(t: &Topology, series: &str) -> Option<f64> {
    let (_, text) = http_get(t, 10249, "/metrics")?;
    let line = text.lines().find(|l| l.split_whitespace().next() == Some(series))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The DaemonSet's liveness and readiness probes (path and port of their
/// `httpGet`), as the kubelet runs them against a host-network pod.
fn probes() -> Vec<(String, u16)> {
    let ds: DaemonSet =
        serde_yaml_ng::from_str(&fs::read_to_string(root().join("deploy/daemonset.yaml")).unwrap()).unwrap();
    let c = ds.spec.unwrap().template.spec.unwrap().containers.remove(0);
    [c.liveness_probe, c.readiness_probe]
        .into_iter()
        .map(|p| {
            let get = p.and_then(|p| p.http_get).expect("an httpGet probe");
            let port = match get.port {
                IntOrString::Int(p) => u16::try_from(p).unwrap(),
                IntOrString::String(name) => panic!("probe port {name}: this test reads numeric ports only"),
            };
            (get.path.expect("a probe path"), port)
        })
        .collect()
}

/// A pinned TC link as the kernel reports it (bpftool 7.1 does not know
/// tcx links, so its info is read with `BPF_OBJ_GET_INFO_BY_FD`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Link {
    id: u32,
    prog_id: u32,
    ifindex: u32,
}

fn link(pin: &Path) -> Link {
    // From linux/bpf.h.
    const BPF_LINK_TYPE_TCX: u32 = 11;
    const BPF_TCX_INGRESS: u32 = 46;
    let fd = dataplane::bpf::sys::obj_get(pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    // struct bpf_link_info: u32 type, id, prog_id, then (8-aligned) a union
    // whose tcx member is { u32 ifindex; u32 attach_type; }.
    let mut info = [0u64; 32];
    dataplane::bpf::sys::obj_get_info_by_fd(fd.as_fd(), &mut info).unwrap();
    let (link_type, attach_type) = (info[0] as u32, (info[2] >> 32) as u32);
    assert_eq!(
        (link_type, attach_type),
        (BPF_LINK_TYPE_TCX, BPF_TCX_INGRESS),
        "the link pinned at {} is no tcx ingress link",
        pin.display()
    );
    Link {
        id: (info[0] >> 32) as u32,
        prog_id: info[1] as u32,
        ifindex: info[2] as u32,
    }
}

/// The index of `iface` in the node's namespace.
fn ifindex(t: &Topology, iface: &str) -> u32 {
    let out = t.node.ip(&["-j", "link", "show", iface]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0]["ifindex"].as_u64().and_then(|i| u32::try_from(i).ok()).unwrap()
}
/// The TC links pinned in `pins`, one per node interface, each checked to
/// be attached to that interface of the node's namespace.
fn tc_links(t: &Topology, pins: &Path) -> BTreeMap<String, Link> {
    let links = t.node_ifaces().into_iter().map(|iface| {
        let pin = pins.join(format!("links/tc-{iface}"));
        let listing = fs::read_dir(pins.join("links")).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>());
        assert!(
            pin.exists(),
            "no TC link for {iface} pinned at {} (the test's bpffs, mounted at /sys/fs/bpf in the container); links there: {listing:?}",
            pin.display()
        );
        let l = link(&pin);
        assert_eq!(l.ifindex, ifindex(t, &iface), "the link pinned for {iface} is on another interface");
        (iface, l)
    });
    links.collect()
}

/// Waits until `cond` holds; fails with the container's output (and what
/// the API server refused) when the deadline passes or the container
/// exits first.
fn wait(what: &str, runc: &Runc, id: &str, log: &Path, fake: &FakeApi, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        let status = runc.status(id);
        let failed = if status != "running" {
            format!("container {id} is {status}")
        } else if start.elapsed() > DEADLINE {
            format!("not within {DEADLINE:?}")
        } else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let refused = fake.seen().unauthorized;
        let log = fs::read_to_string(log).unwrap_or_default();
        panic!(
            "{failed}: {what}; API requests refused for want of the token: {refused}; the container's output:\n{log}"
        );
    }
}

/// Backends reached by `n` connections to the VIP from the client.
fn backends(t: &Topology, n: usize) -> Result<Vec<String>, String> {
    let to = SocketAddr::from((VIP, 80));
    t.client
        .run(move || {
            let mut seen = std::collections::BTreeSet::new();
            for i in 0..n {
                let mut c = Conn::connect(to, Duration::from_secs(3)).map_err(|e| format!("connection {i}: {e}"))?;
                seen.insert(c.ask().map_err(|e| format!("connection {i}: {e}"))?);
            }
            Ok(seen.into_iter().collect())
        })
        .join()
        .unwrap()
}

/// The kernel id of a pinned map (changes if the map is recreated).
fn map_id(pin: &Path) -> u64 {
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(pin)
        .output()
        .unwrap();
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("bpftool on {}: {out:?}", pin.display()));
    v["id"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_in_a_container_as_the_daemonset_describes_and_survives_a_restart_with_its_pins() {
    require_root_and_tools();
    runc_present();
    let t = Topology::new(2).unwrap();
    let _servers = start_servers(&t);
    let dir = TempDir::new("dataplane-pod");

    // The API server, HTTPS on the node's loopback (what the agent reaches
    // through in-cluster configuration), with a CA of the test's own; it
    // answers only requests with the service account's token.
    let listener = t
        .node
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .join()
        .unwrap()
        .unwrap();
    let api = listener.local_addr().unwrap();
    let tls = Tls::for_ip(api.ip()).unwrap();
    let token = format!("token-{}", dataplane_tests::netns::unique_prefix());
    let fake = FakeApi::start_tls(listener, &tls, &token).unwrap();
    fake.apply(Kind::Node, objects::node(NODE_NAME, Ipv4Addr::new(198, 18, 100, 1)));
    let http = &[("http", 80, "TCP")];
    fake.apply(Kind::Service, objects::service("shop", "web", &VIP.to_string(), http));
    let slice = |addrs: &[Ipv4Addr]| {
        let addrs: Vec<String> = addrs.iter().map(Ipv4Addr::to_string).collect();
        let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        objects::slice("shop", "web-1", "web", &[("http", 8080, "TCP")], &addrs)
    };
    fake.apply(Kind::EndpointSlice, slice(&[backend_addr(1)]));

    // The pod's files: service account, host path stand-ins, bundle.
    let sa = dir.0.join("serviceaccount");
    fs::create_dir_all(&sa).unwrap();
    fs::write(sa.join("token"), &token).unwrap();
    fs::write(sa.join("ca.crt"), &tls.ca_pem).unwrap();
    fs::write(sa.join("namespace"), "dataplane-system").unwrap();
    let bpffs = Bpffs::new(dir.0.join("bpffs"));
    let host_paths = BTreeMap::from([
        ("/sys/fs/bpf", bpffs.0.clone()),
        ("/sys/kernel/btf", PathBuf::from("/sys/kernel/btf")),
        ("/sys/fs/cgroup", PathBuf::from("/sys/fs/cgroup")),
    ]);
    // The ConfigMap's interface names are a cluster's (cni0, eth0): here
    // TC goes on the node's interfaces and there is no external NIC for
    // XDP; socket-level load balancing would attach to the host's cgroup
    // root, outside this test's namespaces, so it is off.
    let overrides = BTreeMap::from([
        ("DATAPLANE_TC_IFACES", Some(t.node_ifaces().join(","))),
        ("DATAPLANE_XDP_IFACES", None),
        ("DATAPLANE_SOCKET_LB_CGROUP", Some(String::new())),
    ]);
    let bundle = dir.0.join("bundle");
    build_rootfs(&bundle.join("rootfs"));
    let config = oci_config(&t.node.name, &host_paths, &overrides, api, &sa);
    fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();

    let mut runc = Runc {
        state: dir.0.join("runc"),
        started: Vec::new(),
    };
    let log = dir.0.join("container.log");
    let id = format!("dataplane-{}", dataplane_tests::netns::unique_prefix());
    runc.run(&bundle, &id, &log);

    // Synced through in-cluster configuration, attached to the node's
    // interfaces with links pinned in the test's bpffs, ready by the
    // DaemonSet's own probes, carrying traffic.
    let pins = bpffs.0.join("dataplane");
    wait("the first sync", &runc, &id, &log, &fake, || {
        metric(&t, "dataplane_syncs_total").is_some_and(|n| n >= 1.0)
    });
    let links = tc_links(&t, &pins);
    for (path, port) in probes() {
        let answer = http_get(&t, port, &path).map(|(code, _)| code);
        assert_eq!(answer, Some(200), "the probe GET {path} on port {port}");
    }
    assert_eq!(backends(&t, 10).unwrap(), ["b1"]);
    let services = map_id(&pins.join("maps/DP_SERVICES"));

    // The pod goes away: the programs and maps stay pinned and serve.
    runc.stop(&id);
    assert!(metric(&t, "dataplane_syncs_total").is_none(), "the agent still answers");
    assert_eq!(tc_links(&t, &pins), links, "the pinned links changed with no agent");
    assert_eq!(map_id(&pins.join("maps/DP_SERVICES")), services);
    assert_eq!(backends(&t, 10).unwrap(), ["b1"], "served while no agent runs");

    // The next pod adopts the pins: the same maps, the same links with its
    // own programs swapped in; it follows changes again.
    let id2 = format!("{id}-2");
    runc.run(&bundle, &id2, &log);
    wait("the first sync of the new container", &runc, &id2, &log, &fake, || {
        metric(&t, "dataplane_syncs_total").is_some_and(|n| n >= 1.0)
    });
    assert_eq!(
        map_id(&pins.join("maps/DP_SERVICES")),
        services,
        "the maps were recreated, not adopted"
    );
    for (iface, now) in tc_links(&t, &pins) {
        let before = links[&iface];
        assert_eq!(now.id, before.id, "the link on {iface} was recreated, not adopted");
        assert_ne!(
            now.prog_id, before.prog_id,
            "the new agent left the old program on {iface}"
        );
    }
    fake.apply(Kind::EndpointSlice, slice(&[backend_addr(1), backend_addr(2)]));
    let start = Instant::now();
    for attempt in 0.. {
        let seen = backends(&t, 30).unwrap();
        if seen == ["b1", "b2"] {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE && attempt < 100,
            "the new endpoint never got traffic: {seen:?}"
        );
    }
    runc.stop(&id2);
}
