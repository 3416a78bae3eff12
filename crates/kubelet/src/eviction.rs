//! Node-pressure eviction and image garbage collection, as the kubelet does them.
//!
//! Every `interval` (10 s) the manager observes the eviction signals (`memory.available` from
//! /proc/meminfo's MemAvailable, `nodefs.*` from the kubelet dir's filesystem, `imagefs.*` from
//! the image store's, `pid.available`) and compares them with the hard thresholds
//! (`--kubelet-arg eviction-hard=...`; the default is k3s's `imagefs.available<5%,
//! nodefs.available<5%`, not the upstream kubelet's, which adds `memory.available<100Mi` and
//! uses 10%/15%: edge boards run with small, full SD cards). A met threshold sets the node condition
//! (MemoryPressure, DiskPressure, PIDPressure), which stays True for the pressure transition
//! period after the signal recovers. Soft thresholds (`eviction-soft`) set the condition at once
//! but evict only after they have held for their `eviction-soft-grace-period`, and then with a
//! grace period of at most `eviction-max-pod-grace-period` (0, the kubelet's default: at once).
//! Once a threshold is met it counts as met until `eviction-minimum-reclaim` more than the
//! threshold is available again. Under disk pressure unused images are deleted first; if that
//! is not enough, one pod per interval is evicted: its containers are killed without grace, its
//! sandbox and volumes are removed and it ends `Failed` with reason `Evicted`. Pods are ranked as
//! the kubelet does: pods using more than they requested first, then lower priority, then higher
//! usage (for disk: the pod's volumes, its logs and its containers' writable layers). While a
//! condition holds, new pods are rejected (`Evicted`, "The node had condition").
//!
//! Image GC: when the image filesystem is more than `image-gc-high-threshold` percent used,
//! images no container uses (and unused for `minimum-image-ttl-duration`) are deleted, least
//! recently used first, until usage is below `image-gc-low-threshold`. Pinned images (CRI's
//! `pinned`, and an external runtime's sandbox image) are never deleted. With an external CRI
//! runtime, "in use" means in use by any container or sandbox of that runtime, skiff's or not,
//! and if the runtime cannot say what is in use nothing is deleted that round. The image
//! filesystem is the one the runtime reports (CRI `ImageFsInfo`), for image GC and the
//! `imagefs.*` signals alike; without one, the configured image dir or the kubelet dir's.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use skiff_runtime::runtime::dir_bytes;
use skiff_runtime::{ImageInfo, Runtime};

use crate::server::{PodLookup, PodRef};

/// An eviction signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    /// `memory.available`
    MemoryAvailable,
    /// `nodefs.available`
    NodefsAvailable,
    /// `nodefs.inodesFree`
    NodefsInodesFree,
    /// `imagefs.available`
    ImagefsAvailable,
    /// `imagefs.inodesFree`
    ImagefsInodesFree,
    /// `pid.available`
    PidAvailable,
}

impl Signal {
    fn parse(s: &str) -> Option<Signal> {
        Some(match s {
            "memory.available" => Signal::MemoryAvailable,
            "nodefs.available" => Signal::NodefsAvailable,
            "nodefs.inodesFree" => Signal::NodefsInodesFree,
            "imagefs.available" => Signal::ImagefsAvailable,
            "imagefs.inodesFree" => Signal::ImagefsInodesFree,
            "pid.available" => Signal::PidAvailable,
            _ => return None,
        })
    }

    /// The signal's name as the kubelet spells it.
    pub fn name(self) -> &'static str {
        match self {
            Signal::MemoryAvailable => "memory.available",
            Signal::NodefsAvailable => "nodefs.available",
            Signal::NodefsInodesFree => "nodefs.inodesFree",
            Signal::ImagefsAvailable => "imagefs.available",
            Signal::ImagefsInodesFree => "imagefs.inodesFree",
            Signal::PidAvailable => "pid.available",
        }
    }

    /// The resource named in eviction messages.
    fn resource(self) -> &'static str {
        match self {
            Signal::MemoryAvailable => "memory",
            Signal::NodefsAvailable | Signal::ImagefsAvailable => "ephemeral-storage",
            Signal::NodefsInodesFree | Signal::ImagefsInodesFree => "inodes",
            Signal::PidAvailable => "pids",
        }
    }

    fn condition(self) -> Condition {
        match self {
            Signal::MemoryAvailable => Condition::Memory,
            Signal::PidAvailable => Condition::Pid,
            _ => Condition::Disk,
        }
    }
}

/// A threshold amount: an absolute quantity (bytes, inodes, pids) or a percentage of capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    /// An absolute value.
    Absolute(u64),
    /// Percent of the capacity.
    Percent(f64),
}

/// `signal < amount`.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// What is measured.
    pub signal: Signal,
    /// Below this the node is under pressure.
    pub amount: Amount,
    /// The text given (`100Mi`, `10%`), for messages.
    text: String,
    /// From `eviction-soft` (evicts only after its grace period, with pod grace).
    soft: bool,
}

impl Amount {
    /// The amount in units of the signal, for a resource of `capacity`.
    fn of(self, capacity: u64) -> u64 {
        match self {
            Amount::Absolute(v) => v,
            Amount::Percent(p) => (capacity as f64 * p / 100.0) as u64,
        }
    }
}

impl Threshold {
    fn limit(&self, capacity: u64) -> u64 {
        self.amount.of(capacity)
    }
}

