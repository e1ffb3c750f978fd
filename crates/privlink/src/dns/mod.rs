//! Private DNS: each consumer network's resolver answers the published
//! names of its own endpoints (docs/DNS.md).
//!
//! Why a socket per network rather than answers on the packet path: a
//! resolver must speak TCP as well as UDP (RFC 7766 §5: every resolver
//! answers over TCP; a truncated answer is retried there), and the packet
//! path has no TCP stack of its own: it rewrites other hosts' segments. So
//! the network's resolver address is added to the network's TUN device
//! (`ip addr add ADDR/32`) inside the network's namespace, and privlink
//! binds a UDP socket and a TCP listener to it there. Only processes of
//! that namespace reach it, so two networks with the same range and the
//! same resolver address each reach their own: the namespace is the
//! isolation, as it is for the data path. The packet path is untouched
//! (a query never goes through a TUN device).
//!
//! This module is the sans-IO half: [`Zones`] (what the resolvers answer,
//! rebuilt from the config at every converge) and [`Zones::answer`] (one
//! query's bytes in, what to send back out). The approval state is read
//! per query from the engine's snapshot, so an approval or a rejection is
//! answered at once. [`server`] owns the sockets, the rate limits, the
//! forwarding and the metrics.
//!
//! The wire format is hickory-proto's (parsing is bounded: names of at
//! most 255 bytes, compression pointers that only point backwards).

pub mod mmsg;
pub mod server;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use privlink_config::Config;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

/// Largest UDP answer privlink sends when the query carries EDNS: the
/// value DNS Flag Day 2020 settled on (no IP fragmentation on any path).
pub const EDNS_PAYLOAD: u16 = 1232;
/// Largest UDP answer without EDNS (RFC 1035 §4.2.1).
pub const CLASSIC_UDP: usize = 512;

/// One published name in one network: the IPv4 endpoint behind its A
/// record and the IPv6 one behind its AAAA record (either may be absent;
/// each endpoint's approval decides its own record).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// (endpoint, address) of the A record.
    pub v4: Option<(String, IpAddr)>,
    /// (endpoint, address) of the AAAA record.
    pub v6: Option<(String, IpAddr)>,
}

/// What every resolver answers: built from a config, swapped in whole.
#[derive(Debug, Default)]
pub struct Zones {
    /// Network -> name -> the endpoint it names there.
    networks: HashMap<String, HashMap<String, Published>>,
    /// Every published name of every network: a name published somewhere
    /// is privlink's to answer in every network (NXDOMAIN where it has no
    /// endpoint), never forwarded.
    private: HashSet<String>,
    /// `[dns]` as configured.
    pub settings: privlink_config::Dns,
}

/// What a query gets.
#[derive(Debug)]
pub enum Answer {
    /// An answer to send back (its response code, for the metrics).
    Reply(Vec<u8>, ResponseCode),
    /// Not a published name: the upstreams answer it. The query as it
    /// came, parsed.
    Forward(Box<Message>),
    /// Not a DNS query at all (too short, or a response): nothing is sent.
    Drop,
}

impl Zones {
    /// The names each network publishes under `config`.
    pub fn build(config: &Config) -> Zones {
        let mut networks: HashMap<String, HashMap<String, Published>> = HashMap::new();
        let mut private = HashSet::new();
        for e in &config.endpoints {
            let names = config.dns_names(e);
            let zone = networks.entry(e.network.clone()).or_default();
            for n in names {
                private.insert(n.clone());
                // `check` allows one endpoint per name, network and family.
                let p = zone.entry(n).or_default();
                let slot = if e.ip.is_ipv6() { &mut p.v6 } else { &mut p.v4 };
                *slot = Some((e.name.clone(), e.ip));
            }
        }
        for s in &config.services {
            private.extend(s.dns_names.iter().cloned());
        }
        Zones { networks, private, settings: config.dns.clone() }
    }

    /// Whether `name` is a published name or lies below one
    /// (`x.orders.privatelink.example.internal`): privlink's to answer,
    /// never forwarded (a name below an NXDOMAIN does not exist either,
    /// RFC 8020).
    fn is_private(&self, name: &str) -> bool {
        if self.private.contains(name) {
            return true;
        }
        name.match_indices('.').any(|(i, _)| self.private.contains(&name[i + 1..]))
    }

