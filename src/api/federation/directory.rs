//! `GET`/`POST /_matrix/federation/v1/publicRooms`: this server's published rooms, for other
//! servers' users, when the operator publishes the directory over federation.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Query, State},
    routing::get,
    Json, Router,
};
use serde_json::Value;

use super::Signed;
use crate::{
    api::client::directory::{page_json, post_query},
    error::{Error, Result},
    service::{rooms::directory::DirectoryQuery, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route(
        "/_matrix/federation/v1/publicRooms",
        get(public_rooms_get).post(public_rooms_post),
    )
}

async fn public_rooms_get(
    State(s): State<Arc<Services>>,
    Query(q): Query<HashMap<String, String>>,
    _signed: Signed,
) -> Result<Json<Value>> {
    s.policy.may_serve_directory_over_federation()?;
    let limit = q
        .get("limit")
        .map(|l| {
            l.parse::<usize>()
                .map_err(|_| Error::invalid_param("limit must be a non-negative integer"))
        })
        .transpose()?;
    let query = DirectoryQuery {
        limit,
        since: q.get("since").cloned(),
        ..Default::default()
    };
    page_json(&s, &query)
}

async fn public_rooms_post(State(s): State<Arc<Services>>, signed: Signed) -> Result<Json<Value>> {
    s.policy.may_serve_directory_over_federation()?;
    let body = match signed.body {
        Some(Value::Object(o)) => o,
        None => serde_json::Map::new(),
        Some(_) => return Err(Error::bad_json("The body must be a JSON object")),
    };
    page_json(&s, &post_query(&body)?)
}
