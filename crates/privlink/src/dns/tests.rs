use super::*;
use hickory_proto::rr::Name;
use proptest::prelude::*;
use std::net::Ipv4Addr;
use std::str::FromStr;

const CONFIG: &str = r#"
[provider]
tun = "plp0"

[[network]]
name = "a"
tenant = "t1"
tun = "pla0"
netns = "ns-a"
dns = "10.1.0.53"

[[network]]
name = "b"
tenant = "t2"
tun = "pla0"
netns = "ns-b"
dns = "10.1.0.53"

[[network]]
name = "c"
tenant = "t3"
tun = "pla0"
netns = "ns-c"

[[service]]
name = "orders"
nat_ips = ["192.168.100.4"]
backends = ["192.168.50.10"]
ports = [{ protocol = "tcp", port = 80 }]
dns_names = ["orders.privatelink.example.internal"]

[[endpoint]]
name = "pe-a"
network = "a"
ip = "10.1.0.5"
service = "orders"
dns_names = ["mine.example.internal"]

[[endpoint]]
name = "pe-b"
network = "b"
ip = "10.1.0.9"
service = "orders"
"#;

fn zones(extra: &str) -> Zones {
    Zones::build(&Config::parse(&format!("{CONFIG}{extra}"), "t.toml").expect("valid"))
}

fn query(name: &str, t: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(0x4242).set_recursion_desired(true);
    m.add_query(Query::query(Name::from_str(name).expect("valid"), t));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().expect("valid")
}

fn reply_of(a: Answer) -> Message {
    match a {
        Answer::Reply(b, code) => {
            let m = Message::from_vec(&b).expect("an answer parses");
            assert_eq!(m.response_code(), code);
            m
        }
        other => panic!("not a reply: {other:?}"),
    }
}

fn a_records(m: &Message) -> Vec<(Ipv4Addr, u32)> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some((a.0, r.ttl())),
            _ => None,
        })
        .collect()
}

#[test]
fn each_network_gets_its_own_endpoint_while_approved_and_nxdomain_otherwise() {
    let z = zones("");
    let yes = |_: &str| true;
    let q = query("Orders.PrivateLink.Example.Internal.", RecordType::A, None);
    let a = reply_of(z.answer("a", &q, false, &yes));
    assert_eq!(a_records(&a), vec![(Ipv4Addr::new(10, 1, 0, 5), 10)]);
    assert!(a.authoritative() && a.id() == 0x4242 && a.recursion_desired() && !a.recursion_available());
    let b = reply_of(z.answer("b", &q, false, &yes));
    assert_eq!(a_records(&b), vec![(Ipv4Addr::new(10, 1, 0, 9), 10)]);
    // An endpoint's own name is its network's only.
    let mine = query("mine.example.internal.", RecordType::A, None);
    assert_eq!(a_records(&reply_of(z.answer("a", &mine, false, &yes))).len(), 1);
    assert_eq!(reply_of(z.answer("b", &mine, false, &yes)).response_code(), ResponseCode::NXDomain);
    // A network without an endpoint of the service: NXDOMAIN, not forwarded.
    assert_eq!(reply_of(z.answer("c", &q, false, &yes)).response_code(), ResponseCode::NXDomain);
    // Pending or rejected: NXDOMAIN.
    let only_b = |e: &str| e == "pe-b";
    assert_eq!(reply_of(z.answer("a", &q, false, &only_b)).response_code(), ResponseCode::NXDomain);
    assert_eq!(a_records(&reply_of(z.answer("b", &q, false, &only_b))).len(), 1);
    // A name that differs by a byte no published name holds is not one.
    let mut odd = query("ordersx.privatelink.example.internal.", RecordType::A, None);
    let at = odd.windows(7).position(|w| w == b"ordersx").expect("label") + 6;
    odd[at] = 0;
    assert_eq!(reply_of(z.answer("a", &odd, false, &yes)).response_code(), ResponseCode::Refused);
    // Below a published name: NXDOMAIN, never forwarded, even with
    // upstreams; a name that merely ends the same way is not below it.
    let zf = zones("\n[dns]\nforward = [\"127.0.0.1:5353\"]\n");
    let below = query("x.orders.privatelink.example.internal.", RecordType::A, None);
    assert_eq!(reply_of(zf.answer("a", &below, false, &yes)).response_code(), ResponseCode::NXDomain);
    let lookalike = query("xorders.privatelink.example.internal.", RecordType::A, None);
    assert!(matches!(zf.answer("a", &lookalike, false, &yes), Answer::Forward(_)));
    // AAAA of a published IPv4 endpoint: NOERROR, no records.
    let aaaa =
        reply_of(z.answer("a", &query("orders.privatelink.example.internal.", RecordType::AAAA, None), false, &yes));
    assert_eq!((aaaa.response_code(), aaaa.answers().len()), (ResponseCode::NoError, 0));
}

