//! The etcd backend over TLS with client certificates, against a real etcd configured with
//! `--client-cert-auth` (certificates made by rcgen for the test).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;

use bytes::Bytes;
use futures::StreamExt;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use skiff_store::testing::{EtcdServer, EtcdServerTls};
use skiff_store::{EtcdOptions, EtcdTls, StoreError, connect_etcd};

fn write(dir: &Path, name: &str, pem: String) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pem).unwrap();
    p
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
fn make_pki(dir: &Path) -> EtcdServerTls {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |names: Vec<String>, eku: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(names).unwrap();
        p.extended_key_usages = vec![eku];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (srv_cert, srv_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (cli_cert, cli_key) = leaf(vec!["skiff".into()], ExtendedKeyUsagePurpose::ClientAuth);
    let ca_file = write(dir, "ca.pem", ca_cert.pem());
    EtcdServerTls {
        ca_file: ca_file.clone(),
        cert_file: write(dir, "server.pem", srv_cert),
        key_file: write(dir, "server-key.pem", srv_key),
        client: EtcdTls {
            ca_file,
            cert_file: Some(write(dir, "client.pem", cli_cert)),
            key_file: Some(write(dir, "client-key.pem", cli_key)),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_over_tls_with_client_certificates() {
    let pki = tempfile::tempdir().unwrap();
    let tls = make_pki(pki.path());
    let server = EtcdServer::start_tls(&tls)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(server.endpoint().starts_with("https://"));

    let store = connect_etcd(
        &server.endpoints(),
        EtcdOptions {
            tls: Some(tls.client.clone()),
            compaction_window: None,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut w = store.watch("/tls/", 0).await.unwrap();
    let kv = store
        .create("/tls/a", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(store.get("/tls/a").await.unwrap(), Some(kv.clone()));
    let ev = tokio::time::timeout(std::time::Duration::from_secs(10), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.revision(), kv.mod_revision);

    // without a client certificate, etcd refuses the connection
    let refused = connect_etcd(
        &server.endpoints(),
        EtcdOptions {
            tls: Some(EtcdTls {
                ca_file: tls.ca_file.clone(),
                cert_file: None,
                key_file: None,
            }),
            connect_timeout: std::time::Duration::from_secs(3),
            compaction_window: None,
        },
    )
    .await;
    match refused {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("not reachable"), "{msg}"),
        Err(e) => panic!("expected Unavailable, got {e:?}"),
        Ok(_) => panic!("etcd with --client-cert-auth accepted a client without a certificate"),
    }

    // a missing CA file is a clear error naming the file
    let missing = pki.path().join("nope.pem");
    match connect_etcd(
        &server.endpoints(),
        EtcdOptions {
            tls: Some(EtcdTls {
                ca_file: missing.clone(),
                cert_file: None,
                key_file: None,
            }),
            ..Default::default()
        },
    )
    .await
    {
        Err(e) => assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        ),
        Ok(_) => panic!("connected with a missing CA file"),
    }
}
