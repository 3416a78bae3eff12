//! The `skiff` binary: parses flags and dispatches to the crates that do the work.

mod check_config;
mod images;
mod killall;
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

// Parsed once at start-up: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Check that this host has what skiff needs (kernel features, tools, data dir).
    CheckConfig(check_config::Args),
    /// Run the control plane (API server) on this machine.
    Server(server::Args),
    /// Import and list container images.
    Images(images::Args),
    /// Stop every container of a data dir and remove skiff's bridge, veths, nftables table and mounts.
    Killall(killall::Args),
    /// Internal: holds one container (re-executed by the runtime).
    #[command(hide = true)]
    Shim {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
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
        Command::Images(args) => images::run(args),
        Command::Killall(args) => killall::run(args),
        // The shim must stay single-threaded: no async runtime before it.
        Command::Shim { args } => {
            let code = skiff_runtime::shim::main(args);
            return ExitCode::from(u8::try_from(code).unwrap_or(1));
        }
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
