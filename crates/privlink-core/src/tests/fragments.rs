//! Fragments whose datagram is never completed are counted, however many
//! give out at once.

use super::*;

/// `n` datagrams whose first fragment never comes: their last fragments
/// wait, then all time out in the same tick; returns the drops counted.
fn given_up_at_once(n: u16) -> u64 {
    let (e, mut w) = engine();
    for id in 0..n {
        let mut big = udp(CLIENT, 6001, EP, 53, &[1u8; 3000]);
        big[4..6].copy_from_slice(&id.to_be_bytes());
        big[6] = 0;
        fix_ip_checksum(&mut big);
        let mut later = fragments_of(&big, 1500).pop().expect("last");
        assert_eq!(w.process(&mut later, Source::Network(NET_A), Now(1)), Verdict::Held);
    }
    let mut other = udp(CLIENT, 6002, EP, 53, b"x");
    w.process(&mut other, Source::Network(NET_A), Now(1 + frag::REASSEMBLY_SECS));
    dropped(&e, Some("vnet-a"), DropReason::ReassemblyTimeout)
}

#[test]
fn held_fragments_time_out_and_are_counted() {
    assert_eq!(given_up_at_once(1), 1);
}

#[test]
fn every_reassembly_given_up_in_one_tick_is_counted() {
    assert_eq!(given_up_at_once(10), 10);
}

#[test]
fn fragments_are_translated_consistently_in_any_order() {
    let (_e, mut w) = engine();
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 13) as u8).collect();
    let mut big = udp(CLIENT, 6000, EP, 53, &payload);
    big[6] = 0; // no DF
    fix_ip_checksum(&mut big);
    let frags = fragments_of(&big, 1500);
    assert_eq!(frags.len(), 3);
    for order in [[0usize, 1, 2], [2, 1, 0], [1, 2, 0]] {
        let (_e, mut w) = engine();
        let mut out = Vec::new();
        for &k in &order {
            let mut f = frags[k].clone();
            match w.process(&mut f, Source::Network(NET_A), Now(1)) {
                Verdict::Forward(Egress::Provider) => out.push(f),
                Verdict::Held => {}
                v => panic!("fragment {k}: {v:?}"),
            }
            w.take_ready(|to, _, bytes| {
                assert_eq!(to, Egress::Provider);
                out.push(bytes.to_vec());
            });
        }
        assert_eq!(out.len(), 3, "order {order:?}");
        for f in &out {
            assert_eq!(checksum::fold(checksum::sum(&f[..20])), 0xffff);
            assert_eq!((&f[12..16], &f[16..20]), (&NAT_A.octets()[..], &BACKEND_A.octets()[..]));
        }
        let whole = reassemble(&out);
        let (s, _, d, dp, ok) = inspect(&whole);
        assert!(ok, "the reassembled datagram's UDP checksum holds (order {order:?})");
        assert_eq!((s, d, dp), (NAT_A, BACKEND_A, 5353));
        assert_eq!(&whole[28..], &payload[..]);
    }

    // And back: the backend's fragmented answer reaches the consumer whole.
    let mut first = frags[0].clone();
    w.process(&mut first, Source::Network(NET_A), Now(1));
    let nport = u16::from_be_bytes([first[20], first[21]]);
    let mut answer = udp(BACKEND_A.octets(), 5353, NAT_A.octets(), nport, &payload);
    answer[6] = 0;
    fix_ip_checksum(&mut answer);
    let mut back = Vec::new();
    for mut f in fragments_of(&answer, 1500).into_iter().rev() {
        match w.process(&mut f, Source::Provider, Now(2)) {
            Verdict::Forward(Egress::Network(NET_A)) => back.push(f),
            Verdict::Held => {}
            v => panic!("{v:?}"),
        }
        w.take_ready(|_, _, b| back.push(b.to_vec()));
    }
    let whole = reassemble(&back);
    assert_eq!(inspect(&whole), (Ipv4Addr::from(EP), 53, Ipv4Addr::from(CLIENT), 6000, true));
}

#[test]
fn too_big_without_df_is_fragmented() {
    // Network B has MTU 1400: a 3,000-byte answer without DF leaves in fragments.
    let (_e, mut w) = engine();
    let mut u = udp(CLIENT, 7000, EP, 53, b"q");
    w.process(&mut u, Source::Network(NET_B), Now(1));
    let nport = u16::from_be_bytes([u[20], u[21]]);
    let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let mut big = udp(BACKEND_B.octets(), 5353, NAT_B.octets(), nport, &payload);
    big[6] = 0;
    fix_ip_checksum(&mut big);
    let v = w.process(&mut big, Source::Provider, Now(1));
    assert_eq!(v, Verdict::Fragment { to: Egress::Network(NET_B), mtu: 1400 });
    let frags = fragments_of(&big, 1400);
    assert_eq!(frags.len(), 3);
    assert!(frags.iter().all(|f| f.len() <= 1400));
    assert_eq!(inspect(&reassemble(&frags)), (Ipv4Addr::from(EP), 53, Ipv4Addr::from(CLIENT), 7000, true));
}
