//! The persistent data unit: one room event as stored, and its client format.

use ruma::{
    events::TimelineEventType, serde::Raw, CanonicalJsonObject, MilliSecondsSinceUnixEpoch,
    OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UInt, UserId,
};
use serde::{Deserialize, Deserializer};
use serde_json::{value::RawValue as RawJsonValue, Map, Value};

use crate::error::{Error, Result};

/// A stored event. The stored JSON is the signed PDU plus `event_id` (and `room_id` for v12
/// create events, whose room id is derived from their hash) so that it reads back on its own.
#[derive(Clone, Debug, Deserialize)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    #[serde(default)]
    pub room_id: Option<OwnedRoomId>,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    pub kind: TimelineEventType,
    pub content: Box<RawJsonValue>,
    #[serde(default)]
    pub state_key: Option<String>,
    #[serde(default, deserialize_with = "event_refs")]
    pub prev_events: Vec<OwnedEventId>,
    #[serde(default, deserialize_with = "event_refs")]
    pub auth_events: Vec<OwnedEventId>,
    #[serde(default)]
    pub depth: UInt,
    #[serde(default)]
    pub redacts: Option<OwnedEventId>,
    #[serde(default)]
    pub unsigned: Option<Map<String, Value>>,
}

/// Room versions 1 and 2 reference events as `[event_id, {hashes}]`; later ones as plain ids.
fn event_refs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<OwnedEventId>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Ref {
        Id(OwnedEventId),
        Pair(OwnedEventId, serde::de::IgnoredAny),
    }
    let refs: Vec<Ref> = Vec::deserialize(d)?;
    Ok(refs
        .into_iter()
        .map(|r| match r {
            Ref::Id(id) | Ref::Pair(id, _) => id,
        })
        .collect())
}

impl Pdu {
    pub fn from_json(bytes: &[u8]) -> Result<Pdu> {
        serde_json::from_slice(bytes).map_err(|e| Error::internal(format!("stored pdu: {e}")))
    }

    pub fn room(&self) -> Result<&RoomId> {
        self.room_id
            .as_deref()
            .ok_or_else(|| Error::internal("pdu without room id"))
    }

    /// `content` as a JSON value (for handlers that look into it).
    pub fn content_value(&self) -> Value {
        serde_json::from_str(self.content.get()).unwrap_or(Value::Null)
    }

    /// The event a redaction redacts, wherever the room version keeps it.
    pub fn redacts_id(&self) -> Option<OwnedEventId> {
        if self.redacts.is_some() {
            return self.redacts.clone();
        }
        #[derive(Deserialize)]
        struct C {
            redacts: Option<OwnedEventId>,
        }
        serde_json::from_str::<C>(self.content.get())
            .ok()
            .and_then(|c| c.redacts)
    }

    /// The membership in an `m.room.member` event's content.
    pub fn membership(&self) -> Option<String> {
        #[derive(Deserialize)]
        struct C {
            membership: String,
        }
        serde_json::from_str::<C>(self.content.get())
            .ok()
            .map(|c| c.membership)
    }

    /// The client-server format ("ClientEvent"), with `age` computed now. `transaction_id` is
    /// only given to the device that sent the event.
    pub fn to_client_value(&self, transaction_id: Option<&str>) -> Value {
        let mut obj = Map::new();
        obj.insert("content".into(), raw_value(&self.content));
        obj.insert("event_id".into(), Value::String(self.event_id.to_string()));
        obj.insert(
            "origin_server_ts".into(),
            Value::from(u64::from(self.origin_server_ts.0)),
        );
        if let Some(room_id) = &self.room_id {
            obj.insert("room_id".into(), Value::String(room_id.to_string()));
        }
        obj.insert("sender".into(), Value::String(self.sender.to_string()));
        obj.insert("type".into(), Value::String(self.kind.to_string()));
        if let Some(sk) = &self.state_key {
            obj.insert("state_key".into(), Value::String(sk.clone()));
        }
        if let Some(r) = self.redacts_id() {
            obj.insert("redacts".into(), Value::String(r.to_string()));
        }
        let mut unsigned = self.unsigned.clone().unwrap_or_default();
        let now = crate::utils::now_ms();
        unsigned.insert(
            "age".into(),
            Value::from(now.saturating_sub(u64::from(self.origin_server_ts.0))),
        );
        if let Some(txn) = transaction_id {
            unsigned.insert("transaction_id".into(), Value::String(txn.to_owned()));
        }
        obj.insert("unsigned".into(), Value::Object(unsigned));
        Value::Object(obj)
    }

    /// The stripped state format used for invite and knock room previews.
    pub fn to_stripped_value(&self) -> Value {
        serde_json::json!({
            "content": raw_value(&self.content),
            "sender": self.sender,
            "state_key": self.state_key.clone().unwrap_or_default(),
            "type": self.kind.to_string(),
        })
    }

    pub fn to_client_raw<T>(&self, transaction_id: Option<&str>) -> Raw<T> {
        let value = self.to_client_value(transaction_id);
        Raw::from_json(
            serde_json::value::to_raw_value(&value).expect("a JSON value always serializes"),
        )
    }

    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }

    pub fn sender_is(&self, user: &UserId) -> bool {
        self.sender == user
    }
}

pub fn raw_value(raw: &RawJsonValue) -> Value {
    serde_json::from_str(raw.get()).unwrap_or(Value::Null)
}

/// ruma's state resolution and auth checks read events through this trait.
impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        self.room_id.as_deref()
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawJsonValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        false
    }
}

/// Convert a JSON object into canonical JSON; floats and out-of-range integers are refused
/// with `M_BAD_JSON`, as the spec forbids them in events.
pub fn to_canonical(value: Value) -> Result<CanonicalJsonObject> {
    match ruma::CanonicalJsonValue::try_from(value) {
        Ok(ruma::CanonicalJsonValue::Object(o)) => Ok(o),
        Ok(_) => Err(Error::bad_json("event content must be an object")),
        Err(e) => Err(Error::bad_json(format!(
            "event is not valid canonical JSON: {e}"
        ))),
    }
}
