//! Deleting room history for real: retention, the admin purge and room deletion.
//!
//! A purged message event leaves every index that serves events to clients (timeline, event
//! meta, relations, threads, backfilled history, notifications and unread counts), so `/sync`, `/messages`, `/context`, `/event`,
//! `/relations`, `/threads` and `/search` no longer find it. Its stored PDU is replaced by the
//! redacted form (no content; ids, hashes and signatures stay): the room's DAG still links
//! through it, so newer events' `prev_events`, federation's missing-event walks and a re-sent
//! copy of the event (recognised as known) keep working. State events are never purged here:
//! they are the room (members, power, name); see docs/compliance.md.
//!
//! Every batch of purged events is one atomic write; the physical deletion (flush and
//! compaction) is the caller's last step, `Storage::erase_deleted` with [`PURGED_TABLES`].

use ruma::{room_version_rules::RoomVersionRules, OwnedEventId, RoomId, ServerName, UserId};
use serde_json::Value;

use super::{append::rules_for, pdu::to_canonical, threads::ThreadRecord, Rooms};
use crate::{
    error::{Error, Result},
    storage::{keys, Batch, Table},
};

/// The tables a history purge writes to: compact these to make it physical.
pub const PURGED_TABLES: &[Table] = &[
    Table::Pdus,
    Table::EventMeta,
    Table::Timeline,
    Table::Relations,
    Table::Threads,
    Table::ThreadRoots,
    Table::Backfill,
    Table::BackfillIndex,
    Table::Notifications,
    Table::PushUnread,
];

/// Events purged per atomic batch (and per hold of the room's lock).
const BATCH_EVENTS: usize = 100;
/// Timeline rows one batch looks at (kept state events and local events count too).
const BATCH_SCAN: usize = 1000;
/// Relation index rows removed under one purged parent.
const MAX_CHILD_ROWS: usize = 10_000;
/// Rows one prefix deletion removes per batch.
const DELETE_CHUNK: usize = 1000;

/// Which of a room's message events a purge removes.
#[derive(Clone, Debug, Default)]
pub struct PurgeScope {
    /// Events sent before this time (ms, `origin_server_ts`). The walk (in stream order) stops
    /// at the first message event at or after it.
    pub before_ts: Option<u64>,
    /// Events before this stream position (exclusive).
    pub before_count: Option<u64>,
    /// Keep events whose sender is of this server (Synapse's `delete_local_events: false`).
    pub keep_local_of: Option<ruma::OwnedServerName>,
}

/// What a purge did.
#[derive(Clone, Copy, Debug, Default)]
pub struct PurgeOutcome {
    pub purged: usize,
    /// The event budget ran out before the scope's end: call again.
    pub more: bool,
}

impl PurgeScope {
    fn includes_ts(&self, ts: u64) -> bool {
        self.before_ts.is_none_or(|t| ts < t)
    }

    fn keeps_sender(&self, sender: &UserId) -> bool {
        self.keep_local_of
            .as_deref()
            .is_some_and(|s: &ServerName| sender.server_name() == s)
    }
}

