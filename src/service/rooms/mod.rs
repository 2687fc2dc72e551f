//! Rooms: events, state, membership, timeline. The write path is `append.rs`: every local event is
//! built, authorized by the room version's rules (ruma state-res), signed and persisted here.

pub mod acl;
mod aggregations;
mod alias;
pub mod append;
pub mod backfill;
pub mod create;
pub mod directory;
pub mod event_state;
pub mod federation_read;
pub mod history;
pub mod membership;
mod notify;
pub mod pdu;
mod power;
pub mod purge;
pub mod relations;
mod remote;
mod resolve;
pub mod search;
mod send;
pub mod summary;
pub mod threads;
mod timestamp;
mod upgrade;
pub mod visibility;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use parking_lot::Mutex;
use ruma::{
    events::StateEventType, EventId, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId,
    UserId,
};
use serde::{Deserialize, Serialize};

pub use acl::ServerAcl;
pub use append::{NewEvent, Sent};
pub use create::{CreateRoom, Preset};
pub use event_state::StateIds;
pub use federation_read::{MissingEventsQuery, ServerView};
pub use membership::{MemberProfile, Moderation};
pub use pdu::Pdu;
pub use power::PowerLevels;

use crate::{
    error::{Error, Result},
    service::globals::Globals,
    storage::{keys, Storage, Table},
};

/// Per-room facts kept beside the events.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomMeta {
    pub version: RoomVersionId,
    /// The events with no successor yet: the next local event's `prev_events`.
    pub extremities: Vec<OwnedEventId>,
    pub depth: u64,
    /// Stream count of the latest event in the room.
    pub last_count: u64,
}

/// Where an event sits and who sent it from which device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventMeta {
    pub room_id: OwnedRoomId,
    pub count: u64,
    #[serde(default)]
    pub device_id: Option<String>,
    #[serde(default)]
    pub txn_id: Option<String>,
}

impl EventMeta {
    /// The transaction id, for the device that sent the event only.
    pub fn txn_id_for(&self, sender: &UserId, user: &UserId, device: &str) -> Option<&str> {
        match (&self.device_id, &self.txn_id) {
            (Some(d), Some(t)) if sender == user && d == device => Some(t),
            _ => None,
        }
    }
}

/// One change of room state, as kept in the state log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateChange {
    pub event_type: String,
    pub state_key: String,
    /// The event now in the state, or (with `removed`) the one that left it.
    pub event_id: OwnedEventId,
    /// The key left the state: state resolution chose none of the branches' events for it (a
    /// key only one branch had, whose event fails the auth rules against the resolved state).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

/// A user's current membership in a room, as kept for sync.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserRoom {
    pub membership: String,
    pub count: u64,
    pub event_id: OwnedEventId,
}

pub struct Rooms {
    pub(crate) storage: Storage,
    pub(crate) globals: Arc<Globals>,
    /// One writer per room at a time: the order of events in a room is decided under this lock.
    locks: Mutex<HashMap<OwnedRoomId, Arc<tokio::sync::Mutex<()>>>>,
    /// Joined members of each room, for waking syncs and answering member questions fast.
    joined_cache: Mutex<HashMap<OwnedRoomId, Arc<HashSet<OwnedUserId>>>>,
    /// Parsed state events (create, power levels, join rules, members) for the auth checks of the
    /// write path, which reads the same few events for every event of a room. Only used under
    /// the room's lock; a redaction (which rewrites a stored event) evicts its target.
    auth_cache: Mutex<HashMap<OwnedEventId, Arc<Pdu>>>,
    /// Push rules, evaluated for every event's local recipients inside the event's batch.
    pub(crate) push_rules: Arc<crate::service::push::rules::RuleStore>,
    /// Users to hand to the push gateway task once their notification is durable.
    pub(crate) pending_pushes: Arc<crate::service::push::PendingPushes>,
    /// Wakes the federation sender once queued events are durable.
    pub(crate) federation_wake: Arc<crate::service::federation::sender::Wake>,
    /// The audit log, for local users' membership changes (written by the membership
    /// operations, not by the event write path).
    pub(crate) audit: Option<Arc<crate::policy::audit::AuditLog>>,
    /// The registered appservices: events that interest one are queued for it in the event's
    /// batch, and aliases in an exclusive namespace are reserved for it.
    pub(crate) appservices: Option<Arc<crate::service::appservice::Appservices>>,
    /// The services, for the policy layer's check of every membership event about to be written
    /// ([`Rooms::admit_membership`]). Weak: `Rooms` lives inside `Services`. Set once by
    /// `Services::build` before the server serves anything.
    policy: std::sync::OnceLock<std::sync::Weak<crate::service::Services>>,
}

