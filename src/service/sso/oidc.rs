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
    let v = get_json(http, uri, register).await?;
    serde_json::from_value(Value::Object(v)).map_err(|e| format!("the JWKS is not valid: {e}"))
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
        // OpenID Connect Discovery 4.3: the document must name the issuer it was fetched for.
        if doc.get("issuer").and_then(Value::as_str) != Some(conf.issuer.as_str()) {
            return Err(fail(
                "the discovery document names another issuer".to_owned(),
            ));
        }
        let jwks_uri = str_field(&doc, "jwks_uri").map_err(fail)?;
        let jwks = fetch_jwks(http, &jwks_uri, register).await.map_err(fail)?;
        let meta = Arc::new(Meta {
            authorization_endpoint: str_field(&doc, "authorization_endpoint").map_err(fail)?,
            token_endpoint: str_field(&doc, "token_endpoint").map_err(fail)?,
            jwks_uri,
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
        let header = jsonwebtoken::decode_header(token).map_err(|e| bad(e.to_string()))?;
        if !ID_TOKEN_ALGS.contains(&header.alg) {
            return Err(bad(format!("algorithm {:?} is not accepted", header.alg)));
        }
        let mut meta = self.get(http, conf, register).await?;
        let mut key = find_key(&meta.jwks, header.kid.as_deref(), header.alg);
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
            key = find_key(&meta.jwks, header.kid.as_deref(), header.alg);
        }
        let key =
            key.ok_or_else(|| bad("signed with a key the provider does not publish".into()))?;
        let mut v = Validation::new(header.alg);
        v.leeway = LEEWAY_SECS;
        v.set_issuer(&[conf.issuer.as_str()]);
        v.set_audience(&[conf.client_id.as_str()]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v)
            .map_err(|e| bad(e.to_string()))?;
        Ok(data.claims)
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
    if !status.is_success() {
        let err = body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .chars()
            .take(100)
            .collect::<String>();
        return Err(fail(format!(
            "The identity provider refused the code ({status}, {err})"
        )));
    }
    body.get("id_token")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| fail("The identity provider's token answer has no id_token".into()))
}