    /// Answers one query (`query`, the message's bytes; over TCP without
    /// the length prefix) asked in network `net`. `approved` says whether
    /// an endpoint's connection is approved now.
    ///
    /// - a published name of this network: the A record of its IPv4
    ///   endpoint and the AAAA record of its IPv6 endpoint, each while
    ///   that endpoint is approved (NOERROR with no records for a type it
    ///   has none of, RFC 2308 §2.2); NXDOMAIN when neither is approved.
    ///   Authoritative, TTL `[dns] ttl`;
    /// - a name published only elsewhere: NXDOMAIN;
    /// - ANY (RFC 8482 lets a server decline it), AXFR and IXFR: REFUSED;
    /// - any other name: [`Answer::Forward`] with upstreams, else REFUSED;
    /// - not one question of opcode QUERY: FORMERR or NOTIMP; bytes that
    ///   do not parse: FORMERR when the header is there, else nothing.
    pub fn answer(&self, net: &str, query: &[u8], tcp: bool, approved: &dyn Fn(&str) -> bool) -> Answer {
        if query.len() < 12 || query[2] & 0x80 != 0 {
            // No header to answer, or a response (answering responses
            // makes loops between resolvers).
            return Answer::Drop;
        }
        let id = u16::from_be_bytes([query[0], query[1]]);
        let op = OpCode::from_u8((query[2] >> 3) & 0x0f);
        if query[4..6] != [0, 1] && op == OpCode::Query {
            // Not one question: FORMERR before the parser reserves room
            // for the counts a 12-byte header claims.
            return reply(Message::error_msg(id, op, ResponseCode::FormErr), CLASSIC_UDP);
        }
        let msg = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) => return reply(Message::error_msg(id, op, ResponseCode::FormErr), CLASSIC_UDP),
        };
        let limit = limit(&msg, tcp);
        if msg.message_type() != MessageType::Query {
            return Answer::Drop;
        }
        if msg.op_code() != OpCode::Query {
            return reply(self.response(&msg, ResponseCode::NotImp), limit);
        }
        let [q] = msg.queries() else {
            return reply(self.response(&msg, ResponseCode::FormErr), limit);
        };
        let key = lookup_key(q.name());
        let name = key.as_str();
        let qtype = q.query_type();
        if matches!(qtype, RecordType::ANY | RecordType::AXFR | RecordType::IXFR) {
            return reply(self.response(&msg, ResponseCode::Refused), limit);
        }
        let published = self.networks.get(net).and_then(|z| z.get(name));
        if published.is_none() && !self.is_private(name) {
            if self.settings.forward.is_empty() {
                return reply(self.response(&msg, ResponseCode::Refused), limit);
            }
            return Answer::Forward(Box::new(msg));
        }
        // Not this network's, or below a published name: nothing there.
        let live = |x: &Option<(String, IpAddr)>| x.as_ref().filter(|(ep, _)| approved(ep)).map(|&(_, a)| a);
        let (v4, v6) = published.map_or((None, None), |p| (live(&p.v4), live(&p.v6)));
        if v4.is_none() && v6.is_none() {
            return reply(self.respond(msg, ResponseCode::NXDomain), limit);
        }
        let rdata = match (qtype, v4, v6) {
            (RecordType::A, Some(IpAddr::V4(a)), _) => Some(RData::A(A(a))),
            (RecordType::AAAA, _, Some(IpAddr::V6(a))) => Some(RData::AAAA(AAAA(a))),
            _ => None,
        };
        let record = rdata
            .filter(|_| q.query_class() == DNSClass::IN)
            .map(|r| Record::from_rdata(q.name().clone(), self.settings.ttl, r));
        let mut resp = self.respond(msg, ResponseCode::NoError);
        if let Some(r) = record {
            resp.add_answer(r);
        }
        reply(resp, limit)
    }

    /// The query `q` turned into its own authoritative answer with code
    /// `rcode` and no records (the question kept as asked, case and all),
    /// rather than a new message: no copy of the question.
    fn respond(&self, mut q: Message, rcode: ResponseCode) -> Message {
        let edns = q.extensions().is_some();
        q.set_message_type(MessageType::Response)
            .set_authoritative(true)
            .set_truncated(false)
            .set_authentic_data(false)
            .set_recursion_available(!self.settings.forward.is_empty())
            .set_response_code(rcode);
        q.take_answers();
        q.take_name_servers();
        q.take_additionals();
        q.take_signature();
        *q.extensions_mut() = edns.then(edns_record);
        q
    }

    /// An empty response to `q` with code `rcode`, RA when there are
    /// upstreams ([`empty_response`]).
    fn response(&self, q: &Message, rcode: ResponseCode) -> Message {
        empty_response(q, rcode, !self.settings.forward.is_empty())
    }
}

/// An empty response to `q` with code `rcode`: its id, question and RD;
/// RA as `ra`; an OPT record when it had one.
fn empty_response(q: &Message, rcode: ResponseCode, ra: bool) -> Message {
    let mut r = Message::new();
    r.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(q.op_code())
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(ra)
        .set_response_code(rcode);
    if q.op_code() == OpCode::Query {
        r.add_queries(q.queries().iter().cloned());
    }
    if q.extensions().is_some() {
        r.set_edns(edns_record());
    }
    r
}

