//! Notification rows: what evaluation decided for each recipient of an event.
//!
//! Two tables, written in the event's batch: `Notifications` (user, count) keeps every
//! notification for `/notifications` and the push gateways; `PushUnread` (user, room, count) holds
//! the ones not read yet and is what unread counts are read from. A read receipt deletes the
//! `PushUnread` rows up to its event, so counting never walks read history.

use std::collections::BTreeMap;

use ruma::{push::Action, OwnedEventId, OwnedRoomId, RoomId, UserId};
use serde::{Deserialize, Serialize};

use crate::{
    error::Result,
    storage::{keys, Batch, Storage, Table},
};

/// Unread rows counted per room at most; a room with more shows this many. Keeps a sync of a
/// long-unread busy room from walking an unbounded range.
pub const MAX_COUNTED: u64 = 10_000;

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Notification {
    pub room_id: OwnedRoomId,
    pub event_id: OwnedEventId,
    pub actions: Vec<Action>,
    pub highlight: bool,
    pub ts: u64,
}

/// What a `PushUnread` row remembers: whether it highlights, and the thread it belongs to.
#[derive(Serialize, Deserialize)]
struct Unread {
    #[serde(rename = "h")]
    highlight: bool,
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    thread: Option<String>,
}

/// Notification and highlight counts.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    pub notifications: u64,
    pub highlights: u64,
}

impl Counts {
    fn add(&mut self, highlight: bool) {
        self.notifications += 1;
        self.highlights += u64::from(highlight);
    }
}

/// Unread counts of one room: the main timeline (or everything, when threads are not asked for
/// separately) and each thread by its root.
#[derive(Default, Debug)]
pub struct RoomCounts {
    pub main: Counts,
    pub threads: BTreeMap<String, Counts>,
}

pub struct Notifications {
    storage: Storage,
}

impl Notifications {
    pub fn new(storage: Storage) -> Notifications {
        Notifications { storage }
    }

    /// Unread counts of the user in the room, over events up to stream position `up_to`.
    /// With `split_threads`, thread events are counted per thread instead of in `main`.
    pub fn unread(
        &self,
        user: &UserId,
        room_id: &RoomId,
        up_to: u64,
        split_threads: bool,
    ) -> Result<RoomCounts> {
        let mut out = RoomCounts::default();
        let prefix = keys::prefix(&[user.as_str(), room_id.as_str()]);
        for (seen, entry) in self
            .storage
            .scan_prefix(Table::PushUnread, &prefix)?
            .enumerate()
        {
            let (k, v) = entry?;
            if keys::count_suffix(&k).is_none_or(|c| c > up_to) || seen as u64 >= MAX_COUNTED {
                break;
            }
            let Ok(row) = serde_json::from_slice::<Unread>(&v) else {
                continue;
            };
            match row.thread.filter(|_| split_threads) {
                Some(root) => out.threads.entry(root).or_default().add(row.highlight),
                None => out.main.add(row.highlight),
            }
        }
        Ok(out)
    }

    /// Total unread notifications of the user over all rooms (the badge a push shows), bounded.
    pub fn total_unread(&self, user: &UserId) -> Result<u64> {
        let mut n = 0u64;
        for entry in self
            .storage
            .scan_prefix(Table::PushUnread, &keys::prefix(&[user.as_str()]))?
        {
            entry?;
            n += 1;
            if n >= MAX_COUNTED {
                break;
            }
        }
        Ok(n)
    }

    /// A read receipt of the user at stream position `read_up_to`: notifications up to there are
    /// read. `thread` is the receipt's thread: None (unthreaded) reads everything, "main" the main
    /// timeline, an event id that thread.
    pub fn mark_read(
        &self,
        user: &UserId,
        room_id: &RoomId,
        read_up_to: u64,
        thread: Option<&str>,
    ) -> Result<()> {
        let prefix = keys::prefix(&[user.as_str(), room_id.as_str()]);
        let mut batch = self.storage.batch();
        for entry in self.storage.scan_prefix(Table::PushUnread, &prefix)? {
            let (k, v) = entry?;
            if keys::count_suffix(&k).is_none_or(|c| c > read_up_to) {
                break;
            }
            let row_thread = serde_json::from_slice::<Unread>(&v)
                .ok()
                .and_then(|r| r.thread);
            let covered = match thread {
                None => true,
                Some("main") => row_thread.is_none(),
                Some(root) => row_thread.as_deref() == Some(root),
            };
            if covered {
                batch.delete(Table::PushUnread, &k)?;
            }
        }
        if !batch.is_empty() {
            batch.commit()?;
        }
        Ok(())
    }

