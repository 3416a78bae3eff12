//! One pod's worker: sandbox → network → volumes → images → init containers in order → app
//! containers, then restarts with back-off, probes, hooks, status, and graceful termination
//! ending in the final delete of the pod object. Level-triggered: every sync looks at the pod
//! and the runtime and moves one step closer to what the spec asks.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container, ContainerState as KState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus as KStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use skiff_runtime::{
    ContainerConfig, ContainerState, ContainerStatus, Mount, MountKind, Resources, SandboxConfig,
};

use crate::config::{KubeletError, io_err, rt_err};
use crate::node::now;
use crate::pods::probe::{Outcome, run_hook, run_probe};
use crate::pods::pullsecrets;
use crate::pods::spec::{
    expand, hosts_file, qos_class, quantity_bytes, quantity_milli, resolv_conf,
};
use crate::pods::volumes::{self, HostVolume, Sources};
use crate::pods::{Shared, events};
use crate::server::{ContainerRef, PodRef};

/// Whether the worker goes on.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep syncing.
    Continue,
    /// The pod is gone: the worker ends.
    Done,
}

fn ts(ns: i64) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(ns))
            .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now()),
    )
}

fn runtime_name(init: bool, index: usize, attempt: u32) -> String {
    format!("{}{index}-{attempt}", if init { "i" } else { "c" })
}

/// Parses a runtime container name back into (init, index, attempt).
pub fn parse_runtime_name(name: &str) -> Option<(bool, usize, u32)> {
    let init = match name.as_bytes().first()? {
        b'i' => true,
        b'c' => false,
        _ => return None,
    };
    let (idx, att) = name[1..].split_once('-')?;
    Some((init, idx.parse().ok()?, att.parse().ok()?))
}

#[derive(Debug, Default)]
struct Probing {
    next: Option<Instant>,
    successes: i32,
    failures: i32,
}

/// One container of the pod, across its restarts.
#[derive(Debug)]
struct Ctr {
    name: String,
    init: bool,
    /// An init container with `restartPolicy: Always` (a sidecar): started in init order, kept
    /// running (restarted whatever the pod's policy) beside the app containers, stopped last.
    sidecar: bool,
    index: usize,
    attempt: u32,
    id: Option<String>,
    status: Option<ContainerStatus>,
    previous_id: Option<String>,
    previous: Option<ContainerStatus>,
    prev_message: Option<String>,
    message: Option<String>,
    image_id: String,
    waiting: Option<(String, String)>,
    backoff: Duration,
    not_before: Option<Instant>,
    pull_failures: u32,
    started: bool,
    ready: bool,
    liveness: Probing,
    readiness: Probing,
    startup: Probing,
    started_at: Option<Instant>,
}

impl Ctr {
    fn new(name: String, init: bool, index: usize, backoff: Duration) -> Ctr {
        Ctr {
            name,
            init,
            sidecar: false,
            index,
            attempt: 0,
            id: None,
            status: None,
            previous_id: None,
            previous: None,
            prev_message: None,
            message: None,
            image_id: String::new(),
            waiting: None,
            backoff,
            not_before: None,
            pull_failures: 0,
            started: false,
            ready: false,
            liveness: Probing::default(),
            readiness: Probing::default(),
            startup: Probing::default(),
            started_at: None,
        }
    }

    fn running(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s.state == ContainerState::Running)
    }

    fn exited(&self) -> Option<&ContainerStatus> {
        self.status
            .as_ref()
            .filter(|s| matches!(s.state, ContainerState::Exited | ContainerState::Unknown))
    }

    fn succeeded(&self) -> bool {
        self.exited().is_some_and(|s| s.exit_code == Some(0))
    }

    /// Whether this init container no longer holds back the next ones: it succeeded, or it is
    /// a sidecar that has started (passed its startup probe) or already ran.
    fn init_complete(&self) -> bool {
        if self.sidecar {
            (self.running() && self.started) || self.exited().is_some() || self.previous.is_some()
        } else {
            self.succeeded()
        }
    }
}

fn exit_reason(s: &ContainerStatus) -> &'static str {
    if s.oom_killed {
        "OOMKilled"
    } else if s.exit_code == Some(0) {
        "Completed"
    } else if s.state == ContainerState::Unknown {
        "Unknown"
    } else {
        "Error"
    }
}

fn terminated(s: &ContainerStatus, message: Option<String>) -> ContainerStateTerminated {
    ContainerStateTerminated {
        container_id: Some(format!("skiff://{}", s.id)),
        exit_code: s
            .exit_code
            .unwrap_or(if s.state == ContainerState::Unknown {
                255
            } else {
                0
            }),
        reason: Some(exit_reason(s).into()),
        message: message.filter(|m| !m.is_empty()),
        signal: None,
        started_at: s.started_at.map(ts),
        finished_at: s.finished_at.map(ts),
    }
}

/// The pod's worker state.
pub struct Worker {
    sh: Arc<Shared>,
    uid: String,
    namespace: String,
    name: String,
    dir: PathBuf,
    sandbox_id: Option<String>,
    pod_ip: Option<Ipv4Addr>,
    ctrs: Vec<Ctr>,
    volumes: BTreeMap<String, HostVolume>,
    volumes_refreshed: Option<Instant>,
    /// Service-account tokens of the pod's projected volumes.
    tokens: volumes::TokenCache,
    start_time: Option<Time>,
    last_status: Option<PodStatus>,
    /// Set when this sync started an init container or sidecar (and it did start): the next
    /// step (the next init container, the app containers) is taken by a sync right away rather
    /// than at the next interval. (The pod's own status changes do not wake the worker; see
    /// `needs_sync`.)
    resync_now: bool,
    transitions: BTreeMap<String, (String, Time)>,
    sandbox_error: Option<String>,
    adopted: bool,
    /// Set once the pod is ended by the kubelet (`activeDeadlineSeconds` ran out, or it was
    /// evicted or refused under node pressure): it is Failed with this (reason, message).
    ended: Option<(&'static str, String)>,
}

impl Worker {
    /// A worker for `pod`.
    pub fn new(sh: Arc<Shared>, pod: &Pod) -> Worker {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let mut ctrs = Vec::new();
        for (i, c) in spec.init_containers.iter().flatten().enumerate() {
            let mut ctr = Ctr::new(c.name.clone(), true, i, sh.cfg.initial_backoff);
            ctr.sidecar = c.restart_policy.as_deref() == Some("Always");
            ctrs.push(ctr);
        }
        for (i, c) in spec.containers.iter().enumerate() {
            ctrs.push(Ctr::new(c.name.clone(), false, i, sh.cfg.initial_backoff));
        }
        Worker {
            dir: sh.cfg.root_dir.join("pods").join(&uid),
            uid,
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            sh,
            sandbox_id: None,
            pod_ip: None,
            ctrs,
            volumes: BTreeMap::new(),
            volumes_refreshed: None,
            tokens: volumes::TokenCache::default(),
            start_time: pod.status.as_ref().and_then(|s| s.start_time.clone()),
            last_status: pod.status.clone(),
            resync_now: false,
            transitions: BTreeMap::new(),
            sandbox_error: None,
            adopted: false,
            ended: None,
        }
    }

