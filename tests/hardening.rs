//! End-to-end tests of what a hostile tenant or a careless operator tried
//! (issue 12): each runs the real daemon in its own namespaces.

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
    let other = bed.config_text(&Opts::default(), "").replace(
        &format!("listen = \"{}\"", bed.metrics),
        &format!("listen = \"{metrics}\""),
    );
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
