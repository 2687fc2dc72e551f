//! Synapse-compatible admin endpoints for retention (D4, A6), at Synapse's paths with its request
//! and response shapes so existing admin tools work:
//!
//! - `POST /_synapse/admin/v1/purge_history/{roomId}[/{eventId}]` (`purge_up_to_ts` or
//!   `purge_up_to_event_id`, `delete_local_events`) -> `{"purge_id"}`, and
//!   `GET /_synapse/admin/v1/purge_history_status/{purgeId}` -> `{"status"}`;
//! - `DELETE /_synapse/admin/v1/rooms/{roomId}` (synchronous) -> the shutdown result, and
//!   `DELETE /_synapse/admin/v2/rooms/{roomId}` -> `{"delete_id"}`, with
//!   `GET /_synapse/admin/v2/rooms/{roomId}/delete_status` and
//!   `GET /_synapse/admin/v2/rooms/delete_status/{deleteId}`.
//!
//! Every call needs a server admin's token (403 `M_FORBIDDEN` otherwise, checked before anything
//! is looked up) and is recorded in the audit log as an `admin_action`.

use std::sync::Arc;

use axum::{
    extract::State,
    routing::{delete, get, post},
    Json, Router,
};
use serde_json::{json, Value};

use super::account::Segs;
use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{Error, Result},
    policy::audit::AuditEntry,
    service::{accounts::Identity, retention, rooms::purge::PurgeScope, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route(
        "/_synapse/admin/v1/purge_history/{room_id}",
        post(purge_history),
    )
    .route(
        "/_synapse/admin/v1/purge_history/{room_id}/{event_id}",
        post(purge_history),
    )
    .route(
        "/_synapse/admin/v1/purge_history_status/{purge_id}",
        get(purge_status),
    )
    .route("/_synapse/admin/v1/rooms/{room_id}", delete(delete_room_v1))
    .route("/_synapse/admin/v2/rooms/{room_id}", delete(delete_room_v2))
    .route(
        "/_synapse/admin/v2/rooms/{room_id}/delete_status",
        get(room_delete_status),
    )
    .route(
        "/_synapse/admin/v2/rooms/delete_status/{delete_id}",
        get(delete_status),
    )
}

fn ensure_admin(who: &Identity) -> Result<()> {
    if who.admin {
        Ok(())
    } else {
        Err(Error::forbidden("You are not a server admin"))
    }
}

fn audit(s: &Services, who: &Identity, room: &str, detail: Value) {
    let entry = AuditEntry {
        kind: "admin_action".into(),
        user: Some(who.user_id.to_string()),
        device: Some(who.device_id.to_string()),
        room: Some(room.to_owned()),
        detail,
        ..AuditEntry::default()
    };
    if let Err(e) = s.audit.record(entry) {
        tracing::error!(error = %e, "cannot write the audit log");
    }
}

fn bool_field(body: &serde_json::Map<String, Value>, name: &str, default: bool) -> Result<bool> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(Error::bad_json(format!("'{name}' must be a boolean"))),
    }
}

async fn purge_history(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    ensure_admin(&who)?;
    let room_id = super::room_id(p.get(0)?)?;
    if !s.rooms.exists(room_id)? {
        return Err(Error::not_found("Unknown room"));
    }
    let delete_local = bool_field(&body, "delete_local_events", false)?;
    let event_id = match p.0.get(1) {
        Some(e) => Some(e.clone()),
        None => match body.get("purge_up_to_event_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(e)) => Some(e.clone()),
            Some(_) => return Err(Error::bad_json("'purge_up_to_event_id' must be a string")),
        },
    };
    let mut scope = PurgeScope::default();
    if let Some(event_id) = &event_id {
        // That event is kept; everything before it in the room goes.
        let meta = s
            .rooms
            .event_meta(event_id)?
            .filter(|m| m.room_id == room_id)
            .ok_or_else(|| Error::not_found("Event not found in this room"))?;
        scope.before_count = Some(meta.count);
    } else {
        match body.get("purge_up_to_ts") {
            Some(Value::Number(n)) => match n.as_u64() {
                Some(ts) => scope.before_ts = Some(ts),
                None => return Err(Error::invalid_param("'purge_up_to_ts' must be a timestamp")),
            },
            Some(_) => return Err(Error::invalid_param("'purge_up_to_ts' must be an integer")),
            None => {
                return Err(Error::invalid_param(
                    "Must specify purge_up_to_event_id or purge_up_to_ts",
                ))
            }
        }
    }
    if !delete_local {
        scope.keep_local_of = Some(s.globals.server_name.clone());
    }
    let detail = json!({
        "action": "purge_history",
        "purge_up_to_event_id": event_id,
        "purge_up_to_ts": scope.before_ts,
        "delete_local_events": delete_local,
    });
    let purge_id = retention::start_purge_history(&s, room_id, scope);
    let mut detail = detail;
    detail["purge_id"] = json!(purge_id);
    audit(&s, &who, room_id.as_str(), detail);
    Ok(Json(json!({ "purge_id": purge_id })))
}

