//! Per-CPU counters: one per `Reason`, and one block per service.

use dataplane_common::{CtEvent, Reason, RouteEvent, ServiceStats};

use crate::maps::{DP_CT_EVENTS, DP_REASONS, DP_ROUTE_EVENTS, DP_SVC_STATS};

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = DP_REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
}

/// Adds `n` to one of the `dataplane_common::counters`.
#[inline(always)]
pub fn add(counter: u32, n: u64) {
    if let Some(c) = DP_REASONS.get_ptr_mut(counter) {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        unsafe { *c += n };
    }
}

/// Counts one conntrack event.
#[inline(always)]
pub fn ct_event(e: CtEvent) {
    if let Some(c) = DP_CT_EVENTS.get_ptr_mut(e as u32) {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
}

/// Counts what host routing did with one packet.
#[inline(always)]
pub fn route_event(e: RouteEvent) {
    if let Some(c) = DP_ROUTE_EVENTS.get_ptr_mut(e as u32) {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn service<F: FnOnce(&mut ServiceStats)>(service_id: u32, f: F) {
    if let Some(s) = DP_SVC_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        f(unsafe { &mut *s });
    }
}
