//! Developer tasks: `cargo xtask build-ebpf | demo | test | lint | setup | bench | bench-sync`.
//!
//! Each task installs what it is missing (nightly rust-src, bpf-linker,
//! Debian packages) and says so before it does.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod kernels;
mod release;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF programs (kernel side) with nightly, build-std and
    /// bpf-linker, installing the toolchain pieces that are missing.
    BuildEbpf,
    /// Install the Debian packages the demo and the tests need.
    Setup,
    /// Build (once; cached under target/releases/) the agent of the newest
    /// release in CHANGELOG.md from its commit, for the upgrade and rollback
    /// tests, and print its path. `test` does this itself.
    PreviousRelease,
    /// Build everything and show a Service load-balanced by the eBPF program
    /// across backends in network namespaces (needs root).
    Demo,
    /// Check formatting and clippy on every crate, the eBPF one included.
    Lint,
    /// Run the whole test suite: unit, program (BPF_PROG_TEST_RUN) and
    /// end-to-end tests in network namespaces, then the program and
    /// end-to-end tests on Debian's 6.1 kernel in qemu (needs root).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The program and end-to-end tests on other kernels (Debian's 5.10,
    /// 6.1 and 6.12), each booted in qemu with virtme-ng: installs qemu,
    /// busybox and virtme-ng if missing, fetches and caches the kernels
    /// under target/kernels/ (needs root).
    TestKernels {
        /// Only these kernels (5.10, 6.1, 6.12); all by default.
        names: Vec<String>,
    },
    /// The control-plane part of `bench` alone at one size:
    /// `bench --only control-plane --scales $BENCH_SERVICES` (default
    /// 10,000 Services x 4 endpoints), merged into
    /// bench-results/control-plane.json (needs root).
    BenchSync,
    /// Benchmarks (needs root): per-packet cost with BPF_PROG_TEST_RUN,
    /// latency/throughput through a VIP against kube-proxy's iptables and
    /// nftables rules, the control plane (cold sync, one change, agent
    /// memory; iptables-restore and nft -f install times), and NodePort
    /// packets per second from outside (XDP) against the same rules.
    /// Writes JSON, SVG plots and summary.md to bench-results/.
    Bench {
        /// A few minutes instead of about half an hour.
        #[arg(long)]
        quick: bool,
        /// Only redraw the plots and summary from existing results.
        #[arg(long)]
        report_only: bool,
        /// Run only these parts (repeat or comma-separate); the others'
        /// results stay as they are and the report covers all.
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<BenchPart>,
        /// Run only these numbers of Services (comma-separated), replacing
        /// those scales in the results and keeping the others.
        #[arg(long)]
        scales: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BenchPart {
    PerPacket,
    ThroughVip,
    ControlPlane,
    Nodeport,
    NodeportRemote,
}

impl BenchPart {
    fn name(self) -> &'static str {
        match self {
            BenchPart::PerPacket => "per-packet",
            BenchPart::ThroughVip => "through-vip",
            BenchPart::ControlPlane => "control-plane",
            BenchPart::Nodeport => "nodeport",
            BenchPart::NodeportRemote => "nodeport-remote",
        }
    }
}

/// Debian packages used by the demo and tests, with the command that shows
/// each is present.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("ethtool", "ethtool"),
    ("bpftool", "bpftool"),
    ("util-linux", "nsenter"),
    ("curl", "curl"),
    ("runc", "runc"),
    ("nftables", "nft"),
];

/// What the benchmarks compare against: kube-proxy's two rule backends.
const BENCH_PACKAGES: &[(&str, &str)] = &[("iptables", "iptables-restore"), ("nftables", "nft")];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn say(msg: impl AsRef<str>) {
    eprintln!("xtask: {}", msg.as_ref());
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status().with_context(|| format!("running {cmd:?}"))
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// The bpf-linker release the eBPF object is linked with (deploy/Dockerfile
/// pins the same one).
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// The pinned nightly of the eBPF crate: the `channel` of
/// dataplane-ebpf/rust-toolchain.toml.
fn nightly() -> String {
    let path = root().join("dataplane-ebpf/rust-toolchain.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("channel = \"")?
                .strip_suffix('"')
                .map(String::from)
        })
        .unwrap_or_else(|| panic!("{}: no `channel = \"...\"` line", path.display()))
}

/// `+nightly-YYYY-MM-DD` for cargo and rustc.
fn nightly_arg() -> String {
    format!("+{}", nightly())
}

