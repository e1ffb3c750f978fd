//! Zero downtime: hand-overs, SIGKILL and restarts under live traffic, with
//! the real daemon, real persistent TUN devices and real TCP and UDP in
//! namespaces (docs/OPERATIONS.md).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SEC: Duration = Duration::from_secs(1);
const BULK_EP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 7);

/// A service for iperf3 (port 5201 on the orders backend's address).
const BULK: &str = r#"
[[service]]
name = "bulk"
nat_ips = ["192.168.100.12"]
backends = ["192.168.50.10"]
ports = [{ protocol = "tcp", port = 5201, backend_port = 5201 }]
visibility = ["*"]
auto_approve = ["*"]

[[endpoint]]
name = "pe-bulk"
network = "vnet-a"
ip = "10.1.0.7"
service = "bulk"
"#;

/// `n` echo connections through pe-a, each checked once.
fn hold(ns: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = connect(ns, EP, 7, 3 * SEC).expect("echo connection");
            s.write_all(format!("hello {i}\n").as_bytes()).expect("write");
            assert_eq!(line(&mut s), format!("hello {i}"));
            s
        })
        .collect()
}

/// Every held connection still echoes (no reset, no loss).
fn all_answer(held: &mut [TcpStream], round: &str) {
    for (i, s) in held.iter_mut().enumerate() {
        let msg = format!("{round} {i}");
        s.write_all(format!("{msg}\n").as_bytes()).unwrap_or_else(|e| panic!("held connection {i} ({round}): {e}"));
        assert_eq!(line(s), msg, "held connection {i} after {round}");
    }
}

/// A UDP stream at a fixed rate through pe-a's DNS port, echoed by the
/// backend: counts what came back and the longest silence.
struct UdpStream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    arrivals: Arc<Mutex<Vec<(u64, Instant)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl UdpStream {
    fn start(ns: &str, every: Duration) -> UdpStream {
        let sock: UdpSocket = within(ns, || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect((EP, 53))?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            Ok(s)
        })
        .expect("udp socket");
        let rx = sock.try_clone().expect("clone");
        let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let arrivals: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
        let mut threads = Vec::new();
        let (st, se) = (stop.clone(), sent.clone());
        threads.push(std::thread::spawn(move || {
            let start = Instant::now();
            let mut seq = 0u64;
            while !st.load(Ordering::Relaxed) {
                let _ = sock.send(format!("seq={seq}").as_bytes());
                seq += 1;
                se.store(seq, Ordering::Relaxed);
                let next = start + every * (seq as u32);
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        }));
        let (st, ar) = (stop.clone(), Arc::clone(&arrivals));
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let mut quiet = 0;
            // After the sender stops, wait a little for the last answers.
            while quiet < 3 {
                match rx.recv(&mut buf) {
                    Ok(n) => {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        if let Some(seq) = text.rsplit("seq=").next().and_then(|s| s.trim().parse().ok()) {
                            ar.lock().expect("arrivals").push((seq, Instant::now()));
                        }
                    }
                    Err(_) if st.load(Ordering::Relaxed) => quiet += 1,
                    Err(_) => {}
                }
            }
        }));
        UdpStream { stop, sent, arrivals, threads }
    }

    /// (sent, received, longest gap between answers).
    fn finish(self) -> (u64, u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let a = self.arrivals.lock().expect("arrivals");
        let mut seen: Vec<u64> = a.iter().map(|x| x.0).collect();
        seen.sort_unstable();
        seen.dedup();
        let gap = a.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap_or_default();
        (self.sent.load(Ordering::Relaxed), seen.len() as u64, gap)
    }
}

fn tcp_ports_available(bed: &Bed) -> f64 {
    bed.metric("privlink_nat_ports_available", &[("service", "orders"), ("protocol", "tcp")])
}

