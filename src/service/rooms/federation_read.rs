//! What other servers may read of a room: single events, the state at an event, auth chains,
//! backfill and missing events (`GET /event`, `/state`, `/state_ids`, `/event_auth`,
//! `/backfill`, `POST /get_missing_events`).
//!
//! Access, in this order: an unknown room is 404; a server the room's ACL denies is 403; a
//! server none of whose users has a membership in the room is 403 unless the room is
//! `world_readable` now. Then each event is judged by the history visibility in effect at it
//! (the state before it; for an `m.room.history_visibility` event, before or after it), with
//! the user rules applied to the requesting server's users: `world_readable` to all, `shared`
//! if one of them was joined at the event or joined later, `invited` if one was invited or
//! joined at it, `joined` if one was joined at it. Events a server may not see are served in
//! their redacted form in backfill, missing events and `/event` (the server still needs the
//! graph), and the state and auth chain at such an event are refused (403).

use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};

use ruma::{
    events::StateEventType, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedUserId, RoomId,
    ServerName,
};
use serde_json::{json, Value};

use super::{
    pdu::to_canonical,
    visibility::{At, Visibility, HISTORY_VISIBILITY},
    EventMeta, Pdu, Rooms,
};
use crate::{
    error::{Error, Result},
    storage::{keys, Table},
};

/// Most events one `/backfill` answers with (a larger `limit` is cut to this).
pub const MAX_BACKFILL: usize = 100;
/// Most events one `/get_missing_events` answers with.
pub const MAX_MISSING_EVENTS: usize = 20;
/// `limit` of `/get_missing_events` when the request gives none.
pub const DEFAULT_MISSING_EVENTS: usize = 10;
/// Most event ids a request may name (`v` of backfill, `earliest_events`/`latest_events`).
pub const MAX_REQUEST_EVENTS: usize = 100;

/// Most history visibility changes of a room a server's view holds (the rest, newer, are
/// judged as the last one held).
const MAX_VISIBILITY_CHANGES: usize = 10_000;

/// One server's view of one room, built once per request: its users there and the room's
/// history visibility changes, so that judging many events costs no more scans.
pub struct ServerView {
    room_id: ruma::OwnedRoomId,
    users: Vec<OwnedUserId>,
    /// (stream count, history visibility) of every `m.room.history_visibility` change, oldest
    /// first (from `visibility_log`).
    visibility_changes: Vec<(u64, Visibility)>,
}

/// The parameters of `/get_missing_events`.
pub struct MissingEventsQuery {
    pub earliest: Vec<OwnedEventId>,
    pub latest: Vec<OwnedEventId>,
    pub limit: usize,
    pub min_depth: u64,
}

impl Rooms {
    /// The users of `server` with any membership (join, invite, leave, ban, knock) in the room.
    fn server_users(&self, room_id: &RoomId, server: &ServerName) -> Result<Vec<OwnedUserId>> {
        Ok(self
            .members_with(room_id, |_| true)?
            .into_iter()
            .filter(|u| u.server_name() == server)
            .collect())
    }

    /// May `origin` read anything of the room at all? 404 for an unknown room, 403 when the
    /// server ACL denies it, 403 when none of its users is or was in the room and the room is
    /// not world readable. What it sees of each event is decided by [`ServerView::can_see`].
    pub fn server_view(&self, room_id: &RoomId, origin: &ServerName) -> Result<ServerView> {
        if !self.exists(room_id)? {
            return Err(Error::not_found("Unknown room"));
        }
        self.ensure_server_acl(room_id, origin)?;
        let users = self.server_users(room_id, origin)?;
        if users.is_empty() && self.history_visibility(room_id)? != "world_readable" {
            return Err(Error::forbidden(format!(
                "{origin} is not in the room and the room is not world readable"
            )));
        }
        // The history visibility changes: that key's rows of the per-key state log.
        let mut visibility_changes = Vec::new();
        let prefix = keys::prefix(&[room_id.as_str(), HISTORY_VISIBILITY, ""]);
        for entry in self
            .storage
            .scan_prefix(Table::StateByKey, &prefix)?
            .take(MAX_VISIBILITY_CHANGES)
        {
            let (k, id) = entry?;
            let hv = if id.is_empty() {
                Visibility::Shared
            } else {
                self.pdu(&String::from_utf8_lossy(&id))?
                    .map_or(Visibility::Joined, |p| {
                        Visibility::of_content(&p.content_value())
                    })
            };
            visibility_changes.push((keys::count_suffix(&k).unwrap_or(0), hv));
        }
        Ok(ServerView {
            room_id: room_id.to_owned(),
            users,
            visibility_changes,
        })
    }

