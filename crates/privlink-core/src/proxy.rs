//! PROXY protocol v2 in a NAT (docs/PROXY-PROTOCOL.md).
//!
//! privlink does not terminate TCP, so it adds the header to a stream it
//! only forwards: when the consumer's segment that completes its handshake
//! passes, privlink sends the backend one segment of its own carrying the
//! header, made to look like the consumer's next segment (its
//! acknowledgement, window and timestamps), at the sequence numbers right
//! after the consumer's SYN (`isn + 1 .. isn + 1 + L`); data in the SYN
//! (TCP Fast Open) is held back for the consumer to send again. From
//! then on every consumer segment's sequence number is moved up by `L`
//! toward the backend, and every backend acknowledgement (and SACK edge)
//! moved down by `L` toward the consumer, so each end sees a consistent
//! stream: the backend one that starts with the header, the consumer the one
//! it sent. The header is its own segment, so no consumer segment grows and
//! no MSS changes.
//!
//! The header is sent again whenever a backend segment shows it was not
//! received (an acknowledgement that does not cover it), and once a second
//! for flows whose backend said nothing: the control thread's scan queues
//! them ([`Engine::queue_proxy_resends`](crate::Engine::queue_proxy_resends))
//! and a worker sends them through its outbox
//! ([`Worker::send_resends`](crate::Worker::send_resends)): a server-first
//! protocol (SMTP, MySQL, SSH) waits for the header before it greets, and
//! the consumer waits for the greeting. TCP discards duplicate data, so a
//! header sent twice is read once.
//!
//! Per flow this needs the consumer's initial sequence number and what the
//! header segment repeats (in the slot's cold half) and one state bit
//! (`HDR_ACKED`); the header itself is rebuilt from the flow's keys, its
//! endpoint's link id and its service's TLV kind whenever it is sent.

use crate::addr::{End, Family, V4};
use crate::flow::{FlowTable, FlowView};
use crate::spec::ProxyTlv;

/// The v2 signature.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const VER_CMD: u8 = 0x21;
/// The address family and protocol byte: AF_INET or AF_INET6, STREAM.
const fn family_byte<F: Family>() -> u8 {
    if F::VERSION == 4 {
        0x11
    } else {
        0x21
    }
}

/// Bytes of the header for `tlv` with IPv4 addresses.
pub fn header_len(tlv: ProxyTlv) -> usize {
    header_len_for::<V4>(tlv)
}

/// Bytes of the header for `tlv` with addresses of family `F` (two
/// addresses and two ports after the 16 fixed bytes: 12 for IPv4, 36 for
/// IPv6; PROXY protocol v2 §2.2).
pub fn header_len_for<F: Family>(tlv: ProxyTlv) -> usize {
    16 + 2 * (F::ADDR_BYTES + 2) + tlv_len(tlv)
}

fn tlv_len(tlv: ProxyTlv) -> usize {
    match tlv {
        ProxyTlv::None => 0,
        ProxyTlv::Azure => 3 + 1 + 4,
        ProxyTlv::Aws => 3 + 1 + 22,
        ProxyTlv::Gcp => 3 + 8,
    }
}

/// AWS's endpoint id: `vpce-` and 17 hex digits.
pub fn aws_endpoint_id(link_id: u64) -> String {
    format!("vpce-{link_id:017x}")
}

/// A connection's link id as its service's TLV carries it, which is what a
/// backend logs: Azure's `linkIdentifier` is the low 32 bits in decimal,
/// AWS's endpoint id `vpce-` and 17 hex digits, GCP's the 64-bit number;
/// without a TLV (or without PROXY protocol), the whole id in decimal.
pub fn link_id_shown(tlv: Option<ProxyTlv>, link_id: u64) -> String {
    match tlv {
        Some(ProxyTlv::Azure) => (link_id as u32).to_string(),
        Some(ProxyTlv::Aws) => aws_endpoint_id(link_id),
        Some(ProxyTlv::Gcp) | Some(ProxyTlv::None) | None => link_id.to_string(),
    }
}

