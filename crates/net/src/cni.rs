//! A CNI executor: runs external CNI plugins (ADD, DEL, CHECK) on a network configuration
//! loaded from a conf dir, the way libcni does for containerd and CRI-O.
//!
//! Behaviour follows the CNI 1.0 specification (SPEC.md of containernetworking/cni):
//! - the network is the first of `*.conf`, `*.conflist`, `*.json` in the conf dir in lexical
//!   order that loads (a file that does not is skipped with a warning, as ocicni and go-cni do);
//!   a single-plugin `.conf`/`.json` is wrapped into a list of one;
//! - `cniVersion` 1.0.0 is spoken; 0.4.0 and 0.3.x networks are accepted and their results
//!   (`ips[].version`) converted, as libcni converts them;
//! - ADD runs the plugins in order, each one's result becoming the next one's `prevResult`; the
//!   final result is cached on disk (under the caller's dir, like libcni's
//!   `/var/lib/cni/results`) so that DEL and CHECK work after a restart;
//! - DEL runs the plugins in reverse order with the cached result as `prevResult` and then
//!   drops the cache; CHECK runs them in order with the cached result (not for networks older
//!   than 0.4.0, and not when the list says `disableCheck`);
//! - a failing plugin's error JSON (`code`, `msg`, `details`) becomes [`NetError::Cni`]; every
//!   plugin run has a time limit.
//!
//! Why our own: the Rust CNI crates we know of are for writing plugins (`cni-plugin`), or small
//! young executors with few users; the runtime side of the protocol is a few hundred lines of
//! process spawning and JSON, which we keep here with skiff's error and logging rules.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;

use crate::error::NetError;

/// The CNI versions whose configurations this executor accepts.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "0.4.0", "0.3.1", "0.3.0"];

/// Default time limit of one plugin run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A network configuration list (a `.conflist`, or a `.conf` wrapped into one).
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkList {
    /// The network name (`name`).
    pub name: String,
    /// Its `cniVersion`.
    pub cni_version: String,
    /// `disableCheck`: CHECK is skipped.
    pub disable_check: bool,
    /// The plugin configurations, in order; each has a `type`.
    pub plugins: Vec<Map<String, Value>>,
    /// The file it came from.
    pub source: PathBuf,
}

impl NetworkList {
    /// The plugin types, in order.
    pub fn plugin_types(&self) -> Vec<&str> {
        self.plugins
            .iter()
            .filter_map(|p| p.get("type").and_then(Value::as_str))
            .collect()
    }
}

fn conf_err(path: &Path, reason: impl Into<String>) -> NetError {
    NetError::CniConfig {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn check_version(path: &Path, v: &str) -> Result<(), NetError> {
    if SUPPORTED_VERSIONS.contains(&v) {
        Ok(())
    } else {
        Err(conf_err(
            path,
            format!(
                "cniVersion {v:?} is not supported (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ))
    }
}

fn check_plugin(path: &Path, p: &Map<String, Value>) -> Result<(), NetError> {
    let t = p
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| conf_err(path, "a plugin has no \"type\""))?;
    if t.is_empty() || t.contains('/') || t == "." || t == ".." {
        return Err(conf_err(
            path,
            format!("plugin type {t:?} is not a file name"),
        ));
    }
    Ok(())
}

fn check_name(path: &Path, name: &str) -> Result<(), NetError> {
    if name.is_empty() || name.contains(['/', '\0']) || name == "." || name == ".." {
        return Err(conf_err(
            path,
            format!("network name {name:?} is not valid"),
        ));
    }
    Ok(())
}

/// Parses one configuration file: a list if the file name ends in `.conflist`, else a single
/// plugin configuration wrapped into a list.
pub fn parse_config(path: &Path, bytes: &[u8]) -> Result<NetworkList, NetError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| conf_err(path, format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(conf_err(path, "not a JSON object"));
    };
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| conf_err(path, "no \"name\""))?
        .to_string();
    check_name(path, &name)?;
    let cni_version = obj
        .get("cniVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| conf_err(path, "no \"cniVersion\""))?
        .to_string();
    check_version(path, &cni_version)?;
    let is_list = path.extension().and_then(|e| e.to_str()) == Some("conflist");
    let (plugins, disable_check) = if is_list {
        let plugins = obj
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or_else(|| conf_err(path, "no \"plugins\" list"))?;
        if plugins.is_empty() {
            return Err(conf_err(path, "the \"plugins\" list is empty"));
        }
        let mut out = Vec::with_capacity(plugins.len());
        for p in plugins {
            let Value::Object(m) = p else {
                return Err(conf_err(path, "a plugin is not a JSON object"));
            };
            check_plugin(path, m)?;
            out.push(m.clone());
        }
        let dc = match obj.get("disableCheck") {
            None => false,
            Some(Value::Bool(b)) => *b,
            // libcni also accepts the string forms.
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => false,
            Some(other) => {
                return Err(conf_err(
                    path,
                    format!("disableCheck {other} is not a boolean"),
                ));
            }
        };
        (out, dc)
    } else {
        if !obj.contains_key("type") && obj.contains_key("plugins") {
            return Err(conf_err(
                path,
                "no \"type\"; this looks like a list: name the file *.conflist",
            ));
        }
        check_plugin(path, &obj)?;
        (vec![obj.clone()], false)
    };
    Ok(NetworkList {
        name,
        cni_version,
        disable_check,
        plugins,
        source: path.to_path_buf(),
    })
}

/// Loads the network of `conf_dir`: the first file among `*.conf`, `*.conflist` and `*.json`
/// in lexical order that parses; files that do not are skipped with a warning.
pub fn load_network(conf_dir: &Path) -> Result<NetworkList, NetError> {
    let rd = std::fs::read_dir(conf_dir)
        .map_err(|e| NetError::io(format!("reading CNI conf dir {}", conf_dir.display()), e))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conf" | "conflist" | "json")
            ) && p.is_file()
        })
        .collect();
    files.sort();
    let mut skipped = Vec::new();
    for f in files {
        let bytes = match std::fs::read(&f) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(file = %f.display(), error = %e, "skipping unreadable CNI config");
                skipped.push(format!("{}: {e}", f.display()));
                continue;
            }
        };
        match parse_config(&f, &bytes) {
            Ok(n) => return Ok(n),
            Err(e) => {
                tracing::warn!(file = %f.display(), error = %e, "skipping invalid CNI config");
                skipped.push(e.to_string());
            }
        }
    }
    let why = if skipped.is_empty() {
        "no *.conf, *.conflist or *.json file".to_string()
    } else {
        format!("no usable file ({})", skipped.join("; "))
    };
    Err(conf_err(conf_dir, why))
}

