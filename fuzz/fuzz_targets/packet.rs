//! Packets into `Worker::process_offload`, from either side, on top of a
//! populated flow table (TCP, UDP and ICMP flows already set up, one
//! endpoint's service with PROXY protocol), with an oracle after each one.
//!
//! The first input byte is the mode:
//! - bit 0: the side (consumer network 0, or the provider);
//! - bits 1-2: the offload flags (partial checksum, GSO);
//! - bit 3: *repair*: after mutation, set the IPv4 total length (and the UDP
//!   length) to what is there and recompute the IP and L4 checksums, so the
//!   input passes validation and reaches translation, flow setup and the
//!   TCP state machine instead of dying at a checksum;
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
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};

const EP: [u8; 4] = [10, 1, 0, 5];
const EP_PROXY: [u8; 4] = [10, 1, 0, 6];

fn desired() -> Desired {
    let svc = |name: &str, nat: u8, proxy| ServiceSpec {
        proxy,
        name: name.into(),
        nat_ips: vec![Ipv4Addr::new(192, 168, 100, nat)],
        nat_ports: 2000..=2063,
        backends: vec![Ipv4Addr::new(192, 168, 50, 10)],
        ports: vec![
            PortRule { protocol: Protocol::Tcp, port: 80, backend_port: 8080 },
            PortRule { protocol: Protocol::Udp, port: 53, backend_port: 53 },
        ],
    };
    let ep = |name: &str, ip: [u8; 4], service, link_id| EndpointSpec {
        link_id,
        name: name.into(),
        network: 0,
        ip: Ipv4Addr::from(ip),
        service,
        state: ConnectionState::Approved,
        limits: EndpointLimits { max_flows: Some(48), allow_sources: Vec::new() },
    };
    Desired {
        provider_mtu: 1400,
        networks: vec![NetworkSpec { id: NetworkId(0), name: "a".into(), mtu: 1500 }],
        services: vec![svc("s", 4, None), svc("pp", 5, Some(ProxyTlv::Azure))],
        endpoints: vec![ep("e", EP, 0, 0), ep("pp", EP_PROXY, 1, 0x1234_5678)],
    }
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

/// Whether `p` parses, its IP checksum is right, and (when `l4` is asked
/// for) its TCP/UDP/ICMP checksum too. Returns the parsed addresses, ports
/// (or echo identifier) and protocol.
fn check(p: &[u8], l4: bool) -> Result<(u32, u16, u32, u16, u8), String> {
    let s = SlicedPacket::from_ip(p).map_err(|e| format!("does not parse: {e:?}"))?;
    let Some(NetSlice::Ipv4(ip)) = &s.net else { return Err("not IPv4".into()) };
    let h = ip.header().to_header();
    // Over the raw header: etherparse's header struct drops the reserved
    // flag bit, so its own sum would differ for a packet that sets it.
    let ihl = usize::from(p[0] & 0x0f) * 4;
    if checksum::checksum(&p[..ihl]) != 0 {
        return Err("IP checksum".into());
    }
    let (src, dst) = (u32::from_be_bytes(h.source), u32::from_be_bytes(h.destination));
    let whole = !ip.is_payload_fragmented();
    let (sp, dp) = match &s.transport {
        Some(TransportSlice::Tcp(t)) => {
            if l4 && whole && t.to_header().calc_checksum_ipv4(&h, t.payload()).ok() != Some(t.checksum()) {
                return Err("TCP checksum".into());
            }
            (t.source_port(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => {
            let ok = u.checksum() == 0
                || u.to_header().calc_checksum_ipv4(&h, u.payload()).ok() == Some(u.checksum());
            if l4 && whole && !ok {
                return Err("UDP checksum".into());
            }
            (u.source_port(), u.destination_port())
        }
        Some(TransportSlice::Icmpv4(i)) => {
            if l4 && whole && i.header().icmp_type.calc_checksum(i.payload()) != i.checksum() {
                return Err("ICMP checksum".into());
            }
            let id = match i.header().icmp_type {
                etherparse::Icmpv4Type::EchoRequest(e) | etherparse::Icmpv4Type::EchoReply(e) => e.id,
                _ => 0,
            };
            (id, id)
        }
        _ => (0, 0),
    };
    Ok((src, sp, dst, dp, h.protocol.0))
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
        }
        Mutex::new(World { e, w, now: 1 })
    })
}

/// The oracle over what one packet left behind (see the module docs).
fn consistent(e: &Engine) {
    let snap = e.snapshot();
    let mut live: HashMap<EndpointId, (u64, u64)> = HashMap::new();
    let mut ports: HashMap<PoolId, HashSet<u16>> = HashMap::new();
    e.flows().for_each_live(|r| {
        let c = live.entry(r.view.endpoint).or_default();
        if r.view.state & flow::state::COUNTED_CLOSED != 0 {
            c.1 += 1;
        } else {
            c.0 += 1;
        }
        ports.entry(r.pool).or_default().insert(r.view.pkey.nat_port());
    });
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
    let src = if mode & 1 == 0 { Source::Network(NetworkId(0)) } else { Source::Provider };
    let off = Offload { csum_partial: mode & 2 != 0, gso_size: if mode & 4 != 0 { 536 } else { 0 } };
    if !oracle() {
        let _ = w.process_offload(&mut buf, src, Now(*now), off);
        let _ = w.take_extra();
        return;
    }
    // The input's own L4 checksum: translation keeps a valid one valid.
    let n = wire::packet_len(&buf);
    let valid_in = !off.csum_partial && check(&buf[..n], true).is_ok();
    let v = w.process_offload(&mut buf, src, Now(*now), off);
    match v {
        Verdict::Forward(to) | Verdict::Fragment { to, .. } => {
            let out = &buf[..wire::packet_len(&buf)];
            let (s, sp, d, dp, proto) = check(out, valid_in).unwrap_or_else(|m| panic!("emitted packet: {m}\nin:  {:02x?}\nout: {out:02x?}", rest));
            if let Egress::Network(net) = to {
                let mut found = false;
                e.flows().for_each_live(|r| {
                    let c = r.view.ckey;
                    found |= c.network() == net.0 && c.consumer_addr() == d && c.endpoint_addr() == s;
                });
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
