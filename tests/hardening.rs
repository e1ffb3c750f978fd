//! End-to-end tests of what a hostile tenant or a careless operator tried:
//! each runs the real daemon in its own namespaces.

mod common;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs a second `privlink run` with `config` and waits for it to give up;
/// returns its exit code and what it printed. A daemon that is still
/// running after 10 s is killed and reported as such.
fn second_daemon(config: &std::path::Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_privlink"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn privlink");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            let out = child.wait_with_output().expect("output");
            return (st.code(), String::from_utf8_lossy(&out.stderr).into_owned());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    (None, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_second_daemon_for_the_same_state_or_devices_is_refused() {
    let Some(bed) = Bed::running("second", Opts::default()) else { return };
    // The same config: its state directory is locked.
    let (code, err) = second_daemon(&bed.config);
    assert_eq!(code, Some(1), "a second daemon on the same state directory must exit 1:\n{err}");
    assert!(err.contains("in use by another privlink (pid"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    // Another state directory, control socket and metrics port, the same
    // TUN devices: refused before it touches them.
    let metrics = privlink::testbed::free_port().expect("port");
    let other = bed
        .config_text(&Opts::default(), "")
        .replace(&format!("listen = \"{}\"", bed.metrics), &format!("listen = \"{metrics}\""));
    let other = other
        .replace(&format!("{}/control.sock", bed.dir.display()), &format!("{}/control2.sock", bed.dir.display()))
        .replace(&format!("{}/state\"", bed.dir.display()), &format!("{}/state2\"", bed.dir.display()));
    let path = bed.dir.join("second.toml");
    std::fs::write(&path, other).expect("write");
    let (code, err) = second_daemon(&path);
    assert_eq!(code, Some(1), "a second daemon on live devices must exit 1:\n{err}");
    assert!(err.contains("already exists in namespace"), "{err}");

    // The first daemon still owns its devices alone and forwards.
    assert!(transfer_intact(&bed.a, 1024 * 1024).starts_with("svc=orders"));
    assert!(!bed.log().contains("panicked"));
}

/// CPU seconds (user + system) the daemon has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn a_tenant_deleting_its_device_neither_spins_nor_stays_gone() {
    let Some(bed) = Bed::running("devdel", Opts::default()) else { return };
    let pid = bed.pid();
    assert!(transfer_intact(&bed.a, 64 * 1024).starts_with("svc=orders"));
    // Tenant A deletes its own TUN device.
    let out = Command::new("ip").args(["-n", &bed.a, "link", "del", "pla0"]).output().expect("ip");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The workers notice, log once and count it, and do not spin.
    assert!(eventually(5, || bed.log().contains("device lost")), "{}", bed.log());
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(pid) - before;
    assert!(used < 0.5, "the daemon used {used:.2} s of CPU in 2 s after the device went");
    assert_eq!(bed.log().matches("device lost").count(), 1, "logged once:\n{}", bed.log());
    assert!(bed.metric("privlink_devices_lost_total", &[("device", "pla0")]) >= 1.0);
    // The other tenant is unaffected.
    assert!(transfer_intact(&bed.b, 64 * 1024).starts_with("svc=billing"));
    // The device comes back by itself (the daemon recreates it), with its
    // route, and tenant A reaches its endpoint again.
    assert!(eventually(10, || within(&bed.a, || Ok(link_exists("pla0"))).unwrap_or(false)), "{}", bed.log());
    assert!(
        eventually(10, || std::panic::catch_unwind(|| transfer_intact(&bed.a, 64 * 1024)).is_ok()),
        "{}",
        bed.log()
    );
}

#[test]
fn the_control_socket_path_holding_a_file_is_refused_and_left_alone() {
    if !privileged() {
        return;
    }
    let mut bed = Bed::new("sockfile", Opts::default());
    let path = bed.dir.join("control.sock");
    std::fs::write(&path, "operator notes").expect("write");
    let (code, err) = second_daemon(&bed.config);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).expect("still there"), "operator notes");
    // A stale socket (its daemon gone) is replaced; on stop the daemon
    // removes its own socket, mode 0600 from the start.
    std::fs::remove_file(&path).expect("rm");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    bed.start();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    bed.stop_daemon();
    assert!(!path.exists(), "the daemon removed its socket on stop");
}

