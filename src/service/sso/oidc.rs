//! Talking to an OpenID Connect provider: discovery, the authorization URL (code flow, PKCE
//! S256), the code exchange at the token endpoint, and the ID token check against the
//! provider's JWKS. Every answer is bounded in size and time.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use base64::Engine;
use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use sha2::Digest;

use super::{config::OidcProvider, Provider, SsoFailure};
use crate::{
    error::{Error, Result},
    policy::register::{Register, IDENTITY_PROVIDER},
};

/// How long one request to the provider may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read from the provider.
const MAX_ANSWER: usize = 256 * 1024;
/// How long discovery and keys are trusted before being fetched again.
const META_TTL: Duration = Duration::from_secs(3600);
/// An ID token signed with an unknown key makes us fetch the keys again, at most this often.
const JWKS_REFETCH: Duration = Duration::from_secs(30);
/// Clock difference tolerated on `exp`, `nbf`, `iat`.
const LEEWAY_SECS: u64 = 60;
/// Signature algorithms accepted for ID tokens (never `none`, never HMAC with the secret).
const ID_TOKEN_ALGS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// What discovery told us.
pub struct Meta {
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    jwks: JwkSet,
    jwks_fetched: Instant,
    fetched: Instant,
}

/// The provider's discovery document and keys, cached.
#[derive(Default)]
pub struct MetaCache {
    inner: tokio::sync::Mutex<Option<Arc<Meta>>>,
}

/// GET a JSON object from the provider, bounded.
async fn get_json(
    http: &reqwest::Client,
    url: &str,
    register: &Register,
) -> std::result::Result<Map<String, Value>, String> {
    note_contact(register, url);
    let res = http
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .map_err(|e| format!("request to {url} failed: {e}"))?;
    if !res.status().is_success() {
        return Err(format!("{url} answered {}", res.status()));
    }
    read_json(res).await
}

/// Read a bounded JSON object answer.
async fn read_json(res: reqwest::Response) -> std::result::Result<Map<String, Value>, String> {
    let body = crate::utils::read_answer(res, MAX_ANSWER).await?;
    match serde_json::from_slice(&body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err("the answer is not a JSON object".into()),
    }
}

/// Count the provider in the register of destinations (by host).
fn note_contact(register: &Register, url: &str) {
    let host = url::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.host_str()
                .map(|h| u.port().map(|p| format!("{h}:{p}")).unwrap_or(h.to_owned()))
        })
        .unwrap_or_else(|| "invalid".to_owned());
    register.contact(IDENTITY_PROVIDER, &host);
}

fn str_field(m: &Map<String, Value>, key: &str) -> std::result::Result<String, String> {
    m.get(key)
        .and_then(Value::as_str)
        .filter(|s| s.starts_with("https://") || s.starts_with("http://"))
        .map(str::to_owned)
        .ok_or_else(|| format!("the discovery document has no usable `{key}`"))
}

async fn fetch_jwks(
    http: &reqwest::Client,
    uri: &str,
    register: &Register,
) -> std::result::Result<JwkSet, String> {
    jwks_of(get_json(http, uri, register).await?)
}

/// The provider's keys from its JWKS document.
fn jwks_of(doc: Map<String, Value>) -> std::result::Result<JwkSet, String> {
    serde_json::from_value(Value::Object(doc)).map_err(|e| format!("the JWKS is not valid: {e}"))
}

/// The endpoints a discovery document names: authorization, token, JWKS.
struct Endpoints {
    authorization: String,
    token: String,
    jwks: String,
}

/// Read a discovery document fetched for `issuer`.
fn endpoints_of(doc: &Map<String, Value>, issuer: &str) -> std::result::Result<Endpoints, String> {
    // OpenID Connect Discovery 4.3: the document must name the issuer it was fetched for.
    if doc.get("issuer").and_then(Value::as_str) != Some(issuer) {
        return Err("the discovery document names another issuer".to_owned());
    }
    Ok(Endpoints {
        authorization: str_field(doc, "authorization_endpoint")?,
        token: str_field(doc, "token_endpoint")?,
        jwks: str_field(doc, "jwks_uri")?,
    })
}

/// The algorithm and key id of an ID token's header, if the algorithm is one we accept.
fn id_token_header(token: &str) -> std::result::Result<(Algorithm, Option<String>), String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    if !ID_TOKEN_ALGS.contains(&header.alg) {
        return Err(format!("algorithm {:?} is not accepted", header.alg));
    }
    Ok((header.alg, header.kid))
}

