//! `skiff images`: import and list images in the node's image store.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args as ClapArgs, Subcommand};
use skiff_runtime::ImageStore;

/// Arguments of `skiff images`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
    /// skiff's data dir (images live in `<data-dir>/agent/images`)
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/skiff",
        env = "SKIFF_DATA_DIR"
    )]
    data_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Import an OCI-layout or `docker save` tarball (plain, gzip or zstd).
    Import {
        /// the archive
        file: PathBuf,
        /// name for images the archive does not name
        #[arg(long)]
        name: Option<String>,
    },
    /// List the images in the store.
    List,
}

/// Runs `skiff images`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let store = ImageStore::open(args.data_dir.join("agent/images"))?;
    match args.command {
        Command::Import { file, name } => {
            for n in store.import(&file, name.as_deref())? {
                println!("{n}");
            }
        }
        Command::List => {
            println!("{:<60} DIGEST", "NAME");
            for e in store.list()? {
                println!("{:<60} {}", e.name, e.manifest_digest);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
