//! The bodies of the XDP and TC programs, shared by the dataplane's entry
//! points and the bench wrappers (which must run exactly the same code).
//!
//! Stack: eBPF allows 512 bytes for a program and the functions it calls
//! together. Parsing, the service path (`lb::to_service`, `lb::from_backend`), the
//! reject builders and the ICMP error translation are separate functions
//! called from here side by side, not nested, so that only one of them adds
//! its frame at a time; conntrack keys and values are built in a per-CPU
//! scratch entry (`maps::scratch`).

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::{TcContext, XdpContext},
};
use dataplane_common::Reason;

use crate::{
    forward, icmp,
    lb::{self, Verdict},
    parse::{self, Packet},
    reject, stats,
};

#[inline(never)]
fn xdp_reject(ctx: &XdpContext, p: &Packet) -> Result<u32, reject::NoReject> {
    reject::xdp(ctx, p)
}

#[inline(never)]
fn tc_reject(ctx: &TcContext, p: &Packet) -> Result<i32, reject::NoReject> {
    reject::tc(ctx, p)
}

/// Parsing in a frame of its own (it takes the context, not the packet
/// pointers: those must stay pointers, see `nat::PacketCtx`), into the
/// caller's packet: the result is not copied into the caller's frame a
/// second time. The entry frames are on the deepest call chain (entry,
/// `lb::to_service`, `conntrack::create`): with the copy, that chain needs
/// 544 bytes of stack as kernels before 6.8 count it (each frame rounded
/// up to 32 bytes), over the 512 allowed. The same frame then handles
/// what needs no service map (`lb::track`: established flows to cached
/// frontends, replies), so that those packets make one BPF-to-BPF call
/// (a call and a return each cost several ns with the return thunks of
/// current x86 kernels); it returns before the service path's chain
/// starts, so its frame is not on that chain.
#[inline(never)]
fn xdp_front(ctx: &XdpContext, out: &mut MaybeUninit<Packet>) -> Result<lb::Front, Reason> {
    let p = out.write(parse::parse(ctx.data(), ctx.data_end())?);
    Ok(lb::track(ctx, p))
}

/// What `dp_xdp` does.
#[inline(always)]
pub fn xdp(ctx: &XdpContext) -> u32 {
    let mut p = MaybeUninit::uninit();
    let (p, front) = match xdp_front(ctx, &mut p) {
        // SAFETY: `xdp_front` wrote the packet.
        Ok(front) => (unsafe { p.assume_init_ref() }, front),
        Err(Reason::PassNotTcpUdp) if icmp::translate(ctx) => {
            stats::count(Reason::NatIcmpError);
            return xdp_action::XDP_PASS;
        }
        Err(reason) => {
            stats::count(reason);
            return xdp_action::XDP_PASS;
        }
    };
    match lb::process(ctx, p, front) {
        Verdict::Pass => xdp_action::XDP_PASS,
        // (The load-time global checked here, not only in the callee:
        // with host routing off the verifier drops the call.)
        Verdict::Forward if crate::maps::host_routing() => forward::xdp(ctx),
        Verdict::Forward => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Reject => match xdp_reject(ctx, p) {
            Ok(action) => {
                stats::count(Reason::RejectNoBackend);
                action
            }
            Err(_) => {
                stats::count(Reason::DropNoBackend);
                xdp_action::XDP_DROP
            }
        },
    }
}

/// Headers the TC program needs in the linear part of the skb: Ethernet,
/// IPv4 with maximal options or IPv6 with some extension headers, TCP
/// without options.
const TC_PULL_LEN: u32 = (parse::ETH_HLEN + 128 + 20) as u32;

/// [`xdp_front`] for TC: the headers may sit in paged data, pulled into
/// the linear part once when parsing finds them missing.
#[inline(never)]
fn tc_front(ctx: &TcContext, out: &mut MaybeUninit<Packet>) -> Result<lb::Front, Reason> {
    let mut res = parse::parse(ctx.data(), ctx.data_end());
    if matches!(res, Err(Reason::PassTruncated)) {
        let want = if ctx.len() < TC_PULL_LEN {
            ctx.len()
        } else {
            TC_PULL_LEN
        };
        if ((ctx.data_end() - ctx.data()) as u32) < want && ctx.pull_data(want).is_ok() {
            res = parse::parse(ctx.data(), ctx.data_end());
        }
    }
    let p = out.write(res?);
    Ok(lb::track(ctx, p))
}

/// What `dp_tc` does. Untouched and translated packets continue
/// (TC_ACT_UNSPEC: next program, or the stack); drops are final.
#[inline(always)]
pub fn tc(ctx: &TcContext) -> i32 {
    // Parsed into this frame, not copied into it (see `xdp_front`): the TC
    // entry frame is on the deepest chain too.
    let mut packet = MaybeUninit::uninit();
    let (p, front) = match tc_front(ctx, &mut packet) {
        // SAFETY: `tc_front` wrote the packet.
        Ok(front) => (unsafe { packet.assume_init_ref() }, front),
        Err(Reason::PassNotTcpUdp) if tc_icmp_error(ctx) => {
            stats::count(Reason::NatIcmpError);
            return TC_ACT_UNSPEC;
        }
        Err(reason) => {
            stats::count(reason);
            return TC_ACT_UNSPEC;
        }
    };
    match lb::process(ctx, p, front) {
        // A packet of a connection the socket-level programs translated
        // (to or from an endpoint): host-routed like a translated one.
        // (The load-time globals are checked here, not only in the
        // callees: with the settings off the verifier drops the calls.)
        Verdict::Pass if forward::sock_routing() && forward::socket_translated(p) => forward::tc(ctx),
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Forward if crate::maps::host_routing() => forward::tc(ctx),
        Verdict::Forward => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Reject => match tc_reject(ctx, p) {
            Ok(action) => {
                stats::count(Reason::RejectNoBackend);
                action
            }
            Err(_) => {
                stats::count(Reason::DropNoBackend);
                TC_ACT_SHOT
            }
        },
    }
}

/// ICMP errors in TC: the quoted headers may sit in paged data.
#[inline(always)]
fn tc_icmp_error(ctx: &TcContext) -> bool {
    // Ethernet + IPv6 + ICMPv6 + quoted IPv6 + 8 bytes (IPv4: less).
    const MAX: u32 = icmp::min_len(true) as u32;
    let want = if ctx.len() < MAX { ctx.len() } else { MAX };
    if ((ctx.data_end() - ctx.data()) as u32) < want && ctx.pull_data(want).is_err() {
        return false;
    }
    icmp::translate(ctx)
}
