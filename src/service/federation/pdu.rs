//! Checking an event another server sent, before anything else looks at it: its format, its id,
//! the signatures of the servers that must have signed it, and its content hash (an event whose
//! content does not match its hash is kept only in its redacted form, as the spec orders).

use std::collections::{BTreeMap, HashMap};

use ruma::{
    room_version_rules::{EventIdFormatVersion, RoomVersionRules},
    serde::Base64,
    signatures::{PublicKeyMap, Verified},
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomId, OwnedServerName, RoomId,
    RoomVersionId,
};
use serde_json::Value;

use super::Federation;
use crate::{
    error::{Error, Result},
    service::rooms::{append::MAX_PDU_BYTES, Pdu},
};

/// An event from another server that passed the checks of this module.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    /// The event as signed (redacted if its content hash did not match), without `unsigned`.
    pub obj: CanonicalJsonObject,
    pub pdu: Pdu,
}

impl Incoming {
    /// The form this server stores: the signed event plus its id and room id.
    pub fn stored_value(&self) -> Result<Value> {
        let mut v = serde_json::to_value(&self.obj)?;
        v["event_id"] = Value::String(self.event_id.to_string());
        v["room_id"] = Value::String(self.room_id.to_string());
        Ok(v)
    }
}

/// The event id of a PDU as the room version defines it.
pub fn event_id_of(obj: &CanonicalJsonObject, rules: &RoomVersionRules) -> Result<OwnedEventId> {
    match rules.event_id_format {
        EventIdFormatVersion::V1 => match obj.get("event_id") {
            Some(CanonicalJsonValue::String(id)) => OwnedEventId::try_from(id.as_str())
                .map_err(|_| Error::bad_json("event_id is not an event id")),
            _ => Err(Error::bad_json("event_id is missing")),
        },
        _ => {
            let hash = ruma::signatures::reference_hash(obj, rules)
                .map_err(|e| Error::bad_json(format!("cannot hash the event: {e}")))?;
            OwnedEventId::try_from(format!("${hash}"))
                .map_err(|_| Error::bad_json("bad event hash"))
        }
    }
}

/// A PDU as JSON to canonical JSON, refusing what is not canonical or too large.
pub fn canonical_pdu(value: &Value) -> Result<CanonicalJsonObject> {
    let size = serde_json::to_vec(value)?.len();
    if size > MAX_PDU_BYTES {
        return Err(Error::bad_json("the event is larger than 65536 bytes"));
    }
    match CanonicalJsonValue::try_from(value.clone()) {
        Ok(CanonicalJsonValue::Object(mut o)) => {
            // `unsigned` is not covered by signatures: what a remote server puts there is not
            // taken over.
            o.remove("unsigned");
            Ok(o)
        }
        Ok(_) => Err(Error::bad_json("a PDU must be a JSON object")),
        Err(e) => Err(Error::bad_json(format!(
            "the event is not canonical JSON: {e}"
        ))),
    }
}

