//! Zero-copy views over IPv4 packets and the transport headers privlink
//! rewrites, one file per protocol (as smoltcp's `wire/`): `ipv4`, `tcp`
//! (with the sequence, acknowledgement and SACK words), `icmp`, and
//! `transport` (parsing the L4 header once, and the port rewrite TCP and
//! UDP share), and `ipv6` and `icmpv6` (the IPv6 view with its
//! extension-header chain walked once, the address rewrite, and the
//! ICMPv6 errors a router sends).
//!
//! [`Ipv4Packet::new_checked`] validates a buffer the way the kernel's
//! `ip_rcv_core` does (version, IHL, total length, header checksum) and
//! [`Transport::parse`] validates the L4 header (TCP data offset, UDP length,
//! ICMP minimum size). After that, every accessor is a fixed-offset read with no
//! further checks, and the rewriting setters keep checksums right incrementally.
//! IPv4 and UDP field offsets live in `field`; TCP's in `tcp.rs`. (The
//! outbox reads the virtio-net header at offsets of its own.)

mod icmp;
pub mod icmpv6;
mod ipv4;
pub mod ipv6;
pub mod nat64;
pub mod tcp;
mod transport;

pub use icmp::*;
pub use ipv4::*;
pub use tcp::{build_tcp, build_tcp_rst, strip_tcp_payload, tcp_flags, tcp_timestamps, TcpSegment};
pub use transport::*;

/// Largest packet privlink builds: an ICMP error (IP header, ICMP header,
/// and the original IP header, up to 60 bytes, plus 8 bytes: 96), or a
/// PROXY header segment (IP, TCP with timestamps, and the longest header,
/// 54 bytes: 106), or an ICMPv6 error quoting as much of its packet as
/// fits IPv6's minimum MTU (RFC 4443 §2.4 (c): 1,280).
pub const REPLY_MAX: usize = 1280;

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
