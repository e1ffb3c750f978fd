//! Throwaway network worlds for `privlink demo` and the end-to-end tests:
//! namespaces that delete themselves, backends and clients on real sockets
//! inside them, and a Prometheus scrape. Nothing here is on the daemon's
//! path; it exists so that the demo and the tests exercise privlink the way
//! a user's hosts would.

use crate::netns::{in_netns, ip};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Network namespaces made with `ip netns add`, deleted on drop.
#[derive(Debug)]
pub struct Namespaces {
    pub names: Vec<String>,
}

impl Namespaces {
    /// Creates each namespace with its loopback up.
    pub fn create(names: &[String]) -> Result<Namespaces> {
        let mut made = Namespaces { names: Vec::new() };
        for n in names {
            let out = Command::new("ip").args(["netns", "add", n]).output().context("cannot run `ip`")?;
            if !out.status.success() {
                bail!("ip netns add {n}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            made.names.push(n.clone());
            ip(Some(n), &["link", "set", "lo", "up"])?;
        }
        Ok(made)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// FNV-1a, to compare what was sent with what arrived.
pub fn fnv(data: &[u8], mut h: u64) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}
pub const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// The ports a [`Backend`] listens on.
#[derive(Debug, Clone, Copy)]
pub struct BackendPorts {
    /// TCP: greets with `svc=NAME peer=ADDR`, then hashes everything it
    /// reads and answers `len=N fnv=H` at EOF.
    pub hello: u16,
    /// TCP: echoes.
    pub echo: u16,
    /// UDP: answers `svc=NAME peer=ADDR data=...`.
    pub udp: u16,
    /// TCP, when given: greets like `hello` and closes at once, so the
    /// backend closes first and keeps the 4-tuple in TIME_WAIT.
    pub bye: Option<u16>,
}

/// A service's backend: its servers in a namespace, stopped on drop.
#[derive(Debug)]
pub struct Backend {
    stop: Arc<AtomicBool>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Backend {
    /// Starts the servers on `addr` (which must be an address in `ns`).
    pub fn start(ns: &str, name: &str, addr: impl Into<IpAddr>, ports: BackendPorts) -> Result<Backend> {
        let addr: IpAddr = addr.into();
        let (tcp, echo, udp, bye) = in_netns(Some(ns), move || {
            let tcp = TcpListener::bind((addr, ports.hello))?;
            let echo = TcpListener::bind((addr, ports.echo))?;
            let udp = UdpSocket::bind((addr, ports.udp))?;
            let bye = ports.bye.map(|p| TcpListener::bind((addr, p))).transpose()?;
            Ok((tcp, echo, udp, bye))
        })
        .with_context(|| format!("backend {name} on {addr}"))?;
        tcp.set_nonblocking(true)?;
        echo.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let name: Arc<str> = name.into();
        let (n, s) = (name.clone(), stop.clone());
        std::thread::spawn(move || {
            accept_loop(tcp, s, move |mut c, peer| {
                let _ = c.write_all(format!("svc={n} peer={peer}\n").as_bytes());
                let (mut len, mut h, mut buf) = (0usize, FNV_INIT, vec![0u8; 65536]);
                while let Ok(k) = c.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    len += k;
                    h = fnv(&buf[..k], h);
                }
                let _ = c.write_all(format!("len={len} fnv={h:x}\n").as_bytes());
            })
        });
        let s = stop.clone();
        std::thread::spawn(move || {
            accept_loop(echo, s, |mut c, _| {
                let mut buf = vec![0u8; 65536];
                while let Ok(k) = c.read(&mut buf) {
                    if k == 0 || c.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
            })
        });
        if let Some(bye) = bye {
            bye.set_nonblocking(true)?;
            let (n, s) = (name.clone(), stop.clone());
            std::thread::spawn(move || {
                accept_loop(bye, s, move |mut c, peer| {
                    let _ = c.write_all(format!("svc={n} peer={peer}\n").as_bytes());
                })
            });
        }
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                if let Ok((k, peer)) = udp.recv_from(&mut buf) {
                    let msg = format!("svc={name} peer={peer} data={}", String::from_utf8_lossy(&buf[..k]));
                    let _ = udp.send_to(msg.as_bytes(), peer);
                }
            }
        });
        Ok(Backend { stop })
    }
}

fn accept_loop(l: TcpListener, stop: Arc<AtomicBool>, handle: impl Fn(TcpStream, SocketAddr) + Send + Clone + 'static) {
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((c, peer)) => {
                let _ = c.set_nonblocking(false);
                let h = handle.clone();
                std::thread::spawn(move || h(c, peer));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A TCP connection made from inside `ns` (the socket then works from any
/// thread).
pub fn connect(ns: &str, addr: impl Into<IpAddr>, port: u16, timeout: Duration) -> Result<TcpStream> {
    let addr: IpAddr = addr.into();
    in_netns(Some(ns), move || {
        let s = TcpStream::connect_timeout(&SocketAddr::from((addr, port)), timeout)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(s)
    })
}

/// Reads one line (without the newline).
pub fn line(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).map(|n| n == 1).unwrap_or(false) && b[0] != b'\n' {
        out.push(b[0]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A UDP request and its answer, from inside `ns`.
pub fn udp_ask(ns: &str, addr: impl Into<IpAddr>, port: u16, msg: &str) -> Result<String> {
    let (addr, msg): (IpAddr, String) = (addr.into(), msg.to_string());
    in_netns(Some(ns), move || {
        let s = UdpSocket::bind(if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send_to(msg.as_bytes(), (addr, port))?;
        let mut buf = [0u8; 2048];
        let (k, _) = s.recv_from(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..k]).into_owned())
    })
}

/// The A answer for `name` from `server` inside `ns` (the response code
/// too, as the metrics name it).
pub fn resolve(ns: &str, server: Ipv4Addr, name: &str) -> Result<(Option<Ipv4Addr>, String)> {
    let (a, code) = resolve_as(ns, server, name, hickory_proto::rr::RecordType::A)?;
    Ok((a.and_then(|a| if let IpAddr::V4(a) = a { Some(a) } else { None }), code))
}

/// The AAAA answer for `name` from `server` inside `ns` (as [`resolve`]).
pub fn resolve6(ns: &str, server: Ipv4Addr, name: &str) -> Result<(Option<std::net::Ipv6Addr>, String)> {
    let (a, code) = resolve_as(ns, server, name, hickory_proto::rr::RecordType::AAAA)?;
    Ok((a.and_then(|a| if let IpAddr::V6(a) = a { Some(a) } else { None }), code))
}

/// The first A or AAAA answer of a `qtype` query for `name` to `server`
/// inside `ns`, and the response code.
fn resolve_as(
    ns: &str,
    server: Ipv4Addr,
    name: &str,
    qtype: hickory_proto::rr::RecordType,
) -> Result<(Option<IpAddr>, String)> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData};
    let mut q = Message::new();
    q.set_id(rand::random()).set_recursion_desired(true);
    q.add_query(Query::query(Name::from_ascii(name)?, qtype));
    let bytes = q.to_vec()?;
    in_netns(Some(ns), move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send_to(&bytes, (server, 53))?;
        let mut buf = [0u8; 2048];
        let (k, _) = s.recv_from(&mut buf)?;
        let r = Message::from_vec(&buf[..k])?;
        let addr = r.answers().iter().find_map(|x| match x.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        });
        Ok((addr, crate::dns::RCODES[crate::dns::rcode_index(r.response_code())].to_string()))
    })
}

/// A free TCP port on 127.0.0.1 (free now; good enough for a test bed).
pub fn free_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `GET /metrics` from `addr`; `None` until the daemon serves it.
pub fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: privlink\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.starts_with("HTTP/1.1 200").then_some(body)
}

/// The value of one series in a scrape (0 when absent).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(name) else { continue };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            return l.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        }
    }
    0.0
}

/// Polls `f` until it holds or `limit` passes.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}
