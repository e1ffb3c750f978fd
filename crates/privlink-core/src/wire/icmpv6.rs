//! ICMPv6 (RFC 4443): the message types privlink passes or makes, and
//! the error it sends where a router would (hop limit exceeded, packet
//! too big: IPv6 routers never fragment, RFC 8200 §5).
//!
//! Why a builder of its own rather than the IPv4 one with wider
//! addresses: an ICMPv6 error quotes as much of the invoking packet as
//! fits in the minimum MTU (1,280 bytes, RFC 4443 §2.4 (c)), not the IPv4
//! header and 8 bytes; its checksum covers a pseudo-header (RFC 4443
//! §2.3); and Packet Too Big carries a 32-bit MTU. Not yet on the packet
//! path: the IPv6 translation (issue 24) builds on it.

use super::ipv6::{checksum6, next, HEADER};

/// ICMPv6 message types (RFC 4443 §2.1).
pub mod icmpv6_type {
    pub const DEST_UNREACHABLE: u8 = 1;
    pub const PACKET_TOO_BIG: u8 = 2;
    pub const TIME_EXCEEDED: u8 = 3;
    pub const PARAMETER_PROBLEM: u8 = 4;
    pub const ECHO_REQUEST: u8 = 128;
    pub const ECHO_REPLY: u8 = 129;
}

/// The IPv6 minimum MTU (RFC 8200 §5): an ICMPv6 error never exceeds it.
pub const MIN_MTU: usize = 1280;
/// Bytes of the ICMPv6 header of an error (type, code, checksum and the
/// 32-bit parameter: unused, MTU or pointer).
pub const ERROR_HEADER: usize = 8;

/// Whether `t` is an error message (types 0 to 127, RFC 4443 §2.1).
#[inline]
pub fn is_icmpv6_error(t: u8) -> bool {
    t < 128
}

/// Rewrites an ICMPv6 echo message's identifier to `ident` (`l4` the
/// ICMPv6 message). Unlike ICMP for IPv4, the checksum covers the
/// pseudo-header (RFC 4443 §2.3), so `pseudo` (what the address rewrite
/// returned, [`super::ipv6::Ipv6Packet::forward_rewrite`]) goes into it
/// too (RFC 1624).
pub fn set_icmpv6_ident(l4: &mut [u8], ident: u16, pseudo: crate::checksum::Delta) {
    let mut d = pseudo;
    d.word(u16::from_be_bytes([l4[4], l4[5]]), ident);
    l4[4..6].copy_from_slice(&ident.to_be_bytes());
    let c = d.apply(u16::from_be_bytes([l4[2], l4[3]]));
    l4[2..4].copy_from_slice(&c.to_be_bytes());
}

/// Writes into `out` the ICMPv6 error `kind`/`code` with parameter
/// `param` (the MTU of Packet Too Big, the pointer of Parameter Problem,
/// else 0) about `invoking`, sent from `src` to the invoking packet's
/// source: the IPv6 header (hop limit 64), the ICMPv6 header with its
/// checksum, and as much of `invoking` as keeps the whole within
/// [`MIN_MTU`]. Returns its length, or 0 when `invoking` is shorter than
/// an IPv6 header or `out` shorter than what is written.
///
/// The caller decides whether an error may be sent at all (never about an
/// ICMPv6 error, a multicast destination or an unspecified source, RFC
/// 4443 §2.4 (e)) and limits their rate (§2.4 (f)).
pub fn build_icmpv6_error(out: &mut [u8], invoking: &[u8], src: u128, kind: u8, code: u8, param: u32) -> usize {
    if invoking.len() < HEADER {
        return 0;
    }
    let quote = invoking.len().min(MIN_MTU - HEADER - ERROR_HEADER);
    let total = HEADER + ERROR_HEADER + quote;
    if out.len() < total {
        return 0;
    }
    let dst = u128::from_be_bytes(invoking[8..24].try_into().unwrap_or_default());
    let l4_len = ERROR_HEADER + quote;
    let ip = &mut out[..HEADER];
    ip.fill(0);
    ip[0] = 0x60;
    ip[6] = next::ICMPV6;
    ip[7] = 64;
    ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    ip[8..24].copy_from_slice(&src.to_be_bytes());
    ip[24..40].copy_from_slice(&dst.to_be_bytes());
    let l4 = &mut out[HEADER..total];
    l4[0] = kind;
    l4[1] = code;
    l4[2..4].copy_from_slice(&[0, 0]);
    l4[4..8].copy_from_slice(&param.to_be_bytes());
    l4[8..].copy_from_slice(&invoking[..quote]);
    let c = checksum6(src, dst, next::ICMPV6, l4);
    l4[2..4].copy_from_slice(&c.to_be_bytes());
    total
}

