//! Bytes after an IPv4 packet's total length (Ethernet minimum-frame
//! padding that some userspace stacks and bridges hand to a TUN) are
//! trimmed, as Linux's input path does, both ways and with offloads.

use super::*;

/// `pkt` followed by `pad` zero bytes.
fn padded(pkt: &[u8], pad: usize) -> Vec<u8> {
    let mut v = pkt.to_vec();
    v.resize(pkt.len() + pad, 0);
    v
}

fn one(sent: &[Sent]) -> (Egress, Vec<u8>) {
    match sent {
        [Sent::One(to, b)] => (*to, b.clone()),
        [Sent::Coalesced(to, bufs)] if bufs.len() == 1 => (*to, bufs[0].clone()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn padded_packets_are_trimmed_and_forwarded_both_ways() {
    for vnet in [false, true] {
        let (_e, mut w) = engine();
        let mut out = Outbox::new(vnet);
        let hdr = out.header_len();
        // A 36-byte UDP datagram (8 bytes of data) and 10 bytes of padding.
        let q = udp(CLIENT, 1000, EP, 53, b"8 bytes!");
        assert_eq!(q.len(), 36);
        handle(&mut w, &mut out, &padded(&q, 10), Source::Network(NET_A), Now(1));
        w.end_batch(&mut out);
        let (to, b) = one(&drain(&mut out));
        assert_eq!((to, b.len() - hdr), (Egress::Provider, 36), "written without the padding");
        let (s, nport, d, _, ok) = inspect(&b[hdr..]);
        assert_eq!((s, d, ok), (NAT_A, BACKEND_A, true));
        // The answer, padded too.
        let r = udp(BACKEND_A.octets(), 5353, NAT_A.octets(), nport, b"answer!!");
        handle(&mut w, &mut out, &padded(&r, 10), Source::Provider, Now(1));
        w.end_batch(&mut out);
        let (to, b) = one(&drain(&mut out));
        assert_eq!((to, b.len() - hdr), (Egress::Network(NET_A), 36));
        assert!(inspect(&b[hdr..]).4);
        // A padded SYN.
        let syn = tcp(CLIENT, 2000, EP, 80, "S", b"");
        handle(&mut w, &mut out, &padded(&syn, 6), Source::Network(NET_A), Now(1));
        w.end_batch(&mut out);
        let (_, b) = one(&drain(&mut out));
        assert_eq!(b.len() - hdr, syn.len());
        assert!(inspect(&b[hdr..]).4);
    }
}

#[test]
fn a_total_length_past_what_was_read_is_still_malformed() {
    let (e, mut w) = engine();
    let mut q = udp(CLIENT, 1000, EP, 53, b"8 bytes!");
    q.pop();
    assert_eq!(step(&mut w, &mut q, Source::Network(NET_A), Now(1)), Verdict::Drop(DropReason::Malformed));
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::Malformed), 1);
}

#[test]
fn a_gso_super_packet_keeps_its_own_length() {
    // A super-packet's total length is its header's: nothing is trimmed.
    let big = udp(CLIENT, 1000, EP, 53, &[1u8; 3000]);
    assert_eq!(wire::packet_len(&big), big.len());
    assert_eq!(wire::packet_len(&padded(&big, 4)), big.len());
    assert_eq!(wire::packet_len(&[0x60; 48]), 48, "not IPv4: left alone");
}
