//! `skiff agent`: flags of a joining node, handed to `skiff_app::agent::run`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Flags of `skiff agent` (see DESIGN.md, CLI contract).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The server to join: https://<server>:6443.
    #[arg(long, env = "SKIFF_URL")]
    server: String,
    /// Join token: the server's <data-dir>/server/node-token (K10<CA hash>::server:<secret>);
    /// a bare secret also works but leaves the server's CA unverified.
    #[arg(long, env = "SKIFF_TOKEN")]
    token: String,
    /// Directory holding all state (certificates, images, pods).
    #[arg(long, default_value = "/var/lib/skiff")]
    data_dir: PathBuf,
    /// Node name (default: the hostname).
    #[arg(long)]
    node_name: Option<String>,
    /// InternalIP of this node (default: the address of the default-route interface).
    #[arg(long)]
    node_ip: Option<IpAddr>,
    /// Node label key=value (repeatable).
    #[arg(long = "node-label")]
    node_label: Vec<String>,
    /// Node taint key=value:Effect (repeatable).
    #[arg(long = "node-taint")]
    node_taint: Vec<String>,
    /// Cluster DNS address written into pods' resolv.conf.
    #[arg(long, default_value = "10.43.0.10")]
    cluster_dns: String,
    /// Pod CIDR of this node, instead of waiting for the one node IPAM assigns (tests).
    #[arg(long)]
    pod_cidr: Option<String>,
    /// Port of the kubelet's HTTPS server; 0 picks a free port.
    #[arg(long, default_value_t = 10250)]
    kubelet_port: u16,
    /// resolv.conf whose nameservers the cluster DNS forwards to and dnsPolicy Default pods get
    /// (default: /etc/resolv.conf).
    #[arg(long)]
    resolv_conf: Option<PathBuf>,
    /// How pod traffic reaches other nodes: host-gw (one L2), vxlan (UDP 8472) or none.
    #[arg(long, default_value = "vxlan", value_parser = ["host-gw", "vxlan", "none"])]
    network_backend: String,
    /// YAML file of flag values (as for `skiff server --config`).
    #[arg(long)]
    #[allow(dead_code)] // read by config_file::expand before clap parses the command line
    config: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let network_backend = match args.network_backend.parse() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: --network-backend: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let cfg = skiff_app::agent::AgentConfig {
        data_dir: args.data_dir,
        server: args.server,
        token: args.token,
        node_name: args.node_name,
        node: skiff_app::server::NodeFlags {
            node_ip: args.node_ip,
            labels: args.node_label,
            taints: args.node_taint,
            cluster_dns: args.cluster_dns,
            pod_cidr: args.pod_cidr,
            kubelet_port: args.kubelet_port,
            resolv_conf: args.resolv_conf,
            network_backend,
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async move {
        skiff_app::agent::run(cfg, crate::server::shutdown_signal(), |node, server| {
            println!("skiff: agent ready: node {node} joined {server}");
        })
        .await
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}
