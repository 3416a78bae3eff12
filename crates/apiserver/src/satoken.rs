//! Service-account tokens, as kube-apiserver issues and checks them: the `serviceaccounts/token`
//! subresource (authentication.k8s.io/v1 TokenRequest) signs ES256 JWTs with the server's
//! service-account key, and bearer tokens of that form authenticate as
//! `system:serviceaccount:<ns>:<name>` while the service account (and the pod or secret the token
//! is bound to) still exists with the same uid. Tokens and keys are never logged.

use axum::extract::Request;
use axum::response::Response;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use skiff_api::resources::find;
use skiff_api::{ApiError, meta};

use crate::ApiState;
use crate::auth::Identity;
use crate::handlers::{Target, decode, get_kv, store_err};
use crate::http_util::{json_response, parse_object, read_body};

/// The audience of the Kubernetes API and the issuer of its tokens (k3s's defaults).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
/// `iss` of every token this server signs.
pub const ISSUER: &str = API_AUDIENCE;
/// `spec.expirationSeconds` when a TokenRequest gives none.
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// The shortest lifetime a TokenRequest may ask for (10 minutes).
pub const MIN_EXPIRATION_SECONDS: i64 = 600;
/// The longest lifetime a TokenRequest may ask for (2^32 seconds).
pub const MAX_EXPIRATION_SECONDS: i64 = 1 << 32;
/// A pod that has been terminating for longer than this no longer validates its tokens.
const POD_DELETION_GRACE_SECONDS: i64 = 60;

/// The service-account signing key pair (PEM). Its Debug output never shows the key.
#[derive(Clone, Default)]
pub struct ServiceAccountKey {
    /// ECDSA P-256 private key, PKCS#8 PEM.
    pub private_pem: String,
    /// Its public key, SubjectPublicKeyInfo PEM.
    pub public_pem: String,
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKey").finish_non_exhaustive()
    }
}

/// Signs and verifies service-account JWTs.
pub(crate) struct Signer {
    enc: EncodingKey,
    dec: DecodingKey,
    kid: String,
}

impl Signer {
    /// Builds the signer from the key pair; the error says what is wrong (never the key).
    pub(crate) fn new(key: &ServiceAccountKey) -> Result<Self, String> {
        let enc = EncodingKey::from_ec_pem(key.private_pem.as_bytes())
            .map_err(|e| format!("service-account private key: {e}"))?;
        let dec = DecodingKey::from_ec_pem(key.public_pem.as_bytes())
            .map_err(|e| format!("service-account public key: {e}"))?;
        // kube-apiserver's key id: the unpadded base64url SHA-256 of the public key's DER.
        let der: Vec<u8> = key
            .public_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>()
            .into_bytes();
        let der = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(der)
                .map_err(|e| format!("service-account public key: {e}"))?
        };
        let kid = {
            use base64::Engine as _;
            use sha2::Digest as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&der))
        };
        Ok(Signer { enc, dec, kid })
    }

    pub(crate) fn sign(&self, claims: &Claims) -> Result<String, ApiError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.enc)
            .map_err(|e| ApiError::internal(format!("failed to generate token: {e}")))
    }

    /// Checks signature, issuer, `exp`/`nbf` and that one of `audiences` is in `aud`.
    pub(crate) fn verify(&self, token: &str, audiences: &[&str]) -> Option<Claims> {
        let mut v = Validation::new(Algorithm::ES256);
        v.set_issuer(&[ISSUER]);
        v.set_audience(audiences);
        v.validate_nbf = true;
        v.leeway = 0;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &self.dec, &v)
            .ok()
            .map(|d| d.claims)
    }
}

/// The claims of a service-account token (kube-apiserver's names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubeClaims,
}

/// The private `kubernetes.io` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KubeClaims {
    pub namespace: String,
    pub serviceaccount: ObjRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<ObjRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<ObjRef>,
}

/// Name and uid of an object named in the claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ObjRef {
    pub name: String,
    pub uid: String,
}

/// What a token is bound to, besides its service account.
#[derive(Debug, Clone, Default)]
pub(crate) struct Bound {
    pub pod: Option<ObjRef>,
    pub secret: Option<ObjRef>,
    pub node: Option<ObjRef>,
}

/// The claims of a new token for service account `ns/sa` issued at `now` (unix seconds).
pub(crate) fn claims(
    ns: &str,
    sa: &ObjRef,
    bound: Bound,
    audiences: Vec<String>,
    expiration_seconds: i64,
    now: i64,
) -> Claims {
    Claims {
        iss: ISSUER.into(),
        sub: format!("system:serviceaccount:{ns}:{}", sa.name),
        aud: audiences,
        exp: now + expiration_seconds,
        iat: now,
        nbf: now,
        jti: meta::new_uid(),
        kubernetes: KubeClaims {
            namespace: ns.into(),
            serviceaccount: sa.clone(),
            pod: bound.pod,
            secret: bound.secret,
            node: bound.node,
        },
    }
}

