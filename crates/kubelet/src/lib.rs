//! skiff-kubelet: the node agent. Registers the Node and renews its Lease, runs the pods bound to
//! this node through the runtime, reports their status, and serves the kubelet HTTPS API (logs,
//! exec, attach, port-forward, stats) that the API server proxies to.

pub mod server;
