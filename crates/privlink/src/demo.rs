//! `privlink demo`: the product in under a minute, on any Linux host, as
//! root. It builds three throwaway namespaces (a provider with two services'
//! backends, and two tenants whose networks use the very same addresses,
//! one of them dual-stack with an IPv6 endpoint of an IPv4 service),
//! writes a config, runs the real daemon (this same binary, `privlink run`),
//! pushes TCP and UDP through it, shows a blocked attempt, prints the
//! metrics that counted it all, and removes everything again, also when a
//! step fails.

use crate::netns::{ip, is_root};
use crate::testbed::{self, Backend, BackendPorts, Namespaces};
use anyhow::{bail, Context, Result};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const EP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
/// Fabrikam's IPv6 endpoint of orders-db (an IPv4 service: translated).
const EP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xaa, 0, 0, 0, 0, 0, 5);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xaa, 0, 0, 0, 0, 0, 0x10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 10);
const ORDERS_BACKEND: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
const BILLING_BACKEND: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 10);
/// Each tenant network's private DNS resolver (the same address in both).
const RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 53);

/// The daemon child, stopped with SIGTERM on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = testbed::eventually(Duration::from_secs(5), || self.0.try_wait().ok().flatten().is_some());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the demo's temporary directory on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(prov: &str, a: &str, b: &str, dir: &std::path::Path, metrics: std::net::SocketAddr) -> String {
    format!(
        r#"# Written by `privlink demo`.
[dataplane]
workers = 2

[metrics]
listen = "{metrics}"

[control]
socket = "{dir}/control.sock"

[state]
dir = "{dir}/state"

[provider]
tun = "plp0"
netns = "{prov}"

[[network]]
name = "vnet-contoso"
tenant = "contoso"
tun = "pla0"
netns = "{a}"
address = "{CLIENT}/32"
dns = "{RESOLVER}"

[[network]]
name = "vnet-fabrikam"
tenant = "fabrikam"
tun = "plb0"
netns = "{b}"
address = "{CLIENT}/32"
address6 = "{CLIENT6}/128"
dns = "{RESOLVER}"

[[service]]
name = "orders-db"
nat_ips = ["192.168.100.4"]
backends = ["{ORDERS_BACKEND}"]
ports = [{{ protocol = "tcp", port = 5432 }}, {{ protocol = "udp", port = 53 }}]
visibility = ["*"]
auto_approve = ["*"]
dns_names = ["orders-db.privatelink.example.internal"]

[[service]]
name = "billing-api"
nat_ips = ["192.168.100.8"]
backends = ["{BILLING_BACKEND}"]
ports = [{{ protocol = "tcp", port = 5432 }}, {{ protocol = "udp", port = 53 }}]
visibility = ["*"]
auto_approve = ["*"]
dns_names = ["billing-api.privatelink.example.internal"]

[[endpoint]]
name = "pe-contoso-orders"
network = "vnet-contoso"
ip = "{EP}"
service = "orders-db"

[[endpoint]]
name = "pe-fabrikam-billing"
network = "vnet-fabrikam"
ip = "{EP}"
service = "billing-api"

[[endpoint]]
name = "pe-fabrikam-orders6"
network = "vnet-fabrikam"
ip = "{EP6}"
service = "orders-db"
"#,
        dir = dir.display()
    )
}

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("privlink demo needs root: it creates network namespaces and TUN devices (try: sudo privlink demo)");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        bail!("privlink demo needs /dev/net/tun (load the tun module: modprobe tun)");
    }
    let id = std::process::id();
    let (prov, a, b) = (format!("pldemo{id}-prov"), format!("pldemo{id}-contoso"), format!("pldemo{id}-fabrikam"));
    let dir = TempDir(std::env::temp_dir().join(format!("privlink-demo-{id}")));
    std::fs::create_dir_all(&dir.0).context("cannot create a temporary directory")?;
    let metrics = testbed::free_port()?;

    println!("privlink demo: one host, two tenants with overlapping networks, one provider\n");
    let ns = Namespaces::create(&[prov.clone(), a.clone(), b.clone()])?;
    for addr in [ORDERS_BACKEND, BILLING_BACKEND] {
        ip(Some(&prov), &["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
    }
    let ports = BackendPorts { hello: 5432, echo: 7, udp: 53, bye: None };
    let _backends = [
        Backend::start(&prov, "orders-db", ORDERS_BACKEND, ports)?,
        Backend::start(&prov, "billing-api", BILLING_BACKEND, ports)?,
    ];
    println!("  provider namespace {prov}");
    println!("    service orders-db    backend {ORDERS_BACKEND}  NAT IP 192.168.100.4");
    println!("    service billing-api  backend {BILLING_BACKEND}  NAT IP 192.168.100.8");
    println!("  tenant contoso   namespace {a}: client {CLIENT}, endpoint {EP} -> orders-db");
    println!("  tenant fabrikam  namespace {b}: client {CLIENT}, endpoint {EP} -> billing-api");
    println!("                   and over IPv6: client {CLIENT6}, endpoint {EP6} -> orders-db (IPv4, translated)\n");

    let path = dir.0.join("privlink.toml");
    std::fs::write(&path, config(&prov, &a, &b, &dir.0, metrics))?;
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let log = std::fs::File::create(dir.0.join("daemon.log"))?;
    let child = Command::new(exe)
        .args(["--log-level", "warn", "run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start the daemon")?;
    let mut daemon = Daemon(child);
    let up = testbed::eventually(Duration::from_secs(15), || {
        testbed::scrape(metrics).is_some() || daemon.0.try_wait().ok().flatten().is_some()
    });
    if !up || daemon.0.try_wait().ok().flatten().is_some() {
        let log = std::fs::read_to_string(dir.0.join("daemon.log")).unwrap_or_default();
        bail!("the daemon did not start:\n{log}");
    }
    println!("daemon running: privlink run --config {}\n", path.display());

    println!("1. Both tenants open TCP to the same address, {EP}:5432:");
    for (tenant, ns_name) in [("contoso", &a), ("fabrikam", &b)] {
        let mut s = testbed::connect(ns_name, EP, 5432, Duration::from_secs(3))
            .with_context(|| format!("{tenant}: TCP to {EP}:5432"))?;
        let greeting = testbed::line(&mut s);
        println!("   {tenant:<9} {CLIENT} -> {EP}:5432   backend says: {greeting}");
    }
    println!("   (same client address, same endpoint address, different services;");
    println!("    each backend sees only its service's NAT IP, never the tenant's address)\n");

    println!("2. UDP through the same endpoint:");
    for (tenant, ns_name) in [("contoso", &a), ("fabrikam", &b)] {
        let answer = testbed::udp_ask(ns_name, EP, 53, tenant).with_context(|| format!("{tenant}: UDP"))?;
        println!("   {tenant:<9} {CLIENT} -> {EP}:53/udp   answer: {answer}");
    }
    println!();

    println!("3. IPv6: fabrikam reaches orders-db (an IPv4 service) through its IPv6 endpoint:");
    let mut s = testbed::connect(&b, EP6, 5432, Duration::from_secs(3)).context("fabrikam: TCP over IPv6")?;
    println!("   fabrikam  [{CLIENT6}] -> [{EP6}]:5432   backend says: {}", testbed::line(&mut s));
    let answer = testbed::udp_ask(&b, EP6, 53, "fabrikam6").context("fabrikam: UDP over IPv6")?;
    println!("   fabrikam  [{CLIENT6}] -> [{EP6}]:53/udp   answer: {answer}");
    println!("   (each flow translated to IPv4 and back, RFC 6146/7915; the backend sees the NAT IP)\n");

    println!("4. Private DNS: each tenant asks its own resolver, {RESOLVER}, for both services' names (A, AAAA):");
    for (tenant, ns_name) in [("contoso", &a), ("fabrikam", &b)] {
        for name in ["orders-db.privatelink.example.internal", "billing-api.privatelink.example.internal"] {
            let (addr, code) = testbed::resolve(ns_name, RESOLVER, name).with_context(|| format!("{tenant}: DNS"))?;
            let (addr6, _) = testbed::resolve6(ns_name, RESOLVER, name).with_context(|| format!("{tenant}: DNS"))?;
            let shown = match (addr, addr6) {
                (None, None) => code,
                (a4, a6) => [a4.map(|a| a.to_string()), a6.map(|a| a.to_string())]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            println!("   {tenant:<9} {name:<40} -> {shown}");
        }
    }
    let (addr, _) = testbed::resolve(&a, RESOLVER, "orders-db.privatelink.example.internal")?;
    let addr = addr.context("contoso: orders-db's name did not resolve")?;
    let mut s = testbed::connect(&a, addr, 5432, Duration::from_secs(3)).context("contoso: TCP by name")?;
    println!("   contoso   connects by name to orders-db.privatelink.example.internal:5432: {}", testbed::line(&mut s));
    println!("   (a name resolves only where the tenant has an endpoint for it, to that endpoint)\n");

    println!("5. What is not published stays unreachable:");
    match testbed::connect(&a, EP, 22, Duration::from_secs(1)) {
        Ok(_) => println!("   contoso -> {EP}:22 (not offered)       CONNECTED (unexpected!)"),
        Err(e) => println!("   contoso -> {EP}:22 (not offered)       blocked: {}", e.root_cause()),
    }
    ip(Some(&a), &["route", "add", "192.168.0.0/16", "dev", "pla0"])?;
    match testbed::connect(&a, ORDERS_BACKEND, 5432, Duration::from_secs(1)) {
        Ok(_) => println!("   contoso -> {ORDERS_BACKEND}:5432 (the backend itself) CONNECTED (unexpected!)"),
        Err(e) => println!("   contoso -> {ORDERS_BACKEND}:5432 (the backend itself) blocked: {}", e.root_cause()),
    }
    println!();

    let text = testbed::scrape(metrics).context("cannot scrape metrics")?;
    println!("6. Metrics (http://{metrics}/metrics), the lines that moved:");
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    for l in lines {
        let interesting = [
            "privlink_endpoint_bytes_total",
            "privlink_endpoint_packets_total",
            "privlink_endpoint_flows_created_total",
            "privlink_packets_dropped_total",
            "privlink_flows_active",
            "privlink_dns_queries_total",
        ]
        .iter()
        .any(|m| l.starts_with(m));
        if interesting && !l.ends_with(" 0") {
            println!("   {l}");
        }
    }
    for l in text.lines().filter(|l| l.starts_with("privlink_nat_ports_available") && l.contains("\"tcp\"")) {
        println!("   {l}");
    }
    println!();

    let socket = dir.0.join("control.sock");
    println!("7. The control API: privlink connections, privlink flows");
    let list = crate::client::call(&socket, "GET", "/v1/connections", None)?;
    for l in crate::client::connections_table(&list)?.lines() {
        println!("   {l}");
    }
    println!();
    let flows = crate::client::call(&socket, "GET", "/v1/flows", None)?;
    for l in crate::client::flows_table(&flows)?.lines() {
        println!("   {l}");
    }
    println!();

    drop(daemon);
    drop(ns);
    println!("done: daemon stopped, namespaces and devices removed.");
    Ok(())
}
