//! Profiles: the whole profile, single fields (display name, avatar, custom keys), changes that
//! are mirrored into every joined room by the profile service.

use std::sync::Arc;

use axum::{extract::State, routing::get, Json, Router};
use ruma::OwnedUserId;
use serde_json::{json, Value};

use super::account::{both, Segs};
use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{ErrCode, Error, Result},
    service::{profile, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = both(r, "/profile/{user_id}", get(get_profile));
    // Display name and avatar are fields like any other; one route serves all keys.
    both(
        r,
        "/profile/{user_id}/{field}",
        get(get_field).put(set_field).delete(delete_field),
    )
}

/// The profile (or one field) of a user of another server, asked over federation; an error of
/// that server is "not found" here (the client cannot do more about it).
async fn remote_profile(
    s: &Services,
    user: &ruma::UserId,
    field: Option<&str>,
) -> Result<Option<serde_json::Map<String, Value>>> {
    if user.server_name() == s.globals.server_name {
        return Ok(None);
    }
    let mut path = format!(
        "/_matrix/federation/v1/query/profile?user_id={}",
        utf8_percent(user.as_str())
    );
    if let Some(f) = field {
        path.push_str(&format!("&field={}", utf8_percent(f)));
    }
    match s
        .federation
        .send(http::Method::GET, user.server_name(), &path, None)
        .await
    {
        Ok(Value::Object(o)) => Ok(Some(o)),
        _ => Err(Error::not_found("Profile not found")),
    }
}

/// Percent-encode a query value (everything but RFC 3986's unreserved characters).
pub(super) fn utf8_percent(v: &str) -> String {
    let mut out = String::with_capacity(v.len() * 3);
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A local user that exists; anyone else has no profile here.
fn known_user(s: &Services, raw: &str) -> Result<OwnedUserId> {
    let user = super::user_id(raw)?;
    if s.accounts.user(&user)?.is_none_or(|u| u.deactivated) {
        return Err(Error::not_found("Profile not found"));
    }
    Ok(user)
}

/// An unknown local user in an appservice's namespace: the appservice is asked first (it may
/// register its ghost user now).
async fn ask_appservices(s: &Services, raw: &str) -> Result<()> {
    let user = super::user_id(raw)?;
    crate::service::appservice::query::local_user_exists(s, &user).await?;
    Ok(())
}

async fn get_profile(
    State(s): State<Arc<Services>>,
    Authed(_): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    if let Some(remote) = remote_profile(&s, &super::user_id(p.get(0)?)?, None).await? {
        return Ok(Json(Value::Object(remote)));
    }
    ask_appservices(&s, p.get(0)?).await?;
    let user = known_user(&s, p.get(0)?)?;
    Ok(Json(Value::Object(s.profiles.all(&user)?)))
}

async fn get_field(
    State(s): State<Arc<Services>>,
    Authed(_): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    let field = p.get(1)?;
    if let Some(remote) = remote_profile(&s, &super::user_id(p.get(0)?)?, Some(field)).await? {
        let value = remote
            .get(field)
            .cloned()
            .ok_or_else(|| Error::not_found("Profile field not set"))?;
        return Ok(Json(json!({ field: value })));
    }
    ask_appservices(&s, p.get(0)?).await?;
    let user = known_user(&s, p.get(0)?)?;
    let value = s
        .profiles
        .get(&user, field)?
        .ok_or_else(|| Error::not_found("Profile field not set"))?;
    Ok(Json(json!({ field: value })))
}

/// Only the owner changes a profile.
fn own_user(id: &crate::service::accounts::Identity, raw: &str) -> Result<OwnedUserId> {
    super::own_user(id, raw, "You can only change your own profile")
}

fn check_key(field: &str) -> Result<()> {
    if field.len() > profile::MAX_KEY_LEN {
        return Err(Error::new(
            ErrCode::KeyTooLarge,
            "Profile key is longer than 255 bytes",
        ));
    }
    if field.is_empty() {
        return Err(Error::invalid_param("Empty profile key"));
    }
    Ok(())
}

async fn set_field(
    State(s): State<Arc<Services>>,
    Authed(id): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    id.ensure_may_act()?;
    let user = own_user(&id, p.get(0)?)?;
    let field = p.get(1)?;
    check_key(field)?;
    let value = body
        .get(field)
        .ok_or_else(|| Error::new(ErrCode::MissingParam, format!("Missing '{field}'")))?;
    match (field, value) {
        ("displayname" | "avatar_url", Value::String(_) | Value::Null) => {}
        ("displayname" | "avatar_url", _) => {
            return Err(Error::bad_json(format!("'{field}' must be a string")))
        }
        _ => {}
    }
    if let (Some(name), "displayname") = (value.as_str(), field) {
        if name.len() > 256 {
            return Err(Error::invalid_param("Display name is too long"));
        }
    }
    if let (Some(url), "avatar_url") = (value.as_str(), field) {
        if !url.is_empty() && !url.starts_with("mxc://") {
            return Err(Error::invalid_param("avatar_url must be an mxc:// URI"));
        }
    }
    profile::set_field(&s, &user, field, Some(value)).await?;
    Ok(Json(json!({})))
}

async fn delete_field(
    State(s): State<Arc<Services>>,
    Authed(id): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    id.ensure_may_act()?;
    let user = own_user(&id, p.get(0)?)?;
    let field = p.get(1)?;
    check_key(field)?;
    profile::set_field(&s, &user, field, None).await?;
    Ok(Json(json!({})))
}