#[test]
fn the_ttl_follows_the_config_and_other_names_are_refused_or_forwarded() {
    let z = zones("\n[dns]\nttl = 30\n");
    let q = query("orders.privatelink.example.internal.", RecordType::A, None);
    assert_eq!(a_records(&reply_of(z.answer("a", &q, false, &|_| true)))[0].1, 30);
    let other = query("example.com.", RecordType::A, None);
    assert_eq!(reply_of(z.answer("a", &other, false, &|_| true)).response_code(), ResponseCode::Refused);
    let z = zones("\n[dns]\nforward = [\"127.0.0.1:5353\"]\n");
    match z.answer("a", &other, false, &|_| true) {
        Answer::Forward(m) => assert_eq!(m.id(), 0x4242),
        a => panic!("{a:?}"),
    }
    let r = reply_of(z.answer("a", &q, false, &|_| true));
    assert!(r.recursion_available(), "RA with upstreams");
}

#[test]
fn any_zone_transfers_and_malformed_queries() {
    let z = zones("\n[dns]\nforward = [\"127.0.0.1:5353\"]\n");
    for t in [RecordType::ANY, RecordType::AXFR, RecordType::IXFR] {
        let q = query("orders.privatelink.example.internal.", t, None);
        assert_eq!(reply_of(z.answer("a", &q, true, &|_| true)).response_code(), ResponseCode::Refused, "{t}");
    }
    // Too short, or a response: nothing.
    assert!(matches!(z.answer("a", &[1, 2, 3], false, &|_| true), Answer::Drop));
    let mut resp = query("example.com.", RecordType::A, None);
    resp[2] |= 0x80;
    assert!(matches!(z.answer("a", &resp, false, &|_| true), Answer::Drop));
    // A header and garbage: FORMERR with the id.
    let mut junk = vec![0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    junk.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    let r = reply_of(z.answer("a", &junk, false, &|_| true));
    assert_eq!((r.id(), r.response_code()), (0xabcd, ResponseCode::FormErr));
    // Two questions: FORMERR; another opcode: NOTIMP.
    let mut two = Message::new();
    two.add_query(Query::query(Name::from_str("a.b.").expect("valid"), RecordType::A));
    two.add_query(Query::query(Name::from_str("c.d.").expect("valid"), RecordType::A));
    assert_eq!(
        reply_of(z.answer("a", &two.to_vec().expect("valid"), false, &|_| true)).response_code(),
        ResponseCode::FormErr
    );
    let mut status = Message::new();
    status.set_op_code(OpCode::Status);
    assert_eq!(
        reply_of(z.answer("a", &status.to_vec().expect("valid"), false, &|_| true)).response_code(),
        ResponseCode::NotImp
    );
}

#[test]
fn udp_answers_are_truncated_past_the_clients_size_and_tcp_ones_never() {
    let mut big = Message::new();
    big.set_id(7).set_message_type(MessageType::Response);
    let name = Name::from_str("many.example.com.").expect("valid");
    big.add_query(Query::query(name.clone(), RecordType::A));
    for i in 0..100u8 {
        big.add_answer(Record::from_rdata(name.clone(), 60, RData::A(A(Ipv4Addr::new(10, 0, 0, i)))));
    }
    let q = Message::from_vec(&query("many.example.com.", RecordType::A, None)).expect("valid");
    let udp = Message::from_vec(&relay(&big, &q, false).expect("valid")).expect("valid");
    assert!(udp.truncated() && udp.answers().is_empty() && udp.id() == 0x4242);
    let q_edns = Message::from_vec(&query("many.example.com.", RecordType::A, Some(4096))).expect("valid");
    let edns = relay(&big, &q_edns, false).expect("valid");
    assert!(edns.len() <= usize::from(EDNS_PAYLOAD), "capped at {EDNS_PAYLOAD}: {}", edns.len());
    assert!(Message::from_vec(&edns).expect("valid").truncated());
    let tcp = Message::from_vec(&relay(&big, &q, true).expect("valid")).expect("valid");
    assert!(!tcp.truncated() && tcp.answers().len() == 100);
}

#[test]
fn an_upstream_answer_must_match_the_question_sent() {
    let mut with_do = Message::from_vec(&query("example.com.", RecordType::A, Some(1232))).expect("valid");
    with_do.extensions_mut().as_mut().expect("edns").set_dnssec_ok(true);
    assert!(upstream_query(&with_do, 1).extensions().as_ref().expect("edns").flags().dnssec_ok, "DO passed on");
    let q = Message::from_vec(&query("example.com.", RecordType::A, None)).expect("valid");
    let sent = upstream_query(&q, 99);
    assert!(sent.extensions().is_some() && sent.id() == 99);
    let mut r = sent.clone();
    r.set_message_type(MessageType::Response);
    assert!(answers(&r, &sent));
    r.set_id(100);
    assert!(!answers(&r, &sent), "another id");
    let mut other = sent.clone();
    other.set_message_type(MessageType::Response);
    other.queries_mut()[0].set_name(Name::from_str("evil.com.").expect("valid"));
    assert!(!answers(&other, &sent), "another question");
}

proptest! {
    // The query path never panics, and answers only what parses as a query.
    #[test]
    fn any_bytes_are_answered_or_dropped_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), tcp: bool) {
        let z = zones("\n[dns]\nforward = [\"127.0.0.1:5353\"]\n");
        match z.answer("a", &bytes, tcp, &|_| true) {
            Answer::Reply(b, _) => prop_assert!(Message::from_vec(&b).is_ok()),
            Answer::Forward(_) | Answer::Drop => {}
        }
    }

    #[test]
    fn mutated_queries_never_panic(flips in proptest::collection::vec((0usize..64, any::<u8>()), 1..8), tcp: bool) {
        let z = zones("");
        let mut q = query("orders.privatelink.example.internal.", RecordType::A, Some(1232));
        for (at, v) in flips {
            let n = q.len();
            q[at % n] = v;
        }
        let _ = z.answer("a", &q, tcp, &|_| true);
    }
}

