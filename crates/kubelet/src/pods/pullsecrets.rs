//! imagePullSecrets: registry credentials from `kubernetes.io/dockerconfigjson` (and legacy
//! `kubernetes.io/dockercfg`) secrets, matched to an image the way the kubelet's credential
//! keyring does: the key's host (with `*` globs per DNS label) and port must match the image's
//! registry, and the key's path must prefix the image's repository. More specific keys first.

use std::collections::BTreeMap;

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;
use skiff_runtime::pull::Credentials;

#[derive(Deserialize, Default)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "registrytoken")]
    registry_token: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

#[derive(Deserialize)]
struct DockerConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

/// One credential with the registry key it was filed under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedCredential {
    /// The key as written (`registry.example.com:5000/team`, `https://index.docker.io/v1/`).
    pub key: String,
    /// What to log in with.
    pub creds: Credentials,
}

fn entry_creds(e: Entry) -> Option<Credentials> {
    if let (Some(u), Some(p)) = (&e.username, &e.password)
        && !u.is_empty()
    {
        return Some(Credentials::Basic {
            username: u.clone(),
            password: p.clone(),
        });
    }
    if let Some(a) = e.auth.filter(|a| !a.is_empty()) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .ok()?;
        let s = String::from_utf8(raw).ok()?;
        let (u, p) = s.split_once(':')?;
        return Some(Credentials::Basic {
            username: u.to_string(),
            password: p.to_string(),
        });
    }
    e.registry_token
        .or(e.identity_token)
        .filter(|t| !t.is_empty())
        .map(Credentials::Bearer)
}

/// The credentials a pull secret holds; a secret of another type, or unreadable data, gives
/// none (the kubelet ignores such secrets too).
pub fn secret_credentials(s: &Secret) -> Vec<KeyedCredential> {
    let data = s.data.as_ref();
    let get = |k: &str| data.and_then(|d| d.get(k)).map(|b| b.0.clone());
    let auths: BTreeMap<String, Entry> = if let Some(raw) = get(".dockerconfigjson") {
        match serde_json::from_slice::<DockerConfigJson>(&raw) {
            Ok(c) => c.auths,
            Err(_) => return Vec::new(),
        }
    } else if let Some(raw) = get(".dockercfg") {
        serde_json::from_slice(&raw).unwrap_or_default()
    } else {
        return Vec::new();
    };
    auths
        .into_iter()
        .filter_map(|(key, e)| {
            Some(KeyedCredential {
                creds: entry_creds(e)?,
                key,
            })
        })
        .collect()
}

/// `host[:port]` and path of a registry key, with the scheme and Docker Hub's aliases folded.
fn parse_key(key: &str) -> (String, String) {
    let k = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let (host, path) = k.split_once('/').unwrap_or((k, ""));
    let host = match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io",
        h => h,
    };
    // Docker Hub's historical key is `https://index.docker.io/v1/`: its path is not a repo.
    let path = if host == "docker.io" && (path == "v1" || path == "v1/") {
        ""
    } else {
        path.trim_end_matches('/')
    };
    (host.to_ascii_lowercase(), path.to_string())
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let (pp, hp) = (pattern.split_once(':'), host.split_once(':'));
    let (ph, pport) = pp.map_or((pattern, None), |(h, p)| (h, Some(p)));
    let (hh, hport) = hp.map_or((host, None), |(h, p)| (h, Some(p)));
    if pport != hport {
        return false;
    }
    let pl: Vec<&str> = ph.split('.').collect();
    let hl: Vec<&str> = hh.split('.').collect();
    pl.len() == hl.len()
        && pl.iter().zip(&hl).all(|(p, h)| {
            *p == "*"
                || p == h
                || (p.contains('*')
                    && p.split_once('*')
                        .is_some_and(|(a, b)| h.starts_with(a) && h.ends_with(b)))
        })
}

