//! ICMP: errors translated with their quotes (never touching flows), and
//! the ICMP privlink generates (rate-limited, never about errors).

use super::*;

#[test]
fn icmp_errors_never_touch_flows() {
    let (e, mut w) = engine();
    let mut u = udp(CLIENT, 1, EP, 53, b"");
    step(&mut w, &mut u, Source::Network(NET_A), Now(0));
    let (_, nport, _, _, _) = inspect(&u);
    // A port unreachable from the backend about that flow.
    let mut err = Vec::new();
    PacketBuilder::ipv4(BACKEND_A.octets(), NAT_A.octets(), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port))
        .write(&mut err, &udp(NAT_A.octets(), nport, BACKEND_A.octets(), 5353, b"")[..28])
        .expect("build");
    assert_eq!(step(&mut w, &mut err, Source::Provider, Now(200)), Verdict::Forward(Egress::Network(NET_A)));
    // Translated for the consumer: from the endpoint, about the datagram the
    // consumer sent, every checksum right.
    let (s, _, d, _, ok) = inspect(&err);
    assert!(ok, "outer IP and ICMP checksums");
    assert_eq!((s, d), (Ipv4Addr::from(EP), Ipv4Addr::from(CLIENT)));
    let quoted = &err[28..];
    assert_eq!(checksum::fold(checksum::sum(&quoted[..20])), 0xffff, "quoted IP checksum");
    assert_eq!(&quoted[12..16], &CLIENT);
    assert_eq!(&quoted[16..20], &EP);
    assert_eq!(u16::from_be_bytes([quoted[20], quoted[21]]), 1);
    assert_eq!(u16::from_be_bytes([quoted[22], quoted[23]]), 53);
    // It did not refresh the flow: it still expires 300 s after its packet.
    assert_eq!(e.expire(Now(300)), 1);
    // Now there is no flow: the same error is dropped.
    let mut again = Vec::new();
    PacketBuilder::ipv4(BACKEND_A.octets(), NAT_A.octets(), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port))
        .write(&mut again, &udp(NAT_A.octets(), nport, BACKEND_A.octets(), 5353, b"")[..28])
        .expect("build");
    assert_eq!(step(&mut w, &mut again, Source::Provider, Now(301)), Verdict::Drop(DropReason::NoFlow));
}

#[test]
fn icmp_errors_from_the_consumer_and_bad_ones() {
    let (_e, mut w) = engine();
    let mut syn = tcp(CLIENT, 40000, EP, 80, "S", b"");
    step(&mut w, &mut syn, Source::Network(NET_A), Now(0));
    let (_, nport, _, _, _) = inspect(&syn);
    // The consumer answers the endpoint's SYN-ACK with an unreachable.
    let mut synack = tcp(EP, 80, CLIENT, 40000, "SA", b"");
    synack.truncate(48); // IP header + the first 28 bytes of TCP
    let quote = synack.clone();
    let mut err = Vec::new();
    PacketBuilder::ipv4(CLIENT, EP, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port))
        .write(&mut err, &quote)
        .expect("build");
    let mut bad = err.clone();
    assert_eq!(step(&mut w, &mut err, Source::Network(NET_A), Now(5)), Verdict::Forward(Egress::Provider));
    let (s, _, d, _, ok) = inspect(&err);
    assert!(ok);
    assert_eq!((s, d), (NAT_A, BACKEND_A));
    let q = &err[28..];
    assert_eq!(checksum::fold(checksum::sum(&q[..20])), 0xffff);
    assert_eq!((&q[12..16], &q[16..20]), (&BACKEND_A.octets()[..], &NAT_A.octets()[..]));
    assert_eq!(u16::from_be_bytes([q[20], q[21]]), 8080);
    assert_eq!(u16::from_be_bytes([q[22], q[23]]), nport);
    // A bad ICMP checksum: dropped.
    let n = bad.len();
    bad[n - 1] ^= 0xff;
    assert_eq!(step(&mut w, &mut bad, Source::Network(NET_A), Now(5)), Verdict::Drop(DropReason::NoFlow));
}

#[test]
fn generated_icmp_is_rate_limited_and_never_about_errors_fragments_or_broadcasts() {
    let (e, mut w) = engine();
    let a = Source::Network(NET_A);
    let expire = |p: &mut Vec<u8>| {
        p[8] = 1;
        fix_ip_checksum(p);
    };
    // Rate: 100 answers per second per worker, the rest only dropped.
    let mut replies = 0;
    for i in 0..150u16 {
        let mut p = udp(CLIENT, 1000 + i, EP, 53, b"");
        expire(&mut p);
        match step(&mut w, &mut p, a, Now(7)) {
            Verdict::Reply { reason: DropReason::TtlExpired, .. } => replies += 1,
            Verdict::Drop(DropReason::TtlExpired) => {}
            v => panic!("{v:?}"),
        }
    }
    assert_eq!(replies, 100);
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::TtlExpired), 150);
    let mut p = udp(CLIENT, 999, EP, 53, b"");
    expire(&mut p);
    assert!(matches!(step(&mut w, &mut p, a, Now(8)), Verdict::Reply { .. }), "a new second, a new budget");

    // Never about an ICMP error (one about a live flow, so that it gets as
    // far as the TTL step).
    let mut open = udp(CLIENT, 1, EP, 53, b"");
    assert_eq!(step(&mut w, &mut open, a, Now(9)), Verdict::Forward(Egress::Provider));
    let mut err = Vec::new();
    PacketBuilder::ipv4(CLIENT, EP, 1)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port))
        .write(&mut err, &udp(EP, 53, CLIENT, 1, b"")[..28])
        .expect("build");
    assert_eq!(step(&mut w, &mut err, a, Now(9)), Verdict::Drop(DropReason::TtlExpired), "dropped, no answer");
    // Never to a broadcast or multicast source (martian: dropped first).
    let mut p = udp([255, 255, 255, 255], 1, EP, 53, b"");
    expire(&mut p);
    assert_eq!(step(&mut w, &mut p, a, Now(9)), Verdict::Drop(DropReason::MartianSource));
    let mut p = udp([224, 0, 0, 1], 1, EP, 53, b"");
    expire(&mut p);
    assert_eq!(step(&mut w, &mut p, a, Now(9)), Verdict::Drop(DropReason::MartianSource));
    // Never about a later fragment.
    let mut big = udp(CLIENT, 5, EP, 53, &[0u8; 3000]);
    big[6] = 0;
    fix_ip_checksum(&mut big);
    let mut later = fragments_of(&big, 1500).pop().expect("fragment");
    expire(&mut later);
    // Held for its first fragment (reassembly comes before TTL); no answer.
    assert_eq!(step(&mut w, &mut later, a, Now(9)), Verdict::Held);
}
