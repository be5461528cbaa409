//! The router's recent events: ownership changes, health transitions, reloads, fences and
//! become-owner hook calls, in a bounded ring for operators (`GET /admin/events`, and the status
//! page that reads it; docs/operations.md).
//!
//! A leaf, like `metrics`: anything may record into it, and it depends on nothing. One
//! [`EventLog`] per router, shared by the parts that record (the health board, the snapshot
//! writer), so that routers sharing a process keep their own. It keeps the last
//! [`EventLog::CAPACITY`] events; the oldest go first. Events are what an operator reads during
//! an incident, so their text names things the way the admin API does (DC and shard names).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

/// What kind of thing happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A shard changed owner.
    Ownership,
    /// Health checks found a DC up or down.
    Health,
    /// A config reload, applied or refused.
    Reload,
    /// A shard was fenced or unfenced.
    Fence,
    /// A become-owner hook call finished.
    Hook,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Grows by one per event of this router, so a reader can tell what it has not seen.
    pub seq: u64,
    /// RFC 3339, to the millisecond.
    pub at: String,
    pub kind: Kind,
    pub text: String,
}

/// The ring of recent events.
#[derive(Debug, Default)]
pub struct EventLog {
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    next_seq: u64,
    events: VecDeque<Event>,
}

impl EventLog {
    /// How many events are kept.
    pub const CAPACITY: usize = 100;

    /// Record an event now.
    pub fn record(&self, kind: Kind, text: impl Into<String>) {
        self.record_at(SystemTime::now(), kind, text.into());
    }

    fn record_at(&self, at: SystemTime, kind: Kind, text: String) {
        // A poisoned lock only means a recorder panicked mid-push; the ring is still whole.
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.next_seq += 1;
        let event = Event {
            seq: ring.next_seq,
            at: humantime::format_rfc3339_millis(at).to_string(),
            kind,
            text,
        };
        if ring.events.len() == Self::CAPACITY {
            ring.events.pop_front();
        }
        ring.events.push_back(event);
    }

    /// The events kept, newest first.
    pub fn recent(&self) -> Vec<Event> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.events.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_hundred_numbered_in_order() {
        let log = EventLog::default();
        for i in 0..150 {
            log.record(Kind::Health, format!("event {i}"));
        }
        let recent = log.recent();
        assert_eq!(recent.len(), EventLog::CAPACITY);
        assert_eq!(recent[0].text, "event 149");
        assert_eq!(recent[0].seq, 150);
        assert_eq!(recent[99].text, "event 50");
        assert_eq!(recent[99].seq, 51);
    }

    #[test]
    fn an_event_serialises_with_its_kind_and_time() {
        let log = EventLog::default();
        log.record_at(UNIX_EPOCH, Kind::Ownership, "shard 3 moved".to_owned());
        let json = serde_json::to_value(&log.recent()[0]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "seq": 1,
                "at": "1970-01-01T00:00:00.000Z",
                "kind": "ownership",
                "text": "shard 3 moved"
            })
        );
    }
}
