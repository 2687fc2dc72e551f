//! `X-Matrix` request authentication: the origin signs a JSON object of the request (method,
//! URI, origin, destination, and the body when there is one) and sends the signature in the
//! `Authorization` header; the receiver rebuilds the object and checks it against the origin's
//! published keys.

use std::collections::BTreeMap;

use ruma::{
    serde::Base64,
    signatures::{sign_json, verify_json, PublicKeyMap},
    CanonicalJsonObject, OwnedServerName, ServerName,
};
use serde_json::{json, Value};

use super::Federation;
use crate::{
    error::{ErrCode, Error, Result},
    service::globals::Globals,
};

/// Longest `Authorization` header looked at.
const MAX_HEADER_BYTES: usize = 4096;

fn unauthorized(why: &str) -> Error {
    Error::with_status(ErrCode::Unauthorized, http::StatusCode::UNAUTHORIZED, why)
}

/// The object a request signature covers.
fn request_object(
    method: &http::Method,
    uri: &str,
    origin: &str,
    destination: &str,
    content: Option<&Value>,
) -> Value {
    let mut object = json!({
        "method": method.as_str(),
        "uri": uri,
        "origin": origin,
        "destination": destination,
    });
    if let Some(c) = content {
        object["content"] = c.clone();
    }
    object
}

/// The `Authorization` header for a request from us to `destination`.
pub fn authorization_header(
    globals: &Globals,
    method: &http::Method,
    destination: &ServerName,
    uri: &str,
    content: Option<&Value>,
) -> Result<String> {
    let origin = globals.server_name.as_str();
    let object = request_object(method, uri, origin, destination.as_str(), content);
    let mut object: CanonicalJsonObject = serde_json::from_value(object)
        .map_err(|e| Error::internal(format!("request is not canonical JSON: {e}")))?;
    let key = &globals.signing_key;
    sign_json(origin, &key.keypair, &mut object)
        .map_err(|e| Error::internal(format!("signing a request: {e}")))?;
    let sig = serde_json::to_value(&object)?
        .pointer(&format!("/signatures/{origin}/{}", key.key_id))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| Error::internal("signature missing after signing"))?;
    Ok(format!(
        "X-Matrix origin=\"{origin}\",destination=\"{destination}\",key=\"{}\",sig=\"{sig}\"",
        key.key_id
    ))
}

/// The parts of an `X-Matrix` header.
#[derive(Debug, PartialEq)]
pub struct XMatrix {
    pub origin: String,
    pub destination: Option<String>,
    pub key: String,
    pub sig: String,
}

/// Parse `X-Matrix origin=...,destination=...,key="...",sig="..."` (values optionally quoted).
pub fn parse_header(value: &str) -> Result<XMatrix> {
    if value.len() > MAX_HEADER_BYTES {
        return Err(unauthorized("Authorization header too long"));
    }
    let params = value
        .strip_prefix("X-Matrix ")
        .ok_or_else(|| unauthorized("Missing X-Matrix authorization"))?;
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    for part in params.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            continue;
        };
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        fields.insert(k.trim().to_ascii_lowercase(), v.to_owned());
    }
    let mut take = |k: &str| fields.remove(k);
    Ok(XMatrix {
        origin: take("origin").ok_or_else(|| unauthorized("X-Matrix without origin"))?,
        destination: take("destination"),
        key: take("key").ok_or_else(|| unauthorized("X-Matrix without key"))?,
        sig: take("sig").ok_or_else(|| unauthorized("X-Matrix without sig"))?,
    })
}

/// The origin an `X-Matrix` header claims (not verified).
pub fn claimed_origin(header: Option<&str>) -> Option<OwnedServerName> {
    let x = parse_header(header?).ok()?;
    OwnedServerName::try_from(x.origin.as_str()).ok()
}

impl Federation {
    /// Check an incoming request's `Authorization` header; returns the origin server.
    pub async fn verify_request(
        &self,
        method: &http::Method,
        uri: &str,
        header: Option<&str>,
        content: Option<&Value>,
    ) -> Result<OwnedServerName> {
        let x =
            parse_header(header.ok_or_else(|| unauthorized("Missing X-Matrix authorization"))?)?;
        let ours = self.globals.server_name.as_str();
        if x.destination.as_deref().is_some_and(|d| d != ours) {
            return Err(unauthorized("The request is for another server"));
        }
        let origin = OwnedServerName::try_from(x.origin.as_str())
            .map_err(|_| unauthorized("Invalid origin"))?;
        // Servers the policy shuts out are refused before anything is fetched from them.
        self.policy.may_federate_with(&origin)?;
        let keys = self
            .current_keys(&origin)
            .await
            .map_err(|_| unauthorized("The origin's keys cannot be had"))?;
        let public = keys
            .get(&x.key)
            .ok_or_else(|| unauthorized("Unknown signing key of the origin"))?;
        let public = Base64::parse(public).map_err(|_| unauthorized("Bad key of the origin"))?;
        let mut object = request_object(method, uri, origin.as_str(), ours, content);
        object["signatures"] = json!({ origin.as_str(): { x.key.clone(): x.sig } });
        let object: CanonicalJsonObject = serde_json::from_value(object)
            .map_err(|_| unauthorized("The request body is not canonical JSON"))?;
        let mut map = PublicKeyMap::new();
        map.insert(origin.to_string(), [(x.key, public)].into_iter().collect());
        verify_json(&map, &object).map_err(|_| unauthorized("Invalid request signature"))?;
        Ok(origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_with_and_without_quotes() {
        let x = parse_header(
            r#"X-Matrix origin="a.example",destination=b.example,key="ed25519:k1",sig="c2ln""#,
        )
        .unwrap();
        assert_eq!(
            x,
            XMatrix {
                origin: "a.example".into(),
                destination: Some("b.example".into()),
                key: "ed25519:k1".into(),
                sig: "c2ln".into(),
            }
        );
        assert!(parse_header("Bearer abc").is_err());
        assert!(parse_header("X-Matrix origin=a").is_err());
        assert!(parse_header(&format!("X-Matrix origin={}", "a".repeat(5000))).is_err());
    }
}
