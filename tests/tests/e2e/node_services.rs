//! Services end to end on a real node: `skiff server` runs the service proxy (`inet skiff`
//! nftables table) and the cluster DNS on the bridge gateway; busybox pods reach a Deployment
//! through its Service by name, a NodePort answers on the node address, a Service without
//! endpoints refuses fast, and a pod reaches itself through its own Service. The cluster DNS
//! forwards to a fake upstream on a loopback address started here (never the machine's
//! resolver). Named `node_*`: they share the host's `cni0` and `inet skiff` and run one at a time.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use skiff_e2e::{Kubectl, Server, skiff_binary};

/// Address of the fake upstream resolver.
const UPSTREAM: &str = "127.77.0.1";

fn require_root() {
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "node tests need root (containers, bridge, nftables): run them as root, as CI does"
    );
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// True when the host has skiff's nftables table.
fn skiff_table_exists() -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", "skiff"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("running nft (Debian package nftables)")
        .success()
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("running ip")
        .success()
}

/// The address of the host's default-route interface (the kernel's choice; nothing is sent).
fn default_route_ip() -> String {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect("192.0.2.1:9").unwrap();
    let ip = s.local_addr().unwrap().ip();
    assert!(
        !ip.is_loopback(),
        "no default route: the NodePort check needs a non-loopback node address"
    );
    ip.to_string()
}

/// A DNS server on `UPSTREAM:53` answering NXDOMAIN to everything and recording the names it
/// was asked; stops when dropped.
struct FakeUpstream {
    asked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Offset just past the question section of `q`, and the question's name.
fn question(q: &[u8]) -> Option<(usize, String)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).into_owned());
        i += len;
    }
    (q.len() >= i + 4).then(|| (i + 4, labels.join(".").to_ascii_lowercase()))
}

impl FakeUpstream {
    fn start() -> FakeUpstream {
        let sock = UdpSocket::bind((UPSTREAM, 53)).expect("binding the fake upstream on :53");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, st) = (asked.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let q = &buf[..n];
                let Some((end, name)) = question(q) else {
                    continue;
                };
                a.lock().unwrap().push(name);
                let mut r = q[..end].to_vec();
                r[2] = 0x80 | (q[2] & 0x01); // QR, RD copied
                r[3] = 0x80 | 3; // RA, NXDOMAIN
                r[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
                let _ = sock.send_to(&r, peer);
            }
        });
        FakeUpstream {
            asked,
            stop,
            thread: Some(thread),
        }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn node_server_on(node_ip: &str, resolv_conf: &str) -> Server {
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("skiff-svc-e2e-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let tar = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/images/busybox.tar");
    assert!(
        tar.exists(),
        "{} is missing: run `make images` first (make test does)",
        tar.display()
    );
    let st = Command::new(skiff_binary())
        .args(["images", "--data-dir"])
        .arg(dir.path())
        .arg("import")
        .arg(&tar)
        .status()
        .expect("skiff images import");
    assert!(st.success(), "skiff images import failed");
    let resolv = dir.path().join("upstream-resolv.conf");
    std::fs::write(&resolv, resolv_conf).unwrap();
    let resolv = resolv.display().to_string();
    Server::start_with_agent_on(dir, node_ip, &["--resolv-conf", &resolv])
}

const APPS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: httpd
        image: skiff.local/busybox:stable
        imagePullPolicy: Never
        command: ["sh", "-c", "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]
        ports: [{containerPort: 8080, name: http}]
        readinessProbe:
          tcpSocket: {port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, name: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web-np}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-headless}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: skiff.local/busybox:stable
    imagePullPolicy: Never
    command: ["sh", "-c", "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]
    readinessProbe:
      tcpSocket: {port: 8080}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: client-svc}
spec:
  selector: {app: client}
  ports: [{port: 80, targetPort: 8080}]
"#;

/// `kubectl exec client -- args...`: (success, stdout + stderr, elapsed).
fn exec(k: &Kubectl, args: &[&str]) -> (bool, String, Duration) {
    let started = Instant::now();
    let mut full = vec!["exec", "client", "--"];
    full.extend_from_slice(args);
    let out = k.run(&full);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text, started.elapsed())
}

