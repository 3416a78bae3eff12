//! Container configuration (what the kubelet asks for) and its translation into an OCI runtime
//! spec, with image config defaults applied the way Kubernetes applies them.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{Error, Result};
use crate::store::ImageConfig;

/// What kind of mount.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    /// a bind mount of `source`
    #[default]
    Bind,
    /// a fresh tmpfs
    Tmpfs,
}

/// One mount into the container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Mount {
    /// bind or tmpfs
    #[serde(default)]
    pub kind: MountKind,
    /// host path (bind) — ignored for tmpfs
    #[serde(default)]
    pub source: PathBuf,
    /// path inside the container
    pub destination: String,
    /// mounted read-only
    #[serde(default)]
    pub readonly: bool,
}

/// Resource limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Resources {
    /// cpu shares (v1 `cpu.shares`; converted to weight on v2 by libcontainer)
    #[serde(default)]
    pub cpu_shares: Option<u64>,
    /// cpu quota in µs per period
    #[serde(default)]
    pub cpu_quota: Option<i64>,
    /// cpu period in µs (default 100000 when a quota is set)
    #[serde(default)]
    pub cpu_period: Option<u64>,
    /// memory limit in bytes
    #[serde(default)]
    pub memory_limit: Option<i64>,
    /// maximum number of tasks
    #[serde(default)]
    pub pids_limit: Option<i64>,
}

/// A host device made available in the container (for device plugins).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Device {
    /// the device node on the host, e.g. `/dev/nvidia0`
    pub host_path: PathBuf,
    /// where it appears in the container (defaults to the host path)
    #[serde(default)]
    pub container_path: Option<String>,
    /// cgroup permissions: any of `r`, `w`, `m` (default `rwm`)
    #[serde(default)]
    pub permissions: Option<String>,
}

/// A container as the caller describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ContainerConfig {
    /// a name (part of the generated id)
    pub name: String,
    /// image reference or manifest digest
    pub image: String,
    /// Kubernetes `command` (replaces the image entrypoint)
    #[serde(default)]
    pub command: Vec<String>,
    /// Kubernetes `args` (replaces the image cmd)
    #[serde(default)]
    pub args: Vec<String>,
    /// environment (appended after the image's, later wins)
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// working directory (image's, else `/`)
    #[serde(default)]
    pub working_dir: Option<String>,
    /// runAsUser
    #[serde(default)]
    pub run_as_user: Option<u32>,
    /// runAsGroup
    #[serde(default)]
    pub run_as_group: Option<u32>,
    /// supplementalGroups
    #[serde(default)]
    pub supplementary_groups: Vec<u32>,
    /// mounts
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// limits
    #[serde(default)]
    pub resources: Resources,
    /// capabilities added to the default set (`NET_ADMIN` or `CAP_NET_ADMIN`)
    #[serde(default)]
    pub cap_add: Vec<String>,
    /// capabilities dropped (`ALL` drops all)
    #[serde(default)]
    pub cap_drop: Vec<String>,
    /// privileged: all capabilities, no masked paths, writable /sys
    #[serde(default)]
    pub privileged: bool,
    /// readOnlyRootFilesystem
    #[serde(default)]
    pub readonly_rootfs: bool,
    /// allowPrivilegeEscalation=false
    #[serde(default)]
    pub no_new_privs: bool,
    /// hostname when the container has no sandbox
    #[serde(default)]
    pub hostname: Option<String>,
    /// seccomp RuntimeDefault (see [`runtime_default_seccomp`]); false is Unconfined
    #[serde(default)]
    pub seccomp_runtime_default: bool,
    /// share the host's PID namespace (hostPID)
    #[serde(default)]
    pub host_pid: bool,
    /// namespaced sysctls (`net.*`, `kernel.shm*`, ...)
    #[serde(default)]
    pub sysctls: std::collections::BTreeMap<String, String>,
    /// host devices
    #[serde(default)]
    pub devices: Vec<Device>,
    /// keep a stdin pipe open for attach clients
    #[serde(default)]
    pub stdin: bool,
    /// close stdin when the first attach client closes its side
    #[serde(default)]
    pub stdin_once: bool,
    /// give the container a pseudo-terminal (output is logged as stdout)
    #[serde(default)]
    pub tty: bool,
}

/// Syscalls the RuntimeDefault profile refuses with EPERM: kernel module, kexec, clock, swap,
/// keyring, bpf/perf, mount and namespace-changing calls. This is a deny-list (everything else
/// is allowed), narrower than Docker's allow-list profile.
pub const SECCOMP_DENIED: &[&str] = &[
    "acct",
    "add_key",
    "adjtimex",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "syslog",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vhangup",
];

