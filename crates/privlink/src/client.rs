//! The CLI side of the control API: `privlink connections` and
//! `privlink flows` send one HTTP/1.1 request over the unix socket and print
//! the JSON answer as a table (or as-is with `--json`).
//!
//! One request per process on a local socket with `Connection: close` needs
//! no HTTP client library: write the request, read to EOF, split the status
//! line from the body.

use crate::control::FlowView;
use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Sends `method path` with an optional JSON body; returns the JSON body of a
/// 2xx answer, or the API's one-line error.
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<String> {
    let mut s = UnixStream::connect(socket).map_err(|e| match e.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
            anyhow::anyhow!("privlink is not running (no control socket at {})", socket.display())
        }
        ErrorKind::PermissionDenied => {
            anyhow::anyhow!("cannot open {}: permission denied (the control socket is root's)", socket.display())
        }
        _ => anyhow::anyhow!("cannot connect to {}: {e}", socket.display()),
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: privlink\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).context("cannot send to the daemon")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).context("cannot read the daemon's answer")?;
    let (head, body) = resp.split_once("\r\n\r\n").context("malformed answer from the daemon")?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("malformed status line")?;
    if (200..300).contains(&status) {
        return Ok(body.to_string());
    }
    let msg = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string());
    bail!("{msg}")
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect::<Vec<_>>().join("  ")
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.clone()));
    }
    out.lines().map(str::trim_end).collect::<Vec<_>>().join("\n")
}

fn when(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// A connection as the API shows it (see [`crate::control::shown`]).
#[derive(Debug, serde::Deserialize)]
struct Connection {
    endpoint: String,
    #[serde(default)]
    service: String,
    #[serde(default)]
    network: String,
    #[serde(default)]
    tenant: String,
    state: String,
    #[serde(default)]
    link_id: String,
    #[serde(default)]
    updated: u64,
    response_message: Option<String>,
    #[serde(default)]
    dns_names: Vec<String>,
}

pub fn connections_table(json: &str) -> Result<String> {
    let list: Vec<Connection> = serde_json::from_str(json).context("unexpected answer")?;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            vec![
                c.endpoint.clone(),
                c.service.clone(),
                c.network.clone(),
                c.tenant.clone(),
                c.state.clone(),
                c.link_id.clone(),
                if c.dns_names.is_empty() { "-".into() } else { c.dns_names.join(",") },
                when(c.updated),
                printable(c.response_message.as_deref().unwrap_or_default()),
            ]
        })
        .collect();
    Ok(table(
        &["ENDPOINT", "SERVICE", "NETWORK", "TENANT", "STATE", "LINK ID", "DNS NAMES", "UPDATED", "MESSAGE"],
        &rows,
    ))
}

pub fn connection_line(json: &str) -> Result<String> {
    let c: Connection = serde_json::from_str(json).context("unexpected answer")?;
    Ok(format!("{}: {} ({})", c.endpoint, c.state, printable(c.response_message.as_deref().unwrap_or_default())))
}

pub fn flows_table(json: &str) -> Result<String> {
    let list: Vec<FlowView> = serde_json::from_str(json).context("unexpected answer")?;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|f| {
            vec![
                f.protocol.clone(),
                f.endpoint.clone(),
                f.consumer.clone(),
                f.endpoint_addr.clone(),
                f.nat.clone(),
                f.backend.clone(),
                f.state.clone(),
                format!("{}s", f.age_secs),
                f.bytes_in.to_string(),
                f.bytes_out.to_string(),
            ]
        })
        .collect();
    Ok(table(
        &["PROTO", "ENDPOINT", "CONSUMER", "ENDPOINT-ADDR", "NAT", "BACKEND", "STATE", "AGE", "BYTES-IN", "BYTES-OUT"],
        &rows,
    ))
}

/// Percent-encodes a query or path value (endpoint names are plain, but a
/// user may type anything).
/// `GET /v1/status` as text: the counts, then one line per backend.
pub fn status_table(json: &str) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(json).context("bad status")?;
    let mut out = format!(
        "privlink {}  up {}s  config generation {}  flows {} of {}\n\n",
        v["version"].as_str().unwrap_or("?"),
        v["uptime_secs"],
        v["config_generation"],
        v["flows_active"],
        v["max_flows"]
    );
    if let Some(st) = v["store"].as_object() {
        let since = st.get("since").and_then(serde_json::Value::as_u64).unwrap_or(0);
        let since = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(since));
        let up = st.get("up").and_then(serde_json::Value::as_bool).unwrap_or(false);
        out.push_str(&format!(
            "store: {} since {since} (host {})\n",
            if up { "up" } else { "down" },
            printable(st.get("host").and_then(serde_json::Value::as_str).unwrap_or("?"))
        ));
        let held: Vec<String> = st
            .get("held")
            .and_then(serde_json::Value::as_object)
            .into_iter()
            .flatten()
            .map(|(svc, ips)| {
                let ips: Vec<&str> =
                    ips.as_array().into_iter().flatten().filter_map(serde_json::Value::as_str).collect();
                format!("{} {}", printable(svc), if ips.is_empty() { "none".to_string() } else { ips.join(", ") })
            })
            .collect();
        out.push_str(&format!(
            "NAT addresses held: {}\n\n",
            if held.is_empty() { "none".into() } else { held.join("; ") }
        ));
    }
    out.push_str(&format!("{:<20} {:<16} {:<6} {}\n", "SERVICE", "BACKEND", "STATE", "FLOWS-CREATED"));
    for b in v["backends"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<20} {:<16} {:<6} {}\n",
            printable(b["service"].as_str().unwrap_or("")),
            b["backend"].as_str().unwrap_or(""),
            if b["up"].as_bool().unwrap_or(false) { "up" } else { "down" },
            b["flows_created"]
        ));
    }
    Ok(out.trim_end().to_string())
}

pub fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Operator text as a table cell: control characters (newlines, escape
/// sequences) shown escaped, so a message cannot forge lines or repaint
/// the terminal.
fn printable(s: &str) -> String {
    s.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y");
    }

    #[test]
    fn encodes() {
        assert_eq!(encode("pe-a_1.x"), "pe-a_1.x");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn not_running_is_one_clear_line() {
        let e = call(Path::new("/nonexistent/privlink.sock"), "GET", "/v1/status", None).expect_err("no daemon");
        assert_eq!(e.to_string(), "privlink is not running (no control socket at /nonexistent/privlink.sock)");
    }

    #[test]
    fn operator_text_cannot_forge_lines_or_escape_sequences() {
        assert_eq!(printable("ok\nprivlink: forged\u{1b}[2J"), "ok\\nprivlink: forged\\u{1b}[2J");
        assert_eq!(printable("plain text, ünïcode"), "plain text, ünïcode");
    }
}
