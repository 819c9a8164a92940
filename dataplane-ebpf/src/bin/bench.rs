//! Bench-only entry programs (`cargo xtask bench`): the unchanged datapath
//! modules of the dataplane, behind a wrapper that restores the frame before
//! every run of a BPF_PROG_TEST_RUN repeat loop (which otherwise feeds the
//! program its own output) and varies the flow or the Service. The wrapper
//! alone (`bench_frame_*`) is measured in the same round and subtracted.
//! Never loaded by the agent.
#![no_std]
#![no_main]
// `nat.rs` reads `skb->ip_summed` through a kfunc call written as inline
// assembly.
#![feature(asm_experimental_arch)]
// The modules are shared with the dataplane program; not all of their items
// are used by these entry points.
#![allow(dead_code)]

#[path = "../affinity.rs"]
mod affinity;
#[path = "../conntrack.rs"]
mod conntrack;
#[path = "../entry.rs"]
mod entry;
#[path = "../forward.rs"]
mod forward;
#[path = "../icmp.rs"]
mod icmp;
#[path = "../lb.rs"]
mod lb;
#[path = "../maps.rs"]
mod maps;
#[path = "../nat.rs"]
mod nat;
#[path = "../parse.rs"]
mod parse;
#[path = "../reject.rs"]
mod reject;
#[path = "../stats.rs"]
mod stats;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT},
    macros::{classifier, map, xdp},
    maps::Array,
    programs::{TcContext, XdpContext},
};
use dataplane_common::bench::{
    service_frontend, BenchFrame, FRAME_LEN, OFFSETS_V4, OFFSETS_V6, VARY_FLOW, VARY_SERVICE,
};
use nat::PacketCtx;

#[map]
static BENCH_FRAME: Array<BenchFrame> = Array::with_max_entries(1, 0);

#[map]
static BENCH_SEQ: Array<u64> = Array::with_max_entries(1, 0);

/// TC_ACT_OK: what the frame-only TC program returns.
const TC_ACT_OK: i32 = 0;

/// Applies the variations of run `n` to the frame at `data` (at least
/// FRAME_LEN bytes, checked by the caller), with the varied fields at the
/// given offsets.
#[inline(always)]
unsafe fn vary<const SADDR: usize, const DADDR: usize, const SPORT: usize, const DPORT: usize>(
    data: usize,
    f: &BenchFrame,
    n: u64,
) {
    if f.vary & VARY_FLOW != 0 {
        // 2^16 source ports per source address; the address walks up from
        // the template's.
        let saddr = u32::from_be(core::ptr::read_unaligned((data + SADDR) as *const u32));
        let saddr = saddr.wrapping_add(((n >> 16) & 0xff) as u32);
        core::ptr::write_unaligned((data + SADDR) as *mut u32, saddr.to_be());
        core::ptr::write_unaligned((data + SPORT) as *mut u16, (n as u16).to_be());
    }
    if f.vary & VARY_SERVICE != 0 && f.services != 0 {
        let (addr, port) = service_frontend((n % f.services as u64) as u32);
        core::ptr::write_unaligned((data + DADDR) as *mut u32, addr.to_be());
        core::ptr::write_unaligned((data + DPORT) as *mut u16, port.to_be());
    }
}

/// Copies the template frame over the packet and applies the variations.
#[inline(always)]
fn restore<C: PacketCtx>(ctx: &C) -> Option<()> {
    let f = BENCH_FRAME.get(0)?;
    let data = ctx.data();
    if data + FRAME_LEN > ctx.data_end() {
        return None;
    }
    // SAFETY: [data, data + FRAME_LEN) lies inside the packet (checked
    // above); the map value holds FRAME_LEN bytes.
    unsafe {
        let src = f.bytes.as_ptr();
        let mut i = 0;
        while i < FRAME_LEN {
            let w = core::ptr::read_unaligned(src.add(i) as *const u64);
            core::ptr::write_unaligned((data + i) as *mut u64, w);
            i += 8;
        }
        if f.vary != 0 {
            let seq = BENCH_SEQ.get_ptr_mut(0)?;
            *seq += 1;
            // Constant offsets per family: inside the frame checked above.
            if f.offsets[0] == OFFSETS_V6[0] {
                vary::<
                    { OFFSETS_V6[0] as usize },
                    { OFFSETS_V6[1] as usize },
                    { OFFSETS_V6[2] as usize },
                    { OFFSETS_V6[3] as usize },
                >(data, f, *seq);
            } else {
                vary::<
                    { OFFSETS_V4[0] as usize },
                    { OFFSETS_V4[1] as usize },
                    { OFFSETS_V4[2] as usize },
                    { OFFSETS_V4[3] as usize },
                >(data, f, *seq);
            }
        }
    }
    Some(())
}

#[xdp]
pub fn bench_frame_xdp(ctx: XdpContext) -> u32 {
    match restore(&ctx) {
        Some(()) => xdp_action::XDP_PASS,
        None => xdp_action::XDP_ABORTED,
    }
}

/// The frame restored, then exactly what `dp_xdp` does.
#[xdp]
pub fn bench_xdp(ctx: XdpContext) -> u32 {
    if restore(&ctx).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    entry::xdp(&ctx)
}

#[classifier]
pub fn bench_frame_tc(ctx: TcContext) -> i32 {
    match restore(&ctx) {
        Some(()) => TC_ACT_OK,
        None => TC_ACT_SHOT,
    }
}

/// The frame restored, then exactly what `dp_tc` does (the bench frames
/// never need its pull).
#[classifier]
pub fn bench_tc(ctx: TcContext) -> i32 {
    if restore(&ctx).is_none() {
        return TC_ACT_SHOT;
    }
    entry::tc(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
