//! sessionAffinity ClientIP: a client's new flows to a frontend go to the
//! backend its previous flow went to, while it comes back within the
//! timeout (kube-proxy refreshes on every new connection; so do we).

use dataplane_common::{AffinityKey, AffinityValue, Backend, ServiceValue};

use crate::{conntrack::now_ns, maps::DP_AFFINITY, parse::Packet};

const NS_PER_S: u64 = 1_000_000_000;

#[inline(always)]
fn key(p: &Packet, svc: &ServiceValue) -> AffinityKey {
    AffinityKey {
        client: p.saddr,
        service_id: svc.service_id,
    }
}

/// The backend remembered for this client, if not expired; refreshes it.
#[inline(never)]
pub fn lookup(p: &Packet, svc: &ServiceValue) -> Option<Backend> {
    let e = DP_AFFINITY.get_ptr_mut(key(p, svc))?;
    // SAFETY: the LRU value stays valid for this run and a racing refresh
    // of last_seen is harmless.
    unsafe {
        let now = now_ns();
        if now.saturating_sub((*e).last_seen_ns) > svc.affinity_timeout_s as u64 * NS_PER_S {
            return None;
        }
        (*e).last_seen_ns = now;
        Some((*e).backend)
    }
}

/// Remembers `backend` for this client.
#[inline(never)]
pub fn remember(p: &Packet, svc: &ServiceValue, backend: Backend) {
    let now = now_ns();
    // Best effort: without the entry the next flow is simply selected again.
    let _ = DP_AFFINITY.insert(
        key(p, svc),
        AffinityValue {
            backend,
            _pad: 0,
            last_seen_ns: now,
        },
        0,
    );
}
