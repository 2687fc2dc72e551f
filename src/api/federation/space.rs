//! `GET /_matrix/federation/v1/hierarchy/{roomId}`: a space and its children for another
//! server's users. Logic in `service::rooms::summary`.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Path, Query, State},
    routing::get,
    Json, Router,
};
use serde_json::Value;

use super::Signed;
use crate::{
    error::{Error, Result},
    service::Services,
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route("/_matrix/federation/v1/hierarchy/{room_id}", get(hierarchy))
}

async fn hierarchy(
    State(s): State<Arc<Services>>,
    Path(room): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    signed: Signed,
) -> Result<Json<Value>> {
    let room_id = <&ruma::RoomId>::try_from(room.as_str())
        .map_err(|_| Error::invalid_param("Invalid room id"))?;
    let suggested_only = match q.get("suggested_only").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(Error::invalid_param("suggested_only must be true or false")),
    };
    Ok(Json(s.rooms.federation_hierarchy(
        room_id,
        &signed.origin,
        suggested_only,
    )?))
}
