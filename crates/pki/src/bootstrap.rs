//! Cluster bootstrap data, as k3s keeps it for servers that share one datastore: the cluster CA
//! (certificate and key) and the service-account signing key, sealed with a key derived from the
//! cluster token (PBKDF2-HMAC-SHA256 over a random salt, then AES-256-GCM) so that only servers
//! given the same token can read them; and the files of a server's `server/tls` directory they
//! are written to and compared with. Knows nothing of the store: the caller moves the bytes.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::{PkiError, new_ca, new_service_account_key, read_opt, write_file};

/// Format version written in every sealed record.
pub const FORMAT_VERSION: u32 = 1;

/// The key derivation written in every sealed record.
pub const KDF: &str = "pbkdf2-hmac-sha256";

/// PBKDF2 iterations for new records (OWASP's 2023 figure for PBKDF2-HMAC-SHA256 is 600,000;
/// the token is a machine-made 128-bit secret by default, so a lower count costs no security
/// there and keeps server start fast on small boards).
pub const ITERATIONS: u32 = 100_000;

/// Upper bound on the iterations a record may ask for (a record is data read from the store).
const MAX_ITERATIONS: u32 = 10_000_000;

/// Additional authenticated data: binds the ciphertext to this format.
const AAD: &[u8] = b"skiff-bootstrap-v1";

/// The files in `server/tls` that hold the bootstrap data: (file name, mode).
pub const FILES: [(&str, u32); 3] = [("ca.crt", 0o644), ("ca.key", 0o600), ("service.key", 0o600)];

/// Certificates signed by the CA, removed when the CA is (re)written from bootstrap data so that
/// they are issued again by the cluster CA.
const LEAVES: [&str; 4] = [
    "serving",
    "admin",
    "apiserver-kubelet-client",
    "kubelet-serving",
];

/// What servers sharing a datastore share. `Debug` never shows keys.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BootstrapData {
    /// Cluster CA certificate (PEM, `ca.crt`).
    pub ca_cert_pem: String,
    /// Cluster CA key (PEM, `ca.key`).
    pub ca_key_pem: String,
    /// Service-account signing key (PKCS#8 PEM, `service.key`).
    pub service_account_key_pem: String,
}

impl std::fmt::Debug for BootstrapData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapData")
            .field(
                "ca_sha256",
                &crate::join::sha256_hex(self.ca_cert_pem.as_bytes()),
            )
            .finish_non_exhaustive()
    }
}

impl BootstrapData {
    /// The contents of one of [`FILES`].
    fn file(&self, name: &str) -> &str {
        match name {
            "ca.crt" => &self.ca_cert_pem,
            "ca.key" => &self.ca_key_pem,
            _ => &self.service_account_key_pem,
        }
    }
}

/// The sealed record as stored (JSON; binary fields in base64).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Sealed {
    version: u32,
    kdf: String,
    iterations: u32,
    salt: String,
    nonce: String,
    ciphertext: String,
}

/// Why a sealed record could not be made or opened.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The record is not a skiff bootstrap record this version understands.
    #[error("the bootstrap record is malformed: {0}")]
    Malformed(String),
    /// Authentication of the ciphertext failed: the token is not the one it was sealed with
    /// (or the record was altered).
    #[error("the bootstrap record cannot be decrypted with this token")]
    WrongToken,
    /// The system random source or the cipher failed.
    #[error("bootstrap record crypto failed: {0}")]
    Crypto(&'static str),
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn derive_key(
    secret: &str,
    salt: &[u8],
    iterations: NonZeroU32,
) -> Result<LessSafeKey, BootstrapError> {
    let mut key = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        secret.as_bytes(),
        &mut key,
    );
    let unbound =
        UnboundKey::new(&AES_256_GCM, &key).map_err(|_| BootstrapError::Crypto("aes key"))?;
    key.fill(0);
    Ok(LessSafeKey::new(unbound))
}