/// One IP address of a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniIp {
    /// `address/prefix`.
    pub address: String,
    /// The gateway, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

impl CniIp {
    /// The address without its prefix length.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        self.address.split('/').next()?.parse().ok()
    }
}

/// One interface of a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniInterface {
    /// The interface name.
    pub name: String,
    /// Its MAC address.
    #[serde(default)]
    pub mac: String,
    /// The netns path if it is inside the container, empty on the host.
    #[serde(default)]
    pub sandbox: String,
}

/// The parts of a plugin result skiff reads (the full JSON is kept in `raw`).
#[derive(Debug, Clone, PartialEq)]
pub struct CniResult {
    /// The result's `cniVersion`.
    pub cni_version: String,
    /// `interfaces`.
    pub interfaces: Vec<CniInterface>,
    /// `ips`.
    pub ips: Vec<CniIp>,
    /// The whole result, in the network's version.
    pub raw: Value,
}

impl CniResult {
    /// The first IPv4 address of the result (the pod IP).
    pub fn first_ipv4(&self) -> Option<std::net::Ipv4Addr> {
        self.ips.iter().find_map(|i| match i.ip() {
            Some(std::net::IpAddr::V4(v4)) => Some(v4),
            _ => None,
        })
    }
}

/// Converts a plugin result to `to_version`'s format (0.3.x/0.4.0 `ips[].version` added or
/// dropped) and parses it.
pub fn parse_result(v: Value, to_version: &str) -> Result<CniResult, String> {
    let Value::Object(mut obj) = v else {
        return Err("the result is not a JSON object".into());
    };
    let from = obj
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or(to_version)
        .to_string();
    if !SUPPORTED_VERSIONS.contains(&from.as_str()) {
        return Err(format!("result cniVersion {from:?} is not supported"));
    }
    let to_legacy = to_version != "1.0.0";
    if let Some(Value::Array(ips)) = obj.get_mut("ips") {
        for ip in ips.iter_mut() {
            let Value::Object(m) = ip else {
                return Err("an ips entry is not an object".into());
            };
            if to_legacy {
                if !m.contains_key("version") {
                    let addr = m.get("address").and_then(Value::as_str).unwrap_or("");
                    let ver = if addr.contains(':') { "6" } else { "4" };
                    m.insert("version".into(), json!(ver));
                }
            } else {
                m.remove("version");
            }
        }
    }
    obj.insert("cniVersion".into(), json!(to_version));
    let raw = Value::Object(obj);
    let interfaces: Vec<CniInterface> = match raw.get("interfaces") {
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| format!("interfaces: {e}"))?,
        None => Vec::new(),
    };
    let ips: Vec<CniIp> = match raw.get("ips") {
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| format!("ips: {e}"))?,
        None => Vec::new(),
    };
    Ok(CniResult {
        cni_version: to_version.to_string(),
        interfaces,
        ips,
        raw,
    })
}