/// Writes the header (the consumer's end `src` as it sent it, the
/// endpoint's `dst`) into `out`; returns its length
/// ([`header_len_for`]). The family is the consumer's: an IPv6 consumer's
/// header carries IPv6 addresses whatever the backend's family.
pub fn write_header<F: Family>(out: &mut [u8], tlv: ProxyTlv, link_id: u64, src: End<F>, dst: End<F>) -> usize {
    let n = header_len_for::<F>(tlv);
    let a = F::ADDR_BYTES;
    let o = &mut out[..n];
    o[..12].copy_from_slice(&SIGNATURE);
    o[12] = VER_CMD;
    o[13] = family_byte::<F>();
    o[14..16].copy_from_slice(&((n - 16) as u16).to_be_bytes());
    F::put_addr(&mut o[16..], src.addr);
    F::put_addr(&mut o[16 + a..], dst.addr);
    o[16 + 2 * a..18 + 2 * a].copy_from_slice(&src.port.to_be_bytes());
    o[18 + 2 * a..20 + 2 * a].copy_from_slice(&dst.port.to_be_bytes());
    let t = &mut o[20 + 2 * a..];
    match tlv {
        ProxyTlv::None => {}
        ProxyTlv::Azure => {
            t[..3].copy_from_slice(&[0xEE, 0, 5]);
            t[3] = 0x01;
            t[4..8].copy_from_slice(&(link_id as u32).to_le_bytes());
        }
        ProxyTlv::Aws => {
            t[..3].copy_from_slice(&[0xEA, 0, 23]);
            t[3] = 0x01;
            t[4..26].copy_from_slice(aws_endpoint_id(link_id).as_bytes());
        }
        ProxyTlv::Gcp => {
            t[..3].copy_from_slice(&[0xE0, 0, 8]);
            t[3..11].copy_from_slice(&link_id.to_be_bytes());
        }
    }
    n
}

/// Builds the PROXY header segment of flow `v` into `out`: from its NAT
/// address and port to its backend, at the consumer's ISN + 1, with the
/// acknowledgement, window and timestamps of the consumer's segment that
/// completed the handshake (RFC 7323 §3.2: once both SYNs carried
/// timestamps, every segment does); returns its length.
///
/// The header carries the consumer's family (an IPv6 consumer's addresses
/// with family TCP over IPv6, also toward an IPv4 backend); the segment
/// goes in the backend's family (a 6->4 flow's provider side is
/// IPv4-mapped in its key: the segment is IPv4). Returns 0 for a flow of
/// mixed families, which no configuration makes.
pub(crate) fn segment<F: Family>(
    flows: &FlowTable<F>,
    v: &FlowView<F>,
    link_id: u64,
    tlv: ProxyTlv,
    out: &mut [u8],
) -> usize {
    use std::net::IpAddr;
    let isn = flows.proxy_isn(v);
    let (ack, window, ts) = flows.proxy_ack(v);
    let (c, p) = (v.ckey, v.pkey);
    let (nat, be) = (p.nat(), p.backend());
    let header = |o: &mut [u8]| write_header::<F>(o, tlv, link_id, c.consumer(), c.endpoint());
    let flags = crate::wire::tcp_flags::ACK | crate::wire::tcp_flags::PSH;
    let seq = isn.wrapping_add(1);
    let v4 = |src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr| crate::wire::TcpSegment::<V4> {
        src: src.into(),
        sport: nat.port,
        dst: dst.into(),
        dport: be.port,
        seq,
        ack,
        flags,
        window,
        ts,
    };
    match (F::ip(nat.addr), F::ip(be.addr)) {
        (IpAddr::V4(n), IpAddr::V4(b)) => crate::wire::build_tcp(out, v4(n, b), header),
        (IpAddr::V6(n), IpAddr::V6(b)) => match (n.to_ipv4_mapped(), b.to_ipv4_mapped()) {
            (Some(n), Some(b)) => crate::wire::build_tcp(out, v4(n, b), header),
            _ => {
                let seg = crate::wire::TcpSegment::<crate::addr::V6> {
                    src: n.into(),
                    sport: nat.port,
                    dst: b.into(),
                    dport: be.port,
                    seq,
                    ack,
                    flags,
                    window,
                    ts,
                };
                crate::wire::build_tcp(out, seg, header)
            }
        },
        _ => 0,
    }
}