/// The LLVM major version of the nightly rustc (bpf-linker must match it).
fn nightly_llvm_major() -> Result<u32> {
    let v = output(Command::new("rustc").args([&nightly_arg(), "-vV"]))
        .context("`rustc +nightly -vV` failed: is the nightly toolchain installed?")?;
    let line = v
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV shows no LLVM version")?;
    line.split('.')
        .next()
        .unwrap_or("")
        .trim()
        .parse()
        .context("parsing the LLVM version of rustc +nightly")
}

/// The build date of an installed toolchain, from its rustup manifest
/// (`date = "YYYY-MM-DD"`).
fn toolchain_date(toolchain: &str) -> Option<String> {
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .args(["--print", "sysroot"]),
    )?;
    let manifest = Path::new(sysroot.trim()).join("lib/rustlib/multirust-channel-manifest.toml");
    std::fs::read_to_string(manifest)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("date = \"")?.strip_suffix('"').map(String::from))
}

/// Makes sure the pinned nightly (with rust-src and clippy) is there. A
/// `nightly` toolchain of the same build date is the same toolchain: it is
/// linked under the pinned name instead of downloading it again (machines
/// that reach no toolchain server have it this way).
fn ensure_nightly() -> Result<()> {
    let pinned = nightly();
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).context("rustup is not available")?;
    let have = |name: &str| {
        toolchains
            .lines()
            .any(|l| l.split_whitespace().next().is_some_and(|t| t.starts_with(name)))
    };
    if !have(&pinned) {
        let date = pinned.trim_start_matches("nightly-");
        if have("nightly-") && toolchain_date("nightly").as_deref() == Some(date) {
            // rustup refuses `toolchain link` under an official name, but
            // takes a toolchain directory of that name as installed.
            let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).unwrap_or_default();
            let sysroot = Path::new(sysroot.trim());
            let dir_name = sysroot
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("nightly-"))
                .map(|host| format!("{pinned}-{host}"))
                .context("the nightly toolchain's directory is not named nightly-<host>")?;
            let alias = sysroot.with_file_name(dir_name);
            say(format!(
                "the installed `nightly` is the pinned {pinned} (same build date); making it known under that name: {}",
                alias.display()
            ));
            std::os::unix::fs::symlink(sysroot, &alias).with_context(|| format!("linking {}", alias.display()))?;
        } else {
            say(format!(
                "the pinned toolchain {pinned} is missing; installing it (the eBPF crate needs nightly for build-std)"
            ));
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                &pinned,
                "--profile",
                "minimal",
                "--component",
                "rust-src,clippy,rustfmt",
            ]))?;
        }
    }
    // Components are files in the sysroot (a linked toolchain has no
    // component list of its own).
    let sysroot = output(Command::new("rustc").arg(nightly_arg()).args(["--print", "sysroot"]))
        .context("rustc of the pinned nightly")?;
    let sysroot = Path::new(sysroot.trim());
    for (component, file, why) in [
        (
            "rust-src",
            "lib/rustlib/src/rust/library",
            "needed for -Z build-std=core",
        ),
        ("clippy", "bin/cargo-clippy", "lints the eBPF crate"),
        ("rustfmt", "bin/rustfmt", "formats the eBPF crate"),
    ] {
        if !sysroot.join(file).exists() {
            say(format!("{pinned} lacks {component}; installing it ({why})"));
            // A linked toolchain takes components through the one it links to.
            let nightly_sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]));
            let owner = match nightly_sysroot {
                Some(s) if Path::new(s.trim()) == sysroot => "nightly".to_string(),
                _ => pinned.clone(),
            };
            run(Command::new("rustup").args(["component", "add", component, "--toolchain", &owner]))?;
        }
    }
    Ok(())
}

/// Installs bpf-linker built against the nightly toolchain's own libLLVM
/// (there is no distribution package of the LLVM version nightly uses).
fn ensure_bpf_linker() -> Result<()> {
    let major = nightly_llvm_major()?;
    let installed = output(Command::new("bpf-linker").arg("--version"));
    // bpf-linker is linked against the nightly's libLLVM by path: if it
    // runs, it matches the nightly; after a nightly update it no longer
    // starts and is rebuilt. It must also be the pinned release.
    if installed
        .as_deref()
        .is_some_and(|v| v.split_whitespace().nth(1) == Some(BPF_LINKER_VERSION))
    {
        return Ok(());
    }
    say(format!(
        "bpf-linker {BPF_LINKER_VERSION} is missing (or another version, or it no longer runs: {installed:?}); \
         building it against the pinned nightly's LLVM {major} (about a minute)"
    ));
    let sysroot = output(Command::new("rustc").args([&nightly_arg(), "--print", "sysroot"]))
        .context("rustc +nightly --print sysroot")?
        .trim()
        .to_string();
    let libdir = Path::new(&sysroot).join("lib");
    let llvm_lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|n| {
            n.strip_prefix("lib")
                .and_then(|n| n.strip_suffix(".so"))
                .filter(|n| n.starts_with("LLVM"))
                .map(String::from)
        })
        .with_context(|| {
            format!(
                "no libLLVM*.so in {}: nightly without its LLVM library?",
                libdir.display()
            )
        })?;
    let l = libdir.display();
    let rustflags = format!("-C link-arg=-L{l} -C link-arg=-l{llvm_lib} -C link-arg=-Wl,-rpath,{l}");
    run(Command::new("cargo")
        .args([
            &nightly_arg(),
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major},no-llvm-linking"))
        .env("RUSTFLAGS", rustflags))
    .context("installing bpf-linker")
}

