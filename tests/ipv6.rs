//! IPv6 endpoints through the real daemon: two tenants with the same ULA
//! client address and the same IPv6 endpoint address reach different IPv6
//! services, each backend seeing only its service's NAT address; TCP
//! (20 MB each way, hash-checked), UDP, ping6 and traceroute6 through the
//! endpoints; Packet Too Big toward a consumer with the provider's
//! 1,280-byte MTU; hostile inputs dropped and counted. And an IPv6
//! endpoint of an IPv4 service, translated per flow (RFC 6146/7915), next
//! to a tenant with the same addresses reaching an IPv6 service
//! (docs/IPV6.md).

mod common;

use common::*;
use privlink::testbed::{connect, line, udp_ask, Backend, BackendPorts};
use std::io::{Read, Write};
use std::net::Ipv6Addr;
use std::process::Command;
use std::time::Duration;

const EP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xaa, 0, 0, 0, 0, 0, 0x5);
const CLIENT6: &str = "fd00:aa::10";

/// Per tenant: an IPv6 service (name, NAT address, backend) and its
/// endpoint `fd00:aa::5` in that tenant's network.
const TENANTS6: [(&str, &str, &str, &str, &str); 2] = [
    ("orders6", "fd00:64::4", "fd00:50::10", "pe6-a", "vnet-a"),
    ("billing6", "fd00:64::8", "fd00:60::10", "pe6-b", "vnet-b"),
];

/// The IPv6 services and endpoints, added to the bed's IPv4 config.
fn services6() -> String {
    services_of(&TENANTS6)
}

/// Services (name, NAT address, backend) each with an endpoint
/// `fd00:aa::5` in the given network.
fn services_of(tenants: &[(&str, &str, &str, &str, &str)]) -> String {
    tenants
        .iter()
        .map(|(svc, nat, backend, ep, net)| {
            format!(
                r#"
[[service]]
name = "{svc}"
nat_ips = ["{nat}"]
backends = ["{backend}"]
ports = [{{ protocol = "tcp", port = 80, backend_port = 8080 }},
         {{ protocol = "tcp", port = 7, backend_port = 8007 }},
         {{ protocol = "udp", port = 53, backend_port = 5353 }},
         {{ protocol = "udp", port = 54, backend_port = 5354 }}]
visibility = ["*"]
auto_approve = ["*"]

[[endpoint]]
name = "{ep}"
network = "{net}"
ip = "{EP6}"
service = "{svc}"
"#
            )
        })
        .collect()
}

fn data(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

/// Sends 20 MB (pattern `seed`) on `s`, a greeted connection to the
/// hashing port, and checks the length and hash the backend reports.
fn upload_checked(s: &mut std::net::TcpStream, seed: u32, what: &str) {
    let up = data(20 << 20, seed);
    s.write_all(&up).expect("send");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let want = format!("len={} fnv={:x}", up.len(), privlink::testbed::fnv(&up, privlink::testbed::FNV_INIT));
    assert_eq!(line(s), want, "{what}: the backend got exactly what was sent");
}

/// 20 MB (pattern `seed`) through `[EP6]:7` from `ns` and back, compared
/// byte for byte.
fn echo_checked(ns: &str, seed: u32, what: &str) {
    let mut e = connect(ns, EP6, 7, Duration::from_secs(3)).expect("echo");
    let down = data(20 << 20, seed);
    let mut w = e.try_clone().expect("clone");
    let send = down.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&send).expect("send");
        w.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    let mut back = Vec::with_capacity(down.len());
    e.read_to_end(&mut back).expect("echoed");
    writer.join().expect("writer");
    assert!(back == down, "{what}: 20 MB echoed intact ({} bytes back)", back.len());
}

