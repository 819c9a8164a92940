//! BPF_PROG_TEST_RUN: runs a loaded program on a crafted frame, without
//! attaching it anywhere. Used by the tests, and by `trace`.
//!
//! aya has no wrapper for this command, so it is a direct bpf(2) call.

use std::os::fd::RawFd;

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h). Fields
/// after `ctx_out` are left out; the kernel zero-fills a shorter attr.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
}

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
pub fn run(prog_fd: RawFd, frame: &[u8]) -> std::io::Result<RunResult> {
    run_repeat(prog_fd, frame, 1)
}

/// Runs program `prog_fd` `repeat` times on `frame` (the kernel feeds each run
/// the output of the previous one for programs that rewrite in place).
pub fn run_repeat(prog_fd: RawFd, frame: &[u8], repeat: u32) -> std::io::Result<RunResult> {
    // Room for programs that grow the frame (encapsulation, rejects).
    let mut out = vec![0u8; frame.len() + 512];
    let mut attr = TestRunAttr {
        prog_fd: prog_fd as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: attr points at a live, correctly laid out struct for the
    // duration of the call; data_in/data_out point at buffers of the sizes
    // given, which outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok(RunResult {
        retval: attr.retval,
        data: out,
        duration_ns: attr.duration,
    })
}
