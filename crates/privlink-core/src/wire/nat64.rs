//! IPv6 ⇄ IPv4 header and ICMP translation (RFC 7915, the IP/ICMP
//! Translation Algorithm): the stateless half of the stateful NAT64 (RFC
//! 6146) by which an IPv6 endpoint reaches an IPv4 service. The flow
//! table is the state: an IPv6 flow whose provider side holds
//! IPv4-mapped addresses ([`mapped`]) is translated at the rewrite step
//! instead of rewritten (see `translate.rs`).
//!
//! Why in place, moving the payload: the packet is in the read buffer
//! the kernel copied it into; moving up to one MTU of payload by 20 bytes
//! costs a `memmove` of bytes already in cache, and the write that
//! follows is the same single write as for any packet. The buffer must
//! have [`GROWTH`] bytes of room past the packet for the IPv4 → IPv6
//! direction (the daemon's read buffer has).
//!
//! Checksums: TCP and UDP keep theirs incrementally (RFC 1624): the
//! pseudo-header's addresses change family, its length and protocol sum
//! the same in both (RFC 768, RFC 8200 §8.1). ICMP echo ⇄ ICMPv6 echo
//! changes type, and ICMPv6's checksum covers a pseudo-header ICMP's does
//! not (RFC 4443 §2.3), so it goes in or out whole. A UDP datagram
//! without a checksum (allowed in IPv4) gets one computed (RFC 7915
//! §4.5). Errors are rebuilt in the reply buffer (they are rare and at
//! most 1,280 bytes), quoting the invoking packet translated the same
//! way (§4.2, §5.2).

use super::ipv6::{self, next};
use super::{be16, field, icmp_type, proto};
use crate::checksum::{self, Delta};

/// The IPv4-mapped IPv6 address `::ffff:a.b.c.d` (RFC 4291 §2.5.5.2):
/// how an IPv4 NAT address or backend sits in an IPv6 flow key. Never on
/// the wire: config refuses such addresses from consumers.
#[inline]
pub fn mapped(a: u32) -> u128 {
    0xffff_u128 << 32 | u128::from(a)
}

/// The IPv4 address inside an IPv4-mapped IPv6 address.
#[inline]
pub fn unmapped(a: u128) -> Option<u32> {
    (a >> 32 == 0xffff).then_some(a as u32)
}

/// An IPv4 packet this long or shorter leaves without DF, so an IPv4
/// router may still fragment what an IPv6 host could not resend smaller
/// (RFC 7915 §5.1: 1,280 − 20).
pub const DF_THRESHOLD: usize = 1260;
/// Bytes a packet may grow by in translation: the header (20 bytes of
/// IPv4 become 40 of IPv6, and 48 with a Fragment header for an IPv4
/// fragment) and, for an error, its quoted header as well (40).
pub const GROWTH: usize = 48;
/// Largest ICMP error privlink sends toward IPv4 (RFC 1812 §4.3.2.3).
pub const ICMP4_MAX: usize = 576;

/// Records the part of the checksum pseudo-header that differs between
/// the families leaving (`joined` false) or joining the sum: the two
/// addresses, and for ICMPv6 (`icmp`) the length and Next Header as well,
/// since an ICMP checksum has no pseudo-header at all.
fn pseudo(d: &mut Delta, v6: bool, src: u128, dst: u128, icmp: bool, len: usize, joined: bool) {
    let w = |d: &mut Delta, x: u16| if joined { d.add(x) } else { d.remove(x) };
    if v6 {
        d.addr6(src, joined);
        d.addr6(dst, joined);
        if icmp {
            w(d, (len >> 16) as u16);
            w(d, len as u16);
            w(d, u16::from(next::ICMPV6));
        }
    } else if !icmp {
        for a in [src as u32, dst as u32] {
            w(d, (a >> 16) as u16);
            w(d, a as u16);
        }
    }
}

/// The echo type of the other family: 128 ⇄ 8, 129 ⇄ 0 (RFC 7915 §4.2,
/// §5.2); `None` for anything else.
fn echo_other(kind: u8, to_v6: bool) -> Option<u8> {
    use super::icmpv6::icmpv6_type as t6;
    match (to_v6, kind) {
        (true, icmp_type::ECHO_REQUEST) => Some(t6::ECHO_REQUEST),
        (true, icmp_type::ECHO_REPLY) => Some(t6::ECHO_REPLY),
        (false, t6::ECHO_REQUEST) => Some(icmp_type::ECHO_REQUEST),
        (false, t6::ECHO_REPLY) => Some(icmp_type::ECHO_REPLY),
        _ => None,
    }
}

