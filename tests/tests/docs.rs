//! The README and `docs/` against the code they describe: every relative
//! link reaches a file and, with `#anchor`, a heading of it; every
//! `dataplane ...` command shown is accepted by the agent's own command line
//! parser (`dataplane::cli::args::Cli`) and every subcommand is shown
//! somewhere; every `cargo test ... --test NAME` names a test target that
//! exists, and a filter after `--` matches one of its tests. (The `cargo
//! xtask` commands are checked against xtask's parser by xtask's own unit
//! test, `docs_show_only_commands_xtask_accepts`.)

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use clap::{CommandFactory, Parser};
use dataplane::cli::args::Cli;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// README.md and every page of docs/, as (path relative to the root, text).
fn pages() -> Vec<(String, String)> {
    let mut names = vec!["README.md".to_string()];
    let docs = fs::read_dir(root().join("docs")).expect("docs/ exists");
    let mut pages: Vec<String> = docs
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    pages.sort();
    names.extend(pages);
    names
        .into_iter()
        .map(|n| {
            let text = fs::read_to_string(root().join(&n)).unwrap_or_else(|e| panic!("{n}: {e}"));
            (n, text)
        })
        .collect()
}

/// Commands shown in a page: lines of fenced code blocks and inline code
/// spans outside headings, without a `$ ` prompt or a trailing `# comment`,
/// as (line number, command).
fn commands(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let mut push = |s: &str| {
            let s = s.split(" #").next().unwrap_or_default().trim();
            out.push((i + 1, s.strip_prefix("sudo ").unwrap_or(s).to_string()));
        };
        if fenced {
            push(line.trim_start().strip_prefix("$ ").unwrap_or(line));
        } else if !line.starts_with('#') {
            line.split('`').skip(1).step_by(2).for_each(&mut push);
        }
    }
    out
}

