//! Reading your own writes (docs/routing.md): which reads of one cluster the owner must serve.
//!
//! Three things send a read of cluster C to its owner (`read-owner`): `X-Loom-Consistency:
//! owner`; a forwarded write to C through this router within `[consistency] read_your_writes`
//! ([`Tracked`], a bounded map); or the `loom-ryw` cookie that such a write set, which carries the
//! same promise to the other routers of the DC ([`Cookie`]).
//!
//! Decisions only: the time comes in as Unix milliseconds, and nothing here sends anything. A
//! forged cookie can only make a read slower, never wrong, so it is not signed; it is parsed
//! strictly and bounded in size, and anything malformed is ignored whole.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use super::classify::parse_cluster_id;

/// The header that asks for a read from the owner.
pub const CONSISTENCY_HEADER: &str = "x-loom-consistency";
/// Its one value.
pub const CONSISTENCY_OWNER: &[u8] = b"owner";
/// The cookie's name.
pub const COOKIE_NAME: &str = "loom-ryw";
/// The most clusters one cookie names; a forwarded write keeps the newest.
pub const MAX_COOKIE_ENTRIES: usize = 16;
/// The longest cookie value honoured: 16 entries of a 19-digit ID, a dot and a 20-digit expiry,
/// and the 15 dashes between them. Anything longer is ignored unread.
pub const MAX_COOKIE_BYTES: usize = MAX_COOKIE_ENTRIES * (19 + 1 + 20) + MAX_COOKIE_ENTRIES - 1;

/// How far past this router's own window a cookie's expiry may lie and still count: the routers
/// of a DC share the window, but not quite their clocks. Anything later is forged or from a
/// config with a longer window, and is ignored rather than carried forward forever.
pub const CLOCK_SKEW_MS: u64 = 60_000;

/// What the request asked for in `X-Loom-Consistency`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// No header: the router decides.
    Nothing,
    /// `owner`: read from the owner.
    Owner,
}

/// `X-Loom-Consistency`'s value: absent, `owner`, or anything else, which is the client's
/// mistake (400 `bad_request`). More than one field line is a mistake too.
pub fn asked<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Result<Asked, BadConsistency> {
    match (values.next(), values.next()) {
        (None, _) => Ok(Asked::Nothing),
        (Some(v), None) if v == CONSISTENCY_OWNER => Ok(Asked::Owner),
        _ => Err(BadConsistency),
    }
}

/// `X-Loom-Consistency` with a value other than `owner`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("X-Loom-Consistency takes one value, \"owner\"")]
pub struct BadConsistency;

/// The clusters a `loom-ryw` cookie names, each with its expiry in Unix milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cookie {
    entries: Vec<(u64, u64)>,
}

impl Cookie {
    /// The `loom-ryw` cookie among a request's `Cookie` field lines. `None` when there is none,
    /// or it is malformed, too long, names more than [`MAX_COOKIE_ENTRIES`] clusters, or appears
    /// twice: all ignored, never an error.
    pub fn from_headers<'a>(lines: impl Iterator<Item = &'a [u8]>) -> Option<Self> {
        let mut found = None;
        for line in lines {
            // RFC 6265 §4.2.1: `name=value` pairs separated by "; ".
            for pair in line.split(|&b| b == b';') {
                let pair = pair.trim_ascii();
                let Some(value) = pair.strip_prefix(COOKIE_NAME.as_bytes()) else {
                    continue;
                };
                let Some(value) = value.strip_prefix(b"=") else {
                    continue;
                };
                if found.is_some() {
                    return None;
                }
                found = Some(value);
            }
        }
        Self::parse(found?)
    }

    /// `<id>.<expiry>[-<id>.<expiry>...]`, strictly.
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.is_empty() || value.len() > MAX_COOKIE_BYTES {
            return None;
        }
        let text = std::str::from_utf8(value).ok()?;
        let mut entries = Vec::new();
        for entry in text.split('-') {
            if entries.len() == MAX_COOKIE_ENTRIES {
                return None;
            }
            let (id, expiry) = entry.split_once('.')?;
            let id = parse_cluster_id(id).ok()?;
            let expiry = decimal(expiry)?;
            if entries.iter().any(|&(seen, _)| seen == id) {
                // A router writes each cluster once; a repeat is not its cookie.
                return None;
            }
            entries.push((id, expiry));
        }
        Some(Self { entries })
    }

    /// Whether the cookie names `cluster` with an expiry after `now_ms` and no later than
    /// `window_ms` (plus [`CLOCK_SKEW_MS`]) from now.
    pub fn names(&self, cluster: u64, now_ms: u64, window_ms: u64) -> bool {
        self.entries
            .iter()
            .any(|&(id, expiry)| id == cluster && live(expiry, now_ms, window_ms))
    }

    /// The `Set-Cookie` value after a write to `cluster`: its entry (until `until_ms`) and the
    /// newest unexpired others, at most [`MAX_COOKIE_ENTRIES`], newest first, living `window_s`
    /// seconds in the browser.
    pub fn after_write(&self, cluster: u64, until_ms: u64, now_ms: u64, window_s: u64) -> String {
        let window_ms = window_s.saturating_mul(1000);
        // IDs are unique (`parse`), and the written cluster's old entry is replaced.
        let mut entries: Vec<(u64, u64)> = self
            .entries
            .iter()
            .copied()
            .filter(|&(id, expiry)| id != cluster && live(expiry, now_ms, window_ms))
            .collect();
        entries.push((cluster, until_ms));
        entries.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        entries.truncate(MAX_COOKIE_ENTRIES);
        let value: Vec<String> = entries
            .iter()
            .map(|(id, expiry)| format!("{id}.{expiry}"))
            .collect();
        format!(
            "{COOKIE_NAME}={}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}",
            value.join("-"),
            window_s.max(1)
        )
    }
}

