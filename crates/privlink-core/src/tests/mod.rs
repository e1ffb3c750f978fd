//! Engine-level tests: built packets through `Worker::process` with a fake
//! clock, checked against etherparse's independent parsing and checksums.

use crate::outbox::{Out, Outbox};
use crate::*;
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use proptest::prelude::*;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

const CLIENT: [u8; 4] = [10, 1, 0, 10];
const EP: [u8; 4] = [10, 1, 0, 5];
const NAT_A: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 4);
const NAT_B: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 8);
const BACKEND_A: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
const BACKEND_B: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 10);
const NET_A: NetworkId = NetworkId(0);
const NET_B: NetworkId = NetworkId(1);

fn desired(nat_ports: std::ops::RangeInclusive<u16>, b_state: ConnectionState) -> Desired {
    let svc = |name: &str, nat: Ipv4Addr, backend: Ipv4Addr| ServiceSpec {
        proxy: None,
        name: name.into(),
        nat_ips: vec![nat.into()],
        nat_ports: nat_ports.clone(),
        backends: vec![backend.into()],
        ports: vec![
            PortRule { protocol: Protocol::Tcp, port: 80, backend_port: 8080 },
            PortRule { protocol: Protocol::Udp, port: 53, backend_port: 5353 },
        ],
    };
    let ep = |name: &str, network, service, state| EndpointSpec {
        link_id: 0,
        name: name.into(),
        network,
        ip: Ipv4Addr::from(EP).into(),
        service,
        state,
        limits: EndpointLimits::default(),
    };
    Desired {
        provider_mtu: 1500,
        networks: vec![
            NetworkSpec { id: NET_A, name: "vnet-a".into(), mtu: 1500 },
            NetworkSpec { id: NET_B, name: "vnet-b".into(), mtu: 1400 },
        ],
        services: vec![svc("svc-a", NAT_A, BACKEND_A), svc("svc-b", NAT_B, BACKEND_B)],
        endpoints: vec![ep("pe-a", 0, 0, ConnectionState::Approved), ep("pe-b", 1, 1, b_state)],
    }
}

fn engine_with(settings: Settings, d: &Desired) -> (Arc<Engine>, Worker) {
    let e = Engine::new(settings);
    e.apply(d, Now(0)).expect("valid config");
    let w = e.worker(0);
    (e, w)
}

/// Settings with a table small enough to build per proptest case.
fn small() -> Settings {
    Settings { max_flows: 4096, ..Settings::default() }
}

fn engine() -> (Arc<Engine>, Worker) {
    engine_with(small(), &desired(1024..=65535, ConnectionState::Approved))
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1000, 65535);
    for f in flags.chars() {
        b = match f {
            'S' => b.syn(),
            'A' => b.ack(1),
            'F' => b.fin(),
            'R' => b.rst(),
            _ => b,
        };
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build");
    v
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src, dst, 64).udp(sport, dport).write(&mut v, payload).expect("build");
    v
}

fn ping(src: [u8; 4], dst: [u8; 4], id: u16, reply: bool) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, 64);
    let b = if reply { b.icmpv4_echo_reply(id, 1) } else { b.icmpv4_echo_request(id, 1) };
    let mut v = Vec::new();
    b.write(&mut v, b"ping").expect("build");
    v
}

/// Recomputes the IP header checksum after a test edits the header.
fn fix_ip_checksum(v: &mut [u8]) {
    v[10..12].copy_from_slice(&[0, 0]);
    let ihl = usize::from(v[0] & 0x0f) * 4;
    let c = checksum::checksum(&v[..ihl]);
    v[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Addresses and ports of a packet, and whether etherparse's full
/// recomputation agrees with every checksum in it.
fn inspect(v: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16, bool) {
    let p = SlicedPacket::from_ip(v).expect("etherparse parses it");
    let Some(NetSlice::Ipv4(ip)) = p.net else { panic!("not ipv4") };
    let h = ip.header().to_header();
    let mut ok = h.calc_header_checksum() == h.header_checksum;
    let (s, d) = (Ipv4Addr::from(h.source), Ipv4Addr::from(h.destination));
    let payload = ip.payload().payload;
    let (sp, dp) = match p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let th = t.to_header();
            ok &= th.calc_checksum_ipv4(&h, t.payload()).expect("size") == th.checksum;
            (th.source_port, th.destination_port)
        }
        Some(TransportSlice::Udp(u)) => {
            let uh = u.to_header();
            if uh.checksum != 0 {
                ok &= uh.calc_checksum_ipv4(&h, u.payload()).expect("size") == uh.checksum;
            }
            (uh.source_port, uh.destination_port)
        }
        Some(TransportSlice::Icmpv4(i)) => {
            let ih = i.header();
            ok &= ih.icmp_type.calc_checksum(i.payload()) == ih.checksum;
            let id = u16::from_be_bytes([payload[4], payload[5]]);
            (id, 0)
        }
        _ => (0, 0),
    };
    (s, sp, d, dp, ok)
}