/// The RuntimeDefault seccomp profile in OCI form.
pub fn runtime_default_seccomp() -> serde_json::Value {
    let arches: &[&str] = match std::env::consts::ARCH {
        "x86_64" => &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "aarch64" => &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "arm" => &["SCMP_ARCH_ARM"],
        _ => &[],
    };
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": arches,
        "syscalls": [{"names": SECCOMP_DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    })
}

fn device_entry(d: &Device) -> Result<(serde_json::Value, serde_json::Value)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = fs::metadata(&d.host_path)
        .map_err(|e| Error::Spec(format!("device {}: {e}", d.host_path.display())))?;
    let kind = if md.file_type().is_char_device() {
        "c"
    } else if md.file_type().is_block_device() {
        "b"
    } else {
        return Err(Error::Spec(format!(
            "{} is not a device node",
            d.host_path.display()
        )));
    };
    let rdev = md.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let path = d
        .container_path
        .clone()
        .unwrap_or_else(|| d.host_path.display().to_string());
    let perms = d.permissions.clone().unwrap_or_else(|| "rwm".into());
    if perms.is_empty() || !perms.chars().all(|c| "rwm".contains(c)) {
        return Err(Error::Spec(format!(
            "device {}: permissions {perms:?} must be made of r, w, m",
            d.host_path.display()
        )));
    }
    Ok((
        json!({"path": path, "type": kind, "major": major, "minor": minor, "fileMode": md.mode() & 0o777, "uid": md.uid(), "gid": md.gid()}),
        json!({"allow": true, "type": kind, "major": major, "minor": minor, "access": perms}),
    ))
}

/// The capabilities a container gets by default (the set containerd and CRI-O give).
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

fn cap_name(c: &str) -> String {
    let up = c.trim().to_ascii_uppercase();
    if up.starts_with("CAP_") {
        up
    } else {
        format!("CAP_{up}")
    }
}

/// The effective capability set for a config.
pub fn capabilities(cfg: &ContainerConfig) -> Result<Vec<String>> {
    if cfg.privileged {
        return Ok(ALL_CAPS.iter().map(|s| s.to_string()).collect());
    }
    let mut caps: Vec<String> = DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
    for d in &cfg.cap_drop {
        if d.eq_ignore_ascii_case("ALL") {
            caps.clear();
        } else {
            let n = cap_name(d);
            caps.retain(|c| *c != n);
        }
    }
    for a in &cfg.cap_add {
        let n = if a.eq_ignore_ascii_case("ALL") {
            caps = ALL_CAPS.iter().map(|s| s.to_string()).collect();
            continue;
        } else {
            cap_name(a)
        };
        if !ALL_CAPS.contains(&n.as_str()) {
            return Err(Error::Spec(format!("unknown capability {a:?} in cap_add")));
        }
        if !caps.contains(&n) {
            caps.push(n);
        }
    }
    Ok(caps)
}

/// The process argv: Kubernetes rules for command/args against entrypoint/cmd.
pub fn argv(cfg: &ContainerConfig, image: &ImageConfig) -> Result<Vec<String>> {
    let out = if cfg.command.is_empty() {
        let mut v = image.entrypoint.clone().unwrap_or_default();
        if cfg.args.is_empty() {
            v.extend(image.cmd.clone().unwrap_or_default());
        } else {
            v.extend(cfg.args.iter().cloned());
        }
        v
    } else {
        let mut v = cfg.command.clone();
        v.extend(cfg.args.iter().cloned());
        v
    };
    if out.is_empty() {
        return Err(Error::Spec(format!(
            "container {:?} has no command and its image has no entrypoint or cmd",
            cfg.name
        )));
    }
    Ok(out)
}

/// Image env, then the config's; a later variable replaces an earlier one of the same name.
pub fn environment(cfg: &ContainerConfig, image: &ImageConfig) -> Vec<String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut set = |k: String, v: String| {
        if let Some(e) = out.iter_mut().find(|(n, _)| *n == k) {
            e.1 = v;
        } else {
            out.push((k, v));
        }
    };
    for e in image.env.clone().unwrap_or_default() {
        let (k, v) = e
            .split_once('=')
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .unwrap_or((e.clone(), String::new()));
        set(k, v);
    }
    for (k, v) in &cfg.env {
        set(k.clone(), v.clone());
    }
    if !out.iter().any(|(k, _)| k == "PATH") {
        out.insert(
            0,
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
        );
    }
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// uid, gid and extra gids of the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// uid
    pub uid: u32,
    /// gid
    pub gid: u32,
    /// supplementary gids
    pub additional_gids: Vec<u32>,
}