impl Rooms {
    /// Remove one message event of `room_id` from everything that serves it, in the caller's
    /// batch, and replace its stored PDU by the redacted form. State events and events of other
    /// rooms are left alone (returns false). The reusable step of retention, the admin purge
    /// and erasure; make it physical afterwards with `Storage::erase_deleted(PURGED_TABLES)`.
    pub fn purge_event(
        &self,
        batch: &mut Batch,
        room_id: &RoomId,
        event_id: &str,
        rules: &RoomVersionRules,
    ) -> Result<bool> {
        let Some(bytes) = self.storage.get(Table::Pdus, event_id.as_bytes())? else {
            return Ok(false);
        };
        let mut value: Value = serde_json::from_slice(&bytes)?;
        if value.get("room_id").and_then(Value::as_str) != Some(room_id.as_str())
            || value.get("state_key").is_some()
        {
            return Ok(false);
        }
        if let Some(meta) = self.event_meta(event_id)? {
            batch.delete(
                Table::Timeline,
                &keys::with_count(&[room_id.as_str()], meta.count),
            )?;
            super::relations::unindex(batch, &value, meta.count)?;
            batch.delete(Table::EventMeta, event_id.as_bytes())?;
            // Notifications and unread counts of the event (rows keyed by its count; only
            // joined members have unread rows, leaving deletes them).
            let server = &self.globals.server_name;
            for user in self.joined_members(room_id)?.iter() {
                if user.server_name() != server {
                    continue;
                }
                let unread = keys::with_count(&[user.as_str(), room_id.as_str()], meta.count);
                if self.storage.contains(Table::PushUnread, &unread)? {
                    batch.delete(Table::PushUnread, &unread)?;
                }
                let notification = keys::with_count(&[user.as_str()], meta.count);
                if self.storage.contains(Table::Notifications, &notification)? {
                    batch.delete(Table::Notifications, &notification)?;
                }
            }
        }
        if !event_id.contains('\u{ff}') {
            // Its children's index rows: the children stay (until they expire themselves), but
            // nothing is listed under a parent that is gone.
            let prefix = keys::prefix(&[event_id]);
            for entry in self
                .storage
                .scan_prefix(Table::Relations, &prefix)?
                .take(MAX_CHILD_ROWS)
            {
                let (k, _) = entry?;
                batch.delete(Table::Relations, &k)?;
            }
            let root_key = keys::join(&[room_id.as_str(), event_id]);
            if let Some(v) = self.storage.get(Table::ThreadRoots, &root_key)? {
                if let Ok(record) = serde_json::from_slice::<ThreadRecord>(&v) {
                    batch.delete(
                        Table::Threads,
                        &keys::with_count(&[room_id.as_str()], record.latest),
                    )?;
                }
                batch.delete(Table::ThreadRoots, &root_key)?;
            }
        }
        if let Some(seq) = self
            .storage
            .get(Table::BackfillIndex, event_id.as_bytes())?
        {
            if let Some(seq) = keys::u64_value(&seq) {
                batch.delete(Table::Backfill, &keys::with_count(&[room_id.as_str()], seq))?;
            }
            batch.delete(Table::BackfillIndex, event_id.as_bytes())?;
        }
        let redacted = redacted_form(&mut value, rules)?;
        batch.put(
            Table::Pdus,
            event_id.as_bytes(),
            &serde_json::to_vec(&redacted)?,
        )?;
        if let Ok(id) = OwnedEventId::try_from(event_id) {
            self.evict_for_auth(&id);
        }
        Ok(true)
    }

    /// Purge the room's message events in `scope`, oldest first, at most `max_events` (then
    /// `more` is set): the backfilled history first (older than the timeline), then the
    /// timeline. Each batch of [`BATCH_EVENTS`] is one atomic write under the room's lock.
    pub async fn purge_history(
        &self,
        room_id: &RoomId,
        scope: &PurgeScope,
        max_events: usize,
    ) -> Result<PurgeOutcome> {
        let Some(meta) = self.meta(room_id)? else {
            return Err(Error::not_found("Unknown room"));
        };
        let rules = rules_for(&meta.version)?;
        let mut outcome = PurgeOutcome::default();
        // Backfilled history (older than the timeline), walked with a cursor.
        let prefix = keys::prefix(&[room_id.as_str()]);
        let mut from = prefix.clone();
        loop {
            if outcome.purged >= max_events {
                outcome.more = true;
                return Ok(outcome);
            }
            let _guard = self.lock(room_id).await;
            let mut batch = self.storage.batch();
            let mut purged = 0;
            let mut last = None;
            for entry in self
                .storage
                .scan_from(Table::Backfill, &prefix, &from, false)?
                .take(BATCH_SCAN)
            {
                let (k, v) = entry?;
                last = Some(k);
                let id = String::from_utf8_lossy(&v).into_owned();
                if self.purgeable(&id, scope)?
                    && self.purge_event(&mut batch, room_id, &id, &rules)?
                {
                    purged += 1;
                    if purged >= BATCH_EVENTS {
                        break;
                    }
                }
            }
            if purged > 0 {
                batch.commit()?;
                outcome.purged += purged;
            }
            match last {
                Some(k) => {
                    from = k.to_vec();
                    from.push(0);
                }
                None => break,
            }
        }
        // The timeline, oldest first, from a cursor (kept rows are not read again).
        let mut after = 0u64;
        loop {
            if outcome.purged >= max_events {
                outcome.more = true;
                return Ok(outcome);
            }
            let _guard = self.lock(room_id).await;
            let start = keys::with_count(&[room_id.as_str()], after.saturating_add(1));
            let mut batch = self.storage.batch();
            let mut purged = 0;
            let mut seen = 0;
            let mut finished = true;
            for entry in self
                .storage
                .scan_from(Table::Timeline, &prefix, &start, false)?
            {
                let (k, v) = entry?;
                let count = keys::count_suffix(&k).unwrap_or(0);
                if scope.before_count.is_some_and(|c| count >= c) {
                    break;
                }
                after = count;
                seen += 1;
                let id = String::from_utf8_lossy(&v).into_owned();
                let Some(pdu) = self.pdu(&id)? else { continue };
                if pdu.state_key.is_some() {
                    // Kept; the walk goes on.
                } else if !scope.includes_ts(pdu.origin_server_ts.get().into()) {
                    break;
                } else if !scope.keeps_sender(&pdu.sender)
                    && self.purge_event(&mut batch, room_id, &id, &rules)?
                {
                    purged += 1;
                }
                if purged >= BATCH_EVENTS || seen >= BATCH_SCAN {
                    finished = false;
                    break;
                }
            }
            if purged > 0 {
                batch.commit()?;
                outcome.purged += purged;
            }
            if finished {
                return Ok(outcome);
            }
        }
    }

