//! Zero-copy views over IPv4 packets and the transport headers privlink rewrites.
//!
//! [`Ipv4Packet::new_checked`] validates a buffer the way the kernel's
//! `ip_rcv_core` does (version, IHL, total length, header checksum) and
//! [`Transport::parse`] validates the L4 header (TCP data offset, UDP length,
//! ICMP minimum size). After that, every accessor is a fixed-offset read with no
//! further checks, and the rewriting setters keep checksums right incrementally.
//! IPv4 and UDP field offsets live in `field`. (TCP's sequence and
//! acknowledgement words and options are read at fixed offsets by
//! `proxy.rs` and `conntrack`'s caller, and the outbox reads the
//! virtio-net header's: those offsets are not in `field` yet.)

use crate::checksum::Delta;
use std::net::Ipv4Addr;

/// Largest packet privlink builds: an ICMP error (IP header, ICMP header,
/// and the original IP header, up to 60 bytes, plus 8 bytes: 96), or a
/// PROXY header segment (IP, TCP with timestamps, and the longest header,
/// 54 bytes: 106).
pub const REPLY_MAX: usize = 128;

/// Byte ranges of the IPv4 header (RFC 791) and the transport headers.
pub mod field {
    use std::ops::Range;
    pub const VER_IHL: usize = 0;
    pub const LENGTH: Range<usize> = 2..4;
    pub const IDENT: Range<usize> = 4..6;
    pub const FLAGS_FRAG: Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC: Range<usize> = 12..16;
    pub const DST: Range<usize> = 16..20;
    pub const HEADER_MIN: usize = 20;

    pub const SRC_PORT: Range<usize> = 0..2;
    pub const DST_PORT: Range<usize> = 2..4;
    pub const TCP_DATA_OFF: usize = 12;
    pub const TCP_FLAGS: usize = 13;
    pub const TCP_CHECKSUM: Range<usize> = 16..18;
    pub const TCP_HEADER_MIN: usize = 20;
    pub const UDP_LENGTH: Range<usize> = 4..6;
    pub const UDP_CHECKSUM: Range<usize> = 6..8;
    pub const UDP_HEADER: usize = 8;
    pub const ICMP_TYPE: usize = 0;
    pub const ICMP_CODE: usize = 1;
    pub const ICMP_CHECKSUM: Range<usize> = 2..4;
    pub const ICMP_IDENT: Range<usize> = 4..6;
    pub const ICMP_HEADER: usize = 8;
}

/// IP protocol numbers privlink translates.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// TCP flag bits (byte 13 of the header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;

    /// Whether a segment's flags are a combination TCP ever sends: Linux
    /// conntrack's table (`tcp_valid_flags`), PSH, ECE and CWR aside. SYN
    /// with FIN or RST, FIN without ACK and no flags at all are scans or
    /// attacks, never a connection.
    #[inline]
    pub fn valid(flags: u8) -> bool {
        const VALID: [bool; 64] = {
            let mut t = [false; 64];
            let ok = [SYN, SYN | URG, SYN | ACK, RST, RST | ACK, FIN | ACK, FIN | ACK | URG, ACK, ACK | URG];
            let mut i = 0;
            while i < ok.len() {
                t[ok[i] as usize] = true;
                i += 1;
            }
            t
        };
        VALID[usize::from(flags & (FIN | SYN | RST | ACK | URG))]
    }
}

/// ICMP message types used here.
pub mod icmp_type {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACHABLE: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
}

/// Why a buffer is not a packet the kernel would accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    Truncated,
    Version,
    HeaderLength,
    TotalLength,
    HeaderChecksum,
    TcpDataOffset,
    UdpLength,
    /// An IP option whose length runs past the header.
    Options,
}

#[inline]
fn be16(b: &[u8], r: std::ops::Range<usize>) -> u16 {
    u16::from_be_bytes([b[r.start], b[r.start + 1]])
}

#[inline]
fn be32(b: &[u8], r: std::ops::Range<usize>) -> u32 {
    u32::from_be_bytes([b[r.start], b[r.start + 1], b[r.start + 2], b[r.start + 3]])
}

#[inline]
fn put16(b: &mut [u8], r: std::ops::Range<usize>, v: u16) {
    b[r].copy_from_slice(&v.to_be_bytes());
}

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

