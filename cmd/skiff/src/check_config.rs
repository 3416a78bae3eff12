//! `skiff check-config`: reports whether this host has what skiff needs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Flags of `skiff check-config`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Data directory whose contents are checked too.
    #[arg(long, default_value = "/var/lib/skiff")]
    data_dir: PathBuf,
}

struct Check {
    name: &'static str,
    ok: bool,
    required: bool,
    hint: String,
}

/// Runs every check, prints one line per check, and exits 1 when a required one fails.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let checks = vec![
        fs_check("cgroups mounted", "/sys/fs/cgroup", true, "mount cgroup v1 controllers or cgroup2 at /sys/fs/cgroup; on a Raspberry Pi add `cgroup_memory=1 cgroup_enable=memory` to the kernel command line"),
        memory_cgroup(),
        proc_filesystem("overlay", "overlayfs", true, "load the overlay module: `modprobe overlay`"),
        fs_check("network namespaces", "/proc/self/ns/net", true, "the kernel needs CONFIG_NET_NS"),
        fs_check("pid namespaces", "/proc/self/ns/pid", true, "the kernel needs CONFIG_PID_NS"),
        tool("nft", true, "install nftables (`apt-get install nftables`): skiff programs service rules with it"),
        vxlan_module(),
    ];
    let mut failed = false;
    for c in &checks {
        let mark = if c.ok {
            "ok"
        } else if c.required {
            "MISSING"
        } else {
            "missing (optional)"
        };
        if c.ok {
            println!("{:<28} {mark}", c.name);
        } else {
            println!("{:<28} {mark}: {}", c.name, c.hint);
        }
        failed |= c.required && !c.ok;
    }
    println!("{:<28} {}", "data dir", args.data_dir.display());
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn fs_check(name: &'static str, path: &str, required: bool, hint: &str) -> Check {
    Check {
        name,
        ok: Path::new(path).exists(),
        required,
        hint: hint.to_string(),
    }
}

fn memory_cgroup() -> Check {
    let ok = Path::new("/sys/fs/cgroup/memory").exists()
        || std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .map(|s| s.split_whitespace().any(|c| c == "memory"))
            .unwrap_or(false);
    Check {
        name: "memory cgroup",
        ok,
        required: true,
        hint: "enable the memory cgroup (Raspberry Pi: `cgroup_memory=1 cgroup_enable=memory` in cmdline.txt)".into(),
    }
}

fn proc_filesystem(fs: &str, name: &'static str, required: bool, hint: &str) -> Check {
    let ok = std::fs::read_to_string("/proc/filesystems")
        .map(|s| s.lines().any(|l| l.split_whitespace().last() == Some(fs)))
        .unwrap_or(false);
    Check {
        name,
        ok,
        required,
        hint: hint.to_string(),
    }
}

fn tool(bin: &'static str, required: bool, hint: &str) -> Check {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let ok = std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(bin).is_file());
    Check {
        name: bin,
        ok,
        required,
        hint: hint.to_string(),
    }
}

fn vxlan_module() -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let ok = Path::new("/sys/module/vxlan").exists()
        || Path::new(&format!("/lib/modules/{release}/kernel/drivers/net/vxlan")).exists()
        || std::fs::read_to_string(format!("/lib/modules/{release}/modules.builtin"))
            .map(|s| s.contains("vxlan"))
            .unwrap_or(false);
    Check {
        name: "vxlan",
        ok,
        required: false,
        hint: "only needed for --network-backend vxlan; some Ubuntu Pi kernels need linux-modules-extra-raspi".into(),
    }
}
