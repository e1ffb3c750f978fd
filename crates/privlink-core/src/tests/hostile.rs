//! Hostile packets: martian sources, TCP flags no connection sends, source
//! routes.

use super::*;

/// `p` with IP options `opts` (a multiple of 4 bytes) after its header.
fn with_ip_options(p: &[u8], opts: &[u8]) -> Vec<u8> {
    let mut v = p[..20].to_vec();
    v.extend_from_slice(opts);
    v.extend_from_slice(&p[20..]);
    v[0] = 0x40 | ((20 + opts.len()) / 4) as u8;
    let total = v.len() as u16;
    v[2..4].copy_from_slice(&total.to_be_bytes());
    fix_ip_checksum(&mut v);
    v
}

#[test]
fn martian_sources_never_make_a_flow() {
    let (e, mut w) = engine();
    let a = Source::Network(NET_A);
    for src in [
        [0, 0, 0, 0],
        [0, 1, 2, 3],
        [127, 0, 0, 1],
        [224, 0, 0, 1],
        [239, 1, 1, 1],
        [255, 255, 255, 255],
        [240, 0, 0, 1],
        EP, // the endpoint's own address (a LAND packet)
    ] {
        let mut p = udp(src, 1000, EP, 53, b"x");
        assert_eq!(step(&mut w, &mut p, a, Now(1)), Verdict::Drop(DropReason::MartianSource), "{src:?}");
        let mut s = tcp(src, 1000, EP, 80, "S", b"");
        assert_eq!(step(&mut w, &mut s, a, Now(1)), Verdict::Drop(DropReason::MartianSource), "{src:?}");
    }
    assert_eq!(e.flows().len(), 0);
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::MartianSource), 16);
}

#[test]
fn invalid_tcp_flag_combinations_are_dropped_both_ways() {
    let (e, mut w) = engine();
    let a = Source::Network(NET_A);
    for flags in ["SF", "SR", "", "F", "FR"] {
        let mut p = tcp(CLIENT, 1000, EP, 80, flags, b"");
        assert_eq!(step(&mut w, &mut p, a, Now(1)), Verdict::Drop(DropReason::InvalidTcpFlags), "{flags:?}");
    }
    assert_eq!(e.flows().len(), 0, "SYN+FIN makes no flow");
    // A real connection; then a bad combination from the backend.
    let mut syn = tcp(CLIENT, 1000, EP, 80, "S", b"");
    assert_eq!(step(&mut w, &mut syn, a, Now(1)), Verdict::Forward(Egress::Provider));
    swap(&mut syn);
    syn[20 + 13] = 0x03; // SYN+FIN
    let ihl = 20;
    syn[ihl + 16..ihl + 18].copy_from_slice(&[0, 0]);
    let mut fixed = syn.clone();
    let (src, dst) = (&fixed[12..16].to_vec(), &fixed[16..20].to_vec());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((fixed.len() - 20) as u16).to_be_bytes());
    pseudo.extend_from_slice(&fixed[20..]);
    let c = checksum::checksum(&pseudo);
    fixed[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
    assert_eq!(step(&mut w, &mut fixed, Source::Provider, Now(1)), Verdict::Drop(DropReason::InvalidTcpFlags));
    // Valid ones still pass.
    for flags in ["A", "FA", "RA", "R"] {
        let mut p = tcp(CLIENT, 1000, EP, 80, flags, b"");
        assert_ne!(step(&mut w, &mut p, a, Now(1)), Verdict::Drop(DropReason::InvalidTcpFlags), "{flags:?}");
    }
}

#[test]
fn source_routed_packets_are_dropped_and_harmless_options_pass() {
    let (e, mut w) = engine();
    let a = Source::Network(NET_A);
    let b = BACKEND_B.octets();
    // Loose and strict source routes naming another service's backend.
    for kind in [0x83u8, 0x89] {
        let opts = [kind, 7, 4, b[0], b[1], b[2], b[3], 0];
        let mut p = with_ip_options(&udp(CLIENT, 1000, EP, 53, b"x"), &opts);
        assert_eq!(step(&mut w, &mut p, a, Now(1)), Verdict::Drop(DropReason::SourceRoute), "{kind:#x}");
        let mut s = with_ip_options(&tcp(CLIENT, 1000, EP, 80, "S", b""), &opts);
        assert_eq!(step(&mut w, &mut s, a, Now(1)), Verdict::Drop(DropReason::SourceRoute), "{kind:#x}");
    }
    assert_eq!(e.flows().len(), 0);
    // An option list of NOPs and an end marker is forwarded.
    let mut p = with_ip_options(&udp(CLIENT, 1000, EP, 53, b"x"), &[1, 1, 1, 0]);
    assert_eq!(step(&mut w, &mut p, a, Now(1)), Verdict::Forward(Egress::Provider));
    assert!(inspect(&p).4, "checksums still right");
    // A truncated option is malformed.
    let mut p = with_ip_options(&udp(CLIENT, 1000, EP, 53, b"x"), &[0x83, 9, 4, 0]);
    assert_eq!(step(&mut w, &mut p, a, Now(1)), Verdict::Drop(DropReason::Malformed));
}