    fn container_spec<'a>(pod: &'a Pod, c: &Ctr) -> Option<&'a Container> {
        let spec = pod.spec.as_ref()?;
        if c.init {
            spec.init_containers.as_ref()?.get(c.index)
        } else {
            spec.containers.get(c.index)
        }
    }

    fn log_dir(&self) -> PathBuf {
        self.sh
            .cfg
            .root_dir
            .join("logs")
            .join(format!("{}_{}_{}", self.namespace, self.name, self.uid))
    }

    /// Marks the pod as new to this node: it had no sandbox when the kubelet started, so there
    /// is nothing to re-adopt.
    pub fn nothing_to_adopt(&mut self) {
        self.adopted = true;
    }

    /// Whether the last sync asked for another one right away (and clears the request).
    pub fn take_resync(&mut self) -> bool {
        std::mem::take(&mut self.resync_now)
    }

    /// Finds what a previous kubelet left running for this pod.
    async fn adopt(&mut self) -> Result<(), KubeletError> {
        self.adopted = true;
        let rt = &self.sh.runtime;
        let sbs = rt
            .list_sandboxes()
            .await
            .map_err(rt_err("listing sandboxes"))?;
        let Some(sb) = sbs.into_iter().find(|s| s.name == self.uid) else {
            return Ok(());
        };
        self.sandbox_id = Some(sb.id.clone());
        if rt.manages_pod_network() {
            self.pod_ip = match sb.ip {
                Some(IpAddr::V4(ip)) => Some(ip),
                _ => None,
            };
        } else if let Some(cni) = self.sh.cni.clone() {
            self.pod_ip = super::cni_plugins::adopt(&self.sh, &cni, &sb.id).await;
        } else if let Some(net) = &self.sh.network {
            self.pod_ip = net.ipam().get(&sb.id)?;
        }
        let mut by_slot: BTreeMap<(bool, usize), Vec<(u32, ContainerStatus)>> = BTreeMap::new();
        for c in rt
            .list_containers()
            .await
            .map_err(rt_err("listing containers"))?
        {
            if c.sandbox_id.as_deref() != Some(sb.id.as_str()) {
                continue;
            }
            if let Some((init, idx, att)) = parse_runtime_name(&c.name) {
                by_slot.entry((init, idx)).or_default().push((att, c));
            }
        }
        for ctr in &mut self.ctrs {
            let Some(mut list) = by_slot.remove(&(ctr.init, ctr.index)) else {
                continue;
            };
            list.sort_by_key(|(a, _)| std::cmp::Reverse(*a));
            let mut it = list.into_iter();
            if let Some((att, cur)) = it.next() {
                ctr.attempt = att;
                ctr.id = Some(cur.id.clone());
                ctr.image_id = cur.image_digest.clone();
                if cur.state == ContainerState::Running {
                    ctr.started_at = Some(Instant::now());
                }
                ctr.status = Some(cur);
            }
            if let Some((_, prev)) = it.next() {
                ctr.previous_id = Some(prev.id.clone());
                ctr.previous = Some(prev);
            }
            for (_, old) in it {
                let _ = rt.remove_container(&old.id).await;
            }
        }
        // Probes restart from scratch; a running container with no readiness probe is ready.
        tracing::info!(pod = %format!("{}/{}", self.namespace, self.name), sandbox = %sb.id, "re-adopted pod sandbox");
        Ok(())
    }

    async fn ensure_sandbox(&mut self, pod: &Pod) -> Result<(), KubeletError> {
        let spec = pod.spec.clone().unwrap_or_default();
        let host_network = spec.host_network.unwrap_or(false);
        if self.sandbox_id.is_none() {
            let hostname: String = spec
                .hostname
                .clone()
                .unwrap_or_else(|| self.name.clone())
                .chars()
                .take(63)
                .collect();
            let id = self
                .sh
                .runtime
                .run_sandbox(SandboxConfig {
                    name: self.uid.clone(),
                    hostname,
                    host_network,
                    host_ipc: spec.host_ipc.unwrap_or(false),
                })
                .await
                .map_err(rt_err("creating pod sandbox"))?;
            self.sandbox_id = Some(id);
        }
        let Some(sb) = self.sandbox_id.clone() else {
            return Ok(());
        };
        if host_network {
            self.pod_ip = Some(self.sh.node_ip);
        } else if self.pod_ip.is_none() && self.sh.runtime.manages_pod_network() {
            // The runtime (containerd's CRI) called CNI itself at RunPodSandbox.
            let st = self
                .sh
                .runtime
                .sandbox_status(&sb)
                .await
                .map_err(rt_err("reading sandbox"))?;
            match st.ip {
                Some(IpAddr::V4(ip)) => self.pod_ip = Some(ip),
                other => {
                    return Err(KubeletError::Invalid(format!(
                        "the container runtime gave sandbox {sb} no IPv4 pod address ({other:?}); check its CNI configuration"
                    )));
                }
            }
        } else if self.pod_ip.is_none()
            && let Some(cni) = self.sh.cni.clone()
        {
            let (ns, name, uid) = (&self.namespace, &self.name, &self.uid);
            let ip = super::cni_plugins::attach(&self.sh, &cni, &sb, ns, name, uid).await?;
            self.pod_ip = Some(ip);
        } else if self.pod_ip.is_none() {
            let net = self.sh.network.clone().ok_or_else(|| {
                KubeletError::Invalid("the pod network is not configured yet".into())
            })?;
            let st = self
                .sh
                .runtime
                .sandbox_status(&sb)
                .await
                .map_err(rt_err("reading sandbox"))?;
            let netns = st.netns.ok_or_else(|| {
                KubeletError::Invalid(format!("sandbox {sb} has no network namespace"))
            })?;
            let sb2 = sb.clone();
            let iface = tokio::task::spawn_blocking(move || net.attach(&sb2, &netns, "eth0"))
                .await
                .map_err(|e| KubeletError::Invalid(format!("network task failed: {e}")))??;
            self.pod_ip = Some(iface.ip);
        }
        std::fs::create_dir_all(&self.dir).map_err(io_err("creating pod dir", &self.dir))?;
        let hosts = self.dir.join("etc-hosts");
        let ip = self.pod_ip.map(|i| i.to_string());
        let text = hosts_file(pod, ip.as_deref());
        if std::fs::read_to_string(&hosts).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&hosts, text).map_err(io_err("writing", &hosts))?;
        }
        let resolv = self.dir.join("resolv.conf");
        let host_resolv = std::fs::read_to_string(&self.sh.cfg.resolv_conf).unwrap_or_default();
        let text = resolv_conf(
            pod,
            &self.sh.cfg.cluster_dns.to_string(),
            &self.sh.cfg.cluster_domain,
            &host_resolv,
        );
        if std::fs::read_to_string(&resolv).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&resolv, text).map_err(io_err("writing", &resolv))?;
        }
        Ok(())
    }

    async fn ensure_volumes(&mut self, pod: &Pod) -> Result<(), KubeletError> {
        let due = self
            .volumes_refreshed
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
        if !due {
            return Ok(());
        }
        let spec = pod.spec.clone().unwrap_or_default();
        let src = Sources {
            client: &self.sh.client,
            namespace: &self.namespace,
        };
        let host_ip = self.sh.node_ip.to_string();
        let psc = spec.security_context.as_ref();
        let fs_group = psc
            .and_then(|s| s.fs_group)
            .and_then(|g| u32::try_from(g).ok());
        let on_root_mismatch =
            psc.and_then(|s| s.fs_group_change_policy.as_deref()) == Some("OnRootMismatch");
        for v in spec.volumes.iter().flatten() {
            let dir = self.dir.join("volumes").join(&v.name);
            if self.volumes.contains_key(&v.name)
                && !matches!(self.volumes.get(&v.name), Some(HostVolume::Projected(_)))
            {
                continue;
            }
            if let Some(mut files) = volumes::payload(
                &src,
                pod,
                v,
                &self.sh.cfg.node_name,
                &host_ip,
                &mut self.tokens,
            )
            .await?
            {
                if fs_group.is_some() {
                    // Group-readable for the fsGroup (modes fixed before the write, so that
                    // an unchanged payload is still seen as unchanged).
                    for f in &mut files {
                        f.mode |= 0o440;
                    }
                }
                if volumes::atomic_write(&dir, &files)? {
                    tracing::debug!(pod = %self.name, volume = %v.name, "volume contents updated");
                    if let Some(gid) = fs_group {
                        volumes::set_volume_ownership(&dir, gid, true, false)?;
                    }
                }
                self.volumes
                    .insert(v.name.clone(), HostVolume::Projected(dir));
            } else if let Some(p) =
                volumes::prepare_dir(&self.sh.client, &self.namespace, v, &dir).await?
            {
                // fsGroup applies to volumes the kubelet owns the contents of (emptyDir, PVCs),
                // not to hostPath.
                if let Some(gid) = fs_group
                    && v.host_path.is_none()
                {
                    let p2 = p.clone();
                    tokio::task::spawn_blocking(move || {
                        volumes::set_volume_ownership(&p2, gid, false, on_root_mismatch)
                    })
                    .await
                    .map_err(|e| KubeletError::Invalid(format!("volume ownership task: {e}")))??;
                }
                self.volumes.insert(v.name.clone(), HostVolume::Dir(p));
            } else {
                return Err(KubeletError::Invalid(format!(
                    "volume {:?}: this kind of volume is not supported",
                    v.name
                )));
            }
        }
        self.volumes_refreshed = Some(Instant::now());
        Ok(())
    }

    fn pull_policy(c: &Container) -> String {
        if let Some(p) = &c.image_pull_policy {
            return p.clone();
        }
        let image = c.image.as_deref().unwrap_or("");
        let last = image.rsplit('/').next().unwrap_or(image);
        if image.contains('@') {
            "IfNotPresent".into()
        } else if !last.contains(':') || last.ends_with(":latest") {
            "Always".into()
        } else {
            "IfNotPresent".into()
        }
    }

    /// The credentials to try for pulling `image`: those of the pod's imagePullSecrets that
    /// match its registry (most specific first), or anonymous when none match. A missing secret gives a
    /// warning event, as the kubelet's, and the pull goes on without it.
    async fn pull_credentials(
        &self,
        pod: &Pod,
        image: &str,
    ) -> Vec<skiff_runtime::pull::Credentials> {
        let names: Vec<String> = pod
            .spec
            .as_ref()
            .and_then(|s| s.image_pull_secrets.as_ref())
            .into_iter()
            .flatten()
            .map(|r| r.name.clone())
            .filter(|n| !n.is_empty())
            .collect();
        let mut keyed = Vec::new();
        let mut missing = Vec::new();
        let api: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.sh.client.clone(), &self.namespace);
        for n in &names {
            match api.get_opt(n).await {
                Ok(Some(s)) => keyed.extend(pullsecrets::secret_credentials(&s)),
                Ok(None) => missing.push(n.clone()),
                Err(e) => {
                    tracing::warn!(pod = %self.name, secret = %n, error = %e, "reading image pull secret failed");
                    missing.push(n.clone());
                }
            }
        }
        if !missing.is_empty() {
            events::record(
                &self.sh,
                pod,
                "Warning",
                "FailedToRetrieveImagePullSecret",
                &format!(
                    "Unable to retrieve some image pull secrets ({}); attempting to pull the image may not succeed.",
                    missing.join(", ")
                ),
            )
            .await;
        }
        let normalized =
            skiff_runtime::reference::normalize(image).unwrap_or_else(|_| image.to_string());
        let out = pullsecrets::for_image(&normalized, &keyed);
        if out.is_empty() {
            // No secret names this registry: pull anonymously (as the kubelet does; when some
            // match, their failures are final, without an anonymous retry).
            return vec![skiff_runtime::pull::Credentials::Anonymous];
        }
        out
    }

    /// Makes sure the image is there; returns its id.
    async fn ensure_image(&mut self, pod: &Pod, i: usize) -> Result<Option<String>, KubeletError> {
        let Some(c) = Self::container_spec(pod, &self.ctrs[i]).cloned() else {
            return Ok(None);
        };
        let image = c.image.clone().unwrap_or_default();
        let policy = Self::pull_policy(&c);
        let rt = self.sh.runtime.clone();
        let have = rt
            .image_status(&image)
            .await
            .map_err(rt_err(format!("looking up image {image}")))?;
        let ctr = &mut self.ctrs[i];
        if let Some(info) = &have
            && policy != "Always"
        {
            return Ok(Some(info.id.clone()));
        }
        if policy == "Never" {
            ctr.waiting = Some((
                "ErrImageNeverPull".into(),
                format!("Container image \"{image}\" is not present with pull policy of Never"),
            ));
            return Ok(None);
        }
        if let Some(nb) = ctr.not_before
            && Instant::now() < nb
            && ctr.pull_failures > 0
        {
            ctr.waiting = Some((
                "ImagePullBackOff".into(),
                format!("Back-off pulling image \"{image}\""),
            ));
            return Ok(None);
        }
        events::record(
            &self.sh,
            pod,
            "Normal",
            "Pulling",
            &format!("Pulling image \"{image}\""),
        )
        .await;
        let candidates = self.pull_credentials(pod, &image).await;
        let mut result = Err(skiff_runtime::Error::InvalidReference {
            reference: image.clone(),
            reason: "no credentials tried".into(),
        });
        for creds in &candidates {
            result = rt.pull_image(&image, creds, &|_| {}).await;
            if result.is_ok() {
                break;
            }
        }
        match result {
            Ok(id) => {
                let ctr = &mut self.ctrs[i];
                ctr.pull_failures = 0;
                ctr.not_before = None;
                events::record(
                    &self.sh,
                    pod,
                    "Normal",
                    "Pulled",
                    &format!("Successfully pulled image \"{image}\""),
                )
                .await;
                Ok(Some(id))
            }
            Err(e) => {
                if let Some(info) = have {
                    // Always, but the registry is unreachable: use what is there.
                    tracing::warn!(%image, error = %e, "pull failed; using the local image");
                    return Ok(Some(info.id));
                }
                let ctr = &mut self.ctrs[i];
                ctr.pull_failures += 1;
                let delay = (self.sh.cfg.initial_backoff
                    * 2u32.saturating_pow(ctr.pull_failures - 1))
                .min(self.sh.cfg.max_backoff);
                ctr.not_before = Some(Instant::now() + delay);
                let msg = format!("Failed to pull image \"{image}\": {e}");
                ctr.waiting = Some(("ErrImagePull".into(), msg.clone()));
                events::record(&self.sh, pod, "Warning", "Failed", &msg).await;
                Ok(None)
            }
        }
    }

    fn container_config(
        &self,
        pod: &Pod,
        c: &Container,
        env: Vec<(String, String)>,
        attempt: u32,
        term_log: &std::path::Path,
    ) -> Result<ContainerConfig, KubeletError> {
        let spec = pod.spec.clone().unwrap_or_default();
        let psc = spec.security_context.clone().unwrap_or_default();
        let csc = c.security_context.clone().unwrap_or_default();
        let vars: BTreeMap<String, String> = env.iter().cloned().collect();
        let mut mounts = Vec::new();
        let host_network = spec.host_network.unwrap_or(false);
        if !host_network {
            mounts.push(Mount {
                kind: MountKind::Bind,
                source: self.dir.join("etc-hosts"),
                destination: "/etc/hosts".into(),
                readonly: false,
            });
        }
        mounts.push(Mount {
            kind: MountKind::Bind,
            source: self.dir.join("resolv.conf"),
            destination: "/etc/resolv.conf".into(),
            readonly: false,
        });
        let tpath = c
            .termination_message_path
            .clone()
            .unwrap_or_else(|| "/dev/termination-log".into());
        mounts.push(Mount {
            kind: MountKind::Bind,
            source: term_log.to_path_buf(),
            destination: tpath,
            readonly: false,
        });
        for vm in c.volume_mounts.iter().flatten() {
            let hv = self.volumes.get(&vm.name).ok_or_else(|| {
                KubeletError::Invalid(format!(
                    "container {:?} mounts volume {:?} which the pod does not define",
                    c.name, vm.name
                ))
            })?;
            let mut source = hv.path().to_path_buf();
            let sub = match (&vm.sub_path, &vm.sub_path_expr) {
                (Some(s), _) if !s.is_empty() => Some(s.clone()),
                (_, Some(e)) if !e.is_empty() => Some(expand(e, &vars)),
                _ => None,
            };
            if let Some(sub) = sub {
                if sub.split('/').any(|p| p == "..") || sub.starts_with('/') {
                    return Err(KubeletError::Invalid(format!(
                        "subPath {sub:?} must be relative without '..'"
                    )));
                }
                source = source.join(&sub);
                if !source.exists() {
                    std::fs::create_dir_all(&source)
                        .map_err(io_err("creating subPath", &source))?;
                }
            }
            mounts.push(Mount {
                kind: MountKind::Bind,
                source,
                destination: vm.mount_path.clone(),
                readonly: vm.read_only.unwrap_or(false),
            });
        }
        let res = c.resources.clone().unwrap_or_default();
        let lim = res.limits.unwrap_or_default();
        let req = res.requests.unwrap_or_default();
        let mut resources = Resources::default();
        if let Some(m) = lim.get("memory").and_then(quantity_bytes) {
            resources.memory_limit = Some(m);
        }
        if let Some(cpu) = req.get("cpu").or(lim.get("cpu")).and_then(quantity_milli) {
            resources.cpu_shares = Some(((cpu * 1024 / 1000) as u64).max(2));
        }
        if let Some(cpu) = lim.get("cpu").and_then(quantity_milli) {
            resources.cpu_period = Some(100_000);
            resources.cpu_quota = Some(((cpu * 100) as i64).max(1000));
        }
        let caps = csc.capabilities.clone().unwrap_or_default();
        let mut supplementary: Vec<u32> = psc
            .supplemental_groups
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|g| g as u32)
            .collect();
        if let Some(g) = psc.fs_group {
            supplementary.push(g as u32);
        }
        let seccomp = csc
            .seccomp_profile
            .as_ref()
            .or(psc.seccomp_profile.as_ref())
            .is_some_and(|p| p.type_ == "RuntimeDefault");
        Ok(ContainerConfig {
            name: format!("c0-{attempt}"),
            image: c.image.clone().unwrap_or_default(),
            command: c
                .command
                .iter()
                .flatten()
                .map(|s| expand(s, &vars))
                .collect(),
            args: c.args.iter().flatten().map(|s| expand(s, &vars)).collect(),
            env,
            working_dir: c.working_dir.clone().filter(|w| !w.is_empty()),
            run_as_user: csc.run_as_user.or(psc.run_as_user).map(|u| u as u32),
            run_as_group: csc.run_as_group.or(psc.run_as_group).map(|g| g as u32),
            supplementary_groups: supplementary,
            mounts,
            resources,
            cap_add: caps.add.unwrap_or_default(),
            cap_drop: caps.drop.unwrap_or_default(),
            privileged: csc.privileged.unwrap_or(false),
            readonly_rootfs: csc.read_only_root_filesystem.unwrap_or(false),
            no_new_privs: csc.allow_privilege_escalation == Some(false),
            hostname: None,
            seccomp_runtime_default: seccomp,
            host_pid: spec.host_pid.unwrap_or(false),
            sysctls: psc
                .sysctls
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|s| (s.name, s.value))
                .collect(),
            devices: Vec::new(),
            stdin: c.stdin.unwrap_or(false),
            stdin_once: c.stdin_once.unwrap_or(false),
            tty: c.tty.unwrap_or(false),
        })
    }

    fn term_log_path(&self, ctr: &Ctr, attempt: u32) -> PathBuf {
        self.dir
            .join("containers")
            .join(&ctr.name)
            .join(format!("{attempt}-termination-log"))
    }

    /// Creates and starts a new instance of container `i`.
    async fn start(&mut self, pod: &Pod, i: usize) -> Result<(), KubeletError> {
        let Some(image_id) = self.ensure_image(pod, i).await? else {
            return Ok(());
        };
        let Some(c) = Self::container_spec(pod, &self.ctrs[i]).cloned() else {
            return Ok(());
        };
        let host_ip = self.sh.node_ip.to_string();
        let env = match crate::pods::env::container_env(
            &self.sh.client,
            pod,
            &c,
            &self.sh.cfg.node_name,
            &host_ip,
        )
        .await
        {
            Ok(e) => e,
            Err(e) => {
                self.ctrs[i].waiting = Some(("CreateContainerConfigError".into(), e.to_string()));
                return Ok(());
            }
        };
        let attempt = if self.ctrs[i].id.is_some() {
            self.ctrs[i].attempt + 1
        } else {
            self.ctrs[i].attempt
        };
        let term_log = self.term_log_path(&self.ctrs[i], attempt);
        if let Some(parent) = term_log.parent() {
            std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        }
        std::fs::write(&term_log, b"").map_err(io_err("creating", &term_log))?;
        let mut cfg = match self.container_config(pod, &c, env, attempt, &term_log) {
            Ok(cfg) => cfg,
            Err(e) => {
                self.ctrs[i].waiting = Some(("CreateContainerConfigError".into(), e.to_string()));
                return Ok(());
            }
        };
        cfg.name = runtime_name(self.ctrs[i].init, self.ctrs[i].index, attempt);
        let log_dir = self.log_dir().join(&c.name);
        std::fs::create_dir_all(&log_dir).map_err(io_err("creating log dir", &log_dir))?;
        let log_path = log_dir.join(format!("{attempt}.log"));
        let rt = self.sh.runtime.clone();
        let sandbox = self.sandbox_id.clone();
        let id = match rt.create_container(sandbox.as_deref(), cfg, log_path).await {
            Ok(id) => id,
            Err(e) => {
                let msg = e.to_string();
                self.ctrs[i].waiting = Some(("CreateContainerError".into(), msg.clone()));
                events::record(&self.sh, pod, "Warning", "Failed", &format!("Error: {msg}")).await;
                return Ok(());
            }
        };
        events::record(
            &self.sh,
            pod,
            "Normal",
            "Created",
            &format!("Created container {}", c.name),
        )
        .await;
        // The old previous instance goes; the current one becomes previous.
        {
            let ctr = &mut self.ctrs[i];
            if let Some(cur) = ctr.id.take() {
                if let Some(old) = ctr.previous_id.take() {
                    let _ = rt.remove_container(&old).await;
                }
                ctr.previous_id = Some(cur);
                ctr.previous = ctr.status.take();
                ctr.prev_message = ctr.message.take();
            }
            ctr.id = Some(id.clone());
            ctr.attempt = attempt;
            ctr.image_id = image_id;
            ctr.status = None;
            ctr.waiting = None;
            ctr.started = false;
            ctr.ready = false;
            ctr.liveness = Probing::default();
            ctr.readiness = Probing::default();
            ctr.startup = Probing::default();
        }
        if let Err(e) = rt.start_container(&id).await {
            let msg = e.to_string();
            self.ctrs[i].waiting = Some(("RunContainerError".into(), msg.clone()));
            self.ctrs[i].status = rt.container_status(&id).await.ok();
            events::record(&self.sh, pod, "Warning", "Failed", &format!("Error: {msg}")).await;
            return Ok(());
        }
        events::record(
            &self.sh,
            pod,
            "Normal",
            "Started",
            &format!("Started container {}", c.name),
        )
        .await;
        self.ctrs[i].started_at = Some(Instant::now());
        self.ctrs[i].status = rt.container_status(&id).await.ok();
        if let Some(h) = c.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()) {
            let ip = self.probe_ip();
            let out = run_hook(&*rt, &id, h, &c, ip, Duration::from_secs(30)).await;
            if let Outcome::Failure(m) = out {
                events::record(&self.sh, pod, "Warning", "FailedPostStartHook", &m).await;
                let _ = rt.stop_container(&id, Duration::from_secs(2)).await;
                self.ctrs[i].status = rt.container_status(&id).await.ok();
            }
        }
        Ok(())
    }

    fn probe_ip(&self) -> IpAddr {
        IpAddr::V4(self.pod_ip.unwrap_or(Ipv4Addr::LOCALHOST))
    }

    async fn refresh(&mut self, pod: &Pod) {
        let rt = self.sh.runtime.clone();
        for i in 0..self.ctrs.len() {
            let Some(id) = self.ctrs[i].id.clone() else {
                continue;
            };
            let was_running = self.ctrs[i].running();
            match rt.container_status(&id).await {
                Ok(st) => {
                    let now_exited =
                        matches!(st.state, ContainerState::Exited | ContainerState::Unknown);
                    self.ctrs[i].status = Some(st);
                    if now_exited && (was_running || self.ctrs[i].message.is_none()) {
                        self.ctrs[i].message = self.termination_message(pod, i);
                    }
                }
                Err(e) => tracing::debug!(container = %id, error = %e, "container status"),
            }
        }
    }

    fn termination_message(&self, pod: &Pod, i: usize) -> Option<String> {
        let ctr = &self.ctrs[i];
        let st = ctr.status.as_ref()?;
        let path = self.term_log_path(ctr, ctr.attempt);
        let mut msg = std::fs::read(&path)
            .map(|b| String::from_utf8_lossy(&b[..b.len().min(4096)]).into_owned())
            .unwrap_or_default();
        let policy = Self::container_spec(pod, ctr)
            .and_then(|c| c.termination_message_policy.clone())
            .unwrap_or_default();
        if msg.is_empty() && policy == "FallbackToLogsOnError" && st.exit_code != Some(0) {
            let log = std::fs::read_to_string(&st.log_path).unwrap_or_default();
            let lines: Vec<&str> = log
                .lines()
                .filter_map(|l| l.splitn(4, ' ').nth(3))
                .collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            msg = tail.join("\n");
            if msg.len() > 2048 {
                msg = msg[msg.len() - 2048..].to_string();
            }
        }
        Some(msg)
    }

    fn restart_policy(pod: &Pod) -> String {
        pod.spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn should_restart(policy: &str, st: &ContainerStatus) -> bool {
        match policy {
            "Never" => false,
            "OnFailure" => st.exit_code != Some(0),
            _ => true,
        }
    }

    /// Decides whether container `i`, exited, may start again now; sets back-off state.
    fn restart_due(&mut self, i: usize) -> bool {
        let cfg = &self.sh.cfg;
        let ctr = &mut self.ctrs[i];
        let now = Instant::now();
        if ctr.not_before.is_none() {
            {
                // The first restart is immediate; the next ones wait 10 s, 20 s, ... 5 min.
                // A container that ran for 10 minutes starts the series again.
                if ctr
                    .started_at
                    .is_some_and(|s| s.elapsed() >= Duration::from_secs(600))
                {
                    ctr.backoff = cfg.initial_backoff;
                }
                if ctr.attempt == 0 {
                    ctr.not_before = Some(now);
                } else {
                    ctr.not_before = Some(now + ctr.backoff);
                    ctr.backoff = (ctr.backoff * 2).min(cfg.max_backoff);
                }
            }
        }
        let due = ctr.not_before.is_some_and(|nb| now >= nb);
        if due {
            ctr.not_before = None;
            ctr.waiting = None;
        } else {
            let secs = ctr
                .not_before
                .map(|nb| nb.saturating_duration_since(now).as_secs())
                .unwrap_or(0);
            let _ = secs;
            ctr.waiting = Some((
                "CrashLoopBackOff".into(),
                format!(
                    "back-off {}s restarting failed container={} pod={}_{}({})",
                    (ctr.backoff / 2).max(cfg.initial_backoff).as_secs(),
                    ctr.name,
                    self.name,
                    self.namespace,
                    self.uid
                ),
            ));
        }
        due
    }

    async fn probe(&mut self, pod: &Pod, i: usize) {
        let Some(c) = Self::container_spec(pod, &self.ctrs[i]).cloned() else {
            return;
        };
        let Some(id) = self.ctrs[i].id.clone() else {
            return;
        };
        if !self.ctrs[i].running() {
            self.ctrs[i].ready = false;
            return;
        }
        let rt = self.sh.runtime.clone();
        let ip = self.probe_ip();
        let started_at = self.ctrs[i].started_at.unwrap_or_else(Instant::now);
        let now = Instant::now();
        let due = |p: &Probing, probe: &k8s_openapi::api::core::v1::Probe| -> bool {
            match p.next {
                Some(n) => now >= n,
                None => {
                    started_at.elapsed()
                        >= Duration::from_secs(
                            probe.initial_delay_seconds.unwrap_or(0).max(0) as u64
                        )
                }
            }
        };
        let period = |probe: &k8s_openapi::api::core::v1::Probe| {
            Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64)
        };
        // Startup probe gates the others.
        if !self.ctrs[i].started {
            match &c.startup_probe {
                None => self.ctrs[i].started = true,
                Some(p) => {
                    if due(&self.ctrs[i].startup, p) {
                        let out = run_probe(&*rt, &id, p, &c, ip).await;
                        let st = &mut self.ctrs[i].startup;
                        st.next = Some(Instant::now() + period(p));
                        match out {
                            Outcome::Success => {
                                st.successes += 1;
                                self.ctrs[i].started = true;
                            }
                            Outcome::Failure(m) => {
                                st.failures += 1;
                                if st.failures >= p.failure_threshold.unwrap_or(3) {
                                    events::record(
                                        &self.sh,
                                        pod,
                                        "Warning",
                                        "Unhealthy",
                                        &format!("Startup probe failed: {m}"),
                                    )
                                    .await;
                                    self.kill(pod, i, "failed startup probe").await;
                                }
                            }
                        }
                    }
                    if !self.ctrs[i].started {
                        return;
                    }
                }
            }
        }
        if let Some(p) = &c.liveness_probe
            && due(&self.ctrs[i].liveness, p)
        {
            let out = run_probe(&*rt, &id, p, &c, ip).await;
            let st = &mut self.ctrs[i].liveness;
            st.next = Some(Instant::now() + period(p));
            match out {
                Outcome::Success => st.failures = 0,
                Outcome::Failure(m) => {
                    st.failures += 1;
                    let fails = st.failures;
                    events::record(
                        &self.sh,
                        pod,
                        "Warning",
                        "Unhealthy",
                        &format!("Liveness probe failed: {m}"),
                    )
                    .await;
                    if fails >= p.failure_threshold.unwrap_or(3) {
                        self.kill(pod, i, "failed liveness probe, will be restarted")
                            .await;
                        return;
                    }
                }
            }
        }
        match &c.readiness_probe {
            None => self.ctrs[i].ready = true,
            Some(p) => {
                if due(&self.ctrs[i].readiness, p) {
                    let out = run_probe(&*rt, &id, p, &c, ip).await;
                    let ready = self.ctrs[i].ready;
                    let mut now_ready = ready;
                    let st = &mut self.ctrs[i].readiness;
                    st.next = Some(Instant::now() + period(p));
                    let mut newly_failed = None;
                    match out {
                        Outcome::Success => {
                            st.failures = 0;
                            st.successes += 1;
                            if st.successes >= p.success_threshold.unwrap_or(1) {
                                now_ready = true;
                            }
                        }
                        Outcome::Failure(m) => {
                            st.successes = 0;
                            st.failures += 1;
                            if st.failures >= p.failure_threshold.unwrap_or(3) {
                                now_ready = false;
                            }
                            if ready || st.failures == 1 {
                                newly_failed = Some(m);
                            }
                        }
                    }
                    self.ctrs[i].ready = now_ready;
                    if let Some(m) = newly_failed {
                        events::record(
                            &self.sh,
                            pod,
                            "Warning",
                            "Unhealthy",
                            &format!("Readiness probe failed: {m}"),
                        )
                        .await;
                    }
                }
            }
        }
    }

    async fn kill(&mut self, pod: &Pod, i: usize, why: &str) {
        let Some(id) = self.ctrs[i].id.clone() else {
            return;
        };
        let name = self.ctrs[i].name.clone();
        events::record(
            &self.sh,
            pod,
            "Normal",
            "Killing",
            &format!("Container {name} {why}"),
        )
        .await;
        let grace = pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30)
            .max(0) as u64;
        if let Some(c) = Self::container_spec(pod, &self.ctrs[i]).cloned()
            && let Some(h) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref())
        {
            let _ = run_hook(
                &*self.sh.runtime,
                &id,
                h,
                &c,
                self.probe_ip(),
                Duration::from_secs(grace),
            )
            .await;
        }
        match self
            .sh
            .runtime
            .stop_container(&id, Duration::from_secs(grace))
            .await
        {
            Ok(st) => self.ctrs[i].status = Some(st),
            Err(e) => tracing::warn!(container = %id, error = %e, "stopping container failed"),
        }
        self.ctrs[i].ready = false;
        self.ctrs[i].message = self.termination_message(pod, i);
    }

    /// One step. Returns Done when the pod is gone.
    pub async fn sync(&mut self, pod: &Pod) -> Result<Flow, KubeletError> {
        if !self.adopted {
            self.adopt().await?;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            self.terminate(pod).await?;
            return Ok(Flow::Done);
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        let terminal = matches!(phase.as_deref(), Some("Succeeded" | "Failed"));
        if self.ended.is_none() && !terminal && self.past_deadline(pod) {
            let msg = "Pod was active on the node longer than the specified deadline";
            tracing::info!(pod = %self.name, namespace = %self.namespace, "active deadline exceeded; stopping the pod");
            events::record(&self.sh, pod, "Warning", "DeadlineExceeded", msg).await;
            self.ended = Some(("DeadlineExceeded", msg.into()));
            for i in 0..self.ctrs.len() {
                if self.ctrs[i].running() {
                    self.kill(pod, i, "exceeded the pod's active deadline")
                        .await;
                }
            }
        }
        if self.ended.is_none() && !terminal {
            self.check_eviction(pod).await;
        }
        if self.ended.is_some() {
            self.write_status(pod).await?;
            return Ok(Flow::Continue);
        }
        if terminal && self.all_exited() {
            self.publish(pod.clone());
            return Ok(Flow::Continue);
        }
        match self.ensure_sandbox(pod).await {
            Ok(()) => self.sandbox_error = None,
            Err(e) => {
                tracing::warn!(pod = %self.name, error = %e, "pod sandbox not ready");
                if self.sandbox_error.is_none() {
                    events::record(
                        &self.sh,
                        pod,
                        "Warning",
                        "FailedCreatePodSandBox",
                        &e.to_string(),
                    )
                    .await;
                }
                self.sandbox_error = Some(e.to_string());
                self.write_status(pod).await?;
                return Ok(Flow::Continue);
            }
        }
        if let Err(e) = self.ensure_volumes(pod).await {
            tracing::warn!(pod = %self.name, error = %e, "pod volumes not ready");
            if self.sandbox_error.is_none() {
                events::record(&self.sh, pod, "Warning", "FailedMount", &e.to_string()).await;
            }
            self.sandbox_error = Some(e.to_string());
            self.write_status(pod).await?;
            return Ok(Flow::Continue);
        }
        self.refresh(pod).await;
        let policy = Self::restart_policy(pod);
        // Init containers, in order.
        let mut init_done = true;
        let mut failed_init = false;
        let apps_finished = self.apps_finished(&policy);
        for i in 0..self.ctrs.len() {
            if !self.ctrs[i].init {
                continue;
            }
            if self.ctrs[i].sidecar {
                if self.ctrs[i].running() {
                    self.probe(pod, i).await;
                    if self.ctrs[i].started {
                        continue;
                    }
                    init_done = false;
                    break;
                }
                if self.ctrs[i].init_complete() {
                    // It ran and exited: sidecars restart whatever the pod's restartPolicy
                    // (with back-off), unless the app containers are done for good.
                    self.ctrs[i].ready = false;
                    if !apps_finished && self.restart_due(i) {
                        self.start(pod, i).await?;
                    }
                    continue;
                }
                init_done = false;
                if self.ctrs[i].id.is_none() || self.restart_due(i) {
                    self.start(pod, i).await?;
                    self.resync_now = self.ctrs[i].waiting.is_none();
                }
                break;
            }
            if self.ctrs[i].succeeded() {
                continue;
            }
            init_done = false;
            if self.ctrs[i].running() {
                break;
            }
            if let Some(st) = self.ctrs[i].exited().cloned() {
                if policy == "Never" {
                    failed_init = true;
                    break;
                }
                let _ = st;
                if !self.restart_due(i) {
                    break;
                }
            }
            self.start(pod, i).await?;
            self.resync_now = self.ctrs[i].waiting.is_none();
            break;
        }
        if init_done && !failed_init {
            for i in 0..self.ctrs.len() {
                if self.ctrs[i].init {
                    continue;
                }
                if self.ctrs[i].id.is_none() {
                    self.start(pod, i).await?;
                    // Probed at once, so that a container without a readiness probe is
                    // reported Ready in the status this sync writes.
                    self.probe(pod, i).await;
                    continue;
                }
                if self.ctrs[i].running() {
                    self.probe(pod, i).await;
                    continue;
                }
                if let Some(st) = self.ctrs[i].exited().cloned() {
                    self.ctrs[i].ready = false;
                    if Self::should_restart(&policy, &st) && self.restart_due(i) {
                        self.start(pod, i).await?;
                    }
                } else if self.ctrs[i].status.is_none() || self.ctrs[i].waiting.is_some() {
                    // Created but never started (start failed): try again.
                    if self.restart_due(i) {
                        self.start(pod, i).await?;
                    }
                }
            }
        }
        if init_done && !failed_init && self.apps_finished(&policy) {
            // The app containers are done for good: stop the sidecars, last started first.
            for i in (0..self.ctrs.len()).rev() {
                if self.ctrs[i].sidecar && self.ctrs[i].running() {
                    self.kill(pod, i, "is a sidecar of a completed pod").await;
                }
            }
        }
        self.write_status(pod).await?;
        Ok(Flow::Continue)
    }

    /// Whether every app container has exited and none will be restarted under `policy`.
    fn apps_finished(&self, policy: &str) -> bool {
        let apps: Vec<&Ctr> = self.ctrs.iter().filter(|c| !c.init).collect();
        !apps.is_empty()
            && apps.iter().all(|c| {
                c.exited().is_some_and(|st| {
                    policy == "Never" || (policy == "OnFailure" && st.exit_code == Some(0))
                })
            })
    }

    /// Node-pressure eviction: a pod the eviction manager picked is stopped (at once for hard
    /// thresholds; within the capped pod grace period, preStop hooks included, for soft ones),
    /// its sandbox, volumes and logs are removed to give the space back, and it ends
    /// Failed/Evicted. A pod that has not started anything yet is refused while
    /// the node is under pressure, as the kubelet's admission does.
    async fn check_eviction(&mut self, pod: &Pod) {
        let asked = self
            .sh
            .evictions
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&self.uid));
        let fresh = self.sandbox_id.is_none() && self.ctrs.iter().all(|c| c.id.is_none());
        let (message, grace, refused) = match asked {
            Some(r) => (r.message, r.grace, false),
            None if fresh => match crate::eviction::admission_refusal(&self.sh.pressure, pod) {
                Some(m) => (m, Duration::ZERO, true),
                None => return,
            },
            None => return,
        };
        tracing::warn!(pod = %self.name, namespace = %self.namespace, refused, grace_secs = grace.as_secs(), message = %message, "pod evicted");
        events::record(&self.sh, pod, "Warning", "Evicted", &message).await;
        self.stop_all(pod, grace).await;
        for i in 0..self.ctrs.len() {
            if let Some(id) = self.ctrs[i].id.clone()
                && self.ctrs[i].running()
            {
                self.ctrs[i].status = self.sh.runtime.container_status(&id).await.ok();
            }
            self.ctrs[i].ready = false;
        }
        self.ended = Some(("Evicted", message));
        if !refused {
            self.cleanup().await;
        }
    }

    /// Whether the pod has run longer than its `activeDeadlineSeconds` (counted from startTime).
    fn past_deadline(&self, pod: &Pod) -> bool {
        let Some(limit) = pod.spec.as_ref().and_then(|s| s.active_deadline_seconds) else {
            return false;
        };
        let Some(start) = &self.start_time else {
            return false;
        };
        let ran = k8s_openapi::jiff::Timestamp::now().as_second() - start.0.as_second();
        ran >= limit
    }

    fn all_exited(&self) -> bool {
        self.ctrs
            .iter()
            .all(|c| c.id.is_none() || c.exited().is_some())
    }

    fn container_status(&self, pod: &Pod, ctr: &Ctr, init_running: bool) -> KStatus {
        let spec = Self::container_spec(pod, ctr);
        let image = spec.and_then(|c| c.image.clone()).unwrap_or_default();
        let mut state = KState::default();
        if let Some((reason, message)) = &ctr.waiting {
            state.waiting = Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: Some(message.clone()),
            });
        } else if let Some(st) = &ctr.status {
            match st.state {
                ContainerState::Running => {
                    state.running = Some(ContainerStateRunning {
                        started_at: st.started_at.map(ts),
                    });
                }
                ContainerState::Exited | ContainerState::Unknown => {
                    state.terminated = Some(terminated(st, ctr.message.clone()));
                }
                ContainerState::Created => {
                    state.waiting = Some(ContainerStateWaiting {
                        reason: Some("ContainerCreating".into()),
                        message: None,
                    });
                }
            }
        } else {
            let reason = if !ctr.init && init_running {
                "PodInitializing"
            } else {
                "ContainerCreating"
            };
            state.waiting = Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: None,
            });
        }
        let mut last = None;
        if state.terminated.is_none() {
            // A container waiting to restart shows its last run.
            if ctr.waiting.is_some()
                && let Some(st) = ctr.exited()
            {
                last = Some(KState {
                    terminated: Some(terminated(st, ctr.message.clone())),
                    ..Default::default()
                });
            } else if let Some(prev) = &ctr.previous {
                last = Some(KState {
                    terminated: Some(terminated(prev, ctr.prev_message.clone())),
                    ..Default::default()
                });
            }
        } else if let Some(prev) = &ctr.previous {
            last = Some(KState {
                terminated: Some(terminated(prev, ctr.prev_message.clone())),
                ..Default::default()
            });
        }
        let running = ctr.running();
        KStatus {
            name: ctr.name.clone(),
            image,
            image_id: ctr.image_id.clone(),
            container_id: ctr.id.as_ref().map(|i| format!("skiff://{i}")),
            ready: if ctr.init && !ctr.sidecar {
                ctr.succeeded()
            } else {
                running && ctr.ready && ctr.waiting.is_none()
            },
            started: Some(running && ctr.started),
            restart_count: ctr.attempt as i32,
            state: Some(state),
            last_state: Some(last.unwrap_or_default()),
            ..Default::default()
        }
    }

    fn condition(&mut self, kind: &str, ok: bool, reason: Option<&str>) -> PodCondition {
        let status = if ok { "True" } else { "False" };
        let t = match self.transitions.get(kind) {
            Some((s, t)) if s == status => t.clone(),
            _ => {
                let t = now();
                self.transitions
                    .insert(kind.to_string(), (status.to_string(), t.clone()));
                t
            }
        };
        PodCondition {
            type_: kind.into(),
            status: status.into(),
            last_transition_time: Some(t),
            reason: if ok { None } else { reason.map(str::to_string) },
            ..Default::default()
        }
    }

    /// The pod status from what the worker knows.
    pub fn compute_status(&mut self, pod: &Pod) -> PodStatus {
        let policy = Self::restart_policy(pod);
        let inits: Vec<&Ctr> = self.ctrs.iter().filter(|c| c.init).collect();
        let apps: Vec<&Ctr> = self.ctrs.iter().filter(|c| !c.init).collect();
        let init_done = inits.iter().all(|c| c.init_complete());
        let init_failed = policy == "Never"
            && inits
                .iter()
                .any(|c| !c.sidecar && c.exited().is_some_and(|s| s.exit_code != Some(0)));
        let init_running = !init_done;
        // A pod the kubelet ended before a container was made (refused under node pressure)
        // reports no status for it, as the kubelet's rejected pods do.
        let reported = |c: &&&Ctr| self.ended.is_none() || c.id.is_some() || c.status.is_some();
        let init_statuses: Vec<KStatus> = inits
            .iter()
            .filter(reported)
            .map(|c| self.container_status(pod, c, init_running))
            .collect();
        let app_statuses: Vec<KStatus> = apps
            .iter()
            .filter(reported)
            .map(|c| self.container_status(pod, c, init_running))
            .collect();
        let phase = if init_failed {
            "Failed"
        } else if !init_done {
            "Pending"
        } else {
            let never_started = apps
                .iter()
                .any(|c| c.id.is_none() || (c.status.is_none() && c.previous.is_none()));
            let running = apps.iter().any(|c| c.running());
            let all_exited = apps.iter().all(|c| c.exited().is_some());
            let failed = apps
                .iter()
                .any(|c| c.exited().is_some_and(|s| s.exit_code != Some(0)));
            if never_started && !running {
                "Pending"
            } else if running || !all_exited {
                "Running"
            } else {
                match policy.as_str() {
                    "Always" => "Running",
                    "OnFailure" if failed => "Running",
                    "Never" if failed => "Failed",
                    _ => "Succeeded",
                }
            }
        };
        let mut message = self.sandbox_error.clone();
        let mut reason = None;
        let phase = match &self.ended {
            Some((r, m)) => {
                message = Some(m.clone());
                reason = Some(r.to_string());
                "Failed"
            }
            None => phase,
        };
        let sidecars_ready = inits
            .iter()
            .zip(&init_statuses)
            .filter(|(c, _)| c.sidecar)
            .all(|(_, s)| s.ready);
        let all_ready = !apps.is_empty() && app_statuses.iter().all(|s| s.ready) && sidecars_ready;
        let sandbox_ok = self.sandbox_id.is_some() && self.sandbox_error.is_none();
        let terminal = phase == "Succeeded" || phase == "Failed";
        let mut conditions = vec![
            self.condition("PodReadyToStartContainers", sandbox_ok, None),
            self.condition("Initialized", init_done, Some("ContainersNotInitialized")),
            self.condition(
                "Ready",
                all_ready && !terminal,
                Some(if terminal {
                    "PodCompleted"
                } else {
                    "ContainersNotReady"
                }),
            ),
            self.condition(
                "ContainersReady",
                all_ready && !terminal,
                Some(if terminal {
                    "PodCompleted"
                } else {
                    "ContainersNotReady"
                }),
            ),
        ];
        let scheduled = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled").cloned())
            .unwrap_or_else(|| self.condition("PodScheduled", true, None));
        conditions.push(scheduled);
        if self.start_time.is_none() {
            self.start_time = Some(now());
        }
        let host_ip = self.sh.node_ip.to_string();
        let pod_ip = self.pod_ip.map(|i| i.to_string());
        PodStatus {
            phase: Some(phase.into()),
            reason,
            conditions: Some(conditions),
            host_ip: Some(host_ip.clone()),
            host_ips: Some(vec![HostIP { ip: host_ip }]),
            pod_ip: pod_ip.clone(),
            pod_ips: pod_ip.map(|ip| vec![PodIP { ip }]),
            start_time: self.start_time.clone(),
            qos_class: Some(qos_class(pod).into()),
            init_container_statuses: (!init_statuses.is_empty()).then_some(init_statuses),
            container_statuses: Some(app_statuses),
            message,
            ..Default::default()
        }
    }

    fn publish(&self, pod: Pod) {
        let containers = self
            .ctrs
            .iter()
            .map(|c| ContainerRef {
                name: c.name.clone(),
                id: c.id.clone(),
                previous_id: c.previous_id.clone(),
            })
            .collect();
        let r = PodRef {
            pod: Arc::new(pod),
            sandbox_id: self.sandbox_id.clone(),
            containers,
        };
        if let Ok(mut m) = self.sh.registry.write() {
            m.insert((self.namespace.clone(), self.name.clone()), r);
        }
    }

    async fn write_status(&mut self, pod: &Pod) -> Result<(), KubeletError> {
        let status = self.compute_status(pod);
        let mut shown = pod.clone();
        shown.status = Some(status.clone());
        self.publish(shown);
        // Compared typed: most syncs change nothing, and serialising is their biggest cost.
        if self.last_status.as_ref() == Some(&status) {
            return Ok(());
        }
        let value = serde_json::to_value(&status).unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.sh.client.clone(), &self.namespace);
        let patch = serde_json::json!({
            "metadata": {"uid": self.uid},
            "status": value,
        });
        match api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.last_status = Some(status);
                Ok(())
            }
            Err(kube::Error::Api(ae)) if ae.code == 404 || ae.code == 409 => Ok(()),
            Err(e) => Err(crate::config::api_err(format!(
                "writing status of pod {}/{}",
                self.namespace, self.name
            ))(e)),
        }
    }

    /// Stops the running containers: preStop hooks and SIGTERM, then SIGKILL when `grace` is
    /// over; app containers together, then sidecars in reverse order within what is left. Zero
    /// grace kills at once without hooks.
    async fn stop_all(&self, pod: &Pod, grace: Duration) {
        let deadline = Instant::now() + grace;
        let hooks = !grace.is_zero();
        let rt = self.sh.runtime.clone();
        let ip = self.probe_ip();
        let mut stops = Vec::new();
        for ctr in &self.ctrs {
            if !ctr.running() || ctr.sidecar {
                continue;
            }
            let Some(id) = ctr.id.clone() else { continue };
            let c = Self::container_spec(pod, ctr).cloned();
            let rt = rt.clone();
            stops.push(async move {
                if hooks
                    && let Some(c) = &c
                    && let Some(h) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref())
                {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let _ = tokio::time::timeout(left, run_hook(&*rt, &id, h, c, ip, left)).await;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if let Err(e) = rt.stop_container(&id, left).await {
                    tracing::warn!(container = %id, error = %e, "stopping container failed");
                }
            });
        }
        let any_sidecar = self.ctrs.iter().any(|c| c.sidecar && c.running());
        if !stops.is_empty() || any_sidecar {
            events::record(
                &self.sh,
                pod,
                "Normal",
                "Killing",
                "Stopping pod containers",
            )
            .await;
        }
        futures::future::join_all(stops).await;
        // Sidecars outlive the app containers and stop in reverse order, within what is left of
        // the grace period.
        for ctr in self.ctrs.iter().rev() {
            if !ctr.sidecar || !ctr.running() {
                continue;
            }
            let Some(id) = ctr.id.clone() else { continue };
            if hooks
                && let Some(c) = Self::container_spec(pod, ctr)
                && let Some(h) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref())
            {
                let left = deadline.saturating_duration_since(Instant::now());
                let _ = tokio::time::timeout(left, run_hook(&*rt, &id, h, c, ip, left)).await;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(e) = rt.stop_container(&id, left).await {
                tracing::warn!(container = %id, error = %e, "stopping sidecar failed");
            }
        }
    }

    /// Graceful termination: preStop hooks and SIGTERM within the grace period, then removal of
    /// everything on the node and the final delete of the pod object.
    pub async fn terminate(&mut self, pod: &Pod) -> Result<(), KubeletError> {
        let grace = pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                pod.spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0) as u64;
        self.stop_all(pod, Duration::from_secs(grace)).await;
        self.cleanup().await;
        let api: Api<Pod> = Api::namespaced(self.sh.client.clone(), &self.namespace);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&self.name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(ae)) if ae.code == 404 || ae.code == 409 => {}
            Err(e) => {
                return Err(crate::config::api_err(format!(
                    "deleting pod {}/{}",
                    self.namespace, self.name
                ))(e));
            }
        }
        tracing::info!(pod = %format!("{}/{}", self.namespace, self.name), "pod terminated and deleted");
        Ok(())
    }

    /// Removes the sandbox, the pod's address, volumes and logs (the pod object is gone).
    pub async fn cleanup(&mut self) {
        if let Ok(mut m) = self.sh.registry.write() {
            m.remove(&(self.namespace.clone(), self.name.clone()));
        }
        if !self.adopted {
            let _ = self.adopt().await;
        }
        if let Some(sb) = self.sandbox_id.take() {
            remove_sandbox(&self.sh, &sb).await;
        }
        let dir = self.dir.clone();
        let logs = self.log_dir();
        let _ = tokio::task::spawn_blocking(move || {
            volumes::unmount_all(&dir);
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_dir_all(&logs);
        })
        .await;
    }
}

