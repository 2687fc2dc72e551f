//! The room state at an event, and auth chains: what federation serves (`/state_ids`,
//! `/event_auth`, `send_join`) and what incoming events are checked against.
//!
//! The state log (`state_log`) records the room's current state over time. For an event that was
//! appended on top of the current state (every local event, and remote events that extend our
//! forward extremities) the state before it is the log at its count. Only events whose state
//! differs from that (joined into a fork, the first event of a room joined over federation) carry
//! an explicit row in `event_state`.

use std::collections::{HashMap, HashSet};

use ruma::{EventId, OwnedEventId, RoomId};

use super::Rooms;
use crate::{
    error::{Error, Result},
    storage::{Batch, Table},
};

/// A room state: (type, state_key) -> event id.
pub type StateIds = HashMap<(String, String), OwnedEventId>;

/// The most events an auth chain walk visits; a chain longer than this is served cut short
/// rather than letting a request walk a huge room.
pub const AUTH_CHAIN_LIMIT: usize = 100_000;

impl Rooms {
    /// The room state just before `event_id`, or `None` when it is not known (unknown event, or
    /// an outlier stored without state).
    pub fn state_ids_before(&self, event_id: &EventId) -> Result<Option<StateIds>> {
        if let Some(rows) = self
            .storage
            .get_json::<Vec<(String, String, OwnedEventId)>>(
                Table::EventState,
                event_id.as_bytes(),
            )?
        {
            return Ok(Some(
                rows.into_iter().map(|(t, k, id)| ((t, k), id)).collect(),
            ));
        }
        let Some(meta) = self.event_meta(event_id.as_str())? else {
            return Ok(None);
        };
        Ok(Some(self.state_at(&meta.room_id, meta.count)?))
    }

    /// The state of `room_id` just after `event_id`: the state before it, plus itself if it is
    /// a state event. An event of another room is an error ([`Rooms::pdu_of_room`]), not the
    /// state of that room.
    pub fn state_ids_after(
        &self,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<Option<StateIds>> {
        let Some(pdu) = self.pdu_of_room(room_id, event_id)? else {
            return Ok(None);
        };
        let Some(mut state) = self.state_ids_before(event_id)? else {
            return Ok(None);
        };
        if let Some(key) = pdu.state_key {
            state.insert((pdu.kind.to_string(), key), pdu.event_id);
        }
        Ok(Some(state))
    }

    /// Record the state before an event explicitly (see the module comment for when).
    pub(crate) fn put_event_state(
        &self,
        batch: &mut Batch,
        event_id: &EventId,
        state: &StateIds,
    ) -> Result<()> {
        let rows: Vec<(&str, &str, &EventId)> = state
            .iter()
            .map(|((t, k), id)| (t.as_str(), k.as_str(), id.as_ref()))
            .collect();
        batch.put(
            Table::EventState,
            event_id.as_bytes(),
            &serde_json::to_vec(&rows)?,
        )
    }

    /// The auth chain of the given events of `room_id`: their auth events, recursively (not the
    /// events themselves), as far as stored, at most [`AUTH_CHAIN_LIMIT`] events. Only events of
    /// `room_id` are followed or returned ([`Rooms::pdu_of_room_or_none`]): what is served and
    /// what state resolution is given never holds another room's event.
    pub fn auth_chain<'a>(
        &self,
        room_id: &RoomId,
        starts: impl IntoIterator<Item = &'a EventId>,
    ) -> Result<Vec<OwnedEventId>> {
        let mut seen: HashSet<OwnedEventId> = HashSet::new();
        let mut todo: Vec<OwnedEventId> = Vec::new();
        for start in starts {
            if let Some(pdu) = self.pdu_of_room_or_none(room_id, start) {
                todo.extend(pdu.auth_events);
            }
        }
        let mut out = Vec::new();
        while let Some(id) = todo.pop() {
            if seen.len() >= AUTH_CHAIN_LIMIT {
                break;
            }
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some(pdu) = self.pdu_of_room_or_none(room_id, &id) {
                todo.extend(pdu.auth_events.into_iter().filter(|a| !seen.contains(a)));
                out.push(id);
            }
        }
        Ok(out)
    }

    /// The stored PDU as it goes over federation: the signed event without what this server
    /// added for clients (`unsigned`) and, for room versions 3 and later, without `event_id`
    /// (it is the event's hash there, not part of it).
    pub fn federation_pdu(&self, event_id: &EventId) -> Result<Option<serde_json::Value>> {
        self.federation_pdu_where(event_id, None)
    }

    /// [`Rooms::federation_pdu`] for answers about `room_id` (`/state`, `/event_auth`, the
    /// `send_join` answer): an event of another room is left out (`None`), never served as
    /// part of this room.
    pub fn federation_pdu_of_room(
        &self,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<Option<serde_json::Value>> {
        self.federation_pdu_where(event_id, Some(room_id))
    }

    fn federation_pdu_where(
        &self,
        event_id: &EventId,
        room_id: Option<&RoomId>,
    ) -> Result<Option<serde_json::Value>> {
        let Some(bytes) = self.storage.get(Table::Pdus, event_id.as_bytes())? else {
            return Ok(None);
        };
        let mut value: serde_json::Value = serde_json::from_slice(&bytes)?;
        let obj = value
            .as_object_mut()
            .ok_or_else(|| Error::internal("stored pdu is not an object"))?;
        if let Some(room_id) = room_id {
            if obj.get("room_id").and_then(|r| r.as_str()) != Some(room_id.as_str()) {
                return Ok(None);
            }
        }
        obj.remove("unsigned");
        let version = obj
            .get("room_id")
            .and_then(|r| r.as_str())
            .and_then(|r| ruma::RoomId::parse(r).ok())
            .and_then(|r| self.meta(&r).ok().flatten())
            .map(|m| m.version);
        let keeps_id = matches!(
            version,
            Some(ruma::RoomVersionId::V1) | Some(ruma::RoomVersionId::V2)
        );
        if !keeps_id {
            obj.remove("event_id");
        }
        // A v12 create event has no room id on the wire: the room id is derived from it.
        if obj.get("type").and_then(|t| t.as_str()) == Some("m.room.create")
            && version
                .as_ref()
                .and_then(|v| v.rules())
                .is_some_and(|r| r.authorization.room_create_event_id_as_room_id)
        {
            obj.remove("room_id");
        }
        Ok(Some(value))
    }
}