/// Rewrites the upper-layer header `l4` (of `len` bytes in its datagram,
/// which may be longer than `l4` for a quote) for new ports (or echo
/// identifier `sport`) and the pseudo-header change `d`, from family
/// `from_v6` to `to_v6`. With `partial`, a TCP or UDP checksum field holds
/// an offload's pseudo-header sum ([`Delta::apply_partial`]). A quote too
/// short to hold the checksum keeps its ports rewritten only.
#[allow(clippy::too_many_arguments)]
fn rewrite_l4(l4: &mut [u8], p: u8, mut d: Delta, to_v6: bool, sport: u16, dport: u16, partial: bool) {
    if p == proto::ICMP {
        // An echo: the identifier is both "ports".
        let Some(kind) = echo_other(l4[0], to_v6) else { return };
        d.word(u16::from(l4[0]) << 8 | u16::from(l4[1]), u16::from(kind) << 8 | u16::from(l4[1]));
        d.word(be16(l4, 4..6), sport);
        l4[0] = kind;
        l4[4..6].copy_from_slice(&sport.to_be_bytes());
        if l4.len() >= 4 {
            let c = d.apply(be16(l4, 2..4));
            l4[2..4].copy_from_slice(&c.to_be_bytes());
        }
        return;
    }
    let at = if p == proto::TCP { field::TCP_CHECKSUM } else { field::UDP_CHECKSUM };
    if partial {
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        let c = d.apply_partial(be16(l4, at.clone()));
        l4[at].copy_from_slice(&c.to_be_bytes());
        return;
    }
    d.word(be16(l4, 0..2), sport);
    d.word(be16(l4, 2..4), dport);
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    if l4.len() < at.end {
        return;
    }
    let old = be16(l4, at.clone());
    let c = match p {
        proto::TCP => d.apply(old),
        // No checksum in IPv4: IPv6 needs one (RFC 7915 §4.5), computed
        // by the caller over the whole datagram (a quote keeps 0).
        _ => d.apply_udp(old),
    };
    l4[at].copy_from_slice(&c.to_be_bytes());
}

/// Translates the IPv6 packet `buf[..len]` (its upper-layer header, of
/// protocol `proto6`, at `l4at`: extension headers are dropped, RFC 7915
/// §5.1) into an IPv4 packet from `src` to `dst` in place: the payload
/// moves down, the hop limit less one becomes the TTL, the traffic class
/// the TOS. A whole packet gets DF above [`DF_THRESHOLD`] bytes, below it
/// identification `ident`; a fragment (`frag`, its data at `l4at`) keeps
/// its offset, More Fragments and the low 16 bits of its identification,
/// without DF (§5.1.1). `ports` (source, destination; an echo's
/// identifier twice) are written into the upper-layer header, `None` for
/// a later fragment, which has none. Returns the new length, or `None`
/// when the result would exceed IPv4's 65,535 bytes.
#[allow(clippy::too_many_arguments)]
pub fn to_ipv4(
    buf: &mut [u8],
    len: usize,
    l4at: usize,
    proto6: u8,
    src: u32,
    dst: u32,
    ports: Option<(u16, u16)>,
    ident: u16,
    frag: Option<ipv6::Frag6>,
    partial: bool,
) -> Option<usize> {
    let total = field::HEADER_MIN + (len - l4at);
    if total > usize::from(u16::MAX) {
        return None;
    }
    let tos = buf[0] << 4 | buf[1] >> 4;
    let ttl = buf[7] - 1;
    let (old_src, old_dst) = (u128_at(buf, 8), u128_at(buf, 24));
    let icmp = proto6 == next::ICMPV6;
    let p = if icmp { proto::ICMP } else { proto6 };
    let mut d = Delta::default();
    pseudo(&mut d, true, old_src, old_dst, icmp, len - l4at, false);
    pseudo(&mut d, false, u128::from(src), u128::from(dst), icmp, len - l4at, true);
    buf.copy_within(l4at..len, field::HEADER_MIN);
    let (ident, word) = match frag {
        Some(f) => (f.ident as u16, f.offset >> 3 | if f.more { 0x2000 } else { 0 }),
        None if total > DF_THRESHOLD => (0, 0x4000),
        None => (ident, 0),
    };
    write_ipv4(&mut buf[..field::HEADER_MIN], tos, total, ident, word, ttl, p, src, dst);
    if let Some((sport, dport)) = ports {
        rewrite_l4(&mut buf[field::HEADER_MIN..total], p, d, false, sport, dport, partial && !icmp);
    }
    Some(total)
}

