//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! Each backend walks the lookup table in its own permutation (offset, skip)
//! and the backends take turns claiming their next free entry. The result is
//! an almost even split, and adding or removing a backend moves little more
//! than that backend's own share, so new flows keep landing where similar
//! flows went before. Existing flows never consult the table again: the flow
//! table pins their backend.

use std::net::IpAddr;

/// Lookup table size: a prime well above 100 x the largest backend count.
pub const TABLE_SIZE: usize = 65_537;

/// A populated Maglev lookup table over a list of backends.
#[derive(Debug, Clone)]
pub struct Maglev {
    table: Box<[u16]>,
}

fn hash_with(seed: u64, ip: IpAddr) -> u64 {
    // A fixed-key hash: the table must be the same in every run and process.
    let h = ahash::RandomState::with_seeds(seed, 0x9e37_79b9_7f4a_7c15, 0xbf58_476d_1ce4_e5b9, 0x94d0_49bb_1331_11eb);
    // An IPv4 backend hashes as its 32-bit number, as before IPv6 came:
    // a table built by an older process is the same table.
    match ip {
        IpAddr::V4(a) => h.hash_one(u32::from(a)),
        IpAddr::V6(a) => h.hash_one(u128::from(a)),
    }
}

impl Maglev {
    /// Builds the table. `backends` must not be empty and hold at most 65535.
    pub fn new(backends: &[IpAddr]) -> Maglev {
        Self::with_size(backends, TABLE_SIZE)
    }

    fn with_size(backends: &[IpAddr], m: usize) -> Maglev {
        assert!(!backends.is_empty() && backends.len() < usize::from(u16::MAX));
        let n = backends.len();
        let perms: Vec<(usize, usize)> = backends
            .iter()
            .map(|&b| {
                let offset = (hash_with(0x5eed_0001, b) % m as u64) as usize;
                let skip = (hash_with(0x5eed_0002, b) % (m as u64 - 1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0usize; n];
        let mut table = vec![u16::MAX; m];
        let mut filled = 0;
        'fill: loop {
            for i in 0..n {
                let (offset, skip) = perms[i];
                let mut c = (offset + next[i] * skip) % m;
                while table[c] != u16::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                table[c] = i as u16;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Maglev { table: table.into_boxed_slice() }
    }

    /// The backend index for a flow hash.
    #[inline]
    pub fn lookup(&self, flow_hash: u64) -> usize {
        usize::from(self.table[(flow_hash % self.table.len() as u64) as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn backends(n: u8) -> Vec<IpAddr> {
        (0..n).map(|i| Ipv4Addr::new(192, 168, 50, 10 + i).into()).collect()
    }

    #[test]
    fn spreads_evenly() {
        let m = Maglev::new(&backends(5));
        let mut count = [0usize; 5];
        for &b in m.table.iter() {
            count[usize::from(b)] += 1;
        }
        let even = TABLE_SIZE / 5;
        for c in count {
            assert!(c.abs_diff(even) < even / 50, "{count:?}");
        }
    }

    #[test]
    fn removing_a_backend_moves_little_else() {
        let all = backends(6);
        let before = Maglev::new(&all);
        let mut fewer = all.clone();
        let gone = fewer.remove(2);
        let after = Maglev::new(&fewer);
        let (mut kept, mut moved) = (0usize, 0usize);
        for i in 0..TABLE_SIZE {
            let b = all[usize::from(before.table[i])];
            if b == gone {
                continue;
            }
            if fewer[usize::from(after.table[i])] == b {
                kept += 1;
            } else {
                moved += 1;
            }
        }
        // Entries of surviving backends should almost all stay put.
        assert!(moved * 100 < (kept + moved) * 3, "moved {moved} of {}", kept + moved);
    }

    #[test]
    fn adding_a_backend_takes_about_its_share() {
        let few = backends(4);
        let mut more = few.clone();
        more.push(Ipv4Addr::new(192, 168, 50, 99).into());
        let (a, b) = (Maglev::new(&few), Maglev::new(&more));
        let changed =
            (0..TABLE_SIZE).filter(|&i| few[usize::from(a.table[i])] != more[usize::from(b.table[i])]).count();
        let share = TABLE_SIZE / 5;
        assert!(changed >= share && changed < share + share / 5, "changed {changed}, share {share}");
    }

    #[test]
    fn single_backend_owns_everything() {
        let m = Maglev::new(&backends(1));
        assert!((0..1000u64).all(|h| m.lookup(h) == 0));
    }
}
