//! Private DNS through the real daemon: two tenants with the same ranges
//! and the same resolver address, `dig` and `curl` (glibc's resolver,
//! through `/etc/netns/<ns>/resolv.conf`) inside their namespaces, a real
//! upstream (dnsmasq on loopback) for forwarded names, hostile queries,
//! and a name with an A and an AAAA record (an IPv4 and an IPv6 endpoint
//! of one service) fetched by name over IPv6 (docs/DNS.md).

mod common;

use common::*;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RESOLVER: &str = "10.1.0.53";
const NAME: &str = "app.privatelink.example.internal";
const WEB_A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 21);
const WEB_B: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 22);
/// Tenant a's IPv6 endpoint of the same (IPv4) service: translated per flow.
const WEB6_A: &str = "fd00:aa::21";

/// Removes `/etc/netns/<ns>` when dropped.
struct NetnsEtc(std::path::PathBuf);
impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `dig` inside `ns` asking the network's resolver (one try, 1 s).
fn dig(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "dig", "+time=1", "+tries=1", &format!("@{RESOLVER}")])
        .args(args)
        .output()
        .expect("dig (apt-get install bind9-dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn short(ns: &str, name: &str) -> String {
    dig(ns, &["+short", name]).trim().to_string()
}

fn status(out: &str) -> &str {
    out.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("(no answer)")
}

/// Sends `packets` to the resolver from `ns` over UDP; the answers that
/// came back within `wait` (by the first two bytes, the id).
fn udp_raw(ns: &str, packets: Vec<Vec<u8>>, wait: Duration) -> Vec<Vec<u8>> {
    within(ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.connect((RESOLVER, 53))?;
        for (i, p) in packets.iter().enumerate() {
            let _ = s.send(p);
            if i % 50 == 49 {
                // Paced (10,000 a second), so the socket buffer never
                // overflows: what is not answered was dropped by privlink.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        s.set_read_timeout(Some(wait))?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        Ok(got)
    })
    .expect("udp")
}

/// A query for `name` (type A) with id `id`, built by hand (the hostile
/// inputs below are built the same way).
fn query(id: u16, qname: &[u8]) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(qname);
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for l in name.split('.') {
        out.push(l.len() as u8);
        out.extend_from_slice(l.as_bytes());
    }
    out.push(0);
    out
}

