//! `/_hafen/admin/v1/appservices`: the registered application services (server admins only).
//! Appservices from `app_service_config_files` are listed and read-only; ones registered here
//! are kept in the database and take effect at once. Every call is audited (`admin_action`),
//! changes with the appservice's id and URL. Tokens are never answered or logged.
//!
//! - `GET /_hafen/admin/v1/appservices`: `{"appservices": [...]}`
//! - `POST /_hafen/admin/v1/appservices`: register; the body is the registration as JSON, or
//!   `{"yaml": "<the registration file>"}`
//! - `GET` / `DELETE /_hafen/admin/v1/appservices/{id}`

use std::sync::Arc;

use axum::{extract::State, routing::get, Json, Router};
use serde_json::{json, Value};

use super::{account::Segs, admin_api::require_admin};
use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{Error, Result},
    policy::audit::AuditEntry,
    service::{
        accounts::Identity,
        appservice::{ensure_sender, registration::Registration, Appservice},
        Services,
    },
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route("/_hafen/admin/v1/appservices", get(list).post(register))
        .route(
            "/_hafen/admin/v1/appservices/{id}",
            get(show).delete(remove),
        )
}

/// What an admin sees of an appservice: everything but its tokens.
fn describe(s: &Services, a: &Appservice) -> Result<Value> {
    let (events, ephemeral) = s.appservices.queue.queued(a.id())?;
    let r = &a.registration;
    Ok(json!({
        "id": r.id,
        "url": r.url,
        "sender": a.sender,
        "source": a.source,
        "namespaces": r.namespaces,
        "rate_limited": r.is_rate_limited(),
        "protocols": r.protocols.clone().unwrap_or_default(),
        "receive_ephemeral": r.wants_ephemeral(),
        "queued": { "events": events, "ephemeral": ephemeral },
    }))
}

/// A change made through the API, in the audit log for good (what and by whom).
fn record(s: &Services, who: &Identity, change: &str, a: &Appservice) {
    if let Err(e) = s.audit.record(AuditEntry {
        kind: "admin_action".into(),
        user: Some(who.user_id.to_string()),
        detail: json!({
            "endpoint": "appservices",
            "change": change,
            "appservice": a.id(),
            "url": a.registration.url,
            "sender": a.sender,
        }),
        ..AuditEntry::default()
    }) {
        tracing::warn!("audit: recording an appservice change failed: {e}");
    }
}

async fn list(State(s): State<Arc<Services>>, Authed(who): Authed) -> Result<Json<Value>> {
    require_admin(&s, &who, "appservices", None)?;
    let all = s.appservices.all();
    let mut out = Vec::with_capacity(all.len());
    for a in all.iter() {
        out.push(describe(&s, a)?);
    }
    Ok(Json(json!({ "appservices": out })))
}

async fn show(State(s): State<Arc<Services>>, Authed(who): Authed, p: Segs) -> Result<Json<Value>> {
    let id = p.get(0)?;
    require_admin(&s, &who, "appservices", Some(id))?;
    let a = s
        .appservices
        .get(id)
        .ok_or_else(|| Error::not_found("No such appservice"))?;
    Ok(Json(describe(&s, &a)?))
}

async fn register(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    require_admin(&s, &who, "appservices", None)?;
    let registration = match body.get("yaml") {
        Some(Value::String(text)) => {
            Registration::from_yaml(text).map_err(|e| Error::bad_json(format!("yaml: {e}")))?
        }
        Some(_) => return Err(Error::bad_json("'yaml' must be a string")),
        None => serde_json::from_value::<Registration>(Value::Object(body))
            .map_err(|e| Error::bad_json(format!("Invalid registration: {e}")))?,
    };
    let a = s.appservices.add(registration)?;
    ensure_sender(&s, &a)?;
    record(&s, &who, "register", &a);
    Ok(Json(describe(&s, &a)?))
}

async fn remove(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    let id = p.get(0)?;
    require_admin(&s, &who, "appservices", Some(id))?;
    let a = s.appservices.remove(id)?;
    record(&s, &who, "delete", &a);
    Ok(Json(json!({})))
}