/// A plugin's error output (`code`, `msg`, `details`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PluginError {
    /// The error code (1–99 reserved by the spec).
    #[serde(default)]
    pub code: u32,
    /// The message.
    #[serde(default)]
    pub msg: String,
    /// More details.
    #[serde(default)]
    pub details: String,
}

/// The spec's name of a well-known error code.
pub fn error_code_name(code: u32) -> &'static str {
    match code {
        1 => "incompatible CNI version",
        2 => "unsupported field in network configuration",
        3 => "container unknown or does not exist",
        4 => "invalid necessary environment variables",
        5 => "I/O failure",
        6 => "failed to decode content",
        7 => "invalid network config",
        11 => "try again later",
        _ => "plugin-specific error",
    }
}

/// Builds the error of a failed plugin run from what it printed.
pub fn plugin_failure(
    plugin: &str,
    command: &str,
    status: &str,
    stdout: &[u8],
    stderr: &[u8],
) -> NetError {
    let stderr = String::from_utf8_lossy(stderr).trim().to_string();
    match serde_json::from_slice::<PluginError>(stdout) {
        Ok(pe) if !pe.msg.is_empty() || pe.code != 0 => NetError::Cni {
            plugin: plugin.to_string(),
            command: command.to_string(),
            code: pe.code,
            msg: format!(
                "{} (code {}: {})",
                pe.msg,
                pe.code,
                error_code_name(pe.code)
            ),
            details: if pe.details.is_empty() {
                stderr
            } else {
                pe.details
            },
        },
        _ => {
            let out = String::from_utf8_lossy(stdout).trim().to_string();
            NetError::Cni {
                plugin: plugin.to_string(),
                command: command.to_string(),
                code: 0,
                msg: format!("exited with {status}"),
                details: [out, stderr]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join("; "),
            }
        }
    }
}

/// What one attachment is: the container, its netns, the interface and `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    /// `CNI_CONTAINERID` (the pod sandbox id).
    pub container_id: String,
    /// `CNI_NETNS` (path of the network namespace).
    pub netns: PathBuf,
    /// `CNI_IFNAME` (`eth0`).
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs (`IgnoreUnknown=1` is always put first).
    pub args: Vec<(String, String)>,
}

impl Attachment {
    /// `CNI_ARGS`: `IgnoreUnknown=1;K=V;...`.
    pub fn cni_args(&self) -> String {
        let mut s = String::from("IgnoreUnknown=1");
        for (k, v) in &self.args {
            if k == "IgnoreUnknown" {
                continue;
            }
            s.push(';');
            s.push_str(k);
            s.push('=');
            s.push_str(v);
        }
        s
    }
}

/// What is cached on disk per attachment.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheEntry {
    kind: String,
    #[serde(rename = "networkName")]
    network_name: String,
    attachment: Attachment,
    result: Value,
}

const CACHE_KIND: &str = "skiffCniCacheV1";

/// Runs the plugins of one network.
#[derive(Debug, Clone)]
pub struct CniExecutor {
    network: NetworkList,
    bin_dirs: Vec<PathBuf>,
    cache_dir: PathBuf,
    timeout: Duration,
    loopback: bool,
}

impl CniExecutor {
    /// An executor for `network`, finding plugins in `bin_dirs` (in order) and caching results
    /// in `cache_dir`.
    pub fn new(network: NetworkList, bin_dirs: Vec<PathBuf>, cache_dir: PathBuf) -> CniExecutor {
        CniExecutor {
            network,
            bin_dirs,
            cache_dir,
            timeout: DEFAULT_TIMEOUT,
            loopback: false,
        }
    }

    /// Also brings up `lo` in the netns with the `loopback` plugin (a network of its own,
    /// `CNI_IFNAME=lo`, run before the main network on ADD and after it on DEL), as containerd
    /// and CRI-O do for pods.
    pub fn with_loopback(mut self) -> CniExecutor {
        self.loopback = true;
        self
    }

    fn loopback_plugin(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("type".into(), json!("loopback"));
        m
    }

    async fn run_loopback(&self, command: &str, a: &Attachment) -> Result<(), NetError> {
        if !self.loopback {
            return Ok(());
        }
        let lo = Attachment {
            ifname: "lo".into(),
            ..a.clone()
        };
        self.run_plugin(command, &self.loopback_plugin(), &lo, None)
            .await
            .map(|_| ())
    }