/// An entry that has not expired at `now_ms`, and does not claim to last longer than a window.
fn live(expiry: u64, now_ms: u64, window_ms: u64) -> bool {
    expiry > now_ms
        && expiry
            <= now_ms
                .saturating_add(window_ms)
                .saturating_add(CLOCK_SKEW_MS)
}

/// 1 to 20 ASCII digits that fit a u64.
fn decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The clusters this router forwarded a write for, each until its expiry in Unix milliseconds.
/// Bounded: a write that finds it full is not tracked (its cookie still is), and expired entries
/// go when a read finds them and at each [`Tracked::sweep`].
#[derive(Debug, Default)]
pub struct Tracked {
    map: DashMap<u64, u64>,
    /// When a write that found the map full last swept it (Unix ms): at most once per
    /// [`FULL_SWEEP_EVERY_MS`], so that a full map of live entries costs writes no scan each.
    full_sweep_at: AtomicU64,
}

/// How often a write that finds the map full may sweep it.
const FULL_SWEEP_EVERY_MS: u64 = 100;

impl Tracked {
    /// Track `cluster` until `until_ms`. False when the map holds `bound` live clusters
    /// already. The bound is soft by the writes racing this one: the check and the insert are
    /// two steps, so concurrent writes may pass it by as many as run at once.
    pub fn remember(&self, cluster: u64, until_ms: u64, now_ms: u64, bound: usize) -> bool {
        if let Some(mut expiry) = self.map.get_mut(&cluster) {
            *expiry = (*expiry).max(until_ms);
            return true;
        }
        if self.map.len() >= bound {
            let last = self.full_sweep_at.load(Ordering::Relaxed);
            let due = now_ms >= last.saturating_add(FULL_SWEEP_EVERY_MS);
            if !due
                || self
                    .full_sweep_at
                    .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
                || self.sweep(now_ms) >= bound
            {
                return false;
            }
        }
        self.map.insert(cluster, until_ms);
        true
    }

    /// Whether a read of `cluster` must go to its owner: one map lookup, and a removal when the
    /// entry it finds has expired.
    pub fn holds(&self, cluster: u64, now_ms: impl FnOnce() -> u64) -> bool {
        let Some(expiry) = self.map.get(&cluster).map(|e| *e) else {
            return false;
        };
        if expiry > now_ms() {
            return true;
        }
        self.map.remove_if(&cluster, |_, e| *e == expiry);
        false
    }

