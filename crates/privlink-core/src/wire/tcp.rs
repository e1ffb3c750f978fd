//! TCP (RFC 9293) as privlink touches it: flags, segments it builds (RST,
//! the PROXY header segment), the timestamps option (RFC 7323), and the
//! sequence, acknowledgement and SACK words it reads and moves, each
//! change corrected in the checksum (RFC 1624).

use super::*;
use crate::checksum::Delta;

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
    let seg = TcpSegment::<crate::addr::V4> {
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

/// The header fields of a TCP segment privlink makes (over IPv4, or IPv6
/// with `F` = [`V6`](crate::addr::V6)).
#[derive(Debug, Clone, Copy)]
pub struct TcpSegment<F: crate::addr::Family = crate::addr::V4> {
    pub src: F::Addr,
    pub sport: u16,
    pub dst: F::Addr,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// The timestamps option (value, echo reply; RFC 7323 §3), if any.
    pub ts: Option<(u32, u32)>,
}

/// Writes an IPv4 packet (DF, TTL 64), or an IPv6 one (hop limit 64) for
/// `F` = `V6`, carrying a TCP segment (`seg`'s fields; a 20-byte header,
/// 32 with timestamps as NOP, NOP, TS; payload written by `body`, which
/// returns its length) with complete checksums; returns the packet's
/// length. `out` must hold 72 bytes plus the payload.
pub fn build_tcp<F: crate::addr::Family>(
    out: &mut [u8],
    seg: TcpSegment<F>,
    body: impl FnOnce(&mut [u8]) -> usize,
) -> usize {
    let th = if seg.ts.is_some() { 32 } else { 20 };
    let ip = if F::VERSION == 6 { super::ipv6::HEADER } else { 20 };
    let hl = ip + th;
    let plen = body(&mut out[hl..]);
    let total = hl + plen;
    let o = &mut out[..total];
    o[..hl].fill(0);
    let a = F::ADDR_BYTES;
    if F::VERSION == 6 {
        o[0] = 0x60;
        o[4..6].copy_from_slice(&((total - ip) as u16).to_be_bytes());
        o[6] = proto::TCP;
        o[7] = 64;
        F::put_addr(&mut o[8..], seg.src);
        F::put_addr(&mut o[8 + a..], seg.dst);
    } else {
        o[0] = 0x45;
        o[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        o[6] = 0x40; // DF
        o[8] = 64;
        o[9] = proto::TCP;
        F::put_addr(&mut o[12..], seg.src);
        F::put_addr(&mut o[12 + a..], seg.dst);
        let c = crate::checksum::checksum(&o[..20]);
        o[10..12].copy_from_slice(&c.to_be_bytes());
    }
    {
        let t = &mut o[ip..hl];
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
    // The pseudo-header's sum (both addresses, protocol, length), then
    // the segment's.
    let addrs = ip - 2 * a;
    let mut sum = crate::checksum::sum(&o[addrs..ip]);
    sum += u64::from(proto::TCP) + (total - ip) as u64;
    sum += crate::checksum::sum(&o[ip..]);
    let c = !crate::checksum::fold(sum);
    o[ip + 16..ip + 18].copy_from_slice(&c.to_be_bytes());
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
    let mut pseudo = if buf[0] >> 4 == 6 {
        // IPv6 (`ihl` the upper-layer offset): the payload length, no
        // header checksum; the pseudo-header's addresses at 8..40.
        put16(buf, 4..6, (total - super::ipv6::HEADER) as u16);
        crate::checksum::sum(&buf[8..40])
    } else {
        let old = be16(buf, field::LENGTH);
        put16(buf, field::LENGTH, total as u16);
        let mut d = Delta::default();
        d.word(old, total as u16);
        let c = d.apply(be16(buf, field::CHECKSUM));
        put16(buf, field::CHECKSUM, c);
        crate::checksum::sum(&buf[field::SRC.start..field::DST.end])
    };
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

#[inline(always)]
fn get32(l4: &[u8], at: usize) -> u32 {
    match l4.get(at..at + 4) {
        Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]),
        _ => 0,
    }
}

/// Writes `v` at `at` of a TCP header; unless the checksum is partial
/// (it then covers only the pseudo-header), corrects it incrementally.
#[inline]
fn put32(l4: &mut [u8], at: usize, v: u32, partial: bool) {
    let old = get32(l4, at);
    if old == v {
        return;
    }
    l4[at..at + 4].copy_from_slice(&v.to_be_bytes());
    if !partial {
        let mut d = Delta::default();
        d.word((old >> 16) as u16, (v >> 16) as u16);
        d.word(old as u16, v as u16);
        let c = d.apply(u16::from_be_bytes([l4[16], l4[17]]));
        l4[16..18].copy_from_slice(&c.to_be_bytes());
    }
}

/// The sequence number of a TCP header.
#[inline(always)]
pub fn seq(l4: &[u8]) -> u32 {
    get32(l4, 4)
}

/// The acknowledgement number of a TCP header.
#[inline(always)]
pub fn ack(l4: &[u8]) -> u32 {
    get32(l4, 8)
}

/// The window field of a TCP header (unscaled, as sent).
#[inline]
pub fn window(l4: &[u8]) -> u16 {
    u16::from_be_bytes([l4[14], l4[15]])
}

/// Sets the sequence number (checksum corrected unless `partial`).
#[inline]
pub fn set_seq(l4: &mut [u8], v: u32, partial: bool) {
    put32(l4, 4, v, partial);
}

/// Sets the acknowledgement number (checksum corrected unless `partial`).
#[inline]
pub fn set_ack(l4: &mut [u8], v: u32, partial: bool) {
    put32(l4, 8, v, partial);
}

/// Moves every SACK block edge of a TCP header down by `by` (a backend's
/// SACK names consumer sequence numbers as the backend sees them).
pub fn shift_sack(l4: &mut [u8], by: u32, partial: bool) {
    let end = (usize::from(l4[12] >> 4) * 4).min(l4.len());
    let mut i = 20;
    while i < end {
        match l4[i] {
            0 => return,
            1 => i += 1,
            kind => {
                let Some(&len) = l4.get(i + 1) else { return };
                let len = usize::from(len);
                if len < 2 || i + len > end {
                    return;
                }
                if kind == 5 {
                    let mut at = i + 2;
                    while at + 4 <= i + len {
                        let v = get32(l4, at).wrapping_sub(by);
                        put32(l4, at, v, partial);
                        at += 4;
                    }
                }
                i += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_and_sack_edits_keep_the_checksum() {
        use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
        let mut v = Vec::new();
        let sack =
            etherparse::TcpOptionElement::SelectiveAcknowledgement((1000, 2000), [Some((3000, 4000)), None, None]);
        PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1, 2, 500, 100)
            .ack(900)
            .options(&[etherparse::TcpOptionElement::Noop, etherparse::TcpOptionElement::Noop, sack])
            .expect("options")
            .write(&mut v, b"data")
            .expect("build");
        let l4 = &mut v[20..];
        set_seq(l4, seq(l4).wrapping_add(36), false);
        set_ack(l4, ack(l4).wrapping_sub(36), false);
        shift_sack(l4, 36, false);
        let p = SlicedPacket::from_ip(&v).expect("parses");
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { panic!() };
        let Some(TransportSlice::Tcp(t)) = p.transport else { panic!() };
        let h = t.to_header();
        assert_eq!((h.sequence_number, h.acknowledgment_number), (536, 864));
        assert_eq!(h.calc_checksum_ipv4(&ip.header().to_header(), t.payload()).expect("sum"), h.checksum);
        let blocks: Vec<_> = h.options_iterator().filter_map(Result::ok).collect();
        assert!(blocks.contains(&etherparse::TcpOptionElement::SelectiveAcknowledgement(
            (964, 1964),
            [Some((2964, 3964)), None, None]
        )));
    }
}