    /// Whether the notification at `count` in the room is still unread.
    pub fn is_unread(&self, user: &UserId, room_id: &RoomId, count: u64) -> Result<bool> {
        self.storage.contains(
            Table::PushUnread,
            &keys::with_count(&[user.as_str(), room_id.as_str()], count),
        )
    }

    /// The user's notifications, newest first, strictly before `before` (a stream position), at
    /// most `limit`, only highlights if asked. Returns them with their stream positions.
    pub fn list(
        &self,
        user: &UserId,
        before: Option<u64>,
        limit: usize,
        only_highlight: bool,
    ) -> Result<Vec<(u64, Notification)>> {
        let prefix = keys::prefix(&[user.as_str()]);
        let start = keys::with_count(
            &[user.as_str()],
            before.map_or(u64::MAX, |b| b.saturating_sub(1)),
        );
        let mut out = Vec::new();
        for entry in self
            .storage
            .scan_from(Table::Notifications, &prefix, &start, true)?
        {
            let (k, v) = entry?;
            let Some(count) = keys::count_suffix(&k) else {
                continue;
            };
            if before.is_some_and(|b| count >= b) {
                continue;
            }
            let Ok(n) = serde_json::from_slice::<Notification>(&v) else {
                continue;
            };
            if only_highlight && !n.highlight {
                continue;
            }
            out.push((count, n));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The user's notifications after stream position `after`, oldest first (gateway delivery).
    pub fn after(
        &self,
        user: &UserId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Notification)>> {
        let prefix = keys::prefix(&[user.as_str()]);
        let start = keys::with_count(&[user.as_str()], after.saturating_add(1));
        let mut out = Vec::new();
        for entry in self
            .storage
            .scan_from(Table::Notifications, &prefix, &start, false)?
        {
            let (k, v) = entry?;
            let (Some(count), Ok(n)) = (keys::count_suffix(&k), serde_json::from_slice(&v)) else {
                continue;
            };
            out.push((count, n));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Forget notifications older than `cutoff_ms` (retention of the `/notifications` list;
    /// unread rows stay until read). Returns how many went.
    pub fn prune(&self, cutoff_ms: u64, max: usize) -> Result<usize> {
        let mut batch = self.storage.batch();
        let mut n = 0;
        for entry in self.storage.scan_prefix(Table::Notifications, &[])? {
            let (k, v) = entry?;
            let Ok(row) = serde_json::from_slice::<Notification>(&v) else {
                batch.delete(Table::Notifications, &k)?;
                continue;
            };
            if row.ts < cutoff_ms {
                batch.delete(Table::Notifications, &k)?;
                n += 1;
                if n >= max {
                    break;
                }
            }
        }
        if !batch.is_empty() {
            batch.commit()?;
        }
        Ok(n)
    }
}

/// Put one recipient's notification (already serialized: recipients share it) into the
/// event's batch.
pub fn record(
    batch: &mut Batch,
    user: &UserId,
    room_id: &RoomId,
    count: u64,
    notification: &[u8],
    highlight: bool,
    thread: Option<&str>,
) -> Result<()> {
    batch.put(
        Table::Notifications,
        &keys::with_count(&[user.as_str()], count),
        notification,
    )?;
    let unread = Unread {
        highlight,
        thread: thread.map(str::to_owned),
    };
    batch.put(
        Table::PushUnread,
        &keys::with_count(&[user.as_str(), room_id.as_str()], count),
        &serde_json::to_vec(&unread)?,
    )
}