/// The transport header of a non-fragmented (or first-fragment) packet, as far
/// as NAT cares: which protocol, the two "ports" and the TCP flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        src: u16,
        dst: u16,
        flags: u8,
        /// Header length in bytes (data offset x 4).
        header_len: u8,
    },
    Udp {
        src: u16,
        dst: u16,
    },
    /// An ICMP message; `ident` is meaningful for echo request/reply only.
    Icmp {
        kind: u8,
        code: u8,
        ident: u16,
    },
    /// Any other protocol; not translated.
    Other(u8),
}

impl Transport {
    /// Validates and reads the L4 header in `l4` (the IP payload).
    pub fn parse(protocol: u8, l4: &[u8]) -> Result<Transport, Malformed> {
        Self::parse_in(protocol, l4, true)
    }

    /// As [`parse`](Self::parse) for the first fragment of a datagram
    /// (`whole` false): the UDP length covers the whole datagram, so it may
    /// exceed what this fragment carries.
    #[inline(always)]
    pub fn parse_in(protocol: u8, l4: &[u8], whole: bool) -> Result<Transport, Malformed> {
        match protocol {
            proto::TCP => {
                if l4.len() < field::TCP_HEADER_MIN {
                    return Err(Malformed::Truncated);
                }
                let off = usize::from(l4[field::TCP_DATA_OFF] >> 4) * 4;
                if off < field::TCP_HEADER_MIN || off > l4.len() {
                    return Err(Malformed::TcpDataOffset);
                }
                Ok(Transport::Tcp {
                    src: be16(l4, field::SRC_PORT),
                    dst: be16(l4, field::DST_PORT),
                    flags: l4[field::TCP_FLAGS],
                    header_len: off as u8,
                })
            }
            proto::UDP => {
                if l4.len() < field::UDP_HEADER {
                    return Err(Malformed::Truncated);
                }
                let ulen = usize::from(be16(l4, field::UDP_LENGTH));
                if (whole && ulen != l4.len()) || (!whole && ulen <= l4.len()) {
                    return Err(Malformed::UdpLength);
                }
                Ok(Transport::Udp { src: be16(l4, field::SRC_PORT), dst: be16(l4, field::DST_PORT) })
            }
            proto::ICMP => {
                if l4.len() < field::ICMP_HEADER {
                    return Err(Malformed::Truncated);
                }
                Ok(Transport::Icmp {
                    kind: l4[field::ICMP_TYPE],
                    code: l4[field::ICMP_CODE],
                    ident: be16(l4, field::ICMP_IDENT),
                })
            }
            p => Ok(Transport::Other(p)),
        }
    }
}

/// Rewrites the ports of a TCP or UDP header in `l4`, folding `pseudo` (the
/// address change from [`Ipv4Packet::forward_rewrite`]) into its checksum.
/// With `partial`, the checksum field is an offload's partial sum (see
/// [`Delta::apply_partial`]): the ports are covered later by the device, so
/// only the address change goes in.
#[inline]
pub fn set_ports(protocol: u8, l4: &mut [u8], src: u16, dst: u16, pseudo: Delta, partial: bool) {
    let at = if protocol == proto::TCP { field::TCP_CHECKSUM } else { field::UDP_CHECKSUM };
    if partial {
        put16(l4, field::SRC_PORT, src);
        put16(l4, field::DST_PORT, dst);
        let c = pseudo.apply_partial(be16(l4, at.clone()));
        put16(l4, at, c);
        return;
    }
    let mut d = pseudo;
    d.word(be16(l4, field::SRC_PORT), src);
    d.word(be16(l4, field::DST_PORT), dst);
    put16(l4, field::SRC_PORT, src);
    put16(l4, field::DST_PORT, dst);
    if protocol == proto::TCP {
        let c = d.apply(be16(l4, field::TCP_CHECKSUM));
        put16(l4, field::TCP_CHECKSUM, c);
    } else {
        let c = d.apply_udp(be16(l4, field::UDP_CHECKSUM));
        put16(l4, field::UDP_CHECKSUM, c);
    }
}

