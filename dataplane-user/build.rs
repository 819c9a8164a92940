//! Embeds the eBPF object built by `cargo xtask build-ebpf`, when it exists,
//! so that the `dataplane` binary is self-contained. Without it the crate
//! still builds (for `cargo check`/`clippy`), and loading fails with a message
//! that says to run `cargo xtask build-ebpf` or to pass `--bpf-object`.
//!
//! Also records the git commit the agent is built from (`dataplane
//! version`, the first log line, `dataplane_build_info`): from
//! `DATAPLANE_GIT_COMMIT` when set (a container build without `.git`), else
//! from `git`, else "unknown".
use std::{env, fs, path::PathBuf, process::Command};

fn git(manifest: &PathBuf, args: &[&str]) -> Option<String> {
    let out = Command::new("git").current_dir(manifest).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let object = manifest.join("../target/ebpf/bpfel-unknown-none/release/dataplane");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("dataplane.bpf.o");
    println!("cargo:rerun-if-changed={}", object.display());
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => fs::write(&out, b"").unwrap(),
    }

    println!("cargo:rerun-if-env-changed=DATAPLANE_GIT_COMMIT");
    let commit = env::var("DATAPLANE_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&manifest, &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // Rebuild the version string when HEAD moves (a commit, a checkout).
    for path in ["HEAD", "index"] {
        if let Some(p) = git(&manifest, &["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={}", manifest.join(p).display());
        }
    }
    println!("cargo:rustc-env=DATAPLANE_GIT_COMMIT={commit}");
}