/// `name` as the zones key it: lower case (DNS names compare
/// case-insensitively, RFC 4343), labels joined by dots, no trailing dot.
/// A label holding a byte no published name can hold (anything but
/// letters, digits, '-' and '_') gives a key that matches nothing.
fn lookup_key(name: &hickory_proto::rr::Name) -> String {
    let mut key = String::with_capacity(name.len());
    for label in name.iter() {
        if !key.is_empty() {
            key.push('.');
        }
        for &c in label {
            if !(c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
                return String::from("\\0");
            }
            key.push(char::from(c.to_ascii_lowercase()));
        }
    }
    key
}

/// privlink's own OPT record.
fn edns_record() -> Edns {
    let mut e = Edns::new();
    e.set_max_payload(EDNS_PAYLOAD);
    e
}

/// Bytes an answer to `q` may take: 65,535 over TCP; over UDP the
/// query's EDNS size (at least 512, at most [`EDNS_PAYLOAD`]), else 512.
pub fn limit(q: &Message, tcp: bool) -> usize {
    if tcp {
        return usize::from(u16::MAX);
    }
    q.extensions()
        .as_ref()
        .map_or(CLASSIC_UDP, |e| usize::from(e.max_payload()).clamp(CLASSIC_UDP, usize::from(EDNS_PAYLOAD)))
}

/// `m` as bytes within `limit`: past it, the header and question only,
/// with TC set (RFC 2181 §9), so the client asks again over TCP.
fn reply(m: Message, limit: usize) -> Answer {
    let code = m.response_code();
    match encode(&m, limit) {
        Some(b) => Answer::Reply(b, code),
        None => Answer::Drop,
    }
}

/// Encodes `m`, truncated when longer than `limit`.
pub fn encode(m: &Message, limit: usize) -> Option<Vec<u8>> {
    let b = m.to_vec().ok()?;
    if b.len() <= limit {
        return Some(b);
    }
    let mut t = m.truncate();
    t.set_truncated(true);
    t.to_vec().ok()
}

/// The query privlink sends upstream for the client's `q`: a fresh id,
/// the same question and RD, EDNS with privlink's buffer size.
pub fn upstream_query(q: &Message, id: u16) -> Message {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(q.recursion_desired())
        .set_checking_disabled(q.checking_disabled());
    m.add_queries(q.queries().iter().cloned());
    let mut e = Edns::new();
    e.set_max_payload(4096);
    // A validating client asked for DNSSEC records: so does privlink.
    e.set_dnssec_ok(q.extensions().as_ref().is_some_and(|c| c.flags().dnssec_ok));
    m.set_edns(e);
    m
}

/// Whether `r` answers `sent` (same id and question: RFC 5452 §9.1).
pub fn answers(r: &Message, sent: &Message) -> bool {
    r.message_type() == MessageType::Response && r.id() == sent.id() && r.queries() == sent.queries()
}

/// The upstream's answer `up` relayed to the client that asked `q`: the
/// client's id, upstream's records and code, the client's EDNS, within
/// the client's limit (truncated with TC past it).
pub fn relay(up: &Message, q: &Message, tcp: bool) -> Option<Vec<u8>> {
    let mut r = up.clone();
    // TC stays when the upstream's answer was cut (over UDP, with no whole
    // answer over TCP to be had): a client must not take part of an
    // answer for all of it.
    r.set_id(q.id()).set_recursion_available(true).set_truncated(up.truncated());
    *r.extensions_mut() = q.extensions().as_ref().map(|_| edns_record());
    encode(&r, limit(q, tcp))
}

/// SERVFAIL for `q` (no upstream answered).
pub fn servfail(q: &Message, tcp: bool) -> Option<Vec<u8>> {
    encode(&empty_response(q, ResponseCode::ServFail, true), limit(q, tcp))
}

/// The question of `q` as a log shows it: name and type.
pub fn question(q: &Message) -> (String, String) {
    q.queries()
        .first()
        .map_or((String::new(), String::new()), |x: &Query| (x.name().to_ascii(), x.query_type().to_string()))
}

/// The `rcode` labels of `privlink_dns_queries_total`.
pub const RCODES: [&str; 7] = ["NOERROR", "NXDOMAIN", "REFUSED", "FORMERR", "SERVFAIL", "NOTIMP", "other"];

/// Where response code `c` is in [`RCODES`].
pub fn rcode_index(c: ResponseCode) -> usize {
    match c {
        ResponseCode::NoError => 0,
        ResponseCode::NXDomain => 1,
        ResponseCode::Refused => 2,
        ResponseCode::FormErr => 3,
        ResponseCode::ServFail => 4,
        ResponseCode::NotImp => 5,
        _ => 6,
    }
}

#[cfg(test)]
mod tests;
