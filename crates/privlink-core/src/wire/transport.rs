//! The transport header of a packet, parsed once (TCP, UDP, ICMP), and
//! the port rewrite TCP and UDP share (UDP's zero checksum stays zero,
//! RFC 768).

use super::*;
use crate::checksum::Delta;

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
