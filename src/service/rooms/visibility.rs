//! Who may see which event: the `m.room.history_visibility` in force *at the event* applied to
//! the user's membership at it (client-server spec, "History visibility"). A room switched from
//! `joined` to `shared` or `world_readable` exposes nothing that was sent under `joined`: each
//! event keeps the setting it was sent under.
//!
//! Every path that hands room events to a client judges them with a [`Viewer`] (`/messages`,
//! `/context`, `/event`, `/sync` and sliding sync timelines, `/search`, `/relations`,
//! `/threads`, `/notifications`, `/timestamp_to_event`, and the relations bundled into every
//! event by `aggregations.rs`); federation's [`super::ServerView`] uses the same rules and log.
//!
//! The history visibility in force at a position comes from the per-key state log
//! (`state_by_key`), whose rows for `m.room.history_visibility` are one per change (written with
//! the state change, in its batch): the value before a timeline event is the last row below its
//! stream count, one seek.
//! Events joined into a fork carry their own state (`event_state`) and are judged by it.
//! Backfilled history has rows of its own in `visibility_log` (`b`, by backfill sequence): an
//! event there is judged
//! by the nearest older backfilled visibility event; older than all of them, by the visibility
//! the room had when this server got its state, unless that event is itself backfilled (then
//! what came before it is unknown: `shared` if the create event was reached, as the spec's
//! default, and `joined`, the strictest, otherwise).

use std::collections::HashMap;

use ruma::{events::TimelineEventType, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::Value;

use super::{relations::Child, Pdu, Rooms};
use crate::{
    error::Result,
    storage::{keys, Batch, Table},
};

pub const HISTORY_VISIBILITY: &str = "m.room.history_visibility";

/// How far back the latest join of a user is looked for in their membership history of one
/// room; a user with more changes than this since their last join counts as never joined after.
const MAX_MEMBERSHIP_SCAN: usize = 1000;

/// An `m.room.history_visibility` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Visibility {
    WorldReadable,
    Shared,
    Invited,
    Joined,
}

impl Visibility {
    /// The setting of an `m.room.history_visibility` content; absent or not understood means
    /// `shared`, as the spec says.
    pub fn of_content(content: &Value) -> Visibility {
        match content.get("history_visibility").and_then(Value::as_str) {
            Some("world_readable") => Visibility::WorldReadable,
            Some("invited") => Visibility::Invited,
            Some("joined") => Visibility::Joined,
            _ => Visibility::Shared,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::WorldReadable => "world_readable",
            Visibility::Shared => "shared",
            Visibility::Invited => "invited",
            Visibility::Joined => "joined",
        }
    }

    /// The spec's rules for one user at one event: `membership` is the user's membership at the
    /// event, `joined_later` whether they joined the room at some point after it.
    pub fn allows(self, membership: Option<&str>, joined_later: bool) -> bool {
        match self {
            Visibility::WorldReadable => true,
            _ if membership == Some("join") => true,
            Visibility::Shared => joined_later,
            Visibility::Invited => membership == Some("invite"),
            Visibility::Joined => false,
        }
    }
}

/// Where an event sits in a room's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// In the timeline, at this stream count.
    Stream(u64),
    /// In the backfilled history, at this sequence (higher is older; before every stream count).
    Backfilled(u64),
}

impl At {
    /// From a `/messages` position (`history::parse_position`: negative for backfilled ones).
    pub fn from_position(pos: i128) -> At {
        if pos >= 0 {
            At::Stream(u64::try_from(pos).unwrap_or(u64::MAX))
        } else {
            At::Backfilled(u64::try_from(-pos).unwrap_or(u64::MAX))
        }
    }
}

/// What the judgement needs to know of an event besides its position.
struct Seen<'a> {
    event_id: &'a str,
    /// Sent by another server (only those can sit on a fork with a state of their own).
    remote: bool,
    /// The viewer's own membership event: always theirs to see (a kick or ban they suffered,
    /// an invite they got), whatever the setting.
    own_membership: bool,
    /// For a history visibility event: its own setting (it is visible to those who could see
    /// events under the setting before it or the one it makes, so a change is seen by both).
    new_setting: Option<Visibility>,
}

