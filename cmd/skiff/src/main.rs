//! The `skiff` binary: parses flags and dispatches to the crates that do the work.

mod agent;
mod check_config;
mod config_file;
mod images;
mod killall;
mod node_flags;
mod server;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// mimalloc instead of glibc malloc: under the scheduler benchmark (1,000 hollow nodes, 10,000
/// pods) a quarter of the server's CPU went to glibc's malloc/free/consolidate; with mimalloc the
/// same run schedules 1.5-1.9x the pods per second. Figures in BENCHMARKS.md.
///
/// Except in `skiff shim`: a node runs one shim per container, each single-threaded and small,
/// and libcontainer's set-up processes are forks of it. There mimalloc's per-process arena set-up
/// and page faults cost more than its speed gains, so the shim uses glibc's malloc.
#[global_allocator]
static GLOBAL: Allocator = Allocator;

/// Set once, by [`tune_allocator`] before anything is allocated, when this process is a shim.
static USE_SYSTEM_ALLOCATOR: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// mimalloc, or glibc's malloc for the shim (see [`GLOBAL`]). The choice is made before the
/// first allocation and never changes, so every block is freed by the allocator that made it.
struct Allocator;

impl Allocator {
    fn system() -> bool {
        USE_SYSTEM_ALLOCATOR.load(std::sync::atomic::Ordering::Relaxed)
    }
}

// SAFETY: every method forwards to one of two correct allocators, always the same one for the
// life of the process (see USE_SYSTEM_ALLOCATOR).
unsafe impl std::alloc::GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe {
            if Self::system() {
                std::alloc::System.alloc(layout)
            } else {
                mimalloc::MiMalloc.alloc(layout)
            }
        }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe {
            if Self::system() {
                std::alloc::System.alloc_zeroed(layout)
            } else {
                mimalloc::MiMalloc.alloc_zeroed(layout)
            }
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded with the caller's guarantees; ptr came from the same allocator.
        unsafe {
            if Self::system() {
                std::alloc::System.dealloc(ptr, layout)
            } else {
                mimalloc::MiMalloc.dealloc(ptr, layout)
            }
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees; ptr came from the same allocator.
        unsafe {
            if Self::system() {
                std::alloc::System.realloc(ptr, layout, new)
            } else {
                mimalloc::MiMalloc.realloc(ptr, layout, new)
            }
        }
    }
}

