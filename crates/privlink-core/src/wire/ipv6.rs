//! IPv6 (RFC 8200): the validated packet view, its extension-header chain
//! walked once with a bound, and the in-place rewrite of addresses and hop
//! limit with the pseudo-header's checksum delta.
//!
//! Why the chain is walked here, once: every later step (the endpoint
//! lookup, reassembly, the transport header, the rewrite) needs to know
//! where the upper-layer header starts and whether the packet is a
//! fragment, and a chain is attacker-controlled length. The walk follows
//! the rules a router that is also the packet's destination applies:
//!
//! - Hop-by-Hop Options only directly after the IPv6 header (RFC 8200
//!   §4.1); a jumbogram (payload length 0) is refused;
//! - a Routing header of type 0 is refused (RFC 5095); any other with
//!   segments left is refused as source routing, as privlink refuses
//!   IPv4 source routes; with none left it is skipped (RFC 8200 §4.4);
//! - a Fragment header is read; an atomic fragment (offset 0, no more
//!   fragments) is processed as a whole packet (RFC 6946, RFC 8021); a
//!   first fragment must hold the whole chain and the upper-layer header
//!   (RFC 7112), a non-last fragment a multiple of 8 bytes (RFC 8200 §4.5);
//! - Destination Options are skipped;
//! - anything else before a transport header (AH, ESP, Mobility, HIP,
//!   Shim6, No Next Header, unassigned numbers) is refused as unknown;
//! - at most [`MAX_EXT_HEADERS`] extension headers within the first
//!   [`MAX_CHAIN`] bytes (RFC 8883 lets a node drop longer chains).
//!
//! Not yet on the packet path: the translation of IPv6 packets (issue 24)
//! builds on this view. Its rewrite returns the pseudo-header's delta, and
//! the IPv4 path's port rewrite (`wire::set_ports`) takes it unchanged
//! (tested below); one rule differs there: a UDP datagram over IPv6 with
//! checksum 0 is dropped, not passed (RFC 8200 §8.1).

use super::{be16, proto, Malformed};
use crate::checksum::Delta;

/// Bytes of the fixed IPv6 header.
pub const HEADER: usize = 40;
/// Extension headers walked at most before the upper-layer header.
pub const MAX_EXT_HEADERS: usize = 8;
/// Bytes the header chain (fixed header included) may span at most.
pub const MAX_CHAIN: usize = 256;

/// Next Header values of the extension headers privlink knows (RFC 8200
/// §4, IANA "IPv6 Extension Header Types").
pub mod next {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const DEST_OPTIONS: u8 = 60;
    pub const ICMPV6: u8 = 58;
}

/// Why an IPv6 packet is refused before translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused6 {
    /// Not a packet the kernel would accept (lengths, version).
    Malformed(Malformed),
    /// A Routing header of type 0 (RFC 5095), or one with segments left.
    SourceRoute,
    /// An extension header privlink does not pass, or No Next Header,
    /// before the transport header (its Next Header value).
    UnknownHeader(u8),
    /// More than [`MAX_EXT_HEADERS`] headers or [`MAX_CHAIN`] bytes.
    ChainTooLong,
    /// A first fragment without the whole chain and transport header
    /// (RFC 7112), a non-last fragment not a multiple of 8 bytes, or a
    /// fragment running past 65,535 bytes.
    BadFragment,
}

/// A Fragment header's fields (RFC 8200 §4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frag6 {
    /// Offset of this fragment's data, in bytes.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
    pub ident: u32,
    /// Where the Fragment header starts in the packet.
    pub at: u16,
}

/// A validated IPv6 packet, its chain walked.
#[derive(Debug)]
pub struct Ipv6Packet<T> {
    buf: T,
    /// Offset of the upper-layer header (of this fragment's data for a
    /// later fragment).
    l4: u16,
    /// The upper-layer protocol (TCP, UDP, ICMPv6).
    proto: u8,
    /// The Fragment header, unless absent or atomic.
    frag: Option<Frag6>,
}