/// Stops and removes a sandbox and releases its network.
pub async fn remove_sandbox(sh: &Shared, sb: &str) {
    let rt = &sh.runtime;
    if let Err(e) = rt.stop_sandbox(sb, Duration::ZERO).await {
        tracing::debug!(sandbox = %sb, error = %e, "stopping sandbox");
    }
    // A runtime with its own pod network tore it down in StopPodSandbox.
    if let Some(cni) = sh.cni.clone().filter(|_| !rt.manages_pod_network()) {
        super::cni_plugins::detach(sh, &cni, sb).await;
    } else if let Some(net) = sh.network.clone().filter(|_| !rt.manages_pod_network()) {
        let netns = rt.sandbox_status(sb).await.ok().and_then(|s| s.netns);
        let sb2 = sb.to_string();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(ns) = netns {
                if let Err(e) = net.detach(&sb2, &ns) {
                    tracing::warn!(sandbox = %sb2, error = %e, "detaching pod network failed");
                }
            } else {
                let _ = net.ipam().release(&sb2);
            }
        })
        .await;
    }
    if let Err(e) = rt.remove_sandbox(sb).await {
        tracing::warn!(sandbox = %sb, error = %e, "removing sandbox failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_names_round_trip() {
        assert_eq!(
            parse_runtime_name(&runtime_name(true, 2, 7)),
            Some((true, 2, 7))
        );
        assert_eq!(
            parse_runtime_name(&runtime_name(false, 0, 0)),
            Some((false, 0, 0))
        );
        assert_eq!(parse_runtime_name("x1-2"), None);
        assert_eq!(parse_runtime_name("c1"), None);
    }
}
