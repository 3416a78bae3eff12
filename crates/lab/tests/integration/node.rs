//! Node and bridge behaviour against the real kernel (needs root: creates namespaces and links).
#![allow(clippy::unwrap_used)] // test helpers may unwrap, as tests do

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use skiff_lab::{Bridge, LabError, Link, Node, unique_name};

const BUSYBOX: &str = "/usr/bin/busybox";

fn root() {
    skiff_lab::require_root()
        .expect("these tests need root (namespaces, links); CI runs them as root");
    assert!(
        std::path::Path::new(BUSYBOX).exists(),
        "{BUSYBOX} missing: apt-get install busybox-static (make deps)"
    );
}

fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(args[0]);
    c.args(&args[1..]);
    c
}

fn sleeper() -> Command {
    cmd(&[BUSYBOX, "sleep", "1000"])
}

fn run_in(node: &Node, args: &[&str]) -> Output {
    let out = node
        .exec_in(cmd(args))
        .unwrap()
        .output()
        .unwrap_or_else(|e| panic!("run {args:?} in {}: {e}", node.name()));
    assert!(
        out.status.success(),
        "{args:?} in node {} failed: {:?}\nstdout: {}\nstderr: {}",
        node.name(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Interface names on the host (`ip -br link`).
fn host_links() -> BTreeSet<String> {
    let out = cmd(&["ip", "-br", "link"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// Whether any process's network namespace, or any fd of this process, is `ns` ("net:[inode]").
fn netns_in_use(ns: &str) -> bool {
    let procs = std::fs::read_dir("/proc").unwrap().flatten();
    let by_process = procs.filter_map(|e| std::fs::read_link(e.path().join("ns/net")).ok());
    let by_fd = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok());
    by_process.chain(by_fd).any(|l| l.to_string_lossy() == ns)
}

/// Runs `f` on a thread inside the node's network namespace.
fn in_netns<T: Send>(node: &Node, f: impl FnOnce() -> T + Send) -> T {
    let ns = std::fs::File::open(node.netns_path()).unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

#[test]
fn node_has_own_pid1_hostname_and_only_loopback() {
    root();
    let name = unique_name("n");
    let mut main = cmd(&[
        BUSYBOX,
        "sh",
        "-c",
        "echo pid=$$; echo host=$(hostname); /usr/sbin/ip -br link; sleep 1000",
    ]);
    main.stdout(Stdio::piped());
    let mut node = Node::builder(&name).hostname("alpha").spawn(main).unwrap();

    // Inside: only lo, up, with 127.0.0.1.
    let addrs = text(&run_in(&node, &["ip", "-br", "addr"]));
    let names: Vec<&str> = addrs
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names, ["lo"], "ip -br addr in the node: {addrs}");
    assert!(addrs.contains("127.0.0.1/8"), "lo is not up: {addrs}");
    assert_eq!(text(&run_in(&node, &["hostname"])), "alpha");
    assert_ne!(
        nix::unistd::gethostname().unwrap().to_string_lossy(),
        "alpha",
        "the host's hostname changed"
    );
    // exec_in joins the node's PID namespace and sees its /proc: PID 1 is the main process.
    let comm = text(&run_in(&node, &["cat", "/proc/1/cmdline"]));
    // (busybox sh execs its last command, so PID 1 is now `sleep 1000`.)
    assert!(
        comm.contains("sleep\u{0}1000"),
        "/proc/1/cmdline in node: {comm:?}"
    );

    node.stop(Duration::ZERO).unwrap();
    let mut out = String::new();
    node.take_stdout()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(out.contains("pid=1\n"), "main process output: {out}");
    assert!(out.contains("host=alpha\n"), "main process output: {out}");
    assert!(out.contains("lo "), "main process output: {out}");
    assert!(!out.contains("eth0"), "main process output: {out}");
}

#[test]
fn loopback_listener_in_node_is_not_reachable_from_host() {
    root();
    let node = Node::builder(unique_name("n")).spawn(sleeper()).unwrap();
    let listener = in_netns(&node, || TcpListener::bind("127.0.0.1:0").unwrap());
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();

    // From the host: whatever answers (normally nothing), it is not our listener.
    let _ = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(500),
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        listener.accept().map(|_| ()).unwrap_err().kind(),
        ErrorKind::WouldBlock,
        "a host connection reached the node's loopback listener"
    );

    // From inside the node it is reachable (the check above can fail).
    in_netns(&node, || {
        TcpStream::connect(("127.0.0.1", port)).expect("connect inside the node")
    });
    std::thread::sleep(Duration::from_millis(100));
    listener
        .accept()
        .expect("the in-node connection was not accepted");
}

#[test]
fn two_nodes_on_a_bridge_reach_each_other_and_leave_nothing() {
    root();
    let before = host_links();
    let bridge = Bridge::create(&unique_name("skl"), "10.231.1.1/24").unwrap();
    let a = Node::builder(unique_name("a"))
        .link(Link::new(bridge.name(), "10.231.1.2/24").gateway("10.231.1.1".parse().unwrap()))
        .spawn(sleeper())
        .unwrap();
    let b = Node::builder(unique_name("b"))
        .veth(Some(Link::new(bridge.name(), "10.231.1.3/24")))
        .spawn(sleeper())
        .unwrap();
    let ours: Vec<String> = [
        bridge.name(),
        a.host_veth().unwrap(),
        b.host_veth().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let during = host_links();
    for name in &ours {
        assert!(during.contains(name), "{name} missing on host: {during:?}");
    }

    let addrs = text(&run_in(&a, &["ip", "-br", "-4", "addr"]));
    assert!(addrs.contains("eth0"), "{addrs}");
    assert!(addrs.contains("10.231.1.2/24"), "{addrs}");
    let routes = text(&run_in(&a, &["ip", "route"]));
    assert!(
        routes.contains("default via 10.231.1.1 dev eth0"),
        "{routes}"
    );
    run_in(&a, &[BUSYBOX, "ping", "-c1", "-W5", "10.231.1.3"]);
    run_in(&b, &[BUSYBOX, "ping", "-c1", "-W5", "10.231.1.2"]);

    // TCP across the bridge: a listener in b, a client in a.
    let listener = in_netns(&b, || TcpListener::bind("10.231.1.3:0").unwrap());
    let port = listener.local_addr().unwrap().port();
    in_netns(&a, || TcpStream::connect(("10.231.1.3", port)).unwrap());
    listener.accept().unwrap();

    let pids = [a.pid(), b.pid()];
    let netns: Vec<String> = [&a, &b]
        .iter()
        .map(|n| {
            std::fs::read_link(n.netns_path())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_ne!(netns[0], netns[1]);
    assert!(netns.iter().all(|ns| netns_in_use(ns)), "{netns:?}");
    drop((a, b, bridge));
    let after = host_links();
    for name in &ours {
        assert!(!after.contains(name), "{name} left behind: {after:?}");
    }
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "node process {pid} still exists"
        );
    }
    // No process (and no fd of ours) still holds the nodes' network namespaces.
    for ns in &netns {
        assert!(
            !netns_in_use(ns),
            "{ns} is still referenced after the nodes were dropped"
        );
    }
    let leaked: Vec<&String> = after
        .difference(&before)
        .filter(|n| ours.contains(n))
        .collect();
    assert!(leaked.is_empty(), "leaked links: {leaked:?}");
}

#[test]
fn panic_inside_a_lab_cleans_up() {
    root();
    let names = std::sync::Mutex::new(Vec::<String>::new());
    let pid = std::sync::Mutex::new(0u32);
    let result = std::panic::catch_unwind(|| {
        let bridge = Bridge::create(&unique_name("skl"), "10.231.2.1/24").unwrap();
        let node = Node::builder(unique_name("p"))
            .link(Link::new(bridge.name(), "10.231.2.2/24"))
            .spawn(sleeper())
            .unwrap();
        names.lock().unwrap().push(bridge.name().to_string());
        names
            .lock()
            .unwrap()
            .push(node.host_veth().unwrap().to_string());
        *pid.lock().unwrap() = node.pid();
        panic!("test panic while a node runs");
    });
    assert!(result.is_err());
    let after = host_links();
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 2);
    for name in &names {
        assert!(!after.contains(name), "{name} left behind after a panic");
    }
    let pid = pid.into_inner().unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn mounts_inside_a_node_do_not_reach_the_host() {
    root();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_string();
    let node = Node::builder(unique_name("m")).spawn(sleeper()).unwrap();
    run_in(&node, &["mount", "-t", "tmpfs", "skiff-lab-test", &path]);
    let inside = text(&run_in(&node, &["cat", "/proc/self/mountinfo"]));
    assert!(inside.contains(&path), "tmpfs not mounted in node");
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host.contains(&path),
        "a node's mount propagated to the host"
    );
    // exec_in keeps the command's working directory (entering a mount namespace resets it).
    let mut pwd = cmd(&[BUSYBOX, "pwd"]);
    pwd.current_dir(&path);
    let out = node.exec_in(pwd).unwrap().output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), path);
    // The node's /proc is its own: only its processes are visible.
    let ps = text(&run_in(&node, &[BUSYBOX, "ps", "-o", "pid,args"]));
    assert!(ps.lines().count() <= 4, "node sees foreign processes: {ps}");
}

#[test]
fn stop_forwards_sigterm_and_reports_the_exit_code() {
    root();
    let mut node = Node::builder(unique_name("s"))
        .spawn(cmd(&[
            BUSYBOX,
            "sh",
            "-c",
            "trap 'exit 7' TERM; echo ready; while :; do sleep 0.05; done",
        ]))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let status = node.stop(Duration::from_secs(5)).unwrap();
    assert_eq!(status.code(), Some(7), "{status:?}");

    // A main process that ignores SIGTERM (PID 1 without a handler) is killed after the grace.
    let mut node = Node::builder(unique_name("k")).spawn(sleeper()).unwrap();
    let started = std::time::Instant::now();
    let status = node.stop(Duration::from_millis(200)).unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(128 + 9), "{status:?}");
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    root();
    let bridge = Bridge::create(&unique_name("skl"), "10.231.3.1/24").unwrap();
    assert!(matches!(
        Bridge::create(bridge.name(), "10.231.3.1/24"),
        Err(LabError::Exists { .. })
    ));
    assert!(matches!(
        Bridge::create(&unique_name("skl"), "10.231.3.1"),
        Err(LabError::InvalidAddr { .. })
    ));
    let missing = unique_name("skl");
    let err = Node::builder(unique_name("x"))
        .link(Link::new(&missing, "10.231.3.2/24"))
        .spawn(sleeper())
        .unwrap_err();
    assert!(
        matches!(&err, LabError::NoSuchLink { name } if *name == missing),
        "{err}"
    );
    let err = Node::builder("x")
        .spawn(cmd(&["/nonexistent/program"]))
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/program"), "{err}");
}
