//! Probe and lifecycle-hook actions: exec in the container, HTTP GET, TCP connect and gRPC health
//! checks (`grpc.health.v1.Health/Check`) to the pod address (or the host for host-network pods).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ExecAction, GRPCAction, HTTPGetAction, LifecycleHandler, Probe, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use skiff_runtime::Runtime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The outcome of one probe run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It passed.
    Success,
    /// It failed, with a message for events and logs.
    Failure(String),
}

fn resolve_port(port: &IntOrString, c: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .or_else(|| name.parse().ok()),
    }
}

async fn exec(rt: &dyn Runtime, id: &str, a: &ExecAction, timeout: Duration) -> Outcome {
    let argv = a.command.clone().unwrap_or_default();
    if argv.is_empty() {
        return Outcome::Failure("exec probe has no command".into());
    }
    match rt.exec_sync(id, argv, timeout).await {
        Ok(o) if o.exit_code == 0 => Outcome::Success,
        Ok(o) => Outcome::Failure(format!(
            "command exited with {}: {}",
            o.exit_code,
            String::from_utf8_lossy(&o.stdout).trim()
        )),
        Err(e) => Outcome::Failure(e.to_string()),
    }
}

async fn http_get(a: &HTTPGetAction, c: &Container, pod_ip: IpAddr, timeout: Duration) -> Outcome {
    let Some(port) = resolve_port(&a.port, c) else {
        return Outcome::Failure(format!("cannot resolve port {:?}", a.port));
    };
    let host = a
        .host
        .as_deref()
        .and_then(|h| h.parse::<IpAddr>().ok())
        .unwrap_or(pod_ip);
    let path = a.path.clone().unwrap_or_else(|| "/".into());
    let path = if path.starts_with('/') {
        path
    } else {
        format!("/{path}")
    };
    let run = async {
        let mut s = tokio::net::TcpStream::connect(SocketAddr::new(host, port)).await?;
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.35\r\nAccept: */*\r\nConnection: close\r\n"
        );
        for h in a.http_headers.iter().flatten() {
            req.push_str(&format!("{}: {}\r\n", h.name, h.value));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; 256];
        let mut n = 0;
        while n < 12 {
            let r = s.read(&mut buf[n..]).await?;
            if r == 0 {
                break;
            }
            n += r;
        }
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    match tokio::time::timeout(timeout, run).await {
        Err(_) => Outcome::Failure(format!("GET http://{host}:{port}{path}: timeout")),
        Ok(Err(e)) => Outcome::Failure(format!("GET http://{host}:{port}{path}: {e}")),
        Ok(Ok(head)) => {
            let code: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            if (200..400).contains(&code) {
                Outcome::Success
            } else {
                Outcome::Failure(format!("HTTP probe failed with statuscode: {code}"))
            }
        }
    }
}

async fn tcp(a: &TCPSocketAction, c: &Container, pod_ip: IpAddr, timeout: Duration) -> Outcome {
    let Some(port) = resolve_port(&a.port, c) else {
        return Outcome::Failure(format!("cannot resolve port {:?}", a.port));
    };
    let host = a
        .host
        .as_deref()
        .and_then(|h| h.parse::<IpAddr>().ok())
        .unwrap_or(pod_ip);
    match tokio::time::timeout(
        timeout,
        tokio::net::TcpStream::connect(SocketAddr::new(host, port)),
    )
    .await
    {
        Ok(Ok(_)) => Outcome::Success,
        Ok(Err(e)) => Outcome::Failure(format!("dial tcp {host}:{port}: {e}")),
        Err(_) => Outcome::Failure(format!("dial tcp {host}:{port}: timeout")),
    }
}

/// A gRPC health check as the kubelet makes it: `Check` with the probe's `service` (empty by
/// default) on the pod address; only `SERVING` passes.
async fn grpc(a: &GRPCAction, pod_ip: IpAddr, timeout: Duration) -> Outcome {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let Ok(port) = u16::try_from(a.port) else {
        return Outcome::Failure(format!("invalid gRPC probe port {}", a.port));
    };
    let addr = SocketAddr::new(pod_ip, port);
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => e.connect_timeout(timeout).timeout(timeout),
        Err(e) => return Outcome::Failure(format!("gRPC probe address {addr}: {e}")),
    };
    let service = a.service.clone().unwrap_or_default();
    let run = async {
        let channel = endpoint.connect().await.map_err(|e| {
            format!("timeout: failed to connect service {addr:?} within {timeout:?}: {e}")
        })?;
        let resp = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.clone(),
            })
            .await
            .map_err(|s| {
                format!(
                    "error: health rpc probe failed: rpc error: code = {:?} desc = {}",
                    s.code(),
                    s.message()
                )
            })?;
        Ok::<i32, String>(resp.into_inner().status)
    };
    match tokio::time::timeout(timeout, run).await {
        Err(_) => Outcome::Failure(format!(
            "timeout: health rpc did not complete within {timeout:?}"
        )),
        Ok(Err(m)) => Outcome::Failure(m),
        Ok(Ok(st)) if st == ServingStatus::Serving as i32 => Outcome::Success,
        Ok(Ok(st)) => {
            let name = ServingStatus::try_from(st)
                .map(|s| s.as_str_name().to_string())
                .unwrap_or_else(|_| st.to_string());
            Outcome::Failure(format!("service unhealthy (responded with {name:?})"))
        }
    }
}

/// Runs a probe once.
pub async fn run_probe(
    rt: &dyn Runtime,
    id: &str,
    p: &Probe,
    c: &Container,
    pod_ip: IpAddr,
) -> Outcome {
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64);
    if let Some(a) = &p.exec {
        exec(rt, id, a, timeout).await
    } else if let Some(a) = &p.http_get {
        http_get(a, c, pod_ip, timeout).await
    } else if let Some(a) = &p.tcp_socket {
        tcp(a, c, pod_ip, timeout).await
    } else if let Some(a) = &p.grpc {
        grpc(a, pod_ip, timeout).await
    } else {
        Outcome::Failure("probe has no action".into())
    }
}

/// Runs a lifecycle hook once, within `timeout`.
pub async fn run_hook(
    rt: &dyn Runtime,
    id: &str,
    h: &LifecycleHandler,
    c: &Container,
    pod_ip: IpAddr,
    timeout: Duration,
) -> Outcome {
    if let Some(a) = &h.exec {
        exec(rt, id, a, timeout).await
    } else if let Some(a) = &h.http_get {
        http_get(a, c, pod_ip, timeout).await
    } else if let Some(a) = &h.tcp_socket {
        tcp(a, c, pod_ip, timeout).await
    } else if let Some(s) = &h.sleep {
        tokio::time::sleep(Duration::from_secs(s.seconds.max(0) as u64).min(timeout)).await;
        Outcome::Success
    } else {
        Outcome::Failure("hook has no action".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grpc_probe_against_a_local_health_server() {
        use tonic_health::ServingStatus;
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("db", ServingStatus::NotServing)
            .await;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let t = Duration::from_secs(2);
        let probe = |svc: Option<&str>, port: u16| GRPCAction {
            port: i32::from(port),
            service: svc.map(str::to_string),
        };
        assert_eq!(grpc(&probe(None, port), ip, t).await, Outcome::Success);
        assert!(matches!(
            grpc(&probe(Some("db"), port), ip, t).await,
            Outcome::Failure(m) if m.contains("NOT_SERVING")
        ));
        assert!(matches!(
            grpc(&probe(Some("unknown"), port), ip, t).await,
            Outcome::Failure(m) if m.contains("NotFound")
        ));
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cport = closed.local_addr().unwrap().port();
        drop(closed);
        assert!(matches!(
            grpc(&probe(None, cport), ip, t).await,
            Outcome::Failure(m) if m.contains("failed to connect")
        ));
    }

    #[tokio::test]
    async fn http_and_tcp_probes_against_a_local_listener() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = l.accept().await {
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let code = if n == 0 { "200 OK" } else { "500 Oops" };
                n += 1;
                let _ = s
                    .write_all(format!("HTTP/1.1 {code}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let c = Container::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = HTTPGetAction {
            port: IntOrString::Int(i32::from(port)),
            path: Some("/healthz".into()),
            ..Default::default()
        };
        assert_eq!(
            http_get(&a, &c, ip, Duration::from_secs(2)).await,
            Outcome::Success
        );
        assert!(matches!(
            http_get(&a, &c, ip, Duration::from_secs(2)).await,
            Outcome::Failure(m) if m.contains("500")
        ));
        let t = TCPSocketAction {
            port: IntOrString::Int(i32::from(port)),
            host: None,
        };
        assert_eq!(
            tcp(&t, &c, ip, Duration::from_secs(2)).await,
            Outcome::Success
        );
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cport = closed.local_addr().unwrap().port();
        drop(closed);
        let t = TCPSocketAction {
            port: IntOrString::Int(i32::from(cport)),
            host: None,
        };
        assert!(matches!(
            tcp(&t, &c, ip, Duration::from_secs(2)).await,
            Outcome::Failure(_)
        ));
    }
}
