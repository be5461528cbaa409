//! `config/monitoring/`: the Grafana dashboard and the alert rules name only metrics the router
//! exports. The list is `metrics::ALL`, the constants the router records with, so renaming a
//! metric breaks this test rather than a dashboard in production. `promtool check rules` and
//! `promtool test rules` check the rules' syntax and behaviour (`.ci/run`).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use loom_router::metrics::ALL;
use serde_json::Value;

const DASHBOARD: &str = include_str!("../config/monitoring/grafana-dashboard.json");
const ALERTS: &str = include_str!("../config/monitoring/alerts.yml");

/// Every `loom_router_*` name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("loom_router_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Every `expr` string anywhere in the dashboard.
fn exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

fn assert_exported(source: &str, names: &BTreeSet<String>) {
    assert!(!names.is_empty(), "{source} names no metric");
    let unknown: Vec<_> = names
        .iter()
        .filter(|n| !ALL.contains(&n.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "{source} names metrics the router does not export: {unknown:?}"
    );
}

#[test]
fn the_dashboard_names_only_exported_metrics() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).unwrap();
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    let names: BTreeSet<String> = all.iter().flat_map(|e| metric_names(e)).collect();
    assert_exported("grafana-dashboard.json", &names);
    // Every panel the issue names has a query, through the datasource variable.
    let panels = dashboard["panels"].as_array().unwrap();
    for panel in panels {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(
                expr.contains("dc=~\"$datacenter\""),
                "{} ignores the datacenter variable: {expr}",
                panel["title"]
            );
        }
    }
    for needed in [
        "loom_router_requests_total",
        "loom_router_request_duration_seconds_bucket",
        "loom_router_upstream_errors_total",
        "loom_router_datacenter_up",
        "loom_router_table_epoch",
        "loom_router_failovers_total",
        "loom_router_fenced_writes_total",
        "loom_router_lease_remaining_seconds",
        "loom_router_inflight_requests",
        "loom_router_open_connections",
    ] {
        assert!(names.contains(needed), "no panel shows {needed}");
    }
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "datacenter"]);
}

#[test]
fn the_alert_rules_name_only_exported_metrics() {
    let exprs: Vec<&str> = ALERTS
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("expr:"))
        .collect();
    assert_eq!(exprs.len(), 10, "one expression per rule");
    let names: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert_exported("alerts.yml", &names);
}

#[test]
fn a_renamed_metric_would_be_caught() {
    let names = metric_names("sum(rate(loom_router_requests_totl[5m])) / loom_router_ready");
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["loom_router_ready", "loom_router_requests_totl"]
    );
    assert!(!ALL.contains(&"loom_router_requests_totl"));
}