/// Bound of [`Rooms::auth_cache`]; when full it is emptied (the working set refills it quickly).
const AUTH_CACHE_ENTRIES: usize = 16_384;

/// Events of a timeline walk with their positions, and where the walk stopped.
pub type TimelineWalk = (Vec<(u64, Pdu)>, Option<u64>);

impl Rooms {
    pub fn new(
        storage: Storage,
        globals: Arc<Globals>,
        push_rules: Arc<crate::service::push::rules::RuleStore>,
        pending_pushes: Arc<crate::service::push::PendingPushes>,
        federation_wake: Arc<crate::service::federation::sender::Wake>,
    ) -> Rooms {
        Rooms {
            storage,
            globals,
            push_rules,
            pending_pushes,
            federation_wake,
            locks: Mutex::new(HashMap::new()),
            joined_cache: Mutex::new(HashMap::new()),
            auth_cache: Mutex::new(HashMap::new()),
            audit: None,
            appservices: None,
            policy: std::sync::OnceLock::new(),
        }
    }

    /// Let the policy layer decide about every membership event written from now on.
    pub fn set_policy(&self, services: std::sync::Weak<crate::service::Services>) {
        let _ = self.policy.set(services);
    }

    /// May `user`, who is not a member, read `room_id` (peek)? Only when it is world readable,
    /// and for this server's guests only when `m.room.guest_access` lets guests in too: a room
    /// closed to guests is not read by them either.
    pub(crate) fn peekable_by(&self, room_id: &RoomId, user: &UserId) -> Result<bool> {
        if self.history_visibility(room_id)? != "world_readable" {
            return Ok(false);
        }
        let Some(weak) = self.policy.get() else {
            return Ok(true);
        };
        let services = weak
            .upgrade()
            .ok_or_else(|| Error::internal("the server is shutting down"))?;
        crate::policy::access::guest_may_peek(&services, room_id, user)
    }

    /// The one enforcement point of the membership policies (closed user groups, rooms bound to
    /// a group, the federation policy, guest access): called for every event about to be
    /// written, local ones (`prepare_local`) and other servers' (`federation::incoming`), after
    /// the auth rules allowed it, under the room's lock. Events other than invites, joins and
    /// knocks pass. Without services (unit tests of `Rooms` alone) there is no policy to ask;
    /// once set, services that are gone (shutdown) refuse.
    pub(crate) fn admit_membership(&self, room_id: &RoomId, pdu: &Pdu) -> Result<()> {
        if pdu.kind != ruma::events::TimelineEventType::RoomMember {
            return Ok(());
        }
        let Some(weak) = self.policy.get() else {
            return Ok(());
        };
        let services = weak
            .upgrade()
            .ok_or_else(|| Error::internal("the server is shutting down"))?;
        crate::policy::access::check_membership_event(&services, room_id, pdu)
    }

    /// Queue events for the appservices they interest, reserve their exclusive aliases.
    pub fn with_appservices(
        mut self,
        appservices: Arc<crate::service::appservice::Appservices>,
    ) -> Self {
        self.appservices = Some(appservices);
        self
    }

    /// Write local users' membership changes to `audit`.
    pub fn with_audit(mut self, audit: Arc<crate::policy::audit::AuditLog>) -> Self {
        self.audit = Some(audit);
        self
    }