/// Seals `data` with a key derived from the cluster secret `secret` (a fresh salt and nonce
/// each time). Returns the record's bytes (JSON).
pub fn seal(secret: &str, data: &BootstrapData) -> Result<Vec<u8>, BootstrapError> {
    let rng = SystemRandom::new();
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut salt)
        .map_err(|_| BootstrapError::Crypto("random salt"))?;
    rng.fill(&mut nonce)
        .map_err(|_| BootstrapError::Crypto("random nonce"))?;
    let iterations = NonZeroU32::new(ITERATIONS).ok_or(BootstrapError::Crypto("iterations"))?;
    let key = derive_key(secret, &salt, iterations)?;
    let mut buf = serde_json::to_vec(data).map_err(|_| BootstrapError::Crypto("encoding"))?;
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(AAD),
        &mut buf,
    )
    .map_err(|_| BootstrapError::Crypto("aes-gcm seal"))?;
    let sealed = Sealed {
        version: FORMAT_VERSION,
        kdf: KDF.to_string(),
        iterations: ITERATIONS,
        salt: b64().encode(salt),
        nonce: b64().encode(nonce),
        ciphertext: b64().encode(&buf),
    };
    buf.fill(0);
    serde_json::to_vec(&sealed).map_err(|_| BootstrapError::Crypto("encoding"))
}

/// Opens a record made by [`seal`] with the cluster secret `secret`.
pub fn open(secret: &str, record: &[u8]) -> Result<BootstrapData, BootstrapError> {
    let sealed: Sealed =
        serde_json::from_slice(record).map_err(|e| BootstrapError::Malformed(e.to_string()))?;
    if sealed.version != FORMAT_VERSION || sealed.kdf != KDF {
        return Err(BootstrapError::Malformed(format!(
            "version {} with key derivation {:?} (this skiff reads version {FORMAT_VERSION}, {KDF})",
            sealed.version, sealed.kdf
        )));
    }
    let iterations = NonZeroU32::new(sealed.iterations)
        .filter(|i| i.get() <= MAX_ITERATIONS)
        .ok_or_else(|| {
            BootstrapError::Malformed(format!("{} PBKDF2 iterations", sealed.iterations))
        })?;
    let field = |name: &str, v: &str| {
        b64()
            .decode(v)
            .map_err(|e| BootstrapError::Malformed(format!("{name}: {e}")))
    };
    let salt = field("salt", &sealed.salt)?;
    let nonce: [u8; NONCE_LEN] = field("nonce", &sealed.nonce)?
        .try_into()
        .map_err(|_| BootstrapError::Malformed(format!("nonce is not {NONCE_LEN} bytes")))?;
    let mut buf = field("ciphertext", &sealed.ciphertext)?;
    let key = derive_key(secret, &salt, iterations)?;
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(AAD),
            &mut buf,
        )
        .map_err(|_| BootstrapError::WrongToken)?;
    let data = serde_json::from_slice(plain).map_err(|e| BootstrapError::Malformed(e.to_string()));
    buf.fill(0);
    data
}

/// The bootstrap data of the server whose `server/tls` directory is `tls_dir`: the CA and the
/// service-account key found there, what is missing made afresh (in memory: nothing is
/// written; see [`install`]).
pub fn load_or_generate(tls_dir: &Path) -> Result<BootstrapData, PkiError> {
    let (ca_cert_pem, ca_key_pem) = match (
        read_opt(&tls_dir.join("ca.crt"))?,
        read_opt(&tls_dir.join("ca.key"))?,
    ) {
        (Some(c), Some(k)) => (c, k),
        _ => new_ca()?,
    };
    let service_account_key_pem = match read_opt(&tls_dir.join("service.key"))? {
        Some(k) => k,
        None => new_service_account_key()?,
    };
    Ok(BootstrapData {
        ca_cert_pem,
        ca_key_pem,
        service_account_key_pem,
    })
}

/// The files in `tls_dir` that exist and hold something other than `data` (missing files are
/// not listed).
pub fn differing_files(tls_dir: &Path, data: &BootstrapData) -> Result<Vec<PathBuf>, PkiError> {
    let mut out = Vec::new();
    for (name, _) in FILES {
        let path = tls_dir.join(name);
        if let Some(local) = read_opt(&path)?
            && local.trim() != data.file(name).trim()
        {
            out.push(path);
        }
    }
    Ok(out)
}

