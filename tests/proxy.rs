//! PROXY protocol v2 end to end: the real daemon in namespaces, a strict
//! backend that parses the header byte by byte, nginx from the
//! distribution with `listen ... proxy_protocol`, a server-first protocol,
//! and the header's segment lost on the way (docs/PROXY-PROTOCOL.md).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

const SEC: Duration = Duration::from_secs(1);

/// Four PROXY services on the orders backend's address (one per TLV and a
/// lossy one), endpoints for them in both tenants' networks.
const PP: &str = r#"
[[service]]
name = "pp-azure"
nat_ips = ["192.168.100.21"]
backends = ["192.168.50.10"]
ports = [{ protocol = "tcp", port = 80, backend_port = 9001 }, { protocol = "tcp", port = 8080, backend_port = 9005 }]
visibility = ["*"]
auto_approve = ["*"]
proxy_protocol = "v2"
proxy_tlv = "azure"

[[service]]
name = "pp-aws"
nat_ips = ["192.168.100.22"]
backends = ["192.168.50.10"]
ports = [{ protocol = "tcp", port = 80, backend_port = 9002 }]
visibility = ["*"]
auto_approve = ["*"]
proxy_protocol = "v2"
proxy_tlv = "aws"

[[service]]
name = "pp-gcp"
nat_ips = ["192.168.100.23"]
backends = ["192.168.50.10"]
ports = [{ protocol = "tcp", port = 80, backend_port = 9003 }]
visibility = ["*"]
auto_approve = ["*"]
proxy_protocol = "v2"
proxy_tlv = "gcp"

[[service]]
name = "pp-lossy"
nat_ips = ["192.168.100.24"]
backends = ["192.168.50.10"]
ports = [{ protocol = "tcp", port = 80, backend_port = 9004 }]
visibility = ["*"]
auto_approve = ["*"]
proxy_protocol = "v2"
proxy_tlv = "azure"

[[service]]
name = "pp-cookie"
nat_ips = ["192.168.100.25"]
backends = ["192.168.50.10"]
ports = [{ protocol = "tcp", port = 80, backend_port = 9006 }]
visibility = ["*"]
auto_approve = ["*"]
proxy_protocol = "v2"

[[service]]
name = "pp-hs"
nat_ips = ["192.168.100.26"]
backends = ["192.168.50.10"]
ports = [{ protocol = "tcp", port = 80, backend_port = 9007 }]
visibility = ["*"]
auto_approve = ["*"]
proxy_protocol = "v2"

[[endpoint]]
name = "pe-cookie"
network = "vnet-a"
ip = "10.1.0.25"
service = "pp-cookie"

[[endpoint]]
name = "pe-hs"
network = "vnet-a"
ip = "10.1.0.26"
service = "pp-hs"

[[endpoint]]
name = "pe-azure-a"
network = "vnet-a"
ip = "10.1.0.21"
service = "pp-azure"

[[endpoint]]
name = "pe-azure-b"
network = "vnet-b"
ip = "10.1.0.21"
service = "pp-azure"

[[endpoint]]
name = "pe-aws"
network = "vnet-a"
ip = "10.1.0.22"
service = "pp-aws"

[[endpoint]]
name = "pe-gcp"
network = "vnet-a"
ip = "10.1.0.23"
service = "pp-gcp"

[[endpoint]]
name = "pe-lossy"
network = "vnet-a"
ip = "10.1.0.24"
service = "pp-lossy"
"#;

/// Reads exactly `n` bytes.
fn exact(s: &mut TcpStream, n: usize) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).map_err(|e| format!("short header: {e}"))?;
    Ok(b)
}