    /// Audit a membership change of `target` (`membership`: join, leave, invite, knock, ban;
    /// `action` says kick/unban/reject where `membership` alone does not) made by `sender`,
    /// when either of them is a local user.
    pub(crate) fn audit_membership(
        &self,
        room_id: &RoomId,
        target: &UserId,
        sender: &UserId,
        membership: &str,
        action: Option<&str>,
    ) {
        let Some(audit) = &self.audit else { return };
        let local = &self.globals.server_name;
        if target.server_name() != local && sender.server_name() != local {
            return;
        }
        let mut e = audit.entry("membership", Some(target.as_str()), None);
        e.room = Some(room_id.to_string());
        let mut detail = serde_json::json!({ "membership": membership });
        if sender != target {
            detail["sender"] = serde_json::json!(sender);
        }
        if let Some(a) = action {
            detail["action"] = serde_json::json!(a);
        }
        e.detail = detail;
        audit.note(e);
    }

    /// Take the room's write lock. Hold it across every event of one logical operation.
    pub async fn lock(&self, room_id: &RoomId) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self
            .locks
            .lock()
            .entry(room_id.to_owned())
            .or_default()
            .clone();
        m.lock_owned().await
    }

    pub fn meta(&self, room_id: &RoomId) -> Result<Option<RoomMeta>> {
        self.storage.get_json(Table::Rooms, room_id.as_bytes())
    }

    /// Store an event from another server without placing it in the timeline or state: an
    /// event of a room's auth chain or state, or one that was soft-failed.
    pub fn store_outlier(&self, event: &crate::service::federation::pdu::Incoming) -> Result<()> {
        if self
            .storage
            .contains(Table::Pdus, event.event_id.as_bytes())?
        {
            return Ok(());
        }
        self.storage.put(
            Table::Pdus,
            event.event_id.as_bytes(),
            &serde_json::to_vec(&event.stored_value()?)?,
        )
    }

    /// Ids of the rooms this server knows, at most `limit`.
    pub fn room_ids(&self, limit: usize) -> Result<Vec<OwnedRoomId>> {
        let mut out = Vec::new();
        for entry in self.storage.scan_prefix(Table::Rooms, b"")?.take(limit) {
            let (k, _) = entry?;
            if let Ok(id) = RoomId::parse(String::from_utf8_lossy(&k).as_ref()) {
                out.push(id);
            }
        }
        Ok(out)
    }

    pub fn exists(&self, room_id: &RoomId) -> Result<bool> {
        self.storage.contains(Table::Rooms, room_id.as_bytes())
    }

    pub fn version(&self, room_id: &RoomId) -> Result<RoomVersionId> {
        Ok(self
            .meta(room_id)?
            .ok_or_else(|| Error::not_found("Unknown room"))?
            .version)
    }

    pub fn pdu(&self, event_id: &str) -> Result<Option<Pdu>> {
        match self.storage.get(Table::Pdus, event_id.as_bytes())? {
            Some(v) => Ok(Some(Pdu::from_json(&v)?)),
            None => Ok(None),
        }
    }

    /// The stored event `event_id` as an event of `room_id`: what every reader uses that follows
    /// a reference from an event of `room_id` (auth events, prev events, the events of a room
    /// state, auth chains, resolution) or serves events of `room_id` to another server. Events
    /// never cross rooms: one stored for another room is `M_BAD_JSON` here, never an answer
    /// (room versions 1 and 2 let the sender choose event ids, so an id alone proves nothing).
    /// `Ok(None)`: not stored.
    pub fn pdu_of_room(&self, room_id: &RoomId, event_id: &EventId) -> Result<Option<Pdu>> {
        let Some(pdu) = self.pdu(event_id.as_str())? else {
            return Ok(None);
        };
        if pdu.room_id.as_deref() != Some(room_id) {
            return Err(Error::bad_json(format!(
                "event {event_id} belongs to another room than {room_id}"
            )));
        }
        Ok(Some(pdu))
    }

    /// [`Rooms::pdu_of_room`] for readers that skip what they cannot use (ruma's fetch
    /// closures, what is served): an event of another room is the same as an unknown one.
    pub fn pdu_of_room_or_none(&self, room_id: &RoomId, event_id: &EventId) -> Option<Pdu> {
        self.pdu_of_room(room_id, event_id).ok().flatten()
    }

    /// Every event `pdu` names (prev events and auth events) that this server stores must be of
    /// `pdu`'s room; the checks on receipt of every received or fetched event start here, so an
    /// event pointing into another room is rejected before anything reads through it.
    pub fn ensure_refs_in_room(&self, pdu: &Pdu) -> Result<()> {
        let room_id = pdu.room()?;
        for id in pdu.prev_events.iter().chain(pdu.auth_events.iter()) {
            self.pdu_of_room(room_id, id)?;
        }
        Ok(())
    }

    pub fn event_meta(&self, event_id: &str) -> Result<Option<EventMeta>> {
        self.storage.get_json(Table::EventMeta, event_id.as_bytes())
    }

    /// The current state event for (type, state_key).
    pub fn state_event_id(
        &self,
        room_id: &RoomId,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<OwnedEventId>> {
        let key = keys::join(&[room_id.as_str(), event_type, state_key]);
        match self.storage.get(Table::RoomState, &key)? {
            Some(v) => Ok(Some(
                OwnedEventId::try_from(String::from_utf8_lossy(&v).into_owned())
                    .map_err(Error::internal)?,
            )),
            None => Ok(None),
        }
    }

    pub fn state_get(
        &self,
        room_id: &RoomId,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<Pdu>> {
        match self.state_event_id(room_id, event_type, state_key)? {
            Some(id) => self.pdu(id.as_str()),
            None => Ok(None),
        }
    }

    /// The current state event for (type, state_key), from the write path's cache. Call only
    /// under the room's lock (see [`Rooms::auth_cache`]).
    pub(crate) fn state_get_for_auth(
        &self,
        room_id: &RoomId,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<Arc<Pdu>>> {
        let Some(id) = self.state_event_id(room_id, event_type, state_key)? else {
            return Ok(None);
        };
        if let Some(pdu) = self.auth_cache.lock().get(&id) {
            return Ok(Some(pdu.clone()));
        }
        let Some(pdu) = self.pdu(id.as_str())? else {
            return Ok(None);
        };
        let pdu = Arc::new(pdu);
        let mut cache = self.auth_cache.lock();
        if cache.len() >= AUTH_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(id, pdu.clone());
        Ok(Some(pdu))
    }

    /// Drop an event from the write path's cache because its stored form changes.
    pub(crate) fn evict_for_auth(&self, event_id: &ruma::EventId) {
        self.auth_cache.lock().remove(event_id);
    }

    /// The content of a current state event, as JSON.
    pub fn state_content(
        &self,
        room_id: &RoomId,
        event_type: &StateEventType,
        state_key: &str,
    ) -> Result<Option<serde_json::Value>> {
        Ok(self
            .state_get(room_id, &event_type.to_string(), state_key)?
            .map(|p| p.content_value()))
    }

    /// All current state events of a room.
    pub fn current_state(&self, room_id: &RoomId) -> Result<Vec<Pdu>> {
        let prefix = keys::prefix(&[room_id.as_str()]);
        let mut out = Vec::new();
        for entry in self.storage.scan_prefix(Table::RoomState, &prefix)? {
            let (_, v) = entry?;
            if let Some(p) = self.pdu(&String::from_utf8_lossy(&v))? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// The current state events of one type (all state keys).
    pub fn current_state_of_type(&self, room_id: &RoomId, event_type: &str) -> Result<Vec<Pdu>> {
        let prefix = keys::prefix(&[room_id.as_str(), event_type]);
        let mut out = Vec::new();
        for entry in self.storage.scan_prefix(Table::RoomState, &prefix)? {
            let (_, v) = entry?;
            if let Some(p) = self.pdu(&String::from_utf8_lossy(&v))? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// The current state as (type, state_key) -> event id.
    pub fn current_state_ids(
        &self,
        room_id: &RoomId,
    ) -> Result<HashMap<(String, String), OwnedEventId>> {
        let prefix = keys::prefix(&[room_id.as_str()]);
        let mut out = HashMap::new();
        for entry in self.storage.scan_prefix(Table::RoomState, &prefix)? {
            let (k, v) = entry?;
            let parts = keys::split(&k);
            if parts.len() >= 3 {
                let id = OwnedEventId::try_from(String::from_utf8_lossy(&v).into_owned())
                    .map_err(Error::internal)?;
                out.insert((parts[1].to_owned(), parts[2..].join("\u{ff}")), id);
            }
        }
        Ok(out)
    }

    /// The current membership of `user` in `room`: "join", "invite", "leave", "ban", "knock".
    pub fn membership(&self, room_id: &RoomId, user: &UserId) -> Result<Option<String>> {
        let key = keys::join(&[room_id.as_str(), user.as_str()]);
        Ok(self
            .storage
            .get(Table::RoomMembers, &key)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn is_joined(&self, room_id: &RoomId, user: &UserId) -> Result<bool> {
        Ok(self.joined_members(room_id)?.contains(user))
    }

    /// Joined members, cached in memory and kept current by the write path.
    pub fn joined_members(&self, room_id: &RoomId) -> Result<Arc<HashSet<OwnedUserId>>> {
        if let Some(set) = self.joined_cache.lock().get(room_id) {
            return Ok(set.clone());
        }
        let set = Arc::new(self.members_with(room_id, |m| m == "join")?);
        // The first loaded set wins: the write path keeps that one current (`update_joined`), and
        // a concurrent load that read the table before a membership write must not replace it.
        Ok(self
            .joined_cache
            .lock()
            .entry(room_id.to_owned())
            .or_insert(set)
            .clone())
    }

    /// Members whose current membership passes `pred`.
    pub fn members_with(
        &self,
        room_id: &RoomId,
        pred: impl Fn(&str) -> bool,
    ) -> Result<HashSet<OwnedUserId>> {
        let prefix = keys::prefix(&[room_id.as_str()]);
        let mut set = HashSet::new();
        for entry in self.storage.scan_prefix(Table::RoomMembers, &prefix)? {
            let (k, v) = entry?;
            if pred(&String::from_utf8_lossy(&v)) {
                if let Some(u) = keys::last_part(&k).and_then(|u| UserId::parse(u).ok()) {
                    set.insert(u);
                }
            }
        }
        Ok(set)
    }

    /// Every room the user has a membership in, with that membership.
    pub fn user_rooms(&self, user: &UserId) -> Result<Vec<(OwnedRoomId, UserRoom)>> {
        let prefix = keys::prefix(&[user.as_str()]);
        let mut out = Vec::new();
        for entry in self.storage.scan_prefix(Table::UserRooms, &prefix)? {
            let (k, v) = entry?;
            let Some(room) = keys::last_part(&k).and_then(|r| RoomId::parse(r).ok()) else {
                continue;
            };
            out.push((room, serde_json::from_slice(&v)?));
        }
        Ok(out)
    }

    pub fn joined_rooms(&self, user: &UserId) -> Result<Vec<OwnedRoomId>> {
        Ok(self
            .user_rooms(user)?
            .into_iter()
            .filter(|(_, r)| r.membership == "join")
            .map(|(id, _)| id)
            .collect())
    }

    /// Forget a room the user has left: it disappears from their sync.
    pub fn forget(&self, room_id: &RoomId, user: &UserId) -> Result<()> {
        let mut batch = self.storage.batch();
        batch.delete(
            Table::UserRooms,
            &keys::join(&[user.as_str(), room_id.as_str()]),
        )?;
        batch.commit()
    }

    /// Timeline events of a room with stream count in `(after, up_to]`, oldest first, at most
    /// `limit` of the newest ones. Returns whether more were left out (a limited timeline).
    pub fn timeline_since(
        &self,
        room_id: &RoomId,
        after: u64,
        up_to: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, Pdu)>, bool)> {
        let prefix = keys::prefix(&[room_id.as_str()]);
        let from = keys::with_count(&[room_id.as_str()], up_to);
        let mut out = Vec::new();
        let mut limited = false;
        for entry in self
            .storage
            .scan_from(Table::Timeline, &prefix, &from, true)?
        {
            let (k, v) = entry?;
            let count = keys::count_suffix(&k).unwrap_or(0);
            if count <= after {
                break;
            }
            if out.len() == limit {
                limited = true;
                break;
            }
            if let Some(p) = self.pdu(&String::from_utf8_lossy(&v))? {
                out.push((count, p));
            }
        }
        out.reverse();
        Ok((out, limited))
    }

    /// Walk the timeline from `from` (exclusive) backwards or forwards, up to `limit` events
    /// that pass `keep`. Returns the events in walking order and the count of the last one seen.
    pub fn paginate(
        &self,
        room_id: &RoomId,
        from: u64,
        backward: bool,
        limit: usize,
        mut keep: impl FnMut(u64, &Pdu) -> Result<bool>,
    ) -> Result<TimelineWalk> {
        let prefix = keys::prefix(&[room_id.as_str()]);
        let start = if backward {
            keys::with_count(&[room_id.as_str()], from.saturating_sub(1))
        } else {
            keys::with_count(&[room_id.as_str()], from.saturating_add(1))
        };
        let mut out = Vec::new();
        let mut last = None;
        // Bound the walk so a filter that matches nothing cannot scan a whole huge room.
        let mut scanned = 0usize;
        for entry in self
            .storage
            .scan_from(Table::Timeline, &prefix, &start, backward)?
        {
            let (k, v) = entry?;
            let count = keys::count_suffix(&k).unwrap_or(0);
            if backward && count >= from || !backward && count <= from {
                continue;
            }
            scanned += 1;
            last = Some(count);
            if let Some(p) = self.pdu(&String::from_utf8_lossy(&v))? {
                if keep(count, &p)? {
                    out.push((count, p));
                }
            }
            if out.len() >= limit || scanned >= limit.max(1) * 20 {
                break;
            }
        }
        Ok((out, last))
    }

    /// State changes of a room with count in `(after, up_to]`, oldest first.
    pub fn state_changes(
        &self,
        room_id: &RoomId,
        after: u64,
        up_to: u64,
    ) -> Result<Vec<(u64, StateChange)>> {
        let prefix = keys::prefix(&[room_id.as_str()]);
        let from = keys::with_count(&[room_id.as_str()], after.saturating_add(1));
        let mut out = Vec::new();
        for entry in self
            .storage
            .scan_from(Table::StateLog, &prefix, &from, false)?
        {
            let (k, v) = entry?;
            let count = keys::count_suffix(&k).unwrap_or(0);
            if count > up_to {
                break;
            }
            out.push((count, serde_json::from_slice(&v)?));
        }
        Ok(out)
    }

    /// State of the room just before stream position `count` (exclusive), read from the per-key
    /// state log (`state_by_key`): one seek per state key the room ever had, however long its
    /// history. Used for sync's `state` section of limited timelines, left rooms, `/context`,
    /// `/members?at=` and the state before an event that federation serves.
    pub fn state_at(
        &self,
        room_id: &RoomId,
        count: u64,
    ) -> Result<HashMap<(String, String), OwnedEventId>> {
        self.state_of_prefix_at(&keys::prefix(&[room_id.as_str()]), count)
    }

    /// The state events of one type just before stream position `count`, by state key (e.g. the
    /// members at a position without reading the rest of the state).
    pub fn state_of_type_at(
        &self,
        room_id: &RoomId,
        event_type: &str,
        count: u64,
    ) -> Result<HashMap<(String, String), OwnedEventId>> {
        self.state_of_prefix_at(&keys::prefix(&[room_id.as_str(), event_type]), count)
    }

    /// One state entry just before stream position `count`: a single seek.
    pub fn state_get_at(
        &self,
        room_id: &RoomId,
        count: u64,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<OwnedEventId>> {
        let found = self.state_of_prefix_at(
            &keys::prefix(&[room_id.as_str(), event_type, state_key]),
            count,
        )?;
        Ok(found.into_values().next())
    }

    fn state_of_prefix_at(
        &self,
        prefix: &[u8],
        count: u64,
    ) -> Result<HashMap<(String, String), OwnedEventId>> {
        let mut state = HashMap::new();
        let Some(last) = count.checked_sub(1) else {
            return Ok(state);
        };
        for (k, v) in self
            .storage
            .latest_per_group(Table::StateByKey, prefix, last)?
        {
            if v.is_empty() {
                continue; // the key had left the state by then
            }
            let parts = keys::split(&k[..k.len() - 9]);
            let (Some(kind), Some(state_key)) = (parts.get(1), parts.get(2)) else {
                continue;
            };
            let event_id = std::str::from_utf8(&v)
                .ok()
                .and_then(|s| OwnedEventId::try_from(s).ok())
                .ok_or_else(|| Error::internal("state_by_key holds a bad event id"))?;
            state.insert((kind.to_string(), state_key.to_string()), event_id);
        }
        Ok(state)
    }

    /// Keep the cached joined set current after a membership change, instead of reloading the
    /// whole member list from storage on every join (copy-on-write: readers keep their snapshot).
    /// The write path loads the set before writing, so the entry is there to update.
    pub(crate) fn update_joined(&self, room_id: &RoomId, user: &UserId, joined: bool) {
        let mut cache = self.joined_cache.lock();
        if let Some(set) = cache.get_mut(room_id) {
            if set.contains(user) != joined {
                let set = Arc::make_mut(set);
                if joined {
                    set.insert(user.to_owned());
                } else {
                    set.remove(user);
                }
            }
        }
    }

    /// Room ids currently published in the directory.
    /// The rooms of the server's own directory list (not those appservices published).
    pub fn public_rooms(&self) -> Result<Vec<OwnedRoomId>> {
        Ok(self
            .directory_rooms(&crate::service::rooms::directory::Networks::Main)?
            .into_iter()
            .collect())
    }

    /// The rooms of the directory lists `networks` selects. A room in the server's list has the
    /// key `room`; one an appservice published for a network `room 0xff instance id`.
    pub fn directory_rooms(
        &self,
        networks: &crate::service::rooms::directory::Networks,
    ) -> Result<std::collections::BTreeSet<OwnedRoomId>> {
        use crate::service::rooms::directory::Networks;
        let mut out = std::collections::BTreeSet::new();
        for entry in self.storage.scan_prefix(Table::PublicRooms, b"")? {
            let (k, _) = entry?;
            let mut parts = k.splitn(2, |b| *b == keys::SEP);
            let room = parts.next().unwrap_or_default();
            let instance = parts
                .next()
                .map(|i| String::from_utf8_lossy(i).into_owned());
            let wanted = match (networks, &instance) {
                (Networks::All, _) => true,
                (Networks::Main, None) => true,
                (Networks::Instance(want), Some(i)) => want == i,
                _ => false,
            };
            if !wanted {
                continue;
            }
            if let Ok(id) = RoomId::parse(String::from_utf8_lossy(room).as_ref()) {
                out.insert(id);
            }
        }
        Ok(out)
    }

    /// Publish or unpublish a room in an appservice's network list (`instance`).
    pub fn set_public_in_network(
        &self,
        room_id: &RoomId,
        instance: &str,
        public: bool,
    ) -> Result<()> {
        let key = keys::join(&[room_id.as_str(), instance]);
        let mut b = self.storage.batch();
        if public {
            b.put(Table::PublicRooms, &key, b"")?;
        } else {
            b.delete(Table::PublicRooms, &key)?;
        }
        b.commit()
    }

    pub fn set_public(&self, room_id: &RoomId, public: bool) -> Result<()> {
        let mut b = self.storage.batch();
        if public {
            b.put(Table::PublicRooms, room_id.as_bytes(), b"")?;
        } else {
            b.delete(Table::PublicRooms, room_id.as_bytes())?;
        }
        b.commit()
    }

    pub fn is_public(&self, room_id: &RoomId) -> Result<bool> {
        self.storage
            .contains(Table::PublicRooms, room_id.as_bytes())
    }
}

/// Room versions this server understands and can create.
pub static SUPPORTED_ROOM_VERSIONS: &[RoomVersionId] = &[
    RoomVersionId::V1,
    RoomVersionId::V2,
    RoomVersionId::V3,
    RoomVersionId::V4,
    RoomVersionId::V5,
    RoomVersionId::V6,
    RoomVersionId::V7,
    RoomVersionId::V8,
    RoomVersionId::V9,
    RoomVersionId::V10,
    RoomVersionId::V11,
    RoomVersionId::V12,
];
