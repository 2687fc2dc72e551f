//! `GET /_matrix/key/v2/server` (the server's signing keys, signed by itself), the notary
//! `/_matrix/key/v2/query` (other servers' keys as we fetched them, countersigned) and
//! `GET /_matrix/federation/v1/version`.

use std::sync::Arc;

use axum::{extract::State, routing::get, Json, Router};
use serde_json::{json, Value};

use crate::{
    api::ruma_wrapper::JsonBody,
    error::{Error, Result},
    service::Services,
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route("/_matrix/key/v2/server", get(server_keys))
        // Deprecated form with a key id; the answer is the same.
        .route("/_matrix/key/v2/server/{key_id}", get(server_keys))
        .route("/_matrix/federation/v1/version", get(version))
        .route("/_matrix/key/v2/query", axum::routing::post(query_many))
        .route("/_matrix/key/v2/query/{server_name}", get(query_one))
}

async fn server_keys(State(s): State<Arc<Services>>) -> Result<Json<Value>> {
    Ok(Json(s.server_keys.signed_response()?))
}

async fn version() -> Json<Value> {
    Json(json!({ "server": { "name": "hafen", "version": crate::VERSION } }))
}

/// Servers one notary query may ask about.
const MAX_NOTARY_SERVERS: usize = 100;

/// The key documents of `servers`, countersigned by us; servers whose keys cannot be had (or
/// whom the policy shuts out) are left out, as the spec allows.
async fn notary(s: &Services, servers: Vec<String>) -> Result<Json<Value>> {
    let mut docs = Vec::new();
    for name in servers.into_iter().take(MAX_NOTARY_SERVERS) {
        let Ok(server) = ruma::OwnedServerName::try_from(name) else {
            continue;
        };
        let doc = if server == s.globals.server_name {
            s.server_keys.signed_response()?
        } else {
            match s.federation.key_document(&server).await {
                Ok(doc) => s.federation.countersign(doc)?,
                Err(_) => continue,
            }
        };
        docs.push(doc);
    }
    Ok(Json(json!({ "server_keys": docs })))
}

/// `GET /_matrix/key/v2/query/{serverName}`.
async fn query_one(
    State(s): State<Arc<Services>>,
    axum::extract::Path(server): axum::extract::Path<String>,
) -> Result<Json<Value>> {
    notary(&s, vec![server]).await
}

/// `POST /_matrix/key/v2/query` with `{"server_keys": {server: {key id: criteria}}}`.
async fn query_many(
    State(s): State<Arc<Services>>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let servers = match body.get("server_keys") {
        Some(Value::Object(m)) => m.keys().cloned().collect(),
        Some(_) => return Err(Error::bad_json("server_keys must be an object")),
        None => return Err(Error::bad_json("Missing server_keys")),
    };
    notary(&s, servers).await
}
