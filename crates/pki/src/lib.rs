//! Certificates for a skiff server: the cluster CA, the API serving certificate, the admin client
//! certificate and the admin kubeconfig; join tokens and the certificates of joining nodes
//! ([`join`]). Knows nothing of Kubernetes objects.

pub mod bootstrap;
pub mod join;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Lifetime of the cluster CA.
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// Lifetime of leaf certificates (serving, admin).
pub const LEAF_VALIDITY: Duration = Duration::days(365);
/// Leaf certificates with less than this left are renewed at start.
pub const RENEW_BEFORE: Duration = Duration::days(90);

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("pki: {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Certificate generation or signing failed.
    #[error("pki: generating {what}: {source}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// The rcgen error.
        source: rcgen::Error,
    },
    /// An existing file is not a valid certificate or key.
    #[error("pki: {path} is not a valid certificate or key ({detail}); remove it to regenerate")]
    Invalid {
        /// The offending file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// The PEM material of a server's PKI, loaded or freshly created.
#[derive(Clone)]
pub struct ServerPki {
    /// Directory holding the files.
    pub dir: PathBuf,
    /// Cluster CA certificate (PEM).
    pub ca_cert_pem: String,
    /// API serving certificate (PEM).
    pub serving_cert_pem: String,
    /// API serving private key (PEM).
    pub serving_key_pem: String,
    /// Admin client certificate (PEM, CN=system:admin, O=system:masters).
    pub admin_cert_pem: String,
    /// Admin client key (PEM).
    pub admin_key_pem: String,
    /// Client certificate the API server shows kubelets (PEM, CN=kube-apiserver-kubelet-client,
    /// O=system:masters), used to proxy logs/exec/attach/port-forward.
    pub kubelet_client_cert_pem: String,
    /// Key of [`ServerPki::kubelet_client_cert_pem`] (PEM).
    pub kubelet_client_key_pem: String,
    /// Serving certificate of this server's own kubelet (PEM; same SANs as the API serving
    /// certificate, CN=skiff-kubelet).
    pub kubelet_serving_cert_pem: String,
    /// Key of [`ServerPki::kubelet_serving_cert_pem`] (PEM).
    pub kubelet_serving_key_pem: String,
    /// Service-account token signing key (ECDSA P-256, PKCS#8 PEM; `service.key`, 0600).
    pub service_account_key_pem: String,
    /// Public half of [`ServerPki::service_account_key_pem`] (SubjectPublicKeyInfo PEM).
    pub service_account_pub_pem: String,
}

impl std::fmt::Debug for ServerPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys.
        f.debug_struct("ServerPki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The subject alternative names every serving certificate carries, plus `extra`
/// (hostname, node IPs, `--tls-san` values).
pub fn default_sans(extra: &[String]) -> Vec<String> {
    let mut sans: Vec<String> = [
        "localhost",
        "127.0.0.1",
        "::1",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "10.43.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for s in extra {
        if !s.is_empty() && !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    sans
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn gen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Generate { what, source }
}

/// Writes `contents` to `path` atomically with the given mode.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(contents).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

fn read_opt(path: &Path) -> Result<Option<String>, PkiError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn name(cn: &str, orgs: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for o in orgs {
        dn.push(DnType::OrganizationName, *o);
    }
    dn.push(DnType::CommonName, cn);
    dn
}

fn san_type(s: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let name = s
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| PkiError::Generate {
            what: "serving certificate SAN",
            source: e,
        })?;
    Ok(SanType::DnsName(name))
}

/// Facts about a certificate needed to decide whether to reuse it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject common name.
    pub common_name: String,
    /// Subject organizations.
    pub organizations: Vec<String>,
    /// DNS and IP SANs as strings.
    pub sans: Vec<String>,
    /// Expiry as a Unix timestamp.
    pub not_after: i64,
    /// Whether the certificate is a CA.
    pub is_ca: bool,
}

/// Parses a DER certificate.
pub fn cert_info_der(der: &[u8]) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let subject = cert.subject();
    let common_name = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let organizations = subject
        .iter_organization()
        .filter_map(|a| a.as_str().ok().map(str::to_string))
        .collect();
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for gn in &ext.value.general_names {
            match gn {
                x509_parser::extensions::GeneralName::DNSName(d) => sans.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*b) {
                        sans.push(std::net::IpAddr::from(a).to_string());
                    } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                        sans.push(std::net::IpAddr::from(a).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        common_name,
        organizations,
        sans,
        not_after: cert.validity().not_after.timestamp(),
        is_ca: cert.is_ca(),
    })
}

