//! Test bed for end-to-end tests: uniquely named network namespaces, the
//! real `privlink` binary, real backends and clients on real sockets inside
//! the namespaces. Everything is torn down in `Drop`, so a failing test
//! cleans up too.

#![allow(dead_code)]

use privlink::netns::{in_netns, ip};
#[allow(unused_imports)]
pub use privlink::testbed::{connect, eventually as eventually_for, fnv, line, metric, udp_ask, FNV_INIT};
use privlink::testbed::{Backend, BackendPorts, Namespaces};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Whether the command `tool` is installed; under CI its absence fails the
/// test (tests/run.sh installs it), elsewhere the test is skipped.
pub fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "CI is set but `{tool}` is missing (tests/run.sh installs it)");
        eprintln!("skipped: no {tool}");
    }
    ok
}

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
    /// Extra environment for the daemon processes (e.g. NOTIFY_SOCKET).
    pub env: Vec<(String, String)>,
    /// (address, service name, its servers while they run).
    backends: Vec<(Ipv4Addr, &'static str, Option<Backend>)>,
    // Dropped last: the namespaces go after the daemon stopped.
    _ns: Namespaces,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Per-test knobs for the generated config.
pub struct Opts {
    pub orders_nat_ports: &'static str,
    pub extra: &'static str,
    pub tcp_closed_idle: u32,
    /// TOML list: tenants auto-approved by `orders`.
    pub orders_auto_approve: &'static str,
    /// TOML list: tenants that may see `billing`.
    pub billing_visibility: &'static str,
    /// `[dataplane] offload`.
    pub offload: bool,
    /// `[provider] mtu`.
    pub provider_mtu: u16,
    /// Lines added to both networks' tables.
    pub network_extra: &'static str,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            orders_nat_ports: "1024-65535",
            extra: "",
            tcp_closed_idle: 1,
            orders_auto_approve: r#"["*"]"#,
            billing_visibility: r#"["*"]"#,
            offload: true,
            provider_mtu: 1500,
            network_extra: "",
        }
    }
}

impl Bed {
    pub fn new(tag: &str, opts: Opts) -> Bed {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let base = format!("plt{}{}{}", std::process::id() % 100_000, tag, n);
        let (prov, a, b) = (format!("{base}p"), format!("{base}a"), format!("{base}b"));
        let dir = std::env::temp_dir().join(&base);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let metrics = privlink::testbed::free_port().expect("free port");
        let ns = Namespaces::create(&[prov.clone(), a.clone(), b.clone()]).expect("namespaces");
        for addr in [BACKEND_ORDERS, BACKEND_BILLING] {
            ip(Some(&prov), &["addr", "add", &format!("{addr}/32"), "dev", "lo"]).expect("backend address");
        }
        let ports = BackendPorts { hello: 8080, echo: 8007, udp: 5353, bye: Some(8081) };
        let backends = vec![
            (
                BACKEND_ORDERS,
                "orders",
                Some(Backend::start(&prov, "orders", BACKEND_ORDERS, ports).expect("orders backend")),
            ),
            (
                BACKEND_BILLING,
                "billing",
                Some(Backend::start(&prov, "billing", BACKEND_BILLING, ports).expect("billing backend")),
            ),
        ];
        let bed = Bed {
            prov,
            a,
            b,
            config: dir.join("privlink.toml"),
            dir,
            metrics,
            daemon: None,
            env: Vec::new(),
            backends,
            _ns: ns,
        };
        bed.write_config(&opts, "");
        bed
    }

    pub fn config_text(&self, opts: &Opts, more: &str) -> String {
        format!(
            r#"
[dataplane]
workers = 2
tcp_closed_idle = {closed}
offload = {offload}

[metrics]
listen = "{metrics}"

[control]
socket = "{dir}/control.sock"

[state]
dir = "{dir}/state"

[provider]
tun = "plp0"
netns = "{prov}"
mtu = {provider_mtu}

[[network]]
name = "vnet-a"
tenant = "contoso"
tun = "pla0"
netns = "{a}"
address = "{client}/32"
{net_extra}

[[network]]
name = "vnet-b"
tenant = "fabrikam"
tun = "plb0"
netns = "{b}"
address = "{client}/32"
{net_extra}

[[service]]
name = "orders"
nat_ips = ["{nat_o}"]
nat_ports = "{ports}"
backends = ["{be_o}"]
ports = [{{ protocol = "tcp", port = 80, backend_port = 8080 }},
         {{ protocol = "tcp", port = 88, backend_port = 8081 }},
         {{ protocol = "tcp", port = 7, backend_port = 8007 }},
         {{ protocol = "udp", port = 53, backend_port = 5353 }},
         {{ protocol = "udp", port = 54, backend_port = 5454 }}]
visibility = ["*"]
auto_approve = {orders_auto}

[[service]]
name = "billing"
nat_ips = ["{nat_b}"]
backends = ["{be_b}"]
ports = [{{ protocol = "tcp", port = 80, backend_port = 8080 }},
         {{ protocol = "tcp", port = 7, backend_port = 8007 }},
         {{ protocol = "udp", port = 53, backend_port = 5353 }}]
visibility = {billing_vis}
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
            orders_auto = opts.orders_auto_approve,
            billing_vis = opts.billing_visibility,
            offload = opts.offload,
            provider_mtu = opts.provider_mtu,
            net_extra = opts.network_extra,
        )
    }

