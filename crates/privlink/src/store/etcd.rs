//! The fleet's shared configuration in etcd (`[store]`): reading a host's
//! documents at one revision, writing a single-host config in (`privlink
//! store load`), and watching for changes, which the daemon applies as a
//! SIGHUP reload.
//!
//! Why whole re-reads instead of applying watch events one by one: a
//! change applies exactly as a reload does (validated as a whole, the last
//! good state kept), and a host's documents are few (its networks and
//! endpoints, and the services); the watch only says *when* to re-read.
//! The `etcd-client` crate resumes no watch by itself, so the watcher
//! resumes from the last revision it saw, and re-reads (a resync) when
//! that revision was compacted or the stream broke.
//!
//! Calls block on a small runtime of this module's own, so the daemon's
//! reconfiguration thread (which is not async) can use them.

use super::StoreError;
use etcd_client::{Client, ConnectOptions, GetOptions, Txn, TxnOp, WatchOptions};
use privlink_config::{Doc, Layout, Store};
use std::time::Duration;

/// etcd's default limit of operations in one transaction
/// (`--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;
/// Keys read per request when listing (a paged read at one revision).
const PAGE: i64 = 500;
/// How long one request may take before etcd counts as unreachable.
const TIMEOUT: Duration = Duration::from_secs(3);
/// A watch silent this long is asked for a progress notification; silent
/// as long again, it counts as broken.
const PROGRESS: Duration = Duration::from_secs(5);

/// A connection to the etcd cluster of a `[store]`.
pub struct Etcd {
    rt: tokio::runtime::Runtime,
    client: Client,
    pub layout: Layout,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").field("layout", &self.layout).finish_non_exhaustive()
    }
}

