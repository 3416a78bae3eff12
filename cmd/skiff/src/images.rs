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
    /// Pull an image (mirrors and credentials from registries.yaml).
    Pull {
        /// the image reference (`busybox`, `registry:5000/app:v1`)
        reference: String,
        /// registries config (default `<data-dir>/registries.yaml`)
        #[arg(long)]
        registries: Option<PathBuf>,
    },
    /// List the images in the store.
    List,
    /// Remove an image name from the store.
    Rm {
        /// the image reference
        reference: String,
    },
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
        Command::Pull {
            reference,
            registries,
        } => {
            let path = registries.unwrap_or_else(|| args.data_dir.join("registries.yaml"));
            let regs = skiff_runtime::pull::RegistriesConfig::load(&path)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let show = |p: skiff_runtime::pull::PullProgress| {
                let how = if p.cached { "exists" } else { "pulled" };
                eprintln!("{} {how} ({} bytes)", p.digest, p.bytes);
            };
            let creds = skiff_runtime::pull::Credentials::Anonymous;
            let name = rt.block_on(skiff_runtime::pull::pull(
                &store, &reference, &regs, &creds, &show,
            ))?;
            println!("{name}");
        }
        Command::Rm { reference } => {
            if !store.untag(&reference)? {
                anyhow::bail!("image {reference} is not in the store");
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
