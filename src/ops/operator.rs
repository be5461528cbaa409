//! Operator commands: `loom-router table|move|freeze|unfreeze --admin URL` (docs/configuration.md).
//!
//! Each command is one call to a router's admin listener (`ops/admin.rs` does the work); this file
//! builds the request, sends it, and turns the answer into what an operator reads. It holds no
//! state and makes no decisions.

use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// How long an admin call may take. A planned move waits out `write_timeout` plus a margin.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The body of `POST /admin/shards/{shard}/move`.
#[derive(serde::Serialize)]
struct MoveBody<'a> {
    to: &'a str,
}

/// What to ask the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Table,
    Move { shard: String, to: String },
    Freeze { shard: String },
    Unfreeze { shard: String },
}

/// Why a call failed before the router answered.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("--admin {0:?} is not a URL such as http://127.0.0.1:9901")]
    BadUrl(String),
    #[error("cannot reach the admin listener at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("no answer from {0} within {CALL_TIMEOUT:?}")]
    Timeout(String),
    #[error("cannot read the answer: {0}")]
    Body(#[from] hyper::Error),
}

/// The router's answer: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// Send one call to the admin listener at `admin` (for example `http://127.0.0.1:9901`).
pub async fn call(admin: &str, token: Option<&str>, call: &Call) -> Result<Answer, CallError> {
    let base = admin.trim_end_matches('/');
    let (method, path, body) = match call {
        Call::Table => (Method::GET, "/admin/table".to_owned(), String::new()),
        Call::Move { shard, to } => (
            Method::POST,
            format!("/admin/shards/{shard}/move"),
            serde_json::to_string(&MoveBody { to }).unwrap_or_default(),
        ),
        Call::Freeze { shard } => (
            Method::POST,
            format!("/admin/shards/{shard}/freeze"),
            String::new(),
        ),
        Call::Unfreeze { shard } => (
            Method::POST,
            format!("/admin/shards/{shard}/unfreeze"),
            String::new(),
        ),
    };
    let url = format!("{base}{path}");
    let uri: http::Uri = url
        .parse()
        .map_err(|_| CallError::BadUrl(admin.to_owned()))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(CallError::BadUrl(admin.to_owned()));
    }
    let mut request = Request::new(Full::new(Bytes::from(body)));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    request.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Some(token) = token {
        if let Ok(value) = http::HeaderValue::from_str(&format!("Bearer {token}")) {
            request.headers_mut().insert(AUTHORIZATION, value);
        }
    }
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = tokio::time::timeout(CALL_TIMEOUT, client.request(request))
        .await
        .map_err(|_| CallError::Timeout(url.clone()))?
        .map_err(|source| CallError::Unreachable { url, source })?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// `/admin/table` as an operator reads it: one line per shard, then DCs and alerts.
pub fn render_table(json: &Value) -> String {
    let mut out = format!(
        "datacenter {}  table_epoch {}  increment {}\n",
        json["datacenter"].as_str().unwrap_or("?"),
        json["table_epoch"],
        json["increment"],
    );
    for s in json["shards"].as_array().into_iter().flatten() {
        let replicas: Vec<&str> = s["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let state = format!(
            "{}{}",
            s["state"].as_str().unwrap_or("?"),
            if s["frozen"] == true { " frozen" } else { "" }
        );
        out.push_str(&format!(
            "shard {:<6} owner {:<12} epoch {:<6} {state:<13} replicas [{}]  changed {} by {} ({})\n",
            match &s["shard"] {
                Value::String(g) => g.clone(),
                other => other.to_string(),
            },
            s["owner"].as_str().unwrap_or("?"),
            s["epoch"].to_string(),
            replicas.join(", "),
            s["changed_at"].as_str().unwrap_or("?"),
            s["changed_by"].as_str().unwrap_or("?"),
            s["reason"].as_str().unwrap_or(""),
        ));
    }
    for dc in json["datacenters"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "datacenter {:<12} {}\n",
            dc["name"].as_str().unwrap_or("?"),
            if dc["healthy"] == true {
                "healthy"
            } else {
                "DOWN"
            }
        ));
    }
    for alert in json["alerts"].as_array().into_iter().flatten() {
        out.push_str(&format!("ALERT: {}\n", alert.as_str().unwrap_or("?")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_renders_one_line_per_shard_and_every_alert() {
        let json = serde_json::json!({
            "datacenter": "us-east", "table_epoch": 12, "increment": 10,
            "shards": [
                {"shard": 1, "owner": "us-east", "epoch": 5, "state": "active", "frozen": false,
                 "replicas": ["us-west"], "changed_at": "2026-11-26T07:00:00Z",
                 "changed_by": "config", "reason": "home"},
                {"shard": "global", "owner": "us-west", "epoch": 12, "state": "fenced",
                 "frozen": true, "replicas": [], "changed_at": "2026-11-26T07:00:00Z",
                 "changed_by": "operator", "reason": "switchover"}
            ],
            "datacenters": [{"name": "us-east", "healthy": true}, {"name": "us-west", "healthy": false}],
            "alerts": ["shard 2: owner us-west is down"]
        });
        let text = render_table(&json);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(
            lines[1].starts_with("shard 1      owner us-east      epoch 5 "),
            "{text}"
        );
        assert!(lines[2].contains("fenced frozen"), "{text}");
        assert!(lines[4].ends_with("DOWN"), "{text}");
        assert_eq!(lines[5], "ALERT: shard 2: owner us-west is down");
    }
}
