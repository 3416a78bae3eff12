//! `skiff killall`: stops every shim and container of a data dir and removes what the node
//! half created on the host (bridge, veths, nftables table, mounts), like k3s-killall.sh.

use std::path::PathBuf;
use std::process::ExitCode;

/// Flags of `skiff killall`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The data dir whose containers are stopped.
    #[arg(long, default_value = "/var/lib/skiff")]
    data_dir: PathBuf,
    /// The pod bridge to remove.
    #[arg(long, default_value = "cni0")]
    bridge: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let done = rt.block_on(skiff_app::node::killall(&args.data_dir, &args.bridge))?;
    for line in done {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}