/// Moves the sequence number of a TCP header `l4` quoted by an ICMP error
/// (a segment privlink sent the backend of a PROXY flow whose consumer's
/// ISN is `isn`) back into the consumer's numbering, by the header's
/// length `hl`; the checksum follows when the quote holds it. Returns
/// false for a quote of the header segment itself, which privlink made
/// and no consumer should hear about.
pub(crate) fn unshift_quoted_seq(l4: &mut [u8], isn: u32, hl: u32) -> bool {
    let seq = crate::wire::tcp::seq(l4);
    if seq.wrapping_sub(isn.wrapping_add(1)) < hl {
        return false;
    }
    let back = seq.wrapping_sub(hl);
    if l4.len() >= 18 {
        crate::wire::tcp::set_seq(l4, back, false);
    } else {
        l4[4..8].copy_from_slice(&back.to_be_bytes());
    }
    true
}

/// Whether flow `v` (its state as read) waits for its PROXY header to be
/// sent again: its consumer completed the handshake (so the header went)
/// and its backend has not acknowledged the header.
pub(crate) fn wants_resend<F: Family>(v: &FlowView<F>) -> bool {
    use crate::conntrack::{state, TcpPhase};
    v.state & state::ESTABLISHED != 0
        && v.state & state::HDR_ACKED == 0
        && v.protocol() == crate::Protocol::Tcp
        && matches!(v.phase(), TcpPhase::Opening | TcpPhase::Established)
}

