//! TUN offloads: partial checksums and GSO super-packets.

use super::*;

/// Turns a built TCP packet's checksum into the partial form a TUN with
/// offloads hands over (`NEEDS_CSUM`): the folded pseudo-header sum.
fn make_partial(p: &mut [u8]) {
    let l4 = (p.len() - 20) as u64;
    let sum = checksum::sum(&p[12..20]) + 6 + l4;
    p[36..38].copy_from_slice(&checksum::fold(sum).to_be_bytes());
}

/// Completes a partial checksum as the device would: the one's complement
/// of the sum over the L4 bytes (whose checksum field holds the partial sum).
fn complete(p: &mut [u8]) {
    let c = !checksum::fold(checksum::sum(&p[20..]));
    p[36..38].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn offload_partial_checksum_and_gso_super_packets() {
    let (e, mut w) = engine();
    let mut syn = tcp(CLIENT, 40000, EP, 80, "S", b"");
    assert_eq!(step(&mut w, &mut syn, Source::Network(NET_B), Now(1)), Verdict::Forward(Egress::Provider));
    let (_, nport, _, _, _) = inspect(&syn);

    // Consumer -> provider: a 3-segment super-packet with a partial checksum.
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let mut p = tcp(CLIENT, 40000, EP, 80, "A", &payload);
    make_partial(&mut p);
    let off = Offload { csum_partial: true, gso_size: 1000 };
    assert_eq!(w.process_offload(&mut p, Source::Network(NET_B), Now(1), off), Verdict::Forward(Egress::Provider));
    complete(&mut p);
    let (s, sp, d, dp, ok) = inspect(&p);
    assert!(ok, "completed checksum equals etherparse's full recomputation");
    assert_eq!((s, sp, d, dp), (NAT_B, nport, BACKEND_B, 8080));
    let snap = e.snapshot();
    let ep = &snap.endpoint_by_name("pe-b").expect("pe-b").shared;
    assert_eq!(ep.totals().1, 1 + 3, "the SYN, then 3 segments");

    // Provider -> consumer (network B has MTU 1400): segments of 20 + 20 +
    // 1300 fit, so a 3,000-byte super-packet is forwarded whole ...
    let mut r = tcp(BACKEND_B.octets(), 8080, NAT_B.octets(), nport, "A", &payload);
    r[6] |= 0x40;
    fix_ip_checksum(&mut r);
    make_partial(&mut r);
    let off = Offload { csum_partial: true, gso_size: 1300 };
    assert_eq!(w.process_offload(&mut r, Source::Provider, Now(1), off), Verdict::Forward(Egress::Network(NET_B)));
    complete(&mut r);
    assert_eq!(inspect(&r), (Ipv4Addr::from(EP), 80, Ipv4Addr::from(CLIENT), 40000, true));
    assert_eq!(ep.totals().3, 3, "3 segments out");
    // ... but segments of 1380 bytes of payload would not: frag needed, 1400.
    let mut r = tcp(BACKEND_B.octets(), 8080, NAT_B.octets(), nport, "A", &payload);
    r[6] |= 0x40;
    fix_ip_checksum(&mut r);
    let off = Offload { csum_partial: true, gso_size: 1380 };
    let Verdict::Reply { reason: DropReason::TooBig, len } = w.process_offload(&mut r, Source::Provider, Now(1), off)
    else {
        panic!("too big")
    };
    assert_eq!(u16::from_be_bytes([w.reply(len)[26], w.reply(len)[27]]), 1400);
}

proptest! {
    #[test]
    fn partial_checksums_complete_to_the_full_recomputation(
        src in any::<[u8; 4]>(),
        sport in 1u16..,
        payload in proptest::collection::vec(any::<u8>(), 0..3000),
        gso in prop_oneof![Just(0u16), 500u16..1460],
    ) {
        let (_e, mut w) = engine();
        prop_assume!(!crate::addr::is_martian_v4(u32::from_be_bytes(src)));
        prop_assume!(gso > 0 || payload.len() <= 1400);
        let mut syn = tcp(src, sport, EP, 80, "S", b"");
        prop_assert_eq!(step(&mut w, &mut syn, Source::Network(NET_A), Now(0)), Verdict::Forward(Egress::Provider));
        let mut p = tcp(src, sport, EP, 80, "A", &payload);
        make_partial(&mut p);
        let off = Offload { csum_partial: true, gso_size: gso };
        prop_assert_eq!(w.process_offload(&mut p, Source::Network(NET_A), Now(0), off), Verdict::Forward(Egress::Provider));
        complete(&mut p);
        let (s, _, d, dp, ok) = inspect(&p);
        prop_assert!(ok, "completed partial checksum differs from etherparse's recomputation");
        prop_assert_eq!((s, d, dp), (NAT_A, BACKEND_A, 8080));
    }
}

// ---- The outbox: what one read batch makes the worker write. ----
