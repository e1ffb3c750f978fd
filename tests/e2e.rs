//! End-to-end tests: real TUN devices made by the real `privlink` binary in
//! namespaces built per test, real TCP and UDP traffic through them.

mod common;

use common::*;
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

const SEC: Duration = Duration::from_secs(1);

#[test]
fn tcp_20mb_intact_udp_round_trip_and_byte_counters() {
    let Some(bed) = Bed::running("xfer", Opts::default()) else { return };

    let sent = 20 * 1024 * 1024;
    let greeting = transfer_intact(&bed.a, sent);
    assert!(greeting.starts_with(&format!("svc=orders peer={NAT_ORDERS}:")), "{greeting}");

    let answer = udp_ask(&bed.a, EP, 53, "hello").expect("UDP answer");
    assert!(
        answer.starts_with(&format!("svc=orders peer={NAT_ORDERS}:")) && answer.ends_with("data=hello"),
        "{answer}"
    );

    // Endpoint byte counters: the payload plus IP/TCP headers, no more.
    let l = [("endpoint", "pe-a"), ("direction", "in")];
    let bytes_in = bed.metric("privlink_endpoint_bytes_total", &l);
    let packets_in = bed.metric("privlink_endpoint_packets_total", &l);
    let payload = f64::from(sent) + 5.0;
    assert!(bytes_in >= payload, "bytes in {bytes_in} < payload {payload}");
    assert!(bytes_in <= payload + packets_in * 60.0, "bytes in {bytes_in}, {packets_in} packets");
    let bytes_out = bed.metric("privlink_endpoint_bytes_total", &[("endpoint", "pe-a"), ("direction", "out")]);
    assert!(bytes_out > 0.0 && bytes_out < 2_000_000.0, "out {bytes_out}");
    assert_eq!(bed.metric("privlink_endpoint_flows_created_total", &[("endpoint", "pe-a")]), 2.0);
    // One scrape for both: a late ACK of the transfer may land between two.
    let one = bed.scrape();
    assert_eq!(
        metric(&one, "privlink_service_bytes_total", &[("service", "orders"), ("direction", "in")]),
        metric(&one, "privlink_endpoint_bytes_total", &l)
    );
    assert_eq!(bed.metric("privlink_endpoint_bytes_total", &[("endpoint", "pe-b"), ("direction", "in")]), 0.0);
    let text = bed.scrape();
    assert!(text.contains("# HELP privlink_endpoint_bytes_total"), "HELP text");
    // What identifies the build, and the process metrics client libraries export.
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(bed.metric("privlink_build_info", &[("version", version)]), 1.0, "{text}");
    assert!(text.contains("# HELP privlink_build_info"));
    // (A counter of whole seconds in the metrics crate: 0 this early.)
    assert!(text.contains("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total "), "cpu seconds");
    assert!(bed.metric("process_resident_memory_bytes", &[]) > 1e6, "resident memory");
    assert!(bed.metric("process_open_fds", &[]) >= 10.0, "open files (TUN queues among them)");
}

#[test]
fn integrity_without_offloads_too() {
    let Some(bed) = Bed::running("nooff", Opts { offload: false, ..Opts::default() }) else { return };
    assert!(transfer_intact(&bed.a, 5 * 1024 * 1024).starts_with("svc=orders"));
    let answer = udp_ask(&bed.a, EP, 53, "plain").expect("UDP answer");
    assert!(answer.ends_with("data=plain"), "{answer}");
}

#[test]
fn overlapping_tenants_reach_only_their_own_service() {
    let Some(bed) = Bed::running("tenants", Opts::default()) else { return };
    let mut a = connect(&bed.a, EP, 80, 3 * SEC).expect("tenant a");
    let mut b = connect(&bed.b, EP, 80, 3 * SEC).expect("tenant b");
    let (ga, gb) = (line(&mut a), line(&mut b));
    // Same client address, same endpoint address, different services; each
    // backend sees its service's NAT IP, never the consumer's address.
    assert!(ga.starts_with(&format!("svc=orders peer={NAT_ORDERS}:")), "{ga}");
    assert!(gb.starts_with(&format!("svc=billing peer={NAT_BILLING}:")), "{gb}");
    let ua = udp_ask(&bed.a, EP, 53, "a").expect("udp a");
    let ub = udp_ask(&bed.b, EP, 53, "b").expect("udp b");
    assert!(ua.starts_with("svc=orders") && ua.ends_with("data=a"), "{ua}");
    assert!(ub.starts_with("svc=billing") && ub.ends_with("data=b"), "{ub}");
}

