//! The benchmark programs (`dataplane-ebpf/src/bin/bench.rs` and
//! `baseline.rs`), built next to the dataplane but never loaded by the agent.
//!
//! BPF_PROG_TEST_RUN with `repeat > 1` runs a program again on its own
//! output. The bench wrapper therefore copies a template frame over the
//! packet at the start of every run (optionally varying the flow or the
//! Service) and then runs the datapath; the same copy without the datapath
//! is measured on its own and subtracted.

use bytemuck::{Pod, Zeroable};

/// Every bench frame is exactly this long (headers plus padding
/// payload; an IPv6 TCP frame needs 74).
pub const FRAME_LEN: usize = 96;
/// Offsets of the fields the wrapper varies, Ethernet + IPv4 without
/// options: (source address, destination address, source port,
/// destination port); for IPv6 the low 32-bit word of each address.
pub const OFFSETS_V4: [u32; 4] = [26, 30, 34, 36];
pub const OFFSETS_V6: [u32; 4] = [14 + 8 + 12, 14 + 24 + 12, 54, 56];

/// Every run gets a new source address/port: every run is a new flow.
pub const VARY_FLOW: u32 = 1;
/// Run `n` goes to Service `n % services` (see `service_frontend`).
pub const VARY_SERVICE: u32 = 2;

/// Services of the per-packet benchmark: VIP 198.19.0.0 + (i mod 65536),
/// port 80 + i / 65536, so that 100,000 of them stay in 198.19.0.0/16.
pub const fn service_frontend(i: u32) -> (u32, u16) {
    (0xc613_0000 + (i & 0xffff), 80 + (i >> 16) as u16)
}

/// Value of `BENCH_FRAME[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BenchFrame {
    /// `VARY_*` bits.
    pub vary: u32,
    /// How many Services `VARY_SERVICE` walks over (at least 1).
    pub services: u32,
    /// Where the varied fields are: `OFFSETS_V4` or `OFFSETS_V6`.
    pub offsets: [u32; 4],
    pub bytes: [u8; FRAME_LEN],
}

pub mod names {
    /// Array, one `BenchFrame`.
    pub const FRAME: &str = "BENCH_FRAME";
    /// Array, one u64: the run counter that drives the variations (not
    /// per-CPU: runs that migrate between CPUs must not repeat tuples).
    pub const SEQ: &str = "BENCH_SEQ";
    /// The baseline's own service map (same key, value and size as
    /// `DP_SERVICES`).
    pub const BASELINE_SERVICES: &str = "BL_SERVICES";
    /// XDP: returns XDP_PASS.
    pub const EMPTY: &str = "bl_empty";
    /// XDP: parses and looks the destination up in `BL_SERVICES`.
    pub const PARSE_LOOKUP: &str = "bl_parse_lookup";
    /// XDP/TC: restores (and varies) the frame, then runs the datapath.
    pub const WRAP_XDP: &str = "bench_xdp";
    pub const WRAP_TC: &str = "bench_tc";
    /// XDP/TC: only restores (and varies) the frame.
    pub const FRAME_XDP: &str = "bench_frame_xdp";
    pub const FRAME_TC: &str = "bench_frame_tc";
}
