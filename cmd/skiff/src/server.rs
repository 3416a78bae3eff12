//! `skiff server`: flags of the server half, handed to `skiff_app::server::run`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Flags of `skiff server` (see DESIGN.md, CLI contract).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory holding all state (store, certificates, kubeconfig).
    #[arg(long, default_value = "/var/lib/skiff")]
    data_dir: PathBuf,
    /// HTTPS port of the API; 0 picks a free port.
    #[arg(long, default_value_t = 6443)]
    https_listen_port: u16,
    /// Address the API listens on.
    #[arg(long, default_value = "0.0.0.0")]
    bind_address: IpAddr,
    /// Extra subject alternative name for the serving certificate (repeatable).
    #[arg(long = "tls-san")]
    tls_san: Vec<String>,
    /// External datastore: an etcd URL (default: embedded store under the data dir).
    #[arg(long)]
    datastore_endpoint: Option<String>,
    /// Cluster token: agents join with it; with --datastore-endpoint, servers sharing the
    /// datastore must all be given the same one (it encrypts the shared CA and keys).
    #[arg(long, env = "SKIFF_TOKEN")]
    token: Option<String>,
    /// Service CIDR.
    #[arg(long, default_value = "10.43.0.0/16")]
    service_cidr: String,
    /// Pod CIDR of the cluster.
    #[arg(long, default_value = "10.42.0.0/16")]
    cluster_cidr: String,
    /// Node name (default: the hostname).
    #[arg(long)]
    node_name: Option<String>,
    /// Run only the control plane (no kubelet on this machine).
    #[arg(long)]
    disable_agent: bool,
    #[command(flatten)]
    node: crate::node_flags::NodeArgs,
    /// YAML file of flag values (keys = flag names without `--`; default /etc/skiff/config.yaml
    /// when it exists). Flags on the command line win; `key+:` appends to repeatable flags.
    #[arg(long)]
    #[allow(dead_code)] // read by config_file::expand before clap parses the command line
    config: Option<PathBuf>,
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let node = match args.node.into_flags() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let cfg = skiff_app::ServerConfig {
        data_dir: args.data_dir,
        https_listen_port: args.https_listen_port,
        bind_address: args.bind_address,
        tls_sans: args.tls_san,
        datastore_endpoint: args.datastore_endpoint,
        token: args.token,
        service_cidr: args.service_cidr,
        cluster_cidr: args.cluster_cidr,
        node_name: args.node_name,
        disable_agent: args.disable_agent,
        node,
    };
    run_app(skiff_app::server::run(
        cfg,
        shutdown_signal(),
        |kubeconfig, url| {
            println!(
                "skiff: API server ready at {url}; kubeconfig: {}",
                kubeconfig.display()
            );
        },
    ))
}

/// Runs a server or agent future on a multi-threaded runtime and maps its error to the CLI's
/// exit codes (0 clean stop, 1 runtime failure, 2 bad flags or config).
pub fn run_app(
    app: impl std::future::Future<Output = Result<(), skiff_app::AppError>>,
) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(app);
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}
