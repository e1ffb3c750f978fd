//! End-to-end tests of the connection workflow, the control API and its CLI:
//! the real daemon, real namespaces and TUN devices, real TCP.

mod common;

use common::*;
use std::io::Write;
use std::time::Duration;

const SEC: Duration = Duration::from_secs(1);

fn state_of(bed: &Bed, endpoint: &str) -> String {
    let (code, out, err) = bed.cli(&["connections", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).expect("json");
    list.as_array()
        .expect("array")
        .iter()
        .find(|c| c["endpoint"] == endpoint)
        .map(|c| c["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[test]
fn pending_carries_nothing_until_approved_and_approval_survives_kill_9() {
    let Some(mut bed) = Bed::running("pend", Opts { orders_auto_approve: "[]", ..Opts::default() }) else { return };
    assert_eq!(state_of(&bed, "pe-a"), "pending");
    assert_eq!(state_of(&bed, "pe-b"), "approved");
    assert!(connect(&bed.a, EP, 80, SEC).is_err(), "a pending endpoint carries nothing");
    assert!(bed.metric("privlink_packets_dropped_total", &[("reason", "not_approved"), ("network", "vnet-a")]) >= 1.0);
    assert_eq!(bed.metric("privlink_connection_state", &[("endpoint", "pe-a"), ("state", "pending")]), 1.0);

    let (code, out, err) = bed.cli(&["connections", "approve", "pe-a", "--message", "welcome aboard"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "pe-a: approved (welcome aboard)");
    let mut s = connect(&bed.a, EP, 80, 3 * SEC).expect("approved endpoint carries traffic");
    assert!(line(&mut s).starts_with("svc=orders"));
    drop(s);
    assert_eq!(bed.metric("privlink_connection_state", &[("endpoint", "pe-a"), ("state", "approved")]), 1.0);
    assert_eq!(bed.metric("privlink_connection_state", &[("endpoint", "pe-a"), ("state", "pending")]), 0.0);

    // A crash right after the CLI said "approved" keeps it approved.
    bed.kill9();
    bed.start();
    assert_eq!(state_of(&bed, "pe-a"), "approved");
    let mut s = connect(&bed.a, EP, 80, 3 * SEC).expect("still approved after kill -9 and restart");
    assert!(line(&mut s).starts_with("svc=orders"));

    // The audit trail has the request and the decision with its message.
    let socket = bed.dir.join("control.sock");
    let trail = privlink::client::call(&socket, "GET", "/v1/audit?endpoint=pe-a", None).expect("audit");
    let trail: serde_json::Value = serde_json::from_str(&trail).expect("json");
    let trail = trail.as_array().expect("array");
    assert_eq!(trail.len(), 2, "{trail:?}");
    assert_eq!((trail[0]["to"].as_str(), trail[0]["by"].as_str()), (Some("pending"), Some("config")));
    assert_eq!(trail[1]["from"], "pending");
    assert_eq!(trail[1]["to"], "approved");
    assert_eq!(trail[1]["message"], "welcome aboard");
    assert_eq!(trail[1]["by"], "operator");
    assert!(trail[1]["at"].as_u64().expect("time") > 1_700_000_000);

    // The human table shows the decision and its message.
    let table = bed.cli(&["connections"]).1;
    assert!(table.contains("pe-a") && table.contains("approved") && table.contains("welcome aboard"), "{table}");
}

#[test]
fn reject_cuts_a_live_connection_and_refuses_new_ones() {
    let Some(bed) = Bed::running("rej", Opts::default()) else { return };
    let mut held = connect(&bed.a, EP, 7, 3 * SEC).expect("echo connection");
    held.write_all(b"one\n").expect("write");
    assert_eq!(line(&mut held), "one");
    assert_eq!(bed.metric("privlink_endpoint_flows_active", &[("endpoint", "pe-a")]), 1.0);

    let (code, out, err) = bed.cli(&["connections", "reject", "pe-a", "--message", "access revoked"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "pe-a: rejected (access revoked)");
    assert_eq!(bed.metric("privlink_endpoint_flows_active", &[("endpoint", "pe-a")]), 0.0, "flows ended");
    held.set_read_timeout(Some(2 * SEC)).expect("timeout");
    let _ = held.write_all(b"two\n");
    assert_ne!(line(&mut held), "two", "the live connection is cut");
    assert!(connect(&bed.a, EP, 80, SEC).is_err(), "new connections are refused");
    assert_eq!(state_of(&bed, "pe-a"), "rejected");
    // The other tenant is untouched.
    let mut b = connect(&bed.b, EP, 80, 3 * SEC).expect("tenant b");
    assert!(line(&mut b).starts_with("svc=billing"));
}

#[test]
fn a_tenant_outside_visibility_never_connects() {
    let Some(bed) = Bed::running("vis", Opts { billing_visibility: r#"["contoso"]"#, ..Opts::default() }) else {
        return;
    };
    assert_eq!(state_of(&bed, "pe-b"), "rejected");
    assert!(connect(&bed.b, EP, 80, SEC).is_err());
    let (code, _, err) = bed.cli(&["connections", "approve", "pe-b"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "privlink: tenant fabrikam is not in the visibility of service billing: it cannot be approved"
    );
    assert!(connect(&bed.b, EP, 80, SEC).is_err());
    assert_eq!(bed.metric("privlink_connection_state", &[("endpoint", "pe-b"), ("state", "rejected")]), 1.0);
}

#[test]
fn flows_lists_a_live_flow_with_its_addresses() {
    let Some(bed) = Bed::running("flows", Opts::default()) else { return };
    let mut s = connect(&bed.a, EP, 80, 3 * SEC).expect("connect");
    assert!(line(&mut s).starts_with("svc=orders"));
    let local = s.local_addr().expect("local addr");
    let (code, out, err) = bed.cli(&["flows", "--endpoint", "pe-a", "--json"]);
    assert_eq!(code, 0, "{err}");
    let flows: serde_json::Value = serde_json::from_str(&out).expect("json");
    let flows = flows.as_array().expect("array");
    assert_eq!(flows.len(), 1, "{out}");
    let f = &flows[0];
    assert_eq!(f["protocol"], "tcp");
    assert_eq!(f["network"], "vnet-a");
    assert_eq!(f["consumer"], format!("{CLIENT}:{}", local.port()));
    assert_eq!(f["endpoint_addr"], format!("{EP}:80"));
    assert!(f["nat"].as_str().expect("nat").starts_with(&format!("{NAT_ORDERS}:")));
    assert_eq!(f["backend"], format!("{BACKEND_ORDERS}:8080"));
    assert_eq!(f["state"], "established");
    let table = bed.cli(&["flows"]).1;
    assert!(table.contains(&format!("{CLIENT}:{}", local.port())) && table.contains("pe-a"), "{table}");
    assert!(bed.cli(&["flows", "--endpoint", "pe-b", "--json"]).1.trim() == "[]");
}

#[test]
fn cli_without_a_daemon_says_so_in_one_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_privlink"))
        .args(["connections", "--socket", "/nonexistent/control.sock"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), "privlink: privlink is not running (no control socket at /nonexistent/control.sock)");
}
