//! ICMP (RFC 792, RFC 1812 4.3.2.7): the errors privlink builds and the
//! ones it translates (RFC 5508: the quoted packet is rewritten too), and
//! echo identifiers.

use super::*;
use crate::addr::End;
use crate::checksum::Delta;

/// ICMP message types used here.
pub mod icmp_type {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACHABLE: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAMETER_PROBLEM: u8 = 12;
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
pub fn rewrite_quoted(icmp: &mut [u8], q: &Quoted, src: End, dst: End) {
    let mut pseudo = Delta::default();
    pseudo.dword(q.src, src.addr);
    pseudo.dword(q.dst, dst.addr);
    {
        let h = &mut icmp[q.ip..q.l4];
        h[field::SRC].copy_from_slice(&src.addr.to_be_bytes());
        h[field::DST].copy_from_slice(&dst.addr.to_be_bytes());
        let c = pseudo.apply(be16(h, field::CHECKSUM));
        put16(h, field::CHECKSUM, c);
    }
    let l4 = &mut icmp[q.l4..];
    match q.proto {
        proto::ICMP => {
            // A quoted echo: the identifier is the "port" on both sides.
            let id = if l4[0] == icmp_type::ECHO_REQUEST { src.port } else { dst.port };
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
            d.word(be16(l4, field::SRC_PORT), src.port);
            d.word(be16(l4, field::DST_PORT), dst.port);
            put16(l4, field::SRC_PORT, src.port);
            put16(l4, field::DST_PORT, dst.port);
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
