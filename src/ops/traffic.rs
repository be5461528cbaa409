//! The status page's traffic over the last minute: requests per second by route and status
//! class, and p50 and p99 latency by route, from the router's own counters
//! (`metrics::RequestMetrics::totals`), not from a Prometheus that may not be there.
//!
//! The admin listener samples the totals once a second into a ring of 61; a view is the
//! difference between the newest sample and the oldest within the last minute. Percentiles are
//! read off the latency buckets as Prometheus's `histogram_quantile` reads them: linearly
//! within the bucket the rank falls in.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::metrics::{latency_bounds, RouteTotals};

/// How far back a view looks.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Samples of the request totals, one a second, the last minute of them.
#[derive(Debug, Default)]
pub struct Traffic {
    samples: Mutex<VecDeque<(Instant, Vec<RouteTotals>)>>,
}

/// One route's traffic over the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteTraffic {
    pub route: &'static str,
    /// Requests per second by status class: `2xx`, `3xx`, `4xx`, `5xx` (and `1xx`).
    pub per_second: [f64; 5],
    /// Latency percentiles in milliseconds; `None` without requests.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// The traffic view: the window it covers and each route seen in it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrafficView {
    pub window_seconds: f64,
    pub routes: Vec<RouteTraffic>,
}

impl Traffic {
    /// Keep a sample taken at `at`; drop those older than the window needs.
    pub fn record(&self, at: Instant, totals: Vec<RouteTotals>) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back((at, totals));
        while samples
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > WINDOW + Duration::from_secs(1))
        {
            samples.pop_front();
        }
    }

    /// The traffic between the oldest sample in the window and the newest.
    pub fn view(&self) -> TrafficView {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let (Some((first_at, first)), Some((last_at, last))) = (samples.front(), samples.back())
        else {
            return TrafficView {
                window_seconds: 0.0,
                routes: Vec::new(),
            };
        };
        let seconds = last_at.duration_since(*first_at).as_secs_f64();
        let routes = last
            .iter()
            .map(|now| {
                let before = first.iter().find(|t| t.route == now.route);
                between(before, now, seconds)
            })
            .filter(|r| r.per_second.iter().any(|&n| n > 0.0))
            .collect();
        TrafficView {
            window_seconds: seconds,
            routes,
        }
    }
}

/// One route's traffic from `before` (none: from zero) to `now`, over `seconds`.
fn between(before: Option<&RouteTotals>, now: &RouteTotals, seconds: f64) -> RouteTraffic {
    let class = |i: usize| now.classes[i] - before.map_or(0, |b| b.classes[i]);
    let rate = |n: u64| {
        if seconds > 0.0 {
            n as f64 / seconds
        } else {
            0.0
        }
    };
    let buckets: Vec<u64> = now
        .buckets
        .iter()
        .enumerate()
        .map(|(i, &n)| n - before.map_or(0, |b| b.buckets.get(i).copied().unwrap_or(0)))
        .collect();
    RouteTraffic {
        route: now.route,
        per_second: std::array::from_fn(|i| rate(class(i))),
        p50_ms: quantile(&buckets, 0.5).map(|s| s * 1000.0),
        p99_ms: quantile(&buckets, 0.99).map(|s| s * 1000.0),
    }
}

/// The `q` quantile, in seconds, of requests counted in latency buckets: linear within the
/// bucket the rank falls in; the last, unbounded bucket reports the highest bound.
pub fn quantile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let bounds = latency_bounds();
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let Some(&upper) = bounds.get(i) else {
                return bounds.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            let within = (rank - below as f64) / n as f64;
            return Some(lower + (upper - lower) * within);
        }
        below += n;
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(route: &'static str, ok: u64, buckets: &[(usize, u64)]) -> RouteTotals {
        let mut b = vec![0; latency_bounds().len() + 1];
        for &(i, n) in buckets {
            b[i] = n;
        }
        RouteTotals {
            route,
            classes: [0, ok, 0, 0, 0],
            buckets: b,
        }
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_as_prometheus_does() {
        // Bounds start 0.5 ms, 1 ms, 2.5 ms...
        let mut b = vec![0; latency_bounds().len() + 1];
        b[1] = 100; // (0.5 ms, 1 ms]
        assert_eq!(quantile(&b, 0.5), Some(0.00075));
        assert_eq!(quantile(&b, 1.0), Some(0.001));
        b[2] = 100; // (1 ms, 2.5 ms]
        let p99 = quantile(&b, 0.99).unwrap();
        assert!((p99 - (0.001 + 0.0015 * 0.98)).abs() < 1e-12, "{p99}");
        assert_eq!(quantile(&[0; 16], 0.5), None);
        let mut slow = vec![0; latency_bounds().len() + 1];
        *slow.last_mut().unwrap() = 1;
        assert_eq!(quantile(&slow, 0.5), latency_bounds().last().copied());
    }

    #[test]
    fn a_view_is_the_difference_over_the_window() {
        let t = Traffic::default();
        let start = Instant::now();
        t.record(start, vec![totals("read", 100, &[(1, 100)])]);
        t.record(
            start + Duration::from_secs(10),
            vec![
                totals("read", 600, &[(1, 100), (2, 500)]),
                totals("write-forwarded", 20, &[(3, 20)]),
            ],
        );
        let v = t.view();
        assert_eq!(v.window_seconds, 10.0);
        assert_eq!(v.routes.len(), 2);
        assert_eq!(v.routes[0].route, "read");
        assert_eq!(v.routes[0].per_second, [0.0, 50.0, 0.0, 0.0, 0.0]);
        // All 500 new reads were in (1 ms, 2.5 ms].
        assert_eq!(v.routes[0].p50_ms, Some(1.75));
        assert_eq!(v.routes[1].per_second[1], 2.0);
        // Samples older than the window go.
        t.record(
            start + Duration::from_secs(80),
            vec![totals("read", 600, &[(1, 100), (2, 500)])],
        );
        let v = t.view();
        assert_eq!(v.window_seconds, 0.0, "only the newest sample is left");
        assert!(v.routes.is_empty(), "no request in the window");
    }
}
