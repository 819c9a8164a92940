//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), computed in
//! userspace and read by the datapath.
//!
//! Each backend gets a permutation of the table's positions derived from its
//! own identity (address and port), and backends take turns claiming their
//! next free position. Two properties follow, both tested below:
//! - balance: every backend owns `M/N` or `M/N + 1` positions;
//! - minimal disruption: when one backend is added or removed, only about
//!   `1/N` of the positions change owner, so most new flows keep going where
//!   they would have gone.
//!
//! The permutations depend on backend identities only, never on their order,
//! so a restarted agent computes exactly the same table.

use dataplane_common::Backend;

/// Table sizes the agent accepts: primes (Maglev needs a prime size for the
/// permutations to cover every position).
pub const SIZES: &[u32] = &[251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];

/// The default: balanced within 1 % up to 10 backends, within 10 % up to 100.
pub const DEFAULT_SIZE: u32 = 1021;

/// Table positions per backend a frontend gets at least once it has more
/// backends than the configured size serves (up to the largest size):
/// each backend then owns 6 or 7 positions, a spread of at most 1/6.
pub const MIN_POSITIONS_PER_BACKEND: u32 = 6;

/// The table size of a frontend with `n` backends under the configured
/// `size`: `size` itself while every backend gets a position (`n <= size`;
/// the tables of earlier releases, unchanged), else the smallest of
/// [`SIZES`] with at least [`MIN_POSITIONS_PER_BACKEND`] positions per
/// backend, or the largest.
pub fn size_for(size: u32, n: usize) -> u32 {
    if n as u64 <= size as u64 {
        return size;
    }
    let want = n as u64 * MIN_POSITIONS_PER_BACKEND as u64;
    SIZES
        .iter()
        .copied()
        .find(|s| *s as u64 >= want && *s >= size)
        .unwrap_or(SIZES[SIZES.len() - 1])
}

