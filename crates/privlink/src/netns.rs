//! Network namespaces and the `ip` command.
//!
//! A TUN device belongs to the namespace of the thread that opened
//! `/dev/net/tun`, and a socket to the namespace of the thread that created
//! it; the fd then works from any thread. So anything that must live in a
//! namespace is made by [`in_netns`] on a short-lived thread that entered it
//! with `setns(2)`. The daemon sets routes and qdiscs by netlink
//! (`crate::netlink`) from such threads; [`ip`] (iproute2) remains for the
//! demo's and the tests' own topology.

use anyhow::{anyhow, bail, Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

/// Where `ip netns add` puts namespaces.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(name)
}

/// Runs `f` on a thread inside namespace `ns` (or right here when `None`).
pub fn in_netns<T, F>(ns: Option<&str>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let Some(name) = ns else { return f() };
    let path = netns_path(name);
    let file = File::open(&path)
        .with_context(|| format!("network namespace `{name}` does not exist (create it with `ip netns add {name}`)"))?;
    std::thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || {
            // SAFETY: setns on a valid namespace fd only changes this
            // thread's network namespace; the thread ends after `f`.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("cannot enter network namespace: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .context("cannot spawn a thread")?
        .join()
        .map_err(|_| anyhow!("thread in namespace `{name}` panicked"))?
}

/// Runs `ip [-n ns] ARGS...`; the error carries ip's own message.
pub fn ip(ns: Option<&str>, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(n) = ns {
        cmd.args(["-n", n]);
    }
    cmd.args(args);
    let out = cmd.output().context("cannot run `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("`ip {}{}` failed: {}", ns.map(|n| format!("-n {n} ")).unwrap_or_default(), args.join(" "), err.trim());
    }
    Ok(())
}

/// True when this process may create namespaces and TUN devices.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
