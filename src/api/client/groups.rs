//! `/_hafen/admin/v1/groups`: the closed user groups (server admins only). Groups from the config
//! file are listed and read-only; groups made here are kept in the database.
//!
//! - `GET /_hafen/admin/v1/groups`: `{"groups": [{"name", "users", "servers", "source"}]}`
//! - `PUT` / `DELETE /_hafen/admin/v1/groups/{name}`: make or delete a group
//! - `PUT` / `DELETE /_hafen/admin/v1/groups/{name}/members/{member}`: add or remove a member, a
//!   user id (`*` globs allowed) or a server name

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    routing::{get, put},
    Json, Router,
};
use serde_json::{json, Value};

use crate::{
    api::ruma_wrapper::Authed,
    error::{Error, Result},
    policy::audit::AuditEntry,
    service::{accounts::Identity, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route("/_hafen/admin/v1/groups", get(list))
        .route("/_hafen/admin/v1/groups/{name}", put(create).delete(delete))
        .route(
            "/_hafen/admin/v1/groups/{name}/members/{member}",
            put(add_member).delete(remove_member),
        )
}

fn admin(who: &Identity) -> Result<()> {
    if !who.admin {
        return Err(Error::forbidden("Only server admins may manage groups"));
    }
    Ok(())
}

fn record(s: &Services, who: &Identity, what: &str, group: &str, member: Option<&str>) {
    let mut detail = json!({ "endpoint": "groups", "change": what, "group": group });
    if let Some(m) = member {
        detail["member"] = json!(m);
    }
    if let Err(e) = s.audit.record(AuditEntry {
        kind: "admin_action".into(),
        user: Some(who.user_id.to_string()),
        detail,
        ..AuditEntry::default()
    }) {
        tracing::warn!("audit: recording a group change failed: {e}");
    }
}

async fn list(State(s): State<Arc<Services>>, Authed(who): Authed) -> Result<Json<Value>> {
    admin(&who)?;
    Ok(Json(json!({ "groups": s.access.groups.list() })))
}

async fn create(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path(name): Path<String>,
) -> Result<Json<Value>> {
    admin(&who)?;
    s.access.groups.create(&name)?;
    record(&s, &who, "create", &name, None);
    Ok(Json(json!({})))
}

async fn delete(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path(name): Path<String>,
) -> Result<Json<Value>> {
    admin(&who)?;
    s.access.groups.delete(&name)?;
    record(&s, &who, "delete", &name, None);
    let removed = crate::policy::group_sweep::remove_outsiders(&s, Some(&name)).await?;
    Ok(Json(
        json!({ "removed_from_rooms": removed_json(&removed) }),
    ))
}

async fn add_member(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path((name, member)): Path<(String, String)>,
) -> Result<Json<Value>> {
    admin(&who)?;
    s.access.groups.change_member(&name, &member, true)?;
    record(&s, &who, "add_member", &name, Some(&member));
    Ok(Json(json!({})))
}

async fn remove_member(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path((name, member)): Path<(String, String)>,
) -> Result<Json<Value>> {
    admin(&who)?;
    s.access.groups.change_member(&name, &member, false)?;
    record(&s, &who, "remove_member", &name, Some(&member));
    let removed = crate::policy::group_sweep::remove_outsiders(&s, Some(&name)).await?;
    Ok(Json(
        json!({ "removed_from_rooms": removed_json(&removed) }),
    ))
}

/// `[{room_id, user_id}]` of those who had to leave a room bound to the group.
fn removed_json(removed: &[(ruma::OwnedRoomId, ruma::OwnedUserId)]) -> Vec<Value> {
    removed
        .iter()
        .map(|(room, user)| json!({ "room_id": room, "user_id": user }))
        .collect()
}
