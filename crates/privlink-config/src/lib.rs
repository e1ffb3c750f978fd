//! privlink's config file: TOML parsed with serde + toml, every value kept
//! with its span so that both syntax errors and semantic errors (an unknown
//! service, a duplicate endpoint address, a NAT IP shared by two services)
//! are reported as `FILE:LINE:COL: message`, all of them at once.
//!
//! [`Config::parse`] returns a fully validated [`Config`]; nothing after it
//! needs to re-check what is here.

use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use toml::Spanned;

pub use privlink_core::{PortRule, Protocol, ProxyTlv, Timeouts, MAX_BACKENDS, MAX_NAT_IPS, MAX_NAT_IPS_STORE};

/// Largest config file read: anything bigger is refused before it is read
/// whole (a path like /dev/zero would otherwise grow without bound).
pub const MAX_FILE: u64 = 16 << 20;
/// Longest name of a network, service, endpoint or tenant.
pub const MAX_NAME: usize = 63;

/// Where the control socket is when the config names none.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/privlink/control.sock";
/// The `network` label privlink uses for provider-side drops; no network
/// may take this name.
pub const PROVIDER_LABEL: &str = "provider";

/// One problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.line, self.col, self.message)
    }
}

/// The crate's error: a file that cannot be read, or every problem found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{file}: cannot read: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigError>),
}

impl Error {
    /// Every problem as its own `FILE:LINE:COL: message` line.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Error::Read { .. } => vec![self.to_string()],
            Error::Invalid(v) => v.iter().map(ToString::to_string).collect(),
        }
    }
}

/// `[dataplane] busy_poll` when not given (see docs/OPERATIONS.md,
/// "Latency").
pub const DEFAULT_BUSY_POLL: std::time::Duration = std::time::Duration::from_micros(50);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataplane {
    /// 0 = one per core.
    pub workers: u32,
    /// TUN offloads (`IFF_VNET_HDR`, checksum and segmentation offload).
    pub offload: bool,
    pub max_flows: u32,
    pub timeouts: Timeouts,
    /// How long a worker keeps polling without sleeping after its last
    /// packet (adaptive busy polling; zero: it always sleeps in `poll(2)`).
    /// 0 to 10 ms.
    pub busy_poll: std::time::Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub tun: String,
    pub netns: Option<String>,
    pub mtu: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    pub tenant: String,
    pub tun: String,
    pub netns: Option<String>,
    pub mtu: u16,
    /// Address and prefix length for the TUN itself.
    pub address: Option<(Ipv4Addr, u8)>,
    /// IPv6 address and prefix length for the TUN itself (`address6`).
    pub address6: Option<(Ipv6Addr, u8)>,
    /// The network's private DNS resolver address (`dns`): privlink adds
    /// it to the network's device and answers on it, UDP and TCP port 53
    /// (docs/DNS.md).
    pub dns: Option<Ipv4Addr>,
}

impl Network {
    /// Whether `other` needs the same device as this network: every field
    /// but `dns`, which a reload changes without touching the device (or
    /// the flows through it).
    pub fn same_device(&self, other: &Network) -> bool {
        Network { dns: None, ..self.clone() } == Network { dns: None, ..other.clone() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    /// One family for NAT IPs and backends alike.
    pub nat_ips: Vec<IpAddr>,
    pub nat_ports: RangeInclusive<u16>,
    pub backends: Vec<IpAddr>,
    pub ports: Vec<PortRule>,
    pub visibility: Vec<String>,
    pub auto_approve: Vec<String>,
    /// The default of its endpoints' `max_flows`.
    pub max_flows_per_endpoint: Option<u32>,
    /// How its backends are probed; `None`: never, all count as healthy.
    pub health: Option<Health>,
    /// `proxy_protocol = "v2"` with its `proxy_tlv`; `None`: off.
    pub proxy: Option<ProxyTlv>,
    /// Names every endpoint of the service answers to in its network's
    /// resolver (lower case, no trailing dot).
    pub dns_names: Vec<String>,
}

/// A service's backend health probe (`health = { ... }`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub kind: HealthKind,
    /// The backend port probed.
    pub port: u16,
    pub interval: std::time::Duration,
    /// How long one probe may take.
    pub timeout: std::time::Duration,
    /// Consecutive successes that bring a down backend back.
    pub healthy_after: u32,
    /// Consecutive failures that take an up backend out.
    pub unhealthy_after: u32,
}

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthKind {
    /// A TCP connection is accepted.
    Tcp,
    /// `GET path` answers 2xx.
    Http { path: String },
}

impl Service {
    /// Whether `tenant` may request a connection.
    pub fn visible_to(&self, tenant: &str) -> bool {
        self.visibility.iter().any(|t| t == "*" || t == tenant)
    }
    /// Whether `tenant`'s connections are approved without a request.
    pub fn auto_approves(&self, tenant: &str) -> bool {
        self.auto_approve.iter().any(|t| t == "*" || t == tenant)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub network: String,
    pub ip: IpAddr,
    pub service: String,
    /// Most flows at once (else the service's `max_flows_per_endpoint`).
    pub max_flows: Option<u32>,
    /// Allowed consumer sources (address, prefix length); empty: any.
    pub allow_sources: Vec<(IpAddr, u8)>,
    /// Names of this endpoint besides its service's `dns_names` (lower
    /// case, no trailing dot).
    pub dns_names: Vec<String>,
}

/// `[dns]`: how the networks' resolvers answer (docs/DNS.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    /// Upstreams for names privlink does not publish, tried in turn
    /// (reached from the daemon's own namespace). Empty: such names are
    /// answered REFUSED.
    pub forward: Vec<SocketAddr>,
    /// TTL of the records privlink answers, seconds (default 10, Azure's).
    pub ttl: u32,
    /// Queries per second one network's resolver answers at most (a token
    /// bucket holding one second's worth); past it queries are dropped and
    /// counted. Default 20,000.
    pub rate: u32,
    /// One log line per query (network, client, name, type, answer).
    pub query_log: bool,
}

impl Default for Dns {
    fn default() -> Self {
        Dns { forward: Vec::new(), ttl: 10, rate: 20_000, query_log: false }
    }
}

/// Reads at most [`MAX_FILE`] bytes of UTF-8 text.
fn read_capped(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?.take(MAX_FILE + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE {
        return Err(std::io::Error::other(format!("larger than {} MiB: not a config file", MAX_FILE >> 20)));
    }
    Ok(text)
}

/// Whether `c` may appear in a name privlink writes into logs, metric labels
/// and tables: nothing that could forge a line or an escape sequence.
fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Whether an address can be an endpoint, a NAT IP or a backend: not one
/// the packet path calls a martian source ("this network" 0/8, loopback,
/// multicast, reserved or broadcast; `privlink_core::addr::is_martian_v4`,
/// the one definition both use).
fn unicast(a: Ipv4Addr) -> bool {
    !privlink_core::addr::is_martian_v4(u32::from(a))
}

/// Why an IPv6 address cannot be an endpoint, a NAT IP or a backend, if it
/// cannot: the sources the packet path drops
/// (`privlink_core::addr::martian_v6`, the one definition both use:
/// unspecified, loopback, multicast, link-local, IPv4-mapped; RFC 4291
/// §2.5, §2.7) and the documentation prefix 2001:db8::/32 (RFC 3849: never
/// routed).
fn not_unicast6(a: Ipv6Addr) -> Option<&'static str> {
    let n = u128::from(a);
    privlink_core::addr::martian_v6(n)
        .or_else(|| (n >> 96 == 0x2001_0db8).then_some("a documentation address (RFC 3849, never routed)"))
}

/// "IPv4" or "IPv6".
fn family(a: IpAddr) -> &'static str {
    if a.is_ipv6() {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// A name cut short for an error message.
fn shown(n: &str) -> String {
    let mut s: String = n.chars().take(40).flat_map(char::escape_default).collect();
    if n.chars().count() > 40 {
        s.push('…');
    }
    s
}

/// A validated configuration. Its timeouts and protocols are the core's
/// own types (`privlink_core::spec`), defaults included: one definition of
/// each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub dataplane: Dataplane,
    pub metrics_listen: SocketAddr,
    pub control_socket: PathBuf,
    pub state_dir: PathBuf,
    /// `[flow_logs]`: where NAT events and connection changes go.
    pub flow_logs: FlowLogs,
    /// `[store]`: the etcd cluster that holds services, networks and
    /// endpoints (`None`: they are in this file).
    pub store: Option<Store>,
    pub provider: Provider,
    pub networks: Vec<Network>,
    pub services: Vec<Service>,
    pub endpoints: Vec<Endpoint>,
    /// `[dns]`.
    pub dns: Dns,
}

/// `[flow_logs]` (all optional).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlowLogs {
    /// IPFIX collector (UDP) for NAT session create/delete and pool
    /// exhaustion events.
    pub collector: Option<SocketAddr>,
    /// Events waiting for the exporter at most (past it they are dropped and
    /// counted).
    pub queue: usize,
    /// JSON-lines file that connection state changes are appended to.
    pub events_file: Option<PathBuf>,
}

/// `[store]`: where the services, networks and endpoints of a fleet live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    /// etcd client URLs (`http://HOST:PORT`), tried in turn.
    pub etcd: Vec<String>,
    /// Key prefix: starts with `/`, no trailing `/` (default `/privlink`).
    pub prefix: String,
    /// This host's name in the store (default: the kernel's host name).
    pub host: String,
    /// TTL of the host's lease, whole seconds (default 5 s; etcd raises a
    /// TTL under its own minimum, about 2 s with its default timings).
    pub lease_ttl: std::time::Duration,
}

/// What kind of object one store document holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocKind {
    Service,
    Network,
    Endpoint,
}

impl DocKind {
    /// The TOML array-of-tables name (`service`, `network`, `endpoint`).
    pub fn table(self) -> &'static str {
        match self {
            DocKind::Service => "service",
            DocKind::Network => "network",
            DocKind::Endpoint => "endpoint",
        }
    }
}

/// One object read from the store: the body of one `[[service]]`,
/// `[[network]]` or `[[endpoint]]` table (TOML, without the header), named
/// in errors as `etcd:<key>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    pub key: String,
    pub kind: DocKind,
    /// The object's name: the key's last component, which must equal the
    /// table's `name`.
    pub name: String,
    pub text: String,
}

/// The store's key layout under `[store] prefix` (see docs/OPERATIONS.md,
/// "Fleet"): services are shared, a host reads only its own subtree.
///
/// - `<prefix>/services/<name>`: one `[[service]]` table's body
/// - `<prefix>/hosts/<host>/networks/<name>`: one `[[network]]`
/// - `<prefix>/hosts/<host>/endpoints/<name>`: one `[[endpoint]]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub prefix: String,
    pub host: String,
}

impl Layout {
    /// Every service's key starts with this.
    pub fn services(&self) -> String {
        format!("{}/services/", self.prefix)
    }
    /// Every key of this host starts with this.
    pub fn host_root(&self) -> String {
        format!("{}/hosts/{}/", self.prefix, self.host)
    }
    /// The key of an object of `kind` named `name`.
    pub fn key(&self, kind: DocKind, name: &str) -> String {
        match kind {
            DocKind::Service => format!("{}{name}", self.services()),
            DocKind::Network => format!("{}networks/{name}", self.host_root()),
            DocKind::Endpoint => format!("{}endpoints/{name}", self.host_root()),
        }
    }
    /// What `key` holds, if it is one of this host's documents (`None` for
    /// keys privlink does not read as config, such as connection states).
    pub fn parse_key(&self, key: &str) -> Option<(DocKind, String)> {
        let (kind, name) = if let Some(n) = key.strip_prefix(&self.services()) {
            (DocKind::Service, n)
        } else if let Some(rest) = key.strip_prefix(&self.host_root()) {
            if let Some(n) = rest.strip_prefix("networks/") {
                (DocKind::Network, n)
            } else if let Some(n) = rest.strip_prefix("endpoints/") {
                (DocKind::Endpoint, n)
            } else {
                return None;
            }
        } else {
            return None;
        };
        (!name.is_empty() && !name.contains('/')).then(|| (kind, name.to_string()))
    }
}