/// The longest "first packet" delay the daemons logged (ms since start).
fn first_packet_ms(log: &str) -> Vec<u64> {
    // Without the colour codes the human log format puts around fields.
    let mut plain = String::with_capacity(log.len());
    let mut in_esc = false;
    for c in log.chars() {
        match (in_esc, c) {
            (false, '\x1b') => in_esc = true,
            (true, 'm') => in_esc = false,
            (false, c) => plain.push(c),
            _ => {}
        }
    }
    plain
        .lines()
        .filter(|l| l.contains("first packet"))
        .filter_map(|l| l.split("since_start_ms=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn five_hand_overs_under_iperf3_held_connections_and_a_udp_stream() {
    let opts = Opts { extra: BULK, ..Opts::default() };
    let Some(mut bed) = Bed::running("hand", opts) else { return };
    let server = Command::new("ip")
        .args(["netns", "exec", &bed.prov, "iperf3", "-s", "-1", "-B", "192.168.50.10", "-p", "5201"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server (apt-get install iperf3)");
    std::thread::sleep(Duration::from_millis(300));
    let client = Command::new("ip")
        .args(["netns", "exec", &bed.a, "iperf3", "-c", &BULK_EP.to_string(), "-p", "5201", "-t", "60", "-b", "300M"])
        .arg("-J")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("iperf3 client");
    let mut held = hold(&bed.a, 100);
    let udp = UdpStream::start(&bed.a, Duration::from_millis(1));
    std::thread::sleep(3 * SEC);
    let ports = tcp_ports_available(&bed);
    let mut took = Vec::new();
    for round in 0..5 {
        let t = Instant::now();
        bed.take_over();
        took.push(t.elapsed());
        all_answer(&mut held, &format!("hand-over {round}"));
        assert_eq!(tcp_ports_available(&bed), ports, "NAT ports after hand-over {round}");
        std::thread::sleep(8 * SEC);
    }
    let out = client.wait_with_output().expect("iperf3 client result");
    let mut server = server;
    let _ = server.wait();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    assert!(out.status.success() && report.get("error").is_none(), "iperf3 failed: {report}");
    let received = report["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let sent = report["end"]["sum_sent"]["bytes"].as_f64().unwrap_or(0.0);
    assert!(received > 1e9 && received == sent, "iperf3 sent {sent} received {received}");
    let (usent, urecv, gap) = udp.finish();
    all_answer(&mut held, "the end");
    let lost = usent - urecv;
    let log = bed.log();
    let firsts = first_packet_ms(&log);
    eprintln!(
        "hand-overs: {took:?}; iperf3 {:.0} MB, {} retransmits; UDP sent {usent}, lost {lost} ({:.3} %), longest gap {} ms; first packet after start (ms): {firsts:?}",
        received / 1e6,
        report["end"]["sum_sent"]["retransmits"],
        lost as f64 * 100.0 / usent as f64,
        gap.as_millis()
    );
    assert!(lost * 1000 < usent, "UDP lost {lost} of {usent} (over 0.1 %)");
    assert_eq!(tcp_ports_available(&bed), ports);
    assert_eq!(log.matches("hand-over complete").count(), 5, "{log}");

    // A clean stop after all that leaves nothing behind.
    let run_dir = privlink::state::RunDir::for_state_dir(&bed.dir.join("state")).expect("run dir");
    bed.stop_daemon();
    assert!(!run_dir.flows_path().exists(), "flow table removed on a clean stop");
    for (ns, dev) in [(&bed.a, "pla0"), (&bed.b, "plb0"), (&bed.prov, "plp0")] {
        let d = dev.to_string();
        assert!(!within(ns, move || Ok(link_exists(&d))).expect("netns"), "{dev} removed on a clean stop");
    }
}

#[test]
fn sigusr2_starts_a_successor_that_takes_over() {
    let Some(bed) = Bed::running("usr2", Opts::default()) else { return };
    let mut held = hold(&bed.a, 5);
    let old = bed.pid();
    bed.signal(libc::SIGUSR2);
    assert!(eventually(20, || bed.log().contains("hand-over complete")), "{}", bed.log());
    // The old daemon exits; the new one holds the state lock and serves.
    assert!(eventually(10, || std::fs::read_to_string(bed.dir.join("state/privlink.lock"))
        .is_ok_and(|p| p.trim().parse::<u32>().is_ok_and(|p| p != old))));
    let new: i32 =
        std::fs::read_to_string(bed.dir.join("state/privlink.lock")).expect("lock").trim().parse().expect("pid");
    assert!(eventually(10, || bed.scrape_ok()));
    all_answer(&mut held, "after SIGUSR2");
    // The successor is not our child: stop it by its pid.
    // SAFETY: kill(2) on the successor's pid read from its lock file.
    unsafe { libc::kill(new, libc::SIGTERM) };
    assert!(eventually(10, || !std::path::Path::new(&format!("/proc/{new}")).exists()));
}

/// Sends `bytes` to the hashing port in paced chunks (about `secs` seconds
/// in all) and checks what the backend got.
fn paced_transfer(ns: &str, bytes: usize, secs: f64) -> std::thread::JoinHandle<Result<(), String>> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let data: Vec<u8> = (0..bytes as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let want = format!("len={} fnv={:x}", data.len(), fnv(&data, FNV_INIT));
        let mut s = connect(&ns, EP, 80, 3 * SEC).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let _ = line(&mut s);
        let chunks = 200;
        let pause = Duration::from_secs_f64(secs / chunks as f64);
        for c in data.chunks(bytes.div_ceil(chunks)) {
            s.write_all(c).map_err(|e| format!("send: {e}"))?;
            std::thread::sleep(pause);
        }
        s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
        let got = line(&mut s);
        if got == want {
            Ok(())
        } else {
            Err(format!("backend got `{got}`, want `{want}`"))
        }
    })
}

#[test]
fn sigkill_and_restart_keep_connections_transfers_and_approvals() {
    let opts = Opts { orders_auto_approve: "[]", ..Opts::default() };
    let Some(mut bed) = Bed::running("crash", opts) else { return };
    let (code, _, err) = bed.cli(&["connections", "approve", "pe-a"]);
    assert_eq!(code, 0, "{err}");
    let mut held = hold(&bed.a, 20);
    let udp = UdpStream::start(&bed.a, Duration::from_millis(2));
    let xfer = paced_transfer(&bed.a, 20 << 20, 4.0);
    std::thread::sleep(SEC);
    let before = bed.cli(&["connections", "--json"]).1;
    let t = Instant::now();
    bed.kill9();
    bed.start();
    let restart = t.elapsed();
    assert!(bed.log().contains("flow table taken over"), "{}", bed.log());
    xfer.join().expect("transfer thread").expect("20 MB across the crash arrive intact");
    all_answer(&mut held, "the crash");
    let (usent, urecv, gap) = udp.finish();
    let after = bed.cli(&["connections", "--json"]).1;
    let states = |t: &str| -> Vec<(String, String)> {
        let v: serde_json::Value = serde_json::from_str(t).unwrap_or_default();
        v.as_array()
            .map(|a| a.iter().map(|c| (c["endpoint"].to_string(), c["state"].to_string())).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert!(!states(&before).is_empty(), "{before}");
    assert_eq!(states(&before), states(&after), "approval states survive the crash");
    assert!(bed.metric("privlink_connection_state", &[("endpoint", "pe-a"), ("state", "approved")]) == 1.0);
    eprintln!(
        "kill -9 to serving again: {} ms; UDP sent {usent}, answered {urecv}, longest gap {} ms; first packet (ms since start): {:?}",
        restart.as_millis(),
        gap.as_millis(),
        first_packet_ms(&bed.log())
    );
}

#[test]
fn a_garbage_or_truncated_state_file_is_set_aside_and_the_daemon_starts_empty() {
    let Some(mut bed) = Bed::running("garbage", Opts::default()) else { return };
    let flows = privlink::state::RunDir::for_state_dir(&bed.dir.join("state")).expect("run dir").flows_path();
    for (round, damage) in ["garbage", "truncated"].iter().enumerate() {
        let mut held = connect(&bed.a, EP, 7, 3 * SEC).expect("echo connection");
        held.write_all(b"x\n").expect("write");
        assert_eq!(line(&mut held), "x");
        bed.kill9();
        let len = std::fs::metadata(&flows).expect("the table outlives the daemon").len() as usize;
        match *damage {
            "garbage" => {
                let junk: Vec<u8> = (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1]).collect();
                std::fs::write(&flows, junk).expect("overwrite");
            }
            _ => std::fs::OpenOptions::new().write(true).open(&flows).and_then(|f| f.set_len(100)).expect("truncate"),
        }
        bed.start();
        let log = bed.log();
        assert_eq!(log.matches("set aside").count(), round + 1, "{log}");
        assert!(!log.contains("flows carried over"), "nothing from the bad file is used: {log}");
        // The old connection's flow is gone: its data goes nowhere.
        held.set_read_timeout(Some(SEC)).expect("timeout");
        let _ = held.write_all(b"y\n");
        let mut b = [0u8; 4];
        assert!(!matches!(held.read(&mut b), Ok(n) if n > 0), "a flow from the set-aside table forwarded");
        // New flows work.
        assert!(transfer_intact(&bed.a, 1 << 20).starts_with("svc=orders"));
    }
}

#[test]
fn a_restart_with_another_worker_count_keeps_the_flows() {
    let Some(mut bed) = Bed::running("workers", Opts::default()) else { return };
    let mut held = hold(&bed.a, 10);
    bed.kill9();
    let text = std::fs::read_to_string(&bed.config).expect("config").replace("workers = 2", "workers = 1");
    std::fs::write(&bed.config, text).expect("config");
    bed.start();
    all_answer(&mut held, "one worker");
    // And back to two, by a hand-over this time.
    let text = std::fs::read_to_string(&bed.config).expect("config").replace("workers = 1", "workers = 2");
    std::fs::write(&bed.config, text).expect("config");
    bed.take_over();
    all_answer(&mut held, "two workers again");
}

#[test]
fn a_restart_without_a_network_deletes_its_left_over_device() {
    const PE_A2: &str =
        "\n[[endpoint]]\nname = \"pe-a2\"\nnetwork = \"vnet-a\"\nip = \"10.1.0.6\"\nservice = \"billing\"\n";
    let Some(mut bed) = Bed::running("leftover", Opts { extra: PE_A2, ..Opts::default() }) else { return };
    let mut held = hold(&bed.a, 3);
    let route_a2 = |bed: &Bed| {
        let out = Command::new("ip").args(["-n", &bed.a, "route", "show", "10.1.0.6/32"]).output().expect("ip route");
        String::from_utf8_lossy(&out.stdout).contains("pla0")
    };
    assert!(route_a2(&bed), "pe-a2's route is there");
    bed.kill9();
    // The devices outlive the daemon (persistent), carrier off.
    assert!(within(&bed.b, || Ok(link_exists("plb0"))).expect("netns"), "plb0 kept across the crash");
    let text = std::fs::read_to_string(&bed.config).expect("config");
    let cut = text.find("[[network]]\nname = \"vnet-b\"").expect("vnet-b");
    let end = text[cut..].find("[[service]]").expect("next table") + cut;
    let text2 = format!("{}{}", &text[..cut], &text[end..])
        .replace("[[endpoint]]\nname = \"pe-b\"\nnetwork = \"vnet-b\"\nip = \"10.1.0.5\"\nservice = \"billing\"\n", "");
    let text2 = text2.replace(PE_A2, "");
    assert!(!text2.contains("vnet-b") && !text2.contains("pe-a2"), "{text2}");
    std::fs::write(&bed.config, &text2).expect("config");
    bed.start();
    assert!(eventually(5, || !within(&bed.b, || Ok(link_exists("plb0"))).expect("netns")), "{}", bed.log());
    all_answer(&mut held, "vnet-b gone");
    assert!(!route_a2(&bed), "the route of the endpoint the restart dropped is gone");
    // Someone else's device with a configured name is still refused.
    bed.stop_daemon();
    ip_link_add_tun(&bed.a, "pla0");
    bed.write_config(&Opts::default(), "");
    let (code, _, err) = bed.run_once();
    assert_ne!(code, 0);
    assert!(err.contains("already exists"), "{err}");
}

/// Makes a persistent TUN device `name` in `ns` that no privlink made.
fn ip_link_add_tun(ns: &str, name: &str) {
    let out = Command::new("ip")
        .args(["-n", ns, "tuntap", "add", "dev", name, "mode", "tun", "multi_queue"])
        .output()
        .expect("ip tuntap");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn readiness_and_the_successors_pid_go_to_systemds_notify_socket() {
    // What systemd gives a Type=notify service: a datagram socket named by
    // NOTIFY_SOCKET. The daemon says READY=1 once it forwards; a successor
    // says MAINPID=<its pid> before the old daemon exits, then READY=1.
    if !privileged() {
        return;
    }
    let mut bed = Bed::new("notify", Opts::default());
    let path = bed.dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    bed.env.push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    bed.start();
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    let mut held = hold(&bed.a, 2);
    bed.take_over();
    let successor = bed.pid();
    assert_eq!(next(), format!("MAINPID={successor}"));
    assert_eq!(next(), "READY=1");
    all_answer(&mut held, "the notified hand-over");
}

#[test]
fn a_start_that_fails_leaves_no_device_and_no_table_behind() {
    if !privileged() {
        return;
    }
    let bed = Bed::new("failstart", Opts::default());
    // Somebody else's device with the name vnet-b wants: the start fails
    // after the provider's and vnet-a's devices were made.
    ip_link_add_tun(&bed.b, "plb0");
    let (code, _, err) = bed.run_once();
    assert_ne!(code, 0);
    assert!(err.contains("already exists"), "{err}");
    for (ns, dev) in [(&bed.prov, "plp0"), (&bed.a, "pla0")] {
        let d = dev.to_string();
        assert!(!within(ns, move || Ok(link_exists(&d))).expect("netns"), "{dev} left behind by a failed start");
    }
    let flows = privlink::state::RunDir::for_state_dir(&bed.dir.join("state")).expect("run dir").flows_path();
    assert!(!flows.exists(), "flow table left behind by a failed start");
}
