//! Test images without a registry: tar layers built in memory, the base layer from the host's
//! static busybox. No other test helper here, so other crates' tests include this file too
//! (`#[path]`): the kubelet's CRI tests build their containerd images with it.
#![allow(dead_code, clippy::unwrap_used)]

use sha2::{Digest, Sha256};

pub const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "hostname", "id", "touch", "ls", "grep", "head", "dd", "true",
    "false", "test", "mkdir", "rm", "env", "wc", "yes", "tail", "ps", "kill", "mount", "httpd",
    "stty", "pwd",
];

pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (namespaces, cgroups, overlay mounts): run it as root, as CI does"
    );
}

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// One file-system entry of a test layer.
pub enum E {
    Dir(&'static str, u32),
    File(String, Vec<u8>, u32),
    Link(String, String),
    Hard(String, String),
}

pub fn layer_tar(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match e {
            E::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
            E::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, &data[..]).unwrap();
            }
            E::Link(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            E::Hard(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// The base layer: busybox, applet links, passwd/group, and a few dirs for tests.
pub fn busybox_layer() -> Vec<u8> {
    let bb = std::fs::read("/usr/bin/busybox")
        .expect("Debian busybox-static must be installed (/usr/bin/busybox)");
    let mut es = vec![
        E::Dir("bin/", 0o755),
        E::Dir("etc/", 0o755),
        E::Dir("tmp/", 0o1777),
        E::Dir("proc/", 0o755),
        E::Dir("sys/", 0o755),
        E::Dir("dev/", 0o755),
        E::Dir("root/", 0o700),
        E::Dir("data/", 0o755),
        E::Dir("opq/", 0o755),
        E::File("bin/busybox".into(), bb, 0o755),
        E::File("etc/passwd".into(), b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n".to_vec(), 0o644),
        E::File("etc/group".into(), b"root:x:0:\napp:x:1000:\nnogroup:x:65534:\n".to_vec(), 0o644),
        E::File("data/keep".into(), b"keep\n".to_vec(), 0o644),
        E::File("data/del".into(), b"delete me\n".to_vec(), 0o644),
        E::File("opq/old".into(), b"old\n".to_vec(), 0o644),
        E::File("root-owned".into(), b"root\n".to_vec(), 0o644),
    ];
    for a in APPLETS {
        es.push(E::Link(format!("bin/{a}"), "busybox".into()));
    }
    layer_tar(&es)
}
