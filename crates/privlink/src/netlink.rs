//! Routes by rtnetlink, in batches: the `/32` routes to endpoint and NAT
//! IPs through the daemon's devices. One `ip route` process per route cost
//! about 2 ms each (10,000 endpoints: tens of seconds to start); a netlink
//! socket in the device's namespace takes them a window of requests at a
//! time, each acknowledged, in well under a second.
//!
//! The messages are built with the rust-netlink crates (netlink-packet-route
//! for the route message, netlink-sys for the socket), the ones tun-rs
//! already depends on. The socket is blocking and made on a thread inside
//! the namespace ([`crate::netns::in_netns`]): a netlink socket talks to the
//! namespace it was created in.

use anyhow::{bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::net::{IpAddr, Ipv4Addr};

/// Requests in flight before their acknowledgements are read: the kernel
/// queues an acknowledgement per request, and a window keeps them within
/// the socket's receive buffer.
const WINDOW: usize = 256;

/// A route change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// `ip route replace ADDR/32 dev IFINDEX` (`/128` for IPv6).
    Replace(IpAddr),
    /// `ip route del ADDR/32 dev IFINDEX` (a missing route is not an error).
    Delete(IpAddr),
}

fn message(change: Change, ifindex: u32, seq: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut route = RouteMessage::default();
    let (Change::Replace(a) | Change::Delete(a)) = change;
    let (family, bits, dest) = match a {
        IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
    };
    route.header.address_family = family;
    route.header.destination_prefix_length = bits;
    route.header.table = RouteHeader::RT_TABLE_MAIN;
    route.header.protocol = RouteProtocol::Static;
    route.header.scope = RouteScope::Link;
    route.header.kind = RouteType::Unicast;
    let (inner, flags) = match change {
        Change::Replace(_) => (RouteNetlinkMessage::NewRoute as fn(RouteMessage) -> _, NLM_F_CREATE | NLM_F_REPLACE),
        Change::Delete(_) => (RouteNetlinkMessage::DelRoute as fn(RouteMessage) -> _, 0),
    };
    route.attributes = vec![RouteAttribute::Destination(dest), RouteAttribute::Oif(ifindex)];
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(inner(route)));
    msg.finalize();
    msg
}

fn socket() -> Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("cannot open a netlink socket")?;
    socket.bind_auto().context("cannot bind a netlink socket")?;
    socket.connect(&SocketAddr::new(0, 0)).context("cannot connect a netlink socket")?;
    Ok(socket)
}

/// Sends one request and waits for its acknowledgement.
fn request(socket: &Socket, mut msg: NetlinkMessage<RouteNetlinkMessage>) -> Result<()> {
    msg.header.flags |= NLM_F_REQUEST | NLM_F_ACK;
    msg.header.sequence_number = 1;
    msg.finalize();
    let mut out = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut out);
    socket.send(&out, 0).context("netlink send")?;
    let mut buf = vec![0u8; 8192];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0).context("netlink receive")?;
        let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..n])
            .map_err(|e| anyhow::anyhow!("bad netlink reply: {e}"))?;
        if let NetlinkPayload::Error(e) = reply.payload {
            return match e.code {
                None => Ok(()),
                Some(code) => Err(std::io::Error::from_raw_os_error(-code.get()).into()),
            };
        }
    }
}

/// Makes `noqueue` the root qdisc of interface `ifindex` (call it before
/// the link goes up). A multi-queue TUN device has 256 transmit queues, and
/// the default `mq` root gives each a `pfifo_fast` with three rings of
/// `txqueuelen` entries: about 25 MB of kernel memory per device at
/// txqueuelen 4096, measured. With `noqueue` a device costs about 0.26 MB;
/// packets wait in the TUN queue's own ring (also `txqueuelen` long) for
/// the worker instead.
pub fn set_noqueue(ifindex: u32) -> Result<()> {
    let mut tc = TcMessage::default();
    tc.header.family = AddressFamily::Unspec;
    tc.header.index = ifindex as i32;
    tc.header.parent = TcHandle::ROOT;
    tc.attributes = vec![TcAttribute::Kind("noqueue".into())];
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_CREATE | NLM_F_REPLACE;
    request(&socket()?, NetlinkMessage::new(header, NetlinkPayload::from(RouteNetlinkMessage::NewQueueDiscipline(tc))))
        .context("cannot set the noqueue qdisc")
}