/// busybox wget in the pod, bounded by `timeout` (busybox 1.35's static `wget -T` crashes).
fn wget_try(k: &Kubectl, secs: &str, url: &str) -> (bool, String, Duration) {
    exec(k, &["timeout", secs, "wget", "-q", "-O", "-", url])
}

fn wget(k: &Kubectl, url: &str) -> String {
    let (ok, text, _) = wget_try(k, "5", url);
    assert!(ok, "wget {url} from the client pod failed: {text}");
    text.trim().to_string()
}

fn http_get(addr: &str) -> std::io::Result<String> {
    let sa: std::net::SocketAddr = addr.parse().expect("socket address");
    let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp)
}

#[test]
fn node_services_clusterip_dns_nodeport_headless_hairpin_and_cleanup() {
    let node_ip = default_route_ip();
    let upstream = FakeUpstream::start();
    let mut server = node_server_on(&node_ip, &format!("nameserver {UPSTREAM}\n"));
    let k = Kubectl::new(Some("1.33"), &server);

    k.ok_stdin(&["apply", "-f", "-"], APPS);
    k.ok(&["rollout", "status", "deployment/web", "--timeout=180s"]);
    k.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "--timeout=120s",
    ]);
    assert!(
        skiff_table_exists(),
        "no inet skiff table while the server runs"
    );

    let backends: BTreeSet<String> = k
        .ok(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(backends.len(), 2, "{backends:?}");
    let cluster_ip = k.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);

    // The kube-dns Service exists at --cluster-dns.
    let dns_ip = k.ok(&[
        "get",
        "svc",
        "-n",
        "kube-system",
        "kube-dns",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert_eq!(dns_ip, "10.43.0.10");

    // By short, namespaced and full name (the proxy's rules may lag the endpoints briefly).
    wait_until("http://web answers from the client pod", 30, || {
        wget_try(&k, "3", "http://web").0
    });
    for url in [
        "http://web",
        "http://web.default",
        "http://web.default.svc.cluster.local",
    ] {
        let who = wget(&k, url);
        assert!(
            backends.contains(&who),
            "{url} answered {who:?}, not one of {backends:?}"
        );
    }
    // Both backends answer over repeated tries.
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        seen.insert(wget(&k, "http://web"));
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen, backends,
        "not every backend answered through the Service"
    );

    // DNS: the ClusterIP, the headless pod IPs, an outside name forwarded and failing fast.
    // (busybox nslookup tries every search domain and exits 1 when one of them is NXDOMAIN.)
    let (_, text, _) = exec(&k, &["nslookup", "web"]);
    assert!(
        text.contains("web.default.svc.cluster.local")
            && text.contains(&format!("Address: {cluster_ip}")),
        "nslookup web: {text}"
    );
    let pod_ips: Vec<String> = k
        .ok(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].status.podIP}",
        ])
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(pod_ips.len(), 2);
    let (ok, text, _) = exec(&k, &["nslookup", "web-headless.default.svc.cluster.local"]);
    assert!(ok, "nslookup web-headless: {text}");
    for ip in &pod_ips {
        assert!(
            text.contains(ip.as_str()),
            "headless answer lacks {ip}: {text}"
        );
    }
    assert!(!text.contains(&cluster_ip), "{text}");
    let (ok, text, took) = exec(&k, &["nslookup", "outside-name.example"]);
    assert!(!ok, "an outside name resolved: {text}");
    assert!(
        took < Duration::from_secs(5),
        "outside name took {took:?} to fail: {text}"
    );
    assert!(
        upstream
            .asked()
            .iter()
            .any(|n| n.starts_with("outside-name.example")),
        "the fake upstream was never asked (asked: {:?}); output: {text}",
        upstream.asked()
    );

    // NodePort from the host on the node address.
    let node_port = k.ok(&[
        "get",
        "svc",
        "web-np",
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ]);
    let addr = format!("{node_ip}:{node_port}");
    let resp = http_get(&addr).unwrap_or_else(|e| panic!("NodePort {addr}: {e}"));
    assert!(resp.starts_with("HTTP/1."), "{resp}");
    assert!(
        backends.iter().any(|b| resp.contains(b.as_str())),
        "NodePort {addr} answered {resp:?}"
    );

    // Hairpin: the client pod reaches itself through its own Service.
    // (Not `http://client`: the pod's /etc/hosts maps its own name to its pod IP.)
    let who = wget(&k, "http://client-svc");
    assert_eq!(
        who, "client",
        "hairpin through Service client-svc answered {who:?}"
    );

    // No ready endpoints: the ClusterIP refuses at once.
    k.ok(&["scale", "deployment/web", "--replicas=0"]);
    wait_until("web's pods gone", 60, || {
        k.ok(&["get", "pods", "-l", "app=web", "-o", "name"])
            .is_empty()
    });
    wait_until("http://web refused", 15, || {
        wget_try(&k, "5", "http://web").1.contains("refused")
    });
    let (ok, text, took) = wget_try(&k, "10", "http://web");
    assert!(!ok && text.contains("refused"), "{text}");
    assert!(
        took < Duration::from_secs(2),
        "refusal took {took:?}: {text}"
    );

    // Stop: the proxy deletes its table; killall removes the bridge and mounts.
    k.ok(&["delete", "pod", "client", "--wait=true", "--timeout=60s"]);
    let st = server.stop();
    assert!(st.success(), "skiff server exited with {st}");
    assert!(
        !skiff_table_exists(),
        "inet skiff left after the server stopped"
    );
    let st = Command::new(skiff_binary())
        .arg("killall")
        .arg("--data-dir")
        .arg(server.dir.path())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!link_exists("cni0"), "cni0 left after killall");
    let prefix = format!(
        "{}/",
        std::fs::canonicalize(server.dir.path()).unwrap().display()
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
}

