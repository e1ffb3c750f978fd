//! Packets into `Worker::process_read`, from either side, on top of a
//! populated flow table (TCP, UDP and ICMP flows already set up, one
//! endpoint's service with PROXY protocol; IPv6 flows to an IPv6 service
//! and, translated, to an IPv4 one), with an oracle after each one. The
//! packet's version nibble says which family it is; the buffer has the
//! room a translation to IPv6 grows into, as the daemon's has.
//!
//! The first input byte is the mode:
//! - bit 0: the side (consumer network 0, or the provider);
//! - bits 1-2: the offload flags (partial checksum, GSO);
//! - bit 3: *repair*: after mutation, set the IPv4 total length or the
//!   IPv6 payload length (and the UDP length) to what is there and
//!   recompute the IP and L4 checksums, so the input passes validation and
//!   reaches translation, flow setup and the TCP state machine instead of
//!   dying at a checksum;
//! - bits 4-7: seconds the fake clock moves before the packet (the flows'
//!   timeouts expire with it: the sweep runs each second it moves).
//!
//! The oracle (etherparse is the independent parser):
//! - every packet privlink emits (forwarded, an ICMP answer, a PROXY header
//!   segment) parses, with a valid IP checksum, and a valid L4 checksum
//!   whenever the input's was valid and no offload leaves it to a device;
//! - a packet emitted into a consumer network goes to a consumer of a live
//!   flow of that network, from that flow's endpoint;
//! - the flow counts agree with the table: open plus closed flows of each
//!   endpoint are its live flows, closed ones are those marked so; and no
//!   pool has more ports available than it has ports not held by a flow.

#![no_main]

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use libfuzzer_sys::fuzz_target;
use privlink_core::*;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};

const EP: [u8; 4] = [10, 1, 0, 5];
const EP_PROXY: [u8; 4] = [10, 1, 0, 6];
/// The IPv6 endpoints: of the IPv6 service, and of the IPv4 service `s`.
const EP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xaa, 0, 0, 0, 0, 0, 5);
const EP64: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xaa, 0, 0, 0, 0, 0, 6);

fn desired() -> Desired {
    let svc = |name: &str, nat: IpAddr, backend: IpAddr, proxy| ServiceSpec {
        proxy,
        name: name.into(),
        nat_ips: vec![nat],
        nat_ports: 2000..=2063,
        backends: vec![backend],
        ports: vec![
            PortRule { protocol: Protocol::Tcp, port: 80, backend_port: 8080 },
            PortRule { protocol: Protocol::Udp, port: 53, backend_port: 53 },
        ],
    };
    let ep = |name: &str, ip: IpAddr, service, link_id| EndpointSpec {
        link_id,
        name: name.into(),
        network: 0,
        ip,
        service,
        state: ConnectionState::Approved,
        limits: EndpointLimits { max_flows: Some(48), allow_sources: Vec::new() },
    };
    let v4 = |a: [u8; 4]| IpAddr::from(a);
    let backend = v4([192, 168, 50, 10]);
    let (nat6, backend6): (Ipv6Addr, Ipv6Addr) = ("fd00:64::4".parse().unwrap(), "fd00:50::10".parse().unwrap());
    Desired {
        provider_mtu: 1400,
        networks: vec![NetworkSpec { id: NetworkId(0), name: "a".into(), mtu: 1500 }],
        services: vec![
            svc("s", v4([192, 168, 100, 4]), backend, None),
            svc("pp", v4([192, 168, 100, 5]), backend, Some(ProxyTlv::Azure)),
            svc("s6", nat6.into(), backend6.into(), None),
        ],
        endpoints: vec![
            ep("e", v4(EP), 0, 0),
            ep("pp", v4(EP_PROXY), 1, 0x1234_5678),
            ep("e6", EP6.into(), 2, 0),
            ep("e64", EP64.into(), 0, 0),
        ],
    }
}

/// A valid IPv6 packet from `src` to `dst` with an upper-layer header `l4`.
fn packet6(proto: u8, src: Ipv6Addr, dst: Ipv6Addr, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0, 0, 0, proto, 64];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(l4);
    repair(&mut p);
    p
}

