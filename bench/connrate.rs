//! Connection-rate load for `bench/e2e`: how many new TCP connections per
//! second get through a path.
//!
//! `connrate server ADDR:PORT` accepts and closes; `connrate client
//! ADDR:PORT SECONDS THREADS` opens connections (connect, wait for the
//! server's close, close) as fast as it can for SECONDS and prints the rate.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: connrate server ADDR:PORT | connrate client ADDR:PORT SECONDS THREADS";
    let addr: SocketAddr = match args.get(2).and_then(|a| a.parse().ok()) {
        Some(a) => a,
        None => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    match args[1].as_str() {
        "server" => {
            let l = TcpListener::bind(addr).unwrap_or_else(|e| {
                eprintln!("connrate: cannot bind {addr}: {e}");
                std::process::exit(1)
            });
            for c in l.incoming() {
                drop(c);
            }
        }
        "client" => {
            let secs: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
            let threads: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(4);
            let done = Arc::new(AtomicU64::new(0));
            let failed = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let start = Instant::now();
            let hs: Vec<_> = (0..threads)
                .map(|_| {
                    let (done, failed, stop) = (done.clone(), failed.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let mut b = [0u8; 1];
                        while !stop.load(Ordering::Relaxed) {
                            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                                Ok(mut s) => {
                                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                                    let _ = s.read(&mut b);
                                    done.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(_) => {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_secs(secs));
            stop.store(true, Ordering::Relaxed);
            for h in hs {
                let _ = h.join();
            }
            let el = start.elapsed().as_secs_f64();
            println!("{:.0} {}", done.load(Ordering::Relaxed) as f64 / el, failed.load(Ordering::Relaxed));
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
