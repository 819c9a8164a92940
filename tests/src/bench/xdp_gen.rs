//! Two tiny XDP programs for the NodePort part, written as raw
//! instructions (loaded with `bpf::sys::prog_load`, no object file):
//!
//! - [`tx_program`]: writes the frame's headers from a template, gives
//!   the UDP datagram a random source port of a range (one of `flows`
//!   flows) and returns `XDP_TX`. Run with `BPF_PROG_TEST_RUN` in
//!   live-frames mode on the client's veth, it is the NIC-like generator:
//!   every run's frame leaves the client's veth as an XDP frame, so the
//!   node's veth receives it as a driver hands a NIC's frame to XDP (no
//!   skb, no copy), instead of an skb sent by a socket. The headers are
//!   written on every run because live frames are recycled pages: a frame
//!   the node forwarded and a sink dropped comes back to the generator's
//!   pool as the node left it (addresses translated, MAC addresses and
//!   TTL rewritten), and the kernel does not copy the input frame into it
//!   again. The template's UDP checksum must be 0 (none, valid for IPv4):
//!   the program does not update it.
//! - [`sink_program`]: on a backend's interface, drops (`XDP_DROP`) IPv4
//!   UDP datagrams to one port and passes everything else. It stands in
//!   for a backend on another node: receiving there costs next to
//!   nothing, and the interface's `rx_queue_0_xdp_drops` counts exactly
//!   the datagrams that arrived translated to the backend's port.

use std::os::fd::{AsFd, OwnedFd};

use anyhow::{bail, Context, Result};
use dataplane::bpf::sys;

/// `XDP_DROP`, `XDP_PASS`, `XDP_TX`.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// One eBPF instruction as the kernel reads it: opcode, destination and
/// source registers, offset, immediate.
const fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    op as u64 | ((dst as u64 | (src as u64) << 4) << 8) | (off as u16 as u64) << 16 | (imm as u32 as u64) << 32
}

/// `BPF_ALU64 | BPF_MOV | BPF_K`: dst = imm.
const MOV_IMM: u8 = 0xb7;
/// `BPF_ALU64 | BPF_MOV | BPF_X`: dst = src.
const MOV_REG: u8 = 0xbf;
/// `BPF_ALU64 | BPF_ADD | BPF_K`: dst += imm.
const ADD_IMM: u8 = 0x07;
/// `BPF_LDX | BPF_MEM | BPF_W / BPF_H / BPF_B`: dst = *(size *)(src + off).
const LDX_W: u8 = 0x61;
const LDX_H: u8 = 0x69;
const LDX_B: u8 = 0x71;
/// `BPF_JMP | BPF_JGT | BPF_X`: if dst > src, pc += off.
const JGT_REG: u8 = 0x2d;
/// `BPF_JMP | BPF_JNE | BPF_K`: if dst != imm, pc += off.
const JNE_IMM: u8 = 0x55;
/// `BPF_JMP | BPF_EXIT`.
const EXIT: u8 = 0x95;
/// `BPF_JMP | BPF_CALL`: call helper `imm`.
const CALL: u8 = 0x85;
/// `BPF_ALU64 | BPF_MOD | BPF_K`: dst %= imm (unsigned).
const MOD_IMM: u8 = 0x97;
/// `BPF_ALU | BPF_END | BPF_TO_BE`: dst = htobe`imm`(dst).
const TO_BE: u8 = 0xdc;
/// `BPF_STX | BPF_MEM | BPF_H` / `BPF_DW`: *(size *)(dst + off) = src.
const STX_H: u8 = 0x6b;
const STX_DW: u8 = 0x7b;
/// `BPF_ST | BPF_MEM | BPF_H`: *(u16 *)(dst + off) = imm.
const ST_H: u8 = 0x6a;
/// `BPF_LD | BPF_IMM | BPF_DW`: dst = a 64-bit immediate, over two
/// instruction slots (the second holds the upper half).
const LD_IMM64: u8 = 0x18;
/// `BPF_FUNC_get_prandom_u32`.
const GET_PRANDOM_U32: i32 = 7;

/// The UDP source port's offset in an Ethernet/IPv4 (no options) frame.
const UDP_SPORT: i16 = 14 + 20;
/// Ethernet, IPv4 without options and UDP headers.
pub const HEADERS: usize = 14 + 20 + 8;

