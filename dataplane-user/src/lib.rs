//! The dataplane agent as a library: the `dataplane` binary is a thin CLI
//! over it, and the tests and benchmarks call it directly.
//!
//! The flow, one layer per module (a layer uses only the layers above it in
//! this list; `tests/layering.rs` checks it):
//!
//! - [`model`]: Services and EndpointSlices -> desired frontends and their
//!   Maglev tables; pure, no kernel.
//! - [`packet`]: building and reading frames (trace, tests), on etherparse;
//!   pure, no kernel.
//! - [`source`]: where the objects come from (a manifest directory, the
//!   Kubernetes API).
//! - [`bpf`]: the kernel side as the agent sees it: loading, pinning,
//!   attaching to netdevs and cgroups, typed maps, raw `bpf(2)` calls.
//! - [`reconcile`]: the difference between desired and programmed, written
//!   to the maps in an order the datapath never sees half done.
//! - [`inspect`]: the live maps read back as rows (CLI and metrics).
//! - [`state`]: the agent's counters and health; [`version`]: what it is.
//! - [`http`]: `/healthz`, `/readyz`, `/livez` and `/metrics`.
//! - [`agent`]: `dataplane run`, tying the above together.
//! - [`cli`]: the command line, its tables and `trace`.

pub mod model;
pub mod node;
pub mod packet;
pub mod source;
pub mod version;

pub mod bpf;
pub mod reconcile;

pub mod inspect;
pub mod state;

pub mod http;

pub mod agent;
pub mod cli;