/// kube-apiserver's validation of `spec.expirationSeconds` (422 Invalid).
pub(crate) fn validate_expiration(seconds: i64) -> Result<(), ApiError> {
    let detail = if seconds < MIN_EXPIRATION_SECONDS {
        "may not specify a duration less than 10 minutes"
    } else if seconds > MAX_EXPIRATION_SECONDS {
        "may not specify a duration larger than 2^32 seconds"
    } else {
        return Ok(());
    };
    let message = format!("Invalid value: {seconds}: {detail}");
    Err(ApiError {
        code: 422,
        reason: "Invalid",
        message: format!(
            "TokenRequest.authentication.k8s.io \"\" is invalid: spec.expirationSeconds: {message}"
        ),
        details: Some(json!({
            "group": "authentication.k8s.io", "kind": "TokenRequest", "name": "",
            "causes": [{"reason": "FieldValueInvalid", "message": message, "field": "spec.expirationSeconds"}],
        })),
    })
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(meta::format_time)
        .unwrap_or_default()
}

/// `POST .../serviceaccounts/{name}/token`: issues a token (201 with the TokenRequest and its
/// `status.token`).
pub(crate) async fn token_request(
    st: &ApiState,
    t: &Target,
    name: &str,
    req: Request,
) -> Result<Response, ApiError> {
    if req.method() != http::Method::POST {
        return Err(ApiError::method_not_allowed());
    }
    let Some(signer) = st.sa_signer.as_ref() else {
        return Err(ApiError::unavailable(
            "service account tokens are not issued by this server (no signing key)",
        ));
    };
    let (ct, body) = read_body(req).await?;
    let mut tr = if body.is_empty() {
        json!({})
    } else {
        parse_object(&ct, &body)?
    };
    let ns = t.ns.clone().unwrap_or_default();
    let sa = decode(&get_kv(st, t, name).await?)?;
    let sa_ref = ObjRef {
        name: name.to_string(),
        uid: meta::meta_str(&sa, "uid").unwrap_or("").to_string(),
    };
    let expiration = tr
        .pointer("/spec/expirationSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(DEFAULT_EXPIRATION_SECONDS);
    validate_expiration(expiration)?;
    let mut audiences: Vec<String> = tr
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if audiences.is_empty() {
        audiences = vec![API_AUDIENCE.to_string()];
    }
    let bound_ref = tr
        .pointer("/spec/boundObjectRef")
        .filter(|v| v.is_object())
        .cloned();
    let bound = match &bound_ref {
        Some(r) => bind(st, &ns, name, r).await?,
        None => Bound::default(),
    };
    let now = now_unix();
    let c = claims(&ns, &sa_ref, bound, audiences.clone(), expiration, now);
    let token = signer.sign(&c)?;
    tracing::debug!(namespace = %ns, serviceaccount = %name, expiration_seconds = expiration, "issued service-account token");
    let mut spec = json!({"audiences": audiences, "expirationSeconds": expiration});
    if let Some(r) = bound_ref {
        spec["boundObjectRef"] = r;
    }
    tr["apiVersion"] = json!("authentication.k8s.io/v1");
    tr["kind"] = json!("TokenRequest");
    tr["metadata"] = json!({"name": name, "namespace": ns, "creationTimestamp": rfc3339(now)});
    tr["spec"] = spec;
    tr["status"] = json!({"token": token, "expirationTimestamp": rfc3339(c.exp)});
    Ok(json_response(201, &tr))
}

/// Resolves `spec.boundObjectRef` (a Pod or Secret in the namespace) as kube-apiserver does.
async fn bind(st: &ApiState, ns: &str, sa: &str, r: &Value) -> Result<Bound, ApiError> {
    let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let (api_version, kind, name, uid) = (s("apiVersion"), s("kind"), s("name"), s("uid"));
    let core = api_version.is_empty() || api_version == "v1";
    let resource = match kind.as_str() {
        "Pod" if core => "pods",
        "Secret" if core => "secrets",
        _ => {
            let gv = if api_version.is_empty() {
                "/".to_string()
            } else if api_version.contains('/') {
                api_version.clone()
            } else {
                format!("/{api_version}")
            };
            return Err(ApiError::bad_request(format!(
                "cannot bind token to object of type {gv}, Kind={kind}"
            )));
        }
    };
    let Some(ri) = find("", "v1", resource) else {
        return Err(ApiError::internal(format!("no resource {resource}")));
    };
    let target = Target {
        r: ri,
        ns: Some(ns.to_string()),
        name: Some(name.clone()),
        sub: None,
    };
    let obj = decode(&get_kv(st, &target, &name).await?)?;
    let actual_uid = meta::meta_str(&obj, "uid").unwrap_or("").to_string();
    if !uid.is_empty() && uid != actual_uid {
        return Err(ApiError::conflict_msg(
            ri,
            &name,
            &format!(
                "the UID in the bound object reference ({uid}) does not match the UID in record ({actual_uid}). The object might have been deleted and then recreated"
            ),
        ));
    }
    let this = Some(ObjRef {
        name: name.clone(),
        uid: actual_uid,
    });
    if resource == "secrets" {
        return Ok(Bound {
            secret: this,
            ..Bound::default()
        });
    }
    let pod_sa = obj
        .pointer("/spec/serviceAccountName")
        .and_then(Value::as_str)
        .unwrap_or("");
    if pod_sa != sa {
        return Err(ApiError::bad_request(format!(
            "cannot bind token for serviceaccount \"{sa}\" to pod running with serviceaccount \"{pod_sa}\""
        )));
    }
    // Tokens bound to a scheduled pod also name its node (kube-apiserver since 1.30).
    let node_name = obj
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut node = None;
    if !node_name.is_empty()
        && let Some(nr) = find("", "v1", "nodes")
        && let Some(kv) = st
            .store
            .get(&nr.key(None, node_name))
            .await
            .map_err(store_err)?
    {
        node = Some(ObjRef {
            name: node_name.to_string(),
            uid: meta_of(&kv.value).map(|m| m.uid).unwrap_or_default(),
        });
    }
    Ok(Bound {
        pod: this,
        node,
        ..Bound::default()
    })
}

/// Only the metadata fields token validation needs (cheap to decode: the rest is skipped).
#[derive(Deserialize)]
struct MetaOnly {
    metadata: MetaFields,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct MetaFields {
    #[serde(default)]
    uid: String,
    #[serde(default)]
    deletion_timestamp: Option<String>,
}

fn meta_of(bytes: &[u8]) -> Option<MetaFields> {
    serde_json::from_slice::<MetaOnly>(bytes)
        .ok()
        .map(|m| m.metadata)
}

/// Reads `resource` `ns/name` and returns its uid and deletionTimestamp, if it exists.
async fn lookup(st: &ApiState, resource: &str, ns: &str, name: &str) -> Option<MetaFields> {
    let r = find("", "v1", resource)?;
    match st.store.get(&r.key(Some(ns), name)).await {
        Ok(Some(kv)) => meta_of(&kv.value),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(resource, namespace = %ns, name, error = %e, "service-account token check: store read failed");
            None
        }
    }
}

/// Authenticates a service-account JWT valid for one of `audiences`: signature, issuer,
/// `exp`/`nbf`, and the service account (and bound pod or secret) still existing with the uids
/// of the claims. None = not a valid token.
pub(crate) async fn authenticate(
    st: &ApiState,
    token: &str,
    audiences: &[&str],
) -> Option<Identity> {
    let signer = st.sa_signer.as_ref()?;
    let c = signer.verify(token, audiences)?;
    let k = &c.kubernetes;
    let ns = k.namespace.as_str();
    let sa = &k.serviceaccount;
    if c.sub != format!("system:serviceaccount:{ns}:{}", sa.name) {
        return None;
    }
    let rejected = |why: &str| {
        tracing::debug!(namespace = %ns, serviceaccount = %sa.name, reason = why, "service-account token rejected");
        None
    };
    match lookup(st, "serviceaccounts", ns, &sa.name).await {
        Some(m) if m.uid == sa.uid && m.deletion_timestamp.is_none() => {}
        _ => return rejected("service account gone or recreated"),
    }
    if let Some(p) = &k.pod {
        match lookup(st, "pods", ns, &p.name).await {
            Some(m) if m.uid == p.uid => {
                let deleted_long_ago = m
                    .deletion_timestamp
                    .as_deref()
                    .and_then(meta::parse_time)
                    .is_some_and(|t| t.unix_timestamp() + POD_DELETION_GRACE_SECONDS < now_unix());
                if deleted_long_ago {
                    return rejected("bound pod deleted");
                }
            }
            _ => return rejected("bound pod gone or recreated"),
        }
    }
    if let Some(s) = &k.secret {
        match lookup(st, "secrets", ns, &s.name).await {
            Some(m) if m.uid == s.uid && m.deletion_timestamp.is_none() => {}
            _ => return rejected("bound secret gone or recreated"),
        }
    }
    Some(Identity {
        user: c.sub.clone(),
        groups: vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
        ],
        uid: sa.uid.clone(),
    })
}

