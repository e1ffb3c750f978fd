//! Backend health probes, off the packet path.
//!
//! One thread lives in the provider namespace (it entered it with
//! `setns(2)`, so its sockets are the provider side's) and runs a small
//! tokio runtime with one task per (service, backend) that has `health`: a
//! TCP connect, or an HTTP/1.0 `GET path` whose status must be 2xx, every
//! `interval`, each within `timeout`. Probes come from the provider
//! namespace's own address (the kernel picks it by the route to the
//! backend), not from a NAT IP: they take no NAT port and no flow slot, and
//! a backend's firewall can tell them apart.
//!
//! A backend goes down after `unhealthy_after` failures in a row and comes
//! back after `healthy_after` successes in a row; each change goes to the
//! engine ([`Engine::set_backend_up`]), which rebuilds that service's Maglev
//! table over its healthy backends for new flows. Flows already on a down
//! backend keep it (docs/NAT-BEHAVIOUR.md says why).

use anyhow::{Context, Result};
use privlink_config::{Config, Health, HealthKind};
use privlink_core::Engine;
use std::net::IpAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The running probes; dropping it stops them.
#[derive(Debug)]
pub struct Prober {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Target {
    service: String,
    backend: IpAddr,
    health: Health,
    /// Taking new flows when the probes start (the engine's view).
    up: bool,
}

impl Prober {
    /// Starts probing the backends of every service of `config` that has
    /// `health`; backends of services without it are marked up.
    pub fn start(engine: &Arc<Engine>, config: &Config) -> Result<Option<Prober>> {
        let states = engine.backends();
        let mut targets = Vec::new();
        for s in &config.services {
            for &b in &s.backends {
                let up = states.iter().find(|x| x.service == s.name && x.backend == b).is_none_or(|x| x.up);
                match &s.health {
                    Some(h) => targets.push(Target { service: s.name.clone(), backend: b, health: h.clone(), up }),
                    None if !up => {
                        engine.set_backend_up(&s.name, b, true);
                    }
                    None => {}
                }
            }
        }
        if targets.is_empty() {
            return Ok(None);
        }
        let ns = config.provider.netns.as_ref().map(|n| crate::netns::netns_path(n));
        let ns_file = ns.as_ref().map(std::fs::File::open).transpose().context("provider namespace")?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let engine = engine.clone();
        let thread = std::thread::Builder::new()
            .name("privlink-health".into())
            .spawn(move || {
                if let Some(f) = ns_file {
                    use std::os::fd::AsRawFd;
                    // SAFETY: setns on a valid namespace fd changes only this
                    // thread's network namespace, for the probes' sockets.
                    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        tracing::error!(
                            "health probes: cannot enter the provider namespace: {}",
                            std::io::Error::last_os_error()
                        );
                        return;
                    }
                }
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => return tracing::error!("health probes: cannot start a runtime: {e}"),
                };
                rt.block_on(async move {
                    for t in targets {
                        tokio::spawn(probe_loop(engine.clone(), t));
                    }
                    let _ = stopped.await;
                });
            })
            .context("cannot start the health probes")?;
        Ok(Some(Prober { stop: Some(stop), thread: Some(thread) }))
    }
}

async fn probe_loop(engine: Arc<Engine>, t: Target) {
    let h = &t.health;
    let mut up = t.up;
    let (mut oks, mut fails) = (0u32, 0u32);
    let mut tick = tokio::time::interval(h.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ok = matches!(tokio::time::timeout(h.timeout, probe(t.backend, h)).await, Ok(Ok(true)));
        if ok {
            (oks, fails) = (oks.saturating_add(1), 0);
        } else {
            (oks, fails) = (0, fails.saturating_add(1));
        }
        let now_up = if up { fails < h.unhealthy_after } else { oks >= h.healthy_after };
        if now_up != up {
            up = now_up;
            engine.set_backend_up(&t.service, t.backend, up);
            if up {
                tracing::info!(service = %t.service, backend = %t.backend, "backend up: takes new flows again");
            } else {
                tracing::warn!(service = %t.service, backend = %t.backend, "backend down: no new flows; its flows stay");
            }
        }
    }
}

/// One probe: whether the backend answered as healthy.
async fn probe(backend: IpAddr, h: &Health) -> std::io::Result<bool> {
    let mut s = tokio::net::TcpStream::connect((backend, h.port)).await?;
    let HealthKind::Http { path } = &h.kind else { return Ok(true) };
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {backend}:{}\r\nUser-Agent: privlink-health\r\nConnection: close\r\n\r\n",
        h.port
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < buf.len() {
        let k = s.read(&mut buf[n..]).await?;
        if k == 0 {
            break;
        }
        n += k;
        if buf[..n].contains(&b'\n') {
            break;
        }
    }
    // "HTTP/1.x NNN ..."
    let line = String::from_utf8_lossy(&buf[..n]);
    let status = line.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok());
    Ok(line.starts_with("HTTP/") && status.is_some_and(|c| (200..300).contains(&c)))
}
