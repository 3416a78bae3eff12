//! `skiff-bench`: benchmarks for skiff. `skiff-bench store` compares the embedded redb store with
//! a real etcd (started here on loopback) and prints a Markdown table.

mod pods;
mod store;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// skiff benchmarks.
#[derive(Debug, Parser)]
#[command(name = "skiff-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Store throughput and watch latency: redb (embedded) next to etcd.
    Store(store::Args),
    /// Pod start-up on one real node: an N-replica Deployment from create to all Running.
    Pods(pods::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Store(args) => store::run(args),
        Command::Pods(args) => pods::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skiff-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}
