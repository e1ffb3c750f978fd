//! Flow logs: NAT events exported as IPFIX (RFC 7011) to a collector, with
//! RFC 8158's NAT information elements, so that "which consumer held which
//! NAT port when" can be answered from the operator's own collector (nfdump's
//! `nfcapd`, for one).
//!
//! The packet path only pushes events into the engine's bounded queue
//! (`privlink_core::events`); this thread drains it every 100 ms, packs up
//! to 38 records per message (under 1,400 bytes), and sends each message
//! in one UDP datagram, the template in front of the data every time (a
//! collector that starts late, or lost a datagram, can decode the next
//! one). Records the queue had no room for, and records of a message the
//! socket refused (collector down: ICMP port unreachable), are counted in
//! `privlink_flow_log_records_dropped_total`; forwarding never waits.
//!
//! IPv6 flows go in records of their own template: template 257 (IPv6 to
//! IPv6) carries the addresses as IEs 27 and 28 (source and destination
//! IPv6) and 281 and 282 (their post-NAT forms); template 258 (IPv6
//! translated to IPv4, RFC 6146) IEs 27 and 28 before the NAT and 225
//! and 226 (IPv4) after it. A message holds records of one template.

use privlink_core::addr::V6;
use privlink_core::events::NatEvent;
use privlink_core::Engine;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TEMPLATE_ID: u16 = 256;
/// (information element, length): RFC 7012 / RFC 8158 numbers.
const FIELDS: [(u16, u16); 11] = [
    (323, 8), // observationTimeMilliseconds
    (230, 1), // natEvent
    (4, 1),   // protocolIdentifier
    (8, 4),   // sourceIPv4Address (the consumer)
    (7, 2),   // sourceTransportPort
    (12, 4),  // destinationIPv4Address (the endpoint)
    (11, 2),  // destinationTransportPort
    (225, 4), // postNATSourceIPv4Address (the NAT IP)
    (227, 2), // postNAPTSourceTransportPort (the NAT port)
    (226, 4), // postNATDestinationIPv4Address (the backend)
    (228, 2), // postNAPTDestinationTransportPort
];
const RECORD: usize = 34;
const PER_MESSAGE: usize = 38;

/// Template 257: IPv6 flows to IPv6 services.
const TEMPLATE_V6: u16 = 257;
const FIELDS_V6: [(u16, u16); 11] = [
    (323, 8),  // observationTimeMilliseconds
    (230, 1),  // natEvent
    (4, 1),    // protocolIdentifier
    (27, 16),  // sourceIPv6Address (the consumer)
    (7, 2),    // sourceTransportPort
    (28, 16),  // destinationIPv6Address (the endpoint)
    (11, 2),   // destinationTransportPort
    (281, 16), // postNATSourceIPv6Address (the NAT IP)
    (227, 2),  // postNAPTSourceTransportPort
    (282, 16), // postNATDestinationIPv6Address (the backend)
    (228, 2),  // postNAPTDestinationTransportPort
];
/// Template 258: IPv6 flows translated to IPv4 services.
const TEMPLATE_V64: u16 = 258;
const FIELDS_V64: [(u16, u16); 11] = [
    (323, 8), // observationTimeMilliseconds
    (230, 1), // natEvent
    (4, 1),   // protocolIdentifier
    (27, 16), // sourceIPv6Address (the consumer)
    (7, 2),   // sourceTransportPort
    (28, 16), // destinationIPv6Address (the endpoint)
    (11, 2),  // destinationTransportPort
    (225, 4), // postNATSourceIPv4Address (the NAT IP)
    (227, 2), // postNAPTSourceTransportPort
    (226, 4), // postNATDestinationIPv4Address (the backend)
    (228, 2), // postNAPTDestinationTransportPort
];

/// Writes one IPFIX message of IPv6 flows' `events` (all translated to
/// IPv4, `translated`, or none): template 258 or 257 and its data set.
pub fn encode6(out: &mut Vec<u8>, events: &[NatEvent<V6>], now_ms: u64, seq: u32, translated: bool) {
    let (id, fields) = if translated { (TEMPLATE_V64, &FIELDS_V64) } else { (TEMPLATE_V6, &FIELDS_V6) };
    let record: usize = fields.iter().map(|f| usize::from(f.1)).sum();
    header_and_template(out, now_ms, seq, id, fields);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&((4 + events.len() * record) as u16).to_be_bytes());
    let post = |out: &mut Vec<u8>, a: u128| {
        if translated {
            out.extend_from_slice(&(a as u32).to_be_bytes());
        } else {
            out.extend_from_slice(&a.to_be_bytes());
        }
    };
    for e in events {
        let (c, p) = (e.ckey, e.pkey);
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.push(e.kind as u8);
        out.push(c.proto());
        out.extend_from_slice(&c.consumer_addr().to_be_bytes());
        out.extend_from_slice(&c.consumer_port().to_be_bytes());
        out.extend_from_slice(&c.endpoint_addr().to_be_bytes());
        out.extend_from_slice(&c.endpoint_port().to_be_bytes());
        post(out, p.nat_addr());
        out.extend_from_slice(&p.nat_port().to_be_bytes());
        post(out, p.backend_addr());
        out.extend_from_slice(&p.backend_port().to_be_bytes());
    }
    let len = out.len() as u16;
    out[2..4].copy_from_slice(&len.to_be_bytes());
}

