//! Image reference normalisation (`busybox` → `docker.io/library/busybox:latest`).

use crate::error::{Error, Result};

/// Normalises an image reference the way Docker and containerd do: a missing registry becomes
/// `docker.io`, a single-component name on Docker Hub gets `library/`, a missing tag becomes
/// `:latest` (unless a digest is given).
pub fn normalize(reference: &str) -> Result<String> {
    let bad = |reason: &str| Error::InvalidReference {
        reference: reference.to_string(),
        reason: reason.to_string(),
    };
    let r = reference.trim();
    if r.is_empty() {
        return Err(bad("empty"));
    }
    if r.chars().any(|c| c.is_whitespace()) {
        return Err(bad("contains whitespace"));
    }
    let (name, digest) = match r.split_once('@') {
        Some((n, d)) => {
            if !d.starts_with("sha256:")
                || d.len() != 71
                || !d[7..].bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(bad("digest must be sha256:<64 hex>"));
            }
            (n, Some(d))
        }
        None => (r, None),
    };
    // A tag is after the last ':' that follows the last '/'.
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (repo, tag) = match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
        None => (name, None),
    };
    if repo.is_empty() || repo.starts_with('/') || repo.ends_with('/') || repo.contains("//") {
        return Err(bad("empty name component"));
    }
    if let Some(t) = tag
        && (t.is_empty()
            || t.len() > 128
            || !t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-'))
    {
        return Err(bad("invalid tag"));
    }
    let (domain, path) = match repo.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_string(), rest.to_string())
        }
        _ => ("docker.io".to_string(), repo.to_string()),
    };
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad("repository name must be lowercase"));
    }
    if !path
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b))
    {
        return Err(bad("invalid character in repository name"));
    }
    let path = if domain == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    let mut out = format!("{domain}/{path}");
    match (tag, digest) {
        (Some(t), Some(d)) => out.push_str(&format!(":{t}@{d}")),
        (Some(t), None) => out.push_str(&format!(":{t}")),
        (None, Some(d)) => out.push_str(&format!("@{d}")),
        (None, None) => out.push_str(":latest"),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn normalizes_like_docker() {
        assert_eq!(
            normalize("busybox").unwrap(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            normalize("busybox:1.36").unwrap(),
            "docker.io/library/busybox:1.36"
        );
        assert_eq!(normalize("foo/bar").unwrap(), "docker.io/foo/bar:latest");
        assert_eq!(
            normalize("skiff.local/busybox:stable").unwrap(),
            "skiff.local/busybox:stable"
        );
        assert_eq!(normalize("localhost/x").unwrap(), "localhost/x:latest");
        assert_eq!(
            normalize("127.0.0.1:5000/a/b:v1").unwrap(),
            "127.0.0.1:5000/a/b:v1"
        );
        assert_eq!(
            normalize("docker.io/library/busybox:latest").unwrap(),
            "docker.io/library/busybox:latest"
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            normalize(&format!("busybox@{d}")).unwrap(),
            format!("docker.io/library/busybox@{d}")
        );
    }

    #[test]
    fn rejects_bad_references() {
        for r in [
            "",
            "Busybox",
            "a b",
            "busybox:",
            "/x",
            "x@sha256:12",
            "reg.io//x",
        ] {
            let e = normalize(r).unwrap_err().to_string();
            assert!(e.contains("invalid image reference"), "{r}: {e}");
        }
    }
}
