//! Change detection for the manifest directory by inotify(7): which paths
//! to look at again, instead of a `stat` of every file on every poll.
//!
//! A [`DirWatch`] holds one inotify instance with a watch on the directory
//! and on each of its (non-hidden) subdirectories, added by the full scan
//! before it lists each directory, so that nothing created meanwhile is
//! missed. Its events name the entries that changed; [`DirWatch::take`]
//! turns the queued ones into [`Changes`]: the files to `stat` again and
//! the directories to list again, or a full rescan when events were lost
//! (`IN_Q_OVERFLOW`) or the directory's own watch went away (the directory
//! removed, renamed or replaced, its filesystem unmounted).
//!
//! What inotify does not see is left to the source's periodic full rescan:
//! changes to files symlinked from outside the directory (only the link is
//! in the directory; its target changes elsewhere), changes made by other
//! hosts on a network filesystem, a file kept open and written without
//! being closed (a file counts as written when its writer closes it, so
//! that it is never read half written).

use std::{
    collections::{HashMap, HashSet},
    ffi::{CString, OsStr},
    fs, io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

/// What a watch on a directory reports: entries created (only symlinks
/// and hard links are looked at: a new regular file is read when its writer
/// closes it), written and closed, attributes changed (`touch`, a restored
/// mtime), renamed in or out, deleted, and the directory itself going away.
const MASK: u32 = libc::IN_CREATE
    | libc::IN_CLOSE_WRITE
    | libc::IN_ATTRIB
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

/// Why inotify cannot watch the directory; the source then polls.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(
        "cannot create an inotify instance: {source}{}",
        limit_hint(source, "max_user_instances")
    )]
    Init { source: io::Error },
    #[error(
        "cannot watch directory {}: {source}{}",
        dir.display(),
        limit_hint(source, "max_user_watches")
    )]
    Add { dir: PathBuf, source: io::Error },
}

