//! Threads (`m.thread` relations): an index of each room's threads by latest reply, for
//! `GET /rooms/{roomId}/threads`, written with each reply in the reply's batch.

use ruma::{RoomId, UserId};
use serde::{Deserialize, Serialize};

use super::{visibility::At, Pdu, Rooms};
use crate::{
    error::{Error, Result},
    storage::{keys, Batch, Table},
};

/// Most thread roots one page returns.
pub const MAX_LIMIT: usize = 100;
/// Most index entries one page looks at (threads the user may not see are skipped).
const MAX_SCAN: usize = 2000;

/// Distinct reply senders a thread remembers (for `current_user_participated`); a thread with
/// more stops adding (participation of later newcomers is then not reported).
const MAX_THREAD_SENDERS: usize = 1000;

/// The summary of one thread, kept in `ThreadRoots` and updated with every reply.
#[derive(Serialize, Deserialize, Default)]
pub struct ThreadRecord {
    /// Stream position of the latest reply (where its `Threads` entry is).
    pub latest: u64,
    pub latest_event: String,
    pub count: u64,
    /// Who replied (distinct, at most [`MAX_THREAD_SENDERS`]).
    pub senders: Vec<String>,
}

/// What `/threads` asks for.
pub struct ThreadsQuery {
    /// Only threads the user took part in (sent the root or a reply).
    pub participated: bool,
    /// Continue below this position (the previous page's token).
    pub from: Option<u64>,
    pub limit: usize,
}

impl Rooms {
    /// The stored summary of the thread rooted at `root`.
    pub(super) fn thread_record(
        &self,
        room_id: &RoomId,
        root: &str,
    ) -> Result<Option<ThreadRecord>> {
        Ok(self
            .storage
            .get(Table::ThreadRoots, &keys::join(&[room_id.as_str(), root]))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// A reply `reply` at `count` to the thread rooted at `root`: the thread moves to `count`
    /// and its summary counts the reply. Called under the room's lock, in the reply's batch.
    pub(super) fn index_thread_reply(
        &self,
        batch: &mut Batch,
        room_id: &RoomId,
        root: &str,
        reply: &Pdu,
        count: u64,
    ) -> Result<()> {
        let mut record = self.thread_record(room_id, root)?.unwrap_or_default();
        if record.count > 0 {
            batch.delete(
                Table::Threads,
                &keys::with_count(&[room_id.as_str()], record.latest),
            )?;
        }
        record.latest = count;
        record.latest_event = reply.event_id.to_string();
        record.count += 1;
        let sender = reply.sender.as_str();
        if record.senders.len() < MAX_THREAD_SENDERS && !record.senders.iter().any(|s| s == sender)
        {
            record.senders.push(sender.to_owned());
        }
        batch.put(
            Table::ThreadRoots,
            &keys::join(&[room_id.as_str(), root]),
            &serde_json::to_vec(&record)?,
        )?;
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
            return Err(Error::forbidden(
                "You are not allowed to read this room's history",
            ));
        }
        let limit = q.limit.clamp(1, MAX_LIMIT);
        let prefix = keys::prefix(&[room_id.as_str()]);
        let start = keys::with_count(&[room_id.as_str()], q.from.unwrap_or(u64::MAX));
        let mut viewer = self.viewer(room_id, user);
        let mut out = Vec::new();
        let mut next = None;
        let mut scanned = 0usize;
        for entry in self
            .storage
            .scan_from(Table::Threads, &prefix, &start, true)?
        {
            let (k, v) = entry?;
            let Some(count) = keys::count_suffix(&k) else {
                continue;
            };
            if q.from.is_some_and(|f| count >= f) {
                continue;
            }
            scanned += 1;
            // A page full, or the scan budget spent on threads the user may not see: the next
            // page continues here.
            if out.len() == limit || scanned > MAX_SCAN {
                next = Some(count.saturating_add(1));
                break;
            }
            let root = String::from_utf8_lossy(&v).into_owned();
            let Some(meta) = self.event_meta(&root)?.filter(|m| m.room_id == room_id) else {
                continue;
            };
            let Some(pdu) = self.pdu(&root)? else {
                continue;
            };
            // A root the user may see, with a reply they may see: a thread whose replies all
            // lie outside their history is no thread of theirs.
            if !viewer.can_see(&pdu, At::Stream(meta.count))?
                || self
                    .visible_thread(&pdu, room_id, &mut viewer, None)?
                    .is_none()
            {
                continue;
            }
            if q.participated && !self.thread_participated(&pdu, user)? {
                continue;
            }
            out.push(pdu);
        }
        Ok((out, next))
    }
}
