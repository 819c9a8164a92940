//! Live migration of pinned maps to another size or layout, without a
//! moment where the datapath runs without its state.
//!
//! A new agent that finds pinned maps of another shape than it was built
//! for (other `--*-max-entries` flags, another map layout, or another map
//! type or map flags in its object: say conntrack no longer an LRU) does
//! not ask for `dataplane cleanup`. Instead:
//!
//! 1. [`prepare`] moves the pins of the maps that differ to `maps-old/`
//!    (the old programs keep using those maps: they hold them by fd);
//! 2. the loader creates and pins new maps of the new shape in their place;
//! 3. [`Migration::copy`] copies every entry from each old map into its new
//!    one, converted where the layout differs; the agent then adopts the
//!    new maps as it adopts unchanged ones and attaches its programs, which
//!    replaces the old programs through their pinned links, one atomic
//!    update per link;
//! 4. [`Migration::finish`] marks the swap done, copies again the flow
//!    state the old programs created since step 3 (entries the new programs
//!    wrote meanwhile win), and removes `maps-old/`.
//!
//! An agent killed in the middle finds `maps-old/` at its next start:
//! without the swap mark, the old maps are still the live ones and are put
//! back before migrating again; with it, only step 4 remains. Entries that
//! do not fit in a smaller map are counted and named in the log, never
//! dropped silently.

use std::{
    collections::HashSet,
    fs, io,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapType};
use dataplane_common::{map_names, map_shapes, CtKey, CtValue, ABI_VERSION};
use thiserror::Error;
use tracing::{info, warn};

use super::{
    map_sizes::MapSizes,
    pin::{PinError, PinRoot},
    sys::{self, BatchCursor, SysError},
};

/// Where the pins of the maps being migrated wait, under the pin root (no
/// dots: bpffs refuses them in names).
pub const OLD_DIR: &str = "maps-old";
/// Made (a directory: bpffs holds no plain files) once the programs use
/// the new maps.
pub const SWAPPED_MARK: &str = "migration-swapped";

const BPF_NOEXIST: u64 = 1;
/// Entries per batch call (a call must fit a whole hash bucket).
const BATCH: usize = 4096;
/// Lost entries named one by one in the log, per map.
const NAMED_LOST: usize = 8;

/// Maps whose entries the programs write (flow state): copied again after
/// the swap, without overwriting what the new programs wrote.
const FLOW_STATE: [&str; 4] = [
    map_names::CONNTRACK,
    map_names::AFFINITY,
    map_names::SOCK_NAT,
    map_names::SOCK_AFFINITY,
];

#[derive(Debug, Error)]
pub enum MigrateError {
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("migrating map {map}: {source}")]
    Sys {
        map: &'static str,
        #[source]
        source: SysError,
    },
    #[error("migrating map {map}: opening {path}: {source}")]
    Open {
        map: &'static str,
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("migrating map {map}: reading what it is: {source}")]
    Info {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "pinned map {map} at {path} has key/value sizes {found}, this agent (map layout {ABI_VERSION}) expects \
         {expected}, and it knows no conversion from the pinned layout {layout}; run the agent of that layout, or \
         `dataplane cleanup` (established connections through this node lose their conntrack entries)"
    )]
    Unsupported {
        map: &'static str,
        path: String,
        found: String,
        expected: String,
        layout: u32,
    },
    #[error(
        "pinned map {map} at {path} is of type {found}, this agent's object makes it {expected}, and the values \
         of one cannot be copied into the other (one value per CPU against one in all); run the agent that \
         pinned it, or `dataplane cleanup` (established connections through this node lose their conntrack \
         entries)"
    )]
    UnsupportedType {
        map: &'static str,
        path: String,
        found: String,
        expected: String,
    },
}

/// What the object an agent loads defines for each map, by name: the map
/// type and the map flags (`BPF_F_*`), as the kernel reports them for a
/// map it made from that definition.
pub type MapDefs = std::collections::BTreeMap<String, (u32, u32)>;