/// Runs `cmd` in namespace `ns`; (success, stdout and stderr).
fn run_in(ns: &str, cmd: &[&str]) -> (bool, String) {
    let out = Command::new("ip").args(["netns", "exec", ns]).args(cmd).output().expect("ip netns exec");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn ipv6_endpoints_carry_tcp_udp_and_icmpv6_per_tenant() {
    if !privileged() {
        return;
    }
    let opts = || Opts { network_extra: "address6 = \"fd00:aa::10/128\"", provider_mtu: 1280, ..Opts::default() };
    let mut bed = Bed::new("v6", opts());
    bed.write_config(&opts(), &services6());
    let ports = BackendPorts { hello: 8080, echo: 8007, udp: 5353, bye: None };
    let mut servers = Vec::new();
    for (name, _, addr, _, _) in TENANTS6 {
        privlink::netns::ip(Some(&bed.prov), &["-6", "addr", "add", &format!("{addr}/128"), "dev", "lo", "nodad"])
            .expect("backend address");
        let addr: Ipv6Addr = addr.parse().expect("backend address");
        servers.push(Backend::start(&bed.prov, name, addr, ports).expect("backend"));
    }
    bed.start();
    // IPv6 on the devices brings nothing of the kernel's own into
    // privlink's drop counters before any traffic.
    std::thread::sleep(Duration::from_secs(1));
    let drops: Vec<String> = bed
        .scrape()
        .lines()
        .filter(|l| l.starts_with("privlink_packets_dropped_total") && !l.ends_with(" 0"))
        .map(str::to_string)
        .collect();
    assert!(drops.is_empty(), "drops before any traffic: {drops:?}");
    let sec = Duration::from_secs(3);

    // Same client address, same endpoint address, different services;
    // each backend sees its own service's NAT address only.
    for (ns, (svc, nat, ..)) in [&bed.a, &bed.b].into_iter().zip(TENANTS6) {
        let mut s = connect(ns, EP6, 80, sec).expect("connect through the IPv6 endpoint");
        let greeting = line(&mut s);
        assert!(greeting.starts_with(&format!("svc={svc} peer=[{nat}]:")), "{greeting}");
        // 20 MB toward the backend, hash-checked there.
        upload_checked(&mut s, 1, svc);
        // 20 MB back through the echo port, compared byte for byte.
        echo_checked(ns, 7, svc);

        let answer = udp_ask(ns, EP6, 53, "hello6").expect("UDP answer");
        assert!(answer.starts_with(&format!("svc={svc} peer=[{nat}]:")) && answer.ends_with("data=hello6"), "{answer}");

        let (ok, out) = run_in(ns, &["ping", "-6", "-c", "2", "-W", "2", &EP6.to_string()]);
        assert!(ok && out.contains("2 received"), "ping6 through the endpoint: {out}");
    }

    // The flows as listed: the consumer's IPv6 address, the NAT address.
    let (_, flows, _) = bed.cli(&["flows"]);
    assert!(flows.contains(&format!("[{CLIENT6}]:")) && flows.contains("[fd00:64::4]:"), "{flows}");
    let bytes_in = bed.metric("privlink_endpoint_bytes_total", &[("endpoint", "pe6-a"), ("direction", "in")]);
    assert!(bytes_in > 40e6, "pe6-a counted {bytes_in} bytes in");

    // traceroute6: the endpoint answers the first hop (hop limit 1 ->
    // Time Exceeded from its address), the backend the second.
    let (ok, out) = run_in(&bed.a, &["traceroute6", "-I", "-n", "-q", "1", "-w", "2", &EP6.to_string()]);
    assert!(ok, "{out}");
    let hops: Vec<&str> = out.lines().skip(1).collect();
    assert!(hops.first().is_some_and(|h| h.contains("fd00:aa::5")), "first hop is the endpoint: {out}");
    assert!(bed.metric("privlink_packets_dropped_total", &[("reason", "ttl_expired"), ("network", "vnet-a")]) >= 1.0);

    // The provider's MTU is 1,280: a 1,300-byte datagram is answered with
    // Packet Too Big (IPv6 routers never fragment), and the consumer's
    // kernel learns the path MTU.
    let (ok, out) = run_in(
        &bed.a,
        &[
            "python3",
            "-c",
            "import socket,time\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
             s.setsockopt(41,23,2)\ns.sendto(b'x'*1252,('fd00:aa::5',53))\ntime.sleep(0.5)",
        ],
    );
    assert!(ok, "{out}");
    assert!(
        eventually(3, || run_in(&bed.a, &["ip", "-6", "route", "get", &EP6.to_string()]).1.contains("mtu 1280")),
        "the consumer learned the MTU: {}",
        run_in(&bed.a, &["ip", "-6", "route", "get", &EP6.to_string()]).1
    );
    assert!(bed.metric("privlink_packets_dropped_total", &[("reason", "too_big"), ("network", "vnet-a")]) >= 1.0);

    // Hostile: an address that is no endpoint, a routing header of type 0
    // (sent raw: the kernel refuses to build one, RFC 5095).
    privlink::netns::ip(Some(&bed.a), &["-6", "route", "add", "fd00:aa::/64", "dev", "pla0"]).expect("route");
    let no_ep = bed.metric("privlink_packets_dropped_total", &[("reason", "no_endpoint"), ("network", "vnet-a")]);
    assert!(udp_ask(&bed.a, "fd00:aa::99".parse::<Ipv6Addr>().expect("addr"), 53, "x").is_err());
    assert!(eventually(3, || {
        bed.metric("privlink_packets_dropped_total", &[("reason", "no_endpoint"), ("network", "vnet-a")]) > no_ep
    }));
    let (ok, out) = run_in(
        &bed.a,
        &[
            "python3",
            "-c",
            "import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_RAW,socket.IPPROTO_RAW)\n\
             a=lambda x: socket.inet_pton(socket.AF_INET6,x)\n\
             p=bytes([0x60,0,0,0,0,17,43,64])+a('fd00:aa::10')+a('fd00:aa::5')+bytes([17,0,0,1,0,0,0,0])\n\
             s.sendto(p+bytes([0x30,0x39,0,53,0,9,0,0,0x78]),('fd00:aa::5',0))",
        ],
    );
    assert!(ok, "{out}");
    assert!(
        eventually(3, || bed
            .metric("privlink_packets_dropped_total", &[("reason", "source_route"), ("network", "vnet-a")])
            >= 1.0),
        "routing header type 0 dropped as source_route"
    );
    // More hostile packets, raw: the endpoint's own address as the source
    // (a LAND packet), a multicast source, a first fragment holding only 8
    // bytes of its TCP header (RFC 7112), and two fragments that overlap
    // (RFC 5722).
    let before = |r: &str| bed.metric("privlink_packets_dropped_total", &[("reason", r), ("network", "vnet-a")]);
    let (martian, malformed, unsupported) =
        (before("martian_source"), before("malformed"), before("unsupported_protocol"));
    let (ok, out) = run_in(
        &bed.a,
        &[
            "python3",
            "-c",
            "import socket,struct\ns=socket.socket(socket.AF_INET6,socket.SOCK_RAW,socket.IPPROTO_RAW)\n\
             a=lambda x: socket.inet_pton(socket.AF_INET6,x)\n\
             ip6=lambda src,nh,p: bytes([0x60,0,0,0])+struct.pack('>H',len(p))+bytes([nh,64])+a(src)+a('fd00:aa::5')+p\n\
             udp=bytes([0x30,0x39,0,53,0,9,0x12,0x34,0x78])\n\
             to=('fd00:aa::5',0)\n\
             s.sendto(ip6('fd00:aa::5',17,udp),to)\n\
             s.sendto(ip6('ff02::1',17,udp),to)\n\
             s.sendto(ip6('fd00:aa::10',44,bytes([6,0,0,1,0,0,0,7])+bytes([0x30,0x39,0,80,0,0,0,1])),to)\n\
             s.sendto(ip6('fd00:aa::10',44,bytes([17,0,0,1,0,0,0,8])+bytes([0x30,0x39,0,53,0,40,0,0])+b'x'*16),to)\n\
             s.sendto(ip6('fd00:aa::10',44,bytes([17,0,0,0x11,0,0,0,8])+b'y'*16),to)\n\
             chain=b''.join(bytes([60,0,1,4,0,0,0,0]) for _ in range(8))+bytes([17,0,1,4,0,0,0,0])\n\
             s.sendto(ip6('fd00:aa::10',60,chain+udp),to)",
        ],
    );
    assert!(ok, "{out}");
    assert!(
        eventually(3, || before("martian_source") >= martian + 2.0),
        "LAND and multicast sources: {}",
        before("martian_source")
    );
    assert!(
        eventually(3, || before("malformed") >= malformed + 2.0),
        "tiny and overlapping fragments: {}",
        before("malformed")
    );
    assert!(
        eventually(3, || before("unsupported_protocol") > unsupported),
        "a chain of 9 extension headers (at most 8 are walked): {}",
        before("unsupported_protocol")
    );
    drop(servers);
}

/// Tenant a reaches an IPv6 service, tenant b an IPv4 one, through the
/// same endpoint address from the same client address.
const MIXED: [(&str, &str, &str, &str, &str); 2] = [
    ("orders6", "fd00:64::4", "fd00:50::10", "pe6-a", "vnet-a"),
    ("inventory", "192.168.100.12", "192.168.70.10", "pe64-b", "vnet-b"),
];

/// The backends of the `MIXED` services in the bed's provider namespace.
fn mixed_backends(bed: &Bed) -> Vec<Backend> {
    let ports = BackendPorts { hello: 8080, echo: 8007, udp: 5353, bye: None };
    MIXED.iter().map(|(name, _, addr, _, _)| backend_at(bed, name, addr, ports)).collect()
}

/// Asks `[EP6]:54` over UDP from namespace `ns`, where no backend listens:
/// the backend's port unreachable comes back translated, and the client's
/// kernel matches its quote to the socket (ECONNREFUSED) only when the
/// quoted addresses and ports are the client's own.
fn refused_udp(ns: &str) -> String {
    run_in(
        ns,
        &[
            "python3",
            "-c",
            "import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\ns.settimeout(3)\n\
             s.connect(('fd00:aa::5',54))\ns.send(b'x')\n\
             try:\n  s.recv(100); print('answer')\n\
             except ConnectionRefusedError: print('refused')\n\
             except socket.timeout: print('timeout')",
        ],
    )
    .1
}

#[test]
fn an_ipv6_endpoint_reaches_an_ipv4_service_translated_per_flow() {
    if !privileged() {
        return;
    }
    let opts = || Opts { network_extra: "address6 = \"fd00:aa::10/128\"", provider_mtu: 1300, ..Opts::default() };
    let mut bed = Bed::new("v64", opts());
    bed.write_config(&opts(), &services_of(&MIXED));
    let servers = mixed_backends(&bed);
    bed.start();
    let sec = Duration::from_secs(3);

    // Same client, same endpoint address: tenant a's backend sees its IPv6
    // NAT address, tenant b's IPv4 backend its IPv4 NAT address.
    let mut a = connect(&bed.a, EP6, 80, sec).expect("connect 6 -> 6");
    let greeting = line(&mut a);
    assert!(greeting.starts_with("svc=orders6 peer=[fd00:64::4]:"), "{greeting}");
    // (The advertised MSS of the backend; see the upload below.)
    privlink::netns::ip(
        Some(&bed.prov),
        &["route", "change", "192.168.100.12", "dev", "plp0", "proto", "static", "scope", "link", "advmss", "1440"],
    )
    .expect("advmss");
    let mut s = connect(&bed.b, EP6, 80, sec).expect("connect 6 -> 4");
    let greeting = line(&mut s);
    assert!(greeting.starts_with("svc=inventory peer=192.168.100.12:"), "{greeting}");
    // 20 MB up, hash-checked at the IPv4 backend. The backend is told to
    // advertise an MSS of 1,440 (its own route would say 1,260), so the
    // consumer's segments do not fit the provider's 1,300 bytes once IPv4:
    // Packet Too Big 1,320 comes back and the stream goes on smaller (DF
    // all along: IPv6 never fragments).
    upload_checked(&mut s, 3, "the IPv4 backend");
    assert!(
        run_in(&bed.b, &["ip", "-6", "route", "get", &EP6.to_string()]).1.contains("mtu 1320"),
        "the consumer learned the translated MTU: {}",
        run_in(&bed.b, &["ip", "-6", "route", "get", &EP6.to_string()]).1
    );
    assert!(bed.metric("privlink_packets_dropped_total", &[("reason", "too_big"), ("network", "vnet-b")]) >= 1.0);
    // 20 MB back from the IPv4 backend, byte for byte.
    echo_checked(&bed.b, 9, "6 -> 4");

    // UDP and ping6 through both kinds of service.
    for (ns, nat) in [(&bed.a, "[fd00:64::4]"), (&bed.b, "192.168.100.12")] {
        let answer = udp_ask(ns, EP6, 53, "hello64").expect("UDP answer");
        assert!(answer.contains(&format!("peer={nat}:")) && answer.ends_with("data=hello64"), "{answer}");
        let (ok, out) = run_in(ns, &["ping", "-6", "-c", "2", "-W", "2", &EP6.to_string()]);
        assert!(ok && out.contains("2 received"), "ping6 through the endpoint: {out}");
        // An ICMP error from the provider side (the backend's port
        // unreachable, ICMPv6 or ICMP) reaches the client with a quote its
        // kernel recognises.
        assert_eq!(refused_udp(ns).trim(), "refused", "{nat}");
    }
    // A 3,000-byte datagram each way: the client's kernel sends IPv6
    // fragments (privlink translates each like its first fragment, to
    // IPv6 or to IPv4 fragments), the backend's kernel reassembles, and
    // its 3,000-byte answer comes back in fragments of its own (IPv6, or
    // IPv4 ones translated to IPv6 fragments). The first try may meet
    // Packet Too Big (1,300 bytes on the provider side), the next goes.
    for ns in [&bed.a, &bed.b] {
        let (ok, out) = run_in(
            ns,
            &[
                "python3",
                "-c",
                "import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\ns.settimeout(2)\n\
                 s.connect(('fd00:aa::5',53))\nd=b'f'*3000\n\
                 for i in range(4):\n  try:\n    s.send(d); r=s.recv(10000); print(len(r), r.endswith(d)); break\n\
                 \x20 except OSError as e: print('retry', e)",
            ],
        );
        assert!(ok && out.contains(" True"), "{ns}: a fragmented datagram each way: {out}");
    }

    // traceroute6 through the translated endpoint: the endpoint is the
    // first hop.
    let (ok, out) = run_in(&bed.b, &["traceroute6", "-I", "-n", "-q", "1", "-w", "2", &EP6.to_string()]);
    assert!(ok && out.lines().nth(1).is_some_and(|h| h.contains("fd00:aa::5")), "{out}");

    // Listed with the IPv4 service's own addresses.
    let (_, flows, _) = bed.cli(&["flows"]);
    assert!(flows.contains("192.168.100.12:") && flows.contains(&format!("[{CLIENT6}]:")), "{flows}");
    let bytes_in = bed.metric("privlink_endpoint_bytes_total", &[("endpoint", "pe64-b"), ("direction", "in")]);
    assert!(bytes_in > 20e6, "pe64-b counted {bytes_in} bytes in");
    drop((a, servers));
}

/// `n` echo connections through `[EP6]:7` from `ns`, each checked once.
fn hold6(ns: &str, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = connect(ns, EP6, 7, Duration::from_secs(3)).expect("echo connection");
            s.write_all(format!("hello {i}\n").as_bytes()).expect("write");
            assert_eq!(line(&mut s), format!("hello {i}"));
            s
        })
        .collect()
}

