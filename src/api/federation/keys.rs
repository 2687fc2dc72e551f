//! `GET /_matrix/key/v2/server` (the server's signing keys, signed by itself), the notary
//! `/_matrix/key/v2/query` (other servers' keys as we fetched them, countersigned) and
//! `GET /_matrix/federation/v1/version`.

use std::{net::IpAddr, sync::Arc};

use axum::{extract::State, routing::get, Json, Router};
use serde_json::{json, Value};

use crate::{
    api::{client::ClientIp, ruma_wrapper::JsonBody},
    error::{Error, Result},
    service::{ratelimit::Action, Services},
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

/// Servers one notary query may ask about (more: 400 `M_BAD_JSON`).
pub const MAX_NOTARY_SERVERS: usize = 20;
/// Key ids one notary query may name per server (more: 400 `M_BAD_JSON`).
pub const MAX_NOTARY_KEY_IDS: usize = 16;
/// Servers whose keys one notary query may make us fetch; the others asked about are answered
/// from the cache or left out (as the spec allows for keys that cannot be had), so that one
/// request never turns into many outgoing ones.
pub const MAX_NOTARY_FETCHES: usize = 3;

/// The key documents of `servers`, countersigned by us; servers whose keys cannot be had (or
/// whom the policy shuts out) are left out, as the spec allows.
async fn notary(s: &Services, servers: Vec<String>) -> Result<Json<Value>> {
    if servers.len() > MAX_NOTARY_SERVERS {
        return Err(Error::bad_json(format!(
            "At most {MAX_NOTARY_SERVERS} servers per key query"
        )));
    }
    let mut docs = Vec::new();
    let mut fetches = 0;
    for name in servers {
        let Ok(server) = ruma::OwnedServerName::try_from(name) else {
            continue;
        };
        let doc = if server == s.globals.server_name {
            s.server_keys.signed_response()?
        } else if let Some(doc) = s.federation.cached_key_document(&server)? {
            s.federation.countersign(doc)?
        } else if fetches < MAX_NOTARY_FETCHES {
            fetches += 1;
            match s.federation.key_document(&server).await {
                Ok(doc) => s.federation.countersign(doc)?,
                Err(_) => continue,
            }
        } else {
            continue;
        };
        docs.push(doc);
    }
    Ok(Json(json!({ "server_keys": docs })))
}

/// Every notary query from an address takes a token of the `key_query` rate limit first (429
/// `M_LIMIT_EXCEEDED` when none is left), before anything in it is looked at.
fn limit(s: &Services, ip: Option<IpAddr>) -> Result<()> {
    let who = ip.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
    s.ratelimit.check(Action::KeyQuery, &who)
}

/// `GET /_matrix/key/v2/query/{serverName}`.
async fn query_one(
    State(s): State<Arc<Services>>,
    ClientIp(ip): ClientIp,
    axum::extract::Path(server): axum::extract::Path<String>,
) -> Result<Json<Value>> {
    limit(&s, ip)?;
    notary(&s, vec![server]).await
}

/// `POST /_matrix/key/v2/query` with `{"server_keys": {server: {key id: criteria}}}`.
async fn query_many(
    State(s): State<Arc<Services>>,
    ClientIp(ip): ClientIp,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    limit(&s, ip)?;
    let servers: Vec<String> = match body.get("server_keys") {
        Some(Value::Object(m)) => {
            if m.len() > MAX_NOTARY_SERVERS {
                return Err(Error::bad_json(format!(
                    "At most {MAX_NOTARY_SERVERS} servers per key query"
                )));
            }
            for (server, criteria) in m {
                let ids = match criteria {
                    Value::Object(ids) => ids.len(),
                    _ => {
                        return Err(Error::bad_json(format!(
                            "server_keys.{server} must be an object"
                        )))
                    }
                };
                if ids > MAX_NOTARY_KEY_IDS {
                    return Err(Error::bad_json(format!(
                        "At most {MAX_NOTARY_KEY_IDS} key ids per server in a key query"
                    )));
                }
            }
            m.keys().cloned().collect()
        }
        Some(_) => return Err(Error::bad_json("server_keys must be an object")),
        None => return Err(Error::bad_json("Missing server_keys")),
    };
    notary(&s, servers).await
}