/// The map definitions of an eBPF object (see [`MapDefs`]).
pub fn object_map_defs(object: &[u8]) -> Result<MapDefs, String> {
    let obj = aya_obj::Object::parse(object).map_err(|e| format!("parsing the eBPF object: {e}"))?;
    Ok(obj
        .maps
        .iter()
        .map(|(name, m)| (name.clone(), (m.map_type(), m.map_flags())))
        .collect())
}

/// The kernel's name of a map type (`BPF_MAP_TYPE_*`, lower case), or its
/// number.
fn type_name(t: u32) -> String {
    let name = match t {
        1 => "hash",
        2 => "array",
        5 => "percpu_hash",
        6 => "percpu_array",
        9 => "lru_hash",
        10 => "lru_percpu_hash",
        11 => "lpm_trie",
        _ => return format!("type {t}"),
    };
    name.into()
}

/// Whether a map type holds one value per CPU.
fn per_cpu(t: u32) -> bool {
    // BPF_MAP_TYPE_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH,
    // _PERCPU_CGROUP_STORAGE.
    matches!(t, 5 | 6 | 10 | 21)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> MigrateError + '_ {
    move |source| MigrateError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn old_dir(pins: &PinRoot) -> PathBuf {
    pins.root.join(OLD_DIR)
}

/// Where the old map `name` waits while it is migrated.
pub fn old_map(pins: &PinRoot, name: &str) -> PathBuf {
    old_dir(pins).join(name)
}

fn mark(pins: &PinRoot) -> PathBuf {
    pins.root.join(SWAPPED_MARK)
}

/// One map being migrated, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapMove {
    pub map: &'static str,
    /// "262144 -> 1024 entries", ...
    pub why: String,
}

/// What copying one map did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub map: &'static str,
    /// Entries read from the old map.
    pub read: usize,
    /// Of those, entries now in the new map.
    pub kept: usize,
    /// Entries that did not fit (a smaller map), or, after the swap,
    /// already written by the new programs.
    pub lost: usize,
}

/// A migration under way (see the module documentation).
#[derive(Debug)]
pub struct Migration {
    pins: PinRoot,
    pub moves: Vec<MapMove>,
    /// The layout of the old maps (from their config entry; 0 if unknown).
    pub from_layout: u32,
    /// Resumed after the swap: only [`Migration::finish`] remains.
    pub swapped: bool,
    /// What [`Migration::copy`] did, map by map.
    pub copied: Vec<Copied>,
}

/// The layout version recorded in a pinned config map, 0 if unreadable.
fn pinned_layout(path: &Path) -> u32 {
    let Ok(map) = MapData::from_pin(path) else { return 0 };
    let mut value = vec![0u8; map.info().map(|i| i.value_size() as usize).unwrap_or(0)];
    if value.len() < 4 {
        return 0;
    }
    match sys::map_lookup_elem_raw(map.fd().as_fd(), &0u32.to_ne_bytes(), &mut value) {
        // `abi_version` is the first field of every layout's DpConfig.
        Ok(true) => u32::from_ne_bytes(value[..4].try_into().unwrap()),
        _ => 0,
    }
}

