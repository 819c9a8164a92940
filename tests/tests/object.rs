//! The datapath object as built: no call to `memset`, `memcpy` or
//! `memmove`. On BPF these are byte-by-byte loops (compiler_builtins'
//! generic ones: 5 instructions per byte, a 64-byte struct zeroed is 320
//! instructions run per packet); the datapath zeroes and copies with word
//! stores instead (see `conntrack::create`, `forward::zero_fib`). A
//! change that brings a call back (a `mem::zeroed()` of a large struct, an
//! array copy) fails here with the function that makes it.

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

const BYTE_LOOPS: [&str; 3] = ["memset", "memcpy", "memmove"];

fn object_path() -> std::path::PathBuf {
    std::env::var_os("DATAPLANE_BPF_OBJECT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/bpfel-unknown-none/release/dataplane")
        })
}

#[test]
fn the_datapath_calls_no_byte_loop() {
    let path = object_path();
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; build it with `cargo xtask build-ebpf`", path.display()));
    let obj = object::File::parse(&*bytes).expect("an ELF object");
    let mut calls = Vec::new();
    let mut functions = 0;
    for section in obj.sections() {
        // The functions of this section, by address, to name the caller.
        let mut syms: Vec<(u64, String)> = obj
            .symbols()
            .filter(|s| s.section_index() == Some(section.index()) && s.kind() == object::SymbolKind::Text)
            .map(|s| (s.address(), s.name().unwrap_or("?").to_string()))
            .collect();
        syms.sort();
        functions += syms.len();
        for (offset, reloc) in section.relocations() {
            let RelocationTarget::Symbol(i) = reloc.target() else {
                continue;
            };
            let target = obj
                .symbol_by_index(i)
                .ok()
                .and_then(|s| s.name().ok().map(str::to_string));
            if let Some(t) = target.filter(|t| BYTE_LOOPS.contains(&t.as_str())) {
                let caller = syms
                    .iter()
                    .rev()
                    .find(|(a, _)| *a <= offset)
                    .map_or("?", |(_, n)| n.as_str());
                calls.push(format!(
                    "{caller} calls {t} (section {}, offset {offset})",
                    section.name().unwrap_or("?")
                ));
            }
        }
    }
    // The listing read something: the programs and their functions.
    assert!(functions > 20, "only {functions} functions in {}", path.display());
    assert!(calls.is_empty(), "byte-by-byte loops called:\n{}", calls.join("\n"));
}