/// Sends `n` UDP datagrams from tenant A to the endpoint and waits for
/// each answer.
fn udp_exchanges(ns: &str, n: usize) {
    within(ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.connect((EP, 53))?;
        let mut buf = [0u8; 512];
        for i in 0..n {
            s.send(format!("ping {i}").as_bytes())?;
            s.recv(&mut buf)?;
        }
        Ok(())
    })
    .expect("UDP exchanges through the endpoint");
}

#[test]
fn endpoint_counters_stay_monotonic_across_removal_and_return() {
    let Some(bed) = Bed::running("mono", Opts::default()) else { return };
    let packets_in = || {
        bed.metric(
            "privlink_endpoint_packets_total",
            &[("endpoint", "pe-a"), ("network", "vnet-a"), ("service", "orders"), ("direction", "in")],
        )
    };
    udp_exchanges(&bed.a, 30);
    assert_eq!(packets_in(), 30.0);
    let full = bed.config_text(&Opts::default(), "");
    let block = format!("[[endpoint]]\nname = \"pe-a\"\nnetwork = \"vnet-a\"\nip = \"{EP}\"\nservice = \"orders\"\n");
    assert!(full.contains(&block), "the pe-a block");
    std::fs::write(&bed.config, full.replace(&block, "")).expect("write");
    bed.signal(libc::SIGHUP);
    assert!(eventually(5, || bed.log().matches("configuration reloaded").count() >= 1), "{}", bed.log());
    std::fs::write(&bed.config, &full).expect("write");
    bed.signal(libc::SIGHUP);
    assert!(eventually(5, || bed.log().matches("configuration reloaded").count() >= 2), "{}", bed.log());
    udp_exchanges(&bed.a, 45);
    assert_eq!(packets_in(), 75.0, "30 before the removal, 45 after the return");
    assert!(bed.metric("privlink_service_bytes_total", &[("service", "orders"), ("direction", "in")]) > 0.0);
}

fn network_block(name: &str, tun: &str, ns: &str) -> String {
    format!("\n[[network]]\nname = \"{name}\"\ntenant = \"contoso\"\ntun = \"{tun}\"\nnetns = \"{ns}\"\naddress = \"{CLIENT}/32\"\n")
}

fn endpoint_block(name: &str, network: &str) -> String {
    format!("\n[[endpoint]]\nname = \"{name}\"\nnetwork = \"{network}\"\nip = \"{EP}\"\nservice = \"orders\"\n")
}

#[test]
fn a_reload_applies_completely_or_not_at_all() {
    let Some(bed) = Bed::running("atomic", Opts::default()) else { return };
    let c = format!("{}c", bed.prov);
    let d = format!("{}d", bed.prov);
    let ns = privlink::testbed::Namespaces::create(std::slice::from_ref(&c)).expect("namespace c");
    // Two new networks; the second's namespace does not exist.
    let more = network_block("vnet-c", "plc0", &c)
        + &network_block("vnet-d", "pld0", &d)
        + &endpoint_block("pe-c", "vnet-c")
        + &endpoint_block("pe-d", "vnet-d");
    bed.write_config(&Opts::default(), &more);
    bed.signal(libc::SIGHUP);
    assert!(eventually(10, || bed.log().contains("reload refused")), "{}", bed.log());
    // Nothing of it was applied: vnet-c has no device, and what ran goes on.
    assert!(!within(&c, || Ok(link_exists("plc0"))).expect("ns c"), "half applied:\n{}", bed.log());
    assert!(transfer_intact(&bed.a, 64 * 1024).starts_with("svc=orders"));
    // With the namespace there, the same reload applies whole.
    let ns_d = privlink::testbed::Namespaces::create(std::slice::from_ref(&d)).expect("namespace d");
    bed.signal(libc::SIGHUP);
    assert!(eventually(10, || bed.log().contains("configuration reloaded")), "{}", bed.log());
    for n in [&c, &d] {
        assert!(transfer_intact(n, 64 * 1024).starts_with("svc=orders"), "through {n}");
    }
    assert!(transfer_intact(&bed.a, 64 * 1024).starts_with("svc=orders"));
    drop((ns, ns_d));
}

