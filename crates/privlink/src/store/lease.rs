//! NAT addresses owned by lease: which of a service's NAT addresses this
//! host may use, in a fleet that shares them through etcd.
//!
//! Why a lease: no address and port may be handed out by two hosts at
//! once, and a host that dies must give its addresses back without anyone
//! deciding it is dead. Each host keeps one etcd lease alive; everything it
//! owns is a key on that lease, and etcd deletes those keys when the lease
//! expires (`lease_ttl` after the last renewal). As Cilium's node keys and
//! Calico's IPAM blocks do, an address is claimed by creating its key only
//! if it is absent, in one transaction, so two hosts never both succeed.
//!
//! Keys (all on the host's lease):
//! - `<prefix>/hosts/<host>/alive`: the host is up.
//! - `<prefix>/serving/<service>/<host>`: the host serves the service (has
//!   an endpoint of it); the fair share is the service's addresses divided
//!   by the hosts serving it, rounded up.
//! - `<prefix>/nat/<service>/<ip>` = `<host>`: the host owns the address.
//!
//! Every round (about a second) a host renews its lease, claims free
//! addresses up to its fair share, and gives back addresses beyond it (so
//! a host that joins gets its share): out of its own use first, and out
//! of etcd only once the daemon has applied that, so that no other host
//! can claim an address this one still hands out. While etcd cannot be reached nothing
//! moves: the host keeps what it holds (etcd expires no lease without a
//! leader). A lease found expired (the host was away past `lease_ttl`)
//! means its addresses may be someone else's now: it holds none until it
//! claims again.
//!
//! The lease id is kept in the state directory (`store-lease`), so a
//! restart or hand-over within `lease_ttl` resumes the same lease and
//! keeps the addresses and their flows.

use super::etcd::Etcd;
use super::StoreError;
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Per service, the NAT addresses a host holds (or may use).
pub type Held = BTreeMap<String, BTreeSet<IpAddr>>;

/// The services this host serves, with each one's configured NAT
/// addresses. Set by the daemon on every (re)load; read by each round.
pub type Serving = Arc<Mutex<BTreeMap<String, Vec<IpAddr>>>>;

/// This host's lease and what it holds under it.
#[derive(Debug)]
pub struct Owner {
    etcd: Arc<Etcd>,
    ttl: Duration,
    /// Where the lease id is kept between runs.
    file: PathBuf,
    lease: i64,
    /// When etcd last confirmed the lease (a keep-alive answered).
    renewed_at: Instant,
    held: Held,
    /// Addresses beyond the share, already out of `held`: their keys are
    /// deleted once the daemon has stopped using them (`applied`), so no
    /// other host claims an address this one still hands out.
    releasing: Vec<(String, IpAddr)>,
    /// Keys put on the current lease (`alive`, `serving/...`): put once
    /// per lease, not every round (each put is a revision in etcd's
    /// history).
    registered: BTreeSet<String>,
}

impl Owner {
    /// Resumes the lease kept in `state_dir` if etcd still has it, else
    /// grants a new one of `ttl` (whole seconds).
    pub fn start(etcd: Arc<Etcd>, ttl: Duration, state_dir: &Path) -> Result<Owner, StoreError> {
        let file = state_dir.join("store-lease");
        let kept = std::fs::read_to_string(&file).ok().and_then(|s| s.trim().parse::<i64>().ok());
        let mut o = Owner {
            etcd,
            ttl,
            file,
            lease: 0,
            renewed_at: Instant::now(),
            held: Held::new(),
            releasing: Vec::new(),
            registered: BTreeSet::new(),
        };
        if let Some(id) = kept {
            let asked = Instant::now();
            let alive = o.etcd.block(|mut c| async move { c.lease_time_to_live(id, None).await.map(|r| r.ttl()) });
            // etcd reports the time left in whole seconds, rounded down:
            // a live lease in its last second reads 0 (seen with etcd 3.4:
            // a 2 s lease 1.3 s after its renewal, "remaining(0s)"); an
            // expired or unknown one reads -1.
            if alive? >= 0 {
                o.lease = id;
                o.renewed_at = asked;
                tracing::info!(lease = id, "store: resuming the lease of the last run");
            }
        }
        if o.lease == 0 {
            o.grant()?;
        }
        Ok(o)
    }