/// [`repair`] for an IPv6 packet: the payload length, and for an
/// upper-layer header right after the fixed header its checksum.
fn repair6(p: &mut [u8]) {
    if p.len() < 40 {
        return;
    }
    let len = (p.len() - 40).min(usize::from(u16::MAX)) as u16;
    p[4..6].copy_from_slice(&len.to_be_bytes());
    if usize::from(len) + 40 != p.len() {
        return;
    }
    let proto = p[6];
    let at = match proto {
        6 if p.len() >= 60 => 56,
        17 if p.len() >= 48 => {
            p[44..46].copy_from_slice(&len.to_be_bytes());
            46
        }
        58 if p.len() >= 48 => 42,
        _ => return,
    };
    p[at..at + 2].fill(0);
    let sum = checksum::sum(&p[40..]) + checksum::sum(&p[8..40]) + u64::from(proto) + u64::from(len);
    let mut c = !checksum::fold(sum);
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// A valid IPv4 packet from `src` to `dst` with an L4 header `l4`.
fn packet(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(l4);
    repair(&mut p);
    p
}

/// Sets the total length (and a UDP length) to what is there and recomputes
/// the IP and, for a whole datagram, the L4 checksum.
fn repair(p: &mut [u8]) {
    if p.first().is_some_and(|v| v >> 4 == 6) {
        return repair6(p);
    }
    if p.len() < 20 || p[0] >> 4 != 4 {
        return;
    }
    let ihl = (usize::from(p[0] & 0x0f) * 4).clamp(20, p.len());
    let len = p.len().min(usize::from(u16::MAX)) as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[10..12].fill(0);
    let c = checksum::checksum(&p[..ihl]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    let fragment = u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0;
    if fragment || usize::from(len) != p.len() {
        return;
    }
    let (proto, l4) = (p[9], ihl);
    let at = match proto {
        6 if p.len() >= l4 + 20 => l4 + 16,
        17 if p.len() >= l4 + 8 => {
            let ul = ((p.len() - l4) as u16).to_be_bytes();
            p[l4 + 4..l4 + 6].copy_from_slice(&ul);
            l4 + 6
        }
        1 if p.len() >= l4 + 8 => l4 + 2,
        _ => return,
    };
    p[at..at + 2].fill(0);
    let mut sum = checksum::sum(&p[l4..]);
    if proto != 1 {
        sum += checksum::sum(&p[12..20]) + u64::from(proto) + (p.len() - l4) as u64;
    }
    let mut c = !checksum::fold(sum);
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// An address of either family as the flow tables hold it (IPv4 in the
/// low 32 bits).
type Addr = u128;

/// Whether `p` parses, its IP checksum is right (IPv4), and (when `l4` is
/// asked for) its TCP/UDP/ICMP or ICMPv6 checksum too. Returns the parsed
/// addresses, ports (or echo identifier) and protocol.
fn check(p: &[u8], l4: bool) -> Result<(Addr, u16, Addr, u16, u8), String> {
    let s = SlicedPacket::from_ip(p).map_err(|e| format!("does not parse: {e:?}"))?;
    let (src, dst, whole, proto, pseudo) = match &s.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            // Over the raw header: etherparse's header struct drops the
            // reserved flag bit, so its own sum would differ for a packet
            // that sets it.
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if checksum::checksum(&p[..ihl]) != 0 {
                return Err("IP checksum".into());
            }
            let (a, b) = (u32::from_be_bytes(h.source), u32::from_be_bytes(h.destination));
            let pseudo = checksum::sum(&p[12..20]);
            (Addr::from(a), Addr::from(b), !ip.is_payload_fragmented(), h.protocol.0, pseudo)
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header().to_header();
            let pseudo = checksum::sum(&p[8..40]);
            let whole = !ip.is_payload_fragmented();
            (u128::from_be_bytes(h.source), u128::from_be_bytes(h.destination), whole, ip.payload().ip_number.0, pseudo)
        }
        _ => return Err("not IP".into()),
    };
    // The transport checksum over its pseudo-header (ICMP has none).
    let sums = |l4b: &[u8], icmp4: bool| {
        let mut sum = checksum::sum(l4b);
        if !icmp4 {
            sum += pseudo + u64::from(proto) + l4b.len() as u64;
        }
        checksum::fold(sum) == 0xffff
    };
    let l4b = s.ip_payload().map(|x| x.payload).unwrap_or_default();
    let (sp, dp) = match &s.transport {
        Some(TransportSlice::Tcp(t)) => {
            if l4 && whole && !sums(l4b, false) {
                return Err("TCP checksum".into());
            }
            (t.source_port(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => {
            if l4 && whole && u.checksum() != 0 && !sums(l4b, false) {
                return Err("UDP checksum".into());
            }
            (u.source_port(), u.destination_port())
        }
        Some(TransportSlice::Icmpv4(i)) => {
            if l4 && whole && !sums(l4b, true) {
                return Err("ICMP checksum".into());
            }
            let id = match i.header().icmp_type {
                etherparse::Icmpv4Type::EchoRequest(e) | etherparse::Icmpv4Type::EchoReply(e) => e.id,
                _ => 0,
            };
            (id, id)
        }
        Some(TransportSlice::Icmpv6(i)) => {
            if l4 && whole && !sums(l4b, false) {
                return Err("ICMPv6 checksum".into());
            }
            let id = match i.header().icmp_type {
                etherparse::Icmpv6Type::EchoRequest(e) | etherparse::Icmpv6Type::EchoReply(e) => e.id,
                _ => 0,
            };
            (id, id)
        }
        _ => (0, 0),
    };
    Ok((src, sp, dst, dp, proto))
}

struct World {
    e: Arc<Engine>,
    w: Worker,
    now: u32,
}

fn world() -> &'static Mutex<World> {
    static W: OnceLock<Mutex<World>> = OnceLock::new();
    W.get_or_init(|| {
        let e = Engine::new(Settings { max_flows: 256, seed: 1, ..Settings::default() });
        e.apply(&desired(), Now(0)).expect("config");
        let mut w = e.worker(0);
        // Flows to hit: TCP (SYN) to both endpoints, UDP, from a few consumers.
        for host in 1..=8u8 {
            for ep in [EP, EP_PROXY] {
                let mut syn = [0u8; 20];
                syn[0..2].copy_from_slice(&40000u16.to_be_bytes());
                syn[2..4].copy_from_slice(&80u16.to_be_bytes());
                syn[4..8].copy_from_slice(&1000u32.to_be_bytes());
                syn[12] = 5 << 4;
                syn[13] = 0x02;
                syn[14] = 0xff;
                let mut p = packet(6, [10, 1, 0, host], ep, &syn);
                w.process(&mut p, Source::Network(NetworkId(0)), Now(1));
            }
            let udp = [0x13, 0x88, 0, 53, 0, 8, 0, 0];
            let mut p = packet(17, [10, 1, 0, host], EP, &udp);
            w.process(&mut p, Source::Network(NetworkId(0)), Now(1));
            // IPv6 consumers of both services: a SYN and a datagram each.
            let client = Ipv6Addr::new(0xfd00, 0xaa, 0, 0, 0, 0, 1, u16::from(host));
            for ep in [EP6, EP64] {
                let mut syn = [0u8; 20];
                syn[0..2].copy_from_slice(&40000u16.to_be_bytes());
                syn[2..4].copy_from_slice(&80u16.to_be_bytes());
                syn[4..8].copy_from_slice(&1000u32.to_be_bytes());
                syn[12] = 5 << 4;
                syn[13] = 0x02;
                syn[14] = 0xff;
                for (proto, l4) in [(6, &syn[..]), (17, &udp[..])] {
                    let mut p = packet6(proto, client, ep, l4);
                    p.resize(p.len() + wire::nat64::GROWTH, 0);
                    w.process(&mut p, Source::Network(NetworkId(0)), Now(1));
                }
            }
        }
        Mutex::new(World { e, w, now: 1 })
    })
}

/// The oracle over what one packet left behind (see the module docs).
fn consistent(e: &Engine) {
    let snap = e.snapshot();
    let mut live: HashMap<EndpointId, (u64, u64)> = HashMap::new();
    let mut ports: HashMap<PoolId, HashSet<u16>> = HashMap::new();
    let mut note = |endpoint, closed: bool, pool, port| {
        let c = live.entry(endpoint).or_default();
        if closed {
            c.1 += 1;
        } else {
            c.0 += 1;
        }
        ports.entry(pool).or_default().insert(port);
    };
    let closed = |state: u32| state & flow::state::COUNTED_CLOSED != 0;
    e.flows().for_each_live(|r| note(r.view.endpoint, closed(r.view.state), r.pool, r.view.pkey.nat_port()));
    if let Some(t) = e.flows6() {
        t.for_each_live(|r| note(r.view.endpoint, closed(r.view.state), r.pool, r.view.pkey.nat_port()));
    }
    for ep in &snap.endpoints {
        let s = &ep.shared;
        let (open, closed) = live.get(&s.id).copied().unwrap_or_default();
        assert_eq!(
            (s.flows_active.load(Relaxed), s.flows_closed.load(Relaxed)),
            (open, closed),
            "endpoint {}: counted (open, closed) differ from the table",
            s.name
        );
    }
    for p in snap.pools.values() {
        let held = ports.get(&p.id).map_or(0, |s| s.len() as u32);
        assert!(p.pool.available() + held <= p.pool.capacity(), "pool {:?}: {} available, {held} held", p.id, p.pool.available());
    }
}

/// `PRIVLINK_FUZZ_ORACLE=0` turns the oracle off: to compare the edges
/// the inputs reach in privlink with a target that has none (the oracle's
/// own parsing adds edges of its own).
fn oracle() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("PRIVLINK_FUZZ_ORACLE").is_none_or(|v| v != "0"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut g = world().lock().unwrap_or_else(|e| e.into_inner());
    let World { e, w, now } = &mut *g;
    let step = u32::from(mode >> 4);
    if step > 0 {
        *now += step;
        e.expire(Now(*now));
    }
    let mut buf = rest.to_vec();
    if mode & 8 != 0 {
        repair(&mut buf);
    }
    let read = buf.len();
    buf.resize(read + wire::nat64::GROWTH, 0);
    let src = if mode & 1 == 0 { Source::Network(NetworkId(0)) } else { Source::Provider };
    let off = Offload { csum_partial: mode & 2 != 0, gso_size: if mode & 4 != 0 { 536 } else { 0 } };
    if !oracle() {
        let _ = w.process_read(&mut buf, read, src, Now(*now), off);
        let _ = w.take_extra();
        return;
    }
    // The input's own L4 checksum: translation keeps a valid one valid.
    let n = wire::packet_len(&buf[..read]);
    let valid_in = !off.csum_partial && check(&buf[..n], true).is_ok();
    let v = w.process_read(&mut buf, read, src, Now(*now), off);
    match v {
        Verdict::Forward(to) | Verdict::Fragment { to, .. } => {
            let out = &buf[..wire::packet_len(&buf)];
            let (s, sp, d, dp, proto) = check(out, valid_in).unwrap_or_else(|m| panic!("emitted packet: {m}\nin:  {:02x?}\nout: {out:02x?}", rest));
            if let Egress::Network(net) = to {
                let mut found = false;
                e.flows().for_each_live(|r| {
                    let c = r.view.ckey;
                    found |= c.network() == net.0 && Addr::from(c.consumer_addr()) == d && Addr::from(c.endpoint_addr()) == s;
                });
                if let Some(t) = e.flows6() {
                    t.for_each_live(|r| {
                        let c = r.view.ckey;
                        found |= c.network() == net.0 && c.consumer_addr() == d && c.endpoint_addr() == s;
                    });
                }
                assert!(found, "to network {net:?}: {s:#x}:{sp} -> {d:#x}:{dp} ({proto}) matches no flow of it");
            }
        }
        Verdict::Reply { len, .. } => {
            assert!(len <= worker::REPLY_MAX);
            check(w.reply(len), true).unwrap_or_else(|m| panic!("generated answer: {m}"));
        }
        Verdict::Drop(_) | Verdict::Held => {}
    }
    if let Some((to, made)) = w.take_extra() {
        assert_eq!(to, Egress::Provider);
        check(made, true).unwrap_or_else(|m| panic!("PROXY header segment: {m}"));
    }
    consistent(e);
});