async fn purge_status(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    ensure_admin(&who)?;
    let task = s
        .retention
        .task(p.get(0)?)
        .filter(|t| t.shutdown_room.is_none())
        .ok_or_else(|| Error::not_found("Unknown purge id"))?;
    let mut out = json!({ "status": task.status });
    if let Some(e) = task.error {
        out["error"] = json!(e);
    }
    Ok(Json(out))
}

/// The deletion options Hafen honours: `purge` (default true: delete the room's data; false
/// only makes the local members leave). `block`, `new_room_user_id` (moving members to a new
/// room) and `force_purge` are not supported; `new_room_user_id` is refused.
fn delete_options(body: &serde_json::Map<String, Value>) -> Result<bool> {
    if body.get("new_room_user_id").is_some_and(|v| !v.is_null()) {
        return Err(Error::invalid_param(
            "new_room_user_id is not supported by this server",
        ));
    }
    bool_field(body, "block", false)?;
    bool_field(body, "force_purge", false)?;
    bool_field(body, "purge", true)
}

async fn delete_room_v1(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    ensure_admin(&who)?;
    let room_id = super::room_id(p.get(0)?)?;
    let purge = delete_options(&body)?;
    if !s.rooms.exists(room_id)? {
        return Err(Error::not_found("Unknown room"));
    }
    audit(
        &s,
        &who,
        room_id.as_str(),
        json!({ "action": "delete_room", "purge": purge }),
    );
    Ok(Json(
        retention::delete_room(&s, room_id, None, purge).await?,
    ))
}

async fn delete_room_v2(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    ensure_admin(&who)?;
    let room_id = super::room_id(p.get(0)?)?;
    let purge = delete_options(&body)?;
    if !s.rooms.exists(room_id)? {
        return Err(Error::not_found("Unknown room"));
    }
    let delete_id = retention::start_delete_room(&s, room_id, purge);
    audit(
        &s,
        &who,
        room_id.as_str(),
        json!({ "action": "delete_room", "purge": purge, "delete_id": delete_id }),
    );
    Ok(Json(json!({ "delete_id": delete_id })))
}

fn status_json(task: &retention::Task) -> Value {
    let mut out = json!({
        "status": task.status,
        "shutdown_room": task.shutdown_room.clone().unwrap_or(Value::Null),
    });
    if let Some(e) = &task.error {
        out["error"] = json!(e);
    }
    out
}

async fn room_delete_status(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    ensure_admin(&who)?;
    let room_id = super::room_id(p.get(0)?)?;
    let results: Vec<Value> = s
        .retention
        .tasks_of_room(room_id)
        .iter()
        .map(|(id, t)| {
            let mut v = status_json(t);
            v["delete_id"] = json!(id);
            v
        })
        .collect();
    if results.is_empty() {
        return Err(Error::not_found("No delete task for this room"));
    }
    Ok(Json(json!({ "results": results })))
}

async fn delete_status(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    ensure_admin(&who)?;
    let task = s
        .retention
        .task(p.get(0)?)
        .filter(|t| t.shutdown_room.is_some())
        .ok_or_else(|| Error::not_found("Unknown delete id"))?;
    Ok(Json(status_json(&task)))
}