    fn grant(&mut self) -> Result<(), StoreError> {
        let secs = self.ttl.as_secs().max(1) as i64;
        let asked = Instant::now();
        let id = self.etcd.block(|mut c| async move { c.lease_grant(secs, None).await.map(|r| r.id()) })?;
        self.lease = id;
        self.renewed_at = asked;
        self.held.clear();
        self.releasing.clear();
        self.registered.clear();
        let _ = std::fs::create_dir_all(self.file.parent().unwrap_or(Path::new(".")));
        if let Err(e) = crate::state::write_atomic(&self.file, id.to_string().as_bytes()) {
            tracing::warn!("cannot keep the lease id: {e:#}");
        }
        tracing::info!(lease = id, ttl_s = secs, "store: lease granted");
        Ok(())
    }

    /// The lease's id.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// What this host holds now.
    pub fn held(&self) -> &Held {
        &self.held
    }

    /// When etcd last confirmed the lease: it expires `lease_ttl` later at
    /// the earliest, so no new flow may start after that without a newer
    /// confirmation.
    pub fn renewed_at(&self) -> Instant {
        self.renewed_at
    }

    /// Renews the lease (one keep-alive, answered). A lease etcd no longer
    /// has (it expired: this host was away past its TTL) is replaced by a
    /// new one, and everything held under the old one is given up.
    fn renew(&mut self) -> Result<(), StoreError> {
        let id = self.lease;
        let asked = Instant::now();
        let ttl = self.etcd.block(|mut c| async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
            keeper.keep_alive().await?;
            Ok::<Option<i64>, etcd_client::Error>(stream.message().await?.map(|r| r.ttl()))
        });
        let ttl = match ttl {
            Ok(Some(t)) => t,
            // The stream ended without an answer: not a verdict on the lease.
            Ok(None) => return Err(StoreError::Unavailable("etcd: the keep-alive stream ended".into())),
            // etcd answered that the lease is gone (it expired).
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => 0,
            Err(e) => return Err(StoreError::from(e)),
        };
        if ttl > 0 {
            self.renewed_at = asked;
            return Ok(());
        }
        tracing::warn!(lease = id, "store: the lease expired (away past lease_ttl): its addresses are given up");
        for (service, ips) in &self.held {
            for ip in ips {
                tracing::warn!(service = %service, nat_ip = %ip, "NAT address lost with the lease");
            }
        }
        self.grant()
    }

    /// Renews the lease if a third of its TTL has passed since the last
    /// confirmation (a long round must not let it lapse).
    fn renew_if_due(&mut self) -> Result<(), StoreError> {
        if self.renewed_at.elapsed() > self.ttl / 3 {
            self.renew()?;
        }
        Ok(())
    }

    /// One round: renew the lease, mark this host alive and serving, and
    /// claim or give back addresses to reach each service's fair share.
    /// `applied`: the daemon has applied every `held` this owner reported
    /// (addresses given back in an earlier round are then no longer used,
    /// and their keys go). Returns whether what this host holds changed.
    /// An error leaves what it holds as it was (etcd unreachable: nothing
    /// moves).
    pub fn round(&mut self, serving: &BTreeMap<String, Vec<IpAddr>>, applied: bool) -> Result<bool, StoreError> {
        let before = self.held.clone();
        self.renew()?;
        let layout = self.etcd.layout.clone();
        let (host, prefix) = (layout.host.clone(), layout.prefix.clone());
        // Alive and serving keys, once per lease.
        let mut keys = vec![format!("{}alive", layout.host_root())];
        keys.extend(serving.keys().map(|s| format!("{prefix}/serving/{s}/{host}")));
        let new: Vec<String> = keys.into_iter().filter(|k| !self.registered.contains(k)).collect();
        if !new.is_empty() {
            let lease = self.lease;
            let ops: Vec<TxnOp> =
                new.iter().map(|k| TxnOp::put(k.clone(), "1", Some(PutOptions::new().with_lease(lease)))).collect();
            self.etcd.block(|mut c| async move { c.txn(Txn::new().and_then(ops)).await.map(drop) })?;
            self.registered.extend(new);
        }
        // One read of the claims and one of the serving keys, for every
        // service at once.
        let lease = self.lease;
        let (nat, serving_root) = (format!("{prefix}/nat/"), format!("{prefix}/serving/"));
        // Per service: each claimed address's (host, lease).
        let mut owners: BTreeMap<String, BTreeMap<IpAddr, (String, i64)>> = BTreeMap::new();
        for (key, value, l) in self.list(&nat)? {
            let Some((service, ip)) = key.strip_prefix(&nat).and_then(|r| r.split_once('/')) else { continue };
            let Ok(ip) = ip.parse::<IpAddr>() else { continue };
            owners.entry(service.to_string()).or_default().insert(ip, (value, l));
        }
        let mut hosts: BTreeMap<String, usize> = BTreeMap::new();
        for (key, _, l) in self.list(&serving_root)? {
            let Some((service, _)) = key.strip_prefix(&serving_root).and_then(|r| r.split_once('/')) else { continue };
            *hosts.entry(service.to_string()).or_default() += 1;
            // Serving keys of services no longer served go.
            if l == lease && !serving.contains_key(service) {
                self.delete(&key)?;
                self.registered.remove(&key);
            }
        }
        // What this lease holds that the config no longer has (a service
        // not served, an address removed from `nat_ips`) is not in use and
        // goes at once; addresses given back earlier, now out of use
        // (`applied`), go too.
        let releasing = if applied { std::mem::take(&mut self.releasing) } else { Vec::new() };
        for (service, ips) in &mut owners {
            let gone: Vec<IpAddr> = ips
                .iter()
                .filter(|(ip, (_, l))| {
                    *l == lease
                        && (!serving.get(service).is_some_and(|c| c.contains(ip))
                            || releasing.contains(&(service.clone(), **ip)))
                })
                .map(|(ip, _)| *ip)
                .collect();
            for ip in gone {
                self.delete(&format!("{nat}{service}/{ip}"))?;
                ips.remove(&ip);
                let why = if releasing.contains(&(service.clone(), ip)) {
                    "beyond this host's share"
                } else {
                    "no longer configured here"
                };
                tracing::info!(service = %service, nat_ip = %ip, "NAT address given back ({why})");
            }
        }
        let mut held = Held::new();
        for (service, ips) in serving {
            self.renew_if_due()?;
            let hosts = hosts.get(service).copied().unwrap_or(0).max(1);
            let share = ips.len().div_ceil(hosts);
            let none = BTreeMap::new();
            let owners = owners.get(service).unwrap_or(&none);
            let releasing = &self.releasing;
            let mut mine: Vec<IpAddr> = ips
                .iter()
                .copied()
                .filter(|ip| owners.get(ip).is_some_and(|(h, l)| *h == host && *l == lease))
                .filter(|ip| !releasing.contains(&(service.clone(), *ip)))
                .collect();
            // Beyond the share: the highest first leaves `held` now; its key
            // goes once the daemon no longer uses it (a later round).
            while mine.len() > share {
                let Some(ip) = mine.pop() else { break };
                tracing::info!(service = %service, nat_ip = %ip, share, hosts, "NAT address to give back: out of use first");
                self.releasing.push((service.clone(), ip));
            }
            // Below it: claim free ones, starting at a place of this host's
            // own so that hosts claiming at once mostly try different ones.
            let free: Vec<IpAddr> = ips.iter().copied().filter(|ip| !owners.contains_key(ip)).collect();
            let start = if free.is_empty() { 0 } else { (fnv(&host) as usize) % free.len() };
            for ip in free.iter().cycle().skip(start).take(free.len()) {
                if mine.len() >= share {
                    break;
                }
                let (k2, h2) = (format!("{nat}{service}/{ip}"), host.clone());
                let won = self.etcd.block(|mut c| async move {
                    let t = Txn::new()
                        .when([Compare::version(k2.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(k2, h2, Some(PutOptions::new().with_lease(lease)))]);
                    c.txn(t).await.map(|r| r.succeeded())
                })?;
                if won {
                    tracing::info!(service = %service, nat_ip = %ip, share, hosts, "NAT address claimed");
                    mine.push(*ip);
                }
            }
            held.insert(service.clone(), mine.into_iter().collect());
        }
        self.held = held;
        for (service, ips) in &self.held {
            metrics::gauge!("privlink_nat_ips_held", "service" => service.clone()).set(ips.len() as f64);
        }
        for service in before.keys().filter(|s| !self.held.contains_key(*s)) {
            metrics::gauge!("privlink_nat_ips_held", "service" => service.clone()).set(0.0);
        }
        Ok(self.held != before)
    }

    /// Deletes `key` if it is still on this host's lease.
    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let (k, l) = (key.to_string(), self.lease);
        self.etcd
            .block(|mut c| async move {
                let t = Txn::new()
                    .when([Compare::lease(k.clone(), CompareOp::Equal, l)])
                    .and_then([TxnOp::delete(k, None)]);
                c.txn(t).await.map(drop)
            })
            .map_err(StoreError::from)
    }

    /// Every key under `prefix`, with its value and lease.
    fn list(&self, prefix: &str) -> Result<Vec<(String, String, i64)>, StoreError> {
        let p = prefix.to_string();
        let kvs = self.etcd.block(|mut c| async move {
            c.get(p, Some(GetOptions::new().with_prefix())).await.map(|mut r| r.take_kvs())
        })?;
        Ok(kvs
            .iter()
            .map(|kv| {
                let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
                (text(kv.key()), text(kv.value()), kv.lease())
            })
            .collect())
    }

    /// Ends the lease (a clean stop): etcd deletes every key on it, so
    /// other hosts may claim the addresses at once.
    pub fn revoke(self) {
        let id = self.lease;
        match self.etcd.block(|mut c| async move { c.lease_revoke(id).await.map(drop) }) {
            Ok(()) => {
                tracing::info!(lease = id, "store: lease revoked; its NAT addresses are free");
                let _ = std::fs::remove_file(&self.file);
            }
            // Kept in the state directory: a start before it expires
            // resumes it, with its addresses.
            Err(e) => tracing::warn!(lease = id, "store: cannot revoke the lease ({e}); it expires by itself"),
        }
    }
}

/// FNV-1a of a host name: where its claims start.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// The addresses of `service` a fleet host may use: those it holds.
pub fn usable(held: &Held, service: &str, configured: &[IpAddr]) -> Vec<IpAddr> {
    let h = held.get(service);
    configured.iter().copied().filter(|ip| h.is_some_and(|h| h.contains(ip))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_uses_only_the_configured_addresses_it_holds() {
        let a = IpAddr::from([192, 168, 100, 4]);
        let b = IpAddr::from([192, 168, 100, 5]);
        let mut held = Held::new();
        assert!(usable(&held, "s", &[a, b]).is_empty());
        held.insert("s".into(), [b, IpAddr::from([1, 1, 1, 1])].into_iter().collect());
        assert_eq!(usable(&held, "s", &[a, b]), vec![b]);
        assert!(usable(&held, "t", &[a, b]).is_empty());
    }
}