/// The history visibility of one room along its history, looked up at positions. Remembers the
/// stretch of history the last answer holds for, so a page of events costs a seek or two.
pub(crate) struct VisibilityLog<'r> {
    rooms: &'r Rooms,
    room_id: OwnedRoomId,
    /// (lo, hi, setting): in force before the timeline events with counts in `lo..=hi`.
    stream: Option<(u64, u64, Visibility)>,
    /// (lo, hi, setting): in force before the backfilled events with sequences in `lo..hi`.
    backfilled: Option<(u64, u64, Visibility)>,
    /// The settings of visibility events read so far.
    settings: HashMap<Vec<u8>, Visibility>,
}

impl<'r> VisibilityLog<'r> {
    pub(crate) fn new(rooms: &'r Rooms, room_id: &RoomId) -> Self {
        VisibilityLog {
            rooms,
            room_id: room_id.to_owned(),
            stream: None,
            backfilled: None,
            settings: HashMap::new(),
        }
    }

    fn prefix(&self, kind: &str) -> Vec<u8> {
        keys::prefix(&[self.room_id.as_str(), kind])
    }

    /// The timeline's changes of the setting are the history visibility's own rows of the
    /// per-key state log (`state_by_key`): this prefix, and the key at a count.
    fn stream_prefix(&self) -> Vec<u8> {
        keys::prefix(&[self.room_id.as_str(), HISTORY_VISIBILITY, ""])
    }

    fn stream_key(&self, count: u64) -> Vec<u8> {
        keys::with_count(&[self.room_id.as_str(), HISTORY_VISIBILITY, ""], count)
    }

    /// The setting a row names (empty: the key left the state, the spec's default applies; an
    /// event we cannot read: the strictest, as nothing says it was more open).
    fn setting(&mut self, event_id: &[u8]) -> Result<Visibility> {
        if event_id.is_empty() {
            return Ok(Visibility::Shared);
        }
        if let Some(v) = self.settings.get(event_id) {
            return Ok(*v);
        }
        let v = match self.rooms.pdu(&String::from_utf8_lossy(event_id))? {
            Some(p) => Visibility::of_content(&p.content_value()),
            None => Visibility::Joined,
        };
        self.settings.insert(event_id.to_vec(), v);
        Ok(v)
    }

    /// The setting in force just before the event (see the module docs).
    fn before(&mut self, seen: &Seen<'_>, at: At) -> Result<Visibility> {
        match at {
            At::Stream(count) => {
                if seen.remote {
                    if let Some(v) = self.before_from_own_state(seen.event_id)? {
                        return Ok(v);
                    }
                }
                self.before_count(count)
            }
            At::Backfilled(seq) => self.before_backfilled(seq),
        }
    }

    /// An event with a recorded state of its own (joined into a fork): the setting there.
    fn before_from_own_state(&mut self, event_id: &str) -> Result<Option<Visibility>> {
        if !self
            .rooms
            .storage
            .contains(Table::EventState, event_id.as_bytes())?
        {
            return Ok(None);
        }
        let Ok(id) = ruma::EventId::parse(event_id) else {
            return Ok(None);
        };
        let Some(state) = self.rooms.state_ids_before(&id)? else {
            return Ok(None);
        };
        let key = (HISTORY_VISIBILITY.to_owned(), String::new());
        Ok(Some(match state.get(&key) {
            Some(hv) => self.setting(hv.as_bytes())?,
            None => Visibility::Shared,
        }))
    }

