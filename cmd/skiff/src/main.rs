//! The `skiff` binary: parses flags and dispatches to the crates that do the work.

mod check_config;
mod server;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// skiff: a whole Kubernetes cluster in one binary.
#[derive(Debug, Parser)]
#[command(name = "skiff", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check that this host has what skiff needs (kernel features, tools, data dir).
    CheckConfig(check_config::Args),
    /// Run the control plane (API server) on this machine.
    Server(server::Args),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap exits 2 for usage errors and 0 for --help/--version.
            e.exit();
        }
    };
    init_tracing();
    let result = match cli.command {
        Command::CheckConfig(args) => check_config::run(args),
        Command::Server(args) => server::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SKIFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
