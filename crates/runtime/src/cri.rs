//! The CRI client: [`CriRuntime`] implements the [`Runtime`] trait over the Kubernetes Container
//! Runtime Interface (`runtime.v1`, gRPC on a unix socket) for users who already run containerd or
//! CRI-O (`--container-runtime-endpoint unix:///run/containerd/containerd.sock`).
//!
//! The generated CRI types and gRPC clients come from the `k8s-cri` crate. What CRI does not
//! offer is refused with a clear error: importing tarballs (use the runtime's own tool, e.g.
//! `ctr -n k8s.io images import`), standalone containers, and tmpfs mounts. Streaming exec,
//! attach and port-forward go through the runtime's own streaming server (CRI returns a URL
//! for them): [`Runtime::streaming_url`] returns that URL and the kubelet forwards the client's
//! upgrade request to it, so the in-process `exec`/`attach`/`port_forward` methods refuse.
//!
//! The runtime calls CNI itself at RunPodSandbox ([`Runtime::manages_pod_network`]); the pod IP
//! comes from PodSandboxStatus. Only sandboxes whose CRI metadata namespace is [`CRI_NAMESPACE`]
//! (and their containers) are listed, so skiff never touches other users of the runtime.
//!
//! Image garbage collection is the one place that looks at everything the runtime has:
//! [`Runtime::images_in_use`] covers the containers and sandboxes of every client (an image
//! someone else still uses must not go), and the runtime's sandbox (pause) image is reported
//! pinned even where the runtime does not set CRI's `pinned` (containerd 1.6).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::api::{
    AttachSession, DuplexStream, ExecSession, ImageFs, ImageInfo, ProgressFn, Runtime,
    SandboxState, SandboxStatus, StreamRequest,
};
use crate::cgroup::CgroupStats;
use crate::error::{Error, Result};
use crate::pull::Credentials;
use crate::runtime::{ContainerState, ContainerStatus, ExecOutput};
use crate::sandbox::SandboxConfig;
use crate::spec::{ContainerConfig, MountKind};

/// Namespace recorded in the CRI metadata of sandboxes created through this client; the
/// sandboxes of anything else using the same runtime are invisible to skiff.
pub const CRI_NAMESPACE: &str = "skiff";

/// A container runtime reached over CRI.
pub struct CriRuntime {
    endpoint: String,
    runtime_name: String,
    runtime_version: String,
    rt: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    /// Sandbox configs by id: CRI wants the sandbox's config again on CreateContainer.
    sandboxes: Mutex<HashMap<String, cri::PodSandboxConfig>>,
}

impl std::fmt::Debug for CriRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriRuntime")
            .field("endpoint", &self.endpoint)
            .field("runtime_name", &self.runtime_name)
            .finish_non_exhaustive()
    }
}

fn rpc_err(endpoint: &str, what: &str) -> impl FnOnce(tonic::Status) -> Error {
    let op = format!("cri {what} on {endpoint}");
    move |status| match status.code() {
        tonic::Code::NotFound => {
            Error::InvalidState(format!("{op}: not found: {}", status.message()))
        }
        _ => Error::InvalidState(format!("{op}: {}: {}", status.code(), status.message())),
    }
}

/// In-process streaming is not how CRI streams: the runtime's streaming server does.
fn via_streaming_server(what: &str) -> Error {
    Error::InvalidState(format!(
        "{what} through CRI goes through the runtime's streaming server: ask streaming_url for its URL"
    ))
}

fn unsupported(what: &str) -> Error {
    Error::InvalidState(format!(
        "{what} is not available with an external CRI runtime in this version of skiff; use the built-in runtime (omit --container-runtime-endpoint)"
    ))
}

/// Parses `unix:///path` (or a bare absolute path) into the socket path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(Error::InvalidState(format!(
            "container runtime endpoint {endpoint:?} is not supported: give a unix socket, e.g. unix:///run/containerd/containerd.sock"
        )));
    }
    Ok(PathBuf::from(path))
}