    /// The setting before the timeline event at `count`: the last change below it.
    pub(crate) fn before_count(&mut self, count: u64) -> Result<Visibility> {
        if let Some((lo, hi, v)) = self.stream {
            if lo <= count && count <= hi {
                return Ok(v);
            }
        }
        let prefix = self.stream_prefix();
        let below = match count.checked_sub(1) {
            Some(c) => self
                .rooms
                .storage
                .scan_from(Table::StateByKey, &prefix, &self.stream_key(c), true)?
                .next()
                .transpose()?,
            None => None,
        };
        let (lo, v) = match below {
            Some((k, id)) => (
                keys::count_suffix(&k).unwrap_or(0).saturating_add(1),
                self.setting(&id)?,
            ),
            None => (0, Visibility::Shared),
        };
        let hi = self
            .rooms
            .storage
            .scan_from(Table::StateByKey, &prefix, &self.stream_key(count), false)?
            .next()
            .transpose()?
            .and_then(|(k, _)| keys::count_suffix(&k))
            .unwrap_or(u64::MAX);
        self.stream = Some((lo, hi, v));
        Ok(v)
    }

    /// Whether the setting changes anywhere in `(from, to]` of the timeline.
    pub(crate) fn changes_between(&self, from: u64, to: u64) -> Result<bool> {
        Ok(self
            .rooms
            .storage
            .scan_from(
                Table::StateByKey,
                &self.stream_prefix(),
                &self.stream_key(from.saturating_add(1)),
                false,
            )?
            .next()
            .transpose()?
            .and_then(|(k, _)| keys::count_suffix(&k))
            .is_some_and(|c| c <= to))
    }

    /// The setting before the backfilled event at `seq`: the nearest older backfilled change,
    /// else what preceded all of them.
    fn before_backfilled(&mut self, seq: u64) -> Result<Visibility> {
        if let Some((lo, hi, v)) = self.backfilled {
            if lo <= seq && seq < hi {
                return Ok(v);
            }
        }
        let room = self.room_id.as_str().to_owned();
        let prefix = self.prefix("b");
        let lo = self
            .rooms
            .storage
            .scan_from(
                Table::VisibilityLog,
                &prefix,
                &keys::with_count(&[&room, "b"], seq),
                true,
            )?
            .next()
            .transpose()?
            .and_then(|(k, _)| keys::count_suffix(&k))
            .unwrap_or(0);
        let older = self
            .rooms
            .storage
            .scan_from(
                Table::VisibilityLog,
                &prefix,
                &keys::with_count(&[&room, "b"], seq.saturating_add(1)),
                false,
            )?
            .next()
            .transpose()?;
        let (hi, v) = match older {
            Some((k, id)) => (
                keys::count_suffix(&k).unwrap_or(u64::MAX),
                self.setting(&id)?,
            ),
            None => (u64::MAX, self.before_all_backfilled()?),
        };
        self.backfilled = Some((lo, hi, v));
        Ok(v)
    }

    /// The setting before the oldest backfilled visibility change (or before all backfilled
    /// history when there is none): the one in the state this server got first, unless that
    /// event is itself in the backfilled history.
    fn before_all_backfilled(&mut self) -> Result<Visibility> {
        let first = self
            .rooms
            .storage
            .scan_prefix(Table::StateByKey, &self.stream_prefix())?
            .next()
            .transpose()?;
        match first {
            None => Ok(Visibility::Shared),
            Some((_, id)) if id.is_empty() => Ok(Visibility::Shared),
            Some((_, id)) => {
                if !self.rooms.is_backfilled(&String::from_utf8_lossy(&id))? {
                    return self.setting(&id);
                }
                // What came before it is not known: the spec's default if nothing came before
                // (the create event is in the backfilled history), else the strictest.
                let create = self
                    .rooms
                    .state_event_id(&self.room_id, "m.room.create", "")?;
                Ok(match create {
                    Some(c) if self.rooms.is_backfilled(c.as_str())? => Visibility::Shared,
                    _ => Visibility::Joined,
                })
            }
        }
    }
}

/// One user's membership history in one room, looked up at positions.
struct MembershipLog {
    user: OwnedUserId,
    /// (lo, hi, membership): the membership at counts in `lo..hi`.
    cached: Option<(u64, u64, Option<String>)>,
    /// The stream count of the user's latest join (None: never, as far as looked).
    last_join: Option<Option<u64>>,
}

impl MembershipLog {
    fn new(user: &UserId) -> Self {
        MembershipLog {
            user: user.to_owned(),
            cached: None,
            last_join: None,
        }
    }

