//! `cargo xtask test-kernels`: the program tests (BPF_PROG_TEST_RUN on the
//! real object, verifier budgets) and end-to-end traffic tests on Debian's
//! packaged kernels, each booted in qemu with virtme-ng over this machine's
//! root filesystem. KVM does not work inside these VMs, so qemu emulates
//! (`vng --disable-kvm`): slow, but the kernel under test is the real one.
//!
//! Kernels come from Debian's archive through apt with a private sources
//! list and lists directory per suite (the machine's own sources are not
//! changed; the mirror is the one the machine's sources already name), are
//! unpacked with `dpkg -x` under target/kernels/ and kept there for the
//! next run.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{install_missing, output, root, run, say};

/// A kernel of the matrix: the Debian suite that ships it and the package
/// name pattern (the newest match is taken).
pub struct Kernel {
    pub name: &'static str,
    pub suite: &'static str,
    pub package_prefix: &'static str,
}

pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "5.10",
        suite: "bullseye",
        package_prefix: "linux-image-5.10.0-",
    },
    Kernel {
        name: "6.1",
        suite: "bookworm",
        package_prefix: "linux-image-6.1.0-",
    },
    Kernel {
        name: "6.12",
        suite: "bookworm-backports",
        package_prefix: "linux-image-6.12",
    },
];

/// What runs in each VM: (test binary, filter, what it shows). The agent
/// binary for the end-to-end tests is the workspace's debug build.
const SUITE: &[(&str, &str, &str)] = &[
    ("verifier", "", "every program loads within its verifier budget"),
    ("datapath", "", "exact bytes through XDP and TC (BPF_PROG_TEST_RUN)"),
    // The CHECKSUM_COMPLETE check needs test_run's flag for it (6.17):
    // none of the kernels in VMs has it.
    (
        "ipv6_datapath",
        "--skip tc_address_rewrites_keep_a_checksum_complete_sum_right",
        "IPv6 exact bytes",
    ),
    (
        "e2e",
        "tc_300_tcp_connections_all_succeed_and_spread_over_backends",
        "real TCP connections through a VIP in namespaces",
    ),
    (
        "e2e",
        "udp_request_response_through_the_vip_comes_back_from_the_vip",
        "real UDP through a VIP",
    ),
    // TC's L4 checksum updates take a different path per kernel (its own
    // where the kfunc bpf_cast_to_kern_ctx exists, 6.2+; the helper
    // before): both kinds of skb a veth hands on, checked by receivers.
    (
        "e2e",
        "tc_rewrites_partial_checksums_correctly",
        "CHECKSUM_PARTIAL skbs rewritten by TC, completed and verified",
    ),
    (
        "e2e",
        "tc_with_offloads_off_translates_tcp_and_udp_with_valid_checksums",
        "full checksums rewritten by TC, verified",
    ),
];

/// Debian packages and the PyPI package the VMs need.
const VM_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("busybox-static", "busybox"),
    ("kmod", "depmod"),
];

/// `vng` on PATH, else in the script directory of the python3 that pip
/// installs into (a pyenv shim may not exist yet right after the install).
fn vng() -> Option<PathBuf> {
    if output(Command::new("vng").arg("--version")).is_some() {
        return Some(PathBuf::from("vng"));
    }
    let scripts =
        output(Command::new("python3").args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]))?;
    let path = Path::new(scripts.trim()).join("vng");
    output(Command::new(&path).arg("--version")).map(|_| path)
}

/// Installs what the VMs need and returns the `vng` to run.
fn ensure_tools() -> Result<PathBuf> {
    install_missing(VM_PACKAGES, "booting other kernels in qemu")?;
    if vng().is_none() {
        say("virtme-ng is missing; installing it with pip (boots a kernel over this root filesystem)");
        run(Command::new("python3").args(["-m", "pip", "install", "-q", "virtme-ng"]))?;
    }
    vng().context("virtme-ng is installed but its `vng` runs neither from PATH nor from pip's script directory")
}