/// Translates the IPv4 packet `buf[..len]` (header of `ihl` bytes) into
/// an IPv6 packet from `src` to `dst` in place: the payload moves up
/// (`buf` needs [`GROWTH`] bytes of room), the TTL less one becomes the
/// hop limit, the TOS the traffic class (RFC 7915 §4.1). A fragment
/// (`frag`: identification, offset in bytes, More Fragments) gets a
/// Fragment header with them; a whole packet none (RFC 8021). `ports` as
/// for [`to_ipv4`]. Returns the new length, or `None` without the room.
#[allow(clippy::too_many_arguments)]
pub fn to_ipv6(
    buf: &mut [u8],
    len: usize,
    ihl: usize,
    src: u128,
    dst: u128,
    ports: Option<(u16, u16)>,
    frag: Option<(u16, u16, bool)>,
    partial: bool,
) -> Option<usize> {
    let payload = len - ihl;
    let at = ipv6::HEADER + if frag.is_some() { 8 } else { 0 };
    let total = at + payload;
    if buf.len() < total || total - ipv6::HEADER > usize::from(u16::MAX) {
        return None;
    }
    let (tos, ttl, p) = (buf[1], buf[field::TTL], buf[field::PROTOCOL]);
    let (old_src, old_dst) = (u32_at(buf, 12), u32_at(buf, 16));
    let icmp = p == proto::ICMP;
    let p6 = if icmp { next::ICMPV6 } else { p };
    let mut d = Delta::default();
    pseudo(&mut d, false, u128::from(old_src), u128::from(old_dst), icmp, payload, false);
    pseudo(&mut d, true, src, dst, icmp, payload, true);
    buf.copy_within(ihl..len, at);
    match frag {
        Some((ident, offset, more)) => {
            write_ipv6(&mut buf[..ipv6::HEADER], tos, total - ipv6::HEADER, next::FRAGMENT, ttl - 1, src, dst);
            let word = offset & !7 | u16::from(more);
            let f = &mut buf[ipv6::HEADER..at];
            f[0] = p6;
            f[1] = 0;
            f[2..4].copy_from_slice(&word.to_be_bytes());
            f[4..8].copy_from_slice(&u32::from(ident).to_be_bytes());
        }
        None => write_ipv6(&mut buf[..ipv6::HEADER], tos, payload, p6, ttl - 1, src, dst),
    }
    let Some((sport, dport)) = ports else { return Some(total) };
    let l4 = &mut buf[at..total];
    let no_checksum = p == proto::UDP && !partial && l4.len() >= 8 && l4[6..8] == [0, 0];
    rewrite_l4(l4, p, d, true, sport, dport, partial && !icmp);
    // A whole datagram (no Fragment header, or one the outbox will split):
    // its checksum can be computed here.
    if no_checksum && frag.is_none_or(|(_, offset, more)| offset == 0 && !more) {
        l4[6..8].copy_from_slice(&[0, 0]);
        let c = match ipv6::checksum6(src, dst, proto::UDP, l4) {
            0 => 0xffff,
            c => c,
        };
        l4[6..8].copy_from_slice(&c.to_be_bytes());
    }
    Some(total)
}