/// Swaps source and destination (addresses and ports): the reply a peer
/// would send, with checksums still valid.
fn swap(v: &mut [u8]) {
    let ihl = usize::from(v[0] & 0x0f) * 4;
    let (a, b) = (v[12..16].to_vec(), v[16..20].to_vec());
    v[12..16].copy_from_slice(&b);
    v[16..20].copy_from_slice(&a);
    if v[9] != 1 {
        let (a, b) = (v[ihl..ihl + 2].to_vec(), v[ihl + 2..ihl + 4].to_vec());
        v[ihl..ihl + 2].copy_from_slice(&b);
        v[ihl + 2..ihl + 4].copy_from_slice(&a);
    } else {
        // Echo request -> reply: type 8 -> 0, fix the checksum incrementally.
        let mut d = checksum::Delta::default();
        d.word(u16::from(v[ihl]) << 8, 0);
        v[ihl] = 0;
        let c = d.apply(u16::from_be_bytes([v[ihl + 2], v[ihl + 3]]));
        v[ihl + 2..ihl + 4].copy_from_slice(&c.to_be_bytes());
    }
}

fn dropped(e: &Engine, net: Option<&str>, r: DropReason) -> u64 {
    match net {
        None => e.provider_drops()[r.index()],
        Some(n) => {
            let snap = e.snapshot();
            let net = snap.network_list().find(|x| x.name == n).expect("network");
            Engine::network_drops(net)[r.index()]
        }
    }
}