/// The credentials to try for `image` (a normalised reference such as
/// `docker.io/library/busybox:latest`), most specific key first.
pub fn for_image(image: &str, all: &[KeyedCredential]) -> Vec<Credentials> {
    let name = image.split('@').next().unwrap_or(image);
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let repo = match name[last_slash..].rfind(':') {
        Some(i) => &name[..last_slash + i],
        None => name,
    };
    let (host, path) = repo.split_once('/').unwrap_or((repo, ""));
    let host = host.to_ascii_lowercase();
    let mut hits: Vec<(usize, usize, &KeyedCredential)> = all
        .iter()
        .enumerate()
        .filter_map(|(i, kc)| {
            let (kh, kp) = parse_key(&kc.key);
            let path_ok = kp.is_empty() || path == kp || path.starts_with(&format!("{kp}/"));
            (host_matches(&kh, &host) && path_ok).then_some((kh.len() + kp.len(), i, kc))
        })
        .collect();
    // Longer (more specific) keys first; among equals, the order the secrets were listed.
    hits.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut out: Vec<Credentials> = Vec::new();
    for (_, _, kc) in hits {
        if !out.contains(&kc.creds) {
            out.push(kc.creds.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(kind: &str, key: &str, body: &str) -> Secret {
        Secret {
            type_: Some(kind.into()),
            data: Some(BTreeMap::from([(
                key.to_string(),
                ByteString(body.as_bytes().to_vec()),
            )])),
            ..Default::default()
        }
    }

    fn basic(u: &str, p: &str) -> Credentials {
        Credentials::Basic {
            username: u.into(),
            password: p.into(),
        }
    }

    #[test]
    fn reads_dockerconfigjson_and_dockercfg() {
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        let s = secret(
            "kubernetes.io/dockerconfigjson",
            ".dockerconfigjson",
            &format!(
                r#"{{"auths": {{"127.0.0.1:5000": {{"auth": "{auth}"}},
                "https://index.docker.io/v1/": {{"username": "bob", "password": "pw"}},
                "broken.example": {{}}}}}}"#
            ),
        );
        let got = secret_credentials(&s);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.contains(&KeyedCredential {
            key: "127.0.0.1:5000".into(),
            creds: basic("alice", "s3cret")
        }));
        let legacy = secret(
            "kubernetes.io/dockercfg",
            ".dockercfg",
            r#"{"reg.example": {"username": "u", "password": "p"}}"#,
        );
        assert_eq!(secret_credentials(&legacy)[0].creds, basic("u", "p"));
        assert!(secret_credentials(&secret("Opaque", "x", "{}")).is_empty());
    }

    #[test]
    fn matches_like_the_kubelet_keyring() {
        let kc = |k: &str, u: &str| KeyedCredential {
            key: k.into(),
            creds: basic(u, "p"),
        };
        let all = vec![
            kc("https://index.docker.io/v1/", "hub"),
            kc("registry.example.com", "any"),
            kc("registry.example.com/team", "team"),
            kc("*.corp.example:5000", "glob"),
            kc("127.0.0.1:5000", "local"),
        ];
        assert_eq!(
            for_image("docker.io/library/busybox:latest", &all),
            [basic("hub", "p")]
        );
        assert_eq!(
            for_image("registry.example.com/team/app:1", &all),
            [basic("team", "p"), basic("any", "p")]
        );
        assert_eq!(
            for_image("registry.example.com/teams/app:1", &all),
            [basic("any", "p")]
        );
        assert_eq!(
            for_image("a.corp.example:5000/x/y:2", &all),
            [basic("glob", "p")]
        );
        assert!(
            for_image("a.corp.example/x/y:2", &all).is_empty(),
            "port differs"
        );
        assert_eq!(
            for_image("127.0.0.1:5000/busybox@sha256:aa", &all),
            [basic("local", "p")]
        );
        assert!(for_image("quay.io/x/y:1", &all).is_empty());
    }
}
