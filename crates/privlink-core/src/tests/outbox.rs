//! The outbox: staging, answers, fragments, released fragments, order.

use super::*;

#[test]
fn outbox_stages_small_packets_and_keeps_each_devices_order() {
    let (_e, mut w) = engine();
    let mut out = Outbox::new(true);
    let a = Source::Network(NET_A);
    handle(&mut w, &mut out, &udp(CLIENT, 1000, EP, 53, b"one"), a, Now(1));
    handle(&mut w, &mut out, &udp(CLIENT, 1000, EP, 53, b"two"), a, Now(1));
    assert!(out.is_empty(), "small packets wait for the end of the batch");
    // A large packet to the same device: what waits goes first.
    handle(&mut w, &mut out, &udp(CLIENT, 1000, EP, 53, &[7u8; 1200]), a, Now(1));
    let sent = drain(&mut out);
    let [Sent::Coalesced(Egress::Provider, staged), Sent::One(Egress::Provider, big)] = &sent[..] else {
        panic!("{sent:?}")
    };
    assert_eq!(staged.len(), 2);
    for (b, text) in staged.iter().zip([&b"one"[..], b"two"]) {
        assert_eq!(&b[..10], &[0u8; 10], "a zeroed virtio-net header");
        let (s, _, d, dp, ok) = inspect(&b[10..]);
        assert_eq!((s, d, dp, ok), (NAT_A, BACKEND_A, 5353, true));
        assert!(b.ends_with(text));
    }
    assert!(inspect(&big[10..]).4, "checksums of the large packet");
    // The end of the batch flushes what is staged, per device.
    handle(&mut w, &mut out, &udp(CLIENT, 1001, EP, 53, b"three"), a, Now(1));
    assert!(out.is_empty());
    w.end_batch(&mut out);
    let sent = drain(&mut out);
    assert!(matches!(&sent[..], [Sent::Coalesced(Egress::Provider, b)] if b.len() == 1), "{sent:?}");
    w.end_batch(&mut out);
    assert!(drain(&mut out).is_empty(), "staged packets go out once");
}

#[test]
fn outbox_answers_go_back_where_the_packet_came_from() {
    let (_e, mut w) = engine();
    let mut out = Outbox::new(true);
    let mut p = udp(CLIENT, 1000, EP, 53, b"");
    p[8] = 1;
    fix_ip_checksum(&mut p);
    handle(&mut w, &mut out, &p, Source::Network(NET_B), Now(1));
    let sent = drain(&mut out);
    let [Sent::One(Egress::Network(NET_B), reply)] = &sent[..] else { panic!("{sent:?}") };
    let (s, _, d, _, ok) = inspect(&reply[10..]);
    assert_eq!((s, d, ok), (Ipv4Addr::from(EP), Ipv4Addr::from(CLIENT), true));
    assert_eq!(reply[10 + 20], wire::icmp_type::TIME_EXCEEDED);
}

#[test]
fn outbox_fragments_a_packet_too_big_for_the_egress() {
    let (_e, mut w) = engine();
    let mut out = Outbox::new(true);
    let mut big = udp(CLIENT, 1000, EP, 53, &[9u8; 3000]);
    big[6] = 0; // no DF
    fix_ip_checksum(&mut big);
    handle(&mut w, &mut out, &big, Source::Network(NET_A), Now(1));
    let frags: Vec<Vec<u8>> = drain(&mut out)
        .into_iter()
        .map(|s| match s {
            Sent::One(Egress::Provider, b) => {
                assert!(b.len() <= 10 + 1500);
                b[10..].to_vec()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(frags.len(), 3);
    let whole = reassemble(&frags);
    let (s, _, d, dp, ok) = inspect(&whole);
    assert_eq!((s, d, dp, ok), (NAT_A, BACKEND_A, 5353, true));
}

#[test]
fn outbox_releases_held_fragments_behind_a_staged_first_fragment() {
    let (_e, mut w) = engine();
    let mut out = Outbox::new(true);
    let a = Source::Network(NET_A);
    // A datagram whose first fragment is small (staged) and comes last.
    let mut d = udp(CLIENT, 1000, EP, 53, &[5u8; 1000]);
    d[6] = 0;
    fix_ip_checksum(&mut d);
    let frags = fragments_of(&d, 500);
    assert_eq!(frags.len(), 3);
    for f in &frags[1..] {
        handle(&mut w, &mut out, f, a, Now(1));
        assert!(out.is_empty(), "held");
    }
    handle(&mut w, &mut out, &frags[0], a, Now(1));
    let sent = drain(&mut out);
    // The staged first fragment goes out before the released ones, at once.
    let [Sent::Coalesced(Egress::Provider, first), Sent::One(Egress::Provider, f2), Sent::One(Egress::Provider, f3)] =
        &sent[..]
    else {
        panic!("{sent:?}")
    };
    let all = vec![first[0][10..].to_vec(), f2[10..].to_vec(), f3[10..].to_vec()];
    let whole = reassemble(&all);
    let (s, _, dst, dp, ok) = inspect(&whole);
    assert_eq!((s, dst, dp, ok), (NAT_A, BACKEND_A, 5353, true));
}

// ---- One translation path: each step, each direction. ----