    /// Loads the network from `conf_dir` (see [`load_network`]).
    pub fn load(
        conf_dir: &Path,
        bin_dirs: Vec<PathBuf>,
        cache_dir: PathBuf,
    ) -> Result<CniExecutor, NetError> {
        Ok(CniExecutor::new(
            load_network(conf_dir)?,
            bin_dirs,
            cache_dir,
        ))
    }

    /// Sets the time limit of one plugin run.
    pub fn with_timeout(mut self, t: Duration) -> CniExecutor {
        self.timeout = t;
        self
    }

    /// The network configuration.
    pub fn network(&self) -> &NetworkList {
        &self.network
    }

    /// Checks that every plugin of the list is in the bin dirs.
    pub fn check_plugins(&self) -> Result<(), NetError> {
        for t in self.network.plugin_types() {
            self.find_plugin(t)?;
        }
        if self.loopback {
            self.find_plugin("loopback")?;
        }
        Ok(())
    }

    fn find_plugin(&self, t: &str) -> Result<PathBuf, NetError> {
        use std::os::unix::fs::PermissionsExt;
        for d in &self.bin_dirs {
            let p = d.join(t);
            if let Ok(md) = std::fs::metadata(&p)
                && md.is_file()
                && md.permissions().mode() & 0o111 != 0
            {
                return Ok(p);
            }
        }
        Err(NetError::CniPluginMissing {
            plugin: t.to_string(),
            dirs: self
                .bin_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    fn cache_path(&self, a: &Attachment) -> Result<PathBuf, NetError> {
        let id_ok = !a.container_id.is_empty()
            && a.container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !id_ok || a.ifname.is_empty() || a.ifname.contains('/') {
            return Err(NetError::invalid(
                format!("{}/{}", a.container_id, a.ifname),
                "container id must be [A-Za-z0-9_.-]+ and the interface name a file name",
            ));
        }
        Ok(self.cache_dir.join(format!(
            "{}-{}-{}",
            self.network.name, a.container_id, a.ifname
        )))
    }

    /// The cached ADD result of an attachment, with the `CNI_ARGS` it was added with.
    pub fn cached(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<(CniResult, Attachment)>, NetError> {
        let probe = Attachment {
            container_id: container_id.to_string(),
            netns: PathBuf::new(),
            ifname: ifname.to_string(),
            args: Vec::new(),
        };
        let path = self.cache_path(&probe)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(NetError::io(format!("reading {}", path.display()), e)),
        };
        let entry: CacheEntry = serde_json::from_slice(&bytes).map_err(|e| NetError::State {
            path: path.clone(),
            reason: format!("not a CNI result cache: {e}"),
        })?;
        if entry.kind != CACHE_KIND {
            return Err(NetError::State {
                path,
                reason: format!("unknown cache kind {:?}", entry.kind),
            });
        }
        let r = parse_result(entry.result, &self.network.cni_version)
            .map_err(|reason| NetError::State { path, reason })?;
        Ok(Some((r, entry.attachment)))
    }

    /// The attachments with a cached result of this network (what is still added), e.g. for a
    /// cleanup that DELs them all. Unreadable entries are skipped.
    pub fn cached_attachments(&self) -> Vec<Attachment> {
        let prefix = format!("{}-", self.network.name);
        let Ok(rd) = std::fs::read_dir(&self.cache_dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.filter_map(Result::ok) {
            let name = e.file_name();
            if !name.to_string_lossy().starts_with(&prefix) {
                continue;
            }
            let Ok(bytes) = std::fs::read(e.path()) else {
                continue;
            };
            if let Ok(entry) = serde_json::from_slice::<CacheEntry>(&bytes)
                && entry.kind == CACHE_KIND
                && entry.network_name == self.network.name
            {
                out.push(entry.attachment);
            }
        }
        out.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        out
    }

    fn write_cache(&self, a: &Attachment, r: &CniResult) -> Result<(), NetError> {
        let path = self.cache_path(a)?;
        std::fs::create_dir_all(&self.cache_dir)
            .map_err(|e| NetError::io(format!("creating {}", self.cache_dir.display()), e))?;
        let entry = CacheEntry {
            kind: CACHE_KIND.into(),
            network_name: self.network.name.clone(),
            attachment: a.clone(),
            result: r.raw.clone(),
        };
        let bytes = serde_json::to_vec(&entry)
            .map_err(|e| NetError::invalid(&a.container_id, format!("encoding cache: {e}")))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)
            .map_err(|e| NetError::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| NetError::io(format!("renaming to {}", path.display()), e))
    }

    fn plugin_stdin(&self, plugin: &Map<String, Value>, prev: Option<&Value>) -> Vec<u8> {
        let mut conf = plugin.clone();
        conf.insert("name".into(), json!(self.network.name));
        conf.insert("cniVersion".into(), json!(self.network.cni_version));
        match prev {
            Some(p) => {
                conf.insert("prevResult".into(), p.clone());
            }
            None => {
                conf.remove("prevResult");
            }
        }
        // A Map of Values always serializes.
        serde_json::to_vec(&Value::Object(conf)).unwrap_or_default()
    }

    async fn run_plugin(
        &self,
        command: &str,
        plugin: &Map<String, Value>,
        a: &Attachment,
        prev: Option<&Value>,
    ) -> Result<Vec<u8>, NetError> {
        let t = plugin.get("type").and_then(Value::as_str).unwrap_or("");
        let bin = self.find_plugin(t)?;
        let stdin = self.plugin_stdin(plugin, prev);
        let cni_path = std::env::join_paths(&self.bin_dirs)
            .map_err(|e| NetError::invalid("--cni-bin-dir", e.to_string()))?;
        let started = std::time::Instant::now();
        let mut child = tokio::process::Command::new(&bin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &a.container_id)
            .env("CNI_NETNS", &a.netns)
            .env("CNI_IFNAME", &a.ifname)
            .env("CNI_ARGS", a.cni_args())
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| NetError::io(format!("starting CNI plugin {}", bin.display()), e))?;
        if let Some(mut si) = child.stdin.take() {
            // A plugin that exits without reading its stdin is judged by its exit status.
            let _ = si.write_all(&stdin).await;
            drop(si);
        }
        let out = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(r) => r.map_err(|e| NetError::io(format!("running CNI plugin {t}"), e))?,
            Err(_) => {
                return Err(NetError::CniTimeout {
                    plugin: t.to_string(),
                    command: command.to_string(),
                    after: self.timeout,
                });
            }
        };
        tracing::debug!(
            plugin = t,
            command,
            container = %a.container_id,
            status = %out.status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "ran CNI plugin"
        );
        if !out.status.success() {
            return Err(plugin_failure(
                t,
                command,
                &out.status.to_string(),
                &out.stdout,
                &out.stderr,
            ));
        }
        Ok(out.stdout)
    }

    /// ADD: runs the plugins in order, chaining results; caches and returns the final one. When
    /// a plugin fails, the plugins already run are undone (DEL) before the error is returned.
    pub async fn add(&self, a: &Attachment) -> Result<CniResult, NetError> {
        self.cache_path(a)?;
        self.run_loopback("ADD", a).await?;
        let mut prev: Option<CniResult> = None;
        for (i, plugin) in self.network.plugins.iter().enumerate() {
            let t = plugin.get("type").and_then(Value::as_str).unwrap_or("");
            let step = async {
                let out = self
                    .run_plugin("ADD", plugin, a, prev.as_ref().map(|r| &r.raw))
                    .await?;
                let v: Value = serde_json::from_slice(&out).map_err(|e| NetError::Cni {
                    plugin: t.to_string(),
                    command: "ADD".into(),
                    code: 0,
                    msg: format!("printed no result JSON: {e}"),
                    details: String::from_utf8_lossy(&out).into_owned(),
                })?;
                parse_result(v, &self.network.cni_version).map_err(|msg| NetError::Cni {
                    plugin: t.to_string(),
                    command: "ADD".into(),
                    code: 0,
                    msg,
                    details: String::new(),
                })
            };
            match step.await {
                Ok(r) => prev = Some(r),
                Err(e) => {
                    // Undo what the plugins before this one (and this one, partly) did.
                    for p in self.network.plugins[..=i].iter().rev() {
                        if let Err(de) = self
                            .run_plugin("DEL", p, a, prev.as_ref().map(|r| &r.raw))
                            .await
                        {
                            tracing::warn!(container = %a.container_id, error = %de, "undoing a failed CNI ADD");
                        }
                    }
                    let _ = self.run_loopback("DEL", a).await;
                    return Err(e);
                }
            }
        }
        let result = prev
            .ok_or_else(|| NetError::invalid(&self.network.name, "the network has no plugins"))?;
        self.write_cache(a, &result)?;
        tracing::info!(
            network = %self.network.name,
            container = %a.container_id,
            ip = ?result.first_ipv4(),
            "CNI ADD done"
        );
        Ok(result)
    }

    /// DEL: runs the plugins in reverse order with the cached result as `prevResult` (none if
    /// nothing is cached), then drops the cache. `args` empty: the cached `CNI_ARGS` are used.
    pub async fn del(&self, a: &Attachment) -> Result<(), NetError> {
        let path = self.cache_path(a)?;
        let cached = match self.cached(&a.container_id, &a.ifname) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(container = %a.container_id, error = %e, "ignoring an unreadable CNI result cache");
                None
            }
        };
        let mut att = a.clone();
        if att.args.is_empty()
            && let Some((_, ca)) = &cached
        {
            att.args = ca.args.clone();
        }
        let prev = cached.map(|(r, _)| r.raw);
        for plugin in self.network.plugins.iter().rev() {
            self.run_plugin("DEL", plugin, &att, prev.as_ref()).await?;
        }
        self.run_loopback("DEL", &att).await?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(NetError::io(format!("removing {}", path.display()), e)),
        }
        tracing::info!(network = %self.network.name, container = %a.container_id, "CNI DEL done");
        Ok(())
    }

    /// CHECK: runs the plugins in order with the cached result. Networks before 0.4.0 and lists
    /// with `disableCheck` are not checked. An attachment with no cached result is an error.
    pub async fn check(&self, a: &Attachment) -> Result<(), NetError> {
        if self.network.disable_check || self.network.cni_version.starts_with("0.3") {
            return Ok(());
        }
        let Some((r, cached_att)) = self.cached(&a.container_id, &a.ifname)? else {
            return Err(NetError::invalid(
                &a.container_id,
                format!(
                    "no cached CNI result for network {:?}: it was never added (or was deleted)",
                    self.network.name
                ),
            ));
        };
        let mut att = a.clone();
        if att.args.is_empty() {
            att.args = cached_att.args;
        }
        for plugin in &self.network.plugins {
            self.run_plugin("CHECK", plugin, &att, Some(&r.raw)).await?;
        }
        Ok(())
    }
}

