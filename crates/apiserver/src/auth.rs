//! Authentication: the client-certificate identity set by the TLS layer, or a bearer token from
//! the static token file or a service-account token (see `satoken`). Authorization is
//! "authenticated = allowed" until RBAC exists.

use std::collections::HashMap;

use axum::extract::Request;

use crate::ApiState;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User name (certificate CN or token user).
    pub user: String,
    /// Groups (certificate O values or token groups), without `system:authenticated`.
    pub groups: Vec<String>,
    /// User uid, if the token file gives one.
    pub uid: String,
}

impl Identity {
    /// The identity of an unauthenticated caller.
    pub fn anonymous() -> Self {
        Identity {
            user: "system:anonymous".into(),
            groups: vec!["system:unauthenticated".into()],
            uid: String::new(),
        }
    }

    /// Groups as the API reports them (with `system:authenticated`).
    pub fn all_groups(&self) -> Vec<String> {
        let mut g = self.groups.clone();
        if self.user != "system:anonymous" && !g.iter().any(|x| x == "system:authenticated") {
            g.push("system:authenticated".into());
        }
        g
    }
}

/// What a request presents: the TLS identity, a bearer token, or nothing.
pub(crate) enum Credentials {
    Identity(Identity),
    Bearer(String),
    None,
}

pub(crate) fn credentials(req: &Request) -> Credentials {
    if let Some(id) = req.extensions().get::<Identity>() {
        return Credentials::Identity(id.clone());
    }
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        });
    match token {
        Some(t) => Credentials::Bearer(t.trim().to_string()),
        None => Credentials::None,
    }
}

pub(crate) async fn authenticate(st: &ApiState, creds: Credentials) -> Option<Identity> {
    match creds {
        Credentials::Identity(id) => Some(id),
        Credentials::Bearer(token) => {
            authenticate_token(st, &token, &[crate::satoken::API_AUDIENCE]).await
        }
        Credentials::None => None,
    }
}

/// The identity of a bearer token (static token file, then service-account JWTs valid for one of
/// `audiences`), or None.
pub(crate) async fn authenticate_token(
    st: &ApiState,
    token: &str,
    audiences: &[&str],
) -> Option<Identity> {
    if let Some(id) = st.config.tokens.get(token) {
        return Some(id.clone());
    }
    if crate::satoken::looks_like_jwt(token) {
        return crate::satoken::authenticate(st, token, audiences).await;
    }
    None
}

/// Parses a static token file: one `token,user,uid[,"group1,group2"]` per line (kube-apiserver's
/// `--token-auth-file` format). Blank lines and `#` comments are skipped.
pub fn parse_token_file(text: &str) -> Result<HashMap<String, Identity>, String> {
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, groups) = match line.find('"') {
            Some(q) => {
                let g = line[q..].trim_matches('"');
                (
                    &line[..q],
                    g.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect(),
                )
            }
            None => (line, Vec::new()),
        };
        let mut parts = head.split(',').map(str::trim);
        let token = parts.next().unwrap_or_default();
        let user = parts.next().unwrap_or_default();
        let uid = parts.next().unwrap_or_default();
        let mut groups: Vec<String> = groups;
        for extra in parts.filter(|s| !s.is_empty()) {
            groups.push(extra.to_string());
        }
        if token.is_empty() || user.is_empty() {
            return Err(format!(
                "line {}: expected token,user,uid[,\"groups\"]",
                i + 1
            ));
        }
        out.insert(
            token.to_string(),
            Identity {
                user: user.to_string(),
                groups,
                uid: uid.to_string(),
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file() {
        let m = parse_token_file("# c\nabc,alice,u1,\"dev,ops\"\nxyz,bob,u2\n").unwrap();
        assert_eq!(m["abc"].user, "alice");
        assert_eq!(m["abc"].groups, vec!["dev", "ops"]);
        assert_eq!(m["xyz"].groups, Vec::<String>::new());
        assert!(parse_token_file("onlytoken").is_err());
    }
}
