//! The fleet's shared state (`[store]`): a real etcd (the distribution's
//! `etcd-server`) on loopback, `privlink store load|dump`, and the daemon
//! reading its networks, services and endpoints from etcd, applying
//! changes as a reload does, refusing a bad value with its key named, and
//! forwarding on with what it last applied while etcd is away.

mod common;

use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A single-member etcd cluster on free loopback ports, killed on drop.
struct Etcd {
    child: Child,
    url: String,
    data: std::path::PathBuf,
    peer: String,
}

impl Etcd {
    fn start(dir: &Path) -> Etcd {
        let client = privlink::testbed::free_port().expect("port");
        let peer = privlink::testbed::free_port().expect("port");
        let (url, peer) = (format!("http://{client}"), format!("http://{peer}"));
        let data = dir.join("etcd");
        let mut e = Etcd { child: Self::spawn(&data, &url, &peer), url, data, peer };
        e.wait_up();
        e
    }

    fn spawn(data: &Path, url: &str, peer: &str) -> Child {
        Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(data)
            .args(["--listen-client-urls", url, "--advertise-client-urls", url])
            .args(["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd")
    }

    fn wait_up(&mut self) {
        assert!(eventually(20, || self.ctl(&["endpoint", "health"]).0), "etcd did not come up");
    }

    /// `etcdctl ARGS` against this cluster: (success, output).
    fn ctl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.url, "--dial-timeout", "2s"])
            .args(args)
            .output()
            .expect("etcdctl");
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn restart(&mut self) {
        self.child = Self::spawn(&self.data, &self.url, &self.peer);
        self.wait_up();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The bed's config with its networks, services and endpoints cut out and a
/// `[store]` in their place: what a fleet host's file holds.
fn local_config(bed: &Bed, etcd: &Etcd) -> String {
    let full = bed.config_text(&Opts::default(), "");
    let local = &full[..full.find("[[network]]").expect("networks")];
    format!("[store]\netcd = [\"{}\"]\nhost = \"h1\"\nlease_ttl = \"2s\"\n{local}", etcd.url)
}

/// Whether a TCP connection from `ns` through the endpoint gets its
/// backend's greeting.
fn reaches(ns: &str) -> bool {
    connect(ns, EP, 80, Duration::from_millis(700)).is_ok_and(|mut s| !line(&mut s).is_empty())
}

#[test]
fn a_host_runs_from_etcd_follows_its_changes_and_keeps_forwarding_without_it() {
    if !privileged() || !have("etcd") || !have("etcdctl") {
        return;
    }
    let mut bed = Bed::new("fleet", Opts::default());
    let mut etcd = Etcd::start(&bed.dir);

    // `store load` moves the single-host file in: one key per object.
    let (code, out, err) = bed.cli(&["store", "load", "--host", "h1", "--etcd", &etcd.url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 services, 2 networks, 2 endpoints loaded for host h1 under /privlink"), "{out}");
    let (_, keys) = etcd.ctl(&["get", "/privlink/", "--prefix", "--keys-only"]);
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(
        keys,
        [
            "/privlink/hosts/h1/endpoints/pe-a",
            "/privlink/hosts/h1/endpoints/pe-b",
            "/privlink/hosts/h1/networks/vnet-a",
            "/privlink/hosts/h1/networks/vnet-b",
            "/privlink/services/billing",
            "/privlink/services/orders",
        ]
    );

    // The host's file now holds no objects: the daemon reads them from etcd.
    let full = std::fs::read_to_string(&bed.config).expect("config");
    std::fs::write(&bed.config, local_config(&bed, &etcd)).expect("write");
    bed.start();
    assert!(bed.log().contains("configuration read from the store"), "{}", bed.log());
    assert!(transfer_intact(&bed.a, 1 << 20).contains("orders"));
    assert!(transfer_intact(&bed.b, 1 << 20).contains("billing"));
    assert_eq!(bed.metric("privlink_store_up", &[]), 1.0);
    assert_eq!(bed.metric("privlink_nat_ips_held", &[("service", "orders")]), 1.0);
    let (_, status, _) = bed.cli(&["status"]);
    assert!(status.contains("store: up since") && status.contains("(host h1)"), "{status}");
    assert!(status.contains("NAT addresses held: billing 192.168.100.8; orders 192.168.100.4"), "{status}");

    // `check` validates the file with what etcd holds, as `run` does.
    let (code, out, err) = bed.cli(&["check"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok (2 networks, 2 services, 2 endpoints)"), "{out}");
    let both = bed.dir.join("both.toml");
    std::fs::write(&both, format!("{}\n{full}", local_config(&bed, &etcd).split("[dataplane]").next().unwrap_or("")))
        .expect("write");
    let out =
        Command::new(env!("CARGO_BIN_EXE_privlink")).args(["check", "--config"]).arg(&both).output().expect("check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("with [store], networks live in the store"), "{err}");

    // `store dump` gives back what `store load` reads: load it for another
    // host and the same documents appear under that host.
    let (code, dump, err) = bed.cli(&["store", "dump"]);
    assert_eq!(code, 0, "{err}");
    assert!(dump.contains("[[service]]") && dump.contains("name = \"pe-b\""), "{dump}");
    let other = bed.dir.join("other.toml");
    std::fs::write(&other, &dump).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_privlink"))
        .args(["store", "load", "--host", "h2", "--etcd", &etcd.url, "--config"])
        .arg(&other)
        .output()
        .expect("privlink");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for k in ["networks/vnet-a", "endpoints/pe-b"] {
        let (a, b) = (
            etcd.ctl(&["get", &format!("/privlink/hosts/h1/{k}"), "--print-value-only"]).1,
            etcd.ctl(&["get", &format!("/privlink/hosts/h2/{k}"), "--print-value-only"]).1,
        );
        assert!(!a.is_empty() && a == b, "{k}: {a} / {b}");
    }

    // A change in etcd applies as a reload does: pe-b goes, pe-a's live
    // connection is not disturbed, and pe-b comes back when its key does.
    let mut held = connect(&bed.a, EP, 7, Duration::from_secs(2)).expect("held connection");
    let pe_b = etcd.ctl(&["get", "/privlink/hosts/h1/endpoints/pe-b", "--print-value-only"]).1;
    assert!(etcd.ctl(&["del", "/privlink/hosts/h1/endpoints/pe-b"]).0);
    assert!(eventually(2, || !reaches(&bed.b)), "pe-b still answers:\n{}", bed.log());
    assert!(reaches(&bed.a));
    assert_echo(&mut held, b"still here\n");
    assert!(etcd.ctl(&["put", "/privlink/hosts/h1/endpoints/pe-b", pe_b.trim_end()]).0);
    assert!(eventually(2, || reaches(&bed.b)), "pe-b did not come back:\n{}", bed.log());

    // A bad value is refused with its key and position; the last good
    // state stays.
    let billing = etcd.ctl(&["get", "/privlink/services/billing", "--print-value-only"]).1;
    assert!(etcd.ctl(&["put", "/privlink/services/billing", "name = \"billing\"\nnat_ips = = 1"]).0);
    let refused = "reload refused: etcd:/privlink/services/billing:2:11: extra `=`";
    assert!(eventually(3, || bed.log().contains(refused)), "{}", bed.log());
    assert!(reaches(&bed.b) && reaches(&bed.a));
    // A semantic error too (an unknown network), at its line and column.
    let pe_b_bad = pe_b.replace("network = \"vnet-b\"", "network = \"vnet-z\"");
    let line = pe_b_bad.lines().position(|l| l.starts_with("network")).expect("network line") + 1;
    assert!(etcd.ctl(&["put", "/privlink/services/billing", billing.trim_end()]).0);
    assert!(etcd.ctl(&["put", "/privlink/hosts/h1/endpoints/pe-b", pe_b_bad.trim_end()]).0);
    let refused = format!("reload refused: etcd:/privlink/hosts/h1/endpoints/pe-b:{line}:11: unknown network `vnet-z`");
    assert!(eventually(3, || bed.log().contains(&refused)), "{refused}\n{}", bed.log());
    assert!(reaches(&bed.b));
    assert!(etcd.ctl(&["put", "/privlink/hosts/h1/endpoints/pe-b", pe_b.trim_end()]).0);

    // A hand-over keeps the lease, so the addresses and the flows on them.
    bed.take_over();
    assert!(bed.log().contains("store: resuming the lease of the last run"), "{}", bed.log());
    assert_echo(&mut held, b"after the hand-over\n");
    let (_, nat) = etcd.ctl(&["get", "/privlink/nat/orders/192.168.100.4", "--print-value-only"]);
    assert_eq!(nat.trim(), "h1");
    // So does a crash and restart within the TTL: the flow table is
    // recovered and the lease resumed, so the held connection carries on.
    bed.kill9();
    bed.start();
    assert_eq!(bed.log().matches("store: resuming the lease of the last run").count(), 2, "{}", bed.log());
    assert_echo(&mut held, b"after the crash\n");
    let (_, nat) = etcd.ctl(&["get", "/privlink/nat/orders/192.168.100.4", "--print-value-only"]);
    assert_eq!(nat.trim(), "h1");

    // etcd away: established and new flows go on; the gauge says so; a
    // daemon started meanwhile runs from the copy of what was applied.
    // (Compacted first: the daemon started below resumes from a revision
    // etcd no longer has, and must re-read.)
    // (Revisions this host does not watch move etcd on past its copy.)
    for i in 0..5 {
        assert!(etcd.ctl(&["put", "/elsewhere/x", &i.to_string()]).0);
    }
    let (_, st) = etcd.ctl(&["endpoint", "status", "-w", "json"]);
    let rev: serde_json::Value = serde_json::from_str(&st).expect("status json");
    let rev = rev[0]["Status"]["header"]["revision"].as_i64().expect("revision");
    assert!(etcd.ctl(&["compact", &rev.to_string()]).0);
    etcd.stop();
    assert!(eventually(40, || bed.metric("privlink_store_up", &[]) == 0.0), "store_up stayed 1");
    let (_, status, _) = bed.cli(&["status"]);
    assert!(status.contains("store: down since"), "{status}");
    assert_echo(&mut held, b"etcd is gone\n");
    // New flows too, once past the lease guard: the TTL (2 s) without a
    // renewal, then 3 s of etcd unreachable, and the host carries on with
    // the addresses it holds.
    std::thread::sleep(Duration::from_millis(6500));
    assert!(reaches(&bed.a) && reaches(&bed.b));
    assert_echo(&mut held, b"still forwarding\n");
    drop(held);
    bed.stop_daemon();
    bed.start();
    assert!(bed.log().contains("starting from the copy of the documents last applied"), "{}", bed.log());
    assert!(transfer_intact(&bed.a, 1 << 20).contains("orders"));
    assert!(reaches(&bed.b));

    // etcd back: the watch resumes and changes apply again.
    etcd.restart();
    assert!(eventually(20, || bed.metric("privlink_store_up", &[]) == 1.0), "store_up stayed 0:\n{}", bed.log());
    assert!(eventually(5, || bed.log().contains("store: the revision to resume from was compacted")), "{}", bed.log());
    assert!(bed.metric("privlink_store_resyncs_total", &[]) >= 1.0);
    assert!(etcd.ctl(&["del", "/privlink/hosts/h1/endpoints/pe-a"]).0);
    assert!(eventually(3, || !reaches(&bed.a)), "pe-a still answers:\n{}", bed.log());

    // etcd frozen (SIGSTOP): its connections stay open and nothing answers.
    // The silent watch is asked for progress, gets none, and counts as
    // dead; forwarding goes on.
    let mut held_b = connect(&bed.b, EP, 7, Duration::from_secs(2)).expect("connection through pe-b");
    held_b.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    etcd.signal(libc::SIGSTOP);
    let found = eventually(25, || bed.metric("privlink_store_up", &[]) == 0.0);
    let echoed = {
        use std::io::{Read, Write};
        let mut b = [0u8; 7];
        held_b.write_all(b"frozen\n").is_ok() && held_b.read_exact(&mut b).is_ok() && &b == b"frozen\n"
    };
    etcd.signal(libc::SIGCONT);
    assert!(found, "a silent watch was not found dead:\n{}", bed.log());
    assert!(echoed, "the held connection stopped while etcd was frozen");
    assert!(eventually(20, || bed.metric("privlink_store_up", &[]) == 1.0), "store_up stayed 0:\n{}", bed.log());

    // A value refused while no daemon ran: a start runs on the last good
    // documents, says which key to fix, and applies the fix when it comes.
    let pe_b_bad = get(&etcd, "/privlink/hosts/h1/endpoints/pe-b").replace("\"vnet-b\"", "\"vnet-z\"");
    assert!(etcd.ctl(&["put", "/privlink/hosts/h1/endpoints/pe-b", &pe_b_bad]).0);
    let refused = "reload refused: etcd:/privlink/hosts/h1/endpoints/pe-b:";
    assert!(eventually(3, || bed.log().matches(refused).count() >= 2), "{}", bed.log());
    bed.stop_daemon();
    bed.start();
    assert!(bed.log().contains("store documents refused: etcd:/privlink/hosts/h1/endpoints/pe-b:"), "{}", bed.log());
    assert_eq!(bed.metric("privlink_store_refused", &[]), 1.0);
    assert!(eventually(5, || reaches(&bed.b)), "pe-b (the last good copy) does not answer:\n{}", bed.log());
    let (code, _, err) = bed.cli(&["check"]);
    assert!(code != 0 && err.contains("etcd:/privlink/hosts/h1/endpoints/pe-b:"), "{err}");
    assert!(etcd.ctl(&["put", "/privlink/hosts/h1/endpoints/pe-b", &pe_b_bad.replace("\"vnet-z\"", "\"vnet-b\"")]).0);
    assert!(eventually(3, || bed.metric("privlink_store_refused", &[]) == 0.0), "{}", bed.log());
}

fn get(etcd: &Etcd, key: &str) -> String {
    etcd.ctl(&["get", key, "--print-value-only"]).1.trim_end().to_string()
}

fn assert_echo(s: &mut std::net::TcpStream, msg: &[u8]) {
    use std::io::{Read, Write};
    s.write_all(msg).expect("write on the held connection");
    let mut got = vec![0u8; msg.len()];
    s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    s.read_exact(&mut got).expect("echo on the held connection");
    assert_eq!(got, msg);
}

/// A second fleet host's daemon (its own config, state, provider device),
/// stopped cleanly on drop.
struct Host2 {
    child: Option<Child>,
    metrics: std::net::SocketAddr,
    state: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Host2 {
    fn start(bed: &Bed, etcd: &Etcd) -> Host2 {
        let metrics = privlink::testbed::free_port().expect("port");
        let dir = bed.dir.display().to_string();
        let text = local_config(bed, etcd)
            .replace("host = \"h1\"", "host = \"h2\"")
            .replace(&bed.metrics.to_string(), &metrics.to_string())
            .replace(&format!("{dir}/control.sock"), &format!("{dir}/h2.sock"))
            .replace(&format!("{dir}/state"), &format!("{dir}/state2"))
            .replace("tun = \"plp0\"", "tun = \"plq0\"");
        let config = bed.dir.join("h2.toml");
        std::fs::write(&config, text).expect("write");
        let log = bed.dir.join("h2.log");
        let err = std::fs::File::create(&log).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_privlink"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("privlink");
        let h = Host2 { child: Some(child), metrics, state: bed.dir.join("state2"), log };
        assert!(
            eventually(20, || privlink::testbed::scrape(metrics).is_some()),
            "host 2 did not come up:\n{}",
            h.log()
        );
        h
    }

    fn held(&self, service: &str) -> f64 {
        privlink::testbed::scrape(self.metrics)
            .map_or(-1.0, |t| metric(&t, "privlink_nat_ips_held", &[("service", service)]))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Host2 {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- host 2 log ---\n{}", self.log());
        }
        if let Ok(r) = privlink::state::RunDir::for_state_dir(&self.state) {
            r.remove();
        }
    }
}

/// `text` without its terminal colour sequences (`ESC [ ... m`).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut it = text.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for c in it.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The orders backend's greeting to a connection from `src` in `ns`.
fn greeting_from(ns: &str, src: std::net::Ipv4Addr) -> Option<String> {
    within(ns, move || {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.bind(&std::net::SocketAddr::from((src, 0)).into())?;
        s.connect_timeout(&std::net::SocketAddr::from((EP, 80)).into(), Duration::from_secs(2))?;
        let mut s: std::net::TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(line(&mut s))
    })
    .ok()
}

/// The NAT address the orders backend saw in a greeting (`peer=ADDR:PORT`).
fn nat_of(greeting: &str) -> String {
    let peer = greeting.split_whitespace().find_map(|w| w.strip_prefix("peer=")).unwrap_or("");
    peer.rsplit_once(':').map_or(peer, |(a, _)| a).to_string()
}

/// The device the provider namespace routes `addr` through.
fn route_dev(ns: &str, addr: &str) -> String {
    let out = Command::new("ip").args(["-n", ns, "route", "get", addr]).output().expect("ip");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace().skip_while(|w| *w != "dev").nth(1).unwrap_or("").to_string()
}

#[test]
fn two_hosts_share_a_services_nat_addresses_by_lease_and_a_survivor_takes_a_dead_hosts() {
    if !privileged() || !have("etcd") || !have("etcdctl") {
        return;
    }
    let mut bed = Bed::new("lease", Opts::default());
    let etcd = Etcd::start(&bed.dir);
    let (code, out, err) = bed.cli(&["store", "load", "--host", "h1", "--etcd", &etcd.url]);
    assert_eq!(code, 0, "{out}{err}");
    // orders gets two NAT addresses; vnet-b and pe-b (now to orders) move
    // to host h2.
    let get = |k: &str| etcd.ctl(&["get", k, "--print-value-only"]).1.trim_end().to_string();
    let orders =
        get("/privlink/services/orders").replace("[\"192.168.100.4\"]", "[\"192.168.100.4\", \"192.168.100.5\"]");
    assert!(etcd.ctl(&["put", "/privlink/services/orders", &orders]).0);
    let (net_b, pe_b) = (get("/privlink/hosts/h1/networks/vnet-b"), get("/privlink/hosts/h1/endpoints/pe-b"));
    assert!(etcd.ctl(&["put", "/privlink/hosts/h2/networks/vnet-b", &net_b]).0);
    assert!(etcd.ctl(&["put", "/privlink/hosts/h2/endpoints/pe-b", &pe_b.replace("\"billing\"", "\"orders\"")]).0);
    assert!(etcd.ctl(&["del", "/privlink/hosts/h1/endpoints/pe-b"]).0);
    assert!(etcd.ctl(&["del", "/privlink/hosts/h1/networks/vnet-b"]).0);

    std::fs::write(&bed.config, local_config(&bed, &etcd)).expect("write");
    bed.start();
    let h2 = Host2::start(&bed, &etcd);

    // A fair share each: one address per host, never the same one.
    let one_each =
        |bed: &Bed| bed.metric("privlink_nat_ips_held", &[("service", "orders")]) == 1.0 && h2.held("orders") == 1.0;
    assert!(eventually(10, || one_each(&bed)), "not one each:\n{}\n{}", bed.log(), h2.log());
    let (x, y) = (nat_of(&transfer_intact(&bed.a, 1 << 20)), nat_of(&transfer_intact(&bed.b, 1 << 20)));
    assert!(x.starts_with("192.168.100.") && y.starts_with("192.168.100.") && x != y, "h1 {x}, h2 {y}");
    assert_eq!((route_dev(&bed.prov, &x), route_dev(&bed.prov, &y)), ("plp0".into(), "plq0".into()));
    let (_, keys) = etcd.ctl(&["get", "/privlink/nat/orders/", "--prefix"]);
    assert!(
        keys.contains(&format!("/privlink/nat/orders/{x}\nh1"))
            && keys.contains(&format!("/privlink/nat/orders/{y}\nh2")),
        "{keys}"
    );

    // An operator on h1 decides h2's endpoint: the record in etcd changes
    // (compare-and-swap on its revision) and h2 applies it.
    let (code, out, err) = bed.cli(&["connections", "reject", "pe-b", "--message", "from h1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rejected"), "{out}");
    let rec = get("/privlink/hosts/h2/connections/pe-b");
    assert!(rec.contains("\"state\":\"rejected\"") && rec.contains("from h1"), "{rec}");
    assert!(eventually(2, || !reaches(&bed.b)), "pe-b still answers after its rejection:\n{}", h2.log());
    let (code, out, err) = bed.cli(&["connections", "approve", "pe-b"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(eventually(2, || reaches(&bed.b)), "pe-b not back after its approval:\n{}", h2.log());
    let (code, _, err) = bed.cli(&["connections", "approve", "pe-nowhere"]);
    assert!(code != 0 && err.contains("pe-nowhere"), "{err}");

    // h1 dies: its lease expires (2 s), h2 claims the address (its share
    // is now both), and the route moves onto h2's device.
    let mut on_x = connect(&bed.a, EP, 7, Duration::from_secs(2)).expect("connection through h1");
    assert_echo(&mut on_x, b"before the crash\n");
    bed.kill9();
    assert!(eventually(15, || h2.held("orders") == 2.0), "h2 did not take h1's address:\n{}", h2.log());
    assert!(eventually(3, || route_dev(&bed.prov, &x) == "plq0"), "{x} still routed to {}", route_dev(&bed.prov, &x));
    // h2 hands out x now: a consumer address maps to one NAT address
    // (RFC 4787 paired pooling), so try a few until one maps to x.
    let mut seen = std::collections::BTreeSet::new();
    for i in 11..=18u8 {
        let src = std::net::Ipv4Addr::new(10, 1, 0, i);
        assert!(Command::new("ip")
            .args(["-n", &bed.b, "addr", "add", &format!("{src}/32"), "dev", "plb0"])
            .status()
            .is_ok_and(|s| s.success()));
        if let Some(g) = greeting_from(&bed.b, src) {
            seen.insert(nat_of(&g));
        }
    }
    assert!(seen.contains(&x) && seen.iter().all(|a| *a == x || *a == y), "NAT addresses through h2: {seen:?}");

    // h1 back (after its lease expired): h2 gives one back, h1 claims it.
    bed.start();
    assert!(eventually(10, || one_each(&bed)), "not one each again:\n{}\n{}", bed.log(), h2.log());
    assert!(h2.log().contains("NAT address given back (beyond this host's share)"), "{}", h2.log());
    let x2 = nat_of(&transfer_intact(&bed.a, 1 << 20));
    assert!(eventually(3, || route_dev(&bed.prov, &x2) == "plp0"), "{x2} routed to {}", route_dev(&bed.prov, &x2));
    // Back past its TTL, h1 ended the flow it recovered on the address it
    // lost (logged and counted), unless it got that very address back.
    assert_ne!(x2, x, "h2 gives back its highest address: h1 does not get x back");
    {
        let log = plain(&bed.log());
        assert!(
            log.contains("flows carried over (ended: no longer allowed by the configuration) flows=0 ended=1"),
            "{log}"
        );
        use std::io::{Read, Write};
        let _ = on_x.write_all(b"still there?\n");
        on_x.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        let mut b = [0u8; 16];
        assert!(!matches!(on_x.read(&mut b), Ok(n) if n > 0), "a flow on a lost address still forwards");
    }
    // (h1 deleted no route of h2's device: the other address stays h2's.)
    let other = if x2 == x { &y } else { &x };
    assert_eq!(route_dev(&bed.prov, other), "plq0");
    assert!(transfer_intact(&bed.b, 1 << 20).contains("orders"));

    // h1 frozen past its TTL (a paused VM): its lease expires and h2 takes
    // the address; thawed, h1 finds its lease gone, gives up what it held
    // and claims its share again.
    bed.signal(libc::SIGSTOP);
    let thawed = eventually(10, || h2.held("orders") == 2.0);
    bed.signal(libc::SIGCONT);
    assert!(thawed, "h2 did not take the frozen host's address:\n{}", h2.log());
    assert!(eventually(10, || bed.log().contains("the lease expired (away past lease_ttl)")), "{}", bed.log());
    assert!(eventually(10, || one_each(&bed)), "not one each after the thaw:\n{}\n{}", bed.log(), h2.log());
    assert!(transfer_intact(&bed.a, 1 << 20).contains("orders"));

    // An address taken out of the service's `nat_ips` is given back by
    // whichever host held it, at once.
    let one = orders.replace(", \"192.168.100.5\"", "");
    assert!(etcd.ctl(&["put", "/privlink/services/orders", &one]).0);
    let gone = || etcd.ctl(&["get", "/privlink/nat/orders/192.168.100.5"]).1.trim().is_empty();
    assert!(eventually(5, gone), "{}", etcd.ctl(&["get", "/privlink/nat/orders/", "--prefix"]).1);
    let given = "NAT address given back (no longer configured here)";
    assert!(plain(&bed.log()).contains(given) || plain(&h2.log()).contains(given), "{}\n{}", bed.log(), h2.log());
    // The host holding the one address left still forwards from it.
    let holder = get("/privlink/nat/orders/192.168.100.4");
    let ns = if holder == "h1" { &bed.a } else { &bed.b };
    assert_eq!(nat_of(&transfer_intact(ns, 64 << 10)), "192.168.100.4");
}

#[test]
fn a_host_with_more_endpoints_than_an_etcd_transaction_takes_starts_and_decides() {
    if !privileged() || !have("etcd") || !have("etcdctl") {
        return;
    }
    let bed = Bed::new("many", Opts::default());
    let etcd = Etcd::start(&bed.dir);
    // 150 more endpoints: more connection records than etcd's 128
    // compares per transaction.
    let more: String = (1..=150u32)
        .map(|i| {
            format!(
                "[[endpoint]]\nname = \"pe-{i}\"\nnetwork = \"vnet-a\"\nip = \"10.1.{}.{}\"\nservice = \"orders\"\n\n",
                1 + i / 200,
                1 + i % 200
            )
        })
        .collect();
    bed.write_config(&Opts::default(), &more);
    let (code, out, err) = bed.cli(&["store", "load", "--host", "h1", "--etcd", &etcd.url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("152 endpoints"), "{out}");
    std::fs::write(&bed.config, local_config(&bed, &etcd)).expect("write");
    let mut bed = bed;
    bed.start();
    let (_, keys) = etcd.ctl(&["get", "/privlink/hosts/h1/connections/", "--prefix", "--keys-only"]);
    assert_eq!(keys.lines().filter(|l| !l.is_empty()).count(), 152, "{keys}");
    assert!(transfer_intact(&bed.a, 1 << 20).contains("orders"));
    let (code, out, err) = bed.cli(&["connections", "reject", "pe-77"]);
    assert_eq!(code, 0, "{out}{err}");
    let rec = etcd.ctl(&["get", "/privlink/hosts/h1/connections/pe-77", "--print-value-only"]).1;
    assert!(rec.contains("\"state\":\"rejected\""), "{rec}");
    // A reload with all of them (a change that touches every record's
    // guard) still applies: pe-b leaves.
    assert!(etcd.ctl(&["del", "/privlink/hosts/h1/endpoints/pe-b"]).0);
    assert!(eventually(3, || !reaches(&bed.b)), "pe-b still answers:\n{}", bed.log());
    let rec = etcd.ctl(&["get", "/privlink/hosts/h1/connections/pe-b", "--print-value-only"]).1;
    assert!(rec.contains("\"state\":\"disconnected\""), "{rec}");
}

/// An IPv6 service with two NAT addresses and an IPv6 endpoint of it in
/// each tenant's network.
const SVC6: &str = r#"
[[service]]
name = "orders6"
nat_ips = ["fd00:64::4", "fd00:64::5"]
backends = ["fd00:50::10"]
ports = [{ protocol = "tcp", port = 80, backend_port = 8080 }]
visibility = ["*"]
auto_approve = ["*"]

[[endpoint]]
name = "pe6-a"
network = "vnet-a"
ip = "fd00:aa::5"
service = "orders6"

[[endpoint]]
name = "pe6-b"
network = "vnet-b"
ip = "fd00:aa::5"
service = "orders6"
"#;

/// The NAT address the IPv6 backend saw (`peer=[ADDR]:PORT`), through
/// `[fd00:aa::5]:80` from `ns`.
fn nat6_from(ns: &str) -> Option<String> {
    let ep: std::net::Ipv6Addr = "fd00:aa::5".parse().expect("addr");
    let mut s = connect(ns, ep, 80, Duration::from_secs(2)).ok()?;
    let g = line(&mut s);
    let peer = g.split_whitespace().find_map(|w| w.strip_prefix("peer=["))?;
    Some(peer.split(']').next()?.to_string())
}

#[test]
fn two_hosts_lease_an_ipv6_services_nat_addresses_and_a_survivor_takes_a_dead_hosts() {
    if !privileged() || !have("etcd") || !have("etcdctl") {
        return;
    }
    let opts = || Opts { network_extra: "address6 = \"fd00:aa::10/128\"", ..Opts::default() };
    let mut bed = Bed::new("lease6", opts());
    bed.write_config(&opts(), SVC6);
    let etcd = Etcd::start(&bed.dir);
    let (code, out, err) = bed.cli(&["store", "load", "--host", "h1", "--etcd", &etcd.url]);
    assert_eq!(code, 0, "{out}{err}");
    // vnet-b and its endpoints move to host h2.
    let get = |k: &str| etcd.ctl(&["get", k, "--print-value-only"]).1.trim_end().to_string();
    for key in ["networks/vnet-b", "endpoints/pe-b", "endpoints/pe6-b"] {
        let v = get(&format!("/privlink/hosts/h1/{key}"));
        assert!(!v.is_empty(), "{key}");
        assert!(etcd.ctl(&["put", &format!("/privlink/hosts/h2/{key}"), &v]).0);
    }
    for key in ["endpoints/pe6-b", "endpoints/pe-b", "networks/vnet-b"] {
        assert!(etcd.ctl(&["del", &format!("/privlink/hosts/h1/{key}")]).0);
    }
    let ports = privlink::testbed::BackendPorts { hello: 8080, echo: 8007, udp: 5353, bye: None };
    let _b6 = backend_at(&bed, "orders6", "fd00:50::10", ports);
    std::fs::write(&bed.config, local_config(&bed, &etcd)).expect("write");
    bed.start();
    let h2 = Host2::start(&bed, &etcd);

    // One IPv6 NAT address each, never the same one, each routed (/128)
    // to its holder's provider device.
    let one_each =
        |bed: &Bed| bed.metric("privlink_nat_ips_held", &[("service", "orders6")]) == 1.0 && h2.held("orders6") == 1.0;
    assert!(eventually(10, || one_each(&bed)), "not one each:\n{}\n{}", bed.log(), h2.log());
    let x = nat6_from(&bed.a).expect("through h1");
    let y = nat6_from(&bed.b).expect("through h2");
    assert!(x.starts_with("fd00:64::") && y.starts_with("fd00:64::") && x != y, "h1 {x}, h2 {y}");
    assert_eq!((route_dev(&bed.prov, &x), route_dev(&bed.prov, &y)), ("plp0".into(), "plq0".into()));
    let (_, keys) = etcd.ctl(&["get", "/privlink/nat/orders6/", "--prefix"]);
    assert!(keys.contains(&format!("/privlink/nat/orders6/{x}\nh1")), "{keys}");

    // h1 dies: its lease expires, h2 claims its address and the route
    // moves onto h2's device.
    bed.kill9();
    assert!(eventually(15, || h2.held("orders6") == 2.0), "h2 did not take h1's address:\n{}", h2.log());
    assert!(eventually(3, || route_dev(&bed.prov, &x) == "plq0"), "{x} still routed to {}", route_dev(&bed.prov, &x));
    assert_eq!(nat6_from(&bed.b).map(|a| a.starts_with("fd00:64::")), Some(true), "h2 still forwards");
}
