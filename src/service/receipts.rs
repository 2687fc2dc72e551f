//! Read receipts and read markers. Receipts are kept per (room, type, thread, user) with the
//! stream count of their latest change; a log by room and count lets incremental sync send only
//! what changed.

use std::{collections::HashSet, sync::Arc};

use ruma::{OwnedEventId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::{
    error::Result,
    service::globals::Globals,
    storage::{keys, Storage, Table},
};

/// Thread part of the key of an unthreaded receipt.
const UNTHREADED: &str = "";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredReceipt {
    pub event_id: OwnedEventId,
    pub ts: u64,
    pub count: u64,
}

/// One receipt as sync reports it.
#[derive(Clone, Debug)]
pub struct Receipt {
    pub user: OwnedUserId,
    pub receipt_type: String,
    /// None for unthreaded receipts.
    pub thread: Option<String>,
    pub event_id: OwnedEventId,
    pub ts: u64,
}

pub struct Receipts {
    storage: Storage,
    globals: Arc<Globals>,
}

impl Receipts {
    pub fn new(storage: Storage, globals: Arc<Globals>) -> Receipts {
        Receipts { storage, globals }
    }

    /// Store a receipt and wake `wake` (the room's members, or only the user for private ones).
    pub fn set(
        &self,
        room_id: &RoomId,
        user: &UserId,
        receipt_type: &str,
        thread: Option<&str>,
        event_id: &ruma::EventId,
        wake: Vec<OwnedUserId>,
    ) -> Result<()> {
        let thread = thread.unwrap_or(UNTHREADED);
        let pending = self.globals.counter.next()?;
        let count = pending.get();
        let stored = StoredReceipt {
            event_id: event_id.to_owned(),
            ts: crate::utils::now_ms(),
            count,
        };
        let mut b = self.storage.batch();
        b.put(
            Table::Receipts,
            &keys::join(&[room_id.as_str(), receipt_type, thread, user.as_str()]),
            &serde_json::to_vec(&stored)?,
        )?;
        b.put(
            Table::ReceiptLog,
            &keys::with_count(&[room_id.as_str()], count),
            &keys::join(&[user.as_str(), receipt_type, thread]),
        )?;
        b.commit()?;
        pending.finish(wake);
        Ok(())
    }

    pub fn get(
        &self,
        room_id: &RoomId,
        user: &UserId,
        receipt_type: &str,
        thread: Option<&str>,
    ) -> Result<Option<StoredReceipt>> {
        let key = keys::join(&[
            room_id.as_str(),
            receipt_type,
            thread.unwrap_or(UNTHREADED),
            user.as_str(),
        ]);
        self.storage.get_json(Table::Receipts, &key)
    }

    /// Receipts of the room changed in `(since, up_to]` (every current one when `since` is None).
    pub fn since(&self, room_id: &RoomId, since: Option<u64>, up_to: u64) -> Result<Vec<Receipt>> {
        let mut out = Vec::new();
        match since {
            None => {
                for entry in self
                    .storage
                    .scan_prefix(Table::Receipts, &keys::prefix(&[room_id.as_str()]))?
                {
                    let (k, v) = entry?;
                    let parts = keys::split(&k);
                    if parts.len() != 4 {
                        continue;
                    }
                    let stored: StoredReceipt = serde_json::from_slice(&v)?;
                    if stored.count > up_to {
                        continue;
                    }
                    if let Some(r) = to_receipt(parts[3], parts[1], parts[2], stored) {
                        out.push(r);
                    }
                }
            }
            Some(since) => {
                let prefix = keys::prefix(&[room_id.as_str()]);
                let from = keys::with_count(&[room_id.as_str()], since.saturating_add(1));
                let mut seen = HashSet::new();
                for entry in self
                    .storage
                    .scan_from(Table::ReceiptLog, &prefix, &from, false)?
                {
                    let (k, v) = entry?;
                    if keys::count_suffix(&k).unwrap_or(0) > up_to {
                        break;
                    }
                    if !seen.insert(v.to_vec()) {
                        continue;
                    }
                    let parts = keys::split(&v);
                    if parts.len() != 3 {
                        continue;
                    }
                    let key = keys::join(&[room_id.as_str(), parts[1], parts[2], parts[0]]);
                    let Some(stored) = self.storage.get(Table::Receipts, &key)? else {
                        continue;
                    };
                    let stored: StoredReceipt = serde_json::from_slice(&stored)?;
                    if let Some(r) = to_receipt(parts[0], parts[1], parts[2], stored) {
                        out.push(r);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Erasure: delete the user's receipts in `room_id` and their rows in the receipt log (at
    /// most `max_rows` rows of each looked at). Returns how many rows went.
    pub fn erase_user(&self, room_id: &RoomId, user: &UserId, max_rows: usize) -> Result<usize> {
        let prefix = keys::prefix(&[room_id.as_str()]);
        let mine = keys::prefix(&[user.as_str()]);
        let mut rows = Vec::new();
        for entry in self
            .storage
            .scan_prefix(Table::Receipts, &prefix)?
            .take(max_rows)
        {
            let (k, _) = entry?;
            if keys::last_part(&k) == Some(user.as_str()) {
                rows.push((Table::Receipts, k));
            }
        }
        for entry in self
            .storage
            .scan_prefix(Table::ReceiptLog, &prefix)?
            .take(max_rows)
        {
            let (k, v) = entry?;
            if v.starts_with(&mine) {
                rows.push((Table::ReceiptLog, k));
            }
        }
        let mut b = self.storage.batch();
        for (table, k) in &rows {
            b.delete(*table, k)?;
        }
        b.commit()?;
        Ok(rows.len())
    }

    /// The stream counts of the events the user's read receipts (public or private, unthreaded
    /// or on the main timeline) point at; the largest is where their unread messages start.
    pub fn read_up_to(
        &self,
        room_id: &RoomId,
        user: &UserId,
        event_count: impl Fn(&ruma::EventId) -> Result<Option<u64>>,
    ) -> Result<Option<u64>> {
        let mut best = None;
        for kind in ["m.read", "m.read.private"] {
            for thread in [None, Some("main")] {
                if let Some(r) = self.get(room_id, user, kind, thread)? {
                    if let Some(c) = event_count(&r.event_id)? {
                        best = best.max(Some(c));
                    }
                }
            }
        }
        Ok(best)
    }
}

fn to_receipt(user: &str, kind: &str, thread: &str, stored: StoredReceipt) -> Option<Receipt> {
    Some(Receipt {
        user: UserId::parse(user).ok()?,
        receipt_type: kind.to_owned(),
        thread: (!thread.is_empty()).then(|| thread.to_owned()),
        event_id: stored.event_id,
        ts: stored.ts,
    })
}

/// The content of an `m.receipt` event for `viewer`: private receipts of others are left out.
/// Returns None when nothing is left.
pub fn receipt_content(receipts: &[Receipt], viewer: &UserId) -> Option<Value> {
    let mut content = Map::new();
    for r in receipts {
        if r.receipt_type == "m.read.private" && r.user != viewer {
            continue;
        }
        let mut data = json!({ "ts": r.ts });
        if let Some(t) = &r.thread {
            data["thread_id"] = Value::String(t.clone());
        }
        let by_event = content
            .entry(r.event_id.to_string())
            .or_insert_with(|| json!({}));
        let by_type = by_event
            .as_object_mut()
            .map(|o| o.entry(r.receipt_type.clone()).or_insert_with(|| json!({})));
        if let Some(Value::Object(users)) = by_type {
            users.insert(r.user.to_string(), data);
        }
    }
    (!content.is_empty()).then_some(Value::Object(content))
}

/// Receipt types a client may send.
pub const RECEIPT_TYPES: &[&str] = &["m.read", "m.read.private", "m.fully_read"];

/// A client's receipt or read marker: checks membership and the event, then stores it. Markers
/// never move backwards: a receipt for an event older than the current one is ignored.
pub fn send_receipt(
    s: &crate::service::Services,
    user: &UserId,
    room_id: &RoomId,
    receipt_type: &str,
    event_id: &ruma::EventId,
    thread: Option<&str>,
) -> Result<()> {
    use crate::error::Error;
    if !RECEIPT_TYPES.contains(&receipt_type) {
        return Err(Error::invalid_param(format!(
            "Unknown receipt type {receipt_type}"
        )));
    }
    if !s.rooms.is_joined(room_id, user)? {
        return Err(Error::forbidden("You are not joined to this room"));
    }
    let count_in_room = |id: &ruma::EventId| -> Result<Option<u64>> {
        Ok(s.rooms
            .event_meta(id.as_str())?
            .filter(|m| m.room_id == room_id)
            .map(|m| m.count))
    };
    let Some(count) = count_in_room(event_id)? else {
        return Err(Error::not_found("Unknown event in this room"));
    };
    if let Some(thread) = thread {
        if receipt_type == "m.fully_read" {
            return Err(Error::invalid_param(
                "thread_id is not allowed for m.fully_read",
            ));
        }
        if thread != "main" {
            let root = ruma::EventId::parse(thread)
                .map_err(|_| Error::invalid_param("thread_id must be 'main' or an event id"))?;
            if count_in_room(&root)?.is_none() {
                return Err(Error::invalid_param(
                    "thread_id is not an event of this room",
                ));
            }
        }
    }

    if receipt_type == "m.fully_read" {
        let current = s.account_data.get(user, Some(room_id), "m.fully_read")?;
        let current_count = current
            .as_ref()
            .and_then(|c| c.get("event_id").and_then(Value::as_str))
            .and_then(|id| ruma::EventId::parse(id).ok())
            .map(|id| count_in_room(&id))
            .transpose()?
            .flatten();
        if current_count.is_some_and(|c| c > count) {
            return Ok(());
        }
        return s.account_data.set(
            user,
            Some(room_id),
            "m.fully_read",
            &json!({ "event_id": event_id }),
        );
    }

    if let Some(current) = s.receipts.get(room_id, user, receipt_type, thread)? {
        if count_in_room(&current.event_id)?.is_some_and(|c| c > count) {
            return Ok(());
        }
    }
    let wake = if receipt_type == "m.read.private" {
        vec![user.to_owned()]
    } else {
        s.rooms.joined_members(room_id)?.iter().cloned().collect()
    };
    s.receipts
        .set(room_id, user, receipt_type, thread, event_id, wake)?;
    if receipt_type == "m.read" {
        if let Err(e) =
            crate::service::appservice::ephemeral::receipt(s, room_id, user, event_id, thread)
        {
            tracing::warn!("queueing a receipt for appservices: {e}");
        }
        if let Err(e) =
            crate::service::federation::edu::send_receipt(s, room_id, user, event_id, thread)
        {
            tracing::warn!("queueing a receipt: {e}");
        }
    }
    // Notifications up to the receipt are read (public and private receipts alike).
    s.push.notifications.mark_read(user, room_id, count, thread)
}
