//! What this kernel offers the programs beyond the oldest supported one
//! (5.10): probed once with aya's helper probes (a two-instruction program
//! per helper, as libbpf does) and handed to the programs at load time
//! (`dataplane_common::KERNEL_GLOBAL`). XDP frags support is found by
//! loading (`loader::Dataplane::load`); a helper flag by running a probe
//! program.

use std::sync::OnceLock;

use aya::{
    programs::ProgramType,
    sys::{is_helper_supported, BpfHelper},
};
use dataplane_common::kernel_features::{COARSE_CLOCK, CSUM_IPV6, SET_RETVAL, SKB_SUMMED};

use super::sys;

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

/// The name of [`SKB_SUMMED`] in messages.
const SKB_SUMMED_NAME: &str = "kfunc bpf_cast_to_kern_ctx (sk_buff.ip_summed)";

/// The name of [`CSUM_IPV6`] in messages.
const CSUM_IPV6_NAME: &str = "bpf_l4_csum_replace BPF_F_IPV6";

/// The `kernel_features` bits of this kernel. A probe that cannot tell
/// (an unexpected error) counts as absent: the older path works everywhere.
pub fn features() -> u32 {
    static FEATURES: OnceLock<u32> = OnceLock::new();
    *FEATURES.get_or_init(|| {
        let helpers = PROBES
            .iter()
            .filter(|(_, helper, ty, _)| is_helper_supported(*ty, *helper).unwrap_or(false))
            .fold(0, |bits, (bit, ..)| bits | bit);
        let summed = if super::kfunc::skb_summed().global != 0 {
            SKB_SUMMED
        } else {
            0
        };
        helpers | summed | if csum_ipv6_flag() { CSUM_IPV6 } else { 0 }
    })
}

/// Whether `bpf_l4_csum_replace` takes `BPF_F_IPV6` (6.16): a TC program
/// that calls it with only that flag, run once; kernels without the flag
/// refuse it with `EINVAL` before touching the packet.
fn csum_ipv6_flag() -> bool {
    // r2 = 0 (offset), r3 = 0 (from), r4 = 0 (to), r5 = BPF_F_IPV6,
    // call bpf_l4_csum_replace (11), exit: r0 is the helper's result.
    const fn mov64_imm(reg: u64, imm: u32) -> u64 {
        0xb7 | reg << 8 | (imm as u64) << 32
    }
    let insns = [
        mov64_imm(2, 0),
        mov64_imm(3, 0),
        mov64_imm(4, 0),
        mov64_imm(5, 1 << 7),
        0x85 | 11 << 32,
        0x95,
    ];
    let Ok(prog) = sys::prog_load(sys::PROG_TYPE_SCHED_CLS, "dp_probe_csum6", &insns) else {
        return false;
    };
    let frame = [0u8; 64];
    let mut out = [0u8; 64];
    use std::os::fd::AsFd;
    matches!(sys::prog_test_run(prog.as_fd(), &frame, &mut out, 1), Ok(r) if r.retval == 0)
}

/// The features of `PROBES` and the helper flags missing from `features`,
/// by name.
pub fn missing(features: u32) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = PROBES
        .iter()
        .filter(|(bit, ..)| features & bit == 0)
        .map(|(.., name)| *name)
        .collect();
    if features & CSUM_IPV6 == 0 {
        names.push(CSUM_IPV6_NAME);
    }
    if features & SKB_SUMMED == 0 {
        names.push(SKB_SUMMED_NAME);
    }
    names
}
