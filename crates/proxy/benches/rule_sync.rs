//! Rule sync for 1,000 Services x 10 endpoints: building + rendering the table, and applying it
//! with `nft -f` inside a throwaway network namespace (needs root). `make bench-proxy`.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use skiff_net::nft::Nft;
use skiff_proxy::{ProxyConfig, build_table};

fn objects(n: usize, eps: usize) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut svcs = Vec::new();
    let mut slices = Vec::new();
    for i in 0..n {
        let name = format!("svc{i}");
        svcs.push(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "bench"},
                "spec": {"type": "NodePort", "clusterIP": format!("10.43.{}.{}", i / 250, i % 250 + 1),
                         "ports": [{"name": "http", "port": 80, "nodePort": 30000 + i, "protocol": "TCP"}]}
            }))
            .unwrap(),
        );
        let endpoints: Vec<_> = (0..eps)
            .map(|e| {
                let n = i * eps + e;
                json!({"addresses": [format!("10.42.{}.{}", n / 250, n % 250 + 2)],
                       "conditions": {"ready": true}, "nodeName": "n1"})
            })
            .collect();
        slices.push(
            serde_json::from_value(json!({
                "metadata": {"name": format!("{name}-x"), "namespace": "bench",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": endpoints
            }))
            .unwrap(),
        );
    }
    (svcs, slices)
}

fn bench(c: &mut Criterion) {
    let (svcs, slices) = objects(1000, 10);
    let cfg = ProxyConfig {
        node_name: "n1".into(),
        node_ips: vec!["192.168.1.10".parse().unwrap()],
        dns_target: Some("10.42.0.1".parse().unwrap()),
        ..ProxyConfig::default()
    };
    let mut g = c.benchmark_group("proxy_1000x10");
    g.sample_size(10);
    g.bench_function("build_and_render", |b| {
        b.iter(|| build_table(&cfg, &svcs, &slices).render().unwrap())
    });
    skiff_lab::require_root().expect("the apply benchmark needs root (it creates a netns)");
    let mut sleep = Command::new("sleep");
    sleep.arg("infinity");
    let node = skiff_lab::Node::builder(skiff_lab::unique_name("pxbench"))
        .spawn(sleep)
        .unwrap();
    let nft = Nft::in_netns(&node.netns_path()).unwrap();
    let table = build_table(&cfg, &svcs, &slices);
    g.bench_function("apply_nft", |b| b.iter(|| nft.apply(&table).unwrap()));
    g.finish();
    drop(node);
}

criterion_group!(benches, bench);
criterion_main!(benches);