impl CriRuntime {
    /// Connects to a CRI endpoint (`unix:///run/containerd/containerd.sock`) and checks that it
    /// speaks `runtime.v1`.
    pub async fn connect(endpoint: &str) -> Result<CriRuntime> {
        let path = socket_path(endpoint)?;
        let connect_path = path.clone();
        // The URI is a placeholder: the connector below always dials the unix socket.
        let channel = Endpoint::from_static("http://localhost")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let p = connect_path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(p).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| {
                Error::InvalidState(format!(
                    "cannot connect to the container runtime at {}: {e}; is it running?",
                    path.display()
                ))
            })?;
        let mut rt = RuntimeServiceClient::new(channel.clone());
        let version = rt
            .version(cri::VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(rpc_err(endpoint, "Version"))?
            .into_inner();
        tracing::info!(
            endpoint,
            runtime = %version.runtime_name,
            runtime_version = %version.runtime_version,
            cri_version = %version.runtime_api_version,
            "connected to CRI runtime"
        );
        Ok(CriRuntime {
            endpoint: endpoint.to_string(),
            runtime_name: version.runtime_name,
            runtime_version: version.runtime_version,
            rt,
            images: ImageServiceClient::new(channel),
            sandboxes: Mutex::new(HashMap::new()),
        })
    }

    fn rt(&self) -> RuntimeServiceClient<Channel> {
        self.rt.clone()
    }

    fn img(&self) -> ImageServiceClient<Channel> {
        self.images.clone()
    }

    fn sandbox_config(&self, cfg: &SandboxConfig) -> cri::PodSandboxConfig {
        let mode = |host: bool| {
            if host {
                cri::NamespaceMode::Node as i32
            } else {
                cri::NamespaceMode::Pod as i32
            }
        };
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: cfg.name.clone(),
                uid: cfg.name.clone(),
                namespace: CRI_NAMESPACE.into(),
                attempt: 0,
            }),
            // With the host network the sandbox shares the host's UTS namespace, where runc
            // refuses to set a hostname.
            hostname: if cfg.host_network {
                String::new()
            } else {
                cfg.hostname.clone()
            },
            // Container log paths are given absolute (relative to "/").
            log_directory: "/".into(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: mode(cfg.host_network),
                        ipc: mode(cfg.host_ipc),
                        pid: cri::NamespaceMode::Container as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The sandbox config for `id`: remembered from run_sandbox, else rebuilt from the runtime's
    /// status (after a restart of skiff).
    async fn known_sandbox_config(&self, id: &str) -> Result<cri::PodSandboxConfig> {
        if let Some(c) = self.sandboxes.lock().ok().and_then(|m| m.get(id).cloned()) {
            return Ok(c);
        }
        let st = self
            .rt()
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            })
            .await
            .map_err(rpc_err(&self.endpoint, "PodSandboxStatus"))?
            .into_inner()
            .status
            .ok_or_else(|| Error::NotFound {
                kind: "sandbox",
                id: id.into(),
            })?;
        let ns = st
            .linux
            .as_ref()
            .and_then(|l| l.namespaces.as_ref())
            .and_then(|n| n.options.as_ref());
        let name = st.metadata.map(|m| m.name).unwrap_or_default();
        let cfg = SandboxConfig {
            hostname: name.clone(),
            name,
            host_network: ns.is_some_and(|o| o.network == cri::NamespaceMode::Node as i32),
            host_ipc: ns.is_some_and(|o| o.ipc == cri::NamespaceMode::Node as i32),
        };
        Ok(self.sandbox_config(&cfg))
    }
}

fn sandbox_status(st: cri::PodSandboxStatus, info: &HashMap<String, String>) -> SandboxStatus {
    let host_network = st
        .linux
        .as_ref()
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref())
        .is_some_and(|o| o.network == cri::NamespaceMode::Node as i32);
    SandboxStatus {
        id: st.id,
        name: st.metadata.map(|m| m.name).unwrap_or_default(),
        state: if st.state == cri::PodSandboxState::SandboxReady as i32 {
            SandboxState::Ready
        } else {
            SandboxState::NotReady
        },
        netns: if host_network {
            None
        } else {
            netns_from_info(info)
        },
        created_at: st.created_at,
        ip: st
            .network
            .as_ref()
            .and_then(|n| n.ip.parse::<std::net::IpAddr>().ok()),
    }
}