/// Parses a Kubernetes quantity (`100Mi`, `1G`, `5000`) to a whole number.
pub fn parse_quantity(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        _ => return None,
    };
    (n >= 0.0).then_some((n * mult) as u64)
}

/// Parses `--eviction-hard` (`memory.available<100Mi,nodefs.available<10%`).
pub fn parse_thresholds(s: &str) -> Result<Vec<Threshold>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (sig, val) = part
            .split_once('<')
            .ok_or_else(|| format!("eviction threshold {part:?}: expected SIGNAL<QUANTITY"))?;
        let signal = Signal::parse(sig.trim()).ok_or_else(|| {
            format!(
                "eviction threshold {part:?}: unknown signal {sig:?} (memory.available, nodefs.available, nodefs.inodesFree, imagefs.available, imagefs.inodesFree, pid.available)"
            )
        })?;
        let val = val.trim();
        let amount =
            parse_amount(val).map_err(|why| format!("eviction threshold {part:?}: {why}"))?;
        out.push(Threshold {
            signal,
            amount,
            text: val.to_string(),
            soft: false,
        });
    }
    Ok(out)
}

/// Parses a `SIGNAL=VALUE` list (`eviction-soft-grace-period`, `eviction-minimum-reclaim`).
fn parse_signal_map<T>(
    flag: &str,
    s: &str,
    value: impl Fn(&str) -> Option<T>,
    what: &str,
) -> Result<HashMap<Signal, T>, String> {
    let mut out = HashMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (sig, val) = part
            .split_once('=')
            .ok_or_else(|| format!("--kubelet-arg {flag}: {part:?}: expected SIGNAL=VALUE"))?;
        let signal = Signal::parse(sig.trim())
            .ok_or_else(|| format!("--kubelet-arg {flag}: {part:?}: unknown signal {sig:?}"))?;
        let v = value(val.trim())
            .ok_or_else(|| format!("--kubelet-arg {flag}: {part:?}: {val:?} is not {what}"))?;
        out.insert(signal, v);
    }
    Ok(out)
}

/// Parses a quantity or a percentage (`500Mi`, `5%`); the error says what is wrong with it.
fn parse_amount(v: &str) -> Result<Amount, String> {
    match v.strip_suffix('%') {
        Some(p) => {
            let p: f64 = p.parse().map_err(|_| "bad percentage".to_string())?;
            if !(0.0..=100.0).contains(&p) {
                return Err("a percentage is 0..100".into());
            }
            Ok(Amount::Percent(p))
        }
        None => parse_quantity(v)
            .map(Amount::Absolute)
            .ok_or_else(|| format!("bad quantity {v:?}")),
    }
}

/// Parses a Go duration (`5m`, `2m30s`, `0s`, `500ms`, `1h`).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let n_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        if n_end == 0 {
            return None;
        }
        let n: f64 = rest[..n_end].parse().ok()?;
        rest = &rest[n_end..];
        let u_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..u_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += Duration::from_secs_f64(n * secs);
        rest = &rest[u_end..];
    }
    Some(total)
}

/// Eviction and image GC settings (kubelet flags of the same names).
#[derive(Debug, Clone)]
pub struct EvictionConfig {
    /// `--eviction-hard`.
    pub hard: Vec<Threshold>,
    /// `--eviction-soft` (none by default).
    pub soft: Vec<Threshold>,
    /// `--eviction-soft-grace-period`: how long a soft threshold must hold before eviction.
    pub soft_grace: HashMap<Signal, Duration>,
    /// `--eviction-max-pod-grace-period`: the most grace a pod gets in a soft eviction (it caps
    /// the pod's terminationGracePeriodSeconds; 0, the default, stops it at once).
    pub max_pod_grace: Duration,
    /// `--eviction-minimum-reclaim`: how much above its threshold a signal must come back
    /// before the threshold counts as resolved.
    pub min_reclaim: HashMap<Signal, Amount>,
    /// `--eviction-pressure-transition-period` (5 min).
    pub pressure_transition: Duration,
    /// How often signals are observed (10 s).
    pub interval: Duration,
    /// `--image-gc-high-threshold` (85).
    pub image_gc_high: u8,
    /// `--image-gc-low-threshold` (80).
    pub image_gc_low: u8,
    /// `--minimum-image-ttl-duration` (2 min).
    pub image_min_age: Duration,
    /// How often image GC checks the image filesystem (1 min; the kubelet's is 5 min).
    pub image_gc_interval: Duration,
    /// Where images live (imagefs); None: the kubelet dir's filesystem.
    pub image_fs: Option<PathBuf>,
}

impl Default for EvictionConfig {
    fn default() -> Self {
        EvictionConfig {
            hard: parse_thresholds("imagefs.available<5%,nodefs.available<5%").unwrap_or_default(),
            soft: Vec::new(),
            soft_grace: HashMap::new(),
            max_pod_grace: Duration::ZERO,
            min_reclaim: HashMap::new(),
            pressure_transition: Duration::from_secs(300),
            interval: Duration::from_secs(10),
            image_gc_high: 85,
            image_gc_low: 80,
            image_min_age: Duration::from_secs(120),
            image_gc_interval: Duration::from_secs(60),
            image_fs: None,
        }
    }
}