#[cfg(test)]
mod tests {
    use super::super::ipv6::Ipv6Packet;
    use super::*;
    use std::net::Ipv6Addr;

    fn invoking(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((len - HEADER) as u16).to_be_bytes());
        p[6] = 17;
        p[7] = 1;
        p[8..24].copy_from_slice(&Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0x10).octets());
        p[24..40].copy_from_slice(&Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0x5).octets());
        p[40..48].copy_from_slice(&[0x9c, 0x40, 0, 53, ((len - HEADER) >> 8) as u8, (len - HEADER) as u8, 0, 0]);
        p
    }

    #[test]
    fn an_echo_rewritten_to_new_addresses_and_identifier_keeps_its_checksum() {
        let (a, b) = (Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0x10), Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0x5));
        let mut echo = vec![icmpv6_type::ECHO_REQUEST, 0, 0, 0, 0x12, 0x34, 0, 1];
        echo.extend_from_slice(b"ping6 payload");
        let c = checksum6(u128::from(a), u128::from(b), next::ICMPV6, &echo);
        echo[2..4].copy_from_slice(&c.to_be_bytes());
        let mut p = vec![0x60, 0, 0, 0, 0, echo.len() as u8, next::ICMPV6, 64];
        p.extend_from_slice(&a.octets());
        p.extend_from_slice(&b.octets());
        p.extend_from_slice(&echo);
        let (nat, backend) = ((0xfd99_u128 << 112) | 4, (0xfd98_u128 << 112) | 10);
        let mut v = Ipv6Packet::new_checked(&mut p[..]).expect("valid");
        let pseudo = v.forward_rewrite(nat, backend);
        set_icmpv6_ident(v.payload_mut(), 0xbeef, pseudo);
        let v = Ipv6Packet::new_checked(&p[..]).expect("valid");
        let mut l4 = v.payload().to_vec();
        assert_eq!(&l4[4..6], &[0xbe, 0xef]);
        let got = u16::from_be_bytes([l4[2], l4[3]]);
        l4[2..4].copy_from_slice(&[0, 0]);
        assert_eq!(got, checksum6(nat, backend, next::ICMPV6, &l4), "incremental = recomputed");
    }

    #[test]
    fn an_error_quotes_what_fits_in_1280_bytes_and_checksums_over_the_pseudo_header() {
        let router = u128::from(Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0x5));
        let mut out = [0u8; MIN_MTU];
        for (len, want) in [(100, 148), (1500, MIN_MTU), (9000, MIN_MTU)] {
            let n = build_icmpv6_error(&mut out, &invoking(len), router, icmpv6_type::PACKET_TOO_BIG, 0, 1280);
            assert_eq!(n, want, "{len}");
            let v = Ipv6Packet::new_checked(&out[..n]).expect("a valid IPv6 packet");
            assert_eq!((v.protocol(), v.hop_limit(), v.src_addr()), (next::ICMPV6, 64, router));
            assert_eq!(v.dst_addr(), u128::from(Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0x10)), "back to the sender");
            let l4 = v.payload();
            assert_eq!((l4[0], l4[1], &l4[4..8]), (2, 0, &1280u32.to_be_bytes()[..]));
            assert_eq!(&l4[8..], &invoking(len)[..n - 48], "the quote is the invoking packet's start");
            let mut zeroed = l4.to_vec();
            zeroed[2..4].copy_from_slice(&[0, 0]);
            assert_eq!(u16::from_be_bytes([l4[2], l4[3]]), checksum6(router, v.dst_addr(), next::ICMPV6, &zeroed));
        }
        assert_eq!(build_icmpv6_error(&mut out, &[0x60; 39], router, 3, 0, 0), 0, "no header to quote");
        assert_eq!(build_icmpv6_error(&mut [0u8; 100], &invoking(200), router, 3, 0, 0), 0, "no room");
        assert!(is_icmpv6_error(icmpv6_type::TIME_EXCEEDED) && !is_icmpv6_error(icmpv6_type::ECHO_REQUEST));
    }
}
