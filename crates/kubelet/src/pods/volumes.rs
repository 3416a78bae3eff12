//! Pod volumes on the host: emptyDir (disk, or a tmpfs for `medium: Memory`), hostPath with type
//! checks, PVCs bound to hostPath/local PVs, and configMap / secret / downwardAPI / projected
//! volumes written by an atomic writer (a `..data` symlink swapped by rename, so a reader in the
//! container sees either the old or the new set of files, never a mix). Projected
//! `serviceAccountToken` sources are filled by TokenRequests bound to the pod ([`TokenCache`]).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod,
    Secret, ServiceAccount, ServiceAccountTokenProjection, Volume,
};
use kube::api::{Api, PostParams};

use crate::config::{KubeletError, api_err, io_err};
use crate::pods::spec::{field_value, quantity_bytes, resource_value};

/// One file of an atomic-writer volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// Path relative to the volume root.
    pub path: String,
    /// Contents.
    pub data: Vec<u8>,
    /// File mode.
    pub mode: u32,
}

/// What a volume is on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostVolume {
    /// A directory (emptyDir, hostPath, PV) bind-mounted as is.
    Dir(PathBuf),
    /// An atomic-writer directory refreshed from API objects.
    Projected(PathBuf),
}

impl HostVolume {
    /// The host path to bind.
    pub fn path(&self) -> &Path {
        match self {
            HostVolume::Dir(p) | HostVolume::Projected(p) => p,
        }
    }
}

/// fsGroup ownership (as the kubelet's SetVolumeOwnership): every file and directory under
/// `dir` gets group `gid`, files gain group read (and write unless `read_only`), directories
/// gain group access and the setgid bit so that new files inherit the group. Symlinks are not
/// followed. With `only_if_root_differs` (fsGroupChangePolicy OnRootMismatch) nothing is done
/// when `dir` already has the group and the setgid bit.
pub fn set_volume_ownership(
    dir: &Path,
    gid: u32,
    read_only: bool,
    only_if_root_differs: bool,
) -> Result<(), KubeletError> {
    use std::os::unix::fs::MetadataExt;
    if only_if_root_differs
        && std::fs::metadata(dir).is_ok_and(|m| m.gid() == gid && m.mode() & 0o2000 != 0)
    {
        return Ok(());
    }
    let file_mask = if read_only { 0o440 } else { 0o660 };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).map_err(io_err("reading", &p))?;
        if md.file_type().is_symlink() {
            continue;
        }
        std::os::unix::fs::lchown(&p, None, Some(gid)).map_err(io_err("setting group of", &p))?;
        let mode = md.mode() & 0o7777;
        let want = if md.is_dir() {
            mode | file_mask | 0o110 | 0o2000
        } else {
            mode | file_mask
        };
        if want != mode {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(want))
                .map_err(io_err("setting mode of", &p))?;
        }
        if md.is_dir() {
            for e in std::fs::read_dir(&p)
                .map_err(io_err("reading", &p))?
                .flatten()
            {
                stack.push(e.path());
            }
        }
    }
    Ok(())
}

/// Writes `files` into `dir` atomically: a new timestamped dir, `..data` swapped to it by
/// rename, top-level names as symlinks through `..data`. Returns false when nothing changed.
pub fn atomic_write(dir: &Path, files: &[Payload]) -> Result<bool, KubeletError> {
    std::fs::create_dir_all(dir).map_err(io_err("creating volume dir", dir))?;
    let data_link = dir.join("..data");
    // Unchanged? Compare with what ..data holds now.
    if let Ok(cur) = std::fs::read_link(&data_link) {
        let cur_dir = dir.join(&cur);
        let same = files.iter().all(|f| {
            let p = cur_dir.join(&f.path);
            std::fs::read(&p).is_ok_and(|d| d == f.data)
                && std::fs::metadata(&p).is_ok_and(|m| m.permissions().mode() & 0o7777 == f.mode)
        }) && count_files(&cur_dir) == files.len();
        if same {
            return Ok(false);
        }
    }
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let ts_dir = dir.join(&stamp);
    std::fs::create_dir_all(&ts_dir).map_err(io_err("creating volume dir", &ts_dir))?;
    for f in files {
        if f.path.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(KubeletError::Invalid(format!(
                "volume file path {:?} must be relative without '..'",
                f.path
            )));
        }
        let p = ts_dir.join(&f.path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io_err("creating volume dir", parent))?;
        }
        std::fs::write(&p, &f.data).map_err(io_err("writing volume file", &p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode))
            .map_err(io_err("setting mode of", &p))?;
    }
    let old = std::fs::read_link(&data_link).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&stamp, &tmp).map_err(io_err("creating symlink", &tmp))?;
    std::fs::rename(&tmp, &data_link).map_err(io_err("swapping", &data_link))?;
    // Top-level names.
    let mut tops: Vec<String> = files
        .iter()
        .filter_map(|f| f.path.split('/').next().map(str::to_string))
        .collect();
    tops.sort();
    tops.dedup();
    for t in &tops {
        let link = dir.join(t);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{t}"), &link).map_err(io_err("creating symlink", &link))?;
        }
    }
    // Names that went away.
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.starts_with("..") && !tops.contains(&n) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if let Some(old) = old
        && old != Path::new(&stamp)
    {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(true)
}

fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => n += count_files(&e.path()),
                Ok(_) => n += 1,
                Err(_) => {}
            }
        }
    }
    n
}

/// The data of a configMap or secret a volume names: a missing object is empty when the volume
/// marks it optional, and an error otherwise.
fn source_data(
    data: Option<BTreeMap<String, Vec<u8>>>,
    optional: bool,
    kind: &str,
    name: &str,
) -> Result<BTreeMap<String, Vec<u8>>, KubeletError> {
    match data {
        Some(d) => Ok(d),
        None if optional => Ok(BTreeMap::new()),
        None => Err(KubeletError::Invalid(format!("{kind} {name:?} not found"))),
    }
}

fn items_or_all(
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: i32,
    optional: bool,
    what: &str,
) -> Result<Vec<Payload>, KubeletError> {
    let mut out = Vec::new();
    match items {
        Some(items) => {
            for it in items {
                match data.get(&it.key) {
                    Some(d) => out.push(Payload {
                        path: it.path.clone(),
                        data: d.clone(),
                        mode: it.mode.unwrap_or(default_mode) as u32,
                    }),
                    None if optional => {}
                    None => {
                        return Err(KubeletError::Invalid(format!(
                            "{what} has no key {:?}",
                            it.key
                        )));
                    }
                }
            }
        }
        None => {
            for (k, d) in data {
                out.push(Payload {
                    path: k,
                    data: d,
                    mode: default_mode as u32,
                });
            }
        }
    }
    Ok(out)
}

/// Reads API objects for volumes and env.
pub struct Sources<'a> {
    /// The client.
    pub client: &'a kube::Client,
    /// The pod's namespace.
    pub namespace: &'a str,
}

impl Sources<'_> {
    /// A configMap's data (string and binary), or None when it does not exist.
    pub async fn config_map(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, KubeletError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), self.namespace);
        let cm = api.get_opt(name).await.map_err(api_err(format!(
            "reading configmap {}/{name}",
            self.namespace
        )))?;
        Ok(cm.map(|cm| {
            let mut m: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            m.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            m
        }))
    }

    /// A secret's data, or None when it does not exist.
    pub async fn secret(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, KubeletError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), self.namespace);
        let s = api
            .get_opt(name)
            .await
            .map_err(api_err(format!("reading secret {}/{name}", self.namespace)))?;
        Ok(s.map(|s| {
            let mut m: BTreeMap<String, Vec<u8>> = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            m.extend(
                s.string_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes())),
            );
            m
        }))
    }
}

fn downward_files(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: i32,
    node_name: &str,
    host_ip: &str,
) -> Vec<Payload> {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    items
        .iter()
        .filter_map(|it| {
            let value = if let Some(f) = &it.field_ref {
                field_value(pod, &f.field_path, node_name, host_ip)?
            } else if let Some(r) = &it.resource_field_ref {
                let c = containers
                    .iter()
                    .find(|c| Some(&c.name) == r.container_name.as_ref())
                    .or(containers.first())?;
                resource_value(c, &r.resource, r.divisor.as_ref(), 0, 0)?
            } else {
                return None;
            };
            Some(Payload {
                path: it.path.clone(),
                data: value.into_bytes(),
                mode: it.mode.unwrap_or(default_mode) as u32,
            })
        })
        .collect()
}

/// The audience of the Kubernetes API: a projected token without `audience` is for it.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
/// Lifetime a projected token without `expirationSeconds` asks for.
const DEFAULT_TOKEN_SECONDS: i64 = 3600;
/// A token is refreshed at the latest after this long, whatever its lifetime (the kubelet's 24 h).
const MAX_TOKEN_AGE: Duration = Duration::from_secs(24 * 3600);

