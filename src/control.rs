//! The single writer of the routing snapshot.
//!
//! A [`Snapshot`] is everything the request path needs that must change together: the validated
//! config, the ownership table, and values derived from them once (header values). It lives
//! behind one `ArcSwap`. The request path loads it once per request; only the writer task here
//! stores into it, so two updates can never interleave. Reload and failover (later) send events
//! to that task; on any error the old snapshot keeps serving.
//!
//! This file must not route requests or probe anything; it only builds and publishes snapshots.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::headers::via_token;
use crate::metrics;
use crate::ownership::Table;

/// One consistent view of configuration and ownership.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub table: Table,
    /// `1.1 loom-router-<dc>`, appended to every request and response this router passes on.
    pub via: HeaderValue,
    /// `loom-router-<dc>`, looked for in incoming `Via` headers to detect loops.
    pub via_token: String,
    /// DC names as header values, by `DcId`, for `X-Loom-Served-By` and `X-Loom-Router-Origin`.
    pub dc_names: Vec<HeaderValue>,
}

impl Snapshot {
    pub fn new(config: Arc<Config>, table: Table) -> Self {
        let local = &config.local_dc().name;
        let via_token = via_token(local);
        // DC names are validated to be [A-Za-z0-9_-], so they are always valid header values.
        let header = |s: &str| {
            HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
        };
        let via = header(&format!("1.1 {via_token}"));
        let dc_names = config.datacenters.iter().map(|d| header(&d.name)).collect();
        Self {
            config,
            table,
            via,
            via_token,
            dc_names,
        }
    }
}

/// Messages to the writer task.
#[derive(Debug)]
enum Event {
    /// Re-read ownership from the coordination store, then answer.
    Refresh(oneshot::Sender<()>),
}

/// A handle on the current snapshot and its writer task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Control {
    /// Read by every request; stored into only by the writer task.
    current: Arc<ArcSwap<Snapshot>>,
    /// Events for the writer task; it ends when every handle is dropped.
    events: mpsc::Sender<Event>,
}

impl Control {
    /// Publish the first snapshot for `config` and start the writer task.
    pub fn start(config: Config) -> Self {
        let config = Arc::new(config);
        let table = Table::from_config(&config);
        metrics::set_table_epoch(table.table_epoch);
        let current = Arc::new(ArcSwap::from_pointee(Snapshot::new(config, table)));
        let (events, rx) = mpsc::channel(64);
        tokio::spawn(writer(current.clone(), rx));
        Self { current, events }
    }

    /// The current snapshot, kept alive for as long as the caller holds it (across awaits).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Ask the writer to re-read ownership from the coordination store, and wait for it. Used
    /// when a peer shows a newer epoch than ours (spec section 4).
    pub async fn refresh(&self) {
        let (tx, rx) = oneshot::channel();
        if self.events.send(Event::Refresh(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The writer task: the only code that stores a snapshot after start-up.
async fn writer(current: Arc<ArcSwap<Snapshot>>, mut events: mpsc::Receiver<Event>) {
    while let Some(event) = events.recv().await {
        match event {
            Event::Refresh(done) => {
                // With the static backend the config is the store: nothing newer exists until
                // an operator reloads it, so the current snapshot stands.
                let _ = &current;
                let _ = done.send(());
            }
        }
    }
}
