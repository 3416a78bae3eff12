//! Endpoints and EndpointSlice controllers: for every Service with a selector, the addresses of
//! its pods with their ports resolved (named target ports per pod), as an `Endpoints` object
//! (ready / not-ready addresses) and as EndpointSlices (ready / serving / terminating
//! conditions), labelled `kubernetes.io/service-name` and managed by
//! `endpointslice-controller.k8s.io`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Pod, Service,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointPort as SlicePort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, PostParams};

use crate::queue::Queue;
use crate::util::{key, map_selector_matches, split_key};
use crate::{ControllerError, Ctx};

/// Label naming a slice's Service.
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label naming the slice's manager.
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// Our value of [`MANAGED_BY`].
pub const CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// Runs both controllers (one queue keyed by Service) until the task is aborted.
pub async fn run(ctx: Arc<Ctx>) {
    let queue = Queue::default();
    let all = {
        let s = ctx.services.clone();
        move || s.store.state().iter().map(|x| key(&x.metadata)).collect()
    };
    crate::informer::feed(
        &ctx.services,
        queue.clone(),
        |s: &Service| vec![key(&s.metadata)],
        all.clone(),
    );
    let svcs = ctx.services.clone();
    crate::informer::feed(
        &ctx.pods,
        queue.clone(),
        move |p: &Pod| {
            let ns = p.metadata.namespace.as_deref().unwrap_or("");
            svcs.in_namespace(ns)
                .iter()
                .map(|s| key(&s.metadata))
                .collect()
        },
        all.clone(),
    );
    crate::informer::feed(
        &ctx.endpoints,
        queue.clone(),
        |e: &Endpoints| vec![key(&e.metadata)],
        all.clone(),
    );
    crate::informer::feed(
        &ctx.slices,
        queue.clone(),
        |s: &EndpointSlice| {
            let ns = s.metadata.namespace.as_deref().unwrap_or("");
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME))
                .map(|n| vec![format!("{ns}/{n}")])
                .unwrap_or_default()
        },
        all,
    );
    for s in ctx.services.store.state() {
        queue.add(key(&s.metadata));
    }
    queue
        .work("endpoints", |k| {
            let ctx = ctx.clone();
            async move { sync(&ctx, &k).await.map(|()| None::<Duration>) }
        })
        .await;
}

struct Member {
    pod: Arc<Pod>,
    ip: String,
    ready: bool,
    terminating: bool,
    ports: Vec<(Option<String>, i32, String, Option<String>)>,
}

