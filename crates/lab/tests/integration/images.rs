//! The OCI images from images/build.sh: reproducible, readable by umoci and skopeo, and working
//! when run inside a lab node, chrooted or under runc (needs root, umoci, skopeo, runc,
//! busybox-static, jq, binutils and the Debian mirror or
//! a filled build/cache/debs).
#![allow(clippy::unwrap_used)] // test helpers may unwrap, as tests do

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use skiff_lab::{Node, unique_name};

const BUSYBOX: &str = "/usr/bin/busybox";

fn root() {
    skiff_lab::require_root()
        .expect("these tests need root (namespaces, chroot); CI runs them as root");
    for tool in ["umoci", "skopeo", "runc", "tar", "dpkg-deb"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        assert!(found.status.success(), "{tool} missing: run `make deps`");
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn checked(mut cmd: Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs images/build.sh OUT IMAGE; returns (reference, manifest digest) from its output line.
fn build(out: &Path, image: &str) -> (String, String) {
    let mut cmd = Command::new(repo().join("images/build.sh"));
    cmd.arg(out).arg(image);
    let stdout = String::from_utf8(checked(cmd).stdout).unwrap();
    let line = stdout.lines().next().expect("build.sh printed nothing");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "unexpected build.sh output: {stdout}");
    assert_eq!(Path::new(fields[2]), out.join(format!("{image}.tar")));
    (fields[0].to_string(), fields[1].to_string())
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

/// The image config (`skopeo inspect --config`) of an archive.
fn image_config(archive: &Path, reference: &str) -> serde_json::Value {
    let mut cmd = Command::new("skopeo");
    cmd.args(["inspect", "--config"])
        .arg(format!("oci-archive:{}:{reference}", archive.display()));
    json(&checked(cmd).stdout)
}

/// Extracts the layout from `archive` and unpacks `reference` with umoci into `dir`/rootfs.
fn unpack(archive: &Path, reference: &str, dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    let mut tar = Command::new("tar");
    tar.arg("-xf").arg(archive).arg("-C").arg(&layout);
    checked(tar);
    let index = json(&std::fs::read(layout.join("index.json")).unwrap());
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        reference
    );
    let rootfs = dir.join("rootfs");
    let mut umoci = Command::new("umoci");
    umoci
        .args(["raw", "unpack", "--image"])
        .arg(format!("{}:{reference}", layout.display()))
        .arg(&rootfs);
    checked(umoci);
    rootfs
}

/// `argv` chrooted into `rootfs` with /dev and /proc mounted there, as a container runtime would
/// (the mounts live only in the node's private mount namespace). Output is piped.
fn in_rootfs(rootfs: &Path, argv: &[&str], path_env: &str) -> Command {
    let mut cmd = Command::new(BUSYBOX);
    cmd.args([
        "sh",
        "-c",
        r#"mount -o rbind /dev "$1/dev" && mount -t proc proc "$1/proc" && exec chroot "$@""#,
        "sh",
    ])
    .arg(rootfs)
    .args(argv)
    .env_clear()
    .env("PATH", path_env)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

/// `GET /` on 127.0.0.1:`port` inside the node's network namespace (from a thread that joined it;
/// Debian's static busybox wget crashes in the host's NSS setup, so the test speaks HTTP itself).
fn http_get_in(node: &Node, port: u16) -> std::io::Result<String> {
    let ns = std::fs::File::open(node.netns_path())?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            conn.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
            let mut page = String::new();
            conn.read_to_string(&mut page)?;
            Ok(page)
        })
        .join()
        .unwrap()
    })
}