/// An IPv4 header (no options) with its checksum.
#[allow(clippy::too_many_arguments)]
fn write_ipv4(h: &mut [u8], tos: u8, total: usize, ident: u16, frag_word: u16, ttl: u8, p: u8, src: u32, dst: u32) {
    h[0] = 0x45;
    h[1] = tos;
    h[field::LENGTH].copy_from_slice(&(total as u16).to_be_bytes());
    h[field::IDENT].copy_from_slice(&ident.to_be_bytes());
    h[field::FLAGS_FRAG].copy_from_slice(&frag_word.to_be_bytes());
    h[field::TTL] = ttl;
    h[field::PROTOCOL] = p;
    h[field::CHECKSUM].copy_from_slice(&[0, 0]);
    h[field::SRC].copy_from_slice(&src.to_be_bytes());
    h[field::DST].copy_from_slice(&dst.to_be_bytes());
    let c = checksum::checksum(&h[..field::HEADER_MIN]);
    h[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
}

/// An IPv6 header (flow label 0).
fn write_ipv6(h: &mut [u8], tclass: u8, payload: usize, nh: u8, hops: u8, src: u128, dst: u128) {
    h[0] = 0x60 | tclass >> 4;
    h[1] = tclass << 4;
    h[2..4].copy_from_slice(&[0, 0]);
    h[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
    h[6] = nh;
    h[7] = hops;
    h[8..24].copy_from_slice(&src.to_be_bytes());
    h[24..40].copy_from_slice(&dst.to_be_bytes());
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u128_at(b: &[u8], at: usize) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    u128::from_be_bytes(a)
}

/// The packet an ICMP or ICMPv6 error quotes (RFC 792, RFC 4443 §2.4 (c)),
/// read leniently: it is truncated, so only its header chain and the
/// first 8 bytes of its upper-layer header are required.
#[derive(Debug, Clone, Copy)]
pub struct Quote<'a> {
    pub v6: bool,
    pub tos: u8,
    pub ttl: u8,
    /// Upper-layer protocol in IPv4's numbering (ICMPv6 as ICMP, 1).
    pub proto: u8,
    /// The quoted datagram's upper-layer length (from its header, not
    /// what the quote holds).
    pub l4_len: usize,
    /// Addresses (an IPv4 one in the low 32 bits).
    pub src: u128,
    pub dst: u128,
    /// Ports; for an echo, its identifier as both.
    pub sport: u16,
    pub dport: u16,
    /// The quoted upper-layer bytes.
    pub l4: &'a [u8],
}

/// Reads a quoted packet (either family, by its version); `None` for a
/// quote without 8 bytes of a TCP, UDP or echo header, a later fragment,
/// or an extension header chain longer than [`ipv6::MAX_EXT_HEADERS`].
pub fn parse_quote(q: &[u8]) -> Option<Quote<'_>> {
    let v6 = q.first()? >> 4 == 6;
    let (tos, ttl, mut p, l4at, l4_len, src, dst);
    if v6 {
        if q.len() < ipv6::HEADER {
            return None;
        }
        (tos, ttl, src, dst) = (q[0] << 4 | q[1] >> 4, q[7], u128_at(q, 8), u128_at(q, 24));
        let mut at = ipv6::HEADER;
        p = q[6];
        for _ in 0..=ipv6::MAX_EXT_HEADERS {
            match p {
                next::HOP_BY_HOP | next::ROUTING | next::DEST_OPTIONS => {
                    let h = q.get(at..at + 2)?;
                    p = h[0];
                    at += (usize::from(h[1]) + 1) * 8;
                }
                next::FRAGMENT => {
                    let h = q.get(at..at + 8)?;
                    if be16(h, 2..4) >> 3 != 0 {
                        return None;
                    }
                    p = h[0];
                    at += 8;
                }
                _ => break,
            }
        }
        l4at = at;
        l4_len = usize::from(be16(q, 4..6)).checked_sub(at - ipv6::HEADER)?;
        if p == next::ICMPV6 {
            p = proto::ICMP;
        } else if p != proto::TCP && p != proto::UDP {
            return None;
        }
    } else {
        if q.len() < field::HEADER_MIN || q[0] >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(q[0] & 0x0f) * 4;
        if ihl < field::HEADER_MIN || be16(q, field::FLAGS_FRAG) & 0x1fff != 0 {
            return None;
        }
        (tos, ttl, p, src, dst) =
            (q[1], q[field::TTL], q[field::PROTOCOL], u128::from(u32_at(q, 12)), u128::from(u32_at(q, 16)));
        l4at = ihl;
        l4_len = usize::from(be16(q, field::LENGTH)).checked_sub(ihl)?;
    }
    let l4 = q.get(l4at..).filter(|l| l.len() >= 8)?;
    let (sport, dport) = match p {
        proto::TCP | proto::UDP => (be16(l4, 0..2), be16(l4, 2..4)),
        proto::ICMP if echo_other(l4[0], !v6).is_some() => (be16(l4, 4..6), be16(l4, 4..6)),
        _ => return None,
    };
    Some(Quote { v6, tos, ttl, proto: p, l4_len, src, dst, sport, dport, l4 })
}

