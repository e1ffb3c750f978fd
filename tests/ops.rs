//! Operations: the alert rules under promtool's own checker and unit tests,
//! the live `/metrics` under `promtool check metrics`, a real Prometheus
//! (the distribution's) scraping the real daemon, and the Grafana
//! dashboard's queries against what the daemon exports.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn alert_rules_pass_promtools_check_and_their_unit_tests() {
    if !have("promtool") {
        return;
    }
    let (ok, out) = run(Command::new("promtool").arg("check").arg("rules").arg(repo("config/prometheus/alerts.yml")));
    assert!(ok && out.contains("SUCCESS: 6 rules found"), "{out}");
    let (ok, out) =
        run(Command::new("promtool").arg("test").arg("rules").arg(repo("config/prometheus/alerts_test.yml")));
    assert!(ok && out.contains("SUCCESS"), "{out}");
}

/// The body of a `/metrics` answer.
fn body(scrape: &str) -> &str {
    scrape.split_once("\r\n\r\n").map_or(scrape, |(_, b)| b)
}

#[test]
fn a_real_prometheus_scrapes_the_bytes_of_a_transfer_and_the_dashboard_asks_only_for_real_metrics() {
    if !have("promtool") || !have("prometheus") {
        return;
    }
    let Some(bed) = Bed::running("ops", Opts::default()) else { return };
    transfer_intact(&bed.a, 3 << 20);
    let scrape = bed.scrape();
    let text = body(&scrape).to_string();

    // promtool's checker (format and lint) on the live exposition.
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    {
        use std::io::Write;
        p.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    }
    let out = p.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every metric a dashboard query names is one the daemon exports.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("config/grafana/privlink-dashboard.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut names = std::collections::BTreeSet::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("privlink_") || word.starts_with("process_") {
                    names.insert(word.to_string());
                }
            }
        }
    }
    assert!(names.len() >= 14, "{names:?}");
    for n in &names {
        assert!(text.contains(&format!("# TYPE {n} ")), "the dashboard asks for {n}, which the daemon does not export");
    }

    // A real Prometheus on loopback scrapes the daemon every second.
    let port = privlink::testbed::free_port().expect("port").port();
    let conf = bed.dir.join("prometheus.yml");
    std::fs::write(
        &conf,
        format!(
            "global: {{ scrape_interval: 1s }}\nscrape_configs:\n  - job_name: privlink\n    static_configs:\n      - targets: ['{}']\n",
            bed.metrics
        ),
    )
    .expect("conf");
    let prom = Command::new("prometheus")
        .arg(format!("--config.file={}", conf.display()))
        .arg(format!("--storage.tsdb.path={}", bed.dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _k = Kill(prom);
    let want = bed.metric("privlink_endpoint_bytes_total", &[("endpoint", "pe-a"), ("direction", "in")]);
    assert!(want > f64::from(3u32 << 20), "the daemon counted the transfer: {want}");
    let query = "privlink_endpoint_bytes_total%7Bendpoint%3D%22pe-a%22%2Cdirection%3D%22in%22%7D";
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        let answer = http_get(port, &format!("/api/v1/query?query={query}"));
        if let Some(v) = answer.as_deref().and_then(|a| {
            let j: serde_json::Value = serde_json::from_str(body(a)).ok()?;
            j["data"]["result"][0]["value"][1].as_str()?.parse::<f64>().ok()
        }) {
            break v;
        }
        assert!(Instant::now() < deadline, "Prometheus never had the series: {}", answer.unwrap_or_default());
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(got, want, "Prometheus' value of the endpoint byte counter is the daemon's");
}

/// `GET path` from 127.0.0.1:`port`; `None` until it answers.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then_some(out)
}
