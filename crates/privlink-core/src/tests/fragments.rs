//! Fragments whose datagram is never completed are counted, however many
//! give out at once.

use super::*;

#[test]
fn every_reassembly_given_up_in_one_tick_is_counted() {
    let (e, mut w) = engine();
    // Ten datagrams whose first fragment never comes: their last fragments
    // wait, then all time out in the same tick.
    for id in 0..10u16 {
        let mut big = udp(CLIENT, 6001, EP, 53, &[1u8; 3000]);
        big[4..6].copy_from_slice(&id.to_be_bytes());
        big[6] = 0;
        fix_ip_checksum(&mut big);
        let mut later = fragments_of(&big, 1500).pop().expect("last");
        assert_eq!(w.process(&mut later, Source::Network(NET_A), Now(1)), Verdict::Held);
    }
    let mut other = udp(CLIENT, 6002, EP, 53, b"x");
    w.process(&mut other, Source::Network(NET_A), Now(1 + frag::REASSEMBLY_SECS));
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::ReassemblyTimeout), 10);
}
