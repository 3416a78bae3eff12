//! The server side of joining (the [`skiff_apiserver::NodeCredentialIssuer`] behind
//! `/cacerts` and `/v1-skiff/node-certs`) and the answer an agent gets: its certificates plus
//! the cluster settings a node needs (cluster and service CIDRs).

use std::net::IpAddr;
use std::path::PathBuf;

use skiff_pki::join::NodeCerts;

/// What `/v1-skiff/node-certs` answers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinResponse {
    /// The node's certificates.
    #[serde(flatten)]
    pub certs: NodeCerts,
    /// The cluster (pod) CIDR (`--cluster-cidr` of the server).
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: String,
    /// The service CIDR (`--service-cidr` of the server).
    #[serde(rename = "serviceCIDR")]
    pub service_cidr: String,
}

/// The server's join backend: the CA under `tls_dir` and the cluster secret.
pub(crate) struct ServerJoin {
    pub tls_dir: PathBuf,
    pub ca_pem: String,
    pub secret: String,
    pub cluster_cidr: String,
    pub service_cidr: String,
}

impl skiff_apiserver::NodeCredentialIssuer for ServerJoin {
    fn ca_bundle(&self) -> String {
        self.ca_pem.clone()
    }

    fn check(&self, user: &str, password: &str) -> bool {
        // k3s writes `server:` into tokens; its agents authenticate as `node:`.
        let user_ok = user == "server" || user == "node";
        let pw_ok = skiff_pki::join::constant_time_eq(password.as_bytes(), self.secret.as_bytes());
        user_ok & pw_ok
    }

    fn issue(&self, node_name: &str, node_ip: Option<IpAddr>) -> Result<serde_json::Value, String> {
        let certs = skiff_pki::join::issue_node_certs(&self.tls_dir, node_name, node_ip)
            .map_err(|e| e.to_string())?;
        serde_json::to_value(JoinResponse {
            certs,
            cluster_cidr: self.cluster_cidr.clone(),
            service_cidr: self.service_cidr.clone(),
        })
        .map_err(|e| e.to_string())
    }
}
