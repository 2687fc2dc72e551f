//! Account data (global and per room) and filters. Each account-data change gets a stream count
//! and a log entry so incremental sync can send exactly what changed.

use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::Value;

use crate::{
    error::{Error, Result},
    service::globals::Globals,
    storage::{keys, Storage, Table},
};

pub struct AccountData {
    storage: Storage,
    globals: std::sync::Arc<Globals>,
}

impl AccountData {
    pub fn new(storage: Storage, globals: std::sync::Arc<Globals>) -> AccountData {
        AccountData { storage, globals }
    }

    /// Set one account data entry (room `None` is global). Wakes the user's sync.
    pub fn set(
        &self,
        user: &UserId,
        room: Option<&RoomId>,
        kind: &str,
        content: &Value,
    ) -> Result<()> {
        let room_part = room.map(|r| r.as_str()).unwrap_or("");
        let pending = self.globals.counter.next()?;
        let mut b = self.storage.batch();
        b.put(
            Table::AccountData,
            &keys::join(&[user.as_str(), room_part, kind]),
            &serde_json::to_vec(content)?,
        )?;
        let mut log_key = keys::prefix(&[user.as_str()]);
        log_key.extend_from_slice(&pending.get().to_be_bytes());
        b.put(
            Table::AccountDataLog,
            &log_key,
            &keys::join(&[room_part, kind]),
        )?;
        b.commit()?;
        pending.finish(vec![user.to_owned()]);
        Ok(())
    }

    pub fn get(&self, user: &UserId, room: Option<&RoomId>, kind: &str) -> Result<Option<Value>> {
        let room_part = room.map(|r| r.as_str()).unwrap_or("");
        self.storage.get_json(
            Table::AccountData,
            &keys::join(&[user.as_str(), room_part, kind]),
        )
    }

    /// Every entry of the user: (room or None, type, content).
    pub fn all(&self, user: &UserId) -> Result<Vec<(Option<OwnedRoomId>, String, Value)>> {
        let mut out = Vec::new();
        for entry in self
            .storage
            .scan_prefix(Table::AccountData, &keys::prefix(&[user.as_str()]))?
        {
            let (k, v) = entry?;
            let parts = keys::split(&k);
            if parts.len() < 3 {
                continue;
            }
            let room = if parts[1].is_empty() {
                None
            } else {
                RoomId::parse(parts[1]).ok()
            };
            out.push((room, parts[2..].join("\u{ff}"), serde_json::from_slice(&v)?));
        }
        Ok(out)
    }

    /// Entries changed in `(since, up_to]`: (room or None, type, content), each once.
    pub fn changed_since(
        &self,
        user: &UserId,
        since: u64,
        up_to: u64,
    ) -> Result<Vec<(Option<OwnedRoomId>, String, Value)>> {
        let prefix = keys::prefix(&[user.as_str()]);
        let mut from = prefix.clone();
        from.extend_from_slice(&(since + 1).to_be_bytes());
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for entry in self
            .storage
            .scan_from(Table::AccountDataLog, &prefix, &from, false)?
        {
            let (k, v) = entry?;
            if keys::count_suffix(&k).unwrap_or(0) > up_to {
                break;
            }
            let parts = keys::split(&v);
            if parts.len() < 2 || !seen.insert(v.to_vec()) {
                continue;
            }
            let room = if parts[0].is_empty() {
                None
            } else {
                RoomId::parse(parts[0]).ok()
            };
            if let Some(content) = self.get(user, room.as_deref(), parts[1])? {
                out.push((room, parts[1].to_owned(), content));
            }
        }
        Ok(out)
    }

    // Filters.

    pub fn create_filter(&self, user: &UserId, filter: &Value) -> Result<String> {
        let id = crate::utils::random_string(12);
        self.storage.put(
            Table::Filters,
            &keys::join(&[user.as_str(), &id]),
            &serde_json::to_vec(filter)?,
        )?;
        Ok(id)
    }

    pub fn filter(&self, user: &UserId, id: &str) -> Result<Value> {
        self.storage
            .get_json(Table::Filters, &keys::join(&[user.as_str(), id]))?
            .ok_or_else(|| Error::not_found("Unknown filter"))
    }
}