/// The message header and one template set (the message length is
/// written once the data follows).
fn header_and_template(out: &mut Vec<u8>, now_ms: u64, seq: u32, id: u16, fields: &[(u16, u16)]) {
    out.clear();
    out.extend_from_slice(&10u16.to_be_bytes());
    out.extend_from_slice(&[0, 0]); // length, below
    out.extend_from_slice(&((now_ms / 1000) as u32).to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&1u32.to_be_bytes()); // observation domain
    out.extend_from_slice(&2u16.to_be_bytes());
    out.extend_from_slice(&((4 + 4 + fields.len() * 4) as u16).to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(fields.len() as u16).to_be_bytes());
    for (ie, len) in fields {
        out.extend_from_slice(&ie.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }
}

/// Writes one IPFIX message (header, template set, data set) for `events`
/// observed at `now_ms`; `seq` counts the data records sent before it.
pub fn encode(out: &mut Vec<u8>, events: &[NatEvent], now_ms: u64, seq: u32) {
    header_and_template(out, now_ms, seq, TEMPLATE_ID, &FIELDS);
    // Data set.
    out.extend_from_slice(&TEMPLATE_ID.to_be_bytes());
    out.extend_from_slice(&((4 + events.len() * RECORD) as u16).to_be_bytes());
    for e in events {
        let (c, p) = (e.ckey, e.pkey);
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.push(e.kind as u8);
        out.push(c.proto());
        out.extend_from_slice(&c.consumer_addr().to_be_bytes());
        out.extend_from_slice(&c.consumer_port().to_be_bytes());
        out.extend_from_slice(&c.endpoint_addr().to_be_bytes());
        out.extend_from_slice(&c.endpoint_port().to_be_bytes());
        out.extend_from_slice(&p.nat_addr().to_be_bytes());
        out.extend_from_slice(&p.nat_port().to_be_bytes());
        out.extend_from_slice(&p.backend_addr().to_be_bytes());
        out.extend_from_slice(&p.backend_port().to_be_bytes());
    }
    let len = out.len() as u16;
    out[2..4].copy_from_slice(&len.to_be_bytes());
}

/// The running exporter; stops when dropped.
#[derive(Debug)]
pub struct Exporter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Exporter {
    pub fn start(engine: &Arc<Engine>, collector: SocketAddr) -> anyhow::Result<Exporter> {
        use anyhow::Context;
        let sock = UdpSocket::bind(if collector.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
            .context("flow logs: cannot open a UDP socket")?;
        sock.connect(collector).with_context(|| format!("flow logs: cannot address {collector}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (e, st) = (engine.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("privlink-flowlog".into())
            .spawn(move || run(&e, &sock, &st))
            .context("cannot start the flow log thread")?;
        tracing::info!(collector = %collector, "exporting NAT events as IPFIX");
        Ok(Exporter { stop, thread: Some(thread) })
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(engine: &Engine, sock: &UdpSocket, stop: &AtomicBool) {
    let Some(q) = engine.events() else { return };
    let sent_c = metrics::counter!("privlink_flow_log_records_sent_total");
    let dropped_c = metrics::counter!("privlink_flow_log_records_dropped_total");
    let (mut seq, mut sent, mut refused) = (0u32, 0u64, 0u64);
    let mut batch = Vec::with_capacity(PER_MESSAGE);
    let mut msg = Vec::with_capacity(1500);
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if let Some(q6) = engine.events6() {
            // IPv6 flows: a message per template (16 records of 82 bytes
            // at most, or 23 of 58 translated: under 1,400 bytes).
            let mut by = [Vec::new(), Vec::new()];
            while let Some(e) = q6.pop() {
                let translated = privlink_core::wire::nat64::unmapped(e.pkey.nat_addr()).is_some();
                let list = &mut by[usize::from(translated)];
                list.push(e);
                if list.len() == 16 {
                    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                    encode6(&mut msg, list, now_ms, seq, translated);
                    seq = seq.wrapping_add(list.len() as u32);
                    match sock.send(&msg) {
                        Ok(_) => sent += list.len() as u64,
                        Err(_) => refused += list.len() as u64,
                    }
                    list.clear();
                }
            }
            for (translated, list) in [false, true].into_iter().zip(&by) {
                if list.is_empty() {
                    continue;
                }
                let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                encode6(&mut msg, list, now_ms, seq, translated);
                seq = seq.wrapping_add(list.len() as u32);
                match sock.send(&msg) {
                    Ok(_) => sent += list.len() as u64,
                    Err(_) => refused += list.len() as u64,
                }
            }
        }
        loop {
            batch.clear();
            while batch.len() < PER_MESSAGE {
                match q.pop() {
                    Some(e) => batch.push(e),
                    None => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            encode(&mut msg, &batch, now_ms, seq);
            seq = seq.wrapping_add(batch.len() as u32);
            match sock.send(&msg) {
                Ok(_) => sent += batch.len() as u64,
                Err(_) => refused += batch.len() as u64,
            }
        }
        sent_c.absolute(sent);
        dropped_c.absolute(q.dropped() + engine.events6().map_or(0, |q| q.dropped()) + refused);
        if stopping {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use privlink_core::events::NatEventKind;
    use privlink_core::flow::{ConsumerKey, ProviderKey};
    use privlink_core::EndpointId;

    #[test]
    fn ipv6_records_carry_their_ipv6_and_translated_addresses() {
        use privlink_core::addr::V6;
        let (c, e): (u128, u128) = (
            "fd00:aa::10".parse::<std::net::Ipv6Addr>().expect("a").into(),
            "fd00:aa::5".parse::<std::net::Ipv6Addr>().expect("a").into(),
        );
        let (nat6, be6): (u128, u128) = (
            "fd00:64::4".parse::<std::net::Ipv6Addr>().expect("a").into(),
            "fd00:50::10".parse::<std::net::Ipv6Addr>().expect("a").into(),
        );
        let ev = |nat: u128, be: u128| NatEvent::<V6> {
            kind: NatEventKind::Create,
            ckey: ConsumerKey::<V6>::of(0, 6, c, 40000, e, 80),
            pkey: ProviderKey::<V6>::of(6, nat, 2000, be, 8080),
            endpoint: EndpointId(1),
        };
        let mut m = Vec::new();
        encode6(&mut m, &[ev(nat6, be6)], 1_700_000_000_000, 9, false);
        // Header 16, template set 4 + 4 + 11 * 4, data set 4 + 82.
        assert_eq!(m.len(), 16 + 52 + 4 + 82);
        assert_eq!(&m[20..24], &[1, 1, 0, 11], "template 257");
        let ies: Vec<u16> = (0..11).map(|i| u16::from_be_bytes([m[24 + 4 * i], m[25 + 4 * i]])).collect();
        assert_eq!(ies, [323, 230, 4, 27, 7, 28, 11, 281, 227, 282, 228]);
        let d = 16 + 52;
        assert_eq!(&m[d..d + 4], &[1, 1, 0, 86]);
        let r = &m[d + 4..];
        assert_eq!((r[8], r[9]), (1, 6));
        assert_eq!(&r[10..26], &c.to_be_bytes());
        assert_eq!(&r[46..62], &nat6.to_be_bytes(), "postNATSourceIPv6Address");
        assert_eq!(&r[64..80], &be6.to_be_bytes(), "postNATDestinationIPv6Address");
        assert_eq!(&r[80..82], &8080u16.to_be_bytes());
        // Translated to IPv4: template 258, the post-NAT addresses IPv4.
        let (nat4, be4) =
            (privlink_core::wire::nat64::mapped(0xc0a8_6404), privlink_core::wire::nat64::mapped(0xc0a8_320a));
        encode6(&mut m, &[ev(nat4, be4)], 1_700_000_000_000, 10, true);
        assert_eq!(m.len(), 16 + 52 + 4 + 58);
        assert_eq!(&m[20..24], &[1, 2, 0, 11], "template 258");
        let r = &m[16 + 52 + 4..];
        assert_eq!(&r[46..50], &[192, 168, 100, 4], "postNATSourceIPv4Address");
        assert_eq!(&r[52..56], &[192, 168, 50, 10], "postNATDestinationIPv4Address");
    }

    #[test]
    fn a_message_is_laid_out_as_rfc_7011_says() {
        let e = NatEvent {
            kind: NatEventKind::Create,
            ckey: ConsumerKey::new(0, 6, 0x0a01_000a, 40000, 0x0a01_0005, 80),
            pkey: ProviderKey::new(6, 0xc0a8_6404, 1025, 0xc0a8_320a, 8080),
            endpoint: EndpointId(1),
        };
        let mut m = Vec::new();
        encode(&mut m, &[e, e], 1_700_000_000_123, 7);
        assert_eq!(m.len(), 16 + 52 + 4 + 2 * RECORD);
        assert_eq!(&m[..4], &[0, 10, 0, m.len() as u8]);
        assert_eq!(&m[8..12], &7u32.to_be_bytes());
        assert_eq!(&m[16..20], &[0, 2, 0, 52], "template set");
        assert_eq!(&m[20..24], &[1, 0, 0, 11], "template 256, 11 fields");
        let d = 16 + 52;
        assert_eq!(&m[d..d + 4], &[1, 0, 0, (4 + 2 * RECORD) as u8], "data set of template 256");
        let r = &m[d + 4..d + 4 + RECORD];
        assert_eq!(&r[..8], &1_700_000_000_123u64.to_be_bytes());
        assert_eq!((r[8], r[9]), (1, 6), "natEvent create, TCP");
        assert_eq!(&r[10..16], &[10, 1, 0, 10, 0x9c, 0x40]);
        assert_eq!(&r[16..22], &[10, 1, 0, 5, 0, 80]);
        assert_eq!(&r[22..28], &[192, 168, 100, 4, 4, 1]);
        assert_eq!(&r[28..34], &[192, 168, 50, 10, 0x1f, 0x90]);
    }
}