/// containerd reports the sandbox's network namespace path in its verbose info (`info` key,
/// JSON with `runtimeSpec.linux.namespaces`); CRI itself has no field for it.
fn netns_from_info(info: &HashMap<String, String>) -> Option<PathBuf> {
    let v: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    v.pointer("/runtimeSpec/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|n| n.get("type").and_then(|t| t.as_str()) == Some("network"))?
        .get("path")?
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// Whether a sandbox was created through this client (its CRI metadata namespace).
fn is_ours(s: &cri::PodSandbox) -> bool {
    s.metadata
        .as_ref()
        .is_some_and(|m| m.namespace == CRI_NAMESPACE)
}

fn container_state(s: i32) -> ContainerState {
    match cri::ContainerState::try_from(s) {
        Ok(cri::ContainerState::ContainerCreated) => ContainerState::Created,
        Ok(cri::ContainerState::ContainerRunning) => ContainerState::Running,
        Ok(cri::ContainerState::ContainerExited) => ContainerState::Exited,
        _ => ContainerState::Unknown,
    }
}

fn nonzero(t: i64) -> Option<i64> {
    (t > 0).then_some(t)
}

fn container_status(
    st: cri::ContainerStatus,
    sandbox_id: Option<String>,
    info: &HashMap<String, String>,
) -> ContainerStatus {
    let state = container_state(st.state);
    let extra: Option<serde_json::Value> =
        info.get("info").and_then(|i| serde_json::from_str(i).ok());
    let pid = extra
        .as_ref()
        .and_then(|v| v.get("pid"))
        .and_then(|p| p.as_i64())
        .filter(|p| *p > 0)
        .and_then(|p| i32::try_from(p).ok());
    let sandbox_id = sandbox_id.or_else(|| {
        extra
            .as_ref()
            .and_then(|v| v.get("sandboxID"))
            .and_then(|s| s.as_str())
            .map(str::to_string)
    });
    ContainerStatus {
        id: st.id,
        name: st.metadata.map(|m| m.name).unwrap_or_default(),
        sandbox_id,
        image: st.image.map(|i| i.image).unwrap_or_default(),
        image_digest: st.image_ref,
        state,
        pid,
        created_at: st.created_at,
        started_at: nonzero(st.started_at),
        finished_at: nonzero(st.finished_at),
        exit_code: (state == ContainerState::Exited).then_some(st.exit_code),
        oom_killed: st.reason == "OOMKilled",
        log_path: PathBuf::from(st.log_path),
        error: (!st.message.is_empty()).then_some(st.message),
    }
}

fn container_config(cfg: &ContainerConfig, log_path: &Path) -> Result<cri::ContainerConfig> {
    let mut mounts = Vec::new();
    for m in &cfg.mounts {
        if m.kind == MountKind::Tmpfs {
            return Err(unsupported(&format!(
                "a tmpfs mount at {} (mount a tmpfs on the host and bind it)",
                m.destination
            )));
        }
        mounts.push(cri::Mount {
            container_path: m.destination.clone(),
            host_path: m.source.display().to_string(),
            readonly: m.readonly,
            ..Default::default()
        });
    }
    let log = log_path.display().to_string();
    let log_rel = log.trim_start_matches('/').to_string();
    let r = &cfg.resources;
    Ok(cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: cfg.name.clone(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: cfg.image.clone(),
            ..Default::default()
        }),
        command: cfg.command.clone(),
        args: cfg.args.clone(),
        working_dir: cfg.working_dir.clone().unwrap_or_default(),
        envs: cfg
            .env
            .iter()
            .map(|(k, v)| cri::KeyValue {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        mounts,
        devices: cfg
            .devices
            .iter()
            .map(|d| cri::Device {
                host_path: d.host_path.display().to_string(),
                container_path: d
                    .container_path
                    .clone()
                    .unwrap_or_else(|| d.host_path.display().to_string()),
                permissions: d.permissions.clone().unwrap_or_else(|| "rwm".into()),
            })
            .collect(),
        log_path: log_rel,
        stdin: cfg.stdin,
        stdin_once: cfg.stdin_once,
        tty: cfg.tty,
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                cpu_period: r
                    .cpu_period
                    .and_then(|p| i64::try_from(p).ok())
                    .unwrap_or(0),
                cpu_quota: r.cpu_quota.unwrap_or(0),
                cpu_shares: r
                    .cpu_shares
                    .and_then(|s| i64::try_from(s).ok())
                    .unwrap_or(0),
                memory_limit_in_bytes: r.memory_limit.unwrap_or(0),
                ..Default::default()
            }),
            security_context: Some(cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    add_capabilities: cfg.cap_add.clone(),
                    drop_capabilities: cfg.cap_drop.clone(),
                    ..Default::default()
                }),
                privileged: cfg.privileged,
                run_as_user: cfg.run_as_user.map(|u| cri::Int64Value {
                    value: i64::from(u),
                }),
                run_as_group: cfg.run_as_group.map(|g| cri::Int64Value {
                    value: i64::from(g),
                }),
                supplemental_groups: cfg
                    .supplementary_groups
                    .iter()
                    .map(|g| i64::from(*g))
                    .collect(),
                readonly_rootfs: cfg.readonly_rootfs,
                no_new_privs: cfg.no_new_privs,
                seccomp: Some(cri::SecurityProfile {
                    profile_type: if cfg.seccomp_runtime_default {
                        cri::security_profile::ProfileType::RuntimeDefault as i32
                    } else {
                        cri::security_profile::ProfileType::Unconfined as i32
                    },
                    ..Default::default()
                }),
                namespace_options: Some(cri::NamespaceOption {
                    pid: if cfg.host_pid {
                        cri::NamespaceMode::Node as i32
                    } else {
                        cri::NamespaceMode::Container as i32
                    },
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    })
}

fn auth(creds: &Credentials) -> Option<cri::AuthConfig> {
    match creds {
        Credentials::Anonymous => None,
        Credentials::Basic { username, password } => Some(cri::AuthConfig {
            username: username.clone(),
            password: password.clone(),
            ..Default::default()
        }),
        Credentials::Bearer(token) => Some(cri::AuthConfig {
            registry_token: token.clone(),
            ..Default::default()
        }),
    }
}

impl CriRuntime {
    /// CRI `ContainerStats` of one container.
    async fn cri_stats(&self, id: &str) -> Result<cri::ContainerStats> {
        self.rt()
            .container_stats(cri::ContainerStatsRequest {
                container_id: id.into(),
            })
            .await
            .map_err(rpc_err(&self.endpoint, "ContainerStats"))?
            .into_inner()
            .stats
            .ok_or_else(|| Error::NotFound {
                kind: "container",
                id: id.into(),
            })
    }
}

/// The runtime's sandbox (pause) image as [`CriRuntime::sandbox_image`] finds it: the
/// configured reference and, when the runtime has that image, its id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SandboxImage {
    reference: String,
    id: Option<String>,
}