/// Splits a single-host config's text into store documents (one per
/// network, service and endpoint, keyed by `layout`), for `privlink store
/// load`. The text must be a valid config ([`Config::parse`] first): this
/// only re-serializes its tables (comments are not kept).
pub fn documents(text: &str, layout: &Layout) -> Result<Vec<Doc>, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| e.message().to_string())?;
    let mut docs = Vec::new();
    for kind in [DocKind::Service, DocKind::Network, DocKind::Endpoint] {
        let Some(list) = table.get(kind.table()) else { continue };
        let list = list.as_array().ok_or_else(|| format!("`{}` is not an array of tables", kind.table()))?;
        for t in list {
            let name = t.get("name").and_then(toml::Value::as_str).ok_or("a table without a name")?.to_string();
            let t = t.as_table().ok_or("not a table")?;
            // One `key = value` line each, values inline: the document is
            // the body of one table, so it may hold no table headers.
            let text: String = t.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
            docs.push(Doc { key: layout.key(kind, &name), kind, name, text });
        }
    }
    Ok(docs)
}

impl Config {
    pub fn network(&self, name: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.name == name)
    }
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The names endpoint `e` answers to in its network's resolver: its
    /// service's `dns_names`, then its own, each once.
    pub fn dns_names(&self, e: &Endpoint) -> Vec<String> {
        let mut names: Vec<String> = self.service(&e.service).map(|s| s.dns_names.clone()).unwrap_or_default();
        for n in &e.dns_names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let file = path.display().to_string();
        let text = read_capped(path).map_err(|source| Error::Read { file: file.clone(), source })?;
        let mut c = Config::parse(&text, &file)?;
        c.path = path.to_path_buf();
        Ok(c)
    }

    /// A daemon's config with `[store]`: the local file (`text`, named
    /// `file`) holds everything but the networks, services and endpoints,
    /// which come from the store's `docs`. Validated together, as one
    /// file would be; an error inside a document is reported at
    /// `etcd:<key>:LINE:COL`. A local file that still holds networks,
    /// services or endpoints is refused (they belong in the store:
    /// `privlink store load`).
    pub fn parse_with_store(text: &str, file: &str, docs: &[Doc]) -> Result<Config, Error> {
        let local = Config::parse(text, file)?;
        if local.store.is_none() {
            return Err(Error::Invalid(vec![ConfigError {
                file: file.to_string(),
                line: 1,
                col: 1,
                message: "no `[store]` table".into(),
            }]));
        }
        // The file alone first: no objects of its own.
        let mut errors = Vec::new();
        if let Ok(raw) = toml::from_str::<Raw>(text) {
            let cx = Cx { text, file, segments: Vec::new(), errors: Vec::new() };
            let at = raw.network.first().map(|n| (n.span().start, "networks"));
            let at = at.or(raw.service.first().map(|n| (n.span().start, "services")));
            let at = at.or(raw.endpoint.first().map(|n| (n.span().start, "endpoints")));
            if let Some((at, what)) = at {
                errors.push(cx.error_at(
                    at,
                    format!("with [store], {what} live in the store, not in this file (move them with `privlink store load`)"),
                ));
            }
        }
        // Each document alone: one table of its kind, named as its key.
        for d in docs {
            let doc_cx =
                Cx { text: &d.text, file: &format!("etcd:{}", d.key), segments: Vec::new(), errors: Vec::new() };
            let name = match d.kind {
                DocKind::Service => toml::from_str::<RawService>(&d.text).map(|r| r.name),
                DocKind::Network => toml::from_str::<RawNetwork>(&d.text).map(|r| r.name),
                DocKind::Endpoint => toml::from_str::<RawEndpoint>(&d.text).map(|r| r.name),
            };
            match name {
                Err(e) => {
                    let at = e.span().map_or(0, |s| s.start);
                    errors.push(doc_cx.error_at(at, e.message().trim().replace('\n', " ")));
                }
                Ok(Some(n)) if n.get_ref() != &d.name => errors.push(doc_cx.error_at(
                    n.span().start,
                    format!("name `{}` differs from the key's `{}`", shown(n.get_ref()), shown(&d.name)),
                )),
                Ok(_) => {}
            }
        }
        if !errors.is_empty() {
            return Err(Error::Invalid(errors));
        }
        // Then all together: the file, and each document under a header of
        // its own kind (positions map back to the document).
        let mut all = String::with_capacity(text.len() + docs.iter().map(|d| d.text.len() + 16).sum::<usize>());
        all.push_str(text);
        let mut segments = Vec::with_capacity(docs.len());
        for d in docs {
            all.push('\n');
            let header = all.len();
            all.push_str(&format!("[[{}]]\n", d.kind.table()));
            segments.push(Segment { header, body: all.len(), name: format!("etcd:{}", d.key) });
            all.push_str(&d.text);
        }
        let cx = Cx { text: &all, file, segments, errors: Vec::new() };
        let mut c = match toml::from_str::<Raw>(&all) {
            Ok(raw) => cx.validate(raw)?,
            Err(e) => {
                let at = e.span().map_or(0, |s| s.start);
                let mut msg = e.message().trim().replace('\n', " ");
                if at >= text.len() && msg.starts_with("unknown field") {
                    // A table header inside a document ends the document's table.
                    msg.push_str(" (a store document holds one table's keys: write its tables inline, like `ports = [{ protocol = \"tcp\", port = 80 }]`)");
                }
                return Err(Error::Invalid(vec![cx.error_at(at, msg)]));
            }
        };
        c.path = local.path;
        Ok(c)
    }

    /// Parses and validates `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, Error> {
        let cx = Cx { text, file, segments: Vec::new(), errors: Vec::new() };
        match toml::from_str::<Raw>(text) {
            Ok(raw) => cx.validate(raw),
            Err(e) => {
                let at = e.span().map_or(0, |s| s.start);
                let msg = e.message().trim().replace('\n', " ");
                Err(Error::Invalid(vec![cx.error_at(at, msg)]))
            }
        }
    }
}

// ---- the file as written -------------------------------------------------

type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    dataplane: RawDataplane,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    flow_logs: RawFlowLogs,
    #[serde(default)]
    dns: RawDns,
    store: Option<S<RawStore>>,
    provider: Option<S<RawProvider>>,
    #[serde(default)]
    network: Vec<S<RawNetwork>>,
    #[serde(default)]
    service: Vec<S<RawService>>,
    #[serde(default)]
    endpoint: Vec<S<RawEndpoint>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    workers: Option<S<i64>>,
    offload: Option<S<bool>>,
    busy_poll: Option<S<String>>,
    max_flows: Option<S<i64>>,
    tcp_established_idle: Option<S<i64>>,
    tcp_transitory_idle: Option<S<i64>>,
    tcp_closed_idle: Option<S<i64>>,
    udp_idle: Option<S<i64>>,
    icmp_idle: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlowLogs {
    collector: Option<S<String>>,
    queue: Option<S<i64>>,
    events_file: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    forward: Option<S<Vec<S<String>>>>,
    ttl: Option<S<i64>>,
    rate: Option<S<i64>>,
    query_log: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    etcd: Option<S<Vec<S<String>>>>,
    prefix: Option<S<String>>,
    host: Option<S<String>>,
    lease_ttl: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    tun: Option<S<String>>,
    netns: Option<S<String>>,
    mtu: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    name: Option<S<String>>,
    tenant: Option<S<String>>,
    tun: Option<S<String>>,
    netns: Option<S<String>>,
    mtu: Option<S<i64>>,
    address: Option<S<String>>,
    address6: Option<S<String>>,
    dns: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<S<String>>,
    nat_ips: Option<S<Vec<S<String>>>>,
    nat_ports: Option<S<String>>,
    backends: Option<S<Vec<S<String>>>>,
    ports: Option<S<Vec<S<RawPort>>>>,
    visibility: Option<S<Vec<S<String>>>>,
    auto_approve: Option<S<Vec<S<String>>>>,
    proxy_protocol: Option<S<String>>,
    proxy_tlv: Option<S<String>>,
    max_flows_per_endpoint: Option<S<i64>>,
    health: Option<S<RawHealth>>,
    dns_names: Option<S<Vec<S<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    protocol: Option<S<String>>,
    port: Option<S<i64>>,
    path: Option<S<String>>,
    interval: Option<S<String>>,
    timeout: Option<S<String>>,
    healthy_after: Option<S<i64>>,
    unhealthy_after: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    protocol: Option<S<String>>,
    port: Option<S<i64>>,
    backend_port: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    name: Option<S<String>>,
    network: Option<S<String>>,
    ip: Option<S<String>>,
    service: Option<S<String>>,
    max_flows: Option<S<i64>>,
    allow_sources: Option<S<Vec<S<String>>>>,
    dns_names: Option<S<Vec<S<String>>>>,
}

// ---- validation -----------------------------------------------------------

struct Cx<'a> {
    text: &'a str,
    file: &'a str,
    /// Store documents appended to the file's text, in order: errors at
    /// their offsets are reported in their own names and positions.
    segments: Vec<Segment>,
    errors: Vec<ConfigError>,
}

/// Where one store document sits in the combined text.
struct Segment {
    /// Offset of the `[[kind]]` header privlink wrote before it.
    header: usize,
    /// Offset of the document's first byte.
    body: usize,
    /// `etcd:<key>`.
    name: String,
}

