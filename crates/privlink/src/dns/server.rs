//! The resolvers' I/O: per network with a `dns` address, that address on
//! the network's device and a UDP socket and a TCP listener bound to it
//! port 53, inside the network's namespace; a tokio runtime
//! (`privlink-dns`, one thread per core up to 4, a UDP socket per thread
//! and network) serves them all.
//!
//! - **Rate:** one token bucket per network (`[dns] rate` queries per
//!   second, one second's worth of burst), UDP and TCP together; a query
//!   past it is dropped unanswered and counted
//!   (`privlink_dns_dropped_total{reason="rate_limited"}`), as BIND's and
//!   Unbound's rate limits drop.
//! - **TCP** (RFC 7766): several queries per connection, answered in
//!   order; a connection idle for 10 s is closed; at most 64 connections
//!   per network (more are closed at once, counted `busy`).
//! - **Forwarding:** a name privlink does not publish goes to the
//!   `[dns] forward` upstreams in turn, over UDP from a fresh socket with
//!   a fresh random id (RFC 5452), again over TCP when the answer is
//!   truncated; 2 s per upstream; at most 256 forwards in flight per
//!   network. No upstream answering is SERVFAIL and
//!   `privlink_dns_forward_errors_total`.
//!
//! Sockets use SO_REUSEPORT, so a successor (hand-over) binds the same
//! address while its predecessor still answers.

use super::{mmsg, Answer, Zones};
use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use hickory_proto::op::Message;
use metrics::{counter, Counter};
use privlink_config::Config;
use privlink_core::Engine;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// How long one upstream has to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// A TCP connection idle this long is closed (RFC 7766 §6.2.3 suggests
/// seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// A TCP connection is closed after this long, whatever it does: a
/// client cannot hold one of the network's [`TCP_CONNECTIONS`] for good
/// by asking slowly.
const TCP_LIFETIME: Duration = Duration::from_secs(60);
/// TCP connections per network at once.
const TCP_CONNECTIONS: usize = 64;
/// Forwarded queries in flight per network.
const FORWARDS: usize = 256;

/// Every network's resolver.
pub struct Resolvers {
    rt: tokio::runtime::Runtime,
    zones: Arc<ArcSwap<Zones>>,
    engine: Arc<Engine>,
    serving: HashMap<String, Serving>,
    /// (network, interface index) whose left-over addresses were removed.
    swept: std::collections::HashSet<(String, u32)>,
}

/// One network's resolver as started.
struct Serving {
    netns: Option<String>,
    ifindex: u32,
    addr: Ipv4Addr,
    tasks: Vec<JoinHandle<()>>,
}

/// What a network's tasks share.
struct Net {
    name: String,
    zones: Arc<ArcSwap<Zones>>,
    engine: Arc<Engine>,
    bucket: Mutex<(f64, Instant)>,
    rcodes: [Counter; 7],
    rate_limited: Counter,
    malformed: Counter,
    busy: Counter,
    forward_errors: Counter,
    forwards: Semaphore,
    connections: Arc<Semaphore>,
}

impl Net {
    fn new(name: &str, zones: Arc<ArcSwap<Zones>>, engine: Arc<Engine>) -> Net {
        let n = name.to_string();
        let rc = |c: &'static str| counter!("privlink_dns_queries_total", "network" => n.clone(), "rcode" => c);
        let drop = |r: &'static str| counter!("privlink_dns_dropped_total", "network" => n.clone(), "reason" => r);
        Net {
            rcodes: super::RCODES.map(rc),
            rate_limited: drop("rate_limited"),
            malformed: drop("malformed"),
            busy: drop("busy"),
            forward_errors: counter!("privlink_dns_forward_errors_total"),
            name: n,
            zones,
            engine,
            bucket: Mutex::new((f64::MAX, Instant::now())),
            forwards: Semaphore::new(FORWARDS),
            connections: Arc::new(Semaphore::new(TCP_CONNECTIONS)),
        }
    }