fn mtime(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

#[test]
fn images_build_reproducibly_and_skip_when_up_to_date() {
    root();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for image in ["busybox", "nginx"] {
        let first = build(a.path(), image);
        let second = build(b.path(), image);
        assert_eq!(first.0, format!("skiff.local/{image}:stable"));
        assert!(first.1.starts_with("sha256:"), "{first:?}");
        assert_eq!(first, second, "two builds of {image} differ");
        let archive = a.path().join(format!("{image}.tar"));
        assert_eq!(
            std::fs::read(&archive).unwrap(),
            std::fs::read(b.path().join(format!("{image}.tar"))).unwrap(),
            "{image}.tar is not byte-identical across builds"
        );
        // skopeo (an independent reader) sees the same manifest digest.
        let mut inspect = Command::new("skopeo");
        inspect
            .arg("inspect")
            .arg(format!("oci-archive:{}:{}", archive.display(), first.0));
        let info = json(&checked(inspect).stdout);
        assert_eq!(info["Digest"], first.1.as_str());
        // Up to date: not rebuilt, same answer.
        let before = mtime(&archive);
        assert_eq!(build(a.path(), image), first);
        assert_eq!(mtime(&archive), before, "{image}.tar was rebuilt");
    }
}

#[test]
fn busybox_image_has_applets_users_and_runs() {
    root();
    let dir = tempfile::tempdir().unwrap();
    let (reference, _) = build(dir.path(), "busybox");
    let archive = dir.path().join("busybox.tar");
    let config = image_config(&archive, &reference);
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["sh"]));
    let env = config["config"]["Env"].to_string();
    assert!(env.contains("PATH=") && env.contains("/bin"), "{env}");

    let rootfs = unpack(&archive, &reference, dir.path());
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("root:x:0:0:"), "{passwd}");
    assert!(passwd.contains("nobody:x:65534:65534:"), "{passwd}");
    assert!(rootfs.join("etc/group").exists());
    use std::os::unix::fs::PermissionsExt;
    let tmp_mode = std::fs::metadata(rootfs.join("tmp"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(tmp_mode & 0o7777, 0o1777);
    // Every applet `busybox --list` prints is linked in /bin.
    let list = checked({
        let mut c = Command::new(rootfs.join("bin/busybox"));
        c.arg("--list");
        c
    });
    let applets = String::from_utf8(list.stdout).unwrap();
    assert!(applets.lines().count() > 100);
    for applet in applets.lines().filter(|a| *a != "busybox") {
        let link = std::fs::read_link(rootfs.join("bin").join(applet))
            .unwrap_or_else(|e| panic!("/bin/{applet}: {e}"));
        assert_eq!(link, Path::new("busybox"), "/bin/{applet}");
    }

    // Run it: a shell in the image, in a lab node, using the applets tests rely on.
    let script = r#"
        echo hello from $(hostname)
        mkdir -p /tmp/www && echo served-by-httpd > /tmp/www/index.html
        httpd -p 127.0.0.1:8080 -h /tmp/www
        for i in $(seq 100); do wget -q -O - http://127.0.0.1:8080/ && break; sleep 0.1; done
        sleep 30 | nc -l -p 9000 > /tmp/got &
        for i in $(seq 100); do echo over-nc | nc 127.0.0.1 9000 && break; sleep 0.1; done
        for i in $(seq 100); do [ -s /tmp/got ] && break; sleep 0.1; done
        cat /tmp/got
        tar -cf /tmp/t.tar -C /etc passwd && tar -tf /tmp/t.tar
        nslookup 2>&1 | grep -q -i usage && echo nslookup-ok
        id nobody
    "#;
    let cmd = in_rootfs(
        &rootfs,
        &["/bin/sh", "-c", script],
        "/usr/sbin:/usr/bin:/sbin:/bin",
    );
    let mut node = Node::builder(unique_name("bb")).spawn(cmd).unwrap();
    let status = node.wait().unwrap();
    let mut out = String::new();
    node.take_stdout()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    node.take_stderr()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status:?}\nstdout: {out}\nstderr: {err}");
    for want in [
        "hello from bb-",
        "served-by-httpd",
        "over-nc",
        "passwd",
        "nslookup-ok",
        "uid=65534(nobody)",
    ] {
        assert!(
            out.contains(want),
            "missing {want:?} in:\n{out}\nstderr: {err}"
        );
    }
}