/// What an ICMP error (type `kind`, `code`, the 32 bits after the
/// checksum `rest`) becomes in ICMPv6 (RFC 7915 §4.2): (type, code,
/// parameter), `None` for what is dropped. A Fragmentation Needed's MTU
/// grows by 20 bytes, is at most `mtu6` (the IPv6 next hop's) and at
/// least 1,280 (RFC 8021: never an atomic fragment); an MTU of 0 (a
/// router before RFC 1191) is taken from RFC 1191's plateaus below the
/// quoted packet's length `quoted_len`.
pub fn error_to_v6(kind: u8, code: u8, rest: u32, quoted_len: usize, mtu6: u16) -> Option<(u8, u8, u32)> {
    use super::icmpv6::icmpv6_type as t6;
    const PLATEAUS: [u32; 11] = [65535, 32000, 17914, 8166, 4352, 2002, 1492, 1006, 508, 296, 68];
    Some(match (kind, code) {
        (icmp_type::DEST_UNREACHABLE, 0 | 1 | 5 | 6 | 7 | 8 | 11 | 12) => (t6::DEST_UNREACHABLE, 0, 0),
        // Protocol unreachable: Parameter Problem at Next Header.
        (icmp_type::DEST_UNREACHABLE, 2) => (t6::PARAMETER_PROBLEM, 1, 6),
        (icmp_type::DEST_UNREACHABLE, 3) => (t6::DEST_UNREACHABLE, 4, 0),
        (icmp_type::DEST_UNREACHABLE, 4) => {
            let mut mtu = rest & 0xffff;
            if mtu == 0 {
                mtu = PLATEAUS.into_iter().find(|&p| (p as usize) < quoted_len).unwrap_or(68);
            }
            let mtu = (mtu + 20).min(u32::from(mtu6)).max(ipv6_min());
            (t6::PACKET_TOO_BIG, 0, mtu)
        }
        (icmp_type::DEST_UNREACHABLE, 9 | 10 | 13 | 15) => (t6::DEST_UNREACHABLE, 1, 0),
        (icmp_type::TIME_EXCEEDED, c @ (0 | 1)) => (t6::TIME_EXCEEDED, c, 0),
        (icmp_type::PARAMETER_PROBLEM, 0 | 2) => {
            let ptr = match rest >> 24 {
                0 => 0,
                1 => 1,
                2 | 3 => 4,
                8 => 7,
                9 => 6,
                12..=15 => 8,
                16..=19 => 24,
                _ => return None,
            };
            (t6::PARAMETER_PROBLEM, 0, ptr)
        }
        _ => return None,
    })
}

fn ipv6_min() -> u32 {
    super::icmpv6::MIN_MTU as u32
}

/// What an ICMPv6 error becomes in ICMP (RFC 7915 §5.2): (type, code,
/// the 32 bits after the checksum), `None` for what is dropped. A Packet
/// Too Big's MTU shrinks by 20 bytes and is at most `mtu4` (the IPv4 next
/// hop's).
pub fn error_to_v4(kind: u8, code: u8, param: u32, mtu4: u16) -> Option<(u8, u8, u32)> {
    use super::icmpv6::icmpv6_type as t6;
    Some(match (kind, code) {
        (t6::DEST_UNREACHABLE, 0 | 2 | 3) => (icmp_type::DEST_UNREACHABLE, 1, 0),
        (t6::DEST_UNREACHABLE, 1) => (icmp_type::DEST_UNREACHABLE, 10, 0),
        (t6::DEST_UNREACHABLE, 4) => (icmp_type::DEST_UNREACHABLE, 3, 0),
        (t6::PACKET_TOO_BIG, 0) => {
            let mtu = param.saturating_sub(20).min(u32::from(mtu4)).min(0xffff);
            (icmp_type::DEST_UNREACHABLE, 4, mtu)
        }
        (t6::TIME_EXCEEDED, c @ (0 | 1)) => (icmp_type::TIME_EXCEEDED, c, 0),
        (t6::PARAMETER_PROBLEM, 0) => {
            let ptr: u32 = match param {
                0 => 0,
                1 => 1,
                4 | 5 => 2,
                6 => 9,
                7 => 8,
                8..=23 => 12,
                24..=39 => 16,
                _ => return None,
            };
            (icmp_type::PARAMETER_PROBLEM, 0, ptr << 24)
        }
        (t6::PARAMETER_PROBLEM, 1) => (icmp_type::DEST_UNREACHABLE, 2, 0),
        _ => return None,
    })
}

/// The two ends of the packet an error quotes, as the error's receiver
/// sent it: addresses (IPv4 in the low 32 bits) and ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotedEnds {
    pub src: u128,
    pub sport: u16,
    pub dst: u128,
    pub dport: u16,
}

