//! Entry points of the dataplane's eBPF programs. They only dispatch; the
//! logic lives in one module per concern (parse, lb, conntrack, nat, stats).
#![no_std]
#![no_main]

mod affinity;
mod conntrack;
mod entry;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod stats;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// XDP on external interfaces. Declares frags support so that attaching it
/// does not make the kernel disable GSO/TSO on veth peers; only the first
/// buffer (the headers) is read.
#[xdp(frags)]
pub fn dp_xdp(ctx: XdpContext) -> u32 {
    entry::xdp(&ctx)
}

/// TC ingress on pod/host interfaces.
#[classifier]
pub fn dp_tc(ctx: TcContext) -> i32 {
    entry::tc(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
