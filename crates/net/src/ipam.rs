//! Host-local IPAM: one JSON state file per pod CIDR under a state directory, guarded by an
//! exclusive `flock` on a lock file, so that allocations are safe between threads (each operation
//! opens its own file description) and between processes, and survive restarts.
//!
//! Allocation is round-robin from the last address handed out (as CNI's host-local does), so an
//! address released a moment ago is not reused at once. The network address, the gateway and the
//! broadcast address are never handed out.
//!
//! Changes are written atomically (temp file, rename) but not fsynced, as CNI's host-local does
//! not: an allocation only means something while its pod's network namespace exists, and a
//! power cut or kernel crash, the only thing that can lose a write the page cache took, ends
//! every namespace along with it. An fsync costs ~10 ms here and every pod's set-up waits for
//! the lock, so a burst of 100 pods waited a second for it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::{Ipv4Cidr, NetError};

const STATE_FILE: &str = "ipam.json";
const LOCK_FILE: &str = "ipam.lock";

/// The allocator for one pod CIDR.
#[derive(Debug, Clone)]
pub struct Ipam {
    dir: PathBuf,
    cidr: Ipv4Cidr,
    gateway: Ipv4Addr,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    cidr: String,
    #[serde(default)]
    last: Option<Ipv4Addr>,
    #[serde(default)]
    allocations: BTreeMap<String, Ipv4Addr>,
}

impl Ipam {
    /// An allocator keeping its state in `dir` (created if missing).
    pub fn new(
        dir: impl Into<PathBuf>,
        cidr: Ipv4Cidr,
        gateway: Ipv4Addr,
    ) -> Result<Ipam, NetError> {
        let dir = dir.into();
        if cidr.prefix() > 30 {
            return Err(NetError::invalid(
                cidr.to_string(),
                "a pod CIDR needs at least /30 (network, gateway, one pod, broadcast)",
            ));
        }
        if !cidr.contains(gateway) || gateway == cidr.network() || gateway == cidr.broadcast() {
            return Err(NetError::invalid(
                gateway.to_string(),
                format!("the gateway must be a host address inside {cidr}"),
            ));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| NetError::io(format!("create ipam dir {}", dir.display()), e))?;
        let ipam = Ipam { dir, cidr, gateway };
        // Refuse a state dir that belongs to another CIDR now, not at the first pod.
        ipam.locked(|_| Ok(((), false)))?;
        Ok(ipam)
    }

    /// The pod CIDR.
    pub fn cidr(&self) -> Ipv4Cidr {
        self.cidr
    }

    /// How many addresses pods can get in total.
    pub fn capacity(&self) -> usize {
        // network, broadcast and gateway are reserved
        (self.cidr.size() - 3) as usize
    }

    /// The address of `id`, allocating one if it has none (so calling it twice is harmless).
    pub fn allocate(&self, id: &str) -> Result<Ipv4Addr, NetError> {
        self.locked(|state| {
            if let Some(ip) = state.allocations.get(id) {
                return Ok((*ip, false));
            }
            let ip = self.next_free(state)?;
            state.allocations.insert(id.to_string(), ip);
            state.last = Some(ip);
            Ok((ip, true))
        })
    }

    /// Frees the address of `id`; returns it, or None when `id` had none.
    pub fn release(&self, id: &str) -> Result<Option<Ipv4Addr>, NetError> {
        self.locked(|state| {
            let ip = state.allocations.remove(id);
            let changed = ip.is_some();
            Ok((ip, changed))
        })
    }

    /// The address of `id`, if it has one.
    pub fn get(&self, id: &str) -> Result<Option<Ipv4Addr>, NetError> {
        self.locked(|state| Ok((state.allocations.get(id).copied(), false)))
    }

    /// Every allocation, by id.
    pub fn allocations(&self) -> Result<BTreeMap<String, Ipv4Addr>, NetError> {
        self.locked(|state| Ok((state.allocations.clone(), false)))
    }

    /// How many addresses are free.
    pub fn free(&self) -> Result<usize, NetError> {
        Ok(self.capacity() - self.allocations()?.len())
    }

    fn next_free(&self, state: &State) -> Result<Ipv4Addr, NetError> {
        let used: std::collections::HashSet<Ipv4Addr> =
            state.allocations.values().copied().collect();
        let size = self.cidr.size() as u32;
        let start = match state.last {
            Some(last) if self.cidr.contains(last) => {
                u32::from(last) - u32::from(self.cidr.network())
            }
            _ => 0,
        };
        for step in 1..=size {
            let n = (start + step) % size;
            let Some(ip) = self.cidr.nth(n) else { continue };
            if ip == self.cidr.network()
                || ip == self.cidr.broadcast()
                || ip == self.gateway
                || used.contains(&ip)
            {
                continue;
            }
            return Ok(ip);
        }
        Err(NetError::PoolExhausted {
            cidr: self.cidr.to_string(),
            allocated: state.allocations.len(),
        })
    }

