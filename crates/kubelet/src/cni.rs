//! The CNI network configuration skiff writes for an external CRI runtime (containerd calls CNI
//! itself at RunPodSandbox), as k3s writes flannel's: one `bridge` network on skiff's `cni0`
//! bridge with `host-local` IPAM over the node's pod CIDR, and `portmap` for hostPorts.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde_json::json;
use skiff_net::Ipv4Cidr;

use crate::config::{KubeletError, io_err};

/// The file name of skiff's network in the CNI config dir.
pub const CONFLIST_NAME: &str = "10-skiff.conflist";

/// What the conflist describes.
#[derive(Debug, Clone)]
pub struct CniNetwork<'a> {
    /// The bridge (`cni0`), which skiff itself created with the gateway address.
    pub bridge: &'a str,
    /// The node's pod CIDR.
    pub pod_cidr: Ipv4Cidr,
    /// The bridge's address, the pods' default gateway.
    pub gateway: Ipv4Addr,
    /// The MTU of the pod interfaces.
    pub mtu: u32,
    /// host-local's state dir (under skiff's data dir).
    pub ipam_dir: &'a Path,
}

/// Renders the conflist (CNI spec 1.0.0; Debian's plugins speak it).
pub fn render(n: &CniNetwork<'_>) -> String {
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "skiff",
        "plugins": [
            {
                "type": "bridge",
                "bridge": n.bridge,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "mtu": n.mtu,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{
                        "subnet": n.pod_cidr.to_string(),
                        "gateway": n.gateway.to_string(),
                    }]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": n.ipam_dir.display().to_string(),
                },
            },
            {
                "type": "portmap",
                "capabilities": {"portMappings": true},
            },
        ],
    });
    // serde_json's pretty printer cannot fail on a Value.
    serde_json::to_string_pretty(&conf).unwrap_or_else(|_| conf.to_string())
}

/// Writes the conflist into `dir` (atomically: a runtime may read it at any time); returns
/// its path.
pub fn write(dir: &Path, n: &CniNetwork<'_>) -> Result<PathBuf, KubeletError> {
    std::fs::create_dir_all(dir).map_err(io_err("creating CNI config dir", dir))?;
    std::fs::create_dir_all(n.ipam_dir).map_err(io_err("creating CNI IPAM dir", n.ipam_dir))?;
    let path = dir.join(CONFLIST_NAME);
    let text = render(n);
    if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
        return Ok(path);
    }
    let tmp = dir.join(format!(".{CONFLIST_NAME}.tmp"));
    std::fs::write(&tmp, text).map_err(io_err("writing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err("renaming to", &path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_has_bridge_on_cni0_with_host_local_over_the_pod_cidr_and_portmap() {
        let ipam = Path::new("/var/lib/skiff/agent/cni/networks");
        let n = CniNetwork {
            bridge: "cni0",
            pod_cidr: "10.42.3.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 42, 3, 1),
            mtu: 1450,
            ipam_dir: ipam,
        };
        let v: serde_json::Value = serde_json::from_str(&render(&n)).unwrap();
        assert_eq!(v["name"], "skiff");
        let br = &v["plugins"][0];
        assert_eq!(br["type"], "bridge");
        assert_eq!(br["bridge"], "cni0");
        assert_eq!(br["isGateway"], true);
        assert_eq!(br["ipMasq"], true);
        assert_eq!(br["hairpinMode"], true);
        assert_eq!(br["mtu"], 1450);
        let ipam_v = &br["ipam"];
        assert_eq!(ipam_v["type"], "host-local");
        assert_eq!(ipam_v["ranges"][0][0]["subnet"], "10.42.3.0/24");
        assert_eq!(ipam_v["ranges"][0][0]["gateway"], "10.42.3.1");
        assert_eq!(ipam_v["dataDir"], "/var/lib/skiff/agent/cni/networks");
        assert_eq!(v["plugins"][1]["type"], "portmap");
        assert_eq!(v["plugins"][1]["capabilities"]["portMappings"], true);
        assert_eq!(v["plugins"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn write_replaces_the_file_and_is_idempotent() {
        let d = tempfile::tempdir().unwrap();
        let ipam = d.path().join("ipam");
        let mut n = CniNetwork {
            bridge: "cni0",
            pod_cidr: "10.42.0.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 42, 0, 1),
            mtu: 1500,
            ipam_dir: &ipam,
        };
        let conf = d.path().join("net.d");
        let p = write(&conf, &n).unwrap();
        assert_eq!(p, conf.join("10-skiff.conflist"));
        assert!(ipam.is_dir());
        assert_eq!(write(&conf, &n).unwrap(), p);
        n.pod_cidr = "10.42.7.0/24".parse().unwrap();
        write(&conf, &n).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("10.42.7.0/24"), "{text}");
        // No temp file is left behind.
        assert_eq!(std::fs::read_dir(&conf).unwrap().count(), 1);
    }
}
