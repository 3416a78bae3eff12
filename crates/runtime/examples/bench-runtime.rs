//! `make bench-runtime`: create+start+wait+delete of `/bin/true` in a busybox image, skiff (shim
//! included) against Debian's runc on the same OCI bundle; also layer unpack throughput, and the
//! pull time of an image from Debian's docker-registry on 127.0.0.1 against `skopeo copy` of the
//! same image from the same registry (the image archive: `BENCH_PULL_IMAGE`, default
//! `build/images/nginx.tar`). Needs root.
//! Usage: bench-runtime SHIM [ITERATIONS]   (SHIM: "/path/to/skiff shim")
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark program, not library code

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use skiff_runtime::spec::{Placement, build_spec};
use skiff_runtime::{BuiltinRuntime, ContainerConfig, ImageStore, RuntimeConfig};

fn hdr() -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

fn layer_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let bb =
        std::fs::read("/usr/bin/busybox").expect("busybox-static is needed (/usr/bin/busybox)");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        let mut h = hdr();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, format!("{d}/"), std::io::empty())
            .unwrap();
    }
    let mut h = hdr();
    h.set_mode(0o755);
    h.set_size(bb.len() as u64);
    b.append_data(&mut h, "bin/busybox", &bb[..]).unwrap();
    for a in ["sh", "true"] {
        let mut h = hdr();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, format!("bin/{a}"), "busybox")
            .unwrap();
    }
    b.into_inner().unwrap()
}

fn sha(d: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(d)))
}

fn import(store: &ImageStore, dir: &Path) {
    let layer = layer_tar();
    let cfg = br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/true"]}}"#.to_vec();
    let manifest = serde_json::to_vec(&serde_json::json!({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":sha(&cfg),"size":cfg.len()},
        "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":sha(&layer),"size":layer.len()}]}))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "digest":sha(&manifest),"size":manifest.len(),"annotations":{"org.opencontainers.image.ref.name":"bench.local/busybox:latest"}}]}))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (p, d) in [
        (
            "oci-layout".to_string(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".into(), index),
    ]
    .into_iter()
    .chain(
        [cfg, manifest, layer]
            .into_iter()
            .map(|d| (format!("blobs/sha256/{}", &sha(&d)[7..]), d)),
    ) {
        let mut h = hdr();
        h.set_mode(0o644);
        h.set_size(d.len() as u64);
        b.append_data(&mut h, p, &d[..]).unwrap();
    }
    let p = dir.join("bench.tar");
    std::fs::write(&p, b.into_inner().unwrap()).unwrap();
    store.import(&p, None).unwrap();
}

fn report(what: &str, times: &mut [Duration]) -> f64 {
    times.sort();
    let mean = times.iter().sum::<Duration>().as_secs_f64() * 1000.0 / times.len() as f64;
    let p50 = times[times.len() / 2].as_secs_f64() * 1000.0;
    println!(
        "{what:<40} mean {mean:7.2} ms   p50 {p50:7.2} ms   (n={})",
        times.len()
    );
    mean
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let shim: Vec<std::ffi::OsString> = args
        .get(1)
        .expect("usage: bench-runtime \"/path/to/skiff shim\" [N]")
        .split_whitespace()
        .map(Into::into)
        .collect();
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(30);
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "bench-runtime needs root"
    );
    let dir = tempfile::Builder::new()
        .prefix("skiff-bench-rt-")
        .tempdir_in("/tmp")
        .unwrap();
    let store = ImageStore::open(dir.path().join("images")).unwrap();
    import(&store, dir.path());
    let img = store.resolve("bench.local/busybox:latest").unwrap();
    let size = img.manifest.layers[0].size as f64;
    let t0 = Instant::now();
    store.unpacked_layers(&img).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{:<40} {:7.1} MB/s ({:.1} MB in {:.1} ms)",
        "layer unpack (uncompressed tar)",
        size / secs / 1e6,
        size / 1e6,
        secs * 1000.0
    );

    let cgroup = format!("skiff-bench-{}", std::process::id());
    let rt = BuiltinRuntime::new(RuntimeConfig {
        state_dir: dir.path().join("rt"),
        images: store.clone(),
        shim_command: shim,
        cgroup_parent: cgroup.clone(),
    })
    .unwrap();
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let mut skiff = Vec::new();
    tokio.block_on(async {
        for i in 0..n + 2 {
            let cfg = ContainerConfig {
                name: "bench".into(),
                image: "bench.local/busybox:latest".into(),
                ..Default::default()
            };
            let t = Instant::now();
            let id = rt
                .create(None, cfg, dir.path().join("bench.log"))
                .await
                .unwrap();
            let t1 = t.elapsed();
            rt.start(&id).await.unwrap();
            let t2 = t.elapsed();
            let st = rt.wait(&id, Duration::from_secs(30)).await.unwrap();
            let t3 = t.elapsed();
            assert_eq!(st.exit_code, Some(0));
            rt.remove(&id).await.unwrap();
            if std::env::var_os("BENCH_PHASES").is_some() {
                eprintln!(
                    "create {t1:?} start {:?} wait {:?} remove {:?}",
                    t2 - t1,
                    t3 - t2,
                    t.elapsed() - t3
                );
            }
            if i >= 2 {
                skiff.push(t.elapsed());
            }
        }
    });
    let skiff_mean = report("skiff (shim, overlay, libcontainer)", &mut skiff);

    // runc on one bundle with the same spec (rootfs mounted once, outside the timing).
    let bundle = dir.path().join("bundle");
    let rootfs = bundle.join("rootfs");
    for d in ["rootfs", "upper", "work"] {
        std::fs::create_dir_all(bundle.join(d)).unwrap();
    }
    let layers = store.unpacked_layers(&img).unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        layers[0].display(),
        bundle.join("upper").display(),
        bundle.join("work").display()
    );
    nix::mount::mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .unwrap();
    let cfg = ContainerConfig {
        name: "bench".into(),
        image: "x".into(),
        ..Default::default()
    };
    let place = Placement {
        private_net: true,
        cgroups_path: format!("/{cgroup}/runc"),
        ..Default::default()
    };
    let spec = build_spec(&cfg, &img.config, &rootfs, &place).unwrap();
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec(&spec).unwrap(),
    )
    .unwrap();
    let mut runc = Vec::new();
    for i in 0..n + 2 {
        let t = Instant::now();
        let out = Command::new("runc")
            .args([
                "--root",
                &dir.path().join("runc").display().to_string(),
                "run",
                "--bundle",
            ])
            .arg(&bundle)
            .arg(format!("bench-runc-{i}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "runc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if i >= 2 {
            runc.push(t.elapsed());
        }
    }
    let runc_mean = report("runc run (same bundle)", &mut runc);
    println!("{:<40} {:7.2}x", "skiff / runc", skiff_mean / runc_mean);
    nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH).unwrap();
    let _ = rt.remove_cgroup_parent();
    bench_pull(dir.path(), &tokio);
    let _ = std::io::stdout().flush();
}

