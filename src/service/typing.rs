//! Typing notifications (in memory; they expire within seconds anyway). Every change, including
//! an expiry, gets a stream count and wakes the room's joined members, so a long-polling sync
//! sees both "started" and "stopped" typing promptly.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use crate::{error::Result, service::globals::Globals};

/// Longest a client may claim to be typing in one request.
pub const MAX_TYPING_MS: u64 = 120_000;

#[derive(Default)]
struct RoomTyping {
    /// Typing user -> when their typing expires.
    users: HashMap<OwnedUserId, Instant>,
    /// Stream count of the latest change.
    count: u64,
    /// Whom to wake when an expiry changes the list (the members at the latest update).
    members: Vec<OwnedUserId>,
}

pub struct Typing {
    globals: Arc<Globals>,
    rooms: Arc<Mutex<HashMap<OwnedRoomId, RoomTyping>>>,
}

impl Typing {
    pub fn new(globals: Arc<Globals>) -> Typing {
        Typing {
            globals,
            rooms: Arc::default(),
        }
    }

    /// Start (with a timeout in ms) or stop typing. `members` are the room's joined members.
    pub fn set(
        &self,
        room_id: &RoomId,
        user: &UserId,
        typing: Option<u64>,
        members: Vec<OwnedUserId>,
    ) -> Result<()> {
        let pending = self.globals.counter.next()?;
        {
            let mut rooms = self.rooms.lock();
            let entry = rooms.entry(room_id.to_owned()).or_default();
            match typing {
                Some(ms) => {
                    let ms = ms.min(MAX_TYPING_MS);
                    entry
                        .users
                        .insert(user.to_owned(), Instant::now() + Duration::from_millis(ms));
                    self.schedule_expiry(room_id.to_owned(), Duration::from_millis(ms));
                }
                None => {
                    entry.users.remove(user);
                }
            }
            entry.count = pending.get();
            entry.members = members.clone();
        }
        pending.finish(members);
        Ok(())
    }

    /// After `after`, drop expired typers and tell the room if anything changed.
    fn schedule_expiry(&self, room_id: OwnedRoomId, after: Duration) {
        let rooms = self.rooms.clone();
        let globals = self.globals.clone();
        // Outside a runtime (unit tests) expiry is still applied lazily on read.
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            tokio::time::sleep(after + Duration::from_millis(5)).await;
            let Ok(pending) = globals.counter.next() else {
                return;
            };
            let wake = {
                let mut rooms = rooms.lock();
                let Some(entry) = rooms.get_mut(&room_id) else {
                    return;
                };
                let now = Instant::now();
                let before = entry.users.len();
                entry.users.retain(|_, until| *until > now);
                if entry.users.len() == before {
                    // Nothing expired (the user typed again): the count is dropped unused.
                    return;
                }
                entry.count = pending.get();
                let members = entry.members.clone();
                if entry.users.is_empty() && members.is_empty() {
                    rooms.remove(&room_id);
                }
                members
            };
            pending.finish(wake);
        });
    }

    /// The users typing in the room now, if the list changed after stream position `since`
    /// (always, when `since` is None and somebody is typing).
    pub fn typing_since(
        &self,
        room_id: &RoomId,
        since: Option<u64>,
    ) -> Option<(u64, Vec<OwnedUserId>)> {
        let rooms = self.rooms.lock();
        let entry = rooms.get(room_id)?;
        let now = Instant::now();
        let mut users: Vec<OwnedUserId> = entry
            .users
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(u, _)| u.clone())
            .collect();
        users.sort();
        match since {
            Some(since) if entry.count > since => Some((entry.count, users)),
            None if !users.is_empty() => Some((entry.count, users)),
            _ => None,
        }
    }
}