    /// The membership at stream count `count` (the last change at or before it).
    fn at(&mut self, rooms: &Rooms, room_id: &RoomId, count: u64) -> Result<Option<String>> {
        if let Some((lo, hi, m)) = &self.cached {
            if *lo <= count && count < *hi {
                return Ok(m.clone());
            }
        }
        let prefix = keys::prefix(&[self.user.as_str(), room_id.as_str()]);
        let key = |c: u64| {
            let mut k = prefix.clone();
            k.extend_from_slice(&c.to_be_bytes());
            k
        };
        let (lo, m) = match rooms
            .storage
            .scan_from(Table::MembershipLog, &prefix, &key(count), true)?
            .next()
            .transpose()?
        {
            Some((k, v)) => (
                keys::count_suffix(&k).unwrap_or(0),
                Some(String::from_utf8_lossy(&v).into_owned()),
            ),
            None => (0, None),
        };
        let hi = rooms
            .storage
            .scan_from(
                Table::MembershipLog,
                &prefix,
                &key(count.saturating_add(1)),
                false,
            )?
            .next()
            .transpose()?
            .and_then(|(k, _)| keys::count_suffix(&k))
            .unwrap_or(u64::MAX);
        self.cached = Some((lo, hi, m.clone()));
        Ok(m)
    }

    fn last_join(&mut self, rooms: &Rooms, room_id: &RoomId) -> Result<Option<u64>> {
        if let Some(l) = self.last_join {
            return Ok(l);
        }
        let prefix = keys::prefix(&[self.user.as_str(), room_id.as_str()]);
        let mut upper = prefix.clone();
        upper.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut found = None;
        for entry in rooms
            .storage
            .scan_from(Table::MembershipLog, &prefix, &upper, true)?
            .take(MAX_MEMBERSHIP_SCAN)
        {
            let (k, v) = entry?;
            if &*v == b"join" {
                found = keys::count_suffix(&k);
                break;
            }
        }
        self.last_join = Some(found);
        Ok(found)
    }

    /// Whether the membership changes anywhere in `(from, to]`.
    fn changes_between(&self, rooms: &Rooms, room_id: &RoomId, from: u64, to: u64) -> Result<bool> {
        let prefix = keys::prefix(&[self.user.as_str(), room_id.as_str()]);
        let mut start = prefix.clone();
        start.extend_from_slice(&from.saturating_add(1).to_be_bytes());
        Ok(rooms
            .storage
            .scan_from(Table::MembershipLog, &prefix, &start, false)?
            .next()
            .transpose()?
            .and_then(|(k, _)| keys::count_suffix(&k))
            .is_some_and(|c| c <= to))
    }

    /// Does the spec let this user see an event under `setting` at `at`?
    fn allows(
        &mut self,
        rooms: &Rooms,
        room_id: &RoomId,
        setting: Visibility,
        at: At,
    ) -> Result<bool> {
        if setting == Visibility::WorldReadable {
            return Ok(true);
        }
        // Backfilled history precedes every membership this server recorded.
        let (membership, count) = match at {
            At::Stream(c) => (self.at(rooms, room_id, c)?, Some(c)),
            At::Backfilled(_) => (None, None),
        };
        if membership.as_deref() == Some("join") {
            return Ok(true);
        }
        let joined_later = setting == Visibility::Shared
            && match (self.last_join(rooms, room_id)?, count) {
                (Some(j), Some(c)) => j > c,
                (Some(_), None) => true,
                (None, _) => false,
            };
        Ok(setting.allows(membership.as_deref(), joined_later))
    }
}

/// Judges which events of one room one user may see. Make one per page of events (it remembers
/// the stretches of history its lookups covered); see the module docs.
pub struct Viewer<'r> {
    rooms: &'r Rooms,
    log: VisibilityLog<'r>,
    membership: MembershipLog,
}

impl<'r> Viewer<'r> {
    pub fn user(&self) -> &UserId {
        &self.membership.user
    }

