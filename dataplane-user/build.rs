//! Embeds the eBPF object built by `cargo xtask build-ebpf`, when it exists,
//! so that the `dataplane` binary is self-contained. Without it the crate
//! still builds (for `cargo check`/`clippy`), and loading fails with a message
//! that says to run `cargo xtask build-ebpf` or to pass `--bpf-object`.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let object = manifest.join("../target/ebpf/bpfel-unknown-none/release/dataplane");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("dataplane.bpf.o");
    println!("cargo:rerun-if-changed={}", object.display());
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => fs::write(&out, b"").unwrap(),
    }
}