impl SandboxImage {
    fn is(&self, image: &cri::Image) -> bool {
        self.id.as_deref() == Some(image.id.as_str())
            || image.repo_tags.contains(&self.reference)
            || image.repo_digests.contains(&self.reference)
    }
}

/// Maps a CRI image; the runtime's sandbox image counts as pinned even where the runtime does
/// not set `pinned` (containerd before 1.7).
fn image_info(i: cri::Image, sandbox: Option<&SandboxImage>) -> ImageInfo {
    ImageInfo {
        pinned: i.pinned || sandbox.is_some_and(|s| s.is(&i)),
        id: i.id,
        names: i.repo_tags,
        size: i.size,
    }
}

/// The sandbox image a runtime is configured with, from its verbose `Status` info: containerd
/// puts its CRI plugin config there as JSON under `config`, with the key `sandboxImage`.
/// Runtimes that do not say give None (CRI-O marks its pause image `pinned` itself).
fn sandbox_image_from_status(info: &HashMap<String, String>) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(info.get("config")?).ok()?;
    v.get("sandboxImage")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The image a sandbox runs, from containerd's verbose sandbox info (`image` in the `info`
/// JSON); None where the runtime does not say.
fn sandbox_image_from_info(info: &HashMap<String, String>) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    v.get("image")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The image references of containers: the spec'd image and the resolved `image_ref`.
fn container_image_refs(containers: &[cri::Container]) -> HashSet<String> {
    containers
        .iter()
        .flat_map(|c| {
            [
                c.image.as_ref().map(|i| i.image.clone()),
                Some(c.image_ref.clone()),
            ]
        })
        .flatten()
        .filter(|r| !r.is_empty())
        .collect()
}

impl CriRuntime {
    /// Every pod sandbox the runtime has, skiff's or not (callers filter with `is_ours`).
    async fn all_sandboxes(&self) -> Result<Vec<cri::PodSandbox>> {
        Ok(self
            .rt()
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .map_err(rpc_err(&self.endpoint, "ListPodSandbox"))?
            .into_inner()
            .items)
    }

    /// Every container the runtime has, skiff's or not.
    async fn all_containers(&self) -> Result<Vec<cri::Container>> {
        Ok(self
            .rt()
            .list_containers(cri::ListContainersRequest { filter: None })
            .await
            .map_err(rpc_err(&self.endpoint, "ListContainers"))?
            .into_inner()
            .containers)
    }