/// Rewrites an ICMP echo identifier (ICMP has no pseudo-header).
#[inline]
pub fn set_icmp_ident(l4: &mut [u8], ident: u16) {
    let mut d = Delta::default();
    d.word(be16(l4, field::ICMP_IDENT), ident);
    put16(l4, field::ICMP_IDENT, ident);
    let c = d.apply(be16(l4, field::ICMP_CHECKSUM));
    put16(l4, field::ICMP_CHECKSUM, c);
}

/// Writes an ICMP error (`kind`/`code`, 4 bytes `rest`) from `src` to `dst`
/// quoting the IP header and first 8 payload bytes of `orig` (RFC 792) into
/// `out`; returns its length. `out` must hold 96 bytes.
pub fn build_icmp_error(out: &mut [u8], orig: &[u8], src: u32, dst: u32, kind: u8, code: u8, rest: u32) -> usize {
    let ihl = usize::from(orig[field::VER_IHL] & 0x0f) * 4;
    let quoted = orig.len().min(ihl + 8);
    let total = field::HEADER_MIN + field::ICMP_HEADER + quoted;
    let out = &mut out[..total];
    out[..field::HEADER_MIN].copy_from_slice(&[
        0x45,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        64,
        proto::ICMP,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    put16(out, field::LENGTH, total as u16);
    out[field::SRC].copy_from_slice(&src.to_be_bytes());
    out[field::DST].copy_from_slice(&dst.to_be_bytes());
    let c = crate::checksum::checksum(&out[..field::HEADER_MIN]);
    put16(out, field::CHECKSUM, c);
    let icmp = &mut out[field::HEADER_MIN..];
    icmp[field::ICMP_TYPE] = kind;
    icmp[field::ICMP_CODE] = code;
    icmp[2..4].copy_from_slice(&[0, 0]);
    icmp[4..8].copy_from_slice(&rest.to_be_bytes());
    icmp[8..].copy_from_slice(&orig[..quoted]);
    let c = crate::checksum::checksum(icmp);
    put16(icmp, field::ICMP_CHECKSUM, c);
    total
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

/// True for ICMP types that are error messages (RFC 792/1812), about which
/// no ICMP error is ever sent.
#[inline]
pub fn is_icmp_error(kind: u8) -> bool {
    matches!(kind, 3 | 4 | 5 | 11 | 12)
}

/// The packet quoted inside an ICMP error (RFC 792: the IP header and at
/// least 8 bytes of its payload), located within the ICMP message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quoted {
    /// Offset of the quoted IP header within the ICMP message.
    pub ip: usize,
    /// Offset of the quoted transport header within the ICMP message.
    pub l4: usize,
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
    /// Ports; for a quoted ICMP echo, the identifier as `src` and `dst`.
    pub sport: u16,
    pub dport: u16,
}

/// Validates an ICMP error message `icmp` (its checksum, and the quoted
/// IPv4 header with 8 bytes of transport header behind it) and reads the
/// quoted packet's addresses and ports.
pub fn parse_icmp_error(icmp: &[u8]) -> Option<Quoted> {
    if crate::checksum::fold(crate::checksum::sum(icmp)) != 0xffff {
        return None;
    }
    let ip = field::ICMP_HEADER;
    let q = icmp.get(ip..)?;
    if q.len() < field::HEADER_MIN || q[field::VER_IHL] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(q[field::VER_IHL] & 0x0f) * 4;
    if ihl < field::HEADER_MIN || q.len() < ihl + 8 {
        return None;
    }
    let proto = q[field::PROTOCOL];
    let l4 = &q[ihl..];
    let (sport, dport) = match proto {
        proto::TCP | proto::UDP => (be16(l4, field::SRC_PORT), be16(l4, field::DST_PORT)),
        proto::ICMP if matches!(l4[0], icmp_type::ECHO_REQUEST | icmp_type::ECHO_REPLY) => {
            let id = be16(l4, field::ICMP_IDENT);
            (id, id)
        }
        _ => return None,
    };
    Some(Quoted { ip, l4: ip + ihl, proto, src: be32(q, field::SRC), dst: be32(q, field::DST), sport, dport })
}

/// Rewrites the quoted packet of an ICMP error in place (addresses, ports
/// or echo identifier, the quoted IP header checksum, and the quoted
/// transport checksum where the quote holds it), then the ICMP checksum.
pub fn rewrite_quoted(icmp: &mut [u8], q: &Quoted, src: (u32, u16), dst: (u32, u16)) {
    let mut pseudo = Delta::default();
    pseudo.dword(q.src, src.0);
    pseudo.dword(q.dst, dst.0);
    {
        let h = &mut icmp[q.ip..q.l4];
        h[field::SRC].copy_from_slice(&src.0.to_be_bytes());
        h[field::DST].copy_from_slice(&dst.0.to_be_bytes());
        let c = pseudo.apply(be16(h, field::CHECKSUM));
        put16(h, field::CHECKSUM, c);
    }
    let l4 = &mut icmp[q.l4..];
    match q.proto {
        proto::ICMP => {
            // A quoted echo: the identifier is the "port" on both sides.
            let id = if l4[0] == icmp_type::ECHO_REQUEST { src.1 } else { dst.1 };
            let mut d = Delta::default();
            d.word(be16(l4, field::ICMP_IDENT), id);
            put16(l4, field::ICMP_IDENT, id);
            if l4.len() >= 4 {
                let c = d.apply(be16(l4, field::ICMP_CHECKSUM));
                put16(l4, field::ICMP_CHECKSUM, c);
            }
        }
        p => {
            let mut d = pseudo;
            d.word(be16(l4, field::SRC_PORT), src.1);
            d.word(be16(l4, field::DST_PORT), dst.1);
            put16(l4, field::SRC_PORT, src.1);
            put16(l4, field::DST_PORT, dst.1);
            let at = if p == proto::TCP { field::TCP_CHECKSUM } else { field::UDP_CHECKSUM };
            if l4.len() >= at.end {
                let old = be16(l4, at.clone());
                let c = if p == proto::UDP { d.apply_udp(old) } else { d.apply(old) };
                put16(l4, at, c);
            }
        }
    }
    // The quote changed in many places: recompute the ICMP checksum over the
    // message (an error is at most 576 bytes, and errors are rare).
    icmp[field::ICMP_CHECKSUM].copy_from_slice(&[0, 0]);
    let c = crate::checksum::checksum(icmp);
    put16(icmp, field::ICMP_CHECKSUM, c);
}

/// Writes into `out` a TCP RST answering the segment `orig` (an IPv4
/// packet) as its destination would (RFC 793 "Reset Generation"): to an
/// ACK, `seq = its ack`; otherwise `ack = its seq + its length` with ACK
/// set. Returns the RST's length (40), or 0 when `orig` is too short.
pub fn build_tcp_rst(out: &mut [u8], orig: &[u8]) -> usize {
    let Some(ihl) = orig.first().map(|b| usize::from(b & 0x0f) * 4) else { return 0 };
    if orig.len() < ihl + field::TCP_HEADER_MIN || out.len() < 40 {
        return 0;
    }
    let (src, dst) = (be32(orig, field::SRC), be32(orig, field::DST));
    let t = &orig[ihl..];
    let (sport, dport) = (be16(t, field::SRC_PORT), be16(t, field::DST_PORT));
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
    let flags = t[field::TCP_FLAGS];
    let off = usize::from(t[field::TCP_DATA_OFF] >> 4) * 4;
    let total = usize::from(be16(orig, field::LENGTH));
    let payload = total.saturating_sub(ihl + off) as u32;
    let seg_len = payload + u32::from(flags & tcp_flags::SYN != 0) + u32::from(flags & tcp_flags::FIN != 0);
    let (rseq, rack, rflags) = if flags & tcp_flags::ACK != 0 {
        (ack, 0, tcp_flags::RST)
    } else {
        (0, seq.wrapping_add(seg_len), tcp_flags::RST | tcp_flags::ACK)
    };
    let seg = TcpSegment {
        src: dst,
        sport: dport,
        dst: src,
        dport: sport,
        seq: rseq,
        ack: rack,
        flags: rflags,
        window: 0,
        ts: None,
    };
    build_tcp(out, seg, |_| 0)
}

/// The header fields of a TCP segment privlink makes.
#[derive(Debug, Clone, Copy)]
pub struct TcpSegment {
    pub src: u32,
    pub sport: u16,
    pub dst: u32,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// The timestamps option (value, echo reply; RFC 7323 §3), if any.
    pub ts: Option<(u32, u32)>,
}

/// Writes an IPv4 packet (DF, TTL 64) carrying a TCP segment (`seg`'s
/// fields; a 20-byte header, 32 with timestamps as NOP, NOP, TS; payload
/// written by `body`, which returns its length) with complete checksums;
/// returns the packet's length. `out` must hold 52 bytes plus the payload.
pub fn build_tcp(out: &mut [u8], seg: TcpSegment, body: impl FnOnce(&mut [u8]) -> usize) -> usize {
    let th = if seg.ts.is_some() { 32 } else { 20 };
    let hl = 20 + th;
    let plen = body(&mut out[hl..]);
    let total = hl + plen;
    let o = &mut out[..total];
    o[..hl].fill(0);
    o[0] = 0x45;
    o[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    o[6] = 0x40; // DF
    o[8] = 64;
    o[9] = proto::TCP;
    o[12..16].copy_from_slice(&seg.src.to_be_bytes());
    o[16..20].copy_from_slice(&seg.dst.to_be_bytes());
    let c = crate::checksum::checksum(&o[..20]);
    o[10..12].copy_from_slice(&c.to_be_bytes());
    {
        let t = &mut o[20..hl];
        t[0..2].copy_from_slice(&seg.sport.to_be_bytes());
        t[2..4].copy_from_slice(&seg.dport.to_be_bytes());
        t[4..8].copy_from_slice(&seg.seq.to_be_bytes());
        t[8..12].copy_from_slice(&seg.ack.to_be_bytes());
        t[12] = ((th / 4) as u8) << 4;
        t[13] = seg.flags;
        t[14..16].copy_from_slice(&seg.window.to_be_bytes());
        if let Some((val, ecr)) = seg.ts {
            t[20..24].copy_from_slice(&[1, 1, 8, 10]);
            t[24..28].copy_from_slice(&val.to_be_bytes());
            t[28..32].copy_from_slice(&ecr.to_be_bytes());
        }
    }
    // The pseudo-header's sum, then the segment's.
    let mut sum = crate::checksum::sum(&o[12..20]);
    sum += u64::from(proto::TCP) + (total as u64 - 20);
    sum += crate::checksum::sum(&o[20..]);
    let c = !crate::checksum::fold(sum);
    o[36..38].copy_from_slice(&c.to_be_bytes());
    total
}

/// Drops the data of the TCP segment in IPv4 packet `buf` (header of
/// `ihl` bytes, already validated): the total length shrinks to the
/// headers, the IP checksum is corrected and the TCP one recomputed (with
/// `partial`, the field gets the pseudo-header sum a device completes).
/// The packet is then `packet_len(buf)` bytes long.
pub fn strip_tcp_payload(buf: &mut [u8], ihl: usize, partial: bool) {
    let th = usize::from(buf[ihl + 12] >> 4) * 4;
    let total = ihl + th;
    let old = be16(buf, field::LENGTH);
    put16(buf, field::LENGTH, total as u16);
    let mut d = Delta::default();
    d.word(old, total as u16);
    let c = d.apply(be16(buf, field::CHECKSUM));
    put16(buf, field::CHECKSUM, c);
    let mut pseudo = crate::checksum::sum(&buf[field::SRC.start..field::DST.end]);
    pseudo += u64::from(proto::TCP) + th as u64;
    let at = ihl + 16;
    if partial {
        put16(buf, at..at + 2, crate::checksum::fold(pseudo));
    } else {
        put16(buf, at..at + 2, 0);
        let c = !crate::checksum::fold(pseudo + crate::checksum::sum(&buf[ihl..total]));
        put16(buf, at..at + 2, c);
    }
}

/// The timestamps option of a TCP header `l4` (value, echo reply), if it
/// carries one (RFC 7323 §3; the option walk stops at anything malformed).
pub fn tcp_timestamps(l4: &[u8]) -> Option<(u32, u32)> {
    let end = (usize::from(*l4.get(12)? >> 4) * 4).min(l4.len());
    let mut i = 20;
    while i < end {
        match l4[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = usize::from(*l4.get(i + 1)?);
                if len < 2 || i + len > end {
                    return None;
                }
                if kind == 8 && len == 10 {
                    return Some((be32(l4, i + 2..i + 6), be32(l4, i + 6..i + 10)));
                }
                i += len;
            }
        }
    }
    None
}

/// The length of the IPv4 packet at the start of `buf`: its header's total
/// length when that is shorter than what was read (Ethernet padding or
/// other trailing bytes, which Linux's `ip_rcv` trims too), else all of
/// `buf` (a total length past what was read is left for validation to
/// call malformed). A GSO super-packet's total length is its header's.
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
        _ => buf.len(),
    }
}

