//! Image store tests: import (OCI layout, docker save; plain/gzip/zstd), digests, unpack with
//! whiteouts and opaque dirs under a real overlay mount, and refusal of escaping entries.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use crate::common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use common::*;
use skiff_runtime::ImageStore;

#[test]
fn imports_oci_layout_and_resolves_by_normalised_name() {
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(t.path().join("images")).unwrap();
    let layout = oci_layout(
        "busybox:latest",
        &[Blob {
            media_type: "application/vnd.oci.image.layer.v1.tar",
            data: busybox_layer(),
        }],
    );
    // The same archive as plain, gzip and zstd.
    for (i, bytes) in [layout.clone(), gzip(&layout), zstd(&layout)]
        .into_iter()
        .enumerate()
    {
        let p = t.path().join(format!("img{i}.tar"));
        fs::write(&p, bytes).unwrap();
        assert_eq!(
            store.import(&p, None).unwrap(),
            vec!["docker.io/library/busybox:latest".to_string()]
        );
    }
    let img = store.resolve("busybox").unwrap();
    assert_eq!(img.name, "docker.io/library/busybox:latest");
    assert_eq!(
        img.config.cmd.as_deref().unwrap(),
        ["sh", "-c", "echo from-image-cmd"]
    );
    let same = store.resolve(&img.manifest_digest).unwrap();
    assert_eq!(same.manifest_digest, img.manifest_digest);
    // Import unpacks, so the image's first container does not wait for it.
    for l in &img.manifest.layers {
        let dir = t
            .path()
            .join("images/layers/sha256")
            .join(&l.digest["sha256:".len()..]);
        assert!(dir.join("bin/busybox").is_file(), "{} unpacked", l.digest);
    }
    let list = store.list().unwrap();
    assert_eq!(list.len(), 1);
    // Every blob is stored under its own digest.
    for e in fs::read_dir(t.path().join("images/blobs/sha256"))
        .unwrap()
        .flatten()
    {
        let data = fs::read(e.path()).unwrap();
        assert_eq!(sha(&data)[7..], e.file_name().to_string_lossy());
    }
    // A bare tag as ref name (umoci style) needs a name to import under.
    let tagonly = t.path().join("tagonly.tar");
    fs::write(
        &tagonly,
        oci_layout(
            "stable",
            &[Blob {
                media_type: "application/vnd.oci.image.layer.v1.tar",
                data: busybox_layer(),
            }],
        ),
    )
    .unwrap();
    let e = store.import(&tagonly, None).unwrap_err().to_string();
    assert!(
        e.contains("no image name") && e.contains("give a name"),
        "{e}"
    );
    assert_eq!(
        store.import(&tagonly, Some("local/bb:stable")).unwrap(),
        vec!["docker.io/local/bb:stable".to_string()]
    );
    assert_eq!(store.list().unwrap().len(), 2);
    assert!(store.untag("local/bb:stable").unwrap());
    assert!(store.untag("busybox").unwrap());
    assert!(
        store
            .resolve("busybox")
            .unwrap_err()
            .to_string()
            .contains("not found")
    );
}

#[test]
fn imports_docker_save_with_repo_tags() {
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(t.path().join("images")).unwrap();
    let p = t.path().join("save.tar.gz");
    fs::write(
        &p,
        gzip(&docker_save(
            "skiff.local/busybox:dock",
            &[busybox_layer(), whiteout_layer()],
        )),
    )
    .unwrap();
    assert_eq!(
        store.import(&p, None).unwrap(),
        vec!["skiff.local/busybox:dock".to_string()]
    );
    let img = store.resolve("skiff.local/busybox:dock").unwrap();
    assert_eq!(img.manifest.layers.len(), 2);
    assert_eq!(
        img.manifest.layers[0].media_type,
        "application/vnd.oci.image.layer.v1.tar"
    );
    assert_eq!(
        img.config.env.as_deref().unwrap(),
        ["PATH=/bin", "FROM_IMAGE=yes"]
    );
}

#[test]
fn rejects_blob_whose_content_does_not_match_its_name() {
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(t.path().join("images")).unwrap();
    let bad = layer_tar(&[
        E::File(
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            0o644,
        ),
        E::File(
            format!("blobs/sha256/{}", "0".repeat(64)),
            b"not what the name says".to_vec(),
            0o644,
        ),
    ]);
    let p = t.path().join("bad.tar");
    fs::write(&p, bad).unwrap();
    let e = store.import(&p, None).unwrap_err().to_string();
    assert!(e.contains("digest mismatch"), "{e}");
    // Nothing half-written is visible.
    assert!(
        !t.path()
            .join("images/blobs/sha256")
            .join("0".repeat(64))
            .exists()
    );
}