/// Bytes the transport header needs in a first fragment (RFC 7112): the
/// ports of TCP and UDP, the type, code, checksum and identifier of
/// ICMPv6. (Each protocol's own minimum is checked when it is parsed.)
fn l4_min(p: u8) -> usize {
    if p == proto::TCP {
        20
    } else {
        8
    }
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Validates `buf` as one whole IPv6 packet (version 6, payload length
    /// matching the buffer: a TUN read has no link padding) and walks its
    /// header chain (see the module docs).
    pub fn new_checked(buf: T) -> Result<Self, Refused6> {
        let b = buf.as_ref();
        if b.len() < HEADER {
            return Err(Refused6::Malformed(Malformed::Truncated));
        }
        if b[0] >> 4 != 6 {
            return Err(Refused6::Malformed(Malformed::Version));
        }
        let payload = usize::from(be16(b, 4..6));
        if payload == 0 || payload + HEADER != b.len() {
            // Payload length 0 is a jumbogram (RFC 2675): not on a TUN
            // device's MTU.
            return Err(Refused6::Malformed(Malformed::TotalLength));
        }
        let mut next_header = b[6];
        let mut at = HEADER;
        let mut frag = None;
        for n in 0..=MAX_EXT_HEADERS {
            match next_header {
                proto::TCP | proto::UDP | next::ICMPV6 => {
                    return Self::done(buf, at, next_header, frag);
                }
                _ if n == MAX_EXT_HEADERS => return Err(Refused6::ChainTooLong),
                next::HOP_BY_HOP | next::ROUTING | next::DEST_OPTIONS => {
                    if next_header == next::HOP_BY_HOP && at != HEADER {
                        return Err(Refused6::UnknownHeader(next_header));
                    }
                    if at + 8 > b.len() {
                        return Err(Refused6::Malformed(Malformed::Truncated));
                    }
                    if next_header == next::ROUTING && (b[at + 2] == 0 || b[at + 3] != 0) {
                        return Err(Refused6::SourceRoute);
                    }
                    let len = (usize::from(b[at + 1]) + 1) * 8;
                    next_header = b[at];
                    at += len;
                }
                next::FRAGMENT => {
                    if frag.is_some() || at + 8 > b.len() {
                        return Err(Refused6::BadFragment);
                    }
                    let word = be16(b, at + 2..at + 4);
                    let f = Frag6 {
                        offset: word & !7,
                        more: word & 1 != 0,
                        ident: u32::from_be_bytes([b[at + 4], b[at + 5], b[at + 6], b[at + 7]]),
                        at: at as u16,
                    };
                    next_header = b[at];
                    at += 8;
                    let data = b.len().saturating_sub(at);
                    if usize::from(f.offset) + data > usize::from(u16::MAX) || (f.more && data % 8 != 0) {
                        return Err(Refused6::BadFragment);
                    }
                    if f.offset == 0 && !f.more {
                        // Atomic: a whole packet (RFC 6946).
                        continue;
                    }
                    if f.offset != 0 {
                        // A later fragment: its data is not a header.
                        return Ok(Ipv6Packet { buf, l4: at as u16, proto: next_header, frag: Some(f) });
                    }
                    frag = Some(f);
                }
                other => return Err(Refused6::UnknownHeader(other)),
            }
            if at > MAX_CHAIN {
                return Err(Refused6::ChainTooLong);
            }
        }
        Err(Refused6::ChainTooLong)
    }

    fn done(buf: T, at: usize, p: u8, frag: Option<Frag6>) -> Result<Self, Refused6> {
        let b = buf.as_ref();
        if at + l4_min(p) > b.len() {
            return Err(if frag.is_some() { Refused6::BadFragment } else { Refused6::Malformed(Malformed::Truncated) });
        }
        Ok(Ipv6Packet { buf, l4: at as u16, proto: p, frag })
    }

    #[inline]
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    /// The source address (host byte order).
    #[inline]
    pub fn src_addr(&self) -> u128 {
        u128::from_be_bytes(self.b()[8..24].try_into().unwrap_or_default())
    }
    /// The destination address (host byte order).
    #[inline]
    pub fn dst_addr(&self) -> u128 {
        u128::from_be_bytes(self.b()[24..40].try_into().unwrap_or_default())
    }
    #[inline]
    pub fn hop_limit(&self) -> u8 {
        self.b()[7]
    }
    /// Offset of the upper-layer header (for a later fragment: of its data).
    #[inline]
    pub fn l4_offset(&self) -> usize {
        usize::from(self.l4)
    }
    /// The upper-layer protocol: TCP, UDP or ICMPv6.
    #[inline]
    pub fn protocol(&self) -> u8 {
        self.proto
    }
    /// The Fragment header of a fragment (none for an atomic fragment).
    #[inline]
    pub fn fragment(&self) -> Option<Frag6> {
        self.frag
    }
    /// A fragment other than the first.
    #[inline]
    pub fn is_later_fragment(&self) -> bool {
        self.frag.is_some_and(|f| f.offset != 0)
    }
    /// The upper-layer header and data.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.b()[usize::from(self.l4)..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Rewrites source and destination and takes one off the hop limit
    /// (the caller checked it is above 1). Returns the change to the
    /// upper-layer pseudo-header (RFC 8200 §8.1), for the TCP, UDP or
    /// ICMPv6 checksum (RFC 1624); IPv6 itself has no header checksum.
    pub fn forward_rewrite(&mut self, src: u128, dst: u128) -> Delta {
        forward_rewrite(self.buf.as_mut(), src, dst)
    }
    /// The upper-layer header and data, to rewrite.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let at = usize::from(self.l4);
        &mut self.buf.as_mut()[at..]
    }
}