/// Applies `changes` to routes through interface `ifindex`, in the calling
/// thread's namespace. Stops at the first refusal, naming it.
pub fn apply(ifindex: u32, changes: &[Change]) -> Result<()> {
    let socket = socket()?;
    let mut out = vec![0u8; 256];
    let mut buf = vec![0u8; 64 * 1024];
    for (w, window) in changes.chunks(WINDOW).enumerate() {
        let base = (w * WINDOW) as u32;
        for (i, &c) in window.iter().enumerate() {
            let msg = message(c, ifindex, base + i as u32 + 1);
            let len = msg.buffer_len();
            out.resize(len, 0);
            msg.serialize(&mut out[..len]);
            socket.send(&out[..len], 0).context("netlink send")?;
        }
        let mut acked = 0;
        while acked < window.len() {
            read_replies(&socket, &mut buf, |reply| {
                if let NetlinkPayload::Error(e) = &reply.payload {
                    acked += 1;
                    if let Some(code) = e.code {
                        let idx = (reply.header.sequence_number - 1) as usize;
                        let what = changes.get(idx).copied();
                        let errno = -code.get();
                        let missing = errno == libc::ESRCH || errno == libc::ENOENT;
                        if !(missing && matches!(what, Some(Change::Delete(_)))) {
                            bail!("{what:?}: {}", std::io::Error::from_raw_os_error(errno));
                        }
                    }
                }
                Ok(())
            })?;
        }
    }
    Ok(())
}

/// The host (`/32`, `/128`) static routes of the main table through
/// interface `ifindex` (the ones a previous daemon added), in the calling
/// thread's namespace: a dump of the IPv4 and IPv6 routes, filtered.
pub fn static_routes(ifindex: u32) -> Result<std::collections::BTreeSet<IpAddr>> {
    let mut found = std::collections::BTreeSet::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut route = RouteMessage::default();
        route.header.address_family = family;
        dump(RouteNetlinkMessage::GetRoute(route), "route dump", |m| {
            if let RouteNetlinkMessage::NewRoute(r) = m {
                let h = &r.header;
                let ours = matches!(
                    (h.address_family, h.destination_prefix_length),
                    (AddressFamily::Inet, 32) | (AddressFamily::Inet6, 128)
                ) && h.table == RouteHeader::RT_TABLE_MAIN
                    && h.protocol == RouteProtocol::Static
                    && r.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(i) if *i == ifindex));
                if ours {
                    found.extend(r.attributes.iter().filter_map(|a| match a {
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(IpAddr::from(*d)),
                        RouteAttribute::Destination(RouteAddress::Inet6(d)) => Some(IpAddr::from(*d)),
                        _ => None,
                    }));
                }
            }
        })?;
    }
    Ok(found)
}