    /// Takes up to `n` tokens from the network's bucket (one lock for a
    /// whole batch); how many it got. The queries past them are dropped
    /// and counted here.
    fn admit(&self, n: usize) -> usize {
        let rate = f64::from(self.zones.load().settings.rate);
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * rate).min(rate);
        b.1 = now;
        let got = (b.0.max(0.0) as usize).min(n);
        b.0 -= got as f64;
        drop(b);
        if got < n {
            self.rate_limited.increment((n - got) as u64);
        }
        got
    }

    fn count(&self, code: hickory_proto::op::ResponseCode) {
        self.rcodes[super::rcode_index(code)].increment(1);
    }

    /// One query, answered here when privlink can (no task, no await:
    /// the receive loop answers a published name inline); a query for
    /// the upstreams comes back as [`Step::Forward`]. The caller took the
    /// query's token ([`admit`](Self::admit)).
    fn local(&self, query: &[u8], client: SocketAddr, tcp: bool) -> Step {
        let zones = self.zones.load();
        let approved = |ep: &str| self.engine.connection_approved(ep);
        match zones.answer(&self.name, query, tcp, &approved) {
            Answer::Drop => {
                self.malformed.increment(1);
                Step::Done(None)
            }
            Answer::Reply(b, code) => {
                self.count(code);
                if zones.settings.query_log {
                    self.log(Message::from_vec(query).ok().as_ref(), client, code, tcp);
                }
                Step::Done(Some(b))
            }
            Answer::Forward(q) => Step::Forward(q),
        }
    }

    /// A query [`local`](Self::local) handed on: asked upstream, and the
    /// bytes to send back (none when too many forwards are in flight).
    async fn forwarded(&self, q: Box<Message>, client: SocketAddr, tcp: bool) -> Option<Vec<u8>> {
        let Ok(_permit) = self.forwards.try_acquire() else {
            self.busy.increment(1);
            return None;
        };
        let upstreams = self.zones.load().settings.forward.clone();
        let (out, code) = match forward(&upstreams, &q, tcp).await {
            // An answer hickory cannot encode again: SERVFAIL, not silence.
            Some(up) => match super::relay(&up, &q, tcp) {
                Some(out) => (Some(out), up.response_code()),
                None => (super::servfail(&q, tcp), hickory_proto::op::ResponseCode::ServFail),
            },
            None => {
                self.forward_errors.increment(1);
                (super::servfail(&q, tcp), hickory_proto::op::ResponseCode::ServFail)
            }
        };
        self.count(code);
        if self.zones.load().settings.query_log {
            self.log(Some(&q), client, code, tcp);
        }
        out
    }

    /// One query, whichever way it is answered.
    async fn handle(&self, query: &[u8], client: SocketAddr, tcp: bool) -> Option<Vec<u8>> {
        if self.admit(1) == 0 {
            return None;
        }
        match self.local(query, client, tcp) {
            Step::Done(out) => out,
            Step::Forward(q) => self.forwarded(q, client, tcp).await,
        }
    }

    fn log(&self, q: Option<&Message>, client: SocketAddr, code: hickory_proto::op::ResponseCode, tcp: bool) {
        let (name, qtype) = q.map(super::question).unwrap_or_default();
        let rcode = super::RCODES[super::rcode_index(code)];
        tracing::info!(network = %self.name, %client, %name, %qtype, rcode, tcp, "dns query");
    }
}

/// What [`Net::local`] did with a query.
enum Step {
    /// Answered (these bytes) or dropped (none).
    Done(Option<Vec<u8>>),
    /// For the upstreams.
    Forward(Box<Message>),
}