impl crate::Engine {
    /// Queues, for the workers to send, the header segment of each live
    /// TCP flow of a PROXY service whose header the backend has not
    /// acknowledged and which nothing has brought again (the header was
    /// lost and the backend said nothing since: a server-first protocol
    /// waits for it). The daemon's control thread calls this once a second;
    /// the scan of the table stays off the packet threads, and what leaves
    /// goes out through a worker's outbox like every other packet
    /// ([`Worker::send_resends`](crate::Worker::send_resends)). Returns how
    /// many were queued (at most the queue's room; the rest wait a second).
    pub fn queue_proxy_resends(&self) -> usize {
        let snap = self.snap.load();
        // No PROXY service: no scan of the table.
        if snap.endpoints.iter().all(|e| e.proxy.is_none()) {
            return 0;
        }
        let mut n = 0;
        let proxied = |e| snap.endpoint_by_id(e).is_some_and(|e| e.proxy.is_some());
        self.flows.for_each_live(|r| {
            if wants_resend(&r.view) && proxied(r.view.endpoint) {
                n += usize::from(self.resends.push(r.view).is_ok());
            }
        });
        if let Some(t) = self.flows6() {
            t.for_each_live(|r| {
                if wants_resend(&r.view) && proxied(r.view.endpoint) {
                    n += usize::from(self.resends6.push(r.view).is_ok());
                }
            });
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(addr: u32, port: u16) -> End {
        End::new(addr, port)
    }

    #[test]
    fn headers_are_laid_out_as_the_specification_and_the_clouds_say() {
        let mut b = [0u8; 64];
        let n = write_header(&mut b, ProxyTlv::None, 7, End::<V4>::new(0x0a01_000a, 40000), End::new(0x0a01_0005, 80));
        assert_eq!(n, 28);
        assert_eq!(&b[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(&b[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&b[16..28], &[10, 1, 0, 10, 10, 1, 0, 5, 0x9c, 0x40, 0, 80]);

        let n = write_header(&mut b, ProxyTlv::Azure, 0x1234_5678_9abc_def0, e(1, 2), e(3, 4));
        assert_eq!((n, &b[14..16]), (36, &[0u8, 20][..]));
        assert_eq!(&b[28..36], &[0xEE, 0, 5, 0x01, 0xf0, 0xde, 0xbc, 0x9a]);

        let n = write_header(&mut b, ProxyTlv::Aws, 0xabc, e(1, 2), e(3, 4));
        assert_eq!(n, 54);
        assert_eq!(&b[28..32], &[0xEA, 0, 23, 0x01]);
        assert_eq!(&b[32..54], b"vpce-00000000000000abc");

        let n = write_header(&mut b, ProxyTlv::Gcp, 0x0102_0304_0506_0708, e(1, 2), e(3, 4));
        assert_eq!(n, 39);
        assert_eq!(&b[28..39], &[0xE0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        for t in ProxyTlv::ALL {
            assert_eq!(write_header(&mut b, t, 1, e(1, 2), e(3, 4)), header_len(t));
        }
    }

    #[test]
    fn an_ipv6_consumers_header_carries_its_ipv6_addresses() {
        let mut b = [0u8; 96];
        let (src, dst) = (std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10), std::net::Ipv6Addr::LOCALHOST);
        let n = write_header::<crate::addr::V6>(
            &mut b,
            ProxyTlv::Gcp,
            0x0102_0304_0506_0708,
            End::new(u128::from(src), 40000),
            End::new(u128::from(dst), 443),
        );
        assert_eq!((n, header_len_for::<crate::addr::V6>(ProxyTlv::Gcp)), (16 + 36 + 11, n));
        assert_eq!(&b[12..16], &[0x21, 0x21, 0, 47]);
        assert_eq!(&b[16..32], &src.octets());
        assert_eq!(&b[32..48], &dst.octets());
        assert_eq!(&b[48..52], &[0x9c, 0x40, 0x01, 0xbb]);
        assert_eq!(&b[52..63], &[0xE0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn link_ids_are_shown_as_each_tlv_carries_them() {
        let id = 0x1234_5678_9abc_def0;
        assert_eq!(link_id_shown(Some(ProxyTlv::Azure), id), "2596069104");
        assert_eq!(link_id_shown(Some(ProxyTlv::Aws), id), "vpce-0123456789abcdef0");
        assert_eq!(link_id_shown(Some(ProxyTlv::Gcp), id), "1311768467463790320");
        assert_eq!(link_id_shown(None, id), "1311768467463790320");
        // What the header carries is what is shown.
        let mut b = [0u8; 64];
        write_header(&mut b, ProxyTlv::Azure, id, e(1, 2), e(3, 4));
        assert_eq!(
            u32::from_le_bytes([b[32], b[33], b[34], b[35]]).to_string(),
            link_id_shown(Some(ProxyTlv::Azure), id)
        );
    }

    #[test]
    fn a_built_segment_is_valid_tcp() {
        use etherparse::{SlicedPacket, TransportSlice};
        let mut b = [0u8; 128];
        let seg = crate::wire::TcpSegment::<V4> {
            src: 0xc0a8_6404,
            sport: 1025,
            dst: 0xc0a8_320a,
            dport: 8080,
            seq: 1001,
            ack: 77,
            flags: crate::wire::tcp_flags::ACK | crate::wire::tcp_flags::PSH,
            window: 512,
            ts: Some((0x0102_0304, 0x0506_0708)),
        };
        let n = crate::wire::build_tcp(&mut b, seg, |o| write_header(o, ProxyTlv::Azure, 9, e(1, 2), e(3, 4)));
        let p = SlicedPacket::from_ip(&b[..n]).expect("parses");
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { panic!() };
        let ih = ip.header().to_header();
        assert_eq!(ih.calc_header_checksum(), ih.header_checksum);
        let Some(TransportSlice::Tcp(t)) = p.transport else { panic!() };
        let h = t.to_header();
        assert_eq!((h.sequence_number, h.acknowledgment_number, h.psh, h.ack), (1001, 77, true, true));
        let opts: Vec<_> = h.options_iterator().filter_map(Result::ok).collect();
        assert!(opts.contains(&etherparse::TcpOptionElement::Timestamp(0x0102_0304, 0x0506_0708)), "{opts:?}");
        assert_eq!(t.payload().len(), 36);
        assert_eq!(h.calc_checksum_ipv4(&ih, t.payload()).expect("sum"), h.checksum);
    }
}