/// FNV-1a, 64 bit, with a final avalanche: stable across runs and versions
/// (std's hashers are not).
fn hash64(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

fn identity(b: &Backend) -> [u8; 18] {
    let mut id = [0u8; 18];
    for (i, w) in b.addr.iter().enumerate() {
        id[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    id[16..].copy_from_slice(&b.port.to_ne_bytes());
    id
}

/// The table for `backends`: entry `i` is the index into `backends` of the
/// backend that position `i` maps to. `size` must be one of [`SIZES`].
/// Empty when there are no backends.
pub fn table(backends: &[Backend], size: u32) -> Vec<u16> {
    assert!(
        SIZES.contains(&size),
        "maglev table size {size} is not one of {SIZES:?}"
    );
    assert!(backends.len() <= u16::MAX as usize);
    if backends.is_empty() {
        return Vec::new();
    }
    let m = size as u64;
    // Backends take turns in the order of their identities, so the table
    // does not depend on the order they were given in.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|i| identity(&backends[*i]));
    // Each backend walks its permutation `offset, offset + skip, ...` (mod
    // M): `pos` is where its walk is, advanced by one addition and at most
    // one subtraction (offset, skip < M) rather than a division per probe.
    let mut walks: Vec<(u16, u32, u32)> = order
        .iter()
        .map(|i| {
            let id = identity(&backends[*i]);
            let offset = hash64(&id, 0x5eed_0001) % m;
            let skip = hash64(&id, 0x5eed_0002) % (m - 1) + 1;
            (*i as u16, offset as u32, skip as u32)
        })
        .collect();
    let size = size as usize;
    let step = |pos: u32, skip: u32| {
        let next = pos + skip;
        if next >= m as u32 {
            next - m as u32
        } else {
            next
        }
    };
    const FREE: u16 = u16::MAX;
    let mut entries = vec![FREE; size];
    let mut filled = 0usize;
    // Each round gives every backend one position; M rounds at most, each
    // backend probing at most M positions in total: O(M * N) worst case.
    'fill: loop {
        for (backend, pos, skip) in walks.iter_mut() {
            while entries[*pos as usize] != FREE {
                *pos = step(*pos, *skip);
            }
            entries[*pos as usize] = *backend;
            *pos = step(*pos, *skip);
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    entries
}

/// Checks a configured size, with a message that names the accepted ones.
pub fn validate_size(size: u32) -> Result<u32, String> {
    if SIZES.contains(&size) {
        Ok(size)
    } else {
        Err(format!(
            "maglev table size {size} is not supported; use one of {SIZES:?} (primes)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn backends(n: usize) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend::new(Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250) as u8 + 1), 8080))
            .collect()
    }

    fn owners(t: &[u16], b: &[Backend]) -> Vec<Backend> {
        t.iter().map(|i| b[*i as usize]).collect()
    }

    /// The table as first written (a division per probe): the faster walk
    /// must give exactly the same tables, or a restarted agent would move
    /// flows of Services whose backends did not change.
    fn reference_table(backends: &[Backend], size: u32) -> Vec<u16> {
        if backends.is_empty() {
            return Vec::new();
        }
        let m = size as u64;
        let mut order: Vec<usize> = (0..backends.len()).collect();
        order.sort_by_key(|i| identity(&backends[*i]));
        let perms: Vec<(usize, u64, u64)> = order
            .iter()
            .map(|i| {
                let id = identity(&backends[*i]);
                (*i, hash64(&id, 0x5eed_0001) % m, hash64(&id, 0x5eed_0002) % (m - 1) + 1)
            })
            .collect();
        let mut entries = vec![u16::MAX; size as usize];
        let mut next = vec![0u64; backends.len()];
        let mut filled = 0usize;
        'fill: loop {
            for (turn, (backend, offset, skip)) in perms.iter().enumerate() {
                let mut c = (offset + next[turn] * skip) % m;
                while entries[c as usize] != u16::MAX {
                    next[turn] += 1;
                    c = (offset + next[turn] * skip) % m;
                }
                entries[c as usize] = *backend as u16;
                next[turn] += 1;
                filled += 1;
                if filled == size as usize {
                    break 'fill;
                }
            }
        }
        entries
    }

    #[test]
    fn table_equals_the_reference_computation() {
        for size in SIZES.iter().copied().filter(|s| *s <= 16381) {
            for n in [1, 2, 3, 4, 7, 10, 64, 300] {
                let mut b = backends(n);
                // Other ports too, and an unsorted order.
                b.iter_mut().step_by(3).for_each(|b| b.port = 9090);
                b.reverse();
                assert_eq!(table(&b, size), reference_table(&b, size), "n={n} size={size}");
            }
        }
    }

    #[test]
    fn every_backend_gets_its_share() {
        for (n, size) in [(3, 1021), (10, 1021), (100, 16381), (7, 251)] {
            let b = backends(n);
            let t = table(&b, size);
            assert_eq!(t.len(), size as usize);
            let mut counts = vec![0usize; n];
            for i in &t {
                counts[*i as usize] += 1;
            }
            let fair = size as usize / n;
            for c in &counts {
                assert!(*c == fair || *c == fair + 1, "n={n} size={size}: {counts:?}");
            }
        }
    }

    /// Frontends with more backends than the configured size get a larger
    /// table, so that every backend owns positions (6 or 7 each at 10,000
    /// backends), and frontends the configured size serves keep it.
    #[test]
    fn large_backend_sets_get_a_table_where_every_backend_has_positions() {
        assert_eq!(size_for(1021, 0), 1021);
        assert_eq!(size_for(1021, 1021), 1021);
        assert_eq!(size_for(1021, 1022), 8191);
        assert_eq!(size_for(1021, 2000), 16381);
        assert_eq!(size_for(1021, 10_000), 65521);
        assert_eq!(size_for(251, 300), 2039);
        assert_eq!(size_for(65521, 16_384), 65521);
        let n = 10_000;
        let b: Vec<Backend> = (0..n)
            .map(|i| Backend::new(Ipv4Addr::from(0xc612_0000u32 + i as u32), 8080))
            .collect();
        let size = size_for(DEFAULT_SIZE, n);
        let t = table(&b, size);
        let mut counts = vec![0usize; n];
        for i in &t {
            counts[*i as usize] += 1;
        }
        let fair = size as usize / n;
        assert_eq!(fair, 6);
        for (i, c) in counts.iter().enumerate() {
            assert!(*c == fair || *c == fair + 1, "backend {i}: {c} positions");
        }
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        let n = 10;
        let b = backends(n);
        let before = owners(&table(&b, 4093), &b);
        let mut fewer = b.clone();
        let removed = fewer.remove(4);
        let after = owners(&table(&fewer, 4093), &fewer);
        let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
        let owned_by_removed = before.iter().filter(|x| **x == removed).count();
        // The removed backend's positions must move; others mostly stay.
        let frac = moved as f64 / 4093.0;
        assert!(moved >= owned_by_removed);
        assert!(frac < 1.0 / n as f64 * 1.6, "moved {frac:.3} of the table");
        eprintln!(
            "remove 1 of {n}: {frac:.3} of positions moved (ideal {:.3})",
            1.0 / n as f64
        );
    }

    #[test]
    fn adding_one_moves_about_one_over_n_plus_one() {
        let b = backends(10);
        let before = owners(&table(&b, 4093), &b);
        let mut more = b.clone();
        more.push(Backend::new(Ipv4Addr::new(198, 18, 9, 9), 8080));
        let after = owners(&table(&more, 4093), &more);
        let frac = before.iter().zip(&after).filter(|(x, y)| x != y).count() as f64 / 4093.0;
        assert!(frac < 1.0 / 11.0 * 1.6, "moved {frac:.3}");
    }

    #[test]
    fn table_does_not_depend_on_backend_order() {
        let b = backends(5);
        let mut r = b.clone();
        r.reverse();
        assert_eq!(owners(&table(&b, 1021), &b), owners(&table(&r, 1021), &r));
    }

    #[test]
    fn sizes_are_prime_and_validated() {
        for s in SIZES {
            assert!(
                (2..*s).take_while(|d| d * d <= *s).all(|d| s % d != 0),
                "{s} is not prime"
            );
        }
        assert!(validate_size(1000).unwrap_err().contains("1021"));
        assert!(table(&[], 1021).is_empty());
    }
}
