//! `PUT /_matrix/federation/v1/send/{txnId}`: a transaction of PDUs and EDUs from another server.
//!
//! At most 50 PDUs and 100 EDUs (400 `M_BAD_JSON` beyond, or when EDUs are not objects). A
//! transaction is applied once: its answer is kept (`federation_txns`, for a day) and a retry with
//! the same origin and id gets it again without anything being applied twice.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    routing::put,
    Json, Router,
};
use serde_json::{json, Map, Value};

use super::Signed;
use crate::{
    error::{Error, Result},
    service::{
        federation::{
            edu, incoming,
            sender::{MAX_EDUS_PER_TXN, MAX_PDUS_PER_TXN},
        },
        Services,
    },
    storage::{keys, Table},
    utils,
};

/// Longest transaction id accepted (it becomes part of a database key).
const MAX_TXN_ID_LEN: usize = 255;

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route(
        "/_matrix/federation/v1/send/{txn_id}",
        put(send_transaction),
    )
}

async fn send_transaction(
    State(s): State<Arc<Services>>,
    Path(txn_id): Path<String>,
    signed: Signed,
) -> Result<Json<Value>> {
    let origin = signed.origin;
    if txn_id.is_empty() || txn_id.len() > MAX_TXN_ID_LEN {
        return Err(Error::invalid_param("Invalid transaction id"));
    }
    let mut body = signed
        .body
        .ok_or_else(|| Error::bad_json("A transaction needs a body"))?;
    let body = body
        .as_object_mut()
        .ok_or_else(|| Error::bad_json("The transaction must be a JSON object"))?;
    let pdus = match body.remove("pdus") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(Error::bad_json("pdus must be a list")),
        None => return Err(Error::bad_json("Missing pdus")),
    };
    if pdus.len() > MAX_PDUS_PER_TXN {
        return Err(Error::bad_json(format!(
            "A transaction carries at most {MAX_PDUS_PER_TXN} PDUs"
        )));
    }
    let empty = Vec::new();
    let edus = match body.get("edus") {
        Some(Value::Array(a)) => a,
        None | Some(Value::Null) => &empty,
        Some(_) => return Err(Error::bad_json("edus must be a list")),
    };
    if edus.len() > MAX_EDUS_PER_TXN {
        return Err(Error::bad_json(format!(
            "A transaction carries at most {MAX_EDUS_PER_TXN} EDUs"
        )));
    }
    if edus.iter().any(|e| !e.is_object()) {
        return Err(Error::bad_json("Every EDU must be an object"));
    }

    // A retry of a transaction still being applied waits for it; other transactions do not.
    let _applying = s
        .federation
        .txns_in_flight
        .acquire((origin.clone(), txn_id.clone()), origin.clone())
        .await?;
    let key = keys::join(&[origin.as_str(), &txn_id]);
    if let Some(done) = s.storage.get_json::<Value>(Table::FederationTxns, &key)? {
        if let Some(answer) = done.get("answer") {
            return Ok(Json(answer.clone()));
        }
    }

    let results = incoming::handle_pdus(&s, &origin, pdus).await;
    edu::apply(&s, &origin, edus);

    let mut per_pdu = Map::new();
    for (id, r) in results {
        per_pdu.insert(
            id,
            match r {
                Ok(()) => json!({}),
                Err(e) => json!({ "error": e }),
            },
        );
    }
    let answer = json!({ "pdus": per_pdu });
    s.storage.put(
        Table::FederationTxns,
        &key,
        &serde_json::to_vec(&json!({ "ts": utils::now_ms(), "answer": answer }))?,
    )?;
    Ok(Json(answer))
}
