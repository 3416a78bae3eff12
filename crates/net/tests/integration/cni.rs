//! Root tests of the CNI executor with Debian's real plugins (`containernetworking-plugins` in
//! /usr/lib/cni: bridge, host-local, loopback). A lab node plays the host (the plugins run in
//! its network namespace, so the bridge is made there) and another one the pod sandbox.

use crate::common;

use std::path::{Path, PathBuf};

use common::{in_netns, links, netns_node, run_in};
use skiff_net::NetError;
use skiff_net::cni::{Attachment, CniExecutor, pod_args};

const BIN_DIR: &str = "/usr/lib/cni";

fn require_plugins() {
    for p in ["bridge", "host-local", "loopback"] {
        assert!(
            Path::new(BIN_DIR).join(p).exists(),
            "this test needs Debian's containernetworking-plugins ({BIN_DIR}/{p}); apt-get install containernetworking-plugins"
        );
    }
}

/// Runs `f` on a current-thread runtime on a thread inside `host`'s netns: the plugins the
/// executor spawns inherit that thread's network namespace.
fn on_host<T: Send>(host: &skiff_lab::Node, f: impl AsyncFnOnce() -> T + Send) -> T {
    in_netns(host, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
}

fn write_conf(dir: &Path, bridge: &str, ipam_dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "skifftest",
        "plugins": [{
            "type": "bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.77.0.0/24", "gateway": "10.77.0.1"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": ipam_dir.display().to_string(),
            }
        }]
    });
    let p = dir.join("10-test.conflist");
    std::fs::write(&p, conf.to_string()).unwrap();
    p
}

#[test]
fn bridge_host_local_and_loopback_add_check_del() {
    require_plugins();
    let host = netns_node("cni-host");
    let pod = netns_node("cni-pod");
    let tmp = tempfile::tempdir().unwrap();
    let bridge = skiff_lab::unique_name("skcni");
    let ipam_dir = tmp.path().join("ipam");
    let conf_dir = tmp.path().join("net.d");
    let cache = tmp.path().join("cache");
    write_conf(&conf_dir, &bridge, &ipam_dir);
    let att = Attachment {
        container_id: "sandbox1".into(),
        netns: pod.netns_path(),
        ifname: "eth0".into(),
        args: pod_args("default", "web", "sandbox1", "uid-1"),
    };
    let load = || {
        CniExecutor::load(&conf_dir, vec![PathBuf::from(BIN_DIR)], cache.clone())
            .unwrap()
            .with_loopback()
    };

    let ex = load();
    ex.check_plugins().unwrap();
    let r = on_host(&host, async || ex.add(&att).await).unwrap();
    let ip = r.first_ipv4().expect("the result has an IPv4 address");
    assert_eq!(ip.octets()[..3], [10, 77, 0], "{ip}");
    assert_ne!(ip.octets()[3], 1, "the gateway is not given to a pod");
    // In the pod: eth0 with the address, lo up, a default route via the gateway.
    let addr = run_in(&pod, "ip", &["-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains(&format!("{ip}/24")), "{addr}");
    let lo = run_in(&pod, "ip", &["-o", "link", "show", "lo"]);
    assert!(lo.contains("UP"), "{lo}");
    let route = run_in(&pod, "ip", &["route", "show", "default"]);
    assert!(route.contains("via 10.77.0.1 dev eth0"), "{route}");
    // On the host: the bridge with the gateway address; host-local's lease file.
    assert!(links(&host).contains(&bridge), "{:?}", links(&host));
    let br = run_in(&host, "ip", &["-o", "-4", "addr", "show", "dev", &bridge]);
    assert!(br.contains("10.77.0.1/24"), "{br}");
    let lease = ipam_dir.join("skifftest").join(ip.to_string());
    assert!(lease.exists(), "{} missing", lease.display());
    // The pod reaches the gateway (the bridge address in the host netns) over TCP.
    let listener = in_netns(&host, || {
        std::net::TcpListener::bind(("10.77.0.1", 0)).unwrap()
    });
    let port = listener.local_addr().unwrap().port();
    let conn = in_netns(&pod, || {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([10, 77, 0, 1], port)),
            std::time::Duration::from_secs(3),
        )
    });
    conn.expect("pod to gateway TCP");
    let (_s, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), std::net::IpAddr::V4(ip));

    // CHECK passes, also from a new executor (a restarted kubelet) reading the cache.
    on_host(&host, async || ex.check(&att).await).unwrap();
    drop(ex);
    let ex = load();
    let (cached, cached_att) = ex.cached("sandbox1", "eth0").unwrap().unwrap();
    assert_eq!(cached.first_ipv4(), Some(ip));
    assert_eq!(cached_att.args, att.args);
    let bare = Attachment {
        args: vec![],
        ..att.clone()
    };
    on_host(&host, async || ex.check(&bare).await).unwrap();

    // CHECK notices a broken attachment: the pod's address removed by hand.
    run_in(&pod, "ip", &["addr", "flush", "dev", "eth0"]);
    let e = on_host(&host, async || ex.check(&bare).await).unwrap_err();
    assert!(
        matches!(e, NetError::Cni { ref command, .. } if command == "CHECK"),
        "{e}"
    );

    // DEL: the veth is gone from the pod and from the bridge, the lease and the cache too.
    on_host(&host, async || ex.del(&bare).await).unwrap();
    assert!(
        !links(&pod).contains(&"eth0".to_string()),
        "{:?}",
        links(&pod)
    );
    let ports = run_in(&host, "ip", &["-o", "link", "show", "master", &bridge]);
    assert!(ports.trim().is_empty(), "{ports}");
    assert!(!lease.exists(), "{} still there", lease.display());
    assert!(ex.cached("sandbox1", "eth0").unwrap().is_none());
    // DEL again (nothing cached, the interface gone) still succeeds, as the spec asks.
    on_host(&host, async || ex.del(&bare).await).unwrap();
    // CHECK without a cached result says so.
    let e = on_host(&host, async || ex.check(&bare).await).unwrap_err();
    assert!(e.to_string().contains("no cached CNI result"), "{e}");
}