/// Asks the upstreams in turn; the first answer to this question.
async fn forward(upstreams: &[SocketAddr], q: &Message, client_tcp: bool) -> Option<Message> {
    for &up in upstreams {
        let sent = super::upstream_query(q, rand::random());
        let Ok(bytes) = sent.to_vec() else { return None };
        match tokio::time::timeout(UPSTREAM_TIMEOUT, ask_udp(up, &bytes, &sent)).await {
            Ok(Ok(r)) if !r.truncated() || !client_tcp => return Some(r),
            Ok(Ok(r)) => {
                // Truncated: the whole answer over TCP (RFC 7766 §5).
                match tokio::time::timeout(UPSTREAM_TIMEOUT, ask_tcp(up, &bytes, &sent)).await {
                    Ok(Ok(full)) => return Some(full),
                    _ => return Some(r),
                }
            }
            Ok(Err(e)) => tracing::debug!(upstream = %up, "dns forward: {e:#}"),
            Err(_) => tracing::debug!(upstream = %up, "dns forward: no answer within 2 s"),
        }
    }
    None
}

async fn ask_udp(up: SocketAddr, bytes: &[u8], sent: &Message) -> Result<Message> {
    let local: SocketAddr = if up.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let s = tokio::net::UdpSocket::bind(local).await?;
    s.connect(up).await?;
    s.send(bytes).await?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = s.recv(&mut buf).await?;
        if let Ok(r) = Message::from_vec(&buf[..n]) {
            if super::answers(&r, sent) {
                return Ok(r);
            }
        }
    }
}

async fn ask_tcp(up: SocketAddr, bytes: &[u8], sent: &Message) -> Result<Message> {
    let mut s = tokio::net::TcpStream::connect(up).await?;
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
    s.write_all(&out).await?;
    let len = s.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    s.read_exact(&mut buf).await?;
    let r = Message::from_vec(&buf)?;
    anyhow::ensure!(super::answers(&r, sent), "the upstream's TCP answer does not match the question");
    Ok(r)
}

async fn serve_udp(net: Arc<Net>, sock: std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    let sock = match tokio::net::UdpSocket::from_std(sock) {
        Ok(s) => Arc::new(s),
        Err(e) => return tracing::error!(network = %net.name, "dns: {e}"),
    };
    let fd = sock.as_raw_fd();
    let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(mmsg::BATCH);
    // Forwards in flight: aborted with this task (a stopped resolver's
    // socket is then closed at once, not kept by a forward).
    let mut forwards = tokio::task::JoinSet::new();
    loop {
        while forwards.try_join_next().is_some() {}
        // A batch answered is work done: another network's resolver on
        // this thread gets its turn (try_io never yields by itself).
        tokio::task::consume_budget().await;
        if sock.readable().await.is_err() {
            // Only when the runtime goes away.
            return;
        }
        // A batch read and answered with no await in between (the
        // buffers are this thread's); forwards go to tasks of their own.
        let read = sock.try_io(Interest::READABLE, || {
            mmsg::with_batch(|b| {
                let n = b.recv(fd)?;
                for i in 0..net.admit(n) {
                    let (query, from, cut) = b.get(i);
                    let Some(client) = from else { continue };
                    if cut {
                        net.malformed.increment(1);
                        continue;
                    }
                    match net.local(query, client, false) {
                        Step::Done(None) => {}
                        Step::Done(Some(out)) => replies.push((out, client)),
                        Step::Forward(q) => {
                            // Its own task: a forwarded query waits for its
                            // upstream without holding up the others.
                            let (net, sock) = (net.clone(), sock.clone());
                            forwards.spawn(async move {
                                if let Some(out) = net.forwarded(q, client, false).await {
                                    let _ = sock.send_to(&out, client).await;
                                }
                            });
                        }
                    }
                }
                Ok(())
            })
        });
        if let Err(e) = read {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                tracing::debug!(network = %net.name, "dns receive: {e}");
            }
        }
        let mut sent = 0;
        while sent < replies.len() {
            if sock.writable().await.is_err() {
                break;
            }
            match sock.try_io(Interest::WRITABLE, || mmsg::send(fd, &replies[sent..])) {
                Ok(k) => sent += k.max(1),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // This answer cannot go (the client's address is gone):
                // the next ones still do.
                Err(_) => sent += 1,
            }
        }
        replies.clear();
    }
}

