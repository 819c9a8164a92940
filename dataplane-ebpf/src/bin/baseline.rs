//! Baselines for the per-packet benchmark (`cargo xtask bench`): what an
//! XDP program costs when it does nothing, and when it only parses the frame
//! and does one hash lookup in a map shaped like `DP_SERVICES`. Never loaded
//! by the agent.
#![no_std]
#![no_main]

#[allow(dead_code)]
#[path = "../parse.rs"]
mod parse;

use aya_ebpf::{bindings::xdp_action, macros::map, macros::xdp, maps::HashMap, programs::XdpContext};
use dataplane_common::{limits, ServiceKey, ServiceValue};

/// As `DP_SERVICES`: not preallocated, same capacity.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map]
static BL_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(limits::MAX_SERVICES, BPF_F_NO_PREALLOC);

#[xdp]
pub fn bl_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The floor of any service datapath: the same parser, one lookup.
#[xdp]
pub fn bl_parse_lookup(ctx: XdpContext) -> u32 {
    let p = match parse::parse(ctx.data(), ctx.data_end()) {
        Ok(p) => p,
        Err(_) => return xdp_action::XDP_PASS,
    };
    let key = ServiceKey {
        addr: p.daddr,
        port: p.dport,
        proto: p.proto,
        family: p.family,
    };
    // The result decides the verdict, so the lookup cannot be optimised away.
    match BL_SERVICES.get_ptr(key) {
        Some(_) => xdp_action::XDP_PASS,
        None => xdp_action::XDP_DROP,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
