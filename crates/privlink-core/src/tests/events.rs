//! NAT events for flow logs.

use super::*;

#[test]
fn nat_events_record_creates_deletes_and_exhaustion() {
    use crate::events::NatEventKind;
    let s = Settings { event_queue: 16, ..small() };
    let (e, mut w) = engine_with(s, &desired(2000..=2000, ConnectionState::Approved));
    let q = e.events().expect("queue");
    let mut p = udp(CLIENT, 5000, EP, 53, b"q");
    assert_eq!(step(&mut w, &mut p, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    let ev = q.pop().expect("create");
    assert_eq!(ev.kind, NatEventKind::Create);
    assert_eq!((ev.ckey.consumer_port(), ev.pkey.nat_port(), ev.pkey.backend_port()), (5000, 2000, 5353));
    // The same packet again: an existing flow, no event.
    let mut p = udp(CLIENT, 5000, EP, 53, b"q");
    step(&mut w, &mut p, Source::Network(NET_A), Now(1));
    assert!(q.pop().is_none());
    // A second flow to the same backend port finds the one port taken.
    let mut p = udp(CLIENT, 5001, EP, 53, b"q");
    assert!(matches!(step(&mut w, &mut p, Source::Network(NET_A), Now(1)), Verdict::Reply { .. } | Verdict::Drop(_)));
    let ev = q.pop().expect("exhaustion");
    assert_eq!((ev.kind, ev.ckey.consumer_port(), ev.pkey.nat_port()), (NatEventKind::PortsExhausted, 5001, 0));
    assert_eq!(e.expire(Now(10_000)), 1);
    let ev = q.pop().expect("delete");
    assert_eq!((ev.kind, ev.ckey.consumer_port(), ev.pkey.nat_port()), (NatEventKind::Delete, 5000, 2000));
    assert!(q.pop().is_none());
}