    /// Whether a backfilled event falls in the scope (by time and sender; a stream bound does
    /// not exclude it: backfilled history is older than every timeline event).
    fn purgeable(&self, event_id: &str, scope: &PurgeScope) -> Result<bool> {
        Ok(match self.pdu(event_id)? {
            Some(p) => {
                p.state_key.is_none()
                    && scope.includes_ts(p.origin_server_ts.get().into())
                    && !scope.keeps_sender(&p.sender)
            }
            None => false,
        })
    }

    /// Delete every row of a room in every table (events, state, members and their per-user
    /// rows, receipts, aliases, directory entry, relations, threads, backfill, notifications),
    /// in bounded atomic batches. The first batch removes the room from the room list, the
    /// directory, its aliases and its members' room lists, so a crash part-way leaves no room
    /// anyone can see; calling this again finishes the job (it is idempotent). Holds the room's
    /// write lock throughout.
    /// Make it physical afterwards with `Storage::compact_all`.
    pub async fn delete_room_rows(&self, room_id: &RoomId) -> Result<usize> {
        // No event of the room is written meanwhile (a send or an incoming event in flight
        // finishes first; later ones find no room).
        let _guard = self.lock(room_id).await;
        let room = room_id.as_str();
        let prefix = keys::prefix(&[room]);
        let mut members = Vec::new();
        for entry in self.storage.scan_prefix(Table::RoomMembers, &prefix)? {
            let (k, _) = entry?;
            if let Some(user) = keys::last_part(&k) {
                members.push(user.to_owned());
            }
        }
        let mut aliases = Vec::new();
        let mut batch = self.storage.batch();
        for entry in self.storage.scan_prefix(Table::RoomAliases, &prefix)? {
            let (k, _) = entry?;
            if let Some(alias) = keys::last_part(&k) {
                aliases.push(alias.to_owned());
                batch.delete(Table::Aliases, alias.as_bytes())?;
            }
            batch.delete(Table::RoomAliases, &k)?;
        }
        batch.delete(Table::Rooms, room.as_bytes())?;
        batch.delete(Table::PublicRooms, room.as_bytes())?;
        // Its entries in appservices' network lists too.
        for entry in self
            .storage
            .scan_prefix(Table::PublicRooms, &keys::prefix(&[room]))?
            .take(10_000)
        {
            let (k, _) = entry?;
            batch.delete(Table::PublicRooms, &k)?;
        }
        for user in &members {
            batch.delete(Table::UserRooms, &keys::join(&[user, room]))?;
        }
        batch.commit()?;
        self.joined_cache.lock().remove(room_id);

        let mut removed = 0usize;
        // Per member: membership history, room account data, unread rows, notifications.
        for user in &members {
            let up = keys::prefix(&[user, room]);
            removed += self.delete_prefix(Table::MembershipLog, &up)?;
            removed += self.delete_prefix(Table::AccountData, &up)?;
            removed += self.delete_prefix(Table::PushUnread, &up)?;
            removed += self.delete_matching(Table::Notifications, &keys::prefix(&[user]), |v| {
                serde_json::from_slice::<Value>(v)
                    .ok()
                    .and_then(|n| n.get("room_id").and_then(Value::as_str).map(|r| r == room))
                    .unwrap_or(false)
            })?;
        }
        // Every stored event of the room (timeline, state, backfilled, outliers) and what is
        // keyed by event id.
        let needle = format!("\"room_id\":\"{room}\"");
        loop {
            let mut ids = Vec::new();
            for entry in self.storage.scan_prefix(Table::Pdus, b"")? {
                let (k, v) = entry?;
                if contains(&v, needle.as_bytes())
                    && serde_json::from_slice::<Value>(&v)
                        .ok()
                        .is_some_and(|p| p.get("room_id").and_then(Value::as_str) == Some(room))
                {
                    ids.push(k.to_vec());
                    if ids.len() >= DELETE_CHUNK {
                        break;
                    }
                }
            }
            if ids.is_empty() {
                break;
            }
            let mut batch = self.storage.batch();
            for id in &ids {
                batch.delete(Table::Pdus, id)?;
                batch.delete(Table::EventMeta, id)?;
                batch.delete(Table::EventState, id)?;
                batch.delete(Table::BackfillIndex, id)?;
                if !id.contains(&keys::SEP) {
                    let mut p = id.clone();
                    p.push(keys::SEP);
                    for entry in self
                        .storage
                        .scan_prefix(Table::Relations, &p)?
                        .take(MAX_CHILD_ROWS)
                    {
                        let (k, _) = entry?;
                        batch.delete(Table::Relations, &k)?;
                    }
                }
            }
            batch.commit()?;
            removed += ids.len();
        }
        for table in [
            Table::Timeline,
            Table::RoomState,
            Table::StateLog,
            Table::StateByKey,
            Table::RoomMembers,
            Table::Receipts,
            Table::ReceiptLog,
            Table::Threads,
            Table::ThreadRoots,
            Table::Backfill,
            Table::VisibilityLog,
        ] {
            removed += self.delete_prefix(table, &prefix)?;
        }
        let mut batch = self.storage.batch();
        batch.delete(Table::Backfill, room.as_bytes())?;
        batch.commit()?;
        self.auth_cache.lock().clear();
        tracing::info!(%room_id, rows = removed, aliases = aliases.len(), "room deleted");
        Ok(removed)
    }

