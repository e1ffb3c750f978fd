//! Backends a health probe took out.

use super::*;

#[test]
fn a_down_backend_gets_no_new_flows_keeps_its_old_ones_and_none_up_refuses_at_once() {
    let other = Ipv4Addr::new(192, 168, 50, 11);
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.services[0].backends.push(other.into());
    let (e, mut w) = engine_with(small(), &d);
    let a = Source::Network(NET_A);
    // Both up: flows spread over both.
    let mut on_a = None;
    let mut seen = HashSet::new();
    for port in 0..64u16 {
        let mut p = tcp(CLIENT, 7000 + port, EP, 80, "S", b"");
        assert_eq!(step(&mut w, &mut p, a, Now(1)), Verdict::Forward(Egress::Provider));
        let (_, _, backend, _, _) = inspect(&p);
        seen.insert(backend);
        if backend == BACKEND_A {
            on_a.get_or_insert(7000 + port);
        }
    }
    assert_eq!(seen.len(), 2, "Maglev spreads new flows over both");
    // BACKEND_A goes down: new flows all go to the other, the old ones stay.
    assert!(e.set_backend_up("svc-a", BACKEND_A.into(), false));
    for port in 0..64u16 {
        let mut p = tcp(CLIENT, 8000 + port, EP, 80, "S", b"");
        assert_eq!(step(&mut w, &mut p, a, Now(2)), Verdict::Forward(Egress::Provider));
        assert_eq!(inspect(&p).2, other, "a new flow went to the down backend");
    }
    let old = on_a.expect("a flow on BACKEND_A");
    let mut p = tcp(CLIENT, old, EP, 80, "A", b"still here");
    assert_eq!(step(&mut w, &mut p, a, Now(2)), Verdict::Forward(Egress::Provider));
    assert_eq!(inspect(&p).2, BACKEND_A, "an existing flow keeps its backend");
    let states = e.backends();
    assert!(states.iter().any(|b| b.service == "svc-a" && b.backend == BACKEND_A && !b.up));
    assert!(states.iter().any(|b| b.backend == other && b.up && b.flows_created >= 64));
    // Both down: a SYN is answered with a RST from the endpoint, UDP with
    // port unreachable, at once.
    e.set_backend_up("svc-a", other.into(), false);
    let mut syn = tcp(CLIENT, 9000, EP, 80, "S", b"");
    let Verdict::Reply { reason: DropReason::NoHealthyBackend, len } = step(&mut w, &mut syn, a, Now(3)) else {
        panic!("a RST")
    };
    let rst = w.reply(len).to_vec();
    let p = SlicedPacket::from_ip(&rst).expect("parses");
    let Some(TransportSlice::Tcp(t)) = p.transport else { panic!("tcp") };
    assert!(t.rst() && t.ack() && !t.syn());
    assert_eq!((t.source_port(), t.destination_port(), t.acknowledgment_number()), (80, 9000, 1001));
    let (s, _, dst, _, ok) = inspect(&rst);
    assert_eq!((s, dst, ok), (Ipv4Addr::from(EP), Ipv4Addr::from(CLIENT), true));
    let mut u = udp(CLIENT, 9001, EP, 53, b"q");
    assert!(matches!(step(&mut w, &mut u, a, Now(3)), Verdict::Reply { reason: DropReason::NoHealthyBackend, .. }));
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::NoHealthyBackend), 2);
    // Back up after a reload too: health is kept across reloads.
    e.apply(&d, Now(4)).expect("config");
    let mut p = tcp(CLIENT, 9100, EP, 80, "S", b"");
    assert!(matches!(step(&mut w, &mut p, a, Now(4)), Verdict::Reply { reason: DropReason::NoHealthyBackend, .. }));
    e.set_backend_up("svc-a", other.into(), true);
    let mut p = tcp(CLIENT, 9101, EP, 80, "S", b"");
    assert_eq!(step(&mut w, &mut p, a, Now(4)), Verdict::Forward(Egress::Provider));
}