/// Kills the registry when the benchmark ends (also on panic).
struct Registry(std::process::Child);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pull time from a local docker-registry: skiff's `pull` into a fresh store against `skopeo
/// copy` into a fresh OCI directory, same image, same registry, 5 rounds each.
fn bench_pull(dir: &Path, tokio: &tokio::runtime::Runtime) {
    let archive =
        std::env::var("BENCH_PULL_IMAGE").unwrap_or_else(|_| "build/images/nginx.tar".into());
    let archive = Path::new(&archive);
    if !archive.exists() || !Path::new("/usr/bin/docker-registry").exists() {
        println!(
            "pull: skipped ({} or /usr/bin/docker-registry missing; run `make images`, install docker-registry)",
            archive.display()
        );
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("registry-data").display()
        ),
    )
    .unwrap();
    let _reg = Registry(
        Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "docker-registry did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let reference = format!("127.0.0.1:{port}/bench/image:latest");
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--insecure-policy",
        ])
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::metadata(archive).map(|m| m.len()).unwrap_or(0);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..6 {
        let store = ImageStore::open(dir.join(format!("pull-{i}"))).unwrap();
        let t = Instant::now();
        tokio
            .block_on(skiff_runtime::pull::pull(
                &store,
                &reference,
                &skiff_runtime::pull::RegistriesConfig::default(),
                &skiff_runtime::pull::Credentials::Anonymous,
                &|_| {},
            ))
            .unwrap();
        let took = t.elapsed();
        let t = Instant::now();
        let out = Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                "--insecure-policy",
            ])
            .arg(format!("docker://{reference}"))
            .arg(format!(
                "oci:{}:x",
                dir.join(format!("skopeo-{i}")).display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo pull: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if i > 0 {
            ours.push(took);
            theirs.push(t.elapsed());
        }
    }
    println!(
        "pull of {} ({:.1} MB archive) from docker-registry on 127.0.0.1:",
        archive.display(),
        bytes as f64 / 1e6
    );
    let a = report("skiff pull (fresh store)", &mut ours);
    let b = report("skopeo copy (fresh oci dir)", &mut theirs);
    println!("{:<40} {:7.2}x", "skiff / skopeo", a / b);
}