/// Recovers from an interrupted migration, then moves aside the pins of
/// the maps that differ from what this agent expects (with `sizes`).
/// Returns the migration to carry out, if any; after it the remaining pins
/// all match.
pub fn prepare(pins: &PinRoot, sizes: &MapSizes, defs: &MapDefs) -> Result<Option<Migration>, MigrateError> {
    let old = old_dir(pins);
    if !old.exists() && mark(pins).exists() {
        // A migration that ended between removing its old maps and its
        // mark: nothing is left to do but the mark.
        fs::remove_dir(mark(pins)).map_err(io_err(&mark(pins)))?;
    }
    if old.exists() {
        if mark(pins).exists() {
            let moves = fs::read_dir(&old)
                .map_err(io_err(&old))?
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    map_shapes::ALL.iter().find(|s| s.name == name).map(|s| MapMove {
                        map: s.name,
                        why: "resumed after the swap".into(),
                    })
                })
                .collect();
            info!("resuming a migration interrupted after its programs were swapped: finishing it");
            return Ok(Some(Migration {
                pins: pins.clone(),
                moves,
                from_layout: 0,
                swapped: true,
                copied: Vec::new(),
            }));
        }
        // The old maps are still the live ones: put them back.
        for entry in fs::read_dir(&old).map_err(io_err(&old))?.flatten() {
            let target = pins.map(&entry.file_name().to_string_lossy());
            if target.exists() {
                fs::remove_file(&target).map_err(io_err(&target))?;
            }
            fs::rename(entry.path(), &target).map_err(io_err(&target))?;
        }
        fs::remove_dir(&old).map_err(io_err(&old))?;
        warn!("an earlier migration was interrupted before its programs were swapped: its old maps are back in place");
    }

    let from_layout = pinned_layout(&pins.map(map_names::CONFIG));
    let mut moves = Vec::new();
    for shape in &map_shapes::ALL {
        let path = pins.map(shape.name);
        if !path.exists() {
            continue;
        }
        let map = MapData::from_pin(&path).map_err(|source| MigrateError::Open {
            map: shape.name,
            path: path.display().to_string(),
            source,
        })?;
        let info = map.info().map_err(|source| MigrateError::Open {
            map: shape.name,
            path: path.display().to_string(),
            source,
        })?;
        let max_entries = sizes.max_entries(shape.name).unwrap_or(shape.max_entries);
        if (info.key_size(), info.value_size()) != (shape.key_size, shape.value_size) {
            // Layout 2 is the only layout with releases so far; a layout
            // change adds its conversion here.
            return Err(MigrateError::Unsupported {
                map: shape.name,
                path: path.display().to_string(),
                found: format!("{}/{}", info.key_size(), info.value_size()),
                expected: format!("{}/{}", shape.key_size, shape.value_size),
                layout: from_layout,
            });
        }
        let mut why = Vec::new();
        if info.max_entries() != max_entries {
            why.push(format!("{} -> {} entries", info.max_entries(), max_entries));
        }
        // aya adopts a pinned map whatever its type and flags: a release
        // that changes them must move the map, or it would run on the old
        // one.
        if let Some(&(map_type, flags)) = defs.get(shape.name) {
            // A type this aya does not know cannot be the object's.
            let found = info.map_type().map_or(u32::MAX, |t| t as u32);
            if found != map_type {
                if per_cpu(found) != per_cpu(map_type) {
                    return Err(MigrateError::UnsupportedType {
                        map: shape.name,
                        path: path.display().to_string(),
                        found: type_name(found),
                        expected: type_name(map_type),
                    });
                }
                why.push(format!("{} -> {} map", type_name(found), type_name(map_type)));
            }
            if info.map_flags() != flags {
                why.push(format!("map flags {:#x} -> {:#x}", info.map_flags(), flags));
            }
        }
        if !why.is_empty() {
            moves.push(MapMove {
                map: shape.name,
                why: why.join(", "),
            });
        }
    }
    if moves.is_empty() {
        return Ok(None);
    }
    fs::create_dir_all(&old).map_err(io_err(&old))?;
    for m in &moves {
        let from = pins.map(m.map);
        let to = old.join(m.map);
        fs::rename(&from, &to).map_err(io_err(&to))?;
        info!(map = m.map, change = %m.why, "migrating the pinned map");
    }
    Ok(Some(Migration {
        pins: pins.clone(),
        moves,
        from_layout,
        swapped: false,
        copied: Vec::new(),
    }))
}

impl Migration {
    fn open(&self, map: &'static str, path: PathBuf) -> Result<MapData, MigrateError> {
        MapData::from_pin(&path).map_err(|source| MigrateError::Open {
            map,
            path: path.display().to_string(),
            source,
        })
    }

    /// Copies every entry of each old map into its new one (which the
    /// loader created): before the new programs run. The config is not
    /// copied: the agent writes its own.
    pub fn copy(&mut self) -> Result<(), MigrateError> {
        let mut out = Vec::new();
        for m in &self.moves {
            if m.map == map_names::CONFIG {
                continue;
            }
            let old = self.open(m.map, old_dir(&self.pins).join(m.map))?;
            let new = self.open(m.map, self.pins.map(m.map))?;
            let c = copy_map(m.map, &old, &new, 0)?;
            report(&c, "copied");
            out.push(c);
        }
        self.copied = out;
        Ok(())
    }

