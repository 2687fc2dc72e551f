//! `GET /sync` (the query is parsed here; the work is in `service::sync`) and Simplified
//! Sliding Sync (MSC4186; ruma parses the request, the work is in `service::sliding_sync`).

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{RawQuery, State},
    routing::get,
    Json, Router,
};
use ruma::api::client::{filter::FilterDefinition, sync::sync_events::v5};
use serde_json::Value;

use crate::{
    api::ruma_wrapper::{ruma_route, Authed, Ruma},
    error::{ErrCode, Error, Result},
    service::{
        sliding_sync,
        sync::{parse_token, SyncRequest, MAX_TIMEOUT},
        Services,
    },
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = r
        .route("/_matrix/client/v3/sync", get(sync_events))
        .route("/_matrix/client/r0/sync", get(sync_events));
    ruma_route::<v5::Request, _, _>(r, sliding_sync)
}

/// `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`.
async fn sliding_sync(
    State(s): State<Arc<Services>>,
    req: Ruma<v5::Request>,
) -> Result<Json<Value>> {
    let who = req.user()?.clone();
    let spaces = sliding_sync::spaces_filters(req.json.as_ref())?;
    let body = sliding_sync::sync(&s, &who, req.body, spaces).await?;
    Ok(Json(body))
}

async fn sync_events(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>> {
    let params: Vec<(String, String)> =
        serde_html_form::from_str(query.as_deref().unwrap_or(""))
            .map_err(|_| Error::invalid_param("Invalid query string"))?;
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };

    let since = param("since")
        .filter(|t| !t.is_empty())
        .map(parse_token)
        .transpose()?;
    let full_state = match param("full_state") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(Error::invalid_param("full_state must be true or false")),
    };
    let timeout = match param("timeout") {
        None | Some("") => Duration::ZERO,
        Some(t) => Duration::from_millis(
            t.parse::<u64>()
                .map_err(|_| Error::invalid_param("timeout must be a number of milliseconds"))?,
        )
        .min(MAX_TIMEOUT),
    };
    let set_presence = match param("set_presence") {
        None => None,
        Some(p @ ("online" | "offline" | "unavailable")) => Some(p.to_owned()),
        Some(_) => {
            return Err(Error::invalid_param(
                "set_presence must be online, offline or unavailable",
            ))
        }
    };
    let filter: FilterDefinition = match param("filter") {
        None | Some("") => FilterDefinition::default(),
        Some(f) if f.trim_start().starts_with('{') => serde_json::from_str(f)
            .map_err(|e| Error::new(ErrCode::BadJson, format!("Invalid filter: {e}")))?,
        Some(id) => {
            let stored = s
                .account_data
                .filter(&who.user_id, id)
                .map_err(|e| match e {
                    Error::Matrix {
                        code: ErrCode::NotFound,
                        ..
                    } => Error::invalid_param("Unknown filter id"),
                    other => other,
                })?;
            serde_json::from_value(stored)
                .map_err(|e| Error::new(ErrCode::BadJson, format!("Invalid stored filter: {e}")))?
        }
    };

    let req = SyncRequest {
        since: since.map(|t| t.position),
        since_to_device: since.and_then(|t| t.to_device),
        full_state,
        filter,
        timeout,
        set_presence,
    };
    let body = crate::service::sync::sync(&s, &who, req).await?;
    Ok(Json(body))
}