/// The claims of an ID token signed with `key`: issuer, audience (our client id) and times
/// checked, `sub` required.
fn id_token_claims(
    token: &str,
    key: &DecodingKey,
    alg: Algorithm,
    conf: &OidcProvider,
) -> std::result::Result<Map<String, Value>, String> {
    let mut v = Validation::new(alg);
    v.leeway = LEEWAY_SECS;
    v.set_issuer(&[conf.issuer.as_str()]);
    v.set_audience(&[conf.client_id.as_str()]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    jsonwebtoken::decode::<Map<String, Value>>(token, key, &v)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

/// The ID token of the token endpoint's answer (`status`, `body`), or why there is none.
fn id_token_of(
    status: http::StatusCode,
    body: &Map<String, Value>,
) -> std::result::Result<String, String> {
    if !status.is_success() {
        let err = body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .chars()
            .take(100)
            .collect::<String>();
        return Err(format!(
            "The identity provider refused the code ({status}, {err})"
        ));
    }
    body.get("id_token")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "The identity provider's token answer has no id_token".into())
}

impl MetaCache {
    /// The discovery document (and keys), fetched when missing or older than an hour.
    pub async fn get(
        &self,
        http: &reqwest::Client,
        conf: &OidcProvider,
        register: &Register,
    ) -> std::result::Result<Arc<Meta>, SsoFailure> {
        let mut slot = self.inner.lock().await;
        if let Some(m) = slot.as_ref().filter(|m| m.fetched.elapsed() < META_TTL) {
            return Ok(m.clone());
        }
        let issuer = conf.issuer.trim_end_matches('/');
        let doc = get_json(
            http,
            &format!("{issuer}/.well-known/openid-configuration"),
            register,
        )
        .await
        .map_err(|e| SsoFailure::idp("discovery_failed", format!("Discovery failed: {e}")))?;
        let fail = |e: String| SsoFailure::idp("discovery_failed", e);
        let endpoints = endpoints_of(&doc, &conf.issuer).map_err(fail)?;
        let jwks = fetch_jwks(http, &endpoints.jwks, register)
            .await
            .map_err(fail)?;
        let meta = Arc::new(Meta {
            authorization_endpoint: endpoints.authorization,
            token_endpoint: endpoints.token,
            jwks_uri: endpoints.jwks,
            jwks,
            jwks_fetched: Instant::now(),
            fetched: Instant::now(),
        });
        *slot = Some(meta.clone());
        Ok(meta)
    }

    /// Check an ID token: signature by a key of the provider's JWKS (fetched again once when
    /// the key is unknown), `iss`, `aud` (our client id), `exp`; the claims on success.
    pub async fn verify_id_token(
        &self,
        http: &reqwest::Client,
        conf: &OidcProvider,
        register: &Register,
        token: &str,
    ) -> std::result::Result<Map<String, Value>, SsoFailure> {
        let bad = |m: String| SsoFailure::idp("bad_id_token", format!("Invalid ID token: {m}"));
        let (alg, kid) = id_token_header(token).map_err(bad)?;
        let mut meta = self.get(http, conf, register).await?;
        let mut key = find_key(&meta.jwks, kid.as_deref(), alg);
        if key.is_none() && meta.jwks_fetched.elapsed() > JWKS_REFETCH {
            // The provider may have rotated its keys.
            let jwks = fetch_jwks(http, &meta.jwks_uri, register)
                .await
                .map_err(|e| SsoFailure::idp("discovery_failed", e))?;
            let fresh = Arc::new(Meta {
                authorization_endpoint: meta.authorization_endpoint.clone(),
                token_endpoint: meta.token_endpoint.clone(),
                jwks_uri: meta.jwks_uri.clone(),
                jwks,
                jwks_fetched: Instant::now(),
                fetched: meta.fetched,
            });
            *self.inner.lock().await = Some(fresh.clone());
            meta = fresh;
            key = find_key(&meta.jwks, kid.as_deref(), alg);
        }
        let key =
            key.ok_or_else(|| bad("signed with a key the provider does not publish".into()))?;
        id_token_claims(token, &key, alg, conf).map_err(bad)
    }
}

/// The JWK that `kid` names (or, without a kid, the only key fitting `alg`), as a key.
fn find_key(jwks: &JwkSet, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
    use jsonwebtoken::jwk::AlgorithmParameters as P;
    // Without a kid, the key must at least be of the algorithm's kind.
    let fits = |j: &&jsonwebtoken::jwk::Jwk| {
        matches!(
            (&j.algorithm, alg),
            (
                P::RSA(_),
                Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512
            ) | (
                P::RSA(_),
                Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512
            ) | (P::EllipticCurve(_), Algorithm::ES256 | Algorithm::ES384)
                | (P::OctetKeyPair(_), Algorithm::EdDSA)
        )
    };
    let jwk = match kid {
        Some(kid) => jwks
            .keys
            .iter()
            .find(|j| j.common.key_id.as_deref() == Some(kid))?,
        None => {
            let mut fitting = jwks.keys.iter().filter(fits);
            let first = fitting.next()?;
            if fitting.next().is_some() {
                return None;
            }
            first
        }
    };
    DecodingKey::from_jwk(jwk).ok()
}

/// PKCE S256: the challenge of a verifier.
pub fn pkce_challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()))
}