    /// Whether the new programs were loaded reading and writing the old
    /// conntrack map too (`dataplane_common::CT_MIGRATE_GLOBAL`): they
    /// should be loaded again without it once [`Migration::finish`] ran.
    pub fn dual_conntrack(&self) -> bool {
        !self.swapped && self.moves.iter().any(|m| m.map == map_names::CONNTRACK)
    }

    /// After the new programs replaced the old ones: copies the flow state
    /// the old programs created or refreshed since [`Migration::copy`]
    /// (conntrack entries by their last packet: the newer copy wins;
    /// other maps without overwriting what the new programs wrote), then
    /// removes the old maps.
    pub fn finish(self) -> Result<Vec<Copied>, MigrateError> {
        let marker = mark(&self.pins);
        fs::create_dir_all(&marker).map_err(io_err(&marker))?;
        let old = old_dir(&self.pins);
        let mut out = Vec::new();
        for m in self.moves.iter().filter(|m| FLOW_STATE.contains(&m.map)) {
            let path = old.join(m.map);
            if !path.exists() {
                continue;
            }
            let from = self.open(m.map, path)?;
            let to = self.open(m.map, self.pins.map(m.map))?;
            let c = if m.map == map_names::CONNTRACK {
                merge_conntrack(&from, &to)?
            } else {
                copy_map(m.map, &from, &to, BPF_NOEXIST)?
            };
            tracing::debug!(map = c.map, read = c.read, "flow state copied again after the swap");
            out.push(c);
        }
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
        fs::remove_dir(&marker).map_err(io_err(&marker))?;
        info!(maps = self.moves.len(), "migration finished: the old maps are removed");
        Ok(out)
    }
}

fn report(c: &Copied, what: &str) {
    if c.lost > 0 {
        warn!(
            map = c.map,
            read = c.read,
            kept = c.kept,
            lost = c.lost,
            "{what}: {} entries did not fit in the new map",
            c.lost
        );
    } else {
        info!(map = c.map, entries = c.kept, "{what}");
    }
}

/// The value size as the kernel reads and writes it from user space:
/// per-CPU maps take one 8-byte-aligned slot per possible CPU.
fn value_bytes(map_type: MapType, value_size: u32) -> Result<usize, SysError> {
    let percpu = matches!(
        map_type,
        MapType::PerCpuHash | MapType::PerCpuArray | MapType::LruPerCpuHash
    );
    if !percpu {
        return Ok(value_size as usize);
    }
    let cpus = aya::util::nr_cpus().map_err(|(path, source)| SysError {
        cmd: sys::Cmd::MapLookupBatch,
        context: format!("reading {path}"),
        source,
    })?;
    Ok((value_size as usize).div_ceil(8) * 8 * cpus)
}

/// A map entry as bytes: (key, value).
type Entry = (Vec<u8>, Vec<u8>);

/// Every (key, value) of `map`, as bytes.
fn read_all(fd: BorrowedFd<'_>, map_type: MapType, key_size: usize, value_size: usize) -> Result<Vec<Entry>, SysError> {
    let mut out = Vec::new();
    if map_type == MapType::LpmTrie {
        // No batch operations on LPM tries: key by key.
        let mut key: Option<Vec<u8>> = None;
        let mut next = vec![0u8; key_size];
        while sys::map_get_next_key_raw(fd, key.as_deref(), &mut next)? {
            let mut value = vec![0u8; value_size];
            if sys::map_lookup_elem_raw(fd, &next, &mut value)? {
                out.push((next.clone(), value));
            }
            key = Some(next.clone());
        }
        return Ok(out);
    }
    let mut keys = vec![0u8; key_size * BATCH];
    let mut values = vec![0u8; value_size * BATCH];
    let mut cursor = BatchCursor::default();
    loop {
        let (n, end) = sys::map_lookup_batch_raw(fd, &mut cursor, &mut keys, &mut values, BATCH)?;
        for i in 0..n {
            out.push((
                keys[i * key_size..(i + 1) * key_size].to_vec(),
                values[i * value_size..(i + 1) * value_size].to_vec(),
            ));
        }
        if end {
            return Ok(out);
        }
    }
}

