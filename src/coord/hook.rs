//! The become-owner hook: tell the local Loom side that this DC gained a shard.
//!
//! When the table shows this DC owning a shard it did not own before, the router POSTs
//! `{"shard", "epoch", "previous_owner"}` to `[coordination] become_owner_hook` before admitting
//! writes for it (docs/failover.md). That is where replication from the old owner is cut off and
//! in-progress jobs are restarted. A 2xx within `hook_timeout` is success; failures are retried
//! with backoff, and writes for the shard get 503 `fenced` until then.
//!
//! This file only runs the calls; `coord/control.rs` decides when a shard is gained and keeps it
//! fenced until the result comes back.

use std::time::Duration;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Uri};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::http::body::Body;
use crate::http::forward::Forwarder;
use crate::shard::ShardKey;

/// First retry delay; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One hook call to make; its JSON is the hook's body (keys in alphabetical order, as the
/// hook's receivers have always seen them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HookJob {
    pub epoch: u64,
    pub previous_owner: Option<String>,
    pub shard: ShardKey,
}

/// The hook's JSON body.
pub fn body(job: &HookJob) -> String {
    serde_json::to_string(job).unwrap_or_default()
}

/// Where and how the hook is called: `coordination.become_owner_hook` and `hook_timeout`.
#[derive(Debug, Clone)]
pub struct Hook {
    pub url: Uri,
    pub timeout: Duration,
    pub forwarder: Forwarder,
}

/// The channels a hook runner works between: jobs in (each with a token that cancels it when the
/// shard moves away again), successes out.
#[derive(Debug)]
pub struct HookQueue {
    pub jobs: mpsc::Receiver<(HookJob, CancellationToken)>,
    pub done: mpsc::Sender<(ShardKey, u64)>,
}

impl Hook {
    /// Run every job until it succeeds (or `cancel`), reporting each success on `queue.done`.
    pub async fn run(self, queue: HookQueue, cancel: CancellationToken) {
        let HookQueue { mut jobs, done } = queue;
        while let Some(Some((job, moved_away))) = cancel.run_until_cancelled(jobs.recv()).await {
            let (hook, done, cancel) = (self.clone(), done.clone(), cancel.clone());
            tokio::spawn(async move { hook.until_done(job, moved_away, done, cancel).await });
        }
    }

    /// Call the hook for `job`, backing off between failures, until it succeeds, the shard
    /// moves away again (its new owner runs its own hook), or `cancel`.
    async fn until_done(
        self,
        job: HookJob,
        moved_away: CancellationToken,
        done: mpsc::Sender<(ShardKey, u64)>,
        cancel: CancellationToken,
    ) {
        let mut backoff = FIRST_BACKOFF;
        while !moved_away.is_cancelled() {
            match call(&self.url, self.timeout, &self.forwarder, &job).await {
                Ok(()) => {
                    tracing::info!(shard = %job.shard, epoch = job.epoch, "become-owner hook succeeded");
                    let _ = done.send((job.shard, job.epoch)).await;
                    return;
                }
                Err(problem) => {
                    tracing::warn!(shard = %job.shard, epoch = job.epoch, %problem, retry_in = ?backoff, "become-owner hook failed; writes for the shard stay fenced");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = cancel.cancelled() => return,
                () = moved_away.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

async fn call(
    url: &Uri,
    timeout: Duration,
    forwarder: &Forwarder,
    job: &HookJob,
) -> Result<(), String> {
    let mut request = Request::new(Body::full(body(job)));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = url.clone();
    request
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let response = forwarder
        .send(request, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    // Drain the body so the pooled connection can be reused.
    let _ = http_body_util::BodyExt::collect(response.into_body()).await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_names_shard_epoch_and_previous_owner() {
        let job = HookJob {
            shard: ShardKey::Residue(3),
            epoch: 17,
            previous_owner: Some("eu-central".to_owned()),
        };
        assert_eq!(
            body(&job),
            r#"{"epoch":17,"previous_owner":"eu-central","shard":3}"#
        );
        let global = HookJob {
            shard: ShardKey::Global,
            epoch: 2,
            previous_owner: None,
        };
        assert_eq!(
            body(&global),
            r#"{"epoch":2,"previous_owner":null,"shard":"global"}"#
        );
    }
}
