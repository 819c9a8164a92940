//! Expectations about backend selection computed without the agent's code:
//! a second Maglev implementation written from the paper (Eisenbud et al.,
//! "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI 2016,
//! section 3.4, Pseudocode 1) and the contract the agent documents for its
//! inputs, and a second flow hash written from its documented definition.
//!
//! The Maglev table and the flow hash are part of the contract between
//! nodes and releases: every node of a cluster, and every release during a
//! rolling update, must send a flow to the same backend. The tests compare
//! the agent with this module over many inputs, and this module with fixed
//! vectors that must never change.

use dataplane_common::Backend;

/// The contract's backend identity: the 16 address bytes (the four `u32`
/// words of `Backend::addr` as stored, network order) then the port as
/// stored (network order), 18 bytes.
pub fn identity(b: &Backend) -> Vec<u8> {
    let mut id: Vec<u8> = b.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
    id.extend_from_slice(&b.port.to_ne_bytes());
    id
}

/// The contract's 64-bit hash: FNV-1a (offset basis 0xcbf29ce484222325
/// xor the seed, prime 0x100000001b3) followed by the first half of
/// MurmurHash3's 64-bit finalizer (xorshift 33, multiply by
/// 0xff51afd7ed558ccd, xorshift 33).
pub fn hash64(data: &[u8], seed: u64) -> u64 {
    const FNV_OFFSET: u64 = 14_695_981_039_346_656_037;
    const FNV_PRIME: u64 = 1_099_511_628_211;
    let h = data
        .iter()
        .fold(FNV_OFFSET ^ seed, |h, b| (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME));
    let h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// The contract's seeds for the permutation's offset and skip.
pub const OFFSET_SEED: u64 = 0x5eed_0001;
pub const SKIP_SEED: u64 = 0x5eed_0002;

/// Pseudocode 1 of the paper, with the backends taking turns in the order
/// of their identities (so the table does not depend on the order they are
/// listed in): entry `j` is the index in `backends` of the backend
/// position `j` maps to. Every backend's whole permutation is built first,
/// as in the paper (memory M x N: fine for tests).
pub fn maglev(backends: &[Backend], m: u32) -> Vec<u16> {
    if backends.is_empty() {
        return Vec::new();
    }
    let m = u64::from(m);
    let mut turns: Vec<usize> = (0..backends.len()).collect();
    turns.sort_by(|a, b| identity(&backends[*a]).cmp(&identity(&backends[*b])));
    let permutation: Vec<Vec<usize>> = turns
        .iter()
        .map(|i| {
            let id = identity(&backends[*i]);
            let offset = hash64(&id, OFFSET_SEED) % m;
            let skip = hash64(&id, SKIP_SEED) % (m - 1) + 1;
            (0..m).map(|j| ((offset + j * skip) % m) as usize).collect()
        })
        .collect();
    let mut next = vec![0usize; turns.len()];
    let mut entry: Vec<Option<u16>> = vec![None; m as usize];
    let mut n = 0;
    loop {
        for (t, backend) in turns.iter().enumerate() {
            let mut c = permutation[t][next[t]];
            while entry[c].is_some() {
                next[t] += 1;
                c = permutation[t][next[t]];
            }
            entry[c] = Some(*backend as u16);
            next[t] += 1;
            n += 1;
            if n == m as usize {
                return entry.into_iter().map(|e| e.expect("every position filled")).collect();
            }
        }
    }
}

/// The contract's flow hash: the 64-bit word (source address << 32 |
/// destination address), xored with (source port << 24) ^ (destination
/// port << 8) ^ protocol, then multiplied by 0x9E3779B97F4A7C15, xorshift 29,
/// multiplied by 0xBF58476D1CE4E5B9, xorshift 32, truncated to 32 bits.
/// Addresses are folded to 32 bits (the xor of their four words) and every
/// field is as stored in the packet (network order, read as a native
/// integer).
pub fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let x = (u64::from(saddr) << 32 | u64::from(daddr))
        ^ (u64::from(sport) << 24)
        ^ (u64::from(dport) << 8)
        ^ u64::from(proto);
    let x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let x = (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x ^ (x >> 32)) as u32
}

/// An address as the datapath folds it for the flow hash: the xor of its
/// four stored words (an IPv4 address: its one word).
pub fn fold(addr: std::net::IpAddr) -> u32 {
    match addr {
        std::net::IpAddr::V4(a) => u32::from_ne_bytes(a.octets()),
        std::net::IpAddr::V6(a) => a
            .octets()
            .chunks(4)
            .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
            .fold(0, |x, w| x ^ w),
    }
}

/// The backend a new flow must go to, by this module alone.
pub fn expected(
    backends: &[Backend],
    m: u32,
    src: (std::net::IpAddr, u16),
    dst: (std::net::IpAddr, u16),
    proto: u8,
) -> Backend {
    let h = flow_hash(fold(src.0), fold(dst.0), src.1.to_be(), dst.1.to_be(), proto);
    backends[maglev(backends, m)[(h % m) as usize] as usize]
}

/// FNV-1a (32 bit) of a table's entries as little-endian u16: a short
/// fingerprint for fixed vectors.
pub fn fingerprint(table: &[u16]) -> u32 {
    table
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}
