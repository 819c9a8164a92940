//! What this kernel offers the programs beyond the oldest supported one
//! (5.10): probed once with aya's helper probes (a two-instruction program
//! per helper, as libbpf does) and handed to the programs at load time
//! (`dataplane_common::KERNEL_GLOBAL`). XDP frags support is found by
//! loading (`loader::Dataplane::load`).

use std::sync::OnceLock;

use aya::{
    programs::ProgramType,
    sys::{is_helper_supported, BpfHelper},
};
use dataplane_common::kernel_features::{COARSE_CLOCK, SET_RETVAL};

/// Each feature, its helper, and the program type it is probed from.
const PROBES: [(u32, BpfHelper, ProgramType, &str); 2] = [
    (
        COARSE_CLOCK,
        BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
        ProgramType::SchedClassifier,
        "bpf_ktime_get_coarse_ns",
    ),
    (
        SET_RETVAL,
        BpfHelper::BPF_FUNC_set_retval,
        ProgramType::CgroupSockAddr,
        "bpf_set_retval",
    ),
];

/// The `kernel_features` bits of this kernel. A probe that cannot tell
/// (an unexpected error) counts as absent: the older path works everywhere.
pub fn features() -> u32 {
    static FEATURES: OnceLock<u32> = OnceLock::new();
    *FEATURES.get_or_init(|| {
        PROBES
            .iter()
            .filter(|(_, helper, ty, _)| is_helper_supported(*ty, *helper).unwrap_or(false))
            .fold(0, |bits, (bit, ..)| bits | bit)
    })
}

/// The helpers of `PROBES` missing from `features`, by name.
pub fn missing(features: u32) -> Vec<&'static str> {
    PROBES
        .iter()
        .filter(|(bit, ..)| features & bit == 0)
        .map(|(.., name)| *name)
        .collect()
}