/// Writes `headers` (Ethernet, IPv4 without options, UDP) over the
/// frame's, sets the UDP source port to `first_port + random % flows` and
/// returns `XDP_TX`; a frame shorter than the headers is sent as it is.
pub fn tx_program(headers: &[u8; HEADERS], first_port: u16, flows: u16) -> Vec<u64> {
    assert!(flows > 0 && u32::from(first_port) + u32::from(flows) <= 65536);
    let mut p = vec![
        insn(MOV_REG, 6, 1, 0, 0),            // r6 = ctx
        insn(CALL, 0, 0, 0, GET_PRANDOM_U32), // r0 = random
        insn(LDX_W, 2, 6, 0, 0),              // r2 = ctx->data
        insn(LDX_W, 3, 6, 4, 0),              // r3 = ctx->data_end
        insn(MOV_REG, 4, 2, 0, 0),            // r4 = data
        insn(ADD_IMM, 4, 0, 0, HEADERS as i32),
        0, // too short: to `r0 = XDP_TX` (the offset is known below)
    ];
    let check = p.len() - 1;
    // The headers, 8 bytes at a time (r1 = the bytes, then stored), the
    // last 2 with an immediate store.
    let (words, tail) = headers.split_at(HEADERS / 8 * 8);
    for (i, w) in words.chunks(8).enumerate() {
        let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        p.push(insn(LD_IMM64, 1, 0, 0, v as u32 as i32));
        p.push(insn(0, 0, 0, 0, (v >> 32) as u32 as i32));
        p.push(insn(STX_DW, 2, 1, (i * 8) as i16, 0));
    }
    let t = i32::from(u16::from_le_bytes([tail[0], tail[1]]));
    p.push(insn(ST_H, 2, 0, (HEADERS - 2) as i16, t));
    p.extend([
        insn(MOD_IMM, 0, 0, 0, i32::from(flows)),      // r0 %= flows
        insn(ADD_IMM, 0, 0, 0, i32::from(first_port)), // r0 += first_port
        insn(TO_BE, 0, 0, 0, 16),                      // network order
        insn(STX_H, 2, 0, UDP_SPORT, 0),               // source port = r0
    ]);
    let tx = p.len();
    p[check] = insn(JGT_REG, 4, 3, (tx - check - 1) as i16, 0);
    p.extend([insn(MOV_IMM, 0, 0, 0, XDP_TX as i32), insn(EXIT, 0, 0, 0, 0)]);
    p
}

/// `XDP_DROP` for an IPv4 (no options) UDP datagram to `port` in an
/// Ethernet frame, `XDP_PASS` for anything else.
pub fn sink_program(port: u16) -> Vec<u64> {
    // Multi-byte fields are read as the little-endian machine reads them.
    let ethertype_ipv4 = i32::from(u16::from_le_bytes(0x0800u16.to_be_bytes()));
    let dport = i32::from(u16::from_le_bytes(port.to_be_bytes()));
    // Each `JNE`/`JGT` jumps to the last instruction (`exit` with r0 =
    // XDP_PASS); `off` counts from the next instruction.
    let prog = [
        insn(LDX_W, 2, 1, 0, 0),                 // 0: r2 = ctx->data
        insn(LDX_W, 3, 1, 4, 0),                 // 1: r3 = ctx->data_end
        insn(MOV_IMM, 0, 0, 0, XDP_PASS as i32), // 2: r0 = XDP_PASS
        insn(MOV_REG, 4, 2, 0, 0),               // 3: r4 = data
        insn(ADD_IMM, 4, 0, 0, 14 + 20 + 8),     // 4: r4 += Ethernet + IPv4 + UDP
        insn(JGT_REG, 4, 3, 9, 0),               // 5: too short: pass
        insn(LDX_H, 5, 2, 12, 0),                // 6: r5 = EtherType
        insn(JNE_IMM, 5, 0, 7, ethertype_ipv4),  // 7: not IPv4: pass
        insn(LDX_B, 5, 2, 14, 0),                // 8: r5 = version, IHL
        insn(JNE_IMM, 5, 0, 5, 0x45),            // 9: options or not v4: pass
        insn(LDX_B, 5, 2, 14 + 9, 0),            // 10: r5 = protocol
        insn(JNE_IMM, 5, 0, 3, 17),              // 11: not UDP: pass
        insn(LDX_H, 5, 2, 14 + 20 + 2, 0),       // 12: r5 = UDP destination port
        insn(JNE_IMM, 5, 0, 1, dport),           // 13: another port: pass
        insn(MOV_IMM, 0, 0, 0, XDP_DROP as i32), // 14: r0 = XDP_DROP
        insn(EXIT, 0, 0, 0, 0),                  // 15
    ];
    prog.to_vec()
}

/// Loads an XDP program made of raw instructions.
pub fn load(name: &str, insns: &[u64]) -> Result<OwnedFd> {
    sys::prog_load(sys::PROG_TYPE_XDP, name, insns).with_context(|| format!("loading the XDP program {name}"))
}

/// `XDP_FLAGS_DRV_MODE`: native (driver) mode, refused where the driver
/// has none.
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// Attaches XDP program `prog` in native mode to interface `ifindex` of
/// the calling thread's namespace, for as long as the returned link is
/// open.
pub fn attach_native(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    sys::link_create(prog.as_fd(), ifindex, sys::ATTACH_TYPE_XDP, XDP_FLAGS_DRV_MODE)
        .with_context(|| format!("attaching an XDP program to interface {ifindex}"))
}