/// The URL the browser is sent to at the provider.
pub fn authorization_url(
    endpoint: &str,
    conf: &OidcProvider,
    callback: &str,
    state: &str,
    nonce: &str,
    verifier: &str,
    fresh_login: bool,
) -> Result<String> {
    let mut url = url::Url::parse(endpoint)
        .map_err(|e| Error::internal(format!("authorization endpoint: {e}")))?;
    let mut scopes: Vec<&str> = vec!["openid"];
    scopes.extend(
        conf.scopes
            .iter()
            .map(String::as_str)
            .filter(|s| *s != "openid"),
    );
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &conf.client_id)
        .append_pair("redirect_uri", callback)
        .append_pair("scope", &scopes.join(" "))
        .append_pair("state", state)
        .append_pair("nonce", nonce)
        .append_pair("code_challenge", &pkce_challenge(verifier))
        .append_pair("code_challenge_method", "S256");
    if fresh_login {
        // Re-authentication must be the person at the keyboard now, not a provider session
        // still open in the browser (OpenID Connect Core, `prompt` and `max_age`).
        url.query_pairs_mut()
            .append_pair("prompt", "login")
            .append_pair("max_age", "0");
    }
    Ok(url.to_string())
}

/// Exchange the code for tokens at the token endpoint; the ID token.
pub async fn exchange_code(
    http: &reqwest::Client,
    meta: &Meta,
    provider: &Provider,
    code: &str,
    callback: &str,
    verifier: &str,
    register: &Register,
) -> std::result::Result<String, SsoFailure> {
    let conf = &provider.conf;
    let secret = provider.secret.as_deref().unwrap_or_default();
    // Built in a block: the serializer is not Send and must not live across an await.
    let (body, basic) = {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "authorization_code")
            .append_pair("code", code)
            .append_pair("redirect_uri", callback)
            .append_pair("code_verifier", verifier);
        let mut basic = None;
        match conf.client_auth_method.as_str() {
            "client_secret_post" => {
                form.append_pair("client_id", &conf.client_id)
                    .append_pair("client_secret", secret);
            }
            "none" => {
                form.append_pair("client_id", &conf.client_id);
            }
            _ => {
                // RFC 6749 2.3.1: both parts form-encoded before the Basic encoding.
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                basic = Some(base64::engine::general_purpose::STANDARD.encode(format!(
                    "{}:{}",
                    enc(&conf.client_id),
                    enc(secret)
                )));
            }
        }
        (form.finish(), basic)
    };
    let mut req = http
        .post(&meta.token_endpoint)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept", "application/json");
    if let Some(b) = basic {
        req = req.header("authorization", format!("Basic {b}"));
    }
    note_contact(register, &meta.token_endpoint);
    let fail = |m: String| SsoFailure::idp("token_exchange_failed", m);
    let res = req
        .body(body)
        .send()
        .await
        .map_err(|e| fail(format!("The identity provider cannot be reached: {e}")))?;
    let status = res.status();
    let body = read_json(res).await.map_err(|e| {
        fail(format!(
            "The identity provider's token answer is unusable: {e}"
        ))
    })?;
    id_token_of(status, &body).map_err(fail)
}

/// Property tests: whatever an identity provider answers (discovery document, JWKS, token
/// endpoint answer, ID token), reading it never panics, and an ID token is accepted only when
/// signed by the provider's key for us, by the issuer, and in time.
#[cfg(test)]
mod fuzz {
    use std::sync::OnceLock;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{EncodingKey, Header};
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::fuzz::{config, edit_text, edits, json, text};