/// A source no router forwards from (RFC 1812 5.3.7): "this network"
/// (0/8), loopback, multicast, reserved (240/4) and broadcast.
#[inline]
pub fn is_martian_source(addr: u32) -> bool {
    let first = addr >> 24;
    first == 0 || first == 127 || first >= 224
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(total: usize) -> Vec<u8> {
        let mut v = vec![0u8; total];
        v[..20].copy_from_slice(&[0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 1, 0, 5]);
        v[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        let c = crate::checksum::checksum(&v[..20]);
        v[10..12].copy_from_slice(&c.to_be_bytes());
        v
    }

    #[test]
    fn accepts_minimal_header() {
        let p = Ipv4Packet::new_checked(ip(28)).expect("valid");
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.ttl(), 64);
        assert!(p.dont_frag());
        assert!(!p.is_fragment());
    }

    #[test]
    fn rejects_bad_lengths_and_checksum() {
        for n in [0usize, 1, 19] {
            assert_eq!(Ipv4Packet::new_checked(vec![0x45; n]).err(), Some(Malformed::Truncated));
        }
        let mut v = ip(28);
        v[0] = 0x44;
        assert_eq!(Ipv4Packet::new_checked(v).err(), Some(Malformed::HeaderLength));
        let mut v = ip(28);
        v[0] = 0x4f; // 60 bytes of header in a 28-byte buffer
        assert_eq!(Ipv4Packet::new_checked(v).err(), Some(Malformed::HeaderLength));
        let mut v = ip(28);
        v.push(0);
        assert_eq!(Ipv4Packet::new_checked(v).err(), Some(Malformed::TotalLength));
        let mut v = ip(28);
        v[15] ^= 1;
        assert_eq!(Ipv4Packet::new_checked(v).err(), Some(Malformed::HeaderChecksum));
        let mut v = ip(28);
        v[0] = 0x65;
        assert_eq!(Ipv4Packet::new_checked(v).err(), Some(Malformed::Version));
    }

    #[test]
    fn transport_validation() {
        let mut tcp = [0u8; 20];
        tcp[12] = 4 << 4;
        assert_eq!(Transport::parse(proto::TCP, &tcp), Err(Malformed::TcpDataOffset));
        tcp[12] = 6 << 4;
        assert_eq!(Transport::parse(proto::TCP, &tcp), Err(Malformed::TcpDataOffset));
        tcp[12] = 5 << 4;
        assert!(matches!(Transport::parse(proto::TCP, &tcp), Ok(Transport::Tcp { header_len: 20, .. })));
        let mut udp = [0u8; 12];
        udp[4..6].copy_from_slice(&8u16.to_be_bytes());
        assert_eq!(Transport::parse(proto::UDP, &udp), Err(Malformed::UdpLength));
        udp[4..6].copy_from_slice(&12u16.to_be_bytes());
        assert!(Transport::parse(proto::UDP, &udp).is_ok());
        assert_eq!(Transport::parse(proto::ICMP, &[8, 0, 0]), Err(Malformed::Truncated));
        assert_eq!(Transport::parse(47, &[]), Ok(Transport::Other(47)));
    }

    #[test]
    fn ttl_decrement_keeps_checksum_valid() {
        let mut p = Ipv4Packet::new_checked(ip(28)).expect("valid");
        p.decrement_ttl();
        let v = p.into_inner();
        assert_eq!(v[8], 63);
        assert!(Ipv4Packet::new_checked(v).is_ok());
    }

    #[test]
    fn icmp_error_is_well_formed() {
        let orig = ip(28);
        let mut out = [0u8; 96];
        let n = build_icmp_error(&mut out, &orig, 0x0a01_0005, 0x0a00_0001, icmp_type::TIME_EXCEEDED, 0, 0);
        assert_eq!(n, 20 + 8 + 28);
        let p = Ipv4Packet::new_checked(&out[..n]).expect("valid ip");
        assert_eq!(crate::checksum::fold(crate::checksum::sum(p.payload())), 0xffff);
        assert_eq!(&p.payload()[8..], &orig[..]);
    }
}
