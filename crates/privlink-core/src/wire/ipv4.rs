//! IPv4 (RFC 791): the validated packet view and its in-place rewrites,
//! the fragmenter, trimming to the total length, and which sources and
//! destinations a router would refuse (RFC 1812).

use super::*;
use crate::checksum::Delta;
use std::net::Ipv4Addr;

/// A validated IPv4 packet. Construction checks every length the accessors
/// rely on, so accessors index without further checks.
#[derive(Debug)]
pub struct Ipv4Packet<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Validates `buf` as one whole IPv4 packet: version 4, IHL >= 5, header
    /// inside the buffer, total length equal to the buffer length (a TUN read
    /// carries no link padding), header checksum correct.
    pub fn new_checked(buf: T) -> Result<Self, Malformed> {
        let b = buf.as_ref();
        if b.len() < field::HEADER_MIN {
            return Err(Malformed::Truncated);
        }
        if b[field::VER_IHL] >> 4 != 4 {
            return Err(Malformed::Version);
        }
        let ihl = usize::from(b[field::VER_IHL] & 0x0f) * 4;
        if ihl < field::HEADER_MIN || ihl > b.len() {
            return Err(Malformed::HeaderLength);
        }
        let total = usize::from(be16(b, field::LENGTH));
        if total != b.len() {
            return Err(Malformed::TotalLength);
        }
        if crate::checksum::fold(crate::checksum::sum(&b[..ihl])) != 0xffff {
            return Err(Malformed::HeaderChecksum);
        }
        Ok(Ipv4Packet { buf })
    }

    /// Wraps a buffer already known to be valid (built by this crate).
    pub fn new_unchecked(buf: T) -> Self {
        Ipv4Packet { buf }
    }

    #[inline]
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.b()[field::VER_IHL] & 0x0f) * 4
    }
    #[inline]
    pub fn total_len(&self) -> usize {
        usize::from(be16(self.b(), field::LENGTH))
    }
    #[inline]
    pub fn ttl(&self) -> u8 {
        self.b()[field::TTL]
    }
    #[inline]
    pub fn protocol(&self) -> u8 {
        self.b()[field::PROTOCOL]
    }
    #[inline]
    pub fn ident(&self) -> u16 {
        be16(self.b(), field::IDENT)
    }
    #[inline]
    pub fn src_addr(&self) -> u32 {
        be32(self.b(), field::SRC)
    }
    #[inline]
    pub fn dst_addr(&self) -> u32 {
        be32(self.b(), field::DST)
    }
    #[inline]
    pub fn dont_frag(&self) -> bool {
        be16(self.b(), field::FLAGS_FRAG) & 0x4000 != 0
    }
    /// True for a fragment other than the first (non-zero offset).
    #[inline]
    pub fn is_later_fragment(&self) -> bool {
        be16(self.b(), field::FLAGS_FRAG) & 0x1fff != 0
    }
    /// True for any fragment: more-fragments set or a non-zero offset.
    #[inline]
    pub fn is_fragment(&self) -> bool {
        be16(self.b(), field::FLAGS_FRAG) & 0x3fff != 0
    }
    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.b(), field::CHECKSUM)
    }
    #[inline(always)]
    pub fn payload(&self) -> &[u8] {
        &self.b()[self.header_len()..]
    }
    pub fn into_inner(self) -> T {
        self.buf
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    #[inline]
    fn bm(&mut self) -> &mut [u8] {
        self.buf.as_mut()
    }
    /// Decrements TTL, updating the header checksum incrementally.
    #[inline]
    pub fn decrement_ttl(&mut self) {
        let b = self.bm();
        let old = u16::from_be_bytes([b[field::TTL], b[field::PROTOCOL]]);
        b[field::TTL] -= 1;
        let new = u16::from_be_bytes([b[field::TTL], b[field::PROTOCOL]]);
        let mut d = Delta::default();
        d.word(old, new);
        let c = d.apply(be16(b, field::CHECKSUM));
        put16(b, field::CHECKSUM, c);
    }
    /// Rewrites both addresses, fixing the header checksum; returns the change
    /// to the pseudo-header for the transport checksum.
    #[inline]
    pub fn set_addrs(&mut self, src: u32, dst: u32) -> Delta {
        let b = self.bm();
        let mut d = Delta::default();
        d.dword(be32(b, field::SRC), src);
        d.dword(be32(b, field::DST), dst);
        b[field::SRC].copy_from_slice(&src.to_be_bytes());
        b[field::DST].copy_from_slice(&dst.to_be_bytes());
        let c = d.apply(be16(b, field::CHECKSUM));
        put16(b, field::CHECKSUM, c);
        d
    }
    /// Decrements TTL and rewrites both addresses with one incremental
    /// update of the header checksum (the forwarding step of a NAT); returns
    /// the pseudo-header change for the transport checksum.
    #[inline]
    pub fn forward_rewrite(&mut self, src: u32, dst: u32) -> Delta {
        let b = self.bm();
        let old_tp = u16::from_be_bytes([b[field::TTL], b[field::PROTOCOL]]);
        b[field::TTL] -= 1;
        let new_tp = u16::from_be_bytes([b[field::TTL], b[field::PROTOCOL]]);
        let mut pseudo = Delta::default();
        pseudo.dword(be32(b, field::SRC), src);
        pseudo.dword(be32(b, field::DST), dst);
        b[field::SRC].copy_from_slice(&src.to_be_bytes());
        b[field::DST].copy_from_slice(&dst.to_be_bytes());
        let mut ip = pseudo;
        ip.word(old_tp, new_tp);
        let c = ip.apply(be16(b, field::CHECKSUM));
        put16(b, field::CHECKSUM, c);
        pseudo
    }
    #[inline(always)]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let h = self.header_len();
        &mut self.bm()[h..]
    }
}