fn ensure_packages() -> Result<()> {
    install_missing(PACKAGES, "network namespaces, offload control, map inspection")
}

fn install_missing(packages: &[(&str, &str)], why: &str) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, cmd)| !have(cmd))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    say(format!("installing Debian packages {} ({why})", missing.join(" ")));
    if !is_root() {
        bail!(
            "installing {} needs root: run as root, or `apt-get install {}` first",
            missing.join(" "),
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0")
}

/// `cargo +nightly SUBCOMMAND` on the eBPF crate, for its target, with
/// build-std and the shared target directory. The eBPF crate must not
/// inherit host flags (coverage, sanitizers).
fn ebpf_cargo(root: &Path, subcommand: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("dataplane-ebpf"))
        .args([
            &nightly_arg(),
            subcommand,
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    cmd
}

fn build_ebpf() -> Result<()> {
    ensure_nightly()?;
    ensure_bpf_linker()?;
    say("building the eBPF programs (dataplane-ebpf, bpfel-unknown-none, release)");
    let root = root();
    run(&mut ebpf_cargo(&root, "build"))?;
    say(format!(
        "eBPF object: {}",
        root.join("target/ebpf/bpfel-unknown-none/release/dataplane").display()
    ));
    Ok(())
}

fn build_user() -> Result<()> {
    say("building the agent and the tests (dataplane-user embeds the eBPF object)");
    run(Command::new("cargo")
        .current_dir(root())
        .args(["build", "--workspace", "--bins"]))
}

fn lint() -> Result<()> {
    let root = root();
    say("checking formatting (cargo fmt) and lints (cargo clippy -D warnings), host and eBPF crates");
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["fmt", "--all", "--", "--check"]))?;
    run(Command::new("cargo")
        .current_dir(root.join("dataplane-ebpf"))
        .args(["fmt", "--", "--check"]))?;
    run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(ebpf_cargo(&root, "clippy").args(["--", "-D", "warnings"]))
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root (network namespaces, BPF programs): run it as root, e.g. `sudo -E cargo xtask ...`");
    }
    Ok(())
}

