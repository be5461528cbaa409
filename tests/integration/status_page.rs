//! The status page on the admin listener (`GET <admin>/`), opened in a real browser: headless
//! Chromium (Debian's `chromium`) loads it from a live three-DC sandbox, runs its script
//! against the JSON endpoints, and the test reads the DOM it rendered (`--dump-dom`).

use std::process::Command;

use crate::support::*;

/// The DOM of `url` once its script has fetched and rendered, as Chromium serialises it.
fn rendered_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let output = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // Let the page's fetches and first render finish before the DOM is dumped.
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("chromium runs (Debian: apt-get install chromium; tests/run.sh installs it)");
    assert!(output.status.success(), "chromium failed: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// The text of every cell of every body row of the table with this id.
fn table_rows(dom: &str, id: &str) -> Vec<Vec<String>> {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no table {id}:\n{dom}"));
    let table = &dom[start..];
    let body = &table[table.find("<tbody>").unwrap()..table.find("</tbody>").unwrap()];
    body.split("<tr")
        .skip(1)
        .map(|tr| {
            tr.split("<td")
                .skip(1)
                .map(|td| {
                    let inner = &td[td.find('>').unwrap() + 1..];
                    let text = &inner[..inner.find("</td>").unwrap()];
                    strip_tags(text)
                })
                .collect()
        })
        .collect()
}

fn strip_tags(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&amp;", "&")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_the_live_table_and_a_failover() {
    let mut c = Cluster::start_with(Options {
        memory: true,
        ..Options::default()
    })
    .await;
    all_admitting(&c).await;
    let page = c.dc(EAST).admin_url("/");
    let served = get(&page).await;
    assert_eq!(served.status, 200);
    assert_eq!(
        served.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(!served.text().contains("http://") && !served.text().contains("https://"));

    let dom = tokio::task::spawn_blocking({
        let page = page.clone();
        move || rendered_dom(&page)
    })
    .await
    .unwrap();
    assert!(
        dom.contains("data-rendered="),
        "the script never rendered:\n{dom}"
    );
    // Every DC, as the router's probes see them.
    let dcs = table_rows(&dom, "dcs");
    let names: Vec<&str> = dcs.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["us-east", "us-west", "eu-central"], "{dcs:?}");
    assert!(dcs.iter().all(|r| r[1] == "up"), "{dcs:?}");
    // Every shard with its owner and epoch, as /admin/table has them.
    let table = get(&c.dc(EAST).admin_url("/admin/table")).await.json();
    let expected: Vec<(String, String, String)> = table["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["shard"].to_string().trim_matches('"').to_owned(),
                s["owner"].as_str().unwrap().to_owned(),
                s["epoch"].to_string(),
            )
        })
        .collect();
    let shown: Vec<(String, String, String)> = table_rows(&dom, "shards")
        .into_iter()
        .map(|r| (r[0].clone(), r[2].clone(), r[4].clone()))
        .collect();
    assert_eq!(shown, expected);

    // Kill eu-central: shard 3 moves to us-east, and the page shows it, marked, with the event.
    c.dcs[EU].kill().await;
    until_owner(c.dc(EAST), 3, "us-east").await;
    let (_, epoch) = shard_owner(c.dc(EAST), 3).await;
    let dom = tokio::task::spawn_blocking(move || rendered_dom(&page))
        .await
        .unwrap();
    let shards = table_rows(&dom, "shards");
    let three = shards.iter().find(|r| r[0] == "3").unwrap();
    assert_eq!(three[1], "eu-central", "home");
    assert_eq!(three[2], "us-east", "owner");
    assert_eq!(three[4], epoch.to_string());
    assert!(three[8].contains("moved from home"), "{three:?}");
    assert!(dom.contains("class=\"moved\""), "the moved row is marked");
    let events = table_rows(&dom, "events");
    assert!(
        events.iter().any(|e| e[1] == "ownership"
            && e[2].starts_with(&format!(
                "shard 3 moved from eu-central to us-east at epoch {epoch}"
            ))),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e[1] == "health" && e[2] == "datacenter eu-central is down"),
        "{events:?}"
    );
}
