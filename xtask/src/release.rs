//! The previous release's agent, built from git history for the upgrade
//! and rollback tests: its source is taken from its release commit (the
//! tag `vX.Y.Z`, or the commit CHANGELOG.md names for clones without
//! tags), built once into `target/releases/`, and reused by later runs.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{ebpf_cargo, root, run, say};

/// A release as CHANGELOG.md lists it: `## 0.1.0 (commit e419e7e, ...)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    pub version: String,
    pub commit: String,
}

/// The releases CHANGELOG.md names with a commit, newest first (the
/// unreleased section has none).
pub fn releases(changelog: &str) -> Vec<Release> {
    changelog
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("## ")?;
            let (version, rest) = rest.split_once(" (commit ")?;
            let commit: String = rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
            (!commit.is_empty()).then(|| Release {
                version: version.trim().to_string(),
                commit,
            })
        })
        .collect()
}

fn git(root: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .current_dir(root)
        .args(args)
        .output()
        .with_context(|| format!("running git {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The agent binary of the newest release in CHANGELOG.md, built if it is
/// not cached yet. Returns (release, binary).
pub fn previous_agent() -> Result<(Release, PathBuf)> {
    let root = root();
    let changelog = std::fs::read_to_string(root.join("CHANGELOG.md")).context("reading CHANGELOG.md")?;
    let release = releases(&changelog)
        .into_iter()
        .next()
        .context("CHANGELOG.md names no release with its commit (`## X.Y.Z (commit abcdef, date)`)")?;
    // The tag wins where it exists; it must agree with the changelog.
    let commit = match git(
        &root,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("v{}^{{commit}}", release.version),
        ],
    ) {
        Ok(c) => c,
        Err(_) => git(
            &root,
            &["rev-parse", "--verify", &format!("{}^{{commit}}", release.commit)],
        )
        .with_context(|| {
            format!(
                "release {} (commit {}) is not in this clone's history; fetch it (`git fetch --unshallow`)",
                release.version, release.commit
            )
        })?,
    };
    if !commit.starts_with(&release.commit) {
        bail!(
            "tag v{} is {commit}, CHANGELOG.md says {}: fix one of them",
            release.version,
            release.commit
        );
    }
    let dir = root
        .join("target/releases")
        .join(format!("{}-{}", release.version, &commit[..12]));
    let bin = dir.join("dataplane");
    if bin.exists() {
        say(format!(
            "previous release {} (commit {}): cached at {}",
            release.version,
            &commit[..12],
            bin.display()
        ));
        return Ok((release, bin));
    }
    say(format!(
        "building the previous release {} (commit {}) for the upgrade tests, once: its source from git, its own \
         target directory under target/releases (a few minutes)",
        release.version,
        &commit[..12]
    ));
    let src = dir.join("src");
    if src.exists() {
        std::fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
    }
    std::fs::create_dir_all(&src)?;
    // `git archive` rather than a worktree: nothing to unregister later.
    let archive = Command::new("git")
        .current_dir(&root)
        .args(["archive", "--format=tar", &commit])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running git archive")?;
    run(Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&src)
        .stdin(archive.stdout.context("git archive's output")?))?;
    run(&mut ebpf_cargo(&src, "build"))?;
    run(Command::new("cargo")
        .current_dir(&src)
        .args(["build", "-p", "dataplane-user", "--bin", "dataplane"])
        .env("CARGO_TARGET_DIR", root.join("target/releases/target")))?;
    std::fs::copy(root.join("target/releases/target/debug/dataplane"), &bin)
        .with_context(|| format!("copying the built agent to {}", bin.display()))?;
    // The source is not needed any more; the target directory is kept for
    // the next release's build.
    let _ = std::fs::remove_dir_all(&src);
    Ok((release, bin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_come_from_the_changelog_headings() {
        let text = "# Changelog\n\n## 0.3.0 (unreleased)\n\n## 0.2.0 (commit 0123abc, 2027-01-01)\n\n- x\n\n## 0.1.0 (commit e419e7e, 2026-12-04)\n";
        assert_eq!(
            releases(text),
            [
                Release {
                    version: "0.2.0".into(),
                    commit: "0123abc".into()
                },
                Release {
                    version: "0.1.0".into(),
                    commit: "e419e7e".into()
                }
            ]
        );
    }
}
