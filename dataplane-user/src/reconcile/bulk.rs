//! New frontends written together: a cold start's first sync adds every
//! frontend of the cluster (200,000 at 100,000 Services), and writing
//! them one by one costs four `bpf()` calls each (name, backend slots,
//! Maglev table, service entry). Here a batch of new frontends takes four
//! calls in all: every name, every backend slot and every Maglev chunk,
//! then every service entry. Each frontend's slots are still in the maps
//! before its service entry, so the datapath never sees one half written.
//!
//! On a cold start (nothing programmed yet) the batches go to a thread per
//! CPU (at most [`MAX_BULK_THREADS`]): each computes its batch's Maglev
//! tables and, when the writer has a [`NewFrontendWriter`] (the real
//! maps), writes the batch itself, slots first, then service entries. The
//! kernel's hash maps take inserts from several CPUs at once. The sync's
//! own thread hands out the batches (ids and epochs in order) and, as
//! batches come back written, records them and fills the frontend cache
//! (which only ever says what the service map says: after the entries).
//! At 100,000 Services, the tables and the kernel's inserts are most of
//! the first sync; spread over the node's CPUs they no longer wait for
//! each other.
//!
//! Only frontends that need nothing else are written this way: ids never
//! used in maps this process created (no counters to reset), no source
//! ranges. When a batched write fails, everything the batch wrote is
//! deleted again and its frontends go through the one-by-one path, which
//! reports each failure against its frontend.

use std::sync::{mpsc, Mutex};

use super::*;

/// Threads a cold start's batches are spread over, at most: the kernel's
/// inserts stop scaling before the CPUs of a large node run out.
pub const MAX_BULK_THREADS: usize = 4;

/// One new frontend of a batch, as it will be programmed.
struct New<'a> {
    key: &'a ServiceKey,
    fe: &'a Arc<Frontend>,
    value: ServiceValue,
}

/// What one batch of new frontends writes: names, backend slots and
/// Maglev chunks, then (`keys`, `values`) the service entries.
#[derive(Debug, Default)]
pub struct NewSlots {
    pub names: Vec<(u32, String)>,
    pub backend_keys: Vec<BackendKey>,
    pub backends: Vec<Backend>,
    pub chunk_keys: Vec<MaglevKey>,
    pub chunks: Vec<MaglevChunk>,
    pub keys: Vec<ServiceKey>,
    pub values: Vec<ServiceValue>,
}

/// Writes batches of new frontends from other threads while the sync's
/// own thread goes on (see the module doc).
pub trait NewFrontendWriter: Send + Sync {
    /// Writes the names, backend slots and Maglev chunks of `slots`, then
    /// its service entries: each frontend complete before its entry
    /// exists. Not the frontend cache ([`MapWriter::cache_services`]).
    /// On an error, any part may be written.
    fn put_new(&self, slots: &NewSlots) -> Result<(), WriteError>;
}

/// A batch back from a worker: written (`Ok(None)`), to be written by the
/// sync's thread (`Ok(Some)`: the writer has no [`NewFrontendWriter`]), or
/// failed.
type Done<'a> = (Vec<New<'a>>, Result<Option<NewSlots>, WriteError>);

/// What `batch` writes, its Maglev tables computed here unless in `tables`.
fn slots_of(batch: &[New<'_>], tables: &mut BTreeMap<ServiceKey, Vec<u16>>) -> NewSlots {
    // Sized once: grown by doubling, the chunks (512 bytes each, 1,024 in
    // a batch of 4-endpoint frontends) were copied over and over.
    let backends: usize = batch.iter().map(|n| n.fe.backends.len()).sum();
    let chunks: usize = batch.iter().map(|n| maglev_chunks(n.value.maglev_size)).sum();
    let mut s = NewSlots {
        names: Vec::with_capacity(batch.len()),
        backend_keys: Vec::with_capacity(backends),
        backends: Vec::with_capacity(backends),
        chunk_keys: Vec::with_capacity(chunks),
        chunks: Vec::with_capacity(chunks),
        keys: Vec::with_capacity(batch.len()),
        values: Vec::with_capacity(batch.len()),
    };
    for n in batch {
        let id = n.value.service_id;
        s.names.push((id, n.fe.display_name()));
        s.backend_keys
            .extend((0..n.fe.backends.len()).map(|i| BackendKey::new(id, 0, i as u32)));
        s.backends.extend_from_slice(&n.fe.backends);
        push_table(
            n.fe,
            n.value.maglev_size,
            id,
            0,
            tables.remove(n.key),
            &mut s.chunk_keys,
            &mut s.chunks,
        );
        s.keys.push(*n.key);
        s.values.push(n.value);
    }
    s
}

/// How many threads a cold start's batches go to here: one per CPU, two
/// at least (one computes tables while the other waits for the kernel).
fn bulk_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(2, MAX_BULK_THREADS)
}