/// A GitHub heading anchor: lower case, punctuation other than `-` and `_`
/// dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn every_link_reaches_a_file_and_heading() {
    let mut bad = Vec::new();
    let mut checked = 0;
    for (page, text) in pages() {
        let dir = root().join(&page).parent().unwrap().to_path_buf();
        for (n, line) in text.lines().enumerate() {
            for target in line.split("](").skip(1).filter_map(|s| s.split(')').next()) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
                let path = if file.is_empty() {
                    root().join(&page)
                } else {
                    dir.join(file)
                };
                if !path.exists() {
                    bad.push(format!("{page}:{}: {target}: no file {}", n + 1, path.display()));
                } else if !anchor.is_empty() {
                    let text = fs::read_to_string(&path).unwrap_or_default();
                    if !anchors(&text).contains(anchor) {
                        bad.push(format!("{page}:{}: {target}: no heading #{anchor}", n + 1));
                    }
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} links found: is the parser broken?");
    assert!(bad.is_empty(), "broken links:\n  {}", bad.join("\n  "));
}

/// Variables a command may set that the agent reads through a library, not
/// through a flag.
const LIBRARY_ENV: [&str; 2] = ["KUBECONFIG", "DATAPLANE_LOG"];

/// The `dataplane <subcommand> ...` commands of every page, as words: a
/// leading `NAME=value` becomes the flag whose environment variable is
/// `NAME` (`Err` when no flag or library reads it).
fn dataplane_commands() -> Vec<(String, Result<Vec<String>, String>)> {
    let mut out = Vec::new();
    for (page, text) in pages() {
        for (n, cmd) in commands(&text) {
            let mut words: Vec<String> = cmd.split_whitespace().map(String::from).collect();
            let mut flags = Vec::new();
            while let Some((name, value)) = words.first().and_then(|w| w.split_once('=')) {
                flags.push(flag_of_env(name).map(|flag| [flag, value.to_string()]));
                words.remove(0);
            }
            let sub = words.get(1).map(String::as_str).unwrap_or_default();
            if words.first().map(String::as_str) == Some("dataplane")
                && sub.starts_with(|c: char| c.is_ascii_lowercase())
            {
                let flags: Result<Vec<[String; 2]>, String> = flags.into_iter().collect();
                let words = flags.map(|f| {
                    words
                        .into_iter()
                        .chain(f.into_iter().flatten().filter(|w| !w.is_empty()))
                        .collect()
                });
                out.push((format!("{page}:{n}: {cmd}"), words));
            }
        }
    }
    out
}

/// The flag of any subcommand read from environment variable `name`
/// (`Ok("")` for [`LIBRARY_ENV`]).
fn flag_of_env(name: &str) -> Result<String, String> {
    if LIBRARY_ENV.contains(&name) {
        return Ok(String::new());
    }
    let cli = Cli::command();
    let args = cli
        .get_subcommands()
        .flat_map(|c| c.get_arguments().cloned().collect::<Vec<_>>());
    let arg = args
        .chain(cli.get_arguments().cloned())
        .find(|a| a.get_env().is_some_and(|e| e == name));
    let long = arg.and_then(|a| a.get_long().map(String::from));
    long.map(|l| format!("--{l}"))
        .ok_or(format!("sets {name}, which neither a flag nor a library reads"))
}

#[test]
fn docs_show_only_commands_the_agent_accepts() {
    // The environment the DaemonSet gives every agent (downward API); a
    // page mentioning `dataplane run --source kubernetes` relies on it.
    std::env::set_var("NODE_NAME", "node-1");
    let shown = dataplane_commands();
    assert!(
        shown.len() >= 10,
        "only {} commands found: is the parser broken?",
        shown.len()
    );
    let refused: Vec<String> = shown
        .iter()
        .filter_map(|(at, words)| match words {
            Err(e) => Some(format!("{at}\n    {e}")),
            Ok(words) => Cli::try_parse_from(words).err().map(|e| format!("{at}\n    {e}")),
        })
        .collect();
    assert!(
        refused.is_empty(),
        "refused by the agent's parser:\n  {}",
        refused.join("\n  ")
    );
    let used: BTreeSet<&str> = shown
        .iter()
        .filter_map(|(_, w)| Some(w.as_ref().ok()?[1].as_str()))
        .collect();
    let missing: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .filter(|name| name != "help" && !used.contains(name.as_str()))
        .collect();
    assert!(missing.is_empty(), "subcommands no page shows: {missing:?}");
}

#[test]
fn docs_name_only_test_targets_and_tests_that_exist() {
    let mut bad = Vec::new();
    let mut checked = 0;
    for (page, text) in pages() {
        for (n, cmd) in commands(&text) {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            if !cmd.starts_with("cargo test") {
                continue;
            }
            let Some(target) = words.iter().position(|w| *w == "--test").and_then(|i| words.get(i + 1)) else {
                continue;
            };
            checked += 1;
            let at = format!("{page}:{n}: {cmd}");
            let file = root().join(format!("tests/tests/{target}.rs"));
            let Ok(source) = fs::read_to_string(&file) else {
                bad.push(format!("{at}: no {}", file.display()));
                continue;
            };
            let after = words.iter().skip_while(|w| **w != "--").skip(1);
            for filter in after.filter(|w| !w.starts_with('-')) {
                if !source.lines().any(|l| l.contains("fn ") && l.contains(filter)) {
                    bad.push(format!("{at}: no test in {target} matches {filter:?}"));
                }
            }
        }
    }
    assert!(
        checked >= 3,
        "only {checked} cargo test commands found: is the parser broken?"
    );
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Every test a page names as `suite::test_name` (a file of `tests/tests/`)
/// exists there, so a renamed or removed test cannot stay cited.
#[test]
fn docs_name_only_tests_that_exist() {
    let mut bad = Vec::new();
    let mut checked = 0;
    for (page, text) in pages() {
        for (n, line) in text.lines().enumerate() {
            for span in line.split('`').skip(1).step_by(2) {
                let Some((suite, test)) = span.split_once("::") else {
                    continue;
                };
                let word = |s: &str| {
                    !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                };
                let file = root().join(format!("tests/tests/{suite}.rs"));
                if !word(suite) || !word(test) || !file.exists() {
                    continue;
                }
                checked += 1;
                let source = fs::read_to_string(&file).unwrap();
                if !source.contains(&format!("fn {test}(")) {
                    bad.push(format!("{page}:{}: no test {test} in tests/tests/{suite}.rs", n + 1));
                }
            }
        }
    }
    assert!(checked > 40, "only {checked} test names found: is the parser broken?");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
