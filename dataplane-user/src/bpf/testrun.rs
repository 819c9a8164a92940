//! BPF_PROG_TEST_RUN: runs a loaded program on a crafted frame, without
//! attaching it anywhere. Used by the tests, and by `trace`.
//!
//! aya has no wrapper for this command: see [`super::sys::prog_test_run`].

use std::os::fd::{BorrowedFd, RawFd};

use super::sys::{self, SysError};

/// What one run returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    /// The program's return value (XDP action, TC action).
    pub retval: u32,
    /// The frame as the program left it.
    pub data: Vec<u8>,
    /// Average run time in ns reported by the kernel (over `repeat` runs).
    pub duration_ns: u32,
}

/// Runs program `prog_fd` once on `frame`.
pub fn run(prog_fd: RawFd, frame: &[u8]) -> Result<RunResult, SysError> {
    run_repeat(prog_fd, frame, 1)
}

/// Runs TC program `prog_fd` once on `frame` as a `CHECKSUM_COMPLETE` skb
/// (`sys::TEST_SKB_CHECKSUM_COMPLETE`, 6.17+): fails with `EBADMSG` when
/// the program leaves `skb->csum` wrong for the frame it leaves.
pub fn run_checksum_complete(prog_fd: RawFd, frame: &[u8]) -> Result<RunResult, SysError> {
    run_with(prog_fd, frame, 1, sys::TEST_SKB_CHECKSUM_COMPLETE)
}

/// Runs program `prog_fd` `repeat` times on `frame` (the kernel feeds each run
/// the output of the previous one for programs that rewrite in place).
pub fn run_repeat(prog_fd: RawFd, frame: &[u8], repeat: u32) -> Result<RunResult, SysError> {
    run_with(prog_fd, frame, repeat, 0)
}

/// Runs TC program `prog_fd` once on `frame` as if it arrived on interface
/// `ifindex` of the calling thread's network namespace (the skb's device:
/// what the program reads as `skb->ifindex`, and the input of its FIB
/// lookups).
pub fn run_on(prog_fd: RawFd, frame: &[u8], ifindex: u32) -> Result<RunResult, SysError> {
    // struct __sk_buff up to `ifindex` (offset 40): the fields before it
    // must be zero.
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    run_ctx(prog_fd, frame, 1, 0, &ctx)
}

/// Runs XDP program `prog_fd` once on `frame` as if it arrived on
/// interface `ifindex` of the calling thread's network namespace (queue
/// 0): the input of its FIB lookups, and where `XDP_TX` would send it.
/// Kernels before 5.15 refuse the context.
pub fn run_xdp_on(prog_fd: RawFd, frame: &[u8], ifindex: u32) -> Result<RunResult, SysError> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex; data_end must be the frame's length.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    run_ctx(prog_fd, frame, 1, 0, &ctx)
}

/// BPF_PROG_TEST_RUN with `BPF_F_TEST_*` `flags`.
fn run_with(prog_fd: RawFd, frame: &[u8], repeat: u32, flags: u32) -> Result<RunResult, SysError> {
    run_ctx(prog_fd, frame, repeat, flags, &[])
}

/// BPF_PROG_TEST_RUN with `BPF_F_TEST_*` `flags` and the context `ctx`.
fn run_ctx(prog_fd: RawFd, frame: &[u8], repeat: u32, flags: u32, ctx: &[u8]) -> Result<RunResult, SysError> {
    // Room for programs that grow the frame (encapsulation, rejects).
    let mut out = vec![0u8; frame.len() + 512];
    // SAFETY: the caller holds the program's fd open for the call.
    let prog = unsafe { BorrowedFd::borrow_raw(prog_fd) };
    let r = sys::prog_test_run_ctx(prog, frame, &mut out, repeat, flags, ctx)?;
    out.truncate(r.size_out);
    Ok(RunResult {
        retval: r.retval,
        data: out,
        duration_ns: r.duration_ns,
    })
}