impl EvictionConfig {
    /// Applies one `--kubelet-arg name=value` (the kubelet flags skiff understands).
    pub fn apply_kubelet_arg(&mut self, arg: &str) -> Result<(), String> {
        let arg = arg.trim().trim_start_matches("--");
        let (name, value) = arg
            .split_once('=')
            .ok_or_else(|| format!("--kubelet-arg {arg:?}: expected name=value"))?;
        let pct = |v: &str| -> Result<u8, String> {
            v.parse::<u8>()
                .ok()
                .filter(|p| *p <= 100)
                .ok_or_else(|| format!("--kubelet-arg {name}: {v:?} is not a percentage 0..100"))
        };
        let dur = |v: &str| -> Result<Duration, String> {
            parse_go_duration(v).ok_or_else(|| {
                format!("--kubelet-arg {name}: {v:?} is not a duration like 5m or 30s")
            })
        };
        match name {
            "eviction-hard" => self.hard = parse_thresholds(value)?,
            "eviction-soft" => {
                self.soft = parse_thresholds(value)?;
                for t in &mut self.soft {
                    t.soft = true;
                }
            }
            "eviction-soft-grace-period" => {
                self.soft_grace =
                    parse_signal_map(name, value, parse_go_duration, "a duration like 1m30s")?;
            }
            "eviction-max-pod-grace-period" => {
                let secs: i64 = value.parse().map_err(|_| {
                    format!("--kubelet-arg {name}: {value:?} is not a number of seconds")
                })?;
                self.max_pod_grace = Duration::from_secs(secs.max(0) as u64);
            }
            "eviction-minimum-reclaim" => {
                self.min_reclaim = parse_signal_map(
                    name,
                    value,
                    |v| parse_amount(v).ok(),
                    "a quantity or a percentage",
                )?;
            }
            "eviction-pressure-transition-period" => self.pressure_transition = dur(value)?,
            "image-gc-high-threshold" => self.image_gc_high = pct(value)?,
            "image-gc-low-threshold" => self.image_gc_low = pct(value)?,
            "minimum-image-ttl-duration" => self.image_min_age = dur(value)?,
            "housekeeping-interval" => {
                self.interval = dur(value)?.max(Duration::from_secs(1));
            }
            _ => {
                return Err(format!(
                    "--kubelet-arg {name}: not supported by skiff (supported: eviction-hard, eviction-soft, eviction-soft-grace-period, eviction-max-pod-grace-period, eviction-minimum-reclaim, eviction-pressure-transition-period, image-gc-high-threshold, image-gc-low-threshold, minimum-image-ttl-duration, housekeeping-interval)"
                ));
            }
        }
        if self.image_gc_low > self.image_gc_high {
            return Err(format!(
                "--kubelet-arg: image-gc-low-threshold ({}) must not be above image-gc-high-threshold ({})",
                self.image_gc_low, self.image_gc_high
            ));
        }
        Ok(())
    }

    /// Checks the settings as a whole, after every `--kubelet-arg` was applied (the kubelet
    /// refuses a soft threshold without a grace period).
    pub fn validate(&self) -> Result<(), String> {
        for t in &self.soft {
            if !self.soft_grace.contains_key(&t.signal) {
                return Err(format!(
                    "--kubelet-arg eviction-soft: grace period must be specified for the soft eviction threshold {} (add it to eviction-soft-grace-period, e.g. {}=1m30s)",
                    t.signal.name(),
                    t.signal.name()
                ));
            }
        }
        Ok(())
    }
}

/// Node conditions driven by eviction signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Condition {
    /// MemoryPressure
    Memory,
    /// DiskPressure
    Disk,
    /// PIDPressure
    Pid,
}

impl Condition {
    /// The node condition type.
    pub fn type_name(self) -> &'static str {
        match self {
            Condition::Memory => "MemoryPressure",
            Condition::Disk => "DiskPressure",
            Condition::Pid => "PIDPressure",
        }
    }
}

/// Which pressure conditions hold now (read by the node status and pod admission).
#[derive(Debug, Default)]
pub struct Pressure {
    /// Condition → when a threshold was last seen met.
    last_met: HashMap<Condition, Instant>,
    transition: Duration,
}

impl Pressure {
    /// Whether `c` holds (a threshold met within the transition period).
    pub fn holds(&self, c: Condition) -> bool {
        self.last_met
            .get(&c)
            .is_some_and(|t| t.elapsed() <= self.transition)
    }
}

/// Shared pressure state.
pub type SharedPressure = Arc<RwLock<Pressure>>;

/// What the eviction manager asks of one pod's worker.
#[derive(Debug, Clone, PartialEq)]
pub struct EvictionRequest {
    /// The pod's status message (and the Evicted event's).
    pub message: String,
    /// How long its containers get to stop (zero for hard thresholds).
    pub grace: Duration,
}

/// Pod uid → eviction request, taken by the pod's worker.
pub type EvictionRequests = Arc<Mutex<HashMap<String, EvictionRequest>>>;

/// Why a new pod may not start here now (the kubelet's eviction admission): under memory
/// pressure BestEffort pods are refused, under disk or PID pressure every pod is.
pub fn admission_refusal(pressure: &SharedPressure, pod: &Pod) -> Option<String> {
    let p = pressure.read().ok()?;
    let best_effort =
        pod.status.as_ref().and_then(|s| s.qos_class.as_deref()) == Some("BestEffort");
    let mut held = Vec::new();
    if p.holds(Condition::Memory) && best_effort {
        held.push("MemoryPressure");
    }
    if p.holds(Condition::Disk) {
        held.push("DiskPressure");
    }
    if p.holds(Condition::Pid) {
        held.push("PIDPressure");
    }
    if held.is_empty() || is_critical(pod) {
        return None;
    }
    Some(format!("The node had condition: [{}]. ", held.join(", ")))
}