/// `--disable-agent`: no kubelet, so no service proxy: no nftables table appears.
#[test]
fn node_services_disable_agent_starts_no_proxy() {
    require_root();
    assert!(
        !skiff_table_exists(),
        "inet skiff exists before the test (left by another run?)"
    );
    let server = Server::start();
    let k = Kubectl::new(Some("1.33"), &server);
    k.ok(&["get", "ns", "default"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(!skiff_table_exists(), "--disable-agent created inet skiff");
    assert!(!link_exists("cni0"), "--disable-agent created cni0");
}

/// The node's cluster DNS as the host reaches it: the bridge gateway of the default pod CIDR.
const NODE_DNS: &str = "10.42.0.1:53";

/// One UDP query from the host to the node's cluster DNS: (rcode, answers as `name TYPE rdata`).
fn dns_query(name: &str, rtype: RecordType) -> (ResponseCode, Vec<String>) {
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    sock.send_to(&msg.to_vec().unwrap(), NODE_DNS).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = sock
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no answer from {NODE_DNS} for {name} {rtype}: {e}"));
    let resp = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(resp.metadata.id, msg.metadata.id, "answer to another query");
    let answers = resp
        .answers
        .iter()
        .map(|r| format!("{} {} {}", r.name, r.record_type(), r.data))
        .collect();
    (resp.metadata.response_code, answers)
}

/// Reverse name of an IPv4 address (`d.c.b.a.in-addr.arpa.`).
fn in_addr_arpa(ip: &str) -> String {
    let o: Vec<&str> = ip.split('.').collect();
    assert_eq!(o.len(), 4, "not an IPv4 address: {ip}");
    format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
}

/// The pod IP with dashes, as CoreDNS names endpoints without a hostname.
fn dashed(ip: &str) -> String {
    ip.replace('.', "-")
}

/// SRV and PTR records (ClusterIP and headless, as CoreDNS's kubernetes plugin gives them),
/// NXDOMAIN and NODATA, a record following a Service change (the UDP answer cache is emptied),
/// and a LoadBalancer Service: node address in `status.loadBalancer.ingress`, its port
/// forwarded on the node address, gone once the Service is deleted.
#[test]
fn node_services_srv_ptr_rcodes_and_loadbalancer() {
    let node_ip = default_route_ip();
    let upstream = FakeUpstream::start();
    let mut server = node_server_on(&node_ip, &format!("nameserver {UPSTREAM}\n"));
    let k = Kubectl::new(Some("1.33"), &server);

    k.ok_stdin(&["apply", "-f", "-"], APPS);
    k.ok(&["rollout", "status", "deployment/web", "--timeout=180s"]);
    k.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "--timeout=120s",
    ]);
    let cluster_ip = k.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    let pod_ips: BTreeSet<String> = k
        .ok(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].status.podIP}",
        ])
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(pod_ips.len(), 2, "{pod_ips:?}");

    // SRV of a ClusterIP Service's named port: the Service port and the Service name.
    let srv = "_http._tcp.web.default.svc.cluster.local.";
    wait_until("the headless Service's endpoints in DNS", 30, || {
        dns_query("web-headless.default.svc.cluster.local.", RecordType::A)
            .1
            .len()
            == 2
    });
    let (rc, ans) = dns_query(srv, RecordType::SRV);
    assert_eq!(rc, ResponseCode::NoError, "{srv}: {ans:?}");
    assert_eq!(
        ans,
        vec![format!("{srv} SRV 0 100 80 web.default.svc.cluster.local.")],
        "SRV {srv}"
    );
    // From inside a pod with busybox nslookup too.
    let (_, text, _) = exec(&k, &["nslookup", "-type=SRV", srv, "10.43.0.10"]);
    assert!(
        text.contains("80 web.default.svc.cluster.local"),
        "busybox nslookup -type=SRV {srv}: {text}"
    );

    // Headless: one SRV per ready pod, on the endpoint port, to <dashed-ip>.<svc>...
    // (The port of web-headless is unnamed, so its SRV is `_http` only if named; give it one.)
    k.ok(&[
        "patch",
        "svc",
        "web-headless",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/spec/ports/0/name","value":"http"}]"#,
    ]);
    let hsrv = "_http._tcp.web-headless.default.svc.cluster.local.";
    let want: BTreeSet<String> = pod_ips
        .iter()
        .map(|ip| {
            format!(
                "{hsrv} SRV 0 50 8080 {}.web-headless.default.svc.cluster.local.",
                dashed(ip)
            )
        })
        .collect();
    let mut last = Vec::new();
    wait_until("one SRV per headless pod", 15, || {
        last = dns_query(hsrv, RecordType::SRV).1;
        last.iter().cloned().collect::<BTreeSet<_>>() == want
    });
    assert_eq!(last.len(), 2, "{last:?}");

    // PTR: the ClusterIP gives the Service name; a headless pod IP gives its endpoint name.
    let ptr = in_addr_arpa(&cluster_ip);
    let (rc, ans) = dns_query(&ptr, RecordType::PTR);
    assert_eq!(rc, ResponseCode::NoError, "{ptr}: {ans:?}");
    assert_eq!(
        ans,
        vec![format!("{ptr} PTR web.default.svc.cluster.local.")],
        "PTR {ptr}"
    );
    let (_, text, _) = exec(&k, &["nslookup", "-type=PTR", &ptr, "10.43.0.10"]);
    assert!(
        text.contains("web.default.svc.cluster.local"),
        "busybox nslookup -type=PTR {ptr}: {text}"
    );
    for ip in &pod_ips {
        let ptr = in_addr_arpa(ip);
        let (rc, ans) = dns_query(&ptr, RecordType::PTR);
        assert_eq!(rc, ResponseCode::NoError, "{ptr}: {ans:?}");
        assert_eq!(
            ans,
            vec![format!(
                "{ptr} PTR {}.web-headless.default.svc.cluster.local.",
                dashed(ip)
            )],
            "PTR of headless pod {ip}"
        );
    }

    // NXDOMAIN for a missing name; NODATA (NOERROR, no answers) for a type a name lacks.
    for (name, rtype) in [
        ("nosuch.default.svc.cluster.local.", RecordType::A),
        (
            "_nosuch._tcp.web.default.svc.cluster.local.",
            RecordType::SRV,
        ),
    ] {
        let (rc, ans) = dns_query(name, rtype);
        assert_eq!(rc, ResponseCode::NXDomain, "{name} {rtype}: {ans:?}");
        assert!(ans.is_empty(), "{name}: {ans:?}");
    }
    for (name, rtype) in [
        ("web.default.svc.cluster.local.", RecordType::AAAA),
        ("web.default.svc.cluster.local.", RecordType::TXT),
        (srv, RecordType::A),
    ] {
        let (rc, ans) = dns_query(name, rtype);
        assert_eq!(rc, ResponseCode::NoError, "{name} {rtype}: {ans:?}");
        assert!(ans.is_empty(), "{name} {rtype} has answers: {ans:?}");
    }

    // A record follows a Service change (the cached answer above must not outlive it).
    k.ok(&["delete", "svc", "web"]);
    k.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{port: 81, targetPort: 8080, name: www}]\n",
    );
    wait_until("the old SRV name NXDOMAIN", 10, || {
        dns_query(srv, RecordType::SRV).0 == ResponseCode::NXDomain
    });
    let new_srv = "_www._tcp.web.default.svc.cluster.local.";
    // (the delete may be seen before the new Service)
    wait_until("the new SRV name", 10, || {
        dns_query(new_srv, RecordType::SRV).0 == ResponseCode::NoError
    });
    let (rc, ans) = dns_query(new_srv, RecordType::SRV);
    assert_eq!(rc, ResponseCode::NoError, "{new_srv}: {ans:?}");
    assert_eq!(
        ans,
        vec![format!(
            "{new_srv} SRV 0 100 81 web.default.svc.cluster.local."
        )]
    );
    let new_ip = k.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    if new_ip != cluster_ip {
        let (rc, ans) = dns_query(&ptr, RecordType::PTR);
        assert_eq!(
            rc,
            ResponseCode::NXDomain,
            "old ClusterIP PTR {ptr}: {ans:?}"
        );
    }

    // LoadBalancer: the node address in status.loadBalancer.ingress, the port on the node IP.
    k.ok(&[
        "expose",
        "deployment",
        "web",
        "--name=web-lb",
        "--type=LoadBalancer",
        "--port=8080",
        "--target-port=8080",
    ]);
    let mut ingress = String::new();
    wait_until("web-lb's status.loadBalancer.ingress", 30, || {
        ingress = k.ok(&[
            "get",
            "svc",
            "web-lb",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[*].ip}",
        ]);
        !ingress.is_empty()
    });
    assert_eq!(ingress, node_ip, "status.loadBalancer.ingress");
    let table = k.ok(&["get", "svc", "web-lb"]);
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.split_whitespace().nth(3) == Some(node_ip.as_str())),
        "kubectl get svc web-lb has no EXTERNAL-IP {node_ip}:\n{table}"
    );
    let addr = format!("{node_ip}:8080");
    let mut resp = String::new();
    wait_until(
        "the LoadBalancer port answers on the node address",
        15,
        || {
            resp = http_get(&addr).unwrap_or_default();
            !resp.is_empty()
        },
    );
    assert!(resp.starts_with("HTTP/1."), "{resp}");
    let backends: BTreeSet<String> = k
        .ok(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert!(
        backends.iter().any(|b| resp.contains(b.as_str())),
        "LoadBalancer {addr} answered {resp:?}"
    );
    k.ok(&["delete", "svc", "web-lb"]);
    wait_until("the LoadBalancer port closed after the delete", 15, || {
        http_get(&addr).is_err()
    });

    drop(upstream);
    k.ok(&["delete", "pod", "client", "--wait=true", "--timeout=60s"]);
    let st = server.stop();
    assert!(st.success(), "skiff server exited with {st}");
}