/// One token issued to a pod.
#[derive(Clone)]
struct CachedToken {
    token: String,
    fetched: Instant,
    lifetime: Duration,
}

/// The service-account tokens of one pod, by (service account, audience, requested seconds),
/// requested again once 80% of their lifetime (or 24 h) has passed, as the kubelet's token
/// manager does. Tokens are never logged.
#[derive(Default)]
pub struct TokenCache {
    tokens: HashMap<(String, String, i64), CachedToken>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

/// Whether a token fetched `age` ago with `lifetime` must be requested again.
pub fn token_needs_refresh(age: Duration, lifetime: Duration) -> bool {
    age >= lifetime.mul_f64(0.8) || age >= MAX_TOKEN_AGE
}

/// The token of a projected `serviceAccountToken` source: a TokenRequest for the pod's service
/// account bound to the pod, cached in `cache` until it is due for refresh. When a refresh fails
/// the cached token is kept while it is still valid.
async fn service_account_token(
    src: &Sources<'_>,
    pod: &Pod,
    t: &ServiceAccountTokenProjection,
    cache: &mut TokenCache,
) -> Result<Vec<u8>, KubeletError> {
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let audience = t
        .audience
        .clone()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| API_AUDIENCE.to_string());
    let seconds = t.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS);
    let key = (sa.clone(), audience.clone(), seconds);
    let cached = cache.tokens.get(&key).cloned();
    if let Some(c) = &cached
        && !token_needs_refresh(c.fetched.elapsed(), c.lifetime)
    {
        return Ok(c.token.clone().into_bytes());
    }
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience],
            expiration_seconds: Some(seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod_name.clone()),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(src.client.clone(), src.namespace);
    let fetched = Instant::now();
    let issued = api
        .create_token_request(&sa, &PostParams::default(), &req)
        .await
        .map_err(api_err(format!(
            "requesting a token for serviceaccount {}/{sa} (pod {pod_name})",
            src.namespace
        )));
    let issued = match issued {
        Ok(tr) => tr,
        Err(e) => {
            if let Some(c) = cached
                && c.fetched.elapsed() < c.lifetime
            {
                tracing::warn!(pod = %pod_name, serviceaccount = %sa, error = %e, "token refresh failed; keeping the current token");
                return Ok(c.token.into_bytes());
            }
            return Err(e);
        }
    };
    let status = issued.status.ok_or_else(|| {
        KubeletError::Invalid(format!(
            "the TokenRequest for serviceaccount {}/{sa} returned no token",
            src.namespace
        ))
    })?;
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let left = (status.expiration_timestamp.0.as_second() - now).max(0);
    let lifetime = Duration::from_secs(u64::try_from(left).unwrap_or(0));
    tracing::debug!(pod = %pod_name, serviceaccount = %sa, lifetime_s = lifetime.as_secs(), "service-account token issued");
    cache.tokens.insert(
        key,
        CachedToken {
            token: status.token.clone(),
            fetched,
            lifetime,
        },
    );
    Ok(status.token.into_bytes())
}

/// The files of an atomic-writer volume (configMap, secret, downwardAPI, projected), or None
/// for other volume kinds. Service-account tokens come from (and go to) `tokens`.
pub async fn payload(
    src: &Sources<'_>,
    pod: &Pod,
    vol: &Volume,
    node_name: &str,
    host_ip: &str,
    tokens: &mut TokenCache,
) -> Result<Option<Vec<Payload>>, KubeletError> {
    if let Some(c) = &vol.config_map {
        let optional = c.optional.unwrap_or(false);
        let data = source_data(
            src.config_map(&c.name).await?,
            optional,
            "configmap",
            &c.name,
        )?;
        let what = format!("configmap {}", c.name);
        return items_or_all(
            data,
            c.items.as_ref(),
            c.default_mode.unwrap_or(0o644),
            optional,
            &what,
        )
        .map(Some);
    }
    if let Some(s) = &vol.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let optional = s.optional.unwrap_or(false);
        let data = source_data(src.secret(&name).await?, optional, "secret", &name)?;
        let what = format!("secret {name}");
        return items_or_all(
            data,
            s.items.as_ref(),
            s.default_mode.unwrap_or(0o644),
            optional,
            &what,
        )
        .map(Some);
    }
    if let Some(d) = &vol.downward_api {
        let items = d.items.clone().unwrap_or_default();
        return Ok(Some(downward_files(
            pod,
            &items,
            d.default_mode.unwrap_or(0o644),
            node_name,
            host_ip,
        )));
    }
    if let Some(p) = &vol.projected {
        let mode = p.default_mode.unwrap_or(0o644);
        let mut out = Vec::new();
        for s in p.sources.iter().flatten() {
            if let Some(c) = &s.config_map {
                let optional = c.optional.unwrap_or(false);
                let data = source_data(
                    src.config_map(&c.name).await?,
                    optional,
                    "configmap",
                    &c.name,
                )?;
                out.extend(items_or_all(
                    data,
                    c.items.as_ref(),
                    mode,
                    optional,
                    &c.name,
                )?);
            }
            if let Some(sec) = &s.secret {
                let optional = sec.optional.unwrap_or(false);
                let data =
                    source_data(src.secret(&sec.name).await?, optional, "secret", &sec.name)?;
                out.extend(items_or_all(
                    data,
                    sec.items.as_ref(),
                    mode,
                    optional,
                    &sec.name,
                )?);
            }
            if let Some(d) = &s.downward_api {
                let items = d.items.clone().unwrap_or_default();
                out.extend(downward_files(pod, &items, mode, node_name, host_ip));
            }
            if let Some(t) = &s.service_account_token {
                out.push(Payload {
                    path: t.path.clone(),
                    data: service_account_token(src, pod, t, tokens).await?,
                    mode: mode as u32,
                });
            }
            if let Some(b) = &s.cluster_trust_bundle {
                let _ = b;
            }
        }
        return Ok(Some(out));
    }
    Ok(None)
}