fn read_db(rootfs: &Path, file: &str) -> Vec<Vec<String>> {
    let p = rootfs.join(file);
    // Never follow a symlink out of the rootfs.
    if fs::symlink_metadata(&p)
        .map(|m| m.file_type().is_file())
        .unwrap_or(false)
    {
        fs::read_to_string(&p)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(':').map(str::to_string).collect())
            .collect()
    } else {
        Vec::new()
    }
}

/// Resolves the user: runAsUser/runAsGroup win, else the image `User` (`name`, `uid`,
/// `name:group`, `uid:gid`), names looked up in the rootfs' /etc/passwd and /etc/group.
pub fn resolve_user(
    cfg: &ContainerConfig,
    image: &ImageConfig,
    rootfs: &Path,
) -> Result<ResolvedUser> {
    let passwd = read_db(rootfs, "etc/passwd");
    let groups = read_db(rootfs, "etc/group");
    let image_user = image.user.clone().unwrap_or_default();
    let (u, g) = match image_user.split_once(':') {
        Some((u, g)) => (u.to_string(), Some(g.to_string())),
        None => (image_user.clone(), None),
    };
    let mut username = None;
    let (uid, passwd_gid) = match cfg.run_as_user {
        Some(uid) => {
            let ent = passwd
                .iter()
                .find(|e| e.get(2).and_then(|s| s.parse().ok()) == Some(uid));
            username = ent.and_then(|e| e.first().cloned());
            (uid, ent.and_then(|e| e.get(3)?.parse().ok()))
        }
        None if u.is_empty() => (0, Some(0)),
        None => match u.parse::<u32>() {
            Ok(uid) => {
                let ent = passwd
                    .iter()
                    .find(|e| e.get(2).and_then(|s| s.parse().ok()) == Some(uid));
                username = ent.and_then(|e| e.first().cloned());
                (uid, ent.and_then(|e| e.get(3)?.parse().ok()))
            }
            Err(_) => {
                let ent = passwd
                    .iter()
                    .find(|e| e.first() == Some(&u))
                    .ok_or_else(|| {
                        Error::Spec(format!(
                            "user {u:?} of the image is not in the image's /etc/passwd"
                        ))
                    })?;
                username = Some(u.clone());
                let uid = ent
                    .get(2)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| Error::Spec(format!("bad /etc/passwd entry for {u:?}")))?;
                (uid, ent.get(3).and_then(|s| s.parse().ok()))
            }
        },
    };
    let gid = match (cfg.run_as_group, g) {
        (Some(gid), _) => gid,
        (None, Some(g)) if cfg.run_as_user.is_none() => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|e| e.first() == Some(&g))
                .and_then(|e| e.get(2)?.parse().ok())
                .ok_or_else(|| {
                    Error::Spec(format!(
                        "group {g:?} of the image is not in the image's /etc/group"
                    ))
                })?,
        },
        _ => passwd_gid.unwrap_or(0),
    };
    let mut additional_gids = cfg.supplementary_groups.clone();
    if let Some(name) = username {
        for e in &groups {
            let member = e.get(3).is_some_and(|m| m.split(',').any(|x| x == name));
            if let Some(id) = e
                .get(2)
                .and_then(|s| s.parse::<u32>().ok())
                .filter(|_| member)
                && id != gid
                && !additional_gids.contains(&id)
            {
                additional_gids.push(id);
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
    })
}

/// Namespaces and cgroup the container joins (from its sandbox).
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// pinned network namespace (None: host network)
    pub netns: Option<PathBuf>,
    /// pinned UTS namespace
    pub utsns: Option<PathBuf>,
    /// pinned IPC namespace
    pub ipcns: Option<PathBuf>,
    /// new network namespace of its own (no sandbox, no host network)
    pub private_net: bool,
    /// cgroupsPath
    pub cgroups_path: String,
    /// share the host's IPC namespace (hostIPC)
    pub host_ipc: bool,
}