    /// May the user see `pdu`, which sits at `at`?
    pub fn can_see(&mut self, pdu: &Pdu, at: At) -> Result<bool> {
        let state_key = pdu.state_key.as_deref();
        let new_setting = (pdu.kind == TimelineEventType::RoomHistoryVisibility
            && state_key == Some(""))
        .then(|| Visibility::of_content(&pdu.content_value()));
        let seen = Seen {
            event_id: pdu.event_id.as_str(),
            remote: pdu.sender.server_name() != self.rooms.globals.server_name,
            own_membership: pdu.kind == TimelineEventType::RoomMember
                && state_key == Some(self.membership.user.as_str()),
            new_setting,
        };
        self.judge(&seen, at)
    }

    /// May the user see a child from the relations index (at stream count `count`)? Only
    /// events whose state key matters are read in full.
    pub(super) fn can_see_child(&mut self, child: &Child, count: u64) -> Result<bool> {
        if child.kind == "m.room.member" || child.kind == HISTORY_VISIBILITY {
            return match self.rooms.pdu(&child.event_id)? {
                Some(p) => self.can_see(&p, At::Stream(count)),
                None => Ok(false),
            };
        }
        let remote = match ruma::UserId::parse(child.sender.as_str()) {
            Ok(u) => u.server_name() != self.rooms.globals.server_name,
            // Older index entries do not name the sender.
            Err(_) => true,
        };
        let seen = Seen {
            event_id: &child.event_id,
            remote,
            own_membership: false,
            new_setting: None,
        };
        self.judge(&seen, At::Stream(count))
    }

    fn judge(&mut self, seen: &Seen<'_>, at: At) -> Result<bool> {
        if seen.own_membership {
            return Ok(true);
        }
        let before = self.log.before(seen, at)?;
        let room_id = self.log.room_id.clone();
        if self.membership.allows(self.rooms, &room_id, before, at)? {
            return Ok(true);
        }
        match seen.new_setting {
            Some(after) if after != before => {
                self.membership.allows(self.rooms, &room_id, after, at)
            }
            _ => Ok(false),
        }
    }

    /// Whether neither the room's history visibility nor the user's membership changes in the
    /// timeline between `from` (exclusive) and `to` (inclusive): then every ordinary event in
    /// that stretch is judged alike.
    pub(super) fn unchanged_between(&self, from: u64, to: u64) -> Result<bool> {
        Ok(!self.log.changes_between(from, to)?
            && !self
                .membership
                .changes_between(self.rooms, &self.log.room_id, from, to)?)
    }
}