async fn serve_tcp(net: Arc<Net>, listener: std::net::TcpListener) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return tracing::error!(network = %net.name, "dns: {e}"),
    };
    // Connections: aborted with this task.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, client)) = listener.accept().await else {
            // Out of descriptors or the like: not a hot loop meanwhile.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while conns.try_join_next().is_some() {}
        let Ok(permit) = net.connections.clone().try_acquire_owned() else {
            net.busy.increment(1);
            continue;
        };
        let net = net.clone();
        conns.spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(TCP_LIFETIME, tcp_connection(&net, stream, client)).await;
        });
    }
}

/// Queries of one TCP connection, in order, until the client closes it,
/// it idles past [`TCP_IDLE`] or an answer cannot be written within it
/// (a client that stops reading).
async fn tcp_connection(net: &Net, mut s: tokio::net::TcpStream, client: SocketAddr) -> Result<()> {
    loop {
        let len = tokio::time::timeout(TCP_IDLE, s.read_u16()).await??;
        let mut q = vec![0u8; usize::from(len)];
        tokio::time::timeout(TCP_IDLE, s.read_exact(&mut q)).await??;
        let Some(out) = net.handle(&q, client, true).await else { continue };
        let mut framed = Vec::with_capacity(out.len() + 2);
        framed.extend_from_slice(&(out.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        framed.extend_from_slice(&out);
        tokio::time::timeout(TCP_IDLE, s.write_all(&framed)).await??;
    }
}

/// Threads of the DNS runtime, and UDP sockets per resolver: one per
/// core, at most 4. The sockets share the address with SO_REUSEPORT, so
/// the kernel spreads clients over them by their address and port, as
/// Unbound and CoreDNS spread theirs over threads.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4)
}

/// [`threads`] UDP sockets and a TCP listener on `addr` port 53, in the
/// calling thread's namespace, with SO_REUSEPORT (see the module docs).
fn bind(addr: Ipv4Addr) -> Result<(Vec<std::net::UdpSocket>, std::net::TcpListener)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let at: SocketAddr = (addr, 53).into();
    let mut udps = Vec::new();
    for _ in 0..threads() {
        let udp = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        udp.set_reuse_port(true)?;
        udp.set_nonblocking(true)?;
        udp.bind(&at.into()).with_context(|| format!("cannot bind UDP {at}"))?;
        udps.push(udp.into());
    }
    let tcp = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    tcp.set_reuse_address(true)?;
    tcp.set_reuse_port(true)?;
    tcp.set_nonblocking(true)?;
    tcp.bind(&at.into()).with_context(|| format!("cannot bind TCP {at}"))?;
    tcp.listen(128)?;
    Ok((udps, tcp.into()))
}

