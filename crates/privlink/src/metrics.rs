//! Prometheus metrics. The packet path never touches the `metrics` registry:
//! workers count into per-worker slots inside the engine, and on each scrape
//! [`sync`] sums them and sets the registry's values, which the
//! `metrics-exporter-prometheus` recorder then renders. Values are therefore
//! exact at scrape time, and scraping costs nothing when nobody scrapes.

use crate::dataplane::IoErrors;
use anyhow::{Context, Result};
use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use privlink_core::{ConnectionState, DropReason, Engine};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The label privlink uses for provider-side drops.
pub const PROVIDER: &str = privlink_config::PROVIDER_LABEL;

/// Installs the recorder and describes every metric (the HELP lines).
pub fn install() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new().install_recorder().context("cannot install the metrics recorder")?;
    describe_counter!(
        "privlink_endpoint_bytes_total",
        "IP bytes through an endpoint; direction in = consumer to service, out = service to consumer."
    );
    describe_counter!("privlink_endpoint_packets_total", "Packets through an endpoint, by direction.");
    describe_gauge!(
        "privlink_endpoint_flows_active",
        "Open flows of an endpoint (what max_flows bounds; a closed TCP flow no longer counts)."
    );
    describe_gauge!(
        "privlink_endpoint_nat_ports_in_use",
        "NAT ports an endpoint holds from its service's pools (one per live flow, open or closed but not yet ended): who is eating a pool."
    );
    describe_counter!("privlink_endpoint_flows_created_total", "Flows an endpoint has created.");
    describe_counter!("privlink_service_bytes_total", "IP bytes through all endpoints of a service, by direction.");
    describe_gauge!("privlink_nat_ports_available", "NAT ports neither in use nor quarantined, per pool.");
    describe_gauge!("privlink_nat_ports_capacity", "NAT ports in a pool (its nat_ports range).");
    describe_counter!("privlink_nat_port_exhausted_total", "New flows refused because the pool had no usable port.");
    describe_counter!(
        "privlink_packets_dropped_total",
        "Packets not forwarded, by reason and by the network they came from (provider = provider side)."
    );
    describe_gauge!("privlink_flows_active", "Live flows in the flow table.");
    describe_gauge!("privlink_store_up", "1 while the [store]'s etcd answers (and its watch runs), else 0.");
    describe_counter!("privlink_store_resyncs_total", "Full re-reads of the store after a broken or compacted watch.");
    describe_gauge!(
        "privlink_store_refused",
        "1 while the store's documents for this host do not validate (it runs on the last good ones)."
    );
    describe_counter!(
        "privlink_dns_queries_total",
        "Queries a network's resolver answered, by response code (NOERROR, NXDOMAIN, REFUSED, FORMERR, SERVFAIL, NOTIMP, other)."
    );
    describe_counter!(
        "privlink_dns_dropped_total",
        "Queries a network's resolver dropped unanswered: rate_limited ([dns] rate), malformed (no DNS header, or a response), busy (too many TCP connections or forwards in flight)."
    );
    describe_counter!(
        "privlink_dns_forward_errors_total",
        "Forwarded queries no [dns] forward upstream answered (the client got SERVFAIL)."
    );
    counter!("privlink_dns_forward_errors_total").absolute(0);
    describe_gauge!("privlink_flows_max", "Flows the flow table holds at most ([dataplane] max_flows).");
    describe_gauge!("privlink_connection_state", "1 for an endpoint connection's current state, 0 for the others.");
    describe_counter!("privlink_tun_write_errors_total", "Packets a TUN device refused to take.");
    describe_gauge!(
        "privlink_backend_up",
        "1 while a backend takes new flows (healthy, or its service has no probe), else 0."
    );
    describe_counter!("privlink_backend_flows_created_total", "Flows created on a backend.");
    describe_counter!(
        "privlink_devices_lost_total",
        "Times a TUN device was found deleted under the daemon (it is recreated)."
    );
    describe_counter!(
        "privlink_flow_log_records_sent_total",
        "NAT event records sent to the IPFIX collector ([flow_logs] collector)."
    );
    describe_counter!(
        "privlink_flow_log_records_dropped_total",
        "NAT event records dropped: the queue was full, or the collector refused the datagram."
    );
    describe_gauge!(
        "privlink_build_info",
        "1; the labels identify the running build (version, git commit, profile, target)."
    );
    gauge!(
        "privlink_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "commit" => env!("PRIVLINK_COMMIT"),
        "profile" => if cfg!(debug_assertions) { "debug" } else { "release" },
        "target" => std::env::consts::ARCH,
    )
    .set(1.0);
    process().describe();
    Ok(handle)
}

/// Process metrics as Prometheus client libraries export them
/// (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_open_fds`, ...), read from /proc at each scrape.
fn process() -> &'static metrics_process::Collector {
    static C: std::sync::OnceLock<metrics_process::Collector> = std::sync::OnceLock::new();
    C.get_or_init(metrics_process::Collector::default)
}

/// Endpoints (name -> service) the last scrape exported, so that series of
/// endpoints that left the config are brought to their final values.
pub type Exported = std::sync::Mutex<std::collections::HashMap<String, String>>;