/// Writes into `out` an error of family `v6` (`kind`, `code`, `param` in
/// that family's numbering, as [`error_to_v6`] and [`error_to_v4`] give)
/// from `src` to `dst` with hop limit or TTL `hops`, quoting `q`
/// translated to the same family with the ends `ends` (and its checksum
/// brought along where the quote holds it): as much as keeps the error
/// within 1,280 bytes (IPv6) or [`ICMP4_MAX`] (IPv4). Returns its length,
/// or 0 when `out` is too short.
#[allow(clippy::too_many_arguments)]
pub fn build_error(
    out: &mut [u8],
    v6: bool,
    (kind, code, param): (u8, u8, u32),
    src: u128,
    dst: u128,
    hops: u8,
    q: &Quote<'_>,
    ends: QuotedEnds,
) -> usize {
    let (outer, max) = if v6 { (ipv6::HEADER, super::icmpv6::MIN_MTU) } else { (field::HEADER_MIN, ICMP4_MAX) };
    let inner = outer;
    let at = outer + 8 + inner;
    let n = q.l4.len().min(max - at);
    let total = at + n;
    if out.len() < total {
        return 0;
    }
    let icmp_len = total - outer;
    // The quoted datagram, in this family.
    let qp = if v6 && q.proto == proto::ICMP { next::ICMPV6 } else { q.proto };
    let qh = &mut out[outer + 8..at];
    if v6 {
        write_ipv6(qh, q.tos, q.l4_len, qp, q.ttl, ends.src, ends.dst);
    } else {
        let qtotal = field::HEADER_MIN + q.l4_len;
        let df = if qtotal > DF_THRESHOLD { 0x4000 } else { 0 };
        write_ipv4(qh, q.tos, qtotal, 0, df, q.ttl, qp, ends.src as u32, ends.dst as u32);
    }
    let icmp = q.proto == proto::ICMP;
    let mut d = Delta::default();
    pseudo(&mut d, q.v6, q.src, q.dst, icmp, q.l4_len, false);
    pseudo(&mut d, v6, ends.src, ends.dst, icmp, q.l4_len, true);
    let l4 = &mut out[at..total];
    l4.copy_from_slice(&q.l4[..n]);
    if icmp && q.v6 == v6 {
        // Same family: the echo keeps its type; only the identifier moves.
        let mut e = d;
        e.word(be16(l4, 4..6), ends.sport);
        l4[4..6].copy_from_slice(&ends.sport.to_be_bytes());
        let c = e.apply(be16(l4, 2..4));
        l4[2..4].copy_from_slice(&c.to_be_bytes());
    } else {
        rewrite_l4(l4, q.proto, d, v6, ends.sport, ends.dport, false);
    }
    // The outer header and the error's own header and checksum.
    if v6 {
        write_ipv6(&mut out[..outer], 0, icmp_len, next::ICMPV6, hops, src, dst);
    } else {
        write_ipv4(&mut out[..outer], 0, total, 0, 0, hops, proto::ICMP, src as u32, dst as u32);
    }
    let e = &mut out[outer..total];
    e[0] = kind;
    e[1] = code;
    e[2..4].copy_from_slice(&[0, 0]);
    e[4..8].copy_from_slice(&param.to_be_bytes());
    let c = if v6 { ipv6::checksum6(src, dst, next::ICMPV6, e) } else { checksum::checksum(e) };
    e[2..4].copy_from_slice(&c.to_be_bytes());
    total
}