fn resolve_port(pod: &Pod, target: Option<&IntOrString>, port: i32) -> Option<i32> {
    match target {
        None => Some(port),
        Some(IntOrString::Int(i)) => Some(*i),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

async fn sync(ctx: &Ctx, k: &str) -> Result<(), ControllerError> {
    let (ns, name) = split_key(k);
    let ep_api = Api::<Endpoints>::namespaced(ctx.client.clone(), ns);
    let Some(svc) = ctx.services.get(ns, name) else {
        if ctx.endpoints.get(ns, name).is_some() {
            match ep_api.delete(name, &DeleteParams::default()).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(());
    };
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(());
    };
    let selector = spec.selector.as_ref();
    if selector.is_none_or(|s| s.is_empty()) {
        return Ok(());
    }
    let publish = spec.publish_not_ready_addresses.unwrap_or(false);
    let mut members: Vec<Member> = Vec::new();
    for pod in ctx.pods.in_namespace(ns) {
        if !map_selector_matches(selector, pod.metadata.labels.as_ref()) {
            continue;
        }
        if matches!(crate::util::phase(&pod), "Succeeded" | "Failed") {
            continue;
        }
        let Some(ip) = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .filter(|i| !i.is_empty())
        else {
            continue;
        };
        let mut ports = Vec::new();
        for p in spec.ports.iter().flatten() {
            if let Some(port) = resolve_port(&pod, p.target_port.as_ref(), p.port) {
                ports.push((
                    p.name.clone(),
                    port,
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    p.app_protocol.clone(),
                ));
            }
        }
        members.push(Member {
            ready: crate::util::is_ready(&pod),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            pod,
            ip,
            ports,
        });
    }
    members.sort_by(|a, b| a.ip.cmp(&b.ip));
    write_endpoints(ctx, &ep_api, &svc, &members, publish).await?;
    write_slices(ctx, &svc, &members, publish).await
}

fn target_ref(pod: &Pod) -> ObjectReference {
    ObjectReference {
        kind: Some("Pod".into()),
        namespace: pod.metadata.namespace.clone(),
        name: pod.metadata.name.clone(),
        uid: pod.metadata.uid.clone(),
        ..Default::default()
    }
}

fn node_of(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
}

async fn write_endpoints(
    ctx: &Ctx,
    api: &Api<Endpoints>,
    svc: &Service,
    members: &[Member],
    publish: bool,
) -> Result<(), ControllerError> {
    let ns = svc.metadata.namespace.as_deref().unwrap_or("");
    let name = svc.metadata.name.as_deref().unwrap_or("");
    // One subset per distinct resolved port list.
    let mut subsets: BTreeMap<String, EndpointSubset> = BTreeMap::new();
    for m in members {
        if m.terminating && !publish {
            continue;
        }
        if m.ports.is_empty()
            && svc
                .spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .is_some_and(|p| !p.is_empty())
        {
            continue;
        }
        let pkey = format!("{:?}", m.ports);
        let sub = subsets.entry(pkey).or_insert_with(|| EndpointSubset {
            ports: Some(
                m.ports
                    .iter()
                    .map(|(n, p, proto, app)| EndpointPort {
                        name: n.clone(),
                        port: *p,
                        protocol: Some(proto.clone()),
                        app_protocol: app.clone(),
                    })
                    .collect(),
            )
            .filter(|v: &Vec<EndpointPort>| !v.is_empty()),
            ..Default::default()
        });
        let addr = EndpointAddress {
            ip: m.ip.clone(),
            node_name: node_of(&m.pod),
            target_ref: Some(target_ref(&m.pod)),
            hostname: None,
        };
        if m.ready || publish {
            sub.addresses.get_or_insert_with(Vec::new).push(addr);
        } else {
            sub.not_ready_addresses
                .get_or_insert_with(Vec::new)
                .push(addr);
        }
    }
    let subsets: Vec<EndpointSubset> = subsets.into_values().collect();
    let existing = ctx.endpoints.get(ns, name);
    let want = if subsets.is_empty() {
        None
    } else {
        Some(subsets)
    };
    let mut labels = svc.metadata.labels.clone().unwrap_or_default();
    labels.insert(
        "endpointslice.kubernetes.io/skip-mirror".into(),
        "true".into(),
    );
    if let Some(e) = &existing
        && e.subsets == want
        && e.metadata.labels.as_ref() == Some(&labels)
    {
        return Ok(());
    }
    let obj = Endpoints {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(labels),
            resource_version: existing
                .as_ref()
                .and_then(|e| e.metadata.resource_version.clone()),
            ..Default::default()
        },
        subsets: want,
    };
    let r = if existing.is_some() {
        api.replace(name, &PostParams::default(), &obj)
            .await
            .map(|_| ())
    } else {
        api.create(&PostParams::default(), &obj).await.map(|_| ())
    };
    r.map_err(Into::into)
}

async fn write_slices(
    ctx: &Ctx,
    svc: &Service,
    members: &[Member],
    publish: bool,
) -> Result<(), ControllerError> {
    let ns = svc.metadata.namespace.as_deref().unwrap_or("");
    let name = svc.metadata.name.as_deref().unwrap_or("");
    let api = Api::<EndpointSlice>::namespaced(ctx.client.clone(), ns);
    // Desired slices, keyed by (address type, ports).
    let mut groups: BTreeMap<(String, String), (Vec<SlicePort>, Vec<Endpoint>)> = BTreeMap::new();
    for m in members {
        let at = if m.ip.contains(':') { "IPv6" } else { "IPv4" };
        let ports: Vec<SlicePort> = m
            .ports
            .iter()
            .map(|(n, p, proto, app)| SlicePort {
                name: Some(n.clone().unwrap_or_default()),
                port: Some(*p),
                protocol: Some(proto.clone()),
                app_protocol: app.clone(),
            })
            .collect();
        let g = groups
            .entry((at.into(), format!("{:?}", m.ports)))
            .or_insert_with(|| (ports, Vec::new()));
        g.1.push(Endpoint {
            addresses: vec![m.ip.clone()],
            conditions: Some(EndpointConditions {
                ready: Some(publish || (m.ready && !m.terminating)),
                serving: Some(publish || m.ready),
                terminating: Some(m.terminating),
            }),
            node_name: node_of(&m.pod),
            target_ref: Some(target_ref(&m.pod)),
            ..Default::default()
        });
    }
    if groups.is_empty() {
        groups.insert(("IPv4".into(), String::new()), (Vec::new(), Vec::new()));
    }
    let mut existing: Vec<Arc<EndpointSlice>> = ctx
        .slices
        .in_namespace(ns)
        .into_iter()
        .filter(|s| {
            let l = s.metadata.labels.as_ref();
            l.and_then(|l| l.get(SERVICE_NAME)).map(String::as_str) == Some(name)
                && l.and_then(|l| l.get(MANAGED_BY)).map(String::as_str) == Some(CONTROLLER)
        })
        .collect();
    existing.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut labels = svc.metadata.labels.clone().unwrap_or_default();
    labels.insert(SERVICE_NAME.into(), name.into());
    labels.insert(MANAGED_BY.into(), CONTROLLER.into());
    let owner = crate::util::owner_ref("v1", "Service", &svc.metadata);
    let mut unused: Vec<Arc<EndpointSlice>> = existing.clone();
    for ((at, _), (ports, eps)) in groups {
        // Reuse a slice with the same ports, else any spare one.
        let pos = unused
            .iter()
            .position(|s| s.address_type == at && s.ports.clone().unwrap_or_default() == ports)
            .or_else(|| unused.iter().position(|s| s.address_type == at));
        let prior = pos.map(|i| unused.remove(i));
        let ports_opt = if ports.is_empty() { None } else { Some(ports) };
        if let Some(p) = &prior
            && p.endpoints == eps
            && p.ports == ports_opt
            && p.metadata.labels.as_ref() == Some(&labels)
        {
            continue;
        }
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: prior.as_ref().and_then(|p| p.metadata.name.clone()),
                generate_name: prior.is_none().then(|| format!("{name}-")),
                namespace: Some(ns.into()),
                labels: Some(labels.clone()),
                owner_references: Some(vec![owner.clone()]),
                resource_version: prior
                    .as_ref()
                    .and_then(|p| p.metadata.resource_version.clone()),
                ..Default::default()
            },
            address_type: at,
            endpoints: eps,
            ports: ports_opt,
        };
        match &prior {
            Some(p) => {
                api.replace(
                    p.metadata.name.as_deref().unwrap_or(""),
                    &PostParams::default(),
                    &slice,
                )
                .await?;
            }
            None => {
                api.create(&PostParams::default(), &slice).await?;
            }
        }
    }
    for s in unused {
        match api
            .delete(
                s.metadata.name.as_deref().unwrap_or(""),
                &DeleteParams::default(),
            )
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
