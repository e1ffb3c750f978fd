//! Batched UDP for the resolvers: up to [`BATCH`] queries per
//! `recvmmsg(2)` and their answers in one `sendmmsg(2)`, as NSD and
//! Knot answer. Under load a wake-up then costs two system calls for a
//! batch rather than two per query (measured: docs/BENCHMARKS.md, "Private
//! DNS").
//!
//! The buffers are per thread ([`with_batch`]): the resolvers' tasks
//! answer a batch without awaiting in between, so one set per runtime
//! thread serves every network's sockets.

use socket2::SockAddr;
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// Datagrams read per call at most.
pub const BATCH: usize = 32;
/// Bytes of a query read at most; a longer datagram is cut short and
/// reported as such (`truncated`), never answered.
pub const QUERY_MAX: usize = 2048;

/// One thread's receive buffers.
pub struct Batch {
    bufs: Box<[u8]>,
    addrs: Box<[libc::sockaddr_storage]>,
    got: Vec<(usize, libc::socklen_t, bool)>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("got", &self.got.len()).finish()
    }
}

thread_local! {
    static BATCH_BUFS: RefCell<Batch> = RefCell::new(Batch::new());
}

/// Runs `f` with this thread's buffers (never re-entered: `f` must not
/// call back in).
pub fn with_batch<T>(f: impl FnOnce(&mut Batch) -> T) -> T {
    BATCH_BUFS.with_borrow_mut(f)
}

impl Batch {
    fn new() -> Batch {
        Batch {
            bufs: vec![0u8; BATCH * QUERY_MAX].into_boxed_slice(),
            // SAFETY: all-zero is a valid sockaddr_storage.
            addrs: (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
            got: Vec::with_capacity(BATCH),
        }
    }

    /// Reads what is waiting on `fd`, up to [`BATCH`] datagrams, without
    /// blocking (`WouldBlock` when nothing is).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: all-zero is a valid iovec and mmsghdr; each header points
        // at its own slice of `bufs` and its own `addrs` entry, which
        // outlive the call.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut hdr: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let base = self.bufs.as_mut_ptr();
        for i in 0..BATCH {
            // SAFETY: i * QUERY_MAX + QUERY_MAX <= bufs.len().
            iov[i] = libc::iovec { iov_base: unsafe { base.add(i * QUERY_MAX) }.cast(), iov_len: QUERY_MAX };
            hdr[i].msg_hdr.msg_name = std::ptr::from_mut(&mut self.addrs[i]).cast();
            hdr[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr[i].msg_hdr.msg_iov = &mut iov[i];
            hdr[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `hdr` holds BATCH valid headers (see above).
        let n = unsafe {
            libc::recvmmsg(fd, hdr.as_mut_ptr(), BATCH as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.got.clear();
        for h in &hdr[..n as usize] {
            let cut = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.got.push(((h.msg_len as usize).min(QUERY_MAX), h.msg_hdr.msg_namelen, cut));
        }
        Ok(n as usize)
    }

    /// Datagram `i` of the last [`recv`](Self::recv): its bytes, its
    /// sender, and whether it was cut short.
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>, bool) {
        let (len, namelen, cut) = self.got[i];
        let from = socket_addr(&self.addrs[i], namelen);
        (&self.bufs[i * QUERY_MAX..i * QUERY_MAX + len], from, cut)
    }
}

/// The IPv4 or IPv6 address and port the kernel wrote into `s`.
fn socket_addr(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: a sockaddr_storage holding AF_INET is a sockaddr_in.
            let a = unsafe { &*std::ptr::from_ref(s).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: a sockaddr_storage holding AF_INET6 is a sockaddr_in6.
            let a = unsafe { &*std::ptr::from_ref(s).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Sends `out` (answer, client) on `fd` with one `sendmmsg(2)`, without
/// blocking: how many went (`WouldBlock` when none could).
pub fn send(fd: RawFd, out: &[(Vec<u8>, SocketAddr)]) -> io::Result<usize> {
    let out = &out[..out.len().min(BATCH)];
    let addrs: Vec<SockAddr> = out.iter().map(|(_, a)| SockAddr::from(*a)).collect();
    // SAFETY: as in `Batch::recv`; the headers point into `out` and
    // `addrs`, which outlive the call, and are only read.
    let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    let mut hdr: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (i, ((bytes, _), addr)) in out.iter().zip(&addrs).enumerate() {
        iov[i] = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
        hdr[i].msg_hdr.msg_name = addr.as_ptr().cast_mut().cast();
        hdr[i].msg_hdr.msg_namelen = addr.len();
        hdr[i].msg_hdr.msg_iov = &mut iov[i];
        hdr[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `hdr[..out.len()]` are valid headers (see above).
    let n = unsafe { libc::sendmmsg(fd, hdr.as_mut_ptr(), out.len() as libc::c_uint, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_goes_in_and_out_with_its_senders() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let at = server.local_addr().expect("addr");
        let clients: Vec<std::net::UdpSocket> =
            (0..3).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind")).collect();
        for (i, c) in clients.iter().enumerate() {
            c.send_to(&[i as u8; 5], at).expect("send");
        }
        c_send_big(&clients[0], at);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let replies = with_batch(|b| {
            let n = b.recv(server.as_raw_fd()).expect("recv");
            assert_eq!(n, 4);
            (0..n)
                .map(|i| {
                    let (q, from, cut) = b.get(i);
                    assert_eq!(cut, i == 3, "only the oversize one is cut");
                    (q.iter().map(|x| x + 1).take(5).collect::<Vec<u8>>(), from.expect("sender"))
                })
                .collect::<Vec<_>>()
        });
        assert_eq!(send(server.as_raw_fd(), &replies).expect("send"), 4);
        for (i, c) in clients.iter().enumerate() {
            let mut buf = [0u8; 16];
            c.set_read_timeout(Some(std::time::Duration::from_secs(1))).expect("timeout");
            let n = c.recv(&mut buf).expect("reply");
            assert_eq!(&buf[..n], &[i as u8 + 1; 5], "client {i} got its own answer");
        }
        with_batch(|b| {
            let e = b.recv(server.as_raw_fd()).expect_err("nothing waiting");
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        });
    }

    fn c_send_big(c: &std::net::UdpSocket, at: SocketAddr) {
        c.send_to(&vec![9u8; QUERY_MAX + 100], at).expect("send");
    }
}