    /// CRI `ImageStatus`: the image `reference` (a name, a digest reference or an id) names,
    /// or None if the runtime does not have it.
    async fn cri_image(&self, reference: &str) -> Result<Option<cri::Image>> {
        Ok(self
            .img()
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: reference.into(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .map_err(rpc_err(&self.endpoint, "ImageStatus"))?
            .into_inner()
            .image)
    }

    /// The runtime's configured sandbox image (verbose `Status`), with its id if present.
    async fn sandbox_image(&self) -> Result<Option<SandboxImage>> {
        let info = self
            .rt()
            .status(cri::StatusRequest { verbose: true })
            .await
            .map_err(rpc_err(&self.endpoint, "Status"))?
            .into_inner()
            .info;
        let Some(reference) = sandbox_image_from_status(&info) else {
            return Ok(None);
        };
        let id = self.cri_image(&reference).await?.map(|i| i.id);
        Ok(Some(SandboxImage { reference, id }))
    }

    /// The images of all pod sandboxes of the runtime, not only skiff's: the configured
    /// sandbox image if any sandbox exists, and what each sandbox's verbose status names.
    async fn sandbox_images_in_use(&self) -> Result<HashSet<String>> {
        let sandboxes = self.all_sandboxes().await?;
        let mut out = HashSet::new();
        if sandboxes.is_empty() {
            return Ok(out);
        }
        if let Some(s) = self.sandbox_image().await? {
            out.insert(s.reference);
        }
        for s in sandboxes {
            let resp = match self
                .rt()
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: s.id.clone(),
                    verbose: true,
                })
                .await
            {
                Ok(r) => r.into_inner(),
                // Removed since the list: it uses nothing any more.
                Err(e) if e.code() == tonic::Code::NotFound => continue,
                Err(e) => return Err(rpc_err(&self.endpoint, "PodSandboxStatus")(e)),
            };
            out.extend(sandbox_image_from_info(&resp.info));
        }
        Ok(out)
    }
}

#[async_trait]
impl Runtime for CriRuntime {
    fn name(&self) -> String {
        self.runtime_name.clone()
    }

    fn version(&self) -> Option<String> {
        Some(self.runtime_version.clone())
    }

    fn manages_pod_network(&self) -> bool {
        true
    }

    async fn streaming_url(&self, req: StreamRequest) -> Result<Option<String>> {
        let url = match req {
            StreamRequest::Exec {
                id,
                argv,
                tty,
                stdin,
                stdout,
                stderr,
            } => {
                self.rt()
                    .exec(cri::ExecRequest {
                        container_id: id,
                        cmd: argv,
                        tty,
                        stdin,
                        stdout,
                        // With a TTY stderr is merged into stdout; CRI refuses both set.
                        stderr: stderr && !tty,
                    })
                    .await
                    .map_err(rpc_err(&self.endpoint, "Exec"))?
                    .into_inner()
                    .url
            }
            StreamRequest::Attach {
                id,
                tty,
                stdin,
                stdout,
                stderr,
            } => {
                self.rt()
                    .attach(cri::AttachRequest {
                        container_id: id,
                        stdin,
                        tty,
                        stdout,
                        stderr: stderr && !tty,
                    })
                    .await
                    .map_err(rpc_err(&self.endpoint, "Attach"))?
                    .into_inner()
                    .url
            }
            StreamRequest::PortForward { sandbox_id, ports } => {
                self.rt()
                    .port_forward(cri::PortForwardRequest {
                        pod_sandbox_id: sandbox_id,
                        port: ports.into_iter().map(i32::from).collect(),
                    })
                    .await
                    .map_err(rpc_err(&self.endpoint, "PortForward"))?
                    .into_inner()
                    .url
            }
        };
        if url.is_empty() {
            return Err(Error::InvalidState(format!(
                "the CRI runtime at {} returned no streaming URL",
                self.endpoint
            )));
        }
        Ok(Some(url))
    }

    async fn run_sandbox(&self, cfg: SandboxConfig) -> Result<String> {
        let config = self.sandbox_config(&cfg);
        let id = self
            .rt()
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .map_err(rpc_err(&self.endpoint, "RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id;
        if let Ok(mut m) = self.sandboxes.lock() {
            m.insert(id.clone(), config);
        }
        Ok(id)
    }

    async fn stop_sandbox(&self, id: &str, grace: Duration) -> Result<()> {
        // CRI's StopPodSandbox kills at once; give the containers their grace period first.
        for c in self.list_containers().await? {
            if c.sandbox_id.as_deref() == Some(id) && c.state == ContainerState::Running {
                self.stop_container(&c.id, grace).await?;
            }
        }
        self.rt()
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .map_err(rpc_err(&self.endpoint, "StopPodSandbox"))?;
        Ok(())
    }

    async fn remove_sandbox(&self, id: &str) -> Result<()> {
        self.rt()
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .map_err(rpc_err(&self.endpoint, "RemovePodSandbox"))?;
        if let Ok(mut m) = self.sandboxes.lock() {
            m.remove(id);
        }
        Ok(())
    }

    async fn sandbox_status(&self, id: &str) -> Result<SandboxStatus> {
        let resp = self
            .rt()
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            })
            .await
            .map_err(rpc_err(&self.endpoint, "PodSandboxStatus"))?
            .into_inner();
        let st = resp.status.ok_or_else(|| Error::NotFound {
            kind: "sandbox",
            id: id.into(),
        })?;
        Ok(sandbox_status(st, &resp.info))
    }