    /// Delete every key with `prefix` in `table`, [`DELETE_CHUNK`] per atomic batch.
    fn delete_prefix(&self, table: Table, prefix: &[u8]) -> Result<usize> {
        self.delete_matching(table, prefix, |_| true)
    }

    /// Delete the keys with `prefix` in `table` whose value passes `pred`, in atomic batches.
    fn delete_matching(
        &self,
        table: Table,
        prefix: &[u8],
        pred: impl Fn(&[u8]) -> bool,
    ) -> Result<usize> {
        let mut removed = 0;
        let mut from = prefix.to_vec();
        loop {
            let mut batch = self.storage.batch();
            let mut n = 0;
            let mut last = None;
            for entry in self
                .storage
                .scan_from(table, prefix, &from, false)?
                .take(DELETE_CHUNK)
            {
                let (k, v) = entry?;
                if pred(&v) {
                    batch.delete(table, &k)?;
                    n += 1;
                }
                last = Some(k);
            }
            if n > 0 {
                batch.commit()?;
                removed += n;
            }
            match last {
                Some(k) => {
                    from = k.to_vec();
                    from.push(0);
                }
                None => return Ok(removed),
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The redacted form of a stored event (for a purge: without `redacted_because`, as no
/// redaction event caused it), keeping `event_id` and `room_id` so it reads back on its own.
pub fn redacted_form(value: &mut Value, rules: &RoomVersionRules) -> Result<Value> {
    let event_id = value.get("event_id").cloned();
    let room = value.get("room_id").cloned();
    if let Some(o) = value.as_object_mut() {
        o.remove("unsigned");
    }
    let obj = to_canonical(value.take())?;
    let redacted = ruma::canonical_json::redact(obj, &rules.redaction, None)
        .map_err(|e| Error::internal(format!("redact: {e}")))?;
    let mut out = serde_json::to_value(&redacted)?;
    if let Some(id) = event_id {
        out["event_id"] = id;
    }
    if let Some(r) = room {
        out["room_id"] = r;
    }
    Ok(out)
}
