//! SSO (OpenID Connect) and JWT login, against a real OpenID provider written here: an axum
//! server on 127.0.0.1 with a discovery document, an authorization endpoint that redirects back
//! with a code, a token endpoint (client_secret_basic, PKCE S256 checked) answering an ID token
//! signed with an ES256 key made at test time, and its JWKS. The browser is a reqwest client
//! without automatic redirects: the test follows every redirect by hand and carries the cookie.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{RawQuery, State},
    http::{HeaderMap, StatusCode as AxStatus},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::Digest;

use crate::common::{assert_err, TestServer};

const CLIENT_ID: &str = "hafen-client";
const CLIENT_SECRET: &str = "s3cret:with/odd&chars";
/// The public base URL the server is told it has; the test "browser" maps it to the real one.
const PUBLIC: &str = "http://hafen.test";
const V3: &str = "/_matrix/client/v3";

/// How the provider spoils its next ID token.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Spoil {
    None,
    /// Signed with another key (under the published kid).
    Signature,
    Nonce,
    Audience,
    Expired,
}

struct Issued {
    nonce: String,
    challenge: String,
    redirect_uri: String,
    claims: Value,
}

struct Idp {
    issuer: String,
    key: EncodingKey,
    /// A key the provider does not publish.
    other_key: EncodingKey,
    jwk: Value,
    /// The claims the next login gets.
    next: Mutex<Value>,
    spoil: Mutex<Spoil>,
    codes: Mutex<HashMap<String, Issued>>,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn query_map(q: &Option<String>) -> HashMap<String, String> {
    url::form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

async fn discovery(State(idp): State<Arc<Idp>>) -> Json<Value> {
    Json(json!({
        "issuer": idp.issuer,
        "authorization_endpoint": format!("{}/authorize", idp.issuer),
        "token_endpoint": format!("{}/token", idp.issuer),
        "jwks_uri": format!("{}/jwks", idp.issuer),
        "response_types_supported": ["code"],
        "id_token_signing_alg_values_supported": ["ES256"],
    }))
}

async fn jwks(State(idp): State<Arc<Idp>>) -> Json<Value> {
    Json(json!({ "keys": [idp.jwk] }))
}

/// The user "logs in" at once: a code for the claims set for the next login.
async fn authorize(State(idp): State<Arc<Idp>>, RawQuery(q): RawQuery) -> Response {
    let q = query_map(&q);
    let ok = q.get("response_type").map(String::as_str) == Some("code")
        && q.get("client_id").map(String::as_str) == Some(CLIENT_ID)
        && q.get("code_challenge_method").map(String::as_str) == Some("S256")
        && q.get("scope")
            .is_some_and(|s| s.split(' ').any(|x| x == "openid"));
    if !ok {
        return (AxStatus::BAD_REQUEST, "bad authorization request").into_response();
    }
    let code = format!("code-{}", rand_id());
    let redirect_uri = q["redirect_uri"].clone();
    idp.codes.lock().unwrap().insert(
        code.clone(),
        Issued {
            nonce: q["nonce"].clone(),
            challenge: q["code_challenge"].clone(),
            redirect_uri: redirect_uri.clone(),
            claims: idp.next.lock().unwrap().clone(),
        },
    );
    let mut to = url::Url::parse(&redirect_uri).unwrap();
    to.query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &q["state"]);
    (AxStatus::FOUND, [("location", to.to_string())]).into_response()
}

fn rand_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The token endpoint: client_secret_basic, the code once, the redirect_uri and PKCE checked.
async fn token(State(idp): State<Arc<Idp>>, headers: HeaderMap, body: String) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            enc(CLIENT_ID),
            enc(CLIENT_SECRET)
        ))
    );
    let by_basic =
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(basic.as_str());
    let by_post = form.get("client_id").map(String::as_str) == Some(CLIENT_ID)
        && form.get("client_secret").map(String::as_str) == Some(CLIENT_SECRET);
    // One way only (RFC 6749 2.3: a client uses one authentication method per request).
    if by_basic == by_post {
        return (
            AxStatus::UNAUTHORIZED,
            Json(json!({ "error": "invalid_client" })),
        )
            .into_response();
    }
    let Some(issued) = form
        .get("code")
        .and_then(|c| idp.codes.lock().unwrap().remove(c))
    else {
        return (
            AxStatus::BAD_REQUEST,
            Json(json!({ "error": "invalid_grant" })),
        )
            .into_response();
    };
    let verifier = form.get("code_verifier").cloned().unwrap_or_default();
    if form.get("grant_type").map(String::as_str) != Some("authorization_code")
        || form.get("redirect_uri") != Some(&issued.redirect_uri)
        || b64(&sha2::Sha256::digest(verifier.as_bytes())) != issued.challenge
    {
        return (
            AxStatus::BAD_REQUEST,
            Json(json!({ "error": "invalid_grant" })),
        )
            .into_response();
    }
    let spoil = *idp.spoil.lock().unwrap();
    let mut claims = issued.claims;
    claims["iss"] = json!(idp.issuer);
    claims["aud"] = json!(if spoil == Spoil::Audience {
        "someone-else"
    } else {
        CLIENT_ID
    });
    claims["iat"] = json!(now());
    claims["exp"] = json!(if spoil == Spoil::Expired {
        now() - 3600
    } else {
        now() + 300
    });
    claims["nonce"] = json!(if spoil == Spoil::Nonce {
        "not-the-nonce".to_owned()
    } else {
        issued.nonce
    });
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("k1".into());
    let key = if spoil == Spoil::Signature {
        &idp.other_key
    } else {
        &idp.key
    };
    let id_token = jsonwebtoken::encode(&header, &claims, key).unwrap();
    Json(json!({ "access_token": "at", "token_type": "Bearer", "id_token": id_token }))
        .into_response()
}

