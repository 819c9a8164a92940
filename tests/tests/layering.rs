//! The agent's modules form layers (see `dataplane-user/src/lib.rs` and
//! `docs/ARCHITECTURE.md`): each uses only the layers below it, so there is
//! no module cycle, and the model stays free of the kernel. This test reads
//! the sources and checks every `crate::` path outside test code.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Top-level modules of `dataplane-user` and their layer: a module may use
/// modules of a strictly lower layer only.
const LAYERS: &[(&str, u32)] = &[
    ("model", 0),
    ("node", 0),
    ("packet", 0),
    ("bpf", 0),
    ("state", 0),
    ("version", 0),
    ("source", 1),
    ("reconcile", 2),
    ("inspect", 2),
    ("http", 3),
    ("agent", 4),
    ("cli", 5),
];

/// Crates a module must not use: the model and the packet module are pure
/// (no kernel, no runtime, no syscalls).
const PURE: &[&str] = &["aya", "tokio", "libc", "kube"];
const FORBIDDEN: &[(&str, &[&str])] = &[("model", PURE), ("packet", PURE)];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dataplane-user/src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without comments and without its `#[cfg(test)]` module (or
/// nothing, for a file that is a test module itself).
fn code_of(path: &Path) -> String {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => &text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a piece of code names through `crate::`, grouped
/// imports (`use crate::{a::x, b}`) included.
fn crate_uses(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level entries of the group: split at depth-0 commas.
            let (mut depth, mut start) = (0, 0);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(first_segment(&group[start..j]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(first_segment(&group[start..j]));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(first_segment(rest));
        }
    }
    out.remove("");
    out
}

fn first_segment(path: &str) -> String {
    path.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy()
        .to_string();
    first.trim_end_matches(".rs").to_string()
}

#[test]
fn modules_use_only_lower_layers() {
    let src = src_dir();
    let layer: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut seen = BTreeSet::new();
    for f in &files {
        let module = module_of(&src, f);
        if module == "lib" || module == "main" {
            continue;
        }
        seen.insert(module.clone());
        let Some(&own) = layer.get(module.as_str()) else {
            violations.push(format!("{}: module {module} has no layer in LAYERS", f.display()));
            continue;
        };
        let code = code_of(f);
        for used in crate_uses(&code) {
            if used == module {
                continue;
            }
            match layer.get(used.as_str()) {
                Some(&l) if l < own => {}
                Some(&l) => violations.push(format!(
                    "{}: {module} (layer {own}) uses crate::{used} (layer {l})",
                    f.strip_prefix(&src).unwrap().display()
                )),
                None => violations.push(format!("{}: unknown module crate::{used}", f.display())),
            }
        }
        for (m, crates) in FORBIDDEN {
            if *m == module {
                for c in *crates {
                    if code.contains(&format!("{c}::")) {
                        violations.push(format!("{}: {module} must not use {c}", f.display()));
                    }
                }
            }
        }
    }
    for (m, _) in LAYERS {
        assert!(seen.contains(*m), "LAYERS names {m}, which is not a module any more");
    }
    assert!(violations.is_empty(), "layering violations:\n{}", violations.join("\n"));
}

#[test]
fn the_checker_sees_grouped_imports() {
    // The checker itself: a grouped import and a plain path are both found,
    // comments are not code.
    let uses = crate_uses("use crate::{bpf::{loader::Maps, pin}, model::proto_name};\nlet x = crate::cli::main();");
    assert_eq!(uses, ["bpf", "cli", "model"].map(String::from).into());
}