/// Parses a PEM certificate.
pub fn cert_info_pem(pem_str: &str) -> Result<CertInfo, String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem_str.as_bytes()).map_err(|e| e.to_string())?;
    cert_info_der(&pem.contents)
}

/// The client identity of a certificate: (CN = user, O = groups).
pub fn client_identity(der: &[u8]) -> Option<(String, Vec<String>)> {
    let info = cert_info_der(der).ok()?;
    if info.common_name.is_empty() {
        return None;
    }
    Some((info.common_name, info.organizations))
}

fn leaf_params(
    cn: &str,
    orgs: &[&str],
    sans: &[String],
    eku: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(cn, orgs);
    params.subject_alt_names = sans.iter().map(|s| san_type(s)).collect::<Result<_, _>>()?;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + LEAF_VALIDITY;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![eku];
    params.serial_number = Some(random_serial());
    Ok(params)
}

fn random_serial() -> rcgen::SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    rcgen::SerialNumber::from_slice(&bytes)
}

/// A fresh self-signed cluster CA (`CN=skiff-ca`, [`CA_VALIDITY`]): (certificate PEM, key PEM).
/// Nothing is written.
pub fn new_ca() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(gen_err("ca key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name("skiff-ca", &[]);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(random_serial());
    let cert = params
        .self_signed(&key)
        .map_err(gen_err("ca certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A fresh service-account signing key (ECDSA P-256, PKCS#8 PEM). Nothing is written.
pub fn new_service_account_key() -> Result<String, PkiError> {
    let pair = KeyPair::generate().map_err(gen_err("service-account key"))?;
    Ok(pair.serialize_pem())
}

/// Loads the server PKI from `dir`, creating whatever is missing. The serving certificate is
/// re-issued (same CA) when it lacks one of `sans` or expires within [`RENEW_BEFORE`]; the admin
/// certificate likewise on expiry.
pub fn ensure_server_pki(dir: &Path, sans: &[String]) -> Result<ServerPki, PkiError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let ca_crt = dir.join("ca.crt");
    let ca_key = dir.join("ca.key");
    let (ca_cert_pem, ca_key_pem) = match (read_opt(&ca_crt)?, read_opt(&ca_key)?) {
        (Some(c), Some(k)) => (c, k),
        _ => {
            let (c, k) = new_ca()?;
            write_file(&ca_key, k.as_bytes(), 0o600)?;
            write_file(&ca_crt, c.as_bytes(), 0o644)?;
            (c, k)
        }
    };
    let ca_keypair = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::Invalid {
        path: ca_key.clone(),
        detail: e.to_string(),
    })?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_cert_pem, ca_keypair).map_err(|e| PkiError::Invalid {
            path: ca_crt.clone(),
            detail: e.to_string(),
        })?;
    let horizon = (OffsetDateTime::now_utc() + RENEW_BEFORE).unix_timestamp();

    let serving_sans = default_sans(sans);
    let (serving_cert_pem, serving_key_pem) = ensure_leaf(
        &dir.join("serving.crt"),
        &dir.join("serving.key"),
        |info| info.not_after > horizon && serving_sans.iter().all(|s| info.sans.contains(s)),
        || {
            leaf_params(
                "kube-apiserver",
                &[],
                &serving_sans,
                ExtendedKeyUsagePurpose::ServerAuth,
            )
        },
        &issuer,
    )?;
    let (admin_cert_pem, admin_key_pem) = ensure_leaf(
        &dir.join("admin.crt"),
        &dir.join("admin.key"),
        |info| info.not_after > horizon,
        || {
            leaf_params(
                "system:admin",
                &["system:masters"],
                &[],
                ExtendedKeyUsagePurpose::ClientAuth,
            )
        },
        &issuer,
    )?;
    let (kubelet_client_cert_pem, kubelet_client_key_pem) = ensure_leaf(
        &dir.join("apiserver-kubelet-client.crt"),
        &dir.join("apiserver-kubelet-client.key"),
        |info| info.not_after > horizon,
        || {
            leaf_params(
                "kube-apiserver-kubelet-client",
                &["system:masters"],
                &[],
                ExtendedKeyUsagePurpose::ClientAuth,
            )
        },
        &issuer,
    )?;
    let (kubelet_serving_cert_pem, kubelet_serving_key_pem) = ensure_leaf(
        &dir.join("kubelet-serving.crt"),
        &dir.join("kubelet-serving.key"),
        |info| info.not_after > horizon && serving_sans.iter().all(|s| info.sans.contains(s)),
        || {
            leaf_params(
                "skiff-kubelet",
                &[],
                &serving_sans,
                ExtendedKeyUsagePurpose::ServerAuth,
            )
        },
        &issuer,
    )?;
    let (service_account_key_pem, service_account_pub_pem) =
        ensure_service_account_key(&dir.join("service.key"))?;
    Ok(ServerPki {
        dir: dir.to_path_buf(),
        ca_cert_pem,
        serving_cert_pem,
        serving_key_pem,
        admin_cert_pem,
        admin_key_pem,
        kubelet_client_cert_pem,
        kubelet_client_key_pem,
        kubelet_serving_cert_pem,
        kubelet_serving_key_pem,
        service_account_key_pem,
        service_account_pub_pem,
    })
}

/// Loads the service-account signing key from `path` (k3s: `server/tls/service.key`), making an
/// ECDSA P-256 key (mode 0600) the first time. Returns (private PKCS#8 PEM, public SPKI PEM).
pub fn ensure_service_account_key(path: &Path) -> Result<(String, String), PkiError> {
    if let Some(k) = read_opt(path)? {
        let pair = KeyPair::from_pem(&k).map_err(|e| PkiError::Invalid {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        return Ok((k, pair.public_key_pem()));
    }
    let k = new_service_account_key()?;
    let pair = KeyPair::from_pem(&k).map_err(gen_err("service-account key"))?;
    write_file(path, k.as_bytes(), 0o600)?;
    Ok((k, pair.public_key_pem()))
}

fn ensure_leaf(
    crt: &Path,
    key: &Path,
    reuse: impl Fn(&CertInfo) -> bool,
    params: impl Fn() -> Result<CertificateParams, PkiError>,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String), PkiError> {
    if let (Some(c), Some(k)) = (read_opt(crt)?, read_opt(key)?) {
        let info = cert_info_pem(&c).map_err(|detail| PkiError::Invalid {
            path: crt.to_path_buf(),
            detail,
        })?;
        if reuse(&info) {
            return Ok((c, k));
        }
    }
    // Keep the existing key if there is a valid one, so that pinned keys survive renewal.
    let keypair = match read_opt(key)?.and_then(|k| KeyPair::from_pem(&k).ok()) {
        Some(k) => k,
        None => KeyPair::generate().map_err(gen_err("leaf key"))?,
    };
    let cert = params()?
        .signed_by(&keypair, issuer)
        .map_err(gen_err("leaf certificate"))?;
    let (c, k) = (cert.pem(), keypair.serialize_pem());
    write_file(key, k.as_bytes(), 0o600)?;
    write_file(crt, c.as_bytes(), 0o644)?;
    Ok((c, k))
}

fn base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Renders a kubeconfig for one cluster/user/context named `skiff`.
pub fn kubeconfig_yaml(server_url: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: skiff\n  cluster:\n    server: {server_url}\n    certificate-authority-data: {}\nusers:\n- name: skiff-admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: skiff\n  context:\n    cluster: skiff\n    user: skiff-admin\ncurrent-context: skiff\npreferences: {{}}\n",
        base64(ca_pem.as_bytes()),
        base64(cert_pem.as_bytes()),
        base64(key_pem.as_bytes()),
    )
}

/// Writes the admin kubeconfig (mode 0600) for `server_url`.
pub fn write_admin_kubeconfig(
    path: &Path,
    server_url: &str,
    pki: &ServerPki,
) -> Result<(), PkiError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let yaml = kubeconfig_yaml(
        server_url,
        &pki.ca_cert_pem,
        &pki.admin_cert_pem,
        &pki.admin_key_pem,
    );
    write_file(path, yaml.as_bytes(), 0o600)
}

/// Decodes all certificates (DER) of a PEM bundle.
pub fn pem_certs_der(pem_str: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem_str.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

/// Decodes the first private key (PKCS#8 DER) of a PEM string.
pub fn pem_key_der(pem_str: &str) -> Option<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem_str.as_bytes())
        .filter_map(Result::ok)
        .find(|p| p.label.ends_with("PRIVATE KEY"))
        .map(|p| p.contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_and_reuses() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        let a = ensure_server_pki(&dir, &["myhost".into(), "192.0.2.7".into()]).unwrap();
        let ca = cert_info_pem(&a.ca_cert_pem).unwrap();
        assert!(ca.is_ca);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!(ca.not_after > now + 3600 * 24 * 3640);
        let serving = cert_info_pem(&a.serving_cert_pem).unwrap();
        for s in [
            "myhost",
            "192.0.2.7",
            "127.0.0.1",
            "::1",
            "localhost",
            "kubernetes.default.svc.cluster.local",
            "10.43.0.1",
        ] {
            assert!(serving.sans.contains(&s.to_string()), "missing SAN {s}");
        }
        let admin = cert_info_pem(&a.admin_cert_pem).unwrap();
        assert_eq!(admin.common_name, "system:admin");
        assert_eq!(admin.organizations, vec!["system:masters".to_string()]);
        for k in ["ca.key", "serving.key", "admin.key", "service.key"] {
            assert_eq!(mode(&dir.join(k)), 0o600, "{k}");
        }
        assert!(a.service_account_key_pem.contains("PRIVATE KEY"));
        assert!(a.service_account_pub_pem.contains("BEGIN PUBLIC KEY"));
        // Restart reuses everything.
        let b = ensure_server_pki(&dir, &["myhost".into(), "192.0.2.7".into()]).unwrap();
        assert_eq!(a.service_account_key_pem, b.service_account_key_pem);
        assert_eq!(a.service_account_pub_pem, b.service_account_pub_pem);
        assert_eq!(a.ca_cert_pem, b.ca_cert_pem);
        assert_eq!(a.serving_cert_pem, b.serving_cert_pem);
        assert_eq!(a.admin_cert_pem, b.admin_cert_pem);
        // A new SAN re-issues the serving certificate with the same CA and key.
        let c = ensure_server_pki(&dir, &["other".into()]).unwrap();
        assert_eq!(a.ca_cert_pem, c.ca_cert_pem);
        assert_ne!(a.serving_cert_pem, c.serving_cert_pem);
        assert_eq!(a.serving_key_pem, c.serving_key_pem);
        assert!(
            cert_info_pem(&c.serving_cert_pem)
                .unwrap()
                .sans
                .contains(&"other".to_string())
        );
    }

    #[test]
    fn kubeconfig_is_private_and_complete() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = ensure_server_pki(&tmp.path().join("tls"), &[]).unwrap();
        let path = tmp.path().join("kubeconfig.yaml");
        write_admin_kubeconfig(&path, "https://127.0.0.1:40001", &pki).unwrap();
        assert_eq!(mode(&path), 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("server: https://127.0.0.1:40001"));
        assert!(text.contains(&format!(
            "certificate-authority-data: {}",
            base64(pki.ca_cert_pem.as_bytes())
        )));
        assert!(text.contains("client-key-data: "));
    }

    #[test]
    fn identity_from_client_cert() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = ensure_server_pki(&tmp.path().join("tls"), &[]).unwrap();
        let der = &pem_certs_der(&pki.admin_cert_pem)[0];
        let (user, groups) = client_identity(der).unwrap();
        assert_eq!(user, "system:admin");
        assert_eq!(groups, vec!["system:masters"]);
        assert!(pem_key_der(&pki.admin_key_pem).is_some());
    }

    #[test]
    fn corrupt_cert_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        ensure_server_pki(&dir, &[]).unwrap();
        fs::write(dir.join("serving.crt"), "garbage").unwrap();
        let err = ensure_server_pki(&dir, &[]).unwrap_err();
        assert!(err.to_string().contains("serving.crt"), "{err}");
    }

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
