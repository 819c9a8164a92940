//! The dataplane agent as a library: the `dataplane` binary is a thin CLI
//! over it, and the tests and benchmarks call it directly.

pub mod agent;
pub mod batch;
pub mod desired;
pub mod health;
pub mod ifwatch;
pub mod inspect;
pub mod loader;
pub mod maglev;
pub mod map_sizes;
pub mod metrics;
pub mod node;
pub mod pin;
pub mod socklb;
pub mod source;
pub mod sync;
pub mod testrun;
pub mod trace;