impl Federation {
    /// Check a PDU of a room of `version`: format, id, signatures, content hash. `room_id` is
    /// the room it must belong to, when known.
    pub async fn check_pdu(
        &self,
        version: &RoomVersionId,
        value: &Value,
        room_id: Option<&RoomId>,
        keys: &mut KeyCache,
    ) -> Result<Incoming> {
        let rules = crate::service::rooms::append::rules_for(version)?;
        let mut obj = canonical_pdu(value)?;
        ruma::state_res::check_pdu_format(&obj, &rules.event_format)
            .map_err(|e| Error::bad_json(format!("malformed event: {e}")))?;
        let event_id = event_id_of(&obj, &rules)?;
        let is_create =
            matches!(obj.get("type"), Some(CanonicalJsonValue::String(t)) if t == "m.room.create");
        let own_room = match obj.get("room_id") {
            Some(CanonicalJsonValue::String(r)) => Some(
                RoomId::parse(r.as_str())
                    .map_err(|_| Error::bad_json("room_id is not a room id"))?,
            ),
            _ => None,
        };
        let event_room = match own_room {
            Some(r) => r,
            // A v12 create event carries no room id: the room id is its own hash.
            None if is_create && rules.authorization.room_create_event_id_as_room_id => {
                RoomId::parse(format!("!{}", &event_id.as_str()[1..]))
                    .map_err(|_| Error::bad_json("bad create event id"))?
            }
            None => return Err(Error::bad_json("room_id is missing")),
        };
        if let Some(expected) = room_id {
            if expected != event_room {
                return Err(Error::bad_json("the event belongs to another room"));
            }
        }

        let servers =
            ruma::signatures::required_server_signatures_to_verify_event(&obj, &rules.signatures)
                .map_err(|e| Error::bad_json(format!("event signatures: {e}")))?;
        // A retired key (`old_verify_keys`) verifies only events older than its `expired_ts`:
        // whoever got hold of a retired key cannot sign new events with it.
        let event_ts = match obj.get("origin_server_ts") {
            Some(CanonicalJsonValue::Integer(ts)) => u64::try_from(i64::from(*ts)).unwrap_or(0),
            _ => return Err(Error::bad_json("origin_server_ts is missing")),
        };
        let mut map = PublicKeyMap::new();
        for server in servers {
            let keys = keys.get(self, &server).await?;
            map.insert(server.to_string(), valid_at(&keys, event_ts));
        }
        match ruma::signatures::verify_event(&map, &obj, &rules) {
            Ok(Verified::All) => {}
            Ok(Verified::Signatures) => {
                // Signed, but the content was changed on the way: only the redacted form counts.
                obj = ruma::canonical_json::redact(obj, &rules.redaction, None)
                    .map_err(|e| Error::bad_json(format!("cannot redact: {e}")))?;
            }
            Err(e) => {
                return Err(Error::new(
                    crate::error::ErrCode::InvalidSignature,
                    format!("the event's signatures do not verify: {e}"),
                ))
            }
        }

        let mut stored = serde_json::to_value(&obj)?;
        stored["event_id"] = Value::String(event_id.to_string());
        stored["room_id"] = Value::String(event_room.to_string());
        let pdu: Pdu = serde_json::from_value(stored)
            .map_err(|e| Error::bad_json(format!("invalid event: {e}")))?;
        Ok(Incoming {
            event_id,
            room_id: event_room,
            obj,
            pdu,
        })
    }

    /// Every key a server has signed with (current and retired), as unpadded base64 by id, each
    /// with the time it was retired (`expired_ts` of `old_verify_keys`; `None`: current). A key
    /// listed as current and as retired counts as current.
    pub async fn event_signing_keys(&self, server: &ruma::ServerName) -> Result<SigningKeys> {
        let mut out = BTreeMap::new();
        if server == self.globals.server_name {
            for (id, old) in self.own_old_keys()? {
                out.insert(id, (parse_key(&old.key)?, Some(old.expired_ts)));
            }
            let key = &self.globals.signing_key;
            out.insert(key.key_id.clone(), (parse_key(&key.public_key())?, None));
            return Ok(out);
        }
        let doc = self.key_document(server).await?;
        // Retired keys first, so that a current key of the same id wins.
        for (field, retired) in [("old_verify_keys", true), ("verify_keys", false)] {
            for (id, k) in doc
                .get(field)
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let Some(key) = k.get("key").and_then(Value::as_str) else {
                    continue;
                };
                let expired = if retired {
                    // A retired key without a valid `expired_ts` verifies nothing.
                    Some(k.get("expired_ts").and_then(Value::as_u64).unwrap_or(0))
                } else {
                    None
                };
                out.insert(id.clone(), (parse_key(key)?, expired));
            }
        }
        Ok(out)
    }
}

/// A server's signing keys by id: the public key, and when it was retired (`None`: current).
pub type SigningKeys = BTreeMap<String, (Base64, Option<u64>)>;

/// The keys that may have signed an event of `origin_server_ts` `event_ts`: the current ones,
/// and retired ones only for events from before they were retired.
pub fn valid_at(keys: &SigningKeys, event_ts: u64) -> BTreeMap<String, Base64> {
    keys.iter()
        .filter(|(_, (_, expired))| expired.is_none_or(|e| event_ts < e))
        .map(|(id, (key, _))| (id.clone(), key.clone()))
        .collect()
}

fn parse_key(key: &str) -> Result<Base64> {
    Base64::parse(key).map_err(|_| Error::bad_json("a signing key is not base64"))
}

/// The signing keys of the servers met while checking a batch of events, so that a room's state
/// of thousands of events asks storage (or the network) once per server.
#[derive(Default)]
pub struct KeyCache {
    keys: HashMap<OwnedServerName, SigningKeys>,
}

impl KeyCache {
    async fn get(
        &mut self,
        federation: &Federation,
        server: &ruma::ServerName,
    ) -> Result<SigningKeys> {
        if let Some(k) = self.keys.get(server) {
            return Ok(k.clone());
        }
        federation.policy.may_federate_with(server)?;
        let keys = federation.event_signing_keys(server).await?;
        self.keys.insert(server.to_owned(), keys.clone());
        Ok(keys)
    }
}
