//! Reading container cgroups (OOM kills, cpu and memory stats) and removing pod cgroup dirs, on
//! cgroup v1 and v2; the root is a parameter so tests use a fake tree.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Result, io_err};

/// Which cgroup hierarchy a machine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// per-controller hierarchies (also "hybrid" machines)
    V1,
    /// the unified hierarchy
    V2,
}

/// A cgroup file system root.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    version: CgroupVersion,
}

/// Resource usage of one cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// total cpu time used, in nanoseconds
    pub cpu_usage_ns: u64,
    /// memory in use, in bytes
    pub memory_usage_bytes: u64,
    /// usage minus inactive file cache (what the kubelet reports as working set)
    pub memory_working_set_bytes: u64,
}

fn read_u64(p: &Path) -> Option<u64> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn read_key(p: &Path, key: &str) -> Option<u64> {
    let s = fs::read_to_string(p).ok()?;
    s.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        if k == key {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

impl Cgroups {
    /// The host's cgroups at `/sys/fs/cgroup`.
    pub fn host() -> Self {
        Self::detect(PathBuf::from("/sys/fs/cgroup"))
    }

    /// Detects the version of the tree at `root` (v2 has `cgroup.controllers` at its root).
    pub fn detect(root: PathBuf) -> Self {
        let version = if root.join("cgroup.controllers").exists() {
            CgroupVersion::V2
        } else {
            CgroupVersion::V1
        };
        Self { root, version }
    }

    /// The detected version.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    fn dir(&self, controller: &str, path: &str) -> PathBuf {
        let rel = path.trim_start_matches('/');
        match self.version {
            CgroupVersion::V1 => self.root.join(controller).join(rel),
            CgroupVersion::V2 => self.root.join(rel),
        }
    }

    /// How many times the kernel OOM-killed a process in the cgroup (`None` if unreadable).
    pub fn oom_kills(&self, path: &str) -> Option<u64> {
        match self.version {
            CgroupVersion::V1 => read_key(
                &self.dir("memory", path).join("memory.oom_control"),
                "oom_kill",
            ),
            CgroupVersion::V2 => read_key(&self.dir("", path).join("memory.events"), "oom_kill"),
        }
    }

    /// CPU and memory usage of the cgroup.
    pub fn stats(&self, path: &str) -> CgroupStats {
        match self.version {
            CgroupVersion::V1 => {
                let mem = self.dir("memory", path);
                let usage = read_u64(&mem.join("memory.usage_in_bytes")).unwrap_or(0);
                let inactive =
                    read_key(&mem.join("memory.stat"), "total_inactive_file").unwrap_or(0);
                CgroupStats {
                    cpu_usage_ns: read_u64(&self.dir("cpuacct", path).join("cpuacct.usage"))
                        .unwrap_or(0),
                    memory_usage_bytes: usage,
                    memory_working_set_bytes: usage.saturating_sub(inactive),
                }
            }
            CgroupVersion::V2 => {
                let d = self.dir("", path);
                let usage = read_u64(&d.join("memory.current")).unwrap_or(0);
                let inactive = read_key(&d.join("memory.stat"), "inactive_file").unwrap_or(0);
                CgroupStats {
                    cpu_usage_ns: read_key(&d.join("cpu.stat"), "usage_usec")
                        .unwrap_or(0)
                        .saturating_mul(1000),
                    memory_usage_bytes: usage,
                    memory_working_set_bytes: usage.saturating_sub(inactive),
                }
            }
        }
    }

    /// Every directory that holds `path` (one per v1 hierarchy, one on v2).
    pub fn dirs(&self, path: &str) -> Vec<PathBuf> {
        let rel = path.trim_start_matches('/');
        match self.version {
            CgroupVersion::V2 => vec![self.root.join(rel)],
            CgroupVersion::V1 => match fs::read_dir(&self.root) {
                Ok(rd) => rd
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path().join(rel))
                    .collect(),
                Err(_) => Vec::new(),
            },
        }
    }

    /// Whether `path` exists in any hierarchy.
    pub fn exists(&self, path: &str) -> bool {
        self.dirs(path).iter().any(|d| d.is_dir())
    }

    /// Removes `path` and every cgroup below it (deepest first) in all hierarchies. Cgroups
    /// still holding processes cannot be removed; the error names the dir.
    pub fn remove(&self, path: &str) -> Result<()> {
        if path.trim_matches('/').is_empty() {
            return Ok(());
        }
        for d in self.dirs(path) {
            if d.is_dir() {
                remove_tree(&d)?;
            }
        }
        Ok(())
    }
}