    async fn list_sandboxes(&self) -> Result<Vec<SandboxStatus>> {
        let items = self.all_sandboxes().await?;
        let mut out = Vec::with_capacity(items.len());
        for s in items.into_iter().filter(is_ours) {
            // The list lacks the netns path; ask for each sandbox's verbose status.
            match self.sandbox_status(&s.id).await {
                Ok(st) => out.push(st),
                Err(e) => {
                    tracing::debug!(sandbox = %s.id, error = %e, "sandbox vanished while listing")
                }
            }
        }
        Ok(out)
    }

    async fn create_container(
        &self,
        sandbox_id: Option<&str>,
        cfg: ContainerConfig,
        log_path: PathBuf,
    ) -> Result<String> {
        let Some(sandbox_id) = sandbox_id else {
            return Err(unsupported("a container without a pod sandbox"));
        };
        if let Some(dir) = log_path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(crate::error::io_err("create log directory", dir))?;
        }
        let sandbox_config = self.known_sandbox_config(sandbox_id).await?;
        let config = container_config(&cfg, &log_path)?;
        let id = self
            .rt()
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox_id.into(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            })
            .await
            .map_err(rpc_err(&self.endpoint, "CreateContainer"))?
            .into_inner()
            .container_id;
        Ok(id)
    }

    async fn start_container(&self, id: &str) -> Result<()> {
        self.rt()
            .start_container(cri::StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .map_err(rpc_err(&self.endpoint, "StartContainer"))?;
        Ok(())
    }

    async fn stop_container(&self, id: &str, grace: Duration) -> Result<ContainerStatus> {
        self.rt()
            .stop_container(cri::StopContainerRequest {
                container_id: id.into(),
                timeout: i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
            })
            .await
            .map_err(rpc_err(&self.endpoint, "StopContainer"))?;
        self.container_status(id).await
    }

    async fn remove_container(&self, id: &str) -> Result<()> {
        self.rt()
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .map_err(rpc_err(&self.endpoint, "RemoveContainer"))?;
        Ok(())
    }

    async fn container_status(&self, id: &str) -> Result<ContainerStatus> {
        let resp = self
            .rt()
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: true,
            })
            .await
            .map_err(rpc_err(&self.endpoint, "ContainerStatus"))?
            .into_inner();
        let st = resp.status.ok_or_else(|| Error::NotFound {
            kind: "container",
            id: id.into(),
        })?;
        Ok(container_status(st, None, &resp.info))
    }

    async fn list_containers(&self) -> Result<Vec<ContainerStatus>> {
        let ours: std::collections::HashSet<String> = self
            .all_sandboxes()
            .await?
            .into_iter()
            .filter(is_ours)
            .map(|s| s.id)
            .collect();
        let items = self.all_containers().await?;
        let mut out = Vec::with_capacity(items.len());
        for c in items
            .into_iter()
            .filter(|c| ours.contains(&c.pod_sandbox_id))
        {
            match self.container_status(&c.id).await {
                Ok(mut st) => {
                    st.sandbox_id = Some(c.pod_sandbox_id);
                    out.push(st);
                }
                Err(e) => {
                    tracing::debug!(container = %c.id, error = %e, "container vanished while listing")
                }
            }
        }
        Ok(out)
    }

    async fn container_stats(&self, id: &str) -> Result<CgroupStats> {
        let stats = self.cri_stats(id).await?;
        let cpu = stats
            .cpu
            .and_then(|c| c.usage_core_nano_seconds)
            .map(|v| v.value)
            .unwrap_or(0);
        let mem = stats.memory.unwrap_or_default();
        Ok(CgroupStats {
            cpu_usage_ns: cpu,
            memory_usage_bytes: mem.usage_bytes.map(|v| v.value).unwrap_or(0),
            memory_working_set_bytes: mem.working_set_bytes.map(|v| v.value).unwrap_or(0),
        })
    }

    async fn writable_layer_bytes(&self, id: &str) -> Result<Option<u64>> {
        Ok(self
            .cri_stats(id)
            .await?
            .writable_layer
            .and_then(|w| w.used_bytes)
            .map(|v| v.value))
    }

    async fn exec_sync(
        &self,
        id: &str,
        argv: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecOutput> {
        let resp = self
            .rt()
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: argv,
                timeout: i64::try_from(timeout.as_secs().max(1)).unwrap_or(i64::MAX),
            })
            .await
            .map_err(rpc_err(&self.endpoint, "ExecSync"))?
            .into_inner();
        Ok(ExecOutput {
            exit_code: resp.exit_code,
            stdout: resp.stdout,
            stderr: resp.stderr,
        })
    }

    async fn exec(
        &self,
        _id: &str,
        _argv: Vec<String>,
        _tty: bool,
    ) -> Result<Box<dyn ExecSession>> {
        Err(via_streaming_server("streaming exec"))
    }

    async fn attach(&self, _id: &str) -> Result<Box<dyn AttachSession>> {
        Err(via_streaming_server("attach"))
    }

    async fn resize(&self, _id: &str, _rows: u16, _cols: u16) -> Result<()> {
        Err(via_streaming_server("terminal resize"))
    }

    async fn port_forward(&self, _sandbox_id: &str, _port: u16) -> Result<Box<dyn DuplexStream>> {
        Err(via_streaming_server("port-forward"))
    }

    async fn pull_image(
        &self,
        reference: &str,
        creds: &Credentials,
        _progress: ProgressFn<'_>,
    ) -> Result<String> {
        // CRI reports no progress; the pull is one call.
        let image_ref = self
            .img()
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: reference.into(),
                    ..Default::default()
                }),
                auth: auth(creds),
                sandbox_config: None,
            })
            .await
            .map_err(rpc_err(&self.endpoint, "PullImage"))?
            .into_inner()
            .image_ref;
        Ok(image_ref)
    }

    async fn import_image(&self, archive: PathBuf) -> Result<Vec<String>> {
        Err(Error::InvalidState(format!(
            "importing {} is not part of CRI; import it with the runtime's own tool (containerd: `ctr -n k8s.io images import {}`)",
            archive.display(),
            archive.display()
        )))
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>> {
        let images = self
            .img()
            .list_images(cri::ListImagesRequest { filter: None })
            .await
            .map_err(rpc_err(&self.endpoint, "ListImages"))?
            .into_inner()
            .images;
        let sandbox = self.sandbox_image().await?;
        Ok(images
            .into_iter()
            .map(|i| image_info(i, sandbox.as_ref()))
            .collect())
    }

    async fn image_status(&self, reference: &str) -> Result<Option<ImageInfo>> {
        // On every container start (the pull policy check): one call only. `pinned` here is
        // the runtime's own flag; `list_images`, which image GC reads, also marks the sandbox
        // image.
        Ok(self
            .cri_image(reference)
            .await?
            .map(|image| image_info(image, None)))
    }

    async fn remove_image(&self, reference: &str) -> Result<bool> {
        if self.cri_image(reference).await?.is_none() {
            return Ok(false);
        }
        self.img()
            .remove_image(cri::RemoveImageRequest {
                image: Some(cri::ImageSpec {
                    image: reference.into(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(rpc_err(&self.endpoint, "RemoveImage"))?;
        Ok(true)
    }

    async fn collect_image(&self, image: &ImageInfo) -> Result<bool> {
        // By id, as the kubelet does: the runtime removes the image with all its names.
        self.remove_image(&image.id).await
    }

    async fn image_fs(&self) -> Result<Option<ImageFs>> {
        let resp = self
            .img()
            .image_fs_info(cri::ImageFsInfoRequest {})
            .await
            .map_err(rpc_err(&self.endpoint, "ImageFsInfo"))?
            .into_inner();
        Ok(resp.image_filesystems.into_iter().find_map(|f| {
            let mountpoint = f.fs_id?.mountpoint;
            (!mountpoint.is_empty()).then(|| ImageFs {
                mountpoint: PathBuf::from(mountpoint),
                used_bytes: f.used_bytes.map(|v| v.value),
            })
        }))
    }

    async fn images_in_use(&self) -> Result<HashSet<String>> {
        // Every container of the runtime, not only skiff's: another client of a shared
        // containerd may run (or keep, exited) containers from images skiff never pulled.
        let containers = self.all_containers().await?;
        let mut refs = container_image_refs(&containers);
        refs.extend(self.sandbox_images_in_use().await?);
        // Containers name images by reference (a tag, a digest reference or an id); the image
        // list names them by id and tags: resolve every reference to its image's id.
        let mut out = refs.clone();
        for r in &refs {
            if let Some(image) = self.cri_image(r).await? {
                out.insert(image.id);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_unix_sockets() {
        assert_eq!(
            socket_path("unix:///run/containerd/containerd.sock").unwrap(),
            PathBuf::from("/run/containerd/containerd.sock")
        );
        assert_eq!(
            socket_path("/run/x.sock").unwrap(),
            PathBuf::from("/run/x.sock")
        );
        let e = socket_path("tcp://127.0.0.1:1234").unwrap_err().to_string();
        assert!(e.contains("unix socket"), "{e}");
    }

    #[test]
    fn netns_path_is_read_from_containerd_verbose_info() {
        let mut info = HashMap::new();
        info.insert(
            "info".to_string(),
            r#"{"pid":42,"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1"}]}}}"#
                .to_string(),
        );
        assert_eq!(
            netns_from_info(&info),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        assert_eq!(netns_from_info(&HashMap::new()), None);
    }

    #[test]
    fn sandbox_image_is_read_from_containerd_status_and_sandbox_info_and_pins_by_id_or_name() {
        // containerd 1.6: Status info `config` has `sandboxImage`; a sandbox's `info` has `image`.
        let status = HashMap::from([(
            "config".to_string(),
            r#"{"sandboxImage":"registry.k8s.io/pause:3.6","containerd":{}}"#.to_string(),
        )]);
        assert_eq!(
            sandbox_image_from_status(&status).as_deref(),
            Some("registry.k8s.io/pause:3.6")
        );
        assert_eq!(sandbox_image_from_status(&HashMap::new()), None);
        let info = HashMap::from([(
            "info".to_string(),
            r#"{"pid":7,"image":"registry.k8s.io/pause:3.6"}"#.to_string(),
        )]);
        assert_eq!(
            sandbox_image_from_info(&info).as_deref(),
            Some("registry.k8s.io/pause:3.6")
        );

        let image = |id: &str, tag: &str, pinned: bool| cri::Image {
            id: id.into(),
            repo_tags: vec![tag.into()],
            pinned,
            ..Default::default()
        };
        let sandbox = SandboxImage {
            reference: "registry.k8s.io/pause:3.6".into(),
            id: Some("sha256:p".into()),
        };
        let by_id = image_info(image("sha256:p", "other/name:1", false), Some(&sandbox));
        assert!(by_id.pinned);
        let by_name = image_info(
            image("sha256:q", "registry.k8s.io/pause:3.6", false),
            Some(&sandbox),
        );
        assert!(by_name.pinned);
        assert!(!image_info(image("sha256:a", "app:1", false), Some(&sandbox)).pinned);
        assert!(image_info(image("sha256:a", "app:1", true), None).pinned);
    }

    #[test]
    fn containers_name_their_images_by_spec_and_by_ref() {
        let c = |image: &str, image_ref: &str| cri::Container {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            image_ref: image_ref.into(),
            ..Default::default()
        };
        let refs = container_image_refs(&[
            c("busybox:1", "sha256:b"),
            c("", "docker.io/library/nginx@sha256:n"),
        ]);
        let mut refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        refs.sort_unstable();
        assert_eq!(
            refs,
            ["busybox:1", "docker.io/library/nginx@sha256:n", "sha256:b"]
        );
    }

    #[test]
    fn container_config_maps_limits_security_and_log_path() {
        let cfg = ContainerConfig {
            name: "app".into(),
            image: "busybox".into(),
            command: vec!["sh".into()],
            env: vec![("A".into(), "1".into())],
            run_as_user: Some(1000),
            cap_drop: vec!["ALL".into()],
            readonly_rootfs: true,
            resources: crate::spec::Resources {
                memory_limit: Some(16 << 20),
                cpu_quota: Some(50_000),
                cpu_period: Some(100_000),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = container_config(&cfg, Path::new("/var/log/pods/x/app/0.log")).unwrap();
        assert_eq!(c.log_path, "var/log/pods/x/app/0.log");
        let linux = c.linux.unwrap();
        let res = linux.resources.unwrap();
        assert_eq!(res.memory_limit_in_bytes, 16 << 20);
        assert_eq!(res.cpu_quota, 50_000);
        let sc = linux.security_context.unwrap();
        assert_eq!(sc.run_as_user.unwrap().value, 1000);
        assert!(sc.readonly_rootfs);
        assert_eq!(sc.capabilities.unwrap().drop_capabilities, vec!["ALL"]);
        assert_eq!(c.envs[0].key, "A");

        let tmpfs = ContainerConfig {
            mounts: vec![crate::spec::Mount {
                kind: MountKind::Tmpfs,
                destination: "/scratch".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let e = container_config(&tmpfs, Path::new("/l"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/scratch"), "{e}");
    }
}
