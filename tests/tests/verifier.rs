//! Verifier margins: every program of the real object is loaded and the
//! number of instructions the kernel's verifier processed for it
//! (`verified_insns`, BPF_OBJ_GET_INFO_BY_FD) must stay under a stated
//! budget, far below the kernel's limit, so a change that moves a program
//! towards the limit fails here long before it fails to load on a node.
//!
//! The counts are printed (`cargo test -p dataplane-tests --test verifier
//! -- --nocapture`) and recorded in the README.

use std::os::fd::{BorrowedFd, RawFd};

use dataplane::bpf::{
    loader::{Dataplane, Globals},
    map_sizes::MapSizes,
    sys,
};
use dataplane_common::program_names;

/// The verifier's limit on processed instructions (BPF_COMPLEXITY_LIMIT_INSNS).
const KERNEL_LIMIT: u32 = 1_000_000;
/// Each program may use at most 30 % of it, on the kernel under test: the
/// older ones walk the most (Debian's 6.1 1.6-1.7 times what 6.18 does).
const BUDGET: u32 = KERNEL_LIMIT / 100 * 30;

/// The kernel id of the program behind `fd`: the second u32 of
/// `struct bpf_prog_info` (after `type`).
fn program_id(fd: RawFd) -> u32 {
    let mut info = [0u64; 1];
    // SAFETY: the loaded program keeps its fd open while this runs.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    sys::obj_get_info_by_fd(fd, &mut info).unwrap_or_else(|e| panic!("{e}"));
    (info[0] >> 32) as u32
}

#[test]
fn every_program_verifies_well_within_the_instruction_limit() {
    dataplane_tests::netns::require_root_and_tools();
    // DATAPLANE_BPF_OBJECT: another object than the one built in (to
    // compare the verifier's work for variants on another kernel).
    let object = std::env::var_os("DATAPLANE_BPF_OBJECT").map(std::path::PathBuf::from);
    // Every optional path on: the verifier prunes what a load-time
    // constant turns off.
    let globals = Globals {
        host_routing: true,
        sock_routing: true,
        ..Globals::default()
    };
    let (mut dp, _) = Dataplane::load_with(object.as_deref(), None, &MapSizes::default(), false, globals)
        .unwrap_or_else(|e| panic!("{e}"));
    dp.load_socket_programs().unwrap_or_else(|e| panic!("{e}"));
    let socket_programs = program_names::SOCK
        .iter()
        .map(|(name, _)| *name)
        .chain([program_names::SOCK_RELEASE]);
    for name in [dp.xdp_program(), program_names::TC].into_iter().chain(socket_programs) {
        let fd = match dp.program_fd(name) {
            Ok(fd) => fd,
            // Optional (the agent warns and goes on without it): kernels
            // before 5.12 may refuse its socket-cookie helper.
            Err(e) if name == program_names::SOCK_RELEASE => {
                let v = aya::util::KernelVersion::current().expect("the kernel's version");
                assert!(
                    v < aya::util::KernelVersion::new(5, 12, 0),
                    "{name} not loaded on {v:?}: {e}"
                );
                println!("{name}: not loaded on kernel {v:?} ({e}); the agent goes on without it");
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let id = program_id(fd);
        let info = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == id)
            .unwrap_or_else(|| panic!("{name}: program id {id} not among the loaded programs"));
        assert_eq!(info.name_as_str(), Some(name), "program id {id}");
        let Some(insns) = info.verified_instruction_count() else {
            // Kernels before 5.16 do not report the count: there the load
            // itself (above) is what this test shows.
            let v = aya::util::KernelVersion::current().expect("the kernel's version");
            assert!(
                v < aya::util::KernelVersion::new(5, 16, 0),
                "{name}: kernel {v:?} reports no verified_insns"
            );
            println!("{name}: verified (kernel {v:?} does not report the instruction count; 5.16+ does)");
            continue;
        };
        let xlated = info.size_translated().unwrap_or(0) / 8;
        println!(
            "{name}: {insns} instructions verified ({:.1} % of the {KERNEL_LIMIT} limit, budget {BUDGET}); {xlated} instructions after translation",
            insns as f64 * 100.0 / KERNEL_LIMIT as f64
        );
        assert!(
            insns <= BUDGET,
            "{name}: the verifier processed {insns} instructions, over the budget of {BUDGET} (30 % of the kernel's limit)"
        );
        assert!(insns > 0 && xlated > 0, "{name}: implausible counts");
    }
}

/// TC reads `skb->ip_summed` (and updates L4 checksums itself) exactly on
/// the kernels that have the kfunc `bpf_cast_to_kern_ctx`: 6.2 and later
/// (the kernel's release, an independent source), where the agent's probe
/// program must work; 5.10 and 6.1 take the helper path. Runs in every
/// kernel of the matrix, so each says which path its datapath tests took.
#[test]
fn tc_reads_ip_summed_exactly_where_the_kernel_has_the_kfunc() {
    dataplane_tests::netns::require_root_and_tools();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("reading the kernel release");
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).expect("kernel major version");
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).expect("kernel minor version");
    let summed = dataplane::bpf::kfunc::skb_summed();
    let features = dataplane::bpf::kernel::features();
    let has = features & dataplane_common::kernel_features::SKB_SUMMED != 0;
    println!("kernel {}: TC reads skb->ip_summed: {has} ({summed:?})", release.trim());
    assert_eq!(has, (major, minor) >= (6, 2), "kernel {}: {summed:?}", release.trim());
    assert_eq!(has, summed.global != 0 && summed.kfunc_id.is_some());
}