#[test]
fn isolation_drops_and_counts_everything_else() {
    let Some(bed) = Bed::running("iso", Opts::default()) else { return };
    let drops =
        |reason: &str, net: &str| bed.metric("privlink_packets_dropped_total", &[("reason", reason), ("network", net)]);

    // A port the service does not offer.
    assert!(connect(&bed.a, EP, 81, SEC).is_err(), "port 81 is not offered");
    assert!(drops("port_not_allowed", "vnet-a") >= 1.0);

    // An address that is no endpoint, pushed into the TUN by a broad route.
    privlink::netns::ip(Some(&bed.a), &["route", "add", "10.1.0.0/24", "dev", "pla0"]).expect("route");
    assert!(connect(&bed.a, "10.1.0.99".parse::<std::net::Ipv4Addr>().expect("ip"), 80, SEC).is_err());
    assert!(drops("no_endpoint", "vnet-a") >= 1.0);
    // Nor can a tenant reach the provider's addresses directly.
    privlink::netns::ip(Some(&bed.a), &["route", "add", "192.168.0.0/16", "dev", "pla0"]).expect("route");
    assert!(connect(&bed.a, BACKEND_ORDERS, 8080, SEC).is_err());
    assert!(drops("no_endpoint", "vnet-a") >= 2.0);

    // Spoofed provider-side packets that match no flow.
    let before = drops("no_flow", "provider");
    within(&bed.prov, || {
        let s = std::net::UdpSocket::bind((BACKEND_ORDERS, 5353 + 1))?;
        for port in [1024u16, 2000, 40000] {
            s.send_to(b"spoof", (NAT_ORDERS, port))?;
        }
        Ok(())
    })
    .expect("spoof");
    assert!(eventually(5, || drops("no_flow", "provider") >= before + 3.0), "no_flow counted");
    // Nothing reached tenant A's namespace: its endpoint counters are clean.
    assert_eq!(bed.metric("privlink_endpoint_packets_total", &[("endpoint", "pe-a"), ("direction", "out")]), 0.0);
}

#[test]
fn nat_port_pool_exhausts_and_recovers() {
    let Some(bed) = Bed::running("pool", Opts { orders_nat_ports: "2000-2009", ..Opts::default() }) else { return };
    let avail = |svc: &str| bed.metric("privlink_nat_ports_available", &[("service", svc), ("protocol", "tcp")]);
    assert_eq!(avail("orders"), 10.0);
    assert_eq!(bed.metric("privlink_nat_ports_capacity", &[("service", "orders"), ("protocol", "tcp")]), 10.0);

    let mut held = Vec::new();
    for i in 0..10 {
        let mut s = connect(&bed.a, EP, 80, 3 * SEC).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert!(line(&mut s).starts_with("svc=orders"));
        held.push(s);
    }
    assert_eq!(avail("orders"), 0.0);
    let eleventh = connect(&bed.a, EP, 80, 2 * SEC);
    assert!(eleventh.is_err(), "the 11th connection must fail");
    assert!(bed.metric("privlink_nat_port_exhausted_total", &[("service", "orders"), ("protocol", "tcp")]) >= 1.0);
    assert!(
        bed.metric("privlink_packets_dropped_total", &[("reason", "ports_exhausted"), ("network", "vnet-a")]) >= 1.0
    );

    // The other endpoint is unaffected while A's pool is empty.
    let mut b = connect(&bed.b, EP, 80, 3 * SEC).expect("tenant b still works");
    assert!(line(&mut b).starts_with("svc=billing"));
    assert_eq!(avail("billing"), 64511.0);

    drop(held);
    assert!(eventually(10, || avail("orders") == 10.0), "ports come back after close: {}", avail("orders"));
    let mut again = connect(&bed.a, EP, 80, 3 * SEC).expect("a new connection after recovery");
    assert!(line(&mut again).starts_with("svc=orders"));
}

#[test]
fn a_client_port_reused_after_the_backend_closed_first_keeps_its_nat_port() {
    // The backend closes first and keeps (NAT IP, NAT port, backend, port)
    // in TIME_WAIT; Linux takes a new SYN on that 4-tuple only with a newer
    // TCP timestamp, which holds for the same client 4-tuple (its timestamp
    // offset is derived from the 4-tuple) but not for another one. So the
    // closed flow lingers and a SYN from the same client port reopens it on
    // the same NAT port.
    let Some(bed) = Bed::running("reuse", Opts { tcp_closed_idle: 30, ..Opts::default() }) else { return };
    let peer_port = |greeting: &str| greeting.rsplit(':').next().unwrap_or_default().to_string();
    let mut first = connect_from(&bed.a, 41000, EP, 88).expect("first connection");
    let g1 = line(&mut first);
    assert!(g1.starts_with(&format!("svc=orders peer={NAT_ORDERS}:")), "{g1}");
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).expect("the backend closes first");
    drop(first);
    let closed = || {
        let out = bed.cli(&["flows", "--json"]).1;
        let flows: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        flows.as_array().is_some_and(|f| f.len() == 1 && f[0]["state"] == "closed")
    };
    assert!(eventually(5, closed), "the flow is closed: {}", bed.cli(&["flows", "--json"]).1);
    std::thread::sleep(2 * SEC); // past the 1 s closed-flow linger of before
    let mut second = connect_from(&bed.a, 41000, EP, 88).expect("second connection from the same port");
    let g2 = line(&mut second);
    assert_eq!(peer_port(&g2), peer_port(&g1), "same NAT port: {g1} / {g2}");
    let out = Command::new("ip")
        .args(["netns", "exec", &bed.prov, "nstat", "-az", "TcpExtPAWSTimewait"])
        .output()
        .expect("nstat (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let refused = text.lines().find(|l| l.starts_with("TcpExtPAWSTimewait")).and_then(|l| l.split_whitespace().nth(1));
    assert_eq!(refused, Some("0"), "the backend refused no SYN on a TIME_WAIT 4-tuple: {text}");
}