/// System-critical pods (priority ≥ 2,000,000,000) are never evicted or refused.
fn is_critical(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.priority)
        .is_some_and(|p| p >= 2_000_000_000)
}

/// One observation: what is available and the capacity it is a part of.
#[derive(Debug, Clone, Copy)]
struct Observed {
    available: u64,
    capacity: u64,
}

fn meminfo() -> Option<Observed> {
    use crate::node::meminfo_kib;
    Some(Observed {
        available: meminfo_kib("MemAvailable:")? * 1024,
        capacity: meminfo_kib("MemTotal:")? * 1024,
    })
}

fn fs(path: &Path, inodes: bool) -> Option<Observed> {
    if inodes {
        let st = nix::sys::statvfs::statvfs(path).ok()?;
        return Some(Observed {
            available: st.files_available() as u64,
            capacity: st.files() as u64,
        });
    }
    let (capacity, available) = crate::node::disk_bytes(path)?;
    Some(Observed {
        available,
        capacity,
    })
}

fn pids() -> Option<Observed> {
    let max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // The fourth field of loadavg is `running/total` scheduling entities.
    let la = std::fs::read_to_string("/proc/loadavg").ok()?;
    let total: u64 = la
        .split_whitespace()
        .nth(3)?
        .split_once('/')?
        .1
        .parse()
        .ok()?;
    Some(Observed {
        available: max.saturating_sub(total),
        capacity: max,
    })
}

fn observe(signal: Signal, root: &Path, image_fs: &Path) -> Option<Observed> {
    match signal {
        Signal::MemoryAvailable => meminfo(),
        Signal::NodefsAvailable => fs(root, false),
        Signal::NodefsInodesFree => fs(root, true),
        Signal::ImagefsAvailable => fs(image_fs, false),
        Signal::ImagefsInodesFree => fs(image_fs, true),
        Signal::PidAvailable => pids(),
    }
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1}Gi", bytes as f64 / (1u64 << 30) as f64)
    } else if bytes >= 1 << 20 {
        format!("{}Mi", bytes >> 20)
    } else {
        format!("{}Ki", bytes >> 10)
    }
}

/// A threshold that is met now, with what was observed.
#[derive(Debug, Clone)]
struct Met {
    threshold: Threshold,
    observed: Observed,
}

impl Met {
    fn available_text(&self) -> String {
        match self.threshold.signal {
            Signal::MemoryAvailable | Signal::NodefsAvailable | Signal::ImagefsAvailable => {
                human(self.observed.available)
            }
            _ => self.observed.available.to_string(),
        }
    }
}

/// A pod as the ranking sees it.
#[derive(Debug, Clone)]
struct Candidate {
    uid: String,
    key: String,
    priority: i32,
    exceeds_request: bool,
    usage: u64,
    detail: String,
    /// The pod's terminationGracePeriodSeconds (30 if unset).
    grace_secs: u64,
}

/// Orders candidates the way the kubelet does: over their request first, then lower priority,
/// then higher usage.
fn rank(mut c: Vec<Candidate>) -> Vec<Candidate> {
    c.sort_by(|a, b| {
        b.exceeds_request
            .cmp(&a.exceeds_request)
            .then(a.priority.cmp(&b.priority))
            .then(b.usage.cmp(&a.usage))
            .then(a.key.cmp(&b.key))
    });
    c
}

fn request_of(pod: &Pod, resource: &str) -> u64 {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .filter_map(|c| c.resources.as_ref()?.requests.as_ref()?.get(resource))
        .filter_map(|q| parse_quantity(&q.0))
        .sum()
}

/// The thresholds met by the observations (hard first, then soft), each with its index in
/// hard ++ soft. A threshold met at the last observation (`first_met`) stays met until its
/// minimum reclaim is available too.
fn thresholds_met(
    cfg: &EvictionConfig,
    first_met: &HashMap<usize, Instant>,
    observe: impl Fn(Signal) -> Option<Observed>,
) -> Vec<(usize, Met)> {
    cfg.hard
        .iter()
        .chain(&cfg.soft)
        .enumerate()
        .filter_map(|(i, t)| {
            let o = observe(t.signal)?;
            let mut limit = t.limit(o.capacity);
            if first_met.contains_key(&i)
                && let Some(r) = cfg.min_reclaim.get(&t.signal)
            {
                limit = limit.saturating_add(r.of(o.capacity));
            }
            (o.available < limit).then(|| {
                (
                    i,
                    Met {
                        threshold: t.clone(),
                        observed: o,
                    },
                )
            })
        })
        .collect()
}

/// Of the thresholds met now, those that may evict: hard ones, and soft ones that have held
/// for their grace period.
fn thresholds_due(
    cfg: &EvictionConfig,
    first_met: &HashMap<usize, Instant>,
    met: Vec<(usize, Met)>,
    now: Instant,
) -> Vec<Met> {
    met.into_iter()
        .filter(|(i, m)| {
            !m.threshold.soft || {
                let grace = cfg
                    .soft_grace
                    .get(&m.threshold.signal)
                    .copied()
                    .unwrap_or_default();
                first_met
                    .get(i)
                    .is_some_and(|t| now.saturating_duration_since(*t) >= grace)
            }
        })
        .map(|(_, m)| m)
        .collect()
}

