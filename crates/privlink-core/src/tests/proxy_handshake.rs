//! PROXY v2 and the TCP handshake: the header segment follows the
//! consumer's completed handshake, looks like the consumer's next segment,
//! comes before any data (TCP Fast Open's included) and survives the loss
//! of any one handshake segment.

use super::*;

fn proxy_engine() -> (Arc<Engine>, Worker) {
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.services[0].proxy = Some(ProxyTlv::None);
    engine_with(small(), &d)
}

const A: Source = Source::Network(NET_A);

/// A SYN carrying `data` (TCP Fast Open) with the timestamps option.
fn syn_with(seq: u32, data: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ipv4(CLIENT, EP, 64)
        .tcp(40000, 80, seq, 65535)
        .syn()
        .options(&[etherparse::TcpOptionElement::Timestamp(10, 0)])
        .expect("options");
    let mut v = Vec::new();
    b.write(&mut v, data).expect("build");
    v
}

/// (sequence number, payload length) of each TCP segment the outbox
/// writes, in order (behind a virtio-net header).
fn tcp_sent(out: &mut Outbox) -> Vec<(u32, usize)> {
    drain(out)
        .into_iter()
        .flat_map(|s| match s {
            Sent::One(_, b) => vec![b],
            Sent::Coalesced(_, bufs) => bufs,
        })
        .filter(|b| b[10 + 9] == 6)
        .map(|b| {
            let (seq, _, p) = tcp_fields(&b[10..]);
            (seq, p.len())
        })
        .collect()
}

/// A connection to the PROXY endpoint whose SYN (seq 1000, timestamps)
/// and SYN-ACK have passed; returns its NAT port.
fn to_synack(w: &mut Worker) -> u16 {
    let mut syn = syn_with(1000, b"");
    assert_eq!(w.process(&mut syn, A, Now(1)), Verdict::Forward(Egress::Provider));
    let nport = inspect(&syn).1;
    let mut p = synack(nport);
    assert!(matches!(w.process(&mut p, Source::Provider, Now(1)), Verdict::Forward(_)));
    nport
}

fn synack(nport: u16) -> Vec<u8> {
    tcp_seq(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, true, 5000, Some(1001), b"")
}

#[test]
fn fast_open_data_in_the_syn_is_dropped_and_follows_the_header() {
    let (_e, mut w) = proxy_engine();
    let mut out = Outbox::new(true);
    // The SYN with 13 bytes of data reaches the backend without them.
    handle(&mut w, &mut out, &syn_with(1000, b"hello, world!"), A, Now(1));
    w.end_batch(&mut out);
    let sent = drain(&mut out);
    let syn = match &sent[..] {
        [Sent::One(Egress::Provider, b)] => b[10..].to_vec(),
        [Sent::Coalesced(Egress::Provider, bufs)] => bufs[0][10..].to_vec(),
        other => panic!("{other:?}"),
    };
    let (seq, _, payload) = tcp_fields(&syn);
    assert_eq!((seq, payload.len()), (1000, 0), "the SYN's data stays with the consumer");
    assert_eq!(tcp_window_ts(&syn).1, Some((10, 0)), "options kept");
    let nport = inspect(&syn).1;
    // The backend acknowledges only the SYN; the consumer sends the data
    // again with its ACK: the header goes first, then the data, moved up.
    let mut p = synack(nport);
    assert!(matches!(w.process(&mut p, Source::Provider, Now(1)), Verdict::Forward(_)));
    assert!(w.take_extra().is_none());
    let data = tcp_ts(CLIENT, 40000, EP, 80, 1001, 5001, 600, (11, 99), b"hello, world!");
    handle(&mut w, &mut out, &data, A, Now(1));
    w.end_batch(&mut out);
    assert_eq!(tcp_sent(&mut out), vec![(1001, 28), (1029, 13)], "header (28 bytes) first, then the data once");
}

#[test]
fn a_bare_ack_completes_the_handshake_unshifted_and_the_header_follows_it() {
    let (_e, mut w) = proxy_engine();
    let mut out = Outbox::new(true);
    to_synack(&mut w);
    handle(&mut w, &mut out, &tcp_ts(CLIENT, 40000, EP, 80, 1001, 5001, 700, (12, 98), b""), A, Now(1));
    w.end_batch(&mut out);
    let pkts: Vec<Vec<u8>> = drain(&mut out)
        .into_iter()
        .flat_map(|s| match s {
            Sent::One(_, b) => vec![b],
            Sent::Coalesced(_, bufs) => bufs,
        })
        .map(|b| b[10..].to_vec())
        .collect();
    assert_eq!(pkts.len(), 2);
    // The ACK first, at the consumer's own numbers (a SYN-cookie backend
    // rebuilds the consumer's ISN from it), then the header segment with
    // the same acknowledgement, window and timestamps.
    assert_eq!((tcp_fields(&pkts[0]).0, tcp_fields(&pkts[0]).2.len()), (1001, 0));
    let (seq, ack, payload) = tcp_fields(&pkts[1]);
    assert_eq!((seq, ack, payload.len()), (1001, 5001, 28));
    assert_eq!(tcp_window_ts(&pkts[1]), (700, Some((12, 98))));
    // Later bare ACKs are moved past the header.
    let mut p = tcp_ts(CLIENT, 40000, EP, 80, 1001, 5001, 700, (13, 98), b"");
    assert!(matches!(w.process(&mut p, A, Now(1)), Verdict::Forward(_)));
    assert_eq!(tcp_fields(&p).0, 1029);
    assert!(w.take_extra().is_none());
}

