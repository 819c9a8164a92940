//! What this agent is: its release, the commit it was built from, and the
//! map layout (ABI) version it reads and writes. Shown by `dataplane
//! version`, the agent's first log line and `dataplane_build_info`.

/// The release (the workspace version; see CHANGELOG.md).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binary was built from ("unknown" without git).
pub const COMMIT: &str = env!("DATAPLANE_GIT_COMMIT");
/// The map layout version (see docs/upgrades.md).
pub const ABI: u32 = dataplane_common::ABI_VERSION;

/// One line: `dataplane 0.2.0 (commit 0123456789ab, map layout 2)`.
pub fn describe() -> String {
    format!("dataplane {VERSION} (commit {COMMIT}, map layout {ABI})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_names_release_commit_and_layout() {
        let d = describe();
        assert!(
            d.starts_with(&format!("dataplane {} (commit ", env!("CARGO_PKG_VERSION"))),
            "{d}"
        );
        assert!(
            d.ends_with(&format!(", map layout {})", dataplane_common::ABI_VERSION)),
            "{d}"
        );
        assert!(!COMMIT.is_empty());
    }
}