/// Cost of one published answer (`cargo test --release -p privlink --lib
/// dns::tests::answer_cost -- --ignored --nocapture`); not a timed test.
#[test]
#[ignore]
fn answer_cost() {
    let z = zones("");
    let q = query("orders.privatelink.example.internal.", RecordType::A, None);
    let n = 500_000;
    let t = std::time::Instant::now();
    let mut bytes = 0;
    for _ in 0..n {
        if let Answer::Reply(b, _) = z.answer("a", &q, false, &|_| true) {
            bytes += b.len();
        }
    }
    eprintln!("{:.0} ns per answer ({bytes} bytes)", t.elapsed().as_nanos() as f64 / f64::from(n));
}

#[test]
fn a_name_of_an_ipv4_and_an_ipv6_endpoint_answers_a_and_aaaa_each_while_approved() {
    // Network a: the IPv4 endpoint pe-a and an IPv6 one of the same
    // service (translated to it), under the service's name.
    let z = zones("\n[[endpoint]]\nname = \"pe6-a\"\nnetwork = \"a\"\nip = \"fd00:aa::5\"\nservice = \"orders\"\n");
    let name = "orders.privatelink.example.internal.";
    let (q4, q6) = (query(name, RecordType::A, None), query(name, RecordType::AAAA, None));
    let aaaa = |m: &Message| -> Vec<std::net::Ipv6Addr> {
        m.answers().iter().filter_map(|r| if let RData::AAAA(a) = r.data() { Some(a.0) } else { None }).collect()
    };
    let all = |_: &str| true;
    assert_eq!(a_records(&reply_of(z.answer("a", &q4, false, &all))), vec![(Ipv4Addr::new(10, 1, 0, 5), 10)]);
    let m = reply_of(z.answer("a", &q6, false, &all));
    assert_eq!(aaaa(&m), vec!["fd00:aa::5".parse::<std::net::Ipv6Addr>().expect("addr")]);
    assert!(a_records(&m).is_empty());
    // Each record follows its own endpoint's approval.
    let only6 = |e: &str| e == "pe6-a";
    let m = reply_of(z.answer("a", &q4, false, &only6));
    assert!(m.answers().is_empty() && m.response_code() == ResponseCode::NoError, "the name exists, no A");
    assert_eq!(aaaa(&reply_of(z.answer("a", &q6, false, &only6))).len(), 1);
    let none = |_: &str| false;
    assert_eq!(reply_of(z.answer("a", &q6, false, &none)).response_code(), ResponseCode::NXDomain);
    // Network b has only an IPv4 endpoint: no AAAA there.
    let m = reply_of(z.answer("b", &q6, false, &all));
    assert!(m.answers().is_empty() && m.response_code() == ResponseCode::NoError);
}
