//! Accounts: registration, username availability, registration tokens, whoami, password change,
//! deactivation, and the (disabled) third-party identifier endpoints. Also small helpers the
//! other handlers of this area share (paths for r0+v3, path segments, query, client address,
//! typed fields of a JSON body).

use std::{net::IpAddr, sync::Arc};

use axum::{
    extract::{FromRequestParts, Path, RawQuery, State},
    routing::{get, post, MethodRouter},
    Json, Router,
};
use serde_json::{json, Map, Value};

use crate::{
    api::ruma_wrapper::{Authed, JsonBody, RawToken},
    error::{ErrCode, Error, Result},
    service::{accounts, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = both(r, "/register", post(register));
    let r = both(r, "/register/available", get(available));
    let r = r.route(
        "/_matrix/client/v1/register/m.login.registration_token/validity",
        get(token_validity),
    );
    let r = both(r, "/account/whoami", get(whoami));
    let r = both(r, "/account/password", post(change_password));
    let r = both(r, "/account/deactivate", post(deactivate));
    let r = both(
        r,
        "/account/3pid",
        get(get_3pids).post(threepid_denied_authed),
    );
    let mut r = r;
    for p in [
        "/account/3pid/add",
        "/account/3pid/bind",
        "/account/3pid/delete",
        "/account/3pid/unbind",
    ] {
        r = both(r, p, post(threepid_denied_authed));
    }
    for p in [
        "/register/email/requestToken",
        "/register/msisdn/requestToken",
        "/account/password/email/requestToken",
        "/account/password/msisdn/requestToken",
        "/account/3pid/email/requestToken",
        "/account/3pid/msisdn/requestToken",
    ] {
        r = both(r, p, post(threepid_denied));
    }
    r
}

// ---- helpers shared by this area's handlers ----

/// Register `method` on the v3 and the legacy r0 path of a client endpoint.
pub(super) fn both(
    r: Router<Arc<Services>>,
    suffix: &str,
    method: MethodRouter<Arc<Services>>,
) -> Router<Arc<Services>> {
    r.route(&format!("/_matrix/client/v3{suffix}"), method.clone())
        .route(&format!("/_matrix/client/r0{suffix}"), method)
}

/// The path parameters, percent-decoded; a bad encoding is `M_INVALID_PARAM`, not axum's text.
pub(super) struct Segs(pub Vec<String>);

impl FromRequestParts<Arc<Services>> for Segs {
    type Rejection = Error;
    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &Arc<Services>,
    ) -> Result<Self> {
        Path::<Vec<String>>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| Segs(v))
            .map_err(|_| Error::invalid_param("Invalid path parameter"))
    }
}

impl Segs {
    pub fn get(&self, i: usize) -> Result<&str> {
        self.0
            .get(i)
            .map(String::as_str)
            .ok_or_else(|| Error::invalid_param("Missing path parameter"))
    }
}

/// The client's IP address (for rate limits and device info), when known.
pub(crate) struct ClientIp(pub Option<IpAddr>);

impl FromRequestParts<Arc<Services>> for ClientIp {
    type Rejection = Error;
    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &Arc<Services>,
    ) -> Result<Self> {
        Ok(ClientIp(crate::api::client_addr(&parts.extensions)))
    }
}

/// One query parameter (first occurrence).
pub(crate) fn query_param(q: &Option<String>, key: &str) -> Result<Option<String>> {
    let Some(q) = q else { return Ok(None) };
    let pairs: Vec<(String, String)> =
        serde_html_form::from_str(q).map_err(|_| Error::invalid_param("Invalid query string"))?;
    Ok(pairs.into_iter().find(|(k, _)| k == key).map(|(_, v)| v))
}

/// A non-negative integer query parameter, `default` when absent (`M_INVALID_PARAM` otherwise).
pub(super) fn uint_param(q: &Option<String>, key: &str, default: usize) -> Result<usize> {
    match query_param(q, key)? {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| Error::invalid_param(format!("{key} must be a non-negative integer"))),
    }
}

/// An optional string field; any other type is `M_BAD_JSON`.
pub(super) fn opt_str(body: &Map<String, Value>, key: &str) -> Result<Option<String>> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Error::bad_json(format!("'{key}' must be a string"))),
    }
}

/// An optional boolean field; any other type is `M_BAD_JSON`.
pub(super) fn opt_bool(body: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(Error::bad_json(format!("'{key}' must be a boolean"))),
    }
}

/// The login/registration answer the spec describes.
pub(super) fn session_json(s: &accounts::Session) -> Value {
    let mut v = json!({
        "user_id": s.user_id,
        "access_token": s.access_token,
        "device_id": s.device_id,
        "home_server": s.user_id.server_name(),
    });
    if let Some(r) = &s.refresh_token {
        v["refresh_token"] = json!(r);
    }
    if let Some(ms) = s.expires_in_ms {
        v["expires_in_ms"] = json!(ms);
    }
    v
}

// ---- handlers ----

