//! Entry points of the dataplane's eBPF programs. They only dispatch; the
//! logic lives in one module per concern (parse, lb, conntrack, nat, stats).
#![no_std]
#![no_main]

mod affinity;
mod conntrack;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod stats;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use dataplane_common::Reason;
use lb::Verdict;

/// XDP on external interfaces. Declares frags support so that attaching it
/// does not make the kernel disable GSO/TSO on veth peers; only the first
/// buffer (the headers) is read.
#[xdp(frags)]
pub fn dp_xdp(ctx: XdpContext) -> u32 {
    match lb::handle(&ctx) {
        Ok((Verdict::Pass, _)) => xdp_action::XDP_PASS,
        Ok((Verdict::Drop, _)) => xdp_action::XDP_DROP,
        Ok((Verdict::Reject, p)) => match reject::xdp(&ctx, &p) {
            Ok(action) => {
                stats::count(Reason::RejectNoBackend);
                action
            }
            Err(_) => {
                stats::count(Reason::DropNoBackend);
                xdp_action::XDP_DROP
            }
        },
        Err(Reason::PassNotTcpUdp) if icmp::translate(&ctx) => {
            stats::count(Reason::NatIcmpError);
            xdp_action::XDP_PASS
        }
        Err(reason) => {
            stats::count(reason);
            xdp_action::XDP_PASS
        }
    }
}

/// Headers the TC program needs in the linear part of the skb: Ethernet,
/// IPv4 with maximal options, TCP without options.
const TC_PULL_LEN: u32 = (parse::ETH_HLEN + 60 + 20) as u32;

/// TC ingress on pod/host interfaces. Untouched and translated packets
/// continue (TC_ACT_UNSPEC: next program, or the stack); drops are final.
#[classifier]
pub fn dp_tc(ctx: TcContext) -> i32 {
    let mut res = lb::handle(&ctx);
    if matches!(res, Err(Reason::PassTruncated)) {
        // The headers may sit in paged data: pull them into the linear part
        // once and look again.
        let want = if ctx.len() < TC_PULL_LEN {
            ctx.len()
        } else {
            TC_PULL_LEN
        };
        if ((ctx.data_end() - ctx.data()) as u32) < want && ctx.pull_data(want).is_ok() {
            res = lb::handle(&ctx);
        }
    }
    match res {
        Ok((Verdict::Pass, _)) => TC_ACT_UNSPEC,
        Ok((Verdict::Drop, _)) => TC_ACT_SHOT,
        Ok((Verdict::Reject, p)) => match reject::tc(&ctx, &p) {
            Ok(action) => {
                stats::count(Reason::RejectNoBackend);
                action
            }
            Err(_) => {
                stats::count(Reason::DropNoBackend);
                TC_ACT_SHOT
            }
        },
        Err(Reason::PassNotTcpUdp) if tc_icmp_error(&ctx) => {
            stats::count(Reason::NatIcmpError);
            TC_ACT_UNSPEC
        }
        Err(reason) => {
            stats::count(reason);
            TC_ACT_UNSPEC
        }
    }
}

/// ICMP errors in TC: the quoted headers may sit in paged data.
#[inline(always)]
fn tc_icmp_error(ctx: &TcContext) -> bool {
    const WANT: u32 = 70; // Ethernet + IPv4 + ICMP + quoted IPv4 + 8 bytes
    if ((ctx.data_end() - ctx.data()) as u32) < WANT && ctx.len() >= WANT && ctx.pull_data(WANT).is_err() {
        return false;
    }
    icmp::translate(ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