/// Whether a bearer token looks like a JWT (three base64url parts).
pub(crate) fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.starts_with("ey")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        let pair = rcgen::KeyPair::generate().unwrap();
        Signer::new(&ServiceAccountKey {
            private_pem: pair.serialize_pem(),
            public_pem: pair.public_key_pem(),
        })
        .unwrap()
    }

    fn sa() -> ObjRef {
        ObjRef {
            name: "default".into(),
            uid: "u-1".into(),
        }
    }

    fn payload(token: &str) -> Value {
        use base64::Engine as _;
        let part = token.split('.').nth(1).unwrap();
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap();
        serde_json::from_slice(&raw).unwrap()
    }

    #[test]
    fn claims_have_kube_apiserver_shape() {
        let s = signer();
        let bound = Bound {
            pod: Some(ObjRef {
                name: "p".into(),
                uid: "pod-uid".into(),
            }),
            node: Some(ObjRef {
                name: "n1".into(),
                uid: "node-uid".into(),
            }),
            ..Bound::default()
        };
        let now = now_unix();
        let c = claims("ns1", &sa(), bound, vec![API_AUDIENCE.into()], 3600, now);
        let tok = s.sign(&c).unwrap();
        let p = payload(&tok);
        assert_eq!(p["iss"], API_AUDIENCE);
        assert_eq!(p["sub"], "system:serviceaccount:ns1:default");
        assert_eq!(p["aud"], json!([API_AUDIENCE]));
        assert_eq!(p["exp"], now + 3600);
        assert_eq!(p["iat"], now);
        assert_eq!(p["nbf"], now);
        assert_eq!(p["jti"].as_str().unwrap().len(), 36);
        assert_eq!(
            p["kubernetes.io"],
            json!({"namespace": "ns1", "serviceaccount": {"name": "default", "uid": "u-1"},
                   "pod": {"name": "p", "uid": "pod-uid"}, "node": {"name": "n1", "uid": "node-uid"}})
        );
        assert_eq!(s.verify(&tok, &[API_AUDIENCE]), Some(c));
    }

    #[test]
    fn verification_rejects_bad_tokens() {
        let s = signer();
        let now = now_unix();
        // A token signed by `by` for `aud`, 600 s long, issued at `at`.
        let token = |by: &Signer, aud: &str, at: i64| {
            by.sign(&claims(
                "d",
                &sa(),
                Bound::default(),
                vec![aud.into()],
                600,
                at,
            ))
            .unwrap()
        };
        let good = token(&s, API_AUDIENCE, now);
        assert!(s.verify(&good, &[API_AUDIENCE]).is_some());
        // Another audience.
        assert!(s.verify(&good, &["vault"]).is_none());
        assert!(
            s.verify(&token(&s, "vault", now), &[API_AUDIENCE])
                .is_none()
        );
        // Expired.
        assert!(
            s.verify(&token(&s, API_AUDIENCE, now - 700), &[API_AUDIENCE])
                .is_none()
        );
        // Not yet valid.
        assert!(
            s.verify(&token(&s, API_AUDIENCE, now + 300), &[API_AUDIENCE])
                .is_none()
        );
        // Signed by another key.
        assert!(
            s.verify(&token(&signer(), API_AUDIENCE, now), &[API_AUDIENCE])
                .is_none()
        );
        // Tampered payload.
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged = {
            use base64::Engine as _;
            let mut p = payload(&good);
            p["sub"] = json!("system:serviceaccount:kube-system:admin");
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(p.to_string())
        };
        parts[1] = &forged;
        assert!(s.verify(&parts.join("."), &[API_AUDIENCE]).is_none());
        assert!(s.verify("garbage", &[API_AUDIENCE]).is_none());
    }

    #[test]
    fn expiration_limits() {
        assert!(validate_expiration(600).is_ok());
        assert!(validate_expiration(3600).is_ok());
        let e = validate_expiration(60).unwrap_err();
        assert_eq!(e.code, 422);
        assert_eq!(
            e.message,
            "TokenRequest.authentication.k8s.io \"\" is invalid: spec.expirationSeconds: Invalid value: 60: may not specify a duration less than 10 minutes"
        );
        assert_eq!(validate_expiration(599).unwrap_err().code, 422);
        assert!(
            validate_expiration((1 << 32) + 1)
                .unwrap_err()
                .message
                .contains("larger than 2^32 seconds")
        );
    }

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt("eyJa.eyJb.sig"));
        assert!(!looks_like_jwt("abcdef"));
        assert!(!looks_like_jwt("a.b"));
    }
}