impl Resolvers {
    /// No resolver yet; [`update`](Self::update) starts them.
    pub fn new(engine: Arc<Engine>) -> Result<Resolvers> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads())
            .thread_name("privlink-dns")
            .enable_all()
            .build()
            .context("cannot start the DNS runtime")?;
        Ok(Resolvers {
            rt,
            zones: Arc::new(ArcSwap::from_pointee(Zones::default())),
            engine,
            serving: HashMap::new(),
            swept: Default::default(),
        })
    }

    /// Brings the resolvers in line with `config`: the names it publishes
    /// (answered from the next query on), and a resolver on each network
    /// with `dns`, whose device is `devices[network]` (namespace,
    /// interface index). A resolver whose network, address or device went
    /// is stopped and its address removed. Errors name the network; the
    /// other networks' resolvers are brought in line regardless.
    pub fn update(&mut self, config: &Config, devices: &HashMap<String, (Option<String>, u32)>) -> Result<()> {
        self.zones.store(Arc::new(Zones::build(config)));
        let want: HashMap<&str, (Option<String>, u32, Ipv4Addr)> = config
            .networks
            .iter()
            .filter_map(|n| {
                let (ns, ifindex) = devices.get(&n.name)?.clone();
                Some((n.name.as_str(), (ns, ifindex, n.dns?)))
            })
            .collect();
        let stale: Vec<String> = self
            .serving
            .iter()
            .filter(|(name, s)| want.get(name.as_str()) != Some(&(s.netns.clone(), s.ifindex, s.addr)))
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            let Some(s) = self.serving.remove(&name) else { continue };
            for t in &s.tasks {
                t.abort();
            }
            let (ifindex, addr) = (s.ifindex, s.addr);
            match crate::netns::in_netns(s.netns.as_deref(), move || crate::netlink::set_address(ifindex, addr, false))
            {
                Ok(()) => tracing::info!(network = %name, resolver = %addr, "dns resolver stopped"),
                // The namespace went with the network: nothing left to remove.
                Err(e) => tracing::debug!(network = %name, "dns resolver address: {e:#}"),
            }
        }
        // /32 addresses on the networks' devices that no resolver wants
        // (a previous run's, before a restart or hand-over that changed
        // `dns`) are removed: one would take an endpoint's packets. (The
        // devices are privlink's own; their `address` stays.) Once per
        // device and process: a netlink dump each.
        for n in &config.networks {
            let Some((ns, ifindex)) = devices.get(&n.name).cloned() else { continue };
            if !self.swept.insert((n.name.clone(), ifindex)) {
                continue;
            }
            let keep: Vec<Ipv4Addr> = n.dns.into_iter().chain(n.address.filter(|a| a.1 == 32).map(|a| a.0)).collect();
            let r = crate::netns::in_netns(ns.as_deref(), move || {
                let mut gone = Vec::new();
                for a in crate::netlink::addresses32(ifindex)? {
                    if !keep.contains(&a) {
                        crate::netlink::set_address(ifindex, a, false)?;
                        gone.push(a);
                    }
                }
                Ok(gone)
            });
            match r {
                Ok(gone) if !gone.is_empty() => {
                    tracing::info!(network = %n.name, addresses = ?gone, "dns: left-over resolver addresses removed")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(network = %n.name, "dns: cannot check the device's addresses: {e:#}"),
            }
        }
        let mut failed = Vec::new();
        for (name, (ns, ifindex, addr)) in want {
            if self.serving.contains_key(name) {
                continue;
            }
            let (i, a) = (ifindex, addr);
            let bound = crate::netns::in_netns(ns.as_deref(), move || {
                // Queries to a local address travel over `lo`: a namespace
                // made with `ip netns add` has it down.
                let lo = crate::netlink::ifindex("lo")?;
                crate::netlink::set_up(lo)?;
                crate::netlink::set_address(i, a, true)?;
                bind(a).inspect_err(|_| {
                    // Not left behind: it would take packets for nothing.
                    let _ = crate::netlink::set_address(i, a, false);
                })
            });
            match bound {
                Ok((udps, tcp)) => {
                    let net = Arc::new(Net::new(name, self.zones.clone(), self.engine.clone()));
                    let mut tasks: Vec<JoinHandle<()>> =
                        udps.into_iter().map(|u| self.rt.spawn(serve_udp(net.clone(), u))).collect();
                    tasks.push(self.rt.spawn(serve_tcp(net, tcp)));
                    tracing::info!(network = %name, resolver = %addr, "dns resolver started");
                    self.serving.insert(name.to_string(), Serving { netns: ns, ifindex, addr, tasks });
                }
                Err(e) => failed.push(format!("network {name}: dns {addr}: {e:#}")),
            }
        }
        anyhow::ensure!(failed.is_empty(), "{}", failed.join("; "));
        Ok(())
    }
}

impl std::fmt::Debug for Resolvers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolvers").field("serving", &self.serving.keys().collect::<Vec<_>>()).finish()
    }
}

impl Drop for Resolvers {
    fn drop(&mut self) {
        for s in self.serving.values() {
            for t in &s.tasks {
                t.abort();
            }
        }
    }
}
