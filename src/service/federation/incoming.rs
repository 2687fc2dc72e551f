//! Room events (PDUs) received over federation in `/send` transactions.
//!
//! Placeholder: the incoming-PDU work replaces the body of [`handle_pdus`]. Until then every PDU
//! is answered with an error and nothing is stored.

use std::collections::BTreeMap;

use ruma::ServerName;
use serde_json::Value;

use crate::service::Services;

/// Handle the PDUs of one transaction from `origin` (at most 50; the caller checked that). The
/// answer has one entry per PDU, keyed by its `event_id` field (or "unknown"): `Ok(())` when it
/// was accepted, `Err(reason)` otherwise; the `/send` handler turns it into the response's
/// `pdus` map.
pub async fn handle_pdus(
    _services: &Services,
    _origin: &ServerName,
    pdus: Vec<Value>,
) -> BTreeMap<String, Result<(), String>> {
    let mut out = BTreeMap::new();
    for pdu in pdus {
        let key = pdu
            .get("event_id")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned();
        out.insert(
            key,
            Err("room events over federation are not handled yet".to_owned()),
        );
    }
    out
}