    /// May `origin` see this event of the room (by the room's ACL, the server's users'
    /// memberships and the history visibility at the event)? For incoming federation code
    /// that serves events elsewhere. Unknown events and events of other rooms: no.
    pub fn server_can_see_event(
        &self,
        room_id: &RoomId,
        origin: &ServerName,
        event_id: &EventId,
    ) -> Result<bool> {
        let view = match self.server_view(room_id, origin) {
            Ok(v) => v,
            Err(Error::Matrix { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        let Some((pdu, meta)) = self.event_in_room(room_id, event_id)? else {
            return Ok(false);
        };
        view.can_see(self, &pdu, &meta)
    }

    /// The event and where it sits, if it is stored and belongs to `room_id`.
    fn event_in_room(
        &self,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<Option<(Pdu, EventMeta)>> {
        let Some(meta) = self.event_meta(event_id.as_str())? else {
            return Ok(None);
        };
        if meta.room_id != room_id {
            return Ok(None);
        }
        Ok(self.pdu(event_id.as_str())?.map(|p| (p, meta)))
    }

    /// The event as another server gets it: whole when it may see it, redacted otherwise.
    fn pdu_for_server(&self, view: &ServerView, pdu: &Pdu, meta: &EventMeta) -> Result<Value> {
        let whole = self
            .federation_pdu(&pdu.event_id)?
            .ok_or_else(|| Error::internal("stored event vanished"))?;
        if view.can_see(self, pdu, meta)? {
            return Ok(whole);
        }
        let rules = super::append::rules_for(&self.version(&view.room_id)?)?;
        let redacted = ruma::canonical_json::redact(to_canonical(whole)?, &rules.redaction, None)
            .map_err(|e| Error::internal(format!("redact: {e}")))?;
        Ok(serde_json::to_value(redacted)?)
    }

    /// The event `origin` may look at, for the endpoints that answer about one event: 404 when
    /// unknown or in another room, 403 when the server may not see it.
    fn server_visible_event(
        &self,
        view: &ServerView,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<(Pdu, EventMeta)> {
        let (pdu, meta) = self
            .event_in_room(room_id, event_id)?
            .ok_or_else(|| Error::not_found("Unknown event in this room"))?;
        if !view.can_see(self, &pdu, &meta)? {
            return Err(Error::forbidden(
                "You do not have permission to access this event",
            ));
        }
        Ok((pdu, meta))
    }

    /// The events of `room_id` among `ids`, as served: another room's event is never part of
    /// an answer about this room.
    fn federation_pdus(&self, room_id: &RoomId, ids: &[OwnedEventId]) -> Result<Vec<Value>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(p) = self.federation_pdu_of_room(room_id, id)? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// `GET /_matrix/federation/v1/event/{eventId}`: the event as a one-PDU transaction.
    pub fn federation_event(&self, origin: &ServerName, event_id: &EventId) -> Result<Value> {
        let meta = self
            .event_meta(event_id.as_str())?
            .ok_or_else(|| Error::not_found("Unknown event"))?;
        let view = self.server_view(&meta.room_id, origin)?;
        let pdu = self
            .pdu(event_id.as_str())?
            .ok_or_else(|| Error::not_found("Unknown event"))?;
        let value = self.pdu_for_server(&view, &pdu, &meta)?;
        Ok(self.transaction(vec![value]))
    }

    /// The state before `event_id` (not counting the event itself) as ids, and the auth chain
    /// of that state, each sorted.
    fn state_and_chain_ids(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<(Vec<OwnedEventId>, Vec<OwnedEventId>)> {
        let view = self.server_view(room_id, origin)?;
        self.server_visible_event(&view, room_id, event_id)?;
        let state = self
            .state_ids_before(event_id)?
            .ok_or_else(|| Error::not_found("The state at this event is not known"))?;
        let mut pdu_ids: Vec<OwnedEventId> = state
            .into_values()
            .filter(|id| self.pdu_of_room_or_none(room_id, id).is_some())
            .collect();
        pdu_ids.sort();
        let mut chain = self.auth_chain(room_id, pdu_ids.iter().map(|id| &**id))?;
        chain.sort();
        Ok((pdu_ids, chain))
    }

    /// `GET /_matrix/federation/v1/state_ids/{roomId}?event_id=`: the state before the event
    /// (the spec: "prior to considering any state changes induced by the requested event").
    pub fn federation_state_ids(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<Value> {
        let (pdu_ids, chain) = self.state_and_chain_ids(origin, room_id, event_id)?;
        Ok(json!({ "pdu_ids": pdu_ids, "auth_chain_ids": chain }))
    }

    /// `GET /_matrix/federation/v1/state/{roomId}?event_id=`: as `state_ids`, with the events.
    pub fn federation_state(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<Value> {
        let (pdu_ids, chain) = self.state_and_chain_ids(origin, room_id, event_id)?;
        Ok(json!({
            "pdus": self.federation_pdus(room_id, &pdu_ids)?,
            "auth_chain": self.federation_pdus(room_id, &chain)?,
        }))
    }

    /// `GET /_matrix/federation/v1/event_auth/{roomId}/{eventId}`: the event's auth chain.
    pub fn federation_event_auth(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<Value> {
        let view = self.server_view(room_id, origin)?;
        self.server_visible_event(&view, room_id, event_id)?;
        let mut chain = self.auth_chain(room_id, [event_id])?;
        chain.sort();
        Ok(json!({ "auth_chain": self.federation_pdus(room_id, &chain)? }))
    }

    /// `GET /_matrix/federation/v1/backfill/{roomId}?v=&limit=`: the `v` events and those
    /// before them, walking `prev_events` deepest first, at most `limit` (capped at
    /// [`MAX_BACKFILL`]). Ids that are unknown or of another room are ignored.
    pub fn federation_backfill(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        from: &[OwnedEventId],
        limit: usize,
    ) -> Result<Value> {
        let view = self.server_view(room_id, origin)?;
        let limit = limit.min(MAX_BACKFILL);
        // Deepest first; among equal depths the later stream position first.
        let mut heap: BinaryHeap<(u64, u64, OwnedEventId)> = BinaryHeap::new();
        let mut seen: HashSet<OwnedEventId> = HashSet::new();
        let mut found: HashMap<OwnedEventId, (Pdu, EventMeta)> = HashMap::new();
        for id in from.iter().take(MAX_REQUEST_EVENTS) {
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some((pdu, meta)) = self.event_in_room(room_id, id)? {
                heap.push((pdu.depth.into(), meta.count, id.clone()));
                found.insert(id.clone(), (pdu, meta));
            }
        }
        let mut pdus = Vec::new();
        while pdus.len() < limit {
            let Some((_, _, id)) = heap.pop() else {
                break;
            };
            let Some((pdu, meta)) = found.remove(&id) else {
                continue;
            };
            pdus.push(self.pdu_for_server(&view, &pdu, &meta)?);
            for prev in &pdu.prev_events {
                if !seen.insert(prev.clone()) {
                    continue;
                }
                if let Some((p, m)) = self.event_in_room(room_id, prev)? {
                    heap.push((p.depth.into(), m.count, prev.clone()));
                    found.insert(prev.clone(), (p, m));
                }
            }
        }
        Ok(self.transaction(pdus))
    }

    /// `POST /_matrix/federation/v1/get_missing_events/{roomId}`: walking `prev_events`
    /// breadth first from `latest_events` (not themselves returned), never into or past
    /// `earliest_events` nor below `min_depth`, at most `limit` events (capped at
    /// [`MAX_MISSING_EVENTS`]), returned oldest first.
    pub fn federation_missing_events(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        q: &MissingEventsQuery,
    ) -> Result<Value> {
        let view = self.server_view(room_id, origin)?;
        let limit = q.limit.min(MAX_MISSING_EVENTS);
        let mut seen: HashSet<OwnedEventId> = q
            .earliest
            .iter()
            .chain(q.latest.iter())
            .take(2 * MAX_REQUEST_EVENTS)
            .cloned()
            .collect();
        let mut queue: VecDeque<OwnedEventId> = VecDeque::new();
        for id in q.latest.iter().take(MAX_REQUEST_EVENTS) {
            if let Some((pdu, _)) = self.event_in_room(room_id, id)? {
                queue.extend(pdu.prev_events);
            }
        }
        let mut out: Vec<(u64, u64, Value)> = Vec::new();
        // Each step looks at one event id; a room graph can fan out, so bound the steps too.
        let mut steps = 0usize;
        while out.len() < limit && steps < 100 * (limit + 1) {
            let Some(id) = queue.pop_front() else {
                break;
            };
            steps += 1;
            if !seen.insert(id.clone()) {
                continue;
            }
            let Some((pdu, meta)) = self.event_in_room(room_id, &id)? else {
                continue;
            };
            let depth: u64 = pdu.depth.into();
            if depth < q.min_depth {
                continue;
            }
            out.push((depth, meta.count, self.pdu_for_server(&view, &pdu, &meta)?));
            queue.extend(pdu.prev_events);
        }
        out.sort_by_key(|(depth, count, _)| (*depth, *count));
        Ok(json!({ "events": out.into_iter().map(|(_, _, v)| v).collect::<Vec<_>>() }))
    }

    /// A transaction-shaped answer (`/event`, `/backfill`): this server, now, the PDUs.
    fn transaction(&self, pdus: Vec<Value>) -> Value {
        json!({
            "origin": self.globals.server_name,
            "origin_server_ts": MilliSecondsSinceUnixEpoch::now(),
            "pdus": pdus,
        })
    }
}

impl ServerView {
    /// The history visibility in effect at an event: the last change before it.
    fn visibility_before(
        &self,
        rooms: &Rooms,
        event_id: &EventId,
        count: u64,
    ) -> Result<Visibility> {
        // Events with an explicitly recorded state (joined into a fork) carry their own.
        if rooms
            .storage
            .contains(Table::EventState, event_id.as_bytes())?
        {
            let state = rooms.state_ids_before(event_id)?.unwrap_or_default();
            let key = (
                StateEventType::RoomHistoryVisibility.to_string(),
                String::new(),
            );
            return Ok(match state.get(&key) {
                Some(id) => rooms.pdu(id.as_str())?.map_or(Visibility::Joined, |p| {
                    Visibility::of_content(&p.content_value())
                }),
                None => Visibility::Shared,
            });
        }
        let before = self.visibility_changes.partition_point(|(c, _)| *c < count);
        Ok(before
            .checked_sub(1)
            .and_then(|i| self.visibility_changes.get(i))
            .map_or(Visibility::Shared, |(_, hv)| *hv))
    }

    fn visible_with(&self, rooms: &Rooms, count: u64, visibility: Visibility) -> Result<bool> {
        if visibility == Visibility::WorldReadable {
            return Ok(true);
        }
        for user in &self.users {
            if rooms.membership_allows(&self.room_id, user, visibility, At::Stream(count))? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// May the server see this event (of the view's room)?
    pub fn can_see(&self, rooms: &Rooms, pdu: &Pdu, meta: &EventMeta) -> Result<bool> {
        let before = self.visibility_before(rooms, &pdu.event_id, meta.count)?;
        if self.visible_with(rooms, meta.count, before)? {
            return Ok(true);
        }
        // A visibility change is visible to those who may see events under either setting.
        if pdu.kind.to_string() == StateEventType::RoomHistoryVisibility.to_string()
            && pdu.state_key.as_deref() == Some("")
        {
            let after = Visibility::of_content(&pdu.content_value());
            return self.visible_with(rooms, meta.count, after);
        }
        Ok(false)
    }
}