/// Splits `p` into fragments of at most `mtu` bytes.
fn fragments_of(p: &[u8], mtu: usize) -> Vec<Vec<u8>> {
    let mut f = wire::Fragmenter::new(p, mtu).expect("fragmenter");
    let mut out = Vec::new();
    let mut buf = vec![0u8; mtu];
    while let Some(n) = f.next_into(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

/// Reassembles fragments (any order) into one datagram.
fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
    let mut parts: Vec<(usize, &[u8])> =
        frags.iter().map(|f| ((usize::from(u16::from_be_bytes([f[6], f[7]]) & 0x1fff)) * 8, &f[20..])).collect();
    parts.sort_by_key(|p| p.0);
    let mut d = frags.iter().find(|f| f[6] & 0x1f == 0 && f[7] == 0).expect("first")[..20].to_vec();
    for (_, payload) in parts {
        d.extend_from_slice(payload);
    }
    let len = d.len() as u16;
    d[2..4].copy_from_slice(&len.to_be_bytes());
    d[6..8].copy_from_slice(&[0, 0]);
    fix_ip_checksum(&mut d);
    d
}

/// What the daemon would perform, as owned values.
#[derive(Debug)]
enum Sent {
    One(Egress, Vec<u8>),
    Coalesced(Egress, Vec<Vec<u8>>),
}

/// Reads `pkt` (behind a zeroed virtio-net header) into the outbox and
/// hands it to the worker.
fn handle(w: &mut Worker, out: &mut Outbox, pkt: &[u8], src: Source, now: Now) -> Verdict {
    let hdr = out.header_len();
    let buf = out.read_buf();
    buf[..hdr].fill(0);
    buf[hdr..hdr + pkt.len()].copy_from_slice(pkt);
    w.handle(out, hdr + pkt.len(), src, now)
}

/// One packet through the path the daemon takes: read into an outbox,
/// [`Worker::handle`]d, the outbox drained. Exactly what the verdict says
/// must leave (one packet, its fragments, one ICMP answer back, or
/// nothing), and what leaves replaces `pkt` (fragments reassembled).
/// Every test drives the worker through this unless it is about what
/// `process` leaves for its caller to send: fragments released later
/// (`fragments.rs`, which reads `take_ready`) and PROXY header segments
/// (`proxy.rs`, `proxy_handshake.rs`, which read `take_extra`;
/// `outbox.rs` checks how `handle` orders them).
fn step(w: &mut Worker, pkt: &mut Vec<u8>, src: Source, now: Now) -> Verdict {
    let mut out = Outbox::new(false);
    let v = handle(w, &mut out, pkt, src, now);
    w.end_batch(&mut out);
    let sent: Vec<(Egress, Vec<u8>)> = drain(&mut out)
        .into_iter()
        .map(|s| match s {
            Sent::One(to, b) => (to, b),
            Sent::Coalesced(..) => panic!("no coalescing without a virtio-net header"),
        })
        .collect();
    let back = match src {
        Source::Network(n) => Egress::Network(n),
        Source::Provider => Egress::Provider,
    };
    // Exactly what the verdict says leaves, nothing else; what leaves
    // replaces the packet (shorter when it was trimmed or stripped).
    match v {
        Verdict::Forward(to) => {
            let [(e, bytes)] = &sent[..] else { panic!("{v:?}: {} writes, one expected", sent.len()) };
            assert_eq!(*e, to, "written where the verdict says");
            assert!(bytes.len() <= pkt.len(), "a packet grew: {} -> {}", pkt.len(), bytes.len());
            *pkt = bytes.clone();
        }
        Verdict::Fragment { to, mtu } => {
            assert!(sent.len() > 1, "{v:?}: fragments leave");
            assert!(sent.iter().all(|(e, f)| *e == to && f.len() <= usize::from(mtu)), "fragments within the MTU");
            let frags: Vec<Vec<u8>> = sent.into_iter().map(|(_, f)| f).collect();
            *pkt = reassemble(&frags);
        }
        Verdict::Reply { len, .. } => {
            let [(e, bytes)] = &sent[..] else { panic!("{v:?}: {} writes, one expected", sent.len()) };
            assert_eq!((*e, &bytes[..]), (back, w.reply(len)), "the ICMP answer goes back where the packet came from");
        }
        Verdict::Drop(_) | Verdict::Held => assert!(sent.is_empty(), "{v:?} but {} writes", sent.len()),
    }
    v
}

fn drain(out: &mut Outbox) -> Vec<Sent> {
    let mut v = Vec::new();
    out.drain(|o| match o {
        Out::Write { to, bytes } => v.push(Sent::One(to, bytes.to_vec())),
        Out::Coalesce { to, bufs } => v.push(Sent::Coalesced(to, bufs.iter().map(|b| b.to_vec()).collect())),
    });
    v
}

/// The engine with pe-b in `b_state`, and a live UDP flow of each tenant
/// (consumer port 1000): for the provider-side steps.
fn with_flows(b_state: ConnectionState) -> (Arc<Engine>, Worker, Vec<u8>, Vec<u8>) {
    let (e, mut w) = engine_with(small(), &desired(1024..=65535, ConnectionState::Approved));
    let mut replies = Vec::new();
    for net in [NET_A, NET_B] {
        let mut p = udp(CLIENT, 1000, EP, 53, b"x");
        assert_eq!(step(&mut w, &mut p, Source::Network(net), Now(1)), Verdict::Forward(Egress::Provider));
        swap(&mut p);
        replies.push(p);
    }
    e.apply(&desired(1024..=65535, b_state), Now(1)).expect("config");
    let b = replies.pop().expect("b");
    (e, w, replies.pop().expect("a"), b)
}

#[allow(clippy::too_many_arguments)]
fn tcp_seq(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    syn: bool,
    seq: u32,
    ack: Option<u32>,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, seq, 65535);
    if syn {
        b = b.syn();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build");
    v
}

/// A TCP ACK with the timestamps option (value, echo) and a window.
#[allow(clippy::too_many_arguments)]
fn tcp_ts(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    seq: u32,
    ack: u32,
    window: u16,
    ts: (u32, u32),
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, 64)
        .tcp(sport, dport, seq, window)
        .ack(ack)
        .options(&[etherparse::TcpOptionElement::Timestamp(ts.0, ts.1)])
        .expect("options");
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build");
    v
}

/// The window and timestamps of a TCP packet.
fn tcp_window_ts(v: &[u8]) -> (u16, Option<(u32, u32)>) {
    let p = SlicedPacket::from_ip(v).expect("parses");
    let Some(TransportSlice::Tcp(t)) = p.transport else { panic!("not tcp") };
    let ts = t.options_iterator().find_map(|o| match o {
        Ok(etherparse::TcpOptionElement::Timestamp(a, b)) => Some((a, b)),
        _ => None,
    });
    (t.window_size(), ts)
}

/// A TCP RST at `seq` (with ACK when `ack` is given).
fn tcp_rst(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, seq: u32, ack: Option<u32>) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, seq, 0).rst();
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut v = Vec::new();
    b.write(&mut v, b"").expect("build");
    v
}

/// (seq, ack, payload) of a TCP packet, after checking every checksum.
fn tcp_fields(v: &[u8]) -> (u32, u32, Vec<u8>) {
    assert!(inspect(v).4, "checksums");
    let p = SlicedPacket::from_ip(v).expect("parses");
    let Some(TransportSlice::Tcp(t)) = p.transport else { panic!("not tcp") };
    (t.sequence_number(), t.acknowledgment_number(), t.payload().to_vec())
}

mod conntrack;
mod events;
mod fragments;
mod health;
mod hostile;
mod icmp;
mod ipv6;
mod limits;
mod nat64;
mod offload;
mod outbox;
mod proxy;
mod proxy_handshake;
mod reload;
#[cfg(not(loom))]
mod restart;
mod steps;
mod translate;
mod trim;