/// Parses a PROXY v2 header as a strict backend must: signature, version
/// and command, family, length, addresses, then each TLV. Returns what it
/// read as one line.
fn parse_v2(s: &mut TcpStream) -> Result<String, String> {
    let h = exact(s, 16)?;
    if h[..12] != *b"\r\n\r\n\0\r\nQUIT\n" {
        return Err(format!("bad signature {:?}", &h[..12]));
    }
    if h[12] != 0x21 || h[13] != 0x11 {
        return Err(format!("version/command {:#x}, family {:#x}", h[12], h[13]));
    }
    let len = usize::from(u16::from_be_bytes([h[14], h[15]]));
    if !(12..=200).contains(&len) {
        return Err(format!("length {len}"));
    }
    let b = exact(s, len)?;
    let ip = |o: usize| Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]);
    let port = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
    let mut line = format!("pp src={}:{} dst={}:{}", ip(0), port(8), ip(4), port(10));
    let mut at = 12;
    while at < len {
        if at + 3 > len {
            return Err("TLV header cut short".into());
        }
        let (kind, n) = (b[at], usize::from(u16::from_be_bytes([b[at + 1], b[at + 2]])));
        let v = b.get(at + 3..at + 3 + n).ok_or("TLV value cut short")?;
        let text = match (kind, v) {
            (0xEE, [1, a, b2, c, d]) => format!("azure:{}", u32::from_le_bytes([*a, *b2, *c, *d])),
            (0xEA, [1, rest @ ..]) if rest.len() == 22 && rest.starts_with(b"vpce-") => {
                format!("aws:{}", String::from_utf8_lossy(rest))
            }
            (0xE0, v) if v.len() == 8 => format!("gcp:{}", u64::from_be_bytes(v.try_into().expect("8 bytes"))),
            _ => return Err(format!("unexpected TLV {kind:#x} {v:?}")),
        };
        line.push_str(&format!(" tlv={text}"));
        at += 3 + n;
    }
    Ok(line)
}

