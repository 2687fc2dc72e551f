//! Federation queries about local users' devices and keys, so that end-to-end encryption works
//! across servers: `/user/devices/{userId}`, `/user/keys/query`, `/user/keys/claim`.
//! The key logic is the client API's (`service::e2ee`).

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    routing::{get, post},
    Json, Router,
};
use serde_json::{json, Map, Value};

use super::Signed;
use crate::{
    error::{Error, Result},
    service::{e2ee, keys::CrossSigning, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route(
        "/_matrix/federation/v1/user/devices/{user_id}",
        get(devices),
    )
    .route("/_matrix/federation/v1/user/keys/query", post(keys_query))
    .route("/_matrix/federation/v1/user/keys/claim", post(keys_claim))
}

/// The body of a signed request as a JSON object (`M_BAD_JSON` otherwise).
fn object(signed: Signed) -> Result<Map<String, Value>> {
    match signed.body {
        Some(Value::Object(o)) => Ok(o),
        _ => Err(Error::bad_json("The body must be a JSON object")),
    }
}

/// Only local users are answered for: the asking server learns nothing of a third one.
fn local_only(s: &Services, mut body: Map<String, Value>, field: &str) -> Map<String, Value> {
    if let Some(Value::Object(users)) = body.get_mut(field) {
        users.retain(|user, _| {
            ruma::UserId::parse(user.as_str())
                .is_ok_and(|u| u.server_name() == s.globals.server_name)
        });
    }
    body
}

async fn keys_query(State(s): State<Arc<Services>>, signed: Signed) -> Result<Json<Value>> {
    let body = local_only(&s, object(signed)?, "device_keys");
    let mut answer = e2ee::query_keys_for(&s, None, &body)?;
    if let Some(o) = answer.as_object_mut() {
        o.remove("failures");
        o.remove("user_signing_keys");
    }
    Ok(Json(answer))
}

async fn keys_claim(State(s): State<Arc<Services>>, signed: Signed) -> Result<Json<Value>> {
    let body = local_only(&s, object(signed)?, "one_time_keys");
    let mut answer = e2ee::claim_keys(&s, &body)?;
    if let Some(o) = answer.as_object_mut() {
        o.remove("failures");
    }
    Ok(Json(answer))
}

async fn devices(
    State(s): State<Arc<Services>>,
    Path(user): Path<String>,
    _signed: Signed,
) -> Result<Json<Value>> {
    let user = ruma::UserId::parse(&user).map_err(|_| Error::invalid_param("Invalid user id"))?;
    if user.server_name() != s.globals.server_name {
        return Err(Error::invalid_param("The user is not local to this server"));
    }
    if !s.accounts.exists(&user)? {
        return Err(Error::not_found("Unknown user"));
    }
    let names: std::collections::BTreeMap<String, Option<String>> = s
        .accounts
        .devices(&user)?
        .into_iter()
        .map(|d| (d.device_id.to_string(), d.display_name))
        .collect();
    let mut devices = Vec::new();
    for (device_id, keys) in s.keys.all_device_keys(&user)? {
        let mut d = json!({ "device_id": device_id, "keys": keys });
        // Device names go to other servers only when the operator allows it.
        if let (true, Some(Some(name))) =
            (s.config.allow_device_name_federation, names.get(&device_id))
        {
            d["device_display_name"] = json!(name);
        }
        devices.push(d);
    }
    let mut out = json!({
        "user_id": user,
        "stream_id": s.globals.counter.watermark(),
        "devices": devices,
    });
    if let Some(k) = s.keys.cross_signing_key(&user, CrossSigning::Master)? {
        out["master_key"] = k;
    }
    if let Some(k) = s.keys.cross_signing_key(&user, CrossSigning::SelfSigning)? {
        out["self_signing_key"] = k;
    }
    Ok(Json(out))
}