impl<W: MapWriter> Syncer<W> {
    /// Whether new frontends may be written in bulk: ids never used in
    /// maps this process created.
    pub(super) fn bulk_ok(&self) -> bool {
        self.fresh_maps && self.free_ids.is_empty()
    }

    /// Takes up to [`TABLE_BATCH`] entries and returns those that are new
    /// and simple enough (module doc), with their ids and service values;
    /// the others go to `rest`.
    fn next_batch<'a>(
        &mut self,
        entries: &mut dyn Iterator<Item = (&'a ServiceKey, &'a Arc<Frontend>)>,
        rest: &mut Vec<(&'a ServiceKey, &'a Arc<Frontend>)>,
    ) -> Vec<New<'a>> {
        let mut new = Vec::new();
        for (key, fe) in entries.take(TABLE_BATCH) {
            // (A failed batch freed its ids: from then on one by one.)
            if !self.bulk_ok() || self.programmed.contains_key(key) || !fe.source_ranges.is_empty() {
                rest.push((key, fe));
                continue;
            }
            // A full map: the one-by-one path reports it.
            let Some(id) = self.alloc_id() else {
                rest.push((key, fe));
                continue;
            };
            let (flags, maglev_size) = selection_of(&self.config, fe);
            let flags = flags | (fe.flags & FRONTEND_FLAGS);
            let (flags, affinity_timeout_s) = match fe.affinity_timeout_s {
                Some(t) => (flags | SVC_F_AFFINITY, t),
                None => (flags, 0),
            };
            let value = ServiceValue {
                service_id: id,
                backend_count: fe.backends.len() as u16,
                generation: 0,
                flags,
                maglev_size,
                affinity_timeout_s,
                epoch: self.next_epoch(),
            };
            new.push(New { key, fe, value });
        }
        new
    }

    /// Writes the frontends of `entries` that are new and simple enough
    /// (see the module doc) in batched writes, and returns the others, in
    /// key order, which the caller writes one by one. With `parallel`
    /// (a cold start), the batches go to a thread per CPU; else they are
    /// written here, with the Maglev tables `precompute_tables` left in
    /// `self.tables`.
    pub(super) fn add_new_in_bulk<'a>(
        &mut self,
        entries: impl Iterator<Item = (&'a ServiceKey, &'a Arc<Frontend>)>,
        parallel: bool,
        report: &mut SyncReport,
    ) -> Vec<(&'a ServiceKey, &'a Arc<Frontend>)> {
        let mut rest = Vec::new();
        if !self.bulk_ok() {
            rest.extend(entries);
            return rest;
        }
        let mut entries = entries.peekable();
        let first = self.next_batch(&mut entries, &mut rest);
        if !parallel || entries.peek().is_none() {
            // One batch at a time, on this thread.
            let mut batch = first;
            loop {
                if !batch.is_empty() {
                    let mut tables = std::mem::take(&mut self.tables);
                    let slots = slots_of(&batch, &mut tables);
                    self.tables = tables;
                    self.finish_batch((batch, Ok(Some(slots))), &mut rest, report);
                }
                if entries.peek().is_none() {
                    break;
                }
                batch = self.next_batch(&mut entries, &mut rest);
            }
        } else {
            self.bulk_in_parallel(first, &mut entries, bulk_threads(), &mut rest, report);
        }
        // Failed batches came back in any order.
        rest.sort_by_key(|(k, _)| **k);
        self.free_ids.sort_unstable_by(|a, b| b.cmp(a));
        rest
    }

    /// The batches of `first` and `entries` on `threads` threads (see the
    /// module doc).
    fn bulk_in_parallel<'a>(
        &mut self,
        first: Vec<New<'a>>,
        entries: &mut std::iter::Peekable<impl Iterator<Item = (&'a ServiceKey, &'a Arc<Frontend>)>>,
        threads: usize,
        rest: &mut Vec<(&'a ServiceKey, &'a Arc<Frontend>)>,
        report: &mut SyncReport,
    ) {
        let direct = self.writer.new_frontend_writer();
        let direct = direct.as_deref();
        // A few batches ahead of the workers, no more: bounded memory.
        let (to_workers, inbox) = mpsc::sync_channel::<Vec<New<'a>>>(threads);
        let (done, results) = mpsc::channel::<Done<'a>>();
        let inbox = Mutex::new(inbox);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let (inbox, done) = (&inbox, done.clone());
                scope.spawn(move || loop {
                    let next = inbox.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(batch) = next else { return };
                    let slots = slots_of(&batch, &mut BTreeMap::new());
                    let written = match direct {
                        Some(w) => w.put_new(&slots).map(|()| None),
                        None => Ok(Some(slots)),
                    };
                    if done.send((batch, written)).is_err() {
                        return;
                    }
                });
            }
            drop(done);
            let mut batch = first;
            loop {
                if !batch.is_empty() && to_workers.send(batch).is_err() {
                    break; // the workers are gone (a panic, raised below)
                }
                while let Ok(d) = results.try_recv() {
                    self.finish_batch(d, rest, report);
                }
                if entries.peek().is_none() {
                    break;
                }
                batch = self.next_batch(entries, rest);
            }
            drop(to_workers);
            for d in results {
                self.finish_batch(d, rest, report);
            }
        });
    }

    /// Completes a batch: writes it when still to be written, caches its
    /// frontends and records them as programmed, or, when a write failed,
    /// deletes what it wrote and leaves its frontends to the one-by-one
    /// path.
    fn finish_batch<'a>(
        &mut self,
        (new, written): Done<'a>,
        rest: &mut Vec<(&'a ServiceKey, &'a Arc<Frontend>)>,
        report: &mut SyncReport,
    ) {
        let written = match written {
            Ok(Some(s)) => self
                .writer
                .put_new_slots(&s.names, &s.backend_keys, &s.backends, &s.chunk_keys, &s.chunks)
                .and_then(|()| self.writer.put_services(&s.keys, &s.values)),
            Ok(None) => {
                let keys: Vec<ServiceKey> = new.iter().map(|n| *n.key).collect();
                let values: Vec<ServiceValue> = new.iter().map(|n| n.value).collect();
                self.writer.cache_services(&keys, &values)
            }
            Err(e) => Err(e),
        };
        if written.is_err() {
            // Whatever part was written goes again (missing entries are
            // fine), and the ids are free for the one-by-one path, which
            // resets their counters as it does for any reused id.
            for n in new.iter().rev() {
                let _ = self.writer.delete_service(*n.key);
                let id = n.value.service_id;
                self.delete_generation(id, 0, n.fe.backends.len(), n.value.maglev_size);
                let _ = self.writer.delete_name(id);
                self.free_ids.push(id);
            }
            // (Ids are taken from the end of the free list: the lowest
            // comes first again.)
            rest.extend(new.iter().map(|n| (n.key, n.fe)));
            return;
        }
        for n in new {
            self.markers_changed |= is_other_ports(n.key);
            self.set_programmed(
                *n.key,
                Programmed {
                    service_id: n.value.service_id,
                    generation: 0,
                    maglev_size: n.value.maglev_size,
                    frontend: n.fe.clone(),
                },
            );
            report.added += 1;
        }
    }
}