impl Etcd {
    /// Connects to `store.etcd` (lazily: an unreachable cluster fails the
    /// first request, within [`TIMEOUT`], not this call).
    pub fn connect(store: &Store) -> Result<Etcd, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("privlink-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot start the etcd runtime: {e}")))?;
        let options = ConnectOptions::new()
            .with_connect_timeout(TIMEOUT)
            .with_timeout(TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), TIMEOUT);
        let endpoints: Vec<String> = store
            .etcd
            .iter()
            .map(|u| u.strip_prefix("http://").unwrap_or(u).trim_end_matches('/').to_string())
            .collect();
        let client = rt.block_on(Client::connect(endpoints, Some(options)))?;
        Ok(Etcd { rt, client, layout: Layout { prefix: store.prefix.clone(), host: store.host.clone() } })
    }

    /// Runs one request (`f` gets a client handle) to completion on this
    /// module's runtime, within [`TIMEOUT`].
    pub fn block<T, Fut>(&self, f: impl FnOnce(Client) -> Fut) -> Result<T, etcd_client::Error>
    where
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>> + Send,
        T: Send,
    {
        let fut = f(self.client.clone());
        self.run(async move { tokio::time::timeout(TIMEOUT, fut).await }).unwrap_or_else(|_| {
            Err(etcd_client::Error::IoError(std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out")))
        })
    }

    /// Runs `fut` to completion on this module's runtime. Called from async
    /// code (the control API's handlers), it blocks a thread of its own, not
    /// the caller's runtime (where `block_on` would panic).
    fn run<T: Send>(&self, fut: impl std::future::Future<Output = T> + Send) -> T {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.rt.block_on(fut);
        }
        std::thread::scope(|s| match s.spawn(|| self.rt.block_on(fut)).join() {
            Ok(t) => t,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }

    /// This host's documents (every service, its own networks and
    /// endpoints), read page by page at one revision; with that revision.
    pub fn read(&self) -> Result<(Vec<Doc>, i64), StoreError> {
        let mut c = self.client.clone();
        let layout = self.layout.clone();
        self.run(async move {
            let mut docs = Vec::new();
            let mut revision = 0;
            for prefix in [layout.services(), layout.host_root()] {
                let end = prefix_end(&prefix);
                let mut from = prefix.clone().into_bytes();
                loop {
                    let mut o = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
                    if revision > 0 {
                        o = o.with_revision(revision);
                    }
                    let r = c.get(from.clone(), Some(o)).await?;
                    if revision == 0 {
                        revision = r.header().map_or(0, |h| h.revision());
                    }
                    for kv in r.kvs() {
                        let key = String::from_utf8_lossy(kv.key()).to_string();
                        let Some((kind, name)) = layout.parse_key(&key) else { continue };
                        let text = String::from_utf8(kv.value().to_vec())
                            .map_err(|_| StoreError::Corrupt(format!("etcd:{key}: not UTF-8")))?;
                        docs.push(Doc { key, kind, name, text });
                    }
                    match (r.more(), r.kvs().last()) {
                        (true, Some(last)) => {
                            from = last.key().to_vec();
                            from.push(0);
                        }
                        _ => break,
                    }
                }
            }
            Ok((docs, revision))
        })
    }

    /// Writes `docs` (one host's config, split by
    /// [`privlink_config::documents`]) and deletes this host's networks and
    /// endpoints that `docs` no longer has (services other hosts may use
    /// are never deleted). At most [`MAX_TXN_OPS`] operations per
    /// transaction: services first, then networks, then endpoints, so that
    /// a host watching meanwhile sees at worst an endpoint missing, never
    /// one pointing at nothing. Returns the operations done.
    pub fn load(&self, docs: &[Doc]) -> Result<usize, StoreError> {
        let (old, _) = self.read()?;
        let mut ops: Vec<TxnOp> = docs.iter().map(|d| TxnOp::put(d.key.clone(), d.text.clone(), None)).collect();
        let host_root = self.layout.host_root();
        for o in old.iter().filter(|o| o.key.starts_with(&host_root)) {
            if !docs.iter().any(|d| d.key == o.key) {
                ops.push(TxnOp::delete(o.key.clone(), None));
            }
        }
        let n = ops.len();
        let mut c = self.client.clone();
        self.run(async move {
            let mut ops = ops.into_iter().peekable();
            while ops.peek().is_some() {
                let chunk: Vec<TxnOp> = ops.by_ref().take(MAX_TXN_OPS).collect();
                c.txn(Txn::new().and_then(chunk)).await?;
            }
            Ok(n)
        })
    }

    /// Watches the services and this host's subtree from `revision + 1` and calls
    /// `changed` (from the runtime's thread) after each batch of events
    /// that touches one of this host's documents, and after a resync
    /// (the stream broke or its revision was compacted: `changed` then
    /// re-reads everything). Runs until the process ends.
    pub fn watch(&self, revision: i64, changed: impl Fn(Change) + Send + 'static) {
        let client = self.client.clone();
        let layout = self.layout.clone();
        self.rt.spawn(async move {
            // The revision to resume from: after the last event seen (0:
            // the newest, after a compaction; a full re-read follows).
            let mut next = revision + 1;
            // The watch broke (or never came up): tell the daemon once,
            // and re-read everything once it is back.
            let mut broken = false;
            loop {
                let mut c = client.clone();
                if next == 0 {
                    match c.get(layout.prefix.clone(), Some(GetOptions::new().with_count_only())).await {
                        Ok(r) => next = r.header().map_or(1, |h| h.revision() + 1),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    }
                }
                // Two watches on one stream: the services, and this host's
                // own subtree (other hosts' changes never wake it).
                let o = || WatchOptions::new().with_prefix().with_start_revision(next).with_progress_notify();
                let stream = match c.watch(layout.services(), Some(o())).await {
                    Ok(mut s) => s.watch(layout.host_root(), Some(o())).await.map(|()| s),
                    Err(e) => Err(e),
                };
                if let Ok(mut stream) = stream {
                    changed(Change::Up);
                    if std::mem::take(&mut broken) {
                        changed(Change::Resync);
                    }
                    // A silent stream is asked for progress; one that stays
                    // silent after that is dead (a half-open connection, a
                    // partitioned member).
                    let mut asked = false;
                    loop {
                        let m = tokio::time::timeout(PROGRESS, stream.message()).await;
                        let r = match m {
                            Ok(Ok(Some(r))) => r,
                            Err(_) if !asked => {
                                asked = true;
                                if stream.request_progress().await.is_err() {
                                    break;
                                }
                                continue;
                            }
                            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break,
                        };
                        asked = false;
                        if r.compact_revision() > 0 {
                            tracing::warn!(
                                from = next,
                                compacted = r.compact_revision(),
                                "store: the revision to resume from was compacted; re-reading everything"
                            );
                            next = 0;
                            break;
                        }
                        if r.canceled() {
                            break;
                        }
                        // Only events move the resume point (a progress
                        // notification speaks for one of the two watches).
                        let mut ours = false;
                        for e in r.events() {
                            if let Some(kv) = e.kv() {
                                next = next.max(kv.mod_revision() + 1);
                                let key = String::from_utf8_lossy(kv.key());
                                // Its documents, and its connections (decided
                                // on any host).
                                ours |= layout.parse_key(&key).is_some()
                                    || key.starts_with(&format!("{}connections/", layout.host_root()));
                            }
                        }
                        if ours {
                            changed(Change::Documents);
                        }
                    }
                }
                if !std::mem::replace(&mut broken, true) {
                    changed(Change::Down);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
}

/// What the watcher tells the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// One of this host's documents changed: reload.
    Documents,
    /// The watch stream is (again) established.
    Up,
    /// The watch stream broke; the last applied state stays.
    Down,
    /// Events may have been missed: re-read everything.
    Resync,
}

/// The first key after every key starting with `prefix` (etcd's range end
/// for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The documents as one TOML text (`privlink store dump`): each under its
/// `[[kind]]` header, the format `privlink store load` reads.
pub fn dump(docs: &[Doc]) -> String {
    let mut out = String::new();
    for d in docs {
        out.push_str(&format!("# {}\n[[{}]]\n{}\n", d.key, d.kind.table(), d.text.trim_end()));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_after_its_last_key() {
        assert_eq!(prefix_end("/p/"), b"/p0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