    const ISSUER: &str = "https://idp.example/realms/a";
    const CLIENT: &str = "hafen";

    fn provider() -> OidcProvider {
        serde_json::from_value(json!({
            "idp_id": "idp", "idp_name": "IdP", "issuer": ISSUER, "client_id": CLIENT,
        }))
        .expect("a provider")
    }

    /// The provider's signing key (Ed25519) and its JWK.
    fn signing() -> &'static (EncodingKey, Value) {
        static KEY: OnceLock<(EncodingKey, Value)> = OnceLock::new();
        KEY.get_or_init(|| {
            let der = ruma::signatures::Ed25519KeyPair::generate();
            let pair = ruma::signatures::Ed25519KeyPair::from_der(&der, "k".into()).expect("key");
            let jwk = json!({
                "kty": "OKP", "crv": "Ed25519", "kid": "k1", "alg": "EdDSA", "use": "sig",
                "x": URL_SAFE_NO_PAD.encode(pair.public_key()),
            });
            (EncodingKey::from_ed_der(&der), jwk)
        })
    }

    fn object() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::btree_map(prop_oneof!["[a-z_]{1,20}", text()], json(), 0..6)
            .prop_map(|m| m.into_iter().collect())
    }

    fn url() -> impl Strategy<Value = Value> {
        prop_oneof![
            "https?://[a-z.]{1,12}(:[0-9]{1,5})?/[a-z/]{0,12}".prop_map(Value::String),
            json(),
        ]
    }

    /// JWKs of every kind with any values in their fields.
    fn jwk() -> impl Strategy<Value = Value> {
        let b64 = prop_oneof![
            "[A-Za-z0-9_-]{0,90}".prop_map(Value::String),
            prop::collection::vec(any::<u8>(), 0..80)
                .prop_map(|b| Value::String(URL_SAFE_NO_PAD.encode(b))),
            json(),
        ];
        (
            prop::sample::select(vec!["RSA", "EC", "OKP", "oct", "x"]),
            prop::sample::select(vec![
                "P-256",
                "P-384",
                "P-521",
                "Ed25519",
                "X25519",
                "secp256k1",
            ]),
            (b64.clone(), b64.clone(), b64.clone(), b64),
            prop::option::of(text()),
            prop::option::of(prop::sample::select(vec![
                "RS256", "ES256", "EdDSA", "HS256", "none",
            ])),
        )
            .prop_map(|(kty, crv, (n, e, x, y), kid, alg)| {
                let mut k =
                    json!({ "kty": kty, "crv": crv, "n": n, "e": e, "x": x, "y": y, "k": x });
                if let Some(kid) = kid {
                    k["kid"] = Value::String(kid);
                }
                if let Some(alg) = alg {
                    k["alg"] = Value::String(alg.to_owned());
                }
                k
            })
    }

    fn alg() -> impl Strategy<Value = Algorithm> {
        prop::sample::select(ID_TOKEN_ALGS.to_vec())
    }

    /// A time claim as the JWT library reads it (integers, and floats rounded).
    fn seconds(v: &Value) -> Option<f64> {
        match v.as_u64() {
            Some(n) => Some(n as f64),
            None => v
                .as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
                .map(f64::round),
        }
    }

    /// ID token claims: right or wrong issuer, audience, subject, times.
    fn claims() -> impl Strategy<Value = (Map<String, Value>, bool)> {
        let now = crate::utils::now_ms() / 1000;
        (
            prop::option::of(prop_oneof![Just(Value::from(ISSUER)), json()]),
            prop::option::of(prop_oneof![
                Just(Value::from(CLIENT)),
                Just(json!(["other", CLIENT])),
                json()
            ]),
            prop::option::of(prop_oneof![Just(Value::from("user-1")), json()]),
            prop::option::of(prop_oneof![
                Just(Value::from(now + 600)),
                Just(Value::from(now - 600)),
                json()
            ]),
            prop::collection::btree_map("[a-z]{1,6}", json(), 0..3),
        )
            .prop_map(move |(iss, aud, sub, exp, rest)| {
                let valid = iss.as_ref().and_then(Value::as_str) == Some(ISSUER)
                    && aud.as_ref().is_some_and(|a| {
                        a.as_str() == Some(CLIENT) || *a == json!(["other", CLIENT])
                    })
                    && sub.as_ref().is_some_and(Value::is_string)
                    && exp
                        .as_ref()
                        .and_then(seconds)
                        .is_some_and(|e| e > (now + 60) as f64);
                let mut m: Map<String, Value> = rest.into_iter().collect();
                for (k, v) in [("iss", iss), ("aud", aud), ("sub", sub), ("exp", exp)] {
                    match v {
                        Some(v) => m.insert(k.into(), v),
                        None => m.remove(k),
                    };
                }
                (m, valid)
            })
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_discovery_documents(
            mut doc in object(),
            issuer in prop_oneof![Just(Value::from(ISSUER)), json()],
            urls in (url(), url(), url()),
        ) {
            for (k, v) in [("issuer", issuer), ("authorization_endpoint", urls.0), ("token_endpoint", urls.1), ("jwks_uri", urls.2)] {
                doc.insert(k.to_owned(), v);
            }
            if let Ok(e) = endpoints_of(&doc, ISSUER) {
                prop_assert_eq!(doc.get("issuer").and_then(Value::as_str), Some(ISSUER));
                for u in [&e.authorization, &e.token, &e.jwks] {
                    prop_assert!(u.starts_with("https://") || u.starts_with("http://"));
                }
            }
            let mut other = doc.clone();
            other.insert("issuer".into(), Value::from("https://evil.example"));
            prop_assert!(endpoints_of(&other, ISSUER).is_err());
        }

        #[test]
        fn fuzz_jwks_documents(
            doc in prop_oneof![
                object(),
                prop::collection::vec(jwk(), 0..5).prop_map(|keys| {
                    let mut m = Map::new();
                    m.insert("keys".into(), Value::Array(keys));
                    m
                }),
            ],
            kid in prop::option::of(prop_oneof![Just("k1".to_owned()), text()]),
            alg in alg(),
        ) {
            if let Ok(jwks) = jwks_of(doc) {
                let _ = find_key(&jwks, kid.as_deref(), alg);
            }
        }

        #[test]
        fn fuzz_token_endpoint_answers(status in 100u16..600, body in object(), token in prop::option::of(json())) {
            let mut body = body;
            if let Some(t) = token {
                body.insert("id_token".into(), t);
            }
            let status = http::StatusCode::from_u16(status).expect("a status");
            match id_token_of(status, &body) {
                Ok(t) => {
                    prop_assert!(status.is_success());
                    prop_assert_eq!(body.get("id_token").and_then(Value::as_str), Some(t.as_str()));
                }
                // The provider's error text is cut to 100 characters.
                Err(e) => prop_assert!(e.chars().count() <= 200, "{}", e),
            }
        }

        #[test]
        fn fuzz_id_tokens(claims in claims(), edits in edits(), junk in text(), other_alg in alg()) {
            let (claims, valid) = claims;
            let (encoding, jwk) = signing();
            let jwks = jwks_of(json!({ "keys": [jwk] }).as_object().expect("object").clone()).expect("a JWKS");
            let mut header = Header::new(Algorithm::EdDSA);
            header.kid = Some("k1".into());
            let token = jsonwebtoken::encode(&header, &claims, encoding).expect("signs");
            let check = |token: &str| -> std::result::Result<Map<String, Value>, String> {
                let (alg, kid) = id_token_header(token)?;
                let key = find_key(&jwks, kid.as_deref(), alg).ok_or("no key")?;
                id_token_claims(token, &key, alg, &provider())
            };
            let result = check(&token);
            prop_assert_eq!(result.is_ok(), valid, "{:?} {:?}", claims, result);
            // No change to the signed part passes.
            let changed = edit_text(&token, &edits);
            if changed != token && check(&changed).is_ok() {
                let signed = |t: &str| t.rsplit_once('.').map(|(s, _)| s.to_owned());
                prop_assert_eq!(signed(&changed), signed(&token));
            }
            let _ = check(&junk);
            // The same claims under another algorithm's name do not verify with this key.
            if other_alg != Algorithm::EdDSA {
                let mut h = Header::new(other_alg);
                h.kid = Some("k1".into());
                let head = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&h).expect("json"));
                let (_, rest) = token.split_once('.').expect("three parts");
                let relabelled = format!("{head}.{rest}");
                prop_assert!(check(&relabelled).is_err());
            }
            // HMAC with anything as the secret is never accepted.
            let hs = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"k1")).expect("signs");
            prop_assert!(id_token_header(&hs).is_err());
        }
    }
}