#[test]
fn layer_with_parent_dir_entries_is_rejected() {
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(t.path().join("images")).unwrap();
    for (path, why) in [
        ("../escape", "'..'"),
        ("a/../../escape", "'..'"),
        ("/etc/evil", "absolute"),
    ] {
        let (digest, _) = store
            .write_blob(&mut &raw_tar_entry(path, b"x")[..], None)
            .unwrap();
        let e = store.unpack(&digest).unwrap_err().to_string();
        assert!(
            e.contains("escapes the layer root") && e.contains(why),
            "{path}: {e}"
        );
        assert!(!t.path().join("escape").exists() && !t.path().join("images/escape").exists());
    }
    // Writing through a symlink that the layer itself planted.
    let evil = layer_tar(&[
        E::Link("link".into(), "/tmp".into()),
        E::File("link/planted".into(), b"x".to_vec(), 0o644),
    ]);
    let (digest, _) = store.write_blob(&mut &evil[..], None).unwrap();
    let e = store.unpack(&digest).unwrap_err().to_string();
    assert!(e.contains("symlink"), "{e}");
    assert!(!std::path::Path::new("/tmp/planted").exists());
    // No half-unpacked layer stays behind.
    assert_eq!(
        fs::read_dir(t.path().join("images/layers/sha256"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        fs::read_dir(t.path().join("images/tmp")).unwrap().count(),
        0
    );
}

#[test]
fn whiteouts_and_opaque_dirs_hide_lower_content_in_the_overlay() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let store = store_with_busybox(&t.path().join("images"));
    let img = store.resolve(TEST_IMAGE).unwrap();
    let layers = store.unpacked_layers(&img).unwrap();
    assert_eq!(layers.len(), 2);
    // Overlay-native form in the upper layer dir.
    let wh = fs::symlink_metadata(layers[1].join("data/del")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout is a 0/0 char device"
    );
    let mut v = [0u8; 4];
    let p = std::ffi::CString::new(layers[1].join("opq").to_str().unwrap()).unwrap();
    // SAFETY: valid NUL-terminated strings; the buffer is v.len() bytes long.
    let n = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            v.as_mut_ptr().cast(),
            v.len(),
        )
    };
    assert!(n > 0, "trusted.overlay.opaque is set on /opq");
    assert_eq!(&v[..n as usize], b"y");
    // Unpacked once: a second call reuses the dir.
    let ino = fs::metadata(&layers[0]).unwrap().ino();
    assert_eq!(
        fs::metadata(&store.unpacked_layers(&img).unwrap()[0])
            .unwrap()
            .ino(),
        ino
    );
    // Mount like a container rootfs and look.
    let m = t.path().join("mnt");
    for d in ["mnt", "upper", "work"] {
        fs::create_dir(t.path().join(d)).unwrap();
    }
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        layers[1].display(),
        layers[0].display(),
        t.path().join("upper").display(),
        t.path().join("work").display()
    );
    nix::mount::mount(
        Some("overlay"),
        &m,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .unwrap();
    let seen = (
        m.join("data/keep").exists(),
        m.join("data/del").exists(),
        m.join("opq/old").exists(),
        m.join("opq/new").exists(),
        m.join("bin/busybox").exists(),
    );
    nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert_eq!(
        seen,
        (true, false, false, true, true),
        "(keep, del, old, new, busybox)"
    );
    let bb = fs::metadata(layers[0].join("bin/busybox")).unwrap();
    assert_eq!(bb.mode() & 0o7777, 0o755);
    assert_eq!(
        fs::read_link(layers[0].join("bin/sh")).unwrap(),
        std::path::Path::new("busybox")
    );
    assert_eq!(
        fs::metadata(layers[0].join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
}

#[test]
fn layer_xattrs_are_filtered() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(t.path().join("images")).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mode(0o644);
    h.set_mtime(1);
    h.set_size(2);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_pax_extensions([
        ("SCHILY.xattr.user.kept", &b"yes"[..]),
        ("SCHILY.xattr.trusted.overlay.redirect", &b"/etc"[..]),
    ])
    .unwrap();
    b.append_data(&mut h, "f", &b"hi"[..]).unwrap();
    let data = b.into_inner().unwrap();
    let (digest, _) = store.write_blob(&mut &data[..], None).unwrap();
    let dir = store.unpack(&digest).unwrap();
    let get = |name: &str| {
        let p = std::ffi::CString::new(dir.join("f").to_str().unwrap()).unwrap();
        let n = std::ffi::CString::new(name).unwrap();
        let mut v = [0u8; 16];
        // SAFETY: valid NUL-terminated strings; the buffer is v.len() bytes long.
        let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        (r >= 0).then(|| v[..r as usize].to_vec())
    };
    assert_eq!(get("user.kept").as_deref(), Some(&b"yes"[..]));
    assert_eq!(
        get("trusted.overlay.redirect"),
        None,
        "trusted.* from a layer is dropped"
    );
    assert_eq!(std::fs::read(dir.join("f")).unwrap(), b"hi");
}