/// Every held connection still echoes (no reset, no loss).
fn all_answer6(held: &mut [std::net::TcpStream], round: &str) {
    for (i, s) in held.iter_mut().enumerate() {
        let msg = format!("{round} {i}");
        s.write_all(format!("{msg}\n").as_bytes()).unwrap_or_else(|e| panic!("held connection {i} ({round}): {e}"));
        assert_eq!(line(s), msg, "held connection {i} after {round}");
    }
}

#[test]
fn ipv6_connections_survive_a_crash_and_a_hand_over() {
    if !privileged() {
        return;
    }
    let opts = || Opts { network_extra: "address6 = \"fd00:aa::10/128\"", provider_mtu: 1300, ..Opts::default() };
    let mut bed = Bed::new("v6keep", opts());
    bed.write_config(&opts(), &services_of(&MIXED));
    let servers = mixed_backends(&bed);
    bed.start();
    // 6->6 from tenant a, 6->4 from tenant b: the IPv6 table holds both.
    let mut held: Vec<_> = hold6(&bed.a, 5).into_iter().chain(hold6(&bed.b, 5)).collect();
    bed.kill9();
    bed.start();
    all_answer6(&mut held, "kill -9 and a restart");
    assert!(bed.log().contains("IPv6 flow table taken over"), "{}", bed.log());
    bed.take_over();
    all_answer6(&mut held, "a hand-over");
    let (_, flows, _) = bed.cli(&["flows"]);
    assert!(flows.matches(&format!("[{CLIENT6}]:")).count() >= 10, "{flows}");
    drop((held, servers));
}