/// The strict backend on `port`: greets with what the header said as soon
/// as it has read it (a server-first protocol), then echoes. Its listener
/// accepts TCP Fast Open data where the namespace's sysctl allows it.
fn strict_backend(ns: &str, port: u16) {
    let l: TcpListener = within(ns, move || Ok(TcpListener::bind((BACKEND_ORDERS, port))?)).expect("listen");
    set_fastopen(&l);
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let _ = c.set_read_timeout(Some(Duration::from_secs(20)));
                let greeting = parse_v2(&mut c).unwrap_or_else(|e| format!("bad header: {e}"));
                let _ = c.write_all(format!("{greeting}\n").as_bytes());
                let mut buf = [0u8; 65536];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn set_fastopen(l: &TcpListener) {
    use std::os::fd::AsRawFd;
    let qlen: libc::c_int = 16;
    // SAFETY: setsockopt reads an int from a pointer valid for its size.
    let r = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            (&qlen as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "TCP_FASTOPEN");
}

/// Sets a sysctl inside namespace `ns`.
fn sysctl(ns: &str, kv: &str) {
    let out = Command::new("ip").args(["netns", "exec", ns, "sysctl", "-qw", kv]).output().expect("sysctl");
    assert!(out.status.success(), "{kv}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A TcpExt counter of namespace `ns` (/proc/net/netstat).
fn tcp_ext(ns: &str, name: &str) -> u64 {
    let out = Command::new("ip").args(["netns", "exec", ns, "cat", "/proc/net/netstat"]).output().expect("netstat");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap_or_default(), lines.next().unwrap_or_default());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// `nft list table inet NAME` in namespace `ns`.
fn nft_list(ns: &str, table: &str) -> String {
    let out = Command::new("ip").args(["netns", "exec", ns, "nft", "list", "table", "inet", table]).output();
    String::from_utf8_lossy(&out.expect("nft list").stdout).to_string()
}

/// Link ids by endpoint, as `privlink connections --json` shows them (in
/// the form each service's TLV carries).
fn link_ids(bed: &Bed) -> std::collections::HashMap<String, String> {
    let (code, out, err) = bed.cli(&["connections", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v.as_array()
        .expect("list")
        .iter()
        .map(|c| {
            (c["endpoint"].as_str().unwrap_or_default().to_string(), c["link_id"].as_str().unwrap_or("").to_string())
        })
        .collect()
}

/// Connects from `ns` to `ep:80` and reads the greeting without sending
/// anything; returns it with the local port.
fn greeting(ns: &str, ep: Ipv4Addr) -> (String, u16, TcpStream) {
    let mut s = connect(ns, ep, 80, 3 * SEC).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let port = s.local_addr().expect("local").port();
    (line(&mut s), port, s)
}

#[test]
fn a_strict_backend_reads_each_clouds_header_before_anything_and_speaks_first() {
    let Some(bed) = Bed::running("pp", Opts { extra: PP, ..Opts::default() }) else { return };
    for port in 9001..=9003 {
        strict_backend(&bed.prov, port);
    }
    let ids = link_ids(&bed);
    // The link id each backend logs is the one the list shows, in the
    // table and in --json.
    let cases = [
        (&bed.a, "10.1.0.21", "pe-azure-a", format!("azure:{}", ids["pe-azure-a"])),
        (&bed.b, "10.1.0.21", "pe-azure-b", format!("azure:{}", ids["pe-azure-b"])),
        (&bed.a, "10.1.0.22", "pe-aws", format!("aws:{}", ids["pe-aws"])),
        (&bed.a, "10.1.0.23", "pe-gcp", format!("gcp:{}", ids["pe-gcp"])),
    ];
    let (code, table, _) = bed.cli(&["connections"]);
    assert_eq!(code, 0);
    for (_, _, name, tlv) in &cases {
        let shown = tlv.split_once(':').expect("kind:id").1;
        let row = table.lines().find(|l| l.starts_with(&format!("{name} "))).expect("row");
        assert!(row.split_whitespace().any(|w| w == shown), "{name}: {shown} not in `{row}`");
    }
    assert_ne!(ids["pe-azure-a"], ids["pe-azure-b"], "each connection has its own link id");
    for (ns, ep, name, tlv) in cases {
        let ip: Ipv4Addr = ep.parse().expect("ip");
        let (g, port, mut s) = greeting(ns, ip);
        // Two tenants with the same client address each appear with the
        // address and port they sent from, and their own link id.
        assert_eq!(g, format!("pp src={CLIENT}:{port} dst={ep}:80 tlv={tlv}"), "{name}");
        // The stream after the header is the client's, both ways.
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut s2 = s.try_clone().expect("clone");
        let d2 = data.clone();
        let w = std::thread::spawn(move || s2.write_all(&d2));
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back).expect("echo");
        w.join().expect("writer").expect("write");
        assert!(back == data, "{name}: the echo is what was sent");
    }
}

#[test]
fn the_header_reaches_the_backend_when_its_segment_is_lost_once() {
    let Some(bed) = Bed::running("pplost", Opts { extra: PP, ..Opts::default() }) else { return };
    strict_backend(&bed.prov, 9004);
    // Drops the first 88-byte segment (20 IP + 32 TCP with timestamps, as
    // the consumer's own segments carry them, + 36 header) of each
    // connection to port 9004, as it enters the provider namespace.
    nft(
        &bed.prov,
        "table inet pllost {
  set seen { type ipv4_addr . inet_service; flags dynamic; }
  chain pre { type filter hook prerouting priority -300;
    tcp dport 9004 ip length 88 ip saddr . tcp sport != @seen add @seen { ip saddr . tcp sport } counter drop
  }
}",
    );
    let ip: Ipv4Addr = "10.1.0.24".parse().expect("ip");
    // Server-first and the header lost: only privlink's own resend can
    // unblock it.
    let (g, port, mut s) = greeting(&bed.a, ip);
    assert!(g.starts_with(&format!("pp src={CLIENT}:{port} dst=10.1.0.24:80 tlv=azure:")), "{g}");
    s.write_all(b"after the loss\n").expect("write");
    assert_eq!(line(&mut s), "after the loss", "exactly one header: the rest is the client's stream");
    // With data from the client first, its data makes the backend ask.
    let mut s = connect(&bed.a, ip, 80, 3 * SEC).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(b"early\n").expect("write");
    assert!(line(&mut s).starts_with("pp src="));
    assert_eq!(line(&mut s), "early");
    let text = nft_list(&bed.prov, "pllost");
    assert!(text.contains("packets 2 "), "both connections lost their first header segment: {text}");
}

#[test]
fn tcp_fast_open_data_reaches_the_backend_once_after_the_header() {
    let Some(bed) = Bed::running("pptfo", Opts { extra: PP, ..Opts::default() }) else { return };
    // The consumer sends data in its SYN without a cookie; the backend
    // takes SYN data without one too.
    sysctl(&bed.a, "net.ipv4.tcp_fastopen=5");
    sysctl(&bed.prov, "net.ipv4.tcp_fastopen=515");
    strict_backend(&bed.prov, 9001);
    let ip: Ipv4Addr = "10.1.0.21".parse().expect("ip");
    // Active counts SYN data the peer acknowledged, ActiveFail SYN data it
    // did not (sent again after the handshake): either way, data went in
    // the SYN.
    let tfo = |ns: &str| tcp_ext(ns, "TCPFastOpenActive") + tcp_ext(ns, "TCPFastOpenActiveFail");
    let before = tfo(&bed.a);
    let mut s: TcpStream = within(&bed.a, move || {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket calls on a descriptor made here and handed
        // to a TcpStream, which owns it from then on.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            anyhow::ensure!(fd >= 0, "socket");
            let s = TcpStream::from_raw_fd(fd);
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 80u16.to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
                sin_zero: [0; 8],
            };
            let msg = b"hello, world\n";
            let n = libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_FASTOPEN,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            anyhow::ensure!(n == msg.len() as isize, "sendto MSG_FASTOPEN: {}", std::io::Error::last_os_error());
            Ok(s)
        }
    })
    .expect("a Fast Open connection");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let port = s.local_addr().expect("local").port();
    let g = line(&mut s);
    assert!(g.starts_with(&format!("pp src={CLIENT}:{port} dst=10.1.0.21:80 tlv=azure:")), "{g}");
    assert_eq!(line(&mut s), "hello, world", "the SYN's data, once, after the header");
    assert!(tfo(&bed.a) > before, "the consumer did put its data in the SYN");
    s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let mut more = [0u8; 64];
    assert!(s.read(&mut more).is_err(), "nothing after the echo: the data came once");
}

#[test]
fn a_syn_cookie_backend_keeps_window_scaling_and_timestamps() {
    let Some(bed) = Bed::running("ppcookie", Opts { extra: PP, ..Opts::default() }) else { return };
    sysctl(&bed.prov, "net.ipv4.tcp_syncookies=2");
    // The backend answers every SYN with a cookie, reads the header, then
    // sends 20 MB and closes.
    let l: TcpListener = within(&bed.prov, || Ok(TcpListener::bind((BACKEND_ORDERS, 9006))?)).expect("listen");
    let data: Vec<u8> = (0..20u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8).collect();
    let want = fnv(&data, FNV_INIT);
    std::thread::spawn(move || {
        if let Some(Ok(mut c)) = l.incoming().next() {
            let _ = c.set_read_timeout(Some(Duration::from_secs(20)));
            let g = parse_v2(&mut c).unwrap_or_else(|e| format!("bad header: {e}"));
            let _ = c.write_all(format!("{g}\n").as_bytes());
            let _ = c.write_all(&data);
        }
    });
    let cookies = tcp_ext(&bed.prov, "SyncookiesSent");
    let ip: Ipv4Addr = "10.1.0.25".parse().expect("ip");
    let mut s = connect(&bed.a, ip, 80, 3 * SEC).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let t = std::time::Instant::now();
    assert!(line(&mut s).starts_with("pp src="));
    // Without window scaling (the backend never saw the consumer's
    // timestamps) this trickles in at a few KB a second: give it 30 s.
    let (mut got, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
    while t.elapsed() < Duration::from_secs(30) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert_eq!(got.len(), 20 << 20, "20 MB in {:?}", t.elapsed());
    assert_eq!(fnv(&got, FNV_INIT), want);
    assert!(tcp_ext(&bed.prov, "SyncookiesSent") > cookies, "the backend did answer with a SYN cookie");
    assert!(tcp_ext(&bed.prov, "SyncookiesRecv") > 0, "and validated it");
}

#[test]
fn a_lost_syn_ack_or_ack_does_not_stop_the_handshake() {
    let Some(bed) = Bed::running("pphs", Opts { extra: PP, ..Opts::default() }) else { return };
    strict_backend(&bed.prov, 9007);
    let ip: Ipv4Addr = "10.1.0.26".parse().expect("ip");
    // The endpoint's first SYN-ACK of each connection lost on its way into
    // the consumer's namespace.
    nft(
        &bed.a,
        "table inet plsynack {
  set seen { type inet_service; flags dynamic; }
  chain pre { type filter hook prerouting priority -300;
    ip saddr 10.1.0.26 tcp sport 80 tcp flags & (syn | ack) == syn | ack tcp dport != @seen add @seen { tcp dport } counter drop
  }
}",
    );
    let (g, port, mut s) = greeting(&bed.a, ip);
    assert!(g.starts_with(&format!("pp src={CLIENT}:{port} dst=10.1.0.26:80")), "{g}");
    s.write_all(b"after a lost SYN-ACK\n").expect("write");
    assert_eq!(line(&mut s), "after a lost SYN-ACK");
    assert!(nft_list(&bed.a, "plsynack").contains("packets 1 "), "a SYN-ACK was lost");
    drop(s);
    std::thread::sleep(SEC);
    // The consumer's ACK lost on its way into the provider's namespace: the
    // header segment completes the backend's handshake.
    nft(
        &bed.prov,
        "table inet plack {
  set seen { type inet_service; flags dynamic; }
  chain pre { type filter hook prerouting priority -300;
    tcp dport 9007 tcp flags == ack ip length 52 tcp sport != @seen add @seen { tcp sport } counter drop
  }
}",
    );
    let (g, port, mut s) = greeting(&bed.a, ip);
    assert!(g.starts_with(&format!("pp src={CLIENT}:{port} dst=10.1.0.26:80")), "{g}");
    s.write_all(b"after a lost ACK\n").expect("write");
    assert_eq!(line(&mut s), "after a lost ACK");
    let t = nft_list(&bed.prov, "plack");
    assert!(t.contains("packets 1 "), "the consumer's ACK was lost: {t}");
}