/// The images image GC may delete, least recently used first: not pinned, not in use (by id
/// or by any of its names), and not used for at least `min_age`. `last_used` (image id → when
/// last seen in use, or first seen) is brought up to date and forgets images that are gone.
fn collectible(
    images: &[ImageInfo],
    in_use: &HashSet<String>,
    last_used: &mut HashMap<String, Instant>,
    now: Instant,
    min_age: Duration,
) -> Vec<ImageInfo> {
    let mut unused = Vec::new();
    for img in images {
        let used =
            img.pinned || in_use.contains(&img.id) || img.names.iter().any(|n| in_use.contains(n));
        let seen = last_used.entry(img.id.clone()).or_insert(now);
        if used {
            *seen = now;
        } else if now.saturating_duration_since(*seen) >= min_age {
            unused.push((*seen, img));
        }
    }
    last_used.retain(|id, _| images.iter().any(|i| &i.id == id));
    unused.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.id.cmp(&b.1.id)));
    unused.into_iter().map(|(_, i)| i.clone()).collect()
}

/// The eviction manager and image garbage collector of one node.
pub struct Manager {
    cfg: EvictionConfig,
    root: PathBuf,
    runtime: Arc<dyn Runtime>,
    pods: Arc<dyn PodLookup>,
    pressure: SharedPressure,
    requests: EvictionRequests,
    /// Image id → when it was last seen in use (or first seen).
    image_seen: HashMap<String, Instant>,
    /// The image filesystem the runtime reported at the last tick (CRI `ImageFsInfo`).
    runtime_image_fs: Option<PathBuf>,
    last_image_gc: Option<Instant>,
    /// Pods asked to go and when: one eviction per interval, no repeats while one is pending.
    pending: HashMap<String, Instant>,
    /// "Nothing to evict" was logged for this pressure episode.
    said_nothing_to_evict: bool,
    /// Thresholds met at the last observation (index into hard ++ soft) and since when: they
    /// stay met until the minimum reclaim is available, and soft ones evict after their grace.
    first_met: HashMap<usize, Instant>,
}

impl Manager {
    /// A manager for the kubelet dir `root`.
    pub fn new(
        cfg: EvictionConfig,
        root: PathBuf,
        runtime: Arc<dyn Runtime>,
        pods: Arc<dyn PodLookup>,
        pressure: SharedPressure,
        requests: EvictionRequests,
    ) -> Manager {
        if let Ok(mut p) = pressure.write() {
            p.transition = cfg.pressure_transition;
        }
        Manager {
            cfg,
            root,
            runtime,
            pods,
            pressure,
            requests,
            image_seen: HashMap::new(),
            runtime_image_fs: None,
            last_image_gc: None,
            pending: HashMap::new(),
            said_nothing_to_evict: false,
            first_met: HashMap::new(),
        }
    }

    /// Where images live: the runtime's image filesystem if it reports one, else the
    /// configured image dir, else the kubelet dir.
    fn image_fs(&self) -> PathBuf {
        self.runtime_image_fs
            .clone()
            .or_else(|| self.cfg.image_fs.clone())
            .unwrap_or_else(|| self.root.clone())
    }

    /// Asks the runtime where its images are (kept from the last answer if it fails).
    async fn refresh_image_fs(&mut self) {
        match self.runtime.image_fs().await {
            Ok(fs) => {
                let path = fs.map(|f| f.mountpoint);
                if path != self.runtime_image_fs {
                    tracing::info!(path = ?path, "image filesystem of the runtime");
                }
                self.runtime_image_fs = path;
            }
            Err(e) => tracing::debug!(error = %e, "runtime did not report its image filesystem"),
        }
    }

    /// The thresholds met now (see `thresholds_met`).
    fn met(&self) -> Vec<(usize, Met)> {
        let image_fs = self.image_fs();
        thresholds_met(&self.cfg, &self.first_met, |s| {
            observe(s, &self.root, &image_fs)
        })
    }

    /// Of the thresholds met now, those that may evict (see `thresholds_due`).
    fn due(&self, met: Vec<(usize, Met)>, now: Instant) -> Vec<Met> {
        thresholds_due(&self.cfg, &self.first_met, met, now)
    }

