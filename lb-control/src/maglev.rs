//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), the table the
//! datapath will index by a flow hash: every backend fills the table along
//! its own permutation, in turns, so shares are balanced to within one slot
//! and removing one of N backends moves little more than the 1/N of slots
//! it held. The datapath integration (per-service tables in a map-in-map,
//! `--lb-algorithm maglev`) is the XDP/Maglev issue's next step.

/// Cilium's default table size: prime, ~100x the backends a service has.
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;

/// Stable 64-bit hash (FNV-1a with a seed, then a murmur3-style finalizer):
/// the same backend gets the same permutation in every agent and version.
fn hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

pub fn is_prime(n: u32) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

/// The lookup table: `size` slots, each the index of a backend in
/// `backends` (identified by stable bytes, e.g. "ip:port"). `size` must be
/// prime and larger than the number of backends.
pub fn table(backends: &[Vec<u8>], size: u32) -> Vec<u32> {
    assert!(is_prime(size), "maglev table size {size} is not prime");
    let n = backends.len();
    if n == 0 {
        return Vec::new();
    }
    let m = size as u64;
    let (offset, skip): (Vec<u64>, Vec<u64>) = backends
        .iter()
        .map(|b| (hash(0x5eed_0001, b) % m, hash(0x5eed_0002, b) % (m - 1) + 1))
        .unzip();
    let mut next = vec![0u64; n];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'fill: loop {
        for i in 0..n {
            // Backend i's next preferred slot that is still free.
            let mut slot = (offset[i] + next[i] * skip[i]) % m;
            while table[slot as usize] != u32::MAX {
                next[i] += 1;
                slot = (offset[i] + next[i] * skip[i]) % m;
            }
            table[slot as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("198.18.{}.{}:80", i / 250, i % 250 + 1).into_bytes())
            .collect()
    }

    #[test]
    fn every_slot_is_filled_with_balanced_shares() {
        for (n, size) in [(1, 251), (3, 251), (10, DEFAULT_TABLE_SIZE), (100, DEFAULT_TABLE_SIZE)] {
            let t = table(&backends(n), size);
            assert_eq!(t.len(), size as usize);
            let mut shares = vec![0u32; n];
            for &b in &t {
                shares[b as usize] += 1;
            }
            let (min, max) = (*shares.iter().min().unwrap(), *shares.iter().max().unwrap());
            // Turn-based filling: shares differ by at most one slot.
            assert!(max - min <= 1, "n={n}: shares {min}..{max}");
        }
    }

    #[test]
    fn removing_one_backend_moves_about_one_nth_of_the_slots() {
        for n in [5usize, 10, 50] {
            let all = backends(n);
            let before = table(&all, DEFAULT_TABLE_SIZE);
            let removed = n / 2;
            let rest: Vec<Vec<u8>> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != removed)
                .map(|(_, b)| b.clone())
                .collect();
            let after = table(&rest, DEFAULT_TABLE_SIZE);
            // Compare by backend identity, not index.
            let name = |t: &[u32], set: &[Vec<u8>], slot: usize| set[t[slot] as usize].clone();
            let moved = (0..DEFAULT_TABLE_SIZE as usize)
                .filter(|&s| name(&before, &all, s) != all[removed] && name(&before, &all, s) != name(&after, &rest, s))
                .count();
            let kept_slots = DEFAULT_TABLE_SIZE as usize - DEFAULT_TABLE_SIZE as usize / n;
            let disruption = moved as f64 / kept_slots as f64;
            eprintln!(
                "maglev: removing 1 of {n} backends moved {:.2}% of the other backends' slots",
                disruption * 100.0
            );
            // The paper reports a few percent; the removed backend's own
            // 1/n must move, the rest should mostly stay.
            assert!(
                disruption < 0.1,
                "n={n}: {:.1}% of surviving slots moved",
                disruption * 100.0
            );
        }
    }

    #[test]
    fn same_backends_give_the_same_table() {
        assert_eq!(table(&backends(7), 251), table(&backends(7), 251));
        assert!(is_prime(DEFAULT_TABLE_SIZE) && !is_prime(16_384));
    }
}