/// Removes a cgroup tree: cgroup dirs are removed with rmdir (their files are virtual).
fn remove_tree(dir: &Path) -> Result<()> {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path())?;
            }
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            // A fake tree (tests) has real files inside; a real cgroup dir does not.
            if fs::read_dir(dir).is_ok_and(|mut rd| {
                rd.any(|e| e.is_ok_and(|e| e.file_type().is_ok_and(|t| t.is_file())))
            }) && !dir.starts_with("/sys/fs/cgroup")
            {
                return fs::remove_dir_all(dir).map_err(io_err("remove cgroup dir", dir));
            }
            Err(io_err(
                "remove cgroup dir (are processes still in it?)",
                dir,
            )(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    #[test]
    fn v2_fake_tree() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        write(&root.join("cgroup.controllers"), "cpu memory pids\n");
        let c = root.join("skiff/pod1/ctr1");
        write(
            &c.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        );
        write(&c.join("memory.current"), "1048576\n");
        write(&c.join("memory.stat"), "anon 10\ninactive_file 4096\n");
        write(&c.join("cpu.stat"), "usage_usec 250\nuser_usec 200\n");
        let cg = Cgroups::detect(root.clone());
        assert_eq!(cg.version(), CgroupVersion::V2);
        assert_eq!(cg.oom_kills("/skiff/pod1/ctr1"), Some(1));
        let s = cg.stats("/skiff/pod1/ctr1");
        assert_eq!(
            s,
            CgroupStats {
                cpu_usage_ns: 250_000,
                memory_usage_bytes: 1_048_576,
                memory_working_set_bytes: 1_048_576 - 4096
            }
        );
        assert_eq!(cg.dirs("/skiff/pod1"), vec![root.join("skiff/pod1")]);
        assert!(cg.exists("skiff/pod1"));
        cg.remove("/skiff/pod1").unwrap();
        assert!(!cg.exists("skiff/pod1"));
        assert!(
            root.join("skiff").is_dir(),
            "only the pod subtree is removed"
        );
        assert_eq!(cg.oom_kills("/skiff/pod1/ctr1"), None);
    }

    #[test]
    fn v1_fake_tree() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        write(
            &root.join("memory/skiff/p/c/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        write(
            &root.join("memory/skiff/p/c/memory.usage_in_bytes"),
            "8192\n",
        );
        write(
            &root.join("memory/skiff/p/c/memory.stat"),
            "cache 0\ntotal_inactive_file 4096\n",
        );
        write(&root.join("cpuacct/skiff/p/c/cpuacct.usage"), "12345\n");
        fs::create_dir_all(root.join("pids/skiff/p/c")).unwrap();
        let cg = Cgroups::detect(root.clone());
        assert_eq!(cg.version(), CgroupVersion::V1);
        assert_eq!(cg.oom_kills("skiff/p/c"), Some(2));
        assert_eq!(
            cg.stats("skiff/p/c"),
            CgroupStats {
                cpu_usage_ns: 12345,
                memory_usage_bytes: 8192,
                memory_working_set_bytes: 4096
            }
        );
        assert_eq!(cg.dirs("skiff/p").len(), 3);
        cg.remove("skiff/p").unwrap();
        assert!(!cg.exists("skiff/p"));
        for c in ["memory", "cpuacct", "pids"] {
            assert!(root.join(c).join("skiff").is_dir());
        }
    }
}
