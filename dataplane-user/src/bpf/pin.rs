//! Pinned state under bpffs (default /sys/fs/bpf/dataplane): maps in
//! `maps/`, program links in `links/`. A restarted or upgraded agent adopts
//! them, so the datapath never stops and conntrack survives; `dataplane
//! cleanup` removes them.

use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{maps::MapData, programs::links::PinnedLink};
use dataplane_common::map_shapes;
use thiserror::Error;

/// The "program" part of socket-level link pins: `links/sock-connect4`.
pub const SOCKET_LINK_PREFIX: &str = "sock";

/// Where the agent pins by default.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/dataplane";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, Error)]
pub enum PinError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path} is not on a bpf filesystem and mounting one at /sys/fs/bpf failed: {source}")]
    NotBpffs { path: String, source: io::Error },
    #[error(
        "pinned map {name} at {path} does not match this agent ({what}); it was made by another \
         version. Run `dataplane cleanup` to remove the pinned state (established connections \
         through this node lose their conntrack entries), or run the matching agent version"
    )]
    Mismatch {
        name: &'static str,
        path: String,
        what: String,
    },
    #[error("reading pinned map {name} at {path}: {source}")]
    Map {
        name: &'static str,
        path: String,
        source: aya::maps::MapError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A pinned map of another shape than this binary's ([`PinRoot::first_mismatch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    pub name: &'static str,
    pub path: String,
    /// What differs.
    pub what: String,
}

/// The layout of a pin root.
#[derive(Clone, Debug)]
pub struct PinRoot {
    pub root: PathBuf,
}