/// Writes the files of `data` that are missing from `tls_dir` (keys 0600, the CA certificate
/// 0644; existing files are left alone: check [`differing_files`] first). When the CA is
/// written, the certificates it signs are removed so that they are issued again by it.
/// Returns the names of the files written.
pub fn install(tls_dir: &Path, data: &BootstrapData) -> Result<Vec<&'static str>, PkiError> {
    std::fs::create_dir_all(tls_dir).map_err(crate::io_err(tls_dir))?;
    let mut written = Vec::new();
    for (name, mode) in FILES {
        let path = tls_dir.join(name);
        if read_opt(&path)?.is_none() {
            write_file(&path, data.file(name).as_bytes(), mode)?;
            written.push(name);
        }
    }
    if written.iter().any(|n| n.starts_with("ca.")) {
        for leaf in LEAVES {
            for ext in ["crt", "key"] {
                let path = tls_dir.join(format!("{leaf}.{ext}"));
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(crate::io_err(&path)(e)),
                }
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn data() -> BootstrapData {
        let (ca_cert_pem, ca_key_pem) = new_ca().unwrap();
        BootstrapData {
            ca_cert_pem,
            ca_key_pem,
            service_account_key_pem: new_service_account_key().unwrap(),
        }
    }

    #[test]
    fn round_trip_with_the_same_token() {
        let d = data();
        let rec = seal("s3cret", &d).unwrap();
        assert_eq!(open("s3cret", &rec).unwrap(), d);
    }

    #[test]
    fn wrong_token_fails_and_the_record_hides_the_keys() {
        let d = data();
        let rec = seal("s3cret", &d).unwrap();
        assert!(matches!(
            open("other", &rec),
            Err(BootstrapError::WrongToken)
        ));
        assert!(matches!(open("", &rec), Err(BootstrapError::WrongToken)));
        let text = String::from_utf8(rec).unwrap();
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        assert!(!text.contains("CERTIFICATE"), "{text}");
        // Fresh salt and nonce per seal.
        assert_ne!(seal("s3cret", &d).unwrap(), seal("s3cret", &d).unwrap());
    }

    #[test]
    fn altered_or_malformed_records_are_refused() {
        let d = data();
        let rec = seal("s3cret", &d).unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&rec).unwrap();
        let ct = b64().decode(v["ciphertext"].as_str().unwrap()).unwrap();
        let mut flipped = ct.clone();
        flipped[0] ^= 1;
        v["ciphertext"] = b64().encode(&flipped).into();
        let altered = serde_json::to_vec(&v).unwrap();
        assert!(matches!(
            open("s3cret", &altered),
            Err(BootstrapError::WrongToken)
        ));
        v["version"] = 2.into();
        let newer = serde_json::to_vec(&v).unwrap();
        assert!(matches!(
            open("s3cret", &newer),
            Err(BootstrapError::Malformed(_))
        ));
        assert!(matches!(
            open("s3cret", b"not json"),
            Err(BootstrapError::Malformed(_))
        ));
        v["version"] = 1.into();
        v["iterations"] = u32::MAX.into();
        let costly = serde_json::to_vec(&v).unwrap();
        assert!(matches!(
            open("s3cret", &costly),
            Err(BootstrapError::Malformed(_))
        ));
    }

    #[test]
    fn debug_shows_no_keys() {
        let s = format!("{:?}", data());
        assert!(!s.contains("PRIVATE"), "{s}");
        assert!(s.contains("ca_sha256"), "{s}");
    }

    #[test]
    fn install_writes_missing_files_with_modes_and_reissues_leaves() {
        let dir = tempfile::tempdir().unwrap();
        // A server that started alone: its own CA and a serving certificate signed by it.
        let own = crate::ensure_server_pki(dir.path(), &[]).unwrap();
        let cluster = data();
        assert_eq!(
            differing_files(dir.path(), &cluster).unwrap(),
            FILES
                .iter()
                .map(|(n, _)| dir.path().join(n))
                .collect::<Vec<_>>()
        );
        // The operator moves the old CA away: the cluster's is written, the leaves go.
        for (n, _) in FILES {
            std::fs::remove_file(dir.path().join(n)).unwrap();
        }
        assert_eq!(
            install(dir.path(), &cluster).unwrap(),
            vec!["ca.crt", "ca.key", "service.key"]
        );
        assert!(differing_files(dir.path(), &cluster).unwrap().is_empty());
        assert!(!dir.path().join("serving.crt").exists());
        for (n, mode) in FILES {
            let m = std::fs::metadata(dir.path().join(n))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(m & 0o777, mode, "{n}");
        }
        let pki = crate::ensure_server_pki(dir.path(), &[]).unwrap();
        assert_eq!(pki.ca_cert_pem, cluster.ca_cert_pem);
        assert_ne!(pki.serving_cert_pem, own.serving_cert_pem);
        assert_eq!(pki.service_account_key_pem, cluster.service_account_key_pem);
        // Nothing missing: nothing written.
        assert!(install(dir.path(), &cluster).unwrap().is_empty());
    }

    #[test]
    fn load_or_generate_uses_what_exists_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = load_or_generate(dir.path()).unwrap();
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
        install(dir.path(), &fresh).unwrap();
        assert_eq!(load_or_generate(dir.path()).unwrap(), fresh);
    }
}
