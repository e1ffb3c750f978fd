//! TUN devices: one for the provider side and one per consumer network, each
//! made inside its namespace with one queue per worker (`IFF_MULTI_QUEUE`),
//! so the kernel spreads flows over workers and each worker owns its queue
//! of every device.
//!
//! Devices are persistent (`TUNSETPERSIST`): when the daemon dies, they stay
//! with their addresses and routes, carrier off, and the next daemon
//! attaches its queues to them (see docs/OPERATIONS.md). During a hand-over
//! the old and the new daemon each have queues on the same device, and the
//! kernel spreads packets over both. Which devices are this daemon's is in
//! its manifest ([`crate::state::Manifest`]): a device with a configured
//! name that is not in it (or has another interface index) is somebody
//! else's and is refused, as before. A clean stop, a reload that removes a
//! network, and a restart whose config dropped one delete the device.
//!
//! The crate is tun-rs rather than tun-tap: it creates multi-queue devices,
//! sets MTU/up/address by ioctl, and has the `IFF_VNET_HDR` offload support
//! the throughput work builds on (see docs/ARCHITECTURE.md).

use crate::netlink::{self, Change};
use crate::netns::in_netns;
use anyhow::{Context, Result};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use tun_rs::{DeviceBuilder, SyncDevice};

/// Packets the kernel may queue for a device before it drops (default 500):
/// room for a burst while a worker is off the CPU (on the 2-core bench
/// machine this lifted 64-byte UDP from 0.93 to 1.1 of the kernel's rate).
/// TCP senders on the host are held back by TCP small queues regardless.
const TX_QUEUE_LEN: u32 = 4096;

/// The interface index of `name` in `netns`, if it exists.
pub fn ifindex_of(netns: Option<&str>, name: &str) -> Result<Option<u32>> {
    let c_name = std::ffi::CString::new(name).context("device name")?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    in_netns(netns, move || Ok(Some(unsafe { libc::if_nametoindex(c_name.as_ptr()) }).filter(|&i| i != 0)))
}

/// Waits (up to 2 s) until the device `name` with index `ifindex` is gone.
pub fn wait_gone(netns: Option<&str>, name: &str, ifindex: u32) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while ifindex_of(netns, name)? == Some(ifindex) {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("device `{name}` is still held by another process");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(())
}

/// One TUN device and its queues.
pub struct Device {
    pub name: String,
    pub netns: Option<String>,
    pub mtu: u16,
    /// Interface index in its namespace (for the manifest).
    pub ifindex: u32,
    queues: Vec<SyncDevice>,
    /// /32 routes this daemon added through the device.
    routes: Mutex<BTreeSet<IpAddr>>,
    /// The device went away under the daemon (someone deleted it): its
    /// queues report errors; workers stop polling them and the control
    /// thread recreates the device.
    pub lost: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("netns", &self.netns)
            .field("queues", &self.queues.len())
            .finish()
    }
}

/// The addresses a new device gets (a network's `address` and
/// `address6`), each with its prefix length.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Addresses {
    pub v4: Option<(Ipv4Addr, u8)>,
    pub v6: Option<(Ipv6Addr, u8)>,
}

