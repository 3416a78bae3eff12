//! `Status` errors with kube-apiserver's codes, reasons and messages.

use serde_json::{Value, json};

use crate::resources::ResourceInfo;

/// One cause of an `Invalid` error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, ...
    pub reason: String,
    /// Human-readable message (without the field).
    pub message: String,
    /// Field path, e.g. `metadata.name`.
    pub field: String,
}

impl Cause {
    /// An invalid value.
    pub fn invalid(field: &str, value: &str, detail: &str) -> Self {
        Cause {
            reason: "FieldValueInvalid".into(),
            message: format!("Invalid value: {}: {detail}", json!(value)),
            field: field.into(),
        }
    }
    /// A missing value.
    pub fn required(field: &str, detail: &str) -> Self {
        let message = if detail.is_empty() {
            "Required value".to_string()
        } else {
            format!("Required value: {detail}")
        };
        Cause {
            reason: "FieldValueRequired".into(),
            message,
            field: field.into(),
        }
    }
    /// A value that is not allowed.
    pub fn forbidden(field: &str, detail: &str) -> Self {
        Cause {
            reason: "FieldValueForbidden".into(),
            message: format!("Forbidden: {detail}"),
            field: field.into(),
        }
    }
    /// A value outside a fixed set.
    pub fn not_supported(field: &str, value: &str, allowed: &[&str]) -> Self {
        let allowed: Vec<String> = allowed.iter().map(|a| json!(a).to_string()).collect();
        Cause {
            reason: "FieldValueNotSupported".into(),
            message: format!(
                "Unsupported value: {}: supported values: {}",
                json!(value),
                allowed.join(", ")
            ),
            field: field.into(),
        }
    }
}

/// An API error, rendered as a `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `Status.reason`.
    pub reason: &'static str,
    /// `Status.message`.
    pub message: String,
    /// `Status.details`, if any.
    pub details: Option<Value>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

fn details(r: &ResourceInfo, name: &str) -> Value {
    let mut d = json!({"name": name, "kind": r.resource});
    if !r.group.is_empty() {
        d["group"] = json!(r.group);
    }
    d
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        if self.reason.is_empty()
            && let Some(m) = s.as_object_mut()
        {
            m.remove("reason");
        }
        s
    }

    /// 404 for an object.
    pub fn not_found(r: &ResourceInfo, name: &str) -> Self {
        ApiError {
            details: Some(details(r, name)),
            ..Self::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", r.qualified_resource()),
            )
        }
    }

    /// 404 for a namespace that does not exist.
    pub fn namespace_not_found(ns: &str) -> Self {
        ApiError {
            details: Some(json!({"name": ns, "kind": "namespaces"})),
            ..Self::new(404, "NotFound", format!("namespaces \"{ns}\" not found"))
        }
    }

    /// 404 for a path the server does not serve.
    pub fn path_not_found() -> Self {
        ApiError {
            details: None,
            ..Self::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
        }
    }

    /// 409 AlreadyExists.
    pub fn already_exists(r: &ResourceInfo, name: &str) -> Self {
        ApiError {
            details: Some(details(r, name)),
            ..Self::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", r.qualified_resource()),
            )
        }
    }

    /// 409 Conflict on a stale resourceVersion.
    pub fn conflict(r: &ResourceInfo, name: &str) -> Self {
        Self::conflict_msg(
            r,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 409 Conflict with a custom reason text.
    pub fn conflict_msg(r: &ResourceInfo, name: &str, why: &str) -> Self {
        ApiError {
            details: Some(details(r, name)),
            ..Self::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": {why}",
                    r.qualified_resource()
                ),
            )
        }
    }

    /// 422 Invalid with causes.
    pub fn invalid(r: &ResourceInfo, name: &str, causes: &[Cause]) -> Self {
        let text: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let joined = if text.len() == 1 {
            text.join("")
        } else {
            format!("[{}]", text.join(", "))
        };
        let mut d = json!({
            "name": name,
            "kind": r.kind,
            "causes": causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect::<Vec<_>>(),
        });
        if !r.group.is_empty() {
            d["group"] = json!(r.group);
        }
        ApiError {
            details: Some(d),
            ..Self::new(
                422,
                "Invalid",
                format!("{} \"{name}\" is invalid: {joined}", r.qualified_kind()),
            )
        }
    }

    /// 400 BadRequest.
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", msg)
    }

    /// 410 Expired for a compacted resourceVersion.
    pub fn expired(requested: i64, oldest: i64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// 410 Expired for a stale continue token.
    pub fn continue_expired() -> Self {
        Self::new(
            410,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
        )
    }

    /// 405 MethodNotAllowed.
    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    /// 401 Unauthorized.
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    /// 403 Forbidden.
    pub fn forbidden(r: &ResourceInfo, name: &str, why: &str) -> Self {
        let what = if name.is_empty() {
            r.qualified_resource()
        } else {
            format!("{} \"{name}\"", r.qualified_resource())
        };
        ApiError {
            details: Some(details(r, name)),
            ..Self::new(403, "Forbidden", format!("{what} is forbidden: {why}"))
        }
    }

    /// 406 NotAcceptable.
    pub fn not_acceptable(msg: impl Into<String>) -> Self {
        Self::new(406, "NotAcceptable", msg)
    }

    /// 415 UnsupportedMediaType.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"
            ),
        )
    }

    /// 413 RequestEntityTooLarge.
    pub fn too_large() -> Self {
        Self::new(
            413,
            "RequestEntityTooLarge",
            "Request entity too large: limit is 3145728",
        )
    }

    /// 500 InternalError.
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(
            500,
            "InternalError",
            format!("Internal error occurred: {}", msg.into()),
        )
    }

    /// 503 ServiceUnavailable.
    pub fn unavailable(msg: impl Into<String>) -> Self {
        Self::new(503, "ServiceUnavailable", msg)
    }

    /// 504 Timeout.
    pub fn timeout(msg: impl Into<String>) -> Self {
        Self::new(504, "Timeout", msg)
    }
}

/// A `Status` with status Success (e.g. the body of a delete).
pub fn success(r: &ResourceInfo, name: &str, uid: Option<&str>) -> Value {
    let mut d = details(r, name);
    if let Some(uid) = uid {
        d["uid"] = json!(uid);
    }
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": d})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    #[test]
    fn messages_match_kube_apiserver() {
        let cm = find("", "v1", "configmaps").unwrap();
        let d = find("apps", "v1", "deployments").unwrap();
        assert_eq!(
            ApiError::not_found(cm, "x").message,
            "configmaps \"x\" not found"
        );
        assert_eq!(
            ApiError::not_found(d, "x").message,
            "deployments.apps \"x\" not found"
        );
        let s = ApiError::not_found(d, "x").to_status();
        assert_eq!(s["details"]["group"], "apps");
        assert_eq!(s["details"]["kind"], "deployments");
        assert_eq!(s["code"], 404);
        assert_eq!(
            ApiError::conflict(cm, "x").message,
            "Operation cannot be fulfilled on configmaps \"x\": the object has been modified; please apply your changes to the latest version and try again"
        );
        let inv = ApiError::invalid(cm, "Bad", &[Cause::invalid("metadata.name", "Bad", "nope")]);
        assert_eq!(inv.code, 422);
        assert_eq!(
            inv.message,
            "ConfigMap \"Bad\" is invalid: metadata.name: Invalid value: \"Bad\": nope"
        );
        assert_eq!(
            inv.to_status()["details"]["causes"][0]["field"],
            "metadata.name"
        );
    }
}
