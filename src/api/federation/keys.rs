//! `GET /_matrix/key/v2/server` (the server's signing keys, signed by itself) and
//! `GET /_matrix/federation/v1/version`.

use std::sync::Arc;

use axum::{extract::State, routing::get, Json, Router};
use serde_json::{json, Value};

use crate::{error::Result, service::Services};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route("/_matrix/key/v2/server", get(server_keys))
        // Deprecated form with a key id; the answer is the same.
        .route("/_matrix/key/v2/server/{key_id}", get(server_keys))
        .route("/_matrix/federation/v1/version", get(version))
}

async fn server_keys(State(s): State<Arc<Services>>) -> Result<Json<Value>> {
    Ok(Json(s.server_keys.signed_response()?))
}

async fn version() -> Json<Value> {
    Json(json!({ "server": { "name": "hafen", "version": env!("CARGO_PKG_VERSION") } }))
}
