//! The config file as written: serde types that mirror the TOML exactly, and the parse that
//! turns syntax and type errors into [`ConfigError`]s naming the line or the key.
//!
//! Durations, addresses and URLs stay strings here; `validate.rs` gives them types, applies
//! defaults and checks the rules. Unknown keys are refused (`deny_unknown_fields`), so a typo is
//! an error rather than a silently ignored setting.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, ConfigErrors};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub(super) datacenter: String,
    pub(super) global_home: String,
    #[serde(default)]
    pub(super) listen: RawListen,
    pub(super) tls: Option<RawTls>,
    pub(super) loom: RawLoom,
    pub(super) ids: RawIds,
    pub(super) datacenters: Vec<RawDatacenter>,
    #[serde(default)]
    pub(super) shards: Vec<RawShard>,
    #[serde(default)]
    pub(super) coordination: RawCoordination,
    #[serde(default)]
    pub(super) health: RawHealth,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) response: RawResponse,
    #[serde(default)]
    pub(super) consistency: RawConsistency,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) shutdown: RawShutdown,
    #[serde(default)]
    pub(super) runtime: RawRuntime,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListen {
    pub(super) http: Option<String>,
    pub(super) https: Option<String>,
    pub(super) admin: Option<String>,
    pub(super) backlog: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    pub(super) client_ca: Option<PathBuf>,
    pub(super) client_auth: Option<String>,
    pub(super) handshake_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLoom {
    pub(super) upstream: String,
    pub(super) health_path: Option<String>,
    pub(super) ca: Option<PathBuf>,
    pub(super) connect_timeout: Option<String>,
    pub(super) request_timeout: Option<String>,
    pub(super) write_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIds {
    pub(super) increment: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatacenter {
    pub(super) name: String,
    pub(super) id_start: i64,
    pub(super) router: String,
    #[serde(default)]
    pub(super) replicas: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShard {
    pub(super) residue: RawResidue,
    pub(super) owner: String,
    #[serde(default)]
    pub(super) replicas: Vec<String>,
    pub(super) epoch: Option<i64>,
    pub(super) state: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawResidue {
    Number(i64),
    Name(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCoordination {
    pub(super) backend: Option<String>,
    pub(super) lease: Option<String>,
    pub(super) keepalive: Option<String>,
    pub(super) failover_cooldown: Option<String>,
    pub(super) become_owner_hook: Option<String>,
    pub(super) hook_timeout: Option<String>,
    pub(super) endpoints: Option<Vec<String>>,
    pub(super) prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) interval: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) unhealthy_after: Option<i64>,
    pub(super) healthy_after: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_header_bytes: Option<i64>,
    pub(super) max_read_body_bytes: Option<i64>,
    pub(super) max_retry_body_bytes: Option<i64>,
    pub(super) max_concurrent_requests: Option<i64>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) body_read_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) max_upstream_connections: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResponse {
    pub(super) route_headers: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsistency {
    pub(super) read_your_writes: Option<String>,
    pub(super) max_tracked_clusters: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) access: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShutdown {
    pub(super) drain_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    pub(super) workers: Option<i64>,
}

/// TOML text → [`RawConfig`]. Syntax errors carry line and column; type errors and unknown keys
/// carry the key path.
pub(super) fn parse_raw(text: &str) -> Result<RawConfig, ConfigErrors> {
    let value: toml::Table = toml::from_str(text).map_err(|e| {
        let problem = e.message().trim().to_owned();
        let location = e
            .span()
            .map(|span| line_col(text, span.start))
            .map(|(line, col)| format!("TOML syntax error at line {line}, column {col}"))
            .unwrap_or_else(|| "TOML syntax error".to_owned());
        ConfigError::new(location, problem)
    })?;
    serde_path_to_error::deserialize::<_, RawConfig>(toml::Value::Table(value)).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().message().to_owned();
        let path = if path == "." { String::new() } else { path };
        // The path of an unknown key already ends with the key itself.
        if message.starts_with("unknown field `") {
            return ConfigError::new(path, "unknown key").into();
        }
        if let Some(rest) = message.strip_prefix("missing field `") {
            let field = rest.split('`').next().unwrap_or("");
            return ConfigError::new(join_key(&path, field), "required key is missing").into();
        }
        ConfigError::new(path, message).into()
    })
}

fn join_key(parent: &str, field: &str) -> String {
    if parent.is_empty() {
        field.to_owned()
    } else {
        format!("{parent}.{field}")
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}