/// One raw HTTP/1.1 exchange on the control socket: (status, body).
fn raw_http(socket: &std::path::Path, method: &str, target: &[u8], body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut req = Vec::new();
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(
        format!(" HTTP/1.1\r\nHost: privlink\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
            .as_bytes(),
    );
    req.extend_from_slice(body);
    let _ = s.write_all(&req);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

fn json_error(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
    v["error"].as_str().unwrap_or_else(|| panic!("no error field: {body}")).to_string()
}

#[test]
fn the_control_api_bounds_its_inputs_and_answers_every_error_as_json() {
    let Some(bed) = Bed::running("api", Opts::default()) else { return };
    let socket = bed.dir.join("control.sock");
    let audit_len = || {
        let (st, body) = raw_http(&socket, "GET", b"/v1/audit?limit=1000", b"");
        assert_eq!(st, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("json").as_array().expect("array").len()
    };
    let before = audit_len();
    // A 2 MB message is refused, and so is any body over 8 KiB.
    let big = format!("{{\"message\": \"{}\"}}", "x".repeat(2 << 20));
    let (st, body) = raw_http(&socket, "POST", b"/v1/connections/pe-a/reject", big.as_bytes());
    assert_eq!(st, 413, "{body}");
    json_error(&body);
    let long = format!("{{\"message\": \"{}\"}}", "x".repeat(2000));
    let (st, body) = raw_http(&socket, "POST", b"/v1/connections/pe-a/reject", long.as_bytes());
    assert_eq!(st, 400, "{body}");
    assert!(json_error(&body).contains("message longer than"), "{body}");
    // Approving what is approved, 50 times, writes nothing.
    for _ in 0..50 {
        let (st, body) = raw_http(&socket, "POST", b"/v1/connections/pe-a/approve", b"{\"message\": \"again\"}");
        assert_eq!(st, 200, "{body}");
    }
    assert_eq!(audit_len(), before, "no-op transitions are not audited");
    // The audit comes a page at a time.
    let (st, body) = raw_http(&socket, "GET", b"/v1/audit?limit=1", b"");
    assert_eq!(st, 200);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).expect("json").as_array().map(Vec::len), Some(1));
    // Every error is JSON.
    let long_uri = format!("/v1/flows?endpoint={}", "a".repeat(5000));
    for (method, target, want) in [
        ("GET", b"/v1/nothing-here".to_vec(), 404),
        ("DELETE", b"/v1/connections".to_vec(), 405),
        ("POST", b"/v1/connections/%FF%FE/approve".to_vec(), 400),
        ("GET", long_uri.into_bytes(), 414),
        ("POST", b"/v1/connections/pe-a/approve".to_vec(), 400),
    ] {
        let body: &[u8] = if want == 400 && target.ends_with(b"pe-a/approve") { b"{not json" } else { b"" };
        let (st, text) = raw_http(&socket, method, &target, body);
        assert_eq!(st, want, "{method} {}: {text}", String::from_utf8_lossy(&target[..40.min(target.len())]));
        json_error(&text);
    }
    // A connection that never sends a request is closed.
    let idle = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    let t = Instant::now();
    let mut buf = [0u8; 64];
    use std::io::Read;
    let n = (&idle).read(&mut buf).unwrap_or(0);
    assert!(t.elapsed() < Duration::from_secs(10), "held for {:?}", t.elapsed());
    let _ = n;
}

#[test]
fn a_reload_with_a_device_name_check_refuses_changes_nothing() {
    let Some(bed) = Bed::running("badname", Opts::default()) else { return };
    // Names `check` accepted before and a reload then half applied.
    for (from, to) in [
        ("tun = \"pla0\"", "tun = \"lo\""),
        ("tun = \"pla0\"", "tun = \"x%d\""),
        (&format!("netns = \"{}\"", bed.a)[..], "netns = \"a/../b\""),
    ] {
        let text = bed.config_text(&Opts::default(), "").replacen(from, to, 1);
        std::fs::write(&bed.config, text).expect("write");
        let refused = bed.log().matches("reload refused").count();
        bed.signal(libc::SIGHUP);
        assert!(eventually(5, || bed.log().matches("reload refused").count() > refused), "{to}:\n{}", bed.log());
        assert!(transfer_intact(&bed.a, 64 * 1024).starts_with("svc=orders"), "after {to}");
    }
    // The devices carry the noqueue qdisc (a few hundred KB of kernel
    // memory each instead of 25 MB).
    let out = Command::new("tc").args(["-n", &bed.a, "qdisc", "show", "dev", "pla0"]).output().expect("tc");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("noqueue") && !text.contains("pfifo_fast"), "{text}");
}