    pub fn write_config(&self, opts: &Opts, more: &str) {
        std::fs::write(&self.config, self.config_text(opts, more)).expect("write config");
    }

    /// A started bed, or `None` (skip) where privileges are missing and CI
    /// is not set.
    pub fn running(tag: &str, opts: Opts) -> Option<Bed> {
        if !privileged() {
            return None;
        }
        let mut bed = Bed::new(tag, opts);
        bed.start();
        Some(bed)
    }

    /// Starts the daemon and waits until it serves metrics.
    pub fn start(&mut self) {
        self.daemon = Some(self.spawn(false));
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

    /// A daemon process on this bed's config (`--takeover` when asked),
    /// logging to the bed's log after whatever earlier daemons wrote.
    fn spawn(&self, takeover: bool) -> Child {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("daemon.log")).expect("log file");
        let mut c = Command::new(env!("CARGO_BIN_EXE_privlink"));
        c.args(["run", "--config"]).arg(&self.config);
        if takeover {
            c.arg("--takeover");
        }
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c.env("RUST_LOG", "info").stdout(Stdio::null()).stderr(log).spawn().expect("spawn privlink")
    }

    /// Hands over to a new daemon (`privlink run --takeover`): returns when
    /// the old one has exited and the new one serves metrics.
    pub fn take_over(&mut self) {
        // Killed if this fails half way: no daemon outlives its test.
        struct Reap(Child);
        impl Drop for Reap {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut old = Reap(self.daemon.take().expect("a running daemon"));
        let old = &mut old.0;
        self.daemon = Some(self.spawn(true));
        let deadline = Instant::now() + Duration::from_secs(20);
        while old.try_wait().ok().flatten().is_none() {
            if let Some(st) = self.daemon.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("the successor exited ({st}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "the old daemon did not let go:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        let st = old.wait().expect("old daemon status");
        assert!(st.success(), "the old daemon exited with {st}:\n{}", self.log());
        while self.scrape_opt().is_none() {
            assert!(Instant::now() < deadline, "the successor does not serve metrics:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the servers of the backend at `addr` (its port refuses).
    pub fn stop_backend(&mut self, addr: Ipv4Addr) {
        for b in self.backends.iter_mut().filter(|b| b.0 == addr) {
            b.2 = None;
        }
        // The accept loops notice within their poll interval.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Starts the servers of the backend at `addr` again.
    pub fn start_backend(&mut self, addr: Ipv4Addr) {
        let ports = BackendPorts { hello: 8080, echo: 8007, udp: 5353, bye: Some(8081) };
        let prov = self.prov.clone();
        for b in self.backends.iter_mut().filter(|b| b.0 == addr) {
            b.2 = Some(Backend::start(&prov, b.1, addr, ports).expect("backend"));
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().expect("daemon").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.daemon.as_ref().expect("daemon").id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, sig) };
    }

    /// Kills the daemon with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `privlink ARGS... --config <this bed's config>`; returns exit
    /// code, stdout, stderr.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_privlink"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run privlink");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
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

    /// Whether the daemon serves metrics now.
    pub fn scrape_ok(&self) -> bool {
        self.scrape_opt().is_some()
    }

    /// Runs a daemon in the foreground until it exits (for one that must
    /// refuse to start); returns exit code, stdout, stderr.
    pub fn run_once(&self) -> (i32, String, String) {
        let mut c = Command::new(env!("CARGO_BIN_EXE_privlink"));
        c.args(["run", "--config"]).arg(&self.config);
        let out = c.output().expect("run privlink");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn scrape_opt(&self) -> Option<String> {
        privlink::testbed::scrape(self.metrics)
    }

    pub fn scrape(&self) -> String {
        self.scrape_opt().expect("metrics scrape")
    }

    /// The value of one series, 0 when absent.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.scrape(), name, labels)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.stop_daemon();
        if std::thread::panicking() {
            eprintln!("--- daemon log ({}) ---\n{}", self.dir.display(), self.log());
        }
        // What a killed daemon left in /dev/shm (a clean stop removes it).
        if let Ok(r) = privlink::state::RunDir::for_state_dir(&self.dir.join("state")) {
            r.remove();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `bytes` of data from namespace `ns` through the endpoint to the
/// orders backend's hashing port and checks that exactly that arrived;
/// returns the backend's greeting (which names the source it saw).
pub fn transfer_intact(ns: &str, bytes: u32) -> String {
    use std::io::Write;
    let data: Vec<u8> = (0..bytes).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let want = format!("len={} fnv={:x}", data.len(), fnv(&data, FNV_INIT));
    let mut s = connect(ns, EP, 80, Duration::from_secs(3)).expect("connect through the endpoint");
    let greeting = line(&mut s);
    s.write_all(&data).expect("send");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    assert_eq!(line(&mut s), want, "the backend got exactly what was sent");
    greeting
}

/// Whether a link named `name` exists in the calling thread's namespace.
pub fn link_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else { return false };
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Runs `f` in namespace `ns`.
pub fn within<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    in_netns(Some(ns), f)
}

/// Polls `f` until it holds or `secs` seconds pass.
pub fn eventually(secs: u64, f: impl FnMut() -> bool) -> bool {
    eventually_for(Duration::from_secs(secs), f)
}

/// A TCP connection from `ns` bound to source port `sport` (with
/// `SO_REUSEADDR`, so a port whose last connection ended can be used again).
pub fn connect_from(ns: &str, sport: u16, addr: Ipv4Addr, port: u16) -> anyhow::Result<std::net::TcpStream> {
    use anyhow::Context;
    use socket2::{Domain, Socket, Type};
    in_netns(Some(ns), move || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((CLIENT, sport)).into()).with_context(|| format!("bind :{sport}"))?;
        s.connect(&SocketAddr::from((addr, port)).into()).with_context(|| format!("connect {addr}:{port}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(s.into())
    })
}

/// Runs `tests/tools/rawpkt.py` with `args` inside namespace `ns` (raw
/// packets no socket sends: padding, a RST at a chosen sequence number);
/// returns the child with its stdout piped.
pub fn rawpkt(ns: &str, args: &[&str]) -> Child {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/tools/rawpkt.py");
    Command::new("ip")
        .args(["netns", "exec", ns, "python3", script])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3")
}

/// The output of a finished [`rawpkt`] run.
pub fn rawpkt_done(c: Child) -> String {
    let out = c.wait_with_output().expect("rawpkt");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The config of `bed` with `line` added to endpoint `pe-a`.
pub fn with_pe_a(bed: &Bed, opts: &Opts, line: &str) -> String {
    bed.config_text(opts, "").replace(
        &format!("name = \"pe-a\"\nnetwork = \"vnet-a\"\nip = \"{EP}\"\nservice = \"orders\"\n"),
        &format!("name = \"pe-a\"\nnetwork = \"vnet-a\"\nip = \"{EP}\"\nservice = \"orders\"\n{line}\n"),
    )
}

/// Loads an nftables ruleset into namespace `ns`.
pub fn nft(ns: &str, rules: &str) {
    let mut nft = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft (apt-get install nftables)");
    std::io::Write::write_all(&mut nft.stdin.take().expect("stdin"), rules.as_bytes()).expect("rules");
    assert!(nft.wait().expect("nft").success(), "{rules}");
}

/// A child process killed (and waited for) when dropped.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx in `bed`'s provider namespace, one process (`master_process
/// off`: killing it stops nginx), its files in the bed's directory;
/// `http` is what goes inside its `http { }` block after the temp paths.
pub fn nginx(bed: &Bed, http: &str) -> Kill {
    let conf = format!(
        "daemon off; master_process off; pid {dir}/nginx.pid; error_log {dir}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fcgi;
  uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
{http}
}}",
        dir = bed.dir.display(),
    );
    std::fs::write(bed.dir.join("nginx.conf"), conf).expect("conf");
    let child = Command::new("ip")
        .args(["netns", "exec", &bed.prov, "nginx", "-c"])
        .arg(bed.dir.join("nginx.conf"))
        .spawn()
        .expect("nginx (apt-get install nginx)");
    Kill(child)
}

/// Adds `addr` to the provider namespace's `lo` (an IPv6 one without
/// duplicate address detection, which would leave it tentative and
/// unbindable for a while) and starts a test backend `name` on it.
pub fn backend_at(bed: &Bed, name: &str, addr: &str, ports: BackendPorts) -> Backend {
    let a: std::net::IpAddr = addr.parse().expect("backend address");
    let with_len = format!("{a}/{}", if a.is_ipv6() { 128 } else { 32 });
    let mut args = vec!["addr", "add", with_len.as_str(), "dev", "lo"];
    if a.is_ipv6() {
        args.push("nodad");
    }
    ip(Some(&bed.prov), &args).expect("backend address");
    Backend::start(&bed.prov, name, a, ports).expect("backend")
}