/// Whether the ICMP (`v6` false) or ICMPv6 message `l4` of a packet from
/// `src` to `dst` has a correct checksum.
pub fn icmp_checksum_ok(v6: bool, src: u128, dst: u128, l4: &[u8]) -> bool {
    let mut s = checksum::sum(l4);
    if v6 {
        s += checksum::sum(&src.to_be_bytes()) + checksum::sum(&dst.to_be_bytes());
        s += l4.len() as u64 + u64::from(next::ICMPV6);
    }
    checksum::fold(s) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ipv6::checksum6;
    use crate::wire::Ipv4Packet;
    use proptest::prelude::*;

    const C6: u128 = 0xfd00_00aa_0000_0000_0000_0000_0000_0010;
    const E6: u128 = 0xfd00_00aa_0000_0000_0000_0000_0000_0005;
    const NAT: u32 = 0x0a63_0001;
    const BACKEND: u32 = 0x0a62_000a;

    fn v6_packet(p: u8, l4: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 40];
        write_ipv6(&mut b, 0x28, l4.len(), p, 64, C6, E6);
        let mut l4 = l4.to_vec();
        let at = match p {
            proto::TCP => 16,
            proto::UDP => 6,
            _ => 2,
        };
        l4[at..at + 2].copy_from_slice(&[0, 0]);
        let c = checksum6(C6, E6, p, &l4);
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        b.extend_from_slice(&l4);
        b
    }

    fn l4_of(p: u8, data: &[u8]) -> Vec<u8> {
        let mut l4 = match p {
            proto::TCP => vec![0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0],
            proto::UDP => vec![0x9c, 0x40, 0, 53, 0, 0, 0, 0],
            _ => vec![128, 0, 0, 0, 0x12, 0x34, 0, 1],
        };
        l4.extend_from_slice(data);
        if p == proto::UDP {
            let n = l4.len() as u16;
            l4[4..6].copy_from_slice(&n.to_be_bytes());
        }
        l4
    }

    fn v4_l4_ok(p: &[u8]) -> bool {
        let v = Ipv4Packet::new_checked(p).expect("a valid IPv4 header");
        let l4 = v.payload();
        let mut s = checksum::sum(l4);
        if v.protocol() != proto::ICMP {
            s += checksum::sum(&v.src_addr().to_be_bytes()) + checksum::sum(&v.dst_addr().to_be_bytes());
            s += l4.len() as u64 + u64::from(v.protocol());
        }
        checksum::fold(s) == 0xffff
    }

    fn v6_l4_ok(p: &[u8]) -> bool {
        let v = ipv6::Ipv6Packet::new_checked(p).expect("a valid IPv6 packet");
        checksum::fold(
            checksum::sum(v.payload())
                + checksum::sum(&v.src_addr().to_be_bytes())
                + checksum::sum(&v.dst_addr().to_be_bytes())
                + v.payload().len() as u64
                + u64::from(v.protocol()),
        ) == 0xffff
    }

    proptest! {
        /// Any TCP, UDP or echo packet translated 6 → 4 and back keeps a
        /// correct checksum each way (incremental = recomputed), its
        /// payload, and becomes the same bytes again with the ends it had.
        #[test]
        fn six_to_four_and_back_keeps_checksums_and_payload(
            p in prop_oneof![Just(proto::TCP), Just(proto::UDP), Just(next::ICMPV6)],
            data in proptest::collection::vec(any::<u8>(), 0..1400),
            ports in (1u16.., 1u16..),
        ) {
            let pkt = v6_packet(p, &l4_of(p, &data));
            let len = pkt.len();
            let mut buf = pkt.clone();
            buf.resize(len + GROWTH, 0);
            let n = to_ipv4(&mut buf, len, 40, p, NAT, BACKEND, Some(ports), 7, None, false).expect("fits");
            prop_assert_eq!(n, len - 20);
            prop_assert!(v4_l4_ok(&buf[..n]));
            let v = Ipv4Packet::new_checked(&buf[..n]).expect("valid");
            prop_assert_eq!((v.ttl(), v.dont_frag()), (63, n > DF_THRESHOLD));
            let back_ports = if p == next::ICMPV6 { (0x1234, 0x1234) } else { (0x9c40, if p == proto::TCP { 80 } else { 53 }) };
            let echo_ports = if p == next::ICMPV6 { (ports.0, ports.0) } else { ports };
            prop_assert_eq!(&buf[n - data.len()..n], &data[..]);
            if p != next::ICMPV6 {
                prop_assert_eq!((be16(&buf[20..], 0..2), be16(&buf[20..], 2..4)), echo_ports);
            }
            // Back: the echo request comes back as a request here, only to
            // test the arithmetic.
            buf[8] = 65;
            let m = to_ipv6(&mut buf, n, 20, C6, E6, Some(back_ports), None, false).expect("room");
            prop_assert_eq!(m, len);
            prop_assert!(v6_l4_ok(&buf[..m]));
            let mut want = pkt.clone();
            want[7] = 64;
            prop_assert_eq!(&buf[..m], &want[..], "the same packet again");
        }
    }

    #[test]
    fn a_udp_datagram_without_checksum_gets_one_in_ipv6() {
        let mut b = vec![0u8; 20];
        write_ipv4(&mut b, 0, 20 + 12, 0, 0x4000, 64, proto::UDP, BACKEND, NAT);
        b.extend_from_slice(&[0, 53, 0x9c, 0x40, 0, 12, 0, 0, 1, 2, 3, 4]);
        b.resize(b.len() + GROWTH, 0);
        let n = to_ipv6(&mut b, 32, 20, E6, C6, Some((53, 40000)), None, false).expect("room");
        assert_ne!(be16(&b[40..], 6..8), 0);
        assert!(v6_l4_ok(&b[..n]));
        let mut tight = b[..32].to_vec();
        assert_eq!(to_ipv6(&mut tight, 32, 20, E6, C6, Some((53, 40000)), None, false), None, "no room to grow");
    }

    #[test]
    fn mapped_addresses_round_trip_and_nothing_else_unmaps() {
        assert_eq!(unmapped(mapped(NAT)), Some(NAT));
        assert_eq!(mapped(0x0a00_0001), u128::from(std::net::Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped()));
        assert_eq!(unmapped(C6), None);
    }

    #[test]
    fn error_types_map_as_rfc_7915_says() {
        use crate::wire::icmpv6::icmpv6_type as t6;
        assert_eq!(error_to_v6(3, 3, 0, 100, 1500), Some((t6::DEST_UNREACHABLE, 4, 0)));
        assert_eq!(error_to_v6(3, 4, 1300, 1400, 1500), Some((t6::PACKET_TOO_BIG, 0, 1320)));
        assert_eq!(error_to_v6(3, 4, 1000, 1400, 1500), Some((t6::PACKET_TOO_BIG, 0, 1280)), "never below 1280");
        assert_eq!(error_to_v6(3, 4, 1480, 1500, 1400), Some((t6::PACKET_TOO_BIG, 0, 1400)), "the IPv6 hop's MTU");
        assert_eq!(error_to_v6(3, 4, 0, 1500, 9000), Some((t6::PACKET_TOO_BIG, 0, 1492 + 20)), "a plateau");
        assert_eq!(error_to_v6(11, 0, 0, 100, 1500), Some((t6::TIME_EXCEEDED, 0, 0)));
        assert_eq!(error_to_v6(3, 2, 0, 100, 1500), Some((t6::PARAMETER_PROBLEM, 1, 6)));
        assert_eq!(error_to_v6(12, 0, 9 << 24, 100, 1500), Some((t6::PARAMETER_PROBLEM, 0, 6)));
        assert_eq!(error_to_v6(5, 0, 0, 100, 1500), None, "redirect");
        assert_eq!(error_to_v4(t6::PACKET_TOO_BIG, 0, 1300, 1500), Some((3, 4, 1280)));
        assert_eq!(error_to_v4(t6::PACKET_TOO_BIG, 0, 1500, 1300), Some((3, 4, 1300)), "the IPv4 hop's MTU");
        assert_eq!(error_to_v4(t6::DEST_UNREACHABLE, 4, 0, 1500), Some((3, 3, 0)));
        assert_eq!(error_to_v4(t6::DEST_UNREACHABLE, 1, 0, 1500), Some((3, 10, 0)));
        assert_eq!(error_to_v4(t6::TIME_EXCEEDED, 1, 0, 1500), Some((11, 1, 0)));
        assert_eq!(error_to_v4(t6::PARAMETER_PROBLEM, 0, 6, 1500), Some((12, 0, 9 << 24)));
        assert_eq!(error_to_v4(t6::PARAMETER_PROBLEM, 1, 0, 1500), Some((3, 2, 0)));
        assert_eq!(error_to_v4(t6::PARAMETER_PROBLEM, 2, 0, 1500), None);
    }

    #[test]
    fn an_error_about_an_ipv4_packet_becomes_an_icmpv6_error_quoting_it_in_ipv6() {
        // What the backend got: NAT:5000 -> BACKEND:53, UDP, 1000 bytes.
        let mut q = vec![0u8; 20];
        write_ipv4(&mut q, 0, 20 + 1008, 0, 0, 63, proto::UDP, NAT, BACKEND);
        let mut udp = vec![0x13, 0x88, 0, 53, 0x03, 0xf0, 0, 0];
        udp.extend_from_slice(&[7u8; 1000]);
        let c = crate::checksum::checksum(
            &[&NAT.to_be_bytes()[..], &BACKEND.to_be_bytes(), &[0, 17, 0x03, 0xf0], &udp].concat(),
        );
        udp[6..8].copy_from_slice(&c.to_be_bytes());
        q.extend_from_slice(&udp[..548 - 20 - 8 - 20]);
        let quote = parse_quote(&q).expect("a quote");
        assert_eq!((quote.sport, quote.dport, quote.l4_len, quote.proto), (5000, 53, 1008, proto::UDP));
        let ends = QuotedEnds { src: C6, sport: 40000, dst: E6, dport: 53 };
        let mut out = [0u8; 1280];
        let kind = error_to_v6(3, 3, 0, 1028, 1500).expect("mapped");
        let n = build_error(&mut out, true, kind, E6, C6, 63, &quote, ends);
        assert_eq!(n, 40 + 8 + 40 + quote.l4.len());
        let v = ipv6::Ipv6Packet::new_checked(&out[..n]).expect("valid");
        assert!(icmp_checksum_ok(true, E6, C6, v.payload()));
        let inner = parse_quote(&v.payload()[8..]).expect("an IPv6 quote");
        assert_eq!((inner.src, inner.dst, inner.sport, inner.dport, inner.l4_len), (C6, E6, 40000, 53, 1008));
        // Back to IPv4 (as a consumer's error would go): the same quote.
        let kind4 = error_to_v4(1, 4, 0, 1500).expect("mapped");
        let ends4 = QuotedEnds { src: u128::from(NAT), sport: 5000, dst: u128::from(BACKEND), dport: 53 };
        let mut out4 = [0u8; 1280];
        let m = build_error(&mut out4, false, kind4, u128::from(BACKEND), u128::from(NAT), 63, &inner, ends4);
        assert_eq!(m, ICMP4_MAX.min(20 + 8 + 20 + inner.l4.len()));
        assert!(icmp_checksum_ok(false, 0, 0, &out4[20..m]));
        assert_eq!(&out4[28..m], &q[..m - 28], "the IPv4 quote as the backend sent it");
    }
}