/// Start the provider; its issuer URL.
async fn start_idp() -> Arc<Idp> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let kp = rcgen::KeyPair::generate().unwrap();
    let other = rcgen::KeyPair::generate().unwrap();
    let raw = rcgen::PublicKeyData::der_bytes(&kp).to_vec();
    // The P-256 point is the last 65 bytes of the SubjectPublicKeyInfo: 0x04 || x || y.
    let point = &raw[raw.len() - 65..];
    assert_eq!(point[0], 4);
    let idp = Arc::new(Idp {
        issuer: format!("http://{addr}"),
        key: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
        other_key: EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({
            "kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }),
        next: Mutex::new(json!({})),
        spoil: Mutex::new(Spoil::None),
        codes: Mutex::new(HashMap::new()),
    });
    let app = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/jwks", get(jwks))
        .route("/authorize", get(authorize))
        .route("/token", post(token))
        .with_state(idp.clone());
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    idp
}

impl Idp {
    fn next_user(&self, claims: Value) {
        *self.next.lock().unwrap() = claims;
    }
    fn spoil(&self, s: Spoil) {
        *self.spoil.lock().unwrap() = s;
    }
}

fn provider(idp: &Idp) -> hafen::service::sso::config::OidcProvider {
    toml::from_str(&format!(
        r#"
        idp_id = "corp"
        idp_name = "Corp login"
        idp_icon = "mxc://localhost/icon"
        issuer = "{}"
        client_id = "{CLIENT_ID}"
        client_secret = "{CLIENT_SECRET}"
        scopes = ["openid", "profile"]
        groups_claim = "groups"
        "#,
        idp.issuer
    ))
    .unwrap()
}

async fn sso_server(idp: &Idp, adjust: impl FnOnce(&mut hafen::config::Config)) -> TestServer {
    let p = provider(idp);
    TestServer::start_with(move |c| {
        c.oidc_providers = vec![p];
        c.public_baseurl = Some(PUBLIC.into());
        c.sso_client_allowlist = vec!["https://client.example/".into(), "io.element.test:/".into()];
        adjust(c);
    })
    .await
}

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn location(res: &reqwest::Response) -> String {
    res.headers()
        .get("location")
        .expect("a location")
        .to_str()
        .unwrap()
        .to_owned()
}

/// The browser's way up to the callback: the redirect to the provider (with its cookie) and the
/// provider's redirect back. Returns the callback URL on the real server and the cookie.
async fn to_callback(ts: &TestServer, idp_id: &str, redirect_url: &str) -> (String, String) {
    through_idp(
        ts,
        &format!(
            "{V3}/login/sso/redirect/{idp_id}?redirectUrl={}",
            url::form_urlencoded::byte_serialize(redirect_url.as_bytes()).collect::<String>()
        ),
    )
    .await
}

/// From `start_path` on the server, through the provider, up to the callback.
async fn through_idp(ts: &TestServer, start_path: &str) -> (String, String) {
    let b = browser();
    let res = b
        .get(format!("{}{start_path}", ts.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FOUND);
    let set_cookie = res.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    assert!(set_cookie.contains("SameSite=Lax"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let at_idp = location(&res);
    let q = query_map(&url::Url::parse(&at_idp).unwrap().query().map(str::to_owned));
    assert_eq!(
        q["redirect_uri"],
        format!("{PUBLIC}/_hafen/client/v1/sso/callback")
    );
    assert_eq!(q["code_challenge_method"], "S256");
    assert!(q["state"].len() >= 32 && q["nonce"].len() >= 32);
    // Re-authentication asks the provider for a fresh login; a login does not.
    let reauth = start_path.contains("/auth/m.login.sso/");
    assert_eq!(
        q.get("prompt").map(String::as_str),
        reauth.then_some("login")
    );
    assert_eq!(q.get("max_age").map(String::as_str), reauth.then_some("0"));
    let res = b.get(&at_idp).send().await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::FOUND,
        "{}",
        res.text().await.unwrap()
    );
    let back = location(&res);
    assert!(back.starts_with(PUBLIC), "{back}");
    (format!("{}{}", ts.base, &back[PUBLIC.len()..]), cookie)
}

/// The callback with the cookie: status, location (if any) and body.
async fn callback(url: &str, cookie: Option<&str>) -> (StatusCode, Option<String>, String) {
    let mut req = browser().get(url);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    let loc = res
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, loc, res.text().await.unwrap())
}

/// A whole SSO login up to the login token handed to an allowlisted client.
async fn sso_login_token(ts: &TestServer) -> String {
    let (url, cookie) = to_callback(ts, "corp", "https://client.example/app?x=1").await;
    let (status, loc, body) = callback(&url, Some(&cookie)).await;
    assert_eq!(status, StatusCode::FOUND, "{body}");
    let loc = loc.unwrap();
    assert!(
        loc.starts_with("https://client.example/app?x=1&loginToken="),
        "{loc}"
    );
    let q = query_map(&url::Url::parse(&loc).unwrap().query().map(str::to_owned));
    q["loginToken"].clone()
}

async fn token_login(ts: &TestServer, token: &str) -> (StatusCode, Value) {
    ts.req(
        Method::POST,
        &format!("{V3}/login"),
        None,
        Some(json!({ "type": "m.login.token", "token": token })),
    )
    .await
}

/// Log in through SSO as whoever the provider's next claims say; the login answer.
async fn sso_login(ts: &TestServer) -> Value {
    let token = sso_login_token(ts).await;
    let (status, body) = token_login(ts, &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn audit_entries(ts: &TestServer, kind: &str) -> Vec<hafen::policy::audit::AuditEntry> {
    ts.services()
        .audit
        .query(0, u64::MAX, 10_000, None, |e| e.kind == kind)
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sso_login_maps_users_and_login_tokens_work_once() {
    let idp = start_idp().await;
    let ts = sso_server(&idp, |_| {}).await;

    // GET /login offers SSO with its provider and login tokens, no JWT.
    let (status, flows) = ts
        .req(Method::GET, &format!("{V3}/login"), None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let types: Vec<&str> = flows["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "m.login.password",
            "m.login.application_service",
            "m.login.sso",
            "m.login.token"
        ]
    );
    assert_eq!(
        flows["flows"][2]["identity_providers"],
        json!([{ "id": "corp", "name": "Corp login", "icon": "mxc://localhost/icon" }])
    );

    // A first login makes the account from the claims.
    idp.next_user(
        json!({ "sub": "u-1", "preferred_username": "Alice.Smith", "name": "Alice Smith" }),
    );
    let token = sso_login_token(&ts).await;
    let (status, login) = token_login(&ts, &token).await;
    assert_eq!(status, StatusCode::OK, "{login}");
    assert_eq!(login["user_id"], json!("@alice.smith:localhost"));
    let access = login["access_token"].as_str().unwrap().to_owned();
    let (status, who) = ts
        .req(
            Method::GET,
            &format!("{V3}/account/whoami"),
            Some(&access),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(who["user_id"], json!("@alice.smith:localhost"));
    let (status, name) = ts
        .req(
            Method::GET,
            &format!("{V3}/profile/@alice.smith:localhost/displayname"),
            Some(&access),
            None,
        )
        .await;
    assert_eq!(
        (status, name),
        (StatusCode::OK, json!({ "displayname": "Alice Smith" }))
    );

    // The token works once.
    assert_err(&token_login(&ts, &token).await, 403, "M_FORBIDDEN");
    assert_err(&token_login(&ts, "made-up").await, 403, "M_FORBIDDEN");
    // An expired token is refused (made here, then aged).
    let user = ruma::UserId::parse("@alice.smith:localhost").unwrap();
    let storage = &ts.services().storage;
    let old = hafen::service::sso::login_token::issue(storage, &user, "sso:corp").unwrap();
    let rec = hafen::service::sso::login_token::LoginTokenRecord {
        user_id: user.clone(),
        expires_ms: 1,
        method: "sso:corp".into(),
    };
    storage
        .put(
            hafen::storage::Table::LoginTokens,
            &hafen::utils::token_hash(&old),
            &serde_json::to_vec(&rec).unwrap(),
        )
        .unwrap();
    assert_err(&token_login(&ts, &old).await, 403, "M_FORBIDDEN");
    // Missing token field.
    let r = ts
        .req(
            Method::POST,
            &format!("{V3}/login"),
            None,
            Some(json!({ "type": "m.login.token" })),
        )
        .await;
    assert_err(&r, 400, "M_MISSING_PARAM");

    // The same provider user later logs into the same account, whatever their name says now.
    idp.next_user(json!({ "sub": "u-1", "preferred_username": "alice.renamed" }));
    assert_eq!(
        sso_login(&ts).await["user_id"],
        json!("@alice.smith:localhost")
    );

    // A taken localpart: another provider user named like an existing account gets a free one.
    ts.user("bob").await;
    idp.next_user(json!({ "sub": "u-2", "preferred_username": "Bob" }));
    assert_eq!(sso_login(&ts).await["user_id"], json!("@bob1:localhost"));
    // Characters outside the localpart grammar become `_`.
    idp.next_user(json!({ "sub": "u-3", "preferred_username": "Jürgen Ä" }));
    assert_eq!(
        sso_login(&ts).await["user_id"],
        json!("@j_rgen__:localhost")
    );
    // No usable name claim: refused at the callback.
    idp.next_user(json!({ "sub": "u-4" }));
    let (url, cookie) = to_callback(&ts, "corp", "https://client.example/").await;
    let (status, _, body) = callback(&url, Some(&cookie)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("M_FORBIDDEN"), "{body}");

    // SSO accounts have no password.
    let r = ts
        .req(
            Method::POST,
            &format!("{V3}/login"),
            None,
            Some(json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice.smith" }, "password": "" })),
        )
        .await;
    assert_err(&r, 403, "M_FORBIDDEN");

    // A client not on the allowlist: the user is asked first; the link carries the token.
    idp.next_user(json!({ "sub": "u-1" }));
    let (url, cookie) = to_callback(&ts, "corp", "https://elsewhere.example/cb").await;
    let (status, loc, body) = callback(&url, Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(loc.is_none());
    assert!(body.contains("elsewhere.example"), "{body}");
    let start = body.find("loginToken=").expect("a link with the token") + "loginToken=".len();
    let token: String = body[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let (status, login) = token_login(&ts, &token).await;
    assert_eq!(
        (status, &login["user_id"]),
        (StatusCode::OK, &json!("@alice.smith:localhost"))
    );

    // Audit: logins by method, the failed token logins with their reason.
    let logins = audit_entries(&ts, "login");
    assert!(logins.len() >= 5, "{logins:?}");
    assert!(
        logins
            .iter()
            .all(|e| e.detail["method"] == json!("sso:corp")),
        "{logins:?}"
    );
    assert_eq!(logins[0].user.as_deref(), Some("@alice.smith:localhost"));
    let failed = audit_entries(&ts, "login_failed");
    let reasons: Vec<&str> = failed
        .iter()
        .filter_map(|e| e.detail["reason"].as_str())
        .collect();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == "invalid_login_token")
            .count(),
        3,
        "{failed:?}"
    );
    assert!(reasons.contains(&"no_localpart"), "{failed:?}");
    assert!(reasons.contains(&"wrong_password"), "{failed:?}");
    // No token in the audit log.
    let all = serde_json::to_string(
        &ts.services()
            .audit
            .query(0, u64::MAX, 10_000, None, |_| true)
            .unwrap()
            .0,
    )
    .unwrap();
    assert!(!all.contains(&token));

    // The provider is in the register of destinations.
    let register = ts.services().register.list().unwrap();
    let host = idp.issuer.trim_start_matches("http://");
    assert!(
        register
            .iter()
            .any(|d| d.kind == "identity_provider" && d.destination == host && d.count >= 3),
        "{register:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sso_refuses_bad_state_signature_nonce_audience_and_bad_requests() {
    let idp = start_idp().await;
    let ts = sso_server(&idp, |_| {}).await;
    idp.next_user(json!({ "sub": "u-9", "preferred_username": "zoe" }));
    let b = browser();
    let get = |path: String| {
        let b = b.clone();
        let url = format!("{}{path}", ts.base);
        async move {
            let res = b.get(url).send().await.unwrap();
            let status = res.status();
            let text = res.text().await.unwrap();
            (
                status,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
            )
        }
    };
    // Unknown provider, missing or unusable redirectUrl.
    assert_err(
        &get(format!(
            "{V3}/login/sso/redirect/nope?redirectUrl=https%3A%2F%2Fclient.example%2F"
        ))
        .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &get(format!("{V3}/login/sso/redirect/corp")).await,
        400,
        "M_MISSING_PARAM",
    );
    assert_err(
        &get(format!("{V3}/login/sso/redirect")).await,
        400,
        "M_MISSING_PARAM",
    );
    // An app's own scheme only when allowlisted.
    let res = b
        .get(format!(
            "{}{V3}/login/sso/redirect/corp?redirectUrl=io.element.test%3A%2Fcallback",
            ts.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FOUND);
    for bad in [
        "ftp%3A%2F%2Fx.example%2F",
        "javascript%3Aalert(1)",
        "not-a-url",
        "other.app%3A%2Fcb",
    ] {
        assert_err(
            &get(format!("{V3}/login/sso/redirect/corp?redirectUrl={bad}")).await,
            400,
            "M_INVALID_PARAM",
        );
    }
    // Without an idpId and one provider: straight to it (legacy r0 path too).
    let res = b
        .get(format!(
            "{}/_matrix/client/r0/login/sso/redirect?redirectUrl=https%3A%2F%2Fclient.example%2F",
            ts.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FOUND);
    assert!(location(&res).starts_with(&format!("{}/authorize?", idp.issuer)));

    // Another state than the one this browser got.
    let (url, cookie) = to_callback(&ts, "corp", "https://client.example/").await;
    let tampered = url.replace("state=", "state=x");
    let (status, loc, body) = callback(&tampered, Some(&cookie)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(loc.is_none());
    assert!(
        body.contains("M_UNKNOWN") && body.contains("state mismatch"),
        "{body}"
    );
    // The pending login is gone once answered, right or wrong.
    let (status, _, body) = callback(&url, Some(&cookie)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("not started in this browser"), "{body}");
    // Without the cookie (another browser).
    let (url, _cookie) = to_callback(&ts, "corp", "https://client.example/").await;
    let (status, _, body) = callback(&url, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("not started in this browser"), "{body}");

    // ID tokens the provider spoils.
    for (spoil, says) in [
        (Spoil::Signature, "Invalid ID token"),
        (Spoil::Audience, "Invalid ID token"),
        (Spoil::Expired, "Invalid ID token"),
        (Spoil::Nonce, "nonce mismatch"),
    ] {
        idp.spoil(spoil);
        let (url, cookie) = to_callback(&ts, "corp", "https://client.example/").await;
        let (status, loc, body) = callback(&url, Some(&cookie)).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{spoil:?}: {body}");
        assert!(loc.is_none());
        assert!(
            body.contains("M_UNKNOWN") && body.contains(says),
            "{spoil:?}: {body}"
        );
    }
    idp.spoil(Spoil::None);
    // The provider refusing the user.
    let (url, cookie) = to_callback(&ts, "corp", "https://client.example/").await;
    let state =
        query_map(&url::Url::parse(&url).unwrap().query().map(str::to_owned))["state"].clone();
    let refused = format!(
        "{}/_hafen/client/v1/sso/callback?error=access_denied&error_description=no&state={state}",
        ts.base
    );
    let (status, _, body) = callback(&refused, Some(&cookie)).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("access_denied"), "{body}");
    // Nobody was made or logged in by any of this.
    assert!(!ts
        .services()
        .accounts
        .exists(&ruma::UserId::parse("@zoe:localhost").unwrap())
        .unwrap());
    assert!(audit_entries(&ts, "login").is_empty());
    let reasons: Vec<String> = audit_entries(&ts, "login_failed")
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e.detail["method"].as_str().unwrap(),
                e.detail["reason"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "sso:corp state_mismatch",
            "sso unknown_session",
            "sso unknown_session",
            "sso:corp bad_id_token",
            "sso:corp bad_id_token",
            "sso:corp bad_id_token",
            "sso:corp nonce_mismatch",
            "sso:corp idp_error",
        ]
    );
    // And at last a good login goes through.
    assert_eq!(sso_login(&ts).await["user_id"], json!("@zoe:localhost"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_from_claims_decide_invites_and_follow_the_next_login() {
    let idp = start_idp().await;
    let ts = sso_server(&idp, |c| {
        c.groups = vec![hafen::policy::groups::GroupConfig {
            name: "staff".into(),
            users: vec!["@carol:localhost".into()],
            servers: vec![],
            sso_groups: vec!["/staff".into()],
        }];
    })
    .await;
    let carol = ts.user("carol").await;
    idp.next_user(
        json!({ "sub": "d-1", "preferred_username": "dave", "groups": ["/staff", "/other"] }),
    );
    let dave = sso_login(&ts).await;
    assert_eq!(dave["user_id"], json!("@dave:localhost"));
    let room = ts.create_room(&carol, json!({})).await;
    let invite = |room: String| {
        let ts = &ts;
        let carol = carol.clone();
        async move {
            ts.post(
                &format!("{V3}/rooms/{}/invite", crate::common::enc(&room)),
                &carol,
                json!({ "user_id": "@dave:localhost" }),
            )
            .await
        }
    };
    let (status, body) = invite(room).await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));
    // The admin API shows the claim groups.
    let (status, groups) = {
        let s = ts.services();
        (StatusCode::OK, s.access.groups.list())
    };
    assert_eq!(status, StatusCode::OK);
    assert_eq!(groups[0]["sso_groups"], json!(["/staff"]));
    // Dave joins a room bound to the group.
    let bound = ts
        .create_room(
            &carol,
            json!({ "creation_content": { "org.hafen.group": "staff" } }),
        )
        .await;
    let (status, _) = invite(bound.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let dave_token = dave["access_token"].as_str().unwrap().to_owned();
    let (status, body) = ts
        .req(
            Method::POST,
            &format!("{V3}/join/{}", crate::common::enc(&bound)),
            Some(&dave_token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The provider no longer names the group: after the next login dave is out of it, and out
    // of the room bound to it.
    idp.next_user(json!({ "sub": "d-1", "preferred_username": "dave", "groups": ["/other"] }));
    assert_eq!(sso_login(&ts).await["user_id"], json!("@dave:localhost"));
    let (status, member) = ts
        .get(
            &format!(
                "{V3}/rooms/{}/state/m.room.member/@dave:localhost",
                crate::common::enc(&bound)
            ),
            &carol,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(member["membership"], json!("leave"), "{member}");
    let denied = audit_entries(&ts, "policy_denied");
    assert!(
        denied
            .iter()
            .any(|e| e.detail["action"] == json!("remain_member")
                && e.user.as_deref() == Some("@dave:localhost")
                && e.room.as_deref() == Some(bound.as_str())),
        "{denied:?}"
    );
    let room2 = ts.create_room(&carol, json!({})).await;
    let r = invite(room2.clone()).await;
    assert_err(&r, 403, "M_FORBIDDEN");
    assert!(
        r.1["error"]
            .as_str()
            .unwrap()
            .contains("closed_user_groups"),
        "{}",
        r.1
    );
    // And back in when it names it again.
    idp.next_user(json!({ "sub": "d-1", "groups": "/staff" }));
    sso_login(&ts).await;
    let (status, _) = invite(room2).await;
    assert_eq!(status, StatusCode::OK);
    let rec = hafen::policy::claims::get(
        &ts.services().storage,
        &ruma::UserId::parse("@dave:localhost").unwrap(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(rec.source, "sso:corp");
    assert_eq!(rec.groups.into_iter().collect::<Vec<_>>(), ["/staff"]);
}

const JWT_SECRET: &str = "an-hmac-secret-of-at-least-32-bytes!!";

fn jwt(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_login_checks_signature_expiry_issuer_and_audience() {
    let ts = TestServer::start_with(|c| {
        c.jwt = Some(
            toml::from_str(&format!(
                r#"
                secret = "{JWT_SECRET}"
                algorithm = "HS256"
                issuer = "https://idp.example"
                audiences = ["hafen"]
                groups_claim = "roles"
                "#
            ))
            .unwrap(),
        );
    })
    .await;
    let (status, flows) = ts
        .req(Method::GET, &format!("{V3}/login"), None, None)
        .await;
    assert_eq!(
        (status, flows),
        (
            StatusCode::OK,
            json!({ "flows": [{ "type": "m.login.password" }, { "type": "m.login.application_service" }, { "type": "org.matrix.login.jwt" }] })
        )
    );
    let login = |token: Option<String>| {
        let ts = &ts;
        async move {
            let mut body = json!({ "type": "org.matrix.login.jwt" });
            if let Some(t) = token {
                body["token"] = json!(t);
            }
            ts.req(Method::POST, &format!("{V3}/login"), None, Some(body))
                .await
        }
    };
    let good = json!({ "sub": "erin", "iss": "https://idp.example", "aud": "hafen", "exp": now() + 60, "roles": ["ops"] });
    let (status, body) = login(Some(jwt(good.clone(), JWT_SECRET))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], json!("@erin:localhost"));
    let access = body["access_token"].as_str().unwrap().to_owned();
    let (status, who) = ts
        .req(
            Method::GET,
            &format!("{V3}/account/whoami"),
            Some(&access),
            None,
        )
        .await;
    assert_eq!(
        (status, &who["user_id"]),
        (StatusCode::OK, &json!("@erin:localhost"))
    );
    // Again: the same account.
    let (status, body) = login(Some(jwt(good.clone(), JWT_SECRET))).await;
    assert_eq!(
        (status, &body["user_id"]),
        (StatusCode::OK, &json!("@erin:localhost"))
    );
    let rec = hafen::policy::claims::get(
        &ts.services().storage,
        &ruma::UserId::parse("@erin:localhost").unwrap(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(rec.source, "jwt");
    assert_eq!(rec.groups.into_iter().collect::<Vec<_>>(), ["ops"]);

    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    for (claims, secret) in [
        (good.clone(), "another-secret-another-secret-another"),
        (with("exp", json!(now() - 3600)), JWT_SECRET),
        (with("nbf", json!(now() + 3600)), JWT_SECRET),
        (with("aud", json!("someone-else")), JWT_SECRET),
        (with("iss", json!("https://evil.example")), JWT_SECRET),
        (no_exp, JWT_SECRET),
    ] {
        let r = login(Some(jwt(claims.clone(), secret))).await;
        assert_err(&r, 403, "M_FORBIDDEN");
        assert!(
            r.1["error"]
                .as_str()
                .unwrap()
                .starts_with("JWT validation failed"),
            "{claims}: {}",
            r.1
        );
    }
    assert_err(&login(None).await, 403, "M_FORBIDDEN");
    assert_err(&login(Some("not.a.jwt".into())).await, 403, "M_FORBIDDEN");
    // A subject that is not a user of this server.
    let r = login(Some(jwt(
        with("sub", json!("@x:elsewhere.example")),
        JWT_SECRET,
    )))
    .await;
    assert_err(&r, 403, "M_FORBIDDEN");
    // No SSO here: login tokens are not a login type.
    let r = ts
        .req(
            Method::POST,
            &format!("{V3}/login"),
            None,
            Some(json!({ "type": "m.login.token", "token": "x" })),
        )
        .await;
    assert_err(&r, 400, "M_UNKNOWN");
    // Nor are the SSO redirects.
    let r = ts
        .req(
            Method::GET,
            &format!("{V3}/login/sso/redirect?redirectUrl=https%3A%2F%2Fc.example%2F"),
            None,
            None,
        )
        .await;
    assert_err(&r, 404, "M_UNRECOGNIZED");

    // The transparency statement names the identity provider data.
    let (status, privacy) = ts
        .req(Method::GET, "/_hafen/client/v1/privacy", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let idp_data = privacy["categories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == json!("identity_provider"))
        .expect("an identity_provider category");
    assert!(
        idp_data["recipients"]
            .as_str()
            .unwrap()
            .contains("JWT login"),
        "{idp_data}"
    );

    let logins = audit_entries(&ts, "login");
    assert_eq!(logins.len(), 2);
    assert!(logins.iter().all(|e| e.detail["method"] == json!("jwt")));
    let failed = audit_entries(&ts, "login_failed");
    let reasons: Vec<&str> = failed
        .iter()
        .map(|e| e.detail["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "invalid_jwt",
            "invalid_jwt",
            "invalid_jwt",
            "invalid_jwt",
            "invalid_jwt",
            "invalid_jwt",
            "missing_token",
            "invalid_jwt",
            "invalid_user_id"
        ]
    );
}

#[tokio::test]
async fn jwt_without_registration_refuses_unknown_users() {
    let ts = TestServer::start_with(|c| {
        c.jwt = Some(
            toml::from_str(&format!(
                "secret = \"{JWT_SECRET}\"\nregister_unknown_users = false\nsubject_claim = \"uid\""
            ))
            .unwrap(),
        );
    })
    .await;
    ts.user("known").await;
    let login = |uid: &str| {
        let ts = &ts;
        let t = jwt(json!({ "uid": uid, "exp": now() + 60 }), JWT_SECRET);
        async move {
            ts.req(
                Method::POST,
                &format!("{V3}/login"),
                None,
                Some(json!({ "type": "org.matrix.login.jwt", "token": t })),
            )
            .await
        }
    };
    let (status, body) = login("known").await;
    assert_eq!(
        (status, &body["user_id"]),
        (StatusCode::OK, &json!("@known:localhost"))
    );
    assert_err(&login("stranger").await, 403, "M_FORBIDDEN");
    assert!(!ts
        .services()
        .accounts
        .exists(&ruma::UserId::parse("@stranger:localhost").unwrap())
        .unwrap());
}

#[test]
fn sso_config_is_checked_at_load() {
    use hafen::config::from_toml_str;
    let provider = "[[global.oidc_providers]]\nidp_id = \"corp\"\nidp_name = \"Corp\"\nissuer = \"https://idp.example\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
    // No public URL to build the callback from.
    let e = from_toml_str(provider, Vec::new()).err().expect("refused");
    assert!(e.to_string().contains("public_baseurl"), "{e}");
    let ok = format!("[global]\npublic_baseurl = \"https://matrix.example\"\n{provider}");
    let l = from_toml_str(&ok, Vec::new()).expect("loads");
    assert_eq!(
        l.config.oidc_providers[0].localpart_claim,
        "preferred_username"
    );
    assert_eq!(
        l.config.oidc_providers[0].client_auth_method,
        "client_secret_basic"
    );
    assert!(l.config.oidc_providers[0].auto_provision);
    let bad_id = ok.replace("idp_id = \"corp\"", "idp_id = \"Corp Login\"");
    assert!(from_toml_str(&bad_id, Vec::new()).is_err());
    let no_secret = ok.replace("client_secret = \"s\"\n", "");
    assert!(from_toml_str(&no_secret, Vec::new()).is_err());
    let js = ok.replace(
        "[global]\n",
        "[global]\nsso_client_allowlist = [\"javascript:\"]\n",
    );
    let e = from_toml_str(&js, Vec::new()).err().expect("refused");
    assert!(e.to_string().contains("sso_client_allowlist"), "{e}");
    let e = from_toml_str("[global.jwt]\nalgorithm = \"HS256\"\n", Vec::new())
        .err()
        .expect("refused");
    assert!(e.to_string().contains("secret"), "{e}");
    let e = from_toml_str(
        "[global.jwt]\nalgorithm = \"RS256\"\nsecret = \"x\"\n",
        Vec::new(),
    )
    .err()
    .expect("refused");
    assert!(e.to_string().contains("key_file"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sso_users_pass_user_interactive_auth_through_the_sso_stage() {
    let idp = start_idp().await;
    let ts = sso_server(&idp, |_| {}).await;
    idp.next_user(json!({ "sub": "f-1", "preferred_username": "frank" }));
    let first = sso_login(&ts).await;
    let second = sso_login(&ts).await;
    idp.next_user(json!({ "sub": "g-1", "preferred_username": "grace" }));
    sso_login(&ts).await;
    let token = first["access_token"].as_str().unwrap().to_owned();
    let other_device = second["device_id"].as_str().unwrap().to_owned();
    let delete = |auth: Option<Value>| {
        let ts = &ts;
        let token = token.clone();
        let path = format!("{V3}/devices/{other_device}");
        async move {
            let body = match auth {
                Some(a) => json!({ "auth": a }),
                None => json!({}),
            };
            ts.req(Method::DELETE, &path, Some(&token), Some(body))
                .await
        }
    };
    // A password-less SSO user is offered the SSO stage only.
    let (status, challenge) = delete(None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
    assert_eq!(challenge["flows"], json!([{ "stages": ["m.login.sso"] }]));
    let session = challenge["session"].as_str().unwrap().to_owned();
    // Claiming the stage without doing it does not work.
    let (status, body) = delete(Some(json!({ "type": "m.login.sso", "session": session }))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["errcode"], json!("M_FORBIDDEN"));
    // The fallback link first says what is being confirmed and goes to the provider only when
    // the user continues (the link may come from someone else holding a session).
    let first = format!("{V3}/auth/m.login.sso/fallback/web?session={session}");
    let res = browser()
        .get(format!("{}{first}", ts.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().get("set-cookie").is_none());
    let page = res.text().await.unwrap();
    assert!(page.contains("Confirm a sensitive action"), "{page}");
    assert!(page.contains("Continue only if you started this action yourself"));
    let fallback = format!("{first}&confirm=1");
    assert!(page.contains(&fallback.replace('&', "&amp;")), "{page}");
    // Signing in at the provider as somebody else does not complete it.
    let (url, cookie) = through_idp(&ts, &fallback).await;
    let (status, _, page) = callback(&url, Some(&cookie)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{page}");
    assert!(page.contains("someone else"), "{page}");
    let (status, _) = delete(Some(json!({ "session": session }))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // As themself: the fallback page says "done" and the retried request goes through.
    idp.next_user(json!({ "sub": "f-1" }));
    let (url, cookie) = through_idp(&ts, &fallback).await;
    let (status, _, page) = callback(&url, Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains("onAuthDone") && page.contains("authDone"),
        "{page}"
    );
    let (status, body) = delete(Some(json!({ "session": session }))).await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));
    let (status, devices) = ts
        .req(Method::GET, &format!("{V3}/devices"), Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(devices["devices"].as_array().unwrap().len(), 1, "{devices}");
    // No such session; a stage without a fallback.
    let res = browser()
        .get(format!(
            "{}{V3}/auth/m.login.sso/fallback/web?session=nope",
            ts.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert!(res
        .text()
        .await
        .unwrap()
        .contains("unknown or expired session"));
    let r = ts
        .req(
            Method::GET,
            &format!("{V3}/auth/m.login.password/fallback/web?session=x"),
            None,
            None,
        )
        .await;
    assert_err(&r, 404, "M_UNRECOGNIZED");
    // A user with a password keeps the password stage as well.
    let pw = ts.user("henry").await;
    let (status, challenge) = ts
        .req(
            Method::DELETE,
            &format!("{V3}/devices/{}", pw.device_id),
            Some(&pw.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge["flows"],
        json!([{ "stages": ["m.login.password"] }])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_forgets_the_provider_link_and_claims_and_the_report_shows_sso() {
    let idp = start_idp().await;
    let ts = sso_server(&idp, |c| {
        c.jwt = Some(toml::from_str("secret = \"short\"").unwrap());
    })
    .await;
    idp.next_user(json!({ "sub": "e-1", "preferred_username": "ida", "groups": ["x"] }));
    let login = sso_login(&ts).await;
    let user = ruma::UserId::parse("@ida:localhost").unwrap();
    let s = ts.services();
    assert!(hafen::policy::claims::get(&s.storage, &user)
        .unwrap()
        .is_some());
    assert_eq!(
        hafen::service::sso::mapping::linked(s, "corp", "e-1").unwrap(),
        Some(user.clone())
    );
    // The user erases their account (the SSO stage stands in for the password).
    let token = login["access_token"].as_str().unwrap().to_owned();
    let (status, challenge) = ts
        .req(
            Method::POST,
            &format!("{V3}/account/deactivate"),
            Some(&token),
            Some(json!({ "erase": true })),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let session = challenge["session"].as_str().unwrap().to_owned();
    let (url, cookie) = through_idp(
        &ts,
        &format!("{V3}/auth/m.login.sso/fallback/web?session={session}&confirm=1"),
    )
    .await;
    let (status, _, page) = callback(&url, Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let (status, body) = ts
        .req(
            Method::POST,
            &format!("{V3}/account/deactivate"),
            Some(&token),
            Some(json!({ "erase": true, "auth": { "session": session } })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(hafen::policy::claims::get(&s.storage, &user)
        .unwrap()
        .is_none());
    assert_eq!(
        hafen::service::sso::mapping::linked(s, "corp", "e-1").unwrap(),
        None
    );
    // Logging in again through the provider does not revive the erased account: the name is
    // taken, so a new one is made.
    assert_eq!(sso_login(&ts).await["user_id"], json!("@ida1:localhost"));

    ts.user("root").await;
    s.accounts
        .set_admin(&ruma::UserId::parse("@root:localhost").unwrap(), true)
        .unwrap();
    // hafen audit: A4 lists the provider and falls short for plain http and the weak JWT setup.
    let report = hafen::policy::report::compliance_report(&s.config, Some(&s.storage)).unwrap();
    let a4 = report.rows.iter().find(|r| r.id == "A4").unwrap();
    assert_eq!(a4.status, hafen::policy::report::Status::FallsShort);
    let text = a4.findings.join("\n");
    assert!(text.contains("`corp` is reached without TLS"), "{text}");
    assert!(text.contains("shorter than 32 bytes"), "{text}");
    assert!(text.contains("does not check the audience"), "{text}");
    let d1 = report.rows.iter().find(|r| r.id == "D1").unwrap();
    assert_eq!(
        d1.status,
        hafen::policy::report::Status::Met,
        "{:?}",
        d1.findings
    );
    assert!(
        d1.findings
            .iter()
            .any(|f| f.contains("central identity management")),
        "{:?}",
        d1.findings
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_providers_get_a_choice_page_and_client_secret_post_works() {
    let idp = start_idp().await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{CLIENT_SECRET}\n")).unwrap();
    let mut second = provider(&idp);
    second.idp_id = "corp-post".into();
    second.idp_name = "Corp <post>".into();
    second.idp_icon = None;
    second.client_secret = None;
    second.client_secret_file = Some(secret_file);
    second.client_auth_method = "client_secret_post".into();
    let ts = sso_server(&idp, move |c| c.oidc_providers.push(second)).await;
    let (status, flows) = ts
        .req(Method::GET, &format!("{V3}/login"), None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        flows["flows"][2]["identity_providers"],
        json!([
            { "id": "corp", "name": "Corp login", "icon": "mxc://localhost/icon" },
            { "id": "corp-post", "name": "Corp <post>" },
        ])
    );
    // Without an idpId: a page to choose, names escaped.
    let res = browser()
        .get(format!(
            "{}{V3}/login/sso/redirect?redirectUrl=https%3A%2F%2Fclient.example%2F",
            ts.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let page = res.text().await.unwrap();
    assert!(
        page.contains("/login/sso/redirect/corp-post?redirectUrl=https%3A%2F%2Fclient.example%2F"),
        "{page}"
    );
    assert!(
        page.contains("Corp &lt;post&gt;") && !page.contains("<post>"),
        "{page}"
    );
    // The secret from the file, sent in the form body.
    idp.next_user(json!({ "sub": "p-1", "preferred_username": "paula" }));
    let (url, cookie) = to_callback(&ts, "corp-post", "https://client.example/").await;
    let (status, loc, body) = callback(&url, Some(&cookie)).await;
    assert_eq!(status, StatusCode::FOUND, "{body}");
    let loc = loc.unwrap();
    let token =
        query_map(&url::Url::parse(&loc).unwrap().query().map(str::to_owned))["loginToken"].clone();
    let (status, login) = token_login(&ts, &token).await;
    assert_eq!(
        (status, &login["user_id"]),
        (StatusCode::OK, &json!("@paula:localhost"))
    );
    let logins = audit_entries(&ts, "login");
    assert_eq!(logins.len(), 1);
    assert_eq!(logins[0].detail, json!({ "method": "sso:corp-post" }));
    // The same provider user through the other provider entry is another identity.
    let (url, cookie) = to_callback(&ts, "corp", "https://client.example/").await;
    let (status, _, body) = callback(&url, Some(&cookie)).await;
    assert_eq!(status, StatusCode::FOUND, "{body}");
    assert!(ts
        .services()
        .accounts
        .exists(&ruma::UserId::parse("@paula1:localhost").unwrap())
        .unwrap());
}

/// What a provider's user may not get: a name a bridge reserved (a free numbered one is taken
/// instead), an account another identity of the provider is linked to, a bridge's account; a
/// JWT may not name a bridge's user either; an allowlist entry without a path covers only its
/// own host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sso_and_jwt_cannot_take_reserved_or_linked_accounts() {
    let idp = start_idp().await;
    let dir = tempfile::tempdir().unwrap();
    let registration = dir.path().join("bridge.yaml");
    std::fs::write(
        &registration,
        "id: bridge\nurl: null\nas_token: bridge-as-token-secret\nhs_token: bridge-hs-token-secret\nsender_localpart: bridgebot\nnamespaces:\n  users:\n    - exclusive: true\n      regex: \"@bridge_[a-z]+:localhost\"\n",
    )
    .unwrap();
    let ts = sso_server(&idp, |c| {
        c.oidc_providers[0].allow_existing_users = true;
        c.app_service_config_files = vec![registration.clone()];
        c.sso_client_allowlist.push("https://app.example".into());
        c.jwt = Some(toml::from_str(&format!("secret = \"{JWT_SECRET}\"")).unwrap());
    })
    .await;
    ts.user("alice").await;

    // A name in the bridge's exclusive namespace: the next free name outside it.
    idp.next_user(json!({ "sub": "p-1", "preferred_username": "bridge_bob" }));
    assert_eq!(
        sso_login(&ts).await["user_id"],
        json!("@bridge_bob1:localhost")
    );

    // An existing account is linked once; another identity with the same name is refused.
    idp.next_user(json!({ "sub": "a-1", "preferred_username": "alice" }));
    assert_eq!(sso_login(&ts).await["user_id"], json!("@alice:localhost"));
    idp.next_user(json!({ "sub": "a-2", "preferred_username": "Alice" }));
    let (url, cookie) = to_callback(&ts, "corp", "https://client.example/").await;
    let (status, _, page) = callback(&url, Some(&cookie)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{page}");
    assert!(page.contains("linked to another user"), "{page}");
    // The first identity still logs in; the bridge's own account is never linked.
    idp.next_user(json!({ "sub": "a-1", "preferred_username": "whatever" }));
    assert_eq!(sso_login(&ts).await["user_id"], json!("@alice:localhost"));
    idp.next_user(json!({ "sub": "b-1", "preferred_username": "bridgebot" }));
    let (url, cookie) = to_callback(&ts, "corp", "https://client.example/").await;
    let (status, _, page) = callback(&url, Some(&cookie)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{page}");
    assert!(page.contains("belongs to a bridge"), "{page}");

    // JWT naming a bridge user (existing or not) is refused and audited.
    for uid in ["bridgebot", "bridge_carl"] {
        let t = jwt(json!({ "sub": uid, "exp": now() + 60 }), JWT_SECRET);
        let got = ts
            .req(
                Method::POST,
                &format!("{V3}/login"),
                None,
                Some(json!({ "type": "org.matrix.login.jwt", "token": t })),
            )
            .await;
        assert_err(&got, 403, "M_FORBIDDEN");
    }
    assert!(!ts
        .services()
        .accounts
        .exists(&ruma::UserId::parse("@bridge_carl:localhost").unwrap())
        .unwrap());
    assert!(audit_entries(&ts, "login_failed")
        .iter()
        .any(|e| e.detail["reason"] == json!("reserved")));

    // `https://app.example` covers that host only: a look-alike host, or the name as user info
    // before another host, gets the confirmation page instead of the token.
    idp.next_user(json!({ "sub": "p-1", "preferred_username": "bridge_bob" }));
    let (url, cookie) = to_callback(&ts, "corp", "https://app.example/home").await;
    let (status, loc, _) = callback(&url, Some(&cookie)).await;
    assert_eq!(status, StatusCode::FOUND);
    assert!(loc
        .unwrap()
        .starts_with("https://app.example/home?loginToken="));
    for evil in [
        "https://app.example.evil.test/",
        "https://app.example@evil.test/",
    ] {
        let (url, cookie) = to_callback(&ts, "corp", evil).await;
        let (status, loc, page) = callback(&url, Some(&cookie)).await;
        assert_eq!(status, StatusCode::OK, "{evil}: {page}");
        assert!(loc.is_none());
        assert!(page.contains("Continue to your client?"), "{page}");
    }
}
