//! What operators touch: the admin listener, the reload triggers and the operator CLI
//! (docs/operations.md).
//!
//! - `admin`: `/healthz`, `/readyz`, `/metrics`, `/admin/table`, `/admin/events`,
//!   `/admin/status` and the status page at `/`, and the calls that move, freeze and unfreeze
//!   shards or reload the config.
//! - `traffic`: the status page's requests per second and latencies over the last minute.
//! - `reload`: what makes a router re-read its config (SIGHUP, a change to the file).
//! - `operator`: `loom-router table|move|freeze|unfreeze`, the client side of the admin API.
//!
//! Nothing here changes the routing table itself: moves go through the coordination store
//! (`coord::failover`) and reloads through the snapshot writer (`coord::control`).

pub mod admin;
pub mod operator;
pub mod reload;
pub mod traffic;
