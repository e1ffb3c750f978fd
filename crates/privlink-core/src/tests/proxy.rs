//! PROXY protocol v2: the sequence shift and ICMP quotes.

use super::*;

#[test]
fn proxy_protocol_header_goes_first_and_sequence_numbers_line_up() {
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.services[0].proxy = Some(ProxyTlv::Azure);
    d.endpoints[0].link_id = 0x0bad_cafe;
    let (e, mut w) = engine_with(small(), &d);
    let (c, b) = (Source::Network(NET_A), Source::Provider);
    // SYN: as it was.
    let mut p = tcp_seq(CLIENT, 40000, EP, 80, true, 1000, None, b"");
    assert_eq!(w.process(&mut p, c, Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(tcp_fields(&p).0, 1000);
    let nport = inspect(&p).1;
    assert!(w.take_extra().is_none());
    // SYN-ACK: to the consumer as it was, nothing else yet.
    let mut p = tcp_seq(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, true, 5000, Some(1001), b"");
    assert_eq!(w.process(&mut p, b, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    assert_eq!(tcp_fields(&p).1, 1001);
    assert!(w.take_extra().is_none(), "no header before the consumer's handshake completes");
    // The consumer's ACK completes its handshake: it goes on unshifted (a
    // SYN-cookie backend checks its sequence number), the header after it,
    // with the ACK's window and timestamps.
    let mut p = tcp_ts(CLIENT, 40000, EP, 80, 1001, 5001, 502, (77, 88), b"");
    assert_eq!(w.process(&mut p, c, Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(tcp_fields(&p).0, 1001);
    let (to, hdr) = w.take_extra().map(|(t, h)| (t, h.to_vec())).expect("header segment");
    assert_eq!(
        tcp_window_ts(&hdr),
        (502, Some((77, 88))),
        "the header segment repeats the consumer's window and timestamps"
    );
    assert_eq!(to, Egress::Provider);
    assert_eq!(inspect(&hdr).0..=inspect(&hdr).2, NAT_A..=BACKEND_A);
    assert_eq!((inspect(&hdr).1, inspect(&hdr).3), (nport, 8080));
    let (seq, ack, payload) = tcp_fields(&hdr);
    assert_eq!((seq, ack, payload.len()), (1001, 5001, 36));
    assert_eq!(&payload[..12], &crate::proxy::SIGNATURE);
    assert_eq!(&payload[16..28], &[10, 1, 0, 10, 10, 1, 0, 5, 0x9c, 0x40, 0, 80], "the consumer's own addresses");
    assert_eq!(&payload[28..], &[0xEE, 0, 5, 1, 0xfe, 0xca, 0xad, 0x0b]);
    // The consumer's segments move up by the header's 36 bytes.
    let mut p = tcp_seq(CLIENT, 40000, EP, 80, false, 1001, Some(5001), b"hi");
    assert_eq!(w.process(&mut p, c, Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(tcp_fields(&p).0, 1037);
    // A backend ACK short of the header: held at the consumer's ISN + 1,
    // and the header goes again.
    let mut p = tcp_seq(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, false, 5001, Some(1001), b"");
    assert_eq!(w.process(&mut p, b, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    assert_eq!(tcp_fields(&p).1, 1001);
    assert!(w.take_extra().is_some(), "header sent again");
    assert_eq!(e.queue_proxy_resends(), 1, "the sweep would send it too");
    assert_eq!(w.send_resends(&mut Outbox::new(false)), 1);
    // Header and "hi" acknowledged: the consumer sees its own numbers.
    let mut p = tcp_seq(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, false, 5001, Some(1039), b"ok");
    assert_eq!(w.process(&mut p, b, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    assert_eq!(tcp_fields(&p).1, 1003);
    assert!(w.take_extra().is_none());
    assert_eq!(e.queue_proxy_resends(), 0, "acknowledged: nothing to resend");
    // A service without the setting is untouched.
    let mut p = tcp_seq(CLIENT, 40001, EP, 80, true, 7000, None, b"");
    assert_eq!(w.process(&mut p, Source::Network(NET_B), Now(1)), Verdict::Forward(Egress::Provider));
    let mut p2 = tcp_seq(CLIENT, 40001, EP, 80, false, 7001, Some(1), b"x");
    assert_eq!(w.process(&mut p2, Source::Network(NET_B), Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(tcp_fields(&p2).0, 7001);
}

#[test]
fn icmp_errors_about_proxy_flows_quote_the_consumers_own_numbers() {
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.services[0].proxy = Some(ProxyTlv::Gcp);
    let (_e, mut w) = engine_with(small(), &d);
    let (c, b) = (Source::Network(NET_A), Source::Provider);
    let mut p = tcp_seq(CLIENT, 40000, EP, 80, true, 1000, None, b"");
    assert_eq!(w.process(&mut p, c, Now(1)), Verdict::Forward(Egress::Provider));
    let nport = inspect(&p).1;
    let mut p = tcp_seq(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, true, 5000, Some(1001), b"");
    assert_eq!(w.process(&mut p, b, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    // The consumer's ACK was lost: its first data segment completes the
    // handshake, and the header goes first.
    let mut data = tcp_seq(CLIENT, 40000, EP, 80, false, 1001, Some(5001), &[7u8; 100]);
    assert_eq!(w.process(&mut data, c, Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(tcp_fields(&data).0, 1001 + 39);
    let (_, hdr) = w.take_extra().map(|(t, h)| (t, h.to_vec())).expect("header segment");
    assert_eq!(tcp_fields(&hdr).0, 1001);
    // The backend's side says "fragmentation needed" about that segment.
    let mut err = [0u8; 96];
    let n = wire::build_icmp_error(&mut err, &data, u32::from(BACKEND_A), u32::from(NAT_A), 3, 4, 1200);
    let mut err = err[..n].to_vec();
    assert_eq!(w.process(&mut err, b, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    let q = &err[20 + 8..];
    let qihl = usize::from(q[0] & 0x0f) * 4;
    let seq = u32::from_be_bytes([q[qihl + 4], q[qihl + 5], q[qihl + 6], q[qihl + 7]]);
    assert_eq!(seq, 1001, "the quoted segment carries the consumer's own sequence number");
    assert_eq!(checksum::checksum(&err[20..]), 0, "ICMP checksum");
    // An error about privlink's own header segment goes no further.
    let mut err = [0u8; 96];
    let n = wire::build_icmp_error(&mut err, &hdr, u32::from(BACKEND_A), u32::from(NAT_A), 3, 4, 1200);
    let mut err = err[..n].to_vec();
    assert_eq!(w.process(&mut err, b, Now(1)), Verdict::Drop(DropReason::NoFlow));
}
