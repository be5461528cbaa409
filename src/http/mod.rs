//! HTTP plumbing shared by every side of the router: the body type, header rewrites, the pooled
//! upstream client, TLS configs, and router errors as responses (docs/routing.md).
//!
//! - `body`: the one body type requests and responses travel in; the client body's stall timer.
//! - `headers`: header names the router owns, the `Host` check, hop-by-hop stripping, `Via`.
//! - `forward`: the pooled keep-alive client to Loom and peer routers, its timeouts, and body
//!   buffering for retries.
//! - `affine`: a client connection's own connection to the local Loom, and the join that
//!   drives both in one task.
//! - `bound`: `max_upstream_connections`, the permits every upstream connection holds.
//! - `timer`: deadlines that reuse one timer entry per connection, for hyper's header wait and
//!   an owned upstream's response.
//! - `tls`: PEM files → rustls configs for the https listener and https upstreams.
//! - `error`: every error the router answers itself, and the one place it becomes a status, a
//!   code and a body; the 421 body is written and read there too.
//!
//! Nothing here knows the ownership table or decides where a request goes: `proxy` does. It
//! must not log or count requests either; `proxy` does that once, at the edge.

pub mod affine;
pub mod body;
pub mod bound;
pub mod error;
pub mod forward;
pub mod headers;
pub mod timer;
pub mod tls;
