//! Entry points of the dataplane's eBPF programs. They only dispatch; the
//! logic lives in one module per concern (parse, lb, conntrack, nat, stats).
#![no_std]
#![no_main]
// `sock.rs` adds to counters with an atomic add: the bpf target has no
// atomic read-modify-write methods on `AtomicU64`, only the intrinsic.
#![feature(core_intrinsics)]
// `nat.rs` reads `skb->ip_summed` through a kfunc call written as inline
// assembly.
#![feature(asm_experimental_arch)]
#![allow(internal_features)]

mod affinity;
mod conntrack;
mod entry;
mod forward;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod sock;
mod stats;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};

/// XDP on external interfaces. Declares frags support so that attaching it
/// does not make the kernel disable GSO/TSO on veth peers; only the first
/// buffer (the headers) is read.
#[xdp(frags)]
pub fn dp_xdp(ctx: XdpContext) -> u32 {
    entry::xdp(&ctx)
}

/// `dp_xdp` without the frags flag, for kernels before 5.18, which refuse
/// it (`dataplane_common::program_names::XDP_NO_FRAGS`). Such an XDP
/// program cannot attach to an interface whose MTU needs several buffers
/// per frame, and attaching it to a veth turns GSO off on the peer.
#[xdp]
pub fn dp_xdp_nofrags(ctx: XdpContext) -> u32 {
    entry::xdp(&ctx)
}

/// TC ingress on pod/host interfaces.
#[classifier]
pub fn dp_tc(ctx: TcContext) -> i32 {
    entry::tc(&ctx)
}

/// Socket-level load balancing (`sock.rs`), attached to a cgroup: sockets
/// of processes in it reach Service frontends through a backend chosen at
/// connect()/sendmsg() time.
#[cgroup_sock_addr(connect4)]
pub fn dp_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn dp_connect6(ctx: SockAddrContext) -> i32 {
    sock::connect(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn dp_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn dp_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::sendmsg(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn dp_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::recvmsg(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn dp_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::recvmsg(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn dp_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::getpeername(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn dp_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::getpeername(&ctx, true)
}

/// A socket of the cgroup is released: its socket-level translation goes
/// with it (`sock::release`).
#[cgroup_sock(sock_release)]
pub fn dp_sock_release(ctx: SockContext) -> i32 {
    sock::release(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
