//! Server administration: `GET /admin/whois/{userId}` (a user's devices and where they
//! connected from, for server admins and the user themself) and account moderation
//! (`/admin/suspend/{userId}`, `/admin/lock/{userId}`, server admins only).

use std::sync::Arc;

use axum::{extract::State, routing::get, Json, Router};
use serde_json::{json, Map, Value};

use super::account::Segs;
use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{Error, Result},
    service::{accounts::Identity, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route("/_matrix/client/v3/admin/whois/{user_id}", get(whois))
        .route("/_matrix/client/r0/admin/whois/{user_id}", get(whois))
        .route(
            "/_matrix/client/v1/admin/suspend/{user_id}",
            get(get_moderation).put(set_moderation),
        )
        .route(
            "/_matrix/client/v1/admin/lock/{user_id}",
            get(get_moderation).put(set_moderation),
        )
}

async fn whois(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    let user = super::user_id(p.get(0)?)?;
    if user != who.user_id {
        if !who.admin {
            return Err(Error::forbidden(
                "Only server admins may look up other users",
            ));
        }
        super::admin_api::audit_admin(
            &s,
            &who,
            "GET /_matrix/client/v3/admin/whois/{userId}",
            Some(user.as_str()),
            true,
        );
    }
    if !s.accounts.exists(&user)? {
        return Err(Error::not_found("Unknown user"));
    }
    let mut devices = Map::new();
    for d in s.accounts.devices(&user)? {
        let mut connection = Map::new();
        if let Some(ip) = d.last_seen_ip {
            connection.insert("ip".into(), json!(ip));
        }
        if let Some(ts) = d.last_seen_ts {
            connection.insert("last_seen".into(), json!(ts));
        }
        if let Some(ua) = d.last_seen_user_agent {
            connection.insert("user_agent".into(), json!(ua));
        }
        let connections = if connection.is_empty() {
            json!([])
        } else {
            json!([connection])
        };
        devices.insert(
            d.device_id.to_string(),
            json!({ "sessions": [{ "connections": connections }] }),
        );
    }
    Ok(Json(json!({ "user_id": user, "devices": devices })))
}

/// `GET`/`PUT /_matrix/client/v1/admin/{suspend,lock}/{userId}`: the caller must be a server
/// admin (checked before the target is looked up, so nobody can probe for accounts), the target
/// a local, active account, and (to change it) not an admin.
fn moderation_target(s: &Services, who: &Identity, raw: &str) -> Result<ruma::OwnedUserId> {
    super::admin_api::audit_admin(
        s,
        who,
        "/_matrix/client/v1/admin/{suspend,lock}/{userId}",
        Some(raw),
        who.admin,
    );
    if !who.admin {
        return Err(Error::forbidden("Only server admins may moderate accounts"));
    }
    let user = super::user_id(raw)?;
    if user.server_name() != s.globals.server_name {
        return Err(Error::invalid_param("The user is not local to this server"));
    }
    match s.accounts.user(&user)? {
        Some(rec) if !rec.deactivated => Ok(user),
        _ => Err(Error::not_found("Unknown user")),
    }
}

fn moderation_field(path: &str) -> (&'static str, bool) {
    if path.contains("/admin/lock/") {
        ("locked", true)
    } else {
        ("suspended", false)
    }
}

async fn get_moderation(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    uri: axum::http::Uri,
    p: Segs,
) -> Result<Json<Value>> {
    let user = moderation_target(&s, &who, p.get(0)?)?;
    let (field, lock) = moderation_field(uri.path());
    let rec = s
        .accounts
        .user(&user)?
        .ok_or_else(|| Error::not_found("Unknown user"))?;
    let value = if lock { rec.locked } else { rec.suspended };
    Ok(Json(json!({ field: value })))
}

async fn set_moderation(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    uri: axum::http::Uri,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let user = moderation_target(&s, &who, p.get(0)?)?;
    let (field, lock) = moderation_field(uri.path());
    let value = match body.get(field) {
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Error::bad_json(format!("'{field}' must be a boolean"))),
        None => return Err(Error::bad_json(format!("Missing '{field}'"))),
    };
    if s.accounts.user(&user)?.is_some_and(|r| r.admin) {
        return Err(Error::forbidden(
            "Server admins cannot be suspended or locked",
        ));
    }
    s.accounts.set_moderation(&user, lock, value)?;
    Ok(Json(json!({ field: value })))
}
