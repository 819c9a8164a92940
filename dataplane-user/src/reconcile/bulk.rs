//! New frontends written together: a cold start's first sync adds every
//! frontend of the cluster (200,000 at 100,000 Services), and writing
//! them one by one costs four `bpf()` calls each (name, backend slots,
//! Maglev table, service entry). Here a batch of new frontends takes four
//! calls in all: every name, every backend slot and every Maglev chunk
//! (the chunks on a second thread: the kernel's hash maps take inserts
//! from several CPUs at once), then every service entry. Each frontend's slots are still in the
//! maps before its service entry, so the datapath never sees one half
//! written.
//!
//! Only frontends that need nothing else are written this way: ids never
//! used in maps this process created (no counters to reset), no source
//! ranges. When a batched write fails, everything the batch wrote is
//! deleted again and its frontends go through the one-by-one path, which
//! reports each failure against its frontend.

use super::*;

/// One new frontend of a batch, as it will be programmed.
struct New<'a> {
    key: &'a ServiceKey,
    fe: &'a Arc<Frontend>,
    value: ServiceValue,
}

impl<W: MapWriter> Syncer<W> {
    /// Writes the frontends of `batch` that are new and simple enough (see
    /// the module doc) in four batched writes, and returns the others,
    /// which the caller writes one by one.
    pub(super) fn add_new_in_bulk<'a>(
        &mut self,
        batch: &[(&'a ServiceKey, &'a Arc<Frontend>)],
        report: &mut SyncReport,
    ) -> Vec<(&'a ServiceKey, &'a Arc<Frontend>)> {
        if !self.fresh_maps || !self.free_ids.is_empty() {
            return batch.to_vec();
        }
        let mut rest = Vec::new();
        let mut new: Vec<New<'a>> = Vec::new();
        let mut backend_keys = Vec::new();
        let mut backends = Vec::new();
        let mut chunk_keys = Vec::new();
        let mut chunks = Vec::new();
        let mut names = Vec::new();
        for &(key, fe) in batch {
            if self.programmed.contains_key(key) || !fe.source_ranges.is_empty() {
                rest.push((key, fe));
                continue;
            }
            // A full map: the one-by-one path reports it.
            let Some(id) = self.alloc_id() else {
                rest.push((key, fe));
                continue;
            };
            backend_keys.extend((0..fe.backends.len()).map(|i| BackendKey::new(id, 0, i as u32)));
            backends.extend_from_slice(&fe.backends);
            let (flags, maglev_size) = self.selection(key, id, 0, fe, &mut chunk_keys, &mut chunks);
            let flags = flags | (fe.flags & FRONTEND_FLAGS);
            let (flags, affinity_timeout_s) = match fe.affinity_timeout_s {
                Some(t) => (flags | SVC_F_AFFINITY, t),
                None => (flags, 0),
            };
            names.push((id, fe.display_name()));
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
        if new.is_empty() {
            return rest;
        }
        let keys: Vec<ServiceKey> = new.iter().map(|n| *n.key).collect();
        let values: Vec<ServiceValue> = new.iter().map(|n| n.value).collect();
        // Names, slots and tables first; the service entries, which make
        // them reachable, last.
        let written = self
            .writer
            .put_new_slots(&names, &backend_keys, &backends, &chunk_keys, &chunks)
            .and_then(|()| self.writer.put_services(&keys, &values));
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
            return rest;
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
        rest
    }
}