/// [`Ipv6Packet::forward_rewrite`] on the bytes of a packet already
/// validated (at least a header long, hop limit above 1).
#[inline]
pub fn forward_rewrite(b: &mut [u8], src: u128, dst: u128) -> Delta {
    b[7] -= 1;
    let mut pseudo = Delta::default();
    for (range, new) in [(8..24, src), (24..40, dst)] {
        let new = new.to_be_bytes();
        for (i, chunk) in new.chunks_exact(4).enumerate() {
            let at = range.start + i * 4;
            let old = u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            pseudo.dword(old, u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]));
        }
        b[range].copy_from_slice(&new);
    }
    pseudo
}

/// Splits an IPv6 packet that carries a Fragment header right after its
/// fixed header (offset 0, no more fragments: what the IPv4 → IPv6
/// translation writes for a datagram it must fragment, RFC 7915 §4) into
/// fragments of at most `mtu` bytes, each with that header's Next Header
/// and identification, its offset and More Fragments set (RFC 8200 §4.5).
#[derive(Debug)]
pub struct Fragmenter6<'a> {
    pkt: &'a [u8],
    chunk: usize,
    at: usize,
}

/// The fixed header plus the Fragment header.
const FRAG_HEADERS: usize = HEADER + 8;

impl<'a> Fragmenter6<'a> {
    /// `None` unless `pkt` has the Fragment header described above and
    /// `mtu` carries the headers plus 8 bytes.
    pub fn new(pkt: &'a [u8], mtu: usize) -> Option<Fragmenter6<'a>> {
        if pkt.len() <= FRAG_HEADERS || pkt[6] != next::FRAGMENT || be16(pkt, HEADER + 2..HEADER + 4) != 0 {
            return None;
        }
        let chunk = mtu.checked_sub(FRAG_HEADERS)? & !7;
        (chunk >= 8).then_some(Fragmenter6 { pkt, chunk, at: FRAG_HEADERS })
    }

    /// Writes the next fragment into `out` (at least `mtu` bytes) and
    /// returns its length.
    pub fn next_into(&mut self, out: &mut [u8]) -> Option<usize> {
        let pkt = self.pkt;
        if self.at >= pkt.len() {
            return None;
        }
        let take = self.chunk.min(pkt.len() - self.at);
        let last = self.at + take == pkt.len();
        let len = FRAG_HEADERS + take;
        out[..FRAG_HEADERS].copy_from_slice(&pkt[..FRAG_HEADERS]);
        out[FRAG_HEADERS..len].copy_from_slice(&pkt[self.at..self.at + take]);
        out[4..6].copy_from_slice(&((len - HEADER) as u16).to_be_bytes());
        let word = (self.at - FRAG_HEADERS) as u16 | u16::from(!last);
        out[HEADER + 2..HEADER + 4].copy_from_slice(&word.to_be_bytes());
        self.at += take;
        Some(len)
    }
}

/// The upper-layer checksum of an IPv6 packet's `l4` bytes from `src` to
/// `dst` with protocol `p` (RFC 8200 §8.1: the pseudo-header holds both
/// addresses, the upper-layer length and the Next Header value), as it
/// goes into the checksum field (the field itself counted as zero by the
/// caller).
pub fn checksum6(src: u128, dst: u128, p: u8, l4: &[u8]) -> u16 {
    use crate::checksum::{fold, sum};
    let mut s = sum(&src.to_be_bytes()) + sum(&dst.to_be_bytes());
    s += l4.len() as u64 + u64::from(p);
    !fold(s + sum(l4))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv6Addr;

    const A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0x10);
    const B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0x5);

    /// An IPv6 packet from A to B: `chain` (Next Header, bytes) of
    /// extension headers, then a UDP datagram with `data`, checksummed.
    fn packet(chain: &[(u8, Vec<u8>)], data: &[u8]) -> Vec<u8> {
        let mut udp = vec![0x9c, 0x40, 0x00, 0x35, 0, 0, 0, 0];
        udp.extend_from_slice(data);
        let ulen = udp.len() as u16;
        udp[4..6].copy_from_slice(&ulen.to_be_bytes());
        let c = checksum6(u128::from(A), u128::from(B), proto::UDP, &udp);
        udp[6..8].copy_from_slice(&c.to_be_bytes());
        let mut p = vec![0x60, 0, 0, 0, 0, 0, 0, 64];
        p.extend_from_slice(&A.octets());
        p.extend_from_slice(&B.octets());
        let first = chain.first().map_or(proto::UDP, |c| c.0);
        p[6] = first;
        for (i, (_, bytes)) in chain.iter().enumerate() {
            let mut h = bytes.clone();
            h[0] = chain.get(i + 1).map_or(proto::UDP, |c| c.0);
            p.extend_from_slice(&h);
        }
        p.extend_from_slice(&udp);
        let pl = (p.len() - HEADER) as u16;
        p[4..6].copy_from_slice(&pl.to_be_bytes());
        p
    }

    fn opts() -> Vec<u8> {
        vec![0, 0, 1, 4, 0, 0, 0, 0] // PadN
    }
    fn frag(offset: u16, more: bool) -> Vec<u8> {
        let w = offset | u16::from(more);
        let mut h = vec![0, 0];
        h.extend_from_slice(&w.to_be_bytes());
        h.extend_from_slice(&0xdead_beef_u32.to_be_bytes());
        h
    }

    #[test]
    fn a_plain_packet_and_one_with_options_find_their_transport_header() {
        let p = packet(&[], b"hello");
        let v = Ipv6Packet::new_checked(&p[..]).expect("valid");
        assert_eq!((v.protocol(), v.l4_offset(), v.fragment()), (proto::UDP, 40, None));
        assert_eq!((v.src_addr(), v.dst_addr(), v.hop_limit()), (u128::from(A), u128::from(B), 64));
        let p = packet(&[(next::HOP_BY_HOP, opts()), (next::DEST_OPTIONS, opts())], b"hello");
        let v = Ipv6Packet::new_checked(&p[..]).expect("valid");
        assert_eq!((v.protocol(), v.l4_offset()), (proto::UDP, 56));
        assert_eq!(&v.payload()[8..], b"hello");
    }

    #[test]
    fn routing_type_0_unknown_headers_and_long_chains_are_refused() {
        let rh0 = vec![0, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(
            Ipv6Packet::new_checked(&packet(&[(next::ROUTING, rh0)], b"x")[..]).err(),
            Some(Refused6::SourceRoute)
        );
        let srh_left = vec![0, 0, 4, 1, 0, 0, 0, 0];
        assert_eq!(
            Ipv6Packet::new_checked(&packet(&[(next::ROUTING, srh_left)], b"x")[..]).err(),
            Some(Refused6::SourceRoute)
        );
        let srh_done = vec![0, 0, 4, 0, 0, 0, 0, 0];
        assert!(Ipv6Packet::new_checked(&packet(&[(next::ROUTING, srh_done)], b"x")[..]).is_ok());
        for unknown in [51u8, 50, 59, 135, 253] {
            let p = packet(&[(unknown, opts())], b"x");
            assert_eq!(Ipv6Packet::new_checked(&p[..]).err(), Some(Refused6::UnknownHeader(unknown)), "{unknown}");
        }
        let hbh_late = packet(&[(next::DEST_OPTIONS, opts()), (next::HOP_BY_HOP, opts())], b"x");
        assert_eq!(Ipv6Packet::new_checked(&hbh_late[..]).err(), Some(Refused6::UnknownHeader(0)));
        let many: Vec<(u8, Vec<u8>)> = (0..9).map(|_| (next::DEST_OPTIONS, opts())).collect();
        assert_eq!(Ipv6Packet::new_checked(&packet(&many, b"x")[..]).err(), Some(Refused6::ChainTooLong));
        let big = vec![0, 31, 1, 254].into_iter().chain(std::iter::repeat_n(0, 252)).collect::<Vec<u8>>();
        let long = packet(&[(next::DEST_OPTIONS, big.clone()), (next::DEST_OPTIONS, big)], b"x");
        assert_eq!(Ipv6Packet::new_checked(&long[..]).err(), Some(Refused6::ChainTooLong));
    }

    #[test]
    fn fragments_atomic_first_later_and_tiny() {
        let atomic = packet(&[(next::FRAGMENT, frag(0, false))], b"whole");
        let v = Ipv6Packet::new_checked(&atomic[..]).expect("atomic");
        assert_eq!((v.fragment(), v.protocol(), v.l4_offset()), (None, proto::UDP, 48));
        let first = packet(&[(next::FRAGMENT, frag(0, true))], b"12345678");
        let v = Ipv6Packet::new_checked(&first[..]).expect("first");
        let f = v.fragment().expect("a fragment");
        assert_eq!((f.offset, f.more, f.ident, f.at), (0, true, 0xdead_beef, 40));
        assert!(!v.is_later_fragment());
        let later = packet(&[(next::FRAGMENT, frag(1448, false))], b"tail");
        let v = Ipv6Packet::new_checked(&later[..]).expect("later");
        assert!(v.is_later_fragment() && v.l4_offset() == 48);
        // A non-last fragment whose data is not a multiple of 8 bytes.
        let odd = packet(&[(next::FRAGMENT, frag(0, true))], b"123");
        assert_eq!(Ipv6Packet::new_checked(&odd[..]).err(), Some(Refused6::BadFragment));
        // A first fragment without the transport header (RFC 7112): the
        // chain goes on past its end.
        let mut tiny = packet(&[(next::FRAGMENT, frag(0, true)), (next::DEST_OPTIONS, opts())], b"");
        tiny.truncate(48 + 8);
        let pl = (tiny.len() - HEADER) as u16;
        tiny[4..6].copy_from_slice(&pl.to_be_bytes());
        assert!(Ipv6Packet::new_checked(&tiny[..]).is_err());
        // Two Fragment headers.
        let two = packet(&[(next::FRAGMENT, frag(0, true)), (next::FRAGMENT, frag(0, true))], b"12345678");
        assert_eq!(Ipv6Packet::new_checked(&two[..]).err(), Some(Refused6::BadFragment));
        // Past 65,535 bytes.
        let past = packet(&[(next::FRAGMENT, frag(65528, false))], b"0123456789");
        assert_eq!(Ipv6Packet::new_checked(&past[..]).err(), Some(Refused6::BadFragment));
    }

    #[test]
    fn lengths_and_version() {
        let mut p = packet(&[], b"x");
        p.push(0);
        assert_eq!(Ipv6Packet::new_checked(&p[..]).err(), Some(Refused6::Malformed(Malformed::TotalLength)));
        let mut p = packet(&[], b"x");
        p[0] = 0x45;
        assert_eq!(Ipv6Packet::new_checked(&p[..]).err(), Some(Refused6::Malformed(Malformed::Version)));
        let mut jumbo = packet(&[], b"x");
        jumbo[4..6].copy_from_slice(&[0, 0]);
        assert!(Ipv6Packet::new_checked(&jumbo[..]).is_err());
        assert!(Ipv6Packet::new_checked(&[0x60u8; 39][..]).is_err());
    }

    #[test]
    fn the_rewrite_keeps_the_udp_checksum_right_incrementally() {
        let mut p = packet(&[(next::DEST_OPTIONS, opts())], b"payload!");
        let (nsrc, ndst) = (u128::from(Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 4)), (0x2001_0db8_u128 << 96) | 0x0a);
        let mut v = Ipv6Packet::new_checked(&mut p[..]).expect("valid");
        let pseudo = v.forward_rewrite(nsrc, ndst);
        let l4 = v.payload_mut();
        let old = u16::from_be_bytes([l4[6], l4[7]]);
        l4[6..8].copy_from_slice(&pseudo.apply_udp(old).to_be_bytes());
        let v = Ipv6Packet::new_checked(&p[..]).expect("still valid");
        assert_eq!((v.src_addr(), v.dst_addr(), v.hop_limit()), (nsrc, ndst, 63));
        let mut l4 = v.payload().to_vec();
        let got = u16::from_be_bytes([l4[6], l4[7]]);
        l4[6..8].copy_from_slice(&[0, 0]);
        assert_eq!(got, checksum6(nsrc, ndst, proto::UDP, &l4), "incremental = recomputed");
    }

    #[test]
    fn tcp_ports_and_addresses_rewritten_with_the_shared_port_helper_keep_the_checksum() {
        // The IPv4 path's port rewrite takes the pseudo-header delta as it
        // comes: the IPv6 one's works with it unchanged.
        let mut tcp = vec![0u8; 20];
        tcp[0..4].copy_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
        tcp[12] = 5 << 4;
        tcp[13] = 0x02;
        let c = checksum6(u128::from(A), u128::from(B), proto::TCP, &tcp);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        let mut p = vec![0x60, 0, 0, 0, 0, 20, proto::TCP, 64];
        p.extend_from_slice(&A.octets());
        p.extend_from_slice(&B.octets());
        p.extend_from_slice(&tcp);
        let (nat, backend) = ((0xfd99_u128 << 112) | 4, (0xfd98_u128 << 112) | 10);
        let mut v = Ipv6Packet::new_checked(&mut p[..]).expect("valid");
        let pseudo = v.forward_rewrite(nat, backend);
        crate::wire::set_ports(proto::TCP, v.payload_mut(), 2000, 8443, pseudo, false);
        let v = Ipv6Packet::new_checked(&p[..]).expect("valid");
        let mut l4 = v.payload().to_vec();
        let got = u16::from_be_bytes([l4[16], l4[17]]);
        l4[16..18].copy_from_slice(&[0, 0]);
        assert_eq!(got, checksum6(nat, backend, proto::TCP, &l4));
        assert_eq!(&l4[0..4], &[0x07, 0xd0, 0x20, 0xfb]);
    }

    proptest! {
        // Any bytes: refused or a view whose offsets lie inside the buffer.
        #[test]
        fn any_bytes_are_refused_or_consistent(mut bytes in proptest::collection::vec(any::<u8>(), 0..400), set_len: bool) {
            if set_len && bytes.len() > HEADER {
                bytes[0] = 0x60 | (bytes[0] & 0x0f);
                let pl = (bytes.len() - HEADER) as u16;
                bytes[4..6].copy_from_slice(&pl.to_be_bytes());
            }
            if let Ok(v) = Ipv6Packet::new_checked(&bytes[..]) {
                prop_assert!(v.l4_offset() <= bytes.len());
                prop_assert!(v.l4_offset() <= MAX_CHAIN + 8 || v.is_later_fragment());
                prop_assert!(matches!(v.protocol(), proto::TCP | proto::UDP | next::ICMPV6) || v.is_later_fragment());
                if !v.is_later_fragment() {
                    prop_assert!(v.l4_offset() + 8 <= bytes.len());
                }
            }
        }
    }
}