/// Splits a packet into fragments of at most `mtu` bytes (RFC 791): each
/// gets the header (options included), its share of the payload (a
/// multiple of 8 bytes but the last), the offset and more-fragments flag,
/// and a fresh header checksum. A packet that is itself a fragment keeps its
/// place in the original datagram.
#[derive(Debug)]
pub struct Fragmenter<'a> {
    pkt: &'a [u8],
    ihl: usize,
    chunk: usize,
    at: usize,
}

impl<'a> Fragmenter<'a> {
    /// `pkt` must be a valid IPv4 packet; `None` when `mtu` cannot carry
    /// its header plus 8 bytes.
    pub fn new(pkt: &'a [u8], mtu: usize) -> Option<Fragmenter<'a>> {
        let ihl = usize::from(pkt[field::VER_IHL] & 0x0f) * 4;
        let chunk = mtu.checked_sub(ihl)? & !7;
        (chunk >= 8).then_some(Fragmenter { pkt, ihl, chunk, at: ihl })
    }

    /// Writes the next fragment into `out` (at least `mtu` bytes) and
    /// returns its length.
    pub fn next_into(&mut self, out: &mut [u8]) -> Option<usize> {
        let (pkt, ihl) = (self.pkt, self.ihl);
        if self.at >= pkt.len() {
            return None;
        }
        let take = self.chunk.min(pkt.len() - self.at);
        let last = self.at + take == pkt.len();
        let len = ihl + take;
        out[..ihl].copy_from_slice(&pkt[..ihl]);
        out[ihl..len].copy_from_slice(&pkt[self.at..self.at + take]);
        let orig = be16(pkt, field::FLAGS_FRAG);
        let offset = (orig & 0x1fff) + ((self.at - ihl) / 8) as u16;
        let more = !last || orig & 0x2000 != 0;
        put16(out, field::FLAGS_FRAG, (orig & 0x4000) | if more { 0x2000 } else { 0 } | offset);
        put16(out, field::LENGTH, len as u16);
        put16(out, field::CHECKSUM, 0);
        let c = crate::checksum::checksum(&out[..ihl]);
        put16(out, field::CHECKSUM, c);
        self.at += take;
        Some(len)
    }
}

/// The length of the IPv4 packet at the start of `buf`: its header's total
/// length when that is shorter than what was read (Ethernet padding or
/// other trailing bytes, which Linux's `ip_rcv` trims too), else all of
/// `buf` (a total length past what was read is left for validation to
/// call malformed). A GSO super-packet's total length is its header's.
/// For an IPv6 packet the same with its payload length plus the 40-byte
/// header (Linux's `ipv6_rcv` trims so too).
#[inline(always)]
pub fn packet_len(buf: &[u8]) -> usize {
    match *buf {
        [v, _, hi, lo, ..] if v >> 4 == 4 => {
            let total = usize::from(u16::from_be_bytes([hi, lo]));
            if total >= field::HEADER_MIN && total < buf.len() {
                total
            } else {
                buf.len()
            }
        }
        [v, _, _, _, hi, lo, ..] if v >> 4 == 6 => {
            let total = super::ipv6::HEADER + usize::from(u16::from_be_bytes([hi, lo]));
            if total > super::ipv6::HEADER && total < buf.len() {
                total
            } else {
                buf.len()
            }
        }
        _ => buf.len(),
    }
}

/// Whether an IPv4 header's options (`header[20..]`) hold a loose or strict
/// source route, which privlink drops as routers do by default (Linux's
/// `accept_source_route = 0`). `Err` when the option list is malformed.
pub fn source_routed(header: &[u8]) -> Result<bool, Malformed> {
    let mut opts = header.get(field::HEADER_MIN..).unwrap_or(&[]);
    while let Some(&kind) = opts.first() {
        match kind {
            0 => return Ok(false),
            1 => opts = &opts[1..],
            _ => {
                let len = usize::from(*opts.get(1).ok_or(Malformed::Options)?);
                if len < 2 || len > opts.len() {
                    return Err(Malformed::Options);
                }
                if kind == 0x83 || kind == 0x89 {
                    return Ok(true);
                }
                opts = &opts[len..];
            }
        }
    }
    Ok(false)
}

/// True for addresses an ICMP error may be sent to (RFC 1812 4.3.2.7): not
/// unspecified, limited broadcast, multicast or class E.
#[inline]
pub fn is_unicast(addr: u32) -> bool {
    let a = Ipv4Addr::from(addr);
    !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || addr >> 28 == 0xf)
}
