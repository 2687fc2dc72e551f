//! Sessions: login (password, an appservice as its user, `m.login.token` after SSO,
//! `org.matrix.login.jwt`), token refresh, logout. The SSO redirects are in `sso.rs`.

use std::sync::Arc;

use axum::{
    extract::State,
    routing::{get, post},
    Json, Router,
};
use http::StatusCode;
use serde_json::{json, Value};

use super::account::{both, opt_bool, opt_str, session_json, ClientIp};
use crate::{
    api::ruma_wrapper::{Authed, JsonBody, RawToken},
    error::{ErrCode, Error, Result},
    service::{accounts, sso, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = both(r, "/login", get(login_flows).post(login));
    let r = both(r, "/refresh", post(refresh));
    let r = both(r, "/logout", post(logout));
    both(r, "/logout/all", post(logout_all))
}

/// Passwords and appservices logging in as their users always; SSO with its providers and login tokens when SSO is configured; JWT when
/// `[global.jwt]` is set.
async fn login_flows(State(s): State<Arc<Services>>) -> Json<Value> {
    let mut flows = vec![
        json!({ "type": "m.login.password" }),
        json!({ "type": "m.login.application_service" }),
    ];
    if s.sso.enabled() {
        let idps: Vec<Value> = s
            .sso
            .providers
            .iter()
            .map(|p| {
                let mut v = json!({ "id": p.conf.idp_id, "name": p.conf.idp_name });
                if let Some(icon) = &p.conf.idp_icon {
                    v["icon"] = json!(icon);
                }
                if let Some(brand) = &p.conf.idp_brand {
                    v["brand"] = json!(brand);
                }
                v
            })
            .collect();
        flows.push(json!({ "type": "m.login.sso", "identity_providers": idps }));
        flows.push(json!({ "type": "m.login.token" }));
    }
    if s.sso.jwt.is_some() {
        flows.push(json!({ "type": "org.matrix.login.jwt" }));
    }
    Json(json!({ "flows": flows }))
}

/// What every login type reads besides its credential.
fn device_request(
    body: &serde_json::Map<String, Value>,
    ip: Option<std::net::IpAddr>,
) -> Result<sso::login::DeviceRequest> {
    let device_id = opt_str(body, "device_id")?;
    if device_id
        .as_ref()
        .is_some_and(|d| d.is_empty() || d.len() > 255)
    {
        return Err(Error::invalid_param("Invalid device_id"));
    }
    Ok(sso::login::DeviceRequest {
        device_id: device_id.map(Into::into),
        display_name: opt_str(body, "initial_device_display_name")?,
        with_refresh: opt_bool(body, "refresh_token")?.unwrap_or(false),
        ip,
    })
}

async fn login(
    State(s): State<Arc<Services>>,
    ClientIp(ip): ClientIp,
    token: RawToken,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let kind = opt_str(&body, "type")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing login 'type'"))?;
    match kind.as_str() {
        "m.login.token" if s.sso.enabled() => {
            let token = opt_str(&body, "token")?
                .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing 'token'"))?;
            let d = device_request(&body, ip)?;
            return Ok(Json(session_json(&sso::login::token_login(&s, &token, d)?)));
        }
        "org.matrix.login.jwt" if s.sso.jwt.is_some() => {
            let token = opt_str(&body, "token")?;
            let d = device_request(&body, ip)?;
            let session = sso::login::jwt_login(&s, token.as_deref(), d).await?;
            return Ok(Json(session_json(&session)));
        }
        _ => {}
    }
    let appservice = match kind.as_str() {
        "m.login.application_service" => Some(token.appservice(&s)?),
        _ => None,
    };
    if kind != "m.login.password" && appservice.is_none() {
        return Err(Error::with_status(
            ErrCode::Unknown,
            StatusCode::BAD_REQUEST,
            "Unsupported login type",
        ));
    }
    // The user: `identifier` of type m.id.user, or the deprecated top-level `user`.
    let name = match body.get("identifier") {
        Some(Value::Object(ident)) => {
            match ident.get("type").and_then(Value::as_str) {
                Some("m.id.user") => {}
                Some(_) => {
                    return Err(Error::with_status(
                        ErrCode::Unknown,
                        StatusCode::BAD_REQUEST,
                        "Unsupported identifier type",
                    ))
                }
                None => return Err(Error::bad_json("Identifier has no 'type'")),
            }
            opt_str(ident, "user")?
        }
        Some(Value::Null) | None => opt_str(&body, "user")?,
        Some(_) => return Err(Error::bad_json("'identifier' must be an object")),
    }
    .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing user identifier"))?;
    if let Some(appservice) = appservice {
        let device_id = opt_str(&body, "device_id")?;
        if device_id
            .as_ref()
            .is_some_and(|d| d.is_empty() || d.len() > 255)
        {
            return Err(Error::invalid_param("Invalid device_id"));
        }
        let session = accounts::appservice_login(
            &s,
            &appservice,
            &name,
            device_id.map(Into::into),
            opt_str(&body, "initial_device_display_name")?,
            opt_bool(&body, "refresh_token")?.unwrap_or(false),
            ip,
        )?;
        return Ok(Json(session_json(&session)));
    }
    let password = opt_str(&body, "password")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing 'password'"))?;
    let device_id = opt_str(&body, "device_id")?;
    if device_id
        .as_ref()
        .is_some_and(|d| d.is_empty() || d.len() > 255)
    {
        return Err(Error::invalid_param("Invalid device_id"));
    }
    let session = accounts::password_login(
        &s,
        &name,
        &password,
        device_id.map(Into::into),
        opt_str(&body, "initial_device_display_name")?,
        opt_bool(&body, "refresh_token")?.unwrap_or(false),
        ip,
    )?;
    Ok(Json(session_json(&session)))
}

async fn refresh(State(s): State<Arc<Services>>, JsonBody(body): JsonBody) -> Result<Json<Value>> {
    let token = opt_str(&body, "refresh_token")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing 'refresh_token'"))?;
    let session = s.accounts.refresh(&token)?;
    let mut v = json!({ "access_token": session.access_token });
    if let Some(r) = session.refresh_token {
        v["refresh_token"] = json!(r);
    }
    if let Some(ms) = session.expires_in_ms {
        v["expires_in_ms"] = json!(ms);
    }
    Ok(Json(v))
}

async fn logout(State(s): State<Arc<Services>>, Authed(id): Authed) -> Result<Json<Value>> {
    s.accounts.audit_note("logout", &id.user_id, &id.device_id);
    if let Some(count) = s.accounts.remove_device(&id.user_id, &id.device_id)? {
        crate::service::federation::edu::device_deleted(&s, &id.user_id, &id.device_id, count);
    }
    Ok(Json(json!({})))
}

async fn logout_all(State(s): State<Arc<Services>>, Authed(id): Authed) -> Result<Json<Value>> {
    let mut e = s.audit.entry(
        "logout",
        Some(id.user_id.as_str()),
        Some(id.device_id.as_str()),
    );
    e.detail = json!({ "all_devices": true });
    s.audit.note(e);
    s.accounts.remove_all_devices(&id.user_id, None)?;
    Ok(Json(json!({})))
}