/// Sends the dump request `request` and hands each message of the answer
/// to `each`, until the kernel says done; `what` names it in errors.
fn dump(request: RouteNetlinkMessage, what: &str, mut each: impl FnMut(RouteNetlinkMessage)) -> Result<()> {
    use netlink_packet_core::NLM_F_DUMP;
    let socket = socket()?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(request));
    msg.finalize();
    let mut out = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut out);
    socket.send(&out, 0).context("netlink send")?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = false;
    while !done {
        read_replies(&socket, &mut buf, |reply| {
            match reply.payload {
                NetlinkPayload::Done(_) => done = true,
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    bail!("{what}: {}", std::io::Error::from_raw_os_error(-e.code.map_or(0, |c| c.get())))
                }
                NetlinkPayload::InnerMessage(m) => each(m),
                _ => {}
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Reads one datagram from `socket` and hands each netlink message in it
/// to `each`.
fn read_replies(
    socket: &Socket,
    buf: &mut [u8],
    mut each: impl FnMut(NetlinkMessage<RouteNetlinkMessage>) -> Result<()>,
) -> Result<()> {
    let n = socket.recv(&mut &mut buf[..], 0).context("netlink receive")?;
    let mut at = 0;
    while at < n {
        let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[at..n])
            .map_err(|e| anyhow::anyhow!("bad netlink reply: {e}"))?;
        let len = reply.header.length as usize;
        each(reply)?;
        if len == 0 {
            break;
        }
        at += len;
    }
    Ok(())
}

/// The interface index of `name` in the calling thread's namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).context("interface name")?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("no interface `{name}`"),
        i => Ok(i),
    }
}

/// Adds (`add`) or removes a `/32` address on interface `ifindex`, in the
/// calling thread's namespace (`ip addr add|del ADDR/32 dev IFINDEX`): a
/// network's resolver address (docs/DNS.md). Adding an address that is
/// there already, or removing one that is not, succeeds.
pub fn set_address(ifindex: u32, addr: Ipv4Addr, add: bool) -> Result<()> {
    use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
    let mut a = AddressMessage::default();
    a.header.family = AddressFamily::Inet;
    a.header.prefix_len = 32;
    a.header.scope = AddressScope::Universe;
    a.header.index = ifindex;
    a.attributes = vec![AddressAttribute::Local(addr.into()), AddressAttribute::Address(addr.into())];
    let mut header = NetlinkHeader::default();
    let msg = if add {
        header.flags = NLM_F_CREATE | NLM_F_REPLACE;
        RouteNetlinkMessage::NewAddress(a)
    } else {
        RouteNetlinkMessage::DelAddress(a)
    };
    match request(&socket()?, NetlinkMessage::new(header, NetlinkPayload::from(msg))) {
        Err(e)
            if !add
                && e.downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::raw_os_error)
                    .is_some_and(|c| c == libc::EADDRNOTAVAIL || c == libc::ENODEV) =>
        {
            Ok(())
        }
        r => r.with_context(|| format!("cannot {} address {addr}/32", if add { "add" } else { "remove" })),
    }
}

/// The IPv4 `/32` addresses on interface `ifindex`, in the calling
/// thread's namespace (a dump of the IPv4 addresses, filtered): what a
/// previous daemon may have left there as resolver addresses.
pub fn addresses32(ifindex: u32) -> Result<std::collections::BTreeSet<Ipv4Addr>> {
    use netlink_packet_route::address::{AddressAttribute, AddressMessage};
    let mut a = AddressMessage::default();
    a.header.family = AddressFamily::Inet;
    let mut found = std::collections::BTreeSet::new();
    dump(RouteNetlinkMessage::GetAddress(a), "address dump", |m| {
        if let RouteNetlinkMessage::NewAddress(m) = m {
            if m.header.index == ifindex && m.header.prefix_len == 32 {
                for at in &m.attributes {
                    if let AddressAttribute::Local(std::net::IpAddr::V4(v4)) = at {
                        found.insert(*v4);
                    }
                }
            }
        }
    })?;
    Ok(found)
}

/// Sets interface `ifindex` up, in the calling thread's namespace (`ip
/// link set IFINDEX up`): a namespace's `lo`, which a local address needs
/// to be reached from the namespace itself (a fresh `ip netns add` leaves
/// it down).
pub fn set_up(ifindex: u32) -> Result<()> {
    use netlink_packet_route::link::{LinkFlags, LinkMessage};
    let mut l = LinkMessage::default();
    l.header.index = ifindex;
    l.header.flags = LinkFlags::Up;
    l.header.change_mask = LinkFlags::Up;
    request(
        &socket()?,
        NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(RouteNetlinkMessage::SetLink(l))),
    )
    .context("cannot set the link up")
}