async fn register(
    State(s): State<Arc<Services>>,
    ClientIp(ip): ClientIp,
    RawQuery(q): RawQuery,
    token: RawToken,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let guest = match query_param(&q, "kind")?.as_deref() {
        None | Some("user") => false,
        Some("guest") => true,
        Some(_) => return Err(Error::invalid_param("kind must be 'user' or 'guest'")),
    };
    let device_id = opt_str(&body, "device_id")?;
    if device_id
        .as_ref()
        .is_some_and(|d| d.is_empty() || d.len() > 255)
    {
        return Err(Error::invalid_param("Invalid device_id"));
    }
    let auth = match body.get("auth") {
        None | Some(Value::Null) => None,
        Some(a @ Value::Object(_)) => Some(a.clone()),
        Some(_) => return Err(Error::bad_json("'auth' must be an object")),
    };
    let r = accounts::Registration {
        username: opt_str(&body, "username")?,
        password: opt_str(&body, "password")?,
        device_id: device_id.map(Into::into),
        initial_device_display_name: opt_str(&body, "initial_device_display_name")?,
        inhibit_login: opt_bool(&body, "inhibit_login")?.unwrap_or(false),
        refresh_token: opt_bool(&body, "refresh_token")?.unwrap_or(false),
        guest,
        auth,
        ip,
    };
    let (user_id, session) =
        if opt_str(&body, "type")?.as_deref() == Some("m.login.application_service") {
            let appservice = token.appservice(&s)?;
            accounts::register_for_appservice(&s, &appservice, r)?
        } else {
            accounts::register(&s, r)?
        };
    Ok(Json(match session {
        Some(session) => session_json(&session),
        None => json!({ "user_id": user_id, "home_server": user_id.server_name() }),
    }))
}

/// Registration-related requests count against the client address' registration limit.
fn limit_registration(s: &Services, ip: Option<IpAddr>) -> Result<()> {
    match ip {
        Some(ip) => s
            .ratelimit
            .check_ip(crate::service::ratelimit::Action::Registration, ip),
        None => Ok(()),
    }
}

async fn available(
    State(s): State<Arc<Services>>,
    ClientIp(ip): ClientIp,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    limit_registration(&s, ip)?;
    let name = query_param(&q, "username")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing 'username'"))?;
    let id = s.accounts.validate_new_localpart(&name.to_lowercase())?;
    s.appservices.ensure_user_not_exclusive(&id, None)?;
    if s.accounts.exists(&id)? {
        return Err(Error::new(ErrCode::UserInUse, "User ID already taken"));
    }
    Ok(Json(json!({ "available": true })))
}

async fn token_validity(
    State(s): State<Arc<Services>>,
    ClientIp(ip): ClientIp,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    limit_registration(&s, ip)?;
    let token = query_param(&q, "token")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing 'token'"))?;
    if !accounts::registration_tokens_enabled(&s)? {
        return Err(Error::forbidden("Registration with tokens is disabled"));
    }
    let valid = token.len() <= 64
        && s.accounts
            .registration_token_valid(&token, s.config.registration_token.as_deref())?;
    Ok(Json(json!({ "valid": valid })))
}

async fn whoami(Authed(id): Authed) -> Json<Value> {
    let mut body = json!({ "user_id": id.user_id, "is_guest": id.guest });
    // An appservice acting without a device has none to report (the spec leaves it out).
    let deviceless = id.appservice.is_some()
        && id.device_id.as_str() == crate::api::ruma_wrapper::APPSERVICE_DEVICE;
    if !deviceless {
        body["device_id"] = json!(id.device_id);
    }
    Json(body)
}

async fn change_password(
    State(s): State<Arc<Services>>,
    Authed(id): Authed,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let new_password = opt_str(&body, "new_password")?;
    let logout_devices = opt_bool(&body, "logout_devices")?.unwrap_or(true);
    if new_password
        .as_ref()
        .is_some_and(|p| p.len() > accounts::MAX_PASSWORD_LEN)
    {
        return Err(Error::invalid_param("Password is too long"));
    }
    s.uiaa.reauth(&s, &id.user_id, body.get("auth"))?;
    let new_password =
        new_password.ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing 'new_password'"))?;
    s.accounts.set_password(&id.user_id, &new_password)?;
    if logout_devices {
        s.accounts
            .remove_all_devices(&id.user_id, Some(&id.device_id))?;
    }
    Ok(Json(json!({})))
}

async fn deactivate(
    State(s): State<Arc<Services>>,
    Authed(id): Authed,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let erase = opt_bool(&body, "erase")?.unwrap_or(false);
    s.uiaa.reauth(&s, &id.user_id, body.get("auth"))?;
    crate::policy::erasure::deactivate(&s, &id.user_id, erase).await?;
    Ok(Json(json!({ "id_server_unbind_result": "no-support" })))
}

async fn get_3pids(Authed(_): Authed) -> Json<Value> {
    Json(json!({ "threepids": [] }))
}

/// Third-party identifiers (email, phone) are off: Hafen stores no contact data.
async fn threepid_denied_authed(Authed(_): Authed) -> Error {
    Error::forbidden("Third-party identifiers are not supported on this server")
}

async fn threepid_denied() -> Error {
    Error::forbidden("Third-party identifiers are not supported on this server")
}
