//! What the in-memory benches share: one network, one endpoint, a service
//! with 8 NAT IPs and 4 backends offering one port, consumers spread so the
//! NAT IPs share the load, and packet builders.

#![allow(dead_code)] // Each bench uses part of it.

use privlink_core::*;
use std::net::Ipv4Addr;

/// The endpoint's address.
pub const EP: u32 = 0x0a01_0005;

/// The configuration: `proto` port 53 offered by the service.
pub fn desired(proto: Protocol) -> Desired {
    Desired {
        provider_mtu: 1500,
        networks: vec![NetworkSpec { id: NetworkId(0), name: "vnet-a".into(), mtu: 1500 }],
        services: vec![ServiceSpec {
            proxy: None,
            name: "svc".into(),
            nat_ips: (1..=8).map(|i| Ipv4Addr::new(192, 168, 100, i).into()).collect(),
            nat_ports: 1024..=65535,
            backends: (10..14).map(|i| Ipv4Addr::new(192, 168, 50, i).into()).collect(),
            ports: vec![PortRule { protocol: proto, port: 53, backend_port: 53 }],
        }],
        endpoints: vec![EndpointSpec {
            link_id: 0,
            name: "pe".into(),
            network: 0,
            ip: Ipv4Addr::from(EP).into(),
            service: 0,
            state: ConnectionState::Approved,
            limits: EndpointLimits::default(),
        }],
    }
}

/// Consumer `i`'s address and port: 1,000 flows per address.
pub fn consumer(i: u32) -> (u32, u16) {
    (0x0a00_0000 + i / 1_000 + 1, 1024 + (i % 1_000) as u16)
}

/// A TCP segment with valid checksums; `flags` holds `S`, `A`, `F`.
#[allow(clippy::too_many_arguments)]
pub fn tcp(src: u32, sport: u16, dst: u32, dport: u16, seq: u32, ack: u32, flags: &str, data: usize) -> Vec<u8> {
    let mut b = etherparse::PacketBuilder::ipv4(src.to_be_bytes(), dst.to_be_bytes(), 64).tcp(sport, dport, seq, 65535);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('A') {
        b = b.ack(ack);
    }
    if flags.contains('F') {
        b = b.fin();
    }
    let mut v = Vec::new();
    b.write(&mut v, &vec![0u8; data]).expect("tcp");
    v
}

/// (source, source port, destination, destination port) of a packet.
pub fn ends(p: &[u8]) -> (u32, u16, u32, u16) {
    let g = |a: usize| u32::from_be_bytes([p[a], p[a + 1], p[a + 2], p[a + 3]]);
    let h = |a: usize| u16::from_be_bytes([p[a], p[a + 1]]);
    (g(12), h(20), g(16), h(22))
}

/// The IPv6 endpoint's address (`fd00:1::5`).
pub const EP6: u128 = 0xfd00_0001_0000_0000_0000_0000_0000_0005;

/// [`desired`] in IPv6: the same shape (8 NAT IPs, 4 backends, one port),
/// an IPv6 endpoint of an IPv6 service.
pub fn desired6(proto: Protocol) -> Desired {
    let mut d = desired(proto);
    let s = &mut d.services[0];
    s.nat_ips = (1..=8u16).map(|i| std::net::Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, i).into()).collect();
    s.backends = (10..14u16).map(|i| std::net::Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, i).into()).collect();
    d.endpoints[0].ip = std::net::Ipv6Addr::from(EP6).into();
    d
}

/// Consumer `i`'s IPv6 address and port: 1,000 flows per address.
pub fn consumer6(i: u32) -> (u128, u16) {
    (0xfd00_0001_0000_0000_0000_0000_0001_0000 + u128::from(i / 1_000), 1024 + (i % 1_000) as u16)
}

/// A UDP datagram over IPv6 with a valid checksum and `data` bytes.
pub fn udp6(src: u128, sport: u16, dst: u128, dport: u16, data: usize) -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::PacketBuilder::ipv6(src.to_be_bytes(), dst.to_be_bytes(), 64)
        .udp(sport, dport)
        .write(&mut v, &vec![0u8; data])
        .expect("udp6");
    v
}

/// Source and destination (address, port) of an IPv6 packet without
/// extension headers.
pub fn ends6(p: &[u8]) -> (u128, u16, u128, u16) {
    let g = |a: usize| u128::from_be_bytes(p[a..a + 16].try_into().expect("16 bytes"));
    let h = |a: usize| u16::from_be_bytes([p[a], p[a + 1]]);
    (g(8), h(40), g(24), h(42))
}
