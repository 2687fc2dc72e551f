//! Federation queries: `GET /_matrix/federation/v1/query/profile` (a local user's profile).

use std::sync::Arc;

use axum::{
    extract::{RawQuery, State},
    routing::get,
    Json, Router,
};
use serde_json::{Map, Value};

use super::Signed;
use crate::{
    api::client::query_param,
    error::{ErrCode, Error, Result},
    service::Services,
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route("/_matrix/federation/v1/query/profile", get(profile))
}

async fn profile(
    State(s): State<Arc<Services>>,
    RawQuery(q): RawQuery,
    _signed: Signed,
) -> Result<Json<Value>> {
    let user = query_param(&q, "user_id")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing user_id"))?;
    let user = ruma::UserId::parse(&user).map_err(|_| Error::invalid_param("Invalid user_id"))?;
    if user.server_name() != s.globals.server_name {
        return Err(Error::invalid_param("The user is not local to this server"));
    }
    if !s.accounts.exists(&user)? {
        return Err(Error::not_found("Unknown user"));
    }
    let field = query_param(&q, "field")?;
    let mut out = Map::new();
    for name in ["displayname", "avatar_url"] {
        if field.as_deref().is_some_and(|f| f != name) {
            continue;
        }
        if let Some(v) = s.profiles.get(&user, name)? {
            out.insert(name.into(), v);
        }
    }
    if let Some(f) = field.as_deref() {
        if !matches!(f, "displayname" | "avatar_url") {
            if let Some(v) = s.profiles.get(&user, f)? {
                out.insert(f.into(), v);
            }
        }
    }
    Ok(Json(Value::Object(out)))
}
