//! The real `dataplane` agent, run as a process inside a test's node
//! namespace with the file source. Stopped (by its PID) on drop.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// The agent binary: `DATAPLANE_BIN` (set by `cargo xtask test`), else the
/// workspace's debug build.
pub fn agent_binary() -> PathBuf {
    let path = std::env::var_os("DATAPLANE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/dataplane"));
    assert!(
        path.exists(),
        "agent binary {} not found: run the suite with `cargo xtask test`, which builds it",
        path.display()
    );
    path
}

/// How long a started agent may take to its first sync: a deadline, not a
/// timing: the first sync waits for the programs to load, which takes
/// 14-15 s of verifier work in the software-emulated qemu VM of
/// `cargo xtask test` (Debian's 6.1 kernel), under a second here.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Agent {
    child: Child,
    log: PathBuf,
    pub manifests: PathBuf,
    /// The agent's pin directory under /sys/fs/bpf (removed on drop).
    pub pins: PathBuf,
    /// The binary it runs: `agent_binary()`, or another release's agent.
    binary: PathBuf,
    args: Vec<String>,
    /// Where the extra arguments of `start_with` begin in `args`.
    extra_at: usize,
    netns: String,
    _dir: TempDir,
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("{prefix}-{}", crate::netns::unique_prefix()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Agent {
    /// Starts the agent in `ns` with TC on `tc_ifaces` and XDP on
    /// `xdp_ifaces`, reading manifests from a fresh directory that
    /// `manifests` are written to first (name, content).
    pub fn start(ns: &Netns, tc_ifaces: &[String], xdp_ifaces: &[String], manifests: &[(&str, &str)]) -> Result<Agent> {
        Self::start_with(ns, tc_ifaces, xdp_ifaces, manifests, &[])
    }

    /// As `start`, with extra `dataplane run` arguments.
    pub fn start_with(
        ns: &Netns,
        tc_ifaces: &[String],
        xdp_ifaces: &[String],
        manifests: &[(&str, &str)],
        extra: &[&str],
    ) -> Result<Agent> {
        Self::start_binary(&agent_binary(), ns, tc_ifaces, xdp_ifaces, manifests, extra)
    }

    /// As `start_with`, running `binary` (another release of the agent).
    pub fn start_binary(
        binary: &Path,
        ns: &Netns,
        tc_ifaces: &[String],
        xdp_ifaces: &[String],
        manifests: &[(&str, &str)],
        extra: &[&str],
    ) -> Result<Agent> {
        let dir = TempDir::new("dataplane-test");
        let mdir = dir.0.join("manifests");
        std::fs::create_dir_all(&mdir)?;
        for (name, content) in manifests {
            std::fs::write(mdir.join(name), content)?;
        }
        let pins = PathBuf::from("/sys/fs/bpf").join(crate::netns::unique_prefix());
        let mut args: Vec<String> = vec!["run".into(), "--dir".into(), mdir.display().to_string()];
        args.extend(["--bpffs-root".into(), pins.display().to_string()]);
        for i in tc_ifaces {
            args.extend(["--tc-iface".into(), i.clone()]);
        }
        for i in xdp_ifaces {
            args.extend(["--xdp-iface".into(), i.clone()]);
        }
        let extra_at = args.len();
        args.extend(extra.iter().map(|a| a.to_string()));
        let log = dir.0.join("agent.log");
        let child = spawn(binary, &ns.name, &args, &log)?;
        let mut a = Agent {
            child,
            log,
            manifests: mdir,
            pins,
            binary: binary.to_path_buf(),
            args,
            extra_at,
            netns: ns.name.clone(),
            _dir: dir,
        };
        a.wait_syncs(1, START_TIMEOUT)?;
        Ok(a)
    }

    /// Kills the agent with SIGKILL (no cleanup of any kind), then starts
    /// it again with the same arguments, pins and manifests, and waits for
    /// its first sync.
    pub fn kill_and_restart(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        self.child = spawn(&self.binary, &self.netns, &self.args, &self.log)?;
        self.wait_syncs(1, START_TIMEOUT)
    }

    /// Stops the agent with SIGTERM (its pinned programs stay attached, as
    /// when a DaemonSet replaces its pod), then starts `binary` in its
    /// place with the same pins, manifests and interfaces and `extra`
    /// instead of the previous extra arguments, and waits for its first
    /// sync: an upgrade, a rollback, or a restart with other flags.
    pub fn replace(&mut self, binary: &Path, extra: &[&str]) -> Result<()> {
        self.terminate()?;
        self.args.truncate(self.extra_at);
        self.args.extend(extra.iter().map(|a| a.to_string()));
        self.binary = binary.to_path_buf();
        self.child = spawn(&self.binary, &self.netns, &self.args, &self.log)?;
        self.wait_syncs(1, START_TIMEOUT)
    }

    /// From the agent's pinned maps: connections translated at connect
    /// time (socket-level programs) and new flows translated per packet,
    /// so far.
    pub fn translations(&self) -> Result<(u64, u64)> {
        let s = dataplane::inspect::stats(&dataplane::inspect::open_pinned(&self.pins)?)?;
        let sock = s
            .socket_lb
            .iter()
            .find(|e| e.event == "connect_translated")
            .map_or(0, |e| e.count);
        let nat = s
            .reasons
            .iter()
            .find(|r| r.reason == "nat_new_flow")
            .map_or(0, |r| r.packets);
        Ok((sock, nat))
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /metrics` of the running agent (its default 127.0.0.1:10249,
    /// inside its namespace): the samples by series (`name{labels}`).
    pub fn metrics(&self) -> Result<BTreeMap<String, f64>> {
        let ns = format!("/run/netns/{}", self.netns);
        let body = std::thread::spawn(move || -> Result<String> {
            use std::io::{Read, Write};
            crate::netns::enter(&ns);
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 10249));
            let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
            let mut out = String::new();
            c.read_to_string(&mut out)?;
            Ok(out)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the scrape thread panicked"))??;
        let (head, body) = body.split_once("\r\n\r\n").context("no HTTP response from /metrics")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("/metrics answered {head}");
        }
        let mut samples = BTreeMap::new();
        for line in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (series, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("bad sample line {line:?}"))?;
            samples.insert(
                series.to_string(),
                value.parse().with_context(|| format!("bad value in {line:?}"))?,
            );
        }
        Ok(samples)
    }

    /// [`Agent::metrics`] once the agent has read its maps after this call:
    /// the datapath series (read every [`METRICS_INTERVAL_MS`], not at the
    /// scrape) then count every packet sent before it. Polls for at most
    /// 10 s.
    pub fn fresh_metrics(&self) -> Result<BTreeMap<String, f64>> {
        const TAKEN: &str = "dataplane_datapath_snapshot_timestamp_seconds";
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        let start = Instant::now();
        loop {
            let m = self.metrics()?;
            match m.get(TAKEN) {
                Some(t) if *t >= since => return Ok(m),
                Some(_) => {}
                None => bail!("no {TAKEN} in /metrics"),
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the agent read no datapath metrics for 10 s; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Syncs the running agent process applied (`dataplane_syncs_total`).
    /// An error if its metrics cannot be read: a count taken as the base
    /// of a wait must not silently be 0.
    pub fn syncs(&self) -> Result<usize> {
        let m = self.metrics()?;
        let n = m
            .get("dataplane_syncs_total")
            .context("no dataplane_syncs_total in /metrics")?;
        Ok(*n as usize)
    }

    /// `sync applied` lines in the agent's log, over every process the
    /// log has seen: a second account of the syncs, for the tests that
    /// compare the two.
    pub fn logged_syncs(&self) -> usize {
        self.log().lines().filter(|l| l.contains("sync applied")).count()
    }

    /// Waits until the running agent process has applied at least `n`
    /// syncs (by its metrics).
    pub fn wait_syncs(&mut self, n: usize, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            // Not up yet (a starting agent) counts as no sync yet.
            if self.syncs().is_ok_and(|s| s >= n) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the agent exited ({status}) before sync {n}; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "the agent did not apply sync {n} within {timeout:?}; its log:\n{}",
            self.log()
        )
    }

    /// Waits until `cond` holds (polled every 20 ms), failing with `what`
    /// and the agent's log if the agent exits or `timeout` passes first:
    /// for conditions on the maps, pins or interfaces the agent manages.
    pub fn wait_until(&mut self, what: &str, timeout: Duration, mut cond: impl FnMut(&Agent) -> bool) -> Result<()> {
        let start = Instant::now();
        loop {
            if cond(self) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the agent exited ({status}) before {what}; its log:\n{}", self.log());
            }
            if start.elapsed() >= timeout {
                bail!("not within {timeout:?}: {what}; the agent's log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites manifest `name` and waits until the agent applied it.
    pub fn update(&mut self, name: &str, content: &str) -> Result<()> {
        // The file source polls only between syncs, and each sync applies
        // what its poll read: with no other write pending, the next sync
        // after `before` is the one that applies this write.
        let before = self.syncs()?;
        self.write(name, content)?;
        self.wait_syncs(before + 1, Duration::from_secs(10))
    }

    /// Rewrites manifest `name` without waiting for a sync.
    pub fn write(&self, name: &str, content: &str) -> Result<()> {
        // Write then rename, as kubectl-less tooling should, so the agent
        // never reads a half-written file.
        let tmp = self.manifests.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, self.manifests.join(name))?;
        Ok(())
    }

    /// Stops the agent with SIGTERM and returns its exit status. Its pinned
    /// programs stay attached until `cleanup` (or drop).
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        self.terminate()
    }

    /// `dataplane cleanup` on the agent's pins: detaches the programs and
    /// removes the maps. Returns what it printed.
    pub fn cleanup(&self) -> Result<String> {
        let out = Command::new(agent_binary())
            .args(["cleanup", "--bpffs-root"])
            .arg(&self.pins)
            .output()
            .context("running dataplane cleanup")?;
        if !out.status.success() {
            bail!("dataplane cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        if let Some(s) = self.child.try_wait()? {
            return Ok(s);
        }
        // SAFETY: kill on the PID of our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child.kill()?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.terminate();
        if let Err(e) = self.cleanup() {
            eprintln!("cleanup of {}: {e}", self.pins.display());
        }
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

/// How often test agents read their datapath metrics (default 10 s): a
/// test waits for a read after its traffic ([`Agent::fresh_metrics`]).
pub const METRICS_INTERVAL_MS: u64 = 100;

/// Starts `binary ARGS` (an agent) in namespace `netns`, its stderr appended
/// to `log`.
fn spawn(binary: &Path, netns: &str, args: &[String], log: &Path) -> Result<Child> {
    let logf = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    // nsenter enters only the network namespace. `ip netns exec` would also
    // give the agent a private mount namespace with its own /sys, where a
    // bpffs it mounts (and its pins) would die with it, unlike a DaemonSet
    // with the host's /sys/fs/bpf. nsenter execs the agent: the child's PID
    // is the agent's.
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg("--")
        .arg(binary)
        .args(args)
        .env("DATAPLANE_LOG", "info")
        // By environment: earlier releases (the upgrade tests) ignore it.
        .env("DATAPLANE_METRICS_INTERVAL_MS", METRICS_INTERVAL_MS.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .context("starting the agent")
}