impl PinRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PinRoot { root: root.into() }
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The pin of the link attaching `program` ("tc" or "xdp") to `iface`.
    pub fn link(&self, program: &str, iface: &str) -> PathBuf {
        self.links().join(format!("{program}-{iface}"))
    }

    /// The pin of the link attaching the socket-level program of `hook`
    /// (`connect4`, ...) to its cgroup.
    pub fn socket_link(&self, hook: &str) -> PathBuf {
        self.link(SOCKET_LINK_PREFIX, hook)
    }

    /// Removes the socket-level links (socket load balancing turned off).
    /// Returns the hooks that were detached.
    pub fn unpin_socket_links(&self) -> Result<Vec<String>, PinError> {
        let mut removed = Vec::new();
        for (program, hook, path) in self.pinned_links()? {
            if program == SOCKET_LINK_PREFIX {
                Self::unpin_link(&path)?;
                removed.push(hook);
            }
        }
        Ok(removed)
    }

    /// Makes sure the root is on bpffs (mounting bpffs at /sys/fs/bpf when
    /// nothing is mounted there, as Cilium does) and creates its folders.
    /// Returns whether pinned maps already exist (a restart).
    pub fn prepare(&self) -> Result<bool, PinError> {
        ensure_bpffs(&self.root)?;
        fs::create_dir_all(self.maps()).map_err(io_err(&self.maps()))?;
        fs::create_dir_all(self.links()).map_err(io_err(&self.links()))?;
        Ok(map_shapes::ALL.iter().any(|s| self.map(s.name).exists()))
    }

    /// Checks every existing pinned map against the shapes this agent was
    /// built with, so that another version's maps are refused, never
    /// misread.
    pub fn check_maps(&self) -> Result<(), PinError> {
        self.check_maps_with(&crate::bpf::map_sizes::MapSizes::default())
    }

    /// As `check_maps`, against the configured capacities `sizes`.
    pub fn check_maps_with(&self, sizes: &crate::bpf::map_sizes::MapSizes) -> Result<(), PinError> {
        match self.first_mismatch(Some(sizes))? {
            Some(m) => Err(PinError::Mismatch {
                name: m.name,
                path: m.path,
                what: m.what,
            }),
            None => Ok(()),
        }
    }

    /// The first existing pinned map whose key or value size differs from
    /// this binary's shapes, or with `sizes` its capacity from those
    /// `sizes` (a reader such as the CLI passes none: it reads maps of any
    /// capacity, as an agent's `--*-max-entries` flags made them).
    pub fn first_mismatch(
        &self,
        sizes: Option<&crate::bpf::map_sizes::MapSizes>,
    ) -> Result<Option<ShapeMismatch>, PinError> {
        for shape in &map_shapes::ALL {
            let path = self.map(shape.name);
            if !path.exists() {
                continue;
            }
            let map = MapData::from_pin(&path).map_err(|source| PinError::Map {
                name: shape.name,
                path: path.display().to_string(),
                source,
            })?;
            let info = map.info().map_err(|source| PinError::Map {
                name: shape.name,
                path: path.display().to_string(),
                source,
            })?;
            let mismatch = |what: String| ShapeMismatch {
                name: shape.name,
                path: path.display().to_string(),
                what,
            };
            if info.key_size() != shape.key_size || info.value_size() != shape.value_size {
                return Ok(Some(mismatch(format!(
                    "key/value sizes {}/{}, expected {}/{}",
                    info.key_size(),
                    info.value_size(),
                    shape.key_size,
                    shape.value_size
                ))));
            }
            let Some(sizes) = sizes else { continue };
            let max_entries = sizes.max_entries(shape.name).unwrap_or(shape.max_entries);
            if info.max_entries() != max_entries {
                return Ok(Some(mismatch(format!(
                    "{} entries, expected {max_entries}; the --*-max-entries flags must match the pinned maps",
                    info.max_entries(),
                ))));
            }
        }
        Ok(None)
    }

    /// Link pins, as (program, interface, path).
    pub fn pinned_links(&self) -> Result<Vec<(String, String, PathBuf)>, PinError> {
        let dir = self.links();
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((program, iface)) = name.split_once('-') {
                out.push((program.to_string(), iface.to_string(), entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes a link pin, which detaches the program (nothing else holds
    /// the link).
    pub fn unpin_link(path: &Path) -> Result<(), PinError> {
        match PinnedLink::from_pin(path) {
            Ok(link) => {
                link.unpin().map_err(io_err(path))?;
                Ok(())
            }
            // Not a link any more (or unreadable): remove the file anyway.
            Err(_) => fs::remove_file(path).map_err(io_err(path)),
        }
    }

    /// Removes everything under the root: links first (programs detach),
    /// then maps, then the folders. Returns what was removed.
    pub fn cleanup(&self) -> Result<Vec<String>, PinError> {
        let mut removed = Vec::new();
        if !self.root.exists() {
            return Ok(removed);
        }
        for (program, iface, path) in self.pinned_links()? {
            Self::unpin_link(&path)?;
            if program == SOCKET_LINK_PREFIX {
                removed.push(format!("link socket-lb {iface} on its cgroup"));
            } else {
                removed.push(format!("link {program} on {iface}"));
            }
        }
        // The maps, and those of a migration that did not finish.
        let old_maps = self.root.join(crate::bpf::migrate::OLD_DIR);
        for dir in [self.maps(), old_maps.clone()] {
            if let Ok(entries) = fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
                    removed.push(format!("map {}", entry.file_name().to_string_lossy()));
                }
            }
        }
        let mark = self.root.join(crate::bpf::migrate::SWAPPED_MARK);
        for dir in [self.links(), self.maps(), old_maps, mark, self.root.clone()] {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&dir)(e)),
            }
        }
        Ok(removed)
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is a
    // valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Makes sure `root`'s nearest existing ancestor is on bpffs; mounts bpffs
/// at /sys/fs/bpf when the root is below it and nothing is mounted there.
pub fn ensure_bpffs(root: &Path) -> Result<(), PinError> {
    let mut existing = root;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    if is_bpffs(existing) {
        return Ok(());
    }
    let sys = Path::new("/sys/fs/bpf");
    if root.starts_with(sys) && !is_bpffs(sys) {
        let src = CString::new("bpf").unwrap();
        let target = CString::new("/sys/fs/bpf").unwrap();
        // SAFETY: valid C strings; mount(2) with no data.
        let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), src.as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            return Err(PinError::NotBpffs {
                path: root.display().to_string(),
                source: io::Error::last_os_error(),
            });
        }
        tracing::info!("mounted bpffs at /sys/fs/bpf");
        return Ok(());
    }
    Err(PinError::NotBpffs {
        path: root.display().to_string(),
        source: io::Error::other("not a bpf filesystem"),
    })
}
