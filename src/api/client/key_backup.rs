//! Server-side key backup: `/room_keys/version` and `/room_keys/keys`. The logic is in
//! `service::key_backup`.

use std::sync::Arc;

use axum::{
    extract::{RawQuery, State},
    routing::{get, post},
    Json, Router,
};
use serde_json::{json, Map, Value};

use super::account::{both, query_param, Segs};
use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{ErrCode, Error, Result},
    service::{key_backup::update_response, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = both(
        r,
        "/room_keys/version",
        post(create_version).get(latest_version),
    );
    let r = both(
        r,
        "/room_keys/version/{version}",
        get(get_version).put(update_version).delete(delete_version),
    );
    let r = both(
        r,
        "/room_keys/keys",
        get(get_all).put(put_all).delete(delete_all),
    );
    let r = both(
        r,
        "/room_keys/keys/{room_id}",
        get(get_room).put(put_room).delete(delete_room),
    );
    both(
        r,
        "/room_keys/keys/{room_id}/{session_id}",
        get(get_session).put(put_session).delete(delete_session),
    )
}

fn required_str<'a>(body: &'a Map<String, Value>, key: &str) -> Result<&'a str> {
    match body.get(key) {
        Some(Value::String(v)) => Ok(v),
        Some(_) => Err(Error::bad_json(format!("{key} must be a string"))),
        None => Err(Error::new(ErrCode::MissingParam, format!("Missing {key}"))),
    }
}

/// The `version` query parameter every `/room_keys/keys` request carries.
fn version_param(q: &Option<String>) -> Result<String> {
    query_param(q, "version")?.ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing version"))
}

async fn create_version(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let algorithm = required_str(&body, "algorithm")?;
    let auth_data = body
        .get("auth_data")
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing auth_data"))?;
    let version = s
        .key_backup
        .create_version(&who.user_id, algorithm, auth_data)?;
    Ok(Json(json!({ "version": version })))
}

async fn latest_version(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
) -> Result<Json<Value>> {
    Ok(Json(s.key_backup.latest_info(&who.user_id)?))
}

async fn get_version(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    Ok(Json(s.key_backup.version_info(&who.user_id, p.get(0)?)?))
}

async fn update_version(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let algorithm = required_str(&body, "algorithm")?;
    let auth_data = body
        .get("auth_data")
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing auth_data"))?;
    let body_version = match body.get("version") {
        None | Some(Value::Null) => None,
        Some(Value::String(v)) => Some(v.as_str()),
        Some(_) => return Err(Error::bad_json("version must be a string")),
    };
    s.key_backup
        .update_version(&who.user_id, p.get(0)?, algorithm, auth_data, body_version)?;
    Ok(Json(json!({})))
}

async fn delete_version(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    s.key_backup.delete_version(&who.user_id, p.get(0)?)?;
    Ok(Json(json!({})))
}

/// `{session_id: data}` of one room from a request body.
fn sessions_of(room: &str, sessions: &Value, out: &mut Vec<(String, String, Value)>) -> Result<()> {
    let sessions = sessions
        .as_object()
        .ok_or_else(|| Error::bad_json("sessions must be an object"))?;
    for (session, data) in sessions {
        out.push((room.to_owned(), session.clone(), data.clone()));
    }
    Ok(())
}

async fn put_all(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    RawQuery(q): RawQuery,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let version = version_param(&q)?;
    let rooms = body
        .get("rooms")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::bad_json("rooms must be an object"))?;
    let mut sessions = Vec::new();
    for (room, content) in rooms {
        let inner = content
            .get("sessions")
            .ok_or_else(|| Error::bad_json("Each room needs sessions"))?;
        sessions_of(room, inner, &mut sessions)?;
    }
    let (count, etag) = s.key_backup.put_keys(&who.user_id, &version, sessions)?;
    Ok(Json(update_response(count, etag)))
}

async fn put_room(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    RawQuery(q): RawQuery,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let version = version_param(&q)?;
    let inner = body
        .get("sessions")
        .ok_or_else(|| Error::bad_json("Missing sessions"))?;
    let mut sessions = Vec::new();
    sessions_of(p.get(0)?, inner, &mut sessions)?;
    let (count, etag) = s.key_backup.put_keys(&who.user_id, &version, sessions)?;
    Ok(Json(update_response(count, etag)))
}

async fn put_session(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    RawQuery(q): RawQuery,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let version = version_param(&q)?;
    let sessions = vec![(
        p.get(0)?.to_owned(),
        p.get(1)?.to_owned(),
        Value::Object(body),
    )];
    let (count, etag) = s.key_backup.put_keys(&who.user_id, &version, sessions)?;
    Ok(Json(update_response(count, etag)))
}

async fn get_all(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let version = version_param(&q)?;
    let rooms = s.key_backup.get_keys(&who.user_id, &version, None, None)?;
    let rooms: Map<String, Value> = rooms
        .into_iter()
        .map(|(room, sessions)| (room, json!({ "sessions": sessions })))
        .collect();
    Ok(Json(json!({ "rooms": rooms })))
}

async fn get_room(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let version = version_param(&q)?;
    let room = p.get(0)?;
    let mut rooms = s
        .key_backup
        .get_keys(&who.user_id, &version, Some(room), None)?;
    let sessions = rooms.remove(room).unwrap_or_else(|| json!({}));
    Ok(Json(json!({ "sessions": sessions })))
}

async fn get_session(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let version = version_param(&q)?;
    let (room, session) = (p.get(0)?, p.get(1)?);
    let rooms = s
        .key_backup
        .get_keys(&who.user_id, &version, Some(room), Some(session))?;
    rooms
        .get(room)
        .and_then(|r| r.get(session))
        .cloned()
        .map(Json)
        .ok_or_else(|| Error::not_found("No key found for this session"))
}

async fn delete_all(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let version = version_param(&q)?;
    let (count, etag) = s
        .key_backup
        .delete_keys(&who.user_id, &version, None, None)?;
    Ok(Json(update_response(count, etag)))
}

async fn delete_room(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let version = version_param(&q)?;
    let (count, etag) = s
        .key_backup
        .delete_keys(&who.user_id, &version, Some(p.get(0)?), None)?;
    Ok(Json(update_response(count, etag)))
}

async fn delete_session(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let version = version_param(&q)?;
    let (count, etag) =
        s.key_backup
            .delete_keys(&who.user_id, &version, Some(p.get(0)?), Some(p.get(1)?))?;
    Ok(Json(update_response(count, etag)))
}
