//! Checking an event another server sent, before anything else looks at it: its format, its id,
//! the signatures of the servers that must have signed it, and its content hash (an event whose
//! content does not match its hash is kept only in its redacted form, as the spec orders).

use std::collections::{BTreeMap, BTreeSet, HashMap};

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

/// What the checks of a PDU's form found, before any signature is looked at.
pub struct Parsed {
    pub rules: RoomVersionRules,
    /// The event as canonical JSON, without `unsigned`.
    pub obj: CanonicalJsonObject,
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    /// The servers whose signatures the event needs.
    pub servers: BTreeSet<OwnedServerName>,
}

/// The steps of [`Federation::check_pdu`] that need no keys: size, canonical JSON, format, id,
/// room, and whose signatures are needed. `room_id` is the room it must belong to, when known.
pub fn parse_pdu(
    version: &RoomVersionId,
    value: &Value,
    room_id: Option<&RoomId>,
) -> Result<Parsed> {
    let rules = crate::service::rooms::append::rules_for(version)?;
    let obj = canonical_pdu(value)?;
    ruma::state_res::check_pdu_format(&obj, &rules.event_format)
        .map_err(|e| Error::bad_json(format!("malformed event: {e}")))?;
    let event_id = event_id_of(&obj, &rules)?;
    let is_create =
        matches!(obj.get("type"), Some(CanonicalJsonValue::String(t)) if t == "m.room.create");
    let own_room = match obj.get("room_id") {
        Some(CanonicalJsonValue::String(r)) => Some(
            RoomId::parse(r.as_str()).map_err(|_| Error::bad_json("room_id is not a room id"))?,
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
    Ok(Parsed {
        rules,
        obj,
        event_id,
        room_id: event_room,
        servers,
    })
}

impl Incoming {
    /// The checked event (`obj` as signed, possibly redacted) with its id and room.
    fn new(
        obj: CanonicalJsonObject,
        event_id: OwnedEventId,
        room_id: OwnedRoomId,
    ) -> Result<Incoming> {
        let mut stored = serde_json::to_value(&obj)?;
        stored["event_id"] = Value::String(event_id.to_string());
        stored["room_id"] = Value::String(room_id.to_string());
        let pdu: Pdu = serde_json::from_value(stored)
            .map_err(|e| Error::bad_json(format!("invalid event: {e}")))?;
        Ok(Incoming {
            event_id,
            room_id,
            obj,
            pdu,
        })
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
        let Parsed {
            rules,
            mut obj,
            event_id,
            room_id: event_room,
            servers,
        } = parse_pdu(version, value, room_id)?;
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
        Incoming::new(obj, event_id, event_room)
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

/// Property tests: whatever another server sends as a PDU, the checks before the signatures
/// never panic, and what passes them is canonical, within the size limit and in the right room.
#[cfg(test)]
mod fuzz {
    use proptest::{prelude::*, sample::Index};
    use serde_json::json;

    use super::*;
    use crate::fuzz::{apply_edits, config, deep_json, edits, json, text, Edits};

    fn version() -> impl Strategy<Value = RoomVersionId> {
        prop::sample::select(vec![
            "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "org.x.v1",
        ])
        .prop_map(|v| RoomVersionId::try_from(v).expect("a room version id"))
    }

    /// A PDU that passes the format checks of every room version (signatures aside).
    fn template() -> Value {
        json!({
            "auth_events": ["$aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"],
            "prev_events": ["$bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"],
            "content": { "body": "hello", "msgtype": "m.text" },
            "depth": 12,
            "hashes": { "sha256": "c2hhMjU2" },
            "origin": "example.org",
            "origin_server_ts": 1_700_000_000_000_u64,
            "room_id": "!room:example.org",
            "sender": "@alice:example.org",
            "type": "m.room.message",
            "signatures": { "example.org": { "ed25519:a": "c2ln" } },
            "unsigned": { "age": 5 },
            "event_id": "$event:example.org",
        })
    }

    const FIELDS: &[&str] = &[
        "auth_events",
        "prev_events",
        "content",
        "depth",
        "hashes",
        "origin",
        "origin_server_ts",
        "room_id",
        "sender",
        "type",
        "signatures",
        "unsigned",
        "event_id",
        "state_key",
        "redacts",
    ];

    /// How one field of the template is changed.
    #[derive(Debug, Clone)]
    enum Change {
        Remove,
        Json(Value),
        Text(String),
    }

    fn changes() -> impl Strategy<Value = Vec<(Index, Change)>> {
        prop::collection::vec(
            (
                any::<Index>(),
                prop_oneof![
                    Just(Change::Remove),
                    json().prop_map(Change::Json),
                    text().prop_map(Change::Text),
                ],
            ),
            0..4,
        )
    }

    fn changed(changes: &[(Index, Change)]) -> Value {
        let mut v = template();
        let o = v.as_object_mut().expect("an object");
        for (at, change) in changes {
            let field = FIELDS[at.index(FIELDS.len())];
            match change {
                Change::Remove => {
                    o.remove(field);
                }
                Change::Json(j) => {
                    o.insert(field.to_owned(), j.clone());
                }
                Change::Text(t) => {
                    o.insert(field.to_owned(), Value::String(t.clone()));
                }
            }
        }
        v
    }

    /// What must hold of any PDU, accepted or not.
    fn holds(
        version: &RoomVersionId,
        value: &Value,
        room: Option<&RoomId>,
    ) -> Result<(), TestCaseError> {
        let Ok(parsed) = parse_pdu(version, value, room) else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(&parsed.obj).expect("serializes");
        prop_assert!(bytes.len() <= MAX_PDU_BYTES);
        prop_assert!(!parsed.obj.contains_key("unsigned"));
        prop_assert!(parsed.event_id.as_str().starts_with('$'));
        if let Some(room) = room {
            prop_assert_eq!(&*parsed.room_id, room);
        }
        // Canonical already: checking it again changes nothing, and gives the same id.
        let again = parse_pdu(
            version,
            &serde_json::to_value(&parsed.obj).expect("a value"),
            room,
        )
        .expect("what passed once passes again");
        prop_assert_eq!(&again.obj, &parsed.obj);
        prop_assert_eq!(&again.event_id, &parsed.event_id);
        // What follows the signature check must not panic either: the redacted form (a content
        // hash mismatch) and the event as stored.
        if let Ok(redacted) =
            ruma::canonical_json::redact(parsed.obj.clone(), &parsed.rules.redaction, None)
        {
            let _ = Incoming::new(redacted, parsed.event_id.clone(), parsed.room_id.clone());
        }
        let _ = Incoming::new(parsed.obj, parsed.event_id, parsed.room_id);
        Ok(())
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_any_json_is_checked_without_panic(version in version(), value in json()) {
            holds(&version, &value, None)?;
        }

        #[test]
        fn fuzz_near_valid_pdus(version in version(), changes in changes(), pin_room in any::<bool>()) {
            let value = changed(&changes);
            let room = RoomId::parse("!room:example.org").expect("a room id");
            holds(&version, &value, pin_room.then_some(&*room))?;
            // `unsigned` is the sender's to fill and never part of the event's id.
            if let Ok(parsed) = parse_pdu(&version, &value, None) {
                if !matches!(parsed.rules.event_id_format, EventIdFormatVersion::V1) {
                    let mut other = value.clone();
                    other["unsigned"] = json!({ "age": 1, "anything": ["else"] });
                    let other = parse_pdu(&version, &other, None).expect("still valid");
                    prop_assert_eq!(other.event_id, parsed.event_id);
                }
            }
        }

        #[test]
        fn fuzz_bytes_from_the_wire(
            version in version(),
            bytes in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..256),
                edits().prop_map(|e: Edits| apply_edits(serde_json::to_vec(&template()).expect("json"), &e)),
                deep_json().prop_map(String::into_bytes),
            ],
        ) {
            if let Ok(value) = serde_json::from_slice::<Value>(&bytes) {
                holds(&version, &value, None)?;
            }
        }
    }

    #[test]
    fn fuzz_oversized_pdus_are_refused() {
        let mut v = template();
        v["content"]["body"] = Value::String("x".repeat(MAX_PDU_BYTES));
        let version = RoomVersionId::V11;
        assert_eq!(
            parse_pdu(&version, &v, None).err().map(|e| e.errcode()),
            Some("M_BAD_JSON")
        );
        assert!(parse_pdu(&version, &template(), None).is_ok());
    }
}
