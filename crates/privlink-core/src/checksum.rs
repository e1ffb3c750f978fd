//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! The translation path never recomputes a checksum over a payload: it records
//! which 16-bit words it changed in a [`Delta`] and applies `HC' = ~(~HC + ~m + m')`
//! (RFC 1624, eqn. 3) to each checksum that covers them. The full computation
//! here exists for building packets on slow paths (ICMP answers) and for tests.

/// Folds a ones'-complement accumulator to 16 bits with end-around carry.
#[inline]
pub fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Ones'-complement sum of `data` as big-endian 16-bit words (odd tail padded
/// with zero), not folded and not complemented.
pub fn sum(data: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// The checksum to write into a header whose covered bytes (checksum field
/// zeroed) are `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

/// Changed words, accumulated as `~m + m'` for RFC 1624's eqn. 3.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delta(u64);

impl Delta {
    /// Records that a 16-bit word changed from `old` to `new`.
    #[inline]
    pub fn word(&mut self, old: u16, new: u16) {
        self.0 += u64::from(!old) + u64::from(new);
    }

    /// Records that a 32-bit field (an IPv4 address) changed.
    #[inline]
    pub fn dword(&mut self, old: u32, new: u32) {
        self.word((old >> 16) as u16, (new >> 16) as u16);
        self.word(old as u16, new as u16);
    }

    /// Records that a 16-bit word left the sum (a pseudo-header field
    /// that the new header does not have: IPv6 to IPv4, RFC 7915 §5.3).
    #[inline]
    pub fn remove(&mut self, old: u16) {
        self.0 += u64::from(!old);
    }

    /// Records that a 16-bit word joined the sum.
    #[inline]
    pub fn add(&mut self, new: u16) {
        self.0 += u64::from(new);
    }

    /// Records that an IPv6 address left the sum (`new` false) or joined it.
    #[inline]
    pub fn addr6(&mut self, a: u128, joined: bool) {
        for i in 0..8 {
            let w = (a >> (112 - 16 * i)) as u16;
            if joined {
                self.add(w)
            } else {
                self.remove(w)
            }
        }
    }

    /// Adds the changes recorded in `other`.
    #[inline]
    pub fn merge(self, other: Delta) -> Delta {
        Delta(self.0 + other.0)
    }

    /// The updated value of checksum `hc` once the recorded changes are made.
    #[inline]
    pub fn apply(self, hc: u16) -> u16 {
        !fold(u64::from(!hc) + self.0)
    }

    /// The updated value of a *partial* checksum field (a TUN offload's
    /// `NEEDS_CSUM` packet): it holds the folded pseudo-header sum, not
    /// complemented, and the device completes it later over the data, so
    /// only pseudo-header changes (addresses) are applied, uncomplemented.
    #[inline]
    pub fn apply_partial(self, field: u16) -> u16 {
        fold(u64::from(field) + self.0)
    }

    /// As [`apply`](Self::apply) for a UDP checksum: 0 means "no checksum" and
    /// stays 0; a computed 0 is sent as 0xFFFF (RFC 768).
    #[inline]
    pub fn apply_udp(self, hc: u16) -> u16 {
        if hc == 0 {
            return 0;
        }
        match self.apply(hc) {
            0 => 0xffff,
            v => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_length_is_zero_padded() {
        assert_eq!(sum(&[0xab]), 0xab00);
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }

    #[test]
    fn incremental_matches_full() {
        let mut data = [0x45u8, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 1, 0, 5];
        let c = checksum(&data);
        data[10..12].copy_from_slice(&c.to_be_bytes());
        let mut d = Delta::default();
        d.dword(0x0a01_0005, 0xc0a8_3210);
        data[16..20].copy_from_slice(&0xc0a8_3210u32.to_be_bytes());
        let inc = d.apply(c);
        data[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(inc, checksum(&data));
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        let mut d = Delta::default();
        d.word(1, 2);
        assert_eq!(d.apply_udp(0), 0);
    }

    #[test]
    fn udp_computed_zero_becomes_ffff() {
        // Find a word change that makes the ordinary update produce 0.
        let hc = 0x1234;
        let new = (0..=0xffffu16)
            .find(|&x| {
                let mut d = Delta::default();
                d.word(0x1111, x);
                d.apply(hc) == 0
            })
            .expect("some change yields 0");
        let mut d = Delta::default();
        d.word(0x1111, new);
        assert_eq!(d.apply_udp(hc), 0xffff);
        // And the UDP variant never yields 0 for a non-zero input.
        for x in 0..=0xffffu16 {
            let mut d = Delta::default();
            d.word(0x1111, x);
            assert_ne!(d.apply_udp(0x4321), 0);
        }
    }
}
