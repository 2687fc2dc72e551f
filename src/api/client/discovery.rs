//! Discovery: versions, well-known, capabilities.

use std::{collections::BTreeMap, sync::Arc};

use axum::{extract::State, routing::get, Json, Router};
use serde_json::{json, Value};

use crate::{
    api::ruma_wrapper::{ruma_route, Ruma, RumaResponse},
    error::{Error, Result},
    service::Services,
};
use ruma::api::client::discovery::get_capabilities;

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = r
        .route("/_matrix/client/versions", get(versions))
        .route("/.well-known/matrix/client", get(well_known_client))
        .route("/.well-known/matrix/support", get(well_known_support))
        .route("/.well-known/matrix/server", get(well_known_server));
    ruma_route::<get_capabilities::v3::Request, _, _>(r, capabilities)
}

/// Spec versions this server implements.
pub const SUPPORTED_VERSIONS: &[&str] = &[
    "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10",
    "v1.11", "v1.12", "v1.13", "v1.14", "v1.15", "v1.16", "v1.17", "v1.18", "v1.19",
];

async fn versions() -> Json<Value> {
    Json(json!({
        "versions": SUPPORTED_VERSIONS,
        "unstable_features": {
            "org.matrix.msc2285.stable": true,
            "org.matrix.msc3827.stable": true,
            "org.matrix.msc3814": true,
            // Simplified Sliding Sync (MSC4186), which Element X requires.
            "org.matrix.simplified_msc3575": true,
        },
        "server": { "name": "hafen", "version": crate::VERSION },
    }))
}

async fn well_known_client(State(s): State<Arc<Services>>) -> Result<Json<Value>> {
    let base = s
        .config
        .well_known
        .client
        .clone()
        .ok_or_else(|| Error::not_found("No client well-known configured"))?;
    Ok(Json(json!({ "m.homeserver": { "base_url": base } })))
}

/// Server delegation (`well_known.server`): where other servers reach this one. 404 when not
/// set, which tells them to use the server name itself (or its SRV records, or port 8448).
async fn well_known_server(State(s): State<Arc<Services>>) -> Result<Json<Value>> {
    let server = s
        .config
        .well_known
        .server
        .clone()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Error::not_found("No server delegation configured"))?;
    Ok(Json(json!({ "m.server": server })))
}

/// Support contacts and page from the config (`well_known.support_*`); 404 when none is set.
async fn well_known_support(State(s): State<Arc<Services>>) -> Result<Json<Value>> {
    let w = &s.config.well_known;
    let mut contact = serde_json::Map::new();
    if let Some(id) = &w.support_mxid {
        contact.insert("matrix_id".into(), json!(id));
    }
    if let Some(email) = &w.support_email {
        contact.insert("email_address".into(), json!(email));
    }
    let mut body = serde_json::Map::new();
    if !contact.is_empty() {
        contact.insert("role".into(), json!("m.role.admin"));
        body.insert("contacts".into(), json!([contact]));
    }
    if let Some(page) = &w.support_page {
        body.insert("support_page".into(), json!(page));
    }
    if body.is_empty() {
        return Err(Error::not_found("No support information configured"));
    }
    Ok(Json(Value::Object(body)))
}

async fn capabilities(
    State(s): State<Arc<Services>>,
    req: Ruma<get_capabilities::v3::Request>,
) -> Result<RumaResponse<get_capabilities::v3::Response>> {
    use ruma::api::client::discovery::get_capabilities::v3::{
        Capabilities, RoomVersionStability, RoomVersionsCapability,
    };
    let mut available = BTreeMap::new();
    for v in crate::service::rooms::SUPPORTED_ROOM_VERSIONS {
        available.insert(v.clone(), RoomVersionStability::Stable);
    }
    let mut caps = Capabilities::new();
    caps.room_versions =
        RoomVersionsCapability::new(s.config.default_room_version.clone(), available);
    if req.user()?.admin {
        // Server admins may suspend and lock accounts (`/admin/suspend`, `/admin/lock`).
        caps.set(
            "m.account_moderation",
            serde_json::json!({ "suspend": true, "lock": true }),
        )?;
    }
    Ok(get_capabilities::v3::Response::new(caps).into())
}