/// Builds the OCI runtime spec.
pub fn build_spec(
    cfg: &ContainerConfig,
    image: &ImageConfig,
    rootfs: &Path,
    place: &Placement,
) -> Result<oci_spec::runtime::Spec> {
    let user = resolve_user(cfg, image, rootfs)?;
    let caps = capabilities(cfg)?;
    let cwd = cfg
        .working_dir
        .clone()
        .filter(|s| !s.is_empty())
        .or_else(|| image.working_dir.clone().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "/".into());
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": if cfg.privileged { json!(["nosuid", "noexec", "nodev"]) } else { json!(["nosuid", "noexec", "nodev", "ro"]) }}),
    ];
    for m in &cfg.mounts {
        if !m.destination.starts_with('/') {
            return Err(Error::Spec(format!(
                "mount destination {:?} must be absolute",
                m.destination
            )));
        }
        let mut opts = vec![];
        match m.kind {
            MountKind::Bind => {
                if !m.source.is_absolute() {
                    return Err(Error::Spec(format!(
                        "bind mount source {} must be absolute",
                        m.source.display()
                    )));
                }
                opts.push("rbind");
                opts.push("rprivate");
                opts.push(if m.readonly { "ro" } else { "rw" });
                mounts.push(json!({"destination": m.destination, "type": "bind", "source": m.source, "options": opts}));
            }
            MountKind::Tmpfs => {
                opts.extend(["nosuid", "nodev", "mode=1777"]);
                if m.readonly {
                    opts.push("ro");
                }
                mounts.push(json!({"destination": m.destination, "type": "tmpfs", "source": "tmpfs", "options": opts}));
            }
        }
    }
    let mut namespaces = vec![json!({"type": "mount"})];
    if !cfg.host_pid {
        namespaces.push(json!({"type": "pid"}));
    }
    let ns = |t: &str, p: &Option<PathBuf>| match p {
        Some(p) => json!({"type": t, "path": p}),
        None => json!({"type": t}),
    };
    if place.netns.is_some() || place.private_net {
        namespaces.push(ns("network", &place.netns));
    }
    namespaces.push(ns("uts", &place.utsns));
    if !place.host_ipc {
        namespaces.push(ns("ipc", &place.ipcns));
    }
    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if let Some(m) = cfg.resources.memory_limit {
        resources["memory"] = json!({"limit": m, "swap": m});
    }
    let r = &cfg.resources;
    if r.cpu_shares.is_some() || r.cpu_quota.is_some() {
        let mut cpu = json!({});
        if let Some(s) = r.cpu_shares {
            cpu["shares"] = json!(s);
        }
        if let Some(q) = r.cpu_quota {
            cpu["quota"] = json!(q);
            cpu["period"] = json!(r.cpu_period.unwrap_or(100_000));
        }
        resources["cpu"] = cpu;
    }
    if let Some(p) = r.pids_limit {
        resources["pids"] = json!({"limit": p});
    }
    // Allow the standard devices.
    if let Some(list) = resources["devices"].as_array_mut() {
        for (maj, min) in [
            (1, 3),
            (1, 5),
            (1, 7),
            (1, 8),
            (1, 9),
            (5, 0),
            (5, 2),
            (136, -1),
        ] {
            list.push(json!({"allow": true, "type": "c", "major": maj, "minor": if min < 0 { serde_json::Value::Null } else { json!(min) }, "access": "rwm"}));
        }
        if cfg.privileged {
            list.push(json!({"allow": true, "access": "rwm"}));
        }
    }
    let mut devices = Vec::new();
    for d in &cfg.devices {
        let (dev, rule) = device_entry(d)?;
        devices.push(dev);
        if let Some(list) = resources["devices"].as_array_mut() {
            list.push(rule);
        }
    }
    let hostname = if place.utsns.is_some() {
        None
    } else {
        cfg.hostname.clone()
    };
    let mut linux = json!({
        "namespaces": namespaces,
        "resources": resources,
        "cgroupsPath": place.cgroups_path,
    });
    if !devices.is_empty() {
        linux["devices"] = json!(devices);
    }
    if !cfg.sysctls.is_empty() {
        linux["sysctl"] = json!(cfg.sysctls);
    }
    if cfg.seccomp_runtime_default && !cfg.privileged {
        linux["seccomp"] = runtime_default_seccomp();
    }
    if !cfg.privileged {
        linux["maskedPaths"] = json!([
            "/proc/acpi",
            "/proc/asound",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/proc/scsi",
            "/sys/firmware",
            "/sys/devices/virtual/powercap"
        ]);
        linux["readonlyPaths"] = json!([
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger"
        ]);
    }
    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": cfg.tty,
            "user": {"uid": user.uid, "gid": user.gid, "additionalGids": user.additional_gids},
            "args": argv(cfg, image)?,
            "env": environment(cfg, image),
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": cfg.no_new_privs,
        },
        "root": {"path": rootfs, "readonly": cfg.readonly_rootfs},
        "mounts": mounts,
        "linux": linux,
    });
    if let Some(h) = hostname {
        spec["hostname"] = json!(h);
    }
    if user.uid != 0 && !cfg.privileged {
        // A non-root user keeps no effective/permitted caps (as runc/containerd do without ambient).
        spec["process"]["capabilities"]["effective"] = json!([]);
        spec["process"]["capabilities"]["permitted"] = json!([]);
    }
    serde_json::from_value(spec)
        .map_err(|e| Error::Spec(format!("building the oci spec for {:?}: {e}", cfg.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img() -> ImageConfig {
        ImageConfig {
            env: Some(vec!["PATH=/bin".into(), "A=1".into()]),
            entrypoint: Some(vec!["/ep".into()]),
            cmd: Some(vec!["c1".into()]),
            working_dir: Some("/w".into()),
            user: None,
        }
    }

    #[test]
    fn kubernetes_command_rules() {
        let i = img();
        let mut c = ContainerConfig::default();
        assert_eq!(argv(&c, &i).unwrap(), ["/ep", "c1"]);
        c.args = vec!["a".into()];
        assert_eq!(argv(&c, &i).unwrap(), ["/ep", "a"]);
        c.command = vec!["/x".into()];
        assert_eq!(argv(&c, &i).unwrap(), ["/x", "a"]);
        c.args.clear();
        assert_eq!(
            argv(&c, &i).unwrap(),
            ["/x"],
            "command without args drops the image cmd"
        );
        assert!(argv(&ContainerConfig::default(), &ImageConfig::default()).is_err());
    }

    #[test]
    fn env_merges_and_overrides() {
        let c = ContainerConfig {
            env: vec![("A".into(), "2".into()), ("B".into(), "3".into())],
            ..Default::default()
        };
        assert_eq!(environment(&c, &img()), ["PATH=/bin", "A=2", "B=3"]);
        assert!(
            environment(&ContainerConfig::default(), &ImageConfig::default())[0]
                .starts_with("PATH=/usr/local/sbin")
        );
    }

    #[test]
    fn caps_add_drop() {
        let mut c = ContainerConfig {
            cap_drop: vec!["net_raw".into(), "CAP_CHOWN".into()],
            cap_add: vec!["NET_ADMIN".into()],
            ..Default::default()
        };
        let caps = capabilities(&c).unwrap();
        assert!(
            !caps.contains(&"CAP_NET_RAW".to_string()) && !caps.contains(&"CAP_CHOWN".to_string())
        );
        assert!(caps.contains(&"CAP_NET_ADMIN".to_string()));
        c.cap_drop = vec!["ALL".into()];
        c.cap_add.clear();
        assert!(capabilities(&c).unwrap().is_empty());
        c.cap_add = vec!["BOGUS".into()];
        assert!(capabilities(&c).is_err());
    }

    #[test]
    fn users_from_passwd() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("etc")).unwrap();
        fs::write(t.path().join("etc/passwd"), "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\napp:x:1000:1001::/:/bin/sh\n").unwrap();
        fs::write(
            t.path().join("etc/group"),
            "root:x:0:\napp:x:1001:\nextra:x:2000:app,other\n",
        )
        .unwrap();
        let mut i = ImageConfig::default();
        let c = ContainerConfig::default();
        assert_eq!(
            resolve_user(&c, &i, t.path()).unwrap(),
            ResolvedUser {
                uid: 0,
                gid: 0,
                additional_gids: vec![]
            }
        );
        i.user = Some("app".into());
        assert_eq!(
            resolve_user(&c, &i, t.path()).unwrap(),
            ResolvedUser {
                uid: 1000,
                gid: 1001,
                additional_gids: vec![2000]
            }
        );
        i.user = Some("app:root".into());
        assert_eq!(resolve_user(&c, &i, t.path()).unwrap().gid, 0);
        i.user = Some("4242:77".into());
        assert_eq!(
            resolve_user(&c, &i, t.path()).unwrap(),
            ResolvedUser {
                uid: 4242,
                gid: 77,
                additional_gids: vec![]
            }
        );
        let mut c2 = ContainerConfig {
            run_as_user: Some(65534),
            ..Default::default()
        };
        assert_eq!(resolve_user(&c2, &i, t.path()).unwrap().gid, 65534);
        c2.run_as_group = Some(5);
        assert_eq!(resolve_user(&c2, &i, t.path()).unwrap().gid, 5);
        i.user = Some("ghost".into());
        assert!(
            resolve_user(&c, &i, t.path())
                .unwrap_err()
                .to_string()
                .contains("ghost")
        );
    }
}