impl Rooms {
    /// A judge of what `user` may see of `room_id` (see [`Viewer`]).
    pub fn viewer(&self, room_id: &RoomId, user: &UserId) -> Viewer<'_> {
        Viewer {
            rooms: self,
            log: VisibilityLog::new(self, room_id),
            membership: MembershipLog::new(user),
        }
    }

    /// Where a stored event of `room_id` sits: its stream count, or its backfill sequence.
    /// None for unknown events, outliers and events of other rooms.
    pub fn position_of(&self, room_id: &RoomId, event_id: &str) -> Result<Option<At>> {
        if let Some(meta) = self.event_meta(event_id)? {
            return Ok((meta.room_id == room_id).then_some(At::Stream(meta.count)));
        }
        let Some(seq) = self
            .storage
            .get(Table::BackfillIndex, event_id.as_bytes())?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes)
        else {
            return Ok(None);
        };
        // The index row names the sequence; the room's row at it must name the event.
        let in_room = self
            .storage
            .get(Table::Backfill, &keys::with_count(&[room_id.as_str()], seq))?
            .is_some_and(|v| *v == *event_id.as_bytes());
        Ok(in_room.then_some(At::Backfilled(seq)))
    }

    /// May `user` see this one event of `room_id`? (For pages of events, use a [`Viewer`].)
    /// Events that are not in the room's history: no.
    pub fn user_may_see(&self, room_id: &RoomId, user: &UserId, pdu: &Pdu) -> Result<bool> {
        match self.position_of(room_id, pdu.event_id.as_str())? {
            Some(at) => self.viewer(room_id, user).can_see(pdu, at),
            None => Ok(false),
        }
    }

    /// Would the spec let `user` see an ordinary event at `at` under `setting`? (For the
    /// federation's view, which asks this for each of a server's users.)
    pub(crate) fn membership_allows(
        &self,
        room_id: &RoomId,
        user: &UserId,
        setting: Visibility,
        at: At,
    ) -> Result<bool> {
        MembershipLog::new(user).allows(self, room_id, setting, at)
    }

    /// Record a backfilled history visibility event at backfill sequence `seq`.
    pub(crate) fn log_backfilled_visibility(
        batch: &mut Batch,
        room_id: &RoomId,
        seq: u64,
        event_id: &str,
    ) -> Result<()> {
        batch.put(
            Table::VisibilityLog,
            &keys::with_count(&[room_id.as_str(), "b"], seq),
            event_id.as_bytes(),
        )
    }

    /// The user's membership at stream position `count` (the last change at or before it).
    pub fn membership_at(
        &self,
        room_id: &RoomId,
        user: &UserId,
        count: u64,
    ) -> Result<Option<String>> {
        MembershipLog::new(user).at(self, room_id, count)
    }

    /// Whether the user was ever joined to the room (as far as their recent membership history
    /// tells).
    pub fn was_ever_joined(&self, room_id: &RoomId, user: &UserId) -> Result<bool> {
        Ok(MembershipLog::new(user).last_join(self, room_id)?.is_some())
    }

    /// The room's current history visibility ("shared" when unset, as the spec says).
    pub fn history_visibility(&self, room_id: &RoomId) -> Result<String> {
        Ok(self
            .state_content(
                room_id,
                &ruma::events::StateEventType::RoomHistoryVisibility,
                "",
            )?
            .map_or(Visibility::Shared, |c| Visibility::of_content(&c))
            .as_str()
            .to_owned())
    }
}

/// Fill `visibility_log` from the backfilled history (schema migration 2 -> 3: databases
/// written before the log existed; the timeline's changes are read from `state_by_key`, which
/// migration 1 -> 2 fills). Repeatable: it only writes rows.
pub(crate) fn rebuild_log(storage: &crate::storage::Storage) -> Result<()> {
    let mut batch = storage.batch();
    for entry in storage.scan_prefix(Table::Backfill, b"")? {
        let (k, v) = entry?;
        // `room 0xff seq` rows (the `room -> BackfillMeta` rows have no separator).
        let Some((room, seq)) = keys::text_and_count(&k) else {
            continue;
        };
        let Some(raw) = storage.get(Table::Pdus, &v)? else {
            continue;
        };
        let Ok(pdu) = serde_json::from_slice::<Value>(&raw) else {
            continue;
        };
        if pdu.get("type").and_then(Value::as_str) == Some(HISTORY_VISIBILITY)
            && pdu.get("state_key").and_then(Value::as_str) == Some("")
        {
            batch.put(
                Table::VisibilityLog,
                &keys::with_count(&[room, "b"], seq),
                &v,
            )?;
        }
    }
    batch.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_of_the_spec() {
        use Visibility::*;
        // World readable: anybody.
        assert!(WorldReadable.allows(None, false));
        // Joined at the event: any setting.
        for v in [Shared, Invited, Joined] {
            assert!(v.allows(Some("join"), false));
            assert!(!v.allows(Some("leave"), false));
        }
        // Shared: also those who joined later.
        assert!(Shared.allows(None, true));
        assert!(Shared.allows(Some("leave"), true));
        assert!(!Joined.allows(None, true));
        // Invited: also those invited at the event.
        assert!(Invited.allows(Some("invite"), false));
        assert!(!Joined.allows(Some("invite"), true));
        // Not understood: shared.
        assert_eq!(
            Visibility::of_content(&serde_json::json!({"history_visibility": "nonsense"})),
            Shared
        );
        assert_eq!(Visibility::of_content(&serde_json::json!({})), Shared);
    }

    #[test]
    fn positions() {
        assert_eq!(At::from_position(7), At::Stream(7));
        assert_eq!(At::from_position(0), At::Stream(0));
        assert_eq!(At::from_position(-3), At::Backfilled(3));
    }
}
