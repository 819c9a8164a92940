//! Test harness: network namespaces, packet crafting, backend servers, the
//! agent process, and the loaded programs for BPF_PROG_TEST_RUN.

pub mod agent;
pub mod bench;
pub mod manifests;
pub mod netns;
pub mod packet;
pub mod prog;
pub mod servers;