    /// Drop every entry expired at `now_ms`; returns how many remain.
    pub fn sweep(&self, now_ms: u64) -> usize {
        self.map.retain(|_, expiry| *expiry > now_ms);
        self.map.len()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookie(lines: &[&str]) -> Option<Cookie> {
        Cookie::from_headers(lines.iter().map(|l| l.as_bytes()))
    }

    #[test]
    fn the_consistency_header_is_absent_or_owner() {
        assert_eq!(asked(std::iter::empty()), Ok(Asked::Nothing));
        assert_eq!(asked([&b"owner"[..]].into_iter()), Ok(Asked::Owner));
        for bad in [&b"Owner"[..], b"local", b"", b"owner "] {
            assert_eq!(asked([bad].into_iter()), Err(BadConsistency), "{bad:?}");
        }
        assert_eq!(
            asked([&b"owner"[..], b"owner"].into_iter()),
            Err(BadConsistency)
        );
    }

    #[test]
    fn a_cookie_names_clusters_until_their_expiry() {
        let c = cookie(&["a=1; loom-ryw=13.5000-00000023.9000; b=2"]).unwrap();
        let window = 5000;
        assert!(c.names(13, 4999, window));
        assert!(!c.names(13, 5000, window), "expired at its expiry");
        assert!(c.names(23, 8000, window), "leading zeros are one ID");
        assert!(!c.names(33, 0, window));
        // An expiry further ahead than the window and the clock skew is not ours.
        let far = Cookie::parse(b"23.100000").unwrap();
        assert!(!far.names(23, 100_000 - window - CLOCK_SKEW_MS - 1, window));
        assert!(far.names(23, 100_000 - window - CLOCK_SKEW_MS, window));
        // In a second Cookie line, as HTTP/2 splits them.
        assert!(cookie(&["a=1", "loom-ryw=7.10"])
            .unwrap()
            .names(7, 9, window));
    }

    #[test]
    fn malformed_cookies_are_ignored_whole() {
        for bad in [
            "loom-ryw=",
            "loom-ryw=13",
            "loom-ryw=13.",
            "loom-ryw=.5",
            "loom-ryw=13.5-",
            "loom-ryw=13.5--14.6",
            "loom-ryw=13.5.6",
            "loom-ryw=x.5",
            "loom-ryw=13.-5",
            "loom-ryw=13.5e3",
            "loom-ryw=99999999999999999999.5",
            "loom-ryw=13.999999999999999999999",
            "loom-ryw=13.5; loom-ryw=14.6",
            "loom-ryw=%31%33.5",
            "loom-ryw=13.5-14.6-13.7",
            "loom-ryw=13.5-013.6",
        ] {
            assert_eq!(cookie(&[bad]), None, "{bad}");
        }
        // Another cookie whose name only starts the same is not ours.
        assert_eq!(cookie(&["loom-rywx=13.5"]), None);
        assert_eq!(cookie(&["xloom-ryw=13.5"]), None);
    }

    #[test]
    fn a_cookie_of_more_than_16_entries_or_too_long_is_ignored() {
        let entries = |n: u64| -> String {
            (1..=n)
                .map(|i| format!("{i}.99999999999999"))
                .collect::<Vec<_>>()
                .join("-")
        };
        assert!(cookie(&[&format!("loom-ryw={}", entries(16))]).is_some());
        assert_eq!(cookie(&[&format!("loom-ryw={}", entries(17))]), None);
        assert_eq!(cookie(&[&format!("loom-ryw={}", entries(1000))]), None);
        let sixteen: Vec<String> = (0..16)
            .map(|i| format!("{}.{}", i64::MAX as u64 - i, u64::MAX))
            .collect();
        let sixteen = sixteen.join("-");
        assert_eq!(sixteen.len(), MAX_COOKIE_BYTES);
        assert!(Cookie::parse(sixteen.as_bytes()).is_some());
        assert!(Cookie::parse(format!("{sixteen}0").as_bytes()).is_none());
    }

    #[test]
    fn a_write_sets_a_cookie_of_the_newest_16_unexpired_entries() {
        let old = Cookie::parse(b"5.100-6.2000-7.3000-8.99999999").unwrap();
        assert_eq!(
            old.after_write(6, 9000, 1000, 5),
            "loom-ryw=6.9000-7.3000; Path=/; HttpOnly; SameSite=Lax; Max-Age=5",
            "5 has expired, 8 claims more than a window, 6 is renewed"
        );
        let full = Cookie {
            entries: (1..=16).map(|i| (i, 1000 + i)).collect(),
        };
        let set = full.after_write(99, 5000, 0, 5);
        let value = set.split(';').next().unwrap();
        let entries = value.strip_prefix("loom-ryw=").unwrap();
        assert!(
            value.starts_with("loom-ryw=99.5000-16.1016-15.1015"),
            "{value}"
        );
        assert!(!value.contains("-1.1001"), "the oldest is dropped: {value}");
        assert_eq!(entries.split('-').count(), 16);
        assert_eq!(
            Cookie::default().after_write(1, 2, 0, 0),
            "loom-ryw=1.2; Path=/; HttpOnly; SameSite=Lax; Max-Age=1"
        );
    }

    #[test]
    fn tracked_clusters_expire_and_stay_within_the_bound() {
        let t = Tracked::default();
        assert!(t.remember(1, 100, 0, 2));
        assert!(t.remember(2, 100, 0, 2));
        assert!(!t.remember(3, 100, 0, 2), "full");
        assert!(
            t.remember(1, 200, 0, 2),
            "a tracked cluster is renewed when full"
        );
        assert!(t.holds(1, || 150));
        assert!(!t.holds(2, || 100), "expired at its expiry");
        assert_eq!(
            t.len(),
            1,
            "the expired entry went with the read that found it"
        );
        assert!(!t.holds(3, || unreachable!("no entry, no clock")));
        assert!(t.remember(3, 300, 150, 2));
        assert_eq!(t.sweep(250), 1);
        assert!(t.holds(3, || 250));
        assert_eq!(t.sweep(300), 0);
        assert!(t.is_empty());
    }

    #[test]
    fn a_full_map_of_expired_entries_makes_room_at_most_every_100_ms() {
        let t = Tracked::default();
        assert!(t.remember(1, 50, 0, 2));
        assert!(t.remember(2, 1000, 0, 2));
        // At 160 ms entry 1 has expired, and no write has swept yet: this one does, and fits.
        assert!(t.remember(3, 1000, 160, 2));
        assert_eq!(t.len(), 2);
        assert!(t.remember(4, 200, 170, 3));
        // Full again at 210 ms with 4 expired, but the last sweep was at 160 ms: too soon.
        assert!(!t.remember(5, 1000, 210, 3));
        assert!(t.remember(5, 1000, 260, 3), "100 ms after the last sweep");
        assert!(!t.holds(4, || 260));
    }
}
