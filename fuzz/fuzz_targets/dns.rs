//! Queries into a network's resolver (`privlink::dns::Zones::answer`),
//! over UDP and TCP, with an oracle after each one.
//!
//! The first input byte is the mode: bit 0 over TCP, bit 1 the endpoint's
//! connection approved, bit 2 upstreams configured. The rest is the
//! query's bytes.
//!
//! The oracle (hickory-proto parses the answer independently of how it was
//! built):
//! - an answer is a response that parses, with the query's id, no longer
//!   than the client may take (512 bytes over UDP without EDNS, the query's
//!   EDNS size up to 1232 with it, 65,535 over TCP);
//! - it carries an address only for a published name, only the endpoint's
//!   own, only while its connection is approved, and only in answer to an A
//!   question;
//! - a query that did not parse as one question gets no address, and
//!   nothing is forwarded that privlink publishes.

#![no_main]

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::{RData, RecordType};
use libfuzzer_sys::fuzz_target;
use privlink::dns::{Answer, Zones};
use std::net::Ipv4Addr;
use std::sync::OnceLock;

const CONFIG: &str = r#"
[provider]
tun = "plp0"

[[network]]
name = "a"
tenant = "t1"
tun = "pla0"
netns = "ns-a"
dns = "10.1.0.53"

[[service]]
name = "orders"
nat_ips = ["192.168.100.4"]
backends = ["192.168.50.10"]
ports = [{ protocol = "tcp", port = 80 }]
dns_names = ["orders.privatelink.example.internal", "x.y"]

[[endpoint]]
name = "pe-a"
network = "a"
ip = "10.1.0.5"
service = "orders"
"#;

fn zones(forward: bool) -> &'static Zones {
    static Z: [OnceLock<Zones>; 2] = [OnceLock::new(), OnceLock::new()];
    Z[usize::from(forward)].get_or_init(|| {
        let extra = if forward { "\n[dns]\nforward = [\"127.0.0.1:5353\"]\n" } else { "" };
        Zones::build(&privlink_config::Config::parse(&format!("{CONFIG}{extra}"), "f.toml").expect("valid"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, query)) = data.split_first() else { return };
    let (tcp, approved, forward) = (mode & 1 != 0, mode & 2 != 0, mode & 4 != 0);
    let z = zones(forward);
    let parsed = Message::from_vec(query).ok();
    match z.answer("a", query, tcp, &|ep| approved && ep == "pe-a") {
        Answer::Drop => {}
        Answer::Forward(q) => {
            assert!(forward, "forwarded without upstreams");
            let name = q.queries()[0].name().to_lowercase().to_ascii();
            let name = name.trim_end_matches('.');
            assert!(name != "orders.privatelink.example.internal" && name != "x.y", "a published name forwarded");
        }
        Answer::Reply(bytes, code) => {
            let r = Message::from_vec(&bytes).expect("an answer parses");
            assert_eq!(r.message_type(), MessageType::Response);
            assert_eq!(r.response_code(), code);
            assert_eq!(&bytes[..2], &query[..2], "the query's id");
            let limit = match (&parsed, tcp) {
                (_, true) => 65_535,
                (Some(m), false) => m.extensions().as_ref().map_or(512, |e| usize::from(e.max_payload()).clamp(512, 1232)),
                (None, false) => 512,
            };
            assert!(bytes.len() <= limit, "{} bytes past {limit}", bytes.len());
            let addrs: Vec<Ipv4Addr> =
                r.answers().iter().filter_map(|x| if let RData::A(a) = x.data() { Some(a.0) } else { None }).collect();
            if !addrs.is_empty() {
                let q = parsed.as_ref().expect("an address only for a query that parsed");
                assert_eq!(q.queries().len(), 1);
                assert_eq!(q.queries()[0].query_type(), RecordType::A);
                assert!(approved, "an address while not approved");
                assert_eq!(addrs, vec![Ipv4Addr::new(10, 1, 0, 5)]);
            }
        }
    }
});