/// The Debian mirror the machine's own sources use (deb822 `URIs:` of the
/// main archive, or a one-line `deb` entry).
fn mirror() -> Result<String> {
    let mut texts = Vec::new();
    for dir in ["/etc/apt/sources.list.d"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".sources") {
                    texts.push(std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
    }
    texts.push(std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    for text in &texts {
        for line in text.lines().map(str::trim) {
            let uri = line.strip_prefix("URIs:").map(str::trim).or_else(|| {
                line.strip_prefix("deb ")
                    .and_then(|l| l.split_whitespace().find(|w| w.contains("://")))
            });
            if let Some(uri) = uri.filter(|u| u.trim_end_matches('/').ends_with("/debian")) {
                return Ok(uri.to_string());
            }
        }
    }
    bail!("no Debian archive in /etc/apt/sources.list(.d): cannot fetch kernel packages")
}

/// apt with a private sources list and lists directory for `suite`.
fn apt(dir: &Path, tool: &str) -> Command {
    let mut c = Command::new(tool);
    c.arg("-o")
        .arg(format!("Dir::Etc::sourcelist={}", dir.join("sources.list").display()))
        .args(["-o", "Dir::Etc::sourceparts=-", "-o"])
        .arg(format!("Dir::State::Lists={}", dir.join("lists").display()))
        .args(["-o", "Debug::NoLocking=1"]);
    c
}

/// The kernel's image and version, downloaded and unpacked once.
fn kernel_image(k: &Kernel) -> Result<(PathBuf, String)> {
    let base = root().join("target/kernels");
    let dir = base.join("apt").join(k.suite);
    std::fs::create_dir_all(dir.join("lists/partial"))?;
    std::fs::write(
        dir.join("sources.list"),
        format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {} {} main\n",
            mirror()?,
            k.suite
        ),
    )?;
    if !dir
        .join("lists")
        .read_dir()?
        .any(|e| e.is_ok_and(|e| e.path().is_file()))
    {
        say(format!(
            "fetching the package lists of Debian {} (for its {} kernel)",
            k.suite, k.name
        ));
        run(apt(&dir, "apt-get").args(["update", "-q"]))?;
    }
    let names = output(apt(&dir, "apt-cache").args(["pkgnames", k.package_prefix])).unwrap_or_default();
    let mut candidates: Vec<&str> = names
        .lines()
        .filter(|n| n.ends_with("-amd64-unsigned") && !n.contains("-rt-") && !n.contains("-cloud-"))
        .collect();
    candidates.sort_by_key(|n| version_key(n));
    let package = candidates
        .last()
        .with_context(|| format!("no {}*-amd64-unsigned package in Debian {}", k.package_prefix, k.suite))?
        .to_string();
    let unpacked = base.join(&package);
    let version = package
        .trim_start_matches("linux-image-")
        .trim_end_matches("-unsigned")
        .to_string();
    let image = unpacked.join("root/boot").join(format!("vmlinuz-{version}"));
    if !image.exists() {
        say(format!("downloading and unpacking {package}"));
        std::fs::create_dir_all(&unpacked)?;
        run(apt(&dir, "apt-get")
            .current_dir(&unpacked)
            .args(["download", "-q", &package]))?;
        let deb = std::fs::read_dir(&unpacked)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download left no .deb")?;
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(unpacked.join("root")))?;
        run(Command::new("depmod")
            .arg("-b")
            .arg(unpacked.join("root"))
            .arg(&version))?;
        let _ = std::fs::remove_file(deb);
    }
    Ok((image, version))
}

/// Sorts `linux-image-6.1.0-57-amd64-unsigned` after `...-9-...`.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}

/// The test binaries of the suite, built now (`cargo test --no-run`).
fn test_binaries() -> Result<Vec<(String, PathBuf)>> {
    let out = Command::new("cargo")
        .current_dir(root())
        .args(["test", "--no-run", "-p", "dataplane-tests", "--message-format=json"])
        .args(SUITE.iter().flat_map(|(t, _, _)| ["--test", t]))
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "building the test binaries failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) {
            if SUITE.iter().any(|(t, _, _)| *t == name) {
                found.push((name.to_string(), PathBuf::from(exe)));
            }
        }
    }
    Ok(found)
}

