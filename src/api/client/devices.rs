//! Device management: list, show, rename, delete (deletion re-authenticates with the password).
//! Appservices (spec v1.17, MSC4190) create their users' devices with `PUT` (201) and delete
//! them without re-authentication.

use std::sync::Arc;

use axum::{
    extract::State,
    routing::{get, post},
    Json, Router,
};
use serde_json::{json, Map, Value};

use super::account::{both, opt_str, Segs};
use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{Error, Result},
    service::{accounts::DeviceRecord, Services},
};

/// Most devices one `delete_devices` request may name.
const MAX_DELETE: usize = 1000;
/// Longest device display name.
const MAX_NAME_LEN: usize = 1024;

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = both(r, "/devices", get(list));
    let r = both(
        r,
        "/devices/{device_id}",
        get(show).put(update).delete(delete_one),
    );
    both(r, "/delete_devices", post(delete_many))
}

fn device_json(d: &DeviceRecord) -> Value {
    let mut v = json!({ "device_id": d.device_id });
    if let Some(n) = &d.display_name {
        v["display_name"] = json!(n);
    }
    if let Some(ip) = &d.last_seen_ip {
        v["last_seen_ip"] = json!(ip);
    }
    if let Some(ts) = d.last_seen_ts {
        v["last_seen_ts"] = json!(ts);
    }
    v
}

async fn list(State(s): State<Arc<Services>>, Authed(id): Authed) -> Result<Json<Value>> {
    let devices: Vec<Value> = s
        .accounts
        .devices(&id.user_id)?
        .iter()
        .map(device_json)
        .collect();
    Ok(Json(json!({ "devices": devices })))
}

async fn show(State(s): State<Arc<Services>>, Authed(id): Authed, p: Segs) -> Result<Json<Value>> {
    let device = s
        .accounts
        .device(&id.user_id, p.get(0)?.into())?
        .ok_or_else(|| Error::not_found("Unknown device"))?;
    Ok(Json(device_json(&device)))
}

async fn update(
    State(s): State<Arc<Services>>,
    Authed(id): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<(http::StatusCode, Json<Value>)> {
    let name = opt_str(&body, "display_name")?;
    if name.as_ref().is_some_and(|n| n.len() > MAX_NAME_LEN) {
        return Err(Error::invalid_param("Display name is too long"));
    }
    let device_id = p.get(0)?;
    let Some(mut device) = s.accounts.device(&id.user_id, device_id.into())? else {
        if id.appservice.is_none() {
            return Err(Error::not_found("Unknown device"));
        }
        if device_id.is_empty() || device_id.len() > 255 {
            return Err(Error::invalid_param("Invalid device id"));
        }
        // An appservice makes a device for its user (without an access token of its own: the
        // appservice acts through it with `device_id`).
        crate::policy::access::check_device_limit(&s, &id.user_id, Some(device_id.into()))?;
        s.accounts
            .create_device_without_tokens(&id.user_id, device_id.into(), name)?;
        s.accounts
            .audit_note("device_created", &id.user_id, device_id.into());
        return Ok((http::StatusCode::CREATED, Json(json!({}))));
    };
    if body.contains_key("display_name") {
        device.display_name = name;
        s.accounts.update_device(&id.user_id, &device)?;
    }
    Ok((http::StatusCode::OK, Json(json!({}))))
}

fn auth_of(body: &Map<String, Value>) -> Option<&Value> {
    body.get("auth")
}

/// Deleting devices re-authenticates (password, or SSO for accounts linked to a provider),
/// except for an appservice (spec v1.17).
fn reauth(
    s: &Services,
    id: &crate::service::accounts::Identity,
    body: &Map<String, Value>,
) -> Result<()> {
    if id.appservice.is_some() {
        return Ok(());
    }
    s.uiaa.reauth(s, &id.user_id, auth_of(body))
}

async fn delete_one(
    State(s): State<Arc<Services>>,
    Authed(id): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let device_id = p.get(0)?;
    if s.accounts.device(&id.user_id, device_id.into())?.is_none() {
        return Err(Error::not_found("Unknown device"));
    }
    reauth(&s, &id, &body)?;
    if let Some(count) = s.accounts.remove_device(&id.user_id, device_id.into())? {
        crate::service::federation::edu::device_deleted(&s, &id.user_id, device_id.into(), count);
    }
    Ok(Json(json!({})))
}

async fn delete_many(
    State(s): State<Arc<Services>>,
    Authed(id): Authed,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let devices = match body.get("devices") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(Error::bad_json("'devices' must be an array of strings")),
        None => {
            return Err(Error::new(
                crate::error::ErrCode::MissingParam,
                "Missing 'devices'",
            ))
        }
    };
    if devices.len() > MAX_DELETE {
        return Err(Error::invalid_param("Too many devices in one request"));
    }
    let mut ids = Vec::with_capacity(devices.len());
    for d in devices {
        ids.push(
            d.as_str()
                .ok_or_else(|| Error::bad_json("'devices' must be an array of strings"))?,
        );
    }
    reauth(&s, &id, &body)?;
    for d in ids {
        if let Some(count) = s.accounts.remove_device(&id.user_id, d.into())? {
            crate::service::federation::edu::device_deleted(&s, &id.user_id, d.into(), count);
        }
    }
    Ok(Json(json!({})))
}