/// Copies the engine's counters into the registry.
pub fn sync(engine: &Engine, io: &IoErrors, exported: &Exported) {
    process().collect();
    let snap = engine.snapshot();
    let mut seen = exported.lock().unwrap_or_else(|e| e.into_inner());
    // Detached endpoints: no flows, connection disconnected. (Their byte
    // counters keep their last values, as Prometheus counters should.)
    for (name, service) in seen.iter() {
        if snap.endpoint_by_name(name).is_none() {
            gauge!("privlink_endpoint_flows_active", "endpoint" => name.clone()).set(0.0);
            gauge!("privlink_endpoint_nat_ports_in_use", "endpoint" => name.clone(), "service" => service.clone())
                .set(0.0);
            for st in ConnectionState::ALL {
                let v = if st == ConnectionState::Disconnected { 1.0 } else { 0.0 };
                gauge!("privlink_connection_state", "endpoint" => name.clone(), "service" => service.clone(), "state" => st.as_str()).set(v);
            }
        }
    }
    seen.retain(|name, _| snap.endpoint_by_name(name).is_some());
    for e in &snap.endpoints {
        seen.insert(e.shared.name.clone(), e.shared.service_name.clone());
    }
    drop(seen);
    let mut service_bytes: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for ((_, _, service), t) in engine.retired_endpoints() {
        let s = service_bytes.entry(service).or_default();
        s.0 += t.bytes_in;
        s.1 += t.bytes_out;
    }
    for e in &snap.endpoints {
        let s = &e.shared;
        let (bi, pi, bo, po) = s.totals();
        let labels = |dir: &'static str| {
            [
                ("endpoint", s.name.clone()),
                ("network", s.network_name.clone()),
                ("service", s.service_name.clone()),
                ("direction", dir.to_string()),
            ]
        };
        counter!("privlink_endpoint_bytes_total", &labels("in")).absolute(bi);
        counter!("privlink_endpoint_bytes_total", &labels("out")).absolute(bo);
        counter!("privlink_endpoint_packets_total", &labels("in")).absolute(pi);
        counter!("privlink_endpoint_packets_total", &labels("out")).absolute(po);
        gauge!("privlink_endpoint_flows_active", "endpoint" => s.name.clone()).set(s.open_flows() as f64);
        gauge!("privlink_endpoint_nat_ports_in_use", "endpoint" => s.name.clone(), "service" => s.service_name.clone())
            .set(s.ports_in_use() as f64);
        counter!("privlink_endpoint_flows_created_total", "endpoint" => s.name.clone())
            .absolute(s.flows_created.load(Ordering::Relaxed));
        let state = s.state();
        for st in ConnectionState::ALL {
            gauge!("privlink_connection_state", "endpoint" => s.name.clone(), "service" => s.service_name.clone(), "state" => st.as_str())
                .set(if st == state { 1.0 } else { 0.0 });
        }
        let t = service_bytes.entry(s.service_name.clone()).or_default();
        t.0 += bi;
        t.1 += bo;
    }
    for (svc, (bi, bo)) in service_bytes {
        counter!("privlink_service_bytes_total", "service" => svc.clone(), "direction" => "in").absolute(bi);
        counter!("privlink_service_bytes_total", "service" => svc, "direction" => "out").absolute(bo);
    }
    for p in snap.pools.values() {
        let labels = [
            ("service", p.service.clone()),
            ("nat_ip", p.nat_ip.to_string()),
            ("protocol", p.protocol.as_str().to_string()),
        ];
        gauge!("privlink_nat_ports_available", &labels).set(f64::from(p.pool.available()));
        gauge!("privlink_nat_ports_capacity", &labels).set(f64::from(p.pool.capacity()));
        counter!("privlink_nat_port_exhausted_total", &labels).absolute(p.pool.exhausted());
    }
    let drops = |network: String, counts: [u64; DropReason::COUNT]| {
        for r in DropReason::ALL {
            counter!("privlink_packets_dropped_total", "reason" => r.as_str(), "network" => network.clone())
                .absolute(counts[r.index()]);
        }
    };
    drops(PROVIDER.to_string(), engine.provider_drops());
    for n in snap.network_list() {
        drops(n.name.clone(), Engine::network_drops(n));
    }
    for b in engine.backends() {
        let labels = [("service", b.service.clone()), ("backend", b.backend.to_string())];
        gauge!("privlink_backend_up", &labels).set(if b.up { 1.0 } else { 0.0 });
        counter!("privlink_backend_flows_created_total", &labels).absolute(b.flows_created);
    }
    gauge!("privlink_flows_active").set(f64::from(engine.flows().len()));
    gauge!("privlink_flows_max").set(f64::from(engine.flows().capacity()));
    counter!("privlink_tun_write_errors_total").absolute(io.writes.load(Ordering::Relaxed));
    for (device, n) in io.devices_lost.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        counter!("privlink_devices_lost_total", "device" => device.clone()).absolute(*n);
    }
}

/// Serves `GET /metrics` (anything else: 404) until the task is dropped.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, engine: Arc<Engine>, io: Arc<IoErrors>) {
    let exported: Arc<Exported> = Arc::default();
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            // Out of descriptors, say: do not spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (handle, engine, io, exported) = (handle.clone(), engine.clone(), io.clone(), exported.clone());
        tokio::spawn(async move {
            let mut req = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let read = async {
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => req.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            };
            if !matches!(tokio::time::timeout(std::time::Duration::from_secs(5), read).await, Ok(true)) {
                return;
            }
            let line = String::from_utf8_lossy(&req[..req.iter().position(|&b| b == b'\r').unwrap_or(0)]).to_string();
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let resp = if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
                sync(&engine, &io, &exported);
                let body = handle.render();
                format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n".to_string()
            };
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
