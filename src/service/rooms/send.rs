//! Sending events as a local user: messages (with transaction idempotency), state, redactions,
//! and reading one event back with history visibility applied.

use ruma::{
    events::TimelineEventType, DeviceId, EventId, OwnedEventId, RoomAliasId, RoomId, UserId,
};
use serde_json::{json, Value};

use super::{visibility::At, EventMeta, NewEvent, Pdu, Rooms};
use crate::error::{ErrCode, Error, Result};

/// Most aliases we check in one `m.room.canonical_alias` event.
const MAX_ALT_ALIASES: usize = 100;

/// How long a retried send waits, once the event is durable, for it to be visible in sync.
const RETRY_VISIBLE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Rooms {
    /// Send a message event. A repeated (user, device, txn id) returns the first event's id.
    pub async fn send_message(
        &self,
        room_id: &RoomId,
        user: &UserId,
        device: &DeviceId,
        kind: &str,
        content: Value,
        txn_id: &str,
        ts: Option<u64>,
    ) -> Result<OwnedEventId> {
        // Redactions go through the redaction checks, wherever the client sent them.
        if kind == "m.room.redaction" {
            let target = content
                .get("redacts")
                .and_then(Value::as_str)
                .and_then(|r| EventId::parse(r).ok())
                .ok_or_else(|| Error::bad_json("m.room.redaction needs a valid `redacts`"))?;
            let reason = content
                .get("reason")
                .and_then(Value::as_str)
                .map(str::to_owned);
            return self
                .redact_event(room_id, user, device, &target, reason.as_deref(), txn_id)
                .await;
        }
        let guard = self.lock(room_id).await;
        // Checked under the lock so that two concurrent retries make one event.
        if let Some(id) = self.transaction_event(user, device, txn_id)? {
            drop(guard);
            return self.answer_retry(id).await;
        }
        self.require_joined(room_id, user)?;
        let (sent, deferred) = self.append_locked_deferred(
            room_id,
            user,
            NewEvent::message(kind, content).at(ts),
            Some((device, txn_id)),
        )?;
        // The next event of the room can be built while this one goes to disk.
        drop(guard);
        deferred.complete(&self.storage).await?;
        Ok(sent.event_id)
    }

    /// Redact `target`: the sender may redact their own events, others need `redact` power.
    pub async fn redact_event(
        &self,
        room_id: &RoomId,
        user: &UserId,
        device: &DeviceId,
        target: &EventId,
        reason: Option<&str>,
        txn_id: &str,
    ) -> Result<OwnedEventId> {
        let guard = self.lock(room_id).await;
        if let Some(id) = self.transaction_event(user, device, txn_id)? {
            drop(guard);
            return self.answer_retry(id).await;
        }
        self.require_joined(room_id, user)?;
        let target_pdu = match self.event_meta(target.as_str())? {
            Some(meta) if meta.room_id == room_id => self.pdu(target.as_str())?,
            _ => None,
        }
        .ok_or_else(|| Error::not_found("Event not found"))?;
        if target_pdu.kind == TimelineEventType::RoomCreate {
            return Err(Error::forbidden("The create event cannot be redacted"));
        }
        if target_pdu.sender != user && !self.power_levels(room_id)?.may(user, "redact") {
            return Err(Error::forbidden("You may only redact your own events"));
        }
        let mut content = json!({});
        if let Some(r) = reason {
            content["reason"] = Value::String(r.to_owned());
        }
        let event = NewEvent {
            kind: TimelineEventType::RoomRedaction,
            content,
            state_key: None,
            redacts: Some(target.to_owned()),
            origin_server_ts: None,
        };
        let (sent, deferred) =
            self.append_locked_deferred(room_id, user, event, Some((device, txn_id)))?;
        // As for messages: the room's next event is built while this one goes to disk.
        drop(guard);
        deferred.complete(&self.storage).await?;
        Ok(sent.event_id)
    }

    /// The answer to a retried send or redaction (its transaction id is known; every path that
    /// answers one comes here, the handlers' shortcut too): the first
    /// request's event id, but only once that event is durable and the stream watermark has
    /// passed it, as the first request's own answer would be. The first request wrote the
    /// transaction id in the event's batch, so that batch is applied and the current ticket
    /// covers it; its fsync is the syncer's, shared with the first request (no fsync here).
    pub async fn answer_retry(&self, event_id: OwnedEventId) -> Result<OwnedEventId> {
        self.storage.durable(self.storage.ticket_now()).await?;
        // Durable now; what remains is the first request publishing it (it was woken by the
        // same fsync). Bounded, because the answer is already safe to give: only visibility
        // in a sync that races this answer could still lag.
        if let Some(meta) = self.event_meta(event_id.as_str())? {
            let _ =
                tokio::time::timeout(RETRY_VISIBLE_WAIT, self.globals.counter.passed(meta.count))
                    .await;
        }
        Ok(event_id)
    }

    /// Send a state event. Re-sending the current content by the same sender changes nothing
    /// and returns the existing event's id.
    pub async fn send_state(
        &self,
        room_id: &RoomId,
        user: &UserId,
        kind: &str,
        state_key: &str,
        content: Value,
        ts: Option<u64>,
    ) -> Result<OwnedEventId> {
        let _guard = self.lock(room_id).await;
        self.require_joined(room_id, user)?;
        if kind == "m.room.canonical_alias" {
            self.check_canonical_alias(room_id, &content)?;
        }
        if let Some(current) = self.state_get(room_id, kind, state_key)? {
            if current.sender == user && current.content_value() == content {
                return Ok(current.event_id);
            }
        }
        let event = NewEvent::state(kind, state_key, content).at(ts);
        Ok(self
            .append_locked(room_id, user, event, None)
            .await?
            .event_id)
    }

    /// Every alias of a canonical alias event must exist and point to this room.
    fn check_canonical_alias(&self, room_id: &RoomId, content: &Value) -> Result<()> {
        let mut aliases = Vec::new();
        match content.get("alias") {
            None | Some(Value::Null) => {}
            Some(Value::String(a)) => aliases.push(a.as_str()),
            Some(_) => return Err(Error::bad_json("alias must be a string")),
        }
        match content.get("alt_aliases") {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => {
                if list.len() > MAX_ALT_ALIASES {
                    return Err(Error::bad_json("Too many alt_aliases"));
                }
                for a in list {
                    aliases.push(
                        a.as_str()
                            .ok_or_else(|| Error::bad_json("alt_aliases must be strings"))?,
                    );
                }
            }
            Some(_) => return Err(Error::bad_json("alt_aliases must be an array")),
        }
        for a in aliases {
            let alias = RoomAliasId::parse(a)
                .map_err(|_| Error::invalid_param(format!("{a} is not a valid room alias")))?;
            if self.resolve_alias(&alias)?.as_deref() != Some(room_id) {
                return Err(Error::new(
                    ErrCode::BadAlias,
                    format!("{a} does not point to this room"),
                ));
            }
        }
        Ok(())
    }

    /// One event, if it is in this room and `user` may see it (`M_NOT_FOUND` otherwise, so that
    /// invisible events cannot be told from missing ones).
    pub fn visible_event(
        &self,
        room_id: &RoomId,
        user: &UserId,
        event_id: &str,
    ) -> Result<(Pdu, EventMeta)> {
        let not_found = || Error::not_found("Event not found");
        // In the room's timeline or backfilled history (not an outlier, not another room's).
        let at = self.position_of(room_id, event_id)?.ok_or_else(not_found)?;
        let meta = match at {
            At::Stream(_) => self.event_meta(event_id)?.ok_or_else(not_found)?,
            // History fetched from other servers has no stream position: it precedes all of
            // them.
            At::Backfilled(_) => EventMeta {
                room_id: room_id.to_owned(),
                count: 0,
                device_id: None,
                txn_id: None,
            },
        };
        let pdu = self.pdu(event_id)?.ok_or_else(not_found)?;
        if pdu.room_id.as_deref().is_some_and(|r| r != room_id) {
            return Err(not_found());
        }
        let visibility = self.history_visibility(room_id)?;
        if !self.may_read_history(room_id, user, &visibility)?
            || !self.viewer(room_id, user).can_see(&pdu, at)?
        {
            return Err(not_found());
        }
        Ok((pdu, meta))
    }
}