impl Cx<'_> {
    fn error_at(&self, offset: usize, message: String) -> ConfigError {
        let offset = offset.min(self.text.len());
        let (file, start) = match self.segments.iter().rev().find(|s| s.header <= offset) {
            // In the header privlink wrote: the document's first character.
            Some(s) => (s.name.as_str(), s.body),
            None => (self.file, 0),
        };
        let before = &self.text[start..offset.max(start)];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigError { file: file.to_string(), line, col, message }
    }

    fn err(&mut self, offset: usize, message: impl Into<String>) {
        let e = self.error_at(offset, message.into());
        self.errors.push(e);
    }

    /// A required field, or an error at the table that lacks it.
    fn need<'v, T>(&mut self, v: &'v Option<S<T>>, table_at: usize, what: &str) -> Option<&'v S<T>> {
        if v.is_none() {
            self.err(table_at, format!("missing field `{what}`"));
        }
        v.as_ref()
    }

    fn int(&mut self, v: &Option<S<i64>>, range: RangeInclusive<i64>, default: i64, what: &str) -> i64 {
        match v {
            None => default,
            Some(s) if range.contains(s.get_ref()) => *s.get_ref(),
            Some(s) => {
                self.err(
                    s.span().start,
                    format!("{what} must be {} to {}, not {}", range.start(), range.end(), s.get_ref()),
                );
                default
            }
        }
    }

    fn ipv4(&mut self, s: &S<String>, what: &str) -> Option<Ipv4Addr> {
        match s.get_ref().parse::<Ipv4Addr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(s.span().start, format!("{what}: `{}` is not an IPv4 address", s.get_ref()));
                None
            }
        }
    }

    fn ifname(&mut self, s: &S<String>) -> String {
        let n = s.get_ref();
        if n == "lo" {
            self.err(s.span().start, "`lo` is the loopback device: privlink creates its own TUN devices");
        } else if n.is_empty() || n.len() > 15 || !n.chars().all(name_char) || n == "." || n == ".." {
            self.err(
                s.span().start,
                format!("`{}` is not a valid interface name (1 to 15 letters, digits, '-', '_' or '.')", shown(n)),
            );
        }
        n.clone()
    }

    /// A network namespace name (a file under /run/netns): one path
    /// component, no tricks.
    fn netns(&mut self, s: &S<String>) -> String {
        let n = s.get_ref();
        if n.is_empty() || n.len() > MAX_NAME || !n.chars().all(name_char) || n == "." || n == ".." {
            self.err(
                s.span().start,
                format!(
                    "netns: `{}` is not a namespace name (1 to {MAX_NAME} letters, digits, '-', '_' or '.')",
                    shown(n)
                ),
            );
        }
        n.clone()
    }

    /// `ADDRESS/PREFIX` (or a bare address: /32) without host bits set.
    /// IPv4 or IPv6 (a bare IPv6 address: /128).
    fn prefix(&mut self, s: &S<String>, what: &str) -> Option<(IpAddr, u8)> {
        let text = s.get_ref();
        let v6 = text.contains(':');
        let (a, len) = text.split_once('/').unwrap_or((text, if v6 { "128" } else { "32" }));
        let bits = if v6 { 128 } else { 32 };
        let parsed = a.parse::<IpAddr>().ok().zip(len.parse::<u8>().ok().filter(|l| *l <= bits));
        let Some((addr, len)) = parsed else {
            self.err(s.span().start, format!("{what}: `{}` is not ADDRESS/PREFIX", shown(text)));
            return None;
        };
        let masked = match addr {
            IpAddr::V4(a) => {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
                IpAddr::from(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
                IpAddr::from(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        if masked != addr {
            self.err(s.span().start, format!("{what}: `{text}` has host bits set (did you mean {masked}/{len}?)"));
            return None;
        }
        Some((addr, len))
    }

    /// A duration like `2s` or `500ms`, from 1 ms to 1 h.
    fn duration(&mut self, v: &Option<S<String>>, default: std::time::Duration, what: &str) -> std::time::Duration {
        let Some(s) = v else { return default };
        match humantime::parse_duration(s.get_ref()) {
            Ok(d) if d >= std::time::Duration::from_millis(1) && d <= std::time::Duration::from_secs(3600) => d,
            _ => {
                self.err(
                    s.span().start,
                    format!("{what}: `{}` is not a duration from 1ms to 1h (like \"2s\")", shown(s.get_ref())),
                );
                default
            }
        }
    }

    /// `[dataplane] busy_poll`: a duration from 0 to 10 ms (`"0"` turns it
    /// off).
    fn busy_poll(&mut self, v: &Option<S<String>>) -> std::time::Duration {
        let Some(s) = v else { return DEFAULT_BUSY_POLL };
        match humantime::parse_duration(s.get_ref().trim()) {
            Ok(d) if d <= std::time::Duration::from_millis(10) => d,
            _ => {
                self.err(
                    s.span().start,
                    format!("busy_poll: `{}` is not a duration from 0 to 10ms (like \"50us\")", shown(s.get_ref())),
                );
                DEFAULT_BUSY_POLL
            }
        }
    }

    /// A service's `health` table.
    fn health(&mut self, h: &S<RawHealth>, ports: &[PortRule]) -> Option<Health> {
        let at = h.span().start;
        let h = h.get_ref();
        let kind = match self.need(&h.protocol, at, "protocol").map(|p| p.get_ref().as_str()) {
            Some("tcp") => HealthKind::Tcp,
            Some("http") => match self.need(&h.path, at, "path") {
                Some(p)
                    if p.get_ref().starts_with('/')
                        && p.get_ref().len() <= 1024
                        && !p.get_ref().chars().any(|c| c.is_control() || c == ' ') =>
                {
                    HealthKind::Http { path: p.get_ref().clone() }
                }
                Some(p) => {
                    self.err(p.span().start, format!("path: `{}` is not an absolute URL path", shown(p.get_ref())));
                    return None;
                }
                None => return None,
            },
            Some(other) => {
                let other = other.to_string();
                if let Some(p) = &h.protocol {
                    self.err(p.span().start, format!("protocol: `{}` is not `tcp` or `http`", shown(&other)));
                }
                return None;
            }
            None => return None,
        };
        let default_port = ports.iter().find(|p| p.protocol == Protocol::Tcp).map_or(1, |p| i64::from(p.backend_port));
        if h.port.is_none() && !ports.iter().any(|p| p.protocol == Protocol::Tcp) {
            self.err(at, "health: `port` is needed (the service offers no TCP port to default to)");
        }
        let port = self.int(&h.port, 1..=65535, default_port, "port") as u16;
        let interval = self.duration(&h.interval, std::time::Duration::from_secs(2), "interval");
        let timeout = self.duration(&h.timeout, std::time::Duration::from_secs(1), "timeout");
        if timeout > interval {
            if let Some(t) = &h.timeout {
                self.err(t.span().start, "timeout: longer than the interval");
            }
        }
        let healthy_after = self.int(&h.healthy_after, 1..=100, 2, "healthy_after") as u32;
        let unhealthy_after = self.int(&h.unhealthy_after, 1..=100, 3, "unhealthy_after") as u32;
        Some(Health { kind, port, interval, timeout, healthy_after, unhealthy_after })
    }

    /// An IPv4 or IPv6 address that must be unicast and routable
    /// ([`unicast`], [`not_unicast6`]).
    fn unicast_ip(&mut self, s: &S<String>, what: &str) -> Option<IpAddr> {
        let text = s.get_ref();
        if !text.contains(':') {
            return self.unicast(s, what).map(IpAddr::from);
        }
        let Ok(a) = text.parse::<Ipv6Addr>() else {
            self.err(s.span().start, format!("{what}: `{}` is not an IPv4 or IPv6 address", shown(text)));
            return None;
        };
        if let Some(why) = not_unicast6(a) {
            self.err(s.span().start, format!("{what}: {a} is {why}"));
        }
        Some(a.into())
    }

    /// An address that must be unicast.
    fn unicast(&mut self, s: &S<String>, what: &str) -> Option<Ipv4Addr> {
        let a = self.ipv4(s, what)?;
        if !unicast(a) {
            self.err(s.span().start, format!("{what}: {a} is not a unicast address"));
        }
        Some(a)
    }

    /// A DNS name a resolver answers to (RFC 1035 §2.3.4: at most 253
    /// characters written out, labels of 1 to 63), lower-cased, without a
    /// trailing dot; letters, digits, '-' and '_' (service labels), at
    /// least two labels, none starting or ending with '-'.
    fn dns_name(&mut self, s: &S<String>) -> Option<String> {
        let raw = s.get_ref();
        let n = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
        let labels: Vec<&str> = n.split('.').collect();
        let bad = if n.len() > 253 {
            Some("longer than 253 characters")
        } else if labels.len() < 2 {
            Some("needs at least two labels (`name.zone`)")
        } else if labels.iter().any(|l| l.is_empty() || l.len() > 63) {
            Some("has an empty label or one longer than 63 characters")
        } else if labels.last().is_some_and(|l| l.chars().all(|c| c.is_ascii_digit())) {
            // RFC 3696 §2: no top-level label is all digits; `1.2.3.4`
            // would be read as an address and never asked.
            Some("its last label is all digits (it would read as an address)")
        } else if labels.iter().any(|l| {
            !l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                || l.starts_with('-')
                || l.ends_with('-')
        }) {
            Some("labels may hold letters, digits, '-' (not first or last) and '_'")
        } else {
            None
        };
        if let Some(why) = bad {
            self.err(s.span().start, format!("dns_names: `{}` is not a DNS name: {why}", shown(raw)));
            return None;
        }
        Some(n)
    }

    /// A `dns_names` list: each name once.
    fn dns_names(&mut self, v: &Option<S<Vec<S<String>>>>) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = Vec::new();
        for s in v.as_ref().map(|l| l.get_ref().as_slice()).unwrap_or_default() {
            if let Some(n) = self.dns_name(s) {
                if out.iter().any(|(o, _)| *o == n) {
                    self.err(s.span().start, format!("dns_names: `{n}` is listed twice"));
                } else {
                    out.push((n, s.span().start));
                }
            }
        }
        out
    }

    /// The `[dns]` table.
    fn dns(&mut self, d: &RawDns) -> Dns {
        let def = Dns::default();
        let mut forward = Vec::new();
        for s in d.forward.as_ref().map(|l| l.get_ref().as_slice()).unwrap_or_default() {
            let t = s.get_ref();
            let a =
                t.parse::<SocketAddr>().ok().or_else(|| t.parse::<std::net::IpAddr>().ok().map(|ip| (ip, 53).into()));
            match a {
                Some(a) if a.port() != 0 && !a.ip().is_unspecified() => forward.push(a),
                _ => self.err(s.span().start, format!("forward: `{}` is not an ADDRESS or ADDRESS:PORT", shown(t))),
            }
        }
        if forward.len() > 8 {
            self.err(d.forward.as_ref().map_or(0, |l| l.span().start), "forward: at most 8 upstreams");
        }
        Dns {
            forward,
            ttl: self.int(&d.ttl, 0..=86_400, i64::from(def.ttl), "ttl") as u32,
            rate: self.int(&d.rate, 1..=10_000_000, i64::from(def.rate), "rate") as u32,
            query_log: d.query_log.as_ref().is_some_and(|q| *q.get_ref()),
        }
    }

    /// `FILE:LINE:COL` of `offset`, for a message that names a second place.
    fn position(&self, offset: usize) -> String {
        let e = self.error_at(offset, String::new());
        format!("{}:{}:{}", e.file, e.line, e.col)
    }

    fn name(&mut self, s: &S<String>, kind: &str, seen: &mut HashSet<String>) -> String {
        let n = s.get_ref();
        if n.is_empty() || n.chars().count() > MAX_NAME {
            self.err(s.span().start, format!("{kind} name `{}` must be 1 to {MAX_NAME} characters", shown(n)));
        } else if !n.chars().all(name_char) {
            self.err(
                s.span().start,
                format!("{kind} name `{}` may hold only letters, digits, '-', '_' and '.'", shown(n)),
            );
        } else if !seen.insert(n.clone()) {
            self.err(s.span().start, format!("duplicate {kind} name `{n}`"));
        }
        n.clone()
    }

    /// The `[store]` table.
    fn store(&mut self, s: &S<RawStore>) -> Store {
        let at = s.span().start;
        let s = s.get_ref();
        let mut etcd = Vec::new();
        if let Some(list) = self.need(&s.etcd, at, "etcd") {
            if list.get_ref().is_empty() || list.get_ref().len() > 16 {
                self.err(list.span().start, "etcd: give 1 to 16 client URLs (like \"http://127.0.0.1:2379\")");
            }
            for u in list.get_ref() {
                let ok = u.get_ref().strip_prefix("http://").is_some_and(|rest| {
                    let host_port = rest.strip_suffix('/').unwrap_or(rest);
                    host_port
                        .rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
                });
                if ok {
                    etcd.push(u.get_ref().clone());
                } else {
                    self.err(
                        u.span().start,
                        format!("etcd: `{}` is not http://HOST:PORT (TLS is not supported)", shown(u.get_ref())),
                    );
                }
            }
        }
        let prefix = match &s.prefix {
            None => "/privlink".to_string(),
            Some(p) => {
                let t = p.get_ref();
                let ok = t.starts_with('/')
                    && t.len() > 1
                    && t.len() <= 128
                    && !t.ends_with('/')
                    && !t.contains("//")
                    && t.chars().all(|c| name_char(c) || c == '/');
                if !ok {
                    self.err(
                        p.span().start,
                        format!("prefix: `{}` is not a key prefix like \"/privlink\" (no trailing '/')", shown(t)),
                    );
                }
                t.clone()
            }
        };
        let host = match &s.host {
            Some(h) => self.name(h, "host", &mut HashSet::new()),
            None => {
                let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                let h = h.trim();
                if h.is_empty() || h.len() > MAX_NAME || !h.chars().all(name_char) {
                    self.err(at, format!("[store]: the host name `{}` cannot name this host: set `host`", shown(h)));
                }
                h.to_string()
            }
        };
        let lease_ttl = match &s.lease_ttl {
            None => std::time::Duration::from_secs(5),
            Some(t) => match humantime::parse_duration(t.get_ref()) {
                Ok(d) if d >= std::time::Duration::from_secs(1) && d <= std::time::Duration::from_secs(3600) => {
                    std::time::Duration::from_secs(d.as_secs_f64().ceil() as u64)
                }
                _ => {
                    self.err(
                        t.span().start,
                        format!("lease_ttl: `{}` is not a duration from 1s to 1h", shown(t.get_ref())),
                    );
                    std::time::Duration::from_secs(5)
                }
            },
        };
        Store { etcd, prefix, host, lease_ttl }
    }

    fn mtu(&mut self, v: &Option<S<i64>>) -> u16 {
        self.int(v, 576..=65535, 1500, "mtu") as u16
    }

    fn timeout(&mut self, v: &Option<S<i64>>, default: u32, what: &str) -> u32 {
        self.int(v, 1..=i64::from(u32::MAX / 2), i64::from(default), what) as u32
    }

    fn validate(mut self, raw: Raw) -> Result<Config, Error> {
        let d = &raw.dataplane;
        let dataplane = Dataplane {
            workers: self.int(&d.workers, 0..=256, 0, "workers") as u32,
            offload: d.offload.as_ref().is_none_or(|o| *o.get_ref()),
            busy_poll: self.busy_poll(&d.busy_poll),
            max_flows: self.int(
                &d.max_flows,
                1..=(1 << 31),
                i64::from(privlink_core::Settings::default().max_flows),
                "max_flows",
            ) as u32,
            timeouts: {
                let t = Timeouts::default();
                Timeouts {
                    tcp_established: self.timeout(&d.tcp_established_idle, t.tcp_established, "tcp_established_idle"),
                    tcp_transitory: self.timeout(&d.tcp_transitory_idle, t.tcp_transitory, "tcp_transitory_idle"),
                    tcp_closed: self.timeout(&d.tcp_closed_idle, t.tcp_closed, "tcp_closed_idle"),
                    udp: self.timeout(&d.udp_idle, t.udp, "udp_idle"),
                    icmp: self.timeout(&d.icmp_idle, t.icmp, "icmp_idle"),
                }
            },
        };
        let metrics_listen = match &raw.metrics.listen {
            None => SocketAddr::from(([127, 0, 0, 1], 9469)),
            Some(s) => s.get_ref().parse().unwrap_or_else(|_| {
                self.err(s.span().start, format!("listen: `{}` is not an address:port", s.get_ref()));
                SocketAddr::from(([127, 0, 0, 1], 9469))
            }),
        };
        let control_socket = PathBuf::from(raw.control.socket.as_ref().map_or(DEFAULT_CONTROL_SOCKET, |s| s.get_ref()));
        let flow_logs = FlowLogs {
            collector: raw.flow_logs.collector.as_ref().and_then(|s| {
                let a = s.get_ref().parse::<SocketAddr>().ok();
                if a.is_none() {
                    self.err(s.span().start, format!("collector: `{}` is not an address:port", s.get_ref()));
                }
                a
            }),
            queue: self.int(&raw.flow_logs.queue, 1..=(1 << 24), 65536, "queue") as usize,
            events_file: raw.flow_logs.events_file.as_ref().map(|s| PathBuf::from(s.get_ref())),
        };
        let state_dir = PathBuf::from(raw.state.dir.as_ref().map_or("/var/lib/privlink", |s| s.get_ref()));
        let dns = self.dns(&raw.dns);
        let store = raw.store.as_ref().map(|s| self.store(s));

        let mut devices: HashSet<(Option<String>, String)> = HashSet::new();
        let provider = match &raw.provider {
            None => {
                self.err(self.text.len(), "missing table `[provider]`");
                Provider { tun: String::new(), netns: None, mtu: 1500 }
            }
            Some(p) => {
                let at = p.span().start;
                let p = p.get_ref();
                let tun = self.need(&p.tun, at, "tun").map(|t| (self.ifname(t), t.span().start));
                let netns = p.netns.as_ref().map(|n| self.netns(n));
                if let Some((t, _)) = &tun {
                    devices.insert((netns.clone(), t.clone()));
                }
                Provider { tun: tun.map(|t| t.0).unwrap_or_default(), netns, mtu: self.mtu(&p.mtu) }
            }
        };

        let mut names = HashSet::new();
        let mut networks = Vec::new();
        // (namespace, resolver address, network): one resolver per address
        // and namespace.
        let mut dns_at: Vec<(Option<String>, Ipv4Addr, String)> = Vec::new();
        for n in &raw.network {
            let at = n.span().start;
            let n = n.get_ref();
            let name = self.need(&n.name, at, "name").map(|s| {
                if s.get_ref() == PROVIDER_LABEL {
                    self.err(s.span().start, format!("network name `{PROVIDER_LABEL}` is reserved"));
                }
                self.name(s, "network", &mut names)
            });
            let tenant = self.need(&n.tenant, at, "tenant").map(|s| self.name(s, "tenant", &mut HashSet::new()));
            let netns = n.netns.as_ref().map(|s| self.netns(s));
            let tun = self.need(&n.tun, at, "tun").map(|s| {
                let t = self.ifname(s);
                if !devices.insert((netns.clone(), t.clone())) {
                    self.err(s.span().start, format!("TUN device `{t}` is used twice in the same namespace"));
                }
                t
            });
            let address = n.address.as_ref().and_then(|s| {
                let parsed = s.get_ref().split_once('/').and_then(|(a, l)| {
                    let a = a.parse::<Ipv4Addr>().ok()?;
                    let l = l.parse::<u8>().ok().filter(|l| *l <= 32)?;
                    Some((a, l))
                });
                if parsed.is_none() {
                    self.err(s.span().start, format!("address: `{}` is not ADDRESS/PREFIX", s.get_ref()));
                }
                parsed
            });
            let address6 = n.address6.as_ref().and_then(|s| {
                let parsed = s.get_ref().split_once('/').and_then(|(a, l)| {
                    let a = a.parse::<Ipv6Addr>().ok()?;
                    let l = l.parse::<u8>().ok().filter(|l| *l <= 128)?;
                    Some((a, l))
                });
                match parsed {
                    None => self
                        .err(s.span().start, format!("address6: `{}` is not IPV6-ADDRESS/PREFIX", shown(s.get_ref()))),
                    Some((a, _)) => {
                        if let Some(why) = privlink_core::addr::martian_v6(u128::from(a)) {
                            self.err(s.span().start, format!("address6: {a} is {why}"));
                        }
                    }
                }
                parsed
            });
            let mtu = self.mtu(&n.mtu);
            let dns = n.dns.as_ref().and_then(|s| {
                let a = self.unicast(s, "dns")?;
                if netns.is_none() {
                    // Bound in the daemon's own namespace, the resolver would
                    // answer anyone who routes to the host.
                    self.err(
                        s.span().start,
                        "dns: a resolver needs the network's own `netns` (the namespace is what keeps it to the network)",
                    );
                } else if address.is_some_and(|(own, _)| own == a) {
                    self.err(
                        s.span().start,
                        format!("dns: {a} is the device's own address; give the resolver one of its own"),
                    );
                } else if let Some(other) = dns_at.iter().find(|(ns, o, _)| *ns == netns && *o == a) {
                    self.err(
                        s.span().start,
                        format!("dns: {a} is already the resolver of network `{}` in the same namespace", other.2),
                    );
                }
                dns_at.push((netns.clone(), a, name.clone().unwrap_or_default()));
                Some(a)
            });
            if let (Some(name), Some(tenant), Some(tun)) = (name, tenant, tun) {
                networks.push(Network { name, tenant, tun, netns, mtu, address, address6, dns });
            }
        }

        let mut svc_names = HashSet::new();
        // Service name -> its dns_names with their positions.
        let mut svc_dns: HashMap<String, Vec<(String, usize)>> = HashMap::new();
        let mut nat_owner: HashMap<IpAddr, String> = HashMap::new();
        let mut services = Vec::new();
        let mut backend_ips: HashSet<IpAddr> = HashSet::new();
        let mut backend_at: Vec<(IpAddr, usize)> = Vec::new();
        for s in &raw.service {
            let at = s.span().start;
            let s = s.get_ref();
            let name = self.need(&s.name, at, "name").map(|n| self.name(n, "service", &mut svc_names));
            let svc_name = name.clone().unwrap_or_default();
            let mut nat_ips = Vec::new();
            if let Some(list) = self.need(&s.nat_ips, at, "nat_ips") {
                // Azure's 8 on one host; a fleet shares up to 256 by lease.
                let max = if store.is_some() { MAX_NAT_IPS_STORE } else { MAX_NAT_IPS };
                if list.get_ref().is_empty() || list.get_ref().len() > max {
                    self.err(
                        list.span().start,
                        format!(
                            "nat_ips: {} given, must be 1 to {max}{}",
                            list.get_ref().len(),
                            if store.is_some() { "" } else { " (up to 256 with [store])" }
                        ),
                    );
                }
                for ip in list.get_ref() {
                    if let Some(a) = self.unicast_ip(ip, "nat_ips") {
                        if let Some(first) = nat_ips.first().filter(|f: &&IpAddr| f.is_ipv6() != a.is_ipv6()) {
                            self.err(
                                ip.span().start,
                                format!(
                                    "nat_ips: {a} is {} and {first} {} (one family per service)",
                                    family(a),
                                    family(*first)
                                ),
                            );
                        }
                        match nat_owner.get(&a) {
                            Some(o) if *o == svc_name => {
                                self.err(ip.span().start, format!("nat_ips: {a} is listed twice"))
                            }
                            Some(o) => {
                                self.err(ip.span().start, format!("nat_ips: {a} is already a NAT IP of service `{o}`"))
                            }
                            None => {
                                nat_owner.insert(a, svc_name.clone());
                            }
                        }
                        nat_ips.push(a);
                    }
                }
            }
            let nat_ports = match &s.nat_ports {
                None => 1024..=65535,
                Some(r) => {
                    let parsed = r.get_ref().split_once('-').and_then(|(a, b)| {
                        let (a, b) = (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?);
                        (a >= 1 && a <= b).then_some(a..=b)
                    });
                    parsed.unwrap_or_else(|| {
                        self.err(
                            r.span().start,
                            format!("nat_ports: `{}` is not a range FIRST-LAST within 1-65535", r.get_ref()),
                        );
                        1024..=65535
                    })
                }
            };
            let mut backends = Vec::new();
            if let Some(list) = self.need(&s.backends, at, "backends") {
                if list.get_ref().is_empty() {
                    self.err(list.span().start, "backends: at least one backend is needed");
                } else if list.get_ref().len() > MAX_BACKENDS {
                    self.err(
                        list.span().start,
                        format!("backends: {} given, at most {MAX_BACKENDS}", list.get_ref().len()),
                    );
                }
                for b in list.get_ref().iter().take(MAX_BACKENDS + 1) {
                    if let Some(a) = self.unicast_ip(b, "backends") {
                        if a.is_ipv6() && backends.is_empty() && provider.mtu < 1280 {
                            self.err(
                                b.span().start,
                                format!(
                                    "backends: IPv6 needs a provider MTU of 1280 or more ([provider] mtu is {})",
                                    provider.mtu
                                ),
                            );
                        }
                        let first = nat_ips.first().or(backends.first()).copied();
                        if let Some(f) = first.filter(|f| f.is_ipv6() != a.is_ipv6()) {
                            self.err(
                                b.span().start,
                                format!(
                                    "backends: {a} is {} and the service's {f} {} (one family per service)",
                                    family(a),
                                    family(f)
                                ),
                            );
                        }
                        backends.push(a);
                        backend_ips.insert(a);
                        backend_at.push((a, b.span().start));
                    }
                }
            }
            let mut ports = Vec::new();
            if let Some(list) = self.need(&s.ports, at, "ports") {
                if list.get_ref().is_empty() {
                    self.err(list.span().start, "ports: at least one port is needed");
                }
                let mut seen = HashSet::new();
                for p in list.get_ref() {
                    let pat = p.span().start;
                    let p = p.get_ref();
                    let proto = self.need(&p.protocol, pat, "protocol").and_then(|s| match s.get_ref().as_str() {
                        "tcp" => Some(Protocol::Tcp),
                        "udp" => Some(Protocol::Udp),
                        other => {
                            self.err(s.span().start, format!("protocol: `{other}` is not `tcp` or `udp`"));
                            None
                        }
                    });
                    let port = self.need(&p.port, pat, "port").map(|_| self.int(&p.port, 1..=65535, 1, "port") as u16);
                    let backend_port =
                        self.int(&p.backend_port, 1..=65535, i64::from(port.unwrap_or(1)), "backend_port");
                    if let (Some(protocol), Some(port)) = (proto, port) {
                        if !seen.insert((protocol, port)) {
                            self.err(pat, format!("ports: {port}/{protocol:?} is offered twice"));
                        }
                        ports.push(PortRule { protocol, port, backend_port: backend_port as u16 });
                    }
                }
            }
            let list = |v: &Option<S<Vec<S<String>>>>| -> Vec<String> {
                v.as_ref().map(|l| l.get_ref().iter().map(|s| s.get_ref().clone()).collect()).unwrap_or_default()
            };
            let on = match s.proxy_protocol.as_ref() {
                None => false,
                Some(pp) => match pp.get_ref().as_str() {
                    "off" => false,
                    "v2" => true,
                    other => {
                        self.err(pp.span().start, format!("proxy_protocol: `{other}` is not one of \"off\", \"v2\""));
                        false
                    }
                },
            };
            let tlv = match s.proxy_tlv.as_ref() {
                None => Some(ProxyTlv::None),
                Some(t) => {
                    let found = ProxyTlv::ALL.into_iter().find(|x| x.as_str() == t.get_ref().as_str());
                    if found.is_none() {
                        self.err(
                            t.span().start,
                            format!("proxy_tlv: `{}` is not one of \"none\", \"azure\", \"aws\", \"gcp\"", t.get_ref()),
                        );
                    } else if !on && found != Some(ProxyTlv::None) {
                        self.err(t.span().start, "proxy_tlv needs proxy_protocol = \"v2\"");
                    }
                    found
                }
            };
            let proxy = if on { tlv } else { None };
            let health = s.health.as_ref().and_then(|h| self.health(h, &ports));
            let names_at = self.dns_names(&s.dns_names);
            if let Some(n) = &name {
                svc_dns.insert(n.clone(), names_at.clone());
            }
            if let Some(name) = name {
                services.push(Service {
                    name,
                    nat_ips,
                    nat_ports,
                    backends,
                    ports,
                    visibility: list(&s.visibility),
                    auto_approve: list(&s.auto_approve),
                    max_flows_per_endpoint: s.max_flows_per_endpoint.as_ref().map(|_| {
                        self.int(&s.max_flows_per_endpoint, 1..=(1 << 31), 1, "max_flows_per_endpoint") as u32
                    }),
                    health,
                    proxy,
                    dns_names: names_at.into_iter().map(|(n, _)| n).collect(),
                });
            }
        }

        let mut ep_names = HashSet::new();
        let mut ep_addrs = HashSet::new();
        // A backend that is a NAT IP would loop translated packets back in.
        for &(a, at) in &backend_at {
            if let Some(owner) = nat_owner.get(&a) {
                self.err(at, format!("backends: {a} is a NAT IP of service `{owner}`"));
            }
        }

        let mut endpoints = Vec::new();
        // (network, name) -> (endpoint, where it claimed it).
        // (network, name, IPv6?) -> the endpoint claiming it (its name,
        // position, and the service it claims through): a name has at most
        // one A and one AAAA record per network.
        type Claim = (String, usize, Option<String>);
        let mut dns_claims: HashMap<(String, String, bool), Claim> = HashMap::new();
        for e in &raw.endpoint {
            let at = e.span().start;
            let e_at = at;
            let e = e.get_ref();
            let name = self.need(&e.name, at, "name").map(|n| self.name(n, "endpoint", &mut ep_names));
            let network = self.need(&e.network, at, "network").map(|n| {
                if !names.contains(n.get_ref()) {
                    self.err(n.span().start, format!("unknown network `{}`", n.get_ref()));
                }
                n.get_ref().clone()
            });
            let service = self.need(&e.service, at, "service").map(|n| {
                if !svc_names.contains(n.get_ref()) {
                    self.err(n.span().start, format!("unknown service `{}`", n.get_ref()));
                }
                n.get_ref().clone()
            });
            let ip = self.need(&e.ip, at, "ip").and_then(|s| {
                let a = self.unicast_ip(s, "ip")?;
                // An IPv6 endpoint reaches either family (IPv4 translated
                // per flow, RFC 6146); an IPv4 endpoint only IPv4, as in
                // GCP's Private Service Connect (docs/IPV6.md).
                let svc = service.as_ref().and_then(|n| services.iter().find(|x: &&Service| &x.name == n));
                if let Some(b) = svc.and_then(|x| x.backends.first().copied()).filter(|b| b.is_ipv6() && a.is_ipv4()) {
                    self.err(
                        s.span().start,
                        format!(
                            "ip: an IPv4 endpoint cannot reach service `{}`, which is {}",
                            service.as_deref().unwrap_or_default(),
                            family(b)
                        ),
                    );
                }
                if a.is_ipv6() {
                    let net = network.as_ref().and_then(|n| networks.iter().find(|x| &x.name == n));
                    if let Some(n) = net.filter(|n| n.mtu < 1280) {
                        self.err(
                            s.span().start,
                            format!("ip: IPv6 needs an MTU of 1280 or more; network `{}` has {}", n.name, n.mtu),
                        );
                    }
                }
                // A resolver address is local to its namespace: it would
                // take this endpoint's packets.
                let ns = network.as_ref().and_then(|n| networks.iter().find(|x| &x.name == n)).map(|x| x.netns.clone());
                if let Some(r) = dns_at.iter().find(|(rns, ra, _)| Some(rns) == ns.as_ref() && IpAddr::from(*ra) == a) {
                    self.err(s.span().start, format!("ip: {a} is the DNS resolver address of network `{}`", r.2));
                }
                if let Some(net) = &network {
                    if !ep_addrs.insert((net.clone(), a)) {
                        self.err(s.span().start, format!("ip: {a} is already an endpoint in network `{net}`"));
                    }
                }
                if let Some(owner) = nat_owner.get(&a) {
                    self.err(s.span().start, format!("ip: {a} is a NAT IP of service `{owner}`"));
                } else if backend_ips.contains(&a) {
                    self.err(s.span().start, format!("ip: {a} is a backend address"));
                }
                Some(a)
            });
            let max_flows = e.max_flows.as_ref().map(|_| self.int(&e.max_flows, 1..=(1 << 31), 1, "max_flows") as u32);
            let mut allow_sources = Vec::new();
            for p in e.allow_sources.as_ref().map(|l| l.get_ref().as_slice()).unwrap_or_default() {
                if let Some(prefix) = self.prefix(p, "allow_sources") {
                    if let Some(a) = ip.filter(|a| a.is_ipv6() != prefix.0.is_ipv6()) {
                        self.err(
                            p.span().start,
                            format!(
                                "allow_sources: `{}` is {} but the endpoint is {}",
                                p.get_ref(),
                                family(prefix.0),
                                family(a)
                            ),
                        );
                    }
                    allow_sources.push(prefix);
                }
            }
            let own_names = self.dns_names(&e.dns_names);
            // One name, one endpoint per network and family (its resolver
            // answers one A and one AAAA record): the second claim is
            // refused, naming the first.
            if let (Some(name), Some(network), Some(service)) = (&name, &network, &service) {
                let through = svc_dns.get(service).cloned().unwrap_or_default();
                let mine =
                    through.iter().map(|(n, at)| (n, *at, true)).chain(own_names.iter().map(|(n, at)| (n, *at, false)));
                let mut seen_here = HashSet::new();
                for (n, at, via_service) in mine {
                    if !seen_here.insert(n.clone()) {
                        continue;
                    }
                    let key = (network.clone(), n.clone(), ip.is_some_and(|a| a.is_ipv6()));
                    let via = |v: bool| if v { format!(" (through service `{service}`)") } else { String::new() };
                    match dns_claims.get(&key) {
                        Some((first, first_at, first_via)) => {
                            let msg = format!(
                                "dns_names: `{n}` is claimed twice in network `{network}`: by endpoint `{first}`{} at {} and by endpoint `{name}`{}",
                                first_via.as_deref().map(|s| format!(" (through service `{s}`)")).unwrap_or_default(),
                                self.position(*first_at),
                                via(via_service),
                            );
                            let at = if via_service { e_at } else { at };
                            self.err(at, msg);
                        }
                        None => {
                            let first_via = via_service.then(|| service.clone());
                            dns_claims.insert(key, (name.clone(), if via_service { e_at } else { at }, first_via));
                        }
                    }
                }
            }
            if let (Some(name), Some(network), Some(ip), Some(service)) = (name, network, ip, service) {
                let dns_names = own_names.into_iter().map(|(n, _)| n).collect();
                endpoints.push(Endpoint { name, network, ip, service, max_flows, allow_sources, dns_names });
            }
        }

        if !self.errors.is_empty() {
            self.errors.sort_by_key(|e| (e.line, e.col));
            return Err(Error::Invalid(self.errors));
        }
        Ok(Config {
            path: PathBuf::from(self.file),
            dataplane,
            metrics_listen,
            control_socket,
            state_dir,
            flow_logs,
            store,
            provider,
            networks,
            services,
            endpoints,
            dns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[dataplane]
workers = 2
max_flows = 1000

[metrics]
listen = "127.0.0.1:9469"

[provider]
tun = "plp0"
netns = "provider"

[[network]]
name = "vnet-a"
tenant = "contoso"
tun = "pla0"
netns = "tenant-a"

[[network]]
name = "vnet-b"
tenant = "fabrikam"
tun = "pla0"
netns = "tenant-b"
address = "10.0.0.1/32"

[[service]]
name = "orders-db"
nat_ips = ["192.168.100.4"]
nat_ports = "2000-2009"
backends = ["192.168.50.10", "192.168.50.11"]
ports = [{ protocol = "tcp", port = 5432, backend_port = 15432 }, { protocol = "udp", port = 53 }]
visibility = ["*"]
auto_approve = ["contoso"]

[[endpoint]]
name = "pe-a"
network = "vnet-a"
ip = "10.1.0.5"
service = "orders-db"

[[endpoint]]
name = "pe-b"
network = "vnet-b"
ip = "10.1.0.5"
service = "orders-db"
"#;

    fn errors(text: &str) -> Vec<String> {
        match Config::parse(text, "t.toml") {
            Ok(_) => vec![],
            Err(e) => e.lines(),
        }
    }

    #[test]
    fn good_config_parses() {
        let c = Config::parse(GOOD, "t.toml").expect("valid");
        assert_eq!(c.dataplane.workers, 2);
        assert_eq!(c.dataplane.timeouts.tcp_established, 7440);
        assert_eq!(c.networks.len(), 2);
        assert_eq!(c.networks[1].address, Some((Ipv4Addr::new(10, 0, 0, 1), 32)));
        let s = &c.services[0];
        assert_eq!(s.nat_ports, 2000..=2009);
        assert_eq!(s.ports[0], PortRule { protocol: Protocol::Tcp, port: 5432, backend_port: 15432 });
        assert_eq!(s.ports[1].backend_port, 53);
        assert!(s.visible_to("anyone") && s.auto_approves("contoso") && !s.auto_approves("fabrikam"));
        assert_eq!(c.endpoints.len(), 2);
    }

    #[test]
    fn busy_poll_takes_0_to_10ms_and_refuses_the_rest_with_its_position() {
        let c = Config::parse(GOOD, "t.toml").expect("valid");
        assert_eq!(c.dataplane.busy_poll, DEFAULT_BUSY_POLL);
        let with = |v: &str| GOOD.replacen("[dataplane]\n", &format!("[dataplane]\nbusy_poll = \"{v}\"\n"), 1);
        for (v, want) in [("0", 0), ("0s", 0), ("50us", 50), ("10ms", 10_000)] {
            let c = Config::parse(&with(v), "t.toml").expect(v);
            assert_eq!(c.dataplane.busy_poll, std::time::Duration::from_micros(want), "{v}");
        }
        for v in ["11ms", "fast", "-1us", ""] {
            let e = errors(&with(v));
            assert_eq!(e.len(), 1, "{v}: {e:?}");
            assert!(e[0].starts_with("t.toml:") && e[0].contains("busy_poll: `"), "{v}: {e:?}");
            assert!(e[0].contains("is not a duration from 0 to 10ms"), "{v}: {e:?}");
        }
    }

    const STORE: &str = "[store]\netcd = [\"http://127.0.0.1:2379\"]\nhost = \"h1\"\n\n";

    /// GOOD's local part with a `[store]`, and its objects as documents.
    fn fleet() -> (String, Vec<Doc>) {
        let layout = Layout { prefix: "/privlink".into(), host: "h1".into() };
        let docs = documents(GOOD, &layout).expect("split");
        let local = GOOD[..GOOD.find("[[network]]").expect("networks")].to_string();
        (format!("{STORE}{local}"), docs)
    }

    #[test]
    fn store_documents_validate_together_as_the_single_file_does() {
        let (local, docs) = fleet();
        assert_eq!(docs.len(), 5);
        assert_eq!(docs[0].key, "/privlink/services/orders-db");
        assert_eq!(docs[1].key, "/privlink/hosts/h1/networks/vnet-a");
        assert_eq!(docs[4].key, "/privlink/hosts/h1/endpoints/pe-b");
        let layout = Layout { prefix: "/privlink".into(), host: "h1".into() };
        for d in &docs {
            assert_eq!(layout.parse_key(&d.key), Some((d.kind, d.name.clone())));
        }
        assert_eq!(layout.parse_key("/privlink/hosts/h2/networks/x"), None);
        assert_eq!(layout.parse_key("/privlink/hosts/h1/connections/pe-a"), None);
        let c = Config::parse_with_store(&local, "p.toml", &docs).expect("valid");
        let single = Config::parse(GOOD, "p.toml").expect("valid");
        assert_eq!((c.networks, c.services, c.endpoints), (single.networks, single.services, single.endpoints));
        let store = c.store.expect("store");
        assert_eq!((store.prefix.as_str(), store.host.as_str()), ("/privlink", "h1"));
        assert_eq!(store.lease_ttl, std::time::Duration::from_secs(5));
    }

    #[test]
    fn dns_keys_travel_through_store_documents() {
        let text = GOOD
            .replace(
                "auto_approve = [\"contoso\"]",
                "auto_approve = [\"contoso\"]\ndns_names = [\"o.privatelink.x.internal\"]",
            )
            .replace("netns = \"tenant-a\"", "netns = \"tenant-a\"\ndns = \"10.1.0.53\"")
            .replace("name = \"pe-b\"", "name = \"pe-b\"\ndns_names = [\"b.x.internal\"]");
        let layout = Layout { prefix: "/privlink".into(), host: "h1".into() };
        let docs = documents(&text, &layout).expect("split");
        let local = format!("{STORE}{}\n[dns]\nttl = 30\n", &text[..text.find("[[network]]").expect("networks")]);
        let c = Config::parse_with_store(&local, "p.toml", &docs).expect("valid");
        let single = Config::parse(&text, "p.toml").expect("valid");
        assert_eq!((&c.networks, &c.services, &c.endpoints), (&single.networks, &single.services, &single.endpoints));
        assert_eq!((c.networks[0].dns, c.dns.ttl), (Some(Ipv4Addr::new(10, 1, 0, 53)), 30));
        assert_eq!(c.dns_names(&c.endpoints[1]), vec!["o.privatelink.x.internal", "b.x.internal"]);
    }

    #[test]
    fn an_error_in_a_store_document_names_its_key_and_position() {
        let (local, mut docs) = fleet();
        // A semantic error (unknown service), in the document's line 4.
        docs[3].text = docs[3].text.replace("service = \"orders-db\"", "service = \"nope\"");
        let line = docs[3].text.lines().position(|l| l.starts_with("service")).expect("line") + 1;
        let e = Config::parse_with_store(&local, "p.toml", &docs).expect_err("unknown service").lines();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with(&format!("etcd:/privlink/hosts/h1/endpoints/pe-a:{line}:11: ")), "{e:?}");
        // A foreign table inside a document, a name differing from its key,
        // a syntax error: each refused at its document.
        let (_, mut docs) = fleet();
        docs[0].text.push_str("\n[dataplane]\nworkers = 9\n");
        docs[1].text = docs[1].text.replace("name = \"vnet-a\"", "name = \"vnet-x\"");
        docs[2].text = "name = = 1".into();
        let e = Config::parse_with_store(&local, "p.toml", &docs).expect_err("three").lines();
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].starts_with("etcd:/privlink/services/orders-db:") && e[0].contains("unknown field `dataplane`"));
        assert!(e[1].contains("/networks/vnet-a:") && e[1].contains("name `vnet-x` differs from the key's `vnet-a`"));
        assert!(e[2].starts_with("etcd:/privlink/hosts/h1/networks/vnet-b:1:"), "{e:?}");
        // A table header inside a document: refused with how to write it.
        let (_, mut docs) = fleet();
        let without: String =
            docs[0].text.lines().filter(|l| !l.starts_with("ports")).map(|l| format!("{l}\n")).collect();
        docs[0].text = format!("{without}[[ports]]\nprotocol = \"tcp\"\nport = 5432\n");
        let e = Config::parse_with_store(&local, "p.toml", &docs).expect_err("header").lines();
        assert!(
            e[0].starts_with("etcd:/privlink/services/orders-db:") && e[0].contains("write its tables inline"),
            "{e:?}"
        );
    }

    #[test]
    fn with_a_store_the_file_keeps_no_objects_and_store_values_are_checked() {
        let e = Config::parse_with_store(&format!("{STORE}{GOOD}"), "p.toml", &[]).expect_err("objects").lines();
        assert!(e[0].starts_with("p.toml:") && e[0].contains("with [store], networks live in the store"), "{e:?}");
        let bad = "[store]\netcd = [\"https://x:1\", \"http://h\"]\nprefix = \"privlink/\"\nhost = \"a b\"\nlease_ttl = \"2h\"\n";
        let e = errors(&format!("{bad}{GOOD}"));
        assert_eq!(e.len(), 5, "{e:?}");
        assert!(e[0].starts_with("t.toml:2:9: etcd: `https://x:1` is not http://HOST:PORT"), "{e:?}");
        assert!(e[1].starts_with("t.toml:2:24: etcd: `http://h`"), "{e:?}");
        assert!(e[2].starts_with("t.toml:3:10: prefix:"), "{e:?}");
        assert!(e[3].starts_with("t.toml:4:8: host name `a b`"), "{e:?}");
        assert!(e[4].starts_with("t.toml:5:13: lease_ttl:"), "{e:?}");
        let e = errors(&format!("[store]\nhost = \"h\"\n{GOOD}"));
        assert!(e[0].contains("missing field `etcd`"), "{e:?}");
        // Up to 256 NAT addresses with a store (8 without).
        let ips =
            |n: u32| (1..=n).map(|i| format!("\"10.200.{}.{}\"", i / 256, i % 256)).collect::<Vec<_>>().join(", ");
        let many = |n| GOOD.replace("nat_ips = [\"192.168.100.4\"]", &format!("nat_ips = [{}]", ips(n)));
        let e = errors(&many(9));
        assert!(e[0].contains("nat_ips: 9 given, must be 1 to 8 (up to 256 with [store])"), "{e:?}");
        assert_eq!(errors(&format!("{STORE}{}", many(256))), Vec::<String>::new());
        let e = errors(&format!("{STORE}{}", many(257)));
        assert!(e[0].contains("nat_ips: 257 given, must be 1 to 256"), "{e:?}");
    }

    #[test]
    fn syntax_error_has_position() {
        let e = errors("[provider]\ntun = \"x\"\nmtu = = 3\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.toml:3:"), "{e:?}");
    }

    #[test]
    fn unknown_key_has_position() {
        let e = errors("[provider]\ntun = \"x\"\nmtux = 3\n");
        assert!(e[0].starts_with("t.toml:3:1: unknown field `mtux`"), "{e:?}");
    }

    #[test]
    fn semantic_errors_all_reported_with_positions() {
        let bad = GOOD
            .replace("network = \"vnet-b\"", "network = \"vnet-z\"")
            .replace("service = \"orders-db\"\n\n[[endpoint]]", "service = \"nope\"\n\n[[endpoint]]")
            .replace("\"2000-2009\"", "\"2009-2000\"")
            .replace("protocol = \"udp\"", "protocol = \"sctp\"");
        let e = errors(&bad);
        let joined = e.join("\n");
        assert!(joined.contains("unknown network `vnet-z`"), "{joined}");
        assert!(joined.contains("unknown service `nope`"), "{joined}");
        assert!(joined.contains("nat_ports: `2009-2000`"), "{joined}");
        assert!(joined.contains("`sctp` is not `tcp` or `udp`"), "{joined}");
        assert_eq!(e.len(), 4, "{joined}");
        let line_of = |needle: &str| bad.lines().position(|l| l.contains(needle)).expect("line") + 1;
        assert!(joined.contains(&format!("t.toml:{}:11: unknown network", line_of("vnet-z"))), "{joined}");
    }

    #[test]
    fn duplicates_and_clashes() {
        let mut bad = GOOD.replace("name = \"pe-b\"", "name = \"pe-a\"");
        bad.push_str("\n[[service]]\nname = \"orders-db\"\nnat_ips = [\"192.168.100.4\"]\nbackends = []\nports = [{ protocol = \"tcp\", port = 1 }]\n");
        bad.push_str("\n[[service]]\nname = \"other\"\nnat_ips = [\"192.168.100.4\"]\nbackends = [\"1.2.3.4\"]\nports = [{ protocol = \"tcp\", port = 1 }]\n");
        bad.push_str(
            "\n[[endpoint]]\nname = \"pe-c\"\nnetwork = \"vnet-a\"\nip = \"10.1.0.5\"\nservice = \"orders-db\"\n",
        );
        bad.push_str(
            "\n[[endpoint]]\nname = \"pe-d\"\nnetwork = \"vnet-a\"\nip = \"192.168.100.4\"\nservice = \"orders-db\"\n",
        );
        bad.push_str(
            "\n[[endpoint]]\nname = \"pe-e\"\nnetwork = \"vnet-a\"\nip = \"192.168.50.11\"\nservice = \"orders-db\"\n",
        );
        let joined = errors(&bad).join("\n");
        for want in [
            "duplicate endpoint name `pe-a`",
            "duplicate service name `orders-db`",
            "192.168.100.4 is already a NAT IP of service `orders-db`",
            "backends: at least one backend",
            "10.1.0.5 is already an endpoint in network `vnet-a`",
            "ip: 192.168.100.4 is a NAT IP",
            "ip: 192.168.50.11 is a backend address",
        ] {
            assert!(joined.contains(want), "missing {want:?} in\n{joined}");
        }
    }

    #[test]
    fn limits() {
        let many: Vec<String> = (1..=9).map(|i| format!("\"192.168.200.{i}\"")).collect();
        let bad = GOOD.replace("[\"192.168.100.4\"]", &format!("[{}]", many.join(", ")));
        assert!(errors(&bad).join("\n").contains("9 given, must be 1 to 8"));
        let bad = GOOD.replace("port = 53", "port = 70000");
        assert!(errors(&bad).join("\n").contains("port must be 1 to 65535, not 70000"));
        let bad = GOOD.replace("name = \"vnet-a\"", "name = \"provider\"").replace("\"vnet-a\"", "\"provider\"");
        assert!(errors(&bad).join("\n").contains("reserved"));
        assert!(errors("").join("\n").contains("missing table `[provider]`"));
    }

    #[test]
    fn nonsense_the_engine_would_choke_on_is_refused_with_positions() {
        // A service with 65,535 backends once reached an assert.
        let many: Vec<String> =
            (0..65_535u32).map(|i| format!("\"10.{}.{}.{}\"", 200 + i / 65536, (i / 256) % 256, i % 256)).collect();
        let bad = GOOD.replace("[\"192.168.50.10\", \"192.168.50.11\"]", &format!("[{}]", many.join(", ")));
        let e = errors(&bad).join("\n");
        assert!(e.contains(&format!("backends: 65535 given, at most {MAX_BACKENDS}")), "{e}");
        assert!(e.starts_with("t.toml:"), "{e}");
    }

    /// GOOD with an IPv6 service and an IPv6 endpoint of it in vnet-a.
    fn good6() -> String {
        GOOD.replace("address = \"10.0.0.1/32\"", "address = \"10.0.0.1/32\"\naddress6 = \"fd00:aa::10/128\"")
            + r#"
[[service]]
name = "orders6"
nat_ips = ["fd00:64::4"]
backends = ["fd00:50::10"]
ports = [{ protocol = "tcp", port = 5432 }]

[[endpoint]]
name = "pe6-a"
network = "vnet-a"
ip = "fd00:aa::5"
service = "orders6"
allow_sources = ["fd00:aa::/64"]
"#
    }

    #[test]
    fn ipv6_endpoints_and_services_parse_with_their_family_rules() {
        let c = Config::parse(&good6(), "t.toml").expect("valid");
        let e = c.endpoints.iter().find(|e| e.name == "pe6-a").expect("pe6-a");
        assert_eq!(e.ip, "fd00:aa::5".parse::<IpAddr>().expect("addr"));
        assert_eq!(e.allow_sources, vec![("fd00:aa::".parse::<IpAddr>().expect("addr"), 64)]);
        assert_eq!(c.networks[1].address6, Some(("fd00:aa::10".parse().expect("addr"), 128)));
        let cases: &[(&str, &str, &str)] = &[
            ("ip = \"fd00:aa::5\"", "ip = \"fe80::5\"", "t.toml:57:6: ip: fe80::5 is a link-local address"),
            ("ip = \"fd00:aa::5\"", "ip = \"ff02::1\"", "ip: ff02::1 is a multicast address"),
            ("ip = \"fd00:aa::5\"", "ip = \"::1\"", "ip: ::1 is the loopback address"),
            ("ip = \"fd00:aa::5\"", "ip = \"::\"", "ip: :: is the unspecified address"),
            ("ip = \"fd00:aa::5\"", "ip = \"::ffff:10.1.0.9\"", "ip: ::ffff:10.1.0.9 is an IPv4-mapped address"),
            ("ip = \"fd00:aa::5\"", "ip = \"2001:db8::5\"", "ip: 2001:db8::5 is a documentation address"),
            ("ip = \"fd00:aa::5\"", "ip = \"fd00:aa::zz\"", "ip: `fd00:aa::zz` is not an IPv4 or IPv6 address"),
            (
                "ip = \"10.1.0.5\"\nservice = \"orders-db\"\n\n[[endpoint]]\nname = \"pe-b\"",
                "ip = \"10.1.0.5\"\nservice = \"orders6\"\n\n[[endpoint]]\nname = \"pe-b\"",
                "ip: an IPv4 endpoint cannot reach service `orders6`, which is IPv6",
            ),
            ("backends = [\"fd00:50::10\"]", "backends = [\"192.168.50.99\"]", "backends: 192.168.50.99 is IPv4 and the service's fd00:64::4 IPv6"),
            ("nat_ips = [\"fd00:64::4\"]", "nat_ips = [\"fd00:64::4\", \"192.168.100.9\"]", "nat_ips: 192.168.100.9 is IPv4 and fd00:64::4 IPv6"),
            ("allow_sources = [\"fd00:aa::/64\"]", "allow_sources = [\"10.1.0.0/24\"]", "allow_sources: `10.1.0.0/24` is IPv4 but the endpoint is IPv6"),
            ("allow_sources = [\"fd00:aa::/64\"]", "allow_sources = [\"fd00:aa::1/64\"]", "has host bits set (did you mean fd00:aa::/64?)"),
            ("address6 = \"fd00:aa::10/128\"", "address6 = \"fd00:aa::10\"", "address6: `fd00:aa::10` is not IPV6-ADDRESS/PREFIX"),
            (
                "service = \"orders6\"\nallow",
                "service = \"orders6\"\ndns_names = [\"db.example.internal\"]\n\n[[endpoint]]\nname = \"pe6-x\"\nnetwork = \"vnet-a\"\nip = \"fd00:aa::7\"\nservice = \"orders6\"\ndns_names = [\"db.example.internal\"]\nallow",
                "dns_names: `db.example.internal` is claimed twice in network `vnet-a`",
            ),
        ];
        // An IPv6 endpoint of an IPv4 service (translated, RFC 6146), also
        // of one sending PROXY headers; an IPv6 service with them.
        let to_v4 = good6().replacen(
            "ip = \"fd00:aa::5\"\nservice = \"orders6\"",
            "ip = \"fd00:aa::5\"\nservice = \"orders-db\"",
            1,
        );
        let c = Config::parse(&to_v4, "t.toml").expect("6 -> 4 is valid");
        assert_eq!(c.endpoints.iter().filter(|e| e.service == "orders-db").count(), 3);
        let proxied = to_v4.replacen("visibility = [\"*\"]", "visibility = [\"*\"]\nproxy_protocol = \"v2\"", 1);
        Config::parse(&proxied, "t.toml").expect("PROXY v2 for an IPv6 consumer of an IPv4 service");
        let proxied6 = good6().replacen(
            "backends = [\"fd00:50::10\"]",
            "backends = [\"fd00:50::10\"]\nproxy_protocol = \"v2\"",
            1,
        );
        Config::parse(&proxied6, "t.toml").expect("PROXY v2 on an IPv6 service");
        for (from, to, want) in cases {
            let bad = good6().replacen(from, to, 1);
            assert_ne!(bad, good6(), "{from}");
            let e = errors(&bad).join("\n");
            assert!(e.contains(want), "{to}: {e}");
        }
        let small = good6().replacen(
            "tun = \"pla0\"\nnetns = \"tenant-a\"",
            "tun = \"pla0\"\nnetns = \"tenant-a\"\nmtu = 1200",
            1,
        );
        assert!(errors(&small).join("").contains("IPv6 needs an MTU of 1280 or more; network `vnet-a` has 1200"));
        let small_provider = good6().replacen("netns = \"provider\"", "netns = \"provider\"\nmtu = 1200", 1);
        assert!(errors(&small_provider).join("").contains("backends: IPv6 needs a provider MTU of 1280 or more"));
    }

    #[test]
    fn nonsense_names_and_addresses_are_refused() {
        // Each with its position.
        let cases: &[(&str, &str, &str)] = &[
            ("netns = \"tenant-a\"", "netns = \"\"", "netns: `` is not a namespace name"),
            ("netns = \"tenant-a\"", "netns = \"..\"", "netns: `..` is not a namespace name"),
            ("netns = \"tenant-a\"", "netns = \"a/../b\"", "netns: `a/../b` is not a namespace name"),
            ("tun = \"plp0\"", "tun = \"x%d\"", "`x%d` is not a valid interface name"),
            ("tun = \"plp0\"", "tun = \"lo\"", "`lo` is the loopback device"),
            (
                "ip = \"10.1.0.5\"\nservice = \"orders-db\"\n\n[[endpoint]]",
                "ip = \"0.0.0.0\"\nservice = \"orders-db\"\n\n[[endpoint]]",
                "ip: 0.0.0.0 is not a unicast address",
            ),
            (
                "ip = \"10.1.0.5\"\nservice = \"orders-db\"\n\n[[endpoint]]",
                "ip = \"224.0.0.1\"\nservice = \"orders-db\"\n\n[[endpoint]]",
                "ip: 224.0.0.1 is not a unicast address",
            ),
            (
                "ip = \"10.1.0.5\"\nservice = \"orders-db\"\n\n[[endpoint]]",
                "ip = \"255.255.255.255\"\nservice = \"orders-db\"\n\n[[endpoint]]",
                "ip: 255.255.255.255 is not a unicast address",
            ),
            (
                "nat_ips = [\"192.168.100.4\"]",
                "nat_ips = [\"127.0.0.1\"]",
                "nat_ips: 127.0.0.1 is not a unicast address",
            ),
        ];
        for (from, to, want) in cases {
            let bad = GOOD.replacen(from, to, 1);
            assert_ne!(bad, GOOD, "{from}");
            let e = errors(&bad).join("\n");
            assert!(e.contains(want), "{to}: missing {want:?} in\n{e}");
            let line = bad.lines().position(|l| to.lines().next().is_some_and(|t| l.contains(t))).expect("line") + 1;
            assert!(e.contains(&format!("t.toml:{line}:")), "{to}: no position in\n{e}");
        }
        // A backend that is another service's NAT IP.
        let mut bad = GOOD.to_string();
        bad.push_str("\n[[service]]\nname = \"other\"\nnat_ips = [\"192.168.100.9\"]\nbackends = [\"192.168.100.4\"]\nports = [{ protocol = \"tcp\", port = 1 }]\n");
        let e = errors(&bad).join("\n");
        assert!(e.contains("backends: 192.168.100.4 is a NAT IP of service `orders-db`"), "{e}");
        // Names: bounded, printable.
        let long = "n".repeat(10_000);
        let e = errors(&GOOD.replace("name = \"pe-a\"", &format!("name = \"{long}\""))).join("\n");
        assert!(e.contains("must be 1 to 63 characters"), "{}", &e[..200.min(e.len())]);
        let e = errors(&GOOD.replace("name = \"pe-a\"", "name = \"pe\\u001b[2J\"")).join("\n");
        assert!(e.contains("letters, digits"), "{e}");
    }

    #[test]
    fn a_huge_file_is_refused_before_it_is_read_whole() {
        let e = Config::load(Path::new("/dev/zero")).expect_err("not a config");
        assert!(e.to_string().contains("larger than"), "{e}");
    }

    #[test]
    fn endpoint_limits_and_source_rules_parse_and_bad_ones_have_positions() {
        let text = GOOD
            .replace("auto_approve = [\"contoso\"]", "auto_approve = [\"contoso\"]\nmax_flows_per_endpoint = 500")
            .replace(
                "name = \"pe-a\"\nnetwork = \"vnet-a\"\nip = \"10.1.0.5\"\nservice = \"orders-db\"",
                "name = \"pe-a\"\nnetwork = \"vnet-a\"\nip = \"10.1.0.5\"\nservice = \"orders-db\"\nmax_flows = 20\nallow_sources = [\"10.0.0.0/24\", \"10.9.9.9\"]",
            );
        let c = Config::parse(&text, "t.toml").expect("valid");
        assert_eq!(c.services[0].max_flows_per_endpoint, Some(500));
        let a = &c.endpoints[0];
        assert_eq!(a.max_flows, Some(20));
        assert_eq!(
            a.allow_sources,
            vec![(Ipv4Addr::new(10, 0, 0, 0).into(), 24), (Ipv4Addr::new(10, 9, 9, 9).into(), 32)]
        );
        assert_eq!((c.endpoints[1].max_flows, c.endpoints[1].allow_sources.len()), (None, 0));
        let bad = text.replace("max_flows = 20", "max_flows = 0").replace("\"10.0.0.0/24\"", "\"10.0.0.1/33\"");
        let e = errors(&bad).join("\n");
        assert!(e.contains("max_flows must be 1 to"), "{e}");
        assert!(e.contains("allow_sources: `10.0.0.1/33` is not ADDRESS/PREFIX"), "{e}");
        let bad = text.replace("max_flows_per_endpoint = 500", "max_flows_per_endpoint = 0");
        assert!(errors(&bad).join("\n").contains("max_flows_per_endpoint must be 1 to"));
        let bad = text.replace("\"10.9.9.9\"", "\"10.9.9.9/24\"");
        assert!(errors(&bad).join("\n").contains("host bits set"), "a prefix with host bits is a typo");
    }

    #[test]
    fn health_probes_parse_and_nonsense_has_positions() {
        let with = |h: &str| {
            GOOD.replace("auto_approve = [\"contoso\"]", &format!("auto_approve = [\"contoso\"]\nhealth = {h}"))
        };
        let c = Config::parse(&with("{ protocol = \"tcp\", port = 8080, interval = \"2s\", timeout = \"1s\", healthy_after = 2, unhealthy_after = 3 }"), "t.toml").expect("valid");
        let h = c.services[0].health.clone().expect("health");
        assert_eq!(
            (h.kind, h.port, h.interval.as_millis(), h.timeout.as_millis(), h.healthy_after, h.unhealthy_after),
            (HealthKind::Tcp, 8080, 2000, 1000, 2, 3)
        );
        let c = Config::parse(
            &with("{ protocol = \"http\", path = \"/healthz\", interval = \"500ms\", timeout = \"200ms\" }"),
            "t.toml",
        )
        .expect("valid");
        let h = c.services[0].health.clone().expect("health");
        assert_eq!(
            (h.kind, h.port),
            (HealthKind::Http { path: "/healthz".into() }, 15432),
            "port defaults to the first TCP backend port"
        );
        for (bad, want) in [
            ("{ protocol = \"tcp\", interval = \"soon\" }", "interval: `soon` is not a duration"),
            ("{ protocol = \"tcp\", healthy_after = 0 }", "healthy_after must be 1 to 100"),
            ("{ protocol = \"tcp\", unhealthy_after = 0 }", "unhealthy_after must be 1 to 100"),
            ("{ protocol = \"http\" }", "missing"),
            ("{ protocol = \"http\", path = \"healthz\" }", "path: `healthz` is not an absolute URL path"),
            ("{ protocol = \"icmp\" }", "protocol: `icmp` is not `tcp` or `http`"),
            ("{ protocol = \"tcp\", interval = \"1s\", timeout = \"2s\" }", "timeout: longer than the interval"),
        ] {
            let e = errors(&with(bad)).join("\n");
            assert!(e.contains(want) && e.starts_with("t.toml:"), "{bad}: missing {want:?} in\n{e}");
        }
    }

    #[test]
    fn proxy_protocol_parses_and_nonsense_has_positions() {
        let with =
            |kv: &str| GOOD.replace("auto_approve = [\"contoso\"]", &format!("auto_approve = [\"contoso\"]\n{kv}"));
        assert_eq!(Config::parse(GOOD, "t.toml").expect("valid").services[0].proxy, None, "off by default");
        for (kv, want) in [
            ("proxy_protocol = \"off\"", None),
            ("proxy_protocol = \"v2\"", Some(ProxyTlv::None)),
            ("proxy_protocol = \"v2\"\nproxy_tlv = \"azure\"", Some(ProxyTlv::Azure)),
            ("proxy_protocol = \"v2\"\nproxy_tlv = \"aws\"", Some(ProxyTlv::Aws)),
            ("proxy_protocol = \"v2\"\nproxy_tlv = \"gcp\"", Some(ProxyTlv::Gcp)),
        ] {
            assert_eq!(Config::parse(&with(kv), "t.toml").expect(kv).services[0].proxy, want, "{kv}");
        }
        for (bad, want) in [
            ("proxy_protocol = true", "t.toml:"),
            ("proxy_protocol = \"v1\"", "proxy_protocol: `v1` is not one of \"off\", \"v2\""),
            ("proxy_protocol = \"v2\"\nproxy_tlv = \"ibm\"", "proxy_tlv: `ibm` is not one of"),
            ("proxy_tlv = \"azure\"", "proxy_tlv needs proxy_protocol = \"v2\""),
        ] {
            let e = errors(&with(bad)).join("\n");
            assert!(e.contains(want) && e.starts_with("t.toml:"), "{bad}: missing {want:?} in\n{e}");
        }
    }

    #[test]
    fn dns_names_and_resolvers_parse_and_conflicts_name_both_positions() {
        let text = GOOD
            .replace(
                "auto_approve = [\"contoso\"]",
                "auto_approve = [\"contoso\"]\ndns_names = [\"Orders.PrivateLink.Example.Internal.\"]",
            )
            .replace("netns = \"tenant-a\"", "netns = \"tenant-a\"\ndns = \"10.1.0.53\"")
            .replace("name = \"pe-b\"", "name = \"pe-b\"\ndns_names = [\"b.example.internal\"]");
        let c = Config::parse(
            &(text.clone() + "\n[dns]\nforward = [\"127.0.0.1:5353\", \"10.9.9.9\"]\nttl = 30\n"),
            "t.toml",
        )
        .expect("valid");
        assert_eq!(c.networks[0].dns, Some(Ipv4Addr::new(10, 1, 0, 53)));
        assert_eq!(c.services[0].dns_names, vec!["orders.privatelink.example.internal"], "lower case, no dot");
        assert_eq!(c.dns_names(&c.endpoints[1]), vec!["orders.privatelink.example.internal", "b.example.internal"]);
        assert_eq!(
            c.dns.forward,
            vec!["127.0.0.1:5353".parse().expect("valid"), "10.9.9.9:53".parse().expect("valid")]
        );
        assert_eq!((c.dns.ttl, c.dns.rate, c.dns.query_log), (30, 20_000, false));
        assert_eq!(Config::parse(GOOD, "t.toml").expect("valid").dns, Dns::default());
        // A network's resolver moves without a new device.
        let mut moved = c.networks[0].clone();
        moved.dns = Some(Ipv4Addr::new(10, 1, 0, 54));
        assert!(moved.same_device(&c.networks[0]) && moved != c.networks[0]);

        // One name, two endpoints of one network: refused, naming both.
        let clash = text.clone()
            + "\n[[endpoint]]\nname = \"pe-c\"\nnetwork = \"vnet-a\"\nip = \"10.1.0.6\"\nservice = \"orders-db\"\n";
        let e = errors(&clash).join("\n");
        assert!(
            e.contains("t.toml:50:1: dns_names: `orders.privatelink.example.internal` is claimed twice in network `vnet-a`: by endpoint `pe-a` (through service `orders-db`) at t.toml:37:1 and by endpoint `pe-c` (through service `orders-db`)"),
            "{e}"
        );
        let own = text.clone()
            + "\n[[endpoint]]\nname = \"pe-c\"\nnetwork = \"vnet-b\"\nip = \"10.1.0.6\"\nservice = \"orders-db\"\ndns_names = [\"B.example.internal\"]\n";
        let e = errors(&own).join("\n");
        assert!(e.contains("t.toml:55:14: dns_names: `b.example.internal` is claimed twice in network `vnet-b`: by endpoint `pe-b` at t.toml:45:14 and by endpoint `pe-c`"), "{e}");

        for (bad, want) in [
            ("dns_names = [\"nodot\"]", "`nodot` is not a DNS name: needs at least two labels"),
            ("dns_names = [\"a..b\"]", "empty label"),
            ("dns_names = [\"-a.b\"]", "labels may hold"),
            ("dns_names = [\"a b.c\"]", "labels may hold"),
            ("dns_names = [\"a.b\", \"A.B\"]", "`a.b` is listed twice"),
            ("dns_names = [\"1.2.3.4\"]", "last label is all digits"),
        ] {
            let e =
                errors(&GOOD.replace("auto_approve = [\"contoso\"]", &format!("auto_approve = [\"contoso\"]\n{bad}")))
                    .join("\n");
            assert!(e.contains(want) && e.starts_with("t.toml:"), "{bad}: missing {want:?} in\n{e}");
        }
        let long = format!("dns_names = [\"{}.b\"]", "a".repeat(64));
        assert!(errors(&GOOD.replace("auto_approve = [\"contoso\"]", &long)).join("").contains("longer than 63"));
        for (bad, want) in [
            ("dns = \"10.1.0.\"", "dns: `10.1.0.` is not an IPv4 address"),
            ("dns = \"224.0.0.53\"", "dns: 224.0.0.53 is not a unicast address"),
        ] {
            let e = errors(&GOOD.replace("netns = \"tenant-a\"", &format!("netns = \"tenant-a\"\n{bad}"))).join("\n");
            assert!(e.contains(want), "{bad}: missing {want:?} in\n{e}");
        }
        let no_ns = GOOD.replace("netns = \"tenant-b\"\naddress", "dns = \"10.1.0.53\"\naddress");
        assert!(
            errors(&no_ns).join("").contains("dns: a resolver needs the network's own `netns`"),
            "{:?}",
            errors(&no_ns)
        );
        let hides = GOOD.replace("netns = \"tenant-a\"", "netns = \"tenant-a\"\ndns = \"10.1.0.5\"");
        let e = errors(&hides).join("\n");
        assert!(e.contains("t.toml:39:6: ip: 10.1.0.5 is the DNS resolver address of network `vnet-a`"), "{e}");
        assert!(!e.contains("vnet-b`"), "another namespace's endpoint may use it: {e}");
        let own_addr = GOOD.replace("address = \"10.0.0.1/32\"", "address = \"10.0.0.1/32\"\ndns = \"10.0.0.1\"");
        assert!(errors(&own_addr).join("").contains("dns: 10.0.0.1 is the device's own address"));
        let same_ns = GOOD.replace("netns = \"tenant-a\"", "netns = \"tenant-a\"\ndns = \"10.1.0.53\"").replace(
            "tun = \"pla0\"\nnetns = \"tenant-b\"",
            "tun = \"plb0\"\nnetns = \"tenant-a\"\ndns = \"10.1.0.53\"",
        );
        let e = errors(&same_ns).join("\n");
        assert!(e.contains("dns: 10.1.0.53 is already the resolver of network `vnet-a` in the same namespace"), "{e}");
        for (bad, want) in [
            ("forward = [\"nowhere\"]", "forward: `nowhere` is not an ADDRESS or ADDRESS:PORT"),
            ("forward = [\"0.0.0.0:53\"]", "forward: `0.0.0.0:53`"),
            ("ttl = -1", "ttl must be 0 to 86400"),
            ("rate = 0", "rate must be 1 to 10000000"),
            ("bogus = 1", "unknown field `bogus`"),
        ] {
            let e = errors(&format!("{GOOD}\n[dns]\n{bad}\n")).join("\n");
            assert!(e.contains(want), "{bad}: missing {want:?} in\n{e}");
        }
    }
}
