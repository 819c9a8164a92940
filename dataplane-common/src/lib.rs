//! The kernel/user ABI of the dataplane.
//!
//! Every BPF map key and value, every map name and size, every flag bit and
//! every counter index that the eBPF programs (`dataplane-ebpf`) and the agent
//! (`dataplane-user`) share is defined here and nowhere else. All types are
//! `#[repr(C)]` plain data with explicit padding so that their layout is the
//! same on both sides; `tests` below pin sizes and field offsets.
//!
//! Byte order: addresses and ports are stored in **network byte order**
//! exactly as they appear in packets (the datapath compares them without
//! swapping). Use the constructors on the user side, which take host-order
//! values.
//!
//! Both address families share every map and every code path: an address is
//! an [`Addr`] of 16 bytes, an IPv4 address in its first 4 bytes and zeros
//! after; keys that could otherwise collide across families (service and
//! conntrack keys) carry the family ([`FAMILY_V4`] / [`FAMILY_V6`]). Values
//! reached through such a key (a service's backends, its affinity and
//! source-range entries) are of the key's family.
#![no_std]

/// Bumped whenever a map layout below changes in an incompatible way.
pub const ABI_VERSION: u32 = 2;

/// IP protocol numbers used in keys.
pub const IPPROTO_TCP: u8 = 6;

pub const IPPROTO_UDP: u8 = 17;

pub const IPPROTO_ICMP: u8 = 1;

pub const IPPROTO_ICMPV6: u8 = 58;

/// Address family tags in keys (the IP version number).
pub const FAMILY_V4: u8 = 4;

pub const FAMILY_V6: u8 = 6;

/// An IPv4 or IPv6 address as four 32-bit words in network byte order, as
/// the bytes appear in a packet. IPv4: word 0, words 1-3 zero.
pub type Addr = [u32; 4];

/// The IPv4 address `a` (network order) as an [`Addr`].
#[inline(always)]
pub const fn v4_addr(a: u32) -> Addr {
    [a, 0, 0, 0]
}

/// `a == b`, word by word (no `memcmp`, which eBPF does not have).
#[inline(always)]
pub const fn addr_eq(a: &Addr, b: &Addr) -> bool {
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0
}

/// The four words of `a` folded into one (XOR). For an IPv4 [`Addr`] this is
/// the IPv4 address itself.
#[inline(always)]
pub const fn fold_addr(a: &Addr) -> u32 {
    a[0] ^ a[1] ^ a[2] ^ a[3]
}

mod config;
mod conntrack;
mod endpoint;
mod hash;
mod names;
mod reason;
mod service;
mod sock;

pub mod csum;
pub mod limits;

#[cfg(feature = "bench")]
pub mod bench;

pub use config::*;
pub use conntrack::*;
pub use endpoint::*;
pub use hash::*;
pub use names::*;
pub use reason::*;
pub use service::*;
pub use sock::*;

#[cfg(feature = "user")]
pub use user::{addr_of, family_of, ip_of};

#[cfg(feature = "user")]
pub mod user;

#[cfg(test)]
mod tests;
