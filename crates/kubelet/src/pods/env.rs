//! A container's environment: service links, envFrom, env with valueFrom, `$(VAR)` expansion.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, Service};
use kube::api::{Api, ListParams};

use crate::config::{KubeletError, api_err};
use crate::pods::spec::{expand, field_value, resource_value};
use crate::pods::volumes::Sources;

fn env_name(svc: &str) -> String {
    svc.to_ascii_uppercase().replace('-', "_")
}

/// Docker-link style variables for the services visible to a pod.
pub fn service_env(services: &[Service]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in services {
        let Some(spec) = &s.spec else { continue };
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .filter(|ip| !ip.is_empty() && *ip != "None")
        else {
            continue;
        };
        let name = env_name(s.metadata.name.as_deref().unwrap_or(""));
        let ports = spec.ports.clone().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        out.push((format!("{name}_SERVICE_HOST"), ip.to_string()));
        out.push((format!("{name}_SERVICE_PORT"), first.port.to_string()));
        for p in &ports {
            if let Some(pn) = &p.name {
                out.push((
                    format!("{name}_SERVICE_PORT_{}", env_name(pn)),
                    p.port.to_string(),
                ));
            }
        }
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| {
            p.protocol.clone().unwrap_or_else(|| "TCP".into())
        };
        out.push((
            format!("{name}_PORT"),
            format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port),
        ));
        for p in &ports {
            let pr = proto(p);
            let base = format!("{name}_PORT_{}_{}", p.port, pr.to_ascii_uppercase());
            out.push((
                base.clone(),
                format!("{}://{ip}:{}", pr.to_lowercase(), p.port),
            ));
            out.push((format!("{base}_PROTO"), pr.to_lowercase()));
            out.push((format!("{base}_PORT"), p.port.to_string()));
            out.push((format!("{base}_ADDR"), ip.to_string()));
        }
    }
    out
}

/// The environment of `c` in `pod`, in order, with expansions done.
pub async fn container_env(
    client: &kube::Client,
    pod: &Pod,
    c: &Container,
    node_name: &str,
    host_ip: &str,
) -> Result<Vec<(String, String)>, KubeletError> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let src = Sources {
        client,
        namespace: ns,
    };
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut set = |vars: &mut BTreeMap<String, String>, k: String, v: String| {
        if !vars.contains_key(&k) {
            order.push(k.clone());
        }
        vars.insert(k, v);
    };
    let links = pod
        .spec
        .as_ref()
        .and_then(|s| s.enable_service_links)
        .unwrap_or(true);
    let mut svcs: Vec<Service> = Vec::new();
    if links {
        let api: Api<Service> = Api::namespaced(client.clone(), ns);
        svcs = api
            .list(&ListParams::default())
            .await
            .map_err(api_err(format!("listing services in {ns}")))?
            .items;
    }
    // The API server's Service is in every container's environment (KUBERNETES_SERVICE_HOST),
    // also without service links, as the kubelet does: in-cluster clients need it.
    if ns != "default" || !links {
        let api: Api<Service> = Api::namespaced(client.clone(), "default");
        if let Ok(Some(k)) = api.get_opt("kubernetes").await {
            svcs.push(k);
        }
    }
    for (k, v) in service_env(&svcs) {
        set(&mut vars, k, v);
    }
    for ef in c.env_from.iter().flatten() {
        let prefix = ef.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &ef.config_map_ref {
            match src.config_map(&r.name).await? {
                Some(d) => d,
                None if r.optional.unwrap_or(false) => BTreeMap::new(),
                None => {
                    return Err(KubeletError::Invalid(format!(
                        "configmap {:?} not found",
                        r.name
                    )));
                }
            }
        } else if let Some(r) = &ef.secret_ref {
            match src.secret(&r.name).await? {
                Some(d) => d,
                None if r.optional.unwrap_or(false) => BTreeMap::new(),
                None => {
                    return Err(KubeletError::Invalid(format!(
                        "secret {:?} not found",
                        r.name
                    )));
                }
            }
        } else {
            BTreeMap::new()
        };
        for (k, v) in data {
            set(
                &mut vars,
                format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            expand(v, &vars)
        } else if let Some(vf) = &e.value_from {
            if let Some(r) = &vf.config_map_key_ref {
                match src
                    .config_map(&r.name)
                    .await?
                    .and_then(|d| d.get(&r.key).cloned())
                {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if r.optional.unwrap_or(false) => continue,
                    None => {
                        return Err(KubeletError::Invalid(format!(
                            "configmap {:?} key {:?} not found",
                            r.name, r.key
                        )));
                    }
                }
            } else if let Some(r) = &vf.secret_key_ref {
                match src
                    .secret(&r.name)
                    .await?
                    .and_then(|d| d.get(&r.key).cloned())
                {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if r.optional.unwrap_or(false) => continue,
                    None => {
                        return Err(KubeletError::Invalid(format!(
                            "secret {:?} key {:?} not found",
                            r.name, r.key
                        )));
                    }
                }
            } else if let Some(f) = &vf.field_ref {
                field_value(pod, &f.field_path, node_name, host_ip).unwrap_or_default()
            } else if let Some(r) = &vf.resource_field_ref {
                let target = r
                    .container_name
                    .as_ref()
                    .and_then(|n| {
                        pod.spec
                            .as_ref()
                            .and_then(|s| s.containers.iter().find(|c| &c.name == n))
                    })
                    .unwrap_or(c);
                resource_value(target, &r.resource, r.divisor.as_ref(), 0, 0).unwrap_or_default()
            } else {
                String::new()
            }
        } else {
            String::new()
        };
        set(&mut vars, e.name.clone(), value);
    }
    Ok(order
        .into_iter()
        .filter_map(|k| vars.get(&k).map(|v| (k.clone(), v.clone())))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use kube::api::ObjectMeta;

    #[test]
    fn service_links() {
        let s = Service {
            metadata: ObjectMeta {
                name: Some("my-web".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.43.0.5".into()),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        };
        let env: BTreeMap<_, _> = service_env(&[s]).into_iter().collect();
        assert_eq!(env["MY_WEB_SERVICE_HOST"], "10.43.0.5");
        assert_eq!(env["MY_WEB_SERVICE_PORT"], "80");
        assert_eq!(env["MY_WEB_SERVICE_PORT_HTTP"], "80");
        assert_eq!(env["MY_WEB_PORT"], "tcp://10.43.0.5:80");
        assert_eq!(env["MY_WEB_PORT_80_TCP_ADDR"], "10.43.0.5");
    }
}