/// The sysctl to raise when `e` is the kernel's inotify limit (`EMFILE`
/// from `inotify_init1`, `ENOSPC` from `inotify_add_watch`), with its
/// current value.
fn limit_hint(e: &io::Error, limit: &str) -> String {
    let hit = match limit {
        "max_user_instances" => e.raw_os_error() == Some(libc::EMFILE),
        _ => e.raw_os_error() == Some(libc::ENOSPC),
    };
    if !hit {
        return String::new();
    }
    let now = fs::read_to_string(format!("/proc/sys/fs/inotify/{limit}"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!(" (the limit fs.inotify.{limit}, now {now}, is reached: raise it with `sysctl -w fs.inotify.{limit}=N`)")
}

impl WatchError {
    /// Whether the watch set cannot be completed (a limit, or inotify
    /// missing), rather than a directory that vanished while it was being
    /// watched (its parent's events say so).
    pub fn is_fatal(&self) -> bool {
        match self {
            WatchError::Init { .. } => true,
            WatchError::Add { source, .. } => {
                !matches!(source.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP))
            }
        }
    }
}

/// What changed since the last [`DirWatch::take`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Manifest files to `stat` again (written, created, removed).
    pub files: HashSet<PathBuf>,
    /// Directories (or entries that may be directories) to list again,
    /// recursively; what the source had under them and no longer finds is
    /// removed.
    pub trees: HashSet<PathBuf>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.trees.is_empty()
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Changes {
    /// Events were lost or the directory's watch is gone: scan everything.
    Rescan,
    Paths(Dirty),
}

/// An inotify instance watching a directory tree.
pub struct DirWatch {
    fd: OwnedFd,
    root: PathBuf,
    /// Watch descriptor -> the directory paths it watches (one inode may
    /// be reached by several paths through symlinks).
    dirs: HashMap<i32, Vec<PathBuf>>,
    /// Path -> watch descriptor, to recognise a removed directory (or a
    /// symlink to one) by its name.
    by_path: HashMap<PathBuf, i32>,
    /// The next [`DirWatch::take`] says [`Changes::Rescan`].
    rescan: bool,
    /// The first fatal error adding a watch since the last
    /// [`DirWatch::take_failure`].
    failure: Option<WatchError>,
    buf: Vec<u8>,
    /// Tests: fail adding watches after this many more, as the kernel does
    /// when `max_user_watches` is reached.
    #[cfg(test)]
    pub(crate) fail_after: Option<usize>,
}

impl DirWatch {
    /// An inotify instance without watches yet: the first full scan adds
    /// them ([`DirWatch::take`] asks for it).
    pub fn new(root: &Path) -> Result<Self, WatchError> {
        // SAFETY: no pointers; the returned fd is checked and owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(WatchError::Init {
                source: io::Error::last_os_error(),
            });
        }
        Ok(DirWatch {
            // SAFETY: a fresh descriptor nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            root: root.to_path_buf(),
            dirs: HashMap::new(),
            by_path: HashMap::new(),
            rescan: true,
            failure: None,
            buf: vec![0; 64 * 1024],
            #[cfg(test)]
            fail_after: None,
        })
    }

    /// The inotify descriptor, to wait for events on (it is non-blocking).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Whether the next [`DirWatch::take`] asks for a full scan (also after
    /// a full scan that failed: nothing else would retry it).
    pub fn rescan_pending(&self) -> bool {
        self.rescan
    }

    /// Makes the next [`DirWatch::take`] ask for a full scan (a listing
    /// of the paths events named failed).
    pub fn force_rescan(&mut self) {
        self.rescan = true;
    }

    /// Starts a full scan: the events queued so far are covered by it and
    /// dropped, the watches it does not add again are removed at
    /// [`DirWatch::end_full`].
    pub fn begin_full(&mut self) -> HashMap<i32, Vec<PathBuf>> {
        let _ = self.drain();
        self.by_path.clear();
        std::mem::take(&mut self.dirs)
    }

    /// Ends a full scan that started with [`DirWatch::begin_full`].
    pub fn end_full(&mut self, before: HashMap<i32, Vec<PathBuf>>, complete: bool) {
        for wd in before.keys() {
            if !self.dirs.contains_key(wd) {
                // SAFETY: no pointers. An error means the watch is gone
                // already.
                unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), *wd) };
            }
        }
        // A scan that failed (the directory missing) is tried again.
        self.rescan = !complete;
    }

    /// Watches `dir` (called before listing it). A fatal failure is kept
    /// for [`DirWatch::take_failure`].
    pub fn watch(&mut self, dir: &Path) {
        if let Err(e) = self.add(dir) {
            if e.is_fatal() && self.failure.is_none() {
                self.failure = Some(e);
            }
        }
    }

    fn add(&mut self, dir: &Path) -> Result<(), WatchError> {
        let err = |source| WatchError::Add {
            dir: dir.to_path_buf(),
            source,
        };
        #[cfg(test)]
        if let Some(n) = self.fail_after.as_mut() {
            if *n == 0 {
                return Err(err(io::Error::from_raw_os_error(libc::ENOSPC)));
            }
            *n -= 1;
        }
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| err(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: `c` is a NUL-terminated string that outlives the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) };
        if wd < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        let paths = self.dirs.entry(wd).or_default();
        if !paths.iter().any(|p| p == dir) {
            paths.push(dir.to_path_buf());
        }
        self.by_path.insert(dir.to_path_buf(), wd);
        Ok(())
    }

    /// The fatal error met adding watches, if any: the watch set is
    /// incomplete and the source must poll instead.
    pub fn take_failure(&mut self) -> Option<WatchError> {
        self.failure.take()
    }

    /// Forgets the watches of `dir` and of the directories under it (it
    /// was removed or renamed; if renamed within the tree, listing its new
    /// path watches it again).
    fn forget_tree(&mut self, dir: &Path) {
        let gone: Vec<PathBuf> = self.by_path.keys().filter(|p| p.starts_with(dir)).cloned().collect();
        for path in gone {
            let wd = self.by_path.remove(&path).expect("just listed");
            let Some(paths) = self.dirs.get_mut(&wd) else {
                continue;
            };
            paths.retain(|p| *p != path);
            if paths.is_empty() {
                self.dirs.remove(&wd);
                // SAFETY: no pointers. An error means the watch is gone
                // already (the directory was deleted).
                unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
            }
        }
    }

    /// Reads the queued events: what changed since the last call.
    pub fn take(&mut self) -> Changes {
        let mut dirty = Dirty::default();
        if self.drain_into(&mut dirty).is_err() {
            self.rescan = true;
        }
        if self.rescan {
            Changes::Rescan
        } else {
            Changes::Paths(dirty)
        }
    }

    fn drain(&mut self) -> io::Result<()> {
        self.drain_into(&mut Dirty::default())
    }

    /// Reads events until none is left, adding what they name to `dirty`.
    fn drain_into(&mut self, dirty: &mut Dirty) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.buf);
        let result = loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => break Err(e),
                }
            }
            let mut at = 0;
            let header = std::mem::size_of::<libc::inotify_event>();
            while at + header <= n as usize {
                // SAFETY: the kernel wrote a whole event header at `at`
                // (checked against `n`); read unaligned from the byte
                // buffer.
                let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let name = &buf[at + header..at + header + ev.len as usize];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                self.event(ev.wd, ev.mask, OsStr::from_bytes(name), dirty);
                at += header + ev.len as usize;
            }
        };
        self.buf = buf;
        result
    }

    /// One event: what it says to look at again.
    fn event(&mut self, wd: i32, mask: u32, name: &OsStr, dirty: &mut Dirty) {
        if mask & libc::IN_Q_OVERFLOW != 0 {
            self.rescan = true;
            return;
        }
        let Some(paths) = self.dirs.get(&wd).cloned() else {
            return; // a watch removed meanwhile
        };
        let is_root = paths.contains(&self.root);
        if mask & libc::IN_IGNORED != 0 {
            // The watch is gone (its directory deleted, its filesystem
            // unmounted): the directory's own path is looked at again.
            for p in &paths {
                self.forget_tree(p);
            }
            self.dirs.remove(&wd);
            match is_root {
                true => self.rescan = true,
                false => dirty.trees.extend(paths),
            }
            return;
        }
        if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_UNMOUNT) != 0 {
            // A subdirectory's parent reports its removal by name; the
            // directory itself replaced is a full rescan (its path is
            // watched again, on the new inode).
            if is_root {
                self.rescan = true;
            }
            return;
        }
        if name.is_empty() {
            return;
        }
        let hidden = name.as_bytes().first() == Some(&b'.');
        for dir in &paths {
            let path = dir.join(name);
            if hidden {
                // Hidden entries are not manifests, but a symlink renamed
                // or created over one (a ConfigMap volume's `..data` swap)
                // may retarget the visible links of the directory.
                let swapped = mask & (libc::IN_MOVED_TO | libc::IN_CREATE) != 0
                    && mask & libc::IN_ISDIR == 0
                    && fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
                if swapped {
                    dirty.trees.insert(dir.clone());
                }
                continue;
            }
            if mask & libc::IN_ISDIR != 0 {
                if mask & (libc::IN_MOVED_FROM | libc::IN_DELETE) != 0 {
                    self.forget_tree(&path);
                }
                dirty.trees.insert(path);
                continue;
            }
            if mask & (libc::IN_MOVED_FROM | libc::IN_DELETE) != 0 && self.by_path.contains_key(&path) {
                // A symlink to a directory, removed.
                self.forget_tree(&path);
                dirty.trees.insert(path);
                continue;
            }
            if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                match fs::symlink_metadata(&path) {
                    // A symlink may lead to a directory.
                    Ok(m) if m.file_type().is_symlink() => {
                        dirty.trees.insert(path);
                        continue;
                    }
                    // A new regular file is read when its writer closes
                    // it, unless it is a new hard link to a complete one.
                    Ok(m) if mask & libc::IN_CREATE != 0 => {
                        use std::os::unix::fs::MetadataExt;
                        if m.nlink() < 2 {
                            continue;
                        }
                    }
                    _ => {}
                }
            }
            if super::files::is_manifest(&path) {
                dirty.files.insert(path);
            }
        }
    }
}
