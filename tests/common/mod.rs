//! Test bed for end-to-end tests: uniquely named network namespaces, the
//! real `privlink` binary, real backends and clients on real sockets inside
//! the namespaces. Everything is torn down in `Drop`, so a failing test
//! cleans up too.

#![allow(dead_code)]

use privlink::netns::{in_netns, ip};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const EP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 10);
pub const NAT_ORDERS: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 4);
pub const NAT_BILLING: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 8);
pub const BACKEND_ORDERS: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
pub const BACKEND_BILLING: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 10);

/// True when the test may run; false (skip) without privileges, unless CI
/// is set, where missing privileges fail the test.
pub fn privileged() -> bool {
    let ok = privlink::netns::is_root() && std::path::Path::new("/dev/net/tun").exists();
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "CI is set but this test lacks root or /dev/net/tun");
        eprintln!("skipped: needs root and /dev/net/tun");
    }
    ok
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

/// One test's world: a provider namespace with two backends, two tenant
/// namespaces with identical addresses, and the daemon.
pub struct Bed {
    pub prov: String,
    pub a: String,
    pub b: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub metrics: SocketAddr,
    daemon: Option<Child>,
    stop: Arc<AtomicBool>,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Per-test knobs for the generated config.
pub struct Opts {
    pub orders_nat_ports: &'static str,
    pub extra: &'static str,
    pub tcp_closed_idle: u32,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { orders_nat_ports: "1024-65535", extra: "", tcp_closed_idle: 1 }
    }
}

impl Bed {
    pub fn new(tag: &str, opts: Opts) -> Bed {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let base = format!("plt{}{}{}", std::process::id() % 100_000, tag, n);
        let (prov, a, b) = (format!("{base}p"), format!("{base}a"), format!("{base}b"));
        let dir = std::env::temp_dir().join(&base);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let metrics = {
            let l = TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr")
        };
        let bed = Bed {
            prov,
            a,
            b,
            config: dir.join("privlink.toml"),
            dir,
            metrics,
            daemon: None,
            stop: Arc::new(AtomicBool::new(false)),
        };
        for ns in [&bed.prov, &bed.a, &bed.b] {
            let out = Command::new("ip").args(["netns", "add", ns]).output().expect("ip");
            assert!(out.status.success(), "ip netns add {ns}: {}", String::from_utf8_lossy(&out.stderr));
            ip(Some(ns), &["link", "set", "lo", "up"]).expect("lo up");
        }
        for addr in [BACKEND_ORDERS, BACKEND_BILLING] {
            ip(Some(&bed.prov), &["addr", "add", &format!("{addr}/32"), "dev", "lo"]).expect("backend address");
        }
        bed.write_config(&opts, "");
        bed.start_backend("orders", BACKEND_ORDERS);
        bed.start_backend("billing", BACKEND_BILLING);
        bed
    }

    pub fn config_text(&self, opts: &Opts, more: &str) -> String {
        format!(
            r#"
[dataplane]
workers = 2
tcp_closed_idle = {closed}

[metrics]
listen = "{metrics}"

[control]
socket = "{dir}/control.sock"

[state]
dir = "{dir}/state"

[provider]
tun = "plp0"
netns = "{prov}"

[[network]]
name = "vnet-a"
tenant = "contoso"
tun = "pla0"
netns = "{a}"
address = "{client}/32"

[[network]]
name = "vnet-b"
tenant = "fabrikam"
tun = "plb0"
netns = "{b}"
address = "{client}/32"

[[service]]
name = "orders"
nat_ips = ["{nat_o}"]
nat_ports = "{ports}"
backends = ["{be_o}"]
ports = [{{ protocol = "tcp", port = 80, backend_port = 8080 }},
         {{ protocol = "tcp", port = 7, backend_port = 8007 }},
         {{ protocol = "udp", port = 53, backend_port = 5353 }}]
visibility = ["*"]
auto_approve = ["*"]

[[service]]
name = "billing"
nat_ips = ["{nat_b}"]
backends = ["{be_b}"]
ports = [{{ protocol = "tcp", port = 80, backend_port = 8080 }},
         {{ protocol = "tcp", port = 7, backend_port = 8007 }},
         {{ protocol = "udp", port = 53, backend_port = 5353 }}]
visibility = ["*"]
auto_approve = ["*"]

[[endpoint]]
name = "pe-a"
network = "vnet-a"
ip = "{ep}"
service = "orders"

[[endpoint]]
name = "pe-b"
network = "vnet-b"
ip = "{ep}"
service = "billing"
{extra}
{more}
"#,
            closed = opts.tcp_closed_idle,
            metrics = self.metrics,
            dir = self.dir.display(),
            prov = self.prov,
            a = self.a,
            b = self.b,
            client = CLIENT,
            nat_o = NAT_ORDERS,
            nat_b = NAT_BILLING,
            be_o = BACKEND_ORDERS,
            be_b = BACKEND_BILLING,
            ports = opts.orders_nat_ports,
            ep = EP,
            extra = opts.extra,
        )
    }

