//! Pulling images with oci-client: `registries.yaml` (k3s format) mirrors, rewrites, auth and
//! TLS settings; platform selection in indexes; blobs verified into the image store.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;

use crate::error::{Error, Result, io_err};
use crate::reference::normalize;
use crate::store::{ImageStore, Manifest, host_arch};

/// `registries.yaml` as k3s users write it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RegistriesConfig {
    /// registry host (or `*`) → mirror endpoints
    #[serde(default)]
    pub mirrors: BTreeMap<String, MirrorConfig>,
    /// endpoint host → auth and TLS
    #[serde(default)]
    pub configs: BTreeMap<String, HostConfig>,
}

/// Mirror endpoints for one registry.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MirrorConfig {
    /// endpoint URLs, tried in order before the registry itself
    #[serde(default)]
    pub endpoint: Vec<String>,
    /// regex → replacement applied to the repository path on the mirrors
    #[serde(default)]
    pub rewrite: BTreeMap<String, String>,
}

/// Settings for one endpoint host.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HostConfig {
    /// credentials
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// TLS
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// Registry credentials.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuthConfig {
    /// user name (basic auth)
    #[serde(default)]
    pub username: Option<String>,
    /// password (basic auth)
    #[serde(default)]
    pub password: Option<String>,
    /// a bearer token
    #[serde(default)]
    pub identitytoken: Option<String>,
}

/// TLS settings of an endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TlsConfig {
    /// skip certificate verification
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// an extra CA (PEM)
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl RegistriesConfig {
    /// Parses YAML.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Self> {
        serde_saphyr::from_str(text)
            .map_err(|e| Error::InvalidState(format!("registries config {}: {e}", path.display())))
    }

    /// Reads a file; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(t) => Self::from_yaml(&t, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(io_err("read registries config", path)(e)),
        }
    }
}

/// Credentials for one pull (as imagePullSecrets give them). `Debug` never shows the secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Credentials {
    /// none
    #[default]
    Anonymous,
    /// user and password
    Basic {
        /// user
        username: String,
        /// password
        password: String,
    },
    /// a bearer token
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// Progress of a pull: events per blob as its bytes arrive (at most one per 256 KiB), and a
/// final one with `complete` set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullProgress {
    /// blob digest
    pub digest: String,
    /// its size
    pub bytes: u64,
    /// bytes fetched so far (equals `bytes` when complete)
    pub done: u64,
    /// the blob is in the store (fetched and verified, or already there)
    pub complete: bool,
    /// true if it was already in the store
    pub cached: bool,
}

/// Step between two progress events of one blob.
const PROGRESS_STEP: u64 = 256 * 1024;

/// A writer that reports how many bytes went through it.
struct CountingWriter<'a, W> {
    inner: W,
    digest: &'a str,
    size: u64,
    done: u64,
    reported: u64,
    progress: &'a (dyn Fn(PullProgress) + Send + Sync),
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CountingWriter<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let res = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &res {
            this.done += *n as u64;
            if this.done - this.reported >= PROGRESS_STEP {
                this.reported = this.done;
                (this.progress)(PullProgress {
                    digest: this.digest.to_string(),
                    bytes: this.size,
                    done: this.done,
                    complete: false,
                    cached: false,
                });
            }
        }
        res
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct Endpoint {
    host: String,
    http: bool,
    repo: String,
}

fn split_name(name: &str) -> (String, String, String) {
    // name is normalised: domain/path[:tag][@digest]
    let (domain, rest) = name.split_once('/').unwrap_or(("docker.io", name));
    let (path, tag_or_digest) = if let Some((p, d)) = rest.split_once('@') {
        (
            p.split(':').next().unwrap_or(p).to_string(),
            format!("@{d}"),
        )
    } else if let Some((p, t)) = rest.rsplit_once(':') {
        (p.to_string(), t.to_string())
    } else {
        (rest.to_string(), "latest".to_string())
    };
    (domain.to_string(), path, tag_or_digest)
}

fn endpoints(cfg: &RegistriesConfig, domain: &str, repo: &str) -> Result<Vec<Endpoint>> {
    let mut out = Vec::new();
    if let Some(m) = cfg.mirrors.get(domain).or_else(|| cfg.mirrors.get("*")) {
        let mut mrepo = repo.to_string();
        for (pat, rep) in &m.rewrite {
            let re = regex::Regex::new(pat).map_err(|e| {
                Error::InvalidState(format!("registries config: rewrite {pat:?}: {e}"))
            })?;
            mrepo = re.replace(&mrepo, rep.as_str()).into_owned();
        }
        for ep in &m.endpoint {
            let (http, rest) = match ep.split_once("://") {
                Some(("http", r)) => (true, r),
                Some(("https", r)) => (false, r),
                Some((s, _)) => {
                    return Err(Error::InvalidState(format!(
                        "registries config: endpoint {ep:?} has scheme {s:?}; use http or https"
                    )));
                }
                None => (false, ep.as_str()),
            };
            let host = rest.split('/').next().unwrap_or(rest).to_string();
            out.push(Endpoint {
                host,
                http,
                repo: mrepo.clone(),
            });
        }
    }
    let local = domain.starts_with("localhost")
        || domain.starts_with("127.")
        || domain.starts_with("[::1]");
    out.push(Endpoint {
        host: domain.to_string(),
        http: local,
        repo: repo.to_string(),
    });
    Ok(out)
}

