//! The kernel side as the agent sees it: the embedded object loaded with
//! aya, its maps typed, pins under bpffs, programs attached to netdevs
//! (following netlink) and cgroups, and the `bpf(2)` commands aya lacks.

pub mod batch;
pub mod cgroup;
pub mod ifwatch;
pub mod kernel;
pub mod kfunc;
pub mod loader;
pub mod map_sizes;
pub mod mapmem;
pub mod migrate;
pub mod pin;
pub mod sys;
pub mod testrun;
pub mod xdpfeatures;
