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
            let bars = PullBars::new();
            let show = |p: skiff_runtime::pull::PullProgress| bars.update(&p);
            let creds = skiff_runtime::pull::Credentials::Anonymous;
            let name = rt.block_on(skiff_runtime::pull::pull(
                &store, &reference, &regs, &creds, &show,
            ))?;
            bars.finish();
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

/// Progress of `skiff images pull`: one bar per blob on a terminal, one line per finished blob
/// otherwise (logs, CI).
struct PullBars {
    multi: Option<indicatif::MultiProgress>,
    bars: std::sync::Mutex<std::collections::HashMap<String, indicatif::ProgressBar>>,
}

impl PullBars {
    fn new() -> PullBars {
        use std::io::IsTerminal;
        PullBars {
            multi: std::io::stderr()
                .is_terminal()
                .then(indicatif::MultiProgress::new),
            bars: Default::default(),
        }
    }

    fn update(&self, p: &skiff_runtime::pull::PullProgress) {
        let short = p.digest.get(7..19).unwrap_or(&p.digest).to_string();
        let Some(multi) = &self.multi else {
            if p.complete {
                let how = if p.cached { "exists" } else { "pulled" };
                eprintln!("{} {how} ({} bytes)", p.digest, p.bytes);
            }
            return;
        };
        let Ok(mut bars) = self.bars.lock() else {
            return;
        };
        let bar = bars.entry(p.digest.clone()).or_insert_with(|| {
            let bar = multi.add(indicatif::ProgressBar::new(p.bytes));
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(short);
            bar
        });
        bar.set_length(p.bytes.max(p.done));
        bar.set_position(p.done);
        if p.complete {
            bar.finish_with_message(if p.cached { "exists" } else { "done" });
        }
    }

    fn finish(&self) {
        if let Some(multi) = &self.multi {
            let _ = multi.clear();
        }
    }
}
