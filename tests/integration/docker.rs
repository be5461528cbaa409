//! The Dockerfile cannot be built here (no Docker engine), so this reads it and checks it against
//! the code: the binary it builds and runs, the ports it exposes, the config path it passes, the
//! health check, and that it runs as a non-root user with a locked multi-stage build.

use loom_router::config::{DEFAULT_CONFIG_PATH, DEFAULT_LISTEN_ADMIN, DEFAULT_LISTEN_HTTP};

#[test]
fn the_dockerfile_matches_the_code() {
    let text =
        std::fs::read_to_string(format!("{}/Dockerfile", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let binary = env!("CARGO_PKG_NAME");
    assert_eq!(binary, "loom-router");

    // Multi-stage, locked, with the etcd backend and without the demo's emulated Loom.
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(text.contains(
        "cargo build --release --locked --no-default-features --features etcd --bin loom-router"
    ));
    assert!(
        lines.contains(&"COPY crates ./crates"),
        "the workspace needs its members"
    );
    assert!(text.contains(&format!(
        "COPY --from=build /src/target/release/{binary} /usr/local/bin/{binary}"
    )));

    // Runs the binary, with the default config path, as a non-root user.
    let entrypoint = lines.iter().find(|l| l.starts_with("ENTRYPOINT")).unwrap();
    assert_eq!(
        *entrypoint,
        format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]")
    );
    let cmd = lines.iter().find(|l| l.starts_with("CMD [")).unwrap();
    assert_eq!(
        *cmd,
        format!("CMD [\"run\", \"--config\", \"{DEFAULT_CONFIG_PATH}\"]")
    );
    let user = lines.iter().rev().find(|l| l.starts_with("USER ")).unwrap();
    assert_ne!(*user, "USER root");

    // Exposes the default listeners; the health check hits /healthz on the admin port.
    let port = |addr: &str| addr.rsplit(':').next().unwrap().to_owned();
    let expose = lines.iter().find(|l| l.starts_with("EXPOSE")).unwrap();
    let exposed: Vec<&str> = expose.split_whitespace().skip(1).collect();
    for default in [DEFAULT_LISTEN_HTTP, DEFAULT_LISTEN_ADMIN] {
        assert!(
            exposed.contains(&port(default).as_str()),
            "{expose} lacks {default}"
        );
    }
    assert!(exposed.contains(&"8443"), "the documented https port");
    // The instruction and its continuation line.
    let healthcheck = text
        .split("\nHEALTHCHECK")
        .nth(1)
        .unwrap()
        .split('\n')
        .take(2)
        .collect::<String>();
    assert!(
        healthcheck.contains(&format!("http://{DEFAULT_LISTEN_ADMIN}/healthz")),
        "{healthcheck}"
    );
    // Config and certificates are mounted, never baked in.
    assert!(!lines
        .iter()
        .any(|l| l.starts_with("COPY config") || l.starts_with("COPY certs")));
}
