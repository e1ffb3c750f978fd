//! The translation itself, both ways: addresses, ports, checksums (a
//! property test against full recomputation), tenants kept apart, one NAT
//! IP per consumer, one port per burst, workers in parallel.

use super::*;

#[test]
fn tcp_round_trip_translates_and_keeps_checksums() {
    let (e, mut w) = engine();
    let mut p = tcp(CLIENT, 40000, EP, 80, "S", b"");
    assert_eq!(step(&mut w, &mut p, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    let (s, sp, d, dp, ok) = inspect(&p);
    assert!(ok, "checksums after translation");
    assert_eq!((s, d, dp), (NAT_A, BACKEND_A, 8080));
    assert!(sp >= 1024);
    assert_eq!(p[8], 63, "TTL decremented");

    let mut r = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), sp, "SA", b"hello");
    assert_eq!(step(&mut w, &mut r, Source::Provider, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    let (s, sp2, d, dp2, ok) = inspect(&r);
    assert!(ok);
    assert_eq!((s, sp2, d, dp2), (Ipv4Addr::from(EP), 80, Ipv4Addr::from(CLIENT), 40000));

    let snap = e.snapshot();
    let ep = &snap.endpoint_by_name("pe-a").expect("pe-a").shared;
    let (bi, pi, bo, po) = ep.totals();
    assert_eq!((bi, pi, bo, po), (40, 1, 45, 1));
    assert_eq!(ep.flows_created.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(e.flows().len(), 1);
}

#[test]
fn overlapping_tenants_stay_apart() {
    let (_e, mut w) = engine();
    let mut a = tcp(CLIENT, 40000, EP, 80, "S", b"");
    let mut b = a.clone();
    assert_eq!(step(&mut w, &mut a, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(step(&mut w, &mut b, Source::Network(NET_B), Now(1)), Verdict::Forward(Egress::Provider));
    let (sa, pa, da, _, _) = inspect(&a);
    let (sb, pb, db, _, _) = inspect(&b);
    assert_eq!((sa, da), (NAT_A, BACKEND_A));
    assert_eq!((sb, db), (NAT_B, BACKEND_B));
    // Replies go back to the network each flow came from.
    let mut ra = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), pa, "SA", b"");
    let mut rb = tcp(BACKEND_B.octets(), 8080, NAT_B.octets(), pb, "SA", b"");
    assert_eq!(step(&mut w, &mut ra, Source::Provider, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    assert_eq!(step(&mut w, &mut rb, Source::Provider, Now(1)), Verdict::Forward(Egress::Network(NET_B)));
    // B's backend cannot reach A's flow by guessing A's NAT port on B's NAT IP.
    let mut x = tcp(BACKEND_B.octets(), 8080, NAT_A.octets(), pa, "A", b"");
    assert_eq!(step(&mut w, &mut x, Source::Provider, Now(1)), Verdict::Drop(DropReason::NoFlow));
}

#[test]
fn udp_and_icmp_echo() {
    let (_e, mut w) = engine();
    let mut u = udp(CLIENT, 5000, EP, 53, b"query");
    assert_eq!(step(&mut w, &mut u, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    let (s, sp, d, dp, ok) = inspect(&u);
    assert!(ok);
    assert_eq!((s, d, dp), (NAT_A, BACKEND_A, 5353));
    swap(&mut u);
    assert_eq!(step(&mut w, &mut u, Source::Provider, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    assert_eq!(inspect(&u), (Ipv4Addr::from(EP), 53, Ipv4Addr::from(CLIENT), 5000, true));
    let _ = sp;

    let mut p = ping(CLIENT, EP, 77, false);
    assert_eq!(step(&mut w, &mut p, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    let (s, id, d, _, ok) = inspect(&p);
    assert!(ok);
    assert_eq!((s, d), (NAT_A, BACKEND_A));
    let mut r = ping(BACKEND_A.octets(), NAT_A.octets(), id, true);
    assert_eq!(step(&mut w, &mut r, Source::Provider, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    assert_eq!(inspect(&r), (Ipv4Addr::from(EP), 77, Ipv4Addr::from(CLIENT), 0, true));
}

#[test]
fn udp_zero_checksum_stays_zero() {
    let (_e, mut w) = engine();
    let mut u = udp(CLIENT, 5000, EP, 53, b"q");
    u[26..28].copy_from_slice(&[0, 0]);
    assert_eq!(step(&mut w, &mut u, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(&u[26..28], &[0, 0]);
    assert!(inspect(&u).4);
}

#[test]
fn a_burst_of_one_new_flow_takes_one_port() {
    let (e, mut w) = engine();
    for _ in 0..50 {
        let mut p = udp(CLIENT, 7000, EP, 53, b"x");
        assert_eq!(step(&mut w, &mut p, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    }
    assert_eq!(e.flows().len(), 1);
    let snap = e.snapshot();
    let pool = snap.pools.values().find(|p| p.service == "svc-a" && p.protocol == Protocol::Udp).expect("pool");
    assert_eq!(pool.pool.available(), pool.pool.capacity() - 1);
}

#[test]
fn one_consumer_address_keeps_one_nat_ip() {
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.services[0].nat_ips = (1..=8).map(|i| Ipv4Addr::new(192, 168, 100, i).into()).collect();
    let (_e, mut w) = engine_with(small(), &d);
    let mut nats = HashSet::new();
    for port in 0..200u16 {
        let mut p = tcp(CLIENT, 10_000 + port, EP, 80, "S", b"");
        step(&mut w, &mut p, Source::Network(NET_A), Now(0));
        nats.insert(inspect(&p).0);
    }
    assert_eq!(nats.len(), 1);
    let mut spread = HashSet::new();
    for host in 1..=64u8 {
        let mut p = tcp([10, 1, 1, host], 10_000, EP, 80, "S", b"");
        step(&mut w, &mut p, Source::Network(NET_A), Now(0));
        spread.insert(inspect(&p).0);
    }
    assert!(spread.len() >= 6, "64 consumers over 8 NAT IPs used {}", spread.len());
}

#[test]
fn concurrent_workers_never_share_a_live_tuple() {
    let e = Engine::new(Settings { workers: 4, ..Settings::default() });
    e.apply(&desired(5000..=5999, ConnectionState::Approved), Now(0)).expect("apply");
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let mut w = e.worker(t);
            std::thread::spawn(move || {
                let mut fwd = 0;
                for i in 0..400u16 {
                    // Threads overlap on half their flows, racing on setup.
                    let port = if i % 2 == 0 { 20_000 + i } else { 30_000 + i + 1000 * t as u16 };
                    let mut p = udp(CLIENT, port, EP, 53, b"");
                    if step(&mut w, &mut p, Source::Network(NET_A), Now(0)) == Verdict::Forward(Egress::Provider) {
                        fwd += 1;
                    }
                }
                fwd
            })
        })
        .collect();
    let forwarded: u32 = handles.into_iter().map(|h| h.join().expect("thread")).sum();
    assert_eq!(forwarded, 1600);
    let flows = e.flow_list(None, Now(0));
    assert_eq!(flows.len(), 200 + 4 * 200);
    let tuples: HashSet<_> = flows.iter().map(|f| (f.nat, f.backend)).collect();
    assert_eq!(tuples.len(), flows.len(), "a live provider tuple was handed out twice");
}

fn arb_packet() -> impl Strategy<Value = (Vec<u8>, u8)> {
    let payload = proptest::collection::vec(any::<u8>(), 0..200);
    (0u8..3, any::<[u8; 4]>(), any::<u16>(), payload, 3u8..=255, any::<bool>()).prop_map(
        |(kind, src, sport, payload, ttl, zero_udp)| {
            let b = PacketBuilder::ipv4(src, EP, ttl);
            let mut v = Vec::new();
            match kind {
                0 => b.tcp(sport, 80, 7, 1000).syn().write(&mut v, &payload),
                1 => b.udp(sport, 53).write(&mut v, &payload),
                _ => b.icmpv4_echo_request(sport, 3).write(&mut v, &payload),
            }
            .expect("build");
            if kind == 1 && zero_udp {
                v[26..28].copy_from_slice(&[0, 0]);
            }
            (v, kind)
        },
    )
}

proptest! {
    #[test]
    fn translation_checksums_equal_full_recomputation((pkt, kind) in arb_packet()) {
        let (_e, mut w) = engine();
        let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
        prop_assume!(!crate::addr::is_martian_v4(u32::from(src)));
        let original = pkt.clone();
        let mut p = pkt;
        prop_assert_eq!(step(&mut w, &mut p, Source::Network(NET_A), Now(0)), Verdict::Forward(Egress::Provider));
        let (s, _, d, _, ok) = inspect(&p);
        prop_assert!(ok, "checksums differ from etherparse's recomputation");
        prop_assert_eq!((s, d), (NAT_A, BACKEND_A));
        let l7 = if kind == 0 { 40 } else { 28 };
        prop_assert_eq!(&p[l7..], &original[l7..], "payload untouched");

        // The backend answers with the mirror image; reversing gives back
        // the original packet, mirrored, with TTL down by two.
        swap(&mut p);
        prop_assert_eq!(step(&mut w, &mut p, Source::Provider, Now(0)), Verdict::Forward(Egress::Network(NET_A)));
        prop_assert!(inspect(&p).4);
        let mut want = original.clone();
        swap(&mut want);
        want[8] -= 2;
        fix_ip_checksum(&mut want);
        prop_assert_eq!(p, want);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120), provider in any::<bool>()) {
        let (_e, mut w) = engine();
        let mut b = bytes;
        let src = if provider { Source::Provider } else { Source::Network(NET_A) };
        let _ = step(&mut w, &mut b, src, Now(0));
    }
}