/// dnsmasq on 127.0.0.1:`port` (the daemon's namespace) answering from
/// `hosts` only.
fn dnsmasq(bed: &Bed, port: u16, hosts: &str) -> Kill {
    let file = bed.dir.join("upstream.hosts");
    std::fs::write(&file, hosts).expect("hosts");
    let child = Command::new("dnsmasq")
        .args(["-k", "-C", "/dev/null", "--no-resolv", "--no-hosts", "--bind-interfaces", "--user=root"])
        .args(["--listen-address=127.0.0.1", &format!("--port={port}")])
        .arg(format!("--addn-hosts={}", file.display()))
        .arg(format!("--pid-file={}", bed.dir.join("dnsmasq.pid").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq (apt-get install dnsmasq)");
    Kill(child)
}

fn config(bed: &Bed, opts: &Opts, upstream: u16, extra_name: &str) -> String {
    let more = format!(
        r#"
[dns]
forward = ["127.0.0.1:{upstream}"]
rate = 200
query_log = true

[[service]]
name = "web"
nat_ips = ["192.168.100.12"]
backends = ["{be}"]
ports = [{{ protocol = "tcp", port = 80, backend_port = 9006 }}]
visibility = ["*"]
auto_approve = ["contoso"]
dns_names = ["{NAME}"]

[[endpoint]]
name = "pe-web-a"
network = "vnet-a"
ip = "{WEB_A}"
service = "web"
dns_names = [{extra_name}]

[[endpoint]]
name = "pe-web-b"
network = "vnet-b"
ip = "{WEB_B}"
service = "web"

[[endpoint]]
name = "pe-web6-a"
network = "vnet-a"
ip = "{WEB6_A}"
service = "web"
"#,
        be = BACKEND_ORDERS
    );
    bed.config_text(opts, &more)
}

#[test]
fn each_tenant_resolves_its_own_endpoint_by_name_and_connects_through_it() {
    if !privileged() || !have("dig") || !have("dnsmasq") || !have("curl") || !have("nginx") {
        return;
    }
    let opts = || Opts { network_extra: "dns = \"10.1.0.53\"\naddress6 = \"fd00:aa::10/128\"", ..Opts::default() };
    let mut bed = Bed::new("dns", opts());
    let upstream = privlink::testbed::free_port().expect("port").port();
    let many: String = (1..=100).map(|i| format!("10.200.0.{i} many.example.com\n")).collect();
    let _dnsmasq = dnsmasq(&bed, upstream, &format!("203.0.113.7 public.example.com\n{many}"));
    std::fs::write(&bed.config, config(&bed, &opts(), upstream, "")).expect("config");
    // As `ip netns add` leaves it: `lo` down (the resolver's address is
    // local, reached over `lo`; the daemon brings it up).
    let down = Command::new("ip").args(["-n", &bed.a, "link", "set", "lo", "down"]).status().expect("ip");
    assert!(down.success());
    bed.start();
    let (a, b) = (bed.a.clone(), bed.b.clone());

    // Same resolver address, same name: each tenant its own endpoint;
    // tenant b's connection is pending, so NXDOMAIN there.
    assert!(eventually(5, || short(&a, NAME) == WEB_A.to_string()), "{}\n{}", dig(&a, &[NAME]), bed.log());
    let out = dig(&a, &[NAME]);
    let record = out.lines().find(|l| l.starts_with(&format!("{NAME}."))).unwrap_or_default();
    assert_eq!(record.split_whitespace().collect::<Vec<_>>()[1..], ["10", "IN", "A", "10.1.0.21"], "TTL 10 s:\n{out}");
    assert!(out.contains("flags: qr aa rd ra"), "authoritative:\n{out}");
    assert_eq!(status(&dig(&b, &[NAME])), "NXDOMAIN", "pending in tenant b");
    assert_eq!(short(&b, "mine.example.internal"), "", "nothing else");

    // An approval is answered at once (well within 1 s); a rejection too.
    let (rc, _, err) = bed.cli(&["connections", "approve", "pe-web-b"]);
    assert_eq!(rc, 0, "{err}");
    let t = Instant::now();
    assert_eq!(short(&b, NAME), WEB_B.to_string(), "tenant b after approval");
    let after_approve = t.elapsed();
    assert_eq!(short(&a, NAME), WEB_A.to_string(), "tenant a unchanged");
    // Each record follows its own endpoint: with pe-web-a rejected the
    // name keeps its AAAA record (no A: NOERROR, no answer); with the
    // IPv6 endpoint rejected too it is gone.
    let (rc, _, err) = bed.cli(&["connections", "reject", "pe-web-a"]);
    assert_eq!(rc, 0, "{err}");
    let no_a = dig(&a, &[NAME]);
    assert!(status(&no_a) == "NOERROR" && no_a.contains("ANSWER: 0,"), "rejected, the AAAA left:\n{no_a}");
    let (rc, _, err) = bed.cli(&["connections", "reject", "pe-web6-a"]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(status(&dig(&a, &[NAME])), "NXDOMAIN", "rejected");
    assert_eq!(short(&b, NAME), WEB_B.to_string());
    for ep in ["pe-web-a", "pe-web6-a"] {
        let (rc, _, err) = bed.cli(&["connections", "approve", ep]);
        assert_eq!(rc, 0, "{err}");
    }
    assert!(after_approve < Duration::from_secs(1), "{after_approve:?}");
    eprintln!("approval to answer: {after_approve:?}");
    let (_, listing, _) = bed.cli(&["connections"]);
    assert!(listing.contains(NAME), "names in `privlink connections`:\n{listing}");

    // A real program resolving through /etc/netns/<ns>/resolv.conf
    // connects by name through the endpoint.
    let root = bed.dir.join("www");
    std::fs::create_dir_all(&root).expect("www");
    let body: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8).collect();
    std::fs::write(root.join("blob"), &body).expect("blob");
    let _nginx = nginx(&bed, &format!("  server {{ listen {BACKEND_ORDERS}:9006; root {}; }}", root.display()));
    let etc = NetnsEtc(std::path::PathBuf::from("/etc/netns").join(&a));
    std::fs::create_dir_all(&etc.0).expect("/etc/netns");
    std::fs::write(etc.0.join("resolv.conf"), format!("nameserver {RESOLVER}\noptions timeout:1 attempts:2\n"))
        .expect("resolv.conf");
    let curl = || {
        Command::new("ip")
            .args(["netns", "exec", &a, "curl", "-sS", "--max-time", "5", &format!("http://{NAME}/blob")])
            .output()
            .expect("curl")
    };
    assert!(eventually(10, || curl().status.success()), "{:?}", curl());
    let got = curl();
    assert_eq!(fnv(&got.stdout, FNV_INIT), fnv(&body, FNV_INIT), "1 MiB by name, intact");
    // The same name has an AAAA record in tenant a (its IPv6 endpoint of
    // the IPv4 service), none in tenant b; curl -6 fetches by name over
    // IPv6, translated to the IPv4 backend.
    assert_eq!(dig(&a, &["+short", "AAAA", NAME]).trim(), WEB6_A);
    let b6 = dig(&b, &["AAAA", NAME]);
    assert!(status(&b6) == "NOERROR" && b6.contains("ANSWER: 0,"), "no AAAA in tenant b:\n{b6}");
    let curl6 = Command::new("ip")
        .args(["netns", "exec", &a, "curl", "-6", "-sS", "--max-time", "5", &format!("http://{NAME}/blob")])
        .output()
        .expect("curl -6");
    assert!(curl6.status.success(), "{curl6:?}");
    assert_eq!(fnv(&curl6.stdout, FNV_INIT), fnv(&body, FNV_INIT), "1 MiB by name over IPv6 (6->4), intact");

    // A reload adds a name: answered within a second, while a live
    // connection through another endpoint carries on.
    let mut live = connect(&a, EP, 7, Duration::from_secs(3)).expect("echo through pe-a");
    live.write_all(b"before\n").expect("echo");
    assert_eq!(line(&mut live), "before");
    std::fs::write(&bed.config, config(&bed, &opts(), upstream, "\"extra.example.internal\"")).expect("config");
    bed.signal(libc::SIGHUP);
    let t = Instant::now();
    assert!(eventually(3, || short(&a, "extra.example.internal") == WEB_A.to_string()), "{}", bed.log());
    eprintln!("reload to answer: {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(short(&b, "extra.example.internal"), "", "pe-web-a's own name is tenant a's only");
    live.write_all(b"after\n").expect("echo after reload");
    assert_eq!(line(&mut live), "after", "the live connection was not disturbed");

    // Other names go to the upstream, over UDP and TCP; a long answer is
    // truncated over UDP and complete over TCP.
    assert_eq!(short(&a, "public.example.com"), "203.0.113.7");
    assert_eq!(dig(&b, &["+tcp", "+short", "public.example.com"]).trim(), "203.0.113.7");
    assert_eq!(dig(&a, &["+tcp", "+short", NAME]).trim(), WEB_A.to_string());
    let udp = dig(&a, &["+ignore", "+noedns", "many.example.com"]);
    assert!(udp.contains(" tc "), "truncated over UDP:\n{udp}");
    let retried = dig(&a, &["+noedns", "many.example.com"]);
    assert!(retried.contains("ANSWER: 100,"), "all 100 records after dig's retry over TCP:\n{retried}");

    // Hostile queries: ANY and zone transfers refused; malformed,
    // compression loops and over-long names answered FORMERR or dropped;
    // the daemon goes on answering.
    assert_eq!(status(&dig(&a, &["ANY", NAME])), "REFUSED");
    let axfr = dig(&a, &["AXFR", "privatelink.example.internal"]);
    assert!(axfr.contains("Transfer failed"), "{axfr}");
    let mut long = Vec::new();
    for _ in 0..5 {
        long.push(63u8);
        long.extend_from_slice(&[b'x'; 63]);
    }
    long.push(0);
    let answers = udp_raw(
        &a,
        vec![
            vec![0x00, 0x01, 0x02],                                 // no header
            query(0x1001, &[0xc0, 0x0c]),                           // a pointer to itself
            query(0x1002, &long),                                   // 320 bytes of name
            query(0x1003, &[0x05, b'a', b'b']),                     // a label past the end
            [query(0x1004, &wire_name(NAME)), vec![0; 9]].concat(), // trailing bytes
        ],
        Duration::from_millis(500),
    );
    for a in &answers {
        assert!(a.len() >= 12 && a[2] & 0x80 != 0, "only responses come back: {a:?}");
        let id = u16::from_be_bytes([a[0], a[1]]);
        assert!((0x1001..=0x1004).contains(&id), "{id:x}");
    }
    let formerr = answers.iter().filter(|a| a[3] & 0x0f == 1).count();
    assert!(formerr >= 3, "FORMERR for the broken names: {answers:?}");
    assert_eq!(short(&a, NAME), WEB_A.to_string(), "still answering");

    // A flood from one client: past [dns] rate (200/s here) queries are
    // dropped and counted; the other tenant's resolver is not affected.
    let flood: Vec<Vec<u8>> = (0..2000u16).map(|i| query(i, &wire_name(NAME))).collect();
    let a2 = a.clone();
    let flooding = std::thread::spawn(move || udp_raw(&a2, flood, Duration::from_millis(300)));
    std::thread::sleep(Duration::from_millis(60));
    let during = Instant::now();
    assert_eq!(short(&b, NAME), WEB_B.to_string(), "tenant b answered while tenant a floods");
    let during = during.elapsed();
    let got = flooding.join().expect("flood");
    assert!(during < Duration::from_millis(500), "tenant b waited {during:?}");
    let dropped = bed.metric("privlink_dns_dropped_total", &[("network", "vnet-a"), ("reason", "rate_limited")]);
    assert!(got.len() <= 400 && dropped >= 1500.0, "answered {}, dropped {dropped}", got.len());
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(short(&a, NAME), WEB_A.to_string(), "answering again after a second");

    // Counted per network and code; an upstream gone is SERVFAIL and a
    // forward error.
    assert!(bed.metric("privlink_dns_queries_total", &[("network", "vnet-a"), ("rcode", "NOERROR")]) >= 5.0);
    assert!(bed.metric("privlink_dns_queries_total", &[("network", "vnet-b"), ("rcode", "NXDOMAIN")]) >= 1.0);
    assert!(bed.metric("privlink_dns_queries_total", &[("network", "vnet-a"), ("rcode", "REFUSED")]) >= 2.0);

    // A hand-over answers on (both daemons bind the address with
    // SO_REUSEPORT while they overlap); so does a restart after a crash
    // (the address stays on the device, the new daemon binds it again).
    bed.take_over();
    assert_eq!(short(&a, NAME), WEB_A.to_string(), "after a hand-over");
    assert_eq!(short(&b, NAME), WEB_B.to_string(), "after a hand-over");
    bed.kill9();
    let addrs = |ns: &str| {
        let out = Command::new("ip").args(["-n", ns, "-4", "addr", "show", "dev", "pla0"]).output().expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(addrs(&a).contains(RESOLVER), "the address stays on the device after a crash");
    bed.start();
    assert!(eventually(5, || short(&a, NAME) == WEB_A.to_string()), "after a crash:\n{}", bed.log());
    // The device deleted under the daemon: recreated, with its resolver
    // address and sockets.
    let del = Command::new("ip").args(["-n", &a, "link", "del", "pla0"]).status().expect("ip");
    assert!(del.success());
    assert!(eventually(10, || short(&a, NAME) == WEB_A.to_string()), "after the device came back:\n{}", bed.log());
    let log = bed.log();
    assert!(log.contains("dns query") && log.contains("\"NOERROR\""), "query_log = true logs each query");

    drop(_dnsmasq);
    let out = Command::new("ip")
        .args(["netns", "exec", &a, "dig", "+time=5", "+tries=1", &format!("@{RESOLVER}"), "public.example.com"])
        .output()
        .expect("dig");
    assert_eq!(status(&String::from_utf8_lossy(&out.stdout)), "SERVFAIL");
    assert!(bed.metric("privlink_dns_forward_errors_total", &[]) >= 1.0);
    drop(live);

    // A reload that moves the resolver: answered at the new address, the
    // old one gone, the device (and its flows) kept.
    let mut held = connect(&a, EP, 7, Duration::from_secs(3)).expect("echo through pe-a");
    let moved = || Opts { network_extra: "dns = \"10.1.0.54\"\naddress6 = \"fd00:aa::10/128\"", ..Opts::default() };
    std::fs::write(&bed.config, config(&bed, &moved(), upstream, "")).expect("config");
    bed.signal(libc::SIGHUP);
    let dig_at = |ns: &str, server: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "dig", "+time=1", "+tries=1", "+short", &format!("@{server}"), NAME])
            .output()
            .expect("dig");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(eventually(3, || dig_at(&a, "10.1.0.54") == WEB_A.to_string()), "{}", bed.log());
    assert!(!addrs(&a).contains(RESOLVER), "the old address went:\n{}", addrs(&a));
    held.write_all(b"moved\n").expect("echo");
    assert_eq!(line(&mut held), "moved", "the network's device and flows stayed");
    // A crash, then a start with the resolver back at .53: the address the
    // last run added (.54) is removed, not left to take packets.
    bed.kill9();
    std::fs::write(&bed.config, config(&bed, &opts(), upstream, "")).expect("config");
    bed.start();
    assert!(eventually(5, || short(&a, NAME) == WEB_A.to_string()), "{}", bed.log());
    assert!(!addrs(&a).contains("10.1.0.54"), "left-over address removed:\n{}", addrs(&a));

    // A reload without `dns`: the resolver stops and its address goes.
    let plain = Opts::default();
    std::fs::write(&bed.config, config(&bed, &plain, upstream, "")).expect("config");
    bed.signal(libc::SIGHUP);
    assert!(eventually(3, || !addrs(&a).contains(RESOLVER)), "{}\n{}", addrs(&a), bed.log());
    assert!(dig(&a, &[NAME]).contains("no servers could be reached"), "{}", dig(&a, &[NAME]));
    assert!(dig(&b, &[NAME]).contains("no servers could be reached"), "tenant b's resolver stopped too");
}
