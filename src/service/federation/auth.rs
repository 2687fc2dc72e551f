//! `X-Matrix` request authentication: the origin signs a JSON object of the request (method,
//! URI, origin, destination, and the body when there is one) and sends the signature in the
//! `Authorization` header; the receiver rebuilds the object and checks it against the origin's
//! published keys.

use std::collections::BTreeMap;

use ruma::{
    serde::Base64,
    signatures::{sign_json, PublicKeyMap},
    CanonicalJsonObject, OwnedServerName, ServerName,
};
use serde_json::{json, Value};

use super::Federation;
use crate::{
    error::{ErrCode, Error, Result},
    service::globals::{Globals, SigningKey},
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
    sign_request(
        &globals.server_name,
        &globals.signing_key,
        method,
        destination,
        uri,
        content,
    )
}

/// The `Authorization` header for a request from `origin`, signed with its `key`.
fn sign_request(
    origin: &ServerName,
    key: &SigningKey,
    method: &http::Method,
    destination: &ServerName,
    uri: &str,
    content: Option<&Value>,
) -> Result<String> {
    let origin = origin.as_str();
    let object = request_object(method, uri, origin, destination.as_str(), content);
    let mut object: CanonicalJsonObject = serde_json::from_value(object)
        .map_err(|e| Error::internal(format!("request is not canonical JSON: {e}")))?;
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
        check_signature(x, &origin, public, method, uri, ours, content)?;
        Ok(origin)
    }
}

/// Check the signature of header `x`, by `origin`'s key `public` (unpadded base64), over the
/// request as we received it, addressed to us (`ours`).
fn check_signature(
    x: XMatrix,
    origin: &ServerName,
    public: &str,
    method: &http::Method,
    uri: &str,
    ours: &str,
    content: Option<&Value>,
) -> Result<()> {
    let public = Base64::parse(public).map_err(|_| unauthorized("Bad key of the origin"))?;
    let mut object = request_object(method, uri, origin.as_str(), ours, content);
    object["signatures"] = json!({ origin.as_str(): { x.key.clone(): x.sig } });
    let object: CanonicalJsonObject = serde_json::from_value(object)
        .map_err(|_| unauthorized("The request body is not canonical JSON"))?;
    let mut map = PublicKeyMap::new();
    map.insert(origin.to_string(), [(x.key, public)].into_iter().collect());
    super::verify_signed_by_all(&map, &object)
        .map_err(|_| unauthorized("Invalid request signature"))
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

/// Property tests: any `Authorization` header is parsed without panic and within its bound, the
/// header we write parses back to what we wrote, and its signature checks for exactly the
/// request it was made for.
#[cfg(test)]
mod fuzz {
    use std::sync::OnceLock;

    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, edit_text, edits, json, server_name, text, valid_server_name};

    fn key() -> &'static SigningKey {
        static KEY: OnceLock<SigningKey> = OnceLock::new();
        KEY.get_or_init(|| {
            let der = ruma::signatures::Ed25519KeyPair::generate();
            SigningKey {
                key_id: "ed25519:fz1".to_owned(),
                keypair: ruma::signatures::Ed25519KeyPair::from_der(&der, "fz1".to_owned())
                    .expect("a key"),
            }
        })
    }

    fn method() -> impl Strategy<Value = http::Method> {
        prop::sample::select(vec![
            http::Method::GET,
            http::Method::PUT,
            http::Method::POST,
            http::Method::DELETE,
        ])
    }

    /// Headers as we write them, with any names and values.
    fn valid_header() -> impl Strategy<Value = String> {
        (
            server_name(),
            server_name(),
            "[a-z0-9]{1,8}:[a-zA-Z0-9_]{1,8}",
            "[A-Za-z0-9+/]{0,90}",
        )
            .prop_map(|(o, d, k, s)| {
                format!("X-Matrix origin=\"{o}\",destination={d},key=\"{k}\",sig=\"{s}\"")
            })
    }

    fn header_text() -> impl Strategy<Value = String> {
        prop_oneof![
            text(),
            text().prop_map(|t| format!("X-Matrix {t}")),
            (valid_header(), edits()).prop_map(|(v, e)| edit_text(&v, &e)),
            valid_header(),
            (1usize..6000)
                .prop_map(|n| format!("X-Matrix origin=a,key=b,sig={}", "=,\"".repeat(n / 3))),
        ]
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_any_header_parses_without_panic(header in header_text()) {
            if let Ok(x) = parse_header(&header) {
                prop_assert!(header.len() <= MAX_HEADER_BYTES);
                prop_assert!(header.starts_with("X-Matrix "));
                for field in [&x.origin, &x.key, &x.sig] {
                    prop_assert!(header.contains(field.as_str()));
                }
            }
            let _ = claimed_origin(Some(&header));
        }

        #[test]
        fn fuzz_our_header_round_trips_and_verifies(
            origin in valid_server_name(),
            destination in valid_server_name(),
            method in method(),
            uri in "/_matrix/federation/v1/[a-zA-Z0-9%!$:._~/?&=-]{0,60}",
            content in prop::option::of(json()),
            other_uri in "/[a-z]{1,10}",
        ) {
            let key = key();
            let Ok(header) = sign_request(&origin, key, &method, &destination, &uri, content.as_ref()) else {
                // Only a body that is not canonical JSON (floats) cannot be signed.
                prop_assert!(content.is_some());
                return Ok(());
            };
            let x = parse_header(&header).expect("our header parses");
            prop_assert_eq!(&x.origin, origin.as_str());
            prop_assert_eq!(x.destination.as_deref(), Some(destination.as_str()));
            prop_assert_eq!(&x.key, &key.key_id);
            let public = key.public_key();
            let check = |x: XMatrix, uri: &str, ours: &str, method: &http::Method| {
                check_signature(x, &origin, &public, method, uri, ours, content.as_ref())
            };
            prop_assert!(check(parse_header(&header).expect("parses"), &uri, destination.as_str(), &method).is_ok());
            // Any other request, or the same one to another server, fails.
            prop_assert!(check(parse_header(&header).expect("parses"), &other_uri, destination.as_str(), &method).is_err());
            prop_assert!(check(parse_header(&header).expect("parses"), &uri, "elsewhere.example", &method).is_err());
            let other_method = if method == http::Method::GET { http::Method::PUT } else { http::Method::GET };
            prop_assert!(check(x, &uri, destination.as_str(), &other_method).is_err());
        }
    }
}
