//! `skiff agent`: flags of a joining node, handed to `skiff_app::agent::run`.

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
    #[command(flatten)]
    node: crate::node_flags::NodeArgs,
    /// YAML file of flag values (as for `skiff server --config`).
    #[arg(long)]
    #[allow(dead_code)] // read by config_file::expand before clap parses the command line
    config: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let node = match args.node.into_flags() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let cfg = skiff_app::agent::AgentConfig {
        data_dir: args.data_dir,
        server: args.server,
        token: args.token,
        node_name: args.node_name,
        node,
    };
    crate::server::run_app(skiff_app::agent::run(
        cfg,
        crate::server::shutdown_signal(),
        |node, server| {
            println!("skiff: agent ready: node {node} joined {server}");
        },
    ))
}
