//! Test harness: network namespaces, packet crafting, backend servers, the
//! agent process, and the loaded programs for BPF_PROG_TEST_RUN.

pub mod agent;
pub mod bench;
pub mod cgroup;
pub mod fake_api;
pub mod hostile;
pub mod manifests;
pub mod mapstate;
pub mod mapview;
pub mod netns;
pub mod oracle;
pub mod packet;
pub mod prog;
pub mod servers;
pub mod web;
