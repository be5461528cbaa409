//! The `loom-router` command: `run`, `check` and `demo` (docs/configuration.md).
//!
//! This file parses arguments, sets up logging, maps outcomes to exit codes and waits for
//! signals. Everything it runs lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use loom_router::app::App;
use loom_router::config::{AccessLog, Backend, Config, DEFAULT_CONFIG_PATH};
#[cfg(feature = "demo")]
use loom_router::demo::{Demo, DEFAULT_PORT_BASE};
use loom_router::ops::operator::{self, Call};
use tokio_util::sync::CancellationToken;

/// Without the `demo` feature, `demo` still parses, and says what is missing.
#[cfg(not(feature = "demo"))]
const DEFAULT_PORT_BASE: u16 = 8080;

/// mimalloc's thread-local free lists serve the request path's many small, short-lived blocks
/// in fewer instructions than glibc malloc (3 % of a proxied read; see `Cargo.toml`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "loom-router",
    version,
    about = "Routes Loom API traffic by cluster shard"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve until SIGINT or SIGTERM, then drain.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a config and print one line per shard (like `nginx -t`).
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Show a router's shard table: owners, epochs, states, last change and reason.
    Table {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the raw JSON of /admin/table.
        #[arg(long)]
        json: bool,
    },
    /// Planned switchover: fence the shard, drain writes in flight, move it to a live replica.
    Move {
        #[command(flatten)]
        admin: AdminArgs,
        /// A residue, or "global".
        shard: String,
        /// The datacenter to move it to.
        #[arg(long)]
        to: String,
    },
    /// Turn automatic failover off for a shard (its owner still admits writes).
    Freeze {
        #[command(flatten)]
        admin: AdminArgs,
        shard: String,
    },
    /// Turn automatic failover back on for a shard.
    Unfreeze {
        #[command(flatten)]
        admin: AdminArgs,
        shard: String,
    },
    /// Run three DCs (emulated Looms and real routers) in this process until Ctrl-C.
    Demo {
        /// Routers listen on port-base+1..+3, admin on port-base+1821..+1823, Looms on
        /// port-base+1001..+1003.
        #[arg(long, default_value_t = DEFAULT_PORT_BASE)]
        port_base: u16,
    },
}

/// Where and how to reach a router's admin listener.
#[derive(Debug, clap::Args)]
struct AdminArgs {
    /// The admin listener, e.g. http://127.0.0.1:9901.
    #[arg(long)]
    admin: String,
    /// `[admin] token`, for calls that change state.
    #[arg(long, env = "LOOM_ROUTER_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// Threads of the control plane's runtime: its work is a few probes, lease renewals and admin
/// calls a second, and one thread blocked on a slow call must not hold up the lease.
const CONTROL_THREADS: usize = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => run(&config),
        Command::Demo { port_base } => demo(port_base),
        Command::Table { admin, json } => operate(&admin, &Call::Table, json),
        Command::Move { admin, shard, to } => operate(&admin, &Call::Move { shard, to }, false),
        Command::Freeze { admin, shard } => operate(&admin, &Call::Freeze { shard }, false),
        Command::Unfreeze { admin, shard } => operate(&admin, &Call::Unfreeze { shard }, false),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            return ExitCode::from(1);
        }
    };
    for warning in config.warnings() {
        eprintln!("warning: {warning}");
    }
    let table = config.table();
    let name = |dc: usize| config.datacenters[dc].name.as_str();
    for shard in table.shards() {
        let replicas: Vec<&str> = shard.replicas.iter().map(|&r| name(r)).collect();
        println!(
            "shard {}: owner {} home {} replicas [{}] epoch {} {}",
            shard.key,
            name(shard.owner),
            shard.home.map_or("-", name),
            replicas.join(", "),
            shard.epoch,
            shard.state.as_str(),
        );
    }
    eprintln!("{}: ok", path.display());
    ExitCode::SUCCESS
}

fn run(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            return ExitCode::from(1);
        }
    };
    init_logging(config.access_log);
    if config.coordination.backend == Backend::Memory {
        eprintln!(
            "coordination.backend: \"memory\" exists only for the demo and tests; use \"static\" or \"etcd\""
        );
        return ExitCode::from(1);
    }
    // The control plane's runtime (health, lease, coordinator, admin, reloads): requests run on
    // the request workers' own runtimes (`[runtime] workers`, src/proxy/workers.rs).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(CONTROL_THREADS)
        .thread_name("loom-control")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let app = match App::bind(config).await {
            Ok(app) => app.with_config_path(path.to_owned()),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        };
        tracing::info!(http = ?app.http_addr(), https = ?app.https_addr(), admin = ?app.admin_addr().ok(), "loom-router serving");
        let shutdown = CancellationToken::new();
        tokio::spawn(signal_shutdown(shutdown.clone()));
        match app.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        }
    })
}

/// One operator call: print the answer; exit 0 on 2xx, 1 otherwise.
fn operate(admin: &AdminArgs, call: &Call, json: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let answer = match runtime.block_on(operator::call(&admin.admin, admin.token.as_deref(), call))
    {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    if !(200..300).contains(&answer.status) {
        eprint!("{} ({}): {}", call_name(call), answer.status, answer.body);
        return ExitCode::from(1);
    }
    match (
        call,
        json,
        serde_json::from_str::<serde_json::Value>(&answer.body),
    ) {
        (Call::Table, false, Ok(table)) => print!("{}", operator::render_table(&table)),
        _ => println!("{}", answer.body.trim_end()),
    }
    ExitCode::SUCCESS
}

fn call_name(call: &Call) -> &'static str {
    match call {
        Call::Table => "table",
        Call::Move { .. } => "move",
        Call::Freeze { .. } => "freeze",
        Call::Unfreeze { .. } => "unfreeze",
    }
}

/// The production build (the Dockerfile's) carries no emulated Loom, so no demo: a usage error.
#[cfg(not(feature = "demo"))]
fn demo(_port_base: u16) -> ExitCode {
    eprintln!(
        "this binary was built without the demo (cargo feature `demo`, on by default); \
         run `cargo run --release -- demo` from the source tree"
    );
    ExitCode::from(2)
}

#[cfg(feature = "demo")]
fn demo(port_base: u16) -> ExitCode {
    init_logging(AccessLog::Text);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let demo = match Demo::start(Some(port_base)).await {
            Ok(demo) => demo,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        };
        print!("{}", demo.banner());
        let shutdown = CancellationToken::new();
        signal_shutdown(shutdown.clone()).await;
        demo.stop().await;
        ExitCode::SUCCESS
    })
}

/// Cancel `shutdown` on SIGINT or SIGTERM.
async fn signal_shutdown(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    shutdown.cancel();
}

/// Logs go to stderr; levels follow `RUST_LOG` (default `info`). Access lines use JSON when
/// `[log] access = "json"`.
fn init_logging(access: AccessLog) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if access == AccessLog::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}