/// mimalloc v3's `mi_option_arena_eager_commit` and `mi_option_purge_delay` (positions in
/// `enum mi_option_e` of the libmimalloc-sys pinned in Cargo.lock, as `MIMALLOC_VERBOSE=1` lists
/// them; re-check them when upgrading mimalloc).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// With its defaults mimalloc commits arenas eagerly and returns freed pages to the OS only after
/// a second, which more than doubled the idle server's anonymous memory (39 MiB vs 14 MiB with
/// glibc). Lazy commit and immediate purging bring it back to glibc's figure at nearly the same
/// speed. The arena setting only counts before the first allocation creates the first arena, so
/// this runs as an ELF constructor (`.init_array`), before Rust's runtime allocates anything;
/// setting it at the top of `main` was measured to be too late.
///
/// mimalloc's own environment variables (`MIMALLOC_ARENA_EAGER_COMMIT`, `MIMALLOC_PURGE_DELAY`)
/// still win when set, so the trade between memory and speed can be tuned (and measured) on a
/// given board without a rebuild.
///
/// glibc calls `.init_array` functions with the program's arguments: `skiff shim ...` picks the
/// system allocator here, before anything is allocated.
extern "C" fn tune_allocator(
    argc: std::ffi::c_int,
    argv: *const *const std::ffi::c_char,
    _envp: *const *const std::ffi::c_char,
) {
    unsafe extern "C" {
        fn getenv(name: *const std::ffi::c_char) -> *const std::ffi::c_char;
    }
    if argc >= 2 && !argv.is_null() {
        // SAFETY: argv holds argc pointers (glibc's contract for .init_array functions), and
        // argc >= 2.
        let arg1 = unsafe { *argv.add(1) };
        // SAFETY: a non-null argv entry is a NUL-terminated string.
        if !arg1.is_null() && unsafe { std::ffi::CStr::from_ptr(arg1) } == c"shim" {
            USE_SYSTEM_ALLOCATOR.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
    }
    // SAFETY: getenv reads the environment the loader set up and does not allocate;
    // mi_option_set only stores an integer in mimalloc's option table. Neither depends on Rust's
    // runtime being initialised.
    unsafe {
        if getenv(c"MIMALLOC_ARENA_EAGER_COMMIT".as_ptr()).is_null() {
            libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        }
        if getenv(c"MIMALLOC_PURGE_DELAY".as_ptr()).is_null() {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
    }
}

#[used]
// SAFETY: glibc calls each `.init_array` entry once before `main` as
// `fn(argc, argv, envp)`; `tune_allocator` has that signature and is safe to call at that point.
#[unsafe(link_section = ".init_array")]
static TUNE_ALLOCATOR: extern "C" fn(
    std::ffi::c_int,
    *const *const std::ffi::c_char,
    *const *const std::ffi::c_char,
) = tune_allocator;

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
    /// Join a server as a node (kubelet, pod network, service proxy, cluster DNS).
    Agent(agent::Args),
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
    // `skiff server|agent --config FILE`: the file's flags go in before clap sees the command line.
    // A command line that is not valid UTF-8 is passed to clap untouched.
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let argv = match raw
        .iter()
        .map(|a| a.to_str().map(str::to_string))
        .collect::<Option<Vec<String>>>()
    {
        Some(mut args) => {
            for sub in ["server", "agent"] {
                let flags = config_file::Flags::of(&Cli::command(), sub);
                args = match config_file::expand(args, sub, &flags) {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                };
            }
            args.into_iter().map(Into::into).collect()
        }
        None => raw,
    };
    let cli = match Cli::try_parse_from(argv) {
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
        Command::Agent(args) => agent::run(args),
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// `--cni-conf-dir`/`--cni-bin-dir` exist on server and agent, so their `--config` keys too.
    #[test]
    fn cni_flags_are_on_server_and_agent_and_in_the_config_file() {
        for sub in ["server", "agent"] {
            let flags = super::config_file::Flags::of(&super::Cli::command(), sub);
            let out = super::config_file::flags_from(
                std::path::Path::new("/c.yaml"),
                "cni-conf-dir: /etc/cni/net.d\ncni-bin-dir: [/usr/lib/cni, /opt/cni/bin]\n",
                &flags,
                &[],
            )
            .unwrap_or_default();
            for f in [
                "--cni-conf-dir=/etc/cni/net.d",
                "--cni-bin-dir=/usr/lib/cni",
                "--cni-bin-dir=/opt/cni/bin",
            ] {
                assert!(out.iter().any(|o| o == f), "{sub}: {out:?} lacks {f}");
            }
        }
    }

    /// The constructor ran before main (in this test binary too): the two options hold our
    /// values. (The ids were checked against `MIMALLOC_VERBOSE=1`'s option listing of the
    /// libmimalloc-sys pinned in Cargo.lock, whose defaults there are 2 and 1000.)
    #[test]
    fn mimalloc_options_are_set_before_main() {
        // SAFETY: mi_option_get reads mimalloc's option table.
        let (eager, purge, next) = unsafe {
            (
                libmimalloc_sys::mi_option_get(super::MI_OPTION_ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY),
                // mi_option_use_numa_nodes follows purge_delay in v3; default 0.
                libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY + 1),
            )
        };
        assert_eq!((eager, purge, next), (0, 0, 0));
        // SAFETY: as above; show_errors (0) and verbose (2) keep their defaults.
        let verbose = unsafe { libmimalloc_sys::mi_option_get(2) };
        assert_eq!(verbose, 0);
    }
}
