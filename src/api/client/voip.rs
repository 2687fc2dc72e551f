//! `GET /voip/turnServer`: TURN credentials for calls, from the `turn_*` config keys.

use std::sync::Arc;

use axum::{extract::State, routing::get, Json, Router};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

use crate::{api::ruma_wrapper::Authed, error::Result, service::Services, utils};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route("/_matrix/client/v3/voip/turnServer", get(turn_server))
        .route("/_matrix/client/r0/voip/turnServer", get(turn_server))
}

async fn turn_server(State(s): State<Arc<Services>>, Authed(who): Authed) -> Result<Json<Value>> {
    let c = &s.config;
    if c.turn_uris.is_empty() {
        // No TURN server: clients fall back to direct connections.
        return Ok(Json(json!({})));
    }
    let (username, password) = match &c.turn_secret {
        Some(secret) => {
            // coturn's shared-secret scheme: the user name carries the expiry, the password is
            // the HMAC-SHA1 of the user name.
            let expiry = (utils::now_ms() / 1000).saturating_add(c.turn_ttl);
            let username = format!("{expiry}:{}", who.user_id);
            let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes())
                .map_err(crate::error::Error::internal)?;
            mac.update(username.as_bytes());
            let password =
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            (username, password)
        }
        None => (
            c.turn_username.clone().unwrap_or_default(),
            c.turn_password.clone().unwrap_or_default(),
        ),
    };
    Ok(Json(json!({
        "username": username,
        "password": password,
        "uris": c.turn_uris,
        "ttl": c.turn_ttl,
    })))
}
