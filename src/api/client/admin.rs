//! `GET /admin/whois/{userId}`: a user's devices and where they connected from, for server
//! admins and the user themself.

use std::sync::Arc;

use axum::{extract::State, routing::get, Json, Router};
use serde_json::{json, Map, Value};

use super::account::Segs;
use crate::{
    api::ruma_wrapper::Authed,
    error::{Error, Result},
    service::Services,
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route("/_matrix/client/v3/admin/whois/{user_id}", get(whois))
        .route("/_matrix/client/r0/admin/whois/{user_id}", get(whois))
}

async fn whois(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    let user = super::user_id(p.get(0)?)?;
    if user != who.user_id && !who.admin {
        return Err(Error::forbidden("Only server admins may look up other users"));
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
