//! Federation queries: `/query/profile` (a local user's profile) and `/query/directory` (a local
//! room alias).

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
        .route("/_matrix/federation/v1/query/directory", get(directory))
        .route(
            "/_matrix/federation/v1/query/{query_type}",
            get(other_query),
        )
        .route(
            "/_matrix/federation/v1/openid/userinfo",
            get(openid_userinfo),
        )
}

/// Query types this server does not know (the spec leaves them to extensions).
async fn other_query(_signed: Signed) -> Result<Json<Value>> {
    Err(Error::new(ErrCode::Unrecognized, "Unknown query type"))
}

/// `GET /openid/userinfo?access_token=`: who an OpenID token (from the client API's
/// `/openid/request_token`) was issued to. Not signed: the asker is a third party, not a server.
async fn openid_userinfo(
    State(s): State<Arc<Services>>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let token = query_param(&q, "access_token")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing access_token"))?;
    match s.reports.openid_user(&token)? {
        Some(user) => {
            let mut out = Map::new();
            out.insert("sub".into(), Value::String(user));
            Ok(Json(Value::Object(out)))
        }
        None => Err(Error::with_status(
            ErrCode::UnknownToken,
            http::StatusCode::UNAUTHORIZED,
            "Unknown or expired access token",
        )),
    }
}

/// `GET /query/directory?room_alias=`: the room a local alias names, and that this server is
/// in it.
async fn directory(
    State(s): State<Arc<Services>>,
    RawQuery(q): RawQuery,
    _signed: Signed,
) -> Result<Json<Value>> {
    let alias = query_param(&q, "room_alias")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing room_alias"))?;
    let alias = <&ruma::RoomAliasId>::try_from(alias.as_str())
        .map_err(|_| Error::invalid_param("Invalid room alias"))?;
    if alias.server_name() != s.globals.server_name {
        return Err(Error::invalid_param(
            "The alias is not local to this server",
        ));
    }
    let room_id = crate::service::appservice::query::resolve_local_alias(&s, alias)
        .await?
        .ok_or_else(|| Error::not_found("Room alias not found"))?;
    let mut out = Map::new();
    out.insert("room_id".into(), Value::String(room_id.to_string()));
    out.insert(
        "servers".into(),
        Value::Array(vec![Value::String(s.globals.server_name.to_string())]),
    );
    Ok(Json(Value::Object(out)))
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
