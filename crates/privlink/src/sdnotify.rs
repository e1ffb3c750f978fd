//! systemd's readiness protocol (`sd_notify(3)`): one datagram to the
//! socket named by `NOTIFY_SOCKET`, when there is one. The daemon says
//! `READY=1` once its workers forward; a successor taking over says
//! `MAINPID=<its pid>` first, so systemd (with `NotifyAccess=all`) follows
//! the hand-over instead of taking the old daemon's exit for the service's.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (newline-separated `KEY=value` lines) to systemd; does
/// nothing outside systemd. Failures are logged, never fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        None => SocketAddr::from_pathname(std::path::Path::new(&path)),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &a));
    if let Err(e) = sent {
        tracing::warn!("cannot notify systemd ({state:?}): {e}");
    }
}
