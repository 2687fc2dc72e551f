//! End-to-end encryption: key upload, query, claim and changes, cross-signing keys and
//! signatures, and send-to-device. The logic is in `service::e2ee`.

use std::sync::Arc;

use axum::{
    extract::{RawQuery, State},
    routing::{get, post, put},
    Json, Router,
};
use serde_json::{json, Value};

use super::account::{both, query_param, Segs};
use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{ErrCode, Error, Result},
    service::{e2ee, sync, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = both(r, "/keys/upload", post(upload));
    let r = both(r, "/keys/query", post(query));
    let r = both(r, "/keys/claim", post(claim));
    let r = both(r, "/keys/changes", get(changes));
    let r = both(
        r,
        "/keys/device_signing/upload",
        post(device_signing_upload),
    );
    let r = both(r, "/keys/signatures/upload", post(signatures_upload));
    both(
        r,
        "/sendToDevice/{event_type}/{txn_id}",
        put(send_to_device),
    )
}

async fn upload(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    Ok(Json(e2ee::upload_keys(&s, &who, &body)?))
}

async fn query(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    Ok(Json(e2ee::query_keys_federated(&s, &who, &body).await?))
}

async fn claim(
    State(s): State<Arc<Services>>,
    Authed(_): Authed,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    Ok(Json(e2ee::claim_keys_federated(&s, &body).await?))
}

async fn changes(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let token = |name: &str| -> Result<u64> {
        let raw = query_param(&q, name)?
            .ok_or_else(|| Error::new(ErrCode::MissingParam, format!("Missing {name}")))?;
        Ok(sync::parse_token(&raw)?.position)
    };
    let (from, to) = (token("from")?, token("to")?);
    let (changed, left) = sync::device_list_changes(&s, &who.user_id, from, to)?;
    Ok(Json(json!({ "changed": changed, "left": left })))
}

async fn device_signing_upload(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    if e2ee::cross_signing_needs_auth(&s, &who.user_id, &body)? {
        s.uiaa.reauth(&s, &who.user_id, body.get("auth"))?;
    }
    e2ee::upload_cross_signing(&s, &who.user_id, &body)?;
    Ok(Json(json!({})))
}

async fn signatures_upload(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    Ok(Json(e2ee::upload_signatures(&s, &who, &body)?))
}

async fn send_to_device(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    e2ee::send_to_device(&s, &who, p.get(0)?, p.get(1)?, &body)?;
    Ok(Json(json!({})))
}