impl Device {
    /// Opens `name` in `netns` with `queues` queues, MTU `mtu`, link up and
    /// `address` when given: creates it, or attaches to it when it exists
    /// and `ours` says it is this daemon's (interface index given).
    /// Returns the device and whether it was attached rather than made.
    pub fn open(
        name: &str,
        netns: Option<&str>,
        mtu: u16,
        address: Addresses,
        queues: usize,
        offload: bool,
        ours: &dyn Fn(u32) -> bool,
    ) -> Result<(Arc<Device>, bool)> {
        let (n, ns) = (name.to_string(), netns.map(str::to_string));
        let found = ifindex_of(netns, name)?;
        let is_ours = found.is_some_and(ours);
        let (qs, ifindex, attached, routes) = in_netns(netns, move || {
            // Multi-queue TUN lets anyone with the name attach more queues
            // to a live device: refuse a name that exists and is not ours
            // rather than share another daemon's (or any program's) device.
            let c_name = std::ffi::CString::new(n.as_str()).context("device name")?;
            // SAFETY: if_nametoindex reads a NUL-terminated string.
            let existing = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
            if existing != 0 && (!is_ours || Some(existing) != found) {
                anyhow::bail!(
                    "device `{n}` already exists in namespace `{}`: another privlink or program holds it \
                     (privlink creates its own devices)",
                    ns.as_deref().unwrap_or("(the daemon's own)")
                );
            }
            let attach = existing != 0;
            let mut b = DeviceBuilder::new()
                .name(&n)
                .mtu(mtu)
                .packet_information(false)
                .multi_queue(true)
                .offload(offload)
                .tx_queue_len(TX_QUEUE_LEN);
            if attach {
                // Up, addressed and routed already: bringing it down would
                // flush its routes.
                b = b.inherit_enable_state();
            } else {
                if let Some((a, len)) = address.v4 {
                    b = b.ipv4(a, len, None);
                }
                if let Some((a, len)) = address.v6 {
                    b = b.ipv6(a, len);
                }
                b = b.enable(false);
            }
            let first = b.build_sync().with_context(|| {
                format!(
                    "cannot {} TUN device `{n}`{}",
                    if attach { "attach to" } else { "create" },
                    ns.as_deref().map(|s| format!(" in namespace `{s}`")).unwrap_or_default()
                )
            })?;
            first.persist().with_context(|| format!("cannot make `{n}` persistent"))?;
            // IPv6 on (IPv6 endpoints; a device an IPv4-only build made has
            // it off). No link-local address (addr_gen_mode 1, set first),
            // no router solicitations, no router advertisements taken: a
            // precaution, since on this kernel a TUN device sends nothing of
            // its own even with them on (tried: no packet reached privlink
            // in 5 s). A TUN device does no duplicate address detection
            // (IFF_NOARP). Not fatal where IPv6 is absent.
            for (key, value) in
                [("addr_gen_mode", "1"), ("accept_ra", "0"), ("router_solicitations", "0"), ("disable_ipv6", "0")]
            {
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{n}/{key}"), value);
            }
            if !attach {
                // Before the link goes up, so the kernel never builds the
                // default per-queue qdiscs (see `netlink::set_noqueue`).
                crate::netlink::set_noqueue(crate::netlink::ifindex(&n)?).with_context(|| format!("device `{n}`"))?;
            }
            first.enabled(true).with_context(|| format!("cannot set `{n}` up"))?;
            let mut qs = Vec::with_capacity(queues);
            for _ in 1..queues.max(1) {
                qs.push(first.try_clone().with_context(|| format!("cannot add a queue to `{n}`"))?);
            }
            qs.insert(0, first);
            for q in &qs {
                q.set_nonblocking(true).context("cannot make a TUN queue non-blocking")?;
            }
            let ifindex = crate::netlink::ifindex(&n)?;
            // An attached device keeps the routes the previous daemon
            // added: start from them, so the first `set_routes` removes
            // the ones the config no longer wants.
            let routes = if attach { crate::netlink::static_routes(ifindex)? } else { BTreeSet::new() };
            Ok((qs, ifindex, attach, routes))
        })?;
        Ok((
            Arc::new(Device {
                name: name.to_string(),
                netns: netns.map(str::to_string),
                mtu,
                ifindex,
                queues: qs,
                routes: Mutex::new(routes),
                lost: std::sync::atomic::AtomicBool::new(false),
            }),
            attached,
        ))
    }

    /// Makes the device go away once its last queue closes (this daemon's
    /// and, during a hand-over, the other one's).
    pub fn unpersist(&self) {
        let fd = self.queue(0).as_raw_fd();
        // SAFETY: TUNSETPERSIST with 0 on a TUN descriptor this device owns.
        if unsafe { libc::ioctl(fd, libc::TUNSETPERSIST as _, 0 as libc::c_ulong) } != 0 {
            tracing::warn!(device = %self.name, "cannot clear persistence: {}", std::io::Error::last_os_error());
        }
    }

    /// Takes this daemon's queues off the device (`TUNSETQUEUE` with
    /// `IFF_DETACH_QUEUE`): the kernel stops handing them packets and
    /// spreads the device's traffic over the other queues (a successor's),
    /// while the workers finish what they read. Called when a hand-over
    /// completes, so that no packet waits in a queue nobody reads.
    pub fn detach_queues(&self) {
        for q in &self.queues {
            // SAFETY: an all-zero ifreq is valid; only its flags are read.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            req.ifr_ifru.ifru_flags = libc::IFF_DETACH_QUEUE as libc::c_short;
            // SAFETY: TUNSETQUEUE reads the ifreq on a TUN descriptor we own.
            if unsafe { libc::ioctl(q.as_raw_fd(), libc::TUNSETQUEUE as _, &mut req) } != 0 {
                tracing::warn!(device = %self.name, "cannot detach a queue: {}", std::io::Error::last_os_error());
            }
        }
    }

    /// Deletes the persistent device `name` in `netns` that a previous
    /// daemon left (attach, clear persistence, close).
    pub fn delete_left_over(name: &str, netns: Option<&str>, offload: bool) -> Result<()> {
        let (dev, _) = Device::open(name, netns, 1500, Addresses::default(), 1, offload, &|_| true)?;
        dev.unpersist();
        Ok(())
    }

    /// The queue of worker `w`.
    #[inline]
    pub fn queue(&self, w: usize) -> &SyncDevice {
        &self.queues[w % self.queues.len()]
    }

    pub fn fd(&self, w: usize) -> RawFd {
        self.queue(w).as_raw_fd()
    }

    /// Makes the /32 routes through this device exactly `want`, by netlink
    /// in the device's namespace, in batches (see [`crate::netlink`]).
    pub fn set_routes(&self, want: &BTreeSet<IpAddr>) -> Result<()> {
        let mut have = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let mut changes: Vec<Change> = have.difference(want).map(|&a| Change::Delete(a)).collect();
        changes.extend(want.difference(&have).map(|&a| Change::Replace(a)));
        if changes.is_empty() {
            return Ok(());
        }
        let name = self.name.clone();
        in_netns(self.netns.as_deref(), move || {
            let index = netlink::ifindex(&name)?;
            netlink::apply(index, &changes).with_context(|| format!("routes through `{name}`"))
        })?;
        *have = want.clone();
        Ok(())
    }
}