#[test]
fn nginx_logs_each_tenants_own_address_and_20_mb_cross_intact_both_ways() {
    let Some(bed) = Bed::running("ppnginx", Opts { extra: PP, ..Opts::default() }) else { return };
    let root = bed.dir.join("www");
    std::fs::create_dir_all(&root).expect("www");
    let data: Vec<u8> = (0..20u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    std::fs::write(root.join("down.bin"), &data).expect("file");
    let _nginx = nginx(
        &bed,
        &format!(
            "  log_format pp '$proxy_protocol_addr:$proxy_protocol_port $request_method $uri';
  server {{
    listen {be}:9005 proxy_protocol;
    access_log {dir}/access.log pp;
    client_max_body_size 64m;
    root {root};
    location / {{ dav_methods PUT; create_full_put_path on; }}
  }}",
            dir = bed.dir.display(),
            be = BACKEND_ORDERS,
            root = root.display()
        ),
    );
    let ip: Ipv4Addr = "10.1.0.21".parse().expect("ip");
    assert!(eventually(10, || connect(&bed.a, ip, 8080, SEC).is_ok()), "nginx listens");
    let request = |ns: &str, req: &[u8]| -> (u16, Vec<u8>) {
        let mut s = connect(ns, ip, 8080, 3 * SEC).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let port = s.local_addr().expect("local").port();
        s.write_all(req).expect("request");
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("response");
        (port, out)
    };
    let body = |resp: &[u8]| -> Vec<u8> {
        let at = resp.windows(4).position(|w| w == b"\r\n\r\n").expect("headers") + 4;
        resp[at..].to_vec()
    };
    // 20 MB down, from each tenant.
    let (pa, ra) = request(&bed.a, b"GET /down.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(ra.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&ra[..ra.len().min(200)]));
    assert_eq!(fnv(&body(&ra), FNV_INIT), fnv(&data, FNV_INIT), "20 MB down intact (tenant a)");
    let (pb, rb) = request(&bed.b, b"GET /down.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(fnv(&body(&rb), FNV_INIT), fnv(&data, FNV_INIT), "20 MB down intact (tenant b)");
    // 20 MB up.
    let mut put =
        format!("PUT /up.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", data.len())
            .into_bytes();
    put.extend_from_slice(&data);
    let (pu, ru) = request(&bed.a, &put);
    assert!(
        ru.starts_with(b"HTTP/1.1 201") || ru.starts_with(b"HTTP/1.1 204"),
        "{}\n{}",
        String::from_utf8_lossy(&ru),
        std::fs::read_to_string(bed.dir.join("nginx-error.log")).unwrap_or_default()
    );
    let up = std::fs::read(root.join("up.bin")).expect("uploaded");
    assert_eq!(fnv(&up, FNV_INIT), fnv(&data, FNV_INIT), "20 MB up intact");
    // nginx saw each client's own address and port, whichever tenant.
    let log = std::fs::read_to_string(bed.dir.join("access.log")).expect("access log");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines,
        vec![
            format!("{CLIENT}:{pa} GET /down.bin"),
            format!("{CLIENT}:{pb} GET /down.bin"),
            format!("{CLIENT}:{pu} PUT /up.bin"),
        ],
        "{log}"
    );
}

/// IPv6 consumers of PROXY services: an IPv4 backend (the flow translated,
/// RFC 6146) and an IPv6 one, each with an endpoint `fd00:aa::31`/`::32`
/// in both tenants' networks.
const PP6: &str = r#"
[[service]]
name = "pp64"
nat_ips = ["192.168.100.31"]
backends = ["192.168.50.10"]
ports = [{ protocol = "tcp", port = 80, backend_port = 9011 }]
visibility = ["*"]
auto_approve = ["*"]
proxy_protocol = "v2"
proxy_tlv = "azure"

[[service]]
name = "pp66"
nat_ips = ["fd00:64::32"]
backends = ["fd00:50::10"]
ports = [{ protocol = "tcp", port = 80, backend_port = 9012 }]
visibility = ["*"]
auto_approve = ["*"]
proxy_protocol = "v2"

[[endpoint]]
name = "pe64-a"
network = "vnet-a"
ip = "fd00:aa::31"
service = "pp64"

[[endpoint]]
name = "pe64-b"
network = "vnet-b"
ip = "fd00:aa::31"
service = "pp64"

[[endpoint]]
name = "pe66-a"
network = "vnet-a"
ip = "fd00:aa::32"
service = "pp66"

[[endpoint]]
name = "pe66-b"
network = "vnet-b"
ip = "fd00:aa::32"
service = "pp66"
"#;

#[test]
fn nginx_logs_each_tenants_ipv6_address_behind_ipv4_and_ipv6_backends() {
    let opts = Opts { extra: PP6, network_extra: "address6 = \"fd00:aa::10/128\"", ..Opts::default() };
    let Some(bed) = Bed::running("ppnginx6", opts) else { return };
    privlink::netns::ip(Some(&bed.prov), &["-6", "addr", "add", "fd00:50::10/128", "dev", "lo", "nodad"])
        .expect("backend address");
    let root = bed.dir.join("www");
    std::fs::create_dir_all(&root).expect("www");
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    std::fs::write(root.join("blob"), &data).expect("file");
    let _nginx = nginx(
        &bed,
        &format!(
            "  log_format pp '$proxy_protocol_addr:$proxy_protocol_port $server_port $uri';
  server {{
    listen {be}:9011 proxy_protocol;
    listen [fd00:50::10]:9012 proxy_protocol;
    access_log {dir}/access.log pp;
    root {root};
  }}",
            dir = bed.dir.display(),
            be = BACKEND_ORDERS,
            root = root.display()
        ),
    );
    let (ep64, ep66): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
        ("fd00:aa::31".parse().expect("ip"), "fd00:aa::32".parse().expect("ip"));
    assert!(eventually(10, || connect(&bed.a, ep66, 80, SEC).is_ok()), "nginx listens");
    let get = |ns: &str, ep: std::net::Ipv6Addr| -> (u16, Vec<u8>) {
        let mut s = connect(ns, ep, 80, 3 * SEC).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let port = s.local_addr().expect("local").port();
        s.write_all(b"GET /blob HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("request");
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("response");
        let at = out.windows(4).position(|w| w == b"\r\n\r\n").expect("headers") + 4;
        (port, out[at..].to_vec())
    };
    let mut want = Vec::new();
    for ns in [&bed.a, &bed.b] {
        for (ep, backend_port) in [(ep64, 9011), (ep66, 9012)] {
            let (port, body) = get(ns, ep);
            assert_eq!(fnv(&body, FNV_INIT), fnv(&data, FNV_INIT), "1 MiB through [{ep}]:80 from {ns}");
            want.push(format!("fd00:aa::10:{port} {backend_port} /blob"));
        }
    }
    // nginx saw each client's own IPv6 address and port, behind the IPv4
    // backend (the header carries IPv6 over an IPv4 connection) and the
    // IPv6 one alike.
    let log = std::fs::read_to_string(bed.dir.join("access.log")).expect("access log");
    assert_eq!(log.lines().collect::<Vec<_>>(), want, "{log}");
}