/// Copies `from` into `to` (same key and value sizes) with `flags`
/// (`BPF_NOEXIST`: keep what `to` has). Array slots past the new size are
/// counted as lost when they hold anything.
fn copy_map(name: &'static str, from: &MapData, to: &MapData, flags: u64) -> Result<Copied, MigrateError> {
    let sys_err = |source| MigrateError::Sys { map: name, source };
    let open_err = |source| MigrateError::Info { map: name, source };
    let info = from.info().map_err(open_err)?;
    let new_info = to.info().map_err(open_err)?;
    let map_type = info.map_type().map_err(open_err)?;
    let key_size = info.key_size() as usize;
    let value_size = value_bytes(map_type, info.value_size()).map_err(sys_err)?;
    let entries = read_all(from.fd().as_fd(), map_type, key_size, value_size).map_err(sys_err)?;
    let is_array = matches!(map_type, MapType::Array | MapType::PerCpuArray);
    let mut c = Copied {
        map: name,
        read: entries.len(),
        ..Default::default()
    };
    // Keys that did not go in, and the first few of them for the log.
    let mut refused: HashSet<Vec<u8>> = HashSet::new();
    let mut named: Vec<Vec<u8>> = Vec::new();
    let mut lose = |k: &Vec<u8>, c: &mut Copied| {
        c.lost += 1;
        if named.len() < NAMED_LOST {
            named.push(k.clone());
        }
    };
    let fd = to.fd().as_fd();
    for (k, v) in &entries {
        if is_array && u32::from_ne_bytes(k[..4].try_into().unwrap()) >= new_info.max_entries() {
            if v.iter().any(|b| *b != 0) {
                lose(k, &mut c);
            } else {
                c.read -= 1;
            }
            continue;
        }
        match sys::map_update_elem_raw(fd, k, v, flags) {
            Ok(()) => {}
            // After the swap: the new programs already wrote this entry,
            // and theirs is the newer one.
            Err(e) if flags == BPF_NOEXIST && e.errno() == Some(libc::EEXIST) => c.lost += 1,
            // A full (non-LRU) map.
            Err(e) if e.errno() == Some(libc::E2BIG) || e.errno() == Some(libc::ENOMEM) => {
                refused.insert(k.clone());
                lose(k, &mut c);
            }
            Err(e) => return Err(sys_err(e)),
        }
    }
    // An LRU map that is too small evicts instead of refusing: count what
    // is really there.
    if !is_array && flags == 0 {
        let present: HashSet<Vec<u8>> = read_all(fd, map_type, key_size, value_size)
            .map_err(sys_err)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for (k, _) in &entries {
            if !present.contains(k) && !refused.contains(k) {
                lose(k, &mut c);
            }
        }
    }
    c.kept = c.read - c.lost;
    for k in &named {
        warn!(map = name, key = %hex(k), "entry not kept by the migration (the new map is smaller)");
    }
    Ok(c)
}

/// Copies the old conntrack entries the new map lacks, and those the old
/// programs saw a packet for more recently than the new map's copy (a
/// flag such as seen-reply or closing set by an old program after the
/// first copy).
fn merge_conntrack(from: &MapData, to: &MapData) -> Result<Copied, MigrateError> {
    let name = map_names::CONNTRACK;
    let sys_err = |source| MigrateError::Sys { map: name, source };
    let (k, v) = (size_of::<CtKey>(), size_of::<CtValue>());
    let entries = read_all(from.fd().as_fd(), MapType::LruHash, k, v).map_err(sys_err)?;
    let fd = to.fd().as_fd();
    let mut c = Copied {
        map: name,
        read: entries.len(),
        ..Default::default()
    };
    let mut current = vec![0u8; v];
    for (key, value) in &entries {
        let old: CtValue = bytemuck::pod_read_unaligned(value);
        let newer = match sys::map_lookup_elem_raw(fd, key, &mut current).map_err(sys_err)? {
            false => true,
            true => old.last_seen_ns > bytemuck::pod_read_unaligned::<CtValue>(&current).last_seen_ns,
        };
        if newer {
            sys::map_update_elem_raw(fd, key, value, 0).map_err(sys_err)?;
            c.kept += 1;
        }
    }
    Ok(c)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