#[test]
fn reload_adds_an_endpoint_without_disturbing_live_flows() {
    let Some(mut bed) = Bed::running("reload", Opts::default()) else { return };
    let mut held = connect(&bed.a, EP, 7, 3 * SEC).expect("echo connection");
    held.write_all(b"before\n").expect("write");
    assert_eq!(line(&mut held), "before");

    let added = "\n[[endpoint]]\nname = \"pe-a2\"\nnetwork = \"vnet-a\"\nip = \"10.1.0.6\"\nservice = \"billing\"\n";
    bed.write_config(&Opts::default(), added);
    bed.signal(libc::SIGHUP);
    let new_ep: std::net::Ipv4Addr = "10.1.0.6".parse().expect("ip");
    assert!(
        eventually(10, || connect(&bed.a, new_ep, 80, SEC)
            .map(|mut s| line(&mut s).starts_with("svc=billing"))
            .unwrap_or(false)),
        "the new endpoint answers"
    );
    held.write_all(b"after\n").expect("write after reload");
    assert_eq!(line(&mut held), "after", "the held connection survived the reload");

    // A broken config is refused and the running one stays.
    std::fs::write(&bed.config, "[provider\n").expect("write");
    bed.signal(libc::SIGHUP);
    assert!(eventually(5, || bed.log().contains("reload refused")), "refusal is logged");
    held.write_all(b"still\n").expect("write");
    assert_eq!(line(&mut held), "still");

    // Removing an endpoint ends its flows and frees their ports.
    bed.write_config(&Opts::default(), "");
    let mut to_b2 = connect(&bed.a, new_ep, 7, 3 * SEC).expect("connect to pe-a2");
    to_b2.write_all(b"x\n").expect("write");
    assert_eq!(line(&mut to_b2), "x");
    assert!(bed.metric("privlink_endpoint_flows_active", &[("endpoint", "pe-a2")]) >= 1.0);
    assert_eq!(bed.metric("privlink_connection_state", &[("endpoint", "pe-a2"), ("state", "approved")]), 1.0);
    bed.signal(libc::SIGHUP);
    assert!(eventually(10, || bed.log().matches("configuration reloaded").count() >= 2));
    assert_eq!(bed.metric("privlink_endpoint_flows_active", &[("endpoint", "pe-a2")]), 0.0);
    assert_eq!(bed.metric("privlink_connection_state", &[("endpoint", "pe-a2"), ("state", "disconnected")]), 1.0);
    assert_eq!(bed.metric("privlink_connection_state", &[("endpoint", "pe-a2"), ("state", "approved")]), 0.0);
    to_b2.set_read_timeout(Some(SEC)).expect("timeout");
    let _ = to_b2.write_all(b"y\n");
    let mut buf = [0u8; 8];
    assert!(!matches!(to_b2.read(&mut buf), Ok(n) if n > 0), "removed endpoint no longer carries traffic");
    held.write_all(b"end\n").expect("write");
    assert_eq!(line(&mut held), "end");

    // SIGTERM: clean and quick, devices gone.
    let took = bed.stop_daemon();
    assert!(took < Duration::from_secs(2), "stop took {took:?}");
    let out = Command::new("ip").args(["-n", &bed.a, "link", "show", "pla0"]).output().expect("ip");
    assert!(!out.status.success(), "pla0 removed on stop");
}

#[test]
fn check_reports_positions_and_exit_codes() {
    let dir = std::env::temp_dir().join(format!("plcheck{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[provider]\ntun = \"plp0\"\n\n[[endpoint]]\nname = \"e\"\nnetwork = \"nowhere\"\nip = \"10.0.0.1\"\nservice = \"s\"\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_privlink")).args(["check", "--config"]).arg(&bad).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let f = bad.display();
    assert!(err.contains(&format!("{f}:6:11: unknown network `nowhere`")), "{err}");
    assert!(err.contains(&format!("{f}:8:11: unknown service `s`")), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let good = dir.join("good.toml");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/example.toml"), &good).expect("copy example");
    let out =
        Command::new(env!("CARGO_BIN_EXE_privlink")).args(["check", "--config"]).arg(&good).output().expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    let out = Command::new(env!("CARGO_BIN_EXE_privlink"))
        .args(["check", "--config", "/nonexistent/privlink.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}
