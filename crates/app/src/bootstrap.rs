//! Bootstrap data for servers sharing an external datastore, as k3s does it: the first server
//! saves the cluster CA and service-account key to the datastore, sealed with the cluster token
//! (`skiff_pki::bootstrap`); later servers must be given that token, and take the CA and key
//! from there into their own `server/tls` before issuing their own certificates. The datastore
//! is authoritative: a server whose files differ from it stops (exit 2) rather than serve with
//! another CA, as k3s refuses to start when its on-disk bootstrap files differ from the
//! datastore's.

use std::path::Path;

use skiff_pki::bootstrap::{self, BootstrapError};
use skiff_pki::join;
use skiff_store::{Store, StoreError};

use crate::server::AppError;

/// The store key of the sealed record (outside `/registry`, so no API resource sees it).
pub(crate) const KEY: &str = "/skiff/bootstrap";

/// Where the secret in use came from, for the messages.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Source {
    Flag,
    File,
}

/// Makes this server's `server/tls` hold the cluster's CA and service-account key from the
/// datastore, saving them there first if this is the first server. `given` is `--token` (a
/// bare secret or a full `K10` token). Returns the cluster secret to use.
pub(crate) async fn reconcile(
    store: &dyn Store,
    data_dir: &Path,
    given: Option<&str>,
) -> Result<String, AppError> {
    let server_dir = data_dir.join("server");
    let tls_dir = server_dir.join("tls");
    let token_file = server_dir.join("token");
    let given =
        given
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|g| match join::parse_token(g) {
                Ok(t) => (t.password, t.ca_hash),
                Err(_) => (g.to_string(), None),
            });
    let (secret, source, ca_hash) = match given {
        Some((s, hash)) => (Some(s), Source::Flag, hash),
        None => {
            let local = match std::fs::read_to_string(&token_file) {
                Ok(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(AppError::Io {
                        what: format!("reading {}", token_file.display()),
                        source: e,
                    });
                }
            };
            (local, Source::File, None)
        }
    };

    // Twice at most: a server that loses the race to create the record reads the winner's.
    for _ in 0..2 {
        if let Some(kv) = store.get(KEY).await? {
            let Some(secret) = secret.as_deref() else {
                return Err(AppError::Config(format!(
                    "the datastore (--datastore-endpoint) already holds the bootstrap data of a \
                     cluster (its CA and service-account key, key {KEY}): start this server with \
                     --token set to that cluster's token (the contents of <data-dir>/server/token \
                     on a server already using this datastore)"
                )));
            };
            let data = match bootstrap::open(secret, &kv.value) {
                Ok(d) => d,
                Err(BootstrapError::WrongToken) => {
                    let which = match source {
                        Source::Flag => "the --token given".to_string(),
                        Source::File => format!("the token in {}", token_file.display()),
                    };
                    return Err(AppError::Config(format!(
                        "the cluster's bootstrap data in the datastore (--datastore-endpoint) is \
                         encrypted with a different token than {which}: start this server with \
                         --token set to the token of the servers already using this datastore \
                         (the contents of <data-dir>/server/token on one of them)"
                    )));
                }
                Err(e) => {
                    return Err(AppError::Config(format!(
                        "the datastore's key {KEY} cannot be used: {e}; it was not written by \
                         this version of skiff"
                    )));
                }
            };
            if let Some(hash) = ca_hash {
                let actual = join::sha256_hex(data.ca_cert_pem.as_bytes());
                if hash != actual {
                    return Err(AppError::Config(format!(
                        "the --token names CA hash {hash}, but the cluster's CA in the datastore \
                         has hash {actual}: use the node-token of a server of this cluster, or \
                         its bare secret"
                    )));
                }
            }
            let differing = bootstrap::differing_files(&tls_dir, &data)?;
            if !differing.is_empty() {
                let list: Vec<String> = differing.iter().map(|p| p.display().to_string()).collect();
                return Err(AppError::Config(format!(
                    "{} differ from the cluster's bootstrap data in the datastore \
                     (--datastore-endpoint), which is authoritative: move them away and restart \
                     (the cluster's CA and keys are written in their place and this server's \
                     certificates are issued again by the cluster CA), or give this server a \
                     datastore of its own",
                    list.join(", ")
                )));
            }
            let written = bootstrap::install(&tls_dir, &data)?;
            tracing::info!(
                dir = %tls_dir.display(),
                written = ?written,
                ca_sha256 = %join::sha256_hex(data.ca_cert_pem.as_bytes()),
                "using the cluster's bootstrap data from the datastore"
            );
            return Ok(secret.to_string());
        }
        let secret = secret.clone().unwrap_or_else(join::random_secret);
        let data = bootstrap::load_or_generate(&tls_dir)?;
        let sealed = bootstrap::seal(&secret, &data)
            .map_err(|e| AppError::Tls(format!("sealing the bootstrap data: {e}")))?;
        match store.create(KEY, bytes::Bytes::from(sealed)).await {
            Ok(_) => {
                let written = bootstrap::install(&tls_dir, &data)?;
                tracing::info!(
                    dir = %tls_dir.display(),
                    written = ?written,
                    ca_sha256 = %join::sha256_hex(data.ca_cert_pem.as_bytes()),
                    "saved the cluster's bootstrap data to the datastore"
                );
                return Ok(secret);
            }
            Err(StoreError::AlreadyExists { .. }) => {
                tracing::info!("another server saved the bootstrap data first; reading it");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(AppError::Store(StoreError::Unavailable(format!(
        "the datastore's key {KEY} was created by another server and is gone again"
    ))))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join("server/tls").join(name)).unwrap()
    }

    fn config_error(r: Result<String, AppError>) -> String {
        match r {
            Err(e @ AppError::Config(_)) => {
                assert_eq!(e.exit_code(), 2);
                e.to_string()
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn servers_with_the_same_token_share_the_ca_and_key() {
        let store = skiff_store::memory();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sa = reconcile(store.as_ref(), a.path(), None).await.unwrap();
        // The first server's token is random; the second is given it.
        let sb = reconcile(store.as_ref(), b.path(), Some(&sa))
            .await
            .unwrap();
        assert_eq!(sa, sb);
        for f in ["ca.crt", "ca.key", "service.key"] {
            assert_eq!(read(a.path(), f), read(b.path(), f), "{f}");
        }
        // A full K10 token works too, and a restart without --token reads server/token.
        std::fs::write(b.path().join("server/token"), format!("{sa}\n")).unwrap();
        let k10 = join::format_token(&read(a.path(), "ca.crt"), &sa);
        let c = tempfile::tempdir().unwrap();
        assert_eq!(
            reconcile(store.as_ref(), c.path(), Some(&k10))
                .await
                .unwrap(),
            sa
        );
        assert_eq!(reconcile(store.as_ref(), b.path(), None).await.unwrap(), sa);
    }

    #[tokio::test]
    async fn missing_or_wrong_token_is_refused_with_what_to_do() {
        let store = skiff_store::memory();
        let a = tempfile::tempdir().unwrap();
        reconcile(store.as_ref(), a.path(), Some("right"))
            .await
            .unwrap();
        let b = tempfile::tempdir().unwrap();
        let m = config_error(reconcile(store.as_ref(), b.path(), None).await);
        assert!(m.contains("start this server with --token"), "{m}");
        let m = config_error(reconcile(store.as_ref(), b.path(), Some("wrong")).await);
        assert!(m.contains("encrypted with a different token"), "{m}");
        assert!(m.contains("--token"), "{m}");
        let bad_hash = format!("K10{}::server:right", "0".repeat(64));
        let m = config_error(reconcile(store.as_ref(), b.path(), Some(&bad_hash)).await);
        assert!(m.contains("CA hash"), "{m}");
        // Nothing was written for the refused server.
        assert!(!b.path().join("server/tls/ca.key").exists());
    }

    #[tokio::test]
    async fn a_different_local_ca_stops_the_server_until_moved_away() {
        let store = skiff_store::memory();
        let a = tempfile::tempdir().unwrap();
        reconcile(store.as_ref(), a.path(), Some("t"))
            .await
            .unwrap();
        // b ran alone before (its own CA and certificates), then is pointed at a's datastore.
        let b = tempfile::tempdir().unwrap();
        skiff_pki::ensure_server_pki(&b.path().join("server/tls"), &[]).unwrap();
        let m = config_error(reconcile(store.as_ref(), b.path(), Some("t")).await);
        assert!(m.contains("ca.crt") && m.contains("move them away"), "{m}");
        for f in ["ca.crt", "ca.key", "service.key"] {
            std::fs::remove_file(b.path().join("server/tls").join(f)).unwrap();
        }
        reconcile(store.as_ref(), b.path(), Some("t"))
            .await
            .unwrap();
        assert_eq!(read(a.path(), "ca.crt"), read(b.path(), "ca.crt"));
        assert!(!b.path().join("server/tls/serving.crt").exists());
    }

    #[tokio::test]
    async fn the_first_server_saves_its_existing_ca() {
        let store = skiff_store::memory();
        let a = tempfile::tempdir().unwrap();
        let pki = skiff_pki::ensure_server_pki(&a.path().join("server/tls"), &[]).unwrap();
        reconcile(store.as_ref(), a.path(), Some("t"))
            .await
            .unwrap();
        assert_eq!(read(a.path(), "ca.crt"), pki.ca_cert_pem);
        let b = tempfile::tempdir().unwrap();
        reconcile(store.as_ref(), b.path(), Some("t"))
            .await
            .unwrap();
        assert_eq!(read(b.path(), "ca.crt"), pki.ca_cert_pem);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn servers_starting_together_agree_on_one_ca() {
        let store = skiff_store::memory();
        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        let runs = dirs.iter().map(|d| {
            let (store, path) = (store.clone(), d.path().to_path_buf());
            tokio::spawn(async move { reconcile(store.as_ref(), &path, Some("t")).await })
        });
        for r in futures::future::join_all(runs).await {
            assert_eq!(r.unwrap().unwrap(), "t");
        }
        for d in &dirs[1..] {
            assert_eq!(read(d.path(), "ca.crt"), read(dirs[0].path(), "ca.crt"));
            assert_eq!(
                read(d.path(), "service.key"),
                read(dirs[0].path(), "service.key")
            );
        }
    }
}