    pub fn write_config(&self, opts: &Opts, more: &str) {
        std::fs::write(&self.config, self.config_text(opts, more)).expect("write config");
    }

    /// Starts the daemon and waits until it serves metrics.
    pub fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("daemon.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_privlink"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn privlink");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(st) = self.daemon.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("privlink exited early ({st}):\n{}", self.log());
            }
            if self.scrape_opt().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("privlink did not come up:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.daemon.as_ref().expect("daemon").id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, sig) };
    }

    /// Stops the daemon with SIGTERM; returns how long it took to exit.
    pub fn stop_daemon(&mut self) -> Duration {
        let t = Instant::now();
        if let Some(mut c) = self.daemon.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        t.elapsed()
    }

    fn scrape_opt(&self) -> Option<String> {
        let mut s = TcpStream::connect_timeout(&self.metrics, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.starts_with("HTTP/1.1 200").then_some(body)
    }

    pub fn scrape(&self) -> String {
        self.scrape_opt().expect("metrics scrape")
    }

    /// The value of one series, 0 when absent.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.scrape(), name, labels)
    }

    /// Backend servers for one service, in the provider namespace:
    /// TCP 8080 greets ("svc=NAME peer=ADDR"), then hashes all it reads and
    /// answers "len=N fnv=H" at EOF; TCP 8007 echoes; UDP 5353 answers
    /// "svc=NAME peer=ADDR data=...".
    fn start_backend(&self, name: &'static str, addr: Ipv4Addr) {
        let stop = self.stop.clone();
        let (tcp, echo, udp) = in_netns(Some(&self.prov), move || {
            let tcp = TcpListener::bind((addr, 8080))?;
            let echo = TcpListener::bind((addr, 8007))?;
            let udp = UdpSocket::bind((addr, 5353))?;
            Ok((tcp, echo, udp))
        })
        .expect("backend sockets");
        for l in [&tcp, &echo] {
            l.set_nonblocking(true).expect("nonblocking");
        }
        udp.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        let s = stop.clone();
        std::thread::spawn(move || {
            accept_loop(tcp, s, move |mut c: TcpStream, peer| {
                let _ = c.write_all(format!("svc={name} peer={peer}\n").as_bytes());
                let (mut n, mut h, mut buf) = (0usize, FNV_INIT, vec![0u8; 65536]);
                while let Ok(k) = c.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    n += k;
                    h = fnv(&buf[..k], h);
                }
                let _ = c.write_all(format!("len={n} fnv={h:x}\n").as_bytes());
            })
        });
        let s = stop.clone();
        std::thread::spawn(move || {
            accept_loop(echo, s, |mut c: TcpStream, _| {
                let mut buf = vec![0u8; 65536];
                while let Ok(k) = c.read(&mut buf) {
                    if k == 0 || c.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
            })
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((k, peer)) = udp.recv_from(&mut buf) {
                    let msg = format!("svc={name} peer={peer} data={}", String::from_utf8_lossy(&buf[..k]));
                    let _ = udp.send_to(msg.as_bytes(), peer);
                }
            }
        });
    }
}

fn accept_loop(
    l: TcpListener,
    stop: Arc<AtomicBool>,
    handle: impl Fn(TcpStream, SocketAddr) + Send + Sync + Clone + 'static,
) {
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

impl Drop for Bed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.stop_daemon();
        if std::thread::panicking() {
            eprintln!("--- daemon log ({}) ---\n{}", self.dir.display(), self.log());
        }
        for ns in [&self.prov, &self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The value of one series in a scrape, 0 when absent.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            return line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        }
    }
    0.0
}

/// Runs `f` in namespace `ns` (client side).
pub fn within<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    in_netns(Some(ns), f)
}

/// A TCP connection made from inside `ns` (the socket keeps working from
/// any thread afterwards).
pub fn connect(ns: &str, addr: Ipv4Addr, port: u16, timeout: Duration) -> anyhow::Result<TcpStream> {
    within(ns, move || {
        let s = TcpStream::connect_timeout(&SocketAddr::from((addr, port)), timeout)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(s)
    })
}

/// Reads one line.
pub fn line(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).map(|n| n == 1).unwrap_or(false) && b[0] != b'\n' {
        out.push(b[0]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A UDP request/response from inside `ns`; `None` on timeout.
pub fn udp_ask(ns: &str, addr: Ipv4Addr, port: u16, msg: &'static str) -> Option<String> {
    within(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send_to(msg.as_bytes(), (addr, port))?;
        let mut buf = [0u8; 2048];
        let (k, _) = s.recv_from(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..k]).into_owned())
    })
    .ok()
}

/// Polls `f` until it returns true or `secs` pass.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}