/// Runs the suite in a VM booted on `image`; returns (test, passed, failed)
/// per line of SUITE, read from the report the VM writes.
fn run_in_vm(
    vng: &Path,
    image: &Path,
    binaries: &[(String, PathBuf)],
    report: &Path,
) -> Result<Vec<(String, u64, u64)>> {
    let agent = root().join("target/debug/dataplane");
    let mut script = String::from("set +e\n");
    for (i, (test, filter, _)) in SUITE.iter().enumerate() {
        let exe = &binaries
            .iter()
            .find(|(n, _)| n == test)
            .with_context(|| format!("no test binary for {test}"))?
            .1;
        script.push_str(&format!(
            // Software emulation is slow: the two-CPU race of conntrack
            // updates runs 20,000 trials instead of 500,000, and the
            // program tests run two at a time on the VM's two CPUs (their
            // time goes to the verifier at every load: each test binary
            // loads the objects once per setting and reuses them, see
            // "Program tests reuse loaded objects" in docs/testing.md).
            "DATAPLANE_BIN={} DATAPLANE_RACE_TRIALS=20000 {} --test-threads=2 {filter} > {}.{i} 2>&1\n",
            agent.display(),
            exe.display(),
            report.display()
        ));
    }
    let script_path = PathBuf::from(format!("{}.sh", report.display()));
    std::fs::write(&script_path, script)?;
    let status = Command::new("timeout")
        .arg("1500")
        .arg(vng)
        .args(["--disable-kvm", "--memory", "2G", "--rwdir"])
        // The guest sees this machine's root read-only; the reports go
        // to a directory it may write.
        .arg(report.parent().expect("reports live in target/kernels"))
        .arg("-r")
        .arg(image)
        .args(["--", "sh"])
        .arg(&script_path)
        .current_dir(root())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("running vng")?;
    let mut results = Vec::new();
    for (i, (test, filter, _)) in SUITE.iter().enumerate() {
        let out = std::fs::read_to_string(format!("{}.{i}", report.display())).unwrap_or_default();
        let (mut passed, mut failed) = (0, 0);
        for line in out.lines().filter(|l| l.starts_with("test result:")) {
            let n = |word: &str| {
                line.split(';')
                    .find(|p| p.contains(word))
                    .and_then(|p| p.split_whitespace().find_map(|w| w.parse::<u64>().ok()))
                    .unwrap_or(0)
            };
            passed += n("passed");
            failed += n("failed");
        }
        if passed + failed == 0 {
            failed = 1; // did not run (or did not report): a failure
        }
        let label = if filter.is_empty() {
            test.to_string()
        } else {
            format!("{test} {filter}")
        };
        results.push((label, passed, failed));
    }
    // vng's own exit status says little (it often ends with 255 after a
    // clean power-off); what counts is each test binary's report, and a
    // missing report is a failure above.
    if !status.success() {
        say(format!("the VM ended with {status}; the reports of its tests decide"));
    }
    Ok(results)
}

/// `cargo xtask test-kernels [NAME...]`: every kernel of the matrix, or
/// the ones named (5.10, 6.1, 6.12).
pub fn test_kernels(names: &[String]) -> Result<()> {
    let vng = ensure_tools()?;
    let kernels: Vec<&Kernel> = KERNELS
        .iter()
        .filter(|k| names.is_empty() || names.iter().any(|n| n == k.name))
        .collect();
    if kernels.is_empty() {
        bail!(
            "no such kernel in the matrix: {names:?} (known: {:?})",
            KERNELS.iter().map(|k| k.name).collect::<Vec<_>>()
        );
    }
    say("building the test binaries and the agent");
    // The same build as `cargo xtask test`'s (the same features: nothing
    // is compiled twice).
    run(Command::new("cargo")
        .current_dir(root())
        .args(["build", "--workspace", "--bins"]))?;
    let binaries = test_binaries()?;
    let mut table = Vec::new();
    let mut failed_any = false;
    for k in kernels {
        let (image, version) = kernel_image(k)?;
        say(format!(
            "kernel {version} (Debian {}): booting it in qemu (software emulation, several minutes)",
            k.suite
        ));
        let report = root().join("target/kernels").join(format!("results-{version}"));
        let results = run_in_vm(&vng, &image, &binaries, &report)?;
        for (test, passed, failed) in results {
            failed_any |= failed > 0;
            table.push(format!(
                "| {} | {version} | {test} | {passed} passed, {failed} failed |",
                k.name
            ));
        }
    }
    println!("| kernel | package version | tests | result |\n|---|---|---|---|");
    for row in &table {
        println!("{row}");
    }
    if failed_any {
        bail!("some tests failed on some kernels; their output is in target/kernels/results-<version>.N");
    }
    Ok(())
}