fn in_flight(name: &str) -> Arc<tokio::sync::Mutex<()>> {
    static MAP: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let map = MAP.get_or_init(|| Mutex::new(HashMap::new()));
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    m.entry(name.to_string()).or_default().clone()
}

const ACCEPTED: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Pulls `reference` into `store` through the configured mirrors (then the registry itself) and
/// names it. Concurrent pulls of one name in this process share the download.
pub async fn pull(
    store: &ImageStore,
    reference: &str,
    registries: &RegistriesConfig,
    creds: &Credentials,
    progress: &(dyn Fn(PullProgress) + Send + Sync),
) -> Result<String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let name = normalize(reference)?;
    let lock = in_flight(&name);
    let _guard = lock.lock().await;
    let (domain, repo, tag) = split_name(&name);
    let mut errors = Vec::new();
    for ep in endpoints(registries, &domain, &repo)? {
        match pull_from(store, &name, &ep, &tag, registries, creds, progress).await {
            Ok(digest) => {
                store.tag(&name, &digest)?;
                tracing::info!(image = %name, endpoint = %ep.host, %digest, "pulled image");
                // Unpack now, as containerd does after a pull, so the image's first container
                // does not wait for it.
                let s = store.clone();
                let n = name.clone();
                tokio::task::spawn_blocking(move || {
                    let image = s.resolve(&n)?;
                    s.unpacked_layers(&image)
                })
                .await
                .map_err(|e| Error::InvalidState(format!("unpack task failed: {e}")))??;
                return Ok(name);
            }
            Err(e) => {
                tracing::warn!(image = %name, endpoint = %ep.host, error = %e, "pull from endpoint failed");
                errors.push(format!("{}: {e}", ep.host));
            }
        }
    }
    Err(Error::InvalidState(format!(
        "pull {name}: every endpoint failed: {}",
        errors.join("; ")
    )))
}

fn pull_err(e: impl std::fmt::Display) -> Error {
    Error::InvalidState(e.to_string())
}

/// Like [`pull_err`], but says what to do when the registry refuses the credentials.
fn manifest_err(e: oci_client::errors::OciDistributionError) -> Error {
    use oci_client::errors::OciDistributionError as E;
    match e {
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => Error::InvalidState(format!(
            "{e} (unauthorized): give credentials with an imagePullSecret, or under `configs` in registries.yaml"
        )),
        other => pull_err(other),
    }
}