fn is_mountpoint(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|t| {
        let want = p.to_string_lossy();
        t.lines()
            .any(|l| l.split_whitespace().nth(4) == Some(want.as_ref()))
    })
}

/// Prepares a non-projected volume and returns its host directory, or None for projected kinds.
pub async fn prepare_dir(
    client: &kube::Client,
    namespace: &str,
    vol: &Volume,
    vol_dir: &Path,
) -> Result<Option<PathBuf>, KubeletError> {
    if let Some(e) = &vol.empty_dir {
        std::fs::create_dir_all(vol_dir).map_err(io_err("creating emptyDir", vol_dir))?;
        std::fs::set_permissions(vol_dir, std::fs::Permissions::from_mode(0o777))
            .map_err(io_err("setting mode of", vol_dir))?;
        if e.medium.as_deref() == Some("Memory") && !is_mountpoint(vol_dir) {
            let mut opts = "mode=1777".to_string();
            if let Some(b) = e.size_limit.as_ref().and_then(quantity_bytes) {
                opts.push_str(&format!(",size={b}"));
            }
            nix::mount::mount(
                Some("tmpfs"),
                vol_dir,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                Some(opts.as_str()),
            )
            .map_err(|e| {
                KubeletError::Invalid(format!(
                    "mounting tmpfs for emptyDir at {}: {e}",
                    vol_dir.display()
                ))
            })?;
        }
        return Ok(Some(vol_dir.to_path_buf()));
    }
    if let Some(h) = &vol.host_path {
        let p = PathBuf::from(&h.path);
        let md = std::fs::metadata(&p);
        let bad = |want: &str| {
            KubeletError::Invalid(format!(
                "hostPath {} is not {want} (volume {:?})",
                h.path, vol.name
            ))
        };
        let kind = h.type_.as_deref().unwrap_or("");
        if kind == "DirectoryOrCreate" && md.is_err() {
            std::fs::create_dir_all(&p).map_err(io_err("creating hostPath", &p))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                .map_err(io_err("setting mode of", &p))?;
        } else if kind == "Directory" && !md.as_ref().is_ok_and(|m| m.is_dir()) {
            return Err(bad("a directory"));
        } else if kind == "FileOrCreate" && md.is_err() {
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io_err("creating hostPath parent", parent))?;
            }
            std::fs::write(&p, b"").map_err(io_err("creating hostPath", &p))?;
        } else if kind == "File" && !md.as_ref().is_ok_and(|m| m.is_file()) {
            return Err(bad("a file"));
        }
        match kind {
            "Socket" | "CharDevice" | "BlockDevice" => {
                use std::os::unix::fs::FileTypeExt;
                let ok = md.is_ok_and(|m| {
                    let t = m.file_type();
                    match h.type_.as_deref() {
                        Some("Socket") => t.is_socket(),
                        Some("CharDevice") => t.is_char_device(),
                        _ => t.is_block_device(),
                    }
                });
                if !ok {
                    return Err(bad(h.type_.as_deref().unwrap_or("")));
                }
            }
            _ => {}
        }
        return Ok(Some(p));
    }
    if let Some(c) = &vol.persistent_volume_claim {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
        let pvc = pvcs
            .get(&c.claim_name)
            .await
            .map_err(api_err(format!("reading pvc {namespace}/{}", c.claim_name)))?;
        let pv_name = pvc
            .spec
            .and_then(|s| s.volume_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                KubeletError::Invalid(format!("pvc {:?} is not bound yet", c.claim_name))
            })?;
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        let pv = pvs
            .get(&pv_name)
            .await
            .map_err(api_err(format!("reading pv {pv_name}")))?;
        let spec = pv.spec.unwrap_or_default();
        let path = spec
            .host_path
            .map(|h| h.path)
            .or(spec.local.map(|l| l.path))
            .ok_or_else(|| {
                KubeletError::Invalid(format!(
                    "pv {pv_name} is neither hostPath nor local; only those are supported"
                ))
            })?;
        let p = PathBuf::from(path);
        std::fs::create_dir_all(&p).map_err(io_err("creating pv dir", &p))?;
        return Ok(Some(p));
    }
    Ok(None)
}