#[test]
fn a_lost_syn_ack_leaves_the_handshake_to_the_endpoints() {
    let (e, mut w) = proxy_engine();
    let mut syn = syn_with(1000, b"");
    assert_eq!(w.process(&mut syn, A, Now(1)), Verdict::Forward(Egress::Provider));
    let nport = inspect(&syn).1;
    // The SYN-ACK passes privlink and is lost on the way to the consumer:
    // nothing has been sent to the backend in the consumer's name.
    let mut p = synack(nport);
    assert!(matches!(w.process(&mut p, Source::Provider, Now(1)), Verdict::Forward(_)));
    assert!(w.take_extra().is_none());
    assert_eq!(e.queue_proxy_resends(), 0, "no header to resend before the consumer's handshake");
    // The consumer's retransmitted SYN reaches the backend as a SYN (which
    // answers it with its SYN-ACK again).
    let mut again = syn_with(1000, b"");
    assert_eq!(w.process(&mut again, A, Now(2)), Verdict::Forward(Egress::Provider));
    assert_eq!(tcp_fields(&again).0, 1000);
    assert!(w.take_extra().is_none());
    let mut p = synack(nport);
    assert!(matches!(w.process(&mut p, Source::Provider, Now(2)), Verdict::Forward(_)));
    let mut ack = tcp_ts(CLIENT, 40000, EP, 80, 1001, 5001, 700, (12, 98), b"");
    assert!(matches!(w.process(&mut ack, A, Now(2)), Verdict::Forward(_)));
    let (_, hdr) = w.take_extra().expect("header after the completed handshake");
    assert_eq!(tcp_fields(hdr).0, 1001);
    // A lost header: the backend's ACK of the consumer's ISN brings it again.
    let mut p = tcp_seq(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, false, 5001, Some(1001), b"");
    assert!(matches!(w.process(&mut p, Source::Provider, Now(3)), Verdict::Forward(_)));
    let (_, hdr) = w.take_extra().expect("header again");
    assert_eq!(tcp_window_ts(hdr), (700, Some((12, 98))));
    // The once-a-second resend: queued by the control thread's scan, sent
    // through a worker's outbox.
    assert_eq!(e.queue_proxy_resends(), 1);
    let mut out = Outbox::new(true);
    assert_eq!(w.send_resends(&mut out), 1);
    let sent = drain(&mut out);
    let [Sent::One(Egress::Provider, b)] = &sent[..] else { panic!("{sent:?}") };
    assert_eq!((tcp_fields(&b[10..]).0, tcp_window_ts(&b[10..])), (1001, (700, Some((12, 98)))));
    assert_eq!(w.send_resends(&mut out), 0, "sent once per scan");
}

#[test]
fn a_handshake_completing_segment_with_data_and_fin_still_gets_the_header_first() {
    let (e, mut w) = proxy_engine();
    to_synack(&mut w);
    // ACK + data + FIN in one segment (a Fast Open client that sends and
    // shuts down, its SYN data sent again).
    let mut v = Vec::new();
    PacketBuilder::ipv4(CLIENT, EP, 64).tcp(40000, 80, 1001, 600).ack(5001).fin().write(&mut v, b"bye").expect("build");
    assert!(matches!(w.process(&mut v, A, Now(1)), Verdict::Forward(_)));
    assert_eq!(tcp_fields(&v).0, 1001 + 28, "the data moved past the header");
    let (_, hdr) = w.take_extra().expect("the header");
    assert_eq!(tcp_fields(hdr).0, 1001);
    assert_eq!(e.flow_list(None, Now(1))[0].state, "closing");
}

#[test]
fn a_header_that_goes_first_is_not_overtaken_by_a_staged_packet() {
    let (_e, mut w) = proxy_engine();
    let mut out = Outbox::new(true);
    to_synack(&mut w);
    // In one read batch: a small datagram to the provider (staged), then
    // the data segment that completes the handshake.
    handle(&mut w, &mut out, &udp(CLIENT, 9000, EP, 53, b"q"), A, Now(1));
    handle(&mut w, &mut out, &tcp_ts(CLIENT, 40000, EP, 80, 1001, 5001, 600, (11, 99), b"data"), A, Now(1));
    w.end_batch(&mut out);
    assert_eq!(tcp_sent(&mut out), vec![(1001, 28), (1029, 4)], "header, then the data");
}

#[test]
fn a_refused_fast_open_connection_ends_with_the_backends_rst() {
    let (e, mut w) = proxy_engine();
    let mut syn = syn_with(1000, b"hello");
    assert_eq!(w.process(&mut syn, A, Now(1)), Verdict::Forward(Egress::Provider));
    // The backend saw a SYN without data: its RST acknowledges 1001.
    let mut rst = tcp_rst(BACKEND_A.octets(), 8080, NAT_A.octets(), inspect(&syn).1, 0, Some(1001));
    assert!(matches!(w.process(&mut rst, Source::Provider, Now(1)), Verdict::Forward(_)));
    assert_eq!(e.flow_list(None, Now(1))[0].state, "closed");
}