#[test]
fn nginx_image_serves_the_default_page() {
    root();
    let dir = tempfile::tempdir().unwrap();
    let (reference, _) = build(dir.path(), "nginx");
    let archive = dir.path().join("nginx.tar");
    let config = image_config(&archive, &reference);
    let cmd_argv: Vec<String> = serde_json::from_value(config["config"]["Cmd"].clone()).unwrap();
    assert_eq!(cmd_argv, ["nginx", "-g", "daemon off;"]);
    let path_env = config["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str()?.strip_prefix("PATH="))
        .next()
        .expect("no PATH in the image config")
        .to_string();
    let rootfs = unpack(&archive, &reference, dir.path());
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("www-data:x:33:33:"), "{passwd}");

    let argv: Vec<&str> = cmd_argv.iter().map(String::as_str).collect();
    let cmd = in_rootfs(&rootfs, &argv, &path_env);
    let mut node = Node::builder(unique_name("ngx")).spawn(cmd).unwrap();

    let deadline = Instant::now() + Duration::from_secs(15);
    let page = loop {
        if let Ok(page) = http_get_in(&node, 80) {
            break page;
        }
        if let Some(status) = node.try_wait().unwrap() {
            let mut err = String::new();
            node.take_stderr()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("nginx exited early: {status:?}\n{err}");
        }
        assert!(
            Instant::now() < deadline,
            "nginx did not answer on port 80 in 15s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(page.contains("Welcome to nginx!"), "{page}");

    // The worker runs as www-data (uid 33) and the master as root, inside the node.
    let mut ps = Command::new(BUSYBOX);
    ps.args(["ps", "-o", "user,args"]);
    let ps = node.exec_in(ps).unwrap().output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout).to_string();
    assert!(ps.contains("nginx: master process"), "{ps}");
    assert!(ps.contains("nginx: worker process"), "{ps}");

    let status = node.stop(Duration::from_secs(5)).unwrap();
    assert!(status.success(), "nginx did not stop cleanly: {status:?}");
    let mut log = String::new();
    node.take_stdout()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("\"GET / HTTP/1.1\" 200"), "access log: {log}");
}

/// Removes a runc container (and its cgroups) when the test ends, also on failure.
struct RuncContainer {
    state: PathBuf,
    id: String,
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&self.state)
            .args(["delete", "--force", &self.id])
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn nginx_image_runs_under_runc() {
    root();
    let dir = tempfile::tempdir().unwrap();
    let (reference, _) = build(dir.path(), "nginx");
    let layout = dir.path().join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    let mut tar = Command::new("tar");
    tar.arg("-xf")
        .arg(dir.path().join("nginx.tar"))
        .arg("-C")
        .arg(&layout);
    checked(tar);
    // umoci turns the image config into the bundle's config.json (args, env, user).
    let bundle = dir.path().join("bundle");
    let mut umoci = Command::new("umoci");
    umoci
        .args(["unpack", "--image"])
        .arg(format!("{}:{reference}", layout.display()))
        .arg(&bundle);
    checked(umoci);
    let config_path = bundle.join("config.json");
    let mut config = json(&std::fs::read(&config_path).unwrap());
    assert_eq!(
        config["process"]["args"],
        serde_json::json!(["nginx", "-g", "daemon off;"])
    );
    // Share the node's network namespace; no terminal; the capability set CRI runtimes give
    // containers by default (nginx's master chowns its temp dirs and drops to www-data).
    config["process"]["terminal"] = false.into();
    let namespaces = config["linux"]["namespaces"].as_array_mut().unwrap();
    namespaces.retain(|ns| ns["type"] != "network");
    let caps = serde_json::json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE"
    ]);
    config["process"]["capabilities"] =
        serde_json::json!({"bounding": caps, "effective": caps, "permitted": caps});
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();

    let container = RuncContainer {
        state: dir.path().join("runc-state"),
        id: unique_name("skiff-lab-test"),
    };
    let mut runc = Command::new("runc");
    runc.arg("--root")
        .arg(&container.state)
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&container.id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut node = Node::builder(unique_name("rc")).spawn(runc).unwrap();

    let deadline = Instant::now() + Duration::from_secs(15);
    let page = loop {
        if let Ok(page) = http_get_in(&node, 80) {
            break page;
        }
        if let Some(status) = node.try_wait().unwrap() {
            let mut err = String::new();
            node.take_stderr()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("runc/nginx exited early: {status:?}\n{err}");
        }
        assert!(
            Instant::now() < deadline,
            "nginx under runc did not answer on port 80 in 15s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(page.contains("Welcome to nginx!"), "{page}");
    // runc forwards SIGTERM to nginx, which stops; runc then removes the container.
    let status = node.stop(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "runc run ended with {status:?}");
}
