//! A skiff-dns server with a fixed zone of N services (`svcI.bench.svc.cluster.local` →
//! 10.43.x.y), for `make bench-dns`: `bench_server 127.0.0.1:15354 1000`. No upstream.
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::core::v1::Service;
use skiff_dns::{DnsConfig, zone::Zone};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:15354".into());
    let n: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(1000);
    let svcs: Vec<Service> = (0..n)
        .map(|i| {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("svc{i}"), "namespace": "bench"},
                "spec": {"clusterIP": format!("10.43.{}.{}", i / 250, i % 250 + 1),
                         "ports": [{"name": "http", "port": 80}]}
            }))
            .unwrap()
        })
        .collect();
    let zone = Zone::build("cluster.local", 5, &svcs, &[], &[]);
    let cfg = DnsConfig {
        listen: listen.parse().unwrap(),
        resolv_conf: None,
        ..DnsConfig::default()
    };
    skiff_dns::serve_zone(cfg, zone, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
    .unwrap();
}
