//! Threads (`m.thread` relations): an index of each room's threads by latest reply, for
//! `GET /rooms/{roomId}/threads`, written with each reply in the reply's batch.

use ruma::{RoomId, UserId};

use super::{Pdu, Rooms};
use crate::{
    error::{Error, Result},
    storage::{keys, Batch, Table},
};

/// Most thread roots one page returns.
pub const MAX_LIMIT: usize = 100;
/// Most index entries one page looks at (threads the user may not see are skipped).
const MAX_SCAN: usize = 2000;

/// What `/threads` asks for.
pub struct ThreadsQuery {
    /// Only threads the user took part in (sent the root or a reply).
    pub participated: bool,
    /// Continue below this position (the previous page's token).
    pub from: Option<u64>,
    pub limit: usize,
}

impl Rooms {
    /// A reply at `count` to the thread rooted at `root`: the thread moves to `count`.
    pub(super) fn index_thread_reply(
        &self,
        batch: &mut Batch,
        room_id: &RoomId,
        root: &str,
        count: u64,
    ) -> Result<()> {
        let root_key = keys::join(&[room_id.as_str(), root]);
        if let Some(previous) = self.storage.get(Table::ThreadRoots, &root_key)? {
            if let Some(c) = keys::u64_value(&previous) {
                batch.delete(Table::Threads, &keys::with_count(&[room_id.as_str()], c))?;
            }
        }
        batch.put(Table::ThreadRoots, &root_key, &count.to_be_bytes())?;
        batch.put(
            Table::Threads,
            &keys::with_count(&[room_id.as_str()], count),
            root.as_bytes(),
        )
    }

    /// Thread roots of the room the user may see, most recently active first, with the token of
    /// the next page.
    pub fn threads(
        &self,
        room_id: &RoomId,
        user: &UserId,
        q: &ThreadsQuery,
    ) -> Result<(Vec<Pdu>, Option<u64>)> {
        let visibility = self.history_visibility(room_id)?;
        if !self.may_read_history(room_id, user, &visibility)? {
            return Err(Error::forbidden("You are not allowed to read this room's history"));
        }
        let limit = q.limit.clamp(1, MAX_LIMIT);
        let prefix = keys::prefix(&[room_id.as_str()]);
        let start = keys::with_count(&[room_id.as_str()], q.from.unwrap_or(u64::MAX));
        let mut out = Vec::new();
        let mut next = None;
        for entry in self
            .storage
            .scan_from(Table::Threads, &prefix, &start, true)?
            .take(MAX_SCAN)
        {
            let (k, v) = entry?;
            let Some(count) = keys::count_suffix(&k) else {
                continue;
            };
            if q.from.is_some_and(|f| count >= f) {
                continue;
            }
            if out.len() == limit {
                next = Some(count.saturating_add(1));
                break;
            }
            let root = String::from_utf8_lossy(&v).into_owned();
            let Some(meta) = self.event_meta(&root)?.filter(|m| m.room_id == room_id) else {
                continue;
            };
            if !self.user_can_see(room_id, user, meta.count, &visibility)? {
                continue;
            }
            let Some(pdu) = self.pdu(&root)? else {
                continue;
            };
            if q.participated && !self.thread_summary(&pdu, user)?.participated {
                continue;
            }
            out.push(pdu);
        }
        Ok((out, next))
    }
}