    /// Runs `f` on the state under the lock; writes the state back when `f` says it changed.
    fn locked<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<(T, bool), NetError>,
    ) -> Result<T, NetError> {
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| NetError::io(format!("open {}", lock_path.display()), e))?;
        let _guard = Flock::lock(lock, FlockArg::LockExclusive)
            .map_err(|(_, e)| NetError::io(format!("lock {}", lock_path.display()), e))?;
        let path = self.dir.join(STATE_FILE);
        let mut state = self.load(&path)?;
        let (out, changed) = f(&mut state)?;
        if changed {
            store(&path, &state)?;
        }
        Ok(out)
    }

    fn load(&self, path: &Path) -> Result<State, NetError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State {
                    cidr: self.cidr.to_string(),
                    ..State::default()
                });
            }
            Err(e) => return Err(NetError::io(format!("read {}", path.display()), e)),
        };
        let state: State = serde_json::from_slice(&bytes).map_err(|e| NetError::State {
            path: path.to_path_buf(),
            reason: format!("not valid ipam json ({e}); move it away to start with an empty pool"),
        })?;
        if state.cidr != self.cidr.to_string() {
            return Err(NetError::State {
                path: path.to_path_buf(),
                reason: format!(
                    "it holds allocations for {} but the pod CIDR is now {}; detach every pod or use another state dir",
                    state.cidr, self.cidr
                ),
            });
        }
        Ok(state)
    }
}

/// Writes `state` to `path` atomically (temp file, rename; see the module doc on fsync).
fn store(path: &Path, state: &State) -> Result<(), NetError> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| NetError::State {
        path: path.to_path_buf(),
        reason: format!("cannot encode state: {e}"),
    })?;
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| NetError::io(format!("write {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam(dir: &Path, cidr: &str) -> Ipam {
        let cidr: Ipv4Cidr = cidr.parse().unwrap();
        Ipam::new(dir, cidr, cidr.nth(1).unwrap()).unwrap()
    }

    #[test]
    fn allocates_round_robin_and_skips_reserved() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = ipam(dir.path(), "10.42.0.0/29");
        assert_eq!(ipam.capacity(), 5);
        let a = ipam.allocate("a").unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 42, 0, 2));
        assert_eq!(ipam.allocate("a").unwrap(), a, "allocate is idempotent");
        let b = ipam.allocate("b").unwrap();
        assert_eq!(b, Ipv4Addr::new(10, 42, 0, 3));
        assert_eq!(ipam.release("a").unwrap(), Some(a));
        assert_eq!(ipam.release("a").unwrap(), None);
        // round robin: .4, not the just-released .2
        assert_eq!(ipam.allocate("c").unwrap(), Ipv4Addr::new(10, 42, 0, 4));
        for id in ["d", "e", "f"] {
            ipam.allocate(id).unwrap();
        }
        assert!(matches!(
            ipam.allocate("g"),
            Err(NetError::PoolExhausted { allocated: 5, .. })
        ));
        let all = ipam.allocations().unwrap();
        assert!(
            !all.values()
                .any(|ip| ip.octets()[3] == 0 || ip.octets()[3] == 1 || ip.octets()[3] == 7)
        );
    }

    #[test]
    fn survives_restart_and_refuses_another_cidr() {
        let dir = tempfile::tempdir().unwrap();
        let ip = ipam(dir.path(), "10.42.0.0/24").allocate("pod").unwrap();
        let again = ipam(dir.path(), "10.42.0.0/24");
        assert_eq!(again.get("pod").unwrap(), Some(ip));
        let other: Ipv4Cidr = "10.42.1.0/24".parse().unwrap();
        let err = Ipam::new(dir.path(), other, other.nth(1).unwrap()).unwrap_err();
        assert!(matches!(err, NetError::State { .. }), "{err}");
    }

    #[test]
    fn thousand_cycles_leave_the_pool_full() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = ipam(dir.path(), "10.42.0.0/24");
        for i in 0..1000 {
            let id = format!("sandbox-{i}");
            ipam.allocate(&id).unwrap();
            assert!(ipam.release(&id).unwrap().is_some());
        }
        assert_eq!(ipam.free().unwrap(), ipam.capacity());
    }

    #[test]
    fn concurrent_allocators_never_share_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let cidr: Ipv4Cidr = "10.42.0.0/24".parse().unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let dir = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    let ipam = Ipam::new(dir, cidr, cidr.nth(1).unwrap()).unwrap();
                    (0..25)
                        .map(|i| ipam.allocate(&format!("t{t}-{i}")).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut ips: Vec<Ipv4Addr> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 200);
        assert_eq!(
            ipam(dir.path(), "10.42.0.0/24")
                .allocations()
                .unwrap()
                .len(),
            200
        );
    }
}
