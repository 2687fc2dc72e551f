//! Account data (global and per room) and room tags (room account data of type `m.tag`).

use std::sync::Arc;

use axum::{extract::State, routing::get, Json, Router};
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{json, Map, Value};

use super::account::{both, Segs};
use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{Error, Result},
    service::{accounts::Identity, Services},
};

/// Longest account data type and tag name we store.
const MAX_TYPE_LEN: usize = 255;

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = both(
        r,
        "/user/{user_id}/account_data/{event_type}",
        get(get_global).put(set_global),
    );
    let r = both(
        r,
        "/user/{user_id}/rooms/{room_id}/account_data/{event_type}",
        get(get_room).put(set_room),
    );
    let r = both(r, "/user/{user_id}/rooms/{room_id}/tags", get(get_tags));
    both(
        r,
        "/user/{user_id}/rooms/{room_id}/tags/{tag}",
        axum::routing::put(put_tag).delete(delete_tag),
    )
}

/// Account data belongs to its user alone.
fn own_user(id: &Identity, raw: &str) -> Result<OwnedUserId> {
    super::own_user(id, raw, "You cannot access another user's account data")
}

fn room(raw: &str) -> Result<OwnedRoomId> {
    super::room_id(raw).map(ToOwned::to_owned)
}

fn check_type(kind: &str) -> Result<()> {
    if kind.is_empty() || kind.len() > MAX_TYPE_LEN {
        return Err(Error::invalid_param("Invalid account data type"));
    }
    Ok(())
}

/// Types the server manages through their own endpoints.
fn check_settable(kind: &str) -> Result<()> {
    check_type(kind)?;
    match kind {
        "m.fully_read" => Err(Error::bad_json("Cannot set m.fully_read through this API.")),
        "m.push_rules" => Err(Error::bad_json("Cannot set m.push_rules through this API.")),
        _ => Ok(()),
    }
}

async fn get_global(
    State(s): State<Arc<Services>>,
    Authed(id): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    let user = own_user(&id, p.get(0)?)?;
    let kind = p.get(1)?;
    check_type(kind)?;
    s.account_data
        .get(&user, None, kind)?
        .map(Json)
        .ok_or_else(|| Error::not_found("Account data not found"))
}

async fn set_global(
    State(s): State<Arc<Services>>,
    Authed(id): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let user = own_user(&id, p.get(0)?)?;
    let kind = p.get(1)?;
    check_settable(kind)?;
    s.account_data
        .set(&user, None, kind, &Value::Object(body))?;
    Ok(Json(json!({})))
}

async fn get_room(
    State(s): State<Arc<Services>>,
    Authed(id): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    let user = own_user(&id, p.get(0)?)?;
    let room_id = room(p.get(1)?)?;
    let kind = p.get(2)?;
    check_type(kind)?;
    s.account_data
        .get(&user, Some(&room_id), kind)?
        .map(Json)
        .ok_or_else(|| Error::not_found("Account data not found"))
}

async fn set_room(
    State(s): State<Arc<Services>>,
    Authed(id): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let user = own_user(&id, p.get(0)?)?;
    let room_id = room(p.get(1)?)?;
    let kind = p.get(2)?;
    check_settable(kind)?;
    s.account_data
        .set(&user, Some(&room_id), kind, &Value::Object(body))?;
    Ok(Json(json!({})))
}

/// The tags of a room: the `tags` object of its `m.tag` account data.
fn tags_of(s: &Services, user: &UserId, room_id: &RoomId) -> Result<Map<String, Value>> {
    Ok(match s.account_data.get(user, Some(room_id), "m.tag")? {
        Some(Value::Object(mut o)) => match o.remove("tags") {
            Some(Value::Object(tags)) => tags,
            _ => Map::new(),
        },
        _ => Map::new(),
    })
}

async fn get_tags(
    State(s): State<Arc<Services>>,
    Authed(id): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    let user = own_user(&id, p.get(0)?)?;
    let room_id = room(p.get(1)?)?;
    Ok(Json(json!({ "tags": tags_of(&s, &user, &room_id)? })))
}

async fn put_tag(
    State(s): State<Arc<Services>>,
    Authed(id): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let user = own_user(&id, p.get(0)?)?;
    let room_id = room(p.get(1)?)?;
    let tag = p.get(2)?;
    check_type(tag)?;
    match body.get("order") {
        None | Some(Value::Number(_)) => {}
        Some(_) => return Err(Error::bad_json("'order' must be a number")),
    }
    let mut tags = tags_of(&s, &user, &room_id)?;
    tags.insert(tag.to_owned(), Value::Object(body));
    s.account_data
        .set(&user, Some(&room_id), "m.tag", &json!({ "tags": tags }))?;
    Ok(Json(json!({})))
}

async fn delete_tag(
    State(s): State<Arc<Services>>,
    Authed(id): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    let user = own_user(&id, p.get(0)?)?;
    let room_id = room(p.get(1)?)?;
    let tag = p.get(2)?;
    let mut tags = tags_of(&s, &user, &room_id)?;
    if tags.remove(tag).is_some() {
        s.account_data
            .set(&user, Some(&room_id), "m.tag", &json!({ "tags": tags }))?;
    }
    Ok(Json(json!({})))
}
