//! TUN devices: one for the provider side and one per consumer network, each
//! made inside its namespace with one queue per worker (`IFF_MULTI_QUEUE`),
//! so the kernel spreads flows over workers and each worker owns its queue
//! of every device. Closing the last queue destroys a (non-persistent)
//! device, and with it its address and routes: that is how the daemon
//! cleans up, even when it is killed.
//!
//! The crate is tun-rs rather than tun-tap: it creates multi-queue devices,
//! sets MTU/up/address by ioctl, and has the `IFF_VNET_HDR` offload support
//! the throughput work builds on (see docs/ARCHITECTURE.md).

use crate::netlink::{self, Change};
use crate::netns::in_netns;
use anyhow::{Context, Result};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use tun_rs::{DeviceBuilder, SyncDevice};

/// Packets the kernel may queue for a device before it drops (default 500):
/// room for a burst while a worker is off the CPU (on the 2-core bench
/// machine this lifted 64-byte UDP from 0.93 to 1.1 of the kernel's rate).
/// TCP senders on the host are held back by TCP small queues regardless.
const TX_QUEUE_LEN: u32 = 4096;

/// Whether a link named `name` exists in namespace `netns`.
pub fn name_taken(netns: Option<&str>, name: &str) -> Result<bool> {
    let c_name = std::ffi::CString::new(name).context("device name")?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    in_netns(netns, move || Ok(unsafe { libc::if_nametoindex(c_name.as_ptr()) } != 0))
}

/// One TUN device and its queues.
pub struct Device {
    pub name: String,
    pub netns: Option<String>,
    pub mtu: u16,
    queues: Vec<SyncDevice>,
    /// /32 routes this daemon added through the device.
    routes: Mutex<BTreeSet<Ipv4Addr>>,
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

impl Device {
    /// Creates `name` in `netns` with `queues` queues, MTU `mtu`, link up,
    /// and `address` when given.
    pub fn create(
        name: &str,
        netns: Option<&str>,
        mtu: u16,
        address: Option<(Ipv4Addr, u8)>,
        queues: usize,
        offload: bool,
    ) -> Result<Arc<Device>> {
        let (n, ns) = (name.to_string(), netns.map(str::to_string));
        let qs = in_netns(netns, move || {
            // Multi-queue TUN lets anyone with the name attach more queues
            // to a live device: refuse a name that exists rather than share
            // another daemon's (or any program's) device.
            let c_name = std::ffi::CString::new(n.as_str()).context("device name")?;
            // SAFETY: if_nametoindex reads a NUL-terminated string.
            if unsafe { libc::if_nametoindex(c_name.as_ptr()) } != 0 {
                anyhow::bail!(
                    "device `{n}` already exists in namespace `{}`: another privlink or program holds it \
                     (privlink creates its own devices)",
                    ns.as_deref().unwrap_or("(the daemon's own)")
                );
            }
            let mut b = DeviceBuilder::new()
                .name(&n)
                .mtu(mtu)
                .packet_information(false)
                .multi_queue(true)
                .offload(offload)
                .tx_queue_len(TX_QUEUE_LEN);
            if let Some((a, len)) = address {
                b = b.ipv4(a, len, None);
            }
            let first = b.enable(false).build_sync().with_context(|| {
                format!(
                    "cannot create TUN device `{n}`{}",
                    ns.as_deref().map(|s| format!(" in namespace `{s}`")).unwrap_or_default()
                )
            })?;
            // privlink forwards IPv4 only: keep the kernel's IPv6 chatter
            // (router and multicast listener messages) off the device. Not
            // fatal where IPv6 is absent.
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{n}/disable_ipv6"), "1");
            // Before the link goes up, so the kernel never builds the
            // default per-queue qdiscs (see `netlink::set_noqueue`).
            crate::netlink::set_noqueue(crate::netlink::ifindex(&n)?).with_context(|| format!("device `{n}`"))?;
            first.enabled(true).with_context(|| format!("cannot set `{n}` up"))?;
            let mut qs = Vec::with_capacity(queues);
            for _ in 1..queues.max(1) {
                qs.push(first.try_clone().with_context(|| format!("cannot add a queue to `{n}`"))?);
            }
            qs.insert(0, first);
            for q in &qs {
                q.set_nonblocking(true).context("cannot make a TUN queue non-blocking")?;
            }
            Ok(qs)
        })?;
        Ok(Arc::new(Device {
            name: name.to_string(),
            netns: netns.map(str::to_string),
            mtu,
            queues: qs,
            routes: Mutex::new(BTreeSet::new()),
            lost: std::sync::atomic::AtomicBool::new(false),
        }))
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
    pub fn set_routes(&self, want: &BTreeSet<Ipv4Addr>) -> Result<()> {
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
