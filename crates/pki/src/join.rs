//! Joining nodes, as k3s does it: the server's cluster secret (`<server>/token`), the full join
//! token `K10<sha256 hex of the CA bundle>::server:<secret>` (`<server>/node-token`), parsing
//! and checking such tokens, and the certificates the server issues to a joining node (a client
//! certificate `system:node:<name>` in `system:nodes`, a `system:kube-proxy` client certificate
//! and a kubelet serving certificate for the node's name and IP), signed by the cluster CA.

use std::fs;
use std::net::IpAddr;
use std::path::Path;

use rcgen::{ExtendedKeyUsagePurpose, Issuer, KeyPair};
use sha2::Digest;

use crate::{PkiError, gen_err, io_err, leaf_params, read_opt, write_file};

/// The prefix of a full join token (k3s's format version 1).
pub const TOKEN_PREFIX: &str = "K10";

/// The user name written into full tokens (`K10<hash>::server:<secret>`).
pub const TOKEN_USER: &str = "server";

/// A parsed join token. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 (lower-case hex) of the CA bundle the server serves at `/cacerts`; None for a
    /// bare secret (the CA is then trusted on first use).
    pub ca_hash: Option<String>,
    /// User name of the credentials (`server` when the token names none).
    pub username: String,
    /// The cluster secret.
    pub password: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_hash", &self.ca_hash)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why a join token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token is empty.
    #[error("the join token is empty")]
    Empty,
    /// A `K10` token whose CA hash is not 64 hex digits.
    #[error(
        "the join token's CA hash is not 64 hex digits (expected K10<sha256 of the CA>::server:<secret>)"
    )]
    BadHash,
    /// A `K10` token without `::<credentials>`.
    #[error("the join token has no credentials after `::` (expected K10<hash>::server:<secret>)")]
    NoCredentials,
}

/// SHA-256 of `data` as lower-case hex (how a token names the CA bundle).
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

/// The full join token for a CA bundle and a cluster secret.
pub fn format_token(ca_pem: &str, secret: &str) -> String {
    format!(
        "{TOKEN_PREFIX}{}::{TOKEN_USER}:{secret}",
        sha256_hex(ca_pem.as_bytes())
    )
}

/// Parses a full token (`K10<hash>::[user:]secret`) or a bare secret.
pub fn parse_token(token: &str) -> Result<JoinToken, TokenError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    let Some(rest) = token.strip_prefix(TOKEN_PREFIX) else {
        return Ok(JoinToken {
            ca_hash: None,
            username: TOKEN_USER.into(),
            password: token.to_string(),
        });
    };
    let (hash, creds) = rest.split_once("::").ok_or(TokenError::NoCredentials)?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TokenError::BadHash);
    }
    let (username, password) = match creds.split_once(':') {
        Some((u, p)) => (u.to_string(), p.to_string()),
        None => (TOKEN_USER.to_string(), creds.to_string()),
    };
    if password.is_empty() {
        return Err(TokenError::NoCredentials);
    }
    Ok(JoinToken {
        ca_hash: Some(hash.to_ascii_lowercase()),
        username,
        password,
    })
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random cluster secret (32 hex digits).
pub fn random_secret() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

/// The server's cluster secret: `given` (`--token`, which may also be a full `K10` token: its
/// secret is used), else the one stored in `<server_dir>/token`, else a fresh random one. The
/// secret is (re)written to `<server_dir>/token` and the full join token to
/// `<server_dir>/node-token`, both mode 0600. Returns the secret.
pub fn ensure_server_token(
    server_dir: &Path,
    given: Option<&str>,
    ca_pem: &str,
) -> Result<String, PkiError> {
    fs::create_dir_all(server_dir).map_err(io_err(server_dir))?;
    let token_path = server_dir.join("token");
    let secret = match given.map(str::trim).filter(|s| !s.is_empty()) {
        Some(g) => match parse_token(g) {
            Ok(t) => t.password,
            Err(_) => g.to_string(),
        },
        None => match read_opt(&token_path)?
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
        {
            Some(s) => s,
            None => random_secret(),
        },
    };
    write_file(&token_path, format!("{secret}\n").as_bytes(), 0o600)?;
    write_file(
        &server_dir.join("node-token"),
        format!("{}\n", format_token(ca_pem, &secret)).as_bytes(),
        0o600,
    )?;
    Ok(secret)
}

/// What a joining node gets from the server. `Debug` never shows the keys.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeCerts {
    /// Client certificate CN=`system:node:<name>`, O=`system:nodes` (PEM).
    pub node_cert_pem: String,
    /// Its key (PEM).
    pub node_key_pem: String,
    /// Client certificate CN=`system:kube-proxy` (PEM).
    pub proxy_cert_pem: String,
    /// Its key (PEM).
    pub proxy_key_pem: String,
    /// Kubelet serving certificate for the node's name and IP (PEM).
    pub serving_cert_pem: String,
    /// Its key (PEM).
    pub serving_key_pem: String,
}

impl std::fmt::Debug for NodeCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCerts").finish_non_exhaustive()
    }
}