#[test]
fn a_plugin_error_and_a_missing_plugin_are_clear() {
    require_plugins();
    let host = netns_node("cni-host");
    let tmp = tempfile::tempdir().unwrap();
    let bridge = skiff_lab::unique_name("skcni");
    let ipam_dir = tmp.path().join("ipam");
    let conf_dir = tmp.path().join("net.d");
    write_conf(&conf_dir, &bridge, &ipam_dir);
    let ex = CniExecutor::load(
        &conf_dir,
        vec![PathBuf::from(BIN_DIR)],
        tmp.path().join("cache"),
    )
    .unwrap();
    // A netns that does not exist: the bridge plugin's own error JSON.
    let att = Attachment {
        container_id: "sandbox2".into(),
        netns: tmp.path().join("no-such-netns"),
        ifname: "eth0".into(),
        args: vec![],
    };
    let e = on_host(&host, async || ex.add(&att).await).unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, NetError::Cni { .. }), "{s}");
    assert!(
        s.contains("bridge ADD failed") && s.contains("no-such-netns"),
        "{s}"
    );
    // Nothing was left allocated by the failed ADD.
    let leases: Vec<_> = std::fs::read_dir(ipam_dir.join("skifftest"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leases
            .iter()
            .all(|n| !n.to_string_lossy().starts_with("10.77.")),
        "{leases:?}"
    );

    // A plugin not in the bin dirs.
    let bad = tmp.path().join("bad.d");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("a.conflist"),
        r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"no-such-cni-plugin"}]}"#,
    )
    .unwrap();
    let ex =
        CniExecutor::load(&bad, vec![PathBuf::from(BIN_DIR)], tmp.path().join("cache")).unwrap();
    let e = ex.check_plugins().unwrap_err().to_string();
    assert!(
        e.contains("no-such-cni-plugin") && e.contains(BIN_DIR),
        "{e}"
    );
    let att = Attachment {
        container_id: "sandbox3".into(),
        netns: "/proc/self/ns/net".into(),
        ifname: "eth0".into(),
        args: vec![],
    };
    let e = on_host(&host, async || ex.add(&att).await)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no-such-cni-plugin") && e.contains(BIN_DIR),
        "{e}"
    );
}
