//! Every map of a loaded datapath object, read and restored byte for byte:
//! what lets the program tests reuse a verified object (the pool in
//! [`crate::prog`]) instead of loading it again for each test.
//!
//! The maps are found by id: those the kernel lists as used by the loaded
//! programs (`bpf_prog_info.map_ids`), and those the test holds handles on
//! (the agent's [`Maps`], which include maps only user space reads). They
//! are handled by the kernel's map type, with no knowledge of what they
//! hold:
//! - hash maps, LRU hash maps and LPM tries: every entry that was not
//!   there right after the load is deleted, the others rewritten where
//!   they changed;
//! - arrays and per-CPU arrays (the programs' `.rodata` too): read in
//!   batches (`BPF_MAP_LOOKUP_BATCH`) and compared with their content right
//!   after the load; only the entries that differ are written back, so a
//!   frontend cache or a per-CPU statistics array of megabytes costs a read,
//!   not a rewrite;
//! - ring buffers: drained.
//!
//! Any other map type fails loudly: whoever adds one decides how it is
//! restored.

use std::{
    collections::BTreeMap,
    collections::HashSet,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use anyhow::{bail, Context, Result};
use aya::maps::{IterableMap, Map, MapData, MapType, RingBuf};
use dataplane::bpf::{loader::Maps, sys};

const BPF_ANY: u64 = 0;

/// One map of the object: a handle of its own (opened by id) and its kernel
/// description.
pub struct TrackedMap {
    pub id: u32,
    /// The kernel's name (cut at 15 bytes).
    pub name: String,
    pub kind: MapType,
    pub key_size: usize,
    /// Bytes of one entry's value as the kernel reads and writes it in
    /// user space: per-CPU maps give one 8-byte-aligned value per
    /// possible CPU.
    pub value_size: usize,
    pub max_entries: u32,
    fd: OwnedFd,
}

/// The content of one map, comparable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Hash maps and tries: key bytes -> value bytes.
    Entries(BTreeMap<Vec<u8>, Vec<u8>>),
    /// Arrays: every entry's value bytes, in index order.
    Array(Vec<u8>),
    /// Ring buffers: the records not consumed yet.
    Ring(Vec<Vec<u8>>),
}

