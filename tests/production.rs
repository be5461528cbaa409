//! The production build: the Dockerfile's features (`--no-default-features --features etcd`),
//! without the demo and its emulated Loom. `.ci/run` runs this file in that build; in the
//! default build it is empty.

#![cfg(not(feature = "demo"))]

use std::process::Command;

/// `demo` is a usage error that names what is missing.
#[test]
fn a_build_without_the_demo_says_so_and_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_loom-router"))
        .arg("demo")
        .output()
        .expect("the router binary runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("built without the demo (cargo feature `demo`"),
        "{stderr}"
    );
}