/// `CNI_ARGS` pairs of a Kubernetes pod, as the kubelet passes them.
pub fn pod_args(namespace: &str, name: &str, sandbox_id: &str, uid: &str) -> Vec<(String, String)> {
    vec![
        ("K8S_POD_NAMESPACE".into(), namespace.into()),
        ("K8S_POD_NAME".into(), name.into()),
        ("K8S_POD_INFRA_CONTAINER_ID".into(), sandbox_id.into()),
        ("K8S_POD_UID".into(), uid.into()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> PathBuf {
        PathBuf::from(format!("/etc/cni/net.d/{name}"))
    }

    #[test]
    fn conflist_loads_with_its_plugins_in_order() {
        let n = parse_config(
            &p("10-a.conflist"),
            br#"{"cniVersion":"1.0.0","name":"net1","plugins":[{"type":"bridge","bridge":"cni0"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        assert_eq!(n.name, "net1");
        assert_eq!(n.cni_version, "1.0.0");
        assert_eq!(n.plugin_types(), vec!["bridge", "portmap"]);
        assert_eq!(n.plugins[0]["bridge"], "cni0");
        assert!(!n.disable_check);
    }

    #[test]
    fn single_conf_is_wrapped_into_a_list() {
        let n = parse_config(
            &p("10-a.conf"),
            br#"{"cniVersion":"0.4.0","name":"net1","type":"bridge","ipam":{"type":"host-local"}}"#,
        )
        .unwrap();
        assert_eq!(n.plugin_types(), vec!["bridge"]);
        assert_eq!(n.cni_version, "0.4.0");
        assert_eq!(n.plugins[0]["ipam"]["type"], "host-local");
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let cases: &[(&str, &[u8], &str)] = &[
            ("a.conflist", b"{", "not valid JSON"),
            (
                "a.conflist",
                br#"{"cniVersion":"1.0.0","plugins":[{"type":"x"}]}"#,
                "no \"name\"",
            ),
            (
                "a.conflist",
                br#"{"name":"n","plugins":[{"type":"x"}]}"#,
                "no \"cniVersion\"",
            ),
            (
                "a.conflist",
                br#"{"cniVersion":"2.0.0","name":"n","plugins":[{"type":"x"}]}"#,
                "cniVersion \"2.0.0\" is not supported",
            ),
            (
                "a.conflist",
                br#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
                "empty",
            ),
            (
                "a.conflist",
                br#"{"cniVersion":"1.0.0","name":"n","plugins":[{}]}"#,
                "no \"type\"",
            ),
            (
                "a.conflist",
                br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../x"}]}"#,
                "not a file name",
            ),
            (
                "a.conf",
                br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"x"}]}"#,
                "*.conflist",
            ),
            (
                "a.conf",
                br#"{"cniVersion":"1.0.0","name":"a/b","type":"x"}"#,
                "name",
            ),
        ];
        for (file, body, want) in cases {
            let e = parse_config(&p(file), body).unwrap_err().to_string();
            assert!(
                e.contains(want),
                "{file} {}: {e}",
                String::from_utf8_lossy(body)
            );
            assert!(e.contains(file), "{e}");
        }
    }

    #[test]
    fn load_takes_the_first_valid_file_in_lexical_order() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("99-z.conflist"),
            br#"{"cniVersion":"1.0.0","name":"z","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        std::fs::write(
            d.path().join("20-b.conf"),
            br#"{"cniVersion":"1.0.0","name":"b","type":"ptp"}"#,
        )
        .unwrap();
        std::fs::write(d.path().join("10-bad.conflist"), b"nope").unwrap();
        std::fs::write(d.path().join("05-ignored.yaml"), b"name: y").unwrap();
        let n = load_network(d.path()).unwrap();
        assert_eq!(n.name, "b");
        assert_eq!(n.source, d.path().join("20-b.conf"));
        std::fs::remove_file(d.path().join("20-b.conf")).unwrap();
        assert_eq!(load_network(d.path()).unwrap().name, "z");
        std::fs::remove_file(d.path().join("99-z.conflist")).unwrap();
        let e = load_network(d.path()).unwrap_err().to_string();
        assert!(e.contains("10-bad.conflist"), "{e}");
    }

    #[test]
    fn empty_conf_dir_says_what_it_looked_for() {
        let d = tempfile::tempdir().unwrap();
        let e = load_network(d.path()).unwrap_err().to_string();
        assert!(e.contains("no *.conf, *.conflist or *.json"), "{e}");
    }

    #[test]
    fn results_of_1_0_and_0_4_parse_and_convert() {
        let v1 = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name":"cni0","mac":"aa"},{"name":"eth0","mac":"bb","sandbox":"/run/netns/x"}],
            "ips": [{"address":"10.42.0.5/24","gateway":"10.42.0.1","interface":1}],
            "routes": [{"dst":"0.0.0.0/0"}],
            "dns": {}
        });
        let r = parse_result(v1.clone(), "1.0.0").unwrap();
        assert_eq!(r.first_ipv4(), Some("10.42.0.5".parse().unwrap()));
        assert_eq!(r.interfaces[1].sandbox, "/run/netns/x");
        assert_eq!(r.ips[0].interface, Some(1));
        // To 0.4.0: ips get their version.
        let r04 = parse_result(v1, "0.4.0").unwrap();
        assert_eq!(r04.raw["ips"][0]["version"], "4");
        assert_eq!(r04.raw["cniVersion"], "0.4.0");
        // From 0.3.1: the version goes.
        let v03 = json!({
            "cniVersion": "0.3.1",
            "ips": [{"version":"6","address":"fd00::5/64"},{"version":"4","address":"10.1.2.3/16"}]
        });
        let r = parse_result(v03, "1.0.0").unwrap();
        assert!(r.raw["ips"][0].get("version").is_none());
        assert_eq!(r.first_ipv4(), Some("10.1.2.3".parse().unwrap()));
        assert!(parse_result(json!({"cniVersion":"9.9.9"}), "1.0.0").is_err());
        assert!(parse_result(json!([1]), "1.0.0").is_err());
    }

    #[test]
    fn plugin_error_json_becomes_a_clear_error() {
        let e = plugin_failure(
            "bridge",
            "ADD",
            "exit status: 1",
            br#"{"cniVersion":"1.0.0","code":7,"msg":"bad bridge","details":"name too long"}"#,
            b"",
        );
        let s = e.to_string();
        assert!(matches!(e, NetError::Cni { code: 7, .. }));
        assert!(s.contains("bridge") && s.contains("ADD"), "{s}");
        assert!(
            s.contains("bad bridge") && s.contains("invalid network config"),
            "{s}"
        );
        assert!(s.contains("name too long"), "{s}");
        // Not JSON: the exit status and what it printed.
        let s = plugin_failure("x", "DEL", "exit status: 2", b"oops", b"trace").to_string();
        assert!(
            s.contains("exit status: 2") && s.contains("oops") && s.contains("trace"),
            "{s}"
        );
    }

    #[test]
    fn cni_args_start_with_ignore_unknown() {
        let a = Attachment {
            container_id: "abc".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            args: pod_args("default", "web", "abc", "u-1"),
        };
        assert_eq!(
            a.cni_args(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
        );
    }

    #[test]
    fn plugin_stdin_has_name_version_and_prev_result() {
        let n = parse_config(
            &p("a.conflist"),
            br#"{"cniVersion":"1.0.0","name":"net1","plugins":[{"type":"bridge","prevResult":{"x":1}}]}"#,
        )
        .unwrap();
        let ex = CniExecutor::new(n, vec![], PathBuf::from("/nonexistent"));
        let v: Value =
            serde_json::from_slice(&ex.plugin_stdin(&ex.network.plugins[0], None)).unwrap();
        assert_eq!(v["name"], "net1");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(v.get("prevResult").is_none());
        let prev = json!({"cniVersion":"1.0.0","ips":[]});
        let v: Value =
            serde_json::from_slice(&ex.plugin_stdin(&ex.network.plugins[0], Some(&prev))).unwrap();
        assert_eq!(v["prevResult"], prev);
    }

    #[tokio::test]
    async fn missing_plugin_names_the_binary_and_the_dirs() {
        let d = tempfile::tempdir().unwrap();
        let n = parse_config(
            &p("a.conflist"),
            br#"{"cniVersion":"1.0.0","name":"net1","plugins":[{"type":"no-such-plugin"}]}"#,
        )
        .unwrap();
        let ex = CniExecutor::new(
            n,
            vec![d.path().join("bin1"), d.path().join("bin2")],
            d.path().join("cache"),
        );
        let a = Attachment {
            container_id: "c1".into(),
            netns: "/run/netns/none".into(),
            ifname: "eth0".into(),
            args: vec![],
        };
        let e = ex.add(&a).await.unwrap_err().to_string();
        assert!(e.contains("no-such-plugin"), "{e}");
        assert!(e.contains("bin1") && e.contains("bin2"), "{e}");
        assert!(ex.check_plugins().is_err());
    }

    #[tokio::test]
    async fn add_chains_caches_and_del_uses_the_cache_with_a_fake_plugin() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let log = d.path().join("log");
        // A shell plugin that logs its command, args and stdin, and prints a result.
        let script = format!(
            "#!/bin/sh\nin=$(cat)\necho \"$CNI_COMMAND $CNI_CONTAINERID $CNI_IFNAME $CNI_ARGS $in\" >> {}\n\
             if [ \"$CNI_COMMAND\" = ADD ]; then echo '{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.9.0.7/24\"}}]}}'; fi\n",
            log.display()
        );
        std::fs::write(bin.join("fake"), script).unwrap();
        std::fs::set_permissions(bin.join("fake"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let n = parse_config(
            &p("a.conflist"),
            br#"{"cniVersion":"1.0.0","name":"net1","plugins":[{"type":"fake","n":1},{"type":"fake","n":2}]}"#,
        )
        .unwrap();
        let ex = CniExecutor::new(n, vec![bin.clone()], d.path().join("cache"));
        let a = Attachment {
            container_id: "c1".into(),
            netns: "/run/netns/none".into(),
            ifname: "eth0".into(),
            args: pod_args("ns", "p", "c1", "u"),
        };
        let r = ex.add(&a).await.unwrap();
        assert_eq!(r.first_ipv4(), Some("10.9.0.7".parse().unwrap()));
        let (cached, ca) = ex.cached("c1", "eth0").unwrap().unwrap();
        assert_eq!(cached.first_ipv4(), r.first_ipv4());
        assert_eq!(ca.args, a.args);
        // DEL with no args given uses the cached ones.
        let bare = Attachment {
            args: vec![],
            ..a.clone()
        };
        ex.del(&bare).await.unwrap();
        assert!(ex.cached("c1", "eth0").unwrap().is_none());
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].starts_with("ADD c1 eth0 IgnoreUnknown=1;K8S_POD_NAMESPACE=ns"),
            "{text}"
        );
        assert!(
            lines[0].contains("\"n\":1") && !lines[0].contains("prevResult"),
            "{text}"
        );
        assert!(
            lines[1].contains("\"n\":2") && lines[1].contains("prevResult"),
            "{text}"
        );
        // DEL in reverse order, with the cached result and the cached args.
        assert!(
            lines[2].starts_with("DEL c1 eth0 IgnoreUnknown=1;K8S_POD_NAMESPACE=ns"),
            "{text}"
        );
        assert!(
            lines[2].contains("\"n\":2") && lines[2].contains("10.9.0.7"),
            "{text}"
        );
        assert!(lines[3].contains("\"n\":1"), "{text}");
    }

    #[tokio::test]
    async fn a_hanging_plugin_is_stopped_at_the_time_limit() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("slow"), "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(
            d.path().join("slow"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let n = parse_config(
            &p("a.conflist"),
            br#"{"cniVersion":"1.0.0","name":"net1","plugins":[{"type":"slow"}]}"#,
        )
        .unwrap();
        let ex = CniExecutor::new(n, vec![d.path().to_path_buf()], d.path().join("cache"))
            .with_timeout(Duration::from_millis(300));
        let a = Attachment {
            container_id: "c1".into(),
            netns: "/x".into(),
            ifname: "eth0".into(),
            args: vec![],
        };
        let t = std::time::Instant::now();
        ex.check_plugins().unwrap();
        let e = ex.del(&a).await.unwrap_err();
        assert!(matches!(e, NetError::CniTimeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