    /// Runs until `stop` turns true.
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            self.tick().await;
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(self.cfg.interval) => {}
            }
        }
    }

    /// One observation round.
    pub async fn tick(&mut self) {
        self.refresh_image_fs().await;
        let now = Instant::now();
        let met = self.met();
        self.first_met
            .retain(|i, _| met.iter().any(|(j, _)| j == i));
        for (i, _) in &met {
            self.first_met.entry(*i).or_insert(now);
        }
        if let Ok(mut p) = self.pressure.write() {
            for (_, m) in &met {
                let c = m.threshold.signal.condition();
                if !p.holds(c) {
                    tracing::warn!(
                        condition = c.type_name(),
                        signal = m.threshold.signal.name(),
                        threshold = %m.threshold.text,
                        available = %m.available_text(),
                        "eviction threshold met"
                    );
                }
                p.last_met.insert(c, now);
            }
        }
        let due = self
            .last_image_gc
            .is_none_or(|t| t.elapsed() >= self.cfg.image_gc_interval);
        let disk = met
            .iter()
            .any(|(_, m)| m.threshold.signal.condition() == Condition::Disk);
        if due || disk {
            self.last_image_gc = Some(Instant::now());
            self.image_gc(disk).await;
        }
        // Evicted pods that left the registry are done.
        self.pending
            .retain(|_, t| t.elapsed() < Duration::from_secs(60));
        if met.is_empty() {
            self.said_nothing_to_evict = false;
        }
        if met.is_empty() || !self.pending.is_empty() {
            return;
        }
        // Reclaim may have been enough.
        let met = if disk { self.met() } else { met };
        let due = self.due(met, now);
        let Some(first) = due.first() else { return };
        self.evict_one(first).await;
    }

    /// Deletes unused images: all of them under disk pressure, else while usage is above the
    /// high threshold, down to the low one. Least recently used first; never pinned images,
    /// and nothing at all when the runtime cannot list its images or what is in use.
    async fn image_gc(&mut self, all: bool) {
        let image_fs = self.image_fs();
        let Some(o) = fs(&image_fs, false) else {
            tracing::debug!(path = %image_fs.display(), "image filesystem not found: no image gc");
            return;
        };
        let used_pct = |o: &Observed| {
            if o.capacity == 0 {
                0.0
            } else {
                100.0 * (o.capacity - o.available.min(o.capacity)) as f64 / o.capacity as f64
            }
        };
        // Images first, then what is in use: an image that appears in between is not listed,
        // so it cannot be chosen.
        let images = match self.runtime.list_images().await {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list images: no image gc this round");
                return;
            }
        };
        let in_use = match self.runtime.images_in_use().await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "cannot tell which images are in use: no image gc this round");
                return;
            }
        };
        let chosen = collectible(
            &images,
            &in_use,
            &mut self.image_seen,
            Instant::now(),
            self.cfg.image_min_age,
        );
        let high = f64::from(self.cfg.image_gc_high);
        if !all && used_pct(&o) <= high {
            return;
        }
        let low = f64::from(self.cfg.image_gc_low);
        for img in chosen {
            if !all && fs(&image_fs, false).is_some_and(|o| used_pct(&o) < low) {
                break;
            }
            let name = img.names.first().cloned().unwrap_or_default();
            match self.runtime.collect_image(&img).await {
                Ok(removed) => {
                    if removed {
                        tracing::info!(image = %name, id = %img.id, size = img.size, disk_pressure = all, "image garbage collected");
                    }
                    self.image_seen.remove(&img.id);
                }
                Err(e) => {
                    tracing::debug!(image = %name, id = %img.id, error = %e, "image not collected")
                }
            }
        }
    }

    async fn candidates(&self, signal: Signal) -> Vec<Candidate> {
        let mut out = Vec::new();
        for r in self.pods.pods() {
            let pod = &r.pod;
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded" | "Failed"))
                || pod.metadata.deletion_timestamp.is_some()
                || is_critical(pod)
                || r.sandbox_id.is_none()
            {
                continue;
            }
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            let (usage, request, detail) = self.usage(&r, signal).await;
            out.push(Candidate {
                uid,
                key: format!(
                    "{}/{}",
                    pod.metadata.namespace.as_deref().unwrap_or(""),
                    pod.metadata.name.as_deref().unwrap_or("")
                ),
                priority: pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0),
                exceeds_request: usage > request,
                usage,
                detail,
                grace_secs: pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
                    .unwrap_or(30)
                    .max(0) as u64,
            });
        }
        rank(out)
    }

    /// The pod's use of the signal's resource, its request, and the per-container detail of the
    /// eviction message.
    async fn usage(&self, r: &PodRef, signal: Signal) -> (u64, u64, String) {
        match signal.condition() {
            Condition::Memory => {
                let mut total = 0;
                let mut detail = Vec::new();
                let spec = r.pod.spec.as_ref();
                for c in &r.containers {
                    let Some(id) = &c.id else { continue };
                    let used = self
                        .runtime
                        .container_stats(id)
                        .await
                        .map(|s| s.memory_working_set_bytes)
                        .unwrap_or(0);
                    total += used;
                    let req = spec
                        .and_then(|s| s.containers.iter().find(|x| x.name == c.name))
                        .and_then(|x| x.resources.as_ref()?.requests.as_ref()?.get("memory"))
                        .map_or("0".to_string(), |q| q.0.clone());
                    detail.push(format!(
                        "Container {} was using {}, request is {req}.",
                        c.name,
                        human(used)
                    ));
                }
                (total, request_of(&r.pod, "memory"), detail.join(" "))
            }
            Condition::Disk => {
                let uid = r.pod.metadata.uid.clone().unwrap_or_default();
                let pod_dir = self.root.join("pods").join(&uid);
                let logs = self.root.join("logs");
                let ns = r.pod.metadata.namespace.clone().unwrap_or_default();
                let name = r.pod.metadata.name.clone().unwrap_or_default();
                let mut used = tokio::task::spawn_blocking(move || {
                    // Mounts under the pod dir (memory-backed emptyDirs) count too, as the
                    // kubelet counts them against the pod.
                    dir_bytes(&pod_dir) + dir_bytes(&logs.join(format!("{ns}_{name}_{uid}")))
                })
                .await
                .unwrap_or(0);
                // What the containers wrote into their root filesystems counts too.
                for c in &r.containers {
                    if let Some(id) = &c.id
                        && let Ok(Some(b)) = self.runtime.writable_layer_bytes(id).await
                    {
                        used += b;
                    }
                }
                (
                    used,
                    request_of(&r.pod, "ephemeral-storage"),
                    format!("Pod was using {} of local storage.", human(used)),
                )
            }
            Condition::Pid => (0, 0, String::new()),
        }
    }

    async fn evict_one(&mut self, met: &Met) {
        let signal = met.threshold.signal;
        let ranked = self.candidates(signal).await;
        let Some(victim) = ranked.into_iter().next() else {
            if !self.said_nothing_to_evict {
                tracing::warn!(
                    signal = signal.name(),
                    "under pressure but no pod can be evicted"
                );
                self.said_nothing_to_evict = true;
            }
            return;
        };
        let message = format!(
            "The node was low on resource: {}. Threshold quantity: {}, available: {}. {}",
            signal.resource(),
            met.threshold.text,
            met.available_text(),
            victim.detail
        )
        .trim_end()
        .to_string();
        // Hard thresholds kill at once; soft ones give the pod's own grace period, capped by
        // eviction-max-pod-grace-period.
        let grace = if met.threshold.soft {
            Duration::from_secs(victim.grace_secs).min(self.cfg.max_pod_grace)
        } else {
            Duration::ZERO
        };
        tracing::warn!(pod = %victim.key, signal = signal.name(), usage = victim.usage, soft = met.threshold.soft, grace_secs = grace.as_secs(), "evicting pod");
        self.pending.insert(victim.uid.clone(), Instant::now());
        if let Ok(mut m) = self.requests.lock() {
            m.insert(victim.uid, EvictionRequest { message, grace });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_like_the_kubelet_flag() {
        let t = parse_thresholds("memory.available<100Mi, nodefs.available<10%").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].signal, Signal::MemoryAvailable);
        assert_eq!(t[0].amount, Amount::Absolute(100 << 20));
        assert_eq!(t[1].amount, Amount::Percent(10.0));
        assert_eq!(t[1].limit(1000), 100);
        assert!(parse_thresholds("memory.free<1Gi").is_err());
        assert!(parse_thresholds("memory.available>1Gi").is_err());
        assert!(parse_thresholds("nodefs.available<120%").is_err());
        assert!(parse_thresholds("nodefs.available<lots").is_err());
        assert_eq!(parse_quantity("1G"), Some(1_000_000_000));
        assert_eq!(parse_quantity("1.5Ki"), Some(1536));
    }

    #[test]
    fn kubelet_args_set_gc_and_eviction() {
        let mut c = EvictionConfig::default();
        assert_eq!(c.hard.len(), 2);
        c.apply_kubelet_arg("eviction-hard=nodefs.available<50%")
            .unwrap();
        assert_eq!(c.hard.len(), 1);
        c.apply_kubelet_arg("image-gc-low-threshold=1").unwrap();
        c.apply_kubelet_arg("image-gc-high-threshold=2").unwrap();
        c.apply_kubelet_arg("minimum-image-ttl-duration=1m30s")
            .unwrap();
        assert_eq!(c.image_min_age, Duration::from_secs(90));
        c.apply_kubelet_arg("--eviction-pressure-transition-period=0s")
            .unwrap();
        assert_eq!(c.pressure_transition, Duration::ZERO);
        assert!(c.apply_kubelet_arg("image-gc-low-threshold=50").is_err());
        let e = c.apply_kubelet_arg("max-pods=200").unwrap_err();
        assert!(e.contains("not supported"), "{e}");
        assert!(c.apply_kubelet_arg("eviction-hard").is_err());
    }

    #[test]
    fn soft_thresholds_need_a_grace_period_and_parse_like_the_kubelet_flags() {
        let mut c = EvictionConfig::default();
        c.apply_kubelet_arg("eviction-soft=memory.available<1Gi,nodefs.available<15%")
            .unwrap();
        assert!(c.soft.iter().all(|t| t.soft));
        let e = c.validate().unwrap_err();
        assert!(e.contains("grace period must be specified"), "{e}");
        c.apply_kubelet_arg(
            "eviction-soft-grace-period=memory.available=1m30s,nodefs.available=2m",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.soft_grace.get(&Signal::MemoryAvailable),
            Some(&Duration::from_secs(90))
        );
        c.apply_kubelet_arg("eviction-max-pod-grace-period=60")
            .unwrap();
        assert_eq!(c.max_pod_grace, Duration::from_secs(60));
        c.apply_kubelet_arg("eviction-minimum-reclaim=memory.available=0Mi,nodefs.available=5%")
            .unwrap();
        assert_eq!(
            c.min_reclaim.get(&Signal::NodefsAvailable),
            Some(&Amount::Percent(5.0))
        );
        assert!(
            c.apply_kubelet_arg("eviction-soft-grace-period=memory.available=soon")
                .is_err()
        );
        assert!(
            c.apply_kubelet_arg("eviction-minimum-reclaim=disk=1Gi")
                .is_err()
        );
        assert!(
            c.apply_kubelet_arg("eviction-max-pod-grace-period=1m")
                .is_err()
        );
    }

    fn observed(available: u64) -> impl Fn(Signal) -> Option<Observed> {
        move |_| {
            Some(Observed {
                available,
                capacity: 1000,
            })
        }
    }

    #[test]
    fn soft_thresholds_set_pressure_at_once_but_evict_after_their_grace_period() {
        let mut c = EvictionConfig {
            hard: parse_thresholds("nodefs.available<5%").unwrap(),
            ..Default::default()
        };
        c.apply_kubelet_arg("eviction-soft=nodefs.available<20%")
            .unwrap();
        c.apply_kubelet_arg("eviction-soft-grace-period=nodefs.available=30s")
            .unwrap();
        let none = HashMap::new();
        // 10% free: the soft threshold (index 1) is met, the hard one is not.
        let met = thresholds_met(&c, &none, observed(100));
        assert_eq!(met.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1]);
        let now = Instant::now();
        let since = |ago: u64| HashMap::from([(1, now - Duration::from_secs(ago))]);
        assert!(thresholds_due(&c, &since(10), met.clone(), now).is_empty());
        let due = thresholds_due(&c, &since(31), met, now);
        assert_eq!(due.len(), 1);
        assert!(due[0].threshold.soft);
        // 1% free: the hard threshold evicts at once.
        let met = thresholds_met(&c, &none, observed(10));
        let due = thresholds_due(&c, &none, met, now);
        assert!(!due.is_empty() && !due[0].threshold.soft);
    }

    #[test]
    fn a_met_threshold_stays_met_until_the_minimum_reclaim_is_available() {
        let mut c = EvictionConfig {
            hard: parse_thresholds("nodefs.available<10%").unwrap(),
            ..Default::default()
        };
        c.apply_kubelet_arg("eviction-minimum-reclaim=nodefs.available=5%")
            .unwrap();
        let was_met = HashMap::from([(0, Instant::now())]);
        // 12% free: above the threshold, but not above threshold + reclaim (15%).
        assert!(thresholds_met(&c, &HashMap::new(), observed(120)).is_empty());
        assert_eq!(thresholds_met(&c, &was_met, observed(120)).len(), 1);
        assert!(thresholds_met(&c, &was_met, observed(160)).is_empty());
    }

    fn image(id: &str, names: &[&str], pinned: bool) -> ImageInfo {
        ImageInfo {
            id: id.into(),
            names: names.iter().map(|n| n.to_string()).collect(),
            size: 1,
            pinned,
        }
    }

    fn ids(images: &[ImageInfo]) -> Vec<&str> {
        images.iter().map(|i| i.id.as_str()).collect()
    }

    #[test]
    fn image_gc_chooses_unused_unpinned_images_old_enough_least_recently_used_first() {
        let images = vec![
            image("sha256:a", &["example.com/a:1"], false),
            image("sha256:b", &["example.com/b:1"], false),
            image("sha256:p", &["example.com/pause:3"], true),
            image("sha256:c", &[], false),
            image("sha256:d", &["example.com/d:1"], false),
        ];
        // a is in use by name, d by id; p is pinned.
        let in_use: HashSet<String> = ["example.com/a:1", "sha256:d", "example.com/x@sha256:1"]
            .into_iter()
            .map(String::from)
            .collect();
        let now = Instant::now();
        let mut last_used = HashMap::from([
            ("sha256:c".to_string(), now - Duration::from_secs(300)),
            ("sha256:gone".to_string(), now - Duration::from_secs(300)),
        ]);
        let min_age = Duration::from_secs(120);
        // b is seen for the first time: too young; c has not been used for 5 minutes.
        let chosen = collectible(&images, &in_use, &mut last_used, now, min_age);
        assert_eq!(ids(&chosen), ["sha256:c"]);
        assert!(!last_used.contains_key("sha256:gone"));
        assert_eq!(last_used.get("sha256:a"), Some(&now));
        // Three minutes on, b is old enough too; c (older) comes first.
        let later = now + Duration::from_secs(180);
        let chosen = collectible(&images, &in_use, &mut last_used, later, min_age);
        assert_eq!(ids(&chosen), ["sha256:c", "sha256:b"]);
        // With no minimum age, everything unused and unpinned goes; nothing in use or pinned.
        let chosen = collectible(&images, &in_use, &mut HashMap::new(), now, Duration::ZERO);
        assert_eq!(ids(&chosen), ["sha256:b", "sha256:c"]);
        // An image last used a minute ago is not taken.
        let mut recent = HashMap::from([("sha256:b".to_string(), now - Duration::from_secs(60))]);
        let chosen = collectible(&images[1..2], &HashSet::new(), &mut recent, now, min_age);
        assert!(chosen.is_empty());
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("m"), None);
    }

    #[test]
    fn ranking_puts_over_request_then_low_priority_then_big_users_first() {
        let c = |key: &str, priority, exceeds_request, usage| Candidate {
            uid: key.into(),
            key: key.into(),
            priority,
            exceeds_request,
            usage,
            detail: String::new(),
            grace_secs: 30,
        };
        let ranked = rank(vec![
            c("a", 0, false, 900),
            c("b", 100, true, 10),
            c("c", 0, true, 5),
            c("d", 0, true, 50),
        ]);
        let keys: Vec<&str> = ranked.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["d", "c", "b", "a"]);
    }

    #[test]
    fn admission_refuses_under_pressure_except_critical_and_non_best_effort_for_memory() {
        let pressure: SharedPressure = Arc::default();
        let pod = |qos: &str, priority: i32| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p"},
                "spec": {"containers": [], "priority": priority},
                "status": {"qosClass": qos}
            }))
            .unwrap()
        };
        assert_eq!(admission_refusal(&pressure, &pod("BestEffort", 0)), None);
        {
            let mut p = pressure.write().unwrap();
            p.transition = Duration::from_secs(60);
            p.last_met.insert(Condition::Memory, Instant::now());
        }
        assert_eq!(
            admission_refusal(&pressure, &pod("BestEffort", 0)).as_deref(),
            Some("The node had condition: [MemoryPressure]. ")
        );
        assert_eq!(admission_refusal(&pressure, &pod("Burstable", 0)), None);
        pressure
            .write()
            .unwrap()
            .last_met
            .insert(Condition::Disk, Instant::now());
        assert_eq!(
            admission_refusal(&pressure, &pod("Burstable", 0)).as_deref(),
            Some("The node had condition: [DiskPressure]. ")
        );
        assert_eq!(
            admission_refusal(&pressure, &pod("BestEffort", 2_000_001_000)),
            None
        );
    }
}
