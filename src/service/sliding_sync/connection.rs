//! Connection state of sliding sync, kept in memory: for each (user, device, `conn_id`) the
//! snapshots of what the last responses sent, keyed by the `pos` they handed out.
//!
//! A `pos` is `<nonce>_<seq>`: the nonce is drawn when a connection starts (a request without
//! `pos`), so a `pos` from before a restart or from a replaced connection is unknown rather than
//! mistaken for another one's. A request with `pos` N reads snapshot N and confirms the client got
//! it, so older snapshots go; N itself stays until a later one is used, so a client may retry a
//! request whose response it lost.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use parking_lot::Mutex;
use ruma::{OwnedDeviceId, OwnedRoomId, OwnedUserId};

use crate::error::{ErrCode, Error, Result};

/// Connections kept at most over all users; the least recently used goes first.
const MAX_CONNECTIONS: usize = 10_000;
/// Connections one device may hold (distinct `conn_id`s); a new one beyond this replaces that
/// device's least recently used one, so nobody can push other users' connections out.
const MAX_CONNECTIONS_PER_DEVICE: usize = 16;
/// Snapshots kept per connection (the client's current `pos` and a few it might still retry).
const MAX_SNAPSHOTS: usize = 4;

/// What was sent of one room, up to which stream position.
#[derive(Clone, Debug)]
pub struct SentRoom {
    /// Timeline and state were sent up to and including this position.
    pub up_to: u64,
    /// The membership the room was sent with ("invite" rooms carry no timeline).
    pub membership: String,
    /// The `required_state` the room was sent with: another one sends the state again.
    pub required_state: Arc<super::RequiredState>,
    /// Notification and highlight counts sent last.
    pub unread: (u64, u64),
    /// The `timeline_limit` the room was sent with: a larger one (a client opening the room)
    /// sends the room again with the longer timeline.
    pub timeline_limit: usize,
}

/// What the client has been sent on a connection, as of one `pos`.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The stream position the response covered (0 before the first response).
    pub position: u64,
    pub rooms: HashMap<OwnedRoomId, SentRoom>,
    /// The room count of each list, so a changed count is news even with no room data.
    pub list_counts: HashMap<String, usize>,
}

pub type ConnKey = (OwnedUserId, OwnedDeviceId, String);

struct Connection {
    nonce: String,
    next_seq: u64,
    snapshots: VecDeque<(u64, Arc<Snapshot>)>,
    last_used: u64,
}

#[derive(Default)]
struct Inner {
    conns: HashMap<ConnKey, Connection>,
    /// Logical clock for least-recently-used eviction.
    tick: u64,
}

/// The connections of all users; a field of the sliding sync service, so per server.
#[derive(Default)]
pub struct Connections {
    inner: Mutex<Inner>,
}

fn unknown_pos() -> Error {
    Error::new(ErrCode::UnknownPos, "Unknown or expired pos")
}

impl Connections {
    /// Start (or restart) a connection: returns its nonce and an empty snapshot.
    pub fn start(&self, key: &ConnKey) -> (String, Arc<Snapshot>) {
        let nonce = crate::utils::random_string(8);
        let mut inner = self.inner.lock();
        inner.tick += 1;
        let tick = inner.tick;
        if !inner.conns.contains_key(key) {
            let same_device = |k: &ConnKey| k.0 == key.0 && k.1 == key.1;
            let mine = inner.conns.keys().filter(|k| same_device(k)).count();
            let oldest = |only_mine: bool| {
                inner
                    .conns
                    .iter()
                    .filter(|(k, _)| !only_mine || same_device(k))
                    .min_by_key(|(_, c)| c.last_used)
                    .map(|(k, _)| k.clone())
            };
            let evict = if mine >= MAX_CONNECTIONS_PER_DEVICE {
                oldest(true)
            } else if inner.conns.len() >= MAX_CONNECTIONS {
                oldest(false)
            } else {
                None
            };
            if let Some(k) = evict {
                inner.conns.remove(&k);
            }
        }
        inner.conns.insert(
            key.clone(),
            Connection {
                nonce: nonce.clone(),
                next_seq: 1,
                snapshots: VecDeque::new(),
                last_used: tick,
            },
        );
        (nonce, Arc::new(Snapshot::default()))
    }

    /// The snapshot a `pos` names (`M_UNKNOWN_POS` when the connection or snapshot is gone);
    /// snapshots older than it are dropped.
    pub fn resume(&self, key: &ConnKey, pos: &str) -> Result<(String, Arc<Snapshot>)> {
        let (nonce, seq) = pos.rsplit_once('_').ok_or_else(unknown_pos)?;
        let seq: u64 = seq.parse().map_err(|_| unknown_pos())?;
        let mut inner = self.inner.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let conn = inner.conns.get_mut(key).ok_or_else(unknown_pos)?;
        if conn.nonce != nonce {
            return Err(unknown_pos());
        }
        let snapshot = conn
            .snapshots
            .iter()
            .find(|(s, _)| *s == seq)
            .map(|(_, snap)| snap.clone())
            .ok_or_else(unknown_pos)?;
        conn.snapshots.retain(|(s, _)| *s >= seq);
        conn.last_used = tick;
        Ok((conn.nonce.clone(), snapshot))
    }

    /// Keep the snapshot of a response and name its `pos`. A connection replaced or evicted
    /// meanwhile keeps nothing: the `pos` is then unknown, and the client starts over.
    pub fn store(&self, key: &ConnKey, nonce: &str, snapshot: Snapshot) -> String {
        let mut inner = self.inner.lock();
        let Some(conn) = inner.conns.get_mut(key).filter(|c| c.nonce == nonce) else {
            return format!("{nonce}_0");
        };
        let seq = conn.next_seq;
        conn.next_seq += 1;
        conn.snapshots.push_back((seq, Arc::new(snapshot)));
        while conn.snapshots.len() > MAX_SNAPSHOTS {
            conn.snapshots.pop_front();
        }
        format!("{nonce}_{seq}")
    }

    /// Number of connections kept (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner.lock().conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ConnKey {
        (
            ruma::owned_user_id!("@a:x"),
            ruma::OwnedDeviceId::from("D"),
            "c".into(),
        )
    }

    #[test]
    fn pos_lifecycle() {
        let c = Connections::default();
        let k = key();
        let (nonce, _) = c.start(&k);
        let at = |position| Snapshot {
            position,
            ..Default::default()
        };
        let p1 = c.store(&k, &nonce, at(5));
        let p2 = c.store(&k, &nonce, at(9));
        // Retrying the older pos works until the newer one is used.
        assert_eq!(c.resume(&k, &p1).map(|(_, s)| s.position).ok(), Some(5));
        assert_eq!(c.resume(&k, &p2).map(|(_, s)| s.position).ok(), Some(9));
        assert!(c.resume(&k, &p1).is_err());
        assert!(c.resume(&k, "nonsense").is_err());
        assert!(c.resume(&k, "zz_1").is_err());
        // A restarted connection forgets the old positions.
        c.start(&k);
        assert!(c.resume(&k, &p2).is_err());
    }
}
