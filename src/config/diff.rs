//! What a reload changes: which keys it refuses (they need a restart), which it accepts but
//! applies only at the next start, and whether the health probes must start over
//! (docs/configuration.md, reloading).

use super::{AccessLog, Config};

impl Config {
    /// Whether the health probes `next` asks for differ from this config's: what is probed
    /// (each DC's router, the local Loom and its health path) or how (`[health]`). A reload that
    /// only moves shards keeps the running probes and the health they have learned.
    pub fn probes_differ(&self, next: &Self) -> bool {
        self.health != next.health
            || self.local != next.local
            || self.datacenters != next.datacenters
            || self.loom.upstream != next.loom.upstream
            || self.loom.health_path != next.loom.health_path
    }

    /// Keys whose change a reload refuses (docs/configuration.md): they need a restart.
    pub fn restart_only_changes(&self, next: &Self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.listen.http != next.listen.http {
            out.push("listen.http");
        }
        if self.listen.https != next.listen.https {
            out.push("listen.https");
        }
        if self.listen.admin != next.listen.admin {
            out.push("listen.admin");
        }
        if self.local_dc().name != next.local_dc().name {
            out.push("datacenter");
        }
        if self.increment != next.increment {
            out.push("ids.increment");
        }
        if self.coordination.backend != next.coordination.backend {
            out.push("coordination.backend");
        }
        if self.coordination.endpoints != next.coordination.endpoints {
            out.push("coordination.endpoints");
        }
        if self.coordination.prefix != next.coordination.prefix {
            out.push("coordination.prefix");
        }
        out
    }

    /// Keys a reload accepts but that take effect only at the next restart: certificates and the
    /// pooled client's connection settings are loaded once, at start-up.
    pub fn applied_at_restart(&self, next: &Self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.tls != next.tls {
            out.push("tls");
        }
        if self.loom.ca != next.loom.ca {
            out.push("loom.ca");
        }
        if self.loom.connect_timeout != next.loom.connect_timeout {
            out.push("loom.connect_timeout");
        }
        if self.limits.idle_timeout != next.limits.idle_timeout {
            out.push("limits.idle_timeout");
        }
        if self.coordination.lease != next.coordination.lease
            || self.coordination.keepalive != next.coordination.keepalive
        {
            out.push("coordination.lease/keepalive");
        }
        if self.coordination.become_owner_hook != next.coordination.become_owner_hook
            || self.coordination.hook_timeout != next.coordination.hook_timeout
        {
            out.push("coordination.become_owner_hook/hook_timeout");
        }
        if self.coordination.failover_cooldown != next.coordination.failover_cooldown {
            out.push("coordination.failover_cooldown");
        }
        if self.limits.max_upstream_connections != next.limits.max_upstream_connections {
            out.push("limits.max_upstream_connections");
        }
        if self.workers != next.workers {
            out.push("runtime.workers");
        }
        if self.listen.backlog != next.listen.backlog {
            out.push("listen.backlog");
        }
        if self.drain_timeout != next.drain_timeout {
            out.push("shutdown.drain_timeout");
        }
        // Turning the access log off or on applies at once; its format is the log's, set at
        // start-up.
        let format = |a: AccessLog| matches!(a, AccessLog::Json);
        if self.access_log != AccessLog::Off
            && next.access_log != AccessLog::Off
            && format(self.access_log) != format(next.access_log)
        {
            out.push("log.access (text/json)");
        }
        out
    }
}
