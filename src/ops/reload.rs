//! What makes a router re-read its config: SIGHUP, and a change to the file (docs/operations.md).
//! `POST /admin/reload` is the third way (`ops/admin.rs`).
//!
//! All three ask the snapshot writer (`coord/control.rs`) to reload, which validates the new file
//! and swaps it in atomically or refuses it; this file only notices that a reload is wanted. The
//! file watcher watches the file's directory, because editors and config-management tools often
//! save by writing a new file and renaming it over the old one, and debounces bursts of events into
//! one reload.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::coord::control::Control;

/// Events closer together than this make one reload.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Reload on SIGHUP and on changes to `path`, until `cancel`.
pub fn spawn_triggers(control: Control, path: PathBuf, cancel: CancellationToken) {
    #[cfg(unix)]
    {
        let (control, cancel) = (control.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut hup = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /admin/reload");
                    return;
                }
            };
            loop {
                tokio::select! {
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP: reloading the config");
                        let _ = control.reload().await;
                    }
                    () = cancel.cancelled() => return,
                }
            }
        });
    }
    tokio::spawn(watch_file(control, path, cancel));
}

async fn watch_file(control: Control, path: PathBuf, cancel: CancellationToken) {
    let (tx, mut rx) = mpsc::channel::<()>(16);
    let name = path.file_name().map(ToOwned::to_owned);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let ours = event
            .paths
            .iter()
            .any(|p| p.file_name().map(ToOwned::to_owned) == name);
        if ours && !event.kind.is_access() {
            let _ = tx.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /admin/reload");
            return;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the config directory");
        return;
    }
    loop {
        if cancel
            .run_until_cancelled(rx.recv())
            .await
            .flatten()
            .is_none()
        {
            return;
        }
        // Let the burst of events from one save settle, then reload once.
        tokio::time::sleep(DEBOUNCE).await;
        while rx.try_recv().is_ok() {}
        tracing::info!(file = %path.display(), "config file changed: reloading");
        let _ = control.reload().await;
    }
}
