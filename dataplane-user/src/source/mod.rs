//! Where Services and EndpointSlices come from.
//!
//! Every source implements [`Source`]: the agent's sync loop waits for
//! [`Source::changed`], then reads the current objects through
//! [`Source::view`]. A source that knows which objects changed (both do,
//! through [`Tracked`]: the Kubernetes source from watch events, the file
//! source by comparing the objects of the files that changed) gets the
//! incremental path (`model::Incremental` -> `Syncer::apply_changed`: only
//! the Services touched are recomputed and written); one that does not
//! (`tracked: None`, or `changed: None` on a first list) the full one
//! (`model::compute_for_node` -> `Syncer::apply`). Both give the same maps
//! (randomized tests in `reconcile/tests.rs` check it, one of them through
//! a real manifest directory).

pub mod files;
pub mod kubernetes;
pub mod watch;

use std::future::Future;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::model::{Problem, ServiceRecord, SliceRecord, Tracked};

/// Services and EndpointSlices read from a source.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// Node objects (the file source: the node the agent runs on).
    pub nodes: Vec<Node>,
}

/// A borrowed view of a source's current objects.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// What the model reads of each Service and EndpointSlice (sources
    /// keep only that, see `model::ServiceRecord`).
    pub services: &'a [ServiceRecord],
    pub slices: &'a [SliceRecord],
    /// Problems the source itself found (unparsable files); the
    /// desired-state function reports the rest.
    pub problems: &'a [Problem],
    /// Indexes and what changed since the previous view, when the source
    /// tracks them (both sources do): the sync then recomputes only the
    /// Services concerned. `None`: the whole state is recomputed.
    pub tracked: Option<Tracked<'a>>,
    /// This node's Node object, when the source watches it (Kubernetes).
    pub node: Option<&'a Node>,
}

/// Counters a source keeps about its own connection to the objects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceCounters {
    /// Watch or list failures after which the source retried (with backoff
    /// for Kubernetes); for the file source, directory read failures.
    pub watch_restarts: u64,
    /// Full relists after the first one (a 410 Gone, for example).
    pub relists: u64,
}

/// A source of Services and EndpointSlices.
pub trait Source {
    /// Resolves when the objects may have changed since the last call.
    /// Errors only when the source cannot go on at all; transient failures
    /// are retried inside the source and the last objects stay in place.
    fn changed(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Runs `f` on the current objects, or returns `None` while the source
    /// has no complete view yet (initial lists still running): programming a
    /// partial view would remove Services that are merely not listed yet.
    /// A source that fills [`View::tracked`] reports the changes since the
    /// previous call that ran `f`.
    fn view<R>(&mut self, f: impl FnOnce(View<'_>) -> R) -> Option<R>;

    fn counters(&self) -> SourceCounters;
}

/// An object a source keeps, by the key the model finds it under
/// ([`crate::model::object_key`]).
pub trait Keyed {
    fn key(&self) -> String;
}

impl Keyed for ServiceRecord {
    fn key(&self) -> String {
        ServiceRecord::key(self)
    }
}

impl Keyed for SliceRecord {
    fn key(&self) -> String {
        SliceRecord::key(self)
    }
}

impl Keyed for Node {
    fn key(&self) -> String {
        crate::model::object_key(&self.metadata)
    }
}