async fn pull_from(
    store: &ImageStore,
    name: &str,
    ep: &Endpoint,
    tag: &str,
    registries: &RegistriesConfig,
    creds: &Credentials,
    progress: &(dyn Fn(PullProgress) + Send + Sync),
) -> Result<String> {
    let host_cfg = registries
        .configs
        .get(&ep.host)
        .cloned()
        .unwrap_or_default();
    let mut cc = ClientConfig {
        protocol: if ep.http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        ..Default::default()
    };
    if let Some(tls) = &host_cfg.tls {
        cc.accept_invalid_certificates = tls.insecure_skip_verify;
        if let Some(ca) = &tls.ca_file {
            let data = std::fs::read(ca).map_err(io_err("read registry CA", ca))?;
            cc.extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
    }
    let client = Client::new(cc);
    let auth = match creds {
        Credentials::Basic { username, password } => {
            RegistryAuth::Basic(username.clone(), password.clone())
        }
        Credentials::Bearer(t) => RegistryAuth::Bearer(t.clone()),
        Credentials::Anonymous => match host_cfg.auth {
            Some(AuthConfig {
                username: Some(u),
                password: Some(p),
                ..
            }) => RegistryAuth::Basic(u, p),
            Some(AuthConfig {
                identitytoken: Some(t),
                ..
            }) => RegistryAuth::Bearer(t),
            _ => RegistryAuth::Anonymous,
        },
    };
    let mut r = match tag.strip_prefix('@') {
        Some(d) => Reference::with_digest(ep.host.clone(), ep.repo.clone(), d.to_string()),
        None => Reference::with_tag(ep.host.clone(), ep.repo.clone(), tag.to_string()),
    };
    let (mut bytes, mut digest) = client
        .pull_manifest_raw(&r, &auth, ACCEPTED)
        .await
        .map_err(manifest_err)?;
    for _ in 0..3 {
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|source| Error::Json {
                path: PathBuf::from(name),
                source,
            })?;
        let Some(list) = v.get("manifests").and_then(|m| m.as_array()) else {
            break;
        };
        let (arch, variant) = host_arch();
        let pick = list
            .iter()
            .find(|m| {
                let p = &m["platform"];
                p["os"] == "linux"
                    && p["architecture"] == arch
                    && (variant.is_none() || p["variant"].as_str() == variant)
            })
            .or_else(|| {
                list.iter().find(|m| {
                    m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch
                })
            })
            .and_then(|m| m["digest"].as_str())
            .ok_or_else(|| Error::InvalidImage {
                path: PathBuf::from(name),
                reason: format!("no manifest for linux/{arch} in the image index"),
            })?;
        r = r.clone_with_digest(pick.to_string());
        (bytes, digest) = client
            .pull_manifest_raw(&r, &auth, ACCEPTED)
            .await
            .map_err(pull_err)?;
    }
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: PathBuf::from(name),
        source,
    })?;
    for d in std::iter::once(&manifest.config).chain(manifest.layers.iter()) {
        let path = store.blob_path(&d.digest)?;
        if path.exists() {
            progress(PullProgress {
                digest: d.digest.clone(),
                bytes: d.size,
                done: d.size,
                complete: true,
                cached: true,
            });
            continue;
        }
        let tmp = store.root().join("tmp").join(format!(
            "pull-{}-{}",
            std::process::id(),
            &d.digest[7..]
        ));
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(io_err("create", &tmp))?;
        progress(PullProgress {
            digest: d.digest.clone(),
            bytes: d.size,
            done: 0,
            complete: false,
            cached: false,
        });
        let counting = CountingWriter {
            inner: file,
            digest: &d.digest,
            size: d.size,
            done: 0,
            reported: 0,
            progress,
        };
        let res = client
            .pull_blob(&r, d.digest.as_str(), counting)
            .await
            .map_err(pull_err);
        if let Err(e) = res {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        let (s2, expected, tmp2) = (store.clone(), d.digest.clone(), tmp.clone());
        let res = tokio::task::spawn_blocking(move || {
            let mut f = std::fs::File::open(&tmp2).map_err(io_err("open", &tmp2))?;
            s2.write_blob(&mut f, Some(&expected))
        })
        .await
        .map_err(pull_err)?;
        let _ = tokio::fs::remove_file(&tmp).await;
        let (_, size) = res?;
        progress(PullProgress {
            digest: d.digest.clone(),
            bytes: size,
            done: size,
            complete: true,
            cached: false,
        });
    }
    let (mdigest, _) = store.write_blob(&mut &bytes[..], Some(&digest))?;
    Ok(mdigest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_k3s_registries_yaml_and_orders_endpoints() {
        let y = r#"
mirrors:
  docker.io:
    endpoint:
      - "http://127.0.0.1:5000"
      - "https://mirror.example:8443/v2"
    rewrite:
      "^library/(.*)": "mirrored/$1"
configs:
  "mirror.example:8443":
    auth:
      username: u
      password: p
    tls:
      insecure_skip_verify: true
"#;
        let c = RegistriesConfig::from_yaml(y, Path::new("registries.yaml")).unwrap();
        assert_eq!(
            c.configs["mirror.example:8443"]
                .auth
                .as_ref()
                .unwrap()
                .username
                .as_deref(),
            Some("u")
        );
        let eps = endpoints(&c, "docker.io", "library/busybox").unwrap();
        let got: Vec<(&str, bool, &str)> = eps
            .iter()
            .map(|e| (e.host.as_str(), e.http, e.repo.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("127.0.0.1:5000", true, "mirrored/busybox"),
                ("mirror.example:8443", false, "mirrored/busybox"),
                ("docker.io", false, "library/busybox")
            ]
        );
        let eps = endpoints(&RegistriesConfig::default(), "127.0.0.1:5000", "x").unwrap();
        assert!(eps[0].http, "a loopback registry defaults to plain http");
        assert!(
            RegistriesConfig::from_yaml("mirrors: [", Path::new("r.yaml"))
                .unwrap_err()
                .to_string()
                .contains("r.yaml")
        );
    }

    #[test]
    fn splits_normalised_names() {
        assert_eq!(
            split_name("docker.io/library/busybox:latest"),
            (
                "docker.io".into(),
                "library/busybox".into(),
                "latest".into()
            )
        );
        assert_eq!(
            split_name("127.0.0.1:5000/a/b:v1"),
            ("127.0.0.1:5000".into(), "a/b".into(), "v1".into())
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            split_name(&format!("r.io/x@{d}")),
            ("r.io".into(), "x".into(), format!("@{d}"))
        );
    }
}
