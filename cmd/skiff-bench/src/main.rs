//! `skiff-bench`: benchmarks for skiff. `skiff-bench store` compares the embedded redb store with
//! a real etcd (started here on loopback) and prints a Markdown table; `skiff-bench api` drives a
//! real `skiff server` over HTTPS; `skiff-bench hollow-nodes` registers hollow nodes and acts as
//! their kubelet.

mod api;
mod pods;
mod scheduler;
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
    /// API server latency, list, watch fan-out and RSS against a real `skiff server`.
    Api(api::Args),
    /// Register N hollow nodes and act as their kubelet until interrupted.
    HollowNodes(HollowArgs),
    /// Pod start-up on one real node: an N-replica Deployment from create to all Running.
    Pods(pods::Args),
    /// Scheduling throughput: N hollow nodes, M pods, against a real `skiff server`.
    Scheduler(scheduler::Args),
}

/// `skiff-bench hollow-nodes`.
#[derive(Debug, clap::Args)]
struct HollowArgs {
    /// Kubeconfig of the cluster.
    #[arg(long)]
    kubeconfig: std::path::PathBuf,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    count: usize,
    /// Node names are PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "hollow")]
    prefix: String,
    /// CPU capacity of each node.
    #[arg(long, default_value = "4")]
    cpu: String,
    /// Memory capacity of each node.
    #[arg(long, default_value = "16Gi")]
    memory: String,
    /// Pod capacity of each node.
    #[arg(long, default_value = "110")]
    pods: String,
    /// Lease renewal interval in seconds.
    #[arg(long, default_value_t = 10)]
    renew_seconds: u64,
}

fn hollow_nodes(args: HollowArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let client = skiff_bench::hollow::client_from_kubeconfig(&args.kubeconfig).await?;
        let cfg = skiff_bench::hollow::HollowConfig {
            prefix: args.prefix,
            count: args.count,
            cpu: args.cpu,
            memory: args.memory,
            pods: args.pods,
            renew: std::time::Duration::from_secs(args.renew_seconds.max(1)),
            kubelet: true,
        };
        let nodes = skiff_bench::hollow::HollowNodes::start(client, cfg).await?;
        println!("hollow nodes ready: {}", nodes.names.join(","));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        drop(nodes);
        Ok(())
    })
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Store(args) => store::run(args),
        Command::Api(args) => api::run(args),
        Command::HollowNodes(args) => hollow_nodes(args),
        Command::Pods(args) => pods::run(args),
        Command::Scheduler(args) => scheduler::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skiff-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}