fn bench(quick: bool, report_only: bool, only: &[BenchPart], scales: Option<String>) -> Result<()> {
    let out = std::env::var_os("DP_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("bench-results"));
    if !report_only {
        require_root("the benchmarks")?;
        ensure_packages()?;
        install_missing(BENCH_PACKAGES, "kube-proxy's rule backends, the comparison baseline")?;
        build_ebpf()?;
        let parts: Vec<BenchPart> = if only.is_empty() {
            vec![
                BenchPart::PerPacket,
                BenchPart::ThroughVip,
                BenchPart::ControlPlane,
                BenchPart::Nodeport,
                BenchPart::NodeportRemote,
            ]
        } else {
            only.to_vec()
        };
        // Release builds: the control-plane part times the agent against
        // the fake API server inside dp-bench, whose list responses a debug
        // build would make several times slower; the through-VIP client and
        // servers and the agent there are the same release builds.
        say("building the agent and dp-bench in release");
        run(Command::new("cargo").current_dir(root()).args([
            "build",
            "--release",
            "-p",
            "dataplane-user",
            "--bin",
            "dataplane",
            "-p",
            "dataplane-tests",
            "--bin",
            "dp-bench",
        ]))?;
        say(if quick {
            "running the benchmarks (--quick: about 7 minutes for all parts here)"
        } else {
            "running the benchmarks (about 35 minutes for all parts here)"
        });
        let mut cmd = Command::new(root().join("target/release/dp-bench"));
        cmd.current_dir(root())
            .arg("--out")
            .arg(&out)
            .arg("--release-agent")
            .arg(root().join("target/release/dataplane"));
        for p in parts {
            cmd.args(["--part", p.name()]);
        }
        if let Some(s) = scales {
            cmd.args(["--scales", &s]);
        }
        if quick {
            cmd.arg("--quick");
        }
        run(cmd.env("DATAPLANE_BIN", root().join("target/release/dataplane")))?;
    }
    say(format!("drawing plots and summary.md in {}", out.display()));
    bench::report(&out)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::BuildEbpf => build_ebpf(),
        Task::Setup => ensure_packages(),
        Task::TestKernels { names } => {
            require_root("booting kernels and loading programs")?;
            ensure_packages()?;
            build_ebpf()?;
            kernels::test_kernels(&names)
        }
        Task::PreviousRelease => {
            ensure_nightly()?;
            ensure_bpf_linker()?;
            let (release, bin) = release::previous_agent()?;
            println!("{} {}", release.version, bin.display());
            Ok(())
        }
        Task::Lint => {
            ensure_nightly()?;
            ensure_bpf_linker()?;
            lint()
        }
        Task::Demo => {
            require_root("the demo")?;
            ensure_packages()?;
            build_ebpf()?;
            build_user()?;
            say("running the demo");
            run(Command::new(root().join("target/debug/dp-demo")).current_dir(root()))
        }
        Task::BenchSync => {
            let n = std::env::var("BENCH_SERVICES").unwrap_or_else(|_| "10000".into());
            bench(false, false, &[BenchPart::ControlPlane], Some(n))
        }
        Task::Bench {
            quick,
            report_only,
            only,
            scales,
        } => bench(quick, report_only, &only, scales),
        Task::Test { args } => {
            require_root("the test suite")?;
            ensure_packages()?;
            build_ebpf()?;
            build_user()?;
            lint()?;
            let (previous, previous_bin) = release::previous_agent()?;
            say("running every test: unit, BPF_PROG_TEST_RUN, end-to-end in network namespaces");
            run(Command::new("cargo")
                .current_dir(root())
                .args(["test", "--workspace", "--no-fail-fast"])
                .arg("--")
                .args(&args)
                .env("DATAPLANE_BIN", root().join("target/debug/dataplane"))
                .env("DATAPLANE_PREV_BIN", previous_bin)
                .env("DATAPLANE_PREV_VERSION", previous.version))?;
            // One kernel other than this machine's, every full run (the
            // whole matrix: `cargo xtask test-kernels`).
            if !args.is_empty() {
                say("a filtered run: the tests on other kernels are left out (`cargo xtask test-kernels`)");
                return Ok(());
            }
            say("the program and end-to-end tests on Debian's 6.1 kernel in qemu (`cargo xtask test-kernels` runs 5.10, 6.1 and 6.12)");
            kernels::test_kernels(&["6.1".to_string()])
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, fs};

    use clap::CommandFactory;

    use super::*;

    /// Every `cargo xtask ...` in the README and docs/ (code blocks and
    /// inline code, up to a `#` comment), as (where, words after `cargo`).
    fn shown() -> Vec<(String, Vec<String>)> {
        let docs = fs::read_dir(root().join("docs")).unwrap().map(|e| e.unwrap().path());
        let mut out = Vec::new();
        for path in docs
            .chain([root().join("README.md")])
            .filter(|p| p.extension().is_some_and(|e| e == "md"))
        {
            let text = fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                for (_, rest) in line.match_indices("cargo xtask").map(|(i, _)| line.split_at(i)) {
                    let cmd = rest.split(['`', '#']).next().unwrap().trim();
                    if cmd == "cargo xtask" {
                        continue; // the tool named, no command
                    }
                    let at = format!("{}:{}: {cmd}", path.strip_prefix(root()).unwrap().display(), n + 1);
                    out.push((at, cmd.split_whitespace().skip(1).map(String::from).collect()));
                }
            }
        }
        out
    }

    #[test]
    fn docs_show_only_commands_xtask_accepts() {
        let shown = shown();
        assert!(
            shown.len() >= 10,
            "only {} commands found: is the search broken?",
            shown.len()
        );
        let refused: Vec<String> = shown
            .iter()
            .filter_map(|(at, words)| Cli::try_parse_from(words).err().map(|e| format!("{at}\n    {e}")))
            .collect();
        assert!(
            refused.is_empty(),
            "refused by xtask's parser:\n  {}",
            refused.join("\n  ")
        );
        let used: BTreeSet<&str> = shown.iter().filter_map(|(_, w)| w.get(1).map(String::as_str)).collect();
        let missing: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .filter(|name| name != "help" && !used.contains(name.as_str()))
            .collect();
        assert!(missing.is_empty(), "xtask subcommands no page shows: {missing:?}");
    }
}