/// Unmounts tmpfs volumes under a pod dir (before removing it).
pub fn unmount_all(pod_dir: &Path) {
    let Ok(t) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = format!("{}/", pod_dir.display());
    let mut mps: Vec<String> = t
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    mps.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mps {
        if let Err(e) = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(mountpoint = %m, error = %e, "unmounting pod volume failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(path: &str, data: &str) -> Payload {
        Payload {
            path: path.into(),
            data: data.as_bytes().to_vec(),
            mode: 0o644,
        }
    }

    #[test]
    fn tokens_are_refreshed_at_80_percent_or_after_a_day() {
        let hour = Duration::from_secs(3600);
        assert!(!token_needs_refresh(Duration::ZERO, hour));
        assert!(!token_needs_refresh(Duration::from_secs(2879), hour));
        assert!(token_needs_refresh(Duration::from_secs(2880), hour));
        assert!(token_needs_refresh(Duration::from_secs(4000), hour));
        let year = Duration::from_secs(365 * 24 * 3600);
        assert!(!token_needs_refresh(Duration::from_secs(23 * 3600), year));
        assert!(token_needs_refresh(Duration::from_secs(24 * 3600), year));
        // A token that came back already expired is requested again at once.
        assert!(token_needs_refresh(Duration::ZERO, Duration::ZERO));
    }

    #[test]
    fn fs_group_ownership_sets_group_setgid_and_group_bits() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
        let f = sub.join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        symlink("/etc/passwd", d.path().join("link")).unwrap();
        let root = nix::unistd::Uid::effective().is_root();
        // Without root only our own groups are allowed: use ours.
        let gid = if root {
            4321
        } else {
            nix::unistd::getegid().as_raw()
        };
        set_volume_ownership(d.path(), gid, false, false).unwrap();
        let m = std::fs::metadata(&sub).unwrap();
        assert_eq!(m.gid(), gid);
        assert_eq!(m.mode() & 0o7777, 0o2770);
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!(m.gid(), gid);
        assert_eq!(m.mode() & 0o7777, 0o660);
        // The symlink's target is untouched.
        assert_ne!(std::fs::metadata("/etc/passwd").unwrap().gid(), 4321);
        // Read-only volumes get group read only.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o400)).unwrap();
        set_volume_ownership(d.path(), gid, true, false).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o7777, 0o440);
        // OnRootMismatch: the root is already right, so nothing below is changed.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o400)).unwrap();
        set_volume_ownership(d.path(), gid, true, true).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o7777, 0o400);
    }

    #[test]
    fn atomic_write_swaps_and_prunes() {
        let d = tempfile::tempdir().unwrap();
        let v = d.path().join("vol");
        assert!(atomic_write(&v, &[f("a", "1"), f("sub/b", "2")]).unwrap());
        assert_eq!(std::fs::read_to_string(v.join("a")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(v.join("sub/b")).unwrap(), "2");
        assert!(std::fs::symlink_metadata(v.join("a")).unwrap().is_symlink());
        assert!(!atomic_write(&v, &[f("a", "1"), f("sub/b", "2")]).unwrap());
        let first = std::fs::read_link(v.join("..data")).unwrap();
        assert!(atomic_write(&v, &[f("a", "3")]).unwrap());
        assert_eq!(std::fs::read_to_string(v.join("a")).unwrap(), "3");
        assert!(!v.join("sub").exists());
        assert!(!v.join(&first).exists(), "old generation removed");
        assert!(atomic_write(&v, &[f("../x", "1")]).is_err());
    }
}
