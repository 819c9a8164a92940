//! A cgroup v2 directory of one test, for the socket-level programs: they
//! act on sockets of processes in the cgroup they are attached to, so a
//! test attaches them to a fresh child cgroup of its own and runs its
//! clients there (never on the machine's root cgroup, whose processes
//! would all be affected). Removed on drop, after the processes the test
//! started in it (and only those: it created the cgroup) are ended.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Where cgroup2 is mounted, from /proc/self/mountinfo (the mount of the
/// hierarchy's root, e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS ... - FSTYPE SOURCE SUPER
        let (left, right) = l.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let f: Vec<&str> = left.split_whitespace().collect();
        (fstype == "cgroup2" && f.get(3) == Some(&"/")).then(|| PathBuf::from(f[4]))
    })
}

pub struct TestCgroup {
    path: PathBuf,
    /// A cgroup2 mount this guard made (when none was mounted), unmounted
    /// on drop.
    own_mount: Option<PathBuf>,
}

impl TestCgroup {
    /// A new, empty cgroup under the cgroup v2 root (cgroup2 is mounted
    /// under a temporary directory first if it is mounted nowhere).
    pub fn new() -> Result<TestCgroup> {
        let (root, own_mount) = match cgroup2_mount() {
            Some(m) => (m, None),
            None => {
                let m = std::env::temp_dir().join(format!("dpt-cgroup2-{}", crate::netns::unique_prefix()));
                std::fs::create_dir_all(&m)?;
                crate::netns::sh(&["mount", "-t", "cgroup2", "none", &m.display().to_string()]).context(
                    "no cgroup2 is mounted and mounting one failed: the socket-level tests need cgroup v2 \
                     (a kernel with CONFIG_CGROUP_BPF)",
                )?;
                (m.clone(), Some(m))
            }
        };
        let path = root.join(crate::netns::unique_prefix());
        std::fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(TestCgroup { path, own_mount })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cmd` run to completion as a process in this cgroup (it moves
    /// itself in between fork and exec), with a time limit.
    pub fn output(&self, cmd: &mut Command, limit: Duration) -> Result<Output> {
        self.enter_on_exec(cmd)?;
        output_with_limit(cmd, limit).with_context(|| format!("in cgroup {}", self.path.display()))
    }

    /// Makes `cmd`'s process move itself into this cgroup between fork and
    /// exec.
    pub fn enter_on_exec(&self, cmd: &mut Command) -> Result<()> {
        let procs = self.path.join("cgroup.procs");
        let procs = std::ffi::CString::new(procs.as_os_str().as_encoded_bytes())?;
        // SAFETY: the closure runs in the child between fork and exec and
        // only makes async-signal-safe syscalls (open, write, close) on
        // memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writing process itself.
                let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if rc != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// The processes in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Only processes this test started can be in its cgroup.
        for pid in self.pids() {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let started = Instant::now();
        while !self.pids().is_empty() && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("cleanup: removing cgroup {}: {e}", self.path.display());
        }
        if let Some(m) = &self.own_mount {
            let _ = crate::netns::sh(&["umount", &m.display().to_string()]);
            let _ = std::fs::remove_dir(m);
        }
    }
}

/// `cmd` run to completion with its output captured; killed (by its PID,
/// our own child) and reported if it takes longer than `limit`.
pub fn output_with_limit(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    // Drain the pipes while waiting, so that a chatty child cannot block.
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut v);
        v
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let out = out_reader.join().unwrap_or_default();
            let err = err_reader.join().unwrap_or_default();
            bail!(
                "{cmd:?} did not finish within {limit:?}; it printed:\n{}{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}