impl TrackedMap {
    fn open(id: u32) -> Result<TrackedMap> {
        let data = MapData::from_id(id).with_context(|| format!("opening map id {id}"))?;
        let info = data.info().with_context(|| format!("info of map id {id}"))?;
        let kind = info.map_type().with_context(|| format!("type of map id {id}"))?;
        let name = String::from_utf8_lossy(info.name()).into_owned();
        let per_cpu = matches!(
            kind,
            MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash
        );
        let value_size = if per_cpu {
            (info.value_size() as usize).div_ceil(8) * 8 * aya::util::nr_cpus().map_err(|(_, e)| e)?
        } else {
            info.value_size() as usize
        };
        let fd = data.fd().as_fd().try_clone_to_owned()?;
        Ok(TrackedMap {
            id,
            name,
            kind,
            key_size: info.key_size() as usize,
            value_size,
            max_entries: info.max_entries(),
            fd,
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The map's whole content.
    pub fn read(&self) -> Result<Content> {
        match self.kind {
            MapType::Hash | MapType::LruHash | MapType::PerCpuHash | MapType::LruPerCpuHash | MapType::LpmTrie => {
                let mut out = BTreeMap::new();
                for key in self.keys()? {
                    let mut value = vec![0u8; self.value_size];
                    // Gone meanwhile (LRU eviction): not part of the content.
                    if sys::map_lookup_elem_raw(self.fd(), &key, &mut value)? {
                        out.insert(key, value);
                    }
                }
                Ok(Content::Entries(out))
            }
            MapType::Array | MapType::PerCpuArray => {
                let mut out = vec![0u8; self.max_entries as usize * self.value_size];
                self.each_array_chunk(|first, values| {
                    let at = first as usize * self.value_size;
                    out[at..at + values.len()].copy_from_slice(values);
                    Ok(())
                })?;
                Ok(Content::Array(out))
            }
            MapType::RingBuf => {
                let mut ring = self.ring()?;
                let mut out = Vec::new();
                while let Some(item) = ring.next() {
                    out.push(item.to_vec());
                }
                Ok(Content::Ring(out))
            }
            other => bail!("map {}: type {other:?} has no restore rule", self.name),
        }
    }

    /// Brings the map back to `saved` (an earlier [`TrackedMap::read`] of
    /// it), writing only what differs. Returns how many entries changed.
    pub fn restore(&self, saved: &Content) -> Result<usize> {
        let mut changed = 0;
        match saved {
            Content::Entries(saved) => {
                for key in self.keys()? {
                    match saved.get(&key) {
                        None => {
                            sys::map_delete_elem_raw(self.fd(), &key)?;
                            changed += 1;
                        }
                        Some(want) => {
                            let mut value = vec![0u8; self.value_size];
                            let found = sys::map_lookup_elem_raw(self.fd(), &key, &mut value)?;
                            if !found || &value != want {
                                sys::map_update_elem_raw(self.fd(), &key, want, BPF_ANY)?;
                                changed += 1;
                            }
                        }
                    }
                }
                // Entries deleted since (by the test or by eviction).
                for (key, want) in saved {
                    let mut value = vec![0u8; self.value_size];
                    if !sys::map_lookup_elem_raw(self.fd(), key, &mut value)? {
                        sys::map_update_elem_raw(self.fd(), key, want, BPF_ANY)?;
                        changed += 1;
                    }
                }
            }
            Content::Array(saved) => {
                let vs = self.value_size;
                let mut dirty = Vec::new();
                self.each_array_chunk(|first, values| {
                    let at = first as usize * vs;
                    let want = &saved[at..at + values.len()];
                    if values != want {
                        for (i, (now, was)) in values.chunks(vs).zip(want.chunks(vs)).enumerate() {
                            if now != was {
                                dirty.push(first + i as u32);
                            }
                        }
                    }
                    Ok(())
                })?;
                for idx in dirty {
                    let at = idx as usize * vs;
                    sys::map_update_elem_raw(self.fd(), &idx.to_ne_bytes(), &saved[at..at + vs], BPF_ANY)
                        .with_context(|| format!("map {} entry {idx}", self.name))?;
                    changed += 1;
                }
            }
            Content::Ring(saved) => {
                if !saved.is_empty() {
                    bail!("map {}: a ring buffer is restored to empty only", self.name);
                }
                let mut ring = self.ring()?;
                while ring.next().is_some() {
                    changed += 1;
                }
            }
        }
        Ok(changed)
    }

    /// Writes one entry of made-up bytes (0x5a) into the map: key 0 of an
    /// array, a new key of a hash map or trie (prefix length 8 for a
    /// trie). For tests that must see every map changed.
    pub fn write_marker(&self) -> Result<()> {
        let value = vec![0x5au8; self.value_size];
        let key = match self.kind {
            MapType::Array | MapType::PerCpuArray => vec![0u8; self.key_size],
            MapType::LpmTrie => {
                let mut k = vec![0x5au8; self.key_size];
                k[..4].copy_from_slice(&8u32.to_ne_bytes());
                k
            }
            _ => vec![0x5au8; self.key_size],
        };
        sys::map_update_elem_raw(self.fd(), &key, &value, BPF_ANY)
            .with_context(|| format!("writing into {}", self.name))
    }

    /// Every key, read with `BPF_MAP_GET_NEXT_KEY` (any hash-like map type,
    /// LPM tries included), before anything is deleted.
    fn keys(&self) -> Result<Vec<Vec<u8>>> {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut seen = HashSet::new();
        let mut next = vec![0u8; self.key_size];
        loop {
            let more = sys::map_get_next_key_raw(self.fd(), keys.last().map(Vec::as_slice), &mut next)?;
            // A walk that starts over (its key evicted meanwhile: nothing
            // runs the programs during a reset, but be safe) ends at the
            // first repeat.
            if !more || !seen.insert(next.clone()) {
                return Ok(keys);
            }
            keys.push(next.clone());
        }
    }

    /// Calls `f(first index, values of consecutive entries)` over the whole
    /// array: `BPF_MAP_LOOKUP_BATCH` where the kernel has it for the map
    /// type, one lookup per entry otherwise.
    fn each_array_chunk(&self, mut f: impl FnMut(u32, &[u8]) -> Result<()>) -> Result<()> {
        let per_call = ((1 << 20) / self.value_size.max(1)).clamp(1, 4096);
        let mut keys = vec![0u8; per_call * 4];
        let mut values = vec![0u8; per_call * self.value_size];
        let mut cursor = sys::BatchCursor::default();
        let mut next = 0u32;
        while next < self.max_entries {
            let want = per_call.min((self.max_entries - next) as usize);
            match sys::map_lookup_batch_raw(
                self.fd(),
                &mut cursor,
                &mut keys[..want * 4],
                &mut values[..want * self.value_size],
                want,
            ) {
                Ok((read, end)) => {
                    f(next, &values[..read * self.value_size])?;
                    next += read as u32;
                    if end || read == 0 {
                        break;
                    }
                }
                // 5.10 has no batch lookup on per-CPU arrays.
                Err(e) if next == 0 && matches!(e.errno(), Some(524 | libc::EINVAL)) => {
                    let mut value = vec![0u8; self.value_size];
                    for idx in 0..self.max_entries {
                        sys::map_lookup_elem_raw(self.fd(), &idx.to_ne_bytes(), &mut value)?;
                        f(idx, &value)?;
                    }
                    return Ok(());
                }
                Err(e) => return Err(e).with_context(|| format!("reading map {}", self.name)),
            }
        }
        if next != self.max_entries {
            bail!("map {}: read {next} of {} entries", self.name, self.max_entries);
        }
        Ok(())
    }

    fn ring(&self) -> Result<RingBuf<MapData>> {
        let fd = self.fd.try_clone()?;
        let data = MapData::from_fd(fd).with_context(|| format!("ring buffer {}", self.name))?;
        Ok(RingBuf::try_from(Map::RingBuf(data))?)
    }
}

/// The ids of the maps the loaded program behind `prog_fd` uses
/// (`bpf_prog_info.map_ids`).
pub fn program_map_ids(prog_fd: BorrowedFd<'_>) -> Result<Vec<u32>> {
    // struct bpf_prog_info, as u64 words: nr_map_ids is the high half of
    // word 6 (byte 52), map_ids the pointer in word 7 (byte 56).
    let mut info = [0u64; 32];
    sys::obj_get_info_by_fd(prog_fd, &mut info)?;
    let n = (info[6] >> 32) as usize;
    let mut ids = vec![0u32; n];
    let mut info = [0u64; 32];
    info[6] = (n as u64) << 32;
    info[7] = ids.as_mut_ptr() as u64;
    sys::obj_get_info_by_fd(prog_fd, &mut info)?;
    Ok(ids)
}

/// The ids of the maps behind the agent's handles.
pub fn handle_ids(maps: &Maps) -> Result<Vec<u32>> {
    let data: [&MapData; 20] = [
        IterableMap::map(&maps.services),
        IterableMap::map(&maps.backends),
        IterableMap::map(&maps.conntrack),
        IterableMap::map(&maps.maglev),
        IterableMap::map(&maps.affinity),
        IterableMap::map(&maps.config),
        IterableMap::map(&maps.source_ranges),
        IterableMap::map(&maps.names),
        IterableMap::map(&maps.service_stats),
        IterableMap::map(&maps.reasons),
        IterableMap::map(&maps.sock_nat),
        IterableMap::map(&maps.sock_affinity),
        IterableMap::map(&maps.sock_stats),
        IterableMap::map(&maps.ct_events),
        IterableMap::map(&maps.route_events),
        IterableMap::map(&maps.vip_filter),
        IterableMap::map(&maps.backend_filter),
        IterableMap::map(&maps.endpoints),
        IterableMap::map(&maps.frontend_cache),
        IterableMap::map(&maps.frontend_filter),
    ];
    data.iter().map(|d| Ok(d.info()?.id())).collect()
}

/// Every map of an object, by name, with its content right after the load.
pub struct ObjectMaps {
    pub maps: Vec<TrackedMap>,
}

impl ObjectMaps {
    /// The maps of the programs `prog_fds` and of the handles `ids`,
    /// each once.
    pub fn open(prog_fds: &[BorrowedFd<'_>], ids: &[u32]) -> Result<ObjectMaps> {
        let mut all: Vec<u32> = ids.to_vec();
        for fd in prog_fds {
            all.extend(program_map_ids(*fd)?);
        }
        all.sort_unstable();
        all.dedup();
        let mut maps = all.into_iter().map(TrackedMap::open).collect::<Result<Vec<_>>>()?;
        maps.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(ObjectMaps { maps })
    }

    /// Every map's content, by name.
    pub fn read(&self) -> Result<BTreeMap<String, Content>> {
        self.maps.iter().map(|m| Ok((m.name.clone(), m.read()?))).collect()
    }
}
