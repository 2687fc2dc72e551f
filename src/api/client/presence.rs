//! Presence: `GET/PUT /presence/{userId}/status`. With presence disabled by policy, PUT is
//! accepted and ignored and everybody reads as offline (as Synapse does).

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    routing::get,
    Json, Router,
};
use serde_json::{json, Value};

use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{ErrCode, Error, Result},
    service::Services,
};

/// Longest status message kept.
const MAX_STATUS_MSG: usize = 1024;

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route(
        "/_matrix/client/v3/presence/{user_id}/status",
        get(get_presence).put(set_presence),
    )
    .route(
        "/_matrix/client/r0/presence/{user_id}/status",
        get(get_presence).put(set_presence),
    )
}

async fn set_presence(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path(user_id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    super::own_user(&who, &user_id, "Cannot set the presence of another user")?;
    let presence = match body.get("presence") {
        Some(Value::String(p)) if matches!(p.as_str(), "online" | "offline" | "unavailable") => {
            p.clone()
        }
        Some(_) => {
            return Err(Error::invalid_param(
                "'presence' must be online, offline or unavailable",
            ))
        }
        None => return Err(Error::new(ErrCode::MissingParam, "Missing 'presence'")),
    };
    let status_msg = match body.get("status_msg") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) if m.len() <= MAX_STATUS_MSG => Some(m.clone()),
        Some(Value::String(_)) => {
            return Err(Error::new(ErrCode::TooLarge, "'status_msg' is too long"))
        }
        Some(_) => return Err(Error::bad_json("'status_msg' must be a string")),
    };
    if s.policy.presence_enabled() {
        let changed = s
            .presence
            .set(&who.user_id, &presence, Some(status_msg), || {
                crate::service::sync::room_mates(&s, &who.user_id)
            })?;
        if changed {
            if let Err(e) = crate::service::appservice::ephemeral::presence(&s, &who.user_id) {
                tracing::warn!("queueing presence for appservices: {e}");
            }
            if let Err(e) = crate::service::federation::edu::send_presence(&s, &who.user_id) {
                tracing::warn!("queueing presence: {e}");
            }
        }
    }
    Ok(Json(json!({})))
}

async fn get_presence(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path(user_id): Path<String>,
) -> Result<Json<Value>> {
    let user_id = super::user_id(&user_id)?;
    if user_id.server_name() == s.globals.server_name && !s.accounts.exists(&user_id)? {
        return Err(Error::not_found("Unknown user"));
    }
    if !s.policy.presence_enabled() {
        return Ok(Json(json!({ "presence": "offline" })));
    }
    // Presence is shared with those who share a room, and with oneself.
    if user_id != who.user_id
        && !crate::service::sync::room_mates(&s, &who.user_id)?.contains(&user_id)
    {
        return Err(Error::forbidden(
            "You are not allowed to see their presence",
        ));
    }
    match s.presence.get(&user_id)? {
        Some(state) => Ok(Json(state.content())),
        None => Ok(Json(json!({ "presence": "offline" }))),
    }
}