/// The `struct xdp_md` of a run on interface `ifindex` (queue 0) of a
/// frame of `len` bytes.
fn xdp_md(len: usize, ifindex: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// Sends `count` copies of `frame` out of interface `ifindex` of the
/// calling thread's namespace: the live-frames run of [`tx_program`]
/// (`prog`). Frames the interface's peer cannot take are dropped by the
/// kernel.
pub fn send_live(prog: &OwnedFd, ifindex: u32, frame: &[u8], count: u32) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let ctx = xdp_md(frame.len(), ifindex);
    sys::prog_test_run_live(prog.as_fd(), frame, &ctx, count, 0)
        .context("BPF_PROG_TEST_RUN in live-frames mode (kernel 5.18 or later)")
}

/// `rx_queue_0_xdp_drops` of `iface` (`ethtool -S`) in namespace `ns`:
/// what a [`sink_program`] on it dropped.
pub fn xdp_drops(ns: &crate::netns::Netns, iface: &str) -> Result<u64> {
    let out = ns.exec(&["ethtool", "-S", iface])?;
    for l in out.lines() {
        if let Some(v) = l.trim().strip_prefix("rx_queue_0_xdp_drops:") {
            return v.trim().parse().with_context(|| format!("ethtool -S {iface}: {l}"));
        }
    }
    bail!("ethtool -S {iface}: no rx_queue_0_xdp_drops in {out:?}")
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use dataplane::bpf::testrun;

    use super::*;
    use crate::packet::{Frame, SYN};

    fn run(prog: &OwnedFd, frame: &[u8]) -> u32 {
        use std::os::fd::AsRawFd;
        testrun::run(prog.as_raw_fd(), frame).expect("BPF_PROG_TEST_RUN").retval
    }

    const A: (Ipv4Addr, u16) = (Ipv4Addr::new(198, 18, 100, 2), 40000);
    const B: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

    #[test]
    fn the_sink_drops_udp_to_its_port_and_passes_everything_else() {
        crate::netns::require_root_and_tools();
        let sink = load("test_sink", &sink_program(8080)).unwrap();
        let udp = Frame::udp(A, (B, 8080), b"x").build();
        assert_eq!(run(&sink, &udp), XDP_DROP);
        assert_eq!(run(&sink, &Frame::udp(A, (B, 8081), b"x").build()), XDP_PASS);
        // The port's bytes swapped (0x901f): not the same port.
        assert_eq!(run(&sink, &Frame::udp(A, (B, 0x901f), b"x").build()), XDP_PASS);
        assert_eq!(run(&sink, &Frame::tcp(A, (B, 8080), SYN).build()), XDP_PASS);
        // Not IPv4: the EtherType byte changed.
        let mut arp = udp.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(run(&sink, &arp), XDP_PASS);
        // IPv4 with options (IHL 6): passed, not parsed.
        let mut opts = udp.clone();
        opts[14] = 0x46;
        assert_eq!(run(&sink, &opts), XDP_PASS);
        // Too short to hold the UDP header.
        assert_eq!(run(&sink, &udp[..14 + 20 + 4]), XDP_PASS);
    }

    #[test]
    fn the_generator_program_restores_the_headers_and_picks_a_port_of_its_range() {
        use std::os::fd::AsRawFd;
        crate::netns::require_root_and_tools();
        let (first, flows) = (40000u16, 4u16);
        let mut frame = Frame::udp(A, (B, 80), b"payload").build();
        frame[0..12].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        frame[40..42].copy_from_slice(&[0, 0]);
        let headers: [u8; HEADERS] = frame[..HEADERS].try_into().unwrap();
        let tx = load("test_tx", &tx_program(&headers, first, flows)).unwrap();
        // A frame as the node leaves it: other MAC addresses, TTL,
        // addresses, ports, checksums; the payload is not touched.
        let mut forwarded = Frame::udp((B, 8080), (Ipv4Addr::new(198, 18, 1, 1), 1024), b"payload").build();
        forwarded[0..12].fill(0xee);
        forwarded[22] = 7;
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200 {
            let input = if i % 2 == 0 { &frame } else { &forwarded };
            let r = testrun::run(tx.as_raw_fd(), input).unwrap();
            assert_eq!(r.retval, XDP_TX);
            // The template's headers, with a source port of the range.
            let port = u16::from_be_bytes([r.data[34], r.data[35]]);
            assert!((first..first + flows).contains(&port), "port {port}");
            let mut same = r.data.clone();
            same[34..36].copy_from_slice(&frame[34..36]);
            assert_eq!(same, frame);
            seen.insert(port);
        }
        // 200 draws of 4 ports: each one is seen (all but surely).
        assert_eq!(seen.len(), 4);
        // Too short for a UDP header: sent unchanged.
        let short = &frame[..14 + 20 + 4];
        let r = testrun::run(tx.as_raw_fd(), short).unwrap();
        assert_eq!((r.retval, &r.data[..]), (XDP_TX, short));
    }
}