#[test]
fn a_reload_changing_nat_ports_under_live_flows_gives_every_port_back() {
    let opts = Opts { orders_nat_ports: "5000-5009", ..Opts::default() };
    let Some(bed) = Bed::running("natports", opts) else { return };
    let available = || bed.metric("privlink_nat_ports_available", &[("service", "orders"), ("protocol", "tcp")]);
    let capacity = || bed.metric("privlink_nat_ports_capacity", &[("service", "orders"), ("protocol", "tcp")]);
    let held: Vec<_> = (0..8).map(|_| connect(&bed.a, EP, 80, Duration::from_secs(3)).expect("connect")).collect();
    assert_eq!(available(), 2.0);
    // The range grows under the live connections.
    let opts = Opts { orders_nat_ports: "5000-5019", ..Opts::default() };
    bed.write_config(&opts, "");
    bed.signal(libc::SIGHUP);
    assert!(eventually(5, || bed.log().contains("configuration reloaded")), "{}", bed.log());
    assert_eq!(capacity(), 20.0);
    let more: Vec<_> = (0..15).map(|_| connect(&bed.a, EP, 80, Duration::from_secs(3)).expect("connect")).collect();
    drop(held);
    drop(more);
    // Closed flows linger tcp_closed_idle (1 s here), then every port is back.
    assert!(
        eventually(15, || available() == 20.0),
        "available {} of {}\n{}\n{}",
        available(),
        capacity(),
        bed.cli(&["flows", "--json"]).1,
        bed.scrape()
            .lines()
            .filter(|l| l.starts_with("privlink_packets_dropped") && !l.ends_with(" 0"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---- Per-endpoint limits and source rules. ----

#[test]
fn an_endpoint_with_max_flows_gets_that_many_and_its_neighbour_still_connects() {
    if !privileged() {
        return;
    }
    let mut bed = Bed::new("epmax", Opts::default());
    let neighbour = std::net::Ipv4Addr::new(10, 1, 0, 6);
    let text = bed.config_text(&Opts::default(), "").replace(
        &format!("name = \"pe-a\"\nnetwork = \"vnet-a\"\nip = \"{EP}\"\nservice = \"orders\"\n"),
        &format!("name = \"pe-a\"\nnetwork = \"vnet-a\"\nip = \"{EP}\"\nservice = \"orders\"\nmax_flows = 20\n\n[[endpoint]]\nname = \"pe-a2\"\nnetwork = \"vnet-a\"\nip = \"{neighbour}\"\nservice = \"orders\"\n"),
    );
    std::fs::write(&bed.config, text).expect("write");
    bed.start();
    let held: Vec<_> = (0..25).filter_map(|_| connect(&bed.a, EP, 80, Duration::from_millis(700)).ok()).collect();
    assert_eq!(held.len(), 20, "the endpoint holds 20 connections and no more");
    assert!(connect(&bed.a, neighbour, 80, Duration::from_secs(3)).is_ok(), "the neighbour still connects");
    assert_eq!(bed.metric("privlink_endpoint_nat_ports_in_use", &[("endpoint", "pe-a"), ("service", "orders")]), 20.0);
    assert!(
        bed.metric("privlink_packets_dropped_total", &[("reason", "endpoint_flow_limit"), ("network", "vnet-a")])
            >= 5.0
    );
}

#[test]
fn source_rules_admit_one_client_refuse_another_and_a_reload_ends_a_disallowed_connection() {
    if !privileged() {
        return;
    }
    let mut bed = Bed::new("allow", Opts::default());
    let other = std::net::Ipv4Addr::new(10, 1, 0, 11);
    let base = bed.config_text(&Opts::default(), "");
    let with_rule = |prefix: &str| {
        base.replace(
            &format!("name = \"pe-a\"\nnetwork = \"vnet-a\"\nip = \"{EP}\"\nservice = \"orders\"\n"),
            &format!("name = \"pe-a\"\nnetwork = \"vnet-a\"\nip = \"{EP}\"\nservice = \"orders\"\nallow_sources = [\"{prefix}\"]\n"),
        )
    };
    std::fs::write(&bed.config, with_rule(&format!("{CLIENT}/32"))).expect("write");
    bed.start();
    // A second client address in the same consumer network.
    let out = Command::new("ip")
        .args(["-n", &bed.a, "addr", "add", &format!("{other}/32"), "dev", "pla0"])
        .output()
        .expect("ip");
    assert!(out.status.success());
    let from = |addr: std::net::Ipv4Addr| {
        within(&bed.a, move || {
            use socket2::{Domain, Socket, Type};
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.bind(&std::net::SocketAddr::from((addr, 0)).into())?;
            s.connect_timeout(&std::net::SocketAddr::from((EP, 7)).into(), Duration::from_millis(1500))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(std::net::TcpStream::from(s))
        })
    };
    let mut allowed = from(CLIENT).expect("the allowed client connects");
    assert!(from(other).is_err(), "the other client is refused");
    assert!(
        bed.metric("privlink_packets_dropped_total", &[("reason", "source_not_allowed"), ("network", "vnet-a")]) >= 1.0
    );
    use std::io::{Read, Write};
    let echo = |s: &mut std::net::TcpStream| -> bool {
        let mut b = [0u8; 4];
        s.write_all(b"ping").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"ping"
    };
    assert!(echo(&mut allowed), "echo through the allowed connection");
    // The reload moves the rule to the other client: the live connection ends.
    std::fs::write(&bed.config, with_rule(&format!("{other}/32"))).expect("write");
    bed.signal(libc::SIGHUP);
    assert!(eventually(5, || bed.log().contains("configuration reloaded")), "{}", bed.log());
    assert!(!echo(&mut allowed), "the disallowed connection no longer carries anything");
    assert!(from(other).is_ok(), "the newly allowed client connects");
}

// ---- Backend health. ----

const DUO_EP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 1, 0, 7);

/// A service `duo` over both test backends, with `health`, and its endpoint
/// in vnet-a at DUO_EP.
fn duo(health: &str) -> String {
    format!(
        "\n[[service]]\nname = \"duo\"\nnat_ips = [\"192.168.100.12\"]\nbackends = [\"{BACKEND_ORDERS}\", \"{BACKEND_BILLING}\"]\n\
         ports = [{{ protocol = \"tcp\", port = 80, backend_port = 8080 }}, {{ protocol = \"udp\", port = 53, backend_port = 5353 }}]\n\
         visibility = [\"*\"]\nauto_approve = [\"*\"]\nhealth = {health}\n\
         \n[[endpoint]]\nname = \"pe-duo\"\nnetwork = \"vnet-a\"\nip = \"{DUO_EP}\"\nservice = \"duo\"\n"
    )
}

/// Which backends `n` new connections to DUO_EP reached (by their greeting).
fn spread(bed: &Bed, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for _ in 0..n {
        let mut s = connect(&bed.a, DUO_EP, 80, Duration::from_secs(3)).expect("connect");
        let greeting = line(&mut s);
        let svc = greeting.split_whitespace().next().unwrap_or("").to_string();
        *m.entry(svc).or_default() += 1;
    }
    m
}

fn backend_up(bed: &Bed, backend: std::net::Ipv4Addr) -> f64 {
    bed.metric("privlink_backend_up", &[("service", "duo"), ("backend", &backend.to_string())])
}

#[test]
fn a_dead_backend_leaves_new_flows_within_its_probe_budget_and_comes_back() {
    if !privileged() {
        return;
    }
    let mut bed = Bed::new("health", Opts::default());
    // interval 200 ms, down after 3 failures, up after 2 successes.
    let health = "{ protocol = \"tcp\", port = 8080, interval = \"200ms\", timeout = \"100ms\", healthy_after = 2, unhealthy_after = 3 }";
    bed.write_config(&Opts::default(), &duo(health));
    bed.start();
    let both = spread(&bed, 100);
    assert_eq!(both.len(), 2, "both backends take new connections: {both:?}");
    // A connection held on the backend that survives.
    let mut held = connect(&bed.a, DUO_EP, 80, Duration::from_secs(3)).expect("connect");
    while !line(&mut held).starts_with("svc=billing") {
        held = connect(&bed.a, DUO_EP, 80, Duration::from_secs(3)).expect("connect");
    }
    // Stop one backend: within interval x unhealthy_after + interval it is out.
    bed.stop_backend(BACKEND_ORDERS);
    let t = Instant::now();
    assert!(eventually(3, || backend_up(&bed, BACKEND_ORDERS) == 0.0), "backend_up never fell");
    assert!(t.elapsed() <= Duration::from_millis(800 + 300 + 500), "took {:?}", t.elapsed());
    assert_eq!(spread(&bed, 100).get("svc=billing"), Some(&100), "every new connection reaches the survivor");
    // Back: after healthy_after probes it takes new flows again.
    bed.start_backend(BACKEND_ORDERS);
    assert!(eventually(3, || backend_up(&bed, BACKEND_ORDERS) == 1.0), "backend_up never rose");
    assert_eq!(spread(&bed, 100).len(), 2, "the restarted backend gets new connections again");
    // Both down: a new connection is refused at once, not left to time out.
    bed.stop_backend(BACKEND_ORDERS);
    bed.stop_backend(BACKEND_BILLING);
    assert!(eventually(3, || backend_up(&bed, BACKEND_BILLING) == 0.0 && backend_up(&bed, BACKEND_ORDERS) == 0.0));
    let t = Instant::now();
    let err = connect(&bed.a, DUO_EP, 80, Duration::from_secs(3)).expect_err("refused");
    assert!(t.elapsed() < Duration::from_millis(100), "refused in {:?} ({err})", t.elapsed());
    assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
    assert!(
        bed.metric("privlink_packets_dropped_total", &[("reason", "no_healthy_backend"), ("network", "vnet-a")]) >= 1.0
    );
    // The held connection on the (now stopped) survivor was untouched all along.
    use std::io::Write;
    held.write_all(b"hello").expect("write");
    held.shutdown(std::net::Shutdown::Write).expect("shutdown");
    assert!(line(&mut held).starts_with("len=5 "), "the held connection still works");
    // privlink status shows it too.
    let (code, out, _) = bed.cli(&["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("duo") && out.contains("down"), "{out}");
}

/// An HTTP server on `addr:8090` in the provider namespace answering
/// `/healthz` with the status in `code`.
fn http_health(ns: &str, addr: std::net::Ipv4Addr, code: std::sync::Arc<std::sync::atomic::AtomicU16>) {
    let l = within(ns, move || Ok(std::net::TcpListener::bind((addr, 8090))?)).expect("bind");
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for c in l.incoming().flatten() {
            let mut c = c;
            let mut buf = [0u8; 512];
            let _ = c.read(&mut buf);
            let status = code.load(std::sync::atomic::Ordering::Relaxed);
            let _ = c.write_all(format!("HTTP/1.0 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes());
        }
    });
}

#[test]
fn an_http_probe_answering_500_takes_its_backend_out() {
    if !privileged() {
        return;
    }
    let mut bed = Bed::new("httphealth", Opts::default());
    let health = "{ protocol = \"http\", port = 8090, path = \"/healthz\", interval = \"200ms\", timeout = \"100ms\", healthy_after = 2, unhealthy_after = 3 }";
    bed.write_config(&Opts::default(), &duo(health));
    use std::sync::atomic::{AtomicU16, Ordering};
    let orders = std::sync::Arc::new(AtomicU16::new(200));
    http_health(&bed.prov, BACKEND_ORDERS, orders.clone());
    http_health(&bed.prov, BACKEND_BILLING, std::sync::Arc::new(AtomicU16::new(204)));
    bed.start();
    assert!(eventually(3, || backend_up(&bed, BACKEND_ORDERS) == 1.0 && backend_up(&bed, BACKEND_BILLING) == 1.0));
    assert_eq!(spread(&bed, 60).len(), 2);
    orders.store(500, Ordering::Relaxed);
    assert!(eventually(3, || backend_up(&bed, BACKEND_ORDERS) == 0.0), "a 500 takes the backend out");
    assert_eq!(spread(&bed, 60).get("svc=billing"), Some(&60));
    orders.store(200, Ordering::Relaxed);
    assert!(eventually(3, || backend_up(&bed, BACKEND_ORDERS) == 1.0), "a 200 brings it back");
    assert!(
        bed.metric(
            "privlink_backend_flows_created_total",
            &[("service", "duo"), ("backend", &BACKEND_ORDERS.to_string())]
        ) >= 1.0
    );
}
