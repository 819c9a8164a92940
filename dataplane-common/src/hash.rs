//! The flow hash both sides compute: the datapath to pick a Maglev slot,
//! the agent (and `trace`) to explain the pick.

use crate::*;

/// The hash that picks a backend for a new flow, from the original 5-tuple
/// (fields in network byte order, as in `CtKey`; addresses folded with
/// [`fold_addr`], see [`flow_hash_key`]). Shared so that the agent
/// (`trace`, tests) predicts exactly what the datapath chooses.
///
/// A multiply-xorshift mix: cheap in eBPF (no loops), and well spread in its
/// low bits, which the modulo by the backend count uses.
#[inline(always)]
pub fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h: u64 = ((saddr as u64) << 32) | daddr as u64;
    h ^= ((sport as u64) << 24) ^ ((dport as u64) << 8) ^ proto as u64;
    h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 32;
    h as u32
}

/// [`flow_hash`] of a conntrack key (either family).
#[inline(always)]
pub fn flow_hash_key(k: &CtKey) -> u32 {
    flow_hash(fold_addr(&k.saddr), fold_addr(&k.daddr), k.sport, k.dport, k.proto)
}