/// Whether `name` is a valid node name (a DNS subdomain: lower-case alphanumerics, `-` and `.`,
/// at most 253 bytes, starting and ending alphanumeric), as kube-apiserver requires.
pub fn valid_node_name(name: &str) -> bool {
    let ok_end = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    !name.is_empty()
        && name.len() <= 253
        && ok_end(name.bytes().next())
        && ok_end(name.bytes().last())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Issues a joining node's certificates with the CA in `pki_dir` (`ca.crt`, `ca.key`, as
/// [`crate::ensure_server_pki`] writes them). The kubelet serving certificate's SANs are the
/// node name, `node_ip`, `localhost` and `127.0.0.1`.
pub fn issue_node_certs(
    pki_dir: &Path,
    node_name: &str,
    node_ip: Option<IpAddr>,
) -> Result<NodeCerts, PkiError> {
    if !valid_node_name(node_name) {
        return Err(PkiError::Invalid {
            path: pki_dir.to_path_buf(),
            detail: format!("{node_name:?} is not a valid node name"),
        });
    }
    let ca_crt = pki_dir.join("ca.crt");
    let ca_key = pki_dir.join("ca.key");
    let missing = |p: &Path| PkiError::Invalid {
        path: p.to_path_buf(),
        detail: "missing".into(),
    };
    let ca_cert_pem = read_opt(&ca_crt)?.ok_or_else(|| missing(&ca_crt))?;
    let ca_key_pem = read_opt(&ca_key)?.ok_or_else(|| missing(&ca_key))?;
    let keypair = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::Invalid {
        path: ca_key.clone(),
        detail: e.to_string(),
    })?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_cert_pem, keypair).map_err(|e| PkiError::Invalid {
            path: ca_crt.clone(),
            detail: e.to_string(),
        })?;
    let sign = |params: rcgen::CertificateParams| -> Result<(String, String), PkiError> {
        let key = KeyPair::generate().map_err(gen_err("node key"))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(gen_err("node certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (node_cert_pem, node_key_pem) = sign(leaf_params(
        &format!("system:node:{node_name}"),
        &["system:nodes"],
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?)?;
    let (proxy_cert_pem, proxy_key_pem) = sign(leaf_params(
        "system:kube-proxy",
        &[],
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?)?;
    let mut sans = vec![
        node_name.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    if let Some(ip) = node_ip
        && !sans.contains(&ip.to_string())
    {
        sans.push(ip.to_string());
    }
    let (serving_cert_pem, serving_key_pem) = sign(leaf_params(
        node_name,
        &[],
        &sans,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?)?;
    Ok(NodeCerts {
        node_cert_pem,
        node_key_pem,
        proxy_cert_pem,
        proxy_key_pem,
        serving_cert_pem,
        serving_key_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let ca = "-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n";
        let full = format_token(ca, "s3cret");
        assert!(full.starts_with("K10"), "{full}");
        let t = parse_token(&full).unwrap();
        assert_eq!(
            t.ca_hash.as_deref(),
            Some(sha256_hex(ca.as_bytes()).as_str())
        );
        assert_eq!(
            (t.username.as_str(), t.password.as_str()),
            ("server", "s3cret")
        );
        assert!(!format!("{t:?}").contains("s3cret"));
        let bare = parse_token("just-a-secret").unwrap();
        assert_eq!(bare.ca_hash, None);
        assert_eq!(bare.password, "just-a-secret");
        let no_user = parse_token(&format!("K10{}::pw", "a".repeat(64))).unwrap();
        assert_eq!(
            (no_user.username.as_str(), no_user.password.as_str()),
            ("server", "pw")
        );
        assert_eq!(parse_token("  "), Err(TokenError::Empty));
        assert_eq!(parse_token("K10abc::server:x"), Err(TokenError::BadHash));
        assert_eq!(
            parse_token(&format!("K10{}", "a".repeat(64))),
            Err(TokenError::NoCredentials)
        );
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn server_token_is_generated_once_and_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("server");
        let a = ensure_server_token(&dir, None, "CA").unwrap();
        assert_eq!(a.len(), 32);
        let b = ensure_server_token(&dir, None, "CA").unwrap();
        assert_eq!(a, b, "the secret must survive a restart");
        for f in ["token", "node-token"] {
            let mode = fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let node_token = fs::read_to_string(dir.join("node-token")).unwrap();
        assert_eq!(node_token.trim(), format_token("CA", &a));
        let c = ensure_server_token(&dir, Some("given"), "CA").unwrap();
        assert_eq!(c, "given");
        let d = ensure_server_token(&dir, Some(&format_token("CA", "inner")), "CA").unwrap();
        assert_eq!(d, "inner");
    }

    #[test]
    fn node_certs_are_signed_by_the_cluster_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        let pki = crate::ensure_server_pki(&dir, &[]).unwrap();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let certs = issue_node_certs(&dir, "worker-1", Some(ip)).unwrap();
        let node = crate::cert_info_pem(&certs.node_cert_pem).unwrap();
        assert_eq!(node.common_name, "system:node:worker-1");
        assert_eq!(node.organizations, vec!["system:nodes"]);
        let proxy = crate::cert_info_pem(&certs.proxy_cert_pem).unwrap();
        assert_eq!(proxy.common_name, "system:kube-proxy");
        let serving = crate::cert_info_pem(&certs.serving_cert_pem).unwrap();
        for s in ["worker-1", "192.0.2.9", "localhost", "127.0.0.1"] {
            assert!(serving.sans.contains(&s.to_string()), "missing SAN {s}");
        }
        // Each chains to the CA: the issuer is the CA's subject and the signature verifies.
        let ca_der = &crate::pem_certs_der(&pki.ca_cert_pem)[0];
        let (_, ca) = x509_parser::parse_x509_certificate(ca_der).unwrap();
        for pem in [
            &certs.node_cert_pem,
            &certs.serving_cert_pem,
            &certs.proxy_cert_pem,
        ] {
            let der = &crate::pem_certs_der(pem)[0];
            let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
            assert_eq!(c.issuer(), ca.subject());
            c.verify_signature(Some(ca.public_key())).unwrap();
        }
        assert!(!format!("{certs:?}").contains("PRIVATE"));
        assert!(issue_node_certs(&dir, "Bad_Name", None).is_err());
        assert!(issue_node_certs(&tmp.path().join("nowhere"), "n", None).is_err());
    }
}
