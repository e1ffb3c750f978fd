//! One TCP stream for `bench/e2e`'s PROXY protocol case: the same sender
//! and receiver with and without a PROXY v2 header in front, so the two
//! figures differ only by what privlink does for the header.
//!
//! `ppstream server ADDR:PORT [proxy]` accepts; with `proxy`, each
//! connection must start with a PROXY v2 header, which it checks and skips;
//! then it reads to the end and answers the byte count. `ppstream client
//! ADDR:PORT SECONDS` sends for SECONDS, waits for the count, and prints
//! Gbit/s delivered.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn fail(msg: String) -> ! {
    eprintln!("ppstream: {msg}");
    std::process::exit(1)
}

fn serve(mut c: TcpStream, proxy: bool) -> std::io::Result<()> {
    if proxy {
        let mut h = [0u8; 16];
        c.read_exact(&mut h)?;
        if h[..12] != *b"\r\n\r\n\0\r\nQUIT\n" || h[12] != 0x21 {
            return Err(std::io::Error::other("not a PROXY v2 header"));
        }
        let mut rest = vec![0u8; usize::from(u16::from_be_bytes([h[14], h[15]]))];
        c.read_exact(&mut rest)?;
    }
    let mut buf = vec![0u8; 1 << 18];
    let mut total = 0u64;
    loop {
        match c.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    c.write_all(format!("{total}\n").as_bytes())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: ppstream server ADDR:PORT [proxy] | ppstream client ADDR:PORT SECONDS";
    let addr: SocketAddr = args.get(2).and_then(|a| a.parse().ok()).unwrap_or_else(|| fail(usage.into()));
    match args[1].as_str() {
        "server" => {
            let proxy = args.get(3).is_some_and(|a| a == "proxy");
            let l = TcpListener::bind(addr).unwrap_or_else(|e| fail(format!("cannot bind {addr}: {e}")));
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    if let Err(e) = serve(c, proxy) {
                        eprintln!("ppstream: {e}");
                    }
                });
            }
        }
        "client" => {
            let secs: f64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or_else(|| fail(usage.into()));
            let mut c = TcpStream::connect(addr).unwrap_or_else(|e| fail(format!("cannot connect {addr}: {e}")));
            let buf = vec![0x5au8; 1 << 17];
            let (start, until) = (Instant::now(), Duration::from_secs_f64(secs));
            let mut sent = 0u64;
            while start.elapsed() < until {
                c.write_all(&buf).unwrap_or_else(|e| fail(format!("send: {e}")));
                sent += buf.len() as u64;
            }
            c.shutdown(std::net::Shutdown::Write).unwrap_or_else(|e| fail(format!("shutdown: {e}")));
            let mut answer = String::new();
            c.read_to_string(&mut answer).unwrap_or_else(|e| fail(format!("answer: {e}")));
            let got: u64 = answer.trim().parse().unwrap_or_else(|_| fail(format!("bad answer `{answer}`")));
            if got != sent {
                fail(format!("sent {sent} bytes, the server counted {got}"));
            }
            println!("{:.2}", got as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9);
        }
        _ => fail(usage.into()),
    }
}
